/*
 * views: what the admin endpoint answers. /metrics sums the workers' session_stats blocks
 * (written by each worker with relaxed atomic adds, read here racily but atomically) and shows
 * every watch's health; /connections posts a worker_listing to each worker and answers when
 * all have filled theirs or CONNECTIONS_WAIT_MS has passed.
 */
#include "views.h"
#include "intent.h"
#include "outlier.h"
#include "pathnorm.h"
#include "route.h"
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define CONNECTIONS_WAIT_MS        2000 /* how long /connections waits for the workers */
#define CONNECTIONS_MAX_PER_WORKER 1000

struct conn_job;

struct views {
    struct loop *loop;
    struct worker *const *workers;
    int n_workers;
    const struct inputs *in;
    const struct upstreams *ups;
    const struct limit_state *inbound_limit;
    /* the /connections listing being collected */
    struct conn_job *conn_job;
    struct loop_timer conn_wait;
    struct loop_receiver listed; /* a worker has filled its listing */
};

static uint64_t load(const atomic_uint_fast64_t *v)
{
    return atomic_load_explicit(v, memory_order_relaxed);
}

/* One listener's numbers summed over the workers. */
struct listener_sum {
    const char *name;
    int inbound;
    uint64_t active, total, bytes_in, bytes_out, connect_errors;
    uint64_t requests[6], duration[SESSION_DURATION_BUCKETS + 1], duration_sum_ms;
    uint64_t expose_refused, pool_idle;
};

static void sum_listener(struct listener_sum **v, size_t *n, const struct session_listener_stats *l)
{
    struct listener_sum *s = NULL;
    for (size_t i = 0; i < *n && s == NULL; i++)
        if ((*v)[i].inbound == l->inbound && strcmp((*v)[i].name, l->name) == 0)
            s = &(*v)[i];
    if (s == NULL) {
        *v = xrealloc(*v, (*n + 1) * sizeof(**v));
        s = &(*v)[(*n)++];
        *s = (struct listener_sum){.name = l->name, .inbound = l->inbound};
    }
    s->active += load(&l->active);
    s->total += load(&l->total);
    s->bytes_in += load(&l->bytes_in);
    s->bytes_out += load(&l->bytes_out);
    s->connect_errors += load(&l->connect_errors);
    for (int c = 0; c < 6; c++)
        s->requests[c] += load(&l->requests[c]);
    for (int k = 0; k <= SESSION_DURATION_BUCKETS; k++)
        s->duration[k] += load(&l->duration_buckets[k]);
    s->duration_sum_ms += load(&l->duration_sum_ms);
    s->expose_refused += load(&l->expose_refused);
    s->pool_idle += load(&l->pool_idle);
}

/* An exposed listener's stats go by its own name ("expose:<port>"). */
static int exposed(const struct listener_sum *l)
{
    return l->inbound && strncmp(l->name, "expose:", 7) == 0;
}

struct source_sum {
    const char *name;
    uint64_t allow, deny, req_allow, req_deny;
};

static void sum_source(struct source_sum **v, size_t *n, const struct session_source_stats *src)
{
    struct source_sum *s = NULL;
    for (size_t i = 0; i < *n && s == NULL; i++)
        if (strcmp((*v)[i].name, src->name) == 0)
            s = &(*v)[i];
    if (s == NULL) {
        *v = xrealloc(*v, (*n + 1) * sizeof(**v));
        s = &(*v)[(*n)++];
        *s = (struct source_sum){.name = src->name};
    }
    s->allow += load(&src->allow);
    s->deny += load(&src->deny);
    s->req_allow += load(&src->req_allow);
    s->req_deny += load(&src->req_deny);
}

static void metric_head(struct admin_buf *b, const char *name, const char *type, const char *help)
{
    admin_buf_printf(b, "# HELP connectd_%s %s\n# TYPE connectd_%s %s\n", name, help, name, type);
}

/* One sample line: connectd_<name>{<label>="<value>"} <v>; no label when <label> is NULL. */
static void sample(struct admin_buf *b, const char *name, const char *label, const char *value,
                   uint64_t v)
{
    admin_buf_printf(b, "connectd_%s", name);
    if (label != NULL && value != NULL) {
        admin_buf_printf(b, "{%s=", label);
        admin_buf_label(b, value);
        admin_buf_add(b, "}", 1);
    }
    admin_buf_printf(b, " %llu\n", (unsigned long long)v);
}

/* connectd_<name>{listener="..."[,upstream="..."] — the label set left open. */
static void listener_label_open(struct admin_buf *b, const char *name, const struct listener_sum *l)
{
    admin_buf_printf(b, "connectd_%s{listener=", name);
    admin_buf_label(b, exposed(l) ? l->name : l->inbound ? "public" : "upstream");
    if (!l->inbound) {
        admin_buf_add(b, ",upstream=", 10);
        admin_buf_label(b, l->name);
    }
}

static void listener_label(struct admin_buf *b, const char *name, const struct listener_sum *l)
{
    listener_label_open(b, name, l);
    admin_buf_add(b, "}", 1);
}

static void watch_metrics(struct admin_buf *b, const char *name, const struct watch *w,
                          uint64_t now)
{
    if (w == NULL)
        return;
    admin_buf_add(b, "connectd_watch_up{watch=", 24);
    admin_buf_label(b, name);
    admin_buf_printf(b, "} %d\n", watch_has_data(w) && watch_failures(w) == 0);
    uint64_t ok = watch_last_ok_ms(w);
    admin_buf_add(b, "connectd_watch_last_success_age_seconds{watch=", 46);
    admin_buf_label(b, name);
    if (ok == 0)
        admin_buf_add(b, "} NaN\n", 6);
    else
        admin_buf_printf(b, "} %.3f\n", (double)(now - MIN(ok, now)) / 1000.0);
}

struct watch_visit {
    struct admin_buf *b;
    uint64_t now;
};

static void visit_watch(void *data, const char *name, const struct watch *w)
{
    struct watch_visit *v = data;
    watch_metrics(v->b, name, w, v->now);
}

/* connectd_<name>{upstream="<u>"[,limit="<l>"]} <v> */
static void upstream_sample(struct admin_buf *b, const char *name, const char *upstream,
                            const char *limit, uint64_t v)
{
    admin_buf_printf(b, "connectd_%s{upstream=", name);
    admin_buf_label(b, upstream);
    if (limit != NULL) {
        admin_buf_add(b, ",limit=", 7);
        admin_buf_label(b, limit);
    }
    admin_buf_printf(b, "} %llu\n", (unsigned long long)v);
}

/* Each upstream's request limits and outlier ejections (outlier.h), from the current
 * snapshot's shared state. */
static void render_outliers(const struct snapshot *snap, struct admin_buf *b)
{
    if (snap == NULL)
        return;
    uint64_t now = outlier_now_ms();
    metric_head(b, "upstream_overflow_total", "counter",
                "Outbound requests answered 503 at once by an upstream's limits, by limit.");
    for (size_t i = 0; i < snap->cfg.n_upstreams; i++) {
        const struct outlier *o = snap->upstreams[i].outlier;
        for (int l = 0; o != NULL && l < OUTLIER_LIMIT_COUNT; l++)
            upstream_sample(b, "upstream_overflow_total", snap->cfg.upstreams[i].destination_name,
                            outlier_limit_name(l),
                            atomic_load_explicit(&o->overflow[l], memory_order_relaxed));
    }
    metric_head(b, "upstream_requests_in_flight", "gauge",
                "Outbound requests in flight to an upstream now (limits.max_concurrent_requests "
                "counts them), over all workers.");
    for (size_t i = 0; i < snap->cfg.n_upstreams; i++)
        if (snap->upstreams[i].outlier != NULL)
            upstream_sample(
                b, "upstream_requests_in_flight", snap->cfg.upstreams[i].destination_name, NULL,
                (uint64_t)outlier_count(snap->upstreams[i].outlier, OUTLIER_LIMIT_CONCURRENT));
    metric_head(b, "upstream_ejections_total", "counter",
                "Upstream endpoints ejected by the passive health check (consecutive 5xx).");
    for (size_t i = 0; i < snap->cfg.n_upstreams; i++)
        if (snap->upstreams[i].outlier != NULL)
            upstream_sample(
                b, "upstream_ejections_total", snap->cfg.upstreams[i].destination_name, NULL,
                atomic_load_explicit(&snap->upstreams[i].outlier->ejections, memory_order_relaxed));
    metric_head(b, "upstream_ejections_overflow_total", "counter",
                "Ejections max_ejection_percent prevented (the endpoint stayed in service).");
    for (size_t i = 0; i < snap->cfg.n_upstreams; i++)
        if (snap->upstreams[i].outlier != NULL)
            upstream_sample(b, "upstream_ejections_overflow_total",
                            snap->cfg.upstreams[i].destination_name, NULL,
                            atomic_load_explicit(&snap->upstreams[i].outlier->ejection_overflows,
                                                 memory_order_relaxed));
    metric_head(b, "upstream_ejected_endpoints", "gauge",
                "Upstream endpoints ejected now (over the upstream's targets).");
    for (size_t i = 0; i < snap->cfg.n_upstreams; i++) {
        const struct snap_upstream *u = &snap->upstreams[i];
        if (u->outlier == NULL)
            continue;
        size_t n = 0;
        for (size_t j = 0; j < u->n_targets; j++)
            n += outlier_ejected_among(u->targets[j].hosts, u->targets[j].n_hosts, now);
        upstream_sample(b, "upstream_ejected_endpoints", snap->cfg.upstreams[i].destination_name,
                        NULL, n);
    }
}

