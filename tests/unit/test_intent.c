/*
 * Unit tests for intent: matching, precedence, wildcards, L7 and peer rules, and the default
 * decision (consul-api.md 2.4.3 - 2.4.5).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "decode.h"
#include "intent.h"
#include "util.h"

/* Builds an intention the way the decoder would (absent strings are ""). */
static struct dec_intention ix(const char *src_ns, const char *src, const char *dst,
                               const char *action, int precedence)
{
    struct dec_intention d = {
        .id = "",
        .description = "",
        .source_peer = "",
        .source_sameness_group = "",
        .source_partition = "",
        .source_ns = (char *)src_ns,
        .source_name = (char *)src,
        .destination_ns = "default",
        .destination_name = (char *)dst,
        .action = (char *)action,
        .has_permissions = 0,
        .precedence = precedence,
    };
    return d;
}

/* Evaluates a caller in the default partition and namespace. */
static struct intent_decision eval(const struct intent_table *t, const char *name)
{
    return intent_eval(t, "", "", name);
}

static void test_exact_match(void **state)
{
    (void)state;
    struct dec_intention v[] = {ix("default", "web", "db", "allow", 9)};
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 0);

    struct intent_decision d = eval(t, "web");
    assert_int_equal(d.allow, 1);
    assert_non_null(d.rule);
    assert_string_equal(d.rule->src_name, "web");
    assert_int_equal(d.rule->precedence, 9);

    d = eval(t, "api");
    assert_int_equal(d.allow, 0);
    assert_null(d.rule);
    intent_table_unref(t);
}

static void test_default_policy(void **state)
{
    (void)state;
    struct intent_table *allow = intent_table_new(NULL, 0, 1);
    struct intent_table *deny = intent_table_new(NULL, 0, 0);
    assert_int_equal(intent_table_len(allow), 0);
    assert_int_equal(intent_table_default_allow(allow), 1);
    assert_int_equal(intent_table_default_allow(deny), 0);

    struct intent_decision d = eval(allow, "web");
    assert_int_equal(d.allow, 1);
    assert_null(d.rule);
    d = eval(deny, "web");
    assert_int_equal(d.allow, 0);
    assert_null(d.rule);

    /* A rule for someone else leaves everyone else to the default. */
    struct dec_intention v[] = {ix("default", "web", "db", "deny", 9)};
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 1);
    assert_int_equal(eval(t, "web").allow, 0);
    d = eval(t, "api");
    assert_int_equal(d.allow, 1);
    assert_null(d.rule);
    intent_table_unref(t);
    intent_table_unref(allow);
    intent_table_unref(deny);
}

static void test_wildcard_source_name(void **state)
{
    (void)state;
    struct dec_intention v[] = {
        ix("default", "web", "db", "allow", 9),
        ix("default", "*", "db", "deny", 8),
    };
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 1);
    assert_int_equal(eval(t, "web").allow, 1);
    struct intent_decision d = eval(t, "api");
    assert_int_equal(d.allow, 0);
    assert_non_null(d.rule);
    assert_string_equal(d.rule->src_name, "*");
    /* The wildcard name does not reach into other namespaces. */
    d = intent_eval(t, "", "other", "api");
    assert_int_equal(d.allow, 1);
    assert_null(d.rule);
    intent_table_unref(t);
}

static void test_wildcard_namespace(void **state)
{
    (void)state;
    struct dec_intention v[] = {
        ix("team", "*", "db", "allow", 8),
        ix("*", "*", "db", "deny", 7),
    };
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 1);
    assert_int_equal(intent_eval(t, "", "team", "anything").allow, 1);
    struct intent_decision d = intent_eval(t, "", "other", "web");
    assert_int_equal(d.allow, 0);
    assert_non_null(d.rule);
    assert_string_equal(d.rule->src_ns, "*");
    /* "" is the default namespace, which "*" covers too. */
    assert_int_equal(intent_eval(t, "", "", "web").allow, 0);
    assert_non_null(intent_eval(t, "", "", "web").rule);
    intent_table_unref(t);
}

