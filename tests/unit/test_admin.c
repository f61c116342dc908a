/*
 * Unit tests for the admin endpoint's request parser and query decoder (pure functions), and
 * the replay of the committed corpus (tests/fuzz/corpus/admin/) through the fuzz target. Run
 * from the repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "corpus.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "admin.h"

/* The target itself, so the replay runs exactly what the fuzzer runs. */
#include "../fuzz/fuzz_admin.c"

#define CORPUS_DIR "tests/fuzz/corpus/admin"

/* Parses <s> from an exact-size copy (so ASan sees over-reads). */
static int parse(const char *s, size_t n, struct admin_request *req)
{
    char *buf = malloc(n != 0 ? n : 1);
    assert_non_null(buf);
    memcpy(buf, s, n);
    int rc = admin_parse_request(buf, n, req);
    free(buf);
    return rc;
}

static void test_complete_request(void **state)
{
    (void)state;
    static const char r[] = "GET /authz?source=web HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\nrest";
    struct admin_request req;
    int rc = parse(r, sizeof(r) - 1, &req);
    assert_int_equal(rc, (int)(sizeof(r) - 1 - 4));
    assert_string_equal(req.method, "GET");
    assert_string_equal(req.path, "/authz");
    assert_string_equal(req.query, "source=web");
    assert_int_equal(req.minor_version, 1);
}

/* Every truncation of a valid head is "need more", never "bad" or a success. */
static void test_every_truncation_needs_more(void **state)
{
    (void)state;
    static const char *const heads[] = {
        "GET /ready HTTP/1.1\r\nHost: localhost:19100\r\nUser-Agent: curl/8.5\r\n\r\n",
        "GET /metrics HTTP/1.0\n\n",
        "GET /authz?source=a%2Fb&namespace=ns HTTP/1.1\r\nX-Empty:\r\nX-Tab:\ta\tb\r\n\r\n",
    };
    for (size_t h = 0; h < sizeof(heads) / sizeof(heads[0]); h++) {
        size_t len = strlen(heads[h]);
        struct admin_request req;
        for (size_t n = 0; n < len; n++)
            assert_int_equal(parse(heads[h], n, &req), -EAGAIN);
        assert_int_equal(parse(heads[h], len, &req), (int)len);
    }
}

static void test_garbage_is_bad(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "\x16\x03\x01\x02\x00",         /* a TLS ClientHello */
        "GET\r\n\r\n",                  /* no target */
        "GET /ready\r\n\r\n",           /* HTTP/0.9 style */
        "GET ready HTTP/1.1\r\n\r\n",   /* not origin-form */
        "GET  /ready HTTP/1.1\r\n\r\n", /* two spaces */
        "GET /ready HTTP/1.1 \r\n\r\n", /* trailing space */
        "GET /ready HTTP/1.x\r\n\r\n",  /* bad version digit */
        "GET /ready HTTP/1.1\r\nNo colon\r\n\r\n",
        "GET /ready HTTP/1.1\r\n: empty name\r\n\r\n",
        "GET /ready HTTP/1.1\r\nX: a\rb\r\n\r\n", /* bare CR inside a line */
        "GET /ready HTTP/1.1\r\nX: a\x01\r\n\r\n",
        "G\x01", /* refused before the line ends */
        "GET /re\x7f",
    };
    /* Found by fuzz_admin: a NUL counted as a token character (strchr finds the terminator). */
    static const char nul_name[] = "GET / HTTP/1.1\r\nConte.\0ngth: 3\r\n\r\n";
    struct admin_request r;
    assert_int_equal(parse(nul_name, sizeof(nul_name) - 1, &r), -EBADMSG);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct admin_request req;
        int rc = parse(bad[i], strlen(bad[i]), &req);
        if (rc != -EBADMSG)
            fail_msg("case %zu: expected -EBADMSG, got %d", i, rc);
    }
}

static void test_limits(void **state)
{
    (void)state;
    struct admin_request req;
    char *big = malloc(ADMIN_REQUEST_MAX + 100);
    assert_non_null(big);
    /* A head that never ends within the cap. */
    int n = snprintf(big, 64, "GET / HTTP/1.1\r\nX: ");
    memset(big + n, 'a', ADMIN_REQUEST_MAX + 100 - (size_t)n);
    assert_int_equal(parse(big, ADMIN_REQUEST_MAX - 1, &req), -EAGAIN);
    assert_int_equal(parse(big, ADMIN_REQUEST_MAX, &req), -EMSGSIZE);
    assert_int_equal(parse(big, ADMIN_REQUEST_MAX + 100, &req), -EMSGSIZE);
    /* A target over ADMIN_TARGET_MAX. */
    n = snprintf(big, 8, "GET /");
    memset(big + n, 'a', ADMIN_TARGET_MAX);
    memcpy(big + n + ADMIN_TARGET_MAX, " HTTP/1.1\r\n\r\n", 13);
    assert_int_equal(parse(big, (size_t)n + ADMIN_TARGET_MAX + 13, &req), -ENAMETOOLONG);
    free(big);
    assert_int_equal(parse("GET / HTTP/2.0\r\n\r\n", 18, &req), -EPROTONOSUPPORT);
    /* Methods other than GET parse; the server answers 405. */
    assert_int_equal(parse("DELETE / HTTP/1.1\r\n\r\n", 21, &req), 21);
    assert_string_equal(req.method, "DELETE");
}

static void test_query_param(void **state)
{
    (void)state;
    char v[16];
    assert_int_equal(admin_query_param("source=web&namespace=ns1", "source", v, sizeof(v)), 3);
    assert_string_equal(v, "web");
    assert_int_equal(admin_query_param("source=web&namespace=ns1", "namespace", v, sizeof(v)), 3);
    assert_string_equal(v, "ns1");
    assert_int_equal(admin_query_param("sourcex=1&source=a%2Fb+c", "source", v, sizeof(v)), 5);
    assert_string_equal(v, "a/b c");
    assert_int_equal(admin_query_param("source", "source", v, sizeof(v)), 0);
    assert_int_equal(admin_query_param("", "source", v, sizeof(v)), -ENOENT);
    assert_int_equal(admin_query_param("source=%zz", "source", v, sizeof(v)), -EINVAL);
    assert_int_equal(admin_query_param("source=%2", "source", v, sizeof(v)), -EINVAL);
    assert_int_equal(admin_query_param("source=%00", "source", v, sizeof(v)), -EINVAL);
    assert_int_equal(admin_query_param("source=0123456789abcdefg", "source", v, sizeof(v)),
                     -ENOSPC);
}

static void test_writers_escape(void **state)
{
    (void)state;
    struct admin_buf b = {0};
    admin_buf_json_str(&b, "a\"b\\c\n\x01");
    assert_string_equal(b.data, "\"a\\\"b\\\\c\\u000a\\u0001\"");
    admin_buf_dispose(&b);
    admin_buf_label(&b, "x\"y\\z\n");
    assert_string_equal(b.data, "\"x\\\"y\\\\z\\n\"");
    admin_buf_dispose(&b);
}

static void test_replay_admin_corpus(void **state)
{
    (void)state;
    corpus_replay(CORPUS_DIR, LLVMFuzzerTestOneInput);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_complete_request),
        cmocka_unit_test(test_every_truncation_needs_more),
        cmocka_unit_test(test_garbage_is_bad),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_query_param),
        cmocka_unit_test(test_writers_escape),
        cmocka_unit_test(test_replay_admin_corpus),
    };
    return cmocka_run_group_tests_name("admin", tests, NULL, NULL);
}
