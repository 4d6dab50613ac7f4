"""``evrecorder-replay FILE grpc://HOST:PORT``: stream a file as RingCX would, over gRPC.

The gRPC half of :mod:`evrecorder.replay` (which reads the files and the
options): each call is one ``Streaming.Stream`` RPC carrying DialogInit, one
SegmentStart per channel (the file's left channel is the AGENT segment, the
right the CONTACT one), SegmentMedia chunks of ``--ptime`` ms per segment
(interleaved, ``seq`` from 1), a SegmentStop per segment, then the client's
half-close; the server's answer (Empty, or a status) is the call's outcome.

The RPCs run on grpcio's asyncio client in a thread of their own (the
command's reactor only waits for them): ``--connections`` HTTP/2 connections,
the calls spread over them in turn.
"""

from __future__ import annotations

import array
import asyncio
import sys
import time
import uuid
import wave
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import grpc

from evrecorder import g711
from evrecorder.grpcapi import streaming_pb2 as pb

CODECS = ("pcmu", "pcma", "l16")
_CODEC_ENUM = {"pcmu": pb.PCMU, "pcma": pb.PCMA, "l16": pb.L16}
_METHOD = "/ringcentral.ringcx.streaming.v1beta2.Streaming/Stream"


# -- audio -------------------------------------------------------------------


def _alaw_encode_one(sample: int) -> int:
    # ITU-T G.711 A-law, as Sun's reference g711.c (and sox) encodes it.
    value = sample >> 3
    if value >= 0:
        mask = 0xD5
    else:
        mask = 0x55
        value = -value - 1
    for seg, end in enumerate((0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)):
        if value <= end:
            break
    else:
        return 0x7F ^ mask
    code = seg << 4
    code |= (value >> 1) & 0x0F if seg < 2 else (value >> seg) & 0x0F
    return code ^ mask


_ALAW_ENCODE = bytes(_alaw_encode_one(s) for s in range(-32768, 32768))


def pcm16le_to_alaw(pcm: bytes) -> bytes:
    samples = array.array("h")
    samples.frombytes(pcm[: len(pcm) & ~1])
    if sys.byteorder == "big":
        samples.byteswap()
    table = _ALAW_ENCODE
    return bytes(table[s + 32768] for s in samples)


def pcm16le_to_l16be(pcm: bytes) -> bytes:
    return g711.l16be_to_pcm16le(pcm)  # the same byte swap


def load_channels(path: str, codec: str, raw: bool, mono: str, load_audio, AudioError,
                  agent: str, caller: str) -> tuple[dict[str, bytes], int]:
    """The file as payload bytes per channel ("agent", "caller") in ``codec``, and the rate.

    A 16-bit PCM WAV is encoded from its samples (L16 keeps the file's rate,
    8000 or 16000 Hz, as big-endian samples; PCMU and PCMA need 8000 Hz).
    Anything else goes through :func:`evrecorder.replay.load_audio` (mu-law,
    8000 Hz): PCMU from a mu-law file is sent as it is.
    """
    pcm_wav = _read_pcm_wav(path, raw)
    if pcm_wav is not None:
        rate, chans = pcm_wav
        allowed = (8000, 16000) if codec == "l16" else (8000,)
        if rate not in allowed:
            raise AudioError(
                f"{path}: sample rate is {rate} Hz; {codec.upper()} is sent at "
                f"{' or '.join(map(str, allowed))} Hz and replay does not resample")
        if len(chans) == 2:
            by_perspective = {agent: chans[0], caller: chans[1]}
        elif mono == "both":
            by_perspective = {agent: chans[0], caller: chans[0]}
        else:
            by_perspective = {mono: chans[0]}
    else:
        rate = 8000
        ulaw = load_audio(path, raw=raw, mono_perspective=mono)
        if codec == "pcmu":
            return {ch: ulaw.get(p, b"") for ch, p in (("agent", agent), ("caller", caller))}, rate
        by_perspective = {p: g711.ulaw_to_pcm16le(b) for p, b in ulaw.items()}
    encode = {"pcma": pcm16le_to_alaw, "l16": pcm16le_to_l16be, "pcmu": g711.pcm16le_to_ulaw}[codec]
    return {ch: encode(by_perspective.get(p, b"")) for ch, p in (("agent", agent), ("caller", caller))}, rate


