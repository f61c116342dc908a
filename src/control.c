/*
 * control: the control thread. It finds the proxy's registration, keeps one blocking watch per
 * input (registration, roots, leaf, intentions, one health query per upstream), turns each
 * answer into state, and publishes a new snapshot to every worker when the state changed.
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
#include "authq.h"
#include "decode.h"
#include "intent.h"
#include "limit.h"
#include "log.h"
#include "loop.h"
#include "notify.h"
#include "proxycfg.h"
#include "snapshot.h"
#include "tls.h"
#include "util.h"
#include "watch.h"
#include "worker.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/signalfd.h>
#include <unistd.h>

#define LOOKUP_RETRY_MIN_MS        200
#define LOOKUP_RETRY_MAX_MS        10000
#define HEARTBEAT_MS               10000 /* -register: TTL check pass, well inside its 30 s TTL */
#define CHECK_TTL                  "30s"
#define DEREGISTER_MS              5000
#define AUTHORIZE_HTTP_MS          10000
#define RECHECK_RETRY_MS           500  /* a re-check the agent answered stale: ask again after */
#define RECHECK_ASKS               10   /* ...at most this many times in all */
#define AUTHZ_CACHE_MAX            1024 /* callers remembered at once; the oldest make room */
#define DRAIN_POLL_MS              20
#define CONNECTIONS_WAIT_MS        2000 /* how long /connections waits for the workers */
#define CONNECTIONS_MAX_PER_WORKER 1000

/* authorize mode: one remembered answer of the agent for one caller. */
struct authz_entry {
    char *target, *uri;
    int allowed;
    char reason[256];
    uint64_t expires_ms;
};

/* authorize mode: a question the agent is answering now. */
struct authz_pending {
    struct authz_pending *next, *prev;
    struct control *ctl;
    struct authq_req *req;
    struct authq_req *waiters; /* the same question, asked again before the answer came */
    struct agent_req *areq;
    uint64_t asked_under; /* ctl->intents_gen when the question left */
};

struct up_watch;

/* One target of an upstream and the health watch that feeds it. */
struct tgt_watch {
    char *wkey; /* the health query (and OnlyPassing): equal keys keep their watch */
    char *id, *service, *ns, *partition, *datacenter, *sni;
    int only_passing;
    uint32_t connect_timeout_ms;
    struct watch *watch;            /* NULL for a prepared query's target */
    struct endpoint_set *endpoints; /* healthy ones; NULL until the first answer */
    struct up_watch *up;
};

struct up_watch {
    char *key;
    char *request;           /* what feeds it (method, path, body): a change restarts it */
    struct watch *watch;     /* the discovery chain, or the polled prepared query */
    struct tgt_watch **tgts; /* primary first, then failovers in order */
    size_t n_tgts;
    struct limit_state *limit; /* admission state of its listener, across snapshots */
    struct control *ctl;
};

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

    /* finding the registration */
    char *proxy_id;
    struct agent_req *lookup;
    struct loop_timer lookup_retry;
    unsigned lookup_failures;

    struct watch *svc_watch, *roots_watch, *leaf_watch, *intent_watch;
    char *service; /* the destination service the leaf and intentions watches are for */
    char *scope;   /* its "&ns=..&partition=.." query suffix ("" for the defaults) */

    struct proxy_cfg cfg;
    int have_cfg;
    struct dec_roots roots;
    int have_roots;
    struct dec_leaf leaf; /* its key_pem is always NULL: the key is <leaf_key> */
    struct tls_key *leaf_key;
    int have_leaf;
    struct tls_ctx *tls;
    struct intent_table *intents;
    uint64_t intents_gen; /* counts changes of <intents>, for answers asked under an older one */
    struct dec_intention *rules; /* the last good match answer, kept to re-derive the table */
    size_t n_rules;
    int have_rules;
    /* What the agent said of its default policy, "" while it has not (see default_allow()): */
    char acl_header_policy[8];        /* X-Consul-Default-ACL-Policy of the intentions answer */
    char default_intention_policy[8]; /* agent config default_intention_policy */
    char self_acl_policy[8];          /* agent config acl.default_policy, from /v1/agent/self */
    int self_acls_enabled;            /* from /v1/agent/self: 1, 0, or -1 when unknown */
    struct agent_req *self_req;
    struct loop_timer self_retry;
    unsigned self_failures;
    struct up_watch **ups; /* one per cfg.upstreams entry, same order */
    size_t n_ups;

    uint64_t generation;
    struct snapshot *current;
    struct loop_defer rebuild;

    struct proxycfg_warned warned; /* warnings already logged once (bounded) */

    /* -register: the body, and the state of our own registration */
    char *reg_body;
    char *check_id;
    int registered;
    int stopping; /* a stop signal arrived; deregistering before the loop ends */
    struct agent_req *reg_req;
    struct loop_timer heartbeat;

    /* authorize mode: the workers' questions, answers being fetched, and the cache */
    struct authq_box *ask;
    struct authz_pending *asking;
    /* re-checks of open connections whose answer disagreed with the intentions here: asked
     * again a little later, when the agent's copy has had time to catch up */
    struct authq_req *recheck_later;
    struct loop_timer recheck_timer;
    struct authz_entry *cache;
    size_t n_cache;

    int sigfd;
    struct loop_io sig_io;

    /* -admin-bind: the admin endpoint, and the /connections listing being collected */
    struct admin *admin;
    struct conn_job *conn_job;
    struct loop_timer conn_wait;
};

static void schedule_rebuild(struct control *ctl);
static void connections_poll(struct control *ctl, int force);

/* ---- helpers ---- */

/* Percent-encodes everything but RFC 3986 unreserved characters. */
static char *url_escape(const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    char *out = xmalloc(strlen(s) * 3 + 1), *p = out;
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '.' || c == '_' || c == '~') {
            *p++ = (char)c;
        } else {
            *p++ = '%';
            *p++ = hex[c >> 4];
            *p++ = hex[c & 15];
        }
    }
    *p = '\0';
    return out;
}

static void warn_once(struct control *ctl, const char *msg)
{
    const char *line = proxycfg_warn_once(&ctl->warned, msg);
    if (line != NULL)
        LOG_WARN("%s", line);
}

/* ---- TLS: leaf + roots -> context ---- */

/*
 * Builds and installs the TLS contexts for <leaf> with its <key>, and <roots> (the leaf or the
 * roots may be NULL while they have not arrived: then nothing happens). On failure the previous
 * contexts stay in force.
 */
static int install_tls(struct control *ctl, const struct dec_leaf *leaf, const struct tls_key *key,
                       const struct dec_roots *roots)
{
    char err[512];
    struct tls_ctx *ctx;
    if (leaf == NULL || roots == NULL)
        return 0;
    const char **pems = xcalloc(roots->n_roots, sizeof(*pems));
    for (size_t i = 0; i < roots->n_roots; i++)
        pems[i] = roots->roots[i].root_cert_pem;
    /* Until the configuration arrives the defaults apply; apply_cfg() rebuilds if it differs. */
    struct tls_ctx_opts opts = {0};
    if (ctl->have_cfg) {
        opts.min_version = ctl->cfg.tls_min_version;
        opts.max_version = ctl->cfg.tls_max_version;
        opts.cipher_suites = ctl->cfg.tls_cipher_suites;
    }
    int rc = tls_ctx_new_with_key(leaf->cert_pem, key, pems, roots->n_roots, &opts, &ctx, err,
                                  sizeof(err));
    free(pems);
    if (rc != 0) {
        LOG_ERROR("cannot build TLS contexts from leaf %s and %zu root(s): %s; keeping the "
                  "previous ones",
                  leaf->serial, roots->n_roots, err);
        return rc;
    }
    tls_ctx_unref(ctl->tls);
    ctl->tls = ctx;
    LOG_INFO("TLS: leaf %s for %s, %zu trusted root(s), trust domain %s", leaf->serial,
             leaf->service, roots->n_roots, roots->trust_domain);
    schedule_rebuild(ctl);
    return 0;
}

