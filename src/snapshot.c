/*
 * snapshot: construction and reference counting. The counts are atomics because the last
 * reference to a snapshot may be dropped by any worker.
 */
#include "snapshot.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct endpoint_set *endpoint_set_new(struct dec_endpoint *v, size_t n)
{
    struct endpoint_set *s = xcalloc(1, sizeof(*s));
    atomic_init(&s->refs, 1);
    s->v = v;
    s->n = n;
    return s;
}

struct endpoint_set *endpoint_set_ref(struct endpoint_set *s)
{
    atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
    return s;
}

void endpoint_set_unref(struct endpoint_set *s)
{
    if (s == NULL || atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1)
        return;
    dec_endpoints_free(s->v, s->n);
    free(s);
}

static int str_same(const char *a, const char *b)
{
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

int endpoint_set_same(const struct endpoint_set *a, const struct endpoint_set *b)
{
    if (a->n != b->n)
        return 0;
    for (size_t i = 0; i < a->n; i++) {
        const struct dec_endpoint *x = &a->v[i], *y = &b->v[i];
        if (x->port != y->port || x->passing != y->passing || x->critical != y->critical ||
            !str_same(x->node, y->node) || !str_same(x->node_datacenter, y->node_datacenter) ||
            !str_same(x->address, y->address) || !str_same(x->socket_path, y->socket_path) ||
            !str_same(x->service_id, y->service_id) ||
            !str_same(x->identity_service, y->identity_service) || !str_same(x->ns, y->ns) ||
            !str_same(x->partition, y->partition))
            return 0;
    }
    return 1;
}

void snap_target_copy(struct snap_target *dst, const struct snap_target *src)
{
    *dst = *src;
    dst->id = xstrdup(src->id);
    dst->service = xstrdup(src->service);
    dst->ns = xstrdup(src->ns);
    dst->partition = xstrdup(src->partition);
    dst->datacenter = xstrdup(src->datacenter);
    dst->sni = xstrdup(src->sni);
    dst->endpoints =
        src->endpoints != NULL ? endpoint_set_ref(src->endpoints) : endpoint_set_new(NULL, 0);
    dst->hosts = NULL;
    dst->n_hosts = 0;
    if (src->hosts != NULL) {
        dst->hosts = xcalloc(src->n_hosts ? src->n_hosts : 1, sizeof(*dst->hosts));
        dst->n_hosts = src->n_hosts;
        for (size_t i = 0; i < src->n_hosts; i++)
            dst->hosts[i] = outlier_host_ref(src->hosts[i]);
    }
}

void snap_target_dispose(struct snap_target *t)
{
    for (size_t i = 0; i < t->n_hosts; i++)
        outlier_host_unref(t->hosts[i]);
    free(t->hosts);
    free(t->id);
    free(t->service);
    free(t->ns);
    free(t->partition);
    free(t->datacenter);
    free(t->sni);
    endpoint_set_unref(t->endpoints);
    memset(t, 0, sizeof(*t));
}

struct snapshot *snapshot_new(uint64_t generation, const struct proxy_cfg *cfg,
                              const char *trust_domain, struct tls_ctx *tls,
                              struct intent_table *intents,
                              const struct snap_target *const *targets, const size_t *n_targets,
                              struct limit_state *inbound_limit, struct limit_state *const *limits,
                              const struct mesh_http_cfg *mesh_http)
{
    struct snapshot *s = xcalloc(1, sizeof(*s));
    atomic_init(&s->refs, 1);
    s->generation = generation;
    proxycfg_copy(&s->cfg, cfg);
    s->trust_domain = xstrdup(trust_domain);
    s->tls = tls_ctx_ref(tls);
    s->intents = intent_table_ref(intents);
    s->upstreams = xcalloc(cfg->n_upstreams, sizeof(*s->upstreams));
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        struct snap_upstream *u = &s->upstreams[i];
        u->cfg = &s->cfg.upstreams[i];
        u->protocol = u->cfg->protocol_set ? u->cfg->protocol : PROTO_TCP;
        u->n_targets = n_targets[i];
        u->targets = xcalloc(u->n_targets, sizeof(*u->targets));
        for (size_t j = 0; j < u->n_targets; j++)
            snap_target_copy(&u->targets[j], &targets[i][j]);
        u->limit = limits[i] != NULL ? limit_state_ref(limits[i]) : limit_state_new();
    }
    s->inbound_limit = inbound_limit != NULL ? limit_state_ref(inbound_limit) : limit_state_new();
    if (mesh_http != NULL)
        s->mesh_http = *mesh_http;
    return s;
}

void snapshot_endpoint_name(const struct dec_endpoint *ep, char *out, size_t len)
{
    if (ep->socket_path[0] != '\0')
        snprintf(out, len, "unix:%s", ep->socket_path);
    else
        snprintf(out, len, "%s:%d", ep->address, ep->port);
}

