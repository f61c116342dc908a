"""authorization = "authorize": the sidecar asks the agent (POST /v1/agent/connect/authorize,
from its control thread) about each new inbound caller instead of consulting its own intention
table, keeps answers a few seconds per caller, and forgets them when the intentions change."""

import json
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from mesh import (LOOPBACK, AgentInterposer, EchoApp, HttpConn, HttpEchoApp, assert_refused,
                  build_request, closed_without_data, echo_roundtrip, is_refused, try_echo,
                  wait_http, wait_until)


def test_authorize_mode_allows_and_denies_like_intentions(mesh):
    m = mesh
    db_app = m.app(EchoApp)
    db = m.add("db", app_port=db_app.port, proxy_config={"authorization": "authorize",
                                                         "authorize_cache_ms": 60000})
    web = m.add("web", upstreams=["db"])
    api = m.add("api", upstreams=["db"])
    m.intend("db", {"web": "allow", "api": "deny"})
    m.wait_passing(db)

    m.wait_echo(web.up["db"])
    # Refused by db itself (not for lack of an endpoint on api's side), with the agent's reason.
    denied = re.compile(r"src=\S+/svc/" + re.escape(api.name)
                        + r" dst=\S+ result=denied reason=\"agent authorize: [^\"]*intention")
    wait_until(lambda: is_refused(api.up["db"]) and denied.search(db.proxy.log()), 30,
               "api to be refused by db on the agent's word")
    log = db.proxy.log()
    assert re.search(r"authorized spiffe://\S+/svc/" + re.escape(web.name) + r" by the agent",
                     log)

    # Answers are cached (a second connection right away is answered from the cache)...
    assert try_echo(web.up["db"])
    db.proxy.wait_log(r"by the agent: [^\n]*\(cached\)")

    # ...and dropped when the intentions change: the deny takes effect long before the
    # 60 s cache would have expired on its own.
    m.intend("db", {"web": "deny", "api": "allow"})
    wait_until(lambda: is_refused(web.up["db"]), 20, "web to be refused after the deny")
    agent_catches_up(m, "api", "db")
    m.wait_echo(api.up["db"], what="api allowed after the change")


def agent_allows(m, src, dst):
    """The agent's own answer to POST /v1/agent/connect/authorize for logical service <src>
    calling <dst>."""
    body = {"Target": m.name(dst), "ClientCertURI": m.api.spiffe_id(m.name(src))}
    return m.api.call("POST", "/v1/agent/connect/authorize", body)["Authorized"]


def agent_catches_up(m, src, dst):
    """Waits until the agent itself allows <src> to call <dst>. In authorize mode the agent
    decides, from an intention cache entry of its own that a blocking query refreshes in the
    background, so it may trail connectd's intentions watch by a moment;
    test_agent_authorize_follows_intention_flips shows it does not trail for longer."""
    wait_until(lambda: agent_allows(m, src, dst), 10,
               f"the agent's own /authorize to allow {src} -> {dst}")


def test_agent_authorize_follows_intention_flips(agent_mesh):
    """The harness's agent: its own /authorize follows a run of intention writes. Consul
    1.22.5 to 1.22.7 do not (hashicorp/consul#23368): a background refresh of the agent cache
    runs with the context of the HTTP request that started it, which ends with that request,
    so after a flip or two the entry stops refreshing and /authorize answers with an old
    intention for good (seen for over 130 s; in CI this failed the authorize-mode test
    above). scripts/consul pins a release without that change; this test fails within a
    few flips on one with it, which would make every authorize-mode test flaky."""
    m = agent_mesh
    for i in range(12):
        action = "deny" if i % 2 == 0 else "allow"
        m.intend("db", {"web": action})
        wait_until(lambda: agent_allows(m, "web", "db") == (action == "allow"), 10,
                   f"the agent's /authorize to follow flip {i + 1} to {action}")


