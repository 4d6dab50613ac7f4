"""The recorder service on a real port, driven by a real WebSocket client."""

from __future__ import annotations

import hashlib
import io
import os

import pytest_twisted
from twisted.internet import task

from conftest import independent_decode, need_tool, read_mulaw_wav, read_pcm16_wav
from wsclient import connect, connected, media, refused, start, stop

AGENT, CALLER = "Participant", "Conference"


def frames(n: int, seed: int, size: int = 160) -> list[bytes]:
    """n deterministic, varied mu-law frames (every byte value appears)."""
    out = []
    for i in range(n):
        h = hashlib.sha256(f"{seed}-{i}".encode()).digest()
        out.append(bytes((h[j % 32] + j * 7 + i) & 0xFF for j in range(size)))
    return out


def reactor():
    from twisted.internet import reactor as r

    return r


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor(), seconds, lambda: None)


async def record_call(rec, agent, caller, call_id="12345", query=None, headers=None, pre=(),
                      session_id=2):
    """One socket, both perspectives interleaved, then two Stops."""
    conn = await connect(reactor(), rec.port, query=query, headers=headers)
    conn.send_all(pre or [connected(), start(call_id, session_id)])
    for i in range(max(len(agent), len(caller))):
        if i < len(agent):
            conn.send(media(AGENT, i + 1, agent[i]))
        if i < len(caller):
            conn.send(media(CALLER, i + 1, caller[i]))
    conn.send(stop())
    conn.send(stop())
    return await conn.closed


def assert_channels(sidecar, left: bytes, right: bytes) -> None:
    """The archived PCM16 WAV holds exactly these mu-law channels, decoded."""
    got_left, got_right = read_pcm16_wav(sidecar["_wav"])
    assert got_left == independent_decode(left)
    assert got_right == independent_decode(right)


@pytest_twisted.ensureDeferred
async def test_call_is_archived_sample_exact(recorder):
    """A whole call lands as a stereo PCM16 WAV, agent left, caller right, sample-exact."""
    agent, caller = frames(100, 1), frames(100, 2)
    code, _ = await record_call(recorder, agent, caller, query={"callId": "12345", "sessionId": "2",
                                                               "agentId": "123"})
    assert code == 1000
    [sidecar] = await recorder.archived()
    assert_channels(sidecar, b"".join(agent), b"".join(caller))
    wav_bytes = open(sidecar["_wav"], "rb").read()
    assert sidecar["schema"] == "evrecorder/1"
    assert sidecar["callId"] == "12345" and sidecar["sessionId"] == "2"
    assert sidecar["audio"] == {
        "encoding": "pcm16", "sampleRateHertz": 8000, "channels": 2,
        "channelMap": ["agent", "caller"], "durationSeconds": 2.0,
        "bytes": len(wav_bytes), "sha256": hashlib.sha256(wav_bytes).hexdigest(),
    }
    assert sidecar["metadata"]["agentId"] == 123
    assert sidecar["query"] == {"callId": "12345", "sessionId": "2", "agentId": "123"}
    assert sidecar["complete"] is True and sidecar["endReason"] == "stop"
    for p in (AGENT, CALLER):
        side = sidecar["perspectives"][p]
        assert (side["frames"], side["missing"], side["duplicates"], side["late"]) == (100, 0, 0, 0)
        assert (side["firstSequenceId"], side["lastSequenceId"]) == ("1", "100")
        assert side["stop"] == {"duration": 1, "end_time": "2026-01-14T00:00:00Z"}
    for name in ("connectedAt", "firstMediaAt", "endedAt", "archivedAt"):
        assert sidecar["timing"][name].endswith("Z")
    assert os.path.relpath(sidecar["_wav"], recorder.archive).endswith("12345-2.wav")
    assert sidecar["recorder"]["version"]


@pytest_twisted.ensureDeferred
async def test_mulaw_format_keeps_bytes(recorder_factory):
    """--format mulaw archives a WAVE_FORMAT_MULAW file sox reads back byte for byte."""
    rec = await recorder_factory(format="mulaw")
    agent, caller = frames(30, 3), frames(20, 4)
    await record_call(rec, agent, caller)
    [sidecar] = await rec.archived()
    left, right, raw = read_mulaw_wav(sidecar["_wav"])
    want_right = b"".join(caller) + b"\xff" * 160 * 10  # shorter channel padded
    assert raw[0::2] == b"".join(agent) and raw[1::2] == want_right
    assert left == independent_decode(b"".join(agent))
    assert right == independent_decode(want_right)
    assert sidecar["audio"]["encoding"] == "mulaw"


