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


def wait_refused(host, port, timeout=30, what="connections to be refused", by=None):
    """Waits until a new connection from <host> to its upstream listener <port> is cut; with
    by=(sidecar, source) only once that sidecar has also counted a deny of <source> more than
    it had at the call (so an instance that is merely unhealthy for a moment cannot pass for
    the deny)."""
    if by is not None:
        before = m_(by[0], "authorization_decisions_total", source=by[1], result="deny")

    def ok():
        if not refused_from(host, port):
            return False
        return by is None or m_(by[0], "authorization_decisions_total", source=by[1],
                                result="deny") > before

    wait_until(ok, timeout, f"{what} (on {host.name}, port {port})", interval=0.2)


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
        closes = m_(db.sidecar, "reauthorization_closes_total")
        flip(cluster, "db", {"web": "deny"})
        wait_refused(web.host, web.up["db"], what="the deny written on a server",
                     by=(db.sidecar, "web"))
        closed, _ = closed_without_data(held.sock, timeout=10)
        assert closed, "the open connection outlived the deny"
    finally:
        held.close()
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


# ---------------------------------------------------------------------------------------------
# 2. The leader server is killed
# ---------------------------------------------------------------------------------------------


def test_leader_killed(cluster, base):
    """SIGKILL the dc1 leader: an open connection carries on, new connections keep working
    while the two other servers elect a new leader, and an intention flip written after the
    election is enforced. The killed server comes back on its data and rejoins."""
    db, web = base["db"], base["web"]
    leader = cluster.leader()
    others = [cluster[n] for n in cluster.DC1_SERVERS if cluster[n] is not leader]
    denied = r"src=spiffe://[^ ]+/svc/web dst=db result=denied"
    denied_before = len(re.findall(denied, db.sidecar.log()))
    held = Held(web.host, web.up["db"])
    try:
        assert held.echoes()
        leader.kill()
        t0 = time.monotonic()
        assert echo_from(web.host, web.up["db"]), "a new connection failed right after the kill"
        assert held.echoes()

        def new_leader():
            held.echoes()
            assert echo_from(web.host, web.up["db"]), "a new connection failed meanwhile"
            try:
                addr = others[0].api.leader()
            except OSError:
                return None
            return addr and not addr.startswith(leader.host.ip + ":") and addr

        addr = wait_until(new_leader, 30, "a new dc1 leader")
        elected_s = time.monotonic() - t0
        print(f"new leader {addr} after {elected_s:.1f} s")
        flip(cluster, "db", {"web": "deny"}, via=others[0])
        wait_refused(web.host, web.up["db"], what="the deny written under the new leader",
                     by=(db.sidecar, "web"))
        closed, _ = closed_without_data(held.sock, timeout=10)
        assert closed, "the open connection outlived the deny"
    finally:
        held.close()
        leader.start()
    assert db.sidecar.admin("/ready") == (200, "ready\n")
    assert len(re.findall(denied, db.sidecar.log())) > denied_before
    flip(cluster, "db", {"web": "allow"}, via=others[1])
    wait_echo(web.host, web.up["db"], what="traffic after the allow")
    # The cluster is whole again: the restarted server answers and sees three peers.
    wait_until(lambda: leader.answers() and len(leader.api.get("/v1/status/peers")) == 3, 60,
               f"{leader.name} to rejoin the raft peers")


# ---------------------------------------------------------------------------------------------
# 3. A client agent is stopped
# ---------------------------------------------------------------------------------------------


