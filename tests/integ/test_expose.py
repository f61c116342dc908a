"""Expose paths (issue 10 item 8): Proxy.Expose.Paths and Expose.Checks against the real agent.

An exposed path is served on a plain listener of the sidecar's address, without mTLS and
without a caller identity: exactly the listed paths reach the application (at LocalPathPort,
over HTTP/1.1 or h2c by Protocol), every other request is answered 404 by connectd. With
Expose.Checks the agent sends the parent service's HTTP and gRPC checks to a port it assigns
each check (ExposedPort, from expose_min_port..expose_max_port) on the proxy's address, and
connectd must serve them there, as Envoy does for Consul.
"""

import json
import re
import socket
import threading
from concurrent import futures

import grpc
import pytest

from mesh import (HttpEchoApp, LOOPBACK, TcpApp, access_records, admin_args, admin_get, free_port,
                  header_values, http_request, metric, parse_metrics, port_accepts, port_refuses,
                  sidecar_registration, try_http, wait_until)
from test_l7_h2 import H2App, h2_get


def register(m, svc, expose, checks=None):
    """(Re-)registers svc with its sidecar's Proxy.Expose = <expose> and the parent's checks."""
    body = sidecar_registration(svc.name, svc.app_port, svc.public_port)
    body["Connect"]["SidecarService"]["Proxy"]["Expose"] = expose
    if checks is not None:
        body["Checks"] = checks
    m.api.register(body)
    if svc.name not in m.registered:
        m.registered.append(svc.name)


def start(m, logical, app_port, expose, checks=None, access_log=None):
    svc = m.add(logical, app_port=app_port, start=False)
    register(m, svc, expose, checks)
    args, admin = admin_args()
    if access_log is not None:
        args += ["-access-log", access_log, "-access-log-format", "json"]
    m.start(svc, extra_args=args)
    return svc, admin


def status_of(port, target, headers=()):
    r = try_http(port, "GET", target, headers=headers)
    return r.status if r is not None else None


def test_exposed_path_reaches_the_app_and_nothing_else(mesh, tmp_path):
    """Without the feature nothing listens on the exposed port. With it: GET /health (query
    allowed) reaches the app in plain HTTP with X-Forwarded-Proto http and without any
    X-Forwarded-Client-Cert (a forged one is dropped); every other path of the app, and
    tricks that only look like /health, get connectd's 404 and never reach the app; the
    refusals are counted in /metrics and logged with the listener's name."""
    m = mesh
    app = m.app(HttpEchoApp)
    port = free_port()
    alog = str(tmp_path / "access.log")
    svc, admin = start(m, "web", app.port,
                       {"Paths": [{"ListenerPort": port, "Path": "/health",
                                   "LocalPathPort": app.port}]}, access_log=alog)
    svc.proxy.wait_port(port)

    r = http_request(port, "GET", "/health?verbose=1",
                     headers=[("X-Forwarded-Client-Cert", "By=spiffe://forged;URI=spiffe://x")])
    assert r.status == 200, str(r)
    seen = r.json()
    assert seen["target"] == "/health?verbose=1"
    assert header_values(seen["headers"], "x-forwarded-client-cert") == []
    assert header_values(seen["headers"], "x-forwarded-proto") == ["http"]

    refused = ["/other", "/health/", "/healthz", "/health/../admin", "/HEALTH", "/%68ealth",
               "//health", "/"]
    for target in refused:
        r = http_request(port, "GET", target)
        assert r.status == 404, f"{target}: {r}"
    # An absolute-form request names the path the same way.
    r = http_request(port, "GET", f"http://{LOOPBACK}:{port}/health")
    assert r.status == 200, str(r)
    assert not app.seen(lambda q: q["path"] != "/health" and not q["path"].startswith("http")), \
        "a path that is not exposed reached the application"

    mt = parse_metrics(admin_get(admin, "/metrics")[1])
    assert metric(mt, "connectd_expose_refused_total", listener=f"expose:{port}") == len(refused)

    def records():
        return access_records(alog)

    recs = wait_until(lambda: [r for r in records() if r.get("status") == 404
                               and r.get("path") == "/other"], 10, "the 404 access-log record")
    assert recs[0]["listener"] == f"expose:{port}"
    assert recs[0]["result"] == "not_found"
    ok = [r for r in records() if r.get("status") == 200]
    assert ok and all(r["listener"] == f"expose:{port}" for r in ok)

    # The public listener still speaks only mTLS: the exposed path is not served there.
    assert try_http(svc.public_port, "GET", "/health") is None


