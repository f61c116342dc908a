/*
 * Tests for upstreams against the scripted fake agent: at start-up an upstream is waited for
 * (upstreams_waiting(), which holds the first snapshot and names the upstream on /ready) until
 * its discovery chain has come and its primary target has had a first health answer; its
 * targets stay empty until then. A health answer that leaves the endpoints as they were (the
 * agent answers when a check's output changes) publishes nothing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "agent.h"
#include "loop.h"
#include "proxycfg.h"
#include "upstreams.h"
#include "util.h"
#include "watch.h"

#include "fake_agent.h"
#include "registration.h"

#define INDEX "X-Consul-Index: 7\r\n"

static const char CHAIN[] =
    "{\"Chain\": {\"ServiceName\": \"db\", \"Namespace\": \"default\", \"Partition\": "
    "\"default\", \"Datacenter\": \"dc1\", \"Protocol\": \"tcp\", \"StartNode\": "
    "\"resolver:db.default.default.dc1\", \"Nodes\": {\"resolver:db.default.default.dc1\": "
    "{\"Type\": \"resolver\", \"Name\": \"db.default.default.dc1\", \"Resolver\": "
    "{\"ConnectTimeout\": \"5s\", \"Default\": true, \"Target\": \"db.default.default.dc1\"}}}, "
    "\"Targets\": {\"db.default.default.dc1\": {\"ConnectTimeout\": \"5s\", \"ID\": "
    "\"db.default.default.dc1\", \"Service\": \"db\", \"Namespace\": \"default\", \"Partition\": "
    "\"default\", \"Datacenter\": \"dc1\", \"Subset\": {}, \"SNI\": "
    "\"db.default.dc1.internal.11111111-2222-3333-4444-555555555555.consul\"}}}}";

/* One passing endpoint of db's sidecar; <out> is what its check says. */
#define HEALTH(out)                                                                                \
    "[{\"Node\": {\"Node\": \"node-a\", \"Address\": \"10.0.0.5\", \"Datacenter\": \"dc1\"}, "     \
    "\"Service\": {\"Kind\": \"connect-proxy\", \"ID\": \"db-sidecar-proxy\", \"Service\": "       \
    "\"db-sidecar-proxy\", \"Address\": \"\", \"Port\": 21001, \"Proxy\": "                        \
    "{\"DestinationServiceName\": \"db\"}}, \"Checks\": [{\"CheckID\": \"c1\", \"Status\": "       \
    "\"passing\", \"Output\": \"" out "\"}]}]"

struct harness {
    struct loop *loop;
    struct fake srv;
    struct agent *agent;
    struct watch_reach *reach;
    struct upstreams *ups;
    struct proxy_cfg cfg;
    struct loop_timer check, deadline;
    size_t want_reqs;
    int timed_out;
    int changes;
};

static void on_changed(void *data)
{
    struct harness *h = data;
    h->changes++;
}