static void test_wildcard_destination(void **state)
{
    (void)state;
    /* An exact-destination rule outranks a wildcard-destination one for the same source. */
    struct dec_intention v[] = {
        ix("default", "web", "db", "deny", 9),
        ix("default", "web", "*", "allow", 6),
        ix("default", "api", "*", "allow", 6),
    };
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 0);
    struct intent_decision d = eval(t, "web");
    assert_int_equal(d.allow, 0);
    assert_string_equal(d.rule->dst_name, "db");
    d = eval(t, "api");
    assert_int_equal(d.allow, 1);
    assert_string_equal(d.rule->dst_name, "*");
    assert_int_equal(d.rule->precedence, 6);
    assert_null(eval(t, "other").rule);
    intent_table_unref(t);
}

static void test_first_match_no_fall_through(void **state)
{
    (void)state;
    /* web matches the deny first; the allow-all below must not rescue it. */
    struct dec_intention v[] = {
        ix("default", "web", "db", "deny", 9),
        ix("default", "*", "db", "allow", 8),
    };
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 1);
    struct intent_decision d = eval(t, "web");
    assert_int_equal(d.allow, 0);
    assert_int_equal(d.rule->precedence, 9);
    assert_int_equal(eval(t, "api").allow, 1);
    intent_table_unref(t);
}

static void test_permissions_deny(void **state)
{
    (void)state;
    /* An L7 rule (Permissions, empty Action) for web sits above an allow-all: web is denied by
     * the L7 rule and does not fall through to the allow. */
    struct dec_intention v[] = {
        ix("default", "web", "db", "", 9),
        ix("default", "*", "db", "allow", 8),
    };
    v[0].has_permissions = 1;
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 1);
    struct intent_decision d = eval(t, "web");
    assert_int_equal(d.allow, 0);
    assert_non_null(d.rule);
    assert_int_equal(d.rule->has_permissions, 1);
    assert_int_equal(d.rule->allow, 0);
    assert_int_equal(eval(t, "api").allow, 1);
    intent_table_unref(t);

    /* Even an inconsistent "allow" with permissions is a deny. */
    struct dec_intention w[] = {ix("default", "web", "db", "allow", 9)};
    w[0].has_permissions = 1;
    t = intent_table_new(w, ARRAY_SIZE(w), 1);
    assert_int_equal(eval(t, "web").allow, 0);
    intent_table_unref(t);
}

static void test_unknown_action_denies(void **state)
{
    (void)state;
    struct dec_intention v[] = {
        ix("default", "web", "db", "ALLOW", 9),
        ix("default", "api", "db", "", 9),
    };
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 1);
    assert_int_equal(eval(t, "web").allow, 0);
    assert_non_null(eval(t, "web").rule);
    assert_int_equal(eval(t, "api").allow, 0);
    intent_table_unref(t);
}

static void test_peer_rules_skipped(void **state)
{
    (void)state;
    struct dec_intention v[] = {
        ix("default", "web", "db", "allow", 9),
        ix("default", "web", "db", "allow", 9),
        ix("default", "*", "db", "deny", 8),
    };
    v[0].source_peer = "cluster-02";
    v[1].source_sameness_group = "group-a";
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 1);
    struct intent_decision d = eval(t, "web");
    assert_int_equal(d.allow, 0);
    assert_non_null(d.rule);
    assert_string_equal(d.rule->src_name, "*");
    intent_table_unref(t);

    /* With only a peer rule, a local caller gets the default. */
    t = intent_table_new(v, 1, 0);
    assert_int_equal(intent_table_len(t), 1);
    d = eval(t, "web");
    assert_int_equal(d.allow, 0);
    assert_null(d.rule);
    intent_table_unref(t);
}

/*
 * Sameness-group rules used to be skipped like peer rules, so a sameness-group deny let a caller
 * of a member partition through. Membership is not known here: deny rules apply in every
 * partition, allow rules in none.
 */