@pytest_twisted.ensureDeferred
async def test_channel_map_swaps_sides(recorder_factory):
    """--channel-map caller,agent puts the caller left."""
    rec = await recorder_factory(channel_map=("caller", "agent"))
    agent, caller = frames(10, 5), frames(10, 6)
    await record_call(rec, agent, caller)
    [sidecar] = await rec.archived()
    assert_channels(sidecar, b"".join(caller), b"".join(agent))
    assert sidecar["audio"]["channelMap"] == ["caller", "agent"]


async def archived_none(rec, wait: float = 0.3) -> None:
    await sleep(wait)
    found = [f for _, _, fs in os.walk(rec.archive) for f in fs]
    assert found == []


@pytest_twisted.ensureDeferred
async def test_reorder_duplicates_and_gaps(recorder):
    """Late frames are put in place, duplicates dropped, a lost frame becomes silence."""
    agent = frames(20, 7)
    order = [1, 2, 4, 3, 5, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 2]
    conn = await connect(reactor(), recorder.port)
    conn.send_all([connected(), start()])
    for seq in order:
        conn.send(media(AGENT, seq, agent[seq - 1]))
    conn.send(stop())
    assert (await conn.closed)[0] == 1000
    [sidecar] = await recorder.archived()
    want = agent[:8] + [b"\xff" * 160] + agent[9:]  # frame 9 never came
    assert_channels(sidecar, b"".join(want), b"\xff" * 160 * 20)
    side = sidecar["perspectives"][AGENT]
    assert (side["frames"], side["missing"], side["duplicates"], side["reordered"], side["late"]) == (
        19, 1, 2, 1, 0)
    assert sidecar["perspectives"][CALLER]["frames"] == 0


@pytest_twisted.ensureDeferred
async def test_frame_after_window_is_late_and_dropped(recorder_factory):
    """A frame arriving after the reorder window is counted late; its slot stays silent."""
    rec = await recorder_factory(reorder_window=3)
    agent = frames(10, 8)
    conn = await connect(reactor(), rec.port)
    conn.send_all([connected(), start()])
    for seq in [1, 2, 4, 5, 6, 7, 8, 3, 9, 10]:
        conn.send(media(AGENT, seq, agent[seq - 1]))
    conn.send(stop())
    await conn.closed
    [sidecar] = await rec.archived()
    want = agent[:2] + [b"\xff" * 160] + agent[3:]
    assert_channels(sidecar, b"".join(want), b"\xff" * 1600)
    side = sidecar["perspectives"][AGENT]
    assert (side["frames"], side["missing"], side["late"]) == (9, 1, 1)


@pytest_twisted.ensureDeferred
async def test_late_starting_perspective_is_offset(recorder):
    """A perspective that starts later starts at its arrival time, in whole frames."""
    agent, caller = frames(30, 9), frames(10, 10)
    conn = await connect(reactor(), recorder.port)
    conn.send_all([connected(), start()])
    for i in range(10):
        conn.send(media(AGENT, i + 1, agent[i]))
    await sleep(0.3)
    for i in range(10, 30):
        conn.send(media(AGENT, i + 1, agent[i]))
    for i in range(10):
        conn.send(media(CALLER, i + 1, caller[i]))
    conn.send(stop())
    conn.send(stop())
    await conn.closed
    [sidecar] = await recorder.archived()
    offset = sidecar["perspectives"][CALLER]["offsetSamples"]
    assert offset % 160 == 0 and 14 * 160 <= offset <= 30 * 160  # 0.3 s, give or take the host
    length = max(30 * 160, offset + 1600)
    want_right = b"\xff" * offset + b"".join(caller) + b"\xff" * (length - offset - 1600)
    want_left = b"".join(agent) + b"\xff" * (length - 4800)
    assert_channels(sidecar, want_left, want_right)


@pytest_twisted.ensureDeferred
async def test_split_sockets_make_one_recording(recorder):
    """Agent and caller on two sockets with the same callId/sessionId: one recording."""
    agent, caller = frames(25, 11), frames(25, 12)
    a = await connect(reactor(), recorder.port)
    b = await connect(reactor(), recorder.port)
    for conn, p, audio in ((a, AGENT, agent), (b, CALLER, caller)):
        conn.send_all([connected(), start()])
    for i in range(25):
        a.send(media(AGENT, i + 1, agent[i]))
        b.send(media(CALLER, i + 1, caller[i]))
    a.send(stop())
    await sleep(0.05)
    b.send(stop())
    assert (await a.closed)[0] == 1000 and (await b.closed)[0] == 1000
    [sidecar] = await recorder.archived()
    assert_channels(sidecar, b"".join(agent), b"".join(caller))
    assert sidecar["complete"] is True


