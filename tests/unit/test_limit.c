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
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>

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

static void test_pending_total_and_per_source(void **state)
{
    /* Issue 7: silent peers in the handshake are capped overall and per source address. */
    struct limit_state *l = limit_state_new();
    struct limit_cfg cfg = {.max_pending = 5, .max_pending_per_source = 2};
    struct limit_pending p[8];
    (void)state;
    assert_int_equal(limit_pending_admit(l, &cfg, "10.0.0.1", &p[0]), LIMIT_OK);
    assert_int_equal(limit_pending_admit(l, &cfg, "10.0.0.1", &p[1]), LIMIT_OK);
    assert_int_equal(limit_pending_admit(l, &cfg, "10.0.0.1", &p[2]), LIMIT_PENDING_PER_SOURCE);
    assert_int_equal(p[2].held, 0);
    assert_int_equal(limit_pending_source_count(l, "10.0.0.1"), 2);
    assert_int_equal(limit_pending_admit(l, &cfg, "10.0.0.2", &p[2]), LIMIT_OK);
    assert_int_equal(limit_pending_admit(l, &cfg, "::1", &p[3]), LIMIT_OK);
    /* No address (a unix socket peer): counted in the total only. */
    assert_int_equal(limit_pending_admit(l, &cfg, "", &p[4]), LIMIT_OK);
    assert_int_equal(p[4].slot, -1);
    assert_int_equal(limit_pending_count(l), 5);
    assert_int_equal(limit_pending_admit(l, &cfg, "10.0.0.3", &p[5]), LIMIT_PENDING);
    assert_int_equal(limit_pending_count(l), 5);
    assert_int_equal(limit_pending_source_count(l, "10.0.0.3"), 0);
    /* A finished handshake frees its slots; releasing twice is harmless. */
    limit_pending_release(l, &p[0]);
    limit_pending_release(l, &p[0]);
    assert_int_equal(limit_pending_source_count(l, "10.0.0.1"), 1);
    assert_int_equal(limit_pending_admit(l, &cfg, "10.0.0.1", &p[0]), LIMIT_OK);
    for (int i = 0; i < 5; i++)
        limit_pending_release(l, &p[i]);
    assert_int_equal(limit_pending_count(l), 0);
    assert_int_equal(limit_pending_source_count(l, "10.0.0.1"), 0);
    limit_state_unref(l);
}

static void test_pending_source_table_is_bounded(void **state)
{
    /* A million distinct sources never grow the table: once a probe window is full of other
     * addresses a connection is counted in the total only, and freed slots are reused. */
    struct limit_state *l = limit_state_new();
    struct limit_cfg cfg = {.max_pending = 10000000, .max_pending_per_source = 1};
    struct limit_pending p;
    char src[32];
    int untracked = 0;
    (void)state;
    for (int i = 0; i < 20000; i++) {
        snprintf(src, sizeof(src), "10.%d.%d.%d", i >> 16, (i >> 8) & 255, i & 255);
        assert_int_equal(limit_pending_admit(l, &cfg, src, &p), LIMIT_OK);
        untracked += p.slot == -1;
    }
    assert_true(untracked >= 20000 - LIMIT_SOURCE_SLOTS);
    assert_int_equal(limit_pending_count(l), 20000);
    limit_state_unref(l);
    l = limit_state_new();
    for (int i = 0; i < 1000000; i++) {
        snprintf(src, sizeof(src), "10.%d.%d.%d", i >> 16, (i >> 8) & 255, i & 255);
        assert_int_equal(limit_pending_admit(l, &cfg, src, &p), LIMIT_OK);
        assert_true(p.slot >= 0);
        limit_pending_release(l, &p);
    }
    assert_int_equal(limit_pending_count(l), 0);
    limit_state_unref(l);
}

struct pending_race {
    struct limit_state *l;
    struct limit_cfg cfg;
    struct limit_pending held[2000];
    int n;
};

