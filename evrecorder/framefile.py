"""Reading spooled frames in runs, for the finalizer.

:func:`split` cuts a call's ``call.frames`` (both perspectives, records
``>BQH`` + payload) into one file per perspective in the per-perspective
format; :func:`read_runs` reads such a file.

A per-perspective file holds records ``>QH`` (sequenceId, payload length) + payload, in
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
from itertools import compress
from typing import Iterator

from evrecorder.spool import CALL_RECORD, RECORD

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



#: Records of one size cut from ``call.frames`` by one struct call.
SPLIT_CHUNK = 256
#: Largest payload for which records are cut a chunk at a time (frames are
#: 160 bytes, at most 480 accepted): a chunk stays well under a block.
SPLIT_MAX_SIZE = 1024
_PERSPECTIVE_AND_SIZE = struct.Struct(">B8xH")
_CALL_HEAD = CALL_RECORD.size
#: ``_SELECT[i]`` turns a string of perspective indexes into selectors
#: (1 where the index is ``i``) for :func:`itertools.compress`.
_SELECT = [bytes(int(b == i) for b in range(256)) for i in range(256)]


class _SplitChunk:
    """Cutting :data:`SPLIT_CHUNK` records whose payloads are ``size`` bytes."""

    def __init__(self, size: int):
        self.rec = _CALL_HEAD + size
        self.span = SPLIT_CHUNK * self.rec
        # Each record without its perspective byte: a RECORD record.
        self.struct = struct.Struct(f"x{self.rec - 1}s" * SPLIT_CHUNK)
        # The length fields of every record, high and low bytes.
        self.high = bytes([size >> 8]) * SPLIT_CHUNK
        self.low = bytes([size & 0xFF]) * SPLIT_CHUNK


@lru_cache(maxsize=16)
def _split_chunk(size: int) -> _SplitChunk:
    return _SplitChunk(size)


def split(path: str, outputs: list) -> int:
    """Cut ``call.frames`` at ``path`` into per-perspective files: a frame of
    perspective ``i`` goes to ``outputs[i]`` (a file open for writing, or None
    to drop it) as a :data:`~evrecorder.spool.RECORD` record and its payload,
    which is the ``call.frames`` record without its first byte.

    One pass, in blocks, each file written a chunk at a time: memory stays
    bounded however long the call.  Arrival order is kept within each perspective,
    and a truncated last record is dropped, as is a record naming no known
    perspective (only a damaged file has one).  Returns the number of records
    read; a missing file has none.

    Where :data:`SPLIT_CHUNK` records in a row have payloads of one size
    (nearly all of a call), they are checked and cut with a few C calls: the
    length fields, read with one strided slice each for the high and low
    bytes, must all be that size (then every record starts where the chunk
    assumes, one after the other); the perspective bytes, one more strided
    slice, select each perspective's records (:func:`itertools.compress`).
    Elsewhere records are cut one at a time, for a chunk's worth of records
    before a chunk is tried again.
    """
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        return 0
    n_out = len(outputs)
    # Where each perspective's records go (nowhere for an unknown index).
    sinks = [out.write if out is not None else _drop for out in outputs]
    sinks += [_drop] * (256 - n_out)
    select = _SELECT[:n_out]
    head = _PERSPECTIVE_AND_SIZE.unpack_from
    records = 0
    singles = 0  # records to cut one at a time before a chunk is tried again
    with f:
        buf = b""
        pos = 0
        eof = False
        while True:
            end = len(buf)
            while True:
                avail = end - pos
                if avail < _CALL_HEAD:
                    break
                index, size = head(buf, pos)
                rec = _CALL_HEAD + size
                if not singles and size <= SPLIT_MAX_SIZE:
                    chunk = _split_chunk(size)
                    stop = pos + chunk.span
                    if stop <= end:
                        if (
                            buf[pos + 9 : stop : rec] == chunk.high
                            and buf[pos + 10 : stop : rec] == chunk.low
                        ):
                            cut = chunk.struct.unpack_from(buf, pos)
                            indexes = buf[pos:stop:rec]
                            if indexes.count(indexes[0]) == SPLIT_CHUNK:  # one perspective
                                sinks[index](b"".join(cut))
                            else:
                                for i in range(n_out):
                                    sinks[i](b"".join(compress(cut, indexes.translate(select[i]))))
                            pos = stop
                            records += SPLIT_CHUNK
                            continue
                        singles = SPLIT_CHUNK
                    elif not eof:
                        break  # more data first, then a chunk
                if avail < rec:
                    break  # more data first (or, at the end, a torn last record)
                sinks[index](buf[pos + 1 : pos + rec])
                pos += rec
                records += 1
                if singles:
                    singles -= 1
            if eof:
                break
            more = f.read(BLOCK)
            if more:
                buf = buf[pos:] + more
                pos = 0
            else:
                eof = True
    return records


def _drop(data: bytes) -> None:
    pass
