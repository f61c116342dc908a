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
"""

import os
import socket

from mesh import LOOPBACK, admin_args, tls_client_context, tls_connect, write_text
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
    leaf = m.api.leaf(m.name("web"))
    cert = write_text(os.path.join(tmp_path, "web.pem"), leaf["CertPEM"])
    key = write_text(os.path.join(tmp_path, "web-key.pem"), leaf["PrivateKeyPEM"])
    roots = write_text(os.path.join(tmp_path, "roots.pem"), m.api.roots_pem())
    ctx = tls_client_context(cert, key, roots)
    ctx.set_alpn_protocols(["http/1.1"])
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
