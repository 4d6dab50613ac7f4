"""TLS on the recorder's own listeners: one cipher profile, certificates renewed in place.

Every ``ssl:`` listener (``--listen``, ``--metrics``, and the gRPC door's
``--grpc-listen``) gets a :class:`ServerTLS`: it loads the listener's private
key, certificate and chain, checks them (the key matches the certificate, the
chain is in order, the certificate has not expired), and makes each new TLS
connection from the *current* OpenSSL context. :meth:`ServerTLS.reload`
(on SIGHUP, ``systemctl reload``) reads the files again and swaps the context
only when the new ones pass the same checks; otherwise it logs one sentence
and keeps the old certificate. A connection keeps the context it was made
with, so calls in progress are never touched by a reload. The files are also
looked at every :data:`WATCH_SECONDS` (:meth:`ServerTLS.poll`), so a renewal
is taken even without SIGHUP.

The profile (Mozilla's "intermediate", ECDHE only): TLS 1.2 and 1.3, AEAD
suites only, the server's order of preference. ``--tls-ciphers`` replaces the
TLS 1.2 list (an OpenSSL cipher string); the TLS 1.3 suites are all AEAD.

``ssl:`` endpoint strings keep Twisted's syntax and keys (``port``,
``privateKey``, ``certKey``, ``extraCertChain``, ``interface``, ``backlog``,
``dhParameters``); the listener is an ``SSL4ServerEndpoint`` on the reactor
it is given, so ``--reuse-port`` applies as to any ``ssl:`` listener. Two
differences from Twisted's own parser: every certificate in ``certKey`` is
served (the leaf, then the chain: certbot's ``fullchain.pem`` works as is),
and ``sslmethod`` is refused (the versions are fixed by the profile).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])
"""TLS 1.2 suites of the profile: Mozilla "intermediate" without the DHE ones."""

TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
"""TLS 1.3 suites: OpenSSL's defaults (all AEAD), in Mozilla's order."""

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?\r?\n-----END \1-----", re.DOTALL
)


class TLSError(ValueError):
    """A key, certificate, chain or cipher setting that cannot be served; a sentence."""


# -- loading and checking -----------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """A private key with its certificate and chain, loaded from files and checked."""

    key_pem: bytes
    chain_pem: bytes
    """The leaf certificate, then the rest of the chain, PEM: what gRPC serves."""
    certificates: tuple[x509.Certificate, ...]
    """The leaf first."""
    key: object

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]

    def describe(self) -> str:
        """Serial, subject and expiry of the leaf, for the log."""
        leaf = self.leaf
        return (f"serial {leaf.serial_number:x}, {leaf.subject.rfc4514_string()}, "
                f"valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"the {what} file {path} cannot be read: {e.strerror}") from None


def _blocks(data: bytes, labels: Callable[[bytes], bool]) -> list[bytes]:
    return [m.group(0) for m in _PEM_BLOCK.finditer(data) if labels(m.group(1))]


def load_credentials(
    key_path: str, cert_path: str, chain_path: str | None = None, now: float | None = None
) -> Credentials:
    """Read and check a key, its certificate (and any chain after it) and an extra chain.

    Raises :class:`TLSError` with a sentence (no final stop) naming the file at fault.
    """
    key_data = _read(key_path, "private key")
    blocks = _blocks(key_data, lambda label: label.endswith(b"PRIVATE KEY"))
    if not blocks:
        raise TLSError(f"the private key file {key_path} holds no PEM private key")
    try:
        key = serialization.load_pem_private_key(blocks[0], password=None)
    except TypeError:
        raise TLSError(
            f"the private key in {key_path} is encrypted: evrecorder needs it without a passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):  # the library's reason runs to several sentences
        raise TLSError(
            f"the private key in {key_path} is damaged or of a kind OpenSSL cannot use"
        ) from None

    certificates: list[x509.Certificate] = []
    for path in (cert_path,) + ((chain_path,) if chain_path else ()):
        data = key_data if path == key_path else _read(path, "certificate")
        found = _blocks(data, lambda label: label in (b"CERTIFICATE", b"TRUSTED CERTIFICATE"))
        if not found:
            raise TLSError(f"the file {path} holds no PEM certificate")
        for block in found:
            try:
                certificates.append(x509.load_pem_x509_certificate(
                    block.replace(b"TRUSTED CERTIFICATE", b"CERTIFICATE")))
            except ValueError:
                raise TLSError(f"a certificate in {path} is damaged") from None

    leaf = certificates[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            != leaf.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise TLSError(
            f"the private key {key_path} does not match the certificate {cert_path} "
            f"(serial {leaf.serial_number:x})"
        )
    for cert, issuer in zip(certificates, certificates[1:]):
        if cert.issuer != issuer.subject:
            raise TLSError(
                f"the certificate chain of {cert_path} is out of order: "
                f"{cert.subject.rfc4514_string()} is issued by {cert.issuer.rfc4514_string()}, "
                f"but the next certificate is {issuer.subject.rfc4514_string()}"
            )
    if now is not None:
        expiry = leaf.not_valid_after_utc
        if expiry.timestamp() <= now:
            raise TLSError(
                f"the certificate {cert_path} (serial {leaf.serial_number:x}) expired on "
                f"{expiry:%Y-%m-%d %H:%M} UTC"
            )

    pem = serialization.Encoding.PEM
    return Credentials(
        key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        chain_pem=b"".join(c.public_bytes(pem) for c in certificates),
        certificates=tuple(certificates),
        key=key,
    )


def check_ciphers(ciphers: str) -> None:
    """Raise TLSError when OpenSSL makes no TLS 1.2 suite of the cipher string."""
    try:
        SSL.Context(SSL.TLS_SERVER_METHOD).set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise TLSError(f"OpenSSL knows no cipher suite in {ciphers!r}") from None


def server_context(creds: Credentials, ciphers: str = CIPHERS,
                   dh_parameters: str | None = None) -> SSL.Context:
    """An OpenSSL server context with the profile, serving ``creds``."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_SINGLE_ECDH_USE | SSL.OP_SINGLE_DH_USE
    )
    # As Twisted's CertificateOptions: thousands of idle sockets need no buffers.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        ctx.set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise TLSError(f"OpenSSL knows no cipher suite in {ciphers!r}") from None
    ctx.set_tls13_ciphersuites(TLS13_SUITES.encode("ascii"))
    # Both listeners that take ssl: (WebSocket, /metrics) speak HTTP/1.1: say
    # so to a client that offers ALPN (curl, browsers, WebSocket libraries).
    ctx.set_alpn_select_callback(_select_http11)
    if dh_parameters:
        try:
            ctx.load_tmp_dh(dh_parameters.encode())
        except SSL.Error as e:
            raise TLSError(f"the DH parameters file {dh_parameters} cannot be loaded: {e}") from None
    try:
        ctx.use_certificate(creds.leaf)
        for cert in creds.certificates[1:]:
            ctx.add_extra_chain_cert(cert)
        ctx.use_privatekey(creds.key)
        # load_credentials compared them already; OpenSSL has the last word.
        ctx.check_privatekey()
    except SSL.Error as e:  # e.g. "ee key too small": a 1024-bit RSA key
        raise TLSError(
            f"OpenSSL refuses the key or certificate (serial {creds.leaf.serial_number:x}): "
            f"{_openssl_reason(e)}"
        ) from None
    return ctx


