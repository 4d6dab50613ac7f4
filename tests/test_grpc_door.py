"""The gRPC door alone: a real grpcio server and clients over loopback, in front
of a fake core that records what the door asks of it."""

from __future__ import annotations

import grpc
import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.threads import deferToThread

from evrecorder.errors import CallRejected
from evrecorder.grpcdoor import GrpcDoor, parse_endpoint, status_for_end
from evrecorder.metrics import Metrics
from evrecorder.settings import Settings
from grpcclient import OpenStream, dialog_init, media, segment_start, segment_stop, send, info
from evrecorder.grpcapi import streaming_pb2 as pb


class FakeDialog:
    """Records every call; raises CallRejected where told."""

    def __init__(self, registry, key):
        self.registry = registry
        self.key = key
        self.calls: list[tuple] = []
        self.conns: list = []
        self.errors: list = []

    def _check(self, segment_id):
        if segment_id in self.registry.reject_segments:
            kind = self.registry.reject_segments[segment_id]
            raise CallRejected(kind, f"segment {segment_id} is {kind}")

    def segment_start(self, conn, segment_id, participant, product, audio_format, at):
        self._check(segment_id)
        self.calls.append(("start", segment_id, participant, product, audio_format))

    def segment_media(self, conn, segment_id, seq, duration_ms, payload, at):
        self._check(segment_id)
        self.calls.append(("media", segment_id, seq, duration_ms, payload))

    def segment_info(self, conn, segment_id, event, data, at):
        self.calls.append(("info", segment_id, event, data))

    def segment_stop(self, conn, segment_id, at):
        self.calls.append(("stop", segment_id))

    def touch(self):
        self.calls.append(("touch",))

    def flush(self):
        self.calls.append(("flush",))
        if self.registry.fail_flush:
            raise CallRejected("internal", "the recorder cannot write to its spool")

    def stream_closed(self, conn, cancelled, at, error=None):
        self.calls.append(("closed", cancelled))
        self.errors.append(error)


class FakeRegistry:
    def __init__(self):
        self.metrics = Metrics()
        self.dialogs: dict = {}
        self.joins: list[dict] = []
        self.reject_segments: dict = {}
        self.fail_flush = False
        self.reject_join = None

    def join_dialog(self, conn, *, account_id, dialog_id, session_id, metadata, connected_at):
        if self.reject_join:
            raise CallRejected(*self.reject_join)
        self.joins.append(dict(account_id=account_id, dialog_id=dialog_id, session_id=session_id,
                               metadata=metadata))
        dialog = self.dialogs.setdefault((account_id, dialog_id),
                                         FakeDialog(self, (account_id, dialog_id)))
        dialog.conns.append(conn)
        return dialog


def reactor():
    from twisted.internet import reactor as r

    return r


@pytest_twisted.async_yield_fixture
async def door():
    """A GrpcDoor on 127.0.0.1:<random> in front of a FakeRegistry; stopped at the end."""
    made = []

    def make(**settings):
        registry = FakeRegistry()
        d = GrpcDoor(registry, Settings(**settings), reactor(),
                     [parse_endpoint("tcp:0:interface=127.0.0.1")])
        d.startService()
        made.append(d)
        return d

    yield make
    for d in made:
        if d.running:
            await d.stopService()


async def until(predicate, timeout=10.0):
    deadline = reactor().seconds() + timeout
    while not predicate():
        assert reactor().seconds() < deadline, "timed out"
        await task.deferLater(reactor(), 0.02, lambda: None)


def calls_of(d, dialog_id="d-1", account_id="acc-1"):
    return d.registry.dialogs[(account_id, dialog_id)].calls


def without_flush(calls):
    return [c for c in calls if c != ("flush",)]


