"""Faults of the spool and the archive: full disks, damaged entries, long ids, refused keys.

Plain objects on a Clock for the retry logic; real recorders, a real tmpfs
(mounted here; the tests run as root) and moto's S3 server for the rest.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import random
import subprocess
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from conftest import independent_decode, read_pcm16_wav
from s3server import (  # noqa: F401
    aws_credentials, bucket, s3_auth_enforced, s3_client, s3_endpoint, s3_server,
)
from test_archive_s3 import objects, until
from test_service import AGENT, CALLER, frames, record_call, sleep
from evrecorder import archiver as archiver_module, keys, salvage
from evrecorder.archiver import RESCAN_SECONDS, RETRY_FILE, RETRY_POLL_SECONDS, Archiver
from evrecorder.finalize import finalize
from evrecorder.s3store import S3Store
from evrecorder.settings import Settings
from evrecorder.spool import Spool, ids_from_name
from evrecorder.stores import LocalStore, MemoryStore, StoreError

T0 = 1_700_000_000.0
FAST_RETRY = dict(retry_initial=0.05, retry_max=0.3)


# -- helpers -----------------------------------------------------------------

def spooled_call(spool: Spool, call_id="c1", session_id="1", agent=(), caller=(), ended=True,
                 at=T0):
    """A call written to the spool as the recorder writes one; returns the entry (unlocked)."""
    entry = spool.new_call(call_id, session_id, at)
    entry.create({"callId": call_id, "sessionId": session_id, "connectedAt": at,
                  "createdAt": at, "metadata": {"callId": call_id, "agentId": "7"}, "query": {}})
    for perspective, audio in ((AGENT, agent), (CALLER, caller)):
        if audio:
            entry.append_event({"event": "media", "perspective": perspective, "at": at,
                                "offsetFrames": 0, "firstSequenceId": 1})
    for i in range(max(len(agent), len(caller))):
        if i < len(agent):
            entry.append_frame(AGENT, i + 1, agent[i])
        if i < len(caller):
            entry.append_frame(CALLER, i + 1, caller[i])
    entry.flush()
    if ended:
        entry.append_event({"event": "end", "reason": "stop", "complete": True, "at": at + 2})
    entry.close()
    entry.unlock()
    return entry


def sync_archiver(spool: Spool, store, clock=None, **settings) -> tuple[Archiver, Clock]:
    """An Archiver that runs its blocking work at once, on a Clock."""
    clock = clock or Clock()
    clock.advance(T0 + 10)
    archiver = Archiver(spool, store, Settings(spool=spool.root, **settings), clock,
                        run_blocking=lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw))
    return archiver, clock


class LogCapture:
    """Twisted log events while in a ``with`` block."""

    def __enter__(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.events.append)

    def texts(self, *words) -> list[str]:
        out = [formatEvent(e) or "" for e in self.events]
        return [t for t in out if all(w in t for w in words)]

    def tracebacks(self) -> int:
        return sum(1 for e in self.events if e.get("log_failure") is not None)


def wav_of(store: MemoryStore) -> tuple[str, bytes, dict]:
    """The one recording in a MemoryStore: key, WAV bytes, sidecar."""
    [key] = [k[:-4] for k in store.objects if k.endswith(".wav")]
    return key, store.objects[key + ".wav"], json.loads(store.objects[key + ".json"])


def decoded_channels(wav: bytes, tmp_path) -> tuple[list[int], list[int]]:
    path = tmp_path / f"{uuid.uuid4().hex}.wav"
    path.write_bytes(wav)
    return read_pcm16_wav(str(path))


# -- keys and names ----------------------------------------------------------

def test_long_ids_give_bounded_distinct_keys():
    """10,000-character ids make keys with parts under 255 bytes, under 1,024 bytes, still distinct."""
    long_a, long_b = "x" * 9999 + "a", "x" * 9999 + "b"
    got = set()
    for call_id in (long_a, long_b):
        fields = keys.key_fields({"callId": call_id, "sessionId": call_id, "agentId": call_id}, {}, T0)
        for template in (keys.DEFAULT_TEMPLATE, "{callId}{sessionId}{agentId}{callId}",
                         "/".join(["{callId}-{agentId}-{sessionId}"] * 12)):
            key = keys.format_key(template, fields)
            assert len(key.encode()) <= keys.KEY_MAX < 1024 - 200
            assert max(len(p.encode()) for p in key.split("/")) <= keys.PART_MAX < 255 - 20
            got.add((template, key))
    assert len(got) == 6  # each template gives the two ids two keys
    short = keys.key_fields({"callId": "12345", "sessionId": 2}, {}, T0)
    assert keys.format_key(keys.DEFAULT_TEMPLATE, short) == "2023/11/14/12345-2"


def test_spool_entry_names_are_bounded_and_name_their_call(tmp_path):
    """An entry's name stays under 255 bytes for any ids, and gives short ids back exactly."""
    spool = Spool(str(tmp_path))
    for call_id, session_id in (("a/b+c_d é\n", "x y"), ("12345", "2"), ("", "-")):
        name = os.path.basename(spool.new_call(call_id, session_id, T0).path)
        assert ids_from_name(name) == {"callId": call_id, "sessionId": session_id,
                                       "connectedAt": T0, "idsComplete": True}
    name = os.path.basename(spool.new_call("é" * 10000, "s" * 10000, T0).path)
    assert len(name.encode()) < 200 and ids_from_name(name)["idsComplete"] is False
    assert ids_from_name(name)["callId"].startswith("é" * 10)


# -- retries -------------------------------------------------------------------

