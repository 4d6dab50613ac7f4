"""How long does a call take from its end to the archive?  Finalize and publish, timed.

The Stop -> archived path without the network: a spool entry of a realistic
call, written with the real :class:`~evrecorder.spool.CallSpool` writer (both
perspectives' frames interleaved in arrival order in the call's one
``call.frames``, flushed a few ticks at a time), is finalized with
:func:`evrecorder.finalize.finalize` (cutting ``call.frames`` per perspective,
placement, stereo WAV, sidecar: what the archiver runs in its worker thread),
then published to a :class:`~evrecorder.stores.LocalStore` the way the archiver
does it (``_load_item``, ``store.publish``, ``entry.remove``).

Each step is timed in CPU seconds of the calling thread (``time.thread_time``,
the figure that competes with the reactor thread for the GIL and the core) and
in wall seconds (which include waiting for fsync).  Results are given per call,
in microseconds per frame record (both perspectives), and scaled to a
10-minute call.

Variants (``--variants``):

``contiguous``
    every frame once, in order: what nearly every real call looks like.
``messy``
    seeded: about 1 % of frames reordered within the window, 0.5 % duplicated,
    0.2 % never sent (gaps), 0.05 % arriving after the window (late), and the
    first frames of a perspective out of order.
``twice``
    every frame arrives twice (as if two sockets carried one perspective):
    no two frames in a row are contiguous, the worst case for the run
    detection (not in the default set).

Run from the repository root (it imports ``evrecorder`` from ``PYTHONPATH`` or
the checkout)::

    # 10-minute calls, both formats, contiguous and messy, 3 calls each (~1 min)
    python3 benchmarks/finalize_bench.py
    python3 benchmarks/finalize_bench.py --seconds 30 --repeat 10
    python3 benchmarks/finalize_bench.py --variants contiguous --busy 0.7
    python3 benchmarks/finalize_bench.py --formats pcm16 --variants contiguous --profile fin.prof
    PYTHONPATH=/other/checkout python3 benchmarks/finalize_bench.py --label other --json o.json

``--busy 0.7`` adds a thread that holds the GIL 70 % of the time (pure Python
in 10 ms periods), standing in for the reactor thread of a loaded recorder:
the wall figures then show how long Stop -> archived takes while finalize
competes with live calls.  Calls shorter than 10 minutes are scaled linearly,
fixed costs included.

To compare two versions of the code, run it twice, interleaved, with
``PYTHONPATH`` pointing at each checkout (``--label`` names them in the output),
and compare the CPU figures: the wall figures depend on the disk and on whoever
else uses the machine.  Scratch files go to a temporary directory (``--dir``
to choose where), removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

if not os.environ.get("PYTHONPATH"):
    # From a checkout: this checkout's package, not an installed one.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evrecorder import finalize as finalize_mod  # noqa: E402
from evrecorder.archiver import _load_item  # noqa: E402
from evrecorder.settings import PERSPECTIVES, Settings  # noqa: E402
from evrecorder.spool import Spool  # noqa: E402
from evrecorder.stores import LocalStore  # noqa: E402

FRAME = 160
TICK = 0.02


def arrival_order(frames: int, variant: str, window: int, rng: random.Random) -> list[int]:
    """Sequence ids of one perspective in arrival order."""
    ids = list(range(1, frames + 1))
    if variant == "contiguous":
        return ids
    if variant == "twice":
        # Every frame twice (say, one perspective carried by two sockets):
        # the worst case for run detection.
        return [s for s in ids for _ in range(2)]
    if variant != "messy":
        raise ValueError(f"unknown variant {variant!r}")
    # Gaps: frames never sent.
    ids = [s for s in ids if rng.random() >= 0.002 or s == 1]
    # Reordering within the window: a frame held back by 1..window-1 places.
    out = list(ids)
    for i in range(len(out) - 1):
        if rng.random() < 0.01:
            j = min(len(out) - 1, i + rng.randrange(1, window))
            out.insert(j, out.pop(i))
    # Late: a frame arriving well after the window (it was given up as silence).
    for i in range(len(out) - 1, window * 3, -1):
        if rng.random() < 0.0005:
            j = min(len(out) - 1, i + window + rng.randrange(5, 40))
            out.insert(j, out.pop(i))
    # Duplicates: a frame repeated a little later.
    dup = []
    for s in out:
        dup.append(s)
        if rng.random() < 0.005:
            dup.append(s)
    # The first frames out of order.
    head = dup[:5]
    rng.shuffle(head)
    return head + dup[5:]


def payload_for(perspective: int, seq: int) -> bytes:
    # Varied, deterministic audio (never only silence).
    return bytes(((seq * 7 + perspective * 91 + i * 13) & 0xFF) for i in range(FRAME))


def build_entry(spool: Spool, n: int, frames: int, variant: str, window: int, seed: int):
    """A spool entry as a call that just ended leaves it; returns it and its frame count."""
    rng = random.Random(seed)
    started = 1_700_000_000.0 + n
    entry = spool.new_call(f"bench{n}", "1", started)
    entry.create({
        "callId": f"bench{n}", "sessionId": "1", "connectedAt": started,
        "createdAt": started, "metadata": {"callId": f"bench{n}", "sessionId": "1",
                                           "agentId": "a1"}, "query": {},
    })
    orders = [arrival_order(frames, variant, window, rng) for _ in PERSPECTIVES]
    # A small pool of distinct payloads keeps building fast; content is irrelevant
    # to the cost but must not be uniform.
    pool = [[payload_for(p, s) for s in range(64)] for p in range(len(PERSPECTIVES))]
    # The caller starts a frame after the agent (offset 1 frame).
    entry.append_event({"event": "media", "perspective": PERSPECTIVES[0], "at": started,
                        "offsetFrames": 0, "firstSequenceId": orders[0][0]})
    entry.append_event({"event": "media", "perspective": PERSPECTIVES[1],
                        "at": started + TICK, "offsetFrames": 1,
                        "firstSequenceId": orders[1][0]})
    records = 0
    longest = max(len(o) for o in orders)
    for i in range(longest):
        for p, perspective in enumerate(PERSPECTIVES):
            if i < len(orders[p]):
                seq = orders[p][i]
                entry.append_frame(perspective, seq, pool[p][seq % 64])
                records += 1
        if i % 8 == 7:
            entry.flush()
    end = started + frames * TICK
    for perspective in PERSPECTIVES:
        entry.append_event({"event": "stop", "perspective": perspective, "at": end,
                            "metadata": {"duration": int(frames * TICK)}})
    entry.append_event({"event": "end", "reason": "stop", "complete": True, "at": end})
    entry.close()
    return entry, records


class Busy:
    """A thread that keeps the GIL busy ``duty`` of the time, as a loaded reactor would."""

    def __init__(self, duty: float):
        import threading

        self.duty = duty
        self.spins = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        period = 0.01
        while not self._stop.is_set():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < period * self.duty:
                self.spins += 1  # pure Python: holds the GIL like the reactor's work
            if self.duty < 1.0:
                time.sleep(period * (1.0 - self.duty))

    def __enter__(self) -> "Busy":
        if self.duty > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.duty > 0:
            self._thread.join()


def timed(f, *args):
    w0, c0 = time.perf_counter(), time.thread_time()
    result = f(*args)
    return result, time.thread_time() - c0, time.perf_counter() - w0


def publish(store: LocalStore, entry) -> str:
    """What the archiver's upload does, minus the thread hop."""
    _, item = _load_item(entry, time.time)
    key = store.publish(item)
    entry.remove()
    return key


