"""The gRPC front door: RingCX streaming v1beta2 (``Streaming.Stream``).

The WebSocket door (:mod:`evrecorder.protocol`) stands beside this one; both
feed the same transport-neutral core (call assembly, spool, finalize).

Threads.  grpcio's asyncio server (``grpc.aio``) runs on a thread of its own
with its own event loop; the recorder stays on the Twisted reactor.  Work
crosses one way: each stream's events are read on the gRPC thread and handed
to the reactor in batches (one ``callFromThread`` wakes the reactor for every
batch queued meanwhile, from all streams); the reactor calls the core
(``registry.join_dialog``, ``dialog.segment_*``, ``dialog.flush`` once per
batch) and hands back only the batch's outcome: carry on, or end the RPC with
a status.  The core never waits for gRPC.

Flow control.  A stream reads ahead while its previous batch is handled, up
to :data:`BATCH_MAX` events; then it stops reading until the reactor is done
with that batch.  So a stream holds at most two batches in memory, and a
reactor that falls behind slows the clients down (HTTP/2 flow control)
instead of queueing without bound.

Statuses (README.rst, "RingCX gRPC streaming", lists them for operators):
``CallRejected`` kinds map as :data:`STATUS_OF_KIND`; the end of a recording
(``conn.end_call``) maps as :func:`status_for_end`.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import empty_pb2, json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from evrecorder import tlsconfig
from evrecorder.errors import CallRejected
from evrecorder.logs import RateLimit
from evrecorder.grpcapi import streaming_pb2 as pb
from evrecorder.secrets import SecretChecker, credential

log = Logger()

SERVICE_NAME = "ringcentral.ringcx.streaming.v1beta2.Streaming"

#: Largest event accepted (grpcio answers a larger one RESOURCE_EXHAUSTED):
#: the core's largest chunk payload (65535 bytes) and room for its fields.
MAX_EVENT_BYTES = 65535 + 1024
GRPC_MAX_MESSAGE_BYTES = 4 * MAX_EVENT_BYTES
#: Events one stream reads ahead while its previous batch is being handled.
BATCH_MAX = 64
#: How long a stream whose input ended waits for grpcio to cancel it (a
#: failed or broken call) before that end counts as the client's half-close.
HALF_CLOSE_SETTLE_SECONDS = 0.05
#: Keepalive: the server pings an idle connection this often and drops it when
#: the ping is not answered in time; clients may ping as often as they like
#: (more often than CLIENT_PING_MIN_SECONDS counts as a strike, and strikes are
#: never held against them).
KEEPALIVE_SECONDS = 20.0
KEEPALIVE_TIMEOUT_SECONDS = 20.0
CLIENT_PING_MIN_SECONDS = 10.0

STATUS_OF_KIND = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "unsupported": grpc.StatusCode.INVALID_ARGUMENT,
    "precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "capacity": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "internal": grpc.StatusCode.INTERNAL,
}

#: How a recording that ended otherwise than complete (code 1001) ends the
#: RPC, by the end reason in ``"call ended: <reason>"``.
STATUS_OF_END = {
    "shutdown": grpc.StatusCode.UNAVAILABLE,  # the platform may open a stream elsewhere
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,  # --idle-timeout: nothing came
    "max-duration": grpc.StatusCode.OUT_OF_RANGE,  # --max-call-duration reached
}

_OK = (grpc.StatusCode.OK, "")


def status_for_end(code: int, reason: str) -> tuple[grpc.StatusCode, str]:
    """The status that ends an RPC whose recording the core ended."""
    if code == 1000:
        return _OK
    end_reason = reason.rpartition("call ended: ")[2].strip() if "call ended: " in reason else ""
    return STATUS_OF_END.get(end_reason, grpc.StatusCode.ABORTED), reason


# -- endpoints ---------------------------------------------------------------


@dataclass
class GrpcEndpoint:
    """A parsed ``--grpc-listen`` value."""

    spec: str
    interface: str
    port: int
    private_key: str | None = None
    cert_key: str | None = None
    extra_cert_chain: str | None = None
    certificate: tlsconfig.ServerTLS | None = None
    """The key, certificate and chain, checked; SIGHUP reloads them (evrecorder.tlsconfig)."""

    @property
    def tls(self) -> bool:
        return self.private_key is not None

    @property
    def address(self) -> str:
        host = self.interface
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials that serve the current certificate (new handshakes after a reload)."""
        if not self.tls:
            return None
        return tlsconfig.grpc_server_credentials(self.certificate)


