"""S3Store against a real S3-compatible server, through boto3 over HTTP.

The server is moto's standalone server on loopback, or any endpoint named by
``EVRECORDER_TEST_S3_ENDPOINT`` (see ``tests/s3server.py``).  Where a test
needs to watch or disturb the store's requests, it injects a boto3 client with
botocore event hooks; the requests still go to the server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from evrecorder.s3store import S3Store
from evrecorder.stores import PublishItem, StoreError

from s3server import (  # noqa: F401  (tests/ is on sys.path: see conftest.py)
    aws_credentials,
    bucket,
    s3_auth_enforced,
    s3_client,
    s3_endpoint,
    s3_server,
)

MiB = 1024 * 1024
KEY = "2026/11/24/call-1"


# -- helpers ----------------------------------------------------------------


@dataclass
class Recording:
    """A spooled WAV and the PublishItem for it; remembers sidecar_for calls."""

    item: PublishItem
    data: bytes
    sidecar_keys: list[str] = field(default_factory=list)


def recording(tmp_path, data: bytes | None = None, key: str = KEY, name: str = "a.wav",
              **metadata: str) -> Recording:
    data = os.urandom(2000) if data is None else data
    path = tmp_path / name
    path.write_bytes(data)
    rec = Recording(item=None, data=data)  # type: ignore[arg-type]

    def sidecar_for(used_key: str) -> bytes:
        rec.sidecar_keys.append(used_key)
        return json.dumps({"schema": "evrecorder/1", "key": used_key}).encode()

    rec.item = PublishItem(
        key=key,
        wav_path=str(path),
        wav_sha256=hashlib.sha256(data).hexdigest(),
        wav_size=len(data),
        sidecar_for=sidecar_for,
        object_metadata=metadata or {
            "callId": "c-1", "sessionId": "s-1", "agentId": "a-1", "schema": "evrecorder/1",
        },
    )
    return rec


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def body(s3_client, bucket: str, key: str) -> bytes:
    return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()


def keys(s3_client, bucket: str) -> list[str]:
    found = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(obj["Key"] for obj in found)


def new_client(endpoint: str):
    """A client like the store's own, for injecting with hooks."""
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5,
                    read_timeout=60)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


class RequestLog:
    """Records (operation, Key, IfNoneMatch) of each request a client makes."""

    OPERATIONS = ("HeadObject", "PutObject", "CreateMultipartUpload", "UploadPart",
                  "CompleteMultipartUpload")

    def __init__(self, client):
        self.calls: list[tuple[str, str | None, str | None]] = []
        for op in self.OPERATIONS:
            # Last, so that the store's own hook (If-None-Match) has run.
            client.meta.events.register_last("before-parameter-build.s3." + op, self._record)

    def _record(self, params, model, **kwargs):
        self.calls.append((model.name, params.get("Key"), params.get("IfNoneMatch")))

    def ops(self, suffix: str) -> list[str]:
        return [op for op, key, _ in self.calls if key and key.endswith(suffix)]


class _Body:
    def __init__(self, data: bytes):
        self._data = data

    def stream(self, **kwargs):
        yield self._data


def rival_after(client, operation: str, status: int, key: str, write) -> list[int]:
    """Call ``write()`` once, right after ``client`` gets ``status`` for ``operation`` on ``key``.

    Stands in for another writer racing the store.
    """
    seen: list[str] = []
    fired: list[int] = []

    def remember(params, **kwargs):
        seen.append(params.get("Key"))

    def after(http_response, **kwargs):
        if not fired and seen and seen[-1] == key and http_response.status_code == status:
            fired.append(1)
            write()

    client.meta.events.register("before-parameter-build.s3." + operation, remember)
    client.meta.events.register("after-call.s3." + operation, after)
    return fired


# -- publishing ---------------------------------------------------------------


