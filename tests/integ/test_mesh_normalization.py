"""The mesh config entry's HTTP.Incoming.RequestNormalization, watched from a real agent: what
the entry says is what connectd's snapshot carries (seen in the admin endpoint's /config under
request_normalization), a deleted entry means Consul's defaults again, and an answer connectd
cannot take (an action Consul would not accept, a refused read) keeps the settings in force.

The mesh entry is cluster-wide, so every test here has an agent of its own. The settings of
Consul's case-l7-intentions-request-normalization and its -disabled twin are the ones written.
What the settings do to a request is tests/unit/test_pathnorm.c; the inbound HTTP path that
applies them is wired separately."""

import json

import pytest

from mesh import AgentInterposer, ApiError, EchoApp, admin_args, admin_get, wait_until

DEFAULTS = {
    "insecure_disable_path_normalization": 0,
    "merge_slashes": 0,
    "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
    "headers_with_underscores_action": "ALLOW",
}

# case-l7-intentions-request-normalization
CONSUL_CASE = {
    "InsecureDisablePathNormalization": False,
    "MergeSlashes": True,
    "PathWithEscapedSlashesAction": "UNESCAPE_AND_FORWARD",
    "HeadersWithUnderscoresAction": "REJECT_REQUEST",
}
CONSUL_CASE_SEEN = {
    "insecure_disable_path_normalization": 0,
    "merge_slashes": 1,
    "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD",
    "headers_with_underscores_action": "REJECT_REQUEST",
}

# case-l7-intentions-request-normalization-disabled ("" is the default for both actions)
DISABLED_CASE = {
    "InsecureDisablePathNormalization": True,
    "MergeSlashes": False,
    "PathWithEscapedSlashesAction": "",
    "HeadersWithUnderscoresAction": "",
}
DISABLED_CASE_SEEN = dict(DEFAULTS, insecure_disable_path_normalization=1)


def write_mesh(api, normalization):
    api.put("/v1/config", {"Kind": "mesh", "HTTP": {"Incoming": {
        "RequestNormalization": normalization}}})


def config(port):
    status, body = admin_get(port, "/config")
    return json.loads(body) if status == 200 else None


def wait_normalization(port, want, what, timeout=20):
    """Waits until /config shows <want>; returns the whole /config answer."""
    seen = {}

    def ok():
        c = config(port)
        seen["c"] = c
        return c is not None and c.get("request_normalization") == want

    try:
        wait_until(ok, timeout, what)
    except AssertionError:
        c = seen.get("c")
        raise AssertionError(f"{what}: /config shows {c and c.get('request_normalization')}, "
                             f"want {want}") from None
    return seen["c"]


@pytest.fixture
def hop(fresh_agent):
    """Requested before fresh_mesh, so it outlives the connectd processes that talk through
    it."""
    h = AgentInterposer(fresh_agent.http_addr)
    yield h
    h.stop()


def start_db(m, http_addr):
    db = m.add("db", app_port=m.app(EchoApp).port, start=False)
    args, port = admin_args()
    db.proxy = m.start_connectd(db.name, ["-sidecar-for", db.id, "-http-addr", http_addr,
                                          "-log-level", "debug", "-workers", "2", *args])
    db.proxy.wait_port(db.public_port)
    return db, port


