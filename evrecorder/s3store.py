"""The S3 archive store: publishes recordings to a bucket with boto3.

Works with AWS S3 and S3-compatible servers (``endpoint_url``).  Like every
store it is plain blocking code: the archiver calls it from a thread pool.  One
boto3 client is made in ``__init__`` and shared by those threads (boto3 clients
are thread-safe; sessions are not).

Publishing ``K`` writes ``<prefix>/K.wav`` with boto3's managed transfer
(multipart above ``multipart_threshold``, each request checksummed with
SHA-256 so the store verifies every part), checks the result with a HEAD, and
only then writes ``<prefix>/K.json``.  See :meth:`S3Store.publish` for how an
existing object at the key is never overwritten.

IAM: the credentials need ``s3:PutObject`` and ``s3:GetObject`` on the prefix
and ``s3:ListBucket`` on the bucket.  Without ListBucket, S3 answers a HEAD of
a missing object with 403 instead of 404, and every publish fails as "access
denied".  With SSE-KMS, also ``kms:GenerateDataKey`` and ``kms:Decrypt``.
With Object Lock options, also ``s3:GetBucketObjectLockConfiguration``,
``s3:PutObjectRetention`` and ``s3:PutObjectLegalHold``.

WORM retention (S3 Object Lock): with ``object_lock_mode`` and
``object_lock_days``, both objects of a recording carry the retention (and,
with ``legal_hold``, a legal hold) in the PUT that creates them (see
:meth:`S3Store._object_lock_args`); with a mode alone the bucket's default
retention applies.  The retained objects are never replaced: see
:meth:`S3Store._publish_sidecar`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from s3transfer.utils import ChunksizeAdjuster

from evrecorder.stores import MAX_KEY_SUFFIX, PublishItem, StoreError, candidate_keys

SSE_MODES = (None, "AES256", "aws:kms")
OBJECT_LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")

#: S3 caps user metadata (keys and values) at 2 KB per object.
_METADATA_BUDGET = 2000

_DENIED_CODES = {
    "403",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
}

#: S3's limit on an object key, in UTF-8 bytes.
MAX_OBJECT_KEY_BYTES = 1024

#: Error codes that refuse the object's *key*: that publish can never succeed
#: as it is (a fallback key can).  Every other error is taken as one that may
#: pass: outages, throttling, 5xx, timeouts, and also access denied, a missing
#: bucket and other 400s (InvalidArgument, InvalidRequest ...), which are the
#: configuration's (SSE, storage class, IAM) and fixed by an operator, not by
#: another key.
_KEY_REFUSED_CODES = {"KeyTooLongError", "InvalidObjectName", "InvalidURI", "414"}

_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\"\)]+)")
_MULTIPART_ETAG = re.compile(r"-(\d+)\"?$")


@dataclass(frozen=True)
class _Digests:
    """What we expect the store to report for our WAV."""

    sha256_b64: str
    """Base64 SHA-256 of the whole file: a single-part object's ChecksumSHA256."""
    parts: int
    """Number of parts boto3 will upload; 0 for a single PUT."""
    composite_b64: str | None
    """Base64 SHA-256 of the parts' SHA-256s: a multipart object's ChecksumSHA256."""


#: Longest prefix of ``s3://bucket/prefix`` (see :mod:`evrecorder.keys`).
MAX_PREFIX_BYTES = 200


