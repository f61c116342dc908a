"""/authz per HTTP request (issue 9): an L7 service-intentions entry with Permissions, written
through the agent's config API, as connectd's intention table evaluates it for one request
(/authz?source=web&method=GET&path=/admin&header=x-role:ops), naming the intention and the
permission that decided. The per-connection answer (no method, path or header) keeps its
meaning: an L7 intention denies at L4."""

import json
import urllib.parse

from mesh import EchoApp, admin_args, admin_get, metric, parse_metrics, wait_until


def start_db(m):
    """db (echo app, admin endpoint, protocol http through service-defaults); returns
    (db, admin port)."""
    db_name = m.name("db")
    # Permissions are only accepted for a destination with an HTTP-like protocol.
    assert m.api.put("/v1/config", {"Kind": "service-defaults", "Name": db_name,
                                    "Protocol": "http"}) is True
    app = m.app(EchoApp)
    db = m.add("db", app_port=app.port, start=False)
    args, port = admin_args()
    m.start(db, extra_args=args)
    return db, port


def drop_entries(m, db):
    """The intentions first: the agent refuses to drop the protocol L7 intentions rely on."""
    m.api.delete_intentions(db.name)
    m.api.delete("/v1/config/service-defaults/" + urllib.parse.quote(db.name))


def put_intentions(m, db, sources):
    m.intentions.add(db.name)  # removed by the mesh's teardown
    assert m.api.put("/v1/config", {"Kind": "service-intentions", "Name": db.name,
                                    "Sources": sources}) is True


def authz(port, source, method=None, path=None, headers=(), status=200):
    q = [("source", source)]
    if method is not None:
        q.append(("method", method))
    if path is not None:
        q.append(("path", path))
    q += [("header", h) for h in headers]
    got, body = admin_get(port, "/authz?" + urllib.parse.urlencode(q))
    assert got == status, (got, body)
    return json.loads(body) if status == 200 else body


