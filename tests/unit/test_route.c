/*
 * Unit tests for route: a discovery chain (as the agent renders it, decoded by decode.c)
 * compiled into a route table, and the two pure walks over it: route_match() (every match
 * kind, Invert, CaseInsensitive, query parameters, methods, first match and the catch-all, a
 * regex that does not compile) and route_split_pick() (weights, with a fixed-seed
 * distribution check); route_rewrite_len() and route_headers_apply() (PrefixRewrite and
 * header modifiers).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"
#include "route.h"
#include "util.h"

/* Three resolvers (a fails over to c) and a 90/10 splitter over a and b; the router's routes
 * are the test's. Durations as Consul 1.22 renders them: a resolver's RequestTimeout and a
 * cookie TTL in integer nanoseconds, everything else as strings. */
#define CHAIN_HEAD                                                                                 \
    "{\"Chain\": {\"ServiceName\": \"db\", \"Protocol\": \"http\", \"StartNode\": \"%s\", "        \
    "\"Nodes\": {"                                                                                 \
    "\"router:db\": {\"Type\": \"router\", \"Routes\": [%s]},"                                     \
    "\"splitter:db\": {\"Type\": \"splitter\", \"Splits\": ["                                      \
    "  {\"Weight\": 90, \"NextNode\": \"resolver:a\", \"Definition\": {\"Weight\": 90, "           \
    "   \"RequestHeaders\": {\"Set\": {\"x-split\": \"a\"}}}},"                                    \
    "  {\"Weight\": 10, \"NextNode\": \"resolver:b\", \"Definition\": {"                           \
    "   \"ResponseHeaders\": {\"Add\": {\"x-s\": \"2\"}, \"Remove\": [\"x-r\"]}}}]},"              \
    "\"resolver:a\": {\"Type\": \"resolver\", \"Resolver\": {\"Target\": \"a\", "                  \
    "  \"ConnectTimeout\": \"3s\", \"RequestTimeout\": 7000000000, "                               \
    "  \"Failover\": {\"Targets\": [\"c\"]}}, "                                                    \
    "  \"LoadBalancer\": {\"Policy\": \"ring_hash\", \"RingHashConfig\": "                         \
    "   {\"MinimumRingSize\": 1024, \"MaximumRingSize\": 8192}, \"HashPolicies\": ["               \
    "   {\"Field\": \"header\", \"FieldValue\": \"x-user\"},"                                      \
    "   {\"Field\": \"cookie\", \"FieldValue\": \"sess\", "                                        \
    "    \"CookieConfig\": {\"TTL\": 10000000000, \"Path\": \"/\"}},"                              \
    "   {\"SourceIP\": true, \"Terminal\": true}]}},"                                              \
    "\"resolver:b\": {\"Type\": \"resolver\", \"Resolver\": {\"Target\": \"b\", "                  \
    "  \"ConnectTimeout\": \"5s\"}, \"LoadBalancer\": {\"Policy\": \"least_request\", "            \
    "  \"LeastRequestConfig\": {\"ChoiceCount\": 3}}},"                                            \
    "\"resolver:c\": {\"Type\": \"resolver\", \"Resolver\": {\"Target\": \"c\"}}}, "               \
    "\"Targets\": {\"a\": {\"Service\": \"db\"}, \"b\": {\"Service\": \"db\"}, "                   \
    "\"c\": {\"Service\": \"db2\"}}}}"

/* A route of the router: its Match.HTTP body, Destination body and next node. */
#define ROUTE(match, dest, next)                                                                   \
    "{\"Definition\": {\"Match\": {\"HTTP\": {" match "}}, \"Destination\": {" dest "}}, "         \
    "\"NextNode\": \"" next "\"}"
/* The compiler's catch-all, last. */
#define CATCH_ALL ROUTE("\"PathPrefix\": \"/\"", "\"Service\": \"db\"", "splitter:db")

/* A route to resolver:b with this Match.HTTP. */
#define M(match) ROUTE(match, "", "resolver:b")

/* The table of a chain starting at <start> whose router has <routes> (NULL-terminated). */
static struct route_table *table_from(const char *start, const char *const *routes)
{
    size_t len = strlen(CHAIN_HEAD) + strlen(start) + 1, o = 0;
    for (size_t i = 0; routes[i] != NULL; i++)
        len += strlen(routes[i]) + 1;
    char *joined = xcalloc(1, len), *body = xmalloc(len), err[512];
    for (size_t i = 0; routes[i] != NULL; i++)
        o += (size_t)snprintf(joined + o, len - o, "%s%s", i > 0 ? "," : "", routes[i]);
    snprintf(body, len, CHAIN_HEAD, start, joined);
    struct dec_chain c;
    int rc = decode_discovery_chain(body, strlen(body), &c, err, sizeof(err));
    if (rc != 0)
        fail_msg("decode: %s", err);
    struct route_table *t = route_table_new(&c, "db");
    assert_null(c.routes);
    assert_null(c.resolvers);
    dec_chain_dispose(&c);
    free(joined);
    free(body);
    return t;
}

#define TABLE(...) table_from("router:db", (const char *const[]){__VA_ARGS__, NULL})

#define MAX_HDRS 8

/* A request: "METHOD /path?query" and up to MAX_HDRS "name: value" headers. */
struct req {
    struct route_req rq;
    struct http_header h[MAX_HDRS];
};

