"""Archive stores: where finished recordings go.

A store is a plain, blocking object (the archiver calls it from a thread pool,
never from the reactor thread).  It publishes one recording as two objects,
``K.wav`` first and ``K.json`` (the sidecar) last, so that the presence of the
sidecar means the recording is complete and verified.

Contract shared by every store:

* ``publish`` is idempotent.  Publishing the same recording again (say after a
  crash between the WAV and the sidecar) leaves the same two objects, not
  duplicates.
* An existing, *different* WAV at the key is never overwritten.  The store
  picks the next free key ``K-2``, ``K-3`` ... and returns the key it used.
  Whether "different" is decided by a checksum comparison (local, memory) or a
  conditional write is the store's business.
* Failures raise :class:`StoreError` with one sentence a user understands
  ("no such bucket 'x'", "access denied", ...), and say whether trying again
  can help.  Most failures can (an outage, a full disk, access denied: an
  operator fixes those), and the archiver retries them forever.  A store that
  refuses the *key* (too long, a name the file system or S3 will not take)
  raises a ``permanent`` error: the archiver then publishes the recording
  under a fallback key.  A failure to read the spooled recording, or a
  recording that no longer matches its checksum, is ``spooled``: the spool
  entry is at fault, not the store.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Protocol
from urllib.parse import unquote, urlparse

#: How many alternative keys a store tries before giving up on a collision.
MAX_KEY_SUFFIX = 1000


#: errno values a file system gives for a name it will never take.
REFUSED_NAME_ERRNOS = frozenset(
    {errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ, errno.ENOTDIR, errno.EISDIR}
)


class StoreError(Exception):
    """An archive operation failed; ``str(err)`` is a sentence for the log.

    ``permanent``: the store refuses this key, so the same publish can never
    succeed (another key may).  ``spooled``: reading or verifying the spooled
    recording failed (the spool entry's problem, not the store's).
    """

    def __init__(self, message: str, *, permanent: bool = False, spooled: bool = False):
        super().__init__(message)
        self.permanent = permanent
        self.spooled = spooled


@dataclass
class PublishItem:
    """One finished recording, ready to be published."""

    key: str
    """Archive key without extension, e.g. ``2026/11/24/12345-2``."""
    wav_path: str
    wav_sha256: str
    """Hex SHA-256 of the WAV file's bytes."""
    wav_size: int
    sidecar_for: Callable[[str], bytes]
    """Builds the sidecar bytes for the key actually used (called once, last)."""
    object_metadata: dict[str, str] = field(default_factory=dict)
    """Small string metadata stores may attach (callId, sessionId, agentId, schema)."""


class Store(Protocol):
    """What the archiver needs from a store.  All methods block."""

    def describe(self) -> str:
        """Where this store writes, for logs (never containing credentials)."""

    def check(self) -> None:
        """Raise :class:`StoreError` when the store is unusable (missing, denied)."""

    def publish(self, item: PublishItem) -> str:
        """Publish ``K.wav`` then ``K.json``; return the key used."""


def candidate_keys(key: str):
    """The key, then ``key-2``, ``key-3`` ... for collisions."""
    yield key
    for n in range(2, MAX_KEY_SUFFIX + 2):
        yield f"{key}-{n}"


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def _current_umask() -> int:
    # Read once at import, while no other thread can be creating files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Mode of archived files: what open() would give under the process umask
#: (mkstemp's 0600 would hide recordings from the service's group).
_FILE_MODE = 0o666 & ~_current_umask()


