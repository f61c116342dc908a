/*
 * session: the inbound and outbound state machines and the relay between their two legs.
 *
 *   inbound:  ACCEPTED -> TLS_HANDSHAKE -> AUTHORIZE -> CONNECT_LOCAL -> RELAY -> DONE
 *                                          |  (waits here for the agent in authorize mode)
 *                                          '--- protocol http ---> HTTP (mux_h1) -> DONE
 *   outbound: ACCEPTED -> PICK_ENDPOINT -> CONNECT -> TLS_HANDSHAKE -> VERIFY_PEER -> RELAY -> DONE
 *                             ^------- next endpoint on connect/handshake/identity failure ---'
 *             '--- upstream protocol http/http2/grpc ---> HTTP (mux_h1) --(per dial)-->
 * PICK_ENDPOINT ... VERIFY_PEER --> HTTP, or no endpoint left --> HTTP (a 503 to that request)
 *   exposed:  ACCEPTED -> HTTP (plain, no caller; mux_h1 | mux_h2 by the first bytes; the
 *             listener's paths instead of the intentions, 404 else) -> DONE
 * any state -> DONE on error, timeout, deny or shutdown (through session_finish(), the one door
 * out)
 *
 * A session has two ends: end[0] is the accepted connection, end[1] the one we dial (the local
 * application inbound, the upstream endpoint outbound). Exactly one end speaks TLS. AUTHORIZE
 * (with the intention table), PICK_ENDPOINT and VERIFY_PEER are instantaneous: they are passed
 * through inside one call. In authorize mode AUTHORIZE waits, with no I/O interest and a
 * timer, for the control thread's answer to a question posted to it (authq.h).
 *
 * Once both legs are up the session hands its ends to what carries the bytes: relay.c (the
 * L4 byte relay, drawn there) for tcp and for every outbound session; for an inbound session
 * whose snapshot says protocol http, mux_h1.c (the HTTP/1.1 codec, drawn there) right after
 * the caller's identity is verified: authorization then happens per request, and the codec
 * dials the local application itself. An outbound session whose upstream's protocol is http
 * goes to mux_h1 (HTTP/1.x from the application) or mux_h2 (its h2c) by its first bytes; the
 * codec asks for an upstream connection when a request needs one (session_dial_upstream),
 * and the states above run that dial with their endpoint retries. Ends are
 * xprt.h's: the same read/write/shutdown for the plain and the TLS end.
 *
 * Limits and timeouts: admission (open-connection count and new-connection rate, shared by all
 * workers through the snapshot's limit_state) is checked before a session exists, so a refused
 * connection costs one close(). In RELAY the state timer becomes the idle timer: the relay only
 * notes the time of its last progress and the timer, when it fires, re-arms itself for the
 * rest of the idle period, so moving bytes never touches the timer heap. A second timer bounds
 * the whole life of the session (max_connection_lifetime_ms).
 */
#include "session.h"
#include "session_int.h"
#include "alog.h"
#include "h2.h"
#include "h2up.h"
#include "lb.h"
#include "limit.h"
#include "log.h"
#include "outlier.h"
#include "sock.h"
#include "spiffe.h"
#include "util.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_ENDPOINT_TRIES 5
#define REFUSAL_SUMMARY_MS 1000
#define HANDSHAKE_WARN_MS  1000
/* on_trim: after a crowd of at least this many sessions, this long after half had left */
#define TRIM_MIN_PEAK 64
#define TRIM_DELAY_MS 1000

static const char *const state_names[] = {
    "ACCEPTED", "TLS_HANDSHAKE", "AUTHORIZE", "CONNECT_LOCAL", "PICK_ENDPOINT",
    "CONNECT",  "VERIFY_PEER",   "RELAY",     "HTTP",          "DONE",
};

static atomic_uint_fast64_t next_session_id = 1;

static void on_timer(struct loop_timer *t);
static void on_trim(struct loop_timer *t);
static void on_lifetime(struct loop_timer *t);
static void advance(struct session *s);
static void try_next_endpoint(struct session *s, const char *why);
static void dial_end(struct session *s, const char *why);

/* ---- lifecycle ---- */

void session_set_state(struct session *s, enum session_state st)
{
    LOG_TRACE("conn=%llu %s -> %s", (unsigned long long)s->id, state_names[s->state],
              state_names[st]);
    s->state = st;
}

/*
 * Relay buffers: taken when a direction reads, given back when it has nothing buffered and
 * its source has nothing to read, so an idle connection holds no buffer (OpenSSL releases its
 * own then too: SSL_MODE_RELEASE_BUFFERS) and a busy worker cycles through a few.
 */
void session_buf_take(struct session_host *h, struct relay_buf *b)
{
    if (b->data == NULL)
        b->data =
            h->n_buf_pool > 0 ? h->buf_pool[--h->n_buf_pool] : xmalloc(SESSION_RELAY_BUF_BYTES);
}

void session_buf_give_back(struct session_host *h, struct relay_buf *b)
{
    if (b->data == NULL || b->len != 0)
        return;
    if (h->n_buf_pool < SESSION_BUF_POOL)
        h->buf_pool[h->n_buf_pool++] = b->data;
    else
        free(b->data);
    b->data = NULL;
}

static void reap(struct loop_defer *d)
{
    struct session *s = (struct session *)((char *)d - offsetof(struct session, reap));
    for (int i = 0; i < 2; i++) {
        xprt_close(s->host->loop, &s->end[i]);
        s->buf[i].len = 0;
        session_buf_give_back(s->host, &s->buf[i]);
    }
    if (s->mux != NULL)
        s->mux_free(s->mux);
    if (s->mux2 != NULL)
        s->mux2_free(s->mux2);
    free(s->caller);
    snapshot_unref(s->snap);
    snapshot_unref(s->snap0);
    free(s->upstream_key);
    free(s->tried);
    free(s->h2memo);
    free(s);
}

static void expected_identity(const struct session *s, const struct snap_target *t,
                              const struct dec_endpoint *ep, struct spiffe_id *id);

int session_destination(const struct session *s, char *out, size_t len)
{
    const struct proxy_cfg *c = &s->snap->cfg;
    if (s->inbound && s->snap->trust_domain != NULL && s->snap->trust_domain[0] != '\0')
        return spiffe_format_service(out, len, s->snap->trust_domain, c->partition, c->ns,
                                     c->datacenter, c->service) >= 0
                   ? 0
                   : -ENOSPC;
    if (!s->inbound && s->up != NULL && s->tgt != NULL && s->ep != NULL) {
        struct spiffe_id want_id;
        expected_identity(s, s->tgt, s->ep, &want_id);
        return spiffe_format(out, len, &want_id) >= 0 ? 0 : -ENOSPC;
    }
    return -ENOENT;
}

void session_alog_rec(struct session *s, struct alog_rec *r, struct session_alog_text *t)
{
    t->local[0] = '\0';
    if (s->end[0].fd >= 0)
        sock_local_name(s->end[0].fd, t->local, sizeof(t->local));
    int have_ident = session_destination(s, t->ident, sizeof(t->ident)) == 0;
    t->alpn[0] = '\0';
    if (s->inbound && s->end[0].tls != NULL &&
        tls_conn_alpn(s->end[0].tls, t->alpn, sizeof(t->alpn)) <= 0)
        t->alpn[0] = '\0';
    *r = (struct alog_rec){
        .time_ms = util_wall_ms(),
        .direction = s->inbound ? "inbound" : "outbound",
        .source = s->inbound ? s->caller : s->peer,
        .destination = have_ident ? t->ident : NULL,
        .upstream = s->inbound || s->up == NULL ? NULL : s->up->cfg->destination_name,
        .endpoint = s->ep_name[0] ? s->ep_name : NULL,
        .local_addr = t->local[0] ? t->local : NULL,
        .remote_addr = s->peer,
        .alpn = t->alpn[0] ? t->alpn : NULL,
        .listener = s->expose != NULL ? s->expose->name : NULL,
        .conn = s->id,
        .worker = s->host->index,
    };
}

/* Writes the session's access-log line (alog.h). */
static void access_log(struct session *s, enum session_result result, const char *reason,
                       const char *upstream, uint64_t dur_ms)
{
    struct session_alog_text t;
    struct alog_rec r;
    session_alog_rec(s, &r, &t);
    r.upstream = upstream;
    r.bytes_in = s->bytes[0];
    r.bytes_out = s->bytes[1];
    r.duration_ms = dur_ms;
    r.result = session_result_name(result);
    r.reason = reason;
    alog_write(&r);
}

/* The key failed handshakes are limited by: the peer's address without its port. */
static void source_key(const struct session *s, char *key, size_t len)
{
    snprintf(key, len, "%s", s->peer);
    char *colon = strrchr(key, ':');
    if (colon != NULL && colon != key)
        *colon = '\0';
}

static void on_handshake_summary(struct loop_timer *t);
static void on_unavailable_summary(struct loop_timer *t);

/*
 * The level of a failed handshake's WARN line: WARN for the first from its source in a
 * second, DEBUG for the rest, which the summary timer adds up. When an earlier window of the
 * source ended with lines held back, <note> says how many, on the line written now.
 */
static enum log_level handshake_warn_level(struct session *s, char *note, size_t len)
{
    struct session_host *h = s->host;
    char key[LOG_LIMIT_KEY_MAX];
    uint64_t before = 0;
    source_key(s, key, sizeof(key));
    int pass = log_limit_pass(&h->handshake_warns, key, loop_now_ms(h->loop), &before);
    if (!loop_timer_armed(&h->handshake_summary))
        loop_timer_start(h->loop, &h->handshake_summary, HANDSHAKE_WARN_MS);
    if (before != 0)
        snprintf(note, len, " (suppressed %llu earlier failed handshake line(s) from %s)",
                 (unsigned long long)before, key);
    return pass ? LOG_LEVEL_WARN : LOG_LEVEL_DEBUG;
}

/*
 * Ends an inbound session whose TLS handshake failed or whose caller's certificate carries no
 * acceptable identity, counted under <r> in connectd_handshake_failures_total.
 */
static void fail_inbound(struct session *s, enum session_handshake_reason r,
                         enum session_result result, const char *why)
{
    s->hs_failed = 1;
    s->hs_reason = r;
    session_finish(s, result, why);
}