static void render_watches(const struct views *v, const struct views_state *st, struct admin_buf *b)
{
    struct watch_visit visit = {.b = b, .now = util_now_ms()};
    metric_head(b, "watch_up", "gauge",
                "1 when the watch has an answer and its last attempt succeeded, else 0.");
    metric_head(b, "watch_last_success_age_seconds", "gauge",
                "Seconds since the watch last got a good answer (NaN before the first).");
    watch_metrics(b, "registration", st->registration, visit.now);
    inputs_each_watch(v->in, visit_watch, &visit);
    upstreams_each_watch(v->ups, visit_watch, &visit);
}

/* protocol http: requests by listener and status class, and their duration histogram. */
static void render_http(struct admin_buf *b, const struct listener_sum *ls, size_t nl)
{
    static const char *const classes[6] = {"none", "1xx", "2xx", "3xx", "4xx", "5xx"};
    static const uint64_t bounds[] = SESSION_DURATION_BUCKETS_MS;
    metric_head(b, "http_requests_total", "counter",
                "Inbound HTTP requests by listener and the class of the status answered "
                "(none: the stream ended without one).");
    for (size_t i = 0; i < nl; i++) {
        for (int c = 0; c < 6; c++) {
            if (ls[i].requests[c] == 0)
                continue;
            listener_label_open(b, "http_requests_total", &ls[i]);
            admin_buf_printf(b, ",code_class=\"%s\"} %llu\n", classes[c],
                             (unsigned long long)ls[i].requests[c]);
        }
    }
    metric_head(b, "http_request_duration_seconds", "histogram",
                "Inbound HTTP requests from their complete head to the end of their answer.");
    for (size_t i = 0; i < nl; i++) {
        uint64_t n = 0;
        for (int c = 0; c < 6; c++)
            n += ls[i].requests[c];
        if (n == 0)
            continue;
        uint64_t cum = 0;
        for (int k = 0; k <= SESSION_DURATION_BUCKETS; k++) {
            cum += ls[i].duration[k];
            listener_label_open(b, "http_request_duration_seconds_bucket", &ls[i]);
            if (k < SESSION_DURATION_BUCKETS)
                admin_buf_printf(b, ",le=\"%.3f\"} %llu\n", (double)bounds[k] / 1000.0,
                                 (unsigned long long)cum);
            else
                admin_buf_printf(b, ",le=\"+Inf\"} %llu\n", (unsigned long long)cum);
        }
        listener_label(b, "http_request_duration_seconds_sum", &ls[i]);
        admin_buf_printf(b, " %.3f\n", (double)ls[i].duration_sum_ms / 1000.0);
        listener_label(b, "http_request_duration_seconds_count", &ls[i]);
        admin_buf_printf(b, " %llu\n", (unsigned long long)cum);
    }
}

/* connectd_<name>{upstream="<u>",route="<k>" — the label set left open. */
static void route_label_open(struct admin_buf *b, const char *name, const char *upstream, size_t k)
{
    admin_buf_printf(b, "connectd_%s{upstream=", name);
    admin_buf_label(b, upstream);
    admin_buf_printf(b, ",route=\"%zu\"", k);
}

/*
 * Outbound HTTP requests per route, by upstream, the route's index in the upstream's table
 * (bounded by the table's length, and only routes that served requests show) and status
 * class; and per route, the retries its policy made and the requests its timeouts cut. A
 * changed chain's table counts on from the last one's by index (route_table_carry_stats()),
 * so the series stay monotonic; a route index the table no longer has stops showing.
 */
static void render_routes(struct admin_buf *b, const struct snapshot *s)
{
    static const char *const classes[6] = {"none", "1xx", "2xx", "3xx", "4xx", "5xx"};
    static const struct {
        const char *name, *help;
    } per_route[] = {
        {"http_route_requests_total",
         "Outbound HTTP requests by upstream, route (its index in the upstream's route table) "
         "and the class of the status answered."},
        {"http_route_retries_total",
         "Outbound HTTP requests sent again by their route's retry policy, by upstream and "
         "route."},
        {"http_route_timeouts_total",
         "Outbound HTTP requests cut by their route's RequestTimeout or IdleTimeout, by "
         "upstream and route."},
    };
    for (size_t m = 0; m < ARRAY_SIZE(per_route); m++) {
        metric_head(b, per_route[m].name, "counter", per_route[m].help);
        for (size_t i = 0; s != NULL && i < s->cfg.n_upstreams; i++) {
            const struct route_table *t = s->upstreams[i].routes;
            const char *up = s->cfg.upstreams[i].destination_name;
            for (size_t k = 0; t != NULL && k < route_table_len(t); k++) {
                const struct route_stats *st = route_table_route(t, k)->stats;
                uint64_t total = 0;
                for (int c = 0; c < 6; c++) {
                    uint64_t n = load(&st->requests[c]);
                    total += n;
                    if (m != 0 || n == 0)
                        continue;
                    route_label_open(b, per_route[m].name, up, k);
                    admin_buf_printf(b, ",code_class=\"%s\"} %llu\n", classes[c],
                                     (unsigned long long)n);
                }
                if (m == 0 || total == 0)
                    continue;
                route_label_open(b, per_route[m].name, up, k);
                admin_buf_printf(b, "} %llu\n",
                                 (unsigned long long)load(m == 1 ? &st->retries : &st->timeouts));
            }
        }
    }
}

