/*
 * upstreams: per upstream, the discovery chain (or the polled prepared query) and one health
 * watch per chain target, reconciled with the configuration and with each new chain, and
 * turned into the targets and endpoint sets a snapshot carries.
 *
 * Warming: a chain whose resolvers' primary targets have not all had a first health answer
 * (a splitter or router adding a service, or the first chain) is held back, its targets'
 * watches running, while the chain in force keeps serving, until they have (or
 * UPSTREAMS_WARM_MS passed); then its targets and route table replace the old ones together.
 * Published at once, the snapshot in between sent the new target's requests to no endpoint
 * (503), as Envoy, which warms a new cluster before a route uses it, never does.
 */
#include "upstreams.h"
#include "decode.h"
#include "log.h"
#include "route.h"
#include "util.h"

#include <stdlib.h>
#include <string.h>

/* How long a new chain waits for its new targets' first health answers before it is put in
 * force anyway (Envoy's initial_fetch_timeout). */
#define UPSTREAMS_WARM_MS 15000

struct up_watch;

/* One target of an upstream and the health watch that feeds it. */
struct tgt_watch {
    char *wkey; /* the health query (and OnlyPassing): equal keys keep their watch */
    /* what a snapshot carries of it; its endpoints are the healthy ones, NULL until the first
     * answer */
    struct snap_target info;
    int only_passing;
    struct watch *watch; /* NULL for a prepared query's target */
    struct up_watch *up;
};

struct up_watch {
    char *key;
    char *request;           /* what feeds it (method, path, body): a change restarts it */
    struct watch *watch;     /* the discovery chain, or the polled prepared query */
    struct tgt_watch **tgts; /* primary first, then failovers in order */
    size_t n_tgts;
    struct limit_state *limit; /* admission state of its listener, across snapshots */
    struct outlier *outlier;   /* request limits and endpoints' passive health, likewise */
    int protocol_set;          /* Config.protocol given: the chain was compiled for it */
    int protocol;              /* effective: Config.protocol, else the chain's Protocol */
    /* compiled from the same chain as <tgts>, whose order its resolvers index; NULL for a
     * prepared query and until the first chain */
    struct route_table *routes;
    /* A chain received and not yet in force (warming): its targets (shared with <tgts> where
     * they kept their watch), route table and protocol; n_next_tgts is 0 when none waits. */
    struct tgt_watch **next_tgts;
    size_t n_next_tgts;
    struct route_table *next_routes;
    int next_protocol;
    struct loop_timer warm; /* bounds the wait (UPSTREAMS_WARM_MS) */
    /* Its first chain (or query answer) has gone in force, or the bound passed without it:
     * until then the proxy is not ready (upstreams_waiting()). */
    int started;
    int is_query; /* a prepared query's, polled (one target, no health watch) */
    struct upstreams *ups;
};

struct upstreams {
    struct agent *agent;
    struct watch_reach *reach;
    void (*changed)(void *data);
    void *data;
    struct up_watch **v; /* one per cfg.upstreams entry, same order */
    size_t n;
};

static void changed(struct upstreams *ups)
{
    ups->changed(ups->data);
}

/*
 * A service upstream resolves through its discovery chain (one blocking POST watch); each
 * chain target has its own health watch. A prepared-query upstream has one polled query and
 * one target without a watch of its own.
 */
static void tgt_free(struct tgt_watch *t)
{
    if (t == NULL)
        return;
    if (t->watch != NULL)
        watch_stop(t->watch);
    snap_target_dispose(&t->info);
    free(t->wkey);
    free(t);
}

/*
 * Keeps the endpoints Envoy would call healthy (consul-api.md 2.7): no critical check, and
 * with the subset's OnlyPassing no check other than passing. Takes ownership of <v>.
 */
