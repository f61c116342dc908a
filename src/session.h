/*
 * session: one proxied connection, inbound (mTLS from the mesh -> local application) or
 * outbound (local client -> mTLS to an upstream endpoint), from accept to its one finish.
 *
 * Sessions live on one worker's loop and are touched only by that worker's thread.
 */
#ifndef CONNECTD_SESSION_H
#define CONNECTD_SESSION_H

#include <stddef.h>
#include <stdint.h>

#include <stdatomic.h>

#include "log.h"
#include "loop.h"
#include "spiffe.h"
#include "authq.h"
#include "snapshot.h"

struct session;

/*
 * What happened to connections on one worker, for the admin endpoint's /metrics. Written only
 * by the worker's thread with relaxed atomic adds (no lock, no allocation on the relay path);
 * the control thread reads them racily but atomically and sums the workers.
 */
struct session_counters {
    atomic_uint_fast64_t refused_max_connections; /* over a listener's max connections */
    atomic_uint_fast64_t refused_rate;            /* over max_new_connections_per_second */
    atomic_uint_fast64_t refused_pending;         /* over max_pending_handshakes */
    atomic_uint_fast64_t refused_pending_source;  /* over max_pending_handshakes_per_source */
    atomic_uint_fast64_t refused_descriptors;     /* would eat into the descriptor reserve */
    atomic_uint_fast64_t reauthorized;            /* sessions re-evaluated (periodic or change) */
    atomic_uint_fast64_t reauthorize_closed;      /* sessions a re-evaluation ended */
    atomic_uint_fast64_t h2_protocol_closed;      /* HTTP/2 callers ended for a protocol
                                                     error or a flood (rapid reset, ...) */
};

/*
 * How a session ended, the one argument of its finish. Columns: the name (SESSION_RES_<name>);
 * the label written as result= on the session's log line and in the access log; the level of
 * that line (an INFO line drops to DEBUG when the access log already has the session); the
 * kind label under which /metrics shows its count in connectd_timeout_closes_total (NULL: not
 * shown there); and the HTTP status a stream ending so will answer with once L7 exists (0: not
 * an HTTP outcome yet). Every result is counted in session_stats.results.
 */
#define SESSION_RESULTS(X)                                                                         \
    X(OK, "ok", INFO, NULL, 0)                     /* the relay closed normally */                 \
    X(PROBE, "probe", DEBUG, NULL, 0)              /* closed before a TLS byte */                  \
    X(DENIED, "denied", WARN, NULL, 0)             /* intentions or agent said no */               \
    X(BAD_IDENTITY, "bad_identity", WARN, NULL, 0) /* the peer's identity refused */               \
    X(TLS_ERROR, "tls_error", WARN, NULL, 0)       /* inbound TLS handshake failed */              \
    X(TIMEOUT, "timeout", WARN, NULL, 0)           /* handshake/connect/ask timer */               \
    X(LOCAL_CONNECT_ERROR, "local_connect_error", WARN, NULL, 0) /* local application refused */   \
    X(NO_ENDPOINT, "no_endpoint", WARN, NULL, 0)                 /* no upstream endpoint left */   \
    X(IDLE_TIMEOUT, "idle_timeout", WARN, "idle", 0)             /* no bytes for too long */       \
    X(LIFETIME, "lifetime", WARN, "lifetime", 0)                 /* max_connection_lifetime_ms */  \
    X(SHUTDOWN, "shutdown", WARN, NULL, 0)                       /* connectd is stopping */        \
    X(ERROR, "error", WARN, NULL, 0)                             /* I/O or allocation failure */

enum session_result {
#define X(name, label, level, close_kind, http_status) SESSION_RES_##name,
    SESSION_RESULTS(X)
#undef X
        SESSION_RES_COUNT
};

/* Label of a session result ("ok", "denied", ...); "error" for a value outside the table. */
const char *session_result_name(enum session_result r);

/*
 * The kind label of connectd_timeout_closes_total under which result <r> is shown ("idle",
 * "lifetime"), or NULL when it is not a timeout close.
 */
const char *session_result_close_kind(enum session_result r);

/*
 * Why an inbound TLS handshake failed, or the caller's verified certificate did not carry an
 * acceptable identity (the handshake as the mesh sees it), or an outbound peer proved the
 * wrong one. Labels of connectd_handshake_failures_total{reason}.
 */
