"""The archiver: finalizes ended calls and publishes them, durably.

Every finished call is a spool directory with ``recording.wav`` and
``sidecar.json`` until the store has confirmed both objects; only then is the
directory deleted.  At start (and every :data:`RESCAN_SECONDS`) the archiver
finalizes calls left by a crash (endReason "recovered") and queues every
finalized one.

Failures are told apart by what may cure them:

* Transient: a disk error (ENOSPC, EDQUOT, EIO, EMFILE, a read-only file
  system ..., any ``OSError``) or a store error that may pass (an outage,
  throttling, access denied: an operator fixes those).  Retried with
  exponential backoff and jitter, capped at ``retry_max``, without limit
  while the process runs, and across restarts (the queue *is* the spool).
  When the disk or the store works again (a finalize or a publish succeeds
  after such failures), the retries waiting for it are brought forward.
* Damage: an entry whose header, sidecar or recording cannot be read.  What
  can be recovered is (:mod:`evrecorder.salvage`); what cannot is moved to
  ``<spool>/quarantine/``, never deleted.
* A key the store refuses (``StoreError.permanent``): the recording is
  published under a fallback key, ``unkeyed/<date>/<sha256 of the ids>``,
  and its sidecar says so (``keyFallback``).
* Anything else (an unexpected exception: a bug) sets the entry aside: it
  stays in the spool, out of readiness, and is tried again at every rescan,
  at the next start, and when an operator touches ``<spool>/retry``.

Each entry logs one sentence per kind of failure, and then at most one every
:data:`LOG_EVERY_SECONDS` while it goes on; a traceback only for the
unexpected.  Touching ``<spool>/retry`` also cuts every backoff short: after
freeing disk space or mending the store, ``touch /var/lib/evrecorder/spool/retry``.

Finalizing and publishing block (disk, network), so they run in a dedicated
thread pool; the reactor thread only keeps the books.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import struct
from typing import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from evrecorder import salvage
from evrecorder.finalize import SCHEMA, finalize, rfc3339
from evrecorder.metrics import Metrics
from evrecorder.settings import Settings
from evrecorder.sidecar import channel_counts
from evrecorder.spool import SIDECAR_FILE, WAV_FILE, CallSpool, Spool
from evrecorder.stores import PublishItem, Store, StoreError

log = Logger()

#: How often the spool is scanned for entries nobody holds (a sibling died),
#: and entries set aside are tried again.
RESCAN_SECONDS = 60.0
#: Touching this file in the spool retries everything now.
RETRY_FILE = "retry"
RETRY_POLL_SECONDS = 2.0
#: A failure that goes on is logged again at most this often, per entry.
LOG_EVERY_SECONDS = 600.0
#: /readyz fails while the spool's file system has less free than this.
SPOOL_MIN_FREE_BYTES = 16 * 1024 * 1024
#: Disk errors about a whole file system (not one entry): they fail /readyz
#: until a finalize succeeds again.
FILESYSTEM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
#: Where a recording goes when the store refuses its key.
FALLBACK_PREFIX = "unkeyed"


class _DamagedSidecar(Exception):
    """A finalized entry whose sidecar cannot be used; the message says why."""


def _load_item(entry: CallSpool, now: Callable[[], float]) -> tuple[dict, PublishItem]:
    """The finalized call as a publish item; its sidecar gets the key used and archivedAt."""
    try:
        with open(os.path.join(entry.path, SIDECAR_FILE), "rb") as f:
            sidecar = json.loads(f.read())
        audio = sidecar["audio"]
        metadata = sidecar.get("metadata") or {}
        if not isinstance(metadata, dict):
            metadata = {}
        key, sha, size = sidecar["key"], audio["sha256"], audio["bytes"]
        if not (isinstance(key, str) and key and isinstance(sha, str) and len(sha) == 64
                and isinstance(size, int) and isinstance(sidecar["timing"], dict)):
            raise ValueError("its key, checksum or size is not what it should be")
        call_id, session_id = sidecar["callId"], sidecar["sessionId"]
    except (ValueError, KeyError, TypeError) as e:  # JSON, UTF-8, a missing field
        raise _DamagedSidecar(f"its sidecar.json cannot be read ({_sentence(e)})") from e

    def sidecar_for(key: str) -> bytes:
        sidecar["key"] = key
        sidecar["timing"]["archivedAt"] = rfc3339(now())
        return (json.dumps(sidecar, ensure_ascii=False, indent=2) + "\n").encode()

    return sidecar, PublishItem(
        key=key,
        wav_path=os.path.join(entry.path, WAV_FILE),
        wav_sha256=sha,
        wav_size=size,
        sidecar_for=sidecar_for,
        object_metadata={
            "callId": str(call_id),
            "sessionId": str(session_id),
            "agentId": str(metadata.get("agentId", "")),
            "schema": SCHEMA,
        },
    )


def fallback_key(sidecar: dict) -> str:
    """``unkeyed/<date>/<sha256 of the ids>``: a key every store takes, the same
    for every attempt (a publish stays idempotent)."""
    timing = sidecar.get("timing") or {}
    when = timing.get("firstMediaAt") or timing.get("connectedAt") or ""
    date = when[:10].replace("-", "/") if isinstance(when, str) and len(when) >= 10 else "undated"
    ids = json.dumps([sidecar.get("callId"), sidecar.get("sessionId"),
                      (sidecar.get("audio") or {}).get("sha256")], ensure_ascii=False)
    return f"{FALLBACK_PREFIX}/{date}/{hashlib.sha256(ids.encode('utf-8', 'surrogatepass')).hexdigest()}"


def _kind(failure) -> tuple[str, bool]:
    """What kind of failure this is (for the log), and whether it is permanent."""
    e = failure.value
    if isinstance(e, OSError):
        return errno.errorcode.get(e.errno, "disk error"), False
    if isinstance(e, StoreError):
        if e.spooled and not _caused_by_os_error(e):
            return "checksum", True  # repaired, see _failed
        return ("spool read" if e.spooled else "store"), False
    if isinstance(e, _DamagedSidecar):
        return "sidecar", True  # repaired, see _failed
    if isinstance(e, (ValueError, KeyError, TypeError, IndexError, struct.error)):
        return "unreadable", True
    return "unexpected", True


def _caused_by_os_error(e: BaseException) -> bool:
    """True when a disk error is behind ``e``, however deep (the fallback-key
    publish wraps the store's error, which wraps the ``OSError``)."""
    seen = set()
    cause = e.__cause__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__
    return False


class Archiver(service.Service):
    """Owns finalization and the upload queue.  A Twisted service."""

    def __init__(
        self,
        spool: Spool,
        store: Store,
        settings: Settings,
        reactor,
        run_blocking: Callable[..., defer.Deferred] | None = None,
        metrics: Metrics | None = None,
    ):
        self.metrics = metrics or Metrics()
        self.spool = spool
        self.store = store
        self.settings = settings
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._run_blocking = run_blocking
        self._queue: list[CallSpool] = []
        self._attempts: dict[str, int] = {}
        self._waiting_since: dict[str, float] = {}  # unconfirmed entry -> when it was queued
        self._finalizing = defer.DeferredSemaphore(1)
        self._retries: dict[str, tuple[object, Callable, CallSpool]] = {}
        self._uploading = 0
        self._in_flight: set[defer.Deferred] = set()
        self._idle_waiters: list[defer.Deferred] = []
        self._stopping = False
        self._rescan = None
        self._retry_poll = None
        self._retry_seen: int | None = None
        #: entry path -> (entry, why): entries that need an operator (or a fix).
        self.set_aside: dict[str, tuple[CallSpool, str]] = {}
        self._trouble: dict[str, list] = {}  # entry path -> [kind, logged at, not logged since]
        self._repaired: set[str] = set()  # entries repaired once (see _failed)
        self._store_failing: tuple[float, str] | None = None  # since, last reason
        self._disk_failing: str | None = None  # a file-system-wide error finalizing
        self.spool_min_free = SPOOL_MIN_FREE_BYTES
        self.metrics.gauges["evrecorder_spool_set_aside"] = lambda: len(self.set_aside)

    # -- threads ---------------------------------------------------------

    def _blocking(self, f, *args, **kw) -> defer.Deferred:
        if self._run_blocking is not None:
            return self._run_blocking(f, *args, **kw)
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kw)

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        """Count ``d`` as work in flight until its whole chain has run."""
        self._in_flight.add(d)

        def done(result):
            self._in_flight.discard(d)
            self._check_idle()
            return result

        return d.addBoth(done)

    # -- service ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        if self._run_blocking is None:
            self._pool = ThreadPool(
                minthreads=1, maxthreads=self.settings.upload_concurrency + 2,
                name="evrecorder-archive",
            )
            self._pool.start()
        self.spool.prepare()
        self._track(self._blocking(self.store.check).addCallbacks(
            lambda _: log.info("archive store {store} is ready", store=self.store.describe()),
            lambda f: log.error(
                "archive store {store} is not usable: {reason}. Calls are recorded to the "
                "spool and published once the store works.",
                store=self.store.describe(), reason=_sentence(f.value),
            ),
        ))
        self._retry_seen = self._retry_stamp()
        self.recover()
        self._rescan = self._reactor.callLater(RESCAN_SECONDS, self._rescan_spool)
        self._retry_poll = self._reactor.callLater(RETRY_POLL_SECONDS, self._poll_retry_file)

    def _rescan_spool(self) -> None:
        """Recover again now and then: a sibling sharing the spool may have died
        (or stopped) and left calls and uploads that nobody holds; and what was
        set aside gets another try."""
        self._rescan = None
        try:
            self.retry_set_aside()
            self.recover()
        except Exception:
            log.failure("scanning the spool failed")
        if self.running and not self._stopping:
            self._rescan = self._reactor.callLater(RESCAN_SECONDS, self._rescan_spool)

    def _retry_stamp(self) -> int | None:
        try:
            return os.stat(os.path.join(self.spool.root, RETRY_FILE)).st_mtime_ns
        except OSError:
            return None

    def _poll_retry_file(self) -> None:
        """An operator touched ``<spool>/retry``: try everything now.  (Its time
        is compared, so every process sharing the spool sees it.)

        ``retry`` may also be a directory of request files, one per entry (what
        ``evrecorder spool --retry NAME`` writes): a new file changes the
        directory's time the same way.  A request naming an entry in
        ``<spool>/quarantine/`` moves it back into the spool first (the
        operator mended it), so it is tried again; if it still cannot be
        recovered it is quarantined again.  Everything is retried, and the
        requests seen are removed.
        """
        self._retry_poll = None
        stamp = self._retry_stamp()
        if stamp is not None and stamp != self._retry_seen:
            self._retry_seen = stamp
            path = os.path.join(self.spool.root, RETRY_FILE)
            requests = []
            if os.path.isdir(path):
                try:
                    # Not the temporary file of a request being written.
                    requests = [n for n in os.listdir(path) if not n.startswith(".")]
                except OSError as e:
                    log.error("cannot read the retry requests in {path}: {reason}",
                              path=path, reason=_sentence(e))
            for name in requests:
                self._unquarantine(name)
            log.info(
                "{path} was touched: retrying {n} entries set aside and {m} waiting for "
                "their next attempt", path=path, n=len(self.set_aside), m=len(self._retries),
            )
            try:
                self.retry_now()
            except Exception:
                log.failure("retrying on request failed")
            for name in requests:
                try:
                    os.unlink(os.path.join(path, name))
                except OSError:
                    pass  # a sibling took it, or it is not a file
            if requests:
                self._retry_seen = self._retry_stamp()
        if self.running and not self._stopping:
            self._retry_poll = self._reactor.callLater(RETRY_POLL_SECONDS, self._poll_retry_file)

    def _unquarantine(self, name: str) -> None:
        """A retry request for ``quarantine/<name>``: move it back to ``calls/``
        (a rename, as cheap as a stat) for :meth:`recover` to take."""
        if name in (".", "..") or "/" in name:
            return
        source = os.path.join(self.spool.root, salvage.QUARANTINE_DIR, name)
        target = os.path.join(self.spool.calls_dir, name)
        if not os.path.isdir(source) or os.path.lexists(target):
            return  # not quarantined (an entry of calls/), or a sibling moved it
        try:
            os.rename(source, target)
        except OSError as e:
            log.error("cannot move {source} back into the spool to retry it: {reason}",
                      source=source, reason=_sentence(e))
            return
        log.info("{entry} is moved back from the quarantine into the spool, as asked, "
                 "to be tried again", entry=name)

    def retry_now(self) -> None:
        """Everything set aside or waiting for a retry is tried now; the spool is rescanned."""
        self.retry_set_aside()
        for path, (call, again, entry) in list(self._retries.items()):
            if call.active():
                call.cancel()
            del self._retries[path]
            self._attempts.pop(path, None)  # a fresh start of the backoff
            again(entry)
        self.recover()

    def retry_set_aside(self) -> None:
        """Try every entry that was set aside again (it stays held by this process)."""
        for path, (entry, _) in list(self.set_aside.items()):
            del self.set_aside[path]
            self._attempts.pop(path, None)
            if not os.path.isdir(entry.path):
                self._forget(entry)
                continue
            self.finalize(entry)  # queues it if it is finalized

    def recover(self) -> None:
        """Queue finalized spool entries; finalize the ones a crash left.

        An entry another process holds (a sibling recorder sharing the spool
        is recording, finalizing or publishing it) is left to it.
        """
        try:
            entries = self.spool.entries()
        except OSError as e:
            log.error("cannot read the spool {spool}: {reason}", spool=self.spool.root,
                      reason=_sentence(e))
            return
        # Ours: recording, finalizing, queued or publishing.
        held = {e.path for e in list(self.spool.held)}
        for entry in entries:
            if entry.path in held:
                continue
            try:
                if not entry.lock():
                    continue
            except OSError as e:
                # EMFILE: every entry held costs a descriptor. The rest waits
                # for the next scan.
                log.error(
                    "cannot take {entry} from the spool: {reason}; it is tried again in "
                    "{seconds} s", entry=os.path.basename(entry.path), reason=_sentence(e),
                    seconds=RESCAN_SECONDS,
                )
                return
            if entry.finalized:
                log.info("queued {entry} from the spool", entry=os.path.basename(entry.path))
            elif entry.has_header:
                log.warn(
                    "recovering {entry}: a call left unfinished by a crash or kill",
                    entry=os.path.basename(entry.path),
                )
            # Without a header: finalize() says what it found (audio to recover,
            # nothing at all, or damage).
            self.finalize(entry)  # queues a finalized entry as it is

    @defer.inlineCallbacks
    def stopService(self):
        for call in (self._rescan, self._retry_poll):
            if call is not None and call.active():
                call.cancel()
        self._rescan = self._retry_poll = None
        for call, _, _ in list(self._retries.values()):
            if call.active():
                call.cancel()
        self._retries.clear()
        # What is queued or being finalized gets one more attempt; what fails
        # stays in the spool for the next start.
        self._stopping = True
        yield self.wait_idle()
        if self._pool is not None:
            self._pool.stop()
            self._pool = None
        # What is left in the spool is free for a sibling or the next start.
        self.spool.release_all()
        yield super().stopService()

    def wait_idle(self) -> defer.Deferred:
        """Fires when nothing is being finalized or published right now."""
        d = defer.Deferred()
        self._idle_waiters.append(d)
        self._check_idle()
        return d

    def _check_idle(self) -> None:
        if self._in_flight or self._uploading or self._queue:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)

    # -- finalize --------------------------------------------------------

    def finalize(self, entry: CallSpool) -> defer.Deferred:
        self.set_aside.pop(entry.path, None)
        if entry.finalized:
            # A retry after the sidecar was written (its cleanup failed):
            # never rebuild a recording from what is left.
            self._enqueue(entry)
            return defer.succeed(None)
        self._waiting_since.setdefault(entry.path, self._reactor.seconds())
        # One at a time: when many calls end together, parallel finalizations
        # only fight the reactor thread for the GIL and the disk.
        d = self._finalizing.run(self._blocking, self._finalize_entry, entry)
        d.addCallbacks(self._finalized, self._failed, callbackArgs=(entry,),
                       errbackArgs=(entry, "finalize"))
        return self._track(d)

    def _finalize_entry(self, entry: CallSpool, detail: str | None = None) -> tuple[str, object]:
        """In the pool: finalize, recover or set aside what the entry holds.

        Returns what was done: ``("finalized", sidecar)``, ``("rebuilt",
        sidecar)`` (a sidecar made from the WAV alone), ``("removed", None)``
        (it held nothing), ``("quarantined", (why, where))`` or ``("gone", None)``.
        """
        if not os.path.isdir(entry.path):
            return "gone", None
        try:
            audio = salvage.audio_files(entry)
            if not audio and os.path.exists(os.path.join(entry.path, WAV_FILE)):
                # The frames went into the WAV, and the sidecar is lost: never
                # finalize again from nothing (it would write an empty WAV).
                return "rebuilt", salvage.rebuild_sidecar(
                    entry, self.settings, detail or "the sidecar was lost; rebuilt from the WAV"
                )
            if not audio and os.path.exists(
                os.path.join(entry.path, SIDECAR_FILE + salvage.DAMAGED_SUFFIX)
            ):
                # Finalized once (its frames went into a WAV that is gone too):
                # finalizing again would archive an empty call as a whole one.
                raise salvage.Damaged(
                    "its sidecar.json cannot be read, and neither its recording.wav nor "
                    "its frames are left"
                )
            header = salvage.read_header(entry)
            if header is None:
                if not audio:
                    if not entry.has_header and salvage.holds_nothing(entry):
                        entry.remove()  # created but crashed before the header: no audio
                        return "removed", None
                    raise salvage.Damaged("its call.json cannot be read and it holds no audio")
                header = salvage.restore_header(entry)
            try:
                sidecar = finalize(entry, self.settings)
            except BaseException:
                try:
                    salvage.discard_scratch(entry)
                except OSError:
                    pass
                raise
            if header.get("damage"):
                left = salvage.audio_files(entry)
                if left:
                    # A header rebuilt by us, and audio this finalize did not
                    # take (a format it does not know): publishing would delete it.
                    salvage.set_damaged_sidecar_aside(entry)
                    raise RuntimeError(
                        f"finalizing it from a rebuilt header left {', '.join(left)} unread"
                    )
                sidecar = salvage.mark_recovered(entry, sidecar, header["damage"])
            return "finalized", sidecar
        except salvage.Damaged as e:
            where = salvage.quarantine(self.spool.root, entry, str(e))
            entry.unlock()
            return "quarantined", (str(e), where)

    def _finalized(self, result: tuple[str, object], entry: CallSpool) -> None:
        done, value = result
        name = os.path.basename(entry.path)
        if self._disk_failing is not None:
            self._disk_failing = None  # the spool takes writes again:
            self._wake(self.finalize)  # the calls that waited for it need not wait more
        self._attempts.pop(entry.path, None)  # uploads count their own attempts
        self._trouble.pop(entry.path, None)
        if done in ("finalized", "rebuilt"):
            sidecar = value
            damage = sidecar.get("damage")
            if done == "finalized":
                try:
                    self.metrics.call_finalized(sidecar)
                except (KeyError, TypeError):
                    pass  # a sidecar without per-perspective counts
                log.info(
                    "finalized {call_id}/{session_id}: {seconds:.1f} s, endReason {reason}",
                    call_id=sidecar["callId"], session_id=sidecar["sessionId"],
                    seconds=sidecar["audio"]["durationSeconds"], reason=sidecar["endReason"],
                )
            if damage:
                self.metrics.salvaged.labels("sidecar" if done == "rebuilt" else "header").inc()
                log.error(
                    "{entry} was damaged: {detail}. Its recording is archived incomplete "
                    "(endReason {reason}), and its sidecar says so (\"damage\").",
                    entry=name, detail=damage.get("detail"), reason=sidecar["endReason"],
                )
            self._enqueue(entry)
        elif done == "removed":
            self._forget(entry)
            log.info("removed {entry} from the spool: a call that crashed before it "
                     "held anything", entry=name)
        elif done == "quarantined":
            self._forget(entry)
            why, where = value
            self.metrics.quarantined.inc()
            log.error(
                "{entry} cannot be recovered ({why}); it is moved, whole, to {where} for "
                "an operator", entry=name, why=why, where=where,
            )
        else:  # gone: removed meanwhile (by an operator)
            self._forget(entry)
            entry.unlock()

    def _forget(self, entry: CallSpool) -> None:
        for books in (self._attempts, self._waiting_since, self._trouble, self.set_aside):
            books.pop(entry.path, None)
        self._repaired.discard(entry.path)

    # -- failures --------------------------------------------------------

    def _failed(self, f, entry: CallSpool, stage: str) -> None:
        """A finalize or a publish failed: retry, repair or set aside."""
        if stage == "publish":
            self.metrics.archive_failures.inc()
        name = os.path.basename(entry.path)
        if not os.path.isdir(entry.path):
            self._forget(entry)  # removed meanwhile (by an operator): nothing to do
            entry.unlock()
            return
        kind, permanent = _kind(f)
        if kind in ("sidecar", "checksum") and entry.path not in self._repaired:
            # Once: a repair that did not cure it (a faulty archive disk failing
            # every copy's checksum) is set aside below, not repaired in a loop.
            self._repaired.add(entry.path)
            self._repair(entry, _sentence(f.value))
            return
        if isinstance(f.value, StoreError) and not f.value.spooled:
            since = self._store_failing[0] if self._store_failing else self._reactor.seconds()
            self._store_failing = (since, _sentence(f.value))
        if stage == "finalize" and isinstance(f.value, OSError) and \
                f.value.errno in FILESYSTEM_ERRNOS:
            self._disk_failing = _sentence(f.value)
        if permanent:
            self.set_aside[entry.path] = (entry, f"{kind}: {_sentence(f.value)}")
            # Out of the queue age: one entry that needs an operator must
            # not fail /readyz for good.
            self._waiting_since.pop(entry.path, None)
            self.metrics.finalize_failures.inc()
            skipped = self._should_log(entry, kind)
            if skipped is not None:
                emit = log.failure if kind == "unexpected" else log.error
                kw = {"failure": f} if kind == "unexpected" else {}
                emit(
                    "{stage} {entry} failed: {reason}. It is set aside in the spool, "
                    "untouched, and tried again every {rescan:.0f} s, at the next start and "
                    "when {retry_file} is touched",
                    stage="finalizing" if stage == "finalize" else "archiving", entry=name,
                    reason=_sentence(f.value), rescan=RESCAN_SECONDS,
                    retry_file=os.path.join(self.spool.root, RETRY_FILE), **kw,
                )
            return
        delay = self._backoff(entry)
        skipped = self._should_log(entry, kind)
        if skipped is not None:
            if stage == "finalize":
                emit = log.error  # our disk
            else:
                emit = log.warn if isinstance(f.value, StoreError) else log.error
            emit(
                "{stage} {entry} failed (attempt {attempt}), retrying in {delay:.1f} s: "
                "{reason}{repeats}",
                stage="finalizing" if stage == "finalize" else "archiving", entry=name,
                attempt=self._attempts[entry.path], delay=delay, reason=_sentence(f.value),
                repeats=f" ({skipped} more failures like it since the last line)"
                if skipped else "",
            )
        self._later(delay, self.finalize if stage == "finalize" else self._enqueue, entry)

    def _should_log(self, entry: CallSpool, kind: str) -> int | None:
        """None to stay quiet; else how many failures of this kind went unlogged."""
        now = self._reactor.seconds()
        seen = self._trouble.get(entry.path)
        if seen is not None and seen[0] == kind and now - seen[1] < LOG_EVERY_SECONDS:
            seen[2] += 1
            return None
        skipped = seen[2] if seen is not None and seen[0] == kind else 0
        self._trouble[entry.path] = [kind, now, 0]
        return skipped

    def _repair(self, entry: CallSpool, why: str) -> None:
        """A finalized entry whose sidecar or recording is damaged: finalize it
        again from its frames, or rebuild the sidecar from the WAV, or quarantine."""

        def repair():
            salvage.set_damaged_sidecar_aside(entry)
            return self._finalize_entry(entry, detail=f"{why}; the sidecar was rebuilt from the WAV")

        log.error("{entry}: {why}; repairing it", entry=os.path.basename(entry.path), why=why)
        d = self._finalizing.run(self._blocking, repair)
        self._track(d.addCallbacks(self._finalized, self._failed, callbackArgs=(entry,),
                                   errbackArgs=(entry, "finalize")))

    # -- upload queue ----------------------------------------------------

    def _enqueue(self, entry: CallSpool) -> None:
        if not self.running:
            return  # stays in the spool; recovered at the next start
        self._waiting_since.setdefault(entry.path, self._reactor.seconds())
        self._queue.append(entry)
        self._pump()

    def _pump(self) -> None:
        while self._queue and self._uploading < self.settings.upload_concurrency:
            entry = self._queue.pop(0)
            self._uploading += 1
            self._upload(entry).addBoth(self._upload_done)

    def _upload_done(self, _):
        self._uploading -= 1
        self._pump()
        self._check_idle()

    def _publish_item(self, sidecar: dict, item: PublishItem) -> tuple[str, str | None]:
        """In the pool: publish; under the fallback key when the store refuses the key.
        Returns the key used and why the fallback was needed (or None)."""
        try:
            return self.store.publish(item), None
        except StoreError as e:
            if not e.permanent:
                raise
            refused = e
        wanted, item.key = item.key, fallback_key(sidecar)
        sidecar["keyFallback"] = {"key": wanted, "reason": _sentence(refused)}
        try:
            return self.store.publish(item), _sentence(refused)
        except StoreError as e:
            # The fallback key too: the key was not the problem after all.
            raise StoreError(
                f"{_sentence(e)} (under the fallback key {item.key}, after the store "
                f"refused {wanted}: {_sentence(refused)})", spooled=e.spooled,
            ) from e

    def _upload(self, entry: CallSpool) -> defer.Deferred:
        started = self._reactor.seconds()

        def publish():
            if not os.path.isdir(entry.path):
                return None
            sidecar, item = _load_item(entry, self._reactor.seconds)
            key, fallback = self._publish_item(sidecar, item)
            entry.remove()
            return sidecar, key, fallback

        def published(result):
            if result is None:
                self._forget(entry)
                entry.unlock()
                return
            if self._store_failing is not None:
                self._store_failing = None
                self._wake(self._enqueue)  # the store is back: the rest follows now
            sidecar, key, fallback = result
            self._forget(entry)
            if fallback is not None:
                self.metrics.key_fallbacks.inc()
                log.error(
                    "the archive store refused the key {wanted} of {call_id}/{session_id}: "
                    "{reason}. It is archived as {key} instead (the sidecar's keyFallback "
                    "says so).", wanted=sidecar["keyFallback"]["key"], reason=fallback,
                    call_id=sidecar["callId"], session_id=sidecar["sessionId"], key=key,
                )
            self.metrics.archived.labels(sidecar["endReason"]).inc()
            self.metrics.upload_seconds.observe(self._reactor.seconds() - started)
            counts = channel_counts(sidecar)  # a WebSocket or a gRPC recording's
            agent, caller = counts["agent"], counts["caller"]
            log.info(
                "archived {call_id}/{session_id} as {key} to {store}: {seconds:.1f} s, "
                "endReason {reason}, agent {agent_frames} frames ({agent_missing} missing), "
                "caller {caller_frames} frames ({caller_missing} missing), {nbytes} bytes",
                call_id=sidecar["callId"], session_id=sidecar["sessionId"],
                store=self.store.describe(), key=key, seconds=sidecar["audio"]["durationSeconds"],
                nbytes=sidecar["audio"]["bytes"], reason=sidecar["endReason"],
                # A sidecar rebuilt from the WAV has lost the counts.
                agent_frames=agent.get("frames"), agent_missing=agent.get("missing"),
                caller_frames=caller.get("frames"), caller_missing=caller.get("missing"),
            )

        return self._blocking(publish).addCallbacks(
            published, self._failed, errbackArgs=(entry, "publish")
        )

    def _backoff(self, entry: CallSpool) -> float:
        """Count a failed attempt; the delay before the next one."""
        attempt = self._attempts.get(entry.path, 0) + 1
        self._attempts[entry.path] = attempt
        s = self.settings
        delay = min(s.retry_max, s.retry_initial * 2 ** min(attempt - 1, 60))
        return delay * random.uniform(0.5, 1.0)  # jitter: no thundering herd after an outage

    def _later(self, delay: float, f, entry: CallSpool) -> None:
        """Try ``f(entry)`` again later; not while stopping (the spool keeps it)."""
        if not self.running or self._stopping:
            return

        def again():
            self._retries.pop(entry.path, None)
            f(entry)

        self._retries[entry.path] = (self._reactor.callLater(delay, again), f, entry)

    def _wake(self, f) -> None:
        """Bring the retries of ``f`` forward to within ``retry_initial`` (jittered):
        what they waited for works again."""
        for path, (call, again, entry) in list(self._retries.items()):
            if again == f and call.active() and \
                    call.getTime() - self._reactor.seconds() > self.settings.retry_initial:
                call.reset(random.uniform(0, self.settings.retry_initial))

    @property
    def queue_depth(self) -> int:
        """Finished calls not yet confirmed by the store (not counting those set aside)."""
        return len(self._waiting_since)

    def oldest_age(self) -> float:
        if not self._waiting_since:
            return 0.0
        return self._reactor.seconds() - min(self._waiting_since.values())

    # -- readiness -------------------------------------------------------

    def not_ready(self) -> str | None:
        """Why this recorder cannot take and archive calls now, or None.

        The store has failed every publish for longer than
        ``ready_max_queue_age``; or the spool is read-only, not writable, has
        less than :attr:`spool_min_free` bytes free, or finalizing failed
        with a full disk or quota since the last success.  One entry that
        needs an operator does not count (see :attr:`set_aside`).
        """
        if self._store_failing is not None and self._waiting_since:
            since, reason = self._store_failing
            age = self._reactor.seconds() - since
            if age > self.settings.ready_max_queue_age:
                return f"the archive store has failed for {age:.0f} s: {reason}"
        try:
            fs = os.statvfs(self.spool.root)
        except OSError as e:
            return f"the spool {self.spool.root} cannot be read: {_sentence(e)}"
        if fs.f_flag & os.ST_RDONLY:
            return f"the spool {self.spool.root} is on a read-only file system"
        free = fs.f_bavail * fs.f_frsize
        if free < self.spool_min_free:
            return f"the spool {self.spool.root} is full ({free // 1024} KiB free)"
        if not os.access(self.spool.calls_dir, os.W_OK | os.X_OK):
            return f"the spool {self.spool.calls_dir} is not writable"
        if self._disk_failing is not None and self._waiting_since:
            return f"finalizing calls fails: {self._disk_failing}"
        return None


def _sentence(exc: BaseException) -> str:
    return str(exc) or exc.__class__.__name__
