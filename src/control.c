/*
 * control: the control thread's life. It finds the proxy's registration and watches it, hands
 * the configuration to its parts (inputs: roots, leaf and intentions; upstreams: chains and
 * health; register: -register), answers the workers' wake-ups (authorize: questions; views:
 * /connections), rebuilds and publishes a new snapshot to every worker when any part's state
 * changed, and drains and stops on signals.
 *
 * Inputs fail independently: a malformed or refused answer is logged and the last good state
 * stays in force (the watch backs off and retries). Nothing is served before the registration,
 * a leaf, the roots and the intentions have all arrived once, nor before each upstream's first
 * discovery chain and its primary targets' first health answers (at most 15 s: upstreams.h).
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
#include "expose.h"
#include "inputs.h"
#include "limit.h"
#include "log.h"
#include "loop.h"
#include "notify.h"
#include "proxycfg.h"
#include "register.h"
#include "route.h"
#include "snapshot.h"
#include "upstreams.h"
#include "util.h"
#include "views.h"
#include "watch.h"
#include "worker.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#define DRAIN_POLL_MS 20
/* How often expired TLS sessions leave the server cache (on_session_sweep). */
#define SESSION_SWEEP_MS 60000

struct control {
    const struct config *conf;
    struct loop *loop;
    struct agent *agent;
    struct watch_reach *reach; /* shared by every watch: one "agent unreachable" per outage */
    struct worker **workers;
    int n_workers;
    int exit_code;
    struct limit_state *inbound_limit; /* the public listener's, across snapshots */
    struct limit_state *expose_limit;  /* the exposed listeners', across snapshots */
    int draining;
    int drain_done; /* the drain finished or timed out (or there was none to do) */
    uint64_t drain_deadline_ms;
    struct loop_timer drain_poll;
    int stopping; /* a stop signal arrived; deregistering before the loop ends */

    /* finding the registration */
    char *proxy_id;
    struct agent_req *lookup;
    struct loop_timer lookup_retry;
    struct loop_timer session_sweep; /* on_session_sweep */
    unsigned lookup_failures;
    struct watch *svc_watch;

    struct proxy_cfg cfg;
    int have_cfg;
    struct proxycfg_warned warned; /* warnings already logged once (bounded) */

