"""What an idle connection costs each sidecar of a pair in private memory (issue 11, item 5).

A pair (web -> mTLS -> db -> echo app) of release builds (ASan's redzones and quarantine would
measure ASan) carries N connections; each echoes one line, so both legs are up and every buffer
the relay and OpenSSL used has been used once, then they sit idle. The growth of each sidecar's
USS (Private_* of /proc/<pid>/smaps_rollup) divided by N is the cost of an idle connection.

Measured on OpenSSL 3.0 (N=1000): 15.9 KiB inbound and 23 KiB outbound before the read buffer
was freed while waiting (the outbound end kept OpenSSL's ~17 KiB read buffer), 15.9 and 15.8
after. massif attributes what is left, per connection: the SSL object itself (one 7 KiB
allocation in SSL_new), the record ciphers (1.8 KiB), the session (0.9 KiB), the tls_conn
(0.5 KiB; 64 bytes since its error text is made at the first failure), the SSL_SESSION and
OpenSSL's small objects (~2.5 KiB); the relay holds no buffer.
So the issue's bar of 8 KiB is not reachable while each connection owns an OpenSSL 3.0 SSL
object; this test guards what is reached: at most 19 KiB (a 3 KiB margin for allocator noise
over the measured 15.9; the outbound cost before the fix was 23).
N=300 keeps the test within a few seconds; IDLE_MEM_CONNS=1000 measures as the issue did.
"""

import os
import socket
import subprocess
import time

from mesh import LOOPBACK, REPO, EchoApp, recv_exact, wait_until

BAR_BYTES = 19 * 1024


def smaps_rollup(pid):
    """The lines of /proc/<pid>/smaps_rollup that give a size, in bytes, by their name."""
    sizes = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            fields = rest.split()
            if len(fields) == 2 and fields[1] == "kB":
                sizes[name] = int(fields[0]) * 1024
    return sizes


def uss_bytes(pid):
    """Private memory of <pid>: the Private_* lines of /proc/<pid>/smaps_rollup."""
    return sum(v for k, v in smaps_rollup(pid).items() if k.startswith("Private_"))


def anonymous_bytes(pid):
    """Anonymous memory of <pid> (heap, arenas, stacks, written library data): the Anonymous
    line of /proc/<pid>/smaps_rollup. Unlike USS it leaves out library text pages, which
    fault-around maps into one process or another from one run to the next."""
    return smaps_rollup(pid)["Anonymous"]


def release_binary(configured):
    """The release build beside the configured one (the integration default is ASan)."""
    if "/asan/" not in configured:
        return configured
    path = os.path.join(REPO, "build", "release", "connectd")
    assert os.access(path, os.X_OK), f"{path} missing: build it with `make VARIANT=release`"
    return path


def release_pair(m, db_config=None):
    """db behind an echo app and web with upstream db, both release builds, an echo through
    them; returns (web, db, {label: pid} of the two sidecars)."""
    m.binary = release_binary(m.binary)
    app = m.app(EchoApp)
    db = m.add("db", app_port=app.port, proxy_config=db_config)
    web = m.add("web", upstreams=("db",))
    m.wait_passing(db)
    m.wait_echo(web.up["db"])
    return web, db, {"inbound (db)": db.proxy.pid, "outbound (web)": web.proxy.pid}


def test_idle_connection_private_memory(mesh):
    m = mesh
    n = int(os.environ.get("IDLE_MEM_CONNS", "300"))
    web, db, pids = release_pair(m)

    def open_and_echo(count):
        out = []
        for i in range(count):
            s = socket.create_connection((LOOPBACK, web.up["db"]), timeout=10)
            line = b"idle %d\n" % i
            s.sendall(line)
            assert recv_exact(s, len(line), 10) == line
            out.append(s)
        return out

    # A few connections first: contexts, pools and the allocator's first arenas.
    for s in open_and_echo(16):
        s.close()
    before = {k: uss_bytes(p) for k, p in pids.items()}
    held = open_and_echo(n)
    try:
        after = {k: uss_bytes(p) for k, p in pids.items()}
        per = {k: (after[k] - before[k]) / n for k in pids}
        for k in pids:
            print(f"{k}: USS {before[k] / 1024:.0f} KiB idle, {after[k] / 1024:.0f} KiB with "
                  f"{n} idle connections: {per[k] / 1024:.2f} KiB per connection")
        for k in pids:
            assert per[k] <= BAR_BYTES, (
                f"{k}: {per[k] / 1024:.2f} KiB of private memory per idle connection "
                f"(guard {BAR_BYTES // 1024} KiB; before {before[k]}, after {after[k]}, n {n})")
    finally:
        for s in held:
            s.close()
    # The pair still serves once they are gone.
    m.wait_echo(web.up["db"])


