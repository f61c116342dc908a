"""The admin endpoint (-admin-bind): /ready, /metrics, /connections, /authz and /config, served
by the control thread, and its limits: malformed, oversized and slow requests get an error or
are cut without disturbing the traffic the proxy carries at the same time."""

import json
import os
import socket
import threading
import time

from mesh import (LOOPBACK, EchoApp, admin_args, admin_get, admin_raw, echo_roundtrip, is_refused,
                  metric, parse_metrics, try_echo, wait_until)


def pair(m, web_admin=False):
    """db (echo app behind it, with an admin endpoint) and web (upstream db); returns
    (db, web, db admin port, web admin port or None)."""
    app = m.app(EchoApp)
    db = m.add("db", app_port=app.port, start=False)
    db_args, db_port = admin_args()
    m.start(db, extra_args=db_args)
    web = m.add("web", upstreams=["db"], start=False)
    web_args, web_port = admin_args() if web_admin else ([], None)
    m.start(web, extra_args=web_args)
    m.wait_passing(db)
    return db, web, db_port, web_port


def scrape(port):
    status, body = admin_get(port, "/metrics")
    assert status == 200, body
    assert "# TYPE connectd_connections_total counter" in body
    return parse_metrics(body)


def test_metrics_count_connections_bytes_and_decisions(mesh):
    m = mesh
    db, web, db_port, web_port = pair(m, web_admin=True)
    api = m.add("api", upstreams=["db"])
    m.intend("db", {"web": "allow", "api": "deny"})
    m.wait_echo(web.up["db"])
    wait_until(lambda: is_refused(api.up["db"]), 20, "api to be denied")

    before_db, before_web = scrape(db_port), scrape(web_port)
    payload = b"x" * 5000
    for _ in range(3):
        with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
            assert echo_roundtrip(s, payload, 10) == payload
    assert is_refused(api.up["db"])

    pub = {"listener": "public"}
    up = {"listener": "upstream", "upstream": db.name}

    def moved():
        a, w = scrape(db_port), scrape(web_port)
        return (metric(a, "connectd_connections_total", **pub)
                - metric(before_db, "connectd_connections_total", **pub) >= 4
                and metric(a, "connectd_bytes_in_total", **pub)
                - metric(before_db, "connectd_bytes_in_total", **pub) >= 3 * len(payload)
                and metric(a, "connectd_bytes_out_total", **pub)
                - metric(before_db, "connectd_bytes_out_total", **pub) >= 3 * len(payload)
                and metric(w, "connectd_connections_total", **up)
                - metric(before_web, "connectd_connections_total", **up) >= 3
                and metric(w, "connectd_bytes_in_total", **up)
                - metric(before_web, "connectd_bytes_in_total", **up) >= 3 * len(payload)
                and metric(a, "connectd_authorization_decisions_total", source=web.name,
                           result="allow")
                - metric(before_db, "connectd_authorization_decisions_total", source=web.name,
                         result="allow") >= 3
                and metric(a, "connectd_authorization_decisions_total", source=api.name,
                           result="deny")
                - metric(before_db, "connectd_authorization_decisions_total", source=api.name,
                         result="deny") >= 1)
    wait_until(moved, 10, "the counters to move with the traffic")

    a = scrape(db_port)
    assert metric(a, "connectd_ready") == 1
    assert metric(a, "connectd_snapshot_generation") >= 1
    assert metric(a, "connectd_leaf_not_after_seconds") > time.time()
    for watch in ("registration", "roots", "leaf", "intentions"):
        assert metric(a, "connectd_watch_up", watch=watch) == 1, watch
        assert metric(a, "connectd_watch_last_success_age_seconds", watch=watch) < 600
    wait_until(lambda: metric(scrape(db_port), "connectd_connections_active", **pub) == 0, 10,
               "no connection to stay active")


