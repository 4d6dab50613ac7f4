"""Reading a spooled ``<Perspective>.frames`` file in runs, for the finalizer.

The file holds records ``>QH`` (sequenceId, payload length) + payload, in
arrival order (:mod:`evrecorder.spool`).  :func:`read_runs` gives the same
frames as :meth:`CallSpool.read_frames <evrecorder.spool.CallSpool.read_frames>`,
in the same order, and likewise stops quietly at a truncated last record, but
grouped: a run is frames with contiguous ids and equal length, one after the
other in the file, which is how nearly all of a call arrives.

Records are parsed :data:`CHUNK` at a time by one precompiled
:class:`struct.Struct` that cuts the chunk into headers and payloads, and the
headers are checked all at once: joined, they must be exactly the bytes that
contiguous ids of one length give (computed as one big integer).  So a
contiguous stretch of the file costs a few C calls per chunk rather than
Python work per frame.  The file is read in blocks and runs are capped at
:data:`RUN_MAX` frames: memory stays bounded however long the call.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Iterator

from evrecorder.spool import RECORD

#: Records parsed by one struct call, along a stretch in order.
CHUNK = 128
#: ... and after a chunk found a frame out of order (cheaper to lose).
SMALL_CHUNK = 16
#: Most frames in one run (a longer stretch comes as several runs).
RUN_MAX = 2048
#: Bytes read from the file at a time (a block that stays in the CPU cache
#: parses faster than a bigger one).
BLOCK = 1 << 18

_HEAD = RECORD.size
_MAX_SEQ = (1 << 64) - 1
#: Most records read one at a time before a chunk is tried again.
_MAX_SINGLES = 1024


class _Chunk:
    """Parsing ``count`` records whose payloads are ``size`` bytes, in one go."""

    def __init__(self, size: int, count: int):
        self.count = count
        self.rec = _HEAD + size
        self.span = count * self.rec
        self.struct = struct.Struct(">" + f"{_HEAD}s{size}s" * count)
        # The joined headers of records (seq + k, size), k < count, read as a
        # big-endian integer, are base + seq * unit: each header is the
        # 80-bit number (seq + k) << 16 | size, record k at 80 * (count-1-k).
        shifts = [8 * _HEAD * (count - 1 - k) for k in range(count)]
        self.base = sum((k << 16 | size) << sh for k, sh in zip(range(count), shifts))
        self.unit = sum(1 << (16 + sh) for sh in shifts)
        self.nbytes = _HEAD * count

    def headers(self, seq: int) -> bytes:
        """The joined headers of ``count`` contiguous records from ``seq``."""
        return (self.base + seq * self.unit).to_bytes(self.nbytes, "big")


@lru_cache(maxsize=64)
def _chunk(size: int, count: int) -> _Chunk:
    return _Chunk(size, count)


def read_runs(path: str, block: int = BLOCK) -> Iterator[tuple[int, int, list[bytes]]]:
    """Runs ``(first id, payload size, payloads)`` of a frames file, in file order.

    The ids of a run are ``first``, ``first + 1`` ...; every payload is
    ``size`` bytes.  A missing file has no runs.
    """
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        return
    head = RECORD.unpack_from
    # The run being collected: ids first .. expect - 1, payloads of run_size;
    # it takes ids up to limit - 1.  (No run yet: expect is -1, no id.)
    first = run_size = limit = 0
    expect = -1
    run: list[bytes] = []
    # How records are cut: CHUNK at a time along a stretch in order; after a
    # chunk that found a frame out of order, SMALL_CHUNK at a time until one
    # is whole again; and where even those keep failing at once (every frame
    # twice, say), one record at a time, for a stretch (`singles`) that
    # doubles while that goes on, so that it costs no more than reading
    # record by record.
    count = CHUNK
    singles = backoff = 0
    with f:
        buf = b""
        pos = 0
        eof = False
        while True:
            end = len(buf)
            while True:
                avail = end - pos
                if avail < _HEAD:
                    break
                seq, size = head(buf, pos)
                rec = _HEAD + size
                if not singles and size and avail >= count * rec and seq <= _MAX_SEQ - count:
                    chunk = _chunk(size, count)
                    parts = chunk.struct.unpack_from(buf, pos)
                    want = chunk.headers(seq)
                    if b"".join(parts[0::2]) == want:
                        n = count
                        payloads = parts[1::2]
                        count = CHUNK
                        backoff = 0
                    else:
                        # Contiguous up to the first record that is not (the
                        # first one always is: its header gave seq and size).
                        n = 1
                        while parts[2 * n] == want[_HEAD * n : _HEAD * (n + 1)]:
                            n += 1
                        payloads = parts[1 : 2 * n : 2]
                        if count == SMALL_CHUNK and n < SMALL_CHUNK // 4:
                            backoff = singles = min(2 * backoff or 1, _MAX_SINGLES)
                        count = SMALL_CHUNK
                    pos += n * rec
                    if seq == expect and size == run_size and seq < limit:
                        run.extend(payloads)
                        expect += n
                        continue
                    if run:
                        yield first, run_size, run
                    first, run_size, run = seq, size, list(payloads)
                    expect, limit = seq + n, seq + RUN_MAX
                    continue
                if avail < rec or (not eof and avail < block):
                    break  # more data first (or, at the end, a torn last record)
                payload = buf[pos + _HEAD : pos + rec]
                pos += rec
                if singles:
                    singles -= 1
                if seq == expect and size == run_size and seq < limit:
                    run.append(payload)
                    expect += 1
                    continue
                if run:
                    yield first, run_size, run
                first, run_size, run = seq, size, [payload]
                expect, limit = seq + 1, seq + RUN_MAX
            if eof:
                break
            more = f.read(block)
            if more:
                buf = buf[pos:] + more
                pos = 0
            else:
                eof = True
    if run:
        yield first, run_size, run
