/*
 * mux_h1: the inbound HTTP/1.1 codec. One connection from a caller (the TLS end, end[0]) and
 * at most one plain HTTP/1.1 connection to the local application (end[1]), dialled on the
 * first allowed request and kept alive while both sides allow it. Requests are served one at
 * a time, in order: the next head is read only once the current response is complete, so
 * pipelined requests wait in the caller's buffer (or its socket) and are answered in order.
 *
 *        .------------------------------------------------------------------.
 *        v                                                                  |
 *   HEAD --head--> authorize --allow--> (CONNECT) --> EXCHANGE --response done, keep-alive
 *    |                |                    |             |  \--101 / 2xx to CONNECT--> relay.c
 *    |                '--deny--> LOCAL 403 '--fail--> LOCAL 503         (a raw tunnel)
 *    |                           (request body read and dropped)  |
 *    |   EXCHANGE --bad answer / timeout--> LOCAL 502 / 504       |
 *    |   EXCHANGE --outbound, retried--> BACKOFF --> (DIAL) --> EXCHANGE (resend)
 *    |   LOCAL --written--> HEAD (keep-alive) or CLOSING          |
 *    '--malformed 400 / too large 431 / slow 408 / bad Expect 417--> LOCAL --> CLOSING
 *   CLOSING: the answer written, close_notify sent, the caller's bytes read and dropped
 *   (at most LINGER_BYTES for LINGER_MS, so the answer is not lost to a reset) --> DONE
 *   the caller closing between requests, or an error mid-stream --> DONE
 *
 * Framing (RFC 9112): heads are parsed with h1parse (strict: smuggling-prone heads are 400).
 * Bodies are passed through with their framing: Content-Length bodies byte for byte, chunked
 * bodies as sent but run through h1_chunked_decode(), which validates them and finds their
 * end (the serializer drops Transfer-Encoding as hop-by-hop, so "chunked" is added back). A
 * chunked response to an HTTP/1.0 caller is decoded and sent until close instead. A response
 * without framing runs until the application closes, then the caller's connection closes.
 *
 * Back-pressure: a side is read only while the buffer its bytes go to holds less than
 * IO_CHUNK; heads may grow a buffer up to their limit (max_request_headers_kb for requests,
 * H1_HEAD_MAX for responses). Buffers (the worker's pooled 16 KiB ones) go back whenever the
 * codec waits with them empty, so an idle keep-alive connection holds none.
 *
 * Events: the loop is level-triggered, so an end is read only after an event for it or a read
 * that filled what was asked (end_read()); the caller's read interest stays registered while
 * an answer is awaited. A keep-alive request costs one read and one write per leg.
 *
 * HTTP/2 far side (an http2 or grpc service or upstream): end[1] stays closed; each request is
 * a stream on a shared h2up connection (h2c to the application inbound, session_dial_h2()
 * outbound), its head translated by open_stream() and its bodies moved by exchange_h2() (the
 * request's into aout, which the stream's read_body drains; the answer's DATA through ain,
 * re-framed for the caller). The stream's callbacks only note what happened and kick the pump.
 *
 * Reuse: a request on a connection that carried an answer before is held (at most
 * REPLAY_MAX) until its answer's first byte; if the connection ends before that byte (its peer
 * closed it as idle while the request was on its way), the request is sent once more on a new
 * connection (retry()). Over HTTP/2 the same holds for a stream refused unprocessed or lost
 * with its connection before a byte of its answer (retry_h2()).
 *
 * Outbound retries (route_policy_start()): the route's NumRetries / RetryOn / RetryOnStatusCodes
 * / RetryOnConnectFailure hold the request in the same replay copy (at most the upstream's
 * retry_buffer_bytes) until the answer's final head, which is dropped unseen when the policy
 * retries it; the request goes again after a jittered back-off (BACKOFF), to an endpoint not
 * used yet when one is left (session_redial_retry()). The route's RequestTimeout (else the
 * resolver's, else 15 s) bounds the whole request, retries included, from its end to the end
 * of the answer; its IdleTimeout cuts a stream that moves nothing.
 *
 * Expect: 100-continue is forwarded: the application's 100 goes back to the caller as an
 * interim response. To an HTTP/2 far side connectd sends the 100 itself once the stream is
 * open and forwards no expectation, as Envoy does by default. A request refused locally (403, 503)
 * that expects 100-continue and has a body closes the connection after the answer, since the caller
 * may or may not send the body.
 *
 * Timers (the session's one state timer): request_headers_timeout_ms from a head's first byte
 * (408), local_connect_timeout_ms (503), local_request_timeout_ms from the end of the request
 * to the end of the response (504 before its head, else the connection is cut), and the idle
 * timeout (local_idle_timeout_ms) otherwise; outbound also the route's timeouts and a retry's
 * back-off (outbound_deadline()). The timer is started for the earliest deadline
 * and, when it fires early, re-armed for the rest, so moving bytes does not touch the heap.
 */
#include "mux_h1.h"
#include "h1parse.h"
#include "h2.h"
#include "h2up.h"
#include "log.h"
#include "pathnorm.h"
#include "relay.h"
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

#define IO_CHUNK     16384
#define MAX_HEADERS  100 /* Envoy's max_headers_count default; one more is 431 */
#define LINGER_MS    1000
#define LINGER_BYTES (256u * 1024u)
#define REPLAY_MAX   (64u * 1024u) /* inbound: a request held for a retry: head and body */
#define INTERIM_MAX  H1_HEAD_MAX   /* unwritten bytes past which a 1xx answer is dropped */

struct buf {
    char *p;
    size_t len, cap;
    /* The worker whose pool (session_buf_take()) lends buffers of SESSION_RELAY_BUF_BYTES,
     * so a keep-alive connection's buffers, let go while it waits, cost no malloc() each
     * request; NULL: plain heap buffers. */
    struct session_host *pool;
};

enum phase {
    P_HEAD,
    P_CONNECT,
    P_DIAL, /* outbound: session_dial_upstream() owns end[1] and the timer */
    P_EXCHANGE,
    P_BACKOFF, /* outbound: a retry waits its back-off (the timer is the codec's) */
    P_LOCAL,
    P_CLOSING,
};

enum deadline {
    DL_NONE,
    DL_IDLE,
    DL_HEAD,
    DL_CONNECT,
    DL_RESPONSE,
    DL_ROUTE,      /* outbound: the route's RequestTimeout */
    DL_ROUTE_IDLE, /* outbound: the route's IdleTimeout */
    DL_BACKOFF,
    DL_LINGER,
};

/* One message body being carried (or dropped). */
struct body {
    enum http_framing framing;
    uint64_t remaining; /* HTTP_BODY_LENGTH */
    struct h1_chunked ch;
    int dechunk; /* forward only the chunks' data */
    int done;
};

struct mux_h1 {
    enum phase phase;
    int outbound;    /* the application is end[0] (plain) and the upstream end[1] (mTLS) */
    int in_pump;     /* pump() is running: a dial result inside it must not run it again */
    struct buf cin;  /* read from the caller, not consumed yet */
    struct buf cout; /* to write to the caller */
    struct buf ain;  /* read from the application */
    struct buf aout; /* to write to the application */
    size_t head_max;
    struct stream st;
    uint64_t nstreams;
    uint64_t head_start_ms;    /* first byte of the head being read; 0 when none */
    uint64_t connect_start_ms; /* CONNECT */
    uint64_t req_sent_ms;      /* the whole request written to the application; 0 until */
    uint64_t linger_start_ms;
    size_t lingered;
    size_t scanned; /* cin bytes already searched for a blank line */
    /* The request being served (its head's slices are valid only until it is forwarded). */
    struct http_request rq;
    size_t rq_len;
    struct http_header rq_h[MAX_HEADERS];
    struct http_response rs;
    struct http_header rs_h[MAX_HEADERS];
    enum http_method method;
    int minor;         /* the request's HTTP/1.<minor> */
    int req_keep;      /* the caller allows another request after this one */
    int upgrade;       /* the request offers an Upgrade */
    int expect;        /* the request expects 100-continue */
    struct body req;   /* the request body: to the application, or dropped */
    struct body res;   /* the response body */
    int res_head_done; /* the final response head was written to cout */
    int app_keep;      /* the application allows another request on its connection */
    int app_wr_dead;   /* writing to the application failed: the rest is dropped */
    int app_writable;  /* end[1] reported writable (CONNECT) */
    int close_after;   /* close the caller's connection once the current answer is out */
    enum stream_result local_result;
    char why[256];              /* the reason of the current local answer / close */
    uint64_t armed_at;          /* the deadline the timer is armed for; 0 when not armed */
    char xfcc[STREAM_XFCC_MAX]; /* X-Forwarded-Client-Cert for every request of the connection */
    /* The field as every request adds it: checked once (h1_field_ok()), then HTTP_HDR_H1OK. */
    struct http_header xfcc_field;
    struct buf target; /* the request's normalized target (forwarded, or a redirect's) */
    /* The keep-alive race: a request sent on a reused connection (end[1] served an answer
     * before, here or in the pool) that the peer closed at that moment is lost before any
     * byte of its answer, and can be sent again on a new connection. */
    uint64_t app_served; /* answers end[1] carried in full; 0 for a new connection */
    struct buf replay;   /* every byte queued to end[1] for this request, while replay_ok */
    int replay_ok;       /* replay holds the whole request so far (at most REPLAY_MAX) */
    int app_heard;       /* a byte of this request's answer (even a 1xx) came from end[1] */
    int retried;         /* this request was sent again once already (the keep-alive race) */
    int resend;          /* the connection being made sends replay, not the request head */
    size_t replay_max;   /* outbound the upstream's retry_buffer_bytes, else REPLAY_MAX */
    /* Outbound: the current request's retry policy and timeouts, from its route
     * (route_policy_start(), route.h). */
    struct route_policy pol;
    uint64_t req_done_ms;      /* the request was whole (the route timeout runs from here) */
    uint64_t backoff_until_ms; /* P_BACKOFF: when the next attempt is dialled */
    int draining;              /* connectd drains: the current request is the last */
    /* Outbound: the route and split the current request took (route.h; in s->up->routes,
     * valid for the session's snapshot); NULL without a route table. */
    const struct route *route;
    const struct route_split *split;
    /* The Set-Cookie value the response carries when a cookie hash policy generated the
     * request's cookie ("" when none; session_lb_request()). */
    char lb_cookie[512];
    /* The far side speaks HTTP/2 (an http2 or grpc service or upstream): each request is a
     * stream on a connection the worker's sessions share (h2up), end[1] stays closed, aout
     * holds the request body's data for read_body and ain the response's DATA. */
    int h2;
    struct session *sess;    /* the session this is the codec of */
    struct h2up_stream *h2s; /* the current request's stream; NULL when none or gone */
    struct loop_defer kick;  /* runs pump() after a stream callback changed something */
    int h2_deferred;         /* read_body said H2_BODY_DEFER: resume when bytes come */
    int h2_end;              /* the far side's END_STREAM */
    int h2_closed;           /* on_close came: h2_code, h2_up and h2_why say how */
    uint32_t h2_code;
    int h2_up;           /* the stream's connection had heard from its peer */
    char h2_why[160];    /* on_close's words */
    int te_trailers;     /* the caller sent TE: trailers */
    int res_chunked;     /* the answer to the caller is chunked by us */
    struct buf trailers; /* the answer's trailers, serialized, for a chunked answer */
    char res_len[24];    /* the Content-Length value we write */
    /* The stream's head as sent (h2hd: slices into h2held, fields in h2f), kept so that a
     * stream the far side refused unprocessed can be opened again; replay then holds the
     * body bytes read_body gave (replay_ok as for HTTP/1.1), sent again from replay_off. */
    struct h2_out_head h2hd;
    struct http_header *h2f; /* h2f_cap slots, taken by the first stream */
    size_t h2f_cap;
    struct buf h2held;
    int h2_has_body;
    size_t replay_off;
    /* Reads that would only say EAGAIN are not made (see end_read()): end i may have bytes
     * (an event came for it, or its last read filled what was asked), and what its last
     * unfinished read waits for. ev0: an event came for end[0] and end[0] was not read
     * since. */
    unsigned char rd_ok[2];
    unsigned rd_wants[2];
    int ev0;
};

/* ---- buffers ---- */

