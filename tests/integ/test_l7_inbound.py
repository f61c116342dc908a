"""Inbound L7 over HTTP/1.1 (issue 9): db's sidecar has Proxy.Config.protocol = "http".

web's sidecar stays L4 outbound this round: the client's HTTP bytes go to web's upstream port,
over mTLS to db's sidecar, which parses every request, authorizes it with the intentions,
adds X-Forwarded-Client-Cert / X-Forwarded-Proto / X-Request-Id, and forwards it to the app
over HTTP/1.1. The app (HttpApp below) answers with what it received as JSON, so each test
sees what the application saw. Clients speak raw HTTP on sockets so that pipelining,
smuggling-prone heads and the connection's fate can be checked byte for byte. Nothing sleeps
for a fixed time: waits poll a condition with a deadline.
"""

import hashlib
import json
import os
import re
import socket
import ssl
import threading
import time

import pytest

from mesh import LOOPBACK, access_records, admin_args, admin_get, wait_until

# --- the application -------------------------------------------------------------------------


class HttpApp:
    """A threaded HTTP/1.1 server on loopback written on sockets (so that its framing is
    exactly what a test asks for). Every request is answered with JSON of what it received:
    method, target, version, headers (lower-case name -> list of values), body length and
    SHA-256. Paths:
      /chunked?n=N   answers with an N-byte body in chunks of 1000
      /big?n=N       answers with an N-byte Content-Length body
      /eof           answers without framing and closes (a body until close)
      /slow?ms=N     waits N ms before answering
      /ws            with Upgrade: echo -> 101, then echoes raw bytes until EOF
    Expect: 100-continue is answered with 100 Continue before the body is read."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        self.connections = 0
        self.conns = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

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
                    # shutdown first: a thread blocked in recv() keeps a closed socket open
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    c.close()
                except OSError:
                    pass

    def _serve(self, c):
        r = Reader(c)
        try:
            while True:
                head = r.head()
                if head is None:
                    return
                line, headers = head
                method, target, version = line.split(" ")
                if headers.get("expect", [""])[0].lower() == "100-continue":
                    c.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = r.body(headers, request=True)
                info = {"method": method, "target": target, "version": version,
                        "headers": headers, "body_len": len(body),
                        "body_sha256": hashlib.sha256(body).hexdigest()}
                path, _, query = target.partition("?")
                args = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
                if path == "/ws" and "upgrade" in headers:
                    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                              b"Upgrade: echo\r\n\r\n")
                    data = r.take_buffered()
                    while True:
                        if data:
                            c.sendall(data)
                        data = c.recv(65536)
                        if not data:
                            return
                if path == "/slow":
                    time.sleep(int(args.get("ms", "0")) / 1000)
                if path == "/chunked":
                    n = int(args.get("n", "0"))
                    c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    payload = bytes(i % 251 for i in range(n))
                    for i in range(0, n, 1000):
                        part = payload[i:i + 1000]
                        c.sendall(b"%x\r\n%s\r\n" % (len(part), part))
                    c.sendall(b"0\r\n\r\n")
                    continue
                if path == "/big":
                    n = int(args.get("n", "0"))
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                    if method == "HEAD":
                        continue
                    block = bytes(i % 251 for i in range(65536))
                    left = n
                    while left:
                        k = min(left, len(block))
                        c.sendall(block[:k])
                        left -= k
                    continue
                out = json.dumps(info).encode()
                if path == "/eof":
                    c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + out)
                    return
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(out), out))
        except (OSError, ValueError, EOFError):
            return
        finally:
            try:
                c.close()
            except OSError:
                pass


class Reader:
    """Reads HTTP/1.1 heads and bodies from a socket (client or server side)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def _more(self):
        d = self.sock.recv(1 << 20)
        if not d:
            raise EOFError
        self.buf += d

    def _take(self, n):
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def take_buffered(self):
        return self._take(len(self.buf))

    def head(self):
        """(start line, {lower-case name: [values]}), or None at a clean EOF."""
        while b"\r\n\r\n" not in self.buf:
            try:
                self._more()
            except EOFError:
                if self.buf:
                    raise
                return None
        end = self.buf.index(b"\r\n\r\n")
        raw = self._take(end + 4)[:-4]
        lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for h in lines[1:]:
            k, v = h.split(":", 1)
            headers.setdefault(k.strip().lower(), []).append(v.strip())
        return lines[0], headers

    def exact(self, n):
        while len(self.buf) < n:
            self._more()
        return self._take(n)

    def line(self):
        while b"\r\n" not in self.buf:
            self._more()
        end = self.buf.index(b"\r\n")
        return self._take(end + 2)[:-2]

    def body(self, headers, request=False, status=200, head_request=False):
        if head_request or status in (204, 304) or 100 <= status < 200:
            return b""
        if "transfer-encoding" in headers:
            out = bytearray()
            while True:
                size = int(self.line().split(b";")[0], 16)
                if size == 0:
                    while self.line() != b"":
                        pass
                    return bytes(out)
                out += self.exact(size)
                assert self.exact(2) == b"\r\n"
        if "content-length" in headers:
            return self.exact(int(headers["content-length"][0]))
        if request:
            return b""
        out = bytearray(self.take_buffered())
        while True:
            try:
                d = self.sock.recv(1 << 20)
            except OSError:
                return bytes(out)
            if not d:
                return bytes(out)
            out += d


