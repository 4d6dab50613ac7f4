"""Calls: per-call state across sockets, and the registry that keys them.

Nothing here knows about WebSockets.  A front door (the WebSocket protocol
today, perhaps gRPC streaming later) hands a :class:`CallRegistry` plain
values: "this connection carries call (callId, sessionId) with this Start
metadata", "Media frame n of perspective p", "a Stop", "the connection is
gone".  A connection is any object with ``end_call(code, reason)`` (close
yourself, the call is over).

A call ends, and goes to the archiver, when:

* every perspective that sent media has stopped ("stop", complete);
* all its connections have been gone for ``reconnect_grace`` ("disconnect");
* no message came for ``idle_timeout`` ("timeout");
* it has run for ``max_call_duration`` ("max-duration");
* the recorder shuts down ("shutdown").
"""

from __future__ import annotations

from typing import Callable, Protocol

from twisted.logger import Logger

from evrecorder.logs import spool_problem
from evrecorder.metrics import Metrics
from evrecorder.settings import PERSPECTIVES, Settings
from evrecorder.spool import CallSpool, Spool

log = Logger()

FRAME_SECONDS = 0.020
#: A Stop on a socket that carried no media may end a perspective another
#: socket carries only once that perspective has sent nothing for this long.
QUIET_SECONDS = 1.0


def _spool_error(error: OSError) -> dict:
    """Log fields for a failed spool write: a sentence, not a traceback (a full
    disk would otherwise print one per call and failure)."""
    return {"problem": spool_problem(error), "strerror": error.strerror or str(error)}


class Connection(Protocol):
    def end_call(self, code: int, reason: str) -> None:
        """The call this connection carried is over: close."""


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(self, delay: float, f: Callable, *args, **kw): ...


