"""Plain-object tests of gRPC dialogs: spool format, refusals, ending rules, capacity, spool failures."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from twisted.internet.task import Clock

from evrecorder.call import CallRegistry
from evrecorder.chunkfile import CHUNK_RECORD, CHUNKS_FILE, pack_chunk, read_chunks
from evrecorder.errors import KINDS, CallRejected
from evrecorder.protocol import CLOSE_CODES
from evrecorder.settings import Settings
from evrecorder.spool import Spool

T0 = 1_700_000_000.0
CONTACT = {"id": "c-1", "type": "CONTACT", "name": None}
AGENT = {"id": "a-7", "type": "AGENT", "name": "Ann"}
PCMU = {"codec": "PCMU", "rate": 8000, "ptime": 100}
QUEUE = {"id": "q-1", "type": "QUEUE"}
METADATA = {"account": {"id": "acc"}, "dialog": {"id": "d1", "type": "INBOUND"}}


class FakeConn:
    """A stream as the door holds it: records what the dialog tells it."""

    def __init__(self):
        self.ended = []

    def end_call(self, code, reason):
        self.ended.append((code, reason))


def make_registry(root, **kw):
    clock = Clock()
    clock.advance(T0)
    ended = []
    spool = Spool(str(root))
    spool.prepare()
    settings = Settings(spool=spool.root, **kw)
    return clock, CallRegistry(spool, settings, clock, ended.append), ended


def join(reg, conn, dialog_id="d1", session_id="s1", account_id="acc", at=None):
    return reg.join_dialog(
        conn, account_id=account_id, dialog_id=dialog_id, session_id=session_id,
        metadata=METADATA, connected_at=reg.clock.seconds() if at is None else at,
    )


def events(dialog):
    return dialog.spool.read_events()


def chunks(dialog):
    return list(read_chunks(os.path.join(dialog.spool.path, CHUNKS_FILE)))


def entries(reg):
    return sorted(os.listdir(reg.spool.calls_dir))


# -- the spool format ------------------------------------------------------------

def test_a_dialog_writes_header_events_and_chunks_as_the_contract_says(tmp_path):
    """call.json, events.jsonl and call.chunks of a two-segment dialog are exactly the contract's."""
    clock, reg, ended = make_registry(tmp_path / "spool")
    conn = FakeConn()
    d = join(reg, conn, at=T0 - 0.5)
    d.segment_start(conn, "seg-c", CONTACT, None, PCMU, T0 + 0.01)
    d.segment_start(conn, "seg-a", AGENT, QUEUE, None, T0 + 0.02)
    sent = [(0, 1, T0 + 0.1, 100, b"\x11" * 800), (1, 7, T0 + 0.11, 100, b"\x22" * 800),
            (0, 2, T0 + 0.2, 100, b"\x13" * 800), (1, 8, T0 + 0.21, 20, b"")]
    ids = {0: "seg-c", 1: "seg-a"}
    for index, seq, at, dur, payload in sent[:2]:
        d.segment_media(conn, ids[index], seq, dur, payload, at)
    d.flush()
    for index, seq, at, dur, payload in sent[2:]:
        d.segment_media(conn, ids[index], seq, dur, payload, at)
    d.segment_info(conn, "seg-c", "hold", None, T0 + 0.3)
    d.segment_info(conn, "seg-c", "unhold", "x=1", T0 + 0.4)
    d.segment_stop(conn, "seg-a", T0 + 0.5)
    d.segment_stop(conn, "seg-c", T0 + 0.6)
    d.flush()
    d.stream_closed(conn, cancelled=False, at=T0 + 0.7)

    with open(os.path.join(d.spool.path, "call.json")) as f:
        assert json.load(f) == {
            "source": "grpc", "callId": "d1", "sessionId": "s1", "accountId": "acc",
            "metadata": METADATA, "query": {}, "connectedAt": T0 - 0.5, "createdAt": T0,
            "maxCallDuration": 14400.0,
        }
    assert events(d) == [
        {"event": "stream", "stream": 0, "sessionId": "s1", "at": T0 - 0.5},
        {"event": "segment", "segment": 0, "stream": 0, "segmentId": "seg-c",
         "participant": CONTACT, "product": None, "audioFormat": PCMU, "channel": "caller",
         "at": T0 + 0.01},
        {"event": "segment", "segment": 1, "stream": 0, "segmentId": "seg-a",
         "participant": AGENT, "product": QUEUE, "audioFormat": None, "channel": "agent",
         "at": T0 + 0.02},
        {"event": "segmentInfo", "segment": 0, "name": "hold", "data": None, "at": T0 + 0.3},
        {"event": "segmentInfo", "segment": 0, "name": "unhold", "data": "x=1", "at": T0 + 0.4},
        {"event": "segmentStop", "segment": 1, "at": T0 + 0.5},
        {"event": "segmentStop", "segment": 0, "at": T0 + 0.6},
        {"event": "streamEnd", "stream": 0, "at": T0 + 0.7, "reason": "stop", "detail": None},
    ]
    assert chunks(d) == sent
    with open(os.path.join(d.spool.path, CHUNKS_FILE), "rb") as f:
        assert f.read() == b"".join(pack_chunk(*c) for c in sent)
    assert not os.path.exists(os.path.join(d.spool.path, "call.frames"))
    assert d.chunks_by_channel == {"agent": 2, "caller": 2}
    assert d.bytes_by_channel == {"agent": 800, "caller": 1600}

    clock.advance(d._settings.reconnect_grace)
    assert ended == [d] and d.end_reason == "stop" and d.complete and reg.calls == {}
    # Stamped when the last stream closed: the grace is the recorder's wait.
    assert events(d)[-1] == {"event": "end", "reason": "stop", "complete": True,
                             "at": T0 + 0.7}
    assert conn.ended == []  # its stream had closed: the door answered it already


