"""Load generator for the evrecorder benchmarks: N concurrent Engage Voice calls.

Each call is one WebSocket to a ``ws://`` URL carrying what the platform sends:
the handshake query, ``Connected``, ``Start`` (8 kHz mu-law metadata), a Media
message per perspective every 20 ms (160 bytes of mu-law, base64 in JSON), and
one ``Stop`` per perspective.  The recorder is expected to close with 1000.

Two pacings:

``--seconds S`` (realtime)
    Every call sends its agent and caller frame every 20 ms for S seconds,
    scheduled against the monotonic clock.  One timer per process ticks every
    5 ms and sends the frames of every call due in that slot (calls are spread
    over the four slots of a 20 ms frame), so 1000 calls cost 200 timer wake-ups
    a second, not 50 000.  If the process falls behind, the due frames are sent
    late (never dropped) and the lateness is reported: a run whose generator was
    late is not a measurement of the recorder.

``--flood``
    Every call sends all its frames as fast as TCP flow control lets it.

The client is a minimal RFC 6455 client on asyncio's raw TCP transports.  Every
message is encoded once, before the run: per audio *track* (the calls share a
few tracks, so cross-talk between calls is still detectable) the JSON, the
frame header and the client mask are precomputed, and a tick of a call is one
``transport.write`` of the agent's and the caller's frame.  The mask key of
each precomputed frame is random; it is the same for every call that sends
that frame, which a server cannot tell and which only matters against
cache-poisoning proxies, not on loopback.

``--procs K`` runs K worker processes (each takes N/K calls) and merges their
results.  Pin the whole generator with ``taskset -c 1``; the workers inherit it.

While the calls run, each process also sends a few WebSocket pings
(``--ping-rate``, 10 a second, each on the next call in turn).  A server
answers a ping only after it has handled everything sent before it on that
socket, so the pong's round trip is the recorder's backlog *while the calls
run*; the Stop backlog below is measured at the very end.

Results (``--out FILE``, JSON), per call: frames sent per perspective, the
handshake status, the close code, when the final Stop was written and when the
server's close frame arrived (their difference is the *backlog*: a recorder
that falls behind shows growing values); per process: lateness of its own
sends and its CPU time.  Times are ``time.monotonic()`` (CLOCK_MONOTONIC, the
same clock in every process on the machine).

The audio is deterministic (:func:`track_audio`), so ``run.py`` can check every
recording sample by sample.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlencode, urlsplit

FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law
FRAME_SECONDS = 0.020
PERSPECTIVES = ("Participant", "Conference")  # agent, caller
SLOTS = 4  # timer ticks per 20 ms frame (one tick every 5 ms)
BURST_TICKS = 8  # flood: frame pairs per write
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- what is sent ------------------------------------------------------------


def track_audio(track: int, perspective: str, frames: int) -> bytes:
    """The mu-law audio of ``perspective`` in ``track``: deterministic, distinct per pair."""
    seed = 1_000_003 * (track + 1) + PERSPECTIVES.index(perspective)
    return random.Random(seed).randbytes(frames * FRAME_BYTES)


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def client_frame(payload: bytes, opcode: int = 0x1, rng: random.Random | None = None) -> bytes:
    """One masked, final WebSocket frame (client to server)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = (rng or random).randbytes(4)
    return head + key + _mask(payload, key)


def _json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def media_message(perspective: str, seq: int, payload: bytes) -> bytes:
    return _json({
        "event": "Media", "perspective": perspective, "sequenceId": str(seq),
        "media": base64.b64encode(payload).decode("ascii"),
    })


def encode_track(track: int, frames: int, rng: random.Random) -> list[bytes]:
    """Per tick j: the agent's and the caller's Media frame j+1, masked, concatenated."""
    audio = {p: track_audio(track, p, frames) for p in PERSPECTIVES}
    ticks = []
    for j in range(frames):
        part = b""
        for p in PERSPECTIVES:
            chunk = audio[p][j * FRAME_BYTES:(j + 1) * FRAME_BYTES]
            part += client_frame(media_message(p, j + 1, chunk), rng=rng)
        ticks.append(part)
    return ticks


def opening_messages(call_id: str, session_id: str) -> bytes:
    connected = {"event": "Connected", "protocol": "AgentSession", "version": "1.0.0"}
    start = {"event": "Start", "metadata": {
        "callId": call_id, "sessionId": int(session_id), "ani": "2223334444",
        "dnis": "2223335555", "accountId": "99990000", "subaccountId": "99990001",
        "rcAccountId": "123456789", "agentId": 123, "productType": "Queue",
        "productId": 1234, "contentType": "audio/x-mulaw", "sampleRateHertz": 8000,
    }}
    return client_frame(_json(connected)) + client_frame(_json(start))