def summary(rows: list[dict], scale: float, store: bool) -> str:
    """One line: medians (and the finalize minimum), scaled to a 10-minute call."""
    def med(key):
        return statistics.median(r[key] for r in rows) * scale

    def low(key):
        return min(r[key] for r in rows) * scale

    per_frame = statistics.median(r["finalize_cpu"] / r["records"] for r in rows) * 1e6
    line = (
        f"finalize CPU {per_frame:5.2f} us/frame = {med('finalize_cpu'):.3f} s per 10-min call "
        f"(min {low('finalize_cpu'):.3f}, wall {med('finalize_wall'):.3f})"
    )
    if store:
        line += (
            f"; publish CPU {med('publish_cpu'):.3f} s (wall {med('publish_wall'):.3f})"
            f"; Stop->archived CPU {med('finalize_cpu') + med('publish_cpu'):.3f} s"
            f" (wall {med('finalize_wall') + med('publish_wall'):.3f})"
        )
    return line + f"  [median of {len(rows)}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="call length (default 600)")
    ap.add_argument("--formats", default="pcm16,mulaw")
    ap.add_argument("--variants", default="contiguous,messy")
    ap.add_argument("--repeat", type=int, default=3, help="calls timed per combination")
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--no-store", action="store_true", help="time finalize only")
    ap.add_argument("--profile", metavar="FILE",
                    help="cProfile finalize() (thread CPU time) into FILE (pstats)")
    ap.add_argument("--busy", type=float, default=0.0, metavar="DUTY",
                    help="while timing, a thread keeps the GIL busy this share of the time "
                         "(0..1), as the reactor thread of a loaded recorder does")
    ap.add_argument("--dir", help="where to put the scratch spool and archive")
    ap.add_argument("--label", default="", help="a name for this run in the output")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = ap.parse_args(argv)

    frames = int(round(args.seconds / TICK))
    scale = 600.0 / args.seconds
    scratch = tempfile.mkdtemp(prefix="evr-finalize-bench-", dir=args.dir)
    results = []
    profiler = None
    if args.profile:
        import cProfile

        # CPU time of this thread: waiting for fsync is not what competes
        # with the reactor.
        profiler = cProfile.Profile(time.thread_time)
    try:
        spool = Spool(os.path.join(scratch, "spool"))
        spool.prepare()
        store = LocalStore(os.path.join(scratch, "archive"))
        store.check()
        n = 0
        print(f"# {args.label or 'evrecorder'} from {os.path.dirname(finalize_mod.__file__)}: "
              f"{args.seconds:g} s calls ({frames} frames per perspective), window {args.window}"
              + (f", GIL busy {args.busy:.0%} of the time" if args.busy else ""))
        for variant in args.variants.split(","):
            for fmt in args.formats.split(","):
                settings = Settings(spool=spool.root, format=fmt, reorder_window=args.window)
                rows = []
                for r in range(args.repeat):
                    n += 1
                    entry, records = build_entry(spool, n, frames, variant, args.window, seed=r)
                    with Busy(args.busy):
                        if profiler is not None:
                            profiler.enable()
                        sidecar, fin_cpu, fin_wall = timed(finalize_mod.finalize, entry, settings)
                        if profiler is not None:
                            profiler.disable()
                        pub_cpu = pub_wall = 0.0
                        if not args.no_store:
                            _, pub_cpu, pub_wall = timed(publish, store, entry)
                    if args.no_store:
                        entry.remove()
                    rows.append({
                        "variant": variant, "format": fmt, "records": records,
                        "finalize_cpu": fin_cpu, "finalize_wall": fin_wall,
                        "publish_cpu": pub_cpu, "publish_wall": pub_wall,
                        "wav_bytes": sidecar["audio"]["bytes"],
                        "sha256": sidecar["audio"]["sha256"],
                        "perspectives": {p: {k: v for k, v in d.items() if k != "stop"}
                                         for p, d in sidecar["perspectives"].items()},
                    })
                results.extend(rows)
                print(f"{variant:10s} {fmt:5s} " + summary(rows, scale, not args.no_store))
                sys.stdout.flush()
        if profiler is not None:
            profiler.dump_stats(args.profile)
            print(f"# cProfile of finalize() written to {args.profile}")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"label": args.label, "seconds": args.seconds, "results": results}, f,
                          indent=1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
