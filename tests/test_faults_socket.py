"""Faults a hostile or broken client can inject through the WebSocket door.

Each test makes the fault for real where this machine can: a client socket
that never reads, sockets that never present a secret or a Start, a spool on a
small tmpfs that fills up, a secret hidden in Stop metadata, control characters
in identifiers.  Each checks that the fault costs nothing beyond its own socket
and that a normal call beside it is recorded sample-exact.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest_twisted
import pytest
from twisted.internet import address, defer, threads

from test_frames import (  # noqa: F401  (clock: a fixture)
    CONNECTED, HANDSHAKE, START, Transport, clock, close_code, frame, media_msg, server_frames,
    text,
)
from test_service import AGENT, assert_channels, frames, reactor, record_call, sleep
from wsclient import connect, connected, media, start

SECRET = "flood-secret-0123456789"
UPGRADE = (
    "GET /?callId=flood HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
).encode()


def masked_frame(payload: bytes, opcode: int) -> bytes:
    """One final, masked client frame (payloads under 126 bytes)."""
    key = b"\x11\x22\x33\x44"
    body = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + body


PING = masked_frame(b"p" * 125, 0x9)  # the largest ping: each owes a 127-byte pong


def raw_upgrade(port: int, rcvbuf: int = 4096, tls: bool = False) -> socket.socket:
    """A plain (or TLS) socket past the opening handshake (its 101 response read, nothing
    after).  Blocking: call it in a thread.
    """
    sock = socket.socket()
    sock.settimeout(10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # the client reads nothing
    sock.connect(("127.0.0.1", port))
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(sock)
    sock.sendall(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "the recorder closed the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def flood(sock: socket.socket, seconds: float, stop: threading.Event) -> int:
    """Send pings for ``seconds`` without ever reading (in a thread); bytes sent."""
    burst = PING * 512
    sock.settimeout(0.1)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        try:
            sent += sock.send(burst)
        except socket.timeout:
            continue  # TCP pushes back: this is what should happen
        except OSError:
            break  # closed by the recorder
    return sent


def unsent(proto) -> int:
    """Bytes the server has written to this socket's transport and the kernel has not taken.

    Reads Twisted's TCP transport buffers (``dataBuffer``, ``offset``,
    ``_tempDataLen``): the measure of what a client that does not read costs.
    """
    t = proto.transport
    while not hasattr(t, "dataBuffer"):  # TLS: what it wrote waits in the TCP transport
        t = t.transport
    return len(t.dataBuffer) - t.offset + t._tempDataLen


def server_side(rec, sock: socket.socket):
    """The recorder's protocol for the client socket ``sock``."""
    port = sock.getsockname()[1]
    for proto in rec.service.factory.sockets:
        if proto.transport.getPeer().port == port:
            return proto
    raise AssertionError("the recorder has no open socket for this client")


@pytest.fixture
def open_socket(tmp_path, clock):
    """open_socket(**settings): (protocol, transport) just after the opening handshake,
    on an in-memory transport, every timer on ``clock``."""
    from evrecorder.call import CallRegistry
    from evrecorder.protocol import RecorderFactory
    from evrecorder.settings import Settings
    from evrecorder.spool import Spool

    def make(handshake: bytes = HANDSHAKE, **settings):
        s = Settings(spool=str(tmp_path / "spool"), archive=str(tmp_path / "archive"), **settings)
        spool = Spool(s.spool)
        spool.prepare()
        factory = RecorderFactory(CallRegistry(spool, s, clock, lambda call: None), s, clock)
        proto = factory.buildProtocol(address.IPv4Address("TCP", "127.0.0.1", 40000))
        transport = Transport()
        proto.makeConnection(transport)
        if handshake:
            proto.dataReceived(handshake)
            assert proto.state == proto.STATE_OPEN
            transport.clear()
        return proto, transport

    return make


