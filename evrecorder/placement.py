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

Nearly every frame arrives right after the one before it.  :meth:`Placer.add_run`
takes such a run of contiguous ids at once and writes it in one block, with
no Python work per frame; its result (timeline and counters) is exactly that
of :meth:`Placer.add` called for each frame of the run in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import Callable, Sequence

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
    out_of_range: int = 0
    """Frames dropped for an id no live call could have sent (a damaged spool)."""

    def as_dict(self) -> dict:
        return {
            "frames": self.frames,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "late": self.late,
            "firstSequenceId": _seq_str(self.first_sequence_id),
            "lastSequenceId": _seq_str(self.last_sequence_id),
            # Only a damaged spool has any: the usual sidecar stays as it was.
            **({"outOfRange": self.out_of_range} if self.out_of_range else {}),
        }


def _seq_str(seq: int | None) -> str | None:
    # Sequence ids are decimal strings on the wire; the sidecar keeps that form.
    return None if seq is None else str(seq)


_SILENCE_BLOCK = SILENCE_BYTE * (1 << 16)

#: Runs shorter than this are cheaper frame by frame than as a block.
SHORT_RUN = 8


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
        pending = self._pending
        if seq in pending:
            stats.duplicates += 1
            return
        nxt = self._next
        if nxt is not None and seq < nxt:
            if seq in self._given_up:
                self._given_up.discard(seq)
                stats.late += 1
            else:
                stats.duplicates += 1
            return
        top = self._max_seen
        if top is None or seq > top:
            self._max_seen = top = seq
        else:
            stats.reordered += 1
        pending[seq] = payload
        self._frame_len = len(payload) or self._frame_len
        if nxt is None:
            if top - min(pending) > self._window:
                self._advance(top - self._window)
            return
        if top - nxt > self._window:
            upto = top - self._window
            if upto == nxt + 1 and nxt in pending and nxt != self._mark:
                # The usual step, written here rather than by _advance: one
                # slot, whose frame is held.  (_advance would end by trimming
                # the memory of given-up slots, which only an advance that
                # gives slots up can make too long.)
                payload = pending.pop(nxt)
                self._write(payload)
                stats.frames += 1
                stats.samples += len(payload)
                stats.last_sequence_id = nxt
                self._next = upto
            else:
                self._advance(upto)

    def add_run(self, first: int, payloads: Sequence[bytes], size: int) -> None:
        """Take frames ``first``, ``first + 1`` ... that arrived one after the other.

        Every payload is ``size`` bytes long.  The same as ``add(first + i,
        payloads[i])`` for each ``i`` in turn, in fewer Python steps: once
        placement has started, a frame that continues the highest id seen so
        far is never a duplicate, never reordered and never late, and moves the
        window by exactly one slot (the slot ``window + 1`` below it), so the
        run's frames can be written as a block.
        """
        count = len(payloads)
        if size <= 0 or count < SHORT_RUN:
            # Empty frames leave the frame length as it was; and a run too
            # short to pay for the block's fixed cost: one at a time.
            add = self.add
            for i in range(count):
                add(first + i, payloads[i])
            return
        i = 0
        # One at a time until placement has started and the run continues the
        # highest id seen (only a run's first frame can fail that test:
        # repeats and reordered frames are rare and take the general path).
        # The last test holds from the start on (see _continue_run) until
        # finish(); it is checked, not assumed.
        while i < count and (
            self._next is None
            or first + i != self._max_seen + 1
            or self._next != self._max_seen - self._window
        ):
            self.add(first + i, payloads[i])
            i += 1
        if i < count:
            self._continue_run(first + i, payloads, i, size)

    def _continue_run(self, seq: int, payloads: Sequence[bytes], i: int, size: int) -> None:
        """``add`` for ``payloads[i:]`` (ids from ``seq``), given that placement
        has started and ``seq == max_seen + 1``.

        Then ``next == max_seen - window`` (every advance after the start
        stops ``window`` below the highest id seen) and each frame's ``add``
        writes exactly one slot: the m-th frame of the run writes slot
        ``next + m``.  The first ``window + 1`` such slots are the ones waiting
        (a missing one becomes silence of the frame length just set, ``size``,
        counted in ``missing`` and remembered for ``late``, as ``_advance``
        does one slot at a time); the rest are frames of the run itself, which
        are written straight from it.  The run's last ``window + 1`` frames
        are left waiting.
        """
        stats = self.stats
        pending = self._pending
        mark = self._mark
        window = self._window
        start = self._next
        count = len(payloads) - i  # frames to add = slots to write
        parts: list[bytes] = []
        # Slots start .. start + n_waiting - 1 come from the frames waiting.
        n_waiting = min(count, window + 1)
        waiting = list(map(pending.pop, range(start, start + n_waiting), repeat(None)))
        if None not in waiting and not (mark is not None and start <= mark < start + n_waiting):
            parts = waiting
            nbytes = sum(map(len, waiting))
            stats.frames += n_waiting
            stats.samples += nbytes
            stats.last_sequence_id = start + n_waiting - 1
        else:
            for slot, payload in zip(range(start, start + n_waiting), waiting):
                if slot == mark:
                    stats.mark_position = stats.samples
                if payload is not None:
                    parts.append(payload)
                    stats.frames += 1
                    stats.samples += len(payload)
                    stats.last_sequence_id = slot
                    continue
                parts.append(SILENCE_BYTE * size)
                stats.missing += 1
                stats.samples += size
                given_up = self._given_up
                given_up.add(slot)
                if len(given_up) > 8 * window:
                    floor = slot + 1 - 4 * window
                    self._given_up = {s for s in given_up if s >= floor}
        # Slots after those: the run's own frames, straight through.
        direct = count - n_waiting
        if direct > 0:
            if mark is not None and seq <= mark < seq + direct:
                stats.mark_position = stats.samples + (mark - seq) * size
            parts.extend(payloads[i : i + direct])
            stats.frames += direct
            stats.samples += direct * size
            stats.last_sequence_id = seq + direct - 1
        # The run's last frames wait for the window to move on.
        keep = seq + direct
        pending.update(zip(range(keep, keep + n_waiting), payloads[i + direct :]))
        self._max_seen = seq + count - 1
        self._next = start + count
        self._frame_len = size
        self._write(b"".join(parts))

    def finish(self) -> PerspectiveStats:
        """Write everything still waiting (filling holes); return the counters."""
        if self._max_seen is not None:
            self._advance(self._max_seen + 1)
        return self.stats

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
