"""Hostile traffic at connectd's public port, against a real Consul agent.

One agent and one small mesh serve the whole module. The agent's CA is replaced first by one
whose key the tests hold, so they can sign whatever certificate a hostile peer might present.
`db` (an echo app behind its connectd, with an admin endpoint) is the target; the good caller
presents a leaf for `web` signed by that CA. Every test sends one kind of hostile traffic and
then checks that it was refused (or, for a peer that never reads, bounded), that /metrics
counted it under its own reason in connectd_handshake_failures_total and under no other,
that the app behind db never saw it, and that the good mTLS caller still gets its echo.

Four tests pin defect 8 of issue 7 (text logs could be forged): a newline in a certificate
URI wrote a line of the peer's own into connectd's log, inbound as the caller's URI and
outbound as the server's, and so did one in the agent's authorize Reason; and every failed
handshake wrote a WARN line, so a flood of them flooded the log. Slow handshakes and connection
floods are test_flood.py's.
"""

import datetime
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass

import pytest

from mesh import (LOOPBACK, AgentInterposer, ConsulAgent, EchoApp, Mesh, TcpApp, admin_args,
                  admin_get, assert_tls_refused, closed_without_data, free_port, make_ca,
                  make_leaf, parse_metrics, process_rss_bytes, recv_exact, sidecar_registration,
                  tls_client_context, tls_connect, wait_until, write_text, tls_echo)

try:
    from conftest import LOGS
except ImportError:  # the report then lacks the logs, nothing else
    LOGS = None

# A line a hostile peer would like to see in the operator's log.
FORGED = "2001-01-01T00:00:00.000Z [ERROR] FORGED line from the peer"


@dataclass
class Target:
    m: Mesh
    api: object
    td: str
    ca: object
    db: object
    web: object
    echo: EchoApp
    admin_port: int
    roots: str
    good: ssl.SSLContext
    tmp: str
    logs: list