def _select_http11(connection, offered: list[bytes]):
    return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def _openssl_reason(error: SSL.Error) -> str:
    reasons = [r[2] for r in (error.args[0] if error.args else []) if isinstance(r, tuple) and len(r) == 3]
    return "; ".join(reasons) or str(error)


# -- a listener's certificate, reloadable -------------------------------------

WATCH_SECONDS = 60.0
"""How often the files are looked at (:meth:`ServerTLS.poll`); a change is taken once
the files have held still for one such period, so renewal needs no SIGHUP either."""

_FileState = tuple  # (inode, mtime_ns, size) per file, None for a missing one


def _file_state(paths: Iterable[str | None]) -> _FileState:
    state = []
    for path in paths:
        if path is None:
            continue
        try:
            st = os.stat(path)
            state.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            state.append(None)
    return tuple(state)


@dataclass(frozen=True)
class _Served:
    creds: Credentials
    context: SSL.Context
    generation: int
    files: _FileState
    """The files as they were just before they were read."""


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """One TLS listener's key, certificate and chain; new connections get the current one.

    ``clock`` (the reactor) dates the expiry check. The state is one immutable
    record swapped in a single assignment, so a gRPC handshake thread reading
    it during a reload sees the old record or the new one, never half of each.
    """

    def __init__(self, name: str, private_key: str, cert: str, chain: str | None = None,
                 ciphers: str = CIPHERS, dh_parameters: str | None = None, clock=None):
        self.name = name
        self.paths = (os.path.abspath(private_key), os.path.abspath(cert),
                      os.path.abspath(chain) if chain else None)
        self.ciphers = ciphers
        self.dh_parameters = os.path.abspath(dh_parameters) if dh_parameters else None
        self._clock = clock
        creds, context, files = self._load()
        self._served = _Served(creds, context, 1, files)
        self._changing: _FileState | None = None  # seen changed by poll(), not yet still
        self._refused: _FileState | None = None  # files a reload refused (and logged)

    def _files(self) -> _FileState:
        return _file_state(self.paths + (self.dh_parameters,))

    def _load(self) -> tuple[Credentials, SSL.Context, _FileState]:
        files = self._files()
        now = self._clock.seconds() if self._clock is not None else None
        creds = load_credentials(*self.paths, now=now)
        return creds, server_context(creds, self.ciphers, self.dh_parameters), files

    @property
    def credentials(self) -> Credentials:
        return self._served.creds

    @property
    def generation(self) -> int:
        """Counts the certificates loaded (1 at start): the gRPC fetcher's cue."""
        return self._served.generation

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._served.context, None)

    def reload(self) -> bool:
        """Read the files again; serve them if they pass the checks, else keep the old ones.

        True when the new files are served (even if they are the same certificate).
        """
        old = self._served
        self._refused = self._files()  # until it is served: poll() need not try it again
        try:
            creds, context, files = self._load()
        except TLSError as e:
            log.error(
                "TLS reload of {listener} failed, still serving the old certificate "
                "({old}): {reason}.",
                listener=self.name, old=old.creds.describe(), reason=str(e),
            )
            return False
        except Exception:
            log.failure(
                "TLS reload of {listener} failed, still serving the old certificate ({old}).",
                listener=self.name, old=old.creds.describe(),
            )
            return False
        self._refused = None
        same = creds.chain_pem == old.creds.chain_pem and creds.key_pem == old.creds.key_pem
        if same:  # an unchanged pair keeps its context: gRPC sees no new configuration
            self._served = _Served(old.creds, old.context, old.generation, files)
        else:
            self._served = _Served(creds, context, old.generation + 1, files)
        log.info(
            "TLS reload of {listener}: {what} ({certificate}).",
            listener=self.name, certificate=creds.describe(),
            what="the certificate is unchanged" if same else "new handshakes get the new certificate",
        )
        return True


    def poll(self) -> bool | None:
        """Look at the files (every :data:`WATCH_SECONDS`): reload once they changed and held still.

        A renewal replaces two files one after the other; taking them only when
        a look finds them as the previous look did avoids reading the new key
        beside the old certificate. A reload refused here is logged once, not
        at every look. None when nothing was reloaded, else what reload() said.
        """
        files = self._files()
        if files == self._served.files:
            self._changing = None
            return None
        if files != self._changing:
            self._changing = files  # changed since the last look: wait one more
            return None
        if files == self._refused:  # already refused (here or on SIGHUP) and logged
            return None
        return self.reload()


