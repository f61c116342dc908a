"""Outbound L7 load balancing (issue 10): the service-resolver's LoadBalancer chooses the
endpoint of each request inside its target, as Envoy's cluster policy does, and a pooled
connection to THAT endpoint serves it (or it is dialled). Three instances of db, each with
its own sidecar and app: which instance answered is read from the app object that received
the request (each request carries a unique id in its query).

The resolver's LoadBalancer reaches web's sidecar through the REAL agent's compiled
discovery chain; web's /config shows when it has it.
"""

import json
import re
import socket
import threading

import h2.config
import h2.connection
import h2.events

from mesh import LOOPBACK, admin_args, admin_get, wait_until
from test_l7_translate import H2JsonApp
from test_l7_inbound import HttpApp, Reader, connect, get, response
from test_l7_routing import delete_entries
from test_routes_config import upstream_config, wait_table


class _Tap:
    """The server side of one app connection: records what each JSON answer echoes (the
    request's target and headers) in the app's <seen>."""

    def __init__(self, sock, app):
        self.sock = sock
        self.app = app

    def recv(self, n):
        data = self.sock.recv(n)
        with self.app.lock:
            self.app.arrived.update(int(x) for x in re.findall(rb"rid=(\d+)", data))
        return data

    def sendall(self, data):
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and b"application/json" in head:
            try:
                info = json.loads(body)
                with self.app.lock:
                    self.app.seen.append(info)
            except ValueError:
                pass
        return self.sock.sendall(data)

    def close(self):
        return self.sock.close()


class TellingApp(HttpApp):
    """HttpApp that keeps what each request it answered carried."""

    def __init__(self, label):
        self.label = label
        self.seen = []
        self.arrived = set()  # ids of the requests it started to read
        super().__init__()

    def _serve(self, c):
        super()._serve(_Tap(c, self))

    def answered(self, rid):
        with self.lock:
            return any(re.search(rf"[?&]rid={rid}(&|$)", i["target"]) for i in self.seen)


def add_instance(m, instance, app):
    """One more instance of db (service ID db-<tag>-<instance>) with its own sidecar and app;
    waits until it is passing."""
    return m.add_instance("db", instance, app.port)[0]


def lb_mesh(m):
    """db (protocol http) as three instances a, b, c, and web (one worker, so that one
    round-robin cursor serves every request) with upstream db and an admin endpoint.
    Returns (web, admin port, apps)."""
    m.service_defaults("db", "http")
    apps = [m.app(TellingApp, x) for x in ("a", "b", "c")]
    for app in apps:
        add_instance(m, app.label, app)
    web = m.add("web", upstreams=["db"], start=False)
    args, admin = admin_args()
    m.start(web, extra_args=[*args, "-workers", "1"])
    return web, admin, apps


_rid = iter(range(1, 1 << 30))


def ask(sock, apps, extra=""):
    """One request on <sock>; returns (label of the app that answered, response headers)."""
    rid = next(_rid)
    sock.sendall(get(f"/x?rid={rid}", extra=extra))
    st, headers, body, _ = response(Reader(sock))
    assert st == 200, (st, body)
    who = [a.label for a in apps if a.answered(rid)]
    assert len(who) == 1, (rid, who)
    return who[0], headers


def ask_new(port, apps, extra=""):
    """One request on a new connection from the application."""
    with connect(port) as s:
        return ask(s, apps, extra)


def set_lb(m, admin, lb):
    """Writes db's service-resolver with LoadBalancer <lb> and waits until web has it, and
    the three endpoints."""
    m.api.set_config_entry({"Kind": "service-resolver", "Name": m.name("db"),
                            "LoadBalancer": lb})

    def has():
        u = upstream_config(admin, m.name("db"))
        if u is None:
            return False
        pols = [r["load_balancer"]["policy"] for r in u.get("resolvers", [])]
        eps = [t["healthy_endpoints"] for t in u.get("targets", [])]
        return pols == [lb["Policy"]] and eps == [3]
    wait_until(has, 30, f"web's table with the {lb['Policy']} policy and three endpoints")


def test_default_policy_spreads_requests_in_sequence(mesh):
    """Without a LoadBalancer the dial chooses by the power of two choices over the requests
    in flight (DESIGN.md, Envoy's least_request default): 60 requests in sequence, on new
    connections and on one keep-alive connection, reach every instance, each a fair share.
    Before, a pooled connection to whichever endpoint had one first served every request, so
    that all of them went to one instance."""
    m = mesh
    web, admin, apps = lb_mesh(m)
    wait_table(admin, m.name("db"),
               lambda u: [t["healthy_endpoints"] for t in u.get("targets", [])] == [3],
               "web's table with three endpoints of db")
    seq = [ask_new(web.up["db"], apps)[0] for _ in range(30)]
    with connect(web.up["db"]) as s:
        seq += [ask(s, apps)[0] for _ in range(30)]
    # Each instance's share is binomial(60, 1/3): fewer than 6 happens about once in 10^4 runs.
    counts = {a.label: seq.count(a.label) for a in apps}
    assert min(counts.values()) >= 6, (counts, seq)