static void test_sameness_group_rules_fail_closed(void **state)
{
    (void)state;
    struct dec_intention v[] = {
        ix("default", "web", "db", "deny", 9),
        ix("default", "api", "db", "allow", 9),
        ix("default", "*", "db", "allow", 8),
    };
    v[0].source_sameness_group = "group-a";
    v[1].source_sameness_group = "group-a";
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 1);
    struct intent_decision d = intent_eval(t, "", "", "web");
    assert_int_equal(d.allow, 0);
    assert_string_equal(d.rule->src_name, "web");
    d = intent_eval(t, "other-partition", "default", "web");
    assert_int_equal(d.allow, 0);
    assert_string_equal(d.rule->src_name, "web");
    char buf[200];
    assert_string_equal(intent_describe(&d, buf, sizeof(buf)),
                        "intention group-a/default/web => db deny (sameness group, precedence 9)");
    /* The allow is not taken; the next rule decides (here the wildcard allow of the caller's
     * own partition, and nothing in another one). */
    d = intent_eval(t, "", "", "api");
    assert_int_equal(d.allow, 1);
    assert_string_equal(d.rule->src_name, "*");
    d = intent_eval(t, "other-partition", "default", "api");
    assert_null(d.rule);
    intent_table_unref(t);

    /* The deny counts when tables are compared; the allow does not. */
    struct intent_table *a = intent_table_new(v + 1, 2, 1);
    struct intent_table *b = intent_table_new(v + 2, 1, 1);
    assert_int_equal(intent_table_equal(a, b), 1);
    intent_table_unref(a);
    a = intent_table_new(v, 1, 1);
    struct dec_intention plain = ix("default", "web", "db", "deny", 9);
    intent_table_unref(b);
    b = intent_table_new(&plain, 1, 1);
    assert_int_equal(intent_table_equal(a, b), 0);
    intent_table_unref(a);
    intent_table_unref(b);
}

static void test_misordered_input(void **state)
{
    (void)state;
    /* The agent promises precedence order; the table does not rely on it. */
    struct dec_intention v[] = {
        ix("default", "*", "*", "deny", 5),
        ix("default", "*", "db", "deny", 8),
        ix("default", "web", "db", "allow", 9),
        ix("default", "api", "*", "allow", 6),
    };
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 1);
    struct intent_decision d = eval(t, "web");
    assert_int_equal(d.allow, 1);
    assert_int_equal(d.rule->precedence, 9);
    d = eval(t, "api");
    assert_int_equal(d.allow, 0);
    assert_int_equal(d.rule->precedence, 8);
    intent_table_unref(t);
}

static void test_sort_is_stable(void **state)
{
    (void)state;
    /* Among equal precedences the agent's order is kept (outcomes never depend on it for real
     * intentions, but a rebuilt table must not flip between equal inputs). */
    struct dec_intention v[] = {
        ix("default", "web", "db", "allow", 9),
        ix("default", "other", "db", "deny", 9),
        ix("default", "web", "db", "deny", 9),
    };
    v[0].id = "first";
    v[2].id = "second";
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 0);
    assert_string_equal(eval(t, "web").rule->id, "first");
    intent_table_unref(t);

    struct dec_intention w[] = {v[2], v[1], v[0]};
    t = intent_table_new(w, ARRAY_SIZE(w), 0);
    assert_string_equal(eval(t, "web").rule->id, "second");
    assert_int_equal(eval(t, "web").allow, 0);
    intent_table_unref(t);
}

static void test_partitions(void **state)
{
    (void)state;
    struct dec_intention v[] = {
        ix("default", "web", "db", "allow", 9),
        ix("default", "api", "db", "allow", 9),
        ix("default", "*", "db", "allow", 8),
    };
    v[1].source_partition = "team1";
    v[2].source_partition = "*";
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 0);
    /* "" and "default" are the same partition, on both sides. */
    assert_string_equal(eval(t, "web").rule->src_partition, "default");
    assert_int_equal(intent_eval(t, "default", "default", "web").allow, 1);
    assert_int_equal(intent_eval(t, "team1", "", "web").allow, 0);
    assert_int_equal(intent_eval(t, "team1", "", "api").allow, 1);
    assert_int_equal(intent_eval(t, "", "", "api").allow, 0);
    /* A partition never takes a wildcard. */
    assert_null(intent_eval(t, "", "", "zzz").rule);
    intent_table_unref(t);
}

