"""Outbound L7 over HTTP/1.1 (issue 9 point 5): web's sidecar parses the requests of its
application when the upstream's protocol is http.

The protocol comes from the upstream's Config.protocol, else from the discovery chain (a
service-defaults entry's Protocol). Then each request head from the application is parsed
strictly by web's sidecar (a malformed one is answered 400 there and never reaches the mesh),
forwarded over mTLS with ALPN http/1.1, and logged per request in the access log (direction
outbound, the upstream, the endpoint). An endpoint that refuses before any byte of the request
was sent is retried on another one; none left is a 503 to the application, whose connection
stays. Both connections are kept alive.

Each test asserts something only an L7 outbound sidecar does (a 400 of its own, a per-request
outbound record, an ALPN offer), so against a build without outbound L7 (CONNECTD_BIN pointing
at a build of main, which relays every upstream at L4) each of them fails.
"""

import os
import re
import ssl
import tempfile
import urllib.parse

from mesh import (LOOPBACK, TcpApp, access_records, admin_args, admin_get, free_port,
                  sidecar_registration, wait_until)
from test_l7_inbound import HttpApp, Reader, connect, echo, get, response

# A head h1parse refuses (whitespace before the colon), which the HttpApp below accepts: a 400
# can only come from a sidecar that parses, a 200 means the bytes were relayed.
BAD_HEAD = b"GET /bad HTTP/1.1\r\nHost: db\r\nBad Header : x\r\n\r\n"


def records(path):
    return access_records(path)


def outbound_requests(path):
    """The access log's per-request records of the outbound direction."""
    return [x for x in records(path) if x.get("direction") == "outbound" and "method" in x]


def send_bad(port):
    """The status answered to BAD_HEAD on a new connection (None when none came)."""
    try:
        with connect(port) as s:
            s.sendall(BAD_HEAD)
            return response(Reader(s))[0]
    except (OSError, EOFError, AssertionError, ValueError):
        return None


def try_status(port, path="/", extra=""):
    try:
        with connect(port) as s:
            s.sendall(get(path, extra=extra))
            return response(Reader(s))[0]
    except (OSError, EOFError, AssertionError, ValueError):
        return None


def l7_pair(m, tmp_path, up_config=None, db_config=None, web_args=()):
    """db (behind it an HttpApp, Proxy.Config db_config) and web with upstream db (Config
    up_config) and an access log. Returns (app, db, web, web's access log path)."""
    app = m.app(HttpApp)
    db = m.add("db", app_port=app.port, proxy_config=db_config)
    alog = str(tmp_path / "web-access.log")
    web = m.add("web", upstreams=[{"name": "db", "config": up_config}], start=False)
    m.start(web, extra_args=("-access-log", alog, *web_args))
    m.wait_passing(db)
    wait_until(lambda: try_status(web.up["db"]) == 200, 30, "a request through the mesh")
    return app, db, web, alog


def add_dead_instance(m, logical, live_port):
    """Registers one more instance of <logical> whose sidecar port refuses connections but
    whose check (a TCP check on <live_port>, which accepts) passes: a registered, healthy
    endpoint that is dead. Returns its sidecar port."""
    name = m.name(logical)
    sid = f"{name}-dead"
    dead = free_port()
    body = sidecar_registration(name, live_port, dead, service_id=sid)
    body["Connect"]["SidecarService"]["Checks"][0]["TCP"] = f"{LOOPBACK}:{live_port}"
    m.api.register(body)
    m.registered.append(sid)
    return dead


def test_upstream_config_protocol_http(mesh, tmp_path):
    """Config.protocol http on the upstream: requests pass with keep-alive on both legs (three
    requests on one application connection ride one mesh connection), each has an outbound
    access-log record naming the upstream and the endpoint, X-Request-Id is set by the
    outbound sidecar, and a malformed head is answered 400 by web's sidecar without reaching
    db (db's application sees no such request)."""
    m = mesh
    app, db, web, alog = l7_pair(m, tmp_path, up_config={"protocol": "http"},
                                 db_config={"protocol": "http"})
    before = app.connections
    with connect(web.up["db"]) as s:
        r = Reader(s)
        for i in range(3):
            s.sendall(get(f"/ka{i}", extra="Connection: keep-alive, x-hop\r\nX-Hop: 1\r\n"))
            status, headers, body, _ = response(r)
            assert status == 200, body
            seen = echo(body)
            assert seen["target"] == f"/ka{i}"
            assert "x-hop" not in seen["headers"], seen  # hop-by-hop removed
            assert len(seen["headers"]["x-request-id"]) == 1
        # The malformed head: 400 from web's sidecar, which closes the connection.
        s.sendall(BAD_HEAD)
        status, headers, _, _ = response(r)
        assert status == 400 and headers.get("connection") == ["close"], (status, headers)
    # It was web's sidecar that answered: db's (L7 too) never saw a bad request.
    assert "result=bad_request" not in db.proxy.log()
    # One mesh connection carried the three requests, so db dialled its app at most once
    # (none when it was the warm-up's, pooled by this worker).
    assert app.connections in (before, before + 1)
    wait_until(lambda: len([x for x in outbound_requests(alog)
                            if x["path"].startswith("/ka")]) == 3, 10, "three records")
    recs = [x for x in outbound_requests(alog) if x["path"].startswith("/ka")]
    assert len({x["conn"] for x in recs}) == 1
    for x in recs:
        assert x["upstream"] == db.name and x["status"] == 200 and x["result"] == "ok", x
        assert x["endpoint"] == f"{LOOPBACK}:{db.public_port}", x
        assert x["destination"] == m.api.spiffe_id(db.name), x
    wait_until(lambda: any(x["status"] == 400 for x in outbound_requests(alog)), 10, "the 400")
    bad = [x for x in outbound_requests(alog) if x["status"] == 400][-1]
    assert bad["result"] == "bad_request", bad
    web.proxy.wait_log(r"discovery chain .*protocol http")