static void buf_reserve(struct buf *b, size_t need)
{
    if (b->cap >= need)
        return;
    if (b->p == NULL && b->pool != NULL && need <= SESSION_RELAY_BUF_BYTES) {
        struct relay_buf rb = {0};
        session_buf_take(b->pool, &rb);
        b->p = rb.data;
        b->cap = SESSION_RELAY_BUF_BYTES;
        return;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < need)
        cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
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

static void buf_add(struct buf *b, const void *p, size_t n)
{
    buf_reserve(b, b->len + n);
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void buf_release(struct buf *b)
{
    if (b->len != 0)
        return;
    if (b->p != NULL && b->pool != NULL && b->cap == SESSION_RELAY_BUF_BYTES) {
        struct relay_buf rb = {.data = b->p};
        session_buf_give_back(b->pool, &rb); /* the pool's, or freed when the pool is full */
    } else {
        free(b->p);
    }
    b->p = NULL;
    b->cap = 0;
}

/*
 * Appends the serialized head of <rq> (or, when it is NULL, of <rs>) with <nx> <extra> fields
 * to <b>, starting with <need> bytes of room and doubling until it fits. Returns the
 * serializer's length, or its error (-EINVAL: an extra field would inject one).
 */
static int append_head(struct buf *b, size_t need, const struct http_request *rq,
                       const struct http_response *rs, const struct http_header *extra, size_t nx)
{
    int n;
    for (;;) {
        buf_reserve(b, b->len + need);
        n = rq != NULL ? h1_write_request_head(b->p + b->len, b->cap - b->len, rq, extra, nx)
                       : h1_write_response_head(b->p + b->len, b->cap - b->len, rs, extra, nx);
        if (n != -ENOSPC)
            break;
        need *= 2;
    }
    if (n > 0)
        b->len += (size_t)n;
    return n;
}

/*
 * Keeps a copy of what was queued to the application (or upstream) since aout held <from>
 * bytes, while the request may still be sent again; past REPLAY_MAX it no longer can be.
 */
static void hold(struct mux_h1 *m, size_t from)
{
    size_t n = m->aout.len - from;
    if (!m->replay_ok || n == 0)
        return;
    if (m->replay.len + n > m->replay_max) {
        m->replay_ok = 0;
        m->replay.len = 0;
        buf_release(&m->replay);
        return;
    }
    buf_add(&m->replay, m->aout.p + from, n);
}

static void mux_free(struct mux_h1 *m)
{
    if (m == NULL)
        return;
    struct buf *all[] = {&m->cin,    &m->cout,   &m->ain,      &m->aout,
                         &m->target, &m->replay, &m->trailers, &m->h2held};
    for (size_t i = 0; i < ARRAY_SIZE(all); i++) {
        all[i]->len = 0;
        buf_release(all[i]);
    }
    free(m->h2f);
    free(m);
}

/* ---- bodies ---- */

static void body_init(struct body *b, enum http_framing f, uint64_t length)
{
    memset(b, 0, sizeof(*b));
    b->framing = f;
    b->remaining = length;
    h1_chunked_init(&b->ch);
    b->done = f == HTTP_BODY_NONE || (f == HTTP_BODY_LENGTH && length == 0);
}

/*
 * Moves body bytes from <in> to <out> (NULL drops them), at most what keeps <out> under
 * IO_CHUNK. Returns the bytes consumed from <in>, or -EBADMSG / -EMSGSIZE from the chunked
 * decoder (*<why> set). An until-close body takes everything; its end is the peer's EOF.
 */
static ssize_t body_move(struct body *b, struct buf *in, struct buf *out, const char **why)
{
    size_t room = out == NULL ? in->len : out->len < IO_CHUNK ? IO_CHUNK - out->len : 0;
    size_t avail = in->len < room ? in->len : room, used = 0;
    if (b->done || avail == 0)
        return 0;
    if (b->framing == HTTP_BODY_LENGTH || b->framing == HTTP_BODY_UNTIL_CLOSE) {
        size_t n = avail;
        if (b->framing == HTTP_BODY_LENGTH && b->remaining < n)
            n = (size_t)b->remaining;
        if (out != NULL)
            buf_add(out, in->p, n);
        if (b->framing == HTTP_BODY_LENGTH) {
            b->remaining -= n;
            b->done = b->remaining == 0;
        }
        buf_consume(in, n);
        return (ssize_t)n;
    }
    /* Chunked: the decoder consumes raw bytes and points at the data among them. */
    while (used < avail && !b->done) {
        struct http_slice data = {0};
        ssize_t n = h1_chunked_decode(&b->ch, in->p + used, avail - used, &data, why);
        if (n < 0)
            return n;
        if (n == 0)
            break;
        if (out != NULL && b->dechunk && data.len > 0)
            buf_add(out, data.p, data.len);
        else if (out != NULL && !b->dechunk)
            buf_add(out, in->p + used, (size_t)n);
        used += (size_t)n;
        b->done = h1_chunked_done(&b->ch);
    }
    buf_consume(in, used);
    return (ssize_t)used;
}

/*
 * Whether a head's blank line may have arrived: a LF followed by LF or CRLF at or after
 * <from>. The parser reads the whole buffer on each call, so it is called only when this is
 * true or the buffer is over the limit: a head sent a byte at a time costs linear time.
 */
static int blank_line(const struct buf *b, size_t from)
{
    const char *p = b->p + from, *end = b->p + b->len;
    while (p + 1 < end && (p = memchr(p, '\n', (size_t)(end - p - 1))) != NULL) {
        if (p[1] == '\n' || (p[1] == '\r' && p + 2 < end && p[2] == '\n'))
            return 1;
        p++;
    }
    return 0;
}

/* ---- I/O helpers ---- */

/*
 * Whether end <i>'s last read drained it (EAGAIN, or fewer bytes than asked with nothing left
 * inside TLS) and no event came for it since: the loop is level-triggered, so the event comes
 * when there is more, and a read now would only say EAGAIN. Then the events its last read
 * waits for are added to *<wants>.
 */
static int drained(struct mux_h1 *m, int i, unsigned *wants)
{
    if (m->rd_ok[i])
        return 0;
    *wants |= m->rd_wants[i];
    return 1;
}

/*
 * Reads from end <i>, unless it is drained(): the read that would only say EAGAIN is saved (a
 * syscall, and for TLS an SSL_read that takes and gives back a record buffer). Returns what
 * xprt_read() does; -EAGAIN adds the events to wait for to *<wants>.
 */
static ssize_t end_read(struct session *s, int i, void *p, size_t len, unsigned *wants)
{
    struct mux_h1 *m = s->mux;
    if (drained(m, i, wants))
        return -EAGAIN;
    ssize_t n = xprt_read(&s->end[i], p, len);
    if (i == 0)
        m->ev0 = 0; /* what the event announced was read */
    if (n == -EAGAIN) {
        m->rd_ok[i] = 0;
        m->rd_wants[i] = xprt_wants(&s->end[i], LOOP_READ);
        *wants |= m->rd_wants[i];
    } else if (n > 0 && (size_t)n < len && !xprt_pending(&s->end[i])) {
        m->rd_ok[i] = 0;
        m->rd_wants[i] = LOOP_READ;
    }
    return n;
}

/*
 * Reads from end <i> into <b>, at most <max> bytes in the buffer. Returns >0, 0 at EOF (the
 * end's rd_eof is set), -EAGAIN (the events to wait for are added to *<wants>), or an error.
 */
static ssize_t read_into(struct session *s, int i, struct buf *b, size_t max, unsigned *wants)
{
    if (b->len >= max)
        return -ENOBUFS;
    /* A drained end takes no buffer for a read end_read() would not make (a take and a
     * give-back from the pool, twice a request on each side). */
    if (drained(s->mux, i, wants))
        return -EAGAIN;
    size_t want = max - b->len < IO_CHUNK ? max - b->len : IO_CHUNK;
    buf_reserve(b, b->len + want);
    ssize_t n = end_read(s, i, b->p + b->len, want, wants);
    if (n > 0) {
        b->len += (size_t)n;
        if (i == 0) {
            s->bytes[0] += (uint64_t)n;
            STAT_ADD(s->lstat->bytes_in, (uint64_t)n);
        }
    } else if (n == 0) {
        s->end[i].rd_eof = 1;
    }
    return n;
}

/* Writes what <b> holds to end <i>. Returns >0, 0 when empty, -EAGAIN or an error. */
static ssize_t write_from(struct session *s, int i, struct buf *b, unsigned *wants)
{
    if (b->len == 0)
        return 0;
    ssize_t n = xprt_write(&s->end[i], b->p, b->len);
    if (n > 0) {
        buf_consume(b, (size_t)n);
        if (i == 0) {
            s->bytes[1] += (uint64_t)n;
            s->mux->st.bytes_out += (uint64_t)n;
            STAT_ADD(s->lstat->bytes_out, (uint64_t)n);
        }
    } else if (n == -EAGAIN) {
        *wants |= xprt_wants(&s->end[i], LOOP_WRITE);
    }
    return n;
}

/* Who answers the requests, for messages. */
static const char *far_side(const struct mux_h1 *m)
{
    return m->outbound ? "the upstream" : "the application";
}

static void close_app(struct session *s)
{
    struct mux_h1 *m = s->mux;
    if (m->h2s != NULL) {
        h2up_cancel(m->h2s, H2_CANCEL);
        m->h2s = NULL;
    }
    xprt_close(s->host->loop, &s->end[1]);
    m->ain.len = 0;
    m->aout.len = 0;
    m->app_writable = 0;
    m->app_keep = 0;
    m->app_served = 0;
}

/* ---- local answers ---- */

static const char *reason_phrase(int status)
{
    switch (status) {
    case 307:
        return "Temporary Redirect";
    case 400:
        return "Bad Request";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 408:
        return "Request Timeout";
    case 417:
        return "Expectation Failed";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    default:
        return "Error";
    }
}

static struct http_header *modified_fields(const struct mux_h1 *m, int response,
                                           const struct http_header *h, size_t n, size_t *out_n);

/*
 * Queues connectd's own answer <r> to the current stream and enters LOCAL. <close>: the
 * caller's connection closes after it (else the rest of the request body, m->req, is read and
 * dropped first). The stream finishes once the answer is written. Outbound, a request that
 * took a route gets its route's and split's ResponseHeaders on this answer too (a 503 or a
 * 504 for that route, not the 404 of no route), as Envoy finalizes a local reply's headers
 * with the route entry it selected.
 */
static void local_answer(struct session *s, enum stream_result r, int close, const char *why)
{
    struct mux_h1 *m = s->mux;
    int status = stream_result_status(r);
    const char *body = stream_local_body(r);
    /* 1xx already sent for this stream are fine; a final head is not (callers check). */
    if (!m->req_keep)
        close = 1;
    char head[256];
    int n = snprintf(head, sizeof(head), "HTTP/1.1 %d %s\r\ncontent-length: %zu\r\n", status,
                     reason_phrase(status), strlen(body));
    buf_add(&m->cout, head, (size_t)n);
    /* The fields a route's modifiers may touch; Content-Length and Connection they never do. */
    struct http_header f[2];
    size_t nf = 0;
    f[nf++] = (struct http_header){.name = {"content-type", 12}, .value = {"text/plain", 10}};
    if (r == STREAM_RES_REDIRECT) /* the normalized target: visible characters only */
        f[nf++] =
            (struct http_header){.name = {"location", 8}, .value = {m->target.p, m->target.len}};
    size_t nmf = 0;
    struct http_header *mf = m->outbound ? modified_fields(m, 1, f, nf, &nmf) : NULL;
    const struct http_header *out = mf != NULL ? mf : f;
    for (size_t i = 0, nout = mf != NULL ? nmf : nf; i < nout; i++) {
        if (out[i].flags & HTTP_HDR_HOP)
            continue; /* removed or replaced by the modifiers */
        buf_add(&m->cout, out[i].name.p, out[i].name.len);
        buf_add(&m->cout, ": ", 2);
        buf_add(&m->cout, out[i].value.p, out[i].value.len);
        buf_add(&m->cout, "\r\n", 2);
    }
    free(mf);
    n = snprintf(head, sizeof(head), "%s\r\n",
                 close           ? "connection: close\r\n"
                 : m->minor == 0 ? "connection: keep-alive\r\n"
                                 : "");
    buf_add(&m->cout, head, (size_t)n);
    buf_add(&m->cout, body, strlen(body));
    m->st.status = status;
    m->local_result = r;
    m->close_after = m->close_after || close;
    m->res_head_done = 1;
    snprintf(m->why, sizeof(m->why), "%s", why != NULL ? why : "");
    m->phase = P_LOCAL;
}

/* ---- the request head ---- */

/* Starts the next stream: buffers are let go when nothing is held. */
static void next_stream(struct session *s)
{
    struct mux_h1 *m = s->mux;
    m->phase = P_HEAD;
    m->scanned = 0;
    m->head_start_ms = m->cin.len > 0 ? loop_now_ms(s->host->loop) : 0;
    m->req_sent_ms = 0;
    m->res_head_done = 0;
    m->app_wr_dead = 0;
    m->close_after = 0;
    m->upgrade = m->expect = 0;
    m->why[0] = '\0';
    /* The last request's route lives in the snapshot it was routed on, which the session may
     * leave before the next request; a local answer before routing has none. */
    m->route = NULL;
    m->split = NULL;
    memset(&m->rq, 0, sizeof(m->rq));
    buf_release(&m->cin);
    buf_release(&m->cout);
    buf_release(&m->ain);
    buf_release(&m->aout);
    m->target.len = 0;
    buf_release(&m->target);
    m->replay.len = 0;
    buf_release(&m->replay);
    m->replay_ok = m->app_heard = m->retried = m->resend = 0;
    memset(&m->pol, 0, sizeof(m->pol));
    m->req_done_ms = m->backoff_until_ms = 0;
    m->h2_deferred = m->h2_end = m->h2_closed = m->h2_up = 0;
    m->h2_code = H2_NO_ERROR;
    m->te_trailers = m->res_chunked = 0;
    m->trailers.len = 0;
    buf_release(&m->trailers);
    m->h2held.len = 0;
    buf_release(&m->h2held);
    m->replay_off = 0;
}

static void app_on_io(struct loop_io *io, unsigned events);

static int connect_app(struct session *s)
{
    struct mux_h1 *m = s->mux;
    int fd = session_app_connect(s);
    if (fd < 0)
        return fd;
    memset(&s->end[1], 0, sizeof(s->end[1]));
    s->end[1].fd = fd;
    loop_io_init(&s->end[1].io, fd, app_on_io, s);
    m->rd_ok[1] = 1;
    m->app_writable = 0;
    m->app_keep = 1;
    m->app_served = 0;
    m->connect_start_ms = loop_now_ms(s->host->loop);
    m->phase = P_CONNECT;
    return 0;
}

/*
 * Appends a field of the codec's own to the caller's array <extra>, counted by its <nx>.
 * <fl> is HTTP_HDR_H1OK when the value is made of bytes known to be fit (a literal, digits,
 * a request id), so that the serializer does not check it again on every request.
 */
#define EXTRA(n, v, fl)                                                                            \
    (extra[nx++] = (struct http_header){                                                           \
         .name = {n, sizeof(n) - 1}, .value = {(v), strlen(v)}, .flags = (fl)})

/*
 * The fields every forwarded request gets, whatever the far side speaks: inbound, XFCC and
 * X-Forwarded-Proto replacing the caller's, and X-Request-Id kept or made. Fills <extra> (room
 * for 4) and returns their count; the caller's fields they replace are flagged hop-by-hop.
 */
static size_t forwarded_fields(struct session *s, struct http_header *extra)
{
    struct mux_h1 *m = s->mux;
    struct http_request *rq = &m->rq;
    size_t nx = 0;
    int have_id = 0;
    for (size_t i = 0; i < rq->nheaders; i++) {
        struct http_header *h = &rq->headers[i];
        /* The application must be able to trust these: what the caller sent is replaced.
         * Flagged hop-by-hop, the serializer leaves them out. */
        if (!m->outbound && (h1_slice_eq(h->name, "x-forwarded-client-cert") ||
                             h1_slice_eq(h->name, "x-forwarded-proto")))
            h->flags |= HTTP_HDR_HOP;
        else if (h1_slice_eq(h->name, "x-request-id") && h->value.len > 0 && !have_id)
            have_id = 1;
        else if (h1_slice_eq(h->name, "x-request-id"))
            h->flags |= HTTP_HDR_HOP; /* empty or repeated: one id only */
    }
    /* An exposed listener's caller has no certificate: no XFCC, and it came over plain HTTP. */
    if (!m->outbound && s->end[0].tls != NULL)
        extra[nx++] = m->xfcc_field;
    if (!m->outbound)
        EXTRA("X-Forwarded-Proto", s->end[0].tls != NULL ? "https" : "http", HTTP_HDR_H1OK);
    /* Outbound, the upstream's sidecar generates a missing id (adding one here could take
     * a head of 100 fields over its limit). */
    if (!have_id && !m->outbound) {
        stream_new_request_id(&m->st);
        EXTRA("X-Request-Id", m->st.request_id, HTTP_HDR_H1OK);
    }
    return nx;
}

static void rewrite_target(struct mux_h1 *m, struct http_request *rq);

/*
 * Serializes the request being served into aout for the application, with XFCC, X-Forwarded-
 * Proto and X-Request-Id, consumes its head from cin and enters EXCHANGE.
 */
static void forward_head(struct session *s)
{
    struct mux_h1 *m = s->mux;
    struct http_request *rq = &m->rq;
    struct http_header extra[8];
    size_t nx = forwarded_fields(s, extra);
    /* Outbound, an HTTP/1.0 request without Host gets the upstream's name, which the next
     * hop (HTTP/1.1) requires. */
    if (m->outbound && rq->host.p == NULL)
        EXTRA("Host", s->up->cfg->destination_name, 0);
    if (rq->framing == HTTP_BODY_CHUNKED)
        EXTRA("Transfer-Encoding", "chunked", HTTP_HDR_H1OK);
    if (m->upgrade) {
        EXTRA("Connection", "upgrade", HTTP_HDR_H1OK);
        extra[nx++] = (struct http_header){.name = {"Upgrade", 7}, .value = rq->upgrade};
    }
    /* Outbound, the route's PrefixRewrite and header modifiers (the caller's fields are
     * restored after: a retry's held bytes are the modified head). */
    struct http_header *caller = rq->headers, *mf = NULL;
    size_t ncaller = rq->nheaders, nmf = 0;
    if (m->outbound) {
        rewrite_target(m, rq);
        mf = modified_fields(m, 0, rq->headers, rq->nheaders, &nmf);
        if (mf != NULL) {
            rq->headers = mf;
            rq->nheaders = nmf;
        }
    }
    size_t from = m->aout.len, room = m->rq_len + m->target.len + 1024 + m->xfcc_field.value.len;
    int rc = append_head(&m->aout, room, rq, NULL, extra, nx);
    rq->headers = caller;
    rq->nheaders = ncaller;
    free(mf);
    if (rc < 0) {
        local_answer(s, STREAM_RES_BAD_REQUEST, 1, "the request head cannot be forwarded");
        return;
    }
    /* Only a reused connection may have been closed by its peer while idle: a request on it
     * is held until its answer starts, so that it can be sent again (see retry()). */
    m->replay.len = 0;
    m->replay_ok = (m->app_served > 0 && !m->retried) || m->pol.retries_left > 0;
    hold(m, from);
    buf_consume(&m->cin, m->rq_len);
    m->rq_len = 0;              /* what a failure before the answer must still drop from cin */
    memset(rq, 0, sizeof(*rq)); /* its slices pointed into cin */
    m->res_head_done = 0;
    m->phase = P_EXCHANGE;
}

/*
 * The new connection of a retry is up: the held request goes out again, byte for byte. It
 * stays held (replay), so that a retry policy can send it once more; what of its body comes
 * later is added to it by hold() as before.
 */
static void resend(struct session *s)
{
    struct mux_h1 *m = s->mux;
    m->aout.len = 0; /* close_app() emptied it */
    buf_add(&m->aout, m->replay.p, m->replay.len);
    m->resend = 0;
    m->res_head_done = 0;
    m->phase = P_EXCHANGE;
}

/* A connection for the current request is up: its head goes out, or a retry's bytes. */
static void send_request(struct session *s)
{
    if (s->mux->resend)
        resend(s);
    else
        forward_head(s);
}

/*
 * The keep-alive race (RFC 9112 section 9.3.1): the request went out on a connection that had
 * carried answers before, and that connection ended (<what>) before any byte of this one's:
 * its peer most likely closed it as idle while the request was on its way, so nobody acted on
 * the request. It is sent once more, as it was, on a new connection (outbound a fresh dial, not
 * another pooled one, which may have idled as long), as Envoy does. Only a request held in
 * full (replay_ok) is retried, and never twice: a new connection that fails the same way is a
 * real failure, answered as before.
 */
static void retry(struct session *s, const char *what)
{
    struct mux_h1 *m = s->mux;
    LOG_DEBUG("conn=%llu stream=%llu %s %s before any answer on a reused connection: sending "
              "the request again on a new one",
              (unsigned long long)s->id, (unsigned long long)m->st.seq, far_side(m), what);
    m->retried = 1;
    m->resend = 1;
    /* Before any answer these were set only by a failed write to the lost connection. */
    m->app_wr_dead = 0;
    m->close_after = 0;
    m->req_sent_ms = 0;
    close_app(s);
    if (m->outbound) {
        m->phase = P_DIAL;
        session_redial_upstream(s);
        return;
    }
    int rc = connect_app(s);
    if (rc < 0) {
        char msg[400];
        snprintf(msg, sizeof(msg), "connect %s: %s", s->ep_name, util_strerror(rc));
        local_answer(s, STREAM_RES_LOCAL_CONNECT_ERROR, m->expect && !m->req.done, msg);
    }
}

/* ---- outbound retries and route timeouts ---- */

static void abort_conn(struct session *s, enum session_result r, const char *why);

/* The retry policy and timeouts of the request just routed (m->route, s->dial_rs;
 * route_policy_init()). */
static void route_policy_start(struct session *s)
{
    struct mux_h1 *m = s->mux;
    route_policy_init(&m->pol, m->route, s->dial_rs);
    m->req_done_ms = 0;
}

/* The held copy of the request is no longer needed: no retry of any kind will send it. */
static void replay_drop(struct mux_h1 *m)
{
    m->replay_ok = 0;
    m->replay.len = 0;
    buf_release(&m->replay);
}

/* The route deadline (absolute ms) of the current request, 0 while it runs from no point yet. */
static uint64_t route_deadline(const struct mux_h1 *m)
{
    if (!m->outbound || m->pol.timeout_ms == 0 || m->req_done_ms == 0)
        return 0;
    return m->req_done_ms + m->pol.timeout_ms;
}

/* Notes when the request became whole: the route timeout runs from there (Envoy's route
 * timeout spans from the end of the downstream request to the end of the response). */
static void note_request_done(struct session *s)
{
    struct mux_h1 *m = s->mux;
    if (m->outbound && m->req.done && m->req_done_ms == 0)
        m->req_done_ms = loop_now_ms(s->host->loop);
}

/*
 * Whether the policy may send the request once more: retries left, the whole request held
 * (body received in full and within the retry buffer, nothing of the answer passed on), and
 * time left before the route's deadline. <sent>: the request went out (else a dial failed and
 * nothing of it was sent, so nothing needs to be held).
 */
static int retry_allowed(struct session *s, int sent)
{
    struct mux_h1 *m = s->mux;
    if (!m->outbound || m->pol.retries_left == 0 || m->upgrade || m->method == HTTP_METHOD_CONNECT)
        return 0;
    if (sent && (!m->replay_ok || !m->req.done || m->res_head_done))
        return 0;
    /* Over HTTP/2 the copy is made as the stream reads the body: it must have read it all. */
    if (sent && m->h2 && m->aout.len > 0)
        return 0;
    uint64_t dl = route_deadline(m);
    return dl == 0 || loop_now_ms(s->host->loop) < dl;
}

/*
 * The policy sends the request again (<what> failed): the connection that failed is closed
 * (an answer read from it is dropped unseen), and after a back-off, a random wait below 25 ms
 * doubled per retry (at most 250 ms), a new connection to an endpoint not tried yet when one
 * is left (session_redial_retry()) carries the held request. <sent>: the request had gone out
 * (it is resent from replay), else a dial failed and it goes out as it would have.
 */
static void retry_backoff(struct session *s, int sent, const char *what)
{
    struct mux_h1 *m = s->mux;
    uint64_t wait_ms = route_policy_backoff_ms(&m->pol, util_rand());
    LOG_DEBUG("conn=%llu stream=%llu upstream %s %s: retrying in %llu ms (%u more allowed)",
              (unsigned long long)s->id, (unsigned long long)m->st.seq, LOG_ESC(s->ep_name), what,
              (unsigned long long)wait_ms, m->pol.retries_left);
    close_app(s);
    m->app_heard = 0;
    m->app_wr_dead = 0;
    m->close_after = 0;
    m->req_sent_ms = 0;
    m->res_head_done = 0;
    if (sent && m->h2)
        m->retried = 1; /* open_stream() opens the held head again, read_body the held body */
    else if (sent)
        m->resend = 1;
    loop_timer_stop(s->host->loop, &s->timer);
    m->armed_at = 0;
    m->backoff_until_ms = loop_now_ms(s->host->loop) + wait_ms;
    m->phase = P_BACKOFF;
}

/* The back-off is over: the next attempt is dialled (its result comes to mux_dialled()). It
 * counts as a retry from here: one the route's timeout cut during its back-off never was. */
static void retry_attempt(struct session *s)
{
    s->mux->st.retries++;
    STAT_ADD(s->host->stats->upstream_retries, 1);
    s->mux->phase = P_DIAL;
    session_redial_retry(s);
}

/*
 * A final answer's head (parsed into m->rs, still in ain) came before any byte of it went to
 * the application: when the policy retries it, it is dropped and the request goes again
 * (1); else the held copy of the request goes (0).
 */
static int retry_on_answer(struct session *s)
{
    struct mux_h1 *m = s->mux;
    int st = m->rs.status;
    if (st < 200 && st != 101)
        return 0; /* an interim answer: the final one decides */
    if (st != 101 && retry_allowed(s, 1) &&
        route_policy_retries_status(&m->pol, st, m->rs.headers, m->rs.nheaders)) {
        /* Passive health sees every answer, the retried ones too (as Envoy's outlier
         * detection counts each attempt). */
        session_outlier_report(s, st >= 500);
        char what[64];
        snprintf(what, sizeof(what), "answered %d", st);
        retry_backoff(s, 1, what);
        return 1;
    }
    replay_drop(m);
    m->pol.retries_left = 0;
    return 0;
}

/*
 * A dial for the request ended (connected, or no endpoint was left): the connection failures
 * it passed over on its way (the dial tries the next endpoint by itself, nothing having been
 * sent) count as retries of the request when its policy retries connection failures, and
 * use up its NumRetries.
 */
static void count_dial_failovers(struct session *s)
{
    struct mux_h1 *m = s->mux;
    if (!m->outbound || m->h2 || !(m->pol.retry_on & ROUTE_RETRY_ON_CONNECT) || s->dial_pooled ||
        s->tries < 2)
        return;
    unsigned failed = (unsigned)s->tries - 1;
    m->st.retries += failed;
    STAT_ADD(s->host->stats->upstream_retries, failed);
    m->pol.retries_left = m->pol.retries_left > failed ? m->pol.retries_left - failed : 0;
}

/*
 * The route's RequestTimeout (or IdleTimeout, <idle>) passed: before the answer's head the
 * application gets 504 "upstream request timeout" (408 "stream timeout" for the idle one, as
 * Envoy's stream idle timeout), after it the connection is cut. Returns 1 when the session
 * ended.
 */
static int route_timed_out(struct session *s, int idle, uint64_t now)
{
    struct mux_h1 *m = s->mux;
    char why[200];
    if (idle)
        snprintf(why, sizeof(why), "no byte for %llu ms (the route's IdleTimeout %lu ms)",
                 (unsigned long long)(now - s->last_io_ms), (unsigned long)m->pol.idle_ms);
    else
        snprintf(why, sizeof(why), "no complete answer in %lu ms (the route's RequestTimeout)%s",
                 (unsigned long)m->pol.timeout_ms, m->st.retries > 0 ? " after retries" : "");
    STAT_ADD(s->host->stats->upstream_timeouts, 1);
    m->st.timed_out = 1;
    close_app(s);
    replay_drop(m);
    m->pol.retries_left = 0;
    if (m->res_head_done) {
        abort_conn(s, SESSION_RES_TIMEOUT, why);
        return 1;
    }
    local_answer(s, idle ? STREAM_RES_STREAM_IDLE_TIMEOUT : STREAM_RES_UPSTREAM_TIMEOUT,
                 !m->req.done, why);
    return 0;
}

/* The path and query of an absolute-form target ("http://host/p?q" -> "/p?q"; none -> "/"). */
static struct http_slice absolute_path(struct http_slice t)
{
    const char *end = t.p + t.len;
    const char *p = t.len > 3 ? memchr(t.p, ':', t.len) : NULL;
    if (p != NULL && end - p >= 3 && p[1] == '/' && p[2] == '/') {
        for (p += 3; p < end; p++)
            if (*p == '/' || *p == '?')
                break;
        if (p < end && *p == '/')
            return (struct http_slice){p, (size_t)(end - p)};
    }
    return (struct http_slice){"/", 1};
}

/* The fields <h> with the request's route's and split's header modifiers applied
 * (route_headers_modified()): a new array the caller frees, or NULL. */
static struct http_header *modified_fields(const struct mux_h1 *m, int response,
                                           const struct http_header *h, size_t n, size_t *out_n)
{
    return route_headers_modified(m->route, m->split, response, h, n, out_n);
}

/*
 * The route's PrefixRewrite (route_rewrite_len()): the request's target becomes, in origin
 * form, the rewrite followed by what the matched part of the path left, query included. The
 * new target lives in m->target (unused outbound otherwise) until the head is written.
 */
static void rewrite_target(struct mux_h1 *m, struct http_request *rq)
{
    if (m->route == NULL ||
        (rq->target_form != HTTP_TARGET_ORIGIN && rq->target_form != HTTP_TARGET_ABSOLUTE))
        return;
    struct http_slice t =
        rq->target_form == HTTP_TARGET_ABSOLUTE ? absolute_path(rq->target) : rq->target;
    const char *q = memchr(t.p, '?', t.len);
    struct http_slice path = {t.p, q != NULL ? (size_t)(q - t.p) : t.len};
    size_t cut = route_rewrite_len(m->route, path);
    if (cut == 0)
        return;
    const char *pre = m->route->def->prefix_rewrite;
    m->target.len = 0;
    buf_add(&m->target, pre, strlen(pre));
    buf_add(&m->target, t.p + cut, t.len - cut);
    rq->target = (struct http_slice){m->target.p, m->target.len};
    rq->target_form = HTTP_TARGET_ORIGIN;
}

/*
 * Outbound routing (route.h): the request's route and split pick the resolver whose targets
 * the dial may use (s->dial_rs). A keep-alive connection to a target outside them goes back
 * to the pool. Returns 0, or -1 after answering 404 (no route matched) or 503 (no split has
 * weight). Without a route table (a prepared query, or no chain yet) every target serves.
 */
static int route_request(struct session *s)
{
    struct mux_h1 *m = s->mux;
    struct http_request *rq = &m->rq;
    const struct route_table *t = s->up->routes;
    m->route = NULL;
    m->split = NULL;
    m->lb_cookie[0] = '\0';
    s->dial_rs = NULL;
    if (t == NULL)
        return 0;
    struct http_slice target = rq->target;
    if (rq->target_form == HTTP_TARGET_ABSOLUTE)
        target = absolute_path(target);
    struct route_req rr = {
        .method = rq->method_name,
        .path = target,
        .authority = rq->host,
        .headers = rq->headers,
        .nheaders = rq->nheaders,
    };
    const char *q = memchr(target.p, '?', target.len);
    if (q != NULL) {
        rr.path.len = (size_t)(q - target.p);
        rr.query = (struct http_slice){q + 1, target.len - rr.path.len - 1};
    }
    const char *why = NULL;
    enum stream_result r = STREAM_RES_NO_ROUTE;
    m->route = route_match(t, &rr);
    m->st.route = m->route;
    if (m->route == NULL) {
        why = "no route matched";
    } else {
        m->split = route_split_pick(m->route, util_rand());
        if (m->split == NULL) {
            why = "the route's splits all have weight 0";
            r = STREAM_RES_UPSTREAM_CONNECT_ERROR;
        }
    }
    if (why != NULL) {
        buf_consume(&m->cin, m->rq_len);
        memset(rq, 0, sizeof(*rq));
        local_answer(s, r, m->expect && !m->req.done, why);
        return -1;
    }
    s->dial_rs = route_table_resolver(t, m->split->resolver);
    session_lb_request(s, rr.headers, rr.nheaders, rr.query, m->lb_cookie, sizeof(m->lb_cookie));
    m->st.resolver = s->dial_rs != NULL ? s->dial_rs->name : NULL;
    if (s->end[1].fd >= 0 && (!session_dial_allows(s, s->tgt) || !session_lb_keeps(s))) {
        session_pool_put(s); /* closes end[1] when the pool does not take it */
        close_app(s);
    }
    return 0;
}

/*
 * Outbound, limits.max_concurrent_requests: the request is in flight from here until its
 * answer is complete (stream_answered() gives the unit back). Returns 0, or -1 after answering 503
 * at once when that many are in flight to the upstream over all workers (Envoy's circuit breaker;
 * nothing is queued).
 */
static int admit_request(struct session *s)
{
    struct mux_h1 *m = s->mux;
    char why[128];
    if (session_admit_request(s, &m->st.active, why, sizeof(why)) == 0)
        return 0;
    buf_consume(&m->cin, m->rq_len);
    memset(&m->rq, 0, sizeof(m->rq));
    local_answer(s, STREAM_RES_UPSTREAM_OVERFLOW, m->expect && !m->req.done, why);
    return -1;
}

/* ---- the far side over HTTP/2 (h2up) ---- */

static void pump(struct session *s);

static void kick_run(struct loop_defer *d)
{
    struct mux_h1 *m = (struct mux_h1 *)((char *)d - offsetof(struct mux_h1, kick));
    struct session *s = m->sess;
    /* Queued before the session finished, it runs before the session's memory goes (the
     * deferred calls run in order), and finds it done. */
    if (s->state == S_DONE || s->mux != m || m->phase == P_DIAL)
        return;
    pump(s);
}

/*
 * A stream callback changed what the pump works on. The pump runs after this dispatch round,
 * not inside the callback: the stream's connection is in the middle of its own I/O then.
 */
static void kick(struct session *s)
{
    if (s->state != S_DONE)
        loop_defer(s->host->loop, &s->mux->kick, kick_run);
}

/* The reason phrase written for a status that came without one (HTTP/2 has none). */
static const char *status_reason(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 103:
        return "Early Hints";
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 204:
        return "No Content";
    case 206:
        return "Partial Content";
    case 301:
        return "Moved Permanently";
    case 302:
        return "Found";
    case 304:
        return "Not Modified";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 500:
        return "Internal Server Error";
    default:
        return status >= 400 ? reason_phrase(status) : "";
    }
}

/* Whether a field value may go into an HTTP/1.1 head as it is (no CR, LF or NUL). */
static int h1_value_ok(struct http_slice v)
{
    for (size_t i = 0; i < v.len; i++)
        if (v.p[i] == '\r' || v.p[i] == '\n' || v.p[i] == '\0')
            return 0;
    return 1;
}

/* Notes a gRPC status for the stream's record (from the head of a trailers-only answer, or
 * from the trailers). */
static void note_grpc_status(struct mux_h1 *m, const struct http_header *f, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (h1_slice_eq(f[i].name, "grpc-status") && f[i].value.len < sizeof(m->st.grpc_status)) {
            memcpy(m->st.grpc_status, f[i].value.p, f[i].value.len);
            m->st.grpc_status[f[i].value.len] = '\0';
        }
}

/* The far side's answer to a stream that is no longer being served, or cannot be translated:
 * connectd answers 502 itself. */
static void bad_h2_answer(struct session *s, const char *why)
{
    struct mux_h1 *m = s->mux;
    close_app(s);
    local_answer(s, STREAM_RES_BAD_RESPONSE, !m->req.done, why);
    kick(s);
}

/*
 * A response head from the far side: an interim one goes to an HTTP/1.1 caller as it is; the
 * final one is written as an HTTP/1.1 head whose framing is ours: Content-Length when the far
 * side gave one (or ended the stream with the head), else chunked for an HTTP/1.1 caller and
 * until-close for an HTTP/1.0 one.
 */
static int h2_on_head(void *owner, const struct h2_head *hd)
{
    struct session *s = owner;
    struct mux_h1 *m = s->mux;
    struct http_header extra[4];
    size_t nx = 0;
    if (m->phase != P_EXCHANGE || m->res_head_done)
        return 0;
    m->app_heard = 1; /* processed: never opened again */
    if (hd->nheaders > MAX_HEADERS) {
        bad_h2_answer(s, "the answer has too many fields for HTTP/1.1");
        return 0;
    }
    for (size_t i = 0; i < hd->nheaders; i++) {
        m->rs_h[i] = hd->headers[i];
        m->rs_h[i].flags = 0;
        if (!h1_value_ok(m->rs_h[i].value)) {
            bad_h2_answer(s, "an answer field cannot be written in HTTP/1.1");
            return 0;
        }
        /* Our own framing replaces the far side's. */
        if (h1_slice_eq(m->rs_h[i].name, "content-length"))
            m->rs_h[i].flags |= HTTP_HDR_HOP;
    }
    memset(&m->rs, 0, sizeof(m->rs));
    m->rs.headers = m->rs_h;
    m->rs.headers_cap = MAX_HEADERS;
    m->rs.nheaders = hd->nheaders;
    m->rs.status = hd->status;
    const char *reason = status_reason(hd->status);
    m->rs.reason = (struct http_slice){reason, strlen(reason)};
    if (hd->status >= 200 && m->outbound && retry_allowed(s, 1) &&
        route_policy_retries_status(&m->pol, hd->status, hd->headers, hd->nheaders)) {
        session_outlier_report(s, hd->status >= 500);
        char what[64];
        snprintf(what, sizeof(what), "answered %d", hd->status);
        retry_backoff(s, 1, what);
        kick(s);
        return 0;
    }
    if (hd->status >= 200) {
        /* Not sent again; the copy goes unless a stream opened again still reads from it. */
        m->pol.retries_left = 0;
        if (!m->retried || m->replay_off >= m->replay.len)
            replay_drop(m);
    }
    if (hd->status < 200) {
        /* 100 Continue, 103 Early Hints (HTTP/2 has no 101). Heads are not flow controlled:
         * one that finds INTERIM_MAX bytes the caller has not taken yet is dropped (an
         * interim answer is advisory), or a far side sending 1xx after 1xx to a caller that
         * does not read would grow cout without end. */
        if (m->minor == 1 && m->cout.len < INTERIM_MAX &&
            append_head(&m->cout, 1024, NULL, &m->rs, NULL, 0) < 0) {
            bad_h2_answer(s, "the interim answer cannot be forwarded");
            return 0;
        }
        if (m->minor == 1 && m->cout.len > 0)
            m->pol.retries_left = 0; /* the application heard from it: never retried */
        kick(s);
        return 0;
    }
    if (m->outbound)
        session_outlier_report(s, hd->status >= 500);
    enum http_framing f;
    int nobody = m->method == HTTP_METHOD_HEAD || hd->status == 204 || hd->status == 304;
    memset(&m->res, 0, sizeof(m->res));
    if (nobody) {
        f = HTTP_BODY_NONE;
        /* A HEAD's or a 304's Content-Length tells of the body a GET would get: kept. */
        if (hd->content_length >= 0 && hd->status != 204) {
            snprintf(m->res_len, sizeof(m->res_len), "%lld", (long long)hd->content_length);
            EXTRA("Content-Length", m->res_len, HTTP_HDR_H1OK);
        }
    } else if (hd->end_stream || hd->content_length >= 0) {
        f = HTTP_BODY_LENGTH;
        snprintf(m->res_len, sizeof(m->res_len), "%lld",
                 hd->end_stream ? 0LL : (long long)hd->content_length);
        EXTRA("Content-Length", m->res_len, HTTP_HDR_H1OK);
    } else if (m->minor == 1) {
        f = HTTP_BODY_CHUNKED;
        m->res_chunked = 1;
        EXTRA("Transfer-Encoding", "chunked", HTTP_HDR_H1OK);
    } else {
        f = HTTP_BODY_UNTIL_CLOSE;
    }
    m->res.framing = f;
    int keep = m->req_keep && !m->close_after && f != HTTP_BODY_UNTIL_CLOSE;
    m->close_after = !keep;
    if (!keep)
        EXTRA("Connection", "close", HTTP_HDR_H1OK);
    else if (m->minor == 0)
        EXTRA("Connection", "keep-alive", HTTP_HDR_H1OK);
    if (m->outbound && m->lb_cookie[0] != '\0')
        EXTRA("Set-Cookie", m->lb_cookie, 0); /* a hash policy's generated cookie (lb.h) */
    /* Outbound, the route's and split's ResponseHeaders (see on_response_head()). */
    size_t nmf = 0;
    struct http_header *mf =
        m->outbound ? modified_fields(m, 1, m->rs.headers, m->rs.nheaders, &nmf) : NULL;
    if (mf != NULL) {
        m->rs.headers = mf;
        m->rs.nheaders = nmf;
    }
    int rc = append_head(&m->cout, 4096 + sizeof(m->lb_cookie), NULL, &m->rs, extra, nx);
    m->rs.headers = m->rs_h;
    m->rs.nheaders = hd->nheaders;
    free(mf);
    if (rc < 0) {
        bad_h2_answer(s, "the response head cannot be forwarded");
        return 0;
    }
    note_grpc_status(m, hd->headers, hd->nheaders);
    m->st.status = hd->status;
    m->res_head_done = 1;
    kick(s);
    return 0;
}

/* Answer DATA waits in ain until the caller's side has room (see exchange_h2()). */
static int h2_on_data(void *owner, const uint8_t *p, size_t len)
{
    struct session *s = owner;
    struct mux_h1 *m = s->mux;
    if (m->phase != P_EXCHANGE || !m->res_head_done) {
        h2up_consume(m->h2s, len); /* no one takes it: the window must not close for others */
        return 0;
    }
    buf_add(&m->ain, p, len);
    kick(s);
    return 0;
}

/*
 * Trailers: an HTTP/1.1 caller gets them only in a chunked answer and only when it said
 * "TE: trailers" (RFC 9110 section 6.5.1 lets a recipient drop them); gRPC's status among
 * them is noted for the record either way.
 */
static int h2_on_trailers(void *owner, const struct http_header *f, size_t n)
{
    struct session *s = owner;
    struct mux_h1 *m = s->mux;
    note_grpc_status(m, f, n);
    if (!m->res_chunked || !m->te_trailers)
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (!h1_value_ok(f[i].value))
            continue;
        buf_add(&m->trailers, f[i].name.p, f[i].name.len);
        buf_add(&m->trailers, ": ", 2);
        buf_add(&m->trailers, f[i].value.p, f[i].value.len);
        buf_add(&m->trailers, "\r\n", 2);
    }
    return 0;
}