def _split(spec: str) -> list[str]:
    """Twisted's endpoint syntax: colons separate, a backslash escapes."""
    parts, current, escaped = [], [], False
    for ch in spec:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_endpoint(spec: str, clock=None) -> GrpcEndpoint:
    """``tcp:PORT[:interface=IP]`` or ``ssl:PORT:privateKey=K[:certKey=C]
    [:extraCertChain=F][:interface=IP]``; ValueError says what is wrong.

    ``clock`` (the reactor) dates the check that the certificate has not expired."""
    kind, *rest = _split(spec)
    if kind not in ("tcp", "ssl"):
        raise ValueError("a gRPC endpoint is tcp:PORT[:interface=IP] or ssl:PORT:privateKey=K:certKey=C")
    positional, named = [], {}
    for part in rest:
        key, eq, value = part.partition("=")
        if eq:
            named[key] = value
        else:
            positional.append(part)
    if positional:
        named.setdefault("port", positional.pop(0))
    if positional:
        raise ValueError(f"unexpected {positional[0]!r}")
    allowed = {"port", "interface", "backlog"}
    if kind == "ssl":
        allowed |= {"privateKey", "certKey", "extraCertChain"}
    unknown = sorted(set(named) - allowed)
    if unknown:
        raise ValueError(f"{unknown[0]} is not supported for gRPC")
    try:
        port = int(named.get("port", ""))
    except ValueError:
        raise ValueError("the port must be a number") from None
    if not 0 <= port <= 65535:
        raise ValueError("the port must be 0 to 65535")
    ep = GrpcEndpoint(spec, named.get("interface") or "0.0.0.0", port)
    if kind == "ssl":
        if not named.get("privateKey"):
            raise ValueError("ssl: needs privateKey=")
        ep.private_key = named["privateKey"]
        ep.cert_key = named.get("certKey") or ep.private_key  # as Twisted's ssl: does
        ep.extra_cert_chain = named.get("extraCertChain")
        # Read and checked now, not at the first call; TLSError is a ValueError.
        ep.certificate = tlsconfig.ServerTLS(
            f"gRPC ssl:{port}", ep.private_key, ep.cert_key, ep.extra_cert_chain, clock=clock,
        )
    return ep


# -- between the threads -------------------------------------------------------


class _Bridge:
    """Two queues between the gRPC thread and the reactor, each woken once per
    burst: ``to_reactor`` (batches of events) and ``to_aio`` (their outcomes)."""

    def __init__(self, reactor, handle_batch, handle_outcome):
        self._reactor = reactor
        self._handle_batch = handle_batch
        self._handle_outcome = handle_outcome
        self._batches: collections.deque = collections.deque()
        self._batches_scheduled = False
        self._outcomes: collections.deque = collections.deque()
        self._outcomes_scheduled = False
        self.loop: asyncio.AbstractEventLoop | None = None

    # gRPC thread -> reactor
    def to_reactor(self, stream, events: list) -> None:
        self._batches.append((stream, events))
        if not self._batches_scheduled:
            self._batches_scheduled = True
            self._reactor.callFromThread(self._run_batches)

    def _run_batches(self) -> None:
        self._batches_scheduled = False  # first: a batch queued from now on schedules again
        batches, handle = self._batches, self._handle_batch
        while batches:
            stream, events = batches.popleft()
            handle(stream, events)

    # reactor -> gRPC thread
    def to_aio(self, aio_stream, outcome) -> None:
        self._outcomes.append((aio_stream, outcome))
        if not self._outcomes_scheduled and self.loop is not None:
            self._outcomes_scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._run_outcomes)
            except RuntimeError:  # the loop is closed: the server has stopped
                pass

    def _run_outcomes(self) -> None:
        self._outcomes_scheduled = False
        outcomes, handle = self._outcomes, self._handle_outcome
        while outcomes:
            aio_stream, outcome = outcomes.popleft()
            handle(aio_stream, outcome)


