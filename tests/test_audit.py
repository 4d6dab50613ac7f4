"""`evrecorder verify`, `ls` and `spool` on real archives and spools made by a running recorder.

Recordings are made by a real RecorderService (``recorder_factory``) fed by a
real WebSocket client; the command runs as a subprocess (``python -m
evrecorder.cli``), exactly as an operator would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted

from evrecorder import audit
from evrecorder.stores import MemoryStore
from test_service import AGENT, frames, record_call, sleep
from wsclient import connect, connected, media, start

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m evrecorder.cli ARGS` from the checkout; stdout and stderr as text."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "evrecorder.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def json_lines(text: str) -> tuple[dict[str, dict], dict]:
    """verify --json output: recordings by key, and the summary."""
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines[-1]["type"] == "summary"
    assert all(line["type"] == "recording" for line in lines[:-1])
    return {line["key"]: line for line in lines[:-1]}, lines[-1]


async def dropped_call(rec, call_id: str, n: int = 20) -> None:
    """A call whose socket is lost without Stop: archived incomplete ("disconnect")."""
    from twisted.internet import reactor

    conn = await connect(reactor, rec.port)
    conn.send_all([connected(), start(call_id, 2)])
    for i in range(n):
        conn.send(media(AGENT, i + 1, frames(1, 300 + i)[0]))
    await sleep(0.1)
    conn.drop()


async def make_archive(recorder_factory, calls=("a", "b", "c", "d", "e"), incomplete="x"):
    """A local archive with one complete call per id, and an incomplete one."""
    rec = await recorder_factory(reconnect_grace=0.2)
    for n, call_id in enumerate(calls):
        await record_call(rec, frames(30 + n, 10 + n), frames(25, 20 + n), call_id=call_id)
    await dropped_call(rec, incomplete)
    sidecars = await rec.archived(len(calls) + 1)
    return rec, {s["callId"]: s for s in sidecars}


def stem(sidecar: dict) -> str:
    return sidecar["_wav"][: -len(".wav")]


def age(path: str, seconds: float = 3600) -> None:
    """Make a file look written ``seconds`` ago (older than verify's publish grace)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest_twisted.ensureDeferred
async def test_verify_passes_a_whole_archive_and_lists_incomplete(recorder_factory):
    """Every recording verifies (exit 0); the incomplete one is listed by its endReason."""
    rec, by_call = await make_archive(recorder_factory)

    out = cli("verify", rec.archive, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    results, summary = json_lines(out.stdout)
    assert summary["recordings"] == summary["verified"] == 6 and summary["failed"] == 0
    assert summary["incomplete"] == {"disconnect": 1}
    assert summary["bytes"] == sum(s["audio"]["bytes"] for s in by_call.values())
    x = results[by_call["x"]["key"]]
    assert (x["status"], x["complete"], x["endReason"]) == ("ok", False, "disconnect")

    text = cli("verify", rec.archive)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "OK: every recording verifies." in text.stdout
    assert f"disconnect (1): {by_call['x']['key']}" in text.stdout
    assert text.stderr == ""  # no progress bar when stderr is not a terminal


@pytest_twisted.ensureDeferred
async def test_verify_names_each_damaged_recording(recorder_factory):
    """One flipped byte, a deleted sidecar, a truncated WAV, a deleted WAV: each is named, exit 1."""
    rec, by_call = await make_archive(recorder_factory)
    a, b, c, d = (by_call[k] for k in "abcd")
    with open(a["_wav"], "r+b") as f:  # one byte in the middle of the audio
        f.seek(a["audio"]["bytes"] // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    os.unlink(stem(b) + ".json")
    age(b["_wav"])  # an interrupted publish, not one under way
    with open(c["_wav"], "r+b") as f:
        f.truncate(c["audio"]["bytes"] - 1000)
    os.unlink(d["_wav"])

    out = cli("verify", rec.archive, "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    results, summary = json_lines(out.stdout)
    assert (summary["recordings"], summary["verified"], summary["failed"]) == (6, 2, 4)
    assert (summary["wavWithoutSidecar"], summary["sidecarWithoutWav"]) == (1, 1)
    assert results[a["key"]]["problems"] == [
        "the WAV's SHA-256 differs from the sidecar's: its content changed"]
    assert results[b["key"]]["kind"] == "wav-without-sidecar"
    assert results[b["key"]]["status"] == "failed"
    c_problems = results[c["key"]]["problems"]
    assert f"the WAV holds {c['audio']['bytes'] - 1000} bytes, the sidecar says {c['audio']['bytes']}" in c_problems
    assert any(p.startswith("the WAV is truncated: its header announces") for p in c_problems)
    assert results[d["key"]]["kind"] == "sidecar-without-wav"
    assert results[d["key"]]["problems"] == ["the sidecar's WAV is missing"]
    assert results[by_call["e"]["key"]]["status"] == "ok"

    text = cli("verify", rec.archive)
    assert text.returncode == 1
    for damaged in (a, b, c, d):
        assert f"FAILED     {damaged['key']}: " in text.stdout
    assert "NOT OK: 4 recording(s) do not verify." in text.stdout


@pytest_twisted.ensureDeferred
async def test_verify_checks_header_duration_and_schema(recorder_factory):
    """A sidecar whose duration or schema is wrong, or that is not JSON, fails with that reason."""
    rec, by_call = await make_archive(recorder_factory, calls=("a", "b", "c"))
    a, b, c = (by_call[k] for k in "abc")
    side = json.loads(Path(stem(a) + ".json").read_text())
    side["audio"]["durationSeconds"] += 0.5
    Path(stem(a) + ".json").write_text(json.dumps(side))
    side = json.loads(Path(stem(b) + ".json").read_text())
    side["schema"] = "someone-else/7"
    Path(stem(b) + ".json").write_text(json.dumps(side))
    Path(stem(c) + ".json").write_text("{not json")

    out = cli("verify", rec.archive, "--json")
    assert out.returncode == 1
    results, summary = json_lines(out.stdout)
    expected = a["audio"]["durationSeconds"]
    assert results[a["key"]]["problems"] == [
        f"the WAV lasts {expected:.3f} s, the sidecar says {expected + 0.5:.3f} s"]
    assert results[b["key"]]["problems"] == [
        "the sidecar names the schema 'someone-else/7', which this version does not know"]
    assert results[c["key"]]["problems"][0].startswith("the sidecar is not valid JSON")


@pytest_twisted.ensureDeferred
async def test_verify_since_and_publish_grace(recorder_factory):
    """--since skips what was archived before; a young WAV without sidecar is "publishing", not failed."""
    rec, by_call = await make_archive(recorder_factory, calls=("a", "b"))
    a, b = by_call["a"], by_call["b"]
    for path in (a["_wav"], stem(a) + ".json"):
        age(path, 3 * 86400)
    os.unlink(stem(b) + ".json")  # b's WAV is fresh: a publish may be under way

    out = cli("verify", rec.archive, "--json", "--since", "1d")
    assert out.returncode == 0, out.stdout
    results, summary = json_lines(out.stdout)
    assert a["key"] not in results
    assert results[b["key"]]["status"] == "publishing"
    assert (summary["recordings"], summary["publishing"]) == (2, 1)  # b and the incomplete x
    strict = cli("verify", rec.archive, "--json", "--publish-grace", "0")
    assert strict.returncode == 1


@pytest_twisted.ensureDeferred
async def test_ls_newest_first_with_filters(recorder_factory):
    """ls lists every recording newest first; --call-id, --agent-id, --incomplete and --since filter."""
    rec, by_call = await make_archive(recorder_factory, calls=("a", "b", "c"))

    out = cli("ls", rec.archive, "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    expected = sorted(by_call.values(), key=lambda s: s["timing"]["firstMediaAt"], reverse=True)
    assert [r["callId"] for r in rows] == [s["callId"] for s in expected]
    row = next(r for r in rows if r["callId"] == "b")
    b = by_call["b"]
    assert row == dict(
        key=b["key"], start=b["timing"]["firstMediaAt"], callId="b", sessionId="2", agentId="123",
        durationSeconds=b["audio"]["durationSeconds"], complete=True, endReason="stop",
        source="websocket", problems=[],
    )
    assert [r["callId"] for r in json.loads(cli("ls", rec.archive, "--json", "--call-id", "c").stdout)] == ["c"]
    assert [r["callId"] for r in json.loads(cli("ls", rec.archive, "--json", "--incomplete").stdout)] == ["x"]
    assert json.loads(cli("ls", rec.archive, "--json", "--agent-id", "999").stdout) == []
    assert json.loads(cli("ls", rec.archive, "--json", "--since", "2000-01-01", "--until", "2001-01-01").stdout) == []
    assert len(json.loads(cli("ls", rec.archive, "--json", "--since", "1h").stdout)) == 4

    table = cli("ls", rec.archive).stdout.splitlines()
    assert table[0].split() == ["START", "CALLID", "SESSIONID", "AGENT", "DURATION", "COMPLETE",
                                "ENDREASON", "KEY"]
    assert table[1].split()[1] == expected[0]["callId"] and table[-1] == "4 recording(s)"
    [x_row] = [line.split() for line in table if " x " in line]
    assert x_row[-3:] == ["no", "disconnect", by_call["x"]["key"]]


@pytest_twisted.ensureDeferred
async def test_spool_shows_calls_in_progress_waiting_and_set_aside(recorder_factory):
    """A running call, a finalized one the store refuses, and a quarantined entry, each with its state."""
    from twisted.internet import reactor

    store = MemoryStore()
    store.fail_with = "the bucket 'x' does not exist"
    rec = await recorder_factory(store=store, retry_initial=30.0, retry_max=60.0)
    await record_call(rec, frames(10, 1), frames(10, 2), call_id="done-1")
    conn = await connect(reactor, rec.port)
    conn.send_all([connected(), start("live-1", 2)])
    conn.send(media(AGENT, 1, frames(1, 3)[0]))
    spool = Path(rec.settings.spool)
    calls = spool / "calls"
    for _ in range(200):
        names = os.listdir(calls)
        if len(names) == 2 and any((calls / n / "sidecar.json").exists() for n in names):
            break
        await sleep(0.05)
    quarantine = spool / "quarantine" / "1700000000000-bad-1-2-deadbeef"
    quarantine.mkdir(parents=True)
    (quarantine / "call.frames").write_bytes(b"\0" * 100)
    (quarantine / "reason.txt").write_text("call.json is missing; frames kept\n")
    live_name = next(n for n in os.listdir(calls) if "live-1" in n)
    (calls / live_name / "something.new").write_text("a future version's file")

    out = cli("spool", str(spool), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    by_call = {e.get("callId"): e for e in report["entries"]}
    assert by_call["live-1"]["state"] == "in progress" and by_call["live-1"]["held"] is True
    assert by_call["live-1"]["otherFiles"] == ["something.new"]
    done = by_call["done-1"]
    assert done["state"] == "waiting for the store" and done["endReason"] == "stop"
    assert done["key"].endswith("/done-1-2") and done["held"] is True
    assert report["setAside"] == [{
        "name": quarantine.name, "bytes": 100 + len("call.json is missing; frames kept\n"),
        "ageSeconds": report["setAside"][0]["ageSeconds"],
        "reason": "call.json is missing; frames kept", "files": ["call.frames", "reason.txt"],
    }]
    assert report["counts"] == {"in progress": 1, "waiting for the store": 1}

    text = cli("spool", str(spool))
    assert text.returncode == 0
    assert "1 in progress, 1 waiting for the store; 1 set aside" in text.stdout
    assert "call.json is missing; frames kept" in text.stdout

    retry = cli("spool", str(spool), "--retry", quarantine.name)
    assert retry.returncode == 0, retry.stderr
    request = json.loads((spool / "retry" / quarantine.name).read_text())
    assert request["entry"] == quarantine.name
    assert f"retry requested: {quarantine.name}" in cli("spool", str(spool)).stdout
    missing = cli("spool", str(spool), "--retry", "no-such-entry")
    assert missing.returncode == 2
    assert "has no entry 'no-such-entry'" in missing.stderr
    conn.drop()


@pytest_twisted.ensureDeferred
async def test_spool_tells_a_crash_leftover_from_a_live_call(recorder_factory, tmp_path):
    """An entry no live process holds (a recorder that died) is "left by a crash"."""
    from twisted.internet import reactor

    rec = await recorder_factory(reconnect_grace=30.0)
    conn = await connect(reactor, rec.port)
    conn.send_all([connected(), start("crashed-1", 2)])
    conn.send(media(AGENT, 1, frames(1, 3)[0]))
    await sleep(0.3)
    calls = Path(rec.settings.spool) / "calls"
    [name] = os.listdir(calls)
    copy = tmp_path / "copy" / "calls"
    copy.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(calls / name), str(copy / name)], check=True)

    report = json.loads(cli("spool", str(copy.parent), "--json").stdout)
    [entry] = report["entries"]
    assert (entry["state"], entry["held"], entry["callId"]) == ("left by a crash", False, "crashed-1")
    conn.drop()


def test_archive_errors_are_one_sentence(tmp_path):
    """A missing directory, an unknown scheme or a bad date: exit 2 with a sentence."""
    out = cli("verify", str(tmp_path / "nowhere"))
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"evrecorder verify: the archive file://{tmp_path / 'nowhere'} cannot be read: "
        f"the archive directory {tmp_path / 'nowhere'} does not exist.")
    out = cli("spool", str(tmp_path / "no-spool"))
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"evrecorder spool: the spool directory {tmp_path / 'no-spool'} does not exist.")
    out = cli("ls", "ftp://host/x")
    assert out.returncode == 2 and "unknown scheme" in out.stderr
    (tmp_path / "a").mkdir()
    out = cli("verify", str(tmp_path / "a"), "--since", "yesterday-ish")
    assert out.returncode == 2 and "--since: 'yesterday-ish' is not a date" in out.stderr


@pytest.mark.parametrize("data, problem", [
    (b"RIFX\0\0\0\0WAVE", "it does not start with a RIFF/WAVE header"),
    (b"RIFF\0\0\0\0WAVEdata\0\0\0\0", "its data chunk comes before its fmt chunk"),
    (b"RIFF\0\0\0\0WAVEfmt \x04\0\0\0abcd", "its fmt chunk is too short"),
    (b"RIFF\0\0\0\0WAVELIST\x04\0\0\0abcd", "it has no data chunk in its first 4 KiB"),
])
def test_bad_wav_headers_are_named(data, problem):
    """A header that is not RIFF/WAVE, or misses its chunks, is refused with what is wrong."""
    with pytest.raises(ValueError, match=problem):
        audit.parse_wav_header(data)


def test_when_accepts_dates_times_and_ages():
    """--since/--until take a date, an ISO time (UTC by default) or an age."""
    now = 1_800_000_000.0
    assert audit.parse_when("2d", now) == now - 2 * 86400
    assert audit.parse_when("36h", now) == now - 36 * 3600
    assert audit.parse_when("2026-11-24", now) == 1795478400.0
    assert audit.parse_when("2026-11-24T01:00:00+01:00", now) == 1795478400.0
    with pytest.raises(ValueError, match="is not a date"):
        audit.parse_when("soon", now)


def test_progress_bar_draws_on_a_terminal():
    """The progress bar writes a carriage-return line with the share of bytes done."""
    import io

    from evrecorder.cli import Progress

    out = io.StringIO()
    bar = Progress(out, total_bytes=1000, total=2)
    bar.step(500, clock=lambda: 10.0)
    bar.step(500, clock=lambda: 10.1)
    lines = out.getvalue().split("\r")
    assert "[###############               ]  50%  1/2 recordings" in lines[1]
    assert "100%  2/2 recordings, 1.0 KB of 1.0 KB" in lines[2]


def test_run_bounded_takes_few_items_ahead_and_keeps_order():
    """At most 2 x workers items are taken before their results are handed on, in item order."""
    import threading

    taken = []
    handed = []
    lock = threading.Lock()

    def items():
        for n in range(50):
            with lock:
                taken.append(n)
                assert len(taken) - len(handed) <= 2 * 3 + 1
            yield n

    for result in audit.run_bounded(items(), lambda n: n * n, workers=3):
        handed.append(result)
    assert handed == [n * n for n in range(50)]


@pytest_twisted.ensureDeferred
async def test_progress_bar_on_a_terminal_only(recorder_factory):
    """With stderr on a terminal (a pty) verify draws its bar there; stdout keeps the report."""
    import pty

    rec, _ = await make_archive(recorder_factory, calls=("a",))
    master, slave = pty.openpty()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "evrecorder.cli", "verify", rec.archive],
            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=slave,
            text=True, timeout=120)
        os.close(slave)
        slave = None
        drawn = b""
        while True:
            try:
                block = os.read(master, 4096)
            except OSError:  # EIO: the writer is gone
                break
            if not block:
                break
            drawn += block
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert out.returncode == 0 and "OK: every recording verifies." in out.stdout
    assert b"100%  2/2 recordings" in drawn
    assert b"[##############################]" in drawn