def test_round_robin_cycles_over_every_instance(mesh):
    """round_robin: consecutive requests, on new connections and on one keep-alive
    connection, go to the three instances in turn (each three in a row are all three, and
    the order repeats). Before, the dial took a pooled connection to whichever endpoint had
    one first, so that requests in sequence all went to the same instance."""
    m = mesh
    web, admin, apps = lb_mesh(m)
    try:
        set_lb(m, admin, {"Policy": "round_robin"})
        seq = [ask_new(web.up["db"], apps)[0] for _ in range(9)]
        with connect(web.up["db"]) as s:
            seq += [ask(s, apps)[0] for _ in range(9)]
        for i in range(len(seq) - 2):
            assert set(seq[i:i + 3]) == {"a", "b", "c"}, seq
        assert seq[3:] == seq[:-3], seq
    finally:
        delete_entries(m)


def test_ring_hash_by_header_keeps_a_user_on_one_instance(mesh):
    """ring_hash on the x-user header: every request of one user, on new connections and on
    one keep-alive connection (whose upstream connection goes back to the pool when the next
    user hashes elsewhere), reaches one instance, while 12 users spread over at least two.
    Before, the policy was ignored: requests in sequence took the same pooled connection
    whatever the user, so all users landed on one instance."""
    m = mesh
    web, admin, apps = lb_mesh(m)
    try:
        set_lb(m, admin, {"Policy": "ring_hash",
                          "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}]})
        home = {}
        for u in range(12):
            got = {ask_new(web.up["db"], apps, f"x-user: user-{u}\r\n")[0] for _ in range(4)}
            assert len(got) == 1, (u, got)
            home[u] = got.pop()
        with connect(web.up["db"]) as s:
            for _ in range(2):
                for u in range(12):
                    who, _ = ask(s, apps, f"x-user: user-{u}\r\n")
                    assert who == home[u], (u, who, home)
        assert len(set(home.values())) >= 2, home
    finally:
        delete_entries(m)


COOKIE = re.compile(r'^route="([0-9a-f]{16})"; Max-Age=60; Path=/; HttpOnly$')


def test_cookie_policy_sets_a_cookie_then_sticks(mesh):
    """maglev on the cookie "route" with a TTL: a request without the cookie gets
    Set-Cookie: route="<16 hex digits>"; Max-Age=60; Path=/; HttpOnly (as Envoy generates
    it), and every request carrying it goes to the instance that served the first one; a
    request with the cookie gets none set. Clients (connections) get different cookies,
    which spread over at least two instances. Before, no cookie was set and the instance
    did not follow it."""
    m = mesh
    web, admin, apps = lb_mesh(m)
    try:
        set_lb(m, admin, {"Policy": "maglev", "HashPolicies": [
            {"Field": "cookie", "FieldValue": "route",
             "CookieConfig": {"TTL": "60s", "Path": "/"}}]})
        homes = set()
        for _ in range(8):
            first, h = ask_new(web.up["db"], apps)
            cookies = h.get("set-cookie", [])
            assert len(cookies) == 1, h
            mt = COOKIE.match(cookies[0])
            assert mt, cookies
            jar = f"Cookie: other=1; route={mt.group(1)}\r\n"
            for _ in range(4):
                who, h2 = ask_new(web.up["db"], apps, jar)
                assert who == first, (mt.group(1), who, first)
                assert "set-cookie" not in h2, h2
            homes.add(first)
        assert len(homes) >= 2, homes
    finally:
        delete_entries(m)


def test_least_request_sends_concurrent_requests_to_idle_instances(mesh):
    """least_request (ChoiceCount 50): three slow requests in flight at once, each started
    once the previous one reached its app, go to three different instances (the one with
    the fewest active requests among 50 draws), three rounds in a row, so the counts also go
    back down when a request ends. Before, each request took a uniform draw: all three
    rounds distinct by chance is (2/9)^3, about 1 %."""
    m = mesh
    web, admin, apps = lb_mesh(m)
    try:
        set_lb(m, admin, {"Policy": "least_request", "LeastRequestConfig": {"ChoiceCount": 50}})
        for _ in range(3):
            got, threads = {}, []

            def slow(rid):
                with connect(web.up["db"]) as s:
                    s.sendall(get(f"/slow?ms=1500&rid={rid}"))
                    st, _, body, _ = response(Reader(s))
                    got[rid] = (st, [a.label for a in apps if a.answered(rid)])

            for _ in range(3):
                rid = next(_rid)
                t = threading.Thread(target=slow, args=(rid,), daemon=True)
                t.start()
                threads.append(t)
                wait_until(lambda: any(rid in a.arrived for a in apps), 10,
                           f"request {rid} at an app")
            for t in threads:
                t.join(20)
            assert len(got) == 3 and all(st == 200 and len(w) == 1 for st, w in got.values()), got
            assert {w[0] for _, w in got.values()} == {"a", "b", "c"}, got
    finally:
        delete_entries(m)


def h2_streams_one_by_one(port, paths, arrived, answers=True):
    """On one new h2c connection (prior knowledge), opens a GET stream for each of <paths>,
    each once arrived(i) says the previous one (index i) reached its app, then reads until
    every stream ended; returns the :status of each (None: none came), in order. Without
    <answers> it closes the connection (streams in flight) once the last one arrived."""
    with socket.create_connection((LOOPBACK, port), timeout=30) as s:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        sids, done, status = [], set(), {}
        for i, path in enumerate(paths):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"),
                                    (":authority", "db"), (":path", path)], end_stream=True)
            s.sendall(conn.data_to_send())
            sids.append(sid)
            wait_until(lambda: arrived(i), 10, f"stream {sid} ({path}) at an app")
        if not answers:
            return []
        while len(done) < len(sids):
            chunk = s.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    status[ev.stream_id] = dict(ev.headers)[":status"]
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done.add(ev.stream_id)
            s.sendall(conn.data_to_send())
        return [status.get(sid) for sid in sids]


