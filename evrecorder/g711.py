"""G.711 mu-law and A-law (ITU-T G.711), and L16, as the front doors receive them.

Engage Voice media frames are mu-law; RingCX gRPC segments may also be
A-law (PCMA) or L16 (big-endian 16-bit linear, RFC 3551).

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


# -- A-law (PCMA) ------------------------------------------------------------

def _alaw_decode_one(a: int) -> int:
    # ITU-T G.711 A-law, as Sun's reference g711.c (sox, audioop) decodes it:
    # even bits inverted (0x55), 3-bit segment, 4-bit step, half-step bias.
    a ^= 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


#: Linear value of each A-law byte (0xD5 is +8, 0x55 is -8: A-law has no zero).
ALAW_DECODE_TABLE: tuple[int, ...] = tuple(_alaw_decode_one(a) for a in range(256))

_ALAW_LOW = bytes(ALAW_DECODE_TABLE[a] & 0xFF for a in range(256))
_ALAW_HIGH = bytes((ALAW_DECODE_TABLE[a] >> 8) & 0xFF for a in range(256))


def alaw_to_pcm16le(alaw: bytes) -> bytes:
    """Decode A-law bytes into little-endian signed 16-bit samples."""
    out = bytearray(2 * len(alaw))
    out[0::2] = alaw.translate(_ALAW_LOW)
    out[1::2] = alaw.translate(_ALAW_HIGH)
    return bytes(out)


# -- L16 -----------------------------------------------------------------------

def l16be_to_pcm16le(data: bytes) -> bytes:
    """Big-endian 16-bit samples (RTP's L16) as little-endian ones; an odd
    last byte (half a sample) is dropped."""
    n = len(data) & ~1
    out = bytearray(n)
    out[0::2] = data[1:n:2]
    out[1::2] = data[0:n:2]
    return bytes(out)


# -- fast mu-law encoding of whole blocks ----------------------------------

#: mu-law byte of each 16-bit sample, indexed by its *unsigned* bit pattern.
_ENCODE_UNSIGNED = _ENCODE_TABLE[32768:] + _ENCODE_TABLE[:32768]


def _stdlib_audioop():
    # The old stdlib module (Python <= 3.12) encodes with the same reference
    # encoder in C, ten times faster than the table below; without it (3.13
    # on) the table does the same work.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop
        except ImportError:
            return None
    return audioop


_audioop = _stdlib_audioop()


def pcm16le_block_to_ulaw(pcm: bytes | bytearray) -> bytes:
    """:func:`pcm16le_to_ulaw` for a block, in C: ``audioop.lin2ulaw`` where
    the stdlib still has it, else ``map`` over an unsigned ``array`` and the
    table.  What finalize uses for a ``--format mulaw`` recording mixed from
    linear samples."""
    return _encode_block(pcm, _audioop)


def _encode_block(pcm: bytes | bytearray, audioop=None) -> bytes:
    import array
    import sys

    if audioop is not None:
        data = pcm[: len(pcm) - len(pcm) % 2]
        if sys.byteorder != "little":
            data = audioop.byteswap(data, 2)
        return audioop.lin2ulaw(data, 2)
    samples = array.array("H")
    samples.frombytes(pcm[: len(pcm) - len(pcm) % 2])
    if sys.byteorder != "little":
        samples.byteswap()
    return bytes(map(_ENCODE_UNSIGNED.__getitem__, samples))


def add_pcm16le(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    """Two equally long blocks of little-endian int16 samples summed, clipped to
    int16 (how overlapping segments of a channel are mixed)."""
    if _audioop is not None:
        return _audioop.add(bytes(a), bytes(b), 2)  # saturates, in C
    return _add_clipped(a, b)


def _add_clipped(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    import array
    import sys
    from operator import add

    x, y = array.array("h"), array.array("h")
    x.frombytes(a)
    y.frombytes(b)
    if sys.byteorder != "little":
        x.byteswap()
        y.byteswap()
    sums = list(map(add, x, y))
    if sums and (max(sums) > 32767 or min(sums) < -32768):
        sums = [32767 if v > 32767 else -32768 if v < -32768 else v for v in sums]
    out = array.array("h", sums)
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()
