"""WORM retention: S3 Object Lock on moto's S3 server (or EVRECORDER_TEST_S3_ENDPOINT).

Buckets here are created with ``ObjectLockEnabledForBucket=True`` (which also
turns versioning on).  What moto 5.2 does and does not do, found by trying:

* it keeps the retention and legal hold of a PutObject, refuses a DELETE of a
  retained version (GOVERNANCE without the bypass, COMPLIANCE always) and
  applies a bucket's default retention to a PutObject;
* it drops the Object Lock headers of CreateMultipartUpload (AWS keeps them):
  the store then sets them on the new version itself (PutObjectRetention,
  PutObjectLegalHold), which ``test_multipart_wav_is_retained_too`` pins;
* GetObjectRetention answers 500, so retention is read from HEAD (as
  ``evrecorder verify`` does);
* it refuses a default-retention rule on a bucket that holds objects (AWS
  does not), so the tests set the rule on the empty bucket.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from botocore.exceptions import ClientError
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage

from evrecorder.s3store import S3Store
from evrecorder.stores import StoreError
from evrecorder.tap import Options
from s3server import (  # noqa: F401
    aws_credentials, bucket, s3_auth_enforced, s3_client, s3_endpoint, s3_server,
)
from test_archive_s3 import until
from test_audit import cli, json_lines
from test_audit_s3 import s3_archive
from test_s3store import KEY, MiB, new_client, recording

DAY = timedelta(days=1)


@pytest.fixture
def locked_bucket(s3_server, s3_client):
    """A new bucket with Object Lock enabled; its objects' holds are lifted and GOVERNANCE
    versions deleted (with the bypass) afterwards.  COMPLIANCE versions cannot be deleted
    before their date by anyone: only moto's in-memory buckets get them (see the tests)."""
    name = (s3_server.bucket_prefix + "lock-" + uuid.uuid4().hex)[:63]
    s3_client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    yield name
    versions = s3_client.list_object_versions(Bucket=name)
    remaining = 0
    for v in versions.get("Versions", []) + versions.get("DeleteMarkers", []):
        try:
            s3_client.put_object_legal_hold(Bucket=name, Key=v["Key"], VersionId=v["VersionId"],
                                            LegalHold={"Status": "OFF"})
        except ClientError:
            pass  # a delete marker has no hold
        try:
            s3_client.delete_object(Bucket=name, Key=v["Key"], VersionId=v["VersionId"],
                                    BypassGovernanceRetention=True)
        except ClientError:
            remaining += 1  # COMPLIANCE: kept until its date
    if not remaining:
        s3_client.delete_bucket(Bucket=name)


def compliance_allowed(s3_server) -> None:
    if not s3_server.is_moto:
        pytest.skip("COMPLIANCE objects on a real endpoint cannot be deleted for a day; "
                    "the GOVERNANCE tests cover the same code")


def lock_of(s3_client, bucket_name: str, key: str) -> tuple:
    head = s3_client.head_object(Bucket=bucket_name, Key=key)
    until_date = head.get("ObjectLockRetainUntilDate")
    return (head.get("ObjectLockMode"),
            until_date.astimezone(timezone.utc).replace(microsecond=0) if until_date else None,
            head.get("ObjectLockLegalHoldStatus"))


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(int(ts), tz=timezone.utc)


# -- the recorder writes retained objects ---------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mode", ["GOVERNANCE", "COMPLIANCE"])
async def test_recorded_call_is_retained_and_held(recorder_factory, s3_server, s3_client,
                                                  locked_bucket, s3_endpoint, mode):
    """Both objects of a recorded call carry the mode, the retain-until date and the legal hold."""
    if mode == "COMPLIANCE":
        compliance_allowed(s3_server)
    now = time.time()
    store = S3Store(locked_bucket, "calls/", endpoint_url=s3_endpoint, object_lock_mode=mode,
                    object_lock_days=1, legal_hold=True, now=lambda: now)
    rec, sidecars, stored = await s3_archive(recorder_factory, locked_bucket, s3_endpoint,
                                             s3_client, "a", store=store)
    assert len(stored) == 4
    for key in stored:
        assert lock_of(s3_client, locked_bucket, key) == (mode, at(now) + DAY, "ON"), key


