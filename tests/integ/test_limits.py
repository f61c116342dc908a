"""Limits, timeouts and lifecycle of connectd against a real Consul agent (issue 3, "L4
complete"): connection and rate limits, the idle timeout, the maximum connection lifetime,
periodic re-authorization, running out of file descriptors, draining on SIGTERM/SIGINT, and
the workers.

As everywhere in this suite: `web` has an upstream `db`, clients speak plain TCP to web's
upstream port, web's connectd carries it over mTLS to db's connectd, which relays to an app.
Every test would fail without the feature it names; none sleeps for a fixed time.
"""

import os
import re
import resource
import signal
import socket
import time

import pytest

from mesh import (LOOPBACK, EchoApp, SANITIZER_MARKERS, admin_args, admin_get, assert_refused,
                  closed_without_data, echo_roundtrip, port_refuses, recv_all, try_echo,
                  wait_until)


def connect(port, timeout=10):
    return socket.create_connection((LOOPBACK, port), timeout=timeout)


def open_echo(port, tag):
    """A connection through `port` that has carried one echo; the caller closes it."""
    s = connect(port)
    payload = f"hello {tag}\n".encode()
    assert echo_roundtrip(s, payload) == payload, f"connection {tag} did not echo"
    return s


def open_echo_soon(port, tag, timeout=5):
    """open_echo, retried: the agent's TCP health check of db's public port (every second)
    briefly holds one of db's connection slots or tokens too."""
    def attempt():
        try:
            return open_echo(port, tag)
        except (OSError, AssertionError):
            return None
    return wait_until(attempt, timeout, f"connection {tag} to echo", interval=0.1)


def pair(m, db_config=None, web_config=None, db_upstream_config=None, db_args=(), web_args=()):
    """db (behind it an echo app) and web (upstream db), both running; waits until db is
    passing. Returns (echo, db, web)."""
    echo = m.app(EchoApp)
    db = m.add("db", app_port=echo.port, proxy_config=db_config, start=False)
    m.start(db, extra_args=db_args)
    up = {"name": "db", "config": db_upstream_config} if db_upstream_config else "db"
    web = m.add("web", upstreams=(up,), proxy_config=web_config, start=False)
    m.start(web, extra_args=web_args)
    m.wait_passing(db)
    m.wait_echo(web.up["db"])
    return echo, db, web


def count(proxy, pattern):
    return len(re.findall(pattern, proxy.log()))


def stopped_by_test(m, proc):
    """The test stopped `proc` itself and checked its exit: the mesh must not stop it again
    (it would report "had already exited"). Sanitizer reports are still checked here."""
    text = proc.log()
    for marker in SANITIZER_MARKERS:
        assert marker not in text, f"{proc.label}: sanitizer report in log ({marker!r})"
    m.procs.remove(proc)


# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------


def test_max_inbound_connections_holds_across_workers(mesh):
    """max_inbound_connections = 3 with 4 workers: three connections are open (spread over
    the workers by SO_REUSEPORT), the fourth is closed at once after accept and logged; once
    one closes, a new one is let in. A per-worker count would let the fourth through."""
    m = mesh
    echo, db, web = pair(m, db_config={"max_inbound_connections": 3}, db_args=("-workers", "4"))
    held = []
    try:
        # pair()'s echo connections are closed: wait until db has ended every one of them.
        wait_until(lambda: count(db.proxy, r"conn=\d+ in .* result=") >= echo.accepted, 10,
                   "db to end the connections of the setup")
        for i in range(3):
            held.append(open_echo_soon(web.up["db"], i))
        accepted = echo.accepted
        for _ in range(3):
            assert_refused(web.up["db"])
        assert echo.accepted == accepted, "a connection over the limit reached the app"
        db.proxy.wait_log(r"refused connection from \S+ on the public listener: "
                          r"max_inbound_connections 3 reached")
        db.proxy.wait_log(r"WARN.*refusing connections on the public listener")
        for s in held:
            assert echo_roundtrip(s, b"still here\n") == b"still here\n"
        held.pop().close()
        m.wait_echo(web.up["db"], timeout=10, what="a new connection once one of three closed")
    finally:
        for s in held:
            s.close()


def test_upstream_max_connections(mesh):
    """limits.max_connections = 2 on web's upstream (the nested Consul form {"limits":
    {"max_connections": 2}}): the third concurrent connection to web's upstream port is
    closed at once by web; db never sees it."""
    m = mesh
    echo, db, web = pair(m, db_upstream_config={"limits": {"max_connections": 2}})
    held = []
    try:
        held = [open_echo(web.up["db"], i) for i in range(2)]
        before = count(db.proxy, r"conn=\d+ in ")
        assert_refused(web.up["db"])
        web.proxy.wait_log(r"refused connection from \S+ on upstream %s: "
                           r"limits.max_connections 2 reached" % db.name)
        assert count(db.proxy, r"conn=\d+ in ") == before, "the refused connection reached db"
        held.pop().close()
        m.wait_echo(web.up["db"], timeout=10, what="a new connection once one of two closed")
    finally:
        for s in held:
            s.close()


