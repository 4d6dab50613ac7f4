"""Shared fixtures: a real recorder service on a loopback port, audio readers."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import wave

import pytest
import pytest_twisted
from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(__file__))

from evrecorder.service import RecorderService  # noqa: E402
from evrecorder.settings import Settings  # noqa: E402
from evrecorder.stores import LocalStore  # noqa: E402


class Recorder:
    """A RecorderService started in this process on 127.0.0.1:<random port>."""

    def __init__(self, tmp_path, store=None, metrics=False,
                 listen="tcp:0:interface=127.0.0.1", grpc_listen=None, **settings):
        from twisted.internet import reactor

        self.reactor = reactor
        self.archive = str(tmp_path / "recordings")
        settings.setdefault("spool", str(tmp_path / "spool"))
        settings.setdefault("drain_timeout", 1.0)  # tests end with calls still open
        self.settings = Settings(archive=self.archive, **settings)
        self.store = store or LocalStore(self.archive)
        self.service = RecorderService(self.settings, self.store, reactor)
        self._listener = self.service.add_listener(listen)
        self.port: int | None = None
        self._metrics = self.service.add_metrics_listener("tcp:0:interface=127.0.0.1") if metrics else None
        # grpc_listen: an endpoint string ("tcp:0:interface=127.0.0.1", an ssl: one), or True.
        if grpc_listen is True:
            grpc_listen = "tcp:0:interface=127.0.0.1"
        if grpc_listen:
            self.service.add_grpc_listener(grpc_listen)
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None

    async def start(self) -> "Recorder":
        self.service.startService()
        port = await self._listener._waitingForPort
        self.port = port.getHost().port
        if self._metrics is not None:
            self.metrics_port = (await self._metrics._waitingForPort).getHost().port
        if self.service.grpc is not None:
            self.grpc_port = self.service.grpc.ports[0]
        return self

    async def http_get(self, path: str) -> tuple[int, str]:
        from twisted.web.client import Agent, readBody

        response = await Agent(self.reactor).request(
            b"GET", f"http://127.0.0.1:{self.metrics_port}{path}".encode()
        )
        return response.code, (await readBody(response)).decode()

    async def stop(self) -> None:
        if self.service.running:
            await defer.maybeDeferred(self.service.stopService)

    async def archived(self, count: int = 1, timeout: float = 10.0) -> list[dict]:
        """Wait until ``count`` sidecars are in the archive; return them (by key)."""
        deadline = self.reactor.seconds() + timeout
        while True:
            found = sorted(glob.glob(os.path.join(self.archive, "**", "*.json"), recursive=True))
            if len(found) >= count:
                out = []
                for path in found:
                    with open(path, encoding="utf-8") as f:
                        sidecar = json.load(f)
                    sidecar["_wav"] = path[: -len(".json")] + ".wav"
                    out.append(sidecar)
                return out
            if self.reactor.seconds() > deadline:
                raise AssertionError(f"{len(found)} recordings archived, expected {count}")
            await task.deferLater(self.reactor, 0.02, lambda: None)


@pytest_twisted.async_yield_fixture
async def recorder_factory(tmp_path):
    """Start recorders with settings; all are stopped at the end of the test."""
    started: list[Recorder] = []

    async def make(store=None, subdir="r", metrics=False, listen="tcp:0:interface=127.0.0.1",
                   grpc_listen=None, **settings) -> Recorder:
        path = tmp_path / subdir
        path.mkdir(exist_ok=True)
        rec = await Recorder(path, store=store, metrics=metrics, listen=listen,
                             grpc_listen=grpc_listen, **settings).start()
        started.append(rec)
        return rec

    yield make
    for rec in started:
        await rec.stop()


@pytest_twisted.async_yield_fixture
async def recorder(recorder_factory):
    """One recorder on its defaults (local archive, no secret)."""
    yield await recorder_factory()


# -- audio -----------------------------------------------------------------

def independent_decode(ulaw: bytes) -> list[int]:
    """mu-law to linear samples, not with evrecorder's code: audioop or sox."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import audioop  # Python <= 3.12
        pcm = audioop.ulaw2lin(ulaw, 2)
    except ImportError:
        pcm = subprocess.run(
            ["sox", "-t", "ul", "-r", "8000", "-c", "1", "-", "-t", "s16", "-e", "signed",
             "-L", "-"],
            input=ulaw, capture_output=True, check=True,
        ).stdout
    import array

    samples = array.array("h")
    samples.frombytes(pcm)
    return list(samples)


def read_pcm16_wav(path: str) -> tuple[list[int], list[int]]:
    """Left and right samples of a PCM16 stereo WAV, read with the stdlib."""
    import array

    with wave.open(path, "rb") as w:
        assert w.getnchannels() == 2
        assert w.getframerate() == 8000
        assert w.getsampwidth() == 2
        data = w.readframes(w.getnframes())
    samples = array.array("h")
    samples.frombytes(data)
    return list(samples[0::2]), list(samples[1::2])


def read_mulaw_wav(path: str) -> tuple[list[int], list[int], bytes]:
    """A tag-7 WAV as sox decodes it (left, right samples) and its raw data chunk."""
    import array
    import struct

    info = subprocess.run(["soxi", path], capture_output=True, text=True, check=True).stdout
    assert "Channels       : 2" in info and "Sample Rate    : 8000" in info, info
    assert "u-law" in info, info
    pcm = subprocess.run(
        ["sox", path, "-t", "s16", "-e", "signed", "-L", "-"], capture_output=True, check=True
    ).stdout
    samples = array.array("h")
    samples.frombytes(pcm)
    with open(path, "rb") as f:
        data = f.read()
    pos, raw = 12, None
    while pos + 8 <= len(data):
        cid, size = struct.unpack_from("<4sI", data, pos)
        if cid == b"data":
            raw = data[pos + 8 : pos + 8 + size]
        pos += 8 + size + (size & 1)
    return list(samples[0::2]), list(samples[1::2]), raw
