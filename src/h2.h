/*
 * h2: the HTTP/2 codec (RFC 9113), the only module that includes nghttp2.h. No nghttp2 type
 * appears here: the codec speaks in http.h slices and our own callbacks, the way curl's vtls
 * layer hides each TLS library behind one seam.
 *
 * It does no I/O and keeps no timers. The caller (the future mux_h2, inbound and outbound)
 * reads bytes from its socket and hands them to h2_feed(); callbacks fire from inside that
 * call; h2_output() then fills the caller's write buffer with frames to send. A session is
 * owned by one thread and is not re-entrant: h2_feed(), h2_output() and h2_session_free()
 * must not be called from a callback; the submit functions, h2_consume(), h2_resume() and
 * h2_stream_set_user() may be.
 *
 *   bytes in  -> h2_feed()   -> on_head / on_data / on_trailers / on_end_stream / on_close
 *   mux       -> h2_submit_*  -> h2_output() -> bytes out (body pulled through read_body)
 *
 * Flow control is the caller's back-pressure: the codec never opens a receive window by
 * itself. Every body byte handed to on_data stays charged to its stream's and the
 * connection's window until the caller says with h2_consume() that it passed the byte on
 * downstream; a slow reader therefore stops the peer once the windows are spent.
 *
 * Defences (each bound from struct h2_limits; 0 there means the default below):
 * SETTINGS_MAX_CONCURRENT_STREAMS (streams over it are refused with REFUSED_STREAM before the
 * peer acknowledged our SETTINGS, and are a connection error after); a header list bound
 * (RFC 9113 section 6.5.2 size: names + values + 32 per field, pseudo-fields included) and a
 * field count, answered 431 on a server and with RST_STREAM on a client; the compressed
 * header block (HEADERS + CONTINUATION payloads) and the number of CONTINUATION frames
 * bounded (CVE-2024-27316); a client's RST_STREAM frames counted in a token bucket, a flood
 * answered with GOAWAY(ENHANCE_YOUR_CALM) (rapid reset, CVE-2023-44487); SETTINGS entries per
 * frame, queued PING/SETTINGS acknowledgements and, on a server, all queued frames bounded (a peer
 * that makes us queue frames it never reads ends the session); windows bounded. A zero-window stall
 * is not timed here (the codec has no clock for it): the caller runs its own per-stream and
 * per-connection idle timers and can read the send windows with h2_send_window() to tell a stalled
 * peer from an idle one.
 */
#ifndef CONNECTD_H2_H
#define CONNECTD_H2_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "http.h"

/* HTTP/2 error codes as on the wire (RFC 9113 section 7). */
enum h2_error_code {
    H2_NO_ERROR = 0x0,
    H2_PROTOCOL_ERROR = 0x1,
    H2_INTERNAL_ERROR = 0x2,
    H2_FLOW_CONTROL_ERROR = 0x3,
    H2_SETTINGS_TIMEOUT = 0x4,
    H2_STREAM_CLOSED = 0x5,
    H2_FRAME_SIZE_ERROR = 0x6,
    H2_REFUSED_STREAM = 0x7,
    H2_CANCEL = 0x8,
    H2_COMPRESSION_ERROR = 0x9,
    H2_CONNECT_ERROR = 0xa,
    H2_ENHANCE_YOUR_CALM = 0xb,
    H2_INADEQUATE_SECURITY = 0xc,
    H2_HTTP_1_1_REQUIRED = 0xd,
};

enum h2_role {
    H2_SERVER, /* accepts streams: inbound from a caller, or from the local app's client */
    H2_CLIENT, /* opens streams: to an upstream sidecar or to the local app (h2c) */
};

/* Defaults (Envoy's where it has one). */
#define H2_DEFAULT_MAX_CONCURRENT_STREAMS 100u
#define H2_DEFAULT_MAX_HEADER_LIST_BYTES  (60u * 1024u) /* max_request_headers_kb */
#define H2_DEFAULT_MAX_HEADERS            100u
#define H2_DEFAULT_STREAM_WINDOW_BYTES    (256u * 1024u)
#define H2_DEFAULT_CONN_WINDOW_BYTES      (1024u * 1024u)
#define H2_DEFAULT_MAX_CONTINUATIONS      8u
#define H2_DEFAULT_RESET_BURST            200u
#define H2_DEFAULT_RESET_RATE_PER_S       50u
#define H2_DEFAULT_MAX_OUTBOUND_ACK       1000u
#define H2_DEFAULT_MAX_SETTINGS           32u
/* Windows larger than this are clamped to it: the caller buffers up to a window per stream. */
#define H2_WINDOW_MAX (16u * 1024u * 1024u)