def test_client_agent_stopped(cluster, base):
    """Stop c1's agent (web's host): web's sidecar fails static, serving in and out on what
    it has while /ready and /metrics say the agent is gone; when the agent returns, the
    watches resume, which an intention flip on web (enforced by web's sidecar) proves."""
    db, web, cron = base["db"], base["web"], base["cron"]
    agent = cluster["c1"]
    out_held = Held(web.host, web.up["db"])
    in_held = Held(cron.host, cron.up["web"])
    try:
        assert out_held.echoes() and in_held.echoes()
        agent.stop()
        web.sidecar.wait_log(r"agent 127\.0\.0\.1:8500 unreachable", timeout=30)
        wait_until(lambda: m_(web.sidecar, "watch_up", watch="leaf") == 0, 30,
                   "web's leaf watch to report the failure")
        status, body = web.sidecar.admin("/ready")
        assert status == 200, body
        assert body == "ready; agent 127.0.0.1:8500 unreachable: serving the last good state\n"
        # Several seconds without the agent: new and open connections out, the open one in.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert echo_from(web.host, web.up["db"]), "a new connection failed without the agent"
            assert out_held.echoes() and in_held.echoes()
            time.sleep(0.3)
        assert m_(web.sidecar, "watch_up", watch="intentions") == 0
    finally:
        out_held.close()
        in_held.close()
        if not agent.alive():
            agent.start()
    wait_until(agent.answers, 60, "c1's agent to be back")
    web.sidecar.wait_log(r"agent 127\.0\.0\.1:8500 reachable again", timeout=60)
    wait_until(lambda: web.sidecar.admin("/ready") == (200, "ready\n"), 30,
               "/ready to be plain ready again")
    # The agent left the cluster on SIGTERM; back, it registers web again from its data dir.
    wait_until(lambda: passing_on(cron.node.api, "web", web.public_port, web.host), 60,
               "web to pass on c1 again, as c2 sees it")
    wait_echo(cron.host, cron.up["web"], what="cron to reach web again")
    flip(cluster, "web", {"cron": "deny"})
    wait_refused(cron.host, cron.up["web"], what="the deny enforced by web's sidecar",
                 by=(web.sidecar, "cron"))
    assert m_(web.sidecar, "watch_up", watch="intentions") == 1
    flip(cluster, "web", {"cron": "allow"})
    wait_echo(cron.host, cron.up["web"], what="cron after the allow")
    assert len(re.findall(r"agent \S+ unreachable", web.sidecar.log())) == 1


# ---------------------------------------------------------------------------------------------
# 4. A host's link is cut and restored
# ---------------------------------------------------------------------------------------------


def chain_updates(sidecar, upstream):
    return len(re.findall(rf"upstream service:///{upstream}: discovery chain {upstream}:",
                          sidecar.log()))


def set_entry(cluster, body):
    cluster.live_dc1_server().api.set_config_entry(body)


def delete_entry(cluster, kind, name):
    cluster.live_dc1_server().api.delete_config_entry(kind, name)


