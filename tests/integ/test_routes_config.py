"""An L7 upstream's route table (issue 10 item 1), compiled from the discovery chain the REAL
agent serves for service-router, service-splitter and service-resolver config entries written
through its HTTP API, as the sidecar's /config shows it: routes with their match and
destination, splits with weights, resolvers with their targets and load-balancing policy.

Nothing routes traffic through the table yet (the muxes will call route_match later), so
these tests read /config only: the table follows a router change live, unchanged chain targets
keep their health watches, and a chain connectd refuses (a header value with CR LF, which the
agent accepts and an HTTP head cannot carry) keeps the last good table.
"""

import json
import urllib.parse

from mesh import admin_args, admin_get, wait_until
from test_l7_inbound import HttpApp
from test_l7_outbound import try_status


def db_entries(m):
    """The db resolver (subsets v1/v2, failover to db2, ring_hash), a 90/10 splitter and a
    router with two routes in front of the compiler's catch-all."""
    db, db2 = m.name("db"), m.name("db2")
    resolver = {
        "Kind": "service-resolver", "Name": db, "ConnectTimeout": "3s", "RequestTimeout": "7s",
        "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                    "v2": {"Filter": "Service.Meta.version == v2", "OnlyPassing": True}},
        "Failover": {"*": {"Targets": [{"Service": db2}]}},
        "LoadBalancer": {
            "Policy": "ring_hash",
            "RingHashConfig": {"MinimumRingSize": 1024, "MaximumRingSize": 8192},
            "HashPolicies": [
                {"Field": "header", "FieldValue": "x-user"},
                {"Field": "cookie", "FieldValue": "sess",
                 "CookieConfig": {"TTL": "10s", "Path": "/"}},
                {"SourceIP": True, "Terminal": True}]},
    }
    splitter = {
        "Kind": "service-splitter", "Name": db, "Splits": [
            {"Weight": 90, "ServiceSubset": "v1", "RequestHeaders": {"Set": {"x-split": "v1"}}},
            {"Weight": 10, "ServiceSubset": "v2",
             "ResponseHeaders": {"Add": {"x-s": "2"}, "Remove": ["x-r"]}}],
    }
    router = router_entry(m, [
        {"Match": {"HTTP": {
            "PathPrefix": "/api", "CaseInsensitive": True,
            "Header": [{"Name": "x-a", "Exact": "b", "Invert": True},
                       {"Name": "x-p", "Present": True}],
            "QueryParam": [{"Name": "q", "Exact": "1"}, {"Name": "r", "Present": True},
                           {"Name": "s", "Regex": "a.*"}],
            "Methods": ["GET", "PUT"]}},
         "Destination": {
             "Service": db, "ServiceSubset": "v2", "PrefixRewrite": "/", "RequestTimeout": "2s",
             "IdleTimeout": "1500ms", "NumRetries": 3, "RetryOnConnectFailure": True,
             "RetryOn": ["5xx", "reset"], "RetryOnStatusCodes": [503, 429],
             "RequestHeaders": {"Add": {"x-add": "1"}, "Set": {"x-set": "2"},
                                "Remove": ["x-rm"]}}},
        {"Match": {"HTTP": {"PathRegex": "/re[gx]+"}}, "Destination": {"Service": db2}},
    ])
    return resolver, splitter, router


def router_entry(m, routes):
    return {"Kind": "service-router", "Name": m.name("db"), "Routes": routes}


def delete_entries(m):
    """Routers first: the agent refuses to remove what a remaining entry depends on."""
    for kind in ("service-router", "service-splitter", "service-resolver"):
        try:
            m.api.delete(f"/v1/config/{kind}/" + urllib.parse.quote(m.name("db")))
        except Exception:  # noqa: BLE001 (cleanup: the agent may be gone)
            pass


def upstream_config(port, name):
    status, body = admin_get(port, "/config")
    if status != 200:
        return None
    for u in json.loads(body)["upstreams"]:
        if u["destination_name"] == name:
            return u
    return None


def wait_table(port, name, pred, what, timeout=30):
    """Waits until the upstream's /config entry satisfies <pred>; returns it."""
    got = {}

    def ok():
        u = upstream_config(port, name)
        got["u"] = u
        return u if u is not None and pred(u) else None
    try:
        return wait_until(ok, timeout, what)
    except AssertionError:
        raise AssertionError(f"{what}; last /config entry: {json.dumps(got.get('u'))}") from None


