/*
 * fuzz_decode: a libFuzzer target that gives one input to every decoder, and compiles any
 * intention list it yields into a table and evaluates it, and any discovery chain into a
 * route table that it walks.
 *
 * Beyond "no crash, no leak" it checks the decoders' contract: on success every string member
 * is non-NULL; on failure the output is zeroed and the message is set.
 *
 *   make fuzz FUZZ_SECONDS=60           (every target; this one is build/fuzz/fuzz_decode)
 *   build/fuzz/fuzz_decode -max_len=65536 tests/fuzz/corpus/decode
 *
 * tests/unit/test_fuzz_replay.c includes this file to replay the committed corpus with gcc.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"
#include "intent.h"
#include "route.h"
#include "util.h"

int fuzz_decode_one(const uint8_t *data, size_t size);

#undef FUZZ_CHECK
#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_decode: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);  \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static int all_zero(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != 0)
            return 0;
    return 1;
}

/* Touches the whole string so ASan sees a missing terminator. */
static void check_str(const char *s)
{
    FUZZ_CHECK(s != NULL);
    FUZZ_CHECK(strlen(s) < SIZE_MAX);
}

static void check_kvs(const struct dec_kv *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        check_str(v[i].key);
        check_str(v[i].str);
        FUZZ_CHECK(v[i].type >= DEC_KV_STRING && v[i].type <= DEC_KV_OTHER);
    }
}

static void fuzz_roots(const char *buf, size_t len)
{
    struct dec_roots r;
    char err[256] = "";
    if (decode_roots(buf, len, &r, err, sizeof(err)) != 0) {
        FUZZ_CHECK(all_zero(&r, sizeof(r)) && err[0] != '\0');
        return;
    }
    check_str(r.active_root_id);
    FUZZ_CHECK(r.trust_domain[0] != '\0');
    FUZZ_CHECK(r.n_roots > 0);
    for (size_t i = 0; i < r.n_roots; i++) {
        check_str(r.roots[i].id);
        check_str(r.roots[i].name);
        FUZZ_CHECK(r.roots[i].root_cert_pem[0] != '\0');
    }
    dec_roots_dispose(&r);
}

static void fuzz_leaf(const char *buf, size_t len)
{
    struct dec_leaf l;
    char err[256] = "";
    if (decode_leaf(buf, len, &l, err, sizeof(err)) != 0) {
        FUZZ_CHECK(all_zero(&l, sizeof(l)) && err[0] != '\0');
        return;
    }
    FUZZ_CHECK(l.cert_pem[0] != '\0' && l.key_pem[0] != '\0');
    check_str(l.serial);
    check_str(l.service);
    check_str(l.service_uri);
    check_str(l.valid_after);
    check_str(l.valid_before);
    dec_leaf_dispose(&l);
}

static void fuzz_service(const char *buf, size_t len)
{
    struct dec_service s;
    char err[256] = "";
    if (decode_agent_service(buf, len, &s, err, sizeof(err)) != 0) {
        FUZZ_CHECK(all_zero(&s, sizeof(s)) && err[0] != '\0');
        return;
    }
    const char *strs[] = {s.kind,
                          s.id,
                          s.service,
                          s.address,
                          s.socket_path,
                          s.datacenter,
                          s.ns,
                          s.partition,
                          s.content_hash,
                          s.destination_service_name,
                          s.destination_service_id,
                          s.local_service_address,
                          s.local_service_socket_path,
                          s.mode};
    for (size_t i = 0; i < ARRAY_SIZE(strs); i++)
        check_str(strs[i]);
    FUZZ_CHECK(s.port >= 0 && s.port <= 65535);
    check_kvs(s.config, s.n_config);
    for (size_t i = 0; i < s.n_upstreams; i++) {
        const struct dec_upstream *u = &s.upstreams[i];
        FUZZ_CHECK(u->destination_type[0] != '\0' && u->destination_name[0] != '\0');
        check_str(u->destination_namespace);
        check_str(u->destination_partition);
        check_str(u->destination_peer);
        check_str(u->datacenter);
        check_str(u->local_bind_address);
        check_str(u->local_bind_socket_path);
        check_str(u->local_bind_socket_mode);
        check_kvs(u->config, u->n_config);
    }
    FUZZ_CHECK(s.n_expose_paths <= DEC_EXPOSE_PATHS_MAX);
    for (size_t i = 0; i < s.n_expose_paths; i++) {
        const struct dec_expose_path *p = &s.expose_paths[i];
        check_str(p->path);
        check_str(p->protocol);
        FUZZ_CHECK(strlen(p->path) <= DEC_EXPOSE_PATH_MAX);
        FUZZ_CHECK(p->listener_port >= 0 && p->listener_port <= 65535);
        FUZZ_CHECK(p->local_path_port >= 0 && p->local_path_port <= 65535);
    }
    dec_service_dispose(&s);
}

