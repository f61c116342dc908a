"""What a keep-alive request costs the L7 pair in reads (issue 9, the L7 speed bar).

The codec of both sidecars is event driven on a level-triggered loop: an end is read again
only when an event came for it or its last read filled what was asked, so a request and its
answer cost each sidecar one read() on its mTLS end (read-ahead: the record's header and body
in one call) and no read that only says EAGAIN. Before, every pass of the codec tried every
end it could read until EAGAIN: web's sidecar made about seven read() calls per request on its
mTLS end and db's about three (each EAGAIN SSL_read also costs ~2,500 instructions).

read() calls are counted from /proc/<pid>/io (syscr): the TLS ends read with read(), the
application ends with recv(), which syscr does not count, so the number is the mTLS side's.

The mTLS ends read ahead (a socketful at a time, one read() per record instead of two), so
records may wait inside OpenSSL while the socket is empty: the codec must read them without
an event. test_requests_in_records_sent_together_all_answered sends three requests in three
TLS records in one TCP segment to the inbound sidecar.

HTTP/2 (mux_h2 and the shared connections of h2up) follows the same rule: before, each run of
the codec (and there is one per upstream callback, not only per event) read its ends until
EAGAIN, and each frame queued on a shared connection asked epoll for writability and back
(two epoll_ctl() calls): with one request in flight at a time, web's sidecar made ~9 system
calls per request (4 of them EAGAIN reads), db's ~6 (HAProxy's pair: 9 and 11).
"""

import os
import socket

import h2.config
import h2.connection
import h2.events

from mesh import LOOPBACK, admin_args, mesh_client_context, tls_connect, wait_until
from test_l7_h2 import H2App, H2Client, drop_defaults, try_h2
from test_l7_h2 import l7_pair as h2_pair
from test_l7_inbound import Reader, echo, get, response
from test_l7_outbound import l7_pair

N = 200


def read_calls(pid):
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("syscr:"):
                return int(line.split()[1])
    raise AssertionError(f"no syscr in /proc/{pid}/io")


def test_keepalive_request_costs_one_record_read_per_sidecar(mesh, tmp_path):
    m = mesh
    args, _admin = admin_args()
    _app, db, web, _alog = l7_pair(m, tmp_path, up_config={"protocol": "http"},
                                   db_config={"protocol": "http"},
                                   web_args=("-workers", "1", *args))
    with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
        r = Reader(s)
        s.sendall(get("/warm"))
        assert response(r)[0] == 200
        pids = {"web": web.proxy.proc.pid, "db": db.proxy.proc.pid}
        before = {k: read_calls(p) for k, p in pids.items()}
        for i in range(N):
            s.sendall(get(f"/r{i}"))
            assert response(r)[0] == 200
        after = {k: read_calls(p) for k, p in pids.items()}
    per_request = {k: (after[k] - before[k]) / N for k in pids}
    # One per request, and a little room for the agent's health checks meanwhile.
    assert per_request["web"] < 1.5, per_request
    assert per_request["db"] < 1.5, per_request


def test_requests_in_records_sent_together_all_answered(mesh, tmp_path):
    """Three requests, each in its own TLS record, corked into one segment: the inbound
    sidecar's first read takes all three records, answers the first, and must then find the
    other two inside OpenSSL (no event will come for them) and answer them in order."""
    m = mesh
    _app, db, web, _alog = l7_pair(m, tmp_path, up_config={"protocol": "http"},
                                   db_config={"protocol": "http"})
    ctx = mesh_client_context(m.api, str(tmp_path), m.name("web"), ["http/1.1"])
    for attempt in range(3):
        with tls_connect(db.public_port, ctx) as s:
            s.settimeout(5)
            raw = socket.socket(fileno=os.dup(s.fileno()))
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                for i in range(3):
                    s.sendall(get(f"/together/{attempt}/{i}"))
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
            finally:
                raw.close()
            r = Reader(s)
            for i in range(3):
                status, _headers, body, _ = response(r)
                assert status == 200, (attempt, i, status, body)
                assert echo(body)["target"] == f"/together/{attempt}/{i}", body


def test_h2_request_costs_no_read_that_only_says_eagain(mesh):
    """One HTTP/2 request at a time on one connection through the L7 pair (web's outbound
    HTTP/2 codec, db's inbound one): the mTLS ends (web's shared connection to db, db's
    caller end) are read once per request, not until EAGAIN on every run of the codec
    (before: ~2 read() calls per request on each)."""
    m = mesh
    app = m.app(H2App)
    try:
        db, web = h2_pair(m, "http2", app.port)
        wait_until(lambda: try_h2(web.up["db"]) == 200, 30, "an h2c request through the mesh")
        with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
            c = H2Client(s)
            assert c.request("/warm")[0] == 200
            pids = {"web": web.proxy.proc.pid, "db": db.proxy.proc.pid}
            before = {k: read_calls(p) for k, p in pids.items()}
            for i in range(N):
                status, _h, _body, reset = c.request(f"/r{i}")
                assert status == 200 and reset is None, (i, status, reset)
            after = {k: read_calls(p) for k, p in pids.items()}
        per_request = {k: (after[k] - before[k]) / N for k in pids}
        assert per_request["web"] < 1.5, per_request
        assert per_request["db"] < 1.5, per_request
    finally:
        drop_defaults(m)


def test_h2_frames_in_records_sent_together_all_answered(mesh, tmp_path):
    """The HTTP/2 inbound reads ahead too: the preface, SETTINGS and three requests, each in
    its own TLS record, corked into one segment to db's sidecar (ALPN h2). Its first read takes
    them all; the requests left inside OpenSSL must be found without an event."""
    m, api = mesh, mesh.api
    app = m.app(H2App)
    try:
        db, web = h2_pair(m, "http2", app.port)
        m.intend("db", {"web": "allow"})
        ctx = mesh_client_context(api, str(tmp_path), web.name, ["h2"])
        wait_until(lambda: try_h2(web.up["db"]) == 200, 30, "an h2c request through the mesh")
        for attempt in range(3):
            with ctx.wrap_socket(socket.create_connection((LOOPBACK, db.public_port),
                                                          timeout=10)) as s:
                assert s.selected_alpn_protocol() == "h2"
                conn = h2.connection.H2Connection(h2.config.H2Configuration(
                    client_side=True, header_encoding="utf-8"))
                raw = socket.socket(fileno=os.dup(s.fileno()))
                try:
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                    conn.initiate_connection()
                    s.sendall(conn.data_to_send())
                    for sid in (1, 3, 5):
                        conn.send_headers(sid, [(":method", "GET"), (":scheme", "https"),
                                                (":authority", "db"),
                                                (":path", f"/together/{attempt}/{sid}")],
                                          end_stream=True)
                        s.sendall(conn.data_to_send())
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
                finally:
                    raw.close()
                # Nothing more is sent (not even the SETTINGS ack): no new bytes may wake
                # the sidecar up to the records it holds.
                s.settimeout(5)
                got = {}
                while len(got) < 3:
                    try:
                        chunk = s.recv(65536)
                    except socket.timeout:
                        chunk = b""
                    assert chunk, f"attempt {attempt}: {sorted(got)} answered, then nothing"
                    for ev in conn.receive_data(chunk):
                        if isinstance(ev, h2.events.ResponseReceived):
                            got[ev.stream_id] = dict(ev.headers)[":status"]
                assert got == {1: "200", 3: "200", 5: "200"}, (attempt, got)
    finally:
        drop_defaults(m)
