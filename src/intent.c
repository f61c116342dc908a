/*
 * intent: intentions compiled for in-memory evaluation.
 *
 * Evaluation is Consul's own (consul-api.md 2.4.3, connect.AuthorizeIntentionTarget): walk the
 * rules in precedence order and let the first whose source matches decide, with no
 * fall-through. The table is built once on the control thread and then only read; its
 * reference count is the one mutable field, hence atomic.
 *
 * Per request, an L7 rule's Permissions decide in order, which is what Consul's RBAC
 * generator (agent/xds/rbac.go) builds for Envoy once its precedence rewriting is undone:
 * there each lower-precedence, more wildcarded source is ANDed with NOT of the higher one, and
 * each later permission with NOT of the earlier ones, so a caller's first matching rule and
 * that rule's first matching permission decide, and nothing matching means the default.
 *
 * Regexes that do not compile cannot make the table fail (the agent accepts any string as a
 * regex, and refusing the whole answer would freeze every other rule's change too). Instead
 * each such condition is "unknown" at evaluation, and unknown resolves to the safe side at
 * the permission that holds it: a deny permission denies, an allow permission does not allow
 * (evaluation goes on to the next permission, as if it had not matched). Whatever the regex
 * would have said, the outcome is never more permissive than Consul's. Envoy instead refuses
 * the whole listener update and keeps the previous rules.
 */
#include "intent.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "h1parse.h"
#include "log.h"
#include "rx.h"
#include "util.h"

