"""pytest fixtures for the cluster suite: one Consul cluster on network namespaces per module
(dc1: three servers and two clients; dc2: one server and one client), and the services,
sidecars and apps a module runs on it. Every namespace, link and process made is removed at
the end, pass or fail. When a test fails, the tails of the connectd logs and of the Consul
logs are attached to its report.
"""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from cluster import (Cluster, ClusterMesh, Net, namespaces_usable)  # noqa: E402
from mesh import REPO, connectd_binary, log_tail  # noqa: E402

_LOGS = []  # (label, path, lines) of every log the current module made


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for label, path, lines in _LOGS:
            rep.sections.append((f"{label} (last {lines} lines of {path})",
                                 log_tail(path, lines)))


@pytest.fixture(scope="session")
def netns_ok():
    why = namespaces_usable()
    if why is not None:
        pytest.skip(why)


@pytest.fixture(scope="session")
def consul_bin():
    r = subprocess.run([os.path.join(REPO, "scripts", "consul"), "path"], capture_output=True,
                       text=True)
    if r.returncode != 0 or not r.stdout.strip():
        pytest.fail(f"scripts/consul path failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout.strip()


@pytest.fixture(scope="session")
def connectd_bin():
    path = connectd_binary()
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"connectd binary not found at {path}: build it with `make VARIANT=asan` "
                    f"or point CONNECTD_BIN at one", pytrace=False)
    return os.path.abspath(path)


@pytest.fixture(scope="module")
def cluster(netns_ok, consul_bin, tmp_path_factory):
    """The cluster, started once per module; scenarios that break a piece restore it."""
    net = Net()
    c = None
    try:
        net.create()
        c = Cluster(net, consul_bin, str(tmp_path_factory.mktemp("cluster")))
        for n in c.nodes.values():
            _LOGS.append((f"consul {n.name} ({n.dc})", n.log_path, 15))
        c.start()
        yield c
    finally:
        if c is not None:
            c.stop()
        net.destroy()
        _LOGS.clear()


@pytest.fixture(scope="module")
def cmesh(cluster, connectd_bin, tmp_path_factory):
    """Services with sidecars on the cluster's agents; every connectd must end cleanly."""
    m = ClusterMesh(cluster, connectd_bin, str(tmp_path_factory.mktemp("mesh")),
                    lambda label, path: _LOGS.insert(0, (label, path, 40)))
    try:
        yield m
    finally:
        problems = m.close()
    if problems:
        pytest.fail("connectd did not end cleanly:\n  " + "\n  ".join(problems), pytrace=False)