def test_link_cut(cluster, cmesh, base):
    """Cut c2's link (db's host) on the switch: new connections from web that try db on c2
    first fail their connect within connect_timeout_ms (1 s) and go to db's other instance
    on c1; the connection open to c2 is closed by web's idle timeout rather than hanging.
    Restored, c2 rejoins and serves again."""
    db, web = base["db"], base["web"]
    c2 = cluster["c2"].host
    held = Held(web.host, web.up["db"])  # only db on c2 exists yet: it goes there
    db2 = cmesh.add("c1", "db", sid="db-c1", app=EchoApp)
    try:
        assert held.echoes()
        web.sidecar.wait_log(r"target db\.default\.default\.dc1: 2 healthy endpoint", timeout=30)
        errors = m_(web.sidecar, "upstream_connect_errors_total", listener="upstream",
                    upstream="db")
        idle = m_(web.sidecar, "timeout_closes_total", kind="idle")
        got2 = db2.app.received
        c2.link(False)
        # web draws an endpoint at random for each new connection: go on until some drew
        # c2 (each such one fails over), at least six connections in all.
        times = []
        for i in range(40):
            t = time.monotonic()
            assert echo_from(web.host, web.up["db"], b"during the cut %d\n" % i, timeout=10), \
                f"connection {i} during the cut failed"
            times.append(time.monotonic() - t)
            if i >= 5 and m_(web.sidecar, "upstream_connect_errors_total", listener="upstream",
                             upstream="db") > errors:
                break
        print("connection times during the cut:", ["%.3f" % x for x in times])
        assert max(times) < 2.0, f"a connection took {max(times):.2f} s (connect timeout 1 s)"
        assert db2.app.received >= got2 + len(times) * len(b"during the cut 0\n")
        assert m_(web.sidecar, "upstream_connect_errors_total", listener="upstream",
                  upstream="db") > errors, "no new connection met the cut host"
        assert re.search(rf"out endpoint {re.escape(c2.ip)}:{db.public_port} failed: "
                         rf"connect(: No route to host| timed out)", web.sidecar.log())
        # The open connection to c2: its bytes go nowhere; the idle timeout ends it.
        held.sock.sendall(b"into the cut\n")
        t = time.monotonic()
        closed, data = closed_without_data(held.sock, timeout=WEB_IDLE_MS / 1000 + 5)
        waited = time.monotonic() - t
        assert closed and data == b"", "the connection to the cut host hung"
        assert waited < WEB_IDLE_MS / 1000 + 2, f"closed only after {waited:.1f} s"
        assert m_(web.sidecar, "timeout_closes_total", kind="idle") > idle
        assert re.search(rf"dst={re.escape(c2.ip)}:{db.public_port} upstream=db "
                         rf"result=idle_timeout", web.sidecar.log())
    finally:
        held.close()
        c2.link(True)
        # Serf would retry the failed members only every 30 s; a join brings them back now
        # (retried: the neighbour entries the cut left failed take a moment to clear).
        wait_until(lambda: c2.consul(cluster["c2"].consul_bin, "join", cluster["s1"].host.ip,
                                     check=False).returncode == 0, 30, "c2 to join s1 again",
                   interval=0.5)
    wait_until(lambda: cluster.members_alive(cluster["s1"], ["c2"]), 60,
               "c2 alive again in s1's view")
    wait_until(lambda: passing_on(cluster["c1"].api, "db", db.public_port, db.host), 60,
               "db on c2 passing again, as c1 sees it")
    got = db.app.received
    wait_until(lambda: echo_from(web.host, web.up["db"]) and db.app.received > got, 30,
               "web to reach db on c2 again")
    assert cmesh.remove(db2) == []


# ---------------------------------------------------------------------------------------------
# 5. Across datacenters
# ---------------------------------------------------------------------------------------------


def openssl_chain(host, ip, port, leaf_paths, cafile):
    """`openssl s_client` from <host>'s namespace to ip:port presenting a mesh leaf; returns
    (the certificates the server sent, in order, as PEM; the whole output)."""
    args = ["ip", "netns", "exec", host.netns, "openssl", "s_client", "-connect",
            f"{ip}:{port}", "-showcerts", "-cert", leaf_paths["leaf"], "-key", leaf_paths["key"],
            "-CAfile", cafile]
    if leaf_paths.get("has_rest"):
        args += ["-cert_chain", leaf_paths["rest"]]
    r = subprocess.run(args, input=b"", capture_output=True, timeout=20)
    out = r.stdout.decode("utf-8", "replace") + r.stderr.decode("utf-8", "replace")
    return split_pem(out), out