@pytest_twisted.ensureDeferred
async def test_events_reach_the_core_in_order_and_half_close_is_ok(door):
    """DialogInit joins the dialog; starts, media, info, stops arrive in order; half-close -> OK."""
    d = door()
    events = [
        dialog_init("d-1", ani="+15551230000", attributes={"k": "v"}),
        segment_start("c", pb.CONTACT, name="Ann"),
        segment_start("a", pb.AGENT, codec=pb.PCMA),
        media("c", 1, b"\x01" * 800), media("a", 7, b"\x02" * 800),
        info("a", "hold", "x"), info("a", "unhold"),
        segment_stop("a"), segment_stop("c"),
    ]
    status = await deferToThread(send, d.ports[0], events)
    assert status == (grpc.StatusCode.OK, "")
    [join] = d.registry.joins
    assert join["dialog_id"] == "d-1" and join["account_id"] == "acc-1" and join["session_id"] == "s-1"
    assert join["metadata"] == {
        "account": {"id": "acc-1", "sub_account_id": "sub-1", "rc_account_id": "rc-1"},
        "dialog": {"id": "d-1", "type": "INBOUND", "ani": "+15551230000", "attributes": {"k": "v"}},
    }
    calls = calls_of(d)
    assert without_flush(calls) == [
        ("start", "c", {"id": "p-c", "type": "CONTACT", "name": "Ann"}, {"id": "q-1", "type": "QUEUE"},
         {"codec": "PCMU", "rate": 8000, "ptime": 100}),
        ("start", "a", {"id": "p-a", "type": "AGENT", "name": None}, {"id": "q-1", "type": "QUEUE"},
         {"codec": "PCMA", "rate": 8000, "ptime": 100}),
        ("media", "c", 1, 100, b"\x01" * 800), ("media", "a", 7, 100, b"\x02" * 800),
        ("info", "a", "hold", "x"), ("info", "a", "unhold", None),
        ("stop", "a"), ("stop", "c"),
        ("closed", False),
    ]
    assert calls[-2] == ("flush",)  # what was read is flushed before the stream closes


@pytest_twisted.ensureDeferred
async def test_unknown_enum_numbers_and_missing_optionals(door):
    """An enum number the proto does not name is passed as its number; absent optionals as None."""
    d = door()
    start = pb.StreamEvent(session_id="s-1", segment_start=pb.SegmentStartEvent(
        segment_id="x", participant=pb.Participant(id="p", type=9)))
    status = await deferToThread(send, d.ports[0], [dialog_init("d-1"), start])
    assert status[0] == grpc.StatusCode.OK
    assert without_flush(calls_of(d))[0] == ("start", "x", {"id": "p", "type": "9", "name": None}, None, None)


@pytest.mark.parametrize("first, what", [
    (segment_start("c"), "SegmentStart came before DialogInit"),
    (media("c", 1, b"\xff"), "SegmentMedia came before DialogInit"),
    (pb.StreamEvent(session_id="s"), "an empty event came before DialogInit"),
])
@pytest_twisted.ensureDeferred
async def test_event_before_dialog_init_is_failed_precondition(door, first, what):
    """Anything before DialogInit ends the stream with FAILED_PRECONDITION; nothing joins."""
    d = door()
    code, details = await deferToThread(send, d.ports[0], [first, dialog_init("d-1")])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and what in details
    assert d.registry.joins == []


@pytest_twisted.ensureDeferred
async def test_second_dialog_init_for_another_dialog(door):
    """The same DialogInit again is ignored; one naming another dialog is FAILED_PRECONDITION."""
    d = door()
    code, details = await deferToThread(send, d.ports[0], [
        dialog_init("d-1"), dialog_init("d-1"), segment_start("c"), dialog_init("d-2"),
        media("c", 1, b"\xff"),
    ])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "another dialog" in details
    assert len(d.registry.joins) == 1
    assert without_flush(calls_of(d))[-1] == ("closed", True)
    assert ("media", "c", 1, 100, b"\xff") not in calls_of(d)


