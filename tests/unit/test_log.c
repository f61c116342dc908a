/*
 * Unit tests for log: a text line stays one line whatever its arguments hold (a certificate URI
 * with a newline once wrote a second, forged line), LOG_ESC quotes peer values, the JSON
 * "conn"/"worker" fields cannot be named from inside a quoted value, and the per-key rate
 * limit writes one line per window and counts the rest.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

/* stderr goes into a pipe between capture_begin and capture_end, which returns it. */
static char captured[1 << 16];

static void capture_begin(int *saved, int *pipefd)
{
    assert_int_equal(pipe(pipefd), 0);
    *saved = dup(STDERR_FILENO);
    assert_true(*saved >= 0);
    assert_true(dup2(pipefd[1], STDERR_FILENO) >= 0);
}

static const char *capture_end(int saved, const int *pipefd)
{
    assert_true(dup2(saved, STDERR_FILENO) >= 0);
    close(saved);
    close(pipefd[1]);
    ssize_t n = read(pipefd[0], captured, sizeof(captured) - 1);
    close(pipefd[0]);
    captured[n > 0 ? n : 0] = '\0';
    return captured;
}

static int count_char(const char *s, char c)
{
    int n = 0;
    for (; *s != '\0'; s++)
        n += *s == c;
    return n;
}

static void test_text_line_cannot_be_split(void **state)
{
    (void)state;
    int saved, fd[2];
    log_json = 0;
    capture_begin(&saved, fd);
    LOG_WARN("conn=1 in src=%s reason=\"%s\"", "spiffe://td/x\n2026-01-01 [WARN] FORGED",
             "bell\a esc\x1b[31m utf8 \xc3\xa9");
    const char *out = capture_end(saved, fd);
    assert_int_equal(count_char(out, '\n'), 1);
    assert_non_null(strstr(out, "spiffe://td/x\\x0a2026-01-01 [WARN] FORGED"));
    assert_non_null(strstr(out, "bell\\x07 esc\\x1b[31m utf8 \\xc3\\xa9"));
    assert_null(strchr(out, '\x1b'));
}

static void test_log_esc_quotes_peer_values(void **state)
{
    char buf[LOG_ESC_BYTES];
    (void)state;
    assert_string_equal(log_esc(buf, sizeof(buf), "spiffe://td/ns/default/dc/dc1/svc/web"),
                        "spiffe://td/ns/default/dc/dc1/svc/web");
    assert_string_equal(log_esc(buf, sizeof(buf), "a\nb"), "\"a\\nb\"");
    assert_string_equal(log_esc(buf, sizeof(buf), "x result=ok"), "\"x result=ok\"");
    assert_string_equal(log_esc(buf, sizeof(buf), "q\"\\"), "\"q\\\"\\\\\"");
    assert_string_equal(log_esc(buf, sizeof(buf), "\x01\xff"), "\"\\x01\\xff\"");
    assert_string_equal(log_esc(buf, sizeof(buf), ""), "\"\"");
    assert_string_equal(log_esc(buf, sizeof(buf), NULL), "-");

    /* Every byte escaped at its widest still fits, cut at LOG_VALUE_MAX input bytes. */
    char wide[LOG_VALUE_MAX * 2];
    memset(wide, 0x01, sizeof(wide) - 1);
    wide[sizeof(wide) - 1] = '\0';
    const char *e = log_esc(buf, sizeof(buf), wide);
    assert_int_equal(strlen(e), LOG_VALUE_MAX * 4 + 2);
    assert_int_equal(e[strlen(e) - 1], '"');

    /* A short buffer keeps a prefix and stays terminated. */
    char small[8];
    assert_int_equal(strlen(log_esc(small, sizeof(small), "a b c d e f g h")), 7);

    /* The macro form, as the LOG_* calls use it. */
    assert_string_equal(LOG_ESC("a b"), "\"a b\"");
}

static void test_json_fields_not_taken_from_quoted_values(void **state)
{
    (void)state;
    int saved, fd[2];
    log_json = 1;
    capture_begin(&saved, fd);
    LOG_WARN("conn=7 in src=%s dst=db", LOG_ESC("x worker 9 conn=3"));
    const char *out = capture_end(saved, fd);
    log_json = 0;
    assert_int_equal(count_char(out, '\n'), 1);
    assert_non_null(strstr(out, "\"conn\":7"));
    assert_null(strstr(out, "\"worker\":9"));
}

