"""Benchmark evrecorder (or the websockets baseline) under a simulated contact centre.

The recorder runs pinned to core 0 (``taskset -c 0``), the load generator
(``loadgen.py``, several processes) and this script to core 1.  For each run:

* the recorder starts on a fresh spool and archive on 127.0.0.1;
* its CPU time (utime+stime of /proc/PID/stat, and of its reactor thread) and
  RSS (VmRSS) are sampled before, during and after the load;
* the archive is polled every 50 ms for new sidecars (Stop-to-archived latency);
* every recording is then VERIFIED against what was sent: the sidecar exists,
  ``complete`` is true, each perspective's ``frames`` equals the frames sent,
  ``missing``/``duplicates``/``late`` are 0, the WAV is 8 kHz PCM16 stereo,
  agent left, and its samples equal the sent mu-law decoded (with ``audioop``,
  an implementation independent of the recorder's), and the sidecar's sha256 is
  the WAV's.  A run that loses or alters a frame FAILS, however fast it was.

Modes (``--server evrecorder|baseline|both``; with ``both`` the report gives
evrecorder's figures as ratios to the baseline's):

``--flood``
    ``--calls`` calls of ``--frames`` frames per perspective, as fast as TCP
    lets them: CPU-us per message and messages per second at saturation.
``--realtime N --seconds S``
    N calls held for S seconds at the platform's pace (a frame per perspective
    every 20 ms): CPU share, CPU-us per message, RSS per active call, backlog
    while running (probe ping round trip) and at the end (final Stop to the
    server's close), Stop-to-archived latency.
``--find-capacity``
    Realtime runs with N going up (``--steps``, or doubling from ``--start``
    and then bisecting) until a step fails: frames lost or altered, a call not
    closed with 1000, backlog p99 (Stop or ping) above ``--max-backlog`` (1 s), or the
    recorder using more than ``--max-cpu`` (95 %) of its core.  Reports the
    largest N held.

``--profile DIR`` records the recorder with py-spy during the run (raw
collapsed stacks) and writes a text summary of where its time goes.

Everything runs on 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import wave
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, REPO)

import loadgen  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop  # independent of the recorder's decoder (gone in 3.13)
    except ImportError:  # pragma: no cover
        audioop = None

CLK_TCK = os.sysconf("SC_CLK_TCK")
RECORDER_CORE = "0"
LOAD_CORE = "1"
SECRET = "bench-secret"


# -- the recorder process ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int, tid: int | None = None) -> float:
    """utime+stime in seconds of a process (or one of its threads)."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Server:
    """The recorder under test, pinned to core 0, on a fresh spool and archive.

    With ``workers`` > 1 (evrecorder only), that many recorder processes share
    the port (``--reuse-port``) and the spool; worker i is pinned to
    ``cores[i % len(cores)]``.  CPU time and RSS are then the sum over them.
    """

    def __init__(self, kind: str, workdir: str, workers: int = 1, cores: str = RECORDER_CORE):
        self.kind = kind
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/"
        self.spool = os.path.join(workdir, "spool")
        self.archive = os.path.join(workdir, "archive")
        self.log_path = os.path.join(workdir, f"{kind}.log")
        core_list = cores.split(",")
        if kind != "evrecorder" and workers != 1:
            raise SystemExit("--workers applies to evrecorder only")
        self.procs = []
        self._logs = []
        for i in range(workers):
            core = core_list[i % len(core_list)]
            if kind == "evrecorder":
                cmd = [
                    "taskset", "-c", core, sys.executable, "-c",
                    "from twisted.scripts.twistd import run; run()",
                    "-n", "--pidfile=", "evrecorder",
                    "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                    "--spool", self.spool, "--archive", self.archive,
                ] + (["--reuse-port"] if workers > 1 else [])
                env = dict(os.environ, PYTHONPATH=REPO, EVRECORDER_SECRET=SECRET)
            else:
                cmd = [
                    "taskset", "-c", core, sys.executable,
                    os.path.join(HERE, "baselines", "websockets_recorder.py"),
                    "--port", str(self.port), "--out", self.archive,
                ]
                env = dict(os.environ)
            log_path = self.log_path if i == 0 else self.log_path.replace(".log", f".{i}.log")
            log = open(log_path, "wb")
            self._logs.append(log)
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               cwd=workdir))
            self.cmd = cmd
            if i == 0:
                self._wait_listening()  # the first one binds before the others join it
        self.proc = self.procs[0]
        self.pids = [p.pid for p in self.procs]  # taskset execs the command: same pid
        self.pid = self.pids[0]
        time.sleep(0.5 if workers > 1 else 0)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.kind} exited with {proc.returncode}; see {self.log_path}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.kind} did not listen within {timeout} s; see {self.log_path}")

    def cpu(self) -> float:
        return sum(proc_cpu(pid) for pid in self.pids)

    def main_thread_cpu(self) -> float:
        return sum(proc_cpu(pid, pid) for pid in self.pids)

    def rss_kb(self) -> int:
        return sum(proc_rss_kb(pid) for pid in self.pids)

    def per_worker_cpu(self) -> list[float]:
        return [proc_cpu(pid) for pid in self.pids]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()


