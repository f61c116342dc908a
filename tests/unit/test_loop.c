/*
 * Unit tests for the loop's typed cross-thread receivers: a notification from another thread
 * runs its own receiver's callback on the loop's thread, and only that one; notifications
 * before the callback runs coalesce; an unregistered receiver is not run. And for fd watchers:
 * io.fired marks the watcher dispatched, and loop_io_move() hands a registration over, with no
 * system call when the events stay; an event due from a registration that ended in the same
 * round (its fd number reused) reaches nobody.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "loop.h"

/* The loop's epoll_ctl calls, counted: this definition takes the place of libc's. */
static int n_epoll_ctl;

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    n_epoll_ctl++;
    return (int)syscall(SYS_epoll_ctl, epfd, op, fd, ev);
}

struct counts {
    struct loop *loop;
    struct loop_receiver a, b, stop;
    int ran_a, ran_b;
};

static void on_a(struct loop_receiver *r)
{
    struct counts *c = r->data;
    c->ran_a++;
}

static void on_b(struct loop_receiver *r)
{
    struct counts *c = r->data;
    c->ran_b++;
}

static void on_stop(struct loop_receiver *r)
{
    struct counts *c = r->data;
    loop_stop(c->loop);
}

/* Another thread: notifies <a> three times, then asks the loop to stop. */
static void *notify_a_then_stop(void *arg)
{
    struct counts *c = arg;
    for (int i = 0; i < 3; i++)
        loop_receiver_notify(&c->a);
    loop_receiver_notify(&c->stop);
    return NULL;
}

static void run_with_thread(struct counts *c)
{
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, notify_a_then_stop, c), 0);
    assert_int_equal(pthread_join(t, NULL), 0); /* all notified before the loop looks */
    assert_int_equal(loop_run(c->loop), 0);
}

static void test_only_the_notified_receiver_runs(void **state)
{
    (void)state;
    struct counts c = {.loop = loop_new()};
    assert_non_null(c.loop);
    loop_receiver_register(c.loop, &c.a, on_a, &c);
    loop_receiver_register(c.loop, &c.b, on_b, &c);
    loop_receiver_register(c.loop, &c.stop, on_stop, &c);
    run_with_thread(&c);
    assert_int_equal(c.ran_a, 1); /* three notifications, one call */
    assert_int_equal(c.ran_b, 0);

    loop_receiver_unregister(&c.a);
    run_with_thread(&c);
    assert_int_equal(c.ran_a, 1); /* no longer registered: not run */
    assert_int_equal(c.ran_b, 0);
    loop_receiver_unregister(&c.b);
    loop_receiver_unregister(&c.stop);
    loop_free(c.loop);
}

/* Two watchers sharing one callback, which counts calls and stops the loop. */
struct shared {
    struct loop *loop;
    struct loop_io a, b;
    int calls;
};

static void on_shared(struct loop_io *io, unsigned events)
{
    struct shared *sh = io->data;
    (void)events;
    sh->calls++;
    loop_stop(sh->loop);
}

/* io.fired tells a callback shared by several watchers which of them had an event: the loop
 * adds the dispatched events, only the owner clears them, and loop_io_init() starts at 0. */
static void test_fired_marks_the_watcher_dispatched(void **state)
{
    (void)state;
    int sa[2], sb[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sa), 0);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sb), 0);
    struct shared sh = {.loop = loop_new()};
    assert_non_null(sh.loop);
    sh.a.fired = sh.b.fired = 0x80; /* loop_io_init() clears whatever was there */
    loop_io_init(&sh.a, sa[0], on_shared, &sh);
    loop_io_init(&sh.b, sb[0], on_shared, &sh);
    assert_int_equal(sh.a.fired, 0);
    assert_int_equal(loop_io_want(sh.loop, &sh.a, LOOP_READ), 0);
    assert_int_equal(loop_io_want(sh.loop, &sh.b, LOOP_READ), 0);

    assert_int_equal(write(sa[1], "x", 1), 1);
    assert_int_equal(loop_run(sh.loop), 0);
    assert_int_equal(sh.calls, 1);
    assert_int_equal(sh.a.fired, LOOP_READ);
    assert_int_equal(sh.b.fired, 0);

    /* Not cleared by the owner: a second event adds to it; b's own event marks b. */
    assert_int_equal(write(sb[1], "y", 1), 1);
    assert_int_equal(loop_io_want(sh.loop, &sh.a, 0), 0);
    assert_int_equal(loop_run(sh.loop), 0);
    assert_int_equal(sh.calls, 2);
    assert_int_equal(sh.a.fired, LOOP_READ);
    assert_int_equal(sh.b.fired, LOOP_READ);

    assert_int_equal(loop_io_want(sh.loop, &sh.b, 0), 0);
    loop_free(sh.loop);
    for (int i = 0; i < 2; i++) {
        close(sa[i]);
        close(sb[i]);
    }
}

