/*
 * Tests for agent (libcurl on our loop) and watch (blocking queries) against a tiny scripted
 * HTTP/1.1 server that runs in a thread on 127.0.0.1 (ephemeral port) or on a unix socket.
 *
 * The server answers the requests it receives, in order, with the test's script; a request
 * past the end of the script is held open without an answer, like a blocking query with
 * nothing new. Most tests run the loop until the server has seen a given number of requests:
 * the last one is the held query, so by then the watch has handled every scripted answer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "agent.h"
#include "log.h"
#include "loop.h"
#include "util.h"
#include "watch.h"

#include "fake_agent.h"

/* ---- the loop harness ---- */

struct harness {
    struct loop *loop;
    struct agent *agent;
    struct fake srv;
    struct loop_timer check, deadline;
    size_t want_reqs;               /* stop once the server has seen this many requests */
    int (*done)(struct harness *h); /* or once this says so */
    int timed_out;
    int expect_timeout; /* the deadline is the planned end of the run */

    /* what watch and request callbacks saw */
    int ndeliv;
    char bodies[8][64];
    uint64_t indexes[8];
    char hashes[8][32];
    unsigned failures_seen[8];
    enum log_level reject_levels[8]; /* watch_reject_level() during each delivery */
    long statuses[8];
    int any_status; /* the watch delivers 403 and 404 too */
    struct watch *w;
    const char *reject_prefix; /* the watch callback rejects bodies starting with this */
    int stop_in_cb;
    void *ctx; /* a test's own state, for its done() */
};

static void on_check(struct loop_timer *t)
{
    struct harness *h = t->data;
    if ((h->want_reqs > 0 && fake_nreq(&h->srv) >= h->want_reqs) ||
        (h->done != NULL && h->done(h))) {
        loop_stop(h->loop);
        return;
    }
    loop_timer_start(h->loop, t, 2);
}

static void on_deadline(struct loop_timer *t)
{
    struct harness *h = t->data;
    h->timed_out = 1;
    loop_stop(h->loop);
}

static void run(struct harness *h, uint64_t deadline_ms)
{
    loop_timer_init(&h->check, on_check, h);
    loop_timer_init(&h->deadline, on_deadline, h);
    loop_timer_start(h->loop, &h->check, 0);
    loop_timer_start(h->loop, &h->deadline, deadline_ms);
    assert_int_equal(loop_run(h->loop), 0);
    loop_timer_stop(h->loop, &h->check);
    loop_timer_stop(h->loop, &h->deadline);
    if (h->timed_out != h->expect_timeout)
        fail_msg("run %s (server saw %zu requests)", h->timed_out ? "timed out" : "ended early",
                 fake_nreq(&h->srv));
}

static struct agent *make_agent(struct harness *h, const struct agent_opts *extra)
{
    char err[256];
    struct agent_opts o = {.ssl_verify = 1};
    if (extra != NULL)
        o = *extra;
    char addr[160];
    if (o.addr == NULL) {
        if (h->srv.sock_path[0] != '\0')
            snprintf(addr, sizeof(addr), "unix://%s", h->srv.sock_path);
        else
            snprintf(addr, sizeof(addr), "127.0.0.1:%d", h->srv.port);
        o.addr = addr;
    }
    struct agent *a = agent_new(h->loop, &o, err, sizeof(err));
    if (a == NULL)
        fail_msg("agent_new: %s", err);
    return a;
}

static void setup(struct harness *h, const struct fake_resp *script, size_t len, int unix_sock,
                  const struct agent_opts *opts)
{
    memset(h, 0, sizeof(*h));
    fake_start(&h->srv, script, len, unix_sock);
    h->loop = loop_new();
    assert_non_null(h->loop);
    h->agent = make_agent(h, opts);
}

/* Stops everything; ASan's leak check then proves nothing was left behind. */
static void teardown(struct harness *h)
{
    watch_stop(h->w);
    h->w = NULL;
    agent_free(h->agent);
    loop_free(h->loop);
    fake_stop(&h->srv);
}

static int on_watch(void *data, const struct agent_response *resp)
{
    struct harness *h = data;
    if (!h->any_status)
        assert_int_equal(resp->status, 200);
    assert_true(h->ndeliv < 8);
    int i = h->ndeliv++;
    h->statuses[i] = resp->status;
    snprintf(h->bodies[i], sizeof(h->bodies[i]), "%s", resp->body);
    h->indexes[i] = resp->index;
    snprintf(h->hashes[i], sizeof(h->hashes[i]), "%s", resp->content_hash);
    h->failures_seen[i] = watch_failures(h->w);
    h->reject_levels[i] = watch_reject_level(h->w, resp->body); /* the body as the reason */
    if (h->stop_in_cb) {
        watch_stop(h->w);
        h->w = NULL;
        return 0;
    }
    if (h->reject_prefix != NULL &&
        strncmp(resp->body, h->reject_prefix, strlen(h->reject_prefix)) == 0)
        return ERR_BAD_JSON;
    return 0;
}

/* ---- watch tests ---- */

