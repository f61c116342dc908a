/*
 * Unit tests for lb: xxHash64 against the published vectors; each policy's distribution with
 * a fixed-seed generator (round_robin exact, random and least_request within a tolerance);
 * ring_hash and maglev (same key same endpoint, keys spread, removing one endpoint moves only
 * its share of the keys, skipped endpoints); the request hash from HashPolicies (header,
 * cookie, query parameter, source IP, Terminal, none -> unhashed) and the generated cookie.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lb.h"

/* splitmix64 with a fixed seed: the same draws on every run. */
static uint64_t seed;
static uint64_t rnd(void)
{
    uint64_t z = (seed += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static const char *keys5[] = {"10.0.0.1:20000", "10.0.0.2:20000", "10.0.0.3:20000",
                              "10.0.0.4:20000", "10.0.0.5:20000"};

static void test_xxh64_vectors(void **state)
{
    (void)state;
    assert_true(lb_xxh64("", 0, 0) == 0xEF46DB3751D8E999ull);
    assert_true(lb_xxh64("a", 1, 0) == 0xD24EC4F1A98C6E5Bull);
    assert_true(lb_xxh64("abc", 3, 0) == 0x44BC2CF5AD770999ull);
    /* Past 32 bytes the four-lane loop runs. */
    const char *fox = "Nobody inspects the spammish repetition";
    assert_true(lb_xxh64(fox, strlen(fox), 0) == 0xFBCEA83C8A378BF1ull);
}

static void test_round_robin_exact(void **state)
{
    (void)state;
    struct dec_load_balancer lb = {.policy = DEC_LB_ROUND_ROBIN};
    struct lb_state st = {.n = 5};
    seed = 1;
    for (int i = 0; i < 20; i++)
        assert_int_equal(lb_choose(&lb, NULL, &st, NULL, 5, 0, 0, rnd), i % 5);
    /* A skipped endpoint is passed over, and the cycle goes on after it. */
    unsigned char skip[5] = {0, 1, 0, 0, 0};
    st.rr = 0;
    size_t got[8];
    for (int i = 0; i < 8; i++)
        got[i] = lb_choose(&lb, NULL, &st, skip, 5, 0, 0, rnd);
    size_t want[8] = {0, 2, 3, 4, 0, 2, 3, 4};
    for (int i = 0; i < 8; i++)
        assert_int_equal(got[i], want[i]);
}

static void test_random_spread(void **state)
{
    (void)state;
    struct dec_load_balancer lb = {.policy = DEC_LB_RANDOM};
    size_t count[5] = {0};
    seed = 42;
    for (int i = 0; i < 50000; i++)
        count[lb_choose(&lb, NULL, NULL, NULL, 5, 0, 0, rnd)]++;
    for (int i = 0; i < 5; i++)
        assert_true(count[i] > 9000 && count[i] < 11000);
    /* Never a skipped one. */
    unsigned char skip[5] = {1, 1, 0, 1, 1};
    for (int i = 0; i < 100; i++)
        assert_int_equal(lb_choose(&lb, NULL, NULL, skip, 5, 0, 0, rnd), 2);
    /* A hash policy without a hash draws at random too. */
    struct dec_load_balancer rh = {.policy = DEC_LB_RING_HASH};
    struct lb_table *t = lb_table_new(DEC_LB_RING_HASH, 0, 0, keys5, 5);
    memset(count, 0, sizeof(count));
    for (int i = 0; i < 5000; i++)
        count[lb_choose(&rh, t, NULL, NULL, 5, 0, 0, rnd)]++;
    for (int i = 0; i < 5; i++)
        assert_true(count[i] > 800 && count[i] < 1200);
    lb_table_free(t);
}

static void test_least_request(void **state)
{
    (void)state;
    uint32_t active[5] = {0};
    struct lb_state st = {.active = active, .n = 5};
    struct dec_load_balancer lb = {.policy = DEC_LB_LEAST_REQUEST};
    seed = 7;
    /* Requests that never finish: two choices keep the counts within a few of each other
     * (the power of two choices), where uniform draws drift apart by hundreds. */
    for (int i = 0; i < 10000; i++)
        active[lb_choose(&lb, NULL, &st, NULL, 5, 0, 0, rnd)]++;
    uint32_t lo = UINT32_MAX, hi = 0;
    for (int i = 0; i < 5; i++) {
        lo = active[i] < lo ? active[i] : lo;
        hi = active[i] > hi ? active[i] : hi;
    }
    assert_true(hi - lo <= 10);
    /* One endpoint busy: with many choices it is (almost) never chosen. */
    uint32_t busy[5] = {0, 0, 1000, 0, 0};
    st.active = busy;
    lb.choice_count = 10;
    size_t hit = 0;
    for (int i = 0; i < 10000; i++)
        hit += lb_choose(&lb, NULL, &st, NULL, 5, 0, 0, rnd) == 2;
    assert_true(hit < 5); /* only when all ten draws are it: 0.2^10 */
    /* ChoiceCount 1 is a uniform draw. */
    lb.choice_count = 1;
    hit = 0;
    for (int i = 0; i < 10000; i++)
        hit += lb_choose(&lb, NULL, &st, NULL, 5, 0, 0, rnd) == 2;
    assert_true(hit > 1800 && hit < 2200);
}

/* <n> keys "user-<i>" hashed, as a header policy would. */
static uint64_t user_hash(int i)
{
    char k[32];
    int len = snprintf(k, sizeof(k), "user-%d", i);
    return lb_xxh64(k, (size_t)len, 0);
}

static void check_consistent(enum dec_lb_policy p)
{
    struct dec_load_balancer lb = {.policy = p};
    struct lb_table *t = lb_table_new(p, 0, 0, keys5, 5);
    assert_non_null(t);
    assert_int_equal(lb_table_size(t), p == DEC_LB_MAGLEV ? LB_MAGLEV_SIZE : 1025);
    enum { K = 20000 };
    static size_t first[K];
    size_t count[5] = {0};
    seed = 3;
    for (int i = 0; i < K; i++) {
        first[i] = lb_choose(&lb, t, NULL, NULL, 5, 1, user_hash(i), rnd);
        count[first[i]]++;
        /* Same key, same endpoint, whatever the draws. */
        assert_int_equal(lb_choose(&lb, t, NULL, NULL, 5, 1, user_hash(i), rnd), first[i]);
    }
    for (int i = 0; i < 5; i++)
        assert_true(count[i] > K / 5 * 0.75 && count[i] < K / 5 * 1.25);
    /* Without endpoint 4 (the same keys for the others): its keys move, and few others.
     * Maglev moves about its 1/5 share; a ring rebuilt for 4 endpoints gives each more
     * entries (Envoy's sizing: 256 instead of 205), which moves some more. */
    struct lb_table *t4 = lb_table_new(p, 0, 0, keys5, 4);
    size_t moved = 0;
    for (int i = 0; i < K; i++) {
        size_t now = lb_choose(&lb, t4, NULL, NULL, 4, 1, user_hash(i), rnd);
        assert_true(now < 4);
        moved += now != first[i];
    }
    printf("%s: %zu of %d keys on the removed endpoint, %zu moved\n",
           p == DEC_LB_MAGLEV ? "maglev" : "ring_hash", count[4], K, moved);
    assert_true(moved >= count[4]);
    if (p == DEC_LB_MAGLEV)
        assert_true(moved < count[4] + K / 50);
    else
        assert_true(moved < count[4] * 8 / 5);
    /* A skipped endpoint (tried already) gives its keys to others; the rest stay. */
    unsigned char skip[5] = {0, 0, 1, 0, 0};
    for (int i = 0; i < K; i++) {
        size_t now = lb_choose(&lb, t, NULL, skip, 5, 1, user_hash(i), rnd);
        assert_true(now != 2);
        if (first[i] != 2)
            assert_int_equal(now, first[i]);
    }
    unsigned char all[5] = {1, 1, 1, 1, 1};
    assert_int_equal(lb_table_pick(t, user_hash(1), all), 5);
    lb_table_free(t4);
    lb_table_free(t);
}

static void test_ring_hash(void **state)
{
    (void)state;
    check_consistent(DEC_LB_RING_HASH);
    /* Ring sizes: Minimum spread over the endpoints (rounded up), Maximum caps it. */
    struct lb_table *t = lb_table_new(DEC_LB_RING_HASH, 10, 0, keys5, 3);
    assert_int_equal(lb_table_size(t), 12);
    lb_table_free(t);
    t = lb_table_new(DEC_LB_RING_HASH, 5000, 600, keys5, 3);
    assert_int_equal(lb_table_size(t), 600);
    lb_table_free(t);
    t = lb_table_new(DEC_LB_RING_HASH, 1u << 30, 1u << 30, keys5, 3);
    assert_true(lb_table_size(t) <= LB_RING_CAP);
    lb_table_free(t);
    assert_null(lb_table_new(DEC_LB_ROUND_ROBIN, 0, 0, keys5, 3));
    assert_null(lb_table_new(DEC_LB_MAGLEV, 0, 0, keys5, 0));
}

static void test_maglev(void **state)
{
    (void)state;
    check_consistent(DEC_LB_MAGLEV);
    /* Every slot filled, shares equal within one slot per endpoint. */
    struct lb_table *t = lb_table_new(DEC_LB_MAGLEV, 0, 0, keys5, 5);
    size_t count[5] = {0};
    for (uint64_t h = 0; h < LB_MAGLEV_SIZE; h++)
        count[lb_table_pick(t, h, NULL)]++;
    for (int i = 0; i < 5; i++)
        assert_true(count[i] == LB_MAGLEV_SIZE / 5 || count[i] == LB_MAGLEV_SIZE / 5 + 1);
    lb_table_free(t);
}

static struct http_header hdr(const char *n, const char *v)
{
    return (struct http_header){.name = {n, strlen(n)}, .value = {v, strlen(v)}};
}

static uint64_t hs(const char *s)
{
    return lb_xxh64(s, strlen(s), 0);
}

static uint64_t rotl1(uint64_t x)
{
    return (x << 1) | (x >> 63);
}

static void test_request_hash(void **state)
{
    (void)state;
    struct dec_hash_policy pol[4] = {
        {.field = DEC_HASH_HEADER, .field_value = "x-user"},
        {.field = DEC_HASH_QUERY_PARAMETER, .field_value = "id"},
        {.field = DEC_HASH_NONE, .field_value = "", .source_ip = 1},
        {.field = DEC_HASH_COOKIE, .field_value = "sid"},
    };
    struct dec_load_balancer lb = {.policy = DEC_LB_RING_HASH, .hash = pol, .n_hash = 1};
    struct http_header h[4] = {hdr("X-User", "alice"), hdr("Cookie", "a=1; sid=\"s-9\"; b=2"),
                               hdr("x-user", "bob"), hdr("Accept", "*/*")};
    struct lb_req rq = {.headers = h,
                        .nheaders = 1,
                        .query = {"q=1&id=42&id=7", 14},
                        .source_ip = {"127.0.0.9", 9}};
    uint64_t got = 0;
    assert_int_equal(lb_request_hash(&lb, &rq, &got, NULL), 1);
    assert_true(got == hs("alice"));
    /* Several values: sorted, hashed as one. */
    rq.nheaders = 3;
    assert_int_equal(lb_request_hash(&lb, &rq, &got, NULL), 1);
    assert_true(got == hs("alicebob"));
    /* A dropped field is not there. */
    h[2].flags = HTTP_HDR_DROP;
    assert_int_equal(lb_request_hash(&lb, &rq, &got, NULL), 1);
    assert_true(got == hs("alice"));
    /* header, then query, then source: combined as Envoy, rotl(h, 1) ^ next. */
    lb.n_hash = 3;
    assert_int_equal(lb_request_hash(&lb, &rq, &got, NULL), 1);
    assert_true(got == (rotl1(rotl1(hs("alice")) ^ hs("42")) ^ hs("127.0.0.9")));
    /* Terminal stops at the first policy that produced a hash. */
    pol[0].terminal = 1;
    assert_int_equal(lb_request_hash(&lb, &rq, &got, NULL), 1);
    assert_true(got == hs("alice"));
    /* ... but not at one that did not. */
    rq.nheaders = 0;
    pol[1].terminal = 1;
    assert_int_equal(lb_request_hash(&lb, &rq, &got, NULL), 1);
    assert_true(got == hs("42"));
    /* Nothing produces a value: no hash (the pick is random). */
    rq.query = (struct http_slice){"x=1", 3};
    rq.source_ip = (struct http_slice){NULL, 0};
    got = 5;
    assert_int_equal(lb_request_hash(&lb, &rq, &got, NULL), 0);
    assert_true(got == 5);
    /* A parameter without a value hashes "". */
    rq.query = (struct http_slice){"a=1&id", 6};
    assert_int_equal(lb_request_hash(&lb, &rq, &got, NULL), 1);
    assert_true(got == hs(""));
    /* Cookie: the value without its quotes. */
    struct dec_load_balancer ck = {.policy = DEC_LB_MAGLEV, .hash = &pol[3], .n_hash = 1};
    rq.headers = h;
    rq.nheaders = 2;
    assert_int_equal(lb_request_hash(&ck, &rq, &got, NULL), 1);
    assert_true(got == hs("s-9"));
    /* Not a hash-based policy: no hash, whatever the policies. */
    lb.policy = DEC_LB_ROUND_ROBIN;
    assert_int_equal(lb_request_hash(&lb, &rq, &got, NULL), 0);
}

static void test_generated_cookie(void **state)
{
    (void)state;
    struct dec_hash_policy pol = {.field = DEC_HASH_COOKIE,
                                  .field_value = "route",
                                  .cookie_ttl_ms = 30000,
                                  .cookie_path = "/api"};
    struct dec_load_balancer lb = {.policy = DEC_LB_RING_HASH, .hash = &pol, .n_hash = 1};
    struct http_header h[1] = {hdr("Cookie", "other=1")};
    struct lb_req rq = {.headers = h, .nheaders = 1, .conn = {"127.0.0.1:5555|up", 17}};
    struct lb_set_cookie sc;
    uint64_t got;
    assert_int_equal(lb_request_hash(&lb, &rq, &got, &sc), 1);
    assert_ptr_equal(sc.policy, &pol);
    char want[17];
    snprintf(want, sizeof(want), "%016llx", (unsigned long long)hs("127.0.0.1:5555|up"));
    assert_string_equal(sc.value, want);
    /* The hash is the one the next request, carrying the cookie, computes. */
    assert_true(got == hs(want));
    char line[200], cookie[64];
    assert_true(lb_set_cookie_format(&sc, line, sizeof(line)) > 0);
    char expect[200];
    snprintf(expect, sizeof(expect), "route=\"%s\"; Max-Age=30; Path=/api; HttpOnly", want);
    assert_string_equal(line, expect);
    snprintf(cookie, sizeof(cookie), "route=\"%s\"", want);
    h[0] = hdr("Cookie", cookie);
    uint64_t again;
    assert_int_equal(lb_request_hash(&lb, &rq, &again, &sc), 1);
    assert_null(sc.policy);
    assert_true(again == got);
    /* A session cookie has no Max-Age; without a TTL nothing is generated. */
    h[0] = hdr("Cookie", "x=1");
    pol.cookie_session = 1;
    pol.cookie_path = "";
    assert_int_equal(lb_request_hash(&lb, &rq, &got, &sc), 1);
    assert_true(lb_set_cookie_format(&sc, line, sizeof(line)) > 0);
    snprintf(expect, sizeof(expect), "route=\"%s\"; HttpOnly", sc.value);
    assert_string_equal(line, expect);
    pol.cookie_session = 0;
    pol.cookie_ttl_ms = 0;
    assert_int_equal(lb_request_hash(&lb, &rq, &got, &sc), 0);
    assert_null(sc.policy);
    /* A name or path that cannot go in a header, or no room. */
    pol.cookie_ttl_ms = 1000;
    assert_int_equal(lb_request_hash(&lb, &rq, &got, &sc), 1);
    assert_int_equal(lb_set_cookie_format(&sc, line, 10), -ENOSPC);
    assert_string_equal(line, "");
    pol.cookie_path = "/a\r\nX: y";
    assert_int_equal(lb_set_cookie_format(&sc, line, sizeof(line)), -EINVAL);
    pol.cookie_path = "/";
    pol.field_value = "a b";
    assert_int_equal(lb_set_cookie_format(&sc, line, sizeof(line)), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_xxh64_vectors), cmocka_unit_test(test_round_robin_exact),
        cmocka_unit_test(test_random_spread), cmocka_unit_test(test_least_request),
        cmocka_unit_test(test_ring_hash),     cmocka_unit_test(test_maglev),
        cmocka_unit_test(test_request_hash),  cmocka_unit_test(test_generated_cookie),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