/* Per-session limits; a zero member takes its H2_DEFAULT_*. */
struct h2_limits {
    uint32_t max_concurrent_streams; /* SETTINGS_MAX_CONCURRENT_STREAMS we announce */
    uint32_t max_header_list_bytes;  /* SETTINGS_MAX_HEADER_LIST_SIZE, enforced on receipt */
    uint32_t max_headers;            /* fields in one head or trailer section */
    uint32_t stream_window_bytes;    /* SETTINGS_INITIAL_WINDOW_SIZE (receive, per stream) */
    uint32_t conn_window_bytes;      /* the connection's receive window */
    uint32_t max_continuations;      /* CONTINUATION frames after one HEADERS */
    uint32_t reset_burst;            /* server: RST_STREAM frames allowed at once ... */
    uint32_t reset_rate_per_s;       /* ... and refilled per second; past it: GOAWAY */
    uint32_t max_outbound_ack;       /* queued PING/SETTINGS acks before the session ends;
                                        a server also ends it when more than this plus 5 per
                                        allowed stream frames wait for a peer that does not
                                        read (resets of refused streams, say) */
    uint32_t max_settings;           /* entries in one SETTINGS frame */
};

/*
 * A message head as received: slices valid only during the callback that hands it out (copy
 * what you keep). Absent pseudo-fields have p == NULL.
 */
struct h2_head {
    struct http_slice method;    /* request: :method */
    struct http_slice scheme;    /* request: :scheme (absent for CONNECT) */
    struct http_slice authority; /* request: :authority, else the Host field's value */
    struct http_slice path;      /* request: :path (absent for CONNECT) */
    int status;                  /* response: :status (100-599); 0 in a request */
    /* The regular fields in order, names in lower case (HTTP/2 requires it), each flagged
     * HTTP_HDR_H2OK. On a request a Host field is not among them: it is folded into
     * <authority> (see h2_feed). */
    const struct http_header *headers;
    size_t nheaders;
    int64_t content_length; /* the content-length field's value, -1 when absent */
    int end_stream;         /* no body follows (END_STREAM on the HEADERS frame) */
};

/* Flags a read_body callback sets in *<flags>. */
#define H2_BODY_EOF      0x1u /* the body ends with these bytes */
#define H2_BODY_TRAILERS 0x2u /* with H2_BODY_EOF: trailers follow (h2_submit_trailers) */
/* read_body's return value when it has no bytes now: the stream waits for h2_resume(). */
#define H2_BODY_DEFER (-EAGAIN)

struct h2_session;

/*
 * Callbacks; every one is optional except read_body when bodies are submitted. <stream_user>
 * is the caller's pointer for the stream (h2_stream_set_user(), or h2_submit_request()'s),
 * NULL until set. <user> is h2_session_new()'s. Returning a negative value from on_head,
 * on_data or on_trailers resets that stream: -EAGAIN with REFUSED_STREAM (safe for the peer
 * to retry), anything else with INTERNAL_ERROR; the session goes on.
 */
struct h2_callbacks {
    /* A request head (server) or a response head (client; a 1xx interim head has status <
     * 200 and a final one follows). A request whose head breaks RFC 9113 section 8 never
     * gets here: it is reset with PROTOCOL_ERROR (or answered 431 when too large). */
    int (*on_head)(struct h2_session *s, int32_t stream_id, void *stream_user,
                   const struct h2_head *head, void *user);
    /* Body bytes, valid during the call. Each byte must later be given back with h2_consume()
     * once passed on, or the peer stalls (this is the back-pressure). */
    int (*on_data)(struct h2_session *s, int32_t stream_id, void *stream_user, const uint8_t *p,
                   size_t len, void *user);
    /* Trailer fields (names in lower case; gRPC's grpc-status arrives here). */
    int (*on_trailers)(struct h2_session *s, int32_t stream_id, void *stream_user,
                       const struct http_header *fields, size_t n, void *user);
    /* The peer finished its side of the stream (END_STREAM), after the last on_data or
     * on_trailers. */
    void (*on_end_stream)(struct h2_session *s, int32_t stream_id, void *stream_user, void *user);
    /* The stream is gone (<code> H2_NO_ERROR when it completed, else the reset's code, sent or
     * received). Bytes given to on_data and not yet consumed are returned to the connection
     * window here; later h2_consume() calls for the stream are no-ops. Called once per stream
     * that was handed to the caller (on_head, or h2_submit_request()). */
    void (*on_close)(struct h2_session *s, int32_t stream_id, void *stream_user, uint32_t code,
                     void *user);
    /* The peer sent GOAWAY: streams above <last_stream_id> were not processed (a client may
     * retry them elsewhere; they close with REFUSED_STREAM). */
    void (*on_goaway)(struct h2_session *s, int32_t last_stream_id, uint32_t code, void *user);
    /* Pulls up to <cap> body bytes of a stream submitted with a body into <buf>. Returns the
     * count (with H2_BODY_EOF in *<flags> on the last, possibly 0 bytes), H2_BODY_DEFER when
     * nothing is buffered (call h2_resume() when there is), or another negative value to
     * reset the stream with INTERNAL_ERROR. Only called while the peer's windows allow. */
    ssize_t (*read_body)(struct h2_session *s, int32_t stream_id, void *stream_user, uint8_t *buf,
                         size_t cap, unsigned *flags, void *user);
};

