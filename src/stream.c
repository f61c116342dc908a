/*
 * stream: one request on an inbound L7 connection.
 *
 *   HEAD -> AUTHORIZE -+-> allow -> (CONNECT) -> EXCHANGE -> DONE (the application's status)
 *                      |                           '-> 502 / 504 / aborted -> DONE
 *                      '-> deny -> LOCAL (403 "RBAC: access denied") -> DONE
 *   HEAD -> 400 / 408 / 417 / 431 -> LOCAL -> DONE (and the connection closes)
 *   any -> DONE through stream_finish(), the one door out
 *
 * The phases are driven by mux_h1.c, which owns the connection and its buffers and runs one
 * stream at a time; this file keeps what a stream is (its identity for the log), how it is
 * authorized, and how it ends.
 */
#include "stream.h"
#include "alog.h"
#include "h1parse.h"
#include "intent.h"
#include "limit.h"
#include "log.h"
#include "pathnorm.h"
#include "route.h"
#include "session_int.h"
#include "spiffe.h"
#include "tls.h"
#include "util.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

static const struct {
    const char *label;
    int status;
} results[STREAM_RES_COUNT] = {
#define X(name, label, status) [STREAM_RES_##name] = {label, status},
    STREAM_RESULTS(X)
#undef X
};

const char *stream_result_name(enum stream_result r)
{
    return (unsigned)r < ARRAY_SIZE(results) ? results[r].label : "aborted";
}

int stream_result_status(enum stream_result r)
{
    return (unsigned)r < ARRAY_SIZE(results) ? results[r].status : 0;
}

const char *stream_local_body(enum stream_result r)
{
    switch (r) {
    case STREAM_RES_DENIED:
        return "RBAC: access denied";
    case STREAM_RES_LOCAL_CONNECT_ERROR:
    case STREAM_RES_UPSTREAM_CONNECT_ERROR:
        return "upstream connect error or disconnect/reset before headers. reset reason: "
               "connection failure";
    case STREAM_RES_LOCAL_RESET:
        return "upstream connect error or disconnect/reset before headers. reset reason: "
               "connection termination";
    case STREAM_RES_UPSTREAM_OVERFLOW:
        return "upstream connect error or disconnect/reset before headers. reset reason: "
               "overflow";
    case STREAM_RES_LOCAL_TIMEOUT:
    case STREAM_RES_UPSTREAM_TIMEOUT:
        return "upstream request timeout";
    case STREAM_RES_STREAM_IDLE_TIMEOUT:
        return "stream timeout";
    case STREAM_RES_BAD_RESPONSE:
        return "upstream connect error or disconnect/reset before headers. reset reason: "
               "protocol error";
    case STREAM_RES_HEADERS_TOO_LARGE:
        return "request header fields too large";
    case STREAM_RES_HEADERS_TIMEOUT:
        return "request timeout";
    case STREAM_RES_EXPECTATION_FAILED:
        return "expectation failed";
    case STREAM_RES_RATE_LIMITED:
        return "local_rate_limited";
    case STREAM_RES_REDIRECT:
    case STREAM_RES_NO_ROUTE:  /* Envoy's route_not_found answer has no body */
    case STREAM_RES_NOT_FOUND: /* Envoy's "route not found" has no body either */
        return "";
    default:
        return "bad request";
    }
}

enum stream_result stream_verdict_result(enum stream_verdict v)
{
    switch (v) {
    case STREAM_DENY:
        return STREAM_RES_DENIED;
    case STREAM_REDIRECT:
        return STREAM_RES_REDIRECT;
    case STREAM_RATE_LIMITED:
        return STREAM_RES_RATE_LIMITED;
    case STREAM_NOT_FOUND:
        return STREAM_RES_NOT_FOUND;
    default:
        return STREAM_RES_BAD_REQUEST;
    }
}

/* Takes a token for <path> from the snapshot's rate limits: STREAM_ALLOW or
 * STREAM_RATE_LIMITED, <why> naming the limit when it is the latter. */
