/*
 * loop: level-triggered epoll, a binary min-heap of timers, a deferred-call queue and an
 * eventfd for wake-ups from other threads.
 *
 * One iteration: wait for events (bounded by the nearest timer), dispatch fd events, run due
 * timers, then run deferred calls. Level triggering keeps the session code simple: interest
 * masks are recomputed after every state change, and nothing is lost if a callback consumes
 * only part of what is ready.
 */
#include "loop.h"
#include "util.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

#define MAX_EVENTS 256

/*
 * The watcher registered for one fd. epoll carries the fd and the generation of its
 * registration, not a watcher pointer, so that a registration changes owner without an
 * epoll_ctl (loop_io_move()) and an event still due from a registration that is gone (the fd
 * closed and its number reused in the same round) finds another generation and is dropped.
 */
struct loop_slot {
    struct loop_io *io; /* NULL when nothing is registered */
    uint32_t gen;
};

struct loop {
    int epfd;
    struct loop_slot *slots; /* indexed by fd */
    size_t n_slots;
    uint32_t gen;
    int stop;
    uint64_t now_ms;
    uint64_t timer_pass; /* incremented before each run of due timers */
    struct loop_timer **heap;
    size_t heap_len, heap_cap;
    struct loop_defer *defer_head, *defer_tail;
    struct loop_io wake_io;
    void (*wake_cb)(struct loop *loop, void *data);
    void *wake_data;
    struct loop_receiver *receivers;
};

static void on_wake(struct loop_io *io, unsigned events)
{
    struct loop *loop = io->data;
    uint64_t v;
    (void)events;
    while (read(io->fd, &v, sizeof(v)) == (ssize_t)sizeof(v))
        ;
    /* The flag is cleared before the callback looks: a notification that comes while it runs
     * writes the eventfd again and is seen on the next round. */
    for (struct loop_receiver *r = loop->receivers, *next; r != NULL; r = next) {
        next = r->next;
        if (atomic_exchange(&r->pending, 0))
            r->cb(r);
    }
    if (loop->wake_cb != NULL)
        loop->wake_cb(loop, loop->wake_data);
}

struct loop *loop_new(void)
{
    struct loop *loop = xcalloc(1, sizeof(*loop));
    loop->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (loop->epfd == -1)
        goto fail;
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd == -1)
        goto fail;
    loop_io_init(&loop->wake_io, efd, on_wake, loop);
    if (loop_io_want(loop, &loop->wake_io, LOOP_READ) != 0) {
        close(efd);
        goto fail;
    }
    loop->now_ms = util_now_ms();
    return loop;
fail:
    if (loop->epfd != -1 && loop->epfd != 0)
        close(loop->epfd);
    free(loop);
    return NULL;
}

static void run_deferred(struct loop *loop);

void loop_free(struct loop *loop)
{
    if (loop == NULL)
        return;
    /* Owners that free themselves through loop_defer() must not leak when the loop ends. */
    run_deferred(loop);
    close(loop->wake_io.fd);
    close(loop->epfd);
    free(loop->heap);
    free(loop->slots);
    free(loop);
}

uint64_t loop_now_ms(struct loop *loop)
{
    return loop->now_ms;
}

void loop_stop(struct loop *loop)
{
    loop->stop = 1;
}

void loop_io_init(struct loop_io *io, int fd, loop_io_cb cb, void *data)
{
    io->fd = fd;
    io->want = 0;
    io->fired = 0;
    io->cb = cb;
    io->data = data;
}

static uint32_t epoll_events(unsigned want)
{
    uint32_t ev = 0;
    if (want & LOOP_READ)
        ev |= EPOLLIN | EPOLLRDHUP;
    if (want & LOOP_WRITE)
        ev |= EPOLLOUT;
    return ev;
}

/* The slot of <fd>, the table grown to hold it. */
static struct loop_slot *slot_of(struct loop *loop, int fd)
{
    size_t i = (size_t)fd;
    if (i >= loop->n_slots) {
        size_t n = loop->n_slots != 0 ? loop->n_slots : 64;
        while (n <= i)
            n *= 2;
        loop->slots = xrealloc(loop->slots, n * sizeof(*loop->slots));
        memset(loop->slots + loop->n_slots, 0, (n - loop->n_slots) * sizeof(*loop->slots));
        loop->n_slots = n;
    }
    return &loop->slots[i];
}

