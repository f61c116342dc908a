"""End-to-end L4 behaviour of connectd against a real Consul agent.

Each test builds its own little mesh: `web` has an upstream `db` (and sometimes `api`), each
service has a sidecar registration and a connectd process, and behind `db` sits a small
in-process app (echo, sink, or respond-after-EOF). Clients speak plain TCP to web's upstream
port on loopback; web's connectd carries it over mTLS to db's connectd, which relays to the
app. Nothing sleeps for a fixed time: every wait polls a condition with a deadline.
"""

import hashlib
import os
import re
import socket
import ssl
import threading
import time

from mesh import (LOOPBACK, EchoApp, RelayApp, RespondAfterEofApp, SinkApp, assert_refused,
                  assert_tls_refused, closed_without_data, echo_roundtrip, free_port, is_refused,
                  issued_by, make_ca, make_leaf, openssl_peer_chain, openssl_san, peer_cert_der,
                  port_refuses, recv_all, tls_client_context, try_echo, wait_until,
                  write_leaf_files, write_text, tls_echo)


def connect(port, timeout=10):
    return socket.create_connection((LOOPBACK, port), timeout=timeout)


def echo_pair(m, backend=EchoApp, backend_args=(), web_upstreams=("db",)):
    """db (behind it an app) and web (upstreams), both with running connectd; waits until db
    is passing. Returns (app, db, web)."""
    app = m.app(backend, *backend_args)
    db = m.add("db", app_port=app.port, use_proxy_id=True)  # the other selector of the two
    web = m.add("web", upstreams=web_upstreams)
    m.wait_passing(db)
    return app, db, web


def test_basic_echo_and_server_identity(mesh, tmp_path):
    m, api = mesh, mesh.api
    _, db, web = echo_pair(m)
    m.wait_echo(web.up["db"])

    # Several TLS records' worth each way on one connection.
    with connect(web.up["db"]) as s:
        for _ in range(4):
            payload = os.urandom(100_000)
            assert echo_roundtrip(s, payload, 10) == payload

    # db's public port, seen by `openssl s_client` presenting web's leaf: the chain verifies
    # against the agent's roots and names db's SPIFFE identity.
    leaf = write_leaf_files(tmp_path, api.leaf(web.name), "web")
    roots = write_text(tmp_path / "roots.pem", api.roots_pem())
    pem, out = openssl_peer_chain(db.public_port, leaf, roots)
    assert pem, f"s_client got no certificate:\n{out}"
    san = openssl_san(pem)
    assert f"URI:{api.spiffe_id(db.name)}" in san, san
    assert "Verify return code: 0 (ok)" in out, out

    # One log line per finished session, with its number and result.
    web.proxy.wait_log(r"conn=\d+.*result=ok|result=ok.*conn=\d+")
    db.proxy.wait_log(r"conn=\d+.*result=ok|result=ok.*conn=\d+")


def test_deny_intention_refuses_new_connections(mesh):
    m, api = mesh, mesh.api
    echo, db, web = echo_pair(m)
    m.wait_echo(web.up["db"])

    m.intend("db", {"web": "deny"})
    assert api.intention_allowed(web.name, db.name) is False
    wait_until(lambda: is_refused(web.up["db"]), 10, "a new connection web->db to be refused")
    # A probe a worker accepted just before it took the new snapshot was authorized under the
    # old one and may have dialled the app before the re-check closed it: count from the point
    # where both workers hold the deny.
    changed = re.compile(r"worker (\d+): intentions changed")
    wait_until(lambda: len(set(changed.findall(db.proxy.log()))) >= 2, 10,
               "both of db's workers to take the new intentions")
    accepted = echo.accepted
    for _ in range(3):
        assert_refused(web.up["db"])
    assert echo.accepted == accepted, "db's connectd dialled the app for a denied caller"
    db.proxy.wait_log(r"result=denied")
    # The denied side stays healthy (case-badauthz).
    m.wait_passing(db, timeout=5)

    # Removing the intention lets traffic through again, without restarts.
    api.delete_intentions(db.name)
    m.wait_echo(web.up["db"], timeout=10, what="traffic to flow again after the deny is gone")


def test_reauthorization_closes_open_connection(mesh):
    m = mesh
    _, db, web = echo_pair(m)
    m.wait_echo(web.up["db"])

    with connect(web.up["db"]) as s:
        assert echo_roundtrip(s, b"before the deny\n") == b"before the deny\n"
        m.intend("db", {"web": "deny"})
        start = time.monotonic()
        closed, data = closed_without_data(s, timeout=2.0)
        took = time.monotonic() - start
    assert data == b"", f"unexpected data on the open connection: {data!r}"
    assert closed, "an open connection outlived a deny intention by more than 2 s"
    print(f"open connection closed {took:.2f}s after the deny was written")
    for _ in range(3):
        assert_refused(web.up["db"])


