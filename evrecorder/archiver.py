"""The archiver: finalizes ended calls and publishes them, durably.

Every finished call is a spool directory with ``recording.wav`` and
``sidecar.json`` until the store has confirmed both objects; only then is the
directory deleted.  Failed publishes are retried with exponential backoff and
jitter, without limit, and across restarts (the queue *is* the spool).  At
start the archiver finalizes calls left by a crash (endReason "recovered") and
queues every finalized one.

Finalizing and publishing block (disk, network), so they run in a dedicated
thread pool; the reactor thread only keeps the books.
"""

from __future__ import annotations

import json
import os
import random
from typing import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from evrecorder.finalize import SCHEMA, finalize, rfc3339
from evrecorder.metrics import Metrics
from evrecorder.settings import Settings
from evrecorder.sidecar import channel_counts
from evrecorder.spool import SIDECAR_FILE, WAV_FILE, CallSpool, Spool
from evrecorder.stores import PublishItem, Store, StoreError

log = Logger()

#: Finalize attempts before an entry is set aside until the next start.
MAX_FINALIZE_ATTEMPTS = 5
#: How often the spool is scanned for entries nobody holds (a sibling died).
RESCAN_SECONDS = 60.0


def _load_item(entry: CallSpool, now: Callable[[], float]) -> tuple[dict, PublishItem]:
    """The finalized call as a publish item; its sidecar gets the key used and archivedAt."""
    with open(os.path.join(entry.path, SIDECAR_FILE), encoding="utf-8") as f:
        sidecar = json.load(f)
    audio = sidecar["audio"]
    metadata = sidecar.get("metadata") or {}

    def sidecar_for(key: str) -> bytes:
        sidecar["key"] = key
        sidecar["timing"]["archivedAt"] = rfc3339(now())
        return (json.dumps(sidecar, ensure_ascii=False, indent=2) + "\n").encode()

    return sidecar, PublishItem(
        key=sidecar["key"],
        wav_path=os.path.join(entry.path, WAV_FILE),
        wav_sha256=audio["sha256"],
        wav_size=audio["bytes"],
        sidecar_for=sidecar_for,
        object_metadata={
            "callId": str(sidecar["callId"]),
            "sessionId": str(sidecar["sessionId"]),
            "agentId": str(metadata.get("agentId", "")),
            "schema": SCHEMA,
        },
    )


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
        self._retries: dict[str, object] = {}
        self._uploading = 0
        self._in_flight: set[defer.Deferred] = set()
        self._idle_waiters: list[defer.Deferred] = []
        self._stopping = False
        self._rescan = None

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
        self.recover()
        self._rescan = self._reactor.callLater(RESCAN_SECONDS, self._rescan_spool)

    def _rescan_spool(self) -> None:
        """Recover again now and then: a sibling sharing the spool may have died
        (or stopped) and left calls and uploads that nobody holds."""
        self._rescan = None
        try:
            self.recover()
        except Exception:
            log.failure("scanning the spool failed")
        if self.running and not self._stopping:
            self._rescan = self._reactor.callLater(RESCAN_SECONDS, self._rescan_spool)

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
            else:
                entry.remove()  # created but crashed before the header: holds no audio
                continue
            self.finalize(entry)  # queues a finalized entry as it is

    @defer.inlineCallbacks
    def stopService(self):
        if self._rescan is not None and self._rescan.active():
            self._rescan.cancel()
        self._rescan = None
        for call in list(self._retries.values()):
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
        if entry.finalized:
            # A retry after the sidecar was written (its cleanup failed):
            # never rebuild a recording from what is left.
            self._enqueue(entry)
            return defer.succeed(None)
        self._waiting_since.setdefault(entry.path, self._reactor.seconds())
        # One at a time: when many calls end together, parallel finalizations
        # only fight the reactor thread for the GIL and the disk.
        d = self._finalizing.run(self._blocking, finalize, entry, self.settings)

        def finalized(sidecar):
            self._attempts.pop(entry.path, None)  # uploads count their own attempts
            self.metrics.call_finalized(sidecar)
            log.info(
                "finalized {call_id}/{session_id}: {seconds:.1f} s, endReason {reason}",
                call_id=sidecar["callId"], session_id=sidecar["sessionId"],
                seconds=sidecar["audio"]["durationSeconds"], reason=sidecar["endReason"],
            )
            self._enqueue(entry)

        def failed(f):
            delay = self._backoff(entry)
            attempt = self._attempts[entry.path]
            if attempt >= MAX_FINALIZE_ATTEMPTS:
                # Left for the operator and the next start; kept out of the
                # queue age so one bad entry cannot fail /readyz for good.
                self._waiting_since.pop(entry.path, None)
                self.metrics.finalize_failures.inc()
                log.failure(
                    "finalizing {entry} failed {attempt} times; it stays in the spool, set "
                    "aside until the next start",
                    f, entry=entry.path, attempt=attempt,
                )
                return
            log.failure(
                "finalizing {entry} failed (attempt {attempt}); it stays in the spool and is "
                "tried again in {delay:.1f} s",
                f, entry=entry.path, attempt=attempt, delay=delay,
            )
            self._later(delay, self.finalize, entry)

        return self._track(d.addCallbacks(finalized, failed))

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

    def _upload(self, entry: CallSpool) -> defer.Deferred:
        started = self._reactor.seconds()

        def publish():
            sidecar, item = _load_item(entry, self._reactor.seconds)
            key = self.store.publish(item)
            entry.remove()
            return sidecar, key

        def published(result):
            sidecar, key = result
            self._attempts.pop(entry.path, None)
            self._waiting_since.pop(entry.path, None)
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
                agent_frames=agent["frames"], agent_missing=agent["missing"],
                caller_frames=caller["frames"], caller_missing=caller["missing"],
            )

        def failed(f):
            self.metrics.archive_failures.inc()
            delay = self._backoff(entry)
            emit = log.warn if f.check(StoreError) else log.failure
            kw = {} if f.check(StoreError) else {"failure": f}
            emit(
                "archiving {entry} failed (attempt {attempt}), retrying in {delay:.1f} s: "
                "{reason}",
                entry=os.path.basename(entry.path), attempt=self._attempts[entry.path],
                delay=delay, reason=_sentence(f.value), **kw,
            )
            self._later(delay, self._enqueue, entry)

        return self._blocking(publish).addCallbacks(published, failed)

    def _backoff(self, entry: CallSpool) -> float:
        """Count a failed attempt; the delay before the next one."""
        attempt = self._attempts.get(entry.path, 0) + 1
        self._attempts[entry.path] = attempt
        s = self.settings
        delay = min(s.retry_max, s.retry_initial * 2 ** (attempt - 1))
        return delay * random.uniform(0.5, 1.0)  # jitter: no thundering herd after an outage

    def _later(self, delay: float, f, entry: CallSpool) -> None:
        """Try ``f(entry)`` again later; not while stopping (the spool keeps it)."""
        if not self.running or self._stopping:
            return

        def again():
            self._retries.pop(entry.path, None)
            f(entry)

        self._retries[entry.path] = self._reactor.callLater(delay, again)

    @property
    def queue_depth(self) -> int:
        """Finished calls not yet confirmed by the store."""
        return len(self._waiting_since)

    def oldest_age(self) -> float:
        if not self._waiting_since:
            return 0.0
        return self._reactor.seconds() - min(self._waiting_since.values())


def _sentence(exc: BaseException) -> str:
    return str(exc) or exc.__class__.__name__
