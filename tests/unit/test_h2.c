/*
 * test_h2: the HTTP/2 codec with both ends in memory. A client session and a server session
 * feed each other's output (pump()); attacks come from a raw client, frames written by hand
 * (a tiny frame writer and an HPACK literal encoder below), and the server's answer is read
 * back frame by frame. Nothing here includes nghttp2.h: the tests see only h2.h, as the mux
 * will.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nghttp2/nghttp2.h>

#include "h2.h"

/* ---- one end: what its callbacks saw, per stream ---------------------------------------- */

#define MAXID 1024

struct sst {
    int heads, status, end_stream_flag, ends, closes, trailers_n;
    uint32_t close_code;
    char method[16], path[64], authority[64], hdr[256], trailers[256];
    size_t nheaders;
    int unflagged; /* delivered fields (head and trailers) without HTTP_HDR_H2OK */
    size_t got, delivered_unconsumed;
    uint64_t sum;
    /* Body to send. */
    const uint8_t *body;
    size_t body_len, body_off, body_avail; /* body_avail: bytes "buffered" so far */
    int body_trailers;
    int deferred;
};

struct side {
    struct h2_session *s;
    int auto_consume;
    int heads, closes, goaways;
    uint32_t goaway_code;
    int32_t goaway_last;
    int fail_on_head; /* on_head returns this when non-zero */
    struct sst st[MAXID];
};

static void copy_slice(char *dst, size_t cap, struct http_slice sl)
{
    size_t n = sl.len < cap - 1 ? sl.len : cap - 1;
    if (n > 0)
        memcpy(dst, sl.p, n);
    dst[n] = '\0';
}

/* "name=value;" for each field, into <dst>. */
static void copy_fields(char *dst, size_t cap, const struct http_header *f, size_t n)
{
    size_t used = 0;
    dst[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        int w = snprintf(dst + used, cap - used, "%.*s=%.*s;", (int)f[i].name.len, f[i].name.p,
                         (int)f[i].value.len, f[i].value.p);
        if (w < 0 || (size_t)w >= cap - used)
            break;
        used += (size_t)w;
    }
}

static struct sst *sst_of(struct side *d, int32_t id)
{
    assert_true(id > 0 && id < MAXID);
    return &d->st[id];
}

static int on_head(struct h2_session *s, int32_t id, void *su, const struct h2_head *h, void *u)
{
    struct side *d = u;
    struct sst *t = sst_of(d, id);
    (void)s;
    (void)su;
    d->heads++;
    t->heads++;
    t->status = h->status;
    t->end_stream_flag = h->end_stream;
    t->nheaders = h->nheaders;
    copy_slice(t->method, sizeof(t->method), h->method);
    copy_slice(t->path, sizeof(t->path), h->path);
    copy_slice(t->authority, sizeof(t->authority), h->authority);
    copy_fields(t->hdr, sizeof(t->hdr), h->headers, h->nheaders);
    for (size_t i = 0; i < h->nheaders; i++)
        t->unflagged += !(h->headers[i].flags & HTTP_HDR_H2OK);
    return d->fail_on_head;
}

static int on_data(struct h2_session *s, int32_t id, void *su, const uint8_t *p, size_t n, void *u)
{
    struct side *d = u;
    struct sst *t = sst_of(d, id);
    (void)su;
    for (size_t i = 0; i < n; i++)
        t->sum = t->sum * 31 + p[i];
    t->got += n;
    if (d->auto_consume)
        assert_int_equal(h2_consume(s, id, n), 0);
    else
        t->delivered_unconsumed += n;
    return 0;
}

static int on_trailers(struct h2_session *s, int32_t id, void *su, const struct http_header *f,
                       size_t n, void *u)
{
    struct sst *t = sst_of(u, id);
    (void)s;
    (void)su;
    t->trailers_n = (int)n;
    copy_fields(t->trailers, sizeof(t->trailers), f, n);
    for (size_t i = 0; i < n; i++)
        t->unflagged += !(f[i].flags & HTTP_HDR_H2OK);
    return 0;
}

static void on_end_stream(struct h2_session *s, int32_t id, void *su, void *u)
{
    (void)s;
    (void)su;
    sst_of(u, id)->ends++;
}

static void on_close(struct h2_session *s, int32_t id, void *su, uint32_t code, void *u)
{
    struct side *d = u;
    (void)s;
    (void)su;
    d->closes++;
    sst_of(d, id)->closes++;
    sst_of(d, id)->close_code = code;
}

static void on_goaway(struct h2_session *s, int32_t last, uint32_t code, void *u)
{
    struct side *d = u;
    (void)s;
    d->goaways++;
    d->goaway_code = code;
    d->goaway_last = last;
}

static const struct http_header grpc_ok[] = {
    {{"grpc-status", 11}, {"0", 1}, 0},
    {{"grpc-message", 12}, {"fine", 4}, 0},
};

static ssize_t read_body(struct h2_session *s, int32_t id, void *su, uint8_t *buf, size_t cap,
                         unsigned *flags, void *u)
{
    struct sst *t = sst_of(u, id);
    (void)su;
    size_t left = t->body_avail - t->body_off;
    if (left == 0 && t->body_off < t->body_len) {
        t->deferred++;
        return H2_BODY_DEFER;
    }
    size_t n = left < cap ? left : cap;
    memcpy(buf, t->body + t->body_off, n);
    t->body_off += n;
    if (t->body_off == t->body_len) {
        *flags |= H2_BODY_EOF;
        if (t->body_trailers) {
            *flags |= H2_BODY_TRAILERS;
            /* Trailers submitted from inside the pull, as a gRPC mux would. */
            assert_int_equal(h2_submit_trailers(s, id, grpc_ok, 2), 0);
        }
    }
    return (ssize_t)n;
}

static const struct h2_callbacks cbs = {on_head,  on_data,   on_trailers, on_end_stream,
                                        on_close, on_goaway, read_body};

static struct side *side_new(enum h2_role role, const struct h2_limits *lim)
{
    struct side *d = calloc(1, sizeof(*d));
    assert_non_null(d);
    d->auto_consume = 1;
    d->s = h2_session_new(role, lim, &cbs, d);
    return d;
}

static void side_free(struct side *d)
{
    h2_session_free(d->s);
    free(d);
}

/* Moves bytes both ways until neither end has anything to say; returns the bytes moved. */
static size_t pump(struct side *a, struct side *b)
{
    static uint8_t buf[16384];
    size_t moved = 0;
    for (int round = 0; round < 100000; round++) {
        ssize_t n1 = h2_output(a->s, buf, sizeof(buf));
        assert_true(n1 >= 0);
        if (n1 > 0)
            assert_int_equal(h2_feed(b->s, buf, (size_t)n1), n1);
        ssize_t n2 = h2_output(b->s, buf, sizeof(buf));
        assert_true(n2 >= 0);
        if (n2 > 0)
            assert_int_equal(h2_feed(a->s, buf, (size_t)n2), n2);
        moved += (size_t)n1 + (size_t)n2;
        if (n1 == 0 && n2 == 0)
            return moved;
    }
    fail_msg("pump did not settle");
    return moved;
}

static struct h2_out_head get_head(const char *path)
{
    struct h2_out_head h = {0};
    h.method = (struct http_slice){"GET", 3};
    h.scheme = (struct http_slice){"http", 4};
    h.authority = (struct http_slice){"svc.example", 11};
    h.path = (struct http_slice){path, strlen(path)};
    return h;
}

/* ---- a raw peer: frames by hand --------------------------------------------------------- */

struct raw {
    uint8_t *p;
    size_t len, cap;
};

static void raw_put(struct raw *r, const void *p, size_t n)
{
    if (r->len + n > r->cap) {
        r->cap = (r->len + n) * 2 + 64;
        r->p = realloc(r->p, r->cap);
        assert_non_null(r->p);
    }
    memcpy(r->p + r->len, p, n);
    r->len += n;
}

static void raw_byte(struct raw *r, uint8_t b)
{
    raw_put(r, &b, 1);
}

enum {
    F_DATA = 0,
    F_HEADERS = 1,
    F_RST = 3,
    F_SETTINGS = 4,
    F_PING = 6,
    F_GOAWAY = 7,
    F_WINDOW_UPDATE = 8,
    F_CONTINUATION = 9
};
#define FL_END_STREAM  0x1
#define FL_ACK         0x1
#define FL_END_HEADERS 0x4

