#!/usr/bin/env python3
"""The soak (issue 12): a mesh of sidecars under steady traffic for N minutes while the world
around it changes, with every allowed byte checked and every connectd watched for leaks.

    python3 tests/soak/soak.py --minutes 2        (make soak SOAK_MINUTES=2)

What runs: one Consul server that keeps its state in a data directory (so it can be restarted
and come back with the same CA, services and intentions), and four services with connectd
sidecars (the ASan build unless CONNECTD_BIN says otherwise):

    client  no application; upstreams echo (tcp), web (http) and rpc (grpc)
    echo    L4: a TCP echo application
    web     L7 http: an HTTP/1.1 application that answers each request with its body
    rpc     L7 grpc: a grpcio server whose one method answers with its request

Seven client threads call the upstreams at a steady rate (--rate per thread): three open L4
connections with random payloads that must come back byte for byte (SHA-256 compared), two
send HTTP/1.1 keep-alive requests and two make gRPC calls (one at a time, or three at once on
the same connection) with random bodies checked the same way. Meanwhile, on a schedule: the
intentions of all three destinations flip to deny and back (a call refused while deny is in
force, or within GRACE of a flip, counts as refused, not as an error), the CA rotates to a
root we generate, a second instance of echo or web comes (with its own sidecar) and goes, and
the agent restarts twice (once SIGTERM, once SIGKILL).

Every few seconds each connectd's RSS, open descriptors and snapshot generation are sampled.
Checks at the end: no failed call outside a deny window, no corrupt byte, every connectd alive
throughout and exiting 0 on SIGTERM with no sanitizer report in its log; RSS and descriptors
flat after warm-up (the last third's max within RSS_TOLERANCE / FD_TOLERANCE of the first
post-warm-up third's max) and descriptors back to their idle baseline once traffic stops; the
snapshot generation never moves in a quiet interval (no event for QUIET seconds, QUIET_ROTATION
after a CA rotation). The summary
goes to stdout and build/soak-report.md; the exit status is 1 when any check failed.
"""

import argparse
import collections
import hashlib
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integ"))

import mesh  # noqa: E402
from mesh import (LOOPBACK, SANITIZER_MARKERS, ConsulAgent, Connectd, EchoApp,  # noqa: E402
                  TcpApp, admin_get, free_port, make_ca, metric, parse_metrics,
                  sidecar_registration, wait_until)

REPO = mesh.REPO
SAMPLE_EVERY = 3.0       # seconds between samples of each connectd
GRACE = 5.0              # seconds after a flip in which either outcome is accepted
QUIET = 15.0             # seconds after an event ends before the generation must stay put
# ... after a CA rotation: the agent re-signs each leaf at a random point of the 30 s after it
# sees the new root (caChangeJitterWindow in Consul's agent/leafcert), a new snapshot then.
QUIET_ROTATION = 45.0
QUIET_MOVES_PER = 50     # quiet intervals per generation change allowed (at least one change)
RSS_TOLERANCE = 0.10     # last third's max RSS over the first post-warm-up third's max
RSS_SLACK = 4 << 20      # ... plus this many bytes (allocator and ASan granularity)
FD_TOLERANCE = 0.25      # same for descriptors, plus FD_SLACK
FD_SLACK = 4
FD_SETTLE = 45.0         # seconds to wait for descriptors back to baseline (pool idle is 30 s)
# A small quarantine, so ASan's freed-memory quarantine is full during warm-up instead of
# growing RSS through the whole run (256 MB by default).
ASAN_OPTIONS = "detect_leaks=1:abort_on_error=0:quarantine_size_mb=16"

# --- the applications ----------------------------------------------------------------------


class BodyEchoApp(TcpApp):
    """HTTP/1.1 keep-alive server: every request is answered 200 with its own body and
    X-Body-Sha256, the hash of the body as received."""

    def handle(self, conn):
        buf = bytearray()
        while True:
            head = mesh._read_head(conn, buf, 1 << 20)
            if head is None:
                return
            _, *rest = head.split(b"\r\n")
            headers = mesh._split_fields(rest)
            te = ",".join(mesh.header_values(headers, "transfer-encoding")).lower()
            if "chunked" in te:
                body = mesh._read_chunked(conn, buf)
            else:
                n = int((mesh.header_values(headers, "content-length") or ["0"])[0])
                body = mesh._read_n(conn, buf, n)
            h = hashlib.sha256(body).hexdigest()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"X-Body-Sha256: %s\r\nContent-Length: %d\r\n\r\n%s"
                         % (h.encode(), len(body), body))


