/*
 * watch: the blocking-query loop of consul-api.md 1.4 on top of agent_request().
 *
 *                watch_start()
 *                     |
 *                     v   response: schedule()        timer fires
 *               +-----------+ ------------------> +---------+ ----------+
 *          +--> | IN_FLIGHT |                     | WAITING |           |
 *          |    +-----------+ <-------------------+---------+           |
 *          |       |     ^      schedule() with no delay left           |
 *          |       |     +----------------------------------------------+
 *          |       | 200 that may carry news
 *          |       v
 *          |  +------------+  watch_stop() from the callback   +---------+
 *          +--| DELIVERING | --------------------------------> | STOPPED | -> freed when the
 *   schedule()+------------+                                   +---------+    callback returns
 *
 * watch_stop() outside the callback frees at once from any state. Health (healthy/failing) is
 * separate from this diagram: <failures> counts consecutive errors and drives both the back-off
 * and the log lines, which are written when the watch starts failing, when it recovers, and
 * at most once a minute in between.
 */
#include "watch.h"
#include "log.h"
#include "util.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_WAIT_MS      300000u
#define DEFAULT_POLL_MS      30000u
#define MIN_INTERVAL_MS      50u    /* at most 20 requests a second per watch */
#define NO_BLOCK_INTERVAL_MS 1000u  /* when the agent sent no index/hash to block on */
#define TIMEOUT_SLACK_MS     10000u /* above wait + wait/16 (the agent's own jitter) */
#define POLL_TIMEOUT_MS      30000L
#define REPEAT_LOG_MS        60000u
#define MAX_WAIT_MS          600000u /* the agent's max_query_time */
#define REASON_MAX           256
#define RETRY_MIN_MS         200   /* one-shot requests (watch_retry_later): first delay */
#define RETRY_MAX_MS         10000 /* ...and the cap */
#define FAIL_REJECTED        (-1L) /* fail(): the owner rejected the answer */
#define FAIL_TOO_LARGE       (-2L) /* fail(): the answer's body was over the cap */

enum watch_state {
    WATCH_IN_FLIGHT = 1, /* <req> is outstanding */
    WATCH_WAITING,       /* <timer> will start the next request */
    WATCH_DELIVERING,    /* the owner's callback is running */
    WATCH_STOPPED,       /* stopped from inside the callback; freed when it returns */
};

struct watch {
    struct agent *agent;
    struct loop *loop;
    char *name, *method, *path, *body;
    enum watch_block block;
    uint32_t wait_ms, poll_ms;
    int deliver_403_404;
    int block_on_rejected; /* see watch_spec */
    watch_cb cb;
    void *data;

    enum watch_state state;
    struct agent_req *req;
    struct loop_timer timer;

    uint64_t index; /* last accepted X-Consul-Index (WATCH_BY_INDEX) */
    char *hash;     /* last accepted X-Consul-ContentHash (WATCH_BY_HASH), "" at first */
    /* The last accepted body's length and keyed digest, to spot changes under an unchanged
     * index. Never the body itself: the leaf's carries the private key, which would otherwise
     * stay in memory as long as the watch. */
    struct util_digest last_digest;
    size_t last_body_len;
    int has_data;
    /* After a transport error the agent may be a restarted one whose indexes began again:
     * the next request does not block, and its answer counts as news only if the body
     * differs from the last accepted one. An index that went back does the same. */
    int resync;
    /* The position held is not one the agent gave (it answered X-Consul-Index 0, which
     * blocks as 1): the next answer is news only if its body differs. */
    int by_body;

    unsigned failures;
    /* The tracker's recovery made this watch retry at once since its last success. Once is
     * enough: a query that fails alone (reset, or held past its timeout, by a hop) while the
     * others are answered would otherwise be retried at every answer of every other watch,
     * its back-off skipped. */
    int kicked;
    long last_fail;            /* the <status> of the last fail(): the kind of failure */
    uint64_t last_reject_hash; /* of the reason the owner gave for its last rejection */
    uint64_t last_ok_ms;       /* util_now_ms() of the last good answer; 0 before the first */
    uint64_t last_start_ms;
    uint64_t last_log_ms;
    uint64_t last_index_log_ms; /* the last index_note() line */

    struct watch_reach *reach;
    struct watch *reach_prev, *reach_next; /* the tracker's list of its watches */
};

struct watch_reach {
    char *addr;
    int down;
    uint64_t down_ms; /* util_now_ms() of the transport error that began the outage */
    /* The "unreachable" line of the current outage was written (then so is "reachable
     * again"), and when the last one was: one query that keeps failing alone (a hop that
     * resets it, or holds it past its timeout) while the others are answered makes the
     * tracker go down and up again with each retry, so the lines come at most once a minute. */
    int down_logged;
    uint64_t last_down_log_ms;
    struct watch *watches;
};

