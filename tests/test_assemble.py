"""Finalizing gRPC recordings: placement, timeline, pauses, codecs, mixing, sidecar."""

from __future__ import annotations

from grpc_entry import T0, Entry, Timeline, decode, read_wav, sidecar_on_disk, tone


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
