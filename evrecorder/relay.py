"""Relaying a socket's call to the sibling process that records it.

Several recorder processes can share a port (``--reuse-port``) and a spool.
When a socket joins a call that a sibling owns (:mod:`evrecorder.owners`),
the process that has the socket opens one UNIX-socket connection to the
owner's relay listener and forwards what the socket carries, already checked
and decoded: the join, each Media frame (with the time it was read), Stops and
other activity.  On the owner, the relay connection is one more connection of
the call, exactly like a WebSocket of its own: Stop attribution, reconnect
grace and the end of the call treat it the same.  When the call ends, or the
owner refuses a frame, the owner says so with a close code and reason, and
the WebSocket is closed with them.

The owner acknowledges what it has written to its spool (after each read,
as for its own sockets); the relaying side keeps what is not acknowledged yet.
If the owner dies while a socket is relaying to it, or stops acknowledging
(:data:`MAX_UNACKED` messages behind: hung), the socket's call goes on from
this process: it joins the call anew (claiming it, or relaying to whoever
claimed it first), replays what the owner never acknowledged, and records
the rest.  What the dead owner had is recovered from its spool as a separate
recording, as for any crash; a frame it wrote but had not acknowledged may
then be in both recordings, never in neither.

A gRPC stream whose dialog a sibling records is relayed the same way
(:class:`RemoteDialog`): on the owner it is one more stream of the dialog,
its events carry the relaying side's arrival times, and a refusal comes back
as the close code of its kind (:data:`~evrecorder.protocol.CLOSE_CODES`),
which the gRPC door turns into the status it would have given itself.

A relaying side that is done (its socket or stream closed) keeps the relay
open until the owner has acknowledged everything, so a tail the owner never
wrote is replayed here if it dies in that moment.

Wire format: 32-bit length-prefixed messages, first byte the kind.

=====  ======================================================================
``J``  join: JSON {callId, sessionId, metadata, query, connectedAt}
``M``  media: ``>BQd`` (perspective index, sequenceId, read time), payload
``S``  Stop: JSON {metadata, perspective}
``T``  activity (a Connected message; an event the gRPC door does not know)
``D``  join a dialog: JSON {accountId, dialogId, sessionId, metadata, connectedAt}
``g``  SegmentStart: JSON {segmentId, participant, product, audioFormat, at}
``m``  SegmentMedia: ``>IHdI`` (seq, duration ms, read time, id length), id, payload
``i``  SegmentInfo: JSON {segmentId, event, data, at}
``p``  SegmentStop: JSON {segmentId, at}
``c``  the stream ended: JSON {cancelled, at, error}
``A``  owner to relay: ``>Q`` messages after the join taken and on disk so far
``E``  owner to relay: the call is over for this socket: ``>H`` code, reason
=====  ======================================================================
"""

from __future__ import annotations

import abc
import os
import secrets
import socket
import struct
from collections import deque

import orjson
from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

from evrecorder.errors import CallRejected
from evrecorder.logs import spool_problem
from evrecorder.protocol import CLOSE_CODES, CallError
from evrecorder.settings import PERSPECTIVES

log = Logger()

_MEDIA = struct.Struct(">BQd")
_CHUNK = struct.Struct(">IHdI")  # seq and duration are uint32 in the proto
_END = struct.Struct(">H")
_ACK = struct.Struct(">Q")
#: Messages relayed and not acknowledged after which the owner counts as hung
#: (10 s of both perspectives).
MAX_UNACKED = 1000
#: Seconds the oldest unacknowledged message may wait before the owner counts
#: as hung: a gRPC stream sends a tenth of a WebSocket's messages, and a
#: connection that is done sends none, so a count alone would wait too long.
ACK_TIMEOUT_SECONDS = 10.0
#: The methods that carry audio: a take-over of a finished connection with
#: none of these unconfirmed would make an empty recording.
_MEDIA_METHODS = frozenset(("media", "segment_media"))
_INDEX = {p: i for i, p in enumerate(PERSPECTIVES)}
_DIALOG_KINDS = frozenset((b"D", b"g", b"m", b"i", b"p", b"c"))
_JOINS = frozenset((b"J", b"D"))
#: A refusal's kind, from the close code the owner sent for it.
KIND_OF_CODE = {code: kind for kind, code in CLOSE_CODES.items()}
#: sun_path holds 108 bytes with the terminating NUL.
_MAX_PATH = 107