_HALF_CLOSE = object()  # the client ended its stream normally
_CANCEL = object()  # cancelled or broken
_UNREADABLE = object()  # a message grpcio could not read (its text follows)


# -- the gRPC thread's side of a stream ----------------------------------------


class _AioStream:
    """One RPC as the gRPC thread sees it: reads, batches, waits for the end."""

    __slots__ = ("bridge", "rstream", "pending", "inflight", "submitted", "final", "space",
                 "loop")

    def __init__(self, bridge: _Bridge, rstream, loop):
        self.bridge = bridge
        self.rstream = rstream
        self.pending: list = []
        self.inflight = False
        self.submitted = False  # the reactor has heard of this stream
        self.loop = loop
        self.final: asyncio.Future = loop.create_future()
        self.space: asyncio.Future | None = None

    def submit(self) -> None:
        self.inflight = self.submitted = True
        events, self.pending = self.pending, []
        self.bridge.to_reactor(self.rstream, events)

    def outcome(self, outcome) -> None:
        """The reactor handled a batch (outcome None) or ended the stream."""
        self.inflight = False
        if outcome is not None:
            if not self.final.done():
                self.final.set_result(outcome)
        elif self.pending and not self.final.done():
            self.submit()
        space, self.space = self.space, None
        if space is not None and not space.done():
            space.set_result(None)

    async def read(self, requests, clock) -> None:
        try:
            async for event in requests:
                self.pending.append((event, clock()))
                if not self.inflight:
                    self.submit()
                elif len(self.pending) >= BATCH_MAX:
                    self.space = self.loop.create_future()
                    await self.space
                if self.final.done():
                    return
            # grpcio ends the iteration the same way when the client half-closes
            # and when the call failed (a message over grpcio's own limit, a
            # cancel, a broken connection); the failure's cancel of this RPC
            # comes through grpcio's poller thread, so not always at the next
            # turn of the loop (two turns were not enough on a busy machine):
            # give it a moment before calling this a normal end.
            await asyncio.sleep(HALF_CLOSE_SETTLE_SECONDS)
            end = (_HALF_CLOSE, clock())
        except asyncio.CancelledError:
            raise
        except _TooLarge as e:
            end = (_UNREADABLE, clock(), str(e), grpc.StatusCode.RESOURCE_EXHAUSTED)
        except Exception as e:  # grpcio could not read or parse a message
            end = (_UNREADABLE, clock(), f"a message could not be read ({e.__class__.__name__}: {e})",
                   grpc.StatusCode.INVALID_ARGUMENT)
        self.pending.append(end)
        if not self.inflight:
            self.submit()


class _TooLarge(ValueError):
    pass


def _parse_event(raw: bytes) -> pb.StreamEvent:
    """Our own size limit, so that an oversized event is told from a half-close."""
    if len(raw) > MAX_EVENT_BYTES:
        raise _TooLarge(f"a message of {len(raw)} bytes is over the limit of {MAX_EVENT_BYTES}")
    return pb.StreamEvent.FromString(raw)


