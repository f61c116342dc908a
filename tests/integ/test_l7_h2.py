"""Inbound L7 over HTTP/2 and gRPC (issue 9): db's sidecar has Proxy.Config.protocol "http2"
or "grpc" (and the matching service-defaults, which L7 intentions need).

web's sidecar is an L4 outbound: the client's h2c bytes (HTTP/2 with prior knowledge) go to
web's upstream port, over mTLS to db's sidecar, which finds HTTP/2's connection preface in the
first bytes (no ALPN on that hop), authorizes each stream, adds X-Forwarded-Client-Cert /
X-Forwarded-Proto / X-Request-Id and opens the stream on its h2c connection to the app. A
caller that negotiates ALPN "h2" itself (as Envoy does) is served as HTTP/2 from its first
byte. Apps: H2App (the `h2` library, answers with JSON of what it received) and a grpcio
server with generic handlers on raw bytes (no protoc). Clients: the `h2` library on sockets
(so that several requests share one HTTP/2 connection, checked) and grpcio.
"""

import json
import socket
import ssl
import subprocess
import re
import threading
import time
from concurrent import futures

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from mesh import (LOOPBACK, admin_args, admin_get, mesh_client_context, metric, parse_metrics,
                  wait_until)

# --- an h2c application ------------------------------------------------------------------------


