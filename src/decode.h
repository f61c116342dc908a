/*
 * decode: JSON from the Consul agent into plain C structures.
 *
 * The only module that includes jansson. Every decoder is pure: bytes in, either a fully
 * filled result (owned by the caller, released with the matching _dispose/_free) or an error
 * code with a message in <err> that names the field. On error nothing is left allocated and
 * the output is zeroed. Unknown keys are ignored; absent optional strings decode as "" (never
 * NULL) so callers need no NULL checks.
 */
#ifndef CONNECTD_DECODE_H
#define CONNECTD_DECODE_H

#include <stddef.h>
#include <stdint.h>

#include "pathnorm.h"

/* ---- /v1/agent/connect/ca/roots ---- */

struct dec_root {
    char *id;
    char *name;
    char *root_cert_pem;
    int active;
};

struct dec_roots {
    char *active_root_id;
    char *trust_domain;     /* required non-empty */
    struct dec_root *roots; /* at least one, each with a non-empty RootCert */
    size_t n_roots;
};

int decode_roots(const char *buf, size_t len, struct dec_roots *out, char *err, size_t errlen);
void dec_roots_dispose(struct dec_roots *r);

/* ---- /v1/agent/connect/ca/leaf/<service> ---- */

struct dec_leaf {
    char *serial;
    char *cert_pem; /* required: leaf followed by intermediates */
    char *key_pem;  /* required; secret: never log it */
    char *service;
    char *service_uri;
    char *valid_after;  /* RFC 3339 as sent */
    char *valid_before; /* RFC 3339 as sent */
};

int decode_leaf(const char *buf, size_t len, struct dec_leaf *out, char *err, size_t errlen);
/* Also wipes key_pem before freeing it. */
void dec_leaf_dispose(struct dec_leaf *l);

/* ---- Proxy.Config and Upstreams[].Config maps ---- */

enum dec_kv_type {
    DEC_KV_STRING = 1,
    DEC_KV_NUMBER,
    DEC_KV_BOOL,
    DEC_KV_NULL,
    DEC_KV_OTHER, /* an array; kept so unknown-key warnings can name it */
};

/*
 * One entry of a config map. Nested objects are flattened with dots: {"limits":
 * {"max_connections": 5}} becomes "limits.max_connections" = 5. Numbers keep their JSON text
 * too, so "5" and 5 can both be accepted by the config layer.
 */
struct dec_kv {
    char *key;
    enum dec_kv_type type;
    char *str; /* DEC_KV_STRING: the string; DEC_KV_NUMBER: the number's text; else "" */
    double num;
    int boolean;
};

/* ---- /v1/agent/service/<id> ---- */

struct dec_upstream {
    char *destination_type; /* "service" when absent or empty */
    char *destination_name;
    char *destination_namespace;
    char *destination_partition;
    char *destination_peer;
    char *datacenter;
    char *local_bind_address;
    int local_bind_port; /* 0 when absent */
    char *local_bind_socket_path;
    char *local_bind_socket_mode;
    struct dec_kv *config;
    size_t n_config;
};

/*
 * Proxy.Expose.Paths[]: a path of the local application served without mTLS on a plain
 * listener. Shape only; proxycfg checks the values. At most DEC_EXPOSE_PATHS_MAX of them and
 * paths of DEC_EXPOSE_PATH_MAX bytes, else the registration is malformed.
 */
#define DEC_EXPOSE_PATHS_MAX 64
#define DEC_EXPOSE_PATH_MAX  1024
struct dec_expose_path {
    int listener_port;   /* 0 when absent */
    int local_path_port; /* 0 when absent */
    char *path;          /* "" when absent */
    char *protocol;      /* as sent ("http", "http2"); "" when absent */
};

struct dec_service {
    char *kind; /* "connect-proxy" for proxies; "" for typical services */
    char *id;
    char *service;
    char *address;
    int port;
    char *socket_path;
    char *datacenter;
    char *ns;
    char *partition;
    char *content_hash;
    /* Proxy.* (empty when the service has no Proxy block) */
    char *destination_service_name;
    char *destination_service_id;
    char *local_service_address;
    int local_service_port;
    char *local_service_socket_path;
    char *mode;
    struct dec_kv *config;
    size_t n_config;
    struct dec_upstream *upstreams;
    size_t n_upstreams;
    /* Proxy.Expose */
    int expose_checks; /* Checks: expose the parent service's HTTP and gRPC checks */
    struct dec_expose_path *expose_paths;
    size_t n_expose_paths;
};

