"""A gRPC dialog's recording: streams, segments and the spool they write.

RingCX streams a dialog (a call) over one or more gRPC streams in turn, each
carrying *segments*: one per participant (contact, agent, bot, a second
agent after a transfer), several at once, told apart by ``segment_id``.  The
gRPC door decodes the protobuf events and calls the methods below on the
reactor thread; nothing here knows about gRPC.  In short:

* :meth:`CallRegistry.join_dialog <evrecorder.call.CallRegistry.join_dialog>`
  makes or joins the recording of (account id, dialog id); each joining
  stream is numbered 0, 1, 2 ... (a ``stream`` event).
* Segments are per stream: ``(stream, segment_id)`` names one.  Each gets
  the next index in start order across the dialog (a ``segment`` event,
  written before any of its chunks) and a channel: AGENT -> "agent",
  anything else -> "caller".
* Chunks are collected in memory by :meth:`Dialog.segment_media` (the hot
  path: two dict lookups, a few comparisons, a bytearray append) and written
  to ``call.chunks`` with one ``write`` per :meth:`Dialog.flush`, which the
  door calls after each batch of events it read.  Everything else is an
  ``events.jsonl`` line written at once.
* Bad input raises :class:`~evrecorder.errors.CallRejected` and costs only
  the stream that carried it (the door ends it, then calls
  :meth:`Dialog.stream_closed`); what the dialog recorded is kept.

A dialog ends, and goes to the archiver, when

* every stream that joined has closed, and the last one closed normally with
  every segment of the dialog stopped: after ``reconnect_grace`` without a
  new stream, "stop", complete;
* every stream has closed otherwise: after ``reconnect_grace`` without a new
  stream, "disconnect", incomplete;
* no event came for ``idle_timeout`` while a stream is open: "timeout";
* it has run for ``max_call_duration``: "max-duration";
* the recorder shuts down: "shutdown".

Streams still open when it ends get ``end_call`` (and a ``streamEnd`` event
with the dialog's reason).  Until it ends, a new stream for the dialog joins
the same recording, also during the grace after its last stream closed: the
time between is silence in the file (finalize places segments by arrival).

Decisions where the contract is silent (also in README.rst):

* A SegmentStop for a segment already stopped changes nothing (a repeat).
  SegmentInfo after a segment's SegmentStop is kept: it is about the segment.
* The ``end`` event's time (the sidecar's ``endedAt``) of a dialog that
  ended after the grace ("stop", "disconnect") is when its last stream
  closed: the grace is the recorder's wait, not part of the call.  (A
  WebSocket call's "disconnect" is stamped at the end of its grace, as
  before.)
* At shutdown, a dialog whose streams had all closed (it was waiting the
  grace) ends as it would have after the grace ("stop" or "disconnect"), not
  "shutdown": nothing of it was cut.
* Events for a stream that is no longer part of the recording (it ended, or
  the dialog did) are refused as "precondition".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from evrecorder.chunkfile import CHUNK_RECORD, MAX_PAYLOAD, MAX_SEGMENTS, MAX_SEQ
from evrecorder.errors import CallRejected
from evrecorder.recording import Connection, Recording, spool_error, spool_rejection
from evrecorder.spool import CallSpool

if TYPE_CHECKING:
    from evrecorder.call import CallRegistry

log = Logger()

#: First element of a dialog's key in :attr:`CallRegistry.calls`, which
#: tells it from a WebSocket call's (callId, sessionId).
DIALOG_KEY = "grpc"
_pack_record = CHUNK_RECORD.pack
CHANNELS = ("agent", "caller")


def channel_of(participant: dict | None) -> str:
    """AGENT segments are the agent's channel; CONTACT, BOT and anything else the caller's."""
    return "agent" if participant and participant.get("type") == "AGENT" else "caller"


class _Stream:
    """One gRPC stream of the dialog, while it is open."""

    __slots__ = ("number", "session_id", "segments", "error")

    def __init__(self, number: int, session_id: str):
        self.number = number
        self.session_id = session_id
        self.segments: dict[str, _Segment] = {}
        self.error: str | None = None  # why the dialog refused its input, if it did


class _Segment:
    """A segment: its index in the dialog, its channel, whether it stopped."""

    __slots__ = ("index", "stream", "segment_id", "start", "channel", "stopped")

    def __init__(self, index: int, stream: int, segment_id: str, start: tuple, channel: str):
        self.index = index
        self.stream = stream
        self.segment_id = segment_id
        self.start = start  # (participant, product, audio_format) as started
        self.channel = channel
        self.stopped = False


class Dialog(Recording):
    """One RingCX dialog, keyed by (account id, dialog id), fed by its streams."""

    door = "grpc"
    what = "dialog"

    def __init__(
        self,
        registry: "CallRegistry",
        spool: CallSpool,
        key: tuple,
        dialog_id: str,
        session_id: str,
        metadata: dict,
        connected_at: float,
    ):
        super().__init__(registry, spool, dialog_id, session_id, metadata, connected_at)
        self.key = key
        self.account_id = key[1]
        self._streams: dict[Connection, _Stream] = {}
        self._segments: list[_Segment] = []
        self._running = 0  # segments started and not stopped
        # The latest stream end by its time, (at, normally): a stream relayed
        # from a sibling process reports its end a moment after it happened,
        # so the stream that ended last decides, not the last one heard of.
        # Read only once every stream has closed, so never while None.
        self._latest_close: tuple[float, bool] | None = None
        self.streams_joined = 0
        # Counted here, plain ints by channel: the metrics read them at
        # scrape time and take them in when the dialog ends.
        self.chunks_by_channel = dict.fromkeys(CHANNELS, 0)
        self.bytes_by_channel = dict.fromkeys(CHANNELS, 0)
        self._track(self.chunks_by_channel, self.bytes_by_channel)
        self._buffer = spool.buffer
        self._schedule()

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    # -- streams ---------------------------------------------------------

    def attach(self, conn: Connection, session_id: str, at: float) -> None:
        """A stream joins (:meth:`CallRegistry.join_dialog` calls this)."""
        if conn in self._streams:
            return
        if self.ended:
            raise CallRejected("precondition", "the dialog's recording has ended")
        number = self.streams_joined
        self._write({"event": "stream", "stream": number, "sessionId": session_id, "at": at},
                    "write a stream's start")
        self.streams_joined += 1
        self._streams[conn] = _Stream(number, session_id)
        self._detached_at = None
        self._last_activity = self._clock.seconds()

    def stream_closed(
        self, conn: Connection, cancelled: bool, at: float, error: str | None = None
    ) -> None:
        """The stream ended: normally (``cancelled=False``: the client closed its
        side), or cancelled, broken or refused (``error``: the door's reason
        for ending it, if the door ended it).  Once per stream; later calls,
        and calls for a stream the dialog already ended, change nothing."""
        stream = self._streams.pop(conn, None)
        if stream is None:
            return
        detail = error or stream.error
        reason = "stop" if not cancelled else ("error" if detail else "disconnect")
        self._write_stream_end(stream, at, reason, detail)
        now = self._clock.seconds()
        self._last_activity = now
        if self._latest_close is None or at >= self._latest_close[0]:
            self._latest_close = (at, not cancelled)
        if not self._streams and not self.ended:
            self._detached_at = now
            self._schedule()

    def _write_stream_end(self, stream: "_Stream", at: float, reason: str,
                          detail: str | None) -> None:
        """The stream's ``streamEnd`` event; a failed write is one sentence (the
        recording still ends: what is on disk is archived)."""
        try:
            self.spool.append_event(
                {"event": "streamEnd", "stream": stream.number, "at": at, "reason": reason,
                 "detail": detail}
            )
        except OSError as e:
            log.error(
                "dialog {call_id}: the end of stream {stream} could not be written to the "
                "spool: {problem} ({strerror})",
                call_id=self.call_id, stream=stream.number, **spool_error(e),
            )

    def _deadline(self) -> tuple[float, str]:
        if self._detached_at is None:
            return super()._deadline()
        # Every stream closed: the grace decides, not the idle timeout (a
        # dialog that ended well must not become "timeout" when
        # --idle-timeout is set shorter than --reconnect-grace).
        s = self._settings
        return min(
            (self._detached_at + s.reconnect_grace, self._grace_reason()),
            (self.created_at + s.max_call_duration, "max-duration"),
        )

    def _grace_reason(self) -> str:
        if self._latest_close[1] and not self._running:
            return "stop"
        return "disconnect"

    def end(self, reason: str) -> None:
        if reason == "shutdown" and not self._streams and self._detached_at is not None:
            # Every stream had closed: the dialog is over but for a reconnect,
            # which a recorder shutting down refuses anyway.
            reason = self._grace_reason()
        super().end(reason)

    def _end_time(self, reason: str) -> float:
        # Ended after the grace: the dialog ended when its last stream did
        # (the grace is the recorder's wait, not part of the call).
        if self._detached_at is not None and reason in ("stop", "disconnect"):
            return self._latest_close[0]
        return self._clock.seconds()

    def _deadline_passed(self, reason: str) -> None:
        if reason == "stop":
            log.info(
                "dialog {call_id}: complete, no new stream came within {grace} s",
                call_id=self.call_id, grace=self._settings.reconnect_grace,
            )
        else:
            log.info(
                "dialog {call_id} ends incomplete: {reason}", call_id=self.call_id, reason=reason
            )

    def _closing(self, reason: str) -> list[Connection]:
        now = self._clock.seconds()
        for stream in self._streams.values():
            self._write_stream_end(stream, now, reason, None)
        conns = list(self._streams)
        self._streams.clear()
        return conns

    def abandon(self) -> None:
        """Drop a dialog that never became a recording (its first write failed)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.end_reason = "abandoned"
        self._streams.clear()
        self.spool.remove()

    # -- events ----------------------------------------------------------

    def _stream(self, conn: Connection) -> _Stream:
        stream = self._streams.get(conn)
        if stream is None:
            raise CallRejected(
                "precondition",
                "the dialog's recording has ended" if self.ended
                else "this stream is no longer part of the dialog's recording",
            )
        return stream

    @staticmethod
    def _refuse(stream: _Stream, kind: str, reason: str) -> CallRejected:
        stream.error = reason
        return CallRejected(kind, reason)

    def _segment(self, conn: Connection, segment_id: str, what: str) -> _Segment:
        stream = self._stream(conn)
        segment = stream.segments.get(segment_id)
        if segment is None:
            raise self._refuse(
                stream, "precondition",
                f"{what} for segment {str(segment_id)[:64]!r}, which this stream did not start",
            )
        return segment

    def _write(self, event: dict, doing: str) -> None:
        try:
            self.spool.append_event(event)
        except OSError as e:
            raise spool_rejection(e, f"{doing} of dialog {self.call_id}",
                                  self._registry.spool_log) from None

    def segment_start(
        self, conn: Connection, segment_id: str, participant: dict, product: dict | None,
        audio_format: dict | None, at: float,
    ) -> None:
        """A participant's segment starts on this stream."""
        stream = self._stream(conn)
        self._last_activity = at
        start = (participant, product, audio_format)
        segment = stream.segments.get(segment_id)
        if segment is not None:
            if segment.start == start:
                return  # a repeat
            raise self._refuse(
                stream, "precondition",
                f"a second SegmentStart for segment {str(segment_id)[:64]!r} with other fields",
            )
        index = len(self._segments)
        if index > MAX_SEGMENTS:
            raise self._refuse(
                stream, "unsupported",
                f"more than {MAX_SEGMENTS + 1} segments in one dialog",
            )
        channel = channel_of(participant)
        try:
            self._write(
                {"event": "segment", "segment": index, "stream": stream.number,
                 "segmentId": segment_id, "participant": participant, "product": product,
                 "audioFormat": audio_format, "channel": channel, "at": at},
                "write a segment's start",
            )
        except (TypeError, ValueError):
            raise self._refuse(stream, "invalid", "SegmentStart cannot be kept as JSON") from None
        except CallRejected as e:
            stream.error = e.reason
            raise
        segment = _Segment(index, stream.number, segment_id, start, channel)
        self._segments.append(segment)
        stream.segments[segment_id] = segment
        self._running += 1

    def segment_media(
        self, conn: Connection, segment_id: str, seq: int, duration_ms: int, payload: bytes,
        at: float,
    ) -> None:
        """An audio chunk, read at ``at``: checked and collected, no I/O (see :meth:`flush`)."""
        # The hot path: ten chunks a second per segment.
        try:
            segment = self._streams[conn].segments[segment_id]
        except KeyError:
            self._segment(conn, segment_id, "SegmentMedia")  # raises the right refusal
            raise
        size = len(payload)
        if segment.stopped or size > MAX_PAYLOAD or not 0 <= seq <= MAX_SEQ:
            self._bad_media(conn, segment, seq, size)
        self._last_activity = at
        # As CallSpool.append_chunk, without the call.
        buf = self._buffer
        buf += _pack_record(segment.index, seq, at,
                            duration_ms if duration_ms < 0xFFFF else 0xFFFF, size)
        buf += payload
        channel = segment.channel
        self.chunks_by_channel[channel] += 1
        self.bytes_by_channel[channel] += size

    def _bad_media(self, conn: Connection, segment: _Segment, seq: int, size: int) -> None:
        stream = self._streams[conn]
        name = str(segment.segment_id)[:64]
        if segment.stopped:
            raise self._refuse(stream, "precondition",
                               f"SegmentMedia for segment {name!r} after its SegmentStop")
        if size > MAX_PAYLOAD:
            raise self._refuse(stream, "invalid",
                               f"a chunk of {size} bytes for segment {name!r} is too large "
                               f"(at most {MAX_PAYLOAD})")
        raise self._refuse(stream, "invalid", f"seq {seq} of segment {name!r} is out of range")

    def segment_info(
        self, conn: Connection, segment_id: str, event: str, data: str | None, at: float
    ) -> None:
        """A SegmentInfo event (hold, unhold ...), kept in order with its arrival time."""
        segment = self._segment(conn, segment_id, "SegmentInfo")
        self._last_activity = at
        try:
            self._write(
                {"event": "segmentInfo", "segment": segment.index, "name": event, "data": data,
                 "at": at},
                "write a SegmentInfo",
            )
        except (TypeError, ValueError):
            raise self._refuse(self._streams[conn], "invalid",
                               "SegmentInfo cannot be kept as JSON") from None
        except CallRejected as e:
            self._streams[conn].error = e.reason
            raise

    def segment_stop(self, conn: Connection, segment_id: str, at: float) -> None:
        """The participant's segment stops; a repeated stop changes nothing."""
        segment = self._segment(conn, segment_id, "SegmentStop")
        self._last_activity = at
        if segment.stopped:
            return
        try:
            self._write({"event": "segmentStop", "segment": segment.index, "at": at},
                        "write a SegmentStop")
        except CallRejected as e:
            self._streams[conn].error = e.reason
            raise
        segment.stopped = True
        self._running -= 1

    def flush(self) -> None:
        """Write every chunk collected, in one ``write``; from then on it
        survives a crash of this process.  What a failed write could not
        take stays collected (and is tried again by the next flush)."""
        try:
            self.spool.flush()
        except OSError as e:
            raise spool_rejection(e, f"write the audio of dialog {self.call_id}",
                                  self._registry.spool_log) from None