def relay_path(spool_root: str) -> str | None:
    """A fresh relay socket path in the spool; None if the path is too long."""
    name = f"{os.getpid()}-{secrets.token_hex(4)}.sock"
    path = os.path.join(spool_root, "relay", name)
    return path if len(path.encode()) <= _MAX_PATH else None


def clear_stale(relay_dir: str) -> None:
    """Remove relay sockets of processes that are gone (the pid is in the name).

    A socket whose process lives is never touched, even if it refuses
    connections: it may be a sibling between its bind and its listen.
    """
    try:
        names = os.listdir(relay_dir)
    except FileNotFoundError:
        return
    for name in names:
        pid, _, rest = name.partition("-")
        if not (rest.endswith(".sock") and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or not ours to signal): keep it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(relay_dir, name))
        except FileNotFoundError:
            pass


# -- the owner's side --------------------------------------------------------


class RelayedConnection(Int32StringReceiver):
    """On the owner: a sibling's socket, as one connection of a local call."""

    MAX_LENGTH = 1 << 20

    def __init__(self, registry):
        self.registry = registry
        self.call = None
        self._over = False  # the call is over for this socket: nothing more is taken
        self._taken = 0  # messages after the join handled
        self._acked = 0  # ... and acknowledged
        self._key = ("-", "-")  # the call's ids, once the join named them
        self._dialog = False  # the call is a gRPC dialog (relayed stream)

    def dataReceived(self, data: bytes) -> None:
        try:
            super().dataReceived(data)
        finally:
            if self._flush() and self._taken != self._acked and not self._over:
                self._acked = self._taken
                self.sendString(b"A" + _ACK.pack(self._taken))

    def _flush(self) -> bool:
        """Write what the call collected; False (and the socket refused) if that failed."""
        call = self.call
        if call is not None:
            try:
                if self._dialog:
                    call.flush()  # a failure is logged there, rate-limited
                else:
                    call.spool.flush()
            except CallRejected as e:
                self._refuse(CLOSE_CODES[e.kind], e.reason, flush=False)
                return False
            except OSError as e:
                self._spool_failed(e, flush=False)
                return False
        return True

    def _spool_failed(self, error: OSError, flush: bool = True) -> None:
        """The spool cannot be written: one sentence (this relay connection
        then ends, so it is said once), and the socket is refused with it."""
        call = self.call
        problem = spool_problem(error)
        call_id, session_id = self._key
        log.error(
            "call {call_id}/{session_id} (a socket relayed from a sibling): {problem} "
            "({strerror}, spool {spool}); the socket is closed with 1011",
            call_id=call_id, session_id=session_id, problem=problem,
            strerror=error.strerror or str(error),
            spool=self.registry.spool.root,
        )
        if call is None:
            reason = problem + ": the call is not recorded"
        else:
            reason = problem + ": no more audio of this socket can be kept"
        self._refuse(1011, reason, flush=flush)

    def stringReceived(self, msg: bytes) -> None:
        if self._over:
            return  # what the relaying side sent before it heard the call was over
        kind = msg[:1]
        if kind not in _JOINS:  # the relaying side counts what follows its join
            self._taken += 1
        try:
            if kind == b"M":
                call = self.call
                if call is None or call.ended:
                    raise CallError(1008, "Media after the call ended")
                index, seq, at = _MEDIA.unpack_from(msg, 1)
                call.media(self, PERSPECTIVES[index], seq, msg[1 + _MEDIA.size :], at)
            elif kind == b"J":
                if self.call is None:
                    j = orjson.loads(msg[1:])
                    self._key = (j["callId"], j["sessionId"])
                    self.call = self.registry.join(
                        self, j["callId"], j["sessionId"], j["metadata"], j["query"],
                        j["connectedAt"], relayed=True,
                    )
            elif kind == b"S":
                if self.call is not None and not self.call.ended:
                    j = orjson.loads(msg[1:])
                    self.call.stop(self, j["metadata"], j["perspective"])
            elif kind == b"T":
                if self.call is not None:
                    self.call.touch()
            elif kind in _DIALOG_KINDS:
                self._dialog_message(kind, msg)
            else:
                raise CallError(1011, f"relay message of unknown kind {kind!r}")
        except CallError as e:
            self._refuse(e.code, e.reason)
        except CallRejected as e:
            self._refuse(CLOSE_CODES[e.kind], e.reason)
        except OSError as e:  # the spool: the call's frames
            self._spool_failed(e, flush=False)  # a flush now would fail the same way
        except Exception:
            log.failure("a relayed message could not be handled")
            self._refuse(1011, "internal error")

    def _dialog_message(self, kind: bytes, msg: bytes) -> None:
        """A relayed gRPC stream's event, for the dialog it joined here."""
        if kind == b"D":
            if self.call is None:
                j = orjson.loads(msg[1:])
                self._key = (j["dialogId"], j["sessionId"])
                self._dialog = True
                self.call = self.registry.join_dialog(
                    self, account_id=j["accountId"], dialog_id=j["dialogId"],
                    session_id=j["sessionId"], metadata=j["metadata"],
                    connected_at=j["connectedAt"], relayed=True,
                )
            return
        dialog = self.call
        if dialog is None or not self._dialog:
            raise CallError(1008, "a dialog event before the dialog's join")
        if kind == b"m":
            seq, duration, at, n = _CHUNK.unpack_from(msg, 1)
            start = 1 + _CHUNK.size
            segment_id = msg[start:start + n].decode("utf-8", "surrogatepass")
            dialog.segment_media(self, segment_id, seq, duration, msg[start + n:], at)
            return
        j = orjson.loads(msg[1:])
        if kind == b"g":
            dialog.segment_start(self, j["segmentId"], j["participant"], j["product"],
                                 j["audioFormat"], j["at"])
        elif kind == b"i":
            dialog.segment_info(self, j["segmentId"], j["event"], j["data"], j["at"])
        elif kind == b"p":
            dialog.segment_stop(self, j["segmentId"], j["at"])
        else:  # b"c": written before the acknowledgement that follows
            if not self._flush():
                return  # refused: the stream is closed with the failure
            self.call = None
            dialog.stream_closed(self, cancelled=j["cancelled"], at=j["at"], error=j["error"])

    def _leave(self, call, error: str | None = None) -> None:
        """This connection leaves its call (the socket or stream went away)."""
        if call is None or call.ended:
            return
        if self._dialog:
            call.stream_closed(self, cancelled=True, at=self.registry.clock.seconds(),
                               error=error)
        else:
            call.detach(self)

    def _refuse(self, code: int, reason: str, flush: bool = True) -> None:
        if flush:
            self._flush()  # what was taken before this is kept
        call, self.call = self.call, None
        self._leave(call, reason)
        self.end_call(code, reason)

    def end_call(self, code: int, reason: str) -> None:
        """The call is over for this socket (Connection interface)."""
        self.call = None
        if self._over:
            return
        self._over = True
        if self.transport is not None and self.connected:
            self.sendString(b"E" + _END.pack(code) + reason.encode("utf-8"))
            self.transport.loseConnection()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.factory.conns.discard(self)
        call, self.call = self.call, None
        self._leave(call)


