"""The recorder archiving to S3 (moto's server on loopback, or EVRECORDER_TEST_S3_ENDPOINT)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from s3server import (  # noqa: F401
    aws_credentials, bucket, s3_auth_enforced, s3_client, s3_endpoint, s3_server,
)
from test_service import AGENT, frames, read_pcm16_wav, record_call, sleep
from conftest import independent_decode
from evrecorder.s3store import S3Store

FAST_RETRY = dict(retry_initial=0.05, retry_max=0.3)


def spool_entries(rec) -> list[str]:
    return os.listdir(os.path.join(rec.settings.spool, "calls"))


async def until(predicate, timeout=20.0, what="condition"):
    from twisted.internet import reactor

    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.05)


def objects(client, bucket_name: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket_name):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket_name, Key=obj["Key"])["Body"].read()
    return out


@pytest_twisted.ensureDeferred
async def test_call_lands_in_s3_verified(recorder_factory, s3_client, bucket, s3_endpoint, tmp_path):
    """A recorded call lands as K.wav then K.json, bytes and checksum matching the sidecar."""
    rec = await recorder_factory(store=S3Store(bucket, "calls/", endpoint_url=s3_endpoint))
    agent, caller = frames(50, 90), frames(50, 91)
    assert (await record_call(rec, agent, caller, call_id="s3-1"))[0] == 1000
    await until(lambda: len(objects(s3_client, bucket)) == 2, what="two objects")
    await until(lambda: not spool_entries(rec), what="the spool entry to go")
    stored = objects(s3_client, bucket)
    [wav_key] = [k for k in stored if k.endswith(".wav")]
    assert wav_key.startswith("calls/") and wav_key.endswith("/s3-1-2.wav")
    sidecar = json.loads(stored[wav_key[:-4] + ".json"])
    assert sidecar["audio"]["sha256"] == hashlib.sha256(stored[wav_key]).hexdigest()
    assert sidecar["audio"]["bytes"] == len(stored[wav_key])
    assert sidecar["key"] == wav_key[len("calls/"):-4] and sidecar["timing"]["archivedAt"]
    head = s3_client.head_object(Bucket=bucket, Key=wav_key)
    assert head["ContentType"] == "audio/wav"
    assert head["Metadata"]["callid"] == "s3-1" and head["Metadata"]["agentid"] == "123"
    local = tmp_path / "got.wav"
    local.write_bytes(stored[wav_key])
    left, right = read_pcm16_wav(str(local))
    assert left == independent_decode(b"".join(agent))
    assert right == independent_decode(b"".join(caller))


@pytest_twisted.ensureDeferred
async def test_store_down_delays_never_loses(recorder_factory, s3_client, s3_server, s3_endpoint):
    """The bucket is missing when the call ends: failures are logged and retried; it lands later."""
    name = (s3_server.bucket_prefix + uuid.uuid4().hex)[:63]
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        rec = await recorder_factory(
            store=S3Store(name, endpoint_url=s3_endpoint), **FAST_RETRY)
        agent = frames(20, 92)
        await record_call(rec, agent, [], call_id="outage-1")
        await until(lambda: rec.service.metrics.archive_failures._value.get() >= 3,
                    what="three failed attempts")
        assert len(spool_entries(rec)) == 1  # kept while the store is down
        s3_client.create_bucket(Bucket=name)
        await until(lambda: not spool_entries(rec), what="the call to land")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    texts = [formatEvent(e) for e in seen]
    assert any(f"the bucket '{name}' does not exist" in t for t in texts), texts[-5:]
    # Logged once for the entry, not once per attempt.
    assert sum("archiving" in t and "failed" in t for t in texts) == 1
    assert any(f"archive store s3://{name}" in t and "not usable" in t for t in texts), [t for t in texts if "store" in t][:3]
    stored = objects(s3_client, name)
    assert sorted(k.rsplit("/", 1)[1] for k in stored) == ["outage-1-2.json", "outage-1-2.wav"]
    for key in stored:
        s3_client.delete_object(Bucket=name, Key=key)
    s3_client.delete_bucket(Bucket=name)


@pytest_twisted.ensureDeferred
async def test_pending_uploads_land_after_a_restart(recorder_factory, s3_client, s3_server, s3_endpoint):
    """Calls finished while the store was down are published by the next start of the recorder."""
    name = (s3_server.bucket_prefix + uuid.uuid4().hex)[:63]
    first = await recorder_factory(store=S3Store(name, endpoint_url=s3_endpoint), **FAST_RETRY)
    for n in range(3):
        await record_call(first, frames(10, 93 + n), [], call_id=f"pending-{n}")
    await until(lambda: all(os.path.exists(os.path.join(first.settings.spool, "calls", e, "sidecar.json"))
                            for e in spool_entries(first)) and len(spool_entries(first)) == 3,
                what="three finalized calls")
    await first.stop()
    assert len(spool_entries(first)) == 3
    s3_client.create_bucket(Bucket=name)
    second = await recorder_factory(store=S3Store(name, endpoint_url=s3_endpoint),
                                    spool=first.settings.spool, subdir="second")
    await until(lambda: not spool_entries(second), what="the queue to drain")
    stored = objects(s3_client, name)
    assert len(stored) == 6
    for key in stored:
        s3_client.delete_object(Bucket=name, Key=key)
    s3_client.delete_bucket(Bucket=name)


@pytest_twisted.ensureDeferred
async def test_wrong_credentials_are_reported_and_retried(
        recorder_factory, bucket, s3_auth_enforced, s3_endpoint, monkeypatch):
    """Credentials the store refuses: a clear log line, retries, and the spool is kept."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key")
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        rec = await recorder_factory(store=S3Store(bucket, endpoint_url=s3_endpoint), **FAST_RETRY)
        await record_call(rec, frames(5, 97), [], call_id="denied-1")
        await until(lambda: rec.service.metrics.archive_failures._value.get() >= 2,
                    what="two failed attempts")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    texts = [formatEvent(e) for e in seen if "archiving" in (formatEvent(e) or "")]
    assert any("denied" in t or "credentials" in t or "not valid" in t for t in texts), texts
    assert "wrong-secret-key" not in "\n".join(formatEvent(e) or "" for e in seen)
    assert len(spool_entries(rec)) == 1
