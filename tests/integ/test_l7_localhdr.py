"""Outbound routes seen from outside (issue 10, items 2 and 9): a route's ResponseHeaders on
connectd's own answers, and the per-route and per-upstream counters of /metrics.

* connectd's own answer to a routed request (503 when the route's service has no healthy
  instance, 504 when its RequestTimeout passes) carries the route's ResponseHeaders Add /
  Set / Remove, as Envoy finalizes a local reply with the route it selected; over HTTP/1.1 and
  over an h2c application's streams to an http2 upstream.
* connectd_http_route_requests_total and the other per-route counters never go back when the
  router changes (a new route table): a route index that stays counts on.
* Per route, the retries its policy made and the requests its timeouts cut; per upstream, the
  idle pooled connections.

db's application is test_l7_retry's ScriptedApp (/slow?ms=N answers after N ms, /flaky/<key>
fails as asked); db3 is a service with no instance at all.
"""

from mesh import admin_get, metric, parse_metrics, wait_until
from test_l7_h2 import H2App
from test_l7_inbound import Reader, connect, get, response
from test_l7_retry import delete_router, retry_mesh
from test_l7_route_features import h2_streams


def routes(m, rs):
    """A service-router for db with routes <rs> (the compiler adds the catch-all to db)."""
    m.api.set_config_entry({"Kind": "service-router", "Name": m.name("db"), "Routes": rs})


def answer(port, path):
    """(status, headers, body) of one request on a new application connection."""
    with connect(port) as s:
        s.sendall(get(path))
        st, hs, body, _ = response(Reader(s))
    return st, hs, body


def wait_answer(port, path, pred, what):
    """Asks <path> until pred(status, headers) holds (the router in use); returns the answer."""
    got = []

    def ok():
        try:
            got[:] = [answer(port, path)]
        except (OSError, EOFError, AssertionError, ValueError):
            return False
        return pred(got[0][0], got[0][1])
    wait_until(ok, 30, what)
    return got[0]


def test_route_response_headers_on_local_answers(mesh, tmp_path):
    """A route to db3 (no instance) whose ResponseHeaders add x-route: dead answers 503 with
    x-route: dead; a route to db with RequestTimeout 300ms whose ResponseHeaders add x-route:
    r1, set x-set and remove content-type answers a slow request 504 with those. The catch-all's answers have no x-route. Before,
    connectd's own answers went without any of the route's ResponseHeaders."""
    m = mesh
    m.service_defaults("db3", "http")
    app, db, web, alog, admin = retry_mesh(m, tmp_path)
    port = web.up["db"]
    try:
        routes(m, [
            {"Match": {"HTTP": {"PathPrefix": "/dead"}},
             "Destination": {"Service": m.name("db3"),
                             "ResponseHeaders": {"Add": {"x-route": "dead"}}}},
            {"Match": {"HTTP": {"PathPrefix": "/slow"}},
             "Destination": {"Service": m.name("db"), "RequestTimeout": "300ms",
                             "ResponseHeaders": {"Add": {"x-route": "r1"},
                                                 "Set": {"x-set": "s"},
                                                 "Remove": ["content-type"]}}},
        ])
        st, hs, body = wait_answer(port, "/slow?ms=1500", lambda st, hs: st == 504,
                                   "the router in use (504 at the route's timeout)")
        assert body == b"upstream request timeout", body
        assert hs.get("x-route") == ["r1"] and hs.get("x-set") == ["s"], hs
        assert "content-type" not in hs, hs
        st, hs, body = answer(port, "/dead/x")
        assert st == 503 and hs.get("x-route") == ["dead"], (st, hs, body)
        assert hs.get("content-type") == ["text/plain"], hs
        st, hs, _ = answer(port, "/other")
        assert st == 200 and "x-route" not in hs, (st, hs)

    finally:
        delete_router(m)


def test_route_response_headers_on_h2c_local_answers(mesh):
    """An h2c application's stream (mux_h2) to an http2 upstream whose route goes to db3 (no
    instance) and adds x-route: dead is answered 503 with x-route: dead; a stream to the
    catch-all gets db's 200 without it. Before, mux_h2's own answers had no route header."""
    m = mesh
    for logical in ("db", "db3"):
        m.service_defaults(logical, "http2")
    m.wait_passing(m.add("db", app_port=m.app(H2App).port, proxy_config={"protocol": "http2"}))
    web = m.add("web", upstreams=["db"])
    try:
        routes(m, [{"Match": {"HTTP": {"PathPrefix": "/dead"}},
                    "Destination": {"Service": m.name("db3"),
                                    "ResponseHeaders": {"Add": {"x-route": "dead"}}}}])
        got = {}

        def routed():
            try:
                got.update(h2_streams(web.up["db"], ["/dead/h2", "/fine"], decode=bytes))
            except (OSError, EOFError, KeyError, ValueError):
                return False
            return got["/dead/h2"][0] == 503
        wait_until(routed, 30, "the router in use (503 from the route to db3)")
        st, hs, body = got["/dead/h2"]
        assert hs.get("x-route") == ["dead"], (st, hs, body)
        st, hs, body = got["/fine"]
        assert st == 200 and "x-route" not in hs, (st, hs, body)
    finally:
        delete_router(m)