static struct http_slice sl(const char *s, size_t n)
{
    return (struct http_slice){s, n};
}

static const struct route_req *mkreq(struct req *r, const char *line, const char *const *hdrs)
{
    memset(r, 0, sizeof(*r));
    const char *sp = strchr(line, ' ');
    assert_non_null(sp);
    r->rq.method = sl(line, (size_t)(sp - line));
    const char *path = sp + 1, *q = strchr(path, '?');
    if (q != NULL) {
        r->rq.path = sl(path, (size_t)(q - path));
        r->rq.query = sl(q + 1, strlen(q + 1));
    } else {
        r->rq.path = sl(path, strlen(path));
    }
    for (size_t i = 0; hdrs != NULL && hdrs[i] != NULL; i++) {
        assert_true(i < MAX_HDRS);
        const char *colon = strchr(hdrs[i], ':');
        assert_non_null(colon);
        const char *v = colon + 1;
        while (*v == ' ')
            v++;
        if (strncmp(hdrs[i], "host", 4) == 0 && colon - hdrs[i] == 4)
            r->rq.authority = sl(v, strlen(v));
        r->h[i].name = sl(hdrs[i], (size_t)(colon - hdrs[i]));
        r->h[i].value = sl(v, strlen(v));
        r->rq.nheaders = i + 1;
    }
    r->rq.headers = r->h;
    return &r->rq;
}

/* The index of the route <line> (with headers <hdrs>) takes, or -1 for none. */
static long pick(const struct route_table *t, const char *line, const char *const *hdrs)
{
    struct req r;
    const struct route *m = route_match(t, mkreq(&r, line, hdrs));
    return m != NULL ? (long)m->index : -1;
}

#define H(...) ((const char *const[]){__VA_ARGS__, NULL})

static void test_path_exact_prefix_regex(void **state)
{
    (void)state;
    struct route_table *t = TABLE(M("\"PathExact\": \"/exact\""), M("\"PathPrefix\": \"/pre\""),
                                  M("\"PathRegex\": \"/re[gx]+/[0-9]+\""), CATCH_ALL);
    assert_int_equal(route_table_len(t), 4);
    assert_int_equal(route_table_broken(t), 0);
    assert_int_equal(pick(t, "GET /exact", NULL), 0);
    assert_int_equal(pick(t, "GET /exact/", NULL), 3);
    assert_int_equal(pick(t, "GET /exac", NULL), 3);
    assert_int_equal(pick(t, "GET /Exact", NULL), 3);     /* case-sensitive without the flag */
    assert_int_equal(pick(t, "GET /exact?x=1", NULL), 0); /* the query is not the path */
    assert_int_equal(pick(t, "GET /pre", NULL), 1);
    assert_int_equal(pick(t, "GET /prefix/deeper", NULL), 1);
    assert_int_equal(pick(t, "GET /pr", NULL), 3);
    assert_int_equal(pick(t, "GET /PREfix", NULL), 3);
    assert_int_equal(pick(t, "GET /regx/42", NULL), 2);
    assert_int_equal(pick(t, "GET /regx/42/", NULL), 3); /* a full match, not a search */
    assert_int_equal(pick(t, "GET /x/regx/42", NULL), 3);
    assert_int_equal(pick(t, "GET /", NULL), 3);
    route_table_unref(t);
}

/* CaseInsensitive folds PathExact and PathPrefix (Envoy's case_sensitive: false), not
 * PathRegex, which Envoy ignores it for. */
static void test_case_insensitive(void **state)
{
    (void)state;
    struct route_table *t =
        TABLE(M("\"PathExact\": \"/Exact\", \"CaseInsensitive\": true"),
              M("\"PathPrefix\": \"/PRE\", \"CaseInsensitive\": true"),
              M("\"PathRegex\": \"/rx\", \"CaseInsensitive\": true"), CATCH_ALL);
    assert_int_equal(pick(t, "GET /exact", NULL), 0);
    assert_int_equal(pick(t, "GET /EXACT", NULL), 0);
    assert_int_equal(pick(t, "GET /exacT/", NULL), 3);
    assert_int_equal(pick(t, "GET /pre/x", NULL), 1);
    assert_int_equal(pick(t, "GET /PrE", NULL), 1);
    assert_int_equal(pick(t, "GET /rx", NULL), 2);
    assert_int_equal(pick(t, "GET /RX", NULL), 3);
    const struct route *r = route_table_route(t, 0);
    assert_int_equal(r->case_insensitive, 1);
    assert_int_equal(route_table_route(t, 3)->case_insensitive, 0);
    route_table_unref(t);
}