int loop_io_want(struct loop *loop, struct loop_io *io, unsigned want)
{
    if (want == io->want)
        return 0;
    if (io->fd < 0)
        return -EBADF;
    struct loop_slot *slot = slot_of(loop, io->fd);
    int op = io->want == 0 ? EPOLL_CTL_ADD : want == 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    uint32_t gen = op == EPOLL_CTL_ADD ? ++loop->gen : slot->gen;
    struct epoll_event ev = {0};
    ev.data.u64 = (uint64_t)gen << 32 | (uint32_t)io->fd;
    ev.events = epoll_events(want);
    if (epoll_ctl(loop->epfd, op, io->fd, &ev) == -1) {
        int err = -errno;
        /*
         * A failed DEL means the fd is no longer registered (closed, so the kernel dropped
         * it): record that, or the dispatcher would keep calling a watcher its owner has
         * already given up on.
         */
        if (op == EPOLL_CTL_DEL) {
            io->want = 0;
            if (slot->io == io)
                slot->io = NULL;
        }
        return err;
    }
    slot->io = want != 0 ? io : NULL;
    slot->gen = gen;
    io->want = want;
    return 0;
}

void loop_io_mute(struct loop *loop, struct loop_io *io)
{
    if (io->want != 0 && io->fd >= 0 && (size_t)io->fd < loop->n_slots &&
        loop->slots[io->fd].io == io)
        loop->slots[io->fd].io = NULL;
}

void loop_io_close(struct loop *loop, struct loop_io *io)
{
    loop_io_mute(loop, io);
    io->want = 0;
    if (io->fd >= 0)
        close(io->fd);
}

int loop_io_move(struct loop *loop, struct loop_io *from, struct loop_io *to, unsigned want)
{
    if (from->want == 0 || want == 0 || from->fd != to->fd) {
        int err = loop_io_want(loop, from, 0);
        int err2 = loop_io_want(loop, to, want);
        return err != 0 ? err : err2;
    }
    struct loop_slot *slot = slot_of(loop, to->fd);
    if (want != from->want) {
        /* The same registration (and generation), other events. */
        struct epoll_event ev = {0};
        ev.data.u64 = (uint64_t)slot->gen << 32 | (uint32_t)to->fd;
        ev.events = epoll_events(want);
        if (epoll_ctl(loop->epfd, EPOLL_CTL_MOD, to->fd, &ev) == -1) {
            from->want = 0;
            slot->io = NULL;
            return -errno; /* not registered any more (closed): neither watcher is */
        }
    }
    /* Only the owner changes: no system call when the events stay. */
    from->want = 0;
    slot->io = to;
    to->want = want;
    return 0;
}

/* ---- timers: binary min-heap keyed by due_ms ---- */

static void heap_swap(struct loop *loop, size_t a, size_t b)
{
    struct loop_timer *t = loop->heap[a];
    loop->heap[a] = loop->heap[b];
    loop->heap[b] = t;
    loop->heap[a]->heap_index = a;
    loop->heap[b]->heap_index = b;
}

static void heap_up(struct loop *loop, size_t i)
{
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (loop->heap[parent]->due_ms <= loop->heap[i]->due_ms)
            break;
        heap_swap(loop, i, parent);
        i = parent;
    }
}

static void heap_down(struct loop *loop, size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < loop->heap_len && loop->heap[l]->due_ms < loop->heap[m]->due_ms)
            m = l;
        if (r < loop->heap_len && loop->heap[r]->due_ms < loop->heap[m]->due_ms)
            m = r;
        if (m == i)
            return;
        heap_swap(loop, i, m);
        i = m;
    }
}

void loop_timer_init(struct loop_timer *t, loop_timer_cb cb, void *data)
{
    t->due_ms = 0;
    t->heap_index = (size_t)-1;
    t->cb = cb;
    t->data = data;
}

void loop_timer_stop(struct loop *loop, struct loop_timer *t)
{
    size_t i = t->heap_index;
    if (i == (size_t)-1)
        return;
    size_t last = --loop->heap_len;
    if (i != last) {
        loop->heap[i] = loop->heap[last];
        loop->heap[i]->heap_index = i;
        heap_down(loop, i);
        heap_up(loop, i);
    }
    t->heap_index = (size_t)-1;
}

void loop_timer_start(struct loop *loop, struct loop_timer *t, uint64_t delay_ms)
{
    loop_timer_stop(loop, t);
    if (loop->heap_len == loop->heap_cap) {
        loop->heap_cap = loop->heap_cap ? loop->heap_cap * 2 : 64;
        loop->heap = xrealloc(loop->heap, loop->heap_cap * sizeof(*loop->heap));
    }
    t->due_ms = util_now_ms() + delay_ms;
    t->pass = loop->timer_pass;
    t->heap_index = loop->heap_len;
    loop->heap[loop->heap_len++] = t;
    heap_up(loop, t->heap_index);
}

