"""The WebSocket front door: Engage Voice Call Streaming over Autobahn.

The protocol is thin: it checks the handshake (draining, secret), decodes the
JSON events and hands plain values to the :class:`~evrecorder.call.CallRegistry`.
Bad input is logged in a sentence and closes *this* socket with a close code;
nothing else is affected.

Frames: the overwhelmingly common one (a whole, final, masked text frame of
one message, while the socket is open) is parsed here, straight from the
bytes read (:meth:`RecorderProtocol._fast_read`); every other frame, and so
every protocol error and its close code, is Autobahn's.

Close codes:

=====  ==========================================================
1000   the call is complete (every perspective stopped)
1001   the call ended otherwise (timeout, max-duration, shutdown)
1003   a binary frame, an unknown event, or audio that is not 8 kHz mu-law
1007   invalid JSON, base64, sequenceId, perspective or payload size
1008   no secret before the first Media, a wrong secret in a message,
       Media before Start, a second Start with other metadata; no valid
       secret or no Start within ``--handshake-timeout`` of the handshake
1009   a message larger than ``--max-message-size`` (Autobahn), or in
       more than :data:`MAX_MESSAGE_FRAMES` frames
1011   the spool cannot be written (full, read-only): a sentence says so
=====  ==========================================================

Memory per socket is bounded whatever a client sends: a socket whose unsent
output is above the transport's buffer size is not read until it drains
(:class:`_ReadWhileDrained`), the opening handshake is cut at
:data:`MAX_HANDSHAKE_BYTES`, a message at :data:`MAX_MESSAGE_FRAMES`.
"""

from __future__ import annotations

import binascii
import json
from binascii import a2b_base64

from orjson import loads as _loads

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from OpenSSL import SSL
from twisted.internet.protocol import connectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from evrecorder import fastmask
from evrecorder.fastmask import unmask as _unmask
from evrecorder.call import Call, CallRegistry
from evrecorder.errors import CallRejected
from evrecorder.logs import RateLimit, escape_control_characters, spool_problem
from evrecorder.secrets import SecretChecker, credential
from evrecorder.settings import PERSPECTIVES, Settings

_log = Logger()

_PERSPECTIVE_SET = frozenset(PERSPECTIVES)
_CALL_ID = ("callId", "callid", "call_id")
_SESSION_ID = ("sessionId", "sessionid", "session_id")
_OPEN = WebSocketProtocol.STATE_OPEN
_NOT_UTF8 = object()
_UPGRADE_REQUIRED = (
    b"HTTP/1.1 426 Upgrade Required\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade, close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 68\r\n\r\n"
    b"This is a WebSocket endpoint for Engage Voice call streaming (ws).\r\n"
)
_NOT_TLS = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Connection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 56\r\n\r\n"
    b"This port speaks plain WebSocket (ws://), not TLS/wss.\r\n"
)
#: OpenSSL reasons a client's TLS mistake shows as, and what to tell the operator.
_TLS_HINTS = {
    "http request": "a plain-text client on a TLS port: it should use wss://",
    "unsupported protocol": "the client offers only TLS versions older than 1.2",
    "no shared cipher": "the client offers no cipher the recorder accepts",
}
#: The opening handshake (request line and headers) may be this long, as
#: twisted.web allows; a longer one is refused with HTTP 431.  Autobahn keeps
#: reading until the blank line, with no limit of its own.
MAX_HANDSHAKE_BYTES = 16 * 1024
#: A message may come in this many frames at most (1009 beyond).  Autobahn
#: bounds a message's bytes, not its frames: empty continuation frames
#: would each add to a list for as long as the message never ends.
MAX_MESSAGE_FRAMES = 1024
_CONNECTING = WebSocketProtocol.STATE_CONNECTING
_MULAW_TYPES = {"audio/x-mulaw", "audio/mulaw", "audio/basic", "audio/pcmu", "mulaw", "ulaw", "pcmu"}


#: The close code for each kind of refusal the core raises (evrecorder.errors).
CLOSE_CODES = {
    "invalid": 1007,
    "unsupported": 1003,
    "precondition": 1008,
    "capacity": 1013,
    "internal": 1011,
}


