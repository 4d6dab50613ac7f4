"""The gRPC door in `twistd evrecorder` as a real process: port in use, SIGTERM
drain, kill -9 recovery."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess

import grpc
import pytest_twisted
from twisted.internet import task
from twisted.internet.threads import deferToThread

from conftest import independent_decode, read_pcm16_wav
from grpcclient import OpenStream, dialog_init, segment_stop, send
from test_grpc_service import chunks, dialog_events
from test_process import REPO, TWISTD, free_port, listening, start_twistd, until

_RECORD = struct.Struct(">HIdHH")  # the contract's call.chunks record, read here on our own


def spooled_chunks(spool) -> int:
    """Whole chunk records in every entry's call.chunks (a torn last one not counted)."""
    total = 0
    calls = os.path.join(spool, "calls")
    for name in os.listdir(calls) if os.path.isdir(calls) else ():
        try:
            with open(os.path.join(calls, name, "call.chunks"), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        pos = 0
        while pos + _RECORD.size <= len(data):
            size = _RECORD.unpack_from(data, pos)[4]
            pos += _RECORD.size + size
            if pos <= len(data):
                total += 1
    return total


def test_grpc_port_in_use_fails_the_start_in_one_sentence(tmp_path):
    """--grpc-listen on a port already taken: twistd exits, saying which endpoint and why."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            TWISTD + ["-n", "--pidfile=", "evrecorder", "--listen", "tcp:0:interface=127.0.0.1",
                      "--grpc-listen", f"tcp:{port}:interface=127.0.0.1",
                      "--spool", str(tmp_path / "spool"), "--archive", str(tmp_path / "archive")],
            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
            timeout=60,
        )
    assert out.returncode != 0
    sentence = f"cannot listen on tcp:{port}:interface=127.0.0.1: port {port} is already in use"
    assert sentence in out.stdout + out.stderr


def test_bad_grpc_listen_value_is_one_sentence(tmp_path):
    """A --grpc-listen key file that is not there stops twistd with one sentence naming
    the option, without the usage text (as for --listen)."""
    out = subprocess.run(
        TWISTD + ["-n", "evrecorder", "--grpc-listen", "ssl:443:privateKey=/nonexistent/key.pem"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
        timeout=60,
    )
    said = out.stdout + out.stderr
    assert out.returncode == 1, said
    assert ("--grpc-listen ssl:443:privateKey=/nonexistent/key.pem: the private key file "
            "/nonexistent/key.pem cannot be read: No such file or directory.") in said
    assert "Usage:" not in said and "Traceback" not in said  # the files, not the option's form
    assert "Traceback" not in out.stdout + out.stderr


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_grpc_streams(tmp_path):
    """SIGTERM: new streams UNAVAILABLE, a dialog that finishes in time is complete, the rest "shutdown"."""
    from twisted.internet import reactor

    port, gport = free_port(), free_port()
    proc = start_twistd(tmp_path, port, "drain", "--grpc-listen", f"tcp:{gport}:interface=127.0.0.1",
                        "--drain-timeout", "3", "--reconnect-grace", "0.5")
    try:
        await until(lambda: listening(gport), what="the gRPC port")
        fin_c, fin_a, lin_c = chunks(10, 21), chunks(10, 22), chunks(6, 23)
        finishing, lingering = OpenStream(gport), OpenStream(gport)
        fin_events = dialog_events("finishing", fin_c, fin_a, stop=False)
        finishing.send(*fin_events[:13])
        lingering.send(*dialog_events("lingering", lin_c, [], stop=False))
        await until(lambda: spooled_chunks(tmp_path / "spool") >= 10 + 6, what="chunks on disk")
        proc.send_signal(signal.SIGTERM)
        await task.deferLater(reactor, 0.3, lambda: None)
        code, _ = await deferToThread(send, gport, [dialog_init("late")], timeout=5)
        assert code == grpc.StatusCode.UNAVAILABLE
        finishing.send(*fin_events[13:], segment_stop("a"), segment_stop("c"))
        finishing.close()
        assert await deferToThread(finishing.result) == (grpc.StatusCode.OK, "")
        assert await deferToThread(lingering.result) == (
            grpc.StatusCode.UNAVAILABLE, "call ended: shutdown")
        await until(lambda: proc.poll() is not None, what="twistd to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, -signal.SIGTERM)
    sidecars = {json.loads(p.read_text())["callId"]: (json.loads(p.read_text()), p)
                for p in (tmp_path / "archive").rglob("*.json")}
    assert set(sidecars) == {"finishing", "lingering"}
    fin, fin_path = sidecars["finishing"]
    assert fin["endReason"] == "stop" and fin["complete"] is True
    left, right = read_pcm16_wav(str(fin_path)[:-5] + ".wav")
    assert left == independent_decode(b"".join(fin_a)) and right == independent_decode(b"".join(fin_c))
    lin, lin_path = sidecars["lingering"]
    assert lin["endReason"] == "shutdown" and lin["complete"] is False
    assert read_pcm16_wav(str(lin_path)[:-5] + ".wav")[1] == independent_decode(b"".join(lin_c))
    assert os.listdir(tmp_path / "spool" / "calls") == []


@pytest_twisted.ensureDeferred
async def test_kill_9_mid_dialog_then_restart_recovers_it(tmp_path):
    """kill -9 mid-dialog loses nothing read: the next start archives it as "recovered", exact."""
    port, gport = free_port(), free_port()
    proc = start_twistd(tmp_path, port, "first", "--grpc-listen", f"tcp:{gport}:interface=127.0.0.1")
    contact, agent = chunks(12, 24), chunks(9, 25)
    try:
        await until(lambda: listening(gport), what="the gRPC port")
        stream = OpenStream(gport)
        stream.send(*dialog_events("crash-1", contact, agent, stop=False))
        await until(lambda: spooled_chunks(tmp_path / "spool") == 21, what="chunks on disk")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert (await deferToThread(stream.result))[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not list((tmp_path / "archive").rglob("*.json"))

    proc = start_twistd(tmp_path, free_port(), "second")
    try:
        await until(lambda: list((tmp_path / "archive").rglob("*.json")), what="the recovered dialog")
        await until(lambda: not os.listdir(tmp_path / "spool" / "calls"), what="the spool to empty")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    [path] = list((tmp_path / "archive").rglob("*.json"))
    sidecar = json.loads(path.read_text())
    assert sidecar["source"] == "grpc" and sidecar["callId"] == "crash-1"
    assert sidecar["endReason"] == "recovered" and sidecar["complete"] is False
    left, right = read_pcm16_wav(str(path)[:-5] + ".wav")
    n = len(b"".join(contact))
    assert left == independent_decode(b"".join(agent) + b"\xff" * (n - len(b"".join(agent))))
    assert right == independent_decode(b"".join(contact))
