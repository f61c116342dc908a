/*
 * h2up: HTTP/2 client connections a worker's sessions share. See h2up.h for the contract.
 *
 * A conn's life:
 *
 *   adopt --> LIVE (takes streams) --GOAWAY from the peer / h2up_sweep--> DRAINING
 *               |  \--no stream for H2UP_IDLE_MS--> closed                  |
 *               |                                                           '--last stream-->
 * closed
 *               '--EOF, I/O or protocol error, connect timeout--> FAILED: every open stream's
 *                  owner gets on_close (REFUSED_STREAM above the peer's GOAWAY last id, else
 *                  CONNECT_ERROR), then closed
 *
 * I/O: the descriptor is always watched for reading; it is read only after an event for it,
 * or while the last read did not drain it (it filled the buffer, or TLS holds more: read-ahead
 * is on), since the loop is level-triggered and a read that only says EAGAIN costs a system
 * call (and, on TLS, an SSL_read). Frames the owners' calls produce are written after the
 * loop's round (a deferred call, which every call of the round shares), without asking epoll
 * whether the socket is writable; only a write that did not take everything waits for
 * LOOP_WRITE. So a request costs no epoll_ctl() and no EAGAIN read.
 *
 * A closed conn leaves the pool's list at once and its memory goes with a deferred call, since
 * an event or a callback frame may still refer to it in the loop's current round. Owner
 * callbacks are made only from conn_run() (conn_io(), the deferred run of conn_kick()) and the
 * connect timer, so an owner calling h2up_* never re-enters itself: calls that produce frames
 * only queue the deferred run.
 */
#include "h2up.h"
#include "log.h"
#include "memcache.h"
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IO_CHUNK 16384

struct h2up_stream {
    struct h2up_stream *next, *prev; /* the conn's list */
    struct h2up_conn *c;
    int32_t id;
    const struct h2up_stream_ops *ops; /* NULL once cancelled */
    void *owner;
};

struct h2up_conn {
    struct h2up_conn *next; /* the pool's list of open conns */
    struct h2up_pool *pool;
    char *key;
    struct tls_ctx *tls; /* one reference, or NULL */
    char peer[300];
    struct xprt x;
    struct h2_session *h2;
    uint8_t *out; /* frames waiting for the socket */
    size_t out_len;
    struct h2up_stream *streams;
    size_t nstreams;
    int draining;    /* no new stream */
    int closed;      /* out of the pool, waiting for the deferred free */
    int established; /* the peer's first bytes arrived */
    int32_t goaway_last;
    int got_goaway;
    struct loop_timer idle;    /* no stream for H2UP_IDLE_MS */
    struct loop_timer connect; /* h2up_set_connect_timeout */
    struct loop_defer reap;
    struct loop_defer flush; /* conn_kick(): a run after the loop's round */
    int rd_ok;               /* read: an event came, or the last read did not drain the end */
    unsigned rd_wants;       /* the events the last read that drained it waits for */
};

struct h2up_pool {
    struct loop *loop;
    struct h2up_conn *conns;
    atomic_uint_fast64_t *g_conns, *c_streams;
    uint8_t rbuf[IO_CHUNK];
};

static void conn_io(struct loop_io *io, unsigned events);
static void conn_run(struct h2up_conn *c);

/* ---- conn lifetime ---- */

static void conn_reap(struct loop_defer *d)
{
    struct h2up_conn *c = (struct h2up_conn *)((char *)d - offsetof(struct h2up_conn, reap));
    free(c->key);
    free(c->out);
    free(c);
}

static void on_flush(struct loop_defer *d)
{
    struct h2up_conn *c = (struct h2up_conn *)((char *)d - offsetof(struct h2up_conn, flush));
    if (!c->closed)
        conn_run(c);
}

/* Frames may wait (a new stream, a window update, a body resumed): the conn runs after the
 * loop's round and writes them (see I/O above). A closed conn's memory outlives this: its
 * reap is queued behind, the deferred calls run in order. */
static void conn_kick(struct h2up_conn *c)
{
    if (c->closed)
        return;
    loop_defer(c->pool->loop, &c->flush, on_flush);
}