def _read_pcm_wav(path: str, raw: bool) -> tuple[int, list[bytes]] | None:
    """(rate, little-endian samples per channel) of a plain 16-bit PCM WAV, else None."""
    if raw:
        return None
    try:
        with wave.open(path, "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() not in (1, 2):
                return None
            rate, channels = w.getframerate(), w.getnchannels()
            pcm = w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError):
        return None  # mu-law, extensible, raw ...: load_audio reads it or says why not
    pcm = pcm[: len(pcm) - len(pcm) % (2 * channels)]
    if channels == 1:
        return rate, [pcm]
    samples = array.array("h")
    samples.frombytes(pcm)
    return rate, [samples[0::2].tobytes(), samples[1::2].tobytes()]


def chunk_bytes(codec: str, rate: int, ptime: int) -> int:
    samples = rate * ptime // 1000
    return samples * (2 if codec == "l16" else 1)


# -- options and results ---------------------------------------------------------


@dataclass
class GrpcOptions:
    target: str  # host:port
    tls: bool
    ca: bytes | None = None
    token: str | None = None
    codec: str = "pcmu"
    ptime: int = 100
    calls: int = 1
    connections: int = 1
    realtime: bool = True
    stagger: float = 0.0
    dialog_id: str | None = None
    session_id: str | None = None
    account_id: str = "99990000"
    subaccount_id: str = "99990001"
    rc_account_id: str = "123456789"
    agent_id: str = "123"
    ani: str = "2223334444"
    dnis: str = "2223335555"
    timeout: float = 3600.0

    def __repr__(self) -> str:  # never show the token
        return f"GrpcOptions(target={self.target!r}, calls={self.calls}, codec={self.codec!r}, ...)"


@dataclass
class DialogResult:
    dialog_id: str
    session_id: str
    chunks: dict[str, int] = field(default_factory=dict)  # by segment type
    media_bytes: int = 0
    code: str = ""  # the final status's name
    details: str = ""
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code == "OK"


def parse_target(url: str) -> tuple[str, bool]:
    """``grpc://HOST:PORT`` or ``grpcs://HOST:PORT`` -> (host:port, tls)."""
    parts = urlsplit(url)
    if parts.scheme not in ("grpc", "grpcs") or not parts.hostname or not parts.port:
        raise ValueError(f"{url!r} is not a grpc://HOST:PORT or grpcs://HOST:PORT address")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port}", parts.scheme == "grpcs"


def dialog_ids(options: GrpcOptions) -> list[str]:
    base = options.dialog_id or f"replay-{uuid.uuid4().hex[:12]}"
    if options.calls == 1:
        return [base]
    return [f"{base}-{n}" for n in range(1, options.calls + 1)]


# -- the RPCs ------------------------------------------------------------------------


def _events(dialog_id: str, session_id: str, channels: dict[str, bytes], rate: int,
            options: GrpcOptions, result: DialogResult):
    """(delay from the start in seconds, event) in the order RingCX sends them."""
    fmt = pb.AudioFormat(codec=_CODEC_ENUM[options.codec], rate=rate, ptime=options.ptime)
    init = pb.DialogInitEvent(
        account=pb.Account(id=options.account_id, sub_account_id=options.subaccount_id,
                           rc_account_id=options.rc_account_id),
        dialog=pb.Dialog(id=dialog_id, type=pb.INBOUND, ani=options.ani, dnis=options.dnis),
    )
    yield 0.0, pb.StreamEvent(session_id=session_id, dialog_init=init)
    segments = []  # (segment id, type name, payload)
    for name, ptype, channel, pid in (("contact", pb.CONTACT, "caller", options.ani),
                                      ("agent", pb.AGENT, "agent", options.agent_id)):
        payload = channels.get(channel, b"")
        if not payload:
            continue
        seg_id = f"{dialog_id}-{name}"
        segments.append((seg_id, pb.ParticipantType.Name(ptype), payload))
        yield 0.0, pb.StreamEvent(session_id=session_id, segment_start=pb.SegmentStartEvent(
            segment_id=seg_id, participant=pb.Participant(id=pid, type=ptype),
            product=pb.Product(id="1234", type=pb.QUEUE), audio_format=fmt))
    size = chunk_bytes(options.codec, rate, options.ptime)
    longest = max((len(p) for _, _, p in segments), default=0)
    for n, offset in enumerate(range(0, longest, size)):
        for seg_id, kind, payload in segments:
            piece = payload[offset: offset + size]
            if piece:
                result.chunks[kind] = result.chunks.get(kind, 0) + 1
                result.media_bytes += len(piece)
                yield n * options.ptime / 1000.0, pb.StreamEvent(
                    session_id=session_id, segment_media=pb.SegmentMediaEvent(
                        segment_id=seg_id, audio_content=pb.AudioContent(
                            payload=piece, seq=n + 1, duration=options.ptime)))
    end = (longest + size - 1) // size * options.ptime / 1000.0
    for seg_id, _, _ in reversed(segments):
        yield end, pb.StreamEvent(session_id=session_id,
                                  segment_stop=pb.SegmentStopEvent(segment_id=seg_id))


