/*
 * upstreams: where each upstream's endpoints come from. A service upstream watches its
 * discovery chain and, per chain target, that target's health; a prepared-query upstream polls
 * its query. The watches follow the configuration (upstreams_reconcile) and the chain
 * (targets added and removed), keeping whatever did not change. A chain goes in force
 * (upstreams_parts() shows its targets and route table) only once the primary target of each
 * of its resolvers has had a first health answer, or after 15 s; until then the previous chain
 * serves (none before the first: the upstream has no target yet, and upstreams_waiting() says
 * so, which holds the proxy's first snapshot).
 *
 * Control thread only; a bad answer is logged and the last good endpoints stay in force.
 */
#ifndef CONNECTD_UPSTREAMS_H
#define CONNECTD_UPSTREAMS_H

#include <stddef.h>

#include "agent.h"
#include "limit.h"
#include "proxycfg.h"
#include "snapshot.h"
#include "watch.h"

struct upstreams;

/*
 * Creates the set, with no upstream. <a> and <reach> are borrowed and must outlive it;
 * <changed> is called with <data> whenever the endpoints or targets of an upstream change.
 */
struct upstreams *upstreams_new(struct agent *a, struct watch_reach *reach,
                                void (*changed)(void *data), void *data);
/* Stops every watch and frees everything; NULL is fine. */
void upstreams_free(struct upstreams *ups);

/*
 * Makes the upstream watches match <cfg>: watches of unchanged upstreams keep running (and
 * their endpoints), new upstreams get a watch, removed ones lose theirs. Afterwards the
 * upstreams are those of cfg->upstreams, in the same order.
 */
void upstreams_reconcile(struct upstreams *ups, const struct proxy_cfg *cfg);

/*
 * What snapshot_new() takes for the first <n> upstreams: per upstream its targets (borrowed
 * strings and endpoint sets, valid until the next callback of the set), its listener's
 * admission state and its outlier state (borrowed, for snapshot_attach_outliers()). Free with
 * upstreams_parts_dispose().
 */
struct upstreams_parts {
    struct snap_target **targets;
    size_t *n_targets;
    struct limit_state **limits;
    struct outlier **outliers;   /* each upstream's request limits and passive health */
    int *protocols;              /* each upstream's effective protocol (snap_upstream.protocol) */
    struct route_table **routes; /* each upstream's route table (borrowed), or NULL */
    size_t n;
};
void upstreams_parts(const struct upstreams *ups, size_t n, struct upstreams_parts *out);
void upstreams_parts_dispose(struct upstreams_parts *p);

/*
 * Whether an upstream has not gone in force yet (start-up): its discovery chain has not come,
 * or the primary target of one of its resolvers has had no health answer (a prepared query:
 * no answer), and the 15 s bound has not passed. Then writes why, naming the upstream, into
 * <why> (<why_len> bytes) and returns 1; else 0. Envoy likewise takes no traffic before its
 * clusters' first fetch (initial_fetch_timeout).
 */
int upstreams_waiting(const struct upstreams *ups, char *why, size_t why_len);

/* Calls <fn> for each upstream's watch ("upstream:<key>") and its targets' ("health:<id>"). */
void upstreams_each_watch(const struct upstreams *ups, watch_visit_cb fn, void *data);

#endif
