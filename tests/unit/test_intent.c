/*
 * Unit tests for intent: matching, precedence, wildcards, L7 and peer rules, and the default
 * decision (consul-api.md 2.4.3 - 2.4.5).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>
#include <time.h>

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

/* ---- per request (intent_eval_http) ---- */

/*
 * A table for destination db from JSON as the agent sends it: web's intention with the
 * given Permissions at precedence 9, then <wildcard> ("allow", "deny" or NULL for none) for
 * every other caller at precedence 8.
 */
static struct intent_table *l7_table(const char *perms, const char *wildcard, int default_allow)
{
    char *body;
    if (wildcard != NULL)
        body = xasprintf("{\"db\": [{\"SourceName\": \"web\", \"DestinationName\": \"db\","
                         " \"Precedence\": 9, \"Permissions\": %s},"
                         " {\"SourceName\": \"*\", \"DestinationName\": \"db\", \"Precedence\": 8,"
                         " \"Action\": \"%s\"}]}",
                         perms, wildcard);
    else
        body = xasprintf("{\"db\": [{\"SourceName\": \"web\", \"DestinationName\": \"db\","
                         " \"Precedence\": 9, \"Permissions\": %s}]}",
                         perms);
    struct dec_intention *v;
    size_t n;
    char err[256];
    if (decode_intentions_match(body, strlen(body), "db", &v, &n, err, sizeof(err)) != 0)
        fail_msg("test table did not decode: %s", err);
    free(body);
    struct intent_table *t = intent_table_new(v, n, default_allow);
    dec_intentions_free(v, n);
    return t;
}

static struct http_slice sl(const char *s)
{
    return (struct http_slice){s, s != NULL ? strlen(s) : 0};
}

/* A request: <hdrs> is "name: value" strings, NULL-terminated (at most 8). */
struct test_req {
    struct intent_http_req rq;
    struct http_header h[8];
};

static const struct intent_http_req *mkreq(struct test_req *t, const char *method, const char *path,
                                           const char *authority, const char *const *hdrs)
{
    memset(t, 0, sizeof(*t));
    t->rq.method = sl(method);
    t->rq.path = sl(path);
    t->rq.authority = sl(authority);
    for (size_t i = 0; hdrs != NULL && hdrs[i] != NULL; i++) {
        const char *colon = strchr(hdrs[i], ':');
        assert_non_null(colon);
        const char *v = colon + 1;
        while (*v == ' ')
            v++;
        t->h[i].name = (struct http_slice){hdrs[i], (size_t)(colon - hdrs[i])};
        t->h[i].value = sl(v);
        t->rq.nheaders = i + 1;
    }
    t->rq.headers = t->h;
    return &t->rq;
}

/* web's decision for one request; returns 1 allow, 0 deny, and checks the decision's shape. */
static int http(const struct intent_table *t, const char *method, const char *path,
                const char *const *hdrs)
{
    struct test_req r;
    struct intent_decision d =
        intent_eval_http(t, "", "", "web", mkreq(&r, method, path, "db.local", hdrs));
    assert_true(d.perm >= -1);
    if (d.perm >= 0) {
        assert_non_null(d.rule);
        assert_true((size_t)d.perm < d.rule->n_perms);
        assert_int_equal(d.allow, d.rule->perms[d.perm].allow);
    }
    return d.allow;
}

static void test_http_path_matchers(void **state)
{
    (void)state;
    struct intent_table *t =
        l7_table("[{\"Action\": \"allow\", \"HTTP\": {\"PathExact\": \"/a\"}},"
                 " {\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/api\"}},"
                 " {\"Action\": \"allow\", \"HTTP\": {\"PathRegex\": \"/adm[a-z]+\"}}]",
                 "deny", 0);
    static const struct {
        const char *path;
        int allow;
    } cases[] = {
        {"/a", 1},       {"/a/", 0},     {"/ab", 0},     {"/A", 0},   {"a", 0},      {"/api", 1},
        {"/api/x", 1},   {"/apix", 1},   {"/ap", 0},     {"/API", 0}, {"/admin", 1}, {"/adm", 0},
        {"/x/admin", 0}, {"/admin/", 0}, {"/admin1", 0}, {"", 0},     {"/", 0},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++)
        if (http(t, "GET", cases[i].path, NULL) != cases[i].allow)
            fail_msg("path \"%s\": want %s", cases[i].path, cases[i].allow ? "allow" : "deny");
    /* Which permission decided. */
    struct test_req r;
    struct intent_decision d =
        intent_eval_http(t, "", "", "web", mkreq(&r, "GET", "/api/v1", NULL, NULL));
    assert_int_equal(d.perm, 1);
    assert_ptr_equal(d.rule, d.matched);
    assert_int_equal(d.failed_closed, 0);
    intent_table_unref(t);
}

