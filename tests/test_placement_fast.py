"""The finalizer's fast paths give exactly what the plain, frame-at-a-time rules give.

``Placer.add_run`` (a run of contiguous ids written as a block), the run reader
of frames files (``framefile.read_runs``) and the stereo WAV writer are checked
against slow, obviously correct references written here, over many seeded
random arrival orders: reordering within and beyond the window, duplicates,
gaps, late frames, frame sizes up to 480 bytes, first frames out of order,
marks.  Timelines and WAVs must be byte-identical and every counter equal.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from dataclasses import asdict

import pytest

from evrecorder import framefile, g711, placement, wav
from evrecorder.finalize import finalize
from evrecorder.framefile import read_runs
from evrecorder.placement import PerspectiveStats, Placer
from evrecorder.settings import PERSPECTIVES, Settings
from evrecorder.spool import RECORD, CallSpool, Spool

SEED = 20261124


# -- the reference ------------------------------------------------------------------

class ReferencePlacer:
    """The placement rules of README.rst / DESIGN.md, one frame and one slot at a time.

    This is the placer as it was before the fast path (frozen here so that the
    comparison cannot drift with the code under test), with holes written slot
    by slot where the original wrote a stretch in one go.  What the rules
    leave to the implementation is kept as the original had it: silence takes
    the length of the frame added last; a stretch of more than ``4 * window``
    empty slots written at once is not remembered for ``late``; the memory of
    given-up slots is trimmed to the last ``4 * window`` once it exceeds
    ``8 * window`` entries.
    """

    def __init__(self, window, mark=None):
        self.window = window
        self.mark = mark
        self.pending = {}
        self.next = None
        self.max_seen = None
        self.frame_len = 160
        self.given_up = set()
        self.out = bytearray()
        self.stats = PerspectiveStats()

    def add(self, seq, payload):
        s = self.stats
        if seq in self.pending:
            s.duplicates += 1
            return
        if self.next is not None and seq < self.next:
            if seq in self.given_up:
                self.given_up.discard(seq)
                s.late += 1
            else:
                s.duplicates += 1
            return
        if self.max_seen is None or seq > self.max_seen:
            self.max_seen = seq
        else:
            s.reordered += 1
        self.pending[seq] = payload
        if payload:
            self.frame_len = len(payload)
        start = min(self.pending) if self.next is None else self.next
        if self.max_seen - start > self.window:
            self.advance(self.max_seen - self.window)

    def finish(self):
        if self.max_seen is not None:
            self.advance(self.max_seen + 1)
        return self.stats

    def advance(self, upto):
        s = self.stats
        if self.next is None:
            self.next = s.first_sequence_id = min(self.pending)
        # The empty slots of this advance that follow one another, and whether
        # they are one stretch of more than 4 * window slots.
        holes = []
        while self.next < upto:
            slot = self.next
            if slot == self.mark:
                s.mark_position = s.samples
            payload = self.pending.pop(slot, None)
            if payload is not None:
                self._remember(holes)
                holes = []
                self.out += payload
                s.frames += 1
                s.samples += len(payload)
                s.last_sequence_id = slot
            else:
                holes.append(slot)
                self.out += b"\xff" * self.frame_len
                s.missing += 1
                s.samples += self.frame_len
            self.next += 1
        self._remember(holes)
        if len(self.given_up) > 8 * self.window:
            floor = self.next - 4 * self.window
            self.given_up = {x for x in self.given_up if x >= floor}

    def _remember(self, holes):
        # A stretch of empty slots is one write in the original; it is
        # remembered for "late" only when short.  A stretch ends at a frame
        # held or at the end of the advance.
        if holes and len(holes) <= 4 * self.window:
            self.given_up.update(holes)


def reference_place(frames, window, mark=None):
    ref = ReferencePlacer(window, mark)
    for seq, payload in frames:
        ref.add(seq, payload)
    stats = ref.finish()
    return bytes(ref.out), stats


# -- random arrival orders ------------------------------------------------------------

_PATTERN = bytes((i * 37 + (i >> 8)) & 0xFF for i in range(1024))


def payload(rng, seq, size):
    # Content tied to the id (and the size), so a frame in the wrong slot shows.
    at = (seq * 131 + size) % 509
    return _PATTERN[at : at + size]


def arrival(rng, window):
    """A perspective's frames in arrival order, with every kind of disorder."""
    n = rng.choice([0, 1, 2, 3, window, window + 1, window + 2, 40, 200, 700, 1500])
    start = rng.choice([0, 1, 100, 2**32 - 30, 2**48 + 5, rng.randrange(1, 10**6)])
    ids = list(range(start, start + n))
    # Gaps: single ids, short stretches, and now and then a big jump.
    out = []
    for s in ids:
        r = rng.random()
        if r < 0.02:
            continue
        out.append(s)
    if out and rng.random() < 0.2:
        k = rng.randrange(len(out))
        jump = rng.choice([window, 4 * window, 4 * window + 1, 10 * window, 5000])
        out = out[:k] + [s + jump for s in out[k:]]
    # Reordering: within the window, at its edge, and beyond it (late).
    rate = rng.choice([0.0, 0.01, 0.05, 0.2])
    for i in range(len(out)):
        if rng.random() < rate:
            d = rng.choice([1, 2, window - 1, window, window + 1, window + 2,
                            3 * window, 9 * window])
            j = min(len(out) - 1, i + max(1, d))
            out.insert(j, out.pop(i))
    # Duplicates: at once, a little later, much later.
    dup_rate = rng.choice([0.0, 0.01, 0.05])
    res = []
    for i, s in enumerate(out):
        res.append(s)
        if rng.random() < dup_rate:
            res.append(s)
        if rng.random() < dup_rate and i > 5:
            res.append(out[i - rng.randrange(1, min(i, 12 * window) + 1)])
    # The first frames out of order.
    if rng.random() < 0.5:
        head = res[: rng.randrange(1, window + 3)]
        rng.shuffle(head)
        res = head + res[len(head):]
    # Frame sizes: 160 mostly, sometimes other sizes up to 480, at times mixed.
    mode = rng.choice(["160", "one", "switch", "mixed", "empty"])
    base = 160 if mode == "160" else rng.choice([1, 2, 80, 160, 320, 479, 480])
    frames = []
    for s in res:
        if mode == "mixed" and rng.random() < 0.1:
            size = rng.randrange(1, 481)
        elif mode == "switch" and rng.random() < 0.01:
            base = rng.choice([80, 160, 240, 480])
            size = base
        elif mode == "empty" and rng.random() < 0.02:
            size = 0
        else:
            size = base
        frames.append((s, payload(rng, s, size)))
    return frames


