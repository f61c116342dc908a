/*
 * test_h1parse: the HTTP/1.1 parser's rules, each with a head it accepts and one it refuses;
 * every truncation of an accepted head is "need more" (picohttpparser's test.c); pipelined
 * requests parse one after another; the chunked decoder gives the same body at every split;
 * the serializer drops hop-by-hop fields and refuses injected ones.
 *
 * Every input is parsed from an allocation of exactly its length, so ASan reports any read
 * past the end.
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

#include "h1parse.h"

#define NHDR 16

static struct http_header hdrs[NHDR];
static const char *why;

static int parse_req_n(const char *s, size_t n, struct http_request *req)
{
    char *copy = malloc(n != 0 ? n : 1);
    assert_non_null(copy);
    memcpy(copy, s, n);
    req->headers = hdrs;
    req->headers_cap = NHDR;
    why = NULL;
    int rc = h1_parse_request(copy, n, 1024, req, &why);
    /* The slices point into <copy>: re-point them at <s> so callers may read them. */
    if (rc > 0) {
        ptrdiff_t d = s - copy;
        req->method_name.p += d;
        req->target.p += d;
        if (req->host.p)
            req->host.p += d;
        if (req->upgrade.p)
            req->upgrade.p += d;
        for (size_t i = 0; i < req->nheaders; i++) {
            hdrs[i].name.p += d;
            hdrs[i].value.p += d;
        }
        for (size_t i = 0; i < req->nconn_tokens; i++)
            req->conn_tokens[i].p += d;
    }
    free(copy);
    return rc;
}

static int parse_req(const char *s, struct http_request *req)
{
    return parse_req_n(s, strlen(s), req);
}

static int parse_res(const char *s, enum http_method m, struct http_response *res)
{
    size_t n = strlen(s);
    char *copy = malloc(n != 0 ? n : 1);
    assert_non_null(copy);
    memcpy(copy, s, n);
    res->headers = hdrs;
    res->headers_cap = NHDR;
    why = NULL;
    int rc = h1_parse_response(copy, n, 1024, m, res, &why);
    if (rc > 0) {
        ptrdiff_t d = s - copy;
        res->reason.p += d;
        for (size_t i = 0; i < res->nheaders; i++) {
            hdrs[i].name.p += d;
            hdrs[i].value.p += d;
        }
    }
    free(copy);
    return rc;
}

/* Every prefix of an accepted head is -EAGAIN, and the whole is its length. */
static void assert_complete_head(const char *s)
{
    struct http_request req;
    size_t n = strlen(s);
    for (size_t i = 0; i < n; i++)
        if (parse_req_n(s, i, &req) != -EAGAIN)
            fail_msg("prefix %zu of %s is not -EAGAIN", i, s);
    int rc = parse_req_n(s, n, &req);
    if (rc != (int)n)
        fail_msg("%s: got %d (%s)", s, rc, why ? why : "");
}

static void assert_bad(const char *s, int expect)
{
    struct http_request req;
    int rc = parse_req(s, &req);
    if (rc != expect)
        fail_msg("%s: got %d, expected %d", s, rc, expect);
    assert_non_null(why);
}

static void assert_slice(struct http_slice s, const char *want)
{
    assert_int_equal(s.len, strlen(want));
    assert_memory_equal(s.p, want, s.len);
}