class H2App:
    """An HTTP/2 prior-knowledge server (the `h2` library, one thread per connection). Each
    request is answered 200 with JSON {method, path, headers (name -> list), body_len}, except:
      /reset   the stream is reset (RST_STREAM CANCEL) before any response head
      /hold    never answered (self.held counts them, self.resets the streams reset)
      /status?n=N  answers with status N."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.resets = 0
        self.held = 0
        self.conns = []
        self.lock = threading.Lock()
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def stop(self):
        self.stopped = True
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()

    def _serve(self, c):
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
                        if hs[":path"][0] == "/hold":
                            with self.lock:
                                self.held += 1
                        if hs[":path"][0] == "/reset":
                            conn.reset_stream(ev.stream_id, 8)
                            reqs.pop(ev.stream_id)
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        if ev.stream_id in reqs:
                            reqs[ev.stream_id]["body_len"] += len(ev.data)
                    elif isinstance(ev, h2.events.StreamReset):
                        with self.lock:
                            self.resets += 1
                        reqs.pop(ev.stream_id, None)
                    elif (isinstance(ev, h2.events.StreamEnded) and ev.stream_id in reqs
                          and reqs[ev.stream_id]["headers"][":path"][0] != "/hold"):
                        r = reqs.pop(ev.stream_id)
                        hs = r["headers"]
                        path = hs[":path"][0]
                        status = 200
                        if path.startswith("/status?n="):
                            status = int(path.split("=", 1)[1])
                        body = json.dumps({"method": hs[":method"][0], "path": path,
                                           "headers": hs, "body_len": r["body_len"]}).encode()
                        conn.send_headers(ev.stream_id, [(":status", str(status)),
                                                         ("content-type", "application/json"),
                                                         ("content-length", str(len(body)))])
                        conn.send_data(ev.stream_id, body, end_stream=True)
                c.sendall(conn.data_to_send())
        except Exception:  # noqa: BLE001 - a test app: any failure ends its connection
            return


# --- an HTTP/2 client on a socket --------------------------------------------------------------


class H2Client:
    """Requests one at a time over one HTTP/2 connection (sock: plain or TLS)."""

    def __init__(self, sock):
        self.sock = sock
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                         header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def request(self, path, method="GET", headers=(), body=b"", authority="db"):
        sid = self.conn.get_next_available_stream_id()
        hs = [(":method", method), (":scheme", "https"), (":authority", authority),
              (":path", path), *headers]
        self.conn.send_headers(sid, hs, end_stream=not body)
        self.sock.sendall(self.conn.data_to_send())
        status, rh, data, reset = None, {}, b"", None
        pending = []
        while body:
            # Within the peer's window and frame size; its SETTINGS and WINDOW_UPDATEs open them.
            n = min(len(body), self.conn.local_flow_control_window(sid),
                    self.conn.max_outbound_frame_size)
            if n == 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError("connection closed")
                pending += self.conn.receive_data(chunk)
            else:
                self.conn.send_data(sid, body[:n], end_stream=n == len(body))
                body = body[n:]
            self.sock.sendall(self.conn.data_to_send())
        while True:
            done = False
            if pending:
                events, pending = pending, []
            else:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError("connection closed")
                events = self.conn.receive_data(chunk)
            for ev in events:
                if getattr(ev, "stream_id", None) != sid:
                    continue
                if isinstance(ev, h2.events.ResponseReceived):
                    rh = dict(ev.headers)
                    status = int(rh[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    data += ev.data
                elif isinstance(ev, h2.events.StreamEnded):
                    done = True
                elif isinstance(ev, h2.events.StreamReset):
                    reset = ev.error_code
                    done = True
            self.sock.sendall(self.conn.data_to_send())
            if done:
                return status, rh, data, reset


def h2_get(port, path="/", **kw):
    with socket.create_connection((LOOPBACK, port), timeout=10) as s:
        return H2Client(s).request(path, **kw)


def try_h2(port, path="/"):
    try:
        return h2_get(port, path)[0]
    except (OSError, EOFError, KeyError, h2.exceptions.ProtocolError):
        return None


# --- gRPC -----------------------------------------------------------------------------------------


def grpc_server():
    """A grpcio server on loopback (h2c) with service test.Echo on raw bytes:
    Unary echoes the request prefixed with the x-forwarded-client-cert it saw, sets initial
    metadata x-initial and trailing metadata x-trailer; Stream answers N messages (N = the
    request as a decimal); Fail ends with NOT_FOUND "no such thing"."""

    def unary(req, ctx):
        md = dict(ctx.invocation_metadata())
        ctx.send_initial_metadata((("x-initial", "i1"),))
        ctx.set_trailing_metadata((("x-trailer", "t1"),))
        return json.dumps({"req": req.decode(), "xfcc": md.get("x-forwarded-client-cert"),
                           "proto": md.get("x-forwarded-proto"),
                           "rid": md.get("x-request-id")}).encode()

    def stream(req, ctx):
        for i in range(int(req.decode())):
            yield b"msg-%d" % i

    def fail(req, ctx):
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def big(req, ctx):
        block = bytes(i % 251 for i in range(65536))
        for _ in range(int(req.decode())):
            yield block

    def slow(req, ctx):
        time.sleep(3)
        return b"late"

    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Big": grpc.unary_stream_rpc_method_handler(big),
    })
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port(f"{LOOPBACK}:0")
    srv.start()
    return srv, port


def grpc_unary(port, req=b"hi", method="Unary"):
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as ch:
        call = ch.unary_unary(f"/test.Echo/{method}")
        return call.with_call(req, timeout=10)


def grpc_code(port, method="Unary"):
    try:
        grpc_unary(port, method=method)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


# --- the mesh -----------------------------------------------------------------------------------


def l7_pair(m, protocol, app_port, proxy_config=None, db_args=(), web_args=(), up_config=None):
    """db (protocol <protocol>, service-defaults too) and web (upstream db: its protocol from
    the discovery chain, so an http2/grpc one goes through web's outbound HTTP/2 codec; the
    upstream's Config <up_config>)."""
    db_name = m.name("db")
    assert m.api.put("/v1/config", {"Kind": "service-defaults", "Name": db_name,
                                    "Protocol": protocol}) is True
    db = m.add("db", app_port=app_port, proxy_config={"protocol": protocol, **(proxy_config or {})},
               start=False)
    m.start(db, extra_args=db_args)
    web = m.add("web", upstreams=[{"name": "db", "config": up_config}], start=not web_args)
    if web_args:
        m.start(web, extra_args=web_args)
    m.wait_passing(db)
    return db, web


def drop_defaults(m):
    m.api.delete_intentions(m.name("db"))
    m.api.delete("/v1/config/service-defaults/" + m.name("db"))


def put_intentions(m, sources):
    m.intentions.add(m.name("db"))
    assert m.api.put("/v1/config", {"Kind": "service-intentions", "Name": m.name("db"),
                                    "Sources": sources}) is True


def xfcc_of(api, db, web):
    import hashlib
    der = ssl.PEM_cert_to_DER_cert(api.leaf(web.name)["CertPEM"])
    return (f"By={api.spiffe_id(db.name)};Hash={hashlib.sha256(der).hexdigest()};"
            f"URI={api.spiffe_id(web.name)}")


# --- tests: HTTP/2 -------------------------------------------------------------------------------


def test_http2_request_passes_with_forwarded_headers_and_deny_is_403(mesh):
    """case-http2: h2c from the client through web's L4 outbound reaches db's inbound, which
    detects the preface and serves HTTP/2: the app receives the request over h2c with XFCC
    (a spoofed one replaced), X-Forwarded-Proto and a kept X-Request-Id; several streams share
    the caller's connection and the app's; a deny intention -> 403 "RBAC: access denied"."""
    m, api = mesh, mesh.api
    app = m.app(H2App)
    try:
        db, web = l7_pair(m, "http2", app.port)
        wait_until(lambda: try_h2(web.up["db"]) == 200, 30, "an h2c request through the mesh")
        before = app.connections
        with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
            c = H2Client(s)
            status, rh, body, _ = c.request("/hello?x=1", headers=[
                ("x-forwarded-client-cert", "By=evil;URI=spiffe://evil"),
                ("x-request-id", "keep-me-7")])
            assert status == 200, body
            seen = json.loads(body)
            h = seen["headers"]
            assert seen["path"] == "/hello?x=1" and seen["method"] == "GET"
            assert h["x-forwarded-client-cert"] == [xfcc_of(api, db, web)], h
            assert h["x-forwarded-proto"] == ["https"], h
            assert h["x-request-id"] == ["keep-me-7"], h
            assert h[":authority"] == ["db"], h
            # A body, and a second and third stream on the same connection.
            status, _, body, _ = c.request("/post", method="POST", body=b"x" * 100000)
            assert status == 200 and json.loads(body)["body_len"] == 100000
            status, _, body, _ = c.request("/status?n=404")
            assert status == 404
            # An app's reset before its response head: 503, the connection goes on.
            status, _, body, _ = c.request("/reset")
            assert status == 503, body
            status, _, body, _ = c.request("/again")
            assert status == 200
            rid = json.loads(body)["headers"]["x-request-id"]
            assert len(rid) == 1 and len(rid[0]) == 36, rid
        # The app's h2c connection is shared by the worker's inbound sessions (h2up).
        assert app.connections <= before + 1, "at most one new app connection"

        m.intend("db", {"web": "deny"})
        wait_until(lambda: try_h2(web.up["db"]) == 403, 20, "the deny to apply")
        status, rh, body, _ = h2_get(web.up["db"], "/x")
        assert status == 403 and body == b"RBAC: access denied", (status, body)
    finally:
        drop_defaults(m)


def test_http2_l7_permissions_per_stream_on_one_connection(mesh):
    """case-l7-intentions over HTTP/2: PathPrefix /admin denied, the rest allowed: on ONE
    HTTP/2 connection /admin is 403 and / is 200 (authorization is per stream)."""
    m = mesh
    app = m.app(H2App)
    try:
        db, web = l7_pair(m, "http2", app.port)
        put_intentions(m, [{"Name": m.name("web"), "Permissions": [
            {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
            {"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}])
        wait_until(lambda: try_h2(web.up["db"], "/admin/x") == 403, 30,
                   "the L7 intention to apply")
        with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
            c = H2Client(s)
            assert c.request("/admin")[0] == 403
            assert c.request("/")[0] == 200
            assert c.request("/admin/../admin/y")[0] == 403  # normalized before the decision
            assert c.request("/public")[0] == 200
    finally:
        drop_defaults(m)


def test_http2_direct_tls_with_alpn_h2(mesh, tmp_path):
    """A caller that opens the mesh hop itself with ALPN (as Envoy does) gets "h2" selected
    and is served as HTTP/2; offering only http/1.1 gets http/1.1 and an HTTP/1.1 answer."""
    m, api = mesh, mesh.api
    app = m.app(H2App)
    try:
        db, web = l7_pair(m, "http2", app.port)
        m.intend("db", {"web": "allow"})
        def ctx(alpn):
            return mesh_client_context(api, str(tmp_path), web.name, alpn)

        def h2_over_tls():
            with ctx(["h2", "http/1.1"]).wrap_socket(
                    socket.create_connection((LOOPBACK, db.public_port), timeout=10)) as s:
                assert s.selected_alpn_protocol() == "h2"
                return H2Client(s).request("/tls")

        wait_until(lambda: h2_over_tls()[0] == 200, 30, "h2 over TLS with ALPN")
        status, _, body, _ = h2_over_tls()
        seen = json.loads(body)
        assert seen["headers"]["x-forwarded-client-cert"] == [xfcc_of(api, db, web)]
        with ctx(["http/1.1"]).wrap_socket(
                socket.create_connection((LOOPBACK, db.public_port), timeout=10)) as s:
            assert s.selected_alpn_protocol() == "http/1.1"
            s.sendall(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n")
            got = s.recv(65536)
            # The app speaks h2 only: what matters is that HTTP/1.1 was spoken back.
            assert got.startswith(b"HTTP/1.1 "), got[:80]
    finally:
        drop_defaults(m)


# --- tests: gRPC ----------------------------------------------------------------------------------


def test_grpc_unary_streaming_errors_and_deny(mesh):
    """case-grpc: a grpcio client through web's L4 outbound reaches a grpcio server behind
    db's inbound (protocol grpc): a unary call passes with its initial and trailing metadata
    and the app sees XFCC; server streaming delivers every message; an app's error status
    (NOT_FOUND) passes through; a deny intention -> PERMISSION_DENIED from connectd."""
    m, api = mesh, mesh.api
    srv, port = grpc_server()
    try:
        db, web = l7_pair(m, "grpc", port)
        wait_until(lambda: grpc_code(web.up["db"]) == grpc.StatusCode.OK, 30,
                   "a gRPC call through the mesh")
        resp, call = grpc_unary(web.up["db"], b"hello")
        seen = json.loads(resp)
        assert seen["req"] == "hello"
        assert seen["xfcc"] == xfcc_of(api, db, web), seen
        assert seen["proto"] == "https" and seen["rid"], seen
        assert ("x-initial", "i1") in tuple(call.initial_metadata())
        assert ("x-trailer", "t1") in tuple(call.trailing_metadata())
        assert call.code() == grpc.StatusCode.OK

        with grpc.insecure_channel(f"{LOOPBACK}:{web.up['db']}") as ch:
            got = list(ch.unary_stream("/test.Echo/Stream")(b"50", timeout=10))
        assert got == [b"msg-%d" % i for i in range(50)]

        with pytest.raises(grpc.RpcError) as e:
            grpc_unary(web.up["db"], method="Fail")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert e.value.details() == "no such thing"

        m.intend("db", {"web": "deny"})
        wait_until(lambda: grpc_code(web.up["db"]) == grpc.StatusCode.PERMISSION_DENIED, 20,
                   "the deny to apply")
        with pytest.raises(grpc.RpcError) as e:
            grpc_unary(web.up["db"])
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == "RBAC: access denied"
    finally:
        srv.stop(0)
        drop_defaults(m)


def test_grpc_app_down_is_unavailable(mesh):
    """The app's connection refused: each call gets UNAVAILABLE (14) from connectd, a
    trailers-only answer, rather than a dropped connection."""
    m = mesh
    srv, port = grpc_server()
    try:
        db, web = l7_pair(m, "grpc", port)
        wait_until(lambda: grpc_code(web.up["db"]) == grpc.StatusCode.OK, 30,
                   "a gRPC call through the mesh")
        srv.stop(0).wait()
        with pytest.raises(grpc.RpcError) as e:
            grpc_unary(web.up["db"])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "connection failure" in e.value.details(), e.value.details()
    finally:
        srv.stop(0)
        drop_defaults(m)


def test_grpc_request_timeout_and_access_log(mesh, tmp_path):
    """local_request_timeout_ms: a call the app answers too late gets UNAVAILABLE (14, what
    Envoy's local reply gives a 504) "upstream request timeout" from connectd; each stream has
    an access-log record with protocol HTTP/2 and its grpc-status."""
    m = mesh
    srv, port = grpc_server()
    alog = tmp_path / "access.log"
    try:
        db, web = l7_pair(m, "grpc", port, proxy_config={"local_request_timeout_ms": 500},
                          db_args=("-access-log", str(alog)))
        wait_until(lambda: grpc_code(web.up["db"]) == grpc.StatusCode.OK, 30,
                   "a gRPC call through the mesh")
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            grpc_unary(web.up["db"], method="Slow")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert e.value.details() == "upstream request timeout"
        assert time.monotonic() - t0 < 2.5

        def records():
            return [json.loads(x) for x in alog.read_text().splitlines() if x.strip()]

        wait_until(lambda: any(r.get("path") == "/test.Echo/Slow" for r in records()), 10,
                   "the timed-out call's record")
        slow = [r for r in records() if r.get("path") == "/test.Echo/Slow"][-1]
        assert slow["protocol"] == "HTTP/2" and slow["grpc_status"] == "14", slow
        assert slow["result"] == "local_timeout" and slow["method"] == "POST", slow
        ok = [r for r in records() if r.get("path") == "/test.Echo/Unary"][-1]
        assert ok["protocol"] == "HTTP/2" and ok["grpc_status"] == "0", ok
        assert ok["status"] == 200 and ok["result"] == "ok", ok
    finally:
        srv.stop(0)
        drop_defaults(m)


def test_http2_caller_reset_reaches_app_and_rapid_reset_ends_connection(mesh):
    """A caller's RST_STREAM resets the app's stream; a caller that opens and resets streams
    in a flood (CVE-2023-44487) gets GOAWAY(ENHANCE_YOUR_CALM), its connection ends, the
    metric counts it, and the sidecar serves the next connection. The client's first HTTP/2
    hop is web's outbound codec (an http2 upstream), so web's metrics count it."""
    m = mesh
    app = m.app(H2App)
    args, admin = admin_args()
    try:
        db, web = l7_pair(m, "http2", app.port, web_args=args)
        wait_until(lambda: try_h2(web.up["db"]) == 200, 30, "an h2c request through the mesh")
        with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
            c = H2Client(s)
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, [(":method", "GET"), (":scheme", "https"),
                                      (":authority", "db"), (":path", "/hold")], end_stream=True)
            s.sendall(c.conn.data_to_send())
            wait_until(lambda: app.held >= 1, 10, "the stream to reach the app")
            c.conn.reset_stream(sid, 8)
            s.sendall(c.conn.data_to_send())
            wait_until(lambda: app.resets >= 1, 10, "the app's stream to be reset")

        with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            for _ in range(1000):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, [(":method", "GET"), (":scheme", "https"),
                                        (":authority", "db"), (":path", "/hold")])
                conn.reset_stream(sid, 8)
            goaway = None
            try:
                s.sendall(conn.data_to_send())
                while goaway is None:
                    data = s.recv(65536)
                    if not data:
                        break
                    for ev in conn.receive_data(data):
                        if isinstance(ev, h2.events.ConnectionTerminated):
                            goaway = ev.error_code
            except (OSError, h2.exceptions.ProtocolError):
                pass
            assert goaway == 11, goaway  # ENHANCE_YOUR_CALM
        wait_until(lambda: metric(parse_metrics(admin_get(admin, "/metrics")[1]),
                                  "connectd_http2_protocol_closes_total") >= 1, 10,
                   "the flood to be counted")
        # A protocol error inside a frame (a SETTINGS frame of 5 bytes): GOAWAY
        # FRAME_SIZE_ERROR, the connection closes, and it is counted too.
        with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                      + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x00" * 5)
            got = b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                got += data
            # GOAWAY (type 7) with FRAME_SIZE_ERROR (6) somewhere in what came back.
            assert re.search(rb"\x07\x00\x00\x00\x00\x00.{4}\x00\x00\x00\x06", got, re.S), got
        wait_until(lambda: metric(parse_metrics(admin_get(admin, "/metrics")[1]),
                                  "connectd_http2_protocol_closes_total") >= 2, 10,
                   "the protocol error to be counted")
        assert db.proxy.alive() and web.proxy.alive()
        assert try_h2(web.up["db"]) == 200
    finally:
        drop_defaults(m)


def test_http2_to_http_service_is_translated_to_http11(mesh):
    """An http service's app speaks HTTP/1.1: an HTTP/2 caller's streams are translated, each
    to an HTTP/1.1 exchange of its own: the app sees an HTTP/1.1 request with Host from
    :authority and XFCC; a body without content-length goes chunked; a chunked answer is
    decoded into DATA; a 3 MB answer moves under back-pressure; an HTTP/1.1 caller of the same
    service is served as before. (Before mux_h2 the h2c bytes reached the HTTP/1.1 codec,
    which answered in HTTP/1.1: no HTTP/2 answer at all.)"""
    from test_l7_inbound import HttpApp, try_get
    m, api = mesh, mesh.api
    app = m.app(HttpApp)
    try:
        db, web = l7_pair(m, "http", app.port)
        wait_until(lambda: try_h2(web.up["db"]) == 200, 30, "an h2c request through the mesh")
        with socket.create_connection((LOOPBACK, web.up["db"]), timeout=30) as s:
            c = H2Client(s)
            status, rh, body, _ = c.request("/hello?x=1", headers=[("x-request-id", "r-1")])
            assert status == 200, body
            seen = json.loads(body)
            h = seen["headers"]
            assert seen["version"] == "HTTP/1.1" and seen["target"] == "/hello?x=1", seen
            assert h["host"] == ["db"] and h["x-request-id"] == ["r-1"], h
            assert h["x-forwarded-client-cert"] == [xfcc_of(api, db, web)], h
            status, _, body, _ = c.request("/post", method="POST", body=b"z" * 100000)
            seen = json.loads(body)
            assert status == 200 and seen["body_len"] == 100000, seen
            assert seen["headers"]["transfer-encoding"] == ["chunked"], seen
            status, _, body, _ = c.request("/chunked?n=50000")
            assert status == 200 and body == bytes(i % 251 for i in range(50000))
            status, _, body, _ = c.request("/big?n=3000000")
            assert status == 200 and len(body) == 3000000
            status, _, body, _ = c.request("/after")
            assert status == 200
        assert try_get(web.up["db"]) == 200
    finally:
        drop_defaults(m)


def test_http2_large_bodies_and_many_concurrent_streams(mesh):
    """Flow control end to end: a 3 MiB request body crosses both legs (far over every
    HTTP/2 window, so it moves only if each leg gives bytes back as the other takes them), and
    h2load's 2000 requests over 4 connections with 20 concurrent streams each all succeed."""
    m = mesh
    app = m.app(H2App)
    try:
        db, web = l7_pair(m, "http2", app.port)
        wait_until(lambda: try_h2(web.up["db"]) == 200, 30, "an h2c request through the mesh")
        with socket.create_connection((LOOPBACK, web.up["db"]), timeout=30) as s:
            c = H2Client(s)
            status, _, body, _ = c.request("/big", method="POST", body=b"y" * (3 << 20))
            assert status == 200 and json.loads(body)["body_len"] == 3 << 20
        out = subprocess.run(["h2load", "-n", "2000", "-c", "4", "-m", "20",
                              f"http://{LOOPBACK}:{web.up['db']}/load"],
                             capture_output=True, text=True, timeout=120)
        assert re.search(r"requests: 2000 total, 2000 started, 2000 done, 2000 succeeded",
                         out.stdout), out.stdout
    finally:
        drop_defaults(m)


def test_grpc_large_streamed_response(mesh):
    """200 messages of 64 KiB (12.5 MiB, ~50 stream windows) streamed by the app reach the
    client whole and in order: the response moves only as far as the caller's window lets
    connectd pass it on and give the app's window back (h2_consume on the other leg)."""
    m = mesh
    srv, port = grpc_server()
    try:
        db, web = l7_pair(m, "grpc", port)
        wait_until(lambda: grpc_code(web.up["db"]) == grpc.StatusCode.OK, 30,
                   "a gRPC call through the mesh")
        block = bytes(i % 251 for i in range(65536))
        with grpc.insecure_channel(f"{LOOPBACK}:{web.up['db']}") as ch:
            it = ch.unary_stream("/test.Echo/Big")(b"200", timeout=60)
            first = next(it)
            rest = list(it)
        assert first == block and len(rest) == 199 and all(x == block for x in rest)
    finally:
        srv.stop(0)
        drop_defaults(m)
