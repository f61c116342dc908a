/*
 * intent: intentions compiled for in-memory evaluation.
 *
 * Evaluation is Consul's own (consul-api.md 2.4.3, connect.AuthorizeIntentionTarget): walk the
 * rules in precedence order and let the first whose source matches decide, with no
 * fall-through. The table is built once on the control thread and then only read; its
 * reference count is the one mutable field, hence atomic.
 */
#include "intent.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

struct intent_table {
    atomic_uint refs;
    int default_allow;
    size_t n;
    struct intent_rule *rules;
};

#define WILDCARD "*"

static const char *or_default(const char *s)
{
    return s == NULL || s[0] == '\0' ? "default" : s;
}

static const char *or_empty(const char *s)
{
    return s != NULL ? s : "";
}

/* Sort key: precedence descending, then the agent's order, which makes qsort stable. */
struct order {
    int precedence;
    size_t index;
};

static int order_cmp(const void *pa, const void *pb)
{
    const struct order *a = pa, *b = pb;
    if (a->precedence != b->precedence)
        return a->precedence > b->precedence ? -1 : 1;
    return a->index < b->index ? -1 : a->index > b->index;
}

static void rule_init(struct intent_rule *r, const struct dec_intention *d)
{
    int has_permissions = d->has_permissions != 0;
    r->id = xstrdup(or_empty(d->id));
    r->description = xstrdup(or_empty(d->description));
    r->src_partition = xstrdup(or_default(d->source_partition));
    r->src_ns = xstrdup(or_default(d->source_ns));
    r->src_name = xstrdup(or_empty(d->source_name));
    r->src_sameness = xstrdup(or_empty(d->source_sameness_group));
    r->dst_ns = xstrdup(or_default(d->destination_ns));
    r->dst_name = xstrdup(or_empty(d->destination_name));
    r->precedence = d->precedence;
    r->has_permissions = has_permissions;
    /* An L7 intention cannot be enforced on a byte stream, so, like /authorize, it denies. */
    r->allow = !has_permissions && d->action != NULL && strcmp(d->action, "allow") == 0;
    if (d->source_peer != NULL && d->source_peer[0] != '\0')
        r->reach = INTENT_REACH_NONE;
    else if (d->source_sameness_group != NULL && d->source_sameness_group[0] != '\0')
        r->reach = r->allow ? INTENT_REACH_NONE : INTENT_REACH_ANY;
    else
        r->reach = INTENT_REACH_PARTITION;
}

static void rule_dispose(struct intent_rule *r)
{
    free(r->id);
    free(r->description);
    free(r->src_partition);
    free(r->src_ns);
    free(r->src_name);
    free(r->src_sameness);
    free(r->dst_ns);
    free(r->dst_name);
}

struct intent_table *intent_table_new(const struct dec_intention *v, size_t n, int default_allow)
{
    struct intent_table *t = xcalloc(1, sizeof(*t));
    atomic_init(&t->refs, 1);
    t->default_allow = default_allow != 0;
    t->n = n;
    t->rules = xcalloc(n, sizeof(*t->rules));
    struct order *ord = xcalloc(n, sizeof(*ord));
    for (size_t i = 0; i < n; i++)
        ord[i] = (struct order){v[i].precedence, i};
    if (n > 1)
        qsort(ord, n, sizeof(*ord), order_cmp);
    for (size_t i = 0; i < n; i++)
        rule_init(&t->rules[i], &v[ord[i].index]);
    free(ord);
    return t;
}

struct intent_table *intent_table_ref(struct intent_table *t)
{
    if (t != NULL)
        atomic_fetch_add_explicit(&t->refs, 1, memory_order_relaxed);
    return t;
}

void intent_table_unref(struct intent_table *t)
{
    if (t == NULL || atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) != 1)
        return;
    for (size_t i = 0; i < t->n; i++)
        rule_dispose(&t->rules[i]);
    free(t->rules);
    free(t);
}

