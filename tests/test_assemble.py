"""Finalizing gRPC recordings: placement, timeline, pauses, codecs, mixing, sidecar."""

from __future__ import annotations

import os

from evrecorder.chunkfile import pack_chunk
from grpc_entry import (
    T0, Entry, Timeline, decode, encode_ulaw, read_mulaw_wav, read_wav, sidecar_on_disk, sox_decode, tone,
)


def stream_chunks(e, segment, start_at, count, first_seq=1, ptime=100, seed=0, codec="PCMU",
                  rate=8000, arrival=None):
    """Real-time chunks of one segment; returns the payloads by seq."""
    n = rate * ptime // 1000
    sent = {}
    for k in range(count):
        seq = first_seq + k
        payload = tone(n, seed * 1000 + k, codec)
        at = arrival(k) if arrival else start_at + k * ptime / 1000
        e.chunk(segment, seq, at, payload, duration=ptime)
        sent[seq] = payload
    return sent


def test_contact_and_agent_are_sample_exact(tmp_path):
    """A contact and an agent streaming together: each channel is its segment, exactly."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1")
    a = e.segment("a", "AGENT", "agent-7")
    caller = stream_chunks(e, c, T0 + 0.5, 30, seed=1)
    agent = stream_chunks(e, a, T0 + 0.505, 30, seed=2)
    e.stop(c, T0 + 3.6)
    e.stop(a, T0 + 3.6)
    e.stream_end(0, T0 + 3.7)
    e.end(T0 + 3.7)
    sidecar = e.finalize()
    rate, left, right = read_wav(e.wav_path)
    assert rate == 8000
    assert left == decode(b"".join(agent[s] for s in sorted(agent)), "PCMU")
    assert right == decode(b"".join(caller[s] for s in sorted(caller)), "PCMU")
    assert sidecar == sidecar_on_disk(e)
    assert sidecar["source"] == "grpc" and sidecar["callId"] == "dlg-1"
    assert sidecar["complete"] is True and sidecar["endReason"] == "stop"
    seg = sidecar["segments"]
    assert [s["channel"] for s in seg] == ["caller", "agent"]
    assert seg[0]["chunks"] == 30 and seg[0]["firstSeq"] == 1 and seg[0]["lastSeq"] == 30
    assert seg[1]["offsetSamples"] == 0 and seg[1]["samples"] == 24000
    assert sidecar["audio"]["durationSeconds"] == 3.0


def caller_and_agent(e, caller_start=0.0, agent_start=0.0, caller_count=30, agent_count=30):
    c = e.segment("c", "CONTACT", "contact-1", at=T0 + caller_start)
    a = e.segment("a", "AGENT", "agent-7", at=T0 + agent_start)
    caller = stream_chunks(e, c, T0 + caller_start, caller_count, seed=1)
    agent = stream_chunks(e, a, T0 + agent_start, agent_count, seed=2)
    return c, a, caller, agent


def joined(sent, seqs=None):
    return b"".join(sent[s] for s in (seqs if seqs is not None else sorted(sent)))


def test_agent_joining_two_seconds_late_starts_two_seconds_in(tmp_path):
    """An agent whose first chunk arrives 2 s after the contact's starts at sample 16000."""
    e = Entry(tmp_path)
    _, _, caller, agent = caller_and_agent(e, 0.0, 2.0, caller_count=50, agent_count=30)
    e.end(T0 + 5.1)
    sidecar = e.finalize()
    _, left, right = read_wav(e.wav_path)
    assert left == [0] * 16000 + decode(joined(agent), "PCMU")
    assert right == decode(joined(caller), "PCMU")
    assert [s["offsetSamples"] for s in sidecar["segments"]] == [0, 16000]


def test_offsets_round_to_whole_frames_and_start_at_the_first_audio(tmp_path):
    """Offsets are measured from the first audio, rounded to 20 ms frames (18 ms -> 0, 1.013 s -> 1.02 s)."""
    e = Entry(tmp_path)
    c, a, caller, agent = caller_and_agent(e, 0.3, 0.318, caller_count=20, agent_count=10)
    late = e.segment("b", "BOT", "bot-1")
    bot = stream_chunks(e, late, T0 + 1.313, 5, seed=9)
    sidecar = e.finalize()
    assert [s["offsetSamples"] for s in sidecar["segments"]] == [0, 0, 8160]
    _, left, right = read_wav(e.wav_path)
    want = Timeline()
    want.place(0, decode(joined(caller), "PCMU"))
    want.place(8160, decode(joined(bot), "PCMU"))
    assert right == want.padded(len(right))
    assert left[:8000] == decode(joined(agent), "PCMU")


