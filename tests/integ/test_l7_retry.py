"""Outbound retries and route timeouts (issue 10, items 2 and 4): a service-router route's
Destination NumRetries, RetryOn, RetryOnConnectFailure and RetryOnStatusCodes make web's
sidecar send a failed request again (after a jittered back-off, to another endpoint when one
exists) as long as the whole request is held within the upstream's retry_buffer_bytes and no
byte of the answer went to the application; RequestTimeout bounds the whole request, retries
included, with a 504 "upstream request timeout"; IdleTimeout cuts a stalled request. Each retry
is counted in the request's access-log record ("retries") and in /metrics.

db's application is ScriptedApp below: it records every request it receives (what web's
sidecar sent, attempt by attempt) and answers as the path asks, so a test sees both what the
application behind web got and how many attempts reached db.
"""

import itertools
import json
import threading
import time
import urllib.parse

from mesh import TcpApp, admin_args, admin_get, wait_until
from test_l7_inbound import Reader, connect, get, response
from test_l7_outbound import add_dead_instance, outbound_requests, try_status
from test_l7_translate import H2JsonApp


class ScriptedApp(TcpApp):
    """An HTTP/1.1 application whose answers the path scripts:
      /flaky/<key>?fail=N&code=C  the first N requests for <key> get C, later ones 200
      /grpc/<key>?fail=N&gs=G     the first N get 200 with "grpc-status: G" in the head
      /slow?ms=N                  answers 200 after N ms
      /slowfail?ms=N              answers 503 after N ms
    Every request is recorded (path, arrival time, body length) in self.seen."""

    def __init__(self):
        self.seen = []
        self.counts = {}
        self.lock = threading.Lock()
        super().__init__()

    def attempts(self, path):
        with self.lock:
            return [x for x in self.seen if x[0] == path]

    def handle(self, conn):
        r = Reader(conn)
        while True:
            head = r.head()
            if head is None:
                return
            line, headers = head
            target = line.split(" ")[1]
            body = r.body(headers, request=True)
            path, _, query = target.partition("?")
            args = dict(urllib.parse.parse_qsl(query))
            with self.lock:
                self.seen.append((target, time.monotonic(), len(body)))
                n = self.counts[path] = self.counts.get(path, 0) + 1
            status, extra = 200, b""
            if path.startswith("/flaky/") and n <= int(args.get("fail", "0")):
                status = int(args.get("code", "503"))
            if path.startswith("/grpc/") and n <= int(args.get("fail", "0")):
                extra = b"grpc-status: %s\r\n" % args.get("gs", "14").encode()
            if path in ("/slow", "/slowfail"):
                time.sleep(int(args.get("ms", "0")) / 1000)
            if path == "/slowfail":
                status = 503
            out = json.dumps({"target": target, "attempt": n}).encode()
            try:
                conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n%s"
                             % (status, len(out), extra, out))
            except OSError:
                return


def retry_mesh(m, tmp_path, up_config=None, admin=False):
    """db (protocol http) behind a ScriptedApp, and web with upstream db, an access log and
    (admin) an admin port. Returns (app, db, web, access log path, admin port)."""
    m.service_defaults("db", "http")
    app = m.app(ScriptedApp)
    db = m.add("db", app_port=app.port)
    m.wait_passing(db)
    alog = str(tmp_path / "web-access.log")
    args, port = admin_args() if admin else ([], None)
    web = m.add("web", upstreams=[{"name": "db", "config": up_config}], start=False)
    m.start(web, extra_args=("-access-log", alog, *args))
    return app, db, web, alog, port


def set_route(m, destination):
    """A router for db whose one route (PathPrefix /) has <destination>."""
    m.api.set_config_entry({
        "Kind": "service-router", "Name": m.name("db"),
        "Routes": [{"Match": {"HTTP": {"PathPrefix": "/"}},
                    "Destination": dict(destination, Service=m.name("db"))}]})


def status_of(port, path, body=None):
    """Sends one request on a new connection: (status, body)."""
    with connect(port) as s:
        if body is None:
            s.sendall(get(path))
        else:
            s.sendall(b"POST %s HTTP/1.1\r\nHost: db\r\nContent-Length: %d\r\n\r\n%s"
                      % (path.encode(), len(body), body))
        st, _, data, _ = response(Reader(s))
        return st, data


def record(alog, path):
    """The outbound access-log record of <path> (waits for it)."""
    found = []

    def have():
        found[:] = [x for x in outbound_requests(alog) if x["path"] == path]
        return bool(found)
    wait_until(have, 10, f"the record of {path}")
    return found[-1]