static int on_roots(void *data, const struct agent_response *resp)
{
    struct control *ctl = data;
    char err[256];
    struct dec_roots roots;
    int rc = decode_roots(resp->body, resp->body_len, &roots, err, sizeof(err));
    if (rc == 0 &&
        (rc = install_tls(ctl, ctl->have_leaf ? &ctl->leaf : NULL, ctl->leaf_key, &roots)) != 0)
        dec_roots_dispose(&roots);
    if (rc != 0) {
        LOG_ERROR("roots: %s; keeping the previous roots", err[0] ? err : util_strerror(rc));
        return rc;
    }
    if (ctl->have_roots)
        dec_roots_dispose(&ctl->roots);
    ctl->roots = roots;
    ctl->have_roots = 1;
    return 0;
}

static int on_leaf(void *data, const struct agent_response *resp)
{
    struct control *ctl = data;
    char err[256];
    struct dec_leaf leaf;
    struct tls_key *key = NULL;
    int rc = decode_leaf(resp->body, resp->body_len, &leaf, err, sizeof(err));
    if (rc == 0) {
        /* The PEM text goes at once: from here on the key lives only in OpenSSL's form, the one
         * copy the contexts share, even across rebuilds for new roots or settings. */
        rc = tls_key_new(leaf.key_pem, &key, err, sizeof(err));
        util_wipe_free(leaf.key_pem, strlen(leaf.key_pem));
        leaf.key_pem = NULL;
        if (rc == 0)
            rc = install_tls(ctl, &leaf, key, ctl->have_roots ? &ctl->roots : NULL);
        if (rc != 0) {
            dec_leaf_dispose(&leaf);
            tls_key_free(key);
        }
    }
    if (rc != 0) {
        LOG_ERROR("leaf certificate: %s; keeping the previous one",
                  err[0] ? err : util_strerror(rc));
        return rc;
    }
    if (ctl->have_leaf)
        dec_leaf_dispose(&ctl->leaf);
    tls_key_free(ctl->leaf_key);
    ctl->leaf = leaf;
    ctl->leaf_key = key;
    ctl->have_leaf = 1;
    return 0;
}

/* ---- intentions ---- */

/*
 * The decision when no intention matches (consul-api.md 2.4.5), and where it comes from: the
 * agent's default_intention_policy when it is set (newer agents; /authorize uses it too), else
 * the ACL default policy the agent reports on every answer, as Envoy does, else the one
 * /v1/agent/self reports. An agent that says neither (an old agent, or a hop that strips the
 * header, and no agent:read) gets "allow" only when it says its ACLs are off; otherwise no
 * match denies: a sidecar that cannot learn the policy must not guess the open one.
 */
static int default_allow(const struct control *ctl, const char **why)
{
    const char *p = NULL;
    if (ctl->default_intention_policy[0] != '\0') {
        p = ctl->default_intention_policy;
        *why = "agent default_intention_policy";
    } else if (ctl->acl_header_policy[0] != '\0') {
        p = ctl->acl_header_policy;
        *why = "agent ACL default policy";
    } else if (ctl->self_acl_policy[0] != '\0') {
        p = ctl->self_acl_policy;
        *why = "agent ACL default policy, from agent self";
    } else if (ctl->self_acls_enabled == 0) {
        *why = "agent ACLs disabled";
        return 1;
    } else {
        *why = "the agent did not say its default policy: failing closed";
        return 0;
    }
    return strcmp(p, "deny") != 0;
}

/* Keeps "allow" or "deny" (any case) from <v> in <dst>, or "" for anything else. */
static void keep_policy(char dst[8], const char *v)
{
    const char *p = v == NULL                     ? ""
                    : strcasecmp(v, "allow") == 0 ? "allow"
                    : strcasecmp(v, "deny") == 0  ? "deny"
                                                  : "";
    snprintf(dst, 8, "%s", p);
}

static void authz_cache_clear(struct control *ctl);

static void apply_intentions(struct control *ctl)
{
    if (!ctl->have_rules)
        return;
    const char *why;
    struct intent_table *t = intent_table_new(ctl->rules, ctl->n_rules, default_allow(ctl, &why));
    if (ctl->intents != NULL && intent_table_equal(ctl->intents, t)) {
        intent_table_unref(t);
        return;
    }
    authz_cache_clear(ctl); /* the agent's answers may differ now */
    LOG_INFO("intentions for %s: %zu rule(s), default %s (%s)", ctl->service, intent_table_len(t),
             intent_table_default_allow(t) ? "allow" : "deny", why);
    intent_table_unref(ctl->intents);
    ctl->intents = t;
    ctl->intents_gen++;
    schedule_rebuild(ctl);
}

static void forget_rules(struct control *ctl)
{
    if (ctl->have_rules)
        dec_intentions_free(ctl->rules, ctl->n_rules);
    ctl->rules = NULL;
    ctl->n_rules = 0;
    ctl->have_rules = 0;
}

static int on_intentions(void *data, const struct agent_response *resp)
{
    struct control *ctl = data;
    char err[256];
    struct dec_intention *v;
    size_t n;
    int rc =
        decode_intentions_match(resp->body, resp->body_len, ctl->service, &v, &n, err, sizeof(err));
    if (rc != 0) {
        LOG_ERROR("intentions: %s; keeping the previous table", err);
        return rc;
    }
    forget_rules(ctl);
    ctl->rules = v;
    ctl->n_rules = n;
    ctl->have_rules = 1;
    keep_policy(ctl->acl_header_policy, resp->default_acl_policy);
    apply_intentions(ctl);
    return 0;
}

/*
 * Re-arms <t> for the next try of a one-shot agent request that has failed <failures> times
 * before: exponential from LOOKUP_RETRY_MIN_MS to LOOKUP_RETRY_MAX_MS, jittered over the
 * upper half so sidecars started together do not retry in step.
 */
static void retry_later(struct control *ctl, struct loop_timer *t, unsigned failures)
{
    uint64_t delay =
        MIN((uint64_t)LOOKUP_RETRY_MIN_MS << MIN(failures, 6u), (uint64_t)LOOKUP_RETRY_MAX_MS);
    loop_timer_start(ctl->loop, t, delay / 2 + util_rand() % (delay / 2));
}

/* One look at the agent's own configuration for its default policies; retried only while the
 * agent cannot answer (a 403 without agent:read leaves what the answers' headers say). */
static void self_start(struct control *ctl);

static void on_self_retry(struct loop_timer *t)
{
    self_start(t->data);
}

