/*
 * outlier: an upstream's request counts and its endpoints' passive health.
 *
 * Envoy decides a consecutive-5xx ejection on its main thread, after the workers post the
 * event; here the worker whose report makes the count decides it at once, under a flag held
 * only while the target's ejected hosts are counted and the host's times stored (no system
 * call, a few hundred instructions), so two workers cannot both eject past max_ejection_pct.
 * Returns are lazy: a host whose time is over comes back the first time anyone looks at it
 * (the dial, or the metrics), which is when Envoy's sweep would have found it due.
 */
#include "outlier.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *const limit_names[OUTLIER_LIMIT_COUNT] = {
    [OUTLIER_LIMIT_PENDING] = "max_pending_requests",
    [OUTLIER_LIMIT_CONCURRENT] = "max_concurrent_requests",
    [OUTLIER_LIMIT_CONNECTIONS] = "max_connections",
};

const char *outlier_limit_name(enum outlier_limit l)
{
    return (unsigned)l < OUTLIER_LIMIT_COUNT ? limit_names[l] : "?";
}

struct outlier *outlier_new(void)
{
    struct outlier *o = xcalloc(1, sizeof(*o));
    atomic_init(&o->refs, 1);
    atomic_init(&o->pending, 0);
    atomic_init(&o->active, 0);
    atomic_init(&o->conns, 0);
    for (size_t i = 0; i < OUTLIER_LIMIT_COUNT; i++)
        atomic_init(&o->overflow[i], 0);
    atomic_init(&o->ejections, 0);
    atomic_init(&o->ejection_overflows, 0);
    atomic_flag_clear(&o->deciding);
    return o;
}

struct outlier *outlier_ref(struct outlier *o)
{
    atomic_fetch_add_explicit(&o->refs, 1, memory_order_relaxed);
    return o;
}

void outlier_unref(struct outlier *o)
{
    if (o == NULL || atomic_fetch_sub_explicit(&o->refs, 1, memory_order_acq_rel) != 1)
        return;
    for (size_t i = 0; i < o->n_hosts; i++)
        outlier_host_unref(o->hosts[i]);
    free(o->hosts);
    free(o);
}

struct outlier_host *outlier_host_ref(struct outlier_host *h)
{
    atomic_fetch_add_explicit(&h->refs, 1, memory_order_relaxed);
    return h;
}

void outlier_host_unref(struct outlier_host *h)
{
    if (h != NULL && atomic_fetch_sub_explicit(&h->refs, 1, memory_order_acq_rel) == 1)
        free(h);
}

void outlier_begin(struct outlier *o)
{
    o->gen++;
}

struct outlier_host *outlier_host_get(struct outlier *o, const char *name)
{
    /* A linear scan: a registry build runs on a change of endpoints, never per request. */
    for (size_t i = 0; i < o->n_hosts; i++) {
        if (strcmp(o->hosts[i]->name, name) == 0) {
            o->hosts[i]->mark = o->gen;
            return outlier_host_ref(o->hosts[i]);
        }
    }
    struct outlier_host *h = xcalloc(1, sizeof(*h));
    atomic_init(&h->refs, 1);
    atomic_init(&h->fails, 0);
    atomic_init(&h->backoff, 0);
    atomic_init(&h->until_ms, 0);
    atomic_init(&h->return_ms, 0);
    h->mark = o->gen;
    snprintf(h->name, sizeof(h->name), "%s", name);
    o->hosts = xrealloc(o->hosts, (o->n_hosts + 1) * sizeof(*o->hosts));
    o->hosts[o->n_hosts++] = h;
    return outlier_host_ref(h);
}

size_t outlier_prune(struct outlier *o)
{
    size_t kept = 0, gone = 0;
    for (size_t i = 0; i < o->n_hosts; i++) {
        if (o->hosts[i]->mark == o->gen) {
            o->hosts[kept++] = o->hosts[i];
        } else {
            outlier_host_unref(o->hosts[i]);
            gone++;
        }
    }
    o->n_hosts = kept;
    return gone;
}