def test_upstream_connections_pooled_across_application_connections(mesh, tmp_path):
    """An idle upstream connection left by one application connection serves the next one
    (one worker, so every connection meets the same pool): five application connections in a
    row, one request each, ride one mesh connection, so db's sidecar dials its app once; web
    logs and counts the reuse. Without the pool each would make a mesh connection and db an
    app one. When the snapshot changes the upstream away (here to tcp) the idle connection is
    closed."""
    m = mesh
    args, admin = admin_args()
    app, db, web, alog = l7_pair(m, tmp_path, up_config={"protocol": "http"},
                                 db_config={"protocol": "http"},
                                 web_args=("-workers", "1", *args))
    before = app.connections

    def pooled():
        return "connectd_upstream_pool_idle_connections 1\n" in admin_get(admin, "/metrics")[1]
    for i in range(5):
        # The previous application connection's close must have reached the sidecar (its
        # upstream connection is in the pool) before the next connects: else the two race on
        # the worker's loop, and the next may dial before the pool has anything.
        wait_until(pooled, 10, "the upstream connection back in the pool")
        assert try_status(web.up["db"], f"/pool{i}") == 200
    assert app.connections == before
    assert web.proxy.log().count("reusing a pooled connection") >= 5
    _, text = admin_get(admin, "/metrics")
    assert re.search(r"^connectd_upstream_pool_reused_total ([5-9]|\d\d+)$", text, re.M), text
    wait_until(lambda: "connectd_upstream_pool_idle_connections 1\n"
               in admin_get(admin, "/metrics")[1], 10, "one idle pooled connection")
    # The upstream becomes tcp: the pooled connection no longer fits the snapshot and is
    # closed by the sweep (the pool serves http upstreams only).
    web.upstreams["db"]["config"] = {"protocol": "tcp"}
    m.register(web)
    wait_until(lambda: "connectd_upstream_pool_idle_connections 0\n"
               in admin_get(admin, "/metrics")[1], 10, "the pooled connection closed")


def test_idle_pooled_connection_closed_by_the_far_side_leaves_the_pool(mesh, tmp_path):
    """db's sidecar closes an idle inbound connection after 500 ms: web's idle pooled
    connection must see that end at once and leave the pool (metric back to 0, a DEBUG line),
    not sit there until the 30 s sweep or the next request. Before, a TLS connection entered
    the pool with the wants of its last read, nothing after a read that returned bytes, so its
    descriptor was not watched and the far side's close went unnoticed."""
    m = mesh
    args, admin = admin_args()
    app, db, web, alog = l7_pair(m, tmp_path, up_config={"protocol": "http"},
                                 db_config={"protocol": "http", "local_idle_timeout_ms": 500},
                                 web_args=("-workers", "1", *args))

    def idle(n):
        return f"connectd_upstream_pool_idle_connections {n}\n" in admin_get(admin, "/metrics")[1]

    # l7_pair's own requests may have left a connection that db already closed: start clean.
    wait_until(lambda: idle(0), 5, "no idle pooled connection")
    closed = web.proxy.log().count("pooled upstream connection to")
    assert try_status(web.up["db"], "/once") == 200
    wait_until(lambda: web.proxy.log().count("pooled upstream connection to") > closed, 5,
               "web noticing that db closed the idle pooled connection")
    assert idle(0)


def test_chain_protocol_from_service_defaults_and_its_change(mesh, tmp_path):
    """No Config.protocol in web's registration: the destination's service-defaults decides
    (the agent also merges its Protocol into the upstream's Config.protocol, and the chain is
    compiled for it). Without an entry the upstream is tcp and bytes are relayed (the
    malformed head reaches the app: 200); once service-defaults says http, new connections
    are parsed (400 from web's sidecar, and outbound per-request records), while a connection
    opened before stays L4. db's own sidecar is pinned to tcp in its registration, so a 400
    can only come from web's."""
    m = mesh
    app, db, web, alog = l7_pair(m, tmp_path, db_config={"protocol": "tcp"})
    assert send_bad(web.up["db"]) == 200  # relayed at L4
    old = connect(web.up["db"])
    try:
        assert m.api.put("/v1/config", {"Kind": "service-defaults", "Name": db.name,
                                        "Protocol": "http"}) is True
        wait_until(lambda: send_bad(web.up["db"]) == 400, 30, "new connections parsed (400)")
        assert try_status(web.up["db"], "/after") == 200
        wait_until(lambda: any(x["path"] == "/after" for x in outbound_requests(alog)), 10,
                   "an outbound record of the request")
        # The connection opened under tcp still relays.
        old.sendall(BAD_HEAD)
        assert response(Reader(old))[0] == 200
    finally:
        old.close()
        m.api.delete("/v1/config/service-defaults/" + urllib.parse.quote(db.name))


