"""Outbound L7 routing (issue 10): each request of an http upstream takes the first route of
its discovery chain that matches it, and goes to an endpoint of the resolver its split names,
as Envoy routes a request to its route's cluster. The chain comes from service-router,
service-splitter and service-resolver config entries written through the REAL agent's API.

Which instance answered is read from the X-Forwarded-Client-Cert its sidecar adds: By= names
the service whose sidecar forwarded the request.
"""

import json
import urllib.parse

from mesh import wait_until
from test_l7_inbound import HttpApp, Reader, connect, get, response


def answered_by(m, body):
    """The logical service (db or db2) whose sidecar forwarded the request."""
    xfcc = json.loads(body)["headers"]["x-forwarded-client-cert"][0]
    by = xfcc.split(";")[0]
    assert by.startswith("By="), xfcc
    svc = by.rsplit("/", 1)[1]
    for logical in ("db2", "db"):
        if svc == m.name(logical):
            return logical
    raise AssertionError(f"unknown service in {xfcc}")


def routed_mesh(m):
    """db and db2 (protocol http, each behind its own HttpApp) and web with upstream db.
    Returns web."""
    for logical in ("db", "db2"):
        m.service_defaults(logical, "http")
        app = m.app(HttpApp)
        m.wait_passing(m.add(logical, app_port=app.port))
    return m.add("web", upstreams=["db"])


def delete_entries(m):
    for kind in ("service-router", "service-splitter", "service-resolver"):
        try:
            m.api.delete(f"/v1/config/{kind}/" + urllib.parse.quote(m.name("db")))
        except Exception:  # noqa: BLE001 (cleanup: the agent may be gone)
            pass


def ask(sock, path):
    sock.sendall(get(path))
    return response(Reader(sock))


def test_router_sends_each_request_of_a_connection_to_its_route(mesh):
    """A router sends /two... to db2 and the rest to db (the compiler's catch-all). On one
    keep-alive connection from the application, requests alternate between the two: each goes
    where its own route says, the connection to the other service waiting in the pool. Without
    routing every request went to db."""
    m = mesh
    web = routed_mesh(m)
    try:
        m.api.set_config_entry({
            "Kind": "service-router", "Name": m.name("db"),
            "Routes": [{"Match": {"HTTP": {"PathPrefix": "/two"}},
                        "Destination": {"Service": m.name("db2")}}]})

        def routed():
            try:
                with connect(web.up["db"]) as s:
                    st, _, body, _ = ask(s, "/two")
                    return st == 200 and answered_by(m, body) == "db2"
            except (OSError, EOFError, AssertionError, ValueError, KeyError):
                return False
        wait_until(routed, 30, "/two routed to db2")
        with connect(web.up["db"]) as s:
            seen = []
            for path in ("/two", "/", "/two/x?y=1", "/other", "/two", "/tw"):
                st, _, body, _ = ask(s, path)
                assert st == 200, (path, st, body)
                seen.append(answered_by(m, body))
        assert seen == ["db2", "db", "db2", "db", "db2", "db"], seen
    finally:
        delete_entries(m)
