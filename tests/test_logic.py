"""Plain-object tests of the logic: G.711, placement, WAV, keys, calls on a Clock, finalize."""

from __future__ import annotations

import json
import os
import struct
import wave

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from conftest import independent_decode, read_pcm16_wav
from evrecorder import g711, keys
from evrecorder import wav as wavmod
from evrecorder.call import CallRegistry
from evrecorder.errors import CallRejected
from evrecorder.finalize import finalize
from evrecorder.placement import Placer
from evrecorder.settings import Settings
from evrecorder.spool import RECORD, Spool
from evrecorder.tap import Options

AGENT, CALLER = "Participant", "Conference"


# -- G.711 ---------------------------------------------------------------------

def test_decode_matches_an_independent_decoder_for_every_byte():
    """Every mu-law byte decodes as audioop/sox do (0x00 is -32124, 0xFF and 0x7F are 0)."""
    import array

    got = array.array("h")
    got.frombytes(g711.ulaw_to_pcm16le(bytes(range(256))))
    assert list(got) == independent_decode(bytes(range(256)))
    assert (got[0x00], got[0x80], got[0xFF], got[0x7F]) == (-32124, 32124, 0, 0)


def test_encode_round_trips_every_code():
    """Encoding the decoded value of every mu-law byte gives the byte back (0x7F -> 0xFF)."""
    for u in range(256):
        want = 0xFF if u == 0x7F else u
        assert g711.encode_sample(g711.DECODE_TABLE[u]) == want


# -- placement -----------------------------------------------------------------

def place(order, window=3, size=2):
    out = []
    placer = Placer(window, out.append)
    for seq in order:
        placer.add(seq, bytes([seq % 250]) * size)
    stats = placer.finish()
    return b"".join(out), stats


def frame(seq, size=2):
    return bytes([seq % 250]) * size


def test_in_order_frames_pass_through():
    """In-order frames come out unchanged and counted."""
    data, stats = place(range(1, 11))
    assert data == b"".join(frame(s) for s in range(1, 11))
    assert (stats.frames, stats.missing, stats.duplicates, stats.reordered, stats.late) == (10, 0, 0, 0, 0)
    assert (stats.first_sequence_id, stats.last_sequence_id) == (1, 10)


def test_reorder_at_the_start_is_placed():
    """Frames swapped at the very start are placed: the lowest id seen is the start."""
    data, stats = place([2, 1, 3, 4, 5, 6])
    assert data == b"".join(frame(s) for s in range(1, 7))
    assert stats.reordered == 1 and stats.first_sequence_id == 1


def test_gap_becomes_silence_of_frame_length():
    """A never-arriving frame becomes silence of the frame length; the timeline keeps its place."""
    data, stats = place([1, 2, 4, 5, 6, 7, 8], size=3)
    assert data == frame(1, 3) + frame(2, 3) + b"\xff" * 3 + b"".join(frame(s, 3) for s in range(4, 9))
    assert stats.missing == 1 and stats.frames == 7


def test_big_jump_is_filled_in_one_piece():
    """A jump of many ids fills the whole gap with silence, counted per slot."""
    data, stats = place([1, 1000, 1001, 1002, 1003, 1004], window=3, size=1)
    assert len(data) == 1004 and data[1:999] == b"\xff" * 998
    assert stats.missing == 998


def test_window_edge():
    """A frame with exactly `window` later frames ahead is placed; one more and it is late."""
    data, stats = place([1, 3, 4, 5, 2, 6])  # 3 later frames (3,4,5) before 2: placed
    assert stats.reordered == 1 and stats.late == 0 and stats.missing == 0
    data, stats = place([1, 3, 4, 5, 6, 2])  # 4 later frames: 2 was given up
    assert stats.late == 1 and stats.missing == 1
    assert data[2:4] == b"\xff\xff"


def test_duplicates_waiting_and_placed_are_dropped():
    """A repeat of a waiting frame and of an already written frame are both duplicates."""
    data, stats = place([1, 2, 2, 3, 4, 5, 6, 7, 1, 8])
    assert data == b"".join(frame(s) for s in range(1, 9))
    assert stats.duplicates == 2 and stats.late == 0


