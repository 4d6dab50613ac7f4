"""evrecorder-replay over grpc:// and grpcs:// against a real recorder: what it
sends is what the archive holds, sample for sample, for each codec."""

from __future__ import annotations

import array
import io
import subprocess
import wave

import pytest_twisted

from conftest import read_mulaw_wav, read_pcm16_wav
from test_grpc_service import GRACE, reactor


def stereo_wav(path, seconds: float, rate: int = 8000) -> tuple[list[int], list[int]]:
    """A 16-bit stereo WAV of two different tones-with-noise; its left and right samples."""
    n = int(seconds * rate)
    left = [((i * 37) % 2000 - 1000) * 9 for i in range(n)]
    right = [((i * 53) % 3000 - 1500) * 7 for i in range(n)]
    frames = array.array("h", [s for pair in zip(left, right) for s in pair])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())
    return left, right


def mulaw_wav(path, seconds: float) -> tuple[list[int], list[int]]:
    """A stereo G.711 mu-law WAV (made by sox); its left and right samples as sox decodes them."""
    stereo_wav(str(path) + ".pcm.wav", seconds)
    subprocess.run(["sox", str(path) + ".pcm.wav", "-e", "u-law", str(path)], check=True)
    left, right, _ = read_mulaw_wav(str(path))
    return left, right


def sox_decode(coded: bytes, encoding: str) -> list[int]:
    """8-bit G.711 bytes (u-law or a-law) decoded by sox."""
    back = subprocess.run(
        ["sox", "-t", "raw", "-e", encoding, "-b", "8", "-r", "8000", "-c", "1", "-", "-t", "s16",
         "-e", "signed", "-L", "-"], input=coded, capture_output=True, check=True).stdout
    out = array.array("h")
    out.frombytes(back)
    return list(out)


async def replay(argv) -> tuple[int, str]:
    from evrecorder import replay as replay_mod

    out, err = io.StringIO(), io.StringIO()
    status = await replay_mod.run(reactor(), argv, out=out, err=err)
    return status, out.getvalue() + err.getvalue()


@pytest_twisted.ensureDeferred
async def test_replay_grpc_pcmu_is_exact(recorder_factory, tmp_path):
    """grpc:// PCMU 100 ms chunks: agent = left, caller = right, as sox encodes them; exit 0."""
    rec = await recorder_factory(grpc_listen=True, reconnect_grace=GRACE)
    left, right = mulaw_wav(tmp_path / "call.wav", 1.0)
    status, text = await replay([str(tmp_path / "call.wav"), f"grpc://127.0.0.1:{rec.grpc_port}",
                                 "--flood", "--call-id", "rp-1"])
    assert status == 0, text
    assert "CONTACT 10, AGENT 10 chunks, 16000 bytes (PCMU 8000 Hz, 100 ms); ended OK" in text
    [sidecar] = await rec.archived()
    assert sidecar["callId"] == "rp-1" and sidecar["complete"] is True
    assert read_pcm16_wav(sidecar["_wav"]) == (left, right)


@pytest_twisted.ensureDeferred
async def test_replay_grpcs_with_token_ca_calls_and_connections(recorder_factory, tmp_path):
    """grpcs:// with --ca and --token: 3 dialogs over 2 connections, all archived; a wrong token exits 1."""
    from test_tls import make_certificate

    key, cert = make_certificate(tmp_path)
    rec = await recorder_factory(
        grpc_listen=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        reconnect_grace=GRACE, secrets=["tok-1"])
    left, right = mulaw_wav(tmp_path / "call.wav", 0.5)
    url = f"grpcs://127.0.0.1:{rec.grpc_port}"
    status, text = await replay([str(tmp_path / "call.wav"), url, "--ca", cert, "--token", "tok-1",
                                 "--flood", "--calls", "3", "--connections", "2", "--call-id", "tls"])
    assert status == 0, text
    assert "3 dialog(s): 3 ended OK, 0 failed" in text
    sidecars = await rec.archived(3)
    assert sorted(s["callId"] for s in sidecars) == ["tls-1", "tls-2", "tls-3"]
    for sidecar in sidecars:
        assert read_pcm16_wav(sidecar["_wav"]) == (left, right)
    # In real time, so the refusal normally arrives before the second event is written:
    # grpcio's asyncio client masks the server's status as INTERNAL when a write fails
    # after it (grpc/grpc#36066); the replay then says so instead of hiding it.
    status, text = await replay([str(tmp_path / "call.wav"), url, "--ca", cert, "--token", "nope"])
    assert status == 1, text
    assert "ended UNAUTHENTICATED" in text or "its log says why, e.g. a wrong --token" in text, text


@pytest_twisted.ensureDeferred
async def test_replay_grpc_pcma_realtime_20ms(recorder_factory, tmp_path):
    """--codec pcma --ptime 20 in real time: the archive holds the A-law sent, as sox decodes it."""
    from evrecorder.replaygrpc import pcm16le_to_alaw

    rec = await recorder_factory(grpc_listen=True, reconnect_grace=GRACE)
    left, right = stereo_wav(tmp_path / "call.wav", 0.4)
    status, text = await replay([str(tmp_path / "call.wav"), f"grpc://127.0.0.1:{rec.grpc_port}",
                                 "--codec", "pcma", "--ptime", "20"])
    assert status == 0, text
    assert "CONTACT 20, AGENT 20 chunks" in text and "(PCMA 8000 Hz, 20 ms)" in text
    [sidecar] = await rec.archived()
    got_left, got_right = read_pcm16_wav(sidecar["_wav"])
    assert got_left == sox_decode(pcm16le_to_alaw(array.array("h", left).tobytes()), "a-law")
    assert got_right == sox_decode(pcm16le_to_alaw(array.array("h", right).tobytes()), "a-law")
    # The encoder is G.711's: each sample within one A-law step of the source.
    assert all(abs(a - b) <= max(16, abs(b) // 16) for a, b in zip(got_left, left))


@pytest_twisted.ensureDeferred
async def test_replay_grpc_l16_at_16k(recorder_factory, tmp_path):
    """--codec l16 with a 16 kHz file: sent big-endian at 16 kHz, archived as the very samples."""
    rec = await recorder_factory(grpc_listen=True, reconnect_grace=GRACE)
    left, right = stereo_wav(tmp_path / "wide.wav", 0.5, rate=16000)
    status, text = await replay([str(tmp_path / "wide.wav"), f"grpc://127.0.0.1:{rec.grpc_port}",
                                 "--codec", "l16", "--flood"])
    assert status == 0, text
    assert "(L16 16000 Hz, 100 ms)" in text
    [sidecar] = await rec.archived()
    with wave.open(sidecar["_wav"], "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 2, 2)
        data = array.array("h")
        data.frombytes(w.readframes(w.getnframes()))
    assert list(data[0::2]) == left and list(data[1::2]) == right


@pytest_twisted.ensureDeferred
async def test_replay_grpc_usage_errors(tmp_path):
    """A bad grpc address or an unreadable CA: exit 2 with a sentence."""
    stereo_wav(tmp_path / "call.wav", 0.1)
    status, text = await replay([str(tmp_path / "call.wav"), "grpc://127.0.0.1"])
    assert status == 2 and "is not a grpc://HOST:PORT" in text
    status, text = await replay([str(tmp_path / "call.wav"), "grpcs://127.0.0.1:1", "--ca", "/nonexistent"])
    assert status == 2 and "cannot read the CA file /nonexistent" in text


