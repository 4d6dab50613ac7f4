"""Finalizing a gRPC recording: segments to one stereo WAV and its sidecar.

A RingCX dialog (:mod:`evrecorder.chunkfile` for the spool entry's format)
is any number of *segments*, one per participant and stream, each with its
own ``seq`` numbers, codec and arrival times.  :func:`finalize_grpc` turns
the entry into ``recording.wav`` and ``sidecar.json`` (DESIGN.md, "The gRPC
front door"); :func:`evrecorder.finalize.finalize` calls it for an entry whose
``call.json`` says ``"source": "grpc"``.  It runs in a worker thread.

Steps, each with bounded memory (a 4-hour dialog never needs its size in RAM):

1. A scan of ``call.chunks`` counts each segment's records and notes its
   first arrival, so that a segment can be finished (its reorder buffer
   written and dropped) as soon as its last record has been read.
2. One pass over ``call.chunks`` in arrival order: each segment's chunks go
   through its reorder window (:class:`ChunkOrder`) and come out in ``seq``
   order, decoded to linear 16-bit samples, into a scratch file per segment
   (``segment-<i>.placed``).  The pause detector (below) watches them go by.
3. The channels are mixed in blocks of samples from the scratch files and
   written as the WAV; then the sidecar, atomically, last.

Placement (per segment)
    Chunks are placed by ``seq``; each is as long as its payload.  The
    reorder window is given in 20 ms frames (``--reorder-window``, default
    50 = 1 s) and turned into chunks with the segment's chunk duration
    (``ptime``, or the first chunk's ``duration``, or 20 ms): ``ceil(window *
    20 / ptime)`` chunks, at least one; 100 ms chunks get 10.  Counted per
    segment as for WebSocket perspectives: ``chunks`` placed with their
    audio, ``reordered`` (put in place after a higher seq), ``duplicates``
    (dropped), ``missing`` (a seq that never came in time: silence as long as
    the chunk before it), ``late`` (a chunk that came after its slot was
    given up, or below the segment's first seq once placement started:
    dropped).  A seq further than ``--max-call-duration`` of chunks from the
    segment's first one is dropped and counted in ``outOfRange`` (a bogus
    seq must not make hours of silence).  ``seq`` is a uint32: one that
    wraps from 4294967295 to 0 goes on in order.  The segment's timeline
    (from its lowest seq) starts at its first chunk's arrival, whichever seq
    that chunk carries.

Timeline
    Sample 0 is the recording's first audio: the earliest arrival of a chunk
    of a recorded segment.  A segment starts at its first chunk's arrival,
    measured from there and rounded to whole 20 ms frames (as for WebSocket
    perspectives, a first chunk within 20 ms of sample 0 starts at 0).  Streams of the
    same dialog (a reconnect) are nothing special: their segments are timed
    by their own arrival, so the time between streams is silence.  Where
    only one segment covers a stretch of a channel, its samples are exactly
    that segment's decoded samples; where several overlap (a warm transfer),
    they are summed as linear 16-bit samples and clipped to int16.  Then the
    channel is encoded as ``--format`` says.  The shorter channel is padded
    with silence at the end.

Hold pauses (per segment, from arrival times and the media clock)
    The platform stops sending while a caller is on hold and goes on with the
    next ``seq`` when the call is taken back; a network stall holds chunks
    back and then delivers them in a burst, faster than real time.  For each
    chunk placed, its *lag* is ``arrival - (segment start + audio placed
    before it / rate)``: flat while chunks come in real time, up by the
    pause after a hold and staying there, up after a stall but down again
    as the burst repays it.  The lag a chunk really carries is therefore the
    lowest lag of it and every chunk after it (a later chunk cannot have
    been captured earlier than its arrival allows): the *settled lag*, a
    running minimum taken from the end of the segment backwards.

    A pause is considered where a chunk arrives at least one chunk duration,
    and at least 200 ms (:data:`MIN_PAUSE`), later than the audio before it
    predicts, and at least 300 ms of audio (and 3 chunks) follow from there
    on: a pause needs audio that resumed.  Its length is how far the settled
    lag at that chunk stands above the lag already accounted for (the
    segment's lowest lag, plus the pauses inserted before), rounded to whole
    20 ms; if that is at least the same threshold, that much silence is
    inserted before the chunk and listed in the segment's ``pauses``
    (``atSamples``: where the silence starts, in samples of the recording,
    i.e. of the WAV; ``seconds``).  So a stall repaid by a burst inserts
    nothing (its audio is contiguous), a hold inserts its length, and after
    it the segment is back within one chunk of the wall clock.  Shifts
    shorter than the threshold (jitter, a sender's scheduling hiccup) are not
    pauses; a drift of the sender's clock is only corrected at a pause.

Codecs and rate
    PCMU and PCMA at 8000 Hz (a rate of 0, proto3's "unset", counts as
    8000), L16 big-endian (RFC 3551) at 8000 or 16000 Hz are recorded
    exactly; a segment without an audio format is PCMU at 8000 Hz.  The
    recording's rate is that of its first recordable segment (in start order)
    that has audio.  A segment that cannot be recorded exactly (OPUS, FLAC,
    an unspecified or unknown codec, a rate its codec does not have, or a
    rate other than the recording's) is ``recorded: false`` with a
    ``reason``: its chunks are still counted, never decoded, and its
    ``offsetSamples`` says where it would have started.  An L16 payload of
    an odd length loses its last byte (half a sample).

Chunks whose segment has no ``segment`` event (a damaged ``events.jsonl``)
are kept all the same: PCMU on the caller channel, ``segmentId`` null.
"""