def test_a_transfer_puts_both_agents_on_the_agent_channel(tmp_path):
    """Agent A, then agent B after a transfer: both on the agent channel, each where it arrived."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1")
    caller = stream_chunks(e, c, T0, 60, seed=1)
    a = e.segment("a", "AGENT", "agent-A")
    first = stream_chunks(e, a, T0, 20, seed=2)
    e.stop(a, T0 + 2.0)
    b = e.segment("b", "AGENT", "agent-B", at=T0 + 2.5)
    second = stream_chunks(e, b, T0 + 2.5, 30, first_seq=0, seed=3)
    sidecar = e.finalize()
    _, left, right = read_wav(e.wav_path)
    assert left == decode(joined(first), "PCMU") + [0] * 4000 + decode(joined(second), "PCMU") + [0] * 4000
    assert right == decode(joined(caller), "PCMU")
    segs = sidecar["segments"]
    assert [(s["participant"]["id"], s["channel"], s["offsetSamples"]) for s in segs] == [
        ("contact-1", "caller", 0), ("agent-A", "agent", 0), ("agent-B", "agent", 20000)]
    assert segs[1]["stopped"] is True and segs[2]["stopped"] is False
    assert segs[2]["firstSeq"] == 0 and segs[2]["lastSeq"] == 29


def test_a_warm_transfer_mixes_the_overlap_clipped(tmp_path):
    """Two agents overlapping: the agent channel is their sum, clipped to int16, exact elsewhere."""
    e = Entry(tmp_path)
    loud_pos = bytes([0x80, 0x81, 0x82, 0x90]) * 200  # near +32124: a sum must clip
    loud_neg = bytes([0x00, 0x01, 0x02, 0x10]) * 200
    a = e.segment("a", "AGENT", "agent-A")
    b = e.segment("b", "AGENT", "agent-B", at=T0 + 1.0)
    sent_a, sent_b = {}, {}
    for k in range(30):
        sent_a[k + 1] = loud_pos if k % 2 else tone(800, k)
        e.chunk(a, k + 1, T0 + k * 0.1, sent_a[k + 1])
    for k in range(30):
        sent_b[k + 1] = loud_pos if k % 3 == 0 else (loud_neg if k % 3 == 1 else tone(800, 50 + k))
        e.chunk(b, k + 1, T0 + 1.0 + k * 0.1, sent_b[k + 1])
    e.finalize()
    _, left, right = read_wav(e.wav_path)
    want = Timeline()
    want.place(0, decode(joined(sent_a), "PCMU"))
    want.place(8000, decode(joined(sent_b), "PCMU"))
    assert left == want.padded(len(left)) and len(left) == 32000
    assert left[:8000] == decode(joined(sent_a), "PCMU")[:8000]  # one agent: exact
    assert left[24000:] == decode(joined(sent_b), "PCMU")[16000:]
    assert 32767 in left[8000:24000]  # the overlap did clip
    assert right == [0] * 32000


def test_a_bot_goes_to_the_caller_channel_and_mixes_with_the_contact(tmp_path):
    """A BOT segment (and an unknown participant type) is on the caller channel, mixed there."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1")
    bot = e.segment("bot", "BOT", "bot-1", at=T0 + 1.0)
    odd = e.segment("x", "7", "who", at=T0 + 3.0)
    caller = stream_chunks(e, c, T0, 40, seed=1)
    said = stream_chunks(e, bot, T0 + 1.0, 10, seed=4)
    other = stream_chunks(e, odd, T0 + 3.0, 5, seed=5)
    sidecar = e.finalize()
    _, left, right = read_wav(e.wav_path)
    want = Timeline()
    want.place(0, decode(joined(caller), "PCMU"))
    want.place(8000, decode(joined(said), "PCMU"))
    want.place(24000, decode(joined(other), "PCMU"))
    assert right == want.padded(len(right))
    assert left == [0] * len(right)
    assert [s["channel"] for s in sidecar["segments"]] == ["caller"] * 3
    assert sidecar["segments"][1]["participant"] == {"id": "bot-1", "type": "BOT", "name": None}


