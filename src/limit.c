/*
 * limit: lock-free admission counters. The token bucket is kept as one number, the time at
 * which the bucket would be full again minus one token ("generic cell rate algorithm"), so a
 * compare-and-swap on a single 64-bit atomic updates it without a lock.
 */
#include "limit.h"
#include "rx.h"
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
    /* Mapped: the source table's 32 KiB cost nothing until a source is counted in a slot, and
     * a limit that never counts sources (an upstream's, the exposed paths') keeps one page.
     * Its slots start as the kernel's zero pages, which is what atomic_init(0) would store. */
    struct limit_state *l = xcalloc_pages(sizeof(*l));
    atomic_init(&l->refs, 1);
    atomic_init(&l->open, 0);
    atomic_init(&l->bucket_at, 0);
    atomic_init(&l->pending, 0);
    atomic_init(&l->rate_limited, 0);
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
    xfree_pages(l, sizeof(*l));
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

/* ---- request rate limits ---- */

/* One token bucket, shared by the limits built from one another while its numbers stay. */
struct limit_bucket {
    atomic_uint refs;
    atomic_uint_fast64_t at; /* the theoretical arrival time, microseconds (limit_bucket_take) */
};

struct rate_rule {
    int kind;   /* enum dec_path_match, or -1 for the top level */
    char *path; /* owned; NULL at the top level */
    size_t plen;
    struct rx *rx; /* DEC_PATH_REGEX; NULL when it did not compile (matches every path) */
    uint32_t per_second, burst;
    struct limit_bucket *bucket; /* one reference; NULL when per_second is 0 */
};

struct limit_rates {
    atomic_uint refs;
    struct rate_rule top;
    struct rate_rule *routes;
    size_t n_routes;
};

static int same_rule(const struct rate_rule *r, int kind, const char *path, uint32_t per_second,
                     uint32_t burst)
{
    if (r->kind != kind || r->per_second != per_second || r->burst != burst)
        return 0;
    return path == NULL ? r->path == NULL : r->path != NULL && strcmp(r->path, path) == 0;
}

/* The bucket of the rule of <prev> with the same match and numbers, with a new reference; or
 * a new full one. */
static struct limit_bucket *bucket_for(const struct limit_rates *prev, int kind, const char *path,
                                       uint32_t per_second, uint32_t burst)
{
    if (per_second == 0)
        return NULL;
    if (prev != NULL) {
        const struct rate_rule *hit = NULL;
        if (same_rule(&prev->top, kind, path, per_second, burst))
            hit = &prev->top;
        for (size_t i = 0; hit == NULL && i < prev->n_routes; i++)
            if (same_rule(&prev->routes[i], kind, path, per_second, burst))
                hit = &prev->routes[i];
        if (hit != NULL && hit->bucket != NULL) {
            atomic_fetch_add_explicit(&hit->bucket->refs, 1, memory_order_relaxed);
            return hit->bucket;
        }
    }
    struct limit_bucket *b = xcalloc(1, sizeof(*b));
    atomic_init(&b->refs, 1);
    atomic_init(&b->at, 0);
    return b;
}

static void bucket_unref(struct limit_bucket *b)
{
    if (b != NULL && atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) == 1)
        free(b);
}

struct limit_rates *limit_rates_new(const struct dec_rate_limits *cfg,
                                    const struct limit_rates *prev, char *err, size_t errlen)
{
    struct limit_rates *r = xcalloc(1, sizeof(*r));
    atomic_init(&r->refs, 1);
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    r->top.kind = -1;
    r->top.per_second = cfg->per_second;
    r->top.burst = cfg->burst;
    r->top.bucket = bucket_for(prev, -1, NULL, cfg->per_second, cfg->burst);
    r->routes = cfg->n_routes ? xcalloc(cfg->n_routes, sizeof(*r->routes)) : NULL;
    r->n_routes = cfg->n_routes;
    for (size_t i = 0; i < cfg->n_routes; i++) {
        const struct dec_rate_route *c = &cfg->routes[i];
        struct rate_rule *u = &r->routes[i];
        u->kind = c->kind;
        u->path = xstrdup(c->path);
        u->plen = strlen(c->path);
        u->per_second = c->per_second;
        u->burst = c->burst;
        u->bucket = bucket_for(prev, c->kind, c->path, c->per_second, c->burst);
        if (c->kind == DEC_PATH_REGEX) {
            char why[256];
            if (rx_compile(u->path, u->plen, &u->rx, why, sizeof(why)) != 0 && err != NULL &&
                err[0] == '\0')
                snprintf(err, errlen, "Routes[%zu].PathRegex: %s", i, why);
        }
    }
    return r;
}

