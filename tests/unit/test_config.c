/*
 * Unit tests for config (flags and environment) and proxycfg (registration -> settings).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "proxycfg.h"
#include "registration.h"
#include "util.h"

/* ---- a fake environment ---- */

static const char *fake_env[16][2];

static void env_set(const char *name, const char *value)
{
    for (size_t i = 0; i < 16; i++) {
        if (fake_env[i][0] == NULL || strcmp(fake_env[i][0], name) == 0) {
            fake_env[i][0] = name;
            fake_env[i][1] = value;
            return;
        }
    }
    fail_msg("fake environment full");
}

static const char *env_get(const char *name)
{
    for (size_t i = 0; i < 16 && fake_env[i][0] != NULL; i++)
        if (strcmp(fake_env[i][0], name) == 0)
            return fake_env[i][1];
    return NULL;
}

static int env_reset(void **state)
{
    (void)state;
    memset(fake_env, 0, sizeof(fake_env));
    return 0;
}

static int parse(struct config *c, char *err, size_t errlen, int argc, ...)
{
    char *argv[32];
    va_list ap;
    va_start(ap, argc);
    argv[0] = "connectd";
    for (int i = 1; i < argc; i++)
        argv[i] = va_arg(ap, char *);
    va_end(ap);
    return config_parse(c, argc, argv, env_get, err, errlen);
}

static void test_flags_basic(void **state)
{
    struct config c;
    char err[256] = "";
    (void)state;
    assert_int_equal(parse(&c, err, sizeof(err), 8, "-sidecar-for", "web",
                           "--http-addr=127.0.0.1:1", "-log-level", "DEBUG", "-workers", "3"),
                     0);
    assert_string_equal(c.sidecar_for, "web");
    assert_null(c.proxy_id);
    assert_string_equal(c.http_addr, "127.0.0.1:1");
    assert_int_equal(c.level, LOG_LEVEL_DEBUG);
    assert_int_equal(c.n_workers, 3);
    assert_int_equal(c.verify, 1);
    assert_int_equal(c.drain_timeout_ms, 5000);
    config_dispose(&c);
}

static void test_flags_mode(void **state)
{
    struct config c;
    char err[256] = "";
    (void)state;
    assert_int_equal(parse(&c, err, sizeof(err), 13, "-service", "web", "-listen",
                           "127.0.0.1:21000", "-service-addr", "127.0.0.1:8080", "-upstream",
                           "db:9191", "-upstream=geo.query:127.0.0.10:9192", "-register",
                           "-register-id", "a"),
                     0);
    assert_string_equal(c.service, "web");
    assert_int_equal(c.upstreams.n, 2);
    assert_string_equal(c.upstreams.v[1], "geo.query:127.0.0.10:9192");
    assert_int_equal(c.register_self, 1);

    struct proxycfg_flags f = {.service = c.service,
                               .proxy_id = "web-proxy-a",
                               .listen = c.listen,
                               .service_addr = c.service_addr,
                               .upstreams = c.upstreams.v,
                               .n_upstreams = c.upstreams.n};
    struct proxy_cfg pc;
    assert_int_equal(proxycfg_from_flags(&f, &pc, err, sizeof(err)), 0);
    assert_string_equal(pc.service, "web");
    assert_string_equal(pc.proxy_id, "web-proxy-a");
    assert_string_equal(pc.bind_address, "127.0.0.1");
    assert_int_equal(pc.bind_port, 21000);
    assert_int_equal(pc.local_port, 8080);
    assert_int_equal(pc.n_upstreams, 2);
    assert_string_equal(pc.upstreams[0].destination_type, "service");
    assert_string_equal(pc.upstreams[0].bind_address, "127.0.0.1");
    assert_int_equal(pc.upstreams[0].bind_port, 9191);
    assert_string_equal(pc.upstreams[1].destination_type, "prepared_query");
    assert_string_equal(pc.upstreams[1].destination_name, "geo");
    assert_string_equal(pc.upstreams[1].bind_address, "127.0.0.10");
    proxycfg_dispose(&pc);

    char *bad[] = {"db", "db:0", ":9191", "db:127.0.0.1:", "db::9191"};
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        f.upstreams = &bad[i];
        f.n_upstreams = 1;
        assert_int_equal(proxycfg_from_flags(&f, &pc, err, sizeof(err)), ERR_BAD_CONFIG);
        assert_non_null(strstr(err, "-upstream"));
    }
    config_dispose(&c);

    assert_int_equal(parse(&c, err, sizeof(err), 5, "-service", "web", "-sidecar-for", "web"),
                     -EINVAL);
    assert_non_null(strstr(err, "mutually exclusive"));
    assert_int_equal(parse(&c, err, sizeof(err), 5, "-proxy-id", "p", "-upstream", "db:1"),
                     -EINVAL);
    assert_non_null(strstr(err, "need -service"));
}

