/*
 * control: the control thread's life. It finds the proxy's registration and watches it, hands
 * the configuration to its parts (inputs: roots, leaf and intentions; upstreams: chains and
 * health; register: -register), answers the workers' wake-ups (authorize: questions; views:
 * /connections), rebuilds and publishes a new snapshot to every worker when any part's state
 * changed, and drains and stops on signals.
 *
 * Inputs fail independently: a malformed or refused answer is logged and the last good state
 * stays in force (the watch backs off and retries). Nothing is served before the registration,
 * a leaf, the roots and the intentions have all arrived once.
 *
 *   start -> [LOOKUP (-sidecar-for only)] -> WATCHING -> (SIGTERM/SIGINT) -> DRAINING -> STOPPING
 *
 * DRAINING: every worker closes its listeners at once and lets its open connections finish;
 * the control thread keeps its watches (intention changes still apply) and stops when all
 * workers report no session left, when -drain-timeout has passed, or on a second signal.
 */
#include "control.h"
#include "admin.h"
#include "agent.h"
#include "alog.h"
#include "authorize.h"
#include "authq.h"
#include "decode.h"
#include "inputs.h"
#include "intent.h"
#include "limit.h"
#include "log.h"
#include "loop.h"
#include "notify.h"
#include "proxycfg.h"
#include "register.h"
#include "snapshot.h"
#include "tls.h"
#include "upstreams.h"
#include "util.h"
#include "watch.h"
#include "worker.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/signalfd.h>
#include <unistd.h>

/*
 * views: the admin endpoint's answers, rendered from the control thread's state: /ready,
 * /metrics (Prometheus text, the workers' counters summed), /config (the current snapshot,
 * never key material or tokens), /authz (the current intention table's decision for one
 * source) and /connections (each worker lists its own sessions on its own thread). The HTTP
 * server itself is admin.c; JSON is written by hand through its escaping buffer.
 *
 * Control thread only.
 */
struct views;

/* What the control loop knows at the time of one request (borrowed for the call). */
struct views_state {
    const char *not_ready;            /* why /ready answers 503, or NULL when ready */
    const struct snapshot *current;   /* the snapshot last published, or NULL */
    const struct watch *registration; /* the registration watch, or NULL */
};

/*
 * Creates the renderer for <n_workers> <workers>, the state in <in> and <ups>, and the public
 * listener's <inbound_limit>, all borrowed: they must outlive it.
 */
struct views *views_new(struct loop *loop, struct worker *const *workers, int n_workers,
                        const struct inputs *in, const struct upstreams *ups,
                        const struct limit_state *inbound_limit);
/* Frees <v> and a /connections listing still held; only after the workers are joined. */
void views_free(struct views *v);
/*
 * Answers <req> into <reply> and sends it, at once or (for /connections) once every worker
 * has answered or 2 s have passed.
 */
void views_answer(struct views *v, const struct views_state *st, const struct admin_request *req,
                  struct admin_reply *reply);
/* The control loop's wake-up: sends a /connections answer whose workers have all answered. */
void views_poll(struct views *v);

#define DRAIN_POLL_MS 20

struct control {
    const struct config *conf;
    struct loop *loop;
    struct agent *agent;
    struct watch_reach *reach; /* shared by every watch: one "agent unreachable" per outage */
    struct worker **workers;
    int n_workers;
    int exit_code;
    struct limit_state *inbound_limit; /* the public listener's, across snapshots */
    int draining;
    int drain_done; /* the drain finished or timed out (or there was none to do) */
    uint64_t drain_deadline_ms;
    struct loop_timer drain_poll;
    int stopping; /* a stop signal arrived; deregistering before the loop ends */

    /* finding the registration */
    char *proxy_id;
    struct agent_req *lookup;
    struct loop_timer lookup_retry;
    unsigned lookup_failures;
    struct watch *svc_watch;

    struct proxy_cfg cfg;
    int have_cfg;
    struct proxycfg_warned warned; /* warnings already logged once (bounded) */

    /* the parts, each with its own state */
    struct inputs *in;        /* roots, leaf, intentions: TLS context and intention table */
    struct upstreams *ups;    /* one per cfg.upstreams entry, same order */
    struct authorize *authz;  /* authorize mode: the workers' questions */
    struct register_ctx *reg; /* -register, or NULL */
    struct views *views;      /* the admin endpoint's answers */
    struct authq_box *ask;    /* the workers' questions arrive here */
    struct admin *admin;      /* -admin-bind */

