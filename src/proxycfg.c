/*
 * proxycfg: registration -> typed settings.
 *
 * Every key connectd understands is a row of one table below: its scope (the proxy's Config
 * or an upstream's Config), type, default, bounds and meaning. Parsing, validation, the
 * unknown-key warnings and doc/config.md all read the same rows, so they cannot drift apart.
 * Key names follow what Consul documents for its built-in proxy and for Envoy.
 */
#include "proxycfg.h"
#include "util.h"

#include <stdlib.h>
#include <string.h>

enum key_scope {
    SCOPE_PROXY = 1,
    SCOPE_UPSTREAM,
};

enum key_type {
    KEY_STRING = 1,
    KEY_PORT,
    KEY_MS,
    KEY_BOOL,
    KEY_TLS_VERSION, /* "TLS_AUTO", "TLSv1_2" or "TLSv1_3", as Consul's mesh TLS settings */
    KEY_COUNT,
    KEY_IGNORED, /* known, accepted, no effect here (e.g. set by central config for Envoy) */
};

struct key_def {
    const char *name;
    enum key_scope scope;
    enum key_type type;
    const char *def; /* default, as text for the docs */
    long min, max;
    const char *doc;
};

static const struct key_def keys[] = {
    {"bind_address", SCOPE_PROXY, KEY_STRING, "registration Address, else 0.0.0.0", 0, 0,
     "Address of the public (inbound mTLS) listener."},
    {"bind_port", SCOPE_PROXY, KEY_PORT, "registration Port", 0, 65535,
     "Port of the public listener; 0 disables it."},
    {"local_service_address", SCOPE_PROXY, KEY_STRING, "Proxy.LocalServiceAddress:LocalServicePort",
     0, 0, "host:port of the local application, when the registration does not name it."},
    {"local_connect_timeout_ms", SCOPE_PROXY, KEY_MS, "1000", 1, 600000,
     "Timeout for connecting to the local application."},
    {"handshake_timeout_ms", SCOPE_PROXY, KEY_MS, "10000", 1, 600000,
     "Timeout for a TLS handshake, inbound and outbound."},
    {"tls_min_version", SCOPE_PROXY, KEY_TLS_VERSION, "TLS_AUTO (TLSv1_2)", 0, 0,
     "Lowest TLS version of mesh connections, in and out: TLS_AUTO, TLSv1_2 or TLSv1_3 "
     "(TLSv1_0 and TLSv1_1 are refused)."},
    {"tls_max_version", SCOPE_PROXY, KEY_TLS_VERSION, "TLS_AUTO (none)", 0, 0,
     "Highest TLS version of mesh connections: TLS_AUTO, TLSv1_2 or TLSv1_3."},
    {"tls_cipher_suites", SCOPE_PROXY, KEY_STRING, "ECDHE with AES-GCM or ChaCha20", 0, 0,
     "Comma-separated TLS 1.2 cipher suites by IANA name, e.g. "
     "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 (TLS 1.3 suites are not configurable, as in "
     "Consul)."},
    {"verify_trust_domain", SCOPE_PROXY, KEY_BOOL, "true", 0, 0,
     "Require peers' SPIFFE IDs to be of the roots' trust domain; false accepts any trust "
     "domain whose certificate chains to a trusted root (CA migrations, providers without "
     "one)."},
    {"tls_resumption", SCOPE_PROXY, KEY_BOOL, "true", 0, 0,
     "Outbound: offer the session an earlier connection to the same endpoint received (TLS "
     "session resumption, cheaper than a full mutual handshake; the peer's identity is still "
     "checked). false runs a full handshake every time. Inbound resumption is always on."},
    {"authorization", SCOPE_PROXY, KEY_STRING, "intentions", 0, 0,
     "How inbound callers are authorized: intentions (the intention table the proxy watches) "
     "or authorize (POST /v1/agent/connect/authorize per new connection, from the control "
     "thread; the connection waits in AUTHORIZE)."},
    {"authorize_cache_ms", SCOPE_PROXY, KEY_MS, "5000", 0, 600000,
     "authorize mode: how long an answer is reused for the same caller; 0 keeps none "
     "(connections that arrive while a question about their caller is out share its answer). "
     "Cleared when the intentions change; an answer that disagrees with the intentions seen "
     "here (one of the two views is stale) is not kept."},
    {"authorize_timeout_ms", SCOPE_PROXY, KEY_MS, "5000", 1, 600000,
     "authorize mode: how long a connection waits for the agent's answer before it is closed."},
    {"protocol", SCOPE_PROXY, KEY_IGNORED, "tcp", 0, 0,
     "Service protocol. connectd relays every protocol at L4 (tcp)."},
    {"max_inbound_connections", SCOPE_PROXY, KEY_COUNT, "0 (no limit)", 0, 10000000,
     "Most concurrent inbound connections over all workers; more are closed at once after "
     "accept and counted."},
    {"max_new_connections_per_second", SCOPE_PROXY, KEY_COUNT, "0 (no limit)", 0, 1000000,
     "New inbound connections accepted per second (token bucket over all workers); more are "
     "closed at once after accept and counted."},
    {"max_new_connections_burst", SCOPE_PROXY, KEY_COUNT, "max_new_connections_per_second", 0,
     1000000, "Size of the inbound token bucket: how many new connections may arrive at once."},
    {"max_pending_handshakes", SCOPE_PROXY, KEY_COUNT,
     "half of the open-files limit left after the descriptor reserve", 0, 10000000,
     "Most concurrent inbound connections still in the TLS handshake, over all workers; "
     "newer ones are closed at once after accept and counted. 0 = the default, sized from the "
     "open-files limit (which connectd raises to its hard limit at start; the reserve is "
     "max(32, limit/8) descriptors kept for outbound dials, local-application connections and "
     "the agent, and inbound accepts that would eat into it are refused too)."},
    {"max_pending_handshakes_per_source", SCOPE_PROXY, KEY_COUNT,
     "max_pending_handshakes / 16, at least 8", 0, 10000000,
     "Most concurrent inbound connections in the TLS handshake from one source address; "
     "newer ones are closed at once after accept and counted. 0 = the default."},
    {"local_idle_timeout_ms", SCOPE_PROXY, KEY_MS, "0 (off)", 0, 86400000,
     "Closes an inbound connection after this long without a byte in either direction."},
    {"max_connection_lifetime_ms", SCOPE_PROXY, KEY_MS, "0 (off)", 0, 604800000,
     "Closes any connection, inbound or outbound, this long after it was accepted."},
    {"reauthorize_interval_ms", SCOPE_PROXY, KEY_MS, "0 (off)", 0, 86400000,
     "Re-evaluates every authorized inbound connection against the current intentions this "
     "often (they are always re-evaluated when the intentions change); in authorize mode the "
     "agent is asked again."},
    {"connect_timeout_ms", SCOPE_UPSTREAM, KEY_MS, "5000", 1, 600000,
     "Timeout for connecting to one upstream endpoint (TCP connect). Sent to the discovery "
     "chain as OverrideConnectTimeout, as Envoy does, so it overrides a service-resolver's "
     "ConnectTimeout; when absent the resolver's applies (Consul's default is 5000)."},
    {"prepared_query_poll_interval_ms", SCOPE_UPSTREAM, KEY_MS, "10000", 100, 3600000,
     "Prepared-query upstreams: how often the query is executed (queries cannot block)."},
    {"protocol", SCOPE_UPSTREAM, KEY_IGNORED, "tcp", 0, 0,
     "Upstream protocol. connectd relays every protocol at L4 (tcp)."},
    {"limits.max_connections", SCOPE_UPSTREAM, KEY_COUNT, "0 (no limit)", 0, 10000000,
     "Most concurrent connections to this upstream over all workers (Consul's "
     "`limits { max_connections }`); more are closed at once after accept and counted."},
    {"max_new_connections_per_second", SCOPE_UPSTREAM, KEY_COUNT, "0 (no limit)", 0, 1000000,
     "New connections accepted per second on this upstream's listener (token bucket over all "
     "workers); more are closed at once after accept and counted."},
    {"max_new_connections_burst", SCOPE_UPSTREAM, KEY_COUNT, "max_new_connections_per_second", 0,
     1000000, "Size of this upstream's token bucket: how many new connections may arrive at once."},
    {"idle_timeout_ms", SCOPE_UPSTREAM, KEY_MS, "0 (off)", 0, 86400000,
     "Closes a connection to this upstream after this long without a byte in either direction."},
};

