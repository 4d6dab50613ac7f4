"""In-process microbenchmark of the WebSocket front door: bytes in, spool out.

One call is opened on a :class:`~evrecorder.protocol.RecorderProtocol` over an
in-memory transport (handshake, Connected, Start), then pre-encoded masked
Media frames (the load generator's, ``loadgen.encode_track``) are fed to
``dataReceived`` the way the reactor would: ``realtime`` = one read per tick
(the agent's and the caller's frame), ``flood`` = 64 KiB reads cut anywhere.
Frames go through the real protocol, ``Call.media`` and the spool (files in a
temporary directory); no sockets, no reactor, no finalizing.  It prints CPU
microseconds per Media message (``time.process_time``, best of ``--repeat``).

Run from the repository root (it imports ``evrecorder`` from this checkout)::

    python3 benchmarks/frames_micro.py                      # both modes
    python3 benchmarks/frames_micro.py --mode flood --frames 20000 --repeat 7
    python3 benchmarks/frames_micro.py --profile flood      # cProfile, top 25

Instruction counts, deterministic on a shared machine (valgrind): run it
under callgrind with ``--repeat 1`` and ``--repeat 2``; the difference of the
two "Collected" totals, divided by 2 x ``--frames``, is the instructions per
Media message (setup and start-up cancel out).  Give valgrind the real
interpreter (``python3 -c 'import sys; print(sys.executable)'``), not a shim::

    PY=$(python3 -c 'import sys; print(sys.executable)')
    for r in 1 2; do
        valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
            $PY benchmarks/frames_micro.py --mode flood --frames 2000 --repeat $r 2>&1 |
            grep Collected
    done
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, REPO)

import loadgen  # noqa: E402
from twisted.internet import address, task  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from evrecorder.call import CallRegistry  # noqa: E402
from evrecorder.protocol import RecorderFactory  # noqa: E402
from evrecorder.settings import Settings  # noqa: E402
from evrecorder.spool import Spool  # noqa: E402

HANDSHAKE = (
    b"GET /?callId=bench HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


class Bench:
    def __init__(self, root: str):
        self.root = root
        self.settings = Settings(spool=os.path.join(root, "spool"),
                                 archive=os.path.join(root, "archive"))
        self.spool = Spool(self.settings.spool)
        self.spool.prepare()
        self.clock = task.Clock()
        self.ended = []
        self.registry = CallRegistry(self.spool, self.settings, self.clock, self.ended.append)
        self.factory = RecorderFactory(self.registry, self.settings, self.clock)
        self.n = 0

    def open_call(self):
        self.n += 1
        proto = self.factory.buildProtocol(address.IPv4Address("TCP", "127.0.0.1", 40000 + self.n))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(HANDSHAKE)
        assert proto.state == proto.STATE_OPEN, transport.value()[:200]
        proto.dataReceived(loadgen.opening_messages(f"bench-{self.n}", "1"))
        assert proto._call is not None
        return proto, transport


def reads(ticks: list[bytes], mode: str) -> list[bytes]:
    if mode == "realtime":
        return ticks
    stream = b"".join(ticks)
    return [stream[i:i + 65536] for i in range(0, len(stream), 65536)]


def run(mode: str, frames: int, repeat: int) -> float:
    ticks = loadgen.encode_track(0, frames, random.Random(1))
    chunks = reads(ticks, mode)
    messages = 2 * frames
    best = float("inf")
    root = tempfile.mkdtemp(prefix="frames-micro-")
    try:
        bench = Bench(root)
        for _ in range(repeat):
            proto, transport = bench.open_call()
            feed = proto.dataReceived
            t0 = time.process_time()
            for chunk in chunks:
                feed(chunk)
            dt = time.process_time() - t0
            assert proto.state == proto.STATE_OPEN, transport.value()[-200:]
            assert proto._call.frames_received == messages, proto._call.frames_received
            proto._call.end("stop")
            best = min(best, dt)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return best / messages * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("realtime", "flood", "both"), default="both")
    p.add_argument("--frames", type=int, default=10000, help="frames per perspective")
    p.add_argument("--repeat", type=int, default=5, help="runs; the best is reported")
    p.add_argument("--profile", choices=("realtime", "flood"), help="cProfile one run instead")
    args = p.parse_args()
    if args.profile:
        import cProfile
        import pstats

        path = os.path.join(tempfile.gettempdir(), f"frames-micro-{os.getpid()}.prof")
        cProfile.runctx("run(mode, frames, 1)", globals(),
                        {"mode": args.profile, "frames": args.frames}, path)
        pstats.Stats(path).sort_stats("tottime").print_stats(25)
        os.unlink(path)
        return
    for mode in ("realtime", "flood") if args.mode == "both" else (args.mode,):
        us = run(mode, args.frames, args.repeat)
        print(f"{mode:8s} {us:6.2f} CPU-us per Media message "
              f"({args.frames} frames x 2, best of {args.repeat})")


if __name__ == "__main__":
    main()
