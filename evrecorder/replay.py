"""``evrecorder-replay``: stream an audio file to a recorder as Engage Voice would.

For demos, smoke tests and load: the file's audio goes over a real WebSocket
(``ws://`` or ``wss://``) in the platform's message sequence -- the handshake
query, Connected, Start, Media frames of 20 ms per perspective, one Stop per
perspective -- and then the server is given time to close the call.

The library part is importable: :func:`load_audio` reads a file into mu-law
bytes per perspective, :func:`frames_for` and the message builders make the
platform's messages, and :func:`replay` runs calls and returns a
:class:`CallResult` for each.  :func:`main` is the console script.
"""

from __future__ import annotations

import argparse
import array
import base64
import io
import json
import os
import re
import struct
import sys
import time
import uuid
import wave
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from OpenSSL import SSL
from twisted.internet import defer, task
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IPushProducer
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from evrecorder import g711

_log = Logger()

#: The platform's perspective names: the agent (left) and the caller (right).
AGENT = "Participant"
CALLER = "Conference"
PERSPECTIVES = (AGENT, CALLER)

SAMPLE_RATE = 8000
FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law
FRAME_SECONDS = FRAME_BYTES / SAMPLE_RATE

RAW_EXTENSIONS = (".ulaw", ".mulaw", ".raw", ".pcmu", ".ul")

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_MULAW = 0x0007
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
_FORMAT_NAMES = {0x0003: "IEEE float", 0x0006: "G.711 A-law", 0x0011: "IMA ADPCM", 0x0055: "MP3"}

#: Ticks (one frame per perspective) sent per reactor turn when flooding.
_FLOOD_BATCH = 32


class AudioError(Exception):
    """The audio file cannot be streamed (unreadable, wrong format or rate)."""


# -- audio files -----------------------------------------------------------