class CallError(Exception):
    """Bad input this door finds itself: ``code`` is the close code to use."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _first_values(params: dict) -> dict:
    """Query parameters verbatim: a value, or a list when repeated."""
    return {k: (v[0] if len(v) == 1 else list(v)) for k, v in params.items()}


def _without_secret(value):
    """``value`` with every ``secret`` field removed, at any depth (any case).

    Start and Stop metadata and the query are archived verbatim but for this:
    a secret is never kept, wherever a client put it.
    """
    if isinstance(value, dict):
        return {
            k: _without_secret(v) for k, v in value.items()
            if not (isinstance(k, str) and k.lower() == "secret")
        }
    if isinstance(value, list):
        return [_without_secret(v) for v in value]
    return value


def _content_type_ok(metadata: dict) -> str | None:
    """None when the stream is 8 kHz mu-law, else the reason it is not."""
    ctype = metadata.get("contentType") or metadata.get("audioContentType")
    rate = metadata.get("sampleRateHertz")
    if ctype is not None:
        base = str(ctype).split(";")[0].strip().lower()
        if base not in _MULAW_TYPES:
            return f"content type {ctype!r} is not G.711 mu-law"
    if rate is not None:
        try:
            rate_ok = int(rate) == 8000
        except (TypeError, ValueError):
            rate_ok = False
        if not rate_ok:
            return f"sample rate {rate!r} is not 8000 Hz"
    return None


def _check_text(metadata: dict, event: str) -> None:
    """Metadata is kept verbatim in UTF-8: JSON's lone surrogates cannot be."""
    try:
        json.dumps(metadata, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise CallError(1007, f"{event} metadata is not valid Unicode") from None


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")  # strict: no overlongs, no surrogates
    except UnicodeDecodeError:
        return False
    return True


def _key_part(metadata: dict, query: dict, names: tuple[str, ...]) -> str | None:
    for source in (metadata, query):
        for name in names:
            value = source.get(name)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None and value != "" and not isinstance(value, (dict, list, bool)):
                return str(value)
    return None


@implementer(IPushProducer)
class _ReadWhileDrained:
    """Reads from a socket only while what was written to it drains.

    Registered as the (streaming) producer of a socket's transport: Twisted
    pauses it when more than the transport's ``bufferSize`` (64 KiB) is
    written and unsent, and resumes it when all of that has gone to the
    kernel.  Paused, the socket is not read, so a client that never reads
    (and keeps sending pings, each owed a pong) cannot make the recorder
    queue output without bound: TCP slows it down instead.
    """

    def __init__(self, transport):
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()  # stop reading

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass  # the connection is going: nothing of ours to stop


class RecorderProtocol(WebSocketServerProtocol):
    """One WebSocket from the platform: one call, or one perspective of it."""

    factory: "RecorderFactory"

    def __init__(self):
        super().__init__()
        self._query: dict = {}
        self._authenticated = False
        self._connected_at: float | None = None
        self._call: Call | None = None
        self._start_metadata: dict | None = None
        self._peer_name = "?"
        self._max_frame_bytes = 0  # set with the factory, at the handshake
        self._received_at = 0.0
        self._fast = False  # set at onOpen: see _fast_read
        self._fast_limit = 0
        self._refusal_logged = False  # our onConnect logged why it refused
        self._admission = None  # the --handshake-timeout timer for secret and Start
        self._message_frames = 0  # frames of the message being received

    # -- handshake -------------------------------------------------------

    def connectionMade(self):
        super().connectionMade()
        self.transport.registerProducer(_ReadWhileDrained(self.transport), True)

    def onConnect(self, request):
        try:
            return self._on_connect(request)
        except ConnectionDeny:
            raise
        except Exception:
            # Autobahn would swallow this silently.
            _log.failure("handshake from {peer} failed", peer=request.peer)
            self._refusal_logged = True
            raise ConnectionDeny(500, "internal error")

    def _on_connect(self, request):
        factory = self.factory
        self._peer_name = request.peer
        self._max_frame_bytes = factory.settings.max_frame_bytes
        self._connected_at = factory.clock.seconds()
        if factory.draining:
            factory.metrics.rejected["draining"] += 1
            self._refusal_logged = True  # one line for the drain, not one a handshake
            raise ConnectionDeny(503, "draining: try another recorder")
        params = dict(request.params)
        presented = []
        auth = request.headers.get("authorization")
        if auth:
            presented.append(credential(auth))
        custom = request.headers.get(factory.settings.secret_header.lower())
        if custom:
            presented.append(custom.strip())
        presented.extend(params.pop("secret", []))
        checker = factory.secrets
        if presented:
            if checker.required and not all(checker.matches(p) for p in presented):
                _log.warn("handshake from {peer} refused: wrong secret", peer=request.peer)
                self._refusal_logged = True
                factory.metrics.rejected["secret"] += 1
                raise ConnectionDeny(403, "forbidden")
            self._authenticated = True
        else:
            self._authenticated = not checker.required
        self._query = _without_secret(_first_values(params))
        registry = factory.registry
        if len(registry.calls) >= factory.settings.max_calls and not registry.has_call(
            _key_part({}, self._query, _CALL_ID), _key_part({}, self._query, _SESSION_ID)
        ):
            _log.warn("handshake from {peer} refused: at capacity", peer=request.peer)
            self._refusal_logged = True
            factory.metrics.rejected["capacity"] += 1
            raise ConnectionDeny(503, "at capacity: try another recorder")
        return None

    def processHandshake(self):
        if self.data[:1] == b"\x16":
            # A TLS ClientHello (wss://) on this plain listener: HTTP never
            # starts with 0x16.  Say so at once, rather than let the client
            # wait for the handshake timeout.
            _log.warn(
                "a TLS handshake from {peer} on a plain ws:// listener: the client should "
                "use ws://, or the recorder listen with ssl:", peer=self.peer,
            )
            self._refusal_logged = True
            self.data = b""
            self.sendData(_NOT_TLS)
            self._drop_quietly()
            return
        super().processHandshake()

    def failHandshake(self, reason, code=400, responseHeaders=None):
        """Refuse the opening handshake with one log line, ours.

        Autobahn would add an info and a warning of its own to the warning
        ``onConnect`` already logged.  A plain GET (a browser, a load
        balancer's probe) gets a short 426, not Autobahn's HTML status page,
        and no line: nothing that wanted a WebSocket was refused.
        """
        self.wasNotCleanReason = reason
        if code == 426:
            self.sendData(_UPGRADE_REQUIRED)
        else:
            if not self._refusal_logged:
                _log.warn("handshake from {peer} refused with {code}: {reason}",
                          peer=self.peer, code=code, reason=reason)
            self.sendHttpErrorResponse(code, reason, responseHeaders)
        self._drop_quietly()

    def _drop_quietly(self) -> None:
        # Autobahn logs a drop that is not "clean" as a warning of its own.
        self.wasClean = True
        self.dropConnection(abort=False)

    def connectionLost(self, reason=connectionDone):
        if isinstance(reason.value, SSL.Error):
            # A client's TLS mistake is a warning (Autobahn logs it as an error).
            reasons = [str(r[2]) for r in reason.value.args[0] if len(r) > 2] \
                if reason.value.args and isinstance(reason.value.args[0], list) else []
            text = "; ".join(reasons) or str(reason.value)
            hints = [_TLS_HINTS[r] for r in reasons if r in _TLS_HINTS]
            _log.warn("TLS with {peer} failed: {reason}{hint}", peer=self.peer, reason=text,
                      hint=f" ({hints[0]})" if hints else "")
            self._connectionLost(reason)  # Autobahn's own, minus its log line
            return
        super().connectionLost(reason)

    # -- messages --------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's own dataReceived formats a debug line's arguments on every
        # read, even with debug off; this one goes straight to the framing.
        self._received_at = self.factory.clock.seconds()
        try:
            if self._fast and self.state == _OPEN:
                self._fast_read(data)
            else:
                self._dataReceived(data)
                if self.state == _CONNECTING:
                    self._bound_handshake()
        finally:
            call = self._call
            if call is not None:
                try:
                    call.spool.flush()  # one write per file for all this read carried
                except OSError as e:
                    self._spool_failed(e)

    def _fast_path_applies(self) -> bool:
        """Whether :meth:`_fast_read` may take this connection's frames.

        Only for a plain RFC 6455 server connection with none of Autobahn's
        per-frame extras switched on (compression, octet/frame logging, timing
        tracking), whose state the fast path would otherwise have to keep.
        """
        limits = [n for n in (self.maxMessagePayloadSize, self.maxFramePayloadSize) if n > 0]
        self._fast_limit = min(limits + [0xFFFF])
        return bool(
            self.factory.isServer
            and self.websocket_version in (8, 13)
            and self._perMessageCompress is None
            and self.applyMask
            and not self.logOctets
            and not self.logFrames
            and self.trackedTimings is None
        )

    def _fast_read(self, data: bytes) -> None:
        """Autobahn's ``_dataReceived``, with the common frames taken here.

        A frame is taken here only while the connection is open, Autobahn is
        between frames and between messages, and the frame is whole in the
        buffer, final, without RSV bits, a text frame, masked, with a
        minimally encoded 7- or 16-bit length within ``maxFramePayloadSize``
        and ``maxMessagePayloadSize``: exactly the frames Autobahn's
        ``processData`` accepts without complaint and delivers as a one-frame
        message.  Its payload goes to :meth:`_on_text`, as from Autobahn's
        ``onMessage``; its first step (``orjson.loads``) refuses invalid
        UTF-8 with 1007, as Autobahn's validator would.  Autobahn's traffic
        counters and auto-ping bookkeeping are kept as its ``processData``
        keeps them.

        Everything else goes, in order, to Autobahn's own ``consumeData``:
        from the first frame that is not like that (control, binary,
        fragment, unmasked, RSV, too large, a 64-bit length, an incomplete
        frame at the end of the read ...) to the end of the read, and all of
        the read if Autobahn is inside a fragmented message; a frame Autobahn
        began in an earlier read is finished by Autobahn, then this read goes
        on here.  So every protocol check, close code and fail-fast is
        Autobahn's.
        """
        stats = self.trafficStats
        stats.incomingOctetsWireLevel += len(data)  # as _dataReceived
        frame = self.current_frame
        if frame is not None:
            need = frame.length - self.current_frame_masker.pointer()
            self.data += data[:need]
            data = data[need:]
            self.consumeData()
            if not data:
                return
        if self.state != _OPEN or self.inside_message or self.current_frame is not None:
            self.data += data
            self.consumeData()
            return
        if self.data:
            data = self.data + data  # the start of a frame Autobahn kept
            self.data = b""
        end = len(data)
        pos = 0
        frames = octets = 0  # added to Autobahn's counters once, below
        limit = self._fast_limit
        unmask = _unmask
        on_text = self._on_text
        while end - pos >= 6:  # the shortest masked frame
            b1 = data[pos + 1]
            if data[pos] != 0x81 or b1 < 0x80:  # FIN, no RSV, text; masked
                break
            n = b1 & 0x7F
            if n < 126:
                head = pos + 6
            elif n == 126:
                head = pos + 8
                if head > end:
                    break
                n = (data[pos + 2] << 8) | data[pos + 3]
                if n < 126:  # not minimal: Autobahn fails it (1002)
                    break
            else:  # a 64-bit length: beyond any limit we take here
                break
            stop = head + n
            if stop > end or n > limit:
                break
            payload = unmask(data[head - 4:head], data[head:stop])
            pos = stop
            octets += n
            frames += 1
            if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()  # as Autobahn's onFrameEnd
            if on_text(payload) is _NOT_UTF8:
                frames -= 1  # Autobahn's validator refuses it before it is counted
            if self.state != _OPEN:
                break
        stats.incomingOctetsWebSocketLevel += octets
        stats.incomingOctetsAppLevel += octets
        stats.incomingWebSocketFrames += frames
        stats.incomingWebSocketMessages += frames
        if pos < end:
            self.data = data[pos:] if pos else data
            self.consumeData()

    # -- per-socket buffers Autobahn does not bound ----------------------

    def _bound_handshake(self) -> None:
        """Refuse an opening handshake that has grown past MAX_HANDSHAKE_BYTES
        without its blank line (HTTP 431), instead of buffering it all."""
        if len(self.data) > MAX_HANDSHAKE_BYTES:
            self.factory.metrics.rejected["too-large"] += 1
            _log.warn(
                "handshake from {peer} refused: its request headers pass {limit} bytes",
                peer=self.peer, limit=MAX_HANDSHAKE_BYTES,
            )
            self.data = b""
            self.failHandshake("Request Header Fields Too Large", 431)

    def onMessageBegin(self, isBinary):
        super().onMessageBegin(isBinary)
        self._message_frames = 0

    def onMessageFrameBegin(self, length):
        super().onMessageFrameBegin(length)
        self._message_frames += 1
        if self._message_frames > MAX_MESSAGE_FRAMES and not self.failedByMe:
            reason = f"a message in more than {MAX_MESSAGE_FRAMES} frames"
            self.factory.metrics.closed[1009] += 1
            _log.warn(
                "closing socket from {peer} with {code}: {reason}",
                peer=self._peer_name, code=1009, reason=reason,
            )
            # As Autobahn fails a message that is too large: nothing more of
            # the message is kept while the close completes.
            self._fail_connection(1009, reason)
            self.message_data = []

    def onMessageEnd(self) -> None:
        # As Autobahn's, without firing a "message" event (a Deferred per
        # message) that nothing here listens to.
        if not self.failedByMe:
            self.onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None

    def onMessage(self, payload, isBinary):
        if self.state != self.STATE_OPEN:
            return  # we are closing: what is still in flight is not ours to take
        if isBinary:
            self._bad_input(1003, "binary frames are not part of the protocol")
            return
        self._on_text(payload)

    def _on_text(self, payload: bytes) -> object:
        """A whole text message, received while the connection is open.

        Returns ``_NOT_UTF8`` if it was refused (1007) for not being UTF-8.
        """
        try:
            try:
                msg = _loads(payload)  # also refuses invalid UTF-8 (tests/test_frames.py)
            except (ValueError, RecursionError):
                if not _is_utf8(payload):
                    self._bad_input(1007, "the message is not valid UTF-8")
                    return _NOT_UTF8
                raise CallError(1007, "the message is not valid JSON") from None
            if type(msg) is not dict:
                raise CallError(1007, "the message is not a JSON object")
            event = msg.get("event")
            if event == "Media":
                self._on_media(msg)
            elif event == "Start":
                self._check_message_secret(msg)
                self._on_start(msg)
            elif event == "Stop":
                self._on_stop(msg)
            elif event == "Connected":
                self._check_message_secret(msg)
                if self._call is not None:
                    self._call.touch()
            else:
                raise CallError(1003, f"unknown event {str(event)[:40]!r}")
        except CallError as e:
            self._bad_input(e.code, e.reason)
        except CallRejected as e:
            self._bad_input(CLOSE_CODES[e.kind], e.reason)
        except OSError as e:  # the spool: a new call's entry, or a running call's frames
            self._spool_failed(e)
        except Exception:
            _log.failure("message from {peer} could not be handled", peer=self._peer_name)
            self._bad_input(1011, "internal error")

    def _bad_input(self, code: int, reason: str) -> None:
        call = self._call
        self.factory.metrics.closed[code] += 1
        _log.warn(
            "closing socket from {peer} (call {call_id}/{session_id}) with {code}: {reason}",
            peer=self._peer_name, code=code, reason=reason,
            call_id=call.call_id if call else "-", session_id=call.session_id if call else "-",
        )
        self.close_with(code, reason)

    def _check_message_secret(self, msg: dict) -> None:
        secret = msg.get("secret")
        if secret is None:
            return
        checker = self.factory.secrets
        if checker.required and not (isinstance(secret, str) and checker.matches(secret)):
            raise CallError(1008, "wrong secret")
        self._authenticated = True
        self._join()

    def _on_start(self, msg: dict) -> None:
        metadata = msg.get("metadata")
        if not isinstance(metadata, dict):
            raise CallError(1007, "Start has no metadata object")
        _check_text(metadata, "Start")
        metadata = _without_secret(metadata)
        if self._start_metadata is not None:
            if metadata != self._start_metadata:
                raise CallError(1008, "a second Start with different metadata")
            return
        problem = _content_type_ok(metadata)
        if problem:
            raise CallError(1003, problem + ": refusing to record it as noise")
        if _key_part(metadata, self._query, _CALL_ID) is None:
            raise CallError(1008, "Start names no callId (neither metadata nor query)")
        self._start_metadata = metadata
        self._join()

    def _join(self) -> None:
        """Join (or open) the call once we know who it is and may record it."""
        if self._call is not None or not self._authenticated or self._start_metadata is None:
            return
        metadata = self._start_metadata
        call_id = _key_part(metadata, self._query, _CALL_ID)
        session_id = _key_part(metadata, self._query, _SESSION_ID) or ""
        self._call = self.factory.registry.join(
            self, call_id, session_id, metadata, self._query, self._connected_at
        )
        self._admitted()

    def _on_media(self, msg: dict) -> None:
        # The hot path (100 messages a second a call): checks stay cheap.
        call = self._call
        if call is None or not self._authenticated or call.ended:
            if not self._authenticated:
                raise CallError(1008, "no secret was presented before the first Media")
            raise CallError(1008, "Media before Start" if call is None else "Media after the call ended")
        perspective = msg.get("perspective")
        if perspective not in _PERSPECTIVE_SET:
            raise CallError(1007, f"unknown perspective {str(perspective)[:40]!r}")
        seq = msg.get("sequenceId")
        if type(seq) is str and len(seq) <= 18 and seq.isdigit() and seq.isascii():
            seq = int(seq)
        elif not (type(seq) is int and 0 <= seq < 10**18):
            raise CallError(1007, f"sequenceId {str(seq)[:24]!r} is not a decimal number")
        try:
            audio = a2b_base64(msg["media"], strict_mode=True)
        except KeyError:
            raise CallError(1007, "Media has no media field") from None
        except (binascii.Error, ValueError, TypeError):
            raise CallError(1007, "media is not valid base64") from None
        size = len(audio)
        if not 0 < size <= self._max_frame_bytes:
            raise CallError(1007, f"media of {size} bytes is empty or larger than a frame may be")
        call.media(self, perspective, seq, audio, self._received_at)

    def _on_stop(self, msg: dict) -> None:
        call = self._call
        if call is None:
            if self._start_metadata is None:
                raise CallError(1008, "Stop before Start")
            return  # never authenticated: nothing was recorded
        if call.ended:
            return  # the other perspective's Stop after the call was complete
        metadata = msg.get("metadata")
        if not isinstance(metadata, dict):
            metadata = None
        else:
            _check_text(metadata, "Stop")
            metadata = _without_secret(metadata)
        perspective = msg.get("perspective")
        if perspective is None and metadata is not None:
            perspective = metadata.get("perspective")
        if perspective not in PERSPECTIVES:
            perspective = None
        call.stop(self, metadata, perspective)

    # -- the spool cannot be written --------------------------------------

    def _spool_failed(self, error: OSError) -> None:
        """A spool write failed (full disk, read-only): close 1011 with a sentence.

        A new call whose spool entry cannot be made is refused; a running
        call's socket is closed, and what reached the disk is kept and
        archived.  The log says it in one sentence, not a traceback: once a
        minute per call and kind of failure (refused calls: per kind), with
        how many more it stands for.
        """
        factory = self.factory
        problem = spool_problem(error)
        call = self._call
        if call is None:
            call_id = _key_part(self._start_metadata or {}, self._query, _CALL_ID) or "-"
            session_id = _key_part(self._start_metadata or {}, self._query, _SESSION_ID) or "-"
            left_out = factory.spool_log.allow(("refused", error.errno))
            reason = problem + ": the call is not recorded"
            text = ("call {call_id}/{session_id} is not recorded: {problem} ({strerror}, "
                    "spool {spool}); socket from {peer} closed with 1011{more}")
            more = "; {n} more calls refused likewise since the last such line"
        else:
            call_id, session_id = call.call_id, call.session_id
            left_out = factory.spool_log.allow((call_id, session_id, error.errno))
            reason = problem + ": no more audio of this socket can be kept"
            text = ("call {call_id}/{session_id}: {problem} ({strerror}, spool {spool}); "
                    "socket from {peer} closed with 1011, what reached the disk is kept{more}")
            more = "; {n} more failed writes since the last such line"
        if left_out is not None:
            _log.error(
                text, call_id=call_id, session_id=session_id, problem=problem,
                strerror=error.strerror or str(error), spool=factory.registry.spool.root,
                peer=self._peer_name, more=more.format(n=left_out) if left_out else "",
            )
        if self.state == _OPEN:
            factory.metrics.closed[1011] += 1
        self.close_with(1011, reason)

    # -- the call's side -------------------------------------------------

    def end_call(self, code: int, reason: str) -> None:
        self._call = None
        self._start_metadata = None
        self.close_with(code, reason)

    def close_with(self, code: int, reason: str) -> None:
        """Start the closing handshake with any RFC 6455 code.

        Autobahn's ``sendClose`` only lets applications send 1000 and
        3000-4999; the protocol's own codes (1001, 1003, 1007, 1008 ...) say
        exactly what went wrong, so send the close frame directly.
        """
        if self.state != self.STATE_OPEN:
            return
        data = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
        self.sendCloseFrame(code=code, reasonUtf8=data, isReply=False)

    def onClose(self, wasClean, code, reason):
        self._admitted()
        call, self._call = self._call, None
        if call is not None and not call.ended:
            call.detach(self)
        self.factory.connection_lost(self)

    def onOpen(self):
        self._fast = self._fast_path_applies()
        self.factory.connection_made(self)
        self._expect_admission()

    # -- admission: a secret and a Start within --handshake-timeout ------

    def _expect_admission(self) -> None:
        """An open socket has ``--handshake-timeout`` seconds to join a call.

        Joining takes a valid secret (when secrets are configured) and a
        Start.  A socket that has neither in time is closed with 1008, so
        sockets that never say who they are cannot pile up to
        ``--max-connections``.  (Our own timer: not cut to whole seconds as
        Autobahn's are.)
        """
        self._admission = self.factory.clock.callLater(
            self.factory.settings.handshake_timeout, self._not_admitted
        )

    def _admitted(self) -> None:
        timer, self._admission = self._admission, None
        if timer is not None and timer.active():
            timer.cancel()

    def _not_admitted(self) -> None:
        self._admission = None
        if self.state != _OPEN or self._call is not None:
            return
        seconds = self.factory.settings.handshake_timeout
        missing = "valid secret" if not self._authenticated else "Start"
        self._bad_input(1008, f"no {missing} within {seconds:g} s of the handshake")


class RecorderFactory(WebSocketServerFactory):
    """Builds protocols; holds what every socket shares."""

    protocol = RecorderProtocol
    noisy = False  # no "Starting factory <... at 0x...>"

    def __init__(self, registry: CallRegistry, settings: Settings, clock):
        super().__init__()
        self._quiet_http()
        fastmask.install()
        escape_control_characters()  # client identifiers reach the log: see evrecorder.logs
        self.registry = registry
        self.settings = settings
        self.clock = clock
        self.secrets = SecretChecker(settings.secrets)
        self.metrics = registry.metrics
        self.draining = False
        self.sockets: set[RecorderProtocol] = set()
        self.spool_log = RateLimit(clock, 60.0)  # spool failures: see _spool_failed
        self.setProtocolOptions(
            allowNullOrigin=True,
            maxMessagePayloadSize=settings.max_message_size,
            maxFramePayloadSize=settings.max_message_size,
            openHandshakeTimeout=settings.handshake_timeout,
            closeHandshakeTimeout=5,
            failByDrop=False,  # tell a misbehaving client why (1009, 1002) before dropping
            autoPingInterval=settings.ping_interval,
            autoPingTimeout=settings.ping_timeout,
            maxConnections=settings.max_connections,
        )

    def _quiet_http(self) -> None:
        """No ``Server:`` header naming Autobahn and its version, and no HTML
        status page (nor its ``?redirect=``) for a plain GET: a 426 instead."""
        self.server = None
        self.webStatus = False

    def connection_made(self, proto: RecorderProtocol) -> None:
        self.sockets.add(proto)

    def connection_lost(self, proto: RecorderProtocol) -> None:
        self.sockets.discard(proto)

    def close_all(self, code: int = 1001, reason: str = "recorder shutting down") -> None:
        for proto in list(self.sockets):
            proto.close_with(code, reason)
