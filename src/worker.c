/*
 * worker: snapshot intake, listener reconciliation and the accept path.
 *
 * Snapshots arrive through one atomic slot: the publisher swaps its new snapshot in (dropping
 * a newer-than-applied one the worker never saw) and wakes the loop; the worker swaps the slot
 * empty and applies what it got. No lock is taken on either side.
 *
 * Draining (SIGTERM): the worker closes its listeners at once, keeps them closed whatever
 * snapshots still arrive, lets its sessions run, and raises its "drained" flag once none is
 * left; the control thread polls the flags and decides when to stop.
 */
#include "worker.h"
#include "log.h"
#include "loop.h"
#include "mux_h1.h"
#include "mux_h2.h"
#include "notify.h"
#include "relay.h"
#include "session.h"
#include "sock.h"
#include "util.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ACCEPT_BATCH      64
#define EMFILE_BACKOFF_MS 100
#define DRAIN_CHECK_MS    20

struct listener {
    struct listener *next;
    struct worker *w;
    char *key;         /* "public", the upstream key, or an exposed listener's name */
    char *addr;        /* IP address, or the socket path of a unix listener */
    int port;          /* -1 for a unix listener */
    int mode;          /* unix listener: file mode, -1 = SOCK_UNIX_DEFAULT_MODE */
    unsigned long ino; /* unix listener: the socket file we created */
    int inbound;       /* 1: the public listener; LISTENER_EXPOSED: an exposed one; 0: upstream */
    int fd;
    struct loop_io io;
    struct loop_timer pause; /* re-enables accepting after running out of descriptors */
    struct loop_defer reap;  /* frees the listener after the dispatch round that closed it */
};

#define LISTENER_EXPOSED 2

struct worker {
    unsigned index;
    pthread_t thread;
    int started;
    struct loop *loop;
    struct session_host host;
    struct listener *listeners;
    _Atomic(struct snapshot *) pending;
    atomic_int stop;
    atomic_int drain;     /* asked to drain (any thread) */
    atomic_int drained;   /* draining and no session left (read by any thread) */
    int draining;         /* listeners closed for good (worker thread) */
    atomic_int listening; /* every listener of the last snapshot is open (read by any thread) */
    _Atomic(struct worker_listing *) listing; /* a /connections question, at most one */
    struct loop_timer drain_check;
    struct loop_timer reauthorize; /* periodic re-authorization, when configured */
    uint32_t reauthorize_ms;       /* the interval reauthorize runs with; 0 = off */
    int notified;                  /* worker 0: READY=1 sent */
    int first_applied;             /* the first snapshot has been applied */
    atomic_int startup_failed;     /* a listener of the first snapshot could not be opened */
    struct loop_receiver *failed;  /* told of startup_failed (the control loop's); or NULL */
};

static void listener_reap(struct loop_defer *d)
{
    struct listener *l = (struct listener *)((char *)d - offsetof(struct listener, reap));
    free(l->key);
    free(l->addr);
    free(l);
}

/*
 * Closes <l> at once; its memory goes after the current dispatch round, because the same
 * epoll batch may still hold an accept event for it (closing happens on a wake-up).
 */
static void listener_free(struct worker *w, struct listener *l)
{
    loop_timer_stop(w->loop, &l->pause);
    loop_io_want(w->loop, &l->io, 0);
    close(l->fd);
    if (l->port == -1)
        sock_unlink_unix(l->addr, l->ino);
    l->fd = -1;
    loop_defer(w->loop, &l->reap, listener_reap);
}

static void on_pause_end(struct loop_timer *t)
{
    struct listener *l = t->data;
    loop_io_want(l->w->loop, &l->io, LOOP_READ);
}

static void on_accept(struct loop_io *io, unsigned events)
{
    struct listener *l = io->data;
    struct worker *w = l->w;
    char peer[64];
    (void)events;
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        int fd = sock_accept(l->fd, peer, sizeof(peer));
        if (fd == -EAGAIN || fd == -EINTR || fd == -ECONNABORTED)
            return;
        if (fd == -EMFILE || fd == -ENFILE || fd == -ENOBUFS || fd == -ENOMEM) {
            LOG_WARN("worker %u: accept on %s:%d: %s; pausing %d ms", w->index, l->addr, l->port,
                     util_strerror(fd), EMFILE_BACKOFF_MS);
            loop_io_want(w->loop, &l->io, 0);
            loop_timer_start(w->loop, &l->pause, EMFILE_BACKOFF_MS);
            return;
        }
        if (fd < 0) {
            LOG_WARN("worker %u: accept on %s:%d: %s", w->index, l->addr, l->port,
                     util_strerror(fd));
            return;
        }
        if (l->inbound == LISTENER_EXPOSED)
            session_start_exposed(&w->host, fd, peer, l->port);
        else if (l->inbound)
            session_start_inbound(&w->host, fd, peer);
        else
            session_start_outbound(&w->host, fd, peer, l->key);
    }
}

