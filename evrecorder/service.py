"""The recorder service: listeners, calls and archiver, started and drained together.

Start: the archiver recovers the spool first, then the listeners open.
Stop (SIGTERM, or ``stopService`` in tests): new handshakes get 503 while the
listeners stay open, calls in progress get up to ``drain_timeout`` to finish,
the rest end as "shutdown"; the listeners close, every call is finalized, and
uploads under way finish (whatever is not published stays in the spool for
the next start).
"""

from __future__ import annotations

import os
import resource
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet import defer, task
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.logger import Logger, LogLevel
from twisted.python import log as legacy_log

from evrecorder import __version__, relay, tlsconfig
from evrecorder.archiver import Archiver
from evrecorder.call import CallRegistry
from evrecorder.dialog import DIALOG_KEY
from evrecorder.grpcdoor import GrpcDoor, parse_endpoint
from evrecorder.metrics import Metrics, MetricsSite, site_root
from evrecorder.owners import CallOwners
from evrecorder.protocol import RecorderFactory
from evrecorder.reuseport import ReusePortReactor
from evrecorder.settings import Settings
from evrecorder.spool import Spool
from evrecorder.stores import Store

log = Logger()


def _raise_file_limit() -> None:
    """Every socket, and every recording waiting in the spool, holds a file
    descriptor: take the hard limit, not the usual soft 1024."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as e:
        log.warn("cannot raise the open-file limit: {reason}", reason=e)


class ListenError(Exception):
    """A listener could not start; the message is a sentence for the operator."""


def quiet_listen_errors() -> None:
    """Under twistd (``makeService``): a :class:`ListenError` ends the process
    with status 1 and its one logged sentence, without a traceback.

    twistd lets the error out of ``privilegedStartService`` uncaught.  Daemonized,
    twistd's parent still prints the sentence ("An error has occurred: ...").
    """
    previous = sys.excepthook

    def hook(kind, value, tb):
        if not issubclass(kind, ListenError):
            previous(kind, value, tb)

    sys.excepthook = hook


class _Listener(StreamServerEndpointService):
    """A listening endpoint whose failure to start says which one, and why."""

    # A port in use (or a missing systemd socket) fails the start at once.
    _raiseSynchronously = True

    def __init__(self, spec: str, endpoint, factory):
        super().__init__(endpoint, factory)
        self.spec = spec

    def privilegedStartService(self):
        try:
            return super().privilegedStartService()
        except Exception as e:
            log.critical("cannot listen on {spec}: {reason}", spec=self.spec, reason=e)
            raise ListenError(f"cannot listen on {self.spec}: {e}") from None


def _quietly(f, *args):
    """Call ``f`` with Twisted's legacy log lines it emits dropped.

    A port logs "<Factory> starting on <address>" through the legacy log; an
    empty format makes twistd's observers (and ours) write nothing for it.
    """
    return legacy_log.callWithContext({"log_format": "", "log_level": LogLevel.debug}, f, *args)


class _Relay(service.Service):
    """Claims on calls, and the listener siblings relay their sockets to.

    Started after the archiver's recovery and before the WebSocket listeners:
    every call this process records is claimed with this listener's address.
    """

    def __init__(self, recorder: "RecorderService"):
        self.recorder = recorder
        self.factory = relay.RelayServerFactory(recorder.registry)
        self.port = None
        self.path: str | None = None

    def startService(self):
        super().startService()
        rec = self.recorder
        relay_dir = os.path.join(rec.spool.root, "relay")
        os.makedirs(relay_dir, exist_ok=True)
        relay.clear_stale(relay_dir)
        self.path = relay.relay_path(rec.spool.root)
        if self.path is None:
            log.warn(
                "the spool path {spool} is too long for a UNIX socket: a call that reaches "
                "two recorder processes sharing this spool is recorded as two recordings",
                spool=rec.spool.root,
            )
        owners = CallOwners(rec.spool.root, self.path)
        owners.prepare()
        if self.path is not None:
            # A deep backlog: a burst of reconnects must not find it full.
            endpoint = UNIXServerEndpoint(rec._reactor, self.path, backlog=1024, mode=0o600)
            listening = (endpoint.listen(self.factory) if rec.settings.reuse_port
                         else _quietly(endpoint.listen, self.factory))
            listening.addCallbacks(self._listening, self._not_listening, errbackArgs=(owners,))
        rec.registry.owners = owners
        rec.registry.relay = rec._relay_to

    def _listening(self, port):
        self.port = port
        if not self.recorder.settings.reuse_port:
            # Alone on its spool as far as the operator said (no --reuse-port):
            # the relay socket is plumbing, and its lines would only puzzle.
            port._logConnectionLostMsg = lambda: None

    def _not_listening(self, failure, owners):
        owners.address = ""  # claims then say "no relay": siblings record on their own
        log.error(
            "cannot listen on the relay socket {path}: {reason}. A call that reaches two "
            "recorder processes is recorded as two recordings.",
            path=self.path, reason=failure.getErrorMessage(),
        )

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()


class RecorderService(service.MultiService):
    """Owns the calls; its children are the archiver and the listeners."""

    def __init__(
        self, settings: Settings, store: Store, reactor, listen: list[str] = (),
        metrics_listen: list[str] = (), grpc_listen: list[str] = (),
        reload_on_sighup: bool = False,
    ):
        super().__init__()
        self.settings = settings
        self._reactor = reactor
        self.tls: list[tlsconfig.ServerTLS] = []  # every TLS listener's certificate
        watch = TimerService(tlsconfig.WATCH_SECONDS, self._watch_tls)  # renewal without SIGHUP
        watch.clock = reactor
        watch.setServiceParent(self)
        if reload_on_sighup:  # twistd only (tests call reload_tls); from now, not from the
            # start of the service: SIGHUP's default action would end the process.
            tlsconfig.reload_on_sighup(reactor, self.reload_tls)
        self.metrics = Metrics()
        self.spool = Spool(settings.spool)
        self.archiver = Archiver(self.spool, store, settings, reactor, metrics=self.metrics)
        self.archiver.setServiceParent(self)
        self.registry = CallRegistry(
            self.spool, settings, reactor, self._call_ended, metrics=self.metrics
        )
        self._relay = _Relay(self)
        self._relay.setServiceParent(self)
        self._listen_reactor = ReusePortReactor(reactor) if settings.reuse_port else reactor
        self.factory = RecorderFactory(self.registry, settings, reactor)
        self.grpc: GrpcDoor | None = None  # made by the first add_grpc_listener
        self.metrics.gauges.update({
            "evrecorder_active_calls": self._active_calls,
            "evrecorder_active_sockets": lambda: {
                "websocket": len(self.factory.sockets),
                "grpc": len(self.grpc.streams) if self.grpc is not None else 0,
            },
            "evrecorder_upload_queue_depth": lambda: self.archiver.queue_depth,
            "evrecorder_upload_oldest_age_seconds": self.archiver.oldest_age,
            "evrecorder_draining": lambda: int(self.factory.draining),
        })
        self.listeners: list[StreamServerEndpointService] = []
        self.call_listeners: list[StreamServerEndpointService] = []  # WebSocket ones
        for spec in listen:
            self.add_listener(spec)
        for spec in grpc_listen:
            self.add_grpc_listener(spec)
        for spec in metrics_listen:
            self.add_metrics_listener(spec)

    def _active_calls(self) -> dict:
        # A dialog's key is ("grpc", accountId, dialogId); a WebSocket call's is
        # (callId, sessionId), and a client may well name its call "grpc".
        grpc = sum(1 for key in list(self.registry.calls) if len(key) == 3 and key[0] == DIALOG_KEY)
        return {"websocket": len(self.registry.calls) - grpc, "grpc": grpc}

    def add_grpc_listener(self, spec: str) -> GrpcDoor:
        """A ``--grpc-listen`` endpoint; all of them share one gRPC server (one thread)."""
        if self.grpc is None:
            self.grpc = GrpcDoor(self.registry, self.settings, self._reactor, [])
            self.grpc.setServiceParent(self)
        endpoint = parse_endpoint(spec, clock=self._reactor)
        self.grpc.endpoints.append(endpoint)
        if endpoint.certificate is not None:  # a certificate that SIGHUP reloads
            self.tls.append(endpoint.certificate)
            log.info("{listener} serves {certificate}.", listener=endpoint.certificate.name,
                     certificate=endpoint.certificate.credentials.describe())
        return self.grpc

    def add_listener(self, spec: str, factory=None, reactor=None) -> StreamServerEndpointService:
        if tlsconfig.is_ssl(spec):  # a certificate that SIGHUP reloads
            endpoint, tls = tlsconfig.ssl_endpoint(
                reactor or self._listen_reactor, spec,
                self.settings.tls_ciphers or tlsconfig.CIPHERS, clock=self._reactor,
            )
            self.tls.append(tls)
            log.info("{listener} serves {certificate}.", listener=tls.name,
                     certificate=tls.credentials.describe())
        else:
            endpoint = serverFromString(reactor or self._listen_reactor, spec)
        svc = _Listener(spec, endpoint, factory or self.factory)
        svc.setServiceParent(self)
        self.listeners.append(svc)
        if factory is None:
            self.call_listeners.append(svc)
        return svc

    def add_metrics_listener(self, spec: str) -> StreamServerEndpointService:
        # Never shared: each process answers for itself.
        return self.add_listener(
            spec, MetricsSite(site_root(self.metrics, self.not_ready)), reactor=self._reactor
        )

    def reload_tls(self) -> bool:
        """Re-read every TLS listener's key and certificate (SIGHUP); True if all were served."""
        return tlsconfig.reload_all(self.tls)

    def _watch_tls(self) -> None:
        for tls in list(self.tls):
            try:
                tls.poll()
            except Exception:
                log.failure("looking at the TLS files of {listener} failed", listener=tls.name)

    def _relay_conns(self) -> list:
        """The relay connections siblings have open to this process (tests, debugging)."""
        return list(self._relay.factory.conns)

    def _relay_to(self, conn, address, dialog=False, **ids):
        kind = relay.RemoteDialog if dialog else relay.RemoteCall
        remote = kind(self.registry, conn, **ids)
        remote.connect(address, self._reactor)
        return remote

    def not_ready(self) -> str | None:
        """Why this recorder should get no new calls now, or None."""
        if self.factory.draining:
            return "draining"
        # The store failing for a while, or a spool that cannot take calls;
        # not one entry set aside for an operator (a metric and the log say those).
        return self.archiver.not_ready()

    def _call_ended(self, call) -> None:
        self.archiver.finalize(call.spool)

    def startService(self) -> None:
        _raise_file_limit()
        if not self.settings.secrets:
            log.warn(
                "no --secret is set: every stream is accepted. Set the streaming "
                "profile's secret with --secret-file or EVRECORDER_SECRET."
            )
        super().startService()
        log.info(
            "evrecorder {version} recording to {archive} (spool {spool})",
            version=__version__, archive=self.archiver.store.describe(), spool=self.spool.root,
        )

    @defer.inlineCallbacks
    def stopService(self):
        self.factory.draining = True
        if self.grpc is not None:
            self.grpc.drain()  # new streams UNAVAILABLE, health NOT_SERVING
        if self.settings.reuse_port:
            # Siblings share the port: the kernel would keep giving this
            # process its share of new calls, only to be told 503. Stop
            # listening now; the calls here carry on.
            for svc in self.call_listeners:
                if svc.running:
                    yield defer.maybeDeferred(svc.stopService)
        registry = self.registry
        if registry.calls or registry.remote_calls:
            log.info(
                "draining: {n} calls in progress get up to {timeout} s to finish",
                n=len(registry.calls) + len(registry.remote_calls),
                timeout=self.settings.drain_timeout,
            )
            deadline = self._reactor.seconds() + self.settings.drain_timeout
            # Sockets relayed to a sibling wait for their call too: closing them
            # early would end that perspective for the owner.
            while (registry.calls or registry.remote_calls) and self._reactor.seconds() < deadline:
                yield task.deferLater(self._reactor, 0.1, lambda: None)
            registry.end_all("shutdown")
        self.factory.close_all()
        if self.grpc is not None:
            self.grpc.close_all()
        # Children stop in reverse order: listeners, then the archiver, which
        # waits for the finalizations the ended calls started.
        yield defer.maybeDeferred(super().stopService)