int decode_agent_service(const char *buf, size_t len, struct dec_service *out, char *err,
                         size_t errlen);
void dec_service_dispose(struct dec_service *s);

/*
 * From /v1/agent/services (an object of ID -> service), finds the one service with Kind
 * "connect-proxy" whose Proxy.DestinationServiceID equals <target_id>. Returns 0 and a fresh
 * string in *proxy_id; -ENOENT when none matches; -EEXIST when several do (<err> then lists
 * their IDs); or a decode error.
 */
int decode_sidecar_for(const char *buf, size_t len, const char *target_id, char **proxy_id,
                       char *err, size_t errlen);

/* ---- /v1/agent/checks ---- */

/* One health check of the local agent, the fields exposing checks needs. */
struct dec_check {
    char *check_id;
    char *service_id;
    char *type;       /* "http", "grpc", "tcp", "ttl", ... */
    char *status;     /* "passing", "warning", "critical", "maintenance" */
    char *output;     /* the last run's output, as the agent keeps it */
    int exposed_port; /* ExposedPort: the proxy listener the agent sends it to; 0 = none */
};

/*
 * Decodes /v1/agent/checks (an object of CheckID -> HealthCheck), keeping only the checks of
 * service <service_id>, in CheckID order. At most DEC_CHECKS_MAX of them (more is an error).
 */
#define DEC_CHECKS_MAX 1024
int decode_agent_checks(const char *buf, size_t len, const char *service_id, struct dec_check **out,
                        size_t *n, char *err, size_t errlen);
void dec_checks_free(struct dec_check *v, size_t n);

/* ---- /v1/connect/intentions/match?by=destination&name=<key> ---- */

/* Bounds on one intention's Permissions; more is refused as malformed. */
#define DEC_PERMISSIONS_MAX  128  /* permissions per intention */
#define DEC_PERM_HEADERS_MAX 32   /* header conditions per permission */
#define DEC_PERM_METHODS_MAX 16   /* methods per permission */
#define DEC_PERM_STR_MAX     4096 /* bytes in a path, header name or value, or method */

enum dec_path_match {
    DEC_PATH_ANY = 0, /* no path condition */
    DEC_PATH_EXACT,
    DEC_PATH_PREFIX,
    DEC_PATH_REGEX,
};

enum dec_header_match {
    DEC_HDR_PRESENT = 1,
    DEC_HDR_EXACT,
    DEC_HDR_PREFIX,
    DEC_HDR_SUFFIX,
    DEC_HDR_CONTAINS,
    DEC_HDR_REGEX,
};

/* Permissions[].HTTP.Header[]: exactly one match kind (as Consul validates). */
struct dec_perm_header {
    char *name; /* non-empty, as sent */
    enum dec_header_match match;
    char *value; /* "" for DEC_HDR_PRESENT */
    int invert;
    int ignore_case; /* as sent; meaningful for Exact, Prefix, Suffix and Contains only */
};

/* One of an intention's Permissions[]. An absent or empty HTTP block matches every request,
 * as in Consul's own RBAC generator. */
struct dec_permission {
    int allow; /* Action: 1 "allow", 0 "deny" (anything else is refused) */
    enum dec_path_match path_match;
    char *path; /* "" for DEC_PATH_ANY */
    struct dec_perm_header *headers;
    size_t n_headers;
    char **methods; /* non-empty strings, compared exactly */
    size_t n_methods;
    int has_jwt; /* a JWT block: a requirement connectd cannot check */
};

struct dec_intention {
    char *id;
    char *description;
    char *source_peer;
    char *source_sameness_group;
    char *source_partition; /* "" means default */
    char *source_ns;        /* "" means default */
    char *source_name;
    char *destination_ns;
    char *destination_name;
    char *action;                       /* "allow", "deny", or "" when permissions is set */
    int has_permissions;                /* a non-empty Permissions array */
    struct dec_permission *permissions; /* in the agent's order; NULL when none */
    size_t n_permissions;
    int has_jwt; /* a JWT block on the intention itself */
    int precedence;
};

