"""Outbound HTTP/2 (issue 9): an upstream whose protocol is grpc (or http2) gets connectd's
HTTP/2 codec on its outbound listener. The local application speaks h2c (prior knowledge) to
web's upstream port; each of its streams goes out as a stream on a connection web's worker
shares (h2up), over mTLS with ALPN "h2" to db's sidecar, which authorizes it and passes it to
the grpcio server behind it (on the worker's shared h2c connection to the app).

What is checked: calls pass and a deny is PERMISSION_DENIED; the mesh hop negotiated ALPN h2
(db's access-log records carry `alpn`), web logs each stream (outbound records with the path);
many concurrent calls from several client channels share a bounded number of mesh connections
(db's access log names the connection of each stream; web's /metrics counts its shared
connections); an endpoint killed: the next streams go to the other one, and with none left a
call gets UNAVAILABLE from connectd; draining (SIGTERM) sends GOAWAY so an idle HTTP/2
connection does not hold connectd until -drain-timeout while in-flight calls finish; the
per-stream idle timeout ends a stalled stream while its sibling on the same connection goes on.
"""

import json
import signal
import ssl
import threading
import time
from concurrent import futures

import grpc
import pytest

from mesh import (LOOPBACK, SANITIZER_MARKERS, admin_args, admin_get, issued_by, make_ca,
                  metric, parse_metrics, peer_cert_der, tls_client_context, wait_until,
                  write_leaf_files)


# --- a grpcio server on raw bytes ----------------------------------------------------------------


def grpc_server(name="db"):
    """A grpcio server (h2c on loopback) with service test.Echo:
    Who      answers <name> and the x-forwarded-client-cert it saw (JSON);
    Hold     answers "held-<name>" after the request's number of milliseconds;
    Tick     streams N messages (N = request), one every 250 ms;
    Stall    answers after 6 s (a stream that stalls);
    Pipe     answers each message of a bidirectional stream with itself."""
    stop = threading.Event()

    def who(req, ctx):
        md = dict(ctx.invocation_metadata())
        return json.dumps({"who": name, "xfcc": md.get("x-forwarded-client-cert")}).encode()

    def hold(req, ctx):
        time.sleep(int(req.decode()) / 1000.0)
        return b"held-" + name.encode()

    def tick(req, ctx):
        for i in range(int(req.decode())):
            yield b"tick-%d" % i
            time.sleep(0.25)

    def stall(req, ctx):
        stop.wait(6)
        return b"late"

    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Who": grpc.unary_unary_rpc_method_handler(who),
        "Hold": grpc.unary_unary_rpc_method_handler(hold),
        "Tick": grpc.unary_stream_rpc_method_handler(tick),
        "Stall": grpc.unary_unary_rpc_method_handler(stall),
        "Pipe": grpc.stream_stream_rpc_method_handler(lambda reqs, ctx: iter(reqs)),
    })
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=80))
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port(f"{LOOPBACK}:0")
    srv.start()
    srv.release = stop.set
    return srv, port


def call(ch, method, req=b"x", timeout=10):
    return ch.unary_unary(f"/test.Echo/{method}")(req, timeout=timeout)


def code_of(port, method="Who"):
    try:
        with grpc.insecure_channel(f"{LOOPBACK}:{port}") as ch:
            call(ch, method)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def records(path):
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def grpc_defaults(m):
    assert m.api.put("/v1/config", {"Kind": "service-defaults", "Name": m.name("db"),
                                    "Protocol": "grpc"}) is True


def drop_defaults(m):
    m.api.delete_intentions(m.name("db"))
    m.api.delete("/v1/config/service-defaults/" + m.name("db"))


def grpc_pair(m, app_port, db_args=(), web_args=(), db_config=None):
    """db (protocol grpc) in front of <app_port>, and web with upstream db (grpc from the
    discovery chain): web's upstream port gets the outbound HTTP/2 codec."""
    grpc_defaults(m)
    db = m.add("db", app_port=app_port, proxy_config={"protocol": "grpc", **(db_config or {})},
               start=False)
    m.start(db, extra_args=db_args)
    web = m.add("web", upstreams=("db",), start=False)
    m.start(web, extra_args=web_args)
    m.wait_passing(db)
    return db, web


