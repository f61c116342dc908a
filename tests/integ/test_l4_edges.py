"""Edges of the L4 core against a real Consul agent: failing endpoints, timeouts, the default
intention decision, and the sidecar selectors from the environment.

Like test_l4.py, each test builds its own little mesh and waits on conditions, never on fixed
sleeps.
"""

import os
import re
import socket
import subprocess
import time

import pytest

from mesh import (LOOPBACK, EchoApp, assert_refused, closed_without_data, free_port, is_refused,
                  try_echo, wait_until)


def connect(port, timeout=10):
    return socket.create_connection((LOOPBACK, port), timeout=timeout)


def test_outbound_tries_another_endpoint_when_one_fails(mesh):
    """A passing endpoint that refuses connections must not fail the caller's connection:
    connectd moves on to the next endpoint. With a random pick and no retry, about half of
    these connections would fail."""
    m, api = mesh, mesh.api
    echo = m.app(EchoApp)
    db = m.add("db", app_port=echo.port)
    web = m.add("web", upstreams=("db",))
    m.wait_passing(db)

    # A second db instance, healthy by its (TTL) check, whose port nobody listens on.
    dead_port = free_port()
    dead_id = f"{db.name}-dead-proxy"
    api.register({
        "Kind": "connect-proxy", "Name": f"{db.name}-sidecar-proxy", "ID": dead_id,
        "Address": LOOPBACK, "Port": dead_port,
        "Proxy": {"DestinationServiceName": db.name, "DestinationServiceID": db.name,
                  "LocalServicePort": echo.port},
        "Checks": [{"CheckID": f"{dead_id}-ttl", "Name": "always passing", "TTL": "600s",
                    "Status": "passing"}],
    })
    m.registered.append(dead_id)
    wait_until(lambda: len(api.health_connect(db.name)) == 2, 15,
               "both db instances to be listed as passing")
    web.proxy.wait_log(r"upstream .*%s.*: 2 healthy endpoint" % db.name, timeout=15)

    for i in range(16):
        payload = f"attempt {i}\n".encode()
        assert try_echo(web.up["db"], payload), f"connection {i} failed with one dead endpoint"
    # The dead endpoint was really tried (and skipped) at least once.
    web.proxy.wait_log(r"endpoint 127\.0\.0\.1:%d failed: connect" % dead_port, timeout=5)


def test_handshake_timeout_closes_silent_client(mesh):
    """A client that connects to the public port and never speaks TLS is dropped after
    handshake_timeout_ms (Proxy.Config), not after the 10 s default."""
    m = mesh
    echo = m.app(EchoApp)
    db = m.add("db", app_port=echo.port, proxy_config={"handshake_timeout_ms": 300})
    with connect(db.public_port) as s:
        start = time.monotonic()
        closed, data = closed_without_data(s, timeout=3.0)
        took = time.monotonic() - start
    assert closed and data == b"", "a silent client outlived handshake_timeout_ms=300 by 3 s"
    assert took >= 0.2, f"closed after {took:.2f}s, before the timeout"
    db.proxy.wait_log(r"result=timeout reason=\"TLS handshake timed out\"")
    assert echo.accepted == 0


def test_local_app_down_is_refused_and_logged(mesh):
    """Inbound: when the local application does not accept, the caller's connection is
    closed and the session logs why; the proxy keeps serving once the app is back."""
    m = mesh
    app_port = free_port()
    db = m.add("db", app_port=app_port)
    web = m.add("web", upstreams=("db",))
    m.wait_passing(db)
    # Passing at the agent does not mean web's sidecar has heard of db yet: until it has, a
    # connection is refused by web ("no healthy endpoint"), so try until db itself refuses.
    logged = re.compile(r"result=local_connect_error reason=\"connect 127\.0\.0\.1:%d" % app_port)
    wait_until(lambda: is_refused(web.up["db"]) and logged.search(db.proxy.log()), 15,
               "a connection refused by db for want of its local app, and logged")

    m.app(EchoApp, app_port)
    m.wait_echo(web.up["db"], timeout=10, what="traffic once the local app is listening")


@pytest.mark.agent_hcl('default_intention_policy = "deny"')
def test_default_intention_policy_deny(fresh_mesh):
    """With the agent's default_intention_policy = "deny" and no intention, callers are
    refused (the response header still says the ACL default "allow"); an allow intention
    lets them through, and removing it denies again, closing the open connection."""
    m, api = fresh_mesh, fresh_mesh.api
    echo = m.app(EchoApp)
    db = m.add("db", app_port=echo.port)
    web = m.add("web", upstreams=("db",))
    m.wait_passing(db)
    db.proxy.wait_log(r"default_intention_policy is deny")
    # Refused by db's policy, not by web for want of an endpoint it has not heard of yet.
    denied = re.compile(r"result=denied reason=\"default policy deny\"")
    wait_until(lambda: is_refused(web.up["db"]) and denied.search(db.proxy.log()), 15,
               "a connection refused by db's default policy, and logged")
    assert echo.accepted == 0

    m.intend("db", {"web": "allow"})
    m.wait_echo(web.up["db"], timeout=10, what="traffic after an allow intention")
    with connect(web.up["db"]) as s:
        s.sendall(b"open\n")
        assert s.recv(16) == b"open\n"
        api.delete_intentions(db.name)
        closed, data = closed_without_data(s, timeout=5.0)
    assert closed and data == b"", "the open connection outlived the default deny"


def test_env_selectors_and_bad_flags(mesh, connectd_bin):
    """CONNECT_SIDECAR_FOR and CONSUL_HTTP_ADDR select the registration and the agent; bad
    flags and an unknown sidecar fail with a clear message and a non-zero status."""
    m = mesh
    echo = m.app(EchoApp)
    db = m.add("db", app_port=echo.port, start=False)
    web = m.add("web", upstreams=("db",))
    env = {"PATH": "/usr/bin:/bin", "CONNECT_SIDECAR_FOR": db.id,
           "CONSUL_HTTP_ADDR": f"http://{m.agent.http_addr}"}
    log_path = os.path.join(m.workdir, "connectd-db-env.log")
    m.on_log("connectd[db, from the environment]", log_path)
    with open(log_path, "wb") as log:
        p = subprocess.Popen([connectd_bin], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        m.wait_passing(db)
        m.wait_echo(web.up["db"], what="traffic through the connectd selected by environment")
    finally:
        p.terminate()
        assert p.wait(timeout=10) == 0

    r = subprocess.run([connectd_bin, "-workers", "zero", "-proxy-id", "x"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "-workers" in r.stderr, r.stderr
    r = subprocess.run([connectd_bin, "-sidecar-for", "no-such-service",
                        "-http-addr", m.agent.http_addr],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stderr
    assert "no sidecar proxy is registered for service ID no-such-service" in r.stderr
