"""pytest fixtures for the integration suite: a real Consul dev agent (one shared per session,
or a fresh one per test for tests that change the CA), and a per-test mesh of services,
sidecar registrations, small apps and connectd processes that is always torn down.

When a test fails, the last lines of every connectd log it started (and of the agent log)
are attached to the failure report.
"""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from mesh import REPO, ConsulAgent, Mesh, connectd_binary, log_tail  # noqa: E402

LOGS = pytest.StashKey[list]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for label, path, lines in item.stash.get(LOGS, []):
            rep.sections.append((f"{label} (last {lines} lines of {path})",
                                 log_tail(path, lines)))


def _attach_log(request, label, path, lines=60):
    request.node.stash.setdefault(LOGS, []).append((label, path, lines))


@pytest.fixture(scope="session")
def consul_bin():
    """The consul binary: `scripts/consul path` (PATH, or the cached pinned build)."""
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
    return path


@pytest.fixture(scope="session")
def agent(consul_bin, tmp_path_factory):
    """One dev agent shared by the tests that do not change cluster-wide state (the CA).

    Every sidecar and client of the whole run reaches it from 127.0.0.1, where a real node's
    agent serves a few sidecars, so its per-client connection limit (200 by default) is
    raised: two full runs on a loaded machine were answered 429 near their end."""
    a = ConsulAgent(consul_bin, str(tmp_path_factory.mktemp("agent")),
                    ["limits { http_max_conns_per_client = 1000 }"]).start()
    yield a
    a.stop()


def pytest_configure(config):
    config.addinivalue_line("markers", "agent_hcl(*fragments): extra agent configuration for "
                            "the test's fresh_agent")


@pytest.fixture
def fresh_agent(consul_bin, tmp_path, request):
    """A dev agent of this test's own, for tests that rotate or replace the CA or need agent
    configuration of their own (@pytest.mark.agent_hcl(...))."""
    marker = request.node.get_closest_marker("agent_hcl")
    a = ConsulAgent(consul_bin, str(tmp_path / "agent"), marker.args if marker else ())
    _attach_log(request, "consul agent", a.log_path, 40)
    a.start()
    yield a
    a.stop()


def _mesh(agent, tmp_path, connectd_bin, request):
    workdir = tmp_path / "mesh"
    workdir.mkdir()
    m = Mesh(agent, str(workdir), connectd_bin,
             lambda label, path: _attach_log(request, label, path))
    yield m
    problems = m.close()
    if problems:
        pytest.fail("connectd did not end cleanly:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def mesh(agent, tmp_path, connectd_bin, request):
    """A Mesh on the shared agent; services get per-test names."""
    yield from _mesh(agent, tmp_path, connectd_bin, request)


@pytest.fixture
def fresh_mesh(fresh_agent, tmp_path, connectd_bin, request):
    """A Mesh on a fresh agent of this test's own."""
    yield from _mesh(fresh_agent, tmp_path, connectd_bin, request)


@pytest.fixture
def agent_mesh(agent, tmp_path, request):
    """A Mesh on the shared agent for tests of the harness itself (no connectd needed)."""
    yield from _mesh(agent, tmp_path, None, request)


@pytest.fixture
def fresh_agent_mesh(fresh_agent, tmp_path, request):
    yield from _mesh(fresh_agent, tmp_path, None, request)