UPSTREAM_BAR_BYTES = 64 * 1024


def test_upstream_private_memory(mesh):
    """What one more upstream costs an idle sidecar in private memory: its listener, its two
    watches (health and discovery chain, each a blocking query in flight) and its limits.
    Before, each cost 77-85 KiB: a 32 KiB per-source table in every upstream's limit state
    (which only the public listener uses), written through at creation, and libcurl's 16 KiB
    receive buffer per request in flight; now 32-50 KiB, most of it libcurl's handle,
    connection and buffers, ~12 KiB per watch. Measured over 16 upstreams (to services with
    no instance, which answer at once), so that the pages a process happens to touch weigh
    little."""
    m = mesh
    m.binary = release_binary(m.binary)
    app = m.app(EchoApp)
    db = m.add("db", app_port=app.port)
    m.wait_passing(db)
    extra = 16
    uss = {}
    for n in (0, extra):
        svc = m.add(f"many{n}", upstreams=["db"] + [f"nothing{n}x{i}" for i in range(n)],
                    start=False)
        m.start(svc, extra_args=("-workers", "1"))
        m.wait_echo(svc.up["db"])
        time.sleep(1.5)  # the first answers of every watch are in, the start-up is over
        uss[n] = uss_bytes(svc.proxy.pid)
    per = (uss[extra] - uss[0]) / extra
    print(f"USS {uss[0] / 1024:.0f} KiB with one upstream, {uss[extra] / 1024:.0f} KiB with "
          f"{extra + 1}: {per / 1024:.1f} KiB per upstream")
    assert per <= UPSTREAM_BAR_BYTES, (
        f"{per / 1024:.1f} KiB of private memory per upstream (bar "
        f"{UPSTREAM_BAR_BYTES // 1024} KiB; {uss[0]} with one, {uss[extra]} with {extra + 1})")


WORKER_BAR_BYTES = 128 * 1024


def test_worker_memory(mesh):
    """What one more worker costs an idle sidecar in anonymous memory: its thread's stack and
    malloc arena, its loop and its listeners. Each worker's statistics (64 listener and 256
    source slots, ~105 KiB, almost all of it unused) came from the heap, where calloc() wrote
    every page: one more worker cost 160-200 KiB. They are mapped now, so a slot costs a page
    only once it is used (55-100 KiB per worker). Measured between 1 and 3 workers; anonymous
    memory rather than USS, whose share of library text pages moves by tens of KiB a run."""
    m = mesh
    m.binary = release_binary(m.binary)
    app = m.app(EchoApp)
    db = m.add("db", app_port=app.port)
    m.wait_passing(db)
    anon = {}
    for n in (1, 3):
        svc = m.add(f"workers{n}", upstreams=["db"], start=False)
        m.start(svc, extra_args=("-workers", str(n)))
        m.wait_echo(svc.up["db"])
        time.sleep(1.5)  # the first answers of every watch are in, the start-up is over
        anon[n] = anonymous_bytes(svc.proxy.pid)
    per = (anon[3] - anon[1]) / 2
    print(f"anonymous {anon[1] / 1024:.0f} KiB with one worker, {anon[3] / 1024:.0f} KiB with "
          f"three: {per / 1024:.1f} KiB per worker")
    assert per <= WORKER_BAR_BYTES, (
        f"{per / 1024:.1f} KiB of anonymous memory per worker (bar {WORKER_BAR_BYTES // 1024} "
        f"KiB; {anon[1]} with one, {anon[3]} with three)")


