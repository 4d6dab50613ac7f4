"""The committed protobuf/gRPC modules are exactly what grpcio-tools makes of our .proto."""

from __future__ import annotations

import os


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO = "evrecorder/grpcapi/streaming.proto"
GENERATED = ("evrecorder/grpcapi/streaming_pb2.py", "evrecorder/grpcapi/streaming_pb2_grpc.py")


def test_generated_modules_match_the_proto(tmp_path):
    """Regenerating from streaming.proto into a temp dir gives the committed files byte for byte."""
    from grpc_tools import protoc

    status = protoc.main([
        "grpc_tools.protoc", f"-I{REPO}", f"-I{os.path.dirname(protoc.__file__)}/_proto",
        f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", os.path.join(REPO, PROTO),
    ])
    assert status == 0
    for name in GENERATED:
        with open(os.path.join(REPO, name), encoding="utf-8") as f:
            committed = f.read()
        with open(tmp_path / name, encoding="utf-8") as f:
            fresh = f.read()
        assert fresh == committed, (
            f"{name} differs from what grpcio-tools makes of {PROTO}: regenerate it "
            "(see the command at the top of the .proto) and commit it"
        )


def test_wire_contract_names_and_numbers():
    """Field numbers and enum values are the vendor's (spec/ringcx-grpc-streaming.md)."""
    from evrecorder.grpcapi import streaming_pb2 as pb

    def fields(message):
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert pb.DESCRIPTOR.package == "ringcentral.ringcx.streaming.v1beta2"
    assert fields(pb.StreamEvent) == {"session_id": 1, "dialog_init": 2, "segment_start": 3,
                                      "segment_media": 4, "segment_info": 5, "segment_stop": 6}
    assert [f.name for f in pb.StreamEvent.DESCRIPTOR.oneofs_by_name["event"].fields] == [
        "dialog_init", "segment_start", "segment_media", "segment_info", "segment_stop"]
    assert fields(pb.DialogInitEvent) == {"account": 1, "dialog": 2}
    assert fields(pb.Account) == {"id": 1, "sub_account_id": 2, "rc_account_id": 3}
    assert fields(pb.Dialog) == {"id": 1, "type": 2, "ani": 3, "dnis": 4, "language": 5, "attributes": 6}
    assert fields(pb.SegmentStartEvent) == {"segment_id": 1, "product": 2, "participant": 3, "audio_format": 4}
    assert fields(pb.Product) == {"id": 1, "type": 2}
    assert fields(pb.Participant) == {"id": 1, "type": 2, "name": 3}
    assert fields(pb.AudioFormat) == {"codec": 1, "rate": 2, "ptime": 3}
    assert fields(pb.SegmentMediaEvent) == {"segment_id": 1, "audio_content": 2}
    assert fields(pb.AudioContent) == {"payload": 1, "seq": 2, "duration": 3}
    assert fields(pb.SegmentInfoEvent) == {"segment_id": 1, "event": 2, "data": 3}
    assert fields(pb.SegmentStopEvent) == {"segment_id": 1}
    assert dict(pb.Codec.items()) == {"CODEC_UNSPECIFIED": 0, "OPUS": 1, "PCMA": 2, "PCMU": 3, "L16": 4, "FLAC": 5}
    assert dict(pb.ParticipantType.items()) == {"PARTICIPANT_TYPE_UNSPECIFIED": 0, "CONTACT": 1, "AGENT": 2, "BOT": 5}
    assert dict(pb.ProductType.items()) == {"PRODUCT_TYPE_UNSPECIFIED": 0, "QUEUE": 1, "CAMPAIGN": 2, "IVR": 3}
    assert dict(pb.DialogType.items()) == {"DIALOG_TYPE_UNSPECIFIED": 0, "INBOUND": 1, "OUTBOUND": 2}
    [method] = pb.DESCRIPTOR.services_by_name["Streaming"].methods
    assert (method.name, method.client_streaming, method.server_streaming) == ("Stream", True, False)
    assert method.output_type.full_name == "google.protobuf.Empty"


def test_proto_ships_as_package_data():
    """setup.cfg ships the .proto beside the generated modules."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    assert "grpcapi/*.proto" in cfg["options.package_data"]["evrecorder"]
    requires = cfg["options"]["install_requires"]
    assert "grpcio >=" in requires and "protobuf >=" in requires