static void *pending_many(void *arg)
{
    struct pending_race *r = arg;
    for (int i = 0; i < 2000; i++)
        if (limit_pending_admit(r->l, &r->cfg, i % 2 ? "192.0.2.7" : "192.0.2.8", &r->held[r->n]) ==
            LIMIT_OK)
            r->n++;
    return NULL;
}

static void test_pending_holds_across_threads(void **state)
{
    /* Four workers race from two addresses against a total of 300 and 100 per source: each
     * source gets exactly its 100 and the total never passes 300. */
    struct limit_state *l = limit_state_new();
    static struct pending_race r[4];
    pthread_t t[4];
    int total = 0;
    (void)state;
    for (int i = 0; i < 4; i++) {
        r[i].l = l;
        r[i].cfg = (struct limit_cfg){.max_pending = 300, .max_pending_per_source = 100};
        r[i].n = 0;
        assert_int_equal(pthread_create(&t[i], NULL, pending_many, &r[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        total += r[i].n;
    }
    assert_int_equal(total, 200);
    assert_int_equal(limit_pending_count(l), total);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < r[i].n; j++)
            limit_pending_release(l, &r[i].held[j]);
    assert_int_equal(limit_pending_count(l), 0);
    assert_int_equal(limit_pending_source_count(l, "192.0.2.7"), 0);
    limit_state_unref(l);
}

static void test_fds_budget(void **state)
{
    struct limit_cfg cfg = {0};
    (void)state;
    /* Unknown budget: no reserve and no default cap. */
    limit_fds_set(0);
    assert_int_equal(limit_fds_over_reserve(1000000), 0);
    assert_int_equal(limit_pending_max(&cfg), 0);
    assert_int_equal(limit_pending_per_source_max(&cfg), 0);
    /* 128 descriptors: a reserve of 32 (the minimum), 48 pending, 8 per source. */
    limit_fds_set(128);
    assert_int_equal(limit_fds_reserve(), 32);
    assert_int_equal(limit_fds_over_reserve(95), 0);
    assert_int_equal(limit_fds_over_reserve(96), 1);
    assert_int_equal(limit_pending_max(&cfg), 48);
    assert_int_equal(limit_pending_per_source_max(&cfg), 8);
    /* 20000: an eighth is kept. */
    limit_fds_set(20000);
    assert_int_equal(limit_fds_reserve(), 2500);
    assert_int_equal(limit_pending_max(&cfg), 8750);
    assert_int_equal(limit_pending_per_source_max(&cfg), 546);
    /* Configured values win; a per-source cap never exceeds the total. */
    cfg.max_pending = 4;
    assert_int_equal(limit_pending_max(&cfg), 4);
    assert_int_equal(limit_pending_per_source_max(&cfg), 4);
    cfg.max_pending_per_source = 3;
    assert_int_equal(limit_pending_per_source_max(&cfg), 3);
    limit_fds_set(0);
}

static void test_fds_raise_to_hard_limit(void **state)
{
    struct rlimit saved, rl;
    long before, after;
    (void)state;
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &saved), 0);
    if (saved.rlim_max != RLIM_INFINITY && saved.rlim_max < 64)
        skip();
    rl = saved;
    rl.rlim_cur = 32;
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &rl), 0);
    assert_int_equal(limit_fds_raise(&before, &after), 0);
    assert_int_equal(before, 32);
    assert_true(after > 32);
    assert_int_equal(getrlimit(RLIMIT_NOFILE, &rl), 0);
    assert_int_equal((long)rl.rlim_cur, after);
    if (saved.rlim_max != RLIM_INFINITY)
        assert_int_equal(after, (long)saved.rlim_max);
    /* Already at the hard limit: nothing to do. */
    assert_int_equal(limit_fds_raise(&before, &after), 0);
    assert_int_equal(before, after);
    assert_int_equal(setrlimit(RLIMIT_NOFILE, &saved), 0);
}

/* ---- request rate limits ---- */