    uint64_t generation;
    struct snapshot *current;
    struct loop_defer rebuild;

    int sigfd;
    struct loop_io sig_io;
};

static void schedule_rebuild(struct control *ctl);

static void warn_once(struct control *ctl, const char *msg)
{
    const char *line = proxycfg_warn_once(&ctl->warned, msg);
    if (line != NULL)
        LOG_WARN("%s", line);
}

static void on_inputs(void *data, enum inputs_event ev)
{
    struct control *ctl = data;
    if (ev == INPUTS_INTENTIONS_CHANGING)
        authorize_cache_clear(ctl->authz);
    else
        schedule_rebuild(ctl);
}

static void on_upstreams(void *data)
{
    schedule_rebuild(data);
}

/* ---- the registration ---- */

static void apply_cfg(struct control *ctl, struct proxy_cfg *cfg_in, const char *source);

static int on_service(void *data, const struct agent_response *resp)
{
    struct control *ctl = data;
    char err[512];
    struct dec_service svc;
    struct proxy_cfg cfg;
    int rc = decode_agent_service(resp->body, resp->body_len, &svc, err, sizeof(err));
    if (rc != 0) {
        LOG_ERROR("registration of %s: %s; keeping the previous configuration", ctl->proxy_id, err);
        return rc;
    }
    rc = proxycfg_build(&svc, &cfg, err, sizeof(err));
    dec_service_dispose(&svc);
    if (rc != 0) {
        LOG_ERROR("registration of %s: %s; keeping the previous configuration", ctl->proxy_id, err);
        return rc;
    }
    apply_cfg(ctl, &cfg, "registration");
    return 0;
}

/* Makes <cfg> (taken) the configuration in force: watches for a new identity, upstreams. */
static void apply_cfg(struct control *ctl, struct proxy_cfg *cfg_in, const char *source)
{
    struct proxy_cfg cfg = *cfg_in;
    for (size_t i = 0; i < cfg.n_warnings; i++)
        warn_once(ctl, cfg.warnings[i]);

    inputs_set_service(ctl->in, cfg.service, cfg.ns, cfg.partition);
    upstreams_reconcile(ctl->ups, &cfg);
    if (ctl->have_cfg)
        proxycfg_dispose(&ctl->cfg);
    ctl->cfg = cfg;
    ctl->have_cfg = 1;
    inputs_set_tls(ctl->in, cfg.tls_min_version, cfg.tls_max_version, cfg.tls_cipher_suites);
    char pub[300];
    if (cfg.bind_port == 0 && cfg.bind_socket_path[0] != '\0')
        snprintf(pub, sizeof(pub), "unix:%s", cfg.bind_socket_path);
    else
        snprintf(pub, sizeof(pub), "%s:%d", cfg.bind_address, cfg.bind_port);
    LOG_INFO("%s %s: service %s, public %s -> %s:%d, %zu upstream(s)", source, cfg.proxy_id,
             cfg.service, pub, cfg.local_address, cfg.local_port, cfg.n_upstreams);
    schedule_rebuild(ctl);
}

static void start_registration_watch(struct control *ctl)
{
    char *esc = util_url_escape(ctl->proxy_id);
    char *path = xasprintf("/v1/agent/service/%s", esc);
    char *name = xasprintf("registration %s", ctl->proxy_id);
    struct watch_spec spec = {
        .name = name, .method = "GET", .path = path, .block = WATCH_BY_HASH, .reach = ctl->reach};
    ctl->svc_watch = watch_start(ctl->agent, &spec, on_service, ctl);
    free(esc);
    free(path);
    free(name);
    schedule_rebuild(ctl);
}

/* ---- -sidecar-for: one lookup of the local services, retried while the agent is away ---- */

static void lookup_start(struct control *ctl);

static void on_lookup_retry(struct loop_timer *t)
{
    lookup_start(t->data);
}