static void test_index_blocking_delivers_only_changes(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {200, "X-Consul-Index: 5\r\n", "A", 0},
        {200, "X-Consul-Index: 5\r\n", "A", 0}, /* wait expired: nothing new */
        {200, "X-Consul-Index: 7\r\n", "B", 0}, /* index moved */
        {200, "X-Consul-Index: 7\r\n", "C", 0}, /* same index, different body */
    };
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script), 0, NULL);
    struct watch_spec spec = {.name = "health db",
                              .path = "/v1/health/connect/db?passing",
                              .block = WATCH_BY_INDEX,
                              .wait_ms = 2000};
    h.w = watch_start(h.agent, &spec, on_watch, &h);
    h.want_reqs = 5;
    run(&h, 3000);

    assert_int_equal(h.ndeliv, 3);
    assert_string_equal(h.bodies[0], "A");
    assert_int_equal(h.indexes[0], 5);
    assert_string_equal(h.bodies[1], "B");
    assert_int_equal(h.indexes[1], 7);
    assert_string_equal(h.bodies[2], "C");
    assert_int_equal(h.indexes[2], 7);
    assert_true(watch_has_data(h.w));
    assert_int_equal(watch_failures(h.w), 0);

    /* The first request carries no index (index 0 would return at once anyway). */
    assert_req_line(&h.srv, 0, "GET /v1/health/connect/db?passing&wait=2000ms HTTP/1.1");
    assert_req_line(&h.srv, 1, "GET /v1/health/connect/db?passing&index=5&wait=2000ms HTTP/1.1");
    assert_req_line(&h.srv, 2, "GET /v1/health/connect/db?passing&index=5&wait=2000ms HTTP/1.1");
    assert_req_line(&h.srv, 3, "GET /v1/health/connect/db?passing&index=7&wait=2000ms HTTP/1.1");
    assert_req_line(&h.srv, 4, "GET /v1/health/connect/db?passing&index=7&wait=2000ms HTTP/1.1");
    assert_null(strcasestr(h.srv.reqs[0], "X-Consul-Token"));
    /* One kept-alive connection served the whole run. */
    assert_int_equal(h.srv.accepts, 1);
    /* Successful loops are rate-limited too (50 ms apart at the client). The fake agent sees
     * arrivals, which a loaded machine delays now and then: one late arrival shortens the gap
     * after it, so the bound is on the whole run, with each gap still far from back to back. */
    assert_true(h.srv.req_ms[4] - h.srv.req_ms[0] >= 4 * 40);
    for (size_t i = 1; i < 5; i++)
        assert_true(h.srv.req_ms[i] - h.srv.req_ms[i - 1] >= 20);
    teardown(&h);
}

static void test_index_going_back_resets_to_zero(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {200, "X-Consul-Index: 10\r\n", "A", 0},
        {200, "X-Consul-Index: 3\r\n", "B", 0}, /* snapshot restore: index went back */
        {200, "X-Consul-Index: 3\r\n", "B", 0},
    };
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script), 0, NULL);
    struct watch_spec spec = {.name = "roots",
                              .path = "/v1/agent/connect/ca/roots",
                              .block = WATCH_BY_INDEX,
                              .wait_ms = 1000};
    h.w = watch_start(h.agent, &spec, on_watch, &h);
    h.want_reqs = 4;
    run(&h, 3000);

    assert_req_line(&h.srv, 0, "GET /v1/agent/connect/ca/roots?wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 1, "GET /v1/agent/connect/ca/roots?index=10&wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 2, "GET /v1/agent/connect/ca/roots?wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 3, "GET /v1/agent/connect/ca/roots?index=3&wait=1000ms HTTP/1.1");
    assert_int_equal(h.ndeliv, 2);
    assert_string_equal(h.bodies[0], "A");
    assert_string_equal(h.bodies[1], "B");
    assert_int_equal(h.indexes[1], 3);
    teardown(&h);
}

static void test_hash_blocking(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {200, "X-Consul-ContentHash: abc\r\n", "{\"Port\":1}", 0},
        {200, "X-Consul-ContentHash: abc\r\n", "{\"Port\":1}", 0},
        {200, "x-consul-contenthash: def\r\n", "{\"Port\":2}", 0},
    };
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script), 0, NULL);
    struct watch_spec spec = {.name = "service",
                              .path = "/v1/agent/service/web-proxy",
                              .block = WATCH_BY_HASH,
                              .wait_ms = 1500};
    h.w = watch_start(h.agent, &spec, on_watch, &h);
    h.want_reqs = 4;
    run(&h, 3000);

    assert_req_line(&h.srv, 0, "GET /v1/agent/service/web-proxy?wait=1500ms HTTP/1.1");
    assert_req_line(&h.srv, 1, "GET /v1/agent/service/web-proxy?hash=abc&wait=1500ms HTTP/1.1");
    assert_req_line(&h.srv, 2, "GET /v1/agent/service/web-proxy?hash=abc&wait=1500ms HTTP/1.1");
    assert_req_line(&h.srv, 3, "GET /v1/agent/service/web-proxy?hash=def&wait=1500ms HTTP/1.1");
    assert_int_equal(h.ndeliv, 2);
    assert_string_equal(h.hashes[0], "abc");
    assert_string_equal(h.bodies[1], "{\"Port\":2}");
    assert_string_equal(h.hashes[1], "def");
    teardown(&h);
}

static void test_errors_back_off_then_recover(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {404, NULL, "unknown service ID: web-proxy\nmore", 0}, /* re-registration window */
        {500, NULL, "CA not initialized yet", 0},
        {200, "X-Consul-Index: 2\r\n", "ok", 0},
    };
    watch_set_backoff_ms_for_testing(100, 200);
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script), 0, NULL);
    struct watch_spec spec = {.name = "svc",
                              .path = "/v1/agent/service/web-proxy",
                              .block = WATCH_BY_INDEX,
                              .wait_ms = 1000};
    h.w = watch_start(h.agent, &spec, on_watch, &h);
    h.want_reqs = 4;
    run(&h, 3000);
    watch_set_backoff_ms_for_testing(0, 0);

    /* Non-200 answers never reach the callback; the failures were counted before success. */
    assert_int_equal(h.ndeliv, 1);
    assert_string_equal(h.bodies[0], "ok");
    assert_int_equal(h.failures_seen[0], 2);
    assert_int_equal(watch_failures(h.w), 0);
    assert_true(watch_has_data(h.w));
    /* Retries keep the (still zero) index and never spin. */
    assert_req_line(&h.srv, 1, "GET /v1/agent/service/web-proxy?wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 2, "GET /v1/agent/service/web-proxy?wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 3, "GET /v1/agent/service/web-proxy?index=2&wait=1000ms HTTP/1.1");
    assert_true(h.srv.req_ms[1] - h.srv.req_ms[0] >= 40);
    assert_true(h.srv.req_ms[2] - h.srv.req_ms[1] >= 40);
    teardown(&h);
}

