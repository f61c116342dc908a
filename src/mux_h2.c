/*
 * mux_h2: the HTTP/2 codec, both roles. A server session (h2.h) on the connection that opens
 * streams, end[0], joined stream by stream to streams on shared HTTP/2 client connections
 * (h2up.h):
 *
 *   inbound: a caller (the TLS end) -> authorize -> an h2c stream to the application on the
 *            worker's shared connection to it (key "app|<address>"), or, for an http service,
 *            an HTTP/1.1 exchange of its own (struct h1leg);
 *   outbound: the local application's h2c (prior knowledge, the plain end) -> no authorization
 *            -> a stream on a shared mTLS connection (ALPN h2) to an endpoint of the upstream
 *            (session_dial_h2(): pooled, else dialled; one dial at a time per session, the
 *            streams that arrive meanwhile wait for it); for an http upstream, an HTTP/1.1
 *            exchange over mTLS (ALPN http/1.1) on a connection of the stream's own
 *            (struct h1leg, below).
 *
 *   HEADERS --> authorize (inbound) --allow--> upstream stream --> head, DATA, trailers --> back
 *                  |                              |  \--REFUSED_STREAM, or connection lost, before
 *                  |                              |     any answer: opened once more (body held)
 *                  |                              |  \--RST / connection lost: 503 before the
 *                  |                              |     response head, else RST downstream
 *                  |                              |--local_request_timeout_ms: 504 (or RST)
 *                  |                              '--nothing moved on the stream for the idle
 *                  |                                 timeout: 504 (or RST)
 *                  '--deny 403 / refuse 400 / redirect 307 (gRPC: trailers-only, HTTP 200 with
 *                     grpc-status); outbound, no endpoint: 503
 *   downstream RST --> upstream stream reset (CANCEL); every stream ends in stream_finish()
 *   downstream GOAWAY / EOF, a protocol error or a flood (h2.c's bounds) --> the connection ends
 *   connectd drains --> GOAWAY downstream, open streams finish, then the connection closes
 *
 * Bodies stream both ways without being buffered whole: bytes one leg hands over wait in the
 * stream's buffer until the other leg pulls them (read_body), and only then are they given
 * back to the first leg's flow control (h2_consume / h2up_consume), so a slow reader on one
 * side stops the writer on the other once the HTTP/2 windows are spent. A stream holds at most
 * one receive window (H2_DEFAULT_STREAM_WINDOW_BYTES) each way; frames waiting for end[0] are
 * bounded by OUT_MAX, and end[0] is read only while its output is under that bound. The shared
 * connections bound their own output (h2up).
 *
 * gRPC (a request whose content-type starts with application/grpc): connectd's own answers
 * are trailers-only responses (HTTP 200, grpc-status and grpc-message), with the code Envoy's
 * local replies use for the HTTP status (Grpc::Utility::httpToGrpcStatus): 403 -> 7
 * PERMISSION_DENIED, 503 and 504 -> 14 UNAVAILABLE, 400 -> 13 INTERNAL.
 *
 * An http service's application speaks HTTP/1.1: each HTTP/2 stream becomes an HTTP/1.1
 * exchange on a connection of its own (struct h1leg; closed after the answer, so at most one
 * per open stream, bounded by SETTINGS_MAX_CONCURRENT_STREAMS): the head is written from the
 * pseudo-fields (Host from :authority) and the forwarded fields, a body without content-length
 * is chunk-encoded, the answer is parsed with h1parse (interim answers skipped, chunked bodies
 * decoded into DATA, Upgrade refused with 502) and its body read only while the caller's side
 * of the stream holds under a window. CONNECT is not translated (502); trailers are dropped.
 *
 * Outbound to an http upstream the legs are the session's dials (session_dial_upstream(): the
 * worker's pool first, else PICK_ENDPOINT .. VERIFY_PEER with the next endpoint on a failure,
 * before any request byte went out), one at a time: each stream waits with its request head
 * written until the dial's connection is handed to it (oldest first), and pump() starts the
 * next dial while streams wait and the session holds fewer than LEGS_MAX connections (the rest
 * wait for one to free). A connection whose exchange completed with keep-alive goes to the
 * next waiting stream, else back to the worker's pool. No endpoint left: every waiting stream
 * gets 503. The keep-alive race: a request on a reused connection is held (REPLAY_MAX) until
 * its answer's first byte, and sent once more on a fresh dial when the connection ends first.
 *
 * Outbound traffic management, per stream as mux_h1 does it per request (route.h,
 * session_int.h): route_stream() picks the route, split and resolver (an http upstream's
 * HTTP/1.1 legs too, with the route's rewrite and header modifiers), stream_admit() applies
 * limits.max_concurrent_requests and takes the route's policy (struct route_policy). A stream
 * waiting behind another stream's dial counts as a pending request (max_pending_requests);
 * each dial is for one stream (dial_for): its resolver, its hash for the LoadBalancer policy
 * (session_lb_request()); the streams waiting for the same resolver share its connection unless
 * the resolver balances by a policy, which picks per stream. Every final answer is reported to
 * the passive health check for the endpoint the stream went to; one the policy retries (status,
 * gRPC code, reset, connect failure) is dropped unseen, and the stream waits its back-off (the
 * timer) and a dial that passes over the endpoints it used (stream_dial_retry()), only while the
 * whole request is held (body ended, within retry_buffer_bytes) and no response head went to the
 * caller. RequestTimeout (the route's, the resolver's, 15 s) runs from the end of the request to
 * the end of the answer, retries included: 504 "upstream request timeout" before the head (gRPC:
 * trailers-only, grpc-status 14 UNAVAILABLE with that message, as Envoy's local reply for a 504
 * maps it; not 4 DEADLINE_EXCEEDED, which Envoy never sends here), else a reset; the route's
 * IdleTimeout answers 408 "stream timeout".
 *
 * Timers (the codec's own timer <tmr>, set to the earliest deadline; the session's state timer
 * belongs to an outbound dial meanwhile): local_connect_timeout_ms for an HTTP/1.1 leg's and
 * the shared application connection's connect (503), local_request_timeout_ms from the end of
 * a request to the end of its response (504 before the response head, else both legs' streams
 * are reset), the idle timeout (local_idle_timeout_ms inbound, the upstream's outbound) per
 * stream since anything last moved on it (Envoy's stream_idle_timeout: 504 before the response
 * head, else reset), and the same timeout for the connection while it has no stream; outbound
 * also each stream's route timeouts and retry back-off.
 */
#include "mux_h2.h"
#include "h1parse.h"
#include "h2.h"
#include "h2up.h"
#include "log.h"
#include "memcache.h"
#include "pathnorm.h"
#include "route.h"
#include "session_int.h"
#include "sock.h"
#include "spiffe.h"
#include "stream.h"
#include "tls.h"
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IO_CHUNK   16384
#define OUT_MAX    (64u * 1024u) /* frames queued for one end before its session is asked for more */
#define MAX_FIELDS (H2_DEFAULT_MAX_HEADERS + 8)
/* Outbound to an http upstream: HTTP/1.1 connections one session holds or dials at once (its
 * other streams wait for one), and the request bytes held for a retry on a reused one. */
#define LEGS_MAX   32
#define REPLAY_MAX (64u * 1024u)

struct buf {
    char *p;
    size_t len, cap;
};

/* A copied field section (trailers), one allocation. */
struct fields {
    struct http_header *h;
    size_t n;
};

/*
 * protocol http: one stream's HTTP/1.1 exchange with the application, on a connection of its
 * own (closed after the answer; at most one per open stream, so bounded by the caller's
 * concurrency limit).
 */
struct h1leg {
    struct xprt x;
    struct loop_defer reap; /* freed after the loop's round: its io may be in the batch */
    int writable;           /* end reported writable (connect done) */
    int connected;
    uint64_t connect_start_ms;
    struct buf out; /* the request: head, then body (chunk-encoded when <chunked>) */
    struct buf in;  /* the answer as read */
    int chunked;    /* the request body is chunk-encoded (no content-length) */
    int req_done;   /* the whole request is in <out> */
    int head_done;  /* the final response head went to the caller */
    int eof;        /* the application closed */
    enum http_method method;
    struct body_state {
        enum http_framing framing;
        uint64_t remaining;
        struct h1_chunked ch;
    } body;
    /* Outbound (an http upstream): the connection is a verified mTLS end from the session's
     * dial (fd -1 while the stream waits for one), kept alive after a complete exchange and
     * handed to the next waiting stream or the worker's pool. */
    int mesh;
    const struct snap_target *tgt; /* the endpoint it is connected to (the pool's key) */
    const struct dec_endpoint *ep;
    char ep_name[300];
    int reused;      /* the connection carried an answer before (here or in the pool) */
    int keep;        /* the answer allows another request on the connection */
    int heard;       /* a byte of the answer came */
    int retried;     /* the request was sent again once already (the keep-alive race) */
    struct buf held; /* on a reused connection: every request byte queued, until heard */
    int held_ok;     /* <held> has them all (at most <held_max>) */
    size_t held_max; /* REPLAY_MAX, or the upstream's retry_buffer_bytes under a retry policy */
};

/* One downstream stream and its upstream stream. */
struct h2s {
    struct h2s *next, *prev;
    struct session *s;
    int32_t cid;            /* on the downstream session */
    struct h2up_stream *us; /* on a shared HTTP/2 connection; NULL when none */
    int app_open;           /* the upstream stream (or HTTP/1.1 leg) exists for this one */
    int conn_established;   /* <us>'s connection had heard from its peer (503 reason) */
    int waiting;            /* outbound: waits for the session's dial (<pend> holds the head) */
    struct fields pend;     /* the request head as sent upstream, pseudo-fields first: while it
                               waits (outbound), then until the first byte of the answer */
    int pend_body;          /* ... and whether a body follows */
    /* A stream refused unprocessed (REFUSED_STREAM, above a GOAWAY) or lost with its
     * connection before any byte of its answer is opened once more (RFC 9113 section 8.7),
     * its body bytes held until then (at most REPLAY_MAX). */
    int heard;        /* a response head (even 1xx) came */
    int held_ok;      /* <held> has every body byte read_body gave */
    int retried;      /* opened a second time already */
    int retry;        /* to be opened again by the pump */
    struct buf held;  /* those body bytes */
    size_t skip;      /* bytes at the front of <reqb> given back to the caller already */
    uint64_t last_ms; /* when something last moved on the stream (its idle timer) */
    char *ep;         /* outbound: the endpoint its stream went to (its record's) */
    struct h1leg *h1; /* protocol http: the HTTP/1.1 exchange instead of an h2c stream */
    int grpc;         /* content-type application/grpc... */
    int local;        /* connectd answered it (403, 503, ...) */
    int res_head;     /* a final response head was submitted to the caller */
    int req_eof;      /* the caller's side ended */
    int res_eof;      /* the response body in <resb> is complete */
    int req_defer;    /* the application's session waits for request bytes (h2_resume) */
    int res_defer;    /* the caller's session waits for response bytes */
    struct buf reqb;  /* request body bytes for the application */
    struct buf resb;  /* response body bytes for the caller */
    struct fields req_tr, res_tr;
    uint64_t req_end_ms; /* when the caller's side ended; 0 until */
    enum stream_result result;
    /* Outbound: the route and split the stream took and the resolver its dial may use
     * (route.h, in the session's snapshot); NULL without a route table. */
    const struct route *route;
    const struct route_split *split;
    const struct route_resolver *rs;
    /* Outbound: the stream's retry policy and timeouts (route.h, as mux_h1's per request), the
     * endpoint its last attempt went to (outlier reports; a retry passes it over), the
     * endpoints its attempts used (the session's tried flags after its dial, kept while the
     * policy may retry), and when its back-off ends (0: none). */
    struct route_policy pol;
    const struct snap_target *tgt;
    const struct dec_endpoint *uep;
    unsigned char *tried;
    size_t ntried;
    uint64_t backoff_until_ms;
    int policy_retry; /* waits for the dial of a retry (to an endpoint not used yet) */
    int pending;      /* holds a unit of limits.max_pending_requests while it waits */
    size_t held_max;  /* <held>'s bound: REPLAY_MAX, or retry_buffer_bytes under a policy */
    char *lb_cookie;  /* a cookie hash policy's Set-Cookie value for the answer; NULL: none */
    /* Outbound: the attempt in flight counted among its endpoint's active requests
     * (least_request), from its dial (session_lb_move()) until it ends, fails or is retried. */
    struct session_lb_hold lb;
    /* Last, and not cleared with the rest by stream_new(): 1.7 KiB of text (the reason, and
     * the stream's record with its copies of the head), set up by set_why() and
     * stream_begin(). */
    char why[200];
    struct stream st;
};

struct mux_h2 {
    struct session *s;
    struct h2_session *down; /* end[0]'s connection (server) */
    int outbound;            /* end[0] is the local application; streams go to the upstream */
    int h1up;                /* outbound to an http upstream: streams become HTTP/1.1 legs */
    unsigned retries;        /* streams up_on_close() left for retry_streams() */
    int dialling;            /* outbound: session_dial_h2() owns end[1] and the state timer */
    struct h2s *dial_for;    /* outbound: the waiting stream the dial under way is for */
    int draining;            /* connectd drains: GOAWAY sent, closes when no stream is left */
    int resnap;              /* outbound: draining since the snapshot changed (follow_snapshot) */
    int down_failed;         /* the downstream session ended in an error: flush and close */
    unsigned in_pump;        /* pump() is running (nested calls counted) ... */
    int again;               /* ... and kick() asked for another of its rounds meanwhile */
    struct buf cout;
    int rd_ok;         /* read end[0]: an event came, or the last read did not drain it */
    unsigned rd_wants; /* the events the last read that drained it waits for */
    struct h2s *streams;
    uint64_t nstreams;
    struct loop_timer tmr;  /* the earliest deadline */
    struct loop_defer kick; /* a pump after the loop's round (from h2up callbacks) */
    char xfcc[STREAM_XFCC_MAX];
    size_t xfcc_len;
    int xfcc_ok;
    /* Inbound: session_app_h2_key() for <app_key_snap> (at <app_key_gen>; a pointer alone
     * could be a new snapshot at a freed one's address). */
    char app_key[sizeof(((struct session *)0)->ep_name) + 8];
    const struct snapshot *app_key_snap;
    uint64_t app_key_gen; /* <xfcc> is a valid HTTP/2 field value (checked once, not per request) */
    uint8_t rbuf[IO_CHUNK];
};

