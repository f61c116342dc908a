/*
 * stream: one HTTP request and its response on an inbound L7 connection (mux_h1 runs them one
 * at a time, in order): what is known about it, the one per-request authorization seam, and
 * its one way out, stream_finish(), which writes the request's access-log record and counts it.
 *
 * Worker thread only. A stream lives inside its codec's state; it owns no memory.
 */
#ifndef CONNECTD_STREAM_H
#define CONNECTD_STREAM_H

#include <stddef.h>
#include <stdint.h>

#include "http.h"
#include "outlier.h"
#include "spiffe.h"

struct route;
struct session;

/*
 * How a stream ended. Columns: the name (STREAM_RES_<name>), the result label of its log line
 * and access-log record, and the status connectd answers on its own for it (0: the status is
 * the application's, or none could be sent).
 */
#define STREAM_RESULTS(X)                                                                          \
    X(OK, "ok", 0)                                 /* the application's response went through */   \
    X(UPGRADED, "upgraded", 0)                     /* 101: the connection became a tunnel */       \
    X(DENIED, "denied", 403)                       /* intentions (or the agent) said no */         \
    X(BAD_REQUEST, "bad_request", 400)             /* malformed or smuggling-prone head or body */ \
    X(HEADERS_TOO_LARGE, "headers_too_large", 431) /* max_request_headers_kb, or 100 fields */     \
    X(HEADERS_TIMEOUT, "headers_timeout", 408)     /* request_headers_timeout_ms */                \
    X(EXPECTATION_FAILED, "expectation_failed", 417) /* an Expect other than 100-continue */       \
    X(REDIRECT, "redirect", 307)         /* UNESCAPE_AND_REDIRECT: to the unescaped path */        \
    X(RATE_LIMITED, "rate_limited", 429) /* service-defaults RateLimits.InstanceLevel */           \
    X(NO_ROUTE, "no_route", 404)         /* outbound: no route of the upstream's chain matched */  \
    X(NOT_FOUND, "not_found", 404)       /* an exposed listener: not one of its paths */           \
    X(LOCAL_CONNECT_ERROR, "local_connect_error", 503) /* the application refused or timed out */  \
    X(UPSTREAM_CONNECT_ERROR, "upstream_connect_error", 503) /* outbound: no endpoint answered */  \
    X(UPSTREAM_OVERFLOW, "upstream_overflow",                                                      \
      503)                                 /* outbound: the upstream's limits (no queue) */        \
    X(LOCAL_RESET, "local_reset", 503)     /* the application closed before its answer's head */   \
    X(LOCAL_TIMEOUT, "local_timeout", 504) /* local_request_timeout_ms */                          \
    X(UPSTREAM_TIMEOUT, "upstream_timeout", 504)       /* outbound: the route's RequestTimeout */  \
    X(STREAM_IDLE_TIMEOUT, "stream_idle_timeout", 408) /* outbound: the route's IdleTimeout */     \
    X(BAD_RESPONSE, "bad_response", 502)               /* the application's answer was broken */   \
    X(ABORTED, "aborted", 0)                           /* a side went away mid-stream */

enum stream_result {
#define X(name, label, status) STREAM_RES_##name,
    STREAM_RESULTS(X)
#undef X
        STREAM_RES_COUNT
};

/* Label of a stream result; "aborted" outside the table. */
const char *stream_result_name(enum stream_result r);
/* The status connectd answers with for result <r>, or 0. */
int stream_result_status(enum stream_result r);
/* The body (or, to a gRPC caller, the grpc-message) of connectd's own answer for result <r>:
 * Envoy's words where a client may look for them; "" for none. */
const char *stream_local_body(enum stream_result r);

#define STREAM_METHOD_MAX     32
#define STREAM_AUTHORITY_MAX  256
#define STREAM_PATH_MAX       1024
#define STREAM_REQUEST_ID_MAX 128

struct stream {
    uint64_t seq;        /* on its connection, from 1 */
    uint64_t start_ms;   /* when its head was complete (or the connection's error found) */
    int minor_version;   /* the request's HTTP/1.<minor> */
    int status;          /* the final status sent to the caller; 0 until then */
    uint64_t bytes_in;   /* request bytes read from the caller (head and body) */
    uint64_t bytes_out;  /* response bytes written to the caller (head and body) */
    int done;            /* stream_finish() ran */
    int h2;              /* carried over HTTP/2 (mux_h2) */
    char grpc_status[8]; /* gRPC: the grpc-status answered; "" when none was */
    /* Outbound: the route the request took and the resolver its split named (route.h; in the
     * session's snapshot), for the record and the route's counters; NULL when none. */
    const struct route *route;
    const char *resolver;
    /* Outbound: the upstream whose in-flight count (limits.max_concurrent_requests) this
     * request holds a unit of; stream_answered() gives it back. NULL when none. */
    struct outlier *active;
    unsigned retries; /* outbound: times the request was sent again by its retry policy */
    int timed_out;    /* outbound: the route's RequestTimeout or IdleTimeout cut it */
    /* Copies of the head's values for the log (cut to fit; the forwarded head is whole). Last,
     * since they are most of the struct (1.4 KiB): stream_begin() clears everything before
     * them and only their first bytes, one stream per request. */
    char method[STREAM_METHOD_MAX];
    char authority[STREAM_AUTHORITY_MAX];
    char path[STREAM_PATH_MAX];
    char request_id[STREAM_REQUEST_ID_MAX];
};

