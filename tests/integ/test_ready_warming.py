"""Start-up waits for the upstreams, as Envoy's initial cluster warming does: no listener opens
and /ready answers 503, naming the upstream, until each upstream's discovery chain has come and
the primary target of each of its resolvers has had its first health answer, for at most 15 s
(Envoy's initial_fetch_timeout); then connectd is ready anyway, with a WARN naming it."""

import re
import threading
import urllib.parse

import pytest

from mesh import (AgentInterposer, EchoApp, HttpEchoApp, admin_args, admin_get, port_refuses,
                  try_echo, try_http, wait_until)


@pytest.fixture
def hop(agent):
    """Requested before mesh, so it outlives the connectd processes that talk through it."""
    h = AgentInterposer(agent.http_addr)
    yield h
    for event in h.held.values():
        event.set()
    h.stop()


def ready(port):
    """(status, body) of /ready, or None while the admin endpoint does not answer."""
    try:
        return admin_get(port, "/ready", timeout=2)
    except OSError:
        return None


def not_ready_for_upstream(admin, db):
    """Waits until web's /ready names upstream db as what it waits for (the leaf and the
    intentions come first); fails at once if /ready answers 200 meanwhile. Returns the body."""
    def reason():
        status, body = ready(admin)
        assert status == 503, f"/ready answered {status} {body!r} before db had any endpoint"
        return body if "upstream" in body else None
    body = wait_until(reason, 20, "/ready to name the upstream it waits for")
    assert re.search(r"^waiting for upstream \S*" + re.escape(db.name) + r"\b", body), body
    return body


def web_behind(m, hop, protocol=None):
    """db (an app behind its sidecar, passing) and web with upstream db, web's sidecar (admin
    endpoint on) talking to the agent through <hop>, which holds every query for db's
    endpoints. Returns (db, web, web's admin port, the held path's event)."""
    if protocol is not None:
        m.service_defaults("db", protocol)
    app = m.app(HttpEchoApp if protocol == "http" else EchoApp)
    db = m.add("db", app_port=app.port)
    m.wait_passing(db)
    held = threading.Event()
    hop.held["/v1/health/connect/" + urllib.parse.quote(db.name)] = held
    web = m.add("web", upstreams=["db"], start=False)
    args, admin = admin_args()
    web.proxy = m.start_connectd(web.name, ["-sidecar-for", web.id, "-http-addr", hop.http_addr,
                                            "-log-level", "debug", *args])
    # The window is real: web's sidecar has asked for db's endpoints and has no answer yet.
    wait_until(lambda: any(p.startswith("/v1/health/connect/" + urllib.parse.quote(db.name))
                           for p in hop.paths), 30, "web's sidecar to ask for db's endpoints")
    wait_until(lambda: ready(admin) is not None, 20, "web's admin endpoint to answer")
    return db, web, admin, held


def test_not_ready_until_the_first_endpoints_of_each_upstream(hop, mesh):
    """Regression: connectd published its first snapshot, opened its upstream listeners and
    answered /ready 200 as soon as its certificates and intentions had come, before db's
    chain or health watch had answered, so a request at start-up got a 503 "no healthy
    endpoint" (L7) or a closed connection (L4). While the agent's answer about db's endpoints
    is held here, /ready must say 503 and name db, and the upstream port must not accept; the
    first request once ready gets its answer."""
    m = mesh
    db, web, admin, held = web_behind(m, hop, protocol="http")
    body = not_ready_for_upstream(admin, db)
    assert "the first health answer of its target " + db.name in body, body
    assert port_refuses(web.up["db"]), "the upstream listener opened before db's endpoints"

    held.set()
    wait_until(lambda: ready(admin)[0] == 200, 30, "/ready to answer 200 once db answered")
    r = try_http(web.up["db"], "GET", "/first")
    assert r is not None and r.status == 200, f"the first request after ready: {r}"
    assert r.json()["path"] == "/first", r


def test_ready_after_the_bound_without_the_upstreams_endpoints(hop, mesh):
    """The wait is bounded: when the agent never answers about db's endpoints, connectd is
    ready after 15 s with a WARN naming db (a request to db then finds no endpoint), and db's
    endpoints serve as soon as they come."""
    m = mesh
    db, web, admin, held = web_behind(m, hop)
    not_ready_for_upstream(admin, db)
    web.proxy.wait_log(r"\[WARN\] upstream \S*" + re.escape(db.name) + r": target \S+ of the first "
                       r"discovery chain has no health answer after 15000 ms; ready without its "
                       r"endpoints", timeout=30)
    wait_until(lambda: ready(admin)[0] == 200, 10, "/ready to answer 200 after the bound")
    web.proxy.wait_port(web.up["db"])
    assert not try_echo(web.up["db"]), "an echo through db before any endpoint of db was known"

    held.set()
    wait_until(lambda: try_echo(web.up["db"]), 30, "db to serve once its endpoints came")