static const struct key_def *find_key(enum key_scope scope, const char *name)
{
    for (size_t i = 0; i < ARRAY_SIZE(keys); i++)
        if (keys[i].scope == scope && strcmp(keys[i].name, name) == 0)
            return &keys[i];
    return NULL;
}

static int fail(char *err, size_t errlen, const char *fmt, const char *a, const char *b)
{
    snprintf(err, errlen, fmt, a, b);
    return ERR_BAD_CONFIG;
}

static void warn(struct proxy_cfg *c, char *msg)
{
    c->warnings = xrealloc(c->warnings, (c->n_warnings + 1) * sizeof(*c->warnings));
    c->warnings[c->n_warnings++] = msg;
}

/*
 * A registration can carry any number of unknown keys (the agent's body cap allows about a
 * million): past the bound they are only counted, never formatted or kept.
 */
static void warn_unknown(struct proxy_cfg *c, const char *where, const char *key)
{
    if (c->n_warnings < PROXYCFG_MAX_WARNINGS)
        warn(c, xasprintf("%s: unknown key \"%s\" ignored", where, key));
    else
        c->n_unwarned++;
}

/* FNV-1a, with 0 kept for "empty". */
static uint64_t warned_hash(const char *s)
{
    uint64_t h = 14695981039346656037ULL;
    for (; *s != '\0'; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h != 0 ? h : 1;
}

const char *proxycfg_warn_once(struct proxycfg_warned *w, const char *msg)
{
    size_t mask = ARRAY_SIZE(w->slots) - 1;
    uint64_t h = warned_hash(msg);
    size_t i = (size_t)h & mask;
    /* The table is at most half full, so the probe ends at an empty slot. */
    while (w->slots[i] != 0) {
        if (w->slots[i] == h)
            return NULL;
        i = (i + 1) & mask;
    }
    if (w->n >= PROXYCFG_WARNED_MAX) {
        if (w->full_said)
            return NULL;
        w->full_said = 1;
        return "more distinct configuration warnings than are remembered; further ones are not "
               "logged";
    }
    w->slots[i] = h;
    w->n++;
    return msg;
}

/* Reads an integer key given as a JSON number or as a decimal string. */
static int kv_int(const struct dec_kv *kv, const struct key_def *def, long *out)
{
    if (kv->type != DEC_KV_NUMBER && kv->type != DEC_KV_STRING)
        return -EINVAL;
    return util_parse_int(kv->str, def->min, def->max, out);
}

/*
 * Applies the map <kv> to the settings of one scope. <port>, <ms_a>/<ms_b> are the
 * destinations by key name; returns 0 or ERR_BAD_CONFIG naming the key.
 */
static int apply_kvs(struct proxy_cfg *c, enum key_scope scope, const char *where,
                     const struct dec_kv *kv, size_t n, struct proxy_cfg *proxy,
                     struct upstream_cfg *up, char *err, size_t errlen)
{
    for (size_t i = 0; i < n; i++) {
        const struct key_def *def = find_key(scope, kv[i].key);
        long v = 0;
        if (def == NULL) {
            warn_unknown(c, where, kv[i].key);
            continue;
        }
        if (def->type == KEY_IGNORED)
            continue;
        if (def->type == KEY_STRING) {
            if (kv[i].type != DEC_KV_STRING)
                return fail(err, errlen, "%s: key \"%s\" must be a string", where, kv[i].key);
        } else if (def->type == KEY_BOOL) {
            if (kv[i].type == DEC_KV_BOOL)
                v = kv[i].boolean;
            else if (kv[i].type == DEC_KV_STRING && strcmp(kv[i].str, "true") == 0)
                v = 1;
            else if (kv[i].type != DEC_KV_STRING || strcmp(kv[i].str, "false") != 0)
                return fail(err, errlen, "%s: key \"%s\" must be true or false", where, kv[i].key);
        } else if (def->type == KEY_TLS_VERSION) {
            const char *t = kv[i].type == DEC_KV_STRING ? kv[i].str : "?";
            if (strcmp(t, "TLS_AUTO") == 0 || strcmp(t, "") == 0)
                v = 0;
            else if (strcmp(t, "TLSv1_2") == 0)
                v = 12;
            else if (strcmp(t, "TLSv1_3") == 0)
                v = 13;
            else
                return fail(err, errlen, "%s: key \"%s\" must be TLS_AUTO, TLSv1_2 or TLSv1_3",
                            where, kv[i].key);
        } else if (kv_int(&kv[i], def, &v) != 0) {
            char range[64];
            snprintf(range, sizeof(range), "an integer in [%ld, %ld]", def->min, def->max);
            snprintf(err, errlen, "%s: key \"%s\" must be %s", where, kv[i].key, range);
            return ERR_BAD_CONFIG;
        }
        if (scope == SCOPE_PROXY) {
            if (strcmp(def->name, "bind_address") == 0) {
                free(proxy->bind_address);
                proxy->bind_address = xstrdup(kv[i].str);
            } else if (strcmp(def->name, "bind_port") == 0) {
                proxy->bind_port = (int)v;
            } else if (strcmp(def->name, "local_service_address") == 0) {
                char host[256];
                int port;
                if (util_split_hostport(kv[i].str, host, sizeof(host), &port) != 0 || port == 0)
                    return fail(err, errlen, "%s: key \"%s\" must be host:port", where, kv[i].key);
                if (proxy->local_port == 0) {
                    free(proxy->local_address);
                    proxy->local_address = xstrdup(host);
                    proxy->local_port = port;
                }
            } else if (strcmp(def->name, "local_connect_timeout_ms") == 0) {
                proxy->local_connect_timeout_ms = (uint32_t)v;
            } else if (strcmp(def->name, "handshake_timeout_ms") == 0) {
                proxy->handshake_timeout_ms = (uint32_t)v;
            } else if (strcmp(def->name, "tls_min_version") == 0) {
                proxy->tls_min_version = (int)v;
            } else if (strcmp(def->name, "tls_max_version") == 0) {
                proxy->tls_max_version = (int)v;
            } else if (strcmp(def->name, "tls_cipher_suites") == 0) {
                free(proxy->tls_cipher_suites);
                proxy->tls_cipher_suites = kv[i].str[0] ? xstrdup(kv[i].str) : NULL;
            } else if (strcmp(def->name, "verify_trust_domain") == 0) {
                proxy->verify_trust_domain = (int)v;
            } else if (strcmp(def->name, "tls_resumption") == 0) {
                proxy->tls_resumption = (int)v;
            } else if (strcmp(def->name, "authorization") == 0) {
                if (strcmp(kv[i].str, "intentions") == 0)
                    proxy->authorize_with_agent = 0;
                else if (strcmp(kv[i].str, "authorize") == 0)
                    proxy->authorize_with_agent = 1;
                else
                    return fail(err, errlen, "%s: key \"%s\" must be intentions or authorize",
                                where, kv[i].key);
            } else if (strcmp(def->name, "authorize_cache_ms") == 0) {
                proxy->authorize_cache_ms = (uint32_t)v;
            } else if (strcmp(def->name, "authorize_timeout_ms") == 0) {
                proxy->authorize_timeout_ms = (uint32_t)v;
            } else if (strcmp(def->name, "max_inbound_connections") == 0) {
                proxy->limits.max_connections = (uint32_t)v;
            } else if (strcmp(def->name, "max_new_connections_per_second") == 0) {
                proxy->limits.new_per_second = (uint32_t)v;
            } else if (strcmp(def->name, "max_new_connections_burst") == 0) {
                proxy->limits.new_burst = (uint32_t)v;
            } else if (strcmp(def->name, "max_pending_handshakes") == 0) {
                proxy->limits.max_pending = (uint32_t)v;
            } else if (strcmp(def->name, "max_pending_handshakes_per_source") == 0) {
                proxy->limits.max_pending_per_source = (uint32_t)v;
            } else if (strcmp(def->name, "local_idle_timeout_ms") == 0) {
                proxy->idle_timeout_ms = (uint32_t)v;
            } else if (strcmp(def->name, "max_connection_lifetime_ms") == 0) {
                proxy->max_lifetime_ms = (uint32_t)v;
            } else if (strcmp(def->name, "reauthorize_interval_ms") == 0) {
                proxy->reauthorize_interval_ms = (uint32_t)v;
            }
        } else if (strcmp(def->name, "connect_timeout_ms") == 0) {
            up->connect_timeout_ms = (uint32_t)v;
            up->connect_timeout_set = 1;
        } else if (strcmp(def->name, "prepared_query_poll_interval_ms") == 0) {
            up->poll_interval_ms = (uint32_t)v;
        } else if (strcmp(def->name, "limits.max_connections") == 0) {
            up->limits.max_connections = (uint32_t)v;
        } else if (strcmp(def->name, "max_new_connections_per_second") == 0) {
            up->limits.new_per_second = (uint32_t)v;
        } else if (strcmp(def->name, "max_new_connections_burst") == 0) {
            up->limits.new_burst = (uint32_t)v;
        } else if (strcmp(def->name, "idle_timeout_ms") == 0) {
            up->idle_timeout_ms = (uint32_t)v;
        }
    }
    return 0;
}

static const char *or_default(const char *s, const char *def)
{
    return s != NULL && s[0] != '\0' ? s : def;
}

static int build_upstream(struct proxy_cfg *c, const struct dec_upstream *u,
                          struct upstream_cfg *out, char *err, size_t errlen)
{
    char where[320];
    snprintf(where, sizeof(where), "upstream \"%s\"", u->destination_name);
    if (u->destination_name[0] == '\0')
        return fail(err, errlen, "%s: DestinationName is empty%s", "upstream", "");
    const char *type = or_default(u->destination_type, "service");
    if (strcmp(type, "service") != 0 && strcmp(type, "prepared_query") != 0)
        return fail(err, errlen, "%s: unknown DestinationType \"%s\"", where, type);
    memset(out, 0, sizeof(*out));
    out->destination_type = xstrdup(type);
    out->destination_name = xstrdup(u->destination_name);
    out->ns = xstrdup(u->destination_namespace);
    out->partition = xstrdup(u->destination_partition);
    out->datacenter = xstrdup(u->datacenter);
    out->bind_address = xstrdup(or_default(u->local_bind_address, "127.0.0.1"));
    out->bind_port = u->local_bind_port;
    out->bind_socket_path = xstrdup(u->local_bind_socket_path);
    out->bind_socket_mode = -1;
    out->connect_timeout_ms = 5000;
    out->poll_interval_ms = 10000;
    out->key = xasprintf("%s:%s/%s/%s/%s", type, out->ns, out->partition, out->datacenter,
                         out->destination_name);
    if (u->local_bind_socket_mode[0] != '\0') {
        long mode;
        if (util_parse_int_base(u->local_bind_socket_mode, 8, 0, 0777, &mode) != 0)
            return fail(err, errlen, "%s: LocalBindSocketMode \"%s\" is not an octal mode", where,
                        u->local_bind_socket_mode);
        out->bind_socket_mode = (int)mode;
    }
    return apply_kvs(c, SCOPE_UPSTREAM, where, u->config, u->n_config, NULL, out, err, errlen);
}

static void upstream_dispose(struct upstream_cfg *u)
{
    free(u->key);
    free(u->destination_type);
    free(u->destination_name);
    free(u->ns);
    free(u->partition);
    free(u->datacenter);
    free(u->bind_address);
    free(u->bind_socket_path);
}

int proxycfg_build(const struct dec_service *svc, struct proxy_cfg *out, char *err, size_t errlen)
{
    int rc;
    memset(out, 0, sizeof(*out));
    if (strcmp(svc->kind, "connect-proxy") != 0) {
        rc = fail(err, errlen, "service \"%s\" has Kind \"%s\", not connect-proxy", svc->id,
                  svc->kind);
        goto out;
    }
    if (svc->destination_service_name[0] == '\0') {
        rc = fail(err, errlen, "service \"%s\": Proxy.DestinationServiceName is empty%s", svc->id,
                  "");
        goto out;
    }
    out->proxy_id = xstrdup(svc->id);
    out->service = xstrdup(svc->destination_service_name);
    out->service_id = xstrdup(svc->destination_service_id);
    out->datacenter = xstrdup(svc->datacenter);
    out->ns = xstrdup(svc->ns);
    out->partition = xstrdup(svc->partition);
    out->bind_address = xstrdup(or_default(svc->address, "0.0.0.0"));
    out->bind_port = svc->port;
    out->local_address = xstrdup(or_default(svc->local_service_address, "127.0.0.1"));
    out->local_port = svc->local_service_port;
    out->local_connect_timeout_ms = 1000;
    out->handshake_timeout_ms = 10000;
    out->verify_trust_domain = 1;
    out->tls_resumption = 1;
    out->authorize_cache_ms = 5000;
    out->authorize_timeout_ms = 5000;
    rc = apply_kvs(out, SCOPE_PROXY, "Proxy.Config", svc->config, svc->n_config, out, NULL, err,
                   errlen);
    if (rc != 0)
        goto out;
    if (out->tls_max_version != 0 && out->tls_max_version < out->tls_min_version) {
        rc =
            fail(err, errlen, "Proxy.Config: tls_max_version is below tls_min_version%s%s", "", "");
        goto out;
    }
    out->local_socket_path = xstrdup(out->local_port == 0 ? svc->local_service_socket_path : "");
    out->bind_socket_path = xstrdup(out->bind_port == 0 ? svc->socket_path : "");
    if (out->bind_socket_path[0] != '\0' &&
        strcmp(out->bind_socket_path, out->local_socket_path) == 0) {
        rc = fail(err, errlen, "SocketPath %s is also Proxy.LocalServiceSocketPath%s",
                  out->bind_socket_path, "");
        goto out;
    }
    if ((out->bind_port != 0 || out->bind_socket_path[0] != '\0') && out->local_port == 0 &&
        out->local_socket_path[0] == '\0') {
        rc = fail(err, errlen, "service \"%s\": Proxy.LocalServicePort is not set%s", svc->id, "");
        goto out;
    }
    out->upstreams = xcalloc(svc->n_upstreams, sizeof(*out->upstreams));
    for (size_t i = 0; i < svc->n_upstreams; i++) {
        const struct dec_upstream *u = &svc->upstreams[i];
        if (u->local_bind_port == 0 && u->local_bind_socket_path[0] == '\0') {
            rc = fail(err, errlen,
                      "upstream \"%s\": neither LocalBindPort nor "
                      "LocalBindSocketPath is set%s",
                      u->destination_name, "");
            goto out;
        }
        struct upstream_cfg *nu = &out->upstreams[out->n_upstreams];
        rc = build_upstream(out, u, nu, err, errlen);
        if (nu->key == NULL) /* failed before anything was allocated */
            goto out;
        out->n_upstreams++;
        if (rc != 0)
            goto out;
        /* Opening a unix listener replaces a stale socket file: two of ours must not meet. */
        if (nu->bind_socket_path[0] != '\0' &&
            (strcmp(nu->bind_socket_path, out->bind_socket_path) == 0 ||
             strcmp(nu->bind_socket_path, out->local_socket_path) == 0)) {
            snprintf(err, errlen, "upstream \"%s\" binds %s, the proxy's own socket",
                     nu->destination_name, nu->bind_socket_path);
            rc = ERR_BAD_CONFIG;
            goto out;
        }
        for (size_t j = 0; j + 1 < out->n_upstreams; j++) {
            const struct upstream_cfg *o = &out->upstreams[j];
            if (nu->bind_socket_path[0] != '\0' &&
                strcmp(o->bind_socket_path, nu->bind_socket_path) == 0) {
                snprintf(err, errlen, "upstreams \"%s\" and \"%s\" both bind %s",
                         o->destination_name, nu->destination_name, nu->bind_socket_path);
                rc = ERR_BAD_CONFIG;
                goto out;
            }
            if (nu->bind_socket_path[0] == '\0' && o->bind_socket_path[0] == '\0' &&
                o->bind_port == nu->bind_port && strcmp(o->bind_address, nu->bind_address) == 0) {
                snprintf(err, errlen, "upstreams \"%s\" and \"%s\" both bind %s:%d",
                         o->destination_name, nu->destination_name, nu->bind_address,
                         nu->bind_port);
                rc = ERR_BAD_CONFIG;
                goto out;
            }
            if (strcmp(o->key, nu->key) == 0) {
                rc = fail(err, errlen, "upstream \"%s\" is listed twice%s", nu->destination_name,
                          "");
                goto out;
            }
        }
    }
out:
    if (rc == 0 && out->n_unwarned > 0)
        warn(out, xasprintf("%zu more unknown keys ignored (only the first %d are named)",
                            out->n_unwarned, PROXYCFG_MAX_WARNINGS));
    if (rc != 0)
        proxycfg_dispose(out);
    return rc;
}

/* Parses one -upstream value into <u> (strings pointing into <buf>, which it edits). */
static int parse_upstream_flag(char *buf, struct dec_upstream *u, char *err, size_t errlen)
{
    char *colon = strrchr(buf, ':');
    long port;
    if (colon == NULL || util_parse_int(colon + 1, 1, 65535, &port) != 0)
        return fail(err, errlen, "flag -upstream \"%s\": expected name[.type]:[addr:]port%s", buf,
                    "");
    *colon = '\0';
    u->local_bind_port = (int)port;
    char *addr = strchr(buf, ':');
    if (addr != NULL) {
        *addr++ = '\0';
        u->local_bind_address = addr;
    }
    char *dot = strrchr(buf, '.');
    if (dot != NULL && strcmp(dot + 1, "query") == 0) {
        *dot = '\0';
        u->destination_type = "prepared_query";
    } else if (dot != NULL && strcmp(dot + 1, "service") == 0) {
        *dot = '\0';
    }
    u->destination_name = buf;
    if (buf[0] == '\0' || (addr != NULL && addr[0] == '\0'))
        return fail(err, errlen, "flag -upstream: empty name or address in \"%s\"%s", buf, "");
    return 0;
}

int proxycfg_from_flags(const struct proxycfg_flags *f, struct proxy_cfg *out, char *err,
                        size_t errlen)
{
    /* A registration as the agent would return it, so one code path applies every default and
     * check. Every string member must be non-NULL; "" means absent. */
    static char empty[] = "";
    struct dec_service svc = {0};
    char host[256], local_host[256];
    int port = 0, local_port = 0, rc = 0;
    size_t n = f->n_upstreams;
    struct dec_upstream *ups = xcalloc(n, sizeof(*ups));
    char **bufs = xcalloc(n, sizeof(*bufs));
    memset(out, 0, sizeof(*out));

    if (f->listen != NULL &&
        (util_split_hostport(f->listen, host, sizeof(host), &port) != 0 || port == 0)) {
        rc = fail(err, errlen, "flag -listen \"%s\": expected host:port%s", f->listen, "");
        goto out;
    }
    if (f->service_addr != NULL &&
        (util_split_hostport(f->service_addr, local_host, sizeof(local_host), &local_port) != 0 ||
         local_port == 0)) {
        rc = fail(err, errlen, "flag -service-addr \"%s\": expected host:port%s", f->service_addr,
                  "");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        struct dec_upstream *u = &ups[i];
        u->destination_type = u->destination_name = u->destination_namespace = empty;
        u->destination_partition = u->destination_peer = u->datacenter = empty;
        u->local_bind_address = u->local_bind_socket_path = u->local_bind_socket_mode = empty;
        bufs[i] = xstrdup(f->upstreams[i]);
        if ((rc = parse_upstream_flag(bufs[i], u, err, errlen)) != 0)
            goto out;
    }
    svc.kind = (char *)"connect-proxy";
    svc.id = (char *)f->proxy_id;
    svc.service = empty;
    svc.address = f->listen != NULL ? host : empty;
    svc.port = port;
    svc.socket_path = svc.datacenter = svc.ns = svc.partition = svc.content_hash = empty;
    svc.destination_service_name = (char *)f->service;
    svc.destination_service_id = empty;
    svc.local_service_address = f->service_addr != NULL ? local_host : empty;
    svc.local_service_port = local_port;
    svc.local_service_socket_path = svc.mode = empty;
    svc.upstreams = ups;
    svc.n_upstreams = n;
    rc = proxycfg_build(&svc, out, err, errlen);
out:
    for (size_t i = 0; i < n; i++)
        free(bufs[i]);
    free(bufs);
    free(ups);
    return rc;
}

void proxycfg_dispose(struct proxy_cfg *c)
{
    free(c->proxy_id);
    free(c->service);
    free(c->service_id);
    free(c->datacenter);
    free(c->ns);
    free(c->partition);
    free(c->bind_address);
    free(c->bind_socket_path);
    free(c->local_address);
    free(c->local_socket_path);
    free(c->tls_cipher_suites);
    for (size_t i = 0; i < c->n_upstreams; i++)
        upstream_dispose(&c->upstreams[i]);
    free(c->upstreams);
    for (size_t i = 0; i < c->n_warnings; i++)
        free(c->warnings[i]);
    free(c->warnings);
    memset(c, 0, sizeof(*c));
}

static char *dup_or_null(const char *s)
{
    return s != NULL ? xstrdup(s) : NULL;
}

void proxycfg_copy(struct proxy_cfg *dst, const struct proxy_cfg *src)
{
    *dst = *src;
    dst->proxy_id = dup_or_null(src->proxy_id);
    dst->service = dup_or_null(src->service);
    dst->service_id = dup_or_null(src->service_id);
    dst->datacenter = dup_or_null(src->datacenter);
    dst->ns = dup_or_null(src->ns);
    dst->partition = dup_or_null(src->partition);
    dst->bind_address = dup_or_null(src->bind_address);
    dst->bind_socket_path = dup_or_null(src->bind_socket_path);
    dst->local_address = dup_or_null(src->local_address);
    dst->local_socket_path = dup_or_null(src->local_socket_path);
    dst->tls_cipher_suites = dup_or_null(src->tls_cipher_suites);
    dst->upstreams = xcalloc(src->n_upstreams, sizeof(*dst->upstreams));
    for (size_t i = 0; i < src->n_upstreams; i++) {
        const struct upstream_cfg *s = &src->upstreams[i];
        struct upstream_cfg *d = &dst->upstreams[i];
        *d = *s;
        d->key = xstrdup(s->key);
        d->destination_type = xstrdup(s->destination_type);
        d->destination_name = xstrdup(s->destination_name);
        d->ns = xstrdup(s->ns);
        d->partition = xstrdup(s->partition);
        d->datacenter = xstrdup(s->datacenter);
        d->bind_address = xstrdup(s->bind_address);
        d->bind_socket_path = xstrdup(s->bind_socket_path);
    }
    /* Warnings are for the control thread's logs only. */
    dst->warnings = NULL;
    dst->n_warnings = 0;
    dst->n_unwarned = 0;
}

static const char *const scope_names[] = {"", "Proxy.Config", "Upstreams[].Config"};
static const char *const type_names[] = {"",        "string",      "port",  "milliseconds",
                                         "boolean", "TLS version", "count", "accepted"};

void proxycfg_write_man(FILE *f)
{
    for (size_t i = 0; i < ARRAY_SIZE(keys); i++) {
        fprintf(f, ".TP\n.B ");
        util_fput_troff(f, keys[i].name);
        fprintf(f, "\n(%s, %s; default: ", scope_names[keys[i].scope], type_names[keys[i].type]);
        util_fput_troff(f, keys[i].def);
        fprintf(f, ")\n");
        util_fput_troff(f, keys[i].doc);
        fputc('\n', f);
    }
}

void proxycfg_write_doc(FILE *f)
{
    fprintf(f, "| key | where | type | default | meaning |\n|---|---|---|---|---|\n");
    for (size_t i = 0; i < ARRAY_SIZE(keys); i++)
        fprintf(f, "| `%s` | %s | %s | %s | %s |\n", keys[i].name, scope_names[keys[i].scope],
                type_names[keys[i].type], keys[i].def, keys[i].doc);
}