/* Starts stream number <seq> at <now_ms>; <req> may be NULL (a head that failed to parse). */
void stream_begin(struct stream *st, uint64_t seq, uint64_t now_ms, const struct http_request *req);

/* Sets st->request_id to a fresh random version-4 UUID (36 characters). */
void stream_new_request_id(struct stream *st);

/* A request as the per-request authorization sees it, whatever codec carried it. */
struct stream_req {
    struct http_slice method;
    /* The target: a path with its query when <origin>; else "*" (OPTIONS) or an authority
     * (CONNECT), matched as it is and never normalized. */
    struct http_slice target;
    int origin;
    struct http_slice authority; /* Host / :authority; absent: p == NULL */
    struct http_header *headers; /* normalization may flag some HTTP_HDR_DROP */
    size_t nheaders;
    int quiet_allow; /* an allowed request needs no <why>: it is left empty (saves a
                      * formatted description of the deciding intention per request) */
};

enum stream_verdict {
    STREAM_ALLOW,        /* forward it, with the normalized target */
    STREAM_DENY,         /* 403 RBAC: access denied */
    STREAM_REFUSE,       /* 400: request normalization refuses it */
    STREAM_REDIRECT,     /* 307 to the normalized target (PathWithEscapedSlashesAction) */
    STREAM_RATE_LIMITED, /* 429: over the service's instance-level rate limit */
    STREAM_NOT_FOUND,    /* 404: an exposed listener's request for a path it does not expose */
};

/* The result a mux answers a verdict other than STREAM_ALLOW with. */
enum stream_result stream_verdict_result(enum stream_verdict v);

/*
 * THE per-request authorization: what the caller of session <s> may do with request <rq>,
 * decided on the worker's current snapshot (s->host->snap), so an intention or mesh entry
 * change applies to the next request of an open connection. First the mesh entry's request
 * normalization (pathnorm_request(): the path, then header names with '_'), then the
 * intentions with their Permissions (intent_eval_http()) on the normalized path. <out>
 * (<cap> >= PATHNORM_OUT_MAX(rq->target.len) bytes) receives the target to forward (or to
 * redirect to), *<out_len> its length; st->path becomes the normalized path for the log.
 * <why> (<len> bytes) names the deciding intention and permission, or the refusal.
 *
 * In authorize mode the agent answers per caller, not per request: its latest answer about
 * the caller (asked per connection and again on every intention change, see session.c)
 * decides every request, after normalization.
 *
 * A request allowed so far then takes a token from the service's rate limits (snapshot
 * rates, shared by every worker) for its normalized path: none left is STREAM_RATE_LIMITED.
 * A denied or refused request takes none.
 *
 * A session of an exposed listener (s->expose) has no caller identity: the listener's path
 * list in the worker's current snapshot stands in for the intentions. A request in origin
 * form whose path (without the query) is exactly one of them is STREAM_ALLOW, forwarded as
 * sent (no normalization: the path already equals one the operator wrote); anything else is
 * STREAM_NOT_FOUND, counted in the listener's expose_refused. No rate limit applies.
 */
enum stream_verdict stream_authorize(struct session *s, struct stream *st, struct stream_req *rq,
                                     char *out, size_t cap, size_t *out_len, char *why, size_t len);

/* Room for stream_xfcc()'s value. */
#define STREAM_XFCC_MAX (SPIFFE_NAME_MAX * 4 + 128)

/*
 * Writes the X-Forwarded-Client-Cert value for every request of inbound session <s> into
 * <out>: Envoy's SANITIZE_SET with the fields Consul asks for, By (our SPIFFE ID), Hash (the
 * hex SHA-256 of the caller's leaf) and URI (the caller's SPIFFE ID). A URI carries no ';',
 * ',' or '"' (spiffe_parse accepted it).
 */
void stream_xfcc(struct session *s, char *out, size_t len);

/*
 * Outbound: the answer is complete (the upstream's, or connectd's own) and its last bytes are
 * about to go to the caller: the request stops counting against limits.max_concurrent_requests
 * now, not once they are out, since a caller that reads them may send its next request at
 * once, to another worker. Called again, or by stream_finish(), it does nothing.
 */
void stream_answered(struct stream *st);

/*
 * The one way out of a stream: logs it (DEBUG), writes its access-log record, and counts it
 * in the listener's requests by status class and its duration histogram. <why> may be NULL.
 * A second call does nothing.
 */
void stream_finish(struct session *s, struct stream *st, enum stream_result r, const char *why);

#endif