def test_placer_memory_is_bounded_by_the_window():
    """The placer never holds more than window + 1 frames, however long the stream."""
    placer = Placer(5, lambda b: None)
    for seq in range(1, 10000):
        placer.add(seq, b"x")
        assert len(placer._pending) <= 6


# -- WAV -----------------------------------------------------------------------

def test_pcm16_header_is_what_wave_reads(tmp_path):
    """The PCM16 file is a plain stereo 8 kHz WAV for the stdlib reader."""
    path = tmp_path / "a.wav"
    left = wavmod.Channel(None, 3, 0)
    right = wavmod.Channel(None, 5, 0)
    with open(path, "wb") as f:
        size = wavmod.write_stereo(f, "pcm16", left, right)
    assert size == os.path.getsize(path) == 44 + 5 * 4
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth(), w.getnframes()) == (2, 8000, 2, 5)


def test_mulaw_header_has_tag_7_cbsize_and_fact():
    """The mu-law header names format 7 with cbSize 0 and a fact chunk of the sample count."""
    h = wavmod.header("mulaw", 1234)
    assert h[:4] == b"RIFF" and h[8:12] == b"WAVE"
    tag, channels, rate, byte_rate, align, bits, cb = struct.unpack_from("<HHIIHHH", h, 20)
    assert (tag, channels, rate, byte_rate, align, bits, cb) == (7, 2, 8000, 16000, 2, 8, 0)
    assert h[38:42] == b"fact" and struct.unpack_from("<I", h, 46)[0] == 1234
    assert h[50:54] == b"data" and struct.unpack_from("<I", h, 54)[0] == 2468
    assert struct.unpack_from("<I", h, 4)[0] == len(h) - 8 + 2468


# -- keys ----------------------------------------------------------------------

def test_key_template_default_and_sanitizing():
    """The default key is date/callId-sessionId; hostile values cannot leave the archive."""
    fields = keys.key_fields({"callId": "../../etc/x", "sessionId": 2}, {"agentId": "7"}, 1764000000.0)
    assert keys.format_key(keys.DEFAULT_TEMPLATE, fields) == "2025/11/24/.._.._etc_x-2"
    assert keys.format_key("{agentId}/{missing}/{callId}", fields) == "7/unknown/.._.._etc_x"
    assert keys.format_key("{callId}", {"callId": ".."}) == "__"


def test_bad_key_template_is_refused():
    """A template Python cannot format is refused with a sentence."""
    with pytest.raises(ValueError, match="cannot be used"):
        keys.check_template("{callId")


# -- options -------------------------------------------------------------------

def test_options_defaults(monkeypatch):
    """With no options, the parsed config is DESIGN.md's defaults."""
    monkeypatch.delenv("EVRECORDER_SECRET", raising=False)
    o = Options()
    o.parseOptions([])
    assert o.settings() == Settings()
    assert o["listen"] == ["tcp:3333"]


def test_options_all_given(tmp_path, monkeypatch):
    """Every option lands in the settings; secrets come from flag, file and environment."""
    monkeypatch.setenv("EVRECORDER_SECRET", "from-env")
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\nsecond-from-file\n")
    o = Options()
    o.parseOptions([
        "--listen", "tcp:1", "--listen", "tcp:2", "--archive", "file:///tmp/a", "--spool", "/tmp/s",
        "--secret", "flag", "--secret-file", str(secret_file), "--secret-header", "X-Key",
        "--channel-map", "caller,agent", "--format", "mulaw", "--key-template", "{callId}",
        "--reorder-window", "10", "--reconnect-grace", "3", "--idle-timeout", "4",
        "--max-call-duration", "5", "--drain-timeout", "6", "--max-message-size", "1000",
        "--handshake-timeout", "7", "--max-connections", "8", "--upload-concurrency", "2",
    ])
    assert o["listen"] == ["tcp:1", "tcp:2"]
    assert o.settings() == Settings(
        spool="/tmp/s", archive="file:///tmp/a",
        secrets=["flag", "from-file", "second-from-file", "from-env"], secret_header="X-Key",
        channel_map=("caller", "agent"), format="mulaw", key_template="{callId}",
        reorder_window=10, reconnect_grace=3.0, idle_timeout=4.0, max_call_duration=5.0,
        drain_timeout=6.0, max_message_size=1000, handshake_timeout=7.0, max_connections=8,
        upload_concurrency=2, s3={},
    )