def core_busy() -> dict[int, tuple[int, int]]:
    """Per core: (busy jiffies, all jiffies) from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                vals = [int(v) for v in vals[:8]]
                idle = vals[3] + vals[4]
                out[int(name[3:])] = (sum(vals) - idle, sum(vals))
    return out


class Sampler(threading.Thread):
    """Samples the recorder's CPU and RSS, and watches the archive for sidecars."""

    def __init__(self, server: Server, interval: float = 0.2, poll: float = 0.05):
        super().__init__(daemon=True)
        self.server = server
        self.interval = interval
        self.poll = poll
        self.samples: list[tuple[float, float, float, int]] = []  # (t, cpu, main cpu, rss kB)
        self.cores: list[tuple[float, dict]] = []  # (t, core_busy())
        self.archived: dict[str, float] = {}  # sidecar file name -> when first seen
        self._stop_event = threading.Event()

    def run(self) -> None:
        next_sample = 0.0
        while not self._stop_event.is_set():
            now = time.monotonic()
            if now >= next_sample:
                try:
                    self.samples.append((now, self.server.cpu(), self.server.main_thread_cpu(),
                                         self.server.rss_kb()))
                    self.cores.append((now, core_busy()))
                except (FileNotFoundError, ProcessLookupError):
                    return
                next_sample = now + self.interval
            self._scan()
            self._stop_event.wait(self.poll)

    def _scan(self) -> None:
        now = time.monotonic()
        for root, _dirs, files in os.walk(self.server.archive):
            for name in files:
                if name.endswith(".json") and name not in self.archived:
                    self.archived[name] = now

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def window(self, t0: float, t1: float) -> list[tuple[float, float, float, int]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]

    def core_shares(self, t0: float, t1: float) -> dict[int, float]:
        """How busy each core was between t0 and t1 (all processes, 0..1)."""
        win = [c for c in self.cores if t0 <= c[0] <= t1]
        if len(win) < 2:
            return {}
        a, b = win[0][1], win[-1][1]
        return {k: (b[k][0] - a[k][0]) / max(1, b[k][1] - a[k][1]) for k in a if k in b}


# -- verification --------------------------------------------------------------


_expected_cache: dict[tuple[int, int, str], bytes] = {}


def _decode(ulaw: bytes) -> bytes:
    if audioop is not None:
        return audioop.ulaw2lin(ulaw, 2)
    from evrecorder.g711 import ulaw_to_pcm16le
    return ulaw_to_pcm16le(ulaw)


def expected_pcm(track: int, frames: int, perspective: str) -> bytes:
    key = (track, frames, perspective)
    if key not in _expected_cache:
        _expected_cache[key] = _decode(loadgen.track_audio(track, perspective, frames))
    return _expected_cache[key]


def expected_stereo(track: int, frames: int) -> bytes:
    key = (track, frames, "stereo")
    if key not in _expected_cache:
        left = expected_pcm(track, frames, "Participant")  # agent left
        right = expected_pcm(track, frames, "Conference")
        out = bytearray(2 * len(left))
        out[0::4], out[1::4] = left[0::2], left[1::2]  # interleave 16-bit samples
        out[2::4], out[3::4] = right[0::2], right[1::2]
        _expected_cache[key] = bytes(out)
    return _expected_cache[key]


def verify_evrecorder(load: dict, archive: str) -> list[str]:
    """Problems with the recordings (empty: every call is recorded exactly)."""
    frames = load["frames_per_call"]
    found: dict[str, str] = {}
    for root, _dirs, files in os.walk(archive):
        for name in files:
            if name.endswith(".json"):
                found[name[:-5]] = os.path.join(root, name)
    problems = []
    for call in load["calls"]:
        p = _verify_call(call, frames, found)
        if p:
            problems.append(f"{call['callId']}: {p}")
    return problems


def _verify_call(call: dict, frames: int, found: dict[str, str]) -> str | None:
    if call["status"] != 101:
        return f"handshake status {call['status']}"
    if call["frames"] != frames:
        return f"the generator sent only {call['frames']} of {frames} frames ({call['error']})"
    if call["close_code"] != 1000:
        return f"closed with {call['close_code']} {call['close_reason']!r} ({call['error']})"
    key = f"{call['callId']}-{call['sessionId']}"
    path = found.get(key)
    if path is None:
        return "no sidecar in the archive"
    with open(path, encoding="utf-8") as f:
        sidecar = json.load(f)
    if sidecar.get("complete") is not True or sidecar.get("endReason") != "stop":
        return f"complete {sidecar.get('complete')}, endReason {sidecar.get('endReason')}"
    for p in loadgen.PERSPECTIVES:
        side = sidecar["perspectives"][p]
        if side["frames"] != frames:
            return f"{p} frames {side['frames']} != {frames} sent"
        for counter in ("missing", "duplicates", "late"):
            if side[counter]:
                return f"{p} {counter} = {side[counter]}"
    wav_path = path[:-5] + ".wav"
    with open(wav_path, "rb") as f:
        blob = f.read()
    if hashlib.sha256(blob).hexdigest() != sidecar["audio"]["sha256"]:
        return "the WAV's sha256 is not the sidecar's"
    with wave.open(wav_path, "rb") as w:
        params = (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes())
        if params != (2, 2, 8000, frames * loadgen.FRAME_BYTES):
            offsets = {p: sidecar["perspectives"][p].get("offsetSamples")
                       for p in loadgen.PERSPECTIVES}
            return (f"WAV (channels, width, rate, frames) = {params}, expected "
                    f"{frames * loadgen.FRAME_BYTES} frames; offsetSamples {offsets} "
                    "(both perspectives were sent in the same write, so both start at 0)")
        data = w.readframes(w.getnframes())
    if data != expected_stereo(call["track"], frames):
        return "the WAV's audio differs from the audio sent"
    return None


