/*
 * register: -register, the flags mode's own connect-proxy registration. It registers at once,
 * passes a TTL check every 10 s (registering again when the agent has forgotten the proxy,
 * as a restarted dev agent has) and deregisters when the proxy stops.
 *
 * Control thread only.
 */
#ifndef CONNECTD_REGISTER_H
#define CONNECTD_REGISTER_H

#include "agent.h"
#include "proxycfg.h"
#include "watch.h"

struct register_ctx;

/*
 * Registers <proxy_id> as a connect-proxy for the flags configuration <cfg> (read now, not
 * kept) and starts its heartbeat. <a> and <reach> are borrowed. <done> is called with <data>
 * when the deregistration asked by register_leave() has been answered. Never fails: errors are
 * logged and retried.
 */
struct register_ctx *register_start(struct agent *a, struct watch_reach *reach,
                                    const struct proxy_cfg *cfg, const char *proxy_id,
                                    void (*done)(void *data), void *data);
/* Stops the heartbeat and deregisters (a request in flight is cancelled). */
void register_leave(struct register_ctx *r);
/* 1 while a request to the agent is in flight (e.g. the deregistration). NULL gives 0. */
int register_busy(const struct register_ctx *r);
/* Cancels what is in flight and frees <r>; NULL is fine. */
void register_free(struct register_ctx *r);

#endif
