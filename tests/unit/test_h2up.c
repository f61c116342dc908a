/*
 * test_h2up: the shared HTTP/2 client connections against an h2.h server session the test
 * drives on the other end of a socketpair, both on one loop. Each test runs the loop until its
 * owners saw what they wait for (a timer stops a stuck test).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "h2up.h"

/* ---- the server end ---- */

struct srv {
    struct loop *loop;
    struct loop_io io;
    int fd;
    struct h2_session *h2;
    uint8_t out[65536];
    size_t out_len;
    int heads;
    int hold;         /* answer nothing (the stream stays open) */
    int goaway_after; /* GOAWAY(last = this stream) once this many heads arrived; 0: never */
    int close_after;  /* close the socket once this many heads arrived; 0: never */
    char last_path[64];
    size_t body_got;
    int body_ended;
    int32_t ids[16];
};

static const char resp_body[] = "hello from the server";

static ssize_t srv_read_body(struct h2_session *s, int32_t id, void *su, uint8_t *buf, size_t cap,
                             unsigned *flags, void *user)
{
    (void)s;
    (void)id;
    (void)su;
    (void)user;
    size_t n = sizeof(resp_body) - 1;
    if (n > cap)
        n = cap;
    memcpy(buf, resp_body, n);
    *flags |= H2_BODY_EOF | H2_BODY_TRAILERS;
    static const struct http_header tr[] = {{{"grpc-status", 11}, {"0", 1}, 0}};
    h2_submit_trailers(s, id, tr, 1);
    return (ssize_t)n;
}

static void srv_answer(struct srv *v, int32_t id)
{
    static const struct http_header h[] = {{{"content-type", 12}, {"text/plain", 10}, 0}};
    struct h2_out_head oh = {.status = 200, .headers = h, .nheaders = 1};
    assert_int_equal(h2_submit_response(v->h2, id, &oh, 1), 0);
}

static int srv_on_head(struct h2_session *s, int32_t id, void *su, const struct h2_head *hd,
                       void *user)
{
    struct srv *v = user;
    (void)su;
    if (v->heads < 16)
        v->ids[v->heads] = id;
    v->heads++;
    size_t n = hd->path.len < sizeof(v->last_path) - 1 ? hd->path.len : sizeof(v->last_path) - 1;
    memcpy(v->last_path, hd->path.p, n);
    v->last_path[n] = '\0';
    if (v->goaway_after != 0 && v->heads == v->goaway_after) {
        h2_shutdown(s);
        return 0;
    }
    return 0; /* answered at the request's end (srv_on_end) */
}

static int srv_on_data(struct h2_session *s, int32_t id, void *su, const uint8_t *p, size_t len,
                       void *user)
{
    struct srv *v = user;
    (void)su;
    (void)p;
    v->body_got += len;
    h2_consume(s, id, len);
    return 0;
}

static void srv_on_end(struct h2_session *s, int32_t id, void *su, void *user)
{
    struct srv *v = user;
    (void)s;
    (void)su;
    v->body_ended = 1;
    if (!v->hold)
        srv_answer(v, id);
}

static const struct h2_callbacks srv_cb = {
    .on_head = srv_on_head,
    .on_data = srv_on_data,
    .on_end_stream = srv_on_end,
    .read_body = srv_read_body,
};

static void srv_io(struct loop_io *io, unsigned events)
{
    struct srv *v = io->data;
    uint8_t buf[16384];
    (void)events;
    for (;;) {
        ssize_t n = read(v->fd, buf, sizeof(buf));
        if (n <= 0)
            break;
        h2_feed(v->h2, buf, (size_t)n);
        if (v->close_after != 0 && v->heads >= v->close_after) {
            loop_io_want(v->loop, &v->io, 0);
            close(v->fd);
            v->fd = -1;
            return;
        }
    }
    for (;;) {
        if (v->out_len == 0 && h2_wants_write(v->h2)) {
            ssize_t k = h2_output(v->h2, v->out, sizeof(v->out));
            if (k > 0)
                v->out_len = (size_t)k;
        }
        if (v->out_len == 0)
            break;
        ssize_t n = write(v->fd, v->out, v->out_len);
        if (n <= 0)
            break;
        memmove(v->out, v->out + n, v->out_len - (size_t)n);
        v->out_len -= (size_t)n;
    }
    loop_io_want(v->loop, &v->io,
                 LOOP_READ | (v->out_len || h2_wants_write(v->h2) ? LOOP_WRITE : 0));
}