@pytest.fixture(scope="module")
def hostile(consul_bin, connectd_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    agent = ConsulAgent(consul_bin, str(work / "agent"))
    logs = [("consul agent", agent.log_path)]
    (work / "mesh").mkdir()
    problems, m = [], None
    agent.start()
    try:
        m = Mesh(agent, str(work / "mesh"), connectd_bin,
                 lambda label, path: logs.append((label, path)))
        api = agent.api
        td = api.trust_domain()
        ca = make_ca("connectd hostile-test CA", td)
        api.set_ca(ca.cert_pem, ca.key_pem)

        echo = m.app(EchoApp)
        admin, admin_port = admin_args()
        db = m.add("db", app_port=echo.port, start=False)
        m.start(db, extra_args=admin)
        web = m.add("web", upstreams=["fake"])
        m.wait_passing(db)
        roots = write_text(os.path.join(work, "roots.pem"), api.roots_pem())
        good = tls_client_context(*make_leaf(ca, api.spiffe_id(m.name("web")), work, "good"),
                                  roots)
        wait_until(lambda: tls_echo(db.public_port, good), 30, "db to echo for the good caller")
        yield Target(m, api, td, ca, db, web, echo, admin_port, roots, good, str(work), logs)
    finally:
        if m is not None:
            problems = m.close()
        agent.stop()
    if problems:
        pytest.fail("connectd did not end cleanly:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def t(hostile, request):
    """The module's target, with its logs attached to this test's report if it fails."""
    if LOGS is not None:
        for label, path in hostile.logs:
            request.node.stash.setdefault(LOGS, []).append((label, path, 40))
    return hostile


def failures(t):
    """connectd_handshake_failures_total of db's connectd, {reason: value}."""
    status, body = admin_get(t.admin_port, "/metrics")
    assert status == 200, body
    return {dict(labels)["reason"]: v for (name, labels), v in parse_metrics(body).items()
            if name == "connectd_handshake_failures_total"}


def expect_refused(t, counts, act, timeout=15):
    """Runs act() and checks that db's connectd counted exactly <counts> ({reason: n}) more
    failed handshakes and nothing else, that the app saw no connection, and that the good
    caller still gets its echo."""
    before = failures(t)
    accepted = t.echo.accepted
    act()

    def counted():
        now = failures(t)
        return now if all(now.get(r, 0) - before.get(r, 0) >= n for r, n in counts.items()) \
            else None

    now = wait_until(counted, timeout, f"/metrics to count {counts}")
    delta = {r: now.get(r, 0) - before.get(r, 0) for r in set(now) | set(before)}
    assert {r: d for r, d in delta.items() if d} == counts, delta
    assert t.echo.accepted == accepted, "db's connectd dialled the app for a refused caller"
    assert tls_echo(t.db.public_port, t.good), "the good caller got no echo afterwards"


def leaf_ctx(t, uri, prefix, **kw):
    return tls_client_context(*make_leaf(t.ca, uri, t.tmp, prefix, **kw), t.roots)


def raw_exchange(port, data, timeout=5, source=None):
    """Sends raw bytes from a fresh connection (from <source> when given), returns what came
    back before the server closed it; fails the test when it stays open."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if source:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.connect((LOOPBACK, port))
        try:
            s.sendall(data)
        except OSError:
            pass
        closed, back = closed_without_data(s, timeout)
    finally:
        s.close()
    assert closed, f"the server kept a connection open after {data[:16]!r}"
    return back


def client_hello(version):
    """A TLS ClientHello record offering only <version> (0x0301: TLS 1.0, 0x0302: TLS 1.1),
    built by hand: the local OpenSSL may refuse to send such a hello at all."""
    suites = bytes.fromhex("c02bc02fc009c013002f0035")
    exts = (bytes.fromhex("000a 0006 0004 001d 0017".replace(" ", ""))  # supported groups
            + bytes.fromhex("000b 0002 0100".replace(" ", "")))  # EC point formats
    body = (version.to_bytes(2, "big") + os.urandom(32) + b"\x00"
            + len(suites).to_bytes(2, "big") + suites + b"\x01\x00"
            + len(exts).to_bytes(2, "big") + exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def ago(**kw):
    return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(**kw)


# --- refused, and counted by reason ----------------------------------------------------------


def test_garbage_bytes_are_not_tls(t):
    def act():
        back = raw_exchange(t.db.public_port, b"\x01\x02\x03\x04\x05 not a TLS record" * 8)
        assert back == b"" or back[0] == 0x15, f"non-alert bytes came back: {back[:40]!r}"
        back = raw_exchange(t.db.public_port, b"GET / HTTP/1.1\r\nHost: db\r\n\r\n")
        assert b"HTTP" not in back
    expect_refused(t, {"not_tls": 2}, act)


def test_tls10_and_tls11_hellos_are_refused(t):
    def act():
        for version in (0x0301, 0x0302):
            back = raw_exchange(t.db.public_port, client_hello(version))
            # One fatal alert record: level 2, description 70 (protocol_version).
            assert len(back) >= 7 and back[0] == 0x15 and back[5:7] == b"\x02\x46", back[:16]
    expect_refused(t, {"protocol_version": 2}, act)


def test_hello_without_client_certificate(t):
    expect_refused(t, {"no_client_cert": 1},
                   lambda: assert_tls_refused(t.db.public_port,
                                              tls_client_context(cafile=t.roots)))


def test_leaf_from_an_unknown_ca(t):
    rogue = make_ca("rogue CA", t.td)
    ctx = tls_client_context(*make_leaf(rogue, t.api.spiffe_id(t.m.name("web")), t.tmp,
                                        "rogue"), t.roots)
    expect_refused(t, {"unknown_ca": 1}, lambda: assert_tls_refused(t.db.public_port, ctx))


def test_expired_and_not_yet_valid_leaves(t):
    web = t.api.spiffe_id(t.m.name("web"))
    expired = leaf_ctx(t, web, "expired", not_before=ago(days=3), not_after=ago(minutes=10))
    early = leaf_ctx(t, web, "early", not_before=ago(days=-1), not_after=ago(days=-3))
    expect_refused(t, {"expired": 1}, lambda: assert_tls_refused(t.db.public_port, expired))
    expect_refused(t, {"not_yet_valid": 1}, lambda: assert_tls_refused(t.db.public_port, early))


def test_several_uri_sans_are_refused(t):
    # Consul reads the first URI, Envoy's RBAC matches any: a leaf with a good service ID
    # first and another ID second must not pass for either reading.
    web, other = t.api.spiffe_id(t.m.name("web")), t.api.spiffe_id(t.m.name("admin"))
    agent = f"spiffe://{t.td}/agent/client/dc/dc1/id/node-1"
    ctxs = [leaf_ctx(t, [web, other], "two-services"), leaf_ctx(t, [web, agent], "svc-agent"),
            leaf_ctx(t, [agent, web], "agent-svc")]

    def act():
        for ctx in ctxs:
            assert_tls_refused(t.db.public_port, ctx)
    expect_refused(t, {"several_uris": 3}, act)


def test_wrong_trust_domain(t):
    other = ("spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/"
             + t.m.name("web"))
    ctx = leaf_ctx(t, other, "other-td")
    expect_refused(t, {"trust_domain": 1}, lambda: assert_tls_refused(t.db.public_port, ctx))


def test_agent_and_mesh_gateway_identities_are_not_callers(t):
    ctxs = [leaf_ctx(t, f"spiffe://{t.td}/agent/client/dc/dc1/id/{t.m.name('node')}", "agent"),
            leaf_ctx(t, f"spiffe://{t.td}/gateway/mesh/dc/dc1", "gateway")]

    def act():
        for ctx in ctxs:
            assert_tls_refused(t.db.public_port, ctx)
    expect_refused(t, {"not_a_service": 2}, act)


# --- logs: escaped, and limited per source ---------------------------------------------------


def assert_not_forged(log):
    forged = [line for line in log.splitlines() if line.startswith(FORGED[:24])]
    assert not forged, f"a peer wrote its own log line: {forged[0]!r}"


def test_caller_uri_with_a_newline_cannot_forge_a_log_line(t):
    # Before the fix: "... src=spiffe://.../svc/x" and then a line of the peer's own.
    uri = f"spiffe://{t.td}/ns/default/dc/dc1/svc/x\n{FORGED}"
    ctx = leaf_ctx(t, uri, "newline")
    expect_refused(t, {"bad_identity": 1}, lambda: assert_tls_refused(t.db.public_port, ctx))
    t.db.proxy.wait_log(r"src=\"spiffe://[^\"]*/svc/x\\n" + re.escape(FORGED) + r"\"")
    assert_not_forged(t.db.proxy.log())


def test_agent_reason_with_a_newline_cannot_forge_a_log_line(t):
    # In authorize mode the agent's Reason goes into the session's line; an agent (or whatever
    # sits at its address) that answers with a newline in it must not write a line either.
    hop = AgentInterposer(t.m.agent.http_addr)
    t.m.apps.append(hop)  # stopped after the connectd processes that talk through it
    hop.authorize_answer = {"Authorized": False, "Reason": f"no\n{FORGED}"}
    svc = t.m.add("authz", app_port=t.m.app(EchoApp).port, start=False,
                  proxy_config={"authorization": "authorize"})
    svc.proxy = t.m.start_connectd(svc.name, ["-sidecar-for", svc.id, "-http-addr",
                                              hop.http_addr, "-log-level", "debug",
                                              "-workers", "2"])
    svc.proxy.wait_port(svc.public_port)
    ctx = leaf_ctx(t, t.api.spiffe_id(t.m.name("web")), "authz-caller")
    denied = re.compile(r"result=denied reason=\"agent authorize: no\\n" + re.escape(FORGED))

    def refused_and_logged():
        assert_tls_refused(svc.public_port, ctx)
        return denied.search(svc.proxy.log())
    wait_until(refused_and_logged, 30, "the agent's denial to be logged")
    assert_not_forged(svc.proxy.log())


class TlsServerApp(TcpApp):
    """A TLS server presenting <cert>/<key> that completes the handshake and closes: a fake
    upstream endpoint with any identity we like."""

    def __init__(self, cert, key):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.handshakes = 0
        super().__init__()

    def handle(self, conn):
        conn.settimeout(10)
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                with self._lock:
                    self.handshakes += 1
                s.recv(1)
        except (ssl.SSLError, OSError):
            pass


def test_server_uri_with_a_newline_cannot_forge_a_log_line(t):
    # web's upstream "fake" is a sidecar registration whose port is a TLS server presenting a
    # leaf of the trusted CA with a newline in its URI: web's connectd logs the mismatch.
    name = t.m.name("fake")
    server = t.m.app(TlsServerApp, *make_leaf(
        t.ca, f"spiffe://{t.td}/ns/default/dc/dc1/svc/{name}\n{FORGED}", t.tmp, "fake-server"))
    t.api.register(sidecar_registration(name, free_port(), server.port))
    t.m.registered.append(name)
    t.api.wait_passing(name, port=server.port)

    def refused_after_handshake():
        raw_exchange(t.web.up["fake"], b"hello\n", timeout=10)
        return server.handshakes > 0
    wait_until(refused_after_handshake, 30, "web's connectd to reach the fake endpoint")
    t.web.proxy.wait_log(r"out endpoint \S+ failed: server identity \"spiffe://[^\"]*/svc/"
                         + re.escape(name) + r"\\n" + re.escape(FORGED) + r"\" is not ")
    assert_not_forged(t.web.proxy.log())


def test_failed_handshake_warnings_are_limited_per_source(t):
    # 200 failed handshakes from one source address (127.0.0.2, which no other test uses):
    # all counted, but only a few WARN lines, which add up to all of them.
    src, n = "127.0.0.2", 200
    offset = len(t.db.proxy.log())
    start = time.monotonic()

    def act():
        for _ in range(n):
            raw_exchange(t.db.public_port, b"\x01\x02\x03\x04\x05 garbage", source=src)
    expect_refused(t, {"not_tls": n}, act, timeout=60)
    took = time.monotonic() - start

    ip = re.escape(src)
    line_rx = re.compile(r"\[WARN\] conn=\d+ in peer=" + ip + r":\d+ .*result=tls_error")
    summary_rx = re.compile(r"\[WARN\] worker \d+: suppressed (\d+) more failed handshake "
                            r"line\(s\) from " + ip + " ")
    note_rx = re.compile(r"\(suppressed (\d+) earlier failed handshake line\(s\) from " + ip)

    def tally():
        warns = [ln for ln in t.db.proxy.log()[offset:].splitlines() if "[WARN]" in ln]
        lines = [ln for ln in warns if line_rx.search(ln)]
        summaries = [ln for ln in warns if summary_rx.search(ln)]
        held = sum(int(x) for ln in warns for x in summary_rx.findall(ln) + note_rx.findall(ln))
        return lines, summaries, held

    # The last second's count is reported when its window ends.
    def all_reported():
        lines, _, held = tally()
        return len(lines) + held >= n

    wait_until(all_reported, 10, "the suppressed failed handshakes to be reported")
    lines, summaries, held = tally()
    print(f"{n} failed handshakes from {src} in {took:.1f}s: {len(lines)} WARN line(s), "
          f"{len(summaries)} summary line(s), {held} held back")
    assert len(lines) + held == n, (len(lines), held)
    # Two workers, each at most one line and one summary per second of the burst (+ edges).
    bound = 2 * 2 * (int(took) + 2)
    assert len(lines) + len(summaries) <= bound, (len(lines), len(summaries), bound)
    assert len(lines) + len(summaries) < n // 4


# --- bounded ---------------------------------------------------------------------------------


class PushApp(TcpApp):
    """Pushes <size> bytes at every connection and never reads. A send that makes no progress
    for <stall> seconds ends the push; `stalled` counts those, `pushed` sums what the kernel
    took from them. The connection is held open until stop()."""

    def __init__(self, size, stall=2.0):
        self.size = size
        self.stall = stall
        self.stalled = 0
        self.pushed = 0
        super().__init__()

    def handle(self, conn):
        conn.settimeout(self.stall)
        block = b"\xa5" * (1 << 20)
        sent = 0
        try:
            while sent < self.size:
                sent += conn.send(block[:min(len(block), self.size - sent)])
        except socket.timeout:
            with self._lock:
                self.stalled += 1
                self.pushed += sent
            self._stop.wait()
        except OSError:
            pass


def test_caller_that_never_reads_keeps_memory_flat(t):
    callers, per_caller = 4, 64 << 20  # 256 MiB offered in all
    push = t.m.app(PushApp, per_caller)
    svc = t.m.add("push", app_port=push.port, start=False)
    # Under ASan freed memory sits in a quarantine of up to 256 MiB, so RSS would measure the
    # bytes relayed, not the memory held: keep it small for this process (release builds have
    # none; CONNECTD_BIN=build/release/connectd runs this test on one).
    t.m.start(svc, env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:quarantine_size_mb=1"})
    t.m.wait_passing(svc)
    good = leaf_ctx(t, t.api.spiffe_id(t.m.name("web")), "push-good")

    def reads_a_mib():
        try:
            with tls_connect(svc.public_port, good, timeout=5) as s:
                return len(recv_exact(s, 1 << 20, 10)) == 1 << 20
        except (OSError, ssl.SSLError):
            return False

    # Warm up (TLS contexts, buffer pools, allocator arenas), then measure.
    wait_until(reads_a_mib, 30, "the push service to answer a good caller")
    for _ in range(3):
        assert reads_a_mib()
    pid = svc.proxy.pid
    before = process_rss_bytes(pid)
    stalled_before = push.stalled
    held = []
    try:
        for _ in range(callers):
            held.append(tls_connect(svc.public_port, good, timeout=10))  # and never read
        wait_until(lambda: push.stalled - stalled_before >= callers, 120,
                   "the app's pushes to stall against callers that never read")
        after = process_rss_bytes(pid)
        print(f"RSS of connectd: {before / 2**20:.1f} MiB before, {after / 2**20:.1f} MiB with "
              f"{callers} x {per_caller >> 20} MiB offered to callers that never read "
              f"(the app got {push.pushed / 2**20:.1f} MiB into its sockets)")
        assert after - before < 16 << 20, (before, after)
        # What the app got rid of sits in socket buffers (up to about 20 MiB a connection on
        # loopback): well short of what it offered.
        assert push.pushed < callers * per_caller // 2, "the pushes did not meet back-pressure"
        # The stalled callers do not stop others from being served.
        assert reads_a_mib(), "a good caller of the push service got nothing"
        assert tls_echo(t.db.public_port, t.good)
    finally:
        for s in held:
            s.close()