/* ---- buffers ---- */

/*
 * Buffers and per-stream memory come from memcache (the thread's cache of freed blocks): a
 * hundred streams in flight allocate and free the same sizes in bursts, which glibc's malloc
 * serves slowly. A buffer starts at what it first needs (a response body is often a few
 * bytes), rounded up, and doubles.
 */
static void buf_reserve(struct buf *b, size_t need)
{
    if (b->cap >= need)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    b->p = memcache_realloc(b->p, cap);
    b->cap = cap;
}

static void buf_add(struct buf *b, const void *p, size_t n)
{
    if (n == 0)
        return;
    buf_reserve(b, b->len + n);
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void buf_consume(struct buf *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
}

static void buf_free(struct buf *b)
{
    memcache_free(b->p);
    memset(b, 0, sizeof(*b));
}

static void fields_copy(struct fields *f, const struct http_header *h, size_t n)
{
    size_t bytes = n * sizeof(*h);
    for (size_t i = 0; i < n; i++)
        bytes += h[i].name.len + h[i].value.len;
    memcache_free(f->h);
    f->h = memcache_alloc(bytes);
    f->n = n;
    char *p = (char *)(f->h + n);
    for (size_t i = 0; i < n; i++) {
        memcpy(p, h[i].name.p, h[i].name.len);
        f->h[i].name = (struct http_slice){p, h[i].name.len};
        p += h[i].name.len;
        memcpy(p, h[i].value.p, h[i].value.len);
        f->h[i].value = (struct http_slice){p, h[i].value.len};
        p += h[i].value.len;
        f->h[i].flags = h[i].flags & HTTP_HDR_H2OK; /* the same bytes: still fit for h2 */
    }
}

static void copy_str_cut(char *out, size_t cap, const char *v)
{
    size_t n = strnlen(v, cap - 1);
    memcpy(out, v, n);
    out[n] = '\0';
}

static int name_is(struct http_slice s, const char *lit)
{
    size_t n = strlen(lit);
    return s.len == n && strncasecmp(s.p, lit, n) == 0;
}

/* Keeps <why> (cut to fit) as the stream's reason. */
static void set_why(struct h2s *x, const char *why)
{
    copy_str_cut(x->why, sizeof(x->why), why != NULL ? why : "");
}

static void copy_str(char *out, size_t cap, struct http_slice v)
{
    size_t n = v.len < cap - 1 ? v.len : cap - 1;
    if (n > 0)
        memcpy(out, v.p, n);
    out[n] = '\0';
}

/* Names the endpoint stream <x> went to (its record's). */
static void set_ep(struct h2s *x, const char *name)
{
    size_t n = strlen(name);
    memcache_free(x->ep);
    x->ep = memcache_alloc(n + 1);
    memcpy(x->ep, name, n + 1);
}

/* Request bytes no one will forward go back to the caller's window (but those a retry put
 * back in front, given back already). */
static void reqb_drop(struct mux_h2 *m, struct h2s *x)
{
    if (x->reqb.len > x->skip)
        h2_consume(m->down, x->cid, x->reqb.len - x->skip);
    x->reqb.len = 0;
    x->skip = 0;
}

/* The answer started: what was held for a retry goes. */
static void heard(struct h2s *x)
{
    if (x->heard)
        return;
    x->heard = 1;
    x->held_ok = 0;
    buf_free(&x->held);
    memcache_free(x->pend.h);
    x->pend = (struct fields){0};
}

/* Notes a grpc-status among <h> in the stream's record. */
static void note_grpc_status(struct h2s *x, const struct http_header *h, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (name_is(h[i].name, "grpc-status"))
            copy_str(x->st.grpc_status, sizeof(x->st.grpc_status), h[i].value);
}

/* ---- streams ---- */

static struct h2s *stream_new(struct session *s, int32_t cid)
{
    struct mux_h2 *m = s->mux2;
    /* One stream per request: clearing all 2.2 KiB was the largest single cost of a stream
     * in connectd's own code; the text at the end is initialized by its owners. */
    struct h2s *x = memcache_alloc(sizeof(*x));
    memset(x, 0, offsetof(struct h2s, why));
    x->why[0] = '\0';
    x->s = s;
    x->cid = cid;
    x->last_ms = loop_now_ms(s->host->loop);
    x->next = m->streams;
    if (m->streams != NULL)
        m->streams->prev = x;
    m->streams = x;
    stream_begin(&x->st, ++m->nstreams, loop_now_ms(s->host->loop), NULL);
    x->st.h2 = 1;
    return x;
}

static void stream_free(struct mux_h2 *m, struct h2s *x)
{
    if (m->dial_for == x)
        m->dial_for = NULL;
    if (x->pending)
        session_release_pending(m->s);
    session_lb_hold_release(&x->lb);
    free(x->tried);
    free(x->lb_cookie);
    if (x->prev != NULL)
        x->prev->next = x->next;
    else
        m->streams = x->next;
    if (x->next != NULL)
        x->next->prev = x->prev;
    buf_free(&x->reqb);
    buf_free(&x->held);
    memcache_free(x->pend.h);
    memcache_free(x->ep);
    buf_free(&x->resb);
    memcache_free(x->req_tr.h);
    memcache_free(x->res_tr.h);
    memcache_free(x);
}

/* The stream waits for a dial no more: the pending unit it held goes back. */
static void unwait(struct session *s, struct h2s *x)
{
    x->waiting = 0;
    x->policy_retry = 0;
    if (x->pending) {
        x->pending = 0;
        session_release_pending(s);
    }
}

/* Detaches the application's stream (reset with <code> unless 0 and closed already). */
static void leg_free(struct loop_defer *d)
{
    free((char *)d - offsetof(struct h1leg, reap));
}

/* Closes the stream's HTTP/1.1 connection; the leg's memory goes after the loop's current
 * round, since an event for its descriptor may still be in the batch being dispatched. */
static void leg_close(struct session *s, struct h2s *x)
{
    struct h1leg *l = x->h1;
    if (l == NULL)
        return;
    xprt_close(s->host->loop, &l->x);
    buf_free(&l->out);
    buf_free(&l->in);
    buf_free(&l->held);
    x->h1 = NULL;
    loop_defer(s->host->loop, &l->reap, leg_free);
}

static void app_stream_drop(struct session *s, struct h2s *x, uint32_t code)
{
    unwait(s, x);
    session_lb_hold_release(&x->lb);
    x->backoff_until_ms = 0;
    if (x->h1 != NULL) {
        /* Open, or (outbound) still waiting for a connection. */
        x->app_open = 0;
        leg_close(s, x);
        return;
    }
    if (!x->app_open)
        return;
    x->app_open = 0;
    if (x->us != NULL) {
        h2up_cancel(x->us, code);
        x->us = NULL;
    }
}

/* The gRPC code Envoy's local replies give an HTTP status (httpToGrpcStatus). */
static int grpc_code(int status)
{
    switch (status) {
    case 400:
        return 13; /* INTERNAL */
    case 401:
        return 16; /* UNAUTHENTICATED */
    case 403:
        return 7; /* PERMISSION_DENIED */
    case 404:
        return 12; /* UNIMPLEMENTED */
    case 429:
        return 8; /* RESOURCE_EXHAUSTED: only the rate limit answers 429 */
    case 502:
    case 503:
    case 504:
        return 14; /* UNAVAILABLE */
    default:
        return 2; /* UNKNOWN */
    }
}

/*
 * connectd answers stream <x> itself with result <r> (<location>: a redirect's target). When
 * a response head already went out, the caller's stream is reset instead.
 */
static void local_answer(struct session *s, struct h2s *x, enum stream_result r, const char *why,
                         struct http_slice location)
{
    struct mux_h2 *m = s->mux2;
    set_why(x, why);
    app_stream_drop(s, x, H2_CANCEL);
    /* What the caller sent that no one will read is given back to its window. */
    reqb_drop(m, x);
    if (x->res_head) {
        x->result = STREAM_RES_ABORTED;
        x->local = 1;
        h2_submit_rst(m->down, x->cid, H2_INTERNAL_ERROR);
        return;
    }
    x->local = 1;
    x->result = r;
    x->res_head = 1;
    int status = stream_result_status(r);
    const char *text = stream_local_body(r);
    struct http_header h[4];
    size_t n = 0;
    char num[24], len[24];
    if (x->grpc) {
        snprintf(num, sizeof(num), "%d", grpc_code(status));
        h[n++] =
            (struct http_header){.name = {"content-type", 12}, .value = {"application/grpc", 16}};
        h[n++] = (struct http_header){.name = {"grpc-status", 11}, .value = {num, strlen(num)}};
        h[n++] = (struct http_header){.name = {"grpc-message", 12}, .value = {text, strlen(text)}};
        copy_str(x->st.grpc_status, sizeof(x->st.grpc_status),
                 (struct http_slice){num, strlen(num)});
        status = 200;
        x->res_eof = 1;
    } else {
        snprintf(len, sizeof(len), "%zu", strlen(text));
        h[n++] = (struct http_header){.name = {"content-type", 12}, .value = {"text/plain", 10}};
        h[n++] = (struct http_header){.name = {"content-length", 14}, .value = {len, strlen(len)}};
        if (r == STREAM_RES_REDIRECT)
            h[n++] = (struct http_header){.name = {"location", 8}, .value = location};
        buf_add(&x->resb, text, strlen(text));
        x->res_eof = 1;
    }
    x->st.status = status;
    /* Outbound, a stream that took a route gets its route's and split's ResponseHeaders on
     * connectd's own answer too, as Envoy finalizes a local reply with the selected route. */
    size_t nmf = 0;
    struct http_header *mf = route_headers_modified(x->route, x->split, 1, h, n, &nmf);
    struct h2_out_head oh = {
        .status = status, .headers = mf != NULL ? mf : h, .nheaders = mf != NULL ? nmf : n};
    if (x->resb.len == 0)
        stream_answered(&x->st);
    if (h2_submit_response(m->down, x->cid, &oh, x->resb.len > 0) != 0)
        h2_submit_rst(m->down, x->cid, H2_INTERNAL_ERROR);
    free(mf);
}

/* ---- outbound: a stream's retry policy, limits and endpoint (as mux_h1's per request) ---- */

/*
 * Outbound, a stream just routed: limits.max_concurrent_requests (503 at once when over), then
 * its retry policy and timeouts (route_policy_init()). Returns 0, or -1 after answering it.
 */
static int stream_admit(struct session *s, struct h2s *x)
{
    char why[128];
    if (session_admit_request(s, &x->st.active, why, sizeof(why)) < 0) {
        local_answer(s, x, STREAM_RES_UPSTREAM_OVERFLOW, why, (struct http_slice){0});
        return -1;
    }
    route_policy_init(&x->pol, x->route, x->rs);
    return 0;
}

/*
 * Outbound: stream <x> waits for a connection. While a dial for another stream is under way it
 * counts as one of the upstream's pending requests (limits.max_pending_requests: 503 at once
 * when over; the dial counts its own stream). Returns 0, or -1 after answering it.
 */
static int stream_wait(struct session *s, struct h2s *x)
{
    char why[128];
    x->waiting = 1;
    if (!s->mux2->dialling)
        return 0;
    if (session_admit_pending(s, why, sizeof(why)) < 0) {
        local_answer(s, x, STREAM_RES_UPSTREAM_OVERFLOW, why, (struct http_slice){0});
        return -1;
    }
    x->pending = 1;
    return 0;
}

/* Stream <x>'s attempt went to endpoint <ep> of <tgt> (the session's dial just now when
 * <dialled>): kept for outlier reports, and the endpoints tried for a retry's dial. */
static void stream_note_endpoint(struct session *s, struct h2s *x, const struct snap_target *tgt,
                                 const struct dec_endpoint *ep, int dialled)
{
    x->tgt = tgt;
    x->uep = ep;
    if (!dialled || x->pol.retries_left == 0)
        return;
    size_t total = 0;
    for (size_t j = 0; j < s->up->n_targets; j++)
        total += s->up->targets[j].endpoints->n;
    if (x->tried == NULL || x->ntried != total) {
        free(x->tried);
        x->tried = xcalloc(total ? total : 1, 1);
        x->ntried = total;
    }
    for (size_t i = 0; i < total; i++)
        x->tried[i] |= s->tried[i];
}

/* The stream's hash for the dial (session_lb_request()), and a generated cookie kept for its
 * answer. */
static void lb_hash_stream(struct session *s, struct h2s *x, char *cookie, size_t len)
{
    struct http_slice path = x->pend.h[3].value, query = {NULL, 0};
    const char *q = path.p != NULL ? memchr(path.p, '?', path.len) : NULL;
    if (q != NULL)
        query = (struct http_slice){q + 1, path.len - (size_t)(q - path.p) - 1};
    session_lb_request(s, x->pend.h + 4, x->pend.n - 4, query, cookie, len);
    if (cookie[0] != '\0' && x->lb_cookie == NULL)
        x->lb_cookie = xstrdup(cookie);
}

/*
 * The dial of a retry for stream <x>: the endpoints its attempts used are passed over while
 * another is left (session_redial_retry(), the same kind of dial as the stream's).
 */
static void stream_dial_retry(struct session *s, struct h2s *x)
{
    size_t total = 0;
    for (size_t j = 0; j < s->up->n_targets; j++)
        total += s->up->targets[j].endpoints->n;
    memset(s->tried, 0, total);
    if (x->tried != NULL && x->ntried == total)
        memcpy(s->tried, x->tried, total);
    s->tgt = x->tgt;
    s->ep = x->uep;
    s->dial_h2 = !s->mux2->h1up;
    session_redial_retry(s);
}

/*
 * The dial about to start is for stream <x>: the stream's pending unit passes to the dial
 * (dial_admit() counts it from there), the dial walks the stream's resolver (s->dial_rs) and
 * chooses the endpoint by the stream's hash (session_lb_request(), from the head it keeps), as
 * Envoy picks a host per request. A retry's dial (policy_retry) starts here (1); else 0, and
 * the caller starts its kind of dial.
 */
static int stream_dial_begin(struct session *s, struct h2s *x)
{
    struct mux_h2 *m = s->mux2;
    char cookie[512];
    m->dialling = 1;
    m->dial_for = x;
    if (x->pending) {
        x->pending = 0;
        session_release_pending(s);
    }
    s->dial_rs = x->rs;
    if (x->pend.h != NULL && x->pend.n >= 4)
        lb_hash_stream(s, x, cookie, sizeof(cookie));
    if (!x->policy_retry)
        return 0;
    stream_dial_retry(s, x);
    return 1;
}

/*
 * Whether the policy may send stream <x> once more: retries left, no response head passed on,
 * time left before its RequestTimeout, and, when it went out (<sent>), the whole request held:
 * its body received in full and within the retry buffer (retry_buffer_bytes).
 */
static int stream_may_retry(struct session *s, const struct h2s *x, int sent)
{
    if (!s->mux2->outbound || x->pol.retries_left == 0 || x->local || x->res_head)
        return 0;
    if (sent && !x->req_eof)
        return 0;
    if (sent && x->h1 != NULL && (!x->h1->held_ok || !x->h1->req_done))
        return 0;
    if (sent && x->h1 == NULL && (!x->held_ok || x->pend.h == NULL))
        return 0;
    uint64_t now = loop_now_ms(s->host->loop);
    return x->req_end_ms == 0 || x->pol.timeout_ms == 0 || now < x->req_end_ms + x->pol.timeout_ms;
}

/* Request body bytes held for a retry go back in front of <reqb> (given back to the caller's
 * window already: <skip> says how many). */
static void body_back(struct h2s *x)
{
    struct buf nb = {0};
    buf_add(&nb, x->held.p, x->held.len);
    buf_add(&nb, x->reqb.p, x->reqb.len);
    buf_free(&x->reqb);
    x->reqb = nb;
    x->skip = x->held.len;
    buf_free(&x->held);
    x->held_ok = 0;
}

/*
 * The policy sends stream <x> again (<what> failed): the attempt's stream or connection goes
 * (an answer from it is dropped unseen), and after a back-off (route_policy_backoff_ms()) the
 * stream waits for a dial to an endpoint its attempts did not use when one is left (the timer,
 * DL_BACKOFF). <sent>: the request had gone out (it is sent again from the held copy).
 */
static void stream_retry_later(struct session *s, struct h2s *x, int sent, const char *what)
{
    uint64_t now = loop_now_ms(s->host->loop);
    uint32_t wait_ms = route_policy_backoff_ms(&x->pol, util_rand());
    LOG_DEBUG("conn=%llu stream=%llu upstream %s %s: retrying in %lu ms (%u more allowed)",
              (unsigned long long)s->id, (unsigned long long)x->st.seq,
              LOG_ESC(x->ep != NULL ? x->ep : s->ep_name), what, (unsigned long)wait_ms,
              x->pol.retries_left);
    unwait(s, x);
    session_lb_hold_release(&x->lb);
    if (x->h1 != NULL) {
        struct h1leg *l = x->h1;
        xprt_close(s->host->loop, &l->x);
        if (sent) {
            l->out.len = 0;
            buf_add(&l->out, l->held.p, l->held.len);
        }
        buf_free(&l->held);
        l->held_ok = 0;
        l->in.len = 0;
        l->eof = l->heard = l->head_done = l->keep = l->reused = l->writable = 0;
    } else {
        if (x->us != NULL) {
            h2up_cancel(x->us, H2_CANCEL);
            x->us = NULL;
        }
        if (sent)
            body_back(x);
        x->heard = 0;
    }
    x->app_open = 0;
    x->req_defer = 0;
    x->conn_established = 0;
    x->backoff_until_ms = now + wait_ms;
}

/*
 * A final answer's head (<status>, fields <h>) came for stream <x> before anything of it went
 * to the caller: reported to the passive health check (every attempt counts, as Envoy's outlier
 * detection counts each), then retried when the policy asks (1), else 0: it goes through.
 */
static int stream_retry_on_answer(struct session *s, struct h2s *x, int status,
                                  const struct http_header *h, size_t n)
{
    if (!s->mux2->outbound || status < 200)
        return 0;
    session_outlier_report_at(s, x->tgt, x->uep, status >= 500);
    if (!stream_may_retry(s, x, 1) || !route_policy_retries_status(&x->pol, status, h, n)) {
        x->pol.retries_left = 0;
        return 0;
    }
    char what[64];
    snprintf(what, sizeof(what), "answered %d", status);
    stream_retry_later(s, x, 1, what);
    return 1;
}

/* A dial for stream <x> found no endpoint (<why>; <overflow>: a limit refused it): retried
 * when its policy retries connection failures, else 503. */
static void stream_dial_failed(struct session *s, struct h2s *x, const char *why, const char *cause,
                               int overflow)
{
    if (!overflow && (x->pol.retry_on & ROUTE_RETRY_ON_CONNECT) && stream_may_retry(s, x, 0)) {
        stream_retry_later(s, x, 0, why);
        return;
    }
    session_warn_unavailable(s, x->st.seq, cause);
    local_answer(s, x, overflow ? STREAM_RES_UPSTREAM_OVERFLOW : STREAM_RES_UPSTREAM_CONNECT_ERROR,
                 why, (struct http_slice){0});
}

/*
 * Outbound response fields for the caller: <h> with the route's and split's ResponseHeaders
 * and a cookie hash policy's Set-Cookie. A new array the caller frees (*<out_n> fields), or
 * NULL when nothing changes.
 */
static struct http_header *response_fields(const struct h2s *x, const struct http_header *h,
                                           size_t n, size_t *out_n)
{
    size_t nmf = 0;
    struct http_header *mf = route_headers_modified(x->route, x->split, 1, h, n, &nmf);
    if (x->lb_cookie == NULL) {
        *out_n = nmf;
        return mf;
    }
    const struct http_header *src = mf != NULL ? mf : h;
    size_t ns = mf != NULL ? nmf : n;
    struct http_header *f = xcalloc(ns + 1, sizeof(*f));
    memcpy(f, src, ns * sizeof(*f));
    f[ns] = (struct http_header){.name = {"set-cookie", 10},
                                 .value = {x->lb_cookie, strlen(x->lb_cookie)}};
    free(mf);
    *out_n = ns + 1;
    return f;
}

/* ---- protocol http: HTTP/2 streams as HTTP/1.1 exchanges ---- */

static void resume_down(struct mux_h2 *m, struct h2s *x);
static void pump(struct session *s);

/* A leg's events run the codec directly: outbound, the session's state (and its I/O
 * callback) may belong to a dial for another stream meanwhile. */
static void leg_on_io(struct loop_io *io, unsigned events)
{
    struct h1leg *l = (struct h1leg *)((char *)io - offsetof(struct h1leg, x.io));
    struct session *s = io->data;
    if (events & (LOOP_WRITE | LOOP_ERROR))
        l->writable = 1;
    if (s->state != S_DONE)
        pump(s);
}

/* Who is on the far side of a leg, for reasons and logs. */
static const char *leg_peer(const struct h1leg *l)
{
    return l->mesh ? "the upstream" : "the application";
}

/* Queues request bytes for the leg, and holds them while a retry may resend them. */
static void leg_queue(struct h1leg *l, const void *p, size_t n)
{
    buf_add(&l->out, p, n);
    if (!l->held_ok)
        return;
    if (l->held.len + n > l->held_max) {
        l->held_ok = 0;
        buf_free(&l->held);
        return;
    }
    buf_add(&l->held, p, n);
}

static int connection_specific(struct http_slice n)
{
    return name_is(n, "connection") || name_is(n, "keep-alive") || name_is(n, "proxy-connection") ||
           name_is(n, "transfer-encoding") || name_is(n, "upgrade") || name_is(n, "te") ||
           name_is(n, "host");
}

static enum http_method method_of(struct http_slice m)
{
    static const struct {
        const char *name;
        enum http_method m;
    } t[] = {{"GET", HTTP_METHOD_GET},       {"HEAD", HTTP_METHOD_HEAD},
             {"POST", HTTP_METHOD_POST},     {"PUT", HTTP_METHOD_PUT},
             {"DELETE", HTTP_METHOD_DELETE}, {"OPTIONS", HTTP_METHOD_OPTIONS},
             {"TRACE", HTTP_METHOD_TRACE},   {"PATCH", HTTP_METHOD_PATCH}};
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++)
        if (m.len == strlen(t[i].name) && memcmp(m.p, t[i].name, m.len) == 0)
            return t[i].m;
    return HTTP_METHOD_OTHER;
}

