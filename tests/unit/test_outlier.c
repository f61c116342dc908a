/*
 * Unit tests for outlier: the ejection arithmetic (Envoy's consecutive-5xx ejection with its
 * growing, decaying multiplier, max_ejection_percent, the sweep interval), the shared request
 * counts, and the endpoint registry that follows the endpoints.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <string.h>

#include "outlier.h"

#define T0 1000000u /* a monotonic time well past 0, which marks "in service" */

static void test_defaults_fill_zeros(void **state)
{
    (void)state;
    struct outlier_cfg z = {0}, e = outlier_cfg_effective(&z);
    assert_int_equal(e.interval_ms, 10000);
    assert_int_equal(e.max_failures, 5);
    assert_int_equal(e.base_ejection_ms, 30000);
    /* Percentages are taken as given (0 means 0); the key table supplies 100 and 10. */
    struct outlier_cfg big = {.enforcing_pct = 250, .max_ejection_pct = 101};
    e = outlier_cfg_effective(&big);
    assert_int_equal(e.enforcing_pct, 100);
    assert_int_equal(e.max_ejection_pct, 100);
}

static void test_may_eject_share(void **state)
{
    (void)state;
    /* 10 %: one of two endpoints (nothing is ejected yet: 0 < 10), not a second one. */
    assert_true(outlier_may_eject(0, 2, 10));
    assert_false(outlier_may_eject(1, 2, 10));
    /* One always may be, even when 10 % of the target rounds to no endpoint at all. */
    assert_true(outlier_may_eject(0, 1, 10));
    assert_true(outlier_may_eject(0, 3, 1));
    /* 0 % ejects none; 100 % all but... all of them (the dial then panics). */
    assert_false(outlier_may_eject(0, 5, 0));
    assert_true(outlier_may_eject(4, 5, 100));
    assert_false(outlier_may_eject(5, 5, 100));
    /* 50 % of 10: while fewer than five are out. */
    assert_true(outlier_may_eject(4, 10, 50));
    assert_false(outlier_may_eject(5, 10, 50));
    assert_false(outlier_may_eject(0, 0, 100));
}

static void test_ejection_time_grows_caps_and_rounds_to_interval(void **state)
{
    (void)state;
    struct outlier_cfg c = {.interval_ms = 1000, .base_ejection_ms = 30000};
    assert_int_equal(outlier_ejection_ms(&c, 1), 30000);
    assert_int_equal(outlier_ejection_ms(&c, 2), 60000);
    assert_int_equal(outlier_ejection_ms(&c, 10), 300000);
    assert_int_equal(outlier_ejection_ms(&c, 11), 300000); /* max_ejection_time */
    /* A base above 300 s is its own cap. */
    c.base_ejection_ms = 400000;
    assert_int_equal(outlier_ejection_ms(&c, 3), 400000);
    /* Rounded up to whole sweeps: a return happens on a sweep. */
    c = (struct outlier_cfg){.interval_ms = 10000, .base_ejection_ms = 1500};
    assert_int_equal(outlier_ejection_ms(&c, 1), 10000);
    c.interval_ms = 1000;
    assert_int_equal(outlier_ejection_ms(&c, 1), 2000);
    assert_int_equal(outlier_ejection_ms(&c, 2), 3000);
}

static void test_multiplier_decays_per_interval_in_service(void **state)
{
    (void)state;
    /* Back at 1000 with multiplier 3, sweeps every 100 ms: none a whole interval later yet. */
    assert_int_equal(outlier_decayed(3, 1000, 1099, 100), 3);
    assert_int_equal(outlier_decayed(3, 1000, 1100, 100), 2);
    assert_int_equal(outlier_decayed(3, 1000, 1299, 100), 1);
    assert_int_equal(outlier_decayed(3, 1000, 1300, 100), 0);
    assert_int_equal(outlier_decayed(3, 1000, 99999, 100), 0);
    /* Never back (never ejected): nothing to decay. */
    assert_int_equal(outlier_decayed(0, 0, 99999, 100), 0);
}

/* Reports <n> failures of <h> at <now>; the last event. */
static enum outlier_event fail_n(struct outlier *o, const struct outlier_cfg *c,
                                 struct outlier_host *h, struct outlier_host **peers, size_t np,
                                 unsigned n, uint64_t now, uint64_t *ms)
{
    enum outlier_event ev = OUTLIER_NONE;
    for (unsigned i = 0; i < n; i++)
        ev = outlier_report(o, c, h, peers, np, 1, now, 0, ms);
    return ev;
}