def test_reorder_duplicates_missing_and_late_are_placed_and_counted(tmp_path):
    """Reordered within the window: in place; duplicate: dropped; missing: silence; too late: dropped."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1")
    sent = {seq: tone(800, seq) for seq in range(1, 31)}
    base = T0
    for seq, payload in sent.items():
        if seq == 8:
            continue  # never sent: missing
        at = base + seq * 0.1
        if seq == 4:
            at += 0.15  # after 5
        if seq == 12:
            at += 1.45  # after 26: 14 chunks late, beyond the 10-chunk (1 s) window
        e.chunk(c, seq, at, payload)
    e.chunk(c, 6, base + 0.65, sent[6])  # a duplicate
    sidecar = e.finalize()
    _, _, right = read_wav(e.wav_path)
    silence = b"\xff" * 800
    want = b"".join(silence if s in (8, 12) else sent[s] for s in range(1, 31))
    assert right == decode(want, "PCMU")
    seg = sidecar["segments"][0]
    assert {k: seg[k] for k in ("chunks", "missing", "duplicates", "reordered", "late")} == {
        "chunks": 28, "missing": 2, "duplicates": 1, "reordered": 1, "late": 1}
    assert (seg["firstSeq"], seg["lastSeq"], seg["pauses"]) == (1, 30, [])


def test_a_hold_pause_is_silence_where_it_happened(tmp_path):
    """A 3 s hold (no chunks, seq contiguous after) while the contact streams: 3 s of silence, listed."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1")
    a = e.segment("a", "AGENT", "agent-7")
    caller = stream_chunks(e, c, T0, 80, seed=1)
    held = lambda k: T0 + k * 0.1 + (3.0 if k >= 20 else 0.0)  # noqa: E731
    agent = stream_chunks(e, a, T0, 50, seed=2, arrival=held)
    e.info(a, "hold", None, T0 + 2.0)
    e.info(a, "unhold", "by agent", T0 + 5.0)
    sidecar = e.finalize()
    _, left, right = read_wav(e.wav_path)
    pcm = decode(joined(agent), "PCMU")
    assert left == pcm[:16000] + [0] * 24000 + pcm[16000:]
    assert right == decode(joined(caller), "PCMU")
    seg = sidecar["segments"][1]
    assert seg["pauses"] == [{"atSamples": 16000, "seconds": 3.0}]
    assert seg["samples"] == 64000 and seg["chunks"] == 50 and seg["missing"] == 0
    assert [i["event"] for i in seg["info"]] == ["hold", "unhold"]
    assert sidecar["segments"][0]["pauses"] == []


def test_a_stall_then_a_catch_up_burst_is_not_a_pause(tmp_path):
    """Chunks held back 2 s by the network, then delivered in a burst: placed contiguously."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1")

    def stalled(k):
        if 20 <= k < 40:
            return T0 + 3.98 + (k - 20) * 0.001  # the 2 s held back, in one burst
        return T0 + k * 0.1

    sent = stream_chunks(e, c, T0, 60, seed=1, arrival=stalled)
    sidecar = e.finalize()
    _, _, right = read_wav(e.wav_path)
    assert right == decode(joined(sent), "PCMU")
    assert sidecar["segments"][0]["pauses"] == []


def test_a_stall_only_partly_repaid_inserts_what_was_not(tmp_path):
    """A 3 s gap of which a burst repays 1 s: 2 s of silence (the stream really paused 2 s)."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1")

    def arrival(k):
        if k < 20:
            return T0 + k * 0.1
        if k < 30:
            return T0 + 5.0 + (k - 20) * 0.001  # 1 s of chunks at once, at 5 s
        return T0 + 5.01 + (k - 30) * 0.1  # then real time: 2 s later than without the gap

    sent = stream_chunks(e, c, T0, 60, seed=1, arrival=arrival)
    sidecar = e.finalize()
    _, _, right = read_wav(e.wav_path)
    pcm = decode(joined(sent), "PCMU")
    assert sidecar["segments"][0]["pauses"] == [{"atSamples": 16000, "seconds": 2.0}]
    assert right == pcm[:16000] + [0] * 16000 + pcm[16000:]


def test_twenty_ms_chunks(tmp_path):
    """20 ms chunks: the 50-frame window is 50 chunks (a chunk 30 late is placed), exact channels."""
    e = Entry(tmp_path)
    fmt = {"codec": "PCMU", "rate": 8000, "ptime": 20}
    c = e.segment("c", "CONTACT", "contact-1", audio_format=fmt)
    a = e.segment("a", "AGENT", "agent-7", audio_format=fmt)
    late = lambda k: T0 + k * 0.02 + (0.6 if k == 10 else 0.0)  # noqa: E731
    caller = stream_chunks(e, c, T0, 150, ptime=20, seed=1, arrival=late)
    agent = stream_chunks(e, a, T0 + 0.5, 100, ptime=20, seed=2)
    sidecar = e.finalize()
    _, left, right = read_wav(e.wav_path)
    assert right == decode(joined(caller), "PCMU")
    assert left == [0] * 4000 + decode(joined(agent), "PCMU") + [0] * 4000
    seg = sidecar["segments"][0]
    assert (seg["chunks"], seg["reordered"], seg["late"], seg["missing"]) == (150, 1, 0, 0)
    assert sidecar["segments"][1]["offsetSamples"] == 4000


