/*
 * route: the compiled route table and its walk.
 *
 * Matching is what Consul's generated Envoy routes amount to (agent/xds/routes.go,
 * makeRouteMatchForDiscoveryRoute): first route in order whose path specifier, header
 * matchers (Methods become a ":method" matcher), and query parameter matchers all hold. The
 * splits are Envoy's weighted clusters: Consul scales each percent weight by 100 to an
 * integer, and Envoy draws over the sum.
 *
 * A regex Consul accepted but connectd cannot use (RE2 syntax rx.h refuses) cannot make the
 * table fail: refusing the chain would freeze every other routing change too. Its route is
 * marked broken and never matches, so its requests fall to a later route (usually the
 * catch-all) rather than to a wrong one that a broken condition would have chosen. A regex
 * that hits its match limit makes its condition false for that request, likewise.
 */
#include "route.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "h1parse.h"
#include "log.h"
#include "rx.h"
#include "util.h"

struct route_table {
    atomic_uint refs;
    struct route *routes;
    size_t n_routes;
    struct route_resolver *resolvers;
    size_t n_resolvers;
    size_t broken;
    /* What the table owns of its chain; the routes and resolvers above point into these. */
    struct dec_chain_route *defs;
    struct dec_chain_resolver *res_defs;
};

/* Compiles one pattern; one that does not compile leaves *rx NULL, marks the route broken and
 * is logged once, naming the upstream, the route and the condition. */
static void rx_broken(struct route_table *t, struct route *r, const char *what, const char *where,
                      const char *pattern, const char *err)
{
    r->broken = 1;
    t->broken++;
    LOG_WARN("upstream %s: route %zu %s %s is not usable: %s; the route never matches",
             LOG_ESC(what), r->index, where, LOG_ESC(pattern), err);
}

static void compile_rx(struct route_table *t, struct route *r, const char *what, const char *where,
                       const char *pattern, struct rx **rx)
{
    char err[200];
    if (rx_compile(pattern, strlen(pattern), rx, err, sizeof(err)) != 0)
        rx_broken(t, r, what, where, pattern, err);
}

static void route_init(struct route_table *t, struct route *r, const struct dec_chain_route *d,
                       const char *what)
{
    r->def = d;
    r->stats = xcalloc(1, sizeof(*r->stats));
    atomic_init(&r->stats->refs, 1);
    r->next_node = d->next_node != NULL ? d->next_node : "";
    r->path_match = d->path_match;
    r->path = d->path != NULL ? d->path : "";
    r->path_len = strlen(r->path);
    r->case_insensitive = d->case_insensitive != 0;
    if (r->path_match == DEC_PATH_REGEX)
        compile_rx(t, r, what, "PathRegex", r->path, &r->path_rx);
    r->n_headers = d->n_headers;
    r->headers = xcalloc(d->n_headers ? d->n_headers : 1, sizeof(*r->headers));
    for (size_t i = 0; i < d->n_headers; i++) {
        char err[200];
        if (hdr_cond_init(&r->headers[i], &d->headers[i], err, sizeof(err)) != 0)
            rx_broken(t, r, what, "Header Regex", r->headers[i].value, err);
    }
    r->n_query = d->n_query;
    r->query = xcalloc(d->n_query ? d->n_query : 1, sizeof(*r->query));
    for (size_t i = 0; i < d->n_query; i++) {
        struct route_query_cond *q = &r->query[i];
        q->name = d->query[i].name;
        q->name_len = strlen(q->name);
        q->match = d->query[i].match;
        q->value = d->query[i].value;
        q->value_len = strlen(q->value);
        if (q->match == DEC_QUERY_REGEX)
            compile_rx(t, r, what, "QueryParam Regex", q->value, &q->rx);
    }
    r->methods = d->methods;
    r->n_methods = d->n_methods;
    r->n_splits = d->n_splits;
    r->splits = xcalloc(d->n_splits ? d->n_splits : 1, sizeof(*r->splits));
    uint32_t cum = 0;
    for (size_t i = 0; i < d->n_splits; i++) {
        struct route_split *s = &r->splits[i];
        s->weight = d->splits[i].weight;
        /* Consul sends percents with up to two decimals; Envoy gets them times 100. The
         * decoder bounds each to [0, 100], so the sum cannot overflow. */
        cum += (uint32_t)(s->weight * 100.0 + 0.5);
        s->cum = cum;
        s->resolver = d->splits[i].resolver;
        s->request_headers = &d->splits[i].request_headers;
        s->response_headers = &d->splits[i].response_headers;
    }
    r->total_weight = cum;
}