static void on_lookup(void *data, const struct agent_response *resp)
{
    struct control *ctl = data;
    char err[1024];
    ctl->lookup = NULL;
    watch_reach_note(ctl->reach, resp);
    if (resp->status != 200) {
        if (ctl->lookup_failures == 0) {
            char what[320];
            if (resp->status != 0)
                snprintf(what, sizeof(what), "HTTP %ld%s", resp->status,
                         resp->status == 403 ? " (the ACL token is unknown or lacks service:read)"
                                             : "");
            else
                snprintf(what, sizeof(what), "transport error: %s", resp->error);
            LOG_WARN("finding the sidecar for %s: GET /v1/agent/services on agent %s: %s; "
                     "retrying",
                     ctl->conf->sidecar_for, agent_addr(ctl->agent), what);
        }
        watch_retry_later(ctl->loop, &ctl->lookup_retry, ctl->lookup_failures++);
        return;
    }
    int rc = decode_sidecar_for(resp->body, resp->body_len, ctl->conf->sidecar_for, &ctl->proxy_id,
                                err, sizeof(err));
    if (rc == -ENOENT) {
        LOG_ERROR("no sidecar proxy is registered for service ID %s", ctl->conf->sidecar_for);
        ctl->exit_code = 1;
        loop_stop(ctl->loop);
        return;
    }
    if (rc != 0) {
        LOG_ERROR("finding the sidecar for %s: %s%s", ctl->conf->sidecar_for, err,
                  rc == -EEXIST ? "; use -proxy-id" : "");
        ctl->exit_code = 1;
        loop_stop(ctl->loop);
        return;
    }
    LOG_INFO("sidecar for %s is %s", ctl->conf->sidecar_for, ctl->proxy_id);
    start_registration_watch(ctl);
}

static void lookup_start(struct control *ctl)
{
    ctl->lookup =
        agent_request(ctl->agent, "GET", "/v1/agent/services", NULL, 30000, on_lookup, ctl);
}

/* ---- snapshots ---- */

static void do_rebuild(struct loop_defer *d)
{
    struct control *ctl = (struct control *)((char *)d - offsetof(struct control, rebuild));
    struct tls_ctx *tls = inputs_tls(ctl->in);
    struct intent_table *intents = inputs_intents(ctl->in);
    const char *trust_domain = inputs_trust_domain(ctl->in);
    if (!ctl->have_cfg || tls == NULL || intents == NULL || trust_domain == NULL)
        return;
    struct upstreams_parts parts;
    upstreams_parts(ctl->ups, ctl->cfg.n_upstreams, &parts);
    struct snapshot *s = snapshot_new(++ctl->generation, &ctl->cfg, trust_domain, tls, intents,
                                      (const struct snap_target *const *)parts.targets,
                                      parts.n_targets, ctl->inbound_limit, parts.limits);
    upstreams_parts_dispose(&parts);
    if (ctl->current == NULL)
        LOG_INFO("ready: serving %s as %s", ctl->cfg.service, ctl->proxy_id);
    LOG_DEBUG("publishing snapshot %llu", (unsigned long long)s->generation);
    for (int i = 0; i < ctl->n_workers; i++)
        worker_publish(ctl->workers[i], s);
    snapshot_unref(ctl->current);
    ctl->current = s;
}

static void schedule_rebuild(struct control *ctl)
{
    loop_defer(ctl->loop, &ctl->rebuild, do_rebuild);
}

/* ---- wake-ups from the workers ---- */

/* After a stop signal: ends the loop once the drain and any deregistration are both over. */
static void stop_when_done(struct control *ctl)
{
    if (ctl->stopping && ctl->drain_done && !register_busy(ctl->reg))
        loop_stop(ctl->loop);
}

static void on_deregistered(void *data)
{
    stop_when_done(data);
}

static void on_ask(struct loop *loop, void *data)
{
    struct control *ctl = data;
    (void)loop;
    for (int i = 0; i < ctl->n_workers; i++) {
        if (worker_startup_failed(ctl->workers[i]) && !ctl->stopping) {
            LOG_ERROR("worker %d could not open every listener at start-up (see above); exiting",
                      i);
            ctl->exit_code = 1;
            ctl->stopping = 1;
            loop_stop(ctl->loop);
            return;
        }
    }
    views_poll(ctl->views);
    struct authq_req *r = authq_box_take(ctl->ask);
    while (r != NULL) {
        struct authq_req *next = r->next;
        authorize_submit(ctl->authz, r);
        r = next;
    }
}

