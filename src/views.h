/*
 * views: the admin endpoint's answers, rendered from the control thread's state: /ready,
 * /metrics (Prometheus text, the workers' counters summed), /config (the current snapshot,
 * never key material or tokens), /authz (the current intention table's decision for one
 * source, per connection or, given method=, path= or header=name:value, per HTTP request) and
 * /connections (each worker lists its own sessions on its own thread). The HTTP server itself is
 * admin.c; JSON is written by hand through its escaping buffer.
 *
 * Control thread only.
 */
#ifndef CONNECTD_VIEWS_H
#define CONNECTD_VIEWS_H

#include "admin.h"
#include "inputs.h"
#include "limit.h"
#include "loop.h"
#include "snapshot.h"
#include "upstreams.h"
#include "watch.h"
#include "worker.h"

struct views;

/* What the control loop knows at the time of one request (borrowed for the call). */
struct views_state {
    const char *not_ready;            /* why /ready answers 503, or NULL when ready */
    const struct snapshot *current;   /* the snapshot last published, or NULL */
    const struct watch *registration; /* the registration watch, or NULL */
    const char *agent_down;           /* the agent's address while it is unreachable, or NULL */
};

/*
 * Creates the renderer for <n_workers> <workers>, the state in <in> and <ups>, and the public
 * listener's <inbound_limit>, all borrowed: they must outlive it.
 */
struct views *views_new(struct loop *loop, struct worker *const *workers, int n_workers,
                        const struct inputs *in, const struct upstreams *ups,
                        const struct limit_state *inbound_limit);
/*
 * Frees <v> and a /connections listing still held; only after the workers are joined. The
 * workers tell it of their listings through a receiver of its own on <loop>.
 */
void views_free(struct views *v);
/*
 * Answers <req> into <reply> and sends it, at once or (for /connections) once every worker
 * has answered or 2 s have passed.
 */
void views_answer(struct views *v, const struct views_state *st, const struct admin_request *req,
                  struct admin_reply *reply);

#endif