@pytest.mark.parametrize("argv, sentence", [
    (["--channel-map", "agent,agent"], "--channel-map must name agent and caller"),
    (["--format", "wav"], "--format must be pcm16 or mulaw"),
    (["--reorder-window", "0"], "--reorder-window: '0' must be more than 0."),
    (["--idle-timeout", "soon"], "--idle-timeout: 'soon' is not a number."),
    (["--archive", "ftp://x/y"], "unknown scheme"),
    (["--secret-file", "/nonexistent/secret"], "does not exist"),
    (["--sse", "rot13"], "--sse must be AES256 or aws:kms"),
])
def test_bad_options_are_one_sentence(argv, sentence):
    """Each bad value is refused with a sentence naming the option."""
    with pytest.raises(usage.UsageError, match=sentence.replace("(", r"\(").replace(".", r"\.")):
        Options().parseOptions(argv)


# -- calls on a Clock ------------------------------------------------------------

class FakeConn:
    def __init__(self):
        self.closed = None

    def end_call(self, code, reason):
        self.closed = (code, reason)


def make_registry(tmp_path, **kw):
    clock = Clock()
    clock.advance(1_700_000_000)
    ended = []
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    settings = Settings(spool=spool.root, **kw)
    return clock, CallRegistry(spool, settings, clock, ended.append), ended, settings


def test_late_perspective_offset_is_whole_frames(tmp_path):
    """A perspective starting 0.47 s later is offset 24 frames; within 20 ms it starts at 0."""
    clock, reg, ended, settings = make_registry(tmp_path)
    conn = FakeConn()
    call = reg.join(conn, "c1", "1", {}, {}, clock.seconds())
    call.media(conn, AGENT, 1, b"\x01" * 160)
    clock.advance(0.47)
    call.media(conn, CALLER, 1, b"\x02" * 160)
    call2 = reg.join(conn, "c2", "1", {}, {}, clock.seconds())
    call2.media(conn, AGENT, 1, b"\x01" * 160)
    clock.advance(0.019)
    call2.media(conn, CALLER, 1, b"\x02" * 160)
    # Handled later but read earlier (a sibling process relayed it): negative.
    call3 = reg.join(conn, "c3", "1", {}, {}, clock.seconds())
    call3.media(conn, AGENT, 1, b"\x01" * 160)
    call3.media(conn, CALLER, 1, b"\x02" * 160, at=clock.seconds() - 0.061)
    events = call.spool.read_events() + call2.spool.read_events() + call3.spool.read_events()
    assert [e["offsetFrames"] for e in events if e["event"] == "media"] == [0, 24, 0, 0, 0, -3]


def test_relayed_perspective_read_first_starts_the_recording(tmp_path):
    """A perspective handled second but read 3 frames earlier (relayed by a
    sibling) starts at sample 0, the other 480 samples later; firstMediaAt is its read."""
    from evrecorder.finalize import rfc3339

    clock, reg, ended, settings = make_registry(tmp_path)
    conn = FakeConn()
    call = reg.join(conn, "c1", "1", {}, {}, clock.seconds())
    call.media(conn, AGENT, 1, b"\x01" * 160)
    call.media(conn, CALLER, 1, b"\x02" * 160, at=clock.seconds() - 0.061)
    call.stop(conn, None, AGENT)
    call.stop(conn, None, CALLER)
    sidecar = finalize(call.spool, settings)
    offsets = {p: sidecar["perspectives"][p]["offsetSamples"] for p in (AGENT, CALLER)}
    assert offsets == {AGENT: 480, CALLER: 0}
    assert sidecar["timing"]["firstMediaAt"] == rfc3339(clock.seconds() - 0.061)
    left, right = read_pcm16_wav(os.path.join(call.spool.path, "recording.wav"))
    assert left == [0] * 480 + independent_decode(b"\x01" * 160)
    assert right == independent_decode(b"\x02" * 160) + [0] * 480


