"""Upstream limits and outlier ejection (issue 10, item 6): an http upstream's Config.limits
(max_pending_requests, max_concurrent_requests) answer the request over them 503 at once, as
Envoy's circuit breakers do, and its passive_health_check ejects an endpoint that answers 5xx
max_failures times in a row for base_ejection_time (times the number of ejections), never more
than max_ejection_percent of a target's endpoints, as Envoy's outlier detection does.

Which instance answered is told by the status: the good instance's application answers 200,
the bad one's always 503 (and its own sidecar forwards that 503).

Each test asserts what only the limits or the ejection do (an upstream_overflow 503 while the
upstream has room to answer, requests all going to the good instance, one ejection and one
refused), so against a build without them each fails.
"""

import collections
import os
import re
import socket
import threading
import time

from mesh import LOOPBACK, TcpApp, admin_args, admin_get, sidecar_registration, wait_until
from test_l7_h2 import H2App, H2Client, drop_defaults, try_h2
from test_l7_h2 import l7_pair as h2_pair
from test_l7_inbound import HttpApp, Reader, connect, get, response
from test_l7_outbound import l7_pair, outbound_requests, try_status
from test_l7_routing import answered_by, delete_entries


class Always503(TcpApp):
    """An HTTP/1.1 application that answers every request 503 (keep-alive)."""

    def handle(self, conn):
        r = Reader(conn)
        while True:
            head = r.head()
            if head is None:
                return
            r.body(head[1], request=True)
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbad!")


class BlackHole:
    """A listening socket that never accepts: connections to it complete at the TCP level (the
    kernel's backlog) and then hear nothing, so a TLS handshake with it waits."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def stop(self):
        self.sock.close()


def metric(admin, name, upstream, limit=None):
    """The value of connectd_<name>{upstream="<upstream>"[,limit="<limit>"]}, or None."""
    _, text = admin_get(admin, "/metrics")
    lab = f'upstream="{upstream}"' + (f',limit="{limit}"' if limit else "")
    m = re.search(r"^connectd_%s\{%s\} (\d+)$" % (name, re.escape(lab)), text, re.M)
    return int(m.group(1)) if m else None


def add_http_instance(m, instance, app_port, protocol="http"):
    """One more instance of db (protocol http, or <protocol>) with its own sidecar; returns its
    public port once it is passing."""
    return m.add_instance("db", instance, app_port, proxy_config={"protocol": protocol})[1]


def add_black_hole_instance(m, hole, live_port):
    """Registers an instance of db whose sidecar port is <hole> (never answers a handshake) and
    whose check (TCP on <live_port>) passes."""
    name = m.name("db")
    sid = f"{name}-hole"
    body = sidecar_registration(name, live_port, hole.port, service_id=sid)
    body["Connect"]["SidecarService"]["Checks"][0]["TCP"] = f"{LOOPBACK}:{live_port}"
    m.api.register(body)
    m.registered.append(sid)


class Held:
    """A request sent on its own connection from a thread, whose answer is awaited later."""

    def __init__(self, port, path):
        self.sock = connect(port)
        self.sock.settimeout(30)
        self.status = None
        self.sock.sendall(get(path))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            self.status = response(Reader(self.sock))[0]
        except (OSError, EOFError, AssertionError, ValueError):
            self.status = -1

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        self.thread.join(35)


def dials(proxy):
    """How many dials web's sidecar logged: a new connection to an endpoint, or a pooled one
    taken. A request whose dial is logged was admitted (it is past the limits)."""
    return len(re.findall(r"out target \S+ endpoint|reusing a pooled connection", proxy.log()))


def healthy(proxy):
    """The number of healthy endpoints web's sidecar last logged for its upstream's target."""
    n = re.findall(r"target \S+: (\d+) healthy endpoint\(s\)", proxy.log())
    return int(n[-1]) if n else None


def ask(port, path):
    """(status, body, seconds) of one request on a new application connection."""
    t0 = time.monotonic()
    with connect(port) as s:
        s.sendall(get(path, extra="Connection: close\r\n"))
        st, _, body, _ = response(Reader(s))
    return st, body, time.monotonic() - t0


def test_max_concurrent_requests_overflow_is_503_at_once(mesh, tmp_path):
    """limits.max_concurrent_requests 1: while one slow request (2.5 s) is in flight, another
    on a second application connection is answered 503 at once ("reset reason: overflow"), its
    outbound record says upstream_overflow and names the limit, and the overflow is counted;
    the slow one still gets its 200, and once it is done requests pass again. Without the limit
    the second request waited for its own 200."""
    m = mesh
    args, admin = admin_args()
    up = {"protocol": "http", "limits": {"max_concurrent_requests": 1}}
    app, db, web, alog = l7_pair(m, tmp_path, up_config=up, db_config={"protocol": "http"},
                                 web_args=args)
    before = dials(web.proxy)
    slow = Held(web.up["db"], "/slow?ms=2500")
    try:
        wait_until(lambda: dials(web.proxy) > before, 10, "the slow request in flight")
        st, body, took = ask(web.up["db"], "/second")
        assert st == 503 and b"overflow" in body, (st, body)
        assert took < 2.0, took  # at once, not after the slow one
        slow.thread.join(10)
        assert slow.status == 200
    finally:
        slow.close()
    assert ask(web.up["db"], "/after")[0] == 200
    wait_until(lambda: any(x["path"] == "/second" for x in outbound_requests(alog)), 10,
               "the overflow's record")
    rec = [x for x in outbound_requests(alog) if x["path"] == "/second"][0]
    assert rec["result"] == "upstream_overflow" and rec["status"] == 503, rec
    assert "max_concurrent_requests (1)" in rec["reason"], rec
    assert metric(admin, "upstream_overflow_total", db.name, "max_concurrent_requests") >= 1
    assert metric(admin, "upstream_requests_in_flight", db.name) == 0


def pin(pid, cpus):
    """Sets the CPU affinity of every thread of process <pid> (its workers too)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def back_to_back(web_port, pid, ask_on, n=400, conns=16):
    """Statuses of <n> requests sent one after the other, each as soon as the last one's answer
    is read, round the <conns> connections to <web_port> (ask_on(sock, i) -> status), with the
    caller and every thread of web's sidecar <pid> on one CPU: there a caller woken by an
    answer's last bytes runs before the worker that wrote them goes on."""
    mine = os.sched_getaffinity(0)
    cpu = {min(mine)}
    socks = [connect(web_port) for _ in range(conns)]
    statuses = []
    try:
        pin(pid, cpu)
        os.sched_setaffinity(0, cpu)
        for i in range(n):
            statuses.append(ask_on(socks[i % conns], i))
    finally:
        os.sched_setaffinity(0, mine)
        for s in socks:
            s.close()
    return statuses