@pytest_twisted.ensureDeferred
async def test_reconnect_inside_grace_continues_the_recording(recorder_factory):
    """A socket that drops and comes back within the grace period continues the same file."""
    rec = await recorder_factory(reconnect_grace=5.0)
    agent, caller = frames(20, 13), frames(20, 14)
    first = await connect(reactor(), rec.port)
    first.send_all([connected(), start()])
    for i in range(10):
        first.send(media(AGENT, i + 1, agent[i]))
        first.send(media(CALLER, i + 1, caller[i]))
    await sleep(0.1)
    first.drop()
    await first.closed
    await sleep(0.2)
    second = await connect(reactor(), rec.port)
    second.send_all([connected(), start()])
    for i in range(10, 20):
        second.send(media(AGENT, i + 1, agent[i]))
        second.send(media(CALLER, i + 1, caller[i]))
    second.send(stop())
    second.send(stop())
    assert (await second.closed)[0] == 1000
    [sidecar] = await rec.archived()
    assert_channels(sidecar, b"".join(agent), b"".join(caller))
    assert sidecar["complete"] is True and sidecar["endReason"] == "stop"


@pytest_twisted.ensureDeferred
async def test_call_without_stop_is_archived_incomplete(recorder_factory):
    """Sockets gone without Stop: after the grace period the call is archived, incomplete."""
    rec = await recorder_factory(reconnect_grace=0.2)
    agent = frames(10, 15)
    conn = await connect(reactor(), rec.port)
    conn.send_all([connected(), start()] + [media(AGENT, i + 1, agent[i]) for i in range(10)])
    await sleep(0.1)
    conn.drop()
    [sidecar] = await rec.archived()
    assert sidecar["complete"] is False and sidecar["endReason"] == "disconnect"
    assert_channels(sidecar, b"".join(agent), b"\xff" * 1600)


@pytest_twisted.ensureDeferred
async def test_idle_call_times_out(recorder_factory):
    """A call whose socket stays open but silent ends as "timeout" and is closed with 1001."""
    rec = await recorder_factory(idle_timeout=0.3)
    conn = await connect(reactor(), rec.port)
    conn.send_all([connected(), start(), media(AGENT, 1, frames(1, 16)[0])])
    code, _ = await conn.closed
    assert code == 1001
    [sidecar] = await rec.archived()
    assert sidecar["endReason"] == "timeout" and sidecar["complete"] is False


@pytest_twisted.ensureDeferred
async def test_max_duration_cuts_the_call(recorder_factory):
    """A call longer than --max-call-duration is cut and archived as "max-duration"."""
    rec = await recorder_factory(max_call_duration=0.4)
    conn = await connect(reactor(), rec.port)
    conn.send_all([connected(), start()])
    seq = 0
    while conn.proto.state == conn.proto.STATE_OPEN and seq < 200:  # not once our close is sent
        seq += 1
        conn.send(media(AGENT, seq, b"\x10" * 160))
        await sleep(0.02)
    assert (await conn.closed)[0] == 1001
    [sidecar] = await rec.archived()
    assert sidecar["endReason"] == "max-duration"
    assert sidecar["perspectives"][AGENT]["frames"] >= 5


# -- secret ------------------------------------------------------------------

SECRET = "s3cr3t-Value"


def secret_ways():
    return {
        "bearer": dict(headers={"Authorization": "Bearer " + SECRET}),
        "bare-authorization": dict(headers={"Authorization": SECRET}),
        "x-secret": dict(headers={"X-Secret": SECRET}),
        "query": dict(query={"secret": SECRET, "callId": "12345"}),
        "connected": dict(pre=[connected(secret=SECRET), start()]),
        "start": dict(pre=[connected(), dict(start(), secret=SECRET)]),
    }


@pytest_twisted.ensureDeferred
async def test_secret_accepted_in_every_place_and_never_kept(recorder_factory):
    """The secret works from each accepted place and appears in no log line or sidecar."""
    from twisted.logger import formatEvent, globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        rec = await recorder_factory(secrets=["old-one", SECRET])
        ways = secret_ways()
        for n, (name, kw) in enumerate(ways.items()):
            agent = frames(5, 20 + n)
            code, _ = await record_call(rec, agent, [], call_id=f"call-{name}", **kw)
            assert code == 1000, name
        sidecars = await rec.archived(len(ways))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert len(sidecars) == len(ways)
    for sidecar in sidecars:
        assert SECRET not in open(sidecar["_wav"][:-4] + ".json").read()
        assert "secret" not in sidecar["query"]
    for event in seen:
        assert SECRET not in (formatEvent(event) or "") and SECRET not in repr(event)