def grpc_echo_server():
    import grpc
    handler = grpc.method_handlers_generic_handler("soak.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req),
    })
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port(f"{LOOPBACK}:0")
    srv.start()
    return srv, port


# --- bookkeeping ---------------------------------------------------------------------------


class Stats:
    """Counters of the traffic, the events and the failures, shared by every thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.c = collections.Counter()
        self.errors = collections.Counter()
        self.refused = collections.Counter()
        self.error_samples = []
        self.events = []  # (start, end, kind, detail)
        self.deny = []  # [deny_time, allow_time or None]

    def add(self, **kw):
        with self.lock:
            self.c.update(kw)

    def event(self, kind, start, detail=""):
        with self.lock:
            self.events.append((start, time.monotonic(), kind, detail))

    def in_deny(self, t0, t1):
        """True when [t0, t1] meets a deny window (from its flip to GRACE after its end)."""
        with self.lock:
            for d, a in self.deny:
                if t1 >= d and t0 <= (a if a is not None else float("inf")) + GRACE:
                    return True
        return False

    def settled_deny(self, t0, t1):
        """True when [t0, t1] lies wholly inside a deny window, GRACE after its flip."""
        with self.lock:
            for d, a in self.deny:
                if t0 >= d + GRACE and (a is None or t1 <= a):
                    return True
        return False

    def nearest_event(self, t):
        with self.lock:
            best = None
            for s, e, kind, detail in self.events:
                dist = 0 if s <= t <= e else min(abs(t - s), abs(t - e))
                if best is None or dist < best[0]:
                    best = (dist, kind, detail, s)
        return best

    def fail(self, kind, reason, t0, t1, refused_ok=True, detail=""):
        """A call that did not complete: refused inside a deny window, an error otherwise."""
        if refused_ok and self.in_deny(t0, t1):
            with self.lock:
                self.refused[kind] += 1
            return
        self.error(f"{kind}: {reason}", t0, detail)

    def error(self, reason, t0, detail=""):
        near = self.nearest_event(t0)
        with self.lock:
            self.errors[reason] += 1
            if len(self.error_samples) < 30:
                where = (f" ({near[1]} {near[2]} {t0 - near[3]:+.1f}s)" if near else "")
                self.error_samples.append(f"t={t0 - T0:.1f}s {reason}{where} {detail}"[:300])

    def allowed(self, kind, t0, t1):
        """A call that went through: an error when it happened well inside a deny window."""
        if self.settled_deny(t0, t1):
            self.error(f"{kind}: allowed while denied", t0)


T0 = time.monotonic()


class Pacer:
    """Spaces calls at <rate> per second from the thread's start, whatever each call took."""

    def __init__(self, rate, stop):
        self.period = 1.0 / rate
        self.next = time.monotonic() + random.random() * self.period
        self.stop = stop

    def wait(self):
        self.next += self.period
        now = time.monotonic()
        if self.next < now - 5 * self.period:  # fell far behind: do not burst to catch up
            self.next = now
        return not self.stop.wait(max(0.0, self.next - now))


# --- traffic -------------------------------------------------------------------------------


def l4_worker(port, rate, stop, st, rng):
    pacer = Pacer(rate, stop)
    while pacer.wait():
        t0 = time.monotonic()
        got_any = False
        try:
            with socket.create_connection((LOOPBACK, port), timeout=10) as s:
                st.add(l4_connections=1)
                for _ in range(rng.randint(1, 3)):
                    payload = rng.randbytes(rng.randint(1, 128 << 10))
                    s.sendall(payload)
                    back = mesh.recv_exact(s, len(payload), timeout=10)
                    got_any = got_any or bool(back)
                    if back != payload:
                        t1 = time.monotonic()
                        if payload.startswith(back):
                            st.fail("l4", "short echo" if back else "closed without data",
                                    t0, t1, detail=f"{len(back)}/{len(payload)} bytes")
                        else:
                            st.error("l4: corrupt echo", t0,
                                     f"sha {hashlib.sha256(back).hexdigest()[:12]} != "
                                     f"{hashlib.sha256(payload).hexdigest()[:12]}")
                        break
                    st.add(l4_rounds=1, l4_bytes=2 * len(payload))
                else:
                    s.shutdown(socket.SHUT_WR)
                    rest = mesh.recv_all(s, timeout=10)
                    if rest:
                        st.error("l4: bytes after the echo", t0)
                    else:
                        st.allowed("l4", t0, time.monotonic())
        except (socket.timeout, TimeoutError):
            st.fail("l4", "timeout", t0, time.monotonic())
        except OSError as e:
            reason = "reset" if got_any or isinstance(e, ConnectionResetError) else type(e).__name__
            st.fail("l4", reason, t0, time.monotonic(), detail=str(e))