static void run_timers(struct loop *loop)
{
    /* A timer re-armed by a callback of this pass waits for the next iteration, so a 0 ms
     * re-arm cannot spin here until the clock ticks. */
    uint64_t pass = ++loop->timer_pass;
    while (loop->heap_len > 0 && loop->heap[0]->due_ms <= loop->now_ms &&
           loop->heap[0]->pass != pass) {
        struct loop_timer *t = loop->heap[0];
        loop_timer_stop(loop, t);
        t->cb(t);
    }
}

/* ---- deferred calls ---- */

void loop_defer(struct loop *loop, struct loop_defer *d, loop_defer_cb cb)
{
    if (d->queued)
        return;
    d->queued = 1;
    d->cb = cb;
    d->next = NULL;
    if (loop->defer_tail != NULL)
        loop->defer_tail->next = d;
    else
        loop->defer_head = d;
    loop->defer_tail = d;
}

static void run_deferred(struct loop *loop)
{
    while (loop->defer_head != NULL) {
        struct loop_defer *d = loop->defer_head;
        loop->defer_head = d->next;
        if (loop->defer_head == NULL)
            loop->defer_tail = NULL;
        d->queued = 0;
        d->cb(d);
    }
}

void loop_set_wakeup(struct loop *loop, void (*cb)(struct loop *loop, void *data), void *data)
{
    loop->wake_cb = cb;
    loop->wake_data = data;
}

void loop_wakeup(struct loop *loop)
{
    uint64_t one = 1;
    ssize_t n = write(loop->wake_io.fd, &one, sizeof(one));
    (void)n; /* EAGAIN means the counter is already non-zero: a wake-up is pending. */
}

void loop_receiver_register(struct loop *loop, struct loop_receiver *r, loop_receiver_cb cb,
                            void *data)
{
    r->loop = loop;
    r->cb = cb;
    r->data = data;
    atomic_init(&r->pending, 0);
    struct loop_receiver **p = &loop->receivers; /* appended: callbacks run in this order */
    while (*p != NULL)
        p = &(*p)->next;
    r->next = NULL;
    *p = r;
}

void loop_receiver_unregister(struct loop_receiver *r)
{
    if (r->loop == NULL)
        return;
    for (struct loop_receiver **p = &r->loop->receivers; *p != NULL; p = &(*p)->next) {
        if (*p == r) {
            *p = r->next;
            break;
        }
    }
}

void loop_receiver_notify(struct loop_receiver *r)
{
    atomic_store(&r->pending, 1);
    loop_wakeup(r->loop);
}

int loop_run(struct loop *loop)
{
    struct epoll_event events[MAX_EVENTS];
    loop->stop = 0;
    while (!loop->stop) {
        int timeout = -1;
        loop->now_ms = util_now_ms();
        if (loop->defer_head != NULL) {
            timeout = 0;
        } else if (loop->heap_len > 0) {
            uint64_t due = loop->heap[0]->due_ms;
            timeout = due <= loop->now_ms ? 0 : (int)MIN(due - loop->now_ms, 60000u);
        }
        int n = epoll_wait(loop->epfd, events, MAX_EVENTS, timeout);
        if (n == -1) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        loop->now_ms = util_now_ms();
        for (int i = 0; i < n; i++) {
            uint64_t tag = events[i].data.u64;
            size_t fd = (uint32_t)tag;
            if (fd >= loop->n_slots || loop->slots[fd].gen != (uint32_t)(tag >> 32))
                continue; /* a registration that ended earlier in this round */
            struct loop_io *io = loop->slots[fd].io;
            if (io == NULL)
                continue;
            unsigned ev = 0;
            if (events[i].events & (EPOLLIN | EPOLLRDHUP))
                ev |= LOOP_READ;
            if (events[i].events & EPOLLOUT)
                ev |= LOOP_WRITE;
            if (events[i].events & (EPOLLERR | EPOLLHUP))
                ev |= LOOP_ERROR | LOOP_READ | LOOP_WRITE;
            /* An earlier callback in this round may have stopped watching this fd. */
            if (io->want != 0) {
                io->fired |= ev & (io->want | LOOP_ERROR);
                io->cb(io, ev & (io->want | LOOP_ERROR));
            }
        }
        run_timers(loop);
        run_deferred(loop);
    }
    return 0;
}
