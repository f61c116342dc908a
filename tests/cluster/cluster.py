"""A real Consul cluster on network namespaces, for the cluster suite.

Every "host" is a network namespace of its own with `lo` up and one veth link to a bridge
that lives in a "switch" namespace of its own, on a private /24 (10.233.<random>.0/24). The
root namespace gets nothing: no link, no address, no route, so parallel runs (each with its
own per-run name suffix) cannot clash and a run that dies leaves at most some named
namespaces behind, never a broken host network.

Processes run in a host's namespace through `ip netns exec` (which execs, so the pid is the
process's own). The test's own sockets (API calls, apps, clients) are made in a host's
namespace by switching the calling thread there for a moment (setns(2) on the thread, see
Host.inside()); a thread started meanwhile (an app's acceptor) stays in that namespace.
Since every host has its own network stack, ports are fixed per role (Consul's defaults,
the same app and proxy ports on every host): the free-port rule is about a shared loopback,
which these hosts do not share.

Nothing here depends on pytest; the fixtures in conftest.py own the lifetimes.
"""

import contextlib
import ctypes
import json
import os
import random
import socket
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integ"))

from mesh import (LOOPBACK, AgentApi, ApiError, Connectd, admin_get, log_tail,  # noqa: E402
                  parse_metrics, port_accepts, stop_process, wait_until)

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

# Fixed ports inside every host (each host is its own network stack).
CONSUL_HTTP = 8500
ADMIN_BASE = 19000
PUBLIC_BASE = 21000
APP_BASE = 9000
UPSTREAM_BASE = 10000


def run(*args, check=True, timeout=30):
    """Runs one command (ip ...) and returns its CompletedProcess; raises with its stderr."""
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def namespaces_usable():
    """None when this process may create network namespaces and veth links, else the reason.
    Tries the real thing (a throw-away namespace and veth pair) rather than guessing."""
    if os.geteuid() != 0:
        return "the cluster suite needs root (it creates network namespaces and veth links)"
    name = f"cdprobe-{os.getpid()}-{random.randrange(1 << 24):06x}"
    try:
        r = run("ip", "netns", "add", name, check=False)
        if r.returncode != 0:
            return f"`ip netns add` refused: {r.stderr.strip()}"
        r = run("ip", "-n", name, "link", "add", "a0", "type", "veth", "peer", "name", "b0",
                check=False)
        if r.returncode != 0:
            return f"`ip link add ... type veth` refused: {r.stderr.strip()}"
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run ip(8): {e}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def in_netns(name):
    """Moves the calling thread into network namespace <name> for the block, then back to
    the namespace it was in. Sockets made in the block stay in <name> for their lifetime;
    threads and processes started in it start there."""
    target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns into {name}: {os.strerror(e)}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns back from {name}: {os.strerror(e)}")
    finally:
        os.close(target)
        os.close(home)


class NsApi(AgentApi):
    """AgentApi for the agent on 127.0.0.1:8500 of a host's namespace."""

    def __init__(self, netns):
        super().__init__(f"{LOOPBACK}:{CONSUL_HTTP}")
        self.netns = netns

    def call(self, method, path, body=None, timeout=30):
        with in_netns(self.netns):
            return super().call(method, path, body, timeout)


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


