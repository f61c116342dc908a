"""HTTP/1.1 where the two legs of a hop differ (issue 9), and HTTP/1.1 connection reuse.

Translation: an HTTP/1.1 client of an http2 or grpc service whose application speaks h2c
only. Outbound, web's sidecar parses the client's HTTP/1.1 and sends each request as a stream
on a shared HTTP/2 mesh connection (ALPN h2) to db's sidecar; inbound, db's sidecar serves an
HTTP/1.1 caller (a raw mTLS client offering ALPN http/1.1) by opening a stream per request on
the worker's shared h2c connection to the application. H2JsonApp (the `h2` library) answers
with JSON of what it received and WITHOUT content-length (so the HTTP/1.1 side has to chunk),
except /cl (with one) and /trailers (trailers after the body). Before the translation, both
directions spoke HTTP/1.1 to the h2c-only application, which cannot answer it.

The keep-alive race: a kept-alive HTTP/1.1 connection that its server closes as idle at the
moment a request is sent on it loses that request before any byte of an answer. The request
reached nobody, so connectd sends it once more on a new connection (outbound: a fresh dial,
not another pooled connection), as Envoy does, instead of answering 503. The race is made
deterministic by servers that act it out: they answer the first request of each connection
and close the connection, without a byte of answer, on any later one.
"""

import json
import os
import re
import socket
import ssl
import struct
import tempfile
import threading

import h2.config
import h2.connection
import h2.events

from mesh import (LOOPBACK, TcpApp, admin_args, admin_get, sidecar_registration,
                  tls_client_context, wait_until, write_leaf_files)
from test_l7_inbound import Reader, connect, response

# --- an h2c-only application -------------------------------------------------------------------

FLOOD = 5000  # interim answers of the /flood tests: 20 MB once written as HTTP/1.1


class H2JsonApp(TcpApp):
    """HTTP/2 with prior knowledge only (anything else ends the connection). Each request is
    answered 200 with JSON {method, path, headers (name -> list), body_len}, without
    content-length, except: /cl with content-length; /trailers adds trailers x-trailer: t1 and
    grpc-status: 0 after the body; /status?n=N answers N; /big?n=N answers N bytes (i % 251)
    as the windows allow; /hold is never answered; a path starting /refuse is refused
    (RST_STREAM REFUSED_STREAM) the first time it is asked for: after the whole request came,
    or for /refuse-early as soon as its head did.
    self.connections counts connections, self.refused the refusals."""

    def __init__(self):
        self.connections = 0
        self.refused = []
        self.flood_sent = threading.Event()
        super().__init__()

    @staticmethod
    def _send_pending(conn, pending):
        """Sends what the flow-control windows allow of the /big answers in <pending>."""
        for sid in list(pending):
            data = pending[sid]
            while data:
                n = min(len(data), conn.local_flow_control_window(sid),
                        conn.max_outbound_frame_size)
                if n <= 0:
                    break
                conn.send_data(sid, data[:n], end_stream=n == len(data))
                data = data[n:]
            pending[sid] = data
            if not data:
                del pending[sid]

    def handle(self, c):
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                    header_encoding="utf-8"))
        conn.initiate_connection()
        c.sendall(conn.data_to_send())
        reqs, pending = {}, {}
        flood = False
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.StreamReset):
                        pending.pop(ev.stream_id, None)
                    if isinstance(ev, h2.events.RequestReceived):
                        hs = {}
                        for k, v in ev.headers:
                            hs.setdefault(k, []).append(v)
                        path = hs[":path"][0]
                        if path == "/refuse-early" and path not in self.refused:
                            self.refused.append(path)
                            conn.reset_stream(ev.stream_id, 7)  # REFUSED_STREAM
                            continue
                        reqs[ev.stream_id] = {"headers": hs, "body_len": 0}
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        if ev.stream_id in reqs:
                            reqs[ev.stream_id]["body_len"] += len(ev.data)
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in reqs:
                        r = reqs.pop(ev.stream_id)
                        path = r["headers"][":path"][0]
                        if path.startswith("/refuse") and path not in self.refused:
                            self.refused.append(path)
                            conn.reset_stream(ev.stream_id, 7)  # REFUSED_STREAM
                        else:
                            self._answer(conn, ev.stream_id, r, pending)
                            flood = flood or path == "/flood"
                self._send_pending(conn, pending)
                c.sendall(conn.data_to_send())
                if flood:
                    self.flood_sent.set()
        except Exception:  # noqa: BLE001 - a test app: any failure ends its connection
            return

    @staticmethod
    def _answer(conn, sid, r, pending):
        hs = r["headers"]
        path = hs[":path"][0]
        if path == "/hold":
            return
        if path == "/flood":
            # FLOOD interim answers of 4 kB each (HPACK makes each a few bytes on the wire).
            for _ in range(FLOOD):
                conn.send_headers(sid, [(":status", "103"), ("link", "x" * 4000)])
            conn.send_headers(sid, [(":status", "200"), ("content-length", "4")])
            conn.send_data(sid, b"done", end_stream=True)
            return
        if path.startswith("/big?n="):
            n = int(path.split("=", 1)[1])
            conn.send_headers(sid, [(":status", "200")])
            pending[sid] = bytes(i % 251 for i in range(n))
            return
        status = int(path.split("=", 1)[1]) if path.startswith("/status?n=") else 200
        body = json.dumps({"method": hs[":method"][0], "path": path, "headers": hs,
                           "body_len": r["body_len"]}).encode()
        head = [(":status", str(status)), ("content-type", "application/json")]
        if path == "/cl":
            head.append(("content-length", str(len(body))))
        conn.send_headers(sid, head)
        trailers = path == "/trailers"
        conn.send_data(sid, body, end_stream=not trailers)
        if trailers:
            conn.send_headers(sid, [("x-trailer", "t1"), ("grpc-status", "0")], end_stream=True)

