"""Key and token hygiene (issue 7, defect 5): the leaf's private key and the ACL token must not
linger in connectd's memory, and connectd keeps itself out of core dumps.

The bug: the leaf watch kept the raw body of the last leaf answer (PrivateKeyPEM and all) for
the life of the process, the control thread kept the decoded PEM beside the key OpenSSL parsed
from it, and libcurl's, jansson's and our own response buffers went back to the heap unwiped
(with realloc leaving stale copies); every in-flight request carried its own copy of the
X-Consul-Token header, the token file's stdio buffer was freed unwiped, and core dumps were on.
A scan of the process's memory found four copies of the key.

These tests read /proc/<pid>/mem of a running release build (the test runs as root, which may
read any process's memory; the ASan build's shadow mappings are too large to read) after it is
ready, and count every line of the key's base64 body and the token. The key's one expected copy
is OpenSSL's binary EVP_PKEY, so the PEM text must appear nowhere; the token has two expected
holders, the resolved configuration and the agent transport's one header, so it must appear at
most twice however many requests have come and gone.
"""

import json
import os
import re
import secrets
import subprocess

import pytest

from mesh import (REPO, AgentApi, ConsulAgent, Connectd, EchoApp, Mesh, admin_args, admin_get,
                  make_ca, stop_process, wait_until)
from test_agent_transport import SERVER_NAME, tls_files  # noqa: F401 (a fixture)

RELEASE_BIN = (os.environ.get("CONNECTD_RELEASE_BIN")
               or os.path.join(REPO, "build", "release", "connectd"))

# Copies of the token connectd keeps on purpose: the configuration's resolved token, and the
# one "X-Consul-Token: ..." header every request without a body shares.
TOKEN_HOLDERS = 2


@pytest.fixture
def release_bin():
    if not (os.path.isfile(RELEASE_BIN) and os.access(RELEASE_BIN, os.X_OK)):
        pytest.fail(f"{RELEASE_BIN} not found: build it with `make VARIANT=release`",
                    pytrace=False)
    return RELEASE_BIN


def key_lines(pem):
    """The base64 lines of a PEM body: each one is distinctive on its own (48 random bytes)."""
    return [ln.strip() for ln in pem.splitlines()
            if ln.strip() and not ln.startswith("-----") and len(ln.strip()) >= 32]


def scan_memory(pid, needles):
    """Reads every readable mapping of <pid> through /proc/<pid>/mem and returns, for each
    needle (bytes), the list of (mapping name, address) where it occurs."""
    found = {n: [] for n in needles}
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            name = parts[5].strip() if len(parts) > 5 else "[anon]"
            if "r" not in parts[1] or name in ("[vvar]", "[vsyscall]"):
                continue
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except OSError:
                continue  # a guard page or a mapping that went away meanwhile
            for n in needles:
                at = data.find(n)
                while at != -1:
                    found[n].append((name, hex(lo + at)))
                    at = data.find(n, at + 1)
    return found


def start_release(m, release_bin, label, args):
    """A release-build connectd that the mesh stops at teardown."""
    log_path = os.path.join(m.workdir, f"connectd-{label}.log")
    p = Connectd(release_bin, args, log_path, f"connectd[{label}]")
    m.procs.append(p)
    m.on_log(p.label, log_path)
    return p.start()


def admin_config(port):
    status, body = admin_get(port, "/config")
    assert status == 200, body
    return json.loads(body)


def start_with_token(m, release_bin, tmp_path, agent_args=None):
    """web with its sidecar's connectd (release build) reading a fresh token from a file; a dev
    agent without ACLs accepts any token. Returns (service, process, token, admin port)."""
    app = m.app(EchoApp)
    web = m.add("web", app_port=app.port, start=False)
    token = "hygiene-" + secrets.token_hex(16)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    admin, port = admin_args()
    proc = start_release(m, release_bin, web.name,
                         ["-sidecar-for", web.id, "-workers", "2", "-token-file", str(token_file),
                          *(agent_args or ["-http-addr", m.agent.http_addr]), *admin])

    def ready():
        assert proc.alive(), proc.log()
        try:
            return admin_get(port, "/ready")[0] == 200
        except OSError:
            return False

    wait_until(ready, 30, "connectd to be ready")
    return web, proc, token, port


