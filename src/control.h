/*
 * control: the control thread's whole life: agent watches in, snapshots out to the workers.
 */
#ifndef CONNECTD_CONTROL_H
#define CONNECTD_CONTROL_H

#include "config.h"

/*
 * Starts conf->n_workers workers and runs the control loop on the calling thread until
 * SIGTERM or SIGINT (which the caller must have blocked in every thread) or a fatal startup
 * error. Returns the process exit code: 0 after a signal, 1 for a fatal error, 2 for bad
 * options found only here.
 */
int control_run(const struct config *conf);

#endif