# Probe paths are never asked twice: a back-end counts its failures per path.
PROBES = itertools.count()


def wait_routed(m, web, app, destination, probe="fail=1&code=503", want=200, path=None):
    """Writes the route and waits until web's sidecar uses it: a request failing as <probe>
    says (or to <path>), which only the new policy treats so, is answered <want>."""
    set_route(m, destination)

    def routed():
        try:
            p = path or f"/flaky/warm{next(PROBES)}?{probe}"
            return status_of(web.up["db"], p)[0] == want
        except (OSError, EOFError, AssertionError, ValueError):
            return False
    wait_until(routed, 30, "the new route in use")


def delete_router(m):
    try:
        m.api.delete("/v1/config/service-router/" + urllib.parse.quote(m.name("db")))
    except Exception:  # noqa: BLE001 (cleanup: the agent may be gone)
        pass


def test_503_once_is_retried_with_retry_on_5xx_and_not_without(mesh, tmp_path):
    """A back-end answering 503 once then 200: without a retry policy the application gets
    the 503 (one attempt); with RetryOn ["5xx"] it gets the 200, db saw two attempts, the
    access-log record says retries 1 and /metrics counts it. Before retries existed the 503
    always went through."""
    m = mesh
    app, db, web, alog, admin = retry_mesh(m, tmp_path, admin=True)
    try:
        wait_until(lambda: try_status(web.up["db"], "/ready") == 200, 30, "a request")
        st, _ = status_of(web.up["db"], "/flaky/a?fail=1&code=503")
        assert st == 503
        assert len(app.attempts("/flaky/a?fail=1&code=503")) == 1
        assert record(alog, "/flaky/a?fail=1&code=503").get("retries", 0) == 0

        wait_routed(m, web, app, {"RetryOn": ["5xx"]})
        st, body = status_of(web.up["db"], "/flaky/b?fail=1&code=503")
        assert st == 200, body
        assert json.loads(body)["attempt"] == 2
        assert len(app.attempts("/flaky/b?fail=1&code=503")) == 2
        rec = record(alog, "/flaky/b?fail=1&code=503")
        assert rec["status"] == 200 and rec["retries"] == 1, rec
        # 5xx does not cover a 4xx.
        assert status_of(web.up["db"], "/flaky/c?fail=1&code=409")[0] == 409
        text = admin_get(admin, "/metrics")[1]
        line = [x for x in text.splitlines()
                if x.startswith("connectd_upstream_request_retries_total ")]
        assert line and int(line[0].split()[1]) >= 2, line  # the warm-up's and /flaky/b's
    finally:
        delete_router(m)


def test_retry_on_values_and_status_codes(mesh, tmp_path):
    """RetryOnStatusCodes [418] retries a 418 and not a 503; gateway-error retries 502 but not
    500; retriable-4xx retries 409; the gRPC values read the grpc-status of the answer's head
    (unavailable: 14 retried, 13 not)."""
    m = mesh
    app, db, web, alog, _ = retry_mesh(m, tmp_path)
    try:
        wait_routed(m, web, app, {"RetryOnStatusCodes": [418, 503]})
        assert status_of(web.up["db"], "/flaky/s1?fail=1&code=418")[0] == 200
        assert len(app.attempts("/flaky/s1?fail=1&code=418")) == 2
        assert status_of(web.up["db"], "/flaky/s2?fail=1&code=500")[0] == 500

        wait_routed(m, web, app, {"RetryOn": ["gateway-error", "retriable-4xx", "unavailable"]},
                    probe="fail=1&code=502")
        assert status_of(web.up["db"], "/flaky/g1?fail=1&code=502")[0] == 200
        assert status_of(web.up["db"], "/flaky/g2?fail=1&code=500")[0] == 500
        assert status_of(web.up["db"], "/flaky/g3?fail=1&code=409")[0] == 200
        st, body = status_of(web.up["db"], "/grpc/u1?fail=1&gs=14")
        assert st == 200 and json.loads(body)["attempt"] == 2, body
        st, body = status_of(web.up["db"], "/grpc/u2?fail=1&gs=13")
        assert st == 200 and json.loads(body)["attempt"] == 1, body
        assert record(alog, "/grpc/u1?fail=1&gs=14")["retries"] == 1
    finally:
        delete_router(m)


