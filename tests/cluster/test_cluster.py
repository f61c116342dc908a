"""connectd in a real Consul cluster: dc1 with three servers and two client agents, dc2 with one
server and one client, WAN-federated (dc1 primary), every agent on a host of its own (a
network namespace). Sidecars run next to the client agents and talk only to them.

The cluster and the base services start once for the module; the scenarios run in file
order, and each one that breaks a piece (a server, an agent, a link) puts it back before it
ends, so the next starts from a whole cluster.
"""

import json
import re
import ssl
import subprocess
import time

import pytest

from cluster import Held, passing_on
from mesh import (EchoApp, HttpEchoApp, closed_without_data, is_refused, issued_by, make_ca,
                  metric, split_pem, try_echo, try_http, wait_until, write_leaf_files,
                  write_text)

WEB_IDLE_MS = 6000  # web's idle timeout towards db: bounds a connection to a cut host


def echo_from(host, port, payload=b"hello across hosts\n", timeout=5):
    with host.inside():
        return try_echo(port, payload, timeout)


def refused_from(host, port):
    with host.inside():
        return is_refused(port)


def wait_echo(host, port, timeout=30, what="an echo through the mesh"):
    wait_until(lambda: echo_from(host, port), timeout, f"{what} (on {host.name}, port {port})",
               interval=0.2)


def wait_refused(host, port, timeout=30, what="connections to be refused"):
    wait_until(lambda: refused_from(host, port), timeout,
               f"{what} (on {host.name}, port {port})", interval=0.2)


def m_(sidecar, name, **labels):
    return metric(sidecar.metrics(), "connectd_" + name, **labels)


def serial_hex(s):
    """A serial as the agent or connectd print it (colon-separated hex or plain), normalized."""
    return s.replace(":", "").lower().lstrip("0")


def leaf_serial(sidecar):
    return serial_hex(json.loads(sidecar.admin("/config")[1])["tls"]["leaf_serial"] or "")


@pytest.fixture(scope="module")
def base(cmesh):
    """db on client c2; web on client c1 with db as its upstream (1 s connect timeout, an
    idle timeout); cron on c2 with web as its upstream (so web's sidecar enforces
    intentions too)."""
    db = cmesh.add("c2", "db", app=EchoApp)
    web = cmesh.add("c1", "web", app=EchoApp,
                    upstreams=[{"name": "db", "config": {"connect_timeout_ms": 1000,
                                                         "idle_timeout_ms": WEB_IDLE_MS}}])
    cron = cmesh.add("c2", "cron", upstreams=[{"name": "web"}])
    wait_echo(web.host, web.up["db"], what="web on c1 to reach db on c2")
    wait_echo(cron.host, cron.up["web"], what="cron on c2 to reach web on c1")
    return {"db": db, "web": web, "cron": cron}


def flip(cluster, dst, sources, via=None):
    """Writes <dst>'s intentions on a dc1 server (not on the agent of any sidecar)."""
    (via or cluster.live_dc1_server()).api.set_intentions(dst, sources)


# ---------------------------------------------------------------------------------------------
# 1. Traffic, intentions and CA rotation across hosts
# ---------------------------------------------------------------------------------------------


def test_traffic_between_hosts(cluster, base):
    """web's sidecar on c1 dials db's sidecar at c2's address; the bytes reach db's
    application, and both sidecars count and log the connection with the peer's address."""
    db, web = base["db"], base["web"]
    before_app = db.app.received
    before_out = m_(web.sidecar, "connections_total", listener="upstream", upstream="db")
    before_in = m_(db.sidecar, "authorization_decisions_total", source="web", result="allow")
    for i in range(5):
        assert echo_from(web.host, web.up["db"], b"ping %d\n" % i)
    assert db.app.received >= before_app + 5 * len(b"ping 0\n")
    assert m_(web.sidecar, "connections_total", listener="upstream",
              upstream="db") >= before_out + 5
    assert m_(web.sidecar, "upstream_connect_errors_total", listener="upstream",
              upstream="db") == 0
    assert m_(db.sidecar, "authorization_decisions_total", source="web",
              result="allow") >= before_in + 5
    db_addr = f"{db.host.ip}:{db.public_port}"
    assert re.search(rf"dst={re.escape(db_addr)} upstream=db result=ok", web.sidecar.log())
    assert re.search(rf"peer={re.escape(web.host.ip)}:\d+ src=spiffe://[^ ]+/dc/dc1/svc/web "
                     rf"dst=db result=ok", db.sidecar.log())


def test_intention_flip_cluster_wide(cluster, base):
    """An intention written on a server reaches db's sidecar on c2 through its client agent:
    new connections are refused, the open one is closed, and allowing again lets traffic
    through again."""
    db, web = base["db"], base["web"]
    held = Held(web.host, web.up["db"])
    try:
        assert held.roundtrip(b"before the deny\n") == b"before the deny\n"
        denies = m_(db.sidecar, "authorization_decisions_total", source="web", result="deny")
        closes = m_(db.sidecar, "reauthorization_closes_total")
        flip(cluster, "db", {"web": "deny"})
        wait_refused(web.host, web.up["db"], what="the deny written on a server")
        closed, _ = closed_without_data(held.sock, timeout=10)
        assert closed, "the open connection outlived the deny"
    finally:
        held.close()
    assert m_(db.sidecar, "authorization_decisions_total", source="web",
              result="deny") > denies
    assert m_(db.sidecar, "reauthorization_closes_total") >= closes + 1
    assert re.search(r"src=spiffe://[^ ]+/svc/web dst=db result=denied", db.sidecar.log())
    flip(cluster, "db", {"web": "allow"})
    wait_echo(web.host, web.up["db"], what="traffic after the allow")


def test_ca_rotation_cluster_wide(cluster, base):
    """A new root set on a server (/v1/connect/ca/configuration) reaches every sidecar: each
    takes a leaf signed by the new root from its own agent, an open connection carries on,
    and new connections run on the new leaves."""
    db, web = base["db"], base["web"]
    server = cluster.live_dc1_server()
    old_root = server.api.active_root()
    held = Held(web.host, web.up["db"])
    try:
        assert held.roundtrip(b"on the old CA\n") == b"on the old CA\n"
        ca = make_ca("connectd cluster root 2", server.api.trust_domain())
        server.api.set_ca(ca.cert_pem, ca.key_pem)
        new_root = server.api.active_root()
        assert new_root["ID"] != old_root["ID"]

        def on_new_leaf(svc):
            leaf = svc.node.api.leaf(svc.name)
            der = ssl.PEM_cert_to_DER_cert(split_pem(leaf["CertPEM"])[0])
            if not issued_by(der, ca.cert_pem):
                return False
            return leaf_serial(svc.sidecar) == serial_hex(leaf["SerialNumber"])

        # Consul spreads the new leaves over its 30 s jitter window; the open connection is
        # used all along (web's idle timeout would end it otherwise).
        for svc in (db, web):
            wait_until(lambda: held.echoes() and on_new_leaf(svc), 60,
                       f"{svc.sid}'s sidecar to serve a leaf of the new root")
        assert held.roundtrip(b"on the new CA\n") == b"on the new CA\n"
    finally:
        held.close()
    wait_echo(web.host, web.up["db"], what="traffic on the new leaves")
    for svc in (db, web):
        assert m_(svc.sidecar, "watch_up", watch="roots") == 1
        svc.sidecar.wait_log(r"TLS: leaf \S+ for \S+, 2 trusted root\(s\)", timeout=5)
