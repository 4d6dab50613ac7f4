"""The spool's record of a gRPC recording's audio: ``call.chunks``.

A gRPC dialog's spool entry (``<spool>/calls/<name>/``) holds, beside
``call.json`` and ``events.jsonl`` (:mod:`evrecorder.spool`), one
append-only file of every accepted audio chunk of every segment, in arrival
order.  A record is :data:`CHUNK_RECORD` followed by the payload:

``>HIdHH``
    the segment's index in the call (the ``segment`` of its ``segment``
    event in ``events.jsonl``), ``seq``, the arrival time (seconds since the
    Unix epoch, float64: when the front door *read* the chunk), the chunk's
    ``duration`` as sent (ms), and the payload's length in bytes.

The arrival time is what finalize needs to tell a hold pause from a network
stall.  A torn last record (``kill -9`` mid-write) is ignored on reading.
"""

from __future__ import annotations

import struct
from typing import Iterator

CHUNKS_FILE = "call.chunks"
CHUNK_RECORD = struct.Struct(">HIdHH")
MAX_SEGMENTS = 0xFFFF
MAX_SEQ = 0xFFFFFFFF
MAX_PAYLOAD = 0xFFFF

_pack = CHUNK_RECORD.pack


def pack_chunk(segment: int, seq: int, at: float, duration_ms: int, payload: bytes) -> bytes:
    """One record and its payload, as appended to ``call.chunks``."""
    return _pack(segment, seq, at, min(duration_ms, 0xFFFF), len(payload)) + payload


def read_chunks(path: str, block: int = 1 << 18) -> Iterator[tuple[int, int, float, int, bytes]]:
    """``(segment, seq, at, duration_ms, payload)`` in file order; a missing file has none."""
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        return
    head = CHUNK_RECORD.size
    unpack = CHUNK_RECORD.unpack_from
    with f:
        buf = b""
        pos = 0
        while True:
            more = f.read(block)
            if more:
                buf = buf[pos:] + more
                pos = 0
            end = len(buf)
            while end - pos >= head:
                segment, seq, at, duration, size = unpack(buf, pos)
                stop = pos + head + size
                if stop > end:
                    break
                yield segment, seq, at, duration, buf[pos + head : stop]
                pos = stop
            if not more:
                return  # what is left is a torn last record