struct route_table *route_table_new(struct dec_chain *chain, const char *what)
{
    struct route_table *t = xcalloc(1, sizeof(*t));
    atomic_init(&t->refs, 1);
    t->defs = chain->routes;
    t->n_routes = chain->n_routes;
    t->res_defs = chain->resolvers;
    t->n_resolvers = chain->n_resolvers;
    chain->routes = NULL;
    chain->n_routes = 0;
    chain->resolvers = NULL;
    chain->n_resolvers = 0;
    t->resolvers = xcalloc(t->n_resolvers ? t->n_resolvers : 1, sizeof(*t->resolvers));
    for (size_t i = 0; i < t->n_resolvers; i++) {
        const struct dec_chain_resolver *d = &t->res_defs[i];
        t->resolvers[i] = (struct route_resolver){
            .name = d->name,
            .targets = d->targets,
            .n_targets = d->n_targets,
            .connect_timeout_ms = d->connect_timeout_ms,
            .request_timeout_ms = d->request_timeout_ms,
            .lb = &d->lb,
        };
    }
    t->routes = xcalloc(t->n_routes ? t->n_routes : 1, sizeof(*t->routes));
    for (size_t i = 0; i < t->n_routes; i++) {
        t->routes[i].index = i;
        route_init(t, &t->routes[i], &t->defs[i], what != NULL ? what : "");
    }
    return t;
}

static void stats_unref(struct route_stats *st)
{
    if (atomic_fetch_sub_explicit(&st->refs, 1, memory_order_acq_rel) == 1)
        free(st);
}

void route_table_carry_stats(struct route_table *t, const struct route_table *prev)
{
    for (size_t i = 0; t != NULL && prev != NULL && i < t->n_routes && i < prev->n_routes; i++) {
        struct route_stats *st = prev->routes[i].stats;
        atomic_fetch_add_explicit(&st->refs, 1, memory_order_relaxed);
        stats_unref(t->routes[i].stats);
        t->routes[i].stats = st;
    }
}

struct route_table *route_table_ref(struct route_table *t)
{
    atomic_fetch_add_explicit(&t->refs, 1, memory_order_relaxed);
    return t;
}

void route_table_unref(struct route_table *t)
{
    if (t == NULL || atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) != 1)
        return;
    for (size_t i = 0; i < t->n_routes; i++) {
        struct route *r = &t->routes[i];
        rx_free(r->path_rx);
        for (size_t j = 0; j < r->n_headers; j++)
            hdr_cond_dispose(&r->headers[j]);
        free(r->headers);
        for (size_t j = 0; j < r->n_query; j++)
            rx_free(r->query[j].rx);
        free(r->query);
        free(r->splits);
        stats_unref(r->stats);
    }
    free(t->routes);
    free(t->resolvers);
    dec_chain_routes_free(t->defs, t->n_routes);
    dec_chain_resolvers_free(t->res_defs, t->n_resolvers);
    free(t);
}

size_t route_table_len(const struct route_table *t)
{
    return t->n_routes;
}

const struct route *route_table_route(const struct route_table *t, size_t i)
{
    return i < t->n_routes ? &t->routes[i] : NULL;
}

size_t route_table_resolvers(const struct route_table *t)
{
    return t->n_resolvers;
}

const struct route_resolver *route_table_resolver(const struct route_table *t, size_t i)
{
    return i < t->n_resolvers ? &t->resolvers[i] : NULL;
}

size_t route_table_broken(const struct route_table *t)
{
    return t->broken;
}

/* ---- per request ---- */