def test_cross_dc_upstream_and_failover(cluster, cmesh, base, tmp_path):
    """An upstream with Datacenter dc2 reaches db's instance on dc2's client, whose leaf is
    signed by dc2's intermediate: the sidecar presents the chain and web's side verifies it
    against the roots. Then a resolver fails db over to dc2, and when db's only dc1 instance
    is gone web's connections go to dc2; back, they return to dc1."""
    db, web = base["db"], base["web"]
    c1, c4 = cluster["c1"], cluster["c4"]
    dbx = cmesh.add("c4", "db", sid="db-c4", app=EchoApp)
    report = cmesh.add("c1", "report", upstreams=[{"name": "db", "fields": {"Datacenter": "dc2"},
                                                   "config": {"connect_timeout_ms": 1000}}])
    wait_echo(report.host, report.up["db"], what="report on c1 to reach db in dc2")
    got_x, got_1 = dbx.app.received, db.app.received
    for i in range(3):
        assert echo_from(report.host, report.up["db"], b"to dc2 %d\n" % i)
    assert dbx.app.received >= got_x + 3 * len(b"to dc2 0\n")
    assert db.app.received == got_1, "a dc2 upstream reached dc1's db"
    assert m_(report.sidecar, "connections_total", listener="upstream", upstream="db") >= 3
    xaddr = f"{dbx.host.ip}:{dbx.public_port}"
    report.sidecar.wait_log(r"target db\.default\.default\.dc2 endpoint " + re.escape(xaddr))
    assert re.search(r"src=spiffe://[^ ]+/dc/dc1/svc/report dst=db result=ok", dbx.sidecar.log())

    # dc2's leaf is signed by dc2's intermediate (not by a root), and that intermediate by the
    # active root: the one set by the rotation above, so dc2 followed it. (After a rotation
    # Consul also sends the new root cross-signed by the old one, between the two.)
    leaf = c4.api.leaf("db")
    certs = split_pem(leaf["CertPEM"])
    roots = c1.api.roots()
    active = next(r for r in roots["Roots"] if r["ID"] == roots["ActiveRootID"])
    der = [ssl.PEM_cert_to_DER_cert(c) for c in certs]
    signers = [i for i in range(1, len(certs)) if issued_by(der[0], certs[i])]
    assert signers, f"none of the {len(certs)} certificates of dc2's chain signed its leaf"
    assert issued_by(der[signers[0]], active["RootCert"]), \
        "dc2's intermediate is not signed by the active root"
    assert not any(issued_by(der[0], r["RootCert"]) for r in roots["Roots"]), \
        "dc2's leaf is signed by a root directly"
    # The chain db's dc2 sidecar presents verifies against dc1's roots.
    caller = write_leaf_files(str(tmp_path), c1.api.leaf("report"), "report")
    cafile = write_text(str(tmp_path / "roots.pem"),
                        "".join(r["RootCert"] for r in roots["Roots"]))
    sent, out = openssl_chain(report.host, dbx.host.ip, dbx.public_port, caller, cafile)
    assert "Verify return code: 0 (ok)" in out, out[-1500:]
    assert [ssl.PEM_cert_to_DER_cert(c) for c in sent] == der, \
        "the dc2 sidecar did not send its leaf's chain as the agent gave it"
    assert leaf_serial(dbx.sidecar) == serial_hex(leaf["SerialNumber"])

    # Failover: every dc1 instance of db gone -> dc2.
    n = chain_updates(web.sidecar, "db")
    set_entry(cluster, {"Kind": "service-resolver", "Name": "db", "ConnectTimeout": "1s",
                        "Failover": {"*": {"Datacenters": ["dc2"]}}})
    try:
        wait_until(lambda: chain_updates(web.sidecar, "db") > n, 30,
                   "web to take db's failover resolver")
        assert db.sidecar.stop() == []
        got_x = dbx.app.received
        wait_until(lambda: echo_from(web.host, web.up["db"]) and dbx.app.received > got_x, 30,
                   "web's connections to fail over to db in dc2")
        web.sidecar.wait_log(r"target db\.default\.default\.dc2 endpoint " + re.escape(xaddr))
        assert m_(web.sidecar, "watch_up", watch="health:db.default.default.dc2") == 1
    finally:
        if not db.sidecar.proc.alive():
            db.sidecar.start([db.public_port])
    wait_until(lambda: passing_on(c1.api, "db", db.public_port, db.host), 30,
               "db on c2 passing again")
    got_1 = db.app.received
    wait_until(lambda: echo_from(web.host, web.up["db"]) and db.app.received > got_1, 30,
               "web back on db in dc1")
    delete_entry(cluster, "service-resolver", "db")
    assert cmesh.remove(report) == [] and cmesh.remove(dbx) == []


