"""`evrecorder verify` and `ls` on an S3 archive a running recorder made (moto's server, or
EVRECORDER_TEST_S3_ENDPOINT), damaged object by object."""

from __future__ import annotations

import json

import pytest_twisted

from evrecorder.s3store import S3Store
from s3server import (  # noqa: F401
    aws_credentials, bucket, s3_auth_enforced, s3_client, s3_endpoint, s3_server,
)
from test_archive_s3 import objects, until
from test_audit import cli, dropped_call, json_lines
from test_service import frames, record_call


async def s3_archive(recorder_factory, bucket_name, endpoint, s3_client, calls, store=None):
    """Record ``calls`` and one incomplete call "x" into s3://bucket/calls/; wait for all of them."""
    store = store or S3Store(bucket_name, "calls/", endpoint_url=endpoint)
    rec = await recorder_factory(store=store, reconnect_grace=0.2)
    for n, call_id in enumerate(calls):
        await record_call(rec, frames(30 + n, 40 + n), frames(20, 50 + n), call_id=call_id)
    await dropped_call(rec, "x")
    want = 2 * (len(calls) + 1)
    await until(lambda: len(objects(s3_client, bucket_name)) == want, what=f"{want} objects")
    stored = objects(s3_client, bucket_name)
    sidecars = {}
    for key, data in stored.items():
        if key.endswith(".json"):
            sidecar = json.loads(data)
            sidecars[sidecar["callId"]] = sidecar
    return rec, sidecars, stored