def test_publish_lands_wav_then_sidecar(tmp_path, s3_endpoint, s3_client, bucket):
    """publish writes prefix/K.wav (bytes, audio/wav, metadata, SHA-256) and prefix/K.json."""
    rec = recording(tmp_path)
    store = S3Store(bucket, "archive", endpoint_url=s3_endpoint)

    assert store.publish(rec.item) == KEY

    assert keys(s3_client, bucket) == [f"archive/{KEY}.json", f"archive/{KEY}.wav"]
    assert body(s3_client, bucket, f"archive/{KEY}.wav") == rec.data
    head = s3_client.head_object(Bucket=bucket, Key=f"archive/{KEY}.wav", ChecksumMode="ENABLED")
    assert head["ContentType"] == "audio/wav"
    assert head["ContentLength"] == len(rec.data)
    # S3 lower-cases metadata names.
    assert head["Metadata"] == {
        "callid": "c-1", "sessionid": "s-1", "agentid": "a-1", "schema": "evrecorder/1",
        "sha256": rec.item.wav_sha256,
    }
    assert head["ChecksumSHA256"] == b64sha(rec.data)
    assert rec.sidecar_keys == [KEY]
    sidecar = s3_client.head_object(Bucket=bucket, Key=f"archive/{KEY}.json",
                                    ChecksumMode="ENABLED")
    assert sidecar["ContentType"] == "application/json"
    expected = json.dumps({"schema": "evrecorder/1", "key": KEY}).encode()
    assert body(s3_client, bucket, f"archive/{KEY}.json") == expected
    assert sidecar["ChecksumSHA256"] == b64sha(expected)


def test_publish_order_and_conditional_write(tmp_path, s3_endpoint, s3_client, bucket):
    """The WAV is HEADed, then written with If-None-Match: *, and the sidecar is written last."""
    client = new_client(s3_endpoint)
    log = RequestLog(client)
    store = S3Store(bucket, endpoint_url=s3_endpoint, client=client)

    store.publish(recording(tmp_path).item)

    assert log.calls[0] == ("HeadObject", KEY + ".wav", None)
    assert ("PutObject", KEY + ".wav", "*") in log.calls
    assert log.calls[-1] == ("PutObject", KEY + ".json", None)


@pytest.mark.parametrize(
    "prefix, expected",
    [("", KEY + ".wav"), ("p", "p/" + KEY + ".wav"), ("p/", "p/" + KEY + ".wav"),
     ("/p/q", "p/q/" + KEY + ".wav")],
)
def test_prefix_is_joined_with_one_slash(tmp_path, s3_endpoint, s3_client, bucket, prefix,
                                         expected):
    """The object key is prefix/K.wav, with no double or leading slash."""
    S3Store(bucket, prefix, endpoint_url=s3_endpoint).publish(recording(tmp_path).item)

    assert expected in keys(s3_client, bucket)


def test_multipart_upload_lands_intact(tmp_path, s3_endpoint, s3_client, bucket):
    """A file above the multipart threshold goes up in parts and downloads byte for byte."""
    rec = recording(tmp_path, os.urandom(12 * MiB))
    client = new_client(s3_endpoint)
    log = RequestLog(client)
    store = S3Store(bucket, endpoint_url=s3_endpoint, client=client,
                    multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)

    assert store.publish(rec.item) == KEY

    assert log.ops(".wav").count("UploadPart") == 3
    assert ("CompleteMultipartUpload", KEY + ".wav", "*") in log.calls
    assert body(s3_client, bucket, KEY + ".wav") == rec.data
    head = s3_client.head_object(Bucket=bucket, Key=KEY + ".wav")
    assert head["Metadata"]["sha256"] == rec.item.wav_sha256
    assert head["ETag"].rstrip('"').endswith("-3")


def test_publish_twice_is_idempotent(tmp_path, s3_endpoint, s3_client, bucket):
    """Publishing again returns the same key, rewrites only the sidecar, and makes no K-2."""
    rec = recording(tmp_path)
    client = new_client(s3_endpoint)
    store = S3Store(bucket, endpoint_url=s3_endpoint, client=client)
    assert store.publish(rec.item) == KEY
    log = RequestLog(client)

    assert store.publish(rec.item) == KEY

    assert keys(s3_client, bucket) == [KEY + ".json", KEY + ".wav"]
    assert log.ops(".wav") == ["HeadObject"]
    assert log.ops(".json") == ["PutObject"]
    assert rec.sidecar_keys == [KEY, KEY]


def test_retry_after_crash_before_sidecar(tmp_path, s3_endpoint, s3_client, bucket):
    """A WAV left without sidecar by a crash is reused, not uploaded again, and gets its sidecar."""
    rec = recording(tmp_path)
    client = new_client(s3_endpoint)
    store = S3Store(bucket, endpoint_url=s3_endpoint, client=client)
    good_sidecar_for = rec.item.sidecar_for

    def crash(key):
        raise KeyboardInterrupt  # the process dies between the WAV and the sidecar

    rec.item.sidecar_for = crash
    with pytest.raises(KeyboardInterrupt):
        store.publish(rec.item)
    assert keys(s3_client, bucket) == [KEY + ".wav"]
    rec.item.sidecar_for = good_sidecar_for
    log = RequestLog(client)

    assert store.publish(rec.item) == KEY

    assert log.ops(".wav") == ["HeadObject"]
    assert keys(s3_client, bucket) == [KEY + ".json", KEY + ".wav"]