def test_pcma_is_decoded_exactly(tmp_path):
    """A-law segments decode as the ITU table says: checked against audioop and against sox."""
    e = Entry(tmp_path)
    fmt = {"codec": "PCMA", "rate": 8000, "ptime": 100}
    c = e.segment("c", "CONTACT", "contact-1", audio_format=fmt)
    every = bytes(range(256)) * 4  # every A-law byte
    e.chunk(c, 1, T0, every[:800])
    e.chunk(c, 2, T0 + 0.1, every[800:] + every[:576])
    sidecar = e.finalize()
    _, left, right = read_wav(e.wav_path)
    payload = every[:800] + every[800:] + every[:576]
    assert right == decode(payload, "PCMA") == sox_decode(payload, "PCMA")
    assert left == [0] * 1600
    assert sidecar["segments"][0]["recorded"] is True
    assert sidecar["segments"][0]["audioFormat"] == fmt


def test_l16_at_16_khz_is_recorded_at_16_khz(tmp_path):
    """L16 big-endian at 16000 Hz: a 16 kHz WAV with the samples as sent; offsets at 16 kHz."""
    e = Entry(tmp_path)
    fmt = {"codec": "L16", "rate": 16000, "ptime": 100}
    c = e.segment("c", "CONTACT", "contact-1", audio_format=fmt)
    a = e.segment("a", "AGENT", "agent-7", audio_format=fmt)
    caller = stream_chunks(e, c, T0, 20, seed=1, codec="L16", rate=16000)
    agent = stream_chunks(e, a, T0 + 1.0, 10, seed=2, codec="L16", rate=16000)
    sidecar = e.finalize()
    rate, left, right = read_wav(e.wav_path)
    assert rate == 16000 and sidecar["audio"]["sampleRateHertz"] == 16000
    assert right == decode(joined(caller), "L16")
    assert left == [0] * 16000 + decode(joined(agent), "L16")
    assert sidecar["segments"][1]["offsetSamples"] == 16000
    assert sidecar["audio"]["durationSeconds"] == 2.0


def test_a_segment_at_another_rate_is_not_recorded(tmp_path):
    """The recording's rate is its first recordable segment's; an L16 segment at 8 kHz after a
    16 kHz one is recorded: false, with its counts and a reason."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1", audio_format={"codec": "L16", "rate": 16000, "ptime": 100})
    a = e.segment("a", "AGENT", "agent-7", audio_format={"codec": "L16", "rate": 8000, "ptime": 100})
    caller = stream_chunks(e, c, T0, 10, seed=1, codec="L16", rate=16000)
    stream_chunks(e, a, T0, 10, seed=2, codec="L16", rate=8000)
    sidecar = e.finalize()
    rate, left, right = read_wav(e.wav_path)
    assert rate == 16000 and right == decode(joined(caller), "L16") and left == [0] * 16000
    seg = sidecar["segments"][1]
    assert seg["recorded"] is False and "8000 Hz" in seg["reason"] and "16000 Hz" in seg["reason"]
    assert seg["chunks"] == 10 and seg["samples"] == 0


def test_an_opus_segment_beside_a_pcmu_one(tmp_path):
    """OPUS is not decoded: recorded false with its counts and reason; the PCMU segment is exact."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1")
    a = e.segment("a", "AGENT", "agent-7", audio_format={"codec": "OPUS", "rate": 48000, "ptime": 20})
    caller = stream_chunks(e, c, T0 + 0.2, 20, seed=1)
    for k in range(12):
        e.chunk(a, k + 1, T0 + k * 0.02, bytes([k]) * 60, duration=20)
    e.chunk(a, 3, T0 + 0.3, bytes([2]) * 60, duration=20)  # a duplicate, counted
    sidecar = e.finalize()
    _, left, right = read_wav(e.wav_path)
    assert right == decode(joined(caller), "PCMU") and left == [0] * 16000
    seg = sidecar["segments"][1]
    assert seg["recorded"] is False and "OPUS" in seg["reason"]
    assert (seg["chunks"], seg["duplicates"], seg["firstSeq"], seg["lastSeq"]) == (12, 1, 1, 12)
    assert sidecar["segments"][0]["offsetSamples"] == 0  # the file starts at the first recorded audio
    odd = {"codec": "CODEC_UNSPECIFIED", "rate": 8000, "ptime": 20}
    assert sidecar["segments"][0]["recorded"] is True and sidecar["segments"][0]["reason"] is None
    e2 = Entry(tmp_path / "two")
    for i, fmt in enumerate([odd, {"codec": "9", "rate": 8000, "ptime": 20},
                             {"codec": "PCMU", "rate": 16000, "ptime": 20},
                             {"codec": "FLAC", "rate": 8000, "ptime": 20}]):
        s = e2.segment(f"s{i}", audio_format=fmt)
        e2.chunk(s, 1, T0, b"\x00" * 160, duration=20)
    reasons = [s["reason"] for s in e2.finalize()["segments"]]
    assert all(reasons) and len(set(reasons)) == 4
    assert read_wav(e2.wav_path)[1:] == ([], [])