@pytest_twisted.ensureDeferred
async def test_verify_s3_archive_names_each_damaged_object(recorder_factory, s3_client, bucket,
                                                           s3_endpoint):
    """On S3: a flipped byte, a truncated WAV, a lost sidecar, a lost WAV and foreign metadata are named."""
    rec, sidecars, stored = await s3_archive(recorder_factory, bucket, s3_endpoint, s3_client,
                                             "abcdef")
    url = f"s3://{bucket}/calls"
    clean = cli("verify", url, "--s3-endpoint-url", s3_endpoint, "--json")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    results, summary = json_lines(clean.stdout)
    assert (summary["recordings"], summary["verified"]) == (7, 7)
    assert summary["incomplete"] == {"disconnect": 1}
    assert summary["archive"] == f"s3://{bucket}/calls/"
    assert {r["storedChecksum"] for r in results.values()} == {"whole"}  # compared, not skipped

    def wav_key(call_id):
        return "calls/" + sidecars[call_id]["key"] + ".wav"

    def put_wav(call_id, data, **metadata):
        head = s3_client.head_object(Bucket=bucket, Key=wav_key(call_id))
        s3_client.put_object(Bucket=bucket, Key=wav_key(call_id), Body=data,
                             Metadata=dict(head["Metadata"], **metadata),
                             ChecksumAlgorithm="SHA256")

    a = bytearray(stored[wav_key("a")])
    a[len(a) // 2] ^= 0x01
    put_wav("a", bytes(a))  # same metadata: it still claims the original sha256
    put_wav("c", stored[wav_key("c")][:-1000])
    s3_client.delete_object(Bucket=bucket, Key=wav_key("b")[: -len(".wav")] + ".json")
    s3_client.delete_object(Bucket=bucket, Key=wav_key("d"))
    put_wav("e", stored[wav_key("e")], callid="someone-else")

    out = cli("verify", url, "--s3-endpoint-url", s3_endpoint, "--json", "--publish-grace", "0")
    assert out.returncode == 1, out.stdout + out.stderr
    results, summary = json_lines(out.stdout)
    assert (summary["recordings"], summary["verified"], summary["failed"]) == (7, 2, 5)
    key = {c: sidecars[c]["key"] for c in sidecars}
    assert results[key["a"]]["problems"] == [
        "the WAV's SHA-256 differs from the sidecar's: its content changed"]
    size = sidecars["c"]["audio"]["bytes"]
    assert results[key["c"]]["problems"][0] == (
        f"the WAV holds {size - 1000} bytes, the sidecar says {size}")
    assert any("the WAV is truncated" in p for p in results[key["c"]]["problems"])
    assert results[key["b"]]["problems"] == ["a WAV without its sidecar: an interrupted publish"]
    assert results[key["d"]]["problems"] == ["the sidecar's WAV is missing"]
    assert results[key["e"]]["problems"] == [
        "the WAV's callid metadata is 'someone-else', the sidecar's 'e'"]
    assert results[key["f"]]["status"] == "ok"

    text = cli("verify", url, "--s3-endpoint-url", s3_endpoint, "--publish-grace", "0")
    assert text.returncode == 1
    for call_id in "abcde":
        assert f"FAILED     {key[call_id]}: " in text.stdout


@pytest_twisted.ensureDeferred
async def test_verify_compares_the_stored_checksum_and_metadata(recorder_factory, s3_client,
                                                                bucket, s3_endpoint):
    """A WAV whose sha256 metadata is not the sidecar's fails even when its bytes are intact."""
    rec, sidecars, stored = await s3_archive(recorder_factory, bucket, s3_endpoint, s3_client, "a")
    wav = "calls/" + sidecars["a"]["key"] + ".wav"
    head = s3_client.head_object(Bucket=bucket, Key=wav, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"]  # what verify compares with the content it reads
    s3_client.put_object(Bucket=bucket, Key=wav, Body=stored[wav], ChecksumAlgorithm="SHA256",
                         Metadata=dict(head["Metadata"], sha256="0" * 64))

    out = cli("verify", f"s3://{bucket}/calls/", "--s3-endpoint-url", s3_endpoint, "--json")
    results, _ = json_lines(out.stdout)
    assert out.returncode == 1
    assert results[sidecars["a"]["key"]]["problems"] == [
        "the WAV's sha256 metadata differs from the sidecar's"]


@pytest_twisted.ensureDeferred
async def test_ls_on_s3(recorder_factory, s3_client, bucket, s3_endpoint):
    """ls reads the sidecars from S3: newest first, filtered by call id."""
    rec, sidecars, _ = await s3_archive(recorder_factory, bucket, s3_endpoint, s3_client, "ab")
    out = cli("ls", f"s3://{bucket}/calls", "--s3-endpoint-url", s3_endpoint, "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    newest = sorted(sidecars.values(), key=lambda s: s["timing"]["firstMediaAt"], reverse=True)
    assert [(r["callId"], r["key"]) for r in rows] == [(s["callId"], s["key"]) for s in newest]
    only = cli("ls", f"s3://{bucket}/calls", "--s3-endpoint-url", s3_endpoint, "--json",
               "--call-id", "b")
    assert [r["callId"] for r in json.loads(only.stdout)] == ["b"]


def test_missing_bucket_is_one_sentence(s3_endpoint, aws_credentials):
    """A bucket that does not exist: exit 2 and the store's own sentence."""
    out = cli("verify", "s3://evrecorder-no-such-bucket-here/x", "--s3-endpoint-url", s3_endpoint)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "evrecorder verify: the archive s3://evrecorder-no-such-bucket-here/x/ cannot be read: "
        "the bucket 'evrecorder-no-such-bucket-here' does not exist.")


def test_verify_checks_a_multipart_wav_by_its_parts(tmp_path, s3_client, bucket, s3_endpoint):
    """A WAV uploaded in the recorder's 16 MiB parts is checked against S3's checksum of its parts."""
    import hashlib
    import os

    from evrecorder import wav
    from evrecorder.stores import PublishItem

    samples = (33 << 20) // 2  # mu-law stereo: 2 bytes a sample frame, three 16 MiB parts
    path = tmp_path / "long.wav"
    with open(path, "wb") as f:
        f.write(wav.header("mulaw", samples))
        f.write(os.urandom(samples * 2))
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    sidecar = {"schema": "evrecorder/1", "callId": "long-1", "sessionId": "1", "key": "long-1-1",
               "audio": {"encoding": "mulaw", "sampleRateHertz": 8000, "channels": 2,
                         "durationSeconds": samples / 8000, "bytes": len(data), "sha256": digest},
               "timing": {}, "complete": True, "endReason": "stop"}
    store = S3Store(bucket, "calls/", endpoint_url=s3_endpoint, multipart_threshold=5 << 20)
    item = PublishItem("long-1-1", str(path), digest, len(data),
                       lambda key: json.dumps(sidecar).encode(),
                       {"callId": "long-1", "sessionId": "1"})
    assert store.publish(item) == "long-1-1"
    head = s3_client.head_object(Bucket=bucket, Key="calls/long-1-1.wav")
    assert head["ETag"].rstrip('"').endswith("-3")

    out = cli("verify", f"s3://{bucket}/calls", "--s3-endpoint-url", s3_endpoint, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    results, _ = json_lines(out.stdout)
    assert results["long-1-1"]["storedChecksum"] == "parts"
    assert results["long-1-1"]["status"] == "ok"