@pytest.mark.parametrize("rival", ["other bytes", "same bytes, no sha256 metadata"])
def test_existing_different_wav_is_never_overwritten(tmp_path, s3_endpoint, s3_client, bucket,
                                                     rival):
    """A different object at K.wav (other bytes, or no sha256 metadata) stays; we land at K-2."""
    rec = recording(tmp_path)
    rival_bytes = os.urandom(2000) if rival == "other bytes" else rec.data
    metadata = {"sha256": hashlib.sha256(rival_bytes).hexdigest()} if rival == "other bytes" else {}
    s3_client.put_object(Bucket=bucket, Key=KEY + ".wav", Body=rival_bytes, Metadata=metadata)

    assert S3Store(bucket, endpoint_url=s3_endpoint).publish(rec.item) == KEY + "-2"

    assert keys(s3_client, bucket) == [KEY + "-2.json", KEY + "-2.wav", KEY + ".wav"]
    assert body(s3_client, bucket, KEY + ".wav") == rival_bytes
    assert s3_client.head_object(Bucket=bucket, Key=KEY + ".wav")["Metadata"] == metadata
    assert body(s3_client, bucket, KEY + "-2.wav") == rec.data
    assert rec.sidecar_keys == [KEY + "-2"]


@pytest.mark.parametrize("size", [2000, 12 * MiB], ids=["single-part", "multipart"])
def test_object_with_our_metadata_but_other_bytes_is_not_ours(tmp_path, s3_endpoint, s3_client,
                                                              bucket, size):
    """An object with our sha256 metadata and size but another checksum is left; we use K-2."""
    rec = recording(tmp_path, os.urandom(size))
    impostor = tmp_path / "impostor.wav"
    impostor.write_bytes(os.urandom(size))
    # Uploaded with the part layout the store uses, so the checksums are comparable.
    s3_client.upload_file(
        str(impostor), bucket, KEY + ".wav",
        ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": rec.item.wav_sha256}},
        Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB),
    )
    store = S3Store(bucket, endpoint_url=s3_endpoint,
                    multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)

    assert store.publish(rec.item) == KEY + "-2"

    assert body(s3_client, bucket, KEY + ".wav") == impostor.read_bytes()
    assert body(s3_client, bucket, KEY + "-2.wav") == rec.data


def test_next_free_key_after_two_collisions(tmp_path, s3_endpoint, s3_client, bucket):
    """With K and K-2 taken by other recordings, the store uses K-3."""
    for key in (KEY, KEY + "-2"):
        s3_client.put_object(Bucket=bucket, Key=key + ".wav", Body=b"someone else")

    assert S3Store(bucket, endpoint_url=s3_endpoint).publish(recording(tmp_path).item) == KEY + "-3"


@pytest.mark.parametrize("size", [2000, 12 * MiB], ids=["single-part", "multipart"])
def test_conditional_write_closes_the_race(tmp_path, s3_endpoint, s3_client, bucket, size):
    """A WAV written by someone else between our HEAD and our upload survives; we land at K-2."""
    rec = recording(tmp_path, os.urandom(size))
    client = new_client(s3_endpoint)
    fired = rival_after(
        client, "HeadObject", 404, KEY + ".wav",
        lambda: s3_client.put_object(Bucket=bucket, Key=KEY + ".wav", Body=b"the rival"),
    )
    store = S3Store(bucket, endpoint_url=s3_endpoint, client=client,
                    multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)

    assert store.publish(rec.item) == KEY + "-2"

    assert fired
    assert body(s3_client, bucket, KEY + ".wav") == b"the rival"
    assert body(s3_client, bucket, KEY + "-2.wav") == rec.data
    assert KEY + ".json" not in keys(s3_client, bucket)