static void srv_start(struct srv *v, struct loop *loop, int fd, uint32_t max_streams)
{
    memset(v, 0, sizeof(*v));
    v->loop = loop;
    v->fd = fd;
    struct h2_limits lim = {.max_concurrent_streams = max_streams};
    v->h2 = h2_session_new(H2_SERVER, &lim, &srv_cb, v);
    loop_io_init(&v->io, fd, srv_io, v);
    loop_io_want(loop, &v->io, LOOP_READ | LOOP_WRITE);
}

static void srv_stop(struct srv *v)
{
    if (v->fd >= 0) {
        loop_io_want(v->loop, &v->io, 0);
        close(v->fd);
    }
    h2_session_free(v->h2);
}

/* ---- owners ---- */

struct own {
    struct loop *loop;
    struct h2up_stream *st;
    int status, heads, ends, closes, trailers;
    uint32_t code;
    char body[256];
    size_t body_len;
    int cancel_on_data;
    int stop_on_close;
    const char *req_body;
    size_t req_off;
};

static int own_head(void *o, const struct h2_head *hd)
{
    struct own *w = o;
    w->heads++;
    w->status = hd->status;
    return 0;
}

static int own_data(void *o, const uint8_t *p, size_t len)
{
    struct own *w = o;
    if (w->cancel_on_data) {
        h2up_cancel(w->st, H2_CANCEL);
        w->st = NULL;
        loop_stop(w->loop);
        return 0;
    }
    size_t n = len < sizeof(w->body) - 1 - w->body_len ? len : sizeof(w->body) - 1 - w->body_len;
    memcpy(w->body + w->body_len, p, n);
    w->body_len += n;
    h2up_consume(w->st, len);
    return 0;
}

static int own_trailers(void *o, const struct http_header *f, size_t n)
{
    struct own *w = o;
    (void)f;
    w->trailers += (int)n;
    return 0;
}

static void own_end(void *o)
{
    struct own *w = o;
    w->ends++;
}

static void own_close(void *o, uint32_t code, const char *why)
{
    struct own *w = o;
    (void)why;
    w->closes++;
    w->code = code;
    w->st = NULL;
    if (w->stop_on_close)
        loop_stop(w->loop);
}

static ssize_t own_body(void *o, uint8_t *buf, size_t cap, unsigned *flags)
{
    struct own *w = o;
    size_t left = strlen(w->req_body) - w->req_off;
    size_t n = left < cap ? left : cap;
    memcpy(buf, w->req_body + w->req_off, n);
    w->req_off += n;
    if (w->req_off == strlen(w->req_body))
        *flags |= H2_BODY_EOF;
    return (ssize_t)n;
}

static const struct h2up_stream_ops own_ops = {
    .on_head = own_head,
    .on_data = own_data,
    .on_trailers = own_trailers,
    .on_end = own_end,
    .on_close = own_close,
    .read_body = own_body,
};

static const struct h2_out_head req = {
    .method = {"POST", 4},
    .scheme = {"http", 4},
    .authority = {"app", 3},
    .path = {"/svc/Method", 11},
};

/* ---- fixture ---- */

struct fx {
    struct loop *loop;
    struct h2up_pool *pool;
    atomic_uint_fast64_t conns, streams;
    struct loop_timer guard;
    struct srv srv[5];
    int nsrv;
};

static void on_guard(struct loop_timer *t)
{
    loop_stop(t->data);
}

static void run(struct fx *f, uint64_t ms)
{
    loop_timer_start(f->loop, &f->guard, ms);
    loop_run(f->loop);
    loop_timer_stop(f->loop, &f->guard);
}