def setup(m):
    m.service_defaults("db", "http")
    m.service_defaults("db2", "http")
    m.add("db", start=False)
    m.add("db2", start=False)
    web = m.add("web", upstreams=["db"], start=False)
    args, admin = admin_args()
    m.start(web, extra_args=args)
    return web, admin


def test_config_shows_the_route_table_and_follows_a_router_change(mesh):
    """/config shows every field of the compiled chain: the two routes in order (match and
    destination), the catch-all to the 90/10 splitter, the resolvers with their targets
    (primary, then failover), timeouts and ring_hash policy. Then the router is replaced
    through the API and the table follows live, while the chain targets that stay keep
    their health watches (each is started once). Before the route table there was none in
    /config; before the decoder read Routes from the router node itself (as the agent
    sends it) a chain with a router was refused outright."""
    m = mesh
    web, admin = setup(m)
    db, db2 = m.name("db"), m.name("db2")
    tgt = {k: f"{k}.{db}.default.default.dc1" for k in ("v1", "v2")}
    tgt["db2"] = f"{db2}.default.default.dc1"
    try:
        for e in db_entries(m):
            m.api.set_config_entry(e)
        u = wait_table(admin, db, lambda u: len(u.get("routes", [])) == 3,
                       "the router's two routes and the catch-all in /config")
        assert u["protocol"] == "http"
        r0, r1, r2 = u["routes"]
        assert [r["index"] for r in u["routes"]] == [0, 1, 2]
        assert r0["match"] == {
            "path_prefix": "/api", "case_insensitive": True,
            "headers": [
                {"name": "x-a", "exact": "b", "ignore_case": False, "invert": True},
                {"name": "x-p", "present": True, "ignore_case": False, "invert": False}],
            "query_params": [{"name": "q", "exact": "1"}, {"name": "r", "present": True},
                             {"name": "s", "regex": "a.*"}],
            "methods": ["GET", "PUT"]}, r0
        assert r0["destination"] == {
            "prefix_rewrite": "/", "request_timeout_ms": 2000, "idle_timeout_ms": 1500,
            "num_retries": 3, "retry_on_connect_failure": True, "retry_on": ["5xx", "reset"],
            "retry_on_status_codes": [503, 429],
            "request_headers": {"add": {"x-add": "1"}, "set": {"x-set": "2"},
                                "remove": ["x-rm"]},
            "response_headers": {"add": {}, "set": {}, "remove": []}}, r0
        assert r0["broken"] is False
        assert r0["next_node"] == "resolver:" + tgt["v2"]
        assert [(s["weight"], s["resolver"]) for s in r0["splits"]] == [(100, "resolver:"
                                                                         + tgt["v2"])]
        assert r1["match"]["path_regex"] == "/re[gx]+" and "path_prefix" not in r1["match"]
        assert r1["destination"]["request_timeout_ms"] == 0
        assert [s["resolver"] for s in r1["splits"]] == ["resolver:" + tgt["db2"]]
        # The compiler's catch-all, last, to the splitter: 90/10 with the splits' modifiers.
        assert r2["match"]["path_prefix"] == "/" and r2["match"]["methods"] == []
        assert r2["next_node"].startswith("splitter:")
        assert [(s["weight"], s["resolver"]) for s in r2["splits"]] == [
            (90, "resolver:" + tgt["v1"]), (10, "resolver:" + tgt["v2"])]
        assert r2["splits"][0]["request_headers"]["set"] == {"x-split": "v1"}
        assert r2["splits"][1]["response_headers"] == {"add": {"x-s": "2"}, "set": {},
                                                       "remove": ["x-r"]}
        res = {r["name"]: r for r in u["resolvers"]}
        assert set(res) == {"resolver:" + t for t in tgt.values()}, res
        v1 = res["resolver:" + tgt["v1"]]
        assert v1["targets"] == [tgt["v1"], tgt["db2"]]  # primary, then the failover
        assert v1["connect_timeout_ms"] == 3000 and v1["request_timeout_ms"] == 7000
        assert v1["load_balancer"] == {
            "policy": "ring_hash", "least_request_choice_count": 0,
            "ring_hash_minimum_ring_size": 1024, "ring_hash_maximum_ring_size": 8192,
            "hash_policies": [
                {"field": "header", "field_value": "x-user", "terminal": False},
                {"field": "cookie", "field_value": "sess", "cookie_ttl_ms": 10000,
                 "cookie_path": "/", "cookie_session": False, "terminal": False},
                {"source_ip": True, "terminal": True}]}, v1
        assert res["resolver:" + tgt["db2"]]["targets"] == [tgt["db2"]]
        assert res["resolver:" + tgt["db2"]]["load_balancer"]["policy"] == "default"
        assert u["broken_regexes"] == 0
        assert {t["id"] for t in u["targets"]} == set(tgt.values())

        # A new router: one POST-only exact route to db2, then the catch-all.
        m.api.set_config_entry(router_entry(m, [
            {"Match": {"HTTP": {"PathExact": "/only", "Methods": ["POST"]}},
             "Destination": {"Service": db2, "NumRetries": 1}}]))
        u = wait_table(admin, db, lambda u: len(u["routes"]) == 2 and
                       u["routes"][0]["match"].get("path_exact") == "/only",
                       "the new router's table in /config")
        assert u["routes"][0]["match"]["methods"] == ["POST"]
        assert u["routes"][0]["destination"]["num_retries"] == 1
        assert [s["resolver"] for s in u["routes"][0]["splits"]] == ["resolver:" + tgt["db2"]]
        assert [s["weight"] for s in u["routes"][1]["splits"]] == [90, 10]
        # The same targets: each health watch started once, none restarted by the change.
        log = web.proxy.log()
        for t in tgt.values():
            assert log.count(f"watching target {t}:") == 1, (t, log.count(f"watching target {t}:"))
    finally:
        delete_entries(m)


