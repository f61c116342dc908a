/*
 * session_int: what a session lends the code that carries its bytes once both legs are up:
 * the L4 byte relay (relay.c) and the HTTP/1.1 codec (mux_h1.c). Nothing else includes it;
 * the worker sees sessions only through session.h.
 *
 * A session has two ends: end[0] is the accepted connection, end[1] the one we dial (the local
 * application inbound, the upstream endpoint outbound). Exactly one end speaks TLS. Its state
 * machine is drawn at the top of session.c; relay.c and mux_h1.c each draw their own.
 */
#ifndef CONNECTD_SESSION_INT_H
#define CONNECTD_SESSION_INT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "limit.h"
#include "loop.h"
#include "alog.h"
#include "http.h"
#include "session.h"
#include "xprt.h"

enum session_state {
    S_ACCEPTED = 0,
    S_TLS_HANDSHAKE,
    S_AUTHORIZE,
    S_CONNECT_LOCAL,
    S_PICK_ENDPOINT,
    S_CONNECT,
    S_VERIFY_PEER,
    S_RELAY,
    S_HTTP, /* L7: mux_h1 owns both ends (outbound: but for a dial, PICK_ENDPOINT..) */
    S_DONE,
};

#define SESSION_RELAY_BUF_BYTES 16384

struct relay_buf {
    char *data;
    size_t off, len;
    /* RELAY: whether end[d] may hold bytes (an event came for it, or its last read did not
     * drain it), and what to wait for when it does not (relay.c). */
    unsigned char rd_ok;
    unsigned rd_wants;
};

struct mux_h1;
struct mux_h2;
struct h2up_conn;
struct route_resolver;
struct outlier;

/*
 * What carries a session's bytes once its legs are up, as HAProxy's muxes: relay.c (L4) and
 * mux_h1.c (HTTP/1.1). The worker hands the session code one of each (session_host.muxes), so
 * the session picks one by protocol without including them (they include this header).
 */
struct session_mux {
    const char *name;
    /* Takes over the session: relay, both legs up; mux_h1, the TLS end verified (it dials the
     * local application itself). May finish the session. */
    void (*start)(struct session *s);
    /* An end is ready (the session's I/O callback). */
    void (*advance)(struct session *s);
    /* The session's state timer fired. */
    void (*on_timer)(struct session *s);
    /* The session is finishing (any cause, <reason> as given to session_finish); NULL when
     * the carrier has nothing to close. It must not finish the session itself. */
    void (*on_finish)(struct session *s, const char *reason);
    /* Outbound L7: the end of session_dial_upstream() or session_dial_h2(); <why> NULL on
     * success. */
    void (*dialled)(struct session *s, const char *why);
    /* connectd drains (optional): stop taking requests, let the open ones finish, then end
     * the session (HTTP/2: GOAWAY). It may finish the session. */
    void (*drain)(struct session *s);
};

/* One request counted among the active requests of endpoint <i> in the worker's load-balancing
 * entry <e> (least_request; session.c); <e> NULL: none. */
struct session_lb_hold {
    struct lb_entry *e;
    size_t i;
};