static void test_flag_defaults_and_durations(void **state)
{
    static const struct {
        const char *text;
        long ms; /* -1: rejected */
    } cases[] = {
        {"10s", 10000}, {"250ms", 250}, {"2m", 120000},      {"1500", 1500}, {"0", 0},
        {"0s", 0},      {"1h", -1},     {"s", -1},           {"-1s", -1},    {"1.5s", -1},
        {"", -1},       {"86401s", -1}, {"1440m", 86400000},
    };
    struct config c;
    char err[256] = "";
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    (void)state;
    /* -workers defaults to the online CPUs. */
    assert_int_equal(parse(&c, err, sizeof(err), 3, "-proxy-id", "p"), 0);
    assert_int_equal(c.n_workers, cpus < 1 ? 1 : cpus > 256 ? 256 : cpus);
    config_dispose(&c);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int rc = parse(&c, err, sizeof(err), 5, "-proxy-id", "p", "-drain-timeout", cases[i].text);
        if (cases[i].ms < 0) {
            assert_int_equal(rc, -EINVAL);
            assert_non_null(strstr(err, "-drain-timeout"));
            continue;
        }
        assert_int_equal(rc, 0);
        assert_int_equal(c.drain_timeout_ms, cases[i].ms);
        config_dispose(&c);
    }
}

/* -watch-wait: the agent's default 5 minutes unless set; 1 s to 10 min (max_query_time). */
static void test_watch_wait(void **state)
{
    static const struct {
        const char *text;
        long ms; /* -1: refused */
    } cases[] = {{"2s", 2000},  {"5m", 300000}, {"10m", 600000}, {"1000", 1000},
                 {"999ms", -1}, {"0", -1},      {"11m", -1},     {"soon", -1}};
    struct config c;
    char err[256] = "";
    (void)state;
    assert_int_equal(parse(&c, err, sizeof(err), 3, "-proxy-id", "p"), 0);
    assert_int_equal(c.watch_wait_ms, 300000);
    config_dispose(&c);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int rc = parse(&c, err, sizeof(err), 5, "-proxy-id", "p", "-watch-wait", cases[i].text);
        if (cases[i].ms < 0) {
            assert_int_equal(rc, -EINVAL);
            assert_non_null(strstr(err, "-watch-wait"));
            continue;
        }
        assert_int_equal(rc, 0);
        assert_int_equal(c.watch_wait_ms, cases[i].ms);
        config_dispose(&c);
    }
}

static void test_env_fallbacks(void **state)
{
    struct config c;
    char err[256] = "";
    (void)state;
    env_set("CONNECT_PROXY_ID", "web-sidecar-proxy");
    env_set("CONSUL_HTTP_ADDR", "unix:///tmp/agent.sock");
    env_set("CONSUL_HTTP_TOKEN", "secret-env");
    assert_int_equal(parse(&c, err, sizeof(err), 1), 0);
    assert_string_equal(c.proxy_id, "web-sidecar-proxy");
    assert_string_equal(c.http_addr, "unix:///tmp/agent.sock");
    assert_string_equal(c.token, "secret-env");
    config_dispose(&c);

    /* A flag beats its variable. */
    assert_int_equal(parse(&c, err, sizeof(err), 3, "-http-addr", "10.0.0.1:8500"), 0);
    assert_string_equal(c.http_addr, "10.0.0.1:8500");
    config_dispose(&c);
}