def test_segment_info_and_the_sidecar_fields(tmp_path):
    """SegmentInfo is kept in order with its time; the sidecar has DESIGN.md's gRPC fields."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1", product={"id": "q-5", "type": "QUEUE"}, name="Ann")
    a = e.segment("a", "AGENT", "agent-7", product={"id": "q-5", "type": "QUEUE"})
    stream_chunks(e, c, T0, 10, seed=1)
    stream_chunks(e, a, T0, 10, seed=2)
    e.info(c, "hold", None, T0 + 0.25)
    e.info(a, "note", "x=1", T0 + 0.5)
    e.info(c, "unhold", "", T0 + 0.75)
    e.stop(c, T0 + 1.0)
    e.stop(a, T0 + 1.0)
    e.stream_end(0, T0 + 1.1)
    e.end(T0 + 1.1)
    sidecar = e.finalize(key_template="{accountId}/{subaccountId}/{rcAccountId}/{agentId}/"
                                      "{productId}-{productType}/{ani}-{dnis}/{dialogType}/"
                                      "{callId}-{sessionId}/{start:%Y%m%d}")
    assert sidecar["key"] == ("acc-1/sub-2/rc-3/agent-7/q-5-QUEUE/_15550001-_15550002/INBOUND/"
                              "dlg-1-sess-1/20231114")
    assert sidecar["metadata"] == e.entry.read_header()["metadata"]
    assert sidecar["streams"] == [{"sessionId": "sess-1", "connectedAt": "2023-11-14T22:13:20.000Z",
                                   "endedAt": "2023-11-14T22:13:21.100Z", "endReason": "stop",
                                   "detail": None}]
    seg = sidecar["segments"][0]
    assert seg["info"] == [
        {"event": "hold", "data": None, "at": "2023-11-14T22:13:20.250Z"},
        {"event": "unhold", "data": "", "at": "2023-11-14T22:13:20.750Z"},
    ]
    assert sidecar["segments"][1]["info"] == [{"event": "note", "data": "x=1",
                                               "at": "2023-11-14T22:13:20.500Z"}]
    want = {"segmentId", "participant", "product", "channel", "audioFormat", "recorded", "reason",
            "chunks", "missing", "duplicates", "reordered", "late", "firstSeq", "lastSeq",
            "offsetSamples", "samples", "pauses", "info", "stopped"}
    assert want <= set(seg)
    assert seg["participant"] == {"id": "contact-1", "type": "CONTACT", "name": "Ann"}
    assert seg["product"] == {"id": "q-5", "type": "QUEUE"}
    assert set(sidecar["audio"]) == {"encoding", "sampleRateHertz", "channels", "channelMap",
                                     "durationSeconds", "bytes", "sha256"}
    with open(e.wav_path, "rb") as f:
        data = f.read()
    import hashlib
    assert sidecar["audio"]["bytes"] == len(data)
    assert sidecar["audio"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert sidecar["timing"]["firstMediaAt"] == "2023-11-14T22:13:20.000Z"
    assert set(sidecar) >= {"schema", "source", "callId", "sessionId", "metadata", "streams",
                            "segments", "audio", "timing", "complete", "endReason", "recorder",
                            "key"}
    assert not [n for n in os.listdir(e.entry.path) if n.endswith(".placed") or n == "call.chunks"]


def test_a_segment_without_an_audio_format_is_pcmu(tmp_path):
    """audio_format null: PCMU at 8000 Hz, chunk length from the first chunk."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1", audio_format=None)
    sent = {s: tone(160, s) for s in range(1, 11)}
    for s, p in sent.items():
        if s != 5:
            e.chunk(c, s, T0 + s * 0.02, p, duration=20)
    sidecar = e.finalize()
    _, _, right = read_wav(e.wav_path)
    assert right == decode(b"".join(b"\xff" * 160 if s == 5 else sent[s] for s in sent), "PCMU")
    assert sidecar["segments"][0]["audioFormat"]["codec"] == "PCMU"
    assert sidecar["segments"][0]["recorded"] is True


def test_a_crashed_entry_is_recovered_and_incomplete(tmp_path):
    """No end event (a crash): endReason recovered, incomplete, with the audio it had."""
    e = Entry(tmp_path)
    c, a, caller, agent = caller_and_agent(e, caller_count=20, agent_count=15)
    e.write_chunks()
    with open(os.path.join(e.entry.path, "call.chunks"), "ab") as f:
        f.write(pack_chunk(c, 21, T0 + 2.0, 100, b"\x01" * 800)[:30])  # torn by kill -9
    with open(os.path.join(e.entry.path, "events.jsonl"), "ab") as f:
        f.write(b'{"event": "segmentSt')  # torn
    sidecar = e.finalize()
    assert sidecar["endReason"] == "recovered" and sidecar["complete"] is False
    assert sidecar["streams"][0]["endReason"] == "recovered"
    _, left, right = read_wav(e.wav_path)
    assert right == decode(joined(caller), "PCMU")
    assert left == decode(joined(agent), "PCMU") + [0] * 4000


