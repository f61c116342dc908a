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


def test_watches_carry_the_registration_namespace_and_partition(hop, mesh):
    """A proxy registered in namespace "team" of partition "eng" (Enterprise) presents the
    leaf of, and is governed by the intentions of, its service in that namespace and
    partition; the watches used to ask for the default namespace's same-named service. A CE
    agent cannot hold such a registration, so the hop adds the fields to the real one and the
    test reads the requests connectd makes (the CE agent then refuses them, which is fine)."""
    m = mesh
    db = m.add("db", app_port=m.app(EchoApp).port, start=False)

    def in_team(path, body):
        if not path.startswith("/v1/agent/service/"):
            return body
        svc = json.loads(body)
        svc["Namespace"], svc["Partition"] = "team", "eng"
        return json.dumps(svc).encode()

    hop.rewrite = in_team
    db.proxy = m.start_connectd(db.name, ["-sidecar-for", db.id, "-http-addr", hop.http_addr,
                                          "-log-level", "debug"])

    def asked(prefix):
        return [p for p in hop.paths if p.startswith(prefix)]

    wait_until(lambda: asked("/v1/agent/connect/ca/leaf/") and
               asked("/v1/connect/intentions/match"), 20, "the leaf and intentions watches")
    for p in asked("/v1/agent/connect/ca/leaf/") + asked("/v1/connect/intentions/match"):
        assert "ns=team" in p and "partition=eng" in p, p
    assert all(f"name={db.name}&" in p for p in asked("/v1/connect/intentions/match"))