/* Accepted heads of every shape, each whole and truncated at every byte. */
static const char *const good[] = {
    "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "GET /a/b?c=d HTTP/1.1\r\nHost: h\r\nUser-Agent: x/1\r\nAccept: */*\r\n\r\n",
    "GET / HTTP/1.0\r\n\r\n",
    "GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    "CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n",
    "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    "POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n",
    "POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
    "POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: h\r\nX-Empty:\r\nX-Sp:   v  \r\n\r\n",
    "GET / HTTP/1.1\r\nHost: h\r\nX-Obs: caf\xc3\xa9\r\nX-Tab: a\tb\r\n\r\n",
    "BREW /pot HTTP/1.1\r\nHost: h\r\n\r\n",
    "GET / HTTP/1.1\r\nHost:\r\n\r\n",
};

static void test_good_heads_and_truncations(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        assert_complete_head(good[i]);
}

static void test_request_fields(void **state)
{
    (void)state;
    struct http_request req;
    const char *s = "POST http://a.example/x?y HTTP/1.1\r\nHost: a.example\r\n"
                    "Content-Length: 12\r\nX-Pad:  v w \r\n\r\n";
    assert_int_equal(parse_req(s, &req), (int)strlen(s));
    assert_int_equal(req.method, HTTP_METHOD_POST);
    assert_slice(req.method_name, "POST");
    assert_slice(req.target, "http://a.example/x?y");
    assert_int_equal(req.target_form, HTTP_TARGET_ABSOLUTE);
    assert_int_equal(req.minor_version, 1);
    assert_slice(req.host, "a.example");
    assert_int_equal(req.framing, HTTP_BODY_LENGTH);
    assert_int_equal(req.content_length, 12);
    assert_true(req.flags & HTTP_F_KEEP_ALIVE);
    assert_int_equal(req.nheaders, 3);
    assert_slice(hdrs[2].name, "X-Pad");
    assert_slice(hdrs[2].value, "v w"); /* OWS trimmed both ends, inner kept */

    assert_true(parse_req("BREW / HTTP/1.1\r\nHost: h\r\n\r\n", &req) > 0);
    assert_int_equal(req.method, HTTP_METHOD_OTHER);
    /* Methods are case-sensitive: "get" is an unknown token, not GET. */
    assert_true(parse_req("get / HTTP/1.1\r\nHost: h\r\n\r\n", &req) > 0);
    assert_int_equal(req.method, HTTP_METHOD_OTHER);
    assert_true(parse_req("GET / HTTP/1.1\r\nHost: h\r\n\r\n", &req) > 0);
    assert_int_equal(req.framing, HTTP_BODY_NONE);
    assert_int_equal(req.target_form, HTTP_TARGET_ORIGIN);
}

/* L7.md section 2, rule by rule: the accepted neighbour first, then the refused one. */
static void test_content_length_and_transfer_encoding(void **state)
{
    (void)state;
    struct http_request req;
    /* CL + TE together. */
    assert_true(parse_req("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n", &req) > 0);
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
               "Transfer-Encoding: chunked\r\n\r\n",
               -EBADMSG);
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
               "Content-Length: 3\r\n\r\n",
               -EBADMSG);
    /* Duplicate Content-Length: identical ones fold, the later one flagged; differing refused. */
    assert_true(parse_req("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
                          "Content-Length: 3\r\n\r\n",
                          &req) > 0);
    assert_int_equal(req.content_length, 3);
    assert_int_equal(hdrs[1].flags, 0);
    assert_int_equal(hdrs[2].flags, HTTP_HDR_DUP);
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
               -EBADMSG);
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\n", -EBADMSG);
    /* Same number, different bytes: refused, since only identical duplicates fold. */
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 03\r\n\r\n",
               -EBADMSG);
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n", -EBADMSG);
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x3\r\n\r\n", -EBADMSG);
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n", -EBADMSG);
    /* 18 digits are accepted, 19 (which could overflow a careless reader) are not. */
    assert_true(
        parse_req("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 999999999999999999\r\n\r\n",
                  &req) > 0);
    assert_int_equal(req.content_length, 999999999999999999ull);
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551617\r\n\r\n",
               -EBADMSG);
    /* Transfer-Encoding: only one "chunked" (any case). */
    assert_true(
        parse_req("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n", &req) > 0);
    assert_int_equal(req.framing, HTTP_BODY_CHUNKED);
    assert_true(hdrs[1].flags & HTTP_HDR_HOP);
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", -EBADMSG);
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", -EBADMSG);
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
               "Transfer-Encoding: chunked\r\n\r\n",
               -EBADMSG);
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n", -EBADMSG);
    assert_bad("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n", -EBADMSG);
    /* Transfer-Encoding in HTTP/1.0 (RFC 9112 section 6.1: faulty framing). */
    assert_true(parse_req("POST / HTTP/1.0\r\nContent-Length: 1\r\n\r\n", &req) > 0);
    assert_bad("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", -EBADMSG);
}