def test_stop_counting_and_grace(tmp_path):
    """Two perspectives need two Stops; a detached call ends after exactly the grace period."""
    clock, reg, ended, settings = make_registry(tmp_path, reconnect_grace=10.0)
    conn = FakeConn()
    call = reg.join(conn, "c1", "1", {}, {}, clock.seconds())
    call.media(conn, AGENT, 1, b"\x01")
    call.media(conn, CALLER, 1, b"\x01")
    call.stop(conn, {"n": 1}, None)
    assert not call.ended
    call.stop(conn, {"n": 2}, None)
    assert call.ended and call.end_reason == "stop" and conn.closed[0] == 1000

    other = FakeConn()
    call = reg.join(other, "c2", "1", {}, {}, clock.seconds())
    call.media(other, AGENT, 1, b"\x01")
    call.detach(other)
    clock.advance(9.9)
    assert not call.ended
    back = FakeConn()
    reg.join(back, "c2", "1", {}, {}, clock.seconds())  # reconnect inside grace
    clock.advance(5)
    assert not call.ended
    call.detach(back)
    clock.advance(10.0)
    assert call.ended and call.end_reason == "disconnect"
    assert [c.end_reason for c in ended] == ["stop", "disconnect"]


def test_idle_and_max_duration_on_the_clock(tmp_path):
    """Idle timeout counts from the last message; max duration from the call's start."""
    clock, reg, ended, _ = make_registry(tmp_path, idle_timeout=4.5, max_call_duration=12.0)
    conn = FakeConn()
    busy = reg.join(conn, "busy", "1", {}, {}, clock.seconds())  # t=0
    clock.advance(1.0)
    idle = reg.join(conn, "idle", "1", {}, {}, clock.seconds())  # t=1
    for seq, step in ((1, 3.0), (2, 4.0)):  # messages at t=4 and t=8
        clock.advance(step)
        idle.media(conn, AGENT, seq, b"\x01")
        busy.media(conn, AGENT, seq, b"\x01")
    clock.advance(3.9)  # t=11.9
    busy.media(conn, AGENT, 3, b"\x01")
    assert not idle.ended and not busy.ended
    clock.advance(0.1)  # t=12: busy reaches its maximum length
    assert busy.end_reason == "max-duration" and not idle.ended
    clock.advance(0.49)
    assert not idle.ended
    clock.advance(0.01)  # t=12.5: 4.5 s since idle's last message
    assert idle.end_reason == "timeout"


def test_sequence_id_far_from_the_first_is_refused(tmp_path):
    """A sequenceId further from the first than the longest call allows is bad input."""
    clock, reg, _, settings = make_registry(tmp_path, max_call_duration=10.0)
    conn = FakeConn()
    call = reg.join(conn, "c1", "1", {}, {}, clock.seconds())
    call.media(conn, AGENT, 5, b"\x01")
    with pytest.raises(CallRejected) as e:
        call.media(conn, AGENT, 5 + settings.max_sequence_span + 1, b"\x01")
    assert e.value.kind == "invalid"


# -- finalize ------------------------------------------------------------------------

def test_finalize_survives_a_torn_last_record(tmp_path):
    """A frame record cut by a crash is ignored; every whole frame before it is kept."""
    clock, reg, _, settings = make_registry(tmp_path)
    conn = FakeConn()
    call = reg.join(conn, "c1", "1", {"callId": "c1"}, {}, clock.seconds())
    payloads = [bytes([i + 1]) * 160 for i in range(5)]
    for i, p in enumerate(payloads):
        call.media(conn, AGENT, i + 1, p)
    call.spool.close()
    with open(os.path.join(call.spool.path, AGENT + ".frames"), "ab") as f:
        f.write(RECORD.pack(6, 160) + b"\x09" * 50)  # torn
    with open(os.path.join(call.spool.path, "events.jsonl"), "ab") as f:
        f.write(b'{"event": "stop", "perspe')  # torn
    sidecar = finalize(call.spool, settings)
    assert sidecar["endReason"] == "recovered" and sidecar["complete"] is False
    left, right = read_pcm16_wav(os.path.join(call.spool.path, "recording.wav"))
    assert left == independent_decode(b"".join(payloads))
    assert right == [0] * 800
    assert json.load(open(os.path.join(call.spool.path, "sidecar.json")))["key"].endswith("c1-1")
    assert not [n for n in os.listdir(call.spool.path) if n.endswith(".frames")]