# ---------------------------------------------------------------------------------------------
# 6. L7: a route to a subset on another host, retries around a killed instance
# ---------------------------------------------------------------------------------------------


def test_l7_route_subset_and_retries(cluster, cmesh):
    """api is an HTTP service: v1 on c1, two v2 instances on c2. ui on c1 routes /v2 to the
    v2 subset on c2, everything else to v1. When one v2 instance is killed, requests to /v2
    are retried onto the other and all succeed."""
    server = cluster.live_dc1_server().api
    server.set_service_defaults("api", "http")
    # Round robin: without a LoadBalancer policy a pooled connection to any endpoint of the
    # target is taken first, and one pooled leg would carry every request.
    server.set_config_entry({"Kind": "service-resolver", "Name": "api", "DefaultSubset": "v1",
                             "LoadBalancer": {"Policy": "round_robin"},
                             "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                                         "v2": {"Filter": "Service.Meta.version == v2"}}})
    server.set_config_entry({"Kind": "service-router", "Name": "api", "Routes": [{
        "Match": {"HTTP": {"PathPrefix": "/v2"}},
        "Destination": {"ServiceSubset": "v2", "NumRetries": 3, "RetryOnConnectFailure": True,
                        "RetryOnStatusCodes": [503]}}]})
    v1 = cmesh.add("c1", "api", sid="api-v1", app=HttpEchoApp, meta={"version": "v1"})
    v2a = cmesh.add("c2", "api", sid="api-v2a", app=HttpEchoApp, meta={"version": "v2"})
    v2b = cmesh.add("c2", "api", sid="api-v2b", app=HttpEchoApp, meta={"version": "v2"})
    ui = cmesh.add("c1", "ui", upstreams=[{"name": "api"}])
    port = ui.up["api"]

    def get(path):
        with ui.host.inside():
            return try_http(port, "GET", path)

    def both_v2_reached():
        r = get("/v2/warm")
        return r is not None and r.status == 200 and v2a.app.seen_marker("/v2/warm") \
            and v2b.app.seen_marker("/v2/warm")

    wait_until(both_v2_reached, 60, "ui to route /v2 to both v2 instances on c2", interval=0.2)
    for i in range(10):
        assert get(f"/v1/r{i}").status == 200
        assert get(f"/v2/r{i}").status == 200
        assert v1.app.seen_marker(f"/v1/r{i}") and not v1.app.seen_marker(f"/v2/r{i}")
        assert v2a.app.seen_marker(f"/v2/r{i}") or v2b.app.seen_marker(f"/v2/r{i}")
    assert not v2a.app.seen_marker("/v1/") and not v2b.app.seen_marker("/v1/")

    retries = m_(ui.sidecar, "upstream_request_retries_total")
    v2a.sidecar.proc.proc.kill()  # the instance dies: its sidecar is gone at once
    v2a.sidecar.proc.proc.wait(10)
    statuses = [get(f"/v2/k{i}").status for i in range(20)]
    assert statuses == [200] * 20, statuses
    assert all(v2b.app.seen_marker(f"/v2/k{i}") for i in range(20))
    assert m_(ui.sidecar, "upstream_request_retries_total") > retries
    dead = re.escape(f"{v2a.host.ip}:{v2a.public_port}")
    assert re.search(rf"out endpoint {dead} failed: connect: Connection refused",
                     ui.sidecar.log())
    cmesh.forget(v2a)
    for svc in (ui, v1, v2b):
        assert cmesh.remove(svc) == []
    for kind in ("service-router", "service-resolver", "service-defaults"):
        cluster.live_dc1_server().api.delete_config_entry(kind, "api")
