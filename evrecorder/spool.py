"""The spool: calls on local disk while they run, and the durable upload queue.

Each call is a directory ``<spool>/calls/<name>/``:

``call.json``
    who the call is (callId, sessionId, Start metadata, handshake query),
    written atomically before any audio, so a directory without it holds none.
``call.frames``
    every accepted Media frame of both perspectives in *arrival* order: a
    record is ``>BQH`` (the perspective's index in
    :data:`~evrecorder.settings.PERSPECTIVES`, sequenceId, payload length)
    and the payload.  Frames are collected in memory only until the front
    door has handled what one read from its socket delivered, then written
    with one ``write`` (:meth:`CallSpool.flush`): a crash of the process
    loses nothing that was handled.  The reorder window is applied when the
    call is finalized, so a crash loses nothing that sat in the window either.
``<Perspective>.frames``
    the same in the format of versions before ``call.frames``, one file per
    perspective, records ``>QH`` (sequenceId, payload length) and the
    payload.  No longer written while a call runs, but still read: an entry
    an older version left (a crash, then an upgrade) finalizes as before.
    The finalizer also writes this format, as scratch files ``<Perspective>.split``
    cut from ``call.frames`` (:mod:`evrecorder.framefile`).
``call.chunks``
    instead of ``call.frames`` for a gRPC dialog (``call.json`` has
    ``"source": "grpc"``): every accepted audio chunk of every segment, in
    arrival order, in the records of :mod:`evrecorder.chunkfile`, collected
    and written as ``call.frames`` is.
``events.jsonl``
    one JSON object a line, appended: a perspective's first frame (with its
    offset), each Stop, the end of the call (for a dialog: its streams,
    segments, SegmentInfo and SegmentStop events, :mod:`evrecorder.dialog`).
``recording.wav`` + ``sidecar.json``
    the finished recording.  ``sidecar.json`` is renamed into place last, so
    its presence means "finalized: upload me".  The directory is deleted only
    after the store confirmed both objects.

A truncated last record or line (``kill -9`` mid-write) is ignored on reading.

Several recorder processes may share one spool (``--reuse-port``).  Whoever
works on an entry (records it, finalizes it, publishes it) holds an exclusive
``flock`` on its directory until the entry is gone; the kernel drops the lock
when the process dies, which is how a survivor (or the next start) tells a
call a crash left from one a sibling is still recording.  A new entry is built
under a hidden name, locked, given its ``call.json`` and only then renamed
into sight, so no one ever sees an unlocked entry without its header.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from typing import Iterator

from evrecorder.chunkfile import CHUNK_RECORD, CHUNKS_FILE
from evrecorder.settings import PERSPECTIVES

#: A record of a per-perspective frames file (``<Perspective>.frames``).
RECORD = struct.Struct(">QH")
#: A record of ``call.frames``: the perspective's index, then as :data:`RECORD`.
CALL_RECORD = struct.Struct(">BQH")
PERSPECTIVE_INDEX = {p: i for i, p in enumerate(PERSPECTIVES)}
_INDEX = PERSPECTIVE_INDEX
_pack_call_record = CALL_RECORD.pack
_pack_chunk_record = CHUNK_RECORD.pack

CALL_FILE = "call.json"
EVENTS_FILE = "events.jsonl"
WAV_FILE = "recording.wav"
SIDECAR_FILE = "sidecar.json"
FRAMES_SUFFIX = ".frames"
CALL_FRAMES_FILE = "call" + FRAMES_SUFFIX
DELETING_PREFIX = ".deleting-"
NEW_PREFIX = ".new-"
FLUSH_BYTES = 32 * 1024

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def write_json_atomic(path: str, obj: object, fsync: bool = True) -> None:
    """Write JSON through a temporary file and a rename (fsynced unless told not to)."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class CallSpool:
    """One call's spool directory, open for appending while the call runs."""

    def __init__(self, path: str, held: set | None = None):
        self.path = path
        self._held = held  # the spool's set of entries this process holds
        self._frames_fd: int | None = None
        self._frames_file = CALL_FRAMES_FILE  # CHUNKS_FILE for a gRPC dialog
        self._pending = bytearray()
        self._events_fd: int | None = None
        self._lock_fd: int | None = None

    # -- ownership ---------------------------------------------------------

    def lock(self) -> bool:
        """Take the entry for this process: False if another holds it (or it is gone)."""
        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return False
        # Other OSErrors (EMFILE: one descriptor per entry held) go to the
        # caller, which leaves the entry for a later scan.
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        if not os.path.isdir(self.path) or os.stat(self.path).st_ino != os.fstat(fd).st_ino:
            os.close(fd)  # removed or replaced while we locked it
            return False
        self._hold(fd)
        return True

    def _hold(self, fd: int) -> None:
        self._lock_fd = fd
        if self._held is not None:
            self._held.add(self)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._held is not None:
            self._held.discard(self)

    # -- writing (while the call runs) -----------------------------------

    def create(self, header: dict) -> None:
        """Make the entry, locked by this process, with its header in place.

        A header with ``"source": "grpc"`` makes a dialog's entry: its audio
        goes to ``call.chunks`` (:meth:`append_chunk`).
        """
        if header.get("source") == "grpc":
            self._frames_file = CHUNKS_FILE
        parent, name = os.path.split(self.path)
        hidden = os.path.join(parent, NEW_PREFIX + name)
        os.mkdir(hidden)
        try:
            fd = os.open(hidden, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._hold(fd)
            if os.stat(hidden).st_ino != os.fstat(fd).st_ino:
                # A starting sibling took it for a crash's leftover (between
                # our mkdir and flock) and removed it.
                raise FileNotFoundError(hidden)
            # Runs on the reactor thread: no fsync (the frames are not fsynced
            # either; the page cache carries them through a crash of the process).
            write_json_atomic(os.path.join(hidden, CALL_FILE), header, fsync=False)
            if os.path.exists(self.path):
                raise FileExistsError(self.path)
            os.rename(hidden, self.path)
        except BaseException:
            self.unlock()
            shutil.rmtree(hidden, ignore_errors=True)
            raise

    def append_frame(self, perspective: str, seq: int, payload: bytes) -> None:
        """Collect a frame; :meth:`flush` writes it (or this, past 32 KiB)."""
        buf = self._pending
        buf += _pack_call_record(_INDEX[perspective], seq, len(payload))
        buf += payload
        if len(buf) > FLUSH_BYTES:
            self.flush()

    def append_chunk(
        self, segment: int, seq: int, at: float, duration_ms: int, payload: bytes
    ) -> None:
        """Collect a dialog's chunk (as :func:`evrecorder.chunkfile.pack_chunk`
        packs it); only :meth:`flush` writes: the gRPC door flushes after
        each batch it read."""
        buf = self._pending
        buf += _pack_chunk_record(
            segment, seq, at, duration_ms if duration_ms < 0xFFFF else 0xFFFF, len(payload)
        )
        buf += payload

    @property
    def pending(self) -> int:
        """Bytes collected and not written yet."""
        return len(self._pending)

    @property
    def buffer(self) -> bytearray:
        """What :meth:`flush` writes, the same object for the entry's life: a
        hot path may append whole records to it (as :meth:`append_chunk` does)."""
        return self._pending

    def flush(self) -> None:
        """Hand every collected frame to the kernel, in one ``write``: from
        then on it survives a crash of this process."""
        buf = self._pending
        if not buf:
            return
        fd = self._frames_fd
        if fd is None:
            fd = self._frames_fd = os.open(
                os.path.join(self.path, self._frames_file),
                os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                0o640,
            )
        while buf:
            # What was written leaves the buffer at once: after an error,
            # the buffer holds exactly what the file still lacks.  (A short
            # write, rare on a local file, costs a second call.)
            del buf[: os.write(fd, buf)]

    def append_event(self, event: dict) -> None:
        if self._events_fd is None:
            self._events_fd = os.open(
                os.path.join(self.path, EVENTS_FILE),
                os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                0o640,
            )
        line = json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n"
        os.write(self._events_fd, line.encode("utf-8"))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            # Closed even when the last write failed (ENOSPC): never leaked.
            if self._frames_fd is not None:
                os.close(self._frames_fd)
                self._frames_fd = None
            if self._events_fd is not None:
                os.close(self._events_fd)
                self._events_fd = None

    # -- reading (finalize, recovery) ------------------------------------

    def read_header(self) -> dict:
        with open(os.path.join(self.path, CALL_FILE), encoding="utf-8") as f:
            return json.load(f)

    def read_events(self) -> list[dict]:
        try:
            with open(os.path.join(self.path, EVENTS_FILE), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        events = []
        for line in data.split(b"\n"):
            if not line:
                continue
            try:
                events.append(json.loads(line))
            except ValueError:
                break  # a line cut by a crash: nothing after it was written
        return events

    def read_frames(self, perspective: str, chunk: int = 1 << 16) -> Iterator[tuple[int, bytes]]:
        """A perspective's frames in arrival order; stops quietly at a truncated
        last record.  (The finalizer reads faster: :mod:`evrecorder.framefile`.)

        Frames an older version wrote to ``<Perspective>.frames`` come first,
        then the perspective's frames in ``call.frames``.
        """
        yield from _read_records(
            os.path.join(self.path, perspective + FRAMES_SUFFIX), RECORD, None, chunk
        )
        yield from _read_records(
            os.path.join(self.path, CALL_FRAMES_FILE), CALL_RECORD, _INDEX[perspective], chunk
        )

    @property
    def finalized(self) -> bool:
        return os.path.exists(os.path.join(self.path, SIDECAR_FILE))

    @property
    def has_header(self) -> bool:
        return os.path.exists(os.path.join(self.path, CALL_FILE))

    def remove(self) -> None:
        """Delete the entry: first renamed out of sight in one step, so a crash
        halfway through the deletion can never leave a half entry to recover."""
        self._pending.clear()  # published: nothing more to write (and no disk-full error)
        self.close()
        parent, name = os.path.split(self.path)
        doomed = os.path.join(parent, DELETING_PREFIX + name)
        try:
            os.rename(self.path, doomed)
        except FileNotFoundError:
            self.unlock()
            return
        shutil.rmtree(doomed, ignore_errors=True)
        self.unlock()


def _read_records(
    path: str, record: struct.Struct, index: int | None, chunk: int
) -> Iterator[tuple[int, bytes]]:
    """``(seq, payload)`` of a frames file, of perspective ``index`` if given."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    head = record.size
    with f:
        buf = b""
        while True:
            block = f.read(chunk)
            if not block:
                return
            buf += block
            pos = 0
            end = len(buf)
            while end - pos >= head:
                fields = record.unpack_from(buf, pos)
                stop = pos + head + fields[-1]
                if stop > end:
                    break
                if index is None or fields[0] == index:
                    yield fields[-2], buf[pos + head : stop]
                pos = stop
            buf = buf[pos:]


class Spool:
    """The spool directory: names and lists call directories."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.calls_dir = os.path.join(self.root, "calls")
        self.held: set[CallSpool] = set()

    def release_all(self) -> None:
        """Let go of every entry this process holds (the recorder is stopping)."""
        for entry in list(self.held):
            entry.close()
            entry.unlock()

    def prepare(self) -> None:
        os.makedirs(self.calls_dir, exist_ok=True)

    def new_call(self, call_id: str, session_id: str, started: float) -> CallSpool:
        """A fresh directory name for a call; unique even for a repeated call key.
        (:meth:`CallSpool.create` makes it.)"""
        base = "{}-{}".format(_UNSAFE.sub("_", call_id)[:64], _UNSAFE.sub("_", session_id)[:32])
        digest = hashlib.sha256(f"{call_id}\0{session_id}".encode()).hexdigest()[:8]
        stamp = int(started * 1000)
        n = 0
        while True:
            name = f"{stamp}-{base}-{digest}" + (f"-{n}" if n else "")
            path = os.path.join(self.calls_dir, name)
            if not os.path.exists(path) and not os.path.exists(
                os.path.join(self.calls_dir, NEW_PREFIX + name)
            ):
                return CallSpool(path, self.held)
            n += 1

    def entries(self) -> list[CallSpool]:
        """The call entries in sight (locked or not); leftovers of a crash cleared."""
        try:
            names = sorted(os.listdir(self.calls_dir))
        except FileNotFoundError:
            return []
        for name in names:
            if name.startswith((DELETING_PREFIX, NEW_PREFIX)):
                # A deletion or creation that a crash interrupted; one a live
                # process is in the middle of is locked and left alone.
                leftover = CallSpool(os.path.join(self.calls_dir, name))
                if leftover.lock():
                    shutil.rmtree(leftover.path, ignore_errors=True)
                    leftover.unlock()
        return [
            CallSpool(os.path.join(self.calls_dir, n), self.held)
            for n in names
            if not n.startswith(".") and os.path.isdir(os.path.join(self.calls_dir, n))
        ]
