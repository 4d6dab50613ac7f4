"""gRPC TLS credentials from a reloadable certificate, on a real grpcio server (no proto needed)."""

from __future__ import annotations

import os
import queue
import ssl
import subprocess
import sys
import textwrap
from concurrent import futures

import grpc
import pytest
import pytest_twisted

from evrecorder import tlsconfig
from test_tls import (
    AEAD_12, CBC_12, LogCapture, client_context, handshake, make_certificate, renew, serial_of,
)
from twisted.logger import LogLevel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICE = "evrecorder.test.Echo"


def echo_server(tls: tlsconfig.ServerTLS) -> tuple[grpc.Server, int]:
    """A threaded grpcio server with raw-bytes echo methods, on the credentials under test."""
    def stream(requests, context):
        for request in requests:
            yield request

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
        "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    port = server.add_secure_port("127.0.0.1:0", tlsconfig.grpc_server_credentials(tls))
    server.start()
    return server, port


def channel(port: int, cert_path: str) -> grpc.Channel:
    """A channel that trusts only this (self-signed) certificate."""
    with open(cert_path, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def unary(chan: grpc.Channel, payload: bytes) -> bytes:
    return chan.unary_unary(f"/{SERVICE}/Unary")(payload, timeout=10)


def h2_handshake(port: int, ciphers: str | None = None, version=None) -> dict:
    return handshake(port, client_context(ciphers, version, alpn=["h2"]))


@pytest.fixture
def served(tmp_path):
    key, cert = make_certificate(tmp_path)
    tls = tlsconfig.ServerTLS("grpc test", key, cert)
    server, port = echo_server(tls)
    yield key, cert, tls, port
    server.stop(grace=None).wait()


def test_reload_serves_the_new_certificate_and_the_stream_in_progress_goes_on(served, tmp_path):
    """Mid-stream reload: the stream's echoes stay exact, new handshakes get the new serial."""
    key, cert, tls, port = served
    old_serial = serial_of(cert)
    old_cert = tmp_path / "old-cert.pem"
    old_cert.write_bytes(open(cert, "rb").read())
    first = channel(port, cert)
    sent: queue.Queue = queue.Queue()
    replies = first.stream_stream(f"/{SERVICE}/Stream")(iter(sent.get, None), timeout=30)
    chunks = [os.urandom(160) + bytes([i]) for i in range(40)]
    for chunk in chunks[:20]:
        sent.put(chunk)
    got = [next(replies) for _ in range(20)]
    assert h2_handshake(port)["serial"] == old_serial

    new_serial = renew(key, cert)
    assert tls.reload() is True
    assert h2_handshake(port)["serial"] == new_serial != old_serial
    assert h2_handshake(port)["serial"] == new_serial  # every handshake after, not only the next
    assert unary(channel(port, cert), b"new") == b"new"  # trusts only the new certificate
    with pytest.raises(grpc.RpcError) as refused:
        unary(channel(port, str(old_cert)), b"old")  # a new handshake no longer shows the old one
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    for chunk in chunks[20:]:
        sent.put(chunk)
    sent.put(None)
    got += list(replies)
    assert got == chunks
    assert replies.code() == grpc.StatusCode.OK
    assert unary(first, b"again") == b"again"  # the old channel's connection is still up


def test_reload_with_a_mismatched_key_keeps_the_old_certificate(served):
    """A renewed certificate beside the old key: gRPC keeps serving the old one; one error sentence."""
    key, cert, tls, port = served
    old_serial = serial_of(cert)
    old_pem = open(cert, "rb").read()
    renew(key, cert, keep_key=True)
    with LogCapture() as logs:
        assert tls.reload() is False
    [line] = logs.lines(LogLevel.error)
    assert "does not match the certificate" in line and line.endswith(".")
    assert h2_handshake(port)["serial"] == old_serial
    creds = grpc.ssl_channel_credentials(root_certificates=old_pem)
    assert unary(grpc.secure_channel(f"127.0.0.1:{port}", creds), b"x") == b"x"


def test_aead_only_and_tls12_minimum(served):
    """The gRPC door refuses CBC-only and TLS 1.1 clients and takes AEAD suites on 1.2 and 1.3."""
    _, _, _, port = served
    tls12 = ssl.TLSVersion.TLSv1_2
    assert "refused" in h2_handshake(port, CBC_12, tls12)
    assert h2_handshake(port, "ECDHE-ECDSA-AES128-GCM-SHA256", tls12)["version"] == "TLSv1.2"
    assert h2_handshake(port, AEAD_12, tls12)["cipher"].endswith(("GCM-SHA256", "GCM-SHA384", "POLY1305"))
    assert h2_handshake(port, version=ssl.TLSVersion.TLSv1_3)["version"] == "TLSv1.3"
    assert "refused" in h2_handshake(port, "DEFAULT:@SECLEVEL=0", ssl.TLSVersion.TLSv1_1)


_CHILD = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{repo!r}, {tests!r}]
    from evrecorder import tlsconfig
    ciphers = sys.argv[3]
    tlsconfig.set_grpc_ciphers(ciphers or tlsconfig.CIPHERS)  # before grpc is imported
    from test_tls_grpc import echo_server
    server, port = echo_server(tlsconfig.ServerTLS("child", sys.argv[1], sys.argv[2]))
    print(port, flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("ciphers, accepted, refused", [
    ("", ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"], ["ECDHE-ECDSA-AES128-SHA"]),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", ["ECDHE-ECDSA-CHACHA20-POLY1305"], ["ECDHE-ECDSA-AES128-GCM-SHA256"]),
])
def test_the_cipher_profile_reaches_grpcio(tmp_path, ciphers, accepted, refused):
    """Set before grpcio loads, the profile (and --tls-ciphers) decide the gRPC door's 1.2 suites."""
    key, cert = make_certificate(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != tlsconfig.GRPC_CIPHERS_ENV}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(repo=REPO, tests=os.path.join(REPO, "tests")),
         key, cert, ciphers],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
    )
    try:
        port = int(child.stdout.readline())
        tls12 = ssl.TLSVersion.TLSv1_2
        for suite in accepted:  # grpcio's own default has no CHACHA20 for TLS 1.2
            assert h2_handshake(port, suite, tls12).get("cipher") == suite
        for suite in refused:
            assert "refused" in h2_handshake(port, suite, tls12)
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def test_the_command_line_does_not_load_grpcio():
    """Parsing options must not import grpcio: the cipher profile is set for it only then."""
    code = ("import sys; from evrecorder import tap; tap.Options().parseOptions([]); "
            "import os; print('grpc' in sys.modules, os.environ.get('GRPC_SSL_CIPHER_SUITES'))")
    env = {k: v for k, v in os.environ.items() if k != tlsconfig.GRPC_CIPHERS_ENV}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(env, PYTHONPATH=REPO),
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", tlsconfig.CIPHERS], out.stderr


