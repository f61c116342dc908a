"""TLS settings of mesh connections from Proxy.Config: tls_min_version, tls_max_version and
tls_cipher_suites (Consul's names), checked with openssl s_client presenting a real leaf; and
verify_trust_domain."""

import re
import socket
import subprocess

from mesh import (LOOPBACK, EchoApp, admin_args, admin_get, assert_tls_refused, is_refused, make_ca,
                  make_leaf, metric, parse_metrics, recv_exact, tls_client_context, try_echo,
                  wait_until, write_leaf_files, write_text, tls_echo)


def _s_client(port, paths, cafile, *extra):
    """Returns the cipher the handshake agreed on, or None when it failed."""
    args = ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-cert", paths["leaf"],
            "-key", paths["key"], "-CAfile", cafile, *extra]
    if paths.get("has_rest"):
        args += ["-cert_chain", paths["rest"]]
    r = subprocess.run(args, input=b"", capture_output=True, timeout=20)
    out = r.stdout.decode("utf-8", "replace") + r.stderr.decode("utf-8", "replace")
    m = re.search(r"Cipher is (\S+)", out)
    return None if m is None or m.group(1) == "(NONE)" else m.group(1)


def _client_leaf(m, tmp_path, logical):
    """A leaf for <logical> (any registered mesh service may call) and the roots file."""
    leaf = m.api.leaf(m.name(logical))
    paths = write_leaf_files(str(tmp_path), leaf, logical)
    cafile = write_text(str(tmp_path / "roots.pem"), m.api.roots_pem())
    return paths, cafile


def test_tls_min_version_13_refuses_tls12(mesh, tmp_path):
    m = mesh
    db_app = m.app(EchoApp)
    db = m.add("db", app_port=db_app.port, proxy_config={"tls_min_version": "TLSv1_3"})
    web = m.add("web", upstreams=["db"])
    m.wait_passing(db)
    m.wait_echo(web.up["db"])
    paths, cafile = _client_leaf(m, tmp_path, "web")
    assert _s_client(db.public_port, paths, cafile, "-tls1_2") is None, \
        "a TLS 1.2 handshake was accepted with tls_min_version TLSv1_3"
    assert _s_client(db.public_port, paths, cafile, "-tls1_3") is not None
    # The same client at TLS 1.2 is fine against a sidecar with the defaults.
    assert _s_client(web.public_port, paths, cafile, "-tls1_2") is not None


