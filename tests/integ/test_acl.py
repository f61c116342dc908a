"""ACLs on with default deny: every agent call needs a token with the right permissions, and
intentions default to deny. connectd works with the management token, with a token scoped to
what a sidecar needs (given the managed-proxy way, CONNECT_PROXY_ID + CONNECT_PROXY_TOKEN), and
fails clearly (a logged 403 naming the endpoint, no crash, nothing served) with a bad token.
"""

import pytest

from mesh import EchoApp, port_refuses

ACL_HCL = ('acl { enabled = true default_policy = "deny" '
           'tokens { initial_management = "root" agent = "root" } }')

pytestmark = pytest.mark.agent_hcl(ACL_HCL)


def _scoped_token(api, m):
    """A token with what web's sidecar needs and nothing more: write on web and its proxy
    (leaf, registration), intentions read on web, read on db and its proxy plus nodes (the
    upstream's health)."""
    web, db = m.name("web"), m.name("db")
    rules = (f'service "{web}" {{ policy = "write" intentions = "read" }}\n'
             f'service "{web}-sidecar-proxy" {{ policy = "write" }}\n'
             f'service "{db}" {{ policy = "read" }}\n'
             f'service "{db}-sidecar-proxy" {{ policy = "read" }}\n'
             'node_prefix "" { policy = "read" }\n')
    policy = api.put("/v1/acl/policy", {"Name": f"sidecar-{web}", "Rules": rules})
    token = api.put("/v1/acl/token", {"Description": f"sidecar {web}",
                                      "Policies": [{"ID": policy["ID"]}]})
    return token["SecretID"]


def _db(m):
    db_app = m.app(EchoApp)
    db = m.add("db", app_port=db_app.port, start=False)
    m.start(db, extra_args=["-token", "root"])
    m.intend("db", {"web": "allow"})
    return db


def test_acl_management_token(fresh_agent, fresh_mesh):
    m = fresh_mesh
    db = _db(m)
    web = m.add("web", upstreams=["db"], start=False)
    m.start(web, extra_args=["-token", "root"])
    m.wait_passing(db)
    m.wait_echo(web.up["db"])


def test_acl_scoped_token_managed_env(fresh_agent, fresh_mesh):
    """The managed-proxy environment: CONNECT_PROXY_ID names the registration and
    CONNECT_PROXY_TOKEN is the token, with no flag at all."""
    m = fresh_mesh
    db = _db(m)
    web = m.add("web", upstreams=["db"], start=False)
    token = _scoped_token(fresh_agent.api, m)
    web.proxy = m.start_connectd(web.name, ["-http-addr", fresh_agent.http_addr, "-log-level",
                                            "debug"],
                                 env={"CONNECT_PROXY_ID": web.sidecar_id,
                                      "CONNECT_PROXY_TOKEN": token})
    for port in (web.public_port, web.up["db"]):
        web.proxy.wait_port(port)
    m.wait_passing(db)
    m.wait_echo(web.up["db"])
    assert token not in web.proxy.log(), "the token was logged"


def test_acl_bad_token_fails_clearly(fresh_agent, fresh_mesh):
    m = fresh_mesh
    web = m.add("web", start=False)
    bad = "00000000-0000-4000-8000-000000000bad"
    web.proxy = m.start_connectd(web.name, ["-proxy-id", web.sidecar_id, "-http-addr",
                                            fresh_agent.http_addr, "-token", bad])
    web.proxy.wait_log(r"\[ERROR\] watch registration \S+: GET /v1/agent/service/\S+ refused: "
                       r"HTTP 403", timeout=20)
    assert web.proxy.alive()
    assert port_refuses(web.public_port), "served without a registration, leaf or roots"
    assert "ready: serving" not in web.proxy.log()
    own_lines = [ln for ln in web.proxy.log().splitlines() if not ln.startswith("$ ")]
    assert not any(bad in ln for ln in own_lines), "the token was logged"