static void h2_on_end(void *owner)
{
    struct session *s = owner;
    s->mux->h2_end = 1;
    kick(s);
}

static void h2_on_close(void *owner, uint32_t code, const char *why)
{
    struct session *s = owner;
    struct mux_h1 *m = s->mux;
    m->h2_up = h2up_established(h2up_stream_conn(m->h2s));
    m->h2s = NULL;
    m->h2_closed = 1;
    m->h2_code = code;
    snprintf(m->h2_why, sizeof(m->h2_why), "%s", why != NULL ? why : "closed");
    kick(s);
}

/* The request body for the stream: what exchange_h2() decoded into aout. */
static ssize_t h2_read_body(void *owner, uint8_t *buf, size_t cap, unsigned *flags)
{
    struct session *s = owner;
    struct mux_h1 *m = s->mux;
    size_t n;
    if (m->retried && m->replay_off < m->replay.len) {
        /* A refused stream opened again: what the first one sent goes first. */
        n = m->replay.len - m->replay_off < cap ? m->replay.len - m->replay_off : cap;
        memcpy(buf, m->replay.p + m->replay_off, n);
        m->replay_off += n;
        if (m->replay_off == m->replay.len && m->req.done && m->aout.len == 0)
            *flags |= H2_BODY_EOF;
        return (ssize_t)n;
    }
    n = m->aout.len < cap ? m->aout.len : cap;
    if (n > 0) {
        memcpy(buf, m->aout.p, n);
        buf_consume(&m->aout, n);
        if (m->replay_ok && !m->retried) {
            /* Held until the far side answers, in case it refuses the stream unprocessed. */
            m->replay_ok = m->replay.len + n <= m->replay_max;
            if (m->replay_ok)
                buf_add(&m->replay, buf, n);
            else
                m->replay.len = 0;
        }
        kick(s); /* room for more of the caller's body */
    }
    if (m->req.done && m->aout.len == 0) {
        *flags |= H2_BODY_EOF;
    } else if (n == 0) {
        m->h2_deferred = 1;
        return H2_BODY_DEFER;
    }
    return (ssize_t)n;
}