static void test_http_header_matchers(void **state)
{
    (void)state;
    static const struct {
        const char *cond; /* one Header[] entry */
        const char *const hdrs[4];
        int allow;
    } cases[] = {
        /* Present, and a header that is sent empty is present. */
        {"{\"Name\": \"x-a\", \"Present\": true}", {"x-a: 1"}, 1},
        {"{\"Name\": \"x-a\", \"Present\": true}", {"x-a:"}, 1},
        {"{\"Name\": \"x-a\", \"Present\": true}", {"x-b: 1"}, 0},
        {"{\"Name\": \"x-a\", \"Present\": true, \"Invert\": true}", {"x-b: 1"}, 1},
        {"{\"Name\": \"x-a\", \"Present\": true, \"Invert\": true}", {"x-a: 1"}, 0},
        /* Names are case-insensitive. */
        {"{\"Name\": \"X-Role\", \"Exact\": \"ops\"}", {"x-role: ops"}, 1},
        {"{\"Name\": \"x-role\", \"Exact\": \"ops\"}", {"X-ROLE: ops"}, 1},
        /* Exact and its near misses; values are case-sensitive unless IgnoreCase. */
        {"{\"Name\": \"x-role\", \"Exact\": \"ops\"}", {"x-role: ops2"}, 0},
        {"{\"Name\": \"x-role\", \"Exact\": \"ops\"}", {"x-role: op"}, 0},
        {"{\"Name\": \"x-role\", \"Exact\": \"ops\"}", {"x-role: OPS"}, 0},
        {"{\"Name\": \"x-role\", \"Exact\": \"ops\", \"IgnoreCase\": true}", {"x-role: OpS"}, 1},
        {"{\"Name\": \"x-role\", \"Exact\": \"OPS\", \"IgnoreCase\": true}", {"x-role: ops"}, 1},
        {"{\"Name\": \"x-role\", \"Exact\": \"ops\", \"IgnoreCase\": true}", {"x-role: opsx"}, 0},
        /* Invert of a value match: a different value matches, an absent header does not. */
        {"{\"Name\": \"x-role\", \"Exact\": \"ops\", \"Invert\": true}", {"x-role: dev"}, 1},
        {"{\"Name\": \"x-role\", \"Exact\": \"ops\", \"Invert\": true}", {"x-role: ops"}, 0},
        {"{\"Name\": \"x-role\", \"Exact\": \"ops\", \"Invert\": true}", {"x-other: 1"}, 0},
        {"{\"Name\": \"x-role\", \"Regex\": \"o.s\", \"Invert\": true}", {"x-other: 1"}, 0},
        /* Prefix, Suffix, Contains. */
        {"{\"Name\": \"x-v\", \"Prefix\": \"abc\"}", {"x-v: abcdef"}, 1},
        {"{\"Name\": \"x-v\", \"Prefix\": \"abc\"}", {"x-v: abc"}, 1},
        {"{\"Name\": \"x-v\", \"Prefix\": \"abc\"}", {"x-v: ab"}, 0},
        {"{\"Name\": \"x-v\", \"Prefix\": \"abc\"}", {"x-v: xabc"}, 0},
        {"{\"Name\": \"x-v\", \"Prefix\": \"abc\", \"IgnoreCase\": true}", {"x-v: ABCd"}, 1},
        {"{\"Name\": \"x-v\", \"Suffix\": \"def\"}", {"x-v: abcdef"}, 1},
        {"{\"Name\": \"x-v\", \"Suffix\": \"def\"}", {"x-v: ef"}, 0},
        {"{\"Name\": \"x-v\", \"Suffix\": \"def\"}", {"x-v: defx"}, 0},
        {"{\"Name\": \"x-v\", \"Suffix\": \"def\", \"IgnoreCase\": true}", {"x-v: aDEF"}, 1},
        {"{\"Name\": \"x-v\", \"Contains\": \"cd\"}", {"x-v: abcdef"}, 1},
        {"{\"Name\": \"x-v\", \"Contains\": \"cd\"}", {"x-v: abdc"}, 0},
        {"{\"Name\": \"x-v\", \"Contains\": \"cd\"}", {"x-v: CD"}, 0},
        {"{\"Name\": \"x-v\", \"Contains\": \"cd\", \"IgnoreCase\": true}", {"x-v: aCDe"}, 1},
        /* Regex: full-string, and IgnoreCase does not apply to it. */
        {"{\"Name\": \"x-v\", \"Regex\": \"[0-9]+\"}", {"x-v: 123"}, 1},
        {"{\"Name\": \"x-v\", \"Regex\": \"[0-9]+\"}", {"x-v: 123a"}, 0},
        {"{\"Name\": \"x-v\", \"Regex\": \"a\", \"IgnoreCase\": true}", {"x-v: A"}, 0},
        {"{\"Name\": \"x-v\", \"Regex\": \"[0-9]+\", \"Invert\": true}", {"x-v: abc"}, 1},
        /* A repeated header is matched on its values joined with ",". */
        {"{\"Name\": \"x-v\", \"Exact\": \"a,b\"}", {"x-v: a", "X-V: b"}, 1},
        {"{\"Name\": \"x-v\", \"Exact\": \"a\"}", {"x-v: a", "x-v: b"}, 0},
        {"{\"Name\": \"x-v\", \"Regex\": \"a,,c\"}", {"x-v: a", "x-v:", "x-v: c"}, 1},
        {"{\"Name\": \"x-v\", \"Suffix\": \",b\"}", {"x-v: a", "x-w: c", "x-v: b"}, 1},
        /* Host and :authority are the authority ("db.local" in these requests). */
        {"{\"Name\": \"Host\", \"Exact\": \"db.local\"}", {NULL}, 1},
        {"{\"Name\": \":authority\", \"Suffix\": \".local\"}", {NULL}, 1},
        {"{\"Name\": \"host\", \"Exact\": \"evil\"}", {"host: evil"}, 0},
        /* :method is the method. */
        {"{\"Name\": \":method\", \"Exact\": \"GET\"}", {NULL}, 1},
        {"{\"Name\": \":method\", \"Exact\": \"POST\"}", {NULL}, 0},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        char *perms =
            xasprintf("[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [%s]}}]", cases[i].cond);
        struct intent_table *t = l7_table(perms, "deny", 0);
        const char *hdrs[5] = {cases[i].hdrs[0], cases[i].hdrs[1], cases[i].hdrs[2],
                               cases[i].hdrs[3], NULL};
        if (http(t, "GET", "/", hdrs) != cases[i].allow)
            fail_msg("case %zu: %s with %s...: want %s", i, cases[i].cond,
                     cases[i].hdrs[0] != NULL ? cases[i].hdrs[0] : "(none)",
                     cases[i].allow ? "allow" : "deny");
        intent_table_unref(t);
        free(perms);
    }
    /* A value with a NUL byte in it (the codecs refuse them, but slices carry lengths): the
     * folded Contains copies all of it, and the bytes after the NUL still count. */
    struct intent_table *c = l7_table("[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [{\"Name\": "
                                      "\"x\", \"Contains\": \"TAIL\", \"IgnoreCase\": true}]}}]",
                                      NULL, 0);
    static const char nul_value[] = "a\0b-tail";
    struct test_req rn;
    mkreq(&rn, "GET", "/", NULL, NULL);
    rn.h[0].name = sl("x");
    rn.h[0].value = (struct http_slice){nul_value, sizeof(nul_value) - 1};
    rn.rq.nheaders = 1;
    assert_int_equal(intent_eval_http(c, "", "", "web", &rn.rq).allow, 1);
    intent_table_unref(c);

    /* Without an authority, a Host condition sees an absent header. */
    struct intent_table *t = l7_table("[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [{\"Name\": "
                                      "\"host\", \"Present\": true, \"Invert\": true}]}}]",
                                      NULL, 0);
    struct test_req r;
    assert_int_equal(intent_eval_http(t, "", "", "web", mkreq(&r, "GET", "/", NULL, NULL)).allow,
                     1);
    assert_int_equal(intent_eval_http(t, "", "", "web", mkreq(&r, "GET", "/", "h", NULL)).allow, 0);
    intent_table_unref(t);
}