def test_silence_for_a_long_gap_is_written_in_bounded_blocks():
    """A gap of hundreds of thousands of frames never needs its size in one buffer."""
    sizes = []
    placer = Placer(3, lambda b: sizes.append(len(b)))
    for seq in (1, 500_000, 500_001, 500_002, 500_003, 500_004):
        placer.add(seq, b"\x01" * 480)
    placer.finish()
    assert sum(sizes) == 500_004 * 480 and max(sizes) <= 1 << 16


def test_key_template_specs_fit_string_ids():
    """{sessionId:03d} works on the string ids calls carry; an unfit spec falls back to the value."""
    fields = keys.key_fields({"callId": "c", "sessionId": "2", "agentId": "abc"}, {}, 0.0)
    assert keys.format_key("{callId}-{sessionId:03d}-{agentId:05d}", fields) == "c-002-abc"
    keys.check_template("{start:%Y/%m/%d}/{callId}-{sessionId:03d}")


def test_late_perspective_reordered_at_its_start_keeps_alignment(tmp_path):
    """A perspective whose first frames arrive out of order starts at the right sample."""
    clock, reg, _, settings = make_registry(tmp_path)
    conn = FakeConn()
    call = reg.join(conn, "c1", "1", {}, {}, clock.seconds())
    agent = [bytes([10 + i]) * 160 for i in range(40)]
    caller = [bytes([100 + i]) * 160 for i in range(3)]
    for i in range(25):
        call.media(conn, AGENT, i + 1, agent[i])
        clock.advance(0.02)
    # t=0.5 s: the caller's frame 3 arrives first, then 1 and 2.
    for seq in (3, 1, 2):
        call.media(conn, CALLER, seq, caller[seq - 1])
    for i in range(25, 40):
        call.media(conn, AGENT, i + 1, agent[i])
    call.end("stop")
    sidecar = finalize(call.spool, settings)
    # Frame 3 arrived at frame slot 25, so frame 1 starts at slot 23.
    assert sidecar["perspectives"][CALLER]["offsetSamples"] == 23 * 160
    _, right = read_pcm16_wav(os.path.join(call.spool.path, "recording.wav"))
    assert right[23 * 160: 26 * 160] == independent_decode(b"".join(caller))


def test_racing_publishes_of_different_recordings_keep_both(tmp_path):
    """Two different recordings published at once to one key land at K and K-2, both intact."""
    import hashlib
    import threading

    from evrecorder.stores import LocalStore, PublishItem

    store = LocalStore(str(tmp_path / "archive"))
    items = []
    for n in range(2):
        path = tmp_path / f"rec{n}.wav"
        path.write_bytes(bytes([n]) * 200_000)
        items.append(PublishItem(
            key="same/key", wav_path=str(path),
            wav_sha256=hashlib.sha256(path.read_bytes()).hexdigest(), wav_size=200_000,
            sidecar_for=lambda key, n=n: f'{{"n": {n}}}'.encode(),
        ))
    for _ in range(20):
        keys_used = []
        threads = [threading.Thread(target=lambda it=it: keys_used.append(store.publish(it)))
                   for it in items]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(keys_used) == ["same/key", "same/key-2"]
        for key in keys_used:
            data = (tmp_path / "archive" / (key + ".wav")).read_bytes()
            n = json.loads((tmp_path / "archive" / (key + ".json")).read_text())["n"]
            assert data == bytes([n]) * 200_000
        for f in (tmp_path / "archive" / "same").iterdir():
            f.unlink()


