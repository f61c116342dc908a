/*
 * proxycfg: registration -> typed settings.
 *
 * Every key connectd understands is a row of one table below: its scope (the proxy's Config
 * or an upstream's Config), type, where its value goes (an offset and a typed setter), its
 * default, bounds and meaning. Parsing, validation, the defaults, the unknown-key warnings and
 * doc/config.md all read the same rows, so they cannot drift apart.
 * Key names follow what Consul documents for its built-in proxy and for Envoy.
 */
#include "proxycfg.h"
#include "util.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

enum key_scope {
    SCOPE_PROXY = 1,
    SCOPE_UPSTREAM,
};

/* How a value is read (and the type column of the docs). */
enum key_type {
    KEY_STRING = 1,
    KEY_PORT,
    KEY_MS,
    KEY_BOOL,
    KEY_TLS_VERSION, /* "TLS_AUTO", "TLSv1_2" or "TLSv1_3", as Consul's mesh TLS settings */
    KEY_COUNT,
    KEY_IGNORED,  /* known, accepted, no effect here (e.g. set by central config for Envoy) */
    KEY_DURATION, /* a Go duration ("10s", "1m30s") or integer nanoseconds, as Consul decodes */
};

/* One accepted name of an enumerated key and the value it stands for. */
struct key_name {
    const char *name;
    long value;
};

struct key_def;

/*
 * Stores the value of a key into its field, at <def>->off in <base> (a struct proxy_cfg or a
 * struct upstream_cfg, by scope). <kv> is the configured value, already checked against the
 * key's type and read into <v> (numbers, booleans, names); NULL when the table's default is
 * being applied, with <v> = <def>->def. Returns 0 or ERR_BAD_CONFIG with <err> naming the key.
 */
typedef int key_setter(const struct key_def *def, void *base, const struct dec_kv *kv, long v,
                       const char *where, char *err, size_t errlen);

/*
 * A key, after nginx's ngx_command_t: where it is valid, how its value is read, where it goes
 * (offset and setter), its default and its documentation. The default is typed: <def> is
 * stored by the setter before the registration's keys are applied and is written in the docs
 * (a number, true/false, or the name that stands for it) followed by <def_note>. A key whose
 * default is not a constant (taken from the registration, or worked out later) has
 * <def_text> instead: the docs say that, and the table stores nothing.
 */
struct key_def {
    const char *name;
    enum key_scope scope;
    enum key_type type;
    key_setter *set; /* NULL: accepted and ignored */
    size_t off;      /* of the field in struct proxy_cfg / struct upstream_cfg */
    long def;
    const char *def_note;         /* after the default in the docs, e.g. "(off)"; or NULL */
    const char *def_text;         /* the whole default in the docs when it is not a constant */
    long min, max;                /* integer keys */
    const struct key_name *names; /* enumerated keys: the accepted names, NULL-terminated */
    const char *doc;
};

static int fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return ERR_BAD_CONFIG;
}

static void *field(const struct key_def *def, void *base)
{
    return (char *)base + def->off;
}

static int set_int(const struct key_def *def, void *base, const struct dec_kv *kv, long v,
                   const char *where, char *err, size_t errlen)
{
    (void)kv, (void)where, (void)err, (void)errlen;
    *(int *)field(def, base) = (int)v;
    return 0;
}

static int set_u32(const struct key_def *def, void *base, const struct dec_kv *kv, long v,
                   const char *where, char *err, size_t errlen)
{
    (void)kv, (void)where, (void)err, (void)errlen;
    *(uint32_t *)field(def, base) = (uint32_t)v;
    return 0;
}

static int set_string(const struct key_def *def, void *base, const struct dec_kv *kv, long v,
                      const char *where, char *err, size_t errlen)
{
    (void)v, (void)where, (void)err, (void)errlen;
    char **f = field(def, base);
    free(*f);
    *f = xstrdup(kv->str);
    return 0;
}

/* A string where "" means "not set" (NULL). */
static int set_string_or_null(const struct key_def *def, void *base, const struct dec_kv *kv,
                              long v, const char *where, char *err, size_t errlen)
{
    (void)v, (void)where, (void)err, (void)errlen;
    char **f = field(def, base);
    free(*f);
    *f = kv->str[0] != '\0' ? xstrdup(kv->str) : NULL;
    return 0;
}

/* local_service_address: host:port, used only when the registration names no local port. */
static int set_local_service_address(const struct key_def *def, void *base, const struct dec_kv *kv,
                                     long v, const char *where, char *err, size_t errlen)
{
    (void)def, (void)v;
    struct proxy_cfg *proxy = base;
    char host[256];
    int port;
    if (util_split_hostport(kv->str, host, sizeof(host), &port) != 0 || port == 0)
        return fail(err, errlen, "%s: key \"%s\" must be host:port", where, kv->key);
    if (proxy->local_port == 0) {
        free(proxy->local_address);
        proxy->local_address = xstrdup(host);
        proxy->local_port = port;
    }
    return 0;
}

