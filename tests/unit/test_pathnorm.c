/*
 * test_pathnorm: the request normalization of the mesh config entry, as a table of paths and
 * what each becomes under each setting. The Consul cases come from its Envoy integration
 * tests case-l7-intentions-request-normalization (MergeSlashes, UNESCAPE_AND_FORWARD,
 * REJECT_REQUEST for underscores) and its -disabled twin (InsecureDisablePathNormalization):
 * every trick there (//, %2F, %2f, %73, /./, /../, backslashes) must reach the intention
 * matcher as "/value/supersecret" when normalization is on, and unchanged when it is off.
 *
 * '?' and '#': the caller cuts the target at the first '?' before calling (so
 * "/value/supersecret?" arrives as "/value/supersecret"); a '#' never belongs in a request
 * target and is refused. An encoded '?' (%3F) stays encoded: it is part of the path, which the
 * application also sees encoded.
 *
 * Every path is normalized from an allocation of exactly its length (ASan sees over-reads),
 * and every output is normalized again to check that normalizing is idempotent.
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

#include "pathnorm.h"

static const struct mesh_http_cfg DEFAULTS = {0};
/* case-l7-intentions-request-normalization */
static const struct mesh_http_cfg CONSUL = {.merge_slashes = 1,
                                            .escaped_slash = PATHNORM_SLASH_UNESCAPE_FORWARD,
                                            .underscore = PATHNORM_UNDERSCORE_REJECT};
/* case-l7-intentions-request-normalization-disabled */
static const struct mesh_http_cfg DISABLED = {.disable_path_normalization = 1};
static const struct mesh_http_cfg MERGE = {.merge_slashes = 1};
static const struct mesh_http_cfg REJECT = {.escaped_slash = PATHNORM_SLASH_REJECT};
static const struct mesh_http_cfg FORWARD = {.escaped_slash = PATHNORM_SLASH_UNESCAPE_FORWARD};
static const struct mesh_http_cfg REDIRECT = {.escaped_slash = PATHNORM_SLASH_UNESCAPE_REDIRECT};
static const struct mesh_http_cfg DISABLED_FORWARD = {
    .disable_path_normalization = 1, .escaped_slash = PATHNORM_SLASH_UNESCAPE_FORWARD};
static const struct mesh_http_cfg DISABLED_MERGE = {.disable_path_normalization = 1,
                                                    .merge_slashes = 1};
static const struct mesh_http_cfg DISABLED_REJECT = {.disable_path_normalization = 1,
                                                     .escaped_slash = PATHNORM_SLASH_REJECT};

#define BAD NULL /* refused: -EBADMSG */

struct row {
    const struct mesh_http_cfg *cfg;
    const char *in;
    size_t in_len;    /* 0: strlen(in) */
    const char *want; /* BAD for -EBADMSG */
    int redirect;
};

