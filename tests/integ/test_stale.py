"""Decisions that must not outlive what they were based on (issue 7): a resumed TLS session
and the caller's certificate it carries, a TLS session cache and the roots it was built under,
an admitted connection and the trust-domain settings it was checked against."""

import datetime
import re
import socket
import ssl

import pytest

from mesh import (LOOPBACK, EchoApp, _now, admin_args, closed_without_data, echo_roundtrip,
                  issued_by, make_ca, make_leaf, peer_cert_der, recv_exact, tls_client_context,
                  tls_connect, wait_until, write_text)


def _session_echo(port, ctx, session=None, payload=b"stale?\n"):
    """One TLS connection offering <session>, one echo, then close_notify both ways (a server
    connection that ends without it loses its session). Returns (echoed, session, resumed)."""
    raw = socket.create_connection((LOOPBACK, port), timeout=5)
    try:
        s = ctx.wrap_socket(raw, session=session)
    except (OSError, ssl.SSLError):
        raw.close()
        return False, None, False
    with s:
        resumed = s.session_reused
        try:
            s.sendall(payload)
            ok = recv_exact(s, len(payload), 5) == payload
        except (OSError, ssl.SSLError):
            return False, None, resumed
        sess = s.session
        try:
            s.unwrap()
        except (OSError, ssl.SSLError):
            pass
        return ok, sess, resumed


def _own_ca(m, tmp_path):
    """Makes a CA of ours the agent's active root (same trust domain), so the test can sign
    callers; returns it and a long-lived caller leaf (cert, key) for web."""
    api = m.api
    ca = make_ca("connectd stale test CA", api.trust_domain())
    api.set_ca(ca.cert_pem, ca.key_pem)
    leaf = make_leaf(ca, api.spiffe_id(m.name("web")), str(tmp_path), "web-long")
    return ca, leaf


def test_resumption_refused_once_the_callers_certificate_expired(fresh_mesh, tmp_path):
    """Regression: the server's session cache kept a caller's session for two hours, so a
    caller whose leaf had expired (and could not be renewed) still resumed and was admitted
    on the identity in the cached certificate. Now a resumption is refused once that
    certificate expired: the caller has to run a full handshake, which fails."""
    m = fresh_mesh
    ca, long_leaf = _own_ca(m, tmp_path)
    db = m.add("db", app_port=m.app(EchoApp).port)
    m.wait_passing(db)
    # connectd trusts our CA once its roots watch has caught up.
    wait_until(lambda: _session_echo(db.public_port, tls_client_context(*long_leaf))[0], 30,
               "db to admit a caller signed by the new CA")

    not_after = _now() + datetime.timedelta(seconds=6)
    short = make_leaf(ca, m.api.spiffe_id(m.name("web")), str(tmp_path), "web-short",
                      not_after=not_after)
    ctx = tls_client_context(*short)
    ok, sess, resumed = _session_echo(db.public_port, ctx)
    assert ok and not resumed and sess is not None, "the first (full) handshake failed"
    ok, sess, resumed = _session_echo(db.public_port, ctx, sess)
    assert ok and resumed, "the second connection did not resume (the test proves nothing)"

    wait_until(lambda: _now() > not_after + datetime.timedelta(seconds=1), 20,
               "the caller's certificate to expire")
    ok, _, resumed = _session_echo(db.public_port, ctx, sess)
    assert not ok, f"a caller with an expired certificate was admitted (resumed={resumed})"
    # ...as it is without a session.
    assert not _session_echo(db.public_port, ctx)[0]
    # The caller's long-lived peers are unaffected.
    assert _session_echo(db.public_port, tls_client_context(*long_leaf))[0]


def test_roots_change_empties_the_server_session_cache(fresh_mesh, tmp_path):
    """The server's session cache belongs to one generation of leaf and roots: after a CA
    rotation a caller's session is not resumed (a full handshake under the new roots runs)."""
    m = fresh_mesh
    _, leaf = _own_ca(m, tmp_path)
    db = m.add("db", app_port=m.app(EchoApp).port)
    m.wait_passing(db)
    ctx = tls_client_context(*leaf)
    wait_until(lambda: _session_echo(db.public_port, ctx)[0], 30,
               "db to admit a caller signed by the new CA")
    ok, sess, _ = _session_echo(db.public_port, ctx)
    ok, sess, resumed = _session_echo(db.public_port, ctx, sess)
    assert ok and resumed, "no resumption before the rotation (the test proves nothing)"

    rotated = make_ca("connectd stale test CA 2", m.api.trust_domain())
    m.api.set_ca(rotated.cert_pem, rotated.key_pem)
    wait_until(lambda: issued_by(peer_cert_der(db.public_port, ctx), rotated.cert_pem), 30,
               "db to serve a leaf of the rotated CA")
    ok, _, resumed = _session_echo(db.public_port, ctx, sess)
    assert ok, "the caller (old root, still listed) was refused after the rotation"
    assert not resumed, "a session of the previous roots was resumed"


OTHER_TD = "11111111-2222-3333-4444-555555555555.consul"


def _open_admitted(port, ctx):
    """A TLS connection through which one echo came back (the caller owns it), or None."""
    try:
        s = tls_connect(port, ctx, timeout=5)
    except (OSError, ssl.SSLError):
        return None
    try:
        if echo_roundtrip(s, b"admitted?\n") == b"admitted?\n":
            return s
    except (OSError, ssl.SSLError):
        pass
    s.close()
    return None


@pytest.mark.parametrize("authorization", ["intentions", "authorize"])
def test_open_connection_rechecked_when_verify_trust_domain_is_switched_on(fresh_mesh, tmp_path,
                                                                           authorization):
    """Regression (issue 7): open connections were re-checked only when the intentions
    changed. A caller of another trust domain admitted while verify_trust_domain was off kept
    its connection after the check was switched on (in authorize mode the re-check did not
    look at the trust domain at all). Now any change an inbound decision depends on re-checks
    open connections, and this one is closed."""
    m = fresh_mesh
    ca, _ = _own_ca(m, tmp_path)
    db = m.add("db", app_port=m.app(EchoApp).port,
               proxy_config={"verify_trust_domain": False, "authorization": authorization})
    m.wait_passing(db)
    other = make_leaf(ca, f"spiffe://{OTHER_TD}/ns/default/dc/dc1/svc/{m.name('web')}",
                      str(tmp_path), "other-td")
    ctx = tls_client_context(*other)
    s = wait_until(lambda: _open_admitted(db.public_port, ctx), 30,
                   "db to admit a caller of another trust domain with verify_trust_domain off")
    with s:
        db.proxy_config = {"verify_trust_domain": True, "authorization": authorization}
        m.register(db)
        closed, _ = closed_without_data(s, timeout=20)
        assert closed, "the connection of a foreign trust domain survived verify_trust_domain"
    db.proxy.wait_log(r"result=bad_identity reason=\"re-authorization: trust domain "
                      + re.escape(OTHER_TD) + " is not ")
    db.proxy.wait_log(r"verify_trust_domain changed; closed 1 connection")
    assert _open_admitted(db.public_port, ctx) is None