/* Adopts a new conn to a fresh server that allows <max_streams> streams. */
static struct h2up_conn *connect_one(struct fx *f, uint32_t max_streams)
{
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    srv_start(&f->srv[f->nsrv++], f->loop, sv[1], max_streams);
    struct xprt x = {.fd = sv[0]};
    struct h2up_conn *c = h2up_adopt(f->pool, "ep|sni|id|h2", NULL, &x, "test-peer");
    assert_int_equal(x.fd, -1);
    return c;
}

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    f->loop = loop_new();
    f->pool = h2up_pool_new(f->loop, &f->conns, &f->streams);
    loop_timer_init(&f->guard, on_guard, f->loop);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    h2up_pool_free(f->pool);
    for (int i = 0; i < f->nsrv; i++)
        srv_stop(&f->srv[i]);
    loop_free(f->loop);
    free(f);
    return 0;
}

/* ---- tests ---- */

/* A request with a body gets the head, body, trailers and end; the metrics count it. */
static void test_exchange(void **state)
{
    struct fx *f = *state;
    struct h2up_conn *c = connect_one(f, 0);
    assert_int_equal(atomic_load(&f->conns), 1);
    assert_ptr_equal(h2up_find(f->pool, "ep|sni|id|h2", NULL), c);
    assert_null(h2up_find(f->pool, "other", NULL));
    struct own w = {.loop = f->loop, .stop_on_close = 1, .req_body = "ping"};
    w.st = h2up_open(c, &req, 1, &own_ops, &w);
    assert_non_null(w.st);
    run(f, 5000);
    assert_int_equal(w.closes, 1);
    assert_int_equal(w.code, H2_NO_ERROR);
    assert_int_equal(w.status, 200);
    assert_int_equal(w.ends, 1);
    assert_int_equal(w.trailers, 1);
    assert_string_equal(w.body, resp_body);
    assert_int_equal(f->srv[0].body_got, 4);
    assert_string_equal(f->srv[0].last_path, "/svc/Method");
    assert_int_equal(atomic_load(&f->streams), 1);
    assert_int_equal(h2up_conn_streams(c), 0);
    /* The conn stays for the next stream. */
    assert_ptr_equal(h2up_find(f->pool, "ep|sni|id|h2", NULL), c);
}

/* Many streams share one conn until the peer's concurrency limit, then a new conn is asked
 * for; at H2UP_MAX_PER_KEY conns the least loaded takes the stream (the session queues it). */
static void test_limits(void **state)
{
    struct fx *f = *state;
    struct own w[16];
    memset(w, 0, sizeof(w));
    struct h2up_conn *c[H2UP_MAX_PER_KEY];
    c[0] = connect_one(f, 2);
    for (int i = 0; i < 16; i++)
        w[i].loop = f->loop;
    f->srv[0].hold = 1;
    /* Let the SETTINGS exchange happen. */
    w[0].st = h2up_open(c[0], &req, 0, &own_ops, &w[0]);
    run(f, 200);
    assert_int_equal(f->srv[0].heads, 1);
    assert_ptr_equal(h2up_find(f->pool, "ep|sni|id|h2", NULL), c[0]);
    w[1].st = h2up_open(c[0], &req, 0, &own_ops, &w[1]);
    assert_null(h2up_find(f->pool, "ep|sni|id|h2", NULL)); /* 2 of 2: dial another */
    int k = 2;
    for (int i = 1; i < H2UP_MAX_PER_KEY; i++) {
        c[i] = connect_one(f, 2);
        f->srv[i].hold = 1;
        run(f, 100);
        for (int j = 0; j < 2; j++, k++) {
            assert_ptr_equal(h2up_find(f->pool, "ep|sni|id|h2", NULL), c[i]);
            w[k].st = h2up_open(c[i], &req, 0, &own_ops, &w[k]);
            assert_non_null(w[k].st);
        }
    }
    assert_int_equal(h2up_count(f->pool, "ep|sni|id|h2", NULL), H2UP_MAX_PER_KEY);
    assert_int_equal(atomic_load(&f->conns), H2UP_MAX_PER_KEY);
    /* Every conn full and the cap reached: one of them anyway. */
    struct h2up_conn *any = h2up_find(f->pool, "ep|sni|id|h2", NULL);
    assert_non_null(any);
    assert_int_equal(h2up_conn_streams(any), 2);
    run(f, 100);
    for (int i = 0; i < H2UP_MAX_PER_KEY; i++)
        assert_int_equal(f->srv[i].heads, 2);
    for (int i = 0; i < k; i++)
        h2up_cancel(w[i].st, H2_CANCEL);
    run(f, 100);
    for (int i = 0; i < k; i++)
        assert_int_equal(w[i].closes, 0); /* no callback after cancel */
    for (int i = 0; i < H2UP_MAX_PER_KEY; i++)
        assert_int_equal(h2up_conn_streams(c[i]), 0);
}