static void stream_unlink(struct h2up_conn *c, struct h2up_stream *st)
{
    if (st->prev != NULL)
        st->prev->next = st->next;
    else
        c->streams = st->next;
    if (st->next != NULL)
        st->next->prev = st->prev;
    c->nstreams--;
    if (c->nstreams == 0 && !c->closed)
        loop_timer_start(c->pool->loop, &c->idle, H2UP_IDLE_MS);
}

/*
 * Closes <c>: out of the pool; open streams' owners are told (<code> for streams the peer may
 * have processed, REFUSED_STREAM for those above its GOAWAY) unless <quiet>. Not from inside
 * an h2 callback of the conn's session (it frees it).
 */
static void conn_close(struct h2up_conn *c, uint32_t code, const char *why, int quiet)
{
    struct h2up_pool *p = c->pool;
    if (c->closed)
        return;
    c->closed = 1;
    struct h2up_conn **pp = &p->conns;
    while (*pp != NULL && *pp != c)
        pp = &(*pp)->next;
    if (*pp == c)
        *pp = c->next;
    if (p->g_conns != NULL)
        atomic_fetch_sub_explicit(p->g_conns, 1, memory_order_relaxed);
    loop_timer_stop(p->loop, &c->idle);
    loop_timer_stop(p->loop, &c->connect);
    LOG_DEBUG("h2up: connection to %s closed: %s (%zu streams open)", LOG_ESC(c->peer), why,
              c->nstreams);
    while (c->streams != NULL) {
        struct h2up_stream *st = c->streams;
        stream_unlink(c, st);
        uint32_t k = code;
        if (code != H2_NO_ERROR && c->got_goaway && st->id > c->goaway_last)
            k = H2_REFUSED_STREAM;
        if (!quiet && st->ops != NULL && st->ops->on_close != NULL)
            st->ops->on_close(st->owner, k, why);
        memcache_free(st);
    }
    h2_session_free(c->h2);
    c->h2 = NULL;
    xprt_close(p->loop, &c->x);
    tls_ctx_unref(c->tls);
    c->tls = NULL;
    loop_defer(p->loop, &c->reap, conn_reap);
}

static void on_idle(struct loop_timer *t)
{
    struct h2up_conn *c = t->data;
    if (c->nstreams == 0)
        conn_close(c, H2_NO_ERROR, "idle", 1);
}

static void on_connect_timeout(struct loop_timer *t)
{
    struct h2up_conn *c = t->data;
    if (!c->established)
        conn_close(c, H2_CONNECT_ERROR, "connect timed out", 0);
}

/* ---- the h2 session's callbacks (from h2_feed / h2_output in conn_io) ---- */

static int cb_head(struct h2_session *hs, int32_t id, void *su, const struct h2_head *hd,
                   void *user)
{
    struct h2up_stream *st = su;
    (void)hs;
    (void)id;
    (void)user;
    if (st == NULL || st->ops == NULL || st->ops->on_head == NULL)
        return 0;
    return st->ops->on_head(st->owner, hd) < 0 ? -1 : 0;
}

static int cb_data(struct h2_session *hs, int32_t id, void *su, const uint8_t *p, size_t len,
                   void *user)
{
    struct h2up_stream *st = su;
    (void)user;
    if (st == NULL || st->ops == NULL || st->ops->on_data == NULL) {
        h2_consume(hs, id, len); /* no one reads it: the window must not close for others */
        return 0;
    }
    return st->ops->on_data(st->owner, p, len) < 0 ? -1 : 0;
}

static int cb_trailers(struct h2_session *hs, int32_t id, void *su, const struct http_header *f,
                       size_t n, void *user)
{
    struct h2up_stream *st = su;
    (void)hs;
    (void)id;
    (void)user;
    if (st == NULL || st->ops == NULL || st->ops->on_trailers == NULL)
        return 0;
    return st->ops->on_trailers(st->owner, f, n) < 0 ? -1 : 0;
}

static void cb_end(struct h2_session *hs, int32_t id, void *su, void *user)
{
    struct h2up_stream *st = su;
    (void)hs;
    (void)id;
    (void)user;
    if (st != NULL && st->ops != NULL && st->ops->on_end != NULL)
        st->ops->on_end(st->owner);
}