def verify_baseline(load: dict, out_dir: str) -> list[str]:
    frames = load["frames_per_call"]
    problems = []
    for call in load["calls"]:
        name = f"{call['callId']}-{call['sessionId']}"
        if call["status"] != 101 or call["close_code"] != 1000 or call["frames"] != frames:
            problems.append(f"{name}: status {call['status']}, close {call['close_code']}, "
                            f"frames sent {call['frames']} ({call['error']})")
            continue
        try:
            with open(os.path.join(out_dir, name + ".json")) as f:
                rec = json.load(f)
        except FileNotFoundError:
            problems.append(f"{name}: no record")
            continue
        if rec["frames"] != {p: frames for p in loadgen.PERSPECTIVES} or not rec["complete"]:
            problems.append(f"{name}: recorded {rec}")
            continue
        for p in loadgen.PERSPECTIVES:
            with open(os.path.join(out_dir, f"{name}.{p}.pcm"), "rb") as f:
                if f.read() != expected_pcm(call["track"], frames, p):
                    problems.append(f"{name}: {p} audio differs from the audio sent")
                    break
    return problems


# -- one run -------------------------------------------------------------------


def run_once(kind: str, args, calls: int, flood: bool, seconds: float | None,
             profile_dir: str | None = None) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"evrec-bench-{kind}-", dir=args.workdir)
    workers = args.workers if kind == "evrecorder" else 1
    server = Server(kind, workdir, workers=workers, cores=args.recorder_cores)
    spy = None
    try:
        time.sleep(1.0)  # let it settle: imports done, store checked
        idle_rss = server.rss_kb()
        sampler = Sampler(server)
        sampler.start()
        run_id = "b" + os.urandom(4).hex()
        ramp = args.ramp if args.ramp is not None else (0.5 if flood else 2.0)
        if not flood and seconds < ramp + 3:
            raise SystemExit(f"--seconds must be at least {ramp + 3:.0f} with a {ramp:.0f} s ramp")
        out = os.path.join(workdir, "load.json")
        start_at = time.monotonic() + 1.5 + calls / 2000  # time for the workers to encode
        cmd = ["taskset", "-c", args.load_cores, sys.executable, os.path.join(HERE, "loadgen.py"),
               server.url, "--calls", str(calls), "--procs", str(args.procs),
               "--run-id", run_id, "--start-at", repr(start_at), "--ramp", repr(ramp),
               "--out", out, "--quiet", "--close-timeout", str(args.close_timeout)]
        if kind == "evrecorder":
            cmd += ["--secret", SECRET]
        cmd += ["--flood", "--frames", str(args.frames)] if flood else ["--seconds", str(seconds)]
        if profile_dir:
            os.makedirs(profile_dir, exist_ok=True)
            raw = os.path.join(profile_dir, f"{kind}-profile.txt")
            spy = subprocess.Popen(
                ["taskset", "-c", LOAD_CORE, "py-spy", "record", "--pid", str(server.pid),
                 "--rate", str(args.profile_rate), "--threads", "--format", "raw", "-o", raw],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu0, main0, t0 = server.cpu(), server.main_thread_cpu(), time.monotonic()
        per0 = server.per_worker_cpu()
        gen = subprocess.run(cmd)
        if gen.returncode not in (0, 1) or not os.path.exists(out):
            raise RuntimeError(f"the load generator failed (exit {gen.returncode})")
        with open(out) as f:
            load = json.load(f)
        # Wait for the recordings (sidecars) to appear.
        n_expected = sum(1 for c in load["calls"] if c["status"] == 101)
        deadline = time.monotonic() + args.archive_timeout
        while len(sampler.archived) < n_expected and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        cpu1, main1, t1 = server.cpu(), server.main_thread_cpu(), time.monotonic()
        per1 = server.per_worker_cpu()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        sampler.stop()
        end_rss = server.rss_kb()
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        server.stop()

    if kind == "evrecorder":
        problems = verify_evrecorder(load, server.archive)
    else:
        problems = verify_baseline(load, server.archive)

    result = {
        "server": kind, "mode": "flood" if flood else "realtime", "calls": calls,
        "frames_per_call": load["frames_per_call"], "seconds": seconds,
        "messages": load["messages"], "idle_rss_kb": idle_rss, "end_rss_kb": end_rss,
        "cpu_s": cpu1 - cpu0, "main_thread_cpu_s": main1 - main0,
        "cpu_us_per_msg": 1e6 * (cpu1 - cpu0) / load["messages"],
        "main_thread_us_per_msg": 1e6 * (main1 - main0) / load["messages"],
        "backlog_p50": load["backlog_p50"], "backlog_p99": load["backlog_p99"],
        "backlog_max": load["backlog_max"], "handshake_max": load["handshake_max"],
        "max_client_buffer": load["max_client_buffer"],
        "generator": load["generator"], "verified_calls": len(load["calls"]) - len(problems),
        "problems": problems, "workdir": workdir, "evrecorder_source": source_digest(),
        "workers": workers, "recorder_cores": args.recorder_cores, "load_cores": args.load_cores,
        "worker_cpu_s": [b - a for a, b in zip(per0, per1)],
    }
    if workers > 1:
        relayed = 0
        for i in range(workers):
            path = server.log_path if i == 0 else server.log_path.replace(".log", f".{i}.log")
            with open(path, errors="replace") as f:
                relayed += f.read().count("is relayed to it")
        result["relayed_sockets"] = relayed
    # Stop-to-archived: the final Stop written -> the sidecar seen in the archive.
    lat = []
    for c in load["calls"]:
        seen = sampler.archived.get(f"{c['callId']}-{c['sessionId']}.json")
        if seen is not None and c["stop_sent_at"] is not None:
            lat.append(seen - c["stop_sent_at"])
    result["archived"] = len(lat)
    result["archive_p50"] = loadgen.percentile(lat, 0.5)
    result["archive_p99"] = loadgen.percentile(lat, 0.99)
    result["peak_rss_kb"] = max((s[3] for s in sampler.samples), default=idle_rss)
    # Other tenants of this machine (the cores are shared): how busy was the
    # recorder's core beyond the recorder itself, and the generator's core?
    cores = sampler.core_shares(t0, t1)
    rec_share = result["cpu_s"] / max(1e-9, t1 - t0)
    result["core0_busy"] = cores.get(int(RECORDER_CORE))
    result["core0_foreign"] = (cores[int(RECORDER_CORE)] - rec_share) if cores else None
    result["core1_busy"] = cores.get(int(LOAD_CORE))
    if flood:
        first, last = load["first_send_at"], load["last_close_at"]
        result["wall_s"] = (last - first) if first and last else None
        result["msgs_per_s"] = load["messages"] / result["wall_s"] if result["wall_s"] else None
        result["rss_per_call_kb"] = (result["peak_rss_kb"] - idle_rss) / calls
    else:
        # Steady state: every call connected and sending, none ended yet.
        w0, w1 = start_at + ramp + 1.0, start_at + seconds - 0.5
        # Probe pings sent while every call was running: the steady-state backlog.
        rtt = [r for t, r in load.get("pongs", []) if w0 <= t <= w1]
        result["ping_p50"] = loadgen.percentile(rtt, 0.5)
        result["ping_p99"] = loadgen.percentile(rtt, 0.99)
        result["pings"] = len(rtt)
        win = sampler.window(w0, w1)
        if len(win) >= 2:
            dt = win[-1][0] - win[0][0]
            result["steady_cpu_share"] = (win[-1][1] - win[0][1]) / dt
            result["steady_main_share"] = (win[-1][2] - win[0][2]) / dt
            rate = calls * 2 / loadgen.FRAME_SECONDS  # media messages per second
            result["steady_msgs_per_s"] = rate
            result["steady_cpu_us_per_msg"] = 1e6 * result["steady_cpu_share"] / rate
            cores = sampler.core_shares(w0, w1)
            if cores:
                result["core0_busy"] = cores[int(RECORDER_CORE)]
                result["core0_foreign"] = cores[int(RECORDER_CORE)] - result["steady_cpu_share"]
                result["core1_busy"] = cores[int(LOAD_CORE)]
            rss = statistics.median(s[3] for s in win)
            result["steady_rss_kb"] = rss
            result["rss_per_call_kb"] = (rss - idle_rss) / calls
        else:
            result["steady_cpu_share"] = None
            result["rss_per_call_kb"] = None
    if profile_dir and spy is not None:
        raw = os.path.join(profile_dir, f"{kind}-profile.txt")
        if os.path.exists(raw):
            summary = summarize_profile(raw, load["messages"], result["cpu_s"],
                                        result["main_thread_cpu_s"])
            with open(os.path.join(profile_dir, f"{kind}-profile-summary.txt"), "w") as f:
                f.write(summary)
            result["profile_summary"] = summary
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def step_ok(r: dict, args) -> tuple[bool, str]:
    """Did a realtime run hold its N calls?"""
    reasons = []
    if r["problems"]:
        reasons.append(f"{len(r['problems'])} calls not recorded exactly")
    if r["backlog_p99"] is None or r["backlog_p99"] > args.max_backlog:
        reasons.append(f"backlog p99 {_ms(r['backlog_p99'])} > {_ms(args.max_backlog)}")
    if (r.get("ping_p99") or 0) > args.max_backlog:
        reasons.append(f"steady ping p99 {_ms(r['ping_p99'])} > {_ms(args.max_backlog)}")
    share = r.get("steady_cpu_share")
    workers = r.get("workers", 1)  # with several processes: per process, each its own core
    if share is not None and share / workers > args.max_cpu:
        reasons.append(f"recorder CPU {share / workers:.0%} of its core"
                       + (f" (per process, {share:.0%} in all)" if workers > 1 else ""))
    if not r["generator"]["valid"]:
        reasons.append("INVALID: generator fell behind (" + "; ".join(r["generator"]["problems"]) + ")")
    return (not reasons), "; ".join(reasons) or "held"


# -- reporting -----------------------------------------------------------------


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def describe(r: dict) -> list[str]:
    g = r["generator"]
    lines = [f"[{r['server']}] {r['mode']} {r['calls']} calls x {r['frames_per_call']} frames/perspective"
             f" = {r['messages']} messages"]
    lines.append(f"  verified: {r['verified_calls']}/{r['calls']} calls recorded exactly"
                 + ("" if not r["problems"] else "  <-- FAILURE"))
    for p in r["problems"][:5]:
        lines.append(f"    {p}")
    lines.append(f"  recorder CPU: {r['cpu_s']:.2f} s total ({r['cpu_us_per_msg']:.1f} us/message), "
                 f"reactor thread {r['main_thread_cpu_s']:.2f} s ({r['main_thread_us_per_msg']:.1f} us/message)")
    if r.get("workers", 1) > 1:
        shares = ", ".join(f"{c:.2f} s" for c in r["worker_cpu_s"])
        lines.append(f"  {r['workers']} recorder processes on cores {r['recorder_cores']} "
                     f"(generator on {r['load_cores']}): CPU per process {shares}; "
                     f"{r.get('relayed_sockets', 0)} sockets relayed to a sibling")
    if r["mode"] == "flood":
        lines.append(f"  throughput: {_f(r.get('msgs_per_s'), '{:.0f}')} messages/s over {_f(r.get('wall_s'))} s")
    else:
        lines.append(f"  steady state: recorder CPU {_f(r.get('steady_cpu_share'), '{:.0%}')} of its core "
                     f"(reactor thread {_f(r.get('steady_main_share'), '{:.0%}')}), "
                     f"{_f(r.get('steady_cpu_us_per_msg'))} us per media message at "
                     f"{_f(r.get('steady_msgs_per_s'), '{:.0f}')} messages/s")
    lines.append(f"  RSS: idle {r['idle_rss_kb'] / 1024:.1f} MiB, peak {r['peak_rss_kb'] / 1024:.1f} MiB, "
                 f"{_f(r.get('rss_per_call_kb'))} KiB per active call")
    if r["mode"] == "realtime":
        lines.append(f"  steady backlog (probe ping round trip while all calls run): p50 "
                     f"{_ms(r.get('ping_p50'))}, p99 {_ms(r.get('ping_p99'))} ({r.get('pings', 0)} pings)")
    lines.append(f"  backlog (Stop -> close): p50 {_ms(r['backlog_p50'])}, p99 {_ms(r['backlog_p99'])}, "
                 f"max {_ms(r['backlog_max'])}; Stop -> archived: p50 {_ms(r['archive_p50'])}, "
                 f"p99 {_ms(r['archive_p99'])} ({r['archived']} seen)")
    lines.append(f"  cores: core {RECORDER_CORE} {_f(r.get('core0_busy'), '{:.0%}')} busy, of which "
                 f"{_f(r.get('core0_foreign'), '{:.0%}')} not the recorder (other tenants, softirq); "
                 f"core {LOAD_CORE} {_f(r.get('core1_busy'), '{:.0%}')} busy")
    lines.append(f"  generator: {g['core_share']:.0%} of core {LOAD_CORE}, send lateness p99 "
                 f"{g['lateness_p99'] * 1000:.1f} ms, max {g['lateness_max'] * 1000:.1f} ms"
                 + ("" if g["valid"] else "  INVALID: " + "; ".join(g["problems"])))
    return lines


def find_capacity(kind: str, args) -> dict:
    steps: list[dict] = []

    def attempt(n: int, retry: bool = True) -> bool:
        r = run_once(kind, args, n, flood=False, seconds=args.seconds)
        ok, why = step_ok(r, args)
        r["held"], r["why"] = ok, why
        steps.append(r)
        print(f"[{kind}] {n} calls: {'HELD' if ok else 'FAILED'} ({why}); CPU "
              f"{_f(r.get('steady_cpu_share'), '{:.0%}')}, backlog p99 {_ms(r['backlog_p99'])}, "
              f"{_f(r.get('steady_cpu_us_per_msg'))} us/msg, gen lateness p99 "
              f"{r['generator']['lateness_p99'] * 1000:.1f} ms, steady ping p99 "
              f"{_ms(r.get('ping_p99'))}, core {RECORDER_CORE} busy "
              f"{_f(r.get('core0_busy'), '{:.0%}')} ({_f(r.get('core0_foreign'), '{:.0%}')} "
              f"not the recorder), core {LOAD_CORE} {_f(r.get('core1_busy'), '{:.0%}')}", flush=True)
        # The machine is shared: a failure with other load on the cores is tried once more.
        noisy = (r.get("core0_foreign") or 0) > args.max_foreign or not r["generator"]["valid"]
        if not ok and noisy and retry:
            print(f"[{kind}] {n} calls: other load on the cores or a late generator; once more",
                  flush=True)
            return attempt(n, retry=False)
        if not r["generator"]["valid"]:
            raise _GeneratorBound(n)
        return ok

    best, fail = 0, None
    try:
        if args.steps:
            for n in args.steps:
                if not attempt(n):
                    fail = n
                    break
                best = n
        else:
            n = args.start
            while n <= args.max_calls:
                if not attempt(n):
                    fail = n
                    break
                best = n
                n *= 2
            for _ in range(args.bisect):
                if fail is None or fail - best <= args.resolution:
                    break
                mid = (best + fail) // 2
                if attempt(mid):
                    best = mid
                else:
                    fail = mid
        bound = None
    except _GeneratorBound as e:
        bound = f"the generator fell behind at {e.args[0]} calls: capacity is at least {best}"
    return {"server": kind, "capacity": best, "first_failure": fail, "steps": steps,
            "generator_bound": bound}


class _GeneratorBound(Exception):
    pass


# -- profile summary -----------------------------------------------------------


_CATEGORIES = [  # (name, test on the frame's file), innermost matching frame wins
    # twisted/python/log.py is not here: its callWithLogger is the reactor's dispatch.
    ("logging (twisted.logger, logging)", lambda f: f.startswith(("twisted/logger/", "logging/"))),
    ("json", lambda f: f.startswith("json/")),
    ("base64", lambda f: f == "base64.py"),
    ("Autobahn framing (autobahn, txaio)", lambda f: f.startswith(("autobahn/", "txaio/"))),
    ("evrecorder/spool.py", lambda f: f == "evrecorder/spool.py"),
    ("evrecorder/call.py (+metrics, settings)", lambda f: f in (
        "evrecorder/call.py", "evrecorder/metrics.py", "evrecorder/settings.py")),
    ("evrecorder/protocol.py", lambda f: f == "evrecorder/protocol.py"),
    ("evrecorder finalize/archive (wav, placement, stores)", lambda f: f.startswith("evrecorder/")),
    ("Twisted reactor, TCP, Deferreds", lambda f: f.startswith("twisted/")),
    ("baseline: websockets framing", lambda f: f.startswith("websockets/")),
    ("baseline: handler (websockets_recorder.py)", lambda f: f.endswith("websockets_recorder.py")),
    ("baseline: asyncio loop", lambda f: f.startswith("asyncio/")),
]
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")


def _source_line(file: str, line: int) -> str:
    for base in [os.path.join(HERE, "baselines")] + sys.path:
        path = os.path.join(base, file)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    for i, text in enumerate(f, 1):
                        if i == line:
                            return text.strip()
            except OSError:
                pass
            return ""
    return ""


def summarize_profile(raw_path: str, messages: int, cpu_s: float, main_cpu_s: float) -> str:
    """Where the recorder's CPU went, from py-spy's raw (collapsed) stacks.

    Shares are of the reactor thread's busy samples, turned into us/message
    with the reactor thread's CPU time from /proc.  Worker threads (finalize,
    archive) are listed apart: py-spy counts a thread blocked in fsync as
    busy, so their samples overstate their CPU; /proc gives the real figure.
    """
    main_cats: dict[str, int] = {}
    main_lines: dict[tuple[str, str, int], int] = {}
    work_lines: dict[tuple[str, str, int], int] = {}
    funcs: dict[str, int] = {}
    idle = main_total = work_total = 0
    with open(raw_path) as f:
        for row in f:
            stack, _, n = row.rstrip("\n").rpartition(" ")
            n = int(n)
            frames = stack.split(";")
            thread = frames[0]
            frames = [m.groupdict() for m in map(_FRAME.match, frames[1:]) if m]
            if not frames:
                continue
            leaf = frames[-1]
            src = _cached_line(leaf["file"], int(leaf["line"]))
            if (leaf["func"].endswith("doPoll") and "poll(" in src) or leaf["func"].endswith(
                    ("Condition.wait", "Event.wait")) or (leaf["file"] == "selectors.py"
                                                          and "poll(" in src):
                idle += n
                continue
            key = (leaf["func"], leaf["file"], int(leaf["line"]))
            if "MainThread" not in thread:
                work_total += n
                work_lines[key] = work_lines.get(key, 0) + n
                continue
            main_total += n
            main_lines[key] = main_lines.get(key, 0) + n
            cat = "other (stdlib, ...)"
            for fr in reversed(frames):
                match = next((name for name, test in _CATEGORIES if test(fr["file"])), None)
                if match:
                    cat = match
                    break
            main_cats[cat] = main_cats.get(cat, 0) + n
            seen = set()
            for fr in frames:
                name = f"{fr['func']} ({fr['file']})"
                if name not in seen:
                    seen.add(name)
                    funcs[name] = funcs.get(name, 0) + n
    if not main_total:
        return "no samples\n"
    us_main = 1e6 * main_cpu_s / messages
    us_work = 1e6 * (cpu_s - main_cpu_s) / messages
    out = [f"recorder CPU (/proc): {1e6 * cpu_s / messages:.1f} us/message = reactor thread "
           f"{us_main:.1f} + worker threads {us_work:.1f}",
           f"py-spy samples: reactor thread {main_total} busy, worker threads {work_total} busy, "
           f"{idle} idle (left out)", "",
           "Reactor thread by component (self time, attributed to the innermost frame of a "
           "known component; us/message = share x reactor-thread CPU):"]
    for name, n in sorted(main_cats.items(), key=lambda kv: -kv[1]):
        out.append(f"  {100 * n / main_total:5.1f}%  {us_main * n / main_total:5.1f} us/msg  {name}")
    out += ["", "Reactor thread, top lines (self time):"]
    for (func, file, line), n in sorted(main_lines.items(), key=lambda kv: -kv[1])[:25]:
        out.append(f"  {100 * n / main_total:5.1f}%  {us_main * n / main_total:5.1f} us  "
                   f"{file}:{line} {func}  | {_cached_line(file, line)[:64]}")
    out += ["", "Reactor thread, inclusive time of selected functions:"]
    wanted = ("dataReceived", "processData", "onMessage (evrecorder", "_on_media", "Call.media",
              "append_frame", "append_event", "loads (json", "b64decode", "Logger.emit",
              "XorMasker", "Utf8Validator", "_onMessageEnd", "doRead", "doWrite", "sendCloseFrame",
              "handle (", "Frame.parse", "recv (websockets")
    for name, n in sorted(funcs.items(), key=lambda kv: -kv[1]):
        if any(w in name for w in wanted):
            out.append(f"  {100 * n / main_total:5.1f}%  {us_main * n / main_total:5.1f} us  {name}")
    details = [(name, _stack_share(raw_path, pattern)) for name, pattern in _DETAILS]
    details = [(name, n) for name, n in details if n]
    if details:
        out += ["", "Reactor thread, specific costs (inclusive, stacks containing):"]
        for name, n in details:
            out.append(f"  {100 * n / main_total:5.1f}%  {us_main * n / main_total:5.1f} us  {name}")
    if work_total:
        out += ["", f"Worker threads (finalize + archive; {us_work:.1f} us/message of CPU by /proc), "
                "top lines by samples (fsync waits count here):"]
        for (func, file, line), n in sorted(work_lines.items(), key=lambda kv: -kv[1])[:10]:
            out.append(f"  {100 * n / work_total:5.1f}%  {file}:{line} {func}  | "
                       f"{_cached_line(file, line)[:64]}")
    return "\n".join(out) + "\n"


_DETAILS = [  # (what, regex on a frame): costs a subclass or a setting could avoid
    ("Autobahn: a new XOR masker per frame (create_xor_masker, cffi)",
     r"^create_xor_masker |^XorMasker\w*\.__init__ "),
    ("Autobahn: UTF-8 validation (utf8validateIncoming)", r"^Utf8Validator\."),
    ("Autobahn: fire('message') + add_callbacks per message (onMessageEnd)",
     r"^ObservableMixin\.fire |^_TxApi\.add_callbacks "),
    ("Autobahn: debug-log arguments built on every read (dataReceived: hltype/hlval)",
     r"^(hltype|hlval|hl) \(autobahn/util"),
]


def _stack_share(raw_path: str, pattern: str) -> int:
    """Busy reactor-thread samples whose stack has a frame matching ``pattern``."""
    rx = re.compile(pattern)
    total = 0
    with open(raw_path) as f:
        for row in f:
            stack, _, n = row.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if "MainThread" not in frames[0]:
                continue
            leaf = _FRAME.match(frames[-1])
            if leaf and leaf["func"].endswith("doPoll") and "poll(" in _cached_line(
                    leaf["file"], int(leaf["line"])):
                continue
            if any(rx.search(fr) for fr in frames[1:]):
                total += int(n)
    return total


_line_cache: dict[tuple[str, int], str] = {}


def _cached_line(file: str, line: int) -> str:
    key = (file, line)
    if key not in _line_cache:
        _line_cache[key] = _source_line(file, line)
    return _line_cache[key]


# -- main ----------------------------------------------------------------------


def source_digest() -> str:
    """Which recorder code was measured (other people edit it while benchmarks run)."""
    h = hashlib.sha256()
    pkg = os.path.join(REPO, "evrecorder")
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            with open(os.path.join(pkg, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:12]



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--flood", action="store_true", help="CPU per message at full speed")
    mode.add_argument("--realtime", type=int, metavar="N", help="hold N calls for --seconds")
    mode.add_argument("--find-capacity", action="store_true", help="largest N held in realtime")
    p.add_argument("--server", choices=("evrecorder", "baseline", "both"), default="evrecorder")
    p.add_argument("--calls", type=int, default=200, help="flood: calls (default 200)")
    p.add_argument("--frames", type=int, default=1500,
                   help="flood: frames per perspective per call (default 1500 = 30 s)")
    p.add_argument("--seconds", type=float, default=None,
                   help="realtime: seconds per call (default 30; 15 per capacity step)")
    p.add_argument("--procs", type=int, default=2, help="load generator processes (default 2)")
    p.add_argument("--workers", type=int, default=1,
                   help="evrecorder processes sharing the port with --reuse-port (default 1)")
    p.add_argument("--recorder-cores", default=RECORDER_CORE,
                   help="cores for the recorder processes, e.g. 0 or 0,1 (worker i gets the "
                        "i-th, round robin; default 0)")
    p.add_argument("--load-cores", default=LOAD_CORE,
                   help="cores for the load generator, a taskset list (default 1)")
    p.add_argument("--ramp", type=float, default=None, help="seconds over which calls connect")
    p.add_argument("--repeat", type=int, default=1, help="run each measurement this many times")
    p.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="capacity: N values to try, e.g. 200,400,600 (default: double from "
                        "--start, then bisect)")
    p.add_argument("--start", type=int, default=50, help="capacity: first N (default 50)")
    p.add_argument("--max-calls", type=int, default=1600, help="capacity: largest N tried (1600)")
    p.add_argument("--bisect", type=int, default=2, help="capacity: bisection steps (default 2)")
    p.add_argument("--resolution", type=int, default=25, help="capacity: stop bisecting below this")
    p.add_argument("--max-backlog", type=float, default=1.0,
                   help="capacity: backlog p99 bound in seconds (default 1)")
    p.add_argument("--max-cpu", type=float, default=0.95,
                   help="capacity: recorder CPU share that counts as saturated (default 0.95)")
    p.add_argument("--max-foreign", type=float, default=0.15,
                   help="capacity: a failed step is repeated once if the recorder's core was "
                        "busier than this with other processes (default 0.15)")
    p.add_argument("--close-timeout", type=float, default=120.0,
                   help="seconds the generator waits for the server's close (default 120)")
    p.add_argument("--archive-timeout", type=float, default=120.0,
                   help="seconds to wait for the recordings after the load (default 120)")
    p.add_argument("--profile", metavar="DIR", help="record the recorder with py-spy into DIR")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--report", metavar="FILE", help="write all results as JSON")
    p.add_argument("--workdir", default=None, help="where run directories go (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep spool, archive and logs")
    args = p.parse_args(argv)
    if shutil.which("taskset") is None:
        p.error("taskset (util-linux) is needed to pin the recorder and the generator")
    if os.cpu_count() and os.cpu_count() < 2:
        p.error("two cores are needed: one for the recorder, one for the load")
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # this script shares the generator's core
    if args.seconds is None:
        args.seconds = 15.0 if args.find_capacity else 30.0
    kinds = ["evrecorder", "baseline"] if args.server == "both" else [args.server]
    report: dict = {"args": {k: v for k, v in vars(args).items()}, "runs": [], "capacity": [],
                    "evrecorder_source": source_digest(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"evrecorder source digest {report['evrecorder_source']} (sha256 of evrecorder/*.py), "
          f"{report['started']}", flush=True)
    failed = False
    for rep in range(args.repeat):
        for kind in kinds:
            if args.find_capacity:
                cap = find_capacity(kind, args)
                for r in cap["steps"]:
                    r.pop("profile_summary", None)
                report["capacity"].append(cap)
                print(f"[{kind}] capacity: {cap['capacity']} calls held"
                      + (f", {cap['first_failure']} failed" if cap["first_failure"] else "")
                      + (f" ({cap['generator_bound']})" if cap["generator_bound"] else ""), flush=True)
            else:
                r = run_once(kind, args, args.realtime or args.calls, flood=args.flood,
                             seconds=None if args.flood else args.seconds,
                             profile_dir=args.profile)
                report["runs"].append(r)
                print("\n".join(describe(r)), flush=True)
                if r.get("profile_summary"):
                    print(r["profile_summary"])
                failed |= bool(r["problems"]) or not r["generator"]["valid"]
    print("\n".join(ratio_lines(report)))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if failed else 0


def ratio_lines(report: dict) -> list[str]:
    out = []
    runs = report["runs"]
    ev = [r for r in runs if r["server"] == "evrecorder"]
    bl = [r for r in runs if r["server"] == "baseline"]
    if ev and bl:
        out.append("evrecorder / baseline (each pair run back to back):")
        for a, b in zip(ev, bl):
            key = "cpu_us_per_msg" if a["mode"] == "flood" else "steady_cpu_us_per_msg"
            line = (f"  CPU-us/message {_f(a.get(key))} / {_f(b.get(key))} = "
                    f"{_f(a.get(key) / b.get(key) if a.get(key) and b.get(key) else None, '{:.2f}')}x")
            if a.get("rss_per_call_kb") and b.get("rss_per_call_kb"):
                line += (f"; RSS/call {a['rss_per_call_kb']:.0f} / {b['rss_per_call_kb']:.0f} KiB")
            out.append(line)
    caps = report["capacity"]
    cev = [c for c in caps if c["server"] == "evrecorder"]
    cbl = [c for c in caps if c["server"] == "baseline"]
    if cev and cbl:
        out.append("capacity evrecorder / baseline:")
        for a, b in zip(cev, cbl):
            ratio = a["capacity"] / b["capacity"] if b["capacity"] else None
            out.append(f"  {a['capacity']} / {b['capacity']} calls = {_f(ratio, '{:.2f}')}x")
    return out


if __name__ == "__main__":
    sys.exit(main())
