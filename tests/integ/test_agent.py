"""The agent behaviours the proxy and the other tests rely on, checked against the real agent
with no connectd involved: registrations and fast sidecar health, intentions, and replacing
the CA root with one whose key the tests hold. If one of these fails, the harness (or the
Consul version) is at fault, not connectd."""

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mesh import LOOPBACK, EchoApp, free_port, issued_by, make_ca, split_pem, wait_until


def test_agent_is_a_dev_server_on_our_ports(agent):
    api = agent.api
    assert api.leader() == f"{LOOPBACK}:{agent.ports['server']}"
    self_ = api.get("/v1/agent/self")
    dbg = self_["DebugConfig"]
    assert dbg["ConnectEnabled"] is True
    assert dbg["Experiments"] == [], "v2 resource experiments would refuse v1 registrations"
    assert (dbg["ConnectSidecarMinPort"], dbg["ConnectSidecarMaxPort"]) == agent.ports["sidecar"]
    assert self_["Config"]["NodeName"] == agent.node
    roots = api.roots()
    assert roots["TrustDomain"].endswith(".consul")
    assert [r for r in roots["Roots"] if r["Active"]][0]["ID"] == roots["ActiveRootID"]


def test_sidecar_registration_and_fast_health(agent_mesh):
    m, api = agent_mesh, agent_mesh.api
    db = m.add("db", app_port=free_port(), start=False)
    web = m.add("web", upstreams=["db", {"name": "api", "config": {"connect_timeout_ms": 1500}}],
                proxy_config={"handshake_timeout_ms": 3000}, start=False)

    reg = api.service(web.sidecar_id)
    assert reg["Kind"] == "connect-proxy"
    assert (reg["Address"], reg["Port"]) == (LOOPBACK, web.public_port)
    assert reg["Proxy"]["DestinationServiceID"] == web.name
    assert reg["Proxy"]["LocalServicePort"] == web.app_port
    assert reg["Proxy"]["Config"] == {"handshake_timeout_ms": 3000}
    ups = {u["DestinationName"]: u for u in reg["Proxy"]["Upstreams"]}
    assert ups[m.name("db")]["LocalBindPort"] == web.up["db"]
    assert ups[m.name("api")]["Config"] == {"connect_timeout_ms": 1500}

    # Nothing listens on db's public port yet: not passing. A listener there (standing in for
    # the proxy) makes it pass within the 1 s check interval.
    assert api.health_connect(db.name) == []
    stand_in = m.app(EchoApp, db.public_port)
    entries = m.wait_passing(db, timeout=10)
    assert entries[0]["Service"]["Address"] == LOOPBACK
    stand_in.stop()
    wait_until(lambda: api.health_connect(db.name) == [], 10, "db to stop passing")

    # Re-registering the parent with a moved upstream keeps the sidecar's port.
    new_port = free_port()
    m.move_upstream(web, "db", new_port)
    reg = api.service(web.sidecar_id)
    assert reg["Port"] == web.public_port
    ups = {u["DestinationName"]: u for u in reg["Proxy"]["Upstreams"]}
    assert ups[m.name("db")]["LocalBindPort"] == new_port


def test_intentions_config_entry(agent_mesh):
    m, api = agent_mesh, agent_mesh.api
    web, db = m.name("web"), m.name("db")
    assert api.intention_allowed(web, db) is True  # dev agent: default allow
    m.intend("db", {"web": "deny"})
    assert api.intention_allowed(web, db) is False
    match = api.get(f"/v1/connect/intentions/match?by=destination&name={db}")[db]
    assert [(i["SourceName"], i["Action"]) for i in match] == [(web, "deny")]
    api.delete_intentions(db)
    assert api.intention_allowed(web, db) is True


def test_custom_ca_root_and_leaf_reissue(fresh_agent_mesh):
    m, api = fresh_agent_mesh, fresh_agent_mesh.api
    m.add("db", start=False)
    td = api.trust_domain()
    old = api.active_root()
    old_leaf = api.leaf(m.name("db"))
    assert issued_by(_der(old_leaf["CertPEM"]), old["RootCert"])
    assert old_leaf["ServiceURI"] == api.spiffe_id(m.name("db"))

    ca = make_ca("connectd test root", td)
    api.set_ca(ca.cert_pem, ca.key_pem)
    roots = api.roots()
    active = [r for r in roots["Roots"] if r["Active"]]
    assert len(active) == 1 and active[0]["ID"] == roots["ActiveRootID"]
    assert active[0]["RootCert"].strip() == ca.cert_pem.strip()
    # The agent reports the low 64 bits of the serial, here always >= 2^63 (see make_ca).
    assert active[0]["SerialNumber"] == ca.cert.serial_number & (2**64 - 1) >= 2**63
    assert old["ID"] in [r["ID"] for r in roots["Roots"]], "old root kept for rotation"
    assert roots["TrustDomain"] == td

    # The agent re-signs leaves after a root change with a random spread (seen: 4-22 s).
    leaf = wait_until(lambda: _reissued(api, m.name("db"), ca.cert_pem, old_leaf), 60,
                      "db's leaf to be re-issued by the new root", interval=0.2)
    # The leaf bundle carries the new root cross-signed by the previous one, so peers that
    # only know the previous root still verify it.
    chain = split_pem(leaf["CertPEM"])
    assert len(chain) == 2
    assert issued_by(_der(chain[1]), old["RootCert"])


def _reissued(api, service, root_pem, old_leaf):
    leaf = api.leaf(service)
    if leaf["SerialNumber"] != old_leaf["SerialNumber"] and issued_by(_der(leaf["CertPEM"]),
                                                                        root_pem):
        return leaf
    return None


def _der(pem):
    return x509.load_pem_x509_certificate(split_pem(pem)[0].encode()).public_bytes(Encoding.DER)

