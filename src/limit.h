/*
 * limit: admission limits shared by every worker: a count of open connections with a maximum,
 * and a token bucket of new connections per second.
 *
 * One struct limit_state belongs to one listener (the public one or an upstream's) and lives
 * across snapshots: the control thread creates it when the listener first appears and hands a
 * reference to every snapshot, so the counts survive configuration changes and hold across
 * all workers. Every operation is lock-free (atomics), safe from any thread.
 */
#ifndef CONNECTD_LIMIT_H
#define CONNECTD_LIMIT_H

#include <stdatomic.h>
#include <stdint.h>

/* The settings of one listener; 0 in a field means "no limit". */
struct limit_cfg {
    uint32_t max_connections; /* concurrent connections */
    uint32_t new_per_second;  /* token bucket refill rate */
    uint32_t new_burst;       /* token bucket size; 0 = new_per_second */
};

struct limit_state {
    atomic_uint refs;
    atomic_long open;               /* connections admitted and not yet released */
    atomic_uint_fast64_t bucket_at; /* the bucket's theoretical arrival time, microseconds */
};

/* Why limit_admit() refused. */
enum limit_verdict {
    LIMIT_OK = 0,
    LIMIT_MAX_CONNECTIONS,
    LIMIT_RATE,
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

/* Monotonic clock in microseconds. */
uint64_t limit_now_us(void);

#endif