static void raw_frame(struct raw *r, uint8_t type, uint8_t flags, uint32_t sid, const void *pl,
                      size_t n)
{
    uint8_t hd[9] = {
        (uint8_t)(n >> 16),   (uint8_t)(n >> 8),    (uint8_t)n,          type,        flags,
        (uint8_t)(sid >> 24), (uint8_t)(sid >> 16), (uint8_t)(sid >> 8), (uint8_t)sid};
    raw_put(r, hd, 9);
    if (n > 0)
        raw_put(r, pl, n);
}

static void raw_preface(struct raw *r)
{
    raw_put(r, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 24);
    raw_frame(r, F_SETTINGS, 0, 0, NULL, 0);
}

static void raw_u32(struct raw *r, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    raw_put(r, b, 4);
}

/* HPACK integer with an <prefix>-bit prefix (RFC 7541 section 5.1). */
static void hp_int(struct raw *r, uint8_t first, int prefix, size_t v)
{
    size_t max = ((size_t)1 << prefix) - 1;
    if (v < max) {
        raw_byte(r, (uint8_t)(first | v));
        return;
    }
    raw_byte(r, (uint8_t)(first | max));
    v -= max;
    while (v >= 128) {
        raw_byte(r, (uint8_t)(v % 128 + 128));
        v /= 128;
    }
    raw_byte(r, (uint8_t)v);
}

/* A literal field without indexing, new name, no Huffman. */
static void hp_field(struct raw *r, const char *name, const char *value)
{
    raw_byte(r, 0x00);
    hp_int(r, 0, 7, strlen(name));
    raw_put(r, name, strlen(name));
    hp_int(r, 0, 7, strlen(value));
    raw_put(r, value, strlen(value));
}

static void hp_get(struct raw *r, const char *authority)
{
    hp_field(r, ":method", "GET");
    hp_field(r, ":scheme", "http");
    hp_field(r, ":path", "/");
    if (authority != NULL)
        hp_field(r, ":authority", authority);
}

/* A whole GET request on <sid> (END_STREAM), with an optional Host field. */
static void raw_get(struct raw *r, uint32_t sid, const char *authority, const char *host)
{
    struct raw blk = {0};
    hp_get(&blk, authority);
    if (host != NULL)
        hp_field(&blk, "host", host);
    raw_frame(r, F_HEADERS, FL_END_HEADERS | FL_END_STREAM, sid, blk.p, blk.len);
    free(blk.p);
}

/* What the server answered, frame by frame. */
struct answer {
    int frames, rst, goaway, headers, settings;
    uint32_t rst_code[64], rst_sid[64];
    uint32_t goaway_code;
    char status[64][4];
};

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Reads all the output of <s> and sorts it into <a>. */
static void drain(struct h2_session *s, struct answer *a)
{
    static uint8_t out[1 << 20];
    size_t len = 0;
    memset(a, 0, sizeof(*a));
    for (;;) {
        ssize_t n = h2_output(s, out + len, sizeof(out) - len);
        assert_true(n >= 0);
        if (n == 0)
            break;
        len += (size_t)n;
    }
    for (size_t off = 0; off + 9 <= len;) {
        size_t n = (size_t)out[off] << 16 | (size_t)out[off + 1] << 8 | out[off + 2];
        uint8_t type = out[off + 3];
        uint32_t sid = be32(out + off + 5) & 0x7fffffffu;
        const uint8_t *pl = out + off + 9;
        assert_true(off + 9 + n <= len);
        a->frames++;
        if (type == F_RST && a->rst < 64) {
            a->rst_sid[a->rst] = sid;
            a->rst_code[a->rst++] = be32(pl);
        } else if (type == F_GOAWAY) {
            a->goaway++;
            a->goaway_code = be32(pl + 4);
        } else if (type == F_HEADERS && a->headers < 64) {
            /* Our server's answers start with an indexed or literal :status; only 431 matters
             * here, which nghttp2 sends as a literal with the name indexed (":status" = 8). */
            const char *hit = memmem(pl, n, "431", 3);
            memcpy(a->status[a->headers++], hit != NULL ? "431" : "???", 4);
        } else if (type == F_SETTINGS) {
            a->settings++;
        }
        off += 9 + n;
    }
}

/* ---- tests ------------------------------------------------------------------------------ */

/* A GET and its response: pseudo-fields split out, regular fields in order, body, ends. */
static void test_get_and_response(void **state)
{
    (void)state;
    struct side *c = side_new(H2_CLIENT, NULL), *v = side_new(H2_SERVER, NULL);
    struct http_header hs[] = {{{"X-Trace", 7}, {"abc", 3}, 0},
                               {{"Connection", 10}, {"keep-alive", 10}, 0},
                               {{"host", 4}, {"other", 5}, 0}};
    struct h2_out_head h = get_head("/hello?x=1");
    h.headers = hs;
    h.nheaders = 3;
    int32_t id = h2_submit_request(c->s, &h, 0, NULL);
    assert_true(id > 0);
    pump(c, v);
    struct sst *rq = &v->st[id];
    assert_int_equal(rq->heads, 1);
    assert_string_equal(rq->method, "GET");
    assert_string_equal(rq->path, "/hello?x=1");
    assert_string_equal(rq->authority, "svc.example");
    /* Lower-cased; Connection (forbidden in HTTP/2) and Host (authority given) left out. */
    assert_string_equal(rq->hdr, "x-trace=abc;");
    /* What nghttp2 accepted is flagged fit to be sent on as it is (no second check). */
    assert_int_equal(rq->unflagged, 0);
    assert_int_equal(rq->end_stream_flag, 1);
    assert_int_equal(rq->ends, 1);

    static const uint8_t body[] = "hello, world";
    rq->body = body;
    rq->body_len = rq->body_avail = sizeof(body) - 1;
    struct http_header rh[] = {{{"content-type", 12}, {"text/plain", 10}, 0}};
    struct h2_out_head resp = {.status = 200, .headers = rh, .nheaders = 1};
    assert_int_equal(h2_submit_response(v->s, id, &resp, 1), 0);
    assert_int_equal(h2_submit_response(v->s, id, &resp, 1), -EALREADY);
    pump(c, v);
    struct sst *rs = &c->st[id];
    assert_int_equal(rs->status, 200);
    assert_string_equal(rs->hdr, "content-type=text/plain;");
    assert_int_equal(rs->unflagged, 0);
    assert_int_equal(rs->got, sizeof(body) - 1);
    assert_int_equal(rs->ends, 1);
    assert_int_equal(rs->closes, 1);
    assert_int_equal(rs->close_code, H2_NO_ERROR);
    assert_int_equal(rq->closes, 1);
    assert_int_equal(h2_open_streams(c->s), 0);
    assert_int_equal(h2_open_streams(v->s), 0);
    assert_null(h2_error(c->s));
    assert_null(h2_error(v->s));
    side_free(c);
    side_free(v);
}

/*
 * Back-pressure: a 1 MiB POST into a 128 KiB stream window. While the server does not
 * consume, the transfer stops at the window and stays there however often we pump; each
 * h2_consume() lets more through, and the body arrives whole. A body the client has not
 * buffered yet is deferred and resumed.
 */