    /* the parts, each with its own state */
    struct inputs *in;         /* roots, leaf, intentions: TLS context and intention table */
    struct upstreams *ups;     /* one per cfg.upstreams entry, same order */
    struct authorize *authz;   /* authorize mode: the workers' questions */
    struct register_ctx *reg;  /* -register, or NULL */
    struct views *views;       /* the admin endpoint's answers */
    struct expose_checks *exp; /* Expose.Checks: the parent service's check paths */
    struct authq_box *ask;     /* the workers' questions arrive here */
    struct loop_receiver startup_failed; /* a worker could not open its listeners */
    struct admin *admin;                 /* -admin-bind */

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

static void on_expose(void *data)
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
        enum log_level lvl = watch_reject_level(ctl->svc_watch, err);
        LOG_AT(lvl, "registration of %s: %s; keeping the previous configuration", ctl->proxy_id,
               err);
        return rc;
    }
    rc = proxycfg_build(&svc, &cfg, err, sizeof(err));
    dec_service_dispose(&svc);
    if (rc != 0) {
        enum log_level lvl = watch_reject_level(ctl->svc_watch, err);
        LOG_AT(lvl, "registration of %s: %s; keeping the previous configuration", ctl->proxy_id,
               err);
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
    expose_checks_reconcile(ctl->exp, &cfg);
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
    const struct mesh_http_cfg *mesh_http = inputs_mesh_http(ctl->in);
    if (!ctl->have_cfg || tls == NULL || intents == NULL || trust_domain == NULL ||
        mesh_http == NULL || inputs_waiting_for(ctl->in) != NULL)
        return;
    /* The first snapshot also waits for each upstream's first chain and its primary targets'
     * first health answers (bounded: upstreams.c), as Envoy opens no listener before its
     * clusters' first fetch: published earlier, it opened the upstream listeners with no
     * endpoint behind them, and a request at start-up got 503 (or a closed connection). Later
     * snapshots never wait for an upstream: a new chain warms while the old one serves. */
    char why[320];
    if (ctl->current == NULL && upstreams_waiting(ctl->ups, why, sizeof(why))) {
        LOG_DEBUG("first snapshot held: %s", why);
        return;
    }
    struct upstreams_parts parts;
    upstreams_parts(ctl->ups, ctl->cfg.n_upstreams, &parts);
    struct snapshot *s = snapshot_new(++ctl->generation, &ctl->cfg, trust_domain, tls, intents,
                                      (const struct snap_target *const *)parts.targets,
                                      parts.n_targets, ctl->inbound_limit, parts.limits, mesh_http);
    snapshot_attach_outliers(s, parts.outliers);
    /* Not published yet: the upstreams' protocols (some come from their chains) are set. */
    for (size_t i = 0; i < parts.n; i++) {
        s->upstreams[i].protocol = parts.protocols[i];
        s->upstreams[i].routes = parts.routes[i] ? route_table_ref(parts.routes[i]) : NULL;
    }
    upstreams_parts_dispose(&parts);
    s->rates = inputs_rates(ctl->in) != NULL ? limit_rates_ref(inputs_rates(ctl->in)) : NULL;
    size_t n_checks;
    const struct expose_path *checks = expose_checks_paths(ctl->exp, &n_checks);
    char warn[512];
    s->exposes = expose_build(&ctl->cfg, checks, n_checks, ctl->expose_limit,
                              inputs_agent_addr(ctl->in), warn, sizeof(warn));
    if (warn[0] != '\0')
        warn_once(ctl, warn);
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

/* Typed receivers (loop.h), one per kind of message from the workers. */

static void on_startup_failed(struct loop_receiver *rcv)
{
    struct control *ctl = rcv->data;
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
}

static void on_questions(void *data)
{
    struct control *ctl = data;
    struct authq_req *r = authq_box_take(ctl->ask);
    while (r != NULL) {
        struct authq_req *next = r->next;
        authorize_submit(ctl->authz, r);
        r = next;
    }
}

/*
 * Once a minute, the server sessions that expired leave the cache (OpenSSL drops them only
 * when it is full or every 255 handshakes), and the memory they pinned goes back to the
 * system: after a burst of callers a quiet sidecar no longer keeps their sessions until the
 * cache fills.
 */
static void on_session_sweep(struct loop_timer *t)
{
    struct control *ctl = t->data;
    if (ctl->in != NULL && inputs_sweep_sessions(ctl->in) > 0)
        util_trim_heap();
    loop_timer_start(ctl->loop, t, SESSION_SWEEP_MS);
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

/* Why the proxy is not ready (in <buf> of <len> bytes, or a constant), or NULL when it is. */
static const char *not_ready_reason(const struct control *ctl, char *buf, size_t len)
{
    if (ctl->draining || ctl->stopping)
        return "draining: connectd is stopping";
    if (!ctl->have_cfg)
        return "waiting for the proxy registration";
    const char *waiting = inputs_waiting_for(ctl->in);
    if (waiting != NULL)
        return waiting;
    if (ctl->current == NULL && upstreams_waiting(ctl->ups, buf, len))
        return buf;
    if (ctl->current == NULL)
        return "no configuration published to the workers yet";
    for (int i = 0; i < ctl->n_workers; i++)
        if (!worker_listening(ctl->workers[i]))
            return "listeners are not all open";
    return NULL;
}

static void on_admin(void *data, const struct admin_request *req, struct admin_reply *reply)
{
    struct control *ctl = data;
    char why[320];
    struct views_state st = {
        .not_ready = not_ready_reason(ctl, why, sizeof(why)),
        .current = ctl->current,
        .registration = ctl->svc_watch,
        .agent_down = watch_reach_down(ctl->reach) ? agent_addr(ctl->agent) : NULL,
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
    loop_timer_init(&ctl.session_sweep, on_session_sweep, &ctl);
    loop_timer_start(ctl.loop, &ctl.session_sweep, SESSION_SWEEP_MS);
    ctl.sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (ctl.sigfd == -1) {
        LOG_ERROR("signalfd: %s", util_strerror(-errno));
        goto out;
    }
    loop_io_init(&ctl.sig_io, ctl.sigfd, on_signal, &ctl);
    loop_io_want(ctl.loop, &ctl.sig_io, LOOP_READ);
    ctl.inbound_limit = limit_state_new();
    ctl.expose_limit = limit_state_new();

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
    watch_set_default_wait_ms(conf->watch_wait_ms);
    ctl.reach = watch_reach_new(agent_addr(ctl.agent));
    ctl.in = inputs_new(ctl.agent, ctl.reach, on_inputs, &ctl);
    ctl.ups = upstreams_new(ctl.agent, ctl.reach, on_upstreams, &ctl);
    ctl.exp = expose_checks_new(ctl.agent, ctl.reach, on_expose, &ctl);
    ctl.authz = authorize_new(ctl.agent, ctl.reach, ctl.in);
    ctl.ask = authq_box_new(ctl.loop, on_questions, &ctl);
    loop_receiver_register(ctl.loop, &ctl.startup_failed, on_startup_failed, &ctl);

    ctl.workers = xcalloc((size_t)conf->n_workers, sizeof(*ctl.workers));
    for (int i = 0; i < conf->n_workers; i++) {
        ctl.workers[i] = worker_new((unsigned)i, ctl.ask, &ctl.startup_failed, err, sizeof(err));
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
    expose_checks_free(ctl.exp);
    inputs_free(ctl.in);
    if (ctl.loop != NULL) {
        loop_timer_stop(ctl.loop, &ctl.lookup_retry);
        loop_timer_stop(ctl.loop, &ctl.drain_poll);
        loop_timer_stop(ctl.loop, &ctl.session_sweep);
    }
    limit_state_unref(ctl.inbound_limit);
    limit_state_unref(ctl.expose_limit);
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