SILENT_BAR_BYTES = 3 * 1024


def accepted(port):
    """Connections to loopback <port> that a process accepted and holds open: established, with
    a socket inode (one still in the listen queue has none; one refused is closed at once)."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if (int(fields[1].split(":")[1], 16) == port and fields[3] == "01"
                    and fields[9] != "0"):
                n += 1
    return n


def test_silent_connection_holds_no_tls_state(mesh):
    """A caller that connects and sends nothing (the agent's TCP health check, or a slowloris
    until handshake_timeout_ms) gets no TLS object until its first byte: each costs the
    session's own few hundred bytes, where an SSL object made at accept cost ~8 KiB (and
    ~130k instructions to make and free, every second, for the agent's check)."""
    m = mesh
    n = int(os.environ.get("IDLE_MEM_CONNS", "300"))
    web, db, _ = release_pair(m, {"max_pending_handshakes_per_source": 4 * n,
                                  "handshake_timeout_ms": 60000})
    pid = db.proxy.pid
    before = uss_bytes(pid)
    held = []
    try:
        for _ in range(n):
            held.append(socket.create_connection((LOOPBACK, db.public_port), timeout=10))
        wait_until(lambda: accepted(db.public_port) >= n, 30,
                   f"db to accept {n} silent connections")
        after = uss_bytes(pid)
        per = (after - before) / n
        print(f"inbound (db): USS {before / 1024:.0f} KiB, {after / 1024:.0f} KiB with {n} "
              f"silent connections: {per / 1024:.2f} KiB per connection")
        assert per <= SILENT_BAR_BYTES, (
            f"{per / 1024:.2f} KiB of private memory per silent connection "
            f"(bar {SILENT_BAR_BYTES // 1024} KiB; before {before}, after {after}, n {n})")
    finally:
        for s in held:
            s.close()
    m.wait_echo(web.up["db"])


RETAINED_BAR_BYTES = 3 * 1024 * 1024


def test_memory_returns_after_a_crowd_leaves(mesh):
    """A crowd of connections opened at once (S6's pattern: 100 connects, then one round trip
    each) and then closed must not leave the outbound sidecar at its high-water mark. Their
    SSL objects and sessions (~20 KiB each) were freed into the worker's arena between what
    still lives, and glibc gives back only a thread heap's free top: 300 connections left
    ~7 MB private for good (1,000 left 20 MB), until the worker trims once half its peak of
    sessions has gone (session.c, on_trim). What stays is the client's kept sessions and the
    pages they and the contexts pin (~1.9 MB at N=300). The inbound side is reported, not
    bounded: its stateful session cache keeps one session per handshake (up to 1,024)."""
    m = mesh
    n = int(os.environ.get("IDLE_MEM_CONNS", "300"))
    web, db, pids = release_pair(m)
    before = {k: uss_bytes(p) for k, p in pids.items()}
    held = []
    try:
        for i in range(n):
            held.append(socket.create_connection((LOOPBACK, web.up["db"]), timeout=10))
            if len(held) % 100 == 0 or i == n - 1:
                batch = held[len(held) - (len(held) % 100 or 100):]
                for s in batch:
                    s.sendall(b"x" * 64)
                for s in batch:
                    assert recv_exact(s, 64, 10) == b"x" * 64
        top = {k: uss_bytes(p) for k, p in pids.items()}
    finally:
        for s in held:
            s.close()
    out_pid = pids["outbound (web)"]
    retained = {}

    def trimmed():
        retained["out"] = uss_bytes(out_pid) - before["outbound (web)"]
        return retained["out"] <= RETAINED_BAR_BYTES

    ok = True
    try:
        wait_until(trimmed, 10, "the outbound sidecar to give back the crowd's memory")
    except AssertionError:
        ok = False
    after = {k: uss_bytes(p) for k, p in pids.items()}
    for k in pids:
        print(f"{k}: USS {before[k] / 1024:.0f} KiB idle, {top[k] / 1024:.0f} KiB with {n} "
              f"connections, {after[k] / 1024:.0f} KiB after they closed")
    assert ok, (f"outbound: {retained['out'] / 1024:.0f} KiB of private memory still held "
                f"10 s after {n} connections closed (bar {RETAINED_BAR_BYTES // 1024} KiB; "
                f"{(top['outbound (web)'] - before['outbound (web)']) / 1024:.0f} KiB while "
                f"they were open)")
    m.wait_echo(web.up["db"])