@pytest.fixture
def hop(agent):
    """Requested before mesh, so it outlives the connectd processes that talk through it."""
    h = AgentInterposer(agent.http_addr)
    yield h
    h.stop()


def add_pair(m, **config):
    """db (an echo app behind it; authorize mode with more Proxy.Config <config>), not started
    yet, and web with upstream db, started. Returns (db, web)."""
    db = m.add("db", app_port=m.app(EchoApp).port, start=False,
               proxy_config={"authorization": "authorize", **config})
    return db, m.add("web", upstreams=["db"])


def start_behind(m, hop, db):
    """Starts db's connectd with its agent behind <hop>; waits until db is serving and passing."""
    db.proxy = m.start_connectd(db.name, ["-sidecar-for", db.id, "-http-addr", hop.http_addr,
                                          "-log-level", "debug"])
    db.proxy.wait_port(db.public_port)
    m.wait_passing(db)


# What an agent whose own copy of the intentions lags behind answers for web after web's
# intention to db was flipped to deny (its real answer names the intention it matched).
STALE_ALLOW = {"Authorized": True,
               "Reason": "Matched L4 intention: web => db (ID: stale, Precedence: 9)"}


def test_stale_agent_allow_against_a_deny_here_is_refused(hop, mesh):
    """Regression: after an intention was flipped to deny, the agent's /authorize kept
    answering "Matched L4 intention ... ALLOW" for more than 15 s in one CI run, while the
    intention table here (from a blocking watch, newer) already held the deny; connectd took
    the agent's allow (a new connection at once, as its word; an open one after 10 re-asks).
    A stale decision must not outlive what it was based on: an allow of the agent that an
    intention here refuses is refused (fail closed), and logged once at WARN."""
    m = mesh
    db, web = add_pair(m, authorize_cache_ms=0)
    m.intend("db", {"web": "deny"})
    hop.authorize_answer = STALE_ALLOW
    start_behind(m, hop, db)
    db.proxy.wait_log(r"intentions for \S+: 1 rule\(s\)")

    calls = hop.authorize_calls
    for _ in range(3):
        assert_refused(web.up["db"])
    wait_until(lambda: hop.authorize_calls >= calls + 3, 10, "the agent to be asked each time")
    denied = re.compile(r"result=denied reason=\"agent authorize: intention \S+ => \S+ deny "
                        r"\([^\"]*\) here, over the agent's stale allow\"")
    db.proxy.wait_log(denied.pattern)
    warn = re.compile(r"\[WARN\] authorize: the agent allows \S+/svc/" + re.escape(web.name)
                      + r" \(\"Matched L4 intention[^\n]*the intentions here deny it "
                      r"\(intention \S+ => \S+ deny")
    assert len(warn.findall(db.proxy.log())) == 1, "the refused allow was not logged once"

    # The agent's allow still counts when the intentions here allow too.
    m.intend("db", {"web": "allow"})
    m.wait_echo(web.up["db"], what="web allowed once the intentions here allow it")


def test_authorize_answer_that_disagrees_with_the_intentions_is_not_cached(hop, mesh):
    """The agent answers /authorize from its own copy of the intentions, which can lag behind
    the intention change the sidecar has already seen. Its deny decides its connection (it is
    the agent's word; a deny fails closed) but is not cached: otherwise a stale answer would
    outlive the change for the whole authorize_cache_ms."""
    m = mesh
    db, web = add_pair(m, authorize_cache_ms=60000)
    m.intend("db", {"web": "allow"})
    # The agent behind the hop still "believes" web is denied.
    hop.authorize_answer = {"Authorized": False, "Reason": "stale copy: web denied"}
    start_behind(m, hop, db)
    db.proxy.wait_log(r"intentions for \S+: 1 rule\(s\)")

    calls = hop.authorize_calls
    assert_refused(web.up["db"])
    assert_refused(web.up["db"])
    assert hop.authorize_calls >= calls + 2, "the second connection was not asked again"
    log = db.proxy.log()
    assert "agent authorize: stale copy: web denied" in log
    assert "(cached)" not in log
    # The disagreement is told once at INFO (it can last: the agent lagged for over 30 s in
    # one CI run, and DEBUG alone hid why every connection was refused), then at DEBUG.
    told = re.compile(r"\[INFO\] authorize: the agent denies \S+/svc/" + re.escape(web.name)
                      + r" \(\"stale copy: web denied\"\), but the intentions here allow it")
    assert len(told.findall(log)) == 1, "the overruling deny was not told once at INFO"
    assert "differs from the intentions here; not cached" in log

    # The agent catches up: the allow applies to the very next connection, not 60 s later.
    hop.authorize_answer = None
    m.wait_echo(web.up["db"], timeout=10, what="web allowed once the agent caught up")


