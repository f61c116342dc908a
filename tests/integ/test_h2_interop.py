"""Interoperability of src/h2.c with independent HTTP/2 implementations.

test_h2.c runs the codec against itself (nghttp2 on both ends); here its server and client
face other stacks over real loopback sockets, through tests/unit/h2_peer.c (built by `make
test-tools`, not part of connectd): curl and h2load (nghttp2 too, but their own session
logic), Python's h2 (an independent implementation, driven byte by byte so flow control can be
watched), and gRPC's C core through grpcio, both as client and as server (trailers). No Consul
agent is needed.
"""
import os
import socket
import subprocess
import json

import pytest

import grpc  # scripts/deps installs grpcio, h2 and httpx; missing, these tests must fail
import h2.config
import h2.connection
import h2.events
import h2.settings

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PEER = os.path.join(REPO, "build", "asan", "tests", "h2_peer")


@pytest.fixture(scope="module")
def server():
    subprocess.run(["make", "-s", "VARIANT=asan", "test-tools"], cwd=REPO, check=True)
    proc = subprocess.Popen([PEER, "serve"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        yield port
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        # ASan and UBSan report on stderr; the server must not have complained.
        assert b"ERROR" not in err and b"runtime error" not in err, err.decode(errors="replace")


def test_curl_echo_large_upload(server, tmp_path):
    body = os.urandom(3 * 1024 * 1024)  # many windows' worth in both directions
    src = tmp_path / "up.bin"
    src.write_bytes(body)
    out = tmp_path / "down.bin"
    res = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--data-binary", "@%s" % src, "-o", str(out),
         "-D", "-", "-w", "%{http_version}", "http://127.0.0.1:%d/echo?q=1" % server],
        capture_output=True, check=True, timeout=60)
    head = res.stdout.decode()
    assert head.endswith("2")
    assert "x-method: POST" in head and "x-path: /echo?q=1" in head
    assert "x-authority: 127.0.0.1:%d" % server in head
    assert out.read_bytes() == body


def test_h2load_many_streams(server):
    res = subprocess.run(["h2load", "-c1", "-n500", "-m50", "http://127.0.0.1:%d/x" % server],
                         capture_output=True, check=True, timeout=60)
    out = res.stdout.decode()
    assert "500 succeeded, 0 failed, 0 errored" in out, out
    assert "500 2xx" in out, out


class RawClient:
    """Python's h2 over a blocking socket, with automatic flow control off."""

    def __init__(self, port, window):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=cfg)
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.conn.initiate_connection()
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def events(self):
        data = self.sock.recv(65536)
        assert data, "server closed the connection"
        return self.conn.receive_data(data)

    def close(self):
        self.sock.close()


def test_python_h2_download_respects_our_window(server):
    """The server never sends more than the window this client grants, and resumes on each
    WINDOW_UPDATE: the codec honours the peer's flow control."""
    window, total = 16384, 1000000
    c = RawClient(server, window)
    sid = c.conn.get_next_available_stream_id()
    c.conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"),
                              (":authority", "svc"), (":path", "/big?n=%d" % total)],
                        end_stream=True)
    c.flush()
    got, unacked, done, updates = bytearray(), 0, False, 0
    while not done:
        for ev in c.events():
            if isinstance(ev, h2.events.DataReceived):
                got += ev.data
                unacked += ev.flow_controlled_length
                assert unacked <= window, "server overran the stream window"
            elif isinstance(ev, h2.events.StreamEnded):
                done = True
        # Acknowledge only once the window is half spent, like a slow reader.
        if unacked >= window // 2 and not done:
            c.conn.acknowledge_received_data(unacked, sid)
            unacked = 0
            updates += 1
        c.flush()
    c.close()
    assert len(got) == total
    assert bytes(got) == bytes((i * 7 + (i >> 10)) & 0xff for i in range(total))
    assert updates > 50


def test_python_h2_upload_waits_for_our_window_updates(server):
    """A 1 MiB upload from a client that sends exactly what the server's window allows: it
    completes only through the WINDOW_UPDATEs our codec sends as the server consumes."""
    total = 1 << 20
    body = bytes(range(256)) * (total // 256)
    c = RawClient(server, 1 << 20)
    sid = c.conn.get_next_available_stream_id()
    c.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                              (":authority", "svc"), (":path", "/up")])
    c.flush()
    sent, echoed, ended, updates = 0, bytearray(), False, 0
    while not ended:
        while sent < total:
            n = min(c.conn.local_flow_control_window(sid), c.conn.max_outbound_frame_size,
                    total - sent)
            if n <= 0:
                break
            c.conn.send_data(sid, body[sent:sent + n], end_stream=(sent + n == total))
            sent += n
        c.flush()
        for ev in c.events():
            if isinstance(ev, h2.events.WindowUpdated):
                updates += 1
            elif isinstance(ev, h2.events.DataReceived):
                echoed += ev.data
                c.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
            elif isinstance(ev, h2.events.StreamReset):
                pytest.fail("stream reset: %r" % ev)
        c.flush()
    c.close()
    assert bytes(echoed) == body
    assert updates > 0


def _identity(b):
    return b


def test_grpcio_client_against_our_server(server):
    with grpc.insecure_channel("127.0.0.1:%d" % server) as ch:
        call = ch.unary_unary("/pkg.Echo/Call", request_serializer=_identity,
                              response_deserializer=_identity)
        assert call(b"ping", timeout=10) == b"ping"
        deny = ch.unary_unary("/deny", request_serializer=_identity,
                              response_deserializer=_identity)
        with pytest.raises(grpc.RpcError) as err:
            deny(b"x", timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == "denied"


def test_our_client_against_grpcio_server():
    from concurrent import futures

    def handle(request, context):
        context.set_trailing_metadata((("x-trail", "yes"),))
        return b"pong"

    handler = grpc.method_handlers_generic_handler(
        "pkg.Svc", {"Call": grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=_identity, response_serializer=_identity)})
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        subprocess.run(["make", "-s", "VARIANT=asan", "test-tools"], cwd=REPO, check=True)
        res = subprocess.run([PEER, "get", str(port), "/pkg.Svc/Call", "grpc"],
                             capture_output=True, timeout=30)
        assert res.returncode == 0, res.stderr.decode()
        out = json.loads(res.stdout)
    finally:
        srv.stop(None)
    assert out["status"] == 200
    assert ["content-type", "application/grpc"] in out["headers"]
    assert out["body_len"] == 5 + 4  # one length-prefixed message, "pong"
    trailers = dict(out["trailers"])
    assert trailers["grpc-status"] == "0"
    assert trailers["x-trail"] == "yes"
    assert out["close_code"] == 0