@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_refused_at_handshake(recorder_factory):
    """A wrong secret at the handshake gets HTTP 403 and nothing is recorded."""
    rec = await recorder_factory(secrets=[SECRET])
    for kw in ({"headers": {"Authorization": "Bearer nope"}}, {"query": {"secret": "nope"}}):
        assert await refused(reactor(), rec.port, **kw) == 403
    await archived_none(rec)


@pytest_twisted.ensureDeferred
async def test_missing_secret_closes_1008_and_keeps_nothing(recorder_factory):
    """No secret before the first Media: close 1008, nothing spooled or archived."""
    rec = await recorder_factory(secrets=[SECRET])
    conn = await connect(reactor(), rec.port)
    conn.send_all([connected(), start(), media(AGENT, 1, b"\x01" * 160)])
    code, _ = await conn.closed
    assert code == 1008
    await archived_none(rec)
    assert os.listdir(os.path.join(rec.settings.spool, "calls")) == []


@pytest_twisted.ensureDeferred
async def test_wrong_secret_in_message_closes_1008(recorder_factory):
    """A wrong secret in the Connected message closes the socket with 1008."""
    rec = await recorder_factory(secrets=[SECRET])
    conn = await connect(reactor(), rec.port)
    conn.send_all([connected(secret="nope"), start(), media(AGENT, 1, b"\x01" * 160)])
    assert (await conn.closed)[0] == 1008
    await archived_none(rec)


# -- bad input: each closes its own socket and costs the call beside it nothing --

BAD_INPUTS = {
    "invalid-json": ([connected(), "{not json"], 1007),
    "not-an-object": ([connected(), "[1, 2]"], 1007),
    "unknown-event": ([connected(), {"event": "Bogus"}], 1003),
    "binary-frame": ([connected(), b"\x00\x01binary"], 1003),
    "media-before-start": ([connected(), media(AGENT, 1, b"\x01" * 160)], 1008),
    "bad-base64": ([connected(), start("bad"), dict(media(AGENT, 1, b""), media="@@@notbase64")], 1007),
    "empty-payload": ([connected(), start("bad"), media(AGENT, 1, b"")], 1007),
    "huge-message": ([connected(), start("bad"), media(AGENT, 1, b"\x01" * (10 * 1024 * 1024))], 1009),
    "huge-payload": ([connected(), start("bad"), media(AGENT, 1, b"\x01" * 9000)], 1007),
    "non-numeric-seq": ([connected(), start("bad"), media(AGENT, "abc", b"\x01" * 160)], 1007),
    "absurd-seq": ([connected(), start("bad"), media(AGENT, "9" * 30, b"\x01" * 160)], 1007),
    "seq-out-of-range": ([connected(), start("bad"), media(AGENT, 1, b"\x01" * 160),
                          media(AGENT, 10**15, b"\x01" * 160)], 1007),
    "unknown-perspective": ([connected(), start("bad"), media("Spy", 1, b"\x01" * 160)], 1007),
    "not-mulaw": ([connected(), start("bad", contentType="audio/l16", sampleRateHertz=16000)], 1003),
    "not-8khz": ([connected(), start("bad", sampleRateHertz=16000)], 1003),
    "second-start-differs": ([connected(), start("bad"), start("other")], 1008),
    "non-ascii-digits": ([connected(), start("bad"), media(AGENT, "\u00b2", b"\x01" * 160)], 1007),
    "deep-nesting": ([connected(), "[" * 60000], 1007),
    "surrogate-in-stop": ([connected(), start("bad"), media(AGENT, 1, b"\x01" * 160),
                           '{"event": "Stop", "metadata": {"x": "\\ud800"}}'], 1007),
    "null-content-type": ([connected(), start("bad", contentType=None, audioContentType="audio/L16")],
                          1003),
    "after-stop": ([connected(), start("bad"), media(AGENT, 1, b"\x01" * 160), stop(),
                    media(AGENT, 2, b"\x01" * 160)], 1000),
}


