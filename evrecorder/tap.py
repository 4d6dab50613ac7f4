"""``twistd evrecorder``: command-line options and the service they make."""

from __future__ import annotations

import os
import sys

from twisted.python import usage

from evrecorder import __version__, keys, tlsconfig, wav
from evrecorder.settings import ROLE_OF, Settings
from evrecorder.s3store import MAX_PREFIX_BYTES
from evrecorder.stores import store_from_url

DEFAULT_LISTEN = "tcp:3333"


def _positive(kind):
    def convert(value):
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
        if number <= 0:
            raise ValueError(f"{value!r} must be more than 0")
        return number

    return convert


_OPTION_TYPES = {
    "reorder-window": _positive(int),
    "reconnect-grace": _positive(float),
    "idle-timeout": _positive(float),
    "max-call-duration": _positive(float),
    "drain-timeout": _positive(float),
    "max-message-size": _positive(int),
    "handshake-timeout": _positive(float),
    "max-connections": _positive(int),
    "upload-concurrency": _positive(int),
    "max-calls": _positive(int),
    "ready-max-queue-age": _positive(float),
}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Records RingCentral Engage Voice (RingCX) Call Streaming into stereo WAV "
        "files (agent left, caller right) with a JSON sidecar, archived to S3 or a "
        "directory."
    )
    optParameters = [
        ["archive", None, "./recordings",
         "Where recordings go: s3://bucket/prefix, file:///dir or a directory."],
        ["spool", None, "./spool", "Directory for calls in progress and the upload queue."],
        ["secret-header", None, "X-Secret", "Extra handshake header that may carry the secret."],
        ["channel-map", None, "agent,caller", "Which perspective goes left,right."],
        ["format", None, "pcm16", "WAV sample encoding: pcm16 or mulaw."],
        ["key-template", None, keys.DEFAULT_TEMPLATE,
         "Archive key without extension: {callId}, {sessionId}, {agentId}, {start:%Y/%m/%d}..."],
        ["reorder-window", None, 50, "Frames a perspective may arrive late and still be put in place."],
        ["reconnect-grace", None, 10.0, "Seconds a call with no socket waits for a reconnect."],
        ["idle-timeout", None, 60.0, "Seconds without any message before a call ends as 'timeout'."],
        ["max-call-duration", None, 14400.0, "Seconds after which a call is cut ('max-duration')."],
        ["drain-timeout", None, 30.0, "Seconds calls in progress may take to finish on shutdown."],
        ["max-message-size", None, 65536, "Largest WebSocket message accepted, in bytes."],
        ["handshake-timeout", None, 10.0, "Seconds a client has to finish the WebSocket handshake (Autobahn's timers keep whole seconds), then to present the secret and Start."],
        ["max-connections", None, 10000, "Most sockets at once; more get HTTP 503."],
        ["upload-concurrency", None, 4, "Recordings published to the archive at once."],
        ["max-calls", None, 2000, "Most calls in progress; a new call beyond it gets 503."],
        ["ready-max-queue-age", None, 600.0,
         "/readyz fails when the archive store has failed for this many seconds."],
        ["s3-endpoint-url", None, None, "S3-compatible endpoint (MinIO, Ceph...); AWS when unset."],
        ["s3-region", None, None, "S3 region."],
        ["sse", None, None, "Server-side encryption: AES256 or aws:kms."],
        ["sse-kms-key-id", None, None, "KMS key for --sse aws:kms."],
        ["storage-class", None, None, "S3 storage class, e.g. STANDARD_IA."],
        ["object-lock-mode", None, None,
         "S3 Object Lock retention of every object: GOVERNANCE or COMPLIANCE (WORM)."],
        ["object-lock-days", None, None,
         "Days each recording is retained from its upload; without it, the bucket's "
         "default retention."],
        ["tls-ciphers", None, None,
         "TLS 1.2 cipher suites of every ssl: listener, an OpenSSL cipher string "
         "(default: AEAD with ECDHE only, Mozilla intermediate; README.rst, TLS)."],
    ]

    optFlags = [
        ["log-phone-numbers", None, "Log ani/dnis in full (masked but for 4 digits by default)."],
        ["reuse-port", None,
         "Listen with SO_REUSEPORT, so several recorder processes sharing one --spool can "
         "serve one port (e.g. one per core)."],
        ["legal-hold", None, "Put an S3 Object Lock legal hold on every object."],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []
        self["grpc-listen"] = []
        self["metrics"] = []
        self["secrets"] = []

    def opt_version(self):
        """Print evrecorder's version and exit."""
        print(f"evrecorder {__version__}")
        sys.exit(0)

    def opt_metrics(self, spec):
        """Endpoint serving /metrics (Prometheus), /healthz and /readyz, e.g. tcp:9100;
        repeatable. Off by default."""
        self["metrics"].append(spec)

    def opt_listen(self, spec):
        """Twisted server endpoint to listen on, repeatable (default tcp:3333)."""
        self["listen"].append(spec)

    def opt_grpc_listen(self, spec):
        """gRPC endpoint for RingCX streaming, repeatable: tcp:PORT[:interface=IP]
        (plaintext) or ssl:PORT:privateKey=K:certKey=C[:extraCertChain=F][:interface=IP].
        Off by default."""
        self["grpc-listen"].append(spec)

    def opt_secret(self, value):
        """Shared secret of the streaming profile; repeatable, for rotation."""
        if not value:
            raise usage.UsageError("--secret may not be empty.")
        self["secrets"].append(value)

    def opt_secret_file(self, path):
        """File holding secrets, one a line; relative paths are also looked up in
        $CREDENTIALS_DIRECTORY (systemd LoadCredential=)."""
        candidates = [path]
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds and not os.path.isabs(path):
            candidates.insert(0, os.path.join(creds, path))
        for candidate in candidates:
            try:
                with open(candidate, encoding="utf-8") as f:
                    lines = [line.strip() for line in f.read().splitlines()]
            except FileNotFoundError:
                continue
            except OSError as e:
                raise usage.UsageError(f"The secret file {path} cannot be read: {e.strerror}.")
            secrets = [line for line in lines if line]
            if not secrets:
                raise usage.UsageError(f"The secret file {path} is empty.")
            self["secrets"].extend(secrets)
            return
        raise usage.UsageError(f"The secret file {path} does not exist.")

    def postOptions(self):
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["tls-ciphers"] is not None:
            try:
                tlsconfig.check_ciphers(self["tls-ciphers"])
            except tlsconfig.TLSError as e:
                raise usage.UsageError(f"--tls-ciphers: {e}.") from None
        # Before the gRPC door loads grpcio, which reads it only then.
        tlsconfig.set_grpc_ciphers(self["tls-ciphers"] or tlsconfig.CIPHERS)
        for name in ("listen", "metrics"):
            for spec in self[name]:
                _check_endpoint(name, spec)
        for spec in self["grpc-listen"]:
            _check_grpc_endpoint(spec)
        env_secret = os.environ.get("EVRECORDER_SECRET")
        if env_secret:
            self["secrets"].append(env_secret)
        for name, convert in _OPTION_TYPES.items():
            try:
                self[name] = convert(self[name])
            except ValueError as e:
                raise usage.UsageError(f"--{name}: {e}.") from None
        roles = tuple(r.strip() for r in self["channel-map"].split(","))
        if sorted(roles) != sorted(ROLE_OF.values()):
            raise usage.UsageError(
                f"--channel-map must name agent and caller once each, as left,right "
                f"(got {self['channel-map']!r})."
            )
        self["channel-map"] = roles
        if self["format"] not in wav.FORMATS:
            raise usage.UsageError(f"--format must be pcm16 or mulaw (got {self['format']!r}).")
        try:
            keys.check_template(self["key-template"])
        except ValueError as e:
            raise usage.UsageError(f"--key-template: {e}.") from None
        if self["sse"] not in (None, "AES256", "aws:kms"):
            raise usage.UsageError(f"--sse must be AES256 or aws:kms (got {self['sse']!r}).")
        if self["sse-kms-key-id"] and self["sse"] != "aws:kms":
            raise usage.UsageError("--sse-kms-key-id needs --sse aws:kms.")
        self._check_object_lock_options()
        try:
            store = store_from_url(self["archive"], **self.s3_options())
        except ValueError as e:
            raise usage.UsageError(f"--archive: {e}.") from None
        prefix = getattr(store, "prefix", "").encode("utf-8")
        if len(prefix) > MAX_PREFIX_BYTES:
            # Keys are bounded so that key + suffix + extension + this fits S3's
            # 1,024 bytes (evrecorder.keys); a longer prefix would make every
            # publish, even under the fallback key, fail for good.
            raise usage.UsageError(
                f"--archive: the S3 prefix is {len(prefix)} bytes long; at most "
                f"{MAX_PREFIX_BYTES} leave room for the recordings' keys."
            )

    def s3_options(self) -> dict:
        if not self["archive"].startswith("s3:"):
            return {}
        return {
            "endpoint_url": self["s3-endpoint-url"],
            "region": self["s3-region"],
            "sse": self["sse"],
            "sse_kms_key_id": self["sse-kms-key-id"],
            "storage_class": self["storage-class"],
            **self._object_lock_options(),
        }

    def _check_object_lock_options(self) -> None:
        mode, days = self["object-lock-mode"], self["object-lock-days"]
        locking = mode is not None or days is not None or self["legal-hold"]
        if locking and not self["archive"].startswith("s3:"):
            raise usage.UsageError(
                "--object-lock-mode, --object-lock-days and --legal-hold need an "
                "s3://bucket/prefix archive."
            )
        if mode is not None:
            self["object-lock-mode"] = mode = mode.upper()
            if mode not in ("GOVERNANCE", "COMPLIANCE"):
                raise usage.UsageError(
                    f"--object-lock-mode must be GOVERNANCE or COMPLIANCE (got {mode!r})."
                )
        if days is not None:
            try:
                self["object-lock-days"] = _positive(int)(days)
            except ValueError as e:
                raise usage.UsageError(f"--object-lock-days: {e}.") from None
            if mode is None:
                raise usage.UsageError("--object-lock-days needs --object-lock-mode.")

    def _object_lock_options(self) -> dict:
        """The S3Store's Object Lock arguments; none unless asked for (other
        stores and older tests see the same options as before)."""
        out: dict = {}
        if self["object-lock-mode"]:
            out["object_lock_mode"] = self["object-lock-mode"]
        if self["object-lock-days"]:
            out["object_lock_days"] = self["object-lock-days"]
        if self["legal-hold"]:
            out["legal_hold"] = True
        return out

    def settings(self) -> Settings:
        return Settings(
            spool=self["spool"],
            archive=self["archive"],
            secrets=list(self["secrets"]),
            secret_header=self["secret-header"],
            channel_map=self["channel-map"],
            format=self["format"],
            key_template=self["key-template"],
            reorder_window=self["reorder-window"],
            reconnect_grace=self["reconnect-grace"],
            idle_timeout=self["idle-timeout"],
            max_call_duration=self["max-call-duration"],
            drain_timeout=self["drain-timeout"],
            max_message_size=self["max-message-size"],
            handshake_timeout=self["handshake-timeout"],
            max_connections=self["max-connections"],
            upload_concurrency=self["upload-concurrency"],
            max_calls=self["max-calls"],
            ready_max_queue_age=self["ready-max-queue-age"],
            log_phone_numbers=bool(self["log-phone-numbers"]),
            reuse_port=bool(self["reuse-port"]),
            tls_ciphers=self["tls-ciphers"],
            s3=self.s3_options(),
        )


class CannotListen(SystemExit):
    """An endpoint that is well written but cannot be used here (a missing
    certificate, a socket systemd did not pass).  Not a usage mistake: twistd
    prints just this sentence (no usage text, no traceback) and exits with 1."""

    def __init__(self, sentence: str):
        # Logging has not begun yet: under systemd, give journald the priority ourselves.
        super().__init__(f"{_journal_prefix(3)}evrecorder: {sentence}")
        self.sentence = sentence


def _journal_prefix(priority: int) -> str:
    """``<N>`` when standard error is the journal (systemd sets JOURNAL_STREAM to its
    device:inode), else nothing."""
    try:
        device, inode = (int(n) for n in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return ""
    return f"<{priority}>" if (st.st_dev, st.st_ino) == (device, inode) else ""


def _check_endpoint(option: str, spec: str) -> None:
    """Parse (without binding) an endpoint string.

    A malformed string is a :class:`usage.UsageError`; one that names a file
    or a systemd socket that is not there is :class:`CannotListen`.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    if tlsconfig.is_ssl(spec):  # key and certificates loaded and checked as the service will
        try:
            tlsconfig.parse_ssl(spec)
        except tlsconfig.TLSError as e:
            raise usage.UsageError(f"--{option} {spec}: {e}.") from None
        try:
            tlsconfig.server_tls(spec, clock=reactor)
        except tlsconfig.TLSError as e:  # the files, not the string: no usage text
            raise CannotListen(f"--{option} {spec}: {e}.") from None
        return
    try:
        serverFromString(reactor, spec)
    except KeyError as e:
        raise CannotListen(
            f"--{option} {spec}: no socket named {e.args[0]!r} was passed in by systemd "
            "(check FileDescriptorName= in the .socket unit)."
        ) from None
    except OSError as e:
        if e.filename is not None:
            what = "does not exist" if isinstance(e, FileNotFoundError) else \
                f"cannot be read ({e.strerror})"
            raise CannotListen(f"--{option} {spec}: the file {e.filename} {what}.") from None
        raise CannotListen(f"--{option} {spec}: {e}.") from None
    except Exception as e:
        raise usage.UsageError(f"--{option} {spec}: {e}.") from None


def _check_grpc_endpoint(spec: str) -> None:
    """Parse a --grpc-listen value (reading its TLS files, not binding)."""
    from evrecorder.grpcdoor import parse_endpoint

    try:
        parse_endpoint(spec)
    except tlsconfig.TLSError as e:  # the key or certificate files: no usage text
        raise CannotListen(f"--grpc-listen {spec}: {e}.") from None
    except ValueError as e:
        raise usage.UsageError(f"--grpc-listen {spec}: {e}.") from None


def makeService(config: Options):
    from twisted.internet import reactor

    from evrecorder.service import RecorderService, quiet_listen_errors

    settings = config.settings()
    store = store_from_url(settings.archive, **settings.s3)
    quiet_listen_errors()
    return RecorderService(
        settings, store, reactor, listen=config["listen"], metrics_listen=config["metrics"],
        grpc_listen=config["grpc-listen"], reload_on_sighup=True,
    )