static void on_self(void *data, const struct agent_response *resp)
{
    struct control *ctl = data;
    char err[256];
    struct dec_agent_self self;
    ctl->self_req = NULL;
    watch_reach_note(ctl->reach, resp);
    if (resp->status == 0 || resp->status >= 500) {
        retry_later(ctl, &ctl->self_retry, ctl->self_failures++);
        return;
    }
    if (resp->status != 200) {
        LOG_INFO("agent self answered status %ld; the default intention decision follows the "
                 "agent's X-Consul-Default-ACL-Policy header (deny without it)",
                 resp->status);
        return;
    }
    if (decode_agent_self(resp->body, resp->body_len, &self, err, sizeof(err)) != 0) {
        LOG_WARN("agent self: %s; the default intention decision follows the ACL default policy",
                 err);
        return;
    }
    const char *p = self.default_intention_policy;
    if (strcmp(p, "allow") == 0 || strcmp(p, "deny") == 0) {
        snprintf(ctl->default_intention_policy, sizeof(ctl->default_intention_policy), "%s", p);
        LOG_INFO("agent default_intention_policy is %s", p);
    } else if (p[0] != '\0') {
        LOG_WARN("agent default_intention_policy \"%s\" is not allow or deny; ignored", p);
    }
    keep_policy(ctl->self_acl_policy, self.acl_default_policy);
    ctl->self_acls_enabled = self.acls_enabled;
    dec_agent_self_dispose(&self);
    apply_intentions(ctl);
}

static void self_start(struct control *ctl)
{
    ctl->self_req = agent_request(ctl->agent, "GET", "/v1/agent/self", NULL, 30000, on_self, ctl);
}

/* ---- upstream endpoints ---- */

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
    endpoint_set_unref(t->endpoints);
    free(t->wkey);
    free(t->id);
    free(t->service);
    free(t->ns);
    free(t->partition);
    free(t->datacenter);
    free(t->sni);
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

static int on_target_health(void *data, const struct agent_response *resp)
{
    struct tgt_watch *t = data;
    char err[256];
    struct dec_endpoint *v;
    size_t n;
    int rc = decode_health_connect(resp->body, resp->body_len, &v, &n, err, sizeof(err));
    if (rc != 0) {
        LOG_ERROR("upstream %s target %s: %s; keeping the previous endpoints", t->up->key, t->id,
                  err);
        return rc;
    }
    struct endpoint_set *set = healthy_set(v, n, t->only_passing);
    LOG_INFO("upstream %s target %s: %zu healthy endpoint(s) of %zu", t->up->key, t->id, set->n, n);
    endpoint_set_unref(t->endpoints);
    t->endpoints = set;
    schedule_rebuild(t->up->ctl);
    return 0;
}

/*
 * The "&ns=<ns>&partition=<partition>" suffix of a query about a service in <ns> and
 * <partition>. CE agents refuse a non-empty ns/partition other than default, and Enterprise
 * agents take a missing one as default, so only what differs is sent.
 */
static char *scope_query(const char *ns, const char *partition)
{
    int send_ns = ns[0] != '\0' && strcmp(ns, "default") != 0;
    int send_part = partition[0] != '\0' && strcmp(partition, "default") != 0;
    char *ens = url_escape(ns), *epart = url_escape(partition);
    char *q = xasprintf("%s%s%s%s", send_ns ? "&ns=" : "", send_ns ? ens : "",
                        send_part ? "&partition=" : "", send_part ? epart : "");
    free(ens);
    free(epart);
    return q;
}

/* The health query of one chain target (consul-api.md 2.8, "Mapping targets"). */
static char *target_query(const struct dec_chain_target *ct)
{
    char *name = url_escape(ct->service), *dc = url_escape(ct->datacenter);
    char *filter = url_escape(ct->filter), *scope = scope_query(ct->ns, ct->partition);
    char *peer = url_escape(ct->peer);
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
    free(t->id);
    free(t->service);
    free(t->ns);
    free(t->partition);
    free(t->datacenter);
    free(t->sni);
    t->id = xstrdup(ct->id);
    t->service = xstrdup(ct->service);
    t->ns = xstrdup(ct->ns);
    t->partition = xstrdup(ct->partition);
    t->datacenter = xstrdup(ct->datacenter);
    t->sni = xstrdup(ct->sni);
    t->only_passing = ct->only_passing;
    t->connect_timeout_ms = ct->connect_timeout_ms ? ct->connect_timeout_ms : chain_timeout_ms;
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
        LOG_ERROR("upstream %s: discovery chain: %s; keeping the previous targets", u->key, err);
        return rc;
    }
    struct tgt_watch **fresh = xcalloc(chain.n_targets, sizeof(*fresh));
    for (size_t i = 0; i < chain.n_targets; i++) {
        const struct dec_chain_target *ct = &chain.targets[i];
        char *query = target_query(ct);
        char *wkey = xasprintf("%s%s", query, ct->only_passing ? " only-passing" : "");
        for (size_t j = 0; j < u->n_tgts && fresh[i] == NULL; j++) {
            if (u->tgts[j] != NULL && strcmp(u->tgts[j]->wkey, wkey) == 0) {
                fresh[i] = u->tgts[j];
                u->tgts[j] = NULL;
            }
        }
        if (fresh[i] == NULL) {
            struct tgt_watch *t = tgt_new(u, wkey);
            char *wname = xasprintf("endpoints %s", ct->id);
            struct watch_spec spec = {.name = wname,
                                      .method = "GET",
                                      .path = query,
                                      .block = WATCH_BY_INDEX,
                                      .reach = u->ctl->reach};
            tgt_set_info(t, ct, chain.connect_timeout_ms);
            t->watch = watch_start(u->ctl->agent, &spec, on_target_health, t);
            fresh[i] = t;
            free(wname);
            LOG_DEBUG("upstream %s: watching target %s: %s", u->key, ct->id, query);
        } else {
            tgt_set_info(fresh[i], ct, chain.connect_timeout_ms);
        }
        free(query);
        free(wkey);
    }
    for (size_t j = 0; j < u->n_tgts; j++)
        tgt_free(u->tgts[j]);
    free(u->tgts);
    u->tgts = fresh;
    u->n_tgts = chain.n_targets;
    LOG_INFO("upstream %s: discovery chain %s: %zu target(s), primary %s, connect timeout %u ms",
             u->key, chain.service_name, chain.n_targets, chain.targets[0].id,
             (unsigned)chain.connect_timeout_ms);
    dec_chain_dispose(&chain);
    schedule_rebuild(u->ctl);
    return 0;
}

static int on_query(void *data, const struct agent_response *resp)
{
    struct up_watch *u = data;
    char err[256];
    struct dec_query q;
    int rc = decode_prepared_query(resp->body, resp->body_len, &q, err, sizeof(err));
    if (rc != 0) {
        LOG_ERROR("upstream %s: prepared query: %s; keeping the previous endpoints", u->key, err);
        return rc;
    }
    struct tgt_watch *t = u->tgts[0];
    struct endpoint_set *set = healthy_set(q.nodes, q.n_nodes, 0);
    q.nodes = NULL;
    q.n_nodes = 0;
    LOG_INFO("upstream %s: prepared query answered %zu endpoint(s) of %s in %s", u->key, set->n,
             q.service, q.datacenter);
    dec_query_dispose(&q);
    endpoint_set_unref(t->endpoints);
    t->endpoints = set;
    schedule_rebuild(u->ctl);
    return 0;
}

/*
 * The request that feeds an upstream, as a string: upstreams whose key and request are
 * unchanged keep their watches when the registration changes.
 */
