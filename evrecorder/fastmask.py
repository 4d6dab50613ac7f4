"""A cheaper WebSocket (un)masker for Autobahn, for small frames.

Every client frame is masked (RFC 6455 5.3), and Autobahn sets up a masker
object per frame.  Its native (cffi) masker costs about 7 us to create and run
on a 230-byte Media frame, which was the largest single item of Autobahn's
per-message cost in our profile (benchmarks/README.md).  This masker XORs the
whole payload as one big integer, in C, and costs about 2 us.

It keeps Autobahn's masker interface (``pointer``, ``reset``, ``process``,
chunks continuing where the last one stopped), so masking is still done, and
done the same; :func:`install` swaps it in for Autobahn's
``create_xor_masker`` (a process-wide setting, made when a recorder's factory
is created).  If a future Autobahn no longer has that hook, nothing is
changed and its own masker is used.
"""

from __future__ import annotations


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
