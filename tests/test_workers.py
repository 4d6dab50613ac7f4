"""Several recorder processes on one port and one spool (--reuse-port).

Claims and spool locks are tested as plain objects (flock locks belong to an
open file, so two objects in one process contend exactly as two processes
do); relaying with two recorders in this process on one spool; and the whole
thing with two twistd processes sharing a port.
"""

from __future__ import annotations

import glob
import json
import os
import signal

import pytest
import pytest_twisted
from twisted.internet import defer

from conftest import independent_decode, read_pcm16_wav
from test_process import free_port, listening, spooled_frames, start_twistd, until
from test_service import AGENT, CALLER, assert_channels, frames, reactor, sleep
from wsclient import connect, connected, media, start, stop

from evrecorder.owners import CallOwners
from evrecorder.spool import NEW_PREFIX, Spool


# -- claims ------------------------------------------------------------------

def test_a_call_has_one_owner_until_it_releases_it(tmp_path):
    a, b = CallOwners(str(tmp_path), "/a.sock"), CallOwners(str(tmp_path), "/b.sock")
    a.prepare()
    mine = a.claim("c1", "1")
    assert mine.owned
    theirs = b.claim("c1", "1")
    assert not theirs.owned and theirs.address == "/a.sock"
    assert b.claim("c1", "2").owned  # another session is another call
    mine.release()
    again = b.claim("c1", "1")
    assert again.owned and again.address == "/b.sock"
    assert a.claim("c1", "1").address == "/b.sock"


def test_a_dead_owners_claim_is_taken_over(tmp_path):
    a, b = CallOwners(str(tmp_path), "/a.sock"), CallOwners(str(tmp_path), "/b.sock")
    a.prepare()
    dead = a.claim("c1", "1")
    os.close(dead._fd)  # the process died: the kernel dropped its lock, the file stays
    assert os.path.exists(a.path_of("c1", "1"))
    taken = b.claim("c1", "1")
    assert taken.owned
    with open(a.path_of("c1", "1")) as f:
        assert f.read() == "/b.sock"
    assert not a.claim("c1", "1").owned


def test_only_a_live_claim_counts(tmp_path):
    a, b = CallOwners(str(tmp_path), "/a.sock"), CallOwners(str(tmp_path), "/b.sock")
    a.prepare()
    live = a.claim("live", "1")
    dead = a.claim("dead", "1")
    os.close(dead._fd)
    assert b.claimed("live", "1") and not b.claimed("dead", "1") and not b.claimed("none", "1")
    live.release()


def test_start_clears_dead_claims_only(tmp_path):
    a, b = CallOwners(str(tmp_path), "/a.sock"), CallOwners(str(tmp_path), "/b.sock")
    a.prepare()
    live = a.claim("live", "1")
    dead = a.claim("dead", "1")
    os.close(dead._fd)
    draft = os.path.join(a.dir, ".claim-leftover")
    open(draft, "w").close()
    b.prepare()
    assert os.path.exists(a.path_of("live", "1"))
    assert not os.path.exists(a.path_of("dead", "1")) and not os.path.exists(draft)
    assert not b.claim("live", "1").owned
    live.release()


def test_stale_relay_sockets_of_dead_processes_are_cleared(tmp_path):
    from evrecorder.relay import clear_stale

    dead = tmp_path / "999999999-0123abcd.sock"
    mine = tmp_path / f"{os.getpid()}-0123abcd.sock"
    other = tmp_path / "notes.txt"
    for f in (dead, mine, other):
        f.write_text("")
    clear_stale(str(tmp_path))
    assert not dead.exists() and mine.exists() and other.exists()


# -- spool locks ---------------------------------------------------------------