static void cb_close(struct h2_session *hs, int32_t id, void *su, uint32_t code, void *user)
{
    struct h2up_conn *c = user;
    struct h2up_stream *st = su;
    char why[64];
    (void)hs;
    (void)id;
    if (st == NULL)
        return;
    stream_unlink(c, st);
    if (st->ops != NULL && st->ops->on_close != NULL) {
        if (code == H2_NO_ERROR)
            snprintf(why, sizeof(why), "complete");
        else if (code == H2_REFUSED_STREAM)
            snprintf(why, sizeof(why), "refused by the peer (REFUSED_STREAM or GOAWAY)");
        else
            snprintf(why, sizeof(why), "reset (HTTP/2 error 0x%x)", code);
        st->ops->on_close(st->owner, code, why);
    }
    memcache_free(st);
}

static void cb_goaway(struct h2_session *hs, int32_t last, uint32_t code, void *user)
{
    struct h2up_conn *c = user;
    (void)hs;
    c->draining = 1;
    c->got_goaway = 1;
    c->goaway_last = last;
    LOG_DEBUG("h2up: %s sent GOAWAY (last stream %d, code 0x%x)", LOG_ESC(c->peer), (int)last,
              code);
}

static ssize_t cb_read_body(struct h2_session *hs, int32_t id, void *su, uint8_t *buf, size_t cap,
                            unsigned *flags, void *user)
{
    struct h2up_stream *st = su;
    (void)hs;
    (void)id;
    (void)user;
    if (st == NULL || st->ops == NULL || st->ops->read_body == NULL)
        return -EIO;
    return st->ops->read_body(st->owner, buf, cap, flags);
}

static const struct h2_callbacks h2_cb = {
    .on_head = cb_head,
    .on_data = cb_data,
    .on_trailers = cb_trailers,
    .on_end_stream = cb_end,
    .on_close = cb_close,
    .on_goaway = cb_goaway,
    .read_body = cb_read_body,
};

/* ---- I/O ---- */

static void conn_io(struct loop_io *io, unsigned events)
{
    struct h2up_conn *c = io->data;
    if (events & (LOOP_READ | LOOP_ERROR | c->rd_wants))
        c->rd_ok = 1;
    conn_run(c);
}

/*
 * Reads the end unless its last read drained it and no event came since; -EAGAIN then, with
 * the events to wait for added to *<wants>.
 */
static ssize_t conn_read(struct h2up_conn *c, unsigned *wants)
{
    struct h2up_pool *p = c->pool;
    if (!c->rd_ok) {
        *wants |= c->rd_wants;
        return -EAGAIN;
    }
    ssize_t n = xprt_read(&c->x, p->rbuf, sizeof(p->rbuf));
    if (n == -EAGAIN) {
        c->rd_ok = 0;
        c->rd_wants = xprt_wants(&c->x, LOOP_READ);
        *wants |= c->rd_wants;
    } else if (n > 0 && (size_t)n < sizeof(p->rbuf) && !xprt_pending(&c->x)) {
        c->rd_ok = 0;
        c->rd_wants = LOOP_READ;
    }
    return n;
}