# What may stay once idle again, per side: measured 460-500 KiB outbound (the client's kept
# sessions and pages they pin) and 710-770 KiB inbound (also the server's session cache, one
# entry per handshake); 1,340-1,380 KiB each before the pool was freed.
POOL_BAR_BYTES = {"inbound (db)": 1024 * 1024, "outbound (web)": 768 * 1024}


def test_pooled_relay_buffers_go_back_when_idle(mesh):
    """A few busy connections (fewer than a crowd: no trim for that) fill each worker's pool of
    relay buffers (up to 32 x 16 KiB); once the worker has had no session for a second the pool
    is freed and trimmed. Before, an idle sidecar kept the pool of its busiest moment for good
    (up to 0.5 MB per worker, against the 2 MB idle bar)."""
    m = mesh
    web, db, pids = release_pair(m)
    before = {k: uss_bytes(p) for k, p in pids.items()}
    data = b"y" * (256 * 1024)
    held = [socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) for _ in range(40)]
    try:
        for _ in range(2):
            for s in held:
                s.sendall(data[:16384])
            for s in held:
                s.setblocking(False)
            # Everything in flight at once: each end of each connection holds buffers.
            pending = {s: len(data) - 16384 for s in held}
            got = {s: 0 for s in held}
            while any(got[s] < len(data) for s in held):
                for s in held:
                    if pending[s] > 0:
                        try:
                            pending[s] -= s.send(data[:pending[s]])
                        except BlockingIOError:
                            pass
                    try:
                        got[s] += len(s.recv(65536))
                    except BlockingIOError:
                        pass
            for s in held:
                s.setblocking(True)
        top = {k: uss_bytes(p) for k, p in pids.items()}
    finally:
        for s in held:
            s.close()
    grown = {}

    def idle_again():
        for k, p in pids.items():
            grown[k] = uss_bytes(p) - before[k]
        return all(v <= POOL_BAR_BYTES[k] for k, v in grown.items())

    ok = True
    try:
        wait_until(idle_again, 10, "both sidecars to give back their relay buffers")
    except AssertionError:
        ok = False
    for k in pids:
        print(f"{k}: USS {before[k] / 1024:.0f} KiB idle, {top[k] / 1024:.0f} KiB busy, "
              f"{(before[k] + grown[k]) / 1024:.0f} KiB idle again")
    assert ok, (f"private memory still held 10 s after 40 busy connections closed: "
                f"{ {k: v // 1024 for k, v in grown.items()} } KiB (bars "
                f"{ {k: v // 1024 for k, v in POOL_BAR_BYTES.items()} } KiB)")
    m.wait_echo(web.up["db"])


def test_gnutls_stays_uninitialized(connectd_bin):
    """GnuTLS comes in only as a dependency of libcurl's dependencies (librtmp) and connectd
    never calls it, but its library constructor set itself up at load: ~105 KiB of heap in
    every sidecar, a twentieth of its idle private memory. main.c's _gnutls_global_init_skip()
    tells it not to. With GNUTLS_DEBUG_LEVEL set, that set-up logs its steps ("gnutls[2]:
    getrandom random generator was selected", ...) before main() runs; without the skip,
    `-version` printed them."""
    env = dict(os.environ, GNUTLS_DEBUG_LEVEL="2")
    out = subprocess.run([connectd_bin, "-version"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert "connectd" in out.stdout
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("gnutls[")]
    assert not lines, "GnuTLS initialized itself at load:\n" + "\n".join(lines[:5])
