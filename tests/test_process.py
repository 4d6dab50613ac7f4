"""`twistd evrecorder` as a real process: the installed plugin, and kill -9 recovery."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import task

from conftest import independent_decode, read_pcm16_wav
from test_service import AGENT, CALLER, frames
from wsclient import connect, connected, media, start

_CALL_RECORD = struct.Struct(">BQH")  # perspective index, sequenceId, payload length
_PERSPECTIVES = ("Participant", "Conference")


def spooled_frames(entry, perspective):
    """Whole frames of ``perspective`` in a spool entry's ``call.frames`` (read
    here, independently of the recorder; a record being written is not counted)."""
    try:
        with open(os.path.join(entry, "call.frames"), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    index, pos, count = _PERSPECTIVES.index(perspective), 0, 0
    while pos + _CALL_RECORD.size <= len(data):
        p, _, size = _CALL_RECORD.unpack_from(data, pos)
        pos += _CALL_RECORD.size + size
        if pos > len(data):
            break
        count += p == index
    return count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# twistd of the Python running the tests (python -m twisted is `twist`, not twistd).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def test_installed_plugin_is_found(tmp_path):
    """After `pip install .`, `twistd --help` lists evrecorder (outside the checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        TWISTD + ["--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "evrecorder" in out.stdout, "the installed package's twistd plugin is not found"
    usage = subprocess.run(
        TWISTD + ["evrecorder", "--help"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=60,
    )
    assert "--reorder-window" in usage.stdout and "--key-template" in usage.stdout


@pytest.mark.parametrize("argv, sentence", [
    (["--format", "flac"], "--format must be pcm16 or mulaw (got 'flac')."),
    (["--listen", "systemd:domain=INET:name=nope"],
     "--listen systemd:domain=INET:name=nope: no socket named 'nope' was passed in by systemd"),
    (["--listen", "ssl:3443:privateKey=/nonexistent/key.pem"], "--listen ssl:3443:privateKey="),
])
def test_bad_option_is_one_sentence(tmp_path, argv, sentence):
    """A wrong option value stops twistd with a sentence naming the option."""
    out = subprocess.run(
        TWISTD + ["-n", "evrecorder", *argv], cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    assert sentence in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_twistd(tmp_path, port: int, name: str, *options: str) -> subprocess.Popen:
    """twistd evrecorder from the checkout; twistd options (--logger) may lead ``options``."""
    log = open(tmp_path / f"{name}.log", "wb")
    twistd_opts = [o for o in options if o.startswith("--logger") or o.startswith("evrecorder.logs")]
    ours = [o for o in options if o not in twistd_opts]
    return subprocess.Popen(
        TWISTD + ["-n", "--pidfile=", *twistd_opts, "evrecorder",
                  "--listen", f"tcp:{port}:interface=127.0.0.1",
                  "--spool", str(tmp_path / "spool"), "--archive", str(tmp_path / "archive"), *ours],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO), stdout=log, stderr=subprocess.STDOUT,
        # As systemd's UMask= would set it. Not with preexec_fn: that makes the
        # child run grpcio's fork handlers (this process has gRPC threads from
        # earlier tests), and a child stuck there never became twistd.
        umask=0o027,
    )


async def until(predicate, timeout: float = 20.0, what: str = "condition", logs=()):
    """Wait for ``predicate``; on a time-out, the end of each of ``logs`` (the
    twistd processes' log files) is in the failure, to say what they did."""
    from twisted.internet import reactor

    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            tails = []
            for path in logs:
                try:
                    with open(path, encoding="utf-8", errors="replace") as f:
                        tails.append(f"--- {path}:\n" + "".join(f.readlines()[-40:]))
                except OSError as e:
                    tails.append(f"--- {path}: {e}")
            raise AssertionError("\n".join([f"timed out waiting for {what}", *tails]))
        await task.deferLater(reactor, 0.05, lambda: None)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest_twisted.ensureDeferred
async def test_kill_9_mid_call_then_restart_recovers_the_call(tmp_path):
    """kill -9 mid-call loses nothing received: the next start archives it as "recovered"."""
    from twisted.internet import reactor

    port = free_port()
    proc = start_twistd(tmp_path, port, "first")
    try:
        await until(lambda: listening(port), what="the recorder to listen")
        agent, caller = frames(50, 40), frames(45, 41)
        conn = await connect(reactor, port, query={"callId": "crash-1", "sessionId": "7"})
        conn.send_all([connected(), start("crash-1", 7)])
        order = list(range(1, 51))
        order[10], order[11] = order[11], order[10]  # one reordered pair, still in the window
        for seq in order:
            conn.send(media(AGENT, seq, agent[seq - 1]))
            if seq <= 45:
                conn.send(media(CALLER, seq, caller[seq - 1]))

        def spooled(perspective, count):
            calls = tmp_path / "spool" / "calls"
            return any(spooled_frames(calls / d, perspective) == count for d in os.listdir(calls))

        await until(lambda: spooled(AGENT, 50) and spooled(CALLER, 45), what="frames on disk")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        conn.drop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not list((tmp_path / "archive").rglob("*.json"))  # nothing archived before the restart

    port = free_port()
    proc = start_twistd(tmp_path, port, "second")
    try:
        await until(lambda: list((tmp_path / "archive").rglob("*.json")), what="the recovered call")
        await until(lambda: not os.listdir(tmp_path / "spool" / "calls"), what="the spool to empty")
    finally:
        proc.send_signal(signal.SIGTERM)
        # twistd re-raises the stopping signal after a clean shutdown ("Server
        # Shut Down"), so the exit status is -SIGTERM; systemd counts it a success.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    [sidecar_path] = list((tmp_path / "archive").rglob("*.json"))
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["endReason"] == "recovered" and sidecar["complete"] is False
    assert sidecar["callId"] == "crash-1" and sidecar["sessionId"] == "7"
    assert sidecar["perspectives"][AGENT]["reordered"] == 1
    left, right = read_pcm16_wav(str(sidecar_path)[:-5] + ".wav")
    assert left == independent_decode(b"".join(agent))
    assert right == independent_decode(b"".join(caller) + b"\xff" * 160 * 5)


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_then_archives_the_rest_as_shutdown(tmp_path):
    """SIGTERM: new handshakes get 503, a call that stops in time completes, the rest end "shutdown"."""
    from twisted.internet import reactor

    from wsclient import refused

    port = free_port()
    proc = start_twistd(tmp_path, port, "drain", "--drain-timeout", "3",
                        "--logger", "evrecorder.logs.json_observer")
    try:
        await until(lambda: listening(port), what="the recorder to listen")
        finishing = await connect(reactor, port)
        lingering = await connect(reactor, port)
        agent = frames(10, 70)
        finishing.send_all([connected(), start("finishing")] + [media(AGENT, i + 1, agent[i]) for i in range(5)])
        lingering.send_all([connected(), start("lingering")] + [media(AGENT, i + 1, agent[i]) for i in range(5)])
        await task.deferLater(reactor, 0.3, lambda: None)
        proc.send_signal(signal.SIGTERM)
        await task.deferLater(reactor, 0.3, lambda: None)
        assert await refused(reactor, port) == 503  # draining
        finishing.send_all([media(AGENT, i + 1, agent[i]) for i in range(5, 10)]
                           + [{"event": "Stop", "metadata": {}}])
        assert (await finishing.closed)[0] == 1000
        assert (await lingering.closed)[0] == 1001  # ended by the drain timeout
        await until(lambda: proc.poll() is not None, what="twistd to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, -signal.SIGTERM)
    sidecars = {json.loads(p.read_text())["callId"]: json.loads(p.read_text())
                for p in (tmp_path / "archive").rglob("*.json")}
    assert sidecars["finishing"]["endReason"] == "stop"
    assert sidecars["finishing"]["perspectives"][AGENT]["frames"] == 10
    assert sidecars["lingering"]["endReason"] == "shutdown"
    assert sidecars["lingering"]["complete"] is False
    for path in (tmp_path / "archive").rglob("*.*"):
        assert path.stat().st_mode & 0o777 == 0o640  # the process umask, not mkstemp's 0600
    assert os.listdir(tmp_path / "spool" / "calls") == []
    # --logger evrecorder.logs.json_observer: every line is a JSON object with the fields.
    records = [json.loads(line) for line in (tmp_path / "drain.log").read_text().splitlines() if line]
    archived = [r for r in records if r["text"].startswith("archived lingering/")]
    assert archived and archived[0]["call_id"] == "lingering" and archived[0]["level"] == "info"