/*
 * Decodes the array under <key> in the match response, keeping the agent's order (highest
 * precedence first). A missing key or null is an empty list. Permissions are decoded in full
 * and checked for shape (types, one path kind, one match kind per header, the bounds above);
 * their regexes are compiled later, by the intention table.
 */
int decode_intentions_match(const char *buf, size_t len, const char *key,
                            struct dec_intention **out, size_t *n, char *err, size_t errlen);
void dec_intentions_free(struct dec_intention *v, size_t n);

/* ---- /v1/health/connect/<service> ---- */

struct dec_endpoint {
    char *node;
    char *node_datacenter; /* Node.Datacenter */
    char *address;         /* Service.Address, or Node.Address when that is empty */
    int port;              /* Service.Port */
    char *socket_path;     /* Service.SocketPath */
    char *service_id;
    /* Identity the endpoint must present: Proxy.DestinationServiceName for proxies, the
     * service name itself for connect-native services. */
    char *identity_service;
    char *ns;        /* Service.Namespace, "" in CE */
    char *partition; /* Service.Partition, "" in CE */
    int passing;     /* 1 when every check in Checks is "passing" */
    int critical;    /* 1 when any check is "critical" */
};

int decode_health_connect(const char *buf, size_t len, struct dec_endpoint **out, size_t *n,
                          char *err, size_t errlen);
void dec_endpoints_free(struct dec_endpoint *v, size_t n);

/* ---- POST /v1/discovery-chain/<service> ---- */

/* One target of a compiled chain: a service (subset) in one namespace/partition/datacenter. */
struct dec_chain_target {
    char *id; /* opaque target ID, e.g. "v2.db.default.default.dc1" */
    char *service;
    char *service_subset;
    char *ns;         /* "" = default */
    char *partition;  /* "" = default */
    char *datacenter; /* "" = the agent's */
    char *peer;
    char *sni;                   /* the ready-made SNI to send; "" = none */
    char *filter;                /* Subset.Filter (bexpr for ?filter=), "" = none */
    int only_passing;            /* Subset.OnlyPassing */
    uint32_t connect_timeout_ms; /* the target's ConnectTimeout; 0 when absent */
};

/*
 * The routing half of a compiled chain (consul-api.md 9): its routers' routes, splitters'
 * splits and resolvers, as the agent's JSON spells them (Go durations arrive as strings, such
 * as a route's "RequestTimeout": "2s", or as integer nanoseconds, such as a resolver's
 * RequestTimeout and a cookie's TTL; both are accepted everywhere). Bounded: more entries or
 * longer strings than below make the whole chain malformed.
 */
#define DEC_CHAIN_ROUTES_MAX  1024 /* routes of a router (the compiler's catch-all included) */
#define DEC_CHAIN_SPLITS_MAX  64   /* splits of a splitter */
#define DEC_ROUTE_QUERY_MAX   32   /* QueryParam[] conditions of a route */
#define DEC_HEADER_MODS_MAX   64   /* entries of one Add, Set or Remove */
#define DEC_RETRY_ON_MAX      16   /* RetryOn[] values */
#define DEC_RETRY_CODES_MAX   64   /* RetryOnStatusCodes[] values */
#define DEC_HASH_POLICIES_MAX 16   /* LoadBalancer.HashPolicies[] */
#define DEC_CHAIN_STR_MAX     4096 /* bytes of any routing string (path, name, value, rewrite) */

/* RetryOn values Consul accepts (config_entry_discoverychain.go), as bits. */
#define DEC_RETRY_ON_NAMES(X)                                                                      \
    X(5XX, "5xx")                                                                                  \
    X(GATEWAY_ERROR, "gateway-error")                                                              \
    X(RESET, "reset")                                                                              \
    X(CONNECT_FAILURE, "connect-failure")                                                          \
    X(ENVOY_RATELIMITED, "envoy-ratelimited")                                                      \
    X(RETRIABLE_4XX, "retriable-4xx")                                                              \
    X(REFUSED_STREAM, "refused-stream")                                                            \
    X(CANCELLED, "cancelled")                                                                      \
    X(DEADLINE_EXCEEDED, "deadline-exceeded")                                                      \
    X(INTERNAL, "internal")                                                                        \
    X(RESOURCE_EXHAUSTED, "resource-exhausted")                                                    \
    X(UNAVAILABLE, "unavailable")