def test_inbound_refuses_callers_without_a_mesh_service_identity(fresh_mesh, tmp_path):
    m, api = fresh_mesh, fresh_mesh.api
    td = api.trust_domain()

    # Make the agent's CA one whose key we hold, before any sidecar starts.
    ours = make_ca("connectd test CA", td)
    api.set_ca(ours.cert_pem, ours.key_pem)
    assert api.active_root()["RootCert"].strip() == ours.cert_pem.strip()

    echo = m.app(EchoApp)
    db = m.add("db", app_port=echo.port)
    m.wait_passing(db)
    roots = write_text(tmp_path / "roots.pem", api.roots_pem())

    # Positive controls: web's leaf from the agent, and a service leaf we sign ourselves.
    web_leaf = write_leaf_files(tmp_path, api.leaf(m.name("web")), "web")
    ok = tls_client_context(web_leaf["chain_all"], web_leaf["key"], roots)
    wait_until(lambda: tls_echo(db.public_port, ok), 30, "db to accept web's agent leaf")
    ours_svc = make_leaf(ours, api.spiffe_id(m.name("web")), tmp_path, "ours-svc")
    assert tls_echo(db.public_port, tls_client_context(*ours_svc, roots)), \
        "a service leaf signed by the active root was refused"
    accepted = echo.accepted

    # No client certificate.
    assert_tls_refused(db.public_port, tls_client_context(cafile=roots))
    # A service identity from a CA the agent does not know.
    rogue = make_ca("rogue CA", td)
    assert_tls_refused(db.public_port, tls_client_context(
        *make_leaf(rogue, api.spiffe_id(m.name("web")), tmp_path, "rogue-svc"), roots))
    # A trusted CA, but not a service identity (an agent's SPIFFE ID).
    assert_tls_refused(db.public_port, tls_client_context(
        *make_leaf(ours, f"spiffe://{td}/agent/client/dc/dc1/id/abc", tmp_path, "agent-id"),
        roots))
    # A trusted CA and a service identity, but of another trust domain.
    assert_tls_refused(db.public_port, tls_client_context(
        *make_leaf(ours, f"spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/"
                   f"dc/dc1/svc/{m.name('web')}", tmp_path, "other-td"), roots))
    assert echo.accepted == accepted, "db's connectd dialled the app for a refused caller"

    # And the proxy still serves the good caller.
    assert tls_echo(db.public_port, ok)


def test_outbound_refuses_server_with_wrong_identity(mesh):
    m, api = mesh, mesh.api
    api_app = m.app(EchoApp)
    api_svc = m.add("api", app_port=api_app.port)
    web = m.add("web", upstreams=["db", "api"])
    m.wait_passing(api_svc)
    m.wait_echo(web.up["api"], what="web->api, the impostor's real service")

    # An impostor 'db' instance whose address is really api's connectd (through a counting
    # tap, so we know when web dialled it). The real db is not registered at all.
    tap = m.app(RelayApp, api_svc.public_port)
    db_name = m.name("db")
    fake_id = db_name + "-impostor-proxy"
    api.register({
        "Kind": "connect-proxy", "ID": fake_id, "Name": db_name + "-sidecar-proxy",
        "Address": LOOPBACK, "Port": tap.port,
        "Proxy": {"DestinationServiceName": db_name, "DestinationServiceID": db_name,
                  "LocalServiceAddress": LOOPBACK, "LocalServicePort": api_app.port},
        "Checks": [{"Name": "impostor listening", "TCP": f"{LOOPBACK}:{api_svc.public_port}",
                    "Interval": "1s", "Timeout": "1s"}],
    })
    m.registered.append(fake_id)
    api.wait_passing(db_name, port=tap.port, timeout=15)

    received = api_app.received

    def dialled_impostor():
        assert_refused(web.up["db"])
        return tap.accepted > 0

    wait_until(dialled_impostor, 20, "web's connectd to dial the impostor", interval=0.2)
    for _ in range(2):
        assert_refused(web.up["db"])
    assert api_app.received == received, "bytes meant for db reached api's app"


