"""A misbehaving agent (issue 12, item 2): what connectd does when the agent answers what a real
one will not. An HTTP hop in front of the real agent (mesh.AgentInterposer, its <faults>)
breaks the answers of one watch at a time: malformed, truncated and oversized JSON, fields of
the wrong type, an X-Consul-Index that goes back or comes as 0, 500 and 429 answers, a query
held past its timeout, reset connections, a leaf whose key is not its certificate's, an expired
leaf, roots without their active root.

Each test checks the same four things, on the watch's own sidecar (both for the roots):
* the last good state stays in force: /config (leaf, trust domain, intentions, endpoints...)
  does not move while the fault lasts, the hop serving it several times; where a fault could
  only republish the same state (an index that goes back) the snapshot generation must stay;
* one clear line names the watch and the fault, however many times the answer came back (no
  second WARN or ERROR line, and none of the key or the token);
* the watch recovers once the agent behaves again ("watch ...: recovered"), and a change made
  afterwards takes effect (an intention flip, a new configuration, a CA rotation with its new
  leaf, a resolver's timeout, one more endpoint);
* traffic never stops: a thread echoes through web -> db on new connections and on one held
  connection every 100 ms for the whole module, and no echo may fail.

One agent, one hop and one web -> db pair (an echo app) serve the whole module; the sidecars
run with -watch-wait 2s, so a held query times out in 12 s and a behaving agent answers a
retry within 2 s. Covered elsewhere and not repeated here: the whole agent going away and
coming back (test_resilience.py), an agent that does not say its default policy
(test_agent_policy.py), the blocking-query arithmetic (index kept, reset, back-off, body cap,
rejected answers) in tests/unit/test_watch.c, and every decoder's refusals of bad JSON in
tests/unit/test_decode.c with the fuzz corpora.
"""

import contextlib
import datetime
import itertools
import json
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh import (LOOPBACK, AgentInterposer, ConsulAgent, EchoApp, Mesh, admin_args, admin_get,
                  echo_roundtrip, is_refused, issued_by, make_ca, make_leaf, peer_cert_der,
                  sidecar_registration, tls_client_context, try_echo, wait_until, write_text,
                  tls_echo)

try:
    from conftest import LOGS
except ImportError:  # the report then lacks the logs, nothing else
    LOGS = None

TOKEN = "b7f3c1d2-faults-token-never-logged"
LOUD = re.compile(r"\[(WARN|ERROR)\]")


class Traffic:
    """Echoes through <port> every 100 ms in a thread: one new connection each time and one
    held connection; every failure is kept with its time. paused() stops it (and closes the
    held connection) while a test refuses web on purpose."""

    def __init__(self, port):
        self.port = port
        self.failures = []
        self.ok = 0
        self._pause = threading.Event()
        self._idle = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self._stop.set()
        self.thread.join(10)

    @contextlib.contextmanager
    def paused(self):
        self._idle.clear()
        self._pause.set()
        self._idle.wait(10)
        try:
            yield
        finally:
            self._pause.clear()

    def _run(self):
        held = None
        n = 0
        while not self._stop.is_set():
            if self._pause.is_set():
                if held is not None:
                    held.close()
                    held = None
                self._idle.set()
                time.sleep(0.05)
                continue
            n += 1
            try:
                if held is None:
                    held = socket.create_connection((LOOPBACK, self.port), timeout=5)
                payload = b"held %d\n" % n
                if echo_roundtrip(held, payload, timeout=5) != payload:
                    raise OSError("the held connection echoed something else")
            except OSError as e:
                if not self._pause.is_set():
                    self.failures.append((time.strftime("%H:%M:%S"), "held", repr(e)))
                if held is not None:
                    held.close()
                held = None
            if try_echo(self.port, b"new %d\n" % n, timeout=5):
                self.ok += 1
            elif not self._pause.is_set():
                self.failures.append((time.strftime("%H:%M:%S"), "new", ""))
            time.sleep(0.1)
        if held is not None:
            held.close()


