"""wss: TLS terminated in evrecorder with an `ssl:` endpoint; certificates reloaded in place."""

from __future__ import annotations

import datetime
import io
import ipaddress
import os
import pathlib
import signal
import socket
import ssl

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, connectWS
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.internet import ssl as tssl
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage

from evrecorder import tap, tlsconfig
from conftest import independent_decode, read_pcm16_wav
from test_service import AGENT, CALLER, assert_channels, frames, reactor, sleep
from wsclient import Conn, _Protocol, connected, media, refused, start, stop

AEAD_12 = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305"
CBC_12 = ("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:"
          "ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA:AES128-SHA:AES256-SHA")


# -- certificates ------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(key, subject: str, issuer=None, ca: bool = False, days: float = 1):
    """A certificate for ``key``: self-signed, or signed by ``issuer`` = (key, certificate)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    signer_key, signer_name = (key, _name(subject)) if issuer is None else (issuer[0], issuer[1].subject)
    builder = (
        x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(signer_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5) + min(0, days) * datetime.timedelta(days=2))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        ), critical=False)
    return builder.sign(signer_key, hashes.SHA256())


def pem(*certs) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificate(directory, stem: str = "", days: float = 1, rsa_key: bool = False) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 / localhost; returns (key, cert) paths."""
    key = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
    cert = issue(key, "localhost", days=days)
    key_path, cert_path = directory / f"{stem}key.pem", directory / f"{stem}cert.pem"
    key_path.write_bytes(key_pem(key))
    cert_path.write_bytes(pem(cert))
    return str(key_path), str(cert_path)


def serial_of(cert_path: str) -> int:
    with open(cert_path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).serial_number


def renew(key_path: str, cert_path: str, keep_key: bool = False) -> int:
    """Replace the files as an ACME client does (write aside, rename); the new serial.

    ``keep_key``: only the certificate is replaced, so the pair does not match."""
    new_key, new_cert = make_certificate(pathlib.Path(cert_path).parent, stem="new-")
    if not keep_key:
        os.replace(new_key, key_path)
    os.replace(new_cert, cert_path)
    return serial_of(cert_path)


# -- clients -------------------------------------------------------------------------

def client_context(ciphers: str | None = None, version: ssl.TLSVersion | None = None,
                   cafile: str | None = None, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if ciphers:
        ctx.set_ciphers(ciphers)
    if version:
        ctx.minimum_version = ctx.maximum_version = version
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def handshake(port: int, ctx: ssl.SSLContext, server_hostname: str | None = None) -> dict:
    """One TLS handshake: version, cipher and served serial, or the error."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                der = tls.getpeercert(binary_form=True)
                return {"version": tls.version(), "cipher": tls.cipher()[0],
                        "serial": x509.load_der_x509_certificate(der).serial_number}
        except (ssl.SSLError, ConnectionError) as e:
            return {"refused": e.__class__.__name__}


def tls_handshake(port: int, version: ssl.TLSVersion) -> str:
    """Try a TLS handshake pinned to one protocol version; the negotiated version or the error."""
    ctx = client_context("DEFAULT:@SECLEVEL=0", version)  # the client offers old versions: the server must refuse
    result = handshake(port, ctx)
    return result.get("version") or "refused: " + result["refused"]


async def served_serial(port: int) -> int:
    return (await deferToThread(handshake, port, client_context()))["serial"]


async def wss_connect(port: int, query: str = "") -> Conn:
    """A wss:// WebSocket call (the certificate is not verified: the tests look at its serial)."""
    factory = WebSocketClientFactory(f"wss://127.0.0.1:{port}/{query}")
    factory.protocol = _Protocol
    factory.setProtocolOptions(openHandshakeTimeout=10)
    factory.opened, factory.closed = defer.Deferred(), defer.Deferred()
    connectWS(factory, contextFactory=tssl.CertificateOptions())
    return Conn(await factory.opened, factory.closed)


def peer_serial(conn: Conn) -> int:
    return conn.proto.transport.getPeerCertificate().to_cryptography().serial_number


class LogCapture:
    """Twisted log events of this process, formatted."""

    def __init__(self):
        self.events: list[dict] = []

    def __enter__(self):
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.events.append)

    def lines(self, level: LogLevel) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") == level]


def ssl_spec(key: str, cert: str, port: int = 0, **extra) -> str:
    spec = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    return spec + "".join(f":{k}={v}" for k, v in extra.items())