static void test_consecutive_failures_eject_and_return(void **state)
{
    (void)state;
    struct outlier *o = outlier_new();
    outlier_begin(o);
    struct outlier_host *hs[2] = {outlier_host_get(o, "10.0.0.1:80"),
                                  outlier_host_get(o, "10.0.0.2:80")};
    struct outlier_cfg c = {.interval_ms = 100,
                            .max_failures = 3,
                            .enforcing_pct = 100,
                            .max_ejection_pct = 10,
                            .base_ejection_ms = 1000};
    uint64_t ms = 0;
    /* Two failures, a success (the count starts again), two more: still in. */
    assert_int_equal(fail_n(o, &c, hs[0], hs, 2, 2, T0, &ms), OUTLIER_NONE);
    assert_int_equal(outlier_report(o, &c, hs[0], hs, 2, 0, T0, 0, &ms), OUTLIER_NONE);
    assert_int_equal(fail_n(o, &c, hs[0], hs, 2, 2, T0, &ms), OUTLIER_NONE);
    assert_false(outlier_ejected(hs[0], T0, NULL));
    /* The third in a row ejects it for the base time. */
    assert_int_equal(fail_n(o, &c, hs[0], hs, 2, 1, T0, &ms), OUTLIER_EJECTED);
    assert_int_equal(ms, 1000);
    assert_true(outlier_ejected(hs[0], T0 + 999, NULL));
    assert_int_equal(outlier_ejected_among(hs, 2, T0 + 500), 1);
    assert_int_equal(atomic_load(&o->ejections), 1);
    /* The other endpoint reaches the count too, but 1 of 2 is already past 10 %. */
    assert_int_equal(fail_n(o, &c, hs[1], hs, 2, 3, T0 + 10, &ms), OUTLIER_OVERFLOW);
    assert_false(outlier_ejected(hs[1], T0 + 10, NULL));
    assert_int_equal(atomic_load(&o->ejection_overflows), 1);
    /* Its time over, the first returns once: the one who looks first is told. */
    int back = 0;
    assert_false(outlier_ejected(hs[0], T0 + 1000, &back));
    assert_int_equal(back, 1);
    assert_false(outlier_ejected(hs[0], T0 + 1001, &back));
    assert_int_equal(back, 0);
    /* Failing again at once: twice as long (the multiplier had no sweep to decay). */
    assert_int_equal(fail_n(o, &c, hs[0], hs, 2, 3, T0 + 1050, &ms), OUTLIER_EJECTED);
    assert_int_equal(ms, 2000);
    assert_int_equal(atomic_load(&hs[0]->backoff), 2);
    assert_false(outlier_ejected(hs[0], T0 + 3050, NULL));
    /* A long healthy time brings the multiplier back down: the base time again. */
    assert_int_equal(fail_n(o, &c, hs[0], hs, 2, 3, T0 + 60000, &ms), OUTLIER_EJECTED);
    assert_int_equal(ms, 1000);
    outlier_host_unref(hs[0]);
    outlier_host_unref(hs[1]);
    outlier_unref(o);
}

static void test_enforcing_percent_draws(void **state)
{
    (void)state;
    struct outlier *o = outlier_new();
    outlier_begin(o);
    struct outlier_host *h = outlier_host_get(o, "a:1");
    struct outlier_cfg c = {.max_failures = 1, .enforcing_pct = 30, .max_ejection_pct = 100};
    /* A draw of 30 or more (mod 100) is not enforced; below, ejected. */
    assert_int_equal(outlier_report(o, &c, h, &h, 1, 1, T0, 130, NULL), OUTLIER_NOT_ENFORCED);
    assert_false(outlier_ejected(h, T0, NULL));
    assert_int_equal(outlier_report(o, &c, h, &h, 1, 1, T0, 229, NULL), OUTLIER_EJECTED);
    c.enforcing_pct = 0;
    struct outlier_host *g = outlier_host_get(o, "b:1");
    assert_int_equal(outlier_report(o, &c, g, &g, 1, 1, T0, 0, NULL), OUTLIER_NOT_ENFORCED);
    /* max_ejection_percent 0 ejects none. */
    c = (struct outlier_cfg){.max_failures = 1, .enforcing_pct = 100, .max_ejection_pct = 0};
    assert_int_equal(outlier_report(o, &c, g, &g, 1, 1, T0, 0, NULL), OUTLIER_OVERFLOW);
    outlier_host_unref(h);
    outlier_host_unref(g);
    outlier_unref(o);
}

