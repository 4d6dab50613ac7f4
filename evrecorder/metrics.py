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

    def track(self, frames: dict, nbytes: dict) -> None:
        """Count a call in progress: its frames and media bytes by perspective,
        two dicts its owner keeps adding to."""
        with self._lock:
            self._live[id(frames)] = (frames, nbytes)

    def fold(self, frames: dict, nbytes: dict) -> None:
        """The call counted by :meth:`track` ended: its counts join the totals."""
        with self._lock:
            if self._live.pop(id(frames), None) is None:
                return  # folded already (or never tracked)
            for perspective, n in frames.items():
                if n:
                    self.frames[perspective] += n
            for perspective, n in nbytes.items():
                if n:
                    self.media_bytes[perspective] += n

    def media_counts(self) -> tuple[Tally, Tally]:
        """Frames and media bytes by perspective: calls that ended and calls
        in progress."""
        with self._lock:
            frames, nbytes = Tally(self.frames), Tally(self.media_bytes)
            for live_frames, live_bytes in list(self._live.values()):
                # Copies first: the reactor thread adds to these meanwhile.
                frames.update(dict(live_frames))
                nbytes.update(dict(live_bytes))
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
        frames, media_bytes = m.media_counts()
        for name, doc, tally, label in (
            ("evrecorder_frames", "Media frames received.", frames, "perspective"),
            ("evrecorder_media_bytes", "Media bytes received (decoded).", media_bytes,
             "perspective"),
            ("evrecorder_rejected_handshakes", "Handshakes refused.", m.rejected, "reason"),
            ("evrecorder_bad_input_closes", "Sockets closed for bad input.", m.closed, "code"),
        ):
            family = CounterMetricFamily(name, doc, labels=[label])
            for value, n in sorted(tally.items()):
                family.add_metric([str(value)], n)
            yield family
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
            yield GaugeMetricFamily(name, _GAUGE_DOCS.get(name, name), value=read())


_GAUGE_DOCS = {
    "evrecorder_active_calls": "Calls in progress.",
    "evrecorder_active_sockets": "Open WebSocket connections.",
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