@dataclass
class Rig:
    m: Mesh
    api: object
    hop: AgentInterposer
    db: object
    web: object
    echo: EchoApp
    db_admin: int
    web_admin: int
    traffic: Traffic
    work: str
    logs: list
    ca: object = None
    extra: list = field(default_factory=list)  # extra registrations of db (service IDs)
    seq: itertools.count = field(default_factory=lambda: itertools.count(1))


def start_behind(m, hop, svc):
    """Starts svc's connectd talking to the agent through the hop; returns its admin port."""
    admin, port = admin_args()
    svc.proxy = m.start_connectd(svc.name, ["-sidecar-for", svc.id, "-http-addr", hop.http_addr,
                                            "-log-level", "debug", "-workers", "1",
                                            "-watch-wait", "2s", *admin],
                                 env={"CONSUL_HTTP_TOKEN": TOKEN})
    for p in [svc.public_port, *svc.up.values()]:
        svc.proxy.wait_port(p)
    return port


def settle(*ports):
    """Waits until each sidecar's snapshot generation has stayed the same for 3 s (longer
    than a watch's wait): after start-up, a CA rotation or a new chain the agent sends a
    registration, a leaf or roots once or twice more."""
    last = {}

    def still():
        now = time.monotonic()
        for port in ports:
            g = config(port)["generation"]
            if last.get(port, (None,))[0] != g:
                last[port] = (g, now)
        return all(now - at >= 3 for _, at in last.values())

    wait_until(still, 60, "the snapshot generations to settle", interval=0.5)