def test_a_full_disk_is_retried_without_limit_and_logged_once(tmp_path, monkeypatch):
    """Finalizing on a full disk retries past any count, capped, one log line; then it lands."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    agent = frames(20, 1)
    spooled_call(spool, agent=agent)
    store = MemoryStore()
    archiver, clock = sync_archiver(spool, store, retry_initial=1.0, retry_max=8.0)
    failures = {"left": 40}
    real = archiver_module.finalize

    def full_disk(entry, settings):
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(entry, settings)

    monkeypatch.setattr(archiver_module, "finalize", full_disk)
    with LogCapture() as logs:
        archiver.startService()
        assert "finalizing calls fails" in archiver.not_ready()
        for _ in range(39):
            [call] = clock.getDelayedCalls() and [
                c for c in clock.getDelayedCalls() if c.func.__name__ == "again"]
            assert 0 < call.getTime() - clock.seconds() <= 8.0  # capped
            clock.advance(call.getTime() - clock.seconds())
        assert failures["left"] == 0 and not store.objects  # 40 failures, still trying
        clock.advance(8.0)
    key, wav, sidecar = wav_of(store)
    assert sidecar["endReason"] == "stop" and spool.entries() == []
    left, _ = decoded_channels(wav, tmp_path)
    assert left == independent_decode(b"".join(agent))
    assert len(logs.texts("No space left on device")) == 1 and logs.tracebacks() == 0
    assert archiver.not_ready() is None and archiver.set_aside == {}


def test_an_unexpected_failure_is_set_aside_and_tried_again_on_request(tmp_path, monkeypatch):
    """A bug sets the entry aside (one traceback, out of /readyz); rescans and <spool>/retry retry it."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    spooled_call(spool, agent=frames(5, 2))
    store = MemoryStore()
    archiver, clock = sync_archiver(spool, store)
    calls = []

    def bug(entry, settings):
        calls.append(entry.path)
        raise RuntimeError("a bug")

    monkeypatch.setattr(archiver_module, "finalize", bug)
    with LogCapture() as logs:
        archiver.startService()
        assert len(archiver.set_aside) == 1 and archiver.queue_depth == 0
        assert archiver.metrics.gauges["evrecorder_spool_set_aside"]() == 1
        assert archiver.not_ready() is None
        clock.advance(RESCAN_SECONDS)
        clock.advance(RESCAN_SECONDS)
        assert len(calls) == 3 and len(archiver.set_aside) == 1
        monkeypatch.undo()
        path = os.path.join(spool.root, RETRY_FILE)
        open(path, "w").close()
        os.utime(path, ns=(1, 1))  # "touched": a time the archiver has not seen
        clock.advance(RETRY_POLL_SECONDS)
    assert archiver.set_aside == {} and len(wav_of(store)) == 3 and spool.entries() == []
    assert logs.tracebacks() == 1  # not once per attempt
    assert len(logs.texts("set aside", "a bug")) == 1


def test_a_store_outage_is_retried_and_fails_readyz_only_after_a_while(tmp_path):
    """A failing store is retried with backoff; /readyz fails once it failed longer than allowed."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    spooled_call(spool, agent=frames(5, 3))
    store = MemoryStore()
    store.fail_with = "the S3 endpoint could not be reached"
    archiver, clock = sync_archiver(spool, store, retry_initial=1.0, retry_max=10.0,
                                    ready_max_queue_age=60.0)
    archiver.startService()
    assert archiver.not_ready() is None
    for _ in range(10):
        clock.advance(10.0)
    assert "the archive store has failed for" in archiver.not_ready()
    assert store.calls > 5
    store.fail_with = None
    clock.advance(10.0)
    assert archiver.not_ready() is None and len(wav_of(store)) == 3


# -- damaged entries -----------------------------------------------------------

@pytest.mark.parametrize("damage", ["missing", "garbled"])
def test_frames_without_a_header_are_archived_as_recovered(tmp_path, damage):
    """call.json gone or garbled, frames present: archived sample-exact, recovered, incomplete."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    agent, caller = frames(200, 4), frames(150, 5)
    entry = spooled_call(spool, call_id="call/é 1", session_id="7", agent=agent, caller=caller,
                         ended=False)
    header = os.path.join(entry.path, "call.json")
    if damage == "missing":
        os.unlink(header)
    else:
        with open(header, "w") as f:
            f.write('{"callId": "call/é 1", "meta')
    store = LocalStore(str(tmp_path / "archive"))
    archiver, _ = sync_archiver(spool, store)
    with LogCapture() as logs:
        archiver.startService()
    [json_path] = glob.glob(str(tmp_path / "archive" / "**" / "*.json"), recursive=True)
    sidecar = json.load(open(json_path))
    assert sidecar["callId"] == "call/é 1" and sidecar["sessionId"] == "7"
    assert sidecar["endReason"] == "recovered" and sidecar["complete"] is False
    assert sidecar["damage"]["headerLost"] is True and sidecar["damage"]["idsComplete"] is True
    assert sidecar["timing"]["connectedAt"] == "2023-11-14T22:13:20.000Z"
    left, right = read_pcm16_wav(json_path[:-5] + ".wav")
    assert left == independent_decode(b"".join(agent))
    assert right[: 150 * 160] == independent_decode(b"".join(caller))
    assert set(right[150 * 160:]) == {0}
    assert sidecar["perspectives"][AGENT]["frames"] == 200
    assert spool.entries() == []
    assert archiver.metrics.salvaged.labels("header")._value.get() == 1
    assert logs.texts("was damaged", "call.json was missing or unreadable")


def test_an_entry_that_provably_holds_nothing_is_removed_and_said(tmp_path):
    """No header and nothing but an empty frames file and events: removed, with a log line."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    empty = os.path.join(spool.calls_dir, "1700000000000-00000000+c+1")
    os.makedirs(empty)
    open(os.path.join(empty, "call.frames"), "wb").close()
    with open(os.path.join(empty, "events.jsonl"), "w") as f:
        f.write('{"event": "stop"}\n')
    archiver, _ = sync_archiver(spool, MemoryStore())
    with LogCapture() as logs:
        archiver.startService()
    assert not os.path.exists(empty) and logs.texts("removed", "crashed before it held anything")


@pytest.mark.parametrize("audio_name", ["call.chunks", "Participant.frames", "mystery.bin"])
def test_an_entry_without_header_that_may_hold_audio_is_never_removed(tmp_path, audio_name):
    """Any non-empty *.frames, *.chunks or unknown file counts as audio: never removed unarchived."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    name = "1700000000000-00000000+c+1"
    os.makedirs(os.path.join(spool.calls_dir, name))
    with open(os.path.join(spool.calls_dir, name, audio_name), "wb") as f:
        f.write(b"\x00\x01" * 7)  # too short for a record: nothing to place
    entry = spool.entries()[0]
    assert not salvage.holds_nothing(entry)
    if audio_name == "mystery.bin":
        archiver, _ = sync_archiver(spool, MemoryStore())
        archiver.startService()
        moved = os.path.join(spool.root, "quarantine", name, audio_name)
        assert open(moved, "rb").read() == b"\x00\x01" * 7
        assert archiver.metrics.quarantined._value.get() == 1
    else:
        assert salvage.audio_files(entry) == [audio_name]