static void test_case_sensitive_and_null_caller(void **state)
{
    (void)state;
    struct dec_intention v[] = {ix("default", "web", "db", "allow", 9)};
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 0);
    assert_null(eval(t, "Web").rule);
    assert_null(intent_eval(t, "", "Default", "web").rule);
    assert_int_equal(intent_eval(t, NULL, NULL, "web").allow, 1);
    assert_null(intent_eval(t, NULL, NULL, NULL).rule);
    intent_table_unref(t);
}

static void test_empty_source_namespace_is_default(void **state)
{
    (void)state;
    struct dec_intention v[] = {ix("", "web", "db", "allow", 9)};
    v[0].destination_ns = "";
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 0);
    struct intent_decision d = eval(t, "web");
    assert_int_equal(d.allow, 1);
    assert_string_equal(d.rule->src_ns, "default");
    assert_string_equal(d.rule->dst_ns, "default");
    assert_int_equal(intent_eval(t, "", "default", "web").allow, 1);
    intent_table_unref(t);
}

static void test_refcount(void **state)
{
    (void)state;
    struct dec_intention v[] = {ix("default", "web", "db", "allow", 9)};
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 0);
    assert_ptr_equal(intent_table_ref(t), t);
    intent_table_unref(t);
    /* Still alive: the first reference remains. */
    assert_int_equal(eval(t, "web").allow, 1);
    intent_table_unref(t);
    assert_null(intent_table_ref(NULL));
    intent_table_unref(NULL);
}

static void test_equal(void **state)
{
    (void)state;
    struct dec_intention v[] = {
        ix("default", "web", "db", "allow", 9),
        ix("default", "*", "db", "deny", 8),
    };
    struct intent_table *a = intent_table_new(v, ARRAY_SIZE(v), 0);
    struct intent_table *b = intent_table_new(v, ARRAY_SIZE(v), 0);
    assert_int_equal(intent_table_equal(a, b), 1);
    assert_int_equal(intent_table_equal(a, a), 1);
    assert_int_equal(intent_table_equal(a, NULL), 0);
    assert_int_equal(intent_table_equal(NULL, NULL), 1);

    struct intent_table *c = intent_table_new(v, ARRAY_SIZE(v), 1);
    assert_int_equal(intent_table_equal(a, c), 0);
    intent_table_unref(c);

    /* Descriptions and IDs do not decide anything. */
    struct dec_intention w[] = {v[0], v[1]};
    w[0].description = "changed";
    w[0].id = "a1b2";
    c = intent_table_new(w, ARRAY_SIZE(w), 0);
    assert_int_equal(intent_table_equal(a, c), 1);
    intent_table_unref(c);

    w[0].action = "deny";
    c = intent_table_new(w, ARRAY_SIZE(w), 0);
    assert_int_equal(intent_table_equal(a, c), 0);
    intent_table_unref(c);

    c = intent_table_new(v, 1, 0);
    assert_int_equal(intent_table_equal(a, c), 0);
    assert_int_equal(intent_table_equal(c, a), 0);
    intent_table_unref(c);

    /* A peer-only rule changes nothing for local callers. */
    struct dec_intention p[] = {v[0], ix("default", "x", "db", "allow", 9), v[1]};
    p[1].source_peer = "peer1";
    c = intent_table_new(p, ARRAY_SIZE(p), 0);
    assert_int_equal(intent_table_equal(a, c), 1);
    intent_table_unref(c);

    intent_table_unref(a);
    intent_table_unref(b);
}