static void test_headers(void **state)
{
    (void)state;
    /* One route per header match kind, plain and inverted, each on its own path. */
    struct route_table *t = TABLE(
        M("\"PathExact\": \"/present\", \"Header\": [{\"Name\": \"x-d\", \"Present\": true}]"),
        M("\"PathExact\": \"/exact\", \"Header\": [{\"Name\": \"x-d\", \"Exact\": \"exact\"}]"),
        M("\"PathExact\": \"/prefix\", \"Header\": [{\"Name\": \"x-d\", \"Prefix\": \"pre\"}]"),
        M("\"PathExact\": \"/suffix\", \"Header\": [{\"Name\": \"x-d\", \"Suffix\": \"fix\"}]"),
        M("\"PathExact\": \"/regex\", \"Header\": [{\"Name\": \"x-d\", \"Regex\": \"re[gx]+\"}]"),
        M("\"PathExact\": \"/not-present\", "
          "\"Header\": [{\"Name\": \"x-d\", \"Present\": true, \"Invert\": true}]"),
        M("\"PathExact\": \"/not-exact\", "
          "\"Header\": [{\"Name\": \"x-d\", \"Exact\": \"exact\", \"Invert\": true}]"),
        M("\"PathExact\": \"/not-regex\", "
          "\"Header\": [{\"Name\": \"x-d\", \"Regex\": \"re[gx]+\", \"Invert\": true}]"),
        M("\"PathExact\": \"/host\", \"Header\": [{\"Name\": \"Host\", \"Suffix\": "
          "\".internal\"}]"),
        M("\"PathExact\": \"/two\", "
          "\"Header\": [{\"Name\": \"x-a\", \"Exact\": \"1\"}, {\"Name\": \"x-b\", \"Present\": "
          "true}]"),
        CATCH_ALL);
    const long all = 10;
    assert_int_equal(route_table_len(t), all + 1);
    /* Present */
    assert_int_equal(pick(t, "GET /present", H("x-d: anything")), 0);
    assert_int_equal(pick(t, "GET /present", H("X-D: ")), 0); /* names ignore case; empty ok */
    assert_int_equal(pick(t, "GET /present", H("x-other: 1")), all);
    assert_int_equal(pick(t, "GET /present", NULL), all);
    /* Exact */
    assert_int_equal(pick(t, "GET /exact", H("x-d: exact")), 1);
    assert_int_equal(pick(t, "GET /exact", H("x-d: Exact")), all);
    assert_int_equal(pick(t, "GET /exact", H("x-d: exactly")), all);
    /* several values are matched joined with "," */
    assert_int_equal(pick(t, "GET /exact", H("x-d: ex", "x-d: act")), all);
    assert_int_equal(pick(t, "GET /prefix", H("x-d: pre", "x-d: x")), 2);
    /* Prefix, Suffix */
    assert_int_equal(pick(t, "GET /prefix", H("x-d: prefix")), 2);
    assert_int_equal(pick(t, "GET /prefix", H("x-d: xprefix")), all);
    assert_int_equal(pick(t, "GET /suffix", H("x-d: suffix")), 3);
    assert_int_equal(pick(t, "GET /suffix", H("x-d: suffixx")), all);
    /* Regex: full match */
    assert_int_equal(pick(t, "GET /regex", H("x-d: regx")), 4);
    assert_int_equal(pick(t, "GET /regex", H("x-d: regxy")), all);
    /* Invert: an inverted Present matches an absent header; other inverted kinds need the
     * header (Envoy's HeaderMatcher). */
    assert_int_equal(pick(t, "GET /not-present", NULL), 5);
    assert_int_equal(pick(t, "GET /not-present", H("x-d: 1")), all);
    assert_int_equal(pick(t, "GET /not-exact", H("x-d: other")), 6);
    assert_int_equal(pick(t, "GET /not-exact", H("x-d: exact")), all);
    assert_int_equal(pick(t, "GET /not-exact", NULL), all);
    assert_int_equal(pick(t, "GET /not-regex", H("x-d: nope")), 7);
    assert_int_equal(pick(t, "GET /not-regex", H("x-d: regx")), all);
    assert_int_equal(pick(t, "GET /not-regex", NULL), all);
    /* Host names the authority */
    assert_int_equal(pick(t, "GET /host", H("host: db.internal")), 8);
    assert_int_equal(pick(t, "GET /host", H("host: db.example")), all);
    /* every condition must hold */
    assert_int_equal(pick(t, "GET /two", H("x-a: 1", "x-b: 2")), 9);
    assert_int_equal(pick(t, "GET /two", H("x-a: 1")), all);
    assert_int_equal(pick(t, "GET /two", H("x-a: 2", "x-b: 2")), all);
    route_table_unref(t);
}

static void test_query_params(void **state)
{
    (void)state;
    struct route_table *t = TABLE(M("\"QueryParam\": [{\"Name\": \"p\", \"Present\": true}]"),
                                  M("\"QueryParam\": [{\"Name\": \"e\", \"Exact\": \"a b\"}]"),
                                  M("\"QueryParam\": [{\"Name\": \"e\", \"Exact\": \"1\"}]"),
                                  M("\"QueryParam\": [{\"Name\": \"r\", \"Regex\": \"v[0-9]+\"}]"),
                                  M("\"PathPrefix\": \"/both\", "
                                    "\"QueryParam\": [{\"Name\": \"x\", \"Exact\": \"1\"}, "
                                    "{\"Name\": \"y\", \"Present\": true}]"),
                                  CATCH_ALL);
    const long all = 5;
    assert_int_equal(pick(t, "GET /?p", NULL), 0); /* no '=': present with an empty value */
    assert_int_equal(pick(t, "GET /?a=1&p=", NULL), 0);
    assert_int_equal(pick(t, "GET /?pp=1", NULL), all);
    assert_int_equal(pick(t, "GET /?P=1", NULL), all); /* names are exact */
    assert_int_equal(pick(t, "GET /", NULL), all);
    assert_int_equal(pick(t, "GET /?e=1", NULL), 2);
    assert_int_equal(pick(t, "GET /?e=11", NULL), all);
    /* the first parameter of the name decides */
    assert_int_equal(pick(t, "GET /?e=2&e=1", NULL), all);
    assert_int_equal(pick(t, "GET /?e=1&e=2", NULL), 2);
    /* raw: nothing is percent-decoded */
    assert_int_equal(pick(t, "GET /?e=a%20b", NULL), all);
    assert_int_equal(pick(t, "GET /?e=a b", NULL), 1);
    assert_int_equal(pick(t, "GET /?r=v12", NULL), 3);
    assert_int_equal(pick(t, "GET /?r=v12x", NULL), all);
    assert_int_equal(pick(t, "GET /both?x=1&y", NULL), 4);
    assert_int_equal(pick(t, "GET /both?x=1", NULL), all);
    assert_int_equal(pick(t, "GET /other?x=1&y", NULL), all);
    route_table_unref(t);
}

