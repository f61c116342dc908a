/*
 * intent: the compiled intention table for this proxy's destination service, evaluated in
 * memory (consul-api.md 2.4.3 - 2.4.5), per connection (intent_eval) or per HTTP request
 * (intent_eval_http, with the intentions' Permissions).
 *
 * A table is immutable once built and reference-counted, so workers can evaluate it without
 * locks while the control thread builds the next one. Its regexes are compiled once, when the
 * table is built, and shared by every worker (rx.h).
 */
#ifndef CONNECTD_INTENT_H
#define CONNECTD_INTENT_H

#include <stddef.h>

#include "decode.h"
#include "hdrmatch.h"
#include "http.h"

struct rx;

/* One of an L7 intention's Permissions, compiled. */
struct intent_perm {
    int allow; /* the permission's Action */
    enum dec_path_match path_match;
    char *path;
    size_t path_len;
    struct rx *path_rx;       /* DEC_PATH_REGEX when the pattern compiled, else NULL */
    struct hdr_cond *headers; /* Header[] */
    size_t n_headers;
    char **methods;
    size_t n_methods;
    int has_jwt; /* a JWT requirement, which connectd cannot check: see intent_eval_http */
    /*
     * A regex of this permission did not compile (RE2 syntax it does not accept, or not a
     * regex at all). The condition it guards is "unknown" and fails closed.
     */
    int broken;
};

/*
 * How a rule's source applies to a caller of this datacenter. A SourcePeer rule is for peered
 * callers only. A SourceSamenessGroup rule (Enterprise) is for the callers of every member of
 * the group, and members may be local partitions; which ones is a sameness-group config entry
 * a custom proxy is not given, so such a rule is read to fail closed: a deny (or L7) rule
 * matches a caller of that namespace and name in any partition, an allow rule matches none.
 */
enum intent_reach {
    INTENT_REACH_PARTITION, /* callers of the rule's source partition */
    INTENT_REACH_NONE,      /* no local caller: SourcePeer, or a sameness-group allow */
    INTENT_REACH_ANY,       /* callers of any partition: a sameness-group deny */
};

struct intent_rule {
    char *id;            /* legacy intention ID, often "" */
    char *description;   /* "" when none */
    char *src_partition; /* "default" when the agent sent "" */
    char *src_ns;        /* "default" when the agent sent "" */
    char *src_name;      /* may be "*" */
    char *src_sameness;  /* SourceSamenessGroup, "" when none */
    char *dst_ns;
    char *dst_name; /* may be "*" */
    int precedence;
    int allow;                 /* 1 for an L4 allow; 0 for deny and for any L7 (Permissions) rule */
    int has_permissions;       /* an L7 intention: always a deny for an L4 proxy */
    struct intent_perm *perms; /* has_permissions: the permissions in order */
    size_t n_perms;
    int has_jwt; /* a JWT requirement on the intention (HTTP only; not checked: fails closed) */
    /* Which local callers the rule can match (a local caller has no peer): */
    enum intent_reach reach;
};

struct intent_table;

/*
 * Builds a table from the agent's match list (already in precedence order; the table sorts
 * stably by precedence again so a misordered answer cannot change outcomes). <default_allow>
 * is the decision when no rule matches. Never fails (allocation aborts): a regex that does
 * not compile is logged (one warning per pattern per build, naming the intention, the
 * permission and the reason) and its permission is marked broken, which fails closed.
 */
struct intent_table *intent_table_new(const struct dec_intention *v, size_t n, int default_allow);
struct intent_table *intent_table_ref(struct intent_table *t);
void intent_table_unref(struct intent_table *t);

/* Returns 1 when both tables give the same decision for every caller and every request (same
 * rules, permissions included, same default). Used to skip needless re-authorization. */
int intent_table_equal(const struct intent_table *a, const struct intent_table *b);

