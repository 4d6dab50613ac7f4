"""Stereo WAV writing from two mu-law channels.

Two encodings (``--format``):

``pcm16``
    WAVE_FORMAT_PCM, 16-bit little-endian linear samples, decoded from
    mu-law with the G.711 table.  Every player and the stdlib ``wave`` read it.
``mulaw``
    WAVE_FORMAT_MULAW (tag 7), the G.711 bytes as they came, half the size.
    Non-PCM formats carry ``cbSize`` in ``fmt`` and a ``fact`` chunk, as the
    RIFF specification asks; sox and players read it (the stdlib ``wave``
    does not know tag 7).

Both channels are interleaved in C (slice assignment and ``bytes.translate``),
in blocks, so a long call never sits in memory whole.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Callable

from evrecorder import g711

SAMPLE_RATE = 8000
FORMATS = ("pcm16", "mulaw")
_BLOCK = 1 << 16  # samples per channel per block


def header(fmt: str, samples: int, rate: int = SAMPLE_RATE) -> bytes:
    """The RIFF/WAVE header for ``samples`` stereo sample frames at ``rate`` Hz.

    (A gRPC recording may be 16 kHz: WAVE_FORMAT_MULAW at 16 kHz is as
    valid as at 8 kHz, the tag says nothing of the rate.)
    """
    if fmt == "pcm16":
        width = 2
        data_size = samples * 2 * width
        fmt_chunk = struct.pack(
            "<4sIHHIIHH", b"fmt ", 16, 1, 2, rate,
            rate * 2 * width, 2 * width, 16,
        )
        extra = b""
    elif fmt == "mulaw":
        width = 1
        data_size = samples * 2 * width
        fmt_chunk = struct.pack(
            "<4sIHHIIHHH", b"fmt ", 18, 7, 2, rate,
            rate * 2 * width, 2 * width, 8, 0,
        )
        extra = struct.pack("<4sII", b"fact", 4, samples)
    else:
        raise ValueError(f"unknown WAV format {fmt!r}")
    # Stereo data is always an even number of bytes: no RIFF pad byte.
    riff_size = 4 + len(fmt_chunk) + len(extra) + 8 + data_size
    if riff_size > 0xFFFFFFFF:
        raise ValueError("the recording is too long for a WAV file")
    return (
        struct.pack("<4sI4s", b"RIFF", riff_size, b"WAVE")
        + fmt_chunk
        + extra
        + struct.pack("<4sI", b"data", data_size)
    )


class Channel:
    """One channel's mu-law: ``offset`` samples of silence, a file, then silence."""

    def __init__(self, path: str | None, offset: int, length: int):
        self._file: BinaryIO | None = open(path, "rb") if path and length else None
        self._offset = offset
        self._remaining = length
        self.end = offset + length

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes of the channel from where it stands."""
        if not self._offset and self._remaining >= n and self._file is not None:
            # The common case, inside the audio: one read, no joining.
            data = self._file.read(n)
            if len(data) == n:
                self._remaining -= n
                return data
            self._remaining = 0  # shorter than announced: the rest is silence
            return data + g711.SILENCE_BYTE * (n - len(data))
        parts = []
        if self._offset:
            k = min(n, self._offset)
            parts.append(g711.SILENCE_BYTE * k)
            self._offset -= k
            n -= k
        if n and self._remaining and self._file is not None:
            data = self._file.read(min(n, self._remaining))
            self._remaining -= len(data)
            if not data:  # shorter than announced: treat the rest as silence
                self._remaining = 0
            parts.append(data)
            n -= len(data)
        if n:
            parts.append(g711.SILENCE_BYTE * n)
        return b"".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def write_stereo(
    out: BinaryIO, fmt: str, left: Channel, right: Channel,
    update: Callable[[bytes], None] | None = None,
) -> int:
    """Write a whole WAV file to ``out``; return its size in bytes.

    ``update`` sees every byte written (for a running checksum).
    """
    samples = max(left.end, right.end)
    written = 0

    def emit(data: bytes | bytearray) -> None:
        nonlocal written
        out.write(data)
        if update is not None:
            update(data)
        written += len(data)

    emit(header(fmt, samples))
    done = 0
    while done < samples:
        n = min(_BLOCK, samples - done)
        a = left.read(n)
        b = right.read(n)
        if fmt == "mulaw":
            block = bytearray(2 * n)
            block[0::2] = a
            block[1::2] = b
        else:
            block = bytearray(4 * n)
            block[0::4], block[1::4] = g711.decode_low_high(a)
            block[2::4], block[3::4] = g711.decode_low_high(b)
        # A fresh block each time, handed over as it is (no copy to bytes):
        # nothing keeps it after this.
        emit(block)
        done += n
    return written