def as_runs(frames, rng):
    """Split arrival order into runs of contiguous ids of one size, cut at random too."""
    runs = []
    for seq, p in frames:
        if (
            runs
            and seq == runs[-1][0] + len(runs[-1][2])
            and len(p) == runs[-1][1]
            and rng.random() > 0.02
        ):
            runs[-1][2].append(p)
        else:
            runs.append((seq, len(p), [p]))
    return runs


def fast_place(frames, window, mark, rng):
    out = []
    placer = Placer(window, out.append, mark=mark)
    for first, size, payloads in as_runs(frames, rng):
        if len(payloads) == 1 and rng.random() < 0.5:
            placer.add(first, payloads[0])  # the two entry points mixed
        else:
            placer.add_run(first, payloads, size)
    stats = placer.finish()
    return b"".join(out), stats


def pick_mark(rng, frames):
    if not frames or rng.random() < 0.1:
        return None
    if rng.random() < 0.7:
        return frames[0][0]  # what the finalizer passes: the first id to arrive
    return rng.choice(frames)[0]


# -- placement -----------------------------------------------------------------------

def test_reference_agrees_with_the_placer_frame_by_frame():
    """The frozen reference and Placer.add agree on random arrival orders (the reference holds)."""
    rng = random.Random(SEED)
    for _ in range(300):
        window = rng.choice([1, 2, 3, 5, 8, 50])
        frames = arrival(rng, window)
        mark = pick_mark(rng, frames)
        out = []
        placer = Placer(window, out.append, mark=mark)
        for seq, p in frames:
            placer.add(seq, p)
        stats = placer.finish()
        want, want_stats = reference_place(frames, window, mark)
        assert b"".join(out) == want
        assert asdict(stats) == asdict(want_stats)