static void test_http_all_conditions_and_methods(void **state)
{
    (void)state;
    struct intent_table *t =
        l7_table("[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/api\", \"Methods\": "
                 "[\"GET\", \"PUT\"], \"Header\": [{\"Name\": \"x-role\", \"Exact\": \"ops\"},"
                 " {\"Name\": \"x-debug\", \"Present\": true, \"Invert\": true}]}}]",
                 "deny", 0);
    const char *ops[] = {"x-role: ops", NULL};
    const char *ops_debug[] = {"x-role: ops", "x-debug: 1", NULL};
    assert_int_equal(http(t, "GET", "/api/x", ops), 1);
    assert_int_equal(http(t, "PUT", "/api/x", ops), 1);
    /* Each condition alone failing denies. */
    assert_int_equal(http(t, "POST", "/api/x", ops), 0);
    assert_int_equal(http(t, "get", "/api/x", ops), 0); /* methods compare exactly */
    assert_int_equal(http(t, "GETX", "/api/x", ops), 0);
    assert_int_equal(http(t, "GE", "/api/x", ops), 0);
    assert_int_equal(http(t, "GET", "/ap", ops), 0);
    assert_int_equal(http(t, "GET", "/api/x", NULL), 0);
    assert_int_equal(http(t, "GET", "/api/x", ops_debug), 0);
    intent_table_unref(t);
}

