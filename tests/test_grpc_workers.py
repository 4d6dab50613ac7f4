"""Several recorders on one spool, gRPC door: a dialog whose streams reach two
processes stays one recording (the second relays to the first, as split
WebSocket sockets do), bad input on a relayed stream gets the status it
would get on the owner, and a dead or hung owner costs no audio."""

from __future__ import annotations

import glob
import json
import signal

import grpc
import pytest_twisted
from twisted.internet import task
from twisted.internet.threads import deferToThread

from conftest import independent_decode, read_pcm16_wav
from grpcclient import OpenStream, dialog_init, media, segment_start, segment_stop
from evrecorder.grpcapi import streaming_pb2 as pb
from test_grpc_service import chunks, until
from test_process import free_port, listening, start_twistd
from test_process import until as until_process

SAMPLES = 800  # a 100 ms chunk of 8 kHz mu-law


def reactor():
    from twisted.internet import reactor

    return reactor


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor(), seconds, lambda: None)


def contact_stream(port: int, dialog_id: str, session_id: str = "s-1") -> OpenStream:
    stream = OpenStream(port, own_connection=True)
    stream.send(dialog_init(dialog_id, session_id=session_id),
                segment_start("c", pb.CONTACT, session_id=session_id))
    return stream


def agent_stream(port: int, dialog_id: str, session_id: str = "s-2") -> OpenStream:
    stream = OpenStream(port, own_connection=True)
    stream.send(dialog_init(dialog_id, session_id=session_id),
                segment_start("a", pb.AGENT, session_id=session_id, participant_id="agent-7"))
    return stream


def placed(sidecar: dict, segment_id: str, samples: list[int]) -> dict[int, list[int]]:
    """seq -> that chunk's samples, read from the channel where the sidecar says the segment is."""
    [segment] = [s for s in sidecar["segments"] if s["segmentId"] == segment_id]
    assert segment["pauses"] == [] and segment["missing"] == 0
    found = {}
    for k in range(segment["chunks"]):
        at = segment["offsetSamples"] + k * SAMPLES
        found[segment["firstSeq"] + k] = samples[at:at + SAMPLES]
    return found


def assert_segment_exact(sidecar: dict, segment_id: str, channel: int, sent: list[bytes]) -> None:
    """Every chunk sent in its place, silence before the segment's offset."""
    samples = read_pcm16_wav(sidecar["_wav"])[channel]
    got = placed(sidecar, segment_id, samples)
    assert sorted(got) == list(range(1, len(sent) + 1))
    for seq, chunk in got.items():
        assert chunk == independent_decode(sent[seq - 1]), (segment_id, seq)
    [segment] = [s for s in sidecar["segments"] if s["segmentId"] == segment_id]
    assert samples[:segment["offsetSamples"]] == [0] * segment["offsetSamples"]


def assert_in_one_recording_or_both(sidecars: list[dict], segment_id: str, channel: int,
                                    sent: list[bytes]) -> None:
    """After a take-over: every chunk sent is in one of the recordings (or both), exact."""
    got = {}
    for side in sidecars:
        if any(s["segmentId"] == segment_id for s in side["segments"]):
            got.update(placed(side, segment_id, read_pcm16_wav(side["_wav"])[channel]))
    assert sorted(got) == list(range(1, len(sent) + 1))
    for seq, samples in got.items():
        assert samples == independent_decode(sent[seq - 1]), (segment_id, seq)


async def split_dialog(recorder_factory, dialog_id: str, **second_settings):
    """Two recorders on one spool; the contact's stream on the first (which then owns
    the dialog), the agent's on the second (which relays it)."""
    first = await recorder_factory(subdir="shared", grpc_listen=True, reconnect_grace=0.3)
    second = await recorder_factory(subdir="shared", grpc_listen=True, reconnect_grace=0.3,
                                    **second_settings)
    c = contact_stream(first.grpc_port, dialog_id)
    await until(lambda: first.service.registry.calls, what="the first recorder to own the dialog")
    a = agent_stream(second.grpc_port, dialog_id)
    return first, second, c, a