static struct endpoint_set *healthy_set(struct dec_endpoint *v, size_t n, int only_passing)
{
    struct dec_endpoint *ok = xcalloc(n, sizeof(*ok)), *bad = xcalloc(n, sizeof(*bad));
    size_t n_ok = 0, n_bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (!v[i].critical && (!only_passing || v[i].passing))
            ok[n_ok++] = v[i];
        else
            bad[n_bad++] = v[i];
    }
    free(v);
    dec_endpoints_free(bad, n_bad);
    return endpoint_set_new(ok, n_ok);
}

static int tgt_in(struct tgt_watch *const *v, size_t n, const struct tgt_watch *t)
{
    for (size_t i = 0; i < n; i++)
        if (v[i] == t)
            return 1;
    return 0;
}

/* Whether target <i> of the waiting chain has had its first health answer. */
static int next_known(const struct up_watch *u, size_t i)
{
    return i >= u->n_next_tgts || u->next_tgts[i]->info.endpoints != NULL;
}

/*
 * The waiting chain's first target the chain waits for: the primary target of each of its
 * resolvers (the chain's first target without a table) that has had no health answer yet.
 * Failover targets are not waited for: they serve only when their primary has no healthy
 * endpoint, and one in a datacenter out of reach would hold every change for the whole bound.
 * NULL when there is none: the chain may go in force.
 */
static const struct tgt_watch *next_unanswered(const struct up_watch *u)
{
    size_t n = u->next_routes != NULL ? route_table_resolvers(u->next_routes) : 0;
    if (n == 0)
        return next_known(u, 0) ? NULL : u->next_tgts[0];
    for (size_t i = 0; i < n; i++) {
        const struct route_resolver *r = route_table_resolver(u->next_routes, i);
        if (r->n_targets > 0 && !next_known(u, r->targets[0]))
            return u->next_tgts[r->targets[0]];
    }
    return NULL;
}

static int next_warm(const struct up_watch *u)
{
    return next_unanswered(u) == NULL;
}

/* Frees the targets of <v> found in neither <keep1> nor <keep2>, then the array itself. */
static void tgts_drop(struct tgt_watch **v, size_t n, struct tgt_watch *const *keep1, size_t n1,
                      struct tgt_watch *const *keep2, size_t n2)
{
    for (size_t i = 0; i < n; i++)
        if (v[i] != NULL && !tgt_in(keep1, n1, v[i]) && !tgt_in(keep2, n2, v[i]))
            tgt_free(v[i]);
    free(v);
}

/* Forgets the waiting chain (a newer one replaces it, or the upstream goes): its targets that
 * the chain in force does not share stop. */
static void next_drop(struct up_watch *u)
{
    loop_timer_stop(agent_loop(u->ups->agent), &u->warm);
    tgts_drop(u->next_tgts, u->n_next_tgts, u->tgts, u->n_tgts, NULL, 0);
    u->next_tgts = NULL;
    u->n_next_tgts = 0;
    route_table_unref(u->next_routes);
    u->next_routes = NULL;
}

/* Puts the waiting chain in force: its targets and table replace the old ones together (the
 * table's resolvers index its targets), and the old targets it does not share stop. */
static void next_promote(struct up_watch *u)
{
    loop_timer_stop(agent_loop(u->ups->agent), &u->warm);
    tgts_drop(u->tgts, u->n_tgts, u->next_tgts, u->n_next_tgts, NULL, 0);
    u->tgts = u->next_tgts;
    u->n_tgts = u->n_next_tgts;
    u->next_tgts = NULL;
    u->n_next_tgts = 0;
    /* The routes' counters carry on by index (route_table_carry_stats()): a chain change must
     * not make a per-route Prometheus counter go back. */
    route_table_carry_stats(u->next_routes, u->routes);
    route_table_unref(u->routes);
    u->routes = u->next_routes;
    u->next_routes = NULL;
    u->protocol = u->next_protocol;
    u->started = 1;
}