/*
 * A new HTTP/1.1 exchange without a connection yet: its request head queued (<target> and
 * <authority> for the request line and Host; <f>: the fields, the flagged ones and those
 * specific to a connection left out). A body without content-length is sent chunked.
 */
static struct h1leg *leg_new(const struct h2_head *hd, struct http_slice method,
                             struct http_slice target, struct http_slice authority,
                             const struct http_header *f, size_t nf)
{
    struct h1leg *l = xcalloc(1, sizeof(*l));
    l->x.fd = -1;
    l->method = method_of(method);
    struct buf *o = &l->out;
    buf_add(o, method.p, method.len);
    buf_add(o, " ", 1);
    buf_add(o, target.p, target.len);
    buf_add(o, " HTTP/1.1\r\nhost: ", 17);
    buf_add(o, authority.p, authority.len);
    buf_add(o, "\r\n", 2);
    for (size_t i = 0; i < nf; i++) {
        if ((f[i].flags & (HTTP_HDR_HOP | HTTP_HDR_DROP)) || connection_specific(f[i].name))
            continue;
        buf_add(o, f[i].name.p, f[i].name.len);
        buf_add(o, ": ", 2);
        buf_add(o, f[i].value.p, f[i].value.len);
        buf_add(o, "\r\n", 2);
    }
    l->chunked = !hd->end_stream && hd->content_length < 0;
    if (l->chunked)
        buf_add(o, "transfer-encoding: chunked\r\n", 28);
    buf_add(o, "\r\n", 2);
    l->req_done = hd->end_stream;
    return l;
}

/*
 * Opens the HTTP/1.1 exchange of stream <x> with the application: dials a connection of its
 * own and queues the request head (<target>: the normalized path; <f>: the fields with the
 * forwarded extras, the flagged ones left out).
 */
static void leg_open(struct session *s, struct h2s *x, const struct h2_head *hd,
                     struct http_slice target, const struct http_header *f, size_t nf)
{
    int fd = session_app_connect(s);
    if (fd < 0) {
        char why[400];
        snprintf(why, sizeof(why), "connect %s: %s", s->ep_name, util_strerror(fd));
        local_answer(s, x, STREAM_RES_LOCAL_CONNECT_ERROR, why, (struct http_slice){0});
        return;
    }
    struct h1leg *l = leg_new(hd, hd->method, target, hd->authority, f, nf);
    l->x.fd = fd;
    loop_io_init(&l->x.io, fd, leg_on_io, s);
    l->connect_start_ms = loop_now_ms(s->host->loop);
    x->h1 = l;
    x->app_open = 1;
}

/* Whether <v> can go into a request line as it is: visible ASCII only, not empty. */
static int line_token_ok(struct http_slice v)
{
    if (v.len == 0)
        return 0;
    for (size_t i = 0; i < v.len; i++)
        if ((unsigned char)v.p[i] <= 0x20 || (unsigned char)v.p[i] >= 0x7f)
            return 0;
    return 1;
}

static struct h2_out_head pend_head(const struct h2s *x);

/*
 * Outbound to an http upstream: stream <x>'s request, as the application sent it (the
 * upstream's sidecar normalizes and authorizes it) with its route's rewrite and modifiers
 * (the head pend_keep() kept), becomes an HTTP/1.1 exchange that waits for a connection from
 * the session's dial (h1_dial_next; the caller makes it wait); without :authority, Host is the
 * upstream's name. 0, or -1 when the head cannot be written as HTTP/1.1 (<x> answered 400).
 */
static int leg_wait(struct session *s, struct h2s *x, const struct h2_head *hd)
{
    const char *name = s->up->cfg->destination_name;
    struct h2_out_head oh = pend_head(x);
    struct http_slice authority =
        oh.authority.len > 0 ? oh.authority : (struct http_slice){name, strlen(name)};
    if (!line_token_ok(oh.method) || !line_token_ok(oh.path) || !line_token_ok(authority)) {
        local_answer(s, x, STREAM_RES_BAD_REQUEST, "the request line cannot be written as HTTP/1.1",
                     (struct http_slice){0});
        return -1;
    }
    struct h1leg *l = leg_new(hd, oh.method, oh.path, authority, oh.headers, oh.nheaders);
    l->mesh = 1;
    l->connected = 1;
    x->h1 = l;
    return 0;
}

/*
 * The waiting stream to give a connection to target <tgt>: the oldest whose resolver may use
 * <tgt>, but a stream whose request a reused connection lost (retried) takes only a <fresh>
 * one, and gets it first; a stream whose resolver balances by a policy, or that waits for a
 * retry's dial, waits for its own dial. NULL when none.
 */