def test_concurrent_questions_from_one_caller_make_one_request(hop, mesh):
    """A burst of connections from one caller while its question is out waits for that one
    answer instead of asking the agent once per connection (authorize_cache_ms = 0 still asks
    anew for every connection that arrives after the answer)."""
    m = mesh
    db, web = add_pair(m, authorize_cache_ms=0)
    start_behind(m, hop, db)
    m.wait_echo(web.up["db"])

    hop.authorize_delay = 1.5
    calls = hop.authorize_calls
    n = 12
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: try_echo(web.up["db"], timeout=15), range(n)))
    assert all(results), results
    asked = hop.authorize_calls - calls
    assert 1 <= asked <= n // 3, f"{asked} requests for {n} concurrent connections"
    db.proxy.wait_log(r"the answer for \S+/svc/" + web.name + r" also decided \d+ connection")

    # Once answered, the next connection asks again (nothing is cached with 0).
    hop.authorize_delay = 0
    calls = hop.authorize_calls
    assert try_echo(web.up["db"])
    assert hop.authorize_calls == calls + 1


def test_open_connection_rechecked_with_the_agent_when_intentions_change(hop, mesh):
    """In authorize mode too, an intention change re-checks open connections, with the agent:
    a connection the agent now refuses is closed. An agent whose own copy of the intentions
    still allows (it lags behind the deny) does not keep the connection open: the deny here
    wins. (It used to be asked again 10 times, 500 ms apart, and then taken: the connection
    stayed open for good on the stale allow.)"""
    m = mesh
    db, web = add_pair(m)
    m.intend("db", {"web": "allow"})
    start_behind(m, hop, db)
    m.wait_echo(web.up["db"])

    with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
        assert echo_roundtrip(s, b"before the change\n") == b"before the change\n"
        # The agent behind the hop lags: it still allows web after the deny is written.
        hop.authorize_answer = STALE_ALLOW
        m.intend("db", {"web": "deny"})
        closed, _ = closed_without_data(s, timeout=15)
        assert closed, "the open connection survived the deny on the agent's stale allow"
    db.proxy.wait_log(r"result=denied reason=\"re-authorization: agent authorize: intention "
                      r"\S+ => \S+ deny [^\"]* here, over the agent's stale allow\"")


def test_recheck_without_an_answer_keeps_the_connection(hop, mesh):
    """An agent that cannot answer a re-check (an error, a restart) does not cut open
    connections: the re-check is asked again, and after the last try the connection stays;
    only a real "no" ends it."""
    m = mesh
    db, web = add_pair(m, authorize_cache_ms=0, reauthorize_interval_ms=300)
    start_behind(m, hop, db)
    m.wait_echo(web.up["db"])

    with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
        assert echo_roundtrip(s, b"before\n") == b"before\n"
        hop.authorize_status = 500
        db.proxy.wait_log(r"no answer to the re-check of \S+/svc/" + web.name
                          + r" \([^)]*HTTP 500\); its connections stay open", timeout=20)
        assert echo_roundtrip(s, b"still here\n") == b"still here\n"
        hop.authorize_status = None
        hop.authorize_answer = {"Authorized": False, "Reason": "denied now"}
        closed, _ = closed_without_data(s, timeout=15)
        assert closed, "a real no did not end the connection"
    db.proxy.wait_log(r"result=denied reason=\"re-authorization: agent authorize: denied now")