static void render_metrics(const struct views *vw, const struct views_state *vs,
                           struct admin_buf *b)
{
    struct listener_sum *ls = NULL;
    struct source_sum *ss = NULL;
    size_t nl = 0, ns = 0;
    uint64_t hs[SESSION_HS_COUNT] = {0}, tls_hs[2][2] = {{0}}, ended[SESSION_RES_COUNT] = {0};
    uint64_t h2_closed = 0, up_retries = 0, up_timeouts = 0;
    uint64_t refused_max = 0, refused_rate = 0, reauth = 0, reauth_closed = 0, refused_pending = 0,
             refused_pending_source = 0, refused_fds = 0, upool_idle = 0, upool_reused = 0,
             h2up_conns = 0, h2up_streams = 0;
    for (int i = 0; i < vw->n_workers; i++) {
        const struct session_stats *st = worker_stats(vw->workers[i]);
        size_t n = atomic_load_explicit(&st->n_listeners, memory_order_acquire);
        for (size_t j = 0; j < n; j++)
            sum_listener(&ls, &nl, &st->listeners[j]);
        if (load(&st->other_listener.total) != 0)
            sum_listener(&ls, &nl, &st->other_listener);
        n = atomic_load_explicit(&st->n_sources, memory_order_acquire);
        for (size_t j = 0; j < n; j++)
            sum_source(&ss, &ns, &st->sources[j]);
        if (load(&st->other_source.allow) + load(&st->other_source.deny) +
                load(&st->other_source.req_allow) + load(&st->other_source.req_deny) !=
            0)
            sum_source(&ss, &ns, &st->other_source);
        for (int r = 0; r < SESSION_HS_COUNT; r++)
            hs[r] += load(&st->handshake_failures[r]);
        for (int d = 0; d < 2; d++)
            for (int r = 0; r < 2; r++)
                tls_hs[d][r] += load(&st->tls_handshakes[d][r]);
        refused_max += load(&st->counters.refused_max_connections);
        refused_rate += load(&st->counters.refused_rate);
        refused_pending += load(&st->counters.refused_pending);
        refused_pending_source += load(&st->counters.refused_pending_source);
        refused_fds += load(&st->counters.refused_descriptors);
        for (int r = 0; r < SESSION_RES_COUNT; r++)
            ended[r] += load(&st->results[r]);
        reauth += load(&st->counters.reauthorized);
        reauth_closed += load(&st->counters.reauthorize_closed);
        upool_idle += load(&st->upool_idle);
        upool_reused += load(&st->upool_reused);
        up_retries += load(&st->upstream_retries);
        up_timeouts += load(&st->upstream_timeouts);
        h2up_conns += load(&st->h2up_conns);
        h2up_streams += load(&st->h2up_streams);
        h2_closed += load(&st->counters.h2_protocol_closed);
    }

    static const struct {
        const char *name, *type, *help;
        size_t off;
    } per_listener[] = {
        {"connections_active", "gauge", "Open connections.", offsetof(struct listener_sum, active)},
        {"connections_total", "counter", "Connections accepted (after admission).",
         offsetof(struct listener_sum, total)},
        {"bytes_in_total", "counter", "Bytes received from connecting clients.",
         offsetof(struct listener_sum, bytes_in)},
        {"bytes_out_total", "counter", "Bytes sent back to connecting clients.",
         offsetof(struct listener_sum, bytes_out)},
        {"upstream_connect_errors_total", "counter",
         "Upstream endpoints that could not be connected to or verified.",
         offsetof(struct listener_sum, connect_errors)},
    };
    for (size_t m = 0; m < ARRAY_SIZE(per_listener); m++) {
        metric_head(b, per_listener[m].name, per_listener[m].type, per_listener[m].help);
        for (size_t i = 0; i < nl; i++) {
            if (m == ARRAY_SIZE(per_listener) - 1 && ls[i].inbound)
                continue;
            listener_label(b, per_listener[m].name, &ls[i]);
            uint64_t v;
            memcpy(&v, (const char *)&ls[i] + per_listener[m].off, sizeof(v));
            admin_buf_printf(b, " %llu\n", (unsigned long long)v);
        }
    }

    metric_head(b, "expose_refused_total", "counter",
                "Requests an exposed listener (Proxy.Expose, no mesh identity) answered 404: "
                "not one of its paths.");
    for (size_t i = 0; i < nl; i++) {
        if (!exposed(&ls[i]))
            continue;
        listener_label(b, "expose_refused_total", &ls[i]);
        admin_buf_printf(b, " %llu\n", (unsigned long long)ls[i].expose_refused);
    }

    metric_head(b, "handshake_failures_total", "counter",
                "Inbound TLS handshakes that failed or whose caller certificate carried no "
                "acceptable identity, and outbound peers that proved the wrong identity, by "
                "reason.");
    for (int r = 0; r < SESSION_HS_COUNT; r++)
        sample(b, "handshake_failures_total", "reason", session_handshake_reason_name(r), hs[r]);

    metric_head(b, "tls_handshakes_total", "counter",
                "Completed TLS handshakes by direction, and whether they resumed a session.");
    for (int d = 0; d < 2; d++)
        for (int r = 0; r < 2; r++)
            admin_buf_printf(b,
                             "connectd_tls_handshakes_total{direction=\"%s\",resumed=\"%s\"} "
                             "%llu\n",
                             d == 0 ? "inbound" : "outbound", r ? "true" : "false",
                             (unsigned long long)tls_hs[d][r]);

    metric_head(b, "upstream_pool_idle_connections", "gauge",
                "Idle upstream connections (http upstreams) kept for the next request.");
    sample(b, "upstream_pool_idle_connections", NULL, NULL, upool_idle);
    metric_head(b, "upstream_pool_idle_connections_by_upstream", "gauge",
                "Idle upstream connections kept for the next request, by upstream (http "
                "upstreams; the sum of connectd_upstream_pool_idle_connections).");
    for (size_t i = 0; i < nl; i++)
        if (!ls[i].inbound)
            upstream_sample(b, "upstream_pool_idle_connections_by_upstream", ls[i].name, NULL,
                            ls[i].pool_idle);
    metric_head(b, "upstream_pool_reused_total", "counter",
                "Upstream connections taken from the pool instead of dialled.");
    sample(b, "upstream_pool_reused_total", NULL, NULL, upool_reused);
    metric_head(b, "upstream_request_retries_total", "counter",
                "Outbound requests sent again by their route's retry policy.");
    sample(b, "upstream_request_retries_total", NULL, NULL, up_retries);
    metric_head(b, "upstream_request_timeouts_total", "counter",
                "Outbound requests not answered in full within their route's RequestTimeout.");
    sample(b, "upstream_request_timeouts_total", NULL, NULL, up_timeouts);
    metric_head(b, "upstream_h2_connections", "gauge",
                "Shared HTTP/2 client connections open (to upstream sidecars with ALPN h2, and "
                "h2c to the local application).");
    sample(b, "upstream_h2_connections", NULL, NULL, h2up_conns);
    metric_head(b, "upstream_h2_streams_total", "counter",
                "Streams opened on shared HTTP/2 client connections.");
    sample(b, "upstream_h2_streams_total", NULL, NULL, h2up_streams);

    metric_head(b, "authorization_decisions_total", "counter",
                "Inbound authorization decisions by source service and result (at most 256 "
                "sources per worker, then \"other\").");
    for (size_t i = 0; i < ns; i++) {
        for (int allow = 1; allow >= 0; allow--) {
            admin_buf_add(b, "connectd_authorization_decisions_total{source=", 46);
            admin_buf_label(b, ss[i].name);
            admin_buf_printf(b, ",result=\"%s\"} %llu\n", allow ? "allow" : "deny",
                             (unsigned long long)(allow ? ss[i].allow : ss[i].deny));
        }
    }

    metric_head(b, "http_authorization_decisions_total", "counter",
                "Per-request authorization decisions (protocol http) by source service and "
                "result.");
    for (size_t i = 0; i < ns; i++) {
        if (ss[i].req_allow + ss[i].req_deny == 0)
            continue;
        for (int allow = 1; allow >= 0; allow--) {
            admin_buf_add(b, "connectd_http_authorization_decisions_total{source=", 51);
            admin_buf_label(b, ss[i].name);
            admin_buf_printf(b, ",result=\"%s\"} %llu\n", allow ? "allow" : "deny",
                             (unsigned long long)(allow ? ss[i].req_allow : ss[i].req_deny));
        }
    }
    render_http(b, ls, nl);
    render_routes(b, vs->current);