/*
 * The wait for the new chain's targets is over: the chain goes in force with what is known
 * (a target still without an answer has no endpoint, and its requests get 503). At start-up
 * the same bound also ends the wait for the first chain or query answer, so that one upstream
 * the agent does not answer about cannot keep the proxy from ever being ready.
 */
static void on_warm_timeout(struct loop_timer *tm)
{
    struct up_watch *u = tm->data;
    if (!u->started) {
        const struct tgt_watch *t = u->n_next_tgts > 0 ? next_unanswered(u) : NULL;
        if (t != NULL)
            LOG_WARN("upstream %s: target %s of the first discovery chain has no health answer "
                     "after %u ms; ready without its endpoints",
                     u->key, t->info.id, (unsigned)UPSTREAMS_WARM_MS);
        else
            LOG_WARN("upstream %s: no %s after %u ms; ready without it", u->key,
                     u->is_query ? "answer to its prepared query" : "discovery chain",
                     (unsigned)UPSTREAMS_WARM_MS);
        u->started = 1;
        if (u->n_next_tgts > 0)
            next_promote(u);
        changed(u->ups);
        return;
    }
    if (u->n_next_tgts == 0)
        return;
    LOG_WARN("upstream %s: a target of the new discovery chain has no health answer after %u ms; "
             "putting the chain in force without its endpoints",
             u->key, (unsigned)UPSTREAMS_WARM_MS);
    next_promote(u);
    changed(u->ups);
}

static int on_target_health(void *data, const struct agent_response *resp)
{
    struct tgt_watch *t = data;
    char err[256];
    struct dec_endpoint *v;
    size_t n;
    int rc = decode_health_connect(resp->body, resp->body_len, &v, &n, err, sizeof(err));
    if (rc != 0) {
        enum log_level lvl = watch_reject_level(t->watch, err);
        LOG_AT(lvl, "upstream %s target %s: %s; keeping the previous endpoints", t->up->key,
               t->info.id, err);
        return rc;
    }
    struct endpoint_set *set = healthy_set(v, n, t->only_passing);
    /* The agent answers when anything of the service's health changes, a check's output
     * included: an answer that leaves the endpoints as they were publishes no snapshot (and
     * keeps the set, which the workers' balancing tables are keyed by). */
    int same = t->info.endpoints != NULL && endpoint_set_same(t->info.endpoints, set);
    LOG_AT(same ? LOG_LEVEL_DEBUG : LOG_LEVEL_INFO,
           "upstream %s target %s: %zu healthy endpoint(s) of %zu%s", t->up->key, t->info.id,
           set->n, n, same ? " (unchanged)" : "");
    if (same) {
        endpoint_set_unref(set);
    } else {
        endpoint_set_unref(t->info.endpoints);
        t->info.endpoints = set;
    }
    struct up_watch *u = t->up;
    int promoted = u->n_next_tgts > 0 && next_warm(u);
    if (promoted) {
        LOG_INFO("upstream %s: the new discovery chain's targets have their endpoints: in force",
                 u->key);
        next_promote(u);
    }
    /* A target only a waiting chain names changes no snapshot until that chain goes in force. */
    if (promoted || (!same && tgt_in(u->tgts, u->n_tgts, t)))
        changed(u->ups);
    return 0;
}

/* The health query of one chain target (consul-api.md 2.8, "Mapping targets"). */
static char *target_query(const struct dec_chain_target *ct)
{
    char *name = util_url_escape(ct->service), *dc = util_url_escape(ct->datacenter);
    char *filter = util_url_escape(ct->filter), *scope = agent_scope_query(ct->ns, ct->partition);
    char *peer = util_url_escape(ct->peer);
    char *path =
        xasprintf("/v1/health/connect/%s?cached%s%s%s%s%s%s%s", name, dc[0] ? "&dc=" : "", dc,
                  filter[0] ? "&filter=" : "", filter, scope, peer[0] ? "&peer=" : "", peer);
    free(name);
    free(dc);
    free(filter);
    free(scope);
    free(peer);
    return path;
}