static void conn_run(struct h2up_conn *c)
{
    struct h2up_pool *p = c->pool;
    char why[800];
    for (;;) {
        int progress = 0;
        unsigned wants = 0;
        if (h2_wants_read(c->h2)) {
            ssize_t n = conn_read(c, &wants);
            if (n > 0) {
                if (!c->established) {
                    c->established = 1;
                    loop_timer_stop(p->loop, &c->connect);
                }
                progress = 1;
                if (h2_feed(c->h2, p->rbuf, (size_t)n) < 0) {
                    const char *e = h2_error(c->h2);
                    snprintf(why, sizeof(why), "%s broke HTTP/2: %s", c->peer,
                             e != NULL ? e : "error");
                    conn_close(c, H2_CONNECT_ERROR, why, 0);
                    return;
                }
            } else if (n != -EAGAIN) {
                snprintf(why, sizeof(why), "%s %s", c->peer,
                         n == 0 ? "closed the connection" : xprt_error(&c->x, (int)n));
                conn_close(c, H2_CONNECT_ERROR, why, 0);
                return;
            }
        }
        while (c->out_len < H2UP_OUT_MAX && h2_wants_write(c->h2)) {
            ssize_t k = h2_output(c->h2, c->out + c->out_len, H2UP_OUT_MAX + IO_CHUNK - c->out_len);
            if (k < 0) {
                const char *e = h2_error(c->h2);
                snprintf(why, sizeof(why), "HTTP/2 session with %s failed: %s", c->peer,
                         e != NULL ? e : "error");
                conn_close(c, H2_CONNECT_ERROR, why, 0);
                return;
            }
            if (k == 0)
                break;
            c->out_len += (size_t)k;
        }
        if (c->out_len > 0) {
            ssize_t n = xprt_write(&c->x, c->out, c->out_len);
            if (n > 0) {
                memmove(c->out, c->out + n, c->out_len - (size_t)n);
                c->out_len -= (size_t)n;
                progress = 1;
            } else if (n == -EAGAIN) {
                wants |= xprt_wants(&c->x, LOOP_WRITE);
            } else {
                snprintf(why, sizeof(why), "writing to %s: %s", c->peer, xprt_error(&c->x, (int)n));
                conn_close(c, H2_CONNECT_ERROR, why, 0);
                return;
            }
        }
        if (c->out_len == 0 && !h2_wants_read(c->h2) && !h2_wants_write(c->h2)) {
            const char *e = h2_error(c->h2);
            conn_close(c, H2_CONNECT_ERROR, e != NULL ? e : "HTTP/2 session over", 0);
            return;
        }
        if (c->draining && c->nstreams == 0 && c->out_len == 0) {
            conn_close(c, H2_NO_ERROR, "drained", 0);
            return;
        }
        if (!progress) {
            loop_io_want(p->loop, &c->x.io, wants ? wants : LOOP_READ);
            return;
        }
    }
}

/* ---- the pool ---- */

struct h2up_pool *h2up_pool_new(struct loop *loop, atomic_uint_fast64_t *conns,
                                atomic_uint_fast64_t *streams)
{
    struct h2up_pool *p = xcalloc(1, sizeof(*p));
    p->loop = loop;
    p->g_conns = conns;
    p->c_streams = streams;
    return p;
}

void h2up_pool_free(struct h2up_pool *p)
{
    if (p == NULL)
        return;
    while (p->conns != NULL)
        conn_close(p->conns, H2_NO_ERROR, "the worker stops", 1);
    free(p);
}

static int usable(const struct h2up_conn *c, const char *key, const struct tls_ctx *tls)
{
    return !c->closed && !c->draining && c->tls == tls && strcmp(c->key, key) == 0;
}

struct h2up_conn *h2up_find(struct h2up_pool *p, const char *key, const struct tls_ctx *tls)
{
    struct h2up_conn *best = NULL, *least = NULL;
    size_t n = 0;
    for (struct h2up_conn *c = p->conns; c != NULL; c = c->next) {
        if (!usable(c, key, tls))
            continue;
        n++;
        if (least == NULL || c->nstreams < least->nstreams)
            least = c;
        if (c->nstreams < h2_peer_max_streams(c->h2) &&
            (best == NULL || c->nstreams < best->nstreams))
            best = c;
    }
    if (best != NULL)
        return best;
    return n >= H2UP_MAX_PER_KEY ? least : NULL;
}

size_t h2up_count(const struct h2up_pool *p, const char *key, const struct tls_ctx *tls)
{
    size_t n = 0;
    for (const struct h2up_conn *c = p->conns; c != NULL; c = c->next)
        n += !c->closed && c->tls == tls && strcmp(c->key, key) == 0;
    return n;
}

