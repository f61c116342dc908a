/*
 * inputs: the answers about the proxy's own identity, turned into state. The CA roots and the
 * leaf certificate become one TLS context; the intentions for the destination service and
 * the agent's default policy become one intention table; the mesh config entry (of the
 * proxy's partition) gives the request normalization settings.
 *
 * Each answer is decoded and checked; a bad one is logged and the last good state stays in
 * force (its watch backs off and retries). Control thread only: the callbacks run on the
 * agent's loop, never before the call that started the request returns.
 */
#ifndef CONNECTD_INPUTS_H
#define CONNECTD_INPUTS_H

#include <stdint.h>

#include "agent.h"
#include "decode.h"
#include "intent.h"
#include "pathnorm.h"
#include "tls.h"
#include "watch.h"

struct inputs;

enum inputs_event {
    INPUTS_INTENTIONS_CHANGING, /* a new intention table is about to replace the current one */
    INPUTS_CHANGED, /* the TLS context, the intention table or the mesh settings changed */
};
typedef void (*inputs_cb)(void *data, enum inputs_event ev);

/*
 * Creates the state, empty; nothing is asked yet. <a> and <reach> are borrowed and must
 * outlive it. <cb> is called with <data> on every event above.
 */
struct inputs *inputs_new(struct agent *a, struct watch_reach *reach, inputs_cb cb, void *data);
/* Stops every watch and request and frees all state; NULL is fine. */
void inputs_free(struct inputs *in);

/* Starts the roots watch and the one look at the agent's own configuration (/v1/agent/self). */
void inputs_start(struct inputs *in);

/*
 * Makes <service> in <ns> and <partition> the destination service. When that differs from
 * the current one (or there was none), the leaf and intentions of the old identity are
 * dropped and their watches start again for the new one; otherwise nothing happens. The mesh
 * config entry is watched for <partition> (again only when that changed); the settings in
 * force stay until the new answer.
 */
void inputs_set_service(struct inputs *in, const char *service, const char *ns,
                        const char *partition);

/*
 * The TLS settings of the configuration in force (<cipher_suites> copied; NULL for the
 * defaults). Until they first arrive the defaults apply; when they differ from the previous
 * ones the contexts are rebuilt (if any setting is not a default or contexts exist).
 */
void inputs_set_tls(struct inputs *in, int min_version, int max_version, const char *cipher_suites);

/* The destination service, or NULL before inputs_set_service(). */
const char *inputs_service(const struct inputs *in);
/* Its "&ns=..&partition=.." query suffix ("" for the defaults, or before it is set). */
const char *inputs_scope(const struct inputs *in);
/* The current TLS context (borrowed), or NULL before a leaf and the roots both arrived. */
struct tls_ctx *inputs_tls(const struct inputs *in);
/* Drops the expired sessions of the current TLS context's server cache (tls.h); returns how
 * many went (0 without a context). */
size_t inputs_sweep_sessions(struct inputs *in);
/* The current leaf (borrowed), or NULL. */
const struct dec_leaf *inputs_leaf(const struct inputs *in);
/* The roots' trust domain, or NULL before the roots arrived. */
const char *inputs_trust_domain(const struct inputs *in);
/* The current intention table (borrowed), or NULL before the intentions arrived. */
struct intent_table *inputs_intents(const struct inputs *in);
/*
 * The request normalization settings (borrowed), or NULL before the agent has answered about
 * the mesh config entry. A 404 (no entry) gives Consul's defaults; a 403 or an entry that
 * cannot be decoded keeps the settings in force (the defaults at first) and is logged.
 */
const struct mesh_http_cfg *inputs_mesh_http(const struct inputs *in);
/*
 * The inbound rate limits of the destination service's service-defaults entry
 * (RateLimits.InstanceLevel), or NULL when nothing is limited (no entry, or not yet). The
 * inputs keep their reference; take one to keep it.
 */
struct limit_rates *inputs_rates(const struct inputs *in);

/* The agent's LAN advertise address from /v1/agent/self (Member.Addr); "" while unknown. */
const char *inputs_agent_addr(const struct inputs *in);
/* Counts the changes of the intention table, for answers asked under an older one. */
uint64_t inputs_intents_gen(const struct inputs *in);
/* "waiting for ..." naming the first input that has not arrived, or NULL when all have. */
const char *inputs_waiting_for(const struct inputs *in);
/* Calls <fn> for the roots, leaf, intentions and mesh watches (those that run), in order. */
void inputs_each_watch(const struct inputs *in, watch_visit_cb fn, void *data);

#endif