def test_expose_paths_follow_the_registration_live(mesh):
    """Adding listeners and removing them are applied by the running process (no restart),
    like its upstream listeners; a registration connectd refuses (a path without its leading
    slash, which the agent accepts) keeps the last good paths."""
    m = mesh
    app = m.app(HttpEchoApp)
    p1, p2, p3 = free_port(), free_port(), free_port()
    one = {"ListenerPort": p1, "Path": "/health", "LocalPathPort": app.port}
    svc, _ = start(m, "web", app.port, {"Paths": [one]})
    svc.proxy.wait_port(p1)
    pid = svc.proxy.pid
    assert status_of(p1, "/health") == 200
    assert status_of(p1, "/ready") == 404
    assert port_refuses(p2) and port_refuses(p3)

    register(m, svc, {"Paths": [one, {"ListenerPort": p3, "Path": "/ready",
                                      "LocalPathPort": app.port},
                                {"ListenerPort": p2, "Path": "/metrics",
                                 "LocalPathPort": app.port, "Protocol": "http"}]})
    wait_until(lambda: status_of(p3, "/ready") == 200, 20, "/ready exposed live")
    wait_until(lambda: status_of(p2, "/metrics") == 200, 20, "a second exposed listener")
    assert status_of(p2, "/health") == 404  # each listener has its own paths
    assert status_of(p1, "/ready") == 404

    register(m, svc, {"Paths": [one, {"ListenerPort": p3, "Path": "no-slash",
                                      "LocalPathPort": app.port}]})
    svc.proxy.wait_log(r"Proxy\.Expose\.Paths\[1\]\.Path \\?\"no-slash\\?\" must begin with /.*"
                       r"keeping the previous configuration", timeout=20)
    assert status_of(p2, "/metrics") == 200, "a refused registration changed the listeners"
    assert status_of(p3, "/ready") == 200

    register(m, svc, {"Paths": [one]})
    wait_until(lambda: port_refuses(p2) and port_refuses(p3), 20, "the removed listeners to close")
    assert status_of(p1, "/health") == 200
    assert svc.proxy.pid == pid and svc.proxy.alive()


def test_expose_path_over_http2_to_an_h2c_app(mesh):
    """Protocol http2: the application speaks h2c. An HTTP/1.1 caller is translated, an h2c
    caller (prior knowledge, as the agent's gRPC checks speak) is carried stream by stream;
    either way only the exposed path reaches the app, without XFCC."""
    m = mesh
    app = H2App()
    m.apps.append(app)
    port = free_port()
    svc, admin = start(m, "web", app.port,
                       {"Paths": [{"ListenerPort": port, "Path": "/status",
                                   "LocalPathPort": app.port, "Protocol": "http2"}]})
    svc.proxy.wait_port(port)

    st, hs, body, reset = h2_get(port, "/status?n=201", authority="web")
    assert (st, reset) == (201, None), (st, hs, body)
    seen = json.loads(body)
    assert seen["path"] == "/status?n=201"
    assert "x-forwarded-client-cert" not in seen["headers"]
    assert seen["headers"]["x-forwarded-proto"] == ["http"]

    st, _, _, _ = h2_get(port, "/other", authority="web")
    assert st == 404

    r = http_request(port, "GET", "/status?n=202")
    assert r.status == 202, str(r)
    assert json.loads(r.body)["headers"][":path"] == ["/status?n=202"]
    assert status_of(port, "/reset") == 404
    assert app.connections >= 1
    mt = parse_metrics(admin_get(admin, "/metrics")[1])
    assert metric(mt, "connectd_expose_refused_total", listener=f"expose:{port}") == 2


class HealthApp(TcpApp):
    """An HTTP/1.1 app whose GET /health answers 200 "ok" or, after fail(), 503; every
    request is recorded with its headers. One request per connection."""

    def __init__(self):
        self.healthy = True
        self.requests = []
        super().__init__()

    def handle(self, conn):
        buf = b""
        while b"\r\n\r\n" not in buf:
            b = conn.recv(65536)
            if not b:
                return
            buf += b
        line, *rest = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        target = line.split(" ")[1]
        with self._lock:
            self.requests.append((target, [h.split(":", 1)[0].lower() for h in rest]))
        ok = target.split("?")[0] == "/health" and self.healthy
        body = b"ok" if ok else b"unhealthy"
        conn.sendall(b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (b"200 OK" if ok else b"503 Service Unavailable", len(body), body))