def test_a_garbled_sidecar_is_rebuilt_from_the_wav(tmp_path):
    """A finalized entry whose sidecar.json is garbage is archived from its WAV, byte-exact, marked."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    agent = frames(50, 6)
    entry = spooled_call(spool, agent=agent)
    settings = Settings(spool=spool.root)
    finalize(entry, settings)
    wav = open(os.path.join(entry.path, "recording.wav"), "rb").read()
    with open(os.path.join(entry.path, "sidecar.json"), "wb") as f:
        f.write(b"\x00garbage{")
    store = MemoryStore()
    archiver, clock = sync_archiver(spool, store)
    with LogCapture() as logs:
        archiver.startService()
    assert logs.texts("archived c1/1")  # published and said, though the counts are lost
    key, got, sidecar = wav_of(store)
    assert got == wav and sidecar["audio"]["sha256"] == hashlib.sha256(wav).hexdigest()
    assert sidecar["audio"]["bytes"] == len(wav) and sidecar["audio"]["durationSeconds"] == 1.0
    assert sidecar["audio"]["encoding"] == "pcm16" and sidecar["callId"] == "c1"
    assert sidecar["damage"]["sidecarRebuilt"] is True and sidecar["complete"] is False
    assert key == "2023/11/14/c1-1" and spool.entries() == []
    clock.advance(3600)
    assert store.calls == 1  # not retried forever


def test_a_garbled_sidecar_with_its_frames_is_finalized_again(tmp_path):
    """A crash left the frames beside a garbled sidecar: finalized again from them, sample-exact."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    agent, caller = frames(30, 7), frames(30, 8)
    entry = spooled_call(spool, agent=agent, caller=caller)
    frames_path = os.path.join(entry.path, "call.frames")
    kept = open(frames_path, "rb").read()
    finalize(entry, Settings(spool=spool.root))
    with open(frames_path, "wb") as f:
        f.write(kept)
    with open(os.path.join(entry.path, "sidecar.json"), "w") as f:
        f.write('{"schema": "evrecorder/1", "audio": {}}')
    store = MemoryStore()
    archiver, _ = sync_archiver(spool, store)
    archiver.startService()
    _, wav, sidecar = wav_of(store)
    left, right = decoded_channels(wav, tmp_path)
    assert left == independent_decode(b"".join(agent))
    assert right == independent_decode(b"".join(caller))
    assert sidecar["endReason"] == "stop" and sidecar["perspectives"][CALLER]["frames"] == 30


def test_a_garbled_sidecar_and_wav_are_quarantined_not_deleted(tmp_path):
    """Sidecar and WAV both unreadable, frames gone: moved to quarantine with both files, counted."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spooled_call(spool, agent=frames(5, 9))
    finalize(entry, Settings(spool=spool.root))
    for name in ("sidecar.json", "recording.wav"):
        with open(os.path.join(entry.path, name), "wb") as f:
            f.write(b"not this")
    store = MemoryStore()
    archiver, clock = sync_archiver(spool, store)
    with LogCapture() as logs:
        archiver.startService()
        clock.advance(3600)
    moved = os.path.join(spool.root, "quarantine", os.path.basename(entry.path))
    assert sorted(os.listdir(moved)) == ["call.json", "events.jsonl", "reason.txt",
                                         "recording.wav", "sidecar.json.damaged"]
    assert "not a WAV file" in open(os.path.join(moved, "reason.txt")).read()
    assert store.objects == {} and spool.entries() == []
    assert archiver.metrics.quarantined._value.get() == 1
    assert logs.texts("cannot be recovered", "quarantine")


def test_a_wav_that_no_longer_matches_its_checksum_is_not_retried_forever(tmp_path):
    """A spooled WAV changed after finalize (bit rot): archived with a rebuilt, marked sidecar."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spooled_call(spool, agent=frames(20, 10))
    finalize(entry, Settings(spool=spool.root))
    path = os.path.join(entry.path, "recording.wav")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(data)
    store = LocalStore(str(tmp_path / "archive"))
    archiver, clock = sync_archiver(spool, store)
    archiver.startService()
    clock.advance(3600)
    [json_path] = glob.glob(str(tmp_path / "archive" / "**" / "*.json"), recursive=True)
    sidecar = json.load(open(json_path))
    assert open(json_path[:-5] + ".wav", "rb").read() == bytes(data)
    assert "does not match its checksum" in sidecar["damage"]["detail"]
    assert spool.entries() == []


# -- refused keys --------------------------------------------------------------

def test_a_key_the_file_system_refuses_falls_back(tmp_path):
    """An older version's unbounded key (ENAMETOOLONG) is archived under unkeyed/<date>/<sha256>."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    agent = frames(10, 11)
    entry = spooled_call(spool, agent=agent)
    settings = Settings(spool=spool.root)
    finalize(entry, settings)
    sidecar_path = os.path.join(entry.path, "sidecar.json")
    sidecar = json.load(open(sidecar_path))
    long_key = "2023/11/14/" + "x" * 10000 + "-1"
    sidecar["key"] = long_key
    json.dump(sidecar, open(sidecar_path, "w"))
    archive = tmp_path / "archive"
    archiver, _ = sync_archiver(spool, LocalStore(str(archive)))
    with LogCapture() as logs:
        archiver.startService()
    [json_path] = glob.glob(str(archive / "**" / "*.json"), recursive=True)
    key = os.path.relpath(json_path, archive)[:-5]
    ids = json.dumps(["c1", "1", sidecar["audio"]["sha256"]])
    assert key == "unkeyed/2023/11/14/" + hashlib.sha256(ids.encode()).hexdigest()
    archived = json.load(open(json_path))
    assert archived["key"] == key and archived["keyFallback"]["key"] == long_key
    assert "too long" in archived["keyFallback"]["reason"].lower()
    left, _ = read_pcm16_wav(json_path[:-5] + ".wav")
    assert left == independent_decode(b"".join(agent))
    assert archiver.metrics.key_fallbacks._value.get() == 1
    assert logs.texts("refused the key", "unkeyed/")


def test_a_store_refusing_every_key_is_retried_not_looped(tmp_path):
    """When the fallback key is refused too, the error is retried with backoff like an outage."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    spooled_call(spool, agent=frames(5, 12))
    store = MemoryStore()
    store.refuse_key = lambda key: "the store takes no keys today"
    archiver, clock = sync_archiver(spool, store, retry_initial=1.0, retry_max=4.0)
    archiver.startService()
    assert store.calls == 2  # the key, then the fallback; no busy loop
    clock.advance(4.0)
    assert store.calls == 4 and len(spool.entries()) == 1 and archiver.set_aside == {}
    store.refuse_key = None
    clock.advance(4.0)
    assert wav_of(store)[0] == "2023/11/14/c1-1"