static char *upstream_request(const struct upstream_cfg *c, struct watch_spec *spec)
{
    char *name = url_escape(c->destination_name);
    memset(spec, 0, sizeof(*spec));
    if (strcmp(c->destination_type, "prepared_query") == 0) {
        spec->method = "GET";
        spec->block = WATCH_POLL;
        spec->poll_ms = c->poll_interval_ms;
        spec->path = xasprintf("/v1/query/%s/execute?connect=true%s%s", name,
                               c->datacenter[0] ? "&dc=" : "", c->datacenter);
    } else {
        char *dc = url_escape(c->datacenter), *ns = url_escape(c->ns);
        spec->method = "POST";
        spec->block = WATCH_BY_INDEX;
        spec->path = xasprintf("/v1/discovery-chain/%s?cached%s%s%s%s", name,
                               dc[0] ? "&compile-dc=" : "", dc, ns[0] ? "&ns=" : "", ns);
        /* An L4 proxy asks for a tcp chain: one resolver, no routers or splitters. */
        if (c->connect_timeout_set)
            spec->body = xasprintf("{\"OverrideProtocol\":\"tcp\","
                                   "\"OverrideConnectTimeout\":\"%ums\"}",
                                   (unsigned)c->connect_timeout_ms);
        else
            spec->body = xasprintf("{\"OverrideProtocol\":\"tcp\"}");
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
    for (size_t i = 0; i < u->n_tgts; i++)
        tgt_free(u->tgts[i]);
    free(u->tgts);
    free(u->request);
    limit_state_unref(u->limit);
    free(u->key);
    free(u);
}

static struct up_watch *up_watch_new(struct control *ctl, const struct upstream_cfg *c)
{
    struct watch_spec spec;
    struct up_watch *u = xcalloc(1, sizeof(*u));
    u->key = xstrdup(c->key);
    u->ctl = ctl;
    u->limit = limit_state_new();
    u->request = upstream_request(c, &spec);
    char *wname =
        xasprintf("%s %s", spec.block == WATCH_POLL ? "prepared query" : "discovery chain",
                  c->destination_name);
    spec.name = wname;
    spec.reach = ctl->reach;
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
        u->watch = watch_start(ctl->agent, &spec, on_query, u);
    } else {
        u->watch = watch_start(ctl->agent, &spec, on_chain, u);
    }
    free(wname);
    free((char *)spec.path);
    free((char *)spec.body);
    return u;
}

/*
 * Makes the upstream watches match <cfg>: watches of unchanged upstreams keep running (and
 * their endpoints), new upstreams get a watch, removed ones lose theirs. Each up_watch is its
 * own allocation because its running watch holds a pointer to it.
 */
static void reconcile_upstreams(struct control *ctl, const struct proxy_cfg *cfg)
{
    struct up_watch **fresh = xcalloc(cfg->n_upstreams, sizeof(*fresh));
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const struct upstream_cfg *c = &cfg->upstreams[i];
        struct watch_spec spec;
        char *request = upstream_request(c, &spec);
        free((char *)spec.path);
        free((char *)spec.body);
        for (size_t j = 0; j < ctl->n_ups && fresh[i] == NULL; j++) {
            if (ctl->ups[j] != NULL && strcmp(ctl->ups[j]->key, c->key) == 0 &&
                strcmp(ctl->ups[j]->request, request) == 0) {
                fresh[i] = ctl->ups[j];
                ctl->ups[j] = NULL;
            }
        }
        free(request);
        if (fresh[i] == NULL)
            fresh[i] = up_watch_new(ctl, c);
    }
    for (size_t j = 0; j < ctl->n_ups; j++)
        up_watch_free(ctl->ups[j]);
    free(ctl->ups);
    ctl->ups = fresh;
    ctl->n_ups = cfg->n_upstreams;
}

/* ---- the registration ---- */

/*
 * The leaf and the intentions are those of the destination service in the proxy's own
 * namespace and partition (an Enterprise proxy registered outside the defaults must not
 * present, nor be governed as, the same-named service of the default namespace).
 */
static void start_service_watches(struct control *ctl, const char *service)
{
    char *esc = url_escape(service);
    char *path = xasprintf("/v1/agent/connect/ca/leaf/%s%s%s", esc, ctl->scope[0] ? "?" : "",
                           ctl->scope[0] ? ctl->scope + 1 : "");
    char *name = xasprintf("leaf %s", service);
    struct watch_spec spec = {
        .name = name, .method = "GET", .path = path, .block = WATCH_BY_INDEX, .reach = ctl->reach};
    if (ctl->leaf_watch != NULL)
        watch_stop(ctl->leaf_watch);
    ctl->leaf_watch = watch_start(ctl->agent, &spec, on_leaf, ctl);
    free(path);
    free(name);

    path =
        xasprintf("/v1/connect/intentions/match?by=destination&name=%s&cached%s", esc, ctl->scope);
    name = xasprintf("intentions %s", service);
    spec.name = name;
    spec.path = path;
    if (ctl->intent_watch != NULL)
        watch_stop(ctl->intent_watch);
    ctl->intent_watch = watch_start(ctl->agent, &spec, on_intentions, ctl);
    free(path);
    free(name);
    free(esc);
}

static void apply_cfg(struct control *ctl, struct proxy_cfg *cfg_in, const char *source);

static int same_tls_settings(const struct proxy_cfg *a, const struct proxy_cfg *b)
{
    const char *ca = a->tls_cipher_suites ? a->tls_cipher_suites : "";
    const char *cb = b->tls_cipher_suites ? b->tls_cipher_suites : "";
    return a->tls_min_version == b->tls_min_version && a->tls_max_version == b->tls_max_version &&
           strcmp(ca, cb) == 0;
}

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

    char *scope = scope_query(cfg.ns, cfg.partition);
    if (ctl->service == NULL || strcmp(ctl->service, cfg.service) != 0 ||
        strcmp(ctl->scope, scope) != 0) {
        /* A new identity: the leaf and intentions of the old one no longer apply. */
        if (ctl->service != NULL)
            LOG_WARN("destination service changed from %s%s to %s%s", ctl->service, ctl->scope,
                     cfg.service, scope);
        free(ctl->service);
        ctl->service = xstrdup(cfg.service);
        free(ctl->scope);
        ctl->scope = scope;
        scope = NULL;
        if (ctl->have_leaf)
            dec_leaf_dispose(&ctl->leaf);
        tls_key_free(ctl->leaf_key);
        ctl->leaf_key = NULL;
        ctl->have_leaf = 0;
        intent_table_unref(ctl->intents);
        ctl->intents = NULL;
        ctl->intents_gen++;
        forget_rules(ctl);
        start_service_watches(ctl, cfg.service);
    }
    free(scope);
    reconcile_upstreams(ctl, &cfg);
    int tls_changed = !ctl->have_cfg || !same_tls_settings(&ctl->cfg, &cfg);
    if (ctl->have_cfg)
        proxycfg_dispose(&ctl->cfg);
    ctl->cfg = cfg;
    ctl->have_cfg = 1;
    if (tls_changed &&
        (cfg.tls_min_version || cfg.tls_max_version || cfg.tls_cipher_suites || ctl->tls != NULL))
        install_tls(ctl, ctl->have_leaf ? &ctl->leaf : NULL, ctl->leaf_key,
                    ctl->have_roots ? &ctl->roots : NULL);
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
    char *esc = url_escape(ctl->proxy_id);
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
        retry_later(ctl, &ctl->lookup_retry, ctl->lookup_failures++);
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
    if (!ctl->have_cfg || ctl->tls == NULL || ctl->intents == NULL || !ctl->have_roots)
        return;
    size_t nu = ctl->cfg.n_upstreams;
    struct snap_target **targets = xcalloc(nu, sizeof(*targets));
    size_t *n_targets = xcalloc(nu, sizeof(*n_targets));
    struct limit_state **limits = xcalloc(nu, sizeof(*limits));
    for (size_t i = 0; i < nu && i < ctl->n_ups; i++) {
        const struct up_watch *u = ctl->ups[i];
        limits[i] = u->limit;
        targets[i] = xcalloc(u->n_tgts, sizeof(**targets));
        n_targets[i] = u->n_tgts;
        for (size_t j = 0; j < u->n_tgts; j++) {
            const struct tgt_watch *t = u->tgts[j];
            targets[i][j] = (struct snap_target){
                .id = t->id,
                .service = t->service,
                .ns = t->ns,
                .partition = t->partition,
                .datacenter = t->datacenter,
                .sni = t->sni,
                .connect_timeout_ms = t->connect_timeout_ms,
                .endpoints = t->endpoints,
            };
        }
    }
    struct snapshot *s = snapshot_new(
        ++ctl->generation, &ctl->cfg, ctl->roots.trust_domain, ctl->tls, ctl->intents,
        (const struct snap_target *const *)targets, n_targets, ctl->inbound_limit, limits);
    for (size_t i = 0; i < nu; i++)
        free(targets[i]);
    free(targets);
    free(n_targets);
    free(limits);
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