# --- servers that close a reused connection ------------------------------------------------------


class ClosesReusedConnections(TcpApp):
    """An HTTP/1.1 server (over TLS when <ctx> is given) that answers the first request of
    every connection with 200 and JSON {conn, path, body_len} (kept alive), and on any later
    request of a connection reads it whole and closes the connection without answering: with
    a reset when <rst>, else with a FIN. /die is never answered. self.seen lists (conn, path,
    body_len) for every request read, answered or not."""

    def __init__(self, ctx=None, rst=False):
        self.ctx = ctx
        self.rst = rst
        self.seen = []
        self.conn_seq = 0
        self.seen_lock = threading.Lock()
        super().__init__()

    def handle(self, conn):
        conn.settimeout(10)
        if self.ctx is not None:
            try:
                conn = self.ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                return
        with self.seen_lock:
            self.conn_seq += 1
            me = self.conn_seq
        r = Reader(conn)
        served = 0
        while True:
            try:
                head = r.head()
            except (OSError, EOFError):
                return
            if head is None:
                return
            line, headers = head
            path = line.split(" ")[1]
            body = r.body(headers, request=True)
            with self.seen_lock:
                self.seen.append((me, path, len(body)))
            if served > 0 or path == "/die":
                if self.rst:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                return
            served += 1
            out = json.dumps({"conn": me, "path": path, "body_len": len(body)}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(out), out))

    def attempts(self, path):
        with self.seen_lock:
            return [c for c, p, _ in self.seen if p == path]