def web_metrics(admin):
    return parse_metrics(admin_get(admin, "/metrics")[1])


def stopped_by_test(m, proc):
    """The test ended `proc` itself: the mesh must not stop it again; sanitizer reports are
    still checked."""
    text = proc.log()
    for marker in SANITIZER_MARKERS:
        assert marker not in text, f"{proc.label}: sanitizer report in log ({marker!r})"
    m.procs.remove(proc)


# --- tests ----------------------------------------------------------------------------------------


def test_grpc_through_outbound_h2_alpn_access_log_and_deny(mesh, tmp_path):
    """A grpcio client on web's upstream port reaches the grpcio server behind db: the call
    passes (the server sees web's XFCC: db authorized the stream); the mesh hop selected ALPN
    h2 (db's request record has alpn "h2"); web wrote an outbound record for the stream
    (path, status, grpc-status) and counts its shared connection and streams; a deny
    intention gives PERMISSION_DENIED "RBAC: access denied"."""
    m = mesh
    srv, port = grpc_server()
    db_log, web_log = tmp_path / "db.log", tmp_path / "web.log"
    args, admin = admin_args()
    try:
        db, web = grpc_pair(m, port, db_args=("-access-log", str(db_log)),
                            web_args=(*args, "-access-log", str(web_log)))
        wait_until(lambda: code_of(web.up["db"]) == grpc.StatusCode.OK, 30,
                   "a gRPC call through web's outbound")
        with grpc.insecure_channel(f"{LOOPBACK}:{web.up['db']}") as ch:
            seen = json.loads(call(ch, "Who", b"hello"))
            assert seen["who"] == "db" and "URI=spiffe://" in seen["xfcc"], seen
            got = list(ch.unary_stream("/test.Echo/Tick")(b"3", timeout=10))
            assert got == [b"tick-0", b"tick-1", b"tick-2"]

        def db_who():
            return [r for r in records(db_log) if r.get("path") == "/test.Echo/Who"]

        wait_until(db_who, 10, "db's record of the call")
        rec = db_who()[-1]
        assert rec["direction"] == "inbound" and rec["protocol"] == "HTTP/2", rec
        assert rec.get("alpn") == "h2", f"the mesh hop did not negotiate ALPN h2: {rec}"
        assert rec["grpc_status"] == "0" and rec["status"] == 200, rec

        def web_who():
            return [r for r in records(web_log) if r.get("path") == "/test.Echo/Who"]

        wait_until(web_who, 10, "web's outbound record of the call")
        out = web_who()[-1]
        assert out["direction"] == "outbound" and out["protocol"] == "HTTP/2", out
        assert out["status"] == 200 and out["grpc_status"] == "0", out
        assert out["result"] == "ok" and out["upstream"] == m.name("db"), out
        assert out["endpoint"] == f"{LOOPBACK}:{db.public_port}", out

        mt = web_metrics(admin)
        assert metric(mt, "connectd_upstream_h2_connections") >= 1, mt
        assert metric(mt, "connectd_upstream_h2_streams_total") >= 3, mt

        m.intend("db", {"web": "deny"})
        wait_until(lambda: code_of(web.up["db"]) == grpc.StatusCode.PERMISSION_DENIED, 20,
                   "the deny to apply")
        with grpc.insecure_channel(f"{LOOPBACK}:{web.up['db']}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                call(ch, "Who")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == "RBAC: access denied"
    finally:
        srv.stop(0)
        drop_defaults(m)


def test_concurrent_calls_from_many_channels_share_mesh_connections(mesh, tmp_path):
    """8 client channels (8 connections to web's upstream port, on web's 2 workers), 6
    concurrent calls each: all 48 pass, and db sees them on at most 2 mesh connections (one
    shared connection per web worker; db's records name each stream's connection), not one
    per client connection; web's /metrics agrees."""
    m = mesh
    srv, port = grpc_server()
    db_log = tmp_path / "db.log"
    args, admin = admin_args()
    channels = []
    try:
        db, web = grpc_pair(m, port, db_args=("-access-log", str(db_log)), web_args=args)
        wait_until(lambda: code_of(web.up["db"]) == grpc.StatusCode.OK, 30,
                   "a gRPC call through web's outbound")
        channels = [grpc.insecure_channel(f"{LOOPBACK}:{web.up['db']}") for _ in range(8)]
        for ch in channels:  # each channel's connection is up before the burst
            assert call(ch, "Hold", b"1") == b"held-db"
        calls = [ch.unary_unary("/test.Echo/Hold").future(b"400", timeout=20)
                 for ch in channels for _ in range(6)]
        assert [c.result() for c in calls] == [b"held-db"] * 48

        def held():
            return [r for r in records(db_log) if r.get("path") == "/test.Echo/Hold"]

        wait_until(lambda: len(held()) >= 56, 10, "db's records of the 56 calls")
        conns = {(r["worker"], r["conn"]) for r in held()}
        assert len(conns) <= 2, f"56 calls from 8 client connections took {len(conns)} mesh " \
                                f"connections: {sorted(conns)}"
        assert all(r.get("alpn") == "h2" for r in held()), held()[-1]
        mt = web_metrics(admin)
        assert 1 <= metric(mt, "connectd_upstream_h2_connections") <= 2, mt
        assert metric(mt, "connectd_upstream_h2_streams_total") >= 56, mt
    finally:
        for ch in channels:
            ch.close()
        srv.stop(0)
        drop_defaults(m)


def add_instance(m, instance, app_port):
    """One more instance of db (protocol grpc) with its own sidecar; returns (connectd, public
    port) once it is passing."""
    return m.add_instance("db", instance, app_port, proxy_config={"protocol": "grpc"})


def test_endpoint_killed_next_streams_elsewhere_then_unavailable(mesh, tmp_path):
    """Two instances of db behind web's outbound. One's sidecar is killed: every following
    call on the same client channel still passes, each stream on the other endpoint (web's
    outbound records name it). Both killed: a call gets UNAVAILABLE from connectd ("connection
    failure", an upstream_connect_error record: connectd's 503 as a gRPC answer), not a
    dropped connection."""
    m = mesh
    srv_a, port_a = grpc_server("a")
    srv_b, port_b = grpc_server("b")
    web_log = tmp_path / "web.log"
    try:
        grpc_defaults(m)
        proc_a, pub_a = add_instance(m, "a", port_a)
        proc_b, pub_b = add_instance(m, "b", port_b)
        web = m.add("web", upstreams=("db",), start=False)
        m.start(web, extra_args=("-access-log", str(web_log)))
        wait_until(lambda: code_of(web.up["db"]) == grpc.StatusCode.OK, 30,
                   "a gRPC call through web's outbound")
        with grpc.insecure_channel(f"{LOOPBACK}:{web.up['db']}") as ch:
            seen = {json.loads(call(ch, "Who"))["who"] for _ in range(30)}
            assert seen == {"a", "b"}, f"30 calls reached only {seen}"
            # Concurrent streams of one session on both endpoints: each record names the
            # endpoint its stream went to.
            n0 = len(records(web_log))
            futs = [ch.unary_unary("/test.Echo/Hold").future(b"300", timeout=10)
                    for _ in range(12)]
            answered = sorted(f.result().decode()[len("held-"):] for f in futs)
            assert set(answered) == {"a", "b"}, answered

            def holds():
                return [r for r in records(web_log)[n0:] if r.get("path") == "/test.Echo/Hold"]

            wait_until(lambda: len(holds()) >= 12, 10, "web's records of the 12 calls")
            names = {f"{LOOPBACK}:{pub_a}": "a", f"{LOOPBACK}:{pub_b}": "b"}
            logged = sorted(names.get(r["endpoint"], r["endpoint"]) for r in holds())
            assert logged == answered, (logged, answered)
            proc_a.proc.kill()
            proc_a.proc.wait(10)
            stopped_by_test(m, proc_a)
            n0 = len(records(web_log))
            for _ in range(10):
                assert json.loads(call(ch, "Who"))["who"] == "b"

            def after():
                return [r for r in records(web_log)[n0:] if r.get("path") == "/test.Echo/Who"]

            wait_until(lambda: len(after()) >= 10, 10, "web's records of the 10 calls")
            assert {r["endpoint"] for r in after()} == {f"{LOOPBACK}:{pub_b}"}, after()
            assert all(r["status"] == 200 and r["result"] == "ok" for r in after()), after()

            proc_b.proc.kill()
            proc_b.proc.wait(10)
            stopped_by_test(m, proc_b)
            with pytest.raises(grpc.RpcError) as e:
                call(ch, "Who")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "connection failure" in e.value.details(), e.value.details()
            # The client's connection to web outlived both endpoints: the next call is answered
            # on it by connectd too.
            with pytest.raises(grpc.RpcError) as e:
                call(ch, "Who")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        wait_until(lambda: any(r.get("result") == "upstream_connect_error"
                               for r in records(web_log)), 10, "the 503 record")
        rec = [r for r in records(web_log) if r.get("result") == "upstream_connect_error"][-1]
        # gRPC: connectd's 503 is a trailers-only answer (HTTP 200, grpc-status 14).
        assert rec["status"] == 200 and rec["grpc_status"] == "14", rec
    finally:
        srv_a.stop(0)
        srv_b.stop(0)
        drop_defaults(m)


def test_sigterm_sends_goaway_and_in_flight_calls_finish(mesh):
    """SIGTERM to db's and then web's connectd (-drain-timeout 20s) while a call is in flight:
    the call finishes OK, and each connectd exits by itself within seconds (its HTTP/2
    connections got GOAWAY and closed once their streams were done), not at the end of the
    drain timeout that an idle HTTP/2 connection would otherwise hold it for."""
    m = mesh
    srv, port = grpc_server()
    channels = []
    try:
        db, web = grpc_pair(m, port, db_args=("-drain-timeout", "20s"),
                            web_args=("-drain-timeout", "20s"))
        wait_until(lambda: code_of(web.up["db"]) == grpc.StatusCode.OK, 30,
                   "a gRPC call through web's outbound")
        for proc in (db.proxy, web.proxy):
            ch = grpc.insecure_channel(f"{LOOPBACK}:{web.up['db']}")
            channels.append(ch)
            assert call(ch, "Hold", b"1") == b"held-db"  # the channel's connection is up
            fut = ch.unary_unary("/test.Echo/Hold").future(b"1500", timeout=15)
            time.sleep(0.3)  # the call is in flight at the app
            sent_at = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            proc.wait_log(r"received Terminated; closing listeners and draining")
            assert fut.result() == b"held-db"
            rc = proc.proc.wait(15)
            took = time.monotonic() - sent_at
            assert rc == 0, f"{proc.label} exit status {rc}"
            assert took < 8, f"{proc.label} exited {took:.1f}s after SIGTERM (drain timeout 20s)"
            proc.wait_log(r"drained: every connection has finished; stopping")
            stopped_by_test(m, proc)
            if proc is db.proxy:
                # db is gone: restart it so that web's drain has a path to test.
                m.start(db, extra_args=("-drain-timeout", "20s"))
                m.wait_passing(db)
                wait_until(lambda: code_of(web.up["db"]) == grpc.StatusCode.OK, 30,
                           "a gRPC call through the restarted db")
    finally:
        for ch in channels:
            ch.close()
        srv.stop(0)
        drop_defaults(m)


def test_stream_idle_timeout_ends_a_stalled_stream_not_its_sibling(mesh):
    """local_idle_timeout_ms 1000 on db, per stream (Envoy's stream_idle_timeout): on one
    client connection, a call the app never answers in time gets UNAVAILABLE (a 504 from
    connectd) about a second after its last activity, while a streaming call on the same
    connection that moves every 250 ms for 3 s completes."""
    m = mesh
    srv, port = grpc_server()
    try:
        db, web = grpc_pair(m, port, db_config={"local_idle_timeout_ms": 1000})
        wait_until(lambda: code_of(web.up["db"]) == grpc.StatusCode.OK, 30,
                   "a gRPC call through web's outbound")
        with grpc.insecure_channel(f"{LOOPBACK}:{web.up['db']}") as ch:
            ticks = ch.unary_stream("/test.Echo/Tick")(b"12", timeout=20)
            t0 = time.monotonic()
            stalled = ch.unary_unary("/test.Echo/Stall").future(b"x", timeout=20)
            with pytest.raises(grpc.RpcError) as e:
                stalled.result()
            took = time.monotonic() - t0
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
            assert e.value.details() == "upstream request timeout", e.value.details()
            assert took < 3, f"the stalled stream ended after {took:.1f}s"
            got = list(ticks)
            assert got == [b"tick-%d" % i for i in range(12)]
    finally:
        srv.release()
        srv.stop(0)
        drop_defaults(m)


def test_stream_idle_timeout_resets_a_stream_the_client_does_not_read(mesh):
    """The upstream's idle_timeout_ms 1000 on web: a client that takes a response's head but
    never opens its flow-control window (the rest waits in connectd) gets the stream reset
    (CANCEL) about a second later, instead of it holding the connection forever."""
    import socket
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    m = mesh
    srv, port = grpc_server()
    try:
        grpc_defaults(m)
        db = m.add("db", app_port=port, proxy_config={"protocol": "grpc"})
        web = m.add("web", upstreams=({"name": "db", "config": {"idle_timeout_ms": 1000}},))
        m.wait_passing(db)
        wait_until(lambda: code_of(web.up["db"]) == grpc.StatusCode.OK, 30,
                   "a gRPC call through web's outbound")
        with socket.create_connection((LOOPBACK, web.up["db"]), timeout=10) as s:
            c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            c.initiate_connection()
            c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16})
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                                 (":authority", "db"), (":path", "/test.Echo/Who"),
                                 ("content-type", "application/grpc"), ("te", "trailers")])
            c.send_data(sid, b"\x00\x00\x00\x00\x02hi", end_stream=True)
            s.sendall(c.data_to_send())
            t0 = time.monotonic()
            head, got, reset = None, 0, None
            while reset is None and time.monotonic() - t0 < 6:
                s.settimeout(6)
                try:
                    data = s.recv(65536)
                except socket.timeout:
                    break
                if not data:
                    break
                for ev in c.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        head = dict(ev.headers)
                    elif isinstance(ev, h2.events.DataReceived):
                        got += len(ev.data)  # never acknowledged: the window stays shut
                    elif isinstance(ev, h2.events.StreamReset):
                        reset = (ev.error_code, time.monotonic() - t0)
                s.sendall(c.data_to_send())
            assert head is not None and head[b":status"] == b"200", head
            assert got <= 16, got
            assert reset is not None, "the stalled stream was never reset"
            assert reset[0] == 8 and reset[1] < 4, reset  # CANCEL, about a second after
    finally:
        srv.stop(0)
        drop_defaults(m)