/* Equal bytes; with <fold>, ASCII case aside (<b> as written, both sides folded). */
static int bytes_eq(const char *a, const char *b, size_t n, int fold)
{
    if (!fold)
        return memcmp(a, b, n) == 0;
    for (size_t i = 0; i < n; i++)
        if (util_ascii_lower(a[i]) != util_ascii_lower(b[i]))
            return 0;
    return 1;
}

/* A full match; a regex that did not compile or hit its limit does not match. */
static int rx_full(const struct rx *rx, const char *s, size_t len)
{
    return rx != NULL && rx_match(rx, s != NULL ? s : "", len) == 1;
}

static int path_matches(const struct route *r, struct http_slice path)
{
    const char *p = path.p != NULL ? path.p : "";
    switch (r->path_match) {
    case DEC_PATH_EXACT:
        return path.len == r->path_len && bytes_eq(p, r->path, r->path_len, r->case_insensitive);
    case DEC_PATH_PREFIX:
        return path.len >= r->path_len && bytes_eq(p, r->path, r->path_len, r->case_insensitive);
    case DEC_PATH_REGEX:
        return rx_full(r->path_rx, p, path.len);
    case DEC_PATH_ANY:
        break;
    }
    return 1;
}

/*
 * The first parameter named <q> in <query> ("a=1&b&c=2"), raw: names and values are not
 * percent-decoded (Envoy's parseQueryString). A parameter without '=' has the value "".
 */
static int query_find(struct http_slice query, const struct route_query_cond *q,
                      struct http_slice *value)
{
    if (query.p == NULL)
        return 0;
    const char *p = query.p, *end = query.p + query.len;
    while (p < end) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *stop = amp != NULL ? amp : end;
        const char *eq = memchr(p, '=', (size_t)(stop - p));
        const char *name_end = eq != NULL ? eq : stop;
        if ((size_t)(name_end - p) == q->name_len && memcmp(p, q->name, q->name_len) == 0) {
            *value = eq != NULL ? (struct http_slice){eq + 1, (size_t)(stop - eq - 1)}
                                : (struct http_slice){stop, 0};
            return 1;
        }
        p = stop + (amp != NULL);
    }
    return 0;
}

static int query_matches(const struct route_query_cond *q, struct http_slice query)
{
    struct http_slice v;
    if (!query_find(query, q, &v))
        return 0;
    switch (q->match) {
    case DEC_QUERY_PRESENT:
        return 1;
    case DEC_QUERY_EXACT:
        return v.len == q->value_len && memcmp(v.p, q->value, v.len) == 0;
    case DEC_QUERY_REGEX:
        return rx_full(q->rx, v.p, v.len);
    }
    return 0;
}

static int route_matches(const struct route *r, const struct route_req *rq,
                         const struct hdr_req *hr)
{
    if (r->broken || !path_matches(r, rq->path))
        return 0;
    if (r->n_methods > 0) {
        int any = 0;
        const char *m = rq->method.p;
        size_t n = rq->method.len;
        for (size_t i = 0; i < r->n_methods && !any && m != NULL && n > 0; i++)
            any = r->methods[i][0] == m[0] && strlen(r->methods[i]) == n &&
                  memcmp(m, r->methods[i], n) == 0;
        if (!any)
            return 0;
    }
    for (size_t i = 0; i < r->n_headers; i++)
        if (hdr_cond_eval(&r->headers[i], hr) != 1)
            return 0;
    for (size_t i = 0; i < r->n_query; i++)
        if (!query_matches(&r->query[i], rq->query))
            return 0;
    return 1;
}

const struct route *route_match(const struct route_table *t, const struct route_req *rq)
{
    const struct hdr_req hr = {
        .method = rq->method,
        .authority = rq->authority,
        .path = rq->path,
        .query = rq->query,
        .headers = rq->headers,
        .nheaders = rq->nheaders,
        .pseudo_absent = 1,
    };
    for (size_t i = 0; i < t->n_routes; i++)
        if (route_matches(&t->routes[i], rq, &hr))
            return &t->routes[i];
    return NULL;
}

const struct route_split *route_split_pick(const struct route *r, uint64_t rand)
{
    if (r->total_weight == 0)
        return NULL;
    uint32_t x = (uint32_t)(rand % r->total_weight);
    for (size_t i = 0; i < r->n_splits; i++)
        if (x < r->splits[i].cum)
            return &r->splits[i];
    return NULL; /* not reached: the last cumulative weight is the total */
}

