/*
 * test_stream: what a stream keeps of its request for the log, its result table, and the
 * X-Request-Id it generates (issue 9: inbound L7).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "h1parse.h"
#include "stream.h"

static struct http_request parse(const char *text, struct http_header *slots, size_t n)
{
    struct http_request rq = {.headers = slots, .headers_cap = n};
    const char *why = NULL;
    assert_true(h1_parse_request(text, strlen(text), H1_HEAD_MAX, &rq, &why) > 0);
    return rq;
}

/* The head's method, Host, target and X-Request-Id are copied (the head's buffer is gone by
 * the time the stream is logged); a target longer than the copy is cut, never overrun. */
static void test_begin_copies_the_head(void **state)
{
    (void)state;
    struct http_header slots[8];
    struct http_request rq = parse("PATCH /a/b?c=d HTTP/1.1\r\nHost: db:8080\r\n"
                                   "x-request-ID: abc-123\r\n\r\n",
                                   slots, 8);
    struct stream st;
    stream_begin(&st, 3, 1000, &rq);
    assert_int_equal(st.seq, 3);
    assert_int_equal(st.start_ms, 1000);
    assert_string_equal(st.method, "PATCH");
    assert_string_equal(st.authority, "db:8080");
    assert_string_equal(st.path, "/a/b?c=d");
    assert_string_equal(st.request_id, "abc-123");
    assert_int_equal(st.minor_version, 1);
    assert_int_equal(st.status, 0);

    static char big[STREAM_PATH_MAX * 3];
    int n = snprintf(big, sizeof(big), "GET /");
    memset(big + n, 'x', STREAM_PATH_MAX * 2);
    snprintf(big + n + STREAM_PATH_MAX * 2, sizeof(big) - (size_t)n - STREAM_PATH_MAX * 2,
             " HTTP/1.0\r\n\r\n");
    rq = parse(big, slots, 8);
    stream_begin(&st, 4, 0, &rq);
    assert_int_equal(strlen(st.path), STREAM_PATH_MAX - 1);
    assert_string_equal(st.authority, "");
    assert_string_equal(st.request_id, "");
    assert_int_equal(st.minor_version, 0);

    stream_begin(&st, 5, 0, NULL); /* a head that did not parse */
    assert_string_equal(st.method, "");
    assert_int_equal(st.minor_version, 1);
}

/*
 * stream_begin() on memory a previous stream used (mux_h2 takes its streams from a cache
 * without clearing them): every field starts at zero and every text is empty, though only the
 * text buffers' first bytes are written.
 */
static void test_begin_on_used_memory(void **state)
{
    (void)state;
    struct stream st, zero;
    memset(&st, 0xa5, sizeof(st));
    stream_begin(&st, 7, 42, NULL);
    memset(&zero, 0, sizeof(zero));
    zero.seq = 7;
    zero.start_ms = 42;
    zero.minor_version = 1;
    /* Everything before the text buffers, as a fresh stream has it. */
    assert_memory_equal(&st, &zero, offsetof(struct stream, method));
    assert_string_equal(st.method, "");
    assert_string_equal(st.authority, "");
    assert_string_equal(st.path, "");
    assert_string_equal(st.request_id, "");
    assert_string_equal(st.grpc_status, "");
    assert_null(st.route);
    assert_null(st.active);
    assert_int_equal(st.done, 0);
}

/* X-Request-Id when the caller sent none: a random RFC 9562 version-4 UUID. */
static void test_request_id_is_uuid_v4(void **state)
{
    (void)state;
    struct stream a, b;
    stream_begin(&a, 1, 0, NULL);
    stream_begin(&b, 2, 0, NULL);
    stream_new_request_id(&a);
    stream_new_request_id(&b);
    assert_int_equal(strlen(a.request_id), 36);
    for (int i = 0; i < 36; i++) {
        char c = a.request_id[i];
        if (i == 8 || i == 13 || i == 18 || i == 23)
            assert_int_equal(c, '-');
        else
            assert_true((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
    }
    assert_int_equal(a.request_id[14], '4');
    assert_non_null(strchr("89ab", a.request_id[19]));
    assert_string_not_equal(a.request_id, b.request_id);
}

/* The result table: labels and the status connectd answers with on its own. */
static void test_results(void **state)
{
    (void)state;
    assert_string_equal(stream_result_name(STREAM_RES_DENIED), "denied");
    assert_int_equal(stream_result_status(STREAM_RES_DENIED), 403);
    assert_int_equal(stream_result_status(STREAM_RES_BAD_REQUEST), 400);
    assert_int_equal(stream_result_status(STREAM_RES_HEADERS_TOO_LARGE), 431);
    assert_int_equal(stream_result_status(STREAM_RES_LOCAL_CONNECT_ERROR), 503);
    assert_int_equal(stream_result_status(STREAM_RES_LOCAL_RESET), 503);
    assert_int_equal(stream_result_status(STREAM_RES_LOCAL_TIMEOUT), 504);
    assert_int_equal(stream_result_status(STREAM_RES_BAD_RESPONSE), 502);
    assert_int_equal(stream_result_status(STREAM_RES_OK), 0);
    assert_string_equal(stream_result_name(STREAM_RES_RATE_LIMITED), "rate_limited");
    assert_int_equal(stream_result_status(STREAM_RES_RATE_LIMITED), 429);
    assert_int_equal(stream_verdict_result(STREAM_RATE_LIMITED), STREAM_RES_RATE_LIMITED);
    assert_int_equal(stream_verdict_result(STREAM_DENY), STREAM_RES_DENIED);
    assert_int_equal(stream_verdict_result(STREAM_REDIRECT), STREAM_RES_REDIRECT);
    assert_int_equal(stream_verdict_result(STREAM_REFUSE), STREAM_RES_BAD_REQUEST);
    assert_string_equal(stream_result_name((enum stream_result)999), "aborted");
    assert_int_equal(stream_result_status((enum stream_result)999), 0);
    /* The words of connectd's own answers, one table for HTTP/1.1 bodies and grpc-message. */
    assert_string_equal(stream_local_body(STREAM_RES_DENIED), "RBAC: access denied");
    assert_string_equal(stream_local_body(STREAM_RES_RATE_LIMITED), "local_rate_limited");
    assert_string_equal(stream_local_body(STREAM_RES_UPSTREAM_TIMEOUT), "upstream request timeout");
    assert_string_equal(stream_local_body(STREAM_RES_NO_ROUTE), "");
    assert_string_equal(stream_local_body(STREAM_RES_BAD_REQUEST), "bad request");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_begin_copies_the_head),
        cmocka_unit_test(test_begin_on_used_memory),
        cmocka_unit_test(test_request_id_is_uuid_v4),
        cmocka_unit_test(test_results),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
