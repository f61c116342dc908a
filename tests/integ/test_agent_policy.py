"""What connectd takes from the agent when the agent says less than usual: the default
intention decision without the X-Consul-Default-ACL-Policy header, and the namespace and
partition of a proxy registered outside the defaults. A real agent always sends the header and
a CE agent has only the default namespace, so an HTTP hop in front of the real agent says less
(or more) than it would."""

import json
import re

import pytest

from mesh import AgentInterposer, EchoApp, is_refused, wait_until

NO_ACL_HEADER = "x-consul-default-acl-policy"


@pytest.fixture
def hop(agent):
    """Requested before mesh, so it outlives the connectd processes that talk through it."""
    h = AgentInterposer(agent.http_addr)
    yield h
    h.stop()


def start_behind(m, hop, svc):
    svc.proxy = m.start_connectd(svc.name, ["-sidecar-for", svc.id, "-http-addr", hop.http_addr,
                                            "-log-level", "debug"])
    svc.proxy.wait_port(svc.public_port)


def test_default_policy_fails_closed_when_the_agent_does_not_say_it(hop, mesh):
    """An agent that sends no X-Consul-Default-ACL-Policy header and refuses /v1/agent/self
    (no agent:read) has not said whether no intention means allow or deny. connectd used to
    take "allow"; it now denies unless the agent says its ACLs are off."""
    m = mesh
    db = m.add("db", app_port=m.app(EchoApp).port, start=False)
    web = m.add("web", upstreams=["db"])
    hop.drop_headers = {NO_ACL_HEADER}
    hop.canned = {"/v1/agent/self": (403, b'"Permission denied: token lacks agent:read"')}
    start_behind(m, hop, db)
    m.wait_passing(db)
    db.proxy.wait_log(r"intentions for \S+: 0 rule\(s\), default deny \(the agent did not say "
                      r"its default policy: failing closed\)")
    denied = re.compile(r"result=denied reason=\"default policy deny\"")
    wait_until(lambda: is_refused(web.up["db"]) and denied.search(db.proxy.log()), 20,
               "web refused by db's fail-closed default")

    # The same agent saying (through /v1/agent/self) that its ACLs are off: allow.
    m.procs.remove(db.proxy)
    assert db.proxy.stop() == []
    hop.canned = {"/v1/agent/self": (200, json.dumps(
        {"Config": {"Datacenter": "dc1"}, "DebugConfig": {"ACLsEnabled": False}}).encode())}
    start_behind(m, hop, db)
    db.proxy.wait_log(r"default allow \(agent ACLs disabled\)")
    m.wait_echo(web.up["db"], what="web allowed once the agent says ACLs are off")