static void test_registry_keeps_state_and_prunes(void **state)
{
    (void)state;
    struct outlier *o = outlier_new();
    outlier_begin(o);
    struct outlier_host *a = outlier_host_get(o, "a:1"), *b = outlier_host_get(o, "b:1");
    atomic_store(&a->fails, 4);
    assert_int_equal(outlier_prune(o), 0);
    /* The next build names a again (same state) and c, not b: b leaves the registry, but
     * lives while a snapshot holds it. */
    outlier_begin(o);
    struct outlier_host *a2 = outlier_host_get(o, "a:1"), *c = outlier_host_get(o, "c:1");
    assert_ptr_equal(a, a2);
    assert_int_equal(atomic_load(&a2->fails), 4);
    assert_int_equal(outlier_prune(o), 1);
    assert_int_equal(o->n_hosts, 2);
    assert_string_equal(b->name, "b:1");
    outlier_begin(o);
    struct outlier_host *b2 = outlier_host_get(o, "b:1");
    assert_ptr_not_equal(b, b2); /* a new endpoint by that name starts afresh */
    assert_int_equal(atomic_load(&b2->fails), 0);
    outlier_prune(o);
    outlier_host_unref(a);
    outlier_host_unref(a2);
    outlier_host_unref(b);
    outlier_host_unref(b2);
    outlier_host_unref(c);
    outlier_unref(o);
}

static void test_admit_counts_and_overflows(void **state)
{
    (void)state;
    struct outlier *o = outlier_new();
    assert_true(outlier_admit(o, OUTLIER_LIMIT_PENDING, 2));
    assert_true(outlier_admit(o, OUTLIER_LIMIT_PENDING, 2));
    assert_false(outlier_admit(o, OUTLIER_LIMIT_PENDING, 2));
    assert_int_equal(outlier_count(o, OUTLIER_LIMIT_PENDING), 2);
    assert_int_equal(atomic_load(&o->overflow[OUTLIER_LIMIT_PENDING]), 1);
    /* The other limit counts apart; 0 is no limit. */
    for (int i = 0; i < 100; i++)
        assert_true(outlier_admit(o, OUTLIER_LIMIT_CONCURRENT, 0));
    assert_int_equal(outlier_count(o, OUTLIER_LIMIT_CONCURRENT), 100);
    outlier_release(o, OUTLIER_LIMIT_PENDING);
    assert_true(outlier_admit(o, OUTLIER_LIMIT_PENDING, 2));
    assert_string_equal(outlier_limit_name(OUTLIER_LIMIT_PENDING), "max_pending_requests");
    assert_string_equal(outlier_limit_name(OUTLIER_LIMIT_CONCURRENT), "max_concurrent_requests");
    assert_string_equal(outlier_limit_name(OUTLIER_LIMIT_CONNECTIONS), "max_connections");
    assert_true(outlier_admit(o, OUTLIER_LIMIT_CONNECTIONS, 1));
    assert_false(outlier_admit(o, OUTLIER_LIMIT_CONNECTIONS, 1));
    assert_int_equal(outlier_count(o, OUTLIER_LIMIT_CONNECTIONS), 1);
    assert_int_equal(outlier_count(o, OUTLIER_LIMIT_PENDING), 2);
    outlier_unref(o);
}

/* Many threads failing two endpoints at once: the decision is serialized, so with 50 % of two
 * endpoints exactly one is ejected, however the reports interleave. */
struct race {
    struct outlier *o;
    struct outlier_host **hs;
    int which;
};

static void *racer(void *arg)
{
    struct race *r = arg;
    struct outlier_cfg c = {.max_failures = 1, .enforcing_pct = 100, .max_ejection_pct = 50};
    for (int i = 0; i < 2000; i++)
        (void)outlier_report(r->o, &c, r->hs[r->which], r->hs, 2, 1, T0, 0, NULL);
    return NULL;
}

static void test_concurrent_ejections_respect_the_share(void **state)
{
    (void)state;
    struct outlier *o = outlier_new();
    outlier_begin(o);
    struct outlier_host *hs[2] = {outlier_host_get(o, "a:1"), outlier_host_get(o, "b:1")};
    pthread_t t[4];
    struct race r[4];
    for (int i = 0; i < 4; i++) {
        r[i] = (struct race){o, hs, i % 2};
        pthread_create(&t[i], NULL, racer, &r[i]);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    assert_int_equal(outlier_ejected_among(hs, 2, T0), 1);
    assert_int_equal(atomic_load(&o->ejections), 1);
    outlier_host_unref(hs[0]);
    outlier_host_unref(hs[1]);
    outlier_unref(o);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_fill_zeros),
        cmocka_unit_test(test_may_eject_share),
        cmocka_unit_test(test_ejection_time_grows_caps_and_rounds_to_interval),
        cmocka_unit_test(test_multiplier_decays_per_interval_in_service),
        cmocka_unit_test(test_consecutive_failures_eject_and_return),
        cmocka_unit_test(test_enforcing_percent_draws),
        cmocka_unit_test(test_registry_keeps_state_and_prunes),
        cmocka_unit_test(test_admit_counts_and_overflows),
        cmocka_unit_test(test_concurrent_ejections_respect_the_share),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