static void test_rejected_body_keeps_index(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {200, "X-Consul-Index: 5\r\n", "good1", 0},
        {200, "X-Consul-Index: 6\r\n", "garbage", 0},
        {200, "X-Consul-Index: 6\r\n", "good2", 0},
    };
    watch_set_backoff_ms_for_testing(100, 100);
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script), 0, NULL);
    h.reject_prefix = "garbage";
    struct watch_spec spec = {.name = "leaf",
                              .path = "/v1/agent/connect/ca/leaf/web",
                              .block = WATCH_BY_INDEX,
                              .wait_ms = 1000};
    h.w = watch_start(h.agent, &spec, on_watch, &h);
    h.want_reqs = 4;
    run(&h, 3000);
    watch_set_backoff_ms_for_testing(0, 0);

    assert_int_equal(h.ndeliv, 3);
    assert_string_equal(h.bodies[1], "garbage");
    assert_string_equal(h.bodies[2], "good2");
    assert_int_equal(h.failures_seen[2], 1);
    /* After the rejection the watch asked again from the last good index. */
    assert_req_line(&h.srv, 2, "GET /v1/agent/connect/ca/leaf/web?index=5&wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 3, "GET /v1/agent/connect/ca/leaf/web?index=6&wait=1000ms HTTP/1.1");
    assert_int_equal(watch_failures(h.w), 0);
    teardown(&h);
}

/*
 * With block_on_rejected (the discovery chain's watch), the request after a rejected answer
 * blocks on that answer's index. Asking from the last good index instead, as above, got the
 * rejected chain back from the agent's cache for ever (?cached does not refresh an entry no
 * one blocks on past its index): a router fixed after a refused one was never taken. The
 * same rejected body offered again is still rejected; the next one is taken.
 */
static void test_rejected_body_blocks_on_its_index(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {200, "X-Consul-Index: 5\r\n", "good1", 0},
        {200, "X-Consul-Index: 6\r\n", "garbage", 0},
        {200, "X-Consul-Index: 6\r\n", "garbage", 0},
        {200, "X-Consul-Index: 7\r\n", "good2", 0},
    };
    watch_set_backoff_ms_for_testing(100, 100);
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script), 0, NULL);
    h.reject_prefix = "garbage";
    struct watch_spec spec = {.name = "discovery chain db",
                              .method = "POST",
                              .path = "/v1/discovery-chain/db?cached",
                              .body = "{}",
                              .block = WATCH_BY_INDEX,
                              .wait_ms = 1000,
                              .block_on_rejected = 1};
    h.w = watch_start(h.agent, &spec, on_watch, &h);
    h.want_reqs = 5;
    run(&h, 3000);
    watch_set_backoff_ms_for_testing(0, 0);

    assert_int_equal(h.ndeliv, 4);
    assert_string_equal(h.bodies[1], "garbage");
    assert_string_equal(h.bodies[2], "garbage");
    assert_string_equal(h.bodies[3], "good2");
    assert_req_line(&h.srv, 1, "POST /v1/discovery-chain/db?cached&index=5&wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 2, "POST /v1/discovery-chain/db?cached&index=6&wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 3, "POST /v1/discovery-chain/db?cached&index=6&wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 4, "POST /v1/discovery-chain/db?cached&index=7&wait=1000ms HTTP/1.1");
    assert_int_equal(watch_failures(h.w), 0);
    teardown(&h);
}

/* The mesh config entry's watch: a 404 (no entry) is an answer that blocks on its index like a
 * 200; a 403 reaches the owner too, whose refusal backs off from the same position; any other
 * error never reaches it. */
