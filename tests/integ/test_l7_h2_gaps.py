"""What was left of issue 9 where the two legs of a hop differ, or an HTTP/2 connection dies.

1. An h2c application calling an `http` upstream: its connection is served by mux_h2, and each
   stream becomes an HTTP/1.1 exchange over mTLS (ALPN http/1.1) with an endpoint of the
   upstream. Before, the h2c bytes were relayed at L4 to the upstream's sidecar, which serves
   an `http` service's mesh hop as HTTP/1.1 per request (so its access log showed HTTP/2 and
   no ALPN), and an endpoint was chosen once per connection.
2. `Expect: 100-continue` from an HTTP/1.1 caller toward an h2c application (an http2 service,
   mux_h1 translating): connectd answers 100 itself when the stream is open (Envoy's default,
   proxy_100_continue off) and forwards no expectation. Before, the caller waited for a 100
   that an h2c server does not send, and the application waited for the body.
3. An HTTP/2 stream lost with its connection (closed without GOAWAY) before any byte of its
   answer: the request, held, is opened once more on a new connection. Before: 503.
"""

import json
import time
import socket
import threading

import h2.config
import h2.connection
import h2.events

from mesh import LOOPBACK, TcpApp, h2_many, h2_status, wait_until
from test_l7_inbound import Reader, connect, response
from test_l7_translate import MtlsCaller, h2_pair, try_status


class DropsOnceApp(TcpApp):
    """h2c (prior knowledge), or HTTP/2 over TLS when <ctx> is given (a stand-in for a
    sidecar). A request whose path starts with /drop is, the first time that path is asked
    for, read whole and then answered by closing the connection (no GOAWAY, no RST_STREAM):
    the connection dies under it. Every other request is answered 200 with JSON {path,
    body_len, headers, conn}. self.dropped lists the paths dropped, self.connections counts
    connections."""

    def __init__(self, ctx=None):
        self.ctx = ctx
        self.connections = 0
        self.dropped = []
        self.lock = threading.Lock()
        super().__init__()

    def handle(self, c):
        if self.ctx is not None:
            try:
                c = self.ctx.wrap_socket(c, server_side=True)
            except (OSError, ValueError):
                return
        with self.lock:
            self.connections += 1
            me = self.connections
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                    header_encoding="utf-8"))
        conn.initiate_connection()
        c.sendall(conn.data_to_send())
        reqs = {}
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        hs = {}
                        for k, v in ev.headers:
                            hs.setdefault(k, []).append(v)
                        reqs[ev.stream_id] = {"headers": hs, "body_len": 0}
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        if ev.stream_id in reqs:
                            reqs[ev.stream_id]["body_len"] += len(ev.data)
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in reqs:
                        r = reqs.pop(ev.stream_id)
                        path = r["headers"][":path"][0]
                        with self.lock:
                            drop = path.startswith("/drop") and path not in self.dropped
                            if drop:
                                self.dropped.append(path)
                        if drop:
                            c.shutdown(socket.SHUT_RDWR)
                            return
                        body = json.dumps({"path": path, "body_len": r["body_len"],
                                           "headers": r["headers"], "conn": me}).encode()
                        conn.send_headers(ev.stream_id, [(":status", "200"),
                                                         ("content-length", str(len(body)))])
                        conn.send_data(ev.stream_id, body, end_stream=True)
                c.sendall(conn.data_to_send())
        except Exception:  # noqa: BLE001 - a test app: any failure ends its connection
            return


def expect_exchange(s, path=b"/expect", body=b"0123456789"):
    """Sends a head with Expect: 100-continue, requires a 100 Continue within 5 s (the
    caller's part of RFC 9110 section 10.1.1 is to wait for it), then the body: the final
    answer (status, JSON seen by the app)."""
    r = Reader(s)
    s.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: db\r\nContent-Length: %d\r\n"
              b"Expect: 100-continue\r\n\r\n" % len(body))
    s.settimeout(5)
    try:
        head = r.head()
    except socket.timeout:
        head = None
    assert head is not None and head[0].startswith("HTTP/1.1 100"), \
        f"no 100 Continue within 5 s: {head}"
    s.settimeout(10)
    s.sendall(body)
    status, _, data, _ = response(r)
    return status, json.loads(data)