static struct listener *listener_open(struct worker *w, const char *key, const char *addr, int port,
                                      int mode, int inbound)
{
    char err[300];
    unsigned long ino = 0;
    int fd = port == -1 ? sock_listen_unix(addr, mode, &ino, err, sizeof(err))
                        : sock_listen(addr, port, 1, err, sizeof(err));
    if (fd < 0) {
        LOG_ERROR("worker %u: %s listener: %s", w->index, inbound == 1 ? "public" : key, err);
        return NULL;
    }
    struct listener *l = xcalloc(1, sizeof(*l));
    l->w = w;
    l->key = xstrdup(key);
    l->addr = xstrdup(addr);
    l->port = port;
    l->mode = mode;
    l->ino = ino;
    l->inbound = inbound;
    l->fd = fd;
    loop_io_init(&l->io, fd, on_accept, l);
    loop_timer_init(&l->pause, on_pause_end, l);
    if (loop_io_want(w->loop, &l->io, LOOP_READ) != 0) {
        listener_free(w, l);
        return NULL;
    }
    if (w->index == 0 && port == -1)
        LOG_INFO("listening on unix %s (%s)", addr, key);
    else if (w->index == 0)
        LOG_INFO("listening on %s:%d (%s)", addr, port, inbound == 1 ? "public" : key);
    return l;
}

/* Takes the listener matching key/addr/port out of <list>, or returns NULL. */
static struct listener *take_listener(struct listener **list, const char *key, const char *addr,
                                      int port, int mode)
{
    for (struct listener **p = list; *p != NULL; p = &(*p)->next) {
        struct listener *l = *p;
        if (strcmp(l->key, key) == 0 && strcmp(l->addr, addr) == 0 && l->port == port &&
            l->mode == mode) {
            *p = l->next;
            l->next = NULL;
            return l;
        }
    }
    return NULL;
}

/*
 * Closes the old listener of ours on the unix socket <path>, if any: a listener that changes
 * (mode, or the upstream it serves) reuses the path, and would otherwise find it in use, since
 * a socket in use is never replaced.
 */
static void release_path(struct worker *w, struct listener **list, const char *path)
{
    for (struct listener **p = list; *p != NULL; p = &(*p)->next) {
        struct listener *l = *p;
        if (l->port == -1 && strcmp(l->addr, path) == 0) {
            *p = l->next;
            listener_free(w, l);
            return;
        }
    }
}

/* Returns 0, or -1 when the listener could not be opened. */
static int add_listener(struct worker *w, struct listener **old, struct listener **fresh,
                        const char *key, const char *addr, int port, int mode, int inbound)
{
    struct listener *l = take_listener(old, key, addr, port, mode);
    if (l == NULL && port == -1)
        release_path(w, old, addr);
    if (l == NULL)
        l = listener_open(w, key, addr, port, mode, inbound);
    if (l == NULL)
        return -1;
    l->next = *fresh;
    *fresh = l;
    return 0;
}

