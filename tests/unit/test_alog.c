/*
 * Unit tests for alog and the log module's escaping: JSON strings and logfmt values for
 * hostile input, the access-log line in both formats, its bound, and the RFC 3339 time.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <string.h>

#include "alog.h"
#include "log.h"

static const char *json(const char *s, char *buf, size_t cap)
{
    struct log_buf b = {buf, 0, cap, 0};
    buf[0] = '\0';
    log_buf_json_str(&b, s);
    return buf;
}

static const char *logfmt(const char *s, char *buf, size_t cap)
{
    struct log_buf b = {buf, 0, cap, 0};
    buf[0] = '\0';
    log_buf_logfmt_val(&b, s);
    return buf;
}

static void test_json_escaping(void **state)
{
    char buf[256];
    (void)state;
    assert_string_equal(json("plain", buf, sizeof(buf)), "\"plain\"");
    assert_string_equal(json("a\"b\\c", buf, sizeof(buf)), "\"a\\\"b\\\\c\"");
    assert_string_equal(json("l1\nl2\tx\r", buf, sizeof(buf)), "\"l1\\nl2\\tx\\r\"");
    assert_string_equal(json("\x01\x1f\x7f", buf, sizeof(buf)), "\"\\u0001\\u001f\\u007f\"");
    assert_string_equal(json("caf\xc3\xa9", buf, sizeof(buf)), "\"caf\\u00c3\\u00a9\"");
    assert_string_equal(json("", buf, sizeof(buf)), "\"\"");
    assert_string_equal(json(NULL, buf, sizeof(buf)), "null");
}

static void test_logfmt_quoting(void **state)
{
    char buf[256];
    (void)state;
    assert_string_equal(logfmt("spiffe://x/ns/default", buf, sizeof(buf)), "spiffe://x/ns/default");
    assert_string_equal(logfmt("two words", buf, sizeof(buf)), "\"two words\"");
    assert_string_equal(logfmt("k=v", buf, sizeof(buf)), "\"k=v\"");
    assert_string_equal(logfmt("say \"hi\"\\", buf, sizeof(buf)), "\"say \\\"hi\\\"\\\\\"");
    assert_string_equal(logfmt("a\nb\x02", buf, sizeof(buf)), "\"a\\nb\\x02\"");
    assert_string_equal(logfmt("", buf, sizeof(buf)), "\"\"");
    assert_string_equal(logfmt(NULL, buf, sizeof(buf)), "");
}

static void test_values_are_bounded(void **state)
{
    static char big[LOG_VALUE_MAX * 3], out[LOG_VALUE_MAX * 7];
    (void)state;
    memset(big, '"', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    json(big, out, sizeof(out));
    /* LOG_VALUE_MAX input bytes, each escaped to two, plus the quotes. */
    assert_int_equal(strlen(out), LOG_VALUE_MAX * 2 + 2);
    assert_int_equal(out[strlen(out) - 1], '"');
}

static void test_buffer_never_overflows(void **state)
{
    char buf[8];
    struct log_buf b = {buf, 0, sizeof(buf), 0};
    (void)state;
    log_buf_raw(&b, "1234", 4);
    log_buf_raw(&b, "5678", 4); /* would need 9 bytes with the NUL */
    assert_true(b.full);
    assert_int_equal(b.len, 4);
    assert_string_equal(buf, "1234");
}

static void test_time_rfc3339_ms(void **state)
{
    char buf[64];
    struct log_buf b = {buf, 0, sizeof(buf), 0};
    (void)state;
    log_buf_time(&b, 1795440037123ull); /* 2026-11-23T13:20:37.123Z */
    assert_string_equal(buf, "2026-11-23T13:20:37.123Z");
}

static const struct alog_rec rec = {
    .time_ms = 1795440037005ull,
    .direction = "inbound",
    .source = "spiffe://td.consul/ns/default/dc/dc1/svc/web",
    .destination = "spiffe://td.consul/ns/default/dc/dc1/svc/db",
    .upstream = NULL,
    .endpoint = "127.0.0.1:8080",
    .local_addr = "127.0.0.1:21000",
    .remote_addr = "127.0.0.1:40000",
    .bytes_in = 12,
    .bytes_out = 34,
    .duration_ms = 5,
    .result = "denied",
    .reason = "intention \"web\" => db: deny",
    .conn = 7,
    .worker = 1,
};

static void test_line_json(void **state)
{
    char buf[ALOG_LINE_MAX];
    (void)state;
    size_t n = alog_format_line(buf, sizeof(buf), ALOG_JSON, &rec);
    assert_int_equal(n, strlen(buf));
    assert_string_equal(
        buf, "{\"time\":\"2026-11-23T13:20:37.005Z\",\"direction\":\"inbound\","
             "\"source\":\"spiffe://td.consul/ns/default/dc/dc1/svc/web\","
             "\"destination\":\"spiffe://td.consul/ns/default/dc/dc1/svc/db\",\"upstream\":null,"
             "\"endpoint\":\"127.0.0.1:8080\",\"local_addr\":\"127.0.0.1:21000\","
             "\"remote_addr\":\"127.0.0.1:40000\",\"bytes_in\":12,\"bytes_out\":34,"
             "\"duration_ms\":5,\"result\":\"denied\","
             "\"reason\":\"intention \\\"web\\\" => db: deny\",\"conn\":7,\"worker\":1}\n");
}