static struct h2s *next_waiting(struct session *s, int fresh, const struct snap_target *tgt)
{
    struct mux_h2 *m = s->mux2;
    struct h2s *best = NULL;
    for (struct h2s *x = m->streams; x != NULL; x = x->next) {
        if (!x->waiting || x->h1 == NULL || (x->h1->retried && !fresh) || x->policy_retry ||
            session_resolver_balances(x->rs) || !session_resolver_allows(s, x->rs, tgt))
            continue;
        if (best == NULL || (x->h1->retried && !best->h1->retried) ||
            (x->h1->retried == best->h1->retried && x->st.seq < best->st.seq))
            best = x;
    }
    return best;
}

/*
 * Waiting stream <x> takes connection <src> (moved: fd -1 on return), verified as endpoint
 * <ep> (<ep_name>) of <tgt>; <reused>: it carried an answer before, so the request is held
 * until its answer starts (a retry resends it should the peer have closed it just then).
 */
static void leg_attach(struct session *s, struct h2s *x, struct xprt *src,
                       const struct snap_target *tgt, const struct dec_endpoint *ep,
                       const char *ep_name, int reused)
{
    struct h1leg *l = x->h1;
    loop_io_want(s->host->loop, &src->io, 0);
    l->x = *src;
    *src = (struct xprt){.fd = -1};
    loop_io_init(&l->x.io, l->x.fd, leg_on_io, s);
    l->tgt = tgt;
    l->ep = ep;
    copy_str_cut(l->ep_name, sizeof(l->ep_name), ep_name);
    l->reused = reused;
    l->writable = 1;
    l->held_max = x->pol.retries_left > 0 ? s->up->cfg->retry_buffer_bytes : REPLAY_MAX;
    l->held_ok = ((reused && !l->retried) || x->pol.retries_left > 0) && l->out.len <= l->held_max;
    if (l->held_ok)
        buf_add(&l->held, l->out.p, l->out.len);
    unwait(s, x);
    x->app_open = 1;
    x->last_ms = loop_now_ms(s->host->loop);
    set_ep(x, ep_name);
    x->tgt = tgt;
    x->uep = ep;
}

/*
 * A complete exchange on a connection that stays alive: the connection goes to the next
 * waiting stream, else to the worker's pool; the leg ends.
 */
static void leg_release(struct session *s, struct h2s *x)
{
    struct h1leg *l = x->h1;
    loop_io_want(s->host->loop, &l->x.io, 0);
    struct xprt conn = l->x;
    l->x = (struct xprt){.fd = -1};
    struct h2s *y = next_waiting(s, 0, l->tgt);
    if (y != NULL)
        leg_attach(s, y, &conn, l->tgt, l->ep, l->ep_name, 1);
    else
        session_pool_put_conn(s, &conn, l->tgt, l->ep, l->ep_name);
    leg_close(s, x);
}

/*
 * The keep-alive race: a reused connection ended before any byte of the answer (its peer
 * closed it as idle while the request went out). With the whole request held, the stream
 * waits for a fresh connection and sends it again, once. 1 when so.
 */
static int leg_lost(struct session *s, struct h2s *x)
{
    struct h1leg *l = x->h1;
    if (!l->mesh || !l->reused || l->heard || !l->held_ok || l->retried || l->head_done)
        return 0;
    LOG_DEBUG("conn=%llu stream=%llu out: %s closed a reused connection before any answer: "
              "sending the request again on a new one",
              (unsigned long long)s->id, (unsigned long long)x->st.seq, LOG_ESC(l->ep_name));
    xprt_close(s->host->loop, &l->x);
    l->out.len = 0;
    buf_add(&l->out, l->held.p, l->held.len);
    buf_free(&l->held);
    l->held_ok = 0;
    l->in.len = 0;
    l->eof = 0;
    l->retried = 1;
    l->reused = 0;
    x->app_open = 0;
    x->waiting = 1;
    session_lb_hold_release(&x->lb);
    return 1;
}

/*
 * Outbound to an http upstream: when streams wait for a connection and the session holds
 * fewer than LEGS_MAX, the next dial (one at a time; mux_dialled() gives its result to the
 * stream it is for, else the oldest waiting one its resolver allows). It is for a stream
 * waiting for a retry's dial first (to an endpoint not used yet), then one to send again after
 * the keep-alive race (a fresh connection: no pooled one, which may have idled as long), else
 * the oldest; the stream's route chose the resolver the dial walks and its hash policy the
 * endpoint.
 */
static void h1_dial_next(struct session *s)
{
    struct mux_h2 *m = s->mux2;
    size_t open = 0;
    struct h2s *best = NULL;
    if (m->dialling)
        return;
    for (struct h2s *x = m->streams; x != NULL; x = x->next) {
        if (x->h1 != NULL && x->h1->x.fd >= 0)
            open++;
        if (!x->waiting || x->h1 == NULL)
            continue;
        int rank = x->policy_retry ? 2 : x->h1->retried ? 1 : 0;
        int best_rank = best == NULL ? -1 : best->policy_retry ? 2 : best->h1->retried ? 1 : 0;
        if (rank > best_rank || (rank == best_rank && x->st.seq < best->st.seq))
            best = x;
    }
    if (best == NULL || open >= LEGS_MAX)
        return;
    if (stream_dial_begin(s, best))
        return;
    if (best->h1->retried)
        session_redial_upstream(s);
    else
        session_dial_upstream(s);
}

/* The stream's exchange failed: 503 before the response head, else the caller's stream is
 * reset. */
static void leg_fail(struct session *s, struct h2s *x, enum stream_result r, const char *why)
{
    struct mux_h2 *m = s->mux2;
    if (!x->res_head) {
        local_answer(s, x, r, why, (struct http_slice){0});
        return;
    }
    set_why(x, why);
    x->local = 1;
    x->result = STREAM_RES_ABORTED;
    leg_close(s, x);
    x->app_open = 0;
    h2_submit_rst(m->down, x->cid, H2_INTERNAL_ERROR);
}

/* Moves response body bytes from the leg's input to the stream's <resb>. 0, or -1 after
 * failing the stream. */
static int leg_body(struct session *s, struct h2s *x)
{
    struct h1leg *l = x->h1;
    struct body_state *b = &l->body;
    const char *why = NULL;
    char msg[200];
    size_t used = 0;
    if (b->framing == HTTP_BODY_LENGTH || b->framing == HTTP_BODY_UNTIL_CLOSE) {
        size_t n = l->in.len;
        if (b->framing == HTTP_BODY_LENGTH && b->remaining < n)
            n = (size_t)b->remaining;
        buf_add(&x->resb, l->in.p, n);
        if (b->framing == HTTP_BODY_LENGTH)
            b->remaining -= n;
        used = n;
        x->res_eof = b->framing == HTTP_BODY_LENGTH ? b->remaining == 0 : l->eof && l->in.len == n;
    } else if (b->framing == HTTP_BODY_CHUNKED) {
        while (used < l->in.len && !h1_chunked_done(&b->ch)) {
            struct http_slice d = {0};
            ssize_t n = h1_chunked_decode(&b->ch, l->in.p + used, l->in.len - used, &d, &why);
            if (n < 0) {
                snprintf(msg, sizeof(msg), "bad chunked body from %s", leg_peer(l));
                leg_fail(s, x, STREAM_RES_BAD_RESPONSE, msg);
                return -1;
            }
            if (n == 0)
                break;
            buf_add(&x->resb, d.p, d.len);
            used += (size_t)n;
        }
        x->res_eof = h1_chunked_done(&b->ch);
    } else {
        x->res_eof = 1;
    }
    buf_consume(&l->in, used);
    if (l->eof && !x->res_eof && l->in.len == 0) {
        snprintf(msg, sizeof(msg), "%s closed in the middle of its answer", leg_peer(l));
        leg_fail(s, x, STREAM_RES_ABORTED, msg);
        return -1;
    }
    return 0;
}

/* Parses the response head in the leg's input; 1 when one went to the caller, 0 when more is
 * needed, -1 after failing the stream. */
static int leg_head(struct session *s, struct h2s *x)
{
    struct mux_h2 *m = s->mux2;
    struct h1leg *l = x->h1;
    struct http_header h[H2_DEFAULT_MAX_HEADERS];
    struct http_response rs = {.headers = h, .headers_cap = H2_DEFAULT_MAX_HEADERS};
    const char *why = NULL;
    char msg[300];
    for (;;) {
        int rc = h1_parse_response(l->in.p, l->in.len, H1_HEAD_MAX, l->method, &rs, &why);
        if (rc == -EAGAIN) {
            if (l->eof) {
                if (leg_lost(s, x))
                    return -1;
                snprintf(msg, sizeof(msg), "%s closed before its answer", leg_peer(l));
                leg_fail(s, x, STREAM_RES_LOCAL_RESET, msg);
                return -1;
            }
            return 0;
        }
        if (rc < 0 || rs.status == 101 || rs.framing == HTTP_BODY_TUNNEL) {
            snprintf(msg, sizeof(msg), "bad response from %s: %s", leg_peer(l),
                     why != NULL ? why : "an upgrade");
            leg_fail(s, x, STREAM_RES_BAD_RESPONSE, msg);
            return -1;
        }
        if (rs.status < 200) {
            buf_consume(&l->in, (size_t)rc);
            continue;
        }
        if (l->mesh && stream_retry_on_answer(s, x, rs.status, h, rs.nheaders))
            return -1;  /* dropped unseen: the stream goes again */
        l->held_ok = 0; /* never sent again now */
        buf_free(&l->held);
        int has_body = !(rs.framing == HTTP_BODY_NONE ||
                         (rs.framing == HTTP_BODY_LENGTH && rs.content_length == 0));
        /* Outbound, the route's and split's ResponseHeaders, and a hash policy's cookie. */
        size_t nmf = 0;
        struct http_header *mf = l->mesh ? response_fields(x, h, rs.nheaders, &nmf) : NULL;
        struct h2_out_head oh = {.status = rs.status,
                                 .headers = mf != NULL ? mf : h,
                                 .nheaders = mf != NULL ? nmf : rs.nheaders};
        x->st.status = rs.status;
        x->res_head = 1;
        l->head_done = 1;
        l->keep = (rs.flags & HTTP_F_KEEP_ALIVE) && rs.framing != HTTP_BODY_UNTIL_CLOSE;
        l->body.framing = has_body ? rs.framing : HTTP_BODY_NONE;
        l->body.remaining = rs.content_length;
        h1_chunked_init(&l->body.ch);
        if (!has_body)
            stream_answered(&x->st);
        int sent = h2_submit_response(m->down, x->cid, &oh, has_body);
        free(mf);
        if (sent != 0) {
            leg_fail(s, x, STREAM_RES_BAD_RESPONSE, "the response head cannot be forwarded");
            return -1;
        }
        buf_consume(&l->in, (size_t)rc);
        return 1;
    }
}

/* Runs every stream's HTTP/1.1 exchange once. Returns whether anything moved. */
static int legs_pump(struct session *s)
{
    struct mux_h2 *m = s->mux2;
    int progress = 0;
    char why[400];
    for (struct h2s *x = m->streams; x != NULL; x = x->next) {
        struct h1leg *l = x->h1;
        unsigned wants = 0;
        if (l == NULL || l->x.fd < 0)
            continue; /* outbound: waits for a connection */
        if (!l->connected) {
            if (!l->writable) {
                loop_io_want(s->host->loop, &l->x.io, LOOP_WRITE);
                continue;
            }
            int rc = sock_connect_result(l->x.fd);
            if (rc != 0) {
                snprintf(why, sizeof(why), "connect %s: %s", s->ep_name, util_strerror(rc));
                leg_fail(s, x, STREAM_RES_LOCAL_CONNECT_ERROR, why);
                progress = 1;
                continue;
            }
            l->connected = 1;
            progress = 1;
        }
        /* The request body: the caller's DATA, given back to its window once queued here. */
        while (!l->req_done && x->reqb.len > 0 && l->out.len < OUT_MAX) {
            size_t n = x->reqb.len < IO_CHUNK ? x->reqb.len : IO_CHUNK;
            if (l->chunked) {
                char hex[24];
                int k = snprintf(hex, sizeof(hex), "%zx\r\n", n);
                leg_queue(l, hex, (size_t)k);
            }
            leg_queue(l, x->reqb.p, n);
            if (l->chunked)
                leg_queue(l, "\r\n", 2);
            buf_consume(&x->reqb, n);
            h2_consume(m->down, x->cid, n);
            progress = 1;
        }
        if (!l->req_done && x->reqb.len == 0 && x->req_eof) {
            if (l->chunked)
                leg_queue(l, "0\r\n\r\n", 5);
            l->req_done = 1;
        }
        if (l->out.len > 0) {
            ssize_t n = xprt_write(&l->x, l->out.p, l->out.len);
            if (n > 0) {
                buf_consume(&l->out, (size_t)n);
                progress = 1;
            } else if (n == -EAGAIN) {
                wants |= xprt_wants(&l->x, LOOP_WRITE);
            } else if (leg_lost(s, x)) {
                progress = 1;
                continue;
            } else if (!l->head_done) {
                /* It may still answer (a 413, say): the rest of the request is dropped. */
                l->out.len = 0;
                l->req_done = 1;
            }
        }
        /* The answer: read while the caller's side has room for it. */
        size_t cap = l->head_done ? IO_CHUNK : H1_HEAD_MAX + IO_CHUNK;
        if (!l->eof && l->in.len < cap && x->resb.len < H2_DEFAULT_STREAM_WINDOW_BYTES) {
            buf_reserve(&l->in, l->in.len + IO_CHUNK);
            size_t room = cap - l->in.len < IO_CHUNK ? cap - l->in.len : IO_CHUNK;
            ssize_t n = xprt_read(&l->x, l->in.p + l->in.len, room);
            if (n > 0) {
                l->in.len += (size_t)n;
                progress = 1;
                if (!l->heard) {
                    /* Answered: the request is no longer sent again for the keep-alive race
                     * (a retry policy still holds it until the answer's head). */
                    l->heard = 1;
                    if (x->pol.retries_left == 0) {
                        l->held_ok = 0;
                        buf_free(&l->held);
                    }
                }
            } else if (n == -EAGAIN) {
                wants |= xprt_wants(&l->x, LOOP_READ);
            } else {
                l->eof = 1;
                progress = 1;
            }
        }
        if (!l->head_done) {
            int h = leg_head(s, x);
            if (h < 0)
                continue;
            if (h == 0) {
                if (l->in.len >= cap) {
                    leg_fail(s, x, STREAM_RES_BAD_RESPONSE, "response head too large");
                    continue;
                }
                loop_io_want(s->host->loop, &l->x.io, wants);
                continue;
            }
            progress = 1;
        }
        size_t before = x->resb.len;
        if (!x->res_eof && leg_body(s, x) < 0)
            continue;
        if (x->resb.len != before || x->res_eof)
            resume_down(m, x);
        if (x->res_eof) {
            /* The answer is complete: inbound the connection is not reused; outbound it is
             * when both sides allow it and the whole request went out. */
            if (l->mesh && l->keep && l->req_done && l->out.len == 0 && l->in.len == 0 && !l->eof)
                leg_release(s, x); /* maybe to a stream this round has passed: go round */
            else
                leg_close(s, x);
            x->app_open = 0;
            progress = 1;
            continue;
        }
        loop_io_want(s->host->loop, &l->x.io, wants);
    }
    return progress;
}