from __future__ import annotations

import hashlib
import math
import os
from array import array
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from evrecorder import g711, keys, wav
from evrecorder.chunkfile import CHUNK_RECORD, CHUNKS_FILE, read_chunks
from evrecorder.settings import Settings
from evrecorder.sidecar import SCHEMA, closing_fields, rfc3339
from evrecorder.spool import SIDECAR_FILE, WAV_FILE, CallSpool, write_json_atomic

SOURCE = "grpc"
SCRATCH_PREFIX = "segment-"
SCRATCH_SUFFIX = ".placed"
FRAME_SECONDS = 0.02
#: The shortest pause inserted (and the smallest gap looked at) when chunks
#: are shorter than this: network jitter and a sender's scheduling hiccups
#: are not holds.
MIN_PAUSE = 0.2
#: Audio (seconds, and at least 3 chunks) that must follow a gap for it to
#: count as a pause: a pause needs audio that resumed in real time.
PAUSE_EVIDENCE = 0.3
#: What a segment without an audio format is.
DEFAULT_FORMAT = {"codec": "PCMU", "rate": 8000, "ptime": 0}
_RATES = {"PCMU": (8000,), "PCMA": (8000,), "L16": (8000, 16000)}
_DECODE: dict[str, Callable[[bytes], bytes]] = {
    "PCMU": g711.ulaw_to_pcm16le,
    "PCMA": g711.alaw_to_pcm16le,
    "L16": g711.l16be_to_pcm16le,
}
_WIDTH = {"PCMU": 1, "PCMA": 1, "L16": 2}
_BLOCK = 1 << 15  # samples per channel per block of the WAV
_SINK_BYTES = 1 << 16  # linear bytes a segment's scratch file collects before a write
_ZEROS = bytes(1 << 16)


# -- placement ---------------------------------------------------------------


@dataclass
class SegmentStats:
    """Counters of one segment, as the sidecar reports them."""

    chunks: int = 0
    missing: int = 0
    duplicates: int = 0
    reordered: int = 0
    late: int = 0
    out_of_range: int = 0
    first_seq: int | None = None
    last_seq: int | None = None


_SEQ_MOD = 1 << 32
_HALF_SEQ = 1 << 31