# -- 1. a client that never reads -------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
@pytest_twisted.ensureDeferred
async def test_a_client_that_pings_and_never_reads_is_held_by_tcp(recorder_factory, tmp_path,
                                                                   tls):
    """Pings from a client that never reads (no secret) keep the server's unsent output
    under 256 KiB, the socket is still closed (1008 at --handshake-timeout, dropped when
    the close is not answered), and a call beside it is recorded sample-exact."""
    listen = "tcp:0:interface=127.0.0.1"
    if tls:
        from test_tls import make_certificate

        key, cert = make_certificate(tmp_path)
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    rec = await recorder_factory(secrets=[SECRET], listen=listen, handshake_timeout=2.0)
    flood_port = rec.port
    if tls:  # the call beside it comes over ws, to the same recorder
        plain = rec.service.add_listener("tcp:0:interface=127.0.0.1")
        rec.port = (await plain._waitingForPort).getHost().port
    sock = await threads.deferToThread(raw_upgrade, flood_port, tls=tls)  # blocking: not here
    stop = threading.Event()
    try:
        await sleep(0.1)
        proto = server_side(rec, sock)
        flooding = threads.deferToThread(flood, sock, 3.0, stop)
        most = 0
        agent, caller = frames(150, 81), frames(150, 82)
        call = defer.ensureDeferred(
            record_call(rec, agent, caller, call_id="beside", headers={"X-Secret": SECRET})
        )
        while not flooding.called:
            most = max(most, unsent(proto))
            await sleep(0.02)
        sent = await flooding
        code, _ = await call
        # Not read since the flood (it answers no close): Autobahn drops it 5 s
        # after the 1008, even though reading is paused (Twisted would wait for
        # a paused producer that is never unregistered).
        deadline = reactor().seconds() + 10
        while proto in rec.service.factory.sockets and reactor().seconds() < deadline:
            await sleep(0.1)
        assert proto not in rec.service.factory.sockets, "a paused socket was never closed"
    finally:
        stop.set()
        sock.close()
    print(f"flood sent {sent} bytes, at most {most} bytes unsent")
    assert sent > 1024 * 1024, f"the flood sent only {sent} bytes"
    assert most < 256 * 1024, f"{most} bytes of pongs queued for a client that does not read"
    assert code == 1000
    [sidecar] = await rec.archived()
    assert_channels(sidecar, b"".join(agent), b"".join(caller))


# -- 2. sockets that never say who they are -----------------------------------------


def within(d: defer.Deferred, seconds: float) -> defer.Deferred:
    """``d``, failed with TimeoutError if it has not fired in ``seconds``."""
    return d.addTimeout(seconds, reactor())


def close_reason(data: bytes) -> str:
    """The reason of the first close frame the server wrote."""
    [payload] = [p for op, p in server_frames(data) if op == 8][:1]
    return payload[2:].decode()


def test_no_secret_within_the_handshake_timeout_closes_1008(open_socket, clock):
    """Connected and Start without the configured secret: closed 1008 at --handshake-timeout."""
    proto, transport = open_socket(secrets=[SECRET], handshake_timeout=2.5)
    proto.dataReceived(frame(text(CONNECTED)) + frame(text(START)))
    clock.advance(2.4)
    assert transport.value() == b"" and proto.state == proto.STATE_OPEN
    clock.advance(0.1)
    assert close_code(transport.value()) == 1008
    assert close_reason(transport.value()) == "no valid secret within 2.5 s of the handshake"
    assert proto.factory.metrics.closed[1008] == 1


def test_no_start_within_the_handshake_timeout_closes_1008(open_socket, clock):
    """A socket with the secret that sends only Connected is closed 1008 when the time is up."""
    proto, transport = open_socket(secrets=[SECRET])
    proto.dataReceived(frame(text(dict(CONNECTED, secret=SECRET))))
    clock.advance(9.99)
    assert transport.value() == b""
    clock.advance(0.01)
    assert close_code(transport.value()) == 1008
    assert close_reason(transport.value()) == "no Start within 10 s of the handshake"


