/*
 * inputs: the roots, leaf, intentions and mesh config entry watches and the agent's default
 * policy, turned into a TLS context, an intention table and the request normalization settings
 * for the control thread's snapshots.
 *
 * The leaf and the intentions are those of the destination service in the proxy's own
 * namespace and partition; a new identity (inputs_set_service) drops both and watches again.
 * The mesh config entry is the one of the proxy's partition.
 */
#include "inputs.h"
#include "limit.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

struct inputs {
    struct agent *agent;
    struct loop *loop;
    struct watch_reach *reach;
    inputs_cb cb;
    void *cb_data;

    struct watch *roots_watch, *leaf_watch, *intent_watch, *mesh_watch, *rates_watch;
    char *service; /* the destination service the leaf and intentions watches are for */
    char *scope;   /* its "&ns=..&partition=.." query suffix ("" for the defaults) */

    /* the TLS settings of the configuration in force, once it arrived */
    int have_tls_opts;
    int tls_min_version, tls_max_version;
    char *tls_cipher_suites;

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
    char agent_addr[64];              /* its Member.Addr (LAN advertise address); "" unknown */
    /* The mesh config entry's HTTP.Incoming.RequestNormalization: Consul's defaults until an
     * entry arrives, and again when the agent says there is none (404). */
    struct mesh_http_cfg mesh_http;
    int have_mesh;    /* the agent has answered about the entry (an entry, none, or a 403) */
    int mesh_refused; /* the last answer was a 403 (logged once) */
    char *mesh_scope; /* the mesh watch's "&partition=.." ("" for the default partition) */
    /* The service-defaults entry's RateLimits.InstanceLevel: none until it arrives, and again
     * when the agent says there is no entry (404). <rates> is NULL while nothing is limited. */
    struct dec_rate_limits rates_cfg;
    struct limit_rates *rates;
    /* The agent has answered about the entry (an entry, none, or a 403): until then nothing
     * is served, so no request slips past limits that were not read yet. */
    int have_rates;
    struct agent_req *self_req;
    struct loop_timer self_retry;
    unsigned self_failures;
};

static void tell(struct inputs *in, enum inputs_event ev)
{
    in->cb(in->cb_data, ev);
}

/* ---- TLS: leaf + roots -> context ---- */

/*
 * Builds the TLS contexts for <leaf> with its <key>, and <roots>. Returns 0 with *out NULL when
 * the leaf or the roots have not arrived (nothing to build), 0 with *out set, or a negative
 * code with the reason in <err>.
 */
static int build_tls(const struct inputs *in, const struct dec_leaf *leaf,
                     const struct tls_key *key, const struct dec_roots *roots, struct tls_ctx **out,
                     char *err, size_t errlen)
{
    *out = NULL;
    if (leaf == NULL || roots == NULL)
        return 0;
    const char **pems = xcalloc(roots->n_roots, sizeof(*pems));
    for (size_t i = 0; i < roots->n_roots; i++)
        pems[i] = roots->roots[i].root_cert_pem;
    /* Until the configuration arrives the defaults apply; inputs_set_tls() rebuilds if it
     * differs. */
    struct tls_ctx_opts opts = {0};
    if (in->have_tls_opts) {
        opts.min_version = in->tls_min_version;
        opts.max_version = in->tls_max_version;
        opts.cipher_suites = in->tls_cipher_suites;
    }
    int rc =
        tls_ctx_new_with_key(leaf->cert_pem, key, pems, roots->n_roots, &opts, out, err, errlen);
    free(pems);
    return rc;
}

/* Makes <ctx> (taken; NULL: nothing), built from <leaf> and <roots>, the contexts in force. */
static void install_tls(struct inputs *in, struct tls_ctx *ctx, const struct dec_leaf *leaf,
                        const struct dec_roots *roots)
{
    if (ctx == NULL || leaf == NULL || roots == NULL) {
        tls_ctx_unref(ctx); /* only built with both: never happens */
        return;
    }
    tls_ctx_unref(in->tls);
    in->tls = ctx;
    LOG_INFO("TLS: leaf %s for %s, %zu trusted root(s), trust domain %s", leaf->serial,
             leaf->service, roots->n_roots, roots->trust_domain);
    tell(in, INPUTS_CHANGED);
}

