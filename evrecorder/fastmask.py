"""Cheaper WebSocket unmasking, for small frames.

Every client frame is masked (RFC 6455 5.3).  Two users here:

* :func:`unmask` unmasks a whole payload at once, for the recorder's frame
  fast path (:meth:`evrecorder.protocol.RecorderProtocol._fast_read`), which
  takes nearly every frame.
* :class:`IntXorMasker` is a drop-in for the masker object Autobahn sets up
  per frame, for the frames Autobahn still parses (control frames, fragments,
  frames cut across reads).  Autobahn's native (cffi) masker costs about 7 us
  to create and run on a 230-byte Media frame; this one about 2 us.  It keeps
  Autobahn's interface (``pointer``, ``reset``, ``process``, chunks continuing
  where the last one stopped), so masking is still done, and done the same;
  :func:`install` swaps it in for Autobahn's ``create_xor_masker`` (a
  process-wide setting, made when a recorder's factory is created).  If a
  future Autobahn no longer has that hook, nothing is changed and its own
  masker is used.

Both XOR the payload as one big Python integer.  That is still about 1 us for
a Media frame (the int conversions cost about 14 instructions a byte each
way); a C XOR (``wsaccel``, or ``websockets.speedups.apply_mask``) would be
about 0.1 us, at the price of a dependency.
"""

from __future__ import annotations

_from_bytes = int.from_bytes
#: q -> q little-endian 32-bit words of value 1, as one integer (payloads < 4 KiB)
_ONES: dict[int, int] = {}


def unmask(mask: bytes, data: bytes) -> bytes:
    """``data`` XOR the 4-byte ``mask`` repeated, from the mask's first byte.

    The frame fast path (:meth:`evrecorder.protocol.RecorderProtocol._fast_read`)
    unmasks a whole payload with it.  The mask, as a 32-bit integer, times
    ``_ONES[q]`` is the mask repeated q times (no carries), so the key stream
    costs one multiplication instead of building and converting its bytes.
    """
    n = len(data)
    q = (n >> 2) + 1
    ones = _ONES.get(q)
    if ones is None:
        ones = _from_bytes(b"\x01\x00\x00\x00" * q, "little")
        if q <= 1024:
            _ONES[q] = ones
    return (_from_bytes(data, "little") ^ _from_bytes(mask, "little") * ones).to_bytes(
        q << 2, "little"
    )[:n]


class IntXorMasker:
    __slots__ = ("_mask", "_ptr")

    def __init__(self, mask: bytes, length: int | None = None):
        if len(mask) != 4:
            raise ValueError("a WebSocket mask is 4 bytes")
        self._mask = bytes(mask)
        self._ptr = 0

    def pointer(self) -> int:
        return self._ptr

    def reset(self) -> None:
        self._ptr = 0

    def process(self, data: bytes) -> bytes:
        n = len(data)
        if not n:
            return b""
        start = self._ptr & 3
        mask = self._mask[start:] + self._mask[:start]
        key = (mask * (n // 4 + 1))[:n]
        self._ptr += n
        return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
            n, "little"
        )


def create_xor_masker(mask: bytes, length: int | None = None) -> IntXorMasker:
    return IntXorMasker(mask, length)


def install() -> bool:
    """Use :class:`IntXorMasker` for Autobahn's frames; False if Autobahn has no hook."""
    from autobahn.websocket import protocol

    if not callable(getattr(protocol, "create_xor_masker", None)):
        return False
    protocol.create_xor_masker = create_xor_masker
    return True