def test_answered_request_frees_its_unit_before_the_caller_reads_it(mesh, tmp_path):
    """limits.max_concurrent_requests 1 and HTTP/1.1 requests one after the other over 16
    keep-alive connections spread over web's two workers (back_to_back()): none is refused.
    A request stops counting once its answer is complete, before the answer's last bytes go to
    the caller, so a caller that sends the next at once finds the unit free. When the unit was
    given back only after that write, about one in ten was answered 503 (upstream_overflow)."""
    m = mesh
    up = {"protocol": "http", "limits": {"max_concurrent_requests": 1}}
    app, db, web, alog = l7_pair(m, tmp_path, up_config=up, db_config={"protocol": "http"})

    def ask_on(s, i):
        s.sendall(get(f"/n{i}"))
        return response(Reader(s))[0]

    statuses = back_to_back(web.up["db"], web.proxy.pid, ask_on)
    assert statuses.count(200) == len(statuses), collections.Counter(statuses)
    workers = {x["worker"] for x in outbound_requests(alog)}
    assert len(workers) == 2, workers  # the requests went through both workers


def test_answered_h2_stream_frees_its_unit_before_the_caller_reads_it(mesh, tmp_path):
    """The same for an h2c application (web's outbound HTTP/2 codec) to an http2 upstream:
    each stream stops counting once its END_STREAM is handed to nghttp2, before it is written,
    and none of 400 streams back to back over 16 connections is refused."""
    m = mesh
    app = m.app(H2App)
    alog = str(tmp_path / "web-access.log")
    try:
        db, web = h2_pair(m, "http2", app.port, web_args=("-access-log", alog),
                          up_config={"limits": {"max_concurrent_requests": 1}})
        wait_until(lambda: try_h2(web.up["db"]) == 200, 30, "an HTTP/2 request through the mesh")
        clients = {}

        def ask_on(s, i):
            if s not in clients:
                clients[s] = H2Client(s)
            return clients[s].request(f"/n{i}")[0]

        statuses = back_to_back(web.up["db"], web.proxy.pid, ask_on)
        assert statuses.count(200) == len(statuses), collections.Counter(statuses)
        workers = {x["worker"] for x in outbound_requests(alog)}
        assert len(workers) == 2, workers
    finally:
        drop_defaults(m)