@pytest_twisted.ensureDeferred
async def test_delete_of_a_retained_version_is_refused(recorder_factory, s3_server, s3_client,
                                                       locked_bucket, s3_endpoint):
    """COMPLIANCE: deleting the WAV's version is refused, even with the governance bypass."""
    compliance_allowed(s3_server)
    store = S3Store(locked_bucket, "calls/", endpoint_url=s3_endpoint,
                    object_lock_mode="COMPLIANCE", object_lock_days=1)
    rec, sidecars, stored = await s3_archive(recorder_factory, locked_bucket, s3_endpoint,
                                             s3_client, "a", store=store)
    wav = "calls/" + sidecars["a"]["key"] + ".wav"
    version = s3_client.head_object(Bucket=locked_bucket, Key=wav)["VersionId"]
    for bypass in (False, True):
        with pytest.raises(ClientError) as refused:
            s3_client.delete_object(Bucket=locked_bucket, Key=wav, VersionId=version,
                                    BypassGovernanceRetention=bypass)
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
    body = s3_client.get_object(Bucket=locked_bucket, Key=wav, VersionId=version)["Body"].read()
    assert body == stored[wav]


def test_governance_delete_needs_the_bypass(tmp_path, s3_client, locked_bucket, s3_endpoint):
    """GOVERNANCE: a plain DELETE of the version is refused; the bypass permission lifts it."""
    store = S3Store(locked_bucket, endpoint_url=s3_endpoint, object_lock_mode="GOVERNANCE",
                    object_lock_days=1)
    store.check()
    store.publish(recording(tmp_path).item)
    version = s3_client.head_object(Bucket=locked_bucket, Key=KEY + ".wav")["VersionId"]
    with pytest.raises(ClientError) as refused:
        s3_client.delete_object(Bucket=locked_bucket, Key=KEY + ".wav", VersionId=version)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"


def test_publishing_again_never_adds_a_version(tmp_path, s3_client, locked_bucket, s3_endpoint):
    """A retry after a crash finds both retained objects and writes nothing; another WAV goes to K-2."""
    now = time.time()
    store = S3Store(locked_bucket, endpoint_url=s3_endpoint, object_lock_mode="GOVERNANCE",
                    object_lock_days=1, now=lambda: now)
    rec = recording(tmp_path)
    rec.item.sidecar_for = lambda key: json.dumps(  # the archiver's sidecars name their WAV
        {"schema": "evrecorder/1", "key": key, "audio": {"sha256": rec.item.wav_sha256}}).encode()
    assert store.publish(rec.item) == KEY
    assert store.publish(rec.item) == KEY  # the spool entry was not removed: a crash

    versions = s3_client.list_object_versions(Bucket=locked_bucket)["Versions"]
    assert sorted(v["Key"] for v in versions) == [KEY + ".json", KEY + ".wav"]
    other = recording(tmp_path, name="b.wav")
    assert store.publish(other.item) == KEY + "-2"
    assert lock_of(s3_client, locked_bucket, KEY + "-2.wav") == ("GOVERNANCE", at(now) + DAY, None)
    body = s3_client.get_object(Bucket=locked_bucket, Key=KEY + ".wav")["Body"].read()
    assert body == rec.data


def test_multipart_wav_is_retained_too(tmp_path, s3_client, locked_bucket, s3_endpoint):
    """A WAV uploaded in parts ends up with the retention and hold (moto drops them from
    CreateMultipartUpload; the store sets them on the version)."""
    now = time.time()
    store = S3Store(locked_bucket, endpoint_url=s3_endpoint, client=new_client(s3_endpoint),
                    object_lock_mode="GOVERNANCE", object_lock_days=2, legal_hold=True,
                    multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, now=lambda: now)
    rec = recording(tmp_path, os.urandom(11 * MiB))
    assert store.publish(rec.item) == KEY
    head = s3_client.head_object(Bucket=locked_bucket, Key=KEY + ".wav")
    assert head["ETag"].rstrip('"').endswith("-3")
    assert lock_of(s3_client, locked_bucket, KEY + ".wav") == ("GOVERNANCE", at(now) + 2 * DAY, "ON")
    assert lock_of(s3_client, locked_bucket, KEY + ".json") == ("GOVERNANCE", at(now) + 2 * DAY, "ON")