static void test_methods(void **state)
{
    (void)state;
    struct route_table *t =
        TABLE(M("\"PathPrefix\": \"/m\", \"Methods\": [\"GET\", \"PUT\"]"), CATCH_ALL);
    assert_int_equal(pick(t, "GET /m", NULL), 0);
    assert_int_equal(pick(t, "PUT /m/x", NULL), 0);
    assert_int_equal(pick(t, "POST /m", NULL), 1);
    assert_int_equal(pick(t, "get /m", NULL), 1); /* compared exactly */
    assert_int_equal(pick(t, "GETX /m", NULL), 1);
    route_table_unref(t);
}

/* First match wins; a route without conditions matches every request; without a catch-all a
 * request may match nothing. */
static void test_first_match_and_catch_all(void **state)
{
    (void)state;
    struct route_table *t = TABLE(M("\"PathPrefix\": \"/a\""),
                                  ROUTE("\"PathPrefix\": \"/a/b\"", "", "resolver:c"), CATCH_ALL);
    assert_int_equal(pick(t, "GET /a/b", NULL), 0); /* the earlier, shorter prefix wins */
    assert_int_equal(pick(t, "DELETE /zzz", NULL), 2);
    route_table_unref(t);

    t = TABLE(M(""));
    assert_int_equal(pick(t, "OPTIONS /anything?at=all", H("x: y")), 0);
    route_table_unref(t);

    t = TABLE(M("\"PathExact\": \"/only\""));
    assert_int_equal(pick(t, "GET /only", NULL), 0);
    assert_int_equal(pick(t, "GET /other", NULL), -1);
    route_table_unref(t);
}

/* A regex Consul accepted but rx.h refuses (a lookahead, a backreference) makes its route
 * never match, counted, whatever the request; the request falls through to the next route. */
static void test_broken_regex_never_matches(void **state)
{
    (void)state;
    struct route_table *t =
        TABLE(M("\"PathRegex\": \"/(?=x).*\""),
              M("\"PathPrefix\": \"/h\", "
                "\"Header\": [{\"Name\": \"x\", \"Regex\": \"(a)\\\\1\", \"Invert\": true}]"),
              M("\"QueryParam\": [{\"Name\": \"q\", \"Regex\": \"(?<=a)b\"}]"), CATCH_ALL);
    assert_int_equal(route_table_broken(t), 3);
    assert_int_equal(route_table_route(t, 0)->broken, 1);
    assert_int_equal(route_table_route(t, 3)->broken, 0);
    assert_int_equal(pick(t, "GET /x", NULL), 3);
    assert_int_equal(pick(t, "GET /h", H("x: zz")), 3); /* inverted: still no match */
    assert_int_equal(pick(t, "GET /?q=b", NULL), 3);
    route_table_unref(t);
}

/* The routes' destinations and the resolvers come through as decoded: timeouts (strings and
 * integer nanoseconds), retries, header modifiers, targets with failover, load balancing. */
