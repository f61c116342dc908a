/*
 * Unit tests for rx: full-string RE2-style matching on PCRE2, the RE2 subset enforced at
 * compile time, and the match limit that keeps a catastrophic pattern from stalling a worker.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "rx.h"
#include "util.h"

static struct rx *compile_ok(const char *pattern)
{
    struct rx *rx = NULL;
    char err[200];
    int rc = rx_compile(pattern, strlen(pattern), &rx, err, sizeof(err));
    if (rc != 0)
        fail_msg("pattern \"%s\" refused: %s", pattern, err);
    assert_non_null(rx);
    return rx;
}

static int matches(const char *pattern, const char *subject)
{
    struct rx *rx = compile_ok(pattern);
    int rc = rx_match(rx, subject, strlen(subject));
    rx_free(rx);
    return rc;
}

static void test_full_string(void **state)
{
    (void)state;
    /* RE2 through Envoy's safe_regex is a full match: no implicit .* on either side. */
    assert_int_equal(matches("/adm.*", "/admin"), 1);
    assert_int_equal(matches("/adm", "/admin"), 0);
    assert_int_equal(matches("dmin", "/admin"), 0);
    assert_int_equal(matches("/admin/[0-9]+", "/admin/12"), 1);
    assert_int_equal(matches("/admin/[0-9]+", "/admin/12x"), 0);
    /* Alternation is anchored as a whole, not per branch. */
    assert_int_equal(matches("a|ab", "ab"), 1);
    assert_int_equal(matches("ab|a", "ab"), 1);
    assert_int_equal(matches("a|b", "ab"), 0);
    /* $ only at the very end: a trailing newline is not skipped. */
    assert_int_equal(matches("abc$", "abc\n"), 0);
    assert_int_equal(matches("abc", "abc\n"), 0);
    /* The empty pattern matches the empty subject only. */
    assert_int_equal(matches("", ""), 1);
    assert_int_equal(matches("", "x"), 0);
    /* A NULL subject of length 0 is the empty string. */
    struct rx *rx = compile_ok("a*");
    assert_int_equal(rx_match(rx, NULL, 0), 1);
    rx_free(rx);
}

static void test_re2_syntax_accepted(void **state)
{
    (void)state;
    static const char *const ok[] = {
        "(?i)get",
        "(?i:a)b",
        "(?P<n>a)b",
        "(?<n>a)b",
        "a{2,3}",
        "a{1000}",
        "a*?b",
        "a+?",
        "[[:alpha:]]+",
        "[]a]",
        "[^]a]",
        "\\Q(?=\\E",
        "[[:^alpha:][:digit:]]",
        "[a[:]",
        "\\x{41}+",
        "\\p{Greek}",
        "\\d\\w\\s\\b",
        "\\pL",
        "(?s).",
        "(?-i:x)",
        "(?U)a*",
        "a{2}?",
        "[\\d-]",
        "x{",
        "\\{1,2}+",
        "(?m)^a$",
        "\\0",
        "[(?=]",
        "\\z",
        "\\Aabc",
        "a|",
        "(a)(b)",
    };
    for (size_t i = 0; i < ARRAY_SIZE(ok); i++) {
        struct rx *rx = NULL;
        char err[200] = "";
        int rc = rx_compile(ok[i], strlen(ok[i]), &rx, err, sizeof(err));
        if (rc != 0)
            fail_msg("RE2 accepts \"%s\" but rx refused it: %s", ok[i], err);
        rx_free(rx);
    }
    assert_int_equal(matches("(?i)get", "GeT"), 1);
    assert_int_equal(matches("\\Q(?=\\E", "(?="), 1);
    assert_int_equal(matches("\\x{41}+", "AAA"), 1);
    assert_int_equal(matches("[]a]+", "]a]"), 1);
    assert_int_equal(matches("(a)(b)", "ab"), 1);
}

