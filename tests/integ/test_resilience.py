"""Fail static: while the agent is away connectd keeps serving on what it last knew, and it
picks the agent up again on its own when it returns.

A dev agent keeps nothing across a restart (new CA, no services, no intentions), so after the
restart the test registers the services again, waits for the mesh to converge on the new CA,
and then proves the watches are live by writing a deny intention that must take effect.
"""

import re
import socket
import time

from mesh import (LOOPBACK, EchoApp, admin_args, admin_get, closed_without_data, echo_roundtrip,
                  is_refused, try_echo, wait_until)


def test_agent_outage_fail_static_then_resume(fresh_agent, fresh_mesh):
    m = fresh_mesh
    db_app = m.app(EchoApp)
    db = m.add("db", app_port=db_app.port)
    web = m.add("web", upstreams=["db"])
    m.wait_passing(db)
    m.wait_echo(web.up["db"])

    held = socket.create_connection((LOOPBACK, web.up["db"]), timeout=10)
    try:
        assert echo_roundtrip(held, b"before the outage\n") == b"before the outage\n"

        fresh_agent.kill()
        for p in (web.proxy, db.proxy):
            p.wait_log(r"agent \S+ unreachable", timeout=30)

        # Several seconds of outage: every watch retries a few times meanwhile.
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            assert try_echo(web.up["db"]), "a new connection failed while the agent was down"
            assert echo_roundtrip(held, b"during the outage\n") == b"during the outage\n"
            time.sleep(0.3)

        fresh_agent.start()
        m.register(db)
        m.register(web)
        for p in (web.proxy, db.proxy):
            p.wait_log(r"agent \S+ reachable again", timeout=60)
        # A restarted dev agent is a new cluster with a new trust domain. The connection held
        # across the outage comes from a caller of the old one, which a new connection could
        # no longer be, so it is closed once db has the new roots, like any open connection a
        # decision would now refuse.
        closed, _ = closed_without_data(held, timeout=60)
        assert closed, "a caller of the old trust domain kept its connection"
        db.proxy.wait_log(r"trust domain changed; closed 1 connection", timeout=10)
    finally:
        held.close()

    # Both sidecars move to the new CA's leaf certificates and roots.
    m.wait_passing(db, timeout=60)
    m.wait_echo(web.up["db"], timeout=60, what="an echo on the restarted agent's CA")

    # The intentions watch is live again: a deny written now takes effect.
    m.intend("db", {"web": "deny"})
    wait_until(lambda: is_refused(web.up["db"]), 60, "the deny written after the restart")

    for p in (web.proxy, db.proxy):
        log = p.log()
        assert len(re.findall(r"agent \S+ unreachable", log)) == 1, \
            f"{p.label}: expected one 'agent unreachable' line for the one outage"
        assert len(re.findall(r"agent \S+ reachable again", log)) == 1


def test_ready_says_the_agent_is_unreachable(fresh_agent, fresh_mesh):
    """/ready used to answer a bare "ready" while the agent was gone, so a probe could not
    tell a proxy running on stale state from a healthy one. It stays 200 (the proxy serves
    on its last good state; a probe must not take it out of service for the agent's fault)
    and names the unreachable agent, until the agent answers again."""
    m = fresh_mesh
    app = m.app(EchoApp)
    db = m.add("db", app_port=app.port, start=False)
    args, port = admin_args()
    m.start(db, extra_args=args)
    wait_until(lambda: admin_get(port, "/ready") == (200, "ready\n"), 30, "/ready to be ready")

    fresh_agent.kill()
    db.proxy.wait_log(r"agent \S+ unreachable", timeout=30)
    status, body = admin_get(port, "/ready")
    assert status == 200, body
    assert body == (f"ready; agent {fresh_agent.http_addr} unreachable: serving the last good "
                    f"state\n"), body

    fresh_agent.start()
    m.register(db)
    db.proxy.wait_log(r"agent \S+ reachable again", timeout=60)
    wait_until(lambda: admin_get(port, "/ready") == (200, "ready\n"), 30,
               "/ready to be plain ready again")