static struct tgt_watch *tgt_new(struct up_watch *u, const char *wkey)
{
    struct tgt_watch *t = xcalloc(1, sizeof(*t));
    t->up = u;
    t->wkey = xstrdup(wkey);
    return t;
}

static void tgt_set_info(struct tgt_watch *t, const struct dec_chain_target *ct,
                         uint32_t chain_timeout_ms)
{
    struct endpoint_set *endpoints = t->info.endpoints; /* kept: the health query is the same */
    t->info.endpoints = NULL;
    snap_target_dispose(&t->info);
    t->info = (struct snap_target){
        .id = xstrdup(ct->id),
        .service = xstrdup(ct->service),
        .ns = xstrdup(ct->ns),
        .partition = xstrdup(ct->partition),
        .datacenter = xstrdup(ct->datacenter),
        .sni = xstrdup(ct->sni),
        .connect_timeout_ms = ct->connect_timeout_ms ? ct->connect_timeout_ms : chain_timeout_ms,
        .endpoints = endpoints,
    };
    t->only_passing = ct->only_passing;
}

/*
 * Makes the upstream's targets match a new chain: a target whose health query is unchanged
 * keeps its watch and endpoints (only its SNI, timeout and order are refreshed); new ones get
 * a watch; the others stop.
 */
static int on_chain(void *data, const struct agent_response *resp)
{
    struct up_watch *u = data;
    char err[512];
    struct dec_chain chain;
    int rc = decode_discovery_chain(resp->body, resp->body_len, &chain, err, sizeof(err));
    if (rc != 0) {
        enum log_level lvl = watch_reject_level(u->watch, err);
        LOG_AT(lvl, "upstream %s: discovery chain: %s; keeping the previous targets", u->key, err);
        return rc;
    }
    /* Targets whose health query is unchanged keep their watch and endpoints, whether they
     * serve now or belong to a chain still waiting; each serves one place of the new chain. */
    struct tgt_watch **fresh = xcalloc(chain.n_targets, sizeof(*fresh));
    for (size_t i = 0; i < chain.n_targets; i++) {
        const struct dec_chain_target *ct = &chain.targets[i];
        char *query = target_query(ct);
        char *wkey = xasprintf("%s%s", query, ct->only_passing ? " only-passing" : "");
        for (size_t k = 0; k < 2 && fresh[i] == NULL; k++) {
            struct tgt_watch **v = k == 0 ? u->next_tgts : u->tgts;
            size_t n = k == 0 ? u->n_next_tgts : u->n_tgts;
            for (size_t j = 0; j < n && fresh[i] == NULL; j++)
                if (strcmp(v[j]->wkey, wkey) == 0 && !tgt_in(fresh, i, v[j]))
                    fresh[i] = v[j];
        }
        if (fresh[i] == NULL) {
            struct tgt_watch *t = tgt_new(u, wkey);
            char *wname = xasprintf("endpoints %s", ct->id);
            struct watch_spec spec = {.name = wname,
                                      .method = "GET",
                                      .path = query,
                                      .block = WATCH_BY_INDEX,
                                      .reach = u->ups->reach};
            tgt_set_info(t, ct, chain.connect_timeout_ms);
            t->watch = watch_start(u->ups->agent, &spec, on_target_health, t);
            fresh[i] = t;
            free(wname);
            LOG_DEBUG("upstream %s: watching target %s: %s", u->key, ct->id, query);
        } else {
            tgt_set_info(fresh[i], ct, chain.connect_timeout_ms);
        }
        free(query);
        free(wkey);
    }
    /* A chain that was waiting gives way to this one: its targets this one does not name stop
     * (unless they serve now). */
    tgts_drop(u->next_tgts, u->n_next_tgts, u->tgts, u->n_tgts, fresh, chain.n_targets);
    route_table_unref(u->next_routes);
    u->next_tgts = fresh;
    u->n_next_tgts = chain.n_targets;
    /* The targets and the table change together: the table's resolvers index <fresh>. */
    u->next_routes = route_table_new(&chain, u->key);
    u->next_protocol = u->protocol;
    if (!u->protocol_set) {
        int p = proxycfg_protocol_from_name(chain.protocol != NULL ? chain.protocol : "");
        if (p < 0)
            LOG_WARN("upstream %s: discovery chain protocol \"%s\" is unknown; served as tcp",
                     u->key, LOG_ESC(chain.protocol));
        u->next_protocol = p < 0 ? PROTO_TCP : p;
    }
    /* A chain waits for its primary targets' first endpoints while the one in force, if any,
     * keeps serving. The first chain's protocol applies at once, so that the listener speaks
     * it from the start (requests get 503 until the targets come, as they would anyway). */
    if (u->n_tgts == 0 && u->routes == NULL)
        u->protocol = u->next_protocol;
    int wait = !next_warm(u);
    LOG_INFO("upstream %s: discovery chain %s: %zu target(s), primary %s, connect timeout %u ms, "
             "protocol %s, %zu route(s)%s%s",
             u->key, chain.service_name, chain.n_targets, chain.targets[0].id,
             (unsigned)chain.connect_timeout_ms, proxycfg_protocol_name(u->next_protocol),
             route_table_len(u->next_routes),
             route_table_broken(u->next_routes) > 0 ? " (some never match: see above)" : "",
             wait ? "; in force once its targets have their endpoints" : "");
    if (wait) {
        /* The bound runs from the first chain that had to wait, not from each newer one. */
        if (!loop_timer_armed(&u->warm))
            loop_timer_start(agent_loop(u->ups->agent), &u->warm, UPSTREAMS_WARM_MS);
    } else {
        next_promote(u);
    }
    dec_chain_dispose(&chain);
    changed(u->ups);
    return 0;
}