def stop_messages(frames: int) -> bytes:
    end_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    stop = _json({"event": "Stop", "metadata": {
        "duration": round(frames * FRAME_SECONDS), "end_time": end_time}})
    return client_frame(stop) * len(PERSPECTIVES)  # one per perspective, documented form


def call_id_for(run_id: str, index: int) -> str:
    return f"{run_id}-{index:05d}"


def messages_per_call(frames: int) -> int:
    """Connected + Start + Media + one Stop per perspective."""
    return 2 + len(PERSPECTIVES) * frames + len(PERSPECTIVES)


# -- one call: a minimal WebSocket client ------------------------------------


class Call(asyncio.Protocol):
    """One call's socket.  Writes are driven from outside (ticks or flood)."""

    def __init__(self, index: int, call_id: str, track: int, host: str, path: str,
                 secret: str | None, close_wait: float):
        self.index = index
        self.call_id = call_id
        self.session_id = "1"
        self.track = track
        self._host = host
        self._path = path
        self._secret = secret
        self._close_wait = close_wait
        self.transport: asyncio.Transport | None = None
        self.opened = asyncio.get_running_loop().create_future()
        self.finished = asyncio.get_running_loop().create_future()
        self._buf = b""
        self._open = False
        self._key = base64.b64encode(os.urandom(16))
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.frames_sent = 0  # per perspective
        self.status: int | str | None = None  # HTTP status, or an error
        self.connect_started: float | None = None
        self.opened_at: float | None = None
        self.first_send_at: float | None = None
        self.stop_sent_at: float | None = None
        self.close_at: float | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.lost_at: float | None = None
        self.error: str | None = None
        self.max_buffer = 0
        self.pongs: list[tuple[float, float]] | None = None  # (sent at, round trip), shared

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)
        query = urlencode({
            "callId": self.call_id, "sessionId": self.session_id, "agentId": "123",
            "accountId": "99990000", "productType": "Queue", "productId": "1234",
        })
        lines = [
            f"GET {self._path}?{query} HTTP/1.1", f"Host: {self._host}",
            "Upgrade: websocket", "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self._key.decode()}", "Sec-WebSocket-Version: 13",
        ]
        if self._secret:
            lines.append(f"Authorization: Bearer {self._secret}")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._open:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buf = self._buf[:end].decode("latin-1"), self._buf[end + 4:]
            status_line, *headers = head.split("\r\n")
            try:
                self.status = int(status_line.split()[1])
            except (IndexError, ValueError):
                self.status = f"bad status line {status_line[:60]!r}"
            accept = base64.b64encode(hashlib.sha1(self._key + GUID).digest()).decode()
            ok = self.status == 101 and any(
                h.lower().startswith("sec-websocket-accept:") and h.split(":", 1)[1].strip() == accept
                for h in headers
            )
            if not ok:
                if self.status == 101:
                    self.status = "101 without the right Sec-WebSocket-Accept"
                self._fail(f"handshake: {self.status}")
                return
            self._open = True
            self.opened_at = time.monotonic()
            if not self.opened.done():
                self.opened.set_result(True)
        self._parse_frames()

    def _parse_frames(self) -> None:
        buf = self._buf
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, pos = struct.unpack_from("!H", buf, 2)[0], 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, pos = struct.unpack_from("!Q", buf, 2)[0], 10
            if b1 & 0x80:
                pos += 4  # a server must not mask; tolerate it
            if len(buf) < pos + n:
                break
            payload, buf = buf[pos:pos + n], buf[pos + n:]
            opcode = b0 & 0x0F
            if opcode == 0x8:
                self._on_close(payload)
            elif opcode == 0x9:  # ping: answer, or Autobahn drops us after its ping timeout
                self.transport.write(client_frame(payload, 0xA))
            elif opcode == 0xA and len(payload) == 8 and self.pongs is not None:
                sent = struct.unpack("!d", payload)[0]
                self.pongs.append((sent, time.monotonic() - sent))
        self._buf = buf

    def _on_close(self, payload: bytes) -> None:
        if self.close_at is None:
            self.close_at = time.monotonic()
            if len(payload) >= 2:
                self.close_code = struct.unpack_from("!H", payload)[0]
                self.close_reason = payload[2:].decode("utf-8", "replace")
            else:
                self.close_code = 1005
            self.transport.write(client_frame(payload[:2], 0x8))
            # The server closes TCP after our reply; don't wait for ever.
            asyncio.get_running_loop().call_later(self._close_wait, self.transport.abort)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def connection_lost(self, exc) -> None:
        self.lost_at = time.monotonic()
        self._can_write.set()
        if self.close_at is None and self.error is None:
            self.error = f"connection lost without a close frame: {exc or 'EOF'}"
        if not self.opened.done():
            self.opened.set_result(False)
        if not self.finished.done():
            self.finished.set_result(None)

    def _fail(self, reason: str) -> None:
        self.error = self.error or reason
        if self.transport is not None:
            self.transport.abort()
        if not self.opened.done():
            self.opened.set_result(False)

    # sending

    @property
    def alive(self) -> bool:
        return self._open and self.close_at is None and self.lost_at is None

    def send(self, data: bytes) -> None:
        self.transport.write(data)
        size = self.transport.get_write_buffer_size()
        if size > self.max_buffer:
            self.max_buffer = size

    def result(self) -> dict:
        backlog = None
        if self.stop_sent_at is not None and self.close_at is not None:
            backlog = self.close_at - self.stop_sent_at
        return {
            "index": self.index, "callId": self.call_id, "sessionId": self.session_id,
            "track": self.track, "frames": self.frames_sent, "status": self.status,
            "handshake_s": (self.opened_at - self.connect_started)
            if self.opened_at and self.connect_started else None,
            "first_send_at": self.first_send_at, "stop_sent_at": self.stop_sent_at,
            "close_at": self.close_at, "close_code": self.close_code,
            "close_reason": self.close_reason, "backlog_s": backlog,
            "max_client_buffer": self.max_buffer, "error": self.error,
        }