static void test_post_backpressure(void **state)
{
    (void)state;
    const size_t total = 1u << 20, win = 128u * 1024u;
    uint8_t *body = malloc(total);
    assert_non_null(body);
    uint64_t want = 0;
    for (size_t i = 0; i < total; i++) {
        body[i] = (uint8_t)(i * 7 + (i >> 9));
        want = want * 31 + body[i];
    }
    struct h2_limits lim = {.stream_window_bytes = (uint32_t)win, .conn_window_bytes = 2 * win};
    struct side *c = side_new(H2_CLIENT, NULL), *v = side_new(H2_SERVER, &lim);
    v->auto_consume = 0;
    struct h2_out_head h = get_head("/upload");
    h.method = (struct http_slice){"POST", 4};
    int32_t id = h2_submit_request(c->s, &h, 1, NULL);
    assert_true(id > 0);
    struct sst *out = &c->st[id], *in = &v->st[id];
    out->body = body;
    out->body_len = total;
    out->body_avail = 0; /* nothing buffered yet: the pull defers */
    pump(c, v);
    assert_true(out->deferred > 0);
    assert_int_equal(in->heads, 1);
    assert_int_equal(in->got, 0);

    out->body_avail = total;
    assert_int_equal(h2_resume(c->s, id), 0);
    pump(c, v);
    assert_int_equal(in->got, win);
    assert_int_equal(out->body_off, win);
    assert_int_equal(h2_send_window(c->s, id), 0); /* stalled on the peer */
    pump(c, v);
    pump(c, v);
    assert_int_equal(in->got, win); /* no consume, no progress */
    assert_int_equal(h2_consume(v->s, id, in->delivered_unconsumed + 1), -EINVAL);

    int rounds = 0;
    while (in->ends == 0) {
        assert_true(++rounds < 1000);
        size_t n = in->delivered_unconsumed;
        assert_true(n > 0);
        /* Half now, half later: any amount reopens the window proportionally. */
        assert_int_equal(h2_consume(v->s, id, n / 2), 0);
        assert_int_equal(h2_consume(v->s, id, n - n / 2), 0);
        in->delivered_unconsumed = 0;
        pump(c, v);
        assert_true(in->got <= out->body_off); /* never more than the client gave */
    }
    assert_true(rounds >= 4);
    assert_int_equal(in->got, total);
    assert_true(in->sum == want);
    struct h2_out_head resp = {.status = 204};
    assert_int_equal(h2_submit_response(v->s, id, &resp, 0), 0);
    pump(c, v);
    assert_int_equal(c->st[id].status, 204);
    assert_int_equal(c->st[id].closes, 1);
    free(body);
    side_free(c);
    side_free(v);
}

/* gRPC: trailers after a body (grpc-status 0), and a trailers-only answer (grpc-status 7). */
static void test_grpc_trailers(void **state)
{
    (void)state;
    struct side *c = side_new(H2_CLIENT, NULL), *v = side_new(H2_SERVER, NULL);
    struct http_header hs[] = {{{"content-type", 12}, {"application/grpc", 16}, 0},
                               {{"te", 2}, {"trailers", 8}, 0}};
    struct h2_out_head h = get_head("/pkg.Svc/Call");
    h.method = (struct http_slice){"POST", 4};
    h.headers = hs;
    h.nheaders = 2;
    static const uint8_t msg[] = {0, 0, 0, 0, 2, 'h', 'i'};
    int32_t id = h2_submit_request(c->s, &h, 1, NULL);
    c->st[id].body = msg;
    c->st[id].body_len = c->st[id].body_avail = sizeof(msg);
    pump(c, v);
    assert_string_equal(v->st[id].hdr, "content-type=application/grpc;te=trailers;");
    assert_int_equal(v->st[id].got, sizeof(msg));
    assert_int_equal(v->st[id].ends, 1);

    struct http_header rh[] = {{{"content-type", 12}, {"application/grpc", 16}, 0}};
    struct h2_out_head resp = {.status = 200, .headers = rh, .nheaders = 1};
    v->st[id].body = msg;
    v->st[id].body_len = v->st[id].body_avail = sizeof(msg);
    v->st[id].body_trailers = 1;
    assert_int_equal(h2_submit_response(v->s, id, &resp, 1), 0);
    pump(c, v);
    assert_int_equal(c->st[id].status, 200);
    assert_int_equal(c->st[id].got, sizeof(msg));
    assert_int_equal(c->st[id].trailers_n, 2);
    assert_string_equal(c->st[id].trailers, "grpc-status=0;grpc-message=fine;");
    assert_int_equal(c->st[id].ends, 1);
    assert_int_equal(c->st[id].close_code, H2_NO_ERROR);

    /* Trailers-only: one HEADERS with END_STREAM, grpc-status among the head's fields. */
    int32_t id2 = h2_submit_request(c->s, &h, 0, NULL);
    pump(c, v);
    struct http_header deny[] = {{{"content-type", 12}, {"application/grpc", 16}, 0},
                                 {{"grpc-status", 11}, {"7", 1}, 0}};
    struct h2_out_head r2 = {.status = 200, .headers = deny, .nheaders = 2};
    assert_int_equal(h2_submit_response(v->s, id2, &r2, 0), 0);
    pump(c, v);
    assert_int_equal(c->st[id2].end_stream_flag, 1);
    assert_string_equal(c->st[id2].hdr, "content-type=application/grpc;grpc-status=7;");
    assert_int_equal(c->st[id2].trailers_n, 0);
    side_free(c);
    side_free(v);
}

/* RST_STREAM from the client: both ends see the stream close with CANCEL; the session goes on. */
static void test_rst_stream(void **state)
{
    (void)state;
    struct side *c = side_new(H2_CLIENT, NULL), *v = side_new(H2_SERVER, NULL);
    struct h2_out_head h = get_head("/slow");
    h.method = (struct http_slice){"POST", 4};
    int32_t id = h2_submit_request(c->s, &h, 1, NULL);
    static const uint8_t part[] = "partial";
    c->st[id].body = part;
    c->st[id].body_len = 100; /* more than is buffered: the stream stays open */
    c->st[id].body_avail = 7;
    pump(c, v);
    assert_int_equal(v->st[id].got, 7);
    assert_int_equal(h2_submit_rst(c->s, id, H2_CANCEL), 0);
    pump(c, v);
    assert_int_equal(c->st[id].closes, 1);
    assert_int_equal(c->st[id].close_code, H2_CANCEL);
    assert_int_equal(v->st[id].closes, 1);
    assert_int_equal(v->st[id].close_code, H2_CANCEL);
    assert_int_equal(h2_get_stats(v->s)->resets_received, 1);
    assert_int_equal(h2_consume(v->s, id, 1), 0); /* closed: a no-op */
    assert_int_equal(h2_submit_rst(c->s, id, H2_CANCEL), -EINVAL);
    /* The connection still serves. */
    int32_t id2 = h2_submit_request(c->s, &h, 0, NULL);
    pump(c, v);
    assert_int_equal(v->st[id2].heads, 1);
    /* A request reset before it left never reaches the server and closes with our code. */
    int32_t id3 = h2_submit_request(c->s, &h, 0, NULL);
    assert_int_equal(h2_submit_rst(c->s, id3, H2_CANCEL), 0);
    pump(c, v);
    assert_int_equal(c->st[id3].closes, 1);
    assert_int_equal(c->st[id3].close_code, H2_CANCEL);
    assert_int_equal(v->st[id3].heads, 0);
    assert_int_equal(h2_open_streams(c->s), 1); /* id2, still waiting for its response */
    side_free(c);
    side_free(v);
}

/*
 * A stream closed with bytes the caller never consumed gives them back to the connection
 * window: a client that fills the window on one stream and resets it cannot starve the
 * connection's other streams.
 */
static void test_reset_returns_connection_window(void **state)
{
    (void)state;
    struct h2_limits lim = {.stream_window_bytes = 65535, .conn_window_bytes = 65535};
    struct side *c = side_new(H2_CLIENT, NULL), *v = side_new(H2_SERVER, &lim);
    v->auto_consume = 0;
    static uint8_t body[100000];
    struct h2_out_head h = get_head("/");
    h.method = (struct http_slice){"POST", 4};
    int32_t id = h2_submit_request(c->s, &h, 1, NULL);
    c->st[id].body = body;
    c->st[id].body_len = c->st[id].body_avail = sizeof(body);
    pump(c, v);
    assert_int_equal(v->st[id].got, 65535);
    assert_int_equal(h2_send_window(c->s, 0), 0); /* the connection is spent */
    assert_int_equal(h2_submit_rst(c->s, id, H2_CANCEL), 0);
    pump(c, v);
    assert_int_equal(v->st[id].closes, 1);

    int32_t id2 = h2_submit_request(c->s, &h, 1, NULL);
    c->st[id2].body = body;
    c->st[id2].body_len = c->st[id2].body_avail = 1000;
    pump(c, v);
    assert_int_equal(v->st[id2].got, 1000);
    assert_int_equal(v->st[id2].ends, 1);
    side_free(c);
    side_free(v);
}