def test_a_socket_that_joined_its_call_is_not_timed_out(open_socket, clock):
    """Secret and Start in time: the socket stays open past --handshake-timeout."""
    proto, transport = open_socket(secrets=[SECRET])
    proto.dataReceived(frame(text(dict(START, secret=SECRET))))
    assert proto._call is not None
    clock.advance(15)  # under --idle-timeout and the auto-ping: the call itself goes on
    assert transport.value() == b"" and proto.state == proto.STATE_OPEN
    assert not [c for c in clock.getDelayedCalls() if c.func == proto._not_admitted]


@pytest_twisted.ensureDeferred
async def test_silent_sockets_are_closed_and_a_call_beside_them_is_recorded(recorder_factory):
    """Many sockets that never send a secret or Start are all closed 1008 at the timeout;
    a call beside them is archived sample-exact."""
    rec = await recorder_factory(secrets=[SECRET], handshake_timeout=1.5)
    silent = [await connect(reactor(), rec.port) for _ in range(60)]
    connected_only = await connect(reactor(), rec.port, headers={"X-Secret": SECRET})
    connected_only.send(connected())
    agent, caller = frames(120, 83), frames(120, 84)
    code, _ = await record_call(rec, agent, caller, call_id="among-silent",
                                headers={"X-Secret": SECRET})
    assert code == 1000
    closes = await within(defer.gatherResults([c.closed for c in silent]), 10)
    assert closes == [(1008, "no valid secret within 1.5 s of the handshake")] * 60
    assert await within(connected_only.closed, 5) == (
        1008, "no Start within 1.5 s of the handshake")
    assert len(rec.service.factory.sockets) == 0
    [sidecar] = await rec.archived()
    assert_channels(sidecar, b"".join(agent), b"".join(caller))


# -- 3. a spool that cannot be written ----------------------------------------------


class SmallDisk:
    """A tmpfs mounted for one test, that can be filled to ENOSPC and emptied again."""

    def __init__(self, path, size: str):
        self.path = str(path)
        os.makedirs(self.path)
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", self.path],
                             capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()}): needs root")
        self._filler = os.path.join(self.path, "filler")

    def fill(self) -> None:
        """Write until the disk is full."""
        with open(self._filler, "ab") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
        for n in range(100):  # and the last few bytes
            try:
                with open(f"{self._filler}-{n}", "wb") as f:
                    f.write(b"\0" * 4096)
            except OSError:
                break

    def empty(self) -> None:
        for name in os.listdir(self.path):
            if name.startswith("filler"):
                os.unlink(os.path.join(self.path, name))

    def remount(self, option: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{option}", self.path], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", self.path], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (request it before recorder_factory: it is unmounted after)."""
    disk = SmallDisk(tmp_path / "small", "2m")
    yield disk
    disk.unmount()


class LogLines:
    """The log events emitted while in use, and their text as twistd writes it."""

    def __enter__(self):
        from twisted.logger import globalLogPublisher

        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc):
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self.events.append)

    def texts(self, containing: str = "") -> list[str]:
        from twisted.logger import formatEventAsClassicLogText

        out = [formatEventAsClassicLogText(e) for e in self.events]
        return [t for t in out if t and containing in t]

    def failures(self) -> list[dict]:
        return [e for e in self.events if "log_failure" in e]


def test_rate_limit_says_how_many_lines_it_left_out():
    """One line per key a minute; the next says how many were left out; keys are apart."""
    from twisted.internet.task import Clock

    from evrecorder.logs import RateLimit

    clock = Clock()
    limit = RateLimit(clock, 60.0)
    assert limit.allow("a") == 0
    assert [limit.allow("a") for _ in range(4)] == [None] * 4
    assert limit.allow("b") == 0
    clock.advance(59.9)
    assert limit.allow("a") is None
    clock.advance(0.1)
    assert limit.allow("a") == 5
    assert limit.allow("a") is None


@pytest_twisted.ensureDeferred
async def test_a_new_call_on_a_full_spool_is_refused_with_a_sentence(small_disk, recorder_factory):
    """Spool full: each new call is closed 1011 saying so, one log line for all of them and
    no traceback; once there is room again, a call records sample-exact."""
    rec = await recorder_factory(spool=os.path.join(small_disk.path, "spool"))
    small_disk.fill()
    with LogLines() as logs:
        for n in range(5):
            conn = await connect(reactor(), rec.port)
            conn.send_all([connected(), start(f"full-{n}", n)])
            code, reason = await within(conn.closed, 10)
            assert (code, reason) == (
                1011, "the recorder's spool is full: the call is not recorded")
    [line] = logs.texts("spool is full")
    assert "call full-0/0 is not recorded: the recorder's spool is full (No space left on device" \
        in line and "closed with 1011" in line and line.count("\n") == 1
    assert logs.failures() == []
    assert rec.service.metrics.closed[1011] == 5
    small_disk.empty()
    agent, caller = frames(40, 85), frames(40, 86)
    code, _ = await record_call(rec, agent, caller, call_id="after-full")
    assert code == 1000
    [sidecar] = await rec.archived()
    assert_channels(sidecar, b"".join(agent), b"".join(caller))


def read_close(sock: socket.socket) -> tuple[int, str]:
    """Read (blocking) until the server's close frame: its code and reason."""
    data = b""
    sock.settimeout(10)
    while True:
        closes = [p for op, p in server_frames(data) if op == 8]
        if closes:
            return struct.unpack("!H", closes[0][:2])[0], closes[0][2:].decode()
        chunk = sock.recv(65536)
        assert chunk, "the recorder dropped the connection without a close frame"
        data += chunk