def burst(port, n):
    """Opens n connections as fast as possible, each asking for an echo; returns how many
    echoed."""
    socks, ok = [], 0
    try:
        for _ in range(n):
            socks.append(connect(port))
        for i, s in enumerate(socks):
            try:
                ok += echo_roundtrip(s, b"burst %d\n" % i) == b"burst %d\n" % i
            except OSError:
                pass
    finally:
        for s in socks:
            s.close()
    return ok


def test_new_connection_rate_on_upstream_listener(mesh):
    """max_new_connections_per_second = 1 with burst 3 on web's upstream: of 8 connections
    opened at once, about 3 get through (one more per second elapsed) and the rest are
    closed at once and logged; after a pause the bucket has refilled."""
    m = mesh
    _, db, web = pair(m, db_upstream_config={"max_new_connections_per_second": 1,
                                             "max_new_connections_burst": 3})
    # The setup's echo spent tokens, so the bucket holds at most 3 now.
    start = time.monotonic()
    ok = burst(web.up["db"], 8)
    took = time.monotonic() - start
    assert ok <= 3 + took + 1, f"{ok} of 8 got through in {took:.1f}s"
    web.proxy.wait_log(r"refused connection from \S+ on upstream %s: over "
                       r"max_new_connections_per_second 1 \(burst 3\)" % db.name)
    web.proxy.wait_log(r"WARN.*refusing connections on upstream %s" % db.name)
    m.wait_echo(web.up["db"], timeout=10, what="traffic once the bucket refills")


def test_new_connection_rate_on_public_listener(mesh):
    """max_new_connections_per_second = 2, burst 2 on db's Proxy.Config: a burst of 8
    connections through web gets at most 2 (+2 per elapsed second) to db's app; db logs the
    refusals. (The agent's health check spends about one token a second too.)"""
    m = mesh
    echo, db, web = pair(m, db_config={"max_new_connections_per_second": 2,
                                       "max_new_connections_burst": 2})
    accepted = echo.accepted
    start = time.monotonic()
    ok = burst(web.up["db"], 8)
    took = time.monotonic() - start
    assert ok <= 2 + 2 * took + 1, f"{ok} of 8 got through in {took:.1f}s"
    assert echo.accepted - accepted == ok
    db.proxy.wait_log(r"refused connection from \S+ on the public listener: over "
                      r"max_new_connections_per_second 2 \(burst 2\)")


# --------------------------------------------------------------------------------------------
# Timeouts
# --------------------------------------------------------------------------------------------


def keep_busy(s, seconds):
    """Echoes a little every 100 ms for `seconds`; asserts the connection stays up."""
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        payload = b"busy %d\n" % i
        assert echo_roundtrip(s, payload) == payload, f"a busy connection was cut after {i}"
        i += 1
        time.sleep(0.1)  # pacing the traffic, not waiting for a condition


def wait_closed(s, timeout):
    start = time.monotonic()
    closed, data = closed_without_data(s, timeout)
    return closed, data, time.monotonic() - start


def test_inbound_idle_timeout(mesh):
    """local_idle_timeout_ms = 600 on db: a connection that keeps talking outlives it, one
    that falls silent is closed by db about 600 ms later and logged as idle."""
    m = mesh
    args, admin_port = admin_args()
    _, db, web = pair(m, db_config={"local_idle_timeout_ms": 600}, db_args=args)
    with open_echo(web.up["db"], "idle") as s:
        keep_busy(s, 1.5)
        closed, data, took = wait_closed(s, 5)
    assert closed and data == b"", "a silent connection outlived local_idle_timeout_ms by 5 s"
    assert took >= 0.4, f"closed {took:.2f}s after the last byte, before the idle timeout"
    db.proxy.wait_log(r"conn=\d+ in .*result=idle_timeout reason=\"idle for \d+ ms "
                      r"\(local_idle_timeout_ms 600\)\"")
    # The close is counted under its kind (the session result table says which results are
    # timeout closes and under which label).
    status, body = admin_get(admin_port, "/metrics")
    assert status == 200, body
    assert ("# HELP connectd_timeout_closes_total Sessions ended by the idle timeout or the "
            "lifetime bound, by kind.\n# TYPE connectd_timeout_closes_total counter\n"
            "connectd_timeout_closes_total{kind=\"idle\"} 1\n"
            "connectd_timeout_closes_total{kind=\"lifetime\"} 0\n") in body, body