static void test_line_rules(void **state)
{
    (void)state;
    struct http_request req;
    /* obs-fold. */
    assert_true(parse_req("GET / HTTP/1.1\r\nHost: h\r\nX: a b\r\n\r\n", &req) > 0);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n\tb\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\n Host: h\r\n\r\n", -EBADMSG);
    /* Whitespace before the colon. */
    assert_true(parse_req("GET / HTTP/1.1\r\nHost:h\r\n\r\n", &req) > 0);
    assert_bad("GET / HTTP/1.1\r\nHost : h\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\nContent-Length\t: 3\r\n\r\n", -EBADMSG);
    /* Bare CR anywhere. */
    assert_bad("GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", -EBADMSG);
    assert_bad("GET /\r HTTP/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\n\r\r\n", -EBADMSG);
    /* Bare LF: refused as a line end, wherever it is. */
    assert_bad("GET / HTTP/1.1\nHost: h\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: h\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\n\n", -EBADMSG);
    /* NUL. */
    assert_int_equal(parse_req_n("GET / HTTP/1.1\r\nHost: h\0\r\n\r\n", 29, &req), -EBADMSG);
    assert_int_equal(parse_req_n("GET /\0 HTTP/1.1\r\nHost: h\r\n\r\n", 29, &req), -EBADMSG);
    /* Other controls in a field value; DEL too; HTAB and obs-text are fine. */
    assert_true(parse_req("GET / HTTP/1.1\r\nHost: h\r\nX: \t\x80\xff\r\n\r\n", &req) > 0);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\nX: a\x01\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\nX: a\x7f\r\n\r\n", -EBADMSG);
    /* Field names are tokens. */
    assert_true(parse_req("GET / HTTP/1.1\r\nHost: h\r\nX-a.b_c~1!: v\r\n\r\n", &req) > 0);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\nX(y): v\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\n: v\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\nX\xc3\xa9: v\r\n\r\n", -EBADMSG);
    /* Every byte value in a name: exactly RFC 9110's tchar pass (':' ends the name). */
    for (int c = 1; c < 256; c++) {
        if (c == ':')
            continue;
        char head[64];
        int n = snprintf(head, sizeof(head), "GET / HTTP/1.1\r\nHost: h\r\nX%cY: v\r\n\r\n", c);
        int tchar = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
        int rc = parse_req_n(head, (size_t)n, &req);
        if (tchar)
            assert_true(rc > 0);
        else
            assert_int_equal(rc, -EBADMSG);
    }
    /* An empty line before the request line. */
    assert_bad("\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
}

static void test_request_line(void **state)
{
    (void)state;
    struct http_request req;
    /* Single spaces only. */
    assert_bad("GET  / HTTP/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1 \r\nHost: h\r\n\r\n", -EBADMSG);
    assert_bad("GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
    assert_bad("G(T / HTTP/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
    /* Versions. */
    assert_true(parse_req("GET / HTTP/1.0\r\n\r\n", &req) > 0);
    assert_int_equal(req.minor_version, 0);
    assert_bad("GET / HTTP/1.2\r\nHost: h\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/2.0\r\nHost: h\r\n\r\n", -EBADMSG);
    assert_bad("GET / http/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
    assert_bad("GET /\r\n\r\n", -EBADMSG);
    assert_bad("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", -EBADMSG);
    /* Target forms. */
    assert_true(parse_req("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", &req) > 0);
    assert_int_equal(req.target_form, HTTP_TARGET_ASTERISK);
    assert_bad("GET * HTTP/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
    assert_true(parse_req("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", &req) > 0);
    assert_int_equal(req.target_form, HTTP_TARGET_AUTHORITY);
    assert_bad("CONNECT / HTTP/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
    assert_bad("CONNECT h HTTP/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
    assert_bad("CONNECT h:x HTTP/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
    assert_bad("CONNECT h/x:443 HTTP/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
    assert_true(parse_req("GET https+x://h/ HTTP/1.1\r\nHost: h\r\n\r\n", &req) > 0);
    assert_int_equal(req.target_form, HTTP_TARGET_ABSOLUTE);
    assert_bad("GET h/x HTTP/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
    assert_bad("GET 1http://h/ HTTP/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
    assert_bad("GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n", -EBADMSG);
}

static void test_host(void **state)
{
    (void)state;
    struct http_request req;
    assert_true(parse_req("GET / HTTP/1.0\r\n\r\n", &req) > 0);
    assert_null(req.host.p);
    assert_bad("GET / HTTP/1.1\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", -EBADMSG);
    assert_true(parse_req("GET / HTTP/1.1\r\nHOST: [::1]:80\r\n\r\n", &req) > 0);
    assert_slice(req.host, "[::1]:80");
}

static void test_connection_keep_alive_and_hop_by_hop(void **state)
{
    (void)state;
    struct http_request req;
    /* HTTP/1.1 persists unless closed; HTTP/1.0 only with keep-alive. */
    assert_true(parse_req("GET / HTTP/1.1\r\nHost: h\r\n\r\n", &req) > 0);
    assert_true(req.flags & HTTP_F_KEEP_ALIVE);
    assert_true(parse_req("GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n", &req) > 0);
    assert_false(req.flags & HTTP_F_KEEP_ALIVE);
    assert_true(req.flags & HTTP_F_CONN_CLOSE);
    assert_true(parse_req("GET / HTTP/1.0\r\n\r\n", &req) > 0);
    assert_false(req.flags & HTTP_F_KEEP_ALIVE);
    assert_true(parse_req("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", &req) > 0);
    assert_true(req.flags & HTTP_F_KEEP_ALIVE);
    assert_true(parse_req("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", &req) > 0);
    assert_false(req.flags & HTTP_F_KEEP_ALIVE);

    /* The standard hop-by-hop fields and those Connection names are flagged, others not; a
     * token naming Content-Length or Host is ignored. */
    assert_true(parse_req("GET / HTTP/1.1\r\nHost: h\r\nConnection: x-a, , content-length,host\r\n"
                          "X-A: 1\r\nX-B: 2\r\nKeep-Alive: t=1\r\nTE: trailers\r\n"
                          "Content-Length: 0\r\nProxy-Connection: x\r\n\r\n",
                          &req) > 0);
    assert_int_equal(req.nconn_tokens, 3);
    assert_slice(req.conn_tokens[0], "x-a");
    assert_slice(req.conn_tokens[2], "host");
    unsigned want[] = {0, HTTP_HDR_HOP, HTTP_HDR_HOP, 0, HTTP_HDR_HOP, HTTP_HDR_HOP,
                       0, HTTP_HDR_HOP};
    assert_int_equal(req.nheaders, 8);
    for (size_t i = 0; i < 8; i++)
        assert_int_equal(hdrs[i].flags, want[i]);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\nConnection: a b\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\nConnection: a;b\r\n\r\n", -EBADMSG);
    assert_bad("GET / HTTP/1.1\r\nHost: h\r\nConnection: a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q\r\n\r\n",
               -EBADMSG);
}

static void test_expect_and_upgrade(void **state)
{
    (void)state;
    struct http_request req;
    assert_true(parse_req("PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n"
                          "Expect: 100-Continue\r\n\r\n",
                          &req) > 0);
    assert_true(req.flags & HTTP_F_EXPECT_CONTINUE);
    assert_false(req.flags & HTTP_F_EXPECT_OTHER);
    assert_true(parse_req("PUT / HTTP/1.1\r\nHost: h\r\nExpect: teapot\r\n\r\n", &req) > 0);
    assert_false(req.flags & HTTP_F_EXPECT_CONTINUE);
    assert_true(req.flags & HTTP_F_EXPECT_OTHER);
    /* HTTP/1.0 expectations are ignored. */
    assert_true(
        parse_req("PUT / HTTP/1.0\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n", &req) > 0);
    assert_false(req.flags & (HTTP_F_EXPECT_CONTINUE | HTTP_F_EXPECT_OTHER));

    assert_true(parse_req("GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                          "Upgrade: websocket\r\n\r\n",
                          &req) > 0);
    assert_true(req.flags & HTTP_F_UPGRADE);
    assert_slice(req.upgrade, "websocket");
    assert_true(hdrs[1].flags & HTTP_HDR_HOP);
    assert_true(hdrs[2].flags & HTTP_HDR_HOP);
    /* Upgrade without the Connection token is no offer (RFC 9110 section 7.8). */
    assert_true(parse_req("GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n", &req) > 0);
    assert_false(req.flags & HTTP_F_UPGRADE);
    assert_true(parse_req("GET /ws HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
                          &req) > 0);
    assert_false(req.flags & HTTP_F_UPGRADE);
}

static void test_limits(void **state)
{
    (void)state;
    struct http_request req;
    char big[1100];
    /* Header slots: NHDR fields fit, one more is -EMSGSIZE. */
    size_t n = (size_t)snprintf(big, sizeof(big), "GET / HTTP/1.1\r\nHost: h\r\n");
    for (int i = 1; i < NHDR; i++)
        n += (size_t)snprintf(big + n, sizeof(big) - n, "X%d: v\r\n", i);
    snprintf(big + n, sizeof(big) - n, "\r\n");
    assert_true(parse_req(big, &req) > 0);
    snprintf(big + n, sizeof(big) - n, "Y: v\r\n\r\n");
    assert_bad(big, -EMSGSIZE);

    /* The head limit (1024 in these tests): a head of exactly 1024 bytes passes, 1025 not; an
     * incomplete head is -EAGAIN below the limit and -EMSGSIZE at it. */
    const char *pre = "GET / HTTP/1.1\r\nHost: h\r\nX: ";
    memset(big, 'a', sizeof(big));
    memcpy(big, pre, strlen(pre));
    memcpy(big + 1024 - 4, "\r\n\r\n", 4);
    big[1024] = '\0';
    assert_int_equal(parse_req(big, &req), 1024);
    memset(big, 'a', sizeof(big));
    memcpy(big, pre, strlen(pre));
    memcpy(big + 1025 - 4, "\r\n\r\n", 4);
    big[1025] = '\0';
    assert_bad(big, -EMSGSIZE);
    assert_int_equal(parse_req_n(big, 1023, &req), -EAGAIN);
    assert_int_equal(parse_req_n(big, 1024, &req), -EMSGSIZE);
}

static void test_pipelined(void **state)
{
    (void)state;
    const char *s = "GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
                    "POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
                    "GET /3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
    const char *targets[] = {"/1", "/2", "/3"};
    size_t off = 0, len = strlen(s);
    for (int i = 0; i < 3; i++) {
        struct http_request req;
        int rc = parse_req_n(s + off, len - off, &req);
        assert_true(rc > 0);
        assert_slice(req.target, targets[i]);
        off += (size_t)rc;
        if (req.framing == HTTP_BODY_LENGTH)
            off += req.content_length;
    }
    assert_int_equal(off, len);
}

static void test_responses(void **state)
{
    (void)state;
    struct http_response res;
    const char *ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n";
    size_t n = strlen(ok);
    for (size_t i = 0; i < n; i++) {
        char tmp[64];
        memcpy(tmp, ok, i);
        tmp[i] = '\0';
        assert_int_equal(parse_res(tmp, HTTP_METHOD_GET, &res), -EAGAIN);
    }
    assert_int_equal(parse_res(ok, HTTP_METHOD_GET, &res), (int)n);
    assert_int_equal(res.status, 200);
    assert_int_equal(res.framing, HTTP_BODY_LENGTH);
    assert_true(res.flags & HTTP_F_KEEP_ALIVE);
    assert_true(parse_res("HTTP/1.1 204\r\n\r\n", HTTP_METHOD_GET, &res) > 0);
    assert_int_equal(res.framing, HTTP_BODY_NONE);
    assert_int_equal(res.reason.len, 0);
    assert_true(parse_res("HTTP/1.1 200 OK\r\n\r\n", HTTP_METHOD_GET, &res) > 0);
    assert_int_equal(res.framing, HTTP_BODY_UNTIL_CLOSE);
    assert_false(res.flags & HTTP_F_KEEP_ALIVE);
    assert_true(parse_res("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", HTTP_METHOD_HEAD, &res) >
                0);
    assert_int_equal(res.framing, HTTP_BODY_NONE);
    assert_true(parse_res("HTTP/1.1 200 OK\r\n\r\n", HTTP_METHOD_CONNECT, &res) > 0);
    assert_int_equal(res.framing, HTTP_BODY_TUNNEL);
    assert_true(parse_res("HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                          "Upgrade: websocket\r\n\r\n",
                          HTTP_METHOD_GET, &res) > 0);
    assert_int_equal(res.framing, HTTP_BODY_TUNNEL);
    assert_true(parse_res("HTTP/1.1 100 Continue\r\n\r\n", HTTP_METHOD_PUT, &res) > 0);
    assert_int_equal(res.framing, HTTP_BODY_NONE);
    assert_true(parse_res("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", HTTP_METHOD_GET,
                          &res) > 0);
    assert_int_equal(res.framing, HTTP_BODY_CHUNKED);
    assert_true(parse_res("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                          HTTP_METHOD_GET, &res) > 0);
    assert_true(res.flags & HTTP_F_KEEP_ALIVE);

    const char *bad[] = {
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        "HTTP/1.1 200 OK\nX: a\r\n\r\n",
        "HTTP/1.1 2000 OK\r\n\r\n",
        "HTTP/1.1 099 OK\r\n\r\n",
        "HTTP/1.1 600 OK\r\n\r\n",
        "HTTP/1.1 20x OK\r\n\r\n",
        "HTTP/1.1 200OK\r\n\r\n",
        "HTTP/2 200 OK\r\n\r\n",
        "HTTP/1.1 200 O\x01K\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (parse_res(bad[i], HTTP_METHOD_GET, &res) != -EBADMSG)
            fail_msg("accepted %s", bad[i]);
}

/* Decodes <body> split at <split1> and <split2>; returns the decoded length or the error. */
static long decode_split(const char *body, size_t n, size_t split1, size_t split2, char *out,
                         size_t *consumed)
{
    struct h1_chunked c;
    h1_chunked_init(&c);
    size_t cuts[] = {0, split1, split2, n}, olen = 0, used = 0;
    for (int k = 0; k < 3; k++) {
        size_t part = cuts[k + 1] - cuts[k];
        char *copy = malloc(part != 0 ? part : 1);
        assert_non_null(copy);
        memcpy(copy, body + cuts[k], part);
        size_t off = 0;
        while (off < part && !h1_chunked_done(&c)) {
            struct http_slice d;
            ssize_t r = h1_chunked_decode(&c, copy + off, part - off, &d, &why);
            if (r < 0) {
                free(copy);
                return r;
            }
            assert_true(r > 0);
            memcpy(out + olen, d.p, d.len);
            olen += d.len;
            off += (size_t)r;
        }
        used += off;
        free(copy);
    }
    *consumed = used;
    return h1_chunked_done(&c) ? (long)olen : -EAGAIN;
}

static void test_chunked_every_split(void **state)
{
    (void)state;
    const char *body = "5\r\nhello\r\n1A;ext=\"q\"; x\r\nabcdefghijklmnopqrstuvwxyz\r\n"
                       "0003 ;e\r\n123\r\n0\r\nTrailer-A: 1\r\nT-B:\r\n\r\nNEXT";
    const char *want = "helloabcdefghijklmnopqrstuvwxyz123";
    size_t n = strlen(body);
    char out[128];
    for (size_t a = 0; a <= n; a++) {
        for (size_t b = a; b <= n; b++) {
            size_t used = 0;
            long r = decode_split(body, n, a, b, out, &used);
            if (r != (long)strlen(want))
                fail_msg("split %zu/%zu: %ld (%s)", a, b, r, why ? why : "");
            assert_memory_equal(out, want, strlen(want));
            /* It stops at the end of the body: "NEXT" is the next message's. */
            assert_int_equal(used, n - 4);
        }
    }
    /* Every truncation is incomplete, not an error. */
    for (size_t t = 0; t < n - 4; t++) {
        size_t used;
        assert_int_equal(decode_split(body, t, 0, t, out, &used), -EAGAIN);
    }
}

static void chunked_bad(const char *body, int expect)
{
    char out[256];
    size_t used;
    long r = decode_split(body, strlen(body), 0, 0, out, &used);
    if (r != expect)
        fail_msg("%.40s: %ld, expected %d", body, r, expect);
}

static void test_chunked_refusals(void **state)
{
    (void)state;
    chunked_bad("0\r\n\r\n", 0);
    chunked_bad("ffffffffffffffff\r\n", -EAGAIN);                 /* 2^64-1 is representable */
    chunked_bad("10000000000000000\r\n", -EBADMSG);               /* 2^64: overflow */
    chunked_bad("00000000000000001\r\nx\r\n0\r\n\r\n", -EBADMSG); /* over 16 digits */
    chunked_bad("x\r\n", -EBADMSG);
    chunked_bad("\r\n", -EBADMSG);
    chunked_bad("-1\r\n", -EBADMSG);
    chunked_bad("1\nx\r\n0\r\n\r\n", -EBADMSG);    /* bare LF */
    chunked_bad("1\rx\r\n0\r\n\r\n", -EBADMSG);    /* bare CR */
    chunked_bad("1\r\nxy\r\n0\r\n\r\n", -EBADMSG); /* data longer than its size */
    chunked_bad("1\r\nx\n0\r\n\r\n", -EBADMSG);
    chunked_bad("1 x\r\nx\r\n0\r\n\r\n", -EBADMSG); /* BWS not before ";" */
    chunked_bad("1;a\x01\r\nx\r\n0\r\n\r\n", -EBADMSG);
    chunked_bad("0\r\nT: a\r\n b\r\n\r\n", -EBADMSG); /* obs-fold in trailers */
    chunked_bad("0\r\nT : a\r\n\r\n", -EBADMSG);
    chunked_bad("0\r\nT: a\x01\r\n\r\n", -EBADMSG);
    chunked_bad("0\r\nT: a\r\n\n", -EBADMSG);
    chunked_bad("0\r\n\r\r", -EBADMSG);
    /* Bounds: a long extension and a large trailer section. */
    static char big[H1_TRAILERS_MAX + 64];
    memset(big, 0, sizeof(big));
    memcpy(big, "1;", 2);
    memset(big + 2, 'e', H1_CHUNK_EXT_MAX);
    memcpy(big + 2 + H1_CHUNK_EXT_MAX, "\r\nx\r\n0\r\n\r\n", 10);
    chunked_bad(big, 1);
    memset(big, 0, sizeof(big));
    memcpy(big, "1;", 2);
    memset(big + 2, 'e', H1_CHUNK_EXT_MAX + 1);
    memcpy(big + 3 + H1_CHUNK_EXT_MAX, "\r\nx\r\n0\r\n\r\n", 10);
    chunked_bad(big, -EMSGSIZE);
    memset(big, 0, sizeof(big));
    memcpy(big, "0\r\nT: ", 6);
    memset(big + 6, 'v', H1_TRAILERS_MAX);
    memcpy(big + 6 + H1_TRAILERS_MAX, "\r\n\r\n", 4);
    chunked_bad(big, -EMSGSIZE);
    char many[512];
    size_t n = (size_t)snprintf(many, sizeof(many), "0\r\n");
    for (unsigned i = 0; i <= H1_TRAILERS_COUNT_MAX; i++)
        n += (size_t)snprintf(many + n, sizeof(many) - n, "T:\r\n");
    snprintf(many + n, sizeof(many) - n, "\r\n");
    chunked_bad(many, -EMSGSIZE);
}

/* The extra fields' values are checked a word at a time: every forbidden byte (controls but
 * tab, DEL) is refused at every position of a word and of the tail, and everything else,
 * tab and bytes from 0x80 included, passes. h1_field_ok(), the check a codec makes once for
 * a field it then flags HTTP_HDR_H1OK (X-Forwarded-Client-Cert), gives the same verdicts, on
 * values and on names (a token). */
static void test_serializer_extra_values(void **state)
{
    (void)state;
    struct http_request req;
    assert_true(parse_req("GET / HTTP/1.1\r\nHost: h\r\n\r\n", &req) > 0);
    char out[512], val[64];
    for (int c = 0; c < 256; c++) {
        int ok = c == '\t' || (c >= 0x20 && c != 0x7f);
        for (size_t len = 1; len <= 19; len++) {
            for (size_t at = 0; at < len; at++) {
                memset(val, 'v', len);
                val[at] = (char)c;
                struct http_header x[] = {{{"X", 1}, {val, len}, 0}};
                int n = h1_write_request_head(out, sizeof(out), &req, x, 1);
                if (ok)
                    assert_true(n > 0);
                else
                    assert_int_equal(n, -EINVAL);
                assert_int_equal(h1_field_ok(x[0].name, x[0].value), ok);
            }
        }
        int tchar = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
        char name[3] = {'X', (char)c, 'Y'};
        struct http_header x[] = {{{name, 3}, {"v", 1}, 0}};
        assert_int_equal(h1_field_ok(x[0].name, x[0].value), tchar);
        assert_int_equal(h1_write_request_head(out, sizeof(out), &req, x, 1) > 0, tchar);
    }
    /* A field flagged as checked is written as any other. */
    struct http_header plain[] = {{{"X-A", 3}, {"b c", 3}, 0}};
    struct http_header flagged[] = {{{"X-A", 3}, {"b c", 3}, HTTP_HDR_H1OK}};
    char out2[512];
    int n1 = h1_write_request_head(out, sizeof(out), &req, plain, 1);
    assert_true(n1 > 0);
    assert_int_equal(h1_write_request_head(out2, sizeof(out2), &req, flagged, 1), n1);
    assert_memory_equal(out, out2, (size_t)n1);
}

static void test_serializer(void **state)
{
    (void)state;
    struct http_request req;
    const char *in = "POST /x HTTP/1.0\r\nHost: h\r\nConnection: keep-alive, X-Hop\r\n"
                     "X-Hop: 1\r\nKeep-Alive: 5\r\nContent-Length: 2\r\nContent-Length: 2\r\n"
                     "X-End: e\r\n\r\n";
    assert_true(parse_req(in, &req) > 0);
    struct http_header extra[] = {{{"Connection", 10}, {"close", 5}, 0}};
    char out[256];
    int n = h1_write_request_head(out, sizeof(out), &req, extra, 1);
    const char *want = "POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nX-End: e\r\n"
                       "Connection: close\r\n\r\n";
    assert_int_equal(n, (int)strlen(want));
    assert_memory_equal(out, want, strlen(want));
    /* Too small by one byte, and exactly right. */
    assert_int_equal(h1_write_request_head(out, strlen(want) - 1, &req, extra, 1), -ENOSPC);
    assert_int_equal(h1_write_request_head(out, strlen(want), &req, extra, 1), n);
    /* An extra field that would inject a line is refused. */
    struct http_header inj[] = {{{"X", 1}, {"a\r\nEvil: 1", 10}, 0}};
    assert_int_equal(h1_write_request_head(out, sizeof(out), &req, inj, 1), -EINVAL);
    struct http_header inj2[] = {{{"X Y", 3}, {"a", 1}, 0}};
    assert_int_equal(h1_write_request_head(out, sizeof(out), &req, inj2, 1), -EINVAL);

    struct http_response res;
    assert_true(parse_res("HTTP/1.0 404 Not Found\r\nTransfer-Encoding: x\r\n\r\n", HTTP_METHOD_GET,
                          &res) == -EBADMSG);
    const char *rin = "HTTP/1.1 404 Not Found\r\nUpgrade: h2c\r\nContent-Length: 0\r\n\r\n";
    assert_true(parse_res(rin, HTTP_METHOD_GET, &res) > 0);
    n = h1_write_response_head(out, sizeof(out), &res, NULL, 0);
    const char *rwant = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
    assert_int_equal(n, (int)strlen(rwant));
    assert_memory_equal(out, rwant, strlen(rwant));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_heads_and_truncations),
        cmocka_unit_test(test_request_fields),
        cmocka_unit_test(test_content_length_and_transfer_encoding),
        cmocka_unit_test(test_line_rules),
        cmocka_unit_test(test_request_line),
        cmocka_unit_test(test_host),
        cmocka_unit_test(test_connection_keep_alive_and_hop_by_hop),
        cmocka_unit_test(test_expect_and_upgrade),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_pipelined),
        cmocka_unit_test(test_responses),
        cmocka_unit_test(test_chunked_every_split),
        cmocka_unit_test(test_chunked_refusals),
        cmocka_unit_test(test_serializer),
        cmocka_unit_test(test_serializer_extra_values),
    };
    return cmocka_run_group_tests_name("h1parse", tests, NULL, NULL);
}
