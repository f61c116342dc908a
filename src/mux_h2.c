/*
 * mux_h2: the inbound HTTP/2 codec. Two HTTP/2 sessions (h2.h) joined stream by stream: a
 * server session on the caller's connection (the TLS end, end[0]) and a client session on one
 * prior-knowledge (h2c) connection to the local application (end[1]), dialled when the codec
 * starts. A caller's stream is authorized on its head and, when allowed, opened on the
 * application's connection at once (the client session queues it while the connect is under
 * way); stream ids differ per leg.
 *
 *   caller HEADERS --> authorize --allow--> app stream --> response head, DATA, trailers --> caller
 *                          |                    |  \--app RST / connection lost: 503 before the
 *                          |                    |     response head, else RST to the caller
 *                          |                    '--local_request_timeout_ms: 504 (or RST)
 *                          '--deny 403 / refuse 400 / redirect 307 (gRPC: trailers-only,
 *                             HTTP 200 with grpc-status)
 *   caller RST --> app stream reset (CANCEL); every stream ends in stream_finish()
 *   caller GOAWAY / EOF, a protocol error or a flood (h2.c's bounds) --> the connection ends
 *
 * Bodies stream both ways without being buffered whole: bytes one leg's session hands over
 * wait in the stream's buffer until the other leg's session pulls them (read_body), and only
 * then are they given back to the first leg's flow control (h2_consume), so a slow reader on
 * one side stops the writer on the other once the HTTP/2 windows are spent. A stream holds at
 * most one receive window (H2_DEFAULT_STREAM_WINDOW_BYTES) each way; frames waiting for a
 * socket are bounded by OUT_MAX per end, and the caller is read only while its output is under
 * that bound.
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
 * Timers (the session's one state timer, set to the earliest deadline): local_connect_timeout_ms
 * while the application's connection is being set up (every stream on it: 503),
 * local_request_timeout_ms from the end of a request to the end of its response (504 before the
 * response head, else both legs' streams are reset), and the idle timeout
 * (local_idle_timeout_ms) since anything last moved.
 */
#include "mux_h2.h"
#include "h1parse.h"
#include "h2.h"
#include "log.h"
#include "pathnorm.h"
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

struct buf {
    char *p;
    size_t len, cap;
};

/* A copied field section (trailers), one allocation. */
struct fields {
    struct http_header *h;
    size_t n;
};

enum app_state {
    APP_CONNECTING,
    APP_UP,
    APP_DEAD, /* failed or lost: new streams are answered 503 */
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
};

/* One caller stream and its application stream. */
struct h2s {
    struct h2s *next, *prev;
    int32_t cid;      /* on the caller's session */
    int32_t aid;      /* on the application's session; 0 when none was opened */
    int app_open;     /* the application's stream exists and points at this one */
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
    char why[200];
    struct stream st;
};

struct mux_h2 {
    struct h2_session *down; /* the caller's connection (server) */
    struct h2_session *up;   /* the application's connection (client); NULL once dead */
    enum app_state app;
    int app_writable; /* end[1] reported writable while connecting */
    char app_why[300];
    int down_failed; /* the caller's session ended in an error: flush and close */
    struct buf cout, aout;
    struct h2s *streams;
    uint64_t nstreams;
    uint64_t connect_start_ms;
    char xfcc[STREAM_XFCC_MAX];
    uint8_t rbuf[IO_CHUNK];
};

/* ---- buffers ---- */

static void buf_reserve(struct buf *b, size_t need)
{
    if (b->cap >= need)
        return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < need)
        cap *= 2;
    b->p = xrealloc(b->p, cap);
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
    free(b->p);
    memset(b, 0, sizeof(*b));
}