def test_local_store_tells_refused_names_from_outages(tmp_path):
    """LocalStore: a name too long is permanent; a spooled file that cannot be read is not the store's."""
    wav = tmp_path / "r.wav"
    wav.write_bytes(b"RIFF")
    from evrecorder.stores import PublishItem

    item = PublishItem(key="a/" + "y" * 300, wav_path=str(wav),
                       wav_sha256=hashlib.sha256(b"RIFF").hexdigest(), wav_size=4,
                       sidecar_for=lambda key: b"{}")
    store = LocalStore(str(tmp_path / "archive"))
    with pytest.raises(StoreError) as refused:
        store.publish(item)
    assert refused.value.permanent and not refused.value.spooled
    item.key, item.wav_path = "a/b", str(tmp_path / "gone.wav")
    with pytest.raises(StoreError) as unread:
        store.publish(item)
    assert unread.value.spooled and not unread.value.permanent


@pytest.mark.parametrize("code,status,permanent", [
    ("KeyTooLongError", 400, True), ("InvalidObjectName", 400, True),
    ("SlowDown", 503, False), ("AccessDenied", 403, False), ("InternalError", 500, False),
    ("InvalidArgument", 400, False), ("RequestTimeout", 400, False),
])
def test_s3_errors_that_refuse_the_key_are_permanent(tmp_path, code, status, permanent):
    """Only the S3 errors about the key itself are permanent; outages, throttling and access are not."""
    import boto3
    from botocore.stub import Stubber

    from evrecorder.stores import PublishItem

    client = boto3.session.Session().client(
        "s3", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    wav = tmp_path / "r.wav"
    wav.write_bytes(b"RIFF")
    item = PublishItem(key="k", wav_path=str(wav), wav_sha256=hashlib.sha256(b"RIFF").hexdigest(),
                       wav_size=4, sidecar_for=lambda key: b"{}")
    with Stubber(client) as stub:
        stub.add_client_error("head_object", service_error_code=code, http_status_code=status)
        with pytest.raises(StoreError) as failed:
            S3Store("b", client=client).publish(item)
    assert failed.value.permanent is permanent


def test_s3_keys_over_1024_bytes_are_refused_before_sending(tmp_path):
    """An object key over S3's 1,024 bytes is a permanent error at once, with no request."""
    from evrecorder.stores import PublishItem

    class NoClient:
        class meta:
            class events:
                @staticmethod
                def register(*a, **kw):
                    pass

        def __getattr__(self, name):
            raise AssertionError("no request may be sent")

    item = PublishItem(key="k" * 900, wav_path="/nonexistent", wav_sha256="0" * 64, wav_size=4,
                       sidecar_for=lambda key: b"{}")
    with pytest.raises(StoreError) as failed:
        S3Store("b", prefix="p" * 120, client=NoClient()).publish(item)
    assert failed.value.permanent and "1024 bytes" in str(failed.value)


# -- end to end: long ids ------------------------------------------------------

LONG_ID = "L" * 9990 + "0123456789"


@pytest.mark.parametrize("where", ["metadata", "query"])
@pytest_twisted.ensureDeferred
async def test_a_10000_character_call_id_is_archived_locally(recorder_factory, where):
    """A 10,000-character callId (Start metadata or query) is archived sample-exact, key bounded."""
    rec = await recorder_factory(**FAST_RETRY)
    agent, caller = frames(40, 13), frames(40, 14)
    if where == "metadata":
        code, _ = await record_call(rec, agent, caller, call_id=LONG_ID)
    else:
        pre = [{"event": "Connected"},
               {"event": "Start", "metadata": {"contentType": "audio/x-mulaw"}}]
        code, _ = await record_call(rec, agent, caller, pre=pre,
                                    query={"callId": LONG_ID, "sessionId": "2"})
    assert code == 1000
    [sidecar] = await rec.archived()
    assert sidecar["callId"] == LONG_ID and sidecar[where]["callId"] == LONG_ID
    key = os.path.relpath(sidecar["_wav"], rec.archive)[:-4]
    assert key == sidecar["key"] and len(key) < 200
    assert key.startswith("20") and "L" * 60 in key
    left, right = read_pcm16_wav(sidecar["_wav"])
    assert left == independent_decode(b"".join(agent))
    assert right == independent_decode(b"".join(caller))


@pytest_twisted.ensureDeferred
async def test_a_10000_character_call_id_is_archived_to_s3(recorder_factory, s3_client, bucket,
                                                           s3_endpoint, tmp_path):
    """The same call lands in S3 (moto) at a bounded key, the sidecar holding the whole id."""
    rec = await recorder_factory(store=S3Store(bucket, "calls/", endpoint_url=s3_endpoint),
                                 **FAST_RETRY)
    agent = frames(40, 15)
    assert (await record_call(rec, agent, [], call_id=LONG_ID))[0] == 1000
    await until(lambda: len(objects(s3_client, bucket)) == 2, what="two objects")
    stored = objects(s3_client, bucket)
    [wav_key] = [k for k in stored if k.endswith(".wav")]
    assert len(wav_key.encode()) < 1024 - 200
    sidecar = json.loads(stored[wav_key[:-4] + ".json"])
    assert sidecar["callId"] == LONG_ID
    (tmp_path / "got.wav").write_bytes(stored[wav_key])
    left, _ = read_pcm16_wav(str(tmp_path / "got.wav"))
    assert left == independent_decode(b"".join(agent))


@pytest_twisted.ensureDeferred
async def test_s3_refusing_a_key_gets_the_fallback_key(recorder_factory, s3_client, bucket,
                                                       s3_endpoint):
    """With a long prefix the key would pass S3's 1,024 bytes: it lands under unkeyed/, said so."""
    prefix = "p" * 800 + "/"
    rec = await recorder_factory(
        store=S3Store(bucket, prefix, endpoint_url=s3_endpoint),
        key_template="{callId}/{sessionId}/{accountId}", **FAST_RETRY)
    agent = frames(10, 16)
    pre = [{"event": "Connected"},
           {"event": "Start", "metadata": {"callId": LONG_ID, "sessionId": LONG_ID,
                                           "accountId": LONG_ID, "contentType": "audio/x-mulaw"}}]
    assert (await record_call(rec, agent, [], pre=pre))[0] == 1000
    await until(lambda: len(objects(s3_client, bucket)) == 2, what="two objects")
    stored = objects(s3_client, bucket)
    [wav_key] = [k for k in stored if k.endswith(".wav")]
    assert wav_key.startswith(prefix + "unkeyed/") and len(wav_key.encode()) <= 1024
    sidecar = json.loads(stored[wav_key[:-4] + ".json"])
    assert sidecar["key"] == wav_key[len(prefix):-4]
    assert sidecar["keyFallback"]["key"].startswith("L" * 60)
    assert "1024 bytes" in sidecar["keyFallback"]["reason"]
    assert hashlib.sha256(stored[wav_key]).hexdigest() == sidecar["audio"]["sha256"]


@pytest_twisted.ensureDeferred
async def test_a_recorder_recovers_frames_whose_header_was_removed(recorder_factory, tmp_path):
    """A spool entry with call.json removed and frames present is archived at start, sample-exact."""
    spool = Spool(str(tmp_path / "crashed-spool"))
    spool.prepare()
    agent, caller = frames(200, 17), frames(200, 18)
    entry = spooled_call(spool, call_id="crash-1", session_id="3", agent=agent, caller=caller,
                         ended=False)
    os.unlink(os.path.join(entry.path, "call.json"))
    rec = await recorder_factory(spool=spool.root)
    [sidecar] = await rec.archived()
    assert (sidecar["callId"], sidecar["sessionId"]) == ("crash-1", "3")
    assert sidecar["endReason"] == "recovered" and sidecar["complete"] is False
    assert sidecar["damage"]["headerLost"] is True
    left, right = read_pcm16_wav(sidecar["_wav"])
    assert left == independent_decode(b"".join(agent))
    assert right == independent_decode(b"".join(caller))
    await until(lambda: not os.listdir(spool.calls_dir), what="the entry to go")


# -- end to end: a real full disk (tmpfs) ----------------------------------------

def _mount_tmpfs(path, size: str) -> None:
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): "
                    "the full-disk tests need root and mount permission")


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs file systems under tmp_path (skips where mounting is not permitted).

    Ask for it before ``recorder_factory``: it is unmounted after the recorders stop."""
    mounted = []

    def mount(name: str, size: str = "8m"):
        path = tmp_path / name
        _mount_tmpfs(path, size)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory) -> str:
    """Write a file in ``directory`` until the file system is full; return its path."""
    path = os.path.join(directory, "filler")
    block = b"\xaa" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        try:
            while True:
                f.write(b"\xaa" * 512)
        except OSError:
            pass
    return path


@pytest_twisted.ensureDeferred
async def test_calls_ending_on_a_full_spool_are_archived_when_space_returns(tmpfs,
                                                                            recorder_factory):
    """Calls that end while the spool disk is full are archived without a restart once it is freed."""
    spool_dir = tmpfs("spool", "8m")
    rec = await recorder_factory(spool=str(spool_dir), metrics=True, **FAST_RETRY)
    rec.service.archiver.spool_min_free = 256 * 1024
    from test_service import reactor
    from wsclient import connect, connected, media, start, stop

    calls = []
    for n in range(3):
        conn = await connect(reactor(), rec.port)
        agent = frames(100, 30 + n)
        conn.send_all([connected(), start(f"full-{n}", 1)])
        for i, payload in enumerate(agent):
            conn.send(media(AGENT, i + 1, payload))
        calls.append((conn, agent))
    await until(lambda: sum(rec.service.metrics.media_counts()[0].values()) == 300,
                what="every frame handled")
    await sleep(0.2)
    filler = fill(spool_dir)
    assert (await rec.http_get("/readyz"))[0] == 503
    with LogCapture() as logs:
        for conn, _ in calls:
            conn.send(stop())
        await until(lambda: len(rec.service.archiver._attempts) == 3
                    and min(rec.service.archiver._attempts.values()) >= 3,
                    what="three failed finalizes each")
        code, text = await rec.http_get("/readyz")
        assert code == 503 and "spool" in text
        assert not glob.glob(os.path.join(rec.archive, "**", "*.json"), recursive=True)
        os.unlink(filler)
        sidecars = await rec.archived(3, timeout=20)
    assert logs.tracebacks() == 0
    # One line per entry, though each failed at least three times.
    assert len(logs.texts("finalizing", "No space left on device")) == 3
    for sidecar, (_, agent) in zip(sorted(sidecars, key=lambda s: s["callId"]), calls):
        left, _ = read_pcm16_wav(sidecar["_wav"])
        assert left == independent_decode(b"".join(agent))
    assert (await rec.http_get("/readyz")) == (200, "ok\n")
    from test_operate import metric

    text = (await rec.http_get("/metrics"))[1]
    assert metric(text, "evrecorder_spool_set_aside") == 0
    assert metric(text, "evrecorder_spool_quarantined_total") == 0
    assert metric(text, "evrecorder_calls_archived_total", end_reason="stop") == 3


@pytest_twisted.ensureDeferred
async def test_a_full_archive_disk_delays_and_fails_readyz_then_lands(tmpfs, recorder_factory):
    """A full archive file system: publishes retry, /readyz fails after a while; freed, they land."""
    archive = tmpfs("archive", "4m")
    filler = fill(archive)
    rec = await recorder_factory(store=LocalStore(str(archive)), metrics=True,
                                 ready_max_queue_age=0.5, **FAST_RETRY)
    rec.archive = str(archive)
    agent = frames(100, 40)
    with LogCapture() as logs:
        assert (await record_call(rec, agent, [], call_id="arch-full"))[0] == 1000
        await until(lambda: rec.service.metrics.archive_failures._value.get() >= 3,
                    what="three failed publishes")
        await sleep(0.6)
        code, text = await rec.http_get("/readyz")
        assert code == 503 and "archive store has failed" in text, (code, text)
        os.unlink(filler)
        [sidecar] = await rec.archived(1, timeout=20)
    left, _ = read_pcm16_wav(sidecar["_wav"])
    assert left == independent_decode(b"".join(agent))
    assert len(logs.texts("archiving", "No space left on device")) == 1
    assert (await rec.http_get("/readyz")) == (200, "ok\n")


@pytest_twisted.ensureDeferred
async def test_a_read_only_spool_fails_readyz(tmpfs, recorder_factory):
    """A spool remounted read-only makes /readyz answer 503 with the reason; writable again, 200."""
    spool_dir = tmpfs("spool", "8m")
    rec = await recorder_factory(spool=str(spool_dir), metrics=True)
    rec.service.archiver.spool_min_free = 256 * 1024
    assert (await rec.http_get("/readyz")) == (200, "ok\n")
    subprocess.run(["mount", "-o", "remount,ro", str(spool_dir)], check=True)
    try:
        code, text = await rec.http_get("/readyz")
        assert code == 503 and "read-only" in text
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(spool_dir)], check=True)
    assert (await rec.http_get("/readyz")) == (200, "ok\n")


def test_a_copy_cut_by_a_full_archive_leaves_no_partial_wav(tmpfs, monkeypatch):
    """Without hard links, a WAV copy that hits ENOSPC is removed: freed, the recording lands at K."""
    from evrecorder import stores
    from evrecorder.stores import PublishItem

    archive = tmpfs("archive", "1m")
    spool_dir = tmpfs("spool", "2m")
    data = bytes(range(256)) * 1600  # 400 KiB: a temporary copy fits, a second does not
    wav = spool_dir / "r.wav"
    wav.write_bytes(data)
    with open(archive / "filler", "wb") as f:
        f.write(b"\xaa" * (1024 * 1024 - 600 * 1024))

    def no_hard_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(stores.os, "link", no_hard_links)
    store = LocalStore(str(archive))
    item = PublishItem(key="d/k", wav_path=str(wav), wav_sha256=hashlib.sha256(data).hexdigest(),
                       wav_size=len(data), sidecar_for=lambda key: b"{}")
    with pytest.raises(StoreError) as full:
        store.publish(item)
    assert "No space left" in str(full.value) and not full.value.permanent
    assert os.listdir(archive / "d") == []  # neither the partial WAV nor the temporary copy
    os.unlink(archive / "filler")
    assert store.publish(item) == "d/k"
    assert (archive / "d" / "k.wav").read_bytes() == data


def test_audio_that_finalize_cannot_read_is_never_published_away(tmp_path):
    """Header lost and audio in a file finalize does not take: set aside, the file kept."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spooled_call(spool, call_id="g1", agent=frames(5, 50), ended=False)
    os.unlink(os.path.join(entry.path, "call.json"))
    with open(os.path.join(entry.path, "other.chunks"), "wb") as f:
        f.write(b"\x01" * 500)
    store = MemoryStore()
    archiver, _ = sync_archiver(spool, store)
    archiver.startService()
    assert store.objects == {} and len(archiver.set_aside) == 1
    assert open(os.path.join(entry.path, "other.chunks"), "rb").read() == b"\x01" * 500
    assert "other.chunks unread" in next(iter(archiver.set_aside.values()))[1]


