"""A gRPC spool entry left by a crash, recovered and archived by a real recorder service."""

from __future__ import annotations

import re

import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from grpc_entry import T0, Entry, decode, read_wav, tone
from test_operate import metric


@pytest_twisted.ensureDeferred
async def test_a_crashed_grpc_entry_is_recovered_archived_and_counted(tmp_path, recorder_factory):
    """At start the archiver finalizes a crashed gRPC entry ("recovered"), logs it, counts it."""
    e = Entry(tmp_path / "r")
    c = e.segment("c", "CONTACT", "contact-1")
    a = e.segment("a", "AGENT", "agent-7")
    caller = {s: tone(800, s) for s in range(1, 21)}
    agent = {s: tone(800, 100 + s) for s in range(1, 11)}
    for s, p in caller.items():
        if s != 4:  # one missing
            e.chunk(c, s, T0 + s * 0.1, p)
    for s, p in agent.items():
        e.chunk(a, s, T0 + s * 0.1 + (0.15 if s == 2 else 0), p)  # one reordered
    e.write_chunks()
    e.entry.close()
    e.entry.unlock()  # the crashed process's lock is gone
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        rec = await recorder_factory(subdir="r", metrics=True)
        [sidecar] = await rec.archived()
        _, text = await rec.http_get("/metrics")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert sidecar["source"] == "grpc" and sidecar["endReason"] == "recovered"
    assert sidecar["complete"] is False
    _, left, right = read_wav(sidecar["_wav"])
    assert right == decode(b"".join(b"\xff" * 800 if s == 4 else caller[s] for s in caller), "PCMU")
    assert left == decode(b"".join(agent.values()), "PCMU") + [0] * 8000
    log = "\n".join(formatEvent(ev) for ev in seen)
    assert re.search(r"archived dlg-1/sess-1 as \S+dlg-1-sess-1 to file://\S+: 2\.0 s, "
                     r"endReason recovered, agent 10 frames \(0 missing\), "
                     r"caller 19 frames \(1 missing\)", log), log
    assert metric(text, "evrecorder_placement_frames_total", counter="missing",
                  perspective="Conference") == 1
    assert metric(text, "evrecorder_placement_frames_total", counter="reordered",
                  perspective="Participant") == 1
    assert metric(text, "evrecorder_calls_archived_total", end_reason="recovered") == 1