enum dec_retry_on_index {
#define X(name, text) DEC_RETRY_ON_IDX_##name,
    DEC_RETRY_ON_NAMES(X)
#undef X
        DEC_RETRY_ON_COUNT
};
/* The name of RetryOn bit <index> ("5xx"), or NULL past the last. */
const char *dec_retry_on_name(unsigned index);

/* One name/value of a header modifier's Add or Set. */
struct dec_header_kv {
    char *name;  /* a non-empty HTTP token */
    char *value; /* no CR, LF or NUL */
};

/* RequestHeaders / ResponseHeaders {Add, Set, Remove} of a route or a split. */
struct dec_header_mods {
    struct dec_header_kv *add; /* appended to what is there */
    size_t n_add;
    struct dec_header_kv *set; /* replacing what is there */
    size_t n_set;
    char **remove; /* names */
    size_t n_remove;
};

enum dec_query_match {
    DEC_QUERY_PRESENT = 1,
    DEC_QUERY_EXACT,
    DEC_QUERY_REGEX,
};

/* Match.HTTP.QueryParam[]: exactly one of Present, Exact or Regex. */
struct dec_query_param {
    char *name; /* non-empty, compared exactly with the raw (undecoded) name */
    enum dec_query_match match;
    char *value; /* "" for DEC_QUERY_PRESENT */
};

/* One split of a route: a weight and the resolver it leads to. */
struct dec_chain_split {
    double weight;   /* percent, the compiled Weight (nested splitters flattened) */
    size_t resolver; /* index into dec_chain.resolvers */
    struct dec_header_mods request_headers, response_headers; /* Definition's */
};

/*
 * One route, in the router's order. A chain that starts at a splitter or a resolver has one
 * catch-all route (no conditions, no destination settings), as Envoy's route for it. The route
 * leads to its splits: a splitter's, or one split of weight 100 straight to a resolver.
 */
struct dec_chain_route {
    char *next_node; /* the node it leads to ("" for a chain without a router) */
    /* Definition.Match.HTTP; every condition must hold. No condition: matches every request. */
    enum dec_path_match path_match;
    char *path;           /* "" for DEC_PATH_ANY */
    int case_insensitive; /* CaseInsensitive: PathExact and PathPrefix ignore ASCII case */
    struct dec_perm_header *headers; /* Header[]; Contains and IgnoreCase accepted too */
    size_t n_headers;
    struct dec_query_param *query; /* QueryParam[] */
    size_t n_query;
    char **methods; /* Methods[]; any one of them */
    size_t n_methods;
    /* Definition.Destination */
    char *prefix_rewrite;        /* "" = none */
    uint32_t request_timeout_ms; /* 0 = not set (the data path's default applies) */
    uint32_t idle_timeout_ms;    /* 0 = not set */
    uint32_t num_retries;
    int retry_on_connect_failure;
    unsigned retry_on; /* bits 1 << DEC_RETRY_ON_IDX_* */
    uint16_t *retry_status_codes;
    size_t n_retry_status_codes;
    struct dec_header_mods request_headers, response_headers;
    struct dec_chain_split *splits; /* at least one */
    size_t n_splits;
};

enum dec_lb_policy {
    DEC_LB_DEFAULT = 0, /* no LoadBalancer, or an empty Policy */
    DEC_LB_RANDOM,
    DEC_LB_ROUND_ROBIN,
    DEC_LB_LEAST_REQUEST,
    DEC_LB_RING_HASH,
    DEC_LB_MAGLEV,
};
/* "random", ... ("" for DEC_LB_DEFAULT). */
const char *dec_lb_policy_name(enum dec_lb_policy p);