def test_channels_follow_the_participant_type(tmp_path):
    """AGENT is the agent channel; CONTACT, BOT, unspecified and unknown types are the caller's."""
    clock, reg, _ = make_registry(tmp_path / "spool")
    conn = FakeConn()
    d = join(reg, conn)
    types = ["BOT", "PARTICIPANT_TYPE_UNSPECIFIED", "9", "AGENT", "CONTACT"]
    for n, kind in enumerate(types):
        d.segment_start(conn, f"s{n}", {"id": str(n), "type": kind, "name": None}, None, None,
                        T0)
    got = [(e["segment"], e["channel"]) for e in events(d) if e["event"] == "segment"]
    assert got == [(0, "caller"), (1, "caller"), (2, "caller"), (3, "agent"), (4, "caller")]


def test_segment_chunks_carry_their_index_across_streams(tmp_path):
    """A new stream that reuses a segment id gets a new segment index; chunks name that index."""
    clock, reg, _ = make_registry(tmp_path / "spool")
    first, second = FakeConn(), FakeConn()
    d = join(reg, first)
    d.segment_start(first, "x", CONTACT, None, None, T0)
    d.segment_media(first, "x", 5, 100, b"\x01", T0 + 0.1)
    assert join(reg, second, session_id="s2") is d
    d.segment_start(second, "x", CONTACT, None, None, T0 + 0.2)
    d.segment_media(second, "x", 5, 100, b"\x02", T0 + 0.3)
    d.segment_media(first, "x", 6, 100, b"\x03", T0 + 0.4)
    d.flush()
    assert [(c[0], c[1], c[4]) for c in chunks(d)] == [(0, 5, b"\x01"), (1, 5, b"\x02"),
                                                       (0, 6, b"\x03")]
    segs = [(e["segment"], e["stream"]) for e in events(d) if e["event"] == "segment"]
    assert segs == [(0, 0), (1, 1)]
    assert [e["sessionId"] for e in events(d) if e["event"] == "stream"] == ["s1", "s2"]


def test_oversized_duration_is_clamped_in_the_record(tmp_path):
    """A duration beyond the record's 16 bits is kept as 65535 ms, as pack_chunk does."""
    clock, reg, _ = make_registry(tmp_path / "spool")
    conn = FakeConn()
    d = join(reg, conn)
    d.segment_start(conn, "x", CONTACT, None, None, T0)
    d.segment_media(conn, "x", 0, 70000, b"\x01", T0)
    d.flush()
    assert chunks(d) == [(0, 0, T0, 0xFFFF, b"\x01")]


# -- refusals --------------------------------------------------------------------

def refused(kind, f, *args):
    with pytest.raises(CallRejected) as e:
        f(*args)
    assert e.value.kind == kind, e.value.reason
    return e.value.reason