struct h2up_conn *h2up_adopt(struct h2up_pool *p, const char *key, struct tls_ctx *tls,
                             struct xprt *x, const char *peer_name)
{
    struct h2up_conn *c = xcalloc(1, sizeof(*c));
    c->pool = p;
    c->key = xstrdup(key);
    c->tls = tls != NULL ? tls_ctx_ref(tls) : NULL;
    snprintf(c->peer, sizeof(c->peer), "%s", peer_name != NULL ? peer_name : "?");
    /* Out of epoll before the end moves: the registration points at its old place. */
    loop_io_want(p->loop, &x->io, 0);
    c->x = *x;
    *x = (struct xprt){.fd = -1};
    loop_io_init(&c->x.io, c->x.fd, conn_io, c);
    c->rd_ok = 1;
    c->rd_wants = LOOP_READ;
    /* TLS reads ahead (tls.c): conn_read() asks xprt_pending() what is left. */
    c->out = xmalloc(H2UP_OUT_MAX + IO_CHUNK);
    c->h2 = h2_session_new(H2_CLIENT, NULL, &h2_cb, c);
    loop_timer_init(&c->idle, on_idle, c);
    loop_timer_init(&c->connect, on_connect_timeout, c);
    loop_timer_start(p->loop, &c->idle, H2UP_IDLE_MS);
    c->next = p->conns;
    p->conns = c;
    if (p->g_conns != NULL)
        atomic_fetch_add_explicit(p->g_conns, 1, memory_order_relaxed);
    conn_kick(c);
    /* Read always (a live peer may speak at any time); the preface goes out with the kick. */
    loop_io_want(p->loop, &c->x.io, LOOP_READ);
    LOG_DEBUG("h2up: new HTTP/2 connection to %s (%s)", LOG_ESC(c->peer), tls ? "TLS" : "h2c");
    return c;
}

void h2up_set_connect_timeout(struct h2up_conn *c, uint32_t ms)
{
    if (!c->established && ms > 0)
        loop_timer_start(c->pool->loop, &c->connect, ms);
}

int h2up_established(const struct h2up_conn *c)
{
    return c->established;
}

struct h2up_stream *h2up_open(struct h2up_conn *c, const struct h2_out_head *hd, int has_body,
                              const struct h2up_stream_ops *ops, void *owner)
{
    if (c->closed || c->draining ||
        c->nstreams >= (size_t)h2_peer_max_streams(c->h2) + H2UP_MAX_QUEUED)
        return NULL;
    struct h2up_stream *st = memcache_calloc(1, sizeof(*st));
    st->c = c;
    st->ops = ops;
    st->owner = owner;
    int32_t id = h2_submit_request(c->h2, hd, has_body, st);
    if (id < 0) {
        if (id == -ESHUTDOWN)
            c->draining = 1;
        memcache_free(st);
        return NULL;
    }
    st->id = id;
    st->next = c->streams;
    if (c->streams != NULL)
        c->streams->prev = st;
    c->streams = st;
    c->nstreams++;
    loop_timer_stop(c->pool->loop, &c->idle);
    if (c->pool->c_streams != NULL)
        atomic_fetch_add_explicit(c->pool->c_streams, 1, memory_order_relaxed);
    conn_kick(c);
    return st;
}

int h2up_resume(struct h2up_stream *st)
{
    int rc = h2_resume(st->c->h2, st->id);
    conn_kick(st->c);
    return rc;
}

int h2up_consume(struct h2up_stream *st, size_t n)
{
    if (n == 0)
        return 0;
    int rc = h2_consume(st->c->h2, st->id, n);
    conn_kick(st->c);
    return rc;
}

int h2up_trailers(struct h2up_stream *st, const struct http_header *f, size_t n)
{
    int rc = h2_submit_trailers(st->c->h2, st->id, f, n);
    conn_kick(st->c);
    return rc;
}

void h2up_cancel(struct h2up_stream *st, uint32_t code)
{
    if (st == NULL)
        return;
    st->ops = NULL;
    st->owner = NULL;
    /* The stream object stays until the session says it closed (cb_close frees it). */
    h2_submit_rst(st->c->h2, st->id, code);
    conn_kick(st->c);
}

struct h2up_conn *h2up_stream_conn(const struct h2up_stream *st)
{
    return st->c;
}

size_t h2up_conn_streams(const struct h2up_conn *c)
{
    return c->nstreams;
}

void h2up_sweep(struct h2up_pool *p,
                int (*stale)(const char *key, const struct tls_ctx *tls, void *arg), void *arg)
{
    for (struct h2up_conn *c = p->conns, *next; c != NULL; c = next) {
        next = c->next;
        if (c->closed || c->draining || !stale(c->key, c->tls, arg))
            continue;
        c->draining = 1;
        h2_shutdown(c->h2);
        if (c->nstreams == 0)
            conn_close(c, H2_NO_ERROR, "stale", 1);
        else
            conn_kick(c);
    }
}