static int str_order(const char *a, const char *b)
{
    return strcmp(a != NULL ? a : "", b != NULL ? b : "");
}

/* qsort order of a prepared query's endpoints: by datacenter, node, service ID, address. */
static int query_endpoint_order(const void *pa, const void *pb)
{
    const struct dec_endpoint *a = pa, *b = pb;
    int c = str_order(a->node_datacenter, b->node_datacenter);
    if (c == 0)
        c = str_order(a->node, b->node);
    if (c == 0)
        c = str_order(a->service_id, b->service_id);
    if (c == 0)
        c = str_order(a->address, b->address);
    return c != 0 ? c : (a->port > b->port) - (a->port < b->port);
}

static int on_query(void *data, const struct agent_response *resp)
{
    struct up_watch *u = data;
    char err[256];
    struct dec_query q;
    int rc = decode_prepared_query(resp->body, resp->body_len, &q, err, sizeof(err));
    if (rc != 0) {
        enum log_level lvl = watch_reject_level(u->watch, err);
        LOG_AT(lvl, "upstream %s: prepared query: %s; keeping the previous endpoints", u->key, err);
        return rc;
    }
    struct tgt_watch *t = u->tgts[0];
    struct endpoint_set *set = healthy_set(q.nodes, q.n_nodes, 0);
    q.nodes = NULL;
    q.n_nodes = 0;
    /*
     * Polled, a query answers the same endpoints most of the time, but in another order (the
     * agent shuffles them unless the query sorts by distance), so each poll's body differed
     * and rebuilt the snapshot and the workers' balancing tables, keyed by the endpoint set.
     * In one order, the same endpoints publish nothing, as for a health answer
     * (on_target_health); the balancers do not read the order.
     */
    qsort(set->v, set->n, sizeof(*set->v), query_endpoint_order);
    int same = u->started && t->info.endpoints != NULL && endpoint_set_same(t->info.endpoints, set);
    LOG_AT(same ? LOG_LEVEL_DEBUG : LOG_LEVEL_INFO,
           "upstream %s: prepared query answered %zu endpoint(s) of %s in %s%s", u->key, set->n,
           q.service, q.datacenter, same ? " (unchanged)" : "");
    dec_query_dispose(&q);
    if (same) {
        endpoint_set_unref(set);
        return 0;
    }
    endpoint_set_unref(t->info.endpoints);
    t->info.endpoints = set;
    if (!u->started) {
        loop_timer_stop(agent_loop(u->ups->agent), &u->warm);
        u->started = 1;
    }
    changed(u->ups);
    return 0;
}

