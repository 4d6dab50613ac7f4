"""A test client for the gRPC door: RingCX's events, sent with grpcio's own client.

Each stream runs in a thread of its own (``deferToThread``), with the
synchronous grpcio client: the reactor stays free to run the recorder.
"""

from __future__ import annotations

import queue
import threading

import grpc

from evrecorder.grpcapi import streaming_pb2 as pb
from evrecorder.grpcapi import streaming_pb2_grpc as pb_grpc


def dialog_init(dialog_id: str, account_id: str = "acc-1", session_id: str = "s-1",
                **dialog) -> pb.StreamEvent:
    return pb.StreamEvent(session_id=session_id, dialog_init=pb.DialogInitEvent(
        account=pb.Account(id=account_id, sub_account_id="sub-1", rc_account_id="rc-1"),
        dialog=pb.Dialog(id=dialog_id, type=pb.INBOUND, **dialog),
    ))


def segment_start(segment_id: str, ptype=pb.CONTACT, codec=pb.PCMU, rate=8000, ptime=100,
                  participant_id: str | None = None, session_id: str = "s-1",
                  name: str | None = None) -> pb.StreamEvent:
    participant = pb.Participant(id=participant_id or f"p-{segment_id}", type=ptype)
    if name is not None:
        participant.name = name
    return pb.StreamEvent(session_id=session_id, segment_start=pb.SegmentStartEvent(
        segment_id=segment_id, participant=participant,
        product=pb.Product(id="q-1", type=pb.QUEUE),
        audio_format=pb.AudioFormat(codec=codec, rate=rate, ptime=ptime),
    ))


def media(segment_id: str, seq: int, payload: bytes, duration: int = 100,
          session_id: str = "s-1") -> pb.StreamEvent:
    return pb.StreamEvent(session_id=session_id, segment_media=pb.SegmentMediaEvent(
        segment_id=segment_id,
        audio_content=pb.AudioContent(payload=payload, seq=seq, duration=duration),
    ))


def info(segment_id: str, event: str, data: str | None = None,
         session_id: str = "s-1") -> pb.StreamEvent:
    msg = pb.SegmentInfoEvent(segment_id=segment_id, event=event)
    if data is not None:
        msg.data = data
    return pb.StreamEvent(session_id=session_id, segment_info=msg)


def segment_stop(segment_id: str, session_id: str = "s-1") -> pb.StreamEvent:
    return pb.StreamEvent(session_id=session_id,
                          segment_stop=pb.SegmentStopEvent(segment_id=segment_id))


def channel(port: int, ca: bytes | None = None, own_connection: bool = False) -> grpc.Channel:
    """``own_connection``: a TCP connection of its own (grpcio shares one between
    channels to the same target otherwise), as a separate RingCX stream may use."""
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else None
    if ca is None:
        return grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
    return grpc.secure_channel(
        f"localhost:{port}", grpc.ssl_channel_credentials(root_certificates=ca), options=options
    )


def send(port: int, events, token: str | None = None, ca: bytes | None = None,
         timeout: float = 20.0, raw: bool = False) -> tuple[grpc.StatusCode, str]:
    """Stream ``events`` (messages, or bytes when ``raw``), half-close, and
    return the final status and its details.  Blocking: call it in a thread."""
    metadata = [("authorization", token)] if token is not None else None
    with channel(port, ca) as ch:
        if raw:
            call = ch.stream_unary(
                "/ringcentral.ringcx.streaming.v1beta2.Streaming/Stream",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
        else:
            call = pb_grpc.StreamingStub(ch).Stream
        try:
            call(iter(events), metadata=metadata, timeout=timeout)
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
        return grpc.StatusCode.OK, ""


class OpenStream:
    """A stream kept open: events are fed one by one; cancel or close it."""

    def __init__(self, port: int, token: str | None = None, ca: bytes | None = None,
                 own_connection: bool = False):
        self._queue: queue.Queue = queue.Queue()
        self._channel = channel(port, ca, own_connection)
        metadata = [("authorization", token)] if token is not None else None
        self._future = pb_grpc.StreamingStub(self._channel).Stream.future(
            iter(self._queue.get, None), metadata=metadata, timeout=60
        )
        self._done = threading.Event()
        self._future.add_done_callback(lambda f: self._done.set())

    def send(self, *events) -> None:
        for e in events:
            self._queue.put(e)

    def close(self) -> None:
        """Half-close: the client's normal end of its stream."""
        self._queue.put(None)

    def cancel(self) -> None:
        self._future.cancel()

    def result(self, timeout: float = 20.0) -> tuple[grpc.StatusCode, str]:
        """Block (in a thread) until the RPC ends; its status and details."""
        if not self._done.wait(timeout):
            raise AssertionError("the RPC did not end")
        try:
            self._future.result()
        except grpc.FutureCancelledError:
            return grpc.StatusCode.CANCELLED, ""
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
        finally:
            self._queue.put(None)
            self._channel.close()
        return grpc.StatusCode.OK, ""

    @property
    def done(self) -> bool:
        return self._done.is_set()