/* ---- -register: our own connect-proxy registration, its TTL check, and deregistration ---- */

static void on_register(void *data, const struct agent_response *resp)
{
    struct control *ctl = data;
    ctl->reg_req = NULL;
    watch_reach_note(ctl->reach, resp);
    if (resp->status == 200) {
        ctl->registered = 1;
        LOG_INFO("registered %s with the agent", ctl->proxy_id);
    } else {
        LOG_ERROR("registering %s: PUT /v1/agent/service/register answered %s%ld%s%.200s; "
                  "retrying in %d s",
                  ctl->proxy_id, resp->status ? "HTTP " : "", resp->status,
                  resp->status ? ": " : " ", resp->status ? resp->body : resp->error,
                  HEARTBEAT_MS / 1000);
    }
}

static void register_start(struct control *ctl)
{
    ctl->reg_req = agent_request(ctl->agent, "PUT", "/v1/agent/service/register", ctl->reg_body,
                                 30000, on_register, ctl);
}

static void on_pass(void *data, const struct agent_response *resp)
{
    struct control *ctl = data;
    ctl->reg_req = NULL;
    watch_reach_note(ctl->reach, resp);
    if (resp->status == 404) {
        /* The agent lost us (a restart of a dev agent, a deregistration): register again. */
        LOG_WARN("the agent no longer knows %s; registering it again", ctl->proxy_id);
        ctl->registered = 0;
        register_start(ctl);
    } else if (resp->status != 200) {
        LOG_DEBUG("heartbeat of %s answered %ld", ctl->check_id, resp->status);
    }
}

static void on_heartbeat(struct loop_timer *t)
{
    struct control *ctl = t->data;
    loop_timer_start(ctl->loop, &ctl->heartbeat, HEARTBEAT_MS);
    if (ctl->reg_req != NULL)
        return;
    if (!ctl->registered) {
        register_start(ctl);
        return;
    }
    char *esc = url_escape(ctl->check_id);
    char *path = xasprintf("/v1/agent/check/pass/%s", esc);
    ctl->reg_req = agent_request(ctl->agent, "PUT", path, NULL, 30000, on_pass, ctl);
    free(path);
    free(esc);
}

/* After a stop signal: ends the loop once the drain and any deregistration are both over. */
static void stop_when_done(struct control *ctl)
{
    if (ctl->stopping && ctl->drain_done && ctl->reg_req == NULL)
        loop_stop(ctl->loop);
}

static void on_deregister(void *data, const struct agent_response *resp)
{
    struct control *ctl = data;
    ctl->reg_req = NULL;
    if (resp->status == 200)
        LOG_INFO("deregistered %s", ctl->proxy_id);
    else
        LOG_WARN("deregistering %s answered %s%ld%s", ctl->proxy_id,
                 resp->status ? "HTTP " : "transport error ", resp->status,
                 resp->status ? "" : resp->error);
    stop_when_done(ctl);
}

/* Prepares the body (from the flags configuration in force) and registers at once. */
static void self_register(struct control *ctl)
{
    const struct proxy_cfg *c = &ctl->cfg;
    char *name = xasprintf("%s-proxy", c->service);
    ctl->check_id = xasprintf("%s-ttl", ctl->proxy_id);
    struct dec_proxy_registration r = {
        .id = ctl->proxy_id,
        .name = name,
        .address = c->bind_address,
        .port = c->bind_port,
        .destination_service_name = c->service,
        .local_service_address = c->local_address,
        .local_service_port = c->local_port,
        .check_id = ctl->check_id,
        .check_name = "proxy heartbeat",
        .check_ttl = CHECK_TTL,
    };
    ctl->reg_body = decode_proxy_registration_json(&r);
    free(name);
    loop_timer_start(ctl->loop, &ctl->heartbeat, HEARTBEAT_MS);
    register_start(ctl);
}

/* ---- authorize mode: the workers' questions, answered from the cache or by the agent ---- */

static void authz_entry_dispose(struct authz_entry *e)
{
    free(e->target);
    free(e->uri);
}

static void authz_cache_clear(struct control *ctl)
{
    if (ctl->n_cache > 0)
        LOG_DEBUG("authorize cache: %zu answer(s) dropped", ctl->n_cache);
    for (size_t i = 0; i < ctl->n_cache; i++)
        authz_entry_dispose(&ctl->cache[i]);
    free(ctl->cache);
    ctl->cache = NULL;
    ctl->n_cache = 0;
}

static struct authz_entry *authz_cache_find(struct control *ctl, const struct authq_req *r)
{
    uint64_t now = util_now_ms();
    for (size_t i = 0; i < ctl->n_cache; i++) {
        struct authz_entry *e = &ctl->cache[i];
        if (e->expires_ms > now && strcmp(e->uri, r->client_uri) == 0 &&
            strcmp(e->target, r->target) == 0)
            return e;
    }
    return NULL;
}

static void authz_cache_put(struct control *ctl, const struct authq_req *r)
{
    uint64_t now = util_now_ms();
    size_t keep = 0;
    for (size_t i = 0; i < ctl->n_cache; i++) { /* drop expired entries and this caller's */
        struct authz_entry *e = &ctl->cache[i];
        if (e->expires_ms <= now ||
            (strcmp(e->uri, r->client_uri) == 0 && strcmp(e->target, r->target) == 0))
            authz_entry_dispose(e);
        else
            ctl->cache[keep++] = *e;
    }
    ctl->n_cache = keep;
    if (ctl->n_cache == AUTHZ_CACHE_MAX) { /* full of live entries: the oldest goes */
        authz_entry_dispose(&ctl->cache[0]);
        memmove(&ctl->cache[0], &ctl->cache[1], (ctl->n_cache - 1) * sizeof(ctl->cache[0]));
        ctl->n_cache--;
    }
    ctl->cache = xrealloc(ctl->cache, (ctl->n_cache + 1) * sizeof(*ctl->cache));
    struct authz_entry *e = &ctl->cache[ctl->n_cache++];
    e->target = xstrdup(r->target);
    e->uri = xstrdup(r->client_uri);
    e->allowed = r->allowed;
    snprintf(e->reason, sizeof(e->reason), "%s", r->reason);
    e->expires_ms = now + r->cache_ms;
}