static const struct h2up_stream_ops h2_ops = {
    .on_head = h2_on_head,
    .on_data = h2_on_data,
    .on_trailers = h2_on_trailers,
    .on_end = h2_on_end,
    .on_close = h2_on_close,
    .read_body = h2_read_body,
};

/*
 * Opens the request being served as a stream on <c>: the request line and Host become the
 * pseudo-fields (:authority from Host, else the service's or upstream's name), hop-by-hop
 * fields stay behind but "TE: trailers" is kept, and inbound the forwarded fields are added.
 * The head leaves cin and EXCHANGE follows. Returns 0, or -1 when <c> takes no stream.
 */
static struct http_slice copy_slice(char **p, struct http_slice src)
{
    struct http_slice out = {*p, src.len};
    if (src.len > 0)
        memcpy(*p, src.p, src.len);
    *p += src.len;
    return out;
}

/* Copies head <hd> into the codec (h2hd, h2f, h2held): the stream can be opened again after
 * the head left cin. */
static void hold_head(struct mux_h1 *m, const struct h2_out_head *hd)
{
    size_t total = hd->method.len + hd->scheme.len + hd->authority.len + hd->path.len + 1;
    for (size_t i = 0; i < hd->nheaders; i++)
        total += hd->headers[i].name.len + hd->headers[i].value.len;
    m->h2held.len = 0;
    buf_reserve(&m->h2held, total);
    if (m->h2f_cap < hd->nheaders || m->h2f == NULL) {
        /* More than the caller's fields only with a route's header modifiers. */
        m->h2f_cap = hd->nheaders > MAX_HEADERS + 8 ? hd->nheaders : MAX_HEADERS + 8;
        free(m->h2f);
        m->h2f = xcalloc(m->h2f_cap, sizeof(*m->h2f));
    }
    char *p = m->h2held.p;
    m->h2hd = (struct h2_out_head){
        .method = copy_slice(&p, hd->method),
        .scheme = copy_slice(&p, hd->scheme),
        .authority = copy_slice(&p, hd->authority),
        .path = copy_slice(&p, hd->path),
        .headers = m->h2f,
        .nheaders = hd->nheaders,
    };
    for (size_t i = 0; i < hd->nheaders; i++) {
        m->h2f[i].name = copy_slice(&p, hd->headers[i].name);
        m->h2f[i].value = copy_slice(&p, hd->headers[i].value);
        m->h2f[i].flags = hd->headers[i].flags;
    }
    m->h2held.len = (size_t)(p - m->h2held.p);
}

