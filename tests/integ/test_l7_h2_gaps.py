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
import socket
import threading

import h2.config
import h2.connection
import h2.events

from mesh import LOOPBACK, TcpApp, wait_until
from test_l7_inbound import Reader, connect, response
from test_l7_translate import MtlsCaller, h2_pair, try_status


class DropsOnceApp(TcpApp):
    """h2c (prior knowledge). A request whose path starts with /drop is, the first time that
    path is asked for, read whole and then answered by closing the connection (no GOAWAY, no
    RST_STREAM): the connection dies under it. Every other request is answered 200 with JSON
    {path, body_len, headers, conn}. self.dropped lists the paths dropped, self.connections
    counts connections."""

    def __init__(self):
        self.connections = 0
        self.dropped = []
        self.lock = threading.Lock()
        super().__init__()

    def handle(self, c):
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