def test_endpoint_without_conditional_writes_falls_back(tmp_path, s3_endpoint, s3_client, bucket):
    """An endpoint answering If-None-Match with 501 gets the WAV anyway; then HEAD checks guard."""
    client = new_client(s3_endpoint)
    refused: list[str] = []

    def no_conditions(request, **kwargs):
        # What an S3-compatible server without conditional writes answers.
        if "If-None-Match" in request.headers:
            refused.append(request.url)
            return AWSResponse(request.url, 501, {}, _Body(
                b"<Error><Code>NotImplemented</Code><Message>A header you provided implies "
                b"functionality that is not implemented</Message></Error>"))
        return None

    client.meta.events.register("before-send.s3.PutObject", no_conditions)
    log = RequestLog(client)
    store = S3Store(bucket, endpoint_url=s3_endpoint, client=client)

    assert store.publish(recording(tmp_path).item) == KEY
    other = recording(tmp_path, name="b.wav")
    assert store.publish(other.item) == KEY + "-2"

    assert len(refused) == 1
    assert [ifnm for op, key, ifnm in log.calls if op == "PutObject" and key.endswith(".wav")] \
        == ["*", None, None]
    assert body(s3_client, bucket, KEY + "-2.wav") == other.data


def test_wav_replaced_during_upload_is_detected(tmp_path, s3_endpoint, s3_client, bucket):
    """K.wav overwritten right after our upload fails before the sidecar; a retry uses K-2."""
    rec = recording(tmp_path)
    client = new_client(s3_endpoint)
    fired = rival_after(
        client, "PutObject", 200, KEY + ".wav",
        lambda: s3_client.put_object(Bucket=bucket, Key=KEY + ".wav", Body=b"overwritten"),
    )
    store = S3Store(bucket, endpoint_url=s3_endpoint, client=client)

    with pytest.raises(StoreError, match="sha256"):
        store.publish(rec.item)
    assert fired
    assert keys(s3_client, bucket) == [KEY + ".wav"]
    assert rec.sidecar_keys == []

    assert store.publish(rec.item) == KEY + "-2"
    assert body(s3_client, bucket, KEY + ".wav") == b"overwritten"


def test_spooled_file_not_matching_its_digest_is_not_uploaded(tmp_path, s3_endpoint, s3_client,
                                                              bucket):
    """A WAV whose bytes do not match item.wav_sha256 raises StoreError and uploads nothing."""
    rec = recording(tmp_path)
    rec.item.wav_sha256 = hashlib.sha256(b"something else").hexdigest()

    with pytest.raises(StoreError, match="does not match its SHA-256"):
        S3Store(bucket, endpoint_url=s3_endpoint).publish(rec.item)
    assert keys(s3_client, bucket) == []


def test_sse_and_storage_class_are_passed_through(tmp_path, s3_endpoint, s3_client, bucket):
    """SSE AES256 and the storage class apply to both the WAV and the sidecar."""
    store = S3Store(bucket, endpoint_url=s3_endpoint, sse="AES256", storage_class="STANDARD_IA")

    store.publish(recording(tmp_path).item)

    for name in (KEY + ".wav", KEY + ".json"):
        head = s3_client.head_object(Bucket=bucket, Key=name)
        assert head["ServerSideEncryption"] == "AES256"
        assert head["StorageClass"] == "STANDARD_IA"


def test_non_ascii_metadata_is_encoded(tmp_path, s3_endpoint, s3_client, bucket):
    """Metadata that is not ASCII is RFC 2047 encoded; empty values are left out."""
    rec = recording(tmp_path, callId="c-1", agentId="Zoë", sessionId="")

    S3Store(bucket, endpoint_url=s3_endpoint).publish(rec.item)

    metadata = s3_client.head_object(Bucket=bucket, Key=KEY + ".wav")["Metadata"]
    assert metadata["agentid"] == "=?UTF-8?B?" + base64.b64encode("Zoë".encode()).decode() + "?="
    assert "sessionid" not in metadata
    assert metadata["callid"] == "c-1"


# -- failures -----------------------------------------------------------------


def test_check_passes_on_an_existing_bucket(s3_endpoint, bucket):
    """check() returns quietly when the bucket exists and is accessible."""
    assert S3Store(bucket, endpoint_url=s3_endpoint).check() is None


def test_missing_bucket(tmp_path, s3_endpoint, aws_credentials):
    """check() and publish() on a missing bucket raise StoreError naming the bucket."""
    name = "evrecorder-missing-" + os.urandom(8).hex()
    store = S3Store(name, endpoint_url=s3_endpoint)

    with pytest.raises(StoreError) as check:
        store.check()
    with pytest.raises(StoreError) as publish:
        store.publish(recording(tmp_path).item)

    assert str(check.value) == f"the bucket '{name}' does not exist"
    assert str(publish.value) == f"the bucket '{name}' does not exist"