static void test_deliver_403_404(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {404, "X-Consul-Index: 4\r\n", "Config entry not found for \"mesh\" / \"mesh\"", 0},
        {200, "X-Consul-Index: 9\r\n", "{\"Kind\":\"mesh\"}", 0},
        {404, "X-Consul-Index: 12\r\n", "Config entry not found for \"mesh\" / \"mesh\"", 0},
        {403, NULL, "Permission denied", 0},
        {500, NULL, "boom", 0},
    };
    watch_set_backoff_ms_for_testing(100, 100);
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script), 0, NULL);
    h.any_status = 1;
    h.reject_prefix = "Permission";
    struct watch_spec spec = {.name = "mesh",
                              .path = "/v1/config/mesh/mesh",
                              .block = WATCH_BY_INDEX,
                              .wait_ms = 1000,
                              .deliver_403_404 = 1};
    h.w = watch_start(h.agent, &spec, on_watch, &h);
    h.want_reqs = 6;
    run(&h, 3000);
    watch_set_backoff_ms_for_testing(0, 0);

    assert_int_equal(h.ndeliv, 4);
    assert_int_equal(h.statuses[0], 404);
    assert_int_equal(h.indexes[0], 4);
    assert_int_equal(h.statuses[1], 200);
    assert_int_equal(h.statuses[2], 404);
    assert_int_equal(h.statuses[3], 403);
    assert_req_line(&h.srv, 0, "GET /v1/config/mesh/mesh?wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 1, "GET /v1/config/mesh/mesh?index=4&wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 2, "GET /v1/config/mesh/mesh?index=9&wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 3, "GET /v1/config/mesh/mesh?index=12&wait=1000ms HTTP/1.1");
    /* The refused 403 and the 500 kept the position and counted as failures. */
    assert_req_line(&h.srv, 4, "GET /v1/config/mesh/mesh?index=12&wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 5, "GET /v1/config/mesh/mesh?index=12&wait=1000ms HTTP/1.1");
    assert_int_equal(watch_failures(h.w), 2);
    teardown(&h);
}

static void test_stop_inside_callback(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {200, "X-Consul-Index: 1\r\n", "once", 0},
        {200, "X-Consul-Index: 2\r\n", "never", 0},
    };
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script), 0, NULL);
    h.stop_in_cb = 1;
    struct watch_spec spec = {.name = "x", .path = "/v1/x", .block = WATCH_BY_INDEX};
    h.w = watch_start(h.agent, &spec, on_watch, &h);
    h.expect_timeout = 1; /* run a while to see that nothing else happens */
    run(&h, 200);
    assert_int_equal(h.ndeliv, 1);
    assert_null(h.w);
    assert_int_equal(fake_nreq(&h.srv), 1);
    teardown(&h);
}

/*
 * Consul's blocking-query rules: an X-Consul-Index of 0 counts as 1. The watch used to keep 0
 * and ask with no index at all, a query that can never block; and an answer after the zeros
 * that only moved the index (same body) was delivered again as news.
 */
static void test_index_zero_counts_as_one(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {200, "X-Consul-Index: 5\r\n", "A", 0},
        {200, "X-Consul-Index: 0\r\n", "A", 0}, /* a Consul bug, or a hop: lower than 5 */
        {200, "X-Consul-Index: 0\r\n", "A", 0}, /* asked again from no index */
        {200, "X-Consul-Index: 7\r\n", "A", 0}, /* a real index again, same data */
        {200, "X-Consul-Index: 8\r\n", "B", 0},
    };
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script), 0, NULL);
    struct watch_spec spec = {.name = "roots",
                              .path = "/v1/agent/connect/ca/roots",
                              .block = WATCH_BY_INDEX,
                              .wait_ms = 1000};
    h.w = watch_start(h.agent, &spec, on_watch, &h);
    h.want_reqs = 6;
    run(&h, 4000);

    assert_req_line(&h.srv, 0, "GET /v1/agent/connect/ca/roots?wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 1, "GET /v1/agent/connect/ca/roots?index=5&wait=1000ms HTTP/1.1");
    /* Lower than 5: start over from 0, that is with no index. */
    assert_req_line(&h.srv, 2, "GET /v1/agent/connect/ca/roots?wait=1000ms HTTP/1.1");
    /* 0 counts as 1, asked no sooner than a second later. */
    assert_req_line(&h.srv, 3, "GET /v1/agent/connect/ca/roots?index=1&wait=1000ms HTTP/1.1");
    assert_true(h.srv.req_ms[3] - h.srv.req_ms[2] >= 900);
    assert_req_line(&h.srv, 4, "GET /v1/agent/connect/ca/roots?index=7&wait=1000ms HTTP/1.1");
    assert_req_line(&h.srv, 5, "GET /v1/agent/connect/ca/roots?index=8&wait=1000ms HTTP/1.1");
    /* Only the two bodies: neither the zeros nor index 7 with the same body were news. */
    assert_int_equal(h.ndeliv, 2);
    assert_string_equal(h.bodies[0], "A");
    assert_string_equal(h.bodies[1], "B");
    assert_int_equal(watch_failures(h.w), 0);
    teardown(&h);
}

/*
 * One line per bad answer: the owner logs why it rejects an answer at watch_reject_level(),
 * an error the first time and debug while the agent keeps sending the same bad answer, an
 * error again for another reason or after a failure of another kind. Each retry of a bad
 * answer used to log an error.
 */
static void test_reject_level_once_per_streak(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {200, "X-Consul-Index: 5\r\n", "good1", 0},
        {200, "X-Consul-Index: 6\r\n", "garbage", 0},
        {200, "X-Consul-Index: 6\r\n", "garbage", 0},
        {200, "X-Consul-Index: 6\r\n", "garbage, another", 0},
        {500, NULL, "oops", 0},
        {200, "X-Consul-Index: 6\r\n", "garbage, another", 0},
        {200, "X-Consul-Index: 6\r\n", "good2", 0},
    };
    watch_set_backoff_ms_for_testing(60, 60);
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script), 0, NULL);
    h.reject_prefix = "garbage";
    struct watch_spec spec = {.name = "leaf",
                              .path = "/v1/agent/connect/ca/leaf/web",
                              .block = WATCH_BY_INDEX,
                              .wait_ms = 1000};
    h.w = watch_start(h.agent, &spec, on_watch, &h);
    h.want_reqs = 8;
    run(&h, 3000);
    watch_set_backoff_ms_for_testing(0, 0);

    assert_int_equal(h.ndeliv, 6);
    assert_int_equal(h.reject_levels[0], LOG_LEVEL_ERROR); /* good1: healthy */
    assert_int_equal(h.reject_levels[1], LOG_LEVEL_ERROR); /* the first bad answer */
    assert_int_equal(h.reject_levels[2], LOG_LEVEL_DEBUG); /* the same fault again */
    assert_int_equal(h.reject_levels[3], LOG_LEVEL_ERROR); /* another reason: news */
    assert_int_equal(h.reject_levels[4], LOG_LEVEL_ERROR); /* after a 500: news again */
    assert_string_equal(h.bodies[5], "good2");
    assert_int_equal(watch_failures(h.w), 0);
    assert_int_equal(watch_reject_level(NULL, "x"), LOG_LEVEL_ERROR);
    teardown(&h);
}