@pytest_twisted.ensureDeferred
async def test_a_running_call_on_a_full_spool_logs_one_sentence(small_disk, recorder_factory):
    """The spool fills mid-call: the socket is closed 1011 with a sentence, logged once
    however many reads fail; the call's end says its last frames could not be written,
    in a sentence too; and what reached the disk is archived sample-exact."""
    rec = await recorder_factory(spool=os.path.join(small_disk.path, "spool"),
                                 reconnect_grace=0.5)
    agent = frames(400, 87)
    sent = [frame(text(media_msg(AGENT, i + 1, agent[i]))) for i in range(400)]
    sock = await threads.deferToThread(raw_upgrade, rec.port)
    try:
        sock.sendall(frame(text(dict(START, metadata=dict(START["metadata"], callId="filling")))))
        sock.sendall(b"".join(sent[:100]))
        await sleep(0.5)  # handled and written
        small_disk.fill()

        def after_the_fill():
            # One write a frame, without reading: the recorder reads them in many
            # reads, before and after it sent its close.
            for f in sent[100:]:
                sock.sendall(f)
                time.sleep(0.001)
            return read_close(sock)

        with LogLines() as logs:
            code, reason = await threads.deferToThread(after_the_fill)
            sock.close()
            await sleep(1.0)  # the call ends after --reconnect-grace, the disk still full
    finally:
        sock.close()
    small_disk.empty()
    [sidecar] = await rec.archived()
    assert (code, reason) == (1011, "the recorder's spool is full: no more audio of this socket "
                                    "can be kept")
    [line] = logs.texts("call filling/1: the recorder's spool is full")
    assert "(No space left on device, spool " in line and "closed with 1011" in line
    [line] = logs.texts("call filling/1: its last frames could not be written")
    assert line.endswith("the recorder's spool is full (No space left on device)\n")
    ours = ("evrecorder.protocol", "evrecorder.call", "evrecorder.recording")
    assert [e for e in logs.failures() if e["log_namespace"] in ours] == []
    kept = sidecar["perspectives"][AGENT]["frames"]
    assert 100 <= kept < 400
    assert_channels(sidecar, b"".join(agent[:kept]), b"\xff" * 160 * kept)  # caller: silence


