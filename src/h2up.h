/*
 * h2up: HTTP/2 client connections a worker's sessions share (Envoy's connection pool for an
 * HTTP/2 cluster). One pool per worker (struct session_host's <h2up>); a connection is one h2
 * client session (h2.h) over one transport: TLS to an upstream sidecar (ALPN h2, outbound) or
 * prior-knowledge h2c to the local application (inbound). Codecs (mux_h2, mux_h1) open streams
 * on it; each stream belongs to one owner, which gets its response through struct
 * h2up_stream_ops. No nghttp2 type appears here.
 *
 * Final interface (the contract of this wave, as implemented):
 *
 *   pool:    h2up_pool_new(loop, conns gauge, streams counter) / h2up_pool_free()
 *   conns:   h2up_find(pool, key, tls) -> a conn that takes a stream now, or NULL: dial, then
 *            h2up_adopt(pool, key, tls, &xprt, peer) (the xprt moves in), optionally
 *            h2up_set_connect_timeout(); h2up_sweep() drains the stale ones
 *   streams: h2up_open(conn, head, has_body, ops, owner) -> handle; h2up_resume(),
 *            h2up_consume(), h2up_trailers(), h2up_cancel(); ops->on_close ends the handle
 *
 * Threading and callbacks: everything runs on the worker's loop thread. Callbacks to an owner
 * are made only from the connection's own I/O handler (its events, or a run after the loop's
 * round that an h2up_* call queued) or timers, never from inside an h2up_*
 * call an owner makes, so an owner never sees itself re-entered. Within a callback an owner may
 * call h2up_cancel/h2up_consume/h2up_resume/h2up_trailers on any of its streams, open new
 * streams, and finish its session: the connection outlives the callback (its memory is freed
 * by a deferred call).
 *
 * Bounds: frames waiting for the socket are at most H2UP_OUT_MAX bytes per connection (the h2
 * session is asked for more only below it); at most H2UP_MAX_PER_KEY connections per key, each
 * holding at most H2UP_MAX_QUEUED streams over the peer's concurrency limit; a
 * stream's unconsumed response bytes are bounded by the HTTP/2 receive window (the owner's
 * h2up_consume is the back-pressure). A connection with no stream closes after
 * H2UP_IDLE_MS.
 */
#ifndef CONNECTD_H2UP_H
#define CONNECTD_H2UP_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "h2.h"
#include "loop.h"
#include "tls.h"
#include "xprt.h"

#define H2UP_MAX_PER_KEY 4
#define H2UP_IDLE_MS     30000
#define H2UP_OUT_MAX     (64u * 1024u)
/* Streams a conn holds past the peer's SETTINGS_MAX_CONCURRENT_STREAMS, waiting for a slot;
 * cancelled ones count until the peer frees a slot (their queued head is dropped only then). */
#define H2UP_MAX_QUEUED 100u

struct h2up_pool;   /* one per worker */
struct h2up_conn;   /* one HTTP/2 client session over one transport */
struct h2up_stream; /* one request/response on a conn, owned by a codec */

/* What an owner is told about its stream; <owner> is h2up_open()'s. All but read_body are
 * optional (read_body is required when the stream was opened with a body). */
struct h2up_stream_ops {
    /* A response head: 1xx interim ones (status < 200), then the final one. A negative return
     * resets the stream (INTERNAL_ERROR); on_close follows. */
    int (*on_head)(void *owner, const struct h2_head *hd);
    /* Response body bytes, valid during the call. Each must be given back with h2up_consume()
     * once passed on (the HTTP/2 window is the back-pressure). */
    int (*on_data)(void *owner, const uint8_t *p, size_t len);
    int (*on_trailers)(void *owner, const struct http_header *f, size_t n);
    /* The peer's END_STREAM, after the last on_data / on_trailers. */
    void (*on_end)(void *owner);
    /* The stream is gone; the handle is dead after this call (during it, h2up_stream_conn()
     * and h2up_established() on that conn may still be read). <code>: H2_NO_ERROR when it
     * completed, the reset's code, H2_REFUSED_STREAM when the conn refused or GOAWAYed it
     * before processing (safe to retry elsewhere), H2_CONNECT_ERROR when the conn failed
     * (connect, TLS, I/O, protocol); <why>: a short text. */
    void (*on_close)(void *owner, uint32_t code, const char *why);
    /* The request body, h2.h's read_body contract (H2_BODY_EOF / H2_BODY_TRAILERS /
     * H2_BODY_DEFER, then h2up_resume()). With H2_BODY_TRAILERS the owner calls
     * h2up_trailers() from within this callback. */
    ssize_t (*read_body)(void *owner, uint8_t *buf, size_t cap, unsigned *flags);
};