def test_ready_goes_from_503_to_200(mesh):
    m = mesh
    app = m.app(EchoApp)
    db = m.add("db", app_port=app.port, start=False)
    # The sidecar registration does not exist yet: connectd's registration watch retries.
    m.api.deregister(db.id)
    args, port = admin_args()
    db.proxy = m.start_connectd(db.name, ["-proxy-id", db.sidecar_id, "-http-addr",
                                          m.agent.http_addr, "-log-level", "debug",
                                          "-workers", "2", *args])

    def answer():
        try:
            return admin_get(port, "/ready", timeout=2)
        except OSError:
            return None
    wait_until(lambda: answer() is not None, 20, "the admin endpoint to answer")
    status, body = answer()
    assert status == 503, body
    assert "registration" in body, body
    m.register(db)
    wait_until(lambda: answer()[0] == 200, 30, "/ready to answer 200")
    assert answer()[1].strip() == "ready"
    db.proxy.wait_port(db.public_port)


def test_authz_names_the_deciding_intention(mesh):
    m = mesh
    db, web, db_port, _ = pair(m)
    m.intend("db", {"web": "allow", "api": "deny"})

    def authz(src):
        status, body = admin_get(db_port, f"/authz?source={src}")
        assert status == 200, body
        return json.loads(body)
    wait_until(lambda: authz(m.name("api"))["decision"] == "deny", 20, "the deny to arrive")
    a = authz(web.name)
    assert a["decision"] == "allow" and a["decided_by"] == "intention", a
    assert a["intention"]["source"] == web.name and a["intention"]["action"] == "allow", a
    assert a["intention"]["destination"] == db.name, a
    assert isinstance(a["intention"]["precedence"], int), a
    d = authz(m.name("api"))
    assert d["decided_by"] == "intention" and d["intention"]["action"] == "deny", d
    o = authz("nobody-at-all")
    assert o["decided_by"] == "default policy" and o["intention"] is None, o
    assert "default policy" in o["reason"], o
    assert admin_get(db_port, "/authz")[0] == 400


def test_connections_lists_open_sessions_with_identity(mesh):
    m = mesh
    db, web, db_port, web_port = pair(m, web_admin=True)
    m.intend("db", {"web": "allow"})
    m.wait_echo(web.up["db"])
    with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
        assert echo_roundtrip(s, b"still here\n", 10) == b"still here\n"
        want = m.api.spiffe_id(web.name)

        def listed():
            status, body = admin_get(db_port, "/connections")
            assert status == 200, body
            conns = json.loads(body)["connections"]
            return [c for c in conns if c["direction"] == "inbound"
                    and c["peer_identity"] == want and c["state"] == "RELAY"]
        wait_until(lambda: listed(), 10, "the open connection to be listed")
        c = listed()[0]
        assert c["bytes_in"] >= 11 and c["bytes_out"] >= 11 and c["age_ms"] >= 0, c
        status, body = admin_get(web_port, "/connections")
        out = [c for c in json.loads(body)["connections"] if c["direction"] == "outbound"]
        assert out and out[0]["upstream"] == db.name and out[0]["endpoint"], body


def test_config_shows_settings_but_no_secrets(mesh):
    m = mesh
    db, web, db_port, web_port = pair(m, web_admin=True)
    status, body = admin_get(web_port, "/config")
    assert status == 200, body
    c = json.loads(body)
    assert c["service"] == web.name
    assert c["trust_domain"] and c["tls"]["leaf_serial"]
    assert [u["destination_name"] for u in c["upstreams"]] == [db.name]
    assert c["upstreams"][0]["bind_port"] == web.up["db"]
    assert "PRIVATE KEY" not in body and "CERTIFICATE" not in body
    assert admin_get(web_port, "/nope")[0] == 404