static uint32_t backoff_base_ms = 200;
static uint32_t backoff_cap_ms = 30000;
static uint32_t default_wait_ms = DEFAULT_WAIT_MS;

void watch_set_default_wait_ms(uint32_t wait_ms)
{
    default_wait_ms = wait_ms == 0 ? DEFAULT_WAIT_MS : MIN(wait_ms, MAX_WAIT_MS);
}

void watch_set_backoff_ms_for_testing(uint32_t base_ms, uint32_t cap_ms)
{
    backoff_base_ms = base_ms ? base_ms : 200;
    backoff_cap_ms = cap_ms ? cap_ms : 30000;
}

static void start_request(struct watch *w);

static void set_state(struct watch *w, enum watch_state s)
{
    LOG_TRACE("watch %s: state %d -> %d", w->name, (int)w->state, (int)s);
    w->state = s;
}

static void reach_unlink(struct watch *w)
{
    if (w->reach == NULL)
        return;
    if (w->reach_prev != NULL)
        w->reach_prev->reach_next = w->reach_next;
    else
        w->reach->watches = w->reach_next;
    if (w->reach_next != NULL)
        w->reach_next->reach_prev = w->reach_prev;
    w->reach = NULL;
}

static void destroy(struct watch *w)
{
    reach_unlink(w);
    if (w->req != NULL)
        agent_cancel(w->req);
    loop_timer_stop(w->loop, &w->timer);
    free(w->name);
    free(w->method);
    free(w->path);
    free(w->body);
    free(w->hash);
    free(w);
}

static void on_timer(struct loop_timer *t)
{
    start_request(t->data);
}

/*
 * Starts the next request after <delay_ms>, but never sooner than MIN_INTERVAL_MS after the
 * previous one started, so no answer pattern can make a watch spin.
 */
static void schedule(struct watch *w, uint64_t delay_ms)
{
    uint64_t now = util_now_ms();
    uint64_t at = MAX(now + delay_ms, w->last_start_ms + MIN_INTERVAL_MS);
    if (at <= now) {
        start_request(w);
        return;
    }
    set_state(w, WATCH_WAITING);
    loop_timer_start(w->loop, &w->timer, at - now);
}

static void on_response(void *data, const struct agent_response *resp);
static void reach_note(struct watch_reach *r, const struct agent_response *resp, const char *who,
                       uint64_t started_ms);

static void start_request(struct watch *w)
{
    char query[1024];
    long timeout_ms = POLL_TIMEOUT_MS;
    query[0] = '\0';
    if (w->block == WATCH_BY_INDEX || w->block == WATCH_BY_HASH) {
        char pos[sizeof(query) - 64] = "";
        if (w->resync) {
            /* no position: answer at once */
        } else if (w->block == WATCH_BY_INDEX && w->index != 0) {
            snprintf(pos, sizeof(pos), "index=%" PRIu64 "&", w->index);
        } else if (w->block == WATCH_BY_HASH && w->hash[0] != '\0') {
            memcpy(pos, "hash=", 5);
            size_t n = 5 + util_url_escape_buf(pos + 5, sizeof(pos) - 6, w->hash);
            pos[n++] = '&';
            pos[n] = '\0';
        }
        snprintf(query, sizeof(query), "%c%swait=%" PRIu32 "ms",
                 strchr(w->path, '?') != NULL ? '&' : '?', pos, w->wait_ms);
        timeout_ms = (long)w->wait_ms + (long)(w->wait_ms / 16) + (long)TIMEOUT_SLACK_MS;
    }
    char *url = xasprintf("%s%s", w->path, query);
    w->last_start_ms = util_now_ms();
    set_state(w, WATCH_IN_FLIGHT);
    w->req = agent_request(w->agent, w->method, url, w->body, timeout_ms, on_response, w);
    free(url);
}