@pytest_twisted.ensureDeferred
async def test_a_dialog_whose_streams_reach_two_processes_is_one_recording(recorder_factory):
    """The contact's stream on one recorder, the agent's on another sharing its spool:
    one recording with both streams, both channels exact; the second relayed."""
    contact, agent = chunks(12, 61), chunks(10, 62)
    first, second, c, a = await split_dialog(recorder_factory, "split-g1")
    c.send(*[media("c", i + 1, contact[i]) for i in range(12)], segment_stop("c"))
    a.send(*[media("a", i + 1, agent[i], session_id="s-2") for i in range(10)],
           segment_stop("a", session_id="s-2"))
    await sleep(0.3)
    a.close()
    c.close()
    assert await deferToThread(a.result) == (grpc.StatusCode.OK, "")
    assert await deferToThread(c.result) == (grpc.StatusCode.OK, "")
    [sidecar] = await first.archived()
    await sleep(0.5)
    assert len(await first.archived()) == 1  # one recording, not one per process
    assert sidecar["complete"] is True and sidecar["endReason"] == "stop"
    assert [s["sessionId"] for s in sidecar["streams"]] == ["s-1", "s-2"]
    assert [s["endReason"] for s in sidecar["streams"]] == ["stop", "stop"]
    assert_segment_exact(sidecar, "a", 0, agent)
    assert_segment_exact(sidecar, "c", 1, contact)
    assert second.service.metrics.relayed == 1 and first.service.metrics.relayed == 0
    assert not second.service.registry.calls and not second.service.registry.remote_calls


@pytest_twisted.ensureDeferred
async def test_bad_input_on_a_relayed_stream_gets_the_owners_status(recorder_factory):
    """A relayed stream's chunk for a segment it never started ends that stream as it
    would on the owner (FAILED_PRECONDITION); the dialog stays exact and whole."""
    contact, agent = chunks(8, 63), chunks(8, 64)
    first, second, c, a = await split_dialog(recorder_factory, "bad-g1")
    a.send(*[media("a", i + 1, agent[i], session_id="s-2") for i in range(8)],
           segment_stop("a", session_id="s-2"))
    bad = OpenStream(second.grpc_port)
    bad.send(dialog_init("bad-g1", session_id="s-3"), media("nope", 1, agent[0], session_id="s-3"))
    code, details = await deferToThread(bad.result)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "nope" in details
    c.send(*[media("c", i + 1, contact[i]) for i in range(8)], segment_stop("c"))
    await sleep(0.3)
    a.close()
    c.close()
    assert await deferToThread(a.result) == (grpc.StatusCode.OK, "")
    assert await deferToThread(c.result) == (grpc.StatusCode.OK, "")
    [sidecar] = await first.archived()
    assert sidecar["complete"] is True
    assert {s["sessionId"]: s["endReason"] for s in sidecar["streams"]} == {
        "s-1": "stop", "s-2": "stop", "s-3": "error"}
    assert_segment_exact(sidecar, "a", 0, agent)
    assert_segment_exact(sidecar, "c", 1, contact)
    assert second.service.metrics.grpc_closed["FAILED_PRECONDITION"] == 1


@pytest_twisted.ensureDeferred
async def test_a_hung_owner_is_taken_over_without_losing_chunks(recorder_factory, monkeypatch):
    """The owner stops confirming: the relaying process records the stream's segment
    from then on (started anew there), replaying what was never confirmed; every
    chunk is in one of the two recordings, exact."""
    from evrecorder import relay

    monkeypatch.setattr(relay, "MAX_UNACKED", 6)
    contact, agent = chunks(30, 65), chunks(30, 66)
    first, second, c, a = await split_dialog(recorder_factory, "hung-g1")
    a.send(*[media("a", i + 1, agent[i], session_id="s-2") for i in range(5)])
    c.send(*[media("c", i + 1, contact[i]) for i in range(5)])
    await until(lambda: len(first.service._relay_conns()) == 1, what="the relay")
    await sleep(0.3)
    [owned] = first.service._relay_conns()
    owned.transport.stopReading()  # hung, not dead
    for i in range(5, 30):
        a.send(media("a", i + 1, agent[i], session_id="s-2"))
        await sleep(0.01)
    await until(lambda: second.service.registry.calls, what="the take-over")
    owned.transport.startReading()  # the owner wakes up and finds the relay gone
    c.send(*[media("c", i + 1, contact[i]) for i in range(5, 30)], segment_stop("c"))
    a.send(segment_stop("a", session_id="s-2"))
    await sleep(0.3)
    a.close()
    c.close()
    assert await deferToThread(a.result) == (grpc.StatusCode.OK, "")
    assert await deferToThread(c.result) == (grpc.StatusCode.OK, "")
    sidecars = await first.archived(2)
    assert_in_one_recording_or_both(sidecars, "a", 0, agent)
    [owners] = [s for s in sidecars if any(g["segmentId"] == "c" for g in s["segments"])]
    assert_segment_exact(owners, "c", 1, contact)
    [taken] = [s for s in sidecars if s is not owners]
    assert taken["complete"] is True  # the segment started again there, and stopped