@pytest_twisted.ensureDeferred
async def test_grpc_door_reload_mid_stream(recorder_factory, tmp_path):
    """The recorder's gRPC door: reload mid-stream serves the new serial and the dialog records exactly."""
    from twisted.internet.threads import deferToThread

    from grpcclient import OpenStream, segment_stop
    from test_grpc_process import spooled_chunks
    from test_grpc_service import assert_exact, chunks, dialog_events, until
    from test_tls import ssl_spec

    key, cert = make_certificate(tmp_path)
    old_serial, old_pem = serial_of(cert), open(cert, "rb").read()
    rec = await recorder_factory(grpc_listen=ssl_spec(key, cert), reconnect_grace=0.3)
    [tls] = rec.service.tls
    assert (await deferToThread(h2_handshake, rec.grpc_port))["serial"] == old_serial
    contact, agent = chunks(10, 97), chunks(10, 98)
    events = dialog_events("grpc-renew", contact, agent, stop=False)
    stream = OpenStream(rec.grpc_port, ca=old_pem)
    stream.send(*events[:13])
    await until(lambda: spooled_chunks(rec.settings.spool) >= 10, what="chunks on disk")

    new_serial = renew(key, cert)
    assert rec.service.reload_tls() is True and tls.generation == 2
    got = await deferToThread(h2_handshake, rec.grpc_port)
    assert got["serial"] == new_serial != old_serial
    stream.send(*events[13:], segment_stop("a"), segment_stop("c"))
    stream.close()
    assert await deferToThread(stream.result) == (grpc.StatusCode.OK, "")
    [sidecar] = await rec.archived()
    assert sidecar["complete"] is True
    assert_exact(sidecar, b"".join(agent), b"".join(contact))