/* "HTTP 404: unknown service ID ..." or "transport error: ...", printable and bounded. */
static void describe(const struct agent_response *resp, char *buf, size_t len)
{
    if (resp->body_too_large) {
        snprintf(buf, len, "the answer's body is over the size cap (%s)", resp->error);
        return;
    }
    if (resp->status == 0) {
        snprintf(buf, len, "transport error: %s", resp->error[0] ? resp->error : "unknown");
        return;
    }
    int n = snprintf(buf, len, "HTTP %ld", resp->status);
    if (n < 0 || (size_t)n + 3 >= len || resp->body_len == 0)
        return;
    size_t at = (size_t)n;
    buf[at++] = ':';
    buf[at++] = ' ';
    for (size_t i = 0; i < resp->body_len && at + 1 < len; i++) {
        unsigned char c = (unsigned char)resp->body[i];
        if (c == '\n' || c == '\r')
            break;
        buf[at++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
    }
    buf[at] = '\0';
}

/*
 * <status>: the HTTP status, 0 for a transport error, FAIL_REJECTED for an answer the owner
 * rejected (the owner logs why, at watch_reject_level()), FAIL_TOO_LARGE for an answer whose
 * body was over the agent transport's cap. A failure of another kind than the previous one is
 * a change of state and logged; the same failure again is logged at most once a minute.
 */
static void fail(struct watch *w, const char *reason, long status)
{
    int transport = status == 0;
    uint64_t now = util_now_ms();
    int changed = w->failures == 0 || status != w->last_fail;
    w->failures++;
    w->last_fail = status;
    unsigned shift = MIN(w->failures - 1, 20u);
    uint64_t ceiling = MIN((uint64_t)backoff_base_ms << shift, (uint64_t)backoff_cap_ms);
    uint64_t delay = util_rand() % (ceiling + 1); /* full jitter; schedule() sets a floor */
    w->resync |= transport;
    if (transport && w->reach != NULL) {
        /* The tracker has said "agent unreachable" once for every watch. */
        LOG_DEBUG("watch %s: attempt %u failed: %s; next in %" PRIu64 " ms", w->name, w->failures,
                  reason, delay);
    } else if (changed && status == FAIL_REJECTED) {
        /* The owner has just logged what was wrong with the answer, in its own words. */
        LOG_DEBUG("watch %s: %s; next in %" PRIu64 " ms", w->name, reason, delay);
        w->last_log_ms = now;
    } else if (changed && status == 403) {
        /* The token is unknown or lacks a permission: no retry will fix that by itself. */
        LOG_ERROR("watch %s: %s %s refused: %s (HTTP 403: the ACL token is unknown or lacks "
                  "the permission; retrying with back-off)",
                  w->name, w->method, w->path, reason);
        w->last_log_ms = now;
    } else if (changed) {
        LOG_WARN("watch %s: %s %s failing: %s (retrying with back-off)", w->name, w->method,
                 w->path, reason);
        w->last_log_ms = now;
    } else if (now - w->last_log_ms >= REPEAT_LOG_MS) {
        LOG_WARN("watch %s: still failing after %u attempts: %s", w->name, w->failures, reason);
        w->last_log_ms = now;
    } else {
        LOG_DEBUG("watch %s: attempt %u failed: %s; next in %" PRIu64 " ms", w->name, w->failures,
                  reason, delay);
    }
    schedule(w, delay);
}

static void healthy(struct watch *w)
{
    w->last_ok_ms = util_now_ms();
    w->kicked = 0;
    if (w->failures > 0) {
        LOG_INFO("watch %s: recovered after %u failed attempts", w->name, w->failures);
        w->failures = 0;
    }
}

static int body_differs(const struct watch *w, const struct agent_response *resp)
{
    if (!w->has_data || resp->body_len != w->last_body_len)
        return 1;
    struct util_digest d;
    util_digest(resp->body, resp->body_len, &d);
    return memcmp(&d, &w->last_digest, sizeof(d)) != 0;
}

static void accept_response(struct watch *w, const struct agent_response *resp)
{
    /* An index of 0 blocks as 1 (see on_response()); the next answer is judged by its body. */
    int zero = w->block == WATCH_BY_INDEX && resp->status == 200 && resp->index == 0;
    w->index = zero ? 1 : resp->index;
    w->by_body = zero;
    if (w->block == WATCH_BY_HASH) {
        free(w->hash);
        w->hash = xstrdup(resp->content_hash);
    }
    util_digest(resp->body, resp->body_len, &w->last_digest);
    w->last_body_len = resp->body_len;
    w->has_data = 1;
}

/*
 * One line, at most once a minute per watch, about an index the agent should not have sent:
 * <to> 0 (a Consul bug: a query on index 0 never blocks) or one lower than <from> (a snapshot
 * restore or a new leader). A hop or an agent that keeps doing it must not flood the log.
 */
static void index_note(struct watch *w, uint64_t from, uint64_t to)
{
    uint64_t now = util_now_ms();
    if (w->last_index_log_ms != 0 && now - w->last_index_log_ms < REPEAT_LOG_MS) {
        LOG_DEBUG("watch %s: X-Consul-Index %" PRIu64 " after %" PRIu64, w->name, to, from);
        return;
    }
    w->last_index_log_ms = now;
    if (to == 0)
        LOG_WARN("watch %s: the agent answered X-Consul-Index 0, which no query can block on; "
                 "counting it as 1 and asking at most once a second while it lasts",
                 w->name);
    else
        LOG_INFO("watch %s: X-Consul-Index went back from %" PRIu64 " to %" PRIu64
                 " (a snapshot restore or a new leader?); starting over from index 0",
                 w->name, from, to);
}

static void on_response(void *data, const struct agent_response *resp)
{
    struct watch *w = data;
    w->req = NULL;
    int answer =
        resp->status == 200 || (w->deliver_403_404 && (resp->status == 403 || resp->status == 404));
    if (!answer) {
        char reason[REASON_MAX];
        describe(resp, reason, sizeof(reason));
        reach_note(w->reach, resp, w->name, w->last_start_ms);
        fail(w, reason, resp->body_too_large ? FAIL_TOO_LARGE : resp->status);
        return;
    }

    int news;
    uint64_t next_ms = 0;
    reach_note(w->reach, resp, w->name, w->last_start_ms);
    switch (resp->status == 403 ? 0 : (int)w->block) {
    case 0:
        /* A refusal has no index or hash to block on (nor to go back from): always the
         * owner's to judge. */
        news = 1;
        next_ms = NO_BLOCK_INTERVAL_MS;
        break;
    case WATCH_BY_INDEX:
        /* consul-api.md 1.4: an index lower than ours starts over from 0 (asked again with no
         * index, the answer news only if its body differs); an index of 0 counts as 1, so the
         * next query blocks (on an agent past 1 it returns at once: one a second, below). */
        if (resp->index == 0 && resp->status == 200)
            index_note(w, w->index, 0);
        if (w->resync || w->by_body) {
            news = body_differs(w, resp);
        } else if (MAX(resp->index, 1) < w->index) {
            if (resp->index != 0)
                index_note(w, w->index, resp->index);
            w->index = 0;
            w->resync = 1;
            healthy(w);
            schedule(w, 0);
            return;
        } else {
            news = MAX(resp->index, 1) != w->index || body_differs(w, resp);
        }
        if (resp->index == 0)
            next_ms = NO_BLOCK_INTERVAL_MS;
        break;
    case WATCH_BY_HASH:
        news = (!w->resync && strcmp(resp->content_hash, w->hash) != 0) || body_differs(w, resp);
        if (resp->content_hash[0] == '\0')
            next_ms = NO_BLOCK_INTERVAL_MS;
        break;
    default:
        news = body_differs(w, resp);
        next_ms = w->poll_ms;
        break;
    }

    if (news) {
        set_state(w, WATCH_DELIVERING);
        int rc = w->cb(w->data, resp);
        if (w->state == WATCH_STOPPED) {
            destroy(w);
            return;
        }
        if (rc < 0) {
            char reason[REASON_MAX];
            /* Only the position moves: changes are still judged against the last accepted
             * body, so the same rejected body offered again is rejected again. */
            if (w->block_on_rejected && w->block == WATCH_BY_INDEX && resp->status == 200 &&
                resp->index > w->index)
                w->index = resp->index;
            snprintf(reason, sizeof(reason), "response rejected: %s", util_strerror(rc));
            fail(w, reason, FAIL_REJECTED);
            return;
        }
        accept_response(w, resp);
    } else if (w->resync || w->by_body) {
        accept_response(w, resp); /* same data, but the agent's position to block on */
    }
    w->resync = 0;
    healthy(w);
    schedule(w, next_ms);
}

struct watch *watch_start(struct agent *a, const struct watch_spec *spec, watch_cb cb, void *data)
{
    struct watch *w = xcalloc(1, sizeof(*w));
    w->agent = a;
    w->loop = agent_loop(a);
    w->name = xstrdup(spec->name != NULL ? spec->name : spec->path);
    w->method = xstrdup(spec->method != NULL ? spec->method : "GET");
    w->path = xstrdup(spec->path);
    w->body = spec->body != NULL ? xstrdup(spec->body) : NULL;
    w->block = spec->block;
    w->deliver_403_404 = spec->deliver_403_404;
    w->block_on_rejected = spec->block_on_rejected;
    w->wait_ms = spec->wait_ms ? spec->wait_ms : default_wait_ms;
    w->poll_ms = MAX(spec->poll_ms ? spec->poll_ms : DEFAULT_POLL_MS, MIN_INTERVAL_MS);
    w->cb = cb;
    w->data = data;
    w->hash = xstrdup("");
    loop_timer_init(&w->timer, on_timer, w);
    if (spec->reach != NULL) {
        w->reach = spec->reach;
        w->reach_next = w->reach->watches;
        if (w->reach_next != NULL)
            w->reach_next->reach_prev = w;
        w->reach->watches = w;
    }
    start_request(w);
    return w;
}

void watch_stop(struct watch *w)
{
    if (w == NULL)
        return;
    if (w->state == WATCH_DELIVERING || w->state == WATCH_STOPPED) {
        set_state(w, WATCH_STOPPED); /* on_response() frees it when the callback returns */
        return;
    }
    destroy(w);
}

uint64_t watch_last_ok_ms(const struct watch *w)
{
    return w->last_ok_ms;
}

int watch_has_data(const struct watch *w)
{
    return w->has_data;
}

unsigned watch_failures(const struct watch *w)
{
    return w->failures;
}

enum log_level watch_reject_level(struct watch *w, const char *why)
{
    if (w == NULL)
        return LOG_LEVEL_ERROR;
    uint64_t h = util_hash_str(why != NULL ? why : "");
    int again = w->failures > 0 && w->last_fail == FAIL_REJECTED && h == w->last_reject_hash;
    w->last_reject_hash = h;
    return again ? LOG_LEVEL_DEBUG : LOG_LEVEL_ERROR;
}

void watch_retry_later(struct loop *loop, struct loop_timer *t, unsigned failures)
{
    uint64_t delay = MIN((uint64_t)RETRY_MIN_MS << MIN(failures, 6u), (uint64_t)RETRY_MAX_MS);
    loop_timer_start(loop, t, delay / 2 + util_rand() % (delay / 2));
}

struct watch_reach *watch_reach_new(const char *addr)
{
    struct watch_reach *r = xcalloc(1, sizeof(*r));
    r->addr = xstrdup(addr);
    return r;
}

void watch_reach_free(struct watch_reach *r)
{
    if (r == NULL)
        return;
    while (r->watches != NULL)
        reach_unlink(r->watches);
    free(r->addr);
    free(r);
}

/* <who>: the watch that saw <resp>, for the "unreachable" line; NULL for other requests.
 * <started_ms>: when the answered request was sent (UINT64_MAX: unknown, counts as new). */
static void reach_note(struct watch_reach *r, const struct agent_response *resp, const char *who,
                       uint64_t started_ms)
{
    if (r == NULL)
        return;
    /* An answer whose body was too large still came from the agent: it is reachable. */
    if (resp->status == 0 && !resp->body_too_large) {
        if (r->down)
            return;
        uint64_t now = util_now_ms();
        r->down_ms = now;
        r->down = 1;
        r->down_logged = r->last_down_log_ms == 0 || now - r->last_down_log_ms >= REPEAT_LOG_MS;
        if (r->down_logged)
            r->last_down_log_ms = now;
        LOG_AT(r->down_logged ? LOG_LEVEL_WARN : LOG_LEVEL_DEBUG,
               "agent %s unreachable (%s%s%s%s); serving with the last good certificates, "
               "intentions and endpoints",
               r->addr, who != NULL ? "watch " : "", who != NULL ? who : "",
               who != NULL ? ": " : "", resp->error[0] ? resp->error : "transport error");
        return;
    }
    /* An agent that is shutting down answers the blocking queries it holds (HTTP 500) while
     * it already refuses connections: such an answer, to a request sent before the outage
     * began, says nothing about the agent now and must not end the outage (which would log
     * it twice). Any other answer does: one query failing alone (reset by a hop) takes the
     * tracker down while the agent keeps answering the others' older blocking queries. */
    if (!r->down || (started_ms < r->down_ms && resp->status >= 500))
        return;
    r->down = 0;
    LOG_AT(r->down_logged ? LOG_LEVEL_INFO : LOG_LEVEL_DEBUG, "agent %s reachable again", r->addr);
    /* Everyone backing off retries now, once per streak of failures (see <kicked>);
     * schedule() keeps the per-watch minimum interval. The list cannot change under us:
     * starting a request never runs a callback. */
    for (struct watch *w = r->watches; w != NULL; w = w->reach_next) {
        if (w->state == WATCH_WAITING && w->failures > 0 && !w->kicked) {
            w->kicked = 1;
            loop_timer_stop(w->loop, &w->timer);
            schedule(w, 0);
        }
    }
}

void watch_reach_note(struct watch_reach *r, const struct agent_response *resp)
{
    reach_note(r, resp, NULL, UINT64_MAX);
}

int watch_reach_down(const struct watch_reach *r)
{
    return r != NULL && r->down;
}