def _riff_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(id, body) of each chunk of a RIFF/WAVE file; a truncated last chunk is cut short."""
    pos = 12
    while pos + 8 <= len(data):
        cid, size = struct.unpack_from("<4sI", data, pos)
        # Streamed WAVs may carry a placeholder size (0 or 0xFFFFFFFF): take what is there.
        if cid == b"data" and size in (0, 0xFFFFFFFF):
            size = len(data) - pos - 8
        yield cid, data[pos + 8 : pos + 8 + size]
        pos += 8 + size + (size & 1)


def _split_channels(data: bytes, channels: int, width: int) -> list[bytes]:
    """De-interleave whole frames of ``channels`` samples of ``width`` bytes."""
    data = data[: len(data) - len(data) % (channels * width)]
    if channels == 1:
        return [data]
    if width == 1:
        return [data[c::channels] for c in range(channels)]
    # Slicing an array of 16-bit items keeps each sample's two bytes as they are.
    samples = array.array("h")
    samples.frombytes(data)
    return [samples[c::channels].tobytes() for c in range(channels)]


def _assign(channels: list[bytes], mono_perspective: str) -> dict[str, bytes]:
    if len(channels) == 2:
        return {AGENT: channels[0], CALLER: channels[1]}
    if mono_perspective == "both":
        return {AGENT: channels[0], CALLER: channels[0]}
    return {mono_perspective: channels[0]}


def _check_format(path: str, tag: int, rate: int, channels: int, bits: int) -> None:
    if tag == _WAVE_FORMAT_PCM and bits != 16:
        raise AudioError(f"{path}: {bits}-bit PCM is not supported; use 16-bit PCM or G.711 mu-law")
    if tag == _WAVE_FORMAT_MULAW and bits != 8:
        raise AudioError(f"{path}: mu-law with {bits} bits per sample is not valid G.711 (8 bits)")
    if tag not in (_WAVE_FORMAT_PCM, _WAVE_FORMAT_MULAW):
        name = _FORMAT_NAMES.get(tag, f"format tag {tag:#06x}")
        raise AudioError(
            f"{path}: {name} audio is not supported; use 16-bit PCM or G.711 mu-law "
            f"(e.g. sox {path} -e mu-law out.wav)"
        )
    if channels not in (1, 2):
        raise AudioError(f"{path}: {channels} channels; only mono or stereo (agent left, caller right)")
    if rate != SAMPLE_RATE:
        raise AudioError(
            f"{path}: sample rate is {rate} Hz; Engage Voice streams 8000 Hz and replay does not "
            f"resample (e.g. sox {path} -r 8000 out.wav)"
        )


def load_audio(path: str, raw: bool = False, mono_perspective: str = AGENT) -> dict[str, bytes]:
    """Read ``path`` into G.711 mu-law bytes per perspective (``Participant``, ``Conference``).

    A WAV may hold 16-bit PCM (encoded to mu-law here) or mu-law (format tag 7,
    sent as it is), mono or stereo, at 8000 Hz.  Stereo: left is the agent,
    right the caller.  Mono goes to ``mono_perspective``: ``Participant``,
    ``Conference`` or ``both``.  Raw mu-law (``raw=True`` or a ``.ulaw``,
    ``.mulaw``, ``.raw``, ``.pcmu`` name) is 8 kHz mono.  Raises
    :class:`AudioError` with a sentence for the user.
    """
    if mono_perspective not in (AGENT, CALLER, "both"):
        raise ValueError(f"mono_perspective must be {AGENT}, {CALLER} or both")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AudioError(f"cannot read {path}: {e.strerror or e}") from None

    if raw or path.lower().endswith(RAW_EXTENSIONS):
        audio = _assign([data], mono_perspective)
    else:
        audio = _load_wav(path, data, mono_perspective)
    if not any(audio.values()):
        raise AudioError(f"{path}: no audio in the file")
    return audio


def _load_wav(path: str, data: bytes, mono_perspective: str) -> dict[str, bytes]:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(
            f"{path}: not a WAV file (no RIFF/WAVE header); for raw mu-law use --raw "
            f"or a {'/'.join(RAW_EXTENSIONS)} name"
        )
    chunks = dict(_riff_chunks(data))  # a repeated chunk id: the last wins, as in most readers
    fmt = chunks.get(b"fmt ")
    if fmt is None or len(fmt) < 16:
        raise AudioError(f"{path}: WAV file without a valid fmt chunk")
    if b"data" not in chunks:
        raise AudioError(f"{path}: WAV file without a data chunk")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]  # the sub-format GUID starts with the tag
        extensible = True
    else:
        extensible = False
    _check_format(path, tag, rate, channels, bits)

    if tag == _WAVE_FORMAT_PCM and not extensible:
        # Plain PCM: the stdlib reader (the chunk walk above only chose the path).
        try:
            with wave.open(io.BytesIO(data), "rb") as w:
                pcm = w.readframes(w.getnframes())
        except (wave.Error, EOFError) as e:
            raise AudioError(f"{path}: unreadable WAV: {e}") from None
        return _assign([g711.pcm16le_to_ulaw(c) for c in _split_channels(pcm, channels, 2)], mono_perspective)
    if tag == _WAVE_FORMAT_PCM:
        pcm = chunks[b"data"]
        return _assign([g711.pcm16le_to_ulaw(c) for c in _split_channels(pcm, channels, 2)], mono_perspective)
    # mu-law: the bytes are sent as they are, never decoded and re-encoded.
    return _assign(_split_channels(chunks[b"data"], channels, 1), mono_perspective)


# -- the platform's messages -------------------------------------------------


def _perspectives(audio: dict[str, bytes]) -> list[str]:
    unknown = set(audio) - set(PERSPECTIVES)
    if unknown:
        raise ValueError(f"unknown perspectives {sorted(unknown)}; use {AGENT} and {CALLER}")
    return [p for p in PERSPECTIVES if audio.get(p)]


def _ticks(audio: dict[str, bytes]) -> Iterator[list[tuple[str, int, bytes]]]:
    """(perspective, sequence id, payload) grouped by 20 ms tick: agent frame n, then caller's."""
    order = _perspectives(audio)
    longest = max((len(audio[p]) for p in order), default=0)
    for n, offset in enumerate(range(0, longest, FRAME_BYTES), start=1):
        tick = []
        for p in order:
            payload = audio[p][offset : offset + FRAME_BYTES]
            if payload:
                tick.append((p, n, payload))
        yield tick


def frames_for(audio: dict[str, bytes]) -> Iterator[dict]:
    """The Media messages for ``audio`` in the order the platform sends them.

    160-byte frames (the last may be shorter), ``sequenceId`` counting from "1"
    per perspective, agent frame n before caller frame n.
    """
    for tick in _ticks(audio):
        for perspective, n, payload in tick:
            yield media_message(perspective, n, payload)


def media_message(perspective: str, sequence_id: int, payload: bytes) -> dict:
    return {
        "event": "Media",
        "perspective": perspective,
        "sequenceId": str(sequence_id),
        "media": base64.b64encode(payload).decode("ascii"),
    }