static void fuzz_checks(const char *buf, size_t len)
{
    struct dec_check *v;
    size_t n;
    char err[256] = "";
    if (decode_agent_checks(buf, len, "web", &v, &n, err, sizeof(err)) != 0) {
        FUZZ_CHECK(v == NULL && n == 0 && err[0] != '\0');
        return;
    }
    for (size_t i = 0; i < n; i++) {
        FUZZ_CHECK(v[i].check_id[0] != '\0' && strcmp(v[i].service_id, "web") == 0);
        check_str(v[i].type);
        check_str(v[i].status);
        check_str(v[i].output);
        FUZZ_CHECK(v[i].exposed_port >= 0 && v[i].exposed_port <= 65535);
    }
    dec_checks_free(v, n);
}

static void fuzz_sidecar(const char *buf, size_t len)
{
    char *id = NULL;
    char err[256] = "";
    if (decode_sidecar_for(buf, len, "web", &id, err, sizeof(err)) != 0) {
        FUZZ_CHECK(id == NULL && err[0] != '\0');
        return;
    }
    check_str(id);
    free(id);
}

static void fuzz_intentions(const char *buf, size_t len)
{
    struct dec_intention *v;
    size_t n;
    char err[256] = "";
    if (decode_intentions_match(buf, len, "db", &v, &n, err, sizeof(err)) != 0) {
        FUZZ_CHECK(v == NULL && n == 0 && err[0] != '\0');
        return;
    }
    for (size_t i = 0; i < n; i++) {
        check_str(v[i].id);
        check_str(v[i].description);
        check_str(v[i].source_peer);
        check_str(v[i].source_sameness_group);
        check_str(v[i].source_partition);
        check_str(v[i].source_ns);
        check_str(v[i].destination_ns);
        check_str(v[i].action);
        FUZZ_CHECK(v[i].source_name[0] != '\0' && v[i].destination_name[0] != '\0');
    }
    struct intent_table *t = intent_table_new(v, n, 0);
    struct intent_table *again = intent_table_new(v, n, 0);
    dec_intentions_free(v, n);
    FUZZ_CHECK(intent_table_len(t) == n);
    FUZZ_CHECK(intent_table_equal(t, again));
    static const char *const callers[][3] = {
        {"", "", "web"}, {"default", "default", "*"}, {"team1", "billing", "api"}, {"", "", ""}};
    for (size_t i = 0; i < ARRAY_SIZE(callers); i++) {
        char desc[512];
        struct intent_decision d = intent_eval(t, callers[i][0], callers[i][1], callers[i][2]);
        FUZZ_CHECK(d.rule == NULL || d.rule->reach != INTENT_REACH_NONE);
        FUZZ_CHECK(d.rule == NULL || !d.rule->has_permissions || !d.allow);
        check_str(intent_describe(&d, desc, sizeof(desc)));
    }
    intent_table_unref(again);
    intent_table_unref(t);
}

static void fuzz_health(const char *buf, size_t len)
{
    struct dec_endpoint *v;
    size_t n;
    char err[256] = "";
    if (decode_health_connect(buf, len, &v, &n, err, sizeof(err)) != 0) {
        FUZZ_CHECK(v == NULL && n == 0 && err[0] != '\0');
        return;
    }
    for (size_t i = 0; i < n; i++) {
        check_str(v[i].node);
        check_str(v[i].node_datacenter);
        check_str(v[i].address);
        check_str(v[i].socket_path);
        check_str(v[i].service_id);
        check_str(v[i].ns);
        check_str(v[i].partition);
        FUZZ_CHECK(v[i].identity_service[0] != '\0');
        FUZZ_CHECK(v[i].address[0] != '\0' || v[i].socket_path[0] != '\0');
        FUZZ_CHECK(!(v[i].passing && v[i].critical));
    }
    dec_endpoints_free(v, n);
}