class ChunkOrder:
    """One segment's chunks from arrival order to ``seq`` order (the reorder window).

    The rules of :class:`evrecorder.placement.Placer` (which stays the
    WebSocket door's: it writes bytes and has block fast paths), for chunks
    that carry their arrival time: ``emit(seq, at, payload)`` receives each
    chunk placed, ``gap(count)`` each run of ``count`` slots given up.  At
    most ``window + 1`` chunks wait.
    """

    def __init__(
        self,
        window: int,
        span: int,
        emit: Callable[[int, float, bytes], None],
        gap: Callable[[int], None],
    ):
        self._window = max(1, window)
        self._span = span
        self._emit = emit
        self._gap = gap
        self._pending: dict[int, tuple[float, bytes]] = {}
        self._next: int | None = None
        self._top: int | None = None
        self._anchor: int | None = None  # the first seq to arrive, for the span check
        self._given_up: set[int] = set()
        self.stats = SegmentStats()

    def add(self, seq: int, at: float, payload: bytes) -> None:
        stats = self.stats
        anchor = self._anchor
        if anchor is None:
            self._anchor = seq
        else:
            # seq is a uint32: one that wrapped past 2^32 - 1 goes on from
            # there (placement uses the unwrapped number, counters show seq).
            seq = anchor + ((seq - anchor + _HALF_SEQ) % _SEQ_MOD) - _HALF_SEQ
            if abs(seq - anchor) > self._span:
                stats.out_of_range += 1
                return
        pending = self._pending
        if seq in pending:
            stats.duplicates += 1
            return
        nxt = self._next
        if nxt is not None and seq < nxt:
            if seq in self._given_up:
                self._given_up.discard(seq)
                stats.late += 1
            elif seq < stats.first_seq:
                stats.late += 1  # came after the segment's start was fixed
            else:
                stats.duplicates += 1
            return
        top = self._top
        if top is None or seq > top:
            self._top = top = seq
        else:
            stats.reordered += 1
        pending[seq] = (at, payload)
        if nxt is None:
            if top - min(pending) > self._window:
                self._advance(top - self._window)
        elif top - nxt > self._window:
            self._advance(top - self._window)

    def finish(self) -> SegmentStats:
        """Place every chunk still waiting (filling holes); return the counters."""
        if self._top is not None:
            self._advance(self._top + 1)
        self._pending.clear()
        self._given_up.clear()
        return self.stats

    def _advance(self, upto: int) -> None:
        stats = self.stats
        pending = self._pending
        if self._next is None:
            self._next = stats.first_seq = min(pending)
        nxt = self._next
        while nxt < upto:
            item = pending.pop(nxt, None)
            if item is not None:
                self._emit(nxt, item[0], item[1])
                stats.chunks += 1
                stats.last_seq = nxt
                nxt += 1
                continue
            end = min(min(pending) if pending else upto, upto)
            count = end - nxt
            self._gap(count)
            stats.missing += count
            if count <= 4 * self._window:
                self._given_up.update(range(nxt, end))
            nxt = end
        self._next = nxt
        if len(self._given_up) > 8 * self._window:
            floor = nxt - 4 * self._window
            self._given_up = {s for s in self._given_up if s >= floor}


# -- one segment -------------------------------------------------------------


class _Runs:
    """A segment's chunks, cut where a pause may have been: per run, the raw
    samples placed before its first chunk, its lowest lag and its chunks.
    Arrays, so a long and jittery segment costs 24 bytes a run."""

    def __init__(self) -> None:
        self.position = array("q", [0])
        self.lowest = array("d", [math.inf])
        self.count = array("q", [0])

    def cut(self, position: int) -> None:
        self.position.append(position)
        self.lowest.append(math.inf)
        self.count.append(0)

    def add(self, lag: float) -> None:
        if lag < self.lowest[-1]:
            self.lowest[-1] = lag
        self.count[-1] += 1


@dataclass
class Segment:
    """What finalize knows of one segment, from its ``segment`` event on."""

    index: int
    event: dict
    channel: str
    codec: str
    rate: int
    chunk_ms: int = 0
    recorded: bool = True
    reason: str | None = None
    records: int = 0  # records in call.chunks (from the scan)
    first_at: float | None = None
    info: list = field(default_factory=list)
    stopped_at: float | None = None
    stats: SegmentStats = field(default_factory=SegmentStats)
    raw_samples: int = 0  # samples placed (audio and missing-chunk silence), no pauses
    pauses: list = field(default_factory=list)  # (raw position, samples, seconds)
    offset: int = 0  # in the recording, samples
    path: str | None = None

    @property
    def samples(self) -> int:
        """Length on the timeline: the placed samples and the pauses inserted."""
        return self.raw_samples + sum(p[1] for p in self.pauses)

    def spans(self) -> list[tuple[int, int, int]]:
        """``(start in the recording, start in the scratch file, samples)`` of
        each stretch of audio between pauses."""
        out = []
        at, raw = self.offset, 0
        for position, samples, _ in self.pauses:
            if position > raw:
                out.append((at, raw, position - raw))
            at += position - raw + samples
            raw = position
        if self.raw_samples > raw:
            out.append((at, raw, self.raw_samples - raw))
        return out