/* Makes the open listeners match <s>: unchanged ones stay open (their sessions untouched). */
static void reconcile_listeners(struct worker *w, const struct snapshot *s)
{
    struct listener *old = w->listeners, *fresh = NULL;
    int failed = 0;
    if (s != NULL) {
        if (s->cfg.bind_port != 0)
            failed |= add_listener(w, &old, &fresh, "public", s->cfg.bind_address, s->cfg.bind_port,
                                   -1, 1);
        else if (s->cfg.bind_socket_path[0] != '\0' && w->index == 0)
            failed |= add_listener(w, &old, &fresh, "public", s->cfg.bind_socket_path, -1, -1, 1);
        for (size_t i = 0; i < s->cfg.n_upstreams; i++) {
            const struct upstream_cfg *u = &s->cfg.upstreams[i];
            /* A unix socket path cannot be shared with SO_REUSEPORT: worker 0 owns it. */
            if (u->bind_socket_path[0] != '\0') {
                if (w->index == 0)
                    failed |= add_listener(w, &old, &fresh, u->key, u->bind_socket_path, -1,
                                           u->bind_socket_mode, 0);
            } else {
                failed |=
                    add_listener(w, &old, &fresh, u->key, u->bind_address, u->bind_port, -1, 0);
            }
        }
        /* Exposed paths listen beside the public listener, as Envoy binds them. A check's port
         * is the agent's pick: one that cannot be opened is logged, not fatal at start-up. */
        for (size_t i = 0; s->exposes != NULL && i < s->exposes->n; i++) {
            const struct snap_expose *e = &s->exposes->v[i];
            int rc = add_listener(w, &old, &fresh, e->name, s->cfg.bind_address, e->port, -1,
                                  LISTENER_EXPOSED);
            if (!e->from_checks)
                failed |= rc;
        }
    }
    while (old != NULL) {
        struct listener *next = old->next;
        if (w->index == 0)
            LOG_INFO("closing listener %s:%d (%s)", old->addr, old->port == -1 ? 0 : old->port,
                     old->inbound == 1 ? "public" : old->key);
        listener_free(w, old);
        old = next;
    }
    w->listeners = fresh;
    atomic_store(&w->listening, s != NULL && failed == 0);
}

static void on_reauthorize(struct loop_timer *t)
{
    struct worker *w = t->data;
    uint64_t before = w->host.stats->counters.reauthorized;
    size_t n = session_reauthorize_all(&w->host);
    LOG_DEBUG("worker %u: periodic re-authorization checked %llu session(s), closed %zu", w->index,
              (unsigned long long)(w->host.stats->counters.reauthorized - before), n);
    if (n > 0)
        LOG_INFO("worker %u: periodic re-authorization closed %zu connection(s) now denied",
                 w->index, n);
    loop_timer_start(w->loop, t, w->reauthorize_ms);
}

static void on_drain_check(struct loop_timer *t)
{
    struct worker *w = t->data;
    if (w->host.n_sessions == 0) {
        atomic_store(&w->drained, 1);
        return;
    }
    loop_timer_start(w->loop, t, DRAIN_CHECK_MS);
}

static void apply_snapshot(struct worker *w, struct snapshot *s)
{
    struct snapshot *prev = w->host.snap;
    w->host.snap = s;
    reconcile_listeners(w, w->draining ? NULL : s);
    if (!w->first_applied && !w->draining) {
        w->first_applied = 1;
        if (!atomic_load(&w->listening)) {
            /* A listener that cannot be opened at start-up is a configuration error the
             * operator must see as an exit status, not a log line of a running process. */
            atomic_store(&w->startup_failed, 1);
            if (w->failed != NULL)
                loop_receiver_notify(w->failed);
        }
    }
    if (w->index == 0 && !w->notified && !w->draining && !atomic_load(&w->startup_failed)) {
        /* The first snapshot is applied and worker 0's listeners are open (SO_REUSEPORT sends
         * connections only to open ones): tell systemd we serve. */
        w->notified = 1;
        int rc = notify_send("READY=1\nSTATUS=serving");
        if (rc < 0)
            LOG_WARN("worker 0: sd_notify READY=1: %s", util_strerror(rc));
    }
    if (s->cfg.reauthorize_interval_ms != w->reauthorize_ms) {
        w->reauthorize_ms = s->cfg.reauthorize_interval_ms;
        loop_timer_stop(w->loop, &w->reauthorize);
        if (w->reauthorize_ms != 0)
            loop_timer_start(w->loop, &w->reauthorize, w->reauthorize_ms);
    }
    /* Whatever an inbound decision depends on, not the intentions alone: a connection admitted
     * under the old inputs is decided again under the new ones. */
    const char *changed = prev != NULL ? snapshot_inbound_change(prev, s) : NULL;
    if (changed != NULL) {
        size_t n = session_reauthorize_all(&w->host);
        LOG_DEBUG("worker %u: %s changed; open inbound connections re-checked", w->index, changed);
        if (n > 0)
            LOG_INFO("worker %u: %s changed; closed %zu connection(s) now denied", w->index,
                     changed, n);
    }
    snapshot_unref(prev);
}

/* Hands each authorization answer to its session (or frees it when the session is gone). */
static void deliver_answers(struct worker *w)
{
    struct authq_req *r = authq_box_take(w->host.answers);
    while (r != NULL) {
        struct authq_req *next = r->next;
        session_authorize_answer(r);
        r = next;
    }
}