def test_malformed_chain_keeps_the_last_good_table(mesh):
    """The agent accepts a router whose request header value holds CR LF (header injection,
    had it reached a request head); connectd refuses that whole chain, logs why, and keeps
    serving the last good table (and targets), then takes the next good router again."""
    m = mesh
    web, admin = setup(m)
    db, db2 = m.name("db"), m.name("db2")
    try:
        m.api.set_config_entry(router_entry(m, [
            {"Match": {"HTTP": {"PathPrefix": "/good"}}, "Destination": {"Service": db2}}]))
        wait_table(admin, db, lambda u: u["routes"] and
                   u["routes"][0]["match"].get("path_prefix") == "/good", "the good table")
        m.api.set_config_entry(router_entry(m, [
            {"Match": {"HTTP": {"PathPrefix": "/evil"}},
             "Destination": {"Service": db2,
                             "RequestHeaders": {"Set": {"x-a": "a\r\nx-injected: 1"}}}}]))
        web.proxy.wait_log(r"upstream \S+: discovery chain: .*RequestHeaders\.Set\[\"x-a\"\] "
                           r"must be a header value; keeping the previous targets", timeout=30)
        u = upstream_config(admin, db)
        assert [r["match"].get("path_prefix") for r in u["routes"]] == ["/good", "/"], u
        assert "x-injected" not in json.dumps(u)
        assert {t["id"] for t in u["targets"]} == {f"{db}.default.default.dc1",
                                                   f"{db2}.default.default.dc1"}
        # A good router again: taken. (This failed before the chain's watch blocked on the
        # refused answer's index: asked from the last good index, the agent's cache (?cached)
        # kept answering the refused chain for ever.)
        m.api.set_config_entry(router_entry(m, [
            {"Match": {"HTTP": {"PathPrefix": "/again"}}, "Destination": {"Service": db2}}]))
        wait_table(admin, db, lambda u: u["routes"][0]["match"].get("path_prefix") == "/again",
                   "the next good table", timeout=30)
    finally:
        delete_entries(m)


def test_http_upstream_behind_a_router_reaches_its_service(mesh):
    """Regression: the agent renders a router node's Routes on the node itself, and connectd
    looked for a "Router" object no agent sends, so it refused every chain with a router
    ("Router is missing"): a sidecar started after a service-router was written had no
    target at all and answered 503 to every request. Now the chain is taken, its targets
    watched, and requests reach the service (still in target order: routing comes later)."""
    m = mesh
    m.service_defaults("db", "http")
    app = m.app(HttpApp)
    db = m.add("db", app_port=app.port, proxy_config={"protocol": "http"})
    try:
        m.api.set_config_entry(router_entry(m, [
            {"Match": {"HTTP": {"PathPrefix": "/admin"}},
             "Destination": {"Service": m.name("db"), "PrefixRewrite": "/"}}]))
        web = m.add("web", upstreams=["db"], start=False)
        args, admin = admin_args()
        m.start(web, extra_args=args)
        m.wait_passing(db)
        wait_until(lambda: try_status(web.up["db"]) == 200, 30, "a request through the mesh")
        u = upstream_config(admin, m.name("db"))
        assert [r["match"].get("path_prefix") for r in u["routes"]] == ["/admin", "/"], u
        assert "Router is missing" not in web.proxy.log()
    finally:
        delete_entries(m)