static void test_destination_and_resolvers(void **state)
{
    (void)state;
    struct route_table *t = TABLE(
        ROUTE("\"PathPrefix\": \"/api\"",
              "\"Service\": \"db\", \"PrefixRewrite\": \"/v2/\", \"RequestTimeout\": \"2s\", "
              "\"IdleTimeout\": \"1.5s\", \"NumRetries\": 3, \"RetryOnConnectFailure\": true, "
              "\"RetryOn\": [\"5xx\", \"reset\", \"unavailable\"], "
              "\"RetryOnStatusCodes\": [503, 429], "
              "\"RequestHeaders\": {\"Add\": {\"x-add\": \"1\"}, \"Set\": {\"x-set\": \"2\"}, "
              "\"Remove\": [\"x-rm\"]}, \"ResponseHeaders\": {\"Set\": {\"x-r\": \"v\"}}",
              "resolver:a"),
        CATCH_ALL);
    const struct route *r = route_table_route(t, 0);
    const struct dec_chain_route *d = r->def;
    assert_string_equal(d->prefix_rewrite, "/v2/");
    assert_int_equal(d->request_timeout_ms, 2000);
    assert_int_equal(d->idle_timeout_ms, 1500);
    assert_int_equal(d->num_retries, 3);
    assert_int_equal(d->retry_on_connect_failure, 1);
    assert_int_equal(d->retry_on, (1u << DEC_RETRY_ON_IDX_5XX) | (1u << DEC_RETRY_ON_IDX_RESET) |
                                      (1u << DEC_RETRY_ON_IDX_UNAVAILABLE));
    assert_int_equal(d->n_retry_status_codes, 2);
    assert_int_equal(d->retry_status_codes[0], 503);
    assert_int_equal(d->retry_status_codes[1], 429);
    assert_int_equal(d->request_headers.n_add, 1);
    assert_string_equal(d->request_headers.add[0].name, "x-add");
    assert_string_equal(d->request_headers.add[0].value, "1");
    assert_string_equal(d->request_headers.set[0].name, "x-set");
    assert_string_equal(d->request_headers.remove[0], "x-rm");
    assert_string_equal(d->response_headers.set[0].value, "v");
    assert_string_equal(r->next_node, "resolver:a");
    /* straight to a resolver: one split of 100 */
    assert_int_equal(r->n_splits, 1);
    assert_true(r->splits[0].weight == 100.0);
    const struct route_resolver *a = route_table_resolver(t, r->splits[0].resolver);
    assert_string_equal(a->name, "resolver:a");
    assert_int_equal(a->connect_timeout_ms, 3000);
    assert_int_equal(a->request_timeout_ms, 7000);
    assert_int_equal(a->lb->policy, DEC_LB_RING_HASH);
    assert_int_equal(a->lb->ring_min, 1024);
    assert_int_equal(a->lb->ring_max, 8192);
    assert_int_equal(a->lb->n_hash, 3);
    assert_int_equal(a->lb->hash[0].field, DEC_HASH_HEADER);
    assert_string_equal(a->lb->hash[0].field_value, "x-user");
    assert_int_equal(a->lb->hash[1].field, DEC_HASH_COOKIE);
    assert_int_equal(a->lb->hash[1].cookie_ttl_ms, 10000);
    assert_string_equal(a->lb->hash[1].cookie_path, "/");
    assert_int_equal(a->lb->hash[2].source_ip, 1);
    assert_int_equal(a->lb->hash[2].terminal, 1);
    /* a's targets: its own, then its failover, as indices into the chain's target list (the
     * catch-all's splitter first: a, c, then b) */
    assert_int_equal(a->n_targets, 2);
    assert_int_equal(a->targets[0], 0);
    assert_int_equal(a->targets[1], 1);
    /* the catch-all: the splitter's two splits, with their header modifiers */
    const struct route *c = route_table_route(t, 1);
    assert_int_equal(c->n_splits, 2);
    assert_string_equal(route_table_resolver(t, c->splits[0].resolver)->name, "resolver:a");
    const struct route_resolver *b = route_table_resolver(t, c->splits[1].resolver);
    assert_string_equal(b->name, "resolver:b");
    assert_int_equal(b->targets[0], 2);
    assert_int_equal(b->lb->policy, DEC_LB_LEAST_REQUEST);
    assert_int_equal(b->lb->choice_count, 3);
    assert_string_equal(c->splits[0].request_headers->set[0].value, "a");
    assert_int_equal(c->splits[1].response_headers->n_add, 1);
    assert_string_equal(c->splits[1].response_headers->remove[0], "x-r");
    assert_int_equal(c->def->request_timeout_ms, 0); /* not set */
    /* each resolver decoded once, however many routes lead to it */
    assert_int_equal(route_table_resolvers(t), 2);
    route_table_unref(t);
}

/* A chain that starts at a splitter or a resolver routes every request through one route. */
static void test_start_at_splitter_or_resolver(void **state)
{
    (void)state;
    struct route_table *t = table_from("splitter:db", (const char *const[]){CATCH_ALL, NULL});
    assert_int_equal(route_table_len(t), 1);
    assert_int_equal(pick(t, "PATCH /what?ever", NULL), 0);
    assert_int_equal(route_table_route(t, 0)->n_splits, 2);
    assert_int_equal(route_table_route(t, 0)->total_weight, 10000);
    route_table_unref(t);

    t = table_from("resolver:c", (const char *const[]){CATCH_ALL, NULL});
    assert_int_equal(route_table_len(t), 1);
    assert_int_equal(pick(t, "GET /", NULL), 0);
    const struct route *r = route_table_route(t, 0);
    assert_int_equal(r->n_splits, 1);
    assert_string_equal(route_table_resolver(t, r->splits[0].resolver)->name, "resolver:c");
    assert_int_equal(route_table_resolvers(t), 1);
    route_table_unref(t);
}

