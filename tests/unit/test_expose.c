/*
 * Unit tests for expose: a check's exposed path from what the agent publishes of it (its type,
 * ExposedPort and the URL its output names), and the exposed listeners built from
 * Expose.Paths plus the check paths.
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

#include "expose.h"
#include "registration.h"
#include "util.h"

static struct dec_check check(const char *type, int port, const char *output)
{
    return (struct dec_check){.check_id = "service:web:1",
                              .service_id = "web",
                              .type = (char *)type,
                              .status = "critical",
                              .output = (char *)output,
                              .exposed_port = port};
}

/* expose_check_path() of an HTTP check on port 21500 with <output>: its path, or NULL. */
static char *http_path(const char *output, int *rc)
{
    struct dec_check c = check("http", 21500, output);
    struct expose_path p;
    *rc = expose_check_path(&c, 8080, &p);
    if (*rc != 0)
        return NULL;
    assert_int_equal(p.listener_port, 21500);
    assert_int_equal(p.local_path_port, 8080);
    assert_int_equal(p.protocol, PROTO_HTTP);
    return p.path;
}

static void test_http_check_path_from_its_output(void **state)
{
    (void)state;
    /* Each form the agent's HTTP check writes its URL in (agent/checks/check.go and Go's
     * url.Error), before and after connectd serves the port. */
    static const struct {
        const char *output, *path;
    } good[] = {
        {"HTTP GET http://127.0.0.1:21500/health: 200 OK Output: ok", "/health"},
        {"HTTP GET http://127.0.0.1:21500/health?a=b: 404 Not Found Output: ", "/health"},
        {"HTTP POST http://10.0.0.5:21500/v1/ready: 503 Service Unavailable Output: x",
         "/v1/ready"},
        {"Get \"http://127.0.0.1:21500/health?x=1\": dial tcp 127.0.0.1:21500: connect: "
         "connection refused",
         "/health"},
        {"Get \"http://:21500/health\": context deadline exceeded (Client.Timeout exceeded)",
         "/health"},
        {"Head \"http://[::1]:21500/h\": EOF", "/h"},
        {"HTTP GET http://127.0.0.1:21500: 200 OK Output: ", "/"},
        {"HTTP GET http://127.0.0.1:21500?q: 200 OK Output: ", "/"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(good); i++) {
        int rc;
        char *p = http_path(good[i].output, &rc);
        if (p == NULL || strcmp(p, good[i].path) != 0)
            fail_msg("%s: got %s (%d), want %s", good[i].output, p ? p : "NULL", rc, good[i].path);
        free(p);
    }
    /* No URL to read (not run yet, another port, another scheme, something else): unknown. */
    static const char *const unknown[] = {
        "",
        "Check is pending",
        "HTTP GET http://127.0.0.1:8080/health: 200 OK Output: ok",   /* not its exposed port */
        "HTTP GET http://127.0.0.1:215000/health: 200 OK Output: ok", /* not a port at all */
        "HTTP GET https://127.0.0.1:21500/health: 200 OK Output: ok",
        "Get \"http://127.0.0.1:21500/health: unterminated",
        "request body: HTTP GET http://127.0.0.1:21500/secret: 200 OK",
        "HTTP GET http://127.0.0.1/health: 200 OK",
    };
    for (size_t i = 0; i < ARRAY_SIZE(unknown); i++) {
        int rc;
        char *p = http_path(unknown[i], &rc);
        if (p != NULL || rc != -EAGAIN)
            fail_msg("%s: got %s (%d), want -EAGAIN", unknown[i], p ? p : "NULL", rc);
    }
    /* A path that could not be matched byte for byte is refused. */
    int rc;
    assert_null(http_path("Get \"http://127.0.0.1:21500/a%20b\x01\": EOF", &rc));
    assert_int_equal(rc, -EINVAL);
}

static void test_other_checks(void **state)
{
    (void)state;
    struct expose_path p;
    struct dec_check c = check("grpc", 21501, "");
    assert_int_equal(expose_check_path(&c, 9090, &p), 0);
    assert_string_equal(p.path, EXPOSE_GRPC_HEALTH_PATH);
    assert_int_equal(p.protocol, PROTO_HTTP2);
    assert_int_equal(p.listener_port, 21501);
    assert_int_equal(p.local_path_port, 9090);
    free(p.path);
    c = check("tcp", 21501, "");
    assert_int_equal(expose_check_path(&c, 9090, &p), -ENOENT);
    c = check("http", 0, "HTTP GET http://127.0.0.1:8080/health: 200 OK");
    assert_int_equal(expose_check_path(&c, 8080, &p), -ENOENT); /* not exposed */
    c = check("grpc", 21501, "");
    assert_int_equal(expose_check_path(&c, 0, &p), -ENOENT); /* an app on a unix socket */
}

static void test_build(void **state)
{
    (void)state;
    struct dec_service svc = base_service();
    struct dec_upstream up = db_upstream();
    struct dec_expose_path paths[] = {
        {.listener_port = 21502, .local_path_port = 8080, .path = "/b", .protocol = ""},
        {.listener_port = 21500, .local_path_port = 8080, .path = "/a", .protocol = ""},
        {.listener_port = 21502, .local_path_port = 8080, .path = "/c", .protocol = ""},
        {.listener_port = 21502, .local_path_port = 8080, .path = "/b", .protocol = ""},
    };
    svc.upstreams = &up;
    svc.n_upstreams = 1;
    svc.expose_paths = paths;
    svc.n_expose_paths = ARRAY_SIZE(paths);
    struct proxy_cfg cfg;
    char err[256], warn[256];
    assert_int_equal(proxycfg_build(&svc, &cfg, err, sizeof(err)), 0);
    struct limit_state *limit = limit_state_new();

    struct expose_path checks[] = {
        {21510, 8080, "/health", PROTO_HTTP},
        {21511, 8080, EXPOSE_GRPC_HEALTH_PATH, PROTO_HTTP2},
    };
    struct snap_exposes *x = expose_build(&cfg, checks, 2, limit, "", warn, sizeof(warn));
    assert_non_null(x);
    assert_string_equal(warn, "");
    assert_int_equal(x->n, 4);
    /* Sorted by port; paths in order, without repeats. */
    assert_int_equal(x->v[0].port, 21500);
    assert_string_equal(x->v[0].name, "expose:21500");
    assert_int_equal(x->v[0].n_paths, 1);
    assert_false(x->v[0].from_checks);
    assert_int_equal(x->v[1].port, 21502);
    assert_int_equal(x->v[1].n_paths, 2);
    assert_string_equal(x->v[1].paths[0], "/b");
    assert_string_equal(x->v[1].paths[1], "/c");
    assert_int_equal(x->v[2].port, 21510);
    assert_true(x->v[2].from_checks);
    assert_int_equal(x->v[2].protocol, PROTO_HTTP);
    assert_int_equal(x->v[3].protocol, PROTO_HTTP2);
    assert_ptr_equal(x->limit, limit);

    /* The same inputs give an equal set; one path more does not. */
    struct snap_exposes *y = expose_build(&cfg, checks, 2, limit, NULL, NULL, 0);
    assert_true(snap_exposes_equal(x, y));
    snap_exposes_unref(y);
    y = expose_build(&cfg, checks, 1, limit, NULL, NULL, 0);
    assert_false(snap_exposes_equal(x, y));
    assert_false(snap_exposes_equal(x, NULL));
    assert_true(snap_exposes_equal(NULL, NULL));
    snap_exposes_unref(y);
    snap_exposes_unref(x);

    /* A check's port that is taken stays out, and says why. */
    static const struct {
        struct expose_path p;
        const char *why;
    } taken[] = {
        {{21502, 8080, "/health", PROTO_HTTP}, "taken by an Expose.Paths listener"},
        {{21000, 8080, "/health", PROTO_HTTP}, "the public listener or an upstream"},
        {{9191, 8080, "/health", PROTO_HTTP}, "the public listener or an upstream"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(taken); i++) {
        x = expose_build(&cfg, &taken[i].p, 1, limit, "", warn, sizeof(warn));
        assert_int_equal(x->n, 2);
        if (strstr(warn, taken[i].why) == NULL)
            fail_msg("case %zu: %s", i, warn);
        snap_exposes_unref(x);
    }
    struct expose_path clash[] = {
        {21510, 8080, "/health", PROTO_HTTP},
        {21510, 8080, EXPOSE_GRPC_HEALTH_PATH, PROTO_HTTP2},
    };
    x = expose_build(&cfg, clash, 2, limit, "", warn, sizeof(warn));
    assert_int_equal(x->n, 3);
    assert_non_null(strstr(warn, "another check going elsewhere"));
    snap_exposes_unref(x);

    /* Nothing to expose: no set. */
    proxycfg_dispose(&cfg);
    svc.n_expose_paths = 0;
    assert_int_equal(proxycfg_build(&svc, &cfg, err, sizeof(err)), 0);
    assert_null(expose_build(&cfg, NULL, 0, limit, "", warn, sizeof(warn)));
    proxycfg_dispose(&cfg);
    limit_state_unref(limit);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_http_check_path_from_its_output),
        cmocka_unit_test(test_other_checks),
        cmocka_unit_test(test_build),
    };
    return cmocka_run_group_tests_name("expose", tests, NULL, NULL);
}