class RelayServerFactory(protocol.Factory):
    noisy = False  # no "Starting factory <... at 0x...>"

    def __init__(self, registry):
        self.registry = registry
        self.conns: set[RelayedConnection] = set()

    def buildProtocol(self, addr):
        p = RelayedConnection(self.registry)
        p.factory = self
        self.conns.add(p)
        return p


# -- the relaying side -------------------------------------------------------


class _NoSpool:
    """A relayed call has no spool here: the owner writes it."""

    def flush(self) -> None:
        pass


_NO_SPOOL = _NoSpool()


class _RelayClient(Int32StringReceiver):
    MAX_LENGTH = 1 << 16

    def __init__(self, remote: "RemoteCall"):
        self.remote = remote

    def stringReceived(self, msg: bytes) -> None:
        kind = msg[:1]
        if kind == b"A":
            self.remote._acked(_ACK.unpack_from(msg, 1)[0])
        elif kind == b"E":
            (code,) = _END.unpack_from(msg, 1)
            self.remote._ended_by_owner(code, msg[1 + _END.size :].decode("utf-8", "replace"))

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.remote._relay_lost()


class _Once(protocol.Factory):
    noisy = False

    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


class _Remote(abc.ABC):
    """A recording a sibling process records, as one front door's connection sees it.

    What the connection sends is relayed and kept until the owner says it is
    on its disk.  If the owner dies (or hangs) first, the recording goes on
    from this process (:meth:`_relay_lost`) with what it never confirmed.
    Subclasses name the join message, the methods the door calls, and how
    to join the recording here.
    """

    def __init__(self, registry, conn, key: tuple):
        self.registry = registry
        self.conn = conn
        self.key = key
        self._client: _RelayClient | None = None
        self._local = None  # the recording here, once the owner is gone
        self._ended = False
        self._closing = False  # the connection is done: the relay closes once all is confirmed
        # (method, args, sent at): sent, not yet on the owner's disk
        self._unacked: deque = deque()
        self._sent = 0  # messages after the join
        self._hung = False  # the owner stopped confirming: do not go back to it
        self._ack_timer = None  # a done connection's wait for the last confirmation

    @property
    def ended(self) -> bool:
        return self._local.ended if self._local is not None else self._ended

    @property
    def spool(self):
        return self._local.spool if self._local is not None else _NO_SPOOL

    @abc.abstractmethod
    def _join_message(self) -> bytes:
        """The relay's first message: the join, which the owner does not count."""

    @abc.abstractmethod
    def _join_here(self):
        """Join the recording in this process (claiming it, or relaying anew)."""

    @abc.abstractmethod
    def _what(self) -> str:
        """The recording and connection, as a log line names them."""

    def connect(self, address: str, reactor) -> None:
        """Open the relay; raises OSError when the owner cannot be reached."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A UNIX socket connects at once or fails at once (EAGAIN when the
            # owner's accept queue is full: its listener has a deep backlog).
            sock.setblocking(False)
            sock.connect(address)
            client = _RelayClient(self)
            reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, _Once(client))
        finally:
            sock.close()  # the reactor has its own copy
        self._client = client
        self.registry.remote_calls.add(self)
        client.sendString(self._join_message())

    def _send(self, msg: bytes, method: str, args: tuple) -> None:
        client = self._client
        if client is None or client.transport is None:
            return
        now = self.registry.clock.seconds()
        unacked = self._unacked
        unacked.append((method, args, now))
        if self._hung:
            return  # being taken over: kept for the replay
        self._sent += 1
        client.sendString(msg)
        if len(unacked) > MAX_UNACKED or now - unacked[0][2] > ACK_TIMEOUT_SECONDS:
            self._owner_hung()

    def _owner_hung(self) -> None:
        """The owner stopped confirming: take the connection over here."""
        log.warn(
            "{what}: the process recording it has not confirmed {n} messages for "
            "{seconds:.0f} s; taking it over here", what=self._what(), n=len(self._unacked),
            seconds=self.registry.clock.seconds() - self._unacked[0][2],
        )
        self._hung = True
        self._client.transport.abortConnection()  # _relay_lost follows

    def _ack_overdue(self) -> None:
        self._ack_timer = None
        if self._unacked and self._client is not None and self._client.transport is not None:
            self._owner_hung()

    def _acked(self, count: int) -> None:
        unacked = self._unacked
        for _ in range(min(len(unacked), count - (self._sent - len(unacked)))):
            unacked.popleft()
        if self._closing and not unacked:
            self._close_relay()

    def _done(self) -> None:
        """The connection is done: close the relay once the owner confirmed all.

        Until then it counts as a call in progress (a drain waits for it), and
        an owner that does not confirm within :data:`ACK_TIMEOUT_SECONDS` is
        taken for hung."""
        self._closing = True
        if not self._unacked:
            self.registry.remote_calls.discard(self)
            self._close_relay()
        elif self._ack_timer is None and not self._hung:
            self._ack_timer = self.registry.clock.callLater(ACK_TIMEOUT_SECONDS,
                                                            self._ack_overdue)

    def _close_relay(self) -> None:
        self._cancel_ack_timer()
        if self._client is not None and self._client.transport is not None:
            self._client.transport.loseConnection()

    def _cancel_ack_timer(self) -> None:
        if self._ack_timer is not None:
            if self._ack_timer.active():
                self._ack_timer.cancel()
            self._ack_timer = None

    # -- from the relay ----------------------------------------------------

    def _ended_by_owner(self, code: int, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        if self._closing and code not in (1000, 1001):
            # The connection had ended (its client had its answer): said here.
            log.warn(
                "{what}: the process recording it refused what was sent last, after the "
                "connection ended: {reason}", what=self._what(), reason=reason,
            )
        elif not self._closing:
            self._owner_ended(code, reason)
        self._closing = True
        self._unacked.clear()
        self.registry.remote_calls.discard(self)
        self._close_relay()

    def _owner_ended(self, code: int, reason: str) -> None:
        """The owner ended the recording for this connection, which is still open, or
        refused what it sent."""
        self.conn.end_call(code, reason)

    def _relay_lost(self) -> None:
        self._client = None
        self.registry.remote_calls.discard(self)
        self._cancel_ack_timer()
        if self._ended or self._local is not None or (self._closing and not self._unacked):
            return
        # The owner went away without ending the recording: it goes on from
        # here, with what the owner never confirmed.
        unacked = [(method, args) for method, args, _ in self._unacked]
        self._unacked = deque()
        if self._closing and not any(method in _MEDIA_METHODS for method, _ in unacked):
            # Only a Stop or an end: a recording of it here would hold no audio.
            self._ended = True
            log.warn(
                "{what}: the process recording it is gone before it confirmed the end "
                "({n} messages, no audio); its own recording is recovered from its spool",
                what=self._what(), n=len(unacked),
            )
            return
        log.warn(
            "{what}: the process recording it is gone; it goes on from here ({n} "
            "unconfirmed messages replayed)", what=self._what(), n=len(unacked),
        )
        replayed, todo = 0, unacked
        try:
            # A plain join: it claims the recording (the dead owner's claim is
            # free), or relays to whoever claimed it first.  From a hung owner,
            # whose claim still holds, the rest is recorded here as a
            # recording of its own: on disk here rather than in memory for
            # the owner.
            local = self._local = self._join_here()
            todo = self._confirmed_state(unacked) + unacked
            for method, args in todo:
                if local.ended:
                    break
                if method == "touch":
                    local.touch()
                else:
                    getattr(local, method)(self.conn, *args)
                replayed += 1
            self._flush_local(local)
            if self._closing:
                self._finish_here(local)
        except (CallError, CallRejected) as e:
            code = e.code if isinstance(e, CallError) else CLOSE_CODES[e.kind]
            lost = min(len(unacked), len(todo) - replayed)
            self._take_over_failed(code, e.reason, lost)
        except Exception:
            log.failure("{what}: taking it over failed", what=self._what())
            self._take_over_failed(1011, "internal error", None)

    def touch(self) -> None:
        """Activity (the idle timeout): a Connected message, an event the door does not know."""
        if self._local is not None:
            return self._local.touch()
        self._send(b"T", "touch", ())

    def _confirmed_state(self, unacked: list) -> list:
        """What the connection set up before and the owner confirmed, which a
        recording joined anew here must be told first (none for a socket)."""
        return []

    def _flush_local(self, local) -> None:
        local.spool.flush()

    def _finish_here(self, local) -> None:
        """The connection was done before the take-over: it leaves the recording."""

    def _take_over_failed(self, code: int, reason: str, lost: int | None) -> None:
        local, self._local = self._local, None
        self._ended = True
        if local is not None and not local.ended:
            try:
                self._flush_local(local)  # what was replayed before the failure is kept
            except (CallRejected, OSError):
                pass  # said where it failed; the recording's end writes what it can
            self._finish_here(local)
        if lost is not None:
            log.warn(
                "{what}: taking it over failed ({code}: {reason}); {n} messages the dead "
                "owner never confirmed are lost",
                what=self._what(), code=code, reason=reason, n=lost,
            )
        self._end_here(code, reason)

    def _end_here(self, code: int, reason: str) -> None:
        """End the connection for a failure found in this process."""
        self.registry.metrics.closed[code] += 1
        self.conn.end_call(code, reason)


class RemoteCall(_Remote):
    """A call a sibling process records, as a WebSocket sees it.

    It has :class:`~evrecorder.call.Call`'s interface for a connection:
    ``media``, ``stop``, ``touch``, ``detach``, ``ended``, ``spool.flush()``.
    """

    def __init__(self, registry, conn, call_id, session_id, metadata, query, connected_at):
        super().__init__(registry, conn, (call_id, session_id))
        self.call_id = call_id
        self.session_id = session_id
        self._join_args = (metadata, query, connected_at)

    def _what(self) -> str:
        return f"call {self.call_id}/{self.session_id}"

    def _join_message(self) -> bytes:
        metadata, query, connected_at = self._join_args
        return b"J" + orjson.dumps({
            "callId": self.call_id, "sessionId": self.session_id, "metadata": metadata,
            "query": query, "connectedAt": connected_at,
        })

    def _join_here(self):
        metadata, query, connected_at = self._join_args
        return self.registry.join(
            self.conn, self.call_id, self.session_id, metadata, query, connected_at,
            relayed=self._hung, takeover=True,
        )

    def _finish_here(self, local) -> None:
        local.detach(self.conn)

    def _owner_ended(self, code: int, reason: str) -> None:
        if code not in (1000, 1001):
            # The owner refused what this socket sent: said here, where the socket is.
            self.registry.metrics.closed[code] += 1
            log.warn(
                "closing relayed socket (call {call_id}/{session_id}) with {code}: {reason}",
                call_id=self.call_id, session_id=self.session_id, code=code, reason=reason,
            )
        self.conn.end_call(code, reason)

    # -- the Call interface ------------------------------------------------

    def media(self, conn, perspective: str, seq: int, payload: bytes, at: float | None = None):
        if self._local is not None:
            return self._local.media(conn, perspective, seq, payload, at)
        if at is None:
            at = self.registry.clock.seconds()
        self._send(b"M" + _MEDIA.pack(_INDEX[perspective], seq, at) + payload,
                   "media", (perspective, seq, payload, at))

    def stop(self, conn, metadata, perspective) -> None:
        if self._local is not None:
            return self._local.stop(conn, metadata, perspective)
        self._send(b"S" + orjson.dumps({"metadata": metadata, "perspective": perspective}),
                   "stop", (metadata, perspective))

    def detach(self, conn) -> None:
        if self._local is not None:
            return self._local.detach(conn)
        self._done()


class RemoteDialog(_Remote):
    """A gRPC dialog a sibling process records, as one of its streams sees it.

    It has :class:`~evrecorder.dialog.Dialog`'s interface for a stream: the
    ``segment_*`` methods, ``touch``, ``flush`` and ``stream_closed``.  Bad
    input is refused by the owner, a moment later: the stream then ends with
    the status it would have had here (``conn.refused``).
    """

    def __init__(self, registry, conn, account_id, dialog_id, session_id, metadata,
                 connected_at):
        super().__init__(registry, conn, ("grpc", account_id, dialog_id))
        self.account_id = account_id
        self.call_id = dialog_id
        self.session_id = session_id
        self._join_args = (metadata, connected_at)
        # This stream's segments as started and stopped, one entry each: a
        # take-over starts them again before it replays what is unconfirmed.
        self._starts: dict[str, tuple] = {}
        self._stops: dict[str, tuple] = {}

    def _what(self) -> str:
        return f"dialog {self.call_id} (stream {self.session_id})"

    def _confirmed_state(self, unacked: list) -> list:
        # A repeated SegmentStart with the same fields changes nothing, so
        # every start goes first; a stop only if the owner confirmed it
        # (one still unconfirmed comes after its segment's chunks).
        pending = {args[0] for method, args in unacked if method == "segment_stop"}
        return ([("segment_start", args) for args in self._starts.values()]
                + [("segment_stop", args) for sid, args in self._stops.items()
                   if sid not in pending])

    def _join_message(self) -> bytes:
        metadata, connected_at = self._join_args
        return b"D" + orjson.dumps({
            "accountId": self.account_id, "dialogId": self.call_id,
            "sessionId": self.session_id, "metadata": metadata, "connectedAt": connected_at,
        })

    def _join_here(self):
        metadata, connected_at = self._join_args
        return self.registry.join_dialog(
            self.conn, account_id=self.account_id, dialog_id=self.call_id,
            session_id=self.session_id, metadata=metadata, connected_at=connected_at,
            relayed=self._hung, takeover=True,
        )

    def _flush_local(self, local) -> None:
        local.flush()

    def _finish_here(self, local) -> None:
        # After a replayed stream end this changes nothing (it comes once).
        local.stream_closed(self.conn, cancelled=True, at=self.registry.clock.seconds())

    def _end_here(self, code: int, reason: str) -> None:
        # Counted and logged by the door, with the status of the failure's kind.
        self.conn.refused(CallRejected(KIND_OF_CODE.get(code, "internal"), reason))

    def _owner_ended(self, code: int, reason: str) -> None:
        kind = KIND_OF_CODE.get(code)
        if kind is None:
            self.conn.end_call(code, reason)
        else:
            self.conn.refused(CallRejected(kind, reason))

    # -- the Dialog interface ----------------------------------------------

    def segment_start(self, conn, segment_id, participant, product, audio_format, at) -> None:
        if self._local is not None:
            return self._local.segment_start(conn, segment_id, participant, product,
                                             audio_format, at)
        args = (segment_id, participant, product, audio_format, at)
        self._starts.setdefault(segment_id, args)
        self._send(b"g" + orjson.dumps({
            "segmentId": segment_id, "participant": participant, "product": product,
            "audioFormat": audio_format, "at": at,
        }), "segment_start", args)

    def segment_media(self, conn, segment_id, seq, duration_ms, payload, at) -> None:
        if self._local is not None:
            return self._local.segment_media(conn, segment_id, seq, duration_ms, payload, at)
        name = segment_id.encode("utf-8", "surrogatepass")
        self._send(
            b"m" + _CHUNK.pack(seq, min(duration_ms, 0xFFFF), at, len(name)) + name + payload,
            "segment_media", (segment_id, seq, duration_ms, payload, at),
        )

    def segment_info(self, conn, segment_id, event, data, at) -> None:
        if self._local is not None:
            return self._local.segment_info(conn, segment_id, event, data, at)
        self._send(b"i" + orjson.dumps({"segmentId": segment_id, "event": event, "data": data,
                                        "at": at}),
                   "segment_info", (segment_id, event, data, at))

    def segment_stop(self, conn, segment_id, at) -> None:
        if self._local is not None:
            return self._local.segment_stop(conn, segment_id, at)
        self._stops.setdefault(segment_id, (segment_id, at))
        self._send(b"p" + orjson.dumps({"segmentId": segment_id, "at": at}),
                   "segment_stop", (segment_id, at))

    def flush(self) -> None:
        if self._local is not None:
            self._local.flush()

    def stream_closed(self, conn, cancelled: bool, at: float, error: str | None = None) -> None:
        if self._local is not None:
            return self._local.stream_closed(conn, cancelled=cancelled, at=at, error=error)
        if self._closing:
            return
        self._send(b"c" + orjson.dumps({"cancelled": cancelled, "at": at, "error": error}),
                   "stream_closed", (cancelled, at, error))
        self._done()
