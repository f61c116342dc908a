/*
 * limit: admission limits shared by every worker: a count of open connections with a maximum,
 * a token bucket of new connections per second, and a count of pending TLS handshakes with a
 * maximum overall and per source address; and the process's descriptor budget.
 *
 * One struct limit_state belongs to one listener (the public one or an upstream's) and lives
 * across snapshots: the control thread creates it when the listener first appears and hands a
 * reference to every snapshot, so the counts survive configuration changes and hold across
 * all workers. Every operation is lock-free (atomics), safe from any thread.
 */
#ifndef CONNECTD_LIMIT_H
#define CONNECTD_LIMIT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "decode.h"

/* The settings of one listener; 0 in a field means "no limit". */
struct limit_cfg {
    uint32_t max_connections; /* concurrent connections */
    uint32_t new_per_second;  /* token bucket refill rate */
    uint32_t new_burst;       /* token bucket size; 0 = new_per_second */
    /* Concurrent connections still in the TLS handshake (public listener only); 0 = sized from
     * the descriptor limit (limit_pending_default()). */
    uint32_t max_pending;
    /* The same per source address; 0 = a sixteenth of the effective max_pending, at least 8. */
    uint32_t max_pending_per_source;
};

/*
 * Pending handshakes per source address: a fixed open-addressed table whose slots pack a
 * 40-bit hash of the address with a 24-bit count in one atomic word, so a slot is claimed,
 * counted and given back by compare-and-swap alone. A slot whose count is 0 is free whatever
 * its hash, so the table never grows and never needs cleaning.
 */
#define LIMIT_SOURCE_SLOTS 4096
#define LIMIT_SOURCE_PROBE 16 /* slots looked at from a hash's home slot */

struct limit_state {
    atomic_uint refs;
    atomic_long open;                  /* connections admitted and not yet released */
    atomic_uint_fast64_t bucket_at;    /* the bucket's theoretical arrival time, microseconds */
    atomic_long pending;               /* connections admitted to the handshake, not yet done */
    atomic_uint_fast64_t rate_limited; /* requests answered 429 by the request rate limits */
    atomic_uint_fast64_t sources[LIMIT_SOURCE_SLOTS];
};

/* Why limit_admit() or limit_pending_admit() refused. */
enum limit_verdict {
    LIMIT_OK = 0,
    LIMIT_MAX_CONNECTIONS,
    LIMIT_RATE,
    LIMIT_PENDING,            /* max_pending handshakes in progress */
    LIMIT_PENDING_PER_SOURCE, /* max_pending_per_source from this address in progress */
    LIMIT_DESCRIPTORS,        /* accepting would eat into the descriptor reserve */
};

/* What limit_pending_admit() took, to be given back with limit_pending_release(). */
struct limit_pending {
    int held; /* 1 while one unit of the pending count is held */
    int slot; /* the source table slot counted, or -1 (no address, or the table was full) */
};

/* A new state with nothing open and a full bucket (one reference). Never fails. */
struct limit_state *limit_state_new(void);
struct limit_state *limit_state_ref(struct limit_state *l);
/* Any thread; NULL is ignored. */
void limit_state_unref(struct limit_state *l);

/*
 * Admits one new connection at <now_us> (a monotonic clock in microseconds, see
 * limit_now_us()): checks the rate first, then the open count. On LIMIT_OK the open count was
 * raised by one and the caller must call limit_release() exactly once when the connection
 * ends; on a refusal nothing is held (a refused connection still spends a token, so a flood
 * cannot slip through while the count is high).
 */
enum limit_verdict limit_admit(struct limit_state *l, const struct limit_cfg *cfg, uint64_t now_us);
/* Gives back what a LIMIT_OK from limit_admit() took. */
void limit_release(struct limit_state *l);
/* The number of open connections now (for tests and logs; may be stale at once). */
long limit_open(const struct limit_state *l);

/*
 * The token bucket as a pure function (GCRA): a bucket of <burst> tokens (0 = <per_second>,
 * at least 1) refilled at <per_second> tokens per second, whose state is the theoretical
 * arrival time *<at_us>. Returns 1 and advances *<at_us> when a token is available at
 * <now_us>, else 0 and leaves it. <per_second> 0 always admits.
 */
int limit_bucket_take(uint64_t *at_us, uint64_t now_us, uint32_t per_second, uint32_t burst);

/*
 * Admits one connection from <source> (the peer's address without its port; NULL or "" for
 * none, such as a unix socket peer) to the TLS handshake: refuses with LIMIT_PENDING when the
 * effective max_pending handshakes are in progress over all workers, or LIMIT_PENDING_PER_SOURCE
 * when that many from the same address are (addresses are told apart by a 40-bit hash; when
 * the probe window of the source table is full of other addresses the connection is counted in
 * the total only). On LIMIT_OK *<p> holds what was taken: give it back exactly once with
 * limit_pending_release() when the handshake ends, however it ends. On a refusal nothing is
 * held. Any thread.
 */
