/*
 * Unit tests for proxycfg's key table (defaults stored and documented from one typed value,
 * enumerated keys), its unknown-key warnings and the bounded set that logs each warning once
 * (the rest of proxycfg is tested in test_config.c).
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
#include "registration.h"
#include "util.h"

#define N_UNKNOWN 100000

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

/* The "| `key` | scope | type | default |" start of <key>'s row in doc/config.md. */
static void assert_doc_default(const char *doc, const char *key, const char *scope,
                               const char *type, const char *def)
{
    char row[256];
    snprintf(row, sizeof(row), "| `%s` | %s | %s | %s |", key, scope, type, def);
    if (strstr(doc, row) == NULL)
        fail_msg("no row %s in the key table", row);
}

/*
 * Each key's default is one typed value in the table: what a bare registration gets and what
 * the docs write. Before, the code literal and the doc text were written apart and could
 * disagree; this pins both sides for the keys with a constant default.
 */
static void test_defaults_are_stored_and_documented_from_the_table(void **state)
{
    (void)state;
    struct dec_service s = base_service();
    struct dec_upstream up = db_upstream();
    s.upstreams = &up;
    s.n_upstreams = 1;
    struct proxy_cfg c;
    char err[256];
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_int_equal(c.local_connect_timeout_ms, 1000);
    assert_int_equal(c.handshake_timeout_ms, 10000);
    assert_int_equal(c.tls_min_version, 0);
    assert_int_equal(c.tls_max_version, 0);
    assert_int_equal(c.verify_trust_domain, 1);
    assert_int_equal(c.tls_resumption, 1);
    assert_int_equal(c.authorize_with_agent, 0);
    assert_int_equal(c.authorize_cache_ms, 5000);
    assert_int_equal(c.authorize_timeout_ms, 5000);
    assert_int_equal(c.idle_timeout_ms, 0);
    assert_null(c.tls_cipher_suites);
    assert_int_equal(c.n_upstreams, 1);
    assert_int_equal(c.upstreams[0].connect_timeout_ms, 5000);
    assert_int_equal(c.upstreams[0].connect_timeout_set, 0); /* a default is not "given" */
    assert_int_equal(c.upstreams[0].poll_interval_ms, 10000);
    assert_int_equal(c.upstreams[0].retry_buffer_bytes, 65536);
    proxycfg_dispose(&c);

    char *doc = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&doc, &len);
    assert_non_null(f);
    proxycfg_write_doc(f);
    fclose(f);
    assert_doc_default(doc, "local_connect_timeout_ms", "Proxy.Config", "milliseconds", "1000");
    assert_doc_default(doc, "handshake_timeout_ms", "Proxy.Config", "milliseconds", "10000");
    assert_doc_default(doc, "tls_min_version", "Proxy.Config", "TLS version", "TLS_AUTO (TLSv1_2)");
    assert_doc_default(doc, "verify_trust_domain", "Proxy.Config", "boolean", "true");
    assert_doc_default(doc, "authorization", "Proxy.Config", "string", "intentions");
    assert_doc_default(doc, "local_idle_timeout_ms", "Proxy.Config", "milliseconds", "0 (off)");
    assert_doc_default(doc, "connect_timeout_ms", "Upstreams[].Config", "milliseconds", "5000");
    assert_doc_default(doc, "prepared_query_poll_interval_ms", "Upstreams[].Config", "milliseconds",
                       "10000");
    free(doc);
}

/* Enumerated keys: names map to values, "" is TLS_AUTO, and a bad one names the choices. */
static void test_enumerated_keys(void **state)
{
    (void)state;
    struct dec_service s = base_service();
    struct dec_kv kvs[] = {
        {.key = "tls_min_version", .type = DEC_KV_STRING, .str = "TLSv1_3"},
        {.key = "tls_max_version", .type = DEC_KV_STRING, .str = ""},
        {.key = "authorization", .type = DEC_KV_STRING, .str = "authorize"},
    };
    s.config = kvs;
    s.n_config = 3;
    struct proxy_cfg c;
    char err[256];
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_int_equal(c.tls_min_version, 13);
    assert_int_equal(c.tls_max_version, 0);
    assert_int_equal(c.authorize_with_agent, 1);
    proxycfg_dispose(&c);

    kvs[0].str = "TLSv1_1";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_string_equal(
        err, "Proxy.Config: key \"tls_min_version\" must be TLS_AUTO, TLSv1_2 or TLSv1_3");
    kvs[0].str = "TLS_AUTO";
    kvs[2].str = "both";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_string_equal(err, "Proxy.Config: key \"authorization\" must be intentions or authorize");
    kvs[2] = (struct dec_kv){.key = "authorization", .type = DEC_KV_BOOL, .str = "", .boolean = 1};
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_string_equal(err, "Proxy.Config: key \"authorization\" must be a string");
}

/*
 * Issue 9: Proxy.Config.protocol selects the inbound mode. tcp (or absent, or "") is L4, http
 * http2 and grpc are L7 (mux_h1 or mux_h2 by what the caller speaks), with no warning; any
 * other value is an error naming the key and the choices. The L7 limits have their defaults.
 */