def _codec_of(audio_format: dict | None) -> tuple[str, int, int]:
    fmt = audio_format if audio_format is not None else DEFAULT_FORMAT
    codec = str(fmt.get("codec") or "CODEC_UNSPECIFIED")
    rate = int(fmt.get("rate") or 0)
    if codec in ("PCMU", "PCMA") and rate == 0:
        rate = 8000  # proto3 leaves an unset rate 0; G.711 has one rate
    return codec, rate, int(fmt.get("ptime") or 0)


def _unrecordable(codec: str, rate: int) -> str | None:
    """Why a codec and rate cannot be recorded exactly, or None."""
    if codec in ("OPUS", "FLAC"):
        return f"{codec} audio is not recorded: only PCMU, PCMA and L16 are"
    if codec == "CODEC_UNSPECIFIED":
        return "the segment's codec is unspecified"
    if codec not in _RATES:
        return f"unknown codec {codec}"
    if rate not in _RATES[codec]:
        if rate == 0:
            return f"{codec} without a sample rate"
        allowed = " or ".join(str(r) for r in _RATES[codec])
        return f"{codec} at {rate} Hz is not recorded: only at {allowed} Hz"
    return None


class _Sink:
    """A segment's decoded, placed samples into its scratch file, in blocks."""

    def __init__(self, path: str, codec: str):
        self.path = path
        self._decode = _DECODE[codec]
        self._width = _WIDTH[codec]
        self._coded = bytearray()
        self._linear = bytearray()
        open(path, "wb").close()

    def audio(self, payload: bytes) -> None:
        if self._width == 2 and len(payload) % 2:
            payload = payload[:-1]  # half a sample: dropped here, not across chunks
        self._coded += payload
        if len(self._coded) >= _SINK_BYTES // 2:
            self._decode_coded()

    def silence(self, samples: int) -> None:
        self._decode_coded()
        nbytes = 2 * samples
        if nbytes + len(self._linear) < _SINK_BYTES:
            self._linear += _ZEROS[:nbytes]
            return
        self._write()
        with open(self.path, "ab") as f:
            while nbytes > 0:
                block = _ZEROS[: min(nbytes, len(_ZEROS))]
                f.write(block)
                nbytes -= len(block)

    def close(self) -> None:
        self._decode_coded()
        self._write()

    def _decode_coded(self) -> None:
        if self._coded:
            self._linear += self._decode(bytes(self._coded))
            self._coded.clear()
            if len(self._linear) >= _SINK_BYTES:
                self._write()

    def _write(self) -> None:
        if self._linear:
            # Opened for each write: a dialog may have thousands of segments.
            with open(self.path, "ab") as f:
                f.write(self._linear)
            self._linear.clear()


class _Track:
    """A segment while ``call.chunks`` is read: its order, sink and pause detector."""

    def __init__(self, segment: Segment, window_frames: int, max_seconds: float, scratch: str):
        self.segment = segment
        chunk_ms = segment.chunk_ms
        window = max(1, math.ceil(window_frames * 20 / chunk_ms))
        span = int(max_seconds * 1000 / chunk_ms) + window
        self.order = ChunkOrder(window, span, self._emit, self._gap)
        self._width = _WIDTH.get(segment.codec, 1)
        self._rate = segment.rate or 8000
        self._sink = _Sink(scratch, segment.codec) if segment.recorded else None
        segment.path = scratch if segment.recorded else None
        self._chunk_samples = 0
        self._threshold = max(chunk_ms / 1000, MIN_PAUSE)
        self._evidence = max(3, math.ceil(PAUSE_EVIDENCE * 1000 / chunk_ms))
        self._runs: _Runs | None = _Runs()
        self._last_lag: float | None = None
        self._start = segment.first_at or 0.0
        self.seen = 0

    def _emit(self, seq: int, at: float, payload: bytes) -> None:
        segment = self.segment
        n = len(payload) // self._width
        lag = at - self._start - segment.raw_samples / self._rate
        last = self._last_lag
        runs = self._runs
        if last is not None and lag - last >= self._threshold:
            runs.cut(segment.raw_samples)
        runs.add(lag)
        self._last_lag = lag
        if n:
            self._chunk_samples = n
        if self._sink is not None:
            self._sink.audio(payload)
        segment.raw_samples += n

    def _gap(self, count: int) -> None:
        per_chunk = self._chunk_samples or self.segment.chunk_ms * self._rate // 1000
        n = count * per_chunk
        if self._sink is not None:
            self._sink.silence(n)
        self.segment.raw_samples += n

    def finish(self) -> None:
        segment = self.segment
        segment.stats = self.order.finish()
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        if segment.recorded:
            segment.pauses = _pauses(self._runs, self._threshold, self._evidence, segment.rate)
        self._runs = None


