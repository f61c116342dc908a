/*
 * outlier: an upstream's request limits and passive health checking (outlier ejection), shared
 * by every worker, as Envoy applies a cluster's circuit breakers and outlier detection.
 *
 * One struct outlier belongs to one upstream and lives across snapshots, as the upstream's
 * limit_state does: the control thread creates it when the upstream first appears, hands a
 * reference to every snapshot, and keeps in it a registry of the upstream's endpoints (one
 * struct outlier_host per address:port or socket path). Each snapshot's target holds a
 * reference to the host of each of its endpoints, so a worker reaches an endpoint's state by
 * index, without a lookup; an endpoint that leaves every target is dropped from the registry at
 * the next build (its state goes with the last snapshot that still names it).
 *
 * Counters and host states are atomics: any thread may read or update them. The registry
 * (outlier_begin, outlier_host_get, outlier_prune, outlier_ejected_now over it) is the control
 * thread's. Times are milliseconds of one monotonic clock (outlier_now_ms()).
 */
#ifndef CONNECTD_OUTLIER_H
#define CONNECTD_OUTLIER_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* Envoy's defaults, which Consul leaves in force when a key is absent (or 0). */
#define OUTLIER_INTERVAL_MS       10000u
#define OUTLIER_MAX_FAILURES      5u
#define OUTLIER_BASE_EJECTION_MS  30000u
#define OUTLIER_MAX_EJECTION_MS   300000u /* Envoy's max_ejection_time, which Consul never sets */
#define OUTLIER_ENFORCING_PERCENT 100u
#define OUTLIER_MAX_EJECTION_PCT  10u

/*
 * An upstream's passive_health_check (Consul's keys, Envoy's meaning). interval_ms,
 * max_failures and base_ejection_ms of 0 stand for the defaults above, as in Consul, which
 * leaves a zero unset in Envoy's configuration.
 */
struct outlier_cfg {
    uint32_t interval_ms;      /* the ejection sweep's period: returns happen on its ticks */
    uint32_t max_failures;     /* consecutive 5xx (or connect failures) that eject */
    uint32_t enforcing_pct;    /* the chance, in percent, that such an endpoint is ejected */
    uint32_t max_ejection_pct; /* at most this share of a target's endpoints ejected at once */
    uint32_t base_ejection_ms; /* times the endpoint's ejection multiplier */
};

/* The limits of struct outlier, by index of its overflow counters. */
enum outlier_limit {
    OUTLIER_LIMIT_PENDING = 0, /* limits.max_pending_requests */
    OUTLIER_LIMIT_CONCURRENT,  /* limits.max_concurrent_requests */
    OUTLIER_LIMIT_CONNECTIONS, /* limits.max_connections: connections L7 opened to it */
    OUTLIER_LIMIT_COUNT
};

/* Name of a limit's key ("max_pending_requests"). */
const char *outlier_limit_name(enum outlier_limit l);

/* One endpoint's passive health, shared by every worker and every snapshot that names it. */
struct outlier_host {
    atomic_uint refs;
    atomic_uint fails;              /* consecutive failures since the last success */
    atomic_uint backoff;            /* the ejection multiplier (Envoy's "times ejected") */
    atomic_uint_fast64_t until_ms;  /* 0 in service; else ejected until this time */
    atomic_uint_fast64_t return_ms; /* when it last came back (the multiplier's decay) */
    unsigned mark;                  /* control thread: the registry generation that saw it */
    char name[300];                 /* address:port, or unix:<path> */
};

struct outlier {
    atomic_uint refs;
    atomic_long pending; /* requests waiting for a connection */
    atomic_long active;  /* requests in flight */
    atomic_long conns;   /* connections open to its endpoints (HTTP/1.1 pooled or not, HTTP/2) */
    atomic_uint_fast64_t overflow[OUTLIER_LIMIT_COUNT]; /* requests answered 503, by limit */
    atomic_uint_fast64_t ejections;                     /* endpoints ejected */
    atomic_uint_fast64_t ejection_overflows;            /* ejections max_ejection_pct prevented */
    atomic_flag deciding;                               /* held while an ejection is decided */
    /* The registry: control thread only. */
    struct outlier_host **hosts; /* one reference each */
    size_t n_hosts;
    unsigned gen;
};

/* A new state with nothing counted and no endpoint (one reference). Never fails. */
struct outlier *outlier_new(void);
struct outlier *outlier_ref(struct outlier *o);
/* Any thread; NULL is ignored. The registry's hosts are released with it. */
void outlier_unref(struct outlier *o);