def test_max_pending_requests_overflow_is_503_at_once(mesh, tmp_path):
    """limits.max_pending_requests 1 and db's only endpoint a black hole (TCP accepted, the TLS
    handshake never answered): one request waits for its connection, and the next, on another
    application connection, is answered 503 at once with result upstream_overflow naming the
    limit. Without the limit it waited for a connection too (until the handshake timeout)."""
    m = mesh
    args, admin = admin_args()
    hole = m.app(BlackHole)
    up = {"protocol": "http", "limits": {"max_pending_requests": 1}}
    app, db, web, alog = l7_pair(m, tmp_path, up_config=up, db_config={"protocol": "http"},
                                 web_args=args)
    add_black_hole_instance(m, hole, app.port)
    wait_until(lambda: healthy(web.proxy) == 2, 30, "web to see the black hole")
    m.api.deregister(db.id)  # only the black hole is left
    wait_until(lambda: healthy(web.proxy) == 1, 30, "web to see the black hole alone")
    before = dials(web.proxy)
    waiting = Held(web.up["db"], "/waits")
    try:
        wait_until(lambda: dials(web.proxy) > before, 10, "the first request dialling")
        st, body, took = ask(web.up["db"], "/second")
        assert st == 503 and b"overflow" in body, (st, body)
        assert took < 3.0, took
    finally:
        waiting.close()
    wait_until(lambda: any(x["path"] == "/second" for x in outbound_requests(alog)), 10,
               "the overflow's record")
    rec = [x for x in outbound_requests(alog) if x["path"] == "/second"][0]
    assert rec["result"] == "upstream_overflow", rec
    assert "max_pending_requests (1)" in rec["reason"], rec
    assert metric(admin, "upstream_overflow_total", db.name, "max_pending_requests") >= 1


def test_endpoint_answering_5xx_is_ejected_and_returns(mesh, tmp_path):
    """Two instances of db, one whose application always answers 503. With max_failures 3,
    base_ejection_time 3s and interval 3s (max_ejection_percent left at 10: one of two may
    be ejected, as Consul documents), the bad instance gets three requests in a row, then is
    ejected: web logs it, counts it, and the following requests all go to the good instance
    (200) until the ejection time is over. Then it is back (logged; a 503 again), and its next
    ejection lasts twice as long. Without outlier ejection half the requests kept getting 503.
    The interval is as long as the ejection: the multiplier decays one step per interval the
    returned endpoint stays in, and with 500 ms a loaded machine could take that long for the
    three failures after the return, so the second ejection was 3 s again (and counted)."""
    m = mesh
    args, admin = admin_args()
    bad = m.app(Always503)
    up = {"protocol": "http",
          "passive_health_check": {"max_failures": 3, "interval": "3s",
                                   "base_ejection_time": "3s"}}
    app, db, web, alog = l7_pair(m, tmp_path, up_config=up, db_config={"protocol": "http"},
                                 web_args=args)
    add_http_instance(m, "bad", bad.port)
    web.proxy.wait_log(r"target .*: 2 healthy endpoint\(s\)", 30)
    ejected = r"endpoint \S+ of target \S+ ejected for (\d+) ms after 3 consecutive failures"
    for i in range(80):
        ask(web.up["db"], f"/e{i}")
        if re.search(ejected, web.proxy.log()):
            break
    mt = re.search(ejected, web.proxy.log())
    assert mt and mt.group(1) == "3000", web.proxy.log()[-3000:]
    t_eject = time.monotonic()
    assert metric(admin, "upstream_ejections_total", db.name) == 1
    assert metric(admin, "upstream_ejected_endpoints", db.name) == 1
    # While it is out, every request goes to the good instance.
    n = 0
    while time.monotonic() - t_eject < 2.0:
        st, body, _ = ask(web.up["db"], f"/out{n}")
        assert st == 200, (n, st, body)
        n += 1
    assert n >= 3, n
    # Back after its time: a 503 again, not before about 3 s, and logged.
    wait_until(lambda: ask(web.up["db"], "/back")[0] == 503, 15, "the bad instance back")
    assert time.monotonic() - t_eject >= 2.5
    assert "back in service after its ejection" in web.proxy.log()
    # Three more in a row: ejected for twice the base time.
    wait_until(lambda: ask(web.up["db"], "/again")[0] and
               re.search(ejected.replace(r"(\d+)", "6000"), web.proxy.log()), 30,
               "the second ejection, twice as long")
    assert metric(admin, "upstream_ejections_total", db.name) == 2