static void test_http_first_permission_and_default(void **state)
{
    (void)state;
    const char *perms = "[{\"Action\": \"deny\", \"HTTP\": {\"PathPrefix\": \"/api/admin\"}},"
                        " {\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/api\"}}]";
    for (int def = 0; def <= 1; def++) {
        struct intent_table *t = l7_table(perms, NULL, def);
        struct test_req r;
        /* The deny comes first, so it wins over the broader allow after it. */
        struct intent_decision d =
            intent_eval_http(t, "", "", "web", mkreq(&r, "GET", "/api/admin/x", NULL, NULL));
        assert_int_equal(d.allow, 0);
        assert_int_equal(d.perm, 0);
        d = intent_eval_http(t, "", "", "web", mkreq(&r, "GET", "/api/users", NULL, NULL));
        assert_int_equal(d.allow, 1);
        assert_int_equal(d.perm, 1);
        /* No permission matches: the default policy decides, naming the rule that matched. */
        d = intent_eval_http(t, "", "", "web", mkreq(&r, "GET", "/other", NULL, NULL));
        assert_int_equal(d.allow, def);
        assert_null(d.rule);
        assert_int_equal(d.perm, -1);
        assert_non_null(d.matched);
        assert_string_equal(d.matched->src_name, "web");
        /* Another caller has no rule at all. */
        d = intent_eval_http(t, "", "", "api", mkreq(&r, "GET", "/api/users", NULL, NULL));
        assert_int_equal(d.allow, def);
        assert_null(d.rule);
        assert_null(d.matched);
        intent_table_unref(t);
    }
    /* Reversed order: the allow comes first and now covers /api/admin too. */
    struct intent_table *t =
        l7_table("[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/api\"}},"
                 " {\"Action\": \"deny\", \"HTTP\": {\"PathPrefix\": \"/api/admin\"}}]",
                 NULL, 0);
    assert_int_equal(http(t, "GET", "/api/admin/x", NULL), 1);
    intent_table_unref(t);
}

/*
 * A source's L7 intention hides the lower-precedence wildcard intentions for that source:
 * when none of web's permissions match, the default policy decides, not the wildcard rule
 * (Consul's RBAC ANDs the wildcard's principal with NOT web).
 */
