"""Putting one perspective's frames in sequence order (the reorder window).

Frames arrive in roughly ``sequenceId`` order.  :class:`Placer` turns the
arrival-ordered stream of ``(sequenceId, payload)`` into the perspective's
timeline, a sequence of mu-law bytes with no shift:

* a frame that arrives late, but while no more than ``window`` frames with a
  higher id have arrived, is put in place ("reordered");
* a frame whose id was already placed or is waiting is dropped ("duplicates");
* a slot still empty when a frame more than ``window`` ids ahead arrives is
  filled with silence of the perspective's frame length ("missing"); should its
  frame come after all, it is dropped and counted ("late");
* the first frames may arrive out of order too: nothing is written until the
  window fills, and the lowest id seen by then is the timeline's start.

The placer keeps at most ``window + 1`` payloads.  It is pure: the spool keeps
frames in arrival order on disk and the finalizer runs the placer over them,
so a crash never loses a frame that sat in the reorder window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from evrecorder.g711 import SILENCE_BYTE

#: Bytes in a 20 ms frame of 8 kHz mu-law.
FRAME_BYTES = 160


@dataclass
class PerspectiveStats:
    """Counters of one perspective, as the sidecar reports them."""

    frames: int = 0
    """Frames put on the timeline with their audio."""
    missing: int = 0
    """Slots filled with silence because their frame never came in time."""
    duplicates: int = 0
    reordered: int = 0
    """Frames that arrived after a higher id and were still put in place."""
    late: int = 0
    """Frames that arrived after their slot was given up (dropped)."""
    first_sequence_id: int | None = None
    last_sequence_id: int | None = None
    samples: int = 0
    """Length of the timeline in samples (bytes of mu-law)."""
    mark_position: int | None = None
    """Where the marked sequenceId starts on the timeline, in samples."""

    def as_dict(self) -> dict:
        return {
            "frames": self.frames,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "late": self.late,
            "firstSequenceId": _seq_str(self.first_sequence_id),
            "lastSequenceId": _seq_str(self.last_sequence_id),
        }


def _seq_str(seq: int | None) -> str | None:
    # Sequence ids are decimal strings on the wire; the sidecar keeps that form.
    return None if seq is None else str(seq)


_SILENCE_BLOCK = SILENCE_BYTE * (1 << 16)


def _write_silence(write: Callable[[bytes], None], nbytes: int) -> None:
    """Silence in bounded blocks: a long gap never needs its size in memory."""
    while nbytes > 0:
        block = _SILENCE_BLOCK if nbytes >= len(_SILENCE_BLOCK) else SILENCE_BYTE * nbytes
        write(block)
        nbytes -= len(block)


class Placer:
    """Reorders one perspective's frames; ``write`` receives the timeline."""

    def __init__(self, window: int, write: Callable[[bytes], None], mark: int | None = None):
        if window < 1:
            raise ValueError("the reorder window must be at least one frame")
        self._window = window
        self._write = write
        self._pending: dict[int, bytes] = {}
        self._next: int | None = None  # next slot to write; None until the start is known
        self._max_seen: int | None = None
        self._frame_len = FRAME_BYTES
        self._given_up: set[int] = set()  # slots filled with silence, for "late"
        self._mark = mark
        self.stats = PerspectiveStats()

    def add(self, seq: int, payload: bytes) -> None:
        """Take the next frame in arrival order."""
        stats = self.stats
        if seq in self._pending:
            stats.duplicates += 1
            return
        if self._next is not None and seq < self._next:
            if seq in self._given_up:
                self._given_up.discard(seq)
                stats.late += 1
            else:
                stats.duplicates += 1
            return
        if self._max_seen is None or seq > self._max_seen:
            self._max_seen = seq
        else:
            stats.reordered += 1
        self._pending[seq] = payload
        self._frame_len = len(payload) or self._frame_len
        if self._max_seen - self._start() > self._window:
            self._advance(self._max_seen - self._window)

    def finish(self) -> PerspectiveStats:
        """Write everything still waiting (filling holes); return the counters."""
        if self._max_seen is not None:
            self._advance(self._max_seen + 1)
        return self.stats

    def _start(self) -> int:
        if self._next is None:
            return min(self._pending)
        return self._next

    def _advance(self, upto: int) -> None:
        """Write every slot below ``upto``."""
        if self._next is None:
            self._next = min(self._pending)
            self.stats.first_sequence_id = self._next
        stats = self.stats
        pending = self._pending
        while self._next < upto:
            payload = pending.pop(self._next, None)
            if self._next == self._mark:
                stats.mark_position = stats.samples
            if payload is not None:
                self._write(payload)
                stats.frames += 1
                stats.samples += len(payload)
                stats.last_sequence_id = self._next
                self._next += 1
                continue
            # A hole: fill it, and every empty slot after it, up to the next
            # frame we hold (or ``upto``), in one write.
            following = min(pending) if pending else upto
            end = min(following, upto)
            count = end - self._next
            if self._mark is not None and self._next < self._mark < end:
                stats.mark_position = stats.samples + (self._mark - self._next) * self._frame_len
            _write_silence(self._write, count * self._frame_len)
            stats.missing += count
            stats.samples += count * self._frame_len
            if count <= 4 * self._window:
                self._given_up.update(range(self._next, end))
            self._next = end
        # Only ids within reach of a late arrival need remembering.
        if len(self._given_up) > 8 * self._window:
            floor = self._next - 4 * self._window
            self._given_up = {s for s in self._given_up if s >= floor}
