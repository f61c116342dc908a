"""HTTP/1.1 where the two legs of a hop differ (issue 9), and the HTTP/1.1 connection reuse
that translation leans on.

The keep-alive race: a kept-alive HTTP/1.1 connection that its server closes as idle at the
moment a request is sent on it loses that request before any byte of an answer. The request
reached nobody, so connectd sends it once more on a new connection (outbound: a fresh dial,
not another pooled connection), as Envoy does, instead of answering 503. The race is made
deterministic by servers that act it out: they answer the first request of each connection
and close the connection, without a byte of answer, on any later one.
"""

import json
import os
import socket
import ssl
import struct
import tempfile
import threading

from mesh import LOOPBACK, TcpApp, sidecar_registration, wait_until
from test_l7_inbound import Reader, connect, response

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