static atomic_long *count_of(struct outlier *o, enum outlier_limit l)
{
    return l == OUTLIER_LIMIT_PENDING       ? &o->pending
           : l == OUTLIER_LIMIT_CONNECTIONS ? &o->conns
                                            : &o->active;
}

int outlier_admit(struct outlier *o, enum outlier_limit l, uint32_t max)
{
    atomic_long *c = count_of(o, l);
    long n = atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
    if (max != 0 && n >= (long)max) {
        atomic_fetch_sub_explicit(c, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&o->overflow[l], 1, memory_order_relaxed);
        return 0;
    }
    return 1;
}

void outlier_release(struct outlier *o, enum outlier_limit l)
{
    atomic_fetch_sub_explicit(count_of(o, l), 1, memory_order_relaxed);
}

long outlier_count(const struct outlier *o, enum outlier_limit l)
{
    const atomic_long *c = l == OUTLIER_LIMIT_PENDING       ? &o->pending
                           : l == OUTLIER_LIMIT_CONNECTIONS ? &o->conns
                                                            : &o->active;
    return atomic_load_explicit(c, memory_order_relaxed);
}

/* ---- arithmetic ---- */

struct outlier_cfg outlier_cfg_effective(const struct outlier_cfg *c)
{
    struct outlier_cfg e = *c;
    if (e.interval_ms == 0)
        e.interval_ms = OUTLIER_INTERVAL_MS;
    if (e.max_failures == 0)
        e.max_failures = OUTLIER_MAX_FAILURES;
    if (e.base_ejection_ms == 0)
        e.base_ejection_ms = OUTLIER_BASE_EJECTION_MS;
    if (e.enforcing_pct > 100)
        e.enforcing_pct = 100;
    if (e.max_ejection_pct > 100)
        e.max_ejection_pct = 100;
    return e;
}

int outlier_may_eject(size_t ejected, size_t total, uint32_t max_pct)
{
    return total > 0 && (uint64_t)ejected * 100u < (uint64_t)max_pct * total;
}

uint32_t outlier_decayed(uint32_t backoff, uint64_t return_ms, uint64_t now_ms,
                         uint32_t interval_ms)
{
    if (interval_ms == 0)
        interval_ms = OUTLIER_INTERVAL_MS;
    if (return_ms == 0 || now_ms < return_ms + interval_ms)
        return backoff;
    uint64_t ticks = 1 + (now_ms - return_ms - interval_ms) / interval_ms;
    return ticks >= backoff ? 0 : backoff - (uint32_t)ticks;
}

/* The longest ejection: Envoy's max_ejection_time, or the base time when that is longer. */
static uint64_t max_ejection(const struct outlier_cfg *e)
{
    return e->base_ejection_ms > OUTLIER_MAX_EJECTION_MS ? e->base_ejection_ms
                                                         : OUTLIER_MAX_EJECTION_MS;
}

uint64_t outlier_ejection_ms(const struct outlier_cfg *c, uint32_t backoff)
{
    struct outlier_cfg e = outlier_cfg_effective(c);
    uint64_t d = (uint64_t)e.base_ejection_ms * backoff, cap = max_ejection(&e);
    if (d > cap)
        d = cap;
    return (d + e.interval_ms - 1) / e.interval_ms * e.interval_ms;
}

/* ---- passive health ---- */

int outlier_ejected(struct outlier_host *h, uint64_t now_ms, int *returned)
{
    if (returned != NULL)
        *returned = 0;
    if (h == NULL)
        return 0;
    uint_fast64_t until = atomic_load_explicit(&h->until_ms, memory_order_relaxed);
    if (until == 0)
        return 0;
    if (now_ms < until)
        return 1;
    /* Its time is over: the one who swaps it back in service says so. */
    if (atomic_compare_exchange_strong_explicit(&h->until_ms, &until, 0, memory_order_relaxed,
                                                memory_order_relaxed)) {
        atomic_store_explicit(&h->return_ms, until, memory_order_relaxed);
        if (returned != NULL)
            *returned = 1;
    }
    return 0;
}

