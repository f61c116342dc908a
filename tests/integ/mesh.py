"""Building blocks for the integration tests: free loopback ports, a real Consul dev agent,
its HTTP API, small in-process TCP apps, connectd processes, and certificates.

Everything here binds to 127.0.0.1 only, never uses a fixed port, and waits on conditions
with deadlines instead of sleeping for fixed times. The pytest fixtures in conftest.py own
the lifetimes; this module does not depend on pytest (scripts/demo uses it too).
"""

import datetime
import hashlib
import http.client
import itertools
import json
import os
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOOPBACK = "127.0.0.1"

# ---------------------------------------------------------------------------------------------
# Waiting
# ---------------------------------------------------------------------------------------------


def wait_until(cond, timeout, what, interval=0.05):
    """Calls cond() until it returns something truthy and returns that; fails the test with
    `what` in the message when `timeout` seconds pass first. Exceptions from cond propagate."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------------------------

_used_ports = set()
_ports_lock = threading.Lock()


def _bindable(port, udp_too=False):
    kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if udp_too else [])
    for kind in kinds:
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def _port_span():
    """Where free ports are drawn from: below the kernel's ephemeral range, so a port a test
    frees (an agent it restarts on the same ports) is not taken meanwhile by some outgoing
    connection's local end. None when that span is too small to draw from."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            eph_lo = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    lo = 10000
    return (lo, eph_lo) if eph_lo - lo >= 4000 else None


_PORT_SPAN = _port_span()


def free_port(udp_too=False):
    """A loopback port that was free a moment ago and that no other caller in this run got.
    With udp_too the same number must also be free for UDP (Consul's serf and DNS ports)."""
    with _ports_lock:
        for _ in range(400):
            if _PORT_SPAN is not None:
                port = random.randrange(*_PORT_SPAN)
                if port in _used_ports or not _bindable(port, udp_too):
                    continue
            else:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((LOOPBACK, 0))
                port = s.getsockname()[1]
                s.close()
                if port in _used_ports or (udp_too and not _bindable(port, udp_too=True)):
                    continue
            _used_ports.add(port)
            return port
    raise RuntimeError("no free loopback port found")


def free_port_range(n):
    """n consecutive ports below the kernel's ephemeral range that are free now (for Consul's
    sidecar and expose ranges, which it only hands out and never binds itself)."""
    lo, hi = _PORT_SPAN or (20000, 32000)
    with _ports_lock:
        for _ in range(200):
            base = random.randrange(lo, hi - n)
            ports = range(base, base + n)
            if any(p in _used_ports for p in ports):
                continue
            if all(_bindable(p) for p in ports):
                _used_ports.update(ports)
                return base, base + n - 1
    raise RuntimeError(f"no free range of {n} ports found")


def port_accepts(port, host=LOOPBACK, timeout=1.0):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_refuses(port, host=LOOPBACK, timeout=1.0):
    """True when a connect gets ECONNREFUSED (nobody listens), False when it is accepted."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def log_tail(path, lines=60):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:])


def process_rss_bytes(pid):
    """The resident set size of process <pid> (VmRSS of /proc/<pid>/status), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def stop_process(proc, term_timeout=10.0):
    """SIGTERM, wait, then SIGKILL. Returns (returncode, killed)."""
    if proc.poll() is not None:
        return proc.returncode, False
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(term_timeout), False
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10), True


# ---------------------------------------------------------------------------------------------
# Consul agent and its HTTP API
# ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, method, path, status, body):
        super().__init__(f"{method} {path}: HTTP {status}: {body.strip()[:500]}")
        self.status = status
        self.body = body