def test_a_spool_entry_that_cannot_be_finalized_is_retried_then_set_aside(tmp_path):
    """A finalize failure is retried with backoff, then set aside (kept on disk, out of readiness)."""
    from evrecorder.archiver import Archiver
    from evrecorder.stores import MemoryStore
    from twisted.internet import defer

    clock = Clock()
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    broken = os.path.join(spool.calls_dir, "1-broken")
    os.makedirs(broken)
    with open(os.path.join(broken, "call.json"), "w") as f:
        f.write("{not json")
    settings = Settings(spool=spool.root, retry_initial=1.0, retry_max=4.0)
    archiver = Archiver(spool, MemoryStore(), settings, clock,
                        run_blocking=lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw))
    archiver.startService()
    assert archiver.queue_depth == 1 and archiver._attempts[broken] == 1
    for _ in range(3):
        clock.advance(4.0)
    assert archiver._attempts[broken] == 4 and archiver.queue_depth == 1
    clock.advance(4.0)
    assert archiver._attempts[broken] == 5 and archiver.queue_depth == 0
    assert archiver.oldest_age() == 0.0
    clock.advance(60.0)
    assert archiver._attempts[broken] == 5  # no more attempts until the next start
    assert os.path.isdir(broken)  # kept for the operator, never deleted unarchived


def test_fast_masker_matches_autobahns_across_chunks():
    """The integer XOR masker unmasks exactly as Autobahn's, also for payloads split at any byte."""
    import random

    from autobahn.websocket.xormasker import create_xor_masker as autobahns

    from evrecorder.fastmask import IntXorMasker

    rng = random.Random(7)
    for _ in range(300):
        mask = bytes(rng.randrange(256) for _ in range(4))
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 700)))
        cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
        ours, theirs = IntXorMasker(mask), autobahns(mask, len(data))
        got, want, prev = b"", b"", 0
        for cut in cuts + [len(data)]:
            got += ours.process(data[prev:cut])
            want += theirs.process(data[prev:cut])
            prev = cut
        assert got == want and ours.pointer() == len(data)


def test_a_failing_last_write_still_ends_and_hands_over_the_call(tmp_path, monkeypatch):
    """If the spool cannot take the last frames, the call still ends and goes to the archiver."""
    clock, reg, ended, _ = make_registry(tmp_path)
    conn = FakeConn()
    call = reg.join(conn, "c1", "1", {}, {}, clock.seconds())
    call.media(conn, AGENT, 1, b"\x01" * 160)

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    call.stop(conn, {}, AGENT)  # the Stop event itself cannot be written either
    monkeypatch.undo()
    assert call.ended and ended == [call] and reg.calls == {}
    assert conn.closed[0] in (1000, 1001)


def test_stop_from_a_reconnected_socket_ends_a_quiet_perspective(tmp_path):
    """A Stop on a fresh socket ends the perspective whose old (half-open) socket went quiet."""
    clock, reg, ended, _ = make_registry(tmp_path)
    old, caller, fresh = FakeConn(), FakeConn(), FakeConn()
    call = reg.join(old, "c1", "1", {}, {}, clock.seconds())
    reg.join(caller, "c1", "1", {}, {}, clock.seconds())
    call.media(old, AGENT, 1, b"\x01" * 160)
    call.media(caller, CALLER, 1, b"\x02" * 160)
    reg.join(fresh, "c1", "1", {}, {}, clock.seconds())
    call.stop(fresh, None, None)  # the agent still streams (on `old`): ignored
    assert AGENT not in call._stopped
    clock.advance(2.0)
    call.media(caller, CALLER, 2, b"\x02" * 160)
    call.stop(fresh, None, None)  # the agent's old socket has been quiet for 2 s
    call.stop(caller, None, None)
    assert call.end_reason == "stop"


def test_start_alignment_counts_the_frames_real_length(tmp_path):
    """With 320-byte frames, ids skipped at a perspective's start move it by 320 samples each."""
    clock, reg, _, settings = make_registry(tmp_path)
    conn = FakeConn()
    call = reg.join(conn, "c1", "1", {}, {}, clock.seconds())
    call.media(conn, CALLER, 1, b"\x05" * 160)  # the call starts at t=0 with the caller
    clock.advance(0.2)  # 10 frames later the agent's frame 103 arrives first
    for seq in (103, 100, 101, 102, 104):
        call.media(conn, AGENT, seq, bytes([seq]) * 320)
    call.end("stop")
    sidecar = finalize(call.spool, settings)
    # Frame 103 arrived at sample 1600; 100..102 (3 x 320) come before it.
    assert sidecar["perspectives"][AGENT]["offsetSamples"] == 1600 - 960
    left, _ = read_pcm16_wav(os.path.join(call.spool.path, "recording.wav"))
    assert left[640:640 + 320] == independent_decode(bytes([100]) * 320)