static void test_line_logfmt(void **state)
{
    char buf[ALOG_LINE_MAX];
    (void)state;
    alog_format_line(buf, sizeof(buf), ALOG_LOGFMT, &rec);
    assert_string_equal(buf, "time=2026-11-23T13:20:37.005Z direction=inbound "
                             "source=spiffe://td.consul/ns/default/dc/dc1/svc/web "
                             "destination=spiffe://td.consul/ns/default/dc/dc1/svc/db upstream= "
                             "endpoint=127.0.0.1:8080 local_addr=127.0.0.1:21000 "
                             "remote_addr=127.0.0.1:40000 bytes_in=12 bytes_out=34 duration_ms=5 "
                             "result=denied reason=\"intention \\\"web\\\" => db: deny\" conn=7 "
                             "worker=1\n");
}

/* The ALPN protocol of an inbound hop is written after the addresses when there is one. */
static void test_line_alpn(void **state)
{
    char buf[ALOG_LINE_MAX];
    struct alog_rec r = rec;
    (void)state;
    r.alpn = "h2";
    alog_format_line(buf, sizeof(buf), ALOG_JSON, &r);
    assert_non_null(
        strstr(buf, "\"remote_addr\":\"127.0.0.1:40000\",\"alpn\":\"h2\",\"bytes_in\""));
    alog_format_line(buf, sizeof(buf), ALOG_LOGFMT, &r);
    assert_non_null(strstr(buf, " alpn=h2 bytes_in=12"));
}

static void test_line_worst_case_fits(void **state)
{
    static char big[LOG_VALUE_MAX * 4], buf[ALOG_LINE_MAX];
    (void)state;
    memset(big, 0x01, sizeof(big) - 1); /* every byte escapes to six */
    big[sizeof(big) - 1] = '\0';
    struct alog_rec r = {.direction = big,
                         .source = big,
                         .destination = big,
                         .upstream = big,
                         .endpoint = big,
                         .local_addr = big,
                         .remote_addr = big,
                         .result = big,
                         .reason = big,
                         .protocol = big,
                         .method = big,
                         .authority = big,
                         .path = big,
                         .request_id = big,
                         .grpc_status = big,
                         .alpn = big,
                         .resolver = big};
    size_t n = alog_format_line(buf, sizeof(buf), ALOG_JSON, &r);
    assert_true(n < sizeof(buf));
    assert_int_equal(buf[n - 1], '\n');
    assert_int_equal(buf[n - 2], '}');
    assert_null(memchr(buf, '\n', n - 1));
}

/* Issue 9: a request record carries method, authority, path, status and request id; a
 * connection record (no method) is written as before. */
static void test_request_record(void **state)
{
    (void)state;
    static char buf[ALOG_LINE_MAX];
    struct alog_rec r = rec;
    r.protocol = "HTTP/1.1";
    r.method = "GET";
    r.authority = "db";
    r.path = "/a b\"c";
    r.status = 403;
    r.request_id = "id-1";
    r.stream = 2;
    alog_format_line(buf, sizeof(buf), ALOG_LOGFMT, &r);
    assert_non_null(strstr(buf, " protocol=HTTP/1.1 method=GET authority=db path=\"/a b\\\"c\" "
                                "status=403 request_id=id-1 stream=2 result="));
    assert_null(strstr(buf, "route="));
    /* Issue 10: a routed request names its route and its split's resolver. */
    r.route = 3;
    r.resolver = "resolver:db2.default.default.dc1";
    alog_format_line(buf, sizeof(buf), ALOG_LOGFMT, &r);
    assert_non_null(strstr(buf, " stream=2 route=3 resolver=resolver:db2.default.default.dc1 "));
    r.resolver = NULL;                    /* not routed: no route fields */
    assert_null(strstr(buf, "retries=")); /* none made: not written */
    r.retries = 2;
    alog_format_line(buf, sizeof(buf), ALOG_JSON, &r);
    assert_non_null(strstr(buf, ",\"stream\":2,\"retries\":2,\"result\""));
    alog_format_line(buf, sizeof(buf), ALOG_LOGFMT, &rec);
    assert_null(strstr(buf, "method="));
}

static void test_parse_format(void **state)
{
    enum alog_format f;
    (void)state;
    assert_int_equal(alog_parse_format("json", &f), 0);
    assert_int_equal(f, ALOG_JSON);
    assert_int_equal(alog_parse_format("logfmt", &f), 0);
    assert_int_equal(f, ALOG_LOGFMT);
    assert_int_equal(alog_parse_format("xml", &f), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_json_escaping),
        cmocka_unit_test(test_logfmt_quoting),
        cmocka_unit_test(test_values_are_bounded),
        cmocka_unit_test(test_buffer_never_overflows),
        cmocka_unit_test(test_time_rfc3339_ms),
        cmocka_unit_test(test_line_json),
        cmocka_unit_test(test_line_alpn),
        cmocka_unit_test(test_line_logfmt),
        cmocka_unit_test(test_line_worst_case_fits),
        cmocka_unit_test(test_parse_format),
        cmocka_unit_test(test_request_record),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
