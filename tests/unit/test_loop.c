/*
 * Unit tests for the loop's typed cross-thread receivers: a notification from another thread
 * runs its own receiver's callback on the loop's thread, and only that one; notifications
 * before the callback runs coalesce; an unregistered receiver is not run.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>

#include "loop.h"

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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_only_the_notified_receiver_runs),
    };
    return cmocka_run_group_tests_name("loop", tests, NULL, NULL);
}
