"""The spool's frames file: one ``call.frames`` per call, still reading old entries; media metrics."""

from __future__ import annotations

import os
import random
import struct

from twisted.internet.task import Clock

from conftest import independent_decode, read_pcm16_wav
from evrecorder import framefile
from evrecorder.call import CallRegistry
from evrecorder.finalize import finalize
from evrecorder.metrics import Metrics
from evrecorder.settings import Settings
from evrecorder.spool import Spool

AGENT, CALLER = "Participant", "Conference"
NEW = struct.Struct(">BQH")  # perspective index, sequenceId, payload length
OLD = struct.Struct(">QH")  # sequenceId, payload length (one file per perspective)
INDEX = {AGENT: 0, CALLER: 1}


def payload(perspective, seq, size=160):
    return bytes(((seq * 7 + INDEX[perspective] * 91 + i) % 250) + 1 for i in range(size))


def new_entry(tmp_path, name="c1"):
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spool.new_call(name, "1", 1_700_000_000.0)
    entry.create({"callId": name, "sessionId": "1", "connectedAt": 1_700_000_000.0,
                  "createdAt": 1_700_000_000.0, "metadata": {}, "query": {}})
    return entry


def media_events(entry, firsts):
    for perspective, first in firsts.items():
        entry.append_event({"event": "media", "perspective": perspective, "at": 1_700_000_000.0,
                            "offsetFrames": 0, "firstSequenceId": first})


def end(entry):
    entry.append_event({"event": "end", "reason": "stop", "complete": True,
                        "at": 1_700_000_010.0})


def arrivals():
    """Both perspectives interleaved, with a reordered pair, duplicates and a late start."""
    agent = [1, 2, 3, 5, 4, 6, 6, 7, 8, 9, 10]
    caller = [1, 2, 2, 3, 4, 6, 5, 7, 8]
    out = []
    for i in range(max(len(agent), len(caller))):
        if i < len(agent):
            out.append((AGENT, agent[i]))
        if i < len(caller):
            out.append((CALLER, caller[i]))
    return out


def expected(perspective, last):
    return b"".join(payload(perspective, s) for s in range(1, last + 1))


def test_one_write_per_flush_carries_both_perspectives(tmp_path, monkeypatch):
    """A flush of frames of both perspectives is one os.write, to call.frames, in arrival order."""
    entry = new_entry(tmp_path)
    writes = []
    real_write = os.write

    def counting_write(fd, data):
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    for tick in range(1, 4):
        entry.append_frame(AGENT, tick, payload(AGENT, tick))
        entry.append_frame(CALLER, tick, payload(CALLER, tick))
        entry.flush()
        assert len(writes) == tick  # one write per flush
    entry.flush()  # nothing collected: nothing written
    assert len(writes) == 3
    monkeypatch.undo()
    entry.close()
    names = sorted(os.listdir(entry.path))
    assert "call.frames" in names and f"{AGENT}.frames" not in names
    assert f"{CALLER}.frames" not in names
    want = b"".join(
        NEW.pack(INDEX[p], t, 160) + payload(p, t) for t in range(1, 4) for p in (AGENT, CALLER)
    )
    with open(os.path.join(entry.path, "call.frames"), "rb") as f:
        assert f.read() == want == b"".join(writes)
    assert list(entry.read_frames(CALLER)) == [(t, payload(CALLER, t)) for t in range(1, 4)]


def test_finalize_from_call_frames_is_sample_exact(tmp_path):
    """Interleaved perspectives, reordering, duplicates and a torn last record: exact channels."""
    entry = new_entry(tmp_path)
    media_events(entry, {AGENT: 1, CALLER: 1})
    for i, (p, seq) in enumerate(arrivals()):
        entry.append_frame(p, seq, payload(p, seq))
        if i % 3 == 2:
            entry.flush()
    end(entry)
    entry.close()
    with open(os.path.join(entry.path, "call.frames"), "ab") as f:
        f.write((NEW.pack(0, 11, 160) + payload(AGENT, 11))[:60])  # kill -9 mid-write
    sidecar = finalize(entry, Settings(spool=str(tmp_path)))
    left, right = read_pcm16_wav(os.path.join(entry.path, "recording.wav"))
    assert left == independent_decode(expected(AGENT, 10))
    assert right == independent_decode(expected(CALLER, 8) + b"\xff" * 320)
    side = sidecar["perspectives"]
    assert (side[AGENT]["frames"], side[AGENT]["duplicates"], side[AGENT]["reordered"]) == (10, 1, 1)
    assert (side[CALLER]["frames"], side[CALLER]["duplicates"], side[CALLER]["reordered"]) == (8, 1, 1)
    assert not [n for n in os.listdir(entry.path) if n.endswith((".frames", ".split", ".placed"))]


def write_old_format(entry, frames):
    """Per-perspective ``<Perspective>.frames`` files as the previous version wrote them."""
    for perspective in (AGENT, CALLER):
        with open(os.path.join(entry.path, perspective + ".frames"), "ab") as f:
            for p, seq in frames:
                if p == perspective:
                    f.write(OLD.pack(seq, 160) + payload(p, seq))