@pytest.mark.parametrize("part", range(4))
@pytest.mark.parametrize("short_run", [None, 1])
def test_runs_place_exactly_as_single_frames(part, short_run, monkeypatch):
    """add_run gives the reference's timeline and counters for random disorder of every kind."""
    if short_run is not None:  # the block path for runs of any length, too
        monkeypatch.setattr(placement, "SHORT_RUN", short_run)
    rng = random.Random(SEED + 1 + part)
    for case in range(400):
        window = rng.choice([1, 2, 3, 4, 7, 50, 50, 64])
        frames = arrival(rng, window)
        mark = pick_mark(rng, frames)
        got, stats = fast_place(frames, window, mark, rng)
        want, want_stats = reference_place(frames, window, mark)
        assert got == want, f"case {case}: timeline differs"
        assert asdict(stats) == asdict(want_stats), f"case {case}"


def test_a_long_contiguous_call_is_placed_in_blocks():
    """A 10-minute call in order is a few writes, all counted as the reference counts."""
    frames = [(s, bytes([s & 0xFF]) * 160) for s in range(1, 30001)]
    payloads = [p for _, p in frames]
    writes = []
    placer = Placer(50, writes.append, mark=1)
    for k in range(0, len(payloads), 2048):
        placer.add_run(1 + k, payloads[k:k + 2048], 160)
    stats = placer.finish()
    want, want_stats = reference_place(frames, 50, 1)
    assert b"".join(writes) == want and asdict(stats) == asdict(want_stats)
    assert len(writes) < 100  # blocks, not frames (the first window goes frame by frame)
    assert len(placer._pending) == 0


def test_the_window_holds_no_more_than_window_plus_one_frames_after_a_run():
    """After a run only the last window + 1 frames wait: memory stays bounded."""
    placer = Placer(5, lambda b: None)
    placer.add_run(1, [b"x"] * 1000, 1)
    assert len(placer._pending) <= 6
    placer.add_run(1001, [b"x"] * 3, 1)
    assert len(placer._pending) <= 6


def test_frames_after_finish_are_placed_as_single_frames_would_be():
    """Frames added after finish() (no caller does) still take the general path's result."""
    for window in (1, 3, 50):
        frames = [(s, bytes([s & 0xFF]) * 4) for s in range(1, 200)]
        more = [(s, bytes([s & 0xFF]) * 4) for s in range(200, 400)]
        out, ref = [], ReferencePlacer(window)
        placer = Placer(window, out.append)
        placer.add_run(1, [p for _, p in frames], 4)
        for seq, p in frames:
            ref.add(seq, p)
        placer.finish()
        ref.finish()
        placer.add_run(200, [p for _, p in more], 4)
        for seq, p in more:
            ref.add(seq, p)
        assert b"".join(out) == bytes(ref.out) and asdict(placer.stats) == asdict(ref.stats)
        assert asdict(placer.finish()) == asdict(ref.finish())
        assert b"".join(out) == bytes(ref.out)


def test_late_memory_is_trimmed_as_frame_by_frame():
    """Many holes inside runs trim the memory of given-up slots exactly as single frames do."""
    rng = random.Random(SEED + 9)
    for _ in range(200):
        window = rng.choice([1, 2, 3])
        ids = [s for s in range(1, 400) if rng.random() > 0.3]
        late = [s for s in range(1, 400) if s not in ids and rng.random() < 0.5]
        frames = [(s, bytes([s & 0xFF]) * 2) for s in ids]
        for s in late:  # each missing id may turn up much later
            frames.insert(rng.randrange(len(frames) + 1), (s, bytes([s & 0xFF]) * 2))
        mark = pick_mark(rng, frames)
        got, stats = fast_place(frames, window, mark, rng)
        want, want_stats = reference_place(frames, window, mark)
        assert got == want and asdict(stats) == asdict(want_stats)


