/*
 * snapshot: everything a worker needs, immutable and reference-counted.
 *
 * The control thread builds a new snapshot whenever an input changes and hands one reference
 * to each worker; a worker's session holds a reference for its whole life, so the TLS context,
 * endpoints and settings it started with stay valid while newer snapshots come and go. The
 * pieces that change independently (TLS context, intention table, endpoint sets) carry their
 * own reference counts and are shared between consecutive snapshots.
 */
#ifndef CONNECTD_SNAPSHOT_H
#define CONNECTD_SNAPSHOT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "decode.h"
#include "intent.h"
#include "limit.h"
#include "outlier.h"
#include "pathnorm.h"
#include "proxycfg.h"
#include "route.h"
#include "tls.h"

/* The healthy endpoints of one upstream; immutable, shared by reference. */
struct endpoint_set {
    atomic_uint refs;
    struct dec_endpoint *v;
    size_t n;
};

/* Takes ownership of <v> (from decode_health_connect). */
struct endpoint_set *endpoint_set_new(struct dec_endpoint *v, size_t n);
struct endpoint_set *endpoint_set_ref(struct endpoint_set *s);
void endpoint_set_unref(struct endpoint_set *s);
/* Whether <a> and <b> hold the same endpoints, field for field and in the same order. */
int endpoint_set_same(const struct endpoint_set *a, const struct endpoint_set *b);

/*
 * One target of an upstream: where its endpoints came from and what a server there must
 * prove. For a service upstream it is a discovery-chain target; a prepared query has one.
 */
struct snap_target {
    char *id;                       /* chain target ID, or the query name; for logs */
    char *service;                  /* expected identity; "" = each endpoint's identity_service */
    char *ns;                       /* "" = the endpoint's, else default */
    char *partition;                /* "" = the endpoint's, else default */
    char *datacenter;               /* "" = the endpoint's Node.Datacenter, else the proxy's */
    char *sni;                      /* "" = derived (prepared query SNI, or the service SNI) */
    uint32_t connect_timeout_ms;    /* 0 = the upstream's connect_timeout_ms */
    struct endpoint_set *endpoints; /* the healthy endpoints; never NULL in a snapshot */
    /* The passive health of each endpoint, parallel to endpoints->v (one reference each), set
     * by snapshot_attach_outliers(); NULL before (and in the control thread's own copies). */
    struct outlier_host **hosts;
    size_t n_hosts;
};

/*
 * Makes <dst> a deep copy of <src>: its own strings and a new reference to the endpoint set
 * (an empty set when <src> has none yet).
 */
void snap_target_copy(struct snap_target *dst, const struct snap_target *src);
/* Frees <t>'s strings and drops its endpoint set's (and hosts') references (NULL members
 * are fine). */
void snap_target_dispose(struct snap_target *t);

struct snap_upstream {
    const struct upstream_cfg *cfg; /* points into snapshot->cfg */
    struct snap_target *targets;    /* primary first, then failovers in order */
    size_t n_targets;
    struct limit_state *limit; /* one reference; shared with later snapshots */
    /* Request limits and passive health (one reference; shared with later snapshots; NULL
     * until snapshot_attach_outliers()). */
    struct outlier *outlier;
    /* enum proxycfg_protocol: the upstream's Config.protocol when set, else its discovery
     * chain's; new connections to the upstream are served by it (http: L7, else L4). */
    int protocol;
    /* The route table compiled from the upstream's discovery chain (one reference; NULL for a
     * prepared query, or before the first chain). Its resolvers index <targets>, built from
     * the same chain. mux_h1 routes each outbound request by it. */
    struct route_table *routes;
};

/*
 * One exposed listener (Proxy.Expose): a plain listener, no TLS and no caller identity, on the
 * public listener's address and <port>. A request whose path (without its query) is exactly
 * one of <paths> goes to the local application's <local_port> on the local service address,
 * over HTTP/1.1 (PROTO_HTTP) or h2c (PROTO_HTTP2); anything else is answered 404.
 */
struct snap_expose {
    int port;
    int local_port;
    int protocol;
    int from_checks; /* its paths are the parent service's health checks (Expose.Checks) */
    char name[24];   /* "expose:<port>": the listener's name in logs, /metrics, access log */
    char **paths;
    size_t n_paths;
};

/* The exposed listeners of a configuration; immutable, shared by reference. */
struct snap_exposes {
    atomic_uint refs;
    struct snap_expose *v;
    size_t n;
    struct limit_state *limit; /* admission of every exposed listener's connections */
    char agent_addr[64];       /* the agent's LAN advertise address; "" unknown */
};