static enum stream_verdict rate_limit(const struct snapshot *now, struct http_slice path, char *why,
                                      size_t len)
{
    if (limit_rates_none(now->rates))
        return STREAM_ALLOW;
    char lim[320];
    size_t n = 0;
    while (n < path.len && path.p[n] != '?')
        n++;
    if (limit_rates_take(now->rates, path.p, n, limit_now_us(), lim, sizeof(lim)))
        return STREAM_ALLOW;
    snprintf(why, len, "%s", lim);
    atomic_fetch_add_explicit(&now->inbound_limit->rate_limited, 1, memory_order_relaxed);
    return STREAM_RATE_LIMITED;
}

/* Copies slice <v> into <out> (<cap> bytes), cut to fit and NUL-terminated. */
static void copy_slice(char *out, size_t cap, struct http_slice v)
{
    size_t n = v.len < cap - 1 ? v.len : cap - 1;
    if (n > 0)
        memcpy(out, v.p, n);
    out[n] = '\0';
}

/* stream_begin() clears the fields before the text buffers; nothing may follow them. */
_Static_assert(sizeof(struct stream) - offsetof(struct stream, request_id) <
                   STREAM_REQUEST_ID_MAX + 8,
               "the text buffers are the last members of struct stream");

void stream_begin(struct stream *st, uint64_t seq, uint64_t now_ms, const struct http_request *req)
{
    memset(st, 0, offsetof(struct stream, method));
    st->method[0] = st->authority[0] = st->path[0] = st->request_id[0] = '\0';
    st->seq = seq;
    st->start_ms = now_ms;
    st->minor_version = 1;
    if (req == NULL)
        return;
    st->minor_version = req->minor_version;
    copy_slice(st->method, sizeof(st->method), req->method_name);
    copy_slice(st->authority, sizeof(st->authority), req->host);
    copy_slice(st->path, sizeof(st->path), req->target);
    for (size_t i = 0; i < req->nheaders; i++)
        if (h1_slice_eq(req->headers[i].name, "x-request-id") && req->headers[i].value.len)
            copy_slice(st->request_id, sizeof(st->request_id), req->headers[i].value);
}

/* The 16 hex digits of <w>, most significant first. */
static void hex16(char *o, uint64_t w)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 15; i >= 0; i--) {
        o[i] = hex[w & 0xfu];
        w >>= 4;
    }
}

void stream_new_request_id(struct stream *st)
{
    uint64_t a = util_rand(), b = util_rand();
    /* Version 4 (random) and the RFC 9562 variant bits. */
    a = (a & ~0xf000ull) | 0x4000ull;
    b = (b & ~(3ull << 62)) | (2ull << 62);
    /* 8-4-4-4-12 hex digits: the 32 written a nibble at a time with no test in the loop, then
     * grouped, since one is made per request: snprintf() cost ten times as much, a digit at a
     * time with the dashes tested in the loop ~650 instructions, two digits a byte ~420. */
    char d[32];
    hex16(d, a);
    hex16(d + 16, b);
    char *o = st->request_id;
    _Static_assert(sizeof(st->request_id) >= 37, "room for a UUID");
    memcpy(o, d, 8);
    o[8] = '-';
    memcpy(o + 9, d + 8, 4);
    o[13] = '-';
    memcpy(o + 14, d + 12, 4);
    o[18] = '-';
    memcpy(o + 19, d + 16, 4);
    o[23] = '-';
    memcpy(o + 24, d + 20, 12);
    o[36] = '\0';
}

