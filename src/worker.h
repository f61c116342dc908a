/*
 * worker: one thread with its own event loop, listeners and sessions.
 *
 * The control thread hands each worker new snapshots; the worker reconciles its listeners with
 * the snapshot (opening, keeping or closing each one, never touching sessions of listeners that
 * did not change) and re-authorizes its own inbound sessions when the intention table changed.
 * Listeners are per worker with SO_REUSEPORT, so one accepted connection stays on one worker.
 */
#ifndef CONNECTD_WORKER_H
#define CONNECTD_WORKER_H

#include <stdatomic.h>
#include <stddef.h>

#include "authq.h"
#include "session.h"
#include "snapshot.h"

struct worker;

/*
 * Creates worker number <index> (not yet running). <ask> is the control thread's box for
 * authorization questions (authorize mode; not owned, must outlive the worker's loop), or
 * NULL. <failed> (or NULL) is notified when a listener of the first snapshot cannot be
 * opened (worker_startup_failed()). NULL with <err> filled on failure.
 */
struct worker *worker_new(unsigned index, struct authq_box *ask, struct loop_receiver *failed,
                          char *err, size_t errlen);
/* Starts the thread. 0 or -errno. */
int worker_start(struct worker *w);
/*
 * Hands <s> to the worker (takes a new reference; the caller keeps its own). Any thread; if
 * several arrive before the worker wakes up, only the newest is applied.
 */
void worker_publish(struct worker *w, struct snapshot *s);
/*
 * Asks the worker to drain: close its listeners at once (and open none for later snapshots)
 * while its sessions run to their end. Any thread; returns at once.
 */
void worker_drain(struct worker *w);
/* Whether a draining worker has no session left. Any thread. */
int worker_drained(struct worker *w);
/* 1 when a listener of the first snapshot could not be opened (the worker then notifies the
 * <failed> receiver it was created with). Any thread. */
int worker_startup_failed(struct worker *w);
/* Asks the worker to close its listeners and sessions and leave its loop. Any thread. */
void worker_stop(struct worker *w);
/*
 * The worker's counters (see session.h): valid from worker_new() until worker_stop();
 * any thread may read them with atomic loads.
 */
const struct session_stats *worker_stats(const struct worker *w);
/* 1 when every listener of the worker's latest snapshot is open. Any thread. */
int worker_listening(struct worker *w);
/* A question for the worker about its open sessions (the admin endpoint's /connections). */
struct worker_listing {
    struct session_info *v; /* asker-owned array of <max> entries */
    size_t max;
    size_t n;        /* written by the worker: how many sessions it has (may exceed max) */
    atomic_int done; /* set by the worker (release) once <v> and <n> are written */
    struct loop_receiver *notify; /* notified once done */
};

/*
 * Posts <l> to the worker, which fills it on its own thread (no other thread touches its
 * sessions), sets done and notifies l->notify. <l> must stay valid until done is set or the
 * worker has been joined; post one listing per worker at a time. Any thread.
 */
void worker_list_sessions(struct worker *w, struct worker_listing *l);
/* Waits for the thread to end, then frees the worker. */
void worker_join_free(struct worker *w);

#endif