def test_dead_endpoint_retried_and_none_left_is_503(mesh, tmp_path):
    """Two healthy endpoints, one refusing connections: every request succeeds, on a new
    application connection each time that closes after it (so its upstream connection is not
    pooled and each request dials again), the dead endpoint being retried
    around before any byte of the request was sent; the outbound records all say 200. With
    only the dead endpoint left the application gets 503 and its connection stays open."""
    m = mesh
    app, db, web, alog = l7_pair(m, tmp_path, up_config={"protocol": "http"},
                                 db_config={"protocol": "http"})
    add_dead_instance(m, "db", app.port)
    wait_until(lambda: len(m.api.health_connect(db.name)) == 2, 30, "two healthy endpoints")
    web.proxy.wait_log(r"target .*: 2 healthy endpoint\(s\)")
    for i in range(20):
        assert try_status(web.up["db"], f"/r{i}", extra="Connection: close\r\n") == 200
    wait_until(lambda: len([x for x in outbound_requests(alog)
                            if x["path"].startswith("/r")]) == 20, 10, "twenty records")
    assert all(x["status"] == 200 for x in outbound_requests(alog) if x["path"].startswith("/r"))
    assert "failed: connect" in web.proxy.log()  # the dead one was tried and passed over

    # Only the dead one left: db's live sidecar goes away (deregistered).
    m.api.deregister(db.id)
    wait_until(lambda: len(m.api.health_connect(db.name)) == 1, 30, "one (dead) endpoint")
    wait_until(lambda: try_status(web.up["db"], "/gone") == 503, 30, "a 503")
    with connect(web.up["db"]) as s:
        r = Reader(s)
        for _ in range(2):
            s.sendall(get("/none"))
            status, _, body, _ = response(r)
            assert status == 503 and body.startswith(b"upstream connect error"), (status, body)
    wait_until(lambda: any(x["path"] == "/none" and x["result"] == "upstream_connect_error"
                           for x in outbound_requests(alog)), 10, "a 503 record")


class AlpnServer(TcpApp):
    """A TLS server acting as a sidecar endpoint of <service>: it presents the agent's leaf
    for it, records per connection the ALPN protocol chosen (None when the client offered
    none; it accepts http/1.1 only), and answers one HTTP request."""

    def __init__(self, api, service, workdir):
        leaf = api.leaf(service)
        cert = os.path.join(workdir, f"{service}.pem")
        key = os.path.join(workdir, f"{service}.key")
        with open(cert, "w") as f:
            f.write(leaf["CertPEM"])
        with open(key, "w") as f:
            f.write(leaf["PrivateKeyPEM"])
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.load_verify_locations(cadata=api.roots_pem())
        self.ctx.verify_mode = ssl.CERT_OPTIONAL
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.offers = []
        super().__init__()

    def handle(self, conn):
        conn.settimeout(10)
        try:
            t = self.ctx.wrap_socket(conn, server_side=True)
        except ssl.SSLError:
            return
        self.offers.append(t.selected_alpn_protocol())
        data = b""
        while b"\r\n\r\n" not in data:
            d = t.recv(4096)
            if not d:
                return
            data += d
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        t.close()


def test_alpn_http11_offered_for_http_upstreams_only(mesh):
    """The mesh hop of an http upstream offers ALPN http/1.1 (seen by a TLS server acting as
    the endpoint, with the agent's leaf for the service); a tcp upstream offers none."""
    m = mesh
    workdir = tempfile.mkdtemp(dir=m.workdir)
    servers = {}
    for logical in ("dbh", "dbt"):
        name = m.name(logical)
        srv = AlpnServer(m.api, name, workdir)
        m.apps.append(srv)
        body = sidecar_registration(name, free_port(), srv.port)
        m.api.register(body)
        m.registered.append(name)
        m.api.wait_passing(name, port=srv.port)
        servers[logical] = srv
    web = m.add("web", upstreams=[{"name": "dbh", "config": {"protocol": "http"}},
                                  {"name": "dbt", "config": {"protocol": "tcp"}}])
    wait_until(lambda: try_status(web.up["dbh"]) == 200, 30, "a request to dbh")
    wait_until(lambda: try_status(web.up["dbt"]) == 200, 30, "a request to dbt")
    assert "http/1.1" in servers["dbh"].offers, servers["dbh"].offers
    assert "http/1.1" not in servers["dbt"].offers and None in servers["dbt"].offers, \
        servers["dbt"].offers