static void test_protocol_key(void **state)
{
    (void)state;
    struct dec_service s = base_service();
    struct dec_kv kvs[] = {
        {.key = "protocol", .type = DEC_KV_STRING, .str = "http"},
        {.key = "max_request_headers_kb", .type = DEC_KV_NUMBER, .str = "8"},
    };
    struct proxy_cfg c;
    char err[256];
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_int_equal(c.protocol, PROTO_TCP);
    assert_int_equal(c.max_request_headers_kb, 60);
    assert_int_equal(c.request_headers_timeout_ms, 10000);
    assert_int_equal(c.local_request_timeout_ms, 15000);
    proxycfg_dispose(&c);

    s.config = kvs;
    s.n_config = 2;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_int_equal(c.protocol, PROTO_HTTP);
    assert_int_equal(c.max_request_headers_kb, 8);
    assert_int_equal(c.n_warnings, 0);
    proxycfg_dispose(&c);

    kvs[0].str = "grpc";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_int_equal(c.protocol, PROTO_GRPC);
    assert_int_equal(c.n_warnings, 0);
    proxycfg_dispose(&c);

    kvs[0].str = "http3";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_string_equal(err, "Proxy.Config: key \"protocol\" must be tcp, http, http2 or grpc");
    kvs[0].str = "http";
    kvs[1].str = "0";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "max_request_headers_kb"));
}

/*
 * Issue 9 point 5: an upstream's Config.protocol is read (it was ignored): given, it overrides
 * the discovery chain's protocol (protocol_set); absent or "" leaves the chain to decide; any
 * other value is an error naming the upstream and the key.
 */
static void test_upstream_protocol_key(void **state)
{
    (void)state;
    struct dec_service s = base_service();
    struct dec_kv kv = {.key = "protocol", .type = DEC_KV_STRING, .str = "http"};
    struct dec_upstream up = db_upstream();
    s.upstreams = &up;
    s.n_upstreams = 1;
    struct proxy_cfg c;
    char err[256];
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_int_equal(c.upstreams[0].protocol_set, 0);
    assert_int_equal(c.upstreams[0].protocol, PROTO_TCP);
    proxycfg_dispose(&c);

    up.config = &kv;
    up.n_config = 1;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_int_equal(c.upstreams[0].protocol_set, 1);
    assert_int_equal(c.upstreams[0].protocol, PROTO_HTTP);
    assert_int_equal(c.n_warnings, 0);
    proxycfg_dispose(&c);

    kv.str = "tcp";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_int_equal(c.upstreams[0].protocol_set, 1);
    assert_int_equal(c.upstreams[0].protocol, PROTO_TCP);
    proxycfg_dispose(&c);

    kv.str = "";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_int_equal(c.upstreams[0].protocol_set, 0);
    proxycfg_dispose(&c);

    kv.str = "websocket";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_string_equal(err, "upstream \"db\": key \"protocol\" must be tcp, http, http2 or grpc");
}

/*
 * The upstream's limits and passive_health_check (issue 10): Consul's key names, Envoy's
 * defaults (zeros: outlier.h fills them), and durations given as Go durations or integer
 * nanoseconds, as Consul's mapstructure hook decodes them.
 */
static void test_upstream_outlier_keys(void **state)
{
    (void)state;
    struct dec_service s = base_service();
    struct dec_upstream up = db_upstream();
    s.upstreams = &up;
    s.n_upstreams = 1;
    struct proxy_cfg c;
    char err[256];
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    const struct upstream_cfg *u = &c.upstreams[0];
    assert_int_equal(u->max_pending_requests, 0);
    assert_int_equal(u->max_concurrent_requests, 0);
    assert_int_equal(u->passive.interval_ms, 0);
    assert_int_equal(u->passive.max_failures, 0);
    assert_int_equal(u->passive.enforcing_pct, 100);
    assert_int_equal(u->passive.max_ejection_pct, 10);
    assert_int_equal(u->passive.base_ejection_ms, 0);
    proxycfg_dispose(&c);

    struct dec_kv kv[] = {
        {.key = "limits.max_pending_requests", .type = DEC_KV_NUMBER, .str = "7"},
        {.key = "limits.max_concurrent_requests", .type = DEC_KV_STRING, .str = "9"},
        {.key = "passive_health_check.interval", .type = DEC_KV_STRING, .str = "1m30s"},
        {.key = "passive_health_check.max_failures", .type = DEC_KV_NUMBER, .str = "3"},
        {.key = "passive_health_check.enforcing_consecutive_5xx",
         .type = DEC_KV_NUMBER,
         .str = "50"},
        {.key = "passive_health_check.max_ejection_percent", .type = DEC_KV_NUMBER, .str = "0"},
        /* A time.Duration as JSON: nanoseconds (2.5 s). */
        {.key = "passive_health_check.base_ejection_time",
         .type = DEC_KV_NUMBER,
         .str = "2500000000"},
    };
    up.config = kv;
    up.n_config = sizeof(kv) / sizeof(kv[0]);
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    u = &c.upstreams[0];
    assert_int_equal(c.n_warnings, 0);
    assert_int_equal(u->max_pending_requests, 7);
    assert_int_equal(u->max_concurrent_requests, 9);
    assert_int_equal(u->passive.interval_ms, 90000);
    assert_int_equal(u->passive.max_failures, 3);
    assert_int_equal(u->passive.enforcing_pct, 50);
    assert_int_equal(u->passive.max_ejection_pct, 0);
    assert_int_equal(u->passive.base_ejection_ms, 2500);
    proxycfg_dispose(&c);

    kv[2].str = "soon";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "\"passive_health_check.interval\" must be a duration"));
    kv[2].str = "10s";
    kv[5].str = "101";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "max_ejection_percent"));
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

