"""Operating the recorder: metrics and health, limits, log lines."""

from __future__ import annotations

import re

import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from test_service import AGENT, CALLER, SECRET, frames, reactor, record_call, sleep
from wsclient import connect, connected, media, refused, start


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text output."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    for line in text.splitlines():
        m = re.match(pattern, line)
        if m:
            return float(m.group(1))
    raise AssertionError(f"no sample {name}{{{want}}} in /metrics")


@pytest_twisted.ensureDeferred
async def test_metrics_count_a_replayed_call(recorder_factory):
    """/metrics counts frames, bytes, refusals, bad input and archived calls; health answers."""
    rec = await recorder_factory(metrics=True, secrets=[SECRET])
    code, body = await rec.http_get("/healthz")
    assert (code, body) == (200, "ok\n")
    assert (await rec.http_get("/readyz"))[0] == 200
    auth = {"Authorization": "Bearer " + SECRET}
    agent, caller = frames(40, 50), frames(30, 51)
    reordered = [1, 3, 2] + list(range(4, 41))
    conn = await connect(reactor(), rec.port, headers=auth)
    conn.send_all([connected(), start("m-1")])
    for seq in reordered:
        conn.send(media(AGENT, seq, agent[seq - 1]))
    for seq in range(1, 31):
        if seq != 7:  # one lost frame
            conn.send(media(CALLER, seq, caller[seq - 1]))
    conn.send_all([{"event": "Stop", "metadata": {}}] * 2)
    assert (await conn.closed)[0] == 1000
    assert await refused(reactor(), rec.port, headers={"Authorization": "Bearer wrong"}) == 403
    bad = await connect(reactor(), rec.port, headers=auth)
    bad.send("{nope")
    await bad.closed
    await rec.archived()
    await sleep(0.05)
    _, text = await rec.http_get("/metrics")
    assert metric(text, "evrecorder_frames_total", door="websocket", perspective=AGENT) == 40
    assert metric(text, "evrecorder_frames_total", door="websocket", perspective=CALLER) == 29
    assert metric(text, "evrecorder_media_bytes_total", door="websocket", perspective=AGENT) == 40 * 160
    assert metric(text, "evrecorder_rejected_handshakes_total", door="websocket", reason="secret") == 1
    assert metric(text, "evrecorder_bad_input_closes_total", code="1007", door="websocket") == 1
    assert metric(text, "evrecorder_calls_archived_total", end_reason="stop") == 1
    assert metric(text, "evrecorder_placement_frames_total", counter="reordered", perspective=AGENT) == 1
    assert metric(text, "evrecorder_placement_frames_total", counter="missing", perspective=CALLER) == 1
    assert metric(text, "evrecorder_upload_seconds_count") == 1
    assert metric(text, "evrecorder_active_calls", door="websocket") == 0
    assert metric(text, "evrecorder_upload_queue_depth") == 0


@pytest_twisted.ensureDeferred
async def test_readyz_fails_while_draining(recorder_factory):
    """While draining, /readyz answers 503 and new handshakes get 503."""
    rec = await recorder_factory(metrics=True, drain_timeout=5.0)
    open_call = await connect(reactor(), rec.port)
    open_call.send_all([connected(), start("drain-1"), media(AGENT, 1, b"\x01" * 160)])
    await sleep(0.05)
    stopping = rec.service.stopService()
    code, body = await rec.http_get("/readyz")
    assert code == 503 and "draining" in body
    assert await refused(reactor(), rec.port) == 503  # draining
    open_call.send_all([{"event": "Stop", "metadata": {}}])  # the call finishes inside the drain
    assert (await open_call.closed)[0] == 1000
    await stopping
    [sidecar] = await rec.archived()
    assert sidecar["endReason"] == "stop" and sidecar["complete"] is True


@pytest_twisted.ensureDeferred
async def test_max_calls_refuses_new_calls_not_joins(recorder_factory):
    """At --max-calls a new call gets 503, while a socket joining a running call is let in."""
    rec = await recorder_factory(max_calls=1)
    first = await connect(reactor(), rec.port, query={"callId": "cap-1", "sessionId": "2"})
    first.send_all([connected(), start("cap-1"), media(AGENT, 1, b"\x01" * 160)])
    await sleep(0.05)
    assert await refused(reactor(), rec.port, query={"callId": "cap-2", "sessionId": "2"}) == 503
    # The handshake named a running call, but its Start names a new one: 1013, try again later.
    sneaky = await connect(reactor(), rec.port, query={"callId": "cap-1", "sessionId": "2"})
    sneaky.send_all([connected(), start("cap-3")])
    assert (await sneaky.closed)[0] == 1013
    joining = await connect(reactor(), rec.port, query={"callId": "cap-1", "sessionId": "2"})
    joining.send_all([connected(), start("cap-1"), media(CALLER, 1, b"\x02" * 160)])
    first.send({"event": "Stop", "metadata": {}})
    joining.send({"event": "Stop", "metadata": {}})
    assert (await joining.closed)[0] == 1000
    [sidecar] = await rec.archived()
    assert sidecar["perspectives"][CALLER]["frames"] == 1


@pytest_twisted.ensureDeferred
async def test_call_log_lines_mask_phone_numbers(recorder_factory):
    """A call logs its start and archive with ids and counters; ani/dnis masked unless asked."""
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        rec = await recorder_factory()
        await record_call(rec, frames(5, 60), frames(5, 61), call_id="log-1")
        await rec.archived()
        rec2 = await recorder_factory(subdir="r2", log_phone_numbers=True)
        await record_call(rec2, frames(5, 60), [], call_id="log-2")
        await rec2.archived()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    text = "\n".join(formatEvent(e) for e in seen)
    assert "call log-1/2 started: agent 123, ani ******4444, dnis ******5555" in text
    assert "2223334444" not in text.split("log-2")[0]
    assert "call log-2/2 started: agent 123, ani 2223334444, dnis 2223335555" in text
    assert re.search(r"archived log-1/2 as \S+log-1-2 to file://\S+: 0\.1 s, endReason stop, "
                     r"agent 5 frames \(0 missing\), caller 5 frames \(0 missing\)", text)


@pytest_twisted.ensureDeferred
async def test_max_connections_refuses_sockets_beyond_it(recorder_factory):
    """Sockets beyond --max-connections get HTTP 503 at the handshake."""
    rec = await recorder_factory(max_connections=2)
    held = [await connect(reactor(), rec.port) for _ in range(2)]
    assert await refused(reactor(), rec.port) == 503
    held[0].close()
    await held[0].closed
    third = await connect(reactor(), rec.port)  # a place is free again
    third.close()


@pytest_twisted.ensureDeferred
async def test_handshake_timeout_drops_a_silent_client(recorder_factory):
    """A TCP client that never completes the WebSocket handshake is dropped after the timeout."""
    from twisted.internet import defer, protocol
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    # Autobahn's timers (txaio's batched timer) keep whole seconds: 2 s fires after 1 to 2 s.
    rec = await recorder_factory(handshake_timeout=2.0)

    class Silent(protocol.Protocol):
        def __init__(self):
            self.lost = defer.Deferred()

        def connectionLost(self, reason):
            self.lost.callback((reactor().seconds(), reason))

    silent = Silent()
    await connectProtocol(TCP4ClientEndpoint(reactor(), "127.0.0.1", rec.port), silent)
    opened = reactor().seconds()
    silent.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    closed_at, reason = await silent.lost
    assert 0.9 <= closed_at - opened < 5, reason
