"""Inbound rate limits (issue 10 item 7): the service-defaults entry's RateLimits.InstanceLevel
(RequestsPerSecond, RequestsMaxBurst, Routes[] by PathExact / PathPrefix / PathRegex) on db's
L7 sidecar, answered 429 "local_rate_limited", counted in /metrics and the access log.

Consul Community refuses any RateLimits ("Rate limiting is a consul enterprise feature", HTTP
500), and the pinned agent is Community: the entry is then written without RateLimits through
the HTTP API and an AgentInterposer adds them to the agent's answers to connectd's
service-defaults watch, as an Enterprise agent would return them. Everything else (the
blocking query, its index, the 404 once the entry is deleted) is the real agent's. Against an
Enterprise agent the entry is written with its RateLimits as it is.
"""

import json
import re

import pytest

from mesh import LOOPBACK, AgentInterposer, ApiError, admin_args, admin_get, wait_until
from test_l7_inbound import HttpApp, Reader, connect, get, response, try_get


@pytest.fixture
def hop(agent):
    """Requested before mesh, so it outlives the connectd processes that talk through it."""
    h = AgentInterposer(agent.http_addr)
    yield h
    h.stop()


class Limits:
    """db's service-defaults entry (protocol http) with <rate_limits> (InstanceLevel), written
    through the agent's HTTP API, and injected by the hop when the agent refuses them."""

    def __init__(self, m, hop, protocol="http"):
        self.m = m
        self.protocol = protocol
        self.name = m.name("db")
        self.injected = None
        self.version = 0
        self.enterprise = None
        hop.rewrite = self._rewrite

    def _rewrite(self, path, body):
        if (self.injected is None
                or not path.startswith(f"/v1/config/service-defaults/{self.name}")):
            return body
        entry = json.loads(body)
        entry["RateLimits"] = {"InstanceLevel": self.injected}
        return json.dumps(entry).encode()

    def set(self, instance_level):
        """Writes the entry (a new version each time, so the watch sees a change)."""
        self.version += 1
        meta = {"version": str(self.version)}
        if self.enterprise is not False and instance_level is not None:
            try:
                self.m.service_defaults("db", self.protocol, Meta=meta,
                                        RateLimits={"InstanceLevel": instance_level})
                self.enterprise = True
                return
            except ApiError as e:
                if e.status != 500 or "enterprise feature" not in e.body:
                    raise
                self.enterprise = False
        self.injected = instance_level
        self.m.service_defaults("db", self.protocol, Meta=meta)

    def delete(self):
        self.injected = None
        self.m.api.delete_config_entry("service-defaults", self.name)


def setup(m, hop, instance_level, db_args=(), protocol="http", app_port=None):
    """db (<protocol>, rate limited; an HttpApp behind it unless <app_port>) behind web (L4);
    returns (limits, db, web) once connectd has taken the limits (its log says so), before
    any request went through."""
    lim = Limits(m, hop, protocol)
    lim.set(instance_level)
    if app_port is None:
        app_port = m.app(HttpApp).port
    db = m.add("db", app_port=app_port, proxy_config={"protocol": protocol}, start=False)
    db.proxy = m.start_connectd(db.name, ["-sidecar-for", db.id, "-http-addr", hop.http_addr,
                                          "-log-level", "debug", "-workers", "2", *db_args])
    db.proxy.wait_port(db.public_port)
    web = m.add("web", upstreams=("db",))
    m.intend("db", {"web": "allow"})
    m.wait_passing(db)
    db.proxy.wait_log(r"inbound rate limits \(service-defaults entry\)", timeout=30)
    return lim, db, web


def statuses(port, path, n, conns=3):
    """Sends <n> GETs of <path> spread over <conns> connections (keep-alive, so over both
    workers); returns the statuses and the 429 bodies."""
    socks = [connect(port) for _ in range(conns)]
    out, bodies = [], set()
    try:
        readers = [Reader(s) for s in socks]
        for i in range(n):
            s, r = socks[i % conns], readers[i % conns]
            s.sendall(get(path))
            st, _, body, _ = response(r)
            out.append(st)
            if st == 429:
                bodies.add(body)
    finally:
        for s in socks:
            s.close()
    return out, bodies