static char *write_temp(const char *content)
{
    char *path = strdup("/tmp/connectd-test-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, content, strlen(content)), (ssize_t)strlen(content));
    close(fd);
    return path;
}

static void test_token_precedence(void **state)
{
    struct config c;
    char err[256] = "";
    char *file = write_temp("  from-file \n");
    (void)state;
    env_set("CONNECT_PROXY_ID", "p");
    env_set("CONSUL_HTTP_TOKEN", "from-env");
    /* -token-file beats -token. */
    assert_int_equal(parse(&c, err, sizeof(err), 5, "-token", "flag", "-token-file", file), 0);
    assert_string_equal(c.token, "from-file");
    config_dispose(&c);
    /* -token beats the environment. */
    assert_int_equal(parse(&c, err, sizeof(err), 3, "-token", "flag"), 0);
    assert_string_equal(c.token, "flag");
    config_dispose(&c);
    /* CONSUL_HTTP_TOKEN_FILE beats CONSUL_HTTP_TOKEN. */
    env_set("CONSUL_HTTP_TOKEN_FILE", file);
    assert_int_equal(parse(&c, err, sizeof(err), 1), 0);
    assert_string_equal(c.token, "from-file");
    config_dispose(&c);
    unlink(file);
    /* A missing token file is an error naming the variable. */
    assert_int_equal(parse(&c, err, sizeof(err), 1), -EINVAL);
    assert_non_null(strstr(err, "CONSUL_HTTP_TOKEN_FILE"));
    free(file);
}

/* -allow-core-dumps is off unless given; a token file that cannot be read is an error. */
static void test_core_dumps_and_unreadable_token_file(void **state)
{
    struct config c;
    char err[256] = "";
    (void)state;
    env_set("CONNECT_PROXY_ID", "p");
    assert_int_equal(parse(&c, err, sizeof(err), 1), 0);
    assert_int_equal(c.allow_core_dumps, 0);
    config_dispose(&c);
    assert_int_equal(parse(&c, err, sizeof(err), 2, "-allow-core-dumps"), 0);
    assert_int_equal(c.allow_core_dumps, 1);
    config_dispose(&c);
    /* A directory opens but does not read. */
    assert_int_equal(parse(&c, err, sizeof(err), 3, "-token-file", "/"), -EINVAL);
    assert_non_null(strstr(err, "cannot read /"));
    /* Exactly at the cap is fine, one byte over is not. */
    char *big = xmalloc(4097 + 1);
    memset(big, 'a', 4097);
    big[4096] = '\0';
    char *file = write_temp(big);
    assert_int_equal(parse(&c, err, sizeof(err), 3, "-token-file", file), 0);
    assert_int_equal(strlen(c.token), 4096);
    config_dispose(&c);
    unlink(file);
    free(file);
    big[4096] = 'a';
    big[4097] = '\0';
    file = write_temp(big);
    assert_int_equal(parse(&c, err, sizeof(err), 3, "-token-file", file), -EINVAL);
    assert_non_null(strstr(err, "larger than 4096"));
    unlink(file);
    free(file);
    free(big);
}

static void test_flag_errors(void **state)
{
    struct config c;
    char err[256] = "";
    (void)state;
    assert_int_equal(parse(&c, err, sizeof(err), 3, "-bogus", "1"), -EINVAL);
    assert_non_null(strstr(err, "-bogus"));
    assert_int_equal(parse(&c, err, sizeof(err), 2, "-proxy-id"), -EINVAL);
    assert_non_null(strstr(err, "-proxy-id"));
    assert_int_equal(parse(&c, err, sizeof(err), 5, "-proxy-id", "a", "-workers", "0"), -EINVAL);
    assert_non_null(strstr(err, "-workers"));
    assert_int_equal(parse(&c, err, sizeof(err), 5, "-proxy-id", "a", "-log-level", "loud"),
                     -EINVAL);
    assert_non_null(strstr(err, "-log-level"));
    assert_int_equal(parse(&c, err, sizeof(err), 5, "-proxy-id", "a", "-sidecar-for", "b"),
                     -EINVAL);
    assert_non_null(strstr(err, "mutually exclusive"));
    assert_int_equal(parse(&c, err, sizeof(err), 1), -EINVAL);
    assert_non_null(strstr(err, "-sidecar-for"));
    assert_int_equal(parse(&c, err, sizeof(err), 5, "-proxy-id", "a", "-client-cert", "x"),
                     -EINVAL);
    assert_non_null(strstr(err, "-client-key"));
    assert_int_equal(parse(&c, err, sizeof(err), 2, "stray"), -EINVAL);
    assert_non_null(strstr(err, "stray"));
    /* -help needs nothing else. */
    assert_int_equal(parse(&c, err, sizeof(err), 2, "-help"), 0);
    assert_int_equal(c.help, 1);
    config_dispose(&c);
}

/* ---- proxycfg ---- */

static struct dec_kv kv(const char *key, enum dec_kv_type type, const char *str)
{
    struct dec_kv k = {(char *)key, type, (char *)str, 0, 0};
    if (type == DEC_KV_NUMBER)
        k.num = strtod(str, NULL);
    return k;
}

static struct dec_upstream base_upstream(const char *name, int port)
{
    struct dec_upstream u = {0};
    u.destination_type = "";
    u.destination_name = (char *)name;
    u.destination_namespace = "";
    u.destination_partition = "";
    u.destination_peer = "";
    u.datacenter = "";
    u.local_bind_address = "";
    u.local_bind_port = port;
    u.local_bind_socket_path = "";
    u.local_bind_socket_mode = "";
    return u;
}

static void test_proxycfg_defaults(void **state)
{
    struct dec_service s = base_service();
    struct dec_upstream ups[1] = {base_upstream("db", 9191)};
    struct proxy_cfg c;
    char err[256];
    (void)state;
    s.upstreams = ups;
    s.n_upstreams = 1;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_string_equal(c.service, "web");
    assert_string_equal(c.bind_address, "0.0.0.0");
    assert_int_equal(c.bind_port, 21000);
    assert_string_equal(c.local_address, "127.0.0.1");
    assert_int_equal(c.local_port, 8080);
    assert_int_equal(c.local_connect_timeout_ms, 1000);
    assert_int_equal(c.handshake_timeout_ms, 10000);
    assert_int_equal(c.n_upstreams, 1);
    assert_string_equal(c.upstreams[0].destination_type, "service");
    assert_string_equal(c.upstreams[0].bind_address, "127.0.0.1");
    assert_int_equal(c.upstreams[0].bind_port, 9191);
    assert_int_equal(c.upstreams[0].connect_timeout_ms, 5000);
    /* Limits and the newer timeouts are off unless configured. */
    assert_int_equal(c.limits.max_connections, 0);
    assert_int_equal(c.limits.new_per_second, 0);
    assert_int_equal(c.idle_timeout_ms, 0);
    assert_int_equal(c.max_lifetime_ms, 0);
    assert_int_equal(c.reauthorize_interval_ms, 0);
    assert_int_equal(c.upstreams[0].limits.max_connections, 0);
    assert_int_equal(c.upstreams[0].idle_timeout_ms, 0);
    assert_string_equal(c.upstreams[0].key, "service:///db");
    assert_int_equal(c.n_warnings, 0);

    struct proxy_cfg copy;
    proxycfg_copy(&copy, &c);
    assert_string_equal(copy.upstreams[0].key, "service:///db");
    assert_ptr_not_equal(copy.upstreams[0].key, c.upstreams[0].key);
    proxycfg_dispose(&copy);
    proxycfg_dispose(&c);
}

static void test_proxycfg_keys(void **state)
{
    struct dec_service s = base_service();
    struct dec_kv pkv[] = {
        kv("bind_address", DEC_KV_STRING, "127.0.0.2"),
        kv("bind_port", DEC_KV_NUMBER, "21001"),
        kv("local_connect_timeout_ms", DEC_KV_STRING, "250"),
        kv("handshake_timeout_ms", DEC_KV_NUMBER, "3000"),
        kv("protocol", DEC_KV_STRING, "http"),
        kv("envoy_whatever", DEC_KV_STRING, "x"),
        kv("tls_min_version", DEC_KV_STRING, "TLSv1_3"),
        kv("tls_cipher_suites", DEC_KV_STRING, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
        kv("verify_trust_domain", DEC_KV_BOOL, ""),
        kv("authorization", DEC_KV_STRING, "authorize"),
        kv("authorize_cache_ms", DEC_KV_NUMBER, "0"),
        kv("max_inbound_connections", DEC_KV_NUMBER, "100"),
        kv("max_new_connections_per_second", DEC_KV_NUMBER, "10"),
        kv("max_new_connections_burst", DEC_KV_NUMBER, "30"),
        kv("local_idle_timeout_ms", DEC_KV_NUMBER, "30000"),
        kv("max_connection_lifetime_ms", DEC_KV_NUMBER, "3600000"),
        kv("reauthorize_interval_ms", DEC_KV_NUMBER, "5000"),
    };
    struct dec_kv ukv[] = {
        kv("connect_timeout_ms", DEC_KV_NUMBER, "1500"),
        kv("limits.max_connections", DEC_KV_NUMBER, "7"),
        kv("max_new_connections_per_second", DEC_KV_NUMBER, "20"),
        kv("max_new_connections_burst", DEC_KV_STRING, "40"),
        kv("idle_timeout_ms", DEC_KV_NUMBER, "60000"),
    };
    struct dec_upstream ups[1] = {base_upstream("db", 9191)};
    struct proxy_cfg c;
    char err[256];
    (void)state;
    ups[0].config = ukv;
    ups[0].n_config = 5;
    ups[0].datacenter = "dc2";
    s.config = pkv;
    s.n_config = ARRAY_SIZE(pkv);
    s.upstreams = ups;
    s.n_upstreams = 1;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_string_equal(c.bind_address, "127.0.0.2");
    assert_int_equal(c.bind_port, 21001);
    assert_int_equal(c.local_connect_timeout_ms, 250);
    assert_int_equal(c.handshake_timeout_ms, 3000);
    assert_int_equal(c.limits.max_connections, 100);
    assert_int_equal(c.limits.new_per_second, 10);
    assert_int_equal(c.limits.new_burst, 30);
    assert_int_equal(c.idle_timeout_ms, 30000);
    assert_int_equal(c.max_lifetime_ms, 3600000);
    assert_int_equal(c.reauthorize_interval_ms, 5000);
    assert_int_equal(c.upstreams[0].connect_timeout_ms, 1500);
    assert_int_equal(c.tls_min_version, 13);
    assert_int_equal(c.tls_max_version, 0);
    assert_string_equal(c.tls_cipher_suites, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256");
    assert_int_equal(c.verify_trust_domain, 0); /* the kv's boolean member is 0 */
    assert_int_equal(c.authorize_with_agent, 1);
    assert_int_equal(c.authorize_cache_ms, 0);
    assert_int_equal(c.authorize_timeout_ms, 5000);
    assert_int_equal(c.upstreams[0].limits.max_connections, 7);
    assert_int_equal(c.upstreams[0].limits.new_per_second, 20);
    assert_int_equal(c.upstreams[0].limits.new_burst, 40);
    assert_int_equal(c.upstreams[0].idle_timeout_ms, 60000);
    assert_string_equal(c.upstreams[0].key, "service://dc2/db");
    assert_int_equal(c.n_warnings, 1);
    assert_non_null(strstr(c.warnings[0], "envoy_whatever"));
    proxycfg_dispose(&c);
}

static void test_proxycfg_errors(void **state)
{
    struct dec_service s = base_service();
    struct dec_kv bad_port[] = {kv("bind_port", DEC_KV_NUMBER, "70000")};
    struct dec_kv bad_type[] = {kv("bind_address", DEC_KV_NUMBER, "1")};
    struct dec_kv bad_ms[] = {kv("handshake_timeout_ms", DEC_KV_STRING, "soon")};
    struct dec_kv bad_new[][2] = {
        {kv("tls_min_version", DEC_KV_STRING, "TLSv1_0"), kv("x_", DEC_KV_STRING, "")},
        {kv("tls_max_version", DEC_KV_NUMBER, "12"), kv("x_", DEC_KV_STRING, "")},
        {kv("authorization", DEC_KV_STRING, "acl"), kv("x_", DEC_KV_STRING, "")},
        {kv("verify_trust_domain", DEC_KV_STRING, "maybe"), kv("x_", DEC_KV_STRING, "")},
        {kv("tls_min_version", DEC_KV_STRING, "TLSv1_3"),
         kv("tls_max_version", DEC_KV_STRING, "TLSv1_2")},
    };
    static const char *const bad_new_names[] = {"tls_min_version", "tls_max_version",
                                                "authorization", "verify_trust_domain",
                                                "tls_max_version"};
    struct dec_kv bad_count[] = {kv("max_inbound_connections", DEC_KV_NUMBER, "-1")};
    struct dec_kv bad_limit[] = {kv("limits.max_connections", DEC_KV_STRING, "many")};
    struct dec_upstream limited[1] = {base_upstream("db", 9191)};
    struct dec_upstream dup[2] = {base_upstream("db", 9191), base_upstream("api", 9191)};
    struct proxy_cfg c;
    char err[256];
    (void)state;

    s.config = bad_port;
    s.n_config = 1;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "bind_port"));
    s.config = bad_type;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "bind_address"));
    for (size_t i = 0; i < ARRAY_SIZE(bad_new); i++) {
        s.config = bad_new[i];
        s.n_config = 2;
        assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
        assert_non_null(strstr(err, bad_new_names[i]));
    }
    s.n_config = 1;
    s.config = bad_ms;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "handshake_timeout_ms"));
    s.config = bad_count;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "max_inbound_connections"));
    s.config = NULL;
    s.n_config = 0;

    limited[0].config = bad_limit;
    limited[0].n_config = 1;
    s.upstreams = limited;
    s.n_upstreams = 1;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "limits.max_connections"));

    s.upstreams = dup;
    s.n_upstreams = 2;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "9191"));
    s.upstreams = NULL;
    s.n_upstreams = 0;

    s.kind = "";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "connect-proxy"));
    s.kind = "connect-proxy";
    s.destination_service_name = "";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "DestinationServiceName"));
}