/*
 * A roots answer must name its active root among its roots, marked Active: the leaves the
 * agent signs now chain to it, so roots without it would refuse every caller with a new leaf.
 * Consul never sends such an answer; a broken hop or a half-written one might.
 */
static int check_active_root(const struct dec_roots *roots, char *err, size_t errlen)
{
    for (size_t i = 0; i < roots->n_roots; i++)
        if (roots->roots[i].active && roots->active_root_id != NULL &&
            strcmp(roots->roots[i].id, roots->active_root_id) == 0)
            return 0;
    snprintf(err, errlen,
             "the answer lacks its active root (ActiveRootID \"%s\" is none of its %zu "
             "root(s) marked Active)",
             LOG_ESC(roots->active_root_id != NULL ? roots->active_root_id : ""), roots->n_roots);
    return ERR_BAD_FIELD;
}

static int on_roots(void *data, const struct agent_response *resp)
{
    struct inputs *in = data;
    char err[512] = "";
    struct dec_roots roots;
    struct tls_ctx *ctx = NULL;
    int rc = decode_roots(resp->body, resp->body_len, &roots, err, sizeof(err));
    if (rc == 0) {
        rc = check_active_root(&roots, err, sizeof(err));
        if (rc == 0)
            rc = build_tls(in, in->have_leaf ? &in->leaf : NULL, in->leaf_key, &roots, &ctx, err,
                           sizeof(err));
        if (rc != 0)
            dec_roots_dispose(&roots);
    }
    if (rc != 0) {
        /* Once per bad answer, however often the agent sends it again. */
        enum log_level lvl = watch_reject_level(in->roots_watch, err[0] ? err : util_strerror(rc));
        LOG_AT(lvl, "watch roots: %s; keeping the previous roots",
               err[0] ? err : util_strerror(rc));
        return rc;
    }
    install_tls(in, ctx, &in->leaf, &roots);
    if (in->have_roots)
        dec_roots_dispose(&in->roots);
    in->roots = roots;
    in->have_roots = 1;
    return 0;
}

/* Whether a leaf is in force and valid at <now>. */
static int leaf_in_force(const struct inputs *in, long long now)
{
    return in->have_leaf && in->tls != NULL && tls_ctx_leaf_not_before(in->tls) <= now &&
           tls_ctx_leaf_not_after(in->tls) > now;
}

static int on_leaf(void *data, const struct agent_response *resp)
{
    struct inputs *in = data;
    char err[512] = "";
    struct dec_leaf leaf;
    struct tls_key *key = NULL;
    struct tls_ctx *ctx = NULL;
    int rc = decode_leaf(resp->body, resp->body_len, &leaf, err, sizeof(err));
    if (rc == 0) {
        /* The PEM text goes at once: from here on the key lives only in OpenSSL's form, the one
         * copy the contexts share, even across rebuilds for new roots or settings. */
        rc = tls_key_new(leaf.key_pem, &key, err, sizeof(err));
        util_wipe_free(leaf.key_pem, strlen(leaf.key_pem));
        leaf.key_pem = NULL;
        if (rc == 0)
            rc = build_tls(in, &leaf, key, in->have_roots ? &in->roots : NULL, &ctx, err,
                           sizeof(err));
        /* A leaf past its notAfter would be refused by every peer: the one in force (which the
         * agent renews well before it ends) serves better. */
        long long now = (long long)time(NULL);
        long long not_after = ctx != NULL ? tls_ctx_leaf_not_after(ctx) : 0;
        long long not_before = ctx != NULL ? tls_ctx_leaf_not_before(ctx) : 0;
        if (rc == 0 && ctx != NULL && not_after <= now) {
            snprintf(err, sizeof(err), "certificate %s expired (its notAfter is %lld)",
                     LOG_ESC(leaf.serial), not_after);
            rc = ERR_BAD_CERT;
        } else if (rc == 0 && ctx != NULL && not_before > now && leaf_in_force(in, now)) {
            /* Not valid yet (the agent's clock ahead of ours, or a bad answer): peers whose
             * clocks agree with ours would refuse it. The leaf in force serves until then;
             * the watch fetches the answer again after its back-off and takes it once its
             * notBefore has passed. Without a good leaf in force, this one is the best. */
            snprintf(err, sizeof(err), "certificate %s is not valid yet (its notBefore is %lld)",
                     LOG_ESC(leaf.serial), not_before);
            rc = ERR_BAD_CERT;
        }
        if (rc != 0) {
            tls_ctx_unref(ctx);
            dec_leaf_dispose(&leaf);
            tls_key_free(key);
        }
    }
    if (rc != 0) {
        /* Once per bad answer; <err> never holds key material (tls and decode name fields
         * and reasons, not values). */
        enum log_level lvl = watch_reject_level(in->leaf_watch, err[0] ? err : util_strerror(rc));
        LOG_AT(lvl, "watch leaf %s: %s; keeping the previous one", in->service,
               err[0] ? err : util_strerror(rc));
        return rc;
    }
    install_tls(in, ctx, &leaf, in->have_roots ? &in->roots : NULL);
    if (in->have_leaf)
        dec_leaf_dispose(&in->leaf);
    tls_key_free(in->leaf_key);
    in->leaf = leaf;
    in->leaf_key = key;
    in->have_leaf = 1;
    return 0;
}