def test_burst_over_the_limit_is_429_counted_and_logged(hop, mesh, tmp_path):
    """1/s with a burst of 5: one request through, then of 15 quick requests over three
    connections (both workers share one bucket) 4 pass (one more per second gone by), the rest
    are 429 local_rate_limited,
    each logged with result rate_limited and counted in /metrics."""
    m = mesh
    alog = tmp_path / "access.log"
    args, admin = admin_args()
    lim, db, web = setup(m, hop, {"RequestsPerSecond": 1, "RequestsMaxBurst": 5},
                         db_args=(*args, "-access-log", str(alog)))
    # The bucket is full and untouched (a denied or failed request takes no token): the first
    # request through spends one, the burst the rest.
    wait_until(lambda: try_get(web.up["db"], "/ready") == 200, 30, "a request through")
    got, bodies = statuses(web.up["db"], "/a", 15)
    ok = got.count(200)
    assert 4 <= ok <= 6 and got.count(429) == 15 - ok, got
    assert bodies == {b"local_rate_limited"}
    recs = [json.loads(x) for x in alog.read_text().splitlines() if x.strip()]
    limited = [r for r in recs if r.get("path") == "/a" and r.get("status") == 429]
    assert limited and all(r["result"] == "rate_limited" for r in limited), limited
    assert "rate limit: 1/s, burst 5" in limited[0]["reason"]
    _, text = admin_get(admin, "/metrics")
    mt = re.search(r"^connectd_http_rate_limited_total (\d+)$", text, re.M)
    assert mt and int(mt.group(1)) >= 15 - ok, text


def test_route_limit_applies_only_to_its_path(hop, mesh):
    """No top-level limit; Routes: PathPrefix /limited (burst 2), PathExact /exact (burst 1),
    PathRegex /re/[0-9]+ (burst 1). Each limits its own paths only; other paths never see a
    429, and the first matching route decides. /config shows the limits in force."""
    m = mesh
    args, admin = admin_args()
    lim, db, web = setup(m, hop, {"Routes": [
        {"PathPrefix": "/limited", "RequestsPerSecond": 1, "RequestsMaxBurst": 2},
        {"PathExact": "/exact", "RequestsPerSecond": 1, "RequestsMaxBurst": 1},
        {"PathRegex": "/re/[0-9]+", "RequestsPerSecond": 1, "RequestsMaxBurst": 1},
    ]}, db_args=args)
    assert json.loads(admin_get(admin, "/config")[1])["rate_limits"] == {
        "requests_per_second": 0, "requests_max_burst": 0, "routes": [
            {"path_prefix": "/limited", "requests_per_second": 1, "requests_max_burst": 2},
            {"path_exact": "/exact", "requests_per_second": 1, "requests_max_burst": 1},
            {"path_regex": "/re/[0-9]+", "requests_per_second": 1, "requests_max_burst": 1}]}
    port = web.up["db"]
    wait_until(lambda: try_get(port, "/free") == 200, 30, "a request through")
    free, _ = statuses(port, "/free", 20)
    assert free == [200] * 20
    lim_got, _ = statuses(port, "/limited/x", 8)
    assert 2 <= lim_got.count(200) <= 3 and 429 in lim_got, lim_got
    ex, _ = statuses(port, "/exact", 6)
    assert 1 <= ex.count(200) <= 2 and 429 in ex, ex
    near, _ = statuses(port, "/exact/not", 10)  # not exact: no route, no top-level limit
    assert near == [200] * 10
    rx, _ = statuses(port, "/re/42", 6)
    assert 1 <= rx.count(200) <= 2 and 429 in rx, rx
    rx_not, _ = statuses(port, "/re/abc", 10)
    assert rx_not == [200] * 10


