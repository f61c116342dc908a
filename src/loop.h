/*
 * loop: one epoll event loop per thread, with fd watchers, timers and a cross-thread wake-up.
 *
 * Objects are embedded in their owners (no allocation per watcher or timer). Callbacks run on
 * the loop's thread only. A callback may start or stop any watcher or timer, including its own;
 * owners that free themselves must do so through loop_defer() so nothing is freed while the
 * loop may still dispatch to it in the same iteration.
 */
#ifndef CONNECTD_LOOP_H
#define CONNECTD_LOOP_H

#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>

struct loop;

#define LOOP_READ  0x1u
#define LOOP_WRITE 0x2u
/* Set in the events passed to a callback for errors and hang-ups (EPOLLERR/EPOLLHUP). */
#define LOOP_ERROR 0x4u

struct loop_io;
/* <events> is a mask of LOOP_READ, LOOP_WRITE and LOOP_ERROR that are ready. */
typedef void (*loop_io_cb)(struct loop_io *io, unsigned events);

struct loop_io {
    int fd;
    unsigned want;  /* the mask currently registered with epoll; 0 when not registered */
    unsigned fired; /* events dispatched since the owner last cleared it (owners sharing a
                     * callback between watchers tell which one fired) */
    loop_io_cb cb;
    void *data;
};

struct loop_timer;
typedef void (*loop_timer_cb)(struct loop_timer *t);

struct loop_timer {
    uint64_t due_ms;
    size_t heap_index; /* position in the loop's heap, or SIZE_MAX when not armed */
    uint64_t pass;     /* the loop's timer pass in which it was armed */
    loop_timer_cb cb;
    void *data;
};

struct loop_defer;
typedef void (*loop_defer_cb)(struct loop_defer *d);

struct loop_defer {
    struct loop_defer *next;
    loop_defer_cb cb;
    int queued;
};

/* Creates a loop, or returns NULL with errno set. */
struct loop *loop_new(void);
/*
 * Frees the loop. Deferred calls still queued run first (they typically free their owners);
 * watchers still registered are forgotten, not closed.
 */
void loop_free(struct loop *loop);

/* Runs until loop_stop() is called; returns 0 or -errno if epoll_wait fails. */
int loop_run(struct loop *loop);
/* Makes loop_run() return after the current iteration. Loop thread only. */
void loop_stop(struct loop *loop);
/* Milliseconds of the loop's clock, refreshed once per iteration. */
uint64_t loop_now_ms(struct loop *loop);

/* Initialises <io> for <fd>; nothing is registered until loop_io_want(). */
void loop_io_init(struct loop_io *io, int fd, loop_io_cb cb, void *data);
/* Sets the wanted events (0 removes the fd from epoll). Returns 0 or -errno. */
int loop_io_want(struct loop *loop, struct loop_io *io, unsigned want);
/*
 * Stops dispatching <io>'s events without a system call, for an fd that loop_io_close() closes
 * before the loop waits again (in a deferred call of this round): the registration stays in
 * epoll until then, and its events are dropped.
 */
void loop_io_mute(struct loop *loop, struct loop_io *io);
/*
 * Closes <io>'s fd, which must be the last descriptor of its socket (never dup()ed): closing
 * it takes it out of epoll, so no EPOLL_CTL_DEL is made (two system calls saved per
 * connection and side), and an event still due for it in this round is dropped.
 */
void loop_io_close(struct loop *loop, struct loop_io *io);
/*
 * Hands the epoll registration of <from>'s fd to <to> (initialised for the same fd), which
 * then wants <want>: no system call when <want> is what <from> wanted, one epoll_ctl
 * otherwise, where loop_io_want(from, 0) and loop_io_want(to, want) make two (the pool moves
 * a connection between a session and its idle list about every other routed request).
 * <from> is left wanting nothing; an event for the fd still due in this round goes to <to>.
 * Returns 0 or -errno.
 */
int loop_io_move(struct loop *loop, struct loop_io *from, struct loop_io *to, unsigned want);

void loop_timer_init(struct loop_timer *t, loop_timer_cb cb, void *data);
/* (Re)arms <t> to fire once after <delay_ms>. */
void loop_timer_start(struct loop *loop, struct loop_timer *t, uint64_t delay_ms);
/* Disarms <t>; harmless when not armed. */
void loop_timer_stop(struct loop *loop, struct loop_timer *t);
static inline int loop_timer_armed(const struct loop_timer *t)
{
    return t->heap_index != (size_t)-1;
}

/* Queues <cb> to run after the current dispatch round; queuing twice runs it once. */
void loop_defer(struct loop *loop, struct loop_defer *d, loop_defer_cb cb);

/*
 * Cross-thread wake-up. loop_set_wakeup() installs <cb> to run on the loop's thread after any
 * thread calls loop_wakeup(); several wake-ups may coalesce into one call.
 */
void loop_set_wakeup(struct loop *loop, void (*cb)(struct loop *loop, void *data), void *data);
void loop_wakeup(struct loop *loop);

/*
 * Typed cross-thread receivers (as h2o's h2o_multithread_receiver_t): one per kind of message
 * a loop gets from other threads, each with its own callback, so a wake-up runs only the
 * receivers that were notified and a new kind of message does not grow one catch-all
 * callback. They share the loop's eventfd; the messages themselves travel in their owners'
 * structures (a mailbox, an atomic slot), the receiver only says "look".
 */
struct loop_receiver;
typedef void (*loop_receiver_cb)(struct loop_receiver *r);
struct loop_receiver {
    struct loop_receiver *next; /* the loop's list; loop thread only */
    struct loop *loop;
    atomic_int pending;
    loop_receiver_cb cb;
    void *data;
};
/*
 * Adds <r> to <loop>: from then on loop_receiver_notify(r) makes <cb> run on the loop's
 * thread. On the loop's thread, or before its loop runs.
 */
void loop_receiver_register(struct loop *loop, struct loop_receiver *r, loop_receiver_cb cb,
                            void *data);
/*
 * Removes <r> (a zeroed, never registered one is fine); on the loop's thread or after its loop
 * ended, not from a receiver callback. A notification after this wakes the loop and runs
 * nothing; none may come once the loop is freed.
 */
void loop_receiver_unregister(struct loop_receiver *r);
/* Any thread: <r>'s callback runs once soon after (notifications before it run coalesce). */
void loop_receiver_notify(struct loop_receiver *r);

#endif