static int open_stream(struct session *s, struct h2up_conn *c)
{
    struct mux_h1 *m = s->mux;
    if (m->retried) {
        /* Again, as it was sent the first time (see retry_h2()). */
        m->h2s = h2up_open(c, &m->h2hd, m->h2_has_body, &h2_ops, s);
        if (m->h2s == NULL)
            return -1;
        m->h2_deferred = m->h2_end = m->h2_closed = 0;
        m->replay_off = 0;
        m->res_head_done = 0;
        m->phase = P_EXCHANGE;
        return 0;
    }
    struct http_request *rq = &m->rq;
    struct http_header fs[MAX_HEADERS + 8], *f = fs, extra[4];
    size_t n = 0, nx = forwarded_fields(s, extra);
    /* Expect: 100-continue is met here (below), so it is not forwarded. */
    for (size_t i = 0; i < rq->nheaders; i++)
        if (!(rq->headers[i].flags & HTTP_HDR_DROP) &&
            !(m->expect && h1_slice_eq(rq->headers[i].name, "expect")))
            fs[n++] = rq->headers[i];
    for (size_t i = 0; i < nx; i++)
        fs[n++] = extra[i];
    if (m->te_trailers)
        fs[n++] = (struct http_header){.name = {"te", 2}, .value = {"trailers", 8}};
    /* Outbound, the route's header modifiers and PrefixRewrite (see forward_head()). */
    size_t nmf = 0;
    struct http_header *mf = m->outbound ? modified_fields(m, 0, fs, n, &nmf) : NULL;
    if (mf != NULL) {
        f = mf;
        n = nmf;
    }
    if (m->outbound)
        rewrite_target(m, rq);
    const char *name = m->outbound ? s->up->cfg->destination_name : s->snap->cfg.service;
    struct h2_out_head hd = {
        .method = rq->method_name,
        .scheme = m->outbound || s->end[0].tls == NULL ? (struct http_slice){"http", 4}
                                                       : (struct http_slice){"https", 5},
        .authority = rq->host.len > 0 ? rq->host : (struct http_slice){name, strlen(name)},
        .path = rq->target_form == HTTP_TARGET_ABSOLUTE ? absolute_path(rq->target) : rq->target,
        .headers = f,
        .nheaders = n,
    };
    hold_head(m, &hd);
    free(mf);
    m->h2_has_body = !m->req.done;
    m->h2s = h2up_open(c, &m->h2hd, m->h2_has_body, &h2_ops, s);
    if (m->h2s == NULL)
        return -1;
    m->h2_deferred = m->h2_end = m->h2_closed = 0;
    m->replay.len = 0;
    m->replay_ok = 1;
    if (m->expect && !m->req.done) {
        /* The caller waits for 100 Continue before its body, and an HTTP/2 far side need not
         * send one (RFC 9113 section 8.1.1 leaves 1xx to the server; h2c servers and gRPC
         * seldom do): connectd answers it now the stream is open, as Envoy's connection
         * manager does by default (proxy_100_continue off: it sends 100 itself and strips the
         * expectation). */
        buf_add(&m->cout, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    }
    buf_consume(&m->cin, m->rq_len);
    m->rq_len = 0;
    memset(rq, 0, sizeof(*rq)); /* its slices pointed into cin */
    m->res_head_done = 0;
    m->phase = P_EXCHANGE;
    return 0;
}

/* The address of the local application, for logs and records. */
static void app_name(struct session *s)
{
    struct session_app c;
    session_app(s, &c);
    if (c.socket_path[0] != '\0')
        snprintf(s->ep_name, sizeof(s->ep_name), "unix:%s", c.socket_path);
    else
        snprintf(s->ep_name, sizeof(s->ep_name), "%s:%d", c.address, c.port);
}

/*
 * Inbound, an http2 or grpc service: the worker's shared h2c connection to the application
 * ("app|<address>", as mux_h2 shares it), or unless <fresh> finds one, a new one whose
 * connect is under way (the stream waits in it; a refused connect closes the stream). NULL
 * when the connect failed at once (*<err> set).
 */
static struct h2up_conn *app_conn(struct session *s, int fresh, int *err)
{
    const struct proxy_cfg *c = &s->snap->cfg;
    struct session_app a;
    session_app(s, &a);
    char key[sizeof(s->ep_name) + 8];
    session_app_h2_key(s, key, sizeof(key));
    app_name(s);
    struct h2up_conn *hc = fresh ? NULL : h2up_find(s->host->h2up, key, NULL);
    if (hc != NULL)
        return hc;
    int fd = a.socket_path[0] != '\0' ? sock_connect_unix(a.socket_path)
                                      : sock_connect(a.address, a.port);
    if (fd < 0) {
        *err = fd;
        return NULL;
    }
    struct xprt x = {.fd = fd};
    loop_io_init(&x.io, fd, NULL, NULL);
    hc = h2up_adopt(s->host->h2up, key, NULL, &x, s->ep_name);
    h2up_set_connect_timeout(hc, c->local_connect_timeout_ms);
    return hc;
}

/* Inbound: the allowed request goes to the application as a stream (503 when it cannot). */
static void start_app_stream(struct session *s)
{
    struct mux_h1 *m = s->mux;
    int err = -ECONNREFUSED;
    char msg[400];
    /* A shared connection that takes no stream after all (its ids spent): a new one. */
    for (int fresh = 0; fresh < 2; fresh++) {
        struct h2up_conn *hc = app_conn(s, fresh, &err);
        if (hc == NULL)
            break;
        if (open_stream(s, hc) == 0)
            return;
        err = -ESHUTDOWN;
    }
    snprintf(msg, sizeof(msg), "connect %s: %s", s->ep_name, util_strerror(err));
    buf_consume(&m->cin, m->rq_len);
    memset(&m->rq, 0, sizeof(m->rq));
    local_answer(s, STREAM_RES_LOCAL_CONNECT_ERROR, m->expect && !m->req.done, msg);
}

/* Whether a TE field of the request names "trailers" among its codings. */
static int wants_trailers(const struct http_request *rq)
{
    for (size_t i = 0; i < rq->nheaders; i++) {
        const struct http_header *h = &rq->headers[i];
        if (!h1_slice_eq(h->name, "te"))
            continue;
        const char *p = h->value.p, *end = p + h->value.len;
        while (p < end) {
            while (p < end && (*p == ' ' || *p == '\t' || *p == ','))
                p++;
            const char *t = p;
            while (p < end && *p != ',' && *p != ';' && *p != ' ' && *p != '\t')
                p++;
            if (h1_slice_eq((struct http_slice){t, (size_t)(p - t)}, "trailers"))
                return 1;
            while (p < end && *p != ',')
                p++;
        }
    }
    return 0;
}

/* A complete request head of <n> bytes is at the start of cin. */
static void on_head(struct session *s, size_t n)
{
    struct mux_h1 *m = s->mux;
    struct http_request *rq = &m->rq;
    char why[600];
    stream_begin(&m->st, ++m->nstreams, loop_now_ms(s->host->loop), rq);
    m->st.bytes_in = n;
    m->rq_len = n;
    m->head_start_ms = 0;
    m->method = rq->method;
    m->minor = rq->minor_version;
    m->req_keep = (rq->flags & HTTP_F_KEEP_ALIVE) != 0 && !m->draining;
    m->upgrade = (rq->flags & HTTP_F_UPGRADE) != 0;
    m->expect = (rq->flags & HTTP_F_EXPECT_CONTINUE) != 0;
    body_init(&m->req, rq->framing, rq->content_length);
    if (m->h2) {
        /* HTTP/2 frames the body itself (DATA), and has no Upgrade. */
        m->req.dechunk = 1;
        m->upgrade = 0;
        m->te_trailers = wants_trailers(rq);
    }
    if (rq->flags & HTTP_F_EXPECT_OTHER) {
        local_answer(s, STREAM_RES_EXPECTATION_FAILED, 1, "unsupported Expect");
        return;
    }
    if (m->h2 && rq->method == HTTP_METHOD_CONNECT && m->outbound) {
        buf_consume(&m->cin, m->rq_len);
        memset(rq, 0, sizeof(*rq));
        local_answer(s, STREAM_RES_BAD_RESPONSE, 1, "CONNECT is not translated to HTTP/2");
        return;
    }
    /* A router (or endpoint) change applies to this request too, not only to new
     * application connections. */
    if (m->outbound && session_follow_snapshot(s))
        close_app(s);
    if (m->outbound && (route_request(s) < 0 || admit_request(s) < 0))
        return;
    if (m->outbound) {
        route_policy_start(s);
        note_request_done(s);
    }
    if (m->outbound && m->h2) {
        /* Each request a stream on a shared HTTP/2 connection (session_dial_h2). */
        m->phase = P_DIAL;
        session_dial_h2(s);
        return;
    }
    if (m->outbound) {
        /* Outbound: the application's own request, forwarded as sent (the upstream's
         * sidecar normalizes and authorizes it). */
        if (s->end[1].fd >= 0 && session_endpoint_ejected(s))
            close_app(s); /* each request picks its endpoint, as Envoy's balancer does */
        if (s->end[1].fd < 0) {
            m->phase = P_DIAL;
            session_dial_upstream(s);
            return;
        }
        forward_head(s);
        return;
    }
    struct stream_req sr = {
        .method = rq->method_name,
        .target = rq->target,
        .origin = rq->target_form == HTTP_TARGET_ORIGIN || rq->target_form == HTTP_TARGET_ABSOLUTE,
        .authority = rq->host,
        .headers = rq->headers,
        .nheaders = rq->nheaders,
        .quiet_allow = 1, /* an allowed request's record has no reason */
    };
    if (rq->target_form == HTTP_TARGET_ABSOLUTE)
        sr.target = absolute_path(rq->target);
    buf_reserve(&m->target, PATHNORM_OUT_MAX(sr.target.len));
    size_t tlen = 0;
    enum stream_verdict v =
        stream_authorize(s, &m->st, &sr, m->target.p, m->target.cap, &tlen, why, sizeof(why));
    session_count_request_decision(s, v == STREAM_ALLOW);
    if (v != STREAM_ALLOW) {
        /* The body is read and dropped so the connection can carry the next request, unless
         * the caller waits for a 100 before sending it, or the request was malformed. */
        int close = (m->expect && !m->req.done) || v == STREAM_REFUSE;
        buf_consume(&m->cin, m->rq_len);
        memset(rq, 0, sizeof(*rq));
        m->target.len = v == STREAM_REDIRECT ? tlen : 0;
        local_answer(s, stream_verdict_result(v), close, why);
        return;
    }
    /* The application is given the normalized target, in origin form. */
    rq->target = (struct http_slice){m->target.p, tlen};
    rq->target_form = sr.origin ? HTTP_TARGET_ORIGIN : rq->target_form;
    if (m->h2 && rq->method == HTTP_METHOD_CONNECT) {
        buf_consume(&m->cin, m->rq_len);
        memset(rq, 0, sizeof(*rq));
        local_answer(s, STREAM_RES_BAD_RESPONSE, 1, "CONNECT is not translated to HTTP/2");
        return;
    }
    if (m->h2) {
        start_app_stream(s);
        return;
    }
    if (s->end[1].fd < 0) {
        int rc = connect_app(s);
        if (rc < 0) {
            char msg[400];
            snprintf(msg, sizeof(msg), "connect %s: %s", s->ep_name, util_strerror(rc));
            buf_consume(&m->cin, m->rq_len);
            memset(rq, 0, sizeof(*rq));
            local_answer(s, STREAM_RES_LOCAL_CONNECT_ERROR, m->expect && !m->req.done, msg);
        }
        return;
    }
    forward_head(s);
}

/* ---- the response head ---- */

/* A complete response head of <n> bytes is at the start of ain. Returns 0, or -1 after
 * answering 502. */
static int on_response_head(struct session *s, size_t n)
{
    struct mux_h1 *m = s->mux;
    struct http_response *rs = &m->rs;
    struct http_header extra[4];
    size_t nx = 0;
    int tunnel = rs->framing == HTTP_BODY_TUNNEL;
    if (rs->status >= 100 && rs->status < 200 && rs->status != 101) {
        /* Interim (100 Continue, 103 Early Hints): passed on to an HTTP/1.1 caller, unless
         * INTERIM_MAX bytes it has not taken wait already (see h2_on_head()). */
        if (m->minor == 1 && m->cout.len < INTERIM_MAX) {
            (void)append_head(&m->cout, n + 64, NULL, rs, NULL, 0);
            m->pol.retries_left = 0; /* the application heard from it: never retried */
        }
        buf_consume(&m->ain, n);
        return 0;
    }
    if (tunnel && !(rs->status == 101 ? m->upgrade : m->method == HTTP_METHOD_CONNECT)) {
        close_app(s);
        local_answer(s, STREAM_RES_BAD_RESPONSE, !m->req.done, "101 without an Upgrade offer");
        return -1;
    }
    if (m->outbound)
        session_outlier_report(s, rs->status >= 500);
    body_init(&m->res, rs->framing, rs->content_length);
    m->res.dechunk = rs->framing == HTTP_BODY_CHUNKED && m->minor == 0;
    m->app_keep = m->app_keep && (rs->flags & HTTP_F_KEEP_ALIVE) &&
                  rs->framing != HTTP_BODY_UNTIL_CLOSE && !tunnel;
    int keep = m->req_keep && !m->close_after && rs->framing != HTTP_BODY_UNTIL_CLOSE &&
               !m->res.dechunk && !tunnel;
    m->close_after = !keep && !tunnel;
    if (rs->framing == HTTP_BODY_CHUNKED && !m->res.dechunk)
        EXTRA("Transfer-Encoding", "chunked", HTTP_HDR_H1OK);
    if (tunnel && rs->status == 101) {
        EXTRA("Connection", "upgrade", HTTP_HDR_H1OK);
        extra[nx++] = (struct http_header){.name = {"Upgrade", 7}, .value = rs->upgrade};
    } else if (!keep) {
        EXTRA("Connection", "close", HTTP_HDR_H1OK);
    } else if (m->minor == 0) {
        EXTRA("Connection", "keep-alive", HTTP_HDR_H1OK);
    }
    if (m->outbound && m->lb_cookie[0] != '\0')
        EXTRA("Set-Cookie", m->lb_cookie, 0); /* a hash policy's generated cookie (lb.h) */
    /* Outbound, the route's and split's ResponseHeaders. */
    size_t nmf = 0;
    struct http_header *mf =
        m->outbound ? modified_fields(m, 1, rs->headers, rs->nheaders, &nmf) : NULL;
    struct http_header *got = rs->headers;
    size_t ngot = rs->nheaders;
    if (mf != NULL) {
        rs->headers = mf;
        rs->nheaders = nmf;
    }
    int rc = append_head(&m->cout, n + 256 + sizeof(m->lb_cookie), NULL, rs, extra, nx);
    rs->headers = got;
    rs->nheaders = ngot;
    free(mf);
    if (rc < 0) {
        close_app(s);
        local_answer(s, STREAM_RES_BAD_RESPONSE, 1, "the response head cannot be forwarded");
        return -1;
    }
    m->st.status = rs->status;
    m->res_head_done = 1;
    buf_consume(&m->ain, n);
    return 0;
}

/* ---- the tunnel ---- */

/* 101 (or 2xx to CONNECT) written: the connection becomes a byte tunnel run by relay.c. */
static void become_tunnel(struct session *s)
{
    struct mux_h1 *m = s->mux;
    char why[64];
    if (m->cin.len > SESSION_RELAY_BUF_BYTES || m->ain.len > SESSION_RELAY_BUF_BYTES) {
        stream_finish(s, &m->st, STREAM_RES_ABORTED, "too many bytes before the tunnel");
        session_finish(s, SESSION_RES_ERROR, "too many bytes buffered before the tunnel");
        return;
    }
    snprintf(why, sizeof(why), "%d: tunnel", m->st.status);
    stream_finish(s, &m->st, STREAM_RES_UPGRADED, why);
    /* What each side sent after its head goes first: buf[d] carries bytes read from end[d]. */
    struct buf *left[2] = {&m->cin, &m->ain};
    for (int d = 0; d < 2; d++) {
        s->buf[d].off = 0;
        s->buf[d].len = 0;
        if (left[d]->len > 0) {
            session_buf_take(s->host, &s->buf[d]);
            memcpy(s->buf[d].data, left[d]->p, left[d]->len);
            s->buf[d].len = left[d]->len;
        }
    }
    s->end[1].io.cb = session_on_io;
    loop_timer_stop(s->host->loop, &s->timer);
    mux_free(m);
    s->mux = NULL;
    relay_start(s);
}

/* ---- timers ---- */

/*
 * Outbound EXCHANGE: the earliest of the route's RequestTimeout and IdleTimeout,
 * local_request_timeout_ms when set, and the upstream's idle timeout.
 */
static uint64_t outbound_deadline(const struct session *s, enum deadline *kind)
{
    const struct mux_h1 *m = s->mux;
    const struct proxy_cfg *c = &s->snap->cfg;
    uint32_t idle = session_idle_timeout_ms(s);
    struct {
        enum deadline kind;
        uint64_t at;
    } v[4] = {{DL_IDLE, idle != 0 ? s->last_io_ms + idle : 0},
              {DL_ROUTE_IDLE, m->pol.idle_ms != 0 ? s->last_io_ms + m->pol.idle_ms : 0},
              {DL_ROUTE, !m->res.done || !m->res_head_done ? route_deadline(m) : 0},
              {DL_RESPONSE, m->req_sent_ms != 0 && !m->res.done && c->local_request_timeout_ms
                                ? m->req_sent_ms + c->local_request_timeout_ms
                                : 0}};
    uint64_t best = 0;
    *kind = DL_NONE;
    for (size_t i = 0; i < ARRAY_SIZE(v); i++) {
        if (v[i].at != 0 && (best == 0 || v[i].at < best)) {
            best = v[i].at;
            *kind = v[i].kind;
        }
    }
    return best;
}

/* The earliest deadline of the current phase (absolute ms, 0 for none) and its kind. */
static uint64_t deadline(const struct session *s, enum deadline *kind)
{
    const struct mux_h1 *m = s->mux;
    const struct proxy_cfg *c = &s->snap->cfg;
    uint32_t idle = session_idle_timeout_ms(s);
    *kind = DL_NONE;
    switch (m->phase) {
    case P_HEAD:
        if (m->head_start_ms != 0) {
            *kind = DL_HEAD;
            return m->head_start_ms + c->request_headers_timeout_ms;
        }
        break;
    case P_CONNECT:
        *kind = DL_CONNECT;
        return m->connect_start_ms + c->local_connect_timeout_ms;
    case P_EXCHANGE:
        if (m->outbound)
            return outbound_deadline(s, kind);
        if (m->req_sent_ms != 0 && !m->res.done && c->local_request_timeout_ms != 0) {
            *kind = DL_RESPONSE;
            return m->req_sent_ms + c->local_request_timeout_ms;
        }
        break;
    case P_BACKOFF: {
        uint64_t route = route_deadline(m);
        *kind = DL_BACKOFF;
        if (route != 0 && route < m->backoff_until_ms) {
            *kind = DL_ROUTE;
            return route;
        }
        return m->backoff_until_ms;
    }
    case P_CLOSING:
        *kind = DL_LINGER;
        return m->linger_start_ms + LINGER_MS;
    default:
        break;
    }
    if (idle == 0)
        return 0;
    *kind = DL_IDLE;
    return s->last_io_ms + idle;
}

static void arm(struct session *s)
{
    struct mux_h1 *m = s->mux;
    enum deadline kind;
    uint64_t d = deadline(s, &kind), now = loop_now_ms(s->host->loop);
    if (d == 0) {
        loop_timer_stop(s->host->loop, &s->timer);
        m->armed_at = 0;
        return;
    }
    /* A later deadline than the armed one is checked when the timer fires. */
    if (loop_timer_armed(&s->timer) && m->armed_at != 0 && m->armed_at <= d)
        return;
    m->armed_at = d;
    loop_timer_start(s->host->loop, &s->timer, d > now ? d - now : 0);
}

/* ---- the pump ---- */

/* Ends the connection in the middle of a stream. */
static void abort_conn(struct session *s, enum session_result r, const char *why)
{
    struct mux_h1 *m = s->mux;
    if (m->phase != P_HEAD && m->phase != P_CLOSING)
        stream_finish(s, &m->st, STREAM_RES_ABORTED, why);
    session_finish(s, r, why);
}

/* The current stream is answered in full: the next one, or closing. */
static void stream_done(struct session *s, enum stream_result r, const char *why)
{
    struct mux_h1 *m = s->mux;
    stream_finish(s, &m->st, r, why);
    if (m->h2s != NULL) {
        /* The answer is complete but the stream is not (the far side did not read the whole
         * request): it is reset, and the caller's connection closes (the body is unread). */
        h2up_cancel(m->h2s, H2_CANCEL);
        m->h2s = NULL;
    }
    if (!m->req.done) {
        /* Where the next request starts is unknown, and the application got part of a body. */
        m->close_after = 1;
        m->app_keep = 0;
    }
    if (m->ain.len > 0)
        m->app_keep = 0; /* bytes after a complete answer: the application is out of step */
    if (r == STREAM_RES_OK && m->app_keep && s->end[1].fd >= 0)
        m->app_served++;
    if (m->close_after) {
        m->phase = P_CLOSING;
        m->linger_start_ms = loop_now_ms(s->host->loop);
        m->lingered = 0;
        if (m->why[0] == '\0')
            snprintf(m->why, sizeof(m->why), "closed after stream %llu",
                     (unsigned long long)m->st.seq);
        if (s->end[1].fd >= 0 && !m->app_keep)
            close_app(s);
        return;
    }
    if (s->end[1].fd >= 0 && !m->app_keep)
        close_app(s);
    next_stream(s);
}

/*
 * The far side refused the stream before processing it (REFUSED_STREAM, or above the last
 * stream id of its GOAWAY: RFC 9113 section 8.7 says such a request may be retried), or the
 * stream's connection ended under it without a GOAWAY before any byte of its answer (the
 * keep-alive race of HTTP/2: a peer closing an idle connection as a stream goes out): it is
 * opened once more, with the head and the body bytes held (at most REPLAY_MAX), on another
 * connection when the refusing one drains or is gone (outbound a new dial, which may pick
 * another endpoint).
 */
static void retry_h2(struct session *s)
{
    struct mux_h1 *m = s->mux;
    LOG_DEBUG("conn=%llu stream=%llu %s %s %s (%s): opening it again", (unsigned long long)s->id,
              (unsigned long long)m->st.seq, far_side(m), s->ep_name,
              m->h2_code == H2_REFUSED_STREAM ? "refused the stream unprocessed"
                                              : "lost the stream with its connection",
              m->h2_why);
    m->retried = 1;
    m->h2_closed = m->h2_end = m->h2_deferred = 0;
    m->h2_code = H2_NO_ERROR;
    m->req_sent_ms = 0;
    if (m->outbound) {
        m->phase = P_DIAL;
        session_dial_h2(s);
        return;
    }
    start_app_stream(s);
}

/*
 * EXCHANGE when the far side speaks HTTP/2: the request body goes from cin to aout (decoded
 * from its chunks), where read_body takes it; the answer's DATA waits in ain and goes to cout
 * in the caller's framing, each byte given back to the stream's window (h2up_consume) only as
 * it goes, so the far side sends no more than the caller takes. Returns 1 when the session
 * ended (the pump returns at once), else 0, with *<progress> set when something moved.
 */
static int exchange_h2(struct session *s, unsigned *wants0, int *progress)
{
    struct mux_h1 *m = s->mux;
    const char *why = NULL;
    char msg[sizeof(s->ep_name) + sizeof(m->h2_why) + 64];
    /* The stream ended before its answer did (checked first: a retry needs every body
     * byte, which the code below would drop once the stream is gone). */
    if (m->h2_closed && !m->h2_end) {
        /* Refused unprocessed, or lost with its connection (closed or broken without a
         * GOAWAY) before a byte of the answer: opened once more on another connection. */
        int lost = m->h2_code == H2_CONNECT_ERROR && m->h2_up;
        if (!m->res_head_done && (m->h2_code == H2_REFUSED_STREAM || lost) && !m->app_heard &&
            m->replay_ok && !m->retried) {
            retry_h2(s);
            *progress = 1;
            return 0;
        }
        int connect = m->h2_code == H2_CONNECT_ERROR && !m->h2_up;
        unsigned on = connect ? ROUTE_RETRY_ON_CONNECT
                      : m->h2_code == H2_REFUSED_STREAM
                          ? ROUTE_RETRY_ON_RESET | ROUTE_RETRY_BIT(REFUSED_STREAM)
                          : ROUTE_RETRY_ON_RESET;
        if (!m->res_head_done && (m->pol.retry_on & on) && retry_allowed(s, 1)) {
            snprintf(msg, sizeof(msg), "%s before its answer", m->h2_why);
            retry_backoff(s, 1, msg);
            *progress = 1;
            return 0;
        }
        if (!m->res_head_done) {
            snprintf(msg, sizeof(msg), "%s %s: %s before its answer", far_side(m), s->ep_name,
                     m->h2_why);
            close_app(s);
            /* As for HTTP/1.1: a failed connect or a reset before the head is 503. */
            local_answer(s,
                         !connect      ? STREAM_RES_LOCAL_RESET
                         : m->outbound ? STREAM_RES_UPSTREAM_CONNECT_ERROR
                                       : STREAM_RES_LOCAL_CONNECT_ERROR,
                         m->expect && !m->req.done, msg);
            *progress = 1;
            return 0;
        }
        snprintf(msg, sizeof(msg), "%s %s: %s in the middle of its answer", far_side(m), s->ep_name,
                 m->h2_why);
        abort_conn(s, SESSION_RES_ERROR, msg);
        return 1;
    }
    if (!m->req.done) {
        size_t before = m->aout.len;
        ssize_t k = body_move(&m->req, &m->cin, m->h2s != NULL ? &m->aout : NULL, &why);
        if (k < 0) {
            if (m->res_head_done) {
                abort_conn(s, SESSION_RES_ERROR, why);
                return 1;
            }
            close_app(s);
            local_answer(s, STREAM_RES_BAD_REQUEST, 1, why);
            *progress = 1;
            return 0;
        }
        if (k > 0) {
            m->st.bytes_in += (uint64_t)k;
            *progress = 1;
        }
        if ((m->aout.len > before || m->req.done) && m->h2_deferred && m->h2s != NULL) {
            m->h2_deferred = 0;
            h2up_resume(m->h2s);
        }
        if (!m->req.done && m->cin.len < IO_CHUNK) {
            ssize_t n = read_into(s, 0, &m->cin, IO_CHUNK, wants0);
            if (n > 0) {
                *progress = 1;
            } else if (n == 0 || (n < 0 && n != -EAGAIN)) {
                abort_conn(s, SESSION_RES_OK, "the caller closed in the middle of a request");
                return 1;
            }
        }
    }
    if (m->req.done && m->aout.len == 0 && m->req_sent_ms == 0)
        m->req_sent_ms = loop_now_ms(s->host->loop);
    if (m->res_head_done && !m->res.done) {
        if (m->ain.len > 0 && m->cout.len < IO_CHUNK) {
            size_t k = m->ain.len < IO_CHUNK ? m->ain.len : IO_CHUNK;
            if (m->res.framing != HTTP_BODY_NONE) {
                char size[24];
                int hn = snprintf(size, sizeof(size), "%zx\r\n", k);
                if (m->res_chunked)
                    buf_add(&m->cout, size, (size_t)hn);
                buf_add(&m->cout, m->ain.p, k);
                if (m->res_chunked)
                    buf_add(&m->cout, "\r\n", 2);
            }
            buf_consume(&m->ain, k);
            if (m->h2s != NULL)
                h2up_consume(m->h2s, k);
            *progress = 1;
        }
        if (m->h2_end && m->ain.len == 0) {
            if (m->res_chunked) {
                buf_add(&m->cout, "0\r\n", 3);
                if (m->trailers.len > 0)
                    buf_add(&m->cout, m->trailers.p, m->trailers.len);
                buf_add(&m->cout, "\r\n", 2);
            }
            m->res.done = 1;
            *progress = 1;
        }
    }
    if (m->res_head_done && m->res.done && m->cout.len == 0) {
        stream_done(s, STREAM_RES_OK, NULL);
        *progress = 1;
    }
    return 0;
}

/*
 * Runs the codec until nothing moves, then registers the events each end waits for. Every
 * path that ends the session or hands it to the relay returns at once.
 */
static void pump_run(struct session *s);

static void pump(struct session *s)
{
    struct mux_h1 *m = s->mux;
    m->in_pump = 1;
    if (s->end[0].io.fired != 0)
        m->ev0 = 1;
    for (int i = 0; i < 2; i++) {
        if (s->end[i].io.fired != 0)
            m->rd_ok[i] = 1;
        s->end[i].io.fired = 0;
    }
    pump_run(s);
    /* The session may have finished (its memory is freed later) or become a tunnel. */
    if (s->mux == m)
        m->in_pump = 0;
}

static void pump_run(struct session *s)
{
    struct mux_h1 *m = s->mux;
    const char *why = NULL;
    char msg[400];
    for (;;) {
        if (m->phase == P_DIAL) {
            /* The dial owns end[1] and the timer; the caller is not read meanwhile. */
            session_want(s, 0, 0);
            return;
        }
        if (m->phase == P_BACKOFF) {
            /* A retry waits (mux_on_timer() dials it); the caller is not read meanwhile. */
            session_want(s, 0, 0);
            arm(s);
            return;
        }
        unsigned wants[2] = {0, 0};
        int progress = 0;
        ssize_t n;
        /* Out to the caller first: answers are small and free the way for the next. A complete
         * one stops counting as in flight before its end goes out. */
        if (m->phase == P_LOCAL || (m->res_head_done && m->res.done))
            stream_answered(&m->st);
        n = write_from(s, 0, &m->cout, &wants[0]);
        if (n > 0) {
            progress = 1;
        } else if (n < 0 && n != -EAGAIN) {
            abort_conn(s, SESSION_RES_ERROR, xprt_error(&s->end[0], (int)n));
            return;
        }
        if (s->end[1].fd >= 0 && m->phase != P_CONNECT && !m->app_wr_dead) {
            n = write_from(s, 1, &m->aout, &wants[1]);
            if (n > 0) {
                progress = 1;
            } else if (n < 0 && n != -EAGAIN) {
                /* The application stopped reading (it may still answer): the rest of the
                 * request is dropped, and the caller's connection closes after the answer. */
                m->app_wr_dead = 1;
                m->aout.len = 0;
                m->close_after = 1;
                m->app_keep = 0;
            }
        }
        switch (m->phase) {
        case P_HEAD: {
            if (s->end[1].fd >= 0) {
                /* An idle application connection: bytes or EOF mean it is no longer usable. */
                char junk[256];
                n = end_read(s, 1, junk, sizeof(junk), &wants[1]);
                if (n != -EAGAIN)
                    close_app(s);
            }
            int look = m->cin.len > m->head_max ||
                       blank_line(&m->cin, m->scanned > 2 ? m->scanned - 2 : 0);
            m->scanned = m->cin.len;
            if (look) {
                m->rq.headers = m->rq_h;
                m->rq.headers_cap = MAX_HEADERS;
                int rc = h1_parse_request(m->cin.p, m->cin.len, m->head_max, &m->rq, &why);
                if (rc > 0) {
                    on_head(s, (size_t)rc);
                    progress = 1;
                    break;
                }
                if (rc == -EBADMSG || rc == -EMSGSIZE) {
                    stream_begin(&m->st, ++m->nstreams, loop_now_ms(s->host->loop), NULL);
                    m->minor = 1;
                    m->req_keep = 0;
                    body_init(&m->req, HTTP_BODY_NONE, 0);
                    m->cin.len = 0;
                    local_answer(
                        s, rc == -EBADMSG ? STREAM_RES_BAD_REQUEST : STREAM_RES_HEADERS_TOO_LARGE,
                        1, why);
                    progress = 1;
                    break;
                }
            }
            n = read_into(s, 0, &m->cin, m->head_max + IO_CHUNK, &wants[0]);
            if (n > 0) {
                if (m->head_start_ms == 0)
                    m->head_start_ms = loop_now_ms(s->host->loop);
                progress = 1;
            } else if (n == 0) {
                session_finish(s, SESSION_RES_OK,
                               m->cin.len == 0 ? "closed"
                                               : "closed in the middle of a request head");
                return;
            } else if (n != -EAGAIN) {
                session_finish(s, SESSION_RES_ERROR, xprt_error(&s->end[0], (int)n));
                return;
            }
            break;
        }
        case P_CONNECT: {
            if (!m->app_writable) {
                wants[1] |= LOOP_WRITE;
                break;
            }
            int rc = sock_connect_result(s->end[1].fd);
            if (rc != 0) {
                snprintf(msg, sizeof(msg), "connect %s: %s", s->ep_name, util_strerror(rc));
                close_app(s);
                buf_consume(&m->cin, m->rq_len);
                memset(&m->rq, 0, sizeof(m->rq));
                local_answer(s, STREAM_RES_LOCAL_CONNECT_ERROR, m->expect && !m->req.done, msg);
            } else {
                send_request(s);
            }
            progress = 1;
            break;
        }
        case P_DIAL:
        case P_BACKOFF:
            break; /* returned above */
        case P_EXCHANGE: {
            note_request_done(s);
            if (m->h2) {
                if (exchange_h2(s, &wants[0], &progress) != 0)
                    return;
                break;
            }
            /* The request body: caller -> application (or dropped). While the request may
             * be retried, a failed write stops it instead (the answer or the end decides). */
            if (!m->req.done && !(m->app_wr_dead && m->replay_ok)) {
                size_t from = m->aout.len;
                ssize_t k = body_move(&m->req, &m->cin, m->app_wr_dead ? NULL : &m->aout, &why);
                if (k < 0) {
                    if (m->res_head_done) {
                        abort_conn(s, SESSION_RES_ERROR, why);
                        return;
                    }
                    close_app(s);
                    local_answer(s, STREAM_RES_BAD_REQUEST, 1, why);
                    progress = 1;
                    break;
                }
                if (k > 0) {
                    m->st.bytes_in += (uint64_t)k;
                    hold(m, from);
                    note_request_done(s);
                    progress = 1;
                }
                if (!m->req.done && m->cin.len < IO_CHUNK) {
                    n = read_into(s, 0, &m->cin, IO_CHUNK, &wants[0]);
                    if (n > 0) {
                        progress = 1;
                    } else if (n == 0 || (n < 0 && n != -EAGAIN)) {
                        abort_conn(s, SESSION_RES_OK,
                                   "the caller closed in the middle of a request");
                        return;
                    }
                }
            }
            if (m->req.done && m->aout.len == 0 && m->req_sent_ms == 0)
                m->req_sent_ms = loop_now_ms(s->host->loop);
            /* The response: application -> caller. */
            if (!m->res_head_done && m->ain.len > 0) {
                m->rs.headers = m->rs_h;
                m->rs.headers_cap = MAX_HEADERS;
                int rc =
                    h1_parse_response(m->ain.p, m->ain.len, H1_HEAD_MAX, m->method, &m->rs, &why);
                if (rc > 0) {
                    if (retry_on_answer(s)) {
                        progress = 1;
                        break;
                    }
                    if (on_response_head(s, (size_t)rc) != 0) {
                        progress = 1;
                        break;
                    }
                    progress = 1;
                } else if (rc != -EAGAIN) {
                    snprintf(msg, sizeof(msg), "bad response from %s: %s", far_side(m), why);
                    close_app(s);
                    local_answer(s, STREAM_RES_BAD_RESPONSE, !m->req.done, msg);
                    progress = 1;
                    break;
                }
            }
            if (m->res_head_done && !m->res.done && m->res.framing != HTTP_BODY_TUNNEL) {
                ssize_t k = body_move(&m->res, &m->ain, &m->cout, &why);
                if (k < 0) {
                    snprintf(msg, sizeof(msg), "bad response body from %s: %s", far_side(m), why);
                    abort_conn(s, SESSION_RES_ERROR, msg);
                    return;
                }
                if (k > 0)
                    progress = 1;
            }
            size_t ain_max = m->res_head_done ? IO_CHUNK : H1_HEAD_MAX + IO_CHUNK;
            if (!m->res.done || !m->res_head_done) {
                if (m->res.framing == HTTP_BODY_TUNNEL && m->res_head_done) {
                    /* The tunnel starts once the 101 and the request are out. */
                } else if (m->ain.len < ain_max) {
                    n = read_into(s, 1, &m->ain, ain_max, &wants[1]);
                    if (n > 0) {
                        if (!m->app_heard) {
                            /* It reached someone: it is not sent again, unless a retry
                             * policy reads the answer's head first (retry_on_answer()). */
                            m->app_heard = 1;
                            if (m->pol.retries_left == 0)
                                replay_drop(m);
                        }
                        progress = 1;
                    } else if (n == 0 || (n < 0 && n != -EAGAIN)) {
                        const char *what = n == 0 ? "closed" : xprt_error(&s->end[1], (int)n);
                        if (m->res_head_done && m->res.framing == HTTP_BODY_UNTIL_CLOSE && n == 0) {
                            m->res.done = 1;
                            m->app_keep = 0;
                            progress = 1;
                        } else if (!m->res_head_done && !m->app_heard && m->replay_ok &&
                                   m->app_served > 0 && !m->retried) {
                            retry(s, what);
                            progress = 1;
                            break;
                        } else if (!m->res_head_done && (m->pol.retry_on & ROUTE_RETRY_ON_RESET) &&
                                   retry_allowed(s, 1)) {
                            snprintf(msg, sizeof(msg), "%s before its answer", what);
                            retry_backoff(s, 1, msg);
                            progress = 1;
                            break;
                        } else if (!m->res_head_done) {
                            snprintf(msg, sizeof(msg), "%s %s before its answer", far_side(m),
                                     what);
                            if (m->outbound)
                                session_warn_unavailable(s, m->st.seq, msg);
                            close_app(s);
                            /* As Envoy: a reset before the response head is 503, a broken
                             * head 502. */
                            local_answer(s, STREAM_RES_LOCAL_RESET, !m->req.done, msg);
                            progress = 1;
                            break;
                        } else {
                            snprintf(msg, sizeof(msg), "%s %s in the middle of its answer",
                                     far_side(m), what);
                            abort_conn(s, SESSION_RES_ERROR, msg);
                            return;
                        }
                    }
                }
            }
            if (m->res_head_done && m->res.framing == HTTP_BODY_TUNNEL && m->cout.len == 0 &&
                m->req.done && m->aout.len == 0) {
                become_tunnel(s);
                return;
            }
            /* Outbound, an answer before the whole request (the upstream's sidecar denied it
             * and drops the rest): the body is still carried, so the application's connection
             * knows where the next request starts and both connections stay. The upstream's
             * sidecar reads it; one that stops reading ends it (app_wr_dead). */
            int req_pending = m->outbound && !m->req.done && !m->app_wr_dead;
            if (m->res_head_done && m->res.done && m->cout.len == 0 && !req_pending) {
                stream_done(s, STREAM_RES_OK, NULL);
                progress = 1;
            }
            break;
        }
        case P_LOCAL: {
            /* The answer is queued; the rest of the request body is read and dropped. */
            if (!m->close_after && !m->req.done) {
                ssize_t k = body_move(&m->req, &m->cin, NULL, &why);
                if (k < 0) {
                    m->close_after = 1;
                } else if (k > 0) {
                    m->st.bytes_in += (uint64_t)k;
                    progress = 1;
                }
                if (!m->req.done && !m->close_after) {
                    n = read_into(s, 0, &m->cin, IO_CHUNK, &wants[0]);
                    if (n > 0) {
                        progress = 1;
                    } else if (n == 0 || (n < 0 && n != -EAGAIN)) {
                        abort_conn(s, SESSION_RES_OK,
                                   "the caller closed in the middle of a request");
                        return;
                    }
                }
            }
            if (m->cout.len == 0 && (m->req.done || m->close_after)) {
                stream_done(s, m->local_result, m->why);
                progress = 1;
            }
            break;
        }
        case P_CLOSING: {
            if (m->cout.len > 0)
                break;
            if (!s->end[0].wr_shut) {
                int rc = xprt_shutdown(&s->end[0]);
                if (rc == 0) {
                    s->end[0].wr_shut = 1;
                    progress = 1;
                } else if (rc == -EAGAIN) {
                    wants[0] |= xprt_wants(&s->end[0], LOOP_WRITE);
                    break;
                } else {
                    session_finish(s, SESSION_RES_OK, m->why);
                    return;
                }
            }
            /* Lingering: what the caller still sends is read and dropped, so closing does not
             * reset the connection before it read the answer. */
            char junk[4096];
            n = xprt_read(&s->end[0], junk, sizeof(junk));
            if (n > 0) {
                m->lingered += (size_t)n;
                progress = 1;
            }
            if (n == 0 || (n < 0 && n != -EAGAIN) || m->lingered > LINGER_BYTES) {
                session_finish(s, SESSION_RES_OK, m->why);
                return;
            }
            if (n == -EAGAIN)
                wants[0] |= xprt_wants(&s->end[0], LOOP_READ);
            break;
        }
        }
        if (s->state == S_DONE)
            return;
        if (progress) {
            s->last_io_ms = loop_now_ms(s->host->loop);
            continue;
        }
        /* Waiting: empty buffers go back to the pool, so a connection holds none while its
         * application thinks or its caller is idle. */
        buf_release(&m->cin);
        buf_release(&m->cout);
        buf_release(&m->ain);
        buf_release(&m->aout);
        arm(s);
        /* While the answer is awaited the caller is not read, but its read interest is kept
         * registered until an event shows it matters (bytes sent ahead, or a hang-up): taking
         * it off and putting it back would cost two epoll_ctl calls per request. Registered
         * then, a caller's close after its answer is queued before whatever comes later, such
         * as its next connection: outbound, this session puts its upstream connection back in
         * the pool before that connection looks there. */
        if (wants[0] == 0 && m->phase == P_EXCHANGE && !m->ev0)
            wants[0] = LOOP_READ;
        if (session_want(s, 0, wants[0]) == 0 && s->end[1].fd >= 0)
            session_want(s, 1, wants[1]);
        return;
    }
}

/* ---- the carrier ---- */

static void app_on_io(struct loop_io *io, unsigned events)
{
    struct session *s = io->data;
    if (s->mux != NULL && (events & (LOOP_WRITE | LOOP_ERROR)))
        s->mux->app_writable = 1;
    session_on_io(io, events);
}

static void mux_advance(struct session *s)
{
    pump(s);
}

static void mux_on_timer(struct session *s)
{
    struct mux_h1 *m = s->mux;
    enum deadline kind;
    uint64_t d = deadline(s, &kind), now = loop_now_ms(s->host->loop);
    m->armed_at = 0;
    if (d == 0)
        return;
    if (now < d) {
        m->armed_at = d;
        loop_timer_start(s->host->loop, &s->timer, d - now);
        return;
    }
    char why[512];
    switch (kind) {
    case DL_HEAD:
        stream_begin(&m->st, ++m->nstreams, m->head_start_ms, NULL);
        m->minor = 1;
        m->req_keep = 0;
        body_init(&m->req, HTTP_BODY_NONE, 0);
        m->cin.len = 0;
        snprintf(why, sizeof(why),
                 "no complete request head in %lu ms (request_headers_timeout_ms)",
                 (unsigned long)s->snap->cfg.request_headers_timeout_ms);
        local_answer(s, STREAM_RES_HEADERS_TIMEOUT, 1, why);
        break;
    case DL_CONNECT:
        snprintf(why, sizeof(why), "connect %s timed out (local_connect_timeout_ms %lu)",
                 s->ep_name, (unsigned long)s->snap->cfg.local_connect_timeout_ms);
        close_app(s);
        buf_consume(&m->cin, m->rq_len);
        memset(&m->rq, 0, sizeof(m->rq));
        local_answer(s, STREAM_RES_LOCAL_CONNECT_ERROR, m->expect && !m->req.done, why);
        break;
    case DL_RESPONSE:
        snprintf(why, sizeof(why), "no complete answer in %lu ms (local_request_timeout_ms)",
                 (unsigned long)s->snap->cfg.local_request_timeout_ms);
        close_app(s);
        if (m->res_head_done) {
            abort_conn(s, SESSION_RES_TIMEOUT, why);
            return;
        }
        local_answer(s, STREAM_RES_LOCAL_TIMEOUT, 0, why);
        break;
    case DL_ROUTE:
    case DL_ROUTE_IDLE:
        if (route_timed_out(s, kind == DL_ROUTE_IDLE, now))
            return;
        break;
    case DL_BACKOFF:
        retry_attempt(s);
        return;
    case DL_LINGER:
        session_finish(s, SESSION_RES_OK, m->why);
        return;
    case DL_IDLE:
        snprintf(why, sizeof(why), "idle for %llu ms (local_idle_timeout_ms)",
                 (unsigned long long)(now - s->last_io_ms));
        abort_conn(s, SESSION_RES_IDLE_TIMEOUT, why);
        return;
    default:
        return;
    }
    pump(s);
}

static void mux_start(struct session *s)
{
    struct mux_h1 *m = xcalloc(1, sizeof(*m));
    const struct proxy_cfg *c = &s->snap->cfg;
    s->mux = m;
    s->mux_free = mux_free;
    s->carrier = &mux_h1_mux;
    m->cin.pool = m->cout.pool = m->ain.pool = m->aout.pool = m->target.pool = s->host;
    m->replay.pool = m->trailers.pool = m->h2held.pool = s->host;
    m->replay_max = s->inbound ? REPLAY_MAX : s->up->cfg->retry_buffer_bytes;
    session_set_state(s, S_HTTP);
    loop_timer_stop(s->host->loop, &s->timer);
    m->head_max = (size_t)c->max_request_headers_kb * 1024u;
    m->outbound = !s->inbound;
    m->sess = s;
    /* The far side speaks HTTP/2 when the service (inbound) or the upstream is http2 or grpc:
     * an h2c application, or an HTTP/2 mesh hop. */
    struct session_app app;
    session_app(s, &app);
    int far = m->outbound ? s->up->protocol : app.protocol;
    m->h2 = far == PROTO_HTTP2 || far == PROTO_GRPC;
    m->rd_ok[0] = m->rd_ok[1] = 1;
    /* An event session.c already read for (the sniffed first bytes) is not one for us: it
     * would make the first exchange drop the caller's read interest (see pump_run()). */
    s->end[0].io.fired = s->end[1].io.fired = 0;
    /* The TLS end reads ahead (tls.c): it is read only until a read drains it (end_read()
     * asks xprt_pending()), and a connection handed to the relay or the pool is checked the
     * same way. */
    /* Outbound, no XFCC: the upstream's sidecar writes it from our certificate. */
    if (!m->outbound && s->end[0].tls != NULL) {
        stream_xfcc(s, m->xfcc, sizeof(m->xfcc));
        struct http_header *f = &m->xfcc_field;
        *f = (struct http_header){.name = {"X-Forwarded-Client-Cert", 23},
                                  .value = {m->xfcc, strlen(m->xfcc)}};
        if (h1_field_ok(f->name, f->value))
            f->flags = HTTP_HDR_H1OK;
    }
    s->last_io_ms = loop_now_ms(s->host->loop);
    next_stream(s);
    /* The bytes read to tell HTTP/1 from HTTP/2 (session.c's sniffing) start the first head;
     * a session's buf[0] is empty when it was not sniffed. */
    if (s->buf[0].len > 0) {
        buf_add(&m->cin, s->buf[0].data + s->buf[0].off, s->buf[0].len);
        m->head_start_ms = s->last_io_ms;
        s->buf[0].len = 0;
    }
    session_buf_give_back(s->host, &s->buf[0]);
    pump(s);
}

/*
 * Outbound: the dial asked for by on_head() ended (session.c), end[1] verified or <why> it
 * failed: the request goes out, or gets a 503 and the application's connection stays.
 */
static void mux_dialled(struct session *s, const char *why)
{
    struct mux_h1 *m = s->mux;
    count_dial_failovers(s);
    if (why != NULL && (m->pol.retry_on & ROUTE_RETRY_ON_CONNECT) && retry_allowed(s, 0)) {
        retry_backoff(s, 0, why);
    } else if (why != NULL) {
        char msg[600];
        snprintf(msg, sizeof(msg), "upstream %s: %s", s->up->cfg->destination_name, why);
        session_warn_unavailable(s, m->st.seq, why);
        buf_consume(&m->cin, m->rq_len);
        memset(&m->rq, 0, sizeof(m->rq));
        local_answer(
            s, s->dial_overflow ? STREAM_RES_UPSTREAM_OVERFLOW : STREAM_RES_UPSTREAM_CONNECT_ERROR,
            m->expect && !m->req.done, msg);
    } else if (m->h2) {
        struct h2up_conn *c = s->h2c;
        s->h2c = NULL;
        if (c == NULL || open_stream(s, c) != 0) {
            char msg[400];
            snprintf(msg, sizeof(msg), "upstream %s: the HTTP/2 connection to %s takes no stream",
                     s->up->cfg->destination_name, s->ep_name);
            buf_consume(&m->cin, m->rq_len);
            memset(&m->rq, 0, sizeof(m->rq));
            local_answer(s, STREAM_RES_UPSTREAM_CONNECT_ERROR, m->expect && !m->req.done, msg);
        }
    } else {
        m->app_keep = 1;
        m->app_served = s->dial_pooled ? 1 : 0;
        /* A pooled connection was drained while idle (the pool drops one that says anything):
         * its answer comes with an event, and a read before that would only say EAGAIN. */
        m->rd_ok[1] = !s->dial_pooled || xprt_pending(&s->end[1]);
        m->rd_wants[1] = LOOP_READ | xprt_wants(&s->end[1], LOOP_READ);
        send_request(s);
    }
    s->last_io_ms = loop_now_ms(s->host->loop);
    if (!m->in_pump)
        pump(s);
}

/* The session ends for any reason (shutdown, lifetime, re-authorization, an error): the
 * stream in progress, if any, gets its record. */
static void mux_on_finish(struct session *s, const char *reason)
{
    struct mux_h1 *m = s->mux;
    if (m != NULL && m->phase != P_HEAD && m->phase != P_CLOSING)
        stream_finish(s, &m->st, STREAM_RES_ABORTED, reason);
    if (m != NULL && m->h2s != NULL) {
        h2up_cancel(m->h2s, H2_CANCEL);
        m->h2s = NULL;
    }
    /* Outbound, between requests: a kept-alive upstream connection serves the application's
     * next connection (session_pool_put decides whether it may). */
    if (m != NULL && m->outbound && m->phase == P_HEAD && s->state == S_HTTP && m->app_keep &&
        s->end[1].fd >= 0 && m->ain.len == 0 && m->aout.len == 0 && !s->end[1].rd_eof &&
        !xprt_pending(&s->end[1]))
        session_pool_put(s);
}

/*
 * connectd drains: a connection between requests with nothing buffered ends now; one in the
 * middle of a request gets its answer (with "Connection: close" when its head is still to be
 * written) and then closes, as Envoy's HTTP/1.1 codec does while draining, so that idle
 * keep-alive connections do not hold connectd until -drain-timeout.
 */
static void mux_drain(struct session *s)
{
    struct mux_h1 *m = s->mux;
    if (m == NULL || m->draining)
        return;
    m->draining = 1;
    if (m->phase == P_HEAD && m->cin.len == 0 && m->cout.len == 0) {
        session_finish(s, SESSION_RES_OK, "drained: closed between requests");
        return;
    }
    if (m->phase == P_HEAD || m->phase == P_CLOSING)
        return; /* a head under way is the last (on_head); a closing connection closes */
    m->req_keep = 0;
    if (m->res_head_done)
        m->close_after = 1;
}

const struct session_mux mux_h1_mux = {
    .name = "http1",
    .start = mux_start,
    .advance = mux_advance,
    .on_timer = mux_on_timer,
    .on_finish = mux_on_finish,
    .dialled = mux_dialled,
    .drain = mux_drain,
};