class Host:
    """One namespace with one link (eth0) to the switch."""

    def __init__(self, net, name, index):
        self.net = net
        self.name = name
        self.index = index
        self.netns = f"{net.prefix}-{name}"
        self.ip = f"{net.subnet}.{10 + index}"
        self.peer = f"p{index}"  # its link's end in the switch namespace
        self._next = {"app": APP_BASE, "public": PUBLIC_BASE, "admin": ADMIN_BASE,
                      "upstream": UPSTREAM_BASE}

    def port(self, kind):
        """The next unused port of <kind> (app, public, admin, upstream) on this host."""
        self._next[kind] += 1
        return self._next[kind]

    def inside(self):
        return in_netns(self.netns)

    def create(self):
        run("ip", "netns", "add", self.netns)
        run("ip", "-n", self.netns, "link", "set", "lo", "up")
        run("ip", "link", "add", "eth0", "netns", self.netns, "type", "veth", "peer", "name",
            self.peer, "netns", self.net.switch)
        run("ip", "-n", self.net.switch, "link", "set", self.peer, "master", "br0", "up")
        run("ip", "-n", self.netns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        run("ip", "-n", self.netns, "link", "set", "eth0", "up")

    def link(self, up):
        """Cuts (up=False) or restores this host's link, on the switch's side, as a pulled
        cable would: the host's own stack keeps its address and sockets."""
        run("ip", "-n", self.net.switch, "link", "set", self.peer, "up" if up else "down")

    def popen(self, args, log_path, env=None):
        """Starts args in this namespace with stdout and stderr appended to log_path."""
        with open(log_path, "ab") as log:
            log.write(("$ ip netns exec " + self.netns + " " + " ".join(args) + "\n").encode())
            log.flush()
            return subprocess.Popen(["ip", "netns", "exec", self.netns, *args],
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env)

    def consul(self, *args, timeout=30, check=True):
        """Runs a command (the consul CLI) in this namespace; it talks to the local agent."""
        return run("ip", "netns", "exec", self.netns, *args, timeout=timeout, check=check)

class Net:
    """The switch namespace with its bridge, and the hosts."""

    def __init__(self):
        tag = f"{os.getpid() % 100000:x}{random.randrange(1 << 16):04x}"
        self.prefix = f"cdc{tag}"
        self.switch = f"{self.prefix}-sw"
        self.subnet = f"10.233.{random.randrange(1, 255)}"
        self.hosts = {}
        self.created = []

    def create(self):
        run("ip", "netns", "add", self.switch)
        self.created.append(self.switch)
        run("ip", "-n", self.switch, "link", "set", "lo", "up")
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        return self

    def add_host(self, name):
        h = Host(self, name, len(self.hosts) + 1)
        self.created.append(h.netns)
        h.create()
        self.hosts[name] = h
        return h

    def destroy(self):
        """Removes every namespace made (their links go with them). Processes must be gone
        first; a namespace whose name is removed while a process is still in it lives on
        unnamed until that process ends."""
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created = []


# ---------------------------------------------------------------------------------------------
# Consul agents
# ---------------------------------------------------------------------------------------------


class ConsulNode:
    """One Consul agent (server or client) in a host's namespace."""

    def __init__(self, host, consul_bin, workdir, dc, server, join, join_wan=(),
                 bootstrap_expect=0):
        self.host = host
        self.consul_bin = consul_bin
        self.dc = dc
        self.server = server
        self.workdir = os.path.join(workdir, host.name)
        self.data_dir = os.path.join(self.workdir, "data")
        self.log_path = os.path.join(self.workdir, "consul.log")
        self.config_path = os.path.join(self.workdir, "agent.json")
        self.api = NsApi(host.netns)
        self.proc = None
        cfg = {
            "node_name": host.name,
            "datacenter": dc,
            "primary_datacenter": "dc1",
            "data_dir": self.data_dir,
            "bind_addr": host.ip,
            "advertise_addr": host.ip,
            "client_addr": LOOPBACK,
            "server": server,
            "retry_join": list(join),
            "retry_interval": "1s",
            "leave_on_terminate": not server,
            "disable_update_check": True,
            "log_level": "info",
            "connect": {"enabled": True},
            "ui_config": {"enabled": False},
            # Short timers where Consul allows them: leader elections in about a second,
            # failed members noticed within a few seconds, check output synced at once.
            "performance": {"raft_multiplier": 1},
            "gossip_lan": {"probe_interval": "500ms", "probe_timeout": "250ms",
                           "suspicion_mult": 3, "gossip_interval": "100ms"},
            "check_update_interval": "0s",
            "limits": {"http_max_conns_per_client": 1000},
            "ports": {"grpc": -1, "grpc_tls": -1, "dns": -1},
        }
        if server:
            cfg["bootstrap_expect"] = bootstrap_expect
            if join_wan:
                cfg["retry_join_wan"] = list(join_wan)
                cfg["retry_interval_wan"] = "1s"
        self.config = cfg

    @property
    def name(self):
        return self.host.name

    def start(self):
        os.makedirs(self.data_dir, exist_ok=True)
        with open(self.config_path, "w") as f:
            json.dump(self.config, f, indent=1)
        self.proc = self.host.popen([self.consul_bin, "agent", "-config-file",
                                     self.config_path], self.log_path)
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=15):
        """SIGTERM (a client leaves the cluster, as leave_on_terminate says), then SIGKILL."""
        if self.proc is not None:
            stop_process(self.proc, term_timeout=timeout)

    def kill(self):
        """SIGKILL: a crash. Its peers notice through gossip and Raft."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def answers(self):
        if not self.alive():
            raise AssertionError(f"consul on {self.name} exited with {self.proc.returncode}:\n"
                                 + log_tail(self.log_path, 30))
        try:
            return self.api.leader()
        except (OSError, ApiError, ValueError):
            return None


class Cluster:
    """dc1: three servers and two clients; dc2: one server and one client, WAN-federated with
    dc1 as the primary datacenter (dc2's leaves are signed by an intermediate CA)."""

    DC1_SERVERS = ("s1", "s2", "s3")

    def __init__(self, net, consul_bin, workdir):
        self.net = net
        self.workdir = workdir
        self.nodes = {}
        for name in ("s1", "s2", "s3", "c1", "c2", "s4", "c4"):
            net.add_host(name)
        h = net.hosts
        dc1_servers = [h[n].ip for n in self.DC1_SERVERS]
        for n in self.DC1_SERVERS:
            self.nodes[n] = ConsulNode(h[n], consul_bin, workdir, "dc1", True,
                                       [ip for ip in dc1_servers if ip != h[n].ip],
                                       bootstrap_expect=3)
        for n in ("c1", "c2"):
            self.nodes[n] = ConsulNode(h[n], consul_bin, workdir, "dc1", False, dc1_servers)
        self.nodes["s4"] = ConsulNode(h["s4"], consul_bin, workdir, "dc2", True, [],
                                      join_wan=dc1_servers, bootstrap_expect=1)
        self.nodes["c4"] = ConsulNode(h["c4"], consul_bin, workdir, "dc2", False, [h["s4"].ip])

    def __getitem__(self, name):
        return self.nodes[name]

    def start(self, timeout=90):
        for n in self.nodes.values():
            n.start()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=90):
        """Waits until each datacenter has a leader, every agent lists its datacenter's CA
        roots, dc1 sees dc2 across the WAN and dc2's CA has its intermediate (a dc2 leaf can
        be had)."""
        for n in self.nodes.values():
            wait_until(n.answers, timeout, f"consul on {n.name} to see a leader", interval=0.2)

        def roots(n):
            try:
                r = n.api.roots()
            except (OSError, ApiError, ValueError):
                return False
            return bool(r.get("ActiveRootID"))

        for n in self.nodes.values():
            wait_until(lambda: roots(n), timeout, f"CA roots on {n.name}", interval=0.2)

        def federated():
            try:
                return sorted(self["s1"].api.get("/v1/catalog/datacenters")) == ["dc1", "dc2"]
            except (OSError, ApiError, ValueError):
                return False

        wait_until(federated, timeout, "dc1 and dc2 to be WAN-federated", interval=0.2)

        def dc2_leaf():
            try:
                leaf = self["c4"].api.leaf("cluster-probe")
            except (OSError, ApiError, ValueError):
                return False
            return leaf.get("CertPEM", "").count("BEGIN CERTIFICATE") >= 2

        wait_until(dc2_leaf, timeout, "a dc2 leaf chained through dc2's intermediate",
                   interval=0.5)

    def live_dc1_server(self):
        """A dc1 server agent that is running (for cluster-wide writes)."""
        for n in self.DC1_SERVERS:
            if self.nodes[n].alive() and self.nodes[n].answers():
                return self.nodes[n]
        raise AssertionError("no dc1 server answers")

    def leader(self):
        """The dc1 server node that leads now (by its address in /v1/status/leader)."""
        addr = self.live_dc1_server().api.leader()
        ip = addr.rsplit(":", 1)[0]
        return next(n for n in self.nodes.values() if n.host.ip == ip)

    def members_alive(self, via, names):
        """True when the LAN members seen by <via> include every one of <names> as alive."""
        try:
            members = via.api.get("/v1/agent/members")
        except (OSError, ApiError, ValueError):
            return False
        status = {m["Name"]: m["Status"] for m in members}
        return all(status.get(n) == 1 for n in names)

    def stop(self):
        for n in self.nodes.values():
            n.kill()