    metric_head(b, "reauthorizations_total", "counter",
                "Open inbound sessions re-evaluated against the intentions.");
    sample(b, "reauthorizations_total", NULL, NULL, reauth);
    metric_head(b, "reauthorization_closes_total", "counter",
                "Open inbound sessions ended because a re-evaluation denied them.");
    sample(b, "reauthorization_closes_total", NULL, NULL, reauth_closed);
    metric_head(b, "http2_protocol_closes_total", "counter",
                "Inbound HTTP/2 connections ended for a protocol error or a flood (rapid reset, "
                "CONTINUATION, PING/SETTINGS floods).");
    sample(b, "http2_protocol_closes_total", NULL, NULL, h2_closed);
    metric_head(b, "limit_refusals_total", "counter",
                "Connections refused at accept by a listener's limits, by limit.");
    sample(b, "limit_refusals_total", "limit", "max_connections", refused_max);
    sample(b, "limit_refusals_total", "limit", "rate", refused_rate);
    sample(b, "limit_refusals_total", "limit", "pending_handshakes", refused_pending);
    sample(b, "limit_refusals_total", "limit", "pending_handshakes_per_source",
           refused_pending_source);
    sample(b, "limit_refusals_total", "limit", "descriptor_reserve", refused_fds);
    metric_head(b, "http_rate_limited_total", "counter",
                "Inbound requests answered 429 by the service-defaults RateLimits.");
    sample(b, "http_rate_limited_total", NULL, NULL,
           atomic_load_explicit(&vw->inbound_limit->rate_limited, memory_order_relaxed));
    metric_head(b, "pending_handshakes", "gauge",
                "Inbound connections in the TLS handshake now, over all workers.");
    sample(b, "pending_handshakes", NULL, NULL, (uint64_t)limit_pending_count(vw->inbound_limit));
    metric_head(b, "timeout_closes_total", "counter",
                "Sessions ended by the idle timeout or the lifetime bound, by kind.");
    for (int r = 0; r < SESSION_RES_COUNT; r++)
        if (session_result_close_kind(r) != NULL)
            sample(b, "timeout_closes_total", "kind", session_result_close_kind(r), ended[r]);

    render_outliers(vs->current, b);
    render_watches(vw, vs, b);

    metric_head(b, "leaf_not_after_seconds", "gauge",
                "Unix time at which the current leaf certificate expires.");
    const struct tls_ctx *tls = inputs_tls(vw->in);
    if (tls != NULL)
        admin_buf_printf(b, "connectd_leaf_not_after_seconds %lld\n", tls_ctx_leaf_not_after(tls));
    metric_head(b, "snapshot_generation", "gauge",
                "Generation of the configuration snapshot last published to the workers.");
    sample(b, "snapshot_generation", NULL, NULL, vs->current ? vs->current->generation : 0);
    metric_head(b, "intention_bad_regexes", "gauge",
                "Regexes of the current intentions' permissions that did not compile; each "
                "fails closed (see the log).");
    const struct intent_table *intents = inputs_intents(vw->in);
    sample(b, "intention_bad_regexes", NULL, NULL,
           intents != NULL ? (uint64_t)intent_table_broken(intents) : 0);
    metric_head(b, "ready", "gauge", "1 when /ready answers 200.");
    sample(b, "ready", NULL, NULL, vs->not_ready == NULL);
    free(ls);
    free(ss);
}

static void json_kv_str(struct admin_buf *b, const char *key, const char *v, int comma)
{
    admin_buf_json_str(b, key);
    admin_buf_add(b, ":", 1);
    admin_buf_json_str(b, v);
    if (comma)
        admin_buf_add(b, ",", 1);
}

static void json_kv_num(struct admin_buf *b, const char *key, long long v, int comma)
{
    admin_buf_json_str(b, key);
    admin_buf_printf(b, ":%lld%s", v, comma ? "," : "");
}

/* The most header= parameters one /authz question may carry. */
#define AUTHZ_HEADERS_MAX 32

/* A per-request /authz question: method, path and headers as given, in one buffer. */
struct authz_request {
    struct intent_http_req rq;                     /* what is evaluated: normalized path, headers */
    struct http_header headers[AUTHZ_HEADERS_MAX]; /* as given */
    size_t nheaders;
    char method[64];
    char path[ADMIN_TARGET_MAX];
    char text[ADMIN_TARGET_MAX]; /* the header parameters, decoded, each NUL-terminated */
    char normalized[PATHNORM_OUT_MAX(ADMIN_TARGET_MAX) + 1];
};

static int is_space(char c)
{
    return c == ' ' || c == '\t';
}

/*
 * Reads method=, path= and every header=name:value of <query> into <ar>. Returns 1 for a
 * per-request question, 0 when none of them is present (the per-connection question), or -1
 * with a message in <why>. A header's name ends at its first ':' (after a leading one, for
 * pseudo-headers such as :authority), so values may hold ':'. "host" and ":authority" set the
 * authority as well.
 */
static int authz_read_request(const char *query, struct authz_request *ar, char *why, size_t whylen)
{
    int per_request = 0;
    memset(&ar->rq, 0, sizeof(ar->rq));
    int rc = admin_query_param(query, "method", ar->method, sizeof(ar->method));
    if (rc == -ENOENT) {
        snprintf(ar->method, sizeof(ar->method), "GET");
    } else if (rc <= 0) {
        snprintf(why, whylen, "method= must be a short, non-empty token");
        return -1;
    } else {
        per_request = 1;
    }
    rc = admin_query_param(query, "path", ar->path, sizeof(ar->path));
    if (rc == -ENOENT) {
        snprintf(ar->path, sizeof(ar->path), "/");
    } else if (rc < 0) {
        snprintf(why, whylen, "path= is malformed");
        return -1;
    } else {
        per_request = 1;
    }
    /* The query is neither normalized nor matched (a '#' is left for pathnorm to refuse). */
    ar->path[strcspn(ar->path, "?")] = '\0';
    ar->rq.method = (struct http_slice){ar->method, strlen(ar->method)};
    /* rq.path and rq.headers are set by authz_normalize(). */

    size_t used = 0;
    const char *p = query;
    while (*p != '\0') {
        size_t seg = strcspn(p, "&");
        char one[ADMIN_TARGET_MAX], hdr[ADMIN_TARGET_MAX];
        snprintf(one, sizeof(one), "%.*s", (int)seg, p);
        p += seg + (p[seg] == '&');
        rc = admin_query_param(one, "header", hdr, sizeof(hdr));
        if (rc == -ENOENT)
            continue;
        per_request = 1;
        const char *colon = rc > 1 ? strchr(hdr + 1, ':') : NULL;
        if (rc < 0 || colon == NULL) {
            snprintf(why, whylen, "header= must be name:value");
            return -1;
        }
        if (ar->nheaders == AUTHZ_HEADERS_MAX) {
            snprintf(why, whylen, "at most %d header= parameters", AUTHZ_HEADERS_MAX);
            return -1;
        }
        size_t nlen = (size_t)(colon - hdr);
        const char *v = colon + 1;
        size_t vlen = strlen(v);
        while (vlen > 0 && is_space(*v)) {
            v++;
            vlen--;
        }
        while (vlen > 0 && is_space(v[vlen - 1]))
            vlen--;
        /* They always fit (each came from a longer part of the query); checked all the same. */
        if (used + nlen + vlen + 2 > sizeof(ar->text)) {
            snprintf(why, whylen, "the header= parameters are too long");
            return -1;
        }
        char *name = ar->text + used;
        memcpy(name, hdr, nlen);
        name[nlen] = '\0';
        char *value = name + nlen + 1;
        memcpy(value, v, vlen);
        value[vlen] = '\0';
        used += nlen + vlen + 2;
        struct http_header *h = &ar->headers[ar->nheaders++];
        h->name = (struct http_slice){name, nlen};
        h->value = (struct http_slice){value, vlen};
        if (strcasecmp(name, "host") == 0 || strcasecmp(name, ":authority") == 0)
            ar->rq.authority = h->value;
    }
    return per_request;
}

/*
 * Applies the mesh config entry's request normalization as the inbound request path does
 * (pathnorm_request()): the path normalized, header names with '_' dropped or refused. Returns
 * 0 with ar->rq ready, or -1 with why the proxy would answer 400 instead.
 */
static int authz_normalize(struct authz_request *ar, const struct mesh_http_cfg *mh, char *why,
                           size_t whylen)
{
    int redirect = 0;
    size_t plen = 0;
    const char *reason = "";
    ssize_t n = pathnorm_request(mh, (struct http_slice){ar->path, strlen(ar->path)}, ar->headers,
                                 ar->nheaders, ar->normalized, sizeof(ar->normalized) - 1, &plen,
                                 &redirect, &reason);
    if (n < 0) {
        for (size_t i = 0; i < ar->nheaders; i++)
            if (pathnorm_header(mh, ar->headers[i].name) < 0) {
                snprintf(why, whylen, "header %.64s is refused by request normalization (400)",
                         ar->headers[i].name.p);
                return -1;
            }
        snprintf(why, whylen, "request normalization refuses %s (400)", reason);
        return -1;
    }
    ar->normalized[plen] = '\0';
    ar->rq.path = (struct http_slice){ar->normalized, plen};
    ar->rq.headers = ar->headers;
    ar->rq.nheaders = ar->nheaders;
    return 0;
}

