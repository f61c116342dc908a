/*
 * fuzz_h2: a libFuzzer target for the HTTP/2 codec. The first input byte picks the setup, the
 * rest is what the peer sends:
 *
 *   bit 0   0: a server session, fed the client preface and then the input;
 *           1: a client session that has sent one request, fed the input as the server's
 *   bit 1   feed in small pieces (sizes from the input's own bytes) instead of at once
 *   bit 2   tight limits (few streams, small header lists, a small reset burst)
 *
 * The callbacks behave as a mux would: a server answers every request with a small body and
 * trailers, every body byte is consumed, output is drained after each feed. Beyond "no crash,
 * no leak" it checks the codec's contract: h2_feed() takes everything or says -EPROTO (and
 * keeps saying it, with a reason), h2_output() never fails on a live session, streams the
 * caller sees are closed once each and never exceed the concurrency limit.
 *
 *   make fuzz FUZZ_SECONDS=60           (every target; this one is build/fuzz/fuzz_h2)
 *   build/fuzz/fuzz_h2 -max_len=65536 tests/fuzz/corpus/h2
 *
 * tests/unit/test_fuzz_replay.c includes this file to replay the committed corpus with gcc.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "h2.h"

int fuzz_h2_one(const uint8_t *data, size_t size);

#undef FUZZ_CHECK
#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_h2: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);      \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#define FZ_MAXID 4096

struct fz {
    int server;
    uint32_t max_streams;
    size_t open;            /* streams handed to us and not closed */
    uint8_t seen[FZ_MAXID]; /* 1 handed out, 2 closed (ids beyond FZ_MAXID are not tracked) */
    size_t body_sent[FZ_MAXID];
};

static const struct http_header fz_trailers[] = {{{"grpc-status", 11}, {"0", 1}, 0}};

static void fz_track_open(struct fz *f, int32_t id)
{
    if (id > 0 && id < FZ_MAXID && f->seen[id] == 0) {
        f->seen[id] = 1;
        f->open++;
    }
}

static int fz_head(struct h2_session *s, int32_t id, void *su, const struct h2_head *h, void *u)
{
    struct fz *f = u;
    (void)su;
    FUZZ_CHECK(h->nheaders <= H2_DEFAULT_MAX_HEADERS);
    for (size_t i = 0; i < h->nheaders; i++)
        FUZZ_CHECK(h->headers[i].name.len > 0 && h->headers[i].name.p[0] != ':');
    if (!f->server)
        return 0;
    FUZZ_CHECK(h->method.p != NULL && h->status == 0);
    fz_track_open(f, id);
    FUZZ_CHECK(f->open <= f->max_streams);
    /* Every third request is answered without a body, the rest with one and trailers. */
    struct h2_out_head resp = {.status = 200};
    FUZZ_CHECK(h2_submit_response(s, id, &resp, id % 3 != 0) == 0);
    return 0;
}

static int fz_data(struct h2_session *s, int32_t id, void *su, const uint8_t *p, size_t n, void *u)
{
    (void)su;
    (void)p;
    (void)u;
    FUZZ_CHECK(h2_consume(s, id, n) == 0);
    return 0;
}

static int fz_trailers_cb(struct h2_session *s, int32_t id, void *su, const struct http_header *t,
                          size_t n, void *u)
{
    (void)s;
    (void)id;
    (void)su;
    (void)u;
    for (size_t i = 0; i < n; i++)
        FUZZ_CHECK(t[i].name.len > 0 && t[i].name.p[0] != ':');
    return 0;
}

static void fz_close(struct h2_session *s, int32_t id, void *su, uint32_t code, void *u)
{
    struct fz *f = u;
    (void)s;
    (void)su;
    (void)code;
    if (id > 0 && id < FZ_MAXID) {
        FUZZ_CHECK(f->seen[id] == 1); /* handed out before, closed once */
        f->seen[id] = 2;
        f->open--;
    }
}

static ssize_t fz_read_body(struct h2_session *s, int32_t id, void *su, uint8_t *buf, size_t cap,
                            unsigned *flags, void *u)
{
    struct fz *f = u;
    (void)su;
    size_t *sent = id > 0 && id < FZ_MAXID ? &f->body_sent[id] : NULL;
    size_t n = cap < 100 ? cap : 100;
    memset(buf, 'b', n);
    if (sent == NULL || (*sent += n) >= 300) {
        *flags |= H2_BODY_EOF | H2_BODY_TRAILERS;
        FUZZ_CHECK(h2_submit_trailers(s, id, fz_trailers, 1) == 0);
    }
    return (ssize_t)n;
}

static const struct h2_callbacks fz_cbs = {
    fz_head, fz_data, fz_trailers_cb, NULL, fz_close, NULL, fz_read_body,
};

static void fz_drain(struct h2_session *s)
{
    static uint8_t out[16384];
    for (int i = 0; i < 1000; i++) {
        ssize_t n = h2_output(s, out, sizeof(out));
        FUZZ_CHECK(n >= 0 || (n == -EPROTO && h2_error(s) != NULL));
        if (n <= 0)
            return;
    }
}

int fuzz_h2_one(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    uint8_t mode = data[0];
    data++;
    size--;
    struct fz *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return 0;
    struct h2_limits lim = {0};
    if (mode & 4)
        lim = (struct h2_limits){.max_concurrent_streams = 4,
                                 .max_header_list_bytes = 512,
                                 .max_headers = 8,
                                 .stream_window_bytes = 1024,
                                 .max_continuations = 2,
                                 .reset_burst = 4,
                                 .reset_rate_per_s = 1,
                                 .max_outbound_ack = 8,
                                 .max_settings = 4};
    f->server = !(mode & 1);
    f->max_streams =
        lim.max_concurrent_streams ? lim.max_concurrent_streams : H2_DEFAULT_MAX_CONCURRENT_STREAMS;
    struct h2_session *s = h2_session_new(f->server ? H2_SERVER : H2_CLIENT, &lim, &fz_cbs, f);
    if (f->server) {
        static const uint8_t preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        FUZZ_CHECK(h2_feed(s, preface, 24) == 24);
    } else {
        struct h2_out_head rq = {.method = {"POST", 4},
                                 .scheme = {"https", 5},
                                 .authority = {"svc", 3},
                                 .path = {"/", 1}};
        int32_t id = h2_submit_request(s, &rq, 1, NULL);
        FUZZ_CHECK(id == 1);
        fz_track_open(f, id);
    }
    fz_drain(s);

    /* An exact-size copy, so ASan sees any read past the end. */
    uint8_t *buf = malloc(size != 0 ? size : 1);
    if (buf == NULL)
        goto out;
    memcpy(buf, data, size);
    size_t off = 0;
    int dead = 0;
    while (off < size) {
        size_t n = size - off;
        if (mode & 2) {
            size_t piece = 1 + (size_t)(buf[off] % 64);
            n = piece < n ? piece : n;
        }
        ssize_t r = h2_feed(s, buf + off, n);
        if (r == -EPROTO) {
            FUZZ_CHECK(h2_error(s) != NULL);
            dead = 1;
            fz_drain(s);
            break;
        }
        FUZZ_CHECK(r == (ssize_t)n);
        off += n;
        fz_drain(s);
    }
    if (dead)
        FUZZ_CHECK(h2_feed(s, buf, size) == -EPROTO);
    free(buf);
out:
    h2_session_free(s);
    free(f);
    return 0;
}

#ifndef FUZZ_REPLAY
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_h2_one(data, size);
}
#endif
