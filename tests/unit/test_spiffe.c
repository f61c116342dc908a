/*
 * Unit tests for spiffe: parsing every kind of Consul identity, the ways a URI can be malformed,
 * and formatting of service identities and SNI names (consul-api.md 3.1, 3.2).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "spiffe.h"
#include "util.h"

#define TD "11111111-2222-3333-4444-555555555555.consul"

static int parse(const char *s, struct spiffe_id *id)
{
    return spiffe_parse(s, strlen(s), id);
}

static void expect_bad(const char *s)
{
    struct spiffe_id id;
    int rc = parse(s, &id);
    if (rc != ERR_BAD_SPIFFE)
        fail_msg("expected ERR_BAD_SPIFFE for \"%s\", got %d", s, rc);
}

static void expect_other(const char *s)
{
    struct spiffe_id id;
    int rc = parse(s, &id);
    if (rc != 0 || id.kind != SPIFFE_OTHER)
        fail_msg("expected SPIFFE_OTHER for \"%s\", got rc %d kind %d", s, rc, (int)id.kind);
    assert_string_equal(id.trust_domain, TD);
}

static void test_service_default_partition(void **state)
{
    (void)state;
    struct spiffe_id id;
    assert_int_equal(parse("spiffe://" TD "/ns/default/dc/dc1/svc/web", &id), 0);
    assert_int_equal(id.kind, SPIFFE_SERVICE);
    assert_string_equal(id.trust_domain, TD);
    assert_string_equal(id.partition, "default");
    assert_string_equal(id.ns, "default");
    assert_string_equal(id.dc, "dc1");
    assert_string_equal(id.service, "web");
}

static void test_service_with_partition(void **state)
{
    (void)state;
    struct spiffe_id id;
    assert_int_equal(parse("spiffe://" TD "/ap/team1/ns/billing/dc/east/svc/db", &id), 0);
    assert_int_equal(id.kind, SPIFFE_SERVICE);
    assert_string_equal(id.partition, "team1");
    assert_string_equal(id.ns, "billing");
    assert_string_equal(id.dc, "east");
    assert_string_equal(id.service, "db");

    /* An explicit default partition is the same as none. */
    assert_int_equal(parse("spiffe://" TD "/ap/default/ns/default/dc/dc1/svc/web", &id), 0);
    assert_int_equal(id.kind, SPIFFE_SERVICE);
    assert_string_equal(id.partition, "default");
}

static void test_not_nul_terminated(void **state)
{
    (void)state;
    /* Only <len> bytes count: the trailing "XYZ" is outside the URI. */
    const char *s = "spiffe://" TD "/ns/default/dc/dc1/svc/webXYZ";
    struct spiffe_id id;
    assert_int_equal(spiffe_parse(s, strlen(s) - 3, &id), 0);
    assert_int_equal(id.kind, SPIFFE_SERVICE);
    assert_string_equal(id.service, "web");
}

static void test_agent(void **state)
{
    (void)state;
    struct spiffe_id id;
    assert_int_equal(
        parse("spiffe://" TD "/agent/client/dc/dc1/id/adf4238a-882b-9ddc-4a9d-5b6758e4159e", &id),
        0);
    assert_int_equal(id.kind, SPIFFE_AGENT);
    assert_string_equal(id.dc, "dc1");
    assert_string_equal(id.partition, "default");
    assert_string_equal(id.service, "");

    assert_int_equal(parse("spiffe://" TD "/ap/part1/agent/client/dc/dc2/id/node-1", &id), 0);
    assert_int_equal(id.kind, SPIFFE_AGENT);
    assert_string_equal(id.partition, "part1");
    assert_string_equal(id.dc, "dc2");
}

static void test_server(void **state)
{
    (void)state;
    struct spiffe_id id;
    assert_int_equal(parse("spiffe://" TD "/agent/server/dc/dc1", &id), 0);
    assert_int_equal(id.kind, SPIFFE_SERVER);
    assert_string_equal(id.dc, "dc1");
    /* Servers have no partition prefix in Consul's format. */
    expect_other("spiffe://" TD "/ap/part1/agent/server/dc/dc1");
}