class _Servicer:
    def __init__(self, door: "GrpcDoor"):
        self._door = door

    async def Stream(self, request_iterator, context):
        door = self._door
        loop = asyncio.get_running_loop()
        peer = context.peer()
        if door.draining:
            door.refused(peer, "draining")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the recorder is shutting down")
        if door.secrets.required and not door.secret_matches(context.invocation_metadata()):
            door.refused(peer, "secret")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong credential")
        rstream = _Stream(door, peer, door.clock())
        st = _AioStream(door.bridge, rstream, loop)
        rstream.aio = st
        reader = loop.create_task(st.read(request_iterator, door.clock))
        seconds = door.settings.idle_timeout

        def silent():
            # No event at all: the reactor has never heard of this stream, so
            # no dialog's idle timeout covers it; it would hold its slot forever.
            if not st.submitted and not st.final.done():
                door.refused(peer, "idle")
                st.final.set_result((grpc.StatusCode.DEADLINE_EXCEEDED,
                                     f"no event within {seconds:g} s of the stream's start"))

        idle = loop.call_later(seconds, silent)
        try:
            code, details = await st.final
        except asyncio.CancelledError:
            # Cancelled by the client, a broken connection or the server's stop.
            reader.cancel()
            # (Cancelling this task cancelled the future it awaited, too.)
            if not st.final.done() or st.final.cancelled():
                st.pending.append((_CANCEL, door.clock()))
                st.submit()  # past the flow control: the last batch, and what it read
            raise
        finally:
            idle.cancel()
            if not reader.done():
                reader.cancel()
        if code is grpc.StatusCode.OK:
            return _EMPTY
        await context.abort(code, details)


_EMPTY = empty_pb2.Empty()


# -- the reactor's side of a stream --------------------------------------------

_PARTICIPANT_TYPE = pb.ParticipantType.DESCRIPTOR.values_by_number
_PRODUCT_TYPE = pb.ProductType.DESCRIPTOR.values_by_number
_CODEC = pb.Codec.DESCRIPTOR.values_by_number


def _enum_name(values_by_number, number: int) -> str:
    value = values_by_number.get(number)
    return value.name if value is not None else str(number)


def _participant(p) -> dict:
    return {
        "id": p.id,
        "type": _enum_name(_PARTICIPANT_TYPE, p.type),
        "name": p.name if p.HasField("name") else None,
    }


def _to_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class _Stream:
    """One RPC as the reactor sees it; also the ``conn`` the core knows."""

    __slots__ = ("door", "peer", "connected_at", "aio", "dialog", "key", "done", "label")

    def __init__(self, door: "GrpcDoor", peer: str, connected_at: float):
        self.door = door
        self.peer = peer
        self.connected_at = connected_at
        self.aio: _AioStream | None = None
        self.dialog = None
        self.key: tuple[str, str] | None = None
        self.done = False
        self.label = peer

    # The core's side of ``conn``.
    def end_call(self, code: int, reason: str) -> None:
        """The recording is over for this stream: end the RPC."""
        if self.done:
            return
        self.done = True
        outcome = status_for_end(code, reason)
        log.info(
            "gRPC stream {stream} ends with {status}: {reason}",
            stream=self.label, status=outcome[0].name, reason=reason,
        )
        self.door.finished(self, outcome)

    def refused(self, e: CallRejected) -> None:
        """The sibling process recording the dialog refused this stream's input
        (:class:`evrecorder.relay.RemoteDialog`): the status it would have here."""
        if not self.done:
            self.door._rejected(self, e, flush=False)