static void render_rule(struct admin_buf *b, const struct intent_rule *r)
{
    admin_buf_add(b, "{", 1);
    json_kv_str(b, "source_partition", r->src_partition, 1);
    json_kv_str(b, "source_namespace", r->src_ns, 1);
    json_kv_str(b, "source", r->src_name, 1);
    if (r->src_sameness[0] != '\0')
        json_kv_str(b, "source_sameness_group", r->src_sameness, 1);
    json_kv_str(b, "destination_namespace", r->dst_ns, 1);
    json_kv_str(b, "destination", r->dst_name, 1);
    json_kv_str(b, "action",
                r->has_permissions ? "l7-permissions"
                : r->allow         ? "allow"
                                   : "deny",
                1);
    if (r->has_permissions)
        json_kv_num(b, "permissions", (long long)r->n_perms, 1);
    json_kv_num(b, "precedence", r->precedence, 1);
    json_kv_str(b, "id", r->id, 1);
    json_kv_str(b, "description", r->description, 0);
    admin_buf_add(b, "}", 1);
}

static void render_http_request(struct admin_buf *b, const struct authz_request *ar)
{
    admin_buf_json_str(b, "request");
    admin_buf_add(b, ":{", 2);
    json_kv_str(b, "method", ar->method, 1);
    json_kv_str(b, "path", ar->path, 1);
    if (ar->rq.path.p != NULL)
        json_kv_str(b, "normalized_path", ar->normalized, 1);
    admin_buf_json_str(b, "headers");
    admin_buf_add(b, ":[", 2);
    for (size_t i = 0; i < ar->nheaders; i++) {
        admin_buf_add(b, i == 0 ? "{" : ",{", i == 0 ? 1 : 2);
        if (ar->headers[i].flags & HTTP_HDR_DROP)
            admin_buf_printf(b, "\"dropped\":true,");
        json_kv_str(b, "name", ar->headers[i].name.p, 1);
        json_kv_str(b, "value", ar->headers[i].value.p, 0);
        admin_buf_add(b, "}", 1);
    }
    admin_buf_add(b, "]},", 3);
}

/*
 * /authz?source=<service>[&namespace=&partition=] answers the per-connection (L4) decision;
 * adding method=, path= or header=name:value (repeatable) answers for one HTTP request, with
 * the permission that decided. The request is first normalized as the mesh config entry says
 * (path without its query, header names with '_'); one that normalization refuses gets the
 * decision "reject" (the proxy answers 400 before authorization).
 */
static void render_authz(const struct views *v, const struct views_state *st,
                         const struct admin_request *req, struct admin_reply *reply)
{
    char source[SPIFFE_NAME_MAX], ns[SPIFFE_NAME_MAX], partition[SPIFFE_NAME_MAX];
    struct admin_buf *b = &reply->body;
    if (admin_query_param(req->query, "source", source, sizeof(source)) <= 0) {
        reply->status = 400;
        admin_buf_printf(b, "the source query parameter is required: /authz?source=<service>"
                            "[&method=GET&path=/p&header=name:value]\n");
        return;
    }
    if (admin_query_param(req->query, "namespace", ns, sizeof(ns)) < 0)
        snprintf(ns, sizeof(ns), "default");
    if (admin_query_param(req->query, "partition", partition, sizeof(partition)) < 0)
        snprintf(partition, sizeof(partition), "default");
    struct authz_request *ar = xcalloc(1, sizeof(*ar));
    char why[600];
    int per_request = authz_read_request(req->query, ar, why, sizeof(why));
    if (per_request < 0) {
        reply->status = 400;
        admin_buf_printf(b, "%s\n", why);
        goto out;
    }
    const struct intent_table *intents = inputs_intents(v->in);
    if (intents == NULL) {
        reply->status = 503;
        admin_buf_printf(b, "the intentions have not arrived yet\n");
        goto out;
    }
    static const struct mesh_http_cfg consul_defaults;
    const struct mesh_http_cfg *mh = inputs_mesh_http(v->in);
    reply->content_type = "application/json";
    admin_buf_add(b, "{", 1);
    json_kv_str(b, "source", source, 1);
    json_kv_str(b, "namespace", ns, 1);
    json_kv_str(b, "partition", partition, 1);
    json_kv_str(b, "destination", inputs_service(v->in), 1);
    json_kv_str(b, "mode", per_request ? "request" : "connection", 1);
    if (per_request &&
        authz_normalize(ar, mh != NULL ? mh : &consul_defaults, why, sizeof(why)) != 0) {
        render_http_request(b, ar);
        json_kv_str(b, "decision", "reject", 1);
        json_kv_str(b, "reason", why, 1);
        admin_buf_printf(b, "\"failed_closed\":false,\"intention\":null,\"permission\":null,");
        json_kv_str(b, "decided_by", "request normalization", 0);
        admin_buf_add(b, "}\n", 2);
        goto out;
    }
    struct intent_decision d = per_request
                                   ? intent_eval_http(intents, partition, ns, source, &ar->rq)
                                   : intent_eval(intents, partition, ns, source);
    if (per_request)
        render_http_request(b, ar);
    json_kv_str(b, "decision", d.allow ? "allow" : "deny", 1);
    json_kv_str(b, "reason", intent_describe(&d, why, sizeof(why)), 1);
    if (per_request) {
        admin_buf_json_str(b, "failed_closed");
        admin_buf_printf(b, ":%s,", d.failed_closed ? "true" : "false");
    }
    if (st->current != NULL && st->current->cfg.authorize_with_agent)
        json_kv_str(b, "note",
                    "authorize mode: connections are decided by the agent; this is the local "
                    "intention table's answer",
                    1);
    /* The intention whose source matched: the one that decided, or, when none of an L7
     * intention's permissions matched, the one that left it to the default policy. */
    admin_buf_json_str(b, "intention");
    admin_buf_add(b, ":", 1);
    if (d.matched == NULL)
        admin_buf_add(b, "null", 4);
    else
        render_rule(b, d.matched);
    admin_buf_add(b, ",", 1);
    if (per_request) {
        admin_buf_json_str(b, "permission");
        admin_buf_add(b, ":", 1);
        if (d.perm < 0) {
            admin_buf_add(b, "null,", 5);
        } else {
            const struct intent_perm *p = &d.rule->perms[d.perm];
            admin_buf_add(b, "{", 1);
            json_kv_num(b, "index", d.perm, 1);
            json_kv_str(b, "action", p->allow ? "allow" : "deny", 1);
            json_kv_str(b, "description", intent_perm_describe(p, why, sizeof(why)), 0);
            admin_buf_add(b, "},", 2);
        }
    }
    json_kv_str(b, "decided_by",
                d.perm >= 0      ? "permission"
                : d.rule != NULL ? "intention"
                                 : "default policy",
                0);
    admin_buf_add(b, "}\n", 2);
out:
    free(ar);
}

static const char *tls_version_name(int v)
{
    return v == 12 ? "TLSv1_2" : v == 13 ? "TLSv1_3" : "TLS_AUTO";
}

static void json_limits(struct admin_buf *b, const struct limit_cfg *l)
{
    admin_buf_add(b, "{", 1);
    json_kv_num(b, "max_connections", l->max_connections, 1);
    json_kv_num(b, "max_new_connections_per_second", l->new_per_second, 1);
    json_kv_num(b, "new_connections_burst", l->new_burst, 0);
    admin_buf_add(b, "}", 1);
}

/* ---- an upstream's route table in /config ---- */

static void json_kv_bool(struct admin_buf *b, const char *key, int v, int comma)
{
    admin_buf_json_str(b, key);
    admin_buf_printf(b, ":%s%s", v ? "true" : "false", comma ? "," : "");
}