/* Any thread; NULL is ignored. */
struct outlier_host *outlier_host_ref(struct outlier_host *h);
void outlier_host_unref(struct outlier_host *h);

/*
 * The registry, control thread only. outlier_begin() starts a build; outlier_host_get()
 * returns the host named <name> with a new reference (created in service when new) and marks
 * it seen by this build; outlier_prune() drops from the registry every host the build did not
 * ask for (endpoints that left), returning how many.
 */
void outlier_begin(struct outlier *o);
struct outlier_host *outlier_host_get(struct outlier *o, const char *name);
size_t outlier_prune(struct outlier *o);

/*
 * Takes one unit of the count of limit <l> (pending, active or connections) when it is below <max>
 * (0 = no limit): 1 taken, give it back with outlier_release(); 0 over the limit, nothing held and
 * the overflow counted.
 */
int outlier_admit(struct outlier *o, enum outlier_limit l, uint32_t max);
void outlier_release(struct outlier *o, enum outlier_limit l);
/* The count of limit <l> now (may be stale at once). */
long outlier_count(const struct outlier *o, enum outlier_limit l);

/* ---- ejection arithmetic: pure ---- */

/* The effective settings of <c> (zeros replaced by the defaults). */
struct outlier_cfg outlier_cfg_effective(const struct outlier_cfg *c);

/*
 * Whether one more of a target's <total> endpoints, <ejected> of which are ejected now, may be
 * ejected under <max_pct>: while the ejected share is below it (100 * ejected < max_pct *
 * total). So one endpoint always may be, whatever the percent above 0 and the target's size,
 * as Consul documents ("will eject at least one host regardless of the value"), and 0 ejects
 * none.
 */
int outlier_may_eject(size_t ejected, size_t total, uint32_t max_pct);

/*
 * The multiplier of an endpoint that was ejected with <backoff> and came back at <return_ms>,
 * at <now_ms>: one less per sweep tick it spent in service, the first a whole interval after
 * it came back, never below 0 (Envoy's decay while a host stays healthy).
 */
uint32_t outlier_decayed(uint32_t backoff, uint64_t return_ms, uint64_t now_ms,
                         uint32_t interval_ms);

/*
 * How long an endpoint ejected with multiplier <backoff> (1 the first time) stays out: the
 * base ejection time times <backoff>, at most max(base, OUTLIER_MAX_EJECTION_MS), rounded up
 * to whole sweep intervals counted from the ejection (it comes back at the first sweep past
 * that time).
 */
uint64_t outlier_ejection_ms(const struct outlier_cfg *c, uint32_t backoff);

/* ---- passive health: any thread ---- */

/* What outlier_report() did. */
enum outlier_event {
    OUTLIER_NONE = 0,
    OUTLIER_EJECTED,      /* the endpoint is ejected now */
    OUTLIER_OVERFLOW,     /* it reached max_failures, but max_ejection_pct kept it in */
    OUTLIER_NOT_ENFORCED, /* it reached max_failures, and enforcing_pct said not this time */
};

/*
 * 1 when host <h> (NULL: never) is ejected at <now_ms>. An ejection whose time is over ends
 * here: the caller that sees it gets 0 and *<returned> = 1 (to log the return); anyone else 0.
 */
int outlier_ejected(struct outlier_host *h, uint64_t now_ms, int *returned);

/*
 * Reports the outcome of one request to host <h> (NULL: nothing happens): <failed> is a 5xx
 * answer or a failure to connect, anything else a success, which resets the consecutive count.
 * The failure that makes max_failures in a row decides an ejection (and the count starts
 * again, whatever the decision): the target's <peers> (<n_peers> hosts, <h> among them) bound
 * it by max_ejection_pct, <rnd> draws enforcing_pct. On OUTLIER_EJECTED *<out_ms> is how long.
 */
enum outlier_event outlier_report(struct outlier *o, const struct outlier_cfg *cfg,
                                  struct outlier_host *h, struct outlier_host *const *peers,
                                  size_t n_peers, int failed, uint64_t now_ms, uint32_t rnd,
                                  uint64_t *out_ms);

/* Hosts of <peers> ejected at <now_ms> (returns that are due are not applied). */
size_t outlier_ejected_among(struct outlier_host *const *peers, size_t n, uint64_t now_ms);

/* Monotonic clock in milliseconds. */
uint64_t outlier_now_ms(void);

#endif