# ---------------------------------------------------------------------------------------------
# Services, sidecars, apps
# ---------------------------------------------------------------------------------------------


class Sidecar:
    """One connectd for one service instance on one host, talking to that host's agent."""

    def __init__(self, node, sid, binary, workdir):
        self.node = node
        self.host = node.host
        self.sid = sid
        self.admin_port = self.host.port("admin")
        log_path = os.path.join(workdir, f"connectd-{self.host.name}-{sid}.log")
        args = ["netns", "exec", self.host.netns, binary, "-sidecar-for", sid, "-http-addr",
                f"{LOOPBACK}:{CONSUL_HTTP}", "-admin-bind", f"{LOOPBACK}:{self.admin_port}",
                "-log-level", "debug", "-workers", "1"]
        self.proc = Connectd("ip", args, log_path, f"connectd[{self.host.name}/{sid}]")

    @property
    def label(self):
        return self.proc.label

    @property
    def log_path(self):
        return self.proc.log_path

    def start(self, ports=()):
        self.proc.start()
        for p in ports:
            self.wait_port(p)
        return self

    def wait_port(self, port, timeout=30):
        def ok():
            if not self.proc.alive():
                raise AssertionError(f"{self.label} exited:\n" + log_tail(self.log_path, 30))
            with self.host.inside():
                return port_accepts(port, LOOPBACK) or port_accepts(port, self.host.ip)

        wait_until(ok, timeout, f"{self.label} to accept on port {port}")

    def admin(self, path):
        with self.host.inside():
            return admin_get(self.admin_port, path)

    def metrics(self):
        return parse_metrics(self.admin("/metrics")[1])

    def log(self):
        return self.proc.log()

    def wait_log(self, pattern, timeout=30):
        return self.proc.wait_log(pattern, timeout)

    def stop(self):
        return self.proc.stop()


