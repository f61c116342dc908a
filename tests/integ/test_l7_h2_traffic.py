"""Traffic management for an h2c application's outbound streams (issue 10): mux_h2's streams get
what mux_h1's requests get. To an http2 (or grpc) upstream, each stream follows its route's
retry policy (NumRetries / RetryOn: a new stream, on another endpoint when one is left, only
with the whole request held), its RequestTimeout (504 "upstream request timeout"; gRPC:
grpc-status 14 UNAVAILABLE with that message, as Envoy's local reply for a 504), the resolver's
hash policy (each stream's endpoint chosen by its own hash, not one connection for all), the
passive health check (an endpoint answering 5xx is ejected) and the upstream's limits
(max_pending_requests / max_concurrent_requests count the streams of one connection too: 503 at
once when over). To an http upstream, each stream's HTTP/1.1 exchange is routed (its route's
resolver picks the service) and retried the same way.

Before, none of this applied to mux_h2: a 503 went through, a slow back-end held the stream
until the client gave up, every stream of a connection went to the endpoint of the one shared
dial, a 5xx endpoint kept its share, streams queued behind a dial uncounted, and an http
upstream's legs went to every target in order whatever the route.
"""

import json
import re
import time

import grpc

from mesh import LOOPBACK, admin_args, admin_get, h2_many, h2_status, parse_metrics, wait_until
from mesh import metric as mesh_metric
from test_l7_h2_outbound import code_of, drop_defaults, expect_cut_at_timeout, grpc_defaults, \
    grpc_server
from test_l7_h2_outbound import add_instance as add_grpc_instance
from test_l7_inbound import HttpApp
from test_l7_outlier import BlackHole, add_black_hole_instance, add_http_instance, healthy, metric
from test_l7_retry import FlakyH2App, ScriptedApp, record
from test_l7_routing import answered_by, delete_entries
from test_routes_config import wait_table


class NamedH2App(FlakyH2App):
    """FlakyH2App (h2c; /flaky/<key>?fail=N, /hold) that names itself in an x-app field of
    its answers, or answers every request <status> when one is given; /unavailable/<key> is
    answered grpc-status 14 (trailers-only) the first time."""

    def __init__(self, label, status=None):
        self.label = label
        self.status = status
        self.hits = 0
        super().__init__()

    def _answer(self, conn, sid, r, pending):
        self.hits += 1
        path = r["headers"][":path"][0]
        if self.status is not None:
            conn.send_headers(sid, [(":status", str(self.status)), ("x-app", self.label),
                                    ("content-length", "0")], end_stream=True)
            return
        if path.startswith("/unavailable/"):
            self.counts[path] = self.counts.get(path, 0) + 1
            if self.counts[path] == 1:  # a trailers-only gRPC answer: UNAVAILABLE
                conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                        ("grpc-status", "14")], end_stream=True)
                return
        if path.startswith("/flaky/") or path == "/hold":
            FlakyH2App._answer(self, conn, sid, r, pending)
            return
        body = json.dumps({"app": self.label, "path": path, "body_len": r["body_len"]}).encode()
        conn.send_headers(sid, [(":status", "200"), ("x-app", self.label),
                                ("content-length", str(len(body)))])
        conn.send_data(sid, body, end_stream=True)


def h2_mesh(m, tmp_path, app, up_config=None, protocol="http2"):
    """db (protocol <protocol>) behind <app>, and web with upstream db (Config <up_config>,
    protocol included), an access log, one worker and an admin port. Returns (db, web, access
    log path, admin port) once an h2c request passes."""
    m.service_defaults("db", protocol)
    db = m.add("db", app_port=app.port, proxy_config={"protocol": protocol})
    alog = str(tmp_path / "web-access.log")
    args, admin = admin_args()
    up = dict(up_config or {}, protocol=protocol)
    web = m.add("web", upstreams=[{"name": "db", "config": up}], start=False)
    m.start(web, extra_args=("-access-log", alog, "-workers", "1", *args))
    m.wait_passing(db)
    wait_until(lambda: h2_status(web.up["db"], "/ready") == 200, 30, "an h2c request via web")
    return db, web, alog, admin


def set_destination(m, admin, destination, what):
    """A router for db whose one route (PathPrefix /) has <destination>; waits until web's
    /config shows its RequestTimeout / NumRetries."""
    m.api.set_config_entry({
        "Kind": "service-router", "Name": m.name("db"),
        "Routes": [{"Match": {"HTTP": {"PathPrefix": "/"}},
                    "Destination": dict(destination, Service=m.name("db"))}]})

    def has(u):
        d = [r["destination"] for r in u.get("routes", []) if "destination" in r]
        return any(x.get("num_retries") == destination.get("NumRetries", 0) and
                   ((x.get("request_timeout_ms") or 0) > 0) == ("RequestTimeout" in destination)
                   for x in d)
    wait_table(admin, m.name("db"), has, what)