/* route_split_pick: each split owns a slice of [0, total) proportional to its weight. */
static void test_split_weights(void **state)
{
    (void)state;
    struct route_table *t = table_from("splitter:db", (const char *const[]){CATCH_ALL, NULL});
    const struct route *r = route_table_route(t, 0);
    /* 90/10: draws 0..8999 pick a, 9000..9999 b, and the draw wraps at the total */
    assert_ptr_equal(route_split_pick(r, 0), &r->splits[0]);
    assert_ptr_equal(route_split_pick(r, 8999), &r->splits[0]);
    assert_ptr_equal(route_split_pick(r, 9000), &r->splits[1]);
    assert_ptr_equal(route_split_pick(r, 9999), &r->splits[1]);
    assert_ptr_equal(route_split_pick(r, 10000), &r->splits[0]);
    assert_ptr_equal(route_split_pick(r, UINT64_MAX), &r->splits[0]); /* 2^64-1 % 10000 = 1615 */
    /* a fixed-seed distribution over 100,000 draws: 90 % +- 0.5 % */
    uint64_t x = 0x9e3779b97f4a7c15u;
    size_t n_a = 0, n = 100000;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        n_a += route_split_pick(r, x) == &r->splits[0];
    }
    assert_in_range(n_a, 89500, 90500);
    route_table_unref(t);

    /* 33.33 x 3 (Envoy's own example): a total of 9999, each a third; 0 never picked; all 0:
     * nothing to pick. */
    static const char three[] =
        "{\"Chain\": {\"ServiceName\": \"db\", \"StartNode\": \"s\", \"Nodes\": {"
        "\"s\": {\"Type\": \"splitter\", \"Splits\": [{\"Weight\": 33.33, \"NextNode\": \"r\"},"
        "{\"Weight\": 0, \"NextNode\": \"r\"}, {\"Weight\": 33.33, \"NextNode\": \"r\"},"
        "{\"Weight\": 33.33, \"NextNode\": \"r\"}]},"
        "\"z\": {\"Type\": \"splitter\", \"Splits\": [{\"Weight\": 0, \"NextNode\": \"r\"}]},"
        "\"r\": {\"Type\": \"resolver\", \"Resolver\": {\"Target\": \"a\"}}}, "
        "\"Targets\": {\"a\": {\"Service\": \"db\"}}}}";
    struct dec_chain c;
    char err[256];
    assert_int_equal(decode_discovery_chain(three, strlen(three), &c, err, sizeof(err)), 0);
    t = route_table_new(&c, "three");
    dec_chain_dispose(&c);
    r = route_table_route(t, 0);
    assert_int_equal(r->total_weight, 9999);
    size_t counts[4] = {0};
    for (uint64_t i = 0; i < 9999; i++)
        counts[route_split_pick(r, i) - r->splits]++;
    assert_int_equal(counts[0], 3333);
    assert_int_equal(counts[1], 0);
    assert_int_equal(counts[2], 3333);
    assert_int_equal(counts[3], 3333);
    route_table_unref(t);

    char *zero = xstrdup(three);
    memcpy(strstr(zero, "\"StartNode\": \"s\"") + 14, "z", 1);
    assert_int_equal(decode_discovery_chain(zero, strlen(zero), &c, err, sizeof(err)), 0);
    t = route_table_new(&c, "zero");
    dec_chain_dispose(&c);
    assert_null(route_split_pick(route_table_route(t, 0), 5));
    route_table_unref(t);
    free(zero);
}

/* The table outlives the chain it came from and is shared by reference. */
static void test_refcount(void **state)
{
    (void)state;
    struct route_table *t = TABLE(CATCH_ALL);
    assert_ptr_equal(route_table_ref(t), t);
    route_table_unref(t);
    assert_int_equal(pick(t, "GET /", NULL), 0);
    route_table_unref(t);
    route_table_unref(NULL);
}

/* PrefixRewrite replaces what the route matched: a prefix, a whole exact or regex path, "/"
 * without a path condition; nothing without a rewrite or with one a request line cannot
 * carry. */
static void test_rewrite_len(void **state)
{
    (void)state;
    struct route_table *t = TABLE(
        ROUTE("\"PathPrefix\": \"/api/\", \"CaseInsensitive\": true", "\"PrefixRewrite\": \"/v2/\"",
              "resolver:b"),
        ROUTE("\"PathExact\": \"/old\"", "\"PrefixRewrite\": \"/new\"", "resolver:b"),
        ROUTE("\"PathRegex\": \"/r.*\"", "\"PrefixRewrite\": \"/x\"", "resolver:b"),
        ROUTE("\"Header\": [{\"Name\": \"a\", \"Present\": true}]", "\"PrefixRewrite\": \"/h/\"",
              "resolver:b"),
        ROUTE("\"PathPrefix\": \"/sp\"", "\"PrefixRewrite\": \"/a b\"", "resolver:b"), CATCH_ALL);
    assert_int_equal(route_rewrite_len(route_table_route(t, 0), sl("/API/x", 6)), 5);
    assert_int_equal(route_rewrite_len(route_table_route(t, 0), sl("/ap", 3)), 0);
    assert_int_equal(route_rewrite_len(route_table_route(t, 1), sl("/old", 4)), 4);
    assert_int_equal(route_rewrite_len(route_table_route(t, 2), sl("/rab", 4)), 4);
    assert_int_equal(route_rewrite_len(route_table_route(t, 3), sl("/q", 2)), 1);
    assert_int_equal(route_rewrite_len(route_table_route(t, 3), sl("*", 1)), 0);
    assert_int_equal(route_rewrite_len(route_table_route(t, 4), sl("/sp", 3)), 0);
    assert_int_equal(route_rewrite_len(route_table_route(t, 5), sl("/q", 2)), 0);
    route_table_unref(t);
}

static int has(const struct http_header *f, size_t n, const char *name, const char *value)
{
    int count = 0;
    for (size_t i = 0; i < n; i++)
        if (!(f[i].flags & HTTP_HDR_HOP) && f[i].name.len == strlen(name) &&
            strncasecmp(f[i].name.p, name, f[i].name.len) == 0 && f[i].value.len == strlen(value) &&
            memcmp(f[i].value.p, value, f[i].value.len) == 0)
            count++;
    return count;
}

