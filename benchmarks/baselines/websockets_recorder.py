"""Baseline: the vendor's sample server on ``websockets``, plus the least recording.

What the Engage Voice documentation's Python sample does (``websockets.serve``,
``async for message in websocket``, ``json.loads``, dispatch on ``event``,
``base64.b64decode`` of the media), plus the minimum a recorder needs:

* decode mu-law to 16-bit linear with a table (``bytes.translate`` into the low
  and the high byte, as a competent minimal implementation would; no audioop);
* append each frame to a buffered file per perspective
  (``<out>/<callId>-<sessionId>.<Perspective>.pcm``);
* after one Stop per perspective that sent media: close the files, write
  ``<out>/<callId>-<sessionId>.json`` with the frame counts (atomically), and
  close the socket with 1000.

No secret, no reordering, no durability (the files are buffered, flushed at the
end), no WAV, no sidecar, no archive: it is the floor a product is measured
against, not a product.

    python benchmarks/baselines/websockets_recorder.py --port 3333 --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal

from websockets.asyncio.server import serve

log = logging.getLogger("baseline")

PERSPECTIVES = ("Participant", "Conference")


def _ulaw_table() -> tuple[bytes, bytes]:
    low, high = bytearray(256), bytearray(256)
    for u in range(256):
        v = ~u & 0xFF
        exponent = (v >> 4) & 0x07
        magnitude = ((((v & 0x0F) << 3) + 0x84) << exponent) - 0x84
        sample = (-magnitude if v & 0x80 else magnitude) & 0xFFFF
        low[u], high[u] = sample & 0xFF, sample >> 8
    return bytes(low), bytes(high)


_LOW, _HIGH = _ulaw_table()


def ulaw_to_pcm16le(ulaw: bytes) -> bytearray:
    out = bytearray(2 * len(ulaw))
    out[0::2] = ulaw.translate(_LOW)
    out[1::2] = ulaw.translate(_HIGH)
    return out


def _safe(s: object) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(s))[:80]


def make_handler(out_dir: str):
    async def handle(websocket):
        name = None
        files: dict[str, object] = {}
        frames = {p: 0 for p in PERSPECTIVES}
        stops = 0
        try:
            async for message in websocket:
                msg = json.loads(message)
                event = msg.get("event")
                if event == "Media":
                    perspective = msg["perspective"]
                    pcm = ulaw_to_pcm16le(base64.b64decode(msg["media"]))
                    f = files.get(perspective)
                    if f is None:
                        f = files[perspective] = open(
                            os.path.join(out_dir, f"{name}.{perspective}.pcm"), "wb")
                    f.write(pcm)
                    frames[perspective] += 1
                elif event == "Start":
                    meta = msg["metadata"]
                    name = f"{_safe(meta['callId'])}-{_safe(meta.get('sessionId', ''))}"
                    log.info("call %s started", name)
                elif event == "Stop":
                    stops += 1
                    if stops >= max(1, len(files)):
                        break
                elif event == "Connected":
                    pass
        finally:
            for f in files.values():
                f.close()
        if name is None:
            return
        path = os.path.join(out_dir, name + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump({"name": name, "frames": frames, "stops": stops,
                       "complete": stops >= len(files)}, f)
        os.replace(path + ".tmp", path)
        log.info("call %s ended: %s", name, frames)
        await websocket.close(1000, "call ended: stop")

    return handle


async def main() -> None:
    p = argparse.ArgumentParser(description="baseline recorder on websockets")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3333)
    p.add_argument("--out", required=True, help="directory for the recordings")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    # compression=None: the platform does not negotiate permessage-deflate, and
    # neither does the load generator; max_size as the recorder's default.
    async with serve(make_handler(args.out), args.host, args.port, compression=None,
                     max_size=65536, ping_interval=20, ping_timeout=20):
        log.info("listening on %s:%d", args.host, args.port)
        await stop


if __name__ == "__main__":
    asyncio.run(main())
