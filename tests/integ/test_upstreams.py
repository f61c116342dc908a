"""How an upstream finds its endpoints, against a real Consul agent.

Service upstreams resolve through the discovery chain (POST /v1/discovery-chain/<name>,
OverrideProtocol tcp): a service-resolver's failover, subset and redirect decide which service
instances a new connection reaches. Prepared-query upstreams follow the query's answer. Unix
sockets serve as the upstream listener and as the local application's address.

Each backend app answers with its own name, so a test sees where a connection landed. Config
entries and queries are named per test (mesh.name) and removed at the end.
"""

import os
import re
import socket
import stat
import threading

from mesh import (LOOPBACK, EchoApp, TcpApp, echo_roundtrip, free_port, sidecar_registration,
                  wait_until)


class NameApp(TcpApp):
    """Writes its name and a newline on every connection, then closes it."""

    def __init__(self, name):
        self.name = name.encode()
        super().__init__()

    def handle(self, conn):
        conn.sendall(self.name + b"\n")


def who(port_or_path, timeout=5):
    """The name of the app behind a new connection through the upstream, or None."""
    try:
        if isinstance(port_or_path, str):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(port_or_path)
        else:
            s = socket.create_connection((LOOPBACK, port_or_path), timeout=timeout)
        with s:
            data = b""
            while not data.endswith(b"\n"):
                b = s.recv(256)
                if not b:
                    break
                data += b
        return data.strip().decode() or None
    except OSError:
        return None


def wait_who(port, name, timeout=30):
    wait_until(lambda: who(port) == name, timeout, f"new connections to reach {name!r}",
               interval=0.2)


def put_config(api, entry):
    assert api.put("/v1/config", entry) is True, entry


def add_instance(m, logical, instance, app, meta=None):
    """Registers one more instance of <logical> (service ID <name>-<instance>) with a sidecar
    and starts its connectd; waits until it is passing. Returns the connectd."""
    return m.add_instance(logical, instance, app.port, meta=meta)[0]


def test_failover_to_backup_and_back(mesh):
    m, api = mesh, mesh.api
    db = m.add("db", app_port=m.app(NameApp, "primary").port)
    backup = m.add("db-backup", app_port=m.app(NameApp, "backup").port)
    m.wait_passing(db)
    m.wait_passing(backup)
    web = m.add("web", upstreams=["db"])
    wait_who(web.up["db"], "primary")
    primary = f"{db.name}.default.default.dc1"
    put_config(api, {"Kind": "service-resolver", "Name": db.name, "ConnectTimeout": "2s",
                     "Failover": {"*": {"Service": backup.name}}})
    try:
        # The chain gains a failover target: only its watch starts; the primary's keeps
        # running. The resolver's ConnectTimeout applies.
        web.proxy.wait_log(r"discovery chain .*: 2 target\(s\), primary " + primary
                           + r", connect timeout 2000 ms")
        assert web.proxy.log().count("watching target " + primary + ":") == 1
        assert who(web.up["db"]) == "primary"

        # The primary's sidecar goes away: its check turns critical and new connections
        # land on the failover target.
        assert db.proxy.stop() == []
        m.procs.remove(db.proxy)
        wait_until(lambda: not api.health_connect(db.name), 30, "db to be unhealthy")
        wait_who(web.up["db"], "backup")
        for _ in range(5):
            assert who(web.up["db"]) == "backup"

        # The primary recovers: traffic returns to it.
        m.start(db)
        m.wait_passing(db)
        wait_who(web.up["db"], "primary")
        for _ in range(5):
            assert who(web.up["db"]) == "primary"
    finally:
        api.delete("/v1/config/service-resolver/" + db.name)