static void test_http_l7_rule_hides_wildcard(void **state)
{
    (void)state;
    const char *perms = "[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/public\"}}]";
    struct intent_table *t = l7_table(perms, "allow", 0);
    assert_int_equal(http(t, "GET", "/public/x", NULL), 1);
    struct test_req r;
    struct intent_decision d =
        intent_eval_http(t, "", "", "web", mkreq(&r, "GET", "/private", NULL, NULL));
    assert_int_equal(d.allow, 0);
    assert_null(d.rule);
    assert_string_equal(d.matched->src_name, "web");
    /* Others get the wildcard allow, whatever the path. */
    d = intent_eval_http(t, "", "", "api", mkreq(&r, "GET", "/private", NULL, NULL));
    assert_int_equal(d.allow, 1);
    assert_string_equal(d.rule->src_name, "*");
    intent_table_unref(t);

    /* The same with a wildcard deny and a default allow: web's miss is the default allow. */
    perms = "[{\"Action\": \"deny\", \"HTTP\": {\"PathPrefix\": \"/admin\"}}]";
    t = l7_table(perms, "deny", 1);
    assert_int_equal(http(t, "GET", "/admin", NULL), 0);
    assert_int_equal(http(t, "GET", "/public", NULL), 1);
    d = intent_eval_http(t, "", "", "api", mkreq(&r, "GET", "/public", NULL, NULL));
    assert_int_equal(d.allow, 0);
    intent_table_unref(t);

    /* And the L4 decision keeps its meaning: web's L7 rule is a deny per connection. */
    t = l7_table(perms, "allow", 1);
    d = intent_eval(t, "", "", "web");
    assert_int_equal(d.allow, 0);
    assert_int_equal(d.perm, -1);
    assert_int_equal(d.rule->has_permissions, 1);
    intent_table_unref(t);
}

static void test_http_l4_rules_per_request(void **state)
{
    (void)state;
    struct dec_intention v[] = {
        ix("default", "web", "db", "allow", 9),
        ix("default", "*", "db", "deny", 8),
    };
    struct intent_table *t = intent_table_new(v, ARRAY_SIZE(v), 1);
    struct test_req r;
    struct intent_decision d =
        intent_eval_http(t, "", "", "web", mkreq(&r, "DELETE", "/x", NULL, NULL));
    assert_int_equal(d.allow, 1);
    assert_int_equal(d.perm, -1);
    assert_ptr_equal(d.rule, d.matched);
    d = intent_eval_http(t, "", "", "api", mkreq(&r, "GET", "/", NULL, NULL));
    assert_int_equal(d.allow, 0);
    assert_string_equal(d.rule->src_name, "*");
    /* Peer-only rules stay out of reach per request too. */
    v[0].source_peer = "peer1";
    intent_table_unref(t);
    t = intent_table_new(v, ARRAY_SIZE(v), 1);
    d = intent_eval_http(t, "", "", "web", mkreq(&r, "GET", "/", NULL, NULL));
    assert_int_equal(d.allow, 0);
    assert_string_equal(d.rule->src_name, "*");
    intent_table_unref(t);
}

/*
 * A regex that does not compile (here: lookahead, which RE2 refuses, and an unbalanced
 * bracket) must not let through a request its permission was written to deny: in a deny
 * permission it denies, in an allow permission it never allows.
 */