def test_each_refusal_has_its_kind_and_the_dialog_keeps_recording(tmp_path):
    """Unknown segment, stopped segment, repeated start with other fields: precondition;
    seq out of range, oversized payload: invalid; nothing refused is spooled."""
    clock, reg, _ = make_registry(tmp_path / "spool")
    conn, other = FakeConn(), FakeConn()
    d = join(reg, conn)
    join(reg, other, session_id="s2")
    d.segment_start(conn, "a", AGENT, None, PCMU, T0)
    d.segment_start(conn, "a", AGENT, None, PCMU, T0)  # equal: ignored
    refused("precondition", d.segment_start, conn, "a", CONTACT, None, PCMU, T0)
    refused("precondition", d.segment_media, conn, "nope", 1, 100, b"\x01", T0)
    refused("precondition", d.segment_media, other, "a", 1, 100, b"\x01", T0)  # not its stream
    refused("precondition", d.segment_info, conn, "nope", "hold", None, T0)
    refused("precondition", d.segment_stop, other, "a", T0)
    refused("invalid", d.segment_media, conn, "a", -1, 100, b"\x01", T0)
    refused("invalid", d.segment_media, conn, "a", 2**32, 100, b"\x01", T0)
    refused("invalid", d.segment_media, conn, "a", 1, 100, b"\x01" * 65536, T0)
    d.segment_media(conn, "a", 2**32 - 1, 100, b"\x01" * 65535, T0)  # the largest allowed
    d.segment_stop(conn, "a", T0)
    d.segment_stop(conn, "a", T0)  # a repeat changes nothing
    reason = refused("precondition", d.segment_media, conn, "a", 3, 100, b"\x01", T0)
    assert "after its SegmentStop" in reason
    d.segment_info(conn, "a", "late-note", None, T0)  # info about a stopped segment is kept
    d.flush()
    assert [(c[0], c[1], len(c[4])) for c in chunks(d)] == [(0, 2**32 - 1, 65535)]
    assert [e["event"] for e in events(d)] == [
        "stream", "stream", "segment", "segmentStop", "segmentInfo"]
    # The stream that was refused closes: its end says why.
    d.stream_closed(conn, cancelled=True, at=T0 + 1)
    assert events(d)[-1] == {"event": "streamEnd", "stream": 0, "at": T0 + 1, "reason": "error",
                             "detail": reason}
    d.stream_closed(other, cancelled=True, at=T0 + 2, error="a message over the size limit")
    assert events(d)[-1]["detail"] == "a message over the size limit"
    refused("precondition", d.segment_media, conn, "a", 4, 100, b"\x01", T0)  # closed stream


def test_too_many_segments_are_unsupported(tmp_path, monkeypatch):
    """The segment index has 16 bits: the 65537th segment of a dialog is refused as unsupported."""
    import evrecorder.dialog as dialog_mod

    monkeypatch.setattr(dialog_mod, "MAX_SEGMENTS", 2)  # the same check, three segments
    clock, reg, _ = make_registry(tmp_path / "spool")
    conn = FakeConn()
    d = join(reg, conn)
    for n in range(3):
        d.segment_start(conn, str(n), CONTACT, None, None, T0)
    refused("unsupported", d.segment_start, conn, "3", CONTACT, None, None, T0)


def test_every_kind_has_a_websocket_close_code():
    """The WebSocket door maps every kind of refusal to its close code."""
    assert CLOSE_CODES == {"invalid": 1007, "unsupported": 1003, "precondition": 1008,
                           "capacity": 1013, "internal": 1011}
    assert set(CLOSE_CODES) == set(KINDS)


# -- ending ----------------------------------------------------------------------

def test_normal_close_with_every_segment_stopped_waits_the_grace_then_stop(tmp_path):
    """All segments stopped and the stream closed normally: complete, after exactly the grace."""
    clock, reg, ended = make_registry(tmp_path / "spool", reconnect_grace=10.0)
    conn = FakeConn()
    d = join(reg, conn)
    d.segment_start(conn, "a", AGENT, None, None, T0)
    d.segment_stop(conn, "a", T0)
    clock.advance(3)
    d.stream_closed(conn, cancelled=False, at=clock.seconds())
    clock.advance(9.99)
    assert not d.ended and reg.calls
    clock.advance(0.01)
    assert d.end_reason == "stop" and d.complete and ended == [d]