def test_expect_100_continue_toward_an_h2c_application(mesh, tmp_path):
    """An HTTP/1.1 caller with Expect: 100-continue and a body, to db (http2, an h2c-only
    application): the caller gets 100 Continue before it sends its body, then the answer; the
    application saw the whole body and no Expect field. Both where mux_h1 translates: db's
    inbound (a caller offering ALPN http/1.1) and web's outbound (an HTTP/1.1 client of an
    http2 upstream). Before: no 100 ever came (the h2c server sends none), the body was never
    sent."""
    m = mesh
    app, db, web = h2_pair(m, db_args=("-workers", "1"))
    caller = MtlsCaller(m.api, tmp_path, web.name, db)
    wait_until(lambda: caller.status() == 200, 30, "an HTTP/1.1 request over mTLS")
    with caller.connect() as s:
        status, seen = expect_exchange(s)
        assert status == 200 and seen["body_len"] == 10, seen
        assert "expect" not in seen["headers"], seen
        # The connection goes on after it.
        s.sendall(b"GET /next HTTP/1.1\r\nHost: db\r\n\r\n")
        assert response(Reader(s))[0] == 200
    wait_until(lambda: try_status(web.up["db"]) == 200, 30, "a request through web's outbound")
    with connect(web.up["db"]) as s:
        status, seen = expect_exchange(s, b"/outbound", b"x" * 3000)
        assert status == 200 and seen["body_len"] == 3000, seen
        assert "expect" not in seen["headers"], seen


def drop_pair(m, web_args=(), db_args=()):
    """db (protocol http2) in front of a DropsOnceApp, web with upstream db (http2)."""
    app = DropsOnceApp()
    m.apps.append(app)
    m.service_defaults("db", "http2")
    db = m.add("db", app_port=app.port, proxy_config={"protocol": "http2"}, start=False)
    m.start(db, extra_args=db_args)
    web = m.add("web", upstreams=[{"name": "db", "config": {"protocol": "http2"}}], start=False)
    m.start(web, extra_args=web_args)
    m.wait_passing(db)
    return app, db, web


def test_http11_caller_stream_lost_with_the_app_connection_is_opened_again(mesh, tmp_path):
    """db (http2): the h2c application closes its connection, without GOAWAY, on reading a
    request (as one whose idle timeout fired just then): the HTTP/1.1 caller's request, its
    body held, is opened once more on a new connection to the application and answered 200,
    its whole body received (before: 503 "connection termination"). Once only: a request
    the second connection loses too would be a 503, never sent a third time."""
    m = mesh
    app, db, web = drop_pair(m, db_args=("-workers", "1"))
    caller = MtlsCaller(m.api, tmp_path, web.name, db)
    wait_until(lambda: caller.status() == 200, 30, "an HTTP/1.1 request over mTLS")
    before = app.connections
    with caller.connect() as s:
        r = Reader(s)
        s.sendall(b"POST /drop-once HTTP/1.1\r\nHost: db\r\nContent-Length: 5000\r\n\r\n"
                  + b"d" * 5000)
        status, _, body, _ = response(r)
        assert status == 200, (status, body)
        seen = json.loads(body)
        assert seen["path"] == "/drop-once" and seen["body_len"] == 5000, seen
        assert app.dropped == ["/drop-once"], app.dropped
        assert app.connections == before + 1, (before, app.connections)
        s.sendall(b"GET /after HTTP/1.1\r\nHost: db\r\n\r\n")
        assert response(r)[0] == 200


# --- 1. an h2c application calling an http upstream ---------------------------------------------