def test_num_retries_bounds_attempts_and_backoff(mesh, tmp_path):
    """A back-end that always answers 503: with NumRetries 3 the application gets the 503
    after exactly 1 + 3 attempts, spaced by Envoy's jittered back-off (below 25, 50, 100 ms:
    loosely, not all back-to-back and well under a second each); NumRetries 1 gives 2."""
    m = mesh
    app, db, web, alog, _ = retry_mesh(m, tmp_path)
    try:
        wait_routed(m, web, app, {"RetryOn": ["5xx"], "NumRetries": 3})
        gaps = []
        for i in range(5):
            path = f"/flaky/n{i}?fail=100&code=503"
            assert status_of(web.up["db"], path)[0] == 503
            seen = app.attempts(path)
            assert len(seen) == 4, seen
            gaps += [b[1] - a[1] for a, b in zip(seen, seen[1:])]
            assert record(alog, path)["retries"] == 3
        assert all(g < 1.0 for g in gaps), gaps
        assert sum(gaps) > 0.02, gaps  # 15 back-offs averaging ~29 ms cannot all be ~0

        wait_routed(m, web, app, {"RetryOn": ["5xx"], "NumRetries": 1}, probe="fail=2&code=503",
                    want=503)
        assert status_of(web.up["db"], "/flaky/one?fail=100&code=503")[0] == 503
        assert len(app.attempts("/flaky/one?fail=100&code=503")) == 2
    finally:
        delete_router(m)


def test_body_over_the_retry_buffer_is_not_retried(mesh, tmp_path):
    """retry_buffer_bytes 2048 on the upstream: a POST whose request fits is retried (200),
    one whose body is larger is sent once and its 503 goes to the application."""
    m = mesh
    app, db, web, alog, _ = retry_mesh(m, tmp_path, up_config={"retry_buffer_bytes": 2048})
    try:
        wait_routed(m, web, app, {"RetryOn": ["5xx"]})
        st, body = status_of(web.up["db"], "/flaky/small?fail=1&code=503", body=b"x" * 500)
        assert st == 200 and json.loads(body)["attempt"] == 2, body
        st, body = status_of(web.up["db"], "/flaky/large?fail=1&code=503", body=b"x" * 4000)
        assert st == 503, body
        seen = app.attempts("/flaky/large?fail=1&code=503")
        assert len(seen) == 1 and seen[0][2] == 4000, seen
    finally:
        delete_router(m)


def test_retry_on_connect_failure_across_a_dead_endpoint(mesh, tmp_path):
    """db has a live endpoint and a dead one (registered, passing, refusing connections).
    With RetryOnConnectFailure every request succeeds and the ones whose first pick was the
    dead endpoint say retries 1. With only the dead endpoint left, NumRetries 2 makes three
    dials before the 503, each counted."""
    m = mesh
    app, db, web, alog, _ = retry_mesh(m, tmp_path)
    try:
        add_dead_instance(m, "db", app.port)
        wait_until(lambda: len(m.api.health_connect(db.name)) == 2, 30, "two endpoints")
        web.proxy.wait_log(r"target .*: 2 healthy endpoint\(s\)")
        wait_routed(m, web, app, {"RetryOnConnectFailure": True, "RetryOn": ["5xx"],
                                  "NumRetries": 2})
        for i in range(16):
            with connect(web.up["db"]) as s:
                s.sendall(get(f"/c{i}", extra="Connection: close\r\n"))
                assert response(Reader(s))[0] == 200
        recs = [record(alog, f"/c{i}") for i in range(16)]
        assert any(x.get("retries") == 1 for x in recs), recs  # 2^-16 to miss the dead one

        m.api.deregister(db.id)
        wait_until(lambda: len(m.api.health_connect(db.name)) == 1, 30, "the dead one only")
        wait_until(lambda: try_status(web.up["db"], "/gone") == 503, 30, "a 503")
        st, body = status_of(web.up["db"], "/none")
        assert st == 503 and body.startswith(b"upstream connect error"), body
        rec = record(alog, "/none")
        assert rec["retries"] == 2 and rec["result"] == "upstream_connect_error", rec
    finally:
        delete_router(m)


