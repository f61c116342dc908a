"""Outbound L7 route features (issue 10) end to end, as Consul's own integration cases for
Envoy check them, with config entries written through the REAL agent's API:

* case-cfg-router-features: every match kind of a service-router (path exact / prefix / regex,
  CaseInsensitive, header present / exact / prefix / suffix / regex / Invert, query parameter
  present / exact / regex, methods), each with a request that matches and a near miss that
  falls to the compiler's catch-all; PrefixRewrite as the application sees it; request and
  response header Add / Set / Remove.

db and db2 are each behind their own HttpApp, which answers with what it received; which
service answered is read from the X-Forwarded-Client-Cert its sidecar adds (answered_by()).
"""

import json

from mesh import wait_until
from test_l7_inbound import Reader, connect, response
from test_l7_routing import answered_by, delete_entries, routed_mesh


def request(sock, path, method="GET", headers=()):
    """Sends one request on <sock> and reads its answer: (status, headers, body)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    if method in ("PUT", "POST"):
        extra += "Content-Length: 0\r\n"
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: db\r\n{extra}\r\n".encode())
    st, hs, body, _ = response(Reader(sock))
    return st, hs, body


def router(m, routes):
    m.api.set_config_entry({"Kind": "service-router", "Name": m.name("db"), "Routes": routes})


def wait_routed(m, port, path, want="db2", headers=()):
    def ok():
        try:
            with connect(port) as s:
                st, _, body = request(s, path, headers=headers)
                return st == 200 and answered_by(m, body) == want
        except (OSError, EOFError, AssertionError, ValueError, KeyError):
            return False
    wait_until(ok, 30, f"{path} routed to {want}")


# Each match kind: (Match.HTTP, a request that matches, a near miss) with requests as
# (method, path, headers). Every route goes to db2; the catch-all goes to db.
MATCH_KINDS = [
    ({"PathExact": "/exact"}, ("GET", "/exact", ()), ("GET", "/exact/", ())),
    ({"PathPrefix": "/prefix/"}, ("GET", "/prefix/a", ()), ("GET", "/prefix", ())),
    ({"PathRegex": "/re[0-9]+"}, ("GET", "/re42", ()), ("GET", "/re42x", ())),
    ({"PathPrefix": "/ci/", "CaseInsensitive": True}, ("GET", "/CI/x", ()),
     ("GET", "/c/x", ())),
    ({"PathExact": "/cs"}, ("GET", "/cs", ()), ("GET", "/CS", ())),
    ({"Header": [{"Name": "x-present", "Present": True}]},
     ("GET", "/", (("X-Present", "1"),)), ("GET", "/", (("X-Presentx", "1"),))),
    ({"Header": [{"Name": "x-exact", "Exact": "yes"}]},
     ("GET", "/", (("x-exact", "yes"),)), ("GET", "/", (("x-exact", "yes2"),))),
    ({"Header": [{"Name": "x-prefix", "Prefix": "pre"}]},
     ("GET", "/", (("x-prefix", "prefix"),)), ("GET", "/", (("x-prefix", "xpre"),))),
    ({"Header": [{"Name": "x-suffix", "Suffix": "suf"}]},
     ("GET", "/", (("x-suffix", "thesuf"),)), ("GET", "/", (("x-suffix", "sufx"),))),
    ({"Header": [{"Name": "x-regex", "Regex": "[a-z]+-[0-9]+"}]},
     ("GET", "/", (("x-regex", "abc-12"),)), ("GET", "/", (("x-regex", "abc-12x"),))),
    ({"PathPrefix": "/inv", "Header": [{"Name": "x-invert", "Exact": "no", "Invert": True}]},
     ("GET", "/inv", (("x-invert", "yes"),)), ("GET", "/inv", (("x-invert", "no"),))),
    ({"QueryParam": [{"Name": "qp", "Present": True}]},
     ("GET", "/?qp=1", ()), ("GET", "/?qpx=1", ())),
    ({"QueryParam": [{"Name": "qe", "Exact": "1"}]},
     ("GET", "/?a=b&qe=1", ()), ("GET", "/?qe=12", ())),
    ({"QueryParam": [{"Name": "qr", "Regex": "[0-9]+"}]},
     ("GET", "/?qr=77", ()), ("GET", "/?qr=7a", ())),
    ({"PathPrefix": "/m", "Methods": ["PUT", "DELETE"]},
     ("PUT", "/m", ()), ("GET", "/m", ())),
]


def test_router_match_kinds_each_match_and_near_miss(mesh):
    """case-cfg-router-features, matches: each match kind routes its request to db2, and its
    near miss (one byte, one case, one header or one method off) falls to the catch-all, db.
    All on one keep-alive connection from the application, so every request is routed on its
    own."""
    m = mesh
    web = routed_mesh(m)
    db2 = m.name("db2")
    try:
        router(m, [{"Match": {"HTTP": match}, "Destination": {"Service": db2}}
                   for match, _, _ in MATCH_KINDS])
        wait_routed(m, web.up["db"], "/exact")
        seen = []
        with connect(web.up["db"]) as s:
            for match, hit, miss in MATCH_KINDS:
                for (method, path, headers), want in ((hit, "db2"), (miss, "db")):
                    st, _, body = request(s, path, method, headers)
                    assert st == 200, (match, method, path, st, body)
                    info = json.loads(body)
                    assert info["method"] == method and info["target"] == path, info
                    seen.append((json.dumps(match), method, path, answered_by(m, body), want))
        wrong = [x for x in seen if x[3] != x[4]]
        assert not wrong, wrong
    finally:
        delete_entries(m)


def test_router_prefix_rewrite_and_header_modifiers(mesh):
    """case-cfg-router-features, destinations: PrefixRewrite replaces the part of the path the
    route matched (PathPrefix: the prefix; PathExact: the whole path; query kept), and the
    route's RequestHeaders / ResponseHeaders Add (appended to what the request carries), Set
    (replacing it) and Remove (dropping it) are what the application and the upstream's
    answer show. A route without them changes nothing."""
    m = mesh
    web = routed_mesh(m)
    db2 = m.name("db2")
    try:
        router(m, [
            {"Match": {"HTTP": {"PathPrefix": "/prefix/"}},
             "Destination": {"Service": db2, "PrefixRewrite": "/rewritten/"}},
            {"Match": {"HTTP": {"PathExact": "/old"}},
             "Destination": {"Service": db2, "PrefixRewrite": "/new"}},
            {"Match": {"HTTP": {"PathPrefix": "/mods"}},
             "Destination": {
                 "Service": db2,
                 "RequestHeaders": {"Add": {"x-added": "a"}, "Set": {"x-set": "s"},
                                    "Remove": ["x-gone"]},
                 "ResponseHeaders": {"Add": {"x-resp-added": "ra"},
                                     "Set": {"content-type": "text/x-set"}}}},
            {"Match": {"HTTP": {"PathPrefix": "/rmresp"}},
             "Destination": {"Service": db2, "ResponseHeaders": {"Remove": ["content-type"]}}},
        ])
        wait_routed(m, web.up["db"], "/mods")
        with connect(web.up["db"]) as s:
            st, _, body = request(s, "/prefix/a/b?c=1")
            assert st == 200 and answered_by(m, body) == "db2", body
            assert json.loads(body)["target"] == "/rewritten/a/b?c=1", body
            st, _, body = request(s, "/old?x=y")
            assert json.loads(body)["target"] == "/new?x=y", body
            st, _, body = request(s, "/prefix")  # a near miss: the catch-all, unchanged
            assert answered_by(m, body) == "db" and json.loads(body)["target"] == "/prefix"

            st, hs, body = request(s, "/mods", headers=(
                ("X-Added", "orig"), ("X-Set", "old1"), ("X-Set", "old2"), ("X-Gone", "bye"),
                ("X-Kept", "k")))
            assert st == 200 and answered_by(m, body) == "db2", body
            seen = json.loads(body)["headers"]
            assert seen["x-added"] == ["orig", "a"], seen
            assert seen["x-set"] == ["s"], seen
            assert "x-gone" not in seen and seen["x-kept"] == ["k"], seen
            assert hs["x-resp-added"] == ["ra"], hs
            assert hs["content-type"] == ["text/x-set"], hs

            st, hs, body = request(s, "/rmresp")
            assert st == 200 and answered_by(m, body) == "db2", body
            assert "content-type" not in hs, hs
            # The catch-all has no modifiers: the app's own answer.
            st, hs, body = request(s, "/plain", headers=(("X-Gone", "here"),))
            assert hs["content-type"] == ["application/json"], hs
            assert "x-resp-added" not in hs and "x-gone" in json.loads(body)["headers"]
    finally:
        delete_entries(m)