# -- the WebSocket door ----------------------------------------------------------------

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
    assert await deferToThread(tls_handshake, rec.port, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    assert (await deferToThread(tls_handshake, rec.port, ssl.TLSVersion.TLSv1_1)).startswith("refused")


@pytest_twisted.ensureDeferred
async def test_reload_serves_the_new_certificate_and_the_call_in_progress_goes_on(
        recorder_factory, tmp_path):
    """Files replaced and reloaded mid-call: the call records exactly, new handshakes get the new serial."""
    key, cert = make_certificate(tmp_path)
    old_serial = serial_of(cert)
    rec = await recorder_factory(listen=ssl_spec(key, cert))
    assert await served_serial(rec.port) == old_serial
    agent, caller = frames(60, 90), frames(60, 91)
    conn = await wss_connect(rec.port)
    conn.send_all([connected(), start("renew-1")])
    for i in range(30):
        conn.send(media(AGENT, i + 1, agent[i]))
        conn.send(media(CALLER, i + 1, caller[i]))
    await sleep(0.1)

    new_serial = renew(key, cert)
    with LogCapture() as logs:
        assert rec.service.reload_tls() is True
    assert await served_serial(rec.port) == new_serial != old_serial
    assert [line for line in logs.lines(LogLevel.info) if "new certificate" in line]
    assert logs.lines(LogLevel.error) == []

    for i in range(30, 60):  # the call in progress keeps its connection and its certificate
        conn.send(media(AGENT, i + 1, agent[i]))
        conn.send(media(CALLER, i + 1, caller[i]))
    assert peer_serial(conn) == old_serial
    conn.send_all([stop(), stop()])
    assert (await conn.closed)[0] == 1000
    second = await wss_connect(rec.port)  # and a new call gets the new certificate
    assert peer_serial(second) == new_serial
    second.send_all([connected(), start("renew-2")] + [media(AGENT, i + 1, agent[i]) for i in range(5)]
                    + [stop()])
    assert (await second.closed)[0] == 1000
    sidecars = {s["callId"]: s for s in await rec.archived(2)}
    assert sidecars["renew-1"]["complete"] is True
    assert_channels(sidecars["renew-1"], b"".join(agent), b"".join(caller))
    assert_channels(sidecars["renew-2"], b"".join(agent[:5]), b"\xff" * 800)


@pytest_twisted.ensureDeferred
async def test_reload_with_a_mismatched_key_keeps_the_old_certificate(recorder_factory, tmp_path):
    """A new certificate beside the old key: the old certificate stays, one error sentence says why."""
    key, cert = make_certificate(tmp_path)
    old_serial = serial_of(cert)
    rec = await recorder_factory(listen=ssl_spec(key, cert))
    renew(key, cert, keep_key=True)  # the certificate renewed, the key not (yet)
    with LogCapture() as logs:
        assert rec.service.reload_tls() is False
    [line] = logs.lines(LogLevel.error)
    assert f"the private key {key} does not match the certificate {cert}" in line
    assert line.endswith(".") and line.count(". ") == 0 and "\n" not in line
    assert "still serving the old certificate" in line and f"serial {old_serial:x}" in line
    assert await served_serial(rec.port) == old_serial
    conn = await wss_connect(rec.port)  # still serving, calls still recorded
    agent = frames(10, 92)
    conn.send_all([connected(), start("kept-1")] + [media(AGENT, i + 1, agent[i]) for i in range(10)]
                  + [stop()])
    assert (await conn.closed)[0] == 1000
    [sidecar] = await rec.archived()
    assert_channels(sidecar, b"".join(agent), b"\xff" * 1600)

    new_serial = renew(key, cert)  # the pair completed: the next reload takes it
    assert rec.service.reload_tls() is True
    assert await served_serial(rec.port) == new_serial
    [tls] = rec.service.tls
    generation = tls.generation
    with LogCapture() as logs:  # a reload with nothing renewed changes nothing
        assert rec.service.reload_tls() is True
    assert tls.generation == generation
    assert [line for line in logs.lines(LogLevel.info) if "the certificate is unchanged" in line]


@pytest_twisted.ensureDeferred
async def test_renewed_files_are_taken_without_sighup(recorder_factory, tmp_path, monkeypatch):
    """The files are looked at periodically: a renewal is served once both files held still."""
    monkeypatch.setattr(tlsconfig, "WATCH_SECONDS", 0.05)
    key, cert = make_certificate(tmp_path)
    rec = await recorder_factory(listen=ssl_spec(key, cert))
    new_serial = renew(key, cert)
    deadline = reactor().seconds() + 10
    while await served_serial(rec.port) != new_serial:
        assert reactor().seconds() < deadline, "the renewed certificate was not taken"
        await sleep(0.05)


@pytest_twisted.ensureDeferred
async def test_watching_waits_for_both_files_and_reports_a_bad_pair_once(recorder_factory, tmp_path):
    """A look between the key's and the certificate's replacement reloads nothing; a bad pair logs once."""
    key, cert = make_certificate(tmp_path)
    old_serial = serial_of(cert)
    rec = await recorder_factory(listen=ssl_spec(key, cert))
    [tls] = rec.service.tls
    new_key, new_cert = make_certificate(tmp_path, stem="next-")
    with LogCapture() as logs:
        assert tls.poll() is None  # nothing changed
        os.replace(new_key, key)
        assert tls.poll() is None  # the key changed: wait
        os.replace(new_cert, cert)
        assert tls.poll() is None  # and the certificate: wait again
        assert await served_serial(rec.port) == old_serial
        assert tls.poll() is True  # held still: taken
        assert tls.poll() is None
    assert logs.lines(LogLevel.error) == []
    assert await served_serial(rec.port) == serial_of(cert) != old_serial

    renew(key, cert, keep_key=True)
    with LogCapture() as logs:
        assert [tls.poll() for _ in range(4)] == [None, False, None, None]
    assert len(logs.lines(LogLevel.error)) == 1  # once, not at every look
    renew(key, cert, keep_key=True)
    with LogCapture() as logs:  # refused on SIGHUP: the looks do not say it again
        assert rec.service.reload_tls() is False
        assert [tls.poll() for _ in range(3)] == [None, None, None]
    assert len(logs.lines(LogLevel.error)) == 1
    renew(key, cert)  # fixed: taken at the next looks
    assert [tls.poll() for _ in range(2)] == [None, True]
    assert await served_serial(rec.port) == serial_of(cert)


@pytest.mark.parametrize("broken, sentence", [
    ("empty-cert", "holds no PEM certificate"),
    ("missing-key", "the private key file {key} cannot be read: No such file or directory"),
    ("expired", "expired on"),
    ("damaged-key", "the private key in {key} is damaged or of a kind OpenSSL cannot use"),
    ("damaged-cert", "a certificate in {cert} is damaged"),
])
@pytest_twisted.ensureDeferred
async def test_reload_of_broken_files_keeps_the_old_certificate(recorder_factory, tmp_path, broken,
                                                                sentence):
    """An unreadable key, a file without a certificate, an expired one: the old one stays served."""
    key, cert = make_certificate(tmp_path)
    old_serial = serial_of(cert)
    rec = await recorder_factory(listen=ssl_spec(key, cert))
    if broken == "empty-cert":
        open(cert, "wb").close()
    elif broken == "missing-key":
        os.unlink(key)
    elif broken.startswith("damaged"):
        label = "PRIVATE KEY" if broken == "damaged-key" else "CERTIFICATE"
        pathlib.Path(key if broken == "damaged-key" else cert).write_text(
            f"-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n")
    else:
        k, c = make_certificate(tmp_path, stem="old-", days=-1)
        os.replace(k, key)
        os.replace(c, cert)
    with LogCapture() as logs:
        assert rec.service.reload_tls() is False
    [line] = logs.lines(LogLevel.error)
    assert sentence.format(key=key, cert=cert) in line and line.endswith(".")
    assert line.count(". ") == 0  # one sentence
    assert await served_serial(rec.port) == old_serial


@pytest.mark.parametrize("auth", ["ECDSA", "RSA"])
@pytest_twisted.ensureDeferred
async def test_only_aead_suites_with_server_preference(recorder_factory, tmp_path, auth):
    """TLS 1.2: a CBC-only client is refused, an AEAD one connects, the server's order wins."""
    key, cert = make_certificate(tmp_path, rsa_key=auth == "RSA")
    rec = await recorder_factory(listen=ssl_spec(key, cert))
    tls12 = ssl.TLSVersion.TLSv1_2
    aes128, aes256, chacha = (f"ECDHE-{auth}-{s}" for s in
                              ("AES128-GCM-SHA256", "AES256-GCM-SHA384", "CHACHA20-POLY1305"))

    cbc = await deferToThread(handshake, rec.port, client_context(CBC_12, tls12))
    assert "refused" in cbc
    aead = await deferToThread(handshake, rec.port, client_context(f"{aes256}:{aes128}:{chacha}", tls12))
    assert aead["version"] == "TLSv1.2" and aead["cipher"] == aes128
    # The client prefers CHACHA20 then AES-256: the server's order (AES-128 first) decides.
    picked = await deferToThread(handshake, rec.port, client_context(f"{chacha}:{aes256}:{aes128}", tls12))
    assert picked["cipher"] == aes128
    assert (await deferToThread(handshake, rec.port, client_context(chacha, tls12)))["cipher"] == chacha
    # No static-RSA or finite-field DH key exchange either.
    for suite in ("AES128-GCM-SHA256", "AES256-GCM-SHA384", "DHE-RSA-AES128-GCM-SHA256"):
        assert "refused" in await deferToThread(handshake, rec.port, client_context(suite, tls12))
    tls13 = await deferToThread(handshake, rec.port, client_context(version=ssl.TLSVersion.TLSv1_3))
    assert tls13["version"] == "TLSv1.3" and tls13["cipher"] in tlsconfig.TLS13_SUITES.split(":")


@pytest_twisted.ensureDeferred
async def test_tls_ciphers_option_changes_the_profile(recorder_factory, tmp_path):
    """--tls-ciphers replaces the TLS 1.2 list; a string OpenSSL cannot use is one sentence."""
    key, cert = make_certificate(tmp_path)
    config = tap.Options()
    config.parseOptions(["--tls-ciphers", "ECDHE-ECDSA-CHACHA20-POLY1305", "--listen", ssl_spec(key, cert)])
    assert config.settings().tls_ciphers == "ECDHE-ECDSA-CHACHA20-POLY1305"
    assert tap.Options().settings().tls_ciphers is None  # the built-in profile
    with pytest.raises(usage.UsageError, match=r"^--tls-ciphers: OpenSSL knows no cipher suite in 'NOPE'\.$"):
        tap.Options().parseOptions(["--tls-ciphers", "NOPE"])

    rec = await recorder_factory(listen=ssl_spec(key, cert), tls_ciphers="ECDHE-ECDSA-CHACHA20-POLY1305")
    tls12 = ssl.TLSVersion.TLSv1_2
    assert "refused" in await deferToThread(
        handshake, rec.port, client_context("ECDHE-ECDSA-AES128-GCM-SHA256", tls12))
    assert (await deferToThread(handshake, rec.port, client_context(AEAD_12, tls12)))["cipher"] == \
        "ECDHE-ECDSA-CHACHA20-POLY1305"


@pytest_twisted.ensureDeferred
async def test_full_chain_in_cert_key_is_served(recorder_factory, tmp_path):
    """certKey=fullchain.pem (leaf then intermediate) serves the chain: a client trusting the root verifies."""
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = issue(root_key, "Test Root", ca=True)
    inter = issue(inter_key, "Test Intermediate", issuer=(root_key, root), ca=True)
    leaf = issue(leaf_key, "localhost", issuer=(inter_key, inter))
    (tmp_path / "root.pem").write_bytes(pem(root))
    (tmp_path / "fullchain.pem").write_bytes(pem(leaf, inter))
    (tmp_path / "cert.pem").write_bytes(pem(leaf))
    (tmp_path / "chain.pem").write_bytes(pem(inter))
    (tmp_path / "key.pem").write_bytes(key_pem(leaf_key))
    key, root_pem = str(tmp_path / "key.pem"), str(tmp_path / "root.pem")
    full = await recorder_factory(listen=ssl_spec(key, tmp_path / "fullchain.pem"), subdir="full")
    extra = await recorder_factory(
        listen=ssl_spec(key, tmp_path / "cert.pem", extraCertChain=tmp_path / "chain.pem"), subdir="extra")
    leaf_only = await recorder_factory(listen=ssl_spec(key, tmp_path / "cert.pem"), subdir="leaf")
    verifying = client_context(cafile=root_pem)
    for rec in (full, extra):
        got = await deferToThread(handshake, rec.port, verifying, "localhost")
        assert got.get("serial") == leaf.serial_number, got
    assert "refused" in await deferToThread(handshake, leaf_only.port, verifying, "localhost")


def test_load_refuses_what_cannot_be_served(tmp_path):
    """Encrypted keys, chains out of order, expired certificates, sslmethod: one sentence each."""
    key = ec.generate_private_key(ec.SECP256R1())
    root_key, inter_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = issue(root_key, "Root", ca=True)
    inter = issue(inter_key, "Intermediate", issuer=(root_key, root), ca=True)
    leaf = issue(key, "localhost", issuer=(inter_key, inter))
    (tmp_path / "enc.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass")))
    (tmp_path / "key.pem").write_bytes(key_pem(key))
    (tmp_path / "wrong-order.pem").write_bytes(pem(leaf, root, inter))
    (tmp_path / "both.pem").write_bytes(key_pem(key) + pem(leaf, inter))
    with pytest.raises(tlsconfig.TLSError, match="is encrypted: evrecorder needs it without a passphrase"):
        tlsconfig.load_credentials(str(tmp_path / "enc.pem"), str(tmp_path / "wrong-order.pem"))
    with pytest.raises(tlsconfig.TLSError, match="chain of .* is out of order: CN=localhost is issued by"):
        tlsconfig.load_credentials(str(tmp_path / "key.pem"), str(tmp_path / "wrong-order.pem"))
    # One file with the key and the chain (privateKey= alone, as Twisted allows).
    _, tls = tlsconfig.server_tls(f"ssl:0:privateKey={tmp_path / 'both.pem'}")
    assert tls.credentials.certificates == (leaf, inter)
    with pytest.raises(tlsconfig.TLSError, match="expired on"):
        tlsconfig.load_credentials(str(tmp_path / "both.pem"), str(tmp_path / "both.pem"),
                                   now=leaf.not_valid_after_utc.timestamp() + 1)
    weak = rsa.generate_private_key(65537, 1024)  # below OpenSSL's security level
    (tmp_path / "weak.pem").write_bytes(key_pem(weak) + pem(issue(weak, "localhost")))
    with pytest.raises(tlsconfig.TLSError, match=r"OpenSSL refuses the key or certificate \(serial \w+\): ee key too small"):
        tlsconfig.server_tls(f"ssl:0:privateKey={tmp_path / 'weak.pem'}")
    with pytest.raises(tlsconfig.TLSError, match="sslmethod is not supported"):
        tlsconfig.parse_ssl(f"ssl:0:privateKey=k:sslmethod=TLSv1_2_METHOD")
    with pytest.raises(tlsconfig.TLSError, match="an ssl: endpoint takes a port and"):
        tlsconfig.parse_ssl("ssl:0:privateKey=k:nope=1")