def test_a_refusal_after_the_relayed_connection_ended_is_logged_not_closed_again():
    """The owner refuses what a socket sent last, after the socket ended: nothing is
    closed or counted again here; a warning says what was refused."""
    from collections import Counter
    from types import SimpleNamespace

    from twisted.internet.task import Clock
    from twisted.logger import globalLogPublisher

    from evrecorder.relay import RemoteCall

    class Conn:
        ended = []

        def end_call(self, code, reason):
            self.ended.append((code, reason))

    registry = SimpleNamespace(clock=Clock(), remote_calls=set(),
                               metrics=SimpleNamespace(closed=Counter()))
    conn = Conn()
    remote = RemoteCall(registry, conn, "c1", "1", {}, {}, 0.0)
    remote._unacked.append(("media", (AGENT, 1, b"x", 0.0), 0.0))  # sent, not confirmed
    remote._done()
    assert registry.clock.getDelayedCalls()  # waits for the confirmation, not forever
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        remote._ended_by_owner(1007, "seq 1 is out of range")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert conn.ended == [] and registry.metrics.closed == Counter()
    assert any("after the connection ended" in e.get("log_format", "") for e in seen)
    assert not registry.clock.getDelayedCalls()


def test_an_entry_is_held_by_one_process(tmp_path):
    mine, theirs = Spool(str(tmp_path)), Spool(str(tmp_path))
    mine.prepare()
    entry = mine.new_call("c1", "1", 1000.0)
    entry.create({"callId": "c1"})
    [seen] = theirs.entries()
    assert seen.path == entry.path and seen.has_header
    assert not seen.lock()  # recording here: a sibling leaves it alone
    mine.release_all()
    assert seen.lock()
    assert not entry.lock()


def test_an_interrupted_creation_is_cleared_unless_in_progress(tmp_path):
    spool = Spool(str(tmp_path))
    spool.prepare()
    crashed = os.path.join(spool.calls_dir, NEW_PREFIX + "1-c1")
    os.mkdir(crashed)
    busy = Spool(str(tmp_path)).new_call("c2", "1", 1.0)
    os.mkdir(os.path.join(spool.calls_dir, NEW_PREFIX + os.path.basename(busy.path)))
    holder = type(busy)(os.path.join(spool.calls_dir, NEW_PREFIX + os.path.basename(busy.path)))
    assert holder.lock()  # a sibling in the middle of creating it
    assert spool.entries() == []
    assert not os.path.exists(crashed)
    assert os.path.exists(holder.path)


# -- two recorders, one spool --------------------------------------------------

async def split_call(port_a, port_b, call_id, agent, caller):
    """Agent on a socket to one recorder, caller on a socket to the other."""
    a = await connect(reactor(), port_a, query={"callId": call_id, "sessionId": "1"})
    a.send_all([connected(), start(call_id, 1)])
    await sleep(0.1)  # the first recorder owns the call before the second hears of it
    b = await connect(reactor(), port_b, query={"callId": call_id, "sessionId": "1"})
    b.send_all([connected(), start(call_id, 1)])
    for i in range(max(len(agent), len(caller))):
        if i < len(agent):
            a.send(media(AGENT, i + 1, agent[i]))
        if i < len(caller):
            b.send(media(CALLER, i + 1, caller[i]))
    return a, b


@pytest_twisted.ensureDeferred
async def test_a_call_split_over_two_processes_is_one_recording(recorder_factory):
    first = await recorder_factory(subdir="shared")
    second = await recorder_factory(subdir="shared")  # same spool, same archive
    agent, caller = frames(60, 80), frames(55, 81)
    a, b = await split_call(first.port, second.port, "split-1", agent, caller)
    # Both perspectives are streaming when the Stops come (as in a real call,
    # whose Stops come minutes after the first frames).
    await sleep(0.3)
    a.send(stop())
    b.send(stop())
    (code_a, _), (code_b, _) = await defer.gatherResults([a.closed, b.closed])
    assert (code_a, code_b) == (1000, 1000)
    [sidecar] = await first.archived()
    await sleep(0.3)
    assert len(await first.archived()) == 1  # one recording, not one per process
    want_caller = b"".join(caller) + b"\xff" * 160 * 5
    assert_channels(sidecar, b"".join(agent), want_caller)
    assert sidecar["complete"] is True and sidecar["endReason"] == "stop"
    assert sidecar["perspectives"][CALLER]["frames"] == 55
    assert second.service.metrics.relayed == 1 and first.service.metrics.relayed == 0
    assert not os.listdir(os.path.join(first.service.spool.root, "owners"))