/* Takes ownership of <v> (each entry's <paths> too) and a new reference to <limit>. */
struct snap_exposes *snap_exposes_new(struct snap_expose *v, size_t n, struct limit_state *limit);
struct snap_exposes *snap_exposes_ref(struct snap_exposes *x);
/* NULL is ignored. */
void snap_exposes_unref(struct snap_exposes *x);
/*
 * Whether a caller from address <source> may use exposed listener <e> of <x>, whose accepted
 * connection has the local address <local> (addresses without ports; IPv4-mapped IPv6 is
 * read as IPv4). An Expose.Paths listener takes anyone; a check listener (from_checks) only
 * this host and the agent, as Envoy's exposed check listeners do: 127.0.0.0/8, ::1, the
 * connection's own local address (a caller on this host reaching a non-loopback address
 * comes from it), and the agent's advertise address.
 */
int snap_expose_source_ok(const struct snap_exposes *x, const struct snap_expose *e,
                          const char *source, const char *local);

/* Whether <a> and <b> (either may be NULL: none) list the same listeners and paths. */
int snap_exposes_equal(const struct snap_exposes *a, const struct snap_exposes *b);

struct snapshot {
    atomic_uint refs;
    uint64_t generation;
    struct proxy_cfg cfg;              /* owned deep copy */
    char *trust_domain;                /* from the roots */
    struct tls_ctx *tls;               /* one reference */
    struct intent_table *intents;      /* one reference */
    struct snap_upstream *upstreams;   /* cfg.n_upstreams entries, same order */
    struct limit_state *inbound_limit; /* the public listener's; one reference */
    struct mesh_http_cfg mesh_http;    /* inbound request normalization (the mesh entry) */
    /* Inbound request rate limits (service-defaults RateLimits); NULL = none. One reference,
     * set by the control thread after snapshot_new(); its buckets outlive the snapshot. */
    struct limit_rates *rates;
    /* The exposed listeners (Proxy.Expose); NULL = none. One reference, set by the control
     * thread after snapshot_new(). */
    struct snap_exposes *exposes;
};

/*
 * Builds a snapshot with copies of <cfg> and <trust_domain> and new references to <tls> and
 * <intents>. <targets[i]> (<n_targets[i]> entries, possibly none) belong to cfg->upstreams[i];
 * their strings are copied and their endpoint sets referenced (NULL: an empty set is used).
 * <inbound_limit> and <limits[i]> are the admission states of the public and upstream
 * listeners; the snapshot takes new references (a NULL one gets a fresh state of its own).
 * <mesh_http> is copied (NULL: Consul's defaults). Never fails.
 */
struct snapshot *snapshot_new(uint64_t generation, const struct proxy_cfg *cfg,
                              const char *trust_domain, struct tls_ctx *tls,
                              struct intent_table *intents,
                              const struct snap_target *const *targets, const size_t *n_targets,
                              struct limit_state *inbound_limit, struct limit_state *const *limits,
                              const struct mesh_http_cfg *mesh_http);
/*
 * Control thread, before the snapshot is published: gives upstream i the state <outliers[i]>
 * (a new reference; NULL leaves it without) and each of its targets the hosts of its
 * endpoints from that state's registry, then prunes the registry of endpoints no target has.
 */
void snapshot_attach_outliers(struct snapshot *s, struct outlier *const *outliers);

/* The name of endpoint <ep> in logs and registries: "address:port", or "unix:<path>" when it
 * has a socket path (which replaces the address, consul-api.md 3.3). */
void snapshot_endpoint_name(const struct dec_endpoint *ep, char *out, size_t len);

struct snapshot *snapshot_ref(struct snapshot *s);
/* Safe from any thread; the last reference frees everything. */
void snapshot_unref(struct snapshot *s);

/*
 * What differs between <prev> and <next> that can change the decision about an inbound caller
 * already admitted: "intentions" (rules or default policy), "trust domain" (of the roots),
 * "verify_trust_domain", "authorization" (intention table or agent) or "service" (the
 * destination). Returns the first such difference as a static name, or NULL when an open
 * connection would be decided the same way under <next>.
 */
const char *snapshot_inbound_change(const struct snapshot *prev, const struct snapshot *next);

/* The exposed listener on <port>, or NULL. */
const struct snap_expose *snapshot_expose(const struct snapshot *s, int port);

/* The upstream whose key is <key>, or NULL. */
const struct snap_upstream *snapshot_upstream(const struct snapshot *s, const char *key);

#endif