static void on_check(struct loop_timer *t)
{
    struct harness *h = t->data;
    if (fake_nreq(&h->srv) >= h->want_reqs)
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

/* Starts the upstream "db" of the plain sidecar against an agent that answers <script>. */
static void setup(struct harness *h, const struct fake_resp *script, size_t len)
{
    char err[256], addr[64];
    memset(h, 0, sizeof(*h));
    fake_start(&h->srv, script, len, 0);
    h->loop = loop_new();
    assert_non_null(h->loop);
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", h->srv.port);
    struct agent_opts o = {.addr = addr, .ssl_verify = 1};
    h->agent = agent_new(h->loop, &o, err, sizeof(err));
    if (h->agent == NULL)
        fail_msg("agent_new: %s", err);
    h->reach = watch_reach_new(addr);
    h->ups = upstreams_new(h->agent, h->reach, on_changed, h);
    struct dec_service s = base_service();
    struct dec_upstream up = db_upstream();
    s.upstreams = &up;
    s.n_upstreams = 1;
    assert_int_equal(proxycfg_build(&s, &h->cfg, err, sizeof(err)), 0);
    loop_timer_init(&h->check, on_check, h);
    loop_timer_init(&h->deadline, on_deadline, h);
    upstreams_reconcile(h->ups, &h->cfg);
}

/* Runs the loop until the agent has seen <n> requests (the last one held) or 5 s passed. */
static void run_until_reqs(struct harness *h, size_t n)
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

static void teardown(struct harness *h)
{
    upstreams_free(h->ups);
    proxycfg_dispose(&h->cfg);
    watch_reach_free(h->reach);
    agent_free(h->agent);
    loop_free(h->loop);
    fake_stop(&h->srv);
}

/* The upstream's targets as a snapshot would take them. */
static size_t n_targets(struct harness *h, int *with_endpoints)
{
    struct upstreams_parts p;
    upstreams_parts(h->ups, 1, &p);
    size_t n = p.n_targets[0];
    *with_endpoints = n > 0 && p.targets[0][0].endpoints != NULL;
    upstreams_parts_dispose(&p);
    return n;
}

static void test_waits_for_the_chain_then_the_first_health_answer(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {{200, INDEX, CHAIN, 0}}; /* health: held */
    struct harness h;
    char why[320];
    int with_endpoints;
    setup(&h, script, ARRAY_SIZE(script));
    assert_int_equal(upstreams_waiting(h.ups, why, sizeof(why)), 1);
    assert_non_null(strstr(why, "waiting for upstream "));
    assert_non_null(strstr(why, "db: its discovery chain"));

    run_until_reqs(&h, 2); /* the chain answered; the health query is out, unanswered */
    char *line = req_line(&h.srv, 1);
    assert_non_null(strstr(line, "GET /v1/health/connect/db?cached&dc=dc1"));
    free(line);
    assert_int_equal(upstreams_waiting(h.ups, why, sizeof(why)), 1);
    assert_non_null(
        strstr(why, "db: the first health answer of its target db.default.default.dc1"));
    assert_int_equal(n_targets(&h, &with_endpoints), 0); /* the chain is not in force yet */
    teardown(&h);
}

static void test_in_force_once_the_primary_target_answered(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {{200, INDEX, CHAIN, 0}, {200, INDEX, "[]", 0}};
    struct harness h;
    char why[320] = "";
    int with_endpoints;
    setup(&h, script, ARRAY_SIZE(script));
    run_until_reqs(&h, 3); /* chain, health, and the next blocking query of one of them */
    assert_int_equal(upstreams_waiting(h.ups, why, sizeof(why)), 0);
    assert_int_equal(n_targets(&h, &with_endpoints), 1);
    assert_true(with_endpoints); /* an answer, with no endpoint in it */
    assert_true(h.changes > 0);
    teardown(&h);
}

/*
 * The same endpoint again (another check output, a newer index), twice: one request past the
 * first health answer is the chain's next blocking query, which may come first and then gets
 * a health body it refuses. Either way only the first health answer changes a snapshot.
 */
static void test_unchanged_endpoints_publish_nothing(void **state)
{
    (void)state;
    static const struct fake_resp first[] = {{200, INDEX, CHAIN, 0}, {200, INDEX, HEALTH("up"), 0}};
    static const struct fake_resp again[] = {{200, INDEX, CHAIN, 0},
                                             {200, INDEX, HEALTH("up"), 0},
                                             {200, "X-Consul-Index: 8\r\n", HEALTH("up 2"), 0},
                                             {200, "X-Consul-Index: 9\r\n", HEALTH("up 3"), 0}};
    struct harness h;
    int with_endpoints;
    setup(&h, first, ARRAY_SIZE(first));
    run_until_reqs(&h, 4); /* both watches' next queries held */
    int changes = h.changes;
    assert_int_equal(n_targets(&h, &with_endpoints), 1);
    assert_true(with_endpoints);
    teardown(&h);

    setup(&h, again, ARRAY_SIZE(again));
    run_until_reqs(&h, 6);
    assert_int_equal(h.changes, changes);
    teardown(&h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_waits_for_the_chain_then_the_first_health_answer),
        cmocka_unit_test(test_in_force_once_the_primary_target_answered),
        cmocka_unit_test(test_unchanged_endpoints_publish_nothing),
    };
    return cmocka_run_group_tests_name("upstreams", tests, NULL, NULL);
}