@pytest_twisted.ensureDeferred
async def test_a_finished_relayed_stream_is_taken_over_when_the_owner_stops_confirming(
        recorder_factory, monkeypatch):
    """The relayed stream ends while the owner is hung: it sends nothing more, so no count
    of messages can tell; after the acknowledgement timeout the tail is recorded here."""
    from evrecorder import relay

    monkeypatch.setattr(relay, "ACK_TIMEOUT_SECONDS", 2.0)
    contact, agent = chunks(6, 69), chunks(12, 70)
    first, second, c, a = await split_dialog(recorder_factory, "late-g1", drain_timeout=5.0)
    a.send(*[media("a", i + 1, agent[i], session_id="s-2") for i in range(6)])
    await until(lambda: len(first.service._relay_conns()) == 1, what="the relay")
    await sleep(0.3)
    [owned] = first.service._relay_conns()
    owned.transport.stopReading()  # hung
    a.send(*[media("a", i + 1, agent[i], session_id="s-2") for i in range(6, 12)],
           segment_stop("a", session_id="s-2"))
    a.close()
    assert await deferToThread(a.result) == (grpc.StatusCode.OK, "")
    assert second.service.registry.remote_calls  # a drain would wait for its tail
    await until(lambda: second.service.registry.calls, what="the take-over")
    assert not second.service.registry.remote_calls
    owned.transport.startReading()
    c.send(*[media("c", i + 1, contact[i]) for i in range(6)], segment_stop("c"))
    c.close()
    assert await deferToThread(c.result) == (grpc.StatusCode.OK, "")
    sidecars = await first.archived(2)
    assert_in_one_recording_or_both(sidecars, "a", 0, agent)
    [taken] = [s for s in sidecars if not any(g["segmentId"] == "c" for g in s["segments"])]
    assert taken["complete"] is True and [s["sessionId"] for s in taken["streams"]] == ["s-2"]


@pytest_twisted.ensureDeferred
async def test_no_empty_recording_when_only_the_end_was_unconfirmed(recorder_factory):
    """The owner's relay breaks when only the stream's SegmentStop and end are unconfirmed:
    no second, empty recording is made here; the owner's one holds every chunk."""
    contact, agent = chunks(5, 71), chunks(5, 72)
    first, second, c, a = await split_dialog(recorder_factory, "end-g1")
    a.send(*[media("a", i + 1, agent[i], session_id="s-2") for i in range(5)])
    await until(lambda: len(first.service._relay_conns()) == 1, what="the relay")
    await until(lambda: [r._sent for r in second.service.registry.remote_calls] == [6]
                and not any(r._unacked for r in second.service.registry.remote_calls),
                what="every chunk confirmed")
    [owned] = first.service._relay_conns()
    owned.transport.stopReading()
    a.send(segment_stop("a", session_id="s-2"))
    a.close()
    assert await deferToThread(a.result) == (grpc.StatusCode.OK, "")
    owned.transport.abortConnection()  # the relay breaks before the end is confirmed
    await until(lambda: not second.service.registry.remote_calls, what="the relay to close")
    c.send(*[media("c", i + 1, contact[i]) for i in range(5)], segment_stop("c"))
    c.close()
    assert await deferToThread(c.result) == (grpc.StatusCode.OK, "")
    [sidecar] = await first.archived()
    await sleep(0.5)
    assert len(await first.archived()) == 1 and not second.service.registry.calls
    assert_segment_exact(sidecar, "a", 0, agent)
    assert_segment_exact(sidecar, "c", 1, contact)
    assert sidecar["complete"] is False  # the agent's stream never said its segment stopped


# -- two twistd processes on one port ---------------------------------------------

def _sidecars(tmp_path) -> list[dict]:
    found = []
    for path in sorted(glob.glob(str(tmp_path / "archive" / "**" / "*.json"), recursive=True)):
        with open(path) as f:
            side = json.load(f)
        side["_wav"] = path[:-5] + ".wav"
        found.append(side)
    return found