struct session {
    struct session *next, *prev;
    struct session_host *host;
    /* The snapshot this session started with; an outbound L7 session moves to the worker's
     * current one between requests (session_follow_snapshot()), holding the first in <snap0>
     * (its admission state is where the session counts). One reference each. */
    struct snapshot *snap;
    struct snapshot *snap0;
    uint64_t id;
    int inbound;
    enum session_state state;
    /*
     * The fields every relayed read or write touches come first, together: with hundreds of
     * connections a session's memory is cold when its event comes (issue 11: at 256
     * connections the loads of io->want, s->state and s->carrier were the L4 relay's own
     * hottest instructions), so each cache line it spans costs a miss per request.
     */
    const struct session_mux *carrier;    /* RELAY, HTTP: what runs the session now */
    struct session_listener_stats *lstat; /* in host->stats; never NULL */
    struct xprt end[2];
    struct relay_buf buf[2];
    uint64_t bytes[2]; /* bytes[d]: read from end[d], written to end[1 - d] */
    uint64_t start_ms;
    uint64_t last_io_ms;          /* RELAY, HTTP: when a direction last made progress */
    struct limit_state *admitted; /* released by finish(); inside snap */
    struct limit_pending pending; /* inbound: a handshake slot of <admitted> until it ends */
    struct loop_timer timer;      /* the state's timeout; the idle timer in RELAY */
    struct loop_timer lifetime;
    struct loop_defer reap;
    char peer[64]; /* address of end[0]'s peer */
    /* inbound */
    /* The caller's SPIFFE ID as sent (NULL until read) and its parts; one allocation, owned by
     * <caller>: a connection carries these for its whole life, so they take only their size. */
    char *caller;
    const char *caller_partition, *caller_ns, *caller_service, *caller_trust_domain;
    struct authq_req *question; /* out with the control thread (authorize mode); not owned */
    /* authorize mode, L7: the agent's last answer about the caller, which each request obeys
     * (the agent answers per connection, not per request). */
    int agent_allowed;
    struct mux_h1 *mux;                  /* HTTP: the codec's state; owned, freed by its end */
    void (*mux_free)(struct mux_h1 *m);  /* how reap() frees <mux> */
    struct mux_h2 *mux2;                 /* HTTP over HTTP/2: mux_h2's state; owned */
    void (*mux2_free)(struct mux_h2 *m); /* how reap() frees <mux2> */
    /* Set when the handshake or the caller's identity failed: how finish() counts it. */
    int hs_failed;
    enum session_handshake_reason hs_reason;
    /* outbound */
    char *upstream_key;
    const struct snap_upstream *up; /* inside snap */
    unsigned char *tried;           /* one flag per endpoint of every target, in order */
    unsigned tries;
    int dial_pooled; /* the last session_dial_upstream() took a pooled (reused) connection */
    const struct snap_target *tgt; /* the target of the endpoint being dialled */
    const struct dec_endpoint *ep; /* the endpoint being dialled */
    char ep_name[300];
    /* Outbound L7 routing: the resolver the request's route and split chose (route.h), set by
     * the codec before session_dial_upstream() / session_dial_h2(): the dial picks only from
     * its targets, in its order (primary, then failovers), pooled connections included. NULL:
     * every target of the upstream in order (L4, or an upstream without a route table). */
    const struct route_resolver *dial_rs;
    /* Outbound L7 load balancing (lb.h), set by the codec before the dial
     * (session_lb_request()): the request's hash (lb_hashed 0: no policy produced one), an
     * endpoint chosen ahead of the dial (lb_pre_tgt NULL: none; session_lb_keeps()), and the
     * worker's state in which this session counts an active request (its entry NULL: none;
     * mux_h2 moves it to the stream the dial was for, session_lb_move()). */
    uint64_t lb_hash;
    int lb_hashed;
    const struct snap_target *lb_pre_tgt;
    size_t lb_pre_i;
    struct session_lb_hold lb_held;
    /* session_dial_h2(): the dial is for a shared HTTP/2 connection (ALPN h2), and its result,
     * borrowed from the worker's h2up pool until the carrier returns to the loop. */
    int dial_h2;
    struct h2up_conn *h2c;
    /* The dial holds a unit of up->outlier's pending count (limits.max_pending_requests) from
     * the moment it needs a new connection until carrier->dialled(); <dial_overflow> says
     * that dial ended at once because the limit was reached (the codec answers
     * STREAM_RES_UPSTREAM_OVERFLOW). */
    int dial_waiting;
    int dial_overflow;
    /* session_dial_h2() runs once per outbound stream: the name and h2up key of the last
     * endpoint it picked, kept (allocated on the first h2 dial, owned) so that picking it
     * again formats nothing. <snap> is held for the session's life, so the endpoint pointers
     * it names stay valid and unique. */
    struct session_h2memo *h2memo;
    /* An exposed listener's session (inbound, plain, no caller): its listener in <snap>. */
    const struct snap_expose *expose;
};

