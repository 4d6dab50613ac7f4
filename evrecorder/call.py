"""Calls: per-call state across sockets, and the registry that keys them.

Nothing here knows about WebSockets or gRPC.  A front door hands a
:class:`CallRegistry` plain values: "this connection carries call (callId,
sessionId) with this Start metadata", "Media frame n of perspective p", "a
Stop", "the connection is gone".  A connection is any object with
``end_call(code, reason)`` (close yourself, the call is over).  Bad input is
refused with :class:`~evrecorder.errors.CallRejected`, which each door maps
to its own close code or status.

The WebSocket door's calls are :class:`Call`; the gRPC door's dialogs
(:meth:`CallRegistry.join_dialog`) are :class:`~evrecorder.dialog.Dialog`.
Both are kept in :attr:`CallRegistry.calls` (a dialog under the key
``("grpc", accountId, dialogId)``), so ``--max-calls``, the active-calls
gauge, draining and :meth:`CallRegistry.end_all` count and end them alike.

A call ends, and goes to the archiver, when:

* every perspective that sent media has stopped ("stop", complete);
* all its connections have been gone for ``reconnect_grace`` ("disconnect");
* no message came for ``idle_timeout`` ("timeout");
* it has run for ``max_call_duration`` ("max-duration");
* the recorder shuts down ("shutdown").

(:mod:`evrecorder.dialog` says when a dialog ends.)
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger

from evrecorder.dialog import DIALOG_KEY, Dialog
from evrecorder.errors import CallRejected
from evrecorder.logs import RateLimit
from evrecorder.metrics import Metrics
from evrecorder.recording import Clock, Connection, Recording, spool_error, spool_rejection
from evrecorder.settings import PERSPECTIVES, Settings
from evrecorder.spool import CallSpool, Spool

log = Logger()

FRAME_SECONDS = 0.020
#: A Stop on a socket that carried no media may end a perspective another
#: socket carries only once that perspective has sent nothing for this long.
QUIET_SECONDS = 1.0

__all__ = ["Call", "CallRegistry", "Clock", "Connection", "Dialog"]


class Call(Recording):
    """One call, keyed by (callId, sessionId), fed by one or more connections."""

    door = "websocket"
    what = "call"

    def __init__(
        self,
        registry: "CallRegistry",
        spool: CallSpool,
        call_id: str,
        session_id: str,
        metadata: dict,
        connected_at: float,
    ):
        super().__init__(registry, spool, call_id, session_id, metadata, connected_at)
        self.first_media_at: float | None = None
        self._connections: dict[Connection, set[str]] = {}
        self._first_seq: dict[str, int] = {}
        self._stopped: dict[str, dict | None] = {}
        self._max_span = registry.settings.max_sequence_span
        self._last_media: dict[str, float] = {}
        # Counted here, plain dicts (every key present): the metrics read
        # them at scrape time and take them in when the call ends.
        self.frames_by_perspective = dict.fromkeys(PERSPECTIVES, 0)
        self.bytes_by_perspective = dict.fromkeys(PERSPECTIVES, 0)
        self._track(self.frames_by_perspective, self.bytes_by_perspective)
        self.frames_received = 0
        self._schedule()

    @property
    def key(self) -> tuple[str, str]:
        return (self.call_id, self.session_id)

    @property
    def ended(self) -> bool:
        return self.end_reason is not None

    # -- connections -----------------------------------------------------

    def attach(self, conn: Connection) -> None:
        self._connections.setdefault(conn, set())
        self._detached_at = None
        self._last_activity = self._clock.seconds()

    def detach(self, conn: Connection) -> None:
        self._connections.pop(conn, None)
        if not self._connections and not self.ended:
            self._detached_at = self._clock.seconds()
            self._schedule()

    # -- events ----------------------------------------------------------

    def media(
        self, conn: Connection, perspective: str, seq: int, payload: bytes,
        at: float | None = None,
    ) -> None:
        """Take a Media frame received at ``at`` (default: now).

        A front door passes the time it *read* the frame, so frames read
        together count as arriving together even when handling them took a
        while (a late-starting perspective's offset depends on it).  The frame
        is collected in the spool; the front door calls ``spool.flush()`` when
        it has handled what it read.  Raises
        :class:`~evrecorder.errors.CallRejected` for bad input.
        """
        self._last_activity = now = self._clock.seconds() if at is None else at
        first = self._first_seq.get(perspective)
        if first is None:
            if perspective not in self.frames_by_perspective:
                # Front doors check this; one that did not gets no KeyError.
                raise CallRejected("invalid", f"unknown perspective {str(perspective)[:40]!r}")
            self._start_perspective(perspective, seq, now)
        elif not -self._max_span <= seq - first <= self._max_span:
            raise CallRejected(
                "invalid",
                f"sequenceId {seq} is out of range for {perspective} "
                f"(first was {first})",
            )
        sent = self._connections.get(conn)
        if sent is not None and perspective not in sent:
            sent.add(perspective)
        self.spool.append_frame(perspective, seq, payload)
        self.frames_received += 1
        self._last_media[perspective] = now
        self.frames_by_perspective[perspective] += 1
        self.bytes_by_perspective[perspective] += len(payload)

    def _start_perspective(self, perspective: str, seq: int, now: float) -> None:
        if self.first_media_at is None:
            self.first_media_at = now
            offset = 0
        else:
            # Whole 20 ms frames after the call's first media; frames within
            # one frame of each other start together.  A frame read *earlier*
            # than the first one handled (relayed by a sibling process, which
            # adds a hop) gets a negative offset: finalize starts the
            # recording at the earliest perspective.
            delta = now - self.first_media_at
            offset = 0 if abs(delta) < FRAME_SECONDS else round(delta / FRAME_SECONDS)
        # On disk first: if that fails, the perspective has not started.
        self.spool.append_event(
            {"event": "media", "perspective": perspective, "at": now, "offsetFrames": offset,
             "firstSequenceId": seq}
        )
        self._first_seq[perspective] = seq

    def stop(self, conn: Connection, metadata: dict | None, perspective: str | None) -> None:
        """Take a Stop.  The documented Stop names no perspective: work it out.

        A Stop counts for one running perspective: the one it names, else one
        this socket carried, else one no other live socket carries.  A Stop
        that fits none (a repeat, or a stray one on a socket that joined a
        call others carry) changes nothing: it must never end a perspective
        that is still streaming elsewhere.
        """
        now = self._clock.seconds()
        self._last_activity = now
        if perspective is None:
            perspective = self._stop_perspective(conn, now)
        elif perspective in self._stopped:
            perspective = None
        if perspective is None and self._first_seq:
            log.info(
                "call {call_id}/{session_id}: a Stop for no running perspective is ignored",
                call_id=self.call_id, session_id=self.session_id,
            )
            return
        try:
            self.spool.append_event(
                {"event": "stop", "perspective": perspective, "at": now, "metadata": metadata}
            )
        except OSError as e:
            # The Stop still ends what it ends; the recording keeps what is on disk.
            log.error(
                "call {call_id}/{session_id}: a Stop could not be written to the spool: "
                "{problem} ({strerror})",
                call_id=self.call_id, session_id=self.session_id, **spool_error(e),
            )
        if perspective is not None:
            self._stopped[perspective] = metadata
        if set(self._first_seq) <= set(self._stopped):
            # Every perspective that sent media has stopped (or none ever did).
            self.end("stop")

    def _stop_perspective(self, conn: Connection, now: float) -> str | None:
        running = [p for p in PERSPECTIVES if p in self._first_seq and p not in self._stopped]
        on_conn = [p for p in running if p in self._connections.get(conn, ())]
        if on_conn:
            return on_conn[0]
        elsewhere = set().union(*(sent for c, sent in self._connections.items() if c is not conn))
        orphans = [p for p in running if p not in elsewhere]
        if orphans:
            return orphans[0]
        # Carried by another socket that may be half-open (a reconnect whose
        # old socket is not seen dead yet): only a perspective gone quiet.
        quiet = [p for p in running if now - self._last_media.get(p, 0.0) >= QUIET_SECONDS]
        return min(quiet, key=lambda p: self._last_media.get(p, 0.0)) if quiet else None

    # -- ending ----------------------------------------------------------

    def _closing(self, reason: str) -> list[Connection]:
        conns = list(self._connections)
        self._connections.clear()
        return conns


class CallRegistry:
    """The calls in progress, by (callId, sessionId)."""

    def __init__(
        self,
        spool: Spool,
        settings: Settings,
        clock: Clock,
        on_ended: Callable[[Call], None],
        metrics: Metrics | None = None,
    ):
        self.metrics = metrics or Metrics()
        self.spool = spool
        self.settings = settings
        self.clock = clock
        #: Spool failures of gRPC dialogs: one log line a minute per kind.
        self.spool_log = RateLimit(clock)
        self._on_ended = on_ended
        self.calls: dict[tuple[str, str], Call] = {}
        #: Claims on calls when processes share the spool (CallOwners), and
        #: how to reach a sibling that owns one: ``relay(conn, address,
        #: dialog=False, **ids)`` returns a connected stand-in for the call
        #: (``RemoteCall(registry, conn, **ids)``, or ``RemoteDialog`` for a
        #: dialog), or raises OSError.  None: this process is alone.
        self.owners = None
        self.relay = None
        self.remote_calls: set = set()  # sockets relaying to a sibling right now

    def join(
        self,
        conn: Connection,
        call_id: str,
        session_id: str,
        metadata: dict,
        query: dict,
        connected_at: float,
        relayed: bool = False,
        takeover: bool = False,
    ):
        """The call for this key, created if new; ``conn`` is attached to it.

        ``takeover``: a socket already recording (relayed to a sibling that
        died or hung) continues here: it needs no new call slot.

        When a sibling process sharing the spool records the call, the
        result is a stand-in that relays to it (:mod:`evrecorder.relay`);
        ``relayed`` joins (from a sibling) are always recorded here.
        """
        key = (call_id, session_id)
        call = self.calls.get(key)
        if call is None:
            claim = None
            if self.owners is not None:
                claim = self.owners.claim(call_id, session_id)
                if not claim.owned:
                    remote = self._relay(
                        conn, claim.address, relayed, f"call {call_id}/{session_id}", "socket",
                        call_id=call_id, session_id=session_id, metadata=metadata, query=query,
                        connected_at=connected_at,
                    )
                    if remote is not None:
                        return remote
                    claim = None  # recorded here without a claim: the owner is unreachable
            try:
                if len(self.calls) >= self.settings.max_calls and not takeover:
                    raise CallRejected("capacity", f"at capacity ({self.settings.max_calls} calls)")
                header = {
                    "callId": call_id,
                    "sessionId": session_id,
                    "metadata": metadata,
                    "query": query,
                    "connectedAt": connected_at,
                    "createdAt": self.clock.seconds(),
                    # The live side's bound on ids: finalize keeps it even
                    # if a later start runs with a shorter one.
                    "maxCallDuration": self.settings.max_call_duration,
                }
                entry = self._new_entry(call_id, session_id, header, connected_at)
            except BaseException:
                if claim is not None:
                    claim.release()
                raise
            call = Call(self, entry, call_id, session_id, metadata, connected_at)
            call.claim = claim
            self.calls[key] = call
            log.info(
                "call {call_id}/{session_id} started: agent {agent_id}, ani {ani}, dnis {dnis}",
                call_id=call_id, session_id=session_id, agent_id=metadata.get("agentId", "-"),
                ani=self._phone(metadata.get("ani")), dnis=self._phone(metadata.get("dnis")),
            )
        else:
            log.info(
                "call {call_id}/{session_id}: another socket joins it",
                call_id=call_id, session_id=session_id,
            )
        call.attach(conn)
        return call

    def _new_entry(self, call_id: str, session_id: str, header: dict,
                   connected_at: float) -> CallSpool:
        """A new spool entry, locked, with its header in place (OSError if not)."""
        for attempt in range(3):
            entry = self.spool.new_call(call_id, session_id, connected_at)
            try:
                entry.create(header)
                return entry
            except FileNotFoundError:
                # A sibling's start-up scan removed the half-made entry.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def join_dialog(
        self,
        conn: Connection,
        *,
        account_id: str,
        dialog_id: str,
        session_id: str,
        metadata: dict,
        connected_at: float,
        relayed: bool = False,
        takeover: bool = False,
    ):
        """The gRPC dialog's recording, made if new; ``conn`` joins it as a stream.

        An existing recording is joined while it is in progress, which
        includes the ``reconnect_grace`` after its last stream closed: until
        then it has not gone to the archiver.  Raises
        :class:`~evrecorder.errors.CallRejected`: "capacity" when a new
        dialog would pass ``--max-calls``, "internal" when its spool entry
        cannot be made (nothing is kept then).

        When a sibling process sharing the spool records the dialog, the
        result is a stand-in that relays to it (:class:`evrecorder.relay.
        RemoteDialog`); ``relayed`` and ``takeover`` are as for :meth:`join`.
        """
        key = (DIALOG_KEY, account_id, dialog_id)
        dialog = self.calls.get(key)
        if dialog is not None:
            dialog.attach(conn, session_id, connected_at)
            log.info(
                "dialog {call_id} (account {account_id}): another stream joins it "
                "(session {session_id})",
                call_id=dialog_id, account_id=account_id, session_id=session_id,
            )
            return dialog
        claim = None
        if self.owners is not None:
            try:
                claim = self.owners.claim(account_id, dialog_id, dialog=True)
            except OSError as e:  # the spool's disk: a new entry would fail the same way
                raise spool_rejection(e, "make a spool entry for a dialog", self.spool_log) from None
            if not claim.owned:
                remote = self._relay(
                    conn, claim.address, relayed, f"dialog {dialog_id}", "stream", dialog=True,
                    account_id=account_id, dialog_id=dialog_id, session_id=session_id,
                    metadata=metadata, connected_at=connected_at,
                )
                if remote is not None:
                    return remote
                claim = None  # recorded here without a claim: the owner is unreachable
        try:
            dialog = self._new_dialog(conn, key, account_id, dialog_id, session_id, metadata,
                                      connected_at, takeover)
        except BaseException:
            if claim is not None:
                claim.release()
            raise
        dialog.claim = claim
        return dialog

    def _new_dialog(self, conn, key, account_id, dialog_id, session_id, metadata,
                    connected_at, takeover) -> Dialog:
        if len(self.calls) >= self.settings.max_calls and not takeover:
            raise CallRejected("capacity", f"at capacity ({self.settings.max_calls} calls)")
        header = {
            "source": "grpc",
            "callId": dialog_id,
            "sessionId": session_id,
            "accountId": account_id,
            "metadata": metadata,
            "query": {},
            "connectedAt": connected_at,
            "createdAt": self.clock.seconds(),
            "maxCallDuration": self.settings.max_call_duration,
        }
        try:
            entry = self._new_entry(dialog_id, session_id, header, connected_at)
        except OSError as e:
            raise spool_rejection(e, "make a spool entry for a dialog", self.spool_log) from None
        except (TypeError, ValueError):
            # The door builds the metadata from protobuf: it always serializes.
            raise CallRejected("invalid", "the dialog's metadata cannot be kept as JSON") from None
        dialog = Dialog(self, entry, key, dialog_id, session_id, metadata, connected_at)
        try:
            dialog.attach(conn, session_id, connected_at)
        except CallRejected:
            # Its first event could not be written: nothing of it is kept.
            self.metrics.fold(*dialog.counts)
            dialog.abandon()
            raise
        self.calls[key] = dialog
        log.info(
            "dialog {call_id} (account {account_id}) started (session {session_id})",
            call_id=dialog_id, account_id=account_id, session_id=session_id,
        )
        return dialog

    def _relay(self, conn, address, relayed, what, carrier, dialog=False, **ids):
        """A stand-in relaying to the sibling that owns the call, or None.

        ``what`` names the call or dialog in the log, ``carrier`` the
        connection ("socket", "stream")."""
        if relayed or not address or self.relay is None:
            reason = (
                "it came from a sibling or its owner stopped answering" if relayed
                else "it has no relay"
            )
        else:
            try:
                remote = self.relay(conn, address, dialog=dialog, **ids)
            except OSError as e:
                reason = f"its relay does not answer ({e.strerror or e})"
            else:
                self.metrics.relayed += 1
                log.info(
                    "{what}: recorded by a sibling process; this {carrier} is relayed to it",
                    what=what, carrier=carrier,
                )
                return remote
        log.warn(
            "{what}: another recorder process claims it, but {reason}: recording this "
            "{carrier} here as a recording of its own",
            what=what, reason=reason, carrier=carrier,
        )
        return None

    def _phone(self, number) -> str:
        """Phone numbers are personal data: logged masked but for the last 4 digits."""
        if number is None:
            return "-"
        number = str(number)
        if self.settings.log_phone_numbers:
            return number
        return "*" * max(0, len(number) - 4) + number[-4:]

    def has_call(self, call_id: str | None, session_id: str | None) -> bool:
        """Whether a socket for this call needs no new call slot here: the call
        is recorded here, or (both ids known) a sibling process has claimed it."""
        if any(
            len(k) == 2 and k[0] == call_id and (session_id is None or k[1] == session_id)
            for k in self.calls
        ):
            return True
        if self.owners is not None and call_id is not None and session_id is not None:
            return self.owners.claimed(call_id, session_id)
        return False

    def call_ended(self, call: Recording) -> None:
        if self.calls.get(call.key) is call:
            del self.calls[call.key]
        self.metrics.fold(*call.counts)
        if call.claim is not None:
            call.claim.release()  # a socket for this key from now on is a new recording
        if isinstance(call, Call):
            log.info(
                "call {call_id}/{session_id} ended ({reason}), {frames} frames received",
                call_id=call.call_id, session_id=call.session_id,
                reason=call.end_reason, frames=call.frames_received,
            )
        else:
            log.info(
                "dialog {call_id} (account {account_id}) ended ({reason}), {streams} streams, "
                "{segments} segments, {chunks} chunks received",
                call_id=call.call_id, account_id=call.account_id, reason=call.end_reason,
                streams=call.streams_joined, segments=call.segment_count,
                chunks=sum(call.counts[0].values()),
            )
        self._on_ended(call)

    def end_all(self, reason: str) -> None:
        for call in list(self.calls.values()):
            call.end(reason)

