/*
 * cpus: how many CPUs this process may use, for the default number of workers.
 *
 * A sidecar shares its node with the application it serves, so connectd does not start one
 * worker per online CPU: it starts min(2, usable CPUs), where the usable CPUs are the fewest of
 * the online CPUs, the process's affinity mask (sched_getaffinity, which taskset and cpusets
 * narrow) and its cgroup's CPU quota rounded up (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` over
 * `cpu.cfs_period_us`, in the process's own cgroup and each of its ancestors).
 *
 * The parsing is pure and takes its inputs as text so the unit tests can feed any cgroup
 * layout; cpus_usable() reads the real files.
 */
#ifndef CONNECTD_CPUS_H
#define CONNECTD_CPUS_H

/* The default worker count: min(CPUS_DEFAULT_WORKERS_MAX, cpus_usable()). */
#define CPUS_DEFAULT_WORKERS_MAX 2

/*
 * The CPUs a quota grants: ceil(quota / period), at least 1; 0 when there is no quota
 * (quota < 0, as cgroup v1 writes "-1") or the figures make no sense (period <= 0).
 */
long cpus_quota(long quota, long period);

/*
 * The CPUs a cgroup v2 `cpu.max` file's text grants ("max 100000" → 0 for no limit,
 * "150000 100000" → 2); 0 when the text is not that format.
 */
long cpus_quota_v2(const char *cpu_max);

/*
 * The tightest CPU quota over the cgroups of a process whose /proc/<pid>/cgroup text is `self`,
 * with the cgroup file systems mounted under `root` (normally "/sys/fs/cgroup"): the v2
 * hierarchy's `cpu.max` (line "0::<path>", files at root/<path>), or the v1 cpu controller's
 * (line "<n>:<list with cpu>:<path>", files at root/<list>/<path>, else root/cpu/<path>),
 * read in the cgroup and each ancestor up to the mount's root. A missing or unreadable file
 * is no limit: inside a container the cgroup named may not exist under the container's mount,
 * whose root is then the container's own cgroup. Returns the CPUs granted, 0 for no limit.
 */
long cpus_cgroup_limit(const char *root, const char *self);

/* The CPUs this process may use (online ∩ affinity, capped by the cgroup quota), at least 1. */
long cpus_usable(void);

/* min(CPUS_DEFAULT_WORKERS_MAX, usable), at least 1. */
int cpus_default_workers(long usable);

#endif