#define STAT_ADD(field, n) atomic_fetch_add_explicit(&(field), (n), memory_order_relaxed)
#define STAT_SUB(field, n) atomic_fetch_sub_explicit(&(field), (n), memory_order_relaxed)

/* The one way out (session.c): records <result>, logs, stops all I/O, frees later. */
void session_finish(struct session *s, enum session_result result, const char *reason);
/* Registers <mask> for end <i>; 0, or an error after which the session has finished. */
int session_want(struct session *s, int i, unsigned mask);
/* Moves to state <st> (traced). */
void session_set_state(struct session *s, enum session_state st);
/*
 * Outbound L7, between requests (nothing in flight, no dial under way): moves the session to
 * the worker's current snapshot, so that a router, splitter or resolver change and new
 * endpoints apply to the next request of a kept-alive application connection, as Envoy
 * applies a new route table to new requests. A kept-alive end[1] goes to the pool first (it
 * serves again while its endpoint, identity and TLS context still fit). Nothing moves when the
 * upstream left the snapshot or its protocol changed. Returns 1 when it moved (the codec then
 * resets what it knew of end[1]).
 */
int session_follow_snapshot(struct session *s);
/* Whether target <t> of the session's upstream is one the current dial may use (dial_rs). */
int session_dial_allows(const struct session *s, const struct snap_target *t);
/* Whether resolver <rs> (NULL: any) may use target <t> of the session's upstream. */
int session_resolver_allows(const struct session *s, const struct route_resolver *rs,
                            const struct snap_target *t);
/* Whether <rs> (NULL: none) chooses each request's endpoint by an explicit LoadBalancer
 * policy, so that a connection dialled or kept for one request does not serve another. Under
 * the default policy (power of two choices, session.c) a connection dialled for one waiting
 * HTTP/2 stream may serve another. */
int session_resolver_balances(const struct route_resolver *rs);
/*
 * Outbound L7, after dial_rs is set for a request: computes the request's hash by the
 * resolver's HashPolicies (lb.h) from its <headers> and raw <query> (p NULL: none) and the
 * application's address, for the dial that follows. A cookie policy that generated a value
 * leaves the Set-Cookie value the response must carry in <set_cookie> ("" when none, or when
 * it does not fit <len>).
 */
void session_lb_request(struct session *s, const struct http_header *headers, size_t nheaders,
                        struct http_slice query, char *set_cookie, size_t len);
/*
 * Whether the kept-alive end[1] serves the request session_lb_request() prepared: 1 without a
 * LoadBalancer policy (any allowed endpoint does), or when the policy picks end[1]'s endpoint;
 * else 0, and the dial that follows takes the endpoint the policy picked (end[1] is for the
 * pool then).
 */
int session_lb_keeps(struct session *s);
/* The request the session counted as active (least_request) is over; safe when none. */
void session_lb_release(struct session *s);
/*
 * mux_h2: the request the session's last dial chose an endpoint for is stream <h>'s, whose
 * own count (a request before, now over) is released first: each stream in flight counts as
 * one active request of its endpoint until session_lb_hold_release(), which must come before
 * the session finishes (the worker's entry may go after that).
 */