/* The peer closing the connection fails its open streams with CONNECT_ERROR; the conn is gone
 * from the pool. */
static void test_peer_closes(void **state)
{
    struct fx *f = *state;
    struct h2up_conn *c = connect_one(f, 0);
    f->srv[0].hold = 1;
    f->srv[0].close_after = 1;
    struct own w = {.loop = f->loop, .stop_on_close = 1};
    w.st = h2up_open(c, &req, 0, &own_ops, &w);
    run(f, 5000);
    assert_int_equal(w.closes, 1);
    assert_int_equal(w.code, H2_CONNECT_ERROR);
    assert_null(h2up_find(f->pool, "ep|sni|id|h2", NULL));
    assert_int_equal(atomic_load(&f->conns), 0);
}

/* A plain connect that fails: the stream's owner hears CONNECT_ERROR. */
static void test_connect_refused(void **state)
{
    struct fx *f = *state;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    close(sv[1]);
    struct xprt x = {.fd = sv[0]};
    struct h2up_conn *c = h2up_adopt(f->pool, "app|x", NULL, &x, "gone");
    struct own w = {.loop = f->loop, .stop_on_close = 1};
    w.st = h2up_open(c, &req, 0, &own_ops, &w);
    run(f, 5000);
    assert_int_equal(w.closes, 1);
    assert_int_equal(w.code, H2_CONNECT_ERROR);
}

/* GOAWAY: streams above the last id are refused (safe to retry), the conn takes no more, and it
 * closes once its last stream is done. */
static void test_goaway(void **state)
{
    struct fx *f = *state;
    struct h2up_conn *c = connect_one(f, 0);
    struct own a = {.loop = f->loop}, b = {.loop = f->loop, .stop_on_close = 1};
    f->srv[0].hold = 1;
    a.st = h2up_open(c, &req, 0, &own_ops, &a);
    run(f, 200);
    assert_int_equal(f->srv[0].heads, 1);
    /* The server says GOAWAY (last stream: a's) while the client opens b, not having read it. */
    assert_int_equal(h2_shutdown(f->srv[0].h2), 0);
    srv_io(&f->srv[0].io, LOOP_WRITE);
    b.st = h2up_open(c, &req, 0, &own_ops, &b);
    assert_non_null(b.st);
    run(f, 5000);
    assert_int_equal(b.closes, 1);
    assert_int_equal(b.code, H2_REFUSED_STREAM);
    assert_null(h2up_find(f->pool, "ep|sni|id|h2", NULL));
    assert_int_equal(h2up_count(f->pool, "ep|sni|id|h2", NULL), 1); /* draining */
    assert_null(h2up_open(c, &req, 0, &own_ops, &b));
    assert_int_equal(a.closes, 0);
    /* a was processed: it still gets its answer, and then the conn closes. */
    a.stop_on_close = 1;
    srv_answer(&f->srv[0], f->srv[0].ids[0]);
    srv_io(&f->srv[0].io, LOOP_WRITE);
    run(f, 5000);
    assert_int_equal(a.closes, 1);
    assert_int_equal(a.code, H2_NO_ERROR);
    assert_string_equal(a.body, resp_body);
    run(f, 100);
    assert_int_equal(h2up_count(f->pool, "ep|sni|id|h2", NULL), 0);
    assert_int_equal(atomic_load(&f->conns), 0);
}

/* An owner cancelling inside its on_data callback gets nothing after; the conn survives and
 * serves the next stream. */
static void test_cancel_in_callback(void **state)
{
    struct fx *f = *state;
    struct h2up_conn *c = connect_one(f, 0);
    struct own a = {.loop = f->loop, .cancel_on_data = 1};
    a.st = h2up_open(c, &req, 0, &own_ops, &a);
    run(f, 5000);
    assert_null(a.st);
    assert_int_equal(a.closes, 0);
    struct own b = {.loop = f->loop, .stop_on_close = 1};
    b.st = h2up_open(c, &req, 0, &own_ops, &b);
    assert_non_null(b.st);
    run(f, 5000);
    assert_int_equal(b.code, H2_NO_ERROR);
    assert_string_equal(b.body, resp_body);
    assert_int_equal(a.closes, 0);
}