class MemoryArchive:
    """An archive in a dict, answering like S3 (head fields given per object)."""

    def __init__(self, objects: dict[str, bytes], heads: dict[str, dict]):
        self.objects, self.heads = objects, heads

    def list(self):
        for name in sorted(self.objects):
            yield audit.ObjectInfo(name, len(self.objects[name]), 0.0)

    def read(self, name, limit=audit.MAX_SIDECAR):
        return self.objects[name][: limit + 1], dict(self.heads.get(name, {}))

    def stream(self, name):
        data = self.objects[name]
        blocks = (data[i:i + 1000] for i in range(0, len(data), 1000))
        return audit.Stream(blocks, dict(self.heads.get(name, {})), lambda: None)


@pytest.mark.parametrize("head, problem, how", [
    ({"ChecksumSHA256": "AAAA"}, "S3's stored SHA-256 checksum differs from the WAV's content",
     "whole"),
    ({"ChecksumSHA256": "AAAA-1", "ETag": '"x-1"'},
     "S3's stored SHA-256 checksum (of the parts) differs from the WAV's content", "parts"),
])
def test_a_stored_checksum_that_differs_is_named(head, problem, how):
    """When the checksum S3 stored is not the content's (whole object or parts), verify says so."""
    import hashlib

    from evrecorder import wav

    data = wav.header("mulaw", 800) + bytes(1600)
    sidecar = {"schema": "evrecorder/1", "key": "k", "audio": {
        "encoding": "mulaw", "sampleRateHertz": 8000, "channels": 2, "durationSeconds": 0.1,
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    archive = MemoryArchive({"k.wav": data, "k.json": json.dumps(sidecar).encode()},
                            {"k.wav": head})
    [pair] = audit.pairs(archive.list())
    result = audit.verify_recording(archive, pair, now=0.0)
    assert (result.problems, result.stored_checksum) == ([problem], how)
    archive.heads["k.wav"] = {"ChecksumSHA256": audit._b64(hashlib.sha256(data).digest())}
    assert audit.verify_recording(archive, pair, now=0.0).status == "ok"


def test_console_script_is_declared():
    """setup.cfg installs `evrecorder` as a console script that reaches the CLI's main()."""
    import configparser
    import importlib

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    scripts = dict(
        line.split(" = ") for line in config["options.entry_points"]["console_scripts"].split("\n")
        if line.strip()
    )
    module, _, function = scripts["evrecorder"].partition(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0


def test_a_sidecar_whose_stored_checksum_differs_is_named():
    """A sidecar object whose stored SHA-256 is not its content's fails (a changed sidecar)."""
    import hashlib

    from evrecorder import wav

    data = wav.header("mulaw", 80) + bytes(160)
    sidecar = json.dumps({"schema": "evrecorder/1", "key": "k", "audio": {
        "encoding": "mulaw", "sampleRateHertz": 8000, "channels": 2, "durationSeconds": 0.01,
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}).encode()
    other = audit._b64(hashlib.sha256(sidecar + b" ").digest())
    archive = MemoryArchive({"k.wav": data, "k.json": sidecar}, {"k.json": {"ChecksumSHA256": other}})
    [pair] = audit.pairs(archive.list())
    assert audit.verify_recording(archive, pair, now=0.0).problems == [
        "S3's stored SHA-256 checksum of the sidecar differs from its content"]


def test_verify_memory_does_not_grow_with_incomplete_recordings(tmp_path):
    """verify's memory does not grow with the archive: a few keys per endReason for the
    report (not every incomplete one's), and no 16 MiB reserved for each sidecar read."""
    import hashlib
    import io
    import tracemalloc

    from evrecorder import cli as cli_module, wav

    data = wav.header("pcm16", 0)
    sha = hashlib.sha256(data).hexdigest()
    n = 6000
    for i in range(n):
        # Long keys (as a key template may make), 100 recordings a directory.
        key = f"{i // 100:02d}/{'k' * 200}/{'e' * 200}/{'z' * 190}/{i:05d}-{'y' * 200}"
        path = tmp_path / "archive" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        Path(str(path) + ".wav").write_bytes(data)
        Path(str(path) + ".json").write_text(json.dumps({
            "schema": "evrecorder/1", "key": key, "callId": str(i), "sessionId": "1",
            "audio": {"encoding": "pcm16", "sampleRateHertz": 8000, "channels": 2,
                      "durationSeconds": 0.0, "bytes": len(data), "sha256": sha},
            "timing": {"firstMediaAt": "2026-11-27T10:00:00.000Z"},
            "complete": False, "endReason": "disconnect",
        }))
    out, err = io.StringIO(), io.StringIO()
    tracemalloc.start()
    try:
        status = cli_module.main(["verify", str(tmp_path / "archive"), "--no-progress"],
                                 out=out, err=err)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 0, out.getvalue() + err.getvalue()
    assert f"disconnect ({n}): " in out.getvalue() and " ..." in out.getvalue()
    # About 4 MB whatever n; each key kept adds 0.9 KB (5 MB here), each
    # sidecar read reserving 16 MiB much more.
    assert peak < 6_500_000, f"peak {peak} bytes"