static void test_proxycfg_socket_upstream(void **state)
{
    struct dec_service s = base_service();
    struct dec_upstream ups[3] = {base_upstream("db", 0), base_upstream("api", 9192),
                                  base_upstream("q", 0)};
    struct dec_kv poll[] = {kv("prepared_query_poll_interval_ms", DEC_KV_NUMBER, "500"),
                            kv("connect_timeout_ms", DEC_KV_STRING, "750")};
    struct proxy_cfg c, copy;
    char err[256];
    (void)state;
    ups[0].local_bind_socket_path = "/tmp/db.sock";
    ups[0].local_bind_socket_mode = "0660";
    ups[2].destination_type = "prepared_query";
    ups[2].local_bind_socket_path = "/tmp/q.sock";
    ups[2].config = poll;
    ups[2].n_config = 2;
    s.upstreams = ups;
    s.n_upstreams = 3;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_int_equal(c.n_upstreams, 3);
    assert_string_equal(c.upstreams[0].bind_socket_path, "/tmp/db.sock");
    assert_int_equal(c.upstreams[0].bind_socket_mode, 0660);
    assert_int_equal(c.upstreams[0].bind_port, 0);
    assert_int_equal(c.upstreams[0].connect_timeout_set, 0);
    assert_int_equal(c.upstreams[0].poll_interval_ms, 10000);
    assert_string_equal(c.upstreams[1].bind_socket_path, "");
    assert_int_equal(c.upstreams[1].bind_socket_mode, -1);
    assert_int_equal(c.upstreams[2].poll_interval_ms, 500);
    assert_int_equal(c.upstreams[2].connect_timeout_ms, 750);
    assert_int_equal(c.upstreams[2].connect_timeout_set, 1);
    assert_int_equal(c.n_warnings, 0);
    proxycfg_copy(&copy, &c);
    assert_string_equal(copy.upstreams[2].bind_socket_path, "/tmp/q.sock");
    proxycfg_dispose(&copy);
    proxycfg_dispose(&c);

    /* A bad mode, two upstreams on one socket, and neither port nor path are errors. */
    ups[0].local_bind_socket_mode = "0999";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "LocalBindSocketMode"));
    ups[0].local_bind_socket_mode = "";
    ups[2].local_bind_socket_path = "/tmp/db.sock";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "both bind /tmp/db.sock"));
    ups[2].local_bind_socket_path = "";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "neither LocalBindPort nor LocalBindSocketPath"));
}

