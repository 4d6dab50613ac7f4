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
from twisted.internet import defer, threads

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