def _pauses(
    runs: _Runs, threshold: float, evidence: int, rate: int
) -> list[tuple[int, int, float]]:
    """The pauses to insert: ``(raw position, samples, seconds)`` (module docstring)."""
    # From the end backwards, in place: each run's settled lag (the lowest
    # lag from it on) and the chunks from it on.
    settled, after = runs.lowest, runs.count
    lowest, count = math.inf, 0
    for i in range(len(settled) - 1, -1, -1):
        lowest = min(lowest, settled[i])
        count += after[i]
        settled[i], after[i] = lowest, count
    out = []
    level = settled[0]
    per_frame = rate // 50
    for i in range(1, len(settled)):
        if after[i] < evidence:
            break
        excess = settled[i] - level
        if excess < threshold:
            continue
        frames = math.floor(excess / FRAME_SECONDS + 0.5)
        seconds = frames * FRAME_SECONDS
        out.append((runs.position[i], frames * per_frame, round(seconds, 3)))
        level += seconds
    return out


# -- reading the entry -------------------------------------------------------


def _scan(path: str) -> tuple[dict[int, list], float | None]:
    """Per segment index ``[records, first arrival, first duration, first payload
    length]``, and the last arrival of all (headers only)."""
    found: dict[int, list] = {}
    last = None
    head = CHUNK_RECORD.size
    unpack = CHUNK_RECORD.unpack_from
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        return found, None
    with f:
        buf = b""
        pos = 0
        while True:
            more = f.read(1 << 18)
            if more:
                buf = buf[pos:] + more
                pos = 0
            end = len(buf)
            while end - pos >= head:
                index, _, at, duration, size = unpack(buf, pos)
                if pos + head + size > end:
                    break
                pos += head + size
                seen = found.get(index)
                if seen is None:
                    found[index] = [1, at, duration, size]
                else:
                    seen[0] += 1
                    if at < seen[1]:
                        seen[1] = at
                if last is None or at > last:
                    last = at
            if not more:
                return found, last


def _segment_of(index: int, event: dict | None) -> Segment:
    if event is None:
        # Chunks whose segment event was lost (a line torn by a crash, and
        # so every line after it): kept, as PCMU on the caller channel.
        event = {"segment": index, "segmentId": None, "participant": None, "product": None,
                 "audioFormat": None, "channel": "caller"}
    codec, rate, ptime = _codec_of(event.get("audioFormat"))
    channel = event.get("channel")
    if channel not in ("agent", "caller"):  # as the live side decides it
        participant = event.get("participant") or {}
        channel = "agent" if participant.get("type") == "AGENT" else "caller"
    reason = _unrecordable(codec, rate)
    return Segment(index=index, event=event, channel=channel, codec=codec, rate=rate,
                   chunk_ms=ptime, recorded=reason is None, reason=reason)


# -- the WAV -------------------------------------------------------------------


def _mix_into(buf: bytearray, pos: int, data: bytes) -> None:
    """Add ``data``'s samples to ``buf``'s from sample ``pos``, clipped to int16."""
    end = 2 * pos + len(data)
    buf[2 * pos : end] = g711.add_pcm16le(buf[2 * pos : end], data)