def test_a_lost_header_beside_call_chunks_is_rebuilt_as_a_grpc_one(tmp_path):
    """Frames of the gRPC door (call.chunks) without call.json: the rebuilt header says source grpc."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spool.new_call("dialog-9", "sess-1", T0)
    os.makedirs(entry.path)
    with open(os.path.join(entry.path, "call.chunks"), "wb") as f:
        f.write(b"\x00" * 400)
    with open(os.path.join(entry.path, "call.json"), "w") as f:
        f.write('{"source": "grpc", "accountId": "acc-3", "metadata": {"account": {"id": "acc-3"}}')
    assert salvage.read_header(entry) is None
    header = salvage.restore_header(entry)
    assert header["source"] == "grpc" and header["callId"] == "dialog-9"
    assert header["sessionId"] == "sess-1" and header["connectedAt"] == T0
    assert salvage.read_header(entry) == header
    assert open(os.path.join(entry.path, "call.json.damaged")).read().startswith('{"source"')


def test_an_event_line_cut_by_a_full_disk_does_not_swallow_the_next(tmpfs):
    """A full spool cuts an event line short; once space returns, the next event is read again."""
    root = tmpfs("spool", "256k")
    spool = Spool(str(root))
    spool.prepare()
    entry = spool.new_call("torn-1", "1", T0)
    entry.create({"callId": "torn-1", "sessionId": "1", "connectedAt": T0, "createdAt": T0,
                  "metadata": {}, "query": {}})
    entry.append_event({"event": "media", "perspective": AGENT, "at": T0, "offsetFrames": 0,
                        "firstSequenceId": 1})
    filler = fill(root)
    with pytest.raises(OSError) as full:
        entry.append_event({"event": "stop", "perspective": AGENT, "metadata": {"x": "y" * 9000}})
    assert full.value.errno == errno.ENOSPC
    with open(os.path.join(entry.path, "events.jsonl"), "rb") as f:
        assert b'"event":"stop"' in f.read()  # a part of the line was taken: torn
    os.unlink(filler)
    entry.append_event({"event": "end", "reason": "stop", "complete": True, "at": T0 + 1})
    entry.close()
    assert [e["event"] for e in entry.read_events()] == ["media", "end"]


def test_when_the_disk_works_again_waiting_calls_follow_at_once(tmp_path, monkeypatch):
    """After long backoffs on a full disk, the first finalize that succeeds brings the others forward."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    for n in range(3):
        spooled_call(spool, call_id=f"w{n}", agent=frames(5, 60 + n))
    store = MemoryStore()
    archiver, clock = sync_archiver(spool, store, retry_initial=1.0, retry_max=300.0)
    real = archiver_module.finalize
    full = {"on": True}

    def maybe_full(entry, settings):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(entry, settings)

    monkeypatch.setattr(archiver_module, "finalize", maybe_full)
    random.seed(10)
    archiver.startService()
    for _ in range(12):  # backoffs grow to minutes
        clock.advance(300.0)
    retries = sorted(c.getTime() - clock.seconds() for c in clock.getDelayedCalls()
                     if c.func.__name__ == "again")
    assert len(retries) == 3 and retries[1] - retries[0] > 2.0  # far apart
    full["on"] = False
    clock.advance(retries[0])  # one finalize succeeds
    clock.advance(1.0)  # the others within retry_initial, not minutes later
    assert len([k for k in store.objects if k.endswith(".wav")]) == 3