/* A stream queued behind the peer's concurrency limit and cancelled there: no callback, and it
 * leaves the conn's count once the session gets to it (the conn can then idle and close). */
static void test_cancel_queued(void **state)
{
    struct fx *f = *state;
    struct h2up_conn *c = connect_one(f, 1);
    struct own a = {.loop = f->loop, .stop_on_close = 1}, b = {.loop = f->loop};
    f->srv[0].hold = 1;
    a.st = h2up_open(c, &req, 0, &own_ops, &a);
    run(f, 200);
    b.st = h2up_open(c, &req, 0, &own_ops, &b); /* over the peer's limit of 1: queued */
    assert_non_null(b.st);
    run(f, 100);
    assert_int_equal(f->srv[0].heads, 1);
    h2up_cancel(b.st, H2_CANCEL);
    srv_answer(&f->srv[0], f->srv[0].ids[0]);
    srv_io(&f->srv[0].io, LOOP_WRITE);
    run(f, 5000);
    assert_int_equal(a.code, H2_NO_ERROR);
    run(f, 200);
    assert_int_equal(b.closes, 0);
    assert_int_equal(h2up_conn_streams(c), 0);
}

/*
 * A far side that holds its one slot cannot make a conn queue without bound: streams opened
 * and cancelled while they wait still count (nghttp2 drops a cancelled queued head only when
 * a slot frees), and past H2UP_MAX_QUEUED the conn takes no new stream.
 */
static void test_queue_bounded(void **state)
{
    struct fx *f = *state;
    struct h2up_conn *c = connect_one(f, 1);
    static struct own o[H2UP_MAX_QUEUED + 2];
    memset(o, 0, sizeof(o));
    f->srv[0].hold = 1;
    for (size_t i = 0; i < H2UP_MAX_QUEUED + 2; i++)
        o[i].loop = f->loop;
    o[0].st = h2up_open(c, &req, 0, &own_ops, &o[0]);
    assert_non_null(o[0].st);
    run(f, 200);
    for (size_t i = 1; i <= H2UP_MAX_QUEUED; i++) {
        o[i].st = h2up_open(c, &req, 0, &own_ops, &o[i]);
        assert_non_null(o[i].st);
        h2up_cancel(o[i].st, H2_CANCEL);
    }
    assert_null(h2up_open(c, &req, 0, &own_ops, &o[H2UP_MAX_QUEUED + 1]));
    assert_int_equal(h2up_conn_streams(c), H2UP_MAX_QUEUED + 1);
}

static int always(const char *key, const struct tls_ctx *tls, void *arg)
{
    (void)tls;
    return strcmp(key, (const char *)arg) == 0;
}

/* A sweep drains: no new stream, the open one finishes, then the conn closes. */
static void test_sweep(void **state)
{
    struct fx *f = *state;
    struct h2up_conn *c = connect_one(f, 0);
    struct own a = {.loop = f->loop, .stop_on_close = 1};
    f->srv[0].hold = 1;
    a.st = h2up_open(c, &req, 0, &own_ops, &a);
    run(f, 200);
    h2up_sweep(f->pool, always, "ep|sni|id|h2");
    assert_null(h2up_find(f->pool, "ep|sni|id|h2", NULL));
    assert_null(h2up_open(c, &req, 0, &own_ops, &a));
    srv_answer(&f->srv[0], f->srv[0].ids[0]);
    srv_io(&f->srv[0].io, LOOP_WRITE);
    run(f, 5000);
    assert_int_equal(a.code, H2_NO_ERROR);
    run(f, 100);
    assert_int_equal(h2up_count(f->pool, "ep|sni|id|h2", NULL), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_exchange, setup, teardown),
        cmocka_unit_test_setup_teardown(test_limits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_peer_closes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connect_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_goaway, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_in_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sweep, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_queued, setup, teardown),
        cmocka_unit_test_setup_teardown(test_queue_bounded, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