def test_outbound_request_timeout(mesh):
    """local_request_timeout_ms on web's own Proxy.Config applies to its outbound streams as
    to its HTTP/1.1 ones: a call the upstream answers too late gets UNAVAILABLE "upstream
    request timeout" from web, and the next call on the same channel passes."""
    m = mesh
    srv, port = grpc_server()
    try:
        grpc_defaults(m)
        db = m.add("db", app_port=port, proxy_config={"protocol": "grpc"})
        web = m.add("web", upstreams=("db",), proxy_config={"local_request_timeout_ms": 500})
        m.wait_passing(db)
        wait_until(lambda: code_of(web.up["db"]) == grpc.StatusCode.OK, 30,
                   "a gRPC call through web's outbound")
        expect_cut_at_timeout(web.up["db"])
    finally:
        srv.stop(0)
        drop_defaults(m)


def expect_cut_at_timeout(port):
    """A call db answers after 3 s fails before 2.5 s with UNAVAILABLE "upstream request
    timeout" (connectd's answer for a 504), and the next call on the channel passes."""
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as ch:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            call(ch, "Hold", b"3000")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        assert e.value.details() == "upstream request timeout", e.value.details()
        assert time.monotonic() - t0 < 2.5
        assert json.loads(call(ch, "Who"))["who"] == "db"


