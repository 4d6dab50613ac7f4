"""G.711 mu-law (ITU-T G.711), as used by Engage Voice media frames.

Decoding follows the standard table (the one sox and the old stdlib
``audioop`` use: 0x00 is -32124, 0x80 is +32124, 0xFF and 0x7F are 0).

Decoding is done with ``bytes.translate`` into the low and the high byte of
each little-endian 16-bit sample, so converting a whole channel runs in C with
no per-sample Python code and needs neither ``audioop`` (gone in Python 3.13)
nor numpy.
"""

from __future__ import annotations

#: mu-law byte for linear 0: what silence is filled with (never 0x00).
SILENCE = 0xFF
SILENCE_BYTE = b"\xff"

_BIAS = 0x84


def _decode_one(u: int) -> int:
    u = ~u & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = ((((u & 0x0F) << 3) + _BIAS) << exponent) - _BIAS
    return -magnitude if u & 0x80 else magnitude


#: Linear value of each mu-law byte.
DECODE_TABLE: tuple[int, ...] = tuple(_decode_one(u) for u in range(256))

_LOW = bytes(DECODE_TABLE[u] & 0xFF for u in range(256))
_HIGH = bytes((DECODE_TABLE[u] >> 8) & 0xFF for u in range(256))


def decode_low_high(ulaw: bytes) -> tuple[bytes, bytes]:
    """The low and the high bytes of the little-endian PCM16 samples of ``ulaw``."""
    return ulaw.translate(_LOW), ulaw.translate(_HIGH)


def ulaw_to_pcm16le(ulaw: bytes) -> bytes:
    """Decode mu-law bytes into little-endian signed 16-bit samples."""
    out = bytearray(2 * len(ulaw))
    out[0::2], out[1::2] = decode_low_high(ulaw)
    return bytes(out)


_SEG_END = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)


def _encode_one(sample: int) -> int:
    # The reference encoder (Sun's g711.c, as in sox and audioop): 14-bit
    # magnitude, bias 0x21, clip 8159.
    pcm = sample >> 2
    if pcm < 0:
        pcm, mask = -pcm, 0x7F
    else:
        mask = 0xFF
    pcm = min(pcm, 8159) + (_BIAS >> 2)
    for seg, end in enumerate(_SEG_END):
        if pcm <= end:
            return ((seg << 4) | ((pcm >> (seg + 1)) & 0x0F)) ^ mask
    return 0x7F ^ mask


def encode_sample(sample: int) -> int:
    """Encode one linear 16-bit sample as a mu-law byte (G.711, with clipping)."""
    return _encode_one(max(-32768, min(32767, sample)))


_ENCODE_TABLE = bytes(_encode_one(s) for s in range(-32768, 32768))


def pcm16le_to_ulaw(pcm: bytes) -> bytes:
    """Encode little-endian signed 16-bit samples as mu-law bytes."""
    import array
    import sys

    samples = array.array("h")
    samples.frombytes(pcm[: len(pcm) - len(pcm) % 2])
    if sys.byteorder != "little":
        samples.byteswap()
    table = _ENCODE_TABLE
    return bytes(table[s + 32768] for s in samples)