def http_worker(port, rate, stop, st, rng):
    pacer = Pacer(rate, stop)
    conn = None
    per_conn = 0
    while pacer.wait():
        t0 = time.monotonic()
        try:
            if conn is None or per_conn >= rng.randint(5, 40):
                if conn is not None:
                    conn.close()
                conn = mesh.HttpConn(port, timeout=10)
                per_conn = 0
                st.add(http_connections=1)
            body = rng.randbytes(rng.randint(0, 32 << 10))
            r = conn.request("POST", "/soak", [("Content-Type", "application/octet-stream")],
                             body)
            per_conn += 1
            t1 = time.monotonic()
            if r is None:
                conn.close()
                conn = None
                st.fail("http", "closed without a response", t0, t1)
                continue
            if r.status == 403:
                st.fail("http", "403", t0, t1)
                continue
            if r.status != 200:
                st.fail("http", f"status {r.status}", t0, t1, refused_ok=False,
                        detail=r.body[:120])
                continue
            want = hashlib.sha256(body).hexdigest()
            if r.header("X-Body-Sha256") != want or hashlib.sha256(r.body).hexdigest() != want:
                st.error("http: body checksum", t0)
                continue
            st.add(http_requests=1, http_bytes=len(body) + len(r.body))
            st.allowed("http", t0, t1)
        except (OSError, ValueError) as e:
            if conn is not None:
                conn.close()
                conn = None
            st.fail("http", type(e).__name__, t0, time.monotonic(), detail=str(e))
    if conn is not None:
        conn.close()


def grpc_worker(port, rate, stop, st, rng, concurrent=1):
    """gRPC calls on one connection of the thread's own: one at a time, or <concurrent> at
    once (so a snapshot change meets streams in flight: connectd sends GOAWAY then)."""
    import grpc
    pacer = Pacer(rate, stop)
    # A connection of its own (grpcio shares one between channels to an address by default).
    ch = grpc.insecure_channel(f"{LOOPBACK}:{port}",
                               options=[("grpc.use_local_subchannel_pool", 1)])
    call = ch.unary_unary("/soak.Echo/Echo")
    st.add(grpc_channels=1)
    try:
        while pacer.wait():
            t0 = time.monotonic()
            payloads = [rng.randbytes(rng.randint(0, 64 << 10)) for _ in range(concurrent)]
            calls = [call.future(p, timeout=10) for p in payloads]
            for payload, f in zip(payloads, calls):
                try:
                    back = f.result()
                except grpc.RpcError as e:
                    code = e.code()
                    t1 = time.monotonic()
                    if code == grpc.StatusCode.PERMISSION_DENIED:
                        st.fail("grpc", "PERMISSION_DENIED", t0, t1)
                    else:
                        st.fail("grpc", code.name, t0, t1, detail=str(e.details())[:120])
                    continue
                if hashlib.sha256(back).digest() != hashlib.sha256(payload).digest():
                    st.error("grpc: body checksum", t0)
                    continue
                st.add(grpc_calls=1, grpc_bytes=2 * len(payload))
                st.allowed("grpc", t0, time.monotonic())
    finally:
        ch.close()


# --- the mesh ------------------------------------------------------------------------------


