/*
 * Unit tests for proxycfg's unknown-key warnings and the bounded set that logs each warning
 * once (the rest of proxycfg is tested in test_config.c).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "proxycfg.h"
#include "util.h"

#define N_UNKNOWN 100000

static struct dec_service base_service(void)
{
    struct dec_service s = {0};
    s.kind = "connect-proxy";
    s.id = "web-sidecar-proxy";
    s.service = "web-sidecar-proxy";
    s.address = "";
    s.port = 21000;
    s.socket_path = "";
    s.datacenter = "dc1";
    s.ns = "";
    s.partition = "";
    s.content_hash = "abc";
    s.destination_service_name = "web";
    s.destination_service_id = "web";
    s.local_service_address = "127.0.0.1";
    s.local_service_port = 8080;
    s.local_service_socket_path = "";
    s.mode = "";
    return s;
}

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

/* How many of <c>'s warnings name the key <key> (quoted, so k1 does not match k10). */
static size_t warnings_naming(const struct proxy_cfg *c, const char *key)
{
    char quoted[64];
    size_t n = 0;
    snprintf(quoted, sizeof(quoted), "\"%s\"", key);
    for (size_t i = 0; i < c->n_warnings; i++)
        n += strstr(c->warnings[i], quoted) != NULL;
    return n;
}

/*
 * Issue 7 defect 9: every unknown Config key became a warning, and the control thread checked
 * each against every warning logged before (a linear list that only grew): a registration
 * with 100k unknown keys took minutes of the control thread and 100k log lines. Now one build
 * keeps PROXYCFG_MAX_WARNINGS of them plus a count, and the logged-once set is a fixed hash.
 */
static void test_many_unknown_keys_are_bounded_and_fast(void **state)
{
    (void)state;
    struct dec_service s = base_service();
    struct dec_kv *kvs = calloc(N_UNKNOWN + 1, sizeof(*kvs));
    char(*names)[16] = calloc(N_UNKNOWN, sizeof(*names));
    assert_non_null(kvs);
    assert_non_null(names);
    for (size_t i = 0; i < N_UNKNOWN; i++) {
        snprintf(names[i], sizeof(names[i]), "k%06zu", i);
        kvs[i] = (struct dec_kv){.key = names[i], .type = DEC_KV_STRING, .str = "x"};
    }
    /* A known key after all of them still applies. */
    kvs[N_UNKNOWN] =
        (struct dec_kv){.key = "handshake_timeout_ms", .type = DEC_KV_NUMBER, .str = "3000"};
    s.config = kvs;
    s.n_config = N_UNKNOWN + 1;

    struct proxy_cfg c;
    struct proxycfg_warned *warned = calloc(1, sizeof(*warned));
    char err[256];
    size_t logged = 0;
    assert_non_null(warned);
    uint64_t t0 = now_us();
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    /* What the control thread does with them. */
    for (size_t i = 0; i < c.n_warnings; i++)
        logged += proxycfg_warn_once(warned, c.warnings[i]) != NULL;
    uint64_t took_us = now_us() - t0;
    print_message("build and warn of %d unknown keys: %llu us\n", N_UNKNOWN,
                  (unsigned long long)took_us);
    assert_true(took_us < 1000000);

    assert_int_equal(c.handshake_timeout_ms, 3000);
    assert_int_equal(c.n_warnings, PROXYCFG_MAX_WARNINGS + 1);
    assert_int_equal(logged, PROXYCFG_MAX_WARNINGS + 1);
    /* Each of the first keys is named exactly once, in order; no later key is named. */
    for (size_t i = 0; i < PROXYCFG_MAX_WARNINGS; i++) {
        assert_int_equal(warnings_naming(&c, names[i]), 1);
        assert_non_null(strstr(c.warnings[i], names[i]));
        assert_non_null(strstr(c.warnings[i], "Proxy.Config: unknown key"));
    }
    assert_int_equal(warnings_naming(&c, names[PROXYCFG_MAX_WARNINGS]), 0);
    assert_int_equal(warnings_naming(&c, names[N_UNKNOWN - 1]), 0);
    char count[64];
    snprintf(count, sizeof(count), "%d more unknown keys ignored",
             N_UNKNOWN - PROXYCFG_MAX_WARNINGS);
    assert_non_null(strstr(c.warnings[PROXYCFG_MAX_WARNINGS], count));

    /* The same registration again (any change to it re-delivers it): nothing is logged. */
    struct proxy_cfg again;
    assert_int_equal(proxycfg_build(&s, &again, err, sizeof(err)), 0);
    for (size_t i = 0; i < again.n_warnings; i++)
        assert_null(proxycfg_warn_once(warned, again.warnings[i]));
    proxycfg_dispose(&again);
    proxycfg_dispose(&c);
    free(warned);
    free(names);
    free(kvs);
}

/* Below the bound every distinct warning is logged once; past it one notice, then silence. */
static void test_warned_set_is_bounded(void **state)
{
    (void)state;
    struct proxycfg_warned *w = calloc(1, sizeof(*w));
    char msg[64];
    assert_non_null(w);
    for (int i = 0; i < PROXYCFG_WARNED_MAX; i++) {
        snprintf(msg, sizeof(msg), "warning %d", i);
        assert_ptr_equal(proxycfg_warn_once(w, msg), msg);
        assert_null(proxycfg_warn_once(w, msg));
    }
    snprintf(msg, sizeof(msg), "warning %d", PROXYCFG_WARNED_MAX);
    const char *notice = proxycfg_warn_once(w, msg);
    assert_non_null(notice);
    assert_non_null(strstr(notice, "not logged"));
    for (int i = PROXYCFG_WARNED_MAX; i < 10 * PROXYCFG_WARNED_MAX; i++) {
        snprintf(msg, sizeof(msg), "warning %d", i);
        assert_null(proxycfg_warn_once(w, msg));
    }
    /* Those remembered stay remembered. */
    for (int i = 0; i < PROXYCFG_WARNED_MAX; i++) {
        snprintf(msg, sizeof(msg), "warning %d", i);
        assert_null(proxycfg_warn_once(w, msg));
    }
    assert_int_equal(w->n, PROXYCFG_WARNED_MAX);
    free(w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_many_unknown_keys_are_bounded_and_fast),
        cmocka_unit_test(test_warned_set_is_bounded),
    };
    return cmocka_run_group_tests_name("proxycfg", tests, NULL, NULL);
}