def test_a_grpc_entry_that_lost_its_header_is_archived_sample_exact(tmp_path):
    """gRPC chunks without call.json: archived as recovered, each channel sample-exact."""
    grpc_entry = pytest.importorskip(
        "grpc_entry", reason="the gRPC spool format's test helpers come with the gRPC finalize")
    from test_assemble import stream_chunks

    e = grpc_entry.Entry(tmp_path)
    c = e.segment("c", "CONTACT", "contact-1")
    a = e.segment("a", "AGENT", "agent-7")
    caller = stream_chunks(e, c, T0 + 0.5, 30, seed=1)
    agent = stream_chunks(e, a, T0 + 0.505, 30, seed=2)
    e.write_chunks()
    e.entry.close()
    e.entry.unlock()
    os.unlink(os.path.join(e.entry.path, "call.json"))
    store = MemoryStore()
    archiver, _ = sync_archiver(e.spool, store)
    archiver.startService()
    key, wav, sidecar = wav_of(store)
    assert key == "2023/11/14/dlg-1-sess-1" and sidecar["source"] == "grpc"
    assert sidecar["endReason"] == "recovered" and sidecar["damage"]["headerLost"] is True
    (tmp_path / "got.wav").write_bytes(wav)
    _, left, right = grpc_entry.read_wav(str(tmp_path / "got.wav"))
    assert left == grpc_entry.decode(b"".join(agent[s] for s in sorted(agent)), "PCMU")
    assert right == grpc_entry.decode(b"".join(caller[s] for s in sorted(caller)), "PCMU")


