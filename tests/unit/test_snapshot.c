/*
 * test_snapshot: which differences between two snapshots re-check open inbound connections.
 *
 * Regression (issue 7, defect 6): workers re-evaluated their open inbound sessions only when
 * the intention table changed, so a new trust domain of the roots, switching
 * verify_trust_domain on, or switching the authorization mode left connections open that a new
 * caller would be refused under. snapshot_inbound_change() names every such input; the
 * snapshots here are built on the stack with only the fields it reads.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "decode.h"
#include "intent.h"
#include "snapshot.h"
#include "util.h"

#define TD "11111111-2222-3333-4444-555555555555.consul"

static struct dec_intention ix(const char *src, const char *action)
{
    struct dec_intention d = {
        .id = "",
        .description = "",
        .source_peer = "",
        .source_sameness_group = "",
        .source_partition = "",
        .source_ns = "default",
        .source_name = (char *)src,
        .destination_ns = "default",
        .destination_name = "db",
        .action = (char *)action,
        .has_permissions = 0,
        .precedence = 9,
    };
    return d;
}

/* A snapshot of service db in trust domain TD, verifying it, with <intents> (not owned). */
static struct snapshot base(struct intent_table *intents)
{
    struct snapshot s;
    memset(&s, 0, sizeof(s));
    s.trust_domain = TD;
    s.cfg.service = "db";
    s.cfg.verify_trust_domain = 1;
    s.intents = intents;
    return s;
}

static void test_nothing_that_decides_changed(void **state)
{
    (void)state;
    struct dec_intention v[] = {ix("web", "allow")};
    struct intent_table *a = intent_table_new(v, 1, 0);
    struct intent_table *b = intent_table_new(v, 1, 0); /* equal, not the same object */
    struct snapshot prev = base(a), next = base(b);
    next.generation = 7;
    next.cfg.idle_timeout_ms = 1000; /* no bearing on who may stay connected */
    assert_null(snapshot_inbound_change(&prev, &next));
    next.trust_domain = "11111111-2222-3333-4444-555555555555.CONSUL"; /* case is no change */
    assert_null(snapshot_inbound_change(&prev, &next));
    intent_table_unref(a);
    intent_table_unref(b);
}

static void test_each_input_that_decides(void **state)
{
    (void)state;
    struct dec_intention allow[] = {ix("web", "allow")};
    struct dec_intention deny[] = {ix("web", "deny")};
    struct intent_table *t = intent_table_new(allow, 1, 0);
    struct intent_table *t_deny = intent_table_new(deny, 1, 0);
    struct intent_table *t_default_allow = intent_table_new(allow, 1, 1);
    struct snapshot prev = base(t), next;

    next = base(t_deny);
    assert_string_equal(snapshot_inbound_change(&prev, &next), "intentions");
    /* The default policy (the agent's default intention policy or ACL default) decides every
     * caller no rule matches. */
    next = base(t_default_allow);
    assert_string_equal(snapshot_inbound_change(&prev, &next), "intentions");
    next = base(t);
    next.trust_domain = "99999999-0000-0000-0000-000000000000.consul";
    assert_string_equal(snapshot_inbound_change(&prev, &next), "trust domain");
    next = base(t);
    prev.cfg.verify_trust_domain = 0; /* switched on */
    assert_string_equal(snapshot_inbound_change(&prev, &next), "verify_trust_domain");
    prev = base(t);
    next.cfg.authorize_with_agent = 1;
    assert_string_equal(snapshot_inbound_change(&prev, &next), "authorization");
    next = base(t);
    next.cfg.service = "api";
    assert_string_equal(snapshot_inbound_change(&prev, &next), "service");
    intent_table_unref(t);
    intent_table_unref(t_deny);
    intent_table_unref(t_default_allow);
}

/* The control thread's upstream targets and a snapshot's share one copy and one dispose:
 * the copy owns its strings, shares the endpoint set, and has one even before the first
 * health answer. */
static void test_target_copy_and_dispose(void **state)
{
    (void)state;
    struct endpoint_set *eps = endpoint_set_new(NULL, 0);
    struct snap_target src = {.id = "db",
                              .service = "db",
                              .ns = "",
                              .partition = "",
                              .datacenter = "dc1",
                              .sni = "db.default.dc1.internal.example.consul",
                              .connect_timeout_ms = 250,
                              .endpoints = eps};
    struct snap_target a, b;
    snap_target_copy(&a, &src);
    assert_ptr_not_equal(a.id, src.id);
    assert_string_equal(a.sni, src.sni);
    assert_int_equal(a.connect_timeout_ms, 250);
    assert_ptr_equal(a.endpoints, eps);
    assert_int_equal(atomic_load(&eps->refs), 2);
    src.endpoints = NULL;
    snap_target_copy(&b, &src);
    assert_non_null(b.endpoints);
    assert_int_equal(b.endpoints->n, 0);
    snap_target_dispose(&a);
    assert_null(a.id);
    assert_int_equal(atomic_load(&eps->refs), 1);
    snap_target_dispose(&b);
    snap_target_dispose(&a); /* a disposed target may be disposed again */
    endpoint_set_unref(eps);
}

/* Envoy's exposed check listeners take this host and the agent only; Expose.Paths anyone. */
static void test_expose_sources(void **state)
{
    (void)state;
    struct snap_expose *v = xcalloc(2, sizeof(*v));
    v[0].port = 21500;
    v[1].port = 21510;
    v[1].from_checks = 1;
    struct limit_state *l = limit_state_new();
    struct snap_exposes *x = snap_exposes_new(v, 2, l);
    snprintf(x->agent_addr, sizeof(x->agent_addr), "10.0.0.7");
    static const struct {
        const char *source, *local;
        int paths, checks;
    } cases[] = {
        {"192.0.2.9", "10.0.0.5", 1, 0},  /* another host */
        {"127.0.0.1", "127.0.0.1", 1, 1}, /* loopback */
        {"127.3.4.5", "10.0.0.5", 1, 1},  /* all of 127.0.0.0/8 */
        {"::1", "::1", 1, 1},
        {"::ffff:127.0.0.1", "::ffff:127.0.0.1", 1, 1},
        {"10.0.0.5", "10.0.0.5", 1, 1},        /* this host, to our own address */
        {"::ffff:10.0.0.5", "10.0.0.5", 1, 1}, /* the same, mapped */
        {"10.0.0.7", "10.0.0.5", 1, 1},        /* the agent */
        {"::ffff:10.0.0.7", "::ffff:10.0.0.5", 1, 1},
        {"10.0.0.70", "10.0.0.5", 1, 0}, /* not the agent: whole addresses compared */
        {"fe80::1", "10.0.0.5", 1, 0},
        {"", "", 1, 0}, /* no address (a unix socket) */
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        if (snap_expose_source_ok(x, &v[0], cases[i].source, cases[i].local) != cases[i].paths ||
            snap_expose_source_ok(x, &v[1], cases[i].source, cases[i].local) != cases[i].checks)
            fail_msg("case %zu: %s -> %s", i, cases[i].source, cases[i].local);
    }
    /* The agent's address unknown: this host only. */
    x->agent_addr[0] = '\0';
    assert_false(snap_expose_source_ok(x, &v[1], "10.0.0.7", "10.0.0.5"));
    assert_true(snap_expose_source_ok(x, &v[1], "10.0.0.5", "10.0.0.5"));
    snap_exposes_unref(x);
    limit_state_unref(l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nothing_that_decides_changed),
        cmocka_unit_test(test_expose_sources),
        cmocka_unit_test(test_each_input_that_decides),
        cmocka_unit_test(test_target_copy_and_dispose),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