static void fuzz_chain(const char *buf, size_t len)
{
    struct dec_chain ch;
    char err[256] = "";
    if (decode_discovery_chain(buf, len, &ch, err, sizeof(err)) != 0) {
        FUZZ_CHECK(all_zero(&ch, sizeof(ch)) && err[0] != '\0');
        return;
    }
    FUZZ_CHECK(ch.service_name[0] != '\0');
    check_str(ch.protocol);
    FUZZ_CHECK(ch.n_targets > 0 && ch.connect_timeout_ms > 0);
    for (size_t i = 0; i < ch.n_targets; i++) {
        const struct dec_chain_target *t = &ch.targets[i];
        FUZZ_CHECK(t->id[0] != '\0' && t->service[0] != '\0');
        for (size_t j = 0; j < i; j++)
            FUZZ_CHECK(strcmp(ch.targets[j].id, t->id) != 0);
        check_str(t->service_subset);
        check_str(t->ns);
        check_str(t->partition);
        check_str(t->datacenter);
        check_str(t->peer);
        check_str(t->sni);
        check_str(t->filter);
    }
    /* The routing: every index in range, every route with a split; then a walk. */
    FUZZ_CHECK(ch.n_routes > 0 && ch.n_resolvers > 0);
    for (size_t i = 0; i < ch.n_routes; i++) {
        const struct dec_chain_route *r = &ch.routes[i];
        check_str(r->next_node);
        check_str(r->path);
        check_str(r->prefix_rewrite);
        FUZZ_CHECK(r->n_splits > 0);
        for (size_t j = 0; j < r->n_splits; j++)
            FUZZ_CHECK(r->splits[j].resolver < ch.n_resolvers && r->splits[j].weight >= 0 &&
                       r->splits[j].weight <= 100);
    }
    for (size_t i = 0; i < ch.n_resolvers; i++) {
        FUZZ_CHECK(ch.resolvers[i].n_targets > 0);
        for (size_t j = 0; j < ch.resolvers[i].n_targets; j++)
            FUZZ_CHECK(ch.resolvers[i].targets[j] < ch.n_targets);
    }
    struct route_table *rt = route_table_new(&ch, "fuzz");
    dec_chain_dispose(&ch);
    static const struct http_header hdrs[] = {{{"x-d", 3}, {"regx", 4}, 0}};
    const struct route_req rq = {.method = {"GET", 3},
                                 .path = {"/api/regx", 9},
                                 .query = {"q=1&r&s=abc", 11},
                                 .authority = {"db", 2},
                                 .headers = hdrs,
                                 .nheaders = 1};
    const struct route *r = route_match(rt, &rq);
    if (r != NULL) {
        const struct route_split *sp = route_split_pick(r, (uint64_t)len * 2654435761u);
        FUZZ_CHECK(sp == NULL || sp->resolver < route_table_resolvers(rt));
    }
    route_table_unref(rt);
    uint64_t ms;
    char *dur = strndup(buf, len < 64 ? len : 64);
    FUZZ_CHECK(dur != NULL);
    if (decode_duration_ms(dur, &ms) != 0)
        FUZZ_CHECK(ms == 0);
    free(dur);
}

static void fuzz_query(const char *buf, size_t len)
{
    struct dec_query q;
    char err[256] = "";
    if (decode_prepared_query(buf, len, &q, err, sizeof(err)) != 0) {
        FUZZ_CHECK(all_zero(&q, sizeof(q)) && err[0] != '\0');
        return;
    }
    check_str(q.service);
    check_str(q.datacenter);
    for (size_t i = 0; i < q.n_nodes; i++) {
        FUZZ_CHECK(q.nodes[i].identity_service[0] != '\0');
        check_str(q.nodes[i].node_datacenter);
        FUZZ_CHECK(q.nodes[i].address[0] != '\0' || q.nodes[i].socket_path[0] != '\0');
    }
    dec_query_dispose(&q);
}

static void fuzz_authorize(const char *buf, size_t len)
{
    char reason[64], err[256] = "";
    int allowed = -1;
    int rc = decode_authorize(buf, len, &allowed, reason, sizeof(reason), err, sizeof(err));
    if (rc == 0) {
        FUZZ_CHECK(allowed == 0 || allowed == 1);
        FUZZ_CHECK(strlen(reason) < sizeof(reason));
    } else {
        FUZZ_CHECK(allowed == 0);
        FUZZ_CHECK(err[0] != '\0');
    }
}

static void fuzz_mesh(const char *buf, size_t len)
{
    struct mesh_http_cfg m;
    char err[256] = "";
    int rc = decode_mesh_http(buf, len, &m, err, sizeof(err));
    if (rc == 0) {
        FUZZ_CHECK(m.disable_path_normalization == 0 || m.disable_path_normalization == 1);
        FUZZ_CHECK(m.merge_slashes == 0 || m.merge_slashes == 1);
        FUZZ_CHECK(m.escaped_slash <= PATHNORM_SLASH_UNESCAPE_REDIRECT);
        FUZZ_CHECK(m.underscore <= PATHNORM_UNDERSCORE_DROP);
    } else {
        FUZZ_CHECK(all_zero(&m, sizeof(m)) && err[0] != '\0');
    }
}

int fuzz_decode_one(const uint8_t *data, size_t size)
{
    const char *buf = (const char *)data;
    fuzz_roots(buf, size);
    fuzz_leaf(buf, size);
    fuzz_service(buf, size);
    fuzz_checks(buf, size);
    fuzz_sidecar(buf, size);
    fuzz_intentions(buf, size);
    fuzz_health(buf, size);
    fuzz_chain(buf, size);
    fuzz_query(buf, size);
    fuzz_authorize(buf, size);
    fuzz_mesh(buf, size);
    return 0;
}

#ifndef FUZZ_REPLAY
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_decode_one(data, size);
}
#endif