#: What grpcio's asyncio client says in place of the server's status when a
#: write fails because the server already ended the stream.
_MASKED = "Internal error from Core"


async def _one(channel, dialog_id: str, channels, rate, options: GrpcOptions) -> DialogResult:
    session_id = options.session_id or uuid.uuid4().hex[:16]
    result = DialogResult(dialog_id, session_id)
    started = time.monotonic()

    async def requests():
        for delay, event in _events(dialog_id, session_id, channels, rate, options, result):
            if options.realtime:
                wait = started + delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            yield event

    metadata = (("authorization", f"Bearer {options.token}"),) if options.token else None
    call = channel.stream_unary(_METHOD, request_serializer=pb.StreamEvent.SerializeToString,
                                response_deserializer=lambda b: b)
    try:
        await call(requests(), metadata=metadata, timeout=options.timeout)
        result.code = "OK"
    except grpc.aio.AioRpcError as e:
        result.code = e.code().name
        result.details = e.details() or ""
        if e.code() == grpc.StatusCode.INTERNAL and result.details == _MASKED:
            # grpcio's asyncio client (grpc/grpc#36066) reports this, not the
            # server's status, when the server ended the stream while events
            # were still being written to it: a refusal, most often.
            result.details += (" (the recorder ended the stream while events were being sent; "
                               "its log says why, e.g. a wrong --token)")
    result.elapsed = time.monotonic() - started
    return result


async def run_dialogs(channels: dict[str, bytes], rate: int, options: GrpcOptions,
                      on_result=None) -> list[DialogResult]:
    """Every call of ``options``; ``on_result`` is called as each ends."""
    if options.tls:
        creds = grpc.ssl_channel_credentials(root_certificates=options.ca)
    conns = []
    for n in range(options.connections):
        # A local subchannel pool: each channel is an HTTP/2 connection of its own.
        opts = [("grpc.use_local_subchannel_pool", 1), ("evrecorder.connection", n)]
        if options.tls:
            conns.append(grpc.aio.secure_channel(options.target, creds, options=opts))
        else:
            conns.append(grpc.aio.insecure_channel(options.target, options=opts))
    try:
        async def start(n, dialog_id):
            if options.stagger:
                await asyncio.sleep(n * options.stagger)
            r = await _one(conns[n % len(conns)], dialog_id, channels, rate, options)
            if on_result is not None:
                on_result(r)
            return r

        return list(await asyncio.gather(
            *(start(n, d) for n, d in enumerate(dialog_ids(options)))))
    finally:
        for c in conns:
            await c.close()


def format_result(r: DialogResult, codec: str, rate: int, ptime: int) -> str:
    chunks = ", ".join(f"{kind} {n}" for kind, n in r.chunks.items()) or "no"
    how = r.code + (f' "{r.details}"' if r.details else "")
    return (f"dialog {r.dialog_id} session {r.session_id}: {chunks} chunks, {r.media_bytes} bytes "
            f"({codec.upper()} {rate} Hz, {ptime} ms); ended {how}; {r.elapsed:.2f} s")


def format_summary(results: list[DialogResult], elapsed: float) -> str:
    ok = sum(1 for r in results if r.ok)
    chunks = sum(sum(r.chunks.values()) for r in results)
    nbytes = sum(r.media_bytes for r in results)
    return (f"{len(results)} dialog(s): {ok} ended OK, {len(results) - ok} failed; "
            f"{chunks} chunks, {nbytes} bytes in {elapsed:.2f} s")


def run_in_thread(channels, rate, options, out, quiet: bool) -> list[DialogResult]:
    """Blocking: the RPCs on an asyncio loop of this thread; prints as each ends."""

    def report(r: DialogResult) -> None:
        if not quiet or not r.ok:
            print(format_result(r, options.codec, rate, options.ptime), file=out, flush=True)

    return asyncio.run(run_dialogs(channels, rate, options, report))