class _Channel:
    """One channel's segments, read block by block as linear samples."""

    def __init__(self, segments: list[Segment]):
        # (start, scratch start, samples, segment index) in recording order.
        self._spans = sorted(
            (start, raw, n, s.index)
            for s in segments
            for start, raw, n in s.spans()
        )
        self._paths = {s.index: s.path for s in segments}
        self._ends: dict[int, int] = {}
        for start, _, n, index in self._spans:
            self._ends[index] = max(self._ends.get(index, 0), start + n)
        self._files: dict[int, BinaryIO] = {}
        self._next = 0  # first span not yet taken into _active
        self._active: list[tuple[int, int, int, int]] = []  # spans that reach this block
        self.end = max(self._ends.values(), default=0)

    def block(self, begin: int, n: int) -> bytearray | None:
        """Samples ``begin`` to ``begin + n`` (little-endian int16), None if silent."""
        spans = self._spans
        stop = begin + n
        while self._next < len(spans) and spans[self._next][0] < stop:
            self._active.append(spans[self._next])
            self._next += 1
        buf = None
        covered: list[tuple[int, int]] = []
        for start, raw, count, index in self._active:
            lo, hi = max(start, begin), min(start + count, stop)
            if lo >= hi:
                continue
            data = self._read(index, raw + lo - start, hi - lo)
            if buf is None:
                buf = bytearray(2 * n)
            # Where no other segment was put yet the block holds zeros: a
            # copy.  Only where they overlap are samples summed.
            cursor = lo
            for a, b in sorted(covered):
                a, b = max(a, cursor), min(b, hi)
                if a >= b:
                    continue
                buf[2 * (cursor - begin) : 2 * (a - begin)] = data[2 * (cursor - lo) : 2 * (a - lo)]
                _mix_into(buf, a - begin, data[2 * (a - lo) : 2 * (b - lo)])
                cursor = b
            buf[2 * (cursor - begin) : 2 * (hi - begin)] = data[2 * (cursor - lo) :]
            covered.append((lo, hi))
        self._active = [span for span in self._active if span[0] + span[2] > stop]
        # Done with segments that ended: their files close.
        for index in [k for k in self._files if self._ends[k] <= stop]:
            self._files.pop(index).close()
        return buf

    def _read(self, index: int, raw: int, n: int) -> bytes:
        f = self._files.get(index)
        if f is None:
            f = self._files[index] = open(self._paths[index], "rb")
        f.seek(2 * raw)
        data = f.read(2 * n)
        if len(data) < 2 * n:  # shorter than placed (cannot happen): silence
            data += bytes(2 * n - len(data))
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _write_wav(
    out: BinaryIO, fmt: str, rate: int, left: _Channel, right: _Channel,
    update: Callable[[bytes], None],
) -> tuple[int, int]:
    """The whole WAV; its size in bytes and its length in samples."""
    samples = max(left.end, right.end)
    written = 0

    def emit(data: bytes | bytearray) -> None:
        nonlocal written
        out.write(data)
        update(data)
        written += len(data)

    emit(wav.header(fmt, samples, rate))
    done = 0
    while done < samples:
        n = min(_BLOCK, samples - done)
        a, b = left.block(done, n), right.block(done, n)
        if fmt == "mulaw":
            silent = g711.SILENCE_BYTE * n
            block = bytearray(2 * n)
            block[0::2] = g711.pcm16le_block_to_ulaw(a) if a is not None else silent
            block[1::2] = g711.pcm16le_block_to_ulaw(b) if b is not None else silent
        else:
            block = bytearray(4 * n)
            if a is not None:
                block[0::4], block[1::4] = a[0::2], a[1::2]
            if b is not None:
                block[2::4], block[3::4] = b[0::2], b[1::2]
        emit(block)
        done += n
    return written, samples


# -- finalize ------------------------------------------------------------------


@dataclass
class _Events:
    """What ``events.jsonl`` says, by stream and segment."""

    streams: dict[int, dict] = field(default_factory=dict)
    segments: dict[int, dict] = field(default_factory=dict)
    infos: dict[int, list] = field(default_factory=dict)
    stops: dict[int, float] = field(default_factory=dict)
    end: dict | None = None

    @classmethod
    def read(cls, events: list[dict]) -> "_Events":
        out = cls()
        for ev in events:
            kind = ev.get("event")
            if kind == "stream":
                out.streams.setdefault(int(ev["stream"]), {
                    "sessionId": ev.get("sessionId"), "connectedAt": ev.get("at"), "end": None})
            elif kind == "segment":
                out.segments.setdefault(int(ev["segment"]), ev)
            elif kind == "segmentInfo":
                out.infos.setdefault(int(ev["segment"]), []).append(ev)
            elif kind == "segmentStop":
                out.stops.setdefault(int(ev["segment"]), ev.get("at"))
            elif kind == "streamEnd":
                stream = out.streams.setdefault(int(ev["stream"]), {
                    "sessionId": None, "connectedAt": None, "end": None})
                if stream["end"] is None:
                    stream["end"] = ev
            elif kind == "end":
                out.end = ev
        return out


