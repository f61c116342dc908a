/*
 * route: an upstream's compiled route table, from its discovery chain (consul-api.md 9):
 * routes -> splits -> resolvers -> the upstream's targets, and the pure functions that walk
 * it for one request.
 *
 * A table is built once on the control thread (route_table_new), then only read: it is
 * immutable and reference-counted, shared by consecutive snapshots and by every worker
 * without locks, as intent.h's table. Its regexes are compiled once, at build (rx.h).
 *
 * A resolver names its targets by index into the target list its chain gave (primary first,
 * then failovers): the same order as the upstream's snap_target array in the snapshot built
 * from the same chain, so route_resolver()->targets[i] indexes snap_upstream.targets.
 *
 * mux_h1 routes each outbound request through its upstream's table (route_request()): the
 * matched route's split names the resolver whose targets the dial may use (session dial_rs).
 */
#ifndef CONNECTD_ROUTE_H
#define CONNECTD_ROUTE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "decode.h"
#include "hdrmatch.h"
#include "http.h"

struct rx;

/* One query parameter condition (Match.HTTP.QueryParam[]), compiled. */
struct route_query_cond {
    char *name; /* compared exactly with the raw name */
    size_t name_len;
    enum dec_query_match match;
    char *value; /* DEC_QUERY_EXACT: compared exactly with the raw value */
    size_t value_len;
    struct rx *rx; /* DEC_QUERY_REGEX when the pattern compiled, else NULL */
};

/* One split of a route. */
struct route_split {
    double weight;   /* percent, as compiled by Consul */
    uint32_t cum;    /* cumulative weight in 1/100 percent up to and including this split */
    size_t resolver; /* index into the table's resolvers */
    const struct dec_header_mods *request_headers, *response_headers; /* never NULL */
};

/*
 * The requests that took one route, by the class of the status answered ([0]: none was, [1]
 * 1xx ... [5] 5xx), the times they were sent again by the retry policy and the requests the
 * route's RequestTimeout or IdleTimeout cut. Every worker adds to them (relaxed atomics)
 * through the const table they share. Reference-counted: a table built from a changed chain
 * takes over, by route index, the counters of the table it replaces
 * (route_table_carry_stats()), so a Prometheus counter labelled with the upstream and the
 * route index never goes back while the process and the route live.
 */
struct route_stats {
    atomic_uint refs;
    atomic_uint_fast64_t requests[6];
    atomic_uint_fast64_t retries;
    atomic_uint_fast64_t timeouts;
};

struct route {
    size_t index;              /* position in the table */
    struct route_stats *stats; /* the table's, never NULL */
    const char *next_node;     /* the chain node it leads to ("" without a router) */
    enum dec_path_match path_match;
    const char *path;
    size_t path_len;
    int case_insensitive; /* PathExact / PathPrefix ignore ASCII case (as Envoy, not PathRegex) */
    struct rx *path_rx;   /* DEC_PATH_REGEX when the pattern compiled, else NULL */
    struct hdr_cond *headers; /* Match.HTTP.Header[] */
    size_t n_headers;
    struct route_query_cond *query;
    size_t n_query;
    char *const *methods; /* compared exactly */
    size_t n_methods;
    /* A regex of this route did not compile: the route never matches (fails closed). */
    int broken;
    /* The destination, as decoded (dec_chain_route): prefix rewrite, timeouts, retries,
     * header modifiers. */
    const struct dec_chain_route *def;
    struct route_split *splits;
    size_t n_splits;
    uint32_t total_weight; /* sum of the splits' weights in 1/100 percent; 0: none to pick */
};

struct route_resolver {
    const char *name;
    const size_t *targets; /* indices into the upstream's targets: primary, then failovers */
    size_t n_targets;
    uint32_t connect_timeout_ms; /* 0 = absent */
    uint32_t request_timeout_ms; /* 0 = absent */
    const struct dec_load_balancer *lb;
};

struct route_table;

/*
 * Builds a table from <chain>, taking its routes and resolvers (they are NULL in <chain>
 * afterwards; dispose the rest as usual). <what> names the table in logs (the upstream's
 * key). Never fails (allocation aborts): a regex that does not compile is logged once,
 * counted (route_table_broken) and makes its route never match.
 */