/* The result table (session.h) as data, indexed by enum session_result. */
static const struct {
    const char *label;
    enum log_level level;
    const char *close_kind;
} results[SESSION_RES_COUNT] = {
#define X(name, label, level, close_kind, http_status)                                             \
    [SESSION_RES_##name] = {label, LOG_LEVEL_##level, close_kind},
    SESSION_RESULTS(X)
#undef X
};

const char *session_result_name(enum session_result r)
{
    return (unsigned)r < ARRAY_SIZE(results) ? results[r].label : "error";
}

const char *session_result_close_kind(enum session_result r)
{
    return (unsigned)r < ARRAY_SIZE(results) ? results[r].close_kind : NULL;
}

/*
 * The one way out: records the result, logs the session's line, stops all I/O and queues the
 * memory to be freed after the current dispatch round.
 */
void session_finish(struct session *s, enum session_result result, const char *reason)
{
    if (s->state == S_DONE)
        return;
    if ((unsigned)result >= ARRAY_SIZE(results))
        result = SESSION_RES_ERROR;
    /* A codec ends the stream it is in the middle of (its record comes before the
     * connection's). */
    if ((s->state == S_RELAY || s->state == S_HTTP || s->mux != NULL || s->mux2 != NULL) &&
        s->carrier != NULL && s->carrier->on_finish != NULL)
        s->carrier->on_finish(s, reason);
    /* Here, not in reap(): the worker's load-balancing state may be gone by then. */
    session_lb_release(s);
    struct session_host *h = s->host;
    uint64_t dur = loop_now_ms(h->loop) - s->start_ms;
    const char *upstream = s->inbound ? NULL : s->up ? s->up->cfg->destination_name : NULL;
    /* With an access log the line for a session that ended well is DEBUG: the access log
     * already has it. Failures stay WARN. */
    enum log_level lvl = results[result].level;
    if (lvl == LOG_LEVEL_INFO && alog_enabled())
        lvl = LOG_LEVEL_DEBUG;
    STAT_ADD(h->stats->results[result], 1);
    /* An inbound session that ends inside the handshake failed it (a timeout, or anything not
     * classified where it happened); a probe never started one. */
    if (s->inbound && !s->hs_failed && s->state == S_TLS_HANDSHAKE && result != SESSION_RES_PROBE) {
        s->hs_failed = 1;
        s->hs_reason = result == SESSION_RES_TIMEOUT ? SESSION_HS_TIMEOUT : SESSION_HS_OTHER;
    }
    char note[192] = "";
    if (s->hs_failed) {
        STAT_ADD(h->stats->handshake_failures[s->hs_reason], 1);
        if (lvl == LOG_LEVEL_WARN)
            lvl = handshake_warn_level(s, note, sizeof(note));
    }
    /* Every value a peer or the agent chose is escaped (log.h): a certificate URI with a
     * newline must not write a line of its own. */
    LOG_AT(lvl,
           "conn=%llu %s peer=%s src=%s dst=%s%s%s result=%s reason=%s bytes_in=%llu "
           "bytes_out=%llu duration_ms=%llu worker=%u%s",
           (unsigned long long)s->id, s->inbound ? "in" : "out", s->peer,
           s->inbound ? LOG_ESC(s->caller) : s->peer,
           LOG_ESC(s->inbound      ? s->snap->cfg.service
                   : s->ep_name[0] ? s->ep_name
                                   : NULL),
           s->inbound ? "" : " upstream=", s->inbound ? "" : LOG_ESC(upstream),
           results[result].label, LOG_ESC(reason), (unsigned long long)s->bytes[0],
           (unsigned long long)s->bytes[1], (unsigned long long)dur, h->index, note);
    STAT_SUB(s->lstat->active, 1);
    if (alog_enabled())
        access_log(s, result, reason, upstream, dur);
    session_set_state(s, S_DONE);
    loop_timer_stop(h->loop, &s->timer);
    if (s->question != NULL) {
        /* The control thread still holds it and never reads <owner>: mark it orphaned; the
         * worker frees it when it comes back. */
        s->question->owner = NULL;
        s->question = NULL;
    }
    loop_timer_stop(h->loop, &s->lifetime);
    if (s->admitted != NULL) {
        limit_pending_release(s->admitted, &s->pending);
        limit_release(s->admitted);
    }
    if (s->dial_waiting) {
        s->dial_waiting = 0;
        outlier_release(s->up->outlier, OUTLIER_LIMIT_PENDING);
    }
    /* Silenced, not unregistered: reap() closes them at the end of this round, and the close
     * takes them out of epoll (no EPOLL_CTL_DEL each). */
    for (int i = 0; i < 2; i++)
        if (s->end[i].fd >= 0)
            loop_io_mute(h->loop, &s->end[i].io);
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        h->sessions = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    h->n_sessions--;
    if (!loop_timer_armed(&h->trim) && (h->n_sessions == 0 || (h->trim_peak >= TRIM_MIN_PEAK &&
                                                               h->n_sessions <= h->trim_peak / 2)))
        loop_timer_start(h->loop, &h->trim, TRIM_DELAY_MS);
    loop_defer(h->loop, &s->reap, reap);
}

/*
 * A crowd of sessions that has left leaves its memory with the allocator: the SSL objects,
 * sessions and buffers of a thousand connections (~20 MB) were freed into the worker's arena,
 * interleaved with what still lives, and glibc gives back only the free top of a thread's
 * heap, so the sidecar stayed at its high-water mark for good. Once the live sessions have
 * fallen to half of their peak (of at least TRIM_MIN_PEAK), and a second later so that the
 * deferred frees have run, malloc_trim() returns every free page of every arena
 * (MADV_DONTNEED). Steady traffic never gets here (the peak follows the live count), and
 * churn of small numbers never does either. A worker that has had no session for that second
 * also frees its pooled relay buffers (up to SESSION_BUF_POOL x 16 KiB, kept since its
 * busiest moment); the next connection after the pause takes fresh ones.
 */
static void on_trim(struct loop_timer *t)
{
    struct session_host *h = t->data;
    int crowd_left = h->trim_peak >= TRIM_MIN_PEAK && h->n_sessions <= h->trim_peak / 2;
    int pooled = h->n_sessions == 0 && h->n_buf_pool > 0;
    if (pooled)
        session_host_free_buffers(h);
    if (crowd_left)
        h->trim_peak = h->n_sessions;
    if (crowd_left || pooled)
        util_trim_heap();
}

const char *session_handshake_reason_name(enum session_handshake_reason r)
{
    static const char *const names[] = {
#define X(name, label) label,
        SESSION_HANDSHAKE_REASONS(X)
#undef X
    };
    return (unsigned)r < ARRAY_SIZE(names) ? names[r] : "other";
}

/*
 * The stats slot named <name>, claimed on first use. Only this worker writes the table: the
 * name is written before the count is published (release), so readers never see a half name.
 */
static struct session_listener_stats *listener_stats(struct session_host *h, const char *name,
                                                     int inbound)
{
    struct session_stats *st = h->stats;
    size_t n = atomic_load_explicit(&st->n_listeners, memory_order_relaxed);
    for (size_t i = 0; i < n; i++)
        if (st->listeners[i].inbound == inbound && strcmp(st->listeners[i].name, name) == 0)
            return &st->listeners[i];
    if (n == SESSION_STATS_MAX_LISTENERS)
        return &st->other_listener;
    snprintf(st->listeners[n].name, sizeof(st->listeners[n].name), "%s", name);
    st->listeners[n].inbound = inbound;
    atomic_store_explicit(&st->n_listeners, n + 1, memory_order_release);
    return &st->listeners[n];
}

/* The stats slot of source service <name>, claimed on first use (same publication as above). */
static struct session_source_stats *source_stats(struct session_host *h, const char *name)
{
    struct session_stats *st = h->stats;
    struct session_source_stats *src = NULL;
    size_t n = atomic_load_explicit(&st->n_sources, memory_order_relaxed);
    for (size_t i = 0; i < n && src == NULL; i++)
        if (strcmp(st->sources[i].name, name) == 0)
            src = &st->sources[i];
    if (src == NULL && n == SESSION_STATS_MAX_SOURCES) {
        src = &st->other_source;
    } else if (src == NULL) {
        src = &st->sources[n];
        snprintf(src->name, sizeof(src->name), "%s", name);
        atomic_store_explicit(&st->n_sources, n + 1, memory_order_release);
    }
    return src;
}

/* Counts a connection's authorization decision for source service <name>. */
static void count_decision(struct session_host *h, const char *name, int allow)
{
    struct session_source_stats *src = source_stats(h, name);
    if (allow)
        STAT_ADD(src->allow, 1);
    else
        STAT_ADD(src->deny, 1);
}

void session_count_request_decision(struct session *s, int allow)
{
    if (s->caller_service == NULL)
        return; /* an exposed listener's caller: no service to count it for */
    struct session_source_stats *src = source_stats(s->host, s->caller_service);
    if (allow)
        STAT_ADD(src->req_allow, 1);
    else
        STAT_ADD(src->req_deny, 1);
}

static struct session *session_new(struct session_host *h, int fd, const char *peer, int inbound,
                                   struct limit_state *admitted, const char *listener)
{
    struct session *s = xcalloc(1, sizeof(*s));
    s->lstat = listener_stats(h, listener, inbound);
    STAT_ADD(s->lstat->active, 1);
    STAT_ADD(s->lstat->total, 1);
    s->host = h;
    s->snap = snapshot_ref(h->snap);
    s->admitted = admitted;
    s->id = atomic_fetch_add(&next_session_id, 1);
    s->inbound = inbound;
    s->start_ms = loop_now_ms(h->loop);
    snprintf(s->peer, sizeof(s->peer), "%s", peer);
    s->end[0].fd = fd;
    s->end[1].fd = -1;
    loop_io_init(&s->end[0].io, fd, session_on_io, s);
    loop_timer_init(&s->timer, on_timer, s);
    loop_timer_init(&s->lifetime, on_lifetime, s);
    if (s->snap->cfg.max_lifetime_ms != 0)
        loop_timer_start(h->loop, &s->lifetime, s->snap->cfg.max_lifetime_ms);
    s->next = h->sessions;
    if (h->sessions != NULL)
        h->sessions->prev = s;
    h->sessions = s;
    if (++h->n_sessions > h->trim_peak)
        h->trim_peak = h->n_sessions;
    return s;
}

/* Registers <want> for end <i>; a failure to do so ends the session. */
int session_want(struct session *s, int i, unsigned mask)
{
    if (s->state == S_DONE)
        return ERR_SHUTDOWN;
    int rc = loop_io_want(s->host->loop, &s->end[i].io, mask);
    if (rc != 0) {
        session_finish(s, SESSION_RES_ERROR, util_strerror(rc));
        return rc;
    }
    return 0;
}

/* ---- the TLS end ---- */

static int tls_end(const struct session *s)
{
    return s->inbound ? 0 : 1;
}

/* Runs the handshake on the TLS end; returns 0 when complete, -EAGAIN while waiting (events
 * registered), or an error after which the caller decides (the session is still alive). */
static int step_handshake(struct session *s)
{
    int i = tls_end(s);
    int rc = tls_handshake(s->end[i].tls);
    if (rc == -EAGAIN) {
        if (session_want(s, i, tls_conn_wants(s->end[i].tls)) != 0)
            return ERR_SHUTDOWN;
        return -EAGAIN;
    }
    return rc;
}

/* ---- inbound ---- */

static void start_connect_local(struct session *s)
{
    const struct proxy_cfg *c = &s->snap->cfg;
    int unix_sock = c->local_socket_path[0] != '\0';
    int fd = unix_sock ? sock_connect_unix(c->local_socket_path)
                       : sock_connect(c->local_address, c->local_port);
    if (fd < 0) {
        char why[400];
        if (unix_sock)
            snprintf(why, sizeof(why), "connect unix %s: %s", c->local_socket_path,
                     util_strerror(fd));
        else
            snprintf(why, sizeof(why), "connect %s:%d: %s", c->local_address, c->local_port,
                     util_strerror(fd));
        session_finish(s, SESSION_RES_LOCAL_CONNECT_ERROR, why);
        return;
    }
    if (unix_sock)
        snprintf(s->ep_name, sizeof(s->ep_name), "unix:%s", c->local_socket_path);
    else
        snprintf(s->ep_name, sizeof(s->ep_name), "%s:%d", c->local_address, c->local_port);
    s->end[1].fd = fd;
    loop_io_init(&s->end[1].io, fd, session_on_io, s);
    session_set_state(s, S_CONNECT_LOCAL);
    loop_timer_start(s->host->loop, &s->timer, c->local_connect_timeout_ms);
    session_want(s, 0, 0);
    session_want(s, 1, LOOP_WRITE);
}

/*
 * Whether the host's current snapshot refuses the caller's trust domain; fills <why>. Checked
 * on admission and again whenever the inputs change, in either authorization mode: the agent
 * is never asked about a caller of a foreign trust domain.
 */
static int trust_domain_refused(const struct session *s, const char *prefix, char *why, size_t len)
{
    const struct snapshot *now = s->host->snap;
    if (!now->cfg.verify_trust_domain || strcasecmp(s->caller_trust_domain, now->trust_domain) == 0)
        return 0;
    snprintf(why, len, "%strust domain %s is not %s", prefix, s->caller_trust_domain,
             now->trust_domain);
    return 1;
}

/*
 * Whether the session is served per request (protocol http in the snapshot it started with,
 * and a worker that lends the HTTP/1.1 codec): its caller is then authorized per request and
 * an L4 deny becomes a 403 on each request rather than a closed connection.
 */
static int serves_http(const struct session *s)
{
    return s->inbound && s->snap->cfg.protocol != PROTO_TCP && s->host->muxes.http1 != NULL;
}

/*
 * Protocol sniffing for an L7 session whose handshake negotiated no ALPN (a caller such as an
 * L4 sidecar relaying its application's bytes), and for an outbound http session (the local
 * application, plain): the first bytes decide, HTTP/2's connection preface for mux_h2 (or the
 * L4 relay outbound), anything else for mux_h1. At most H2_PREFACE_LEN bytes are read, into
 * buf[0], where the chosen codec takes them from. A caller that sends nothing within
 * request_headers_timeout_ms is handed to mux_h1, which answers 408 or times out idle.
 */
static void pick_endpoint(struct session *s);

static void sniff_done(struct session *s, int h2)
{
    loop_timer_stop(s->host->loop, &s->timer);
    int h2_upstream = !s->inbound && s->up->protocol != PROTO_HTTP;
    if (h2_upstream && h2 && s->host->muxes.http2 != NULL) {
        /* An http2/grpc upstream and the application's h2c: mux_h2 carries each stream over
         * a shared HTTP/2 connection (session_dial_h2). */
        LOG_DEBUG("conn=%llu out: HTTP/2 prior knowledge to an HTTP/2 upstream",
                  (unsigned long long)s->id);
        s->host->muxes.http2->start(s);
        return;
    }
    if (h2_upstream && !h2 && s->host->muxes.http1 != NULL) {
        /* HTTP/1 to an http2/grpc upstream: mux_h1 translates, each request a stream on a
         * shared HTTP/2 connection (session_dial_h2). */
        LOG_DEBUG("conn=%llu out: HTTP/1 to an HTTP/2 upstream, translated",
                  (unsigned long long)s->id);
        s->host->muxes.http1->start(s);
        return;
    }
    if (!s->inbound && !h2_upstream && h2 && s->host->muxes.http2 != NULL) {
        /* The application's h2c to an http upstream: mux_h2 turns each stream into an
         * HTTP/1.1 exchange on a connection of its own (session_dial_upstream, ALPN
         * http/1.1), as the upstream's sidecar serves an http service's mesh hop. */
        LOG_DEBUG("conn=%llu out: HTTP/2 prior knowledge to an http upstream, translated",
                  (unsigned long long)s->id);
        s->host->muxes.http2->start(s);
        return;
    }
    if (h2_upstream || (!s->inbound && h2)) {
        /* A worker that lends no codec for the other protocol: relayed at L4 as bytes,
         * offering no ALPN (the upstream's sidecar tells the protocol by the first bytes). */
        LOG_DEBUG("conn=%llu out: %s to an %s upstream, relayed at L4", (unsigned long long)s->id,
                  h2 ? "HTTP/2 prior knowledge" : "not HTTP/2",
                  h2_upstream ? "http2/grpc" : "http");
        pick_endpoint(s); /* the relay becomes the carrier once the upstream is verified */
        return;
    }
    const struct session_mux *m = h2 ? s->host->muxes.http2 : s->host->muxes.http1;
    LOG_DEBUG("conn=%llu %s: %s by its first bytes", (unsigned long long)s->id,
              s->inbound ? "in" : "out", m->name);
    m->start(s);
}

static void sniff_advance(struct session *s)
{
    struct relay_buf *b = &s->buf[0];
    if (b->data == NULL)
        session_buf_take(s->host, b);
    for (;;) {
        int v = h2_preface_check(b->data, b->len);
        if (v != 0) {
            sniff_done(s, v > 0);
            return;
        }
        ssize_t n = xprt_read(&s->end[0], b->data + b->len, H2_PREFACE_LEN - b->len);
        if (n > 0) {
            b->len += (size_t)n;
            s->bytes[0] += (uint64_t)n;
            STAT_ADD(s->lstat->bytes_in, (uint64_t)n);
            s->last_io_ms = loop_now_ms(s->host->loop);
        } else if (n == 0) {
            session_finish(s, SESSION_RES_OK, "closed before its first request");
            return;
        } else if (n == -EAGAIN) {
            session_want(s, 0, xprt_wants(&s->end[0], LOOP_READ));
            return;
        } else {
            session_finish(s, SESSION_RES_ERROR, xprt_error(&s->end[0], (int)n));
            return;
        }
    }
}

static void sniff_on_timer(struct session *s)
{
    sniff_done(s, 0);
}

static const struct session_mux sniff_mux = {
    .name = "sniff",
    .start = sniff_advance,
    .advance = sniff_advance,
    .on_timer = sniff_on_timer,
};

static void start_sniff(struct session *s)
{
    s->carrier = &sniff_mux;
    session_set_state(s, S_HTTP);
    s->last_io_ms = loop_now_ms(s->host->loop);
    loop_timer_start(s->host->loop, &s->timer, s->snap->cfg.request_headers_timeout_ms);
    sniff_advance(s);
}

/*
 * Hands an L7 session to its codec: by the ALPN protocol its handshake selected ("h2":
 * mux_h2, "http/1.1": mux_h1), else by its first bytes (sniff_mux). Any L7 protocol may get
 * either: an http service may be called over HTTP/2 and a grpc one over HTTP/1.1.
 */
static void start_l7(struct session *s)
{
    char alpn[32];
    int n = tls_conn_alpn(s->end[0].tls, alpn, sizeof(alpn));
    if (s->host->muxes.http2 == NULL || (n > 0 && strcmp(alpn, "h2") != 0)) {
        s->host->muxes.http1->start(s);
    } else if (n > 0) {
        s->host->muxes.http2->start(s);
    } else {
        start_sniff(s);
    }
}

/* Posts a question about the session's caller to the control thread. */
static void post_question(struct session *s, int recheck)
{
    struct session_host *h = s->host;
    char serial[256];
    if (tls_conn_peer_serial(s->end[0].tls, serial, sizeof(serial)) < 0)
        serial[0] = '\0';
    struct authq_req *r = authq_req_new(h->snap->cfg.service, s->caller, serial);
    r->cache_ms = h->snap->cfg.authorize_cache_ms;
    r->recheck = recheck;
    r->reply = h->answers;
    r->owner = s;
    s->question = r;
    authq_box_post(h->ask, r);
}

void session_ask_again(struct session *s)
{
    if (s->question != NULL || s->host->ask == NULL)
        return;
    STAT_ADD(s->host->stats->counters.reauthorized, 1);
    post_question(s, 1);
}

/* authorize mode: posts the question and waits (no I/O interest) for the answer or the timer. */
static void ask_agent(struct session *s)
{
    struct session_host *h = s->host;
    if (h->ask == NULL) {
        session_finish(s, SESSION_RES_ERROR, "authorize mode, but no control thread to ask");
        return;
    }
    loop_io_want(h->loop, &s->end[0].io, 0);
    loop_timer_start(h->loop, &s->timer, h->snap->cfg.authorize_timeout_ms);
    post_question(s, 0);
}

void session_authorize_answer(struct authq_req *r)
{
    struct session *s = r->owner;
    if (s != NULL && r->recheck && s->state == S_HTTP) {
        /* L7: the answer decides the connection's next requests, not the connection. */
        s->question = NULL;
        s->agent_allowed = r->allowed;
    } else if (s != NULL && r->recheck) {
        /* a re-check of an open connection: it goes on unless the agent now says no */
        s->question = NULL;
        if (!r->allowed) {
            char why[300];
            snprintf(why, sizeof(why), "re-authorization: agent authorize: %s", r->reason);
            session_finish(s, SESSION_RES_DENIED, why);
            STAT_ADD(s->host->stats->counters.reauthorize_closed, 1);
        }
    } else if (s != NULL) {
        s->question = NULL;
        loop_timer_stop(s->host->loop, &s->timer);
        char why[600];
        if (serves_http(s)) {
            /* Each request obeys the answer (stream_authorize), counted per request. */
            s->agent_allowed = r->allowed;
            if (trust_domain_refused(s, "", why, sizeof(why)))
                fail_inbound(s, SESSION_HS_TRUST_DOMAIN, SESSION_RES_BAD_IDENTITY, why);
            else
                start_l7(s);
            authq_req_free(r);
            return;
        }
        count_decision(s->host, s->caller_service, r->allowed);
        if (!r->allowed) {
            snprintf(why, sizeof(why), "agent authorize: %s", r->reason);
            session_finish(s, SESSION_RES_DENIED, why);
        } else if (trust_domain_refused(s, "", why, sizeof(why))) {
            /* The trust domain or its check changed while the question was out (the sweep
             * skips connections still in AUTHORIZE). */
            fail_inbound(s, SESSION_HS_TRUST_DOMAIN, SESSION_RES_BAD_IDENTITY, why);
        } else {
            LOG_DEBUG("conn=%llu in authorized %s by the agent: %s", (unsigned long long)s->id,
                      LOG_ESC(s->caller), r->reason);
            start_connect_local(s);
            /* The agent's allow contradicts the intentions here: ask again as for an open
             * connection after a change, so that it ends once the agent agrees. */
            if (r->disputed && s->state != S_DONE && s->host->ask != NULL) {
                LOG_DEBUG("conn=%llu in the agent's allow for %s differs from the intentions "
                          "here; re-checking it",
                          (unsigned long long)s->id, s->caller);
                STAT_ADD(s->host->stats->counters.reauthorized, 1);
                post_question(s, 1);
            }
        }
    }
    authq_req_free(r);
}

/*
 * AUTHORIZE: the peer's first URI SAN must be a service SPIFFE ID of our trust domain, and the
 * host's current intention table (not the one this session started with) must allow it.
 */
/* Keeps the caller's URI (<n> bytes) and, when <id> is given, its parts. */
static void set_caller(struct session *s, const char *uri, size_t n, const struct spiffe_id *id)
{
    const char *part[4] = {"", "", "", ""};
    if (id != NULL) {
        part[0] = id->partition;
        part[1] = id->ns;
        part[2] = id->service;
        part[3] = id->trust_domain;
    }
    size_t len[4], total = n + 1;
    for (int i = 0; i < 4; i++)
        total += (len[i] = strlen(part[i])) + 1;
    char *p = xmalloc(total);
    free(s->caller);
    s->caller = p;
    memcpy(p, uri, n);
    p[n] = '\0';
    p += n + 1;
    const char **dst[4] = {&s->caller_partition, &s->caller_ns, &s->caller_service,
                           &s->caller_trust_domain};
    for (int i = 0; i < 4; i++) {
        memcpy(p, part[i], len[i] + 1);
        *dst[i] = p;
        p += len[i] + 1;
    }
}

static void authorize(struct session *s)
{
    struct spiffe_id id;
    char why[600], uri[SPIFFE_NAME_MAX * 2];
    session_set_state(s, S_AUTHORIZE);
    int n = tls_conn_peer_uri(s->end[0].tls, uri, sizeof(uri));
    if (n < 0) {
        fail_inbound(s, n == ERR_NO_URI ? SESSION_HS_NO_URI : SESSION_HS_BAD_IDENTITY,
                     SESSION_RES_BAD_IDENTITY, util_strerror(n));
        return;
    }
    int uris = tls_conn_peer_uri_count(s->end[0].tls);
    if (uris > 1) {
        /* The first decides for Consul, any one for Envoy's RBAC: refuse the ambiguity, as
         * SPIFFE's X.509-SVID rules ask. */
        set_caller(s, uri, (size_t)n, NULL);
        snprintf(why, sizeof(why), "peer certificate has %d URI SANs, not one", uris);
        fail_inbound(s, SESSION_HS_SEVERAL_URIS, SESSION_RES_BAD_IDENTITY, why);
        return;
    }
    int parsed = spiffe_parse(uri, (size_t)n, &id);
    if (parsed != 0 || id.kind != SPIFFE_SERVICE) {
        set_caller(s, uri, (size_t)n, NULL);
        fail_inbound(s, parsed != 0 ? SESSION_HS_BAD_IDENTITY : SESSION_HS_NOT_A_SERVICE,
                     SESSION_RES_BAD_IDENTITY, "peer URI is not a SPIFFE service identity");
        return;
    }
    set_caller(s, uri, (size_t)n, &id);
    const struct snapshot *now = s->host->snap;
    if (trust_domain_refused(s, "", why, sizeof(why))) {
        fail_inbound(s, SESSION_HS_TRUST_DOMAIN, SESSION_RES_BAD_IDENTITY, why);
        return;
    }
    if (now->cfg.authorize_with_agent) {
        ask_agent(s);
        return;
    }
    if (serves_http(s)) {
        LOG_DEBUG("conn=%llu in %s: HTTP, authorized per request", (unsigned long long)s->id,
                  LOG_ESC(s->caller));
        start_l7(s);
        return;
    }
    struct intent_decision d =
        intent_eval(now->intents, s->caller_partition, s->caller_ns, s->caller_service);
    count_decision(s->host, s->caller_service, d.allow);
    if (!d.allow) {
        session_finish(s, SESSION_RES_DENIED, intent_describe(&d, why, sizeof(why)));
        return;
    }
    LOG_DEBUG("conn=%llu in authorized %s: %s", (unsigned long long)s->id, LOG_ESC(s->caller),
              intent_describe(&d, why, sizeof(why)));
    start_connect_local(s);
}

/* ---- relay entry and the idle timer ---- */

uint32_t session_idle_timeout_ms(const struct session *s)
{
    if (s->expose != NULL && (s->snap->cfg.idle_timeout_ms == 0 ||
                              s->snap->cfg.idle_timeout_ms > SESSION_EXPOSE_IDLE_MS))
        return SESSION_EXPOSE_IDLE_MS; /* no identity: not held open for ever */
    return s->inbound ? s->snap->cfg.idle_timeout_ms : s->up->cfg->idle_timeout_ms;
}

/* ---- outbound ---- */

/*
 * The identity the server must present: the chain target's service, namespace, partition and
 * datacenter; what a target leaves open (a prepared query names no service) comes from the
 * endpoint's entry, then the upstream's settings, then defaults.
 */
static void expected_identity(const struct session *s, const struct snap_target *t,
                              const struct dec_endpoint *ep, struct spiffe_id *id)
{
    const struct upstream_cfg *u = s->up->cfg;
    memset(id, 0, sizeof(*id));
    id->kind = SPIFFE_SERVICE;
    snprintf(id->trust_domain, sizeof(id->trust_domain), "%s", s->snap->trust_domain);
    snprintf(id->partition, sizeof(id->partition), "%s",
             t->partition[0]    ? t->partition
             : ep->partition[0] ? ep->partition
             : u->partition[0]  ? u->partition
                                : "default");
    snprintf(id->ns, sizeof(id->ns), "%s",
             t->ns[0]    ? t->ns
             : ep->ns[0] ? ep->ns
             : u->ns[0]  ? u->ns
                         : "default");
    snprintf(id->dc, sizeof(id->dc), "%s",
             t->datacenter[0]         ? t->datacenter
             : ep->node_datacenter[0] ? ep->node_datacenter
             : u->datacenter[0]       ? u->datacenter
                                      : s->snap->cfg.datacenter);
    snprintf(id->service, sizeof(id->service), "%s",
             t->service[0] ? t->service : ep->identity_service);
}

/*
 * The SNI to send to target <t> (identity <want_id>): the chain target's own; for a prepared query
 * Envoy's QuerySNI
 * "<query>.default.<dc>.query.<trust-domain>" with the endpoint's datacenter (consul-api.md
 * 3.2; sidecars do not require SNI, mesh gateways route on it); else the service SNI.
 */
static void target_sni(const struct session *s, const struct snap_target *t,
                       const struct spiffe_id *want_id, char *sni, size_t len)
{
    const struct upstream_cfg *u = s->up->cfg;
    int n;
    if (t != NULL && t->sni[0] != '\0')
        n = snprintf(sni, len, "%s", t->sni);
    else if (strcmp(u->destination_type, "prepared_query") == 0)
        n = snprintf(sni, len, "%s.default.%s.query.%s", u->destination_name, want_id->dc,
                     want_id->trust_domain);
    else
        n = spiffe_format_sni(sni, len, NULL, want_id->service, want_id->ns, want_id->partition,
                              want_id->dc, want_id->trust_domain);
    if (n < 0 || (size_t)n >= len)
        sni[0] = '\0';
}

static void start_handshake_out(struct session *s)
{
    struct spiffe_id want_id;
    char sni[1024];
    expected_identity(s, s->tgt, s->ep, &want_id);
    target_sni(s, s->tgt, &want_id, sni, sizeof(sni));
    /* Sessions are kept per endpoint and name: the next connection to this sidecar resumes. */
    char key[sizeof(s->ep_name) + sizeof(sni) + 1];
    snprintf(key, sizeof(key), "%s|%s", s->ep_name, sni);
    s->end[1].tls = tls_conn_new_client(s->snap->tls, s->end[1].fd, sni,
                                        s->snap->cfg.tls_resumption ? key : NULL);
    /* An L7 (http) session says what it will speak, as Envoy's outbound cluster does: the
     * inbound sidecar may choose its codec by it. An L4 one offers nothing, as before. */
    if (s->end[1].tls != NULL && (s->mux != NULL || s->mux2 != NULL || s->dial_h2) &&
        tls_conn_offer_alpn(s->end[1].tls, s->dial_h2 ? "h2" : "http/1.1") != 0) {
        tls_conn_free(s->end[1].tls);
        s->end[1].tls = NULL;
    }
    if (s->end[1].tls == NULL) {
        session_finish(s, SESSION_RES_ERROR, "cannot allocate a TLS connection");
        return;
    }
    session_set_state(s, S_TLS_HANDSHAKE);
    loop_timer_start(s->host->loop, &s->timer, s->snap->cfg.handshake_timeout_ms);
    advance(s);
}

/* ---- the upstream connection pool (outbound L7) ---- */

#define UPOOL_KEY_MAX 1600 /* endpoint | SNI | expected identity */

/*
 * An idle upstream connection: verified at its handshake as its group's identity, kept alive,
 * with nothing in flight. It lives in its group until taken, closed by its peer, or swept
 * (idle too long, or the worker's snapshot no longer has its TLS context or endpoint); it is
 * freed by a deferred call, since an event for it may still be due in the current round.
 */
struct upool_conn {
    struct upool_conn *next, *prev; /* in its group, newest first */
    struct upool_group *g;
    struct session_host *h;
    struct xprt x;
    struct tls_ctx *tls; /* one reference: the context it was verified under */
    char *upstream_key;
    /* The upstream's stats block on this worker (lives as long as the host): its pool gauge. */
    struct session_listener_stats *lstat;
    uint64_t since_ms;
    struct loop_defer reap;
};

/*
 * The idle connections that serve one key (endpoint | SNI | expected identity), in bucket
 * <hash> % SESSION_UPOOL_BUCKETS of the host's table; freed when its last connection leaves.
 * Dials and puts find their group by hash and one strcmp, with no scan of other endpoints'
 * connections.
 */
struct upool_group {
    struct upool_group *next; /* in its bucket */
    uint64_t hash;
    size_t n;
    struct upool_conn *conns;
    char ep_name[300];
    char key[]; /* NUL-terminated */
};

/*
 * A pool key formatted once: the key of endpoint <ep> of target <tgt> of upstream <up> in the
 * snapshot the host's memo table holds (session_host.upool_memo_snap). Formatting a key costs
 * ~6k instructions (identity, SNI, URI through snprintf), and a routed keep-alive client
 * switches endpoint about every other request.
 */
struct upool_memo {
    struct upool_memo *next;
    const struct snap_upstream *up;
    const struct snap_target *tgt;
    const struct dec_endpoint *ep;
    uint64_t hash;
    char ep_name[300];
    char key[]; /* NUL-terminated */
};

/* What a pooled connection must match: pointers into a memo entry or the caller's buffers. */
struct upool_ref {
    const char *key;
    const char *ep_name;
    uint64_t hash;
};

static void endpoint_name(const struct dec_endpoint *ep, char *out, size_t len)
{
    snapshot_endpoint_name(ep, out, len);
}

/* What a pooled connection must match to serve endpoint <ep> (named <ep_name>) of <tgt>. */
static void upool_key_of(const struct session *s, const struct snap_target *tgt,
                         const struct dec_endpoint *ep, const char *ep_name, char *key, size_t len)
{
    struct spiffe_id id;
    char sni[1024], uri[SPIFFE_NAME_MAX * 2];
    expected_identity(s, tgt, ep, &id);
    target_sni(s, tgt, &id, sni, sizeof(sni));
    if (spiffe_format(uri, sizeof(uri), &id) < 0)
        uri[0] = '\0';
    snprintf(key, len, "%s|%s|%s", ep_name, sni, uri);
}

/* What a pooled connection must match to serve session <s>'s current endpoint. */
static void upool_key(const struct session *s, char *key, size_t len)
{
    upool_key_of(s, s->tgt, s->ep, s->ep_name, key, len);
}

/* FNV-1a: the key's bucket, and a cheap first test before strcmp(). */
static uint64_t upool_hash(const char *key)
{
    uint64_t h = 14695981039346656037ULL;
    for (const unsigned char *p = (const unsigned char *)key; *p != '\0'; p++)
        h = (h ^ *p) * 1099511628211ULL;
    return h;
}

static size_t memo_bucket(const struct snap_upstream *up, const struct snap_target *tgt,
                          const struct dec_endpoint *ep)
{
    uint64_t h = (uint64_t)(uintptr_t)up * 31 + (uint64_t)(uintptr_t)tgt;
    h = (h * 31 + (uint64_t)(uintptr_t)ep) * 0x9E3779B97F4A7C15ULL;
    return (size_t)(h >> 58) % SESSION_UPOOL_BUCKETS;
}

/* Drops every memo entry and the memo table's snapshot reference. */
static void memo_flush(struct session_host *h)
{
    for (size_t b = 0; b < SESSION_UPOOL_BUCKETS; b++)
        while (h->upool_memo[b] != NULL) {
            struct upool_memo *m = h->upool_memo[b];
            h->upool_memo[b] = m->next;
            free(m);
        }
    h->n_upool_memo = 0;
    if (h->upool_memo_snap != NULL)
        snapshot_unref(h->upool_memo_snap);
    h->upool_memo_snap = NULL;
}

/*
 * The key that endpoint <ep> of <tgt> (of s->up, in s->snap) must match. From the host's memo
 * table when <s> uses the snapshot the table was made for, or the worker's current one (the
 * table then starts over for it: it holds a reference, so its pointers are never reused while
 * it does); else formatted into <key_buf>/<name_buf> (a session still on an older snapshot).
 */
static struct upool_ref upool_ref_of(struct session *s, const struct snap_target *tgt,
                                     const struct dec_endpoint *ep, char *key_buf, size_t key_len,
                                     char *name_buf, size_t name_len)
{
    struct session_host *h = s->host;
    struct upool_ref r;
    /* Only pointers into s->snap are memoized: one of an older snapshot (a codec's leg made
     * before the session followed a new one) may be freed and its address reused. The key
     * depends on the upstream, target and endpoint only (the SNI is <tgt>'s), so a codec's
     * leg to another target than s->tgt is memoized too. */
    int ours = tgt >= s->up->targets && tgt < s->up->targets + s->up->n_targets &&
               ep >= tgt->endpoints->v && ep < tgt->endpoints->v + tgt->endpoints->n;
    if (ours && s->snap != h->upool_memo_snap && s->snap == h->snap) {
        memo_flush(h);
        h->upool_memo_snap = snapshot_ref(h->snap);
    }
    if (!ours || s->snap != h->upool_memo_snap) {
        endpoint_name(ep, name_buf, name_len);
        upool_key_of(s, tgt, ep, name_buf, key_buf, key_len);
        r.key = key_buf;
        r.ep_name = name_buf;
        r.hash = upool_hash(key_buf);
        return r;
    }
    size_t b = memo_bucket(s->up, tgt, ep);
    struct upool_memo *m = h->upool_memo[b];
    while (m != NULL && (m->up != s->up || m->tgt != tgt || m->ep != ep))
        m = m->next;
    if (m == NULL) {
        /* Bounded by the snapshot's endpoints; a table this large starts over. */
        if (h->n_upool_memo >= SESSION_UPOOL_MEMO_MAX) {
            struct snapshot *keep = snapshot_ref(h->upool_memo_snap);
            memo_flush(h);
            h->upool_memo_snap = keep;
        }
        char name[sizeof(m->ep_name)];
        endpoint_name(ep, name, sizeof(name));
        upool_key_of(s, tgt, ep, name, key_buf, key_len);
        size_t n = strlen(key_buf) + 1;
        m = xmalloc(sizeof(*m) + n);
        m->up = s->up;
        m->tgt = tgt;
        m->ep = ep;
        m->hash = upool_hash(key_buf);
        memcpy(m->ep_name, name, sizeof(name));
        memcpy(m->key, key_buf, n);
        m->next = h->upool_memo[b];
        h->upool_memo[b] = m;
        h->n_upool_memo++;
    }
    r.key = m->key;
    r.ep_name = m->ep_name;
    r.hash = m->hash;
    return r;
}

/* The group of key <r> in <h>'s table, or NULL. */
static struct upool_group *group_find(const struct session_host *h, const struct upool_ref *r)
{
    struct upool_group *g = h->upool[r->hash % SESSION_UPOOL_BUCKETS];
    while (g != NULL && (g->hash != r->hash || strcmp(g->key, r->key) != 0))
        g = g->next;
    return g;
}

struct session_h2memo {
    const struct snap_target *tgt;
    const struct dec_endpoint *ep;
    char ep_name[sizeof(((struct session *)0)->ep_name)];
    char key[1700]; /* upool_key() | "h2" */
};

/*
 * Sets s->ep_name for the endpoint just picked and returns the key of a shared HTTP/2
 * connection to it (h2up), formatted only when the endpoint differs from the last one this
 * session picked: an outbound HTTP/2 session dials once per stream, and the identity, SNI and
 * URI behind the key cost ~7k instructions to format. NULL when out of memory.
 */
static const char *h2_key(struct session *s)
{
    struct session_h2memo *m = s->h2memo;
    if (m == NULL) {
        m = calloc(1, sizeof(*m));
        if (m == NULL)
            return NULL;
        s->h2memo = m;
    }
    int fresh = m->tgt != s->tgt || m->ep != s->ep;
    if (fresh)
        endpoint_name(s->ep, m->ep_name, sizeof(m->ep_name));
    memcpy(s->ep_name, m->ep_name, strlen(m->ep_name) + 1);
    if (fresh) {
        char k[1600];
        upool_key(s, k, sizeof(k)); /* reads s->ep_name */
        snprintf(m->key, sizeof(m->key), "%s|h2", k);
        m->tgt = s->tgt;
        m->ep = s->ep;
    }
    return m->key;
}

void session_app(const struct session *s, struct session_app *out)
{
    const struct proxy_cfg *c = &s->snap->cfg;
    out->address = c->local_address;
    out->port = s->expose != NULL ? s->expose->local_port : c->local_port;
    out->socket_path = s->expose != NULL ? "" : c->local_socket_path;
    out->protocol = s->expose != NULL ? s->expose->protocol : c->protocol;
}

int session_app_connect(struct session *s)
{
    struct session_app c;
    session_app(s, &c);
    int unix_sock = c.socket_path[0] != '\0';
    if (unix_sock)
        snprintf(s->ep_name, sizeof(s->ep_name), "unix:%s", c.socket_path);
    else
        snprintf(s->ep_name, sizeof(s->ep_name), "%s:%d", c.address, c.port);
    return unix_sock ? sock_connect_unix(c.socket_path) : sock_connect(c.address, c.port);
}

void session_app_h2_key_used(const struct session *s)
{
    /* The codec is about to use the shared connection under this key: the sweep that drains
     * connections a new snapshot no longer fits must run. */
    if (!loop_timer_armed(&s->host->upool_sweep))
        loop_timer_start(s->host->loop, &s->host->upool_sweep, 1000);
}

void session_app_h2_key(const struct session *s, char *key, size_t len)
{
    struct session_app a;
    session_app(s, &a);
    session_app_h2_key_used(s);
    if (a.socket_path[0] != '\0')
        snprintf(key, len, "app|unix:%s", a.socket_path);
    else
        snprintf(key, len, "app|%s:%d", a.address, a.port);
}

/*
 * session_dial_h2(), an endpoint picked: when the worker has a shared connection to it that
 * takes a stream, the dial ends with it (1), else 0 (dial it).
 */
static int h2_take(struct session *s, const char *key)
{
    struct h2up_conn *c = h2up_find(s->host->h2up, key, s->snap->tls);
    if (c == NULL)
        return 0;
    LOG_DEBUG("conn=%llu out sharing the HTTP/2 connection to %s (%zu streams)",
              (unsigned long long)s->id, LOG_ESC(s->ep_name), h2up_conn_streams(c));
    s->h2c = c;
    session_set_state(s, S_HTTP);
    dial_end(s, NULL);
    return 1;
}

/* Whether a shared HTTP/2 connection no longer fits the worker's snapshot: another TLS
 * context, an endpoint no http2/grpc upstream has, another local application address. */
static int h2_stale(const char *key, const struct tls_ctx *tls, void *arg)
{
    const struct session_host *h = arg;
    char name[300];
    if (h->snap == NULL || h->stopping)
        return 1;
    if (strncmp(key, "app|", 4) == 0) {
        const struct proxy_cfg *c = &h->snap->cfg;
        if (c->local_socket_path[0] != '\0')
            snprintf(name, sizeof(name), "app|unix:%s", c->local_socket_path);
        else
            snprintf(name, sizeof(name), "app|%s:%d", c->local_address, c->local_port);
        if (tls == NULL && strcmp(key, name) == 0)
            return 0;
        /* An exposed http2 path's application port. */
        for (size_t i = 0; h->snap->exposes != NULL && i < h->snap->exposes->n; i++) {
            const struct snap_expose *e = &h->snap->exposes->v[i];
            snprintf(name, sizeof(name), "app|%s:%d", c->local_address, e->local_port);
            if (tls == NULL && e->protocol == PROTO_HTTP2 && strcmp(key, name) == 0)
                return 0;
        }
        return 1;
    }
    if (tls != h->snap->tls)
        return 1;
    const char *bar = strchr(key, '|');
    size_t elen = bar != NULL ? (size_t)(bar - key) : strlen(key);
    for (size_t u = 0; u < h->snap->cfg.n_upstreams; u++) {
        const struct snap_upstream *up = &h->snap->upstreams[u];
        if (up->protocol != PROTO_HTTP2 && up->protocol != PROTO_GRPC)
            continue;
        for (size_t j = 0; j < up->n_targets; j++) {
            const struct endpoint_set *eps = up->targets[j].endpoints;
            for (size_t i = 0; i < eps->n; i++) {
                endpoint_name(&eps->v[i], name, sizeof(name));
                if (strlen(name) == elen && strncmp(name, key, elen) == 0)
                    return 0;
            }
        }
    }
    return 1;
}

static void upool_reap(struct loop_defer *d)
{
    struct upool_conn *c = (struct upool_conn *)((char *)d - offsetof(struct upool_conn, reap));
    free(c);
}

static void upool_drop(struct session_host *h, struct upool_conn *c)
{
    struct upool_group *g = c->g;
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        g->conns = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    if (--g->n == 0) {
        struct upool_group **pp = &h->upool[g->hash % SESSION_UPOOL_BUCKETS];
        while (*pp != g)
            pp = &(*pp)->next;
        *pp = g->next;
        free(g);
    }
    c->g = NULL;
    h->n_upool--;
    STAT_SUB(h->stats->upool_idle, 1);
    STAT_SUB(c->lstat->pool_idle, 1);
    xprt_close(h->loop, &c->x);
    tls_ctx_unref(c->tls);
    free(c->upstream_key);
    loop_defer(h->loop, &c->reap, upool_reap);
}

/* Drops every pooled connection of <h> for which <drop> says so (NULL: all). */
static void upool_drop_if(struct session_host *h,
                          int (*drop)(const struct session_host *, const struct upool_conn *,
                                      uint64_t),
                          uint64_t now_ms)
{
    for (size_t b = 0; b < SESSION_UPOOL_BUCKETS; b++) {
        /* A dropped group's successor in the bucket is read before the drop frees it. */
        for (struct upool_group *g = h->upool[b], *gnext; g != NULL; g = gnext) {
            gnext = g->next;
            for (struct upool_conn *c = g->conns, *next; c != NULL; c = next) {
                next = c->next;
                if (drop == NULL || drop(h, c, now_ms))
                    upool_drop(h, c);
            }
        }
    }
}

static void upool_on_io(struct loop_io *io, unsigned events)
{
    struct upool_conn *c = io->data;
    char junk[256];
    (void)events;
    ssize_t n = xprt_read(&c->x, junk, sizeof(junk));
    if (n == -EAGAIN) {
        loop_io_want(c->h->loop, &c->x.io, LOOP_READ | xprt_wants(&c->x, LOOP_READ));
        return;
    }
    /* Bytes nobody asked for, or the end: the connection is out of step or gone. */
    LOG_DEBUG("worker %u: pooled upstream connection to %s closed", c->h->index,
              LOG_ESC(c->g->ep_name));
    upool_drop(c->h, c);
}

/* Whether the worker's snapshot still has <c>'s TLS context and endpoint, at L7. */
static int upool_current(const struct session_host *h, const struct upool_conn *c)
{
    char name[sizeof(c->g->ep_name)];
    if (h->snap == NULL || c->tls != h->snap->tls)
        return 0;
    const struct snap_upstream *up = snapshot_upstream(h->snap, c->upstream_key);
    if (up == NULL || up->protocol != PROTO_HTTP)
        return 0;
    for (size_t j = 0; j < up->n_targets; j++) {
        const struct endpoint_set *eps = up->targets[j].endpoints;
        for (size_t i = 0; i < eps->n; i++) {
            endpoint_name(&eps->v[i], name, sizeof(name));
            if (strcmp(name, c->g->ep_name) == 0)
                return 1;
        }
    }
    return 0;
}

static int upool_stale(const struct session_host *h, const struct upool_conn *c, uint64_t now_ms)
{
    return now_ms - c->since_ms >= SESSION_UPOOL_IDLE_MS || !upool_current(h, c);
}

static void upool_on_sweep(struct loop_timer *t)
{
    struct session_host *h = t->data;
    upool_drop_if(h, upool_stale, loop_now_ms(h->loop));
    /* The memo table holds its snapshot: not past the pool's use, nor the snapshot's turn. */
    if (h->n_upool == 0 || h->upool_memo_snap != h->snap)
        memo_flush(h);
    h2up_sweep(h->h2up, h2_stale, h);
    if (h->n_upool > 0 || atomic_load_explicit(&h->stats->h2up_conns, memory_order_relaxed) > 0)
        loop_timer_start(h->loop, &h->upool_sweep, 1000);
}

void session_pool_put(struct session *s)
{
    session_pool_put_conn(s, &s->end[1], s->tgt, s->ep, s->ep_name);
}

void session_pool_put_conn(struct session *s, struct xprt *x, const struct snap_target *tgt,
                           const struct dec_endpoint *ep, const char *ep_name)
{
    struct session_host *h = s->host;
    char key[UPOOL_KEY_MAX], name[sizeof(((struct upool_group *)0)->ep_name)];
    if (h->stopping || s->inbound || x->fd < 0 || x->tls == NULL || tgt == NULL || ep == NULL ||
        h->snap == NULL || s->snap->tls != h->snap->tls || h->n_upool >= SESSION_UPOOL_MAX)
        goto out;
    struct upool_ref r = upool_ref_of(s, tgt, ep, key, sizeof(key), name, sizeof(name));
    struct upool_group *g = group_find(h, &r);
    if (g != NULL && g->n >= SESSION_UPOOL_PER_ENDPOINT)
        goto out;
    if (g == NULL) {
        size_t n = strlen(r.key) + 1;
        g = xmalloc(sizeof(*g) + n);
        g->hash = r.hash;
        g->n = 0;
        g->conns = NULL;
        snprintf(g->ep_name, sizeof(g->ep_name), "%s", r.ep_name);
        memcpy(g->key, r.key, n);
        struct upool_group **head = &h->upool[r.hash % SESSION_UPOOL_BUCKETS];
        g->next = *head;
        *head = g;
    }
    struct upool_conn *c = xcalloc(1, sizeof(*c));
    c->h = h;
    /* The registration moves with the end (it points at the end's old place). An idle
     * connection is always read-watched, whatever its last read left in its TLS wants (nothing
     * after a read that returned bytes): the far side's close, or bytes nobody asked for, must
     * take it out of the pool at once, not at its next use or the sweep. */
    c->x = *x;
    loop_io_init(&c->x.io, c->x.fd, upool_on_io, c);
    loop_io_move(h->loop, &x->io, &c->x.io, LOOP_READ | xprt_wants(&c->x, LOOP_READ));
    *x = (struct xprt){.fd = -1};
    c->tls = tls_ctx_ref(s->snap->tls);
    c->upstream_key = xstrdup(s->upstream_key);
    c->since_ms = loop_now_ms(h->loop);
    c->g = g;
    c->next = g->conns;
    if (g->conns != NULL)
        g->conns->prev = c;
    g->conns = c;
    g->n++;
    h->n_upool++;
    STAT_ADD(h->stats->upool_idle, 1);
    c->lstat = s->lstat;
    STAT_ADD(c->lstat->pool_idle, 1);
    if (!loop_timer_armed(&h->upool_sweep))
        loop_timer_start(h->loop, &h->upool_sweep, 1000);
    LOG_DEBUG("conn=%llu out upstream connection to %s pooled", (unsigned long long)s->id,
              LOG_ESC(ep_name));
out:
    xprt_close(h->loop, x);
}

/* ---- the upstream's request limits and passive health (outlier.h) ---- */

/* The passive-health state of endpoint <i> of target <t>, or NULL. */
static struct outlier_host *host_of(const struct snap_target *t, size_t i)
{
    return t != NULL && t->hosts != NULL && i < t->n_hosts ? t->hosts[i] : NULL;
}

/*
 * Whether the dial passes over endpoint <i> of <t> at <now_ms>: it is ejected, and <panic> is
 * not set (every endpoint of the target ejected, when Envoy balances over them all anyway).
 * Logs an endpoint whose ejection is over as it comes back.
 */
static int dial_skips(const struct session *s, const struct snap_target *t, size_t i,
                      uint64_t now_ms, int panic)
{
    struct outlier_host *h = host_of(t, i);
    int back = 0, out = outlier_ejected(h, now_ms, &back);
    if (back && h != NULL)
        LOG_INFO("upstream %s: endpoint %s of target %s back in service after its ejection",
                 LOG_ESC(s->up->cfg->destination_name), LOG_ESC(h->name), LOG_ESC(t->id));
    return out && !panic;
}

/* 1 when every endpoint of <t> (at least one) is ejected: the dial then uses them anyway. */
static int target_panics(const struct snap_target *t, uint64_t now_ms)
{
    return t->hosts != NULL && t->n_hosts > 0 &&
           outlier_ejected_among(t->hosts, t->n_hosts, now_ms) == t->n_hosts;
}

void session_outlier_report(struct session *s, int failed)
{
    session_outlier_report_at(s, s->tgt, s->ep, failed);
}

void session_outlier_report_at(struct session *s, const struct snap_target *t,
                               const struct dec_endpoint *ep, int failed)
{
    if (s->inbound || s->up == NULL || s->up->outlier == NULL || t == NULL || ep == NULL ||
        t->hosts == NULL)
        return;
    size_t i = (size_t)(ep - t->endpoints->v);
    struct outlier_host *h = host_of(t, i);
    uint64_t ms = 0;
    const struct outlier_cfg *c = &s->up->cfg->passive;
    if (h == NULL || (!failed && atomic_load_explicit(&h->fails, memory_order_relaxed) == 0))
        return; /* the common case: a success after a success, no clock read */
    uint64_t now = outlier_now_ms();
    enum outlier_event ev = outlier_report(s->up->outlier, c, h, t->hosts, t->n_hosts, failed, now,
                                           (uint32_t)util_rand(), &ms);
    struct outlier_cfg e = outlier_cfg_effective(c);
    if (ev == OUTLIER_EJECTED)
        LOG_WARN("conn=%llu upstream %s: endpoint %s of target %s ejected for %llu ms after %u "
                 "consecutive failures (%zu of %zu ejected)",
                 (unsigned long long)s->id, LOG_ESC(s->up->cfg->destination_name), LOG_ESC(h->name),
                 LOG_ESC(t->id), (unsigned long long)ms, e.max_failures,
                 outlier_ejected_among(t->hosts, t->n_hosts, now), t->n_hosts);
    else if (ev == OUTLIER_OVERFLOW)
        LOG_INFO("conn=%llu upstream %s: endpoint %s of target %s failed %u times in a row but "
                 "stays: max_ejection_percent %u of %zu endpoints already ejected",
                 (unsigned long long)s->id, LOG_ESC(s->up->cfg->destination_name), LOG_ESC(h->name),
                 LOG_ESC(t->id), e.max_failures, e.max_ejection_pct, t->n_hosts);
}

int session_endpoint_ejected(struct session *s)
{
    const struct snap_target *t = s->tgt;
    if (t == NULL || s->ep == NULL || t->hosts == NULL)
        return 0;
    uint64_t now = outlier_now_ms();
    return dial_skips(s, t, (size_t)(s->ep - t->endpoints->v), now, target_panics(t, now));
}

int session_admit_request(struct session *s, struct outlier **active, char *why, size_t len)
{
    struct outlier *o = s->up->outlier;
    uint32_t max = s->up->cfg->max_concurrent_requests;
    *active = NULL;
    if (o == NULL)
        return 0;
    if (outlier_admit(o, OUTLIER_LIMIT_CONCURRENT, max)) {
        *active = o;
        return 0;
    }
    snprintf(why, len, "upstream overflow: max_concurrent_requests (%lu) reached",
             (unsigned long)max);
    return -1;
}

int session_admit_pending(struct session *s, char *why, size_t len)
{
    struct outlier *o = s->up->outlier;
    uint32_t max = s->up->cfg->max_pending_requests;
    if (o == NULL || outlier_admit(o, OUTLIER_LIMIT_PENDING, max))
        return 0;
    snprintf(why, len, "upstream overflow: max_pending_requests (%lu) reached", (unsigned long)max);
    return -1;
}

void session_release_pending(struct session *s)
{
    if (s->up->outlier != NULL)
        outlier_release(s->up->outlier, OUTLIER_LIMIT_PENDING);
}

/* Outbound L7: the dial ends (<why> NULL: end[1] or s->h2c is ready): the pending unit it held
 * is given back before the codec runs, which may start the next dial. */
static void dial_end(struct session *s, const char *why)
{
    if (s->dial_waiting) {
        s->dial_waiting = 0;
        outlier_release(s->up->outlier, OUTLIER_LIMIT_PENDING);
    }
    s->carrier->dialled(s, why);
}

/*
 * The dial needs a new connection (or an HTTP/2 stream's): it waits as one of the upstream's
 * pending requests. 1 when admitted; 0 after ending the dial with an overflow, at once (no
 * queue), when limits.max_pending_requests are waiting already over all workers.
 */
static int dial_admit(struct session *s)
{
    s->dial_overflow = 0;
    if (s->up->outlier == NULL || s->dial_waiting)
        return 1;
    uint32_t max = s->up->cfg->max_pending_requests;
    if (outlier_admit(s->up->outlier, OUTLIER_LIMIT_PENDING, max)) {
        s->dial_waiting = 1;
        return 1;
    }
    char why[128];
    snprintf(why, sizeof(why), "upstream overflow: max_pending_requests (%lu) reached",
             (unsigned long)max);
    s->dial_overflow = 1;
    session_set_state(s, S_HTTP);
    dial_end(s, why);
    return 0;
}

/*
 * Outbound L7, before a new connection to an endpoint: limits.max_connections bounds the
 * connections open to the upstream's endpoints over all workers (pooled ones too), as Envoy's
 * circuit breaker bounds a cluster's. Returns the state to count the connection in (a unit and
 * a reference taken; the end gives both back when it closes), NULL with nothing taken when
 * there is nothing to count (L4: the listener's limit bounds it), or ends the dial with an
 * overflow and returns NULL with *<over> set.
 */
static struct outlier *conn_admit(struct session *s, int *over)
{
    struct outlier *o = s->up->outlier;
    *over = 0;
    if (o == NULL || (s->mux == NULL && !s->dial_h2))
        return NULL;
    uint32_t max = s->up->cfg->limits.max_connections;
    if (outlier_admit(o, OUTLIER_LIMIT_CONNECTIONS, max))
        return outlier_ref(o);
    char why[128];
    snprintf(why, sizeof(why), "upstream overflow: max_connections (%lu) reached",
             (unsigned long)max);
    *over = 1;
    s->dial_overflow = 1;
    session_set_state(s, S_HTTP);
    dial_end(s, why);
    return NULL;
}

/* Gives back what conn_admit() took for a connection that was not made. */
static void conn_unadmit(struct outlier *o)
{
    if (o == NULL)
        return;
    outlier_release(o, OUTLIER_LIMIT_CONNECTIONS);
    outlier_unref(o);
}

/*
 * The <k>th target the current dial may use (dial_rs's, else the upstream's, in order) and the
 * offset of its endpoints' flags in s->tried; NULL past the last. An index the resolver names
 * beyond the upstream's targets (a table and targets from different chains) is skipped.
 */
static const struct snap_target *dial_target(const struct session *s, size_t k, size_t *base)
{
    size_t j = k;
    if (s->dial_rs != NULL) {
        if (k >= s->dial_rs->n_targets)
            return NULL;
        j = s->dial_rs->targets[k];
    }
    if (j >= s->up->n_targets || s->up->targets == NULL)
        return NULL;
    *base = 0;
    for (size_t x = 0; x < j; x++)
        *base += s->up->targets[x].endpoints->n;
    return &s->up->targets[j];
}

/* How many targets the current dial walks (dial_target()'s k runs below it). */
static size_t dial_targets(const struct session *s)
{
    return s->dial_rs != NULL ? s->dial_rs->n_targets : s->up->n_targets;
}

int session_resolver_allows(const struct session *s, const struct route_resolver *rs,
                            const struct snap_target *t)
{
    if (rs == NULL)
        return 1;
    for (size_t k = 0; k < rs->n_targets; k++)
        if (rs->targets[k] < s->up->n_targets && &s->up->targets[rs->targets[k]] == t)
            return 1;
    return 0;
}

int session_dial_allows(const struct session *s, const struct snap_target *t)
{
    return session_resolver_allows(s, s->dial_rs, t);
}

/*
 * The policy without a LoadBalancer (or with an empty Policy): the power of two choices over
 * the requests (HTTP) or connections (L4) each endpoint has in flight from this worker, as
 * DESIGN.md's upstream choice says and as Envoy's least_request does by default. It spreads
 * requests in sequence over every endpoint and steers new ones away from a slow endpoint.
 */
static const struct dec_load_balancer lb_default = {
    .policy = DEC_LB_LEAST_REQUEST,
    .choice_count = LB_CHOICE_DEFAULT,
};

/* The policy the current dial chooses its endpoint by. */
static const struct dec_load_balancer *dial_lb(const struct session *s)
{
    const struct dec_load_balancer *lb = s->dial_rs != NULL ? s->dial_rs->lb : NULL;
    return lb == NULL || lb->policy == DEC_LB_DEFAULT ? &lb_default : lb;
}

int session_resolver_balances(const struct route_resolver *rs)
{
    return rs != NULL && rs->lb != NULL && rs->lb->policy != DEC_LB_DEFAULT;
}

/* Gives <s> a pooled connection to its current endpoint (s->tgt, s->ep) made under its TLS
 * context: 1 when end[1] is now that connection, else 0. Sets ep_name. */
static int upool_take_current(struct session *s)
{
    struct session_host *h = s->host;
    char key[UPOOL_KEY_MAX];
    struct upool_ref r =
        upool_ref_of(s, s->tgt, s->ep, key, sizeof(key), s->ep_name, sizeof(s->ep_name));
    if (r.ep_name != s->ep_name)
        memcpy(s->ep_name, r.ep_name, strlen(r.ep_name) + 1);
    struct upool_group *g = group_find(h, &r);
    for (struct upool_conn *c = g != NULL ? g->conns : NULL; c != NULL; c = c->next) {
        if (c->tls != s->snap->tls)
            continue;
        /* The registration moves with the connection, still wanting what it did; the
         * codec asks for what it needs next. */
        s->end[1] = c->x;
        loop_io_init(&s->end[1].io, s->end[1].fd, session_on_io, s);
        loop_io_move(h->loop, &c->x.io, &s->end[1].io, c->x.io.want);
        c->x = (struct xprt){.fd = -1};
        upool_drop(h, c);
        STAT_ADD(h->stats->upool_reused, 1);
        return 1;
    }
    return 0;
}

/* ---- load balancing (lb.h) ---- */

static void peer_source(const char *peer, char *out, size_t len);

/* A policy's tables and per-worker state over one endpoint set. */
struct lb_entry {
    struct lb_entry *next;
    /* One reference, so that the set (the entry's key) is not freed and its address not
     * reused while the entry exists. */
    struct endpoint_set *eps;
    enum dec_lb_policy policy;
    uint32_t ring_min, ring_max;
    struct lb_table *table; /* ring_hash, maglev */
    struct lb_state st;
    unsigned users; /* sessions counting an active request in st.active */
};

static void lb_entry_free(struct lb_entry *e)
{
    endpoint_set_unref(e->eps);
    lb_table_free(e->table);
    free(e->st.active);
    free(e);
}

static void lb_cache_free(struct session_host *h)
{
    while (h->lb_cache != NULL) {
        struct lb_entry *e = h->lb_cache;
        h->lb_cache = e->next;
        lb_entry_free(e);
    }
}

/*
 * The worker's entry for policy <lb> over <eps>, built on first use (a ring or maglev table
 * is built once per endpoint set and worker, then only read). Entries whose endpoint set no
 * snapshot holds any more (only the cache's references are left) and that no session counts
 * in are dropped first: the cache holds the live endpoint sets (times the policies over
 * each), and stale ones only until the next entry is built.
 */
static struct lb_entry *lb_entry_for(struct session_host *h, const struct dec_load_balancer *lb,
                                     struct endpoint_set *eps)
{
    for (struct lb_entry *e = h->lb_cache; e != NULL; e = e->next)
        if (e->eps == eps && e->policy == lb->policy && e->ring_min == lb->ring_min &&
            e->ring_max == lb->ring_max)
            return e;
    for (struct lb_entry **pp = &h->lb_cache; *pp != NULL;) {
        struct lb_entry *e = *pp;
        unsigned ours = 0, busy = 0; /* the cache's own references to e's set, and its users */
        for (struct lb_entry *o = h->lb_cache; o != NULL; o = o->next)
            if (o->eps == e->eps) {
                ours++;
                busy += o->users;
            }
        if (busy == 0 && atomic_load_explicit(&e->eps->refs, memory_order_acquire) <= ours) {
            *pp = e->next;
            lb_entry_free(e);
        } else {
            pp = &e->next;
        }
    }
    struct lb_entry *e = xcalloc(1, sizeof(*e));
    e->eps = endpoint_set_ref(eps);
    e->policy = lb->policy;
    e->ring_min = lb->ring_min;
    e->ring_max = lb->ring_max;
    e->st.n = eps->n;
    e->st.active = xcalloc(eps->n ? eps->n : 1, sizeof(uint32_t));
    /* Workers start their round-robin cycles at different places, as Envoy's do. */
    e->st.rr = eps->n ? util_rand() % eps->n : 0;
    if (lb_policy_hashed(lb->policy) && eps->n > 0) {
        char **keys = xcalloc(eps->n, sizeof(char *));
        for (size_t i = 0; i < eps->n; i++) {
            keys[i] = xmalloc(300);
            endpoint_name(&eps->v[i], keys[i], 300);
        }
        e->table =
            lb_table_new(lb->policy, lb->ring_min, lb->ring_max, (const char *const *)keys, eps->n);
        for (size_t i = 0; i < eps->n; i++)
            free(keys[i]);
        free(keys);
    }
    e->next = h->lb_cache;
    h->lb_cache = e;
    return e;
}

void session_lb_hold_release(struct session_lb_hold *h)
{
    struct lb_entry *e = h->e;
    if (e == NULL)
        return;
    if (e->st.active[h->i] > 0)
        e->st.active[h->i]--;
    e->users--;
    h->e = NULL;
}

void session_lb_release(struct session *s)
{
    session_lb_hold_release(&s->lb_held);
}

void session_lb_move(struct session *s, struct session_lb_hold *h)
{
    session_lb_hold_release(h);
    *h = s->lb_held;
    s->lb_held.e = NULL;
}

/* The session's request goes to endpoint <i> of <e>'s set: counted active until released. */
static void lb_hold(struct session *s, struct lb_entry *e, size_t i)
{
    session_lb_release(s);
    if (e == NULL || i >= e->st.n)
        return;
    e->st.active[i]++;
    e->users++;
    s->lb_held = (struct session_lb_hold){e, i};
}

/*
 * The endpoint of target <t> (its flags at s->tried + base; at least one not tried) that the
 * dial takes: the one chosen ahead for it (session_lb_keeps(), upool_take()), else the
 * one the dial's policy (dial_lb()) picks among those not tried yet (lb.h). *<e> is the
 * worker's entry the choice used (NULL: none, for random).
 */
static size_t choose_endpoint(struct session *s, const struct snap_target *t, size_t base,
                              struct lb_entry **e)
{
    const struct dec_load_balancer *lb = dial_lb(s);
    size_t n = t->endpoints->n, i;
    /* Ejected endpoints (outlier) are passed over as tried ones are, unless every endpoint of
     * the target is (dial_skips()); the caller made sure one is left. */
    const unsigned char *skip = s->tried + base;
    unsigned char *merged = NULL;
    if (t->hosts != NULL) {
        uint64_t now = outlier_now_ms();
        int panic = target_panics(t, now);
        for (size_t j = 0; j < n; j++)
            if (!skip[j] && dial_skips(s, t, j, now, panic)) {
                if (merged == NULL) {
                    merged = xmalloc(n);
                    memcpy(merged, skip, n);
                }
                merged[j] = 1;
            }
        if (merged != NULL)
            skip = merged;
    }
    int pre = s->lb_pre_tgt == t && s->lb_pre_i < n && !skip[s->lb_pre_i];
    s->lb_pre_tgt = NULL;
    *e = NULL;
    if (lb->policy == DEC_LB_RANDOM) {
        i = pre ? s->lb_pre_i : lb_choose(lb, NULL, NULL, skip, n, 0, 0, util_rand);
    } else {
        *e = lb_entry_for(s->host, lb, t->endpoints);
        i = pre ? s->lb_pre_i
                : lb_choose(lb, (*e)->table, &(*e)->st, skip, n, s->lb_hashed, s->lb_hash,
                            util_rand);
    }
    free(merged);
    return i;
}

/*
 * The dial's first target with endpoints when it has one endpoint, not tried yet, and its
 * base; else NULL. The dial takes that endpoint (first_open_target() and choose_endpoint()
 * would): a target's last endpoint is never passed over (outlier ejection leaves it in use,
 * dial_skips()), no policy has anything to choose in it, and the requests in flight a
 * least_request entry counts choose nothing either. So it is with one endpoint in all, and
 * on each side of a split to one instance each.
 */
static const struct snap_target *single_endpoint_target(const struct session *s, size_t *base)
{
    for (size_t k = 0; k < dial_targets(s); k++) {
        const struct snap_target *c = dial_target(s, k, base);
        if (c == NULL || c->endpoints->n == 0)
            continue;
        return c->endpoints->n == 1 && !s->tried[*base] ? c : NULL;
    }
    return NULL;
}

/* The first target the dial may use that has an endpoint not tried yet and not passed over
 * (dial_skips()), and its base. */
static const struct snap_target *first_open_target(const struct session *s, size_t *base)
{
    uint64_t now = outlier_now_ms();
    for (size_t k = 0, b; k < dial_targets(s); k++) {
        const struct snap_target *c = dial_target(s, k, &b);
        if (c == NULL)
            continue;
        int panic = target_panics(c, now);
        for (size_t i = 0; i < c->endpoints->n; i++)
            if (!s->tried[b + i] && !dial_skips(s, c, i, now, panic)) {
                *base = b;
                return c;
            }
    }
    return NULL;
}

/*
 * The dial from the pool: the policy (dial_lb()) picks the endpoint, then a pooled
 * connection to it serves when there is one (1); else 0, and pick_endpoint() dials the
 * endpoint chosen.
 */
static int upool_take(struct session *s)
{
    size_t base = 0, i = 0;
    struct lb_entry *e = NULL;
    const struct snap_target *t = single_endpoint_target(s, &base);
    if (t == NULL) {
        t = first_open_target(s, &base);
        if (t == NULL)
            return 0;
        i = choose_endpoint(s, t, base, &e);
    }
    s->tgt = t;
    s->ep = &t->endpoints->v[i];
    if (s->host->n_upool > 0 && upool_take_current(s)) {
        s->tried[base + i] = 1;
        s->tries++;
        lb_hold(s, e, i);
        return 1;
    }
    s->lb_pre_tgt = t;
    s->lb_pre_i = i;
    s->tgt = NULL;
    s->ep = NULL;
    s->ep_name[0] = '\0';
    return 0;
}

void session_lb_request(struct session *s, const struct http_header *headers, size_t nheaders,
                        struct http_slice query, char *set_cookie, size_t len)
{
    const struct dec_load_balancer *lb = s->dial_rs != NULL ? s->dial_rs->lb : NULL;
    s->lb_pre_tgt = NULL;
    s->lb_hashed = 0;
    if (len > 0)
        set_cookie[0] = '\0';
    if (lb == NULL || !lb_policy_hashed(lb->policy) || lb->n_hash == 0)
        return;
    char src[64], conn[sizeof(s->peer) + 8 + 256];
    peer_source(s->peer, src, sizeof(src));
    /* Envoy derives a generated cookie from the client connection's remote and local
     * addresses; the listener's key stands for the local one here. */
    snprintf(conn, sizeof(conn), "%s|%s", s->peer, s->upstream_key != NULL ? s->upstream_key : "");
    struct lb_req rq = {
        .headers = headers,
        .nheaders = nheaders,
        .query = query,
        .source_ip = {src, strlen(src)},
        .conn = {conn, strlen(conn)},
    };
    struct lb_set_cookie sc;
    s->lb_hashed = lb_request_hash(lb, &rq, &s->lb_hash, &sc);
    if (s->lb_hashed && sc.policy != NULL && len > 0 &&
        lb_set_cookie_format(&sc, set_cookie, len) < 0)
        LOG_DEBUG("conn=%llu out cookie %s cannot be set", (unsigned long long)s->id,
                  LOG_ESC(sc.policy->field_value));
}

int session_lb_keeps(struct session *s)
{
    if (s->tgt == NULL || s->ep == NULL)
        return 1;
    /* A new choice: nothing of this request was tried yet. */
    size_t total = 0;
    for (size_t j = 0; j < s->up->n_targets; j++)
        total += s->up->targets[j].endpoints->n;
    memset(s->tried, 0, total);
    /* The current endpoint is the one the dial would take, with nothing to choose. */
    size_t base = 0;
    if (single_endpoint_target(s, &base) == s->tgt) {
        s->lb_pre_tgt = NULL;
        session_lb_release(s);
        return 1;
    }
    const struct snap_target *t = first_open_target(s, &base);
    if (t == NULL)
        return 1;
    struct lb_entry *e;
    size_t i = choose_endpoint(s, t, base, &e);
    if (t == s->tgt && &t->endpoints->v[i] == s->ep) {
        lb_hold(s, e, i);
        return 1;
    }
    s->lb_pre_tgt = t;
    s->lb_pre_i = i;
    return 0;
}

/* VERIFY_PEER: the server's first URI SAN must name the service we meant to reach. */
static void verify_peer(struct session *s)
{
    struct spiffe_id want_id, got;
    char uri[SPIFFE_NAME_MAX * 2], why[LOG_ESC_BYTES + SPIFFE_NAME_MAX * 2 + 64];
    session_set_state(s, S_VERIFY_PEER);
    expected_identity(s, s->tgt, s->ep, &want_id);
    int n = tls_conn_peer_uri(s->end[1].tls, uri, sizeof(uri));
    if (n < 0) {
        try_next_endpoint(s, "server certificate has no URI SAN");
        return;
    }
    if (tls_conn_peer_uri_count(s->end[1].tls) > 1) {
        try_next_endpoint(s, "server certificate has several URI SANs");
        return;
    }
    if (spiffe_parse(uri, (size_t)n, &got) != 0 ||
        !spiffe_same_service(&want_id, &got, s->snap->cfg.verify_trust_domain)) {
        char expect[SPIFFE_NAME_MAX * 2];
        spiffe_format(expect, sizeof(expect), &want_id);
        /* The URI is the peer's choice and goes into a log line: escaped (log.h). */
        snprintf(why, sizeof(why), "server identity %s is not %s", LOG_ESC(uri), expect);
        try_next_endpoint(s, why);
        return;
    }
    loop_timer_stop(s->host->loop, &s->timer);
    if (s->dial_h2) {
        char alpn[32];
        if (tls_conn_alpn(s->end[1].tls, alpn, sizeof(alpn)) > 0 && strcmp(alpn, "h2") != 0) {
            snprintf(why, sizeof(why), "the server selected ALPN %s, not h2", LOG_ESC(alpn));
            try_next_endpoint(s, why);
            return;
        }
        const char *key = h2_key(s);
        if (key == NULL) {
            try_next_endpoint(s, "out of memory");
            return;
        }
        s->h2c = h2up_adopt(s->host->h2up, key, s->snap->tls, &s->end[1], s->ep_name);
        session_set_state(s, S_HTTP);
        dial_end(s, NULL);
        return;
    }
    if (s->mux != NULL || s->mux2 != NULL) {
        /* Outbound L7: the codec that asked for this connection takes it. */
        session_set_state(s, S_HTTP);
        dial_end(s, NULL);
        return;
    }
    s->host->muxes.relay->start(s);
}

int session_follow_snapshot(struct session *s)
{
    struct snapshot *now = s->host->snap;
    if (s->inbound || now == NULL || now == s->snap || s->upstream_key == NULL || s->up == NULL)
        return 0;
    const struct snap_upstream *up = snapshot_upstream(now, s->upstream_key);
    if (up == NULL || up->protocol != s->up->protocol)
        return 0;
    if (s->end[1].fd >= 0)
        session_pool_put(s); /* under the old snapshot's TLS context check; else closed */
    size_t total = 0;
    for (size_t j = 0; j < up->n_targets; j++)
        total += up->targets[j].endpoints->n;
    free(s->tried);
    s->tried = xcalloc(total ? total : 1, 1);
    s->tries = 0;
    if (s->snap0 == NULL)
        s->snap0 = s->snap;
    else
        snapshot_unref(s->snap);
    s->snap = snapshot_ref(now);
    s->up = up;
    s->tgt = NULL;
    s->ep = NULL;
    s->ep_name[0] = '\0';
    s->dial_rs = NULL;
    s->lb_pre_tgt = NULL;
    if (s->h2memo != NULL) {
        /* Its pointers named endpoints of the snapshot left: never equal to new ones. */
        s->h2memo->tgt = NULL;
        s->h2memo->ep = NULL;
    }
    LOG_DEBUG("conn=%llu out follows snapshot %llu", (unsigned long long)s->id,
              (unsigned long long)now->generation);
    return 1;
}

/*
 * PICK_ENDPOINT: a random endpoint not tried yet by this session from the first target the
 * dial may use (primary, then failovers in order; dial_target()) that has one, at most
 * MAX_ENDPOINT_TRIES in all. Targets hold only healthy endpoints, so the primary serves while
 * it has any, and a failover takes over when it has none or every one of them failed for this
 * session.
 */
static void pick_endpoint(struct session *s)
{
    session_set_state(s, S_PICK_ENDPOINT);
    for (;;) {
        const struct snap_target *t = NULL;
        size_t base = 0, total = 0;
        uint64_t now = outlier_now_ms();
        for (size_t k = 0, b; k < dial_targets(s); k++) {
            const struct snap_target *c = dial_target(s, k, &b);
            if (c == NULL)
                continue;
            size_t n = 0;
            int p = target_panics(c, now);
            for (size_t i = 0; i < c->endpoints->n; i++)
                n += !s->tried[b + i] && !dial_skips(s, c, i, now, p);
            total += c->endpoints->n;
            if (n > 0 && t == NULL) {
                t = c;
                base = b;
            }
        }
        if (t == NULL || s->tries >= MAX_ENDPOINT_TRIES) {
            char why[512];
            if (total == 0) {
                /* Name the targets that had none: the line must tell which service is empty. */
                size_t len = (size_t)snprintf(why, sizeof(why), "no healthy endpoint");
                const char *sep = " in target ";
                for (size_t k = 0, b; k < dial_targets(s) && len < sizeof(why); k++) {
                    const struct snap_target *c = dial_target(s, k, &b);
                    if (c == NULL)
                        continue;
                    len += (size_t)snprintf(why + len, sizeof(why) - len, "%s%s", sep, c->id);
                    sep = ", ";
                }
                if (sep[0] == ' ') /* no target at all: no discovery chain in force yet */
                    snprintf(why + len, sizeof(why) - len, " (the upstream has no target yet)");
            } else {
                snprintf(why, sizeof(why), "every endpoint tried failed (%u tried)", s->tries);
            }
            if (s->mux != NULL || s->mux2 != NULL || s->dial_h2) {
                /* Outbound L7: the request gets a 503; the application's connection stays. */
                session_set_state(s, S_HTTP);
                dial_end(s, why);
                return;
            }
            session_finish(s, SESSION_RES_NO_ENDPOINT, why);
            return;
        }
        struct lb_entry *e;
        size_t i = choose_endpoint(s, t, base, &e);
        s->tried[base + i] = 1;
        s->tries++;
        lb_hold(s, e, i);
        s->tgt = t;
        s->ep = &t->endpoints->v[i];
        int unix_sock = s->ep->socket_path[0] != '\0';
        if (s->dial_h2) {
            const char *key = h2_key(s);
            if (key == NULL) {
                session_set_state(s, S_HTTP);
                dial_end(s, "out of memory");
                return;
            }
            if (h2_take(s, key))
                return;
        } else {
            endpoint_name(s->ep, s->ep_name, sizeof(s->ep_name));
        }
        int over;
        struct outlier *counted = conn_admit(s, &over);
        if (over)
            return;
        int fd = unix_sock ? sock_connect_unix(s->ep->socket_path)
                           : sock_connect(s->ep->address, s->ep->port);
        if (fd < 0) {
            conn_unadmit(counted);
            LOG_WARN("conn=%llu out endpoint %s: connect: %s", (unsigned long long)s->id,
                     LOG_ESC(s->ep_name), util_strerror(fd));
            if (s->mux != NULL || s->dial_h2)
                session_outlier_report(s, 1);
            continue;
        }
        LOG_DEBUG("conn=%llu out target %s endpoint %s", (unsigned long long)s->id, LOG_ESC(t->id),
                  LOG_ESC(s->ep_name));
        s->end[1].fd = fd;
        s->end[1].counted = counted;
        loop_io_init(&s->end[1].io, fd, session_on_io, s);
        session_set_state(s, S_CONNECT);
        loop_timer_start(s->host->loop, &s->timer,
                         t->connect_timeout_ms ? t->connect_timeout_ms
                                               : s->up->cfg->connect_timeout_ms);
        session_want(s, 1, LOOP_WRITE);
        return;
    }
}

/* A dial starts afresh: no endpoint tried or chosen yet. */
static void dial_reset(struct session *s, int h2)
{
    size_t total = 0;
    for (size_t j = 0; j < s->up->n_targets; j++)
        total += s->up->targets[j].endpoints->n;
    memset(s->tried, 0, total);
    s->tries = 0;
    s->tgt = NULL;
    s->ep = NULL;
    s->ep_name[0] = '\0';
    s->h2c = NULL;
    s->dial_h2 = h2;
    s->dial_pooled = 0;
}

void session_dial_h2(struct session *s)
{
    dial_reset(s, 1);
    if (!loop_timer_armed(&s->host->upool_sweep))
        loop_timer_start(s->host->loop, &s->host->upool_sweep, 1000);
    if (!dial_admit(s))
        return;
    pick_endpoint(s);
}

static void dial_upstream(struct session *s, int use_pool)
{
    dial_reset(s, 0);
    if (use_pool && upool_take(s)) {
        s->dial_pooled = 1;
        LOG_DEBUG("conn=%llu out reusing a pooled connection to %s", (unsigned long long)s->id,
                  LOG_ESC(s->ep_name));
        session_set_state(s, S_HTTP);
        dial_end(s, NULL);
        return;
    }
    if (!dial_admit(s))
        return;
    pick_endpoint(s);
}

void session_dial_upstream(struct session *s)
{
    dial_upstream(s, 1);
}

void session_redial_upstream(struct session *s)
{
    dial_upstream(s, 0);
}

void session_redial_retry(struct session *s)
{
    size_t left = 0;
    for (size_t k = 0, base; k < dial_targets(s); k++) {
        const struct snap_target *t = dial_target(s, k, &base);
        if (t == NULL)
            continue;
        /* A pooled connection's endpoint was not flagged by pick_endpoint(). */
        if (s->ep != NULL && t == s->tgt && s->ep >= t->endpoints->v &&
            s->ep < t->endpoints->v + t->endpoints->n)
            s->tried[base + (size_t)(s->ep - t->endpoints->v)] = 1;
        for (size_t i = 0; i < t->endpoints->n; i++)
            left += !s->tried[base + i];
    }
    unsigned char *tried = s->tried;
    size_t total = 0;
    for (size_t j = 0; j < s->up->n_targets; j++)
        total += s->up->targets[j].endpoints->n;
    unsigned char *keep = xmalloc(total ? total : 1);
    memcpy(keep, tried, total);
    dial_reset(s, s->dial_h2); /* the same kind of dial as the request's first */
    if (left > 0)
        memcpy(tried, keep, total); /* another endpoint is left: the tried ones wait */
    free(keep);
    pick_endpoint(s);
}

static void try_next_endpoint(struct session *s, const char *why)
{
    LOG_WARN("conn=%llu out endpoint %s failed: %s", (unsigned long long)s->id, LOG_ESC(s->ep_name),
             why);
    STAT_ADD(s->lstat->connect_errors, 1);
    if (s->mux != NULL || s->dial_h2)
        session_outlier_report(s, 1); /* a failed connection counts as a 5xx (Envoy) */
    if (s->state == S_VERIFY_PEER)
        STAT_ADD(s->host->stats->handshake_failures[SESSION_HS_WRONG_PEER], 1);
    loop_timer_stop(s->host->loop, &s->timer);
    xprt_close(s->host->loop, &s->end[1]);
    pick_endpoint(s);
}

/* ---- dispatch ---- */

/* The metrics reason of a failed inbound handshake. */
static enum session_handshake_reason handshake_reason(enum tls_failure f)
{
    switch (f) {
    case TLS_FAIL_NOT_TLS:
        return SESSION_HS_NOT_TLS;
    case TLS_FAIL_PROTOCOL_VERSION:
        return SESSION_HS_PROTOCOL_VERSION;
    case TLS_FAIL_NO_PEER_CERT:
        return SESSION_HS_NO_CLIENT_CERT;
    case TLS_FAIL_UNKNOWN_CA:
        return SESSION_HS_UNKNOWN_CA;
    case TLS_FAIL_CERT_EXPIRED:
        return SESSION_HS_EXPIRED;
    case TLS_FAIL_CERT_NOT_YET_VALID:
        return SESSION_HS_NOT_YET_VALID;
    case TLS_FAIL_BAD_CERT:
        return SESSION_HS_BAD_CERTIFICATE;
    default:
        return SESSION_HS_TLS_ERROR;
    }
}

/*
 * Inbound, before the handshake: creates the TLS object once the caller's first bytes are
 * there. The agent's TCP health check connects and closes every second without a byte, and
 * an SSL object made and freed for it cost ~130k instructions, nearly all an idle sidecar
 * ran. Returns 0 with end[0].tls set, -EAGAIN while waiting (events registered), or
 * ERR_SHUTDOWN after finishing the session (a probe: closed or reset before a byte).
 */
static int first_bytes(struct session *s)
{
    char c;
    ssize_t n;
    do
        n = recv(s->end[0].fd, &c, 1, MSG_PEEK);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return session_want(s, 0, LOOP_READ) != 0 ? ERR_SHUTDOWN : -EAGAIN;
    if (n <= 0) {
        /* Connect and close (or reset) without a byte: a TCP health check, not an attack. */
        session_finish(s, SESSION_RES_PROBE, "closed before the TLS handshake began");
        return ERR_SHUTDOWN;
    }
    LOG_DEBUG("conn=%llu first bytes from the caller: TLS handshake begins",
              (unsigned long long)s->id);
    s->end[0].tls = tls_conn_new_server(s->snap->tls, s->end[0].fd);
    if (s->end[0].tls == NULL) {
        session_finish(s, SESSION_RES_ERROR, "cannot allocate a TLS connection");
        return ERR_SHUTDOWN;
    }
    tls_conn_set_alpn_l7(s->end[0].tls, serves_http(s));
    return 0;
}

/* Moves the session forward as far as it can go without waiting. */
static void advance(struct session *s)
{
    int rc;
    switch (s->state) {
    case S_TLS_HANDSHAKE:
        if (s->inbound && s->end[0].tls == NULL && first_bytes(s) != 0)
            return;
        rc = step_handshake(s);
        if (rc == -EAGAIN || rc == ERR_SHUTDOWN)
            return;
        if (s->inbound) {
            if (rc != 0 && tls_conn_bytes_received(s->end[0].tls) == 0) {
                /* Connect and close without a byte: a TCP health check, not an attack. */
                session_finish(s, SESSION_RES_PROBE, "closed before the TLS handshake began");
                return;
            }
            if (rc != 0) {
                fail_inbound(s, handshake_reason(tls_conn_failure(s->end[0].tls)),
                             SESSION_RES_TLS_ERROR, tls_conn_error(s->end[0].tls));
                return;
            }
            STAT_ADD(s->host->stats->tls_handshakes[0][tls_conn_resumed(s->end[0].tls)], 1);
            loop_timer_stop(s->host->loop, &s->timer);
            /* The caller proved who it is: it no longer counts against the handshake caps. */
            limit_pending_release(s->admitted, &s->pending);
            authorize(s);
        } else if (rc != 0) {
            char why[600];
            snprintf(why, sizeof(why), "TLS handshake: %s", tls_conn_error(s->end[1].tls));
            try_next_endpoint(s, why);
        } else {
            STAT_ADD(s->host->stats->tls_handshakes[1][tls_conn_resumed(s->end[1].tls)], 1);
            verify_peer(s);
        }
        return;
    case S_CONNECT_LOCAL:
    case S_CONNECT:
        rc = sock_connect_result(s->end[1].fd);
        if (rc != 0) {
            char why[300];
            if (s->state == S_CONNECT) {
                snprintf(why, sizeof(why), "connect: %s", util_strerror(rc));
                try_next_endpoint(s, why);
            } else {
                if (s->snap->cfg.local_socket_path[0] != '\0')
                    snprintf(why, sizeof(why), "connect unix %s: %s",
                             s->snap->cfg.local_socket_path, util_strerror(rc));
                else
                    snprintf(why, sizeof(why), "connect %s:%d: %s", s->snap->cfg.local_address,
                             s->snap->cfg.local_port, util_strerror(rc));
                session_finish(s, SESSION_RES_LOCAL_CONNECT_ERROR, why);
            }
            return;
        }
        loop_timer_stop(s->host->loop, &s->timer);
        if (s->state == S_CONNECT) {
            start_handshake_out(s);
            return;
        }
        s->host->muxes.relay->start(s);
        return;
    case S_RELAY:
    case S_HTTP:
        s->carrier->advance(s);
        return;

    default:
        return;
    }
}

void session_on_io(struct loop_io *io, unsigned events)
{
    struct session *s = io->data;
    (void)events;
    advance(s);
}

static void on_timer(struct loop_timer *t)
{
    struct session *s = t->data;
    switch (s->state) {
    case S_TLS_HANDSHAKE:
        if (s->inbound)
            session_finish(s, SESSION_RES_TIMEOUT, "TLS handshake timed out");
        else
            try_next_endpoint(s, "TLS handshake timed out");
        return;
    case S_CONNECT:
        try_next_endpoint(s, "connect timed out");
        return;
    case S_CONNECT_LOCAL:
        session_finish(s, SESSION_RES_TIMEOUT, "connect to the local application timed out");
        return;
    case S_AUTHORIZE:
        session_finish(s, SESSION_RES_TIMEOUT,
                       "no answer from the agent's authorize endpoint in time");
        return;
    case S_RELAY:
    case S_HTTP:
        s->carrier->on_timer(s);
        return;

    default:
        return;
    }
}

static void on_lifetime(struct loop_timer *t)
{
    struct session *s = t->data;
    char why[100];
    snprintf(why, sizeof(why), "max_connection_lifetime_ms %lu reached",
             (unsigned long)s->snap->cfg.max_lifetime_ms);
    session_finish(s, SESSION_RES_LIFETIME, why);
}

/* ---- admission ---- */

static void on_refusal_summary(struct loop_timer *t)
{
    struct session_host *h = t->data;
    if (h->refused_since_summary == 0)
        return; /* a quiet second: the next refusal logs at once again */
    const struct session_counters *c = &h->stats->counters;
    LOG_WARN("worker %u: refused %llu more connection(s) over limits in the last %d ms "
             "(totals: %llu over a connection limit, %llu over a rate limit, %llu over the "
             "pending-handshake limit, %llu over the per-source one, %llu at the descriptor "
             "reserve)",
             h->index, (unsigned long long)h->refused_since_summary, REFUSAL_SUMMARY_MS,
             (unsigned long long)c->refused_max_connections, (unsigned long long)c->refused_rate,
             (unsigned long long)c->refused_pending, (unsigned long long)c->refused_pending_source,
             (unsigned long long)c->refused_descriptors);
    h->refused_since_summary = 0;
    loop_timer_start(h->loop, t, REFUSAL_SUMMARY_MS);
}

/* Closes the refused connection <fd> at once and logs why (already counted by the caller). */
static void refuse(struct session_host *h, int fd, const char *peer, const char *listener,
                   const char *why)
{
    close(fd);
    LOG_DEBUG("worker %u: refused connection from %s on %s: %s", h->index, peer, listener, why);
    if (!loop_timer_armed(&h->refusal_summary)) {
        /* The first refusal after a quiet second is logged at once; the rest are summed. */
        LOG_WARN("worker %u: refusing connections on %s: %s (further refusals summarized every "
                 "%d ms)",
                 h->index, listener, why, REFUSAL_SUMMARY_MS);
        loop_timer_start(h->loop, &h->refusal_summary, REFUSAL_SUMMARY_MS);
    } else {
        h->refused_since_summary++;
    }
}

static void report_handshake_warns(void *arg, const char *key, uint64_t suppressed,
                                   uint64_t open_ms)
{
    const struct session_host *h = arg;
    LOG_WARN("worker %u: suppressed %llu more failed handshake line(s) from %s in the last %llu "
             "ms (all are counted in connectd_handshake_failures_total)",
             h->index, (unsigned long long)suppressed, key, (unsigned long long)open_ms);
}

/* Reports the sources whose second of failed handshakes is over; runs while any is tracked. */
static void on_handshake_summary(struct loop_timer *t)
{
    struct session_host *h = t->data;
    uint64_t next =
        log_limit_flush(&h->handshake_warns, loop_now_ms(h->loop), report_handshake_warns, h);
    if (next != 0)
        loop_timer_start(h->loop, t, next);
}

static void report_unavailable_warns(void *arg, const char *key, uint64_t suppressed,
                                     uint64_t open_ms)
{
    const struct session_host *h = arg;
    LOG_WARN("worker %u: suppressed %llu more line(s) about requests to upstream %s answered 503 "
             "in the last %llu ms",
             h->index, (unsigned long long)suppressed, LOG_ESC(key), (unsigned long long)open_ms);
}

/* Reports the upstreams whose second of 503 lines is over; runs while any is tracked. */
static void on_unavailable_summary(struct loop_timer *t)
{
    struct session_host *h = t->data;
    uint64_t next =
        log_limit_flush(&h->unavailable_warns, loop_now_ms(h->loop), report_unavailable_warns, h);
    if (next != 0)
        loop_timer_start(h->loop, t, next);
}

void session_warn_unavailable(struct session *s, uint64_t stream, const char *why)
{
    struct session_host *h = s->host;
    const char *up = s->up != NULL ? s->up->cfg->destination_name : "";
    uint64_t before = 0;
    int pass = log_limit_pass(&h->unavailable_warns, up, loop_now_ms(h->loop), &before);
    if (!loop_timer_armed(&h->unavailable_summary))
        loop_timer_start(h->loop, &h->unavailable_summary, HANDSHAKE_WARN_MS);
    char note[96] = "";
    if (before != 0)
        snprintf(note, sizeof(note), " (suppressed %llu earlier such line(s))",
                 (unsigned long long)before);
    LOG_AT(pass ? LOG_LEVEL_WARN : LOG_LEVEL_DEBUG,
           "conn=%llu stream=%llu out upstream %s: answered 503: %s (endpoint %s)%s",
           (unsigned long long)s->id, (unsigned long long)stream, LOG_ESC(up), LOG_ESC(why),
           s->ep_name[0] != '\0' ? LOG_ESC(s->ep_name) : "none", note);
}

/*
 * Checks the listener's limits for a new connection. Returns 0 when admitted (the caller's
 * session then owns one unit of <l>), or -1 after closing <fd>, counting and logging.
 */
static int admit(struct session_host *h, int fd, const char *peer, const char *listener,
                 struct limit_state *l, const struct limit_cfg *cfg, const char *max_key)
{
    enum limit_verdict v = limit_admit(l, cfg, limit_now_us());
    if (v == LIMIT_OK)
        return 0;
    char why[200];
    if (v == LIMIT_MAX_CONNECTIONS) {
        STAT_ADD(h->stats->counters.refused_max_connections, 1);
        snprintf(why, sizeof(why), "%s %lu reached", max_key, (unsigned long)cfg->max_connections);
    } else {
        STAT_ADD(h->stats->counters.refused_rate, 1);
        snprintf(why, sizeof(why), "over max_new_connections_per_second %lu (burst %lu)",
                 (unsigned long)cfg->new_per_second,
                 (unsigned long)(cfg->new_burst != 0 ? cfg->new_burst : cfg->new_per_second));
    }
    refuse(h, fd, peer, listener, why);
    return -1;
}

/* The address part of a peer name from sock_accept() ("ip:port" or "[ip6]:port"), or "" for
 * a peer without one (a unix socket's). */
static void peer_source(const char *peer, char *out, size_t len)
{
    const char *colon = strrchr(peer, ':');
    const char *start = peer;
    size_t n = colon != NULL ? (size_t)(colon - peer) : 0;
    if (n >= 2 && peer[0] == '[' && peer[n - 1] == ']') {
        start++;
        n -= 2;
    }
    snprintf(out, len, "%.*s", (int)n, start);
}

/*
 * The admission checks that only the public listener has, after admit(): the descriptor
 * reserve (unauthenticated peers must never take the descriptors outbound dials, local
 * application connections and the agent need) and the pending-handshake caps (a silent peer
 * holds its descriptor until handshake_timeout_ms). Returns 0 with *<p> held, or -1 after
 * giving back what admit() took, closing <fd>, counting and logging.
 */
static int admit_handshake(struct session_host *h, int fd, const char *peer, struct limit_state *l,
                           const struct limit_cfg *cfg, struct limit_pending *p)
{
    char why[200], source[64];
    enum limit_verdict v = LIMIT_DESCRIPTORS;
    if (!limit_fds_over_reserve(fd)) {
        peer_source(peer, source, sizeof(source));
        v = limit_pending_admit(l, cfg, source, p);
        if (v == LIMIT_OK)
            return 0;
    }
    limit_release(l);
    if (v == LIMIT_DESCRIPTORS) {
        STAT_ADD(h->stats->counters.refused_descriptors, 1);
        snprintf(why, sizeof(why),
                 "descriptor %d is in the reserve of %ld kept for outbound connections and the "
                 "agent (open-files limit %ld)",
                 fd, limit_fds_reserve(), limit_fds_max());
    } else if (v == LIMIT_PENDING) {
        STAT_ADD(h->stats->counters.refused_pending, 1);
        snprintf(why, sizeof(why), "max_pending_handshakes %lu reached",
                 (unsigned long)limit_pending_max(cfg));
    } else {
        STAT_ADD(h->stats->counters.refused_pending_source, 1);
        snprintf(why, sizeof(why), "max_pending_handshakes_per_source %lu reached for %s",
                 (unsigned long)limit_pending_per_source_max(cfg), source);
    }
    refuse(h, fd, peer, "the public listener", why);
    return -1;
}

void session_host_init(struct session_host *h, struct loop *loop, unsigned index)
{
    memset(h, 0, sizeof(*h));
    h->loop = loop;
    h->index = index;
    loop_timer_init(&h->refusal_summary, on_refusal_summary, h);
    log_limit_init(&h->handshake_warns, HANDSHAKE_WARN_MS);
    loop_timer_init(&h->handshake_summary, on_handshake_summary, h);
    log_limit_init(&h->unavailable_warns, HANDSHAKE_WARN_MS);
    loop_timer_init(&h->unavailable_summary, on_unavailable_summary, h);
    loop_timer_init(&h->upool_sweep, upool_on_sweep, h);
    loop_timer_init(&h->trim, on_trim, h);
    /* ~105 KiB of listener and source slots, few ever used: mapped, so an unused one stays a
     * zero page (from the heap, calloc() wrote them all; test_worker_memory). */
    h->stats = xcalloc_pages(sizeof(*h->stats));
    h->h2up = h2up_pool_new(loop, &h->stats->h2up_conns, &h->stats->h2up_streams);
    snprintf(h->stats->other_listener.name, sizeof(h->stats->other_listener.name), "other");
    snprintf(h->stats->other_source.name, sizeof(h->stats->other_source.name), "other");
}

void session_host_dispose(struct session_host *h)
{
    loop_timer_stop(h->loop, &h->refusal_summary);
    loop_timer_stop(h->loop, &h->handshake_summary);
    loop_timer_stop(h->loop, &h->unavailable_summary);
    loop_timer_stop(h->loop, &h->upool_sweep);
    loop_timer_stop(h->loop, &h->trim);
    upool_drop_if(h, NULL, 0);
    memo_flush(h);
    h2up_pool_free(h->h2up);
    h->h2up = NULL;
    lb_cache_free(h);
    xfree_pages(h->stats, sizeof(*h->stats));
    h->stats = NULL;
}

void session_host_free_buffers(struct session_host *h)
{
    while (h->n_buf_pool > 0)
        free(h->buf_pool[--h->n_buf_pool]);
}

/* ---- entry points ---- */

void session_start_inbound(struct session_host *h, int fd, const char *peer)
{
    struct limit_state *l = h->snap->inbound_limit;
    struct limit_pending p;
    if (admit(h, fd, peer, "the public listener", l, &h->snap->cfg.limits,
              "max_inbound_connections") != 0 ||
        admit_handshake(h, fd, peer, l, &h->snap->cfg.limits, &p) != 0)
        return;
    struct session *s = session_new(h, fd, peer, 1, l, "public");
    s->pending = p;
    /* The TLS object comes with the caller's first bytes (first_bytes()); the handshake
     * deadline and the pending-handshake caps count from here, as for any handshake. */
    session_set_state(s, S_TLS_HANDSHAKE);
    loop_timer_start(h->loop, &s->timer, s->snap->cfg.handshake_timeout_ms);
    advance(s);
}

void session_start_exposed(struct session_host *h, int fd, const char *peer, int port)
{
    static const struct limit_cfg cap = {.max_connections = SESSION_EXPOSE_MAX_CONNECTIONS};
    const struct snap_expose *e = snapshot_expose(h->snap, port);
    char name[32];
    snprintf(name, sizeof(name), "expose:%d", port);
    if (e == NULL) {
        refuse(h, fd, peer, name, "the exposed listener is no longer configured");
        return;
    }
    char source[64], local[64] = "", local_addr[64];
    peer_source(peer, source, sizeof(source));
    sock_local_name(fd, local, sizeof(local));
    peer_source(local, local_addr, sizeof(local_addr));
    if (!snap_expose_source_ok(h->snap->exposes, e, source, local_addr)) {
        refuse(h, fd, peer, name, "a check listener takes callers from this host and the agent");
        return;
    }
    struct limit_state *l = h->snap->exposes->limit;
    if (admit(h, fd, peer, name, l, &cap, "the exposed listeners' connection cap") != 0)
        return;
    if (limit_fds_over_reserve(fd)) {
        /* Callers without an identity never take the descriptors kept for the mesh. */
        limit_release(l);
        STAT_ADD(h->stats->counters.refused_descriptors, 1);
        refuse(h, fd, peer, name, "descriptor in the reserve kept for outbound connections");
        return;
    }
    struct session *s = session_new(h, fd, peer, 1, l, e->name);
    s->expose = e;
    /* Plain HTTP/1.1 or h2c (prior knowledge, as the agent's gRPC checks speak), by the
     * caller's first bytes. */
    start_sniff(s);
}

void session_start_outbound(struct session_host *h, int fd, const char *peer,
                            const char *upstream_key)
{
    const struct snap_upstream *up = snapshot_upstream(h->snap, upstream_key);
    char listener[400];
    if (up != NULL) {
        snprintf(listener, sizeof(listener), "upstream %s", up->cfg->destination_name);
        if (admit(h, fd, peer, listener, up->limit, &up->cfg->limits, "limits.max_connections") !=
            0)
            return;
    }
    struct session *s = session_new(h, fd, peer, 0, up != NULL ? up->limit : NULL,
                                    up != NULL ? up->cfg->destination_name : upstream_key);
    s->upstream_key = xstrdup(upstream_key);
    s->up = up;
    if (s->up == NULL) {
        session_finish(s, SESSION_RES_NO_ENDPOINT, "upstream no longer configured");
        return;
    }
    size_t total = 0;
    for (size_t j = 0; j < s->up->n_targets; j++)
        total += s->up->targets[j].endpoints->n;
    s->tried = xcalloc(total ? total : 1, 1);
    if ((s->up->protocol == PROTO_HTTP && s->host->muxes.http1 != NULL) ||
        ((s->up->protocol == PROTO_HTTP2 || s->up->protocol == PROTO_GRPC) &&
         (s->host->muxes.http2 != NULL || s->host->muxes.http1 != NULL))) {
        /* L7: the application's first bytes choose (sniff_done): HTTP/1.1 goes to mux_h1,
         * which reads each request, then dials (session_dial_upstream, or for an http2 or
         * grpc upstream session_dial_h2: each request a stream on a shared HTTP/2
         * connection); HTTP/2 prior knowledge to mux_h2 for an http2 or grpc upstream, and is
         * relayed for an http one. */
        start_sniff(s);
        return;
    }
    pick_endpoint(s);
}

size_t session_reauthorize_all(struct session_host *h)
{
    size_t closed = 0;
    char why[600], desc[500];
    struct session *s = h->sessions, *next;
    for (; s != NULL; s = next) {
        next = s->next;
        /* An exposed listener's sessions have no caller to decide about. */
        if (!s->inbound || s->expose != NULL ||
            (s->state != S_CONNECT_LOCAL && s->state != S_RELAY && s->state != S_HTTP))
            continue;
        /* The trust domain is ours to check in both modes (the agent is not asked about it). */
        if (trust_domain_refused(s, "re-authorization: ", why, sizeof(why))) {
            STAT_ADD(h->stats->counters.reauthorized, 1);
            session_finish(s, SESSION_RES_BAD_IDENTITY, why);
            closed++;
            continue;
        }
        if (h->snap->cfg.authorize_with_agent) {
            /* The agent decides again; its answer arrives later (session_authorize_answer). */
            if (s->question == NULL && h->ask != NULL) {
                STAT_ADD(h->stats->counters.reauthorized, 1);
                post_question(s, 1);
            }
            continue;
        }
        if (s->state == S_HTTP)
            continue; /* authorized per request: the next one sees the change */
        STAT_ADD(h->stats->counters.reauthorized, 1);
        struct intent_decision d =
            intent_eval(h->snap->intents, s->caller_partition, s->caller_ns, s->caller_service);
        if (d.allow)
            continue;
        snprintf(why, sizeof(why), "re-authorization: %s", intent_describe(&d, desc, sizeof(desc)));
        session_finish(s, SESSION_RES_DENIED, why);
        closed++;
    }
    STAT_ADD(h->stats->counters.reauthorize_closed, closed);
    return closed;
}

static int always_stale(const char *key, const struct tls_ctx *tls, void *arg)
{
    (void)key;
    (void)tls;
    (void)arg;
    return 1;
}

void session_drain_all(struct session_host *h)
{
    struct session *s = h->sessions, *next;
    for (; s != NULL; s = next) {
        next = s->next;
        if (s->carrier != NULL && s->carrier->drain != NULL &&
            (s->state == S_HTTP || s->mux2 != NULL))
            s->carrier->drain(s);
    }
    h2up_sweep(h->h2up, always_stale, NULL);
}

void session_close_all(struct session_host *h)
{
    h->stopping = 1;
    while (h->sessions != NULL)
        session_finish(h->sessions, SESSION_RES_SHUTDOWN, "connectd is stopping");
}

size_t session_host_list(const struct session_host *h, struct session_info *out, size_t max)
{
    size_t n = 0;
    uint64_t now = loop_now_ms(h->loop);
    for (const struct session *s = h->sessions; s != NULL; s = s->next, n++) {
        if (n >= max)
            continue;
        struct session_info *i = &out[n];
        memset(i, 0, sizeof(*i));
        i->id = s->id;
        i->inbound = s->inbound;
        snprintf(i->peer_addr, sizeof(i->peer_addr), "%s", s->peer);
        if (s->inbound)
            snprintf(i->identity, sizeof(i->identity), "%s", s->caller ? s->caller : "");
        else if (s->up != NULL)
            snprintf(i->upstream, sizeof(i->upstream), "%s", s->up->cfg->destination_name);
        snprintf(i->endpoint, sizeof(i->endpoint), "%s", s->ep_name);
        snprintf(i->state, sizeof(i->state), "%s", state_names[s->state]);
        i->age_ms = now - s->start_ms;
        i->bytes_in = s->bytes[0];
        i->bytes_out = s->bytes[1];
    }
    return n;
}