static void test_describe(void **state)
{
    (void)state;
    struct dec_intention v[] = {
        ix("default", "web", "db", "allow", 9),
        ix("team", "api", "db", "deny", 9),
        ix("default", "l7", "db", "", 9),
        ix("default", "ops", "db", "allow", 9),
    };
    v[2].has_permissions = 1;
    v[3].source_partition = "infra";
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 0);
    char buf[256];

    struct intent_decision d = eval(t, "web");
    assert_string_equal(intent_describe(&d, buf, sizeof(buf)),
                        "intention web => db allow (precedence 9)");
    d = intent_eval(t, "", "team", "api");
    assert_string_equal(intent_describe(&d, buf, sizeof(buf)),
                        "intention team/api => db deny (precedence 9)");
    d = eval(t, "l7");
    assert_string_equal(intent_describe(&d, buf, sizeof(buf)),
                        "intention l7 => db deny (L7 permissions, precedence 9)");
    d = intent_eval(t, "infra", "", "ops");
    assert_string_equal(intent_describe(&d, buf, sizeof(buf)),
                        "intention infra/default/ops => db allow (precedence 9)");
    d = eval(t, "nobody");
    assert_string_equal(intent_describe(&d, buf, sizeof(buf)), "default policy deny");

    /* A short buffer truncates and stays terminated. */
    d = eval(t, "web");
    assert_string_equal(intent_describe(&d, buf, 10), "intention");
    intent_table_unref(t);
}

static void test_from_agent_json(void **state)
{
    (void)state;
    /* The match response for db as a dev agent pretty-prints it, including a peer rule. */
    static const char body[] = "{\n"
                               "    \"db\": [\n"
                               "        {\n"
                               "            \"ID\": \"\",\n"
                               "            \"SourceNS\": \"default\",\n"
                               "            \"SourceName\": \"web\",\n"
                               "            \"DestinationNS\": \"default\",\n"
                               "            \"DestinationName\": \"db\",\n"
                               "            \"SourcePeer\": \"dc2-peer\",\n"
                               "            \"SourceType\": \"consul\",\n"
                               "            \"Action\": \"allow\",\n"
                               "            \"Precedence\": 9\n"
                               "        },\n"
                               "        {\n"
                               "            \"SourceNS\": \"default\",\n"
                               "            \"SourceName\": \"web\",\n"
                               "            \"DestinationNS\": \"default\",\n"
                               "            \"DestinationName\": \"db\",\n"
                               "            \"Action\": \"\",\n"
                               "            \"Permissions\": [{\"Action\": \"allow\", \"HTTP\": "
                               "{\"PathPrefix\": \"/\"}}],\n"
                               "            \"Precedence\": 9\n"
                               "        },\n"
                               "        {\n"
                               "            \"SourceNS\": \"default\",\n"
                               "            \"SourceName\": \"*\",\n"
                               "            \"DestinationNS\": \"default\",\n"
                               "            \"DestinationName\": \"*\",\n"
                               "            \"Action\": \"allow\",\n"
                               "            \"Permissions\": null,\n"
                               "            \"Precedence\": 5\n"
                               "        }\n"
                               "    ]\n"
                               "}\n";
    struct dec_intention *v;
    size_t n;
    char err[256];
    assert_int_equal(
        decode_intentions_match(body, sizeof(body) - 1, "db", &v, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 3);
    struct intent_table *t = intent_table_new(v, n, 0);
    dec_intentions_free(v, n);

    struct intent_decision d = eval(t, "web");
    assert_int_equal(d.allow, 0);
    assert_int_equal(d.rule->has_permissions, 1);
    d = eval(t, "api");
    assert_int_equal(d.allow, 1);
    assert_int_equal(d.rule->precedence, 5);
    intent_table_unref(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exact_match),
        cmocka_unit_test(test_default_policy),
        cmocka_unit_test(test_wildcard_source_name),
        cmocka_unit_test(test_wildcard_namespace),
        cmocka_unit_test(test_wildcard_destination),
        cmocka_unit_test(test_first_match_no_fall_through),
        cmocka_unit_test(test_permissions_deny),
        cmocka_unit_test(test_unknown_action_denies),
        cmocka_unit_test(test_peer_rules_skipped),
        cmocka_unit_test(test_sameness_group_rules_fail_closed),
        cmocka_unit_test(test_misordered_input),
        cmocka_unit_test(test_sort_is_stable),
        cmocka_unit_test(test_partitions),
        cmocka_unit_test(test_case_sensitive_and_null_caller),
        cmocka_unit_test(test_empty_source_namespace_is_default),
        cmocka_unit_test(test_refcount),
        cmocka_unit_test(test_equal),
        cmocka_unit_test(test_describe),
        cmocka_unit_test(test_from_agent_json),
    };
    return cmocka_run_group_tests_name("intent", tests, NULL, NULL);
}