/*
 * An answer over the body cap came from the agent: the agent is not unreachable. It used to
 * count as a transport error, so the tracker logged "agent unreachable" (and then "reachable
 * again" at the next answer of any watch) for what is a bad answer of one watch.
 */
static void test_too_large_answer_is_not_an_outage(void **state)
{
    (void)state;
    struct watch_reach *r = watch_reach_new("127.0.0.1:1");
    struct agent_response big = {.status = 0,
                                 .error = "response body too large",
                                 .body = "",
                                 .content_hash = "",
                                 .default_acl_policy = "",
                                 .body_too_large = 1};
    watch_reach_note(r, &big);
    assert_false(watch_reach_down(r));
    struct agent_response down = big;
    down.body_too_large = 0;
    down.error = "Connection refused";
    watch_reach_note(r, &down);
    assert_true(watch_reach_down(r));
    /* ... and it does end an outage, like any answer. */
    watch_reach_note(r, &big);
    assert_false(watch_reach_down(r));
    watch_reach_free(r);
}

/* Runs <fn> with stderr in a temporary file at level INFO; returns what was written (freed by
 * the caller). */
static char *capture_stderr(void (*fn)(void))
{
    FILE *tmp = tmpfile();
    assert_non_null(tmp);
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    assert_true(saved >= 0);
    assert_true(dup2(fileno(tmp), STDERR_FILENO) >= 0);
    enum log_level level = log_min_level;
    log_min_level = LOG_LEVEL_INFO;
    fn();
    log_min_level = level;
    fflush(stderr);
    assert_true(dup2(saved, STDERR_FILENO) >= 0);
    close(saved);
    long n = ftell(tmp);
    char *out = xcalloc(1, (size_t)(n > 0 ? n : 0) + 1);
    rewind(tmp);
    if (n > 0)
        assert_int_equal(fread(out, 1, (size_t)n, tmp), (size_t)n);
    fclose(tmp);
    return out;
}

static size_t count_of(const char *text, const char *what)
{
    size_t n = 0;
    for (const char *p = text; (p = strstr(p, what)) != NULL; p += strlen(what))
        n++;
    return n;
}

static void flap_three_times(void)
{
    struct watch_reach *r = watch_reach_new("127.0.0.1:1");
    struct agent_response reset = {.status = 0,
                                   .error = "Recv failure: Connection reset by peer",
                                   .body = "",
                                   .content_hash = "",
                                   .default_acl_policy = ""};
    struct agent_response ok = reset;
    ok.status = 200;
    ok.error = "";
    for (int i = 0; i < 3; i++) {
        watch_reach_note(r, &reset);
        assert_true(watch_reach_down(r));
        watch_reach_note(r, &ok);
        assert_false(watch_reach_down(r));
    }
    watch_reach_free(r);
}

/*
 * One query that fails alone (reset by a hop, or held past its timeout) while the agent
 * answers the others took the tracker down and up again at each retry, and each time it wrote
 * "unreachable" and "reachable again": the lines now come at most once a minute.
 */
static void test_reach_lines_at_most_once_a_minute(void **state)
{
    (void)state;
    char *out = capture_stderr(flap_three_times);
    assert_int_equal(count_of(out, "unreachable (Recv failure: Connection reset by peer)"), 1);
    assert_int_equal(count_of(out, "reachable again"), 1);
    free(out);
}

static void test_poll_mode(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {200, NULL, "[1]", 0},
        {200, NULL, "[1]", 0},
        {200, NULL, "[2]", 0},
    };
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script), 0, NULL);
    struct watch_spec spec = {.name = "query",
                              .path = "/v1/query/db/execute?connect=true",
                              .block = WATCH_POLL,
                              .poll_ms = 60};
    h.w = watch_start(h.agent, &spec, on_watch, &h);
    h.want_reqs = 4;
    run(&h, 3000);
    assert_req_line(&h.srv, 1, "GET /v1/query/db/execute?connect=true HTTP/1.1");
    assert_int_equal(h.ndeliv, 2);
    assert_string_equal(h.bodies[1], "[2]");
    assert_true(h.srv.req_ms[1] - h.srv.req_ms[0] >= 50);
    teardown(&h);
}

static void test_unix_socket(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {200, "X-Consul-Index: 1\r\n", "over unix", 0},
    };
    struct harness h;
    setup(&h, script, ARRAY_SIZE(script), 1, NULL);
    struct watch_spec spec = {.name = "roots",
                              .path = "/v1/agent/connect/ca/roots",
                              .block = WATCH_BY_INDEX,
                              .wait_ms = 1000};
    h.w = watch_start(h.agent, &spec, on_watch, &h);
    h.want_reqs = 2;
    run(&h, 3000);
    assert_int_equal(h.ndeliv, 1);
    assert_string_equal(h.bodies[0], "over unix");
    assert_req_line(&h.srv, 1, "GET /v1/agent/connect/ca/roots?index=1&wait=1000ms HTTP/1.1");
    assert_non_null(strcasestr(h.srv.reqs[0], "\r\nHost: localhost\r\n"));
    teardown(&h);
}

/* ---- agent tests ---- */

struct seen {
    int n;
    long status[4];
    char error[4][128];
    char body[4][64];
    size_t body_len[4];
    uint64_t index[4];
    char acl[4][16];
    int too_large[4];
};