def test_authz_answers_per_request_with_the_deciding_permission(mesh):
    m = mesh
    db, port = start_db(m)
    web, api = m.name("web"), m.name("api")
    try:
        put_intentions(m, db, [
            {"Name": web, "Permissions": [
                {"Action": "deny", "HTTP": {"PathRegex": "/admin/.*", "Methods": ["DELETE"]}},
                {"Action": "allow", "HTTP": {"PathPrefix": "/admin", "Header": [
                    {"Name": "x-role", "Exact": "ops"},
                    {"Name": "x-token", "Prefix": "v1:"},
                    {"Name": "x-debug", "Present": True, "Invert": True}]}},
                {"Action": "allow", "HTTP": {"PathExact": "/health", "Methods": ["GET", "HEAD"]}},
                {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
            ]},
            {"Name": "*", "Action": "deny"},
        ])
        wait_until(lambda: authz(port, web, "GET", "/health")["decided_by"] == "permission", 20,
                   "the L7 intention to reach connectd")

        # Exact path and method: the third permission (index 2) allows.
        a = authz(port, web, "GET", "/health")
        assert a["mode"] == "request" and a["decision"] == "allow", a
        assert a["permission"]["index"] == 2 and a["permission"]["action"] == "allow", a
        assert "PathExact" in a["permission"]["description"], a
        assert a["intention"]["source"] == web and a["intention"]["action"] == "l7-permissions", a
        assert a["request"] == {"method": "GET", "path": "/health", "normalized_path": "/health",
                                "headers": []}, a
        # A query string is not part of the path that is matched.
        assert authz(port, web, "HEAD", "/health?x=1")["permission"]["index"] == 2
        # A method near miss: no permission matches, so the default policy decides (the dev
        # agent's is allow) and the wildcard deny below web's L7 intention stays hidden.
        p = authz(port, web, "POST", "/health")
        assert p["decided_by"] == "default policy" and p["permission"] is None, p
        assert p["decision"] == "allow" and p["intention"]["source"] == web, p
        assert "none of its 4 permission(s) did" in p["reason"], p
        # Another caller has no L7 intention: the wildcard deny decides.
        o = authz(port, api, "GET", "/health")
        assert o["decision"] == "deny" and o["decided_by"] == "intention", o
        assert o["intention"]["source"] == "*" and o["permission"] is None, o

        # Every header condition of the second permission; a value may hold ':'.
        good = ["x-role:ops", "x-token:v1:42"]
        a = authz(port, web, "GET", "/admin/users", good)
        assert a["decision"] == "allow" and a["permission"]["index"] == 1, a
        assert a["request"]["headers"][1] == {"name": "x-token", "value": "v1:42"}, a
        # Header names are case-insensitive.
        assert authz(port, web, "GET", "/admin", ["X-Role: ops", "X-TOKEN: v1:"])["decision"] \
            == "allow"
        # Near misses fall to the last permission, a deny.
        for hs in (["x-role:ops"], ["x-role:OPS", "x-token:v1:1"], ["x-role:ops", "x-token:v2:1"],
                   ["x-role:ops", "x-token:v1:1", "x-debug:1"],
                   # A repeated header is matched on its values joined: "ops,dev".
                   ["x-role:ops", "x-role:dev", "x-token:v1:1"]):
            d = authz(port, web, "GET", "/admin/users", hs)
            assert d["decision"] == "deny" and d["permission"]["index"] == 3, (hs, d)
        # The first permission's regex and method deny before the header allow is reached.
        d = authz(port, web, "DELETE", "/admin/users", good)
        assert d["decision"] == "deny" and d["permission"]["index"] == 0, d
        assert "PathRegex" in d["permission"]["description"], d
        # The regex is a full match: /admin is not /admin/.*, so the header allow decides.
        assert authz(port, web, "DELETE", "/admin", good)["permission"]["index"] == 1

        # The path is normalized as the proxy's request path does it (the mesh entry's
        # defaults here): dot segments and encoded unreserved characters cannot dodge a rule.
        a = authz(port, web, "GET", "/admin/../%68ealth")
        assert a["decision"] == "allow" and a["permission"]["index"] == 2, a
        assert a["request"]["path"] == "/admin/../%68ealth", a
        assert a["request"]["normalized_path"] == "/health", a
        d = authz(port, web, "GET", "/public/./../admin/x")
        assert d["decision"] == "deny" and d["permission"]["index"] == 3, d
        # What normalization refuses never reaches authorization.
        r = authz(port, web, "GET", "/a%zz")
        assert r["decision"] == "reject" and r["decided_by"] == "request normalization", r
        assert "400" in r["reason"] and "normalized_path" not in r["request"], r

        # Per connection, the same intention is a deny (as the agent's /authorize says).
        c = authz(port, web)
        assert c["mode"] == "connection" and c["decision"] == "deny", c
        assert c["decided_by"] == "intention" and "permission" not in c, c

        # Malformed questions.
        assert "name:value" in authz(port, web, "GET", "/", ["novalue"], status=400)
        assert "name:value" in authz(port, web, "GET", "/", [":x"], status=400)
        assert authz(port, web, "", "/", status=400)
    finally:
        drop_entries(m, db)


def test_authz_bad_regex_fails_closed(mesh):
    """The agent accepts any string as a regex. One that RE2 refuses (lookahead here) is
    logged once and fails closed: in a deny permission it denies every request that permission
    could cover, although the allow after it would match."""
    m = mesh
    db, port = start_db(m)
    web = m.name("web")
    try:
        put_intentions(m, db, [
            {"Name": web, "Permissions": [
                {"Action": "deny", "HTTP": {"PathRegex": "/(?=secret).*"}},
                {"Action": "allow", "HTTP": {"PathPrefix": "/"}},
            ]},
        ])
        db.proxy.wait_log(r"PathRegex .*\(\?=secret\).* is not usable: lookahead and lookbehind "
                          r"are not supported", 20)
        wait_until(lambda: authz(port, web, "GET", "/public")["decided_by"] == "permission", 20,
                   "the L7 intention to reach connectd")
        d = authz(port, web, "GET", "/public")
        assert d["decision"] == "deny" and d["permission"]["index"] == 0, d
        assert d["failed_closed"] is True and "[bad regex]" in d["permission"]["description"], d
        status, body = admin_get(port, "/metrics")
        assert status == 200 and metric(parse_metrics(body), "connectd_intention_bad_regexes") == 1
    finally:
        drop_entries(m, db)


def test_authz_applies_the_mesh_entry_normalization(fresh_mesh):
    """On an agent of its own (the mesh config entry is global): header names with '_' are
    dropped before matching, or refused, as HeadersWithUnderscoresAction says, and
    MergeSlashes folds '//' before the path is matched."""
    m = fresh_mesh
    db, port = start_db(m)
    web = m.name("web")

    def mesh_entry(underscores):
        assert m.api.put("/v1/config", {"Kind": "mesh", "HTTP": {"Incoming": {
            "RequestNormalization": {"MergeSlashes": True,
                                     "HeadersWithUnderscoresAction": underscores}}}}) is True
    try:
        put_intentions(m, db, [
            {"Name": web, "Permissions": [
                {"Action": "deny", "HTTP": {"PathPrefix": "/admin/", "Header": [
                    {"Name": "x_internal", "Present": True, "Invert": True}]}},
                {"Action": "allow", "HTTP": {"PathPrefix": "/"}},
            ]},
        ])
        mesh_entry("DROP_HEADER")
        ask = (web, "GET", "//admin//x", ["x_internal:1"])
        wait_until(lambda: authz(port, *ask)["request"]["headers"][0].get("dropped"), 20,
                   "the mesh entry to reach connectd")
        # The header that would have exempted the caller is dropped: the deny applies.
        d = authz(port, *ask)
        assert d["request"]["normalized_path"] == "/admin/x", d
        assert d["decision"] == "deny" and d["permission"]["index"] == 0, d
        mesh_entry("REJECT_REQUEST")
        wait_until(lambda: authz(port, *ask)["decision"] == "reject", 20,
                   "the REJECT_REQUEST action to reach connectd")
        r = authz(port, *ask)
        assert "x_internal" in r["reason"] and r["decided_by"] == "request normalization", r
        # Without an underscore header the request is authorized as usual.
        assert authz(port, web, "GET", "/public")["decision"] == "allow"
    finally:
        drop_entries(m, db)
        m.api.delete("/v1/config/mesh/mesh")