static void test_mesh_gateway(void **state)
{
    (void)state;
    struct spiffe_id id;
    assert_int_equal(parse("spiffe://" TD "/gateway/mesh/dc/dc1", &id), 0);
    assert_int_equal(id.kind, SPIFFE_MESH_GATEWAY);
    assert_string_equal(id.dc, "dc1");
    assert_string_equal(id.partition, "default");

    assert_int_equal(parse("spiffe://" TD "/ap/part1/gateway/mesh/dc/dc3", &id), 0);
    assert_int_equal(id.kind, SPIFFE_MESH_GATEWAY);
    assert_string_equal(id.partition, "part1");
    assert_string_equal(id.dc, "dc3");
}

static void test_signing(void **state)
{
    (void)state;
    struct spiffe_id id;
    assert_int_equal(parse("spiffe://" TD, &id), 0);
    assert_int_equal(id.kind, SPIFFE_SIGNING);
    assert_string_equal(id.trust_domain, TD);

    /* Go takes a path-less ID as signing only when the host is <cluster-id>.<domain>. */
    assert_int_equal(parse("spiffe://nodot", &id), 0);
    assert_int_equal(id.kind, SPIFFE_OTHER);
    assert_int_equal(parse("spiffe://.consul", &id), 0);
    assert_int_equal(id.kind, SPIFFE_OTHER);
}

static void test_scheme_is_case_insensitive(void **state)
{
    (void)state;
    /* Go's url.Parse lowercases the scheme before Consul compares it. */
    struct spiffe_id id;
    assert_int_equal(parse("SPIFFE://" TD "/ns/default/dc/dc1/svc/web", &id), 0);
    assert_int_equal(id.kind, SPIFFE_SERVICE);
}

static void test_percent_encoding(void **state)
{
    (void)state;
    struct spiffe_id id;
    assert_int_equal(parse("spiffe://" TD "/ns/de%66ault/dc/dc%31/svc/web%2Dapi", &id), 0);
    assert_int_equal(id.kind, SPIFFE_SERVICE);
    assert_string_equal(id.ns, "default");
    assert_string_equal(id.dc, "dc1");
    assert_string_equal(id.service, "web-api");

    /* Decoding happens after matching, as in Go: an encoded slash stays inside its segment. */
    assert_int_equal(parse("spiffe://" TD "/ns/default/dc/dc1/svc/a%2fb%20c", &id), 0);
    assert_int_equal(id.kind, SPIFFE_SERVICE);
    assert_string_equal(id.service, "a/b c");

    /* Keywords are matched raw, so an encoded keyword is no keyword. */
    expect_other("spiffe://" TD "/n%73/default/dc/dc1/svc/web");
    assert_int_equal(parse("spiffe://" TD "/ap/p%41rt/ns/default/dc/dc1/svc/web", &id), 0);
    assert_string_equal(id.partition, "pArt");

    expect_bad("spiffe://" TD "/ns/default/dc/dc1/svc/web%");
    expect_bad("spiffe://" TD "/ns/default/dc/dc1/svc/web%4");
    expect_bad("spiffe://" TD "/ns/default/dc/dc1/svc/web%zz");
    expect_bad("spiffe://" TD "/ns/default/dc/dc1/svc/w%g1b");
    /* A decoded NUL would cut the name short: refused. */
    expect_bad("spiffe://" TD "/ns/default/dc/dc1/svc/web%00admin");
    /* Bad escapes are refused even in segments no kind captures. */
    expect_bad("spiffe://" TD "/some/%zz/thing");
}

static void test_bad_schemes(void **state)
{
    (void)state;
    expect_bad("");
    expect_bad("spiffe");
    expect_bad("spiffe:");
    expect_bad("spiffe:/" TD "/ns/default/dc/dc1/svc/web");
    expect_bad("spiffe:" TD "/ns/default/dc/dc1/svc/web");
    expect_bad("http://" TD "/ns/default/dc/dc1/svc/web");
    expect_bad("https://" TD "/ns/default/dc/dc1/svc/web");
    expect_bad("spiffes://" TD "/ns/default/dc/dc1/svc/web");
    expect_bad(" spiffe://" TD "/ns/default/dc/dc1/svc/web");
    expect_bad("urn:spiffe://" TD "/ns/default/dc/dc1/svc/web");

    struct spiffe_id id;
    assert_int_equal(spiffe_parse(NULL, 0, &id), ERR_BAD_SPIFFE);
}