/* The service-defaults RateLimits.InstanceLevel in force (null: none), in Consul's terms. */
static void config_rate_limits(struct admin_buf *b, const struct limit_rates *r)
{
    static const char *const kinds[] = {[DEC_PATH_EXACT] = "path_exact",
                                        [DEC_PATH_PREFIX] = "path_prefix",
                                        [DEC_PATH_REGEX] = "path_regex"};
    admin_buf_add(b, "\"rate_limits\":", 14);
    if (r == NULL) {
        admin_buf_add(b, "null", 4);
        return;
    }
    size_t n = limit_rates_rules(r);
    for (size_t i = 0; i < n; i++) {
        struct limit_rate_rule x = limit_rates_rule(r, i);
        if (i > 0)
            admin_buf_add(b, i > 1 ? ",{" : ",\"routes\":[{", i > 1 ? 2 : 12);
        else
            admin_buf_add(b, "{", 1);
        if (x.kind >= 0 && (size_t)x.kind < ARRAY_SIZE(kinds) && kinds[x.kind] != NULL)
            json_kv_str(b, kinds[x.kind], x.path, 1);
        json_kv_num(b, "requests_per_second", x.per_second, 1);
        json_kv_num(b, "requests_max_burst", x.burst, 0);
        if (i > 0)
            admin_buf_add(b, "}", 1);
    }
    admin_buf_add(b, n > 1 ? "]}" : ",\"routes\":[]}", n > 1 ? 2 : 13);
}

static void json_str_list(struct admin_buf *b, const char *key, char *const *v, size_t n, int comma)
{
    admin_buf_json_str(b, key);
    admin_buf_add(b, ":[", 2);
    for (size_t i = 0; i < n; i++) {
        if (i > 0)
            admin_buf_add(b, ",", 1);
        admin_buf_json_str(b, v[i]);
    }
    admin_buf_add(b, comma ? "]," : "]", comma ? 2 : 1);
}

static void json_header_kvs(struct admin_buf *b, const char *key, const struct dec_header_kv *v,
                            size_t n)
{
    admin_buf_json_str(b, key);
    admin_buf_add(b, ":{", 2);
    for (size_t i = 0; i < n; i++)
        json_kv_str(b, v[i].name, v[i].value, i + 1 < n);
    admin_buf_add(b, "},", 2);
}

/* {"add":{...},"set":{...},"remove":[...]} */
static void json_header_mods(struct admin_buf *b, const char *key, const struct dec_header_mods *m,
                             int comma)
{
    admin_buf_json_str(b, key);
    admin_buf_add(b, ":{", 2);
    json_header_kvs(b, "add", m->add, m->n_add);
    json_header_kvs(b, "set", m->set, m->n_set);
    json_str_list(b, "remove", m->remove, m->n_remove, 0);
    admin_buf_add(b, comma ? "}," : "}", comma ? 2 : 1);
}

static const char *const path_match_keys[] = {"", "path_exact", "path_prefix", "path_regex"};
static const char *const header_match_keys[] = {"",       "present",  "exact", "prefix",
                                                "suffix", "contains", "regex"};
static const char *const query_match_keys[] = {"", "present", "exact", "regex"};

static void json_route_match(struct admin_buf *b, const struct route *r)
{
    admin_buf_add(b, "\"match\":{", 9);
    if (r->path_match != DEC_PATH_ANY && (size_t)r->path_match < ARRAY_SIZE(path_match_keys))
        json_kv_str(b, path_match_keys[r->path_match], r->path, 1);
    json_kv_bool(b, "case_insensitive", r->case_insensitive, 1);
    admin_buf_add(b, "\"headers\":[", 11);
    for (size_t i = 0; i < r->n_headers; i++) {
        const struct hdr_cond *h = &r->headers[i];
        admin_buf_add(b, i ? ",{" : "{", i ? 2 : 1);
        json_kv_str(b, "name", h->name, 1);
        if ((size_t)h->match < ARRAY_SIZE(header_match_keys)) {
            if (h->match == DEC_HDR_PRESENT)
                json_kv_bool(b, "present", 1, 1);
            else
                json_kv_str(b, header_match_keys[h->match], h->value, 1);
        }
        json_kv_bool(b, "ignore_case", h->ignore_case, 1);
        json_kv_bool(b, "invert", h->invert, 0);
        admin_buf_add(b, "}", 1);
    }
    admin_buf_add(b, "],\"query_params\":[", 18);
    for (size_t i = 0; i < r->n_query; i++) {
        const struct route_query_cond *q = &r->query[i];
        admin_buf_add(b, i ? ",{" : "{", i ? 2 : 1);
        json_kv_str(b, "name", q->name, (size_t)q->match < ARRAY_SIZE(query_match_keys));
        if (q->match == DEC_QUERY_PRESENT)
            json_kv_bool(b, "present", 1, 0);
        else if ((size_t)q->match < ARRAY_SIZE(query_match_keys))
            json_kv_str(b, query_match_keys[q->match], q->value, 0);
        admin_buf_add(b, "}", 1);
    }
    admin_buf_add(b, "],", 2);
    json_str_list(b, "methods", r->methods, r->n_methods, 0);
    admin_buf_add(b, "},", 2);
}

static void json_route_destination(struct admin_buf *b, const struct dec_chain_route *d)
{
    admin_buf_add(b, "\"destination\":{", 15);
    json_kv_str(b, "prefix_rewrite", d->prefix_rewrite, 1);
    json_kv_num(b, "request_timeout_ms", d->request_timeout_ms, 1);
    json_kv_num(b, "idle_timeout_ms", d->idle_timeout_ms, 1);
    json_kv_num(b, "num_retries", d->num_retries, 1);
    json_kv_bool(b, "retry_on_connect_failure", d->retry_on_connect_failure, 1);
    admin_buf_add(b, "\"retry_on\":[", 12);
    int first = 1;
    for (unsigned k = 0; dec_retry_on_name(k) != NULL; k++) {
        if ((d->retry_on & (1u << k)) == 0)
            continue;
        if (!first)
            admin_buf_add(b, ",", 1);
        admin_buf_json_str(b, dec_retry_on_name(k));
        first = 0;
    }
    admin_buf_add(b, "],\"retry_on_status_codes\":[", 27);
    for (size_t i = 0; i < d->n_retry_status_codes; i++)
        admin_buf_printf(b, "%s%u", i ? "," : "", (unsigned)d->retry_status_codes[i]);
    admin_buf_add(b, "],", 2);
    json_header_mods(b, "request_headers", &d->request_headers, 1);
    json_header_mods(b, "response_headers", &d->response_headers, 0);
    admin_buf_add(b, "},", 2);
}

static void json_load_balancer(struct admin_buf *b, const struct dec_load_balancer *lb)
{
    admin_buf_add(b, "\"load_balancer\":{", 17);
    json_kv_str(b, "policy",
                lb->policy == DEC_LB_DEFAULT ? "default" : dec_lb_policy_name(lb->policy), 1);
    json_kv_num(b, "least_request_choice_count", lb->choice_count, 1);
    json_kv_num(b, "ring_hash_minimum_ring_size", lb->ring_min, 1);
    json_kv_num(b, "ring_hash_maximum_ring_size", lb->ring_max, 1);
    admin_buf_add(b, "\"hash_policies\":[", 17);
    for (size_t i = 0; i < lb->n_hash; i++) {
        const struct dec_hash_policy *h = &lb->hash[i];
        admin_buf_add(b, i ? ",{" : "{", i ? 2 : 1);
        if (h->source_ip) {
            json_kv_bool(b, "source_ip", 1, 1);
        } else {
            json_kv_str(b, "field", dec_hash_field_name(h->field), 1);
            json_kv_str(b, "field_value", h->field_value, 1);
        }
        if (h->field == DEC_HASH_COOKIE) {
            json_kv_num(b, "cookie_ttl_ms", h->cookie_ttl_ms, 1);
            json_kv_str(b, "cookie_path", h->cookie_path, 1);
            json_kv_bool(b, "cookie_session", h->cookie_session, 1);
        }
        json_kv_bool(b, "terminal", h->terminal, 0);
        admin_buf_add(b, "}", 1);
    }
    admin_buf_add(b, "]}", 2);
}