def test_the_stream_that_ended_last_by_its_time_decides_the_end(tmp_path):
    """A relayed stream's normal end heard after a local stream's cancel, though it came
    first: the dialog's last stream was cancelled, so "disconnect", ended at the cancel."""
    clock, reg, ended = make_registry(tmp_path / "spool", reconnect_grace=1.0)
    local, relayed = FakeConn(), FakeConn()
    d = join(reg, local)
    join(reg, relayed, session_id="s2")
    d.segment_start(local, "c", CONTACT, None, None, T0)
    d.segment_start(relayed, "a", AGENT, None, None, T0)
    d.segment_stop(local, "c", T0)
    d.segment_stop(relayed, "a", T0)
    d.stream_closed(local, cancelled=True, at=T0 + 10.0)
    d.stream_closed(relayed, cancelled=False, at=T0 + 9.99)  # heard a moment later
    clock.advance(1.0)
    assert d.end_reason == "disconnect" and ended == [d]
    assert events(d)[-1]["at"] == T0 + 10.0


def test_cancel_ends_disconnect_after_the_grace(tmp_path):
    """A cancelled stream with segments running: "disconnect", incomplete, after the grace."""
    clock, reg, ended = make_registry(tmp_path / "spool", reconnect_grace=10.0)
    conn = FakeConn()
    d = join(reg, conn)
    d.segment_start(conn, "a", AGENT, None, None, T0)
    d.stream_closed(conn, cancelled=True, at=T0)
    clock.advance(9.9)
    assert not d.ended
    clock.advance(0.1)
    assert d.end_reason == "disconnect" and not d.complete and ended == [d]
    assert events(d)[-2:] == [
        {"event": "streamEnd", "stream": 0, "at": T0, "reason": "disconnect", "detail": None},
        {"event": "end", "reason": "disconnect", "complete": False, "at": T0},
    ]
    assert conn.ended == []


def test_normal_close_with_a_segment_running_is_a_disconnect(tmp_path):
    """A normal close while a segment never stopped is not complete: "disconnect"."""
    clock, reg, ended = make_registry(tmp_path / "spool", reconnect_grace=5.0)
    conn = FakeConn()
    d = join(reg, conn)
    d.segment_start(conn, "a", AGENT, None, None, T0)
    d.segment_start(conn, "c", CONTACT, None, None, T0)
    d.segment_stop(conn, "a", T0)
    d.stream_closed(conn, cancelled=False, at=T0)
    clock.advance(5)
    assert d.end_reason == "disconnect"


def test_a_cancelled_stream_leaves_its_segments_unstopped_for_good(tmp_path):
    """Stream 0 cancelled mid-segment, stream 1 complete: the dialog is still incomplete."""
    clock, reg, ended = make_registry(tmp_path / "spool", reconnect_grace=5.0)
    a, b = FakeConn(), FakeConn()
    d = join(reg, a)
    d.segment_start(a, "x", CONTACT, None, None, T0)
    d.stream_closed(a, cancelled=True, at=T0)
    assert join(reg, b, session_id="s2") is d
    d.segment_start(b, "x", CONTACT, None, None, T0)
    d.segment_stop(b, "x", T0)
    d.stream_closed(b, cancelled=False, at=T0)
    clock.advance(5)
    assert d.end_reason == "disconnect"


def test_the_last_stream_to_close_decides(tmp_path):
    """Two streams, all segments stopped: the one that closes last closing normally makes "stop"."""
    clock, reg, ended = make_registry(tmp_path / "spool", reconnect_grace=5.0)
    a, b = FakeConn(), FakeConn()
    d = join(reg, a)
    join(reg, b, session_id="s2")
    d.segment_start(a, "x", CONTACT, None, None, T0)
    d.segment_stop(a, "x", T0)
    d.stream_closed(a, cancelled=True, at=T0)
    clock.advance(20)  # one stream still open: no grace runs
    assert not d.ended
    d.stream_closed(b, cancelled=False, at=clock.seconds())
    clock.advance(5)
    assert d.end_reason == "stop"


