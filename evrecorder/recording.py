"""What every recording in progress shares, whichever front door feeds it.

A WebSocket call (:class:`evrecorder.call.Call`) and a gRPC dialog
(:class:`evrecorder.dialog.Dialog`) differ in what they take, but they end
alike: one timer per recording, re-armed lazily, fires at the earliest of

* ``idle_timeout`` after the last message ("timeout");
* ``max_call_duration`` after the recording was made ("max-duration");
* ``reconnect_grace`` after its last connection went away (the kind of
  recording says with which reason);

and :meth:`Recording.end` writes the ``end`` event, closes the spool entry,
tells every connection still open (``end_call``) and hands the recording to
the registry, which hands it to the archiver.

A connection is any object with ``end_call(code, reason)``: code 1000 when
the recording is complete, 1001 when it ended otherwise; ``reason`` is
``"call ended: <endReason>"``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Callable, Protocol

from twisted.logger import Logger

from evrecorder.errors import CallRejected
from evrecorder.spool import CallSpool

if TYPE_CHECKING:
    from evrecorder.call import CallRegistry

log = Logger()


class Connection(Protocol):
    def end_call(self, code: int, reason: str) -> None:
        """The call this connection carried is over: close."""


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(self, delay: float, f: Callable, *args, **kw): ...


def spool_rejection(e: OSError, doing: str) -> CallRejected:
    """A spool failure, logged (our fault), as the refusal a door reports."""
    log.error("cannot {doing}: {reason}", doing=doing, reason=e.strerror or str(e))
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CallRejected("internal", "the recorder's spool is full")
    return CallRejected("internal", "the recorder cannot write to its spool")


class Recording:
    """One recording in progress: its spool entry, timer, counts and end.

    Subclasses set ``counts`` (two dicts of plain ints by label, media units
    and bytes, which the metrics read at scrape time and take in when the
    recording ends), call :meth:`_schedule` once built, and fill in
    :meth:`_closing` and :meth:`_grace_reason`.
    """

    #: The front door that feeds this kind of recording (a metrics label).
    door = ""
    #: What a log line calls it.
    what = "recording"

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
        self.ended_at: float | None = None
        self.end_reason: str | None = None
        self._metrics = registry.metrics
        self._last_activity = self.created_at
        self._detached_at: float | None = None
        self._timer = None
        self.claim = None  # this process's claim on the recording (owners.Claim)
        self.counts: tuple[dict, dict] = ({}, {})

    def _track(self, units: dict, nbytes: dict) -> None:
        """Count media in these two dicts (every key present from the start)."""
        self.counts = (units, nbytes)
        self._metrics.track(units, nbytes)

    @property
    def ended(self) -> bool:
        return self.end_reason is not None

    @property
    def complete(self) -> bool:
        return self.end_reason == "stop"

    def touch(self) -> None:
        """Any message counts as activity for the idle timeout."""
        self._last_activity = self._clock.seconds()

    # -- ending ----------------------------------------------------------

    def _closing(self, reason: str) -> list[Connection]:
        """The recording ends: the connections still open, forgotten here."""
        raise NotImplementedError

    def _end_time(self, reason: str) -> float:
        """When the recording ended, for its ``end`` event: now."""
        return self._clock.seconds()

    def _grace_reason(self) -> str:
        """The endReason when no connection came back within the grace."""
        return "disconnect"

    def end(self, reason: str) -> None:
        if self.ended:
            return
        self.end_reason = reason
        self.ended_at = self._end_time(reason)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        conns = self._closing(reason)
        try:
            self.spool.append_event(
                {"event": "end", "reason": reason, "complete": self.complete, "at": self.ended_at}
            )
        except OSError:
            log.failure(
                "{what} {call_id}/{session_id}: its end could not be written to the spool",
                what=self.what, call_id=self.call_id, session_id=self.session_id,
            )
        try:
            self.spool.close()
        except OSError:
            # What reached the disk is still finalized and archived below.
            log.failure(
                "{what} {call_id}/{session_id}: its last frames could not be written",
                what=self.what, call_id=self.call_id, session_id=self.session_id,
            )
        for conn in conns:
            conn.end_call(1000 if reason == "stop" else 1001, "call ended: " + reason)
        self._registry.call_ended(self)

    def _deadline(self) -> tuple[float, str]:
        s = self._settings
        candidates = [
            (self._last_activity + s.idle_timeout, "timeout"),
            (self.created_at + s.max_call_duration, "max-duration"),
        ]
        if self._detached_at is not None:
            candidates.append((self._detached_at + s.reconnect_grace, self._grace_reason()))
        return min(candidates)

    def _schedule(self) -> None:
        # One timer per recording, re-armed lazily: messages only move
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
            self._deadline_passed(reason)
            self.end(reason)
        else:
            self._schedule()

    def _deadline_passed(self, reason: str) -> None:
        log.info(
            "{what} {call_id}/{session_id} ends without Stop: {reason}",
            what=self.what, call_id=self.call_id, session_id=self.session_id, reason=reason,
        )