def grpc_health_server():
    """A grpcio server (h2c) whose grpc.health.v1.Health/Check answers SERVING (status 1)
    while <state>["serving"], else NOT_SERVING (2); it counts the checks it got."""
    state = {"serving": True, "calls": 0}

    def check(req, ctx):
        state["calls"] += 1
        return b"\x08\x01" if state["serving"] else b"\x08\x02"

    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)})
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port(f"{LOOPBACK}:0")
    srv.start()
    return srv, port, state


def agent_check(m, svc, name):
    for c in m.api.get("/v1/agent/checks").values():
        if c["ServiceID"] == svc.id and c["Name"] == name:
            return c
    return None


def test_expose_checks_sends_the_agents_http_check_through_connectd(mesh):
    """Expose.Checks: the agent rewrites the parent's HTTP check to its ExposedPort on the
    sidecar's address. Without connectd serving that port the check stays critical
    (connection refused); with it the check passes through connectd (its output names the
    exposed port, and the app sees X-Forwarded-Proto from the proxy), fails when the app's
    health path fails, and passes again when it recovers. Any other path on that port is 404."""
    m = mesh
    app = m.app(HealthApp)
    checks = [{"Name": "web-health", "HTTP": f"http://{LOOPBACK}:{app.port}/health?probe=1",
               "Interval": "1s", "Timeout": "2s"}]
    svc, admin = start(m, "web", app.port, {"Checks": True}, checks=checks)

    c = wait_until(lambda: (agent_check(m, svc, "web-health") or {}).get("ExposedPort"), 20,
                   "the agent to assign the check an exposed port")
    port = int(c)
    lo, hi = m.agent.ports["expose"]
    assert lo <= port <= hi
    wait_until(lambda: agent_check(m, svc, "web-health")["Status"] == "passing", 30,
               "the exposed HTTP check to pass through connectd")
    out = agent_check(m, svc, "web-health")["Output"]
    assert f":{port}/health?probe=1: 200 OK" in out, out
    assert any(t == "/health?probe=1" and "x-forwarded-proto" in h for t, h in app.requests)
    assert status_of(port, "/other") == 404

    app.healthy = False
    wait_until(lambda: agent_check(m, svc, "web-health")["Status"] == "critical", 30,
               "the check to fail with the app's health path")
    assert "503" in agent_check(m, svc, "web-health")["Output"]
    app.healthy = True
    wait_until(lambda: agent_check(m, svc, "web-health")["Status"] == "passing", 30,
               "the check to pass again")
    mt = parse_metrics(admin_get(admin, "/metrics")[1])
    assert metric(mt, "connectd_expose_refused_total", listener=f"expose:{port}") == 1

    # Expose.Checks turned off: the agent checks the app directly again, connectd closes it.
    register(m, svc, {}, checks=checks)
    wait_until(lambda: port_refuses(port), 20, "the check listener to close")


def test_expose_checks_grpc_check_over_h2c(mesh):
    """A gRPC check with Expose.Checks goes to Consul's fixed path
    /grpc.health.v1.Health/Check over h2c, through connectd to the app's port."""
    m = mesh
    srv, gport, state = grpc_health_server()
    try:
        checks = [{"Name": "web-grpc", "GRPC": f"{LOOPBACK}:{gport}", "Interval": "1s",
                   "Timeout": "2s"}]
        svc, _ = start(m, "web", gport, {"Checks": True}, checks=checks)
        wait_until(lambda: (agent_check(m, svc, "web-grpc") or {}).get("Status") == "passing",
                   30, "the exposed gRPC check to pass through connectd")
        c = agent_check(m, svc, "web-grpc")
        assert c["ExposedPort"] and str(c["ExposedPort"]) in c["Output"], c
        state["serving"] = False
        wait_until(lambda: agent_check(m, svc, "web-grpc")["Status"] == "critical", 30,
                   "the gRPC check to fail with the app")
        assert state["calls"] > 0
    finally:
        srv.stop(0)