def records(path):
    try:
        text = open(path).read()
    except FileNotFoundError:
        return []
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def http_pair(m, tmp_path):
    """db (protocol http, behind it an HTTP/1.1-only HttpApp) and web with upstream db
    (Config.protocol http), both with access logs. Returns (app, db, web, db_log, web_log)
    once an h2c request goes through web's upstream listener."""
    from test_l7_inbound import HttpApp
    app = m.app(HttpApp)
    db_log, web_log = str(tmp_path / "db.log"), str(tmp_path / "web.log")
    db = m.add("db", app_port=app.port, proxy_config={"protocol": "http"}, start=False)
    m.start(db, extra_args=("-access-log", db_log))
    web = m.add("web", upstreams=[{"name": "db", "config": {"protocol": "http"}}], start=False)
    m.start(web, extra_args=("-access-log", web_log, "-workers", "1"))
    m.wait_passing(db)
    wait_until(lambda: h2_status(web.up["db"]) == 200, 30, "an h2c request through web")
    return app, db, web, db_log, web_log


def test_h2c_application_to_http_upstream_is_served_at_l7(mesh, tmp_path):
    """An h2c client (prior knowledge) of web's upstream port, db being an http service whose
    application speaks HTTP/1.1 only: a GET, a POST with a 100 kB body (no content-length: sent
    chunked), a chunked answer (decoded into DATA), eight concurrent streams of 600 ms each on
    one connection (answered together, not one after the other) all pass. db's access log shows
    the mesh hop as HTTP/1.1 with ALPN http/1.1 (web served the streams at L7: before, the h2c
    bytes were relayed as they were and db saw HTTP/2 without ALPN); web logs an outbound
    record per stream naming the endpoint; five streams one after the other ride one mesh
    connection (kept alive and handed on)."""
    m = mesh
    app, db, web, db_log, web_log = http_pair(m, tmp_path)
    port = web.up["db"]
    (st, body, rst), = h2_many(port, [("GET", "/hello?x=1", b"")])
    assert st == 200 and rst is None, (st, body, rst)
    seen = json.loads(body)
    assert seen["version"] == "HTTP/1.1" and seen["target"] == "/hello?x=1", seen
    assert seen["headers"]["host"] == ["db"], seen
    assert seen["headers"]["x-forwarded-client-cert"][0].startswith("By=spiffe://"), seen
    (st, body, _), (st2, body2, _) = h2_many(port, [("POST", "/post", b"p" * 100000),
                                                    ("GET", "/chunked?n=50000", b"")])
    assert st == 200 and json.loads(body)["body_len"] == 100000, body[:200]
    assert json.loads(body)["headers"]["transfer-encoding"] == ["chunked"], body[:300]
    assert st2 == 200 and body2 == bytes(i % 251 for i in range(50000)), (st2, len(body2))

    t0 = time.monotonic()
    got = h2_many(port, [("GET", f"/slow?ms=600&i={i}", b"") for i in range(8)])
    took = time.monotonic() - t0
    assert [g[0] for g in got] == [200] * 8, got
    assert took < 3, f"eight concurrent 600 ms streams took {took:.1f}s: served one by one"

    got = [h2_many(port, [("GET", f"/seq{i}", b"")])[0][0] for i in range(5)]
    assert got == [200] * 5, got

    def db_rec(path):
        return [r for r in records(db_log) if r.get("path", "").split("?")[0] == path]

    wait_until(lambda: db_rec("/hello") and len(db_rec("/seq4")) == 1, 10, "db's records")
    rec = db_rec("/hello")[-1]
    assert rec["protocol"] == "HTTP/1.1" and rec.get("alpn") == "http/1.1", rec
    conns = {db_rec(f"/seq{i}")[0]["conn"] for i in range(5)}
    assert len(conns) == 1, f"five streams in a row took {len(conns)} mesh connections"

    def web_rec():
        return [r for r in records(web_log) if r.get("path", "").startswith("/hello")]

    wait_until(web_rec, 10, "web's record")
    out = web_rec()[-1]
    assert out["direction"] == "outbound" and out["protocol"] == "HTTP/2", out
    assert out["status"] == 200 and out["result"] == "ok", out
    assert out["endpoint"] == f"{LOOPBACK}:{db.public_port}", out