/*
 * The request that feeds an upstream, as a string: upstreams whose key and request are
 * unchanged keep their watches when the registration changes.
 */
static char *upstream_request(const struct upstream_cfg *c, struct watch_spec *spec)
{
    char *name = util_url_escape(c->destination_name);
    memset(spec, 0, sizeof(*spec));
    if (strcmp(c->destination_type, "prepared_query") == 0) {
        spec->method = "GET";
        spec->block = WATCH_POLL;
        spec->poll_ms = c->poll_interval_ms;
        spec->path = xasprintf("/v1/query/%s/execute?connect=true%s%s", name,
                               c->datacenter[0] ? "&dc=" : "", c->datacenter);
    } else {
        char *dc = util_url_escape(c->datacenter), *ns = util_url_escape(c->ns);
        spec->method = "POST";
        spec->block = WATCH_BY_INDEX;
        /* A refused chain is cured only by a new one; ?cached would keep answering it. */
        spec->block_on_rejected = 1;
        spec->path = xasprintf("/v1/discovery-chain/%s?cached%s%s%s%s", name,
                               dc[0] ? "&compile-dc=" : "", dc, ns[0] ? "&ns=" : "", ns);
        /* The upstream's Config.protocol, when set, compiles the chain for that protocol (as
         * Envoy's proxycfg does); else the chain's own protocol (service-defaults) is asked
         * for, and decides whether connections are served at L4 or L7. */
        char proto[64] = "", timeout[64] = "";
        if (c->protocol_set)
            snprintf(proto, sizeof(proto), "\"OverrideProtocol\":\"%s\"",
                     proxycfg_protocol_name(c->protocol));
        if (c->connect_timeout_set)
            snprintf(timeout, sizeof(timeout), "\"OverrideConnectTimeout\":\"%ums\"",
                     (unsigned)c->connect_timeout_ms);
        spec->body = xasprintf("{%s%s%s}", proto, proto[0] && timeout[0] ? "," : "", timeout);
        free(dc);
        free(ns);
    }
    free(name);
    return xasprintf("%s %s %u %s", spec->method, spec->path, (unsigned)spec->poll_ms,
                     spec->body ? spec->body : "");
}

static void up_watch_free(struct up_watch *u)
{
    if (u == NULL)
        return;
    if (u->watch != NULL)
        watch_stop(u->watch);
    next_drop(u);
    for (size_t i = 0; i < u->n_tgts; i++)
        tgt_free(u->tgts[i]);
    free(u->tgts);
    route_table_unref(u->routes);
    free(u->request);
    limit_state_unref(u->limit);
    outlier_unref(u->outlier);
    free(u->key);
    free(u);
}

/*
 * A new watch for upstream <c>. <old>, the same upstream's watch under another request (its
 * protocol or connect timeout changed), hands over its targets, their watches and endpoints,
 * and its listener's admission state: until the new chain answers, connections are served
 * from the endpoints known (a fresh start would have none, and answer 503 or refuse).
 */