@pytest_twisted.ensureDeferred
async def test_owner_refusal_closes_the_relayed_socket(recorder_factory):
    first = await recorder_factory(subdir="shared")
    second = await recorder_factory(subdir="shared")
    agent, caller = frames(10, 82), frames(10, 83)
    a, b = await split_call(first.port, second.port, "split-2", agent, caller)
    await sleep(0.3)
    b.send(media(CALLER, 10**15, caller[0]))  # out of range: the owner refuses it
    code, reason = await b.closed
    assert code == 1007 and "out of range" in reason
    assert second.service.metrics.closed[1007] == 1  # counted where the socket is
    a.send(stop())
    a.send(stop())  # the caller's, now that its socket is gone (as on one process)
    assert (await a.closed)[0] == 1000
    [sidecar] = await first.archived()
    assert sidecar["perspectives"][CALLER]["frames"] == 10
    assert_channels(sidecar, b"".join(agent), b"".join(caller))


@pytest_twisted.ensureDeferred
async def test_draining_process_keeps_relayed_sockets_until_their_call_ends(recorder_factory):
    first = await recorder_factory(subdir="shared")
    second = await recorder_factory(subdir="shared", drain_timeout=5.0)
    agent, caller = frames(20, 84), frames(20, 85)
    a, b = await split_call(first.port, second.port, "split-3", agent, caller)
    await sleep(0.3)
    draining = defer.maybeDeferred(second.service.stopService)
    await sleep(0.3)
    assert not b.closed.called  # not cut while its call goes on
    for i in range(20, 25):
        b.send(media(CALLER, i + 1, caller[i % 20]))
    await sleep(0.2)
    a.send(stop())
    b.send(stop())
    (code_a, _), (code_b, _) = await defer.gatherResults([a.closed, b.closed])
    assert (code_a, code_b) == (1000, 1000)
    await draining
    [sidecar] = await first.archived()
    assert sidecar["perspectives"][CALLER]["frames"] == 25
    assert_channels(sidecar, b"".join(agent) + b"\xff" * 160 * 5,
                    b"".join(caller) + b"".join(caller[:5]))


@pytest.mark.parametrize("full", [False, True])
@pytest_twisted.ensureDeferred
async def test_hung_owner_is_taken_over_without_losing_frames(recorder_factory, monkeypatch, full):
    """Also when the process taking over is at --max-calls: it continues a
    call, it does not start one."""
    from evrecorder import relay

    monkeypatch.setattr(relay, "MAX_UNACKED", 8)
    first = await recorder_factory(subdir="shared")
    second = await recorder_factory(subdir="shared", max_calls=1 if full else 2000)
    if full:
        busy = await connect(reactor(), second.port, query={"callId": "own", "sessionId": "1"})
        busy.send_all([connected(), start("own", 1)])
        await sleep(0.2)
    agent, caller = frames(30, 86), frames(30, 87)
    a, b = await split_call(first.port, second.port, "hung-1", agent[:5], caller[:5])
    await sleep(0.3)
    # The owner stops reading its relay connections (hung, not dead).
    owned = [p for p in first.service._relay_conns()]
    assert len(owned) == 1
    owned[0].transport.stopReading()
    for i in range(5, 30):
        b.send(media(CALLER, i + 1, caller[i]))
        await sleep(0.01)
    await sleep(0.3)
    assert second.service.registry.calls  # taken over: recorded there now
    owned[0].transport.startReading()  # the owner wakes up and sees the relay gone
    a.send_all([media(AGENT, i + 1, agent[i]) for i in range(5, 30)])
    await sleep(0.3)
    b.send(stop())
    a.send(stop())
    a.send(stop())  # the caller's, on the owner: its socket there is gone
    assert (await a.closed)[0] == 1000 and (await b.closed)[0] == 1000
    sidecars = await first.archived(2)
    caller_frames = {}
    for side in sidecars:
        if side["callId"] != "hung-1":
            continue
        p = side["perspectives"][CALLER]
        if p["frames"]:
            _, right = read_pcm16_wav(side["_wav"])
            first_seq = int(p["firstSequenceId"])
            for k in range(p["frames"]):
                at = p["offsetSamples"] + k * 160
                caller_frames.setdefault(first_seq + k, right[at:at + 160])
    assert sorted(caller_frames) == list(range(1, 31))
    for seq, samples in caller_frames.items():
        assert samples == independent_decode(caller[seq - 1])
    if full:
        busy.close()