def _segments(found: _Events, scanned: dict[int, list]) -> tuple[list[Segment], int]:
    """Every segment (of an event, or of chunks only), in start order; the recording's rate."""
    segments = []
    for index in sorted(set(found.segments) | set(scanned)):
        segment = _segment_of(index, found.segments.get(index))
        segment.records, segment.first_at, duration, size = scanned.get(index, (0, None, 0, 0))
        if not segment.chunk_ms:
            per_ms = (segment.rate or 8000) * _WIDTH.get(segment.codec, 1) / 1000
            segment.chunk_ms = duration or (round(size / per_ms) if size else 0) or 20
        segment.info = found.infos.get(index, [])
        segment.stopped_at = found.stops.get(index)
        segments.append(segment)
    # The recording's rate: that of its first recordable segment that has audio.
    rate = next((s.rate for s in segments if s.recorded and s.records), 8000)
    for segment in segments:
        if segment.recorded and segment.rate != rate:
            segment.recorded = False
            segment.reason = (f"its rate, {segment.rate} Hz, differs from the "
                              f"recording's, {rate} Hz")
    return segments, rate


def _place(entry: CallSpool, segments: list[Segment], settings: Settings, header: dict) -> None:
    """Every segment's chunks into its scratch file, in one pass in arrival order."""
    tracks: dict[int, _Track] = {}
    for segment in segments:
        if segment.records:
            scratch = os.path.join(entry.path, f"{SCRATCH_PREFIX}{segment.index}{SCRATCH_SUFFIX}")
            tracks[segment.index] = _Track(segment, settings.reorder_window,
                                           settings.max_duration_for(header), scratch)
    for index, seq, at, _, payload in read_chunks(os.path.join(entry.path, CHUNKS_FILE)):
        track = tracks.get(index)
        if track is None:
            continue  # more records than the scan saw (cannot happen: nobody appends now)
        track.order.add(seq, at, payload)
        track.seen += 1
        if track.seen == track.segment.records:
            track.finish()  # its last record: its window is written and let go
            del tracks[index]
    for track in tracks.values():
        track.finish()


def _ended(entry: CallSpool, header: dict, events: list[dict], found: _Events,
           last_chunk_at: float | None) -> tuple[str, bool, float]:
    """endReason, complete, endedAt: as recorded, or "recovered" after a crash."""
    if found.end is not None:
        return found.end["reason"], bool(found.end["complete"]), found.end["at"]
    # Left by a crash: it ended with the last thing it wrote.
    ended_at = max(
        [ev.get("at") or 0 for ev in events]
        + [header.get("createdAt") or 0, last_chunk_at or 0]
        + [
            os.path.getmtime(os.path.join(entry.path, n))
            for n in os.listdir(entry.path)
            # Not the scratch files of a finalize a crash interrupted.
            if not n.endswith((SCRATCH_SUFFIX, ".tmp"))
        ]
    )
    return "recovered", False, ended_at


