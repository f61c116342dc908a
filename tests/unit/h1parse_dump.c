/*
 * h1parse_dump: a test program (not part of connectd) that reads HTTP/1 bytes from stdin,
 * parses them with h1parse and prints one JSON line per message, for the differential test
 * tests/integ/test_h1parse_diff.py.
 *
 *   h1parse_dump [request|response] < bytes
 *
 * Requests are read one after another (pipelining), each body skipped by its framing, until
 * the input ends, a head is refused or incomplete, or the connection cannot carry another
 * request (not keep-alive, an upgrade, CONNECT). A line is either
 *   {"ok":true,"len":N,"method":...,"target":...,"version":"1.1","headers":[[n,v],...],
 *    "framing":...,"content_length":N,"keep_alive":bool,"body":...}
 * or {"ok":false,"error":"EBADMSG"|"EAGAIN"|"EMSGSIZE","why":...}. Strings are JSON with
 * every byte outside printable ASCII escaped as \u00XX, so the reader gets the bytes back
 * through latin-1.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "h1parse.h"

#define MAX_INPUT (1u << 20)

static void json_str(const char *p, size_t n)
{
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c < 0x20 || c >= 0x7f || c == '"' || c == '\\')
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static void fail_line(int rc, const char *why)
{
    const char *e = rc == -EAGAIN ? "EAGAIN" : rc == -EMSGSIZE ? "EMSGSIZE" : "EBADMSG";
    printf("{\"ok\":false,\"error\":\"%s\",\"why\":", e);
    json_str(why, strlen(why));
    printf("}\n");
}

static const char *const framing_names[] = {"none", "length", "chunked", "until-close", "tunnel"};

static void headers_json(const struct http_header *h, size_t n)
{
    printf("\"headers\":[");
    for (size_t i = 0; i < n; i++) {
        printf(i ? ",[" : "[");
        json_str(h[i].name.p, h[i].name.len);
        putchar(',');
        json_str(h[i].value.p, h[i].value.len);
        printf(",%u]", h[i].flags);
    }
    printf("]");
}

/* Skips the body at <p> and prints it; returns its framing length, or -1 when incomplete. */
static long body(const char *p, size_t n, enum http_framing fr, uint64_t cl, int *bad,
                 const char **why)
{
    static char out[MAX_INPUT];
    size_t used = 0, olen = 0;
    *bad = 0;
    if (fr == HTTP_BODY_LENGTH) {
        if (cl > n)
            return -1;
        memcpy(out, p, (size_t)cl);
        olen = used = (size_t)cl;
    } else if (fr == HTTP_BODY_CHUNKED) {
        struct h1_chunked c;
        h1_chunked_init(&c);
        while (used < n && !h1_chunked_done(&c)) {
            struct http_slice d;
            ssize_t r = h1_chunked_decode(&c, p + used, n - used, &d, why);
            if (r < 0) {
                *bad = (int)r;
                return -1;
            }
            memcpy(out + olen, d.p, d.len);
            olen += d.len;
            used += (size_t)r;
        }
        if (!h1_chunked_done(&c))
            return -1;
    }
    printf(",\"used\":%zu,\"body\":", used);
    json_str(out, olen);
    return (long)used;
}

static int dump_requests(const char *buf, size_t len)
{
    struct http_header hdrs[100];
    size_t off = 0;
    while (off < len) {
        struct http_request req = {.headers = hdrs, .headers_cap = 100};
        const char *why = "incomplete head";
        int rc = h1_parse_request(buf + off, len - off, H1_HEAD_MAX, &req, &why);
        if (rc < 0) {
            fail_line(rc, why);
            return 0;
        }
        printf("{\"ok\":true,\"len\":%d,\"method\":", rc);
        json_str(req.method_name.p, req.method_name.len);
        printf(",\"target\":");
        json_str(req.target.p, req.target.len);
        printf(",\"version\":\"1.%d\",", req.minor_version);
        headers_json(req.headers, req.nheaders);
        printf(",\"framing\":\"%s\",\"content_length\":%llu,\"keep_alive\":%s,"
               "\"expect_continue\":%s,\"upgrade\":%s",
               framing_names[req.framing], (unsigned long long)req.content_length,
               (req.flags & HTTP_F_KEEP_ALIVE) ? "true" : "false",
               (req.flags & HTTP_F_EXPECT_CONTINUE) ? "true" : "false",
               (req.flags & HTTP_F_UPGRADE) ? "true" : "false");
        off += (size_t)rc;
        int bad;
        const char *bwhy = "incomplete body";
        long used = body(buf + off, len - off, req.framing, req.content_length, &bad, &bwhy);
        printf("}\n");
        if (used < 0) {
            fail_line(bad != 0 ? bad : -EAGAIN, bwhy);
            return 0;
        }
        off += (size_t)used;
        if (!(req.flags & HTTP_F_KEEP_ALIVE) || (req.flags & HTTP_F_UPGRADE) ||
            req.method == HTTP_METHOD_CONNECT)
            return 0;
    }
    return 0;
}

static int dump_response(const char *buf, size_t len)
{
    struct http_header hdrs[100];
    struct http_response res = {.headers = hdrs, .headers_cap = 100};
    const char *why = "incomplete head";
    int rc = h1_parse_response(buf, len, H1_HEAD_MAX, HTTP_METHOD_GET, &res, &why);
    if (rc < 0) {
        fail_line(rc, why);
        return 0;
    }
    printf("{\"ok\":true,\"len\":%d,\"status\":%d,\"reason\":", rc, res.status);
    json_str(res.reason.p, res.reason.len);
    printf(",\"version\":\"1.%d\",", res.minor_version);
    headers_json(res.headers, res.nheaders);
    printf(",\"framing\":\"%s\",\"content_length\":%llu,\"keep_alive\":%s}\n",
           framing_names[res.framing], (unsigned long long)res.content_length,
           (res.flags & HTTP_F_KEEP_ALIVE) ? "true" : "false");
    return 0;
}

int main(int argc, char **argv)
{
    static char buf[MAX_INPUT];
    size_t len = 0;
    for (;;) {
        ssize_t r = read(0, buf + len, sizeof(buf) - len);
        if (r < 0)
            return 2;
        if (r == 0 || (len += (size_t)r) == sizeof(buf))
            break;
    }
    if (argc > 1 && strcmp(argv[1], "response") == 0)
        return dump_response(buf, len);
    return dump_requests(buf, len);
}
