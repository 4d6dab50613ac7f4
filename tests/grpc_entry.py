"""Build a gRPC spool entry by hand, in the contract's format, and read what finalize made.

The entry is written as the live side writes it (GRPC-CONTRACT.md): ``call.json``
with ``"source": "grpc"``, ``events.jsonl`` lines, ``call.chunks`` records made
with :func:`evrecorder.chunkfile.pack_chunk`.  The WAV is read back with the
stdlib ``wave`` (PCM16) or sox (mu-law); the expected channels are decoded with
the old stdlib ``audioop`` or sox, never with evrecorder's own tables.
"""

from __future__ import annotations

import array
import json
import os
import struct
import subprocess
import wave

from evrecorder.chunkfile import CHUNKS_FILE, pack_chunk
from evrecorder.finalize import finalize
from evrecorder.settings import Settings
from evrecorder.spool import Spool

T0 = 1_700_000_000.0
METADATA = {
    "account": {"id": "acc-1", "sub_account_id": "sub-2", "rc_account_id": "rc-3"},
    "dialog": {"id": "dlg-1", "type": "INBOUND", "ani": "+15550001", "dnis": "+15550002",
               "attributes": {"k": "v"}},
}
FORMATS = {
    "PCMU": {"codec": "PCMU", "rate": 8000, "ptime": 100},
    "PCMA": {"codec": "PCMA", "rate": 8000, "ptime": 100},
}


class Entry:
    """One gRPC dialog's spool entry, written as the live side would."""

    def __init__(self, tmp_path, dialog_id="dlg-1", session_id="sess-1", metadata=None,
                 connected_at=T0):
        spool = Spool(str(tmp_path / "spool"))
        spool.prepare()
        self.spool = spool
        self.entry = spool.new_call(dialog_id, session_id, connected_at)
        self.entry.create({
            "source": "grpc", "callId": dialog_id, "sessionId": session_id,
            "accountId": "acc-1", "metadata": metadata if metadata is not None else METADATA,
            "query": {}, "connectedAt": connected_at, "createdAt": connected_at,
        })
        self.chunks: list[tuple[float, int, bytes]] = []  # (at, order, record)
        self._segments = 0
        self._streams = 0
        self.stream("sess-1" if session_id is None else session_id, connected_at)

    def event(self, **fields) -> None:
        self.entry.append_event(fields)

    def stream(self, session_id: str, at: float) -> int:
        n = self._streams
        self._streams += 1
        self.event(event="stream", stream=n, sessionId=session_id, at=at)
        return n

    def segment(self, segment_id: str, ptype: str = "CONTACT", pid: str = "p",
                audio_format: dict | None = FORMATS["PCMU"], at: float = T0, stream: int = 0,
                product: dict | None = None, name: str | None = None) -> int:
        i = self._segments
        self._segments += 1
        self.event(event="segment", segment=i, stream=stream, segmentId=segment_id,
                   participant={"id": pid, "type": ptype, "name": name}, product=product,
                   audioFormat=audio_format, channel="agent" if ptype == "AGENT" else "caller",
                   at=at)
        return i

    def chunk(self, segment: int, seq: int, at: float, payload: bytes, duration: int = 100):
        self.chunks.append((at, len(self.chunks), pack_chunk(segment, seq, at, duration, payload)))

    def info(self, segment: int, name: str, data, at: float) -> None:
        self.event(event="segmentInfo", segment=segment, name=name, data=data, at=at)

    def stop(self, segment: int, at: float) -> None:
        self.event(event="segmentStop", segment=segment, at=at)

    def stream_end(self, stream: int, at: float, reason: str = "stop") -> None:
        self.event(event="streamEnd", stream=stream, at=at, reason=reason, detail=None)

    def end(self, at: float, reason: str = "stop", complete: bool = True) -> None:
        self.event(event="end", reason=reason, complete=complete, at=at)

    def write_chunks(self) -> None:
        """``call.chunks`` in arrival order (by ``at``, ties in the order given)."""
        with open(os.path.join(self.entry.path, CHUNKS_FILE), "ab") as f:
            for _, _, record in sorted(self.chunks, key=lambda c: (c[0], c[1])):
                f.write(record)
        self.chunks = []

    def finalize(self, **settings) -> dict:
        self.write_chunks()
        self.entry.close()
        settings.setdefault("spool", self.spool.root)
        return finalize(self.entry, Settings(**settings))

    @property
    def wav_path(self) -> str:
        return os.path.join(self.entry.path, "recording.wav")


