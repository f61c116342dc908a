"""Reaching the agent other than over plain HTTP on TCP: HTTPS with a client certificate
(CONSUL_HTTP_ADDR=https://..., CONSUL_CACERT, CONSUL_CLIENT_CERT/KEY, CONSUL_TLS_SERVER_NAME)
against an agent with verify_incoming, and a unix socket (unix:///path)."""

import datetime
import os
import shutil
import tempfile

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh import ConsulAgent, EchoApp, Mesh, cert_pem, make_ca, write_text, _key_pem

SERVER_NAME = "server.dc1.consul"


def _issue(ca, cn, dns, eku):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca.cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage(eku), critical=False))
    if dns:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]),
                            critical=False)
    return b.sign(ca.key, hashes.SHA256()), key


@pytest.fixture
def tls_files(tmp_path):
    """A CA, a server certificate for SERVER_NAME only (no IP SAN: the client must verify by
    name) and a client certificate, written as PEM files."""
    ca = make_ca("connectd test agent CA", "agent-ca.test")
    srv, srv_key = _issue(ca, SERVER_NAME, [SERVER_NAME],
                          [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    cli, cli_key = _issue(ca, "connectd", [], [ExtendedKeyUsageOID.CLIENT_AUTH])
    d = str(tmp_path)
    return {
        "ca": write_text(os.path.join(d, "ca.pem"), ca.cert_pem),
        "srv": write_text(os.path.join(d, "srv.pem"), cert_pem(srv)),
        "srv_key": write_text(os.path.join(d, "srv.key"), _key_pem(srv_key)),
        "cli": write_text(os.path.join(d, "cli.pem"), cert_pem(cli)),
        "cli_key": write_text(os.path.join(d, "cli.key"), _key_pem(cli_key)),
    }


def _own_mesh(agent, tmp_path, connectd_bin):
    workdir = tmp_path / "mesh"
    workdir.mkdir()
    return Mesh(agent, str(workdir), connectd_bin, lambda label, path: None)


def _run_pair(m, agent_args, env):
    """db and web with sidecars registered on the agent; both connectd reach the agent through
    agent_args/env. Returns (db, web) once an echo passes web -> db."""
    db_app = m.app(EchoApp)
    db = m.add("db", app_port=db_app.port, start=False)
    web = m.add("web", upstreams=["db"], start=False)
    for svc in (db, web):
        svc.proxy = m.start_connectd(svc.name, ["-sidecar-for", svc.id, "-log-level", "debug",
                                                *agent_args], env=env)
    for port in (db.public_port, web.public_port, web.up["db"]):
        (db if port == db.public_port else web).proxy.wait_port(port)
    m.wait_passing(db)
    m.wait_echo(web.up["db"])
    return db, web


def test_agent_over_https_with_client_cert(consul_bin, connectd_bin, tmp_path, tls_files):
    hcl = (f'tls {{ defaults {{ ca_file = "{tls_files["ca"]}" cert_file = "{tls_files["srv"]}" '
           f'key_file = "{tls_files["srv_key"]}" }} https {{ verify_incoming = true }} }}')
    agent = ConsulAgent(consul_bin, str(tmp_path / "agent"), [hcl], https=True)
    agent.start()
    m = _own_mesh(agent, tmp_path, connectd_bin)
    try:
        url = f"https://127.0.0.1:{agent.ports['https']}"
        env = {"CONSUL_HTTP_ADDR": url, "CONSUL_CACERT": tls_files["ca"],
               "CONSUL_CLIENT_CERT": tls_files["cli"], "CONSUL_CLIENT_KEY": tls_files["cli_key"],
               "CONSUL_TLS_SERVER_NAME": SERVER_NAME}
        db, web = _run_pair(m, [], env)
        assert f"agent {url}" in web.proxy.log()

        # Without the client certificate the agent refuses the TLS handshake.
        no_cert = {k: v for k, v in env.items() if not k.startswith("CONSUL_CLIENT_")}
        p = m.start_connectd("no-client-cert", ["-sidecar-for", web.id], env=no_cert)
        p.wait_log(r"agent \S+ unreachable", timeout=20)
        assert "ready: serving" not in p.log()
    finally:
        problems = m.close()
        agent.stop()
    assert problems == []


def test_agent_over_unix_socket(consul_bin, connectd_bin, tmp_path):
    sockdir = tempfile.mkdtemp(prefix="cd-")  # short: sun_path holds 108 bytes
    sock = os.path.join(sockdir, "agent.sock")
    hcl = f'addresses {{ http = "127.0.0.1 unix://{sock}" }}'
    agent = ConsulAgent(consul_bin, str(tmp_path / "agent"), [hcl])
    agent.start()
    m = _own_mesh(agent, tmp_path, connectd_bin)
    try:
        assert os.path.exists(sock)
        db, web = _run_pair(m, ["-http-addr", f"unix://{sock}"], {})
        assert f"agent unix://{sock}" in web.proxy.log()
    finally:
        problems = m.close()
        agent.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert problems == []