# -- a worker process --------------------------------------------------------


class Worker:
    def __init__(self, args, indices: list[int]):
        self.args = args
        url = urlsplit(args.url)
        if url.scheme != "ws":
            raise SystemExit("only ws:// URLs (the benchmark runs on loopback)")
        self.host, self.port = url.hostname, url.port or 80
        self.path = url.path or "/"
        self.indices = indices
        self.frames = args.frames if args.flood else int(round(args.seconds / FRAME_SECONDS))
        rng = random.Random(args.seed)
        tracks = sorted({i % args.tracks for i in indices})
        t0 = time.monotonic()
        self.ticks = {t: encode_track(t, self.frames, rng) for t in tracks}
        self.encode_s = time.monotonic() - t0
        self.stops = stop_messages(self.frames)
        self.calls: list[Call] = []
        self.lateness: list[float] = []  # per timer tick: end of its sends minus due time
        self.wake_lateness: list[float] = []  # per timer tick: wake-up minus due time
        self._handshakes = None
        # Probe pings: answered only after the server has handled everything sent
        # before them on that socket, so their round trip is the recorder's
        # backlog while the calls run (the Stop backlog is measured at the end).
        self.pongs: list[tuple[float, float]] = []

    async def _connect(self, call: Call, at: float) -> bool:
        loop = asyncio.get_running_loop()
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        async with self._handshakes:
            call.connect_started = time.monotonic()
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda: call, self.host, self.port), 15)
                ok = await asyncio.wait_for(asyncio.shield(call.opened), 15)
            except (OSError, asyncio.TimeoutError) as e:
                call.error = call.error or f"connect: {e!r}"
                call.status = call.status or "connect failed"
                if call.transport is not None:
                    call.transport.abort()
                if not call.finished.done():
                    call.finished.set_result(None)
                return False
        if not ok and not call.finished.done():
            call.finished.set_result(None)
        return ok

    def _make_calls(self) -> None:
        a = self.args
        for i in self.indices:
            call = Call(i, call_id_for(a.run_id, i), i % a.tracks,
                        f"{self.host}:{self.port}", self.path, a.secret, a.close_wait)
            call.pongs = self.pongs
            self.calls.append(call)

    def _ramp_time(self, call: Call) -> float:
        # Calls connect evenly over the ramp, in global index order (across workers).
        a = self.args
        return a.start_at + a.ramp * call.index / max(1, a.calls)

    async def run(self) -> dict:
        a = self.args
        self._handshakes = asyncio.Semaphore(a.handshake_concurrency)
        self._make_calls()
        started = time.monotonic()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        if a.flood:
            await asyncio.gather(*(self._flood_call(c) for c in self.calls))
        else:
            await self._realtime()
        await self._wait_closes()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic() - started
        return {
            "calls": [c.result() for c in self.calls],
            "frames_per_call": self.frames,
            "encode_s": self.encode_s,
            "late_before_start": started - a.start_at if started > a.start_at else 0.0,
            "lateness": _summary(self.lateness),
            "wake_lateness": _summary(self.wake_lateness),
            "ticks_late_20ms": sum(1 for x in self.lateness if x > 0.020),
            "ticks": len(self.lateness),
            "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
            "wall_s": wall,
            "max_rss_kb": ru1.ru_maxrss,
            "pongs": self.pongs,
        }

    async def _wait_closes(self) -> None:
        pending = [c.finished for c in self.calls if not c.finished.done()]
        if pending:
            done, not_done = await asyncio.wait(pending, timeout=self.args.close_timeout)
            for c in self.calls:
                if not c.finished.done():
                    c.error = c.error or f"no close within {self.args.close_timeout} s after the Stops"
                    if c.transport is not None:
                        c.transport.abort()

    async def _flood_call(self, call: Call) -> None:
        if not await self._connect(call, self._ramp_time(call)):
            return
        ticks = self.ticks[call.track]
        call.send(opening_messages(call.call_id, call.session_id))
        call.first_send_at = time.monotonic()
        j = 0
        while j < self.frames:
            await call._can_write.wait()
            if not call.alive:
                return
            call.send(b"".join(ticks[j:j + BURST_TICKS]))
            j = min(self.frames, j + BURST_TICKS)
            call.frames_sent = j
            await asyncio.sleep(0)
        call.send(self.stops)
        call.stop_sent_at = time.monotonic()

    async def _realtime(self) -> None:
        """One timer for all calls: every 5 ms, send the frames of the calls due then."""
        a = self.args
        buckets: list[dict[Call, int]] = [dict() for _ in range(SLOTS)]  # call -> tick of frame 1
        tick = FRAME_SECONDS / SLOTS
        t0 = a.start_at
        state = {"k": 0}  # the next tick to run

        async def join(call: Call) -> None:
            if not await self._connect(call, self._ramp_time(call)):
                return
            call.send(opening_messages(call.call_id, call.session_id))
            # First frame on the call's own slot, at the next tick of that slot.
            slot = call.index % SLOTS
            k = state["k"]
            k += (slot - k) % SLOTS
            buckets[slot][call] = k

        joins = [asyncio.ensure_future(join(c)) for c in self.calls]
        pending_joins = len(joins)
        for j in joins:
            j.add_done_callback(lambda _: None)
        frames = self.frames
        stops = self.stops
        ticks_of = self.ticks
        lateness = self.lateness
        wake = self.wake_lateness
        mono = time.monotonic
        ping_every = 1.0 / a.ping_rate if a.ping_rate > 0 else None
        next_ping = t0
        ping_turn = 0
        while True:
            k = state["k"]
            due = t0 + k * tick
            now = mono()
            if due > now:
                await asyncio.sleep(due - now)
                now = mono()
            bucket = buckets[k % SLOTS]
            done = []
            for call, k1 in bucket.items():
                j = (k - k1) // SLOTS  # frame index due now
                if not call.alive:
                    done.append(call)
                    continue
                if j == 0:
                    call.first_send_at = now
                if j < frames - 1:
                    call.send(ticks_of[call.track][j])
                else:  # the last frame pair, then the Stops
                    call.send(ticks_of[call.track][j] + stops)
                    call.stop_sent_at = mono()
                    done.append(call)
                call.frames_sent = j + 1
            for call in done:
                del bucket[call]
            if bucket or done:
                end = mono()
                lateness.append(end - due)
                wake.append(now - due)
            if ping_every is not None and now >= next_ping:
                next_ping = now + ping_every
                live = [c for b in buckets for c in b]
                if live:
                    call = live[ping_turn % len(live)]
                    ping_turn += 1
                    call.send(client_frame(struct.pack("!d", mono()), 0x9))
            state["k"] = k + 1
            if pending_joins:
                pending_joins = sum(1 for j in joins if not j.done())
            elif not any(buckets):
                break