static void test_empty_or_odd_trust_domain(void **state)
{
    (void)state;
    expect_bad("spiffe://");
    expect_bad("spiffe:///ns/default/dc/dc1/svc/web");
    expect_bad("spiffe:///");
    /* No ports, user info or other URI decorations on the authority. */
    expect_bad("spiffe://" TD ":8443/ns/default/dc/dc1/svc/web");
    expect_bad("spiffe://user@" TD "/ns/default/dc/dc1/svc/web");
    expect_bad("spiffe://tr%75st.consul/ns/default/dc/dc1/svc/web");
    expect_bad("spiffe://bad domain/ns/default/dc/dc1/svc/web");
    expect_bad("spiffe://" TD "?x=1");
}

static void test_trailing_garbage(void **state)
{
    (void)state;
    /* Well-formed URIs of no known shape are SPIFFE_OTHER, never a service. */
    expect_other("spiffe://" TD "/");
    expect_other("spiffe://" TD "/ns/default/dc/dc1/svc/web/");
    expect_other("spiffe://" TD "/ns/default/dc/dc1/svc/web/extra");
    expect_other("spiffe://" TD "//ns/default/dc/dc1/svc/web");
    expect_other("spiffe://" TD "/ns/default//dc/dc1/svc/web");
    expect_other("spiffe://" TD "/ns/default/dc/dc1/svc");
    expect_other("spiffe://" TD "/ns/default/dc/dc1/service/web");
    expect_other("spiffe://" TD "/NS/default/DC/dc1/SVC/web");
    expect_other("spiffe://" TD "/ap/p1/ap/p2/ns/default/dc/dc1/svc/web");
    expect_other("spiffe://" TD "/agent/client/dc/dc1/id/x/y");
    expect_other("spiffe://" TD "/gateway/mesh/dc/dc1/extra");
    expect_other("spiffe://" TD "/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t");
    /* Old-style agent IDs are no longer a kind we know. */
    expect_other("spiffe://" TD "/agent/node1");

    /* Bytes that have no place in a URI make it malformed, wherever they are. */
    expect_bad("spiffe://" TD "/ns/default/dc/dc1/svc/web?x=1");
    expect_bad("spiffe://" TD "/ns/default/dc/dc1/svc/web#frag");
    expect_bad("spiffe://" TD "/ns/default/dc/dc1/svc/web ");
    expect_bad("spiffe://" TD "/ns/default/dc/dc1/svc/we\tb");
    expect_bad("spiffe://" TD "/ns/default/dc/dc1/svc/w\xc3\xa9");
    expect_bad("spiffe://" TD "/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/%zz");

    /* An embedded NUL inside the given length. */
    static const char nul[] = "spiffe://" TD "/ns/default/dc/dc1/svc/web\0admin";
    struct spiffe_id id;
    assert_int_equal(spiffe_parse(nul, sizeof(nul) - 1, &id), ERR_BAD_SPIFFE);
}

static void test_too_long_segments(void **state)
{
    (void)state;
    char name[400], uri[1200];
    struct spiffe_id id;

    /* SPIFFE_NAME_MAX - 1 bytes fit exactly. */
    memset(name, 'a', SPIFFE_NAME_MAX - 1);
    name[SPIFFE_NAME_MAX - 1] = '\0';
    snprintf(uri, sizeof(uri), "spiffe://" TD "/ns/default/dc/dc1/svc/%s", name);
    assert_int_equal(parse(uri, &id), 0);
    assert_int_equal(strlen(id.service), SPIFFE_NAME_MAX - 1);

    /* One more is rejected, not truncated, in every field that is kept. */
    memset(name, 'a', SPIFFE_NAME_MAX);
    name[SPIFFE_NAME_MAX] = '\0';
    snprintf(uri, sizeof(uri), "spiffe://" TD "/ns/default/dc/dc1/svc/%s", name);
    expect_bad(uri);
    snprintf(uri, sizeof(uri), "spiffe://" TD "/ns/%s/dc/dc1/svc/web", name);
    expect_bad(uri);
    snprintf(uri, sizeof(uri), "spiffe://" TD "/ns/default/dc/%s/svc/web", name);
    expect_bad(uri);
    snprintf(uri, sizeof(uri), "spiffe://" TD "/ap/%s/ns/default/dc/dc1/svc/web", name);
    expect_bad(uri);
    snprintf(uri, sizeof(uri), "spiffe://" TD "/gateway/mesh/dc/%s", name);
    expect_bad(uri);
    snprintf(uri, sizeof(uri), "spiffe://%s/ns/default/dc/dc1/svc/web", name);
    expect_bad(uri);

    /* The limit is on the decoded length: 255 escapes are 765 raw bytes but fit. */
    char enc[800] = "";
    for (int i = 0; i < SPIFFE_NAME_MAX - 1; i++)
        memcpy(enc + 3 * i, "%41", 4);
    snprintf(uri, sizeof(uri), "spiffe://" TD "/ns/default/dc/dc1/svc/%s", enc);
    assert_int_equal(parse(uri, &id), 0);
    assert_int_equal(strlen(id.service), SPIFFE_NAME_MAX - 1);
    assert_int_equal(id.service[0], 'A');

    /* A long segment in a place no kind keeps is no error. */
    snprintf(uri, sizeof(uri), "spiffe://" TD "/custom/%s", name);
    expect_other(uri);
}