#define SESSION_HANDSHAKE_REASONS(X)                                                               \
    X(NOT_TLS, "not_tls")                   /* first bytes are not a TLS handshake record */       \
    X(PROTOCOL_VERSION, "protocol_version") /* e.g. a TLS 1.0 or 1.1 ClientHello */                \
    X(NO_CLIENT_CERT, "no_client_cert")     /* the caller sent no certificate */                   \
    X(UNKNOWN_CA, "unknown_ca")             /* its chain leads to no trusted root */               \
    X(EXPIRED, "expired")                   /* a certificate past its notAfter */                  \
    X(NOT_YET_VALID, "not_yet_valid")       /* a certificate before its notBefore */               \
    X(BAD_CERTIFICATE, "bad_certificate")   /* any other chain verification failure */             \
    X(TLS_ERROR, "tls_error")               /* any other TLS failure */                            \
    X(TIMEOUT, "timeout")                   /* handshake_timeout_ms passed */                      \
    X(NO_URI, "no_uri")                     /* verified leaf without a URI SAN */                  \
    X(SEVERAL_URIS, "several_uris")         /* more than one URI SAN: ambiguous identity */        \
    X(BAD_IDENTITY, "bad_identity")         /* the URI is not a SPIFFE ID */                       \
    X(NOT_A_SERVICE, "not_a_service")       /* a SPIFFE ID of an agent, gateway, server, ... */    \
    X(TRUST_DOMAIN, "trust_domain")         /* a service of another trust domain */                \
    X(WRONG_PEER, "wrong_peer")             /* outbound: the server is not the expected one */     \
    X(OTHER, "other")

enum session_handshake_reason {
#define X(name, label) SESSION_HS_##name,
    SESSION_HANDSHAKE_REASONS(X)
#undef X
        SESSION_HS_COUNT
};

/* Label of a handshake failure reason. */
const char *session_handshake_reason_name(enum session_handshake_reason r);

/*
 * Per listener ("public" or an upstream's destination name). Slots are claimed by the worker
 * only: it writes <name> first and then publishes the slot by a release store of n_listeners,
 * so a reader that loads n_listeners with acquire sees complete names.
 */
#define SESSION_STATS_MAX_LISTENERS 64
/* Upper bounds of the request duration histogram's buckets, in milliseconds. */
#define SESSION_DURATION_BUCKETS_MS                                                                \
    {                                                                                              \
        5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000                                      \
    }
#define SESSION_DURATION_BUCKETS 11
#define SESSION_STATS_NAME_MAX   256
struct session_listener_stats {
    char name[SESSION_STATS_NAME_MAX];
    int inbound;
    atomic_uint_fast64_t active, total;
    atomic_uint_fast64_t bytes_in;       /* read from the connecting client */
    atomic_uint_fast64_t bytes_out;      /* written back to the connecting client */
    atomic_uint_fast64_t connect_errors; /* upstreams: endpoints that failed to connect/verify */
    /* protocol http: requests by the class of the status answered ([0]: none was answered,
     * [1] 1xx ... [5] 5xx), and their durations (head received to response sent) in the
     * buckets of SESSION_DURATION_BUCKETS_MS (plus +Inf) with their sum. */
    atomic_uint_fast64_t requests[6];
    atomic_uint_fast64_t duration_buckets[SESSION_DURATION_BUCKETS + 1];
    atomic_uint_fast64_t duration_sum_ms;
    atomic_uint_fast64_t expose_refused; /* an exposed listener: requests answered 404 */
    atomic_uint_fast64_t pool_idle;      /* upstreams: idle connections in the pool now */
};

/* Authorization decisions per source service; past the cap they go to <other_source>. */
#define SESSION_STATS_MAX_SOURCES 256
struct session_source_stats {
    char name[SESSION_STATS_NAME_MAX];
    atomic_uint_fast64_t allow, deny;         /* per connection (tcp) */
    atomic_uint_fast64_t req_allow, req_deny; /* per request (protocol http) */
};