def test_ca_rotation_keeps_open_connections(fresh_mesh):
    m, api = fresh_mesh, fresh_mesh.api
    _, db, web = echo_pair(m)
    m.wait_echo(web.up["db"])
    tmp = m.workdir

    def web_ctx(prefix):
        leaf = write_leaf_files(tmp, api.leaf(web.name), prefix)
        return tls_client_context(leaf["chain_all"], leaf["key"])

    def presented_issued_by(root_pem):
        try:
            return issued_by(peer_cert_der(db.public_port, web_ctx("web-now"), 5), root_pem)
        except (OSError, ssl.SSLError):
            return False

    old_root = api.active_root()
    old_serial = api.leaf(db.name)["SerialNumber"]
    assert presented_issued_by(old_root["RootCert"])

    with connect(web.up["db"]) as held:
        n = 0

        def still_echoes():
            nonlocal n
            n += 1
            msg = f"held connection, round {n}\n".encode()
            assert echo_roundtrip(held, msg, 5) == msg, "the open connection broke"

        still_echoes()
        new = make_ca("connectd rotated root", api.trust_domain())
        api.set_ca(new.cert_pem, new.key_pem)
        roots = api.roots()
        active = next(r for r in roots["Roots"] if r["ID"] == roots["ActiveRootID"])
        assert active["ID"] != old_root["ID"]
        assert active["RootCert"].strip() == new.cert_pem.strip()
        assert old_root["ID"] in [r["ID"] for r in roots["Roots"]]

        def leaf_reissued():
            still_echoes()
            return api.leaf(db.name)["SerialNumber"] != old_serial

        # The agent re-signs leaves after a root change with a random spread (seen: 4-22 s).
        wait_until(leaf_reissued, 90, "the agent to re-issue db's leaf", interval=0.5)

        def presents_new_leaf():
            still_echoes()
            return presented_issued_by(new.cert_pem)

        wait_until(presents_new_leaf, 60, "db's connectd to present a leaf of the new root",
                   interval=0.5)

        # It trusts the new root itself too, not only through the cross-signed intermediate
        # the agent bundles into leaves: a caller whose chain ends at the new root gets in.
        new_only = tls_client_context(*make_leaf(new, api.spiffe_id(web.name), tmp, "new-only"))

        def trusts_new_root():
            still_echoes()
            return tls_echo(db.public_port, new_only)

        wait_until(trusts_new_root, 30, "db's connectd to trust the new root", interval=0.5)
        # New connections through the mesh work with the new certificates on both sides.
        m.wait_echo(web.up["db"], timeout=60, what="a new connection after the rotation")
        still_echoes()


def test_half_close_carries_response_after_eof(mesh):
    m = mesh
    app, db, web = echo_pair(m, RespondAfterEofApp, (1 << 20,))

    def exchange(request, timeout=10):
        with connect(web.up["db"]) as s:
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
            return recv_all(s, timeout)

    def expected(request):
        return f"{hashlib.sha256(request).hexdigest()} {len(request)}\n".encode() + app.payload

    def first_ok():
        try:
            return exchange(b"hello") == expected(b"hello")
        except OSError:
            return False

    wait_until(first_ok, 30, "a half-closed exchange through web->db", interval=0.2)
    request = os.urandom(300_000)
    got = exchange(request)
    assert len(got) == len(expected(request))
    assert got == expected(request)


def test_live_upstream_change_without_restart(mesh):
    m = mesh
    db_app = m.app(EchoApp)
    api_app = m.app(EchoApp)
    db = m.add("db", app_port=db_app.port)
    api_svc = m.add("api", app_port=api_app.port)
    web = m.add("web", upstreams=["db", "api"])
    m.wait_passing(db)
    m.wait_passing(api_svc)
    m.wait_echo(web.up["db"])
    m.wait_echo(web.up["api"])
    pid = web.proxy.pid

    with connect(web.up["api"]) as held:
        assert echo_roundtrip(held, b"api before\n") == b"api before\n"
        old_port, new_port = web.up["db"], free_port()
        m.move_upstream(web, "db", new_port)

        m.wait_echo(new_port, timeout=20, what="upstream db on its new port")
        wait_until(lambda: port_refuses(old_port), 20, f"old port {old_port} to stop accepting")
        assert echo_roundtrip(held, b"api after\n") == b"api after\n", \
            "the unrelated upstream's open connection broke"
    assert try_echo(web.up["api"])
    assert web.proxy.alive() and web.proxy.pid == pid, "connectd was restarted"


def test_bulk_integrity_256mib(mesh):
    m = mesh
    _, db, web = echo_pair(m, SinkApp)

    def small_ok():
        try:
            with connect(web.up["db"]) as s:
                s.sendall(b"x")
                s.shutdown(socket.SHUT_WR)
                return recv_all(s, 5) == f"{hashlib.sha256(b'x').hexdigest()} 1\n".encode()
        except OSError:
            return False

    wait_until(small_ok, 30, "a small exchange with the sink", interval=0.2)

    total_mib = 256
    block = bytearray(os.urandom(1 << 20))
    sent = hashlib.sha256()
    errors = []
    s = connect(web.up["db"], timeout=60)

    def send():
        try:
            for i in range(total_mib):
                block[:8] = i.to_bytes(8, "big")  # every MiB differs: catches reordering
                s.sendall(block)
                sent.update(block)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(e)

    start = time.monotonic()
    t = threading.Thread(target=send, name="bulk-sender", daemon=True)
    t.start()
    try:
        t.join(300)
        assert not t.is_alive(), "sending 256 MiB took more than 300 s"
        assert not errors, f"sending failed: {errors[0]!r}"
        reply = recv_all(s, 120)
    finally:
        s.close()
        t.join(10)
    took = time.monotonic() - start
    print(f"256 MiB through web->db in {took:.1f}s ({total_mib / took:.0f} MiB/s)")
    assert reply == f"{sent.hexdigest()} {total_mib << 20}\n".encode()
