/*
 * limit: lock-free admission counters. The token bucket is kept as one number, the time at
 * which the bucket would be full again minus one token ("generic cell rate algorithm"), so a
 * compare-and-swap on a single 64-bit atomic updates it without a lock.
 */
#include "limit.h"
#include "util.h"

#include <stdlib.h>
#include <time.h>

struct limit_state *limit_state_new(void)
{
    struct limit_state *l = xcalloc(1, sizeof(*l));
    atomic_init(&l->refs, 1);
    atomic_init(&l->open, 0);
    atomic_init(&l->bucket_at, 0);
    return l;
}

struct limit_state *limit_state_ref(struct limit_state *l)
{
    atomic_fetch_add_explicit(&l->refs, 1, memory_order_relaxed);
    return l;
}

void limit_state_unref(struct limit_state *l)
{
    if (l == NULL || atomic_fetch_sub_explicit(&l->refs, 1, memory_order_acq_rel) != 1)
        return;
    free(l);
}

int limit_bucket_take(uint64_t *at_us, uint64_t now_us, uint32_t per_second, uint32_t burst)
{
    if (per_second == 0)
        return 1;
    uint64_t interval = 1000000u / per_second;
    if (interval == 0)
        interval = 1;
    uint64_t size = burst != 0 ? burst : per_second;
    uint64_t at = *at_us > now_us ? *at_us : now_us;
    /* Tokens in use after this one, measured in refill intervals, must fit in the bucket. */
    if (at - now_us + interval > size * interval)
        return 0;
    *at_us = at + interval;
    return 1;
}

enum limit_verdict limit_admit(struct limit_state *l, const struct limit_cfg *cfg, uint64_t now_us)
{
    if (cfg->new_per_second != 0) {
        uint_fast64_t old = atomic_load_explicit(&l->bucket_at, memory_order_relaxed);
        for (;;) {
            uint64_t at = old;
            if (!limit_bucket_take(&at, now_us, cfg->new_per_second, cfg->new_burst))
                return LIMIT_RATE;
            if (atomic_compare_exchange_weak_explicit(&l->bucket_at, &old, at, memory_order_relaxed,
                                                      memory_order_relaxed))
                break;
        }
    }
    long n = atomic_fetch_add_explicit(&l->open, 1, memory_order_relaxed);
    if (cfg->max_connections != 0 && n >= (long)cfg->max_connections) {
        atomic_fetch_sub_explicit(&l->open, 1, memory_order_relaxed);
        return LIMIT_MAX_CONNECTIONS;
    }
    return LIMIT_OK;
}

void limit_release(struct limit_state *l)
{
    atomic_fetch_sub_explicit(&l->open, 1, memory_order_relaxed);
}

long limit_open(const struct limit_state *l)
{
    return atomic_load_explicit(&l->open, memory_order_relaxed);
}

uint64_t limit_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}