# -- audio -----------------------------------------------------------------

def tone(n: int, seed: int, codec: str = "PCMU") -> bytes:
    """``n`` samples of a deterministic pattern in ``codec`` (L16: big-endian)."""
    if codec == "L16":
        return b"".join(struct.pack(">h", ((i * 37 + seed * 1013) % 40000) - 20000)
                        for i in range(n))
    return bytes(((i * 7 + seed * 31) % 251) + 2 for i in range(n))


def _audioop():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop  # Python <= 3.12
        except ImportError:
            return None
    return audioop


def _sox_decode(data: bytes, kind: str) -> bytes:
    return subprocess.run(
        ["sox", "-t", kind, "-r", "8000", "-c", "1", "-", "-t", "s16", "-e", "signed", "-L", "-"],
        input=data, capture_output=True, check=True,
    ).stdout


def decode(payload: bytes, codec: str) -> list[int]:
    """Linear samples of ``payload``, not with evrecorder's code."""
    ao = _audioop()
    if codec == "PCMU":
        pcm = ao.ulaw2lin(payload, 2) if ao else _sox_decode(payload, "ul")
    elif codec == "PCMA":
        pcm = ao.alaw2lin(payload, 2) if ao else _sox_decode(payload, "al")
    elif codec == "L16":
        return [v for (v,) in struct.iter_unpack(">h", payload)]
    else:
        raise ValueError(codec)
    samples = array.array("h")
    samples.frombytes(pcm)
    return list(samples)


def encode_ulaw(samples: list[int]) -> bytes:
    """Linear samples to mu-law with the reference encoder (Sun's g711.c, as audioop),
    transcribed here, not evrecorder's code.  (sox's encoder rounds differently at
    segment edges.)"""
    ends = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
    out = bytearray()
    for s in samples:
        pcm, mask = (s >> 2, 0xFF) if s >= 0 else (-(s >> 2), 0x7F)
        pcm = min(pcm, 8159) + 33
        seg = next((i for i, e in enumerate(ends) if pcm <= e), 8)
        out.append(0x7F ^ mask if seg == 8 else ((seg << 4) | ((pcm >> (seg + 1)) & 0xF)) ^ mask)
    return bytes(out)


def sox_decode(payload: bytes, codec: str) -> list[int]:
    """G.711 bytes decoded by sox (the second independent decoder)."""
    samples = array.array("h")
    samples.frombytes(_sox_decode(payload, {"PCMU": "ul", "PCMA": "al"}[codec]))
    return list(samples)


class Timeline:
    """The expected samples of one channel: placed and summed (clipped) as finalize should."""

    def __init__(self):
        self.samples: list[int] = []

    def place(self, offset: int, samples: list[int]) -> None:
        end = offset + len(samples)
        if len(self.samples) < end:
            self.samples.extend([0] * (end - len(self.samples)))
        for i, v in enumerate(samples):
            self.samples[offset + i] = max(-32768, min(32767, self.samples[offset + i] + v))

    def padded(self, n: int) -> list[int]:
        return self.samples + [0] * (n - len(self.samples))


def read_wav(path: str) -> tuple[int, list[int], list[int]]:
    """Rate, left and right samples of a PCM16 stereo WAV, read with the stdlib."""
    with wave.open(path, "rb") as w:
        assert w.getnchannels() == 2 and w.getsampwidth() == 2
        rate = w.getframerate()
        data = w.readframes(w.getnframes())
    samples = array.array("h")
    samples.frombytes(data)
    return rate, list(samples[0::2]), list(samples[1::2])


def read_mulaw_wav(path: str) -> tuple[str, list[int], list[int]]:
    """soxi's description, and left and right samples as sox decodes a tag-7 WAV."""
    info = subprocess.run(["soxi", path], capture_output=True, text=True, check=True).stdout
    pcm = subprocess.run(["sox", path, "-t", "s16", "-e", "signed", "-L", "-"],
                         capture_output=True, check=True).stdout
    samples = array.array("h")
    samples.frombytes(pcm)
    return info, list(samples[0::2]), list(samples[1::2])


def sidecar_on_disk(entry: Entry) -> dict:
    with open(os.path.join(entry.entry.path, "sidecar.json"), encoding="utf-8") as f:
        return json.load(f)