/* An upstream's protocol: "" is "not set" (the discovery chain's protocol decides). */
static int set_upstream_protocol(const struct key_def *def, void *base, const struct dec_kv *kv,
                                 long v, const char *where, char *err, size_t errlen)
{
    struct upstream_cfg *up = base;
    up->protocol_set = kv != NULL && kv->str[0] != '\0';
    return set_int(def, base, kv, v, where, err, errlen);
}

/* An upstream's connect_timeout_ms, which when given also overrides the chain's timeout. */
static int set_connect_timeout(const struct key_def *def, void *base, const struct dec_kv *kv,
                               long v, const char *where, char *err, size_t errlen)
{
    struct upstream_cfg *up = base;
    if (kv != NULL)
        up->connect_timeout_set = 1;
    return set_u32(def, base, kv, v, where, err, errlen);
}

static const struct key_name tls_versions[] = {
    {"TLS_AUTO", 0}, {"TLSv1_2", 12}, {"TLSv1_3", 13}, {"", 0} /* as TLS_AUTO */, {NULL, 0}};
static const struct key_name protocols[] = {{"tcp", PROTO_TCP},           {"http", PROTO_HTTP},
                                            {"http2", PROTO_HTTP2},       {"grpc", PROTO_GRPC},
                                            {"", PROTO_TCP} /* as tcp */, {NULL, 0}};
static const struct key_name authorization_modes[] = {
    {"intentions", 0}, {"authorize", 1}, {NULL, 0}};

#define PROXY(member)    offsetof(struct proxy_cfg, member)
#define UPSTREAM(member) offsetof(struct upstream_cfg, member)