static struct up_watch *up_watch_new(struct upstreams *ups, const struct upstream_cfg *c,
                                     struct up_watch *old)
{
    struct watch_spec spec;
    struct up_watch *u = xcalloc(1, sizeof(*u));
    u->key = xstrdup(c->key);
    u->ups = ups;
    loop_timer_init(&u->warm, on_warm_timeout, u);
    u->limit = old != NULL ? limit_state_ref(old->limit) : limit_state_new();
    u->outlier = old != NULL ? outlier_ref(old->outlier) : outlier_new();
    u->protocol_set = c->protocol_set;
    u->protocol = c->protocol_set ? c->protocol : PROTO_TCP;
    u->request = upstream_request(c, &spec);
    char *wname =
        xasprintf("%s %s", spec.block == WATCH_POLL ? "prepared query" : "discovery chain",
                  c->destination_name);
    spec.name = wname;
    spec.reach = ups->reach;
    /* A new upstream is waited for at start-up, for at most the chain's own bound; one that
     * takes over from <old> serves what <old> had. */
    u->started = old != NULL && old->started;
    if (!u->started)
        loop_timer_start(agent_loop(ups->agent), &u->warm, UPSTREAMS_WARM_MS);
    u->is_query = spec.block == WATCH_POLL;
    if (spec.block == WATCH_POLL) {
        /* The query's one target: identity and datacenter come from each entry. */
        struct dec_chain_target ct = {.id = c->destination_name,
                                      .service = "",
                                      .ns = "",
                                      .partition = "",
                                      .datacenter = "",
                                      .sni = ""};
        u->tgts = xcalloc(1, sizeof(*u->tgts));
        u->tgts[0] = tgt_new(u, "");
        tgt_set_info(u->tgts[0], &ct, 0);
        u->n_tgts = 1;
        if (old != NULL && old->n_tgts == 1) {
            u->tgts[0]->info.endpoints = old->tgts[0]->info.endpoints;
            old->tgts[0]->info.endpoints = NULL;
        }
        u->watch = watch_start(ups->agent, &spec, on_query, u);
    } else {
        if (old != NULL) {
            /* Their health watches keep running; on_chain keeps those still named. A chain
             * that was waiting is dropped: the new request brings its own. */
            next_drop(old);
            u->tgts = old->tgts;
            u->n_tgts = old->n_tgts;
            for (size_t i = 0; i < u->n_tgts; i++)
                u->tgts[i]->up = u;
            old->tgts = NULL;
            old->n_tgts = 0;
            u->routes = old->routes;
            old->routes = NULL;
        }
        u->watch = watch_start(ups->agent, &spec, on_chain, u);
    }
    free(wname);
    free((char *)spec.path);
    free((char *)spec.body);
    return u;
}

/* Each up_watch is its own allocation because its running watch holds a pointer to it. */
void upstreams_reconcile(struct upstreams *ups, const struct proxy_cfg *cfg)
{
    struct up_watch **fresh = xcalloc(cfg->n_upstreams, sizeof(*fresh));
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const struct upstream_cfg *c = &cfg->upstreams[i];
        struct watch_spec spec;
        char *request = upstream_request(c, &spec);
        free((char *)spec.path);
        free((char *)spec.body);
        for (size_t j = 0; j < ups->n && fresh[i] == NULL; j++) {
            if (ups->v[j] != NULL && strcmp(ups->v[j]->key, c->key) == 0 &&
                strcmp(ups->v[j]->request, request) == 0) {
                fresh[i] = ups->v[j];
                ups->v[j] = NULL;
            }
        }
        free(request);
        for (size_t j = 0; j < ups->n && fresh[i] == NULL; j++) {
            if (ups->v[j] != NULL && strcmp(ups->v[j]->key, c->key) == 0) {
                fresh[i] = up_watch_new(ups, c, ups->v[j]);
                up_watch_free(ups->v[j]);
                ups->v[j] = NULL;
            }
        }
        if (fresh[i] == NULL)
            fresh[i] = up_watch_new(ups, c, NULL);
    }
    for (size_t j = 0; j < ups->n; j++)
        up_watch_free(ups->v[j]);
    free(ups->v);
    ups->v = fresh;
    ups->n = cfg->n_upstreams;
}