def test_a_stream_within_the_grace_joins_after_it_a_new_recording(tmp_path):
    """A second stream inside the grace joins the same recording; after the grace it makes a new one."""
    clock, reg, ended = make_registry(tmp_path / "spool", reconnect_grace=10.0)
    first, second, third = FakeConn(), FakeConn(), FakeConn()
    d = join(reg, first)
    d.segment_start(first, "a", AGENT, None, None, T0)
    d.segment_stop(first, "a", T0)
    d.stream_closed(first, cancelled=False, at=T0)
    clock.advance(9.9)
    again = join(reg, second, session_id="s2")
    assert again is d and len(entries(reg)) == 1
    clock.advance(5)  # past the first grace: the new stream holds it open
    assert not d.ended
    d.segment_start(second, "b", AGENT, None, None, clock.seconds())
    d.segment_stop(second, "b", clock.seconds())
    d.stream_closed(second, cancelled=False, at=clock.seconds())
    clock.advance(10)
    assert ended == [d] and d.end_reason == "stop"
    assert [(e["event"], e.get("stream")) for e in events(d) if "stream" in e["event"]] == [
        ("stream", 0), ("streamEnd", 0), ("stream", 1), ("streamEnd", 1)]
    fresh = join(reg, third, session_id="s3")
    assert fresh is not d and len(entries(reg)) == 2
    assert events(fresh)[0] == {"event": "stream", "stream": 0, "sessionId": "s3",
                                "at": clock.seconds()}
    refused("precondition", d.segment_start, second, "c", AGENT, None, None, T0)


def test_idle_timeout_ends_the_dialog_and_its_open_streams(tmp_path):
    """No event for idle_timeout: "timeout", each open stream told (1001) and ended in the spool."""
    clock, reg, ended = make_registry(tmp_path / "spool", idle_timeout=30.0)
    a, b = FakeConn(), FakeConn()
    d = join(reg, a)
    join(reg, b, session_id="s2")
    d.segment_start(a, "x", CONTACT, None, None, T0)
    clock.advance(20)
    d.segment_media(a, "x", 1, 100, b"\x01", clock.seconds())  # activity moves the deadline
    clock.advance(29.9)
    assert not d.ended
    clock.advance(0.1)
    assert d.end_reason == "timeout" and ended == [d]
    assert a.ended == b.ended == [(1001, "call ended: timeout")]
    now = clock.seconds()
    assert events(d)[-3:] == [
        {"event": "streamEnd", "stream": 0, "at": now, "reason": "timeout", "detail": None},
        {"event": "streamEnd", "stream": 1, "at": now, "reason": "timeout", "detail": None},
        {"event": "end", "reason": "timeout", "complete": False, "at": now},
    ]
    assert chunks(d) == [(0, 1, T0 + 20, 100, b"\x01")]  # collected chunks written at the end
    d.stream_closed(a, cancelled=True, at=now)  # the door's late report changes nothing
    assert events(d)[-1]["event"] == "end"
    refused("precondition", d.segment_media, a, "x", 2, 100, b"\x01", now)


def test_the_grace_not_the_idle_timeout_ends_a_dialog_without_streams(tmp_path):
    """With idle_timeout shorter than the grace, a dialog whose streams closed still waits the grace."""
    clock, reg, ended = make_registry(tmp_path / "spool", idle_timeout=2.0, reconnect_grace=5.0)
    conn = FakeConn()
    d = join(reg, conn)
    d.segment_start(conn, "a", AGENT, None, None, T0)
    d.segment_stop(conn, "a", T0)
    d.stream_closed(conn, cancelled=False, at=T0)
    clock.advance(4.9)
    assert not d.ended
    clock.advance(0.1)
    assert d.end_reason == "stop" and d.complete


def test_max_duration_cuts_the_dialog(tmp_path):
    """A dialog that keeps streaming is cut at max_call_duration ("max-duration")."""
    clock, reg, ended = make_registry(tmp_path / "spool", max_call_duration=60.0)
    conn = FakeConn()
    d = join(reg, conn)
    d.segment_start(conn, "x", CONTACT, None, None, T0)
    for seq in range(59):
        clock.advance(1)
        d.segment_media(conn, "x", seq, 100, b"\x01", clock.seconds())
    assert not d.ended
    clock.advance(1)
    assert d.end_reason == "max-duration" and conn.ended == [(1001, "call ended: max-duration")]


def test_end_all_shuts_dialogs_and_calls_down(tmp_path):
    """end_all("shutdown") ends dialogs beside WebSocket calls."""
    clock, reg, ended = make_registry(tmp_path / "spool")
    conn, ws = FakeConn(), FakeConn()
    d = join(reg, conn)
    call = reg.join(ws, "c1", "1", {}, {}, clock.seconds())
    reg.end_all("shutdown")
    assert d.end_reason == call.end_reason == "shutdown" and set(ended) == {d, call}
    assert conn.ended == [(1001, "call ended: shutdown")]
    assert events(d)[-1] == {"event": "end", "reason": "shutdown", "complete": False,
                             "at": clock.seconds()}