static const struct key_def keys[] = {
    {.name = "bind_address",
     .scope = SCOPE_PROXY,
     .type = KEY_STRING,
     .set = set_string,
     .off = PROXY(bind_address),
     .def_text = "registration Address, else 0.0.0.0",
     .doc = "Address of the public (inbound mTLS) listener."},
    {.name = "bind_port",
     .scope = SCOPE_PROXY,
     .type = KEY_PORT,
     .set = set_int,
     .off = PROXY(bind_port),
     .def_text = "registration Port",
     .max = 65535,
     .doc = "Port of the public listener; 0 disables it."},
    {.name = "local_service_address",
     .scope = SCOPE_PROXY,
     .type = KEY_STRING,
     .set = set_local_service_address,
     .def_text = "Proxy.LocalServiceAddress:LocalServicePort",
     .doc = "host:port of the local application, when the registration does not name it."},
    {.name = "local_connect_timeout_ms",
     .scope = SCOPE_PROXY,
     .type = KEY_MS,
     .set = set_u32,
     .off = PROXY(local_connect_timeout_ms),
     .def = 1000,
     .min = 1,
     .max = 600000,
     .doc = "Timeout for connecting to the local application."},
    {.name = "handshake_timeout_ms",
     .scope = SCOPE_PROXY,
     .type = KEY_MS,
     .set = set_u32,
     .off = PROXY(handshake_timeout_ms),
     .def = 10000,
     .min = 1,
     .max = 600000,
     .doc = "Timeout for a TLS handshake, inbound and outbound."},
    {.name = "tls_min_version",
     .scope = SCOPE_PROXY,
     .type = KEY_TLS_VERSION,
     .set = set_int,
     .off = PROXY(tls_min_version),
     .def = 0,
     .def_note = "(TLSv1_2)",
     .names = tls_versions,
     .doc = "Lowest TLS version of mesh connections, in and out: TLS_AUTO, TLSv1_2 or TLSv1_3 "
            "(TLSv1_0 and TLSv1_1 are refused)."},
    {.name = "tls_max_version",
     .scope = SCOPE_PROXY,
     .type = KEY_TLS_VERSION,
     .set = set_int,
     .off = PROXY(tls_max_version),
     .def = 0,
     .def_note = "(none)",
     .names = tls_versions,
     .doc = "Highest TLS version of mesh connections: TLS_AUTO, TLSv1_2 or TLSv1_3."},
    {.name = "tls_cipher_suites",
     .scope = SCOPE_PROXY,
     .type = KEY_STRING,
     .set = set_string_or_null,
     .off = PROXY(tls_cipher_suites),
     .def_text = "ECDHE with AES-GCM or ChaCha20",
     .doc = "Comma-separated TLS 1.2 cipher suites by IANA name, e.g. "
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 (TLS 1.3 suites are not configurable, as "
            "in Consul)."},
    {.name = "verify_trust_domain",
     .scope = SCOPE_PROXY,
     .type = KEY_BOOL,
     .set = set_int,
     .off = PROXY(verify_trust_domain),
     .def = 1,
     .doc = "Require peers' SPIFFE IDs to be of the roots' trust domain; false accepts any "
            "trust domain whose certificate chains to a trusted root (CA migrations, providers "
            "without one)."},
    {.name = "tls_resumption",
     .scope = SCOPE_PROXY,
     .type = KEY_BOOL,
     .set = set_int,
     .off = PROXY(tls_resumption),
     .def = 1,
     .doc = "Outbound: offer the session an earlier connection to the same endpoint received "
            "(TLS session resumption, cheaper than a full mutual handshake; the peer's identity "
            "is still checked). false runs a full handshake every time. Inbound resumption is "
            "always on."},
    {.name = "authorization",
     .scope = SCOPE_PROXY,
     .type = KEY_STRING,
     .set = set_int,
     .off = PROXY(authorize_with_agent),
     .def = 0,
     .names = authorization_modes,
     .doc = "How inbound callers are authorized: intentions (the intention table the proxy "
            "watches) or authorize (POST /v1/agent/connect/authorize per new connection, from "
            "the control thread; the connection waits in AUTHORIZE)."},
    {.name = "authorize_cache_ms",
     .scope = SCOPE_PROXY,
     .type = KEY_MS,
     .set = set_u32,
     .off = PROXY(authorize_cache_ms),
     .def = 5000,
     .min = 0,
     .max = 600000,
     .doc = "authorize mode: how long an answer is reused for the same caller; 0 keeps none "
            "(connections that arrive while a question about their caller is out share its "
            "answer). Cleared when the intentions change; an answer that disagrees with the "
            "intentions seen here (one of the two views is stale) is not kept."},
    {.name = "authorize_timeout_ms",
     .scope = SCOPE_PROXY,
     .type = KEY_MS,
     .set = set_u32,
     .off = PROXY(authorize_timeout_ms),
     .def = 5000,
     .min = 1,
     .max = 600000,
     .doc = "authorize mode: how long a connection waits for the agent's answer before it is "
            "closed."},
    {.name = "protocol",
     .scope = SCOPE_PROXY,
     .type = KEY_STRING,
     .set = set_int,
     .off = PROXY(protocol),
     .def = PROTO_TCP,
     .names = protocols,
     .doc = "Service protocol (the agent merges service-defaults and proxy-defaults into it): "
            "tcp relays bytes and authorizes each connection; http, http2 and grpc parse every "
            "inbound request (HTTP/1.1 or HTTP/2 over the mesh's mTLS, by ALPN or the first "
            "bytes) and authorize each request, answering 403 on a deny (gRPC: grpc-status 7); "
            "the application is spoken to in HTTP/1.1 (http) or h2c (http2, grpc). A change "
            "applies to new connections."},
    {.name = "max_request_headers_kb",
     .scope = SCOPE_PROXY,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = PROXY(max_request_headers_kb),
     .def = 60,
     .min = 1,
     .max = 8192,
     .doc = "protocol http: the largest request head in KiB (Envoy's key); a bigger one, or one "
            "with more than 100 fields, is answered 431 and the connection closed."},
    {.name = "request_headers_timeout_ms",
     .scope = SCOPE_PROXY,
     .type = KEY_MS,
     .set = set_u32,
     .off = PROXY(request_headers_timeout_ms),
     .def = 10000,
     .min = 1,
     .max = 600000,
     .doc = "protocol http: how long a request head may take from its first byte (Envoy's "
            "request_headers_timeout); past it the connection is answered 408 and closed."},
    {.name = "local_request_timeout_ms",
     .scope = SCOPE_PROXY,
     .type = KEY_MS,
     .set = set_u32,
     .off = PROXY(local_request_timeout_ms),
     .def = 15000,
     .def_note = "(0 = off)",
     .min = 0,
     .max = 86400000,
     .doc = "protocol http: how long the local application may take to answer a request, from "
            "the end of the request to the end of the response (Consul's key); 504 when no "
            "response head came in time."},
    {.name = "max_inbound_connections",
     .scope = SCOPE_PROXY,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = PROXY(limits.max_connections),
     .def = 0,
     .def_note = "(no limit)",
     .max = 10000000,
     .doc = "Most concurrent inbound connections over all workers; more are closed at once "
            "after accept and counted."},
    {.name = "max_new_connections_per_second",
     .scope = SCOPE_PROXY,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = PROXY(limits.new_per_second),
     .def = 0,
     .def_note = "(no limit)",
     .max = 1000000,
     .doc = "New inbound connections accepted per second (token bucket over all workers); more "
            "are closed at once after accept and counted."},
    {.name = "max_new_connections_burst",
     .scope = SCOPE_PROXY,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = PROXY(limits.new_burst),
     .def_text = "max_new_connections_per_second",
     .max = 1000000,
     .doc = "Size of the inbound token bucket: how many new connections may arrive at once."},
    {.name = "max_pending_handshakes",
     .scope = SCOPE_PROXY,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = PROXY(limits.max_pending),
     .def_text = "half of the open-files limit left after the descriptor reserve",
     .max = 10000000,
     .doc = "Most concurrent inbound connections still in the TLS handshake, over all workers; "
            "newer ones are closed at once after accept and counted. 0 = the default, sized "
            "from the open-files limit (which connectd raises to its hard limit at start; the "
            "reserve is max(32, limit/8) descriptors kept for outbound dials, "
            "local-application connections and the agent, and inbound accepts that would eat "
            "into it are refused too)."},
    {.name = "max_pending_handshakes_per_source",
     .scope = SCOPE_PROXY,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = PROXY(limits.max_pending_per_source),
     .def_text = "max_pending_handshakes / 16, at least 8",
     .max = 10000000,
     .doc = "Most concurrent inbound connections in the TLS handshake from one source address; "
            "newer ones are closed at once after accept and counted. 0 = the default."},
    {.name = "local_idle_timeout_ms",
     .scope = SCOPE_PROXY,
     .type = KEY_MS,
     .set = set_u32,
     .off = PROXY(idle_timeout_ms),
     .def = 0,
     .def_note = "(off)",
     .max = 86400000,
     .doc = "Closes an inbound connection after this long without a byte in either "
            "direction. Over HTTP/2 it applies to each stream (a stalled one is answered 504, "
            "or reset, while the others go on) and to the connection while it has none."},
    {.name = "max_connection_lifetime_ms",
     .scope = SCOPE_PROXY,
     .type = KEY_MS,
     .set = set_u32,
     .off = PROXY(max_lifetime_ms),
     .def = 0,
     .def_note = "(off)",
     .max = 604800000,
     .doc = "Closes any connection, inbound or outbound, this long after it was accepted."},
    {.name = "reauthorize_interval_ms",
     .scope = SCOPE_PROXY,
     .type = KEY_MS,
     .set = set_u32,
     .off = PROXY(reauthorize_interval_ms),
     .def = 0,
     .def_note = "(off)",
     .max = 86400000,
     .doc = "Re-evaluates every authorized inbound connection against the current intentions "
            "this often (they are always re-evaluated when the intentions change); in "
            "authorize mode the agent is asked again."},
    {.name = "connect_timeout_ms",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_MS,
     .set = set_connect_timeout,
     .off = UPSTREAM(connect_timeout_ms),
     .def = 5000,
     .min = 1,
     .max = 600000,
     .doc = "Timeout for connecting to one upstream endpoint (TCP connect). Sent to the "
            "discovery chain as OverrideConnectTimeout, as Envoy does, so it overrides a "
            "service-resolver's ConnectTimeout; when absent the resolver's applies (Consul's "
            "default is 5000)."},
    {.name = "retry_buffer_bytes",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = UPSTREAM(retry_buffer_bytes),
     .def = 65536,
     .max = 16777216,
     .doc = "http upstreams: the most bytes of a request (head and body) held while it may "
            "be retried (a route's NumRetries / RetryOn, or the keep-alive race); a longer "
            "request is sent once, as Envoy's per_request_buffer_limit_bytes."},
    {.name = "prepared_query_poll_interval_ms",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_MS,
     .set = set_u32,
     .off = UPSTREAM(poll_interval_ms),
     .def = 10000,
     .min = 100,
     .max = 3600000,
     .doc = "Prepared-query upstreams: how often the query is executed (queries cannot "
            "block)."},
    {.name = "protocol",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_STRING,
     .set = set_upstream_protocol,
     .off = UPSTREAM(protocol),
     .def_text = "the discovery chain's Protocol",
     .names = protocols,
     .doc = "Upstream protocol; when set the discovery chain is compiled for it "
            "(OverrideProtocol), else the chain's own Protocol (service-defaults) decides. "
            "http parses every request from the application and forwards it to the upstream "
            "over mTLS with ALPN http/1.1, keeping both connections alive; tcp, http2 and grpc "
            "are relayed at L4. A change applies to new connections."},
    {.name = "limits.max_connections",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = UPSTREAM(limits.max_connections),
     .def = 0,
     .def_note = "(no limit)",
     .max = 10000000,
     .doc = "Most concurrent connections to this upstream over all workers (Consul's "
            "`limits { max_connections }`); more are closed at once after accept and counted. "
            "With protocol http, http2 or grpc it also bounds the connections opened to the "
            "upstream's endpoints (Envoy's circuit breaker max_connections; pooled idle ones "
            "count): a request that needs one more is answered 503 at once (upstream_overflow)."},
    {.name = "limits.max_pending_requests",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = UPSTREAM(max_pending_requests),
     .def = 0,
     .def_note = "(no limit)",
     .max = 10000000,
     .doc = "protocol http, http2, grpc: most requests to this upstream waiting for a "
            "connection (a dial, or an HTTP/2 stream's connection) at once over all workers "
            "(Envoy's circuit breaker max_pending_requests); more are answered 503 at once, "
            "never queued, with result upstream_overflow, and counted."},
    {.name = "limits.max_concurrent_requests",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = UPSTREAM(max_concurrent_requests),
     .def = 0,
     .def_note = "(no limit)",
     .max = 10000000,
     .doc = "protocol http, http2, grpc: most requests in flight to this upstream at once "
            "over all workers, from the request head to the end of its answer (Envoy's "
            "max_requests); more are answered 503 at once with result upstream_overflow, and "
            "counted."},
    {.name = "passive_health_check.interval",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_DURATION,
     .set = set_u32,
     .off = UPSTREAM(passive.interval_ms),
     .def = 0,
     .def_note = "(10s)",
     .max = 86400000,
     .doc = "Outlier detection (protocol http, http2, grpc): the period of Envoy's ejection "
            "sweep; an ejected endpoint comes back at the first sweep past its ejection time, "
            "and its ejection multiplier drops by one per sweep it stays in service."},
    {.name = "passive_health_check.max_failures",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = UPSTREAM(passive.max_failures),
     .def = 0,
     .def_note = "(5)",
     .max = 1000000,
     .doc = "Consecutive 5xx answers (a failed connection counts as one) that eject an "
            "endpoint (Envoy's consecutive_5xx); any other answer starts the count again."},
    {.name = "passive_health_check.enforcing_consecutive_5xx",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = UPSTREAM(passive.enforcing_pct),
     .def = OUTLIER_ENFORCING_PERCENT,
     .max = 100,
     .doc = "The chance, in percent, that an endpoint reaching max_failures is really ejected; "
            "0 never ejects."},
    {.name = "passive_health_check.max_ejection_percent",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = UPSTREAM(passive.max_ejection_pct),
     .def = OUTLIER_MAX_EJECTION_PCT,
     .max = 100,
     .doc = "At most this share of a target's endpoints is ejected at once: an endpoint is "
            "ejected only while fewer than this percent are, so one always may be (as Consul "
            "documents), and 0 ejects none. When every endpoint of a target is ejected the "
            "dial uses them anyway (Envoy's panic routing)."},
    {.name = "passive_health_check.base_ejection_time",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_DURATION,
     .set = set_u32,
     .off = UPSTREAM(passive.base_ejection_ms),
     .def = 0,
     .def_note = "(30s)",
     .max = 86400000,
     .doc = "An ejected endpoint stays out this long times the number of times it was ejected "
            "in a row (at most 300 s, or this time when longer), rounded up to the interval."},
    {.name = "max_new_connections_per_second",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = UPSTREAM(limits.new_per_second),
     .def = 0,
     .def_note = "(no limit)",
     .max = 1000000,
     .doc = "New connections accepted per second on this upstream's listener (token bucket "
            "over all workers); more are closed at once after accept and counted."},
    {.name = "max_new_connections_burst",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_COUNT,
     .set = set_u32,
     .off = UPSTREAM(limits.new_burst),
     .def_text = "max_new_connections_per_second",
     .max = 1000000,
     .doc = "Size of this upstream's token bucket: how many new connections may arrive at "
            "once."},
    {.name = "idle_timeout_ms",
     .scope = SCOPE_UPSTREAM,
     .type = KEY_MS,
     .set = set_u32,
     .off = UPSTREAM(idle_timeout_ms),
     .def = 0,
     .def_note = "(off)",
     .max = 86400000,
     .doc = "Closes a connection to this upstream after this long without a byte in either "
            "direction. Over HTTP/2 it applies to each stream (a stalled one is answered 504, "
            "or reset, while the others go on) and to the connection while it has none."},
};

static const struct key_def *find_key(enum key_scope scope, const char *name)
{
    for (size_t i = 0; i < ARRAY_SIZE(keys); i++)
        if (keys[i].scope == scope && strcmp(keys[i].name, name) == 0)
            return &keys[i];
    return NULL;
}

/* Stores the table's default of every key of <scope> that has a constant one into <base>. */
static void apply_defaults(enum key_scope scope, void *base)
{
    for (size_t i = 0; i < ARRAY_SIZE(keys); i++) {
        const struct key_def *d = &keys[i];
        if (d->scope == scope && d->set != NULL && d->def_text == NULL)
            (void)d->set(d, base, NULL, d->def, "", NULL, 0);
    }
}

/* The name that stands for <v> in <names> (the first, so TLS_AUTO rather than ""). */
static const char *name_of(const struct key_name *names, long v)
{
    for (; names->name != NULL; names++)
        if (names->value == v)
            return names->name;
    return "?";
}

/* The default as the docs write it. */
static const char *default_text(const struct key_def *d, char *buf, size_t len)
{
    if (d->def_text != NULL)
        return d->def_text;
    const char *note = d->def_note != NULL ? d->def_note : "", *sep = note[0] ? " " : "";
    if (d->names != NULL)
        snprintf(buf, len, "%s%s%s", name_of(d->names, d->def), sep, note);
    else if (d->type == KEY_BOOL)
        snprintf(buf, len, "%s%s%s", d->def ? "true" : "false", sep, note);
    else
        snprintf(buf, len, "%ld%s%s", d->def, sep, note);
    return buf;
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

int proxycfg_protocol_from_name(const char *name)
{
    for (const struct key_name *k = protocols; k->name != NULL; k++)
        if (strcmp(k->name, name) == 0)
            return (int)k->value;
    return -EINVAL;
}

const char *proxycfg_protocol_name(int protocol)
{
    const char *n = name_of(protocols, protocol);
    return strcmp(n, "?") == 0 ? "tcp" : n;
}

const char *proxycfg_warn_once(struct proxycfg_warned *w, const char *msg)
{
    size_t mask = ARRAY_SIZE(w->slots) - 1;
    uint64_t h = util_hash_str(msg);
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
 * Reads a duration key into milliseconds (rounded up): a Go duration string, or a number of
 * nanoseconds (a time.Duration as JSON), as Consul's mapstructure hook decodes its
 * passive_health_check.
 */
static int kv_duration(const struct dec_kv *kv, const struct key_def *def, long *out)
{
    uint64_t ms = 0;
    if (kv->type == DEC_KV_STRING) {
        if (decode_duration_ms(kv->str, &ms) != 0)
            return -EINVAL;
    } else if (kv->type == DEC_KV_NUMBER) {
        long ns;
        if (util_parse_int(kv->str, 0, LONG_MAX, &ns) != 0)
            return -EINVAL;
        ms = ((uint64_t)ns + 999999u) / 1000000u;
    } else {
        return -EINVAL;
    }
    if (ms < (uint64_t)def->min || ms > (uint64_t)def->max)
        return -ERANGE;
    *out = (long)ms;
    return 0;
}

/* "must be A, B or C" for an enumerated key (the "" alias is not named). */
static int fail_names(const struct key_def *def, const char *where, const char *key, char *err,
                      size_t errlen)
{
    char list[200] = "";
    size_t n = 0, len = 0;
    for (const struct key_name *k = def->names; k->name != NULL; k++)
        n += k->name[0] != '\0';
    for (const struct key_name *k = def->names; k->name != NULL; k++) {
        if (k->name[0] == '\0' || len >= sizeof(list))
            continue;
        n--;
        len += (size_t)snprintf(list + len, sizeof(list) - len, "%s%s", k->name,
                                n > 1    ? ", "
                                : n == 1 ? " or "
                                         : "");
    }
    return fail(err, errlen, "%s: key \"%s\" must be %s", where, key, list);
}

/*
 * Reads the value of <kv> as the type of <def> wants it: a number, a boolean or an enumerated
 * name into <v>; a string is left in <kv>. Returns 0 or ERR_BAD_CONFIG naming the key.
 */
static int read_value(const struct key_def *def, const struct dec_kv *kv, const char *where,
                      long *v, char *err, size_t errlen)
{
    if (def->names != NULL) {
        /* A string key that takes names says so first; other types name the choices. */
        if (def->type == KEY_STRING && kv->type != DEC_KV_STRING)
            return fail(err, errlen, "%s: key \"%s\" must be a string", where, kv->key);
        const char *t = kv->type == DEC_KV_STRING ? kv->str : "?";
        for (const struct key_name *k = def->names; k->name != NULL; k++) {
            if (strcmp(k->name, t) == 0) {
                *v = k->value;
                return 0;
            }
        }
        return fail_names(def, where, kv->key, err, errlen);
    }
    switch (def->type) {
    case KEY_STRING:
        if (kv->type != DEC_KV_STRING)
            return fail(err, errlen, "%s: key \"%s\" must be a string", where, kv->key);
        return 0;
    case KEY_BOOL:
        if (kv->type == DEC_KV_BOOL)
            *v = kv->boolean;
        else if (kv->type == DEC_KV_STRING && strcmp(kv->str, "true") == 0)
            *v = 1;
        else if (kv->type == DEC_KV_STRING && strcmp(kv->str, "false") == 0)
            *v = 0;
        else
            return fail(err, errlen, "%s: key \"%s\" must be true or false", where, kv->key);
        return 0;
    case KEY_DURATION:
        if (kv_duration(kv, def, v) != 0)
            return fail(err, errlen,
                        "%s: key \"%s\" must be a duration such as \"10s\" (at most %ld ms)", where,
                        kv->key, def->max);
        return 0;
    default:
        if (kv_int(kv, def, v) != 0)
            return fail(err, errlen, "%s: key \"%s\" must be an integer in [%ld, %ld]", where,
                        kv->key, def->min, def->max);
        return 0;
    }
}

/*
 * Applies the map <kv> to <base>, the settings of one scope (a struct proxy_cfg or a struct
 * upstream_cfg); unknown keys become warnings in <c>. Returns 0 or ERR_BAD_CONFIG naming the
 * key.
 */
static int apply_kvs(struct proxy_cfg *c, enum key_scope scope, const char *where,
                     const struct dec_kv *kv, size_t n, void *base, char *err, size_t errlen)
{
    for (size_t i = 0; i < n; i++) {
        const struct key_def *def = find_key(scope, kv[i].key);
        long v = 0;
        if (def == NULL) {
            warn_unknown(c, where, kv[i].key);
            continue;
        }
        if (def->set == NULL)
            continue;
        int rc = read_value(def, &kv[i], where, &v, err, errlen);
        if (rc == 0)
            rc = def->set(def, base, &kv[i], v, where, err, errlen);
        if (rc != 0)
            return rc;
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
        return fail(err, errlen, "upstream: DestinationName is empty");
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
    apply_defaults(SCOPE_UPSTREAM, out);
    out->key = xasprintf("%s:%s/%s/%s/%s", type, out->ns, out->partition, out->datacenter,
                         out->destination_name);
    if (u->local_bind_socket_mode[0] != '\0') {
        long mode;
        if (util_parse_int_base(u->local_bind_socket_mode, 8, 0, 0777, &mode) != 0)
            return fail(err, errlen, "%s: LocalBindSocketMode \"%s\" is not an octal mode", where,
                        u->local_bind_socket_mode);
        out->bind_socket_mode = (int)mode;
    }
    return apply_kvs(c, SCOPE_UPSTREAM, where, u->config, u->n_config, out, err, errlen);
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

int proxycfg_expose_path_valid(const char *path, size_t len)
{
    if (len == 0 || len > DEC_EXPOSE_PATH_MAX || path[0] != '/')
        return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)path[i];
        if (ch <= 0x20 || ch >= 0x7f || ch == '?' || ch == '#')
            return 0;
    }
    return 1;
}

/* Whether listeners on <a>:<port> and <b>:<port> would collide (same or a wildcard address). */
static int same_bind(const char *a, const char *b)
{
    return strcmp(a, b) == 0 || strcmp(a, "0.0.0.0") == 0 || strcmp(b, "0.0.0.0") == 0 ||
           strcmp(a, "::") == 0 || strcmp(b, "::") == 0;
}

/*
 * Proxy.Expose into <out>: every path checked (as Consul validates them, and stricter: a port
 * of 0 and a path a request could not match byte for byte are errors here). Paths that share a
 * ListenerPort share its listener, so they must agree on LocalPathPort and Protocol (Consul
 * refuses shared ports altogether).
 */
static int build_expose(const struct dec_service *svc, struct proxy_cfg *out, char *err,
                        size_t errlen)
{
    out->expose_checks = svc->expose_checks;
    out->expose_paths = xcalloc(svc->n_expose_paths, sizeof(*out->expose_paths));
    for (size_t i = 0; i < svc->n_expose_paths; i++) {
        const struct dec_expose_path *d = &svc->expose_paths[i];
        struct expose_path *e = &out->expose_paths[i];
        int proto = strcasecmp(d->protocol, "http2") == 0                            ? PROTO_HTTP2
                    : d->protocol[0] == '\0' || strcasecmp(d->protocol, "http") == 0 ? PROTO_HTTP
                                                                                     : -1;
        if (proto < 0)
            return fail(err, errlen,
                        "Proxy.Expose.Paths[%zu].Protocol \"%s\" is not \"http\" or \"http2\"", i,
                        d->protocol);
        if (!proxycfg_expose_path_valid(d->path, strlen(d->path)))
            return fail(err, errlen,
                        "Proxy.Expose.Paths[%zu].Path \"%s\" must begin with / and have no query, "
                        "fragment, space or control character",
                        i, d->path);
        if (d->listener_port == 0 || d->local_path_port == 0)
            return fail(err, errlen, "Proxy.Expose.Paths[%zu]: %s must be set (1-65535)", i,
                        d->listener_port == 0 ? "ListenerPort" : "LocalPathPort");
        if (out->bind_port == d->listener_port)
            return fail(err, errlen,
                        "Proxy.Expose.Paths[%zu].ListenerPort %d is the proxy's public port", i,
                        d->listener_port);
        for (size_t j = 0; j < out->n_upstreams; j++) {
            const struct upstream_cfg *u = &out->upstreams[j];
            if (u->bind_socket_path[0] == '\0' && u->bind_port == d->listener_port &&
                same_bind(u->bind_address, out->bind_address))
                return fail(err, errlen,
                            "Proxy.Expose.Paths[%zu].ListenerPort %d is also upstream \"%s\"'s "
                            "port",
                            i, d->listener_port, u->destination_name);
        }
        for (size_t j = 0; j < i; j++) {
            const struct expose_path *o = &out->expose_paths[j];
            if (o->listener_port == d->listener_port &&
                (o->local_path_port != d->local_path_port || o->protocol != proto))
                return fail(err, errlen,
                            "Proxy.Expose.Paths[%zu] and [%zu] share ListenerPort %d but not "
                            "LocalPathPort and Protocol",
                            j, i, d->listener_port);
        }
        e->listener_port = d->listener_port;
        e->local_path_port = d->local_path_port;
        e->protocol = proto;
        e->path = xstrdup(d->path);
        out->n_expose_paths++;
    }
    return 0;
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
        rc = fail(err, errlen, "service \"%s\": Proxy.DestinationServiceName is empty", svc->id);
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
    apply_defaults(SCOPE_PROXY, out);
    rc = apply_kvs(out, SCOPE_PROXY, "Proxy.Config", svc->config, svc->n_config, out, err, errlen);
    if (rc != 0)
        goto out;
    if (out->tls_max_version != 0 && out->tls_max_version < out->tls_min_version) {
        rc = fail(err, errlen, "Proxy.Config: tls_max_version is below tls_min_version");
        goto out;
    }
    out->local_socket_path = xstrdup(out->local_port == 0 ? svc->local_service_socket_path : "");
    out->bind_socket_path = xstrdup(out->bind_port == 0 ? svc->socket_path : "");
    if (out->bind_socket_path[0] != '\0' &&
        strcmp(out->bind_socket_path, out->local_socket_path) == 0) {
        rc = fail(err, errlen, "SocketPath %s is also Proxy.LocalServiceSocketPath",
                  out->bind_socket_path);
        goto out;
    }
    if ((out->bind_port != 0 || out->bind_socket_path[0] != '\0') && out->local_port == 0 &&
        out->local_socket_path[0] == '\0') {
        rc = fail(err, errlen, "service \"%s\": Proxy.LocalServicePort is not set", svc->id);
        goto out;
    }
    out->upstreams = xcalloc(svc->n_upstreams, sizeof(*out->upstreams));
    for (size_t i = 0; i < svc->n_upstreams; i++) {
        const struct dec_upstream *u = &svc->upstreams[i];
        if (u->local_bind_port == 0 && u->local_bind_socket_path[0] == '\0') {
            rc = fail(err, errlen,
                      "upstream \"%s\": neither LocalBindPort nor "
                      "LocalBindSocketPath is set",
                      u->destination_name);
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
            rc = fail(err, errlen, "upstream \"%s\" binds %s, the proxy's own socket",
                      nu->destination_name, nu->bind_socket_path);
            goto out;
        }
        for (size_t j = 0; j + 1 < out->n_upstreams; j++) {
            const struct upstream_cfg *o = &out->upstreams[j];
            if (nu->bind_socket_path[0] != '\0' &&
                strcmp(o->bind_socket_path, nu->bind_socket_path) == 0) {
                rc = fail(err, errlen, "upstreams \"%s\" and \"%s\" both bind %s",
                          o->destination_name, nu->destination_name, nu->bind_socket_path);
                goto out;
            }
            if (nu->bind_socket_path[0] == '\0' && o->bind_socket_path[0] == '\0' &&
                o->bind_port == nu->bind_port && strcmp(o->bind_address, nu->bind_address) == 0) {
                rc = fail(err, errlen, "upstreams \"%s\" and \"%s\" both bind %s:%d",
                          o->destination_name, nu->destination_name, nu->bind_address,
                          nu->bind_port);
                goto out;
            }
            if (strcmp(o->key, nu->key) == 0) {
                rc = fail(err, errlen, "upstream \"%s\" is listed twice", nu->destination_name);
                goto out;
            }
        }
    }
    rc = build_expose(svc, out, err, errlen);
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
        return fail(err, errlen, "flag -upstream \"%s\": expected name[.type]:[addr:]port", buf);
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
        return fail(err, errlen, "flag -upstream: empty name or address in \"%s\"", buf);
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
        rc = fail(err, errlen, "flag -listen \"%s\": expected host:port", f->listen);
        goto out;
    }
    if (f->service_addr != NULL &&
        (util_split_hostport(f->service_addr, local_host, sizeof(local_host), &local_port) != 0 ||
         local_port == 0)) {
        rc = fail(err, errlen, "flag -service-addr \"%s\": expected host:port", f->service_addr);
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
    for (size_t i = 0; i < c->n_expose_paths; i++)
        free(c->expose_paths[i].path);
    free(c->expose_paths);
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
    dst->expose_paths = xcalloc(src->n_expose_paths, sizeof(*dst->expose_paths));
    for (size_t i = 0; i < src->n_expose_paths; i++) {
        dst->expose_paths[i] = src->expose_paths[i];
        dst->expose_paths[i].path = xstrdup(src->expose_paths[i].path);
    }
    /* Warnings are for the control thread's logs only. */
    dst->warnings = NULL;
    dst->n_warnings = 0;
    dst->n_unwarned = 0;
}

static const char *const scope_names[] = {"", "Proxy.Config", "Upstreams[].Config"};
static const char *const type_names[] = {"",        "string",      "port",  "milliseconds",
                                         "boolean", "TLS version", "count", "accepted",
                                         "duration"};

void proxycfg_write_man(FILE *f)
{
    char def[64];
    for (size_t i = 0; i < ARRAY_SIZE(keys); i++) {
        fprintf(f, ".TP\n.B ");
        util_fput_troff(f, keys[i].name);
        fprintf(f, "\n(%s, %s; default: ", scope_names[keys[i].scope], type_names[keys[i].type]);
        util_fput_troff(f, default_text(&keys[i], def, sizeof(def)));
        fprintf(f, ")\n");
        util_fput_troff(f, keys[i].doc);
        fputc('\n', f);
    }
}

void proxycfg_write_doc(FILE *f)
{
    char def[64];
    fprintf(f, "| key | where | type | default | meaning |\n|---|---|---|---|---|\n");
    for (size_t i = 0; i < ARRAY_SIZE(keys); i++)
        fprintf(f, "| `%s` | %s | %s | %s | %s |\n", keys[i].name, scope_names[keys[i].scope],
                type_names[keys[i].type], default_text(&keys[i], def, sizeof(def)), keys[i].doc);
}