void snapshot_attach_outliers(struct snapshot *s, struct outlier *const *outliers)
{
    char name[sizeof(((struct outlier_host *)0)->name)];
    for (size_t i = 0; i < s->cfg.n_upstreams; i++) {
        struct snap_upstream *u = &s->upstreams[i];
        struct outlier *o = outliers[i];
        if (o == NULL)
            continue;
        u->outlier = outlier_ref(o);
        outlier_begin(o);
        for (size_t j = 0; j < u->n_targets; j++) {
            struct snap_target *t = &u->targets[j];
            const struct endpoint_set *eps = t->endpoints;
            t->hosts = xcalloc(eps->n ? eps->n : 1, sizeof(*t->hosts));
            t->n_hosts = eps->n;
            for (size_t k = 0; k < eps->n; k++) {
                snapshot_endpoint_name(&eps->v[k], name, sizeof(name));
                t->hosts[k] = outlier_host_get(o, name);
            }
        }
        outlier_prune(o);
    }
}

struct snapshot *snapshot_ref(struct snapshot *s)
{
    atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
    return s;
}

void snapshot_unref(struct snapshot *s)
{
    if (s == NULL || atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1)
        return;
    for (size_t i = 0; i < s->cfg.n_upstreams; i++) {
        struct snap_upstream *u = &s->upstreams[i];
        for (size_t j = 0; j < u->n_targets; j++)
            snap_target_dispose(&u->targets[j]);
        free(u->targets);
        limit_state_unref(u->limit);
        outlier_unref(u->outlier);
        route_table_unref(u->routes);
    }
    limit_state_unref(s->inbound_limit);
    limit_rates_unref(s->rates);
    snap_exposes_unref(s->exposes);
    free(s->upstreams);
    intent_table_unref(s->intents);
    tls_ctx_unref(s->tls);
    free(s->trust_domain);
    proxycfg_dispose(&s->cfg);
    free(s);
}

struct snap_exposes *snap_exposes_new(struct snap_expose *v, size_t n, struct limit_state *limit)
{
    struct snap_exposes *x = xcalloc(1, sizeof(*x));
    atomic_init(&x->refs, 1);
    x->v = v;
    x->n = n;
    x->limit = limit_state_ref(limit);
    return x;
}

struct snap_exposes *snap_exposes_ref(struct snap_exposes *x)
{
    atomic_fetch_add_explicit(&x->refs, 1, memory_order_relaxed);
    return x;
}

void snap_exposes_unref(struct snap_exposes *x)
{
    if (x == NULL || atomic_fetch_sub_explicit(&x->refs, 1, memory_order_acq_rel) != 1)
        return;
    for (size_t i = 0; i < x->n; i++) {
        for (size_t j = 0; j < x->v[i].n_paths; j++)
            free(x->v[i].paths[j]);
        free(x->v[i].paths);
    }
    free(x->v);
    limit_state_unref(x->limit);
    free(x);
}

/* <a> without an IPv4-mapped IPv6 prefix. */
static const char *unmapped(const char *a)
{
    return strncasecmp(a, "::ffff:", 7) == 0 && strchr(a + 7, '.') != NULL ? a + 7 : a;
}

int snap_expose_source_ok(const struct snap_exposes *x, const struct snap_expose *e,
                          const char *source, const char *local)
{
    if (!e->from_checks)
        return 1;
    source = unmapped(source);
    if (strncmp(source, "127.", 4) == 0 || strcmp(source, "::1") == 0)
        return 1;
    if (source[0] == '\0')
        return 0;
    return strcmp(source, unmapped(local)) == 0 ||
           (x->agent_addr[0] != '\0' && strcmp(source, unmapped(x->agent_addr)) == 0);
}

int snap_exposes_equal(const struct snap_exposes *a, const struct snap_exposes *b)
{
    size_t na = a != NULL ? a->n : 0, nb = b != NULL ? b->n : 0;
    if (na != nb)
        return 0;
    for (size_t i = 0; i < na; i++) {
        const struct snap_expose *p = &a->v[i], *q = &b->v[i];
        if (p->port != q->port || p->local_port != q->local_port || p->protocol != q->protocol ||
            p->from_checks != q->from_checks || p->n_paths != q->n_paths)
            return 0;
        for (size_t j = 0; j < p->n_paths; j++)
            if (strcmp(p->paths[j], q->paths[j]) != 0)
                return 0;
    }
    return 1;
}

const struct snap_expose *snapshot_expose(const struct snapshot *s, int port)
{
    for (size_t i = 0; s->exposes != NULL && i < s->exposes->n; i++)
        if (s->exposes->v[i].port == port)
            return &s->exposes->v[i];
    return NULL;
}

const struct snap_upstream *snapshot_upstream(const struct snapshot *s, const char *key)
{
    for (size_t i = 0; i < s->cfg.n_upstreams; i++)
        if (strcmp(s->cfg.upstreams[i].key, key) == 0)
            return &s->upstreams[i];
    return NULL;
}

const char *snapshot_inbound_change(const struct snapshot *prev, const struct snapshot *next)
{
    if (prev->intents != next->intents && !intent_table_equal(prev->intents, next->intents))
        return "intentions";
    /* Compared as authorize() compares a caller's: trust domains ignore case. */
    if (strcasecmp(prev->trust_domain, next->trust_domain) != 0)
        return "trust domain";
    if (prev->cfg.verify_trust_domain != next->cfg.verify_trust_domain)
        return "verify_trust_domain";
    if (prev->cfg.authorize_with_agent != next->cfg.authorize_with_agent)
        return "authorization";
    if (strcmp(prev->cfg.service, next->cfg.service) != 0)
        return "service";
    return NULL;
}