enum limit_verdict limit_pending_admit(struct limit_state *l, const struct limit_cfg *cfg,
                                       const char *source, struct limit_pending *p);
/* Gives back what limit_pending_admit() took; a no-op when nothing is held. */
void limit_pending_release(struct limit_state *l, struct limit_pending *p);
/* Handshakes in progress over all workers now (for tests and logs; may be stale at once). */
long limit_pending_count(const struct limit_state *l);
/* The handshakes in progress from <source> now (0 when it has no slot). */
long limit_pending_source_count(const struct limit_state *l, const char *source);

/*
 * The process's descriptor budget. Descriptors are one table for the whole process, shared by
 * inbound connections, outbound dials, the local application's connections and the agent's, so
 * a part of it (the reserve) is kept from inbound accepts.
 *
 * limit_fds_raise() raises the soft RLIMIT_NOFILE to the hard limit (bounded by the kernel's
 * fs.nr_open when the hard limit is unlimited); *<before> and *<after> get the soft limit
 * before and after. Returns 0, or -errno when the limit could not be read or raised (then
 * *<after> is the limit still in force). Call once from main before any thread starts.
 */
int limit_fds_raise(long *before, long *after);
/*
 * Sets the budget to <max> descriptors (the soft limit in force) and derives the reserve,
 * max(32, max / 8). Call before any worker starts; later reads need no synchronisation.
 * Until it is called the budget is unknown and limit_fds_over_reserve() admits everything.
 */
void limit_fds_set(long max);
long limit_fds_max(void);
long limit_fds_reserve(void);
/*
 * 1 when the just-accepted descriptor number <fd> leaves fewer than the reserve free: the
 * kernel hands out the lowest free number, so every descriptor below <fd> is open and at
 * most max - fd - 1 remain. 0 otherwise, or while the budget is unknown.
 */
int limit_fds_over_reserve(int fd);
/*
 * The default of max_pending: half of the descriptors the reserve leaves (an authenticated
 * connection holds two, its caller's and the local application's), at least 1; 0 (no cap)
 * while the budget is unknown.
 */
uint32_t limit_pending_default(void);
/* The effective caps of <cfg>: its own values, or the defaults above. */
uint32_t limit_pending_max(const struct limit_cfg *cfg);
uint32_t limit_pending_per_source_max(const struct limit_cfg *cfg);

/*
 * Request rate limits of the inbound listener: the service-defaults entry's
 * RateLimits.InstanceLevel. A request takes a token from the bucket of the first route whose
 * path matches, else from the top-level bucket; a limit of 0 requests per second is no limit.
 * The buckets are shared by every worker (one atomic each), so the rate holds for the whole
 * instance whatever the number of workers.
 */
/* The compiled limits with their buckets: immutable but for the buckets' atomics. */
struct limit_rates;

/*
 * Builds the limits of <cfg> (copied). A bucket of <prev> (may be NULL) whose route (or the
 * top level) has the same match and the same numbers is shared, not reset, so a refresh of
 * the entry that leaves a limit alone does not hand out a fresh burst. A regex that does not
 * compile makes its route match every path (the limit fails closed); <err> (<errlen> bytes,
 * may be NULL) names it, else is "". Never fails (allocation aborts). One reference.
 */
struct limit_rates *limit_rates_new(const struct dec_rate_limits *cfg,
                                    const struct limit_rates *prev, char *err, size_t errlen);
struct limit_rates *limit_rates_ref(struct limit_rates *r);
/* Any thread; NULL is ignored. */
void limit_rates_unref(struct limit_rates *r);
/* 1 when <r> limits nothing (NULL, or every rate 0). */
int limit_rates_none(const struct limit_rates *r);

/* One rule of <r> as configured, for /config: rule 0 is the top level (path NULL, kind -1),
 * then Routes[] in order. */
struct limit_rate_rule {
    int kind; /* enum dec_path_match; -1 for the top level */
    const char *path;
    uint32_t per_second, burst;
};
/* How many rules <r> has (0 for NULL), and rule <i> of them. */
size_t limit_rates_rules(const struct limit_rates *r);
struct limit_rate_rule limit_rates_rule(const struct limit_rates *r, size_t i);

/*
 * Takes one token for a request to <path> (<len> bytes, without its query) at <now_us>.
 * Returns 1 when the request may go on, 0 when it is over its limit. <why> (<wlen> bytes)
 * names the limit that decided ("route PathPrefix /api: 5/s, burst 10"). <r> may be NULL.
 * Any thread.
 */
int limit_rates_take(struct limit_rates *r, const char *path, size_t len, uint64_t now_us,
                     char *why, size_t wlen);

/* Monotonic clock in microseconds. */
uint64_t limit_now_us(void);

#endif