class CallError(Exception):
    """Bad input on a connection: ``code`` is the WebSocket close code to use."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Call:
    """One call, keyed by (callId, sessionId), fed by one or more connections."""

    def __init__(
        self,
        registry: "CallRegistry",
        spool: CallSpool,
        call_id: str,
        session_id: str,
        metadata: dict,
        connected_at: float,
    ):
        self._registry = registry
        self._clock = registry.clock
        self._settings = registry.settings
        self.spool = spool
        self.call_id = call_id
        self.session_id = session_id
        self.metadata = metadata
        self.connected_at = connected_at
        self.created_at = self._clock.seconds()
        self.first_media_at: float | None = None
        self.ended_at: float | None = None
        self.end_reason: str | None = None
        self._connections: dict[Connection, set[str]] = {}
        self._first_seq: dict[str, int] = {}
        self._stopped: dict[str, dict | None] = {}
        self._max_span = registry.settings.max_sequence_span
        self._last_media: dict[str, float] = {}
        # Counted here, plain dicts (every key present): the metrics read
        # them at scrape time and take them in when the call ends.
        self._metrics = registry.metrics
        self.frames_by_perspective = dict.fromkeys(PERSPECTIVES, 0)
        self.bytes_by_perspective = dict.fromkeys(PERSPECTIVES, 0)
        self._metrics.track(self.frames_by_perspective, self.bytes_by_perspective)
        self._last_activity = self.created_at
        self._detached_at: float | None = None
        self._timer = None
        self.frames_received = 0
        self.claim = None  # this process's claim on the call (owners.Claim)
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
        it has handled what it read.  Raises :class:`CallError` for bad input.
        """
        self._last_activity = now = self._clock.seconds() if at is None else at
        first = self._first_seq.get(perspective)
        if first is None:
            if perspective not in self.frames_by_perspective:
                # Front doors check this; one that did not gets no KeyError.
                raise CallError(1007, f"unknown perspective {str(perspective)[:40]!r}")
            self._start_perspective(perspective, seq, now)
        elif not -self._max_span <= seq - first <= self._max_span:
            raise CallError(
                1007,
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
                call_id=self.call_id, session_id=self.session_id, **_spool_error(e),
            )
        if perspective is not None:
            self._stopped[perspective] = metadata
        if set(self._first_seq) <= set(self._stopped):
            # Every perspective that sent media has stopped (or none ever did).
            self.end("stop")

    def touch(self) -> None:
        """Any message counts as activity for the idle timeout."""
        self._last_activity = self._clock.seconds()

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

    @property
    def complete(self) -> bool:
        return self.end_reason == "stop"

    # -- ending ----------------------------------------------------------

    def end(self, reason: str) -> None:
        if self.ended:
            return
        self.end_reason = reason
        self.ended_at = self._clock.seconds()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        try:
            self.spool.append_event(
                {"event": "end", "reason": reason, "complete": self.complete, "at": self.ended_at}
            )
        except OSError as e:
            log.error(
                "call {call_id}/{session_id}: its end could not be written to the spool: "
                "{problem} ({strerror})",
                call_id=self.call_id, session_id=self.session_id, **_spool_error(e),
            )
        try:
            self.spool.close()
        except OSError as e:
            # What reached the disk is still finalized and archived below.
            log.error(
                "call {call_id}/{session_id}: its last frames could not be written: "
                "{problem} ({strerror})",
                call_id=self.call_id, session_id=self.session_id, **_spool_error(e),
            )
        for conn in list(self._connections):
            conn.end_call(1000 if reason == "stop" else 1001, "call ended: " + reason)
        self._connections.clear()
        self._registry.call_ended(self)

    def _deadline(self) -> tuple[float, str]:
        s = self._settings
        candidates = [
            (self._last_activity + s.idle_timeout, "timeout"),
            (self.created_at + s.max_call_duration, "max-duration"),
        ]
        if self._detached_at is not None:
            candidates.append((self._detached_at + s.reconnect_grace, "disconnect"))
        return min(candidates)

    def _schedule(self) -> None:
        # One timer per call, re-armed lazily: messages only move
        # _last_activity, they never touch the reactor's timer heap.
        when, _ = self._deadline()
        delay = max(0.0, when - self._clock.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= when:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        if self.ended:
            return
        when, reason = self._deadline()
        if self._clock.seconds() >= when:
            log.info(
                "call {call_id}/{session_id} ends without Stop: {reason}",
                call_id=self.call_id, session_id=self.session_id, reason=reason,
            )
            self.end(reason)
        else:
            self._schedule()


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
        self._on_ended = on_ended
        self.calls: dict[tuple[str, str], Call] = {}
        #: Claims on calls when processes share the spool (CallOwners), and
        #: how to reach a sibling that owns one: ``relay(conn, address, call_id,
        #: session_id, metadata, query, connected_at)`` returns a stand-in for
        #: the call, or raises OSError.  None: this process is alone.
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
                    remote = self._relay(conn, claim.address, call_id, session_id, metadata,
                                         query, connected_at, relayed)
                    if remote is not None:
                        return remote
                    claim = None  # recorded here without a claim: the owner is unreachable
            try:
                if len(self.calls) >= self.settings.max_calls and not takeover:
                    raise CallError(1013, f"at capacity ({self.settings.max_calls} calls)")
                header = {
                    "callId": call_id,
                    "sessionId": session_id,
                    "metadata": metadata,
                    "query": query,
                    "connectedAt": connected_at,
                    "createdAt": self.clock.seconds(),
                }
                for attempt in range(3):
                    entry = self.spool.new_call(call_id, session_id, connected_at)
                    try:
                        entry.create(header)
                        break
                    except FileNotFoundError:
                        # A sibling's start-up scan removed the half-made entry.
                        if attempt == 2:
                            raise
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

    def _relay(self, conn, address, call_id, session_id, metadata, query, connected_at,
               relayed):
        """A stand-in relaying to the sibling that owns the call, or None."""
        if relayed or not address or self.relay is None:
            reason = (
                "it came from a sibling or its owner stopped answering" if relayed
                else "it has no relay"
            )
        else:
            try:
                remote = self.relay(conn, address, call_id, session_id, metadata, query,
                                    connected_at)
            except OSError as e:
                reason = f"its relay does not answer ({e.strerror or e})"
            else:
                self.metrics.relayed += 1
                log.info(
                    "call {call_id}/{session_id}: recorded by a sibling process; this socket "
                    "is relayed to it",
                    call_id=call_id, session_id=session_id,
                )
                return remote
        log.warn(
            "call {call_id}/{session_id}: another recorder process claims it, but {reason}: "
            "recording this socket here as a recording of its own",
            call_id=call_id, session_id=session_id, reason=reason,
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
        if any(k[0] == call_id and (session_id is None or k[1] == session_id) for k in self.calls):
            return True
        if self.owners is not None and call_id is not None and session_id is not None:
            return self.owners.claimed(call_id, session_id)
        return False

    def call_ended(self, call: Call) -> None:
        if self.calls.get(call.key) is call:
            del self.calls[call.key]
        self.metrics.fold(call.frames_by_perspective, call.bytes_by_perspective)
        if call.claim is not None:
            call.claim.release()  # a socket for this key from now on is a new recording
        log.info(
            "call {call_id}/{session_id} ended ({reason}), {frames} frames received",
            call_id=call.call_id, session_id=call.session_id,
            reason=call.end_reason, frames=call.frames_received,
        )
        self._on_ended(call)

    def end_all(self, reason: str) -> None:
        for call in list(self.calls.values()):
            call.end(reason)