/* Counts calls per watcher and stops the loop. */
struct moved {
    struct loop *loop;
    struct loop_io a, b;
    int calls_a, calls_b;
};

static void on_moved(struct loop_io *io, unsigned events)
{
    struct moved *m = io->data;
    (void)events;
    if (io == &m->a)
        m->calls_a++;
    else
        m->calls_b++;
    loop_stop(m->loop);
}

/* loop_io_move() hands one fd's registration from one watcher to another: the fd's events go
 * to the new one only, with the events asked for, and the old one is left wanting nothing. */
static void test_move_hands_the_registration_over(void **state)
{
    (void)state;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    struct moved m = {.loop = loop_new()};
    assert_non_null(m.loop);
    loop_io_init(&m.a, sv[0], on_moved, &m);
    assert_int_equal(loop_io_want(m.loop, &m.a, LOOP_READ), 0);
    loop_io_init(&m.b, sv[0], on_moved, &m);
    int calls = n_epoll_ctl;
    assert_int_equal(loop_io_move(m.loop, &m.a, &m.b, LOOP_READ), 0);
    assert_int_equal(n_epoll_ctl, calls); /* the same events: only the owner changes */
    assert_int_equal(m.a.want, 0);
    assert_int_equal(m.b.want, LOOP_READ);

    assert_int_equal(write(sv[1], "x", 1), 1);
    assert_int_equal(loop_run(m.loop), 0);
    assert_int_equal(m.calls_a, 0);
    assert_int_equal(m.calls_b, 1);
    assert_int_equal(m.b.fired, LOOP_READ);

    /* Back to a, now for writing only (the byte is still unread: no read event for it). */
    loop_io_init(&m.a, sv[0], on_moved, &m);
    calls = n_epoll_ctl;
    assert_int_equal(loop_io_move(m.loop, &m.b, &m.a, LOOP_WRITE), 0);
    assert_int_equal(n_epoll_ctl, calls + 1);
    assert_int_equal(m.b.want, 0);
    assert_int_equal(loop_run(m.loop), 0);
    assert_int_equal(m.calls_a, 1);
    assert_int_equal(m.calls_b, 1);
    assert_int_equal(m.a.fired, LOOP_WRITE);

    /* Moving to "nothing" unregisters the fd; from an unregistered watcher registers it. */
    loop_io_init(&m.b, sv[0], on_moved, &m);
    assert_int_equal(loop_io_move(m.loop, &m.a, &m.b, 0), 0);
    assert_int_equal(m.a.want, 0);
    assert_int_equal(m.b.want, 0);
    loop_io_init(&m.a, sv[0], on_moved, &m);
    assert_int_equal(loop_io_move(m.loop, &m.b, &m.a, LOOP_READ), 0);
    assert_int_equal(loop_run(m.loop), 0);
    assert_int_equal(m.calls_a, 2);

    assert_int_equal(loop_io_want(m.loop, &m.a, 0), 0);
    loop_free(m.loop);
    close(sv[0]);
    close(sv[1]);
}

/* Two watchers ready in one round; the first to run ends the other's registration, puts a
 * fresh socket at the other's fd number and watches that. */
struct reused {
    struct loop *loop;
    struct loop_io a, b, fresh;
    int fds[2][2];
    int calls_ab, calls_fresh;
};

static void on_fresh(struct loop_io *io, unsigned events)
{
    struct reused *r = io->data;
    (void)events;
    r->calls_fresh++;
    loop_stop(r->loop);
}