/*
 * "routes" and "resolvers" of one upstream: each route with its match, destination and
 * splits (weights and the resolver each leads to, by name), each resolver with its targets
 * (IDs) and load-balancing policy. Both empty for an upstream without a table.
 */
static void json_route_table(struct admin_buf *b, const struct snap_upstream *su)
{
    const struct route_table *t = su->routes;
    size_t n_routes = t != NULL ? route_table_len(t) : 0;
    size_t n_res = t != NULL ? route_table_resolvers(t) : 0;
    admin_buf_add(b, "\"routes\":[", 10);
    for (size_t i = 0; i < n_routes; i++) {
        const struct route *r = route_table_route(t, i);
        admin_buf_add(b, i ? ",{" : "{", i ? 2 : 1);
        json_kv_num(b, "index", (long long)r->index, 1);
        json_kv_str(b, "next_node", r->next_node, 1);
        json_kv_bool(b, "broken", r->broken, 1);
        json_route_match(b, r);
        json_route_destination(b, r->def);
        admin_buf_add(b, "\"splits\":[", 10);
        for (size_t j = 0; j < r->n_splits; j++) {
            const struct route_split *s = &r->splits[j];
            const struct route_resolver *res = route_table_resolver(t, s->resolver);
            admin_buf_add(b, j ? ",{" : "{", j ? 2 : 1);
            admin_buf_printf(b, "\"weight\":%.10g,", s->weight);
            json_kv_str(b, "resolver", res != NULL ? res->name : "", 1);
            json_header_mods(b, "request_headers", s->request_headers, 1);
            json_header_mods(b, "response_headers", s->response_headers, 0);
            admin_buf_add(b, "}", 1);
        }
        admin_buf_add(b, "]}", 2);
    }
    admin_buf_add(b, "],\"resolvers\":[", 15);
    for (size_t i = 0; i < n_res; i++) {
        const struct route_resolver *res = route_table_resolver(t, i);
        admin_buf_add(b, i ? ",{" : "{", i ? 2 : 1);
        json_kv_str(b, "name", res->name, 1);
        admin_buf_add(b, "\"targets\":[", 11);
        for (size_t j = 0; j < res->n_targets; j++) {
            if (j > 0)
                admin_buf_add(b, ",", 1);
            admin_buf_json_str(b, res->targets[j] < su->n_targets ? su->targets[res->targets[j]].id
                                                                  : "");
        }
        admin_buf_add(b, "],", 2);
        json_kv_num(b, "connect_timeout_ms", res->connect_timeout_ms, 1);
        json_kv_num(b, "request_timeout_ms", res->request_timeout_ms, 1);
        json_load_balancer(b, res->lb);
        admin_buf_add(b, "}", 1);
    }
    admin_buf_add(b, "],", 2);
    json_kv_num(b, "broken_regexes", t != NULL ? (long long)route_table_broken(t) : 0, 0);
}

/* The current snapshot's configuration: never key material or tokens. */
static void render_config(const struct views *v, const struct views_state *st,
                          struct admin_reply *reply)
{
    struct admin_buf *b = &reply->body;
    const struct snapshot *s = st->current;
    if (s == NULL) {
        reply->status = 503;
        admin_buf_printf(b, "no configuration yet: %s\n", st->not_ready);
        return;
    }
    const struct proxy_cfg *c = &s->cfg;
    reply->content_type = "application/json";
    admin_buf_add(b, "{", 1);
    json_kv_num(b, "generation", (long long)s->generation, 1);
    json_kv_str(b, "proxy_id", c->proxy_id, 1);
    json_kv_str(b, "service", c->service, 1);
    json_kv_str(b, "datacenter", c->datacenter, 1);
    json_kv_str(b, "namespace", c->ns, 1);
    json_kv_str(b, "partition", c->partition, 1);
    json_kv_str(b, "trust_domain", s->trust_domain, 1);
    admin_buf_add(b, "\"public_listener\":", 18);
    if (c->bind_port == 0 && c->bind_socket_path[0] == '\0') {
        admin_buf_add(b, "null,", 5);
    } else {
        admin_buf_add(b, "{", 1);
        if (c->bind_port != 0) {
            json_kv_str(b, "address", c->bind_address, 1);
            json_kv_num(b, "port", c->bind_port, 1);
        } else {
            json_kv_str(b, "socket_path", c->bind_socket_path, 1);
        }
        admin_buf_add(b, "\"limits\":", 9);
        json_limits(b, &c->limits);
        admin_buf_add(b, "},", 2);
    }
    admin_buf_add(b, "\"local_app\":{", 13);
    json_kv_str(b, "address", c->local_address, 1);
    json_kv_num(b, "port", c->local_port, 1);
    json_kv_str(b, "socket_path", c->local_socket_path, 0);
    admin_buf_add(b, "},\"timeouts_ms\":{", 17);
    json_kv_num(b, "local_connect", c->local_connect_timeout_ms, 1);
    json_kv_num(b, "handshake", c->handshake_timeout_ms, 1);
    json_kv_num(b, "idle", c->idle_timeout_ms, 1);
    json_kv_num(b, "max_lifetime", c->max_lifetime_ms, 1);
    json_kv_num(b, "reauthorize_interval", c->reauthorize_interval_ms, 1);
    json_kv_num(b, "authorize", c->authorize_timeout_ms, 0);
    admin_buf_add(b, "},\"tls\":{", 9);
    json_kv_str(b, "min_version", tls_version_name(c->tls_min_version), 1);
    json_kv_str(b, "max_version", tls_version_name(c->tls_max_version), 1);
    json_kv_str(b, "cipher_suites", c->tls_cipher_suites, 1);
    json_kv_num(b, "verify_trust_domain", c->verify_trust_domain, 1);
    json_kv_num(b, "tls_resumption", c->tls_resumption, 1);
    const struct dec_leaf *leaf = inputs_leaf(v->in);
    json_kv_str(b, "leaf_serial", leaf ? leaf->serial : NULL, 1);
    json_kv_str(b, "leaf_valid_before", leaf ? leaf->valid_before : NULL, 1);
    json_kv_num(b, "leaf_not_after", tls_ctx_leaf_not_after(s->tls), 0);
    admin_buf_add(b, "},\"authorization\":{", 19);
    json_kv_str(b, "mode", c->authorize_with_agent ? "agent" : "intentions", 1);
    json_kv_num(b, "intentions", (long long)intent_table_len(s->intents), 1);
    json_kv_str(b, "default", intent_table_default_allow(s->intents) ? "allow" : "deny", 0);
    /* The mesh config entry's HTTP.Incoming.RequestNormalization, in its own spelling. */
    admin_buf_add(b, "},\"request_normalization\":{", 27);
    json_kv_num(b, "insecure_disable_path_normalization", s->mesh_http.disable_path_normalization,
                1);
    json_kv_num(b, "merge_slashes", s->mesh_http.merge_slashes, 1);
    json_kv_str(b, "path_with_escaped_slashes_action",
                pathnorm_escaped_slash_name(s->mesh_http.escaped_slash), 1);
    json_kv_str(b, "headers_with_underscores_action",
                pathnorm_underscore_name(s->mesh_http.underscore), 0);
    admin_buf_add(b, "},", 2);
    config_rate_limits(b, s->rates);
    admin_buf_add(b, ",\"upstreams\":[", 14);
    for (size_t i = 0; i < c->n_upstreams; i++) {
        const struct upstream_cfg *u = &c->upstreams[i];
        const struct snap_upstream *su = &s->upstreams[i];
        admin_buf_add(b, i ? ",{" : "{", i ? 2 : 1);
        json_kv_str(b, "key", u->key, 1);
        json_kv_str(b, "destination_type", u->destination_type, 1);
        json_kv_str(b, "destination_name", u->destination_name, 1);
        json_kv_str(b, "namespace", u->ns, 1);
        json_kv_str(b, "partition", u->partition, 1);
        json_kv_str(b, "datacenter", u->datacenter, 1);
        json_kv_str(b, "bind_address", u->bind_address, 1);
        json_kv_num(b, "bind_port", u->bind_port, 1);
        json_kv_str(b, "bind_socket_path", u->bind_socket_path, 1);
        json_kv_num(b, "connect_timeout_ms", u->connect_timeout_ms, 1);
        json_kv_num(b, "idle_timeout_ms", u->idle_timeout_ms, 1);
        admin_buf_add(b, "\"limits\":", 9);
        json_limits(b, &u->limits);
        admin_buf_add(b, ",\"targets\":[", 12);
        for (size_t j = 0; j < su->n_targets; j++) {
            const struct snap_target *t = &su->targets[j];
            admin_buf_add(b, j ? ",{" : "{", j ? 2 : 1);
            json_kv_str(b, "id", t->id, 1);
            json_kv_str(b, "service", t->service, 1);
            json_kv_num(b, "healthy_endpoints", (long long)t->endpoints->n, 0);
            admin_buf_add(b, "}", 1);
        }
        admin_buf_add(b, "],", 2);
        json_kv_str(b, "protocol", proxycfg_protocol_name(su->protocol), 1);
        json_route_table(b, su);
        admin_buf_add(b, "}", 1);
    }
    admin_buf_add(b, "]}\n", 3);
}