def route_metric(admin, upstream, name, route, **labels):
    """The value of connectd_<name>{upstream=<upstream>,route="<route>",...} (0 when absent)."""
    text = admin_get(admin, "/metrics")[1]
    return metric(parse_metrics(text), "connectd_" + name, upstream=upstream, route=str(route),
                  **labels)


def test_route_counters_survive_a_router_change(mesh, tmp_path):
    """N requests on route 0 (/r), then the router gains a second route (/q) and keeps /r as
    route 0, then M more on /r: connectd_http_route_requests_total for route 0, 2xx, is the
    count before plus N + M. Before, a changed chain built a new table whose counters started
    at zero, so the counter went back to M (a Prometheus counter must not decrease)."""
    m = mesh
    app, db, web, alog, admin = retry_mesh(m, tmp_path, admin=True)
    up = web.up["db"]

    def requests(route):
        return route_metric(admin, m.name("db"), "http_route_requests_total", route,
                            code_class="2xx")
    r = {"Match": {"HTTP": {"PathPrefix": "/r"}},
         "Destination": {"Service": m.name("db"), "ResponseHeaders": {"Add": {"x-route": "r"}}}}
    q = {"Match": {"HTTP": {"PathPrefix": "/q"}},
         "Destination": {"Service": m.name("db"), "ResponseHeaders": {"Add": {"x-route": "q"}}}}
    try:
        routes(m, [r])
        wait_answer(up, "/r/warm", lambda st, hs: hs.get("x-route") == ["r"], "route /r in use")
        wait_until(lambda: requests(0) > 0, 10, "route 0 counted")
        before = requests(0)
        n, k = 4, 3
        for i in range(n):
            assert answer(up, f"/r/{i}")[0] == 200
        wait_until(lambda: requests(0) == before + n, 10, f"route 0 at {before + n}")
        routes(m, [r, q])
        wait_answer(up, "/q/warm", lambda st, hs: hs.get("x-route") == ["q"], "route /q in use")
        for i in range(k):
            assert answer(up, f"/r/after{i}")[0] == 200
        want = before + n + k
        wait_until(lambda: requests(0) == want, 10, f"route 0 at {want}")
        assert requests(1) >= 1, requests(1)
    finally:
        delete_router(m)


def test_per_route_retries_timeouts_and_pool_per_upstream(mesh, tmp_path):
    """Route 0 (/flaky, RetryOn 5xx) retries a request that fails once: its
    connectd_http_route_retries_total grows by 1, route 1's does not; route 1 (/slow,
    RequestTimeout 300ms) cuts a slow request: its connectd_http_route_timeouts_total grows by
    1, route 0's does not. The idle pooled connections to db show per upstream
    (connectd_upstream_pool_idle_connections_by_upstream) as the process-wide gauge does.
    Before, retries and timeouts were counted only for the whole process, and the pool too."""
    m = mesh
    app, db, web, alog, admin = retry_mesh(m, tmp_path, admin=True)
    up = web.up["db"]
    try:
        routes(m, [
            {"Match": {"HTTP": {"PathPrefix": "/flaky"}},
             "Destination": {"Service": m.name("db"), "RetryOn": ["5xx"], "NumRetries": 2}},
            {"Match": {"HTTP": {"PathPrefix": "/slow"}},
             "Destination": {"Service": m.name("db"), "RequestTimeout": "300ms"}},
        ])
        wait_answer(up, "/slow?ms=1500", lambda st, hs: st == 504, "the router in use")

        def counts():
            return [route_metric(admin, m.name("db"), f"http_route_{c}_total", k)
                    for c in ("retries", "timeouts") for k in (0, 1)]
        wait_until(lambda: counts()[3] > 0, 10, "route 1's timeout counted")
        r0, r1, t0, t1 = counts()
        assert answer(up, "/flaky/once?fail=1&code=503")[0] == 200
        assert answer(up, "/slow?ms=1500")[0] == 504
        want = [r0 + 1, r1, t0, t1 + 1]
        wait_until(lambda: counts() == want, 10, f"retries and timeouts per route {want}")

        def pooled():
            ms = parse_metrics(admin_get(admin, "/metrics")[1])
            per = metric(ms, "connectd_upstream_pool_idle_connections_by_upstream",
                         upstream=m.name("db"))
            return per >= 1 and per == metric(ms, "connectd_upstream_pool_idle_connections")
        assert answer(up, "/fine")[0] == 200
        wait_until(pooled, 10, "db's idle pooled connection counted for db")
    finally:
        delete_router(m)