def test_admitted_allow_the_intentions_refuse_is_rechecked(hop, mesh):
    """Regression (issue 7): an allow of the agent that the intentions here refuse admitted its
    connection for good: the answer was not cached, but the intention-change sweep had skipped
    the connection while it waited for the answer, and periodic re-authorization is off by
    default, so nothing asked again. Such a connection now goes the re-check path of open
    connections at once and is closed when the agent agrees with the deny.

    Where the two views differ only about the default policy, the agent's allow still admits:
    that is what authorize mode follows (/authorize allows by default with ACLs off even when
    acl.default_policy is deny, which is what the hop makes the table here read)."""
    m = mesh
    db, web = add_pair(m, authorize_cache_ms=60000)
    hop.drop_headers = {"x-consul-default-acl-policy"}
    hop.canned = {"/v1/agent/self": (200, json.dumps(
        {"Config": {"Datacenter": "dc1"},
         "DebugConfig": {"ACLsEnabled": False,
                         "ACLResolverSettings": {"ACLDefaultPolicy": "deny"}}}).encode())}
    start_behind(m, hop, db)
    db.proxy.wait_log(r"intentions for \S+: 0 rule\(s\), default deny")

    def admitted():
        s = socket.create_connection((LOOPBACK, web.up["db"]), timeout=10)
        try:
            if echo_roundtrip(s, b"admitted?\n") == b"admitted?\n":
                return s
        except OSError:
            pass
        s.close()
        return None

    s = wait_until(admitted, 30, "web admitted on the agent's default allow")
    with s:
        db.proxy.wait_log(r"allow for \S+/svc/" + web.name + r" differs from the intentions "
                          r"here; re-checking it")
        # The agent now denies: the re-check closes the connection.
        hop.authorize_answer = {"Authorized": False, "Reason": "Default behavior configured "
                                                               "by ACLs (now deny)"}
        closed, _ = closed_without_data(s, timeout=15)
        assert closed, "the connection admitted on a disputed allow was never re-checked"
    db.proxy.wait_log(r"result=denied reason=\"re-authorization: agent authorize: Default "
                      r"behavior configured by ACLs \(now deny\)")


def test_l7_request_denied_by_an_intention_here_while_the_agent_is_asked(hop, mesh):
    """authorize mode, protocol http: each request obeys the agent's last answer about its
    caller. When an intention here starts denying the caller, the requests of an open
    connection are refused at once (403), not only once the agent has answered the re-check
    the change sent: an allow the intentions here refuse is not taken (the agent's answer is
    held here, as from an agent slow to answer)."""
    m = mesh
    m.service_defaults("db", "http")
    db = m.add("db", app_port=m.app(HttpEchoApp).port, start=False,
               proxy_config={"authorization": "authorize", "authorize_cache_ms": 0})
    web = m.add("web", upstreams=["db"])
    m.intend("db", {"web": "allow"})
    start_behind(m, hop, db)
    wait_http(web.up["db"], "GET", "/", 200, timeout=30, what="web's requests to be allowed")
    held = threading.Event()
    try:
        with HttpConn(web.up["db"]) as c:
            def status_now():
                c.send(build_request("GET", "/now"))
                return c.response().status

            assert status_now() == 200
            hop.held["/v1/agent/connect/authorize"] = held
            m.intend("db", {"web": "deny"})
            wait_until(lambda: status_now() == 403, 10,
                       "the deny here to refuse the next request before the agent answered")
            assert not held.is_set()
    finally:
        held.set()