static const struct row ROWS[] = {
    /* The Consul case: all of these are the denied path. */
    {&CONSUL, "/value/supersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value//supersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value///supersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value%2Fsupersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value%2fsupersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value%5Csupersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value%5csupersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value/%73upersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/%76%61%6C%75%65/%73%75%70%65%72%73%65%63%72%65%74", 0, "/value/supersecret", 0},
    {&CONSUL, "/value\\supersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value\\\\supersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value\\/supersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value/\\/supersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value/./supersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value/x/../supersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value/x/%2e%2E/supersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value/x/..%2Fsupersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value/x/..\\supersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/../value/supersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/../../value/./supersecret", 0, "/value/supersecret", 0},
    {&CONSUL, "/value/supersecret/.", 0, "/value/supersecret/", 0},
    /* ...and these are allowed ones, forwarded in their normalized form. */
    {&CONSUL, "/foo", 0, "/foo", 0},
    {&CONSUL, "/value/foo", 0, "/value/foo", 0},
    {&CONSUL, "/foo/supersecret", 0, "/foo/supersecret", 0},
    {&CONSUL, "/value//foo", 0, "/value/foo", 0},
    {&CONSUL, "/value%2Ffoo", 0, "/value/foo", 0},
    {&CONSUL, "/value/%66oo", 0, "/value/foo", 0},
    {&CONSUL, "/value\\foo", 0, "/value/foo", 0},
    {&CONSUL, "/value\\\\foo", 0, "/value/foo", 0},
    {&CONSUL, "/value\\/foo", 0, "/value/foo", 0},
    {&CONSUL, "/value/\\/foo", 0, "/value/foo", 0},
    /* '?' is the caller's to cut; encoded it is path, and stays encoded. */
    {&CONSUL, "/value/supersecret%3F", 0, "/value/supersecret%3F", 0},
    {&CONSUL, "/value/supersecret%3f", 0, "/value/supersecret%3F", 0},
    {&CONSUL, "/value/supersecret?", 0, "/value/supersecret%3F", 0},
    /* '#' is refused, encoded it is path. */
    {&CONSUL, "/value/supersecret#foo", 0, BAD, 0},
    {&DISABLED, "/value/supersecret#", 0, BAD, 0},
    {&CONSUL, "/value/supersecret%23foo", 0, "/value/supersecret%23foo", 0},

    /* The -disabled case: nothing changes. */
    {&DISABLED, "/value/supersecret", 0, "/value/supersecret", 0},
    {&DISABLED, "/value//supersecret", 0, "/value//supersecret", 0},
    {&DISABLED, "/value///supersecret", 0, "/value///supersecret", 0},
    {&DISABLED, "/value%2Fsupersecret", 0, "/value%2Fsupersecret", 0},
    {&DISABLED, "/value/%73upersecret", 0, "/value/%73upersecret", 0},
    {&DISABLED, "/value\\supersecret", 0, "/value\\supersecret", 0},
    {&DISABLED, "/value\\\\supersecret", 0, "/value\\\\supersecret", 0},
    {&DISABLED, "/value\\/supersecret", 0, "/value\\/supersecret", 0},
    {&DISABLED, "/value/\\/supersecret", 0, "/value/\\/supersecret", 0},
    {&DISABLED, "/a/../b/./c", 0, "/a/../b/./c", 0},
    {&DISABLED, "/%zz%", 0, "/%zz%", 0},
    /* ...except what the other settings still do without it (as in Envoy). */
    {&DISABLED_FORWARD, "/a%2Fb%5cc", 0, "/a/b\\c", 0},
    {&DISABLED_MERGE, "/a//b///c", 0, "/a/b/c", 0},
    {&DISABLED_REJECT, "/a%2fb", 0, BAD, 0},

    /* Consul's defaults: normalized, slashes neither merged nor unescaped. */
    {&DEFAULTS, "/value//supersecret", 0, "/value//supersecret", 0},
    {&DEFAULTS, "/value%2Fsupersecret", 0, "/value%2Fsupersecret", 0},
    {&DEFAULTS, "/value%2fsupersecret", 0, "/value%2Fsupersecret", 0},
    {&DEFAULTS, "/value%5csupersecret", 0, "/value%5Csupersecret", 0},
    {&DEFAULTS, "/value/%73upersecret", 0, "/value/supersecret", 0},
    {&DEFAULTS, "/value\\supersecret", 0, "/value/supersecret", 0},
    {&DEFAULTS, "/value//../supersecret", 0, "/value/supersecret", 0},
    {&DEFAULTS, "/a/b/../c", 0, "/a/c", 0},
    {&DEFAULTS, "/a/b/..", 0, "/a/", 0},
    {&DEFAULTS, "/a/.", 0, "/a/", 0},
    {&DEFAULTS, "/a/%2e%2e", 0, "/", 0},
    {&DEFAULTS, "/%2e/a", 0, "/a", 0},
    {&DEFAULTS, "/..", 0, "/", 0},
    {&DEFAULTS, "/../..", 0, "/", 0},
    {&DEFAULTS, "/..%2Fa", 0, "/..%2Fa", 0}, /* kept escaped, %2F is no separator */
    {&DEFAULTS, "/a/...", 0, "/a/...", 0},
    {&DEFAULTS, "/a/..b/.c/d.", 0, "/a/..b/.c/d.", 0},
    {&DEFAULTS, "/a/b%2e/c", 0, "/a/b./c", 0},
    {&DEFAULTS, "", 0, "/", 0},
    {&DEFAULTS, "a/b", 0, "/a/b", 0},
    {&DEFAULTS, "\\a", 0, "/a", 0},
    {&DEFAULTS, "/%41%7e%5F%2D%30", 0, "/A~_-0", 0},
    {&DEFAULTS, "/%3a%40%2b%20", 0, "/%3A%40%2B%20", 0},
    {&DEFAULTS, "/%252F", 0, "/%252F", 0},
    {&DEFAULTS, "/a b\"<>^`{|}", 0, "/a%20b%22%3C%3E%5E%60%7B%7C%7D", 0},
    {&DEFAULTS, "/\xc3\xa9\x7f\x01", 0, "/%C3%A9%7F%01", 0},
    {&DEFAULTS, "/!$&'()*+,;=:@[]", 0, "/!$&'()*+,;=:@[]", 0},
    /* Refused: no percent-encoding, or a NUL in any form. */
    {&DEFAULTS, "/%", 0, BAD, 0},
    {&DEFAULTS, "/a%4", 0, BAD, 0},
    {&DEFAULTS, "/a%zzb", 0, BAD, 0},
    {&DEFAULTS, "/a%%41", 0, BAD, 0},
    {&DEFAULTS, "/a%00b", 0, BAD, 0},
    {&DEFAULTS, "/a\0b", 4, BAD, 0},
    {&DISABLED, "/a\0b", 4, BAD, 0},

    /* MergeSlashes alone. */
    {&MERGE, "//", 0, "/", 0},
    {&MERGE, "///a//b//", 0, "/a/b/", 0},
    {&MERGE, "/a/%2F/b", 0, "/a/%2F/b", 0},

    /* PathWithEscapedSlashesAction. */
    {&REJECT, "/a%2Fb", 0, BAD, 0},
    {&REJECT, "/a%2fb", 0, BAD, 0},
    {&REJECT, "/a%5Cb", 0, BAD, 0},
    {&REJECT, "/a%5cb", 0, BAD, 0},
    {&REJECT, "/a%252Fb", 0, "/a%252Fb", 0},
    {&REJECT, "/a/b", 0, "/a/b", 0},
    {&FORWARD, "/a%2Fb%5Cc", 0, "/a/b/c", 0},
    {&FORWARD, "/a/b%2F..%2Fc", 0, "/a/c", 0},
    {&FORWARD, "/a%%2F", 0, BAD, 0}, /* "%/" after unescaping: not an encoding */
    {&REDIRECT, "/a%2Fb", 0, "/a/b", 1},
    {&REDIRECT, "/a%5cb", 0, "/a/b", 1},
    {&REDIRECT, "/a/../b", 0, "/b", 0},
    {&REDIRECT, "/a/%62", 0, "/a/b", 0},
};