def test_two_streams_with_a_gap_are_one_recording(tmp_path):
    """A second stream for the dialog (a reconnect): timed by its own arrival, silence between."""
    e = Entry(tmp_path)
    c, a, caller, agent = caller_and_agent(e, caller_count=20, agent_count=20)
    e.stop(c, T0 + 2.0)
    e.stop(a, T0 + 2.0)
    e.stream_end(0, T0 + 2.0)
    s1 = e.stream("sess-2", T0 + 5.0)
    c2 = e.segment("c", "CONTACT", "contact-1", at=T0 + 5.0, stream=s1)
    a2 = e.segment("a", "AGENT", "agent-7", at=T0 + 5.0, stream=s1)
    caller2 = stream_chunks(e, c2, T0 + 5.0, 10, seed=3)  # seq restarts at 1
    agent2 = stream_chunks(e, a2, T0 + 5.0, 10, seed=4)
    e.stream_end(s1, T0 + 6.0)
    e.end(T0 + 16.0)
    sidecar = e.finalize()
    _, left, right = read_wav(e.wav_path)
    assert right == decode(joined(caller), "PCMU") + [0] * 24000 + decode(joined(caller2), "PCMU")
    assert left == decode(joined(agent), "PCMU") + [0] * 24000 + decode(joined(agent2), "PCMU")
    assert sidecar["sessionId"] == "sess-1"
    assert [s["sessionId"] for s in sidecar["streams"]] == ["sess-1", "sess-2"]
    assert [s["stream"] for s in sidecar["segments"]] == [0, 0, 1, 1]
    assert [s["offsetSamples"] for s in sidecar["segments"]] == [0, 0, 40000, 40000]


def test_mulaw_output_at_8_and_16_khz(tmp_path):
    """--format mulaw: a tag-7 WAV sox reads, at the recording's rate, with the exact samples."""
    e = Entry(tmp_path)
    _, _, caller, agent = caller_and_agent(e, 0.0, 1.0, caller_count=20, agent_count=10)
    sidecar = e.finalize(format="mulaw")
    info, left, right = read_mulaw_wav(e.wav_path)
    assert "Sample Rate    : 8000" in info and "u-law" in info
    assert right == decode(joined(caller), "PCMU")
    assert left == [0] * 8000 + decode(joined(agent), "PCMU") + [0] * 0
    assert sidecar["audio"]["encoding"] == "mulaw"
    e16 = Entry(tmp_path / "16")
    fmt = {"codec": "L16", "rate": 16000, "ptime": 100}
    c = e16.segment("c", "CONTACT", "contact-1", audio_format=fmt)
    sent = stream_chunks(e16, c, T0, 5, seed=1, codec="L16", rate=16000)
    e16.finalize(format="mulaw")
    info, left, right = read_mulaw_wav(e16.wav_path)
    assert "Sample Rate    : 16000" in info and "u-law" in info
    # The reference G.711 encoder (audioop's), then decoded: what sox read.
    assert right == decode(encode_ulaw(decode(joined(sent), "L16")), "PCMU")
    assert left == [0] * len(right)


def test_channel_map_caller_agent_puts_the_caller_left(tmp_path):
    """--channel-map caller,agent: the caller channel is left."""
    e = Entry(tmp_path)
    _, _, caller, agent = caller_and_agent(e, caller_count=10, agent_count=10)
    sidecar = e.finalize(channel_map=("caller", "agent"))
    _, left, right = read_wav(e.wav_path)
    assert left == decode(joined(caller), "PCMU") and right == decode(joined(agent), "PCMU")
    assert sidecar["audio"]["channelMap"] == ["caller", "agent"]


def test_memory_stays_bounded_for_a_long_dialog(tmp_path):
    """A 5-minute dialog (a 9.6 MB WAV, a pause, a warm-transfer overlap) finalizes in < 3 MB."""
    import tracemalloc

    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1")
    a = e.segment("a", "AGENT", "agent-A")
    b = e.segment("b", "AGENT", "agent-B", at=T0 + 150.0)
    for k in range(3000):
        e.chunk(c, k, T0 + k * 0.1, bytes([k % 250 + 1]) * 800)
    for k in range(1800):
        at = T0 + k * 0.1 + (10.0 if k >= 500 else 0.0)  # a 10 s hold at 50 s
        e.chunk(a, k, at, bytes([(k * 3) % 250 + 1]) * 800)
    for k in range(1500):
        e.chunk(b, k, T0 + 150.0 + k * 0.1, bytes([(k * 5) % 250 + 1]) * 800)
    e.write_chunks()
    tracemalloc.start()
    try:
        sidecar = e.finalize()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sidecar["audio"]["durationSeconds"] == 300.0
    assert sidecar["segments"][1]["pauses"] == [{"atSamples": 400000, "seconds": 10.0}]
    assert sidecar["audio"]["bytes"] > 9_600_000
    assert peak < 3_000_000, peak