/*
 * What the session counted, for metrics and tests. Refusals are streams the codec answered or
 * reset by itself, never handed to the caller.
 */
struct h2_stats {
    uint64_t streams_opened;    /* by the peer (server) or by us (client) */
    uint64_t streams_refused;   /* REFUSED_STREAM sent: over the concurrency limit, or
                                   on_head said -EAGAIN */
    uint64_t headers_too_large; /* heads or trailers over the header bounds */
    uint64_t malformed;         /* heads refused for RFC 9113 section 8 reasons */
    uint64_t resets_received;   /* RST_STREAM frames from the peer */
    uint64_t resets_sent;       /* RST_STREAM frames we sent */
};

/*
 * Creates a session. <limits> may be NULL (all defaults); <cb> and <user> are kept (the
 * callbacks struct is copied). The session queues its connection preface (client) or SETTINGS
 * (server) at once: h2_output() has bytes to send before anything is fed. Never NULL (OOM
 * aborts).
 */
struct h2_session *h2_session_new(enum h2_role role, const struct h2_limits *limits,
                                  const struct h2_callbacks *cb, void *user);
/* Frees the session; no callback fires. Not from a callback. NULL is a no-op. */
void h2_session_free(struct h2_session *s);

/*
 * Feeds <len> bytes read from the peer (a server expects the client preface first). Returns
 * <len> when the bytes were taken (callbacks fired meanwhile), or -EPROTO when the peer broke
 * the protocol or flooded us: the session is over, GOAWAY (when one can still be sent) is
 * queued, so write what h2_output() gives and then close; h2_error() says why, and
 * h2_wants_read() is false from then on. A connection error that nghttp2 finds inside a frame
 * (a bad frame size, HPACK garbage, a flow-control violation) is handled by nghttp2 itself:
 * h2_feed() returns <len>, the rest of the input is ignored and GOAWAY is queued; once
 * h2_output() has given it out, h2_error() names it and h2_wants_read() and h2_wants_write()
 * are both false. So a caller that writes the output and closes when neither wants anything
 * handles every case the same way. Request heads: RFC 9113 section 8 is checked by
 * nghttp2 (pseudo-fields, connection-specific fields, field characters, content-length against
 * the DATA received); the codec adds the :authority/Host rule: without :authority the Host
 * field is the authority; with both, they must name the same host and port after
 * scheme-based normalization (case, the scheme's default port) or the stream is reset with
 * PROTOCOL_ERROR, as RFC 9113 section 8.3.1 lets a server treat it as malformed (an
 * authorization decision must not see one authority while the app sees another).
 */
ssize_t h2_feed(struct h2_session *s, const uint8_t *buf, size_t len);

/*
 * Copies up to <cap> bytes of pending frames into <buf>: returns the count (0 when nothing is
 * pending), or -EPROTO when the session failed (close). A frame that does not fit is split
 * across calls. Body bytes are pulled from read_body during this call.
 */
ssize_t h2_output(struct h2_session *s, uint8_t *buf, size_t cap);

/* 1 when h2_output() has bytes to give. (Not const: nghttp2's answer is kept until the
 * session changes, since callers ask several times per round.) */
int h2_wants_write(struct h2_session *s);
/* 1 while the peer may still send something we want; when neither wants, close. */
int h2_wants_read(struct h2_session *s);

/* Why the session ended (a short string owned by the session), or NULL while it has not. */
const char *h2_error(const struct h2_session *s);
const struct h2_stats *h2_get_stats(const struct h2_session *s);

/*
 * Head to send. Names may be in any case (they are lowered), hop-by-hop fields (HTTP_HDR_HOP,
 * HTTP_HDR_DUP, and the connection-specific names RFC 9113 section 8.2.2 forbids: connection,
 * keep-alive, proxy-connection, transfer-encoding, upgrade, te other than "trailers") and, when
 * <authority> is set, host are left out. content_length and end_stream are ignored here. A
 * field flagged HTTP_HDR_H2OK goes out as it is, neither lowered nor checked: the flag says it
 * is fit (h2_feed's heads carry it; a caller that changes a field clears it). X-Request-Id is
 * sent never indexed (HPACK): a value new on every request would only churn the peer's and our
 * dynamic tables.
 */
