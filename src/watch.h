/*
 * watch: one long-poll blocking query kept running against the agent (consul-api.md 1.4).
 *
 * A watch repeats its request forever: by index (?index=N&wait=) or by content hash
 * (?hash=H&wait=). It delivers a response to its callback only when something may have
 * changed (the index moved, the hash changed, or the body differs), resets the index to 0 when
 * it goes backwards, uses a request timeout above the wait, and backs off with jitter after
 * errors (transport errors, non-200 statuses, bodies over the agent transport's cap, and
 * bodies the callback rejects), logging when its state changes (a failure of another kind)
 * rather than on every retry, then at most once a minute. After a transport error the next
 * request carries no index or hash (the agent may have restarted with its indexes begun
 * again) and is news only when the body differs; so is the answer after an index that went
 * back. An X-Consul-Index of 0 counts as 1 (Consul's blocking-query rules), and the answer
 * after it is news only when the body differs. An index that went back or came as 0 is
 * logged at most once a minute per watch. Requests of one watch start at least 50 ms apart;
 * a blocking answer without an index (or hash) to block on is re-asked after 1 s.
 */
#ifndef CONNECTD_WATCH_H
#define CONNECTD_WATCH_H

#include <stdint.h>

#include "agent.h"
#include "log.h"

enum watch_block {
    WATCH_BY_INDEX = 1,
    WATCH_BY_HASH,
    WATCH_POLL, /* no blocking: repeat every poll_ms */
};

struct watch_spec {
    const char *name;   /* for logs: "roots", "leaf web", ... */
    const char *method; /* "GET" or "POST" */
    const char *path;   /* path and query without index/hash/wait, e.g.
                           "/v1/health/connect/db?passing&cached" */
    const char *body;   /* NULL or a JSON body for POST */
    enum watch_block block;
    uint32_t wait_ms; /* blocking wait; 0 = the default (watch_set_default_wait_ms) */
    uint32_t poll_ms; /* WATCH_POLL interval */
    /* NULL, or the reachability tracker this watch reports to (see below); not owned. */
    struct watch_reach *reach;
    /* Also hand 403 and 404 answers to the callback, as news like a 200 (a config entry that
     * may not exist, or may not be readable with the token): its owner decides what they
     * mean. Other non-200 answers never reach the callback. */
    int deliver_403_404;
    /* WATCH_BY_INDEX: after the callback rejects an answer, block on that answer's index
     * rather than ask again from the last good one, so the next request returns only when the
     * data changes. For data whose rejection only a change can cure (a discovery chain), read
     * with ?cached: the agent's cache does not refresh an entry that no one blocks on past
     * its index, so asking from the older index gets the rejected answer back for ever. */
    int block_on_rejected;
};

/*
 * Called with each 200 response that may carry news (and 403 and 404 ones with
 * deliver_403_404). Return 0 to accept it (the watch then advances its index/hash), or a
 * negative code when the body is unusable: the watch then keeps its previous position (or,
 * with block_on_rejected, blocks on the rejected answer's index), counts a failure and backs
 * off (the caller keeps its last good state). The callback logs why it rejected an answer, at
 * watch_reject_level(), so that one line tells of a bad answer however often it comes back;
 * the watch itself logs the rejection only at DEBUG (and "still failing" once a minute).
 * Other non-200 answers never reach the callback.
 */
typedef int (*watch_cb)(void *data, const struct agent_response *resp);

struct watch;

/* Copies <spec>; the first request starts at once (before the loop's next iteration). */
struct watch *watch_start(struct agent *a, const struct watch_spec *spec, watch_cb cb, void *data);
/* Stops and frees; safe from inside the watch's own callback. */
void watch_stop(struct watch *w);

/* 1 once a response has been accepted; for readiness. */
int watch_has_data(const struct watch *w);
/* util_now_ms() of the last good answer (accepted or unchanged), or 0 before the first. */
uint64_t watch_last_ok_ms(const struct watch *w);
/* Consecutive failures since the last success (0 when healthy). */
unsigned watch_failures(const struct watch *w);
/*
 * The level at which a callback logs <why> it rejects the answer being delivered:
 * LOG_LEVEL_ERROR unless the previous failure of <w> was a rejection for the same <why> (then
 * LOG_LEVEL_DEBUG: the retries of one bad answer are not news; another fault is). Remembers
 * <why> (a hash of it) for the next call; call it once per rejection, into a variable (LOG_AT
 * evaluates its level twice). NULL <w> gives LOG_LEVEL_ERROR.
 */
enum log_level watch_reject_level(struct watch *w, const char *why);

/* Visits one watch of a module that owns several, with its name (for /metrics). */
typedef void (*watch_visit_cb)(void *data, const char *name, const struct watch *w);

/*
 * Re-arms <t> on <loop> for the next try of a one-shot agent request (not a watch) that has
 * failed <failures> times before: exponential from 200 ms to 10 s, jittered over the upper
 * half so sidecars started together do not retry in step.
 */
void watch_retry_later(struct loop *loop, struct loop_timer *t, unsigned failures);

/*
 * Reachability of one agent, shared by every watch (and one-off request) that talks to it, so
 * an outage is logged once rather than once per watch and retry: "agent <addr> unreachable"
 * when the first transport error arrives while the agent was reachable, "agent <addr>
 * reachable again" when any HTTP answer (whatever its status) to a request sent after that
 * error arrives (an agent on its way out answers the queries it holds); both at most once a
 * minute (then at DEBUG), since one query failing alone while the others are answered takes
 * the tracker down and up with each retry. On recovery every watch of the tracker that is
 * backing off after a failure retries at once, so all inputs resume together instead of each
 * waiting out its own back-off; a watch does so once until it succeeds again, so one failing
 * alone keeps its back-off. Create it before the watches that use it and free it after they
 * are stopped.
 */
struct watch_reach;

/* <addr> is copied, for the log lines. */
struct watch_reach *watch_reach_new(const char *addr);
void watch_reach_free(struct watch_reach *r);
/* Reports the outcome of a request that is not a watch (status 0 means a transport error). */
void watch_reach_note(struct watch_reach *r, const struct agent_response *resp);
/* 1 while the agent is considered unreachable. */
int watch_reach_down(const struct watch_reach *r);

/*
 * The blocking wait of watches started from now on whose spec says 0 (-watch-wait): 0 restores
 * the agent's default of 5 minutes; at most 10 minutes (the agent's max_query_time). Control
 * thread only; call before starting watches.
 */
void watch_set_default_wait_ms(uint32_t wait_ms);

/*
 * Tests only: sets the error back-off's first ceiling and its cap (defaults 200 ms and 30 s;
 * 0 restores a default). Delays are drawn uniformly below the ceiling (full jitter), which
 * doubles with each consecutive failure; a watch never starts two requests less than 50 ms
 * apart whatever these are. Not thread-safe; call before starting watches.
 */
void watch_set_backoff_ms_for_testing(uint32_t base_ms, uint32_t cap_ms);

#endif