class AgentApi:
    """A tiny client for the agent's HTTP API: JSON in, JSON out, errors raise ApiError."""

    def __init__(self, http_addr, token=None):
        self.http_addr = http_addr
        self.base = "http://" + http_addr
        self.token = token  # sent as X-Consul-Token when set (ACL-enabled agents)

    def call(self, method, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("X-Consul-Token", self.token)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise ApiError(method, path, e.code, e.read().decode("utf-8", "replace")) from None
        if not raw.strip():
            return None
        return json.loads(raw)

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def put(self, path, body=None, **kw):
        return self.call("PUT", path, body, **kw)

    def delete(self, path, **kw):
        return self.call("DELETE", path, **kw)

    # --- readiness, CA ---

    def leader(self):
        return self.get("/v1/status/leader")

    def roots(self):
        return self.get("/v1/agent/connect/ca/roots")

    def trust_domain(self):
        return self.roots()["TrustDomain"]

    def active_root(self):
        r = self.roots()
        return next(x for x in r["Roots"] if x["ID"] == r["ActiveRootID"])

    def roots_pem(self):
        return "".join(x["RootCert"] for x in self.roots()["Roots"])

    def leaf(self, service):
        return self.get("/v1/agent/connect/ca/leaf/" + urllib.parse.quote(service))

    def ca_config(self):
        return self.get("/v1/connect/ca/configuration")

    def set_ca(self, root_pem, key_pem):
        """Makes a root we generated (and whose key we hold) the active CA root. Consul keeps
        the old roots listed (inactive) and cross-signs the new one with the old key."""
        body = {"Provider": "consul", "Config": {"PrivateKey": key_pem, "RootCert": root_pem}}
        self.put("/v1/connect/ca/configuration", body)
        # The agent's roots endpoint is served from its cache, which follows the servers a
        # moment later: wait until it shows the new active root.
        wait_until(lambda: self.active_root()["RootCert"].strip() == root_pem.strip(), 30,
                   "the agent to list the new CA root as active")

    def spiffe_id(self, service, dc="dc1", ns="default"):
        return f"spiffe://{self.trust_domain()}/ns/{ns}/dc/{dc}/svc/{service}"

    # --- services ---

    def register(self, body):
        self.put("/v1/agent/service/register", body)

    def deregister(self, service_id):
        self.put("/v1/agent/service/deregister/" + urllib.parse.quote(service_id))

    def service(self, service_id):
        return self.get("/v1/agent/service/" + urllib.parse.quote(service_id))

    def health_connect(self, service, passing=True):
        q = "?passing" if passing else ""
        return self.get("/v1/health/connect/" + urllib.parse.quote(service) + q)

    def wait_passing(self, service, port=None, timeout=30):
        """Waits until /v1/health/connect/<service>?passing lists an instance (on `port` when
        given) and returns the list."""

        def ok():
            entries = self.health_connect(service)
            if port is None:
                return entries
            return [e for e in entries if e["Service"]["Port"] == port]

        return wait_until(ok, timeout, f"a passing connect instance of {service!r}"
                          + (f" on port {port}" if port else ""), interval=0.1)

    # --- intentions ---

    def set_intentions(self, destination, sources):
        """Writes the service-intentions config entry for `destination`; sources is a dict
        {source_name: "allow"|"deny"} and replaces whatever the entry held."""
        body = {
            "Kind": "service-intentions",
            "Name": destination,
            "Sources": [{"Name": s, "Action": a} for s, a in sources.items()],
        }
        if self.put("/v1/config", body) is not True:
            raise AssertionError(f"config write of intentions for {destination} returned false")

    def delete_intentions(self, destination):
        self.delete("/v1/config/service-intentions/" + urllib.parse.quote(destination))

    def intention_allowed(self, source, destination):
        q = urllib.parse.urlencode({"source": source, "destination": destination})
        return self.get("/v1/connect/intentions/check?" + q)["Allowed"]

    # --- config entries (L7) ---

    def set_config_entry(self, body):
        """PUT /v1/config; fails unless the agent answers true."""
        if self.put("/v1/config", body) is not True:
            raise AssertionError(f"config write of {body.get('Kind')}/{body.get('Name')} "
                                 f"returned false")

    def config_entry(self, kind, name):
        """The stored entry, or None when there is none (404)."""
        try:
            return self.get(f"/v1/config/{kind}/" + urllib.parse.quote(name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def delete_config_entry(self, kind, name):
        self.delete(f"/v1/config/{kind}/" + urllib.parse.quote(name))

    def set_service_defaults(self, name, protocol, **fields):
        """service-defaults for <name> with Protocol (and more top-level fields)."""
        self.set_config_entry({"Kind": "service-defaults", "Name": name, "Protocol": protocol,
                               **fields})

    def set_l7_intentions(self, destination, sources):
        """Writes the service-intentions entry for <destination> from a list of source dicts
        as the config entry has them ({"Name", "Action"} or {"Name", "Permissions"}, and
        optionally "Description"), replacing whatever the entry held."""
        self.set_config_entry({"Kind": "service-intentions", "Name": destination,
                               "Sources": list(sources)})

    def set_mesh(self, request_normalization=None, **http):
        """Writes the mesh config entry with HTTP.Incoming.RequestNormalization (a dict of its
        JSON fields) and more HTTP fields. The entry has no Name field (the agent refuses
        one); it is read and deleted as mesh/mesh."""
        h = dict(http)
        if request_normalization is not None:
            h["Incoming"] = {"RequestNormalization": request_normalization}
        self.set_config_entry({"Kind": "mesh", "HTTP": h})


def sidecar_registration(name, app_port, sidecar_port, upstreams=(), proxy_config=None,
                         service_id=None):
    """The body of PUT /v1/agent/service/register for a service with a sidecar.

    The sidecar gets the public port we chose, address 127.0.0.1, and one fast TCP check on
    that port instead of the agent's default 10 s check, so health follows the proxy within
    about a second. upstreams: iterable of dicts {"name", "port", "config"(optional),
    "fields"(optional: more Upstream fields, e.g. DestinationType; a None value drops one)}."""
    proxy = {
        "Upstreams": [
            {k: v for k, v in {
                "DestinationName": u["name"],
                "LocalBindAddress": LOOPBACK,
                "LocalBindPort": u["port"],
                **({"Config": u["config"]} if u.get("config") else {}),
                **(u.get("fields") or {}),
            }.items() if v is not None}
            for u in upstreams
        ]
    }
    if proxy_config:
        proxy["Config"] = proxy_config
    return {
        "Name": name,
        "ID": service_id or name,
        "Address": LOOPBACK,
        "Port": app_port,
        "Connect": {
            "SidecarService": {
                "Port": sidecar_port,
                "Address": LOOPBACK,
                "Checks": [
                    {
                        "Name": "Connect Sidecar Listening (fast)",
                        "TCP": f"{LOOPBACK}:{sidecar_port}",
                        "Interval": "1s",
                        "Timeout": "1s",
                    }
                ],
                "Proxy": proxy,
            }
        },
    }


class ConsulAgent:
    """A `consul agent -dev` on loopback with every listener on a free port; with data_dir, a
    single server (-bootstrap-expect=1, Connect on) that keeps its state there instead, so a
    restart brings back its CA, services and intentions (the soak restarts one)."""

    _seq = itertools.count(1)

    def __init__(self, consul_bin, workdir, extra_hcl=(), https=False, token=None,
                 data_dir=None):
        self.consul_bin = consul_bin
        self.workdir = workdir
        self.data_dir = data_dir
        self.extra_hcl = list(extra_hcl)  # more -hcl fragments, e.g. agent config for one test
        self.log_path = os.path.join(workdir, "consul.log")
        self.proc = None
        self.ports = {}
        self.https = https  # also listen for HTTPS on ports["https"] (TLS config via extra_hcl)
        # The token for the harness's own API calls: given, or the initial_management token of
        # an ACL configuration in extra_hcl.
        m = re.search(r'initial_management\s*=\s*"([^"]+)"', " ".join(self.extra_hcl))
        self.token = token or (m.group(1) if m else None)
        self.node = f"connectd-test-{os.getpid()}-{next(self._seq)}"

    def start(self, timeout=60):
        """Starts the agent; after stop() or kill() it starts again on the same ports."""
        if not self.ports:
            p = {k: free_port(udp_too=k in ("dns", "serf_lan", "serf_wan"))
                 for k in ("http", "dns", "grpc", "grpc_tls", "serf_lan", "serf_wan", "server")}
            if self.https:
                p["https"] = free_port()
            smin, smax = free_port_range(16)
            emin, emax = free_port_range(16)
            self.ports = dict(p, sidecar=(smin, smax), expose=(emin, emax))
        p = self.ports
        (smin, smax), (emin, emax) = p["sidecar"], p["expose"]
        hcl = (f"ports {{ https = {p.get('https', -1)} sidecar_min_port = {smin} "
               f"sidecar_max_port = {smax} expose_min_port = {emin} expose_max_port = {emax} }}")
        if self.data_dir is None:
            mode = ["-dev"]
        else:
            # What -dev would set that a server needs here: Connect, and the short Raft timers
            # (an election within a second or two of a restart).
            mode = ["-server", "-bootstrap-expect=1", "-data-dir", self.data_dir,
                    "-hcl", "connect { enabled = true }",
                    "-hcl", "performance { raft_multiplier = 1 }"]
        args = [
            self.consul_bin, "agent", *mode,
            "-bind", LOOPBACK, "-client", LOOPBACK, "-advertise", LOOPBACK,
            "-node", self.node, "-datacenter", "dc1",
            "-http-port", str(p["http"]), "-dns-port", str(p["dns"]),
            "-grpc-port", str(p["grpc"]), "-grpc-tls-port", str(p["grpc_tls"]),
            "-serf-lan-port", str(p["serf_lan"]), "-serf-wan-port", str(p["serf_wan"]),
            "-server-port", str(p["server"]),
            "-hcl", hcl,
        ]
        for extra in self.extra_hcl:
            args += ["-hcl", extra]
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(("$ " + " ".join(args) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir)
        self.api = AgentApi(f"{LOOPBACK}:{p['http']}", self.token)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"consul agent exited with {self.proc.returncode}:\n"
                                     + log_tail(self.log_path, 30))
            try:
                if not self.api.leader():
                    return False
                roots = self.api.roots()
            except (OSError, ApiError):
                return False
            return bool(roots.get("TrustDomain")) and len(roots.get("Roots") or []) >= 1

        wait_until(ready, timeout, "the consul agent to elect a leader and have CA roots",
                   interval=0.1)

    @property
    def http_addr(self):
        return self.api.http_addr

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, term_timeout=15)

    def kill(self):
        """SIGKILL, like a crash: every connection to the agent is reset at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, timeout=60):
        """kill() then start() on the same ports. A dev agent keeps nothing across this: it
        comes back with a new CA and no services or intentions (one with a data_dir keeps
        them)."""
        self.kill()
        return self.start(timeout)


# ---------------------------------------------------------------------------------------------
# Small TCP apps, in-process
# ---------------------------------------------------------------------------------------------


class TcpApp:
    """A threaded TCP server on 127.0.0.1:<port> (default: ephemeral); subclasses implement
    handle(conn).
    stop() closes the listener and every open connection and joins every thread."""

    def __init__(self, port=0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, port))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns = set()
        self._threads = []
        self.accepted = 0
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"{type(self).__name__}:{self.port}")
        self._acceptor.start()

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            conn.settimeout(None)
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    break
                self.accepted += 1
                self._conns.add(conn)
                t = threading.Thread(target=self._run, args=(conn,), daemon=True)
                self._threads.append(t)
            t.start()

    def _run(self, conn):
        try:
            self.handle(conn)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def handle(self, conn):
        raise NotImplementedError

    def stop(self):
        self._stop.set()
        self._acceptor.join(5)
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(5)


def _read_to_eof(conn, h):
    n = 0
    while True:
        b = conn.recv(256 * 1024)
        if not b:
            return n
        h.update(b)
        n += len(b)


class EchoApp(TcpApp):
    """Writes back every byte it reads; on EOF it closes its write side too. `received`
    counts the bytes it got over all connections."""

    received = 0

    def handle(self, conn):
        while True:
            b = conn.recv(65536)
            if not b:
                break
            with self._lock:
                self.received += len(b)
            conn.sendall(b)
        conn.shutdown(socket.SHUT_WR)


class SinkApp(TcpApp):
    """Hashes everything it reads; when the client half-closes it answers with the hex
    SHA-256 and the byte count ("<hex> <n>\\n") and closes."""

    def handle(self, conn):
        h = hashlib.sha256()
        n = _read_to_eof(conn, h)
        conn.sendall(f"{h.hexdigest()} {n}\n".encode())
        conn.shutdown(socket.SHUT_WR)


def after_eof_payload(size):
    """The deterministic body RespondAfterEofApp sends (so the test can check it)."""
    block = hashlib.sha256(b"connectd").digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


class RespondAfterEofApp(TcpApp):
    """Reads until the client's EOF, then sends "<hex sha256 of request> <n>\\n" followed by
    `size` bytes of after_eof_payload(size), and closes. Tests half-close end to end."""

    def __init__(self, size=1 << 20, port=0):
        self.size = size
        self.payload = after_eof_payload(size)
        super().__init__(port)

    def handle(self, conn):
        h = hashlib.sha256()
        n = _read_to_eof(conn, h)
        conn.sendall(f"{h.hexdigest()} {n}\n".encode() + self.payload)
        conn.shutdown(socket.SHUT_WR)


def _pump(src, dst):
    try:
        while True:
            b = src.recv(65536)
            if not b:
                break
            dst.sendall(b)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class RelayApp(TcpApp):
    """A plain TCP relay to 127.0.0.1:<target_port> that counts the connections it gets; a
    tap that shows a proxy really dialled an address."""

    def __init__(self, target_port):
        self.target_port = target_port
        super().__init__()

    def handle(self, conn):
        up = socket.create_connection((LOOPBACK, self.target_port), timeout=5)
        up.settimeout(None)
        back = threading.Thread(target=_pump, args=(up, conn), daemon=True)
        with self._lock:
            self._conns.add(up)
            self._threads.append(back)
        back.start()
        try:
            _pump(conn, up)
            back.join()
        finally:
            with self._lock:
                self._conns.discard(up)
            up.close()


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


def recv_exact(sock, n, timeout=10):
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        b = sock.recv(n - len(buf))
        if not b:
            break
        buf += b
    return bytes(buf)


def recv_all(sock, timeout=30):
    """Reads until EOF and returns the bytes; raises socket.timeout when it takes longer."""
    deadline = time.monotonic() + timeout
    buf = bytearray()
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        b = sock.recv(256 * 1024)
        if not b:
            return bytes(buf)
        buf += b


def echo_roundtrip(sock, payload, timeout=5):
    """Sends payload on an open connection and returns what came back (up to len(payload))."""
    sock.sendall(payload)
    return recv_exact(sock, len(payload), timeout)


def try_echo(port, payload=b"hello through the mesh\n", timeout=5):
    """One fresh connection, one echo; True when the payload came back intact."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            return echo_roundtrip(s, payload, timeout) == payload
    except OSError:
        return False


def tls_echo(port, ctx, payload=b"tls ping\n", timeout=5):
    """One mTLS connection to <port> with <ctx>, one echo; True when the payload came back
    intact, False when the handshake or the echo failed."""
    try:
        with tls_connect(port, ctx, timeout=timeout) as s:
            s.sendall(payload)
            return recv_exact(s, len(payload), timeout) == payload
    except (OSError, ssl.SSLError):
        return False


def closed_without_data(sock, timeout=5):
    """Waits for the peer to end the connection. Returns (closed, data): closed is True when
    recv saw EOF or a reset/TLS error within `timeout`, data is whatever arrived before."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False, bytes(data)
        sock.settimeout(left)
        try:
            b = sock.recv(65536)
        except socket.timeout:
            return False, bytes(data)
        except (ConnectionError, ssl.SSLError, OSError):
            return True, bytes(data)
        if not b:
            return True, bytes(data)
        data += b


def assert_refused(port, payload=b"may I?\n", timeout=5):
    """A new plain connection to `port` (an upstream listener) is cut without data: accepted
    locally or refused, but nothing comes back and it is closed within `timeout`."""
    try:
        s = socket.create_connection((LOOPBACK, port), timeout=timeout)
    except ConnectionRefusedError:
        return
    with s:
        try:
            s.sendall(payload)
        except OSError:
            return
        closed, data = closed_without_data(s, timeout)
    assert data == b"", f"connection through port {port} was relayed: got {data[:80]!r}"
    assert closed, f"connection through port {port} was neither relayed nor closed in {timeout}s"


def is_refused(port, payload=b"may I?\n", timeout=5):
    try:
        assert_refused(port, payload, timeout)
        return True
    except AssertionError:
        return False


# ---------------------------------------------------------------------------------------------
# HTTP/1.1: an echo app and a raw client (the L7 tests)
# ---------------------------------------------------------------------------------------------

_HEAD_END = b"\r\n\r\n"


def _read_head(sock, buf, limit):
    """Reads from sock into buf (a bytearray holding what was read before) until it holds a
    whole head; returns the head's bytes (without the blank line) and leaves the rest in buf.
    None on EOF before a whole head; raises ValueError past <limit> bytes."""
    while True:
        i = buf.find(_HEAD_END)
        if i >= 0:
            head = bytes(buf[:i])
            del buf[:i + 4]
            return head
        if len(buf) > limit:
            raise ValueError("head too long")
        b = sock.recv(256 * 1024)
        if not b:
            return None
        buf += b


def _read_n(sock, buf, n):
    while len(buf) < n:
        b = sock.recv(max(65536, n - len(buf)))
        if not b:
            raise ValueError(f"EOF after {len(buf)} of {n} body bytes")
        buf += b
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _read_line(sock, buf):
    while True:
        i = buf.find(b"\r\n")
        if i >= 0:
            line = bytes(buf[:i])
            del buf[:i + 2]
            return line
        b = sock.recv(65536)
        if not b:
            raise ValueError("EOF in chunked framing")
        buf += b


def _read_chunked(sock, buf):
    """A chunked body (trailers read and dropped)."""
    body = bytearray()
    while True:
        size = int(_read_line(sock, buf).split(b";")[0].strip(), 16)
        if size == 0:
            while _read_line(sock, buf):
                pass
            return bytes(body)
        body += _read_n(sock, buf, size)
        if _read_n(sock, buf, 2) != b"\r\n":
            raise ValueError("chunk data not followed by CRLF")


def _split_fields(lines):
    """[(name, value)] of header lines, names as sent, values trimmed."""
    out = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"header line without a colon: {line[:60]!r}")
        out.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return out


def header_values(headers, name):
    """The values of every field called <name> (any case) in [(name, value)], in order."""
    name = name.lower()
    return [v for k, v in headers if k.lower() == name]


class HttpEchoApp(TcpApp):
    """An HTTP/1.1 server that answers every request with 200 and a JSON description of what
    it received: {"method", "target" (the raw request-target), "path" (target before "?"),
    "version", "headers" ([[name, value]] in order, names as received), "body" (latin-1)}.
    Keeps connections alive as HTTP/1.1 allows, and answers "Expect: 100-continue" with a
    100 before it reads the body. A request with Upgrade (and Connection: upgrade) gets a
    101 and the connection becomes a byte echo. Target /__reset...: the connection is closed
    without an answer; /__sleep/<ms>...: the answer comes that much later. `requests` lists
    every request it got (the same dicts), so a test can tell that a refused request never
    reached the app."""

    HEAD_LIMIT = 1 << 20

    def __init__(self, port=0):
        self.requests = []
        super().__init__(port)

    def handle(self, conn):
        buf = bytearray()
        while True:
            try:
                head = _read_head(conn, buf, self.HEAD_LIMIT)
                if head is None:
                    return
                line, *rest = head.split(b"\r\n")
                method, target, version = line.decode("latin-1").split(" ")
                headers = _split_fields(rest)
                if "100-continue" in ",".join(header_values(headers, "expect")).lower():
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                te = ",".join(header_values(headers, "transfer-encoding")).lower()
                if "chunked" in te:
                    body = _read_chunked(conn, buf)
                else:
                    body = _read_n(conn, buf, int((header_values(headers, "content-length")
                                                   or ["0"])[0]))
            except ValueError as e:
                msg = f"echo app: bad request: {e}".encode()
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(msg), msg))
                return
            rec = {"method": method, "target": target, "path": target.split("?", 1)[0],
                   "version": version, "headers": [list(h) for h in headers],
                   "body": body.decode("latin-1")}
            with self._lock:
                self.requests.append(rec)
            if target.startswith("/__reset"):
                return  # closes without an answer
            m = re.match(r"/__sleep/(\d+)", target)
            if m:
                time.sleep(int(m.group(1)) / 1000)
            upgrade = header_values(headers, "upgrade")
            if upgrade and "upgrade" in ",".join(header_values(headers, "connection")).lower():
                # A tunnel: 101, then every byte is echoed back until the caller's EOF.
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Upgrade: " + upgrade[0].encode("latin-1") + b"\r\n\r\n"
                             + bytes(buf))
                while True:
                    b = conn.recv(65536)
                    if not b:
                        break
                    conn.sendall(b)
                conn.shutdown(socket.SHUT_WR)
                return
            data = json.dumps(rec).encode()
            conn_hdr = ",".join(header_values(headers, "connection")).lower()
            close = "close" in conn_hdr or (version == "HTTP/1.0" and "keep-alive" not in
                                            conn_hdr)
            out = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n" % len(data))
            if method == "HEAD":
                data = b""
            conn.sendall(out + (b"Connection: close\r\n" if close else b"") + b"\r\n" + data)
            if close:
                conn.shutdown(socket.SHUT_WR)
                return

    def seen(self, pred):
        """The requests the app got for which pred(request) is true."""
        with self._lock:
            return [r for r in self.requests if pred(r)]

    def seen_marker(self, marker):
        """The requests that carried <marker> in their target or in a header value."""
        return self.seen(lambda r: marker in r["target"]
                         or any(marker in v for _, v in r["headers"]))


@dataclass
class HttpResponse:
    status: int
    reason: str
    headers: list  # [(name, value)]
    body: bytes

    def header(self, name):
        """The one value of field <name>, or None; fails when the field repeats."""
        vs = header_values(self.headers, name)
        assert len(vs) <= 1, f"{name} repeated in the response: {vs}"
        return vs[0] if vs else None

    def json(self):
        return json.loads(self.body)

    def __str__(self):
        return f"HTTP {self.status} {self.reason} {self.body[:300]!r}"


def build_request(method, target, headers=(), body=None, host="app"):
    """The bytes of an HTTP/1.1 request: request line, Host (unless host is None), <headers>
    ([(name, value)] sent as given), Content-Length when there is a body, blank line, body."""
    out = [f"{method} {target} HTTP/1.1".encode("latin-1")]
    if host is not None:
        out.append(b"Host: " + host.encode("latin-1"))
    for k, v in headers:
        out.append(f"{k}: {v}".encode("latin-1"))
    if body is not None:
        out.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(out) + b"\r\n\r\n" + (body or b"")


class HttpConn:
    """One client connection that sends raw bytes and reads HTTP/1.1 responses from them,
    keeping whatever follows a response for the next one (keep-alive, pipelining)."""

    def __init__(self, port, timeout=10):
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.timeout = timeout
        self.buf = bytearray()

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def response(self, method="GET", timeout=None, interim=False):
        """Reads the next final response (skipping 1xx other than 101, unless <interim>: then
        a 1xx is returned too) to a request made with <method>. Returns None when the
        connection ends before a response starts; raises ValueError for a malformed or cut
        response."""
        self.sock.settimeout(timeout or self.timeout)
        while True:
            try:
                head = _read_head(self.sock, self.buf, 1 << 20)
            except ConnectionResetError:
                head = None
            if head is None:
                if self.buf:
                    raise ValueError(f"connection ended inside a response head: "
                                     f"{bytes(self.buf[:200])!r}")
                return None
            line, *rest = head.split(b"\r\n")
            version, status, *reason = line.decode("latin-1").split(" ", 2)
            if not version.startswith("HTTP/1."):
                raise ValueError(f"not an HTTP/1 status line: {line[:100]!r}")
            status = int(status)
            headers = _split_fields(rest)
            if 100 <= status < 200 and status != 101:
                if interim:
                    return HttpResponse(status, reason[0] if reason else "", headers, b"")
                continue
            break
        te = ",".join(header_values(headers, "transfer-encoding")).lower()
        cl = header_values(headers, "content-length")
        if method == "HEAD" or status in (204, 304) or status < 200:
            body = b""
        elif "chunked" in te:
            body = _read_chunked(self.sock, self.buf)
        elif cl:
            body = _read_n(self.sock, self.buf, int(cl[0]))
        else:  # delimited by the end of the connection
            while True:
                b = self.sock.recv(65536)
                if not b:
                    break
                self.buf += b
            body = bytes(self.buf)
            self.buf.clear()
        return HttpResponse(status, reason[0] if reason else "", headers, body)

    def request(self, method, target, headers=(), body=None, host="app", timeout=None):
        """Sends one request (build_request) and returns its response (None: closed)."""
        self.send(build_request(method, target, headers, body, host))
        return self.response(method, timeout)

    def closed(self, timeout=5):
        """True when the peer ends the connection (EOF or reset) within <timeout> seconds
        without sending anything more."""
        closed, data = closed_without_data(self.sock, timeout)
        self.buf += data
        return closed and not data


def http_request(port, method, target, headers=(), body=None, host="app", timeout=10):
    """One request on a fresh connection; its response (None when the connection ended
    without one)."""
    with HttpConn(port, timeout) as c:
        return c.request(method, target, headers, body, host)


def http_raw(port, data, method="GET", timeout=10):
    """Sends raw bytes on a fresh connection and returns the first response to them (None
    when the connection ended without one)."""
    with HttpConn(port, timeout) as c:
        try:
            c.send(data)
        except OSError:
            pass
        return c.response(method)


def try_http(port, method, target, headers=(), body=None, host="app", timeout=5):
    """Like http_request, but None for any connection-level failure (for wait loops)."""
    try:
        return http_request(port, method, target, headers, body, host, timeout)
    except (OSError, ValueError):
        return None


def wait_http(port, method, target, status, headers=(), timeout=20, what=None):
    """Repeats a request on fresh connections until it answers <status>; returns that
    response. The failure names the last answer."""
    last = []

    def ok():
        r = try_http(port, method, target, headers)
        last[:] = [r]
        return r if r is not None and r.status == status else None

    try:
        return wait_until(ok, timeout, what or f"{method} {target} to answer {status}",
                          interval=0.1)
    except AssertionError as e:
        raise AssertionError(f"{e}; last answer: {last[0] if last else None}") from None


def cert_der_sha256(pem):
    """The hex SHA-256 of the DER of the first certificate in <pem> (what Envoy puts in the
    Hash element of X-Forwarded-Client-Cert)."""
    cert = x509.load_pem_x509_certificate(split_pem(pem)[0].encode())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# ---------------------------------------------------------------------------------------------
# TLS clients and certificates
# ---------------------------------------------------------------------------------------------


def tls_client_context(certfile=None, keyfile=None, cafile=None):
    """A TLS client context that presents certfile/keyfile (a chain file is fine) and, when
    cafile is given, verifies the server chain against it (no host name check: mesh servers
    are identified by URI SAN, which the tests check themselves)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if cafile:
        ctx.load_verify_locations(cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def tls_connect(port, ctx, timeout=10):
    """Connects and completes the handshake; returns the SSLSocket (caller closes)."""
    raw = socket.create_connection((LOOPBACK, port), timeout=timeout)
    try:
        s = ctx.wrap_socket(raw)
    except BaseException:
        raw.close()
        raise
    return s


def assert_tls_refused(port, ctx, payload=b"ping\n", timeout=5):
    """The server at `port` must refuse this client: the handshake fails, or the connection is
    closed (alert, EOF or reset) without any application data coming back."""
    try:
        s = tls_connect(port, ctx, timeout)
    except (ssl.SSLError, ConnectionError, OSError):
        return
    with s:
        try:
            s.sendall(payload)
        except (ssl.SSLError, OSError):
            return
        closed, data = closed_without_data(s, timeout)
    assert data == b"", f"TLS client was accepted and relayed: got {data[:80]!r}"
    assert closed, f"TLS connection to {port} was neither refused nor relayed in {timeout}s"


def peer_cert_der(port, ctx, timeout=10):
    with tls_connect(port, ctx, timeout) as s:
        return s.getpeercert(binary_form=True)


def split_pem(pem):
    return re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", pem,
                      re.S)


def write_leaf_files(dirpath, leaf, prefix):
    """Writes an agent leaf (GET /v1/agent/connect/ca/leaf/...) as <prefix>.crt (the whole
    CertPEM chain), <prefix>-leaf.crt (first cert), <prefix>-chain.crt (the rest, may be
    empty) and <prefix>.key. Returns a dict of the paths."""
    certs = split_pem(leaf["CertPEM"])
    paths = {k: os.path.join(dirpath, f"{prefix}{suffix}") for k, suffix in
             (("chain_all", ".crt"), ("leaf", "-leaf.crt"), ("rest", "-chain.crt"),
              ("key", ".key"))}
    for k, text in (("chain_all", leaf["CertPEM"]), ("leaf", certs[0]),
                    ("rest", "".join(certs[1:])), ("key", leaf["PrivateKeyPEM"])):
        with open(paths[k], "w") as f:
            f.write(text)
    paths["has_rest"] = len(certs) > 1
    return paths


def access_records(path):
    """The JSON records of access log <path> ([] before it exists). A line still being written
    (no newline yet: a reader can see part of the writer's one write()) is left for the next
    call, never parsed half."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def mesh_client_context(api, dirpath, service, alpn=None):
    """A TLS client context that presents <service>'s agent leaf and trusts the mesh roots,
    as a sidecar opening the mesh hop itself would; ALPN <alpn> (a list) when given."""
    paths = write_leaf_files(dirpath, api.leaf(service), service)
    ca = os.path.join(dirpath, "mesh-ca.pem")
    write_text(ca, api.roots_pem())
    ctx = tls_client_context(paths["chain_all"], paths["key"], ca)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def openssl_peer_chain(port, leaf_paths, cafile, timeout=20):
    """Runs `openssl s_client` against 127.0.0.1:port presenting the given leaf and returns
    (first peer certificate PEM, full s_client output)."""
    args = ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-showcerts",
            "-cert", leaf_paths["leaf"], "-key", leaf_paths["key"], "-CAfile", cafile]
    if leaf_paths.get("has_rest"):
        args += ["-cert_chain", leaf_paths["rest"]]
    r = subprocess.run(args, input=b"", capture_output=True, timeout=timeout)
    out = r.stdout.decode("utf-8", "replace") + r.stderr.decode("utf-8", "replace")
    certs = split_pem(out)
    return (certs[0] if certs else None), out


def openssl_san(cert_pem):
    r = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"],
                       input=cert_pem.encode(), capture_output=True, timeout=20, check=True)
    return r.stdout.decode()


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()).decode()


def cert_pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self):
        return cert_pem(self.cert)

    @property
    def key_pem(self):
        return _key_pem(self.key)


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def make_ca(common_name, trust_domain):
    """A self-signed EC P-256 CA shaped like Consul's roots: CA:true, keyCertSign, subject and
    authority key ids, and the URI SAN spiffe://<trust_domain>.

    The serial is random like an operator's CA, with bit 63 always set: the agent reports a
    root's serial as the uint64 of its low 64 bits ("SerialNumber" in the roots JSON), so a
    proxy must cope with numbers above INT64_MAX there, and every test that installs a CA
    checks it does."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number() | (1 << 63))
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Ca(cert, key)


def make_leaf(ca, uri, dirpath, prefix, not_before=None, not_after=None):
    """A leaf signed by `ca` with URI SAN `uri` (a list for several, in that order), shaped
    like Consul's (digitalSignature + keyAgreement, serverAuth + clientAuth), valid from five
    minutes ago for three days unless not_before / not_after (datetimes) say otherwise. The
    URIs are written as given, control characters included. Writes <prefix>.crt/.key; returns
    their paths."""
    uris = [uri] if isinstance(uri, str) else list(uri)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or _now() - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or _now() + datetime.timedelta(days=3))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                              x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    crt = write_text(os.path.join(dirpath, prefix + ".crt"), cert_pem(cert))
    key_path = write_text(os.path.join(dirpath, prefix + ".key"), _key_pem(key))
    return crt, key_path


def issued_by(cert_der, issuer_pem):
    """True when the DER certificate's signature verifies with the public key of issuer_pem."""
    cert = x509.load_der_x509_certificate(cert_der)
    issuer = x509.load_pem_x509_certificate(issuer_pem.encode())
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, Exception):  # InvalidSignature has no common base
        return False