static void on_reused(struct loop_io *io, unsigned events)
{
    struct reused *r = io->data;
    (void)events;
    if (r->calls_ab++ > 0)
        return;
    struct loop_io *other = io == &r->a ? &r->b : &r->a;
    int num = other->fd, sv[2];
    assert_int_equal(loop_io_want(r->loop, other, 0), 0);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    assert_int_equal(dup2(sv[0], num), num); /* closes the old socket at that number */
    close(sv[0]);
    close(sv[1]); /* the fresh socket reads EOF: readable, but not in this round */
    loop_io_init(&r->fresh, num, on_fresh, r);
    assert_int_equal(loop_io_want(r->loop, &r->fresh, LOOP_READ), 0);
    loop_stop(r->loop);
}

/* The event already due for the old socket at a reused fd number is not the fresh watcher's. */
static void test_event_of_an_ended_registration_is_dropped(void **state)
{
    (void)state;
    struct reused r = {.loop = loop_new()};
    assert_non_null(r.loop);
    for (int i = 0; i < 2; i++)
        assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, r.fds[i]), 0);
    loop_io_init(&r.a, r.fds[0][0], on_reused, &r);
    loop_io_init(&r.b, r.fds[1][0], on_reused, &r);
    assert_int_equal(loop_io_want(r.loop, &r.a, LOOP_READ), 0);
    assert_int_equal(loop_io_want(r.loop, &r.b, LOOP_READ), 0);
    assert_int_equal(write(r.fds[0][1], "x", 1), 1);
    assert_int_equal(write(r.fds[1][1], "y", 1), 1);
    assert_int_equal(loop_run(r.loop), 0);
    assert_int_equal(r.calls_ab, 1);
    assert_int_equal(r.calls_fresh, 0);
    /* The next round: the fresh socket's own event (EOF) reaches its watcher. */
    struct loop_io *left = r.a.want != 0 ? &r.a : &r.b;
    assert_int_equal(loop_io_want(r.loop, left, 0), 0);
    assert_int_equal(loop_run(r.loop), 0);
    assert_int_equal(r.calls_fresh, 1);
    assert_int_equal(loop_io_want(r.loop, &r.fresh, 0), 0);
    loop_free(r.loop);
    for (int i = 0; i < 2; i++) {
        close(r.fds[i][0]);
        close(r.fds[i][1]);
    }
}

/* loop_io_close() closes a watched fd without an epoll_ctl; a socket that then gets the same
 * number is watched afresh, and only its own events reach its watcher. */
static void test_close_forgets_without_a_system_call(void **state)
{
    (void)state;
    int sa[2], sb[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sa), 0);
    struct shared sh = {.loop = loop_new()};
    assert_non_null(sh.loop);
    loop_io_init(&sh.a, sa[0], on_shared, &sh);
    assert_int_equal(loop_io_want(sh.loop, &sh.a, LOOP_READ), 0);
    assert_int_equal(write(sa[1], "x", 1), 1); /* an event due for a, never dispatched */
    int num = sa[0], calls = n_epoll_ctl;
    loop_io_close(sh.loop, &sh.a);
    assert_int_equal(n_epoll_ctl, calls);
    assert_int_equal(sh.a.want, 0);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sb), 0);
    assert_int_equal(sb[0], num); /* the lowest free number: a's */
    loop_io_init(&sh.b, sb[0], on_shared, &sh);
    assert_int_equal(loop_io_want(sh.loop, &sh.b, LOOP_READ), 0);
    assert_int_equal(write(sb[1], "y", 1), 1);
    assert_int_equal(loop_run(sh.loop), 0);
    assert_int_equal(sh.calls, 1);
    assert_int_equal(sh.a.fired, 0);
    assert_int_equal(sh.b.fired, LOOP_READ);
    assert_int_equal(loop_io_want(sh.loop, &sh.b, 0), 0);
    loop_free(sh.loop);
    close(sa[1]);
    close(sb[0]);
    close(sb[1]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_only_the_notified_receiver_runs),
        cmocka_unit_test(test_fired_marks_the_watcher_dispatched),
        cmocka_unit_test(test_move_hands_the_registration_over),
        cmocka_unit_test(test_event_of_an_ended_registration_is_dropped),
        cmocka_unit_test(test_close_forgets_without_a_system_call),
    };
    return cmocka_run_group_tests_name("loop", tests, NULL, NULL);
}