static struct seen seen;

static void on_resp(void *data, const struct agent_response *resp)
{
    int i = (int)(intptr_t)data;
    assert_true(i >= 0 && i < 4);
    seen.n++;
    seen.status[i] = resp->status;
    snprintf(seen.error[i], sizeof(seen.error[i]), "%s", resp->error);
    snprintf(seen.body[i], sizeof(seen.body[i]), "%s", resp->body);
    seen.body_len[i] = resp->body_len;
    seen.index[i] = resp->index;
    seen.too_large[i] = resp->body_too_large;
    snprintf(seen.acl[i], sizeof(seen.acl[i]), "%s", resp->default_acl_policy);
}

static int all_seen(struct harness *h)
{
    return seen.n >= h->ndeliv; /* ndeliv holds the number of requests made here */
}

static void test_body_cap(void **state)
{
    (void)state;
    char *big = xmalloc(4097);
    memset(big, 'x', 4096);
    big[4096] = '\0';
    char *fits = xmalloc(1001);
    memset(fits, 'y', 1000);
    fits[1000] = '\0';
    const struct fake_resp script[] = {
        {200, NULL, big, 0}, /* Content-Length says it is too big */
        {200, NULL, big, 1}, /* chunked: only counting the bytes can tell */
        {200, NULL, fits, 0},
    };
    struct harness h;
    struct agent_opts o = {.ssl_verify = 1, .max_body_bytes = 1024};
    memset(&seen, 0, sizeof(seen));
    setup(&h, script, ARRAY_SIZE(script), 0, NULL);
    agent_free(h.agent);
    h.agent = make_agent(&h, &o);
    /* One after another, so the script order matches. */
    agent_request(h.agent, "GET", "/v1/big", NULL, 2000, on_resp, (void *)(intptr_t)0);
    h.ndeliv = 1;
    h.done = all_seen;
    run(&h, 3000);
    agent_request(h.agent, "GET", "/v1/big", NULL, 2000, on_resp, (void *)(intptr_t)1);
    h.ndeliv = 2;
    run(&h, 3000);
    agent_request(h.agent, "GET", "/v1/fits", NULL, 2000, on_resp, (void *)(intptr_t)2);
    h.ndeliv = 3;
    run(&h, 3000);

    assert_int_equal(seen.status[0], 0);
    assert_string_equal(seen.error[0], "response body too large");
    assert_int_equal(seen.body_len[0], 0);
    assert_true(seen.too_large[0]);
    assert_int_equal(seen.status[1], 0);
    assert_true(seen.too_large[1]);
    assert_false(seen.too_large[2]);
    assert_string_equal(seen.error[1], "response body too large");
    assert_int_equal(seen.status[2], 200);
    assert_int_equal(seen.body_len[2], 1000);
    assert_string_equal(seen.error[2], "");
    teardown(&h);
    free(big);
    free(fits);
}

static void test_token_body_and_headers(void **state)
{
    (void)state;
    static const struct fake_resp script[] = {
        {200, "x-consul-index: 42\r\nX-CONSUL-DEFAULT-ACL-POLICY: deny\r\n",
         "{\"Authorized\":true}", 0},
    };
    struct harness h;
    memset(&seen, 0, sizeof(seen));
    setup(&h, script, ARRAY_SIZE(script), 0, NULL);
    agent_free(h.agent);
    char addr[64];
    snprintf(addr, sizeof(addr), "http://127.0.0.1:%d/consul/", h.srv.port);
    struct agent_opts o = {.addr = addr, .token = "s3cr3t-token", .ssl_verify = 1};
    h.agent = make_agent(&h, &o);
    assert_string_equal(agent_addr(h.agent), addr);
    agent_request(h.agent, "POST", "/v1/agent/connect/authorize", "{\"Target\":\"db\"}", 2000,
                  on_resp, (void *)(intptr_t)0);
    h.ndeliv = 1;
    h.done = all_seen;
    run(&h, 3000);

    assert_int_equal(seen.status[0], 200);
    assert_int_equal(seen.index[0], 42);
    assert_string_equal(seen.acl[0], "deny");
    assert_string_equal(seen.body[0], "{\"Authorized\":true}");
    const char *req = h.srv.reqs[0];
    assert_req_line(&h.srv, 0, "POST /consul/v1/agent/connect/authorize HTTP/1.1");
    assert_non_null(strstr(req, "\r\nX-Consul-Token: s3cr3t-token\r\n"));
    assert_non_null(strstr(req, "\r\nContent-Type: application/json\r\n"));
    assert_non_null(strstr(req, "\r\n\r\n{\"Target\":\"db\"}"));
    /* The token travels in its header only. */
    assert_ptr_equal(strstr(req, "s3cr3t"), strstr(req, "X-Consul-Token: ") + 16);
    teardown(&h);
}