struct h2_out_head {
    struct http_slice method, scheme, authority, path; /* request */
    int status;                                        /* response: 100-599 */
    const struct http_header *headers;
    size_t nheaders;
};

/*
 * Client: opens a stream with the request <head>; <has_body> says read_body supplies a body
 * (else END_STREAM is on the HEADERS). <stream_user> is attached to the stream. Returns the
 * stream id (> 0), -ESHUTDOWN when the connection takes no new stream (GOAWAY, ids spent: use
 * another connection), -EINVAL for a bad head or on a server session. The request may wait
 * for a free slot under the peer's concurrency limit.
 */
int32_t h2_submit_request(struct h2_session *s, const struct h2_out_head *head, int has_body,
                          void *stream_user);
/*
 * Server: the response head of a stream (a 1xx is interim: send the final one after it).
 * Returns 0, -EINVAL (bad head, unknown stream, client session) or -EALREADY.
 */
int h2_submit_response(struct h2_session *s, int32_t stream_id, const struct h2_out_head *head,
                       int has_body);
/* Trailers end the stream (after a body that ended with H2_BODY_TRAILERS). 0 or -EINVAL. */
int h2_submit_trailers(struct h2_session *s, int32_t stream_id, const struct http_header *fields,
                       size_t n);
/* The stream's read_body has bytes again after H2_BODY_DEFER. 0 or -EINVAL. */
int h2_resume(struct h2_session *s, int32_t stream_id);
/* Resets a stream with <code>. 0 or -EINVAL. */
int h2_submit_rst(struct h2_session *s, int32_t stream_id, uint32_t code);
/*
 * Graceful shutdown: GOAWAY(NO_ERROR) naming the last stream we processed; open streams
 * finish, the peer opens no more. 0 or -EALREADY.
 */
int h2_shutdown(struct h2_session *s);
/*
 * The same, naming the last stream below <stream_id> (a peer's stream being refused): the
 * peer knows <stream_id> and every later stream went unprocessed and may send them again
 * elsewhere. 0 or -EALREADY.
 */
int h2_shutdown_before(struct h2_session *s, int32_t stream_id);
/* Ends the session now: GOAWAY(<code>), then h2_wants_read/write turn false once it is out. */
int h2_terminate(struct h2_session *s, uint32_t code);

/*
 * Gives back <n> body bytes of <stream_id> that the caller has passed on: the windows reopen
 * (WINDOW_UPDATE once half a window is consumed). Returns 0; -EINVAL when <n> is more than
 * was delivered and not yet consumed; 0 and nothing for a stream already closed (its bytes
 * were returned at on_close).
 */
int h2_consume(struct h2_session *s, int32_t stream_id, size_t n);

/* Sets the caller's pointer for a stream. 0 or -EINVAL (unknown stream). */
int h2_stream_set_user(struct h2_session *s, int32_t stream_id, void *stream_user);

/* What the peer lets us send now: on <stream_id>, or on the connection when it is 0; -1 for
 * an unknown stream. A stream with a body waiting and a window of 0 is stalled on the peer. */
int64_t h2_send_window(const struct h2_session *s, int32_t stream_id);

/* Streams open on the session now. */
size_t h2_open_streams(const struct h2_session *s);

/* The peer's SETTINGS_MAX_CONCURRENT_STREAMS: how many streams it lets us open at once (before
 * its SETTINGS arrive, nghttp2's assumption of 100); capped at 1000 so a peer's "unlimited"
 * does not make a connection take every stream. */
uint32_t h2_peer_max_streams(const struct h2_session *s);

/* The client connection preface's length ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"). */
#define H2_PREFACE_LEN 24u
/*
 * Whether the first <n> bytes a client sent on a connection start HTTP/2 (prior knowledge):
 * 1 when they hold the whole preface, 0 when they are a proper prefix of it (more bytes are
 * needed to tell), -1 when they are not (HTTP/1.x, say). Used to pick a codec without ALPN.
 */
int h2_preface_check(const void *p, size_t n);

/*
 * Whether <p>[<n>] may be sent as a field value (RFC 9113 8.2.1): no NUL, CR, LF or other
 * control character but HTAB, no DEL, no leading or trailing SP or HTAB; the empty value is
 * valid. The same answer as nghttp2_check_header_value_rfc9113(), eight bytes at a time
 * (the outbound codec checks every value it sends: XFCC alone is ~270 bytes per request).
 */
int h2_value_ok(const void *p, size_t n);

#endif