class AgentInterposer:
    """An HTTP hop between connectd and a real agent that passes every request through, except
    that POST /v1/agent/connect/authorize is answered with <authorize_answer> (a dict) while
    that is set (or fails it with <authorize_status>), and passes it on <authorize_delay>
    seconds late otherwise. It stands in for an
    agent whose own copy of the intentions lags behind, or that is slow to answer, which a real
    agent does only for a moment and cannot be made to do on demand.

    Also: <canned> maps a path prefix to (status, body) answered instead of the agent;
    <held> maps a path prefix to a threading.Event: such a request is passed on only once the
    event is set (at most 60 s late), as from an agent slow to answer that one query;
    <drop_headers> names (lower case) response headers left out; <rewrite>(path, body) may
    return another body for a 200 answer; <paths> lists every request path seen.

    And <faults> maps a path prefix to a fault (what a real agent will not do), applied to
    every request on that path until removed, each one counted in <fault_hits> (prefix ->
    count). A fault is a tuple:
      ("status", code, body)  answer <code> with <body> (bytes) at once;
      ("body", fn)            the agent's answer, asked without index and wait (so at once),
                              with its body replaced by fn(body) (bytes in, bytes out);
      ("index", value)        the same, its X-Consul-Index replaced by <value>;
      ("reset",)              close the connection with a TCP reset instead of answering;
      ("stall", event)        answer nothing until <event> is set (at most 120 s), then close;
      ("once", fault)         <fault> for the next request only, then nothing again."""

    def __init__(self, agent_http_addr):
        import http.server

        self.upstream = agent_http_addr
        self.authorize_answer = None
        self.authorize_status = None  # an HTTP status to fail /authorize with
        self.authorize_delay = 0.0
        self.authorize_calls = 0
        self.canned = {}
        self.held = {}
        self.drop_headers = set()
        self.rewrite = None
        self.paths = []
        self.faults = {}
        self.fault_hits = {}
        # The hop's own connections to the agent, most of them blocking queries: stop() cuts
        # them, or they would stay open on the agent for the rest of their wait, long after
        # the connectd that asked is gone, and a shared agent would refuse new clients (429).
        self.live = set()
        self.live_lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _relay(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                outer.paths.append(self.path)
                for prefix, fault in list(outer.faults.items()):
                    if self.path.startswith(prefix):
                        if fault[0] == "once":
                            outer.faults.pop(prefix, None)
                            fault = fault[1]
                        outer.fault_hits[prefix] = outer.fault_hits.get(prefix, 0) + 1
                        return self._fault(fault, body)
                for prefix, (status, data) in list(outer.canned.items()):
                    if self.path.startswith(prefix):
                        return self._answer(status, [("Content-Type", "application/json")],
                                            data)
                for prefix, event in list(outer.held.items()):
                    if self.path.startswith(prefix):
                        event.wait(60)
                if self.path.startswith("/v1/agent/connect/authorize"):
                    outer.authorize_calls += 1
                    canned = outer.authorize_answer
                    if outer.authorize_status is not None:
                        return self._answer(outer.authorize_status,
                                            [("Content-Type", "text/plain")], b"agent error")
                    if canned is not None:
                        return self._answer(200, [("Content-Type", "application/json")],
                                            json.dumps(canned).encode())
                    time.sleep(outer.authorize_delay)
                status, keep, data = self._forward(self.path, body)
                if status == 200 and outer.rewrite is not None:
                    data = outer.rewrite(self.path, data)
                self._answer(status, keep, data)

            def _forward(self, path, body, identity=False):
                """The agent's answer to this request on <path>: (status, headers, body);
                with <identity> the body is asked for unencoded (not gzip), to be rewritten."""
                host, port = outer.upstream.rsplit(":", 1)
                c = http.client.HTTPConnection(host, int(port), timeout=700)
                with outer.live_lock:
                    outer.live.add(c)
                try:
                    hdrs = {k: v for k, v in self.headers.items()
                            if k.lower() not in ("host", "connection", "content-length")}
                    if identity:
                        hdrs = {k: v for k, v in hdrs.items() if k.lower() != "accept-encoding"}
                    c.request(self.command, path, body=body, headers=hdrs)
                    r = c.getresponse()
                    data = r.read()
                    keep = [(k, v) for k, v in r.getheaders()
                            if k.lower() not in ("connection", "content-length",
                                                 "transfer-encoding") + tuple(outer.drop_headers)]
                    return r.status, keep, data
                finally:
                    with outer.live_lock:
                        outer.live.discard(c)
                    c.close()

            def _reset(self):
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.connection.close()
                except OSError:
                    pass

            def _fault(self, fault, body):
                kind = fault[0]
                if kind == "status":
                    return self._answer(fault[1], [("Content-Type", "text/plain")], fault[2])
                if kind == "reset":
                    return self._reset()
                if kind == "stall":
                    fault[1].wait(120)
                    return self._reset()
                # The answer of the moment, not a blocking one: the fault shows at once.
                base, _, query = self.path.partition("?")
                kept = [q for q in query.split("&") if q and
                        not q.startswith(("index=", "wait=", "hash="))]
                status, keep, data = self._forward(base + ("?" + "&".join(kept) if kept else ""),
                                                   body, identity=True)
                if kind == "body" and status == 200:
                    data = fault[1](data)
                elif kind == "index":
                    keep = [(k, v) for k, v in keep if k.lower() != "x-consul-index"]
                    keep.append(("X-Consul-Index", str(fault[1])))
                return self._answer(status, keep, data)

            def _answer(self, status, headers, data):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = _relay

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # the agent or connectd went away mid-request (teardown): nothing to say

        self.server = Server((LOOPBACK, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def http_addr(self):
        return f"{LOOPBACK}:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        with self.live_lock:
            live = list(self.live)
        for c in live:
            try:
                if c.sock is not None:
                    c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# connectd processes
# ---------------------------------------------------------------------------------------------

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "WARNING: ThreadSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")


def connectd_binary():
    return os.environ.get("CONNECTD_BIN") or os.path.join(REPO, "build", "asan", "connectd")


class Connectd:
    """One connectd process. stderr and stdout go to log_path."""

    def __init__(self, binary, args, log_path, label, env=None):
        self.binary = binary
        self.args = list(args)
        self.env = dict(env or {})  # set after CONSUL_*/CONNECT_* are cleared
        self.log_path = log_path
        self.label = label
        self.proc = None
        self.returncode = None
        self.killed = False

    def start(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CONSUL_", "CONNECT_"))}
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            log.write(("$ " + " ".join([self.binary] + self.args) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen([self.binary] + self.args, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_log(self, pattern, timeout=10):
        """Waits until the log matches the regular expression; returns the match."""
        rx = re.compile(pattern)
        return wait_until(lambda: rx.search(self.log()), timeout,
                          f"{self.label} to log /{pattern}/")

    def wait_port(self, port, timeout=20):
        def ok():
            if not self.alive():
                raise AssertionError(f"{self.label} exited with {self.proc.returncode}:\n"
                                     + log_tail(self.log_path, 30))
            return port_accepts(port)

        wait_until(ok, timeout, f"{self.label} to accept on port {port}", interval=0.05)

    def stop(self):
        """SIGTERM (then SIGKILL after 10 s). Returns a list of problems: a non-zero exit, a
        kill, or a sanitizer report in the log."""
        if self.proc is None:
            return []
        was_alive = self.alive()
        self.returncode, self.killed = stop_process(self.proc)
        problems = []
        if self.killed:
            problems.append(f"{self.label}: did not exit within 10 s of SIGTERM; killed")
        elif not was_alive:
            problems.append(f"{self.label}: had already exited with {self.returncode}")
        elif self.returncode != 0:
            problems.append(f"{self.label}: exited with {self.returncode} after SIGTERM")
        text = self.log()
        for m in SANITIZER_MARKERS:
            if m in text:
                problems.append(f"{self.label}: sanitizer report in log ({m!r})")
                break
        return problems


# ---------------------------------------------------------------------------------------------
# A mesh of services with sidecars on one agent
# ---------------------------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    app_port: int
    public_port: int
    upstreams: dict  # logical upstream name -> {"name", "port", "config"}
    proxy_config: dict = None
    proxy: Connectd = None
    up: dict = field(default_factory=dict)  # logical upstream name -> local port

    @property
    def id(self):
        return self.name

    @property
    def sidecar_id(self):
        return self.name + "-sidecar-proxy"


class Mesh:
    """Services with sidecars and their connectd processes on one agent, for one test.

    Service names get a per-test suffix so tests sharing an agent never see each other's
    services or intentions; tests refer to them by logical name ("web", "db")."""

    _seq = itertools.count(1)

    def __init__(self, agent, workdir, binary, on_log):
        self.agent = agent
        self.api = agent.api
        self.workdir = workdir
        self.binary = binary
        self.on_log = on_log  # callback(label, path): lets conftest show logs on failure
        self.tag = f"t{next(self._seq)}"
        self.services = {}
        self.apps = []
        self.procs = []
        self.registered = []
        self.intentions = set()
        self.config_entries = set()  # (kind, name) this mesh wrote besides intentions

    # --- names, apps ---

    def name(self, logical):
        return f"{logical}-{self.tag}"

    def app(self, cls, *args):
        a = cls(*args)
        self.apps.append(a)
        return a

    # --- services ---

    def add(self, logical, app_port=None, upstreams=(), proxy_config=None, start=True,
            use_proxy_id=False):
        """Registers <logical> with a sidecar (public port chosen here) and upstreams (logical
        names, or dicts {"name": logical, "config": {...}}), then starts its connectd (with
        -sidecar-for, or -proxy-id) unless start is False. Returns the Service."""
        ups = {}
        for u in upstreams:
            u = {"name": u} if isinstance(u, str) else dict(u)
            ups[u["name"]] = {"name": self.name(u["name"]), "port": free_port(),
                              "config": u.get("config"), "fields": u.get("fields")}
            if (u.get("fields") or {}).get("LocalBindSocketPath"):
                ups[u["name"]]["port"] = None
        svc = Service(name=self.name(logical), app_port=app_port or free_port(),
                      public_port=free_port(), upstreams=ups, proxy_config=proxy_config)
        svc.up = {k: v["port"] for k, v in ups.items()}
        self.services[logical] = svc
        self.register(svc)
        if start:
            self.start(svc, use_proxy_id=use_proxy_id)
        return svc

    def add_instance(self, logical, instance, app_port, proxy_config=None, meta=None):
        """Registers one more instance of <logical> (service ID <name>-<instance>, its
        application on <app_port>) with its own sidecar, starts that sidecar's connectd and
        waits until the instance is passing. Returns (connectd, public port)."""
        name = self.name(logical)
        sid = f"{name}-{instance}"
        public = free_port()
        body = sidecar_registration(name, app_port, public, proxy_config=proxy_config,
                                    service_id=sid)
        if meta:
            body["Meta"] = meta
        self.api.register(body)
        self.registered.append(sid)
        proc = self.start_connectd(sid, ["-sidecar-for", sid, "-http-addr", self.agent.http_addr,
                                         "-log-level", "debug", "-workers", "1"])
        proc.wait_port(public)
        self.api.wait_passing(name, port=public)
        return proc, public

    def register(self, svc):
        body = sidecar_registration(svc.name, svc.app_port, svc.public_port,
                                    svc.upstreams.values(), svc.proxy_config)
        self.api.register(body)
        if svc.name not in self.registered:
            self.registered.append(svc.name)

    def move_upstream(self, svc, logical_upstream, new_port):
        """Re-registers svc (the parent, which re-registers its sidecar) with the upstream
        moved to new_port."""
        svc.upstreams[logical_upstream]["port"] = new_port
        svc.up[logical_upstream] = new_port
        self.register(svc)

    def start_connectd(self, label, args, env=None, nofile=None):
        """nofile=(soft, hard): connectd starts with RLIMIT_NOFILE lowered to that (through a
        shell's ulimit that then execs it, so the pid is connectd's)."""
        log_path = os.path.join(self.workdir, f"connectd-{label}.log")
        binary = self.binary
        if nofile is not None:
            args = ["-c", 'ulimit -S -n %d && ulimit -H -n %d && exec "$0" "$@"' % nofile,
                    binary, *args]
            binary = "/bin/sh"
        p = Connectd(binary, args, log_path, f"connectd[{label}]", env)
        self.procs.append(p)
        self.on_log(p.label, log_path)
        return p.start()

    def start(self, svc, extra_args=(), use_proxy_id=False, env=None, nofile=None,
              port_timeout=20):
        """Starts connectd for svc (with more environment variables <env>; nofile: see
        start_connectd) and waits until its public and upstream ports accept (each for up to
        <port_timeout> s: no listener opens before every upstream's first endpoints came, or
        15 s passed)."""
        sel = ["-proxy-id", svc.sidecar_id] if use_proxy_id else ["-sidecar-for", svc.id]
        args = sel + ["-http-addr", self.agent.http_addr, "-log-level", "debug",
                      "-workers", "2", *extra_args]
        svc.proxy = self.start_connectd(svc.name, args, env, nofile=nofile)
        for port in [svc.public_port, *svc.up.values()]:
            if port is not None:
                svc.proxy.wait_port(port, timeout=port_timeout)
        return svc.proxy

    def wait_passing(self, svc, timeout=30):
        return self.api.wait_passing(svc.name, port=svc.public_port, timeout=timeout)

    def wait_echo(self, port, timeout=30, what="an echo through the mesh"):
        wait_until(lambda: try_echo(port), timeout, f"{what} (port {port})", interval=0.1)

    # --- intentions ---

    def intend(self, dst_logical, sources):
        """sources: {logical source: action}."""
        dst = self.name(dst_logical)
        self.api.set_intentions(dst, {self.name(s): a for s, a in sources.items()})
        self.intentions.add(dst)

    def intend_l7(self, dst_logical, sources, description=None):
        """Writes <dst_logical>'s service-intentions entry; sources: {logical source (or
        "*"): "allow" | "deny" | [permissions]}, each source carrying <description> when
        given (what /authz shows as the deciding intention's description, so a test can
        tell when its sidecar has this version)."""
        dst = self.name(dst_logical)
        out = []
        for src, rule in sources.items():
            e = {"Name": src if src == "*" else self.name(src)}
            if isinstance(rule, str):
                e["Action"] = rule
            else:
                e["Permissions"] = list(rule)
            if description is not None:
                e["Description"] = description
            out.append(e)
        self.api.set_l7_intentions(dst, out)
        self.intentions.add(dst)

    def service_defaults(self, logical, protocol, **fields):
        """service-defaults for <logical> (write it before registering the service: the agent
        merges it into the sidecar's Proxy.Config.protocol at registration)."""
        self.api.set_service_defaults(self.name(logical), protocol, **fields)
        self.config_entries.add(("service-defaults", self.name(logical)))

    def set_mesh(self, request_normalization=None, **http):
        """The agent-wide mesh config entry (removed again at close)."""
        self.api.set_mesh(request_normalization, **http)
        self.config_entries.add(("mesh", "mesh"))

    # --- teardown ---

    def close(self):
        """Stops connectd processes and apps, removes registrations and intentions. Returns
        the problems the processes reported (see Connectd.stop)."""
        problems = []
        for p in self.procs:
            problems += p.stop()
        for a in self.apps:
            a.stop()
        if self.agent.proc is not None and self.agent.proc.poll() is None:
            for dst in self.intentions:
                try:
                    self.api.delete_intentions(dst)
                except (OSError, ApiError):
                    pass
            for kind, name in self.config_entries:
                try:
                    self.api.delete_config_entry(kind, name)
                except (OSError, ApiError):
                    pass
            for sid in self.registered:
                try:
                    self.api.deregister(sid)
                except (OSError, ApiError):
                    pass
        return problems


# --- admin endpoint ---

def admin_args():
    """(-admin-bind args on a free loopback port, that port) for Mesh.start's extra_args."""
    port = free_port()
    return ["-admin-bind", f"{LOOPBACK}:{port}"], port


def admin_get(port, path, timeout=5):
    """GET <path> from an admin endpoint; returns (status, body text). Raises OSError when the
    endpoint does not answer."""
    c = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def admin_raw(port, data, timeout=10):
    """Sends raw bytes to an admin endpoint and returns whatever comes back until it closes
    (b"" when it closed without an answer)."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except OSError:
            pass
        return out


def parse_metrics(text):
    """Prometheus text into {(name, frozenset(labels.items())): value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        assert m, f"bad metrics line: {line!r}"
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), frozenset(labels.items()))] = float(m.group(3))
    return out


def metric(metrics, name, **labels):
    """The value of one sample (0 when absent)."""
    return metrics.get((name, frozenset(labels.items())), 0.0)


# ---------------------------------------------------------------------------------------------
# An h2c client (prior knowledge), as a local application calling its upstream listener
# ---------------------------------------------------------------------------------------------


def h2_many(port, reqs, timeout=30, full=False):
    """Sends every (method, path, body[, extra header pairs]) of <reqs> at once as concurrent
    streams on one new h2c connection (prior knowledge), bodies as the windows allow; returns
    one (status, body, reset code) per request, in order, once every stream ended, with the
    response's fields (a dict; trailers merged in) as a fourth item when <full>."""
    import h2.config
    import h2.connection
    import h2.events
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                    header_encoding="utf-8"))
        conn.initiate_connection()
        sids, left, out = [], {}, {}
        for req in reqs:
            method, path, body = req[:3]
            extra = list(req[3]) if len(req) > 3 else []
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", method), (":scheme", "http"),
                                    (":authority", "db"), (":path", path), *extra],
                              end_stream=not body)
            sids.append(sid)
            out[sid] = [None, b"", None, {}]
            if body:
                left[sid] = body
        done = set()
        while len(done) < len(sids):
            for sid in list(left):
                while left[sid]:
                    data = left[sid]
                    n = min(len(data), conn.local_flow_control_window(sid),
                            conn.max_outbound_frame_size)
                    if n <= 0:
                        break
                    conn.send_data(sid, data[:n], end_stream=n == len(data))
                    left[sid] = data[n:]
                if not left[sid]:
                    del left[sid]
            s.sendall(conn.data_to_send())
            chunk = s.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            for ev in conn.receive_data(chunk):
                sid = getattr(ev, "stream_id", None)
                if sid not in out:
                    continue
                if isinstance(ev, h2.events.ResponseReceived):
                    out[sid][3].update(dict(ev.headers))
                    out[sid][0] = int(out[sid][3][":status"])
                elif isinstance(ev, h2.events.TrailersReceived):
                    out[sid][3].update(dict(ev.headers))
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    out[sid][1] += ev.data
                elif isinstance(ev, h2.events.StreamEnded):
                    done.add(sid)
                elif isinstance(ev, h2.events.StreamReset):
                    out[sid][2] = ev.error_code
                    done.add(sid)
            s.sendall(conn.data_to_send())
        return [tuple(out[sid]) if full else tuple(out[sid][:3]) for sid in sids]


def h2_status(port, path="/"):
    """The status of one h2c GET of <path>, or None when it could not be had."""
    import h2.exceptions
    try:
        return h2_many(port, [("GET", path, b"")], timeout=5)[0][0]
    except (OSError, EOFError, h2.exceptions.ProtocolError):
        return None