def _summary(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    n = len(s)
    return {"n": n, "p50": s[n // 2], "p99": s[min(n - 1, int(n * 0.99))], "max": s[-1],
            "mean": sum(s) / n}


def percentile(xs: list[float], q: float) -> float | None:
    s = sorted(x for x in xs if x is not None)
    if not s:
        return None
    return s[min(len(s) - 1, int(len(s) * q))]


# -- the parent: split the calls over workers, merge ---------------------------


def merge(parts: list[dict], args) -> dict:
    calls = sorted((c for p in parts for c in p["calls"]), key=lambda c: c["index"])
    frames = parts[0]["frames_per_call"] if parts else 0
    lat = [p["lateness"] for p in parts if p["lateness"].get("n")]
    backlog = [c["backlog_s"] for c in calls if c["backlog_s"] is not None]
    handshake = [c["handshake_s"] for c in calls if c["handshake_s"] is not None]
    wall = max((p["wall_s"] for p in parts), default=0.0)
    cpu = sum(p["cpu_s"] for p in parts)
    late_p99 = max((x["p99"] for x in lat), default=0.0)
    late_max = max((x["max"] for x in lat), default=0.0)
    ticks = sum(p["ticks"] for p in parts)
    ticks_late = sum(p["ticks_late_20ms"] for p in parts)
    problems = []
    if not args.flood:
        if late_p99 > args.max_lateness:
            problems.append(f"generator p99 send lateness {late_p99 * 1000:.1f} ms > "
                            f"{args.max_lateness * 1000:.0f} ms")
        if ticks and ticks_late / ticks > 0.01:
            problems.append(f"{ticks_late}/{ticks} generator ticks more than 20 ms late")
    late_start = max((p["late_before_start"] for p in parts), default=0.0)
    if late_start > 0.5:
        problems.append(f"a worker started {late_start:.2f} s after the start time "
                        "(encoding took too long)")
    if cpu / max(wall, 1e-9) > 0.9 and not args.flood:
        problems.append(f"generator used {cpu / wall:.0%} of its core")
    ok_calls = [c for c in calls if c["status"] == 101 and c["close_code"] == 1000
                and c["frames"] == frames and not c["error"]]
    return {
        "mode": "flood" if args.flood else "realtime",
        "url": args.url, "run_id": args.run_id, "calls_requested": args.calls,
        "procs": args.procs, "frames_per_call": frames, "tracks": args.tracks,
        "start_at": args.start_at,
        "messages": len(calls) * messages_per_call(frames),
        "media_messages_sent": sum(c["frames"] for c in calls) * len(PERSPECTIVES),
        "calls_ok": len(ok_calls),
        "first_send_at": min((c["first_send_at"] for c in calls if c["first_send_at"]), default=None),
        "last_close_at": max((c["close_at"] for c in calls if c["close_at"]), default=None),
        "backlog_p50": percentile(backlog, 0.5), "backlog_p99": percentile(backlog, 0.99),
        "backlog_max": max(backlog, default=None),
        "handshake_p50": percentile(handshake, 0.5), "handshake_max": max(handshake, default=None),
        "max_client_buffer": max((c["max_client_buffer"] for c in calls), default=0),
        "generator": {
            "cpu_s": cpu, "wall_s": wall, "core_share": cpu / max(wall, 1e-9),
            "lateness_p99": late_p99, "lateness_max": late_max,
            "ticks": ticks, "ticks_late_20ms": ticks_late,
            "encode_s": max((p["encode_s"] for p in parts), default=0.0),
            "valid": not problems, "problems": problems,
        },
        "pongs": sorted(x for p in parts for x in p.get("pongs", [])),
        "calls": calls,
    }


def summary_lines(r: dict) -> list[str]:
    g = r["generator"]

    def ms(x):
        return "-" if x is None else f"{x * 1000:.0f} ms"

    lines = [
        f"{r['mode']}: {r['calls_ok']}/{r['calls_requested']} calls closed 1000 with all "
        f"{r['frames_per_call']} frames per perspective sent ({r['messages']} messages)",
        f"backlog (final Stop -> server close): p50 {ms(r['backlog_p50'])}, "
        f"p99 {ms(r['backlog_p99'])}, max {ms(r['backlog_max'])}",
        f"generator: {g['cpu_s']:.1f} s CPU in {g['wall_s']:.1f} s ({g['core_share']:.0%} of a core), "
        f"send lateness p99 {g['lateness_p99'] * 1000:.1f} ms, max {g['lateness_max'] * 1000:.1f} ms, "
        f"{g['ticks_late_20ms']}/{g['ticks']} ticks >20 ms late",
    ]
    if not g["valid"]:
        lines.append("INVALID RUN: the generator fell behind: " + "; ".join(g["problems"]))
    bad = [c for c in r["calls"] if not (c["status"] == 101 and c["close_code"] == 1000
                                         and c["frames"] == r["frames_per_call"])]
    for c in bad[:10]:
        lines.append(f"  call {c['callId']}: status {c['status']}, close {c['close_code']} "
                     f"{c['close_reason']!r}, frames {c['frames']}, error {c['error']}")
    if len(bad) > 10:
        lines.append(f"  ... and {len(bad) - 10} more failed calls")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="ws://127.0.0.1:PORT/")
    p.add_argument("--calls", type=int, default=10, help="concurrent calls (default 10)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--flood", action="store_true", help="send as fast as TCP allows")
    mode.add_argument("--seconds", type=float, default=10.0,
                      help="realtime: seconds of audio per call (default 10)")
    p.add_argument("--frames", type=int, default=1500,
                   help="flood: frames per perspective per call (default 1500 = 30 s)")
    p.add_argument("--procs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--ramp", type=float, default=None,
                   help="seconds over which calls connect (default: 2 s realtime, 0.5 s flood)")
    p.add_argument("--tracks", type=int, default=8, help="distinct audio tracks (default 8)")
    p.add_argument("--secret", default=None, help="sent as Authorization: Bearer")
    p.add_argument("--run-id", default=None, help="callId prefix (default: random)")
    p.add_argument("--start-at", type=float, default=None,
                   help="time.monotonic() at which to start (default: now + 1 s)")
    p.add_argument("--handshake-concurrency", type=int, default=16,
                   help="handshakes in progress per process (default 16)")
    p.add_argument("--close-timeout", type=float, default=60.0,
                   help="how long to wait for the server's close after the Stops (default 60)")
    p.add_argument("--close-wait", type=float, default=5.0, help=argparse.SUPPRESS)
    p.add_argument("--max-lateness", type=float, default=0.010,
                   help="p99 send lateness above which a realtime run is invalid (default 0.010 s)")
    p.add_argument("--ping-rate", type=float, default=10.0,
                   help="realtime: probe pings per second per process (default 10; 0: none)")
    p.add_argument("--seed", type=int, default=6455)
    p.add_argument("--out", help="write the merged results (JSON) here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "i/K"
    args = p.parse_args(argv)
    if args.calls < 1 or args.procs < 1:
        p.error("--calls and --procs must be at least 1")
    args.procs = min(args.procs, args.calls)
    if args.ramp is None:
        args.ramp = 0.5 if args.flood else 2.0
    if args.run_id is None:
        args.run_id = "b" + os.urandom(4).hex()
    if args.start_at is None:
        args.start_at = time.monotonic() + 1.0
    return args


def worker_main(args) -> None:
    i, k = (int(x) for x in args.worker.split("/"))
    indices = list(range(i, args.calls, k))
    result = asyncio.run(Worker(args, indices).run())
    with open(args.out, "w") as f:
        json.dump(result, f)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    # Every worker gets the same run id and start time.
    base = [a for a in argv if a not in ("--quiet",)]
    base = _drop_option(base, "--out")
    base = _drop_option(base, "--run-id")
    base = _drop_option(base, "--start-at")
    base = _drop_option(base, "--procs")
    base = _drop_option(base, "--ramp")
    tmp = tempfile.mkdtemp(prefix="loadgen-")
    procs, outs = [], []
    for i in range(args.procs):
        out = os.path.join(tmp, f"worker-{i}.json")
        outs.append(out)
        procs.append(subprocess.Popen([
            sys.executable, os.path.abspath(__file__), *base, "--worker", f"{i}/{args.procs}",
            "--procs", str(args.procs), "--run-id", args.run_id, "--start-at", repr(args.start_at),
            "--ramp", repr(args.ramp), "--out", out,
        ]))
    codes = [p.wait() for p in procs]
    parts = []
    for code, out in zip(codes, outs):
        if code != 0 or not os.path.exists(out):
            print(f"loadgen: a worker failed (exit {code})", file=sys.stderr)
            return 2
        with open(out) as f:
            parts.append(json.load(f))
        os.unlink(out)
    os.rmdir(tmp)
    result = merge(parts, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    if not args.quiet:
        print("\n".join(summary_lines(result)))
    ok = result["calls_ok"] == args.calls and result["generator"]["valid"]
    return 0 if ok else 1


def _drop_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