/* The server's concurrency limit: a raw client opening 5 streams at once gets 2 refused. */
static void test_concurrent_streams_refused(void **state)
{
    (void)state;
    struct h2_limits lim = {.max_concurrent_streams = 3};
    struct side *v = side_new(H2_SERVER, &lim);
    struct raw r = {0};
    raw_preface(&r);
    for (uint32_t sid = 1; sid <= 9; sid += 2)
        raw_get(&r, sid, "svc", NULL);
    assert_int_equal(h2_feed(v->s, r.p, r.len), (ssize_t)r.len);
    assert_int_equal(v->heads, 3);
    struct answer a;
    drain(v->s, &a);
    assert_int_equal(a.rst, 2);
    assert_int_equal(a.rst_code[0], H2_REFUSED_STREAM);
    assert_int_equal(a.rst_code[1], H2_REFUSED_STREAM);
    assert_int_equal(a.rst_sid[0], 7);
    assert_int_equal(a.rst_sid[1], 9);
    assert_int_equal(h2_get_stats(v->s)->streams_refused, 2);
    free(r.p);
    side_free(v);

    /* Our own client honours a server's limit: it queues, and all five complete. */
    struct side *c = side_new(H2_CLIENT, NULL);
    struct h2_limits two = {.max_concurrent_streams = 2};
    v = side_new(H2_SERVER, &two);
    pump(c, v); /* the server's SETTINGS first */
    int32_t ids[5];
    struct h2_out_head h = get_head("/");
    for (int i = 0; i < 5; i++)
        ids[i] = h2_submit_request(c->s, &h, 0, NULL);
    pump(c, v);
    assert_int_equal(v->heads, 2);
    int done = 0;
    for (int round = 0; round < 5 && done < 5; round++) {
        for (int i = 0; i < 5; i++) {
            struct h2_out_head resp = {.status = 200};
            if (v->st[ids[i]].heads == 1 && v->st[ids[i]].closes == 0)
                assert_int_equal(h2_submit_response(v->s, ids[i], &resp, 0), 0);
        }
        pump(c, v);
        done = c->closes;
    }
    assert_int_equal(done, 5);
    assert_int_equal(h2_get_stats(v->s)->streams_refused, 0);
    side_free(c);
    side_free(v);
}

/*
 * CVE-2023-44487 (rapid reset): a raw client opens streams and resets them at once. Past the
 * burst the server ends the session with GOAWAY(ENHANCE_YOUR_CALM), h2_feed() says so, and
 * the caller saw only about a burst of requests.
 */
static void test_rapid_reset_flood(void **state)
{
    (void)state;
    struct h2_limits lim = {.reset_burst = 10, .reset_rate_per_s = 1};
    struct side *v = side_new(H2_SERVER, &lim);
    struct raw r = {0};
    raw_preface(&r);
    for (uint32_t sid = 1; sid < 2 * 200; sid += 2) {
        raw_get(&r, sid, "svc", NULL);
        struct raw code = {0};
        raw_u32(&code, H2_CANCEL);
        raw_frame(&r, F_RST, 0, sid, code.p, code.len);
        free(code.p);
    }
    assert_int_equal(h2_feed(v->s, r.p, r.len), -EPROTO);
    assert_non_null(strstr(h2_error(v->s), "rapid reset"));
    assert_false(h2_wants_read(v->s));
    assert_true(h2_wants_write(v->s)); /* the GOAWAY */
    assert_true(v->heads <= 11);
    assert_int_equal(h2_get_stats(v->s)->resets_received, 11);
    struct answer a;
    drain(v->s, &a);
    assert_int_equal(a.goaway, 1);
    assert_int_equal(a.goaway_code, H2_ENHANCE_YOUR_CALM);
    assert_false(h2_wants_read(v->s));
    assert_false(h2_wants_write(v->s));
    assert_int_equal(h2_feed(v->s, r.p, 9), -EPROTO);
    free(r.p);
    side_free(v);

    /* Below the bound, resets are just resets. */
    v = side_new(H2_SERVER, &lim);
    r = (struct raw){0};
    raw_preface(&r);
    for (uint32_t sid = 1; sid < 2 * 10; sid += 2) {
        raw_get(&r, sid, "svc", NULL);
        struct raw code = {0};
        raw_u32(&code, H2_CANCEL);
        raw_frame(&r, F_RST, 0, sid, code.p, code.len);
        free(code.p);
    }
    assert_int_equal(h2_feed(v->s, r.p, r.len), (ssize_t)r.len);
    assert_int_equal(v->heads, 10);
    assert_int_equal(v->closes, 10);
    assert_null(h2_error(v->s));
    free(r.p);
    side_free(v);

    /* A client takes any number of resets from its server (REFUSED_STREAM under load). */
    struct side *c = side_new(H2_CLIENT, &lim);
    v = side_new(H2_SERVER, NULL);
    struct h2_out_head h = get_head("/");
    for (int i = 0; i < 30; i++) {
        int32_t id = h2_submit_request(c->s, &h, 0, NULL);
        pump(c, v);
        assert_int_equal(h2_submit_rst(v->s, id, H2_REFUSED_STREAM), 0);
        pump(c, v);
        assert_int_equal(c->st[id].close_code, H2_REFUSED_STREAM);
    }
    assert_int_equal(h2_get_stats(c->s)->resets_received, 30);
    assert_null(h2_error(c->s));
    assert_true(h2_wants_read(c->s));
    side_free(c);
    side_free(v);
}

/* HEADERS without END_HEADERS, then <n> CONTINUATION frames of one small field each. */
static void raw_continuations(struct raw *r, int n)
{
    struct raw blk = {0};
    hp_get(&blk, "svc");
    raw_frame(r, F_HEADERS, FL_END_STREAM, 1, blk.p, blk.len);
    free(blk.p);
    for (int i = 0; i < n; i++) {
        blk = (struct raw){0};
        hp_field(&blk, "x-f", "0123456789");
        raw_frame(r, F_CONTINUATION, 0, 1, blk.p, blk.len);
        free(blk.p);
    }
}

/*
 * CVE-2024-27316 (CONTINUATION flood): a header block that never ends is cut off, by the
 * frame count (nghttp2's max_continuations, set from our limit) and, with a generous count,
 * by the block's compressed size (our own bound in cb_begin_frame).
 */
static void test_continuation_flood(void **state)
{
    (void)state;
    struct side *v = side_new(H2_SERVER, NULL);
    struct raw r = {0};
    raw_preface(&r);
    raw_continuations(&r, 50);
    assert_int_equal(h2_feed(v->s, r.p, r.len), -EPROTO);
    assert_non_null(strstr(h2_error(v->s), "CONTINUATION"));
    assert_int_equal(v->heads, 0);
    struct answer a;
    drain(v->s, &a);
    assert_int_equal(a.goaway, 1);
    assert_int_equal(a.goaway_code, H2_ENHANCE_YOUR_CALM);
    assert_false(h2_wants_read(v->s));
    free(r.p);
    side_free(v);

    struct h2_limits lim = {.max_continuations = 100000, .max_header_list_bytes = 1024};
    v = side_new(H2_SERVER, &lim);
    r = (struct raw){0};
    raw_preface(&r);
    raw_continuations(&r, 1000); /* 17 bytes each: past 2 KiB after ~120 frames */
    assert_int_equal(h2_feed(v->s, r.p, r.len), -EPROTO);
    assert_string_equal(h2_error(v->s), "header block flood (CONTINUATION)");
    drain(v->s, &a);
    assert_int_equal(a.goaway_code, H2_ENHANCE_YOUR_CALM);
    free(r.p);
    side_free(v);
}

/*
 * Header bounds: a request whose list is over max_header_list_bytes, or with more fields than
 * max_headers, is answered 431 by the codec and never reaches the caller; the connection goes
 * on. A client refuses (RST_STREAM) a response head over its bound.
 */