static struct dec_rate_route route(int kind, const char *path, uint32_t rps, uint32_t burst)
{
    return (struct dec_rate_route){
        .kind = kind, .path = (char *)path, .per_second = rps, .burst = burst};
}

/* How many of <n> requests to <path> at <now> the limits let through. */
static int admitted(struct limit_rates *r, const char *path, int n, uint64_t now)
{
    char why[320];
    int ok = 0;
    for (int i = 0; i < n; i++)
        ok += limit_rates_take(r, path, strlen(path), now, why, sizeof(why));
    return ok;
}

static void test_rates_top_level_burst_then_refill(void **state)
{
    (void)state;
    struct dec_rate_limits c = {.per_second = 2, .burst = 5};
    struct limit_rates *r = limit_rates_new(&c, NULL, NULL, 0);
    uint64_t now = 50 * SEC;
    assert_false(limit_rates_none(r));
    assert_int_equal(admitted(r, "/a", 20, now), 5);
    assert_int_equal(admitted(r, "/b", 20, now + SEC), 2); /* two tokens a second */
    char why[320];
    assert_int_equal(limit_rates_take(r, "/a", 2, now + SEC, why, sizeof(why)), 0);
    assert_string_equal(why, "rate limit: 2/s, burst 5");
    limit_rates_unref(r);
    /* No limits at all, and NULL, admit everything. */
    struct dec_rate_limits none = {0};
    r = limit_rates_new(&none, NULL, NULL, 0);
    assert_true(limit_rates_none(r));
    assert_true(limit_rates_none(NULL));
    assert_int_equal(admitted(r, "/", 1000, now), 1000);
    assert_int_equal(admitted(NULL, "/", 10, now), 10);
    limit_rates_unref(r);
}

static void test_rates_first_route_wins_over_top_level(void **state)
{
    (void)state;
    struct dec_rate_route rs[] = {
        route(DEC_PATH_EXACT, "/slow", 1, 2),
        route(DEC_PATH_PREFIX, "/api/", 3, 0),
        route(DEC_PATH_REGEX, "/x/[0-9]+", 1, 1),
        route(DEC_PATH_PREFIX, "/free", 0, 0),     /* 0: this route is not limited */
        route(DEC_PATH_PREFIX, "/api/v2", 100, 0), /* shadowed by /api/ */
    };
    struct dec_rate_limits c = {.per_second = 4, .burst = 4, .routes = rs, .n_routes = 5};
    char err[320];
    struct limit_rates *r = limit_rates_new(&c, NULL, err, sizeof(err));
    assert_string_equal(err, "");
    uint64_t now = 50 * SEC;
    assert_int_equal(admitted(r, "/slow", 10, now), 2);
    assert_int_equal(admitted(r, "/slowly", 10, now), 4); /* not exact: the top level */
    assert_int_equal(admitted(r, "/other", 10, now), 0);  /* the top level is spent */
    assert_int_equal(admitted(r, "/api/v2/a", 10, now), 3);
    assert_int_equal(admitted(r, "/x/12", 10, now), 1);
    assert_int_equal(admitted(r, "/x/12/", 10, now), 0); /* whole-path regex: top level */
    assert_int_equal(admitted(r, "/free/x", 1000, now), 1000);
    char why[320];
    assert_int_equal(limit_rates_take(r, "/api/q", 6, now, why, sizeof(why)), 0);
    assert_string_equal(why, "rate limit: route PathPrefix /api/: 3/s, burst 3");
    limit_rates_unref(r);
}