def test_upstream_idle_timeout(mesh):
    """idle_timeout_ms = 600 on web's upstream: web closes the silent connection (and db,
    without an idle timeout of its own, sees it end)."""
    m = mesh
    _, db, web = pair(m, db_upstream_config={"idle_timeout_ms": 600})
    with open_echo(web.up["db"], "idle") as s:
        keep_busy(s, 1.2)
        closed, data, took = wait_closed(s, 5)
    assert closed and data == b"", "a silent connection outlived idle_timeout_ms by 5 s"
    assert took >= 0.4, f"closed {took:.2f}s after the last byte, before the idle timeout"
    web.proxy.wait_log(r"conn=\d+ out .*result=idle_timeout reason=\"idle for \d+ ms "
                       r"\(idle_timeout_ms 600\)\"")


@pytest.mark.parametrize("side", ["inbound", "outbound"])
def test_max_connection_lifetime(mesh, side):
    """max_connection_lifetime_ms = 1000 (on db for inbound, on web for outbound): even a
    busy connection is closed once it is that old."""
    m = mesh
    cfg = {"max_connection_lifetime_ms": 1000}
    _, db, web = pair(m, db_config=cfg if side == "inbound" else None,
                      web_config=cfg if side == "outbound" else None)
    proxy, direction = (db.proxy, "in") if side == "inbound" else (web.proxy, "out")
    with open_echo(web.up["db"], "old") as s:
        start = time.monotonic()
        i = 0
        cut = False
        while time.monotonic() - start < 5:
            payload = b"still young %d\n" % i
            try:
                if echo_roundtrip(s, payload, 2) != payload:
                    cut = True
                    break
            except OSError:
                cut = True
                break
            i += 1
            time.sleep(0.05)
        took = time.monotonic() - start
    assert cut, "a busy connection outlived max_connection_lifetime_ms=1000 by 4 s"
    assert took >= 0.7, f"cut after {took:.2f}s, before its lifetime"
    proxy.wait_log(r"conn=\d+ %s .*result=lifetime reason=\"max_connection_lifetime_ms 1000 "
                   r"reached\"" % direction)


def test_periodic_reauthorization(mesh):
    """reauthorize_interval_ms = 200 on db: every worker re-evaluates its open inbound
    connections every 200 ms even though the intentions do not change; an allowed
    connection stays open through it."""
    m = mesh
    _, db, web = pair(m, db_config={"reauthorize_interval_ms": 200})
    with open_echo(web.up["db"], "reauth") as s:
        db.proxy.wait_log(r"periodic re-authorization checked 1 session\(s\), closed 0")
        seen = count(db.proxy, r"periodic re-authorization checked")
        wait_until(lambda: count(db.proxy, r"periodic re-authorization checked") >= seen + 6, 5,
                   "more periodic re-authorizations")
        assert echo_roundtrip(s, b"still allowed\n") == b"still allowed\n"


# --------------------------------------------------------------------------------------------
# Running out of file descriptors
# --------------------------------------------------------------------------------------------


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_emfile_pauses_accepting_instead_of_spinning(mesh):
    """With RLIMIT_NOFILE lowered to just above what db's connectd has open, connections
    beyond it make accept() fail with EMFILE. connectd must pause the listener (a log line
    and a 100 ms pause, not a busy loop on the still-readable listener), keep its open
    connections, and accept again once descriptors are free."""
    m = mesh
    _, db, web = pair(m, db_config={"handshake_timeout_ms": 60000})
    pid = db.proxy.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    held = []
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 4,
                                                       hard))
        # Plain TCP connections to the public port that never start TLS: each one accepted
        # holds a descriptor until the (long) handshake timeout.
        held = [connect(db.public_port) for _ in range(16)]
        db.proxy.wait_log(r"accept on \S+: Too many open files; pausing 100 ms")
        pauses = count(db.proxy, r"Too many open files; pausing")
        cpu = cpu_seconds(pid)
        window = time.monotonic()
        time.sleep(1.0)  # a measuring window, not a wait for a condition
        window = time.monotonic() - window
        cpu = cpu_seconds(pid) - cpu
        pauses = count(db.proxy, r"Too many open files; pausing") - pauses
        assert pauses <= 2 * 15 * window, f"{pauses} EMFILE pauses in {window:.1f}s: spinning"
        assert cpu < 0.5 * window, f"{cpu:.2f}s of CPU in {window:.1f}s at EMFILE: spinning"
        assert db.proxy.alive()
    finally:
        for s in held:
            s.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    m.wait_echo(web.up["db"], timeout=15, what="traffic once descriptors are free again")