static void test_header_list_too_large(void **state)
{
    (void)state;
    struct h2_limits lim = {.max_header_list_bytes = 4096, .max_headers = 20};
    struct side *c = side_new(H2_CLIENT, NULL), *v = side_new(H2_SERVER, &lim);
    static char big[5000];
    memset(big, 'a', sizeof(big));
    struct http_header hs[] = {{{"x-big", 5}, {big, sizeof(big)}, 0}};
    struct h2_out_head h = get_head("/");
    h.headers = hs;
    h.nheaders = 1;
    int32_t id = h2_submit_request(c->s, &h, 0, NULL);
    pump(c, v);
    assert_int_equal(v->heads, 0);
    assert_int_equal(c->st[id].status, 431);
    assert_int_equal(c->st[id].closes, 1);
    assert_int_equal(h2_get_stats(v->s)->headers_too_large, 1);

    /* Exactly at the bound passes: the list size counts 32 bytes per field besides the name
     * and value (:method GET 42, :scheme http 43, :authority svc.example 53, :path / 38,
     * x-big 37 + its value). */
    hs[0].value.len = 4096 - 42 - 43 - 53 - 38 - 37;
    int32_t ok = h2_submit_request(c->s, &h, 0, NULL);
    pump(c, v);
    assert_int_equal(v->st[ok].heads, 1);

    /* Too many fields. */
    struct http_header many[21];
    for (int i = 0; i < 21; i++)
        many[i] = (struct http_header){{"x-n", 3}, {"v", 1}, 0};
    h.headers = many;
    h.nheaders = 21;
    int32_t id2 = h2_submit_request(c->s, &h, 0, NULL);
    pump(c, v);
    assert_int_equal(v->st[id2].heads, 0);
    assert_int_equal(c->st[id2].status, 431);
    h.nheaders = 20;
    int32_t id3 = h2_submit_request(c->s, &h, 0, NULL);
    pump(c, v);
    assert_int_equal(v->st[id3].heads, 1);
    assert_int_equal(v->st[id3].nheaders, 20);
    assert_int_equal(h2_get_stats(v->s)->headers_too_large, 2);
    assert_null(h2_error(v->s));
    side_free(c);
    side_free(v);

    /* The client side: a response head over its bound resets the stream. */
    struct h2_limits small = {.max_header_list_bytes = 1024};
    c = side_new(H2_CLIENT, &small);
    v = side_new(H2_SERVER, NULL);
    h = get_head("/");
    id = h2_submit_request(c->s, &h, 0, NULL);
    pump(c, v);
    struct http_header rh[] = {{{"x-big", 5}, {big, 2000}, 0}};
    struct h2_out_head resp = {.status = 200, .headers = rh, .nheaders = 1};
    assert_int_equal(h2_submit_response(v->s, id, &resp, 0), 0);
    pump(c, v);
    assert_int_equal(c->st[id].heads, 0);
    assert_int_equal(c->st[id].closes, 1);
    assert_int_equal(c->st[id].close_code, H2_INTERNAL_ERROR);
    side_free(c);
    side_free(v);
}

/*
 * :authority and Host (RFC 9113 section 8.3.1): Host alone is the authority; both, naming the
 * same origin after scheme-based normalization, pass; both, differing, reset the stream with
 * PROTOCOL_ERROR. Host never appears among the regular fields.
 */
static void test_authority_host(void **state)
{
    (void)state;
    struct side *v = side_new(H2_SERVER, NULL);
    struct raw r = {0};
    raw_preface(&r);
    raw_get(&r, 1, NULL, "only-host.example:8080");
    raw_get(&r, 3, "Svc.Example", "svc.example:80");
    raw_get(&r, 5, "svc.example:80", "other.example");
    raw_get(&r, 7, "svc.example:8080", "svc.example");
    raw_get(&r, 9, "[::1]:80", "[::1]");
    assert_int_equal(h2_feed(v->s, r.p, r.len), (ssize_t)r.len);
    assert_string_equal(v->st[1].authority, "only-host.example:8080");
    assert_string_equal(v->st[1].hdr, "");
    assert_string_equal(v->st[3].authority, "Svc.Example");
    assert_int_equal(v->st[5].heads, 0);
    assert_int_equal(v->st[7].heads, 0);
    assert_int_equal(v->st[9].heads, 1);
    struct answer a;
    drain(v->s, &a);
    assert_int_equal(a.rst, 2);
    assert_int_equal(a.rst_sid[0], 5);
    assert_int_equal(a.rst_code[0], H2_PROTOCOL_ERROR);
    assert_int_equal(a.rst_sid[1], 7);
    assert_int_equal(h2_get_stats(v->s)->malformed, 2);
    free(r.p);
    side_free(v);
}

/* Malformed requests (RFC 9113 section 8) are reset, never handed out; the session goes on. */
static void test_malformed_requests(void **state)
{
    (void)state;
    struct side *v = side_new(H2_SERVER, NULL);
    struct raw r = {0}, blk = {0};
    raw_preface(&r);
    hp_get(&blk, "svc");
    hp_field(&blk, "connection", "keep-alive"); /* connection-specific */
    raw_frame(&r, F_HEADERS, FL_END_HEADERS | FL_END_STREAM, 1, blk.p, blk.len);
    blk.len = 0;
    hp_get(&blk, "svc");
    hp_field(&blk, "X-Upper", "1"); /* upper case name */
    raw_frame(&r, F_HEADERS, FL_END_HEADERS | FL_END_STREAM, 3, blk.p, blk.len);
    blk.len = 0;
    hp_field(&blk, ":method", "GET"); /* no :path */
    hp_field(&blk, ":scheme", "http");
    raw_frame(&r, F_HEADERS, FL_END_HEADERS | FL_END_STREAM, 5, blk.p, blk.len);
    blk.len = 0;
    hp_get(&blk, "svc");
    hp_field(&blk, "x-bad", "a\r\nb"); /* CR LF in a value */
    raw_frame(&r, F_HEADERS, FL_END_HEADERS | FL_END_STREAM, 7, blk.p, blk.len);
    blk.len = 0;
    hp_get(&blk, "svc");
    hp_field(&blk, "content-length", "5"); /* then 3 bytes of DATA */
    raw_frame(&r, F_HEADERS, FL_END_HEADERS, 9, blk.p, blk.len);
    raw_frame(&r, F_DATA, FL_END_STREAM, 9, "abc", 3);
    blk.len = 0;
    hp_get(&blk, NULL);
    hp_field(&blk, "host", "a.example"); /* two Hosts */
    hp_field(&blk, "host", "b.example");
    raw_frame(&r, F_HEADERS, FL_END_HEADERS | FL_END_STREAM, 11, blk.p, blk.len);
    raw_get(&r, 13, "svc", NULL); /* a good one after all that */
    assert_int_equal(h2_feed(v->s, r.p, r.len), (ssize_t)r.len);
    for (int sid = 1; sid <= 7; sid += 2)
        assert_int_equal(v->st[sid].heads, 0);
    assert_int_equal(v->st[9].heads, 1); /* the head was fine; the body was not */
    assert_int_equal(v->st[9].ends, 0);
    assert_int_equal(v->st[11].heads, 0);
    assert_int_equal(v->st[13].heads, 1);
    struct answer a;
    drain(v->s, &a);
    assert_int_equal(v->st[9].closes, 1); /* once its RST_STREAM is out */
    assert_int_equal(v->st[9].close_code, H2_PROTOCOL_ERROR);
    assert_int_equal(a.rst, 6);
    for (int i = 0; i < 6; i++)
        assert_int_equal(a.rst_code[i], H2_PROTOCOL_ERROR);
    assert_int_equal(a.goaway, 0);
    free(blk.p);
    free(r.p);
    side_free(v);
}

/* Feeds <r> to a fresh server: must not crash; must end the session with a reason. */
static void expect_conn_error_lim(const struct raw *r, const struct h2_limits *lim, uint32_t code)
{
    struct side *v = side_new(H2_SERVER, lim);
    ssize_t n = h2_feed(v->s, r->p, r->len);
    assert_true(n == (ssize_t)r->len || n == -EPROTO);
    struct answer a;
    drain(v->s, &a);
    if (code != 0) {
        assert_int_equal(a.goaway, 1);
        assert_int_equal(a.goaway_code, code);
    }
    assert_non_null(h2_error(v->s));
    assert_false(h2_wants_read(v->s));
    assert_false(h2_wants_write(v->s));
    assert_int_equal(h2_feed(v->s, r->p, r->len), -EPROTO);
    side_free(v);
}

static void expect_conn_error(const struct raw *r, uint32_t code)
{
    expect_conn_error_lim(r, NULL, code);
}