def test_max_ejection_percent_keeps_the_share(mesh, tmp_path):
    """Both instances of db answer 503. max_ejection_percent 10 (the default, written out):
    the first to fail max_failures times is ejected (one may always be), the other reaches the
    count too but stays in service (10 % of two endpoints), which web logs and counts; exactly
    one endpoint is ejected, and requests are still answered (by the one left). With 100 both
    would be; without outlier ejection none is."""
    m = mesh
    args, admin = admin_args()
    bad_a = m.app(Always503)
    bad_b = m.app(Always503)
    db = m.add("db", app_port=bad_a.port, proxy_config={"protocol": "http"})
    up = {"protocol": "http",
          "passive_health_check": {"max_failures": 2, "max_ejection_percent": 10,
                                   "base_ejection_time": "60s"}}
    web = m.add("web", upstreams=[{"name": "db", "config": up}], start=False)
    m.start(web, extra_args=args)
    m.wait_passing(db)
    add_http_instance(m, "b", bad_b.port)
    web.proxy.wait_log(r"target .*: 2 healthy endpoint\(s\)", 30)
    for i in range(40):
        assert try_status(web.up["db"], f"/p{i}", extra="Connection: close\r\n") == 503
    wait_until(lambda: (metric(admin, "upstream_ejections_overflow_total", db.name) or 0) >= 1,
               10, "an ejection refused by max_ejection_percent")
    assert metric(admin, "upstream_ejections_total", db.name) == 1
    assert metric(admin, "upstream_ejected_endpoints", db.name) == 1
    assert "stays: max_ejection_percent 10 of 2 endpoints" in web.proxy.log()
    assert len(re.findall(r"ejected for \d+ ms", web.proxy.log())) == 1


def test_max_connections_bounds_upstream_connections_of_l7(mesh, tmp_path):
    """limits.max_connections 1 on an http upstream bounds the connections web's sidecar opens
    to the upstream's endpoints, as Envoy's circuit breaker does (not only the application's
    connections to the listener). One application connection: "/" goes to db on one upstream
    connection; "/two", routed to db2, needs a second one while the first waits in the pool
    (counted, as Envoy counts idle ones): 503 at once, upstream_overflow naming the limit. The
    application connection stays, and "/" is served again on the pooled connection. Without
    the bound "/two" was answered by db2."""
    m = mesh
    args, admin = admin_args()
    for logical in ("db", "db2"):
        m.service_defaults(logical, "http")
        m.wait_passing(m.add(logical, app_port=m.app(HttpApp).port))
    alog = str(tmp_path / "web-access.log")
    web = m.add("web", upstreams=[{"name": "db", "config": {"limits": {"max_connections": 1}}}],
                start=False)
    m.start(web, extra_args=("-access-log", alog, "-workers", "1", *args))
    try:
        m.api.set_config_entry({
            "Kind": "service-router", "Name": m.name("db"),
            "Routes": [{"Match": {"HTTP": {"PathPrefix": "/two"}},
                        "Destination": {"Service": m.name("db2")}}]})
        wait_until(lambda: "/two" in str(admin_get(admin, "/config")[1]), 30, "the router")
        web.proxy.wait_log(r"target %s\S*: 1 healthy endpoint" % re.escape(m.name("db2")), 30)
        with connect(web.up["db"]) as s:
            r = Reader(s)
            s.sendall(get("/one"))
            st, _, body, _ = response(r)
            assert st == 200 and answered_by(m, body) == "db", (st, body)
            s.sendall(get("/two"))
            st, _, body, _ = response(r)
            assert st == 503 and b"overflow" in body, (st, body)
            s.sendall(get("/one-again"))
            st, _, body, _ = response(r)
            assert st == 200 and answered_by(m, body) == "db", (st, body)
        wait_until(lambda: any(x["path"] == "/two" for x in outbound_requests(alog)), 10,
                   "the overflow's record")
        rec = [x for x in outbound_requests(alog) if x["path"] == "/two"][0]
        assert rec["result"] == "upstream_overflow", rec
        assert "max_connections (1)" in rec["reason"], rec
        assert metric(admin, "upstream_overflow_total", m.name("db"), "max_connections") == 1
    finally:
        delete_entries(m)