def reload_all(listeners: Iterable[ServerTLS]) -> bool:
    """Reload every listener's certificate; True when all of them were reloaded."""
    results = [tls.reload() for tls in listeners]
    if not results:
        log.info("reload: no TLS listener, nothing to reload.")
    return all(results)


def reload_on_sighup(reactor, reload: Callable[[], object]) -> None:
    """Call ``reload`` on the reactor thread whenever the process gets SIGHUP.

    For the twistd service only (``systemctl reload`` sends SIGHUP); tests call
    the reload entry point directly. Reading a few small PEM files on the
    reactor thread costs less than a thread hop would.
    """
    def handler(signum, frame):
        reactor.callFromThread(reload)

    signal.signal(signal.SIGHUP, handler)


# -- endpoint strings ------------------------------------------------------------

def is_ssl(spec: str) -> bool:
    return spec.split(":", 1)[0].strip().lower() == "ssl"


def _parse(spec: str) -> tuple[list[str], dict[str, str]]:
    """Twisted's endpoint-string syntax: ``:``-separated, ``key=value``, ``\\`` escapes."""
    args: list[str] = []
    kw: dict[str, str] = {}
    key, current = None, ""
    chars = iter(spec)
    for ch in chars:
        if ch == "\\":
            current += next(chars, "")
        elif ch == ":":
            if key is None:
                args.append(current)
            else:
                kw[key] = current
            key, current = None, ""
        elif ch == "=" and key is None:
            key, current = current, ""
        else:
            current += ch
    if key is None:
        args.append(current)
    else:
        kw[key] = current
    return args, kw