def finalize_grpc(entry: CallSpool, settings: Settings) -> dict:
    """Write ``recording.wav`` and ``sidecar.json`` for a gRPC spool entry.

    Returns the sidecar (without ``archivedAt``).  A dialog that recorded its
    end keeps that reason; one left by a crash before its end is
    "recovered" and incomplete.
    """
    header = entry.read_header()
    events = entry.read_events()
    found = _Events.read(events)
    scanned, last_chunk_at = _scan(os.path.join(entry.path, CHUNKS_FILE))
    segments, rate = _segments(found, scanned)
    _place(entry, segments, settings, header)

    # Sample 0 is the first arrival of recorded audio; offsets in whole frames.
    recorded = [s for s in segments if s.recorded and s.raw_samples]
    origin = min((s.first_at for s in recorded), default=None)
    for segment in segments:
        if segment.first_at is not None and origin is not None:
            # As for WebSocket perspectives: within one frame of the first
            # audio is sample 0, later is rounded to whole frames.
            delta = segment.first_at - origin
            frames = 0 if delta < FRAME_SECONDS else round(delta / FRAME_SECONDS)
            segment.offset = frames * (rate // 50)

    by_channel = {c: [s for s in recorded if s.channel == c] for c in ("agent", "caller")}
    left = _Channel(by_channel[settings.channel_map[0]])
    right = _Channel(by_channel[settings.channel_map[1]])
    digest = hashlib.sha256()
    wav_path = os.path.join(entry.path, WAV_FILE)
    tmp = wav_path + ".tmp"
    try:
        with open(tmp, "wb") as out:
            size, samples = _write_wav(out, settings.format, rate, left, right, digest.update)
            out.flush()
            os.fsync(out.fileno())
    finally:
        left.close()
        right.close()
    os.replace(tmp, wav_path)

    reason, complete, ended_at = _ended(entry, header, events, found, last_chunk_at)
    first_media_at = min((s.first_at for s in segments if s.first_at is not None), default=None)
    start = first_media_at if first_media_at is not None else (
        header.get("connectedAt") or header.get("createdAt") or 0.0)
    fields = keys.grpc_key_fields(header.get("metadata") or {}, [s.event for s in segments],
                                  start, header["callId"], header["sessionId"])
    sidecar = {
        "schema": SCHEMA,
        "source": SOURCE,
        "callId": header["callId"],
        "sessionId": header["sessionId"],
        "key": keys.format_key(settings.key_template, fields),
        "metadata": header.get("metadata"),
        "query": header.get("query") or {},
        "audio": {
            "encoding": settings.format,
            "sampleRateHertz": rate,
            "channels": 2,
            "channelMap": list(settings.channel_map),
            "durationSeconds": samples / rate,
            "bytes": size,
            "sha256": digest.hexdigest(),
        },
        "streams": [
            _stream_side(found.streams[n], ended_at, reason) for n in sorted(found.streams)
        ],
        "segments": [_segment_side(s) for s in segments],
        **closing_fields(header, first_media_at, ended_at, complete, reason),
    }
    write_json_atomic(os.path.join(entry.path, SIDECAR_FILE), sidecar)
    # The WAV and sidecar now carry everything: drop the working files.
    for name in os.listdir(entry.path):
        scratch = name.startswith(SCRATCH_PREFIX) and name.endswith(SCRATCH_SUFFIX)
        if name == CHUNKS_FILE or scratch:
            os.unlink(os.path.join(entry.path, name))
    return sidecar


def _stream_side(stream: dict, ended_at: float, reason: str) -> dict:
    end = stream["end"]
    return {
        "sessionId": stream["sessionId"],
        "connectedAt": rfc3339(stream["connectedAt"]),
        # A stream the recording ended without its own end (a crash) ended with it.
        "endedAt": rfc3339(end["at"] if end else ended_at),
        "endReason": end.get("reason") if end else reason,
        "detail": end.get("detail") if end else None,
    }


def _segment_side(segment: Segment) -> dict:
    event, stats = segment.event, segment.stats
    audio_format = event.get("audioFormat")
    return {
        "segmentId": event.get("segmentId"),
        "stream": event.get("stream"),
        "participant": event.get("participant"),
        "product": event.get("product"),
        "channel": segment.channel,
        "audioFormat": dict(audio_format) if audio_format is not None else dict(DEFAULT_FORMAT),
        "recorded": segment.recorded,
        "reason": segment.reason,
        "chunks": stats.chunks,
        "missing": stats.missing,
        "duplicates": stats.duplicates,
        "reordered": stats.reordered,
        "late": stats.late,
        "outOfRange": stats.out_of_range,
        "firstSeq": None if stats.first_seq is None else stats.first_seq % _SEQ_MOD,
        "lastSeq": None if stats.last_seq is None else stats.last_seq % _SEQ_MOD,
        "offsetSamples": segment.offset,
        "samples": segment.samples if segment.recorded else 0,
        "pauses": [
            {"atSamples": at, "seconds": seconds}
            for at, seconds in _pause_positions(segment)
        ],
        "info": [
            {"event": i.get("name"), "data": i.get("data"), "at": rfc3339(i.get("at"))}
            for i in segment.info
        ],
        "stopped": segment.stopped_at is not None,
        "startedAt": rfc3339(event.get("at")),
        "stoppedAt": rfc3339(segment.stopped_at),
    }


def _pause_positions(segment: Segment) -> list[tuple[int, float]]:
    """Where each pause's silence starts in the recording, and its length."""
    out = []
    inserted = 0
    for position, samples, seconds in segment.pauses:
        out.append((segment.offset + position + inserted, seconds))
        inserted += samples
    return out