enum dec_hash_field {
    DEC_HASH_NONE = 0, /* SourceIP policies */
    DEC_HASH_HEADER,
    DEC_HASH_COOKIE,
    DEC_HASH_QUERY_PARAMETER,
};
/* "header", "cookie", "query_parameter" ("" for DEC_HASH_NONE). */
const char *dec_hash_field_name(enum dec_hash_field f);

/* LoadBalancer.HashPolicies[]: a Field with its FieldValue, or SourceIP. */
struct dec_hash_policy {
    enum dec_hash_field field;
    char *field_value; /* header, cookie or parameter name; "" with SourceIP */
    int source_ip;
    int terminal;
    /* CookieConfig */
    int cookie_session;     /* Session: a session cookie */
    uint32_t cookie_ttl_ms; /* TTL; 0 = none */
    char *cookie_path;      /* "" = none */
};

struct dec_load_balancer {
    enum dec_lb_policy policy;
    uint32_t choice_count;        /* LeastRequestConfig.ChoiceCount; 0 = not set */
    uint32_t ring_min, ring_max;  /* RingHashConfig Minimum/MaximumRingSize; 0 = not set */
    struct dec_hash_policy *hash; /* HashPolicies[] in order */
    size_t n_hash;
};

/* A resolver node reachable from the start node. */
struct dec_chain_resolver {
    char *name;      /* its node name, "resolver:<target>" */
    size_t *targets; /* indices into dec_chain.targets: Target, then Failover.Targets */
    size_t n_targets;
    uint32_t connect_timeout_ms; /* ConnectTimeout; 0 = absent */
    uint32_t request_timeout_ms; /* RequestTimeout; 0 = absent */
    struct dec_load_balancer lb; /* the node's LoadBalancer */
};

/*
 * A compiled discovery chain (consul-api.md 2.8), walked from its start node: every resolver
 * reachable through routers (their last route, the compiler's catch-all, first) and splitters
 * adds its Target, then its Failover.Targets in order (duplicates dropped); a chain that
 * starts at a resolver gives its target first, as an L4 proxy walks it. Every named target
 * must exist in the chain's Targets map. <protocol> is the chain's Protocol ("" when absent);
 * <connect_timeout_ms> the first resolver's.
 *
 * The routing is decoded too (routes -> splits -> resolvers -> targets), every field checked
 * for type and bounds; a route leads to a splitter or a resolver, a split to a resolver.
 * Regexes are not compiled here (the route table does it, route.h).
 */
struct dec_chain {
    char *service_name;
    char *protocol;
    uint32_t connect_timeout_ms; /* the resolver's ConnectTimeout; 5000 when absent */
    struct dec_chain_target *targets;
    size_t n_targets; /* at least 1 */
    struct dec_chain_route *routes;
    size_t n_routes; /* at least 1 */
    struct dec_chain_resolver *resolvers;
    size_t n_resolvers; /* at least 1 */
};

int decode_discovery_chain(const char *buf, size_t len, struct dec_chain *out, char *err,
                           size_t errlen);
void dec_chain_dispose(struct dec_chain *c);
/* Free what a route table took from a chain (route.c); NULL with 0 is fine. */
void dec_chain_routes_free(struct dec_chain_route *v, size_t n);
void dec_chain_resolvers_free(struct dec_chain_resolver *v, size_t n);

/*
 * Parses a Go duration as the agent renders it ("5s", "1m30s", "250ms", "1.5s") into
 * milliseconds, rounding up to whole milliseconds; 0 and -EINVAL on a malformed string.
 */
int decode_duration_ms(const char *s, uint64_t *ms);

/* ---- GET /v1/query/<name>/execute?connect=true ---- */

struct dec_query {
    char *service;              /* the query's service */
    char *datacenter;           /* the DC that answered (can be a failover DC) */
    struct dec_endpoint *nodes; /* as from decode_health_connect */
    size_t n_nodes;
};

int decode_prepared_query(const char *buf, size_t len, struct dec_query *out, char *err,
                          size_t errlen);
void dec_query_dispose(struct dec_query *q);

/* ---- /v1/agent/self ---- */