def totals(admin, name):
    """An unlabelled counter of web's /metrics (connectd_<name>)."""
    return mesh_metric(parse_metrics(admin_get(admin, "/metrics")[1]), "connectd_" + name)


def one(port, method, path, body=b"", extra=(), timeout=30):
    """(status, body, reset code, fields) of one h2c request on a new connection."""
    return h2_many(port, [(method, path, body, extra)], timeout=timeout, full=True)[0]


# --- an http2 upstream ---------------------------------------------------------------------------


def test_h2_stream_answered_503_once_is_retried_on_a_new_stream(mesh, tmp_path):
    """RetryOn 5xx with NumRetries 2: a POST whose first attempt db's application answers 503
    is seen by the h2c client as 200, the application got it twice with its whole body, and
    the stream's record says retries 1 (counted in /metrics); under RetryOn unavailable a
    trailers-only grpc-status 14 is retried the same way. A body over the upstream's
    retry_buffer_bytes (4096) is not held, so its 503 goes through. Without the route's policy
    the 503 goes through; before, it went through with the policy too."""
    m = mesh
    app = m.app(NamedH2App, "a")
    db, web, alog, admin = h2_mesh(m, tmp_path, app, up_config={"retry_buffer_bytes": 4096})
    try:
        assert one(web.up["db"], "GET", "/flaky/plain?fail=1")[0] == 503
        set_destination(m, admin, {"RetryOn": ["5xx", "unavailable"], "NumRetries": 2},
                        "the retry policy")
        st, body, rst, _ = one(web.up["db"], "POST", "/flaky/k?fail=1", b"z" * 3000)
        assert (st, rst) == (200, None), (st, body, rst)
        assert json.loads(body)["body_len"] == 3000
        assert app.counts["/flaky/k?fail=1"] == 2
        rec = record(alog, "/flaky/k?fail=1")
        assert rec["retries"] == 1 and rec["status"] == 200, rec
        assert totals(admin, "upstream_request_retries_total") >= 1
        # RetryOn unavailable: a trailers-only grpc-status 14 is retried too.
        st, _, _, fields = one(web.up["db"], "GET", "/unavailable/u")
        assert (st, fields.get("x-app")) == (200, "a") and app.counts["/unavailable/u"] == 2
        st, _, _, _ = one(web.up["db"], "POST", "/flaky/big?fail=1", b"z" * 8000)
        assert st == 503 and app.counts["/flaky/big?fail=1"] == 1, st
    finally:
        delete_entries(m)


def test_h2_stream_cut_at_the_route_request_timeout_with_504(mesh, tmp_path):
    """RequestTimeout 500ms: a stream db never answers (/hold) ends after about 500 ms with
    504 "upstream request timeout" (result upstream_timeout), while a sibling stream on the
    same connection gets its 200. Before, the route's timeout did not apply to mux_h2's
    streams: the held one waited until the client gave up."""
    m = mesh
    app = m.app(NamedH2App, "a")
    db, web, alog, admin = h2_mesh(m, tmp_path, app)
    try:
        set_destination(m, admin, {"RequestTimeout": "500ms"}, "the route's timeout")
        t0 = time.monotonic()
        (st, body, rst), (st2, _, _) = h2_many(web.up["db"], [("GET", "/hold", b""),
                                                              ("GET", "/sibling", b"")],
                                               timeout=10)
        took = time.monotonic() - t0
        assert (st, body, rst) == (504, b"upstream request timeout", None), (st, body, rst)
        assert st2 == 200
        assert 0.4 < took < 3.0, took
        rec = record(alog, "/hold")
        assert rec["result"] == "upstream_timeout" and rec["status"] == 504, rec
        assert totals(admin, "upstream_request_timeouts_total") >= 1
    finally:
        delete_entries(m)


def test_grpc_call_cut_at_the_route_request_timeout_is_unavailable(mesh):
    """A grpc upstream, RequestTimeout 500ms: a call db answers after 3 s fails after about
    500 ms with UNAVAILABLE "upstream request timeout" (a trailers-only answer, grpc-status
    14: what Envoy's local reply gives a 504), and the next call on the channel passes.
    Before, the call waited the 3 s and succeeded."""
    m = mesh
    srv, port = grpc_server()
    try:
        grpc_defaults(m)
        db = m.add("db", app_port=port, proxy_config={"protocol": "grpc"})
        args, admin = admin_args()
        web = m.add("web", upstreams=("db",), start=False)
        m.start(web, extra_args=args)
        m.wait_passing(db)
        wait_until(lambda: code_of(web.up["db"]) == grpc.StatusCode.OK, 30, "a gRPC call")
        set_destination(m, admin, {"RequestTimeout": "500ms"}, "the route's timeout")
        expect_cut_at_timeout(web.up["db"])
    finally:
        srv.stop(0)
        delete_entries(m)
        drop_defaults(m)