static void test_http_bad_regex_fails_closed(void **state)
{
    (void)state;
    static const char *const bad[] = {"(?=x)/admin.*", "/admin[", "(a)\\\\1"};
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        /* A deny permission with the bad path regex, before an allow-everything one. */
        char *perms = xasprintf("[{\"Action\": \"deny\", \"HTTP\": {\"PathRegex\": \"%s\"}},"
                                " {\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/\"}}]",
                                bad[i]);
        struct intent_table *t = l7_table(perms, "allow", 1);
        free(perms);
        assert_int_equal(intent_table_broken(t), 1);
        struct test_req r;
        struct intent_decision d =
            intent_eval_http(t, "", "", "web", mkreq(&r, "GET", "/admin/x", NULL, NULL));
        assert_int_equal(d.allow, 0);
        assert_int_equal(d.perm, 0);
        assert_int_equal(d.failed_closed, 1);
        assert_int_equal(d.rule->perms[0].broken, 1);
        assert_int_equal(http(t, "GET", "/public", NULL), 0);
        intent_table_unref(t);

        /* The same regex in a header condition of a deny permission, inverted or not. */
        for (int invert = 0; invert <= 1; invert++) {
            perms = xasprintf("[{\"Action\": \"deny\", \"HTTP\": {\"Header\": [{\"Name\": \"x\","
                              " \"Regex\": \"%s\", \"Invert\": %s}]}},"
                              " {\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/\"}}]",
                              bad[i], invert ? "true" : "false");
            t = l7_table(perms, "allow", 1);
            free(perms);
            const char *hx[] = {"x: admin", NULL};
            assert_int_equal(http(t, "GET", "/a", hx), 0);
            /* An absent header is a sure "no" whatever the regex (inverted or not), so the
             * deny permission does not apply and the allow after it does. */
            assert_int_equal(http(t, "GET", "/a", NULL), 1);
            intent_table_unref(t);
        }

        /* An allow permission with the bad regex never allows; the next permission or the
         * default decides. */
        perms = xasprintf("[{\"Action\": \"allow\", \"HTTP\": {\"PathRegex\": \"%s\"}},"
                          " {\"Action\": \"allow\", \"HTTP\": {\"PathExact\": \"/ok\"}}]",
                          bad[i]);
        t = l7_table(perms, "allow", 0);
        free(perms);
        d = intent_eval_http(t, "", "", "web", mkreq(&r, "GET", "/admin/x", NULL, NULL));
        assert_int_equal(d.allow, 0);
        assert_null(d.rule);
        assert_int_equal(d.failed_closed, 1);
        assert_int_equal(http(t, "GET", "/ok", NULL), 1);
        intent_table_unref(t);
    }
}

/* A catastrophic regex and a long path: the match limit stops it quickly and the answer is
 * treated as unknown, so an allow permission does not allow and a deny permission denies. */
static void test_http_regex_match_limit(void **state)
{
    (void)state;
    char path[4096];
    path[0] = '/';
    memset(path + 1, 'a', sizeof(path) - 3);
    path[sizeof(path) - 2] = '!';
    path[sizeof(path) - 1] = '\0';
    struct intent_table *t =
        l7_table("[{\"Action\": \"allow\", \"HTTP\": {\"PathRegex\": \"/(a+)+$\"}}]", NULL, 0);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    struct test_req r;
    struct intent_decision d =
        intent_eval_http(t, "", "", "web", mkreq(&r, "GET", path, NULL, NULL));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    assert_int_equal(d.allow, 0);
    assert_true(ms < 500.0);
    assert_int_equal(http(t, "GET", "/aaaa", NULL), 1);
    intent_table_unref(t);

    t = l7_table("[{\"Action\": \"deny\", \"HTTP\": {\"PathRegex\": \"/(a+)+$\"}}]", NULL, 1);
    d = intent_eval_http(t, "", "", "web", mkreq(&r, "GET", path, NULL, NULL));
    assert_int_equal(d.allow, 0);
    assert_int_equal(d.perm, 0);
    assert_int_equal(d.failed_closed, 1);
    assert_int_equal(http(t, "GET", "/b", NULL), 1);
    intent_table_unref(t);
}

/* What connectd cannot check fails closed: JWT requirements and pseudo-headers it lacks. */
static void test_http_unverifiable_conditions(void **state)
{
    (void)state;
    struct intent_table *t = l7_table(
        "[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/\"}, \"JWT\": {\"Providers\": "
        "[{\"Name\": \"okta\"}]}}]",
        NULL, 0);
    assert_int_equal(http(t, "GET", "/x", NULL), 0);
    intent_table_unref(t);
    t = l7_table(
        "[{\"Action\": \"deny\", \"HTTP\": {\"PathPrefix\": \"/\"}, \"JWT\": {\"Providers\": "
        "[{\"Name\": \"okta\"}]}}]",
        NULL, 1);
    assert_int_equal(http(t, "GET", "/x", NULL), 0);
    intent_table_unref(t);
    t = l7_table("[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [{\"Name\": \":path\","
                 " \"Prefix\": \"/\"}]}}]",
                 NULL, 0);
    assert_int_equal(http(t, "GET", "/x", NULL), 0);
    intent_table_unref(t);

    /* An intention-level JWT: its allow is a deny per request, and unchanged per connection. */
    static const char body[] = "{\"db\": [{\"SourceName\": \"web\", \"DestinationName\": \"db\","
                               " \"Precedence\": 9, \"Action\": \"allow\", \"JWT\": {\"Providers\":"
                               " [{\"Name\": \"okta\"}]}}]}";
    struct dec_intention *v;
    size_t n;
    char err[256];
    assert_int_equal(decode_intentions_match(body, strlen(body), "db", &v, &n, err, sizeof(err)),
                     0);
    t = intent_table_new(v, n, 1);
    dec_intentions_free(v, n);
    struct test_req r;
    struct intent_decision d =
        intent_eval_http(t, "", "", "web", mkreq(&r, "GET", "/", NULL, NULL));
    assert_int_equal(d.allow, 0);
    assert_int_equal(d.failed_closed, 1);
    assert_int_equal(intent_eval(t, "", "", "web").allow, 1);
    intent_table_unref(t);
}

