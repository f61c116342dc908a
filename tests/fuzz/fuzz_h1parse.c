/*
 * fuzz_h1parse: a libFuzzer target for the HTTP/1.1 parser, chunked decoder and serializer.
 *
 * Beyond "no crash, no over-read" it checks their contracts: a complete head's length is
 * within the input and the limit, and every shorter prefix of it is "need more"; a refusal
 * comes with a reason; a parsed request written back by the serializer parses again to the
 * same method, target and framing, without its hop-by-hop fields; the chunked decoder gives
 * the same body, verdict and length whether it is fed the input at once or byte by byte.
 *
 *   make fuzz FUZZ_SECONDS=60           (every target; this one is build/fuzz/fuzz_h1parse)
 *   build/fuzz/fuzz_h1parse -max_len=65536 tests/fuzz/corpus/h1parse
 *
 * tests/unit/test_fuzz_replay.c includes this file to replay the committed corpus with gcc.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "h1parse.h"

int fuzz_h1parse_one(const uint8_t *data, size_t size);

#undef FUZZ_CHECK
#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_h1parse: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#define FZ_HEAD_MAX 4096
#define FZ_HDRS     32

static int verdict_ok(int rc)
{
    return rc > 0 || rc == -EAGAIN || rc == -EBADMSG || rc == -EMSGSIZE;
}

/* The serializer's output parses again to the same request, less its hop-by-hop fields. */
static void fuzz_roundtrip(const struct http_request *req)
{
    static char out[2 * FZ_HEAD_MAX];
    struct http_header extra[2];
    size_t nextra = 0, kept = 0;
    if (req->host.p == NULL)
        return; /* an HTTP/1.0 request without Host is not a valid HTTP/1.1 one */
    if (req->framing == HTTP_BODY_CHUNKED)
        extra[nextra++] = (struct http_header){{"Transfer-Encoding", 17}, {"chunked", 7}, 0};
    extra[nextra++] = (struct http_header){{"Connection", 10}, {"close", 5}, 0};
    for (size_t i = 0; i < req->nheaders; i++)
        if (!(req->headers[i].flags & (HTTP_HDR_HOP | HTTP_HDR_DUP)))
            kept++;
    int n = h1_write_request_head(out, sizeof(out), req, extra, nextra);
    FUZZ_CHECK(n > 0 && (size_t)n <= sizeof(out));
    struct http_header hdrs[FZ_HDRS + 2];
    struct http_request again = {.headers = hdrs, .headers_cap = FZ_HDRS + 2};
    const char *why = NULL;
    int rc = h1_parse_request(out, (size_t)n, sizeof(out), &again, &why);
    if (rc != n) {
        fprintf(stderr, "fuzz_h1parse: reparse %d (%s): %.*s\n", rc, why ? why : "", n, out);
        abort();
    }
    FUZZ_CHECK(again.minor_version == 1 && again.method == req->method);
    FUZZ_CHECK(again.target.len == req->target.len &&
               memcmp(again.target.p, req->target.p, req->target.len) == 0);
    FUZZ_CHECK(again.framing == req->framing && again.content_length == req->content_length);
    FUZZ_CHECK(again.nheaders == kept + nextra);
    FUZZ_CHECK(!(again.flags & HTTP_F_KEEP_ALIVE));
}

/* Decodes <buf> as a chunked body: whole, then byte by byte; both must agree. */
static void fuzz_chunked(const char *buf, size_t size)
{
    struct h1_chunked a, b;
    struct http_slice d;
    size_t used_a = 0, used_b = 0, out_a = 0, out_b = 0;
    uint64_t sum_a = 0, sum_b = 0;
    ssize_t ra = 0, rb = 0;
    h1_chunked_init(&a);
    while (used_a < size && !h1_chunked_done(&a)) {
        const char *why = NULL;
        ra = h1_chunked_decode(&a, buf + used_a, size - used_a, &d, &why);
        if (ra < 0) {
            FUZZ_CHECK((ra == -EBADMSG || ra == -EMSGSIZE) && why != NULL);
            break;
        }
        FUZZ_CHECK(ra > 0 && (size_t)ra <= size - used_a);
        FUZZ_CHECK(d.len <= (size_t)ra && d.p >= buf + used_a && d.p + d.len <= buf + size);
        for (size_t i = 0; i < d.len; i++)
            sum_a = sum_a * 31 + (unsigned char)d.p[i];
        out_a += d.len;
        used_a += (size_t)ra;
    }
    h1_chunked_init(&b);
    while (used_b < size && !h1_chunked_done(&b)) {
        rb = h1_chunked_decode(&b, buf + used_b, 1, &d, NULL);
        if (rb < 0)
            break;
        FUZZ_CHECK(rb == 1 && d.len <= 1);
        if (d.len == 1)
            sum_b = sum_b * 31 + (unsigned char)d.p[0];
        out_b += d.len;
        used_b += 1;
    }
    FUZZ_CHECK((ra < 0) == (rb < 0));
    if (ra < 0) {
        FUZZ_CHECK(ra == rb);
        return;
    }
    FUZZ_CHECK(h1_chunked_done(&a) == h1_chunked_done(&b));
    FUZZ_CHECK(used_a == used_b && out_a == out_b && sum_a == sum_b);
    /* A finished decoder takes nothing more. */
    if (h1_chunked_done(&a))
        FUZZ_CHECK(h1_chunked_decode(&a, buf, size, &d, NULL) == 0);
}