struct route_table *route_table_new(struct dec_chain *chain, const char *what);
struct route_table *route_table_ref(struct route_table *t);
/* Safe from any thread; NULL is fine. */
void route_table_unref(struct route_table *t);

size_t route_table_len(const struct route_table *t);
const struct route *route_table_route(const struct route_table *t, size_t i);
size_t route_table_resolvers(const struct route_table *t);
const struct route_resolver *route_table_resolver(const struct route_table *t, size_t i);
/* How many regexes of the table did not compile. */
size_t route_table_broken(const struct route_table *t);

/*
 * Makes the routes of <t>, a table just built and not yet shared, count on from the counters
 * of the same index in <prev> (the table <t> replaces for the same upstream; NULL: none),
 * which both then share. Routes past <prev>'s length keep their fresh counters; counters of
 * <prev>'s routes past <t>'s length go with <prev>. Control thread.
 */
void route_table_carry_stats(struct route_table *t, const struct route_table *prev);

/* One request as routing sees it; slices into the caller's buffers. */
struct route_req {
    struct http_slice method;          /* as sent, compared exactly */
    struct http_slice path;            /* without query or fragment */
    struct http_slice query;           /* after '?', without it (absent: p == NULL) */
    struct http_slice authority;       /* Host / :authority (absent: p == NULL) */
    const struct http_header *headers; /* as received (HTTP_HDR_DUP/DROP ones are skipped) */
    size_t nheaders;
};

/*
 * The first route of <t>, in order, all of whose conditions match <rq>, or NULL when none
 * does (Envoy answers 404 then; a compiled chain ends with a catch-all, so only a broken
 * catch-all leaves none). Conditions: the path (PathExact equal, PathPrefix a plain prefix,
 * both ignoring ASCII case with CaseInsensitive; PathRegex a full RE2-style match); every
 * header condition as Envoy's HeaderMatcher (names case-insensitive, several values joined
 * with ",", an absent header matches only an inverted Present, Invert negates the rest);
 * every query parameter condition on the first parameter of that name (raw, undecoded, as
 * Envoy); the method equal to one of Methods. A regex that did not compile or hit its match
 * limit makes its condition fail. Thread-safe on a shared table; may allocate briefly
 * (joined header values).
 */
const struct route *route_match(const struct route_table *t, const struct route_req *rq);

/*
 * The split of <r> that the draw <rand> (uniform over uint64_t) picks, each split with a
 * chance proportional to its weight (in 1/100 percent, as Envoy's weighted clusters); NULL
 * when every weight is 0. Pure.
 */
const struct route_split *route_split_pick(const struct route *r, uint64_t rand);

/*
 * Counts a request that took <r> and was answered <status> (0: none), after <retries> retries,
 * <timed_out> when its route's RequestTimeout or IdleTimeout cut it; any thread.
 */
void route_count(const struct route *r, int status, unsigned retries, int timed_out);

/*
 * PrefixRewrite: how many leading bytes of <path> (the path of a request <r> matched, without
 * its query) the route's PrefixRewrite replaces, as Envoy's prefix_rewrite: the matched prefix
 * for PathPrefix (the compiler's catch-all is PathPrefix "/"), the whole path for PathExact
 * and PathRegex, "/" for a route without a path condition. 0 when the route has no
 * PrefixRewrite, the rewrite holds a byte a request line cannot carry (a space, a control
 * byte, non-ASCII) or the path does not start with what it replaces (nothing to rewrite). Pure.
 */
size_t route_rewrite_len(const struct route *r, struct http_slice path);

/* How many fields route_headers_apply() may append for <mods> (its Add and Set entries). */
size_t route_headers_added(const struct dec_header_mods *mods);

/*
 * Applies one level of header modifiers (a route's or a split's RequestHeaders or
 * ResponseHeaders) to the field list <f> of *<n> fields, as Envoy applies Consul's: Remove
 * first, then Add (appended to what is there), then Set (replacing every field of that name,
 * one added just before included). Removed and replaced fields are flagged HTTP_HDR_HOP, which
 * both serializers leave out; appended fields are slices into <mods>, which must outlive the
 * head's serialization. Fields the message's framing or connection depend on (Host,
 * Content-Length, Transfer-Encoding, Connection and the other hop-by-hop ones, pseudo-fields)
 * are never touched, as Envoy refuses to modify them. <f> must have room for
 * route_headers_added(<mods>) more fields. Pure.
 */