/* ---- the caller's session (server) ---- */

static void kick(struct session *s);
static void start_dial(struct session *s);
static const struct h2up_stream_ops up_ops;

/* How a stream that found no upstream is answered: the application (inbound) or no endpoint
 * (outbound). */
static enum stream_result connect_error(const struct mux_h2 *m)
{
    return m->outbound ? STREAM_RES_UPSTREAM_CONNECT_ERROR : STREAM_RES_LOCAL_CONNECT_ERROR;
}

/*
 * Inbound: the worker's shared h2c connection to the application, dialled (non-blocking; the
 * connect completes, or fails the streams, in h2up) when there is none that takes a stream.
 * NULL with <why> when the connect failed at once.
 */
static struct h2up_conn *app_conn(struct session *s, char *why, size_t len)
{
    struct mux_h2 *m = s->mux2;
    const struct proxy_cfg *c = &s->snap->cfg;
    /* The key depends on the session's snapshot only: formatted once per snapshot. */
    if (m->app_key_snap != s->snap || m->app_key_gen != s->snap->generation) {
        session_app_h2_key(s, m->app_key, sizeof(m->app_key));
        m->app_key_snap = s->snap;
        m->app_key_gen = s->snap->generation;
    } else {
        session_app_h2_key_used(s);
    }
    const char *key = m->app_key;
    copy_str_cut(s->ep_name, sizeof(s->ep_name), key + 4);
    struct h2up_conn *hc = h2up_find(s->host->h2up, key, NULL);
    if (hc != NULL)
        return hc;
    struct session_app a;
    session_app(s, &a);
    int fd = a.socket_path[0] != '\0' ? sock_connect_unix(a.socket_path)
                                      : sock_connect(a.address, a.port);
    if (fd < 0) {
        snprintf(why, len, "connect %s: %s", s->ep_name, util_strerror(fd));
        return NULL;
    }
    struct xprt x = {.fd = fd};
    hc = h2up_adopt(s->host->h2up, key, NULL, &x, s->ep_name);
    h2up_set_connect_timeout(hc, c->local_connect_timeout_ms);
    return hc;
}

/* Opens stream <x>'s upstream stream with <oh> on <c>; on failure <x> is answered 503. */
static void up_open(struct session *s, struct h2s *x, struct h2up_conn *c,
                    const struct h2_out_head *oh, int has_body)
{
    x->us = h2up_open(c, oh, has_body, &up_ops, x);
    x->held_max = x->pol.retries_left > 0 ? s->up->cfg->retry_buffer_bytes : REPLAY_MAX;
    x->held_ok = x->us != NULL && (!x->retried || x->pol.retries_left > 0);
    if (x->us == NULL) {
        local_answer(
            s, x, connect_error(s->mux2),
            "the shared HTTP/2 connection takes no new stream (GOAWAY, or its queue is full)",
            (struct http_slice){0});
        return;
    }
    x->app_open = 1;
}

/*
 * Outbound routing (route.h), as mux_h1's route_request(): the stream's route and a split
 * drawn by weight name the resolver whose targets its dial may use (x->rs). Returns 0, or -1
 * after answering 404 (no route matched) or 503 (no split has weight).
 */
static int route_stream(struct session *s, struct h2s *x, const struct h2_head *hd)
{
    const struct route_table *t = s->up->routes;
    if (t == NULL)
        return 0;
    struct route_req rr = {
        .method = hd->method,
        .path = hd->path,
        .authority = hd->authority,
        .headers = hd->headers,
        .nheaders = hd->nheaders,
    };
    const char *q = hd->path.p != NULL ? memchr(hd->path.p, '?', hd->path.len) : NULL;
    if (q != NULL) {
        rr.path.len = (size_t)(q - hd->path.p);
        rr.query = (struct http_slice){q + 1, hd->path.len - rr.path.len - 1};
    }
    x->route = x->st.route = route_match(t, &rr);
    if (x->route == NULL) {
        local_answer(s, x, STREAM_RES_NO_ROUTE, "no route matched", (struct http_slice){0});
        return -1;
    }
    x->split = route_split_pick(x->route, util_rand());
    if (x->split == NULL) {
        local_answer(s, x, STREAM_RES_UPSTREAM_CONNECT_ERROR,
                     "the route's splits all have weight 0", (struct http_slice){0});
        return -1;
    }
    x->rs = route_table_resolver(t, x->split->resolver);
    x->st.resolver = x->rs != NULL ? x->rs->name : NULL;
    return 0;
}

/*
 * Outbound: the request head a waiting stream keeps, pseudo-fields first, with its route's
 * PrefixRewrite and header modifiers applied (the removed fields left out).
 */
static void pend_keep(struct h2s *x, const struct h2_head *hd)
{
    struct http_header *f, *mf;
    size_t nf = 0,
           nm = hd->nheaders < H2_DEFAULT_MAX_HEADERS ? hd->nheaders : H2_DEFAULT_MAX_HEADERS;
    struct buf path = {0};
    struct http_slice p = hd->path;
    const char *q = p.p != NULL ? memchr(p.p, '?', p.len) : NULL;
    size_t cut = 0;
    if (x->route != NULL && p.p != NULL)
        cut = route_rewrite_len(x->route,
                                (struct http_slice){p.p, q != NULL ? (size_t)(q - p.p) : p.len});
    if (cut > 0) {
        buf_add(&path, x->route->def->prefix_rewrite, strlen(x->route->def->prefix_rewrite));
        buf_add(&path, p.p + cut, p.len - cut);
        p = (struct http_slice){path.p, path.len};
    }
    size_t nmf = 0;
    mf = route_headers_modified(x->route, x->split, 0, hd->headers, nm, &nmf);
    if (mf != NULL)
        nm = nmf;
    struct http_header fs[MAX_FIELDS];
    f = nm + 4 <= MAX_FIELDS ? fs : xcalloc(nm + 4, sizeof(*f));
    f[nf++] = (struct http_header){.name = {":method", 7}, .value = hd->method};
    f[nf++] = (struct http_header){.name = {":scheme", 7}, .value = hd->scheme};
    f[nf++] = (struct http_header){.name = {":authority", 10}, .value = hd->authority};
    f[nf++] = (struct http_header){.name = {":path", 5}, .value = p};
    for (size_t i = 0; i < nm; i++)
        if (!((mf != NULL ? mf : hd->headers)[i].flags & HTTP_HDR_HOP))
            f[nf++] = (mf != NULL ? mf : hd->headers)[i];
    fields_copy(&x->pend, f, nf);
    x->pend_body = !hd->end_stream;
    if (f != fs)
        free(f);
    free(mf);
    buf_free(&path);
}

/* Inbound: the head as it goes to the application (the fields it leaves out left out), kept
 * like pend_keep()'s for a retry. */
static void pend_keep_out(struct h2s *x, const struct h2_out_head *oh, int has_body)
{
    struct http_header f[MAX_FIELDS];
    struct http_slice none = {"", 0};
    size_t nf = 0;
    f[nf++] = (struct http_header){.name = {":method", 7}, .value = oh->method};
    f[nf++] = (struct http_header){.name = {":scheme", 7},
                                   .value = oh->scheme.p != NULL ? oh->scheme : none};
    f[nf++] = (struct http_header){.name = {":authority", 10},
                                   .value = oh->authority.p != NULL ? oh->authority : none};
    f[nf++] =
        (struct http_header){.name = {":path", 5}, .value = oh->path.p != NULL ? oh->path : none};
    for (size_t i = 0; i < oh->nheaders && nf < MAX_FIELDS; i++)
        if (!(oh->headers[i].flags & (HTTP_HDR_HOP | HTTP_HDR_DUP | HTTP_HDR_DROP)))
            f[nf++] = oh->headers[i];
    fields_copy(&x->pend, f, nf);
    x->pend_body = has_body;
}

static struct http_slice pend_slice(const struct h2s *x, size_t i)
{
    struct http_slice v = x->pend.h[i].value;
    return v.len > 0 ? v : (struct http_slice){NULL, 0};
}

/* The head kept in <pend> as an h2_out_head (slices into it). */
static struct h2_out_head pend_head(const struct h2s *x)
{
    return (struct h2_out_head){
        .method = pend_slice(x, 0),
        .scheme = pend_slice(x, 1),
        .authority = pend_slice(x, 2),
        .path = pend_slice(x, 3),
        .headers = x->pend.h + 4,
        .nheaders = x->pend.n - 4,
    };
}

/*
 * Opens again the streams up_on_close() left to retry: inbound on the worker's connection to
 * the application (the lost one is out of the pool: a new one), outbound through a new dial
 * (the waiting streams are opened by mux_dialled()).
 */
static void retry_streams(struct session *s)
{
    struct mux_h2 *m = s->mux2;
    char why[400];
    int dial = 0;
    if (m->retries == 0)
        return;
    m->retries = 0;
    for (struct h2s *x = m->streams; x != NULL; x = x->next) {
        if (!x->retry)
            continue;
        x->retry = 0;
        if (x->local || !x->waiting)
            continue;
        if (m->outbound) {
            dial = 1;
            continue;
        }
        x->waiting = 0;
        struct h2up_conn *c = app_conn(s, why, sizeof(why));
        if (c == NULL) {
            local_answer(s, x, STREAM_RES_LOCAL_CONNECT_ERROR, why, (struct http_slice){0});
            continue;
        }
        struct h2_out_head oh = pend_head(x);
        up_open(s, x, c, &oh, x->pend_body);
    }
    if (dial && !m->dialling)
        start_dial(s);
}

/* ---- the downstream session (server) ---- */

/*
 * Outbound: a new snapshot (endpoints, routes, the CA's roots and our leaf) applies to the
 * caller's next streams too, as mux_h1 follows it between requests. Without this a long-lived
 * caller connection (a gRPC channel) kept dialling with the TLS context it started under, which
 * stops verifying the upstream's leaf two CA rotations later, and with endpoints long gone.
 * Streams hold pointers into the session's snapshot, so the session moves only when <x>, just
 * opened, is its one stream and no dial is under way. Otherwise (or when the upstream left the
 * new snapshot) the session drains: GOAWAY naming the stream before <x> as the last one
 * processed, so the application knows <x> went unprocessed and sends it again on a new
 * connection (gRPC does so transparently), which starts on the current snapshot; <x> is reset
 * REFUSED_STREAM and the open streams finish. Called from the head's callback, so the GOAWAY
 * is only queued; pump() sends it.
 */
static void follow_snapshot(struct session *s, struct h2s *x)
{
    struct mux_h2 *m = s->mux2;
    if (s->host->snap == NULL || s->host->snap == s->snap || m->draining)
        return;
    if (m->streams == x && x->next == NULL && !m->dialling && session_follow_snapshot(s))
        return;
    LOG_DEBUG("conn=%llu out: the snapshot changed with streams open: GOAWAY, the caller's next "
              "streams go on a new connection",
              (unsigned long long)s->id);
    m->draining = 1;
    m->resnap = 1;
    (void)h2_shutdown_before(m->down, x->cid);
}