static void fuzz_request(const char *buf, size_t size)
{
    struct http_header hdrs[FZ_HDRS];
    struct http_request req = {.headers = hdrs, .headers_cap = FZ_HDRS};
    const char *why = NULL;
    int rc = h1_parse_request(buf, size, FZ_HEAD_MAX, &req, &why);
    FUZZ_CHECK(verdict_ok(rc));
    if (rc == -EBADMSG || rc == -EMSGSIZE)
        FUZZ_CHECK(why != NULL && why[0] != '\0');
    if (rc == -EAGAIN)
        FUZZ_CHECK(size < FZ_HEAD_MAX);
    if (rc <= 0)
        return;
    FUZZ_CHECK((size_t)rc <= size && rc <= FZ_HEAD_MAX && req.nheaders <= FZ_HDRS);
    FUZZ_CHECK(req.minor_version == 0 || req.minor_version == 1);
    FUZZ_CHECK(req.method_name.len > 0 && req.target.len > 0);
    FUZZ_CHECK(req.framing <= HTTP_BODY_CHUNKED);
    /* Every prefix is "need more" (sampled on long heads to keep the fuzzer fast). */
    size_t step = (size_t)rc > 512 ? (size_t)rc / 256 : 1;
    for (size_t n = 0; n < (size_t)rc; n += step) {
        struct http_request part = {.headers = hdrs, .headers_cap = FZ_HDRS};
        FUZZ_CHECK(h1_parse_request(buf, n, FZ_HEAD_MAX, &part, NULL) == -EAGAIN);
    }
    /* <hdrs> was reused by the prefixes: parse again for the round trip. */
    FUZZ_CHECK(h1_parse_request(buf, size, FZ_HEAD_MAX, &req, NULL) == rc);
    fuzz_roundtrip(&req);
    if (req.framing == HTTP_BODY_CHUNKED)
        fuzz_chunked(buf + rc, size - (size_t)rc);
}

static void fuzz_response(const char *buf, size_t size, enum http_method m)
{
    struct http_header hdrs[FZ_HDRS];
    struct http_response res = {.headers = hdrs, .headers_cap = FZ_HDRS};
    const char *why = NULL;
    int rc = h1_parse_response(buf, size, FZ_HEAD_MAX, m, &res, &why);
    FUZZ_CHECK(verdict_ok(rc));
    if (rc == -EBADMSG || rc == -EMSGSIZE)
        FUZZ_CHECK(why != NULL && why[0] != '\0');
    if (rc <= 0)
        return;
    FUZZ_CHECK((size_t)rc <= size && rc <= FZ_HEAD_MAX);
    FUZZ_CHECK(res.status >= 100 && res.status <= 599);
    if (res.framing == HTTP_BODY_UNTIL_CLOSE || res.framing == HTTP_BODY_TUNNEL)
        FUZZ_CHECK(!(res.flags & HTTP_F_KEEP_ALIVE));
    static char out[2 * FZ_HEAD_MAX];
    int n = h1_write_response_head(out, sizeof(out), &res, NULL, 0);
    FUZZ_CHECK(n > 0);
    struct http_header hdrs2[FZ_HDRS];
    struct http_response again = {.headers = hdrs2, .headers_cap = FZ_HDRS};
    FUZZ_CHECK(h1_parse_response(out, (size_t)n, sizeof(out), m, &again, NULL) == n);
    FUZZ_CHECK(again.status == res.status);
}

int fuzz_h1parse_one(const uint8_t *data, size_t size)
{
    /* An exact-size copy, so ASan sees any read past the end. */
    char *buf = malloc(size != 0 ? size : 1);
    if (buf == NULL)
        return 0;
    memcpy(buf, data, size);
    fuzz_request(buf, size);
    fuzz_response(buf, size, HTTP_METHOD_GET);
    fuzz_response(buf, size, HTTP_METHOD_HEAD);
    fuzz_response(buf, size, HTTP_METHOD_CONNECT);
    fuzz_chunked(buf, size);
    free(buf);
    return 0;
}

#ifndef FUZZ_REPLAY
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_h1parse_one(data, size);
}
#endif
