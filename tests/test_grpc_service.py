"""The gRPC door end to end: real grpcio clients over loopback against a real
recorder (call assembly, spool, finalize, local archive), outcomes read from the
archive: sample-exact channels, sidecar fields, statuses."""

from __future__ import annotations

import io
import os

import grpc
import pytest_twisted
from twisted.internet import task
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from conftest import independent_decode, read_pcm16_wav
from grpcclient import OpenStream, dialog_init, media, segment_start, segment_stop, send
from evrecorder.grpcapi import streaming_pb2 as pb

GRACE = 0.3  # --reconnect-grace: a dialog is final this long after its last stream


def reactor():
    from twisted.internet import reactor as r

    return r


def chunks(n: int, seed: int, size: int = 800) -> list[bytes]:
    """n chunks of mu-law bytes, all different, none the silence byte."""
    return [bytes(((seed * 31 + i * 7 + j) % 250) + 1 for j in range(size)) for i in range(n)]


def dialog_events(dialog_id: str, contact: list[bytes], agent: list[bytes], session_id="s-1",
                  stop=True) -> list:
    events = [dialog_init(dialog_id, session_id=session_id, ani="+15550001"),
              segment_start("c", pb.CONTACT, session_id=session_id),
              segment_start("a", pb.AGENT, session_id=session_id, participant_id="agent-7")]
    for i in range(max(len(contact), len(agent))):
        if i < len(contact):
            events.append(media("c", i + 1, contact[i], session_id=session_id))
        if i < len(agent):
            events.append(media("a", i + 1, agent[i], session_id=session_id))
    if stop:
        events += [segment_stop("a", session_id=session_id), segment_stop("c", session_id=session_id)]
    return events


def assert_exact(sidecar: dict, agent: bytes, caller: bytes) -> None:
    """Left is the agent, right the caller, sample for sample (shorter padded with silence)."""
    left, right = read_pcm16_wav(sidecar["_wav"])
    n = max(len(agent), len(caller))
    assert left == independent_decode(agent + b"\xff" * (n - len(agent)))
    assert right == independent_decode(caller + b"\xff" * (n - len(caller)))


async def until(predicate, timeout=10.0, what="condition"):
    deadline = reactor().seconds() + timeout
    while not predicate():
        assert reactor().seconds() < deadline, f"timed out waiting for {what}"
        await task.deferLater(reactor(), 0.02, lambda: None)


class CapturedLog:
    """Every log event's formatted text while the test runs."""

    def __init__(self):
        from twisted.logger import formatEvent

        self.lines: list[str] = []
        self._format = formatEvent

    def __call__(self, event):
        self.lines.append(self._format(event) + " " + repr(event))

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest_twisted.ensureDeferred
async def test_contact_and_agent_are_sample_exact(recorder_factory):
    """A dialog with a contact and an agent segment: one stereo WAV, agent left, caller right, exact."""
    rec = await recorder_factory(grpc_listen=True, reconnect_grace=GRACE)
    contact, agent = chunks(20, 1), chunks(18, 2)
    status = await deferToThread(send, rec.grpc_port, dialog_events("dlg-1", contact, agent))
    assert status == (grpc.StatusCode.OK, "")
    [sidecar] = await rec.archived()
    assert sidecar["source"] == "grpc" and sidecar["callId"] == "dlg-1"
    assert sidecar["sessionId"] == "s-1"
    assert sidecar["complete"] is True and sidecar["endReason"] == "stop"
    assert sidecar["metadata"]["dialog"]["ani"] == "+15550001"
    assert [s["participant"]["type"] for s in sidecar["segments"]] == ["CONTACT", "AGENT"]
    assert [s["chunks"] for s in sidecar["segments"]] == [20, 18]
    assert_exact(sidecar, b"".join(agent), b"".join(contact))