static void fields_copy(struct fields *f, const struct http_header *h, size_t n)
{
    size_t bytes = n * sizeof(*h);
    for (size_t i = 0; i < n; i++)
        bytes += h[i].name.len + h[i].value.len;
    free(f->h);
    f->h = xmalloc(bytes ? bytes : 1);
    f->n = n;
    char *p = (char *)(f->h + n);
    for (size_t i = 0; i < n; i++) {
        memcpy(p, h[i].name.p, h[i].name.len);
        f->h[i].name = (struct http_slice){p, h[i].name.len};
        p += h[i].name.len;
        memcpy(p, h[i].value.p, h[i].value.len);
        f->h[i].value = (struct http_slice){p, h[i].value.len};
        p += h[i].value.len;
        f->h[i].flags = 0;
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
    struct h2s *x = xcalloc(1, sizeof(*x));
    x->cid = cid;
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
    if (x->prev != NULL)
        x->prev->next = x->next;
    else
        m->streams = x->next;
    if (x->next != NULL)
        x->next->prev = x->prev;
    buf_free(&x->reqb);
    buf_free(&x->resb);
    free(x->req_tr.h);
    free(x->res_tr.h);
    free(x);
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
    x->h1 = NULL;
    loop_defer(s->host->loop, &l->reap, leg_free);
}

static void app_stream_drop(struct session *s, struct h2s *x, uint32_t code)
{
    struct mux_h2 *m = s->mux2;
    if (!x->app_open)
        return;
    x->app_open = 0;
    if (x->h1 != NULL) {
        leg_close(s, x);
        return;
    }
    if (m->up != NULL) {
        h2_submit_rst(m->up, x->aid, code);
        h2_stream_set_user(m->up, x->aid, NULL);
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

static const char *local_text(enum stream_result r)
{
    switch (r) {
    case STREAM_RES_DENIED:
        return "RBAC: access denied";
    case STREAM_RES_LOCAL_CONNECT_ERROR:
        return "upstream connect error or disconnect/reset before headers. reset reason: "
               "connection failure";
    case STREAM_RES_LOCAL_RESET:
        return "upstream connect error or disconnect/reset before headers. reset reason: "
               "connection termination";
    case STREAM_RES_LOCAL_TIMEOUT:
        return "upstream request timeout";
    case STREAM_RES_BAD_RESPONSE:
        return "upstream connect error or disconnect/reset before headers. reset reason: "
               "protocol error";
    case STREAM_RES_RATE_LIMITED:
        return "local_rate_limited";
    case STREAM_RES_REDIRECT:
        return "";
    default:
        return "bad request";
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
    h2_consume(m->down, x->cid, x->reqb.len);
    x->reqb.len = 0;
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
    const char *text = local_text(r);
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
    struct h2_out_head oh = {.status = status, .headers = h, .nheaders = n};
    if (h2_submit_response(m->down, x->cid, &oh, x->resb.len > 0) != 0)
        h2_submit_rst(m->down, x->cid, H2_INTERNAL_ERROR);
}

/* ---- protocol http: HTTP/2 streams as HTTP/1.1 exchanges ---- */

static void resume_down(struct mux_h2 *m, struct h2s *x);

static void leg_on_io(struct loop_io *io, unsigned events)
{
    struct h1leg *l = (struct h1leg *)((char *)io - offsetof(struct h1leg, x.io));
    if (events & (LOOP_WRITE | LOOP_ERROR))
        l->writable = 1;
    session_on_io(io, events);
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
 * Opens the HTTP/1.1 exchange of stream <x> with the application: dials a connection of its
 * own and queues the request head (<target>: the normalized path; <f>: the fields with the
 * forwarded extras, the flagged ones left out). A body without content-length is sent chunked.
 */
static void leg_open(struct session *s, struct h2s *x, const struct h2_head *hd,
                     struct http_slice target, const struct http_header *f, size_t nf)
{
    const struct proxy_cfg *c = &s->snap->cfg;
    int unix_sock = c->local_socket_path[0] != '\0';
    int fd = unix_sock ? sock_connect_unix(c->local_socket_path)
                       : sock_connect(c->local_address, c->local_port);
    if (unix_sock)
        snprintf(s->ep_name, sizeof(s->ep_name), "unix:%s", c->local_socket_path);
    else
        snprintf(s->ep_name, sizeof(s->ep_name), "%s:%d", c->local_address, c->local_port);
    if (fd < 0) {
        char why[400];
        snprintf(why, sizeof(why), "connect %s: %s", s->ep_name, util_strerror(fd));
        local_answer(s, x, STREAM_RES_LOCAL_CONNECT_ERROR, why, (struct http_slice){0});
        return;
    }
    struct h1leg *l = xcalloc(1, sizeof(*l));
    l->x.fd = fd;
    loop_io_init(&l->x.io, fd, leg_on_io, s);
    l->connect_start_ms = loop_now_ms(s->host->loop);
    l->method = method_of(hd->method);
    struct buf *o = &l->out;
    buf_add(o, hd->method.p, hd->method.len);
    buf_add(o, " ", 1);
    buf_add(o, target.p, target.len);
    buf_add(o, " HTTP/1.1\r\nhost: ", 17);
    buf_add(o, hd->authority.p, hd->authority.len);
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
    x->h1 = l;
    x->app_open = 1;
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
                leg_fail(s, x, STREAM_RES_BAD_RESPONSE, "bad chunked body from the application");
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
        leg_fail(s, x, STREAM_RES_ABORTED, "the application closed in the middle of its answer");
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
                leg_fail(s, x, STREAM_RES_LOCAL_RESET, "the application closed before its answer");
                return -1;
            }
            return 0;
        }
        if (rc < 0 || rs.status == 101 || rs.framing == HTTP_BODY_TUNNEL) {
            snprintf(msg, sizeof(msg), "bad response from the application: %s",
                     why != NULL ? why : "an upgrade");
            leg_fail(s, x, STREAM_RES_BAD_RESPONSE, msg);
            return -1;
        }
        if (rs.status < 200) {
            buf_consume(&l->in, (size_t)rc);
            continue;
        }
        int has_body = !(rs.framing == HTTP_BODY_NONE ||
                         (rs.framing == HTTP_BODY_LENGTH && rs.content_length == 0));
        struct h2_out_head oh = {.status = rs.status, .headers = h, .nheaders = rs.nheaders};
        x->st.status = rs.status;
        x->res_head = 1;
        l->head_done = 1;
        l->body.framing = has_body ? rs.framing : HTTP_BODY_NONE;
        l->body.remaining = rs.content_length;
        h1_chunked_init(&l->body.ch);
        if (h2_submit_response(m->down, x->cid, &oh, has_body) != 0) {
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
        if (l == NULL)
            continue;
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
                buf_add(&l->out, hex, (size_t)k);
            }
            buf_add(&l->out, x->reqb.p, n);
            if (l->chunked)
                buf_add(&l->out, "\r\n", 2);
            buf_consume(&x->reqb, n);
            h2_consume(m->down, x->cid, n);
            progress = 1;
        }
        if (!l->req_done && x->reqb.len == 0 && x->req_eof) {
            if (l->chunked)
                buf_add(&l->out, "0\r\n\r\n", 5);
            l->req_done = 1;
        }
        if (l->out.len > 0) {
            ssize_t n = xprt_write(&l->x, l->out.p, l->out.len);
            if (n > 0) {
                buf_consume(&l->out, (size_t)n);
                progress = 1;
            } else if (n == -EAGAIN) {
                wants |= LOOP_WRITE;
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
            } else if (n == -EAGAIN) {
                wants |= LOOP_READ;
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
            /* The answer is complete: the connection is not reused. */
            leg_close(s, x);
            x->app_open = 0;
            continue;
        }
        loop_io_want(s->host->loop, &l->x.io, wants);
    }
    return progress;
}

/* ---- the caller's session (server) ---- */

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
        f[nf].flags = 0;
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
    struct stream_req sr = {
        .method = hd->method,
        .target = connect ? hd->authority : hd->path,
        .origin = !connect,
        .authority = hd->authority,
        .headers = f,
        .nheaders = nf,
    };
    size_t cap = PATHNORM_OUT_MAX(sr.target.len), tlen = 0;
    char *target = xmalloc(cap);
    enum stream_verdict v = stream_authorize(s, &x->st, &sr, target, cap, &tlen, why, sizeof(why));
    session_count_request_decision(s, v == STREAM_ALLOW);
    struct http_slice t = {target, tlen};
    if (v != STREAM_ALLOW) {
        local_answer(s, x, stream_verdict_result(v), why, t);
        goto out;
    }
    set_why(x, why);
    if (s->snap->cfg.protocol == PROTO_HTTP && connect) {
        local_answer(s, x, STREAM_RES_BAD_RESPONSE,
                     "CONNECT over HTTP/2 to an http service is not translated to HTTP/1.1", t);
        goto out;
    }
    if (s->snap->cfg.protocol != PROTO_HTTP && (m->app == APP_DEAD || m->up == NULL)) {
        local_answer(s, x, STREAM_RES_LOCAL_CONNECT_ERROR, m->app_why, t);
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
    f[nf++] = (struct http_header){.name = {"x-forwarded-client-cert", 23},
                                   .value = {m->xfcc, strlen(m->xfcc)}};
    f[nf++] = (struct http_header){.name = {"x-forwarded-proto", 17}, .value = {"https", 5}};
    if (!have_id) {
        stream_new_request_id(&x->st);
        f[nf++] = (struct http_header){.name = {"x-request-id", 12},
                                       .value = {x->st.request_id, strlen(x->st.request_id)}};
    }
    if (s->snap->cfg.protocol == PROTO_HTTP) {
        leg_open(s, x, hd, t, f, nf);
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
    int32_t aid = h2_submit_request(m->up, &oh, !hd->end_stream, x);
    if (aid < 0) {
        local_answer(s, x, STREAM_RES_LOCAL_CONNECT_ERROR,
                     aid == -ESHUTDOWN ? "the application's connection takes no new stream "
                                         "(GOAWAY)"
                                       : "the request cannot be forwarded over HTTP/2",
                     t);
        goto out;
    }
    x->aid = aid;
    x->app_open = 1;
out:
    free(target);
    return 0;
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
    if (x->local || !x->app_open) {
        h2_consume(m->down, cid, len); /* dropped */
        return 0;
    }
    buf_add(&x->reqb, p, len);
    if (x->req_defer && m->up != NULL) {
        x->req_defer = 0;
        h2_resume(m->up, x->aid);
    }
    return 0;
}

static int down_on_trailers(struct h2_session *hs, int32_t cid, void *su,
                            const struct http_header *f, size_t n, void *user)
{
    struct h2s *x = su;
    (void)hs;
    (void)cid;
    (void)user;
    if (x != NULL && !x->local && x->app_open)
        fields_copy(&x->req_tr, f, n);
    return 0;
}

static void down_on_end_stream(struct h2_session *hs, int32_t cid, void *su, void *user)
{
    struct session *s = user;
    struct mux_h2 *m = s->mux2;
    struct h2s *x = su;
    (void)hs;
    (void)cid;
    if (x == NULL)
        return;
    x->req_eof = 1;
    x->req_end_ms = loop_now_ms(s->host->loop);
    if (x->req_defer && x->app_open && m->up != NULL) {
        x->req_defer = 0;
        h2_resume(m->up, x->aid);
    }
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
    stream_finish(s, &x->st, r, reason);
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
        if (x->app_open && x->h1 == NULL && m->up != NULL)
            h2_consume(m->up, x->aid, n);
    }
    if (x->resb.len == 0 && x->res_eof) {
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
    LOG_DEBUG("conn=%llu in: the caller sent GOAWAY (last stream %d, code 0x%x)",
              (unsigned long long)s->id, (int)last, code);
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

/* ---- the application's session (client) ---- */

static void resume_down(struct mux_h2 *m, struct h2s *x)
{
    if (x->res_defer) {
        x->res_defer = 0;
        h2_resume(m->down, x->cid);
    }
}

static int up_on_head(struct h2_session *hs, int32_t aid, void *su, const struct h2_head *hd,
                      void *user)
{
    struct session *s = user;
    struct mux_h2 *m = s->mux2;
    struct h2s *x = su;
    (void)hs;
    (void)aid;
    if (x == NULL || x->local)
        return -1;
    if (hd->status < 200)
        return 0; /* interim answers are not passed on */
    if (x->res_head)
        return -1;
    x->st.status = hd->status;
    note_grpc_status(x, hd->headers, hd->nheaders);
    struct h2_out_head oh = {
        .status = hd->status, .headers = hd->headers, .nheaders = hd->nheaders};
    x->res_head = 1;
    x->res_eof = hd->end_stream;
    if (h2_submit_response(m->down, x->cid, &oh, !hd->end_stream) != 0) {
        snprintf(x->why, sizeof(x->why), "the application's response head cannot be forwarded");
        x->local = 1;
        x->result = STREAM_RES_BAD_RESPONSE;
        h2_submit_rst(m->down, x->cid, H2_INTERNAL_ERROR);
        return -1;
    }
    return 0;
}

static int up_on_data(struct h2_session *hs, int32_t aid, void *su, const uint8_t *p, size_t len,
                      void *user)
{
    struct session *s = user;
    struct mux_h2 *m = s->mux2;
    struct h2s *x = su;
    (void)hs;
    if (x == NULL || x->local) {
        h2_consume(m->up, aid, len);
        return 0;
    }
    buf_add(&x->resb, p, len);
    resume_down(m, x);
    return 0;
}

static int up_on_trailers(struct h2_session *hs, int32_t aid, void *su, const struct http_header *f,
                          size_t n, void *user)
{
    struct h2s *x = su;
    (void)hs;
    (void)aid;
    (void)user;
    if (x != NULL && !x->local) {
        fields_copy(&x->res_tr, f, n);
        note_grpc_status(x, f, n);
    }
    return 0;
}

static void up_on_end_stream(struct h2_session *hs, int32_t aid, void *su, void *user)
{
    struct session *s = user;
    struct h2s *x = su;
    (void)hs;
    (void)aid;
    if (x == NULL || x->local)
        return;
    x->res_eof = 1;
    resume_down(s->mux2, x);
}

static void up_on_close(struct h2_session *hs, int32_t aid, void *su, uint32_t code, void *user)
{
    struct session *s = user;
    struct mux_h2 *m = s->mux2;
    struct h2s *x = su;
    char why[200];
    (void)hs;
    (void)aid;
    if (x == NULL || !x->app_open)
        return;
    x->app_open = 0;
    /* Request bytes no one will forward go back to the caller's window. */
    h2_consume(m->down, x->cid, x->reqb.len);
    x->reqb.len = 0;
    if (x->local || (code == H2_NO_ERROR && x->res_eof))
        return;
    snprintf(why, sizeof(why), "the application reset its stream (HTTP/2 error 0x%x)", code);
    if (!x->res_head) {
        local_answer(s, x, STREAM_RES_LOCAL_RESET, why, (struct http_slice){0});
        return;
    }
    /* Mid-response: the caller's stream is reset the same way. */
    set_why(x, why);
    x->local = 1;
    x->result = STREAM_RES_ABORTED;
    h2_submit_rst(m->down, x->cid, code == H2_NO_ERROR ? H2_INTERNAL_ERROR : code);
}

static void up_on_goaway(struct h2_session *hs, int32_t last, uint32_t code, void *user)
{
    struct session *s = user;
    (void)hs;
    LOG_DEBUG("conn=%llu in: the application sent GOAWAY (last stream %d, code 0x%x)",
              (unsigned long long)s->id, (int)last, code);
}

static ssize_t up_read_body(struct h2_session *hs, int32_t aid, void *su, uint8_t *buf, size_t cap,
                            unsigned *flags, void *user)
{
    struct session *s = user;
    struct mux_h2 *m = s->mux2;
    struct h2s *x = su;
    (void)hs;
    if (x == NULL || x->local)
        return -EIO;
    size_t n = x->reqb.len < cap ? x->reqb.len : cap;
    if (n > 0) {
        memcpy(buf, x->reqb.p, n);
        buf_consume(&x->reqb, n);
        h2_consume(m->down, x->cid, n);
    }
    if (x->reqb.len == 0 && x->req_eof) {
        *flags |= H2_BODY_EOF;
        if (x->req_tr.n > 0) {
            *flags |= H2_BODY_TRAILERS;
            h2_submit_trailers(m->up, aid, x->req_tr.h, x->req_tr.n);
        }
        return (ssize_t)n;
    }
    if (n == 0) {
        x->req_defer = 1;
        return H2_BODY_DEFER;
    }
    return (ssize_t)n;
}

static const struct h2_callbacks up_cb = {
    .on_head = up_on_head,
    .on_data = up_on_data,
    .on_trailers = up_on_trailers,
    .on_end_stream = up_on_end_stream,
    .on_close = up_on_close,
    .on_goaway = up_on_goaway,
    .read_body = up_read_body,
};

/* ---- the application's connection ---- */

static void app_on_io(struct loop_io *io, unsigned events)
{
    struct session *s = io->data;
    if (s->mux2 != NULL && (events & (LOOP_WRITE | LOOP_ERROR)))
        s->mux2->app_writable = 1;
    session_on_io(io, events);
}

/*
 * The application's connection failed or was lost (<r>: how streams without a response head
 * are answered): every stream on it is answered or reset, and later streams get 503. Not from
 * an h2 callback of the application's session (it frees it).
 */
static void app_fail(struct session *s, enum stream_result r, const char *why)
{
    struct mux_h2 *m = s->mux2;
    if (m->app == APP_DEAD)
        return;
    m->app = APP_DEAD;
    copy_str_cut(m->app_why, sizeof(m->app_why), why);
    LOG_DEBUG("conn=%llu in: %s", (unsigned long long)s->id, why);
    struct h2_session *up = m->up;
    m->up = NULL; /* app_stream_drop() and local_answer() leave it alone now */
    for (struct h2s *x = m->streams; x != NULL; x = x->next) {
        if (!x->app_open || x->h1 != NULL)
            continue;
        x->app_open = 0;
        h2_consume(m->down, x->cid, x->reqb.len);
        x->reqb.len = 0;
        if (!x->res_head) {
            local_answer(s, x, r, why, (struct http_slice){0});
        } else if (!x->res_eof) {
            set_why(x, why);
            x->local = 1;
            x->result = STREAM_RES_ABORTED;
            h2_submit_rst(m->down, x->cid, H2_INTERNAL_ERROR);
        }
    }
    h2_session_free(up);
    xprt_close(s->host->loop, &s->end[1]);
    m->aout.len = 0;
}

static void connect_app(struct session *s)
{
    struct mux_h2 *m = s->mux2;
    const struct proxy_cfg *c = &s->snap->cfg;
    int unix_sock = c->local_socket_path[0] != '\0';
    int fd = unix_sock ? sock_connect_unix(c->local_socket_path)
                       : sock_connect(c->local_address, c->local_port);
    if (unix_sock)
        snprintf(s->ep_name, sizeof(s->ep_name), "unix:%s", c->local_socket_path);
    else
        snprintf(s->ep_name, sizeof(s->ep_name), "%s:%d", c->local_address, c->local_port);
    m->connect_start_ms = loop_now_ms(s->host->loop);
    if (fd < 0) {
        char why[400];
        snprintf(why, sizeof(why), "connect %s: %s", s->ep_name, util_strerror(fd));
        app_fail(s, STREAM_RES_LOCAL_CONNECT_ERROR, why);
        return;
    }
    memset(&s->end[1], 0, sizeof(s->end[1]));
    s->end[1].fd = fd;
    loop_io_init(&s->end[1].io, fd, app_on_io, s);
    m->app = APP_CONNECTING;
}

/* ---- timers ---- */

enum deadline {
    DL_NONE,
    DL_CONNECT,
    DL_REQUEST,
    DL_IDLE,
};

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
    if (m->app == APP_CONNECTING)
        CONSIDER(m->connect_start_ms + c->local_connect_timeout_ms, DL_CONNECT);
    for (const struct h2s *x = m->streams; x != NULL; x = x->next)
        if (x->h1 != NULL && !x->h1->connected)
            CONSIDER(x->h1->connect_start_ms + c->local_connect_timeout_ms, DL_CONNECT);
    if (c->local_request_timeout_ms != 0)
        for (const struct h2s *x = m->streams; x != NULL; x = x->next)
            if (x->app_open && x->req_end_ms != 0 && !x->res_eof)
                CONSIDER(x->req_end_ms + c->local_request_timeout_ms, DL_REQUEST);
    if (idle != 0)
        CONSIDER(s->last_io_ms + idle, DL_IDLE);
#undef CONSIDER
    return best;
}

static void arm(struct session *s)
{
    enum deadline kind;
    uint64_t d = deadline(s, &kind), now = loop_now_ms(s->host->loop);
    if (d == 0) {
        loop_timer_stop(s->host->loop, &s->timer);
        return;
    }
    loop_timer_start(s->host->loop, &s->timer, d > now ? d - now : 0);
}

/* ---- the pump ---- */

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
            STAT_ADD(s->lstat->bytes_out, (uint64_t)n);
        }
    } else if (n == -EAGAIN) {
        *wants |= xprt_wants(&s->end[i], LOOP_WRITE);
    }
    return n;
}

