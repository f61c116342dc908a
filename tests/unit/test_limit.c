/*
 * Unit tests for limit: the token bucket as a pure function, and admission with its shared
 * open-connection count.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>

#include "limit.h"

#define SEC 1000000u

static void test_bucket_off_always_admits(void **state)
{
    uint64_t at = 0;
    (void)state;
    for (int i = 0; i < 1000; i++)
        assert_int_equal(limit_bucket_take(&at, 5 * SEC, 0, 0), 1);
    assert_int_equal(at, 0);
}

static void test_bucket_burst_then_refill(void **state)
{
    uint64_t at = 0, now = 100 * SEC;
    (void)state;
    /* 2 per second, burst 5: five at once, then the sixth waits half a second. */
    for (int i = 0; i < 5; i++)
        assert_int_equal(limit_bucket_take(&at, now, 2, 5), 1);
    assert_int_equal(limit_bucket_take(&at, now, 2, 5), 0);
    assert_int_equal(limit_bucket_take(&at, now + SEC / 2 - 1, 2, 5), 0);
    assert_int_equal(limit_bucket_take(&at, now + SEC / 2, 2, 5), 1);
    assert_int_equal(limit_bucket_take(&at, now + SEC / 2, 2, 5), 0);
    /* A long quiet time refills the bucket, but never beyond its size. */
    now += 60 * SEC;
    for (int i = 0; i < 5; i++)
        assert_int_equal(limit_bucket_take(&at, now, 2, 5), 1);
    assert_int_equal(limit_bucket_take(&at, now, 2, 5), 0);
}

static void test_bucket_default_burst_is_rate(void **state)
{
    uint64_t at = 0, now = 7 * SEC;
    int ok = 0;
    (void)state;
    for (int i = 0; i < 20; i++)
        ok += limit_bucket_take(&at, now, 10, 0);
    assert_int_equal(ok, 10);
}

static void test_bucket_steady_rate(void **state)
{
    uint64_t at = 0, now = SEC;
    int ok = 0;
    (void)state;
    /* Offered 1000/s for 10 s against 100/s with burst 1: about 100/s get through. */
    for (int i = 0; i < 10000; i++, now += SEC / 1000)
        ok += limit_bucket_take(&at, now, 100, 1);
    assert_in_range(ok, 999, 1001);
}

static void test_admit_max_connections(void **state)
{
    struct limit_state *l = limit_state_new();
    struct limit_cfg cfg = {.max_connections = 2};
    (void)state;
    assert_int_equal(limit_admit(l, &cfg, SEC), LIMIT_OK);
    assert_int_equal(limit_admit(l, &cfg, SEC), LIMIT_OK);
    assert_int_equal(limit_admit(l, &cfg, SEC), LIMIT_MAX_CONNECTIONS);
    assert_int_equal(limit_open(l), 2);
    limit_release(l);
    assert_int_equal(limit_admit(l, &cfg, SEC), LIMIT_OK);
    /* Raising the limit takes effect for the next connection; lowering it refuses. */
    cfg.max_connections = 0;
    assert_int_equal(limit_admit(l, &cfg, SEC), LIMIT_OK);
    cfg.max_connections = 1;
    assert_int_equal(limit_admit(l, &cfg, SEC), LIMIT_MAX_CONNECTIONS);
    assert_int_equal(limit_open(l), 3);
    limit_release(l);
    limit_release(l);
    limit_release(l);
    assert_int_equal(limit_open(l), 0);
    limit_state_unref(l);
}

static void test_admit_rate(void **state)
{
    struct limit_state *l = limit_state_new();
    struct limit_cfg cfg = {.new_per_second = 1, .new_burst = 2};
    (void)state;
    assert_int_equal(limit_admit(l, &cfg, 10 * SEC), LIMIT_OK);
    assert_int_equal(limit_admit(l, &cfg, 10 * SEC), LIMIT_OK);
    assert_int_equal(limit_admit(l, &cfg, 10 * SEC), LIMIT_RATE);
    assert_int_equal(limit_open(l), 2);
    assert_int_equal(limit_admit(l, &cfg, 11 * SEC), LIMIT_OK);
    limit_release(l);
    limit_release(l);
    limit_release(l);
    limit_state_unref(l);
}

struct race {
    struct limit_state *l;
    struct limit_cfg cfg;
    int admitted;
};

static void *admit_many(void *arg)
{
    struct race *r = arg;
    for (int i = 0; i < 10000; i++)
        r->admitted += limit_admit(r->l, &r->cfg, SEC) == LIMIT_OK;
    return NULL;
}

static void test_admit_holds_across_threads(void **state)
{
    /* Four threads race for 100 slots and a bucket of 50 + 0: exactly 50 get through. */
    struct limit_state *l = limit_state_new();
    struct race r[4];
    pthread_t t[4];
    int total = 0;
    (void)state;
    for (int i = 0; i < 4; i++) {
        r[i] = (struct race){.l = l,
                             .cfg = {.max_connections = 100, .new_per_second = 1, .new_burst = 50}};
        assert_int_equal(pthread_create(&t[i], NULL, admit_many, &r[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        total += r[i].admitted;
    }
    assert_int_equal(total, 50);
    assert_int_equal(limit_open(l), 50);
    limit_state_unref(l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bucket_off_always_admits),
        cmocka_unit_test(test_bucket_burst_then_refill),
        cmocka_unit_test(test_bucket_default_burst_is_rate),
        cmocka_unit_test(test_bucket_steady_rate),
        cmocka_unit_test(test_admit_max_connections),
        cmocka_unit_test(test_admit_rate),
        cmocka_unit_test(test_admit_holds_across_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