/* Skips rules that can never match a local caller; returns the index of the next one or n. */
static size_t next_local(const struct intent_table *t, size_t i)
{
    while (i < t->n && t->rules[i].reach == INTENT_REACH_NONE)
        i++;
    return i;
}

static int same_decision(const struct intent_rule *a, const struct intent_rule *b)
{
    return a->allow == b->allow && a->reach == b->reach &&
           strcmp(a->src_partition, b->src_partition) == 0 && strcmp(a->src_ns, b->src_ns) == 0 &&
           strcmp(a->src_name, b->src_name) == 0;
}

/*
 * Rules no local caller can match are left out of the comparison; all
 * other rules must agree in order and in everything that decides. Tables that differ only in
 * shadowed rules compare unequal: that only costs a needless re-check.
 */
int intent_table_equal(const struct intent_table *a, const struct intent_table *b)
{
    if (a == b)
        return 1;
    if (a == NULL || b == NULL || a->default_allow != b->default_allow)
        return 0;
    size_t i = next_local(a, 0), j = next_local(b, 0);
    while (i < a->n && j < b->n) {
        if (!same_decision(&a->rules[i], &b->rules[j]))
            return 0;
        i = next_local(a, i + 1);
        j = next_local(b, j + 1);
    }
    return i == a->n && j == b->n;
}

size_t intent_table_len(const struct intent_table *t)
{
    return t->n;
}

int intent_table_default_allow(const struct intent_table *t)
{
    return t->default_allow;
}

static int name_matches(const char *pattern, const char *name)
{
    return strcmp(pattern, WILDCARD) == 0 || strcmp(pattern, name) == 0;
}

struct intent_decision intent_eval(const struct intent_table *t, const char *partition,
                                   const char *ns, const char *name)
{
    struct intent_decision d = {t->default_allow, NULL};
    partition = or_default(partition);
    ns = or_default(ns);
    name = or_empty(name);
    for (size_t i = 0; i < t->n; i++) {
        const struct intent_rule *r = &t->rules[i];
        /* Partitions never take a wildcard; see enum intent_reach for the other cases. */
        if (r->reach == INTENT_REACH_NONE ||
            (r->reach == INTENT_REACH_PARTITION && strcmp(r->src_partition, partition) != 0) ||
            !name_matches(r->src_ns, ns) || !name_matches(r->src_name, name))
            continue;
        d.allow = r->allow;
        d.rule = r;
        break;
    }
    return d;
}

/* "web", "ns/web" or "partition/ns/web", leaving out default parts. */
static void describe_name(char *buf, size_t len, const char *partition, const char *ns,
                          const char *name)
{
    if (partition != NULL && strcmp(partition, "default") != 0)
        snprintf(buf, len, "%s/%s/%s", partition, ns, name);
    else if (strcmp(ns, "default") != 0)
        snprintf(buf, len, "%s/%s", ns, name);
    else
        snprintf(buf, len, "%s", name);
}

const char *intent_describe(const struct intent_decision *d, char *buf, size_t len)
{
    if (len == 0)
        return buf;
    const char *verdict = d->allow ? "allow" : "deny";
    const struct intent_rule *r = d->rule;
    if (r == NULL) {
        snprintf(buf, len, "default policy %s", verdict);
        return buf;
    }
    char src[200], dst[200];
    if (r->src_sameness[0] != '\0')
        describe_name(src, sizeof(src), r->src_sameness, r->src_ns, r->src_name);
    else
        describe_name(src, sizeof(src), r->src_partition, r->src_ns, r->src_name);
    describe_name(dst, sizeof(dst), NULL, r->dst_ns, r->dst_name);
    snprintf(buf, len, "intention %s => %s %s (%s%sprecedence %d)", src, dst, verdict,
             r->src_sameness[0] != '\0' ? "sameness group, " : "",
             r->has_permissions ? "L7 permissions, " : "", r->precedence);
    return buf;
}