class GrpcDoor(service.Service):
    """The gRPC listeners (``--grpc-listen``) and the streams they carry."""

    name = "grpc"

    def __init__(self, registry, settings, reactor, endpoints: list[GrpcEndpoint],
                 clock: Callable[[], float] = time.time):
        self.registry = registry
        self.settings = settings
        self._reactor = reactor
        self.endpoints = endpoints
        #: When an event was read, in the reactor's clock domain
        #: (``reactor.seconds()`` is ``time.time()``), called on the gRPC thread.
        self.clock = clock
        self.secrets = SecretChecker(settings.secrets)
        self._internal_log = RateLimit(reactor)
        self.draining = False
        self.bridge = _Bridge(reactor, self._handle_batch, _AioStream.outcome)
        self.streams: set[_Stream] = set()
        self.ports: list[int] = []  # the bound ports, in endpoint order
        self.metrics = registry.metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._health = None
        self._started = False

    # -- life cycle --------------------------------------------------------

    def privilegedStartService(self):
        """Bind every endpoint now (port 443 before twistd drops privileges)."""
        if self._started:
            return
        self._started = True
        loop = asyncio.new_event_loop()
        self._loop = self.bridge.loop = loop
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="evrecorder-grpc", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            self.ports = asyncio.run_coroutine_threadsafe(self._start(), loop).result(30)
        except Exception as e:
            self._stop_loop()
            from evrecorder.service import ListenError

            if isinstance(e, _BindError):
                log.critical("cannot listen on {spec}: {reason}", spec=e.spec, reason=e.reason)
                raise ListenError(f"cannot listen on {e.spec}: {e.reason}") from None
            raise
        for ep, port in zip(self.endpoints, self.ports):
            log.info(
                "gRPC ({kind}) listening on {interface}:{port}",
                kind="TLS" if ep.tls else "plaintext", interface=ep.interface, port=port,
            )

    def startService(self):
        self.privilegedStartService()
        super().startService()

    async def _start(self) -> list[int]:
        s = self.settings
        options = [
            # A second recorder started by mistake must not take half the streams.
            ("grpc.so_reuseport", 1 if s.reuse_port else 0),
            # grpcio's own limit is a backstop; ours (_parse_event) answers first.
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
            ("grpc.max_concurrent_streams", s.max_calls),
            ("grpc.keepalive_time_ms", int(KEEPALIVE_SECONDS * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_SECONDS * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # The server sends nothing while a client streams, so to grpcio every
            # client ping comes "without data"; its default policy (one ping in
            # 5 minutes, then GOAWAY) would cut live recordings of a client that
            # keeps its connection alive. Pings are cheap: take them all.
            ("grpc.http2.min_ping_interval_without_data_ms", int(CLIENT_PING_MIN_SECONDS * 1000)),
            ("grpc.http2.max_ping_strikes", 0),
        ]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=s.max_connections)
        servicer = _Servicer(self)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Stream": grpc.stream_unary_rpc_method_handler(
                servicer.Stream, request_deserializer=_parse_event,
                response_serializer=empty_pb2.Empty.SerializeToString,
            ),
        }),))
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        ports = []
        for ep in self.endpoints:
            try:
                creds = ep.credentials()
            except ValueError as e:
                raise _BindError(ep.spec, str(e)) from None
            try:
                if creds is None:
                    port = server.add_insecure_port(ep.address)
                else:
                    port = server.add_secure_port(ep.address, creds)
            except RuntimeError as e:
                raise _BindError(ep.spec, _why_not_bound(ep, s.reuse_port, e)) from None
            if port == 0:  # older grpcio: 0 instead of an exception
                raise _BindError(ep.spec, _why_not_bound(ep, s.reuse_port, None))
            ports.append(port)
        await server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        return ports

    def drain(self) -> None:
        """Shutting down: new streams get UNAVAILABLE, health says NOT_SERVING."""
        self.draining = True
        if self._loop is not None and self._health is not None:
            async def not_serving():
                for name in ("", SERVICE_NAME):
                    await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

            asyncio.run_coroutine_threadsafe(not_serving(), self._loop)

    def stopService(self):
        """Stop the server (streams still open are cancelled) and its thread."""
        super().stopService()
        self.draining = True
        loop, server = self._loop, self._server
        if loop is None or server is None:
            self._stop_loop()
            return None
        d = defer.Deferred()

        async def stop():
            await server.stop(1.0)

        def done(fut):
            self._reactor.callFromThread(d.callback, None)

        asyncio.run_coroutine_threadsafe(stop(), loop).add_done_callback(done)

        def after(_):
            # Cancelled streams queued their last batch: handle it before the end.
            self.bridge._run_batches()
            self._stop_loop()
            self._server = None

        d.addCallback(after)
        return d

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        self._started = False
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(5)

    # -- from the gRPC thread -------------------------------------------------

    def secret_matches(self, metadata) -> bool:
        presented = [v for k, v in (metadata or ()) if k == "authorization"]
        if not presented:
            return False
        ok = True
        for value in presented:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            ok &= self.secrets.matches(credential(value))
        return ok

    def refused(self, peer: str, reason: str) -> None:
        """A stream refused before any event was read: "secret", "draining", or
        "idle" (none came within --idle-timeout).  Called on the gRPC thread."""
        self._reactor.callFromThread(self._refused, peer, reason)

    def _refused(self, peer: str, reason: str) -> None:
        self.metrics.grpc_rejected[reason] += 1
        if reason == "secret":
            log.warn("gRPC stream from {peer} refused (UNAUTHENTICATED): missing or wrong credential",
                     peer=peer)
        elif reason == "idle":
            log.warn("gRPC stream from {peer} ended (DEADLINE_EXCEEDED): no event within {seconds} s",
                     peer=peer, seconds=self.settings.idle_timeout)
        # "draining": counted only, as the WebSocket door's refused handshakes;
        # the drain itself is one line (service), not one a stream.

    # -- on the reactor ----------------------------------------------------------

    def finished(self, stream: _Stream, outcome) -> None:
        self.streams.discard(stream)
        self.bridge.to_aio(stream.aio, outcome)

    def _handle_batch(self, stream: _Stream, events: list) -> None:
        if stream.done:
            return
        if stream.dialog is None and stream not in self.streams:
            self.streams.add(stream)
            self.metrics.grpc_streams += 1
        flushing = False
        try:
            for item in events:
                event = item[0]
                if event is _HALF_CLOSE or event is _CANCEL or event is _UNREADABLE:
                    self._stream_end(stream, item)
                    return
                self._event(stream, event, item[1])
            dialog = stream.dialog
            if dialog is not None:
                flushing = True
                dialog.flush()
        except CallRejected as e:
            # A write that just failed is not tried (and logged) again at once.
            self._rejected(stream, e, flush=not flushing)
            return
        except Exception:
            log.failure("gRPC stream {stream}: handling its events failed", stream=stream.label)
            self._rejected(stream, CallRejected("internal", "the recorder failed to handle an event"),
                           flush=not flushing)
            return
        if not stream.done:
            self.bridge.to_aio(stream.aio, None)

    def _event(self, stream: _Stream, event, at: float) -> None:
        kind = event.WhichOneof("event")
        dialog = stream.dialog
        if kind == "segment_media":
            if dialog is None:
                raise CallRejected("precondition", "SegmentMedia came before DialogInit")
            media = event.segment_media
            content = media.audio_content
            dialog.segment_media(stream, media.segment_id, content.seq, content.duration,
                                 content.payload, at)  # counted by the dialog (metrics)
        elif kind == "dialog_init":
            self._dialog_init(stream, event)
        elif dialog is None:
            raise CallRejected(
                "precondition",
                f"{_EVENT_NAMES.get(kind, 'an empty event')} came before DialogInit",
            )
        elif kind == "segment_start":
            start = event.segment_start
            dialog.segment_start(
                stream, start.segment_id, _participant(start.participant),
                {"id": start.product.id, "type": _enum_name(_PRODUCT_TYPE, start.product.type)}
                if start.HasField("product") else None,
                {"codec": _enum_name(_CODEC, start.audio_format.codec),
                 "rate": start.audio_format.rate, "ptime": start.audio_format.ptime}
                if start.HasField("audio_format") else None,
                at,
            )
        elif kind == "segment_info":
            info = event.segment_info
            dialog.segment_info(stream, info.segment_id, info.event,
                                info.data if info.HasField("data") else None, at)
        elif kind == "segment_stop":
            dialog.segment_stop(stream, event.segment_stop.segment_id, at)
        else:
            # No event we know (a newer vendor version): ignored, as the proto3
            # rule for unknown fields says; still activity for --idle-timeout.
            dialog.touch()

    def _dialog_init(self, stream: _Stream, event) -> None:
        init = event.dialog_init
        key = (init.account.id, init.dialog.id)
        if stream.dialog is not None:
            if key == stream.key:
                stream.dialog.touch()  # the same DialogInit again: only activity
                return
            raise CallRejected(
                "precondition",
                f"a second DialogInit names another dialog ({init.dialog.id!r}, recording "
                f"{stream.key[1]!r})",
            )
        if not init.dialog.id:
            raise CallRejected("invalid", "DialogInit has no dialog id")
        stream.label = f"{init.dialog.id}/{event.session_id} from {stream.peer}"
        metadata = {"account": _to_dict(init.account), "dialog": _to_dict(init.dialog)}
        stream.dialog = self.registry.join_dialog(
            stream, account_id=init.account.id, dialog_id=init.dialog.id,
            session_id=event.session_id, metadata=metadata, connected_at=stream.connected_at,
        )
        stream.key = key

    def _stream_end(self, stream: _Stream, item) -> None:
        event, at = item[0], item[1]
        dialog = stream.dialog
        if event is _UNREADABLE:
            self._rejected(stream, CallRejected("invalid", item[2]), status=item[3])
            return
        cancelled = event is _CANCEL
        stream.done = True
        self.streams.discard(stream)
        failed = None
        if dialog is not None:
            try:
                dialog.flush()
            except CallRejected as e:
                _log_rejection(stream, e, limit=self._internal_log)
                failed = e
            dialog.stream_closed(stream, cancelled=cancelled or failed is not None, at=at,
                                 error=failed.reason if failed is not None else None)
        if cancelled:
            log.info("gRPC stream {stream} was cancelled or broke", stream=stream.label)
        elif failed is not None:
            # The client half-closed and waits for its answer: the failure's status.
            status = STATUS_OF_KIND[failed.kind]
            self.metrics.grpc_closed[status.name] += 1
            self.bridge.to_aio(stream.aio, (status, failed.reason))
        else:
            self.bridge.to_aio(stream.aio, _OK)

    def _rejected(self, stream: _Stream, e: CallRejected, status=None, flush: bool = True) -> None:
        """Bad input or our fault: end only this stream; the dialog keeps what it has
        (what the stream sent before is written, unless that write is what failed)."""
        status = status or STATUS_OF_KIND[e.kind]
        _log_rejection(stream, e, status, self._internal_log)
        stream.done = True
        self.metrics.grpc_closed[status.name] += 1
        dialog = stream.dialog
        if dialog is not None:
            if flush:
                try:
                    dialog.flush()
                except CallRejected:
                    pass
                except Exception:
                    log.failure("gRPC stream {stream}: flushing failed", stream=stream.label)
            dialog.stream_closed(stream, cancelled=True, at=self._reactor.seconds(),
                                 error=e.reason)
        self.finished(stream, (status, e.reason))

    def close_all(self) -> None:
        """End every stream still open (shutdown, after the dialogs ended)."""
        for stream in list(self.streams):
            stream.end_call(1001, "call ended: shutdown")


