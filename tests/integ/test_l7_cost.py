"""What a keep-alive request costs the L7 pair in reads (issue 9, the L7 speed bar).

The codec of both sidecars is event driven on a level-triggered loop: an end is read again
only when an event came for it or its last read filled what was asked, so a request and its
answer cost each sidecar one TLS record read (two read() calls: OpenSSL reads the record
header, then the record) and no read that only says EAGAIN. Before, every pass of the codec
tried every end it could read until EAGAIN: web's sidecar made about eight read() calls per
request on its mTLS end and db's about four (each EAGAIN SSL_read also costs ~2,500
instructions).

read() calls are counted from /proc/<pid>/io (syscr): the TLS ends read with read(), the
application ends with recv(), which syscr does not count, so the number is the mTLS side's.
"""

import socket

from mesh import LOOPBACK, admin_args
from test_l7_inbound import Reader, get, response
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
    # Two per request (header and body of one record), and a little room for the agent's
    # health checks and the control thread meanwhile.
    assert per_request["web"] < 2.5, per_request
    assert per_request["db"] < 2.5, per_request
