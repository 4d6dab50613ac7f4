"""The WebSocket frame fast path (RecorderProtocol._fast_read) is exact and keeps
Autobahn's checks.

Most tests are differential: the same client bytes, cut into reads in many ways,
go through a protocol with the fast path and through one that uses only
Autobahn's framing (``_fast = False``).  Both must hand the recorder the same
messages, write the same bytes back (pongs, close frames), close with the same
code and count the same traffic.  Then a real socket carries a whole call in
odd-sized writes, with pings and a fragmented message among the media frames,
and the recording must be sample-exact.
"""

from __future__ import annotations

import base64
import json
import random
import struct

import orjson
import pytest
import pytest_twisted
import txaio
from twisted.internet import address, defer, protocol, task
from twisted.internet.testing import StringTransport

from conftest import independent_decode, read_pcm16_wav
from test_service import AGENT, CALLER, frames, reactor, sleep

from evrecorder.call import CallRegistry
from evrecorder.protocol import RecorderFactory, RecorderProtocol
from evrecorder.settings import Settings
from evrecorder.spool import Spool

HANDSHAKE = (
    b"GET /?callId=frames HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
_rng = random.Random(6455)


# -- client frames -------------------------------------------------------------

def frame(payload: bytes, opcode: int = 1, fin: bool = True, rsv: int = 0, masked: bool = True,
          length_form: int | None = None) -> bytes:
    """A client frame; ``length_form`` 126/127 forces a (non-minimal) longer length."""
    n = len(payload)
    form = length_form or (n if n < 126 else 126 if n < 65536 else 127)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode, (0x80 if masked else 0) | form])
    if form == 126:
        head += struct.pack("!H", n)
    elif form == 127:
        head += struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = _rng.randbytes(4)
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def text(msg) -> bytes:
    return msg if isinstance(msg, bytes) else json.dumps(msg, separators=(",", ":")).encode()


def media_msg(perspective: str, seq: int, audio: bytes) -> dict:
    return {"event": "Media", "perspective": perspective, "sequenceId": str(seq),
            "media": base64.b64encode(audio).decode()}


CONNECTED = {"event": "Connected", "protocol": "AgentSession", "version": "1.0.0"}
START = {"event": "Start", "metadata": {"callId": "frames", "sessionId": 1,
                                        "contentType": "audio/x-mulaw", "sampleRateHertz": 8000}}


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of each whole frame the server wrote (unmasked)."""
    out, pos = [], 0
    while pos + 2 <= len(data):
        opcode, n = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            n, pos = struct.unpack_from("!H", data, pos)[0], pos + 2
        elif n == 127:
            n, pos = struct.unpack_from("!Q", data, pos)[0], pos + 8
        out.append((opcode, data[pos:pos + n]))
        pos += n
    return out


def close_code(data: bytes) -> int | None:
    closes = [p for op, p in server_frames(data) if op == 8]
    return struct.unpack("!H", closes[0][:2])[0] if closes else None


# -- a protocol over an in-memory transport ---------------------------------------

class Transport(StringTransport):
    """As a TCP transport: unregistering when no producer is registered is fine."""

    def unregisterProducer(self):
        self.producer = None


class Recording(RecorderProtocol):
    """Keeps every text message handed to the recorder's message handling."""

    def __init__(self):
        super().__init__()
        self.delivered: list[bytes] = []

    def _on_text(self, payload):
        self.delivered.append(bytes(payload))
        return super()._on_text(payload)


@pytest.fixture
def clock():
    """A Clock for the call timers and for Autobahn's own (txaio's loop)."""
    clock, saved = task.Clock(), txaio.config.loop
    txaio.config.loop = clock
    yield clock
    txaio.config.loop = saved


@pytest.fixture
def open_socket(tmp_path, clock):
    """open_socket(fast=True, **settings): (protocol, transport) just after the handshake."""
    factories: dict = {}

    def make(fast: bool = True, **settings):
        key = tuple(sorted(settings.items()))
        if key not in factories:
            s = Settings(spool=str(tmp_path / f"spool{len(factories)}"),
                         archive=str(tmp_path / "archive"), **settings)
            spool = Spool(s.spool)
            spool.prepare()
            registry = CallRegistry(spool, s, clock, lambda call: None)
            factories[key] = RecorderFactory(registry, s, clock)
            factories[key].protocol = Recording
        proto = factories[key].buildProtocol(address.IPv4Address("TCP", "127.0.0.1", 40000))
        transport = Transport()
        proto.makeConnection(transport)
        proto.dataReceived(HANDSHAKE)
        assert proto.state == proto.STATE_OPEN and proto._fast
        proto._fast = fast
        transport.clear()
        return proto, transport

    return make