def test_shutdown_during_the_grace_keeps_a_finished_dialog_complete(tmp_path):
    """A dialog waiting the grace after a complete stream ends "stop" at shutdown; a cancelled one "disconnect"."""
    clock, reg, ended = make_registry(tmp_path / "spool", reconnect_grace=10.0)
    good, bad = FakeConn(), FakeConn()
    done = join(reg, good, "d1")
    done.segment_start(good, "a", AGENT, None, None, T0)
    done.segment_stop(good, "a", T0)
    done.stream_closed(good, cancelled=False, at=T0 + 1)
    cut = join(reg, bad, "d2")
    cut.segment_start(bad, "a", AGENT, None, None, T0)
    cut.stream_closed(bad, cancelled=True, at=T0 + 2)
    clock.advance(3)
    reg.end_all("shutdown")
    assert (done.end_reason, done.complete, cut.end_reason) == ("stop", True, "disconnect")
    assert events(done)[-1] == {"event": "end", "reason": "stop", "complete": True, "at": T0 + 1}
    assert events(cut)[-1] == {"event": "end", "reason": "disconnect", "complete": False,
                               "at": T0 + 2}


# -- capacity and keys -----------------------------------------------------------

def test_capacity_counts_calls_and_dialogs_and_keeps_nothing(tmp_path):
    """A new dialog beyond max_calls is refused (capacity, no entry); joining a running one is not."""
    clock, reg, _ = make_registry(tmp_path / "spool", max_calls=2)
    a, b, c, d_ = FakeConn(), FakeConn(), FakeConn(), FakeConn()
    reg.join(a, "c1", "1", {}, {}, clock.seconds())
    dialog = join(reg, b)
    before = entries(reg)
    assert "2 calls" in refused("capacity", join, reg, c, "d2")
    assert entries(reg) == before
    assert join(reg, d_, session_id="s2") is dialog  # a reconnect needs no new slot


def test_dialogs_are_keyed_by_account_and_dialog(tmp_path):
    """The same dialog id in two accounts is two recordings; a WebSocket call id never collides."""
    clock, reg, _ = make_registry(tmp_path / "spool")
    a, b, ws = FakeConn(), FakeConn(), FakeConn()
    one = join(reg, a, "d1", account_id="acc1")
    two = join(reg, b, "d1", account_id="acc2")
    assert one is not two and one.key == ("grpc", "acc1", "d1")
    assert not reg.has_call("grpc", None) and not reg.has_call("acc1", "d1")
    reg.join(ws, "acc1", "d1", {}, {}, clock.seconds())
    assert len(reg.calls) == 3


def test_metrics_count_chunks_by_channel_live_and_after_the_end(tmp_path):
    """Chunks and bytes by channel show in the metrics while the dialog runs and after it ended."""
    clock, reg, _ = make_registry(tmp_path / "spool")
    conn = FakeConn()
    d = join(reg, conn)
    d.segment_start(conn, "a", AGENT, None, None, T0)
    d.segment_start(conn, "c", CONTACT, None, None, T0)
    for seq in range(3):
        d.segment_media(conn, "a", seq, 100, b"\x01" * 800, T0)
    d.segment_media(conn, "c", 0, 100, b"\x01" * 160, T0)
    live = reg.metrics.media_counts()
    assert (live[0]["agent"], live[0]["caller"], live[1]["agent"], live[1]["caller"]) == (
        3, 1, 2400, 160)
    reg.end_all("shutdown")
    assert reg.metrics.media_counts() == live
    assert d.door == "grpc" and d.counts == (d.chunks_by_channel, d.bytes_by_channel)


# -- spool failures --------------------------------------------------------------

def test_a_flush_to_a_descriptor_gone_bad_is_internal_and_keeps_the_rest(tmp_path):
    """A failed write raises "internal"; chunks written before stay, the unwritten ones stay collected."""
    clock, reg, ended = make_registry(tmp_path / "spool")
    conn = FakeConn()
    d = join(reg, conn)
    d.segment_start(conn, "x", CONTACT, None, None, T0)
    d.segment_media(conn, "x", 0, 100, b"\x01" * 800, T0)
    d.flush()
    os.close(d.spool._frames_fd)  # the descriptor is closed underneath
    try:
        d.segment_media(conn, "x", 1, 100, b"\x02" * 800, T0)
        assert "cannot write" in refused("internal", d.flush)
        assert d.spool.pending == CHUNK_RECORD.size + 800
    finally:
        d.spool._frames_fd = None  # the next flush opens the file anew
    d.flush()
    assert [c[1] for c in chunks(d)] == [0, 1]