/* Remove, then Add, then Set (which replaces an Add of the same level too); the framing's and
 * the connection's fields are never touched. */
static void test_headers_apply(void **state)
{
    (void)state;
    struct dec_header_kv add[] = {{"X-A", "1"}, {"X-S", "added"}, {"content-length", "9"}};
    struct dec_header_kv set[] = {{"x-s", "set"}, {"Host", "evil"}};
    char *rm[] = {"x-r", "Transfer-Encoding", "x-none"};
    struct dec_header_mods mods = {add, 3, set, 2, rm, 3};
    struct http_header f[16] = {
        {.name = {"Host", 4}, .value = {"db", 2}},
        {.name = {"x-a", 3}, .value = {"0", 1}},
        {.name = {"X-R", 3}, .value = {"gone", 4}},
        {.name = {"x-s", 3}, .value = {"old", 3}},
        {.name = {"transfer-encoding", 17}, .value = {"chunked", 7}},
    };
    size_t n = 5;
    assert_int_equal(route_headers_added(&mods), 5);
    route_headers_apply(&mods, f, &n);
    assert_int_equal(n, 8); /* X-A, X-S and x-s appended; content-length and Host refused */
    assert_int_equal(has(f, n, "x-a", "0"), 1);
    assert_int_equal(has(f, n, "x-a", "1"), 1);
    assert_int_equal(has(f, n, "x-r", "gone"), 0);
    assert_int_equal(has(f, n, "x-s", "old") + has(f, n, "x-s", "added"), 0);
    assert_int_equal(has(f, n, "x-s", "set"), 1);
    assert_int_equal(has(f, n, "host", "db"), 1);
    assert_int_equal(has(f, n, "transfer-encoding", "chunked"), 1);
    assert_int_equal(has(f, n, "content-length", "9"), 0);
    struct dec_header_mods none = {0};
    route_headers_apply(&none, f, &n);
    assert_int_equal(n, 8);
}

/* A split's modifiers apply first, then its route's: the route's Set wins, as in Envoy. */
static void test_headers_modified_order(void **state)
{
    (void)state;
    struct route_table *t = TABLE(
        ROUTE("\"PathPrefix\": \"/a\"",
              "\"RequestHeaders\": {\"Set\": {\"x-split\": \"route\"}, \"Add\": {\"x-r\": \"1\"}}",
              "splitter:db"),
        CATCH_ALL);
    const struct route *r = route_table_route(t, 0), *all = route_table_route(t, 1);
    struct http_header in[1] = {{.name = {"x-split", 7}, .value = {"caller", 6}}};
    size_t n = 0;
    struct http_header *f = route_headers_modified(r, &r->splits[0], 0, in, 1, &n);
    assert_non_null(f);
    assert_int_equal(has(f, n, "x-split", "route"), 1);
    assert_int_equal(has(f, n, "x-split", "a") + has(f, n, "x-split", "caller"), 0);
    assert_int_equal(has(f, n, "x-r", "1"), 1);
    free(f);
    /* The second split's ResponseHeaders: Add x-s, Remove x-r. */
    struct http_header rs[1] = {{.name = {"X-R", 3}, .value = {"v", 1}}};
    f = route_headers_modified(r, &r->splits[1], 1, rs, 1, &n);
    assert_non_null(f);
    assert_int_equal(has(f, n, "x-s", "2"), 1);
    assert_int_equal(has(f, n, "x-r", "v"), 0);
    free(f);
    /* Nothing to modify, or no route: NULL. */
    assert_null(route_headers_modified(all, &all->splits[1], 0, in, 1, &n));
    assert_null(route_headers_modified(NULL, NULL, 0, in, 1, &n));
    route_table_unref(t);
}

/* Each route counts its requests by status class, retries and timeouts, shared by every user
 * of the table. */
static void test_route_count(void **state)
{
    (void)state;
    struct route_table *t = TABLE(M("\"PathPrefix\": \"/a\""), CATCH_ALL);
    const struct route *a = route_table_route(t, 0), *all = route_table_route(t, 1);
    route_count(a, 200, 0, 0);
    route_count(a, 204, 2, 0);
    route_count(a, 503, 1, 0);
    route_count(all, 0, 0, 1);
    route_count(all, 999, 0, 0);
    assert_int_equal(atomic_load(&a->stats->requests[2]), 2);
    assert_int_equal(atomic_load(&a->stats->requests[5]), 1);
    assert_int_equal(atomic_load(&a->stats->requests[0]), 0);
    assert_int_equal(atomic_load(&a->stats->retries), 3);
    assert_int_equal(atomic_load(&a->stats->timeouts), 0);
    assert_int_equal(atomic_load(&all->stats->requests[0]), 2);
    assert_int_equal(atomic_load(&all->stats->timeouts), 1);
    route_table_unref(t);
}

/*
 * A changed chain's table counts on from the one it replaces, by route index (the metric's
 * label): before, its counters started at zero and /metrics' per-route counters went back.
 * Counters of routes the new table does not have go with the old table.
 */
