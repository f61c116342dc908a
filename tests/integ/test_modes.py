"""Start modes besides -sidecar-for/-proxy-id: flags mode like `consul connect proxy -service`
(a static configuration from -listen, -service-addr and -upstream, no registration watch),
with -register to appear in the catalog as a connect-proxy while running. The managed-proxy
environment (CONNECT_PROXY_ID + CONNECT_PROXY_TOKEN) is tested with ACLs in test_acl.py.
"""

import subprocess
import urllib.parse

from mesh import LOOPBACK, EchoApp, free_port, wait_until


def _agent_services(api):
    return api.get("/v1/agent/services")


def test_flags_mode_register_serves_and_deregisters(agent, mesh, connectd_bin):
    m = mesh
    db_app = m.app(EchoApp)
    db_name, web_name = m.name("db"), m.name("web")
    public, up = free_port(), free_port()
    common = ["-http-addr", agent.http_addr, "-log-level", "debug"]

    db = m.start_connectd("db-flags", ["-service", db_name, "-service-addr",
                                       f"{LOOPBACK}:{db_app.port}", "-listen",
                                       f"{LOOPBACK}:{public}", "-register", "-register-id", "one",
                                       *common])
    db.wait_port(public)
    proxy_id = f"{db_name}-proxy-one"
    svc = wait_until(lambda: _agent_services(agent.api).get(proxy_id), 20,
                     f"{proxy_id} in the agent's services")
    assert svc["Kind"] == "connect-proxy"
    assert svc["Service"] == f"{db_name}-proxy"
    assert svc["Proxy"]["DestinationServiceName"] == db_name
    assert (svc["Address"], svc["Port"]) == (LOOPBACK, public)
    catalog = agent.api.get("/v1/catalog/service/" + urllib.parse.quote(f"{db_name}-proxy"))
    assert [e["ServiceID"] for e in catalog] == [proxy_id]
    agent.api.wait_passing(db_name, port=public)

    # web in flags mode too: an upstream only, no public listener, no registration.
    web = m.start_connectd("web-flags", ["-service", web_name, "-upstream", f"{db_name}:{up}",
                                         *common])
    web.wait_port(up)
    m.wait_echo(up, what="an echo from a flags-mode proxy to a self-registered one")
    assert "registration" not in " ".join(
        ln for ln in web.log().splitlines() if "watch" in ln), "flags mode watched a registration"

    m.procs.remove(db)
    assert db.stop() == []
    assert f"deregistered {proxy_id}" in db.log()
    assert proxy_id not in _agent_services(agent.api)
    wait_until(lambda: not agent.api.get("/v1/catalog/service/"
                                         + urllib.parse.quote(f"{db_name}-proxy")), 20,
               f"{proxy_id} to leave the catalog")


def test_flags_mode_bad_flags(connectd_bin):
    cases = [
        (["-service", "web", "-upstream", "db"], "flag -upstream \"db\""),
        (["-service", "web", "-listen", "127.0.0.1:1"], "-listen needs -service-addr"),
        (["-service", "web", "-register"], "-register needs -listen"),
        (["-upstream", "db:1", "-proxy-id", "x"], "need -service"),
        (["-service", "web", "-proxy-id", "x"], "mutually exclusive"),
    ]
    for args, msg in cases:
        r = subprocess.run([connectd_bin, *args, "-http-addr", "127.0.0.1:1"],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert msg in r.stderr, (args, r.stderr)