static void test_format_service(void **state)
{
    (void)state;
    char buf[512];
    assert_int_equal(spiffe_format_service(buf, sizeof(buf), TD, "", "default", "dc1", "web"),
                     (int)strlen("spiffe://" TD "/ns/default/dc/dc1/svc/web"));
    assert_string_equal(buf, "spiffe://" TD "/ns/default/dc/dc1/svc/web");

    /* "default" and NULL partitions leave the ap segment out; an empty namespace is default. */
    spiffe_format_service(buf, sizeof(buf), TD, "default", "", "dc1", "web");
    assert_string_equal(buf, "spiffe://" TD "/ns/default/dc/dc1/svc/web");
    spiffe_format_service(buf, sizeof(buf), TD, NULL, NULL, "dc1", "web");
    assert_string_equal(buf, "spiffe://" TD "/ns/default/dc/dc1/svc/web");

    spiffe_format_service(buf, sizeof(buf), TD, "team1", "billing", "east", "db");
    assert_string_equal(buf, "spiffe://" TD "/ap/team1/ns/billing/dc/east/svc/db");

    /* Characters outside a path segment's safe set are escaped, so parsing gives them back. */
    spiffe_format_service(buf, sizeof(buf), TD, "", "default", "dc1", "a b/c%d");
    assert_string_equal(buf, "spiffe://" TD "/ns/default/dc/dc1/svc/a%20b%2Fc%25d");
    struct spiffe_id id;
    assert_int_equal(parse(buf, &id), 0);
    assert_string_equal(id.service, "a b/c%d");
}

static void test_format_round_trip(void **state)
{
    (void)state;
    static const char *const uris[] = {
        "spiffe://" TD "/ns/default/dc/dc1/svc/web",
        "spiffe://" TD "/ap/team1/ns/billing/dc/east/svc/db",
        "spiffe://" TD "/ns/ns-1/dc/dc_2/svc/web.v2~x",
    };
    for (size_t i = 0; i < ARRAY_SIZE(uris); i++) {
        struct spiffe_id id;
        char buf[512];
        assert_int_equal(parse(uris[i], &id), 0);
        assert_int_equal(spiffe_format(buf, sizeof(buf), &id), (int)strlen(uris[i]));
        assert_string_equal(buf, uris[i]);
    }
}

static void test_format_nospace(void **state)
{
    (void)state;
    const char *want = "spiffe://" TD "/ns/default/dc/dc1/svc/web";
    size_t n = strlen(want);
    char buf[512];
    /* The NUL must fit as well. */
    assert_int_equal(spiffe_format_service(buf, n, TD, "", "default", "dc1", "web"), -ENOSPC);
    assert_int_equal(spiffe_format_service(buf, n + 1, TD, "", "default", "dc1", "web"), (int)n);
    assert_string_equal(buf, want);
    buf[0] = 'x';
    assert_int_equal(spiffe_format_service(buf, 0, TD, "", "default", "dc1", "web"), -ENOSPC);
    assert_int_equal(buf[0], 'x');
    assert_int_equal(spiffe_format_service(buf, 10, TD, "", "default", "dc1", "web"), -ENOSPC);
    assert_string_equal(buf, "");
}