# -- reading frames files ------------------------------------------------------------

def write_frames(tmp_path, name, frames, torn=b""):
    spool = CallSpool(str(tmp_path / name))
    os.makedirs(spool.path)
    path = os.path.join(spool.path, "Participant.frames")
    with open(path, "wb") as f:  # the per-perspective format read_runs reads
        f.write(b"".join(RECORD.pack(seq, len(p)) + p for seq, p in frames) + torn)
    return spool, path


def test_runs_read_the_same_frames_as_the_spool_reader(tmp_path):
    """read_runs yields every frame CallSpool.read_frames yields, in order, in contiguous runs."""
    rng = random.Random(SEED + 2)
    for case in range(60):
        window = rng.choice([3, 50])
        frames = arrival(rng, window)
        torn = b""
        if rng.random() < 0.5:
            cut = rng.choice([1, 5, 9, 10, 11, 100])
            torn = (RECORD.pack(12345, 160) + b"\x01" * 160)[:cut]
        spool, path = write_frames(tmp_path, f"c{case}", frames, torn)
        block = rng.choice([1, 7, 100, 4096, 1 << 20])
        got = []
        for first, size, payloads in read_runs(path, block=block):
            assert payloads and all(len(p) == size for p in payloads)
            got.extend((first + i, p) for i, p in enumerate(payloads))
        assert got == list(spool.read_frames("Participant")) == frames


def test_runs_of_awkward_files_read_the_same_frames(tmp_path):
    """Every frame twice, sizes alternating, ids at the top of the 64-bit range: the same frames."""
    top = (1 << 64) - 1
    cases = {
        "twice": [(s, payload(None, s, 160)) for s in range(1, 3000) for _ in range(2)],
        "sizes": [(s, payload(None, s, 160 if s % 3 else 480)) for s in range(1, 3000)],
        "top": [(s, payload(None, s, 160)) for s in range(top - 400, top + 1)],
        "pairs": [(s ^ 1, payload(None, s, 80)) for s in range(2, 3000)],
        "long": [(s, payload(None, s, 160)) for s in range(1, 9000)] * 2,
    }
    for name, frames in cases.items():
        spool, path = write_frames(tmp_path, name, frames)
        got = []
        for first, size, payloads in read_runs(path):
            assert payloads and all(len(p) == size for p in payloads)
            assert len(payloads) < framefile.RUN_MAX + framefile.CHUNK  # runs stay bounded
            got.extend((first + i, p) for i, p in enumerate(payloads))
        assert got == frames, name


def test_a_missing_frames_file_has_no_runs(tmp_path):
    """A perspective that sent nothing has no frames file and no runs."""
    assert list(read_runs(str(tmp_path / "nothing.frames"))) == []


# -- the WAV --------------------------------------------------------------------------

def reference_wav(fmt, left, right):
    """Header, then each sample frame: left then right (decoded one sample at a time)."""
    n = max(len(left), len(right))
    left = left + b"\xff" * (n - len(left))
    right = right + b"\xff" * (n - len(right))
    data = bytearray()
    for a, b in zip(left, right):
        if fmt == "mulaw":
            data += bytes([a, b])
        else:
            data += struct.pack("<hh", g711.DECODE_TABLE[a], g711.DECODE_TABLE[b])
    return wav.header(fmt, n) + bytes(data)