def test_tls_cipher_suites_and_max_version(mesh, tmp_path):
    m = mesh
    db_app = m.app(EchoApp)
    db = m.add("db", app_port=db_app.port, proxy_config={
        "tls_max_version": "TLSv1_2",
        "tls_cipher_suites": "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"})
    web = m.add("web", upstreams=["db"])
    m.wait_passing(db)
    m.wait_echo(web.up["db"])
    paths, cafile = _client_leaf(m, tmp_path, "web")
    assert _s_client(db.public_port, paths, cafile, "-tls1_3") is None, \
        "a TLS 1.3 handshake was accepted with tls_max_version TLSv1_2"
    assert _s_client(db.public_port, paths, cafile, "-tls1_2", "-cipher",
                     "ECDHE-ECDSA-AES256-GCM-SHA384") is None, "a suite not listed was accepted"
    assert _s_client(db.public_port, paths, cafile, "-tls1_2", "-cipher",
                     "ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"


def test_tls_bad_settings_are_refused_by_name(mesh):
    m = mesh
    db_app = m.app(EchoApp)
    db = m.add("db", app_port=db_app.port, proxy_config={"tls_min_version": "TLSv1_0"},
               start=False)
    db.proxy = m.start_connectd(db.name, ["-sidecar-for", db.id, "-http-addr",
                                          m.agent.http_addr])
    db.proxy.wait_log(r'key "tls_min_version" must be TLS_AUTO, TLSv1_2 or TLSv1_3')
    m.services["db"].proxy_config = {"tls_cipher_suites": "TLS_NO_SUCH_SUITE"}
    m.register(db)
    db.proxy.wait_log(r'unknown TLS 1.2 cipher suite "TLS_NO_SUCH_SUITE"')
    assert db.proxy.alive()


def test_verify_trust_domain_false_accepts_another_trust_domain(fresh_mesh, tmp_path):
    """A caller whose leaf chains to a trusted root but names another trust domain (as during
    a migration between CAs) is refused by default and accepted with verify_trust_domain
    false."""
    m, api = fresh_mesh, fresh_mesh.api
    ours = make_ca("connectd test CA", api.trust_domain())
    api.set_ca(ours.cert_pem, ours.key_pem)
    strict_app, relaxed_app = m.app(EchoApp), m.app(EchoApp)
    strict = m.add("strict", app_port=strict_app.port)
    relaxed = m.add("relaxed", app_port=relaxed_app.port,
                    proxy_config={"verify_trust_domain": False})
    m.wait_passing(strict)
    m.wait_passing(relaxed)
    roots = write_text(str(tmp_path / "roots.pem"), api.roots_pem())
    other = make_leaf(ours, "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/"
                      f"dc/dc1/svc/{m.name('web')}", str(tmp_path), "other-td")
    ctx = tls_client_context(*other, roots)
    wait_until(lambda: tls_echo(relaxed.public_port, ctx), 30,
               "the relaxed sidecar to accept a caller of another trust domain")
    assert_tls_refused(strict.public_port, ctx)
    assert "trust domain 11111111-2222-3333-4444-555555555555.consul is not" in strict.proxy.log()


def _handshakes(port, direction):
    """(full, resumed) TLS handshakes a sidecar's /metrics counts in <direction>."""
    status, body = admin_get(port, "/metrics")
    assert status == 200, body
    ms = parse_metrics(body)
    return tuple(int(metric(ms, "connectd_tls_handshakes_total", direction=direction,
                            resumed=r)) for r in ("false", "true"))


def test_sessions_resume_between_sidecars(mesh):
    """The next connection to the same sidecar resumes the TLS session of an earlier one (a
    cheaper handshake); the caller's identity is still known and authorized on resumption, and
    tls_resumption = false runs full handshakes."""
    m = mesh
    app = m.app(EchoApp)
    db = m.add("db", app_port=app.port, start=False)
    db_admin, db_port = admin_args()
    m.start(db, extra_args=db_admin)
    web = m.add("web", upstreams=["db"], start=False)
    web_admin, web_port = admin_args()
    m.start(web, extra_args=web_admin)
    full = m.add("full", upstreams=["db"], start=False,
                 proxy_config={"tls_resumption": False})
    full_admin, full_port = admin_args()
    m.start(full, extra_args=full_admin)
    m.wait_passing(db)

    m.wait_echo(web.up["db"])
    for _ in range(3):
        assert try_echo(web.up["db"])
    f, r = _handshakes(web_port, "outbound")
    assert r >= 3 and f >= 1, f"web outbound: {f} full, {r} resumed"
    assert _handshakes(db_port, "inbound")[1] >= 3
    # Every connection, resumed or not, was decided on its caller's identity (full's sidecar
    # may have dialled db already, when its upstream port was probed at start).
    ok = re.findall(r"src=(\S+) dst=\S+ result=ok", db.proxy.log())
    assert all(s.endswith(("/svc/" + web.name, "/svc/" + full.name)) for s in ok), ok
    assert sum(s.endswith("/svc/" + web.name) for s in ok) >= 4, ok

    for _ in range(3):
        m.wait_echo(full.up["db"])
    f, r = _handshakes(full_port, "outbound")
    assert r == 0 and f >= 3, f"full outbound: {f} full, {r} resumed"

    # A resumed session is no way around the intentions.
    resumed_before = _handshakes(db_port, "inbound")[1]
    m.intend("db", {"web": "deny"})
    wait_until(lambda: is_refused(web.up["db"]), 20, "web refused after the deny")
    assert _handshakes(db_port, "inbound")[1] > resumed_before


def test_connections_opened_together_resume(mesh):
    """Connections opened at the same moment all resume on the session an earlier one brought
    (test_tls.c checks that resuming adds no session to either cache). Before, the session
    was taken out of web's cache when offered: of 16 dials made together 3 resumed and 13 ran
    full mutual handshakes."""
    m = mesh
    app = m.app(EchoApp)
    db = m.add("db", app_port=app.port)
    web = m.add("web", upstreams=["db"], start=False)
    web_admin, web_port = admin_args()
    m.start(web, extra_args=web_admin)
    m.wait_passing(db)
    m.wait_echo(web.up["db"])  # a full handshake (or a few): web keeps db's ticket
    full0, resumed0 = _handshakes(web_port, "outbound")
    n = 16
    socks = [socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) for _ in range(n)]
    try:
        for i, s in enumerate(socks):
            s.sendall(b"together %d\n" % i)
        for i, s in enumerate(socks):
            line = b"together %d\n" % i
            assert recv_exact(s, len(line), 10) == line
    finally:
        for s in socks:
            s.close()
    full, resumed = _handshakes(web_port, "outbound")
    assert (full - full0, resumed - resumed0) == (0, n), (
        f"{n} connections opened together: {full - full0} full handshakes, "
        f"{resumed - resumed0} resumed")