static void test_sni(void **state)
{
    (void)state;
    char buf[512];
    assert_int_equal(spiffe_format_sni(buf, sizeof(buf), NULL, "db", "default", "", "dc1", TD),
                     (int)strlen("db.default.dc1.internal." TD));
    assert_string_equal(buf, "db.default.dc1.internal." TD);

    spiffe_format_sni(buf, sizeof(buf), "", "db", "", "default", "dc1", TD);
    assert_string_equal(buf, "db.default.dc1.internal." TD);

    spiffe_format_sni(buf, sizeof(buf), "v1", "db", "default", NULL, "dc1", TD);
    assert_string_equal(buf, "v1.db.default.dc1.internal." TD);

    spiffe_format_sni(buf, sizeof(buf), NULL, "db", "billing", "team1", "dc2", TD);
    assert_string_equal(buf, "db.billing.team1.dc2.internal-v1." TD);

    spiffe_format_sni(buf, sizeof(buf), "canary", "db", "billing", "team1", "dc2", TD);
    assert_string_equal(buf, "canary.db.billing.team1.dc2.internal-v1." TD);

    const char *want = "db.default.dc1.internal." TD;
    assert_int_equal(spiffe_format_sni(buf, strlen(want), NULL, "db", "default", "", "dc1", TD),
                     -ENOSPC);
}

static void test_same_service(void **state)
{
    (void)state;
    struct spiffe_id a, b;
    assert_int_equal(parse("spiffe://" TD "/ns/default/dc/dc1/svc/web", &a), 0);

    assert_int_equal(parse("spiffe://" TD "/ns/default/dc/dc1/svc/web", &b), 0);
    assert_int_equal(spiffe_same_service(&a, &b, 1), 1);

    /* Names compare case-insensitively, as the Go SDK's EqualFold does. */
    assert_int_equal(parse("spiffe://" TD "/ns/Default/dc/DC1/svc/WEB", &b), 0);
    assert_int_equal(spiffe_same_service(&a, &b, 1), 1);

    assert_int_equal(parse("spiffe://" TD "/ap/default/ns/default/dc/dc1/svc/web", &b), 0);
    assert_int_equal(spiffe_same_service(&a, &b, 1), 1);

    assert_int_equal(parse("spiffe://other.consul/ns/default/dc/dc1/svc/web", &b), 0);
    assert_int_equal(spiffe_same_service(&a, &b, 0), 1);
    assert_int_equal(spiffe_same_service(&a, &b, 1), 0);

    assert_int_equal(parse("spiffe://" TD "/ns/default/dc/dc2/svc/web", &b), 0);
    assert_int_equal(spiffe_same_service(&a, &b, 1), 0);
    assert_int_equal(parse("spiffe://" TD "/ns/other/dc/dc1/svc/web", &b), 0);
    assert_int_equal(spiffe_same_service(&a, &b, 1), 0);
    assert_int_equal(parse("spiffe://" TD "/ns/default/dc/dc1/svc/web2", &b), 0);
    assert_int_equal(spiffe_same_service(&a, &b, 1), 0);
    assert_int_equal(parse("spiffe://" TD "/ap/team1/ns/default/dc/dc1/svc/web", &b), 0);
    assert_int_equal(spiffe_same_service(&a, &b, 1), 0);

    /* A hand-built expectation with "" partition and namespace means default. */
    struct spiffe_id e;
    memset(&e, 0, sizeof(e));
    e.kind = SPIFFE_SERVICE;
    memcpy(e.trust_domain, TD, sizeof(TD));
    memcpy(e.dc, "dc1", 4);
    memcpy(e.service, "web", 4);
    assert_int_equal(spiffe_same_service(&a, &e, 1), 1);

    /* Only service identities name a service. */
    assert_int_equal(parse("spiffe://" TD "/agent/server/dc/dc1", &b), 0);
    assert_int_equal(spiffe_same_service(&b, &b, 1), 0);
    assert_int_equal(spiffe_same_service(&a, &b, 0), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_service_default_partition),
        cmocka_unit_test(test_service_with_partition),
        cmocka_unit_test(test_not_nul_terminated),
        cmocka_unit_test(test_agent),
        cmocka_unit_test(test_server),
        cmocka_unit_test(test_mesh_gateway),
        cmocka_unit_test(test_signing),
        cmocka_unit_test(test_scheme_is_case_insensitive),
        cmocka_unit_test(test_percent_encoding),
        cmocka_unit_test(test_bad_schemes),
        cmocka_unit_test(test_empty_or_odd_trust_domain),
        cmocka_unit_test(test_trailing_garbage),
        cmocka_unit_test(test_too_long_segments),
        cmocka_unit_test(test_format_service),
        cmocka_unit_test(test_format_round_trip),
        cmocka_unit_test(test_format_nospace),
        cmocka_unit_test(test_sni),
        cmocka_unit_test(test_same_service),
    };
    return cmocka_run_group_tests_name("spiffe", tests, NULL, NULL);
}