def leaf_in_use(m, token, port, service):
    """The leaf connectd serves with, as the agent hands it to the same token."""
    api = AgentApi(m.agent.http_addr, token=token)
    holder = {}

    def same_serial():
        holder["leaf"] = api.leaf(service)
        return holder["leaf"]["SerialNumber"] == admin_config(port)["tls"]["leaf_serial"]

    wait_until(same_serial, 30, "the agent's leaf to be the one connectd serves")
    return holder["leaf"]


REQUEST_HEAD = re.compile(rb"GET (/v1/[^? ]*)[^ ]* HTTP/1\.1\r\n(?:[^\r\n]*\r\n)*?X-Consul-Token: $")


def request_head_path(pid, addr):
    """The path of the HTTP request head whose X-Consul-Token header holds the token found at
    <addr>, or None when the token there is not in such a head."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(addr - 1024)
        before = mem.read(1024)
    m = REQUEST_HEAD.search(before)
    return m.group(1) if m else None


def assert_clean(pid, key_pems, token, cert_pem, request_heads_in_flight=False):
    """No line of any key's PEM, and the token only where it is kept on purpose. With
    <request_heads_in_flight> (an https:// agent) the token may also be in the head of each
    request in flight, at most one per path: libcurl copies the head of an HTTPS request into
    the transfer's upload buffer, which lives (out of our reach) until the transfer ends and
    is wiped as libcurl frees it."""
    needles = [ln.encode() for pem in key_pems for ln in key_lines(pem)]
    assert len(needles) >= 3, "the leaf key has too few base64 lines to look for"
    # The scan's own check: connectd keeps the leaf certificate's PEM, so it must see that.
    cert_line = key_lines(cert_pem)[1].encode()
    found = scan_memory(pid, needles + [token.encode(), cert_line])
    assert found[cert_line], "the scan did not find the certificate connectd keeps"
    problems = []
    key_hits = {n.decode()[:16] + "...": found[n] for n in needles if found[n]}
    if key_hits:
        problems.append(f"the private key's PEM text is still in connectd's memory: {key_hits}")
    token_hits = found[token.encode()]
    if request_heads_in_flight:
        paths = [request_head_path(pid, int(addr, 16)) for _, addr in token_hits]
        heads = [p for p in paths if p is not None]
        if len(heads) != len(set(heads)):
            problems.append(f"the token is in more than one request head per path: {heads}")
        # Our own header list also reads "X-Consul-Token: ..." but has no request line.
        token_hits = [h for h, p in zip(token_hits, paths) if p is None]
    if len(token_hits) > TOKEN_HOLDERS:
        problems.append(f"the token is in connectd's memory {len(token_hits)} times (expected "
                        f"at most {TOKEN_HOLDERS}): {token_hits}")
    assert not problems, "\n".join(problems)


def test_memory_holds_no_key_pem_and_only_the_kept_token(mesh, release_bin, tmp_path):
    m = mesh
    web, proc, token, port = start_with_token(m, release_bin, tmp_path)
    leaf = leaf_in_use(m, token, port, web.name)
    assert "PRIVATE KEY" in leaf["PrivateKeyPEM"]
    # More agent traffic under the token: a re-registration makes the registration watch
    # answer, and every answer re-issues a blocking request.
    for _ in range(3):
        m.register(web)
    wait_until(lambda: admin_get(port, "/ready")[0] == 200, 10, "connectd to stay ready")
    assert_clean(proc.pid, [leaf["PrivateKeyPEM"]], token, leaf["CertPEM"])


def test_rotated_leaf_leaves_no_key_pem_behind(fresh_mesh, release_bin, tmp_path):
    """After a CA rotation the leaf watch fires again: neither the old key nor the new one may
    be left as text."""
    m = fresh_mesh
    web, proc, token, port = start_with_token(m, release_bin, tmp_path)
    old = leaf_in_use(m, token, port, web.name)
    new_ca = make_ca("connectd hygiene root", m.api.trust_domain())
    m.api.set_ca(new_ca.cert_pem, new_ca.key_pem)
    # The agent re-signs leaves after a root change with a random spread (seen: 4-22 s).
    wait_until(lambda: admin_config(port)["tls"]["leaf_serial"] != old["SerialNumber"], 90,
               "connectd to take the re-issued leaf", interval=0.5)
    new = leaf_in_use(m, token, port, web.name)
    assert new["PrivateKeyPEM"] != old["PrivateKeyPEM"]
    assert_clean(proc.pid, [old["PrivateKeyPEM"], new["PrivateKeyPEM"]], token, new["CertPEM"])


# --- core dumps ---

NOBODY = 65534


def _proc_owner(pid):
    return os.stat(f"/proc/{pid}/status").st_uid


def _start_as_nobody(m, release_bin, extra):
    """connectd as an unprivileged user (so /proc/<pid> shows its dumpable state: the kernel
    makes a non-dumpable process's /proc files root's). Flags mode on the shared agent."""
    log_path = os.path.join(m.workdir, f"connectd-nobody{len(m.procs)}.log")
    args = ["-service", m.name("solo"), "-http-addr", m.agent.http_addr, "-workers", "1",
            *extra]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([release_bin] + args, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, user=NOBODY, group=NOBODY,
                                extra_groups=[], env={"PATH": os.environ.get("PATH", "")})
    return proc, log_path


def _running(proc, log_path):
    """Waits for a log line that main() writes after its prctl (the control thread's)."""
    def logged():
        assert proc.poll() is None, open(log_path).read()
        return re.search(r"agent|watch|TLS", open(log_path).read())

    wait_until(logged, 20, "connectd to start")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run connectd as another user")
def test_not_dumpable_by_default(mesh, release_bin):
    proc, log_path = _start_as_nobody(mesh, release_bin, [])
    try:
        _running(proc, log_path)
        assert _proc_owner(proc.pid) == 0, (
            "connectd is dumpable: /proc/<pid> of a non-dumpable process belongs to root")
    finally:
        rc, killed = stop_process(proc)
    assert not killed and rc == 0, open(log_path).read()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run connectd as another user")
def test_allow_core_dumps_keeps_it_dumpable(mesh, release_bin):
    proc, log_path = _start_as_nobody(mesh, release_bin, ["-allow-core-dumps"])
    try:
        _running(proc, log_path)
        assert _proc_owner(proc.pid) == NOBODY
    finally:
        rc, killed = stop_process(proc)
    assert not killed and rc == 0, open(log_path).read()


def test_https_agent_leaves_no_key_pem(consul_bin, release_bin, tmp_path, tls_files):
    """Over HTTPS the answers are decrypted in OpenSSL's record buffer before libcurl sees
    them (and with HTTP/2 nghttp2 would keep every header): those copies must not stay
    either."""
    hcl = (f'tls {{ defaults {{ ca_file = "{tls_files["ca"]}" cert_file = "{tls_files["srv"]}" '
           f'key_file = "{tls_files["srv_key"]}" }} https {{ verify_incoming = true }} }}')
    agent = ConsulAgent(consul_bin, str(tmp_path / "agent"), [hcl], https=True).start()
    workdir = tmp_path / "mesh"
    workdir.mkdir()
    m = Mesh(agent, str(workdir), release_bin, lambda label, path: None)
    try:
        args = ["-http-addr", f"https://127.0.0.1:{agent.ports['https']}",
                "-ca-file", tls_files["ca"], "-client-cert", tls_files["cli"],
                "-client-key", tls_files["cli_key"], "-tls-server-name", SERVER_NAME]
        web, proc, token, port = start_with_token(m, release_bin, tmp_path, args)
        leaf = leaf_in_use(m, token, port, web.name)
        for _ in range(3):
            m.register(web)
        wait_until(lambda: admin_get(port, "/ready")[0] == 200, 10, "connectd to stay ready")
        assert_clean(proc.pid, [leaf["PrivateKeyPEM"]], token, leaf["CertPEM"],
                     request_heads_in_flight=True)
    finally:
        problems = m.close()
        agent.stop()
    assert problems == []