@pytest_twisted.ensureDeferred
async def test_bad_input_closes_only_its_socket(recorder):
    """Each kind of bad input gets its close code; a call running beside them stays exact."""
    agent, caller = frames(60, 30), frames(60, 31)
    good = await connect(reactor(), recorder.port)
    good.send_all([connected(), start("good-call")])
    results = {}
    for i, (name, (msgs, _)) in enumerate(BAD_INPUTS.items()):
        good.send(media(AGENT, i + 1, agent[i]))
        good.send(media(CALLER, i + 1, caller[i]))
        bad = await connect(reactor(), recorder.port)
        for m in msgs:
            if isinstance(m, dict) and m.get("event") == "Start" and m["metadata"]["callId"] == "bad":
                m = dict(m, metadata=dict(m["metadata"], callId=f"bad-{name}"))  # one call each
            bad.send(m, binary=isinstance(m, bytes))
        results[name] = (await bad.closed)[0]
    for i in range(len(BAD_INPUTS), 60):
        good.send(media(AGENT, i + 1, agent[i]))
        good.send(media(CALLER, i + 1, caller[i]))
    good.send(stop())
    good.send(stop())
    assert (await good.closed)[0] == 1000
    assert results == {name: code for name, (_, code) in BAD_INPUTS.items()}
    await recorder.stop()  # the bad calls that started end now, and are archived
    sidecars = {s["callId"]: s for s in await recorder.archived(1)}
    assert sidecars["bad-after-stop"]["complete"] is True
    assert "bad-not-mulaw" not in sidecars  # refused at Start: nothing recorded
    assert_channels(sidecars["good-call"], b"".join(agent), b"".join(caller))
    assert sidecars["good-call"]["complete"] is True


@pytest_twisted.ensureDeferred
async def test_replay_of_a_stereo_wav_is_archived_exact(recorder, tmp_path):
    """evrecorder-replay streams a stereo WAV; the archive holds it, per channel, as G.711 keeps it."""
    import array
    import subprocess
    import wave

    from evrecorder import replay

    left = array.array("h", [((i * 37) % 2000 - 1000) * 16 for i in range(8000)])
    right = array.array("h", [((i * 91) % 3000 - 1500) * 8 for i in range(8000)])
    both = array.array("h", [s for pair in zip(left, right) for s in pair])
    src = tmp_path / "input.wav"
    with wave.open(str(src), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(both.tobytes())
    out = io.StringIO()
    status = await replay.run(
        reactor(), [str(src), f"ws://127.0.0.1:{recorder.port}/", "--flood", "--call-id", "demo"],
        out=out,
    )
    assert status == 0, out.getvalue()
    [sidecar] = await recorder.archived()
    from evrecorder.g711 import pcm16le_to_ulaw

    assert_channels(sidecar, pcm16le_to_ulaw(left.tobytes()), pcm16le_to_ulaw(right.tobytes()))
    assert sidecar["callId"] == "demo" and sidecar["complete"] is True
    need_tool("soxi", package="sox")  # last: without sox, only this check is skipped
    info = subprocess.run(["soxi", sidecar["_wav"]], capture_output=True, text=True).stdout
    assert "Channels       : 2" in info and "Sample Rate    : 8000" in info


@pytest_twisted.ensureDeferred
async def test_nothing_is_taken_after_a_close_for_missing_secret(recorder_factory):
    """Messages in flight after a 1008 close (even with the secret) record nothing."""
    rec = await recorder_factory(secrets=[SECRET])
    conn = await connect(reactor(), rec.port)
    conn.send_all([connected(), start("late-secret"), media(AGENT, 1, b"\x01" * 160),
                   connected(secret=SECRET), media(AGENT, 2, b"\x01" * 160)])
    assert (await conn.closed)[0] == 1008
    await rec.stop()
    await archived_none(rec, wait=0)
    assert os.listdir(os.path.join(rec.settings.spool, "calls")) == []


@pytest_twisted.ensureDeferred
async def test_stray_stops_do_not_end_a_streaming_perspective(recorder):
    """A repeated Stop, or one on a joining socket that sent no media, ends nothing."""
    agent, caller = frames(20, 100), frames(20, 101)
    a = await connect(reactor(), recorder.port)
    b = await connect(reactor(), recorder.port)
    a.send_all([connected(), start("stray")] + [media(AGENT, i + 1, agent[i]) for i in range(10)])
    b.send_all([connected(), start("stray")] + [media(CALLER, i + 1, caller[i]) for i in range(10)])
    await sleep(0.05)
    a.send_all([stop(perspective=AGENT), stop(perspective=AGENT)])  # a repeat
    retry = await connect(reactor(), recorder.port)  # e.g. the platform's retry after a 5xx
    retry.send_all([connected(), start("stray"), stop()])
    await sleep(0.1)
    assert not b.closed.called
    b.send_all([media(CALLER, i + 1, caller[i]) for i in range(10, 20)] + [stop()])
    assert (await b.closed)[0] == 1000
    [sidecar] = await recorder.archived()
    assert_channels(sidecar, b"".join(agent[:10]) + b"\xff" * 1600, b"".join(caller))
    assert sidecar["complete"] is True
