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

Wire format: 32-bit length-prefixed messages, first byte the kind.

=====  ======================================================================
``J``  join: JSON {callId, sessionId, metadata, query, connectedAt}
``M``  media: ``>BQd`` (perspective index, sequenceId, read time), payload
``S``  Stop: JSON {metadata, perspective}
``T``  activity (a Connected message)
``A``  owner to relay: ``>Q`` messages after the join taken and on disk so far
``E``  owner to relay: the call is over for this socket: ``>H`` code, reason
=====  ======================================================================
"""

from __future__ import annotations

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
from evrecorder.protocol import CLOSE_CODES, CallError
from evrecorder.settings import PERSPECTIVES

log = Logger()

_MEDIA = struct.Struct(">BQd")
_END = struct.Struct(">H")
_ACK = struct.Struct(">Q")
#: Messages relayed and not acknowledged after which the owner counts as hung
#: (10 s of both perspectives).
MAX_UNACKED = 1000
_INDEX = {p: i for i, p in enumerate(PERSPECTIVES)}
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
                call.spool.flush()
            except OSError:
                log.failure("writing a relayed call to the spool failed")
                self._refuse(1011, "the recorder cannot write to its spool", flush=False)
                return False
        return True

    def stringReceived(self, msg: bytes) -> None:
        if self._over:
            return  # what the relaying side sent before it heard the call was over
        kind = msg[:1]
        if kind != b"J":
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
            else:
                raise CallError(1011, f"relay message of unknown kind {kind!r}")
        except CallError as e:
            self._refuse(e.code, e.reason)
        except CallRejected as e:
            self._refuse(CLOSE_CODES[e.kind], e.reason)
        except Exception:
            log.failure("a relayed message could not be handled")
            self._refuse(1011, "internal error")

    def _refuse(self, code: int, reason: str, flush: bool = True) -> None:
        if flush:
            self._flush()  # what was taken before this is kept
        call, self.call = self.call, None
        if call is not None and not call.ended:
            call.detach(self)
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
        if call is not None and not call.ended:
            call.detach(self)


class RelayServerFactory(protocol.Factory):
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
    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


class RemoteCall:
    """A call a sibling process records, as the front door sees it.

    It has :class:`~evrecorder.call.Call`'s interface for a connection:
    ``media``, ``stop``, ``touch``, ``detach``, ``ended``, ``spool.flush()``.
    """

    def __init__(self, registry, conn, call_id, session_id, metadata, query, connected_at):
        self.registry = registry
        self.conn = conn
        self.call_id = call_id
        self.session_id = session_id
        self._join_args = (metadata, query, connected_at)
        self._client: _RelayClient | None = None
        self._local = None  # the call here, once the owner is gone
        self._ended = False
        self._closing = False
        self._unacked: deque = deque()  # (kind, args) sent, not yet on the owner's disk
        self._sent = 0  # messages after the join
        self._hung = False  # the owner stopped confirming: do not go back to it

    @property
    def key(self) -> tuple[str, str]:
        return (self.call_id, self.session_id)

    @property
    def ended(self) -> bool:
        return self._local.ended if self._local is not None else self._ended

    @property
    def spool(self):
        return self._local.spool if self._local is not None else _NO_SPOOL

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
        metadata, query, connected_at = self._join_args
        client.sendString(b"J" + orjson.dumps({
            "callId": self.call_id, "sessionId": self.session_id, "metadata": metadata,
            "query": query, "connectedAt": connected_at,
        }))

    def _send(self, msg: bytes, kind: str, args: tuple) -> None:
        client = self._client
        if client is None or client.transport is None:
            return
        self._unacked.append((kind, args))
        if self._hung:
            return  # being taken over: kept for the replay
        self._sent += 1
        client.sendString(msg)
        if len(self._unacked) > MAX_UNACKED:
            log.warn(
                "call {call_id}/{session_id}: the process recording it has not confirmed "
                "{n} messages; taking the call over here",
                call_id=self.call_id, session_id=self.session_id, n=len(self._unacked),
            )
            self._hung = True
            client.transport.abortConnection()  # _relay_lost follows

    def _acked(self, count: int) -> None:
        unacked = self._unacked
        for _ in range(min(len(unacked), count - (self._sent - len(unacked)))):
            unacked.popleft()

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

    def touch(self) -> None:
        if self._local is not None:
            return self._local.touch()
        self._send(b"T", "touch", ())

    def detach(self, conn) -> None:
        if self._local is not None:
            return self._local.detach(conn)
        self._closing = True
        self.registry.remote_calls.discard(self)
        if self._client is not None and self._client.transport is not None:
            self._client.transport.loseConnection()

    # -- from the relay ----------------------------------------------------

    def _ended_by_owner(self, code: int, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._closing = True
        self._unacked.clear()
        self.registry.remote_calls.discard(self)
        if code not in (1000, 1001):
            # The owner refused what this socket sent: said here, where the socket is.
            self.registry.metrics.closed[code] += 1
            log.warn(
                "closing relayed socket (call {call_id}/{session_id}) with {code}: {reason}",
                call_id=self.call_id, session_id=self.session_id, code=code, reason=reason,
            )
        self.conn.end_call(code, reason)
        if self._client is not None and self._client.transport is not None:
            self._client.transport.loseConnection()

    def _relay_lost(self) -> None:
        self._client = None
        self.registry.remote_calls.discard(self)
        if self._closing or self._local is not None:
            return
        # The owner went away without ending the call: the call goes on from
        # here, with what the owner never confirmed.
        unacked, self._unacked = list(self._unacked), deque()
        log.warn(
            "call {call_id}/{session_id}: the process recording it is gone; this socket's "
            "audio goes on from here ({n} unconfirmed messages replayed)",
            call_id=self.call_id, session_id=self.session_id, n=len(unacked),
        )
        metadata, query, connected_at = self._join_args
        try:
            # A plain join: it claims the call (the dead owner's claim is free),
            # or relays to whoever claimed it first.  From a hung owner, whose
            # claim still holds, the rest is recorded here as a recording of
            # its own: on disk here rather than in memory for the owner.
            local = self.registry.join(
                self.conn, self.call_id, self.session_id, metadata, query, connected_at,
                relayed=self._hung, takeover=True,
            )
            self._local = local
            for kind, args in unacked:
                if local.ended:
                    break
                getattr(local, kind)(*((self.conn,) if kind != "touch" else ()), *args)
            local.spool.flush()
        except (CallError, CallRejected) as e:
            code = e.code if isinstance(e, CallError) else CLOSE_CODES[e.kind]
            local, self._local = self._local, None
            self._ended = True
            if local is not None and not local.ended:
                local.detach(self.conn)
            self.registry.metrics.closed[code] += 1
            log.warn(
                "call {call_id}/{session_id}: taking the call over failed ({code}: {reason}); "
                "{n} messages the dead owner never confirmed are lost",
                call_id=self.call_id, session_id=self.session_id, code=code,
                reason=e.reason, n=len(unacked),
            )
            self.conn.end_call(code, e.reason)
        except Exception:
            log.failure(
                "call {call_id}/{session_id}: taking the call over failed",
                call_id=self.call_id, session_id=self.session_id,
            )
            local, self._local = self._local, None
            self._ended = True
            if local is not None and not local.ended:
                local.detach(self.conn)
            self.registry.metrics.closed[1011] += 1
            self.conn.end_call(1011, "internal error")