def test_bucket_default_retention_applies_without_days(tmp_path, s3_client, locked_bucket,
                                                       s3_endpoint):
    """A mode without days uses the bucket's default; a default in the other mode is refused."""
    s3_client.put_object_lock_configuration(Bucket=locked_bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled",
        "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 3}}})
    other = S3Store(locked_bucket, endpoint_url=s3_endpoint, object_lock_mode="COMPLIANCE")
    with pytest.raises(StoreError) as refused:
        other.check()
    assert str(refused.value) == (
        f"the bucket '{locked_bucket}' retains objects in GOVERNANCE mode by default, not "
        "COMPLIANCE: give --object-lock-days to set the retention of each recording")
    with pytest.raises(StoreError):
        other.publish(recording(tmp_path).item)  # never published without its retention

    store = S3Store(locked_bucket, endpoint_url=s3_endpoint, object_lock_mode="GOVERNANCE")
    store.check()
    before = time.time()
    store.publish(recording(tmp_path).item)
    mode, retained, hold = lock_of(s3_client, locked_bucket, KEY + ".wav")
    assert mode == "GOVERNANCE" and hold is None
    assert at(before) + 3 * DAY - timedelta(seconds=1) <= retained <= at(time.time()) + 3 * DAY


# -- start-up check ---------------------------------------------------------------


def test_check_on_a_bucket_without_object_lock_says_so(tmp_path, s3_client, bucket, s3_endpoint):
    """Object Lock options on a plain bucket: one sentence, and nothing is published without retention."""
    store = S3Store(bucket, endpoint_url=s3_endpoint, legal_hold=True)
    with pytest.raises(StoreError) as refused:
        store.check()
    assert str(refused.value) == (
        f"the bucket '{bucket}' does not have Object Lock enabled, which --object-lock-mode "
        "and --legal-hold need (see 'Compliance' in the README)")
    with pytest.raises(StoreError, match="does not have Object Lock enabled"):
        store.publish(recording(tmp_path).item)
    assert "Contents" not in s3_client.list_objects_v2(Bucket=bucket)
    without = S3Store(bucket, endpoint_url=s3_endpoint, object_lock_mode="GOVERNANCE")
    assert S3Store(bucket, endpoint_url=s3_endpoint).check() is None  # no options: no check
    with pytest.raises(StoreError, match="does not have Object Lock enabled"):
        without.check()


@pytest_twisted.ensureDeferred
async def test_recorder_start_on_a_plain_bucket_logs_the_sentence(recorder_factory, bucket,
                                                                 s3_endpoint):
    """A recorder started with --object-lock-mode on a bucket without Object Lock says why at start."""
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        await recorder_factory(store=S3Store(bucket, endpoint_url=s3_endpoint,
                                             object_lock_mode="COMPLIANCE", object_lock_days=7))
        await until(lambda: any("not usable" in (formatEvent(e) or "") for e in seen),
                    what="the start-up check")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    [line] = [formatEvent(e) for e in seen if "not usable" in (formatEvent(e) or "")]
    assert f"the bucket '{bucket}' does not have Object Lock enabled" in line


# -- verify reports retention ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_verify_reports_retention_and_flags_short_ones(recorder_factory, s3_client,
                                                             locked_bucket, s3_endpoint):
    """verify shows each object's mode and date, and fails recordings retained less than asked."""
    now = time.time()
    store = S3Store(locked_bucket, "calls/", endpoint_url=s3_endpoint,
                    object_lock_mode="GOVERNANCE", object_lock_days=30, legal_hold=True,
                    now=lambda: now)
    rec, sidecars, _ = await s3_archive(recorder_factory, locked_bucket, s3_endpoint, s3_client,
                                        "a", store=store)
    url = f"s3://{locked_bucket}/calls/"
    retained = (at(now) + 30 * DAY).isoformat().replace("+00:00", "Z")

    ok = cli("verify", url, "--s3-endpoint-url", s3_endpoint, "--json",
             "--expect-retention-days", "29")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    results, summary = json_lines(ok.stdout)
    entry = {"mode": "GOVERNANCE", "retainUntil": retained, "legalHold": "ON"}
    assert results[sidecars["a"]["key"]]["retention"] == {"wav": entry, "sidecar": entry}
    assert summary["retentionModes"] == {"GOVERNANCE": 4} and summary["legalHolds"] == 4
    assert summary["earliestRetainUntil"] == retained

    short = cli("verify", url, "--s3-endpoint-url", s3_endpoint, "--json",
                "--expect-retention-days", "365")
    assert short.returncode == 1
    results, _ = json_lines(short.stdout)
    problems = results[sidecars["a"]["key"]]["problems"]
    assert len(problems) == 2
    assert problems[0].startswith(f"the wav is retained until {retained}, less than 365 days "
                                  "from the call's start")
    text = cli("verify", url, "--s3-endpoint-url", s3_endpoint, "-v")
    assert f"wav GOVERNANCE until {retained} legal hold" in text.stdout
    assert "earliest retain-until  " + retained in text.stdout