def test_bad_admin_requests_are_refused_without_disturbing_traffic(mesh):
    m = mesh
    db, web, db_port, _ = pair(m)
    m.intend("db", {"web": "allow"})
    m.wait_echo(web.up["db"])

    # Traffic keeps flowing on a long connection while the admin endpoint is abused.
    stop = threading.Event()
    errors = []

    def traffic():
        try:
            with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
                while not stop.is_set():
                    if echo_roundtrip(s, b"ping" * 100, 10) != b"ping" * 100:
                        errors.append("echo mismatch")
                        return
        except OSError as e:
            errors.append(repr(e))
    t = threading.Thread(target=traffic)
    t.start()

    slow = []
    try:
        big = b"GET /ready HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        assert admin_raw(db_port, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert admin_raw(db_port, b"GET /ready\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert admin_raw(db_port, big).startswith(b"HTTP/1.1 431")
        assert admin_raw(db_port, b"POST /ready HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
        assert admin_raw(db_port, b"GET /ready HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505")
        assert admin_raw(db_port, b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n").startswith(
            b"HTTP/1.1 414")

        # Slow clients that never finish their request, more than the connection cap: a new
        # request evicts the oldest of them (503 or a plain close) and is answered at once,
        # the rest are cut at the head deadline (408).
        for _ in range(20):
            s = socket.create_connection((LOOPBACK, db_port), timeout=10)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        assert admin_raw(db_port, b"GET /ready HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
        got = slow[0].recv(1000)
        assert got == b"" or got.startswith(b"HTTP/1.1 503"), got
        got = slow[-1].recv(1000)
        assert got == b"" or got.startswith(b"HTTP/1.1 408"), got
    finally:
        for s in slow:
            s.close()
        stop.set()
        t.join(30)
    assert not errors, errors
    assert try_echo(web.up["db"])


def test_admin_on_a_unix_socket(mesh, tmp_path):
    m = mesh
    app = m.app(EchoApp)
    db = m.add("db", app_port=app.port, start=False)
    path = str(tmp_path / "admin.sock")
    m.start(db, extra_args=["-admin-bind", f"unix://{path}"])

    def get_ready():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(b"GET /ready HTTP/1.1\r\nHost: admin\r\n\r\n")
            out = b""
            while chunk := s.recv(4096):
                out += chunk
            return out
    wait_until(lambda: get_ready().startswith(b"HTTP/1.1 200"), 20, "/ready over the socket")
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)


def silent_then_ready(dial, ready):
    """Issue 7 defect 4: 16 silent connections held every admin slot, so a readiness probe's
    connection was closed at accept and the probe saw an outage. Opens twice that many silent
    connections with <dial>, then checks that <ready>() answers 200 at once (well within the
    2 s head deadline, so not because a deadline freed a slot) while the newest silent
    connection still holds its slot."""
    silent = []
    try:
        for _ in range(32):
            silent.append(dial())
        t0 = time.monotonic()
        for _ in range(3):
            assert ready().startswith(b"HTTP/1.1 200"), "probe not answered"
        assert time.monotonic() - t0 < 1.5
        silent[-1].setblocking(False)
        try:
            assert silent[-1].recv(1) == b"", "the newest silent connection got data"
            raise AssertionError("the newest silent connection was closed")
        except BlockingIOError:
            pass  # still open: the oldest ones were evicted, not everyone
    finally:
        for s in silent:
            s.close()


def test_silent_connections_from_loopback_do_not_block_ready(mesh):
    m = mesh
    app = m.app(EchoApp)
    args, port = admin_args()
    db = m.add("db", app_port=app.port, start=False)
    m.start(db, extra_args=args)
    wait_until(lambda: admin_get(port, "/ready")[0] == 200, 20, "/ready")
    silent_then_ready(lambda: socket.create_connection((LOOPBACK, port), timeout=10),
                      lambda: admin_raw(port, b"GET /ready HTTP/1.1\r\nHost: a\r\n\r\n", 5))


def test_silent_connections_on_the_unix_socket_do_not_block_ready(mesh, tmp_path):
    m = mesh
    app = m.app(EchoApp)
    db = m.add("db", app_port=app.port, start=False)
    path = str(tmp_path / "admin.sock")
    m.start(db, extra_args=["-admin-bind", f"unix://{path}"])

    def dial():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        return s

    def get_ready():
        with dial() as s:
            s.settimeout(5)
            s.sendall(b"GET /ready HTTP/1.1\r\nHost: admin\r\n\r\n")
            out = b""
            while chunk := s.recv(4096):
                out += chunk
            return out
    wait_until(lambda: get_ready().startswith(b"HTTP/1.1 200"), 20, "/ready over the socket")
    silent_then_ready(dial, get_ready)