def test_h2c_application_to_http_upstream_dead_endpoint_skipped_then_503(mesh, tmp_path):
    """A second, dead endpoint of db (registered and passing, its sidecar port refusing):
    twenty concurrent streams, each dialling its own connection, all pass, the dead endpoint
    having been tried and passed over before any byte of a request went out. With only the
    dead endpoint left a stream gets connectd's 503, and the h2c connection stays for the
    next stream, also 503."""
    from test_l7_outbound import add_dead_instance
    m = mesh
    app, db, web, db_log, web_log = http_pair(m, tmp_path)
    add_dead_instance(m, "db", app.port)
    wait_until(lambda: len(m.api.health_connect(db.name)) == 2, 30, "two healthy endpoints")
    web.proxy.wait_log(r"target .*: 2 healthy endpoint\(s\)")
    got = h2_many(web.up["db"], [("GET", f"/slow?ms=300&r={i}", b"") for i in range(20)])
    assert [g[0] for g in got] == [200] * 20, got
    assert "failed: connect" in web.proxy.log()  # the dead one was tried and passed over

    m.api.deregister(db.id)
    wait_until(lambda: len(m.api.health_connect(db.name)) == 1, 30, "one (dead) endpoint")
    wait_until(lambda: h2_status(web.up["db"], "/gone") == 503, 30, "a 503")
    got = h2_many(web.up["db"], [("GET", "/none", b"")])
    assert got[0][0] == 503 and got[0][1].startswith(b"upstream connect error"), got


def test_h2c_application_to_http_upstream_pooled_connection_lost_is_retried(mesh):
    """The keep-alive race on an h2c application's HTTP/1.1 legs: db's endpoint (a TLS server
    with db's leaf) answers the first request of each connection and closes the connection,
    without a byte of answer, on the next. A stream sent on the connection the previous one
    left in the worker's pool is lost that way; its request (a 1000-byte body, held) is sent
    again on a newly dialled connection and answered 200 (without the retry: 503). A request
    lost on the new connection too is a 503, sent twice and no more."""
    import tempfile

    from mesh import sidecar_registration
    from test_l7_translate import ClosesReusedConnections, sidecar_tls_context
    m = mesh
    name = m.name("db")
    srv = ClosesReusedConnections(sidecar_tls_context(m.api, name, tempfile.mkdtemp(dir=m.workdir)))
    m.apps.append(srv)
    m.api.register(sidecar_registration(name, srv.port + 0, srv.port))
    m.registered.append(name)
    m.api.wait_passing(name, port=srv.port)
    web = m.add("web", upstreams=[{"name": "db", "config": {"protocol": "http"}}], start=False)
    m.start(web, extra_args=("-workers", "1"))
    wait_until(lambda: h2_status(web.up["db"], "/warm") == 200, 30, "an h2c request through web")
    web.proxy.wait_log(r"upstream connection to .* pooled")
    first = srv.attempts("/warm")[-1]

    (st, body, rst), = h2_many(web.up["db"], [("POST", "/again", b"b" * 1000)])
    assert st == 200, (st, body, rst, srv.seen)
    seen = json.loads(body)
    assert srv.attempts("/again") == [first, seen["conn"]], srv.seen
    assert seen["conn"] != first and seen["body_len"] == 1000, seen

    web.proxy.wait_log(r"(?s)sending the request again.*upstream connection to .* pooled")
    (st, body, _), = h2_many(web.up["db"], [("GET", "/die", b"")])
    assert st == 503, (st, body)
    assert len(srv.attempts("/die")) == 2, srv.seen


