/*
 * Unit tests for hdrmatch: one header condition compiled from its decoded form and evaluated
 * with Envoy's HeaderMatcher rules: every kind, IgnoreCase, Invert, an absent header, joined
 * repeated fields, the authority and method pseudo-headers, ":path" with its query, and the
 * unknowns (a regex that does not compile, a pseudo-header not carried) an intention fails
 * closed on while a route sees them as absent.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "hdrmatch.h"

#define S(lit) ((struct http_slice){(lit), sizeof(lit) - 1})

static const struct http_header fields[] = {
    {.name = S("X-Role"), .value = S("Ops-Team")},
    {.name = S("x-list"), .value = S("a")},
    {.name = S("x-list"), .value = S("b")},
};

static struct hdr_req req(int pseudo_absent)
{
    return (struct hdr_req){
        .method = S("GET"),
        .authority = S("db.example"),
        .path = S("/p"),
        .query = S("q=1"),
        .headers = fields,
        .nheaders = 3,
        .pseudo_absent = pseudo_absent,
    };
}

static int eval(const char *name, enum dec_header_match m, const char *value, int invert,
                int ignore_case, int pseudo_absent)
{
    struct dec_perm_header d = {.name = (char *)name,
                                .match = m,
                                .value = (char *)value,
                                .invert = invert,
                                .ignore_case = ignore_case};
    struct hdr_cond h;
    char err[200];
    (void)hdr_cond_init(&h, &d, err, sizeof(err));
    struct hdr_req rq = req(pseudo_absent);
    int r = hdr_cond_eval(&h, &rq);
    hdr_cond_dispose(&h);
    return r;
}

static void test_kinds(void **state)
{
    (void)state;
    assert_int_equal(eval("x-role", DEC_HDR_PRESENT, "", 0, 0, 0), 1);
    assert_int_equal(eval("x-role", DEC_HDR_EXACT, "Ops-Team", 0, 0, 0), 1);
    assert_int_equal(eval("x-role", DEC_HDR_EXACT, "ops-team", 0, 0, 0), 0);
    assert_int_equal(eval("x-role", DEC_HDR_EXACT, "ops-team", 0, 1, 0), 1);
    assert_int_equal(eval("x-role", DEC_HDR_PREFIX, "Ops", 0, 0, 0), 1);
    assert_int_equal(eval("x-role", DEC_HDR_SUFFIX, "TEAM", 0, 1, 0), 1);
    assert_int_equal(eval("x-role", DEC_HDR_CONTAINS, "S-t", 0, 1, 0), 1);
    assert_int_equal(eval("x-role", DEC_HDR_CONTAINS, "s-t", 0, 0, 0), 0);
    assert_int_equal(eval("x-role", DEC_HDR_REGEX, "Ops-.*", 0, 0, 0), 1);
    assert_int_equal(eval("x-list", DEC_HDR_EXACT, "a,b", 0, 0, 0), 1);
}

static void test_invert_and_absent(void **state)
{
    (void)state;
    assert_int_equal(eval("x-role", DEC_HDR_EXACT, "Ops-Team", 1, 0, 0), 0);
    assert_int_equal(eval("x-role", DEC_HDR_EXACT, "other", 1, 0, 0), 1);
    /* Absent: only an inverted Present matches; Invert does not turn a miss of Exact. */
    assert_int_equal(eval("x-none", DEC_HDR_PRESENT, "", 1, 0, 0), 1);
    assert_int_equal(eval("x-none", DEC_HDR_PRESENT, "", 0, 0, 0), 0);
    assert_int_equal(eval("x-none", DEC_HDR_EXACT, "v", 1, 0, 0), 0);
}

static void test_pseudo_headers(void **state)
{
    (void)state;
    assert_int_equal(eval("Host", DEC_HDR_EXACT, "db.example", 0, 0, 0), 1);
    assert_int_equal(eval(":authority", DEC_HDR_SUFFIX, ".example", 0, 0, 0), 1);
    assert_int_equal(eval(":method", DEC_HDR_EXACT, "GET", 0, 0, 0), 1);
    assert_int_equal(eval(":path", DEC_HDR_EXACT, "/p?q=1", 0, 0, 1), 1);
    /* Not carried: unknown for an intention, absent for a route. */
    assert_int_equal(eval(":scheme", DEC_HDR_EXACT, "http", 0, 0, 0), -1);
    assert_int_equal(eval(":scheme", DEC_HDR_PRESENT, "", 1, 0, 1), 1);
    assert_int_equal(eval(":scheme", DEC_HDR_EXACT, "http", 0, 0, 1), 0);
}

static void test_bad_regex_is_unknown(void **state)
{
    (void)state;
    struct dec_perm_header d = {.name = "x-role", .match = DEC_HDR_REGEX, .value = "(a"};
    struct hdr_cond h;
    char err[200] = "";
    assert_int_equal(hdr_cond_init(&h, &d, err, sizeof(err)), -1);
    assert_true(err[0] != '\0');
    struct hdr_req rq = req(0);
    assert_int_equal(hdr_cond_eval(&h, &rq), -1);
    h.invert = 1; /* Invert never turns an unknown into a match */
    assert_int_equal(hdr_cond_eval(&h, &rq), -1);
    hdr_cond_dispose(&h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kinds),
        cmocka_unit_test(test_invert_and_absent),
        cmocka_unit_test(test_pseudo_headers),
        cmocka_unit_test(test_bad_regex_is_unknown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
