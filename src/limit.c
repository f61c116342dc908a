/*
 * limit: lock-free admission counters. The token bucket is kept as one number, the time at
 * which the bucket would be full again minus one token ("generic cell rate algorithm"), so a
 * compare-and-swap on a single 64-bit atomic updates it without a lock.
 */
#include "limit.h"
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

#define SOURCE_HASH_BITS  40
#define SOURCE_COUNT_BITS 24
#define SOURCE_COUNT_MASK ((UINT64_C(1) << SOURCE_COUNT_BITS) - 1)
#define FDS_RESERVE_MIN   32
#define PER_SOURCE_MIN    8

/* The descriptor budget: written once by main before the workers start, read-only after. */
static long fds_max, fds_reserve;

struct limit_state *limit_state_new(void)
{
    struct limit_state *l = xcalloc(1, sizeof(*l));
    atomic_init(&l->refs, 1);
    atomic_init(&l->open, 0);
    atomic_init(&l->bucket_at, 0);
    atomic_init(&l->pending, 0);
    for (size_t i = 0; i < LIMIT_SOURCE_SLOTS; i++)
        atomic_init(&l->sources[i], 0);
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

/* The address's hash folded to SOURCE_HASH_BITS, never 0 (a slot word of 0 reads as free). */
static uint64_t source_hash(const char *source)
{
    uint64_t h = util_hash_str(source);
    h = (h ^ (h >> SOURCE_HASH_BITS)) & ((UINT64_C(1) << SOURCE_HASH_BITS) - 1);
    return h != 0 ? h : 1;
}

static uint64_t slot_hash(uint64_t word)
{
    return word >> SOURCE_COUNT_BITS;
}

static uint64_t slot_count(uint64_t word)
{
    return word & SOURCE_COUNT_MASK;
}

/* Adds one to slot <i> when it counts the address with hash <h>: 1 when done, 0 when the slot
 * is not that address's, -2 when the address is at <max> (0 = no maximum). */
static int slot_add(struct limit_state *l, size_t i, uint64_t h, uint64_t max)
{
    uint64_t old = atomic_load_explicit(&l->sources[i], memory_order_relaxed);
    for (;;) {
        if (slot_count(old) == 0 || slot_hash(old) != h)
            return 0;
        if (max != 0 && slot_count(old) >= max)
            return -2;
        if (atomic_compare_exchange_weak_explicit(&l->sources[i], &old, old + 1,
                                                  memory_order_relaxed, memory_order_relaxed))
            return 1;
    }
}

/*
 * Counts one more handshake from the address with hash <h>: in the slot that already counts
 * it, else in the first free slot of its probe window. Returns the slot, -1 when the window
 * holds only other addresses, or -2 when the address is at <max> (0 = no maximum).
 */
static int source_take(struct limit_state *l, uint64_t h, uint64_t max)
{
    size_t home = (size_t)(h % LIMIT_SOURCE_SLOTS);
    for (size_t k = 0; k < LIMIT_SOURCE_PROBE; k++) {
        size_t i = (home + k) % LIMIT_SOURCE_SLOTS;
        int rc = slot_add(l, i, h, max);
        if (rc != 0)
            return rc == 1 ? (int)i : -2;
    }
    for (size_t k = 0; k < LIMIT_SOURCE_PROBE; k++) {
        size_t i = (home + k) % LIMIT_SOURCE_SLOTS;
        uint64_t old = atomic_load_explicit(&l->sources[i], memory_order_relaxed);
        while (slot_count(old) == 0) {
            if (!atomic_compare_exchange_weak_explicit(&l->sources[i], &old,
                                                       (h << SOURCE_COUNT_BITS) | 1,
                                                       memory_order_relaxed, memory_order_relaxed))
                continue;
            /* Another worker may have claimed a slot for the same new address at the same
             * time: the claim nearest the home slot keeps counting it, the other moves there,
             * so the address is not counted in two slots (short of a slot freed mid-race). */
            for (size_t j = 0; j < k; j++) {
                size_t o = (home + j) % LIMIT_SOURCE_SLOTS;
                int rc = slot_add(l, o, h, max);
                if (rc == 0)
                    continue;
                atomic_fetch_sub_explicit(&l->sources[i], 1, memory_order_relaxed);
                return rc == 1 ? (int)o : -2;
            }
            return (int)i;
        }
    }
    return -1;
}

enum limit_verdict limit_pending_admit(struct limit_state *l, const struct limit_cfg *cfg,
                                       const char *source, struct limit_pending *p)
{
    p->held = 0;
    p->slot = -1;
    uint32_t max = limit_pending_max(cfg);
    long n = atomic_fetch_add_explicit(&l->pending, 1, memory_order_relaxed);
    if (max != 0 && n >= (long)max) {
        atomic_fetch_sub_explicit(&l->pending, 1, memory_order_relaxed);
        return LIMIT_PENDING;
    }
    if (source != NULL && source[0] != '\0') {
        int slot = source_take(l, source_hash(source), limit_pending_per_source_max(cfg));
        if (slot == -2) {
            atomic_fetch_sub_explicit(&l->pending, 1, memory_order_relaxed);
            return LIMIT_PENDING_PER_SOURCE;
        }
        p->slot = slot;
    }
    p->held = 1;
    return LIMIT_OK;
}

void limit_pending_release(struct limit_state *l, struct limit_pending *p)
{
    if (!p->held)
        return;
    if (p->slot >= 0)
        atomic_fetch_sub_explicit(&l->sources[p->slot], 1, memory_order_relaxed);
    atomic_fetch_sub_explicit(&l->pending, 1, memory_order_relaxed);
    p->held = 0;
    p->slot = -1;
}

long limit_pending_count(const struct limit_state *l)
{
    return atomic_load_explicit(&l->pending, memory_order_relaxed);
}

long limit_pending_source_count(const struct limit_state *l, const char *source)
{
    uint64_t h = source_hash(source);
    long n = 0;
    for (size_t k = 0; k < LIMIT_SOURCE_PROBE; k++) {
        uint64_t w =
            atomic_load_explicit(&l->sources[(h + k) % LIMIT_SOURCE_SLOTS], memory_order_relaxed);
        if (slot_count(w) != 0 && slot_hash(w) == h)
            n += (long)slot_count(w);
    }
    return n;
}

/* The kernel's ceiling on any process's descriptors, or -1. */
static long nr_open(void)
{
    FILE *f = fopen("/proc/sys/fs/nr_open", "re");
    long v = -1;
    if (f == NULL)
        return -1;
    if (fscanf(f, "%ld", &v) != 1)
        v = -1;
    fclose(f);
    return v;
}

int limit_fds_raise(long *before, long *after)
{
    struct rlimit rl;
    *before = *after = 0;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return -errno;
    *before = *after = rl.rlim_cur == RLIM_INFINITY ? -1 : (long)rl.rlim_cur;
    rlim_t want = rl.rlim_max;
    if (want == RLIM_INFINITY) {
        long k = nr_open();
        if (k <= 0)
            return 0;
        want = (rlim_t)k;
    }
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur >= want)
        return 0;
    rl.rlim_cur = want;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        return -errno;
    *after = (long)want;
    return 0;
}