@pytest_twisted.ensureDeferred
async def test_draining_with_reuse_port_stops_taking_new_calls(recorder_factory):
    first = await recorder_factory(subdir="shared", reuse_port=True, drain_timeout=10.0)
    agent = frames(10, 88)
    a = await connect(reactor(), first.port, query={"callId": "d-1", "sessionId": "1"})
    a.send_all([connected(), start("d-1", 1), media(AGENT, 1, agent[0])])
    await sleep(0.2)
    assert first.service.registry.calls
    second = await recorder_factory(subdir="shared", reuse_port=True,
                                    listen=f"tcp:{first.port}:interface=127.0.0.1")
    draining = defer.maybeDeferred(first.service.stopService)
    await sleep(0.3)
    for n in range(12):  # every new call lands on the sibling, none gets 503
        c = await connect(reactor(), first.port, query={"callId": f"new-{n}", "sessionId": "1"})
        c.close()
    assert first.service.metrics.rejected["draining"] == 0
    a.send_all([media(AGENT, i + 1, agent[i]) for i in range(1, 10)] + [stop()])
    assert (await a.closed)[0] == 1000  # the call in progress finished where it was
    await draining
    assert second.service.running


@pytest_twisted.ensureDeferred
async def test_a_full_process_still_relays_a_siblings_call(recorder_factory):
    first = await recorder_factory(subdir="shared")
    second = await recorder_factory(subdir="shared", max_calls=1)
    busy = await connect(reactor(), second.port, query={"callId": "own-1", "sessionId": "1"})
    busy.send_all([connected(), start("own-1", 1)])
    await sleep(0.2)
    assert len(second.service.registry.calls) == 1  # full
    agent, caller = frames(10, 89), frames(10, 90)
    a, b = await split_call(first.port, second.port, "full-1", agent, caller)  # b: accepted
    await sleep(0.3)
    a.send(stop())
    b.send(stop())
    assert [(await a.closed)[0], (await b.closed)[0]] == [1000, 1000]
    [sidecar] = await first.archived()
    assert_channels(sidecar, b"".join(agent), b"".join(caller))
    busy.close()


# -- two twistd processes on one port -----------------------------------------