void route_count(const struct route *r, int status, unsigned retries, int timed_out)
{
    int cls = status >= 100 && status <= 599 ? status / 100 : 0;
    atomic_fetch_add_explicit(&r->stats->requests[cls], 1, memory_order_relaxed);
    if (retries > 0)
        atomic_fetch_add_explicit(&r->stats->retries, retries, memory_order_relaxed);
    if (timed_out)
        atomic_fetch_add_explicit(&r->stats->timeouts, 1, memory_order_relaxed);
}

size_t route_rewrite_len(const struct route *r, struct http_slice path)
{
    if (r->def == NULL || r->def->prefix_rewrite == NULL || r->def->prefix_rewrite[0] == '\0' ||
        path.len == 0 || path.p[0] != '/')
        return 0;
    /* The rewrite goes into a request line: a space or a control byte would split it. */
    for (const char *c = r->def->prefix_rewrite; *c != '\0'; c++)
        if ((unsigned char)*c <= 0x20 || (unsigned char)*c >= 0x7f)
            return 0;
    switch (r->path_match) {
    case DEC_PATH_PREFIX:
        return path_matches(r, path) ? r->path_len : 0;
    case DEC_PATH_EXACT:
    case DEC_PATH_REGEX:
        return path.len;
    case DEC_PATH_ANY:
        break;
    }
    return 1;
}

size_t route_headers_added(const struct dec_header_mods *mods)
{
    return mods->n_add + mods->n_set;
}

/* Whether modifiers may touch field <name> (see route_headers_apply()). */
static int modifiable(const char *name, size_t len)
{
    static const char *const fixed[] = {
        "host",       "content-length", "transfer-encoding",
        "connection", "keep-alive",     "proxy-connection",
        "te",         "upgrade",        "trailer",
    };
    if (len == 0 || name[0] == ':')
        return 0;
    for (size_t i = 0; i < ARRAY_SIZE(fixed); i++)
        if (len == strlen(fixed[i]) && bytes_eq(name, fixed[i], len, 1))
            return 0;
    return 1;
}

/* Flags every forwarded field of <f> named <name> as left out. */
static void drop_named(struct http_header *f, size_t n, const char *name)
{
    size_t len = strlen(name);
    for (size_t i = 0; i < n; i++)
        if (f[i].name.len == len && bytes_eq(f[i].name.p, name, len, 1))
            f[i].flags |= HTTP_HDR_HOP;
}

struct http_header *route_headers_modified(const struct route *r, const struct route_split *sp,
                                           int response, const struct http_header *h, size_t n,
                                           size_t *out_n)
{
    if (r == NULL || sp == NULL)
        return NULL;
    const struct dec_header_mods *lv[2] = {
        response ? sp->response_headers : sp->request_headers,
        response ? &r->def->response_headers : &r->def->request_headers,
    };
    size_t add = route_headers_added(lv[0]) + route_headers_added(lv[1]);
    if (add + lv[0]->n_remove + lv[1]->n_remove == 0)
        return NULL;
    struct http_header *f = xcalloc(n + add + 1, sizeof(*f));
    if (n > 0)
        memcpy(f, h, n * sizeof(*f));
    *out_n = n;
    for (int i = 0; i < 2; i++)
        route_headers_apply(lv[i], f, out_n);
    return f;
}

void route_headers_apply(const struct dec_header_mods *mods, struct http_header *f, size_t *n)
{
    for (size_t i = 0; i < mods->n_remove; i++)
        if (modifiable(mods->remove[i], strlen(mods->remove[i])))
            drop_named(f, *n, mods->remove[i]);
    for (size_t i = 0; i < mods->n_add + mods->n_set; i++) {
        int set = i >= mods->n_add;
        const struct dec_header_kv *kv = set ? &mods->set[i - mods->n_add] : &mods->add[i];
        size_t len = strlen(kv->name);
        if (!modifiable(kv->name, len))
            continue;
        if (set)
            drop_named(f, *n, kv->name);
        f[(*n)++] = (struct http_header){
            .name = {kv->name, len},
            .value = {kv->value, strlen(kv->value)},
        };
    }
}