@pytest.fixture(scope="module")
def rig(consul_bin, connectd_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    agent = ConsulAgent(consul_bin, str(work / "agent"))
    logs = [("consul agent", agent.log_path)]
    (work / "mesh").mkdir()
    problems, m, hop, traffic = [], None, None, None
    agent.start()
    try:
        api = agent.api
        # A CA whose key the tests hold, so they can sign an expired leaf for db.
        ca = make_ca("connectd faults-test CA", api.trust_domain())
        api.set_ca(ca.cert_pem, ca.key_pem)
        hop = AgentInterposer(agent.http_addr)
        m = Mesh(agent, str(work / "mesh"), connectd_bin,
                 lambda label, path: logs.append((label, path)))
        echo = m.app(EchoApp)
        db = m.add("db", app_port=echo.port, start=False)
        web = m.add("web", upstreams=["db"], start=False)
        db_admin = start_behind(m, hop, db)
        web_admin = start_behind(m, hop, web)
        m.wait_passing(db)
        m.wait_echo(web.up["db"])
        settle(db_admin, web_admin)
        traffic = Traffic(web.up["db"]).start()
        yield Rig(m, api, hop, db, web, echo, db_admin, web_admin, traffic, str(work), logs, ca)
    finally:
        if traffic is not None:
            traffic.stop()
        if m is not None:
            problems = m.close()
        if hop is not None:
            hop.stop()
        agent.stop()
    if problems:
        pytest.fail("connectd did not end cleanly:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def t(rig, request):
    """The module's rig, with its logs attached to this test's report if it fails; checks that
    no echo failed during the test and that no log holds the token or a private key."""
    if LOGS is not None:
        for label, path in rig.logs:
            request.node.stash.setdefault(LOGS, []).append((label, path, 60))
    failed, ok = len(rig.traffic.failures), rig.traffic.ok
    yield rig
    assert rig.traffic.failures[failed:] == [], "traffic through web -> db stopped"
    assert rig.traffic.ok > ok, "the traffic thread made no echo during the test"
    for p in (rig.db.proxy, rig.web.proxy):
        text = p.log()
        assert TOKEN not in text, f"{p.label} logged the token"
        assert "PRIVATE KEY" not in text, f"{p.label} logged a private key"


# ---- what the sidecars show ----------------------------------------------------------------


def config(port):
    status, body = admin_get(port, "/config")
    assert status == 200, body
    return json.loads(body)


def state(port):
    """What must not move while the agent misbehaves: the whole configuration in force (leaf,
    trust domain, intentions, upstream targets and their endpoints, timeouts...). Not its
    generation number: the agent re-sends a registration now and then after it was written
    again (a proof of an earlier test), which rebuilds the same configuration under a new
    number; test_index_goes_back checks the number where it matters."""
    c = config(port)
    del c["generation"]
    return c


def watch_up(port, name):
    status, body = admin_get(port, "/metrics")
    assert status == 200, body
    m = re.search(r'^connectd_watch_up\{watch="%s"\} (\d)$' % re.escape(name), body, re.M)
    return m is not None and m.group(1) == "1"


# ---- the watches, and a change that must take effect on each -------------------------------


def rotate_ca(t):
    """A new CA root (same trust domain): both sidecars must take the leaf the agent signs
    with it and trust it (a caller whose leaf only the new root signed completes a handshake
    with each, and gets its echo from db). Their leaves are read from the handshake, not asked
    of the agent: a non-blocking leaf query makes the agent sign yet another one later."""
    ca = make_ca(f"connectd faults-test CA {next(t.seq)}", t.api.trust_domain())
    t.api.set_ca(ca.cert_pem, ca.key_pem)
    t.ca = ca
    roots = write_text(os.path.join(t.work, "roots.pem"), t.api.roots_pem())
    n = next(t.seq)
    caller = tls_client_context(*make_leaf(ca, t.api.spiffe_id(t.web.name), t.work,
                                           f"caller{n}"), roots)

    def on_new_ca(port):
        try:
            return issued_by(peer_cert_der(port, caller, timeout=5), ca.cert_pem)
        except (OSError, ssl.SSLError):
            return False

    wait_until(lambda: on_new_ca(t.db.public_port) and on_new_ca(t.web.public_port), 60,
               "db and web to present leaves of the new CA and trust it")
    wait_until(lambda: tls_echo(t.db.public_port, caller), 30,
               "db to relay for a caller signed by the new root only")
    t.m.wait_echo(t.web.up["db"], 30, "web -> db after the rotation")
    settle(t.db_admin, t.web_admin)


def flip_intention(t):
    """web -> db denied, then allowed again; both must take effect."""
    with t.traffic.paused():
        t.m.intend("db", {"web": "deny"})
        wait_until(lambda: is_refused(t.web.up["db"]), 30, "db to refuse web after the deny")
        t.m.intend("db", {"web": "allow"})
        t.m.wait_echo(t.web.up["db"], 30, "web -> db allowed again")


def reconfigure_db(t):
    """db's registration with another local_connect_timeout_ms: /config must show it."""
    ms = 1000 + next(t.seq)
    t.db.proxy_config = {"local_connect_timeout_ms": ms}
    t.m.register(t.db)
    wait_until(lambda: config(t.db_admin)["timeouts_ms"]["local_connect"] == ms, 30,
               f"db's connectd to take local_connect_timeout_ms {ms}")


def retime_resolver(t):
    """A service-resolver for db with another ConnectTimeout: web's chain must carry it."""
    ms = 2000 + next(t.seq)
    t.api.set_config_entry({"Kind": "service-resolver", "Name": t.db.name,
                            "ConnectTimeout": f"{ms}ms"})
    t.m.config_entries.add(("service-resolver", t.db.name))
    t.web.proxy.wait_log(r"upstream \S+: discovery chain %s: .*connect timeout %d ms"
                         % (re.escape(t.db.name), ms), timeout=30)
    settle(t.web_admin)


def endpoints_of_db(t):
    return [n for u in config(t.web_admin)["upstreams"] for tg in u["targets"]
            for n in [tg["healthy_endpoints"]]]


def add_or_remove_endpoint(t):
    """One more registration of db's sidecar (the same address and port), or one less: web's
    endpoint count for db must follow."""
    if t.extra:
        t.api.deregister(t.extra.pop())
        want = 1
    else:
        sid = f"{t.db.name}-extra"
        t.api.register(sidecar_registration(t.db.name, t.echo.port, t.db.public_port,
                                            service_id=sid))
        t.m.registered.append(sid)
        t.extra.append(sid)
        want = 2
    wait_until(lambda: endpoints_of_db(t) == [want], 30, f"web to see {want} endpoint(s) of db")
    settle(t.web_admin)


@dataclass
class Watch:
    key: str
    prefix: object  # rig -> path prefix of its requests
    name: object    # rig -> the watch's name in its log lines and /metrics
    metric: str     # its label in connectd_watch_up
    on: tuple       # which sidecars run it: "db", "web"
    proof: object   # rig -> None: a change that must take effect


WATCHES = {w.key: w for w in [
    Watch("roots", lambda t: "/v1/agent/connect/ca/roots", lambda t: "roots", "roots",
          ("db", "web"), rotate_ca),
    Watch("leaf", lambda t: f"/v1/agent/connect/ca/leaf/{t.db.name}",
          lambda t: f"leaf {t.db.name}", "leaf", ("db",), rotate_ca),
    Watch("intentions", lambda t: f"/v1/connect/intentions/match?by=destination&name={t.db.name}",
          lambda t: f"intentions {t.db.name}", "intentions", ("db",), flip_intention),
    Watch("registration", lambda t: f"/v1/agent/service/{t.db.sidecar_id}",
          lambda t: f"registration {t.db.sidecar_id}", "registration", ("db",), reconfigure_db),
    Watch("chain", lambda t: f"/v1/discovery-chain/{t.db.name}",
          lambda t: f"discovery chain {t.db.name}", None, ("web",), retime_resolver),
    Watch("endpoints", lambda t: f"/v1/health/connect/{t.db.name}",
          lambda t: f"endpoints {t.db.name}.", None, ("web",), add_or_remove_endpoint),
]}

# The line each watch's owner writes when it refuses an answer.
REFUSED = {
    "roots": r"watch roots: .*; keeping the previous roots",
    "leaf": r"watch leaf %(db)s: .*; keeping the previous one",
    "intentions": r"watch intentions %(db)s: .*; keeping the previous table",
    "registration": r"registration of %(db)s-sidecar-proxy: .*; keeping the previous configuration",
    "chain": r"upstream \S+: discovery chain: .*; keeping the previous targets",
    "endpoints": r"upstream \S+ target %(db)s\.\S+: .*; keeping the previous endpoints",
}


def refused(t, key, detail=""):
    return REFUSED[key] % {"db": re.escape(t.db.name)} if not detail else \
        (REFUSED[key] % {"db": re.escape(t.db.name)}).replace(".*", detail + ".*", 1)


def procs_of(t, w):
    return [(t.db.proxy, t.db_admin) if s == "db" else (t.web.proxy, t.web_admin) for s in w.on]


def inject(t, w, fault, line, hits=4, timeout=40, loud=1, recovers=True, during=None):
    """Serves <fault> on <w>'s requests until each of its sidecars logged <line> and the hop
    served it <hits> times, checking meanwhile that the state in force did not move and an
    echo goes through; then the agent behaves again. Checks that each sidecar wrote <loud>
    WARN or ERROR line(s) (<line> among them), that the watch recovers, and that <w>'s proof
    change takes effect. <during>(t), when given, runs while the fault lasts."""
    prefix = w.prefix(t)
    procs = procs_of(t, w)
    marks = [len(p.log()) for p, _ in procs]
    before = [state(port) for _, port in procs]
    served = t.hop.fault_hits.get(prefix, 0)
    t.hop.faults[prefix] = fault
    try:
        for (p, _), mark in zip(procs, marks):
            wait_until(lambda: re.search(line, p.log()[mark:]), timeout,
                       f"{p.label} to log /{line}/")
        wait_until(lambda: t.hop.fault_hits.get(prefix, 0) - served >= hits, timeout,
                   f"the hop to serve the fault {hits} times")
        if during is not None:
            during(t)
        assert try_echo(t.web.up["db"]), "no echo while the agent misbehaves"
        for (p, port), b in zip(procs, before):
            assert state(port) == b, f"{p.label} left the last good state"
    finally:
        if t.hop.faults.get(prefix) is fault:
            del t.hop.faults[prefix]
        if fault[0] == "stall":
            fault[1].set()
    name = w.name(t)
    for (p, port), mark in zip(procs, marks):
        if recovers:
            wait_until(lambda: re.search(r"watch %s\S*: recovered after \d+ failed attempts"
                                         % re.escape(name), p.log()[mark:]),
                       30, f"{p.label}: watch {name} to recover")
        if w.metric is not None:
            wait_until(lambda: watch_up(port, w.metric), 10, f"{p.label}: watch_up {w.metric}")
        text = p.log()[mark:]
        lines = [ln for ln in text.splitlines() if LOUD.search(ln)]
        assert len(lines) == loud and (loud == 0 or any(re.search(line, ln) for ln in lines)), \
            f"{p.label}: want {loud} WARN/ERROR line(s) with /{line}/, got:\n" + "\n".join(lines)
        said = [ln for ln in text.splitlines() if "[DEBUG]" not in ln and re.search(line, ln)]
        assert len(said) == 1, f"{p.label}: /{line}/ above DEBUG {len(said)} times"
    w.proof(t)


# ---- the answers a real agent does not give ------------------------------------------------


def garbage(_body):
    return b"{this is not JSON]"


@pytest.mark.parametrize("key", list(WATCHES))
def test_malformed_json(t, key):
    inject(t, WATCHES[key], ("body", garbage), refused(t, key))


def cut_in_the_key(body):
    """The leaf's JSON cut off inside its PrivateKeyPEM."""
    return body[:body.index(b"PRIVATE KEY-----") + 60]


def cut_in_half(body):
    return body[:len(body) // 2]


@pytest.mark.parametrize("key,cut", [("leaf", cut_in_the_key), ("registration", cut_in_half),
                                     ("endpoints", cut_in_half)])
def test_truncated_json(t, key, cut):
    inject(t, WATCHES[key], ("body", cut), refused(t, key))


def test_oversized_json(t):
    """An answer over the 16 MiB body cap is refused by the transport. It used to count as a
    transport error, so the sidecar logged "agent unreachable" (and "reachable again" at the
    next answer of another watch) for what is one bad answer of one watch."""
    big = b'[{"Node": "' + b"A" * (17 << 20) + b'"}]'
    inject(t, WATCHES["endpoints"], ("body", lambda _b: big),
           r"\[WARN\] watch endpoints %s\S*: GET /v1/health/connect/\S+ failing: the answer's "
           r"body is over the size cap" % re.escape(t.db.name), hits=3)
    for p in (t.db.proxy, t.web.proxy):
        assert not re.search(r"agent \S+ unreachable", p.log()), \
            f"{p.label} took a large answer for an outage"


def wrong_type(key):
    def fn(body):
        d = json.loads(body)
        if key == "leaf":
            d["CertPEM"] = 42
        elif key == "intentions":
            d = {k: "allow" for k in d}
        elif key == "endpoints":
            d[0]["Service"]["Port"] = "many"
        elif key == "registration":
            d["Proxy"]["Upstreams"] = {"db": 1}
        elif key == "chain":
            d["Chain"]["Targets"] = ["db"]
        return json.dumps(d).encode()
    return fn


@pytest.mark.parametrize("key", ["leaf", "intentions", "endpoints", "registration", "chain"])
def test_wrong_types(t, key):
    inject(t, WATCHES[key], ("body", wrong_type(key)), refused(t, key))


def test_index_goes_back(t):
    """X-Consul-Index lower than the last one (a snapshot restore, a new leader): one INFO
    line, the query asked again from no index, and nothing delivered since nothing changed.
    Before, the answer after the reset was delivered again as news: the same leaf rebuilt
    the TLS contexts and published a new snapshot."""
    w = WATCHES["leaf"]
    line = (r"\[INFO\] watch leaf %s: X-Consul-Index went back from \d+ to 1 .*starting over"
            % re.escape(t.db.name))
    for p, _ in procs_of(t, w):
        assert not re.search(line, p.log())
    before = config(t.db_admin)["generation"]

    def no_rebuild(t):
        time.sleep(3)  # long enough for a delivery to show
        assert config(t.db_admin)["generation"] == before, "the same leaf was published again"

    inject(t, w, ("once", ("index", 1)), line, hits=1, loud=0, recovers=False, during=no_rebuild)
    for p, _ in procs_of(t, w):
        assert len(re.findall(line, p.log())) == 1


def test_index_zero(t):
    """X-Consul-Index 0 on every answer (a Consul bug): one WARN line; the index counts as 1
    and the watch asks once a second, not in a loop; the last good endpoints stay."""
    w = WATCHES["endpoints"]
    prefix = w.prefix(t)

    def rate(t):
        n0, t0 = t.hop.fault_hits.get(prefix, 0), time.monotonic()
        time.sleep(4)
        n, dt = t.hop.fault_hits.get(prefix, 0) - n0, time.monotonic() - t0
        assert n <= dt + 2, f"{n} queries in {dt:.1f} s with index 0"
        asked = [p for p in t.hop.paths if p.startswith(prefix)][-2:]
        assert all("index=1&" in p for p in asked), asked

    inject(t, w, ("index", 0), r"\[WARN\] watch endpoints %s\S*: the agent answered "
           r"X-Consul-Index 0" % re.escape(t.db.name), hits=3, recovers=False, during=rate)


@pytest.mark.parametrize("key,status", [("leaf", 500), ("intentions", 429),
                                        ("registration", 500), ("chain", 429)])
def test_error_status(t, key, status):
    w = WATCHES[key]
    inject(t, w, ("status", status, b"agent says no"),
           r"\[WARN\] watch %s: \S+ \S+ failing: HTTP %d: agent says no" %
           (re.escape(w.name(t)), status))


def test_stall_longer_than_the_wait(t):
    """The intentions query held past its timeout (the wait, 2 s, plus a sixteenth plus 10 s),
    twice while the other watches are answered: one line, not one per timeout (the agent
    tracker used to say "unreachable" and "reachable again" at every retry of the held query)."""
    w = WATCHES["intentions"]
    inject(t, w, ("stall", threading.Event()),
           r"\[WARN\] agent \S+ unreachable \(watch intentions %s: .*[Tt]ime"
           % re.escape(t.db.name), hits=3, timeout=60)


def test_reset_connections(t):
    """Each health query of web's upstream is answered with a TCP reset: one line, however
    many retries, although the agent answers every other watch meanwhile, and the retries
    keep their back-off."""
    w = WATCHES["endpoints"]
    prefix = w.prefix(t)

    def backs_off(t):
        # With the back-off doubling from 200 ms, six seconds hold a handful of tries. The
        # query used to be retried at every answer of every other watch (the agent tracker's
        # "reachable again" made each watch backing off retry at once, every time).
        n0 = t.hop.fault_hits.get(prefix, 0)
        time.sleep(6)
        n = t.hop.fault_hits.get(prefix, 0) - n0
        assert n <= 8, f"{n} tries in 6 s"

    inject(t, w, ("reset",), r"\[WARN\] agent \S+ unreachable \(watch endpoints %s\S*: "
           % re.escape(t.db.name), hits=4, during=backs_off)


def other_key_pem():
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()).decode()


def test_leaf_key_does_not_match(t):
    def fn(body):
        d = json.loads(body)
        d["PrivateKeyPEM"] = other_key_pem()
        return json.dumps(d).encode()

    inject(t, WATCHES["leaf"], ("body", fn),
           refused(t, "leaf", "private key does not match the leaf certificate"))


def leaf_answer(t, label, not_before, not_after):
    """A body rewriter putting in the leaf answer a leaf for db (with its own key, signed by
    the active root) valid from <not_before> to <not_after>; returns (rewriter, its serial)."""
    n = next(t.seq)
    crt, key = make_leaf(t.ca, t.api.spiffe_id(t.db.name), t.work, f"{label}{n}",
                         not_before=not_before, not_after=not_after)
    with open(crt) as f:
        cert_pem = f.read()
    with open(key) as f:
        key_pem = f.read()
    serial = f"{label}-{n}"

    def fn(body):
        d = json.loads(body)
        d["CertPEM"], d["PrivateKeyPEM"], d["SerialNumber"] = cert_pem, key_pem, serial
        return json.dumps(d).encode()
    return fn, serial


def test_expired_leaf(t):
    """A leaf that expired an hour ago. It used to be taken: db then presented it and every
    caller refused db's handshake."""
    now = datetime.datetime.now(datetime.timezone.utc)
    fn, _ = leaf_answer(t, "expired", now - datetime.timedelta(days=2),
                        now - datetime.timedelta(hours=1))
    inject(t, WATCHES["leaf"], ("body", fn), refused(t, "leaf", r"certificate \S+ expired"))


def test_leaf_not_valid_yet(t):
    """A leaf valid only from an hour ahead, while db's leaf in force is good. It used to be
    taken: db then presented it and every caller whose clock agrees refused db's handshake."""
    now = datetime.datetime.now(datetime.timezone.utc)
    fn, _ = leaf_answer(t, "future", now + datetime.timedelta(hours=1),
                        now + datetime.timedelta(days=3))
    inject(t, WATCHES["leaf"], ("body", fn),
           refused(t, "leaf", r"certificate \S+ is not valid yet"))


def test_leaf_taken_once_valid(t):
    """A leaf valid from a few seconds ahead is held back, and the same answer is taken once
    its notBefore has passed (the watch fetches it again after its back-off): db then presents
    it and web's calls go through."""
    w = WATCHES["leaf"]
    prefix = w.prefix(t)
    now = datetime.datetime.now(datetime.timezone.utc)
    fn, serial = leaf_answer(t, "soon", now + datetime.timedelta(seconds=6),
                             now + datetime.timedelta(days=3))
    mark = len(t.db.proxy.log())
    t.hop.faults[prefix] = ("body", fn)
    try:
        line = refused(t, "leaf", r"certificate \S+ is not valid yet")
        wait_until(lambda: re.search(line, t.db.proxy.log()[mark:]), 30,
                   "db to hold the leaf back")
        assert config(t.db_admin)["tls"]["leaf_serial"] != serial
        wait_until(lambda: config(t.db_admin)["tls"]["leaf_serial"] == serial, 60,
                   "db to take the leaf once it is valid")
        t.m.wait_echo(t.web.up["db"], 30, "web -> db with db's new leaf")
    finally:
        del t.hop.faults[prefix]
    # Back to leaves the agent signs.
    w.proof(t)


def test_roots_without_the_active_root(t):
    """Roots whose list lacks the root ActiveRootID names: another CA in place of every root
    the agent listed. They used to be taken: the sidecars then trusted only that other CA,
    and web and db refused each other's leaves."""
    stranger = make_ca("a CA nobody uses", t.api.trust_domain())

    def fn(body):
        d = json.loads(body)
        d["Roots"] = [{"ID": "00:11:22", "Name": "stranger", "SerialNumber": 7, "Active": True,
                       "RootCert": stranger.cert_pem, "IntermediateCerts": None}]
        return json.dumps(d).encode()

    inject(t, WATCHES["roots"], ("body", fn),
           refused(t, "roots", "the answer lacks its active root"))