/* Invalid input from raw bytes: connection errors with the right code, never a crash. */
static void test_invalid_frames(void **state)
{
    (void)state;
    struct raw r = {0};
    /* Not HTTP/2: the preface is wrong, nothing can be answered. */
    raw_put(&r, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 27);
    struct side *v = side_new(H2_SERVER, NULL);
    assert_int_equal(h2_feed(v->s, r.p, r.len), -EPROTO);
    assert_string_equal(h2_error(v->s), "bad client preface");
    assert_false(h2_wants_read(v->s));
    side_free(v);

    r.len = 0; /* DATA on stream 0 */
    raw_preface(&r);
    raw_frame(&r, F_DATA, 0, 0, "x", 1);
    expect_conn_error(&r, H2_PROTOCOL_ERROR);

    r.len = 0; /* a frame over SETTINGS_MAX_FRAME_SIZE */
    raw_preface(&r);
    static uint8_t big[20000];
    raw_frame(&r, F_DATA, 0, 1, big, sizeof(big));
    expect_conn_error(&r, H2_FRAME_SIZE_ERROR);

    r.len = 0; /* HPACK garbage: an index past both tables */
    raw_preface(&r);
    static const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0x0f};
    raw_frame(&r, F_HEADERS, FL_END_HEADERS, 1, junk, sizeof(junk));
    expect_conn_error(&r, H2_COMPRESSION_ERROR);

    r.len = 0; /* SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1 */
    raw_preface(&r);
    static const uint8_t bad_win[] = {0, 4, 0x80, 0, 0, 0};
    raw_frame(&r, F_SETTINGS, 0, 0, bad_win, sizeof(bad_win));
    expect_conn_error(&r, H2_FLOW_CONTROL_ERROR);

    r.len = 0; /* a connection window pushed past 2^31-1 */
    raw_preface(&r);
    static const uint8_t inc[] = {0x7f, 0xff, 0xff, 0xff};
    raw_frame(&r, F_WINDOW_UPDATE, 0, 0, inc, 4);
    expect_conn_error(&r, H2_FLOW_CONTROL_ERROR);

    r.len = 0; /* a CONTINUATION without HEADERS */
    raw_preface(&r);
    raw_frame(&r, F_CONTINUATION, FL_END_HEADERS, 1, junk, 1);
    expect_conn_error(&r, H2_PROTOCOL_ERROR);

    r.len = 0; /* HEADERS on a client-initiated even stream id */
    raw_preface(&r);
    raw_get(&r, 2, "svc", NULL);
    expect_conn_error(&r, H2_PROTOCOL_ERROR);

    /* Every truncation of a valid exchange is just "more to come". */
    r.len = 0;
    raw_preface(&r);
    raw_get(&r, 1, "svc", NULL);
    for (size_t cut = 0; cut <= r.len; cut++) {
        v = side_new(H2_SERVER, NULL);
        assert_int_equal(h2_feed(v->s, r.p, cut), (ssize_t)cut);
        assert_int_equal(h2_feed(v->s, r.p + cut, r.len - cut), (ssize_t)(r.len - cut));
        assert_int_equal(v->heads, 1);
        side_free(v);
    }
    free(r.p);
}

/* PING and SETTINGS floods: acks the peer never reads end the session; so do too many
 * entries in one SETTINGS frame. */
static void test_ack_and_settings_floods(void **state)
{
    (void)state;
    struct h2_limits lim = {.max_outbound_ack = 10};
    struct side *v = side_new(H2_SERVER, &lim);
    struct raw r = {0};
    raw_preface(&r);
    for (int i = 0; i < 50; i++)
        raw_frame(&r, F_PING, 0, 0, "12345678", 8);
    assert_int_equal(h2_feed(v->s, r.p, r.len), -EPROTO);
    assert_string_equal(h2_error(v->s), "PING/SETTINGS flood");
    assert_false(h2_wants_read(v->s));
    side_free(v);

    r.len = 0;
    raw_preface(&r);
    struct raw entries = {0};
    for (int i = 0; i < 10; i++) {
        static const uint8_t e[] = {0, 3, 0, 0, 0, 100}; /* MAX_CONCURRENT_STREAMS */
        raw_put(&entries, e, sizeof(e));
    }
    raw_frame(&r, F_SETTINGS, 0, 0, entries.p, entries.len);
    struct h2_limits few = {.max_settings = 8};
    expect_conn_error_lim(&r, &few, H2_ENHANCE_YOUR_CALM);
    free(entries.p);
    free(r.p);
}

/*
 * A client that makes the server queue frames and never reads them: each malformed request
 * costs it a few bytes and us a queued RST_STREAM, which nghttp2 does not bound. The server
 * ends the session once the queue is past its bound instead of growing it without end.
 */
static void test_outbound_queue_flood(void **state)
{
    (void)state;
    struct h2_limits lim = {.max_outbound_ack = 50, .max_concurrent_streams = 10};
    struct side *v = side_new(H2_SERVER, &lim);
    struct raw r = {0};
    raw_preface(&r);
    ssize_t rc = h2_feed(v->s, r.p, r.len);
    assert_int_equal(rc, (ssize_t)r.len);
    uint32_t sid = 1;
    int feeds = 0;
    /* Small feeds, as a socket would deliver them; the output is never read. */
    while (rc >= 0 && feeds < 1000) {
        r.len = 0;
        for (int i = 0; i < 10; i++, sid += 2) {
            struct raw blk = {0};
            hp_get(&blk, "svc");
            hp_field(&blk, "connection", "x"); /* malformed: reset with PROTOCOL_ERROR */
            raw_frame(&r, F_HEADERS, FL_END_HEADERS | FL_END_STREAM, sid, blk.p, blk.len);
            free(blk.p);
        }
        rc = h2_feed(v->s, r.p, r.len);
        feeds++;
    }
    assert_int_equal(rc, -EPROTO);
    assert_true(feeds <= 11); /* 50 + 5 * 10 queued resets, 10 per feed */
    assert_non_null(strstr(h2_error(v->s), "outbound frame flood"));
    assert_int_equal(v->heads, 0);
    struct answer a;
    drain(v->s, &a);
    assert_int_equal(a.goaway, 1);
    assert_int_equal(a.goaway_code, H2_ENHANCE_YOUR_CALM);
    free(r.p);
    side_free(v);
}

/* A GOAWAY from the server: the client is told, queued requests close as REFUSED_STREAM, and
 * new ones are refused with -ESHUTDOWN. */
static void test_goaway(void **state)
{
    (void)state;
    struct side *c = side_new(H2_CLIENT, NULL), *v = side_new(H2_SERVER, NULL);
    struct h2_out_head h = get_head("/");
    int32_t id = h2_submit_request(c->s, &h, 0, NULL);
    pump(c, v);
    assert_int_equal(h2_shutdown(v->s), 0);
    int32_t late = h2_submit_request(c->s, &h, 0, NULL); /* crosses the GOAWAY */
    assert_true(late > 0);
    pump(c, v);
    assert_int_equal(c->goaways, 1);
    assert_int_equal(c->goaway_code, H2_NO_ERROR);
    assert_int_equal(c->st[late].closes, 1);
    assert_int_equal(c->st[late].close_code, H2_REFUSED_STREAM);
    assert_int_equal(h2_submit_request(c->s, &h, 0, NULL), -ESHUTDOWN);
    /* The stream in flight still completes. */
    struct h2_out_head resp = {.status = 200};
    assert_int_equal(h2_submit_response(v->s, id, &resp, 0), 0);
    pump(c, v);
    assert_int_equal(c->st[id].status, 200);
    assert_false(h2_wants_read(v->s));
    assert_false(h2_wants_write(v->s));
    side_free(c);
    side_free(v);

    /* A request still queued under the server's concurrency limit when the GOAWAY comes never
     * leaves; it closes as REFUSED_STREAM once the slot frees up (safe to retry elsewhere). */
    struct h2_limits one = {.max_concurrent_streams = 1};
    c = side_new(H2_CLIENT, NULL);
    v = side_new(H2_SERVER, &one);
    pump(c, v);
    id = h2_submit_request(c->s, &h, 0, NULL);
    int32_t queued = h2_submit_request(c->s, &h, 0, NULL);
    pump(c, v);
    assert_int_equal(v->heads, 1);
    assert_int_equal(h2_shutdown(v->s), 0);
    pump(c, v);
    assert_int_equal(c->st[queued].closes, 0);
    assert_int_equal(h2_submit_response(v->s, id, &resp, 0), 0);
    pump(c, v);
    assert_int_equal(c->st[id].status, 200);
    assert_int_equal(c->st[queued].closes, 1);
    assert_int_equal(c->st[queued].close_code, H2_REFUSED_STREAM);
    assert_int_equal(v->st[queued].heads, 0);
    assert_int_equal(h2_open_streams(c->s), 0);
    side_free(c);
    side_free(v);
}