void session_lb_move(struct session *s, struct session_lb_hold *h);
/* Releases <h>'s count; safe when it holds none. */
void session_lb_hold_release(struct session_lb_hold *h);
/* The idle timeout of the session's side (local_idle_timeout_ms or the upstream's; 0 = off). */
uint32_t session_idle_timeout_ms(const struct session *s);
/* Relay buffers from the worker's pool: taken when a direction reads, given back when empty. */
void session_buf_take(struct session_host *h, struct relay_buf *b);
void session_buf_give_back(struct session_host *h, struct relay_buf *b);
/* The I/O callback of both ends (on_io in session.c), for an end a codec dials itself. */
void session_on_io(struct loop_io *io, unsigned events);
/* authorize mode: asks the agent about the caller again (a re-check), unless a question is
 * already out or there is no control thread; the answer updates agent_allowed (L7). */
void session_ask_again(struct session *s);
/* Counts a per-request authorization decision for the caller's service (L7). */
void session_count_request_decision(struct session *s, int allow);
/* The SPIFFE ID on the far side of the mesh hop: ours inbound, the expected identity of the
 * endpoint being (or last) dialled outbound. 0, -ENOENT when none is known, or -ENOSPC. */
int session_destination(const struct session *s, char *out, size_t len);
/* Room for what session_alog_rec() writes outside the record. */
struct session_alog_text {
    char local[64];
    char ident[SPIFFE_NAME_MAX * 2];
    char alpn[32];
};
/*
 * Fills the fields an access-log record of session <s> shares with its streams' records:
 * time, direction, source, destination (into <t>), upstream, endpoint, addresses, conn and
 * worker. The caller sets the rest (bytes, duration, result, reason, the request's fields).
 */
void session_alog_rec(struct session *s, struct alog_rec *r, struct session_alog_text *t);
/*
 * Outbound L7: dials the upstream for the codec that owns the session (end[1] closed):
 * PICK_ENDPOINT, CONNECT, TLS_HANDSHAKE (ALPN http/1.1) and VERIFY_PEER, with the next
 * endpoint on each failure, as an L4 session does. Meanwhile the session's state timer and
 * end[1] belong to the dial, and the codec must not touch them or want events on end[0]. It
 * ends with carrier->dialled(s, NULL) once end[1] is verified (state HTTP), or
 * carrier->dialled(s, why) when no endpoint is left; either may come before this returns.
 */
void session_dial_upstream(struct session *s);
/*
 * As session_dial_upstream(), but never with a pooled connection: the codec retries a request
 * that a reused connection lost before any byte of its answer (the keep-alive race), and
 * another connection idle as long may have been closed the same way.
 */
void session_redial_upstream(struct session *s);
/*
 * A retry by the request's retry policy (mux_h1): as session_redial_upstream() (or, when the
 * last dial was session_dial_h2(), as that one), but the endpoints this request was sent to
 * or failed on (s->tried, the last one, s->ep, included) are passed over while the dial's
 * targets have another one; when none is left, any may be picked again. Same rules and
 * ending as the dial it repeats.
 */
void session_redial_retry(struct session *s);
/*
 * Logs that stream <stream> of outbound session <s> is answered 503 by connectd itself
 * (<why>: no endpoint left and why, or what ended its connection before the answer), naming
 * the upstream and the endpoint last dialled. WARN for the first of an upstream in a second on
 * this worker, DEBUG for the rest, which are summed up in one WARN line when the second is
 * over, so a flood of refused requests costs a couple of lines a second.
 */
void session_warn_unavailable(struct session *s, uint64_t stream, const char *why);
/*
 * Outbound L7 over HTTP/2 (an http2 or grpc upstream): a shared connection to one of the
 * upstream's endpoints. An endpoint is picked as session_dial_upstream() picks one (primary
 * target first, random among its endpoints not tried yet); when the worker's h2up pool has a
 * connection to it that takes a stream (key: the endpoint, SNI and identity, plus "|h2"), that
 * one, else it is dialled like session_dial_upstream() does but offering ALPN h2, and the
 * verified end is adopted into the pool (a peer that selects another protocol counts as a
 * failed endpoint). The same rules for end[1], the state timer and end[0] apply meanwhile. Ends
 * with carrier->dialled(s, NULL) and s->h2c set (borrowed: open the stream on it before
 * returning to the loop), or carrier->dialled(s, why) when no endpoint is left; either may come
 * before this returns.
 */