static int down_on_head(struct h2_session *hs, int32_t cid, void *su, const struct h2_head *hd,
                        void *user)
{
    struct session *s = user;
    struct mux_h2 *m = s->mux2;
    struct h2s *x = stream_new(s, cid);
    char why[600];
    (void)hs;
    (void)su;
    h2_stream_set_user(m->down, cid, x);
    x->req_eof = hd->end_stream;
    if (x->req_eof)
        x->req_end_ms = loop_now_ms(s->host->loop);
    copy_str(x->st.method, sizeof(x->st.method), hd->method);
    copy_str(x->st.authority, sizeof(x->st.authority), hd->authority);
    int connect = hd->path.p == NULL;
    copy_str(x->st.path, sizeof(x->st.path), connect ? hd->authority : hd->path);
    /* A copy of the fields: normalization may flag some, and the extras are added. */
    struct http_header f[MAX_FIELDS];
    size_t nf = 0;
    int have_id = 0;
    for (size_t i = 0; i < hd->nheaders && nf < H2_DEFAULT_MAX_HEADERS; i++) {
        f[nf] = hd->headers[i];
        f[nf].flags = hd->headers[i].flags & HTTP_HDR_H2OK;
        struct http_slice nm = f[nf].name;
        if (name_is(nm, "content-type") && f[nf].value.len >= 16 &&
            strncasecmp(f[nf].value.p, "application/grpc", 16) == 0)
            x->grpc = 1;
        if (name_is(nm, "x-request-id") && f[nf].value.len > 0 && !have_id) {
            have_id = 1;
            copy_str(x->st.request_id, sizeof(x->st.request_id), f[nf].value);
        }
        nf++;
    }
    if (m->outbound) {
        /* The application's own request, forwarded as sent (the upstream's sidecar
         * normalizes and authorizes it) once the session's dial gives a connection. */
        follow_snapshot(s, x);
        if (m->draining) {
            /* Unprocessed: the application may send it again on another connection. */
            h2_submit_rst(m->down, cid, H2_REFUSED_STREAM);
            x->local = 1;
            x->result = STREAM_RES_ABORTED;
            set_why(x, m->resnap ? "the configuration changed while streams were open"
                                 : "connectd is draining");
            return 0;
        }
        if (m->h1up && connect) {
            local_answer(s, x, STREAM_RES_BAD_RESPONSE,
                         "CONNECT over HTTP/2 to an http upstream is not translated to HTTP/1.1",
                         (struct http_slice){0});
            return 0;
        }
        if (route_stream(s, x, hd) < 0 || stream_admit(s, x) < 0)
            return 0;
        pend_keep(x, hd);
        if (m->h1up) {
            /* An http upstream: an HTTP/1.1 exchange; pump() dials for it. */
            if (leg_wait(s, x, hd) == 0)
                (void)stream_wait(s, x);
            return 0;
        }
        if (stream_wait(s, x) == 0 && !m->dialling)
            start_dial(s);
        return 0;
    }
    struct stream_req sr = {
        .method = hd->method,
        .target = connect ? hd->authority : hd->path,
        .origin = !connect,
        .authority = hd->authority,
        .headers = f,
        .nheaders = nf,
        .quiet_allow = 1, /* an allowed stream's record has no reason, as over HTTP/1.1 */
    };
    size_t cap = PATHNORM_OUT_MAX(sr.target.len), tlen = 0;
    char *target = memcache_alloc(cap);
    enum stream_verdict v = stream_authorize(s, &x->st, &sr, target, cap, &tlen, why, sizeof(why));
    session_count_request_decision(s, v == STREAM_ALLOW);
    struct http_slice t = {target, tlen};
    if (v != STREAM_ALLOW) {
        local_answer(s, x, stream_verdict_result(v), why, t);
        goto out;
    }
    set_why(x, why);
    struct session_app app;
    session_app(s, &app);
    if (app.protocol == PROTO_HTTP && connect) {
        local_answer(s, x, STREAM_RES_BAD_RESPONSE,
                     "CONNECT over HTTP/2 to an http service is not translated to HTTP/1.1", t);
        goto out;
    }
    /* The application must be able to trust these: what the caller sent is replaced. */
    int kept_id = 0;
    for (size_t i = 0; i < nf; i++) {
        struct http_slice nm = f[i].name;
        if (f[i].flags & HTTP_HDR_DROP)
            f[i].flags |= HTTP_HDR_HOP;
        if (name_is(nm, "x-forwarded-client-cert") || name_is(nm, "x-forwarded-proto"))
            f[i].flags |= HTTP_HDR_HOP;
        else if (name_is(nm, "x-request-id") && (f[i].value.len == 0 || kept_id))
            f[i].flags |= HTTP_HDR_HOP; /* empty or repeated: one id only */
        else if (name_is(nm, "x-request-id"))
            kept_id = 1;
    }
    /* An exposed listener's caller has no certificate: no XFCC, and it came over h2c. */
    /* Written here in lower case, with values checked once (XFCC, in mux_start) or fit by
     * construction: the HTTP/2 encoder need not check them per request. */
    if (s->end[0].tls != NULL) {
        f[nf++] = (struct http_header){.name = {"x-forwarded-client-cert", 23},
                                       .value = {m->xfcc, m->xfcc_len},
                                       .flags = m->xfcc_ok ? HTTP_HDR_H2OK : 0};
        f[nf++] = (struct http_header){
            .name = {"x-forwarded-proto", 17}, .value = {"https", 5}, .flags = HTTP_HDR_H2OK};
    } else {
        f[nf++] = (struct http_header){
            .name = {"x-forwarded-proto", 17}, .value = {"http", 4}, .flags = HTTP_HDR_H2OK};
    }
    if (!have_id) {
        stream_new_request_id(&x->st);
        f[nf++] = (struct http_header){.name = {"x-request-id", 12},
                                       .value = {x->st.request_id, strlen(x->st.request_id)},
                                       .flags = HTTP_HDR_H2OK}; /* a UUID: hex digits and '-' */
    }
    if (app.protocol == PROTO_HTTP) {
        leg_open(s, x, hd, t, f, nf);
        goto out;
    }
    struct h2up_conn *c = app_conn(s, why, sizeof(why));
    if (c == NULL) {
        local_answer(s, x, STREAM_RES_LOCAL_CONNECT_ERROR, why, t);
        goto out;
    }
    struct h2_out_head oh = {
        .method = hd->method,
        .scheme = connect ? (struct http_slice){NULL, 0} : (struct http_slice){"http", 4},
        .authority = hd->authority,
        .path = connect ? (struct http_slice){NULL, 0} : t,
        .headers = f,
        .nheaders = nf,
    };
    pend_keep_out(x, &oh, !hd->end_stream);
    up_open(s, x, c, &oh, !hd->end_stream);
out:
    memcache_free(target);
    return 0;
}

/* Whether request bytes of <x> are still wanted by an upstream (open, or waiting for one or
 * for a retry). */
static int req_wanted(const struct h2s *x)
{
    return !x->local && (x->app_open || x->waiting || x->backoff_until_ms != 0);
}

static void resume_up(struct h2s *x)
{
    if (x->req_defer && x->us != NULL) {
        x->req_defer = 0;
        h2up_resume(x->us);
    }
}

static int down_on_data(struct h2_session *hs, int32_t cid, void *su, const uint8_t *p, size_t len,
                        void *user)
{
    struct session *s = user;
    struct mux_h2 *m = s->mux2;
    struct h2s *x = su;
    (void)hs;
    if (x == NULL) {
        h2_consume(m->down, cid, len);
        return 0;
    }
    x->st.bytes_in += len;
    x->last_ms = loop_now_ms(s->host->loop);
    if (!req_wanted(x)) {
        h2_consume(m->down, cid, len); /* dropped */
        return 0;
    }
    buf_add(&x->reqb, p, len);
    resume_up(x);
    return 0;
}

static int down_on_trailers(struct h2_session *hs, int32_t cid, void *su,
                            const struct http_header *f, size_t n, void *user)
{
    struct h2s *x = su;
    (void)hs;
    (void)cid;
    (void)user;
    if (x != NULL && req_wanted(x))
        fields_copy(&x->req_tr, f, n);
    return 0;
}

static void down_on_end_stream(struct h2_session *hs, int32_t cid, void *su, void *user)
{
    struct session *s = user;
    struct h2s *x = su;
    (void)hs;
    (void)cid;
    if (x == NULL)
        return;
    x->req_eof = 1;
    x->req_end_ms = loop_now_ms(s->host->loop);
    x->last_ms = x->req_end_ms;
    if (x->app_open)
        resume_up(x);
}

/* stream_finish() with the record naming the endpoint this stream went to: outbound, streams
 * of one session spread over the upstream's endpoints. */
static void finish_stream(struct session *s, struct h2s *x, enum stream_result r, const char *why)
{
    char saved[sizeof(s->ep_name)];
    session_lb_hold_release(&x->lb);
    if (x->ep == NULL) {
        stream_finish(s, &x->st, r, why);
        return;
    }
    memcpy(saved, s->ep_name, sizeof(saved));
    copy_str_cut(s->ep_name, sizeof(s->ep_name), x->ep);
    stream_finish(s, &x->st, r, why);
    memcpy(s->ep_name, saved, sizeof(saved));
}

static void down_on_close(struct h2_session *hs, int32_t cid, void *su, uint32_t code, void *user)
{
    struct session *s = user;
    struct mux_h2 *m = s->mux2;
    struct h2s *x = su;
    char why[300];
    (void)hs;
    (void)cid;
    if (x == NULL)
        return;
    app_stream_drop(s, x, H2_CANCEL);
    enum stream_result r = x->local ? x->result : STREAM_RES_OK;
    const char *reason = x->why;
    if (code != H2_NO_ERROR) {
        r = x->local && x->result != STREAM_RES_ABORTED && x->res_eof && x->resb.len == 0
                ? x->result
                : STREAM_RES_ABORTED;
        if (r == STREAM_RES_ABORTED && !x->local) {
            snprintf(why, sizeof(why), "the stream was reset (HTTP/2 error 0x%x)", code);
            reason = why;
        }
    }
    finish_stream(s, x, r, reason);
    stream_free(m, x);
}

static ssize_t down_read_body(struct h2_session *hs, int32_t cid, void *su, uint8_t *buf,
                              size_t cap, unsigned *flags, void *user)
{
    struct session *s = user;
    struct mux_h2 *m = s->mux2;
    struct h2s *x = su;
    (void)hs;
    if (x == NULL)
        return -EIO;
    size_t n = x->resb.len < cap ? x->resb.len : cap;
    if (n > 0) {
        memcpy(buf, x->resb.p, n);
        buf_consume(&x->resb, n);
        x->st.bytes_out += n;
        x->last_ms = loop_now_ms(s->host->loop);
        if (x->us != NULL)
            h2up_consume(x->us, n);
    }
    if (x->resb.len == 0 && x->res_eof) {
        stream_answered(&x->st); /* the body's last frame: before it goes out */
        *flags |= H2_BODY_EOF;
        if (x->res_tr.n > 0) {
            *flags |= H2_BODY_TRAILERS;
            h2_submit_trailers(m->down, cid, x->res_tr.h, x->res_tr.n);
        }
        return (ssize_t)n;
    }
    if (n == 0) {
        x->res_defer = 1;
        return H2_BODY_DEFER;
    }
    return (ssize_t)n;
}

static void down_on_goaway(struct h2_session *hs, int32_t last, uint32_t code, void *user)
{
    struct session *s = user;
    (void)hs;
    LOG_DEBUG("conn=%llu %s: the peer sent GOAWAY (last stream %d, code 0x%x)",
              (unsigned long long)s->id, s->inbound ? "in" : "out", (int)last, code);
}

static const struct h2_callbacks down_cb = {
    .on_head = down_on_head,
    .on_data = down_on_data,
    .on_trailers = down_on_trailers,
    .on_end_stream = down_on_end_stream,
    .on_close = down_on_close,
    .on_goaway = down_on_goaway,
    .read_body = down_read_body,
};

/* ---- the upstream stream (h2up: the application's h2c, or an upstream sidecar) ---- */

static void resume_down(struct mux_h2 *m, struct h2s *x)
{
    if (x->res_defer) {
        x->res_defer = 0;
        h2_resume(m->down, x->cid);
    }
}

static const char *peer_word(const struct mux_h2 *m)
{
    return m->outbound ? "the upstream" : "the application";
}

static int up_on_head(void *owner, const struct h2_head *hd)
{
    struct h2s *x = owner;
    struct session *s = x->s;
    struct mux_h2 *m = s->mux2;
    x->conn_established = 1;
    x->last_ms = loop_now_ms(s->host->loop);
    kick(s);
    if (!x->local && !x->res_head &&
        stream_retry_on_answer(s, x, hd->status, hd->headers, hd->nheaders))
        return 0; /* dropped unseen: the stream goes again */
    heard(x);
    if (x->local)
        return -1;
    if (hd->status < 200)
        return 0; /* interim answers are not passed on */
    if (x->res_head)
        return -1;
    x->st.status = hd->status;
    note_grpc_status(x, hd->headers, hd->nheaders);
    /* Outbound, the route's and split's ResponseHeaders, and a hash policy's cookie. */
    size_t nmf = 0;
    struct http_header *mf = response_fields(x, hd->headers, hd->nheaders, &nmf);
    struct h2_out_head oh = {.status = hd->status,
                             .headers = mf != NULL ? mf : hd->headers,
                             .nheaders = mf != NULL ? nmf : hd->nheaders};
    x->res_head = 1;
    x->res_eof = hd->end_stream;
    if (x->res_eof)
        stream_answered(&x->st);
    int rc = h2_submit_response(m->down, x->cid, &oh, !hd->end_stream);
    free(mf);
    if (rc != 0) {
        snprintf(x->why, sizeof(x->why), "%s's response head cannot be forwarded", peer_word(m));
        x->local = 1;
        x->result = STREAM_RES_BAD_RESPONSE;
        h2_submit_rst(m->down, x->cid, H2_INTERNAL_ERROR);
        return -1;
    }
    return 0;
}

static int up_on_data(void *owner, const uint8_t *p, size_t len)
{
    struct h2s *x = owner;
    struct session *s = x->s;
    x->last_ms = loop_now_ms(s->host->loop);
    if (x->local) {
        h2up_consume(x->us, len);
        return 0;
    }
    buf_add(&x->resb, p, len);
    resume_down(s->mux2, x);
    kick(s);
    return 0;
}

static int up_on_trailers(void *owner, const struct http_header *f, size_t n)
{
    struct h2s *x = owner;
    x->last_ms = loop_now_ms(x->s->host->loop);
    if (!x->local) {
        fields_copy(&x->res_tr, f, n);
        note_grpc_status(x, f, n);
    }
    return 0;
}

static void up_on_end(void *owner)
{
    struct h2s *x = owner;
    struct session *s = x->s;
    if (x->local)
        return;
    x->res_eof = 1;
    resume_down(s->mux2, x);
    kick(s);
}