def test_a_stream_whose_start_cannot_be_written_does_not_join(tmp_path):
    """If a joining stream's event cannot be written, it is refused ("internal") and not attached."""
    clock, reg, _ = make_registry(tmp_path / "spool")
    first, second = FakeConn(), FakeConn()
    d = join(reg, first)
    os.close(d.spool._events_fd)  # the descriptor is closed underneath
    try:
        assert "cannot write" in refused("internal", join, reg, second, "d1", "s2")
    finally:
        d.spool._events_fd = None
    refused("precondition", d.segment_start, second, "x", CONTACT, None, None, T0)
    assert join(reg, second, session_id="s2") is d  # the door may try again: stream 1
    assert [e["stream"] for e in events(d) if e["event"] == "stream"] == [0, 1]


def test_a_new_dialog_whose_first_event_fails_leaves_nothing(tmp_path, monkeypatch):
    """A new dialog whose first event cannot be written is refused and its entry removed."""
    import errno

    from evrecorder.spool import CallSpool

    clock, reg, ended = make_registry(tmp_path / "spool")

    def full(self, event):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CallSpool, "append_event", full)
    assert refused("internal", join, reg, FakeConn()) == "the recorder's spool is full"
    monkeypatch.undo()
    assert entries(reg) == [] and reg.calls == {} and ended == []
    assert reg.metrics._live == {}
    clock.advance(reg.settings.max_call_duration)  # its timer is gone too
    assert ended == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs, so the spool really fills up (ENOSPC)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(path):
    """Fill the filesystem of ``path`` to the last byte."""
    with open(os.path.join(path, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\x00" * 4096)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\x00")
        except OSError:
            pass


def test_a_full_spool_refuses_the_flush_as_internal(small_tmpfs):
    """On a full spool filesystem flush() raises "internal" (spool full); freeing space recovers it."""
    clock, reg, ended = make_registry(small_tmpfs / "spool")
    conn = FakeConn()
    d = join(reg, conn)
    d.segment_start(conn, "x", CONTACT, None, None, T0)
    d.segment_media(conn, "x", 0, 100, b"\x01" * 800, T0)
    d.flush()
    fill(small_tmpfs)
    d.segment_media(conn, "x", 1, 100, b"\x02" * 8000, T0)
    assert refused("internal", d.flush) == "the recorder's spool is full"
    os.unlink(small_tmpfs / "filler")
    d.flush()
    assert [(c[1], len(c[4])) for c in chunks(d)] == [(0, 800), (1, 8000)]


def test_a_dialog_on_a_full_spool_is_refused_and_nothing_is_kept(small_tmpfs):
    """join_dialog on a full spool raises "internal" and leaves no entry and no call slot."""
    clock, reg, ended = make_registry(small_tmpfs / "spool")
    fill(small_tmpfs)
    conn = FakeConn()
    assert refused("internal", join, reg, conn) == "the recorder's spool is full"
    assert entries(reg) == [] and reg.calls == {} and ended == []


def test_append_chunk_collects_exactly_pack_chunk_records(tmp_path):
    """CallSpool.append_chunk collects chunkfile.pack_chunk's bytes and writes them to call.chunks."""
    clock, reg, _ = make_registry(tmp_path / "spool")
    d = join(reg, FakeConn())
    d.spool.append_chunk(3, 2**32 - 1, T0 + 0.25, 100, b"\x7f" * 160)
    d.spool.append_chunk(0, 0, T0, 0x1FFFF, b"")
    assert bytes(d.spool.buffer) == (pack_chunk(3, 2**32 - 1, T0 + 0.25, 100, b"\x7f" * 160)
                                     + pack_chunk(0, 0, T0, 0x1FFFF, b""))
    d.flush()
    assert d.spool.pending == 0
    assert chunks(d) == [(3, 2**32 - 1, T0 + 0.25, 100, b"\x7f" * 160), (0, 0, T0, 0xFFFF, b"")]


# -- the WebSocket door's mapping ------------------------------------------------

def test_a_relayed_join_at_capacity_is_refused_with_1013(tmp_path):
    """The relay's owner side maps the core's "capacity" refusal to close code 1013, as before."""
    import struct

    import orjson
    from twisted.internet.testing import StringTransport

    from evrecorder.relay import RelayServerFactory

    clock, reg, _ = make_registry(tmp_path / "spool", max_calls=1)
    join(reg, FakeConn())  # a dialog takes the only slot
    proto = RelayServerFactory(reg).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    msg = b"J" + orjson.dumps({"callId": "c1", "sessionId": "1", "metadata": {}, "query": {},
                               "connectedAt": T0})
    proto.dataReceived(struct.pack(">I", len(msg)) + msg)
    out = transport.value()
    (size,) = struct.unpack_from(">I", out)
    reply = out[4:4 + size]
    assert reply[:1] == b"E" and struct.unpack_from(">H", reply, 1) == (1013,)
    assert reply[3:] == b"at capacity (1 calls)"
    assert transport.disconnecting


def _relay_messages(transport) -> list[bytes]:
    import struct

    out, msgs = transport.value(), []
    while out:
        (size,) = struct.unpack_from(">I", out)
        msgs.append(out[4:4 + size])
        out = out[4 + size:]
    return msgs


def test_the_owner_confirms_a_relayed_streams_events_counted_after_its_join(tmp_path):
    """On the owner, a relayed gRPC stream's DialogInit (D) is its join, not counted: the
    acknowledgement counts the events after it, as the relaying side does, once they are on disk."""
    import struct

    import orjson
    from twisted.internet.testing import StringTransport

    from evrecorder.relay import _CHUNK, RelayServerFactory

    clock, reg, _ = make_registry(tmp_path / "spool")
    proto = RelayServerFactory(reg).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)

    def send(msg: bytes) -> None:
        proto.dataReceived(struct.pack(">I", len(msg)) + msg)

    send(b"D" + orjson.dumps({"accountId": "acc", "dialogId": "d1", "sessionId": "s9",
                              "metadata": METADATA, "connectedAt": T0}))
    assert _relay_messages(transport) == []  # nothing after the join yet
    send(b"g" + orjson.dumps({"segmentId": "a", "participant": {"id": "p", "type": "AGENT"},
                              "product": None, "audioFormat": PCMU, "at": T0}))
    for seq in (1, 2):
        send(b"m" + _CHUNK.pack(seq, 100, T0 + seq / 10, 1) + b"a" + b"\x11" * 800)
    acks = [struct.unpack_from(">Q", m, 1)[0] for m in _relay_messages(transport) if m[:1] == b"A"]
    assert acks == [1, 2, 3]
    [dialog] = reg.calls.values()
    assert [(c[1], c[2]) for c in chunks(dialog)] == [(1, T0 + 0.1), (2, T0 + 0.2)]
    assert [e["event"] for e in events(dialog)][:2] == ["stream", "segment"]
    assert events(dialog)[0]["sessionId"] == "s9"