void route_headers_apply(const struct dec_header_mods *mods, struct http_header *f, size_t *n);

/*
 * The fields <h> (<n> of them) of a request that took route <r> and split <sp> with their
 * header modifiers applied (RequestHeaders, or ResponseHeaders when <response>): the split's
 * level first, then the route's, as Envoy applies a weighted cluster's before its route's (so
 * a route's Set wins); see route_headers_apply(). Returns a new array the caller frees,
 * *<out_n> fields long (removed and replaced ones flagged HTTP_HDR_HOP, added ones slices
 * into the table), or NULL when <r> or <sp> is NULL or they modify nothing.
 */
struct http_header *route_headers_modified(const struct route *r, const struct route_split *sp,
                                           int response, const struct http_header *h, size_t n,
                                           size_t *out_n);

/*
 * One outbound request's retry policy and timeouts, from the route it took and the resolver
 * its split chose, as Consul configures Envoy's route (agent/xds/routes.go). mux_h1 keeps one
 * per request, mux_h2 one per stream: both read and spend it the same way.
 */
struct route_policy {
    /* RetryOn as bits 1 << DEC_RETRY_ON_IDX_*, RetryOnConnectFailure folded in. */
    unsigned retry_on;
    /* How many more times the request may be sent (Envoy's default of 1 when the route has a
     * policy without NumRetries); 0: no retry. */
    uint32_t retries_left;
    const uint16_t *retry_codes; /* RetryOnStatusCodes, in the table */
    size_t n_retry_codes;
    uint32_t timeout_ms; /* the whole request, retries included; 0: none */
    uint32_t idle_ms;    /* IdleTimeout; 0: none */
    unsigned backoffs;   /* back-offs waited so far (the exponent) */
};

#define ROUTE_RETRY_BIT(name) (1u << DEC_RETRY_ON_IDX_##name)
/* Envoy retries any reset before the answer's head, connection failures included, under 5xx,
 * gateway-error and reset; connect-failure covers connection failures only. */
#define ROUTE_RETRY_ON_RESET                                                                       \
    (ROUTE_RETRY_BIT(5XX) | ROUTE_RETRY_BIT(GATEWAY_ERROR) | ROUTE_RETRY_BIT(RESET))
#define ROUTE_RETRY_ON_CONNECT (ROUTE_RETRY_ON_RESET | ROUTE_RETRY_BIT(CONNECT_FAILURE))
/* Envoy's route timeout when neither the route nor the resolver sets one, and its retry
 * back-off: a random wait below a base that doubles with each retry, capped at ten times the
 * first. */
#define ROUTE_TIMEOUT_DEFAULT_MS 15000u
#define ROUTE_BACKOFF_BASE_MS    25u
#define ROUTE_BACKOFF_MAX_MS     250u

/*
 * The policy of a request that took route <r> (NULL: none, only the timeout applies) and
 * resolver <rs> (NULL: none): RequestTimeout of the route, else of the resolver, else
 * ROUTE_TIMEOUT_DEFAULT_MS; IdleTimeout; a retry policy when the route has NumRetries,
 * RetryOn, RetryOnConnectFailure or RetryOnStatusCodes. Pure.
 */
void route_policy_init(struct route_policy *p, const struct route *r,
                       const struct route_resolver *rs);

/*
 * Whether <p>'s RetryOn / RetryOnStatusCodes ask to retry an answer with <status> and head
 * fields <h> (<n>), as Envoy's retry state reads them: 5xx any 5xx, gateway-error 502/503/504,
 * retriable-4xx 409, envoy-ratelimited an x-envoy-ratelimited field, the gRPC ones the
 * grpc-status of the head (a Trailers-Only answer carries it there: cancelled 1,
 * deadline-exceeded 4, resource-exhausted 8, internal 13, unavailable 14), and the listed
 * status codes. Ignores retries_left. Pure.
 */
int route_policy_retries_status(const struct route_policy *p, int status,
                                const struct http_header *h, size_t n);

/*
 * Spends one retry of <p> (retries_left > 0) and returns its back-off: <rnd> (uniform) below
 * ROUTE_BACKOFF_BASE_MS doubled per back-off already waited, at most ROUTE_BACKOFF_MAX_MS.
 */
uint32_t route_policy_backoff_ms(struct route_policy *p, uint64_t rnd);

#endif