static void test_route_stats_carried(void **state)
{
    (void)state;
    struct route_table *old = TABLE(M("\"PathPrefix\": \"/a\""), CATCH_ALL);
    route_count(route_table_route(old, 0), 200, 1, 0);
    route_count(route_table_route(old, 1), 504, 0, 1);
    struct route_table *grown =
        TABLE(M("\"PathPrefix\": \"/a\""), M("\"PathPrefix\": \"/b\""), CATCH_ALL);
    route_table_carry_stats(grown, old);
    route_table_carry_stats(grown, NULL); /* no previous table: nothing changes */
    const struct route *a = route_table_route(grown, 0), *b = route_table_route(grown, 1);
    const struct route *all = route_table_route(grown, 2);
    assert_int_equal(atomic_load(&a->stats->requests[2]), 1);
    assert_int_equal(atomic_load(&a->stats->retries), 1);
    assert_int_equal(atomic_load(&b->stats->requests[5]), 1); /* index 1 was the catch-all */
    assert_int_equal(atomic_load(&b->stats->timeouts), 1);
    assert_int_equal(atomic_load(&all->stats->requests[5]), 0);
    /* The old table goes (its sessions done): the carried counters stay with the new one. */
    route_table_unref(old);
    route_count(a, 200, 0, 0);
    assert_int_equal(atomic_load(&a->stats->requests[2]), 2);
    struct route_table *shrunk = TABLE(CATCH_ALL);
    route_table_carry_stats(shrunk, grown);
    assert_int_equal(atomic_load(&route_table_route(shrunk, 0)->stats->requests[2]), 2);
    route_table_unref(grown);
    route_count(route_table_route(shrunk, 0), 200, 0, 0);
    assert_int_equal(atomic_load(&route_table_route(shrunk, 0)->stats->requests[2]), 3);
    route_table_unref(shrunk);
}

/* The retry policy and timeouts one outbound request (mux_h1) or stream (mux_h2) follows: the
 * route's RequestTimeout, else the resolver's, else 15 s; a policy with NumRetries (or Envoy's
 * 1); which answers it retries; the jittered, doubling, capped back-off. */
static void test_route_policy(void **state)
{
    (void)state;
    struct route_policy p;
    struct route_resolver rs = {.request_timeout_ms = 7000};
    route_policy_init(&p, NULL, NULL);
    assert_int_equal(p.timeout_ms, ROUTE_TIMEOUT_DEFAULT_MS);
    assert_int_equal(p.retries_left, 0);
    route_policy_init(&p, NULL, &rs);
    assert_int_equal(p.timeout_ms, 7000);

    uint16_t codes[] = {418};
    struct dec_chain_route d = {.request_timeout_ms = 500,
                                .idle_timeout_ms = 300,
                                .retry_on =
                                    ROUTE_RETRY_BIT(GATEWAY_ERROR) | ROUTE_RETRY_BIT(UNAVAILABLE),
                                .retry_status_codes = codes,
                                .n_retry_status_codes = 1};
    struct route r = {.def = &d};
    route_policy_init(&p, &r, &rs);
    assert_int_equal(p.timeout_ms, 500);
    assert_int_equal(p.idle_ms, 300);
    assert_int_equal(p.retries_left, 1); /* a policy without NumRetries: Envoy's one retry */
    d.num_retries = 3;
    d.retry_on_connect_failure = 1;
    route_policy_init(&p, &r, &rs);
    assert_int_equal(p.retries_left, 3);
    assert_true(p.retry_on & ROUTE_RETRY_BIT(CONNECT_FAILURE));

    struct http_header g[] = {{.name = {"grpc-status", 11}, .value = {"14", 2}}};
    struct http_header g4[] = {{.name = {"grpc-status", 11}, .value = {"4", 1}}};
    assert_true(route_policy_retries_status(&p, 503, NULL, 0));
    assert_false(route_policy_retries_status(&p, 500, NULL, 0)); /* gateway-error: 502-504 */
    assert_true(route_policy_retries_status(&p, 418, NULL, 0));
    assert_true(route_policy_retries_status(&p, 200, g, 1));
    assert_false(route_policy_retries_status(&p, 200, g4, 1));
    assert_false(route_policy_retries_status(&p, 200, NULL, 0));

    /* Back-off: below 25, 50, 100, 200, then 250 ms; each spends a retry. */
    uint32_t caps[] = {25, 50, 100, 200, 250, 250};
    p.retries_left = 6;
    for (size_t i = 0; i < 6; i++) {
        assert_int_equal(route_policy_backoff_ms(&p, 999999), caps[i] - 1);
        assert_int_equal(p.retries_left, 5 - i);
    }
    assert_int_equal(route_policy_backoff_ms(&p, 0), 0);
    assert_int_equal(p.retries_left, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_path_exact_prefix_regex),
        cmocka_unit_test(test_case_insensitive),
        cmocka_unit_test(test_headers),
        cmocka_unit_test(test_query_params),
        cmocka_unit_test(test_methods),
        cmocka_unit_test(test_first_match_and_catch_all),
        cmocka_unit_test(test_broken_regex_never_matches),
        cmocka_unit_test(test_destination_and_resolvers),
        cmocka_unit_test(test_start_at_splitter_or_resolver),
        cmocka_unit_test(test_split_weights),
        cmocka_unit_test(test_refcount),
        cmocka_unit_test(test_rewrite_len),
        cmocka_unit_test(test_headers_apply),
        cmocka_unit_test(test_route_count),
        cmocka_unit_test(test_route_stats_carried),
        cmocka_unit_test(test_headers_modified_order),
        cmocka_unit_test(test_route_policy),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