def test_ring_hash_by_header_keeps_each_grpc_user_on_one_instance(mesh):
    """Three instances of a grpc db, ring_hash on the x-user header: on ONE channel (one h2c
    connection, one session), every call of a user reaches one instance while 12 users spread
    over at least two. Before, mux_h2 never hashed a stream: its streams shared the endpoint
    of whichever dial came first."""
    m = mesh
    servers = [grpc_server(n) for n in ("a", "b", "c")]
    try:
        grpc_defaults(m)
        db = m.add("db", app_port=servers[0][1], proxy_config={"protocol": "grpc"})
        add_grpc_instance(m, "b", servers[1][1])
        add_grpc_instance(m, "c", servers[2][1])
        args, admin = admin_args()
        web = m.add("web", upstreams=("db",), start=False)
        m.start(web, extra_args=[*args, "-workers", "1"])
        m.wait_passing(db)
        m.api.set_config_entry({"Kind": "service-resolver", "Name": m.name("db"),
                                "LoadBalancer": {"Policy": "ring_hash", "HashPolicies": [
                                    {"Field": "header", "FieldValue": "x-user"}]}})
        wait_table(admin, m.name("db"), lambda u: [
            r["load_balancer"]["policy"] for r in u.get("resolvers", [])] == ["ring_hash"] and
            [t["healthy_endpoints"] for t in u.get("targets", [])] == [3],
            "web's table with ring_hash and three endpoints")
        home = {}
        with grpc.insecure_channel(f"{LOOPBACK}:{web.up['db']}") as ch:
            rpc = ch.unary_unary("/test.Echo/Who")
            for _ in range(3):
                for u in range(12):
                    who = json.loads(rpc(b"x", timeout=10,
                                         metadata=(("x-user", f"user-{u}"),)))["who"]
                    assert home.setdefault(u, who) == who, (u, who, home)
        assert len(set(home.values())) >= 2, home
    finally:
        for srv, _ in servers:
            srv.stop(0)
        delete_entries(m)
        drop_defaults(m)


def test_h2_endpoint_answering_5xx_is_ejected(mesh, tmp_path):
    """Two instances of an http2 db, one whose application answers every stream 503. With
    passive_health_check max_failures 3, the bad instance is ejected after three 503s in a
    row (logged, counted), and then every stream goes to the good one for the ejection time.
    Before, mux_h2 reported nothing to the health check: half the streams kept getting 503."""
    m = mesh
    good = m.app(NamedH2App, "good")
    bad = m.app(NamedH2App, "bad", 503)
    up = {"passive_health_check": {"max_failures": 3, "interval": "500ms",
                                   "base_ejection_time": "5s"}}
    db, web, alog, admin = h2_mesh(m, tmp_path, good, up_config=up)
    add_http_instance(m, "bad", bad.port, protocol="http2")
    wait_until(lambda: healthy(web.proxy) == 2, 30, "web to see both instances")
    ejected = r"endpoint \S+ of target \S+ ejected for 5000 ms after 3 consecutive failures"
    for i in range(60):
        one(web.up["db"], "GET", f"/e{i}")
        if re.search(ejected, web.proxy.log()):
            break
    assert re.search(ejected, web.proxy.log()), web.proxy.log()[-3000:]
    t_eject = time.monotonic()
    assert metric(admin, "upstream_ejections_total", db.name) == 1
    got = h2_many(web.up["db"], [("GET", f"/out{i}", b"") for i in range(12)], full=True)
    assert time.monotonic() - t_eject < 4.0
    assert [(g[0], g[3].get("x-app")) for g in got] == [(200, "good")] * 12, got


def test_h2_streams_of_one_connection_count_against_the_upstream_limits(mesh, tmp_path):
    """limits.max_pending_requests 1, db's only endpoint a black hole (the TLS handshake never
    answered): the first stream waits for its connection and the second, on the SAME h2c
    connection, is answered 503 "overflow" at once (upstream_overflow naming the limit).
    Before, a stream waiting behind its session's dial was not counted: it waited as well."""
    m = mesh
    hole = m.app(BlackHole)
    app = m.app(NamedH2App, "a")
    up = {"limits": {"max_pending_requests": 1}, "connect_timeout_ms": 2000}
    db, web, alog, admin = h2_mesh(m, tmp_path, app, up_config=up)
    add_black_hole_instance(m, hole, app.port)
    wait_until(lambda: healthy(web.proxy) == 2, 30, "web to see the black hole")
    m.api.deregister(db.id)
    wait_until(lambda: healthy(web.proxy) == 1, 30, "web to see the black hole alone")
    got = h2_many(web.up["db"], [("GET", "/waits", b""), ("GET", "/second", b"")], timeout=30)
    assert got[1][0] == 503 and b"overflow" in got[1][1], got
    assert got[0][0] == 503 and b"overflow" not in got[0][1], got
    rec = record(alog, "/second")
    assert rec["result"] == "upstream_overflow", rec
    assert "max_pending_requests (1)" in rec["reason"], rec
    assert metric(admin, "upstream_overflow_total", db.name, "max_pending_requests") >= 1


