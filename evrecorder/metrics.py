"""Metrics and health: ``/metrics`` (Prometheus text), ``/healthz``, ``/readyz``.

Counting on the per-message path is plain integer arithmetic on
:class:`Metrics`, or, for media frames and bytes, on the call itself: each
call in progress keeps its own counts (:meth:`Metrics.track`), which are
added to the totals when it ends (:meth:`Metrics.fold`) and, while it runs,
at every scrape.  A custom collector turns those integers into metric
families when Prometheus scrapes.  The scrape runs in a thread of the
reactor's pool: a lock makes "totals plus calls in progress" one snapshot,
so the counters never step back while a call is being folded.  Rare events (archives, failures, upload
latency) use prometheus_client's own Counter and Histogram.  Each recorder has
its own ``CollectorRegistry``, so several in one process (tests) don't collide.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource

from evrecorder.settings import PERSPECTIVE_OF
from evrecorder.sidecar import channel_counts

PLACEMENT_COUNTERS = ("missing", "duplicates", "reordered", "late")
GRPC_CHANNELS = frozenset(("agent", "caller"))
DOORS = ("websocket", "grpc")


class Metrics:
    """What the recorder counts.  ``gauges`` are read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Frames and bytes of calls that ended; :meth:`media_counts` adds
        # those of calls in progress.
        self.frames: Tally = Tally()
        self.media_bytes: Tally = Tally()
        self._live: dict[int, tuple[dict, dict]] = {}  # id -> (frames, bytes) by perspective
        self._lock = threading.Lock()
        self.placement: Tally = Tally()  # (counter, perspective) -> n, from finalized calls
        self.rejected: Tally = Tally()  # handshake refusals by reason
        self.closed: Tally = Tally()  # sockets closed for bad input, by close code
        # The gRPC door's: streams refused before any event (secret, draining),
        # streams ended for bad input or our fault (by status name), streams opened.
        self.grpc_rejected: Tally = Tally()
        self.grpc_closed: Tally = Tally()
        self.grpc_streams = 0
        self.gauges: dict[str, Callable[[], float]] = {}
        self.relayed = 0  # sockets relayed to the sibling process that records their call
        self.archived = Counter(
            "evrecorder_calls_archived", "Calls published to the archive.", ["end_reason"],
            registry=self.registry,
        )
        self.archive_failures = Counter(
            "evrecorder_archive_failures", "Failed publish attempts (each is retried).",
            registry=self.registry,
        )
        self.finalize_failures = Counter(
            "evrecorder_finalize_set_aside",
            "Spool entries that failed to finalize repeatedly and wait for the next start.",
            registry=self.registry,
        )
        self.upload_seconds = Histogram(
            "evrecorder_upload_seconds", "Time to publish one recording (WAV and sidecar).",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.registry.register(_Collector(self))

    def track(self, frames: dict, nbytes: dict, door: str | None = None) -> None:
        """Count a call in progress: its frames (or chunks) and media bytes by
        perspective (or channel), two dicts its owner keeps adding to.  The
        door is told by the labels when not given: a WebSocket call counts by
        perspective, a gRPC dialog by channel."""
        if door is None:
            door = "grpc" if set(frames) <= GRPC_CHANNELS else "websocket"
        with self._lock:
            self._live[id(frames)] = (frames, nbytes, door)

    def fold(self, frames: dict, nbytes: dict) -> None:
        """The call counted by :meth:`track` ended: its counts join the totals."""
        with self._lock:
            live = self._live.pop(id(frames), None)
            if live is None:
                return  # folded already (or never tracked)
            door = live[2]
            for perspective, n in frames.items():
                if n:
                    self.frames[(door, perspective)] += n
            for perspective, n in nbytes.items():
                if n:
                    self.media_bytes[(door, perspective)] += n

    def media_counts(self) -> tuple[Tally, Tally]:
        """Frames and media bytes by perspective (WebSocket) or channel (gRPC):
        calls that ended and calls in progress."""
        frames, nbytes = self.media_counts_by_door()
        by_label: tuple[Tally, Tally] = (Tally(), Tally())
        for tally, out in ((frames, by_label[0]), (nbytes, by_label[1])):
            for (_, label), n in tally.items():
                out[label] += n
        return by_label

    def media_counts_by_door(self) -> tuple[Tally, Tally]:
        """Frames and media bytes by (door, perspective or channel): calls that
        ended and calls in progress."""
        with self._lock:
            frames, nbytes = Tally(self.frames), Tally(self.media_bytes)
            for live_frames, live_bytes, door in list(self._live.values()):
                # Copies first: the reactor thread adds to these meanwhile.
                frames.update({(door, k): n for k, n in dict(live_frames).items()})
                nbytes.update({(door, k): n for k, n in dict(live_bytes).items()})
        return +frames, +nbytes

    def call_finalized(self, sidecar: dict) -> None:
        # Per channel, labelled with the WebSocket perspective it is (a gRPC
        # recording's segments are summed per channel).
        for channel, side in channel_counts(sidecar).items():
            for name in PLACEMENT_COUNTERS:
                self.placement[(name, PERSPECTIVE_OF[channel])] += side[name]


class _Collector:
    def __init__(self, metrics: Metrics):
        self._m = metrics

    def collect(self):
        m = self._m
        frames, media_bytes = m.media_counts_by_door()
        # Every family that both doors feed has a ``door`` label; the names are
        # the WebSocket door's (for gRPC: frames are chunks, perspectives are
        # channels, handshakes are streams, close codes are status names).
        for name, doc, tally, label in (
            ("evrecorder_frames", "Media frames (gRPC: chunks) received.", frames, "perspective"),
            ("evrecorder_media_bytes", "Media bytes received (decoded).", media_bytes,
             "perspective"),
        ):
            family = CounterMetricFamily(name, doc, labels=["door", label])
            for (door, value), n in sorted(tally.items()):
                family.add_metric([door, str(value)], n)
            yield family
        for name, doc, by_door, label in (
            ("evrecorder_rejected_handshakes",
             "Handshakes (gRPC: streams) refused before any event, by reason.",
             (("websocket", m.rejected), ("grpc", m.grpc_rejected)), "reason"),
            ("evrecorder_bad_input_closes",
             "Sockets (gRPC: streams) closed for bad input or our fault, by close code "
             "(gRPC: status).", (("websocket", m.closed), ("grpc", m.grpc_closed)), "code"),
        ):
            family = CounterMetricFamily(name, doc, labels=["door", label])
            for door, tally in by_door:
                for value, n in sorted(dict(tally).items()):
                    family.add_metric([door, str(value)], n)
            yield family
        yield CounterMetricFamily(
            "evrecorder_grpc_streams", "gRPC streams accepted (past the secret and draining).",
            value=m.grpc_streams,
        )
        family = CounterMetricFamily(
            "evrecorder_placement_frames",
            "Reorder outcomes in finalized calls: missing (silence), duplicates, reordered, late.",
            labels=["counter", "perspective"],
        )
        for (name, perspective), n in sorted(m.placement.items()):
            family.add_metric([name, perspective], n)
        yield family
        yield CounterMetricFamily(
            "evrecorder_relayed_sockets",
            "Sockets whose call a sibling process records (relayed to it).", value=m.relayed,
        )
        for name, read in sorted(m.gauges.items()):
            value = read()
            if isinstance(value, dict):  # by door
                family = GaugeMetricFamily(name, _GAUGE_DOCS.get(name, name), labels=["door"])
                for door, n in sorted(value.items()):
                    family.add_metric([door], n)
                yield family
            else:
                yield GaugeMetricFamily(name, _GAUGE_DOCS.get(name, name), value=value)


_GAUGE_DOCS = {
    "evrecorder_active_calls": "Calls (gRPC: dialogs) in progress, by door.",
    "evrecorder_active_sockets": "Open WebSocket connections (gRPC: streams), by door.",
    "evrecorder_upload_queue_depth": "Finished calls not yet confirmed by the archive.",
    "evrecorder_upload_oldest_age_seconds": "Age of the oldest unconfirmed finished call.",
    "evrecorder_draining": "1 while the recorder drains for shutdown.",
}


class _Text(Resource):
    isLeaf = True

    def __init__(self, check: Callable[[], str | None]):
        super().__init__()
        self._check = check

    def render_GET(self, request):
        problem = self._check()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if problem:
            request.setResponseCode(503)
            return (problem + "\n").encode()
        return b"ok\n"


def site_root(metrics: Metrics, not_ready: Callable[[], str | None]) -> Resource:
    """``/metrics``, ``/healthz`` (the process answers) and ``/readyz``."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=metrics.registry))
    root.putChild(b"healthz", _Text(lambda: None))
    root.putChild(b"readyz", _Text(not_ready))
    return root