/* An exposed listener's allowlist (see stream_authorize()). */
static enum stream_verdict expose_allow(struct session *s, struct stream *st,
                                        const struct stream_req *rq, char *out, size_t cap,
                                        size_t *out_len, char *why, size_t len)
{
    const struct snap_expose *e = snapshot_expose(s->host->snap, s->expose->port);
    size_t n = rq->target.len < cap ? rq->target.len : cap;
    if (n > 0)
        memcpy(out, rq->target.p, n);
    *out_len = n;
    copy_slice(st->path, sizeof(st->path), (struct http_slice){out, n});
    size_t plen = 0;
    while (plen < rq->target.len && rq->target.p[plen] != '?')
        plen++;
    for (size_t i = 0; rq->origin && e != NULL && i < e->n_paths; i++) {
        if (strlen(e->paths[i]) == plen && memcmp(e->paths[i], rq->target.p, plen) == 0) {
            if (len > 0)
                why[0] = '\0';
            return STREAM_ALLOW;
        }
    }
    STAT_ADD(s->lstat->expose_refused, 1);
    snprintf(why, len, "%s exposes no such path", s->expose->name);
    return STREAM_NOT_FOUND;
}

enum stream_verdict stream_authorize(struct session *s, struct stream *st, struct stream_req *rq,
                                     char *out, size_t cap, size_t *out_len, char *why, size_t len)
{
    const struct snapshot *now = s->host->snap;
    if (s->expose != NULL)
        return expose_allow(s, st, rq, out, cap, out_len, why, len);
    struct http_slice path = rq->target;
    int redirect = 0;
    if (rq->origin) {
        const char *reason = NULL;
        size_t plen = 0;
        ssize_t n = pathnorm_request(&now->mesh_http, rq->target, rq->headers, rq->nheaders, out,
                                     cap, &plen, &redirect, &reason);
        if (n < 0) {
            snprintf(why, len, "request normalization: %s", reason);
            return STREAM_REFUSE;
        }
        *out_len = (size_t)n;
        path = (struct http_slice){out, plen};
    } else {
        size_t n = rq->target.len < cap ? rq->target.len : cap;
        if (n > 0)
            memcpy(out, rq->target.p, n);
        *out_len = n;
    }
    copy_slice(st->path, sizeof(st->path), (struct http_slice){out, *out_len});
    if (redirect) {
        snprintf(why, len, "escaped slashes: redirected to the unescaped path");
        return STREAM_REDIRECT;
    }
    struct intent_http_req hr = {
        .method = rq->method,
        .path = path,
        .authority = rq->authority,
        .headers = rq->headers,
        .nheaders = rq->nheaders,
    };
    struct intent_decision d =
        intent_eval_http(now->intents, s->caller_partition, s->caller_ns, s->caller_service, &hr);
    if (now->cfg.authorize_with_agent) {
        /* The agent answers per caller, not per request: its latest answer about this
         * connection's caller (asked again whenever the intentions change) decides. While it
         * disagrees with the L4 reading of the intentions here one of the two views is stale
         * (the agent's own copy can lag, and the control thread takes its answer after a few
         * re-asks), so it is asked again, one question at a time, until they agree. */
        struct intent_decision l4 =
            intent_eval(now->intents, s->caller_partition, s->caller_ns, s->caller_service);
        if (l4.allow != s->agent_allowed)
            session_ask_again(s);
        /* An intention here that denies the caller is newer than an allow of the agent's
         * that contradicts it (the control thread refuses such an allow once the agent
         * answers: authorize.c): it fails closed now, not one agent round trip later. */
        if (s->agent_allowed && !l4.allow && (l4.rule != NULL || l4.matched != NULL)) {
            snprintf(why, len, "agent authorize: allowed, but an intention here denies");
            return STREAM_DENY;
        }
        snprintf(why, len, "agent authorize: %s", s->agent_allowed ? "allowed" : "denied");
        return s->agent_allowed ? rate_limit(now, path, why, len) : STREAM_DENY;
    }
    if (d.allow && rq->quiet_allow) {
        /* Quiet only about the allowing intention: the rate limit still takes its token. */
        if (len > 0)
            why[0] = '\0';
        return rate_limit(now, path, why, len);
    }
    intent_describe(&d, why, len);
    return d.allow ? rate_limit(now, path, why, len) : STREAM_DENY;
}