class Service:
    """One registered service instance with a sidecar on a host; upstreams by name."""

    def __init__(self, name, sid, node, app_port, public_port, upstreams):
        self.name = name
        self.sid = sid
        self.node = node
        self.host = node.host
        self.app_port = app_port
        self.public_port = public_port
        self.up = upstreams  # upstream key -> local port on this host
        self.sidecar = None
        self.app = None


def registration(host, name, sid, app_port, public_port, upstreams=(), proxy_config=None,
                 meta=None):
    """The body of PUT /v1/agent/service/register for an instance on <host>: the sidecar is
    reached at the host's address (what remote sidecars dial), the application on
    127.0.0.1 in the host's namespace, and a 1 s TCP check on the public port so health
    follows the proxy within about a second."""
    ups = []
    for u in upstreams:
        e = {"DestinationName": u["name"], "LocalBindAddress": LOOPBACK,
             "LocalBindPort": u["port"]}
        if u.get("config"):
            e["Config"] = u["config"]
        e.update(u.get("fields") or {})
        ups.append(e)
    proxy = {"Upstreams": ups}
    if proxy_config:
        proxy["Config"] = proxy_config
    body = {
        "Name": name, "ID": sid, "Address": host.ip, "Port": app_port,
        "Connect": {"SidecarService": {
            "Port": public_port, "Address": host.ip,
            "Checks": [{"Name": "Connect Sidecar Listening (fast)",
                        "TCP": f"{host.ip}:{public_port}", "Interval": "1s",
                        "Timeout": "1s"}],
            "Proxy": proxy,
        }},
    }
    if meta:
        body["Meta"] = meta
    return body