/*
 * An L7 sameness-group rule matches callers of any partition only because membership is not
 * known here. Per request it must not allow (a non-member may be refused by the rules below)
 * and a miss must not fall to a default allow: its deny permissions deny, the rest is denied.
 */
static void test_http_sameness_group_l7_rule_fails_closed(void **state)
{
    (void)state;
    static const char body[] =
        "{\"db\": [{\"SourceName\": \"web\", \"DestinationName\": \"db\", \"Precedence\": 9,"
        " \"SourceSamenessGroup\": \"g\", \"Permissions\": [{\"Action\": \"deny\", \"HTTP\":"
        " {\"PathPrefix\": \"/admin\"}}, {\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": "
        "\"/\"}}]},"
        " {\"SourceName\": \"web\", \"DestinationName\": \"db\", \"Precedence\": 9,"
        " \"Action\": \"deny\"}]}";
    struct dec_intention *v;
    size_t n;
    char err[256];
    assert_int_equal(decode_intentions_match(body, strlen(body), "db", &v, &n, err, sizeof(err)),
                     0);
    struct intent_table *t = intent_table_new(v, n, 1);
    dec_intentions_free(v, n);
    struct test_req r;
    for (int part = 0; part <= 1; part++) {
        const char *partition = part ? "other" : "";
        struct intent_decision d =
            intent_eval_http(t, partition, "", "web", mkreq(&r, "GET", "/admin/x", NULL, NULL));
        assert_int_equal(d.allow, 0);
        assert_int_equal(d.perm, 0);
        d = intent_eval_http(t, partition, "", "web", mkreq(&r, "GET", "/public", NULL, NULL));
        assert_int_equal(d.allow, 0);
        assert_int_equal(d.failed_closed, 1);
        assert_string_equal(d.rule->src_sameness, "g");
    }
    intent_table_unref(t);
}

static void test_http_equal(void **state)
{
    (void)state;
    static const char *const variants[] = {
        "[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/a\", \"Methods\": [\"GET\"],"
        " \"Header\": [{\"Name\": \"x\", \"Exact\": \"1\"}]}}]",
        "[{\"Action\": \"deny\", \"HTTP\": {\"PathPrefix\": \"/a\", \"Methods\": [\"GET\"],"
        " \"Header\": [{\"Name\": \"x\", \"Exact\": \"1\"}]}}]",
        "[{\"Action\": \"allow\", \"HTTP\": {\"PathExact\": \"/a\", \"Methods\": [\"GET\"],"
        " \"Header\": [{\"Name\": \"x\", \"Exact\": \"1\"}]}}]",
        "[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/b\", \"Methods\": [\"GET\"],"
        " \"Header\": [{\"Name\": \"x\", \"Exact\": \"1\"}]}}]",
        "[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/a\", \"Methods\": [\"PUT\"],"
        " \"Header\": [{\"Name\": \"x\", \"Exact\": \"1\"}]}}]",
        "[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/a\", \"Methods\": [\"GET\"],"
        " \"Header\": [{\"Name\": \"x\", \"Exact\": \"1\", \"Invert\": true}]}}]",
        "[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/a\", \"Methods\": [\"GET\"],"
        " \"Header\": [{\"Name\": \"x\", \"Prefix\": \"1\"}]}}]",
        "[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/a\", \"Methods\": [\"GET\"],"
        " \"Header\": [{\"Name\": \"x\", \"Exact\": \"1\", \"IgnoreCase\": true}]}}]",
        "[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/a\", \"Methods\": [\"GET\"],"
        " \"Header\": [{\"Name\": \"y\", \"Exact\": \"1\"}]}}]",
        "[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/a\", \"Methods\": [\"GET\"]}}]",
        "[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/a\", \"Methods\": [\"GET\"],"
        " \"Header\": [{\"Name\": \"x\", \"Exact\": \"1\"}]}}, {\"Action\": \"deny\"}]",
        "[{\"Action\": \"allow\", \"HTTP\": {\"PathPrefix\": \"/a\", \"Methods\": [\"GET\"],"
        " \"Header\": [{\"Name\": \"x\", \"Exact\": \"1\"}]}, \"JWT\": {}}]",
    };
    for (size_t i = 0; i < ARRAY_SIZE(variants); i++) {
        struct intent_table *a = l7_table(variants[i], "deny", 0);
        for (size_t j = 0; j < ARRAY_SIZE(variants); j++) {
            struct intent_table *b = l7_table(variants[j], "deny", 0);
            if (intent_table_equal(a, b) != (i == j))
                fail_msg("variants %zu and %zu compare %s", i, j, i == j ? "unequal" : "equal");
            intent_table_unref(b);
        }
        intent_table_unref(a);
    }
}