@pytest_twisted.ensureDeferred
async def test_two_processes_share_a_port_and_keep_split_calls_whole(tmp_path):
    """--reuse-port: 24 calls, each perspective on its own socket, spread by the
    kernel over two processes; every call is one exact recording."""
    port = free_port()
    procs = [start_twistd(tmp_path, port, f"w{i}", "--reuse-port") for i in range(2)]
    try:
        await until(lambda: listening(port), what="the recorders to listen")
        await sleep(1.0)  # both bound
        assert all(p.poll() is None for p in procs)
        calls = {}
        for n in range(24):
            call_id = f"rp-{n}"
            agent, caller = frames(30, 100 + n), frames(30, 200 + n)
            a = await connect(reactor(), port, query={"callId": call_id, "sessionId": "1"})
            a.send_all([connected(), start(call_id, 1)])
            b = await connect(reactor(), port, query={"callId": call_id, "sessionId": "1"})
            b.send_all([connected(), start(call_id, 1)])
            calls[call_id] = (a, b, agent, caller)
        await sleep(0.5)  # every call set up; then the media, paced as the platform does
        for i in range(30):
            for a, b, agent, caller in calls.values():
                a.send(media(AGENT, i + 1, agent[i]))
                b.send(media(CALLER, i + 1, caller[i]))
            await sleep(0.02)
        await sleep(0.5)  # every perspective has streamed before its Stop
        for a, b, _, _ in calls.values():
            a.send(stop())
            b.send(stop())
        codes = await defer.gatherResults([c for a, b, _, _ in calls.values() for c in (a.closed, b.closed)])
        assert [code for code, _ in codes] == [1000] * 48

        def sidecars():
            return sorted(glob.glob(str(tmp_path / "archive" / "**" / "*.json"), recursive=True))

        await until(lambda: len(sidecars()) >= 24, timeout=60, what="24 recordings",
                    logs=[tmp_path / f"w{i}.log" for i in range(2)])
        await sleep(0.5)
        found = {}
        for path in sidecars():
            with open(path) as f:
                side = json.load(f)
            found.setdefault(side["callId"], []).append((side, path[:-5] + ".wav"))
        assert sorted(found) == sorted(calls) and all(len(v) == 1 for v in found.values())
        for call_id, [(side, wav_path)] in found.items():
            _, _, agent, caller = calls[call_id]
            left, right = read_pcm16_wav(wav_path)
            # Each perspective starts at its first frame's arrival (read time):
            # two busy processes (this machine is shared) may read a call's
            # first frames a few frames apart.
            for samples, sent, p in ((left, agent, AGENT), (right, caller, CALLER)):
                offset = side["perspectives"][p]["offsetSamples"]
                assert offset % 160 == 0 and offset <= 5 * 160, (call_id, p, offset)
                assert min(side["perspectives"][q]["offsetSamples"] for q in (AGENT, CALLER)) == 0
                assert samples[:offset] == [0] * offset
                assert samples[offset:offset + 30 * 160] == independent_decode(b"".join(sent))
                assert side["perspectives"][p]["frames"] == 30
            assert side["complete"] is True
        logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
        assert all("started" in log for log in logs), "the kernel gave one process every call"
        assert any("is relayed to it" in log for log in logs)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)


def assert_every_frame_in_a_recording(paths: list[str], sent: dict) -> list[str]:
    """Every frame sent (perspective -> frames) is in one of the recordings or both,
    exact, placed by its sequenceId; returns their endReasons."""
    got = {perspective: {} for perspective in sent}
    reasons = []
    for path in paths:
        with open(path) as f:
            side = json.load(f)
        reasons.append(side["endReason"])
        left, right = read_pcm16_wav(path[:-5] + ".wav")
        for perspective, samples in ((AGENT, left), (CALLER, right)):
            p = side["perspectives"][perspective]
            if perspective in got and p["frames"]:
                first = int(p["firstSequenceId"])
                for k in range(p["frames"]):
                    at = p["offsetSamples"] + k * 160
                    got[perspective][first + k] = samples[at:at + 160]
    for perspective, frames_sent in sent.items():
        assert sorted(got[perspective]) == list(range(1, len(frames_sent) + 1)), perspective
        for seq, samples in got[perspective].items():
            assert samples == independent_decode(frames_sent[seq - 1]), (perspective, seq)
    return reasons