static void test_rates_refresh_keeps_buckets_whose_numbers_stay(void **state)
{
    (void)state;
    struct dec_rate_route rs[] = {route(DEC_PATH_PREFIX, "/a", 1, 3)};
    struct dec_rate_limits c = {.per_second = 1, .burst = 3, .routes = rs, .n_routes = 1};
    struct limit_rates *r1 = limit_rates_new(&c, NULL, NULL, 0);
    uint64_t now = 50 * SEC;
    assert_int_equal(admitted(r1, "/a", 10, now), 3);
    assert_int_equal(admitted(r1, "/b", 10, now), 3);
    /* Same numbers: the spent buckets carry over, even while r1 is still in use. */
    struct limit_rates *r2 = limit_rates_new(&c, r1, NULL, 0);
    assert_int_equal(admitted(r2, "/a", 10, now), 0);
    assert_int_equal(admitted(r2, "/b", 10, now), 0);
    limit_rates_unref(r1);
    assert_int_equal(admitted(r2, "/a", 10, now + SEC), 1);
    /* New numbers for the route only: its bucket starts full, the top level's stays spent. */
    rs[0].burst = 4;
    struct limit_rates *r3 = limit_rates_new(&c, r2, NULL, 0);
    limit_rates_unref(r2);
    assert_int_equal(admitted(r3, "/a", 10, now + SEC), 4);
    assert_int_equal(admitted(r3, "/b", 10, now + SEC), 1);
    limit_rates_unref(r3);
}

static void test_rates_bad_regex_fails_closed(void **state)
{
    (void)state;
    struct dec_rate_route rs[] = {route(DEC_PATH_REGEX, "(", 1, 1)};
    struct dec_rate_limits c = {.per_second = 0, .routes = rs, .n_routes = 1};
    char err[320];
    struct limit_rates *r = limit_rates_new(&c, NULL, err, sizeof(err));
    assert_non_null(strstr(err, "Routes[0].PathRegex"));
    assert_int_equal(admitted(r, "/anything", 10, 50 * SEC), 1);
    limit_rates_unref(r);
}

static void test_rates_cfg_equal(void **state)
{
    (void)state;
    struct dec_rate_route a[] = {route(DEC_PATH_EXACT, "/a", 1, 0)};
    struct dec_rate_route b[] = {route(DEC_PATH_PREFIX, "/a", 1, 0)};
    struct dec_rate_limits x = {.per_second = 1, .routes = a, .n_routes = 1};
    struct dec_rate_limits y = x;
    assert_true(dec_rate_limits_equal(&x, &y));
    y.routes = b;
    assert_false(dec_rate_limits_equal(&x, &y));
    y = x;
    y.burst = 2;
    assert_false(dec_rate_limits_equal(&x, &y));
}

struct rates_race {
    struct limit_rates *r;
    int ok;
};

static void *rates_hammer(void *arg)
{
    struct rates_race *t = arg;
    t->ok = admitted(t->r, "/", 1000, 50 * SEC);
    return NULL;
}

static void test_rates_shared_across_threads(void **state)
{
    (void)state;
    struct dec_rate_limits c = {.per_second = 1, .burst = 100};
    struct limit_rates *r = limit_rates_new(&c, NULL, NULL, 0);
    struct rates_race t[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        t[i] = (struct rates_race){.r = r};
        assert_int_equal(pthread_create(&th[i], NULL, rates_hammer, &t[i]), 0);
    }
    int total = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        total += t[i].ok;
    }
    assert_int_equal(total, 100); /* one bucket for every thread, not one each */
    limit_rates_unref(r);
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
        cmocka_unit_test(test_pending_total_and_per_source),
        cmocka_unit_test(test_pending_source_table_is_bounded),
        cmocka_unit_test(test_pending_holds_across_threads),
        cmocka_unit_test(test_fds_budget),
        cmocka_unit_test(test_fds_raise_to_hard_limit),
        cmocka_unit_test(test_rates_top_level_burst_then_refill),
        cmocka_unit_test(test_rates_first_route_wins_over_top_level),
        cmocka_unit_test(test_rates_refresh_keeps_buckets_whose_numbers_stay),
        cmocka_unit_test(test_rates_bad_regex_fails_closed),
        cmocka_unit_test(test_rates_cfg_equal),
        cmocka_unit_test(test_rates_shared_across_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