size_t intent_table_len(const struct intent_table *t);
int intent_table_default_allow(const struct intent_table *t);
/* How many regexes of the table did not compile (their permissions fail closed). */
size_t intent_table_broken(const struct intent_table *t);

struct intent_decision {
    int allow;
    const struct intent_rule *rule; /* the deciding rule, or NULL for the default policy */
    int perm;                       /* index of the deciding permission in rule->perms, or -1 */
    /* The first rule whose source matched the caller, or NULL. It differs from <rule> when
     * an L7 rule matched but none of its permissions did, so the default policy decided. */
    const struct intent_rule *matched;
    /* 1 when a condition connectd could not evaluate (a broken regex, the regex match limit,
     * a JWT requirement, a pseudo-header it does not carry) took part in a deny. */
    int failed_closed;
};

/*
 * Decides for a caller identified by partition ("" means default), namespace ("" means
 * default) and service name. The first rule in precedence order whose source matches wins;
 * there is no fall-through. Names compare case-sensitively. This is the L4 (per connection)
 * decision: an L7 rule (with Permissions) is a deny.
 */
struct intent_decision intent_eval(const struct intent_table *t, const char *partition,
                                   const char *ns, const char *name);

/* One request as per-request authorization sees it; slices into the caller's buffers. */
struct intent_http_req {
    struct http_slice method;          /* as sent, compared exactly */
    struct http_slice path;            /* normalized (pathnorm), without query or fragment */
    struct http_slice authority;       /* Host / :authority; what a header rule named "Host" or
                                          ":authority" matches (absent: p == NULL) */
    const struct http_header *headers; /* as received (a name that repeats is matched on its
                                          values joined with ",") */
    size_t nheaders;
};

/*
 * The per-request decision (what Consul's generated Envoy RBAC amounts to):
 * 1. the first rule in precedence order whose source matches the caller (as intent_eval);
 * 2. without Permissions, its Action;
 * 3. with Permissions, the Action of the first permission all of whose conditions match
 *    (path, every header condition, method); none matches: the default policy. So a caller's
 *    L7 rule hides the lower-precedence wildcard rules that would also match it;
 * 4. no rule matches: the default policy.
 * d.rule is the deciding rule (NULL for the default policy), d.perm the index of the deciding
 * permission or -1, d.matched the rule of step 1.
 *
 * Matching: PathExact is exact, PathPrefix a plain prefix, PathRegex and header Regex full
 * RE2-style matches; header names are case-insensitive; a header sent several times is
 * matched on its values joined with ","; "Host" and ":authority" name the authority and
 * ":method" the method. A header condition on an absent header matches only when it is an
 * inverted Present (Envoy's rule: Invert does not turn "absent" into a match of Exact etc.).
 *
 * Failing closed: a condition connectd cannot evaluate (a regex that did not compile, a match
 * that hit the regex limit, a permission's JWT requirement, another pseudo-header) is
 * "unknown": a deny permission with an unknown condition (and no false one) denies, an allow
 * permission with one never allows. A rule-level JWT requirement turns the rule's allow into
 * a deny. An L7 sameness-group rule (whose reach is itself unknown) allows nothing and denies
 * when none of its deny permissions does. Thread-safe on a shared table; may allocate briefly
 * (joined header values).
 */
struct intent_decision intent_eval_http(const struct intent_table *t, const char *partition,
                                        const char *ns, const char *name,
                                        const struct intent_http_req *rq);

/*
 * Writes a short description of permission <p> ("deny PathRegex \"/adm.*\" Methods GET,PUT
 * Header x-role Exact \"ops\"") into buf (truncated to fit; values are not escaped: escape
 * the result for its destination); returns buf.
 */
const char *intent_perm_describe(const struct intent_perm *p, char *buf, size_t len);

/* Writes a short description of a decision ("intention web => db allow (precedence 9)",
 * "intention web => db deny (permission 1, precedence 9)" or "default policy allow") into
 * buf; returns buf. */
const char *intent_describe(const struct intent_decision *d, char *buf, size_t len);

#endif