class S3Store:
    """Publishes ``K.wav`` then ``K.json`` under ``s3://bucket/prefix``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        sse: str | None = None,
        sse_kms_key_id: str | None = None,
        storage_class: str | None = None,
        multipart_threshold: int = 64 * 1024 * 1024,
        multipart_chunksize: int = 16 * 1024 * 1024,
        max_concurrency: int = 4,
        object_lock_mode: str | None = None,
        object_lock_days: int | None = None,
        legal_hold: bool = False,
        now: Callable[[], float] = time.time,
        client: Any = None,
    ):
        if not bucket:
            raise ValueError("no S3 bucket was given")
        if sse not in SSE_MODES:
            raise ValueError(f"the SSE mode must be AES256 or aws:kms, not {sse!r}")
        if sse_kms_key_id and sse != "aws:kms":
            raise ValueError("a KMS key id needs SSE mode aws:kms")
        if multipart_threshold <= 0 or multipart_chunksize <= 0 or max_concurrency <= 0:
            raise ValueError("the multipart sizes and the concurrency must be positive")
        self.bucket = bucket
        self.prefix = prefix.lstrip("/")
        self.endpoint_url = endpoint_url
        self._sse = sse
        self._sse_kms_key_id = sse_kms_key_id
        self._storage_class = storage_class
        self._init_object_lock(object_lock_mode, object_lock_days, legal_hold, now)
        self._threshold = multipart_threshold
        self._chunksize = multipart_chunksize
        self._transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
            # The CRT transfer client would bypass the client's event hooks,
            # which add If-None-Match (see _add_if_none_match).
            preferred_transfer_client="classic",
        )
        if client is None:
            config = Config(
                # The archiver retries forever with backoff: keep one attempt
                # bounded.  (botocore counts retries here: 4 tries in all, with
                # at most 1 + 2 + 4 s of backoff between them.)
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                # Each upload runs max_concurrency part uploads, and the
                # archiver runs several uploads at once: avoid urllib3's
                # "connection pool is full" churn.
                max_pool_connections=max(10, 4 * max_concurrency),
            )
            # A session of our own: boto3's default session is not thread-safe.
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
        self._client = client
        self._conditional_writes = True
        self._conditional_keys: set[str] = set()
        self._lock = threading.Lock()
        for op in ("PutObject", "CompleteMultipartUpload"):
            client.meta.events.register(
                "before-parameter-build.s3." + op, self._add_if_none_match
            )

    # -- Store interface ----------------------------------------------------

    def describe(self) -> str:
        # The endpoint the client resolved: --s3-endpoint-url, else
        # AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or the shared config, else
        # AWS's for the region.  An operator sees which one is in use.
        url = self.endpoint_url or getattr(
            getattr(self._client, "meta", None), "endpoint_url", None)
        where = f"s3://{self.bucket}/{self.prefix}"
        if url:
            where += " at " + _safe_url(url)
        return where

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            self._check_object_lock()
        except (ClientError, BotoCoreError, S3UploadFailedError) as e:
            raise StoreError(self._sentence(e)) from e

    def publish(self, item: PublishItem) -> str:
        """Publish ``K.wav`` then ``K.json``; return the key used.

        Never overwriting is done in two layers.  First a HEAD of ``K.wav``:
        an object with our size, ``sha256`` metadata and checksum is ours (a
        retry after a crash between WAV and sidecar), so only the sidecar is
        (re)written; any other object sends us to ``K-2``, ``K-3`` ...  Then,
        to close the race between that HEAD and the upload, the WAV is written
        with a conditional write (``If-None-Match: *`` on PutObject, or on
        CompleteMultipartUpload for a multipart upload), which S3 refuses with
        412 when the key appeared meanwhile.  If the endpoint rejects the
        condition as unsupported (501 NotImplemented, or a 400 naming it), the
        store stops sending it and relies on the HEAD check alone.  An endpoint
        that silently ignores the header leaves only the HEAD check, too.

        The sidecar is written unconditionally: it belongs to the WAV next to
        it, which at that point is known to be ours.

        Verification: the spooled file is hashed first and must match
        ``item.wav_sha256``; boto3 sends a SHA-256 with every request, which
        S3 checks; after the upload a HEAD must show our size, our ``sha256``
        metadata and, where S3 keeps checksums, the expected ChecksumSHA256:
        of the whole file for a single PUT, of the parts' digests (a composite
        checksum) for a multipart upload with our part layout.
        """
        longest = self._object_key(f"{item.key}-{MAX_KEY_SUFFIX + 1}.json")
        if len(longest.encode("utf-8")) > MAX_OBJECT_KEY_BYTES:
            # S3 would answer KeyTooLongError; S3-compatible servers may not
            # check, but the key would not be portable.
            raise StoreError(
                f"the object key {self._object_key(item.key)}.wav is longer than S3's "
                f"{MAX_OBJECT_KEY_BYTES} bytes", permanent=True,
            )
        try:
            return self._publish(item)
        except (ClientError, BotoCoreError, S3UploadFailedError) as e:
            error = _client_error(e)
            refused = error is not None and _code(error) in _KEY_REFUSED_CODES
            raise StoreError(self._sentence(e), permanent=refused) from e
        except OSError as e:
            raise StoreError(
                f"reading the spooled recording {item.wav_path} failed: {e.strerror or e}",
                spooled=True,
            ) from e

    # -- publishing ---------------------------------------------------------

    def _publish(self, item: PublishItem) -> str:
        self._require_object_lock()
        digests = self._local_digests(item)
        for key in candidate_keys(item.key):
            wav = self._object_key(key + ".wav")
            head = self._head(wav)
            if head is None:
                if self._upload_wav(item, wav):
                    head = self._head(wav)
                    if head is None:
                        raise StoreError(f"{wav} was not found right after its upload")
                    problem = self._mismatch(head, item, digests)
                    if problem:
                        # Left in place: it has no sidecar, and the next attempt
                        # sees it is not ours and moves on to the next key.
                        raise StoreError(
                            f"s3://{self.bucket}/{wav} does not match what was uploaded: {problem}"
                        )
                else:
                    # Someone created the key between our HEAD and our write.
                    head = self._head(wav)
                    if head is None or self._mismatch(head, item, digests):
                        continue
            elif self._mismatch(head, item, digests):
                continue  # someone else's recording: never overwrite it
            self._ensure_retention(wav, head)
            self._publish_sidecar(key, item)
            return key
        raise StoreError(
            f"more than {MAX_KEY_SUFFIX} different recordings at {item.key}", permanent=True
        )

    def _object_key(self, name: str) -> str:
        if not self.prefix or self.prefix.endswith("/"):
            return self.prefix + name
        return self.prefix + "/" + name

    def _local_digests(self, item: PublishItem) -> _Digests:
        """Hash the spooled file (one read) before trusting it for an upload.

        The part digests let us verify a multipart object end to end: S3
        reports their SHA-256 (a "composite" checksum), not the file's.
        """
        parts = 0
        part_size = 0
        if item.wav_size >= self._threshold:
            # The same part size s3transfer will use for this file.
            part_size = ChunksizeAdjuster().adjust_chunksize(self._chunksize, item.wav_size)
        whole = hashlib.sha256()
        part_digests = []
        with open(item.wav_path, "rb") as f:
            while True:
                block = f.read(part_size or 1 << 20)
                if not block:
                    break
                whole.update(block)
                if part_size:
                    part_digests.append(hashlib.sha256(block).digest())
                    parts += 1
        if whole.hexdigest() != item.wav_sha256:
            raise StoreError(
                f"the spooled recording {item.wav_path} does not match its SHA-256",
                spooled=True,
            )
        composite = None
        if part_digests:
            composite = _b64(hashlib.sha256(b"".join(part_digests)).digest())
        return _Digests(_b64(whole.digest()), parts, composite)

    def _head(self, object_key: str) -> dict | None:
        try:
            return self._client.head_object(
                Bucket=self.bucket, Key=object_key, ChecksumMode="ENABLED"
            )
        except ClientError as e:
            if _status(e) == 404:
                return None
            raise

    def _mismatch(self, head: dict, item: PublishItem, digests: _Digests) -> str | None:
        """Why the object in ``head`` is not our WAV, or None when it is."""
        if (head.get("Metadata") or {}).get("sha256") != item.wav_sha256:
            return "its sha256 metadata is another recording's"
        if head.get("ContentLength") != item.wav_size:
            return f"it holds {head.get('ContentLength')} bytes, not {item.wav_size}"
        checksum = head.get("ChecksumSHA256")
        if not checksum:
            return None  # the endpoint keeps no checksums: size and metadata it is
        value, _, parts_suffix = checksum.partition("-")
        etag_parts = _MULTIPART_ETAG.search(head.get("ETag", ""))
        parts = int(parts_suffix or (etag_parts.group(1) if etag_parts else 0))
        if not parts and head.get("ChecksumType") != "COMPOSITE":
            if value != digests.sha256_b64:
                return "its SHA-256 checksum differs"
            return None
        # A composite checksum: comparable only with the same part layout.  An
        # object uploaded with another chunk size cannot be checked here; S3
        # verified each of its parts when they were uploaded.
        if digests.composite_b64 and parts == digests.parts and value != digests.composite_b64:
            return "its SHA-256 checksum (of the parts) differs"
        return None

    def _extra_args(self) -> dict[str, str]:
        args = {"ChecksumAlgorithm": "SHA256"}
        if self._sse:
            args["ServerSideEncryption"] = self._sse
        if self._sse_kms_key_id:
            args["SSEKMSKeyId"] = self._sse_kms_key_id
        if self._storage_class:
            args["StorageClass"] = self._storage_class
        return args

    def _upload_wav(self, item: PublishItem, object_key: str) -> bool:
        """Upload the WAV if the key is still free; False when it was taken."""
        extra: dict[str, Any] = self._extra_args()
        extra["ContentType"] = "audio/wav"
        extra["Metadata"] = _object_metadata(item)
        extra.update(self._object_lock_args())
        if self._conditional_writes:
            try:
                self._transfer(item.wav_path, object_key, extra, conditional=True)
                return True
            except (ClientError, S3UploadFailedError) as e:
                error = _client_error(e)
                if error is None:
                    raise
                if _status(error) == 412 or _code(error) == "PreconditionFailed":
                    return False
                if _code(error) == "ConditionalRequestConflict":
                    raise StoreError(
                        f"another upload to {object_key} was in progress at the same time"
                    ) from e
                if not _rejects_condition(error):
                    raise
                # An endpoint without conditional writes: HEAD checks only, from now on.
                self._conditional_writes = False
        self._transfer(item.wav_path, object_key, extra, conditional=False)
        return True

    def _transfer(self, path: str, object_key: str, extra: dict, conditional: bool) -> None:
        if conditional:
            with self._lock:
                self._conditional_keys.add(object_key)
        try:
            self._client.upload_file(
                path, self.bucket, object_key, ExtraArgs=extra, Config=self._transfer_config
            )
        finally:
            if conditional:
                with self._lock:
                    self._conditional_keys.discard(object_key)

    def _add_if_none_match(self, params: dict, **kwargs: Any) -> None:
        # boto3's managed transfer has no IfNoneMatch argument, so the
        # condition is added to the PutObject or CompleteMultipartUpload
        # request it makes (possibly in one of its own threads) for our key.
        if params.get("Bucket") != self.bucket:
            return
        with self._lock:
            wanted = params.get("Key") in self._conditional_keys
        if wanted:
            params.setdefault("IfNoneMatch", "*")

    def _put_sidecar(self, key: str, item: PublishItem) -> None:
        body = item.sidecar_for(key)
        object_key = self._object_key(key + ".json")
        answer = self._client.put_object(
            Bucket=self.bucket, Key=object_key, Body=body,
            ContentType="application/json", **self._extra_args(), **self._object_lock_args(),
        )
        checksum = answer.get("ChecksumSHA256")
        if checksum and checksum != _b64(hashlib.sha256(body).digest()):
            raise StoreError(f"S3 stored {object_key} with a different SHA-256 checksum")

    # -- WORM retention (S3 Object Lock) --------------------------------------

    def _init_object_lock(
        self, mode: str | None, days: int | None, legal_hold: bool, now: Callable[[], float]
    ) -> None:
        if mode is not None and mode not in OBJECT_LOCK_MODES:
            raise ValueError(f"the Object Lock mode must be GOVERNANCE or COMPLIANCE, not {mode!r}")
        if days is not None and mode is None:
            raise ValueError("Object Lock days need an Object Lock mode (GOVERNANCE or COMPLIANCE)")
        if days is not None and days <= 0:
            raise ValueError("the Object Lock days must be more than 0")
        self.object_lock_mode = mode
        self.object_lock_days = days
        self.legal_hold = bool(legal_hold)
        self._now = now
        self._object_lock_checked = False
        # The bucket's default retention (mode, days), read by the check.
        self._default_retention: tuple[str, int] | None = None

    @property
    def client(self) -> Any:
        """The boto3 client (``evrecorder verify`` reads the archive with it)."""
        return self._client

    @property
    def _locking(self) -> bool:
        return self.object_lock_mode is not None or self.legal_hold

    def _check_object_lock(self) -> None:
        """With Object Lock options, the bucket must have Object Lock enabled
        (and, for a mode without days, a default retention in that mode)."""
        if not self._locking:
            return
        try:
            answer = self._client.get_object_lock_configuration(Bucket=self.bucket)
        except ClientError as e:
            if _code(e) not in ("ObjectLockConfigurationNotFoundError", "404"):
                raise
            answer = {}
        config = answer.get("ObjectLockConfiguration") or {}
        if config.get("ObjectLockEnabled") != "Enabled":
            raise StoreError(
                f"the bucket '{self.bucket}' does not have Object Lock enabled, which "
                "--object-lock-mode and --legal-hold need (see 'Compliance' in the README)"
            )
        rule = (config.get("Rule") or {}).get("DefaultRetention") or {}
        if rule.get("Mode"):
            days = int(rule.get("Days") or 0) or 365 * int(rule.get("Years") or 0)
            self._default_retention = (rule["Mode"], days)
        if self.object_lock_mode and self.object_lock_days is None:
            if self._default_retention is None:
                raise StoreError(
                    f"--object-lock-mode without --object-lock-days uses the bucket's default "
                    f"retention, and the bucket '{self.bucket}' has none: give --object-lock-days"
                )
            if self._default_retention[0] != self.object_lock_mode:
                raise StoreError(
                    f"the bucket '{self.bucket}' retains objects in {self._default_retention[0]} "
                    f"mode by default, not {self.object_lock_mode}: give --object-lock-days to "
                    "set the retention of each recording"
                )
        self._object_lock_checked = True

    def _require_object_lock(self) -> None:
        """Never publish without the retention asked for: the check must have passed."""
        if self._locking and not self._object_lock_checked:
            self._check_object_lock()

    def _object_lock_args(self) -> dict[str, Any]:
        """Retention and legal hold for a PUT (or CreateMultipartUpload).

        S3 wants a checksum on every request that writes a locked object:
        ``ChecksumAlgorithm=SHA256`` (:meth:`_extra_args`) gives each PutObject
        and, through s3transfer, each UploadPart one.  A mode without days
        sends no retention: the bucket's default applies.
        """
        args: dict[str, Any] = {}
        if self.object_lock_mode and self.object_lock_days:
            args["ObjectLockMode"] = self.object_lock_mode
            args["ObjectLockRetainUntilDate"] = self._retain_until(self.object_lock_days)
        if self.legal_hold:
            args["ObjectLockLegalHoldStatus"] = "ON"
        return args

    def _retain_until(self, days: int) -> datetime:
        return datetime.fromtimestamp(self._now(), tz=timezone.utc) + timedelta(days=days)

    def _ensure_retention(self, object_key: str, head: dict) -> None:
        """Set the retention and hold on our WAV's version if the store did not keep them.

        Some endpoints drop the Object Lock headers of a multipart upload
        (moto does); AWS keeps them.  Either way the object ends up retained.
        """
        if not self._locking:
            return
        version = head.get("VersionId")
        extra = {"VersionId": version} if version else {}
        wanted = self.object_lock_mode
        days = self.object_lock_days
        if wanted and not days and self._default_retention:
            days = self._default_retention[1]
        if wanted and days and not head.get("ObjectLockMode"):
            self._client.put_object_retention(
                Bucket=self.bucket, Key=object_key, ChecksumAlgorithm="SHA256",
                Retention={"Mode": wanted, "RetainUntilDate": self._retain_until(days)}, **extra,
            )
        if self.legal_hold and head.get("ObjectLockLegalHoldStatus") != "ON":
            self._client.put_object_legal_hold(
                Bucket=self.bucket, Key=object_key, ChecksumAlgorithm="SHA256",
                LegalHold={"Status": "ON"}, **extra,
            )

    def _publish_sidecar(self, key: str, item: PublishItem) -> None:
        """Write ``K.json`` unless, with Object Lock, it is there already.

        In a locked bucket a second PUT would not replace the retained
        sidecar but add a version next to it, kept as long: a retry after a
        crash between the sidecar and the spool cleanup finds the sidecar of
        this very WAV (same ``audio.sha256``) and leaves it as it is.
        """
        if self._locking:
            object_key = self._object_key(key + ".json")
            try:
                answer = self._client.get_object(Bucket=self.bucket, Key=object_key)
            except ClientError as e:
                if _status(e) != 404:
                    raise
            else:
                try:
                    existing = json.loads(answer["Body"].read(1 << 20))
                except ValueError:
                    existing = None
                if (
                    isinstance(existing, dict)
                    and (existing.get("audio") or {}).get("sha256") == item.wav_sha256
                ):
                    return
        self._put_sidecar(key, item)

    # -- errors -------------------------------------------------------------

    def _endpoint(self, error: BaseException | None = None) -> str:
        url = self.endpoint_url
        if not url and error is not None:
            url = getattr(error, "kwargs", {}).get("endpoint_url")
        if not url:
            url = getattr(getattr(self._client, "meta", None), "endpoint_url", None) or "?"
        return _safe_url(url)

    def _sentence(self, e: BaseException) -> str:
        """One sentence for the log; never credentials."""
        error = _client_error(e)
        if error is not None:
            return self._client_error_sentence(error)
        if isinstance(e, NoCredentialsError):
            return "no AWS credentials were found (environment, shared config or instance role)"
        if isinstance(e, PartialCredentialsError):
            return f"the AWS credentials are incomplete: {e}"
        if isinstance(e, BotoConnectionError):
            # Connection refused, DNS failure, connect timeout, proxy error.
            return f"the S3 endpoint {self._endpoint(e)} could not be reached: {_reason(e)}"
        if isinstance(e, ReadTimeoutError):
            return f"the S3 endpoint {self._endpoint(e)} did not answer in time"
        return f"talking to S3 at {self._endpoint(e)} failed: {e}"

    def _client_error_sentence(self, e: ClientError) -> str:
        code = _code(e)
        operation = getattr(e, "operation_name", "")
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and operation == "HeadBucket"):
            return f"the bucket '{self.bucket}' does not exist"
        if code in _DENIED_CODES:
            detail = "" if code in ("403", "AccessDenied") else f"; S3 said {code}"
            return (
                f"access to the bucket '{self.bucket}' was denied "
                f"(check the credentials and the IAM policy{detail})"
            )
        if code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
            headers = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            region = headers.get("x-amz-bucket-region") or e.response.get("Error", {}).get(
                "Region"
            )
            where = f" ({region})" if region else ""
            return f"the bucket '{self.bucket}' is in another region{where}; set the S3 region"
        message = e.response.get("Error", {}).get("Message") or "no message"
        return f"S3 answered {code}: {message}"


# -- helpers ----------------------------------------------------------------


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _safe_url(url: str) -> str:
    """The URL without user info, query or fragment (they may hold secrets)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an invalid URL)"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _client_error(e: BaseException) -> ClientError | None:
    """The ClientError behind ``e``: boto3 wraps upload errors in S3UploadFailedError."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, ClientError):
            return e
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
        seen += 1
    return None


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", "") or _status(e))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _rejects_condition(e: ClientError) -> bool:
    """Whether the endpoint refused If-None-Match as unsupported."""
    if _status(e) == 501 or _code(e) == "NotImplemented":
        return True
    message = str(e.response.get("Error", {}).get("Message", "")).lower()
    return _status(e) == 400 and ("if-none-match" in message or "conditional" in message)


def _reason(e: BotoCoreError) -> str:
    """The cause in words ("Connection refused"), not urllib3's object reprs."""
    text = str(getattr(e, "kwargs", {}).get("error") or e)
    found = _ERRNO.search(text)
    if found:
        return found.group(1).strip()
    if "timed out" in text.lower():
        return "the connection timed out"
    return text


def _object_metadata(item: PublishItem) -> dict[str, str]:
    """The WAV's user metadata: ``sha256`` first, then the item's, within S3's limits.

    Empty values are left out, and values that are not printable ASCII are
    RFC 2047 encoded (as S3 itself returns them): HTTP headers carry ASCII.
    A value that would push the total past S3's 2 KB cap is dropped rather
    than failing the upload; the sidecar holds everything anyway.
    """
    metadata = {"sha256": item.wav_sha256}
    used = len("sha256") + len(item.wav_sha256)
    for name, value in item.object_metadata.items():
        value = str(value)
        if not value or name.lower() == "sha256":
            continue
        if not (value.isascii() and value.isprintable()):
            value = "=?UTF-8?B?" + _b64(value.encode("utf-8")) + "?="
        if used + len(name) + len(value) > _METADATA_BUDGET:
            continue
        metadata[name] = value
        used += len(name) + len(value)
    return metadata