# --------------------------------------------------------------------------------------------
# Lifecycle: draining on SIGTERM / SIGINT
# --------------------------------------------------------------------------------------------


def test_sigterm_drains_open_connections_and_refuses_new(mesh):
    """SIGTERM to web's connectd: its listeners close at once (new connections are refused)
    while a large transfer started before the signal runs to its end through the draining
    proxy; then connectd exits 0 by itself, well within -drain-timeout."""
    m = mesh
    _, db, web = pair(m, web_args=("-drain-timeout", "20s"))
    proc = web.proxy
    chunk = os.urandom(256 * 1024)
    with open_echo(web.up["db"], "drain") as s:
        s.sendall(chunk)  # the transfer starts before the signal...
        sent_at = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        proc.wait_log(r"received Terminated; closing listeners and draining open connections "
                      r"for up to 20000 ms")
        wait_until(lambda: port_refuses(web.up["db"]), 5, "web's upstream port to refuse")
        # ...and goes on after it: 8 MiB in both directions through the draining proxy.
        got = bytearray()
        s.settimeout(10)
        for _ in range(32):
            while len(got) < len(chunk):
                got += s.recv(len(chunk) - len(got))
            assert bytes(got) == chunk, "the transfer was corrupted while draining"
            got.clear()
            s.sendall(chunk)
        assert proc.alive(), "connectd exited while a connection was still open"
        s.shutdown(socket.SHUT_WR)
        rest = recv_all(s, 10)
        assert rest == chunk, "the last part of the transfer was lost"
    rc = proc.proc.wait(10)
    took = time.monotonic() - sent_at
    assert rc == 0, f"exit status {rc} after draining"
    assert took < 20, f"exit {took:.1f}s after SIGTERM"
    proc.wait_log(r"drained: every connection has finished; stopping")
    proc.wait_log(r"conn=\d+ out .*result=ok")
    stopped_by_test(m, proc)


def test_sigint_drain_is_bounded(mesh):
    """SIGINT with -drain-timeout 1s and a connection that never ends: connectd closes it
    when the drain time is over and exits 0 promptly."""
    m = mesh
    _, db, web = pair(m, web_args=("-drain-timeout", "1s"))
    proc = web.proxy
    with open_echo(web.up["db"], "stuck") as s:
        start = time.monotonic()
        proc.proc.send_signal(signal.SIGINT)
        rc = proc.proc.wait(10)
        took = time.monotonic() - start
        closed, _ = closed_without_data(s, 5)
    assert rc == 0, f"exit status {rc} after the drain timeout"
    assert 0.8 <= took < 4, f"exited {took:.2f}s after SIGINT with -drain-timeout 1s"
    assert closed, "the open connection was not closed when connectd stopped"
    proc.wait_log(r"drain timeout \(1000 ms\) over with connections open")
    proc.wait_log(r"conn=\d+ out .*result=shutdown")
    stopped_by_test(m, proc)


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


def test_workers_default_to_online_cpus(mesh):
    """Without -workers, connectd runs one worker per online CPU."""
    m = mesh
    echo = m.app(EchoApp)
    db = m.add("db", app_port=echo.port, start=False)
    db.proxy = m.start_connectd(db.name, ["-sidecar-for", db.id, "-http-addr",
                                          m.agent.http_addr, "-log-level", "debug"])
    db.proxy.wait_port(db.public_port)
    cpus = min(256, max(1, os.sysconf("SC_NPROCESSORS_ONLN")))
    db.proxy.wait_log(r"connectd starting: agent \S+, %d worker\(s\)" % cpus)


def test_connections_spread_over_workers_each_reauthorizing_its_own(mesh):
    """With 4 workers, connections are spread over them (SO_REUSEPORT); when a deny
    intention arrives, each worker closes its own open connections."""
    m = mesh
    _, db, web = pair(m, db_args=("-workers", "4"))
    held = []
    try:
        held = [open_echo(web.up["db"], i) for i in range(16)]
        m.intend("db", {"web": "deny"})
        for s in held:
            closed, _ = closed_without_data(s, 10)
            assert closed, "an open connection outlived the deny"
        rx = r"worker (\d+): intentions changed; closed (\d+) connection"
        wait_until(lambda: sum(int(n) for _, n in re.findall(rx, db.proxy.log())) == 16, 5,
                   "the workers to report 16 closed connections")
        workers = {w for w, _ in re.findall(rx, db.proxy.log())}
        assert len(workers) >= 2, f"all 16 connections were on worker(s) {workers}"
    finally:
        for s in held:
            s.close()
