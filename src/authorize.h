/*
 * authorize: the control thread's side of authorize mode (consul-api.md 2.3). Workers post
 * their questions (authq.h) to the control thread, which hands each to authorize_submit();
 * the answer goes back to the asking worker's box, from the cache (per target and caller URI,
 * for the question's cache_ms, kept only when the intentions here agree), shared with the same
 * question already asked, or from the agent. The agent's answer can only add a deny: its
 * allow is refused when an intention here denies the caller, or when it cites an intention
 * the table here does not back (a stale copy: fail closed); it stands where the two differ
 * only by default policy, and before the table here exists. An agent error is a deny for a
 * new connection; a re-check of an open one that the agent answers unlike the intentions
 * here, or not at all, is asked again every 500 ms, up to 10 times, and only a real "no" ends
 * the connection.
 *
 * Control thread only.
 */
#ifndef CONNECTD_AUTHORIZE_H
#define CONNECTD_AUTHORIZE_H

#include "agent.h"
#include "authq.h"
#include "inputs.h"
#include "watch.h"

struct authorize;

/* <a>, <reach> and <in> (whose intentions the answers are compared with) are borrowed. */
struct authorize *authorize_new(struct agent *a, struct watch_reach *reach,
                                const struct inputs *in);
/*
 * Cancels the questions in flight and frees them with those waiting to be asked again, and
 * the cache; NULL is fine. Only after the workers are gone: nobody waits for those answers.
 */
void authorize_free(struct authorize *az);
/* Takes <r> and answers it (now or later) by posting it to r->reply. */
void authorize_submit(struct authorize *az, struct authq_req *r);
/* Forgets every cached answer (the intentions changed: the agent's answers may differ). */
void authorize_cache_clear(struct authorize *az);

#endif