size_t outlier_ejected_among(struct outlier_host *const *peers, size_t n, uint64_t now_ms)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (peers[i] == NULL)
            continue;
        uint_fast64_t until = atomic_load_explicit(&peers[i]->until_ms, memory_order_relaxed);
        k += until != 0 && now_ms < until;
    }
    return k;
}

/* Ejects <h> at <now_ms> with its multiplier grown by one (after its decay); how long. */
static uint64_t eject(struct outlier_host *h, const struct outlier_cfg *e, uint64_t now_ms)
{
    uint_fast64_t until = atomic_load_explicit(&h->until_ms, memory_order_relaxed);
    uint64_t back = until != 0 ? until : atomic_load_explicit(&h->return_ms, memory_order_relaxed);
    uint32_t b = outlier_decayed(atomic_load_explicit(&h->backoff, memory_order_relaxed), back,
                                 now_ms, e->interval_ms);
    /* The multiplier grows while the time it gives stays under the cap (Envoy's rule). */
    if ((uint64_t)e->base_ejection_ms * b < max_ejection(e))
        b++;
    uint64_t d = outlier_ejection_ms(e, b);
    atomic_store_explicit(&h->backoff, b, memory_order_relaxed);
    atomic_store_explicit(&h->until_ms, now_ms + (d != 0 ? d : 1), memory_order_relaxed);
    return d;
}

enum outlier_event outlier_report(struct outlier *o, const struct outlier_cfg *cfg,
                                  struct outlier_host *h, struct outlier_host *const *peers,
                                  size_t n_peers, int failed, uint64_t now_ms, uint32_t rnd,
                                  uint64_t *out_ms)
{
    if (h == NULL)
        return OUTLIER_NONE;
    if (!failed) {
        /* Read first: a success in a row costs no write to the line every worker shares. */
        if (atomic_load_explicit(&h->fails, memory_order_relaxed) != 0)
            atomic_store_explicit(&h->fails, 0, memory_order_relaxed);
        return OUTLIER_NONE;
    }
    struct outlier_cfg e = outlier_cfg_effective(cfg);
    unsigned n = atomic_fetch_add_explicit(&h->fails, 1, memory_order_relaxed) + 1;
    /* Exactly one report makes the count: it decides, and the count starts again (Envoy
     * resets it after the decision, ejected or not). */
    if (n != e.max_failures)
        return OUTLIER_NONE;
    atomic_store_explicit(&h->fails, 0, memory_order_relaxed);
    if (outlier_ejected(h, now_ms, NULL))
        return OUTLIER_NONE; /* answers of requests sent before it was ejected */
    enum outlier_event ev;
    while (atomic_flag_test_and_set_explicit(&o->deciding, memory_order_acquire))
        ;
    size_t ejected = outlier_ejected_among(peers, n_peers, now_ms);
    if (!outlier_may_eject(ejected, n_peers, e.max_ejection_pct)) {
        atomic_fetch_add_explicit(&o->ejection_overflows, 1, memory_order_relaxed);
        ev = OUTLIER_OVERFLOW;
    } else if (rnd % 100u >= e.enforcing_pct) {
        ev = OUTLIER_NOT_ENFORCED;
    } else {
        uint64_t d = eject(h, &e, now_ms);
        if (out_ms != NULL)
            *out_ms = d;
        atomic_fetch_add_explicit(&o->ejections, 1, memory_order_relaxed);
        ev = OUTLIER_EJECTED;
    }
    atomic_flag_clear_explicit(&o->deciding, memory_order_release);
    return ev;
}

uint64_t outlier_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}
