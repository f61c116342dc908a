"""Start-up against an agent that is not there yet, and the flags mode's prepared-query
upstream (`-upstream name.query:port`), which reuses the registration path's query support.
"""

import re
import socket

from mesh import (LOOPBACK, EchoApp, admin_args, admin_get, free_port, port_refuses, try_echo,
                  wait_until)


def test_agent_unreachable_at_start_is_not_fatal(fresh_agent, fresh_mesh):
    """connectd started while its agent is down keeps retrying and serves nothing; once the
    agent is back (and the registration exists) it serves without a restart."""
    m = fresh_mesh
    db_app = m.app(EchoApp)
    db = m.add("db", app_port=db_app.port)
    web = m.add("web", upstreams=["db"], start=False)
    m.wait_passing(db)

    fresh_agent.kill()
    args, admin = admin_args()
    m.start_connectd(web.name, ["-proxy-id", web.sidecar_id, "-http-addr",
                                fresh_agent.http_addr, "-log-level", "debug", *args])
    web.proxy = m.procs[-1]
    web.proxy.wait_log(r"retrying|unreachable", timeout=20)
    # Still running, and serving nothing: no certificates yet, so no listener either.
    wait_until(lambda: web.proxy.alive(), 1, "connectd to keep running")
    assert port_refuses(web.up["db"]) and port_refuses(web.public_port)
    assert web.proxy.alive(), "connectd gave up while the agent was unreachable at start"
    # /ready says what it waits for and why it cannot have it yet.
    def ready():
        try:
            return admin_get(admin, "/ready")
        except OSError:
            return None

    want = (503, f"waiting for the proxy registration; agent {fresh_agent.http_addr} "
                 f"unreachable\n")
    wait_until(lambda: ready() == want, 20, "/ready to name the unreachable agent")

    fresh_agent.start()
    m.register(db)
    m.register(web)
    m.wait_passing(db, timeout=60)
    m.wait_echo(web.up["db"], timeout=60, what="traffic once the agent came up")
    assert web.proxy.alive()


def test_flags_mode_prepared_query_upstream(agent, mesh):
    """-upstream <query>.query:<port> resolves through the prepared query."""
    m, api = mesh, mesh.api
    echo = m.app(EchoApp)
    db = m.add("db", app_port=echo.port)
    m.wait_passing(db)
    qname = m.name("dbq")
    qid = api.call("POST", "/v1/query", {"Name": qname,
                                        "Service": {"Service": db.name, "OnlyPassing": True}})["ID"]
    try:
        up = free_port()
        web = m.start_connectd("web-flags-q", ["-service", m.name("web"), "-upstream",
                                               f"{qname}.query:{up}", "-http-addr",
                                               agent.http_addr, "-log-level", "debug"])
        web.wait_port(up)
        m.wait_echo(up, timeout=30, what="an echo through a flags-mode prepared-query upstream")
        assert re.search(r"prepared query", web.log())
        assert try_echo(up)
    finally:
        api.delete("/v1/query/" + qid)


def test_listener_that_cannot_open_at_start_is_fatal(mesh):
    """A public port already taken at start-up ends connectd with status 1 and a message that
    names the address, instead of a process that runs without its listener."""
    m = mesh
    squatter = socket.socket()
    squatter.bind((LOOPBACK, 0))
    squatter.listen()
    try:
        db = m.add("db", app_port=free_port(), start=False)
        db.public_port = squatter.getsockname()[1]
        m.register(db)
        proxy = m.start_connectd(db.name, ["-sidecar-for", db.id, "-http-addr",
                                           m.agent.http_addr])
        code = proxy.proc.wait(timeout=30)
        m.procs.remove(proxy)
        assert code == 1, f"exit status {code}"
        log = proxy.log()
        assert re.search(r"listen 127\.0\.0\.1:%d: Address already in use" % db.public_port,
                         log), log
        assert "could not open every listener at start-up" in log
    finally:
        squatter.close()