@pytest_twisted.ensureDeferred
async def test_tokens_wrong_missing_and_right(recorder_factory):
    """Secrets set: wrong and missing tokens get UNAUTHENTICATED, nothing kept, the secret never logged."""
    secret = "s3cr3t-Xq9"
    rec = await recorder_factory(grpc_listen=True, reconnect_grace=GRACE, secrets=[secret])
    contact, agent = chunks(5, 3), chunks(5, 4)
    with CapturedLog() as captured:
        for token in (None, "wrong", "Bearer wrong", secret[:-1]):
            code, _ = await deferToThread(
                send, rec.grpc_port, dialog_events("bad-" + str(token), contact, agent), token=token)
            assert code == grpc.StatusCode.UNAUTHENTICATED, token
        assert os.listdir(os.path.join(rec.settings.spool, "calls")) == []
        status = await deferToThread(
            send, rec.grpc_port, dialog_events("good", contact, agent), token="Bearer " + secret)
        assert status == (grpc.StatusCode.OK, "")
        [sidecar] = await rec.archived()
    assert sidecar["callId"] == "good"
    assert_exact(sidecar, b"".join(agent), b"".join(contact))
    assert "UNAUTHENTICATED" in captured.text
    assert secret not in captured.text and secret[:-1] not in captured.text
    with open(sidecar["_wav"][:-4] + ".json", encoding="utf-8") as f:
        assert secret not in f.read()


@pytest_twisted.ensureDeferred
async def test_tls_with_a_self_signed_certificate(recorder_factory, tmp_path):
    """An ssl: endpoint serves gRPC over TLS; a client trusting the certificate records a dialog."""
    from test_tls import make_certificate

    key, cert = make_certificate(tmp_path)
    rec = await recorder_factory(
        grpc_listen=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        reconnect_grace=GRACE)
    with open(cert, "rb") as f:
        ca = f.read()
    contact, agent = chunks(6, 5), chunks(6, 6)
    status = await deferToThread(send, rec.grpc_port, dialog_events("tls-1", contact, agent), ca=ca)
    assert status == (grpc.StatusCode.OK, "")
    [sidecar] = await rec.archived()
    assert_exact(sidecar, b"".join(agent), b"".join(contact))
    # Plaintext to the TLS port gets no answer it can use.
    code, _ = await deferToThread(send, rec.grpc_port, [dialog_init("plain")], timeout=3)
    assert code == grpc.StatusCode.UNAVAILABLE


@pytest_twisted.ensureDeferred
async def test_bad_stream_beside_a_good_dialog(recorder_factory):
    """Bad input on one stream ends only it (with its status); the dialog beside it stays exact."""
    rec = await recorder_factory(grpc_listen=True, reconnect_grace=GRACE)
    contact, agent = chunks(30, 7), chunks(30, 8)
    good = OpenStream(rec.grpc_port)
    events = dialog_events("good", contact, agent, stop=False)
    good.send(*events[:20])
    bad_status = await deferToThread(send, rec.grpc_port, [
        dialog_init("bad"), segment_start("c"), media("c", 1, b"\x01" * 800),
        media("nope", 2, b"\x01" * 800),
    ])
    assert bad_status[0] == grpc.StatusCode.FAILED_PRECONDITION and "nope" in bad_status[1]
    before = await deferToThread(send, rec.grpc_port, [segment_start("c"), dialog_init("x")])
    assert before[0] == grpc.StatusCode.FAILED_PRECONDITION
    good.send(*events[20:], segment_stop("a"), segment_stop("c"))
    good.close()
    assert await deferToThread(good.result) == (grpc.StatusCode.OK, "")
    sidecars = {s["callId"]: s for s in await rec.archived(2)}
    assert set(sidecars) == {"good", "bad"}
    assert_exact(sidecars["good"], b"".join(agent), b"".join(contact))
    assert sidecars["good"]["complete"] is True
    assert sidecars["bad"]["complete"] is False  # what it recorded is kept
    assert sidecars["bad"]["segments"][0]["chunks"] == 1