def test_g711_tables_against_independent_decoders_and_encoders():
    """A-law decodes as audioop and sox do; block mu-law encoding (both paths) is the reference."""
    import array

    from evrecorder import g711
    from grpc_entry import _audioop

    every = bytes(range(256))
    assert list(g711.ALAW_DECODE_TABLE) == decode(every, "PCMA") == sox_decode(every, "PCMA")
    samples = list(range(-32768, 32768))
    pcm = array.array("h", samples).tobytes()
    want = encode_ulaw(samples)
    assert g711._encode_block(pcm, None) == want
    if _audioop() is not None:
        assert g711._encode_block(pcm, _audioop()) == want
    assert g711.pcm16le_block_to_ulaw(pcm) == want
    assert g711.l16be_to_pcm16le(b"\x12\x34\x80\x00\x7f") == b"\x34\x12\x00\x80"


def test_chunks_without_their_segment_event_and_bogus_seqs_are_kept_or_counted(tmp_path):
    """Chunks whose segment event was lost are kept (PCMU, caller); a seq hours away is dropped
    and counted in outOfRange, never hours of silence."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1")
    sent = stream_chunks(e, c, T0, 10, seed=1)
    e.chunk(c, 4_000_000_000, T0 + 1.0, tone(800, 99))  # far beyond --max-call-duration
    lost = {s: tone(800, 200 + s) for s in range(1, 6)}
    for s, p in lost.items():
        e.chunk(1, s, T0 + 0.5 + s * 0.1, p)  # segment 1: its event never made it to disk
    sidecar = e.finalize()
    _, left, right = read_wav(e.wav_path)
    want = Timeline()
    want.place(0, decode(joined(sent), "PCMU"))
    want.place(4800, decode(joined(lost), "PCMU"))
    assert right == want.padded(len(right)) and len(right) == 8800
    first, second = sidecar["segments"]
    assert (first["chunks"], first["outOfRange"], first["missing"]) == (10, 1, 0)
    assert second["segmentId"] is None and second["channel"] == "caller"
    assert second["recorded"] is True and second["chunks"] == 5


def test_websocket_sidecars_say_their_source(tmp_path):
    """A WebSocket call's sidecar gets "source": "websocket" and keeps its perspectives."""
    from evrecorder.finalize import finalize
    from evrecorder.settings import Settings
    from evrecorder.spool import Spool

    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spool.new_call("ws-1", "1", T0)
    entry.create({"callId": "ws-1", "sessionId": "1", "connectedAt": T0, "createdAt": T0,
                  "metadata": {}, "query": {}})
    entry.append_event({"event": "media", "perspective": "Participant", "at": T0,
                        "offsetFrames": 0, "firstSequenceId": 1})
    for seq in range(1, 4):
        entry.append_frame("Participant", seq, tone(160, seq))
    entry.append_event({"event": "end", "reason": "stop", "complete": True, "at": T0 + 1})
    entry.close()
    sidecar = finalize(entry, Settings(spool=spool.root))
    assert sidecar["source"] == "websocket"
    assert sidecar["perspectives"]["Participant"]["frames"] == 3
    _, left, _ = read_wav(os.path.join(entry.path, "recording.wav"))
    assert left == decode(b"".join(tone(160, s) for s in range(1, 4)), "PCMU")


def test_jitter_and_hiccups_are_not_pauses_but_holds_with_20_ms_chunks_are(tmp_path):
    """Random arrival jitter (up to 150 ms) and a lasting 150 ms shift insert nothing; two holds
    of 20 ms chunks (1 s, 0.5 s) each insert their length where they happened."""
    import random

    rng = random.Random(9)
    e = Entry(tmp_path)
    fmt = {"codec": "PCMU", "rate": 8000, "ptime": 20}
    c = e.segment("c", "CONTACT", "contact-1", audio_format=fmt)
    a = e.segment("a", "AGENT", "agent-7", audio_format=fmt)
    shaky = lambda k: T0 + k * 0.02 + (k > 0) * rng.random() * 0.15 + (0.15 if k >= 200 else 0)  # noqa: E731
    caller = stream_chunks(e, c, T0, 400, ptime=20, seed=1, arrival=shaky)
    held = lambda k: T0 + k * 0.02 + (1.0 if k >= 100 else 0) + (0.5 if k >= 250 else 0)  # noqa: E731
    agent = stream_chunks(e, a, T0, 350, ptime=20, seed=2, arrival=held)
    sidecar = e.finalize()
    _, left, right = read_wav(e.wav_path)
    assert sidecar["segments"][0]["pauses"] == []
    assert right[:64000] == decode(joined(caller), "PCMU")
    assert sidecar["segments"][1]["pauses"] == [{"atSamples": 16000, "seconds": 1.0},
                                                {"atSamples": 48000, "seconds": 0.5}]
    pcm = decode(joined(agent), "PCMU")
    assert left == pcm[:16000] + [0] * 8000 + pcm[16000:40000] + [0] * 4000 + pcm[40000:]