@pytest_twisted.ensureDeferred
async def test_owner_killed_as_a_relayed_socket_closes_loses_no_audio(tmp_path):
    """kill -9 of the owner after a relayed socket sent its last frames and Stop and
    closed, before the owner confirmed them: the relaying process records that tail."""
    port_a, port_b = free_port(), free_port()
    grace = ("--reconnect-grace", "1")
    proc_a = start_twistd(tmp_path, port_a, "a", *grace)
    proc_b = start_twistd(tmp_path, port_b, "b", *grace)
    procs = [proc_a, proc_b]
    logs = [tmp_path / f"{name}.log" for name in ("a", "b", "a-again")]
    try:
        await until(lambda: listening(port_a) and listening(port_b), what="both recorders",
                    logs=logs)
        agent, caller = frames(20, 92), frames(30, 93)
        a, b = await split_call(port_a, port_b, "tail-1", agent, caller[:20])

        def frames_in_spool(perspective):
            return sum(spooled_frames(entry, perspective)
                       for entry in glob.glob(str(tmp_path / "spool" / "calls" / "*")))

        await until(lambda: frames_in_spool(AGENT) == 20 and frames_in_spool(CALLER) == 20,
                    what="the first frames in the owner's spool", logs=logs)
        proc_a.send_signal(signal.SIGSTOP)
        for i in range(20, 30):
            b.send(media(CALLER, i + 1, caller[i]))
        b.send(stop())
        await sleep(0.2)
        b.close()  # the caller's socket is done; its tail is not confirmed
        await sleep(0.3)
        proc_a.send_signal(signal.SIGKILL)
        proc_a.wait(timeout=10)
        proc_a = start_twistd(tmp_path, port_a, "a-again", *grace)
        procs.append(proc_a)

        def sidecars():
            return sorted(glob.glob(str(tmp_path / "archive" / "**" / "*.json"), recursive=True))

        await until(lambda: len(sidecars()) >= 2, timeout=60,
                    what="the recovered recording and the relayed tail's", logs=logs)
        await sleep(0.5)
        assert len(sidecars()) == 2
        reasons = assert_every_frame_in_a_recording(sidecars(), {AGENT: agent, CALLER: caller})
        assert sorted(reasons) == ["recovered", "stop"]  # the tail had its Stop
        assert "unconfirmed messages replayed" in (tmp_path / "b.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)


@pytest_twisted.ensureDeferred
async def test_owner_killed_mid_call_loses_no_audio(tmp_path):
    """kill -9 of the process recording a split call: the relayed perspective
    goes on in the survivor, and the restarted owner recovers what it had."""
    port_a, port_b = free_port(), free_port()
    proc_a = start_twistd(tmp_path, port_a, "a")
    proc_b = start_twistd(tmp_path, port_b, "b")
    procs = [proc_a, proc_b]
    try:
        await until(lambda: listening(port_a) and listening(port_b), what="both recorders")
        agent, caller = frames(40, 90), frames(40, 91)
        a, b = await split_call(port_a, port_b, "kill-1", agent[:20], caller[:20])

        def frames_in_spool(perspective):
            total = 0
            for entry in glob.glob(str(tmp_path / "spool" / "calls" / "*")):
                total += spooled_frames(entry, perspective)
            return total

        await until(lambda: frames_in_spool(AGENT) == 20 and frames_in_spool(CALLER) == 20,
                    what="the first half in the owner's spool")
        # The owner stalls: what the caller sends now is relayed but never written...
        proc_a.send_signal(signal.SIGSTOP)
        for i in range(20, 30):
            b.send(media(CALLER, i + 1, caller[i]))
        await sleep(0.3)
        # ... and then it dies.
        proc_a.send_signal(signal.SIGKILL)
        proc_a.wait(timeout=10)
        await sleep(0.3)
        # The agent's socket died with its process; the platform reconnects it.
        a2 = await connect(reactor(), port_b, query={"callId": "kill-1", "sessionId": "1"})
        a2.send_all([connected(), start("kill-1", 1)])
        for i in range(20, 40):
            if i >= 30:
                b.send(media(CALLER, i + 1, caller[i]))
            a2.send(media(AGENT, i + 1, agent[i]))
        await sleep(0.3)
        b.send(stop())
        a2.send(stop())
        assert (await b.closed)[0] in (1000, 1001)
        assert (await a2.closed)[0] in (1000, 1001)
        proc_a = start_twistd(tmp_path, port_a, "a-again")
        procs.append(proc_a)

        def sidecars():
            return sorted(glob.glob(str(tmp_path / "archive" / "**" / "*.json"), recursive=True))

        # Generous: a twistd start on a loaded CI machine (logs say what happened if not).
        await until(lambda: len(sidecars()) >= 2, timeout=60,
                    what="the recovered and the continued recording",
                    logs=[tmp_path / f"{name}.log" for name in ("a", "b", "a-again")])
        await sleep(0.5)
        assert len(sidecars()) == 2
        reasons = assert_every_frame_in_a_recording(sidecars(), {AGENT: agent, CALLER: caller})
        assert "recovered" in reasons
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)