/* pathnorm_path on an exact-size copy of <in>. */
static ssize_t norm(const struct mesh_http_cfg *cfg, const char *in, size_t n, char *out,
                    size_t cap, int *redirect)
{
    char *copy = malloc(n != 0 ? n : 1);
    assert_non_null(copy);
    memcpy(copy, in, n);
    ssize_t rc = pathnorm_path(cfg, copy, n, out, cap, redirect);
    free(copy);
    return rc;
}

static void test_table(void **state)
{
    (void)state;
    char out[512], again[512];
    for (size_t i = 0; i < sizeof(ROWS) / sizeof(ROWS[0]); i++) {
        const struct row *r = &ROWS[i];
        size_t n = r->in_len ? r->in_len : strlen(r->in);
        int redirect = -1;
        ssize_t rc = norm(r->cfg, r->in, n, out, sizeof(out), &redirect);
        if (r->want == BAD) {
            if (rc != -EBADMSG)
                fail_msg("row %zu \"%s\": want refused, got %zd \"%.*s\"", i, r->in, rc,
                         rc > 0 ? (int)rc : 0, out);
            continue;
        }
        if (rc < 0 || (size_t)rc != strlen(r->want) || memcmp(out, r->want, (size_t)rc) != 0)
            fail_msg("row %zu \"%s\": want \"%s\", got %zd \"%.*s\"", i, r->in, r->want, rc,
                     rc > 0 ? (int)rc : 0, out);
        if (redirect != r->redirect)
            fail_msg("row %zu \"%s\": redirect %d, want %d", i, r->in, redirect, r->redirect);
        assert_true((size_t)rc <= PATHNORM_OUT_MAX(n));
        /* Idempotent: the output normalizes to itself, with nothing left to redirect for. */
        int redirect2 = -1;
        ssize_t rc2 = norm(r->cfg, out, (size_t)rc, again, sizeof(again), &redirect2);
        if (rc2 != rc || memcmp(again, out, (size_t)rc) != 0 || redirect2 != 0)
            fail_msg("row %zu \"%s\": \"%.*s\" normalizes again to %zd \"%.*s\"", i, r->in, (int)rc,
                     out, rc2, rc2 > 0 ? (int)rc2 : 0, again);
    }
}