static void caller_failed(struct session *s)
{
    struct mux_h2 *m = s->mux2;
    if (m->down_failed)
        return;
    m->down_failed = 1;
    const char *e = h2_error(m->down);
    const struct h2_stats *st = h2_get_stats(m->down);
    LOG_WARN("conn=%llu in src=%s: HTTP/2 connection ended: %s (streams %llu, resets received "
             "%llu, refused %llu)",
             (unsigned long long)s->id, LOG_ESC(s->caller), LOG_ESC(e != NULL ? e : "error"),
             (unsigned long long)st->streams_opened, (unsigned long long)st->resets_received,
             (unsigned long long)st->streams_refused);
    STAT_ADD(s->host->stats->counters.h2_protocol_closed, 1);
}

static void pump(struct session *s)
{
    struct mux_h2 *m = s->mux2;
    char why[400];
    for (;;) {
        int progress = 0;
        unsigned wants[2] = {0, 0};
        ssize_t n;
        if (m->app == APP_CONNECTING && m->app_writable) {
            int rc = sock_connect_result(s->end[1].fd);
            if (rc != 0) {
                snprintf(why, sizeof(why), "connect %s: %s", s->ep_name, util_strerror(rc));
                app_fail(s, STREAM_RES_LOCAL_CONNECT_ERROR, why);
            } else {
                m->app = APP_UP;
            }
            progress = 1;
        }
        /* The caller: read while what we owe it is under the bound. */
        if (!m->down_failed && m->cout.len < OUT_MAX && h2_wants_read(m->down)) {
            n = xprt_read(&s->end[0], m->rbuf, sizeof(m->rbuf));
            if (n > 0) {
                s->bytes[0] += (uint64_t)n;
                STAT_ADD(s->lstat->bytes_in, (uint64_t)n);
                if (h2_feed(m->down, m->rbuf, (size_t)n) < 0)
                    caller_failed(s);
                progress = 1;
            } else if (n == 0) {
                session_finish(s, SESSION_RES_OK, "closed");
                return;
            } else if (n == -EAGAIN) {
                wants[0] |= xprt_wants(&s->end[0], LOOP_READ);
            } else {
                session_finish(s, SESSION_RES_ERROR, xprt_error(&s->end[0], (int)n));
                return;
            }
        }
        /* The application. */
        if (m->app == APP_UP && m->up != NULL && h2_wants_read(m->up)) {
            n = xprt_read(&s->end[1], m->rbuf, sizeof(m->rbuf));
            if (n > 0) {
                if (h2_feed(m->up, m->rbuf, (size_t)n) < 0) {
                    const char *e = h2_error(m->up);
                    snprintf(why, sizeof(why), "the application broke HTTP/2: %s",
                             e != NULL ? e : "error");
                    app_fail(s, STREAM_RES_BAD_RESPONSE, why);
                }
                progress = 1;
            } else if (n == 0 || n != -EAGAIN) {
                snprintf(why, sizeof(why), "the application %s",
                         n == 0 ? "closed its connection" : xprt_error(&s->end[1], (int)n));
                app_fail(s, STREAM_RES_LOCAL_RESET, why);
                progress = 1;
            } else {
                wants[1] |= LOOP_READ;
            }
        }
        if (m->up != NULL) {
            int f = fill(m->up, &m->aout);
            if (f < 0) {
                const char *e = h2_error(m->up);
                snprintf(why, sizeof(why), "the application's HTTP/2 session failed: %s",
                         e != NULL ? e : "error");
                app_fail(s, STREAM_RES_BAD_RESPONSE, why);
                progress = 1;
            } else if (f > 0) {
                progress = 1;
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
        n = write_from(s, 0, &m->cout, &wants[0]);
        if (n > 0) {
            progress = 1;
        } else if (n < 0 && n != -EAGAIN) {
            session_finish(s, SESSION_RES_ERROR, xprt_error(&s->end[0], (int)n));
            return;
        }
        if (m->app == APP_UP && m->aout.len > 0) {
            n = write_from(s, 1, &m->aout, &wants[1]);
            if (n > 0) {
                progress = 1;
            } else if (n < 0 && n != -EAGAIN) {
                snprintf(why, sizeof(why), "writing to the application: %s",
                         xprt_error(&s->end[1], (int)n));
                app_fail(s, STREAM_RES_LOCAL_RESET, why);
                progress = 1;
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
        if (s->state == S_DONE)
            return;
        if (progress) {
            s->last_io_ms = loop_now_ms(s->host->loop);
            continue;
        }
        if (m->app == APP_CONNECTING)
            wants[1] = LOOP_WRITE;
        arm(s);
        if (session_want(s, 0, wants[0]) == 0 && s->end[1].fd >= 0)
            session_want(s, 1, wants[1]);
        return;
    }
}

/* ---- the carrier ---- */

static void mux_free(struct mux_h2 *m)
{
    if (m == NULL)
        return;
    while (m->streams != NULL)
        stream_free(m, m->streams);
    h2_session_free(m->down);
    h2_session_free(m->up);
    buf_free(&m->cout);
    buf_free(&m->aout);
    free(m);
}

static void mux_advance(struct session *s)
{
    pump(s);
}

static void mux_on_timer(struct session *s)
{
    struct mux_h2 *m = s->mux2;
    enum deadline kind;
    uint64_t now = loop_now_ms(s->host->loop);
    uint64_t d = deadline(s, &kind);
    char why[400];
    if (d == 0 || d > now) {
        arm(s);
        return;
    }
    const struct proxy_cfg *c = &s->snap->cfg;
    switch (kind) {
    case DL_CONNECT:
        snprintf(why, sizeof(why), "connect %s timed out (local_connect_timeout_ms %lu)",
                 s->ep_name, (unsigned long)c->local_connect_timeout_ms);
        if (m->app == APP_CONNECTING && m->connect_start_ms + c->local_connect_timeout_ms <= now)
            app_fail(s, STREAM_RES_LOCAL_CONNECT_ERROR, why);
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

static void mux_start(struct session *s)
{
    struct mux_h2 *m = xcalloc(1, sizeof(*m));
    const struct proxy_cfg *c = &s->snap->cfg;
    s->mux2 = m;
    s->mux2_free = mux_free;
    s->carrier = &mux_h2_mux;
    session_set_state(s, S_HTTP);
    loop_timer_stop(s->host->loop, &s->timer);
    stream_xfcc(s, m->xfcc, sizeof(m->xfcc));
    struct h2_limits lim = {.max_header_list_bytes = c->max_request_headers_kb * 1024u};
    m->down = h2_session_new(H2_SERVER, &lim, &down_cb, s);
    if (c->protocol != PROTO_HTTP)
        m->up = h2_session_new(H2_CLIENT, NULL, &up_cb, s);
    s->last_io_ms = loop_now_ms(s->host->loop);
    if (c->protocol == PROTO_HTTP)
        m->app = APP_DEAD; /* each stream dials its own HTTP/1.1 connection (leg_open) */
    else
        connect_app(s);
    /* The preface read to tell HTTP/2 from HTTP/1 (session.c's sniffing) goes first. */
    if (s->buf[0].len > 0 &&
        h2_feed(m->down, (const uint8_t *)s->buf[0].data + s->buf[0].off, s->buf[0].len) < 0)
        caller_failed(s);
    s->buf[0].len = 0;
    s->buf[0].off = 0;
    session_buf_give_back(s->host, &s->buf[0]);
    pump(s);
}

/* The session ends for any reason: each open stream gets its record. */
static void mux_on_finish(struct session *s, const char *reason)
{
    struct mux_h2 *m = s->mux2;
    if (m == NULL)
        return;
    for (struct h2s *x = m->streams; x != NULL; x = x->next)
        leg_close(s, x);
    for (struct h2s *x = m->streams; x != NULL; x = x->next)
        stream_finish(s, &x->st,
                      x->local && x->res_eof && x->resb.len == 0 ? x->result : STREAM_RES_ABORTED,
                      x->why[0] ? x->why : reason);
}

const struct session_mux mux_h2_mux = {
    .name = "http2",
    .start = mux_start,
    .advance = mux_advance,
    .on_timer = mux_on_timer,
    .on_finish = mux_on_finish,
};