def rotate_ca_twice(api, db, web, tmp_path):
    """Two CA rotations, each waited for until db's connectd presents a leaf of the new root:
    then db's leaf chains (through the cross-signed intermediate) only to roots that came after
    the first one."""

    def presented_issued_by(root_pem):
        leaf = write_leaf_files(str(tmp_path), api.leaf(web.name), "web-now")
        ctx = tls_client_context(leaf["chain_all"], leaf["key"])
        try:
            return issued_by(peer_cert_der(db.public_port, ctx, 5), root_pem)
        except (OSError, ssl.SSLError):
            return False

    for n in (1, 2):
        ca = make_ca(f"connectd rotated root {n}", api.trust_domain())
        api.set_ca(ca.cert_pem, ca.key_pem)
        # The agent re-signs leaves with a random spread after a root change.
        wait_until(lambda: presented_issued_by(ca.cert_pem), 90,
                   f"db's connectd to present a leaf of root {n}", interval=0.5)
    # A new connection starts on web's current snapshot: web has the new roots.
    wait_until(lambda: code_of(web.up["db"]) == grpc.StatusCode.OK, 30,
               "a gRPC call on a new channel after the rotations")


def own_channel(port):
    """A channel with a connection of its own (grpcio shares one between channels to the same
    address by default, code_of()'s new channels included)."""
    return grpc.insecure_channel(f"{LOOPBACK}:{port}",
                                 options=[("grpc.use_local_subchannel_pool", 1)])