def _log_rejection(stream: _Stream, e: CallRejected, status=None,
                   limit: RateLimit | None = None) -> None:
    status = (status or STATUS_OF_KIND[e.kind]).name
    if e.kind == "internal":
        # Our fault, and when it is the spool it is every stream's: one line a
        # while per reason (the core logged the cause).
        more = limit.allow((status, e.reason)) if limit is not None else 0
        if more is not None:
            log.error("gRPC stream {stream} ended with {status}: {reason}{more}",
                      stream=stream.label, status=status, reason=e.reason,
                      more=f"; {more} more streams ended likewise since the last such line"
                      if more else "")
    else:
        log.warn("gRPC stream {stream} ended with {status}: {reason}",
                 stream=stream.label, status=status, reason=e.reason)


_EVENT_NAMES = {
    "segment_start": "SegmentStart",
    "segment_media": "SegmentMedia",
    "segment_info": "SegmentInfo",
    "segment_stop": "SegmentStop",
}


class _BindError(Exception):
    def __init__(self, spec: str, reason: str):
        super().__init__(reason)
        self.spec = spec
        self.reason = reason


def _why_not_bound(ep: GrpcEndpoint, reuse_port: bool, error) -> str:
    """grpcio says only "failed to bind": ask the OS the same question for a sentence."""
    family = socket.AF_INET6 if ":" in ep.interface else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((ep.interface, ep.port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return f"port {ep.port} is already in use"
        return e.strerror or str(e)
    return str(error) if error else "grpcio could not bind the address"


