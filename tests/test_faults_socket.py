"""Faults a hostile or broken client can inject through the WebSocket door.

Each test makes the fault for real where this machine can: a client socket
that never reads, sockets that never present a secret or a Start, a spool on a
small tmpfs that fills up, a secret hidden in Stop metadata, control characters
in identifiers.  Each checks that the fault costs nothing beyond its own socket
and that a normal call beside it is recorded sample-exact.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest_twisted
import pytest
from twisted.internet import address, defer, threads

from test_frames import (  # noqa: F401  (clock: a fixture)
    CONNECTED, HANDSHAKE, START, Transport, clock, close_code, frame, server_frames, text,
)
from test_service import AGENT, CALLER, assert_channels, frames, reactor, record_call, sleep
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


def raw_upgrade(port: int, rcvbuf: int = 4096) -> socket.socket:
    """A plain socket past the opening handshake (its 101 response read, nothing after).

    Blocking: call it in a thread.
    """
    sock = socket.socket()
    sock.settimeout(10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # the client reads nothing
    sock.connect(("127.0.0.1", port))
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

    def make(**settings):
        s = Settings(spool=str(tmp_path / "spool"), archive=str(tmp_path / "archive"), **settings)
        spool = Spool(s.spool)
        spool.prepare()
        factory = RecorderFactory(CallRegistry(spool, s, clock, lambda call: None), s, clock)
        proto = factory.buildProtocol(address.IPv4Address("TCP", "127.0.0.1", 40000))
        transport = Transport()
        proto.makeConnection(transport)
        proto.dataReceived(HANDSHAKE)
        assert proto.state == proto.STATE_OPEN
        transport.clear()
        return proto, transport

    return make


# -- 1. a client that never reads -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_client_that_pings_and_never_reads_is_held_by_tcp(recorder_factory):
    """Pings from a client that never reads (no secret) keep the server's unsent output
    under 256 KiB, and a call beside it is recorded sample-exact."""
    rec = await recorder_factory(secrets=[SECRET])
    sock = await threads.deferToThread(raw_upgrade, rec.port)  # blocking: not on the reactor
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
    assert await within(connected_only.closed, 5) == (1008, "no Start within 1.5 s of the handshake")
    assert len(rec.service.factory.sockets) == 0
    [sidecar] = await rec.archived()
    assert_channels(sidecar, b"".join(agent), b"".join(caller))
