"""wss: TLS terminated in evrecorder with an `ssl:` endpoint."""

from __future__ import annotations

import datetime
import io
import socket
import ssl

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.threads import deferToThread

from test_service import assert_channels, frames, reactor
from wsclient import refused


def make_certificate(directory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 / localhost; returns (key, cert) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
        ), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


def tls_handshake(port: int, version: ssl.TLSVersion) -> str:
    """Try a TLS handshake pinned to one protocol version; the negotiated version or the error."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer old versions: the server must refuse
    ctx.minimum_version = version
    ctx.maximum_version = version
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                return tls.version()
        except (ssl.SSLError, ConnectionError) as e:
            return "refused: " + e.__class__.__name__


@pytest_twisted.ensureDeferred
async def test_wss_records_and_refuses_plaintext_and_old_tls(recorder_factory, tmp_path):
    """A wss client records a call; a plain ws client and a TLS 1.1 client are refused."""
    from evrecorder import replay

    key, cert = make_certificate(tmp_path)
    rec = await recorder_factory(listen=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    agent = frames(25, 80)
    audio_file = tmp_path / "agent.ulaw"
    audio_file.write_bytes(b"".join(agent))
    out = io.StringIO()
    status = await replay.run(reactor(), [
        str(audio_file), f"wss://127.0.0.1:{rec.port}/", "--insecure", "--flood", "--call-id", "tls-1",
    ], out=out)
    assert status == 0, out.getvalue()
    [sidecar] = await rec.archived()
    assert sidecar["callId"] == "tls-1"
    assert_channels(sidecar, b"".join(agent), b"\xff" * len(b"".join(agent)))

    await refused(reactor(), rec.port)  # ws:// to the TLS port
    assert await deferToThread(tls_handshake, rec.port, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert (await deferToThread(tls_handshake, rec.port, ssl.TLSVersion.TLSv1_1)).startswith("refused")