def test_wrong_credentials_are_denied(tmp_path, s3_endpoint, bucket, s3_auth_enforced,
                                      monkeypatch):
    """Unknown credentials give StoreError 'access ... denied' without the secret in it."""
    secret = "evrecorder-not-a-real-secret-" + os.urandom(4).hex()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEVRECORDERBOGUS1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = S3Store(bucket, endpoint_url=s3_endpoint)

    with pytest.raises(StoreError) as check:
        store.check()
    with pytest.raises(StoreError) as publish:
        store.publish(recording(tmp_path).item)

    for err in (check.value, publish.value):
        assert str(err).startswith(f"access to the bucket '{bucket}' was denied"), str(err)
        assert secret not in str(err)
        assert "AKIAEVRECORDERBOGUS1" not in str(err)


def test_no_credentials(tmp_path, s3_endpoint, monkeypatch):
    """With no credentials anywhere, check() says so in one sentence."""
    for name in list(os.environ):
        if name.startswith("AWS_") and name != "AWS_DEFAULT_REGION":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role probing
    store = S3Store("any-bucket", endpoint_url=s3_endpoint, region="us-east-1")

    with pytest.raises(StoreError) as err:
        store.check()
    assert str(err.value) == (
        "no AWS credentials were found (environment, shared config or instance role)"
    )


def test_unreachable_endpoint_fails_quickly(tmp_path, aws_credentials):
    """A closed loopback port gives 'could not be reached' within seconds, not a hang."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        endpoint = "http://127.0.0.1:%d" % closed.getsockname()[1]
        store = S3Store("some-bucket", endpoint_url=endpoint, region="us-east-1")
        started = time.monotonic()
        with pytest.raises(StoreError) as err:
            store.publish(recording(tmp_path).item)
        elapsed = time.monotonic() - started

    assert str(err.value) == f"the S3 endpoint {endpoint} could not be reached: Connection refused"
    # botocore's max_attempts=3 means 3 retries: 4 attempts, backoff at most 1 + 2 + 4 s.
    assert elapsed < 15


def test_other_errors_carry_the_s3_code(tmp_path, s3_endpoint, bucket):
    """An error without a special sentence reads 'S3 answered <code>: <message>'."""
    store = S3Store(bucket, endpoint_url=s3_endpoint, storage_class="NO_SUCH_CLASS")

    with pytest.raises(StoreError, match=r"^S3 answered InvalidStorageClass: \S"):
        store.publish(recording(tmp_path).item)


# -- construction -------------------------------------------------------------


def test_describe_names_bucket_prefix_and_endpoint_only(monkeypatch):
    """describe() is s3://bucket/prefix plus the endpoint in use, without user info or query."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    plain = S3Store("bkt", "rec/", region="eu-west-1")
    custom = S3Store("bkt", "rec", endpoint_url="https://user:pw@minio.example:9000/?x=1",
                     region="us-east-1")

    assert plain.describe() == "s3://bkt/rec/ at https://s3.eu-west-1.amazonaws.com"
    assert custom.describe() == "s3://bkt/rec at https://minio.example:9000/"
    # boto3 reads AWS_ENDPOINT_URL_S3: the start-up line names it too.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio.internal:9000")
    assert S3Store("bkt", "rec/", region="eu-west-1").describe() == \
        "s3://bkt/rec/ at http://minio.internal:9000"


@pytest.mark.parametrize(
    "options",
    [{"sse": "aws:kms2"}, {"sse": "AES256", "sse_kms_key_id": "k"}, {"sse_kms_key_id": "k"},
     {"multipart_chunksize": 0}],
)
def test_bad_options_raise_value_error(options):
    """Invalid SSE settings and sizes are refused when the store is built."""
    with pytest.raises(ValueError):
        S3Store("bkt", region="us-east-1", **options)


def test_an_s3_prefix_too_long_for_any_key_is_refused_at_start():
    """A prefix over 200 bytes stops twistd's option check with a sentence, rather
    than making every publish (the fallback key's too) fail for good later."""
    from twisted.python import usage

    from evrecorder.tap import Options

    with pytest.raises(usage.UsageError, match="S3 prefix is 201 bytes long"):
        Options().parseOptions(["--archive", "s3://bucket/" + "p" * 201])
    Options().parseOptions(["--archive", "s3://bucket/" + "p" * 200])