@pytest.mark.parametrize("fmt", wav.FORMATS)
def test_stereo_wav_matches_a_sample_by_sample_reference(tmp_path, fmt):
    """Decoding and interleaving in blocks gives the reference's bytes, offsets and padding too."""
    rng = random.Random(SEED + 3)
    for case in range(12):
        la, lb = rng.choice([0, 1, 999, 70_000, 140_001]), rng.choice([0, 3, 65_536, 131_073])
        oa, ob = rng.choice([0, 160, 70_001]), rng.choice([0, 1, 320])
        a, b = os.urandom(la), os.urandom(lb)
        pa, pb = tmp_path / f"a{case}", tmp_path / f"b{case}"
        pa.write_bytes(a)
        pb.write_bytes(b)
        left, right = wav.Channel(str(pa), oa, la), wav.Channel(str(pb), ob, lb)
        out = tmp_path / f"o{case}.wav"
        digest = hashlib.sha256()
        with open(out, "wb") as f:
            size = wav.write_stereo(f, fmt, left, right, digest.update)
        left.close()
        right.close()
        want = reference_wav(fmt, b"\xff" * oa + a, b"\xff" * ob + b)
        data = out.read_bytes()
        assert data == want, f"case {case}"
        assert size == len(want) and digest.hexdigest() == hashlib.sha256(want).hexdigest()


def test_a_channel_file_shorter_than_announced_ends_in_silence(tmp_path):
    """If a timeline file is shorter than its length, the rest of the channel is silence."""
    path = tmp_path / "short"
    path.write_bytes(b"\x01" * 100_000)
    channel = wav.Channel(str(path), 0, 200_000)
    got = b"".join(channel.read(n) for n in (65_536, 65_536, 65_536, 3_392))
    channel.close()
    assert got == b"\x01" * 100_000 + b"\xff" * 100_000


# -- finalize, end to end -------------------------------------------------------------

@pytest.mark.parametrize("fmt", wav.FORMATS)
def test_finalize_matches_the_reference_end_to_end(tmp_path, fmt):
    """A spooled call with disorder on both sides finalizes to the reference's WAV and counters."""
    rng = random.Random(SEED + 4)
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    for case in range(8):
        window = rng.choice([3, 50])
        settings = Settings(spool=spool.root, format=fmt, reorder_window=window)
        entry = spool.new_call(f"c{case}", "1", 1000.0 + case)
        entry.create({"callId": f"c{case}", "sessionId": "1", "connectedAt": 1000.0,
                      "metadata": {}, "query": {}})
        per = {p: arrival(rng, window) for p in PERSPECTIVES}
        offsets = {PERSPECTIVES[0]: 0, PERSPECTIVES[1]: rng.choice([0, 1, 7])}
        for p in PERSPECTIVES:
            if per[p]:
                entry.append_event({"event": "media", "perspective": p, "at": 1000.0,
                                    "offsetFrames": offsets[p], "firstSequenceId": per[p][0][0]})
        longest = max(len(f) for f in per.values())
        for i in range(longest):
            for p in PERSPECTIVES:
                if i < len(per[p]):
                    entry.append_frame(p, *per[p][i])
            if rng.random() < 0.2:
                entry.flush()
        entry.append_event({"event": "end", "reason": "stop", "complete": True, "at": 1060.0})
        entry.close()
        sidecar = finalize(entry, settings)

        timelines, begin = {}, {}
        for p in PERSPECTIVES:
            mark = per[p][0][0] if per[p] else None
            timelines[p], stats = reference_place(per[p], window, mark)
            side = sidecar["perspectives"][p]
            assert {k: side[k] for k in stats.as_dict()} == stats.as_dict(), f"case {case} {p}"
            if stats.samples:
                begin[p] = offsets[p] * 160 - (stats.mark_position or 0)
        shift = min(begin.values(), default=0)
        channels = []
        for p in PERSPECTIVES:
            offset = begin[p] - shift if p in begin else 0
            assert sidecar["perspectives"][p]["offsetSamples"] == offset
            channels.append(b"\xff" * offset + timelines[p])
        want = reference_wav(fmt, channels[0], channels[1])
        with open(os.path.join(entry.path, "recording.wav"), "rb") as f:
            got = f.read()
        assert got == want, f"case {case}"
        assert sidecar["audio"]["sha256"] == hashlib.sha256(want).hexdigest()
        assert sidecar["audio"]["bytes"] == len(want)
        assert not [n for n in os.listdir(entry.path) if n.endswith((".frames", ".placed"))]