/*
 * /connections: each worker lists its own sessions on its own thread (worker_list_sessions);
 * the answer goes out when every worker has answered or CONNECTIONS_WAIT_MS has passed. A job
 * whose answer went out early stays until its last worker answers (or the workers are gone),
 * because the workers may still write into it; meanwhile further requests get a 503.
 */
struct conn_job {
    struct worker_listing *listings; /* one per worker */
    int n;
    struct admin_reply *reply; /* NULL once answered or cancelled */
};

static void conn_job_free(struct conn_job *j)
{
    if (j == NULL)
        return;
    for (int i = 0; i < j->n; i++)
        free(j->listings[i].v);
    free(j->listings);
    free(j);
}

static void render_connections(const struct views *v, const struct conn_job *j,
                               struct admin_reply *reply)
{
    struct admin_buf *b = &reply->body;
    uint64_t total = 0;
    int missing = 0, first = 1;
    reply->content_type = "application/json";
    admin_buf_add(b, "{\"connections\":[", 16);
    for (int w = 0; w < j->n; w++) {
        struct worker_listing *l = &j->listings[w];
        if (!atomic_load_explicit(&l->done, memory_order_acquire)) {
            missing++;
            continue;
        }
        total += l->n;
        for (size_t k = 0; k < MIN(l->n, l->max); k++) {
            const struct session_info *s = &l->v[k];
            admin_buf_add(b, first ? "{" : ",{", first ? 1 : 2);
            first = 0;
            json_kv_num(b, "id", (long long)s->id, 1);
            json_kv_num(b, "worker", w, 1);
            json_kv_str(b, "direction", s->inbound ? "inbound" : "outbound", 1);
            json_kv_str(b, "state", s->state, 1);
            json_kv_str(b, "peer_address", s->peer_addr, 1);
            json_kv_str(b, "peer_identity", s->identity[0] ? s->identity : NULL, 1);
            json_kv_str(b, "local_service", s->inbound ? inputs_service(v->in) : NULL, 1);
            json_kv_str(b, "upstream", s->inbound ? NULL : s->upstream, 1);
            json_kv_str(b, "endpoint", s->endpoint[0] ? s->endpoint : NULL, 1);
            json_kv_num(b, "age_ms", (long long)s->age_ms, 1);
            json_kv_num(b, "bytes_in", (long long)s->bytes_in, 1);
            json_kv_num(b, "bytes_out", (long long)s->bytes_out, 0);
            admin_buf_add(b, "}", 1);
        }
    }
    admin_buf_add(b, "],", 2);
    json_kv_num(b, "total", (long long)total, 1);
    json_kv_num(b, "workers_not_answering", missing, 0);
    admin_buf_add(b, "}\n", 2);
}

/* Answers the pending /connections request when it is complete (or <force>d), and frees a
 * job every worker has answered. */
static void connections_poll(struct views *v, int force)
{
    struct conn_job *j = v->conn_job;
    if (j == NULL)
        return;
    int done = 0;
    for (int i = 0; i < j->n; i++)
        done += atomic_load_explicit(&j->listings[i].done, memory_order_acquire);
    if (j->reply != NULL && (done == j->n || force)) {
        struct admin_reply *r = j->reply;
        j->reply = NULL;
        loop_timer_stop(v->loop, &v->conn_wait);
        render_connections(v, j, r);
        admin_reply_send(r);
    }
    if (done == j->n && j->reply == NULL) {
        conn_job_free(j);
        v->conn_job = NULL;
    }
}

static void on_conn_wait(struct loop_timer *t)
{
    connections_poll(t->data, 1);
}

static void on_listed(struct loop_receiver *r)
{
    connections_poll(r->data, 0);
}

static void on_conn_cancel(void *data)
{
    struct views *v = data;
    v->conn_job->reply = NULL;
    loop_timer_stop(v->loop, &v->conn_wait);
    connections_poll(v, 0);
}

static void connections_start(struct views *v, struct admin_reply *reply)
{
    if (v->conn_job != NULL) {
        reply->status = 503;
        admin_buf_printf(&reply->body, "a /connections listing is still being collected\n");
        admin_reply_send(reply);
        return;
    }
    struct conn_job *j = xcalloc(1, sizeof(*j));
    j->n = v->n_workers;
    j->listings = xcalloc((size_t)j->n, sizeof(*j->listings));
    j->reply = reply;
    reply->cancel = on_conn_cancel;
    reply->cancel_data = v;
    v->conn_job = j;
    for (int i = 0; i < j->n; i++) {
        struct worker_listing *l = &j->listings[i];
        l->max = CONNECTIONS_MAX_PER_WORKER;
        l->v = xcalloc(l->max, sizeof(*l->v));
        l->notify = &v->listed;
        worker_list_sessions(v->workers[i], l);
    }
    loop_timer_start(v->loop, &v->conn_wait, CONNECTIONS_WAIT_MS);
}

void views_answer(struct views *v, const struct views_state *st, const struct admin_request *req,
                  struct admin_reply *reply)
{
    struct admin_buf *b = &reply->body;
    if (strcmp(req->path, "/ready") == 0) {
        /* Fail static: an unreachable agent does not make a serving proxy unready (a probe
         * would take it out of service for the agent's fault), but the answer says so. */
        const char *why = st->not_ready;
        reply->status = why == NULL ? 200 : 503;
        if (st->agent_down == NULL)
            admin_buf_printf(b, "%s\n", why == NULL ? "ready" : why);
        else if (why == NULL)
            admin_buf_printf(b, "ready; agent %s unreachable: serving the last good state\n",
                             st->agent_down);
        else
            admin_buf_printf(b, "%s; agent %s unreachable\n", why, st->agent_down);
    } else if (strcmp(req->path, "/metrics") == 0) {
        reply->content_type = "text/plain; version=0.0.4; charset=utf-8";
        render_metrics(v, st, b);
    } else if (strcmp(req->path, "/authz") == 0) {
        render_authz(v, st, req, reply);
    } else if (strcmp(req->path, "/config") == 0) {
        render_config(v, st, reply);
    } else if (strcmp(req->path, "/connections") == 0) {
        connections_start(v, reply);
        return;
    } else {
        reply->status = 404;
        admin_buf_printf(b,
                         "not found; try /ready, /metrics, /connections, /authz?source=<service> "
                         "or /config\n");
    }
    admin_reply_send(reply);
}

struct views *views_new(struct loop *loop, struct worker *const *workers, int n_workers,
                        const struct inputs *in, const struct upstreams *ups,
                        const struct limit_state *inbound_limit)
{
    struct views *v = xcalloc(1, sizeof(*v));
    v->loop = loop;
    v->workers = workers;
    v->n_workers = n_workers;
    v->in = in;
    v->ups = ups;
    v->inbound_limit = inbound_limit;
    loop_timer_init(&v->conn_wait, on_conn_wait, v);
    loop_receiver_register(loop, &v->listed, on_listed, v);
    return v;
}

void views_free(struct views *v)
{
    if (v == NULL)
        return;
    loop_timer_stop(v->loop, &v->conn_wait);
    loop_receiver_unregister(&v->listed);
    conn_job_free(v->conn_job); /* no worker can write into it now */
    free(v);
}