@pytest.mark.parametrize("spec", [
    r"ssl:3443:privateKey=/k.pem:certKey=/c.pem",
    r"ssl:port=443:interface=\:\:1:backlog=128:privateKey=/a\:b.pem:extraCertChain=/x=y.pem",
    r"ssl:0:privateKey=k",
])
def test_ssl_strings_parse_as_twisted_parses_them(spec):
    """Our ssl: parser reads escapes, keywords and positions as Twisted's own does."""
    from twisted.internet.endpoints import _parse  # the reference, for this test only

    args, kw = _parse(spec)
    assert tlsconfig._parse(spec) == (args, kw)
    parsed = tlsconfig.parse_ssl(spec)
    assert parsed.port == int(kw.get("port", args[1] if len(args) > 1 else 0))
    assert parsed.cert == kw.get("certKey", kw["privateKey"])


# -- twistd, SIGHUP ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_sighup_to_twistd_reloads_both_doors_mid_call(tmp_path):
    """twistd, SIGHUP mid-call: both doors serve the new certificate, refuse a bad pair, record exactly."""
    import json

    import grpc

    from grpcclient import OpenStream, segment_stop
    from test_grpc_process import spooled_chunks
    from test_grpc_service import chunks, dialog_events
    from test_process import free_port, start_twistd, until

    key, cert = make_certificate(tmp_path)
    old_serial, old_pem = serial_of(cert), open(cert, "rb").read()
    port, tls_port, grpc_port = free_port(), free_port(), free_port()
    proc = start_twistd(tmp_path, port, "hup", "--listen", ssl_spec(key, cert, tls_port),
                        "--grpc-listen", ssl_spec(key, cert, grpc_port), "--reconnect-grace", "0.5")
    log_path = tmp_path / "hup.log"

    def served(port: int) -> int | None:
        try:
            return handshake(port, client_context(alpn=["h2"] if port == grpc_port else None)).get("serial")
        except OSError:  # not listening yet
            return None

    try:
        await until(lambda: served(tls_port) == served(grpc_port) == old_serial, what="both TLS listeners")
        # The profile reached grpcio in the real process: CHACHA20 on TLS 1.2 (not in grpcio's
        # default), no CBC, on both doors.
        tls12, chacha = ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305"
        for p, alpn in ((tls_port, None), (grpc_port, ["h2"])):
            assert handshake(p, client_context(chacha, tls12, alpn=alpn)).get("cipher") == chacha
            assert "refused" in handshake(p, client_context(CBC_12, tls12, alpn=alpn))
        agent, caller = frames(40, 93), frames(40, 94)
        conn = await wss_connect(tls_port)
        conn.send_all([connected(), start("hup-ws")])
        for i in range(20):
            conn.send(media(AGENT, i + 1, agent[i]))
            conn.send(media(CALLER, i + 1, caller[i]))
        contact, agent_g = chunks(12, 95), chunks(12, 96)
        events = dialog_events("hup-grpc", contact, agent_g, stop=False)
        stream = OpenStream(grpc_port, ca=old_pem)
        stream.send(*events[:15])  # DialogInit, two SegmentStarts, 12 chunks
        await until(lambda: spooled_chunks(tmp_path / "spool") >= 12, what="gRPC chunks on disk")

        new_serial = renew(key, cert)
        proc.send_signal(signal.SIGHUP)
        await until(lambda: served(tls_port) == served(grpc_port) == new_serial, what="the new certificate")
        for i in range(20, 40):
            conn.send(media(AGENT, i + 1, agent[i]))
            conn.send(media(CALLER, i + 1, caller[i]))
        assert peer_serial(conn) == old_serial
        stream.send(*events[15:])

        renew(key, cert, keep_key=True)  # mismatched: the served one stays
        proc.send_signal(signal.SIGHUP)
        await until(lambda: log_path.read_bytes().count(b"does not match") == 2, what="the reload errors")
        assert served(tls_port) == served(grpc_port) == new_serial
        conn.send_all([stop(), stop()])
        stream.send(segment_stop("a"), segment_stop("c"))
        stream.close()
        assert (await conn.closed)[0] == 1000
        assert await deferToThread(stream.result) == (grpc.StatusCode.OK, "")
        await until(lambda: len(list((tmp_path / "archive").rglob("*.json"))) == 2, what="the recordings")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    sidecars = {}
    for path in (tmp_path / "archive").rglob("*.json"):
        sidecar = json.loads(path.read_text())
        sidecar["_wav"] = str(path)[:-5] + ".wav"
        sidecars[sidecar["callId"]] = sidecar
    assert sidecars["hup-ws"]["complete"] is True and sidecars["hup-grpc"]["complete"] is True
    assert_channels(sidecars["hup-ws"], b"".join(agent), b"".join(caller))
    left, right = read_pcm16_wav(sidecars["hup-grpc"]["_wav"])
    assert left == independent_decode(b"".join(agent_g)) and right == independent_decode(b"".join(contact))
    text = log_path.read_text()
    errors = [line for line in text.splitlines() if "TLS reload" in line and "failed" in line]
    assert len(errors) == 2, errors  # one sentence for each listener
    assert all(f"does not match the certificate {cert}" in e and e.rstrip().endswith(".") for e in errors)
    assert sum("new handshakes get the new certificate" in line for line in text.splitlines()) == 2
    assert "Traceback" not in text


@pytest_twisted.ensureDeferred
async def test_reuse_port_applies_to_ssl_listeners(recorder_factory, tmp_path):
    """--reuse-port: two recorders listen on one ssl: port, and both serve the reloadable certificate."""
    from test_process import free_port

    key, cert = make_certificate(tmp_path)
    port = free_port()
    first = await recorder_factory(listen=ssl_spec(key, cert, port), reuse_port=True, subdir="a")
    second = await recorder_factory(listen=ssl_spec(key, cert, port), reuse_port=True, subdir="b")
    assert first.port == second.port == port
    assert await served_serial(port) == serial_of(cert)
