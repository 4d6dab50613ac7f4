"""The recorder service on a real port, driven by a real WebSocket client."""

from __future__ import annotations

import hashlib
import json
import os

import pytest_twisted
from twisted.internet import task

from conftest import independent_decode, read_mulaw_wav, read_pcm16_wav
from wsclient import HandshakeRefused, connect, connected, media, start, stop

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
