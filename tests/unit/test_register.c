/*
 * Tests for register (-register) against the scripted fake agent: it registers the flags
 * configuration at once as a connect-proxy with a TTL check, and register_leave() deregisters
 * it and reports when the agent has answered.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "agent.h"
#include "loop.h"
#include "proxycfg.h"
#include "register.h"
#include "util.h"
#include "watch.h"

#include "fake_agent.h"

struct harness {
    struct loop *loop;
    struct fake srv;
    struct agent *agent;
    struct watch_reach *reach;
    struct register_ctx *reg;
    int done;
    size_t want_reqs;
    struct loop_timer check, deadline;
    int timed_out;
};

static void on_done(void *data)
{
    struct harness *h = data;
    h->done++;
}

static void on_check(struct loop_timer *t)
{
    struct harness *h = t->data;
    if (fake_nreq(&h->srv) >= h->want_reqs && !register_busy(h->reg))
        loop_stop(h->loop);
    else
        loop_timer_start(h->loop, t, 2);
}

static void on_deadline(struct loop_timer *t)
{
    struct harness *h = t->data;
    h->timed_out = 1;
    loop_stop(h->loop);
}

/* Runs the loop until the agent has seen <n> requests and none is in flight (or 5 s). */
static void run_until(struct harness *h, size_t n)
{
    h->want_reqs = n;
    loop_timer_start(h->loop, &h->check, 0);
    loop_timer_start(h->loop, &h->deadline, 5000);
    assert_int_equal(loop_run(h->loop), 0);
    loop_timer_stop(h->loop, &h->check);
    loop_timer_stop(h->loop, &h->deadline);
    if (h->timed_out)
        fail_msg("the agent saw %zu request(s) of %zu after 5 s", fake_nreq(&h->srv), n);
}

static void test_registers_then_deregisters(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {{200, NULL, "", 0}, {200, NULL, "", 0}};
    struct harness h;
    char err[256], addr[64];
    memset(&h, 0, sizeof(h));
    fake_start(&h.srv, script, ARRAY_SIZE(script), 0);
    h.loop = loop_new();
    assert_non_null(h.loop);
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", h.srv.port);
    struct agent_opts o = {.addr = addr, .ssl_verify = 1};
    h.agent = agent_new(h.loop, &o, err, sizeof(err));
    assert_non_null(h.agent);
    h.reach = watch_reach_new(addr);
    loop_timer_init(&h.check, on_check, &h);
    loop_timer_init(&h.deadline, on_deadline, &h);

    struct proxy_cfg cfg;
    char up0[] = "db:9191";
    char *upstreams[] = {up0};
    struct proxycfg_flags pf = {
        .service = "web",
        .proxy_id = "web-proxy",
        .listen = "127.0.0.1:21000",
        .service_addr = "127.0.0.1:8080",
        .upstreams = upstreams,
        .n_upstreams = 1,
    };
    if (proxycfg_from_flags(&pf, &cfg, err, sizeof(err)) != 0)
        fail_msg("proxycfg_from_flags: %s", err);
    h.reg = register_start(h.agent, h.reach, &cfg, "web-proxy", on_done, &h);
    proxycfg_dispose(&cfg); /* read at the start, not kept */
    run_until(&h, 1);
    assert_req_line(&h.srv, 0, "PUT /v1/agent/service/register HTTP/1.1");
    const char *body = h.srv.reqs[0];
    assert_non_null(strstr(body, "\"Kind\":\"connect-proxy\""));
    assert_non_null(strstr(body, "\"ID\":\"web-proxy\""));
    assert_non_null(strstr(body, "\"DestinationServiceName\":\"web\""));
    assert_non_null(strstr(body, "\"CheckID\":\"web-proxy-ttl\""));
    assert_non_null(strstr(body, "\"TTL\":\"30s\""));
    assert_int_equal(h.done, 0);

    register_leave(h.reg);
    run_until(&h, 2);
    assert_req_line(&h.srv, 1, "PUT /v1/agent/service/deregister/web-proxy HTTP/1.1");
    assert_int_equal(h.done, 1);

    register_free(h.reg);
    watch_reach_free(h.reach);
    agent_free(h.agent);
    loop_free(h.loop);
    fake_stop(&h.srv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_registers_then_deregisters),
    };
    return cmocka_run_group_tests_name("register", tests, NULL, NULL);
}