static int same_tls_settings(const struct inputs *in, int min_version, int max_version,
                             const char *cipher_suites)
{
    const char *ca = in->tls_cipher_suites ? in->tls_cipher_suites : "";
    const char *cb = cipher_suites ? cipher_suites : "";
    return in->tls_min_version == min_version && in->tls_max_version == max_version &&
           strcmp(ca, cb) == 0;
}

void inputs_set_tls(struct inputs *in, int min_version, int max_version, const char *cipher_suites)
{
    int tls_changed =
        !in->have_tls_opts || !same_tls_settings(in, min_version, max_version, cipher_suites);
    free(in->tls_cipher_suites);
    in->tls_min_version = min_version;
    in->tls_max_version = max_version;
    in->tls_cipher_suites = cipher_suites ? xstrdup(cipher_suites) : NULL;
    in->have_tls_opts = 1;
    if (tls_changed && (min_version || max_version || cipher_suites || in->tls != NULL)) {
        char err[512] = "";
        struct tls_ctx *ctx;
        if (build_tls(in, in->have_leaf ? &in->leaf : NULL, in->leaf_key,
                      in->have_roots ? &in->roots : NULL, &ctx, err, sizeof(err)) != 0)
            LOG_ERROR("cannot build TLS contexts with the new TLS settings: %s; keeping the "
                      "previous ones",
                      err);
        else
            install_tls(in, ctx, &in->leaf, &in->roots);
    }
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
static int default_allow(const struct inputs *in, const char **why)
{
    const char *p = NULL;
    if (in->default_intention_policy[0] != '\0') {
        p = in->default_intention_policy;
        *why = "agent default_intention_policy";
    } else if (in->acl_header_policy[0] != '\0') {
        p = in->acl_header_policy;
        *why = "agent ACL default policy";
    } else if (in->self_acl_policy[0] != '\0') {
        p = in->self_acl_policy;
        *why = "agent ACL default policy, from agent self";
    } else if (in->self_acls_enabled == 0) {
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

static void apply_intentions(struct inputs *in)
{
    if (!in->have_rules)
        return;
    const char *why;
    struct intent_table *t = intent_table_new(in->rules, in->n_rules, default_allow(in, &why));
    if (in->intents != NULL && intent_table_equal(in->intents, t)) {
        intent_table_unref(t);
        return;
    }
    tell(in, INPUTS_INTENTIONS_CHANGING); /* the agent's answers may differ now */
    LOG_INFO("intentions for %s: %zu rule(s), default %s (%s)", in->service, intent_table_len(t),
             intent_table_default_allow(t) ? "allow" : "deny", why);
    intent_table_unref(in->intents);
    in->intents = t;
    in->intents_gen++;
    tell(in, INPUTS_CHANGED);
}

static void forget_rules(struct inputs *in)
{
    if (in->have_rules)
        dec_intentions_free(in->rules, in->n_rules);
    in->rules = NULL;
    in->n_rules = 0;
    in->have_rules = 0;
}

static int on_intentions(void *data, const struct agent_response *resp)
{
    struct inputs *in = data;
    char err[256];
    struct dec_intention *v;
    size_t n;
    int rc =
        decode_intentions_match(resp->body, resp->body_len, in->service, &v, &n, err, sizeof(err));
    if (rc != 0) {
        enum log_level lvl = watch_reject_level(in->intent_watch, err);
        LOG_AT(lvl,
               "watch intentions %s: %s; keeping the "
               "previous table",
               in->service, err);
        return rc;
    }
    forget_rules(in);
    in->rules = v;
    in->n_rules = n;
    in->have_rules = 1;
    keep_policy(in->acl_header_policy, resp->default_acl_policy);
    apply_intentions(in);
    return 0;
}

/* ---- the mesh config entry ---- */

static void describe_mesh(const struct mesh_http_cfg *m, char *buf, size_t len)
{
    snprintf(buf, len,
             "path normalization %s, merge slashes %s, escaped slashes %s, headers with "
             "underscores %s",
             m->disable_path_normalization ? "off" : "on", m->merge_slashes ? "on" : "off",
             pathnorm_escaped_slash_name(m->escaped_slash),
             pathnorm_underscore_name(m->underscore));
}

/* Makes <m> the settings in force; a rebuild only when they differ (or are the first). */
static void install_mesh(struct inputs *in, const struct mesh_http_cfg *m, const char *source)
{
    char what[256];
    int first = !in->have_mesh;
    in->have_mesh = 1;
    if (!first && memcmp(&in->mesh_http, m, sizeof(*m)) == 0)
        return;
    in->mesh_http = *m;
    describe_mesh(m, what, sizeof(what));
    LOG_INFO("request normalization (%s): %s", source, what);
    tell(in, INPUTS_CHANGED);
}

static int on_mesh(void *data, const struct agent_response *resp)
{
    struct inputs *in = data;
    char err[512];
    struct mesh_http_cfg m;
    int first = !in->have_mesh;
    if (resp->status == 403) {
        /* Current agents let any token read the entry (its CanRead allows all), so a 403
         * comes from elsewhere: a token the agent does not know, another agent version, a hop
         * in front of it. Serving beats waiting forever: the settings in force (the defaults
         * at first) stay, and the watch backs off and asks again. */
        if (!in->mesh_refused)
            LOG_WARN("mesh config entry: HTTP 403 (the ACL token may not read it); %s request "
                     "normalization stays in force",
                     first ? "the default" : "the last good");
        in->mesh_refused = 1;
        if (first) {
            memset(&m, 0, sizeof(m));
            install_mesh(in, &m, "defaults, the entry could not be read");
        }
        return -EACCES;
    }
    in->mesh_refused = 0;
    if (resp->status == 404) {
        memset(&m, 0, sizeof(m));
        install_mesh(in, &m, "no mesh config entry, defaults");
        return 0;
    }
    int rc = decode_mesh_http(resp->body, resp->body_len, &m, err, sizeof(err));
    if (rc != 0) {
        enum log_level lvl = watch_reject_level(in->mesh_watch, err);
        LOG_AT(lvl, "mesh config entry: %s; keeping the %s request normalization", err,
               first ? "default" : "last good");
        if (first) {
            memset(&m, 0, sizeof(m));
            install_mesh(in, &m, "defaults, the entry is not understood");
        }
        return rc;
    }
    install_mesh(in, &m, "mesh config entry");
    return 0;
}

/* Watches the mesh config entry of <partition> unless that is the one watched already. */
static void start_mesh_watch(struct inputs *in, const char *partition)
{
    char *scope = agent_scope_query("", partition);
    if (in->mesh_watch != NULL && strcmp(in->mesh_scope, scope) == 0) {
        free(scope);
        return;
    }
    char *path =
        xasprintf("/v1/config/mesh/mesh%s%s", scope[0] ? "?" : "", scope[0] ? scope + 1 : "");
    struct watch_spec spec = {.name = "mesh",
                              .method = "GET",
                              .path = path,
                              .block = WATCH_BY_INDEX,
                              .reach = in->reach,
                              .deliver_403_404 = 1};
    if (in->mesh_watch != NULL)
        watch_stop(in->mesh_watch);
    in->mesh_watch = watch_start(in->agent, &spec, on_mesh, in);
    free(in->mesh_scope);
    in->mesh_scope = scope;
    free(path);
}

/* ---- the service-defaults entry: inbound rate limits ---- */

/* Makes <c> (taken) the limits in force; a rebuild only when they differ. */
static void install_rates(struct inputs *in, struct dec_rate_limits *c, const char *source)
{
    if (!in->have_rates) {
        in->have_rates = 1;
        tell(in, INPUTS_CHANGED); /* the first snapshot may have waited for this answer */
    }
    if (dec_rate_limits_equal(&in->rates_cfg, c)) {
        dec_rate_limits_dispose(c);
        return;
    }
    char err[320];
    struct limit_rates *r = limit_rates_new(c, in->rates, err, sizeof(err));
    if (err[0] != '\0')
        LOG_ERROR("service-defaults rate limits: %s; that route limits every path", err);
    if (limit_rates_none(r)) {
        limit_rates_unref(r);
        r = NULL;
    }
    limit_rates_unref(in->rates);
    in->rates = r;
    dec_rate_limits_dispose(&in->rates_cfg);
    in->rates_cfg = *c;
    memset(c, 0, sizeof(*c));
    LOG_INFO("inbound rate limits (%s): %u/s, burst %u, %zu route(s)", source,
             in->rates_cfg.per_second, in->rates_cfg.burst, in->rates_cfg.n_routes);
    tell(in, INPUTS_CHANGED);
}

static int on_rates(void *data, const struct agent_response *resp)
{
    struct inputs *in = data;
    char err[512];
    struct dec_rate_limits c;
    memset(&c, 0, sizeof(c));
    if (resp->status == 404) {
        install_rates(in, &c, "no service-defaults entry");
        return 0;
    }
    if (resp->status == 403) {
        if (watch_reject_level(in->rates_watch, "HTTP 403") != LOG_LEVEL_DEBUG)
            LOG_WARN("service-defaults entry: HTTP 403 (the ACL token may not read it); the "
                     "rate limits in force stay");
        /* Serving beats waiting forever, as for the mesh entry: none at first. */
        if (!in->have_rates)
            install_rates(in, &c, "none, the entry could not be read");
        return -EACCES;
    }
    int rc = decode_rate_limits(resp->body, resp->body_len, &c, err, sizeof(err));
    if (rc != 0) {
        enum log_level lvl = watch_reject_level(in->rates_watch, err);
        LOG_AT(lvl, "service-defaults entry: %s; keeping the rate limits in force", err);
        return rc;
    }
    install_rates(in, &c, "service-defaults entry");
    return 0;
}

static void start_rates_watch(struct inputs *in, const char *service)
{
    char *esc = util_url_escape(service);
    char *path = xasprintf("/v1/config/service-defaults/%s%s%s", esc, in->scope[0] ? "?" : "",
                           in->scope[0] ? in->scope + 1 : "");
    struct watch_spec spec = {.name = "service-defaults",
                              .method = "GET",
                              .path = path,
                              .block = WATCH_BY_INDEX,
                              .reach = in->reach,
                              .deliver_403_404 = 1};
    if (in->rates_watch != NULL)
        watch_stop(in->rates_watch);
    in->rates_watch = watch_start(in->agent, &spec, on_rates, in);
    free(path);
    free(esc);
}

/* One look at the agent's own configuration for its default policies; retried only while the
 * agent cannot answer (a 403 without agent:read leaves what the answers' headers say). */
static void self_start(struct inputs *in);

static void on_self_retry(struct loop_timer *t)
{
    self_start(t->data);
}

static void on_self(void *data, const struct agent_response *resp)
{
    struct inputs *in = data;
    char err[256];
    struct dec_agent_self self;
    in->self_req = NULL;
    watch_reach_note(in->reach, resp);
    if (resp->status == 0 || resp->status >= 500) {
        watch_retry_later(in->loop, &in->self_retry, in->self_failures++);
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
        snprintf(in->default_intention_policy, sizeof(in->default_intention_policy), "%s", p);
        LOG_INFO("agent default_intention_policy is %s", p);
    } else if (p[0] != '\0') {
        LOG_WARN("agent default_intention_policy \"%s\" is not allow or deny; ignored", p);
    }
    keep_policy(in->self_acl_policy, self.acl_default_policy);
    in->self_acls_enabled = self.acls_enabled;
    int addr_changed = strcmp(in->agent_addr, self.member_addr) != 0;
    snprintf(in->agent_addr, sizeof(in->agent_addr), "%s", self.member_addr);
    dec_agent_self_dispose(&self);
    if (addr_changed)
        tell(in, INPUTS_CHANGED); /* exposed check listeners admit the agent's address */
    apply_intentions(in);
}

static void self_start(struct inputs *in)
{
    in->self_req = agent_request(in->agent, "GET", "/v1/agent/self", NULL, 30000, on_self, in);
}

/* ---- the destination service ---- */

/*
 * The leaf and the intentions are those of the destination service in the proxy's own
 * namespace and partition (an Enterprise proxy registered outside the defaults must not
 * present, nor be governed as, the same-named service of the default namespace).
 */
static void start_service_watches(struct inputs *in, const char *service)
{
    char *esc = util_url_escape(service);
    char *path = xasprintf("/v1/agent/connect/ca/leaf/%s%s%s", esc, in->scope[0] ? "?" : "",
                           in->scope[0] ? in->scope + 1 : "");
    char *name = xasprintf("leaf %s", service);
    struct watch_spec spec = {
        .name = name, .method = "GET", .path = path, .block = WATCH_BY_INDEX, .reach = in->reach};
    if (in->leaf_watch != NULL)
        watch_stop(in->leaf_watch);
    in->leaf_watch = watch_start(in->agent, &spec, on_leaf, in);
    free(path);
    free(name);

    path =
        xasprintf("/v1/connect/intentions/match?by=destination&name=%s&cached%s", esc, in->scope);
    name = xasprintf("intentions %s", service);
    spec.name = name;
    spec.path = path;
    if (in->intent_watch != NULL)
        watch_stop(in->intent_watch);
    in->intent_watch = watch_start(in->agent, &spec, on_intentions, in);
    free(path);
    free(name);
    free(esc);
}

void inputs_set_service(struct inputs *in, const char *service, const char *ns,
                        const char *partition)
{
    char *scope = agent_scope_query(ns, partition);
    if (in->service == NULL || strcmp(in->service, service) != 0 || strcmp(in->scope, scope) != 0) {
        /* A new identity: the leaf and intentions of the old one no longer apply. */
        if (in->service != NULL)
            LOG_WARN("destination service changed from %s%s to %s%s", in->service, in->scope,
                     service, scope);
        free(in->service);
        in->service = xstrdup(service);
        free(in->scope);
        in->scope = scope;
        scope = NULL;
        if (in->have_leaf)
            dec_leaf_dispose(&in->leaf);
        tls_key_free(in->leaf_key);
        in->leaf_key = NULL;
        in->have_leaf = 0;
        intent_table_unref(in->intents);
        in->intents = NULL;
        in->intents_gen++;
        forget_rules(in);
        start_service_watches(in, service);
        start_rates_watch(in, service);
    }
    free(scope);
    start_mesh_watch(in, partition);
}

/* ---- life ---- */

struct inputs *inputs_new(struct agent *a, struct watch_reach *reach, inputs_cb cb, void *data)
{
    struct inputs *in = xcalloc(1, sizeof(*in));
    in->agent = a;
    in->loop = agent_loop(a);
    in->reach = reach;
    in->cb = cb;
    in->cb_data = data;
    in->self_acls_enabled = -1;
    loop_timer_init(&in->self_retry, on_self_retry, in);
    return in;
}

void inputs_start(struct inputs *in)
{
    struct watch_spec roots_spec = {.name = "roots",
                                    .method = "GET",
                                    .path = "/v1/agent/connect/ca/roots",
                                    .block = WATCH_BY_INDEX,
                                    .reach = in->reach};
    in->roots_watch = watch_start(in->agent, &roots_spec, on_roots, in);
    self_start(in);
}

void inputs_free(struct inputs *in)
{
    if (in == NULL)
        return;
    if (in->self_req != NULL)
        agent_cancel(in->self_req);
    loop_timer_stop(in->loop, &in->self_retry);
    if (in->leaf_watch != NULL)
        watch_stop(in->leaf_watch);
    if (in->intent_watch != NULL)
        watch_stop(in->intent_watch);
    if (in->roots_watch != NULL)
        watch_stop(in->roots_watch);
    if (in->mesh_watch != NULL)
        watch_stop(in->mesh_watch);
    if (in->rates_watch != NULL)
        watch_stop(in->rates_watch);
    limit_rates_unref(in->rates);
    dec_rate_limits_dispose(&in->rates_cfg);
    free(in->mesh_scope);
    forget_rules(in);
    tls_ctx_unref(in->tls);
    intent_table_unref(in->intents);
    if (in->have_leaf)
        dec_leaf_dispose(&in->leaf);
    tls_key_free(in->leaf_key);
    if (in->have_roots)
        dec_roots_dispose(&in->roots);
    free(in->tls_cipher_suites);
    free(in->service);
    free(in->scope);
    free(in);
}

/* ---- what the others read ---- */

const char *inputs_service(const struct inputs *in)
{
    return in->service;
}

const char *inputs_scope(const struct inputs *in)
{
    return in->scope != NULL ? in->scope : "";
}

struct tls_ctx *inputs_tls(const struct inputs *in)
{
    return in->tls;
}

size_t inputs_sweep_sessions(struct inputs *in)
{
    return in->tls != NULL ? tls_ctx_flush_sessions(in->tls, (long long)time(NULL)) : 0;
}

const struct dec_leaf *inputs_leaf(const struct inputs *in)
{
    return in->have_leaf ? &in->leaf : NULL;
}

const char *inputs_trust_domain(const struct inputs *in)
{
    return in->have_roots ? in->roots.trust_domain : NULL;
}

struct intent_table *inputs_intents(const struct inputs *in)
{
    return in->intents;
}

const char *inputs_agent_addr(const struct inputs *in)
{
    return in->agent_addr;
}

struct limit_rates *inputs_rates(const struct inputs *in)
{
    return in->rates;
}

const struct mesh_http_cfg *inputs_mesh_http(const struct inputs *in)
{
    return in->have_mesh ? &in->mesh_http : NULL;
}

uint64_t inputs_intents_gen(const struct inputs *in)
{
    return in->intents_gen;
}

const char *inputs_waiting_for(const struct inputs *in)
{
    if (!in->have_roots)
        return "waiting for the CA roots";
    if (!in->have_leaf || in->tls == NULL)
        return "waiting for the leaf certificate";
    if (in->intents == NULL)
        return "waiting for the intentions";
    if (!in->have_mesh)
        return "waiting for the mesh config entry";
    if (in->rates_watch != NULL && !in->have_rates)
        return "waiting for the service-defaults entry";
    return NULL;
}

void inputs_each_watch(const struct inputs *in, watch_visit_cb fn, void *data)
{
    if (in->roots_watch != NULL)
        fn(data, "roots", in->roots_watch);
    if (in->leaf_watch != NULL)
        fn(data, "leaf", in->leaf_watch);
    if (in->intent_watch != NULL)
        fn(data, "intentions", in->intent_watch);
    if (in->mesh_watch != NULL)
        fn(data, "mesh", in->mesh_watch);
    if (in->rates_watch != NULL)
        fn(data, "service-defaults", in->rates_watch);
}