def test_open_caller_connection_follows_two_ca_rotations(fresh_mesh, tmp_path):
    """One gRPC channel (one h2c connection to web's upstream port) stays open, idle between
    calls, while the CA rotates twice, and web drains its shared mesh connections of the old
    TLS context: the channel's next calls must be dialled with web's current roots, not the
    ones its connection started under (the soak found calls on such a channel failing
    UNAVAILABLE for good, "certificate verify failed")."""
    m, api = fresh_mesh, fresh_mesh.api
    srv, port = grpc_server()
    try:
        db, web = grpc_pair(m, port)
        wait_until(lambda: code_of(web.up["db"]) == grpc.StatusCode.OK, 30,
                   "a gRPC call through web's outbound")
        with own_channel(web.up["db"]) as ch:
            assert json.loads(call(ch, "Who"))["who"] == "db"
            rotate_ca_twice(api, db, web, tmp_path)
            for _ in range(3):
                assert json.loads(call(ch, "Who"))["who"] == "db"
    finally:
        srv.stop(0)
        drop_defaults(m)


def test_open_caller_connection_with_a_stream_open_moves_after_two_ca_rotations(fresh_mesh,
                                                                              tmp_path):
    """As above, but a bidirectional stream stays open on the channel throughout, so web's
    session cannot move to the new snapshot under it: the next call is refused unprocessed
    with GOAWAY (gRPC sends it again on a new connection, transparently) and passes, and the
    open stream carries on to its end."""
    m, api = fresh_mesh, fresh_mesh.api
    srv, port = grpc_server()
    release = threading.Event()

    def messages():
        yield b"first"
        release.wait(150)
        yield b"last"

    try:
        db, web = grpc_pair(m, port)
        wait_until(lambda: code_of(web.up["db"]) == grpc.StatusCode.OK, 30,
                   "a gRPC call through web's outbound")
        with own_channel(web.up["db"]) as ch:
            pipe = ch.stream_stream("/test.Echo/Pipe")(messages(), timeout=170)
            assert next(pipe) == b"first"
            rotate_ca_twice(api, db, web, tmp_path)
            for _ in range(3):
                assert json.loads(call(ch, "Who"))["who"] == "db"
            release.set()
            assert list(pipe) == [b"last"]
    finally:
        release.set()
        srv.stop(0)
        drop_defaults(m)