struct limit_rates *limit_rates_ref(struct limit_rates *r)
{
    atomic_fetch_add_explicit(&r->refs, 1, memory_order_relaxed);
    return r;
}

void limit_rates_unref(struct limit_rates *r)
{
    if (r == NULL || atomic_fetch_sub_explicit(&r->refs, 1, memory_order_acq_rel) != 1)
        return;
    bucket_unref(r->top.bucket);
    for (size_t i = 0; i < r->n_routes; i++) {
        free(r->routes[i].path);
        rx_free(r->routes[i].rx);
        bucket_unref(r->routes[i].bucket);
    }
    free(r->routes);
    free(r);
}

size_t limit_rates_rules(const struct limit_rates *r)
{
    return r != NULL ? 1 + r->n_routes : 0;
}

struct limit_rate_rule limit_rates_rule(const struct limit_rates *r, size_t i)
{
    const struct rate_rule *x = i == 0 ? &r->top : &r->routes[i - 1];
    return (struct limit_rate_rule){
        .kind = x->kind, .path = x->path, .per_second = x->per_second, .burst = x->burst};
}

int limit_rates_none(const struct limit_rates *r)
{
    if (r == NULL)
        return 1;
    if (r->top.per_second != 0)
        return 0;
    for (size_t i = 0; i < r->n_routes; i++)
        if (r->routes[i].per_second != 0)
            return 0;
    return 1;
}

/* 1 when route <u> matches <path>; a regex that did not compile or hit its match limit
 * matches (the limit fails closed). */
static int route_matches(const struct rate_rule *u, const char *path, size_t len)
{
    switch (u->kind) {
    case DEC_PATH_EXACT:
        return len == u->plen && memcmp(path, u->path, len) == 0;
    case DEC_PATH_PREFIX:
        return len >= u->plen && memcmp(path, u->path, u->plen) == 0;
    default:
        return u->rx == NULL || rx_match(u->rx, path, len) != 0;
    }
}

static const char *kind_name(int kind)
{
    return kind == DEC_PATH_EXACT    ? "PathExact"
           : kind == DEC_PATH_PREFIX ? "PathPrefix"
                                     : "PathRegex";
}

int limit_rates_take(struct limit_rates *r, const char *path, size_t len, uint64_t now_us,
                     char *why, size_t wlen)
{
    if (wlen > 0)
        why[0] = '\0';
    if (r == NULL)
        return 1;
    const struct rate_rule *rule = &r->top;
    for (size_t i = 0; i < r->n_routes; i++) {
        if (route_matches(&r->routes[i], path, len)) {
            rule = &r->routes[i]; /* the first match wins and overrides the top level */
            break;
        }
    }
    if (rule->bucket == NULL)
        return 1;
    uint32_t burst = rule->burst != 0 ? rule->burst : rule->per_second;
    if (rule->kind < 0)
        snprintf(why, wlen, "rate limit: %u/s, burst %u", rule->per_second, burst);
    else
        snprintf(why, wlen, "rate limit: route %s %.200s: %u/s, burst %u", kind_name(rule->kind),
                 rule->path, rule->per_second, burst);
    uint_fast64_t old = atomic_load_explicit(&rule->bucket->at, memory_order_relaxed);
    for (;;) {
        uint64_t at = old;
        if (!limit_bucket_take(&at, now_us, rule->per_second, rule->burst))
            return 0;
        if (atomic_compare_exchange_weak_explicit(&rule->bucket->at, &old, at, memory_order_relaxed,
                                                  memory_order_relaxed))
            return 1;
    }
}

uint64_t limit_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}