static void test_output_bound(void **state)
{
    (void)state;
    char out[16];
    int redirect;
    /* Every byte escaped, and a leading slash added: exactly the bound. */
    assert_int_equal(norm(&DEFAULTS, "\x01\x02", 2, out, sizeof(out), &redirect),
                     PATHNORM_OUT_MAX(2));
    assert_memory_equal(out, "/%01%02", 7);
    /* One byte short of the output, at every step: -ENOSPC, never a cut path. */
    for (size_t cap = 0; cap < 7; cap++)
        assert_int_equal(norm(&DEFAULTS, "\x01\x02", 2, out, cap, &redirect), -ENOSPC);
    assert_int_equal(norm(&DISABLED, "/abc", 4, out, 3, &redirect), -ENOSPC);
    assert_int_equal(norm(&DISABLED, "/abc", 4, out, 4, &redirect), 4);
}

static struct http_slice name(const char *s)
{
    return (struct http_slice){s, strlen(s)};
}

static void test_headers_with_underscores(void **state)
{
    (void)state;
    struct mesh_http_cfg allow = {0}, reject = {.underscore = PATHNORM_UNDERSCORE_REJECT},
                         drop = {.underscore = PATHNORM_UNDERSCORE_DROP};
    /* case-l7-intentions-request-normalization: x_poison and x_check are refused (400). */
    assert_int_equal(pathnorm_header(&reject, name("x_poison")), -EBADMSG);
    assert_int_equal(pathnorm_header(&reject, name("x_check")), -EBADMSG);
    assert_int_equal(pathnorm_header(&reject, name("x-check")), 0);
    assert_int_equal(pathnorm_header(&reject, name("_")), -EBADMSG);
    /* ...the -disabled twin forwards them. */
    assert_int_equal(pathnorm_header(&allow, name("x_poison")), 0);
    assert_int_equal(pathnorm_header(&drop, name("x_poison")), 1);
    assert_int_equal(pathnorm_header(&drop, name("host")), 0);
    /* An absent name (a NULL slice) is no underscore; a NULL empty path is the root. */
    assert_int_equal(pathnorm_header(&reject, (struct http_slice){NULL, 0}), 0);
    char out[4];
    int redirect;
    assert_int_equal(pathnorm_path(&reject, NULL, 0, out, sizeof(out), &redirect), 1);
    assert_int_equal(out[0], '/');
    /* The name is a slice: an '_' just past its end is not part of it. */
    assert_int_equal(pathnorm_header(&reject, (struct http_slice){"x-a_b", 3}), 0);
}

static void test_names(void **state)
{
    (void)state;
    enum pathnorm_escaped_slash s = PATHNORM_SLASH_REJECT;
    enum pathnorm_underscore u = PATHNORM_UNDERSCORE_DROP;
    assert_int_equal(pathnorm_escaped_slash_parse("", &s), 0);
    assert_int_equal(s, PATHNORM_SLASH_KEEP);
    assert_int_equal(pathnorm_escaped_slash_parse("IMPLEMENTATION_SPECIFIC_DEFAULT", &s), 0);
    assert_int_equal(s, PATHNORM_SLASH_KEEP);
    static const char *const slash[] = {"KEEP_UNCHANGED", "REJECT_REQUEST", "UNESCAPE_AND_FORWARD",
                                        "UNESCAPE_AND_REDIRECT"};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pathnorm_escaped_slash_parse(slash[i], &s), 0);
        assert_int_equal(s, i);
        assert_string_equal(pathnorm_escaped_slash_name(s), slash[i]);
    }
    /* Consul validates the exact spelling; so do we. */
    assert_int_equal(pathnorm_escaped_slash_parse("keep_unchanged", &s), -EINVAL);
    assert_int_equal(pathnorm_escaped_slash_parse("UNESCAPE", &s), -EINVAL);
    assert_int_equal(pathnorm_underscore_parse("", &u), 0);
    assert_int_equal(u, PATHNORM_UNDERSCORE_ALLOW);
    static const char *const under[] = {"ALLOW", "REJECT_REQUEST", "DROP_HEADER"};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(pathnorm_underscore_parse(under[i], &u), 0);
        assert_int_equal(u, i);
        assert_string_equal(pathnorm_underscore_name(u), under[i]);
    }
    assert_int_equal(pathnorm_underscore_parse("DROP", &u), -EINVAL);
    assert_int_equal(pathnorm_underscore_parse("IMPLEMENTATION_SPECIFIC_DEFAULT", &u), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_output_bound),
        cmocka_unit_test(test_headers_with_underscores),
        cmocka_unit_test(test_names),
    };
    return cmocka_run_group_tests_name("pathnorm", tests, NULL, NULL);
}