def test_an_old_entry_finalizes_as_before(tmp_path):
    """Per-perspective files of the previous version (torn tail too) give the same WAV and
    sidecar counts as the same frames in call.frames."""
    results = {}
    for kind in ("old", "new"):
        entry = new_entry(tmp_path / kind)
        media_events(entry, {AGENT: 1, CALLER: 1})
        if kind == "old":
            write_old_format(entry, arrivals())
            with open(os.path.join(entry.path, AGENT + ".frames"), "ab") as f:
                f.write(OLD.pack(11, 160) + b"\x01" * 10)  # torn
        else:
            for p, seq in arrivals():
                entry.append_frame(p, seq, payload(p, seq))
        end(entry)
        entry.close()
        sidecar = finalize(entry, Settings(spool=str(tmp_path)))
        left, right = read_pcm16_wav(os.path.join(entry.path, "recording.wav"))
        assert left == independent_decode(expected(AGENT, 10))
        assert right == independent_decode(expected(CALLER, 8) + b"\xff" * 320)
        assert not [n for n in os.listdir(entry.path) if n.endswith((".frames", ".split", ".placed"))]
        results[kind] = (sidecar["audio"], sidecar["perspectives"])
    assert results["old"] == results["new"]


def test_an_entry_with_both_formats_keeps_every_frame(tmp_path):
    """Old per-perspective files and call.frames in one entry: the old frames first, then the new."""
    entry = new_entry(tmp_path)
    media_events(entry, {AGENT: 1, CALLER: 1})
    frames = arrivals()
    write_old_format(entry, frames[:8])
    for p, seq in frames[8:]:
        entry.append_frame(p, seq, payload(p, seq))
    end(entry)
    entry.close()
    assert list(entry.read_frames(AGENT)) == [(s, payload(AGENT, s)) for p, s in frames if p == AGENT]
    finalize(entry, Settings(spool=str(tmp_path)))
    left, right = read_pcm16_wav(os.path.join(entry.path, "recording.wav"))
    assert left == independent_decode(expected(AGENT, 10))
    assert right == independent_decode(expected(CALLER, 8) + b"\xff" * 320)
    assert sorted(os.listdir(entry.path)) == ["call.json", "events.jsonl", "recording.wav",
                                              "sidecar.json"]


def naive_split(data, n):
    outs = [bytearray() for _ in range(n)]
    pos = 0
    while pos + NEW.size <= len(data):
        p, seq, size = NEW.unpack_from(data, pos)
        if pos + NEW.size + size > len(data):
            break
        if p < n:
            outs[p] += data[pos + 1 : pos + NEW.size + size]
        pos += NEW.size + size
    return [bytes(o) for o in outs]


def test_split_cuts_the_same_records_as_a_plain_reader(tmp_path, monkeypatch):
    """Long stretches (chunked), one perspective alone, mixed sizes, bad indexes, torn tails,
    any block size: each perspective's records, in order, as a record-by-record reader cuts them."""
    rng = random.Random(7)
    for case in range(30):
        monkeypatch.setattr(framefile, "BLOCK", rng.choice([1, 100, 4096, 1 << 18]))
        records = []
        for stretch in range(rng.randrange(1, 6)):
            kind = rng.choice(["alternate", "one", "mixed", "random"])
            size = rng.choice([0, 1, 160, 480, 2000])
            for i in range(rng.choice([5, 255, 256, 700])):
                if kind == "alternate":
                    p = i % 2
                elif kind == "one":
                    p = stretch % 2
                elif kind == "mixed":
                    p, size = rng.randrange(2), rng.choice([160, 320])
                else:
                    p = rng.choice([0, 1, 1, 2])  # 2: no such perspective
                seq = rng.randrange(1 << 64)
                records.append(NEW.pack(p, seq, size) + bytes([rng.randrange(256)]) * size)
        data = b"".join(records)
        if rng.random() < 0.5:
            data += records[0][: rng.randrange(1, len(records[0]))]
        path = tmp_path / f"c{case}.frames"
        path.write_bytes(data)
        outs = [open(tmp_path / f"out{case}-{i}", "wb") for i in range(2)]
        framefile.split(str(path), outs)
        for out in outs:
            out.close()
        got = [(tmp_path / f"out{case}-{i}").read_bytes() for i in range(2)]
        assert got == naive_split(data, 2), case
    assert framefile.split(str(tmp_path / "missing.frames"), [None, None]) == 0


class FakeConn:
    def end_call(self, code, reason):
        pass


def test_media_metrics_count_calls_in_progress_and_ended(tmp_path):
    """evrecorder_frames / evrecorder_media_bytes include calls in progress and stay counters
    after they end."""
    clock = Clock()
    clock.advance(1_700_000_000)
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    metrics = Metrics()
    reg = CallRegistry(spool, Settings(spool=spool.root), clock, lambda call: None, metrics)

    def sample(name, perspective):
        return metrics.registry.get_sample_value(
            name + "_total", {"door": "websocket", "perspective": perspective})

    assert sample("evrecorder_frames", AGENT) is None
    conn = FakeConn()
    one = reg.join(conn, "c1", "1", {}, {}, clock.seconds())
    two = reg.join(conn, "c2", "1", {}, {}, clock.seconds())
    for seq in range(1, 6):
        one.media(conn, AGENT, seq, b"\x01" * 160)
    two.media(conn, AGENT, 1, b"\x01" * 80)
    two.media(conn, CALLER, 1, b"\x01" * 160)
    assert sample("evrecorder_frames", AGENT) == 6
    assert sample("evrecorder_frames", CALLER) == 1
    assert sample("evrecorder_media_bytes", AGENT) == 5 * 160 + 80
    one.end("stop")
    assert sample("evrecorder_frames", AGENT) == 6  # folded, not lost nor counted twice
    assert sample("evrecorder_media_bytes", AGENT) == 5 * 160 + 80
    two.media(conn, AGENT, 2, b"\x01" * 160)
    two.end("stop")
    two.end("stop")  # a second end changes nothing
    assert sample("evrecorder_frames", AGENT) == 7
    assert sample("evrecorder_frames", CALLER) == 1
    assert sample("evrecorder_media_bytes", AGENT) == 6 * 160 + 80
    assert sample("evrecorder_media_bytes", CALLER) == 160
    assert not reg.calls