@dataclass(frozen=True)
class SSLSpec:
    port: int
    private_key: str
    cert: str
    chain: str | None
    interface: str
    backlog: int
    dh_parameters: str | None


def _ssl_spec(port, privateKey="server.pem", certKey=None, sslmethod=None, interface="",
              backlog=50, extraCertChain=None, dhParameters=None) -> SSLSpec:
    # The names, defaults and positions of Twisted's own ssl: parser (endpoints._parseSSL).
    if sslmethod is not None:
        raise TLSError("sslmethod is not supported: evrecorder serves TLS 1.2 and 1.3 only")
    try:
        port, backlog = int(port), int(backlog)
    except ValueError:
        raise TLSError(f"the port {port!r} and backlog {backlog!r} must be numbers") from None
    return SSLSpec(port, privateKey, certKey or privateKey, extraCertChain or None,
                   interface, backlog, dhParameters or None)


def parse_ssl(spec: str) -> SSLSpec:
    """The parts of an ``ssl:`` endpoint string; TLSError says what is wrong."""
    args, kw = _parse(spec)
    if not is_ssl(args[0]):
        raise TLSError(f"{spec} is not an ssl: endpoint")
    try:
        return _ssl_spec(*args[1:], **kw)
    except TypeError:
        known = "port, privateKey, certKey, extraCertChain, interface, backlog, dhParameters"
        raise TLSError(f"an ssl: endpoint takes a port and {known}") from None


def server_tls(spec: str, ciphers: str = CIPHERS, clock=None) -> tuple[SSLSpec, ServerTLS]:
    """Parse an ``ssl:`` endpoint string and load its key and certificate."""
    parsed = parse_ssl(spec)
    name = f"ssl:{parsed.port}" + (f" on {parsed.interface}" if parsed.interface else "")
    tls = ServerTLS(name, parsed.private_key, parsed.cert, parsed.chain, ciphers,
                    parsed.dh_parameters, clock=clock)
    return parsed, tls


def ssl_endpoint(reactor, spec: str, ciphers: str = CIPHERS, clock=None):
    """An ``ssl:`` server endpoint whose certificate can be reloaded: (endpoint, ServerTLS)."""
    parsed, tls = server_tls(spec, ciphers, clock=clock)
    endpoint = SSL4ServerEndpoint(reactor, parsed.port, tls, backlog=parsed.backlog,
                                  interface=parsed.interface)
    return endpoint, tls


# -- the gRPC door -------------------------------------------------------------

GRPC_CIPHERS_ENV = "GRPC_SSL_CIPHER_SUITES"


def set_grpc_ciphers(ciphers: str = CIPHERS) -> None:
    """Restrict grpcio's TLS 1.2 suites to the profile (its TLS 1.3 suites are fixed, AEAD).

    grpcio reads ``GRPC_SSL_CIPHER_SUITES`` once, when its first TLS
    credentials are made: call this before any. A value already in the
    environment (the operator's) wins.
    """
    if GRPC_CIPHERS_ENV in os.environ:
        return
    os.environ[GRPC_CIPHERS_ENV] = ciphers
    if "grpc" in sys.modules:
        log.warn(
            "grpcio was loaded before the TLS profile could reach it: the gRPC door offers "
            "grpcio's default TLS 1.2 suites (AEAD only, without CHACHA20), not --tls-ciphers."
        )


def grpc_server_credentials(tls: ServerTLS):
    """``grpc.ServerCredentials`` that serve ``tls``'s current certificate.

    grpcio asks the fetcher before every new handshake (on one of its own
    threads); it answers with a new configuration once after each reload, and
    None (keep) otherwise. Streams in progress keep their connection.
    """
    import grpc

    lock = threading.Lock()
    initial = tls._served
    seen = [initial.generation]

    def configuration(creds: Credentials):
        return grpc.ssl_server_certificate_configuration([(creds.key_pem, creds.chain_pem)])

    def fetch():
        served = tls._served
        with lock:
            if served.generation == seen[0]:
                return None
            seen[0] = served.generation
        return configuration(served.creds)

    return grpc.dynamic_ssl_server_credentials(
        configuration(initial.creds), fetch, require_client_authentication=False
    )