static void test_cancel_and_transport_error(void **state)
{
    (void)state;
    struct harness h;
    memset(&seen, 0, sizeof(seen));
    setup(&h, NULL, 0, 0, NULL);
    /* A held request cancelled before it ends never calls back. */
    struct agent_req *r =
        agent_request(h.agent, "GET", "/v1/held", NULL, 2000, on_resp, (void *)(intptr_t)0);
    h.want_reqs = 1;
    run(&h, 3000);
    agent_cancel(r);
    agent_free(h.agent);

    /* Nothing listens on a port we just closed: status 0 with curl's reason. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof(sin);
    assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sin, &sl), 0);
    close(fd);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", ntohs(sin.sin_port));
    struct agent_opts o = {.addr = addr, .ssl_verify = 1};
    h.agent = make_agent(&h, &o);
    agent_request(h.agent, "GET", "/v1/x", NULL, 2000, on_resp, (void *)(intptr_t)1);
    h.want_reqs = 0;
    h.ndeliv = 1;
    h.done = all_seen;
    run(&h, 3000);
    assert_int_equal(seen.n, 1);
    assert_int_equal(seen.status[1], 0);
    assert_true(seen.error[1][0] != '\0');
    teardown(&h);
}

static struct agent_req *pair[2];

static void on_resp_cancel_other(void *data, const struct agent_response *resp)
{
    int i = (int)(intptr_t)data;
    on_resp(data, resp);
    pair[i] = NULL;
    if (pair[1 - i] != NULL) {
        agent_cancel(pair[1 - i]);
        pair[1 - i] = NULL;
    }
}

/*
 * Two held requests time out together (often within one curl call, so the second is already
 * queued for its callback): the first callback cancels the second, which must then never
 * call back, whichever queue it was on.
 */
static void test_callback_may_cancel_another(void **state)
{
    (void)state;
    struct harness h;
    memset(&seen, 0, sizeof(seen));
    setup(&h, NULL, 0, 0, NULL);
    for (int i = 0; i < 2; i++)
        pair[i] = agent_request(h.agent, "GET", "/v1/held", NULL, 150, on_resp_cancel_other,
                                (void *)(intptr_t)i);
    h.expect_timeout = 1;
    run(&h, 400);
    assert_int_equal(seen.n, 1);
    int i = seen.status[0] == 0 && seen.error[0][0] != '\0' ? 0 : 1;
    assert_int_equal(seen.status[i], 0);
    assert_non_null(strcasestr(seen.error[i], "timed out"));
    teardown(&h);
}

static int saw_tls_hello(struct harness *h)
{
    pthread_mutex_lock(&h->srv.mu);
    int yes = h->srv.first_len > 0 &&
              memmem(h->srv.first_bytes, h->srv.first_len, "consul.example", 14) != NULL;
    pthread_mutex_unlock(&h->srv.mu);
    return yes;
}

/* ---- reachability: an agent on its way out ---- */

/*
 * A server run from the loop's check timer (no thread): the first request of each path is
 * answered 200 with index 1, later ones are held so the test can end them as it likes.
 */
struct dying_agent {
    int lfd;
    int fds[8];
    char bufs[8][2048];
    size_t lens[8];
    int held_a, held_b; /* fds of the held /v1/a and /v1/b requests, or -1 */
    int answered_a, answered_b;
    struct watch *wa, *wb;
    struct watch_reach *reach;
    int phase; /* 0: until both are held; 1: until a's transport error; 2: until b's 500 */
};

static void dying_serve(struct dying_agent *d)
{
    int fd = accept4(d->lfd, NULL, NULL, SOCK_NONBLOCK);
    for (int i = 0; fd >= 0 && i < 8; i++) {
        if (d->fds[i] < 0) {
            d->fds[i] = fd;
            d->lens[i] = 0;
            fd = -1;
        }
    }
    if (fd >= 0)
        close(fd);
    for (int i = 0; i < 8; i++) {
        if (d->fds[i] < 0 || d->fds[i] == d->held_a || d->fds[i] == d->held_b)
            continue;
        ssize_t r = read(d->fds[i], d->bufs[i] + d->lens[i], sizeof(d->bufs[i]) - 1 - d->lens[i]);
        if (r <= 0)
            continue;
        d->lens[i] += (size_t)r;
        d->bufs[i][d->lens[i]] = '\0';
        char *end = strstr(d->bufs[i], "\r\n\r\n");
        if (end == NULL)
            continue;
        int is_a = strncmp(d->bufs[i], "GET /v1/a", 9) == 0;
        int *answered = is_a ? &d->answered_a : &d->answered_b;
        d->lens[i] = 0;
        if (!*answered) {
            static const char ok[] = "HTTP/1.1 200 OK\r\nX-Consul-Index: 1\r\n"
                                     "Content-Length: 1\r\n\r\nx";
            send_all(d->fds[i], ok, sizeof(ok) - 1);
            *answered = 1;
        } else if (is_a) {
            d->held_a = d->fds[i];
        } else {
            d->held_b = d->fds[i];
        }
    }
}

static int dying_done(struct harness *h)
{
    struct dying_agent *d = h->ctx;
    if (d->lfd >= 0)
        dying_serve(d);
    switch (d->phase) {
    case 0:
        return d->held_a >= 0 && d->held_b >= 0;
    case 1:
        return watch_failures(d->wa) >= 1 && watch_reach_down(d->reach);
    default:
        return watch_failures(d->wb) >= 1;
    }
}

static int accept_any(void *data, const struct agent_response *resp)
{
    (void)data;
    (void)resp;
    return 0;
}

/*
 * A client agent stopped with SIGTERM answers the blocking queries it still holds with HTTP
 * 500 while it already refuses new connections. Such an answer, to a request sent before the
 * outage began, once ended the outage ("reachable again") a moment after it began, and the
 * next refused connection logged "unreachable" a second time for the same outage.
 */
static void test_reach_ignores_answers_sent_before_the_outage(void **state)
{
    (void)state;
    struct harness h;
    struct dying_agent d;
    memset(&d, 0, sizeof(d));
    memset(&h, 0, sizeof(h));
    for (int i = 0; i < 8; i++)
        d.fds[i] = -1;
    d.held_a = d.held_b = -1;
    d.lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof(sin);
    assert_int_equal(bind(d.lfd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(d.lfd, (struct sockaddr *)&sin, &sl), 0);
    assert_int_equal(listen(d.lfd, 8), 0);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", ntohs(sin.sin_port));
    h.loop = loop_new();
    assert_non_null(h.loop);
    struct agent_opts o = {.addr = addr, .ssl_verify = 1};
    h.agent = make_agent(&h, &o);
    d.reach = watch_reach_new(addr);
    struct watch_spec a = {
        .name = "a", .path = "/v1/a", .block = WATCH_BY_INDEX, .wait_ms = 10000, .reach = d.reach};
    struct watch_spec b = a;
    b.name = "b";
    b.path = "/v1/b";
    d.wa = watch_start(h.agent, &a, accept_any, NULL);
    d.wb = watch_start(h.agent, &b, accept_any, NULL);
    h.ctx = &d;
    h.done = dying_done;
    run(&h, 5000);

    /* The agent goes: no new connections, and a's held query is cut without an answer. */
    close(d.lfd);
    d.lfd = -1;
    shutdown(d.held_a, SHUT_RDWR);
    d.phase = 1;
    run(&h, 5000);
    assert_true(watch_reach_down(d.reach));

    /* b's query, sent before the outage, is answered 500 on the agent's way out. */
    static const char err[] = "HTTP/1.1 500 X\r\nContent-Length: 3\r\n\r\nbye";
    send_all(d.held_b, err, sizeof(err) - 1);
    d.phase = 2;
    run(&h, 5000);
    assert_true(watch_reach_down(d.reach));

    watch_stop(d.wa);
    watch_stop(d.wb);
    watch_reach_free(d.reach);
    agent_free(h.agent);
    loop_free(h.loop);
    for (int i = 0; i < 8; i++)
        if (d.fds[i] >= 0)
            close(d.fds[i]);
}

/*
 * With tls_server_name the connection still goes to the address's host and port, but the TLS
 * hello names the server name (SNI; curl verifies the certificate against the same name).
 */
static void test_tls_server_name_routes_to_address(void **state)
{
    (void)state;
    struct harness h;
    memset(&seen, 0, sizeof(seen));
    setup(&h, NULL, 0, 0, NULL);
    agent_free(h.agent);
    char addr[64];
    snprintf(addr, sizeof(addr), "https://127.0.0.1:%d", h.srv.port);
    struct agent_opts o = {.addr = addr, .tls_server_name = "consul.example:8501", .ssl_verify = 1};
    h.agent = make_agent(&h, &o);
    struct agent_req *r =
        agent_request(h.agent, "GET", "/v1/x", NULL, 2000, on_resp, (void *)(intptr_t)0);
    h.done = saw_tls_hello;
    run(&h, 3000);
    if (seen.n == 0)
        agent_cancel(r);
    teardown(&h);
}

static void test_bad_addresses(void **state)
{
    (void)state;
    struct loop *loop = loop_new();
    char err[256];
    static const char *const bad[] = {"ftp://example:21", "tcp://127.0.0.1:8500",
                                      "unix://",          "http://",
                                      "localhost",        "http://u:p@h:1"};
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        struct agent_opts o = {.addr = bad[i], .ssl_verify = 1};
        err[0] = '\0';
        assert_null(agent_new(loop, &o, err, sizeof(err)));
        if (strstr(err, bad[i]) == NULL)
            fail_msg("error for \"%s\" does not name it: %s", bad[i], err);
    }
    static const char *const good[] = {NULL,
                                       "localhost:8500",
                                       "[::1]:8500",
                                       "http://consul:8500/prefix",
                                       "https://consul:8501",
                                       "https://consul",
                                       "unix:///run/consul/http.sock"};
    for (size_t i = 0; i < ARRAY_SIZE(good); i++) {
        struct agent_opts o = {.addr = good[i], .tls_server_name = "x.example", .ssl_verify = 1};
        struct agent *a = agent_new(loop, &o, err, sizeof(err));
        if (a == NULL)
            fail_msg("\"%s\" rejected: %s", good[i] ? good[i] : "(default)", err);
        agent_free(a);
    }
    struct agent_opts o = {.addr = "https://h:1", .client_cert = "c.pem", .ssl_verify = 1};
    assert_null(agent_new(loop, &o, err, sizeof(err)));
    assert_non_null(strstr(err, "client_key"));
    loop_free(loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_index_blocking_delivers_only_changes),
        cmocka_unit_test(test_index_going_back_resets_to_zero),
        cmocka_unit_test(test_hash_blocking),
        cmocka_unit_test(test_errors_back_off_then_recover),
        cmocka_unit_test(test_rejected_body_keeps_index),
        cmocka_unit_test(test_rejected_body_blocks_on_its_index),
        cmocka_unit_test(test_deliver_403_404),
        cmocka_unit_test(test_stop_inside_callback),
        cmocka_unit_test(test_index_zero_counts_as_one),
        cmocka_unit_test(test_reject_level_once_per_streak),
        cmocka_unit_test(test_too_large_answer_is_not_an_outage),
        cmocka_unit_test(test_reach_lines_at_most_once_a_minute),
        cmocka_unit_test(test_poll_mode),
        cmocka_unit_test(test_unix_socket),
        cmocka_unit_test(test_body_cap),
        cmocka_unit_test(test_token_body_and_headers),
        cmocka_unit_test(test_cancel_and_transport_error),
        cmocka_unit_test(test_callback_may_cancel_another),
        cmocka_unit_test(test_reach_ignores_answers_sent_before_the_outage),
        cmocka_unit_test(test_tls_server_name_routes_to_address),
        cmocka_unit_test(test_bad_addresses),
    };
    assert_int_equal(agent_global_init(), 0);
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    agent_global_cleanup();
    return rc;
}