def test_h2_max_concurrent_requests_counts_each_stream(mesh, tmp_path):
    """limits.max_concurrent_requests 1: while one stream is in flight (/hold, cut by the
    route's 1 s RequestTimeout), a sibling on the same connection is answered 503 overflow at
    once. Before, mux_h2 did not count its streams."""
    m = mesh
    app = m.app(NamedH2App, "a")
    db, web, alog, admin = h2_mesh(m, tmp_path, app,
                                   up_config={"limits": {"max_concurrent_requests": 1}})
    try:
        set_destination(m, admin, {"RequestTimeout": "1s"}, "the route's timeout")
        got = h2_many(web.up["db"], [("GET", "/hold", b""), ("GET", "/next", b"")], timeout=10)
        assert got[0][0] == 504, got
        assert got[1][0] == 503 and b"overflow" in got[1][1], got
        assert record(alog, "/next")["result"] == "upstream_overflow"
        assert one(web.up["db"], "GET", "/after")[0] == 200
        assert metric(admin, "upstream_requests_in_flight", db.name) == 0
    finally:
        delete_entries(m)


# --- an http upstream: each stream an HTTP/1.1 exchange ------------------------------------------


def test_h2c_streams_to_an_http_upstream_follow_the_router(mesh):
    """db and db2 (protocol http), a router sending /two... to db2: the h2c client's streams,
    concurrent on one connection, each reach the service of their own route. Before, an http
    upstream's legs were not routed: every stream went to db."""
    m = mesh
    for logical in ("db", "db2"):
        m.service_defaults(logical, "http")
        a = m.app(HttpApp)
        m.wait_passing(m.add(logical, app_port=a.port))
    web = m.add("web", upstreams=[{"name": "db", "config": {"protocol": "http"}}])
    try:
        wait_until(lambda: h2_status(web.up["db"], "/one") == 200, 30, "an h2c request")
        m.api.set_config_entry({
            "Kind": "service-router", "Name": m.name("db"),
            "Routes": [{"Match": {"HTTP": {"PathPrefix": "/two"}},
                        "Destination": {"Service": m.name("db2")}}]})

        def routed():
            got = h2_many(web.up["db"], [("GET", "/two/probe", b"")])[0]
            return got[0] == 200 and answered_by(m, got[1]) == "db2"
        wait_until(routed, 30, "the router in use")
        paths = [f"/one/{i}" if i % 2 else f"/two/{i}" for i in range(10)]
        got = h2_many(web.up["db"], [("GET", p, b"") for p in paths])
        assert [g[0] for g in got] == [200] * 10, got
        assert [answered_by(m, g[1]) for g in got] == \
            ["db2" if p.startswith("/two") else "db" for p in paths]
    finally:
        delete_entries(m)


def test_h2c_stream_to_an_http_upstream_is_retried_across_a_503(mesh, tmp_path):
    """RetryOn 5xx: a POST stream whose first HTTP/1.1 attempt db's application answers 503
    is seen as 200, the application got it twice with its whole body, and the stream's record
    says retries 1. Before, the 503 went through."""
    m = mesh
    app = m.app(ScriptedApp)
    m.service_defaults("db", "http")
    db = m.add("db", app_port=app.port)
    alog = str(tmp_path / "web-access.log")
    args, admin = admin_args()
    web = m.add("web", upstreams=[{"name": "db", "config": {"protocol": "http"}}], start=False)
    m.start(web, extra_args=("-access-log", alog, "-workers", "1", *args))
    m.wait_passing(db)
    try:
        wait_until(lambda: h2_status(web.up["db"], "/ready") == 200, 30, "an h2c request")
        set_destination(m, admin, {"RetryOn": ["5xx"], "NumRetries": 2}, "the retry policy")
        st, body, rst, _ = one(web.up["db"], "POST", "/flaky/leg?fail=1", b"q" * 5000)
        assert (st, rst) == (200, None), (st, body, rst)
        assert json.loads(body)["attempt"] == 2
        assert [x[2] for x in app.attempts("/flaky/leg?fail=1")] == [5000, 5000]
        rec = record(alog, "/flaky/leg?fail=1")
        assert rec["retries"] == 1 and rec["status"] == 200, rec
    finally:
        delete_entries(m)