def test_least_request_counts_every_h2c_stream_in_flight(mesh):
    """least_request (ChoiceCount 50) for an h2c application: on ONE connection, twelve slow
    streams opened one after another (each once the previous one reached its app) go three
    by three to the three instances, since each stream in flight counts as an active request
    of its instance until it ends. Before, the session counted only its latest stream's
    request, so the third stream of each three avoided only the second's instance: all four
    rounds distinct by chance is (1/2)^4."""
    m = mesh
    web, admin, apps = lb_mesh(m)
    try:
        set_lb(m, admin, {"Policy": "least_request", "LeastRequestConfig": {"ChoiceCount": 50}})
        rids = [next(_rid) for _ in range(12)]
        statuses = h2_streams_one_by_one(
            web.up["db"], [f"/slow?ms=6000&rid={rid}" for rid in rids],
            lambda i: any(rids[i] in a.arrived for a in apps))
        assert statuses == ["200"] * 12, statuses
        where = [[a.label for a in apps if rid in a.arrived] for rid in rids]
        assert all(len(w) == 1 for w in where), where
        rounds = [{w[0] for w in where[k:k + 3]} for k in range(0, 12, 3)]
        assert all(r == {"a", "b", "c"} for r in rounds), where
    finally:
        delete_entries(m)


class HoldingH2App(H2JsonApp):
    """H2JsonApp (h2c) that records the rid=N of each request it gets in <arrived>; /hold...
    is never answered."""

    def __init__(self, label):
        self.label = label
        self.arrived = set()
        super().__init__()

    def _answer(self, conn, sid, r, pending):
        path = r["headers"][":path"][0]
        self.arrived.update(int(x) for x in re.findall(r"rid=(\d+)", path))
        if not path.startswith("/hold"):
            H2JsonApp._answer(conn, sid, r, pending)


def test_least_request_counts_every_stream_to_an_http2_upstream(mesh):
    """The same for an http2 upstream (each stream a stream of a shared HTTP/2 connection to
    the endpoint the policy chose): twelve streams held by three h2c instances, opened one by
    one on one connection, go three by three to the three instances; then the application
    closes its connection, and its streams' counts go with it (a new round still spreads).
    Before, the third stream of each three avoided only the second's instance."""
    m = mesh
    m.service_defaults("db", "http2")
    apps = [m.app(HoldingH2App, x) for x in ("a", "b", "c")]
    for app in apps:
        m.add_instance("db", app.label, app.port, proxy_config={"protocol": "http2"})
    web = m.add("web", upstreams=[{"name": "db", "config": {"protocol": "http2"}}], start=False)
    args, admin = admin_args()
    m.start(web, extra_args=[*args, "-workers", "1"])
    try:
        set_lb(m, admin, {"Policy": "least_request", "LeastRequestConfig": {"ChoiceCount": 50}})
        def open_connections():
            text = admin_get(admin, "/metrics")[1]
            return sum(float(x) for x in
                       re.findall(r"^connectd_connections_active(?:\{.*\})? (\S+)$", text, re.M))
        idle = open_connections()
        for n in (12, 6):
            rids = [next(_rid) for _ in range(n)]
            h2_streams_one_by_one(web.up["db"], [f"/hold?rid={rid}" for rid in rids],
                                  lambda i: any(rids[i] in a.arrived for a in apps),
                                  answers=False)
            # The session and its streams are over (their counts released) before the next.
            wait_until(lambda: open_connections() == idle, 10, "the application's connection gone")
            where = [[a.label for a in apps if rid in a.arrived] for rid in rids]
            assert all(len(w) == 1 for w in where), where
            rounds = [{w[0] for w in where[k:k + 3]} for k in range(0, n, 3)]
            assert all(r == {"a", "b", "c"} for r in rounds), where
    finally:
        delete_entries(m)