@pytest.mark.parametrize("kind, code", [
    ("invalid", grpc.StatusCode.INVALID_ARGUMENT),
    ("unsupported", grpc.StatusCode.INVALID_ARGUMENT),
    ("precondition", grpc.StatusCode.FAILED_PRECONDITION),
    ("capacity", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("internal", grpc.StatusCode.INTERNAL),
])
@pytest_twisted.ensureDeferred
async def test_call_rejected_kinds_map_to_statuses(door, kind, code):
    """A CallRejected from the core ends the stream with its kind's status and its reason."""
    d = door()
    d.registry.reject_segments["bad"] = kind
    got = await deferToThread(send, d.ports[0], [
        dialog_init("d-1"), segment_start("ok"), media("ok", 1, b"\x11"), segment_start("bad"),
        media("ok", 2, b"\x22"),
    ])
    assert got == (code, f"segment bad is {kind}")
    calls = calls_of(d)
    assert ("media", "ok", 1, 100, b"\x11") in calls
    assert calls[-2:] == [("flush",), ("closed", True)]  # what came before is kept
    assert d.metrics.grpc_closed[code.name] == 1
    assert d.registry.dialogs[("acc-1", "d-1")].errors == [f"segment bad is {kind}"]


@pytest_twisted.ensureDeferred
async def test_join_refused_keeps_nothing(door):
    """join_dialog refusing (capacity) answers RESOURCE_EXHAUSTED; no dialog, no stream_closed."""
    d = door()
    d.registry.reject_join = ("capacity", "at capacity (1 calls)")
    got = await deferToThread(send, d.ports[0], [dialog_init("d-1"), segment_start("c")])
    assert got == (grpc.StatusCode.RESOURCE_EXHAUSTED, "at capacity (1 calls)")
    assert d.registry.dialogs == {}


@pytest_twisted.ensureDeferred
async def test_failed_flush_is_internal(door):
    """A spool write that fails (flush raises internal) ends the stream with INTERNAL."""
    d = door()
    d.registry.fail_flush = True
    got = await deferToThread(send, d.ports[0], [dialog_init("d-1"), segment_start("c")])
    assert got[0] == grpc.StatusCode.INTERNAL
    assert calls_of(d)[-1] == ("closed", True)


@pytest_twisted.ensureDeferred
async def test_a_failed_flush_at_half_close_ends_the_rpc_with_internal(door):
    """The client half-closes and the last write fails: the RPC ends with INTERNAL at
    once (it used to wait for the client's deadline), and the stream closes as failed."""
    d = door()
    stream = OpenStream(d.ports[0])
    stream.send(dialog_init("d-1"), segment_start("c"))
    await until(lambda: ("d-1" in str(d.registry.dialogs)) and ("flush",) in calls_of(d))
    d.registry.fail_flush = True
    stream.close()
    code, details = await deferToThread(stream.result, 10.0)
    assert code == grpc.StatusCode.INTERNAL and "spool" in details
    assert calls_of(d)[-1] == ("closed", True)
    assert d.registry.dialogs[("acc-1", "d-1")].errors[-1] == "the recorder cannot write to its spool"
    assert d.metrics.grpc_closed["INTERNAL"] == 1


@pytest_twisted.ensureDeferred
async def test_malformed_and_oversized_messages(door):
    """Bytes that are no StreamEvent: INVALID_ARGUMENT; a message over the limit: RESOURCE_EXHAUSTED."""
    d = door()
    good = dialog_init("d-1").SerializeToString()
    code, details = await deferToThread(send, d.ports[0], [good, b"\x0a\xff\xff"], raw=True)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert calls_of(d)[-1] == ("closed", True)
    big = media("c", 1, b"\x00" * 70000).SerializeToString()
    code, details = await deferToThread(
        send, d.ports[0], [dialog_init("d-2").SerializeToString(), big], raw=True)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "over the limit" in details
    await until(lambda: calls_of(d, "d-2")[-1:] == [("closed", True)])
    huge = media("c", 1, b"\x00" * 300000).SerializeToString()  # over grpcio's own limit too
    code, details = await deferToThread(
        send, d.ports[0], [dialog_init("d-3").SerializeToString(), huge], raw=True)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    await until(lambda: calls_of(d, "d-3")[-1:] == [("closed", True)])


@pytest_twisted.ensureDeferred
async def test_cancel_is_stream_closed_cancelled(door):
    """A client that cancels mid-stream: the events it sent arrive, then stream_closed(cancelled=True)."""
    d = door()
    s = OpenStream(d.ports[0])
    s.send(dialog_init("d-1"), segment_start("c"), media("c", 1, b"\x01"))
    await until(lambda: ("d-1" in str(d.registry.dialogs)) and
                ("media", "c", 1, 100, b"\x01") in calls_of(d))
    s.cancel()
    await until(lambda: calls_of(d)[-1:] == [("closed", True)])
    assert await deferToThread(s.result) == (grpc.StatusCode.CANCELLED, "")


@pytest_twisted.ensureDeferred
async def test_end_call_ends_the_rpc_with_its_status(door):
    """conn.end_call from the core ends the RPC: 1000 OK, shutdown UNAVAILABLE, timeout DEADLINE_EXCEEDED."""
    d = door()
    results = {}
    for dialog_id, code, reason in [("d-ok", 1000, "call ended: stop"),
                                    ("d-shut", 1001, "call ended: shutdown"),
                                    ("d-idle", 1001, "call ended: timeout")]:
        s = OpenStream(d.ports[0])
        s.send(dialog_init(dialog_id))
        await until(lambda: ("acc-1", dialog_id) in d.registry.dialogs)
        [conn] = d.registry.dialogs[("acc-1", dialog_id)].conns
        conn.end_call(code, reason)
        results[dialog_id] = await deferToThread(s.result)
        assert ("closed", True) not in calls_of(d, dialog_id)
    assert results == {
        "d-ok": (grpc.StatusCode.OK, ""),
        "d-shut": (grpc.StatusCode.UNAVAILABLE, "call ended: shutdown"),
        "d-idle": (grpc.StatusCode.DEADLINE_EXCEEDED, "call ended: timeout"),
    }


def test_status_for_end():
    """Each end reason's status, as README.rst documents them."""
    assert status_for_end(1000, "call ended: stop") == (grpc.StatusCode.OK, "")
    assert status_for_end(1001, "call ended: max-duration")[0] == grpc.StatusCode.OUT_OF_RANGE
    assert status_for_end(1001, "call ended: disconnect")[0] == grpc.StatusCode.ABORTED


@pytest_twisted.ensureDeferred
async def test_secret_wrong_missing_and_right(door):
    """With secrets set: wrong or missing credential -> UNAUTHENTICATED before any event; right ones pass."""
    d = door(secrets=["s3cret", "0ther"])
    events = [dialog_init("d-1"), segment_start("c")]
    assert (await deferToThread(send, d.ports[0], events, token="nope"))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert (await deferToThread(send, d.ports[0], events))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert (await deferToThread(send, d.ports[0], events, token="Bearer wrong"))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert d.registry.joins == []
    assert (await deferToThread(send, d.ports[0], events, token="Bearer s3cret"))[0] == grpc.StatusCode.OK
    assert (await deferToThread(send, d.ports[0], events, token="0ther"))[0] == grpc.StatusCode.OK
    assert len(d.registry.joins) == 2
    await until(lambda: d.metrics.grpc_rejected["secret"] == 3)


@pytest_twisted.ensureDeferred
async def test_draining_refuses_new_streams_and_health_follows(door):
    """drain(): new streams UNAVAILABLE and the health service says NOT_SERVING; a stream in progress goes on."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    d = door()

    def health(service=""):
        with grpc.insecure_channel(f"127.0.0.1:{d.ports[0]}") as ch:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5).status

    assert await deferToThread(health) == health_pb2.HealthCheckResponse.SERVING
    assert await deferToThread(
        health, "ringcentral.ringcx.streaming.v1beta2.Streaming") == health_pb2.HealthCheckResponse.SERVING
    s = OpenStream(d.ports[0])
    s.send(dialog_init("d-1"))
    await until(lambda: d.registry.joins)
    d.drain()
    code, _ = await deferToThread(send, d.ports[0], [dialog_init("d-2")])
    assert code == grpc.StatusCode.UNAVAILABLE
    assert await deferToThread(health) == health_pb2.HealthCheckResponse.NOT_SERVING
    s.send(segment_start("c"))
    s.close()
    assert await deferToThread(s.result) == (grpc.StatusCode.OK, "")
    assert ("closed", False) in calls_of(d)


@pytest_twisted.ensureDeferred
async def test_flow_control_bounds_what_a_stream_reads_ahead(door):
    """While the reactor is busy with a batch, a stream reads at most BATCH_MAX more events."""
    from evrecorder import grpcdoor

    d = door()
    sizes = []
    handle = d._handle_batch

    def slow(stream, events):
        sizes.append(len(events))
        handle(stream, events)

    d.bridge._handle_batch = slow
    events = [dialog_init("d-1"), segment_start("c")] + [media("c", i, b"\x01" * 160) for i in range(2000)]
    status = await deferToThread(send, d.ports[0], events)
    assert status[0] == grpc.StatusCode.OK
    assert sum(sizes) == 2003  # every event, and the half-close
    assert max(sizes) <= grpcdoor.BATCH_MAX + 1
    assert [c[2] for c in calls_of(d) if c[0] == "media"] == list(range(2000))


def test_parse_endpoint():
    """tcp: and ssl: endpoint strings as --listen takes them; wrong ones say why."""
    ep = parse_endpoint("tcp:10443")
    assert (ep.interface, ep.port, ep.tls, ep.address) == ("0.0.0.0", 10443, False, "0.0.0.0:10443")
    ep = parse_endpoint("tcp:port=0:interface=\\:\\:1")
    assert ep.address == "[::1]:0"
    with pytest.raises(ValueError, match="private key file /nonexistent cannot be read"):
        parse_endpoint("ssl:443:privateKey=/nonexistent")
    with pytest.raises(ValueError, match="tcp:PORT"):
        parse_endpoint("unix:/tmp/x")
    with pytest.raises(ValueError, match="sslmethod is not supported"):
        parse_endpoint("tcp:1:sslmethod=x")
    with pytest.raises(ValueError, match="port must be a number"):
        parse_endpoint("tcp:http")



def test_grpc_listen_option(tmp_path):
    """--grpc-listen is repeatable and kept as given; a value that cannot work is a UsageError sentence."""
    from twisted.python import usage

    from evrecorder.tap import Options

    o = Options()
    o.parseOptions(["--spool", str(tmp_path / "s"), "--archive", str(tmp_path / "a"),
                    "--grpc-listen", "tcp:10443", "--grpc-listen", "tcp:0:interface=127.0.0.1"])
    assert o["grpc-listen"] == ["tcp:10443", "tcp:0:interface=127.0.0.1"]
    assert o["listen"] == ["tcp:3333"]  # the WebSocket door keeps its default beside it
    with pytest.raises(usage.UsageError) as e:
        Options().parseOptions(["--grpc-listen", "unix:/tmp/x"])
    assert str(e.value).startswith("--grpc-listen unix:/tmp/x: a gRPC endpoint is tcp:PORT")
    assert Options()["grpc-listen"] == []



@pytest_twisted.ensureDeferred
async def test_a_stream_that_sends_nothing_ends_after_the_idle_timeout(door):
    """A stream that never sends an event ends with DEADLINE_EXCEEDED after --idle-timeout; one with a DialogInit is left to its dialog."""
    d = door(idle_timeout=1.0)
    joined = OpenStream(d.ports[0])
    joined.send(dialog_init("d-1"))
    await until(lambda: d.registry.joins)  # read in time, whatever the machine's load
    silent = OpenStream(d.ports[0])
    code, details = await deferToThread(silent.result, 10.0)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no event" in details
    await until(lambda: d.metrics.grpc_rejected["idle"] == 1)
    assert d.registry.joins and not joined.done  # the dialog's own idle timeout decides for it
    joined.close()
    assert await deferToThread(joined.result) == (grpc.StatusCode.OK, "")


@pytest_twisted.ensureDeferred
async def test_streams_refused_while_draining_are_counted_not_logged_one_by_one(door):
    """While draining, each refused stream counts in the metrics but writes no line (as refused handshakes)."""
    from twisted.logger import formatEvent, globalLogPublisher

    d = door()
    lines = []

    def observe(event):
        if event.get("log_namespace") == "evrecorder.grpcdoor":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        d.drain()
        for _ in range(3):
            code, _ = await deferToThread(send, d.ports[0], [dialog_init("d-1")])
            assert code == grpc.StatusCode.UNAVAILABLE
        await until(lambda: d.metrics.grpc_rejected["draining"] == 3)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert lines == []


def test_a_cancel_that_core_reports_just_after_the_end_of_input_is_a_cancel():
    """grpcio may end the input of a cancelled RPC a moment before it cancels it: that stream is cancelled, not half-closed."""
    import asyncio
    from types import SimpleNamespace

    from evrecorder import grpcdoor

    async def run():
        loop = asyncio.get_running_loop()
        got = []

        class Bridge:
            def to_reactor(self, stream, events):
                got.extend(e[0] for e in events)
                loop.call_soon(stream.aio.outcome, None)  # the reactor handled it

        door = SimpleNamespace(draining=False, secrets=SimpleNamespace(required=False),
                               clock=loop.time, bridge=Bridge(),
                               settings=SimpleNamespace(idle_timeout=60.0))
        context = SimpleNamespace(peer=lambda: "ipv4:127.0.0.1:1")
        task = None

        async def requests():
            yield dialog_init("d-1")
            await asyncio.sleep(0.01)
            # The connection broke: the input ends, and the cancel follows 5 ms later.
            loop.call_later(0.005, task.cancel)

        task = loop.create_task(grpcdoor._Servicer(door).Stream(requests(), context))
        try:
            await task
        except asyncio.CancelledError:
            pass
        return got

    got = asyncio.run(run())
    assert got[0] == dialog_init("d-1")
    assert got[1:] == [grpcdoor._CANCEL]