static void count(struct session *s, const struct stream *st, uint64_t dur_ms)
{
    static const uint64_t bounds[] = SESSION_DURATION_BUCKETS_MS;
    struct session_listener_stats *l = s->lstat;
    int cls = st->status >= 100 && st->status <= 599 ? st->status / 100 : 0;
    STAT_ADD(l->requests[cls], 1);
    size_t b = 0;
    while (b < ARRAY_SIZE(bounds) && dur_ms > bounds[b])
        b++;
    STAT_ADD(l->duration_buckets[b], 1);
    STAT_ADD(l->duration_sum_ms, dur_ms);
}

void stream_answered(struct stream *st)
{
    if (st->active != NULL) {
        outlier_release(st->active, OUTLIER_LIMIT_CONCURRENT);
        st->active = NULL;
    }
}

void stream_finish(struct session *s, struct stream *st, enum stream_result r, const char *why)
{
    if (st->done)
        return;
    st->done = 1;
    /* least_request counts the request active until here; mux_h2's streams, several in flight
     * at once, each hold their own count (session_lb_move()), and the session's belongs to a
     * dial under way for another stream. */
    if (s->mux2 == NULL)
        session_lb_release(s);
    stream_answered(st);
    uint64_t dur = loop_now_ms(s->host->loop) - st->start_ms;
    count(s, st, dur);
    if (st->route != NULL)
        route_count(st->route, st->status, st->retries, st->timed_out);
    const char *proto = st->h2 ? "HTTP/2" : st->minor_version == 0 ? "HTTP/1.0" : "HTTP/1.1";
    LOG_DEBUG("conn=%llu stream=%llu %s src=%s %s %s %s status=%d result=%s reason=%s "
              "bytes_in=%llu bytes_out=%llu duration_ms=%llu request_id=%s",
              (unsigned long long)s->id, (unsigned long long)st->seq, s->inbound ? "in" : "out",
              LOG_ESC(s->inbound ? s->caller : s->peer), LOG_ESC(st->method), LOG_ESC(st->path),
              proto, st->status, stream_result_name(r), LOG_ESC(why),
              (unsigned long long)st->bytes_in, (unsigned long long)st->bytes_out,
              (unsigned long long)dur, LOG_ESC(st->request_id));
    if (!alog_enabled())
        return;
    struct session_alog_text t;
    struct alog_rec rec;
    session_alog_rec(s, &rec, &t);
    rec.bytes_in = st->bytes_in;
    rec.bytes_out = st->bytes_out;
    rec.duration_ms = dur;
    rec.result = stream_result_name(r);
    rec.reason = why;
    rec.protocol = proto;
    rec.method = st->method;
    rec.authority = st->authority[0] ? st->authority : NULL;
    rec.path = st->path;
    rec.request_id = st->request_id[0] ? st->request_id : NULL;
    rec.status = st->status;
    rec.grpc_status = st->grpc_status[0] ? st->grpc_status : NULL;
    rec.stream = st->seq;
    if (st->route != NULL) {
        rec.route = st->route->index;
        rec.resolver = st->resolver != NULL ? st->resolver : "";
    }
    rec.retries = st->retries;
    alog_write(&rec);
}

void stream_xfcc(struct session *s, char *out, size_t len)
{
    const struct proxy_cfg *c = &s->snap->cfg;
    char ours[SPIFFE_NAME_MAX * 2] = "", hash[80] = "";
    if (spiffe_format_service(ours, sizeof(ours), s->snap->trust_domain, c->partition, c->ns,
                              c->datacenter, c->service) < 0)
        ours[0] = '\0';
    if (tls_conn_peer_cert_sha256_hex(s->end[0].tls, hash, sizeof(hash)) < 0)
        hash[0] = '\0';
    snprintf(out, len, "By=%s;Hash=%s;URI=%s", ours, hash, s->caller);
}
