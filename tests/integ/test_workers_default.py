"""The default worker count (issue 11, item 4): min(2, the CPUs this process may use).

One worker per online CPU put 64 threads, loops and listener sockets beside the application on a
64-core node. The default now counts the affinity mask (taskset, cpusets) and the cgroup's CPU
quota, and stops at 2 as consul-k8s's Envoy does (`--concurrency 2`). The pure arithmetic and
cgroup walk are unit-tested (tests/unit/test_cpus.c); these tests run the real binary under a
narrowed affinity and under a real cgroup quota and read the worker count it reports.
"""

import os
import re
import subprocess
import uuid

import pytest

from mesh import stop_process, wait_until

STARTING = re.compile(r"connectd starting: agent \S+, (\d+) worker\(s\)")


def _workers(mesh, connectd_bin, args=(), preexec_fn=None):
    """Starts connectd in flags mode on the shared agent, returns the worker count it logs."""
    log_path = os.path.join(mesh.workdir, f"workers-{uuid.uuid4().hex[:8]}.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [connectd_bin, "-service", mesh.name("solo"), "-http-addr", mesh.agent.http_addr,
             *args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn)
    try:
        def started():
            assert proc.poll() is None, open(log_path).read()
            return STARTING.search(open(log_path).read())

        return int(wait_until(started, 20, "connectd's start line").group(1))
    finally:
        rc, killed = stop_process(proc)
        assert not killed and rc == 0, open(log_path).read()


def test_default_is_at_most_two(mesh, connectd_bin):
    usable = len(os.sched_getaffinity(0))
    assert _workers(mesh, connectd_bin) == min(2, usable)


def test_default_follows_the_affinity_mask(mesh, connectd_bin):
    # Before: sysconf(_SC_NPROCESSORS_ONLN) ignored taskset and started one worker per CPU.
    cpu = min(os.sched_getaffinity(0))
    assert _workers(mesh, connectd_bin, preexec_fn=lambda: os.sched_setaffinity(0, {cpu})) == 1


def test_explicit_workers_flag_wins(mesh, connectd_bin):
    cpu = min(os.sched_getaffinity(0))
    assert _workers(mesh, connectd_bin, ("-workers", "3"),
                    preexec_fn=lambda: os.sched_setaffinity(0, {cpu})) == 3


def _quota_cgroup():
    """A fresh cgroup with a CPU quota of half a CPU, as (directory, None), or (None, the reason
    it cannot be made here). v2 first (cpu.max), then the v1 cpu controller."""
    name = f"connectd-test-{uuid.uuid4().hex[:8]}"
    reason = "no cgroup file system with a cpu controller at /sys/fs/cgroup"
    for root, marker, knob, value in (
            ("/sys/fs/cgroup", "cgroup.controllers", "cpu.max", "50000 100000"),
            ("/sys/fs/cgroup/cpu", "cpu.cfs_quota_us", "cpu.cfs_quota_us", "50000")):
        if not os.path.exists(os.path.join(root, marker)):
            continue
        path = os.path.join(root, name)
        try:
            os.mkdir(path)
        except OSError as e:
            reason = f"cannot create a cgroup in {root}: {e}"
            continue
        try:
            with open(os.path.join(path, knob), "w") as f:
                f.write(value)
            return path, None
        except OSError as e:
            os.rmdir(path)
            reason = f"cannot set {knob} in {root}: {e}"
    return None, reason


def test_default_follows_the_cgroup_quota(mesh, connectd_bin):
    if os.geteuid() != 0:
        pytest.skip("needs root to create a cgroup with a CPU quota")
    path, reason = _quota_cgroup()
    if path is None:
        pytest.skip(reason)
    procs = os.path.join(path, "cgroup.procs")

    def enter():
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    try:
        # Every CPU in the affinity mask, but half a CPU of quota: one worker.
        assert _workers(mesh, connectd_bin, preexec_fn=enter) == 1
    finally:
        os.rmdir(path)