/* ---- signals ---- */

static void on_drain_poll(struct loop_timer *t)
{
    struct control *ctl = t->data;
    int left = 0;
    for (int i = 0; i < ctl->n_workers; i++)
        left += !worker_drained(ctl->workers[i]);
    if (left == 0) {
        LOG_INFO("drained: every connection has finished; stopping");
        ctl->drain_done = 1;
        stop_when_done(ctl);
    } else if (loop_now_ms(ctl->loop) >= ctl->drain_deadline_ms) {
        LOG_INFO("drain timeout (%lu ms) over with connections open on %d worker(s); closing "
                 "them and stopping",
                 (unsigned long)ctl->conf->drain_timeout_ms, left);
        ctl->drain_done = 1;
        stop_when_done(ctl);
    } else {
        loop_timer_start(ctl->loop, t, DRAIN_POLL_MS);
    }
}

static void on_signal(struct loop_io *io, unsigned events)
{
    struct control *ctl = io->data;
    struct signalfd_siginfo si;
    (void)events;
    while (read(ctl->sigfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
        if (si.ssi_signo == SIGHUP) {
            alog_reopen(); /* after log rotation */
            continue;
        }
        if (ctl->stopping) {
            LOG_INFO("received %s again; stopping now", strsignal((int)si.ssi_signo));
            loop_stop(ctl->loop);
            continue;
        }
        ctl->stopping = 1;
        notify_send("STOPPING=1");
        if (ctl->conf->drain_timeout_ms == 0) {
            LOG_INFO("received %s; stopping", strsignal((int)si.ssi_signo));
            ctl->drain_done = 1;
        } else {
            LOG_INFO("received %s; closing listeners and draining open connections for up to "
                     "%lu ms",
                     strsignal((int)si.ssi_signo), (unsigned long)ctl->conf->drain_timeout_ms);
            ctl->draining = 1;
            ctl->drain_deadline_ms = loop_now_ms(ctl->loop) + ctl->conf->drain_timeout_ms;
            for (int i = 0; i < ctl->n_workers; i++)
                worker_drain(ctl->workers[i]);
            loop_timer_start(ctl->loop, &ctl->drain_poll, DRAIN_POLL_MS);
        }
        if (ctl->reg != NULL)
            register_leave(ctl->reg); /* while the drain runs (a second signal does not wait) */
        stop_when_done(ctl);
    }
}

/* ---- admin endpoint ---- */

/* Why the proxy is not ready, or NULL when it is. */
static const char *not_ready_reason(const struct control *ctl)
{
    if (ctl->draining || ctl->stopping)
        return "draining: connectd is stopping";
    if (!ctl->have_cfg)
        return "waiting for the proxy registration";
    const char *waiting = inputs_waiting_for(ctl->in);
    if (waiting != NULL)
        return waiting;
    if (ctl->current == NULL)
        return "no configuration published to the workers yet";
    for (int i = 0; i < ctl->n_workers; i++)
        if (!worker_listening(ctl->workers[i]))
            return "listeners are not all open";
    return NULL;
}

/*
 * views: what the admin endpoint answers. /metrics sums the workers' session_stats blocks
 * (written by each worker with relaxed atomic adds, read here racily but atomically) and shows
 * every watch's health; /connections posts a worker_listing to each worker and answers when
 * all have filled theirs or CONNECTIONS_WAIT_MS has passed.
 */

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
}