@pytest_twisted.ensureDeferred
async def test_two_processes_share_a_grpc_port_and_keep_split_dialogs_whole(tmp_path):
    """--reuse-port: 12 dialogs, each a contact stream and an agent stream on their own
    connections, spread by the kernel over two processes; every dialog is one
    exact recording."""
    port, gport = free_port(), free_port()
    grpc_opts = ("--reuse-port", "--grpc-listen", f"tcp:{gport}:interface=127.0.0.1",
                 "--reconnect-grace", "1")
    procs = [start_twistd(tmp_path, port, f"g{i}", *grpc_opts) for i in range(2)]
    try:
        await until_process(lambda: listening(gport), what="the recorders to listen")
        await sleep(1.0)  # both bound
        assert all(p.poll() is None for p in procs)
        dialogs = {}
        for n in range(12):
            dialog_id = f"rp-g{n}"
            contact, agent = chunks(10, 100 + n), chunks(10, 200 + n)
            dialogs[dialog_id] = (contact_stream(gport, dialog_id), agent_stream(gport, dialog_id),
                                  contact, agent)
        await sleep(1.0)  # every dialog set up; then the audio
        for c, a, contact, agent in dialogs.values():
            c.send(*[media("c", i + 1, contact[i]) for i in range(10)], segment_stop("c"))
            a.send(*[media("a", i + 1, agent[i], session_id="s-2") for i in range(10)],
                   segment_stop("a", session_id="s-2"))
        await sleep(0.5)
        for c, a, _, _ in dialogs.values():
            a.close()
            c.close()
        for c, a, _, _ in dialogs.values():
            assert await deferToThread(a.result) == (grpc.StatusCode.OK, "")
            assert await deferToThread(c.result) == (grpc.StatusCode.OK, "")
        await until_process(lambda: len(_sidecars(tmp_path)) >= 12, timeout=60, what="12 recordings",
                    logs=[tmp_path / f"g{i}.log" for i in range(2)])
        await sleep(0.5)
        found = {}
        for side in _sidecars(tmp_path):
            found.setdefault(side["callId"], []).append(side)
        assert sorted(found) == sorted(dialogs) and all(len(v) == 1 for v in found.values())
        for dialog_id, [side] in found.items():
            _, _, contact, agent = dialogs[dialog_id]
            assert side["complete"] is True, dialog_id
            assert sorted(s["sessionId"] for s in side["streams"]) == ["s-1", "s-2"]
            assert_segment_exact(side, "a", 0, agent)
            assert_segment_exact(side, "c", 1, contact)
        logs = [(tmp_path / f"g{i}.log").read_text() for i in range(2)]
        assert all("started" in log for log in logs), "the kernel gave one process every dialog"
        assert any("this stream is relayed to it" in log for log in logs)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)


@pytest_twisted.ensureDeferred
async def test_owner_killed_while_a_relayed_stream_ends_loses_no_chunk(tmp_path):
    """kill -9 of the process recording a dialog while a sibling relays a stream
    whose end it never confirmed: the sibling records the unconfirmed tail, the
    restarted owner recovers its part; every agent chunk is in a recording, exact."""
    from test_grpc_process import spooled_chunks

    port_a, port_b, gport_a, gport_b = free_port(), free_port(), free_port(), free_port()
    proc_a = start_twistd(tmp_path, port_a, "a", "--grpc-listen",
                          f"tcp:{gport_a}:interface=127.0.0.1", "--reconnect-grace", "1")
    proc_b = start_twistd(tmp_path, port_b, "b", "--grpc-listen",
                          f"tcp:{gport_b}:interface=127.0.0.1", "--reconnect-grace", "1")
    procs = [proc_a, proc_b]
    logs = [tmp_path / f"{name}.log" for name in ("a", "b", "a-again")]
    try:
        await until_process(lambda: listening(gport_a) and listening(gport_b),
                            what="both recorders", logs=logs)
        contact, agent = chunks(20, 67), chunks(20, 68)
        c = contact_stream(gport_a, "kill-g1")
        await until_process(lambda: spooled_chunks(tmp_path / "spool") == 0 and
                            glob.glob(str(tmp_path / "spool" / "owners" / "*")),
                            what="the first recorder to claim the dialog", logs=logs)
        a = agent_stream(gport_b, "kill-g1")
        for i in range(10):  # in real time: no pause, no burst
            c.send(media("c", i + 1, contact[i]))
            a.send(media("a", i + 1, agent[i], session_id="s-2"))
            await sleep(0.1)
        await until_process(lambda: spooled_chunks(tmp_path / "spool") == 20,
                            what="the first half on the owner's disk", logs=logs)
        # The owner stalls: the rest of the agent's stream is relayed, never confirmed ...
        proc_a.send_signal(signal.SIGSTOP)
        for i in range(10, 20):
            a.send(media("a", i + 1, agent[i], session_id="s-2"))
            await sleep(0.1)
        a.send(segment_stop("a", session_id="s-2"))
        a.close()
        assert await deferToThread(a.result) == (grpc.StatusCode.OK, "")
        # ... and then it dies.
        proc_a.send_signal(signal.SIGKILL)
        proc_a.wait(timeout=10)
        assert (await deferToThread(c.result))[0] == grpc.StatusCode.UNAVAILABLE
        proc_a = start_twistd(tmp_path, port_a, "a-again")
        procs.append(proc_a)
        await until_process(lambda: len(_sidecars(tmp_path)) >= 2, timeout=60,
                            what="the recovered and the continued recording", logs=logs)
        await sleep(0.5)
        sidecars = _sidecars(tmp_path)
        assert len(sidecars) == 2
        assert sorted(s["endReason"] for s in sidecars) == ["recovered", "stop"]
        assert_in_one_recording_or_both(sidecars, "a", 0, agent)
        [recovered] = [s for s in sidecars if s["endReason"] == "recovered"]
        assert_segment_exact(recovered, "c", 1, contact[:10])
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)