def test_subset_filter_picks_instances(mesh):
    m, api = mesh, mesh.api
    put_config(api, {"Kind": "service-resolver", "Name": m.name("db"), "DefaultSubset": "v2",
                     "Subsets": {"v2": {"Filter": "Service.Meta.version == v2"}}})
    try:
        add_instance(m, "db", "a", m.app(NameApp, "v1"), meta={"version": "v1"})
        add_instance(m, "db", "b", m.app(NameApp, "v2"), meta={"version": "v2"})
        web = m.add("web", upstreams=["db"])
        wait_who(web.up["db"], "v2")
        # Both instances are healthy; only the subset's one answers.
        answers = {who(web.up["db"]) for _ in range(16)}
        assert answers == {"v2"}, answers
        # The v2 sidecar carries the SNI of the subset target.
        web.proxy.wait_log(r"target v2\." + m.name("db"))
    finally:
        api.delete("/v1/config/service-resolver/" + m.name("db"))


def test_redirect_follows_resolver(mesh):
    m, api = mesh, mesh.api
    db = m.add("db", app_port=m.app(NameApp, "db").port)
    other = m.add("other", app_port=m.app(NameApp, "other").port)
    m.wait_passing(db)
    m.wait_passing(other)
    # connect_timeout_ms on the upstream overrides the chain's (OverrideConnectTimeout).
    web = m.add("web", upstreams=[{"name": "db", "config": {"connect_timeout_ms": 1500}}])
    wait_who(web.up["db"], "db")
    web.proxy.wait_log(r"discovery chain .*: 1 target\(s\), .*connect timeout 1500 ms")
    put_config(api, {"Kind": "service-resolver", "Name": db.name,
                     "Redirect": {"Service": other.name}})
    try:
        wait_who(web.up["db"], "other")
        for _ in range(5):
            assert who(web.up["db"]) == "other"
    finally:
        api.delete("/v1/config/service-resolver/" + db.name)
    # The redirect gone, the chain compiles back to db.
    wait_who(web.up["db"], "db")


def prepared_query(m, service):
    """A prepared query "dbq" of <service>'s passing instances: (its name, its ID)."""
    qname = m.name("dbq")
    qid = m.api.call("POST", "/v1/query", {"Name": qname, "Service": {
        "Service": service, "OnlyPassing": True}})["ID"]
    return qname, qid


def web_on_query(m):
    """web with the upstream "dbq" through the prepared query of that name, polled every
    300 ms."""
    return m.add("web", upstreams=[{"name": "dbq",
                                    "fields": {"DestinationType": "prepared_query"},
                                    "config": {"prepared_query_poll_interval_ms": 300}}])


def test_prepared_query_upstream(mesh):
    m, api = mesh, mesh.api
    db = m.add("db", app_port=m.app(NameApp, "db").port)
    other = m.add("other", app_port=m.app(NameApp, "other").port)
    m.wait_passing(db)
    m.wait_passing(other)
    qname, qid = prepared_query(m, db.name)
    try:
        web = web_on_query(m)
        wait_who(web.up["dbq"], "db")
        # The query now names another service: the next polls follow it.
        api.put("/v1/query/" + qid, {"Name": qname,
                                     "Service": {"Service": other.name, "OnlyPassing": True}})
        wait_who(web.up["dbq"], "other")
        for _ in range(5):
            assert who(web.up["dbq"]) == "other"
        web.proxy.wait_log(r"prepared query answered 1 endpoint\(s\) of " + other.name)
    finally:
        api.delete("/v1/query/" + qid)


def test_prepared_query_same_endpoints_publish_nothing(mesh):
    """The agent shuffles a prepared query's instances on every execution, so each poll's
    answer differed from the last one and published a snapshot (and reset the workers'
    balancing tables keyed by the endpoint set): with three instances polled every 300 ms,
    a new snapshot most polls. The same instances in another order now publish nothing."""
    m, api = mesh, mesh.api
    db = m.add("db", app_port=m.app(NameApp, "db").port)
    m.wait_passing(db)
    for i in (2, 3):
        m.add_instance("db", f"i{i}", m.app(NameApp, f"db{i}").port)
    _, qid = prepared_query(m, db.name)
    try:
        web = web_on_query(m)
        web.proxy.wait_log(r"prepared query answered 3 endpoint\(s\) of " + db.name)
        published = re.compile(r"publishing snapshot (\d+)")
        wait_until(lambda: published.search(web.proxy.log()), 10, "a first snapshot")
        before = published.findall(web.proxy.log())[-1]
        answered = re.compile(r"prepared query answered")
        polls = len(answered.findall(web.proxy.log()))
        wait_until(lambda: len(answered.findall(web.proxy.log())) >= polls + 6, 15,
                   "six more answers to the query")
        after = published.findall(web.proxy.log())[-1]
        assert after == before, f"snapshots {before} -> {after} over six answers, same instances"
    finally:
        api.delete("/v1/query/" + qid)


