"""A small real WebSocket client for the service tests (Autobahn, over TCP)."""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import urlencode

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import defer


class HandshakeRefused(Exception):
    def __init__(self, status: int | None, reason: str):
        super().__init__(f"{status}: {reason}")
        self.status = status


class _Protocol(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onClose(self, wasClean, code, reason):
        if not self.factory.opened.called:
            m = re.search(r"upgrade failed [(\[](\d{3})", reason or "")
            self.factory.opened.errback(
                HandshakeRefused(int(m.group(1)) if m else None, reason or "")
            )
        self.factory.closed.callback((code, reason))


class Conn:
    def __init__(self, proto: _Protocol, closed: defer.Deferred):
        self.proto = proto
        self.closed = closed

    def send(self, msg, binary: bool = False) -> None:
        if isinstance(msg, dict):
            msg = json.dumps(msg)
        if isinstance(msg, str):
            msg = msg.encode()
        self.proto.sendMessage(msg, isBinary=binary)

    def send_all(self, msgs) -> None:
        for m in msgs:
            self.send(m)

    def close(self, code: int = 1000) -> None:
        self.proto.sendClose(code)

    def drop(self) -> None:
        """Lose the TCP connection without a close handshake."""
        self.proto.transport.abortConnection()


async def connect(reactor, port: int, query: dict | None = None, headers: dict | None = None) -> Conn:
    url = f"ws://127.0.0.1:{port}/"
    if query:
        url += "?" + urlencode(query)
    factory = WebSocketClientFactory(url, headers=headers or {})
    factory.protocol = _Protocol
    factory.setProtocolOptions(openHandshakeTimeout=10)
    factory.opened = defer.Deferred()
    factory.closed = defer.Deferred()
    connectWS(factory)
    proto = await factory.opened
    return Conn(proto, factory.closed)


async def refused(reactor, port: int, **kw) -> int | None:
    """The HTTP status of a handshake that must be refused (fails if it is accepted)."""
    try:
        conn = await connect(reactor, port, **kw)
    except HandshakeRefused as e:
        return e.status
    conn.close()
    raise AssertionError("the handshake was accepted")


# -- the platform's messages ------------------------------------------------

def connected(**extra) -> dict:
    return dict({"event": "Connected", "protocol": "AgentSession", "version": "1.0.0"}, **extra)


def start(call_id="12345", session_id=2, **extra) -> dict:
    metadata = {
        "callId": call_id, "sessionId": session_id, "ani": "2223334444", "dnis": "2223335555",
        "accountId": "99990000", "subaccountId": "99990001", "rcAccountId": "123456789",
        "agentId": 123, "productType": "Queue", "productId": 1234,
        "contentType": "audio/x-mulaw", "sampleRateHertz": 8000,
    }
    metadata.update(extra)
    return {"event": "Start", "metadata": metadata}


def media(perspective: str, seq, payload: bytes) -> dict:
    return {
        "event": "Media", "perspective": perspective, "sequenceId": str(seq),
        "media": base64.b64encode(payload).decode(),
    }


def stop(**extra) -> dict:
    return {"event": "Stop", "metadata": dict({"duration": 1, "end_time": "2026-01-14T00:00:00Z"}, **extra)}