def test_request_timeout_cuts_a_slow_backend_with_504(mesh, tmp_path):
    """RequestTimeout 400ms: a back-end taking 3 s is answered 504 "upstream request timeout"
    after about 400 ms (not Envoy's 15 s default, nor the back-end's 3 s), recorded as
    upstream_timeout; one taking 50 ms passes. Retries count against the same timeout: with
    RetryOn 5xx a back-end that always 503s after 150 ms gets 504 once 400 ms passed."""
    m = mesh
    app, db, web, alog, _ = retry_mesh(m, tmp_path)
    try:
        wait_routed(m, web, app, {"RequestTimeout": "400ms", "RetryOn": ["5xx"],
                                  "NumRetries": 10}, path="/slow?ms=1500", want=504)
        t0 = time.monotonic()
        st, body = status_of(web.up["db"], "/slow?ms=3000")
        took = time.monotonic() - t0
        assert st == 504 and body == b"upstream request timeout", (st, body)
        assert 0.35 < took < 2.0, took
        rec = record(alog, "/slow?ms=3000")
        assert rec["result"] == "upstream_timeout" and rec["status"] == 504, rec
        assert status_of(web.up["db"], "/slow?ms=50")[0] == 200
        t0 = time.monotonic()
        st, _ = status_of(web.up["db"], "/slowfail?ms=150")
        took = time.monotonic() - t0
        assert st == 504 and 0.35 < took < 2.0, (st, took)
        seen = app.attempts("/slowfail?ms=150")
        assert 2 <= len(seen) <= 3, seen
        assert record(alog, "/slowfail?ms=150")["retries"] == len(seen) - 1
    finally:
        delete_router(m)


def test_idle_timeout_cuts_a_stalled_request(mesh, tmp_path):
    """IdleTimeout 300ms (RequestTimeout 10s): a back-end silent for 3 s is cut after about
    300 ms with Envoy's 408 "stream timeout"."""
    m = mesh
    app, db, web, alog, _ = retry_mesh(m, tmp_path)
    try:
        wait_routed(m, web, app, {"IdleTimeout": "300ms", "RequestTimeout": "10s"},
                    path="/slow?ms=1500", want=408)
        t0 = time.monotonic()
        st, body = status_of(web.up["db"], "/slow?ms=3000")
        took = time.monotonic() - t0
        assert st == 408 and body == b"stream timeout", (st, body)
        assert 0.25 < took < 2.0, took
        assert record(alog, "/slow?ms=3000")["result"] == "stream_idle_timeout"
    finally:
        delete_router(m)


class FlakyH2App(H2JsonApp):
    """H2JsonApp (HTTP/2 with prior knowledge) whose /flaky/<key>?fail=N answers 503 to the
    first N requests for that path; self.counts counts the requests per path."""

    def __init__(self):
        self.counts = {}
        super().__init__()

    def _answer(self, conn, sid, r, pending):
        path = r["headers"][":path"][0]
        if path.startswith("/flaky/"):
            self.counts[path] = self.counts.get(path, 0) + 1
            fail = int(dict(urllib.parse.parse_qsl(path.partition("?")[2])).get("fail", "0"))
            if self.counts[path] <= fail:
                conn.send_headers(sid, [(":status", "503"), ("content-length", "0")],
                                  end_stream=True)
                return
        H2JsonApp._answer(conn, sid, r, pending)


def test_http2_upstream_retries_and_request_timeout(mesh, tmp_path):
    """The HTTP/1.1 application's requests translated to an http2 upstream follow the same
    policy: a 503 once is retried under RetryOn 5xx (a new stream; db's application sees the
    request twice, its body whole both times), and a request never answered (/hold) is cut at
    RequestTimeout with 504. Without a policy the 503 goes through."""
    m = mesh
    app = FlakyH2App()
    m.apps.append(app)
    m.service_defaults("db", "http2")
    db = m.add("db", app_port=app.port, proxy_config={"protocol": "http2"})
    alog = str(tmp_path / "web-access.log")
    web = m.add("web", upstreams=[{"name": "db", "config": {"protocol": "http2"}}], start=False)
    m.start(web, extra_args=("-access-log", alog))
    m.wait_passing(db)
    try:
        wait_until(lambda: try_status(web.up["db"], "/ready") == 200, 30, "a request")
        assert status_of(web.up["db"], "/flaky/h0?fail=1")[0] == 503
        wait_routed(m, web, app, {"RetryOn": ["5xx"], "NumRetries": 2,
                                  "RequestTimeout": "500ms"})
        st, body = status_of(web.up["db"], "/flaky/h1?fail=2", body=b"y" * 3000)
        assert st == 200, body
        assert json.loads(body)["body_len"] == 3000
        assert app.counts["/flaky/h1?fail=2"] == 3
        assert record(alog, "/flaky/h1?fail=2")["retries"] == 2
        t0 = time.monotonic()
        st, body = status_of(web.up["db"], "/hold")
        assert st == 504 and body == b"upstream request timeout", (st, body)
        assert 0.45 < time.monotonic() - t0 < 3.0
    finally:
        delete_router(m)
