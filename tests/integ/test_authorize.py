"""authorization = "authorize": the sidecar asks the agent (POST /v1/agent/connect/authorize,
from its control thread) about each new inbound caller instead of consulting its own intention
table, keeps answers a few seconds per caller, and forgets them when the intentions change."""

import re
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from mesh import (LOOPBACK, AgentInterposer, EchoApp, assert_refused, closed_without_data,
                  echo_roundtrip, is_refused, try_echo, wait_until)


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
    m.wait_echo(api.up["db"], what="api allowed after the change")


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


def test_authorize_answer_that_disagrees_with_the_intentions_is_not_cached(hop, mesh):
    """The agent answers /authorize from its own copy of the intentions, which can lag behind
    the intention change the sidecar has already seen. Such an answer decides its connection
    (it is the agent's word) but is not cached: otherwise a stale allow would outlive the deny
    for the whole authorize_cache_ms."""
    m = mesh
    db, web = add_pair(m, authorize_cache_ms=60000)
    m.intend("db", {"web": "deny"})
    # The agent behind the hop still "believes" web is allowed.
    hop.authorize_answer = {"Authorized": True, "Reason": "stale copy: web allowed"}
    start_behind(m, hop, db)
    db.proxy.wait_log(r"intentions for \S+: 1 rule\(s\)")

    m.wait_echo(web.up["db"], what="web allowed on the agent's (stale) word")
    calls = hop.authorize_calls
    assert try_echo(web.up["db"])
    assert hop.authorize_calls > calls, "the second connection was not asked again"
    log = db.proxy.log()
    assert "by the agent: stale copy: web allowed" in log
    assert "(cached)" not in log
    assert "differs from the intentions here; not cached" in log

    # The agent catches up: the deny applies to the very next connection, not 60 s later.
    hop.authorize_answer = None
    assert_refused(web.up["db"])
    db.proxy.wait_log(r"result=denied reason=\"agent authorize: [^\"]*DENY")


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
    a connection the agent now refuses is closed. While the agent's own copy of the
    intentions still answers the old way (it lags behind the change), the re-check is asked
    again rather than taken as the final word."""
    m = mesh
    db, web = add_pair(m)
    m.intend("db", {"web": "allow"})
    start_behind(m, hop, db)
    m.wait_echo(web.up["db"])

    with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
        assert echo_roundtrip(s, b"before the change\n") == b"before the change\n"
        # The agent behind the hop lags: it still allows web after the deny is written.
        hop.authorize_answer = {"Authorized": True, "Reason": "stale copy: web allowed"}
        m.intend("db", {"web": "deny"})
        db.proxy.wait_log(r"\(re-check\) differs from the intentions here; asking again")
        assert echo_roundtrip(s, b"still open\n") == b"still open\n"
        # The agent catches up: the next re-check closes the connection.
        hop.authorize_answer = None
        closed, _ = closed_without_data(s, timeout=15)
        assert closed, "the open connection survived the deny"
    db.proxy.wait_log(r"result=denied reason=\"re-authorization: agent authorize: [^\"]*DENY")


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
    connections at once and is closed when the agent agrees with the deny."""
    m = mesh
    db, web = add_pair(m, authorize_cache_ms=60000)
    m.intend("db", {"web": "deny"})
    hop.authorize_answer = {"Authorized": True, "Reason": "stale copy: web allowed"}
    start_behind(m, hop, db)
    db.proxy.wait_log(r"intentions for \S+: 1 rule\(s\)")

    def admitted():
        s = socket.create_connection((LOOPBACK, web.up["db"]), timeout=10)
        try:
            if echo_roundtrip(s, b"admitted?\n") == b"admitted?\n":
                return s
        except OSError:
            pass
        s.close()
        return None

    s = wait_until(admitted, 30, "web admitted on the agent's (stale) word")
    with s:
        # The agent catches up with the deny: the re-check closes the connection.
        hop.authorize_answer = None
        closed, _ = closed_without_data(s, timeout=15)
        assert closed, "the connection admitted on a disputed allow was never re-checked"
    db.proxy.wait_log(r"allow for \S+/svc/" + web.name + r" differs from the intentions here; "
                      r"re-checking it")
    db.proxy.wait_log(r"result=denied reason=\"re-authorization: agent authorize: [^\"]*DENY")