@pytest_twisted.ensureDeferred
async def test_cancel_without_stop_is_incomplete_after_the_grace(recorder_factory):
    """A stream cancelled without SegmentStop: archived after the grace, complete false, "disconnect"."""
    rec = await recorder_factory(grpc_listen=True, reconnect_grace=GRACE)
    contact, agent = chunks(10, 9), chunks(10, 10)
    s = OpenStream(rec.grpc_port)
    s.send(*dialog_events("cut", contact, agent, stop=False))
    await until(lambda: rec.service.registry.calls, what="the dialog")
    await task.deferLater(reactor(), 0.3, lambda: None)
    s.cancel()
    assert (await deferToThread(s.result))[0] == grpc.StatusCode.CANCELLED
    [sidecar] = await rec.archived()
    assert sidecar["complete"] is False and sidecar["endReason"] == "disconnect"
    assert_exact(sidecar, b"".join(agent), b"".join(contact))


@pytest_twisted.ensureDeferred
async def test_a_second_stream_rejoins_within_the_grace(recorder_factory):
    """A new stream for the dialog within the grace joins the same recording; both streams listed."""
    rec = await recorder_factory(grpc_listen=True, reconnect_grace=2.0)
    first = dialog_events("again", chunks(5, 11), chunks(5, 12), session_id="s-1")
    status = await deferToThread(send, rec.grpc_port, first)
    assert status[0] == grpc.StatusCode.OK
    second = dialog_events("again", chunks(5, 13), chunks(5, 14), session_id="s-2")
    status = await deferToThread(send, rec.grpc_port, second)
    assert status[0] == grpc.StatusCode.OK
    [sidecar] = await rec.archived(timeout=15)
    assert [s["sessionId"] for s in sidecar["streams"]] == ["s-1", "s-2"]
    assert sidecar["sessionId"] == "s-1"
    assert len(sidecar["segments"]) == 4 and sidecar["complete"] is True


@pytest_twisted.ensureDeferred
async def test_both_doors_in_one_process(recorder_factory, tmp_path):
    """A WebSocket call and a gRPC dialog at once in one recorder: both archived, both exact."""
    from evrecorder import replay
    from test_service import frames

    rec = await recorder_factory(grpc_listen=True, reconnect_grace=GRACE)
    ws_agent = frames(50, 60)
    audio_file = tmp_path / "agent.ulaw"
    audio_file.write_bytes(b"".join(ws_agent))
    contact, agent = chunks(10, 15), chunks(10, 16)
    grpc_done = deferToThread(send, rec.grpc_port, dialog_events("g-1", contact, agent))
    out = io.StringIO()
    ws_status = await replay.run(reactor(), [
        str(audio_file), f"ws://127.0.0.1:{rec.port}/", "--flood", "--call-id", "ws-1"], out=out)
    assert ws_status == 0, out.getvalue()
    assert (await grpc_done)[0] == grpc.StatusCode.OK
    sidecars = {s["callId"]: s for s in await rec.archived(2)}
    assert sidecars["ws-1"]["source"] == "websocket" and sidecars["g-1"]["source"] == "grpc"
    assert_exact(sidecars["g-1"], b"".join(agent), b"".join(contact))
    left, right = read_pcm16_wav(sidecars["ws-1"]["_wav"])
    assert left == independent_decode(b"".join(ws_agent))