struct upstreams *upstreams_new(struct agent *a, struct watch_reach *reach,
                                void (*on_change)(void *data), void *data)
{
    struct upstreams *ups = xcalloc(1, sizeof(*ups));
    ups->agent = a;
    ups->reach = reach;
    ups->changed = on_change;
    ups->data = data;
    return ups;
}

void upstreams_free(struct upstreams *ups)
{
    if (ups == NULL)
        return;
    for (size_t i = 0; i < ups->n; i++)
        up_watch_free(ups->v[i]);
    free(ups->v);
    free(ups);
}

void upstreams_parts(const struct upstreams *ups, size_t n, struct upstreams_parts *out)
{
    out->n = n;
    out->targets = xcalloc(n, sizeof(*out->targets));
    out->n_targets = xcalloc(n, sizeof(*out->n_targets));
    out->limits = xcalloc(n, sizeof(*out->limits));
    out->outliers = xcalloc(n, sizeof(*out->outliers));
    out->protocols = xcalloc(n, sizeof(*out->protocols));
    out->routes = xcalloc(n, sizeof(*out->routes));
    for (size_t i = 0; i < n && i < ups->n; i++) {
        const struct up_watch *u = ups->v[i];
        out->limits[i] = u->limit;
        out->outliers[i] = u->outlier;
        out->protocols[i] = u->protocol;
        out->routes[i] = u->routes;
        out->targets[i] = xcalloc(u->n_tgts, sizeof(**out->targets));
        out->n_targets[i] = u->n_tgts;
        for (size_t j = 0; j < u->n_tgts; j++)
            out->targets[i][j] = u->tgts[j]->info; /* borrowed: snapshot_new copies */
    }
}

void upstreams_parts_dispose(struct upstreams_parts *p)
{
    for (size_t i = 0; i < p->n; i++)
        free(p->targets[i]);
    free(p->targets);
    free(p->n_targets);
    free(p->limits);
    free(p->outliers);
    free(p->protocols);
    free(p->routes);
}

int upstreams_waiting(const struct upstreams *ups, char *why, size_t why_len)
{
    for (size_t i = 0; i < ups->n; i++) {
        const struct up_watch *u = ups->v[i];
        if (u->started)
            continue;
        const struct tgt_watch *t = u->n_next_tgts > 0 ? next_unanswered(u) : NULL;
        if (u->is_query)
            snprintf(why, why_len, "waiting for upstream %s: its prepared query", u->key);
        else if (t != NULL)
            snprintf(why, why_len,
                     "waiting for upstream %s: the first health answer of its target %s", u->key,
                     t->info.id);
        else
            snprintf(why, why_len, "waiting for upstream %s: its discovery chain", u->key);
        return 1;
    }
    return 0;
}

void upstreams_each_watch(const struct upstreams *ups, watch_visit_cb fn, void *data)
{
    for (size_t i = 0; i < ups->n; i++) {
        const struct up_watch *u = ups->v[i];
        char name[600];
        snprintf(name, sizeof(name), "upstream:%s", u->key);
        if (u->watch != NULL)
            fn(data, name, u->watch);
        for (size_t j = 0; j < u->n_tgts; j++) {
            snprintf(name, sizeof(name), "health:%s", u->tgts[j]->info.id);
            if (u->tgts[j]->watch != NULL)
                fn(data, name, u->tgts[j]->watch);
        }
        /* Those of a chain still waiting too (the ones it shares were visited above). */
        for (size_t j = 0; j < u->n_next_tgts; j++) {
            const struct tgt_watch *t = u->next_tgts[j];
            snprintf(name, sizeof(name), "health:%s", t->info.id);
            if (t->watch != NULL && !tgt_in(u->tgts, u->n_tgts, t))
                fn(data, name, t->watch);
        }
    }
}