@pytest_twisted.ensureDeferred
async def test_a_new_call_on_a_read_only_spool_is_refused_with_a_sentence(small_disk,
                                                                         recorder_factory):
    """Spool remounted read-only: a new call is closed 1011, "spool is not writable"."""
    rec = await recorder_factory(spool=os.path.join(small_disk.path, "spool"))
    small_disk.remount("ro")
    try:
        with LogLines() as logs:
            conn = await connect(reactor(), rec.port)
            conn.send_all([connected(), start("read-only", 1)])
            code, reason = await within(conn.closed, 10)
    finally:
        small_disk.remount("rw")
    assert (code, reason) == (1011, "the recorder's spool is not writable: the call is not "
                                    "recorded")
    [line] = logs.texts("not writable")
    assert "(Read-only file system" in line
    assert logs.failures() == []


def test_a_relayed_call_on_a_full_spool_is_refused_with_a_sentence(small_disk, clock):
    """The owner of a relayed call cannot make its spool entry: the relaying side is told
    1011 with the sentence, and the log says it once, without a traceback."""
    import json

    from twisted.internet.testing import StringTransport

    from evrecorder import relay
    from evrecorder.call import CallRegistry
    from evrecorder.settings import Settings
    from evrecorder.spool import Spool

    settings = Settings(spool=os.path.join(small_disk.path, "spool"))
    spool = Spool(settings.spool)
    spool.prepare()
    registry = CallRegistry(spool, settings, clock, lambda call: None)
    server = relay.RelayServerFactory(registry)
    conn = server.buildProtocol(None)
    transport = StringTransport()
    conn.makeConnection(transport)
    small_disk.fill()
    join = b"J" + json.dumps({"callId": "relayed", "sessionId": "1", "metadata": {},
                              "query": {}, "connectedAt": 0.0}).encode()
    with LogLines() as logs:
        conn.dataReceived(struct.pack("!I", len(join)) + join)
    written = transport.value()
    (length,) = struct.unpack_from("!I", written)
    assert written[4:5] == b"E" and struct.unpack_from("!H", written, 5)[0] == 1011
    assert (written[7:4 + length].decode()
            == "the recorder's spool is full: the call is not recorded")
    assert transport.disconnecting
    [line] = logs.texts("spool is full")
    assert "call relayed/1 (a socket relayed from a sibling): the recorder's spool is full" \
        in line and "closed with 1011" in line
    assert logs.failures() == []


# -- 4. a secret wherever a client puts it ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_secret_anywhere_in_start_stop_or_query_is_never_archived(recorder_factory):
    """Secrets nested in Start and Stop metadata (any case, in lists) and in the query are
    in none of the archived bytes, nor the log; every other field is kept verbatim."""
    rec = await recorder_factory(secrets=[SECRET])
    nested = {"keep": 1, "secret": SECRET, "deeper": [{"Secret": SECRET, "keep": "yes"}]}
    agent = frames(20, 88)
    with LogLines() as logs:
        conn = await connect(reactor(), rec.port,
                             query={"callId": "hidden", "secret": SECRET, "SECRET": SECRET})
        start_msg = start("hidden", 3, extra=nested, secret=SECRET)
        start_msg["secret"] = SECRET
        conn.send_all([connected(secret=SECRET), start_msg])
        for i, f in enumerate(agent):
            conn.send(media(AGENT, i + 1, f))
        conn.send({"event": "Stop", "secret": SECRET,
                   "metadata": {"duration": 1, "SeCrEt": SECRET, "extra": nested}})
        code, _ = await within(conn.closed, 10)
        [sidecar] = await rec.archived()
    assert code == 1000
    for path in (sidecar["_wav"], sidecar["_wav"][:-4] + ".json"):
        with open(path, "rb") as f:
            assert SECRET.encode() not in f.read(), path
    kept = {"keep": 1, "deeper": [{"keep": "yes"}]}
    assert sidecar["metadata"]["extra"] == kept and "secret" not in sidecar["metadata"]
    assert sidecar["perspectives"][AGENT]["stop"] == {"duration": 1, "extra": kept}
    assert sidecar["query"] == {"callId": "hidden"}
    assert_channels(sidecar, b"".join(agent), b"\xff" * 160 * 20)
    assert not [t for t in logs.texts() if SECRET in t]