def _write_temp(directory: str, write: Callable[[object], None]) -> str:
    """Write a fsynced temporary file in ``directory``; return its path."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _create_exclusive(src: str, path: str) -> None:
    """Put ``src``'s content at ``path``, which must not exist (FileExistsError).

    A hard link makes the whole file appear at once.  Filesystems without
    hard links (vfat, some network mounts) get an exclusive create and a copy:
    a reader may see a growing WAV there, but the sidecar still comes last.
    """
    try:
        os.link(src, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                while block := f.read(1 << 20):
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            # Ours (created exclusively) and partial (a full disk): left in
            # place, every retry would see "someone else's recording" and
            # leave another partial file at the next key.
            _unlink_quietly(path)
            raise
    _fsync_dir(os.path.dirname(path))


def _atomic_write(path: str, write: Callable[[object], None]) -> None:
    """Replace ``path`` through a fsynced temporary file and a rename."""
    directory = os.path.dirname(path)
    tmp = _write_temp(directory, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """Publishes into a directory tree: ``<root>/<key>.wav`` and ``.json``.

    Each file is written to a temporary name, fsynced and renamed into place,
    so a reader never sees a partial file.  Collisions are detected by
    comparing the SHA-256 of the existing WAV with ours.
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def describe(self) -> str:
        return "file://" + self.root

    def check(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot create the archive directory {self.root}: {e.strerror}"
            ) from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"the archive directory {self.root} is not writable")

    def _path(self, key: str, ext: str) -> str:
        path = os.path.normpath(os.path.join(self.root, key + ext))
        if not path.startswith(self.root + os.sep):
            raise StoreError(
                f"the archive key {key!r} leaves the archive directory", permanent=True
            )
        return path

    def publish(self, item: PublishItem) -> str:
        try:
            return self._publish(item)
        except StoreError:
            raise
        except OSError as e:
            raise StoreError(
                f"writing to the archive directory {self.root} failed: "
                f"{e.strerror or e}",
                permanent=e.errno in REFUSED_NAME_ERRNOS,
            ) from e

    def _publish(self, item: PublishItem) -> str:
        """WAV first, created exclusively (a hard link from a verified temporary
        file), so two publishes racing for one key can never both think they
        own it; then the sidecar."""
        tmp = None
        try:
            for key in candidate_keys(item.key):
                wav = self._path(key, ".wav")
                if not os.path.exists(wav):
                    if tmp is None:
                        tmp = self._verified_copy(item, os.path.dirname(wav))
                    elif os.path.dirname(tmp) != os.path.dirname(wav):
                        _unlink_quietly(tmp)
                        tmp = self._verified_copy(item, os.path.dirname(wav))
                    try:
                        _create_exclusive(tmp, wav)
                    except FileExistsError:
                        pass  # someone else got there first: compare below
                if sha256_file(wav) != item.wav_sha256:
                    continue  # someone else's recording: never overwrite it
                sidecar = item.sidecar_for(key)
                _atomic_write(self._path(key, ".json"), lambda out: out.write(sidecar))
                return key
        finally:
            if tmp is not None:
                _unlink_quietly(tmp)
        raise StoreError(
            f"more than {MAX_KEY_SUFFIX} different recordings at {item.key}", permanent=True
        )

    @staticmethod
    def _verified_copy(item: PublishItem, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)

        def copy(out):
            try:
                f = open(item.wav_path, "rb")
            except OSError as e:
                raise _spool_read_error(item, e) from e
            with f:
                while True:
                    try:
                        block = f.read(1 << 20)
                    except OSError as e:
                        raise _spool_read_error(item, e) from e
                    if not block:
                        break
                    out.write(block)

        tmp = _write_temp(directory, copy)
        if sha256_file(tmp) != item.wav_sha256:
            _unlink_quietly(tmp)
            raise StoreError(
                f"the spooled {item.key}.wav does not match its checksum", spooled=True
            )
        return tmp


def _spool_read_error(item: PublishItem, e: OSError) -> StoreError:
    return StoreError(
        f"reading the spooled recording {item.wav_path} failed: {e.strerror or e}", spooled=True
    )


class MemoryStore:
    """A store in a dict, for tests.  ``fail_with`` makes publish raise;
    ``refuse_key(key)`` returning a sentence makes it refuse that key (permanent)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.fail_with: str | None = None
        self.refuse_key: Callable[[str], str | None] | None = None
        self.calls = 0

    def describe(self) -> str:
        return "memory:"

    def check(self) -> None:
        if self.fail_with:
            raise StoreError(self.fail_with)

    def publish(self, item: PublishItem) -> str:
        self.calls += 1
        if self.fail_with:
            raise StoreError(self.fail_with)
        refused = self.refuse_key(item.key) if self.refuse_key else None
        if refused:
            raise StoreError(refused, permanent=True)
        with open(item.wav_path, "rb") as f:
            data = f.read()
        for key in candidate_keys(item.key):
            existing = self.objects.get(key + ".wav")
            if existing is not None and hashlib.sha256(existing).hexdigest() != item.wav_sha256:
                continue
            self.objects[key + ".wav"] = data
            self.objects[key + ".json"] = item.sidecar_for(key)
            return key
        raise StoreError("too many collisions")


def store_from_url(url: str, **s3_options) -> Store:
    """Build the store for ``--archive``: ``s3://bucket/prefix``, ``file:///dir`` or a path."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        from evrecorder.s3store import S3Store  # boto3 is only imported when used

        if not parsed.netloc:
            raise ValueError(f"the archive URL {url!r} names no bucket")
        return S3Store(bucket=parsed.netloc, prefix=parsed.path.lstrip("/"), **s3_options)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"the archive URL {url!r} names a remote host; use file:///dir")
        return LocalStore(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(
            f"the archive URL {url!r} has an unknown scheme; use s3://bucket/prefix, "
            "file:///dir or a directory"
        )
    return LocalStore(url)
