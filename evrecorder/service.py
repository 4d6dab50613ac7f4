"""The recorder service: listeners, calls and archiver, started and drained together.

Start: the archiver recovers the spool first, then the listeners open.
Stop (SIGTERM, or ``stopService`` in tests): new handshakes get 503 while the
listeners stay open, calls in progress get up to ``drain_timeout`` to finish,
the rest end as "shutdown"; the listeners close, every call is finalized, and
uploads under way finish (whatever is not published stays in the spool for
the next start).
"""

from __future__ import annotations

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, task
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from evrecorder.archiver import Archiver
from evrecorder.call import CallRegistry
from evrecorder.protocol import RecorderFactory
from evrecorder.settings import Settings
from evrecorder.spool import Spool
from evrecorder.stores import Store

log = Logger()


class RecorderService(service.MultiService):
    """Owns the calls; its children are the archiver and the listeners."""

    def __init__(self, settings: Settings, store: Store, reactor, listen: list[str] = ()):
        super().__init__()
        self.settings = settings
        self._reactor = reactor
        self.spool = Spool(settings.spool)
        self.archiver = Archiver(self.spool, store, settings, reactor)
        self.archiver.setServiceParent(self)
        self.registry = CallRegistry(self.spool, settings, reactor, self._call_ended)
        self.archiver.live_paths = lambda: {c.spool.path for c in self.registry.calls.values()}
        self.factory = RecorderFactory(self.registry, settings, reactor)
        self.listeners: list[StreamServerEndpointService] = []
        for spec in listen:
            self.add_listener(spec)

    def add_listener(self, spec: str) -> StreamServerEndpointService:
        svc = StreamServerEndpointService(serverFromString(self._reactor, spec), self.factory)
        svc._raiseSynchronously = True  # a port in use fails the start, loudly
        svc.setServiceParent(self)
        self.listeners.append(svc)
        return svc

    def _call_ended(self, call) -> None:
        self.archiver.finalize(call.spool)

    def startService(self) -> None:
        if not self.settings.secrets:
            log.warn(
                "no --secret is set: every stream is accepted. Set the streaming "
                "profile's secret with --secret-file or EVRECORDER_SECRET."
            )
        super().startService()
        log.info(
            "evrecorder recording to {archive} (spool {spool})",
            archive=self.archiver.store.describe(), spool=self.spool.root,
        )

    @defer.inlineCallbacks
    def stopService(self):
        self.factory.draining = True
        if self.registry.calls:
            log.info(
                "draining: {n} calls in progress get up to {timeout} s to finish",
                n=len(self.registry.calls), timeout=self.settings.drain_timeout,
            )
            deadline = self._reactor.seconds() + self.settings.drain_timeout
            while self.registry.calls and self._reactor.seconds() < deadline:
                yield task.deferLater(self._reactor, 0.1, lambda: None)
            self.registry.end_all("shutdown")
        self.factory.close_all()
        # Children stop in reverse order: listeners, then the archiver, which
        # waits for the finalizations the ended calls started.
        yield defer.maybeDeferred(super().stopService)