# -- 5. control characters in identifiers ------------------------------------------

EVIL_ID = "evil\n\x00\x1b[31m\u2028"
EVIL_SHOWN = "evil\\n\\x00\\x1b[31m\\u2028"


def test_control_characters_in_fields_are_escaped_for_every_observer():
    """A field with newline, NUL, ESC, U+2028 is one escaped line in twistd's text format
    and in the JSON lines; log_* keys and the format are untouched."""
    import io
    import json

    from twisted.logger import Logger, LogPublisher, textFileLogObserver

    from evrecorder.logs import escape_control_characters, json_observer

    publisher = LogPublisher()
    escape_control_characters(publisher)
    escape_control_characters(publisher)  # once is enough
    text_out, json_out = io.StringIO(), io.StringIO()
    publisher.addObserver(textFileLogObserver(text_out))
    publisher.addObserver(json_observer(json_out))
    Logger(namespace="t", observer=publisher).warn(
        "closing socket (call {call_id}/{session_id}) with {code}", call_id=EVIL_ID,
        session_id="plain", code=1008,
    )
    [line] = text_out.getvalue().splitlines(keepends=True)
    assert line.endswith(f"[t#warn] closing socket (call {EVIL_SHOWN}/plain) with 1008\n")
    [record] = [json.loads(x) for x in json_out.getvalue().splitlines()]
    assert record["text"] == f"closing socket (call {EVIL_SHOWN}/plain) with 1008"
    assert record["call_id"] == EVIL_SHOWN and record["code"] == 1008


@pytest_twisted.ensureDeferred
async def test_a_call_id_with_control_characters_is_logged_escaped(recorder_factory):
    """Every log line about a call whose callId holds control characters is one line, with
    them escaped; the call itself is recorded sample-exact."""
    rec = await recorder_factory()
    agent = frames(10, 89)
    with LogLines() as logs:
        code, _ = await record_call(rec, agent, agent, call_id=EVIL_ID)
        [sidecar] = await rec.archived()
        await sleep(0.1)
    assert code == 1000 and sidecar["callId"] == EVIL_ID
    assert_channels(sidecar, b"".join(agent), b"".join(agent))
    lines = logs.texts("evil")
    assert len(lines) >= 3  # started, ended, archived
    for line in lines:
        assert EVIL_SHOWN in line and line.count("\n") == 1 and "\x00" not in line, line


# -- 6. buffers Autobahn leaves unbounded -------------------------------------------