/* ---- retry policy ---- */

void route_policy_init(struct route_policy *p, const struct route *r,
                       const struct route_resolver *rs)
{
    const struct dec_chain_route *d = r != NULL ? r->def : NULL;
    memset(p, 0, sizeof(*p));
    p->timeout_ms = ROUTE_TIMEOUT_DEFAULT_MS;
    if (d != NULL && d->request_timeout_ms != 0)
        p->timeout_ms = d->request_timeout_ms;
    else if (rs != NULL && rs->request_timeout_ms != 0)
        p->timeout_ms = rs->request_timeout_ms;
    if (d == NULL)
        return;
    p->idle_ms = d->idle_timeout_ms;
    p->retry_on =
        d->retry_on | (d->retry_on_connect_failure ? ROUTE_RETRY_BIT(CONNECT_FAILURE) : 0);
    p->retry_codes = d->retry_status_codes;
    p->n_retry_codes = d->n_retry_status_codes;
    if (p->retry_on != 0 || p->n_retry_codes > 0 || d->num_retries > 0)
        p->retries_left = d->num_retries > 0 ? d->num_retries : 1;
}

/* The gRPC status of an answer's head, or -1. */
static int head_grpc_status(const struct http_header *h, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!h1_slice_eq(h[i].name, "grpc-status"))
            continue;
        int v = 0;
        if (h[i].value.len == 0 || h[i].value.len > 3)
            return -1;
        for (size_t k = 0; k < h[i].value.len; k++) {
            if (h[i].value.p[k] < '0' || h[i].value.p[k] > '9')
                return -1;
            v = v * 10 + (h[i].value.p[k] - '0');
        }
        return v;
    }
    return -1;
}

int route_policy_retries_status(const struct route_policy *p, int status,
                                const struct http_header *h, size_t n)
{
    unsigned on = p->retry_on;
    if ((on & ROUTE_RETRY_BIT(5XX)) && status >= 500 && status <= 599)
        return 1;
    if ((on & ROUTE_RETRY_BIT(GATEWAY_ERROR)) && (status == 502 || status == 503 || status == 504))
        return 1;
    if ((on & ROUTE_RETRY_BIT(RETRIABLE_4XX)) && status == 409)
        return 1;
    for (size_t i = 0; i < p->n_retry_codes; i++)
        if (p->retry_codes[i] == status)
            return 1;
    if (on & ROUTE_RETRY_BIT(ENVOY_RATELIMITED))
        for (size_t i = 0; i < n; i++)
            if (h1_slice_eq(h[i].name, "x-envoy-ratelimited"))
                return 1;
    static const struct {
        unsigned bit;
        int code;
    } grpc[] = {
        {ROUTE_RETRY_BIT(CANCELLED), 1},          {ROUTE_RETRY_BIT(DEADLINE_EXCEEDED), 4},
        {ROUTE_RETRY_BIT(RESOURCE_EXHAUSTED), 8}, {ROUTE_RETRY_BIT(INTERNAL), 13},
        {ROUTE_RETRY_BIT(UNAVAILABLE), 14},
    };
    int gs = -1, looked = 0;
    for (size_t i = 0; i < ARRAY_SIZE(grpc); i++) {
        if (!(on & grpc[i].bit))
            continue;
        if (!looked) {
            gs = head_grpc_status(h, n);
            looked = 1;
        }
        if (gs == grpc[i].code)
            return 1;
    }
    return 0;
}

uint32_t route_policy_backoff_ms(struct route_policy *p, uint64_t rnd)
{
    uint32_t base = ROUTE_BACKOFF_BASE_MS;
    for (unsigned i = 0; i < p->backoffs && base < ROUTE_BACKOFF_MAX_MS; i++)
        base *= 2;
    if (base > ROUTE_BACKOFF_MAX_MS)
        base = ROUTE_BACKOFF_MAX_MS;
    p->backoffs++;
    if (p->retries_left > 0)
        p->retries_left--;
    return (uint32_t)(rnd % base);
}