/* h2_shutdown_before(): the GOAWAY names the stream before the one being refused, so the
 * client closes that one and every later one as REFUSED_STREAM (unprocessed, safe to send again
 * elsewhere) while the earlier ones complete. */
static void test_goaway_before(void **state)
{
    (void)state;
    struct side *c = side_new(H2_CLIENT, NULL), *v = side_new(H2_SERVER, NULL);
    struct h2_out_head h = get_head("/");
    int32_t a = h2_submit_request(c->s, &h, 0, NULL);
    int32_t b = h2_submit_request(c->s, &h, 0, NULL);
    int32_t later = h2_submit_request(c->s, &h, 0, NULL);
    pump(c, v);
    assert_int_equal(v->heads, 3);
    assert_int_equal(h2_shutdown_before(v->s, b), 0);
    assert_int_equal(h2_submit_rst(v->s, b, H2_REFUSED_STREAM), 0);
    assert_int_equal(h2_submit_rst(v->s, later, H2_REFUSED_STREAM), 0);
    pump(c, v);
    assert_int_equal(c->goaways, 1);
    assert_int_equal(c->goaway_last, a);
    assert_int_equal(c->st[b].closes, 1);
    assert_int_equal(c->st[b].close_code, H2_REFUSED_STREAM);
    assert_int_equal(c->st[later].closes, 1);
    assert_int_equal(c->st[later].close_code, H2_REFUSED_STREAM);
    struct h2_out_head resp = {.status = 200};
    assert_int_equal(h2_submit_response(v->s, a, &resp, 0), 0);
    pump(c, v);
    assert_int_equal(c->st[a].status, 200);
    side_free(c);
    side_free(v);

    /* The first stream refused: no stream was processed. */
    c = side_new(H2_CLIENT, NULL);
    v = side_new(H2_SERVER, NULL);
    a = h2_submit_request(c->s, &h, 0, NULL);
    pump(c, v);
    assert_int_equal(h2_shutdown_before(v->s, a), 0);
    pump(c, v);
    assert_int_equal(c->goaways, 1);
    assert_int_equal(c->goaway_last, 0);
    assert_int_equal(c->st[a].close_code, H2_REFUSED_STREAM);
    side_free(c);
    side_free(v);
}

/* Heads that cannot be sent are refused before anything reaches the wire. */
static void test_submit_validation(void **state)
{
    (void)state;
    struct side *c = side_new(H2_CLIENT, NULL), *v = side_new(H2_SERVER, NULL);
    struct http_header inj[] = {{{"x-a", 3}, {"a\r\nx-b: 1", 9}, 0}};
    struct http_header pseudo[] = {{{":path", 5}, {"/", 1}, 0}};
    struct http_header badname[] = {{{"x a", 3}, {"1", 1}, 0}};
    struct h2_out_head h = get_head("/");
    h.headers = inj;
    h.nheaders = 1;
    assert_int_equal(h2_submit_request(c->s, &h, 0, NULL), -EINVAL);
    h.headers = pseudo;
    assert_int_equal(h2_submit_request(c->s, &h, 0, NULL), -EINVAL);
    h.headers = badname;
    assert_int_equal(h2_submit_request(c->s, &h, 0, NULL), -EINVAL);
    h = get_head("/");
    h.method = (struct http_slice){NULL, 0};
    assert_int_equal(h2_submit_request(c->s, &h, 0, NULL), -EINVAL);
    assert_int_equal(h2_submit_request(v->s, &h, 0, NULL), -EINVAL);
    struct h2_out_head resp = {.status = 200};
    assert_int_equal(h2_submit_response(v->s, 1, &resp, 0), -EINVAL); /* no such stream */
    assert_int_equal(h2_submit_response(c->s, 1, &resp, 0), -EINVAL);
    assert_int_equal(h2_open_streams(c->s), 0);
    side_free(c);
    side_free(v);
}

/*
 * A field flagged HTTP_HDR_H2OK goes out as it is (the flag vouches for it: no lowering, no
 * second check), and one without the flag is still lowered and checked, so that a relayed
 * HTTP/2 field costs no second validation while anything else is validated as before.
 */
static void test_fit_fields_sent_as_is(void **state)
{
    (void)state;
    struct side *c = side_new(H2_CLIENT, NULL), *v = side_new(H2_SERVER, NULL);
    struct http_header hs[] = {{{"x-fit", 5}, {"1", 1}, HTTP_HDR_H2OK},
                               {{"X-Unfit", 7}, {"2", 1}, 0},
                               {{"connection", 10}, {"close", 5}, 0}};
    struct h2_out_head h = get_head("/");
    h.headers = hs;
    h.nheaders = 3;
    int32_t id = h2_submit_request(c->s, &h, 0, NULL);
    assert_true(id > 0);
    pump(c, v);
    assert_string_equal(v->st[id].hdr, "x-fit=1;x-unfit=2;");
    /* Without the flag, a bad value is refused as before. */
    struct http_header bad[] = {{{"x-a", 3}, {"a\r\nx-b: 1", 9}, 0}};
    h.headers = bad;
    h.nheaders = 1;
    assert_int_equal(h2_submit_request(c->s, &h, 0, NULL), -EINVAL);
    side_free(c);
    side_free(v);
}

/* The HEADERS frames in <out>[<len>] (client output, after the preface), decoded with an
 * HPACK inflater of nghttp2's: counts per field name seen, and how many were never indexed. */
struct hpack_seen {
    int rid, rid_never, same, same_never;
};

static void hpack_scan(nghttp2_hd_inflater *inf, const uint8_t *out, size_t len,
                       struct hpack_seen *seen)
{
    assert_true(len >= 24);
    for (size_t off = 24; off + 9 <= len;) {
        size_t n = (size_t)out[off] << 16 | (size_t)out[off + 1] << 8 | out[off + 2];
        uint8_t type = out[off + 3], flags = out[off + 4];
        const uint8_t *pl = out + off + 9;
        assert_true(off + 9 + n <= len);
        if (type == F_HEADERS) {
            assert_true(flags & FL_END_HEADERS);
            assert_false(flags & 0x28); /* neither PADDED nor PRIORITY */
            for (size_t used = 0;;) {
                nghttp2_nv nv;
                int inflags = 0;
                ssize_t r = nghttp2_hd_inflate_hd2(inf, &nv, &inflags, pl + used, n - used, 1);
                assert_true(r >= 0);
                used += (size_t)r;
                if (inflags & NGHTTP2_HD_INFLATE_EMIT) {
                    int never = (nv.flags & NGHTTP2_NV_FLAG_NO_INDEX) != 0;
                    if (nv.namelen == 12 && memcmp(nv.name, "x-request-id", 12) == 0) {
                        seen->rid++;
                        seen->rid_never += never;
                    } else if (nv.namelen == 6 && memcmp(nv.name, "x-same", 6) == 0) {
                        seen->same++;
                        seen->same_never += never;
                    }
                }
                if (inflags & NGHTTP2_HD_INFLATE_FINAL) {
                    nghttp2_hd_inflate_end_headers(inf);
                    break;
                }
                assert_true(r > 0 || used < n);
            }
        }
        off += 9 + n;
    }
}

/*
 * X-Request-Id is new on every request: it goes out never indexed, so it takes no entry of
 * the HPACK dynamic table (each would push out entries that repeat, and nghttp2 compared
 * every new id with each indexed one before adding it). A repeated field is still indexed.
 */