def test_an_endless_handshake_is_refused_431_at_16_kib(open_socket):
    """Request headers that never end are refused with HTTP 431 at 16 KiB, not buffered."""
    proto, transport = open_socket(handshake=b"")
    proto.dataReceived(b"GET /?callId=x HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    for _ in range(16):
        proto.dataReceived(line)
        assert transport.value() == b""
    proto.dataReceived(line)
    assert transport.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert transport.disconnecting and proto.data == b""
    assert proto.factory.metrics.rejected["too-large"] == 1


def test_a_handshake_under_16_kib_is_taken(open_socket):
    """A long but legitimate handshake (15 KiB of headers) still opens the socket."""
    pad = b"X-Pad: " + b"a" * 15000 + b"\r\n"
    proto, transport = open_socket(handshake=HANDSHAKE[:-2] + pad + b"\r\n")
    assert proto.state == proto.STATE_OPEN


def test_a_message_in_endless_empty_fragments_is_closed_1009(open_socket):
    """Empty continuation frames cannot grow a message without end: 1009 after 1024 frames."""
    proto, transport = open_socket()
    proto.dataReceived(frame(b'{"event":', fin=False))
    empty = frame(b"", opcode=0, fin=False)
    proto.dataReceived(empty * 1023)
    assert transport.value() == b"" and len(proto.message_data) <= 1024
    proto.dataReceived(empty * 5000)
    assert close_code(transport.value()) == 1009
    assert close_reason(transport.value()) == "a message in more than 1024 frames"
    assert not proto.message_data  # nothing more kept while the close completes


def test_a_message_in_a_few_fragments_is_still_taken(open_socket):
    """A Start cut into 20 frames is one message, as before."""
    proto, transport = open_socket()
    start_msg = text(START)
    step = len(start_msg) // 20 + 1
    parts = [start_msg[i:i + step] for i in range(0, len(start_msg), step)]
    proto.dataReceived(b"".join(
        frame(part, opcode=1 if i == 0 else 0, fin=i == len(parts) - 1)
        for i, part in enumerate(parts)
    ))
    assert proto._start_metadata == START["metadata"] and proto._call is not None
    assert transport.value() == b""


@pytest_twisted.ensureDeferred
async def test_an_endless_handshake_on_a_real_socket_gets_431(recorder_factory):
    """A client streaming header lines forever gets HTTP 431 and is disconnected; a call
    beside it records sample-exact."""

    def endless(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            try:
                for _ in range(1000):  # up to 1 MB
                    sock.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
            except OSError:
                pass  # closed on us: expected
            data = b""
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except OSError:
                pass
            return data

    rec = await recorder_factory()
    refused = threads.deferToThread(endless, rec.port)
    agent, caller = frames(30, 91), frames(30, 92)
    code, _ = await record_call(rec, agent, caller, call_id="beside-431")
    answer = await within(refused, 20)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    assert code == 1000
    [sidecar] = await rec.archived()
    assert_channels(sidecar, b"".join(agent), b"".join(caller))


# -- the same, against twistd as a process ---------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest_twisted.ensureDeferred
async def test_twistd_memory_stays_flat_under_a_ping_flood_that_never_reads(tmp_path):
    """twistd's RSS grows by less than 8 MiB while a client without a secret pings for
    5 s and never reads (it grew 80 MiB in 6 s when every pong was queued)."""
    from test_process import free_port, listening, start_twistd, until

    port = free_port()
    proc = start_twistd(tmp_path, port, "flood", "--secret", SECRET)
    try:
        await until(lambda: listening(port), what="the recorder to listen")
        sock = await threads.deferToThread(raw_upgrade, port)
        await sleep(0.5)
        before = rss_kib(proc.pid)
        sent = await threads.deferToThread(flood, sock, 5.0, threading.Event())
        after = rss_kib(proc.pid)
        sock.close()
    finally:
        proc.kill()
        proc.wait()
    print(f"sent {sent} bytes; RSS {before} KiB -> {after} KiB")
    assert sent > 1024 * 1024
    assert after - before < 8 * 1024, f"RSS grew from {before} KiB to {after} KiB"


@pytest_twisted.ensureDeferred
async def test_twistd_log_escapes_control_characters_in_a_call_id(tmp_path):
    """twistd's own text log holds no raw NUL, ESC or stray newline from a callId: each
    line about the call shows them escaped."""
    from test_process import free_port, listening, start_twistd, until

    port = free_port()
    proc = start_twistd(tmp_path, port, "evil")
    try:
        await until(lambda: listening(port), what="the recorder to listen")
        agent = frames(5, 90)
        conn = await connect(reactor(), port, query={"agentId": "a\x1b[2J"})
        conn.send_all([connected(), start(EVIL_ID, 1, agentId="\x1b]0;owned\x07")]
                      + [media(AGENT, i + 1, f) for i, f in enumerate(agent)]
                      + [{"event": "Stop", "metadata": {}}])
        assert (await within(conn.closed, 10))[0] == 1000
        await until(lambda: list((tmp_path / "archive").rglob("*.json")), what="the archive")
        await sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    log = (tmp_path / "evil.log").read_bytes()
    assert b"\x00" not in log and b"\x1b" not in log and b"\x07" not in log
    lines = [line for line in log.decode().splitlines() if "evil" in line]
    assert len(lines) >= 3, log.decode()  # started, ended, archived
    assert all(EVIL_SHOWN in line for line in lines), lines
    assert "agent \\x1b]0;owned\\x07" in log.decode()
