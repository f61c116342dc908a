/*
 * test_memcache: the per-thread block cache. The library's copy runs under AddressSanitizer
 * here, where it caches nothing (memcache.h), so its contract is checked through it; the
 * caching itself is checked on a second copy of memcache.c compiled into this file with the
 * cache forced on (its functions renamed so they do not clash with the library's).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "memcache.h"

/* The caching copy. */
#define memcache_alloc        cached_alloc
#define memcache_calloc       cached_calloc
#define memcache_realloc      cached_realloc
#define memcache_free         cached_free
#define memcache_trim         cached_trim
#define memcache_cached_bytes cached_bytes
#define MEMCACHE_PASSTHROUGH  0
/* memcache.h is in already: the renamed copy's prototypes. */
void *cached_alloc(size_t n);
void *cached_calloc(size_t nmemb, size_t size);
void *cached_realloc(void *p, size_t n);
void cached_free(void *p);
void cached_trim(void);
size_t cached_bytes(void);
#include "../../src/memcache.c"
#undef memcache_alloc
#undef memcache_calloc
#undef memcache_realloc
#undef memcache_free
#undef memcache_trim
#undef memcache_cached_bytes

/* The library's contract: sizes, zeroing, alignment, contents kept across a resize. */
static void test_contract(void **state)
{
    (void)state;
    size_t sizes[] = {0, 1, 15, 16, 63, 64, 65, 200, 1024, 4095, 4096, 4097, 100000};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        unsigned char *p = memcache_calloc(1, sizes[i]);
        assert_non_null(p);
        assert_int_equal((uintptr_t)p % 16, 0);
        for (size_t k = 0; k < sizes[i]; k++)
            assert_int_equal(p[k], 0);
        memset(p, 0xab, sizes[i]);
        memcache_free(p);
    }
    /* Grown step by step through the classes and past them, the bytes stay. */
    unsigned char *p = NULL;
    size_t have = 0;
    for (size_t n = 1; n <= 20000; n = n * 3 + 1) {
        p = memcache_realloc(p, n);
        for (size_t k = 0; k < have; k++)
            assert_int_equal(p[k], (unsigned char)k);
        for (size_t k = have; k < n; k++)
            p[k] = (unsigned char)k;
        have = n;
    }
    /* Shrinking keeps the block. */
    assert_ptr_equal(memcache_realloc(p, 10), p);
    memcache_free(p);
    memcache_free(NULL);
    memcache_trim();
}

/* A freed block is the next one handed out for its class, not for another class. */
static void test_reuse_by_class(void **state)
{
    (void)state;
    cached_trim();
    void *a = cached_alloc(100);
    void *b = cached_alloc(300);
    cached_free(a);
    assert_int_equal(cached_bytes(), 16 + 128);
    void *other = cached_alloc(300); /* another class: from malloc */
    assert_ptr_not_equal(other, a);
    assert_ptr_equal(cached_alloc(120), a); /* 65-128 bytes: the same class */
    cached_free(other);
    cached_trim();
    assert_int_equal(cached_bytes(), 0);
    /* calloc zeroes a reused block. */
    memset(b, 0x5a, 300);
    cached_free(b);
    unsigned char *c = cached_calloc(3, 100);
    assert_ptr_equal(c, b);
    for (size_t k = 0; k < 300; k++)
        assert_int_equal(c[k], 0);
    cached_free(c);
    cached_free(a);
    cached_trim();
    assert_int_equal(cached_bytes(), 0);
}

/* What a thread keeps is bounded; past MEMCACHE_BLOCK_MAX nothing is kept; trim empties it. */
static void test_bounds(void **state)
{
    (void)state;
    enum { N = 4096 };
    static void *blocks[N];
    cached_trim();
    for (size_t i = 0; i < N; i++)
        blocks[i] = cached_alloc(1000);
    for (size_t i = 0; i < N; i++)
        cached_free(blocks[i]);
    assert_true(cached_bytes() <= MEMCACHE_MAX_BYTES);
    assert_true(cached_bytes() > MEMCACHE_MAX_BYTES - 2048);
    cached_trim();
    assert_int_equal(cached_bytes(), 0);
    void *big = cached_alloc(MEMCACHE_BLOCK_MAX + 1);
    cached_free(big);
    assert_int_equal(cached_bytes(), 0);
    /* A class block grown past the classes leaves the cache. */
    void *g = cached_realloc(cached_alloc(4000), 9000);
    assert_int_equal(cached_bytes(), 16 + 4032);
    cached_free(g);
    assert_int_equal(cached_bytes(), 16 + 4032);
    cached_trim();
}

static void *other_thread(void *arg)
{
    cached_free(arg); /* joins this thread's lists, not the allocating one's */
    size_t b = cached_bytes();
    cached_trim();
    return (void *)b;
}

/* Each thread has lists of its own; a block may be freed by another thread. */
static void test_threads(void **state)
{
    (void)state;
    cached_trim();
    void *p = cached_alloc(50);
    pthread_t t;
    void *their = NULL;
    assert_int_equal(pthread_create(&t, NULL, other_thread, p), 0);
    assert_int_equal(pthread_join(t, &their), 0);
    assert_int_equal((size_t)their, 16 + 64);
    assert_int_equal(cached_bytes(), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_contract),
        cmocka_unit_test(test_reuse_by_class),
        cmocka_unit_test(test_bounds),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