void limit_fds_set(long max)
{
    fds_max = max > 0 ? max : 0;
    fds_reserve = fds_max / 8 > FDS_RESERVE_MIN ? fds_max / 8 : FDS_RESERVE_MIN;
    if (fds_max == 0)
        fds_reserve = 0;
}

long limit_fds_max(void)
{
    return fds_max;
}

long limit_fds_reserve(void)
{
    return fds_reserve;
}

int limit_fds_over_reserve(int fd)
{
    return fds_max != 0 && (long)fd >= fds_max - fds_reserve;
}

uint32_t limit_pending_default(void)
{
    if (fds_max == 0)
        return 0;
    long n = (fds_max - fds_reserve) / 2;
    if (n < 1)
        n = 1;
    return n > 10000000 ? 10000000u : (uint32_t)n;
}

uint32_t limit_pending_max(const struct limit_cfg *cfg)
{
    return cfg->max_pending != 0 ? cfg->max_pending : limit_pending_default();
}

uint32_t limit_pending_per_source_max(const struct limit_cfg *cfg)
{
    if (cfg->max_pending_per_source != 0)
        return cfg->max_pending_per_source;
    uint32_t max = limit_pending_max(cfg);
    if (max == 0)
        return 0;
    uint32_t n = max / 16 > PER_SOURCE_MIN ? max / 16 : PER_SOURCE_MIN;
    return n < max ? n : max;
}

uint64_t limit_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}
