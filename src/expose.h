/*
 * expose: the exposed listeners (Proxy.Expose), the one place where connectd serves callers
 * without a mesh identity. Their paths come from the registration's Expose.Paths and, with
 * Expose.Checks, from the parent service's HTTP and gRPC health checks, which the agent sends
 * to the port it assigned the check (ExposedPort) on the proxy's address.
 *
 * The agent does not publish a check's definition to a proxy (its HealthCheck carries the
 * ExposedPort, not the URL), so the path of an HTTP check is read from the URL the agent's own
 * check output names (every run prints it: "HTTP GET http://addr:port/path: 200 OK ..." or
 * "Get \"http://addr:port/path\": dial tcp ..."), and the application port is the proxy's
 * LocalServicePort; a gRPC check is Consul's fixed path /grpc.health.v1.Health/Check over
 * h2c. Envoy gets the same from the agent in memory (proxycfg's service HTTP checks).
 *
 * Control thread only.
 */
#ifndef CONNECTD_EXPOSE_H
#define CONNECTD_EXPOSE_H

#include <stddef.h>

#include "agent.h"
#include "decode.h"
#include "limit.h"
#include "proxycfg.h"
#include "snapshot.h"
#include "watch.h"

/* How often the agent's checks are read with Expose.Checks (the checks API cannot block). */
#define EXPOSE_CHECKS_POLL_MS 1000

/* The path gRPC health checks are exposed with (Consul's parseCheckPath). */
#define EXPOSE_GRPC_HEALTH_PATH "/grpc.health.v1.Health/Check"

/*
 * The exposed path for check <c> of the parent service, whose application listens on
 * <local_port>, into <out> (out->path is a fresh string). Returns 0; -ENOENT when the check
 * is not exposed (no ExposedPort, or not an HTTP or gRPC check); -EAGAIN when it is an HTTP
 * check whose output does not name its URL yet (it has not run, or ran before the agent
 * assigned its port); -EINVAL when the URL's path cannot be exposed. Pure.
 */
int expose_check_path(const struct dec_check *c, int local_port, struct expose_path *out);

/*
 * The exposed listeners of <cfg> plus <checks> (<n_checks> paths from expose_check_path()):
 * one listener per ListenerPort, sorted by port, paths in order without repeats. A check path
 * whose port is already an Expose.Paths listener, the public port or an upstream's is left out
 * and named in <warn> (may be NULL; the last such conflict). NULL when there is nothing to
 * expose; else a new set holding a reference to <limit> and a copy of <agent_addr> (the
 * agent's advertise address, "" unknown: see snap_expose_source_ok()).
 */
struct snap_exposes *expose_build(const struct proxy_cfg *cfg, const struct expose_path *checks,
                                  size_t n_checks, struct limit_state *limit,
                                  const char *agent_addr, char *warn, size_t wlen);

/* The watch of the parent service's checks, for Expose.Checks. */
struct expose_checks;

/*
 * Creates it, watching nothing. <a> and <reach> are borrowed and must outlive it; <changed>
 * is called with <data> whenever the exposed check paths change.
 */
struct expose_checks *expose_checks_new(struct agent *a, struct watch_reach *reach,
                                        void (*changed)(void *data), void *data);
/* Stops the watch and frees everything; NULL is fine. */
void expose_checks_free(struct expose_checks *x);

/*
 * Follows <cfg>: with expose_checks the agent's checks of cfg->service_id are polled (a new
 * service ID starts over), without it the watch stops and the paths are dropped (changed is
 * called when there were some).
 */
void expose_checks_reconcile(struct expose_checks *x, const struct proxy_cfg *cfg);

/* The check paths known now (borrowed until the next callback or reconcile). */
const struct expose_path *expose_checks_paths(const struct expose_checks *x, size_t *n);

/* Calls <fn> for the checks watch ("expose-checks"), when it runs. */
void expose_checks_each_watch(const struct expose_checks *x, watch_visit_cb fn, void *data);

#endif