def sidecar_tls_context(api, service, workdir):
    """A server context presenting the agent's leaf for <service>: a stand-in for its sidecar
    that the outbound side verifies like a real one."""
    leaf = api.leaf(service)
    cert = os.path.join(workdir, f"{service}.pem")
    key = os.path.join(workdir, f"{service}.key")
    with open(cert, "w") as f:
        f.write(leaf["CertPEM"])
    with open(key, "w") as f:
        f.write(leaf["PrivateKeyPEM"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cadata=api.roots_pem())
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def request(port, method, path, body=b"", extra=""):
    """One request on a new connection, closed after its answer: (status, JSON or body)."""
    with connect(port) as s:
        s.sendall((f"{method} {path} HTTP/1.1\r\nHost: db\r\nContent-Length: {len(body)}\r\n"
                   f"{extra}\r\n").encode() + body)
        status, _, data, _ = response(Reader(s))
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data


# --- tests: the keep-alive race ----------------------------------------------------------------


def test_pooled_connection_lost_before_answer_is_retried_on_a_fresh_dial(mesh):
    """web's outbound (http upstream, one worker, so every application connection meets the
    same pool) sends a request on the upstream connection its previous application connection
    left in the pool; the endpoint (a TLS server with db's leaf) closes it on reading the
    request, as a server whose idle timeout fired at that moment would. The request, its body
    held, is sent again on a newly dialled connection and answered 200 (before: 503 "the
    upstream closed before its answer"). A request the new connection loses too is a 503,
    sent twice and no more."""
    m = mesh
    name = m.name("db")
    srv = ClosesReusedConnections(sidecar_tls_context(m.api, name, tempfile.mkdtemp(dir=m.workdir)))
    m.apps.append(srv)
    m.api.register(sidecar_registration(name, srv.port + 0, srv.port))
    m.registered.append(name)
    m.api.wait_passing(name, port=srv.port)
    web = m.add("web", upstreams=[{"name": "db", "config": {"protocol": "http"}}], start=False)
    m.start(web, extra_args=("-workers", "1"))
    wait_until(lambda: request(web.up["db"], "GET", "/warm")[0] == 200, 30,
               "a request through web's outbound")
    web.proxy.wait_log(r"upstream connection to .* pooled")
    first = srv.attempts("/warm")[-1]

    status, seen = request(web.up["db"], "POST", "/again", body=b"b" * 1000)
    assert status == 200, (status, seen, srv.seen)
    # The pooled connection got it first and lost it; a new one answered, with the body.
    assert srv.attempts("/again") == [first, seen["conn"]], srv.seen
    assert seen["conn"] != first and seen["body_len"] == 1000, seen
    web.proxy.wait_log(r"before any answer on a reused connection: sending the request again")

    # The new connection is pooled in turn; /die is lost on it and on the retry's: 503.
    web.proxy.wait_log(r"(?s)sending the request again.*upstream connection to .* pooled")
    status, body = request(web.up["db"], "GET", "/die")
    assert status == 503, (status, body)
    assert len(srv.attempts("/die")) == 2, srv.seen


def test_kept_application_connection_lost_before_answer_is_retried(mesh):
    """db's inbound (protocol http) keeps its application connection alive between a
    caller's requests; the application resets it on reading the second request, as one whose
    keep-alive timeout fired at that moment would. db's sidecar connects again and sends the
    request (a 5000-byte body, held) once more: the caller gets 200 on the same connection,
    answered by the application's second connection (before: 503). A request whose body is
    over what is held for a retry gets the 503."""
    m = mesh
    app = ClosesReusedConnections(rst=True)
    m.apps.append(app)
    db = m.add("db", app_port=app.port, proxy_config={"protocol": "http"})
    web = m.add("web", upstreams=("db",))
    m.wait_passing(db)
    m.intend("db", {"web": "allow"})

    def fresh():
        try:
            return request(web.up["db"], "GET", "/warm")[0]
        except (OSError, EOFError, AssertionError):
            return None

    wait_until(lambda: fresh() == 200, 30, "a request through the mesh")
    with connect(web.up["db"]) as s:
        r = Reader(s)
        s.sendall(b"GET /one HTTP/1.1\r\nHost: db\r\n\r\n")
        status, _, body, _ = response(r)
        assert status == 200, body
        one = json.loads(body)["conn"]
        s.sendall(b"POST /two HTTP/1.1\r\nHost: db\r\nContent-Length: 5000\r\n\r\n" + b"t" * 5000)
        status, _, body, _ = response(r)
        assert status == 200, (status, body, app.seen)
        two = json.loads(body)
        assert two["conn"] != one and two["body_len"] == 5000, two
        assert app.attempts("/two") == [one, two["conn"]], app.seen
        # A body over what is held for a retry (64 KiB) is not sent again: 503.
        s.sendall(b"POST /three HTTP/1.1\r\nHost: db\r\nContent-Length: 100000\r\n\r\n"
                  + b"t" * 100000)
        status, _, body, _ = response(r)
        assert status == 503, (status, body)
        assert app.attempts("/three") == [two["conn"]], app.seen


# --- tests: HTTP/1.1 callers of HTTP/2 services --------------------------------------------------


def h2_pair(m, protocol="http2", web_args=(), db_args=(), db_config=None):
    """db (protocol <protocol>, service-defaults too, more Proxy.Config <db_config>) behind
    which an H2JsonApp, and web with upstream db (Config.protocol <protocol>). Returns (app,
    db, web)."""
    app = H2JsonApp()
    m.apps.append(app)
    m.service_defaults("db", protocol)
    db = m.add("db", app_port=app.port, proxy_config={"protocol": protocol, **(db_config or {})},
               start=False)
    m.start(db, extra_args=db_args)
    web = m.add("web", upstreams=[{"name": "db", "config": {"protocol": protocol}}], start=False)
    m.start(web, extra_args=web_args)
    m.wait_passing(db)
    return app, db, web


class MtlsCaller:
    """A caller that opens the mesh hop to <svc>'s sidecar itself with <source>'s leaf,
    offering ALPN http/1.1 only."""

    def __init__(self, api, workdir, source, svc):
        paths = write_leaf_files(str(workdir), api.leaf(source), source)
        ca = os.path.join(str(workdir), "ca.pem")
        with open(ca, "w") as f:
            f.write(api.roots_pem())
        self.ctx = tls_client_context(paths["chain_all"], paths["key"], ca)
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.port = svc.public_port

    def connect(self):
        s = self.ctx.wrap_socket(socket.create_connection((LOOPBACK, self.port), timeout=10))
        assert s.selected_alpn_protocol() == "http/1.1"
        return s

    def status(self, path="/"):
        try:
            with self.connect() as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: db\r\n\r\n".encode())
                return response(Reader(s))[0]
        except (OSError, EOFError, AssertionError, ValueError):
            return None


def try_status(port, path="/"):
    try:
        return request(port, "GET", path)[0]
    except (OSError, EOFError, AssertionError, ValueError):
        return None


def chunked(body, size=7000):
    out = b""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += b"%x\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\n\r\n"


def response_with_trailers(r):
    """A chunked response: (status, headers, body, trailers {lower-case name: value})."""
    line, headers = r.head()
    assert headers.get("transfer-encoding") == ["chunked"], headers
    body = bytearray()
    while True:
        size = int(r.line().split(b";")[0], 16)
        if size == 0:
            break
        body += r.exact(size)
        assert r.exact(2) == b"\r\n"
    trailers = {}
    while True:
        t = r.line()
        if t == b"":
            break
        k, v = t.decode().split(":", 1)
        trailers[k.strip().lower()] = v.strip()
    return int(line.split(" ")[1]), headers, bytes(body), trailers


def exchange_suite(s, r):
    """Requests on one HTTP/1.1 connection to an H2JsonApp behind the mesh: returns what the
    app saw of the first. Checks bodies both ways (Content-Length and chunked requests), the
    chunked answer made for a body without content-length, a Content-Length kept, trailers
    only for a TE: trailers caller, and a status passed through."""
    s.sendall(b"GET /hello?x=1 HTTP/1.1\r\nHost: db\r\nX-Request-Id: r-1\r\n"
              b"X-Forwarded-Client-Cert: By=evil\r\nConnection: keep-alive, x-hop\r\n"
              b"X-Hop: 1\r\n\r\n")
    status, headers, body, _ = response(r)
    assert status == 200, body
    assert headers["transfer-encoding"] == ["chunked"], headers
    first = json.loads(body)
    assert first["method"] == "GET" and first["path"] == "/hello?x=1", first
    assert first["headers"][":authority"] == ["db"], first
    assert "x-hop" not in first["headers"] and "connection" not in first["headers"], first

    s.sendall(b"POST /post HTTP/1.1\r\nHost: db\r\nContent-Length: 100000\r\n\r\n"
              + b"p" * 100000)
    status, _, body, _ = response(r)
    assert status == 200 and json.loads(body)["body_len"] == 100000, body

    s.sendall(b"POST /chunked HTTP/1.1\r\nHost: db\r\nTransfer-Encoding: chunked\r\n\r\n"
              + chunked(b"c" * 50000))
    status, _, body, _ = response(r)
    seen = json.loads(body)
    assert status == 200 and seen["body_len"] == 50000, seen
    assert "transfer-encoding" not in seen["headers"], seen

    s.sendall(b"GET /cl HTTP/1.1\r\nHost: db\r\n\r\n")
    status, headers, body, _ = response(r)
    assert status == 200 and headers["content-length"] == [str(len(body))], headers

    s.sendall(b"GET /trailers HTTP/1.1\r\nHost: db\r\nTE: trailers\r\n\r\n")
    status, _, body, trailers = response_with_trailers(r)
    assert status == 200 and json.loads(body)["headers"]["te"] == ["trailers"], body
    assert trailers == {"x-trailer": "t1", "grpc-status": "0"}, trailers
    s.sendall(b"GET /trailers HTTP/1.1\r\nHost: db\r\n\r\n")
    status, _, body, trailers = response_with_trailers(r)
    assert status == 200 and trailers == {}, trailers

    s.sendall(b"GET /status?n=404 HTTP/1.1\r\nHost: db\r\n\r\n")
    assert response(r)[0] == 404
    return first


def test_http11_client_to_http2_upstream_through_the_outbound_listener(mesh):
    """web's upstream db is http2 and db's application speaks h2c only: an HTTP/1.1 client of
    web's upstream listener is served, each request a stream on web's shared HTTP/2 mesh
    connection (ALPN h2) to db's sidecar: bodies both ways, chunked and not, trailers for a
    TE: trailers client, hop-by-hop fields left behind. Three more client connections in a
    row, then twenty at once, ride the same mesh connection (one worker:
    connectd_upstream_h2_connections 1). A deny
    intention is a 403 "RBAC: access denied" from db's sidecar, translated. (Before: the
    bytes were relayed at L4 and db's sidecar spoke HTTP/1.1 to the h2c-only application.)"""
    m = mesh
    args, admin = admin_args()
    app, db, web = h2_pair(m, web_args=("-workers", "1", *args))
    wait_until(lambda: try_status(web.up["db"]) == 200, 30, "a request through the mesh")
    with connect(web.up["db"]) as s:
        seen = exchange_suite(s, Reader(s))
    h = seen["headers"]
    assert h["x-request-id"] == ["r-1"], h
    # db's sidecar replaced the XFCC: the request crossed the mesh at L7, as HTTP/2.
    assert h["x-forwarded-client-cert"][0].startswith("By=spiffe://"), h
    for i in range(3):
        assert try_status(web.up["db"], f"/more{i}") == 200
    # Twenty clients at once, each with a 200 kB answer: their streams share the one mesh
    # connection.
    results = []

    def client(i):
        results.append(try_status(web.up["db"], f"/big?n={200000 + i}"))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 20, results
    metrics = admin_get(admin, "/metrics")[1]
    assert re.search(r"^connectd_upstream_h2_connections 1$", metrics, re.M), metrics
    streams = re.search(r"^connectd_upstream_h2_streams_total (\d+)$", metrics, re.M)
    assert streams and int(streams.group(1)) >= 30, metrics

    m.intend("db", {"web": "deny"})
    wait_until(lambda: try_status(web.up["db"]) == 403, 20, "the deny to apply")
    status, body = request(web.up["db"], "GET", "/denied")
    assert status == 403 and body == b"RBAC: access denied", (status, body)


def test_http11_mtls_caller_of_http2_service(mesh, tmp_path):
    """A caller that opens the mesh hop itself offering ALPN http/1.1 only, to db (protocol
    http2, an h2c-only application): db's sidecar serves HTTP/1.1 and opens each request as a
    stream on the worker's shared h2c connection to the application, with XFCC (the spoofed
    one replaced), X-Forwarded-Proto and X-Request-Id added: bodies both ways, chunked and
    not, trailers for a TE: trailers caller, a 3 MB answer (twelve stream windows: it moves
    only as the caller takes it), an HTTP/1.0 request answered until close. A second caller
    connection shares the application connection (one worker). A deny is 403. (Before:
    HTTP/1.1 to the h2c application, which closed the connection: 503.)"""
    from test_l7_h2 import xfcc_of
    m, api = mesh, mesh.api
    app, db, web = h2_pair(m, db_args=("-workers", "1"))
    caller = MtlsCaller(api, tmp_path, web.name, db)
    wait_until(lambda: caller.status() == 200, 30, "an HTTP/1.1 request over mTLS")
    before = app.connections
    with caller.connect() as s:
        r = Reader(s)
        seen = exchange_suite(s, r)
        s.sendall(b"GET /big?n=3000000 HTTP/1.1\r\nHost: db\r\n\r\n")
        status, headers, body, _ = response(r)
        assert status == 200 and headers["transfer-encoding"] == ["chunked"], headers
        assert body == bytes(i % 251 for i in range(3000000))
    h = seen["headers"]
    assert h["x-forwarded-client-cert"] == [xfcc_of(api, db, web)], h
    assert h["x-forwarded-proto"] == ["https"] and h["x-request-id"] == ["r-1"], h
    with caller.connect() as s:
        s.sendall(b"GET /old HTTP/1.0\r\nHost: db\r\n\r\n")
        status, headers, body, _ = response(Reader(s))
        assert status == 200 and json.loads(body)["path"] == "/old", body
        assert "transfer-encoding" not in headers and headers["connection"] == ["close"]
    assert caller.status("/second") == 200
    assert app.connections == before, "the worker's sessions share one h2c connection"

    m.intend("db", {"web": "deny"})
    wait_until(lambda: caller.status() == 403, 20, "the deny to apply")


def test_http11_caller_of_http2_service_refused_stream_is_opened_again(mesh, tmp_path):
    """The h2c application refuses a stream unprocessed (RST_STREAM REFUSED_STREAM, which
    RFC 9113 section 8.7 makes safe to retry): db's sidecar opens it again with the head and
    the body it held, and the HTTP/1.1 caller gets the answer to its one request (before:
    503)."""
    m = mesh
    app, db, web = h2_pair(m, db_args=("-workers", "1"))
    caller = MtlsCaller(m.api, tmp_path, web.name, db)
    wait_until(lambda: caller.status() == 200, 30, "an HTTP/1.1 request over mTLS")
    with caller.connect() as s:
        r = Reader(s)
        s.sendall(b"POST /refuse-once HTTP/1.1\r\nHost: db\r\nContent-Length: 5000\r\n\r\n"
                  + b"r" * 5000)
        status, _, body, _ = response(r)
        assert status == 200, (status, body)
        seen = json.loads(body)
        assert seen["path"] == "/refuse-once" and seen["body_len"] == 5000, seen
        assert app.refused == ["/refuse-once"], app.refused
        s.sendall(b"GET /refuse-again HTTP/1.1\r\nHost: db\r\n\r\n")
        assert response(r)[0] == 200
        # Refused while its body is still coming: every byte is sent on the new stream.
        s.sendall(b"POST /refuse-early HTTP/1.1\r\nHost: db\r\nContent-Length: 60000\r\n\r\n")
        for _ in range(10):
            s.sendall(b"e" * 6000)
        status, _, body, _ = response(r)
        assert status == 200 and json.loads(body)["body_len"] == 60000, (status, body)
        assert app.refused == ["/refuse-once", "/refuse-again", "/refuse-early"], app.refused


def test_http11_caller_of_http2_service_timeout_and_app_down(mesh, tmp_path):
    """local_request_timeout_ms: a request the h2c application never answers is 504
    "upstream request timeout" (its stream reset), and the next request on the same caller
    connection is served on the same application connection. With the application gone, a
    request is 503 with Envoy's words for a connection failure."""
    m = mesh
    app, db, web = h2_pair(m, db_args=("-workers", "1"),
                           db_config={"local_request_timeout_ms": 500})
    caller = MtlsCaller(m.api, tmp_path, web.name, db)
    wait_until(lambda: caller.status() == 200, 30, "an HTTP/1.1 request over mTLS")
    before = app.connections
    with caller.connect() as s:
        r = Reader(s)
        s.sendall(b"GET /hold HTTP/1.1\r\nHost: db\r\n\r\n")
        status, _, body, _ = response(r)
        assert status == 504 and body == b"upstream request timeout", (status, body)
        s.sendall(b"GET /after HTTP/1.1\r\nHost: db\r\n\r\n")
        status, _, body, _ = response(r)
        assert status == 200 and json.loads(body)["path"] == "/after", body
    assert app.connections == before
    app.stop()
    wait_until(lambda: caller.status() == 503, 10, "a 503 with the application gone")
    with caller.connect() as s:
        s.sendall(b"GET /gone HTTP/1.1\r\nHost: db\r\n\r\n")
        status, _, body, _ = response(Reader(s))
        assert status == 503 and b"connection failure" in body, (status, body)


# --- HTTP/1.1 and connectd's drain ---------------------------------------------------------------


class SlowApp(TcpApp):
    """HTTP/1.1, kept alive: every request is answered 200 "ok"; /slow only after
    self.release is set (self.slow is set when /slow came)."""

    def __init__(self):
        self.slow = threading.Event()
        self.release = threading.Event()
        super().__init__()

    def handle(self, conn):
        r = Reader(conn)
        while True:
            try:
                head = r.head()
            except (OSError, EOFError):
                return
            if head is None:
                return
            r.body(head[1], request=True)
            if head[0].split(" ")[1] == "/slow":
                self.slow.set()
                self.release.wait(10)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def test_sigterm_closes_idle_http11_connections_and_answers_in_flight_ones(mesh):
    """SIGTERM to web's connectd (-drain-timeout 20s, an http upstream): a client connection
    idle between requests is closed at once, one whose request is in flight gets its answer
    with "Connection: close" and is then closed, and connectd exits within seconds. (Before:
    the idle keep-alive connection held connectd until the drain timeout.)"""
    import signal
    import time

    from test_l7_h2_outbound import stopped_by_test

    m = mesh
    app = SlowApp()
    m.apps.append(app)
    db = m.add("db", app_port=app.port, proxy_config={"protocol": "http"})
    web = m.add("web", upstreams=[{"name": "db", "config": {"protocol": "http"}}], start=False)
    m.start(web, extra_args=("-drain-timeout", "20s"))
    m.wait_passing(db)
    wait_until(lambda: try_status(web.up["db"]) == 200, 30, "a request through the mesh")
    idle, busy = connect(web.up["db"]), connect(web.up["db"])
    try:
        ri, rb = Reader(idle), Reader(busy)
        for s, r in ((idle, ri), (busy, rb)):
            s.sendall(b"GET /first HTTP/1.1\r\nHost: db\r\n\r\n")
            assert response(r)[0] == 200
        busy.sendall(b"GET /slow HTTP/1.1\r\nHost: db\r\n\r\n")
        assert app.slow.wait(10), "the request reached the app"
        sent_at = time.monotonic()
        web.proxy.proc.send_signal(signal.SIGTERM)
        web.proxy.wait_log(r"received Terminated; closing listeners and draining")
        idle.settimeout(10)
        assert idle.recv(1) == b"", "the idle connection is closed"
        app.release.set()
        status, headers, _, _ = response(rb)
        assert status == 200 and headers.get("connection") == ["close"], headers
        assert busy.recv(1) == b"", "the answered connection is closed"
        rc = web.proxy.proc.wait(15)
        took = time.monotonic() - sent_at
        assert rc == 0 and took < 8, (rc, took)
        stopped_by_test(m, web.proxy)
    finally:
        app.release.set()
        idle.close()
        busy.close()


# --- interim answers a caller does not read ------------------------------------------------------


class FloodsInterim(TcpApp):
    """An HTTP/1.1 application that answers each request with FLOOD "103 Early Hints" heads of
    4 kB, then 200 "done"; flood_sent is set once all of it was taken by the sidecar."""

    def __init__(self):
        self.flood_sent = threading.Event()
        super().__init__()

    def handle(self, c):
        r = Reader(c)
        while True:
            try:
                if r.head() is None:
                    return
            except (EOFError, OSError):
                return
            hint = b"HTTP/1.1 103 Early Hints\r\nlink: " + b"x" * 4000 + b"\r\n\r\n"
            c.sendall(hint * FLOOD + b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone")
            self.flood_sent.set()


def read_flood(caller, app):
    """Asks for /flood on a caller connection with a small receive buffer that reads nothing
    until the application sent the whole answer, then reads it: (status, body, interims)."""
    app.flood_sent.clear()
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(30)
    raw.connect((LOOPBACK, caller.port))
    with caller.ctx.wrap_socket(raw) as s:
        s.sendall(b"GET /flood HTTP/1.1\r\nHost: db\r\n\r\n")
        assert app.flood_sent.wait(30), "the application could not send its whole answer"
        status, _, body, interim = response(Reader(s))
    return status, body, interim


def test_interim_answers_a_caller_does_not_read_are_bounded(mesh, tmp_path):
    """Heads are not flow controlled: an application (h2c, or HTTP/1.1) that sends 103 after
    103 to an HTTP/1.1 caller that does not read them made db's sidecar queue every one (20
    MB here, without end for a longer flood). Past INTERIM_MAX unwritten bytes an interim
    answer is dropped: the caller gets far fewer than were sent, then the final answer."""
    m = mesh
    app, db, web = h2_pair(m, db_args=("-workers", "1"))
    caller = MtlsCaller(m.api, tmp_path, web.name, db)
    wait_until(lambda: caller.status() == 200, 30, "an HTTP/1.1 request over mTLS")
    status, body, interim = read_flood(caller, app)
    assert status == 200 and body == b"done", (status, body)
    assert set(interim) == {103} and 0 < len(interim) < FLOOD, len(interim)

    h1 = FloodsInterim()
    m.apps.append(h1)
    m.service_defaults("api", "http")
    svc = m.add("api", app_port=h1.port, proxy_config={"protocol": "http"}, start=False)
    m.start(svc, extra_args=("-workers", "1"))
    m.wait_passing(svc)
    caller = MtlsCaller(m.api, tmp_path, web.name, svc)
    wait_until(lambda: caller.status() == 200, 30, "an HTTP/1.1 request over mTLS")
    status, body, interim = read_flood(caller, h1)
    assert status == 200 and body == b"done", (status, body)
    assert set(interim) == {103} and 0 < len(interim) < FLOOD, len(interim)
