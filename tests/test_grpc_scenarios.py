"""RingCX's dialog shapes over a real gRPC stream, end to end: transfers, a bot,
reordering, codecs, late joiners, holds and stalls, each checked sample for
sample against what the client sent (decoded independently of the recorder)."""

from __future__ import annotations

import time

import grpc
import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from conftest import independent_decode, read_pcm16_wav
from grpcclient import dialog_init, info, media, segment_start, segment_stop, send
from evrecorder.grpcapi import streaming_pb2 as pb
from test_grpc_service import GRACE, chunks

SILENCE = b"\xff"  # mu-law silence


def decode(ulaw: bytes) -> list[int]:
    return independent_decode(ulaw)


def mix(*channels: list[int]) -> list[int]:
    n = max(len(c) for c in channels)
    out = []
    for i in range(n):
        total = sum(c[i] for c in channels if i < len(c))
        out.append(max(-32768, min(32767, total)))
    return out


def paced(port: int, schedule: list[tuple[float, object]]) -> tuple[grpc.StatusCode, str]:
    """Send each event at its time (seconds from the start); blocking, for a thread."""
    start = time.monotonic()

    def events():
        for at, event in schedule:
            wait = start + at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            yield event

    return send(port, events(), timeout=60)


def segment(sidecar: dict, segment_id: str) -> dict:
    [seg] = [s for s in sidecar["segments"] if s["segmentId"] == segment_id]
    return seg


@pytest_twisted.ensureDeferred
async def test_flood_shapes_reorder_warm_transfer_opus_and_info(recorder_factory):
    """Reorder, duplicate and missing seq on the contact; two agents overlapping (mixed);
    an OPUS segment beside (not recorded, counted); SegmentInfo kept."""
    rec = await recorder_factory(grpc_listen=True, reconnect_grace=GRACE)
    contact, agent_a, agent_b = chunks(10, 31), chunks(8, 32), chunks(5, 33)
    order = [1, 2, 4, 3, 5, 5, 6, 8, 9, 10]  # 3/4 swapped, 5 twice, 7 never sent
    events = [
        dialog_init("shapes"),
        segment_start("c", pb.CONTACT), segment_start("a", pb.AGENT, participant_id="A"),
        segment_start("b", pb.AGENT, participant_id="B"),
        segment_start("o", pb.BOT, codec=pb.OPUS, rate=48000, ptime=20),
    ]
    for i, seq in enumerate(order):
        events.append(media("c", seq, contact[seq - 1]))
        if i < 8:
            events.append(media("a", i + 1, agent_a[i]))
        if i < 5:
            events.append(media("b", i + 1, agent_b[i]))
        if i < 3:
            events.append(media("o", i + 1, b"\x01\x02\x03"))
    events += [info("c", "hold"), info("c", "unhold", "after 2 s"),
               segment_stop("a"), segment_stop("b"), segment_stop("c"), segment_stop("o")]
    assert await deferToThread(send, rec.grpc_port, events) == (grpc.StatusCode.OK, "")
    [sidecar] = await rec.archived()
    c = segment(sidecar, "c")
    assert (c["chunks"], c["missing"], c["duplicates"], c["reordered"]) == (9, 1, 1, 1)
    assert [(i["event"], i["data"]) for i in c["info"]] == [("hold", None), ("unhold", "after 2 s")]
    o = segment(sidecar, "o")
    assert o["recorded"] is False and o["chunks"] + o.get("missing", 0) >= 3 and o["reason"]
    left, right = read_pcm16_wav(sidecar["_wav"])
    expected_caller = b"".join(contact[:6]) + SILENCE * 800 + b"".join(contact[7:])
    assert right == decode(expected_caller)
    expected_agent = mix(decode(b"".join(agent_a)), decode(b"".join(agent_b)))
    assert left[:len(expected_agent)] == expected_agent
    assert set(left[len(expected_agent):]) <= {0}


@pytest_twisted.ensureDeferred
async def test_bot_alone_is_the_caller_channel(recorder_factory):
    """A dialog with only a BOT segment: its audio is the caller channel, exact."""
    rec = await recorder_factory(grpc_listen=True, reconnect_grace=GRACE)
    bot = chunks(6, 34)
    events = [dialog_init("bot"), segment_start("b", pb.BOT)]
    events += [media("b", i + 1, bot[i]) for i in range(6)] + [segment_stop("b")]
    assert (await deferToThread(send, rec.grpc_port, events))[0] == grpc.StatusCode.OK
    [sidecar] = await rec.archived()
    assert segment(sidecar, "b")["channel"] == "caller"
    left, right = read_pcm16_wav(sidecar["_wav"])
    assert right == decode(b"".join(bot)) and set(left) == {0}