/*
 * The agent answers /authorize from its own copy of the intentions, which reaches it by a
 * blocking query of its own and so may lag behind ours or run ahead of it. An answer is kept
 * only when the intentions did not change while it was asked (<asked_under> is still the
 * current generation) and the current table decides the same way: two views that disagree
 * mean one is stale, and a stale "allow" cached for authorize_cache_ms would outlive the deny
 * that replaced it. An answer that is not kept still decides its own connection, as the
 * agent's word; the next caller asks again.
 */
static int authz_agrees(const struct control *ctl, const struct authq_req *r)
{
    struct spiffe_id id;
    if (ctl->intents == NULL || spiffe_parse(r->client_uri, strlen(r->client_uri), &id) != 0 ||
        id.kind != SPIFFE_SERVICE)
        return -1;
    struct intent_decision d = intent_eval(ctl->intents, id.partition, id.ns, id.service);
    return d.allow == (r->allowed != 0);
}

static void authz_submit(struct control *ctl, struct authq_req *r);

/*
 * A re-check of an open connection that the agent answered differently from the intentions
 * here is asked again a little later rather than answered: a stale "allow" would otherwise
 * leave the connection open after the deny that should end it. New connections are answered
 * at once (they wait), as the agent's word.
 */
static void on_recheck_timer(struct loop_timer *t)
{
    struct control *ctl = t->data;
    struct authq_req *r = ctl->recheck_later;
    ctl->recheck_later = NULL;
    while (r != NULL) {
        struct authq_req *next = r->next;
        authz_submit(ctl, r);
        r = next;
    }
}

static void recheck_later(struct control *ctl, struct authq_req *r)
{
    r->next = ctl->recheck_later;
    ctl->recheck_later = r;
    if (!loop_timer_armed(&ctl->recheck_timer))
        loop_timer_start(ctl->loop, &ctl->recheck_timer, RECHECK_RETRY_MS);
}

/* A re-check and the re-checks that joined it (<waiters>) wait together to be asked again. */
static void recheck_group_later(struct control *ctl, struct authq_req *r, struct authq_req *waiters)
{
    while (waiters != NULL) {
        struct authq_req *w = waiters;
        waiters = w->next;
        recheck_later(ctl, w);
    }
    recheck_later(ctl, r);
}

static void on_authorized(void *data, const struct agent_response *resp)
{
    struct authz_pending *p = data;
    struct control *ctl = p->ctl;
    struct authq_req *r = p->req;
    uint64_t asked_under = p->asked_under;
    struct authq_req *waiters = p->waiters;
    char err[256];
    if (p->prev != NULL)
        p->prev->next = p->next;
    else
        ctl->asking = p->next;
    if (p->next != NULL)
        p->next->prev = p->prev;
    free(p);
    watch_reach_note(ctl->reach, resp);

    if (resp->status == 200 && decode_authorize(resp->body, resp->body_len, &r->allowed, r->reason,
                                                sizeof(r->reason), err, sizeof(err)) == 0) {
        int agrees = authz_agrees(ctl, r);
        if (r->recheck && agrees == 0 && r->asks < RECHECK_ASKS) {
            LOG_DEBUG("authorize: the agent's answer for %s (re-check) differs from the "
                      "intentions here; asking again in %d ms",
                      r->client_uri, RECHECK_RETRY_MS);
            recheck_group_later(ctl, r, waiters);
            return;
        }
        if (agrees == 0 && r->recheck)
            LOG_INFO("authorize: the agent still answers %s for %s after %u re-check(s), unlike "
                     "the intentions here; its answer is taken",
                     r->allowed ? "allow" : "deny", r->client_uri, r->asks);
        else if (agrees == 0)
            LOG_DEBUG("authorize: the agent's answer for %s differs from the intentions here; "
                      "not cached",
                      r->client_uri);
        if (r->cache_ms > 0 && asked_under == ctl->intents_gen && agrees == 1)
            authz_cache_put(ctl, r);
        /* An allow the intentions here refuse admits its connection, but only until the two
         * views agree: the worker re-checks it at once, and the intention-change sweep, which
         * skipped it while it waited, never comes back for it. */
        r->disputed = !r->recheck && agrees == 0;
    } else {
        /* No answer means no for a new caller, who may try again; an open connection is not
         * cut for it: its re-check is asked again, and after the last try it stays. */
        r->allowed = 0;
        if (resp->status == 200)
            snprintf(r->reason, sizeof(r->reason), "unusable answer: %.200s", err);
        else if (resp->status != 0)
            snprintf(r->reason, sizeof(r->reason), "POST /v1/agent/connect/authorize: HTTP %ld%s",
                     resp->status, resp->status == 403 ? " (the token lacks service:write)" : "");
        else
            snprintf(r->reason, sizeof(r->reason),
                     "POST /v1/agent/connect/authorize: transport error: %s", resp->error);
        if (r->recheck && r->asks < RECHECK_ASKS) {
            recheck_group_later(ctl, r, waiters);
            return;
        }
        if (r->recheck) {
            LOG_WARN("authorize: no answer to the re-check of %s (%s); its connections stay "
                     "open",
                     r->client_uri, r->reason);
            r->allowed = 1;
        }
    }
    int shared = 0;
    while (waiters != NULL) {
        struct authq_req *w = waiters;
        waiters = w->next;
        w->allowed = r->allowed;
        w->disputed = r->disputed;
        snprintf(w->reason, sizeof(w->reason), "%s", r->reason);
        authq_box_post(w->reply, w);
        shared++;
    }
    if (shared > 0)
        LOG_DEBUG("authorize: the answer for %s also decided %d connection(s) that asked "
                  "meanwhile",
                  r->client_uri, shared);
    authq_box_post(r->reply, r);
}

/*
 * A question already on its way to the agent under the current intentions: a burst of
 * connections from one caller (or the same caller on many connections at once) makes one
 * request, not one each. NULL when there is none.
 */
static struct authz_pending *authz_asking(const struct control *ctl, const struct authq_req *r)
{
    for (struct authz_pending *p = ctl->asking; p != NULL; p = p->next)
        if (p->asked_under == ctl->intents_gen && p->req->recheck == r->recheck &&
            strcmp(p->req->client_uri, r->client_uri) == 0 &&
            strcmp(p->req->target, r->target) == 0 &&
            strcmp(p->req->client_serial, r->client_serial) == 0)
            return p;
    return NULL;
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
    connections_poll(ctl, 0);
    struct authq_req *r = authq_box_take(ctl->ask);
    while (r != NULL) {
        struct authq_req *next = r->next;
        authz_submit(ctl, r);
        r = next;
    }
}