def passing_on(api, service, public_port=None, host=None, dc=None):
    """The passing connect instances of <service> that <api>'s agent lists (optionally only
    the one on <host>:<public_port>, optionally in datacenter <dc>)."""
    q = "?passing" + (f"&dc={dc}" if dc else "")
    try:
        entries = api.get(f"/v1/health/connect/{service}{q}")
    except (OSError, ApiError, ValueError):
        return []
    if host is None:
        return entries
    return [e for e in entries if e["Service"]["Port"] == public_port
            and (e["Service"]["Address"] or e["Node"]["Address"]) == host.ip]


class Held:
    """An open connection from a host to a port there, made in its namespace, checked with an
    echo round trip now and later."""

    def __init__(self, host, port, timeout=10):
        with host.inside():
            self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)

    def roundtrip(self, payload, timeout=10):
        self.sock.settimeout(timeout)
        self.sock.sendall(payload)
        buf = b""
        while len(buf) < len(payload):
            b = self.sock.recv(len(payload) - len(buf))
            if not b:
                break
            buf += b
        return buf

    def echoes(self, payload=b"still there?\n"):
        """One round trip; fails the test unless the payload comes back."""
        got = self.roundtrip(payload)
        assert got == payload, f"the open connection broke: got {got!r}"
        return True

    def close(self):
        self.sock.close()

class ClusterMesh:
    """The services, sidecars and apps of one module on a Cluster. Everything it starts it
    stops in close(); everything it writes to Consul is left to die with the cluster."""

    def __init__(self, cluster, binary, workdir, on_log):
        self.cluster = cluster
        self.binary = binary
        self.workdir = workdir
        self.on_log = on_log
        self.services = []

    def add(self, node, name, sid=None, app=None, upstreams=(), proxy_config=None, meta=None,
            wait=True):
        """Registers an instance of <name> (ID <sid>, default <name>-<node>) on agent <node>
        with a sidecar, starts <app> (a mesh TcpApp class, or None) on 127.0.0.1 of that host
        and its connectd, and waits until the agent of <node> lists it passing (unless
        <wait> is False). upstreams: dicts {"key" (default name), "name", "config",
        "fields"}. Returns the Service."""
        n = self.cluster[node] if isinstance(node, str) else node
        host = n.host
        sid = sid or f"{name}-{host.name}"
        ups, local = [], {}
        for u in upstreams:
            u = dict(u)
            u["port"] = host.port("upstream")
            local[u.get("key", u["name"])] = u["port"]
            ups.append(u)
        svc = Service(name, sid, n, host.port("app"), host.port("public"), local)
        self.services.append(svc)
        if app is not None:
            with host.inside():
                svc.app = app(svc.app_port)
        n.api.register(registration(host, name, sid, svc.app_port, svc.public_port, ups,
                                    proxy_config, meta))
        svc.sidecar = Sidecar(n, sid, self.binary, self.workdir)
        self.on_log(svc.sidecar.label, svc.sidecar.log_path)
        svc.sidecar.start([svc.public_port, *local.values()])
        if wait:
            wait_until(lambda: passing_on(n.api, name, svc.public_port, host), 30,
                       f"{sid} to pass its check on {host.name}", interval=0.2)
        return svc

    def remove(self, svc):
        """Stops the instance's connectd and app and deregisters it. Returns the problems
        its connectd reported on the way out."""
        problems = svc.sidecar.stop() if svc.sidecar is not None else []
        self.forget(svc)
        return problems

    def forget(self, svc):
        """Deregisters an instance whose connectd a test killed on purpose (so close() does
        not report its exit) and stops its app."""
        if svc.app is not None:
            svc.app.stop()
        try:
            svc.node.api.deregister(svc.sid)
        except (OSError, ApiError):
            pass
        if svc in self.services:
            self.services.remove(svc)

    def close(self):
        problems = []
        for svc in self.services:
            if svc.sidecar is not None:
                problems += svc.sidecar.stop()
            if svc.app is not None:
                svc.app.stop()
        self.services = []
        return problems