def test_a_request_file_in_a_retry_directory_retries_and_is_consumed(tmp_path, monkeypatch):
    """<spool>/retry/<entry> (a tool's request) retries what was set aside, then is removed."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spooled_call(spool, agent=frames(5, 70))
    store = MemoryStore()
    archiver, clock = sync_archiver(spool, store)
    monkeypatch.setattr(archiver_module, "finalize", lambda e, s: 1 / 0)
    os.makedirs(os.path.join(spool.root, RETRY_FILE))
    archiver.startService()
    assert len(archiver.set_aside) == 1
    monkeypatch.undo()
    clock.advance(RETRY_POLL_SECONDS)
    assert len(archiver.set_aside) == 1  # nothing asked yet
    request = os.path.join(spool.root, RETRY_FILE, os.path.basename(entry.path))
    with open(request, "w") as f:
        f.write("{}")
    os.utime(os.path.join(spool.root, RETRY_FILE), ns=(2, 2))
    clock.advance(RETRY_POLL_SECONDS)
    assert archiver.set_aside == {} and len(wav_of(store)) == 3
    assert os.listdir(os.path.join(spool.root, RETRY_FILE)) == []
    clock.advance(RETRY_POLL_SECONDS)  # its own removal is no new request
    assert store.calls == 1


def test_a_frame_id_damaged_on_disk_is_dropped_not_filled_with_silence(tmp_path):
    """A call.frames record whose id was corrupted is dropped and counted, not
    reached by gigabytes of silence; the frames around it are placed as sent."""
    from evrecorder.finalize import finalize
    from evrecorder.settings import Settings
    from evrecorder.spool import CALL_RECORD, Spool

    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spool.new_call("damaged", "1", 1000.0)
    entry.create({"callId": "damaged", "sessionId": "1", "metadata": {}, "query": {},
                  "connectedAt": 1000.0, "createdAt": 1000.0})
    entry.append_event({"event": "media", "perspective": "Participant", "at": 1000.0,
                        "offsetFrames": 0, "firstSequenceId": 1})
    entry.close()
    payloads = [bytes([i]) * 160 for i in range(1, 11)]
    seqs = [1, 2, 3, 4, 5, 1 << 60, 7, 8, 9, 10]  # frame 6's id is damaged
    with open(os.path.join(entry.path, "call.frames"), "wb") as f:
        for seq, payload in zip(seqs, payloads):
            f.write(CALL_RECORD.pack(0, seq, len(payload)) + payload)
    sidecar = finalize(entry, Settings(spool=spool.root, reorder_window=2))
    agent = sidecar["perspectives"]["Participant"]
    assert agent["outOfRange"] == 1
    assert (agent["frames"], agent["missing"]) == (9, 1)
    assert sidecar["audio"]["durationSeconds"] == 10 * 0.02
    assert "outOfRange" not in sidecar["perspectives"]["Conference"]


def test_a_retry_request_for_a_quarantined_entry_brings_it_back(tmp_path):
    """`evrecorder spool --retry NAME` of a quarantined entry, once mended, archives it."""
    from evrecorder import audit

    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spooled_call(spool, agent=frames(5, 9))
    finalize(entry, Settings(spool=spool.root))
    wav_path = os.path.join(entry.path, "recording.wav")
    good = open(wav_path, "rb").read()
    for name in ("sidecar.json", "recording.wav"):
        with open(os.path.join(entry.path, name), "wb") as f:
            f.write(b"not this")
    store = MemoryStore()
    archiver, clock = sync_archiver(spool, store)
    archiver.startService()
    name = os.path.basename(entry.path)
    moved = os.path.join(spool.root, "quarantine", name)
    assert os.path.isdir(moved) and store.objects == {}
    with open(os.path.join(moved, "recording.wav"), "wb") as f:
        f.write(good)  # the operator mends it from a copy
    audit.request_retry(spool.root, name, T0)
    clock.advance(RETRY_POLL_SECONDS)
    key, wav, sidecar = wav_of(store)
    assert wav == good and sidecar["damage"]["sidecarRebuilt"] is True
    assert os.listdir(os.path.join(spool.root, "quarantine")) == []
    assert os.listdir(os.path.join(spool.root, RETRY_FILE)) == []
    assert spool.entries() == []


def test_an_entry_removed_under_the_archiver_releases_its_lock(tmp_path):
    """An entry removed by an operator before its finalize leaves no descriptor or claim behind."""
    import shutil

    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spooled_call(spool, agent=frames(5, 9))
    archiver, clock = sync_archiver(spool, MemoryStore())
    fds = len(os.listdir("/proc/self/fd"))
    assert entry.lock() and spool.held == {entry}
    shutil.rmtree(entry.path)
    archiver.finalize(entry)
    assert spool.held == set()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_spool_read_error_after_a_refused_key_is_retried_not_repaired(tmp_path):
    """The fallback publish failing to read the spooled WAV is a disk error to retry:
    the sidecar is kept, and no recording is made up from what is left."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spooled_call(spool, agent=frames(10, 11))
    finalize(entry, Settings(spool=spool.root))
    sidecar_path = os.path.join(entry.path, "sidecar.json")
    sidecar = json.load(open(sidecar_path))
    sidecar["key"] = "x" * 10000 + "/c1-1"  # an older version's key: refused (ENAMETOOLONG)
    json.dump(sidecar, open(sidecar_path, "w"))
    wav_path = os.path.join(entry.path, "recording.wav")
    wav = open(wav_path, "rb").read()
    os.rename(wav_path, wav_path + ".away")  # unreadable for now
    archive = tmp_path / "archive"
    archiver, clock = sync_archiver(spool, LocalStore(str(archive)), retry_initial=1.0,
                                    retry_max=4.0)
    with LogCapture() as logs:
        archiver.startService()
    assert json.load(open(sidecar_path)) == sidecar
    assert glob.glob(str(archive / "**" / "*.wav"), recursive=True) == []
    assert archiver.set_aside == {} and logs.texts("retrying in", "reading the spooled")
    os.rename(wav_path + ".away", wav_path)
    clock.advance(4.0)
    [json_path] = glob.glob(str(archive / "**" / "*.json"), recursive=True)
    archived = json.load(open(json_path))
    assert "damage" not in archived and archived["perspectives"] == sidecar["perspectives"]
    assert open(json_path[:-5] + ".wav", "rb").read() == wav