STATS = ("incomingOctetsWireLevel", "incomingOctetsWebSocketLevel", "incomingOctetsAppLevel",
         "incomingWebSocketFrames", "incomingWebSocketMessages")


def outcome(proto: Recording, transport: StringTransport) -> dict:
    return {
        "delivered": proto.delivered,
        "written": transport.value(),
        "state": proto.state,
        "dropping": transport.disconnecting,
        "stats": [getattr(proto.trafficStats, name) for name in STATS],
    }


def feed(open_socket, reads: list[bytes], fast: bool = True, **settings) -> dict:
    proto, transport = open_socket(fast, **settings)
    for chunk in reads:
        proto.dataReceived(chunk)
    return outcome(proto, transport)


def cuts(stream: bytes, points) -> list[bytes]:
    points = sorted(set(points))
    return [stream[a:b] for a, b in zip([0] + points, points + [len(stream)])]


def assert_same_as_autobahn(open_socket, reads: list[bytes], **settings) -> dict:
    """The fast path, given these reads, does exactly what Autobahn alone does."""
    want = feed(open_socket, reads, fast=False, **settings)
    got = feed(open_socket, reads, **settings)
    assert got == want
    return got


# -- exactness ---------------------------------------------------------------------

AUDIO = frames(12, 5)
MEDIA = [text(media_msg(AGENT if i % 2 == 0 else CALLER, i // 2 + 1, AUDIO[i])) for i in range(12)]


def mixed_stream() -> tuple[bytes, list[bytes]]:
    """Media frames with a ping, an unsolicited pong, a fragmented message, a short
    (7-bit length) message and an empty ping among them; and the messages expected."""
    fragmented = MEDIA[8]
    stream = b"".join([
        frame(text(CONNECTED)), frame(text(START)),
        frame(MEDIA[0]), frame(MEDIA[1]),
        frame(b"ping-1", opcode=9),
        frame(MEDIA[2]), frame(MEDIA[3]),
        frame(b"", opcode=10),
        frame(MEDIA[4]),
        frame(b'{"event":"Connected"}'),
        frame(MEDIA[5]), frame(MEDIA[6]), frame(MEDIA[7]),
        frame(fragmented[:100], fin=False), frame(b"", opcode=9),
        frame(fragmented[100:200], opcode=0, fin=False), frame(fragmented[200:], opcode=0),
        frame(MEDIA[9]), frame(MEDIA[10]), frame(MEDIA[11]),
    ])
    messages = [text(CONNECTED), text(START), *MEDIA[:5], b'{"event":"Connected"}', *MEDIA[5:]]
    return stream, messages


def test_frames_split_at_every_byte_boundary_arrive_exactly_as_with_autobahn(open_socket):
    """Two reads cut at every byte of a stream of media, pings and a fragment: same
    messages, pongs and traffic counts as Autobahn's own framing."""
    stream, messages = mixed_stream()
    want = feed(open_socket, [stream], fast=False)
    assert want["delivered"] == messages
    assert [op for op, _ in server_frames(want["written"])] == [10, 10]  # the two pongs
    for i in range(1, len(stream)):
        assert feed(open_socket, [stream[:i], stream[i:]]) == want, f"cut at {i}"


def test_one_byte_reads_and_random_reads_are_exact(open_socket):
    """A read per byte, and many random cuttings into 1 to 600 byte reads."""
    stream, messages = mixed_stream()
    want = feed(open_socket, [stream], fast=False)
    assert feed(open_socket, [stream[i:i + 1] for i in range(len(stream))]) == want
    rng = random.Random(1)
    for _ in range(200):
        points = [rng.randrange(1, len(stream)) for _ in range(rng.randrange(1, 40))]
        assert feed(open_socket, cuts(stream, points)) == want


def test_whole_frames_take_the_fast_path_and_autobahn_only_finishes_cut_ones(open_socket):
    """Reads of whole media frames never reach Autobahn's framing; in reads cut
    anywhere, Autobahn only takes the one frame each cut falls in."""
    stream_frames = [frame(m) for m in [text(CONNECTED), text(START)] + MEDIA]
    proto, transport = open_socket()
    calls = []
    proto.processData = lambda: calls.append(1) or False
    for i in range(0, len(stream_frames), 3):
        proto.dataReceived(b"".join(stream_frames[i:i + 3]))
    assert calls == [] and proto.data == b""
    assert proto.delivered == [text(CONNECTED), text(START)] + MEDIA
    assert proto._call is not None and proto._call.frames_received == 12
    assert transport.value() == b""

    proto, transport = open_socket()
    by_autobahn = []
    proto.onMessage = lambda payload, binary: by_autobahn.append(payload)
    stream = b"".join(stream_frames)
    reads = [stream[i:i + 1000] for i in range(0, len(stream), 1000)]
    for chunk in reads:
        proto.dataReceived(chunk)
    assert len(by_autobahn) <= len(reads) - 1
    assert sorted(proto.delivered + by_autobahn) == sorted([text(CONNECTED), text(START)] + MEDIA)


def test_close_between_media_frames_stops_taking_messages(open_socket):
    """A client close in the middle of a read: the server answers it, and the media
    frames after it are not taken, as with Autobahn, wherever the reads are cut."""
    stream = b"".join([frame(text(CONNECTED)), frame(text(START)), frame(MEDIA[0]),
                       frame(struct.pack("!H", 1000) + b"bye", opcode=8),
                       frame(MEDIA[1]), frame(MEDIA[2])])
    got = assert_same_as_autobahn(open_socket, [stream])
    assert got["delivered"] == [text(CONNECTED), text(START), MEDIA[0]]
    assert close_code(got["written"]) == 1000
    for i in range(1, len(stream)):
        assert_same_as_autobahn(open_socket, [stream[:i], stream[i:]])


def test_a_message_that_closes_the_socket_hands_the_rest_to_autobahn(open_socket):
    """After Media before Start (1008) the frames behind it in the same read are
    not taken; the output equals Autobahn's."""
    stream = b"".join([frame(text(CONNECTED)), frame(MEDIA[0]), frame(MEDIA[1]),
                       frame(b"ping", opcode=9)])
    got = assert_same_as_autobahn(open_socket, [stream])
    assert got["delivered"] == [text(CONNECTED), MEDIA[0]]
    assert close_code(got["written"]) == 1008


def test_auto_ping_timeout_is_cancelled_by_a_fast_path_frame(open_socket, clock):
    """Like Autobahn's onFrameEnd, any data frame cancels a pending auto-ping's timeout
    (and schedules the next ping)."""
    states = []
    for fast in (True, False):
        proto, transport = open_socket(fast)
        clock.advance(proto.autoPingInterval + 1)
        assert proto.autoPingTimeoutCall is not None  # a ping went out; its pong is due
        proto.dataReceived(frame(text(CONNECTED)))
        assert proto.autoPingTimeoutCall is None and proto.autoPingPending is None
        assert proto.autoPingPendingCall is not None
        states.append((transport.value()[:2], proto.delivered))
    assert states[0] == states[1]


# -- protocol errors: still Autobahn's checks and close codes ------------------------

BEFORE = frame(text(CONNECTED))
AFTER = frame(MEDIA[0])

ERRORS = {
    "unmasked": (frame(text(CONNECTED), masked=False), 1002),
    "rsv1": (frame(text(CONNECTED), rsv=4), 1002),
    "rsv2": (frame(text(CONNECTED), rsv=2), 1002),
    "rsv3": (frame(text(CONNECTED), rsv=1), 1002),
    "reserved-data-opcode": (frame(text(CONNECTED), opcode=3), 1002),
    "reserved-control-opcode": (frame(b"", opcode=11), 1002),
    "continuation-outside-message": (frame(text(CONNECTED), opcode=0), 1002),
    "fragmented-ping": (frame(b"x", opcode=9, fin=False), 1002),
    "long-ping": (frame(b"x" * 126, opcode=9), 1002),
    "close-with-1-byte": (frame(b"x", opcode=8), 1002),
    "non-minimal-16-bit-length": (frame(text(CONNECTED), length_form=126), 1002),
    "non-minimal-64-bit-length": (frame(text(CONNECTED), length_form=127), 1002),
    "text-inside-fragmented": (frame(b'{"event":', fin=False) + frame(b'"Connected"}'), 1002),
    "binary": (frame(b"\x00\x01", opcode=2), 1003),
    "overlong-utf8": (frame(b'{"event":"Connected","x":"\xc0\xaf"}'), 1007),
    "overlong-utf8-3-bytes": (frame(b'{"event":"Connected","x":"\xe0\x80\xaf"}'), 1007),
    "surrogate-d800": (frame(b'{"event":"Connected","x":"\xed\xa0\x80"}'), 1007),
    "surrogate-dfff": (frame(b'{"event":"Connected","x":"\xed\xbf\xbf"}'), 1007),
    "above-10ffff": (frame(b'{"event":"Connected","x":"\xf4\x90\x80\x80"}'), 1007),
    "truncated-utf8": (frame(b'{"event":"Connected","x":"\xe2\x82"}'), 1007),
    "bad-utf8-in-a-key": (frame(b'{"event":"Connected","\xff":1}'), 1007),
    "bad-utf8-after-the-json": (frame(b'{"event":"Connected"}\xed\xa0\x80'), 1007),
    "bad-utf8-fragmented": (frame(b'{"event":"Connected","x":"\xed', fin=False)
                            + frame(b'\xa0\x80"}', opcode=0), 1007),
    "too-big-frame": (frame(b" " * 1001), 1009),
    "too-big-message-in-fragments": (frame(b" " * 600, fin=False) + frame(b" " * 600, opcode=0),
                                     1009),
    "too-big-64-bit-length": (frame(b" " * 70000), 1009),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_protocol_errors_close_with_autobahns_code(open_socket, name):
    """Each bad frame, alone, between good frames in one read, or cut across reads,
    closes with its code, as with Autobahn alone; the good frame before it is taken,
    nothing after it."""
    bad, code = ERRORS[name]
    stream = BEFORE + bad + AFTER
    assert close_code(feed(open_socket, [bad], max_message_size=1000)["written"]) == code
    readings = [[stream], cuts(stream, [1, len(BEFORE) + 1, len(BEFORE) + 3, len(stream) - 1]),
                [stream[i:i + 7] for i in range(0, len(stream), 7)],
                [stream[i:i + 1] for i in range(len(stream))]]
    fast_took_it = []
    for reads in readings:
        want = feed(open_socket, reads, fast=False, max_message_size=1000)
        got = feed(open_socket, reads, max_message_size=1000)
        assert close_code(want["written"]) == close_code(got["written"]) == code
        assert want["delivered"] == [text(CONNECTED)]
        assert got["stats"] == want["stats"]
        if got["delivered"] != want["delivered"]:
            # A bad text frame whole in one read: the fast path hands it to _on_text,
            # whose orjson.loads refuses it before anything is done with it;
            # Autobahn's validator refuses it before.  The close reasons differ
            # (Autobahn names the octet), the code is the same.  Autobahn reports
            # some of these twice (bad octet, then "ended within a code point"), and
            # the second report drops the TCP connection right after the close
            # frame; we wait for the client's close reply, as for any other 1007.
            assert code == 1007
            assert got["delivered"] == [text(CONNECTED), unmasked_payload(bad)]
            fast_took_it.append(reads)
            continue
        assert got == want
    if code == 1007 and opcode_of(bad) == 1 and bad[0] & 0x80:
        assert readings[0] in fast_took_it


def opcode_of(data: bytes) -> int:
    return data[0] & 0x0F


def unmasked_payload(data: bytes) -> bytes:
    """The payload of one masked client frame with a 7-bit length."""
    n, key = data[1] & 0x7F, data[2:6]
    return bytes(b ^ key[i & 3] for i, b in enumerate(data[6:6 + n]))


def test_orjson_refuses_every_invalid_utf8_the_fast_path_relies_on():
    """The fast path leaves UTF-8 validation of whole text messages to orjson.loads:
    overlongs, surrogates, code points past U+10FFFF, stray and missing continuation
    bytes are all refused, in strings, keys and outside them."""
    samples = [
        b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xe0\x9f\xbf", b"\xf0\x80\x80\xaf",
        b"\xf0\x8f\xbf\xbf",  # overlong
        b"\xed\xa0\x80", b"\xed\xaf\xbf", b"\xed\xb0\x80", b"\xed\xbf\xbf",
        b"\xed\xa0\xbd\xed\xb8\x80",  # surrogates, alone and as a CESU-8 pair
        b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80",  # > U+10FFFF
        b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xe2\x82", b"\xf0\x9f\x98",  # stray, cut short
    ]
    for bad in samples:
        with pytest.raises(UnicodeDecodeError):
            bad.decode("utf-8")
        for doc in (b'{"x":"' + bad + b'"}', b'{"' + bad + b'":1}', b'{"x":1}' + bad):
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(doc)
    # ... and every two-byte sequence that strict UTF-8 refuses
    for a in range(0x80, 0x100):
        for b in range(0x100):
            doc = b'{"x":"' + bytes([a, b]) + b'"}'
            try:
                doc.decode("utf-8")
            except UnicodeDecodeError:
                with pytest.raises(orjson.JSONDecodeError):
                    orjson.loads(doc)
    good = "\u00e9\u20ac\ud7ff\ue000\U0001f600\U0010ffff"
    assert orjson.loads(('{"x":"' + good + '"}').encode()) == {"x": good}


# -- over a real socket ------------------------------------------------------------------

class RawClient(protocol.Protocol):
    """A bare WebSocket client: writes the bytes it is given, as given."""

    def __init__(self):
        self.opened: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        self.buf = b""
        self.received: list[tuple[int, bytes]] = []

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.transport.write(HANDSHAKE)

    def dataReceived(self, data):
        self.buf += data
        if not self.opened.called:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            assert head.startswith(b"HTTP/1.1 101"), head
            self.buf = rest
            self.opened.callback(self)
        self.received = server_frames(self.buf)
        code = close_code(self.buf)
        if code is not None and not self.closed.called:
            self.transport.write(frame(struct.pack("!H", code), opcode=8))
            self.transport.loseConnection()
            self.closed.callback(code)

    def connectionLost(self, reason=protocol.connectionDone):
        if not self.closed.called:
            self.closed.callback(None)


async def raw_connect(port: int) -> RawClient:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor(), "127.0.0.1", port), client)
    return await client.opened


@pytest_twisted.ensureDeferred
async def test_a_call_in_odd_sized_writes_is_recorded_sample_exact(recorder):
    """A whole call written in 1 to 700 byte pieces, with pings, a pong and fragmented
    Media among the frames: pongs come back in order and the WAV is sample-exact."""
    n = 150
    agent, caller = frames(n, 40), frames(n, 41)
    parts = [frame(text(CONNECTED)), frame(text(dict(START, metadata=dict(START["metadata"],
                                                                           callId="odd"))))]
    pings = []
    for i in range(n):
        for perspective, audio in ((AGENT, agent), (CALLER, caller)):
            msg = text(media_msg(perspective, i + 1, audio[i]))
            if i % 13 == 5:
                parts += [frame(msg[:50], fin=False), frame(msg[50:], opcode=0)]
            else:
                parts.append(frame(msg))
        if i % 17 == 3:
            pings.append(b"p%d" % i)
            parts.append(frame(pings[-1], opcode=9))
        if i % 29 == 7:
            parts.append(frame(b"unsolicited", opcode=10))
    stop_msg = text({"event": "Stop", "metadata": {"duration": 3}})
    parts += [frame(stop_msg), frame(stop_msg)]
    stream = b"".join(parts)
    client = await raw_connect(recorder.port)
    rng = random.Random(9)
    pos = 0
    while pos < len(stream):
        step = rng.choice((1, 2, 7, 64, 300, 700))
        client.transport.write(stream[pos:pos + step])
        pos += step
        await sleep(0)  # let the recorder read it on its own
    assert await client.closed == 1000
    assert [p for op, p in client.received if op == 10] == pings
    [sidecar] = await recorder.archived()
    left, right = read_pcm16_wav(sidecar["_wav"])
    assert left == independent_decode(b"".join(agent))
    assert right == independent_decode(b"".join(caller))
    assert sidecar["perspectives"][AGENT]["frames"] == n
    assert sidecar["perspectives"][CALLER]["missing"] == 0


@pytest_twisted.ensureDeferred
async def test_unmasked_and_oversized_frames_over_a_socket(recorder_factory):
    """Over a real socket too: an unmasked frame after good ones closes with 1002, an
    oversized one with 1009, invalid UTF-8 with 1007."""
    rec = await recorder_factory(max_message_size=2000)
    for bad, code in ((frame(text(CONNECTED), masked=False), 1002),
                      (frame(b" " * 2001), 1009),
                      (frame(b'{"event":"Connected","x":"\xed\xa0\x80"}'), 1007)):
        client = await raw_connect(rec.port)
        client.transport.write(frame(text(CONNECTED)) + frame(text(CONNECTED)) + bad + AFTER)
        assert await client.closed == code