/* ---- Proxy.Expose ---- */

/* proxycfg_build() of the base registration with <n> exposed paths (and one upstream on 9191). */
static int build_exposed(struct dec_expose_path *paths, size_t n, struct proxy_cfg *c, char *err,
                         size_t len)
{
    struct dec_service svc = base_service();
    struct dec_upstream up = db_upstream();
    svc.upstreams = &up;
    svc.n_upstreams = 1;
    svc.expose_paths = paths;
    svc.n_expose_paths = n;
    svc.expose_checks = 1;
    return proxycfg_build(&svc, c, err, len);
}

static void test_expose_paths(void **state)
{
    (void)state;
    struct proxy_cfg c, copy;
    char err[512];
    struct dec_expose_path ok[] = {
        {.listener_port = 21500, .local_path_port = 8080, .path = "/health", .protocol = ""},
        {.listener_port = 21500, .local_path_port = 8080, .path = "/ready", .protocol = "HTTP"},
        {.listener_port = 21501, .local_path_port = 9090, .path = "/x", .protocol = "http2"},
    };
    assert_int_equal(build_exposed(ok, 3, &c, err, sizeof(err)), 0);
    assert_true(c.expose_checks);
    assert_int_equal(c.n_expose_paths, 3);
    assert_int_equal(c.expose_paths[0].protocol, PROTO_HTTP);
    assert_int_equal(c.expose_paths[1].protocol, PROTO_HTTP);
    assert_int_equal(c.expose_paths[2].protocol, PROTO_HTTP2);
    assert_string_equal(c.expose_paths[1].path, "/ready");
    proxycfg_copy(&copy, &c);
    proxycfg_dispose(&c);
    assert_int_equal(copy.n_expose_paths, 3);
    assert_string_equal(copy.expose_paths[2].path, "/x");
    assert_int_equal(copy.expose_paths[2].local_path_port, 9090);
    proxycfg_dispose(&copy);

    /* Each bad value is an error naming it, so the last good configuration stays. */
    static const struct {
        struct dec_expose_path p;
        const char *msg;
    } bad[] = {
        {{21500, 8080, "/a", "grpc"}, "Paths[1].Protocol \"grpc\" is not \"http\" or \"http2\""},
        {{21500, 8080, "health", ""}, "Paths[1].Path \"health\" must begin with /"},
        {{21500, 8080, "", ""}, "Paths[1].Path \"\" must begin with /"},
        {{21500, 8080, "/a?b=1", ""}, "must begin with / and have no query"},
        {{21500, 8080, "/a#b", ""}, "no query, fragment"},
        {{21500, 8080, "/a b", ""}, "space or control"},
        {{21500, 8080, "/a\x01", ""}, "space or control"},
        {{0, 8080, "/a", ""}, "Paths[1]: ListenerPort must be set"},
        {{21502, 0, "/a", ""}, "Paths[1]: LocalPathPort must be set"},
        {{21000, 8080, "/a", ""}, "ListenerPort 21000 is the proxy's public port"},
        {{9191, 8080, "/a", ""}, "ListenerPort 9191 is also upstream \"db\"'s port"},
        {{21500, 8081, "/a", ""}, "Paths[0] and [1] share ListenerPort 21500"},
        {{21500, 8080, "/a", "http2"}, "Paths[0] and [1] share ListenerPort 21500"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        struct dec_expose_path two[] = {ok[0], bad[i].p};
        assert_int_equal(build_exposed(two, 2, &c, err, sizeof(err)), ERR_BAD_CONFIG);
        if (strstr(err, bad[i].msg) == NULL)
            fail_msg("case %zu: got \"%s\", want \"%s\"", i, err, bad[i].msg);
        assert_null(c.expose_paths);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_expose_paths),
        cmocka_unit_test(test_defaults_are_stored_and_documented_from_the_table),
        cmocka_unit_test(test_protocol_key),
        cmocka_unit_test(test_upstream_protocol_key),
        cmocka_unit_test(test_upstream_outlier_keys),
        cmocka_unit_test(test_enumerated_keys),
        cmocka_unit_test(test_many_unknown_keys_are_bounded_and_fast),
        cmocka_unit_test(test_warned_set_is_bounded),
    };
    return cmocka_run_group_tests_name("proxycfg", tests, NULL, NULL);
}