struct session_stats {
    struct session_counters counters;
    atomic_uint_fast64_t results[SESSION_RES_COUNT]; /* sessions ended, by result */
    atomic_uint_fast64_t handshake_failures[SESSION_HS_COUNT];
    atomic_uint_fast64_t tls_handshakes[2][2]; /* [0 inbound, 1 outbound][1 resumed] */
    atomic_uint_fast64_t upool_idle;           /* upstream connections in the pool now */
    atomic_uint_fast64_t upool_reused;         /* dials served from the pool */
    atomic_uint_fast64_t upstream_retries;     /* outbound requests sent again (retry policy) */
    atomic_uint_fast64_t upstream_timeouts;    /* outbound requests past their RequestTimeout */
    atomic_uint_fast64_t h2up_conns;           /* shared HTTP/2 client connections open now */
    atomic_uint_fast64_t h2up_streams;         /* streams opened on them */
    atomic_size_t n_listeners;
    struct session_listener_stats listeners[SESSION_STATS_MAX_LISTENERS];
    struct session_listener_stats other_listener; /* when the table is full */
    atomic_size_t n_sources;
    struct session_source_stats sources[SESSION_STATS_MAX_SOURCES];
    struct session_source_stats other_source;
};

/*
 * One open session as the admin endpoint's /connections shows it: written on the worker's
 * thread into a caller-owned array by session_host_list().
 */
struct session_info {
    uint64_t id;
    int inbound;
    char peer_addr[64];                    /* the connecting client's address */
    char identity[SPIFFE_NAME_MAX * 2];    /* inbound: caller's SPIFFE ID; outbound: "" */
    char upstream[SESSION_STATS_NAME_MAX]; /* outbound: the upstream's destination name */
    char endpoint[300];                    /* outbound: the endpoint dialled */
    char state[16];
    uint64_t age_ms;
    uint64_t bytes_in, bytes_out;
};

#define SESSION_BUF_POOL           32 /* idle relay buffers a worker keeps for reuse */
#define SESSION_UPOOL_MAX          512
#define SESSION_UPOOL_PER_ENDPOINT 128
#define SESSION_UPOOL_IDLE_MS      30000
#define SESSION_UPOOL_BUCKETS      64   /* hash buckets of the pool and of its key memo */
#define SESSION_UPOOL_MEMO_MAX     1024 /* keys memoized per worker before starting over */

struct session_mux;
struct h2up_pool;

/* The carriers a worker hands its sessions (session_int.h): the L4 relay and the HTTP/1.1
 * codec. Set after session_host_init(); a NULL http1 serves protocol http at L4. */
struct session_muxes {
    const struct session_mux *relay;
    const struct session_mux *http1;
    const struct session_mux *http2; /* NULL: HTTP/2 callers are not told apart (mux_h1) */
};

/* What a worker lends its sessions. */
struct session_host {
    struct session_muxes muxes;
    struct loop *loop;
    struct snapshot *snap;    /* the worker's current snapshot (its own reference) */
    struct session *sessions; /* every live session (list head) */
    size_t n_sessions;
    unsigned index; /* worker number, for logs */
    /* authorize mode: questions go to the control thread's box <ask> (NULL: no one to ask,
     * such connections are refused); answers come back to this worker's <answers>. */
    struct authq_box *ask;
    struct authq_box *answers;
    struct session_stats *stats; /* owned; see session_host_init */
    /* Refusals are logged one per line at DEBUG and summarized at WARN at most once a second. */
    struct loop_timer refusal_summary;
    uint64_t refused_since_summary;
    /* Failed inbound handshakes: one WARN per source address a second, the rest at DEBUG and
     * summed up when the second is over (its timer runs while a source is tracked). */
    struct log_limit handshake_warns;
    struct loop_timer handshake_summary;
    /* Outbound requests answered 503 by connectd itself (session_warn_unavailable()): one
     * WARN per upstream a second, the rest at DEBUG and summed up likewise. */
    struct log_limit unavailable_warns;
    struct loop_timer unavailable_summary;
    /* relay buffers not in use: a connection waiting for data holds none */
    char *buf_pool[SESSION_BUF_POOL];
    size_t n_buf_pool;
    /* Outbound L7: idle upstream connections (verified, kept alive) that the next dial to the
     * same endpoint and identity takes instead of connecting; at most SESSION_UPOOL_MAX, and
     * SESSION_UPOOL_PER_ENDPOINT per endpoint, each for at most SESSION_UPOOL_IDLE_MS. */
    struct upool_group *upool[SESSION_UPOOL_BUCKETS]; /* by key hash; a group per key */
    size_t n_upool;
    struct loop_timer upool_sweep;
    /* Each pool key formatted once per (upstream, target, endpoint) of <upool_memo_snap>
     * (one reference, or NULL): dropped when the worker's snapshot changes or the pool
     * empties (at the sweep), and past SESSION_UPOOL_MEMO_MAX keys. */
    struct upool_memo *upool_memo[SESSION_UPOOL_BUCKETS];
    size_t n_upool_memo;
    struct snapshot *upool_memo_snap;
    /* HTTP/2 client connections the worker's sessions share (h2up.h): to upstream sidecars
     * (ALPN h2, keyed like the pool above plus "|h2") and h2c to the local application
     * ("app|<address>"). Swept with the pool above. */
    struct h2up_pool *h2up;
    /* Outbound L7 load balancing: per endpoint set and policy, the ring or maglev table and
     * the round-robin cursor and active request counts of this worker (session.c). */
    struct lb_entry *lb_cache;
    int stopping; /* session_close_all ran: nothing more is pooled */
    /* Memory goes back to the system once a crowd of sessions has left (session.c, on_trim):
     * the most sessions live since the last trim, and the timer that trims after they fell
     * to half of it. */
    size_t trim_peak;
    struct loop_timer trim;
};

