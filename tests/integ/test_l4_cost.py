"""What an exchange costs the L4 pair in reads (issue 11, item 2: no read that only says
EAGAIN after a short read).

The relay of both sidecars is event driven on a level-triggered loop: an end is read again
only when an event came for it or its last read did not drain it (a full buffer, or records
left inside OpenSSL), so an echo through the pair costs each sidecar one read() on its mTLS
end (read-ahead: a record's header and body in one call). Before, each event made the relay
try both ends until EAGAIN: web's sidecar made 4.4 read() calls per exchange on its mTLS end
and db's as many (with `recvfrom` on the plain ends, 11 system calls per exchange each, where
nginx's stream pair makes 7).

read() calls are counted from /proc/<pid>/io (syscr): the TLS ends read with read(), the
plain ends with recv(), which syscr does not count, so the number is the mTLS side's.
"""

import os
import socket

from mesh import LOOPBACK, EchoApp, mesh_client_context, recv_exact, tls_connect
from test_l7_cost import read_calls

N = 200


def test_echo_costs_one_record_read_per_sidecar(mesh):
    m = mesh
    app = m.app(EchoApp)
    db = m.add("db", app_port=app.port)
    web = m.add("web", upstreams=("db",))
    m.wait_passing(db)
    m.wait_echo(web.up["db"])
    with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
        s.sendall(b"warm\n")
        assert recv_exact(s, 5, 10) == b"warm\n"
        pids = {"web": web.proxy.proc.pid, "db": db.proxy.proc.pid}
        before = {k: read_calls(p) for k, p in pids.items()}
        for i in range(N):
            line = b"exchange %06d\n" % i
            s.sendall(line)
            assert recv_exact(s, len(line), 10) == line
        after = {k: read_calls(p) for k, p in pids.items()}
    per_exchange = {k: (after[k] - before[k]) / N for k in pids}
    # One per exchange, and a little room for the agent's health checks meanwhile.
    assert per_exchange["web"] < 1.5, per_exchange
    assert per_exchange["db"] < 1.5, per_exchange


def test_records_sent_together_all_relayed(mesh, tmp_path):
    """Three lines, each in its own TLS record, corked into one segment to db's public port:
    the inbound relay's first read takes all three records and relays the first; it must then
    find the other two inside OpenSSL (no event will come for them) and relay them too."""
    m = mesh
    app = m.app(EchoApp)
    db = m.add("db", app_port=app.port)
    m.add("web", upstreams=("db",))
    m.wait_passing(db)
    ctx = mesh_client_context(m.api, str(tmp_path), m.name("web"))
    for attempt in range(3):
        with tls_connect(db.public_port, ctx) as s:
            raw = socket.socket(fileno=os.dup(s.fileno()))
            lines = [b"together %d %d\n" % (attempt, i) for i in range(3)]
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                for line in lines:
                    s.sendall(line)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
            finally:
                raw.close()
            want = b"".join(lines)
            assert recv_exact(s, len(want), 5) == want, attempt