static void on_wakeup(struct loop *loop, void *data)
{
    struct worker *w = data;
    if (atomic_load(&w->stop)) {
        reconcile_listeners(w, NULL);
        session_close_all(&w->host);
        deliver_answers(w);
        loop_timer_stop(loop, &w->drain_check);
        loop_timer_stop(loop, &w->reauthorize);
        session_host_dispose(&w->host);
        loop_stop(loop);
        return;
    }
    if (atomic_load(&w->drain) && !w->draining) {
        w->draining = 1;
        reconcile_listeners(w, NULL);
        session_drain_all(&w->host);
        on_drain_check(&w->drain_check);
    }
    struct snapshot *s = atomic_exchange(&w->pending, NULL);
    if (s != NULL)
        apply_snapshot(w, s);
    struct worker_listing *l = atomic_exchange(&w->listing, NULL);
    if (l != NULL) {
        /* Once <done> is set the asker may free <l>: read what we need first. */
        struct loop_receiver *notify = l->notify;
        l->n = session_host_list(&w->host, l->v, l->max);
        atomic_store_explicit(&l->done, 1, memory_order_release);
        loop_receiver_notify(notify);
    }
}

static void on_answers(void *data)
{
    deliver_answers(data);
}

struct worker *worker_new(unsigned index, struct authq_box *ask, struct loop_receiver *failed,
                          char *err, size_t errlen)
{
    struct worker *w = xcalloc(1, sizeof(*w));
    w->index = index;
    w->loop = loop_new();
    if (w->loop == NULL) {
        snprintf(err, errlen, "worker %u: cannot create event loop: %s", index,
                 util_strerror(-errno));
        free(w);
        return NULL;
    }
    session_host_init(&w->host, w->loop, index);
    w->host.muxes.relay = &relay_mux;
    w->host.muxes.http1 = &mux_h1_mux;
    w->host.muxes.http2 = &mux_h2_mux;
    w->host.ask = ask;
    w->host.answers = authq_box_new(w->loop, on_answers, w);
    w->failed = failed;
    atomic_init(&w->pending, NULL);
    atomic_init(&w->stop, 0);
    atomic_init(&w->drain, 0);
    atomic_init(&w->drained, 0);
    loop_timer_init(&w->drain_check, on_drain_check, w);
    loop_timer_init(&w->reauthorize, on_reauthorize, w);
    loop_set_wakeup(w->loop, on_wakeup, w);
    return w;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    log_set_thread_worker((int)w->index);
    int rc = loop_run(w->loop);
    if (rc != 0)
        LOG_ERROR("worker %u: event loop failed: %s", w->index, util_strerror(rc));
    return NULL;
}

int worker_start(struct worker *w)
{
    int rc = pthread_create(&w->thread, NULL, worker_main, w);
    if (rc != 0)
        return -rc;
    w->started = 1;
    return 0;
}

void worker_publish(struct worker *w, struct snapshot *s)
{
    struct snapshot *old = atomic_exchange(&w->pending, snapshot_ref(s));
    snapshot_unref(old);
    loop_wakeup(w->loop);
}

void worker_stop(struct worker *w)
{
    atomic_store(&w->stop, 1);
    loop_wakeup(w->loop);
}

void worker_drain(struct worker *w)
{
    atomic_store(&w->drain, 1);
    loop_wakeup(w->loop);
}

int worker_startup_failed(struct worker *w)
{
    return atomic_load(&w->startup_failed);
}

int worker_drained(struct worker *w)
{
    return atomic_load(&w->drained);
}

void worker_join_free(struct worker *w)
{
    if (w->started)
        pthread_join(w->thread, NULL);
    /* Sessions freed by deferred calls have run before loop_run returned. */
    snapshot_unref(atomic_exchange(&w->pending, NULL));
    snapshot_unref(w->host.snap);
    authq_box_free(w->host.answers); /* answers that arrived after the last wake-up */
    loop_free(w->loop); /* runs deferred calls still queued, which may give buffers back */
    session_host_free_buffers(&w->host);
    free(w);
}

const struct session_stats *worker_stats(const struct worker *w)
{
    return w->host.stats;
}

int worker_listening(struct worker *w)
{
    return atomic_load(&w->listening);
}

void worker_list_sessions(struct worker *w, struct worker_listing *l)
{
    atomic_store(&l->done, 0);
    atomic_store(&w->listing, l);
    loop_wakeup(w->loop);
}