static void test_http_describe(void **state)
{
    (void)state;
    struct intent_table *t = l7_table(
        "[{\"Action\": \"deny\", \"HTTP\": {\"PathRegex\": \"/adm.*\", \"Methods\": [\"GET\","
        " \"PUT\"], \"Header\": [{\"Name\": \"x-role\", \"Exact\": \"Ops\", \"IgnoreCase\": true},"
        " {\"Name\": \"x-debug\", \"Present\": true, \"Invert\": true}]}},"
        " {\"Action\": \"allow\", \"HTTP\": {\"PathRegex\": \"(?=a)\"}}]",
        NULL, 0);
    char buf[256];
    struct test_req r;
    const char *const h[] = {"x-role: OPS", NULL};
    struct intent_decision d =
        intent_eval_http(t, "", "", "web", mkreq(&r, "GET", "/admin", NULL, h));
    assert_int_equal(d.perm, 0);
    assert_string_equal(intent_perm_describe(&d.rule->perms[0], buf, sizeof(buf)),
                        "deny PathRegex \"/adm.*\" Header x-role Exact \"ops\" (any case) Header "
                        "x-debug not Present Methods GET,PUT");
    assert_string_equal(intent_describe(&d, buf, sizeof(buf)),
                        "intention web => db deny (permission 0, precedence 9)");
    assert_string_equal(intent_perm_describe(&d.rule->perms[1], buf, sizeof(buf)),
                        "allow PathRegex \"(?=a)\" [bad regex]");
    d = intent_eval_http(t, "", "", "web", mkreq(&r, "GET", "/x", NULL, NULL));
    assert_string_equal(intent_describe(&d, buf, sizeof(buf)),
                        "default policy deny (intention web => db matched, none of its 2 "
                        "permission(s) did, failed closed)");
    /* Truncation keeps the buffer terminated. */
    assert_string_equal(intent_perm_describe(&d.matched->perms[0], buf, 8), "deny Pa");
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
        cmocka_unit_test(test_http_path_matchers),
        cmocka_unit_test(test_http_header_matchers),
        cmocka_unit_test(test_http_all_conditions_and_methods),
        cmocka_unit_test(test_http_first_permission_and_default),
        cmocka_unit_test(test_http_l7_rule_hides_wildcard),
        cmocka_unit_test(test_http_l4_rules_per_request),
        cmocka_unit_test(test_http_bad_regex_fails_closed),
        cmocka_unit_test(test_http_regex_match_limit),
        cmocka_unit_test(test_http_unverifiable_conditions),
        cmocka_unit_test(test_http_sameness_group_l7_rule_fails_closed),
        cmocka_unit_test(test_http_equal),
        cmocka_unit_test(test_http_describe),
    };
    return cmocka_run_group_tests_name("intent", tests, NULL, NULL);
}