static void test_proxycfg_local_socket(void **state)
{
    struct dec_service s = base_service();
    struct proxy_cfg c;
    char err[256];
    (void)state;
    s.local_service_port = 0;
    s.local_service_socket_path = "/run/app.sock";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_string_equal(c.local_socket_path, "/run/app.sock");
    assert_int_equal(c.n_warnings, 0);
    proxycfg_dispose(&c);
    /* A port wins over a socket path. */
    s.local_service_port = 8080;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_string_equal(c.local_socket_path, "");
    proxycfg_dispose(&c);
}

/* A registration with a SocketPath and no Port: the public listener is that unix socket, and
 * no other socket of the proxy may be the same path (opening it replaces the file). */
static void test_proxycfg_public_socket(void **state)
{
    struct dec_service s = base_service();
    struct dec_upstream up = base_upstream("db", 0);
    struct proxy_cfg c;
    char err[256];
    (void)state;
    s.port = 0;
    s.socket_path = "/run/web-public.sock";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_string_equal(c.bind_socket_path, "/run/web-public.sock");
    assert_int_equal(c.bind_port, 0);
    struct proxy_cfg copy;
    proxycfg_copy(&copy, &c);
    assert_string_equal(copy.bind_socket_path, "/run/web-public.sock");
    proxycfg_dispose(&copy);
    proxycfg_dispose(&c);

    up.local_bind_socket_path = "/run/web-public.sock";
    s.upstreams = &up;
    s.n_upstreams = 1;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "the proxy's own socket"));
    s.n_upstreams = 0;
    s.local_service_port = 0;
    s.local_service_socket_path = "/run/web-public.sock";
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), ERR_BAD_CONFIG);
    assert_non_null(strstr(err, "also Proxy.LocalServiceSocketPath"));

    /* A port, from the registration or Proxy.Config bind_port, wins over the path. */
    s.local_service_socket_path = "";
    s.local_service_port = 8080;
    s.port = 21000;
    assert_int_equal(proxycfg_build(&s, &c, err, sizeof(err)), 0);
    assert_string_equal(c.bind_socket_path, "");
    proxycfg_dispose(&c);
}

static void test_proxycfg_doc(void **state)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    (void)state;
    proxycfg_write_doc(f);
    fclose(f);
    assert_non_null(strstr(buf, "`local_connect_timeout_ms`"));
    assert_non_null(strstr(buf, "`connect_timeout_ms`"));
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_flags_basic, env_reset),
        cmocka_unit_test_setup(test_flags_mode, env_reset),
        cmocka_unit_test(test_watch_wait),
        cmocka_unit_test_setup(test_env_fallbacks, env_reset),
        cmocka_unit_test_setup(test_token_precedence, env_reset),
        cmocka_unit_test_setup(test_core_dumps_and_unreadable_token_file, env_reset),
        cmocka_unit_test_setup(test_flag_errors, env_reset),
        cmocka_unit_test_setup(test_flag_defaults_and_durations, env_reset),
        cmocka_unit_test(test_proxycfg_defaults),
        cmocka_unit_test(test_proxycfg_keys),
        cmocka_unit_test(test_proxycfg_errors),
        cmocka_unit_test(test_proxycfg_socket_upstream),
        cmocka_unit_test(test_proxycfg_public_socket),
        cmocka_unit_test(test_proxycfg_local_socket),
        cmocka_unit_test(test_proxycfg_doc),
    };
    return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