def test_unix_socket_upstream_listener(mesh, tmp_path):
    m = mesh
    echo = m.app(EchoApp)
    db = m.add("db", app_port=echo.port)
    m.wait_passing(db)
    path = str(tmp_path / "db.sock")
    web = m.add("web", upstreams=[{"name": "db", "fields": {
        "LocalBindSocketPath": path, "LocalBindSocketMode": "0600",
        "LocalBindAddress": None, "LocalBindPort": None}}])
    wait_until(lambda: os.path.exists(path), 20, f"{path} to exist")
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    def echo_unix():
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(path)
                return echo_roundtrip(s, b"over a unix socket\n", 5) == b"over a unix socket\n"
        except OSError:
            return False

    wait_until(echo_unix, 30, "an echo through the unix upstream listener", interval=0.2)
    web.proxy.wait_log(r"listening on unix " + path)
    # Stopping connectd removes its socket file.
    assert web.proxy.stop() == []
    m.procs.remove(web.proxy)
    assert not os.path.exists(path)



def echo_unix(path, data=b"over a unix socket\n"):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            return echo_roundtrip(s, data, 5) == data
    except OSError:
        return False


def test_unix_upstream_listener_mode_defaults_to_0600(mesh, tmp_path):
    """Issue 7 defect 7: without LocalBindSocketMode the socket's mode came from the umask,
    0777 under umask 000, so anyone on the host could call the upstream as this service. The
    default is 0600 whatever the umask connectd runs under."""
    m = mesh
    echo = m.app(EchoApp)
    db = m.add("db", app_port=echo.port)
    m.wait_passing(db)
    m.intend("db", {"web": "allow"})
    path = str(tmp_path / "db.sock")
    old = os.umask(0)
    try:
        web = m.add("web", upstreams=[{"name": "db", "fields": {
            "LocalBindSocketPath": path, "LocalBindAddress": None, "LocalBindPort": None}}])
    finally:
        os.umask(old)
    web.proxy.wait_log(r"listening on unix " + path)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert oct(stat.S_IMODE(os.lstat(path).st_mode)) == oct(0o600)
    wait_until(lambda: echo_unix(path), 30, "an echo through the unix upstream listener",
               interval=0.2)

    # A new mode reopens the listener on the same path: connectd's own old socket there must
    # not count as "in use by someone else".
    web.upstreams["db"]["fields"]["LocalBindSocketMode"] = "0660"
    m.register(web)
    wait_until(lambda: os.path.exists(path) and stat.S_IMODE(os.lstat(path).st_mode) == 0o660,
               30, "the listener to be reopened with mode 0660")
    wait_until(lambda: echo_unix(path), 30, "an echo through the reopened listener",
               interval=0.2)
    assert "a socket there is in use" not in web.proxy.log()


def test_unix_upstream_listener_does_not_take_over_a_live_socket(mesh, tmp_path):
    """Issue 7 defect 7: any socket at LocalBindSocketPath was unlinked, so a registration
    naming another program's socket (/run/docker.sock, say) took it over. Now connectd stops
    with a configuration error naming the path, and the other program keeps serving."""
    m = mesh
    path = str(tmp_path / "someone-else.sock")
    other = UnixEchoApp(path)
    m.apps.append(other)
    web = m.add("web", upstreams=[{"name": "db", "fields": {
        "LocalBindSocketPath": path, "LocalBindAddress": None, "LocalBindPort": None}}],
        start=False)
    proxy = m.start_connectd(web.name, ["-sidecar-for", web.id, "-http-addr",
                                        m.agent.http_addr, "-workers", "2"])
    code = proxy.proc.wait(timeout=30)
    m.procs.remove(proxy)
    log = proxy.log()
    assert code == 1, f"exit status {code}:\n{log}"
    assert f"listen unix {path}: a socket there is in use" in log, log
    assert os.path.exists(path)
    assert echo_unix(path, b"still mine\n"), "the other program's socket stopped serving"