static void test_non_re2_refused(void **state)
{
    (void)state;
    static const struct {
        const char *pattern;
        const char *why;
    } bad[] = {
        {"(a)\\1", "backreferences"},
        {"(?P<n>a)(?P=n)", "backreferences"},
        {"(a)\\g1", "backreferences"},
        {"(?<n>a)\\k<n>", "backreferences"},
        {"(?=a)a", "lookahead"},
        {"a(?!b)", "lookahead"},
        {"(?<=a)b", "lookbehind"},
        {"(?<!a)b", "lookbehind"},
        {"(?>a+)b", "atomic"},
        {"a++", "possessive"},
        {"a*+", "possessive"},
        {"a?+", "possessive"},
        {"a{2}+", "possessive"},
        {"\\C", "\\C"},
        {"(a|(?R))", "recursion"},
        {"(a)(?1)", "recursion"},
        {"(a)(?-1)", "recursion"},
        {"(?<n>a)(?&n)", "recursion"},
        {"(?P>n)", "recursion"},
        {"(?(1)a|b)", "conditional"},
        {"(?C1)a", "callouts"},
        {"(?#note)a", "comments"},
        {"(*SKIP)a", "verbs"},
        {"(*UTF)a", "verbs"},
        {"(?|a)", "branch reset"},
        {"(?x) a", "flags"},
        {"(?J)a", "flags"},
        {"a\\Kb", "\\K"},
        {"\\Ga", "\\G"},
        {"a\\Z", "\\Z"},
        {"\\h", "PCRE-only"},
        {"a{1001}", "above 1000"},
        {"a{2,5000}", "above 1000"},
        {"(?'n'a)", "(?P<name>"},
        /* Not POSIX classes for PCRE2 (a ']' comes first), so the lookahead is real. */
        {"[[:x](?=a):]]", "lookahead"},
        {"[[:x[:](?=a):]]", "lookahead"},
        /* PCRE2's non-atomic lookaround, and group names that are not names. */
        {"(?<*a)b", "lookbehind"},
        {"(?*a)b", "flags"},
        {"(?P<1>a)", "group name"},
        {"(?<1>a)", "group name"},
        {"(?^)a", "flags"},
        {"[\\1]", "backreferences"},
        {"(", "missing closing parenthesis"},
        {"a)", "unmatched closing parenthesis"},
        {"[a", "missing terminating ]"},
        {"*a", "quantifier does not follow"},
        {"\xff", "UTF-8"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        struct rx *rx = (struct rx *)&rx;
        char err[200] = "";
        int rc = rx_compile(bad[i].pattern, strlen(bad[i].pattern), &rx, err, sizeof(err));
        if (rc != -EINVAL)
            fail_msg("\"%s\" compiled (rc %d); RE2 refuses it", bad[i].pattern, rc);
        assert_null(rx);
        if (strstr(err, bad[i].why) == NULL)
            fail_msg("\"%s\": message \"%s\" does not say \"%s\"", bad[i].pattern, err, bad[i].why);
        assert_non_null(strstr(err, "offset"));
    }
    /* A NUL byte and an over-long pattern are refused without reaching PCRE2. */
    struct rx *rx;
    char err[200];
    assert_int_equal(rx_compile("a\0b", 3, &rx, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "NUL"));
    char *big = xmalloc(RX_PATTERN_MAX + 2);
    memset(big, 'a', RX_PATTERN_MAX + 1);
    big[RX_PATTERN_MAX + 1] = '\0';
    assert_int_equal(rx_compile(big, RX_PATTERN_MAX + 1, &rx, err, sizeof(err)), -EINVAL);
    assert_int_equal(rx_compile(big, RX_PATTERN_MAX, &rx, err, sizeof(err)), 0);
    rx_free(rx);
    free(big);
    assert_int_equal(rx_compile(NULL, 0, &rx, NULL, 0), -EINVAL);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static void test_catastrophic_pattern_is_bounded(void **state)
{
    (void)state;
    /* (a+)+$ against a run of a's ending in a b backtracks exponentially without a limit. */
    size_t n = 50000;
    char *s = xmalloc(n + 1);
    memset(s, 'a', n - 1);
    s[n - 1] = 'b';
    s[n] = '\0';
    static const char *const evil[] = {"(a+)+$", "(a|aa)+$", "(a*)*b$x", "(.*a){20}"};
    for (size_t i = 0; i < ARRAY_SIZE(evil); i++) {
        struct rx *rx = compile_ok(evil[i]);
        for (size_t len = 32; len <= n; len *= 10) {
            double t0 = now_ms();
            int rc = rx_match(rx, s + n - len, len);
            double took = now_ms() - t0;
            /* Never "match": either a sure "no" or the limit's "unknown". */
            if (rc != 0 && rc != -ERANGE)
                fail_msg("%s on %zu bytes: rc %d", evil[i], len, rc);
            if (took > 200.0)
                fail_msg("%s on %zu bytes took %.1f ms", evil[i], len, took);
        }
        rx_free(rx);
    }
    /* The short case really hits the limit rather than finishing. */
    struct rx *rx = compile_ok("(a+)+$");
    assert_int_equal(rx_match(rx, s + n - 32, 32), -ERANGE);
    rx_free(rx);
    /* Ordinary patterns on long subjects still answer. */
    memset(s, 'x', n);
    s[n - 3] = 'f';
    s[n - 2] = 'o';
    s[n - 1] = 'o';
    rx = compile_ok(".*foo");
    assert_int_equal(rx_match(rx, s, n), 1);
    rx_free(rx);
    rx = compile_ok("[a-z]+");
    assert_int_equal(rx_match(rx, s, n), 1);
    rx_free(rx);
    free(s);
}

static void test_invalid_utf8_subject(void **state)
{
    (void)state;
    /* Invalid UTF-8 in a subject never matches a character, and is not an error. */
    assert_int_equal(matches("a.b", "a\xff"
                                    "b"),
                     0);
    assert_int_equal(matches(".*", "\xff"), 0);
    assert_int_equal(matches("a.*", "abc"), 1);
    /* A multi-byte character is one '.'. */
    assert_int_equal(matches("a.b", "a\xc3\xa9"
                                    "b"),
                     1);
}

static void test_shortest_match(void **state)
{
    (void)state;
    /* A subject shorter than any match is refused before PCRE2 is asked; the bound is in
     * characters, and a multi-byte character is several bytes. */
    assert_int_equal(matches("^/admin(/.*)?$", "/"), 0);
    assert_int_equal(matches("^/admin(/.*)?$", "/admi"), 0);
    assert_int_equal(matches("^/admin(/.*)?$", "/admin"), 1);
    assert_int_equal(matches("^/admin(/.*)?$", "/admin/"), 1);
    assert_int_equal(matches("a{3}", "aa"), 0);
    assert_int_equal(matches("a{3}", "aaa"), 1);
    /* 3 bytes, 2 characters; 4 bytes, 3 characters; 4 bytes, 2 characters. */
    assert_int_equal(matches(".{3}", "a\xc3\xa9"), 0);
    assert_int_equal(matches(".{3}", "a\xc3\xa9"
                                     "b"),
                     1);
    assert_int_equal(matches("\xc3\xa9{2}", "\xc3\xa9\xc3\xa9"), 1);
    assert_int_equal(matches("x*", ""), 1);
    struct rx *rx = compile_ok("abc");
    assert_int_equal(rx_match(rx, "abcd", 2), 0);
    assert_int_equal(rx_match(rx, NULL, 0), 0);
    rx_free(rx);
}

struct shared {
    struct rx *rx;
    int bad;
};

static void *hammer(void *arg)
{
    struct shared *sh = arg;
    for (int i = 0; i < 2000; i++) {
        if (rx_match(sh->rx, "/api/v1/users/42", 16) != 1 || rx_match(sh->rx, "/api/x", 6) != 0)
            sh->bad = 1;
    }
    return NULL;
}

static void test_threads_share_one_rx(void **state)
{
    (void)state;
    struct shared sh = {compile_ok("/api/v[0-9]+/users/[0-9]+"), 0};
    pthread_t th[4];
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&th[i], NULL, hammer, &sh), 0);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    assert_int_equal(sh.bad, 0);
    rx_free(sh.rx);
    rx_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_string),
        cmocka_unit_test(test_re2_syntax_accepted),
        cmocka_unit_test(test_non_re2_refused),
        cmocka_unit_test(test_catastrophic_pattern_is_bounded),
        cmocka_unit_test(test_invalid_utf8_subject),
        cmocka_unit_test(test_shortest_match),
        cmocka_unit_test(test_threads_share_one_rx),
    };
    return cmocka_run_group_tests_name("rx", tests, NULL, NULL);
}