struct reports {
    int n;
    char key[8][LOG_LIMIT_KEY_MAX];
    uint64_t suppressed[8], open_ms[8];
};

static void on_report(void *arg, const char *key, uint64_t suppressed, uint64_t open_ms)
{
    struct reports *r = arg;
    assert_true(r->n < 8);
    snprintf(r->key[r->n], sizeof(r->key[r->n]), "%s", key);
    r->suppressed[r->n] = suppressed;
    r->open_ms[r->n] = open_ms;
    r->n++;
}

static void test_limit_one_line_per_window_per_key(void **state)
{
    (void)state;
    struct log_limit l;
    struct reports r = {0};
    uint64_t before = 99;
    log_limit_init(&l, 1000);

    /* 200 lines from one source in half a second: the first is written, 199 counted. */
    int written = 0;
    for (int i = 0; i < 200; i++)
        written += log_limit_pass(&l, "10.0.0.1", 1000 + (uint64_t)i * 2, &before);
    assert_int_equal(written, 1);
    assert_int_equal(before, 0);
    /* Another source still gets its first line at once. */
    assert_int_equal(log_limit_pass(&l, "10.0.0.2", 1500, NULL), 1);

    /* Nothing is over yet: the next window ends 1000 ms after the first opened. */
    assert_int_equal(log_limit_flush(&l, 1600, on_report, &r), 400);
    assert_int_equal(r.n, 0);
    /* At 2000 the first window ends and reports its count; the second stays open. */
    assert_int_equal(log_limit_flush(&l, 2000, on_report, &r), 500);
    assert_int_equal(r.n, 1);
    assert_string_equal(r.key[0], "10.0.0.1");
    assert_int_equal(r.suppressed[0], 199);
    assert_int_equal(r.open_ms[0], 1000);
    /* The quiet second source is forgotten without a report. */
    assert_int_equal(log_limit_flush(&l, 2500, on_report, &r), 0);
    assert_int_equal(r.n, 1);

    /* A window that ended before any flush hands its count to the next written line. */
    assert_int_equal(log_limit_pass(&l, "10.0.0.1", 3000, NULL), 1);
    assert_int_equal(log_limit_pass(&l, "10.0.0.1", 3001, NULL), 0);
    assert_int_equal(log_limit_pass(&l, "10.0.0.1", 3002, NULL), 0);
    assert_int_equal(log_limit_pass(&l, "10.0.0.1", 4000, &before), 1);
    assert_int_equal(before, 2);
}

static void test_limit_overflow_shares_one_window(void **state)
{
    (void)state;
    struct log_limit l;
    struct reports r = {0};
    char key[32];
    log_limit_init(&l, 1000);
    for (int i = 0; i < LOG_LIMIT_KEYS; i++) {
        snprintf(key, sizeof(key), "10.1.0.%d", i);
        assert_int_equal(log_limit_pass(&l, key, 100, NULL), 1);
    }
    /* The table is full: new keys share the "other" window. */
    assert_int_equal(log_limit_pass(&l, "10.2.0.1", 200, NULL), 1);
    assert_int_equal(log_limit_pass(&l, "10.2.0.2", 300, NULL), 0);
    assert_int_equal(log_limit_pass(&l, "10.2.0.3", 400, NULL), 0);
    assert_int_equal(log_limit_flush(&l, 1100, on_report, &r), 100);
    assert_int_equal(r.n, 0);
    assert_int_equal(log_limit_flush(&l, 1200, on_report, &r), 0);
    assert_int_equal(r.n, 1);
    assert_string_equal(r.key[0], "other");
    assert_int_equal(r.suppressed[0], 2);
    /* Every slot was freed. */
    assert_int_equal(log_limit_pass(&l, "10.2.0.2", 1300, NULL), 1);
    assert_int_equal(l.n, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_line_cannot_be_split),
        cmocka_unit_test(test_log_esc_quotes_peer_values),
        cmocka_unit_test(test_json_fields_not_taken_from_quoted_values),
        cmocka_unit_test(test_limit_one_line_per_window_per_key),
        cmocka_unit_test(test_limit_overflow_shares_one_window),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