def test_mesh_entry_written_changed_and_deleted(fresh_agent, fresh_mesh):
    """No entry (the agent answers 404) is Consul's defaults; writing the entry of Consul's
    normalization case, then its -disabled twin, shows each in the next snapshot; deleting it
    goes back to the defaults. Each change is a new snapshot generation."""
    m, api = fresh_mesh, fresh_agent.api
    with pytest.raises(ApiError) as e:
        api.get("/v1/config/mesh/mesh")
    assert e.value.status == 404
    db, port = start_db(m, fresh_agent.http_addr)
    c0 = wait_normalization(port, DEFAULTS, "the defaults without a mesh entry")
    db.proxy.wait_log(r"request normalization \(no mesh config entry, defaults\): path "
                      r"normalization on, merge slashes off, escaped slashes KEEP_UNCHANGED, "
                      r"headers with underscores ALLOW")

    write_mesh(api, CONSUL_CASE)
    c1 = wait_normalization(port, CONSUL_CASE_SEEN, "the written mesh entry in the snapshot")
    assert c1["generation"] > c0["generation"]
    db.proxy.wait_log(r"request normalization \(mesh config entry\): path normalization on, "
                      r"merge slashes on, escaped slashes UNESCAPE_AND_FORWARD, headers with "
                      r"underscores REJECT_REQUEST")

    write_mesh(api, DISABLED_CASE)
    c2 = wait_normalization(port, DISABLED_CASE_SEEN, "the changed mesh entry in the snapshot")
    assert c2["generation"] > c1["generation"]

    api.delete("/v1/config/mesh/mesh")
    c3 = wait_normalization(port, DEFAULTS, "the defaults once the entry is deleted")
    assert c3["generation"] > c2["generation"]

    status, body = admin_get(port, "/metrics")
    assert status == 200
    assert 'connectd_watch_up{watch="mesh"} 1' in body
    assert "ERROR" not in db.proxy.log()


def test_unknown_action_keeps_the_last_good_settings(hop, fresh_agent, fresh_mesh):
    """An action Consul does not accept never becomes a default: connectd logs an error naming
    the field and keeps the settings it had, then takes the next good entry. The agent itself
    refuses to store such a value, so a hop between connectd and the agent rewrites the
    entry's answer (as an agent newer than connectd, with an action it does not know, would
    send it)."""
    m, api = fresh_mesh, fresh_agent.api
    bogus = dict(CONSUL_CASE, PathWithEscapedSlashesAction="UNESCAPE_AND_FROBNICATE")
    with pytest.raises(ApiError) as e:
        write_mesh(api, bogus)
    assert "PathWithEscapedSlashesAction" in str(e.value)

    write_mesh(api, CONSUL_CASE)
    db, port = start_db(m, hop.http_addr)
    good = wait_normalization(port, CONSUL_CASE_SEEN, "the first, good entry")

    def unknown_action(path, body):
        if not path.startswith("/v1/config/mesh/mesh"):
            return body
        entry = json.loads(body)
        entry["HTTP"]["Incoming"]["RequestNormalization"]["PathWithEscapedSlashesAction"] = \
            "UNESCAPE_AND_FROBNICATE"
        return json.dumps(entry).encode()

    hop.rewrite = unknown_action
    # A change in the agent ends connectd's blocking query; the answer it gets has the action
    # it does not know (and MergeSlashes off, which must not be taken either).
    write_mesh(api, dict(CONSUL_CASE, MergeSlashes=False))
    db.proxy.wait_log(r"mesh config entry: HTTP\.Incoming\.RequestNormalization\."
                      r"PathWithEscapedSlashesAction \\?\"UNESCAPE_AND_FROBNICATE\\?\" is not one "
                      r"of .*; keeping the last good request normalization")
    still = config(port)
    assert still["request_normalization"] == CONSUL_CASE_SEEN
    assert still["generation"] == good["generation"]
    assert admin_get(port, "/ready")[0] == 200

    # The next good answer is taken (the watch retries the same position after its back-off).
    hop.rewrite = None
    write_mesh(api, DISABLED_CASE)
    wait_normalization(port, DISABLED_CASE_SEEN, "the next good entry after the bad one", 45)


def test_refused_read_serves_with_the_defaults(hop, fresh_agent, fresh_mesh):
    """A 403 on the entry (an agent that wants more of the token than it has) must not keep
    the proxy from serving: it warns and goes on with the defaults, as with no entry, while
    the watch asks again with back-off. The entry exists and is strict, but cannot be read."""
    m, api = fresh_mesh, fresh_agent.api
    write_mesh(api, CONSUL_CASE)
    hop.canned = {"/v1/config/mesh/mesh": (403, b"Permission denied: token lacks mesh:read")}
    db, port = start_db(m, hop.http_addr)
    wait_normalization(port, DEFAULTS, "the defaults when the entry cannot be read")
    db.proxy.wait_log(r"mesh config entry: HTTP 403 \(the ACL token may not read it\); the "
                      r"default request normalization stays in force")
    wait_until(lambda: admin_get(port, "/ready")[0] == 200, 10, "db ready despite the 403")