class UnixEchoApp:
    """An echo server on a unix socket."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            conn.settimeout(10)
            try:
                while True:
                    b = conn.recv(65536)
                    if not b:
                        break
                    conn.sendall(b)
            except OSError:
                pass

    def stop(self):
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def test_local_app_on_unix_socket(mesh, tmp_path):
    m, api = mesh, mesh.api
    path = str(tmp_path / "app.sock")
    app = UnixEchoApp(path)
    m.apps.append(app)
    name, public = m.name("db"), free_port()
    body = sidecar_registration(name, 0, public)
    del body["Port"]
    body["SocketPath"] = path
    api.register(body)
    m.registered.append(name)
    reg = api.service(name + "-sidecar-proxy")
    assert reg["Proxy"].get("LocalServiceSocketPath") == path, reg["Proxy"]
    proc = m.start_connectd(name, ["-sidecar-for", name, "-http-addr", m.agent.http_addr,
                                   "-log-level", "debug", "-workers", "1"])
    proc.wait_port(public)
    api.wait_passing(name, port=public)
    web = m.add("web", upstreams=["db"])
    m.wait_echo(web.up["db"], what="an echo to an app on a unix socket")
    proc.wait_log(r"result=ok")



def test_sidecar_listening_on_a_unix_socket(mesh, tmp_path):
    """A proxy registered with a SocketPath and no Port listens on that unix socket, and
    callers dial the endpoint's SocketPath instead of address:port."""
    m, api = mesh, mesh.api
    db_name = m.name("db")
    proxy_id = db_name + "-sock-proxy"
    path = str(tmp_path / "db-public.sock")
    app = m.app(NameApp, "db over a unix socket")
    api.register({"Kind": "connect-proxy", "ID": proxy_id, "Name": proxy_id, "SocketPath": path,
                  "Proxy": {"DestinationServiceName": db_name, "LocalServiceAddress": LOOPBACK,
                            "LocalServicePort": app.port}})
    m.registered.append(proxy_id)
    proc = m.start_connectd(proxy_id, ["-proxy-id", proxy_id, "-http-addr", m.agent.http_addr,
                                       "-log-level", "debug", "-workers", "2"])
    proc.wait_log(r"listening on unix " + path + r" \(public\)")
    assert stat.S_ISSOCK(os.stat(path).st_mode)

    web = m.add("web", upstreams=["db"])
    wait_until(lambda: who(web.up["db"]) == "db over a unix socket", 30,
               "web to reach db through its unix-socket listener", interval=0.2)
    web.proxy.wait_log(r"endpoint unix:" + path)
    proc.wait_log(r"conn=\d+ in peer=unix src=\S+/svc/" + web.name + r" dst=\S+ result=ok")
    # Stopping connectd removes its socket file.
    assert proc.stop() == []
    m.procs.remove(proc)
    assert not os.path.exists(path)

def test_upstream_datacenter_compiles_the_chain_there(mesh):
    m = mesh
    db = m.add("db", app_port=m.app(NameApp, "db").port)
    m.wait_passing(db)
    # Datacenter dc1 (the agent's own, named explicitly) resolves as usual; dc2 does not exist
    # here, but the chain compiled there names dc2 targets, so compile-dc was sent.
    # The agent cannot answer about dc2's endpoints: web serves after the 15 s bound of
    # start-up (test_ready_warming.py).
    web = m.add("web", upstreams=[{"name": "db", "fields": {"Datacenter": "dc1"}},
                                  {"name": "other", "fields": {"Datacenter": "dc2"}}],
                start=False)
    m.start(web, port_timeout=40)
    wait_who(web.up["db"], "db")
    other = m.name("other")
    web.proxy.wait_log(r"discovery chain " + other + r": 1 target\(s\), primary " + other
                       + r"\.default\.default\.dc2")
    web.proxy.wait_log(r"watching target " + other + r"\.default\.default\.dc2: "
                       r"/v1/health/connect/" + other + r"\?cached&dc=dc2")