@pytest_twisted.ensureDeferred
async def test_health_service_and_drain(recorder_factory):
    """Health SERVING while running; stopService drains: NOT_SERVING, new streams UNAVAILABLE,
    the stream in progress is ended "shutdown" with UNAVAILABLE and archived."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    rec = await recorder_factory(grpc_listen=True, reconnect_grace=GRACE, drain_timeout=1.0)

    def health():
        with grpc.insecure_channel(f"127.0.0.1:{rec.grpc_port}") as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status

    assert await deferToThread(health) == health_pb2.HealthCheckResponse.SERVING
    contact = chunks(5, 17)
    s = OpenStream(rec.grpc_port)
    s.send(*dialog_events("lingering", contact, [], stop=False))
    await until(lambda: rec.service.registry.calls, what="the dialog")
    stopping = rec.service.stopService()
    await task.deferLater(reactor(), 0.2, lambda: None)
    assert await deferToThread(health) == health_pb2.HealthCheckResponse.NOT_SERVING
    code, _ = await deferToThread(send, rec.grpc_port, [dialog_init("late")])
    assert code == grpc.StatusCode.UNAVAILABLE
    assert await deferToThread(s.result) == (grpc.StatusCode.UNAVAILABLE, "call ended: shutdown")
    await stopping
    [sidecar] = await rec.archived()
    assert sidecar["callId"] == "lingering" and sidecar["endReason"] == "shutdown"
    left, right = read_pcm16_wav(sidecar["_wav"])
    assert right == independent_decode(b"".join(contact))


@pytest_twisted.ensureDeferred
async def test_metrics_carry_the_door(recorder_factory):
    """/metrics counts gRPC chunks, bytes and refusals under door="grpc"."""
    from test_operate import metric

    rec = await recorder_factory(grpc_listen=True, metrics=True, reconnect_grace=GRACE,
                                 secrets=["k"])
    contact, agent = chunks(4, 18), chunks(3, 19)
    await deferToThread(send, rec.grpc_port, dialog_events("m", contact, agent), token="k")
    await deferToThread(send, rec.grpc_port, [dialog_init("n")], token="x")
    await deferToThread(send, rec.grpc_port, [segment_start("c")], token="k")
    await rec.archived()
    _, text = await rec.http_get("/metrics")
    assert metric(text, "evrecorder_frames_total", door="grpc", perspective="caller") == 4
    assert metric(text, "evrecorder_media_bytes_total", door="grpc", perspective="agent") == 3 * 800
    assert metric(text, "evrecorder_rejected_handshakes_total", door="grpc", reason="secret") == 1
    assert metric(text, "evrecorder_bad_input_closes_total", code="FAILED_PRECONDITION", door="grpc") == 1
    assert metric(text, "evrecorder_active_calls", door="grpc") == 0
    assert metric(text, "evrecorder_grpc_streams_total") == 2




@pytest_twisted.ensureDeferred
async def test_idle_timeout_ends_the_stream(recorder_factory):
    """A stream that sends nothing for --idle-timeout ends with DEADLINE_EXCEEDED; the dialog is "timeout"."""
    rec = await recorder_factory(grpc_listen=True, reconnect_grace=GRACE, idle_timeout=0.5)
    contact = chunks(3, 26)
    s = OpenStream(rec.grpc_port)
    s.send(*dialog_events("quiet", contact, [], stop=False))
    assert await deferToThread(s.result) == (grpc.StatusCode.DEADLINE_EXCEEDED, "call ended: timeout")
    [sidecar] = await rec.archived()
    assert sidecar["endReason"] == "timeout" and sidecar["complete"] is False
    assert read_pcm16_wav(sidecar["_wav"])[1] == independent_decode(b"".join(contact))


@pytest_twisted.ensureDeferred
async def test_so_reuseport_only_with_reuse_port(recorder_factory, tmp_path):
    """Without --reuse-port a second recorder cannot take the gRPC port; with it, both listen."""
    from evrecorder.service import ListenError
    from test_process import free_port

    port = free_port()
    spec = f"tcp:{port}:interface=127.0.0.1"
    from conftest import Recorder

    await recorder_factory(grpc_listen=spec, subdir="a")
    (tmp_path / "b").mkdir()
    second = Recorder(tmp_path / "b", grpc_listen=spec)
    try:
        await second.start()
    except ListenError as e:
        assert str(e) == f"cannot listen on {spec}: port {port} is already in use"
    else:
        raise AssertionError("a second recorder took the port without --reuse-port")
    finally:
        await second.stop()  # what did start (the archiver) stops
    port = free_port()
    spec = f"tcp:{port}:interface=127.0.0.1"
    one = await recorder_factory(grpc_listen=spec, subdir="c", reuse_port=True)
    two = await recorder_factory(grpc_listen=spec, subdir="d", reuse_port=True)
    assert one.grpc_port == two.grpc_port == port