static void up_on_close(void *owner, uint32_t code, const char *what)
{
    struct h2s *x = owner;
    struct session *s = x->s;
    struct mux_h2 *m = s->mux2;
    char why[400];
    if (!x->conn_established && x->us != NULL)
        x->conn_established = h2up_established(h2up_stream_conn(x->us));
    x->us = NULL;
    kick(s);
    if (!x->app_open)
        return;
    x->app_open = 0;
    if (!x->local && !x->res_head && !x->heard && !x->retried && x->held_ok && x->pend.h != NULL &&
        (code == H2_REFUSED_STREAM || (code == H2_CONNECT_ERROR && x->conn_established))) {
        /* Refused unprocessed, or lost with its connection (closed or broken without a
         * GOAWAY) before a byte of the answer: the pump opens it once more, on another
         * connection, its held body bytes first (given back to the caller already). */
        LOG_DEBUG("conn=%llu stream=%llu %s %s: %s before any answer: opening the stream again",
                  (unsigned long long)s->id, (unsigned long long)x->st.seq, peer_word(m),
                  LOG_ESC(x->ep != NULL ? x->ep : s->ep_name), what);
        body_back(x);
        x->retried = 1;
        x->retry = 1;
        m->retries++;
        x->waiting = 1;
        x->req_defer = 0;
        return;
    }
    /* Outbound, the retry policy: a reset or a failed connection before the answer's head. */
    int failed_conn = code == H2_CONNECT_ERROR && !x->conn_established;
    unsigned on = failed_conn ? ROUTE_RETRY_ON_CONNECT
                  : code == H2_REFUSED_STREAM
                      ? ROUTE_RETRY_ON_RESET | ROUTE_RETRY_BIT(REFUSED_STREAM)
                      : ROUTE_RETRY_ON_RESET;
    if (!x->local && !x->heard && code != H2_NO_ERROR && (x->pol.retry_on & on) &&
        stream_may_retry(s, x, 1)) {
        snprintf(why, sizeof(why), "%s before its answer", what);
        stream_retry_later(s, x, 1, why);
        return;
    }
    /* Request bytes no one will forward go back to the caller's window. */
    reqb_drop(m, x);
    if (x->local || (code == H2_NO_ERROR && x->res_eof))
        return;
    if (code == H2_CONNECT_ERROR)
        snprintf(why, sizeof(why), "%s's connection failed: %s", peer_word(m), what);
    else
        snprintf(why, sizeof(why), "%s reset its stream (HTTP/2 error 0x%x)", peer_word(m), code);
    if (!x->res_head) {
        enum stream_result r = STREAM_RES_LOCAL_RESET;
        if (code == H2_CONNECT_ERROR && !x->conn_established)
            r = connect_error(m);
        local_answer(s, x, r, why, (struct http_slice){0});
        return;
    }
    /* Mid-response: the caller's stream is reset the same way. */
    set_why(x, why);
    x->local = 1;
    x->result = STREAM_RES_ABORTED;
    h2_submit_rst(m->down, x->cid,
                  code == H2_NO_ERROR || code == H2_CONNECT_ERROR ? H2_INTERNAL_ERROR : code);
}

static ssize_t up_read_body(void *owner, uint8_t *buf, size_t cap, unsigned *flags)
{
    struct h2s *x = owner;
    struct session *s = x->s;
    struct mux_h2 *m = s->mux2;
    if (x->local)
        return -EIO;
    size_t n = x->reqb.len < cap ? x->reqb.len : cap;
    if (n > 0) {
        memcpy(buf, x->reqb.p, n);
        buf_consume(&x->reqb, n);
        if (x->held_ok && x->held.len + n > x->held_max) {
            x->held_ok = 0;
            buf_free(&x->held);
        } else if (x->held_ok) {
            buf_add(&x->held, buf, n);
        }
        /* Bytes a retry sent again were given back to the caller the first time. */
        size_t again = n < x->skip ? n : x->skip;
        x->skip -= again;
        if (n > again)
            h2_consume(m->down, x->cid, n - again);
        x->last_ms = loop_now_ms(s->host->loop);
        kick(s);
    }
    if (x->reqb.len == 0 && x->req_eof) {
        *flags |= H2_BODY_EOF;
        if (x->req_tr.n > 0) {
            *flags |= H2_BODY_TRAILERS;
            h2up_trailers(x->us, x->req_tr.h, x->req_tr.n);
        }
        return (ssize_t)n;
    }
    if (n == 0) {
        x->req_defer = 1;
        return H2_BODY_DEFER;
    }
    return (ssize_t)n;
}

static const struct h2up_stream_ops up_ops = {
    .on_head = up_on_head,
    .on_data = up_on_data,
    .on_trailers = up_on_trailers,
    .on_end = up_on_end,
    .on_close = up_on_close,
    .read_body = up_read_body,
};

/* ---- outbound: the dial ---- */

/* Asks session.c for a shared connection to the upstream; the streams waiting meanwhile are
 * opened on it in mux_dialled(), which may run before this returns. */
static void start_dial(struct session *s)
{
    struct mux_h2 *m = s->mux2;
    /* One resolver per dial: the first waiting stream's (see mux_dialled()). */
    struct h2s *x = m->streams;
    while (x != NULL && !x->waiting)
        x = x->next;
    s->dial_rs = NULL;
    m->dial_for = NULL;
    if (x == NULL) {
        m->dialling = 1;
        session_dial_h2(s);
    } else if (!stream_dial_begin(s, x)) {
        session_dial_h2(s);
    }
}

/*
 * An http upstream: the dial's connection (end[1], verified) goes to the stream it was for,
 * else to the oldest waiting stream its resolver allows (the pool takes it back when none is
 * left); no endpoint left answers the streams waiting for that resolver 503 (or retries them
 * by their policy), as for HTTP/2.
 */
static void h1_dialled(struct session *s, const char *why)
{
    struct mux_h2 *m = s->mux2;
    struct h2s *for_x = m->dial_for;
    char msg[400];
    m->dialling = 0;
    m->dial_for = NULL;
    if (why != NULL) {
        session_lb_release(s);
        snprintf(msg, sizeof(msg), "upstream %s: %s", s->up->cfg->destination_name, why);
        for (struct h2s *x = m->streams; x != NULL; x = x->next)
            if (x->waiting && x->rs == s->dial_rs &&
                (x == for_x || (!x->policy_retry && !session_resolver_balances(x->rs))))
                stream_dial_failed(s, x, msg, why, s->dial_overflow);
        kick(s);
        return;
    }
    struct h2s *x = for_x != NULL && for_x->waiting && for_x->h1 != NULL
                        ? for_x
                        : next_waiting(s, !s->dial_pooled, s->tgt);
    if (x != NULL) {
        leg_attach(s, x, &s->end[1], s->tgt, s->ep, s->ep_name, s->dial_pooled);
        stream_note_endpoint(s, x, s->tgt, s->ep, 1);
        session_lb_move(s, &x->lb);
    } else {
        session_lb_release(s);
        session_pool_put(s);
    }
    kick(s);
}

static void mux_dialled(struct session *s, const char *why)
{
    struct mux_h2 *m = s->mux2;
    struct h2up_conn *c = why == NULL ? s->h2c : NULL;
    const struct route_resolver *rs = s->dial_rs;
    struct h2s *for_x = m->dial_for;
    int others = 0;
    char msg[400];
    if (m->h1up) {
        h1_dialled(s, why);
        return;
    }
    m->dialling = 0;
    m->dial_for = NULL;
    s->h2c = NULL;
    if (why != NULL)
        snprintf(msg, sizeof(msg), "upstream %s: %s", s->up->cfg->destination_name, why);
    for (struct h2s *x = m->streams; x != NULL; x = x->next) {
        if (!x->waiting)
            continue;
        /* Routed elsewhere, choosing its endpoint by a policy, or a retry passing endpoints
         * over: its own dial follows. */
        if (x->rs != rs || (x != for_x && (session_resolver_balances(rs) || x->policy_retry ||
                                           (for_x != NULL && for_x->policy_retry)))) {
            others = 1;
            continue;
        }
        if (c == NULL) {
            stream_dial_failed(s, x, msg, why != NULL ? why : "no HTTP/2 connection",
                               s->dial_overflow);
            continue;
        }
        unwait(s, x);
        struct h2_out_head oh = pend_head(x);
        up_open(s, x, c, &oh, x->pend_body);
        set_ep(x, s->ep_name);
        stream_note_endpoint(s, x, s->tgt, s->ep, 1);
        /* Under a policy only the stream the dial was for is here (the others dial their own);
         * without one no count is held. */
        session_lb_move(s, &x->lb);
    }
    session_lb_release(s);
    if (others && !m->dialling)
        start_dial(s);
    kick(s);
}

/* ---- timers ---- */

enum deadline {
    DL_NONE,
    DL_CONNECT,
    DL_REQUEST,
    DL_STREAM_IDLE,
    DL_IDLE,
    DL_ROUTE,      /* outbound: a stream's RequestTimeout (its route's, resolver's or 15 s) */
    DL_ROUTE_IDLE, /* outbound: a stream's route IdleTimeout */
    DL_BACKOFF,    /* outbound: a stream's retry back-off ended */
};

/* Outbound stream <x>'s RequestTimeout deadline (absolute ms), 0 while none runs: from the end
 * of its request (Envoy's route timeout) to the end of its answer, retries included. */
static uint64_t route_deadline(const struct h2s *x)
{
    if (x->local || x->res_eof || x->req_end_ms == 0 || x->pol.timeout_ms == 0)
        return 0;
    return x->req_end_ms + x->pol.timeout_ms;
}

/* The earliest deadline (absolute ms, 0 for none) and its kind. */
static uint64_t deadline(const struct session *s, enum deadline *kind)
{
    const struct mux_h2 *m = s->mux2;
    const struct proxy_cfg *c = &s->snap->cfg;
    uint32_t idle = session_idle_timeout_ms(s);
    uint64_t best = 0;
    *kind = DL_NONE;
#define CONSIDER(t, k)                                                                             \
    do {                                                                                           \
        uint64_t t_ = (t);                                                                         \
        if (best == 0 || t_ < best) {                                                              \
            best = t_;                                                                             \
            *kind = (k);                                                                           \
        }                                                                                          \
    } while (0)
    for (const struct h2s *x = m->streams; x != NULL; x = x->next) {
        if (x->h1 != NULL && !x->h1->connected)
            CONSIDER(x->h1->connect_start_ms + c->local_connect_timeout_ms, DL_CONNECT);
        if (c->local_request_timeout_ms != 0 && x->app_open && x->req_end_ms != 0 && !x->res_eof)
            CONSIDER(x->req_end_ms + c->local_request_timeout_ms, DL_REQUEST);
        if (idle != 0)
            CONSIDER(x->last_ms + idle, DL_STREAM_IDLE);
        if (!m->outbound || x->local)
            continue;
        if (route_deadline(x) != 0)
            CONSIDER(route_deadline(x), DL_ROUTE);
        if (x->pol.idle_ms != 0 && !x->res_eof)
            CONSIDER(x->last_ms + x->pol.idle_ms, DL_ROUTE_IDLE);
        if (x->backoff_until_ms != 0)
            CONSIDER(x->backoff_until_ms, DL_BACKOFF);
    }
    if (idle != 0 && m->streams == NULL)
        CONSIDER(s->last_io_ms + idle, DL_IDLE);
#undef CONSIDER
    return best;
}

/*
 * Outbound streams past their RequestTimeout (or their route's IdleTimeout, <idle>): before
 * the answer's head 504 "upstream request timeout" (408 "stream timeout" for the idle one, as
 * mux_h1), after it the caller's stream is reset. A gRPC stream gets what Envoy's local reply
 * gives a 504: a trailers-only answer with grpc-status 14 (UNAVAILABLE) and that message.
 */
static void route_timed_out(struct session *s, int idle, uint64_t now)
{
    char why[200];
    for (struct h2s *x = s->mux2->streams; x != NULL; x = x->next) {
        if (x->local)
            continue;
        if (idle) {
            if (x->pol.idle_ms == 0 || x->res_eof || x->last_ms + x->pol.idle_ms > now)
                continue;
            snprintf(why, sizeof(why), "nothing moved for %lu ms (the route's IdleTimeout)",
                     (unsigned long)x->pol.idle_ms);
        } else {
            uint64_t d = route_deadline(x);
            if (d == 0 || d > now)
                continue;
            snprintf(why, sizeof(why),
                     "no complete answer in %lu ms (the route's "
                     "RequestTimeout)%s",
                     (unsigned long)x->pol.timeout_ms, x->st.retries > 0 ? " after retries" : "");
        }
        STAT_ADD(s->host->stats->upstream_timeouts, 1);
        x->pol.retries_left = 0;
        local_answer(s, x, idle ? STREAM_RES_STREAM_IDLE_TIMEOUT : STREAM_RES_UPSTREAM_TIMEOUT, why,
                     (struct http_slice){0});
    }
}

static void arm(struct session *s)
{
    struct mux_h2 *m = s->mux2;
    enum deadline kind;
    uint64_t d = deadline(s, &kind), now = loop_now_ms(s->host->loop);
    if (d == 0) {
        loop_timer_stop(s->host->loop, &m->tmr);
        return;
    }
    /* A timer due no later than the deadline stays: at worst it fires early and on_tmr() arms
     * it for what is due then. Traffic pushes the idle deadlines later on every pump, and
     * moving the timer in the loop's heap each time cost more than that rare early wake-up. */
    if (loop_timer_armed(&m->tmr) && m->tmr.due_ms <= d)
        return;
    loop_timer_start(s->host->loop, &m->tmr, d > now ? d - now : 0);
}

/* ---- the pump ---- */

/*
 * Reads end[0] unless its last read drained it (EAGAIN, or fewer bytes than asked with nothing
 * left inside TLS) and no event came for it since: the loop is level-triggered, so the event
 * comes when there is more, and the read that would only say EAGAIN is saved (a system call,
 * and for TLS an SSL_read). The pump runs for many reasons besides end[0]'s events (h2up's
 * callbacks through kick(), timers), each of which used to try a read. Returns what
 * xprt_read() does; -EAGAIN adds the events to wait for to *<wants>.
 */