@pytest_twisted.ensureDeferred
async def test_verify_flags_objects_without_retention(recorder_factory, s3_client, bucket,
                                                      s3_endpoint):
    """On a bucket without Object Lock, --expect-retention-days fails every recording."""
    rec, sidecars, _ = await s3_archive(recorder_factory, bucket, s3_endpoint, s3_client, "a")
    out = cli("verify", f"s3://{bucket}/calls", "--s3-endpoint-url", s3_endpoint, "--json",
              "--expect-retention-days", "1")
    assert out.returncode == 1
    results, _ = json_lines(out.stdout)
    assert results[sidecars["a"]["key"]]["problems"] == [
        "the wav has no Object Lock retention (1 days expected)",
        "the sidecar has no Object Lock retention (1 days expected)",
    ]


# -- options ---------------------------------------------------------------------------


def test_object_lock_options_reach_the_store(monkeypatch):
    """--object-lock-mode/--object-lock-days/--legal-hold land in the S3 settings and the store."""
    from evrecorder.stores import store_from_url

    monkeypatch.delenv("EVRECORDER_SECRET", raising=False)
    o = Options()
    o.parseOptions(["--archive", "s3://recordings/calls", "--object-lock-mode", "compliance",
                    "--object-lock-days", "2557", "--legal-hold"])
    assert o.settings().s3 == {
        "endpoint_url": None, "region": None, "sse": None, "sse_kms_key_id": None,
        "storage_class": None, "object_lock_mode": "COMPLIANCE", "object_lock_days": 2557,
        "legal_hold": True,
    }
    store = store_from_url(o.settings().archive, **o.settings().s3)
    assert (store.object_lock_mode, store.object_lock_days, store.legal_hold) == (
        "COMPLIANCE", 2557, True)


@pytest.mark.parametrize("argv, sentence", [
    (["--legal-hold"], "--object-lock-mode, --object-lock-days and --legal-hold need an "
                       "s3://bucket/prefix archive."),
    (["--archive", "s3://b/p", "--object-lock-days", "7"], "--object-lock-days needs "
                                                           "--object-lock-mode."),
    (["--archive", "s3://b/p", "--object-lock-mode", "forever"],
     "--object-lock-mode must be GOVERNANCE or COMPLIANCE (got 'FOREVER')."),
    (["--archive", "s3://b/p", "--object-lock-mode", "GOVERNANCE", "--object-lock-days", "0"],
     "--object-lock-days: '0' must be more than 0."),
])
def test_bad_object_lock_options_are_one_sentence(argv, sentence):
    """Each bad Object Lock option is refused at start with a sentence naming it."""
    with pytest.raises(usage.UsageError) as refused:
        Options().parseOptions(argv)
    assert str(refused.value) == sentence


def test_a_rival_write_in_a_locked_bucket_sends_us_to_k2(tmp_path, s3_client, locked_bucket,
                                                          s3_endpoint):
    """A WAV written at K between our HEAD and our PUT stays the only version at K; ours goes to K-2."""
    from test_s3store import rival_after

    client = new_client(s3_endpoint)
    store = S3Store(locked_bucket, endpoint_url=s3_endpoint, client=client,
                    object_lock_mode="GOVERNANCE", object_lock_days=1)
    rival = os.urandom(3000)
    fired = rival_after(client, "HeadObject", 404, KEY + ".wav", lambda: s3_client.put_object(
        Bucket=locked_bucket, Key=KEY + ".wav", Body=rival, ChecksumAlgorithm="SHA256"))
    rec = recording(tmp_path)

    assert store.publish(rec.item) == KEY + "-2"

    assert fired == [1]
    versions = s3_client.list_object_versions(Bucket=locked_bucket, Prefix=KEY + ".wav")
    assert len(versions["Versions"]) == 1
    assert s3_client.get_object(Bucket=locked_bucket, Key=KEY + ".wav")["Body"].read() == rival
    assert lock_of(s3_client, locked_bucket, KEY + "-2.wav")[0] == "GOVERNANCE"