@pytest_twisted.ensureDeferred
async def test_realtime_late_agent_transfer_hold_and_stall(recorder_factory):
    """In real time, four dialogs at once: an agent joining 2 s late; a transfer (agent A,
    then B 0.5 s after A stopped); a 3 s hold on the contact while the agent streams
    (silence inserted, listed); a 2 s stall then a catch-up burst (no silence)."""
    rec = await recorder_factory(grpc_listen=True, reconnect_grace=GRACE)
    port = rec.grpc_port
    step = 0.1  # 100 ms chunks

    # An agent joining 2 s late.
    late_c, late_a = chunks(30, 41), chunks(10, 42)
    late = [(0, dialog_init("late")), (0, segment_start("c", pb.CONTACT))]
    late += [(i * step, media("c", i + 1, late_c[i])) for i in range(30)]
    late.insert(2 + 20, (2.0, segment_start("a", pb.AGENT)))
    late += [(2.0 + i * step, media("a", i + 1, late_a[i])) for i in range(10)]
    late.sort(key=lambda e: e[0])
    late += [(3.0, segment_stop("a")), (3.0, segment_stop("c"))]

    # A transfer: agent A for 1 s, stop; agent B from 1.5 s for 1 s.
    tr_c, tr_a, tr_b = chunks(25, 43), chunks(10, 44), chunks(10, 45)
    transfer = [(0, dialog_init("transfer")), (0, segment_start("c", pb.CONTACT)),
                (0, segment_start("a", pb.AGENT, participant_id="A"))]
    transfer += [(i * step, media("c", i + 1, tr_c[i])) for i in range(25)]
    transfer += [(i * step, media("a", i + 1, tr_a[i])) for i in range(10)]
    transfer += [(1.0, segment_stop("a")), (1.5, segment_start("b", pb.AGENT, participant_id="B"))]
    transfer += [(1.5 + i * step, media("b", i + 1, tr_b[i])) for i in range(10)]
    transfer.sort(key=lambda e: e[0])
    transfer += [(2.5, segment_stop("b")), (2.5, segment_stop("c"))]

    # A 3 s hold on the contact: 1 s, nothing for 3 s, 1 s more (seq contiguous).
    hold_c, hold_a = chunks(20, 46), chunks(50, 47)
    hold = [(0, dialog_init("hold")), (0, segment_start("c", pb.CONTACT)),
            (0, segment_start("a", pb.AGENT))]
    hold += [((i if i < 10 else i + 30) * step, media("c", i + 1, hold_c[i])) for i in range(20)]
    hold += [(i * step, media("a", i + 1, hold_a[i])) for i in range(50)]
    hold.sort(key=lambda e: e[0])
    hold += [(5.0, segment_stop("a")), (5.0, segment_stop("c"))]

    # A 2 s stall, then the chunks due meanwhile at once, then real time again.
    st_c, st_a = chunks(40, 48), chunks(40, 49)
    stall = [(0, dialog_init("stall")), (0, segment_start("c", pb.CONTACT)),
             (0, segment_start("a", pb.AGENT))]
    stall += [((i * step if not 10 <= i < 30 else 3.0), media("c", i + 1, st_c[i]))
              for i in range(40)]
    stall += [(i * step, media("a", i + 1, st_a[i])) for i in range(40)]
    stall.sort(key=lambda e: e[0])
    stall += [(4.0, segment_stop("a")), (4.0, segment_stop("c"))]

    results = await defer.gatherResults([
        deferToThread(paced, port, late), deferToThread(paced, port, transfer),
        deferToThread(paced, port, hold), deferToThread(paced, port, stall)])
    assert [r[0] for r in results] == [grpc.StatusCode.OK] * 4
    sidecars = {s["callId"]: s for s in await rec.archived(4)}

    s = sidecars["late"]
    offset = segment(s, "a")["offsetSamples"]
    assert abs(offset - 16000) <= 160, offset  # 2 s, give or take a 20 ms frame
    left, right = read_pcm16_wav(s["_wav"])
    assert right == decode(b"".join(late_c))
    assert left[:offset + 8000] == [0] * offset + decode(b"".join(late_a))

    s = sidecars["transfer"]
    b_offset = segment(s, "b")["offsetSamples"]
    assert abs(b_offset - 12000) <= 160, b_offset
    left, right = read_pcm16_wav(s["_wav"])
    assert left[:b_offset + 8000] == (
        decode(b"".join(tr_a)) + [0] * (b_offset - 8000) + decode(b"".join(tr_b)))
    assert right == decode(b"".join(tr_c))

    s = sidecars["hold"]
    [pause] = segment(s, "c")["pauses"]
    assert abs(pause["seconds"] - 3.0) <= 0.1 and pause["atSamples"] == 8000
    gap = round(pause["seconds"] * 8000)
    left, right = read_pcm16_wav(s["_wav"])
    assert right[:16000 + gap] == decode(b"".join(hold_c[:10])) + [0] * gap + decode(
        b"".join(hold_c[10:]))
    assert left == decode(b"".join(hold_a)) + [0] * (len(left) - 40000)
    assert abs(len(left) - 40000) <= 800  # both channels end with the wall clock, within a chunk

    s = sidecars["stall"]
    assert segment(s, "c")["pauses"] == []
    left, right = read_pcm16_wav(s["_wav"])
    assert right == decode(b"".join(st_c)) and left == decode(b"".join(st_a))