def test_h2_caller_stream_lost_with_the_app_connection_is_opened_again(mesh):
    """The same through web's outbound HTTP/2 codec: an h2c client's stream reaches db's
    inbound HTTP/2 codec, whose shared h2c connection to the application dies under it
    (closed without GOAWAY): db opens the stream once more on a new connection, with the
    5000-byte body it held, and the client gets 200 (before: 503)."""
    m = mesh
    app, db, web = drop_pair(m, db_args=("-workers", "1"))
    wait_until(lambda: h2_status(web.up["db"]) == 200, 30, "an h2c request through web")
    before = app.connections
    (st, body, rst), = h2_many(web.up["db"], [("POST", "/drop-h2", b"h" * 5000)])
    assert st == 200, (st, body, rst)
    seen = json.loads(body)
    assert seen["path"] == "/drop-h2" and seen["body_len"] == 5000, seen
    assert app.dropped == ["/drop-h2"] and app.connections == before + 1, app.dropped


def test_stream_lost_with_the_mesh_connection_is_opened_again(mesh):
    """db's endpoint is an HTTP/2 server over TLS with db's leaf (ALPN h2) that closes the
    connection, without GOAWAY, on reading a /drop request: web's shared mesh connection dies
    under the stream. web opens the stream once more on a new mesh connection and its client
    gets 200 with the whole body: an h2c client (web's outbound HTTP/2 codec) and an HTTP/1.1
    client (translated by web's HTTP/1.1 codec). Before: 503."""
    import tempfile

    from mesh import sidecar_registration
    from test_l7_translate import request, sidecar_tls_context
    m = mesh
    name = m.name("db")
    ctx = sidecar_tls_context(m.api, name, tempfile.mkdtemp(dir=m.workdir))
    ctx.set_alpn_protocols(["h2"])
    srv = DropsOnceApp(ctx)
    m.apps.append(srv)
    m.service_defaults("db", "http2")
    m.api.register(sidecar_registration(name, srv.port + 0, srv.port))
    m.registered.append(name)
    m.api.wait_passing(name, port=srv.port)
    web = m.add("web", upstreams=[{"name": "db", "config": {"protocol": "http2"}}], start=False)
    m.start(web, extra_args=("-workers", "1"))
    wait_until(lambda: h2_status(web.up["db"]) == 200, 30, "an h2c request through web")

    before = srv.connections
    (st, body, rst), = h2_many(web.up["db"], [("POST", "/drop-h2c", b"c" * 7000)])
    assert st == 200, (st, body, rst)
    seen = json.loads(body)
    assert seen["path"] == "/drop-h2c" and seen["body_len"] == 7000, seen
    assert srv.dropped == ["/drop-h2c"] and srv.connections == before + 1, srv.dropped

    status, seen = request(web.up["db"], "POST", "/drop-h1", body=b"1" * 3000)
    assert status == 200, (status, seen)
    assert seen["path"] == "/drop-h1" and seen["body_len"] == 3000, seen
    assert srv.dropped == ["/drop-h2c", "/drop-h1"] and srv.connections == before + 2


def test_h2c_application_to_http_upstream_connections_are_bounded(mesh, tmp_path):
    """Forty concurrent streams of 300 ms on one h2c connection: the session holds at most 32
    HTTP/1.1 connections to the upstream (LEGS_MAX); the other streams wait and take the
    connections the first ones free (kept alive and handed on), so all forty pass while db
    sees at most 32 mesh connections for them."""
    m = mesh
    app, db, web, db_log, web_log = http_pair(m, tmp_path)
    got = h2_many(web.up["db"], [("GET", f"/slow?ms=300&b={i}", b"") for i in range(40)])
    assert [g[0] for g in got] == [200] * 40, got

    def recs():
        return [r for r in records(db_log) if "b=" in r.get("path", "")]

    wait_until(lambda: len(recs()) == 40, 10, "db's forty records")
    conns = {r["conn"] for r in recs()}
    assert len(conns) <= 32, f"forty streams took {len(conns)} mesh connections"
    assert len(conns) < 40, "no connection was handed on to a waiting stream"