/*
 * A pool on <loop>. <conns> (a gauge: connections open) and <streams> (a counter: streams
 * opened) are the worker's metrics, updated with relaxed atomic adds; either may be NULL.
 * Never NULL (OOM aborts).
 */
struct h2up_pool *h2up_pool_new(struct loop *loop, atomic_uint_fast64_t *conns,
                                atomic_uint_fast64_t *streams);
/* Closes every conn at once, no callback fires (owners must be gone). NULL is a no-op. */
void h2up_pool_free(struct h2up_pool *p);

/*
 * A conn under <key> (string equality: the caller builds keys) made under <tls> (pointer
 * equality; NULL for h2c) that takes a new stream now: not draining or failed, and with fewer
 * open streams than the peer's SETTINGS_MAX_CONCURRENT_STREAMS, least loaded first. When every
 * such conn is at its limit and there are H2UP_MAX_PER_KEY of them, the least loaded one
 * (its h2 session queues the stream). NULL when the caller should dial a new one. The result
 * is borrowed: valid until the caller returns to the loop.
 */
struct h2up_conn *h2up_find(struct h2up_pool *p, const char *key, const struct tls_ctx *tls);
/* Conns under <key> and <tls> that are alive (draining or not), for tests and logs. */
size_t h2up_count(const struct h2up_pool *p, const char *key, const struct tls_ctx *tls);

/*
 * Takes over a transport: a verified TLS end, or a plain descriptor (connected, or with a
 * non-blocking connect under way: a failed connect fails the conn's streams with
 * H2_CONNECT_ERROR). The xprt moves (its events are taken over; the caller's copy is reset to
 * fd -1), <tls> gets a reference (may be NULL), <key> and <peer_name> (for logs) are copied.
 * The client preface is queued. Never NULL. The result is borrowed like h2up_find()'s.
 */
struct h2up_conn *h2up_adopt(struct h2up_pool *p, const char *key, struct tls_ctx *tls,
                             struct xprt *x, const char *peer_name);
/* Until the peer's first bytes arrive, the conn fails (H2_CONNECT_ERROR) after <ms>. */
void h2up_set_connect_timeout(struct h2up_conn *c, uint32_t ms);
/* Whether the peer's first bytes arrived (the connect, at least, worked). */
int h2up_established(const struct h2up_conn *c);

/*
 * Opens a stream with request <hd> (copied now); <has_body>: ops->read_body supplies a body.
 * Returns the handle, owned by the conn and valid until ops->on_close; NULL when the conn takes
 * no new stream (GOAWAY, ids spent, a bad head, H2UP_MAX_QUEUED streams already waiting for
 * the peer's limit: a far side that holds every slot cannot make us queue without bound):
 * nothing fires then. No callback fires before
 * this returns.
 */
struct h2up_stream *h2up_open(struct h2up_conn *c, const struct h2_out_head *hd, int has_body,
                              const struct h2up_stream_ops *ops, void *owner);
/* The request body has bytes again after H2_BODY_DEFER. 0 or -EINVAL. */
int h2up_resume(struct h2up_stream *st);
/* <n> response body bytes were passed on: the windows reopen. 0 or -EINVAL. */
int h2up_consume(struct h2up_stream *st, size_t n);
/* Request trailers (after read_body said H2_BODY_EOF | H2_BODY_TRAILERS). 0 or -EINVAL. */
int h2up_trailers(struct h2up_stream *st, const struct http_header *f, size_t n);
/* The owner leaves: the stream is reset with <code> (when still open) and no callback fires
 * for it after this; the handle is dead. */
void h2up_cancel(struct h2up_stream *st, uint32_t code);
/* The conn a stream is on (for logs and metrics). */
struct h2up_conn *h2up_stream_conn(const struct h2up_stream *st);
/* Streams open on <c> now. */
size_t h2up_conn_streams(const struct h2up_conn *c);

/*
 * Drains every conn for which <stale>(its key, its tls, <arg>) returns 1: GOAWAY, no new
 * stream, closed once its streams are done. For a snapshot change (TLS context, endpoints,
 * protocol) and for connectd's drain (a <stale> that says 1 for all).
 */
void h2up_sweep(struct h2up_pool *p,
                int (*stale)(const char *key, const struct tls_ctx *tls, void *arg), void *arg);

#endif
