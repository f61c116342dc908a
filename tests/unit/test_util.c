/*
 * util: the wiping helpers and the keyed digest (issue 7: key and token bytes must not outlive
 * their buffers, and the watch keeps a digest of the last body instead of the body).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "util.h"

static void test_wipe_realloc_keeps_content(void **state)
{
    (void)state;
    char *p = util_wipe_realloc(NULL, 16);
    memcpy(p, "0123456789abcdef", 16);
    p = util_wipe_realloc(p, 4096); /* grows: the first 16 bytes come along */
    assert_memory_equal(p, "0123456789abcdef", 16);
    memset(p + 16, 'x', 4096 - 16);
    p = util_wipe_realloc(p, 8); /* shrinks */
    assert_memory_equal(p, "01234567", 8);
    assert_null(util_wipe_realloc(p, 0)); /* frees */
    util_wipe_free_block(NULL);
    util_wipe_free(NULL, 0);
}

static void test_wipe(void **state)
{
    (void)state;
    char buf[32];
    memset(buf, 'k', sizeof(buf));
    util_wipe(buf + 8, 16);
    for (size_t i = 0; i < sizeof(buf); i++)
        assert_int_equal(buf[i], i >= 8 && i < 24 ? 0 : 'k');
    util_wipe(NULL, 5);
    util_wipe(buf, 0);
}

/* SipHash-2-4-128 reference vectors: key 00..0f, message 00..(n-1). */
static void test_siphash128_vectors(void **state)
{
    (void)state;
    static const struct {
        size_t n;
        const char *hex;
    } v[] = {
        {0, "a3817f04ba25a8e66df67214c7550293"},  {1, "da87c1d86b99af44347659119b22fc45"},
        {2, "8177228da4a45dc7fca38bdef60affe4"},  {3, "9c70b60c5267a94e5f33b6b02985ed51"},
        {15, "5493e99933b0a8117e08ec0f97cfc3d9"},
    };
    uint8_t key[16], msg[64], out[16];
    for (int i = 0; i < 16; i++)
        key[i] = (uint8_t)i;
    for (int i = 0; i < 64; i++)
        msg[i] = (uint8_t)i;
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        char hex[33];
        util_siphash128(key, msg, v[i].n, out);
        for (int j = 0; j < 16; j++)
            snprintf(hex + 2 * j, 3, "%02x", out[j]);
        assert_string_equal(hex, v[i].hex);
    }
}

static void test_digest(void **state)
{
    (void)state;
    struct util_digest a, b, c;
    const char body[] = "{\"PrivateKeyPEM\":\"-----BEGIN EC PRIVATE KEY-----\"}";
    util_digest(body, sizeof(body) - 1, &a);
    util_digest(body, sizeof(body) - 1, &b);
    assert_memory_equal(&a, &b, sizeof(a));
    char other[sizeof(body)];
    memcpy(other, body, sizeof(body));
    other[5] ^= 1; /* one bit */
    util_digest(other, sizeof(other) - 1, &c);
    assert_memory_not_equal(&a, &c, sizeof(a));
    util_digest(body, sizeof(body) - 2, &c); /* a prefix */
    assert_memory_not_equal(&a, &c, sizeof(a));
    util_digest("", 0, &c);
    assert_memory_not_equal(&a, &c, sizeof(a));
}

/* The one percent-encoder of the tree: the allocating form (every query the control thread
 * builds) and the bounded one (the watch's hash) must agree, and the bounded one must never
 * cut an escape in half. */
/* util_hash_str is FNV-1a 64 (the published test values), never 0. */
static void test_hash_str(void **state)
{
    (void)state;
    assert_true(util_hash_str("") == UINT64_C(0xcbf29ce484222325));
    assert_true(util_hash_str("a") == UINT64_C(0xaf63dc4c8601ec8c));
    assert_true(util_hash_str("foobar") == UINT64_C(0x85944171f73967e8));
}

static void test_url_escape(void **state)
{
    (void)state;
    char *e = util_url_escape("web a/b?c=d&e~f.g_h-i%\xff");
    assert_string_equal(e, "web%20a%2Fb%3Fc%3Dd%26e~f.g_h-i%25%FF");
    free(e);
    e = util_url_escape("");
    assert_string_equal(e, "");
    free(e);
    char buf[8];
    assert_int_equal(util_url_escape_buf(buf, sizeof(buf), "abc"), 3);
    assert_string_equal(buf, "abc");
    /* In 6 bytes, after "ab" only 4 are left: not enough for "%2F" and a spare, so it stops. */
    assert_int_equal(util_url_escape_buf(buf, 6, "ab/c"), 2);
    assert_string_equal(buf, "ab");
    assert_int_equal(util_url_escape_buf(buf, sizeof(buf), "//"), 6);
    assert_string_equal(buf, "%2F%2F");
}

/*
 * util_trim_heap() from two threads at once, as two workers trimming after their crowds left
 * (or a worker and the control thread's session sweep). Under AddressSanitizer glibc's own
 * heap is never set up, and its malloc_trim() did that on first call without a lock: a second
 * caller could walk its bins half made and crash (the integration suite met it at a
 * shutdown; a child process racing two first calls crashed about one time in five). Each
 * round runs in a fresh child, whose first call it is.
 */
struct trim_race {
    atomic_int ready, go;
};

static void *trim_racer(void *arg)
{
    struct trim_race *r = arg;
    atomic_fetch_add(&r->ready, 1);
    while (!atomic_load(&r->go))
        ;
    util_trim_heap();
    return NULL;
}

static void test_trim_heap_from_two_threads(void **state)
{
    (void)state;
    for (int round = 0; round < 40; round++) {
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            struct trim_race r = {0};
            pthread_t t[2];
            for (int i = 0; i < 2; i++)
                if (pthread_create(&t[i], NULL, trim_racer, &r) != 0)
                    _exit(2);
            while (atomic_load(&r.ready) < 2)
                ;
            atomic_store(&r.go, 1);
            for (int i = 0; i < 2; i++)
                pthread_join(t[i], NULL);
            _exit(0);
        }
        int status = 0;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fail_msg("round %d: the child racing two trims ended with status %#x", round,
                     (unsigned)status);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_wipe_realloc_keeps_content),
        cmocka_unit_test(test_wipe),
        cmocka_unit_test(test_siphash128_vectors),
        cmocka_unit_test(test_digest),
        cmocka_unit_test(test_hash_str),
        cmocka_unit_test(test_url_escape),
        cmocka_unit_test(test_trim_heap_from_two_threads),
    };
    return cmocka_run_group_tests_name("util", tests, NULL, NULL);
}