struct intent_table {
    atomic_uint refs;
    int default_allow;
    size_t n;
    struct intent_rule *rules;
    size_t broken; /* regexes that did not compile */
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

/*
 * Compiles one regex of a rule. A pattern that does not compile leaves *rx NULL, counts as
 * broken and is logged once here, naming where it sits; the condition then fails closed.
 */
static void rx_broken(struct intent_table *t, const struct intent_rule *r, size_t perm_index,
                      const char *what, const char *pattern, const char *err, int *broken)
{
    *broken = 1;
    t->broken++;
    LOG_WARN("intention %s => %s: Permissions[%zu] %s %s is not usable: %s; the permission "
             "fails closed (a deny permission denies, an allow permission never allows)",
             LOG_ESC(r->src_name), LOG_ESC(r->dst_name), perm_index, what, LOG_ESC(pattern), err);
}

static void compile_rx(struct intent_table *t, const struct intent_rule *r, size_t perm_index,
                       const char *what, const char *pattern, struct rx **rx, int *broken)
{
    char err[200];
    if (rx_compile(pattern, strlen(pattern), rx, err, sizeof(err)) != 0)
        rx_broken(t, r, perm_index, what, pattern, err, broken);
}

static void perm_init(struct intent_table *t, const struct intent_rule *r, size_t index,
                      struct intent_perm *p, const struct dec_permission *d)
{
    p->allow = d->allow != 0;
    p->path_match = d->path_match;
    p->path = xstrdup(or_empty(d->path));
    p->path_len = strlen(p->path);
    p->has_jwt = d->has_jwt != 0;
    if (p->path_match == DEC_PATH_REGEX)
        compile_rx(t, r, index, "PathRegex", p->path, &p->path_rx, &p->broken);
    p->n_headers = d->n_headers;
    p->headers = xcalloc(d->n_headers, sizeof(*p->headers));
    for (size_t i = 0; i < d->n_headers; i++) {
        char err[200];
        if (hdr_cond_init(&p->headers[i], &d->headers[i], err, sizeof(err)) != 0)
            rx_broken(t, r, index, "Header Regex", p->headers[i].value, err, &p->broken);
    }
    p->n_methods = d->n_methods;
    p->methods = xcalloc(d->n_methods, sizeof(*p->methods));
    for (size_t i = 0; i < d->n_methods; i++)
        p->methods[i] = xstrdup(or_empty(d->methods[i]));
}

static void perm_dispose(struct intent_perm *p)
{
    free(p->path);
    rx_free(p->path_rx);
    for (size_t i = 0; i < p->n_headers; i++)
        hdr_cond_dispose(&p->headers[i]);
    free(p->headers);
    for (size_t i = 0; i < p->n_methods; i++)
        free(p->methods[i]);
    free(p->methods);
}

static void rule_init(struct intent_table *t, struct intent_rule *r, const struct dec_intention *d)
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
    r->has_jwt = d->has_jwt != 0;
    r->n_perms = d->n_permissions;
    r->perms = xcalloc(d->n_permissions, sizeof(*r->perms));
    for (size_t i = 0; i < d->n_permissions; i++)
        perm_init(t, r, i, &r->perms[i], &d->permissions[i]);
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
    for (size_t i = 0; i < r->n_perms; i++)
        perm_dispose(&r->perms[i]);
    free(r->perms);
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
        rule_init(t, &t->rules[i], &v[ord[i].index]);
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

static int same_header(const struct hdr_cond *a, const struct hdr_cond *b)
{
    return a->match == b->match && a->invert == b->invert && a->ignore_case == b->ignore_case &&
           strcmp(a->name, b->name) == 0 && strcmp(a->value, b->value) == 0;
}

/* Everything that decides; a broken regex follows from its pattern, so it needs no check. */
static int same_perm(const struct intent_perm *a, const struct intent_perm *b)
{
    if (a->allow != b->allow || a->path_match != b->path_match || a->has_jwt != b->has_jwt ||
        strcmp(a->path, b->path) != 0 || a->n_headers != b->n_headers ||
        a->n_methods != b->n_methods)
        return 0;
    for (size_t i = 0; i < a->n_headers; i++)
        if (!same_header(&a->headers[i], &b->headers[i]))
            return 0;
    for (size_t i = 0; i < a->n_methods; i++)
        if (strcmp(a->methods[i], b->methods[i]) != 0)
            return 0;
    return 1;
}

static int same_decision(const struct intent_rule *a, const struct intent_rule *b)
{
    if (a->allow != b->allow || a->reach != b->reach || a->has_permissions != b->has_permissions ||
        a->has_jwt != b->has_jwt || a->n_perms != b->n_perms ||
        strcmp(a->src_partition, b->src_partition) != 0 || strcmp(a->src_ns, b->src_ns) != 0 ||
        strcmp(a->src_name, b->src_name) != 0)
        return 0;
    for (size_t i = 0; i < a->n_perms; i++)
        if (!same_perm(&a->perms[i], &b->perms[i]))
            return 0;
    return 1;
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

size_t intent_table_broken(const struct intent_table *t)
{
    return t->broken;
}

static int name_matches(const char *pattern, const char *name)
{
    return strcmp(pattern, WILDCARD) == 0 || strcmp(pattern, name) == 0;
}

/* The first rule whose source matches the caller, or NULL. */
static const struct intent_rule *first_match(const struct intent_table *t, const char *partition,
                                             const char *ns, const char *name)
{
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
        return r;
    }
    return NULL;
}

struct intent_decision intent_eval(const struct intent_table *t, const char *partition,
                                   const char *ns, const char *name)
{
    struct intent_decision d = {.allow = t->default_allow, .perm = -1};
    const struct intent_rule *r = first_match(t, partition, ns, name);
    if (r != NULL) {
        d.allow = r->allow;
        d.rule = r;
        d.matched = r;
    }
    return d;
}

/* ---- per request ---- */

/* A condition's outcome: three values, so a condition that cannot be evaluated fails closed
 * at the permission (see intent_eval_http). */
enum tri { TRI_NO = 0, TRI_YES, TRI_UNKNOWN };

static enum tri tri_and(enum tri a, enum tri b)
{
    if (a == TRI_NO || b == TRI_NO)
        return TRI_NO;
    return a == TRI_UNKNOWN || b == TRI_UNKNOWN ? TRI_UNKNOWN : TRI_YES;
}

static enum tri tri_rx(const struct rx *rx, const char *s, size_t len)
{
    if (rx == NULL) /* did not compile */
        return TRI_UNKNOWN;
    int rc = rx_match(rx, s, len);
    return rc == 1 ? TRI_YES : rc == 0 ? TRI_NO : TRI_UNKNOWN;
}

static enum tri perm_matches(const struct intent_perm *p, const struct intent_http_req *rq)
{
    if (p->n_methods > 0) {
        int any = 0;
        for (size_t i = 0; i < p->n_methods && !any; i++)
            any = rq->method.len == strlen(p->methods[i]) &&
                  (rq->method.len == 0 || memcmp(rq->method.p, p->methods[i], rq->method.len) == 0);
        if (!any)
            return TRI_NO;
    }
    const char *path = rq->path.p != NULL ? rq->path.p : "";
    enum tri r = TRI_YES;
    switch (p->path_match) {
    case DEC_PATH_EXACT:
        r = rq->path.len == p->path_len && memcmp(path, p->path, p->path_len) == 0 ? TRI_YES
                                                                                   : TRI_NO;
        break;
    case DEC_PATH_PREFIX:
        r = rq->path.len >= p->path_len && memcmp(path, p->path, p->path_len) == 0 ? TRI_YES
                                                                                   : TRI_NO;
        break;
    case DEC_PATH_REGEX:
        r = tri_rx(p->path_rx, path, rq->path.len);
        break;
    case DEC_PATH_ANY:
        break;
    }
    struct hdr_req hr = {
        .method = rq->method,
        .authority = rq->authority,
        .headers = rq->headers,
        .nheaders = rq->nheaders,
    };
    for (size_t i = 0; i < p->n_headers && r != TRI_NO; i++) {
        int m = hdr_cond_eval(&p->headers[i], &hr);
        r = tri_and(r, m == 1 ? TRI_YES : m == 0 ? TRI_NO : TRI_UNKNOWN);
    }
    if (p->has_jwt)
        r = tri_and(r, TRI_UNKNOWN);
    return r;
}

struct intent_decision intent_eval_http(const struct intent_table *t, const char *partition,
                                        const char *ns, const char *name,
                                        const struct intent_http_req *rq)
{
    struct intent_decision d = {.allow = t->default_allow, .perm = -1};
    const struct intent_rule *r = first_match(t, partition, ns, name);
    d.matched = r;
    if (r == NULL)
        return d;
    if (!r->has_permissions) {
        d.rule = r;
        d.allow = r->allow;
    } else {
        /*
         * A sameness-group rule reaches this caller only because membership is unknown (see
         * enum intent_reach): whether it applies is itself unknown. So its allow permissions
         * never allow, and when none of its deny permissions decides, the answer is a deny
         * rather than the default or the rules below, either of which a member or a
         * non-member could have been refused by.
         */
        int unsure = r->reach == INTENT_REACH_ANY;
        int unknown = 0;
        for (size_t i = 0; i < r->n_perms; i++) {
            enum tri m = perm_matches(&r->perms[i], rq);
            if (unsure && m == TRI_YES && r->perms[i].allow)
                m = TRI_UNKNOWN;
            unknown |= m == TRI_UNKNOWN;
            /* Unknown decides for a deny permission and never for an allow one. */
            if (m == TRI_YES || (m == TRI_UNKNOWN && !r->perms[i].allow)) {
                d.rule = r;
                d.perm = (int)i;
                d.allow = r->perms[i].allow;
                break;
            }
        }
        if (unsure && d.rule == NULL) {
            d.rule = r;
            d.allow = 0;
            unknown = 1;
        }
        d.failed_closed = unknown && !d.allow;
    }
    /* The rule applies only to callers with a valid JWT, which is not checked here. */
    if (d.rule != NULL && r->has_jwt && d.allow) {
        d.allow = 0;
        d.failed_closed = 1;
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

static void describe_rule(const struct intent_rule *r, char *src, size_t srclen, char *dst,
                          size_t dstlen)
{
    if (r->src_sameness[0] != '\0')
        describe_name(src, srclen, r->src_sameness, r->src_ns, r->src_name);
    else
        describe_name(src, srclen, r->src_partition, r->src_ns, r->src_name);
    describe_name(dst, dstlen, NULL, r->dst_ns, r->dst_name);
}

const char *intent_describe(const struct intent_decision *d, char *buf, size_t len)
{
    if (len == 0)
        return buf;
    const char *verdict = d->allow ? "allow" : "deny";
    const char *closed = d->failed_closed ? ", failed closed" : "";
    const struct intent_rule *r = d->rule;
    char src[200], dst[200];
    if (r == NULL && d->matched != NULL) {
        describe_rule(d->matched, src, sizeof(src), dst, sizeof(dst));
        snprintf(buf, len,
                 "default policy %s (intention %s => %s matched, none of its %zu "
                 "permission(s) did%s)",
                 verdict, src, dst, d->matched->n_perms, closed);
        return buf;
    }
    if (r == NULL) {
        snprintf(buf, len, "default policy %s", verdict);
        return buf;
    }
    describe_rule(r, src, sizeof(src), dst, sizeof(dst));
    char perm[32] = "L7 permissions, ";
    if (d->perm >= 0)
        snprintf(perm, sizeof(perm), "permission %d, ", d->perm);
    else if (!r->has_permissions)
        perm[0] = '\0';
    snprintf(buf, len, "intention %s => %s %s (%s%s%sprecedence %d)", src, dst, verdict,
             r->src_sameness[0] != '\0' ? "sameness group, " : "", perm,
             d->failed_closed ? "failed closed, " : "", r->precedence);
    return buf;
}

/* Appends to buf at *off, keeping it terminated; stops quietly once full. */
static void append(char *buf, size_t len, size_t *off, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void append(char *buf, size_t len, size_t *off, const char *fmt, ...)
{
    if (*off >= len)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *off, len - *off, fmt, ap);
    va_end(ap);
    *off = n < 0 ? len : *off + (size_t)n;
}

const char *intent_perm_describe(const struct intent_perm *p, char *buf, size_t len)
{
    static const char *const path_kinds[] = {"", "PathExact", "PathPrefix", "PathRegex"};
    static const char *const header_kinds[] = {"",       "Present",  "Exact", "Prefix",
                                               "Suffix", "Contains", "Regex"};
    size_t off = 0;
    if (len == 0)
        return buf;
    buf[0] = '\0';
    append(buf, len, &off, "%s", p->allow ? "allow" : "deny");
    if (p->path_match != DEC_PATH_ANY && (size_t)p->path_match < ARRAY_SIZE(path_kinds))
        append(buf, len, &off, " %s \"%.128s\"", path_kinds[p->path_match], p->path);
    for (size_t i = 0; i < p->n_headers; i++) {
        const struct hdr_cond *h = &p->headers[i];
        const char *kind =
            (size_t)h->match < ARRAY_SIZE(header_kinds) ? header_kinds[h->match] : "?";
        append(buf, len, &off, " Header %.64s %s%s", h->name, h->invert ? "not " : "", kind);
        if (h->match != DEC_HDR_PRESENT)
            append(buf, len, &off, " \"%.64s\"%s", h->value, h->ignore_case ? " (any case)" : "");
    }
    for (size_t i = 0; i < p->n_methods; i++)
        append(buf, len, &off, "%s%.16s", i == 0 ? " Methods " : ",", p->methods[i]);
    if (p->has_jwt)
        append(buf, len, &off, " JWT (not checked)");
    if (p->broken)
        append(buf, len, &off, " [bad regex]");
    return buf;
}