/* Initialises <h> for worker <index> on <loop> (no sessions, no snapshot, zeroed stats). */
void session_host_init(struct session_host *h, struct loop *loop, unsigned index);
/* Stops the host's timers and frees its stats; every session must have ended. */
void session_host_dispose(struct session_host *h);
/* Frees the pooled relay buffers; after the loop has run the last sessions' deferred frees
 * (they give their buffers back to the pool). */
void session_host_free_buffers(struct session_host *h);

/*
 * Starts an inbound session on the accepted socket <fd> (ownership moves to the session),
 * with the host's current snapshot. The public listener's limits are checked first: a
 * connection whose descriptor number reaches into the descriptor reserve (limit.h), or over
 * max_inbound_connections, the new-connection rate, max_pending_handshakes or
 * max_pending_handshakes_per_source (for the address in <peer>), is closed at once, counted
 * and logged, and no session is created. Never fails: problems end the session through its
 * finish.
 */
void session_start_inbound(struct session_host *h, int fd, const char *peer);

/*
 * Bounds of the exposed listeners (Proxy.Expose), whose callers have no mesh identity: their
 * open connections over all workers and listeners, and how long one may stay idle when
 * local_idle_timeout_ms sets no shorter bound.
 */
#define SESSION_EXPOSE_MAX_CONNECTIONS 256
#define SESSION_EXPOSE_IDLE_MS         30000

/*
 * Starts a session of the exposed listener on <port> (plain, no TLS, no caller identity): an
 * HTTP/1.1 or HTTP/2 (h2c) codec by the first bytes, each request checked against the
 * listener's paths (stream_authorize). The descriptor reserve and
 * SESSION_EXPOSE_MAX_CONNECTIONS are checked first, as session_start_inbound() checks its
 * limits. Same ownership of <fd>.
 */
void session_start_exposed(struct session_host *h, int fd, const char *peer, int port);

/* Starts an outbound session for the upstream with key <upstream_key>. Same ownership and
 * the same admission check against that upstream's limits. */
void session_start_outbound(struct session_host *h, int fd, const char *peer,
                            const char *upstream_key);

/*
 * Re-evaluates every authorized inbound session against the host's current trust domain
 * settings and intention table, and ends the ones now refused. Returns how many were closed.
 * In authorize mode the trust domain is still checked here, and the agent is asked again
 * instead of the table (one question per session, none while one is out); a "no" that comes
 * back ends the session then. The worker calls it whenever snapshot_inbound_change() names a
 * difference, and periodically when configured.
 */
size_t session_reauthorize_all(struct session_host *h);

/*
 * Delivers the control thread's answer <r> (taken) to the session that asked, which goes on
 * to CONNECT_LOCAL or ends as denied; when that session is already gone it is just freed.
 * On the worker's thread, from its wake-up.
 */
void session_authorize_answer(struct authq_req *r);

/*
 * Copies up to <max> open sessions into <out>; returns how many there are in all (which may
 * exceed <max>). Worker thread only.
 */
size_t session_host_list(const struct session_host *h, struct session_info *out, size_t max);

/*
 * connectd drains: every session whose carrier can end gracefully is told to (an HTTP/2
 * connection gets GOAWAY, its open streams finish, then it closes); the others run on. The
 * shared HTTP/2 connections are drained too (GOAWAY, closed when their streams are done).
 */
void session_drain_all(struct session_host *h);

/* Ends every session at once with result SESSION_RES_SHUTDOWN. */
void session_close_all(struct session_host *h);

#endif
