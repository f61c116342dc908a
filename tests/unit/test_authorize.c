/*
 * Tests for authorize (the control thread's side of authorize mode) against the scripted fake
 * agent: the same question asked twice before the answer comes makes one request and gets
 * both answered; a new caller the agent cannot answer for is denied; a re-check the agent
 * cannot answer is asked again (RECHECK_RETRY_MS later) instead of ending the connection.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "agent.h"
#include "authorize.h"
#include "authq.h"
#include "inputs.h"
#include "loop.h"
#include "util.h"
#include "watch.h"

#include "fake_agent.h"

#define CALLER "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web"

struct harness {
    struct loop *loop;
    struct fake srv;
    struct agent *agent;
    struct watch_reach *reach;
    struct inputs *in;
    struct authorize *az;
    struct authq_box *replies;
    struct authq_req *got[8]; /* answers, in the order they came back */
    size_t n_got, want;
    struct loop_timer check, deadline;
    int timed_out;
};

static void on_replies(void *data)
{
    struct harness *h = data;
    struct authq_req *r = authq_box_take(h->replies);
    while (r != NULL) {
        struct authq_req *next = r->next;
        assert_true(h->n_got < ARRAY_SIZE(h->got));
        h->got[h->n_got++] = r;
        r = next;
    }
}

static void on_inputs(void *data, enum inputs_event ev)
{
    (void)data;
    (void)ev;
}

static void on_check(struct loop_timer *t)
{
    struct harness *h = t->data;
    if (h->n_got >= h->want)
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
    h->in = inputs_new(h->agent, h->reach, on_inputs, h); /* no intentions: nothing cached */
    h->az = authorize_new(h->agent, h->reach, h->in);
    h->replies = authq_box_new(h->loop, on_replies, h);
    loop_timer_init(&h->check, on_check, h);
    loop_timer_init(&h->deadline, on_deadline, h);
}

/* Runs the loop until <n> answers in all have come back (or 5 s). */
static void run_until(struct harness *h, size_t n)
{
    h->want = n;
    loop_timer_start(h->loop, &h->check, 0);
    loop_timer_start(h->loop, &h->deadline, 5000);
    assert_int_equal(loop_run(h->loop), 0);
    loop_timer_stop(h->loop, &h->check);
    loop_timer_stop(h->loop, &h->deadline);
    if (h->timed_out)
        fail_msg("%zu answer(s) of %zu after 5 s (the agent saw %zu requests)", h->n_got, n,
                 fake_nreq(&h->srv));
}

static void teardown(struct harness *h)
{
    for (size_t i = 0; i < h->n_got; i++)
        authq_req_free(h->got[i]);
    authorize_free(h->az);
    inputs_free(h->in);
    authq_box_free(h->replies);
    watch_reach_free(h->reach);
    agent_free(h->agent);
    loop_free(h->loop);
    fake_stop(&h->srv);
}

static struct authq_req *question(struct harness *h, int recheck)
{
    struct authq_req *r = authq_req_new("db", CALLER, "01:02:03");
    r->reply = h->replies;
    r->recheck = recheck;
    return r;
}

static void test_same_question_asked_once(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {200, NULL, "{\"Authorized\":true,\"Reason\":\"Matched L4 intention\"}", 0},
        {200, NULL, "{\"Authorized\":false,\"Reason\":\"Denied by intention\"}", 0},
    };
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script));
    authorize_submit(h.az, question(&h, 0));
    authorize_submit(h.az, question(&h, 0)); /* before the answer: joins the first */
    run_until(&h, 2);
    assert_int_equal(fake_nreq(&h.srv), 1);
    assert_req_line(&h.srv, 0, "POST /v1/agent/connect/authorize HTTP/1.1");
    assert_non_null(strstr(h.srv.reqs[0], CALLER));
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(h.got[i]->allowed, 1);
        assert_string_equal(h.got[i]->reason, "Matched L4 intention");
    }
    /* After the answer, and with no cache: the next caller asks again. */
    authorize_submit(h.az, question(&h, 0));
    run_until(&h, 3);
    assert_int_equal(fake_nreq(&h.srv), 2);
    assert_int_equal(h.got[2]->allowed, 0);
    assert_string_equal(h.got[2]->reason, "Denied by intention");
    teardown(&h);
}

static void test_no_answer_denies_a_new_caller(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {{500, NULL, "boom", 0}};
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script));
    authorize_submit(h.az, question(&h, 0));
    run_until(&h, 1);
    assert_int_equal(h.got[0]->allowed, 0);
    assert_non_null(strstr(h.got[0]->reason, "HTTP 500"));
    teardown(&h);
}

static void test_recheck_without_answer_is_asked_again(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {500, NULL, "boom", 0},
        {200, NULL, "{\"Authorized\":false,\"Reason\":\"Denied by intention\"}", 0},
    };
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script));
    authorize_submit(h.az, question(&h, 1));
    run_until(&h, 1);
    assert_int_equal(fake_nreq(&h.srv), 2); /* the error was not taken as the answer */
    assert_int_equal(h.got[0]->allowed, 0);
    assert_int_equal(h.got[0]->asks, 2);
    assert_string_equal(h.got[0]->reason, "Denied by intention");
    teardown(&h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_same_question_asked_once),
        cmocka_unit_test(test_no_answer_denies_a_new_caller),
        cmocka_unit_test(test_recheck_without_answer_is_asked_again),
    };
    return cmocka_run_group_tests_name("authorize", tests, NULL, NULL);
}