class Soak:
    def __init__(self, args):
        self.args = args
        self.workdir = os.path.abspath(args.workdir)
        self.binary = mesh.connectd_binary()
        self.st = Stats()
        self.stop_traffic = threading.Event()
        self.stop_all = threading.Event()
        self.threads = []
        self.apps = []
        self.grpc_servers = []
        self.procs = []        # every connectd started, for the final checks
        self.main = {}         # service -> Connectd (the four long-lived sidecars)
        self.admin = {}        # label -> admin port
        self.samples = collections.defaultdict(list)  # label -> [(t, rss, fds, gen)]
        self.baseline_fds = {}
        self.extra = {}        # service -> (sid, Connectd, app) of the second instance
        self.problems = []
        self.gen_moves = []    # generation changes in quiet intervals, described
        self.stopped = []      # connectd processes stopped (and their logs checked) already
        self.planned_restarts = 0
        self.agent = None
        self.events_thread = None

    # --- set-up ---

    def start_agent(self):
        consul = os.popen(os.path.join(REPO, "scripts", "consul") + " path").read().strip()
        if not consul:
            raise RuntimeError("scripts/consul path printed nothing")
        self.agent = ConsulAgent(consul, os.path.join(self.workdir, "agent"),
                                 ["limits { http_max_conns_per_client = 1000 }"],
                                 data_dir=os.path.join(self.workdir, "agent", "data"))
        self.agent.start(timeout=90)
        self.api = self.agent.api

    def connectd(self, label, sid, workers):
        port = free_port()
        args = ["-sidecar-for", sid, "-http-addr", self.agent.http_addr, "-log-level", "info",
                "-workers", str(workers), "-admin-bind", f"{LOOPBACK}:{port}",
                "-drain-timeout", "5s"]
        p = Connectd(self.binary, args, os.path.join(self.workdir, f"connectd-{label}.log"),
                     f"connectd[{label}]", {"ASAN_OPTIONS": ASAN_OPTIONS})
        self.procs.append(p)
        self.admin[label] = port
        return p.start()

    def register(self, name, app_port, public, upstreams=(), sid=None, passing=True):
        body = sidecar_registration(name, app_port, public, upstreams, service_id=sid)
        if passing:
            # Restored as passing after an agent restart too, instead of critical until the
            # first check runs (which would empty every endpoint list for a second).
            body["Connect"]["SidecarService"]["Checks"][0]["Status"] = "passing"
        self.api.register(body)

    def build_mesh(self):
        for name, proto in (("web", "http"), ("rpc", "grpc")):
            self.api.set_service_defaults(name, proto)
        echo = EchoApp()
        web = BodyEchoApp()
        rpc, rpc_port = grpc_echo_server()
        self.apps += [echo, web]
        self.grpc_servers.append(rpc)
        self.app_port = {"echo": echo.port, "web": web.port, "rpc": rpc_port}
        self.public = {}
        for name in ("echo", "web", "rpc"):
            self.public[name] = free_port()
            self.register(name, self.app_port[name], self.public[name])
        self.up = {n: free_port() for n in ("echo", "web", "rpc")}
        self.public["client"] = free_port()
        self.register("client", free_port(), self.public["client"],
                      [{"name": n, "port": p} for n, p in self.up.items()])
        for name in ("echo", "web", "rpc", "client"):
            self.main[name] = self.connectd(name, name, 2)
        for name, p in self.main.items():
            p.wait_port(self.public[name], timeout=60)
        for port in self.up.values():
            self.main["client"].wait_port(port, timeout=60)
        for name in ("echo", "web", "rpc"):
            self.api.wait_passing(name, port=self.public[name], timeout=60)
            self.api.set_intentions(name, {"client": "allow"})
        # Each upstream answers once before the traffic starts.
        wait_until(lambda: mesh.try_echo(self.up["echo"]), 60, "an echo through the mesh")
        wait_until(lambda: (mesh.try_http(self.up["web"], "POST", "/", body=b"x") or
                            mesh.HttpResponse(0, "", [], b"")).status == 200, 60,
                   "an HTTP answer through the mesh")
        wait_until(self.grpc_ok, 60, "a gRPC answer through the mesh", interval=0.2)

    def grpc_ok(self):
        import grpc
        with grpc.insecure_channel(f"{LOOPBACK}:{self.up['rpc']}") as ch:
            try:
                return ch.unary_unary("/soak.Echo/Echo")(b"ping", timeout=5) == b"ping"
            except grpc.RpcError:
                return False

    # --- sampling ---

    def sample_one(self, label, proc):
        pid = proc.pid
        rss = mesh.process_rss_bytes(pid)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        try:
            gen = metric(parse_metrics(admin_get(self.admin[label], "/metrics")[1]),
                         "connectd_snapshot_generation")
        except OSError:
            gen = None
        return rss, fds, gen

    def sampler(self):
        while not self.stop_all.wait(SAMPLE_EVERY):
            for label, p in list(self.main.items()):
                t = time.monotonic()
                if not p.alive():
                    self.problems.append(f"{p.label} exited with {p.proc.returncode} during "
                                         f"the run")
                    del self.main[label]
                    continue
                try:
                    self.samples[label].append((t, *self.sample_one(label, p)))
                except OSError:
                    pass
            for name, (sid, p, _) in list(self.extra.items()):
                if not p.alive():
                    self.problems.append(f"{p.label} exited with {p.proc.returncode} during "
                                         f"the run")

    # --- events ---

    def flip(self, action):
        t = time.monotonic()
        with self.st.lock:
            if action == "deny":
                self.st.deny.append([t, None])
            else:
                self.st.deny[-1][1] = t
        for name in ("echo", "web", "rpc"):
            self.api.set_intentions(name, {"client": action})
        self.st.c["flips_" + action] += 1
        self.st.event("flip", t, action)

    def rotate(self):
        t = time.monotonic()
        n = self.st.c["rotations"] + 1
        ca = make_ca(f"Soak Root {n}", self.api.trust_domain())
        self.api.set_ca(ca.cert_pem, ca.key_pem)
        self.st.c["rotations"] += 1
        self.st.event("rotate", t, f"root {n}")

    def add_instance(self, name):
        t = time.monotonic()
        n = self.st.c["instances_added"] + 1
        app = EchoApp() if name == "echo" else BodyEchoApp()
        self.apps.append(app)
        sid = f"{name}-{n + 1}"
        public = free_port()
        self.register(name, app.port, public, sid=sid, passing=False)
        p = self.connectd(sid, sid, 1)
        p.wait_port(public, timeout=60)
        self.api.wait_passing(name, port=public, timeout=60)
        self.extra[name] = (sid, p, app)
        self.st.c["instances_added"] += 1
        self.st.event("instance+", t, sid)

    def remove_instance(self, name):
        t = time.monotonic()
        sid, p, app = self.extra.pop(name)
        self.api.deregister(sid)
        # Calls already routed to it finish; the callers' sidecars drop the endpoint.
        wait_until(lambda: all(e["Service"]["ID"] != sid + "-sidecar-proxy"
                               for e in self.api.health_connect(name, passing=False)), 30,
                   f"{sid} gone from the catalog")
        time.sleep(3)
        self.stopped.append(p)
        self.problems += p.stop()
        app.stop()
        self.st.c["instances_removed"] += 1
        self.st.event("instance-", t, sid)

    def restart_agent(self, hard):
        t = time.monotonic()
        if hard:
            self.agent.kill()
        else:
            self.agent.stop()
        self.agent.start(timeout=90)
        self.st.c["agent_restarts"] += 1
        self.st.event("restart", t, "SIGKILL" if hard else "SIGTERM")

    def schedule(self, start, end):
        """(time, action) pairs spread evenly over [start, end): cycles of deny, allow, a
        second instance added, a CA rotation, that instance removed (at least two cycles,
        more on a long run, one about every two minutes), with the two agent restarts
        between cycles about 1/3 and 2/3 of the way (when no second instance exists)."""
        active = end - start
        cycle = ["deny", "allow", "add", "rotate", "remove"]
        cycles = max(2, int(active / 120))
        plan = []
        for i in range(cycles):
            plan += cycle
        # Restarts go at cycle boundaries (after a "remove"), nearest 1/3 and 2/3.
        term = max(1, round(cycles / 3))
        kill = max(term + 1, round(2 * cycles / 3))
        plan.insert(kill * len(cycle), "restart-kill")
        plan.insert(term * len(cycle), "restart-term")
        slot = active / len(plan)
        return [(start + i * slot, a) for i, a in enumerate(plan)]

    def run_events(self, plan):
        which = 0
        for at, action in plan:
            if self.stop_all.wait(max(0.0, at - time.monotonic())):
                return
            try:
                if action in ("deny", "allow"):
                    self.flip(action)
                elif action == "rotate":
                    self.rotate()
                elif action == "add":
                    self.add_instance(("echo", "web")[which % 2])
                elif action == "remove":
                    self.remove_instance(("echo", "web")[which % 2])
                    which += 1
                elif action.startswith("restart"):
                    self.restart_agent(action == "restart-kill")
            except Exception as e:  # noqa: BLE001 - a failed event fails the run, not the thread
                self.problems.append(f"event {action} failed: {e}")
        # Leave the mesh as it started: allowed, one instance each.
        if self.st.deny and self.st.deny[-1][1] is None:
            self.flip("allow")
        for name in list(self.extra):
            self.remove_instance(name)

    # --- the run ---

    def traffic(self):
        rng = random.Random(self.args.seed)
        r = self.args.rate
        kinds = [(l4_worker, self.up["echo"], {})] * 3 + \
                [(http_worker, self.up["web"], {})] * 2 + \
                [(grpc_worker, self.up["rpc"], {}), (grpc_worker, self.up["rpc"],
                                                     {"concurrent": 3})]
        for i, (fn, port, kw) in enumerate(kinds):
            t = threading.Thread(target=fn, name=f"{fn.__name__}-{i}",
                                 args=(port, r, self.stop_traffic, self.st,
                                       random.Random(rng.random())), kwargs=kw, daemon=True)
            self.threads.append(t)
            t.start()

    def run(self):
        total = self.args.minutes * 60
        warmup = max(20.0, total * 0.15)
        cooldown = 20.0
        os.makedirs(self.workdir, exist_ok=True)
        print(f"soak: {self.args.minutes:g} min, connectd {self.binary}, logs in {self.workdir}",
              flush=True)
        self.start_agent()
        self.build_mesh()
        # The idle baseline of descriptors: everything up, no traffic.
        time.sleep(2)
        for label, p in self.main.items():
            self.baseline_fds[label] = self.sample_one(label, p)[1]
        sampler = threading.Thread(target=self.sampler, daemon=True)
        sampler.start()
        self.t_start = time.monotonic()
        self.traffic()
        plan = self.schedule(self.t_start + warmup, self.t_start + total - cooldown)
        self.warmup_end = self.t_start + warmup
        self.planned_restarts = sum(1 for _, a in plan if a.startswith("restart"))
        events = self.events_thread = threading.Thread(target=self.run_events, args=(plan,),
                                                       daemon=True)
        events.start()
        last = 0
        while time.monotonic() < self.t_start + total:
            time.sleep(1)
            el = time.monotonic() - self.t_start
            if el - last >= 30:
                last = el
                with self.st.lock:
                    print(f"soak: {el:.0f}s calls l4={self.st.c['l4_connections']} "
                          f"http={self.st.c['http_requests']} grpc={self.st.c['grpc_calls']} "
                          f"errors={sum(self.st.errors.values())}", flush=True)
        events.join(300)
        self.stop_traffic.set()
        for t in self.threads:
            t.join(30)
        self.t_traffic_end = time.monotonic()
        # Descriptors back to the idle baseline once pooled connections time out.
        self.end_fds = {}
        deadline = time.monotonic() + FD_SETTLE
        for label, p in list(self.main.items()):
            fds = None
            while True:
                try:
                    fds = len(os.listdir(f"/proc/{p.pid}/fd"))
                except OSError:
                    break
                if fds <= self.baseline_fds[label] or time.monotonic() > deadline:
                    break
                time.sleep(1)
            self.end_fds[label] = fds
        self.stop_all.set()
        sampler.join(10)

    def shutdown(self):
        """Stops everything this run started; safe to call twice and after a failure."""
        self.stop_traffic.set()
        self.stop_all.set()
        # An event under way (an agent restart, an instance starting) finishes first, so
        # nothing it starts outlives the run.
        if self.events_thread is not None:
            self.events_thread.join(150)
        for t in self.threads:
            t.join(15)
        for p in self.procs:
            if p not in self.stopped:
                self.stopped.append(p)
                self.problems += p.stop()
        for a in self.apps:
            a.stop()
        for s in self.grpc_servers:
            s.stop(0)
        if self.agent is not None:
            self.agent.stop()

    # --- the verdict ---

    def exits(self):
        """({exit status or "killed": count}, logs with a sanitizer report) of every connectd
        this run started (all stopped by now)."""
        exits = collections.Counter(
            "killed" if p.killed else str(p.returncode) for p in self.procs)
        reports = sum(1 for p in self.procs if any(m in p.log() for m in SANITIZER_MARKERS))
        return exits, reports

    def verdict(self):
        checks = []  # (ok, text)
        st = self.st
        exits, reports = self.exits()
        checks.append((reports == 0, f"connectd logs with a sanitizer or leak report: {reports}"))
        checks.append((set(exits) == {"0"}, "every connectd exited 0 after SIGTERM"))
        e = sum(st.errors.values())
        checks.append((e == 0, f"failed calls outside deny windows: {e}"))
        checks.append((st.c["l4_rounds"] > 0 and st.c["http_requests"] > 0 and
                       st.c["grpc_calls"] > 0, "traffic of every kind went through"))
        checks.append((st.c["flips_deny"] == 0 or sum(st.refused.values()) > 0,
                       "deny windows refused calls"))
        checks.append((st.c["agent_restarts"] == self.planned_restarts,
                       f"agent restarts: {st.c['agent_restarts']} of "
                       f"{self.planned_restarts} planned"))
        checks.append((not self.problems, "connectd exits, sanitizer logs and events clean"
                       + ("" if not self.problems else ": " + "; ".join(self.problems))))
        rows = []
        for label in ("client", "echo", "web", "rpc"):
            s = [x for x in self.samples[label] if x[0] >= self.warmup_end]
            if len(s) < 6:
                checks.append((False, f"{label}: only {len(s)} samples after warm-up"))
                continue
            k = len(s) // 3
            first, last = s[:k], s[-k:]
            rss1, rss3 = max(x[1] for x in first), max(x[1] for x in last)
            fd1, fd3 = max(x[2] for x in first), max(x[2] for x in last)
            rss_ok = rss3 <= rss1 * (1 + RSS_TOLERANCE) + RSS_SLACK
            fd_ok = fd3 <= fd1 * (1 + FD_TOLERANCE) + FD_SLACK
            end_fd = self.end_fds.get(label)
            back_ok = end_fd is not None and end_fd <= self.baseline_fds[label]
            checks.append((rss_ok, f"{label}: RSS flat (last third max {rss3 >> 20} MiB vs "
                                   f"first {rss1 >> 20} MiB)"))
            checks.append((fd_ok, f"{label}: descriptors flat (last third max {fd3} vs "
                                  f"first {fd1})"))
            checks.append((back_ok, f"{label}: descriptors back to baseline "
                                    f"({end_fd} vs {self.baseline_fds[label]})"))
            # Generation: no change between two samples in a quiet stretch.
            moved = quiet = 0
            ev = st.events
            for a, b in zip(self.samples[label], self.samples[label][1:]):
                busy = any(s0 <= b[0] and e0 + (QUIET_ROTATION if k == "rotate" else QUIET)
                           >= a[0] for s0, e0, k, _ in ev)
                if busy or a[3] is None or b[3] is None:
                    continue
                quiet += 1
                if a[3] != b[3]:
                    moved += 1
                    last = max((e for e in ev if e[1] <= a[0]), key=lambda e: e[1],
                               default=None)
                    self.gen_moves.append(
                        f"{label}: generation {a[3]:.0f} -> {b[3]:.0f} between "
                        f"t={a[0] - self.t_start:.0f}s and t={b[0] - self.t_start:.0f}s"
                        + (f", {a[0] - last[1]:.0f}s after {last[2]} {last[3]} ended"
                           if last else ""))
            # The agent changes things of its own now and then (a check's output synced minutes
            # after registration republishes an unchanged endpoint set): a few moves are
            # allowed, a generation that climbs between events is not.
            allowed = max(1, quiet // QUIET_MOVES_PER)
            checks.append((moved <= allowed, f"{label}: snapshot generation still between "
                                             f"events ({moved} moves in {quiet} quiet sample "
                                             f"intervals, at most {allowed})"))
            all_s = self.samples[label]
            rows.append((label, all_s[0][1], s[-1][1], max(x[1] for x in s),
                         self.baseline_fds[label], all_s[0][2], max(x[2] for x in s), end_fd,
                         all_s[0][3], all_s[-1][3]))
        return checks, rows

    def save_samples(self):
        """The raw samples and events, for a look after the run (build/soak/samples.json)."""
        out = {"t_start": self.t_start, "warmup_end": self.warmup_end,
               "events": [list(e) for e in self.st.events],
               "samples": {k: [list(x) for x in v] for k, v in self.samples.items()}}
        with open(os.path.join(self.workdir, "samples.json"), "w") as f:
            json.dump(out, f)

    def report(self, checks, rows, elapsed):
        st = self.st
        c = st.c
        ok = all(x for x, _ in checks)
        mib = 1 << 20
        lines = [
            f"# Soak report ({'PASSED' if ok else 'FAILED'})",
            "",
            f"Duration {elapsed / 60:.1f} min (traffic {self.args.minutes:g} min), connectd "
            f"`{os.path.relpath(self.binary, REPO)}`, rate {self.args.rate:g}/s per client "
            f"thread (3 L4, 2 HTTP, 2 gRPC: one with 3 calls at a time), seed "
            f"{self.args.seed}.",
            "",
            "| traffic | count | bytes (both ways) |",
            "|---|---:|---:|",
            f"| L4 connections (echo) | {c['l4_connections']} ({c['l4_rounds']} checked "
            f"rounds) | {c['l4_bytes']} |",
            f"| HTTP requests (web) | {c['http_requests']} on {c['http_connections']} "
            f"connections | {c['http_bytes']} |",
            f"| gRPC calls (rpc) | {c['grpc_calls']} | {c['grpc_bytes']} |",
            "",
            f"Events: {c['flips_deny']} deny flips and {c['flips_allow']} allow flips, "
            f"{c['rotations']} CA rotations, {c['agent_restarts']} agent restarts, "
            f"{c['instances_added']} instances added and {c['instances_removed']} removed.",
            "",
            "Refused during deny windows (expected): " +
            (", ".join(f"{k} {v}" for k, v in sorted(st.refused.items())) or "none") + ".",
            "",
            "Errors by reason: " +
            (", ".join(f"{k}: {v}" for k, v in sorted(st.errors.items())) or "none") + ".",
            "",
            "| connectd | RSS start | RSS end | RSS max after warm-up | fds idle | fds start "
            "| fds max | fds end (idle) | generation start | generation end |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(f"| {r[0]} | {r[1] / mib:.1f} MiB | {r[2] / mib:.1f} MiB | "
                         f"{r[3] / mib:.1f} MiB | {r[4]} | {r[5]} | {r[6]} | {r[7]} | "
                         f"{r[8]:.0f} | {r[9]:.0f} |")
        exits, reports = self.exits()
        lines += ["", f"connectd processes: {len(self.procs)} ({len(rows)} sidecars for the "
                      f"whole run, {len(self.procs) - len(rows)} of second instances); exit "
                      f"statuses after SIGTERM: "
                      + ", ".join(f"{k} x{v}" for k, v in sorted(exits.items()))
                      + f"; logs with a sanitizer report: {reports}."]
        lines += ["", "Checks:", ""]
        lines += [f"* {'ok  ' if x else 'FAIL'} {t}" for x, t in checks]
        if self.gen_moves:
            lines += ["", "Generation changes in quiet intervals:", ""]
            lines += [f"* {x}" for x in self.gen_moves[:20]]
        if st.error_samples:
            lines += ["", "First errors (time, reason, nearest event):", ""]
            lines += [f"* {x}" for x in st.error_samples]
        total_calls = c["l4_connections"] + c["http_requests"] + c["grpc_calls"]
        total_bytes = c["l4_bytes"] + c["http_bytes"] + c["grpc_bytes"]
        summary = (f"soak: {'PASSED' if ok else 'FAILED'} {elapsed / 60:.1f} min, "
                   f"{total_calls} calls, {total_bytes / mib:.0f} MiB checked, "
                   f"{sum(st.errors.values())} errors, "
                   f"{sum(1 for x, _ in checks if not x)} of {len(checks)} checks failed")
        lines += ["", summary, ""]
        text = "\n".join(lines)
        os.makedirs(os.path.join(REPO, "build"), exist_ok=True)
        with open(os.path.join(REPO, "build", "soak-report.md"), "w") as f:
            f.write(text)
        print(text, flush=True)
        return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--rate", type=float, default=4.0, help="calls per second per thread")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--workdir", default=os.path.join(REPO, "build", "soak"))
    args = ap.parse_args()
    if os.path.isdir(args.workdir):
        import shutil
        shutil.rmtree(args.workdir)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    soak = Soak(args)
    t0 = time.monotonic()
    ok = False
    try:
        soak.run()
        soak.shutdown()
        checks, rows = soak.verdict()
        soak.save_samples()
        ok = soak.report(checks, rows, time.monotonic() - t0)
    except KeyboardInterrupt:
        print("soak: interrupted; stopping everything", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - any failure ends the run with everything stopped
        import traceback
        traceback.print_exc()
        print(f"soak: FAILED: {e}", flush=True)
    finally:
        soak.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
