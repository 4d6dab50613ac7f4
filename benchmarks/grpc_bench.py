"""gRPC door benchmark: a load generator, a floor server, and a driver.

    python3 benchmarks/grpc_bench.py --server recorder --dialogs 200 --ptime 100 --seconds 20
    python3 benchmarks/grpc_bench.py --server floor-aio --dialogs 200 --ptime 100 --seconds 20
    python3 benchmarks/grpc_bench.py --server floor-threaded ...
    python3 benchmarks/grpc_bench.py --server recorder --flood --dialogs 100 --seconds 10

Servers:
  recorder        ``twistd evrecorder --grpc-listen tcp:PORT`` from the checkout (the real thing:
                  grpc.aio on its own thread, batches to the Twisted reactor, spool, finalize)
  floor-aio       a bare ``grpc.aio`` server that only parses each event (the floor)
  floor-threaded  grpcio's threaded server (one worker thread per stream) that only parses
  threaded-twisted  the threaded server handing every event to a Twisted reactor
                  (``callFromThread`` per event): the other design the door could have had

Load: N dialogs, each one stream with 2 segments (CONTACT + AGENT) of PCMU chunks of
``--ptime`` ms, paced in real time (or flooded), over ``--connections`` HTTP/2 connections.
Each dialog ends with SegmentStops and a half-close; every stream must end OK.

The server runs pinned to core 0 (taskset) and the load generator to core 1 when the
machine has two cores. The report: server CPU seconds (user+sys, from /proc), CPU per
event, share of a core, lag (how late the generator's last event went out), and, for the
recorder, every archived recording checked (chunk counts, complete, the audio bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import wave

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from evrecorder.grpcapi import streaming_pb2 as pb  # noqa: E402

METHOD = "/ringcentral.ringcx.streaming.v1beta2.Streaming/Stream"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- floor servers ----------------------------------------------------------------


def serve_floor(port: int, mode: str) -> None:
    import grpc
    from google.protobuf import empty_pb2

    parse = pb.StreamEvent.FromString
    handler_opts = dict(request_deserializer=parse,
                        response_serializer=empty_pb2.Empty.SerializeToString)
    options = [("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 5000)]
    if mode == "floor-aio":
        async def stream(requests, context):
            async for event in requests:
                event.WhichOneof("event")
            return empty_pb2.Empty()

        async def main():
            server = grpc.aio.server(options=options)
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "ringcentral.ringcx.streaming.v1beta2.Streaming",
                {"Stream": grpc.stream_unary_rpc_method_handler(stream, **handler_opts)}),))
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            await server.wait_for_termination()

        asyncio.run(main())
        return
    from concurrent import futures

    reactor = None
    if mode == "threaded-twisted":
        from twisted.internet import reactor

        counted = [0]

        def handle(event):
            event.WhichOneof("event")
            counted[0] += 1

    def stream(requests, context):
        for event in requests:
            if reactor is not None:
                reactor.callFromThread(handle, event)
            else:
                event.WhichOneof("event")
        return empty_pb2.Empty()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4000), options=options,
                         maximum_concurrent_rpcs=4000)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "ringcentral.ringcx.streaming.v1beta2.Streaming",
        {"Stream": grpc.stream_unary_rpc_method_handler(stream, **handler_opts)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    if reactor is not None:
        reactor.run(installSignalHandlers=True)
    else:
        server.wait_for_termination()


# -- load generator ------------------------------------------------------------------


def payloads(n: int, ptime: int, seed: int) -> list[bytes]:
    size = 8 * ptime
    return [bytes(((seed * 31 + i * 7 + j) % 250) + 1 for j in range(size)) for i in range(n)]


async def run_load(port: int, dialogs: int, chunks: int, ptime: int, realtime: bool,
                   connections: int, prefix: str) -> dict:
    import grpc

    contact, agent = payloads(chunks, ptime, 1), payloads(chunks, ptime, 2)
    # Every dialog sends the same chunks: serialize each event once (the generator's
    # own CPU, not the server's, is what limits a one-core Python generator).
    ser = pb.StreamEvent.SerializeToString
    media_bytes = [[ser(pb.StreamEvent(session_id="s", segment_media=pb.SegmentMediaEvent(
        segment_id=seg, audio_content=pb.AudioContent(payload=data[i], seq=i + 1, duration=ptime))))
        for seg, data in (("c", contact), ("a", agent))] for i in range(chunks)]
    starts = [ser(pb.StreamEvent(session_id="s", segment_start=pb.SegmentStartEvent(
        segment_id=seg, participant=pb.Participant(id=seg, type=kind),
        audio_format=pb.AudioFormat(codec=pb.PCMU, rate=8000, ptime=ptime))))
        for seg, kind in (("c", pb.CONTACT), ("a", pb.AGENT))]
    stops = [ser(pb.StreamEvent(session_id="s", segment_stop=pb.SegmentStopEvent(segment_id=seg)))
             for seg in ("a", "c")]
    chans = [grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1), ("c", n)])
        for n in range(connections)]
    lag = [0.0]
    ok = [0]
    failures: list[str] = []
    start = time.monotonic() + 0.5

    async def dialog(n: int):
        call = chans[n % connections].stream_unary(
            METHOD, request_serializer=None, response_deserializer=None)  # bytes as they are
        did = f"{prefix}-{n}"
        # Spread the starts over one chunk's time, as calls do not start in step.
        t0 = start + (n % 100) * ptime / 100_000

        async def events():
            yield ser(pb.StreamEvent(session_id="s", dialog_init=pb.DialogInitEvent(
                account=pb.Account(id="bench"), dialog=pb.Dialog(id=did))))
            for start_event in starts:
                yield start_event
            for i in range(chunks):
                if realtime:
                    due = t0 + i * ptime / 1000
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    else:
                        lag[0] = max(lag[0], -wait)
                for event in media_bytes[i]:
                    yield event
            for stop_event in stops:
                yield stop_event

        try:
            await call(events(), timeout=chunks * ptime / 1000 + 120)
            ok[0] += 1
        except grpc.aio.AioRpcError as e:
            failures.append(f"{did}: {e.code().name} {e.details()}")

    t = time.monotonic()
    await asyncio.gather(*(dialog(n) for n in range(dialogs)))
    elapsed = time.monotonic() - t
    for c in chans:
        await c.close()
    return {"ok": ok[0], "failures": failures[:5], "failed": len(failures), "lag": lag[0],
            "elapsed": elapsed, "events": dialogs * (3 + 2 * chunks + 2)}


# -- driver --------------------------------------------------------------------------


def pin(core: int) -> list[str]:
    if os.cpu_count() and os.cpu_count() >= 2 and subprocess.run(
            ["which", "taskset"], capture_output=True).returncode == 0:
        return ["taskset", "-c", str(core)]
    return []


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the server did not listen on {port}")


def start_server(kind: str, port: int, workdir: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO)
    if kind == "recorder":
        cmd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
               "--pidfile=", "evrecorder", "--listen", "tcp:0:interface=127.0.0.1",
               "--grpc-listen", f"tcp:{port}:interface=127.0.0.1", "--spool",
               os.path.join(workdir, "spool"), "--archive", os.path.join(workdir, "archive"),
               "--reconnect-grace", "1", "--max-calls", "5000"]
    else:
        cmd = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
    log = open(os.path.join(workdir, "server.log"), "wb")
    return subprocess.Popen(pin(0) + cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def verify(workdir: str, dialogs: int, chunks: int, ptime: int, timeout: float = 120) -> str:
    """Every dialog archived, complete, with every chunk, and its audio exact."""
    archive = os.path.join(workdir, "archive")
    deadline = time.monotonic() + timeout
    found: list[str] = []
    while time.monotonic() < deadline:
        found = [os.path.join(d, f) for d, _, fs in os.walk(archive) for f in fs if f.endswith(".json")]
        if len(found) >= dialogs:
            break
        time.sleep(0.5)
    bad: list[str] = []
    shifted: list[str] = []
    contact = b"".join(payloads(chunks, ptime, 1))
    agent = b"".join(payloads(chunks, ptime, 2))
    from evrecorder import g711

    want_left, want_right = g711.ulaw_to_pcm16le(agent), g711.ulaw_to_pcm16le(contact)
    for path in found:
        with open(path) as f:
            sidecar = json.load(f)
        counts = [s["chunks"] for s in sidecar["segments"]]
        if not sidecar["complete"] or counts != [chunks, chunks] or any(
                s["missing"] for s in sidecar["segments"]):
            bad.append(f"{sidecar['callId']}: complete {sidecar['complete']}, chunks {counts}")
            continue
        with wave.open(path[:-5] + ".wav", "rb") as w:
            frames = w.readframes(w.getnframes())
        left = b"".join(frames[i:i + 2] for i in range(0, len(frames), 4))
        right = b"".join(frames[i + 2:i + 4] for i in range(0, len(frames), 4))
        offset = {s["channel"]: s["offsetSamples"] * 2 for s in sidecar["segments"]}
        pauses = sum(len(s["pauses"]) for s in sidecar["segments"])
        exact_at = (left[offset["agent"]:offset["agent"] + len(want_left)] == want_left
                    and right[offset["caller"]:offset["caller"] + len(want_right)] == want_right)
        if not exact_at or pauses:
            bad.append(f"{sidecar['callId']}: audio differs (pauses {pauses}, offsets {offset})")
        elif left[:len(want_left)] != want_left or right[:len(want_right)] != want_right:
            shifted.append(sidecar["callId"])
    return (f"{len(found)}/{dialogs} archived, {len(bad)} bad"
            + (f" ({bad[:3]})" if bad else "")
            + f", {len(shifted)} exact but with one segment starting 20 ms or more later")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default="recorder",
                   choices=["recorder", "floor-aio", "floor-threaded", "threaded-twisted"])
    p.add_argument("--dialogs", type=int, default=100)
    p.add_argument("--ptime", type=int, default=100)
    p.add_argument("--seconds", type=float, default=20, help="audio per dialog")
    p.add_argument("--flood", action="store_true")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prefix", default="d", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        serve_floor(a.port, a.serve)
        return
    chunks = int(a.seconds * 1000 / a.ptime)
    if a.load:
        print(json.dumps(asyncio.run(run_load(a.port, a.dialogs, chunks, a.ptime, not a.flood,
                                              a.connections, a.prefix))))
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        server = start_server(a.server, port, workdir)
        try:
            wait_port(port)
            time.sleep(1.0)
            idle_rss = rss_mb(server.pid)
            cpu0 = cpu_seconds(server.pid)
            started = time.monotonic()
            load = subprocess.Popen(
                pin(1) + [sys.executable, __file__, "--load", "--port", str(port), "--dialogs",
                          str(a.dialogs), "--ptime", str(a.ptime), "--seconds", str(a.seconds),
                          "--connections", str(a.connections), "--prefix", f"{a.server}"]
                + (["--flood"] if a.flood else []),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env=dict(os.environ, PYTHONPATH=REPO))
            # RSS once a second while the dialogs run: memory per dialog must
            # stay flat over a long dialog, not grow with its length.
            samples = []
            while True:
                try:
                    out, err = load.communicate(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    samples.append((time.monotonic() - started, rss_mb(server.pid)))
            cpu = cpu_seconds(server.pid) - cpu0
            rss = rss_mb(server.pid)
            if load.returncode:
                raise SystemExit(err[-2000:])
            result = json.loads(out.strip().splitlines()[-1])
            checked = verify(workdir, a.dialogs, chunks, a.ptime) if a.server == "recorder" else "-"
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    events = result["events"]
    print(json.dumps({
        "server": a.server, "dialogs": a.dialogs, "ptime": a.ptime, "seconds": a.seconds,
        "mode": "flood" if a.flood else "realtime", "connections": a.connections,
        "ok": result["ok"], "failed": result["failed"], "failures": result["failures"],
        "events": events, "elapsed_s": round(result["elapsed"], 2),
        "server_cpu_s": round(cpu, 2), "cpu_us_per_event": round(cpu / events * 1e6, 1),
        "core_share": round(cpu / result["elapsed"], 3), "gen_lag_s": round(result["lag"], 3),
        "server_rss_mb": round(rss, 1), "verified": checked,
        "rss_idle_mb": round(idle_rss, 1),
        # Steady window: after the connections and the first chunks, before the ends.
        "rss_steady_mb": _steady(samples, a.seconds),
    }))


def _steady(samples: list[tuple[float, float]], seconds: float) -> dict:
    """RSS (MB) at a tenth, half and nine tenths of the dialogs' length."""
    if not samples:
        return {}
    out = {}
    for share in (0.1, 0.5, 0.9):
        t, mb = min(samples, key=lambda s: abs(s[0] - (2 + share * seconds)))
        out[f"at_{round(t)}s"] = round(mb, 1)
    return out


if __name__ == "__main__":
    main()
