"""Checking an archive and a spool: the logic of ``evrecorder verify``, ``ls`` and ``spool``.

Plain blocking code (no Twisted): the command line calls it directly.

An archive is read through a small reader, :class:`LocalArchive` (a
directory) or :class:`S3Archive` (``s3://bucket/prefix``), that lists objects,
streams one, and reads a small one.  A *recording* is a stem ``K`` with
``K.wav`` and ``K.json`` (:func:`pairs`).  :func:`verify_recording` checks one
recording; :func:`run_bounded` runs such checks on a few threads with at most
a few recordings in flight, so memory stays bounded whatever the archive's size
(a WAV is hashed in 1 MiB blocks, never held whole).

What a verification promises (the README's "Compliance" section):

* ``K.wav`` exists, its size and SHA-256 equal the sidecar's ``audio.bytes``
  and ``audio.sha256``; on S3 also the object's ``sha256`` metadata, its
  ``callid``/``sessionid`` metadata, and the SHA-256 checksum S3 stored when
  it was uploaded (of the whole object, or of its parts for a multipart
  upload whose part layout is the recorder's).
* its RIFF/WAVE header is valid, names the sidecar's encoding, channels and
  rate, and its data chunk is whole and lasts ``audio.durationSeconds``.
* ``K.json`` parses and names a schema this version knows.
* A WAV without a sidecar is an interrupted publish (failed, unless it is
  younger than :data:`PUBLISH_GRACE`: a publish may be under way); a sidecar
  without its WAV is failed.  Recordings marked incomplete are listed by
  ``endReason`` but verify: they are faithful copies of what was received.
* On S3, each object's Object Lock retention (mode, retain-until date, legal
  hold) is reported, and with ``expect_retention_days`` a recording is failed
  when an object is retained for less than that many days from the call's start.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Iterator

from evrecorder.archiver import RETRY_FILE
from evrecorder.chunkfile import CHUNKS_FILE
from evrecorder.salvage import QUARANTINE_DIR
from evrecorder.spool import (
    CALL_FILE,
    CALL_FRAMES_FILE,
    EVENTS_FILE,
    FRAMES_SUFFIX,
    SIDECAR_FILE,
    WAV_FILE,
    write_json_atomic,
)

#: Sidecar schemas this version knows.
KNOWN_SCHEMAS = ("evrecorder/1",)
#: A WAV younger than this without its sidecar may be a publish under way.
PUBLISH_GRACE = 900.0
#: Read size when hashing a WAV (memory per worker).
BLOCK = 1 << 20
#: Largest sidecar read (sidecars are a few KB; gRPC ones with many segments more).
MAX_SIDECAR = 16 << 20
#: The recorder's multipart layout (S3Store's default chunk size), to check a
#: multipart object's composite checksum.
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
_FORMAT_TAGS = {1: "pcm16", 7: "mulaw"}
_BYTES_PER_SAMPLE = {"pcm16": 2, "mulaw": 1}


# -- reading archives ---------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    """One object of the archive, named relative to its root (or prefix)."""

    name: str
    size: int
    modified: float
    """When it was written, in seconds since the epoch."""


@dataclass
class Stream:
    """An object being read: its bytes in blocks, and what the store says of it."""

    blocks: Iterator[bytes]
    head: dict
    close: Callable[[], None]


class LocalArchive:
    """A directory archive (``LocalStore``'s layout)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def describe(self) -> str:
        return "file://" + self.root

    def check(self) -> None:
        if not os.path.isdir(self.root):
            raise OSError(f"the archive directory {self.root} does not exist")

    def list(self) -> Iterator[ObjectInfo]:
        """Every file, in name order, but the store's hidden temporary files."""
        for directory, dirs, files in os.walk(self.root):
            dirs.sort()
            rel = os.path.relpath(directory, self.root)
            for name in sorted(files):
                if name.startswith("."):
                    continue
                path = os.path.join(directory, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                yield ObjectInfo(
                    name if rel == "." else rel.replace(os.sep, "/") + "/" + name,
                    st.st_size,
                    st.st_mtime,
                )

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def read(self, name: str, limit: int = MAX_SIDECAR) -> tuple[bytes, dict]:
        with open(self._path(name), "rb") as f:
            # Not read(limit + 1) at once: that reserves the whole limit (16 MiB)
            # for every sidecar of a few KB, on each worker.
            return f.read(min(limit, os.fstat(f.fileno()).st_size) + 1), {}

    def stream(self, name: str) -> Stream:
        f = open(self._path(name), "rb")
        return Stream(iter(lambda: f.read(BLOCK), b""), {}, f.close)


class S3Archive:
    """An S3 archive, read with the store's boto3 client (thread-safe)."""

    def __init__(self, client: Any, bucket: str, prefix: str = "",
                 check: Callable[[], None] | None = None):
        self.client = client
        self._check = check
        self.bucket = bucket
        self.prefix = prefix.lstrip("/")
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def check(self) -> None:
        """Raise ``StoreError`` with the store's sentence when the bucket cannot be used."""
        if self._check is not None:
            self._check()
        else:
            self.client.head_bucket(Bucket=self.bucket)

    def list(self) -> Iterator[ObjectInfo]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield ObjectInfo(
                    obj["Key"][len(self.prefix):], obj["Size"], obj["LastModified"].timestamp()
                )

    def read(self, name: str, limit: int = MAX_SIDECAR) -> tuple[bytes, dict]:
        answer = self.client.get_object(
            Bucket=self.bucket, Key=self.prefix + name, ChecksumMode="ENABLED"
        )
        body = answer.pop("Body")
        try:
            return body.read(limit + 1), answer
        finally:
            body.close()

    def stream(self, name: str) -> Stream:
        # GET answers with what HEAD would (metadata, checksum, Object Lock):
        # one request per object.
        answer = self.client.get_object(
            Bucket=self.bucket, Key=self.prefix + name, ChecksumMode="ENABLED"
        )
        body = answer.pop("Body")
        return Stream(body.iter_chunks(BLOCK), answer, body.close)


def open_archive(url: str, **s3_options: Any) -> LocalArchive | S3Archive:
    """The reader for an ``--archive`` URL, built by the service's own store factory."""
    from evrecorder.stores import LocalStore, store_from_url

    store = store_from_url(url, **s3_options)
    if isinstance(store, LocalStore):
        return LocalArchive(store.root)
    return S3Archive(store.client, store.bucket, store.prefix, check=store.check)


# -- recordings -------------------------------------------------------------------


@dataclass
class Pair:
    """The objects of one recording (either may be missing)."""

    stem: str
    wav: ObjectInfo | None = None
    sidecar: ObjectInfo | None = None

    @property
    def modified(self) -> float:
        return max(o.modified for o in (self.wav, self.sidecar) if o is not None)


def pairs(objects: Iterable[ObjectInfo]) -> Iterator[Pair]:
    """Recordings from a listing in name order: a pair as soon as it is whole,
    the WAVs and sidecars without their partner at the end.  (Other files are
    not the recorder's and are left out.)"""
    pending: dict[str, Pair] = {}
    for obj in objects:
        stem, dot, ext = obj.name.rpartition(".")
        if not dot or ext not in ("wav", "json"):
            continue
        pair = pending.setdefault(stem, Pair(stem))
        if ext == "wav":
            pair.wav = obj
        else:
            pair.sidecar = obj
        if pair.wav is not None and pair.sidecar is not None:
            del pending[stem]
            yield pair
    yield from pending.values()


@dataclass
class Result:
    """What :func:`verify_recording` found about one recording."""

    key: str
    status: str = "ok"
    """``ok``, ``failed``, or ``publishing`` (a young WAV without its sidecar)."""
    problems: list[str] = field(default_factory=list)
    kind: str = "recording"
    """``recording``, ``wav-without-sidecar`` or ``sidecar-without-wav``."""
    summary: dict = field(default_factory=dict)
    """The sidecar's facts for a listing (start, callId, sessionId, agent, ...)."""
    retention: dict = field(default_factory=dict)
    """Per object (``wav``, ``sidecar``): Object Lock mode, retainUntil, legalHold."""
    wav_bytes: int = 0
    stored_checksum: str | None = None
    """How S3's stored checksum was compared: ``whole`` (a single PUT), ``parts``
    (a multipart upload with the recorder's part size), ``other parts`` (another
    layout: S3 checked each part on upload), or None (none stored)."""

    def fail(self, problem: str) -> None:
        self.status = "failed"
        self.problems.append(problem)

    def as_dict(self) -> dict:
        return {
            "key": self.key, "status": self.status, "kind": self.kind,
            "problems": self.problems, **self.summary, "retention": self.retention,
            "storedChecksum": self.stored_checksum,
        }


def sidecar_summary(sidecar: dict) -> dict:
    """The facts ``ls`` shows, from a sidecar (WebSocket or gRPC)."""
    timing = sidecar.get("timing") or {}
    audio = sidecar.get("audio") or {}
    metadata = sidecar.get("metadata") or {}
    agent = metadata.get("agentId") if isinstance(metadata, dict) else None
    if agent is None:
        for segment in sidecar.get("segments") or []:
            participant = (segment or {}).get("participant") or {}
            if participant.get("type") == "AGENT":
                agent = participant.get("id")
                break
    return {
        "start": timing.get("firstMediaAt") or timing.get("connectedAt"),
        "callId": sidecar.get("callId"),
        "sessionId": sidecar.get("sessionId"),
        "agentId": None if agent is None else str(agent),
        "durationSeconds": audio.get("durationSeconds"),
        "complete": sidecar.get("complete"),
        "endReason": sidecar.get("endReason"),
        "source": sidecar.get("source", "websocket"),
    }


def read_sidecar(archive, pair: Pair, result: Result) -> tuple[dict | None, dict]:
    """The parsed sidecar (None, with the problem noted, when it cannot be used)."""
    data, head = archive.read(pair.sidecar.name)
    if len(data) > MAX_SIDECAR:
        result.fail(f"the sidecar is larger than {MAX_SIDECAR >> 20} MiB")
        return None, head
    stored = head.get("ChecksumSHA256") or ""
    if stored and "-" not in stored and stored != _b64(hashlib.sha256(data).digest()):
        result.fail("S3's stored SHA-256 checksum of the sidecar differs from its content")
    try:
        sidecar = json.loads(data)
    except ValueError as e:
        result.fail(f"the sidecar is not valid JSON ({e})")
        return None, head
    if not isinstance(sidecar, dict):
        result.fail("the sidecar is not a JSON object")
        return None, head
    schema = sidecar.get("schema")
    if not schema:
        result.fail("the sidecar names no schema")
    elif schema not in KNOWN_SCHEMAS:
        result.fail(f"the sidecar names the schema {schema!r}, which this version does not know")
    return sidecar, head


def verify_recording(
    archive, pair: Pair, now: float, expect_retention_days: int | None = None,
    publish_grace: float = PUBLISH_GRACE,
) -> Result:
    """Check one recording (see the module docstring); never raises for what it finds."""
    result = Result(pair.stem)
    try:
        _verify(archive, pair, now, expect_retention_days, publish_grace, result)
    except Exception as e:  # an unreadable object is a finding, not a crash
        result.fail(f"reading it failed: {_sentence(e)}")
    return result


def _verify(archive, pair: Pair, now: float, expect_days: int | None, grace: float,
            result: Result) -> None:
    if pair.sidecar is None:
        result.kind = "wav-without-sidecar"
        result.wav_bytes = pair.wav.size
        if now - pair.wav.modified < grace:
            result.status = "publishing"
            result.problems.append("no sidecar yet: a publish may be under way")
        else:
            result.fail("a WAV without its sidecar: an interrupted publish")
        return
    sidecar, sidecar_head = read_sidecar(archive, pair, result)
    _note_retention(result, "sidecar", sidecar_head)
    if sidecar is not None:
        result.summary = sidecar_summary(sidecar)
        key = sidecar.get("key")
        if isinstance(key, str) and key and not (pair.stem == key or pair.stem.endswith("/" + key)):
            result.fail(f"the sidecar says it belongs to the key {key!r}")
    if pair.wav is None:
        result.kind = "sidecar-without-wav"
        result.fail("the sidecar's WAV is missing")
        return
    result.wav_bytes = pair.wav.size
    audio = (sidecar or {}).get("audio")
    if sidecar is not None and not isinstance(audio, dict):
        result.fail("the sidecar has no audio section")
        audio = None
    metadata = _check_wav(archive, pair, audio or {}, result, sidecar is not None and audio is not None)
    if sidecar is not None:
        for name, value in (("callid", sidecar.get("callId")), ("sessionid", sidecar.get("sessionId"))):
            stored = metadata.get(name)
            if stored is not None and value is not None and stored != str(value):
                result.fail(f"the WAV's {name} metadata is {stored!r}, the sidecar's {value!r}")
    if expect_days:
        _check_retention(result, pair, expect_days)


def _check_wav(archive, pair: Pair, audio: dict, result: Result, compare: bool) -> dict:
    """Stream the WAV once: size, SHA-256, S3's checksum and metadata, header.
    Returns the object's user metadata (empty for a directory)."""
    expected_size = audio.get("bytes")
    if compare and expected_size != pair.wav.size:
        result.fail(f"the WAV holds {pair.wav.size} bytes, the sidecar says {expected_size}")
    stream = archive.stream(pair.wav.name)
    try:
        head = stream.head
        _note_retention(result, "wav", head)
        metadata = head.get("Metadata") or {}
        whole = hashlib.sha256()
        checksum = head.get("ChecksumSHA256") or ""
        parts = _multipart_parts(head)
        part_size = 0
        if parts:
            from s3transfer.utils import ChunksizeAdjuster

            part_size = ChunksizeAdjuster().adjust_chunksize(MULTIPART_CHUNKSIZE, pair.wav.size)
            if -(-pair.wav.size // part_size) != parts:
                part_size = 0  # another part layout: S3 checked each part on upload
        part_digests: list[bytes] = []
        part = hashlib.sha256()
        in_part = 0
        first = b""
        total = 0
        for block in stream.blocks:
            if len(first) < 4096:
                first += block[: 4096 - len(first)]
            whole.update(block)
            total += len(block)
            if part_size:
                view = memoryview(block)
                while view:
                    take = min(len(view), part_size - in_part)
                    part.update(view[:take])
                    in_part += take
                    view = view[take:]
                    if in_part == part_size:
                        part_digests.append(part.digest())
                        part, in_part = hashlib.sha256(), 0
    finally:
        stream.close()
    if in_part:
        part_digests.append(part.digest())
    digest = whole.hexdigest()
    if total != pair.wav.size:
        result.fail(f"the WAV read {total} bytes, {pair.wav.size} were listed")
    if compare and audio.get("sha256") != digest:
        result.fail("the WAV's SHA-256 differs from the sidecar's: its content changed")
    stored = metadata.get("sha256")
    if stored is not None and compare and stored != audio.get("sha256"):
        result.fail("the WAV's sha256 metadata differs from the sidecar's")
    if checksum:
        value = checksum.partition("-")[0]
        if not parts and head.get("ChecksumType") != "COMPOSITE":
            result.stored_checksum = "whole"
            if value != _b64(bytes.fromhex(digest)):
                result.fail("S3's stored SHA-256 checksum differs from the WAV's content")
        elif not (part_size and part_digests):
            result.stored_checksum = "other parts"
        else:
            result.stored_checksum = "parts"
            composite = _b64(hashlib.sha256(b"".join(part_digests)).digest())
            if value != composite:
                result.fail("S3's stored SHA-256 checksum (of the parts) differs from the WAV's content")
    problem = _check_header(first, pair.wav.size, audio if compare else {})
    if problem:
        result.fail(problem)
    return metadata


def _multipart_parts(head: dict) -> int:
    checksum = head.get("ChecksumSHA256") or ""
    suffix = checksum.partition("-")[2]
    if suffix.isdigit():
        return int(suffix)
    m = re.search(r"-(\d+)\"?$", head.get("ETag") or "")
    return int(m.group(1)) if m else 0


def parse_wav_header(data: bytes) -> dict:
    """The facts of a RIFF/WAVE header; ValueError with a sentence if it is not one."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("it does not start with a RIFF/WAVE header")
    riff_size = struct.unpack_from("<I", data, 4)[0]
    pos = 12
    fmt = None
    while pos + 8 <= len(data):
        chunk, size = struct.unpack_from("<4sI", data, pos)
        if chunk == b"fmt ":
            if size < 16 or pos + 8 + 16 > len(data):
                raise ValueError("its fmt chunk is too short")
            tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", data, pos + 8)
            fmt = dict(tag=tag, channels=channels, rate=rate, block_align=block_align, bits=bits)
        elif chunk == b"data":
            if fmt is None:
                raise ValueError("its data chunk comes before its fmt chunk")
            if not fmt["block_align"] or not fmt["rate"]:
                raise ValueError("its fmt chunk gives no block size or rate")
            return dict(fmt, riff_size=riff_size, data_offset=pos + 8, data_size=size)
        pos += 8 + size + (size & 1)
    raise ValueError("it has no data chunk in its first 4 KiB")


def _check_header(first: bytes, size: int, audio: dict) -> str | None:
    try:
        h = parse_wav_header(first)
    except ValueError as e:
        return f"the WAV header is not valid: {e}"
    end = h["data_offset"] + h["data_size"]
    if end > size:
        return (
            f"the WAV is truncated: its header announces {h['data_size']} bytes of audio, "
            f"the file holds {size - h['data_offset']}"
        )
    if h["riff_size"] + 8 != size:
        return f"the WAV's RIFF size ({h['riff_size']} + 8) is not its size ({size})"
    if not audio:
        return None
    encoding = _FORMAT_TAGS.get(h["tag"])
    if audio.get("encoding") and encoding != audio["encoding"]:
        return f"the WAV is {encoding or 'format ' + str(h['tag'])}, the sidecar says {audio['encoding']}"
    if audio.get("channels") and h["channels"] != audio["channels"]:
        return f"the WAV has {h['channels']} channels, the sidecar says {audio['channels']}"
    if audio.get("sampleRateHertz") and h["rate"] != audio["sampleRateHertz"]:
        return f"the WAV is sampled at {h['rate']} Hz, the sidecar says {audio['sampleRateHertz']}"
    seconds = h["data_size"] / h["block_align"] / h["rate"]
    expected = audio.get("durationSeconds")
    if isinstance(expected, (int, float)) and abs(seconds - expected) > 1.0 / h["rate"]:
        return f"the WAV lasts {seconds:.3f} s, the sidecar says {expected:.3f} s"
    return None


def _note_retention(result: Result, which: str, head: dict) -> None:
    if not head or not any(k.startswith("ObjectLock") for k in head):
        if head and "VersionId" in head:
            result.retention[which] = {"mode": None, "retainUntil": None, "legalHold": None}
        return
    until = head.get("ObjectLockRetainUntilDate")
    result.retention[which] = {
        "mode": head.get("ObjectLockMode"),
        "retainUntil": _iso(until) if isinstance(until, datetime) else until,
        "legalHold": head.get("ObjectLockLegalHoldStatus"),
    }


def _check_retention(result: Result, pair: Pair, days: int) -> None:
    """Fail a recording whose objects are retained less than ``days`` from the call's start."""
    start = parse_time(result.summary.get("start")) if result.summary.get("start") else None
    if start is None:
        start = min(o.modified for o in (pair.wav, pair.sidecar) if o is not None)
    needed = datetime.fromtimestamp(start, tz=timezone.utc) + timedelta(days=days)
    for which in ("wav", "sidecar"):
        info = result.retention.get(which) or {}
        if not info.get("mode"):
            result.fail(f"the {which} has no Object Lock retention ({days} days expected)")
            continue
        until = parse_time(info.get("retainUntil"))
        if until is None or until < needed.timestamp():
            result.fail(
                f"the {which} is retained until {info.get('retainUntil')}, less than {days} days "
                f"from the call's start (needs {_iso(needed)})"
            )


# -- running many checks --------------------------------------------------------


def run_bounded(
    items: Iterable[Any], work: Callable[[Any], Any], workers: int = 4
) -> Iterator[Any]:
    """``work(item)`` for each item on ``workers`` threads, results in item order,
    with at most ``2 * workers`` items taken from ``items`` at a time."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evrecorder-audit") as pool:
        inflight: deque = deque()
        for item in items:
            inflight.append(pool.submit(work, item))
            while len(inflight) >= 2 * workers:
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()


@dataclass
class Summary:
    """Counts over a verification, for the table and ``--json``."""

    recordings: int = 0
    verified: int = 0
    failed: int = 0
    publishing: int = 0
    wav_without_sidecar: int = 0
    sidecar_without_wav: int = 0
    bytes: int = 0
    incomplete: dict = field(default_factory=dict)
    retention_modes: dict = field(default_factory=dict)
    legal_holds: int = 0
    earliest_retain_until: str | None = None

    def add(self, r: Result) -> None:
        self.recordings += 1
        self.bytes += r.wav_bytes
        if r.status == "ok":
            self.verified += 1
        elif r.status == "failed":
            self.failed += 1
        else:
            self.publishing += 1
        if r.kind == "wav-without-sidecar":
            self.wav_without_sidecar += 1
        elif r.kind == "sidecar-without-wav":
            self.sidecar_without_wav += 1
        if r.summary.get("complete") is False:
            reason = str(r.summary.get("endReason"))
            self.incomplete[reason] = self.incomplete.get(reason, 0) + 1
        for info in r.retention.values():
            mode = info.get("mode") or "none"
            self.retention_modes[mode] = self.retention_modes.get(mode, 0) + 1
            if info.get("legalHold") == "ON":
                self.legal_holds += 1
            until = info.get("retainUntil")
            if until and (self.earliest_retain_until is None or until < self.earliest_retain_until):
                self.earliest_retain_until = until

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def as_dict(self) -> dict:
        return {
            "recordings": self.recordings, "verified": self.verified, "failed": self.failed,
            "publishing": self.publishing, "wavWithoutSidecar": self.wav_without_sidecar,
            "sidecarWithoutWav": self.sidecar_without_wav, "bytes": self.bytes,
            "incomplete": dict(sorted(self.incomplete.items())),
            "retentionModes": dict(sorted(self.retention_modes.items())),
            "legalHolds": self.legal_holds, "earliestRetainUntil": self.earliest_retain_until,
            "ok": self.ok,
        }


# -- the spool ----------------------------------------------------------------------

#: A running recorder's retry requests: ``<spool>/retry/<entry name>``.
RETRY_DIR = RETRY_FILE  # the recorder reads requests there (a file, or a folder of them)
CALLS_DIR = "calls"
_KNOWN_ENTRY_FILES = {CALL_FILE, EVENTS_FILE, WAV_FILE, SIDECAR_FILE, CALL_FRAMES_FILE, CHUNKS_FILE}
#: Per-perspective frames (older versions) and the finalizer's scratch files.
_SCRATCH_SUFFIXES = (FRAMES_SUFFIX, ".split", ".placed", ".tmp")


def _held_inodes() -> set[tuple[int, int, int]] | None:
    """(major, minor, inode) of every file some process holds a lock on; None
    where ``/proc/locks`` cannot be read.  Read-only: taking a lock to test it
    would make a recorder skip the entry until its next scan."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    held = set()
    for line in lines:
        words = line.split()
        if "->" in words:
            continue  # a process waiting for the lock, not holding it
        for word in words:
            parts = word.split(":")
            if len(parts) == 3 and all(parts):
                try:
                    held.add((int(parts[0], 16), int(parts[1], 16), int(parts[2])))
                except ValueError:
                    continue
                break
    return held


def _is_held(path: str, held: set | None) -> bool | None:
    if held is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in held


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _last_end_event(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return None
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "end":
            return event
    return None


def _tree(path: str) -> tuple[int, float, list[str]]:
    """Bytes, newest change and file names of an entry (one level deep is all it has)."""
    total, newest, names = 0, 0.0, []
    try:
        with os.scandir(path) as it:
            for e in it:
                names.append(e.name)
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += st.st_size if e.is_file(follow_symlinks=False) else 0
                newest = max(newest, st.st_mtime)
    except OSError:
        pass
    return total, newest, sorted(names)


def spool_report(root: str, now: float) -> dict:
    """What waits in the spool, read from disk without touching it.

    States of ``calls/<entry>``: ``in progress`` (a call recording), ``ended``
    (waiting to be finalized; a recorder that failed to finalize it sets it
    aside, see its log), ``waiting for the store`` (finalized: the upload
    queue), ``left by a crash`` (no live recorder holds it: the next start,
    or a running recorder's scan within a minute, takes it), ``no header``
    (audio without ``call.json``).  ``quarantine/`` holds what a recorder set
    aside.  Files this version does not know are listed, never judged.
    """
    root = os.path.abspath(root)
    held = _held_inodes()
    calls_dir = os.path.join(root, CALLS_DIR)
    entries = []
    try:
        names = sorted(os.listdir(calls_dir))
    except FileNotFoundError:
        names = []
    for name in names:
        path = os.path.join(calls_dir, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue  # being created or deleted (hidden), or not an entry
        size, newest, files = _tree(path)
        is_held = _is_held(path, held)
        entry: dict[str, Any] = {
            "name": name, "bytes": size, "ageSeconds": round(max(0.0, now - newest), 1),
            "held": is_held,
        }
        header = _read_json(os.path.join(path, CALL_FILE)) if CALL_FILE in files else None
        if SIDECAR_FILE in files:
            sidecar = _read_json(os.path.join(path, SIDECAR_FILE))
            if isinstance(sidecar, dict):
                entry["state"] = "waiting for the store"
                entry.update(
                    key=sidecar.get("key"), callId=sidecar.get("callId"),
                    sessionId=sidecar.get("sessionId"), endReason=sidecar.get("endReason"),
                    durationSeconds=(sidecar.get("audio") or {}).get("durationSeconds"),
                )
            else:
                entry["state"] = "sidecar unreadable"
        elif CALL_FILE in files:
            end = _last_end_event(os.path.join(path, EVENTS_FILE))
            if is_held is False:
                entry["state"] = "left by a crash"
            elif end is not None:
                entry["state"] = "ended, not yet finalized"
                entry["endReason"] = end.get("reason")
            else:
                entry["state"] = "in progress"
            if isinstance(header, dict):
                entry.update(callId=header.get("callId"), sessionId=header.get("sessionId"))
        else:
            audio = [n for n in files if n.endswith(FRAMES_SUFFIX) or n == CHUNKS_FILE]
            entry["state"] = "no header" if audio else "empty"
        other = [n for n in files if n not in _KNOWN_ENTRY_FILES and not n.startswith(".")
                 and not n.endswith(_SCRATCH_SUFFIXES)]
        if other:
            entry["otherFiles"] = other
        entries.append(entry)
    set_aside = []
    quarantine = os.path.join(root, QUARANTINE_DIR)
    try:
        names = sorted(os.listdir(quarantine))
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for name in names:
        if name.startswith("."):
            continue
        path = os.path.join(quarantine, name)
        size, newest, files = _tree(path) if os.path.isdir(path) else (
            os.path.getsize(path), os.path.getmtime(path), [])
        set_aside.append({
            "name": name, "bytes": size, "ageSeconds": round(max(0.0, now - newest), 1),
            "reason": _reason_of(path, files), "files": files,
        })
    retry_dir = os.path.join(root, RETRY_DIR)
    try:
        retries = sorted(n for n in os.listdir(retry_dir) if not n.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        retries = []
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["state"]] = counts.get(e["state"], 0) + 1
    return {
        "spool": root, "entries": entries, "setAside": set_aside,
        "retryRequests": retries, "counts": counts, "locksKnown": held is not None,
    }


def _reason_of(path: str, files: list[str]) -> str | None:
    """Why an entry was set aside, from whatever note lies next to it."""
    candidates = [n for n in files if "reason" in n.lower() or n.lower().startswith("why")]
    if not os.path.isdir(path):
        candidates = []
        for suffix in (".reason", ".reason.txt", ".json"):
            if os.path.exists(path + suffix):
                candidates.append(path + suffix)
    for name in candidates:
        full = name if os.path.isabs(name) else os.path.join(path, name)
        data = _read_json(full)
        if isinstance(data, dict) and data.get("reason"):
            return str(data["reason"])
        try:
            with open(full, encoding="utf-8", errors="replace") as f:
                text = f.read(2000).strip()
        except OSError:
            continue
        if text:
            return text.splitlines()[0]
    return None


def request_retry(root: str, name: str, now: float) -> str:
    """Ask a running recorder to try a set-aside entry again: write
    ``<spool>/retry/<name>``.  Returns its path; ValueError if no such entry."""
    root = os.path.abspath(root)
    if not name or "/" in name or name.startswith(".") or name in (".", ".."):
        raise ValueError(f"{name!r} is not a spool entry name")
    if not any(
        os.path.exists(os.path.join(root, d, name)) for d in (CALLS_DIR, QUARANTINE_DIR)
    ):
        raise ValueError(f"the spool {root} has no entry {name!r} (see `evrecorder spool`)")
    directory = os.path.join(root, RETRY_DIR)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    write_json_atomic(path, {"entry": name, "requestedAt": _iso_ts(now)})
    return path


# -- times ---------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([mhdw])$")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float) -> float:
    """A point in time from the command line: ``2026-11-24``, an ISO 8601 time
    (UTC unless it says otherwise), or an age such as ``36h``, ``2d``, ``1w``."""
    m = _RELATIVE.match(text.strip().lower())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    value = parse_time(text)
    if value is None:
        raise ValueError(
            f"{text!r} is not a date: give 2026-11-24, 2026-11-24T08:00:00Z or an age like 2d"
        )
    return value


def parse_time(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _iso_ts(ts: float) -> str:
    return _iso(datetime.fromtimestamp(ts, tz=timezone.utc))


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _sentence(e: BaseException) -> str:
    response = getattr(e, "response", None)  # botocore's ClientError
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        return f"S3 answered {error.get('Code')}: {error.get('Message') or 'no message'}"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or e.__class__.__name__