def test_three_overlapping_segments_and_both_mixing_paths(tmp_path):
    """Three caller-side segments overlapping in every way sum exactly (clipped), with the
    stdlib's C adder and without it."""
    import array

    from evrecorder import g711

    e = Entry(tmp_path)
    starts = [0.0, 0.3, 0.5]
    counts = [10, 3, 12]
    sent = []
    for i, (start, count) in enumerate(zip(starts, counts)):
        seg = e.segment(f"s{i}", "BOT" if i else "CONTACT", f"p{i}", at=T0 + start)
        loud = bytes([0x80 + (i * 3 + k) % 16 for k in range(800)])  # near full scale
        sent.append({seq: (loud if seq % 2 else tone(800, i * 50 + seq))
                     for seq in range(1, count + 1)})
        for seq, payload in sent[i].items():
            e.chunk(seg, seq, T0 + start + (seq - 1) * 0.1, payload)
    e.finalize()
    _, _, right = read_wav(e.wav_path)
    want = Timeline()
    for start, chunks in zip(starts, sent):
        want.place(round(start * 8000), decode(joined(chunks), "PCMU"))
    assert right == want.padded(len(right)) and len(right) == 13600
    assert 32767 in right
    a = array.array("h", [30000, -30000, 5, -7, 32767]).tobytes()
    b = array.array("h", [10000, -10000, 6, 7, 1]).tobytes()
    want_sum = array.array("h", [32767, -32768, 11, 0, 32767]).tobytes()
    assert g711._add_clipped(a, b) == want_sum == g711.add_pcm16le(a, b)


def test_the_websocket_finalize_benchmark_still_runs(tmp_path):
    """benchmarks/finalize_bench.py finalizes WebSocket calls through the dispatching finalize."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "finalize_bench.py"), "--seconds", "2",
         "--repeat", "1", "--formats", "pcm16", "--variants", "contiguous",
         "--dir", str(tmp_path), "--json", str(out)],
        check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=root), timeout=120,
    )
    [row] = json.loads(out.read_text())["results"]
    assert {p: d["frames"] for p, d in row["perspectives"].items()} == {
        "Participant": 100, "Conference": 100}
    assert row["wav_bytes"] >= 44 + 4 * 100 * 160  # 2 s of stereo PCM16


def test_a_dialog_without_audio_is_archived_with_an_empty_wav(tmp_path):
    """A dialog whose segments sent nothing: an empty 8 kHz WAV, its segments listed."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1")
    e.stop(c, T0 + 1.0)
    e.stream_end(0, T0 + 1.0)
    e.end(T0 + 1.0)
    sidecar = e.finalize()
    assert read_wav(e.wav_path) == (8000, [], [])
    assert sidecar["audio"]["durationSeconds"] == 0 and sidecar["timing"]["firstMediaAt"] is None
    [seg] = sidecar["segments"]
    assert (seg["chunks"], seg["samples"], seg["firstSeq"], seg["stopped"]) == (0, 0, None, True)
    assert sidecar["key"].startswith("2023/11/14/dlg-1-sess-1")


def test_an_odd_l16_payload_loses_only_its_half_sample(tmp_path):
    """An L16 chunk of odd length drops its last byte; the chunks after it stay aligned."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1", audio_format={"codec": "L16", "rate": 8000,
                                                             "ptime": 100})
    first, second = tone(800, 1, "L16"), tone(800, 2, "L16")
    e.chunk(c, 1, T0, first + b"\x7f")
    e.chunk(c, 2, T0 + 0.1, second)
    e.finalize()
    _, _, right = read_wav(e.wav_path)
    assert right == decode(first, "L16") + decode(second, "L16")


def test_seq_wrapping_past_uint32_goes_on_in_order(tmp_path):
    """A segment whose seq wraps from 4294967295 to 0 is placed in order, nothing missing."""
    e = Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1")
    seqs = [(4294967292 + k) % (1 << 32) for k in range(10)]
    sent = [tone(800, k) for k in range(10)]
    for k in range(10):  # seq 4294967295 arrives after 0: reordered across the wrap
        e.chunk(c, seqs[k], T0 + k * 0.1 + (0.15 if k == 3 else 0), sent[k])
    sidecar = e.finalize()
    _, _, right = read_wav(e.wav_path)
    assert right == decode(b"".join(sent), "PCMU")
    seg = sidecar["segments"][0]
    assert (seg["firstSeq"], seg["lastSeq"], seg["missing"], seg["reordered"]) == (
        4294967292, 5, 0, 1)