def test_changing_and_removing_the_entry_applies_live(hop, mesh):
    """A limit hit on an open connection; lowering it applies to that connection's next
    requests, and deleting the entry (the agent then answers 404) lifts it, without a
    restart or a new connection."""
    m = mesh
    lim, db, web = setup(m, hop, {"RequestsPerSecond": 1, "RequestsMaxBurst": 3})
    with connect(web.up["db"]) as s:
        r = Reader(s)

        def status(path="/live"):
            s.sendall(get(path))
            return response(r)[0]

        wait_until(lambda: status() == 429, 20, "a 429")
        lim.delete()
        wait_until(lambda: status() == 200, 20, "the limit lifted")
        assert [status() for _ in range(20)] == [200] * 20
        lim.set({"RequestsPerSecond": 1, "RequestsMaxBurst": 2})
        wait_until(lambda: status() == 429, 20, "the limit back")


def test_grpc_call_over_the_limit_is_resource_exhausted(hop, mesh):
    """protocol grpc, 1/s with a burst of 2: calls past the burst end with a trailers-only
    grpc-status 8 (RESOURCE_EXHAUSTED) "local_rate_limited" from connectd."""
    grpc = pytest.importorskip("grpc")
    from test_l7_h2 import grpc_code, grpc_server, grpc_unary
    m = mesh
    srv, port = grpc_server()
    try:
        lim, db, web = setup(m, hop, {"RequestsPerSecond": 1, "RequestsMaxBurst": 2},
                             protocol="grpc", app_port=port)
        up = web.up["db"]
        wait_until(lambda: grpc_code(up) == grpc.StatusCode.OK, 30, "a call through the mesh")
        codes = [grpc_code(up) for _ in range(6)]
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        with pytest.raises(grpc.RpcError) as e:
            grpc_unary(up)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.details() == "local_rate_limited"
    finally:
        srv.stop(0)


def test_nothing_is_served_before_the_limits_are_known(hop, mesh):
    """While the agent fails connectd's first service-defaults read (a 500 from the hop), db's
    sidecar is not ready, says why, and serves nothing: a request must not slip past limits it
    has not read yet. Once the agent answers, the limits are in force from the first request.
    Before, the sidecar served at once, unlimited, whatever the entry said."""
    m = mesh
    lim = Limits(m, hop)
    lim.set({"RequestsPerSecond": 1, "RequestsMaxBurst": 1})
    hop.canned[f"/v1/config/service-defaults/{lim.name}"] = (500, b"agent error")
    args, admin = admin_args()
    db = m.add("db", app_port=m.app(HttpApp).port, proxy_config={"protocol": "http"},
               start=False)
    db.proxy = m.start_connectd(db.name, ["-sidecar-for", db.id, "-http-addr", hop.http_addr,
                                          *args])
    web = m.add("web", upstreams=("db",))
    m.intend("db", {"web": "allow"})
    wait_until(lambda: "waiting for the service-defaults entry" in admin_get(admin, "/ready")[1],
               30, "/ready naming the service-defaults entry")
    assert admin_get(admin, "/ready")[0] == 503
    assert try_get(web.up["db"], "/a") != 200
    del hop.canned[f"/v1/config/service-defaults/{lim.name}"]
    db.proxy.wait_log(r"inbound rate limits \(service-defaults entry\)", timeout=60)
    wait_until(lambda: admin_get(admin, "/ready")[0] == 200, 30, "ready once the entry is read")
    m.wait_passing(db)
    wait_until(lambda: try_get(web.up["db"], "/a") in (200, 429), 30, "a request through")
    got = [try_get(web.up["db"], "/a") for _ in range(4)]
    assert 429 in got, got
    assert json.loads(admin_get(admin, "/config")[1])["rate_limits"] == {
        "requests_per_second": 1, "requests_max_burst": 1, "routes": []}