struct dec_agent_self {
    char *datacenter;               /* Config.Datacenter */
    char *default_intention_policy; /* DebugConfig.DefaultIntentionPolicy: "", allow or deny */
    char *acl_default_policy;       /* DebugConfig.ACLResolverSettings.ACLDefaultPolicy */
    int acls_enabled;               /* DebugConfig.ACLsEnabled: 1, 0, or -1 when absent */
    char *member_addr;              /* Member.Addr: the agent's LAN advertise address */
};

/* Decodes the few fields connectd reads; every one is optional (older agents lack some). */
int decode_agent_self(const char *buf, size_t len, struct dec_agent_self *out, char *err,
                      size_t errlen);
void dec_agent_self_dispose(struct dec_agent_self *s);

/* ---- GET /v1/config/mesh/mesh ---- */

/*
 * Decodes the mesh config entry's HTTP.Incoming.RequestNormalization into <out> (every block
 * optional: absent means Consul's defaults). An action that is not one Consul accepts is an
 * error naming the field, never read as a default. (A 404, no entry, is the caller's: all
 * defaults.)
 */
int decode_mesh_http(const char *buf, size_t len, struct mesh_http_cfg *out, char *err,
                     size_t errlen);

/* A service-defaults entry's RateLimits.InstanceLevel (limit.h enforces it). */
struct dec_rate_route {
    int kind;   /* enum dec_path_match: DEC_PATH_EXACT, _PREFIX or _REGEX */
    char *path; /* owned; the path, prefix or regex (RE2 syntax, matching the whole path) */
    uint32_t per_second;
    uint32_t burst; /* 0 = per_second */
};

/* The decoded settings (decode_rate_limits()); all zero is no limit at all. */
struct dec_rate_limits {
    uint32_t per_second;
    uint32_t burst; /* 0 = per_second */
    struct dec_rate_route *routes;
    size_t n_routes;
};

void dec_rate_limits_dispose(struct dec_rate_limits *c);
/* 1 when <a> and <b> say the same. */
int dec_rate_limits_equal(const struct dec_rate_limits *a, const struct dec_rate_limits *b);

/* The most Routes[] of a RateLimits.InstanceLevel decode_rate_limits() accepts. */
#define DEC_RATE_ROUTES_MAX 256

/*
 * Decodes a service-defaults config entry's RateLimits.InstanceLevel into <out> (free it with
 * dec_rate_limits_dispose()); no RateLimits is all zero, no limit. Each route must name
 * exactly one of PathExact, PathPrefix and PathRegex; numbers must not be negative. On error
 * <out> is zeroed and <err> names the field.
 */
int decode_rate_limits(const char *buf, size_t len, struct dec_rate_limits *out, char *err,
                       size_t errlen);

void dec_kv_free(struct dec_kv *v, size_t n);

/* ---- PUT /v1/agent/service/register: a self-registered proxy (-register) ---- */

/* The one JSON this module writes rather than reads, so jansson stays in one file. */
struct dec_proxy_registration {
    const char *id;
    const char *name;
    const char *address;
    int port;
    const char *destination_service_name;
    const char *local_service_address; /* NULL or "" to leave out, with the port */
    int local_service_port;
    const char *check_id; /* a TTL check, registered passing */
    const char *check_name;
    const char *check_ttl; /* "30s" */
};

/* Returns the registration body as a fresh NUL-terminated JSON string (caller frees). */
char *decode_proxy_registration_json(const struct dec_proxy_registration *r);

/* ---- POST /v1/agent/connect/authorize (consul-api.md 2.3) ---- */

/* The request body {"Target","ClientCertURI","ClientCertSerial"} (caller frees). */
char *decode_authorize_request_json(const char *target, const char *client_uri,
                                    const char *client_serial);
/*
 * Decodes {"Authorized": bool, "Reason": "..."}: *allowed is 1 or 0, <reason> gets the
 * agent's reason (truncated to fit). Returns 0 or a decode error with a message in <err>.
 */
int decode_authorize(const char *buf, size_t len, int *allowed, char *reason, size_t reason_len,
                     char *err, size_t errlen);

/* The jansson version in use, e.g. "2.14" (static). */
const char *decode_lib_version(void);

#endif