def connected_message(secret: str | None = None) -> dict:
    """The Connected message; ``secret`` adds a ``secret`` field (``--secret-in message``)."""
    msg = {"event": "Connected", "protocol": "AgentSession", "version": "1.0.0"}
    if secret is not None:
        msg["secret"] = secret
    return msg


def _number_if_numeric(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def start_message(call_id: str, session_id: str, options: ReplayOptions) -> dict:
    """The Start message, metadata as the vendor documents it."""
    return {
        "event": "Start",
        "metadata": {
            "callId": call_id,
            "sessionId": _number_if_numeric(session_id),
            "ani": options.ani,
            "dnis": options.dnis,
            "accountId": options.account_id,
            "subaccountId": options.subaccount_id,
            "rcAccountId": options.rc_account_id,
            "agentId": _number_if_numeric(options.agent_id),
            "productType": options.product_type,
            "productId": _number_if_numeric(options.product_id),
            "contentType": "audio/x-mulaw",
            "sampleRateHertz": SAMPLE_RATE,
        },
    }


def rfc3339(seconds: float) -> str:
    """UTC RFC 3339 timestamp, whole seconds, as in the vendor's Stop example."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def audio_seconds(audio: dict[str, bytes]) -> float:
    return max((len(b) for b in audio.values()), default=0) / SAMPLE_RATE


def stop_messages(
    audio: dict[str, bytes], end_time: str, with_perspective: bool = False
) -> list[dict]:
    """One Stop per perspective that has media.

    The documented Stop carries no perspective; ``with_perspective`` adds one.
    """
    out = []
    for p in _perspectives(audio):
        msg: dict = {
            "event": "Stop",
            "metadata": {"duration": round(audio_seconds(audio)), "end_time": end_time},
        }
        if with_perspective:
            msg["perspective"] = p
        out.append(msg)
    return out


def _encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode("utf-8")


# -- options and results ---------------------------------------------------


@dataclass
class ReplayOptions:
    """How calls are made; the CLI fills it, tests build it directly."""

    call_id: str | None = None  # None: generated
    session_id: str = "1"
    calls: int = 1
    stagger: float = 0.0
    realtime: bool = True  # False: flood
    secret: str | None = None
    secret_in: str = "header"  # header | query | message
    secret_header: str | None = None  # None: Authorization: Bearer <secret>
    query: list[tuple[str, str]] = field(default_factory=list)
    stop_perspective: bool = False
    close_timeout: float = 10.0
    connect_timeout: float = 10.0
    insecure: bool = False
    ani: str = "2223334444"
    dnis: str = "2223335555"
    account_id: str = "99990000"
    subaccount_id: str = "99990001"
    rc_account_id: str = "123456789"
    agent_id: str = "123"
    product_type: str = "Queue"
    product_id: str = "1234"

    def __repr__(self) -> str:  # never show the secret
        return f"ReplayOptions(call_id={self.call_id!r}, calls={self.calls}, realtime={self.realtime}, ...)"


@dataclass
class CallResult:
    """What happened to one call."""

    call_id: str
    session_id: str
    frames: dict[str, int] = field(default_factory=dict)  # Media sent per perspective
    media_bytes: int = 0  # mu-law bytes sent, all perspectives
    stops: int = 0
    complete: bool = False  # every Media and Stop was sent
    http_status: int | None = None  # the handshake was refused with this status
    http_reason: str = ""
    close_code: int | None = None  # the code of the server's (or echoed) close frame
    close_reason: str | None = None
    closed_by: str | None = None  # "server", "client" (after the close timeout) or None
    error: str | None = None  # connection failed or lost without a close handshake
    elapsed: float = 0.0

    @property
    def refused(self) -> bool:
        return self.http_status is not None

    @property
    def ok(self) -> bool:
        """Closed by the server with 1000, or everything accepted and closed by us at the timeout."""
        if self.closed_by == "server":
            return self.close_code == 1000
        return self.closed_by == "client" and self.complete


def exit_status(results: Iterable[CallResult]) -> int:
    """0 when every call ended well, 1 otherwise."""
    return 0 if all(r.ok for r in results) else 1


def call_ids(options: ReplayOptions) -> list[str]:
    base = options.call_id or f"replay-{uuid.uuid4().hex[:12]}"
    if options.calls == 1:
        return [base]
    return [f"{base}-{n}" for n in range(1, options.calls + 1)]


def handshake_url(url: str, call_id: str, options: ReplayOptions) -> str:
    """``url`` with the platform's query parameters (and the secret, with ``--secret-in query``)."""
    parts = urlsplit(url)
    params = {
        "callId": call_id,
        "sessionId": options.session_id,
        "agentId": options.agent_id,
        "accountId": options.account_id,
        "ani": options.ani,
        "dnis": options.dnis,
        "productType": options.product_type,
        "productId": options.product_id,
    }
    params.update(options.query)  # --query may replace a default
    pairs = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    if options.secret is not None and options.secret_in == "query":
        pairs.append(("secret", options.secret))
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", urlencode(pairs), ""))


def handshake_headers(options: ReplayOptions) -> dict[str, str]:
    if options.secret is None or options.secret_in != "header":
        return {}
    if options.secret_header:
        return {options.secret_header: options.secret}
    return {"Authorization": f"Bearer {options.secret}"}


# -- pacing ------------------------------------------------------------------


class RealtimePacer:
    """Calls ``send_tick(n)`` for n = 0 .. count-1, tick n at ``start + n * 20 ms``.

    Every wake-up is scheduled against the start time, so timer lateness never
    accumulates; a late wake-up sends just the ticks that are due.
    """

    def __init__(self, clock, now: Callable[[], float], count: int,
                 send_tick: Callable[[int], bool], done: Callable[[], None]):
        self._clock = clock
        self._now = now
        self._count = count
        self._send_tick = send_tick  # returns False when the call can no longer send
        self._done = done
        self._next = 0
        self._start = 0.0
        self._call = None

    def start(self) -> None:
        self._start = self._now()
        self._wake()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _wake(self) -> None:
        self._call = None
        # 1e-6: a wake-up exactly on time must not count as one frame early.
        due = min(self._count, int((self._now() - self._start) / FRAME_SECONDS + 1e-6) + 1)
        while self._next < due:
            if not self._send_tick(self._next):
                return
            self._next += 1
        if self._next >= self._count:
            self._done()
            return
        delay = self._start + self._next * FRAME_SECONDS - self._now()
        self._call = self._clock.callLater(max(0.0, delay), self._wake)


@implementer(IPushProducer)
class FloodPacer:
    """Sends ticks as fast as the transport takes them.

    A push producer on the transport: paused when its buffer is full, resumed
    when it drained.  Batches yield to the reactor so many calls share it.
    """

    def __init__(self, clock, count: int, send_tick: Callable[[int], bool],
                 done: Callable[[], None], batch: int = _FLOOD_BATCH):
        self._clock = clock
        self._count = count
        self._send_tick = send_tick
        self._done = done
        self._batch = batch
        self._next = 0
        self._paused = False
        self._stopped = False
        self._call = None

    def start(self) -> None:
        self._schedule()

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.stop()

    def _schedule(self) -> None:
        if self._call is None and not self._stopped:
            self._call = self._clock.callLater(0, self._run)

    def _run(self) -> None:
        self._call = None
        for _ in range(self._batch):
            if self._paused or self._stopped:
                return
            if self._next >= self._count:
                break
            if not self._send_tick(self._next):
                self._stopped = True
                return
            self._next += 1
        if self._next >= self._count:
            self._stopped = True
            self._done()
        else:
            self._schedule()


# -- the WebSocket client ----------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTLS:
    """TLS without certificate checks (``--insecure``), still sending SNI."""

    def __init__(self, hostname: str):
        self._context = CertificateOptions().getContext()  # verify=False is its default
        is_ip = isIPAddress(hostname) or isIPv6Address(hostname)
        self._sni = None if is_ip else hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


class _ReplayProtocol(WebSocketClientProtocol):
    """Thin: hands every event to the factory's :class:`_CallRun`."""

    def onOpen(self) -> None:
        self._guard(self.factory.run.opened, self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        pass  # the platform ignores what the server says; so do we

    def onClose(self, wasClean: bool, code, reason) -> None:
        self._guard(self.factory.run.closed, self, wasClean, code, reason)

    def failHandshake(self, reason: str) -> None:
        # The HTTP status of a refused upgrade; Autobahn puts it only in its message.
        self.factory.run.handshake_failed(getattr(self, "http_status_line", None), reason)
        super().failHandshake(reason)

    def _guard(self, method, *args) -> None:
        # Autobahn swallows exceptions from its callbacks: record and drop instead.
        try:
            method(*args)
        except Exception:
            _log.failure("replay client error")
            self.factory.run.fail(Failure())
            self.dropConnection(abort=True)


_STATUS_RE = re.compile(r"upgrade failed [\[(](\d{3})[\])]:?\s*-?\s*([^\"')]*)")


class _CallRun:
    """One call: connect, send the script, wait for the close; fires ``done`` with a CallResult."""

    def __init__(self, reactor, clock, now, url: str, call_id: str, options: ReplayOptions,
                 script: _Script):
        self._reactor = reactor
        self._clock = clock
        self._now = now
        self._url = url
        self._options = options
        self._script = script
        self._proto: _ReplayProtocol | None = None
        self._pacer: RealtimePacer | FloodPacer | None = None
        self._close_timer = None
        self._closing_by_us = False
        self._started = 0.0
        self.result = CallResult(call_id=call_id, session_id=options.session_id,
                                 frames={p: 0 for p in script.perspectives})
        self.done: defer.Deferred[CallResult] = defer.Deferred()

    def start(self) -> defer.Deferred[CallResult]:
        self._started = self._now()
        try:
            self._connect()
        except Exception as e:
            self._finish(error=f"cannot connect: {e}")
        return self.done

    def _connect(self) -> None:
        url = handshake_url(self._url, self.result.call_id, self._options)
        factory = WebSocketClientFactory(url, headers=handshake_headers(self._options),
                                         reactor=self._reactor)
        factory.protocol = _ReplayProtocol
        factory.run = self
        # Explicit limits (Autobahn's defaults are unlimited): the server only ever
        # sends a close frame, so a small message cap is plenty.
        factory.setProtocolOptions(
            maxMessagePayloadSize=65536,
            maxFramePayloadSize=65536,
            openHandshakeTimeout=self._options.connect_timeout,
            closeHandshakeTimeout=5,
            serverConnectionDropTimeout=5,
            autoPingInterval=0,  # media flows every 20 ms; the server pings if it wants
            autoPingTimeout=0,
            perMessageCompressionOffers=[],
        )
        endpoint = HostnameEndpoint(self._reactor, factory.host, factory.port,
                                    timeout=self._options.connect_timeout)
        if factory.isSecure:
            creator = (_UnverifiedTLS(factory.host) if self._options.insecure
                       else optionsForClientTLS(factory.host))
            endpoint = wrapClientTLS(creator, endpoint)
        d = endpoint.connect(factory)
        d.addErrback(lambda f: self._finish(error=f"connection failed: {f.getErrorMessage()}"))

    # -- events from the protocol

    def opened(self, proto: _ReplayProtocol) -> None:
        self._proto = proto
        options = self._options
        secret = options.secret if options.secret_in == "message" else None
        if not self._send(_encode(connected_message(secret))):
            return
        if not self._send(_encode(start_message(self.result.call_id, options.session_id, options))):
            return
        count = len(self._script.ticks)
        if options.realtime:
            self._pacer = RealtimePacer(self._clock, self._now, count, self._send_tick,
                                        self._media_sent)
        else:
            self._pacer = FloodPacer(self._clock, count, self._send_tick, self._media_sent)
            proto.registerProducer(self._pacer, True)
        self._pacer.start()

    def handshake_failed(self, status_line: str | None, reason: str) -> None:
        parts = (status_line or "").split(None, 2)
        if len(parts) >= 2 and parts[1].isdigit() and parts[1] != "101":
            self.result.http_status = int(parts[1])
            self.result.http_reason = parts[2] if len(parts) > 2 else ""

    def closed(self, proto, was_clean: bool, code, reason) -> None:
        if self._proto is None:  # never opened: refused, or the handshake failed
            if self.result.http_status is None and reason:
                m = _STATUS_RE.search(reason)
                if m:
                    self.result.http_status = int(m.group(1))
                    self.result.http_reason = m.group(2).strip()
            if self.result.refused:
                self._finish()
            else:
                self._finish(error=f"handshake failed: {reason}")
            return
        if self._closing_by_us:
            self._finish(closed_by="client", code=code, reason=reason)
        elif was_clean:
            self._finish(closed_by="server", code=code, reason=reason)
        else:
            self._finish(error=f"connection lost: {reason}", code=code)

    def fail(self, failure: Failure) -> None:
        self._finish(error=f"internal error: {failure.getErrorMessage()}")

    # -- sending

    def _send(self, payload: bytes) -> bool:
        proto = self._proto
        if proto is None or proto.state != WebSocketProtocol.STATE_OPEN:
            return False  # the server closed (or is closing): onClose finishes the call
        proto.sendMessage(payload, isBinary=False)
        return True

    def _send_tick(self, n: int) -> bool:
        for perspective, nbytes, payload in self._script.ticks[n]:
            if not self._send(payload):
                return False
            self.result.frames[perspective] += 1
            self.result.media_bytes += nbytes
        return True

    def _media_sent(self) -> None:
        if isinstance(self._pacer, FloodPacer) and self._proto is not None:
            self._proto.unregisterProducer()
        end_time = rfc3339(self._clock.seconds())
        for msg in stop_messages(self._script.audio, end_time, self._options.stop_perspective):
            if not self._send(_encode(msg)):
                return
            self.result.stops += 1
        self.result.complete = True
        self._close_timer = self._clock.callLater(self._options.close_timeout, self._close_timeout)

    def _close_timeout(self) -> None:
        self._close_timer = None
        if self._proto is not None and self._proto.state == WebSocketProtocol.STATE_OPEN:
            self._closing_by_us = True
            self._proto.sendClose(1000)

    def _finish(self, closed_by: str | None = None, code=None, reason=None,
                error: str | None = None) -> None:
        if self.done.called:
            return
        if self._pacer is not None:
            self._pacer.stop()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        r = self.result
        r.closed_by, r.close_code, r.close_reason, r.error = closed_by, code, reason or None, error
        r.elapsed = self._now() - self._started
        self.done.callback(r)


@dataclass
class _Script:
    """The media of a file, encoded once and shared by every call."""

    audio: dict[str, bytes]
    perspectives: list[str]
    ticks: list[list[tuple[str, int, bytes]]]

    @classmethod
    def of(cls, audio: dict[str, bytes]) -> _Script:
        ticks = [
            [(p, len(payload), _encode(media_message(p, n, payload))) for p, n, payload in tick]
            for tick in _ticks(audio)
        ]
        return cls(audio, _perspectives(audio), ticks)


def replay(reactor, url: str, audio: dict[str, bytes], options: ReplayOptions | None = None, *,
           on_result: Callable[[CallResult], None] | None = None, clock=None,
           now: Callable[[], float] | None = None) -> defer.Deferred[list[CallResult]]:
    """Run ``options.calls`` calls streaming ``audio`` to ``url``; fires with their results.

    Never fails for a call's sake: refusals, lost connections and close codes are
    in each :class:`CallResult`.  ``on_result`` is called as each call ends.
    ``clock`` (timers, default ``reactor``) and ``now`` (monotonic seconds,
    default :func:`time.monotonic`) are for tests.
    """
    options = options or ReplayOptions()
    clock = clock or reactor
    now = now or time.monotonic
    script = _Script.of(audio)

    def one(call_id: str) -> defer.Deferred[CallResult]:
        d = _CallRun(reactor, clock, now, url, call_id, options, script).start()
        if on_result is not None:
            d.addCallback(lambda r: (on_result(r), r)[1])
        return d

    calls = []
    for n, call_id in enumerate(call_ids(options)):
        if n == 0 or options.stagger <= 0:
            calls.append(one(call_id))
        else:
            calls.append(task.deferLater(clock, n * options.stagger, one, call_id))
    return defer.gatherResults(calls, consumeErrors=True)


# -- the command line --------------------------------------------------------


def format_result(r: CallResult, close_timeout: float | None = None) -> str:
    """One line for a call: ids, frames per perspective, bytes, how it ended, elapsed."""
    head = f"callId {r.call_id} sessionId {r.session_id}: "
    if r.refused:
        return f"{head}handshake refused: HTTP {r.http_status} {r.http_reason}".rstrip() + \
            f"; {r.elapsed:.2f} s"
    if r.error and not r.media_bytes and not r.stops:  # nothing was sent: the error is the story
        return f"{head}{r.error.rstrip('.')}; {r.elapsed:.2f} s"
    frames = ", ".join(f"{p} {n}" for p, n in r.frames.items())
    sent = f"{frames} frames, {r.media_bytes} bytes, {r.stops} Stop; "
    reason = f' "{r.close_reason}"' if r.close_reason else ""
    if r.closed_by == "server":
        how = f"closed by the server: {r.close_code}{reason}"
        if not r.complete:
            how += " before all media was sent"
    elif r.closed_by == "client":
        after = f" {close_timeout:g} s" if close_timeout is not None else ""
        if r.complete:
            how = f"server accepted everything but did not close within{after}: closed by us with 1000"
        else:
            how = "closed by us before all media was sent"
    else:
        how = (r.error or "ended without a close").rstrip(".")
    return f"{head}{sent}{how}; {r.elapsed:.2f} s"


def format_summary(results: list[CallResult], elapsed: float) -> str:
    by_server = sum(1 for r in results if r.ok and r.closed_by == "server")
    by_us = sum(1 for r in results if r.ok and r.closed_by == "client")
    refused = sum(1 for r in results if r.refused)
    failed = sum(1 for r in results if not r.ok)
    frames = sum(sum(r.frames.values()) for r in results)
    nbytes = sum(r.media_bytes for r in results)
    return (
        f"{len(results)} call(s): {by_server} closed by the server with 1000, "
        f"{by_us} closed by us after the close timeout, {failed} failed"
        f"{f' ({refused} refused)' if refused else ''}; "
        f"{frames} frames, {nbytes} bytes in {elapsed:.2f} s"
    )


def _query_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key, value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evrecorder-replay",
        description="Stream an audio file to a call recorder over WebSocket, as RingCentral "
                    "Engage Voice Call Streaming would, or over gRPC, as RingCX streaming would.",
    )
    p.add_argument("file", metavar="FILE",
                   help="WAV (16-bit PCM or mu-law, mono or stereo, 8000 Hz) or raw 8 kHz mu-law")
    p.add_argument("url", metavar="URL",
                   help="ws:// or wss:// address of the recorder (Engage Voice WebSocket), or "
                        "grpc://HOST:PORT or grpcs://HOST:PORT (RingCX gRPC streaming)")
    p.add_argument("--raw", action="store_true", help="FILE is raw 8 kHz mono mu-law")
    p.add_argument("--mono-perspective", choices=[AGENT, CALLER, "both"], default=AGENT,
                   help="where mono audio goes (default %(default)s = agent)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=True,
                      help="one frame per perspective every 20 ms (default)")
    pace.add_argument("--flood", dest="realtime", action="store_false",
                      help="as fast as the connection takes it")
    p.add_argument("--calls", type=_positive_int, default=1, help="concurrent calls (default 1)")
    p.add_argument("--stagger", type=_non_negative, default=0.0,
                   help="seconds between call starts (default 0)")
    p.add_argument("--call-id", help="callId (default generated; -N appended with --calls > 1)")
    p.add_argument("--session-id", default="1", help="sessionId (default 1)")
    p.add_argument("--query", type=_query_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="extra handshake query parameter (repeatable; replaces a default)")
    p.add_argument("--secret", help="shared secret of the streaming profile (or env EVRECORDER_SECRET)")
    p.add_argument("--secret-file", help="read the secret from this file")
    p.add_argument("--secret-in", choices=["header", "query", "message"], default="header",
                   help="how the secret is sent (default header: Authorization: Bearer)")
    p.add_argument("--secret-header", metavar="NAME",
                   help="send the bare secret in this header instead of Authorization")
    p.add_argument("--stop-perspective", action="store_true",
                   help="add a perspective field to each Stop (the documented Stop has none)")
    p.add_argument("--close-timeout", type=_non_negative, default=10.0,
                   help="seconds to wait for the server to close after the Stops (default 10)")
    p.add_argument("--connect-timeout", type=_positive_float, default=10.0,
                   help="seconds for the TCP/TLS connection and the handshake (default 10)")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the server's TLS certificate (self-signed test certs)")
    p.add_argument("--quiet", action="store_true", help="print only failed calls and the summary")
    grpc_opts = p.add_argument_group("gRPC (grpc:// and grpcs://)")
    grpc_opts.add_argument("--codec", choices=["pcmu", "pcma", "l16"], default="pcmu",
                           help="audio format of the chunks (default pcmu; l16 is big-endian "
                                "at the file's rate, 8000 or 16000 Hz)")
    grpc_opts.add_argument("--ptime", type=_positive_int, default=100,
                           help="milliseconds of audio per chunk (default 100)")
    grpc_opts.add_argument("--token", help="External Credential, sent as authorization: Bearer "
                                           "TOKEN (default: the secret)")
    grpc_opts.add_argument("--ca", metavar="PEM",
                           help="trust this CA (or self-signed certificate) for grpcs://")
    grpc_opts.add_argument("--connections", type=_positive_int, default=1,
                           help="HTTP/2 connections the calls are spread over (default 1)")
    for name, default in (("ani", "2223334444"), ("dnis", "2223335555"), ("agent-id", "123"),
                          ("account-id", "99990000"), ("product-type", "Queue"),
                          ("product-id", "1234")):
        p.add_argument(f"--{name}", default=default, help=f"(default {default})")
    return p


class UsageError(Exception):
    pass


def options_from_args(args: argparse.Namespace, environ=os.environ) -> ReplayOptions:
    """ReplayOptions from parsed arguments; :class:`UsageError` for what argparse cannot check."""
    scheme = urlsplit(args.url).scheme
    if scheme not in ("ws", "wss") or not urlsplit(args.url).hostname:
        raise UsageError(f"{args.url!r} is not a ws:// or wss:// address")
    secret = args.secret
    if args.secret_file:
        try:
            with open(args.secret_file, encoding="utf-8") as f:
                secret = f.read().strip()
        except OSError as e:
            raise UsageError(f"cannot read the secret file {args.secret_file}: {e.strerror}") from None
    if secret is None:
        secret = environ.get("EVRECORDER_SECRET") or None
    return ReplayOptions(
        call_id=args.call_id, session_id=args.session_id, calls=args.calls, stagger=args.stagger,
        realtime=args.realtime, secret=secret, secret_in=args.secret_in,
        secret_header=args.secret_header, query=list(args.query),
        stop_perspective=args.stop_perspective, close_timeout=args.close_timeout,
        connect_timeout=args.connect_timeout, insecure=args.insecure, ani=args.ani,
        dnis=args.dnis, agent_id=args.agent_id, account_id=args.account_id,
        product_type=args.product_type, product_id=args.product_id,
    )


async def run(reactor, argv: list[str], out=None, err=None) -> int:
    """The whole command: returns the exit status (0 ok, 1 a call failed, 2 usage)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage message
        return int(e.code or 0)
    if urlsplit(args.url).scheme in ("grpc", "grpcs"):
        return await _run_grpc(args, out, err)
    try:
        options = options_from_args(args)
        audio = load_audio(args.file, raw=args.raw, mono_perspective=args.mono_perspective)
    except (UsageError, AudioError) as e:
        print(f"evrecorder-replay: {e}", file=err)
        return 2

    def report(r: CallResult) -> None:
        if not args.quiet or not r.ok:
            print(format_result(r, options.close_timeout), file=out, flush=True)

    started = time.monotonic()
    results = await replay(reactor, args.url, audio, options, on_result=report)
    print(format_summary(results, time.monotonic() - started), file=out, flush=True)
    return exit_status(results)


async def _run_grpc(args: argparse.Namespace, out, err) -> int:
    """The command for a grpc:// or grpcs:// target (:mod:`evrecorder.replaygrpc`)."""
    from twisted.internet.threads import deferToThread

    from evrecorder import replaygrpc

    try:
        target, tls = replaygrpc.parse_target(args.url)
        ca = None
        if args.ca:
            if not tls:
                raise UsageError("--ca is for grpcs:// addresses")
            try:
                with open(args.ca, "rb") as f:
                    ca = f.read()
            except OSError as e:
                raise UsageError(f"cannot read the CA file {args.ca}: {e.strerror}") from None
        token = args.token
        if token is None:
            token = options_from_args(
                argparse.Namespace(**{**vars(args), "url": "ws://x/"})).secret
        channels, rate = replaygrpc.load_channels(
            args.file, args.codec, args.raw, args.mono_perspective, load_audio, AudioError,
            AGENT, CALLER)
        if args.ptime > 1000:
            raise UsageError("--ptime must be at most 1000 ms")
    except (ValueError, UsageError, AudioError) as e:
        print(f"evrecorder-replay: {e}", file=err)
        return 2
    options = replaygrpc.GrpcOptions(
        target=target, tls=tls, ca=ca, token=token, codec=args.codec, ptime=args.ptime,
        calls=args.calls, connections=args.connections, realtime=args.realtime,
        stagger=args.stagger, dialog_id=args.call_id, session_id=args.session_id,
        account_id=args.account_id, agent_id=args.agent_id, ani=args.ani, dnis=args.dnis,
    )
    started = time.monotonic()
    results = await deferToThread(replaygrpc.run_in_thread, channels, rate, options, out,
                                  args.quiet)
    print(replaygrpc.format_summary(results, time.monotonic() - started), file=out, flush=True)
    return 0 if all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> None:
    """Console script entry point."""
    argv = sys.argv[1:] if argv is None else argv

    async def _main(reactor) -> None:
        status = await run(reactor, argv)
        if status:
            raise SystemExit(status)

    task.react(_main)


if __name__ == "__main__":
    main()