def response(r, head_request=False):
    """Reads one final response (1xx are skipped and returned in interim):
    (status, headers, body, interim statuses)."""
    interim = []
    while True:
        h = r.head()
        assert h is not None, "connection closed before a response"
        status = int(h[0].split(" ")[1])
        if 100 <= status < 200 and status != 101:
            interim.append(status)
            continue
        body = r.body(h[1], status=status, head_request=head_request)
        return status, h[1], body, interim


def get(path, host="db", extra=""):
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").encode()


def closed(sock, timeout=5):
    """True when the peer closes (EOF or reset) within <timeout> without sending more."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


# --- the mesh ---------------------------------------------------------------------------------


def l7_pair(m, proxy_config=None, db_args=()):
    """db (protocol http, behind it an HttpApp) and web (upstream db, L4). Returns
    (app, db, web) once a request goes through."""
    app = m.app(HttpApp)
    cfg = {"protocol": "http", **(proxy_config or {})}
    db = m.add("db", app_port=app.port, proxy_config=cfg, start=False)
    m.start(db, extra_args=db_args)
    web = m.add("web", upstreams=("db",))
    m.wait_passing(db)
    wait_until(lambda: try_get(web.up["db"]) == 200, 30, "a request through the mesh")
    return app, db, web


def try_get(port, path="/"):
    try:
        with socket.create_connection((LOOPBACK, port), timeout=5) as s:
            s.sendall(get(path))
            return response(Reader(s))[0]
    except (OSError, EOFError, AssertionError):
        return None


def connect(port):
    return socket.create_connection((LOOPBACK, port), timeout=10)


def echo(body):
    return json.loads(body)


def via_l7(seen):
    """Whether the request went through the L7 codec (which adds XFCC) rather than a relay."""
    return "x-forwarded-client-cert" in seen["headers"]


# --- tests ------------------------------------------------------------------------------------


def test_request_passes_with_forwarded_headers(mesh):
    """case-http: a request through the pair reaches the app with the caller's identity in
    X-Forwarded-Client-Cert (By = db, URI = web, Hash = SHA-256 of web's leaf), a spoofed XFCC
    replaced, X-Forwarded-Proto https, and an X-Request-Id kept when sent, else a fresh v4
    UUID. Hop-by-hop fields named by Connection are not forwarded."""
    m, api = mesh, mesh.api
    app, db, web = l7_pair(m)
    with connect(web.up["db"]) as s:
        r = Reader(s)
        s.sendall(get("/hello?x=1", extra="X-Forwarded-Client-Cert: By=evil;URI=spiffe://evil\r\n"
                      "X-Forwarded-Proto: http\r\nConnection: x-secret\r\nX-Secret: 1\r\n"
                      "X-Request-Id: keep-me-42\r\n"))
        status, headers, body, _ = response(r)
        assert status == 200, body
        seen = echo(body)
        h = seen["headers"]
        assert seen["method"] == "GET" and seen["target"] == "/hello?x=1"
        assert h["x-forwarded-client-cert"] == [h["x-forwarded-client-cert"][0]], h
        xfcc = h["x-forwarded-client-cert"][0]
        leaf = api.leaf(web.name)["CertPEM"]
        der = ssl.PEM_cert_to_DER_cert(leaf)
        # web's connectd may have fetched the same leaf: its DER hash is what db saw.
        assert xfcc == (f"By={api.spiffe_id(db.name)};Hash={hashlib.sha256(der).hexdigest()};"
                        f"URI={api.spiffe_id(web.name)}"), xfcc
        assert h["x-forwarded-proto"] == ["https"], h
        assert h["x-request-id"] == ["keep-me-42"], h
        assert "x-secret" not in h and "connection" not in h, h
        assert h["host"] == ["db"]

        # Same connection (keep-alive): no X-Request-Id sent -> a generated UUID v4.
        s.sendall(get("/again"))
        status, _, body, _ = response(r)
        assert status == 200
        rid = echo(body)["headers"]["x-request-id"]
        assert len(rid) == 1 and re.fullmatch(
            r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", rid[0]), rid


def test_deny_by_intention_is_403_and_connection_stays(mesh):
    """case-http-badauthz: a denied caller gets 403 "RBAC: access denied" on each request and
    the connection stays open for the next one (as Envoy does); the app sees nothing."""
    m = mesh
    app, db, web = l7_pair(m)
    m.intend("db", {"web": "deny"})
    wait_until(lambda: try_get(web.up["db"]) == 403, 20, "requests to be denied")
    before = app.connections
    with connect(web.up["db"]) as s:
        r = Reader(s)
        for _ in range(3):
            s.sendall(get("/secret"))
            status, headers, body, _ = response(r)
            assert status == 403 and body == b"RBAC: access denied", (status, body)
        # A denied POST with a body: the body is read and dropped, the next request parses.
        s.sendall(b"POST /x HTTP/1.1\r\nHost: db\r\nContent-Length: 5\r\n\r\nhello" + get("/y"))
        assert response(r)[0] == 403
        assert response(r)[0] == 403
    assert app.connections == before


def test_wildcard_deny_l4_caller_gets_403(mesh):
    """A caller with no intention of its own under a wildcard deny (what L4 refuses by
    closing the connection) gets a 403 per request on an HTTP service."""
    m = mesh
    app, db, web = l7_pair(m)
    m.api.set_intentions(db.name, {"*": "deny"})
    m.intentions.add(db.name)
    wait_until(lambda: try_get(web.up["db"]) == 403, 20, "requests to be denied")
    with connect(web.up["db"]) as s:
        s.sendall(get("/"))
        status, _, body, _ = response(Reader(s))
        assert (status, body) == (403, b"RBAC: access denied")


def test_intention_flip_applies_to_next_request_on_same_connection(mesh):
    """Intention changes apply to the next request of an open connection: 200, then (after a
    deny is written) 403 on the same connection, then 200 again after allow."""
    m = mesh
    app, db, web = l7_pair(m)
    before = app.connections
    with connect(web.up["db"]) as s:
        r = Reader(s)
        s.sendall(get("/1"))
        assert response(r)[0] == 200
        m.intend("db", {"web": "deny"})

        def status_now():
            s.sendall(get("/2"))
            return response(r)[0]

        wait_until(lambda: status_now() == 403, 20, "the same connection's requests denied")
        m.intend("db", {"web": "allow"})
        wait_until(lambda: status_now() == 200, 20, "the same connection's requests allowed")
        assert app.connections == before + 1  # one kept-alive app connection throughout


def test_pipelined_requests_answered_in_order(mesh):
    m = mesh
    app, db, web = l7_pair(m)
    with connect(web.up["db"]) as s:
        r = Reader(s)
        s.sendall(b"".join(get(f"/p{i}") for i in range(10)) +
                  b"POST /p10 HTTP/1.1\r\nHost: db\r\nContent-Length: 3\r\n\r\nabc" + get("/p11"))
        for i in range(12):
            status, _, body, _ = response(r)
            assert status == 200
            assert echo(body)["target"] == f"/p{i}"
            assert via_l7(echo(body))
        assert echo(body)["method"] == "GET"


def test_chunked_request_and_response_bodies(mesh):
    m = mesh
    app, db, web = l7_pair(m)
    payload = os.urandom(50_000)
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(payload[i:i + 7000]), payload[i:i + 7000])
                      for i in range(0, len(payload), 7000))
    with connect(web.up["db"]) as s:
        r = Reader(s)
        s.sendall(b"POST /up HTTP/1.1\r\nHost: db\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks +
                  b"0\r\nX-Trailer: t\r\n\r\n")
        status, _, body, _ = response(r)
        seen = echo(body)
        assert status == 200 and via_l7(seen)
        assert seen["headers"]["transfer-encoding"] == ["chunked"]
        assert seen["body_len"] == len(payload)
        assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest()
        s.sendall(get("/chunked?n=123456"))
        status, headers, body, _ = response(r)
        assert status == 200 and headers["transfer-encoding"] == ["chunked"]
        assert body == bytes(i % 251 for i in range(123456))
        # The connection is still usable.
        s.sendall(get("/after"))
        assert echo(response(r)[2])["target"] == "/after"


def test_large_bodies_stream_both_ways(mesh):
    """64 MiB up (Content-Length) and 64 MiB down stream through on one connection, intact."""
    m = mesh
    app, db, web = l7_pair(m)
    n = 64 << 20
    block = os.urandom(1 << 20)
    with connect(web.up["db"]) as s:
        r = Reader(s)
        s.sendall(b"PUT /up HTTP/1.1\r\nHost: db\r\nContent-Length: %d\r\n\r\n" % n)
        h = hashlib.sha256()
        for _ in range(n // len(block)):
            s.sendall(block)
            h.update(block)
        seen = echo(response(r)[2])
        assert seen["body_len"] == n and seen["body_sha256"] == h.hexdigest() and via_l7(seen)
        s.sendall(get(f"/big?n={n}"))
        head = r.head()
        assert head[0].startswith("HTTP/1.1 200") and head[1]["content-length"] == [str(n)]
        got = 0
        got += len(r.take_buffered())
        while got < n:
            d = s.recv(1 << 20)
            assert d
            got += len(d)
        assert got == n


@pytest.mark.parametrize("raw", [
    b"POST / HTTP/1.1\r\nHost: db\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: db\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: db\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"GET / HTTP/1.1\r\nHost: db\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: db\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : db\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
], ids=["cl_and_te", "two_cls", "obs_fold", "te_not_chunked", "space_before_colon", "no_host"])
def test_smuggling_prone_requests_400_and_close(mesh, raw):
    """Smuggling-prone heads are answered 400 and the connection is closed; nothing reaches
    the application (no /smuggled request either)."""
    m = mesh
    app, db, web = l7_pair(m)
    before = app.connections
    with connect(web.up["db"]) as s:
        r = Reader(s)
        s.sendall(raw)
        status, headers, _, _ = response(r)
        assert status == 400
        assert headers.get("connection") == ["close"]
        assert closed(s)
    assert app.connections == before


def test_header_size_limit_431(mesh):
    """max_request_headers_kb (here 8): a head just under the limit passes, one over it is
    431 and the connection closes; 100 fields pass, 101 are 431."""
    m = mesh
    app, db, web = l7_pair(m, proxy_config={"max_request_headers_kb": 8})
    base = len(get("/", extra="X-Pad: \r\n"))
    with connect(web.up["db"]) as s:
        s.sendall(get("/", extra="X-Pad: " + "a" * (8192 - base) + "\r\n"))
        assert response(Reader(s))[0] == 200
    with connect(web.up["db"]) as s:
        s.sendall(get("/", extra="X-Pad: " + "a" * (8192 - base + 1) + "\r\n"))
        status, headers, _, _ = response(Reader(s))
        assert status == 431 and headers.get("connection") == ["close"]
        assert closed(s)
    with connect(web.up["db"]) as s:
        s.sendall(get("/", extra="".join(f"X-H{i}: v\r\n" for i in range(99))))
        assert response(Reader(s))[0] == 200
    with connect(web.up["db"]) as s:
        s.sendall(get("/", extra="".join(f"X-H{i}: v\r\n" for i in range(100))))
        assert response(Reader(s))[0] == 431


def test_expect_100_continue(mesh):
    """Expect: 100-continue is forwarded; the app's 100 reaches the client before it sends
    the body; the final answer follows."""
    m = mesh
    app, db, web = l7_pair(m)
    with connect(web.up["db"]) as s:
        r = Reader(s)
        s.sendall(b"POST /e HTTP/1.1\r\nHost: db\r\nContent-Length: 4\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        h = r.head()
        assert h[0].startswith("HTTP/1.1 100"), h
        s.sendall(b"data")
        status, _, body, _ = response(r)
        assert status == 200 and echo(body)["body_len"] == 4 and via_l7(echo(body))


def test_websocket_style_upgrade_becomes_tunnel(mesh):
    """An authorized Upgrade request and the app's 101 turn the connection into a raw tunnel
    both ways."""
    m = mesh
    app, db, web = l7_pair(m)
    with connect(web.up["db"]) as s:
        r = Reader(s)
        s.sendall(get("/ws", extra="Connection: Upgrade\r\nUpgrade: echo\r\n") + b"early")
        h = r.head()
        assert h[0].startswith("HTTP/1.1 101"), h
        assert h[1]["upgrade"] == ["echo"] and h[1]["connection"] == ["upgrade"]
        got = r.take_buffered()
        while len(got) < 5:
            got += s.recv(100)
        assert got == b"early"
        for size in (1, 1000, 300_000):
            data = os.urandom(size)
            s.sendall(data)
            got = b""
            while len(got) < size:
                got += s.recv(1 << 20)
            assert got == data


def test_http10_and_until_close_responses(mesh):
    """HTTP/1.0: without keep-alive the connection closes after the answer; with
    Connection: keep-alive it carries a second request; a chunked answer reaches a 1.0 caller
    decoded and delimited by close. A response without framing is delimited by close."""
    m = mesh
    app, db, web = l7_pair(m)
    with connect(web.up["db"]) as s:
        s.sendall(b"GET /ten HTTP/1.0\r\n\r\n")
        r = Reader(s)
        status, headers, body, _ = response(r)
        assert status == 200 and echo(body)["target"] == "/ten"
        assert closed(s)
    with connect(web.up["db"]) as s:
        r = Reader(s)
        s.sendall(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body, _ = response(r)
        assert status == 200 and headers["connection"] == ["keep-alive"]
        s.sendall(b"GET /chunked?n=5000 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        h = r.head()
        assert "transfer-encoding" not in h[1] and h[1]["connection"] == ["close"], h
        assert r.body(h[1]) == bytes(i % 251 for i in range(5000))
    with connect(web.up["db"]) as s:
        s.sendall(get("/eof"))
        status, headers, body, _ = response(Reader(s))
        assert status == 200 and echo(body)["target"] == "/eof"


def test_app_down_503_and_slow_app_504(mesh):
    """The app refusing connections is 503 for that request (the connection goes on); an app
    slower than local_request_timeout_ms is 504."""
    m = mesh
    app, db, web = l7_pair(m, proxy_config={"local_request_timeout_ms": 500})
    with connect(web.up["db"]) as s:
        r = Reader(s)
        s.sendall(get("/slow?ms=3000"))
        status, _, body, _ = response(r)
        assert status == 504 and body == b"upstream request timeout"
        s.sendall(get("/fast"))
        assert response(r)[0] == 200
        app.stop()
        wait_until(lambda: port_refused(app.port), 10, "the app to stop listening")
        s.sendall(get("/down"))
        status, _, body, _ = response(r)
        assert status == 503, body
        s.sendall(get("/down2"))
        assert response(r)[0] == 503


def port_refused(port):
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
        return False
    except OSError:
        return True


def test_access_log_and_metrics_per_request(mesh, tmp_path):
    """One access-log record per request (method, path, status, request id, result), and
    /metrics counts requests by status class and per-request decisions by source."""
    m = mesh
    alog = tmp_path / "access.log"
    args, admin = admin_args()
    app, db, web = l7_pair(m, db_args=(*args, "-access-log", str(alog)))
    m.intend("db", {"web": "deny"})
    wait_until(lambda: try_get(web.up["db"], "/denied") == 403, 20, "a 403")
    m.intend("db", {"web": "allow"})
    with connect(web.up["db"]) as s:
        r = Reader(s)

        def ok():
            s.sendall(get("/logged", extra="X-Request-Id: rid-7\r\n"))
            return response(r)[0] == 200

        wait_until(ok, 20, "a 200")

    def records():
        return access_records(str(alog))

    wait_until(lambda: any(x.get("path") == "/logged" for x in records()), 10, "a record")
    rec = [x for x in records() if x.get("path") == "/logged"][-1]
    assert rec["method"] == "GET" and rec["status"] == 200 and rec["request_id"] == "rid-7"
    assert rec["result"] == "ok" and rec["source"] == m.api.spiffe_id(web.name)
    den = [x for x in records() if x.get("path") == "/denied"][-1]
    assert den["status"] == 403 and den["result"] == "denied"
    _, text = admin_get(admin, "/metrics")
    assert re.search(r'connectd_http_requests_total\{listener="public",code_class="2xx"\} [1-9]',
                     text), text
    assert re.search(r'connectd_http_requests_total\{listener="public",code_class="4xx"\} [1-9]',
                     text), text
    src = web.name
    assert re.search(r'connectd_http_authorization_decisions_total\{source="%s",result="deny"\} '
                     r'[1-9]' % re.escape(src), text), text
    assert 'connectd_http_request_duration_seconds_bucket{listener="public",le="+Inf"}' in text


def test_protocol_change_applies_to_new_connections(mesh):
    """A connection opened under protocol http stays HTTP after the service becomes tcp; a
    new connection is relayed at L4 (the request reaches the app unchanged: no XFCC)."""
    m = mesh
    app, db, web = l7_pair(m)
    old = connect(web.up["db"])
    r_old = Reader(old)
    old.sendall(get("/before"))
    assert "x-forwarded-client-cert" in echo(response(r_old)[2])["headers"]
    db.proxy_config = {"protocol": "tcp"}
    m.register(db)

    def l4_now():
        try:
            with connect(web.up["db"]) as s:
                s.sendall(get("/l4"))
                return "x-forwarded-client-cert" not in echo(response(Reader(s))[2])["headers"]
        except (OSError, EOFError, AssertionError, ValueError):
            return False

    wait_until(l4_now, 30, "new connections relayed at L4")
    old.sendall(get("/still-http"))
    assert "x-forwarded-client-cert" in echo(response(r_old)[2])["headers"]
    old.close()


def test_slow_head_408_and_byte_at_a_time_head(mesh):
    """request_headers_timeout_ms bounds a head from its first byte: a caller that stops
    mid-head gets 408 and the connection closes. A head that arrives a byte at a time within
    the limit is served."""
    m = mesh
    app, db, web = l7_pair(m, proxy_config={"request_headers_timeout_ms": 1500})
    with connect(web.up["db"]) as s:
        raw = get("/trickle", extra="X-A: 1\r\n")
        for i in range(len(raw)):
            s.sendall(raw[i:i + 1])
        status, _, body, _ = response(Reader(s))
        assert status == 200 and echo(body)["target"] == "/trickle"
    with connect(web.up["db"]) as s:
        s.sendall(b"GET /stuck HTTP/1.1\r\nHost: db\r\n")
        t0 = time.monotonic()
        status, headers, _, _ = response(Reader(s))
        assert status == 408 and headers.get("connection") == ["close"]
        assert 1.0 < time.monotonic() - t0 < 10
        assert closed(s)


def test_head_request_and_keep_alive(mesh):
    """HEAD: the answer's Content-Length is kept and no body follows; the connection serves
    the next request."""
    m = mesh
    app, db, web = l7_pair(m)
    with connect(web.up["db"]) as s:
        r = Reader(s)
        s.sendall(b"HEAD /big?n=1000 HTTP/1.1\r\nHost: db\r\n\r\n")
        status, headers, body, _ = response(r, head_request=True)
        assert status == 200 and headers["content-length"] == ["1000"] and body == b""
        s.sendall(get("/next"))
        status, _, body, _ = response(r)
        assert status == 200 and echo(body)["target"] == "/next" and via_l7(echo(body))


def test_authorize_mode_answers_per_request(mesh):
    """authorization = authorize with protocol http: the agent's answer about the caller
    decides each request; a deny written while a connection is open is a 403 on its next
    requests, not a close, and a new connection under the deny is served 403s too. (The
    way back, deny -> allow, is not checked here: the dev agent's /authorize kept answering
    deny for more than 10 s after the allow was written, which the control thread then
    takes as the agent's word.)"""
    m = mesh
    app, db, web = l7_pair(m, proxy_config={"authorization": "authorize",
                                            "authorize_cache_ms": 0})
    with connect(web.up["db"]) as s:
        r = Reader(s)

        def status_now():
            s.sendall(get("/a"))
            return response(r)[0]

        assert status_now() == 200
        m.intend("db", {"web": "deny"})
        wait_until(lambda: status_now() == 403, 20, "the agent's deny to apply per request")
        assert status_now() == 403
    with connect(web.up["db"]) as s:
        r = Reader(s)
        for _ in range(2):
            s.sendall(get("/b"))
            status, _, body, _ = response(r)
            assert (status, body) == (403, b"RBAC: access denied")


def test_garbage_and_cut_requests_never_take_the_sidecar_down(mesh):
    """Random bytes, heads cut anywhere, bodies cut short and callers that vanish mid-answer
    end their own connection only: the sidecar (an ASan build in the suite) stays up and the
    next well-formed request is served."""
    m = mesh
    app, db, web = l7_pair(m)
    rnd = __import__("random").Random(9)
    good = (b"POST /g HTTP/1.1\r\nHost: db\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n")
    cases = [os.urandom(rnd.randrange(1, 400)) for _ in range(40)]
    cases += [good[:i] for i in range(0, len(good), 3)]
    cases += [good[:i] + os.urandom(8) + good[i:] for i in range(0, len(good), 7)]
    cases += [b"GET /big?n=10000000 HTTP/1.1\r\nHost: db\r\n\r\n"]  # leaves mid-answer
    for raw in cases:
        try:
            with connect(web.up["db"]) as s:
                s.sendall(raw)
                s.settimeout(0.2)
                try:
                    s.recv(100)
                except (socket.timeout, OSError):
                    pass
        except OSError:
            pass
    assert db.proxy.alive()
    assert try_get(web.up["db"], "/still") == 200


def test_stream_cut_by_connection_end_is_logged(mesh, tmp_path):
    """A request in flight when its connection ends for another cause (here
    max_connection_lifetime_ms) still gets its access-log record, as aborted."""
    m = mesh
    alog = tmp_path / "access.log"
    app, db, web = l7_pair(m, proxy_config={"max_connection_lifetime_ms": 1500},
                           db_args=("-access-log", str(alog)))
    with connect(web.up["db"]) as s:
        s.sendall(get("/slow?ms=5000"))
        assert closed(s, timeout=10)

    def cut():
        for line in alog.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("path") == "/slow?ms=5000":
                return rec
        return None

    wait_until(cut, 10, "the cut request's record")
    rec = cut()
    assert rec["result"] == "aborted" and rec["status"] == 0, rec
    assert "max_connection_lifetime_ms" in rec["reason"], rec


@pytest.fixture
def hop(agent):
    """An interposer in front of the agent; requested before mesh, so it outlives the
    connectd processes that talk through it."""
    from mesh import AgentInterposer
    h = AgentInterposer(agent.http_addr)
    yield h
    h.stop()


def test_authorize_mode_stale_agent_deny_is_asked_again(hop, mesh):
    """authorize mode, L7: the agent's answer about a caller is kept for the connection's
    requests. When the agent's (stale) deny disagrees with the intentions here, each request
    asks again (one question at a time) until the views agree, so the connection recovers
    once the agent catches up, without any intention change to trigger a re-check."""
    m = mesh
    app = m.app(HttpApp)
    db = m.add("db", app_port=app.port, start=False,
               proxy_config={"protocol": "http", "authorization": "authorize",
                             "authorize_cache_ms": 0})
    web = m.add("web", upstreams=("db",))
    m.intend("db", {"web": "allow"})
    hop.authorize_answer = {"Authorized": False, "Reason": "stale copy: web denied"}
    db.proxy = m.start_connectd(db.name, ["-sidecar-for", db.id, "-http-addr", hop.http_addr,
                                          "-log-level", "debug"])
    db.proxy.wait_port(db.public_port)
    m.wait_passing(db)
    wait_until(lambda: try_get(web.up["db"]) == 403, 30, "the agent's stale deny")
    with connect(web.up["db"]) as s:
        r = Reader(s)

        def status_now():
            s.sendall(get("/a"))
            return response(r)[0]

        assert status_now() == 403
        hop.authorize_answer = None  # the agent catches up
        wait_until(lambda: status_now() == 200, 20, "the same connection to recover")