def test_a_relayed_streams_bad_input_comes_back_with_its_kinds_close_code(tmp_path):
    """The owner refuses a chunk for a segment the stream never started with the close code
    of "precondition" (1008), which the relaying side maps back to FAILED_PRECONDITION."""
    import struct

    import orjson
    from twisted.internet.testing import StringTransport

    from evrecorder.relay import _CHUNK, KIND_OF_CODE, RelayServerFactory

    clock, reg, _ = make_registry(tmp_path / "spool")
    proto = RelayServerFactory(reg).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    for msg in (b"D" + orjson.dumps({"accountId": "acc", "dialogId": "d1", "sessionId": "s9",
                                     "metadata": METADATA, "connectedAt": T0}),
                b"m" + _CHUNK.pack(1, 100, T0, 4) + b"nope" + b"\x11" * 800):
        proto.dataReceived(struct.pack(">I", len(msg)) + msg)
    [end] = [m for m in _relay_messages(transport) if m[:1] == b"E"]
    (code,) = struct.unpack_from(">H", end, 1)
    assert KIND_OF_CODE[code] == "precondition" and b"nope" in end
    assert transport.disconnecting
    [dialog] = reg.calls.values()
    assert [e["reason"] for e in events(dialog) if e["event"] == "streamEnd"] == ["error"]