/* Answers <r> from the cache, joins it to the same question on its way, or asks the agent. */
static void authz_submit(struct control *ctl, struct authq_req *r)
{
    const struct authz_entry *e = r->cache_ms > 0 ? authz_cache_find(ctl, r) : NULL;
    struct authz_pending *same = e == NULL ? authz_asking(ctl, r) : NULL;
    if (e != NULL) {
        r->allowed = e->allowed;
        snprintf(r->reason, sizeof(r->reason), "%.200s (cached)", e->reason);
        authq_box_post(r->reply, r);
    } else if (same != NULL) {
        r->next = same->waiters;
        same->waiters = r;
    } else {
        struct authz_pending *p = xcalloc(1, sizeof(*p));
        char *body = decode_authorize_request_json(r->target, r->client_uri, r->client_serial);
        r->asks++;
        p->ctl = ctl;
        p->req = r;
        p->asked_under = ctl->intents_gen;
        p->next = ctl->asking;
        if (p->next != NULL)
            p->next->prev = p;
        ctl->asking = p;
        /* The target is in the proxy's namespace and partition, as the intentions watch. */
        char *path = xasprintf("/v1/agent/connect/authorize%s%s", ctl->scope[0] ? "?" : "",
                               ctl->scope[0] ? ctl->scope + 1 : "");
        p->areq =
            agent_request(ctl->agent, "POST", path, body, AUTHORIZE_HTTP_MS, on_authorized, p);
        free(path);
        free(body);
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
        if (ctl->reg_body != NULL) {
            /* -register: deregister while the drain runs (a second signal does not wait). */
            loop_timer_stop(ctl->loop, &ctl->heartbeat);
            if (ctl->reg_req != NULL)
                agent_cancel(ctl->reg_req);
            char *esc = url_escape(ctl->proxy_id);
            char *path = xasprintf("/v1/agent/service/deregister/%s", esc);
            ctl->reg_req =
                agent_request(ctl->agent, "PUT", path, NULL, DEREGISTER_MS, on_deregister, ctl);
            free(path);
            free(esc);
        }
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
    if (!ctl->have_roots)
        return "waiting for the CA roots";
    if (!ctl->have_leaf || ctl->tls == NULL)
        return "waiting for the leaf certificate";
    if (ctl->intents == NULL)
        return "waiting for the intentions";
    if (ctl->current == NULL)
        return "no configuration published to the workers yet";
    for (int i = 0; i < ctl->n_workers; i++)
        if (!worker_listening(ctl->workers[i]))
            return "listeners are not all open";
    return NULL;
}

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

static void render_watches(const struct control *ctl, struct admin_buf *b)
{
    uint64_t now = util_now_ms();
    metric_head(b, "watch_up", "gauge",
                "1 when the watch has an answer and its last attempt succeeded, else 0.");
    metric_head(b, "watch_last_success_age_seconds", "gauge",
                "Seconds since the watch last got a good answer (NaN before the first).");
    watch_metrics(b, "registration", ctl->svc_watch, now);
    watch_metrics(b, "roots", ctl->roots_watch, now);
    watch_metrics(b, "leaf", ctl->leaf_watch, now);
    watch_metrics(b, "intentions", ctl->intent_watch, now);
    for (size_t i = 0; i < ctl->n_ups; i++) {
        const struct up_watch *u = ctl->ups[i];
        char name[600];
        snprintf(name, sizeof(name), "upstream:%s", u->key);
        watch_metrics(b, name, u->watch, now);
        for (size_t j = 0; j < u->n_tgts; j++) {
            snprintf(name, sizeof(name), "health:%s", u->tgts[j]->id);
            watch_metrics(b, name, u->tgts[j]->watch, now);
        }
    }
}

static void render_metrics(const struct control *ctl, struct admin_buf *b)
{
    struct listener_sum *ls = NULL;
    struct source_sum *ss = NULL;
    size_t nl = 0, ns = 0;
    uint64_t hs[SESSION_HS_COUNT] = {0}, tls_hs[2][2] = {{0}};
    uint64_t refused_max = 0, refused_rate = 0, idle = 0, lifetime = 0, reauth = 0,
             reauth_closed = 0, refused_pending = 0, refused_pending_source = 0, refused_fds = 0;
    for (int i = 0; i < ctl->n_workers; i++) {
        const struct session_stats *st = worker_stats(ctl->workers[i]);
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
    sample(b, "pending_handshakes", NULL, NULL, (uint64_t)limit_pending_count(ctl->inbound_limit));
    metric_head(b, "timeout_closes_total", "counter",
                "Sessions ended by the idle timeout or the lifetime bound, by kind.");
    sample(b, "timeout_closes_total", "kind", "idle", idle);
    sample(b, "timeout_closes_total", "kind", "lifetime", lifetime);

    render_watches(ctl, b);

    metric_head(b, "leaf_not_after_seconds", "gauge",
                "Unix time at which the current leaf certificate expires.");
    if (ctl->tls != NULL)
        admin_buf_printf(b, "connectd_leaf_not_after_seconds %lld\n",
                         tls_ctx_leaf_not_after(ctl->tls));
    metric_head(b, "snapshot_generation", "gauge",
                "Generation of the configuration snapshot last published to the workers.");
    sample(b, "snapshot_generation", NULL, NULL, ctl->current ? ctl->current->generation : 0);
    metric_head(b, "ready", "gauge", "1 when /ready answers 200.");
    sample(b, "ready", NULL, NULL, not_ready_reason(ctl) == NULL);
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

static void render_authz(const struct control *ctl, const struct admin_request *req,
                         struct admin_reply *reply)
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
    if (ctl->intents == NULL) {
        reply->status = 503;
        admin_buf_printf(b, "the intentions have not arrived yet\n");
        return;
    }
    struct intent_decision d = intent_eval(ctl->intents, partition, ns, source);
    char why[600];
    reply->content_type = "application/json";
    admin_buf_add(b, "{", 1);
    json_kv_str(b, "source", source, 1);
    json_kv_str(b, "namespace", ns, 1);
    json_kv_str(b, "partition", partition, 1);
    json_kv_str(b, "destination", ctl->service, 1);
    json_kv_str(b, "decision", d.allow ? "allow" : "deny", 1);
    json_kv_str(b, "reason", intent_describe(&d, why, sizeof(why)), 1);
    if (ctl->current != NULL && ctl->current->cfg.authorize_with_agent)
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
static void render_config(const struct control *ctl, struct admin_reply *reply)
{
    struct admin_buf *b = &reply->body;
    const struct snapshot *s = ctl->current;
    if (s == NULL) {
        reply->status = 503;
        admin_buf_printf(b, "no configuration yet: %s\n", not_ready_reason(ctl));
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
    json_kv_str(b, "leaf_serial", ctl->have_leaf ? ctl->leaf.serial : NULL, 1);
    json_kv_str(b, "leaf_valid_before", ctl->have_leaf ? ctl->leaf.valid_before : NULL, 1);
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

static void render_connections(const struct control *ctl, const struct conn_job *j,
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
            json_kv_str(b, "local_service", s->inbound ? ctl->service : NULL, 1);
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
static void connections_poll(struct control *ctl, int force)
{
    struct conn_job *j = ctl->conn_job;
    if (j == NULL)
        return;
    int done = 0;
    for (int i = 0; i < j->n; i++)
        done += atomic_load_explicit(&j->listings[i].done, memory_order_acquire);
    if (j->reply != NULL && (done == j->n || force)) {
        struct admin_reply *r = j->reply;
        j->reply = NULL;
        loop_timer_stop(ctl->loop, &ctl->conn_wait);
        render_connections(ctl, j, r);
        admin_reply_send(r);
    }
    if (done == j->n && j->reply == NULL) {
        conn_job_free(j);
        ctl->conn_job = NULL;
    }
}

static void on_conn_wait(struct loop_timer *t)
{
    connections_poll(t->data, 1);
}

static void on_conn_cancel(void *data)
{
    struct control *ctl = data;
    ctl->conn_job->reply = NULL;
    loop_timer_stop(ctl->loop, &ctl->conn_wait);
    connections_poll(ctl, 0);
}

static void connections_start(struct control *ctl, struct admin_reply *reply)
{
    if (ctl->conn_job != NULL) {
        reply->status = 503;
        admin_buf_printf(&reply->body, "a /connections listing is still being collected\n");
        admin_reply_send(reply);
        return;
    }
    struct conn_job *j = xcalloc(1, sizeof(*j));
    j->n = ctl->n_workers;
    j->listings = xcalloc((size_t)j->n, sizeof(*j->listings));
    j->reply = reply;
    reply->cancel = on_conn_cancel;
    reply->cancel_data = ctl;
    ctl->conn_job = j;
    for (int i = 0; i < j->n; i++) {
        struct worker_listing *l = &j->listings[i];
        l->max = CONNECTIONS_MAX_PER_WORKER;
        l->v = xcalloc(l->max, sizeof(*l->v));
        l->notify = ctl->loop;
        worker_list_sessions(ctl->workers[i], l);
    }
    loop_timer_start(ctl->loop, &ctl->conn_wait, CONNECTIONS_WAIT_MS);
}

static void on_admin(void *data, const struct admin_request *req, struct admin_reply *reply)
{
    struct control *ctl = data;
    struct admin_buf *b = &reply->body;
    if (strcmp(req->path, "/ready") == 0) {
        const char *why = not_ready_reason(ctl);
        reply->status = why == NULL ? 200 : 503;
        admin_buf_printf(b, "%s\n", why == NULL ? "ready" : why);
    } else if (strcmp(req->path, "/metrics") == 0) {
        reply->content_type = "text/plain; version=0.0.4; charset=utf-8";
        render_metrics(ctl, b);
    } else if (strcmp(req->path, "/authz") == 0) {
        render_authz(ctl, req, reply);
    } else if (strcmp(req->path, "/config") == 0) {
        render_config(ctl, reply);
    } else if (strcmp(req->path, "/connections") == 0) {
        connections_start(ctl, reply);
        return;
    } else {
        reply->status = 404;
        admin_buf_printf(b,
                         "not found; try /ready, /metrics, /connections, /authz?source=<service> "
                         "or /config\n");
    }
    admin_reply_send(reply);
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
    loop_timer_init(&ctl.self_retry, on_self_retry, &ctl);
    loop_timer_init(&ctl.heartbeat, on_heartbeat, &ctl);
    loop_timer_init(&ctl.recheck_timer, on_recheck_timer, &ctl);
    loop_timer_init(&ctl.drain_poll, on_drain_poll, &ctl);
    loop_timer_init(&ctl.conn_wait, on_conn_wait, &ctl);
    ctl.sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (ctl.sigfd == -1) {
        LOG_ERROR("signalfd: %s", util_strerror(-errno));
        goto out;
    }
    loop_io_init(&ctl.sig_io, ctl.sigfd, on_signal, &ctl);
    loop_io_want(ctl.loop, &ctl.sig_io, LOOP_READ);
    ctl.inbound_limit = limit_state_new();
    ctl.self_acls_enabled = -1;

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

    if (conf->admin_bind != NULL && conf->admin_bind[0] != '\0') {
        ctl.admin = admin_start(ctl.loop, conf->admin_bind, on_admin, &ctl, err, sizeof(err));
        if (ctl.admin == NULL) {
            LOG_ERROR("%s", err);
            rc = 2;
            goto out;
        }
    }
    LOG_INFO("connectd starting: agent %s, %d worker(s)", agent_addr(ctl.agent), ctl.n_workers);
    struct watch_spec roots_spec = {.name = "roots",
                                    .method = "GET",
                                    .path = "/v1/agent/connect/ca/roots",
                                    .block = WATCH_BY_INDEX,
                                    .reach = ctl.reach};
    ctl.roots_watch = watch_start(ctl.agent, &roots_spec, on_roots, &ctl);
    self_start(&ctl);
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
            self_register(&ctl);
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
    conn_job_free(ctl.conn_job); /* no worker can write into it now */
    free(ctl.workers);
    if (ctl.lookup != NULL)
        agent_cancel(ctl.lookup);
    if (ctl.self_req != NULL)
        agent_cancel(ctl.self_req);
    if (ctl.reg_req != NULL)
        agent_cancel(ctl.reg_req);
    while (ctl.asking != NULL) { /* the workers are gone: nobody waits for these answers */
        struct authz_pending *p = ctl.asking;
        ctl.asking = p->next;
        agent_cancel(p->areq);
        authq_req_free(p->req);
        while (p->waiters != NULL) {
            struct authq_req *w = p->waiters;
            p->waiters = w->next;
            authq_req_free(w);
        }
        free(p);
    }
    loop_timer_stop(ctl.loop, &ctl.recheck_timer);
    while (ctl.recheck_later != NULL) {
        struct authq_req *r = ctl.recheck_later;
        ctl.recheck_later = r->next;
        authq_req_free(r);
    }
    authq_box_free(ctl.ask);
    authz_cache_clear(&ctl);
    if (ctl.svc_watch != NULL)
        watch_stop(ctl.svc_watch);
    if (ctl.leaf_watch != NULL)
        watch_stop(ctl.leaf_watch);
    if (ctl.intent_watch != NULL)
        watch_stop(ctl.intent_watch);
    if (ctl.roots_watch != NULL)
        watch_stop(ctl.roots_watch);
    for (size_t i = 0; i < ctl.n_ups; i++)
        up_watch_free(ctl.ups[i]);
    free(ctl.ups);
    if (ctl.loop != NULL) {
        loop_timer_stop(ctl.loop, &ctl.lookup_retry);
        loop_timer_stop(ctl.loop, &ctl.self_retry);
        loop_timer_stop(ctl.loop, &ctl.heartbeat);
        loop_timer_stop(ctl.loop, &ctl.drain_poll);
        loop_timer_stop(ctl.loop, &ctl.conn_wait);
    }
    limit_state_unref(ctl.inbound_limit);
    forget_rules(&ctl);
    watch_reach_free(ctl.reach);
    agent_free(ctl.agent);
    snapshot_unref(ctl.current);
    tls_ctx_unref(ctl.tls);
    intent_table_unref(ctl.intents);
    if (ctl.have_leaf)
        dec_leaf_dispose(&ctl.leaf);
    tls_key_free(ctl.leaf_key);
    if (ctl.have_roots)
        dec_roots_dispose(&ctl.roots);
    if (ctl.have_cfg)
        proxycfg_dispose(&ctl.cfg);
    free(ctl.service);
    free(ctl.scope);
    free(ctl.proxy_id);
    free(ctl.reg_body);
    free(ctl.check_id);
    if (ctl.sigfd != -1)
        close(ctl.sigfd);
    loop_free(ctl.loop);
    return rc;
}
