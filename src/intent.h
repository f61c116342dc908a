/*
 * intent: the compiled intention table for this proxy's destination service, evaluated in
 * memory (consul-api.md 2.4.3 - 2.4.5).
 *
 * A table is immutable once built and reference-counted, so workers can evaluate it without
 * locks while the control thread builds the next one.
 */
#ifndef CONNECTD_INTENT_H
#define CONNECTD_INTENT_H

#include <stddef.h>

#include "decode.h"

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
    int allow;           /* 1 for an L4 allow; 0 for deny and for any L7 (Permissions) rule */
    int has_permissions; /* an L7 intention: always a deny for an L4 proxy */
    /* Which local callers the rule can match (a local caller has no peer): */
    enum intent_reach reach;
};

struct intent_table;

/*
 * Builds a table from the agent's match list (already in precedence order; the table sorts
 * stably by precedence again so a misordered answer cannot change outcomes). <default_allow>
 * is the decision when no rule matches. Never fails (allocation aborts).
 */
struct intent_table *intent_table_new(const struct dec_intention *v, size_t n, int default_allow);
struct intent_table *intent_table_ref(struct intent_table *t);
void intent_table_unref(struct intent_table *t);

/* Returns 1 when both tables give the same decision for every caller (same rules, same
 * default). Used to skip needless re-authorization. */
int intent_table_equal(const struct intent_table *a, const struct intent_table *b);

size_t intent_table_len(const struct intent_table *t);
int intent_table_default_allow(const struct intent_table *t);

struct intent_decision {
    int allow;
    const struct intent_rule *rule; /* the deciding rule, or NULL for the default policy */
};

/*
 * Decides for a caller identified by partition ("" means default), namespace ("" means
 * default) and service name. The first rule in precedence order whose source matches wins;
 * there is no fall-through. Names compare case-sensitively.
 */
struct intent_decision intent_eval(const struct intent_table *t, const char *partition,
                                   const char *ns, const char *name);

/* Writes a short description of a decision ("intention web => db allow (precedence 9)" or
 * "default policy allow") into buf; returns buf. */
const char *intent_describe(const struct intent_decision *d, char *buf, size_t len);

#endif