static void test_request_id_never_indexed(void **state)
{
    (void)state;
    static uint8_t out[1 << 16];
    struct side *c = side_new(H2_CLIENT, NULL);
    char ids[8][40];
    for (int i = 0; i < 8; i++) {
        snprintf(ids[i], sizeof(ids[i]), "6f1c2d3e-0000-4000-8000-%012d", i);
        struct http_header hs[] = {{{"x-request-id", 12}, {ids[i], strlen(ids[i])}, HTTP_HDR_H2OK},
                                   {{"x-same", 6}, {"a-value-that-repeats", 20}, 0}};
        struct h2_out_head h = get_head("/");
        h.headers = hs;
        h.nheaders = 2;
        assert_true(h2_submit_request(c->s, &h, 0, NULL) > 0);
    }
    size_t len = 0;
    for (;;) {
        ssize_t n = h2_output(c->s, out + len, sizeof(out) - len);
        assert_true(n >= 0);
        if (n == 0)
            break;
        len += (size_t)n;
    }
    nghttp2_hd_inflater *inf;
    assert_int_equal(nghttp2_hd_inflate_new(&inf), 0);
    struct hpack_seen seen = {0};
    hpack_scan(inf, out, len, &seen);
    assert_int_equal(seen.rid, 8);
    assert_int_equal(seen.rid_never, 8);
    assert_int_equal(seen.same, 8);
    assert_int_equal(seen.same_never, 0);
    for (size_t i = 1; i <= nghttp2_hd_inflate_get_num_table_entries(inf); i++) {
        const nghttp2_nv *e = nghttp2_hd_inflate_get_table_entry(inf, i);
        assert_non_null(e);
        assert_false(e->namelen == 12 && memcmp(e->name, "x-request-id", 12) == 0);
    }
    nghttp2_hd_inflate_del(inf);
    side_free(c);
}

/* The codec choice without ALPN: the preface decides, a prefix of it waits, anything else
 * (an HTTP/1.1 request line, even "PRI" as a method of another request) is HTTP/1. */
/*
 * h2_wants_write() and h2_wants_read() keep nghttp2's answers until the session changes (the
 * pumps ask several times a round). Every way in that can give the session something to send
 * must be seen: a PING fed in (its ACK), a request or a response submitted, a consume that
 * reopens a window, a reset, a GOAWAY; and what is sent must be seen too (a GOAWAY that ends
 * the session ends reading).
 */
static void test_wants_follow_the_session(void **state)
{
    (void)state;
    static uint8_t buf[16384];
    struct side *c = side_new(H2_CLIENT, NULL), *v = side_new(H2_SERVER, NULL);
    c->auto_consume = 0;
    pump(c, v);
    assert_false(h2_wants_write(c->s));
    assert_false(h2_wants_write(v->s));
    assert_true(h2_wants_read(v->s));

    /* Fed: a PING to the server, which owes its ACK. */
    struct raw r = {0};
    raw_frame(&r, 0x6, 0, 0, "12345678", 8);
    assert_int_equal(h2_feed(v->s, r.p, r.len), (ssize_t)r.len);
    free(r.p);
    assert_true(h2_wants_write(v->s));
    ssize_t n = h2_output(v->s, buf, sizeof(buf));
    assert_int_equal(n, 17); /* the ACK, a 9-byte header and 8 bytes */
    assert_int_equal(h2_feed(c->s, buf, (size_t)n), n);
    assert_false(h2_wants_write(v->s));

    /* Submitted: a request, then its response with a body. */
    struct h2_out_head h = get_head("/");
    int32_t id = h2_submit_request(c->s, &h, 0, NULL);
    assert_true(id > 0);
    assert_true(h2_wants_write(c->s));
    pump(c, v);
    assert_false(h2_wants_write(c->s));
    assert_false(h2_wants_write(v->s));
    static uint8_t big[300000]; /* more than a stream window: the stream stays open */
    v->st[id].body = big;
    v->st[id].body_len = v->st[id].body_avail = sizeof(big);
    struct h2_out_head resp = {.status = 200};
    assert_int_equal(h2_submit_response(v->s, id, &resp, 1), 0);
    assert_true(h2_wants_write(v->s));
    pump(c, v);
    assert_false(h2_wants_write(c->s));

    /* Consumed: more than half the stream window reopens it (WINDOW_UPDATE). */
    assert_true(c->st[id].delivered_unconsumed > H2_DEFAULT_STREAM_WINDOW_BYTES / 2);
    assert_int_equal(h2_consume(c->s, id, c->st[id].delivered_unconsumed), 0);
    c->st[id].delivered_unconsumed = 0;
    assert_true(h2_wants_write(c->s));
    pump(c, v);

    /* Reset, and GOAWAY: each is a frame to send. */
    int32_t id2 = h2_submit_request(c->s, &h, 0, NULL);
    pump(c, v);
    assert_false(h2_wants_write(c->s));
    assert_int_equal(h2_submit_rst(c->s, id2, H2_CANCEL), 0);
    assert_true(h2_wants_write(c->s));
    pump(c, v);
    assert_false(h2_wants_write(v->s));
    assert_true(h2_wants_read(v->s));
    assert_int_equal(h2_terminate(v->s, H2_NO_ERROR), 0);
    assert_true(h2_wants_write(v->s));
    /* Sent: the session is over, neither reading nor writing. */
    pump(c, v);
    assert_false(h2_wants_write(v->s));
    assert_false(h2_wants_read(v->s));
    side_free(c);
    side_free(v);
}

static void test_preface_check(void **state)
{
    (void)state;
    const char *pf = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    assert_int_equal(h2_preface_check(pf, 24), 1);
    assert_int_equal(h2_preface_check("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04", 28), 1);
    assert_int_equal(h2_preface_check(pf, 0), 0);
    assert_int_equal(h2_preface_check(pf, 1), 0);
    assert_int_equal(h2_preface_check(pf, 23), 0);
    assert_int_equal(h2_preface_check("GET / HTTP/1.1\r\n", 16), -1);
    assert_int_equal(h2_preface_check("PRI / HTTP/1.1\r\n", 16), -1);
    assert_int_equal(h2_preface_check("PRI * HTTP/2.0\r\n\r\nSX", 20), -1);
    assert_int_equal(h2_preface_check("P", 1), 0);
    assert_int_equal(h2_preface_check("Q", 1), -1);
}

/* h2_value_ok() answers as nghttp2_check_header_value_rfc9113() does: every byte value at
 * every position of values of 1 to 24 bytes (the word-at-a-time scan and its tail), and
 * mixed values of random printable, high and control bytes. */
static void test_value_ok_matches_nghttp2(void **state)
{
    (void)state;
    uint8_t v[64];
    for (size_t n = 1; n <= 24; n++)
        for (size_t at = 0; at < n; at++)
            for (int c = 0; c < 256; c++) {
                memset(v, 'a', n);
                v[at] = (uint8_t)c;
                int want = nghttp2_check_header_value_rfc9113(v, n) != 0;
                if (h2_value_ok(v, n) != want)
                    fail_msg("byte 0x%02x at %zu of %zu: want %d", c, at, n, want);
            }
    static const uint8_t mix[] = {'a', ' ', '\t', 0x7f, 0x80, 0xff, 0x00, 0x0a, 0x0d, 0x1f, '~'};
    unsigned seed = 1;
    for (int round = 0; round < 20000; round++) {
        size_t n = (size_t)(seed % 40);
        for (size_t i = 0; i < n; i++) {
            seed = seed * 1103515245u + 12345u;
            unsigned r = (seed >> 16) % 64;
            v[i] = r < sizeof(mix) && r % 4 == 0 ? mix[r] : (uint8_t)(0x21 + (seed >> 8) % 0x5e);
        }
        seed = seed * 1103515245u + 12345u;
        int want = nghttp2_check_header_value_rfc9113(v, n) != 0;
        assert_int_equal(h2_value_ok(v, n), want);
    }
    assert_int_equal(h2_value_ok("", 0), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_value_ok_matches_nghttp2),
        cmocka_unit_test(test_get_and_response),
        cmocka_unit_test(test_post_backpressure),
        cmocka_unit_test(test_grpc_trailers),
        cmocka_unit_test(test_rst_stream),
        cmocka_unit_test(test_reset_returns_connection_window),
        cmocka_unit_test(test_concurrent_streams_refused),
        cmocka_unit_test(test_rapid_reset_flood),
        cmocka_unit_test(test_continuation_flood),
        cmocka_unit_test(test_header_list_too_large),
        cmocka_unit_test(test_authority_host),
        cmocka_unit_test(test_malformed_requests),
        cmocka_unit_test(test_invalid_frames),
        cmocka_unit_test(test_ack_and_settings_floods),
        cmocka_unit_test(test_outbound_queue_flood),
        cmocka_unit_test(test_goaway),
        cmocka_unit_test(test_goaway_before),
        cmocka_unit_test(test_submit_validation),
        cmocka_unit_test(test_fit_fields_sent_as_is),
        cmocka_unit_test(test_request_id_never_indexed),
        cmocka_unit_test(test_wants_follow_the_session),
        cmocka_unit_test(test_preface_check),
    };
    return cmocka_run_group_tests_name("h2", tests, NULL, NULL);
}