void session_dial_h2(struct session *s);
/*
 * Outbound L7: how the request just answered went for its endpoint (s->tgt, s->ep), for the
 * upstream's passive health check: <failed> a 5xx answer (or a failure to reach it), else a
 * success. Logs an ejection it causes. No-op without an endpoint or outlier state.
 */
void session_outlier_report(struct session *s, int failed);
/* As session_outlier_report(), for endpoint <ep> of target <t> (mux_h2: each stream went to
 * its own endpoint; NULL: a no-op). */
void session_outlier_report_at(struct session *s, const struct snap_target *t,
                               const struct dec_endpoint *ep, int failed);
/*
 * Outbound L7, limits.max_concurrent_requests: a request is in flight from here until its
 * stream ends. 0 with *<active> the state to give the unit back to (the stream's st.active,
 * released by stream_finish(); NULL without outlier state), or -1 with <why> when that many
 * are in flight to the upstream over all workers already (answer 503 at once; Envoy's circuit
 * breaker, nothing is queued).
 */
int session_admit_request(struct session *s, struct outlier **active, char *why, size_t len);
/*
 * Outbound L7, limits.max_pending_requests, for a request that waits for a connection while
 * another dial of its session is under way (mux_h2's waiting streams; the dial counts itself,
 * dial_admit()): 0 with a unit taken (give it back with session_release_pending()), or -1 with
 * <why> when that many wait over all workers already (503 at once).
 */
int session_admit_pending(struct session *s, char *why, size_t len);
void session_release_pending(struct session *s);
/* Outbound L7: 1 when the endpoint of end[1] (s->tgt, s->ep) is ejected now, so the next
 * request should not ride its kept-alive connection (unless every endpoint of its target is). */
int session_endpoint_ejected(struct session *s);
/*
 * Where an inbound session reaches the local application: the registration's local service
 * (an address and port, or a unix socket path), or for an exposed listener's session that
 * listener's LocalPathPort on the local service address; and what the application speaks
 * there (enum proxycfg_protocol: the service's protocol, or the exposed path's).
 */
struct session_app {
    const char *address;
    int port;
    const char *socket_path; /* "" = address:port */
    int protocol;
};
void session_app(const struct session *s, struct session_app *out);
/* Starts a non-blocking connect to the application (session_app()) and names it in
 * s->ep_name ("addr:port" or "unix:path"); the descriptor, or -errno. */
int session_app_connect(struct session *s);

/* The key of the worker's shared h2c connection to the local application ("app|<address>"),
 * for the snapshot <s> started with; keeps the worker's pool sweep running, which drains such
 * connections once the snapshot names another address. */
void session_app_h2_key(const struct session *s, char *key, size_t len);
/* What session_app_h2_key() does to the sweep, for a codec that kept the key it gave for the
 * same snapshot (formatting it costs ~1k instructions per stream). */
void session_app_h2_key_used(const struct session *s);
/*
 * Outbound L7, the session finishing: end[1], an idle verified upstream connection with
 * nothing in flight, goes to the worker's pool (or is closed when the pool is full, the worker
 * stopping or the snapshot changed its TLS context); end[1] is closed on return either way.
 * The next session_dial_upstream() to the same endpoint and identity takes it.
 */
void session_pool_put(struct session *s);
/*
 * As session_pool_put(), for a connection the codec took over from end[1] after an earlier
 * dial: <x>, verified as endpoint <ep> (named <ep_name>) of target <tgt> of the session's
 * upstream, goes to the pool or is closed; <x> is closed (fd -1) on return either way.
 */
void session_pool_put_conn(struct session *s, struct xprt *x, const struct snap_target *tgt,
                           const struct dec_endpoint *ep, const char *ep_name);

#endif