struct source_sum {
    const char *name;
    uint64_t allow, deny;
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

static void listener_label(struct admin_buf *b, const char *name, const struct listener_sum *l)
{
    admin_buf_printf(b, "connectd_%s{listener=", name);
    admin_buf_label(b, l->inbound ? "public" : "upstream");
    if (!l->inbound) {
        admin_buf_add(b, ",upstream=", 10);
        admin_buf_label(b, l->name);
    }
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

static void render_metrics(const struct views *vw, const struct views_state *vs,
                           struct admin_buf *b)
{
    struct listener_sum *ls = NULL;
    struct source_sum *ss = NULL;
    size_t nl = 0, ns = 0;
    uint64_t hs[SESSION_HS_COUNT] = {0}, tls_hs[2][2] = {{0}};
    uint64_t refused_max = 0, refused_rate = 0, idle = 0, lifetime = 0, reauth = 0,
             reauth_closed = 0, refused_pending = 0, refused_pending_source = 0, refused_fds = 0;
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
        if (load(&st->other_source.allow) + load(&st->other_source.deny) != 0)
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
        idle += load(&st->counters.closed_idle);
        lifetime += load(&st->counters.closed_lifetime);
        reauth += load(&st->counters.reauthorized);
        reauth_closed += load(&st->counters.reauthorize_closed);
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

    metric_head(b, "reauthorizations_total", "counter",
                "Open inbound sessions re-evaluated against the intentions.");
    sample(b, "reauthorizations_total", NULL, NULL, reauth);
    metric_head(b, "reauthorization_closes_total", "counter",
                "Open inbound sessions ended because a re-evaluation denied them.");
    sample(b, "reauthorization_closes_total", NULL, NULL, reauth_closed);
    metric_head(b, "limit_refusals_total", "counter",
                "Connections refused at accept by a listener's limits, by limit.");
    sample(b, "limit_refusals_total", "limit", "max_connections", refused_max);
    sample(b, "limit_refusals_total", "limit", "rate", refused_rate);
    sample(b, "limit_refusals_total", "limit", "pending_handshakes", refused_pending);
    sample(b, "limit_refusals_total", "limit", "pending_handshakes_per_source",
           refused_pending_source);
    sample(b, "limit_refusals_total", "limit", "descriptor_reserve", refused_fds);
    metric_head(b, "pending_handshakes", "gauge",
                "Inbound connections in the TLS handshake now, over all workers.");
    sample(b, "pending_handshakes", NULL, NULL, (uint64_t)limit_pending_count(vw->inbound_limit));
    metric_head(b, "timeout_closes_total", "counter",
                "Sessions ended by the idle timeout or the lifetime bound, by kind.");
    sample(b, "timeout_closes_total", "kind", "idle", idle);
    sample(b, "timeout_closes_total", "kind", "lifetime", lifetime);

    render_watches(vw, vs, b);

    metric_head(b, "leaf_not_after_seconds", "gauge",
                "Unix time at which the current leaf certificate expires.");
    const struct tls_ctx *tls = inputs_tls(vw->in);
    if (tls != NULL)
        admin_buf_printf(b, "connectd_leaf_not_after_seconds %lld\n", tls_ctx_leaf_not_after(tls));
    metric_head(b, "snapshot_generation", "gauge",
                "Generation of the configuration snapshot last published to the workers.");
    sample(b, "snapshot_generation", NULL, NULL, vs->current ? vs->current->generation : 0);
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

static void render_authz(const struct views *v, const struct views_state *st,
                         const struct admin_request *req, struct admin_reply *reply)
{
    char source[SPIFFE_NAME_MAX], ns[SPIFFE_NAME_MAX], partition[SPIFFE_NAME_MAX];
    struct admin_buf *b = &reply->body;
    if (admin_query_param(req->query, "source", source, sizeof(source)) <= 0) {
        reply->status = 400;
        admin_buf_printf(b, "the source query parameter is required: /authz?source=<service>\n");
        return;
    }
    if (admin_query_param(req->query, "namespace", ns, sizeof(ns)) < 0)
        snprintf(ns, sizeof(ns), "default");
    if (admin_query_param(req->query, "partition", partition, sizeof(partition)) < 0)
        snprintf(partition, sizeof(partition), "default");
    const struct intent_table *intents = inputs_intents(v->in);
    if (intents == NULL) {
        reply->status = 503;
        admin_buf_printf(b, "the intentions have not arrived yet\n");
        return;
    }
    struct intent_decision d = intent_eval(intents, partition, ns, source);
    char why[600];
    reply->content_type = "application/json";
    admin_buf_add(b, "{", 1);
    json_kv_str(b, "source", source, 1);
    json_kv_str(b, "namespace", ns, 1);
    json_kv_str(b, "partition", partition, 1);
    json_kv_str(b, "destination", inputs_service(v->in), 1);
    json_kv_str(b, "decision", d.allow ? "allow" : "deny", 1);
    json_kv_str(b, "reason", intent_describe(&d, why, sizeof(why)), 1);
    if (st->current != NULL && st->current->cfg.authorize_with_agent)
        json_kv_str(b, "note",
                    "authorize mode: connections are decided by the agent; this is the local "
                    "intention table's answer",
                    1);
    admin_buf_json_str(b, "intention");
    admin_buf_add(b, ":", 1);
    if (d.rule == NULL) {
        admin_buf_add(b, "null,", 5);
        json_kv_str(b, "decided_by", "default policy", 0);
    } else {
        const struct intent_rule *r = d.rule;
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
        json_kv_num(b, "precedence", r->precedence, 1);
        json_kv_str(b, "id", r->id, 1);
        json_kv_str(b, "description", r->description, 0);
        admin_buf_add(b, "},", 2);
        json_kv_str(b, "decided_by", "intention", 0);
    }
    admin_buf_add(b, "}\n", 2);
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
    admin_buf_add(b, "},\"upstreams\":[", 15);
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
        admin_buf_add(b, "]}", 2);
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
        l->notify = v->loop;
        worker_list_sessions(v->workers[i], l);
    }
    loop_timer_start(v->loop, &v->conn_wait, CONNECTIONS_WAIT_MS);
}

void views_answer(struct views *v, const struct views_state *st, const struct admin_request *req,
                  struct admin_reply *reply)
{
    struct admin_buf *b = &reply->body;
    if (strcmp(req->path, "/ready") == 0) {
        const char *why = st->not_ready;
        reply->status = why == NULL ? 200 : 503;
        admin_buf_printf(b, "%s\n", why == NULL ? "ready" : why);
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
    return v;
}

void views_free(struct views *v)
{
    if (v == NULL)
        return;
    loop_timer_stop(v->loop, &v->conn_wait);
    conn_job_free(v->conn_job); /* no worker can write into it now */
    free(v);
}

void views_poll(struct views *v)
{
    if (v != NULL)
        connections_poll(v, 0);
}

static void on_admin(void *data, const struct admin_request *req, struct admin_reply *reply)
{
    struct control *ctl = data;
    struct views_state st = {
        .not_ready = not_ready_reason(ctl),
        .current = ctl->current,
        .registration = ctl->svc_watch,
    };
    views_answer(ctl->views, &st, req, reply);
}

/* ---- entry ---- */

int control_run(const struct config *conf)
{
    struct control ctl;
    char err[512];
    int rc = 1;
    sigset_t set;
    memset(&ctl, 0, sizeof(ctl));
    ctl.conf = conf;
    ctl.sigfd = -1;

    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    ctl.loop = loop_new();
    if (ctl.loop == NULL) {
        LOG_ERROR("cannot create the control loop: %s", util_strerror(-errno));
        return 1;
    }
    /* Timers first: the clean-up at out: stops them all. */
    loop_timer_init(&ctl.lookup_retry, on_lookup_retry, &ctl);
    loop_timer_init(&ctl.drain_poll, on_drain_poll, &ctl);
    ctl.sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (ctl.sigfd == -1) {
        LOG_ERROR("signalfd: %s", util_strerror(-errno));
        goto out;
    }
    loop_io_init(&ctl.sig_io, ctl.sigfd, on_signal, &ctl);
    loop_io_want(ctl.loop, &ctl.sig_io, LOOP_READ);
    ctl.inbound_limit = limit_state_new();

    struct agent_opts aopts = {
        .addr = conf->http_addr,
        .token = conf->token,
        .ca_file = conf->ca_file,
        .ca_path = conf->ca_path,
        .client_cert = conf->client_cert,
        .client_key = conf->client_key,
        .tls_server_name = conf->tls_server_name,
        .ssl_verify = conf->verify,
    };
    ctl.agent = agent_new(ctl.loop, &aopts, err, sizeof(err));
    if (ctl.agent == NULL) {
        LOG_ERROR("%s", err);
        rc = 2;
        goto out;
    }
    ctl.reach = watch_reach_new(agent_addr(ctl.agent));
    ctl.in = inputs_new(ctl.agent, ctl.reach, on_inputs, &ctl);
    ctl.ups = upstreams_new(ctl.agent, ctl.reach, on_upstreams, &ctl);
    ctl.authz = authorize_new(ctl.agent, ctl.reach, ctl.in);
    ctl.ask = authq_box_new(ctl.loop);
    loop_set_wakeup(ctl.loop, on_ask, &ctl);

    ctl.workers = xcalloc((size_t)conf->n_workers, sizeof(*ctl.workers));
    for (int i = 0; i < conf->n_workers; i++) {
        ctl.workers[i] = worker_new((unsigned)i, ctl.ask, err, sizeof(err));
        if (ctl.workers[i] == NULL) {
            LOG_ERROR("%s", err);
            goto out;
        }
        ctl.n_workers++;
        int wrc = worker_start(ctl.workers[i]);
        if (wrc != 0) {
            LOG_ERROR("worker %d: cannot start thread: %s", i, util_strerror(wrc));
            goto out;
        }
    }

    ctl.views = views_new(ctl.loop, ctl.workers, ctl.n_workers, ctl.in, ctl.ups, ctl.inbound_limit);
    if (conf->admin_bind != NULL && conf->admin_bind[0] != '\0') {
        ctl.admin = admin_start(ctl.loop, conf->admin_bind, on_admin, &ctl, err, sizeof(err));
        if (ctl.admin == NULL) {
            LOG_ERROR("%s", err);
            rc = 2;
            goto out;
        }
    }
    LOG_INFO("connectd starting: agent %s, %d worker(s)", agent_addr(ctl.agent), ctl.n_workers);
    inputs_start(ctl.in);
    if (conf->service != NULL) {
        /* Flags mode: a static configuration, no registration to watch. */
        struct proxy_cfg cfg;
        ctl.proxy_id = conf->register_id != NULL
                           ? xasprintf("%s-proxy-%s", conf->service, conf->register_id)
                           : xasprintf("%s-proxy", conf->service);
        struct proxycfg_flags pf = {
            .service = conf->service,
            .proxy_id = ctl.proxy_id,
            .listen = conf->listen,
            .service_addr = conf->service_addr,
            .upstreams = conf->upstreams.v,
            .n_upstreams = conf->upstreams.n,
        };
        if (proxycfg_from_flags(&pf, &cfg, err, sizeof(err)) != 0) {
            LOG_ERROR("%s", err);
            rc = 2;
            goto out;
        }
        apply_cfg(&ctl, &cfg, "flags");
        if (conf->register_self)
            ctl.reg =
                register_start(ctl.agent, ctl.reach, &ctl.cfg, ctl.proxy_id, on_deregistered, &ctl);
    } else if (conf->proxy_id != NULL) {
        ctl.proxy_id = xstrdup(conf->proxy_id);
        start_registration_watch(&ctl);
    } else {
        lookup_start(&ctl);
    }
    if (loop_run(ctl.loop) != 0)
        LOG_ERROR("control loop failed: %s", util_strerror(-errno));
    rc = ctl.exit_code;

out:
    admin_stop(ctl.admin); /* cancels a pending /connections answer */
    for (int i = 0; i < ctl.n_workers; i++)
        worker_stop(ctl.workers[i]);
    for (int i = 0; i < ctl.n_workers; i++)
        worker_join_free(ctl.workers[i]);
    views_free(ctl.views); /* no worker can write into a listing now */
    free(ctl.workers);
    if (ctl.lookup != NULL)
        agent_cancel(ctl.lookup);
    register_free(ctl.reg);
    authorize_free(ctl.authz); /* the workers are gone: nobody waits for its answers */
    authq_box_free(ctl.ask);
    if (ctl.svc_watch != NULL)
        watch_stop(ctl.svc_watch);
    upstreams_free(ctl.ups);
    inputs_free(ctl.in);
    if (ctl.loop != NULL) {
        loop_timer_stop(ctl.loop, &ctl.lookup_retry);
        loop_timer_stop(ctl.loop, &ctl.drain_poll);
    }
    limit_state_unref(ctl.inbound_limit);
    watch_reach_free(ctl.reach);
    agent_free(ctl.agent);
    snapshot_unref(ctl.current);
    if (ctl.have_cfg)
        proxycfg_dispose(&ctl.cfg);
    free(ctl.proxy_id);
    if (ctl.sigfd != -1)
        close(ctl.sigfd);
    loop_free(ctl.loop);
    return rc;
}