def test_a_garbled_sidecar_without_its_wav_is_quarantined_not_made_empty(tmp_path):
    """Sidecar unreadable, WAV and frames gone: quarantined, never archived as an empty call."""
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spooled_call(spool, agent=frames(5, 9))
    finalize(entry, Settings(spool=spool.root))
    with open(os.path.join(entry.path, "sidecar.json"), "wb") as f:
        f.write(b"not this")
    os.unlink(os.path.join(entry.path, "recording.wav"))
    store = MemoryStore()
    archiver, clock = sync_archiver(spool, store)
    archiver.startService()
    clock.advance(3600)
    assert store.objects == {} and spool.entries() == []
    moved = os.path.join(spool.root, "quarantine", os.path.basename(entry.path))
    assert "sidecar.json.damaged" in os.listdir(moved)
    assert archiver.metrics.quarantined._value.get() == 1


def test_a_checksum_that_a_repair_does_not_cure_is_set_aside_not_looped(tmp_path, monkeypatch):
    """When every copy fails its checksum (a faulty archive disk), the entry is repaired
    once, then set aside for the rescan: no loop without backoff, the first sidecar kept."""
    from evrecorder import stores

    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spooled_call(spool, agent=frames(5, 13))
    finalize(entry, Settings(spool=spool.root))
    original = open(os.path.join(entry.path, "sidecar.json"), "rb").read()
    hashed = []
    real = stores.sha256_file

    def corrupted_copies(path, *a):
        hashed.append(path)
        return "0" * 64 if len(hashed) < 50 else real(path, *a)

    monkeypatch.setattr(stores, "sha256_file", corrupted_copies)
    archiver, clock = sync_archiver(spool, LocalStore(str(tmp_path / "archive")))
    archiver.startService()
    assert len(hashed) == 2 and len(archiver.set_aside) == 1
    assert open(os.path.join(entry.path, "sidecar.json.damaged"), "rb").read() == original


def test_a_call_recorded_under_a_longer_max_duration_keeps_its_frames(tmp_path):
    """Finalized after --max-call-duration was lowered, a spooled call keeps the
    frames it was allowed when recorded (its header says the bound)."""
    from evrecorder.finalize import finalize
    from evrecorder.settings import Settings
    from evrecorder.spool import CALL_RECORD, Spool

    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    entry = spool.new_call("long", "1", 1000.0)
    entry.create({"callId": "long", "sessionId": "1", "metadata": {}, "query": {},
                  "connectedAt": 1000.0, "createdAt": 1000.0, "maxCallDuration": 14400.0})
    entry.append_event({"event": "media", "perspective": "Participant", "at": 1000.0,
                        "offsetFrames": 0, "firstSequenceId": 1})
    entry.close()
    with open(os.path.join(entry.path, "call.frames"), "wb") as f:
        for seq in (1, 2, 3, 3000, 3001):  # a minute in: beyond a 10 s bound
            f.write(CALL_RECORD.pack(0, seq, 160) + b"\x11" * 160)
    sidecar = finalize(entry, Settings(spool=spool.root, reorder_window=2, max_call_duration=10))
    agent = sidecar["perspectives"]["Participant"]
    assert "outOfRange" not in agent
    assert agent["frames"] == 5 and agent["lastSequenceId"] == "3001"