static ssize_t down_read(struct session *s, unsigned *wants)
{
    struct mux_h2 *m = s->mux2;
    if (s->end[0].io.fired & (LOOP_READ | LOOP_ERROR | m->rd_wants))
        m->rd_ok = 1;
    s->end[0].io.fired = 0;
    if (!m->rd_ok) {
        *wants |= m->rd_wants;
        return -EAGAIN;
    }
    ssize_t n = xprt_read(&s->end[0], m->rbuf, sizeof(m->rbuf));
    if (n == -EAGAIN) {
        m->rd_ok = 0;
        m->rd_wants = xprt_wants(&s->end[0], LOOP_READ);
        *wants |= m->rd_wants;
    } else if (n > 0 && (size_t)n < sizeof(m->rbuf) && !xprt_pending(&s->end[0])) {
        m->rd_ok = 0;
        m->rd_wants = LOOP_READ;
    }
    return n;
}

/* Moves what <h> has to send into <b> (up to OUT_MAX). Returns 1 when bytes moved, 0, or -1
 * when the session failed. */
static int fill(struct h2_session *h, struct buf *b)
{
    int moved = 0;
    while (b->len < OUT_MAX && h2_wants_write(h)) {
        buf_reserve(b, b->len + IO_CHUNK);
        ssize_t k = h2_output(h, (uint8_t *)b->p + b->len, b->cap - b->len);
        if (k < 0)
            return -1;
        if (k == 0)
            break;
        b->len += (size_t)k;
        moved = 1;
    }
    return moved;
}

static void caller_failed(struct session *s)
{
    struct mux_h2 *m = s->mux2;
    if (m->down_failed)
        return;
    m->down_failed = 1;
    const char *e = h2_error(m->down);
    const struct h2_stats *st = h2_get_stats(m->down);
    LOG_WARN("conn=%llu %s src=%s: HTTP/2 connection ended: %s (streams %llu, resets received "
             "%llu, refused %llu)",
             (unsigned long long)s->id, s->inbound ? "in" : "out",
             LOG_ESC(s->inbound ? s->caller : s->peer), LOG_ESC(e != NULL ? e : "error"),
             (unsigned long long)st->streams_opened, (unsigned long long)st->resets_received,
             (unsigned long long)st->streams_refused);
    STAT_ADD(s->host->stats->counters.h2_protocol_closed, 1);
}

static void pump_rounds(struct session *s);

static void pump(struct session *s)
{
    struct mux_h2 *m = s->mux2;
    m->in_pump++;
    pump_rounds(s);
    /* The session may be finished, but its mux outlives this call (the reap is deferred). */
    m->in_pump--;
}

static void pump_rounds(struct session *s)
{
    struct mux_h2 *m = s->mux2;
    for (;;) {
        int progress = 0;
        unsigned wants = 0;
        ssize_t n;
        if (m->h1up)
            h1_dial_next(s);
        else
            retry_streams(s);
        if (s->state == S_DONE)
            return;
        /* Downstream: read while what we owe it is under the bound. */
        if (!m->down_failed && m->cout.len < OUT_MAX && h2_wants_read(m->down)) {
            n = down_read(s, &wants);
            if (n > 0) {
                s->bytes[0] += (uint64_t)n;
                STAT_ADD(s->lstat->bytes_in, (uint64_t)n);
                if (h2_feed(m->down, m->rbuf, (size_t)n) < 0)
                    caller_failed(s);
                progress = 1;
            } else if (n == 0) {
                session_finish(s, SESSION_RES_OK, "closed");
                return;
            } else if (n != -EAGAIN) {
                session_finish(s, SESSION_RES_ERROR, xprt_error(&s->end[0], (int)n));
                return;
            }
        }
        if (legs_pump(s))
            progress = 1;
        if (s->state == S_DONE)
            return;
        int f = fill(m->down, &m->cout);
        if (f < 0)
            caller_failed(s);
        else if (f > 0)
            progress = 1;
        if (m->cout.len > 0) {
            n = xprt_write(&s->end[0], m->cout.p, m->cout.len);
            if (n > 0) {
                buf_consume(&m->cout, (size_t)n);
                s->bytes[1] += (uint64_t)n;
                STAT_ADD(s->lstat->bytes_out, (uint64_t)n);
                progress = 1;
            } else if (n == -EAGAIN) {
                wants |= xprt_wants(&s->end[0], LOOP_WRITE);
            } else {
                session_finish(s, SESSION_RES_ERROR, xprt_error(&s->end[0], (int)n));
                return;
            }
        }
        if (m->cout.len == 0 &&
            (m->down_failed || (!h2_wants_read(m->down) && !h2_wants_write(m->down)))) {
            /* A connection error nghttp2 found inside a frame ends here, its GOAWAY sent. */
            if (!m->down_failed && h2_error(m->down) != NULL)
                caller_failed(s);
            const char *e = h2_error(m->down);
            session_finish(s, m->down_failed ? SESSION_RES_ERROR : SESSION_RES_OK,
                           e != NULL ? e : "HTTP/2 session done");
            return;
        }
        if (m->draining && m->streams == NULL && m->cout.len == 0 && !h2_wants_write(m->down)) {
            session_finish(s, SESSION_RES_OK, "drained: GOAWAY sent, every stream finished");
            return;
        }
        if (s->state == S_DONE)
            return;
        if (progress) {
            s->last_io_ms = loop_now_ms(s->host->loop);
            m->again = 0;
            continue;
        }
        if (m->again) {
            m->again = 0;
            continue;
        }
        arm(s);
        session_want(s, 0, wants);
        return;
    }
}

static void on_kick(struct loop_defer *d)
{
    struct mux_h2 *m = (struct mux_h2 *)((char *)d - offsetof(struct mux_h2, kick));
    if (m->s->state != S_DONE)
        pump(m->s);
}

/*
 * Runs the pump after the loop's current round: h2up calls the stream's owner from the shared
 * connection's I/O handler, maybe many times in one read, and one pump serves them all. The
 * session's reap is queued behind (loop_defer is first in, first out) when it finishes
 * meanwhile, so the mux outlives this call.
 */
static void kick(struct session *s)
{
    if (s->state == S_DONE)
        return;
    /* From inside the pump (a dial that completed at once, from a stream's head): one more
     * round of it does the same, without a second pump from the loop. */
    if (s->mux2->in_pump > 0)
        s->mux2->again = 1;
    else
        loop_defer(s->host->loop, &s->mux2->kick, on_kick);
}

/* end[0]'s events: the codec's own callback, since during an outbound dial the session's
 * state belongs to the dial. */
static void down_io(struct loop_io *io, unsigned events)
{
    struct session *s = io->data;
    (void)events;
    if (s->state != S_DONE)
        pump(s);
}

/* ---- the carrier ---- */

static void mux_free(struct mux_h2 *m)
{
    if (m == NULL)
        return;
    loop_timer_stop(m->s->host->loop, &m->tmr);
    while (m->streams != NULL)
        stream_free(m, m->streams);
    h2_session_free(m->down);
    buf_free(&m->cout);
    free(m);
}

static void mux_advance(struct session *s)
{
    pump(s);
}

static void on_tmr(struct loop_timer *t)
{
    struct session *s = t->data;
    struct mux_h2 *m = s->mux2;
    enum deadline kind;
    uint64_t now = loop_now_ms(s->host->loop);
    uint64_t d = deadline(s, &kind);
    uint32_t idle = session_idle_timeout_ms(s);
    char why[400];
    if (s->state == S_DONE)
        return;
    if (d == 0 || d > now) {
        arm(s);
        return;
    }
    const struct proxy_cfg *c = &s->snap->cfg;
    switch (kind) {
    case DL_CONNECT:
        snprintf(why, sizeof(why), "connect %s timed out (local_connect_timeout_ms %lu)",
                 s->ep_name, (unsigned long)c->local_connect_timeout_ms);
        for (struct h2s *x = m->streams; x != NULL; x = x->next)
            if (x->h1 != NULL && !x->h1->connected &&
                x->h1->connect_start_ms + c->local_connect_timeout_ms <= now)
                leg_fail(s, x, STREAM_RES_LOCAL_CONNECT_ERROR, why);
        break;
    case DL_REQUEST:
        snprintf(why, sizeof(why), "no complete answer in %lu ms (local_request_timeout_ms)",
                 (unsigned long)c->local_request_timeout_ms);
        for (struct h2s *x = m->streams; x != NULL; x = x->next)
            if (x->app_open && x->req_end_ms != 0 && !x->res_eof &&
                x->req_end_ms + c->local_request_timeout_ms <= now)
                local_answer(s, x, STREAM_RES_LOCAL_TIMEOUT, why, (struct http_slice){0});
        break;
    case DL_STREAM_IDLE:
        /* Envoy's stream_idle_timeout: one stalled stream ends, its siblings go on. */
        snprintf(why, sizeof(why), "stream idle for %lu ms (%s)", (unsigned long)idle,
                 s->inbound ? "local_idle_timeout_ms" : "the upstream's idle_timeout_ms");
        for (struct h2s *x = m->streams; x != NULL; x = x->next) {
            if (x->last_ms + idle > now)
                continue;
            if (req_wanted(x)) {
                local_answer(s, x, STREAM_RES_LOCAL_TIMEOUT, why, (struct http_slice){0});
            } else {
                /* Answered, but the downstream peer does not take the rest. */
                set_why(x, why);
                x->local = 1;
                x->result = STREAM_RES_ABORTED;
                h2_submit_rst(m->down, x->cid, H2_CANCEL);
            }
            x->last_ms = now; /* the answer (or reset) gets its own period to go out */
        }
        break;
    case DL_ROUTE:
    case DL_ROUTE_IDLE:
        route_timed_out(s, kind == DL_ROUTE_IDLE, now);
        break;
    case DL_BACKOFF:
        /* It counts as a retry from here: one the timeout cut during its back-off never was. */
        for (struct h2s *x = m->streams; x != NULL; x = x->next) {
            if (x->backoff_until_ms == 0 || x->backoff_until_ms > now)
                continue;
            x->backoff_until_ms = 0;
            x->st.retries++;
            STAT_ADD(s->host->stats->upstream_retries, 1);
            x->waiting = 1;
            x->policy_retry = 1;
            x->last_ms = now;
        }
        if (!m->h1up && !m->dialling)
            start_dial(s);
        break;
    case DL_IDLE:
        snprintf(why, sizeof(why), "idle for %llu ms (local_idle_timeout_ms)",
                 (unsigned long long)(now - s->last_io_ms));
        session_finish(s, SESSION_RES_IDLE_TIMEOUT, why);
        return;
    default:
        return;
    }
    pump(s);
}

static void mux_on_timer(struct session *s)
{
    on_tmr(&s->mux2->tmr);
}

static void mux_start(struct session *s)
{
    struct mux_h2 *m = xcalloc(1, sizeof(*m));
    const struct proxy_cfg *c = &s->snap->cfg;
    m->s = s;
    m->outbound = !s->inbound;
    m->h1up = m->outbound && s->up->protocol == PROTO_HTTP;
    s->mux2 = m;
    s->mux2_free = mux_free;
    s->carrier = &mux_h2_mux;
    session_set_state(s, S_HTTP);
    loop_timer_stop(s->host->loop, &s->timer);
    loop_timer_init(&m->tmr, on_tmr, s);
    /* end[0] gets the codec's own callback (see down_io). */
    loop_io_want(s->host->loop, &s->end[0].io, 0);
    loop_io_init(&s->end[0].io, s->end[0].fd, down_io, s);
    /* Read at once (bytes may have come with the preface), then only as down_read() says;
     * a TLS end is read a socketful at a time. */
    m->rd_ok = 1;
    m->rd_wants = LOOP_READ;
    if (!m->outbound && s->end[0].tls != NULL) {
        stream_xfcc(s, m->xfcc, sizeof(m->xfcc));
        m->xfcc_len = strlen(m->xfcc);
        m->xfcc_ok = h2_value_ok(m->xfcc, m->xfcc_len);
    }
    struct h2_limits lim = {.max_header_list_bytes = c->max_request_headers_kb * 1024u};
    m->down = h2_session_new(H2_SERVER, &lim, &down_cb, s);
    s->last_io_ms = loop_now_ms(s->host->loop);
    /* The preface read to tell HTTP/2 from HTTP/1 (session.c's sniffing) goes first. */
    if (s->buf[0].len > 0 &&
        h2_feed(m->down, (const uint8_t *)s->buf[0].data + s->buf[0].off, s->buf[0].len) < 0)
        caller_failed(s);
    s->buf[0].len = 0;
    s->buf[0].off = 0;
    session_buf_give_back(s->host, &s->buf[0]);
    pump(s);
}

/* The session ends for any reason: each open stream gets its record, and its upstream stream
 * is cancelled (no callback reaches this session after). */
static void mux_on_finish(struct session *s, const char *reason)
{
    struct mux_h2 *m = s->mux2;
    if (m == NULL)
        return;
    loop_timer_stop(s->host->loop, &m->tmr);
    for (struct h2s *x = m->streams; x != NULL; x = x->next) {
        leg_close(s, x);
        if (x->us != NULL) {
            h2up_cancel(x->us, H2_CANCEL);
            x->us = NULL;
        }
    }
    for (struct h2s *x = m->streams; x != NULL; x = x->next)
        finish_stream(s, x,
                      x->local && x->res_eof && x->resb.len == 0 ? x->result : STREAM_RES_ABORTED,
                      x->why[0] ? x->why : reason);
}

/* connectd drains: GOAWAY to the peer (it opens no more streams), the open ones finish, then
 * the connection closes (pump). */
static void mux_drain(struct session *s)
{
    struct mux_h2 *m = s->mux2;
    if (m == NULL || m->draining)
        return;
    m->draining = 1;
    h2_shutdown(m->down);
    pump(s);
}

const struct session_mux mux_h2_mux = {
    .name = "http2",
    .start = mux_start,
    .advance = mux_advance,
    .on_timer = mux_on_timer,
    .on_finish = mux_on_finish,
    .dialled = mux_dialled,
    .drain = mux_drain,
};
