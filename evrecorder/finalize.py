"""Finalizing a spooled call: the stereo WAV and its sidecar.

Runs in a worker thread (it reads and writes whole files), on a call whose
spool nobody appends to any more: one that ended, or one left by a crash.
A gRPC dialog's entry (``"source": "grpc"`` in ``call.json``) goes to
:mod:`evrecorder.assemble`; what follows is a WebSocket call's.

1. ``call.frames`` (both perspectives, arrival order) is cut into one
   scratch file per perspective, ``<Perspective>.split``
   (:func:`~evrecorder.framefile.split`), in the per-perspective format that
   versions before ``call.frames`` wrote as ``<Perspective>.frames``.
   Each perspective's frames (those of an older version's
   ``<Perspective>.frames`` first, if any, then its ``.split`` file) go
   through the reorder window (:class:`~evrecorder.placement.Placer`) into a
   raw mu-law timeline.  The files are read in runs of contiguous ids
   (:func:`~evrecorder.framefile.read_runs`), which the placer writes as
   blocks; frames out of order go through it one at a time.
2. The two timelines, each shifted by its perspective's start offset and
   padded at the end with silence, are interleaved into ``recording.wav``.
3. ``sidecar.json`` (without ``archivedAt``, which the upload adds) is
   written last, atomically: from then on the call is an upload-queue entry
   and the frame files are deleted.

Scratch files are never fsynced: ``call.frames`` stays until the sidecar is
in place, so a crash before then just finalizes again (they are rewritten).
"""

from __future__ import annotations

import hashlib
import itertools
import os

from evrecorder import keys, wav
from evrecorder.assemble import SOURCE as GRPC_SOURCE
from evrecorder.assemble import finalize_grpc
from evrecorder.framefile import read_runs, split
from evrecorder.placement import FRAME_BYTES, SHORT_RUN, PerspectiveStats, Placer
from evrecorder.settings import FRAMES_PER_SECOND, PERSPECTIVE_OF, PERSPECTIVES, ROLE_OF, Settings
from evrecorder.sidecar import SCHEMA, closing_fields, rfc3339  # noqa: F401 (the archiver imports them here)
from evrecorder.spool import (
    CALL_FRAMES_FILE,
    FRAMES_SUFFIX,
    SIDECAR_FILE,
    WAV_FILE,
    CallSpool,
    write_json_atomic,
)

PLACED_SUFFIX = ".placed"
SPLIT_SUFFIX = ".split"
SCRATCH_SUFFIXES = (PLACED_SUFFIX, SPLIT_SUFFIX)


class _Within:
    """Runs of frames whose ids lie within ``span`` of the perspective's first.

    The live side refuses any other frame (:meth:`evrecorder.call.Call.media`),
    so only a damaged file holds one: a record whose id was corrupted would
    otherwise have the placer fill the gap to it with silence, up to a full
    disk.  Such frames are dropped and counted (``dropped``).  The range is an
    interval, so what a contiguous run keeps is one contiguous run.
    """

    def __init__(self, runs, first: int | None, span: int):
        self._runs = runs
        self._first = first
        self._span = span
        self.dropped = 0

    def __iter__(self):
        for first, size, payloads in self._runs:
            if self._first is None:
                self._first = first
            lo, hi = self._first - self._span, self._first + self._span
            last = first + len(payloads) - 1
            if lo <= first and last <= hi:
                yield first, size, payloads
                continue
            start, stop = max(first, lo), min(last, hi) + 1
            kept = payloads[start - first : stop - first] if start < stop else []
            self.dropped += len(payloads) - len(kept)
            if kept:
                yield start, size, kept


def _place(
    entry: CallSpool, perspective: str, window: int, mark: int | None, span: int
) -> tuple[str, PerspectiveStats]:
    """The perspective's timeline into ``<Perspective>.placed``; its path and counters.

    The frames are those of ``<Perspective>.frames`` (an older version's),
    then those of ``<Perspective>.split`` (cut from ``call.frames``), which
    is removed once read.
    """
    path = os.path.join(entry.path, perspective + PLACED_SUFFIX)
    old = os.path.join(entry.path, perspective + FRAMES_SUFFIX)
    cut = os.path.join(entry.path, perspective + SPLIT_SUFFIX)
    runs = _Within(itertools.chain(read_runs(old), read_runs(cut)), mark, span)
    with open(path, "wb") as out:
        placer = Placer(window, out.write, mark=mark)
        add, add_run = placer.add, placer.add_run
        for first, size, payloads in runs:
            if len(payloads) >= SHORT_RUN:
                add_run(first, payloads, size)
                continue
            for payload in payloads:  # frames out of order, repeats: one at a time
                add(first, payload)
                first += 1
        stats = placer.finish()
    stats.out_of_range = runs.dropped
    if os.path.exists(cut):
        os.unlink(cut)
    return path, stats


def _split(entry: CallSpool) -> None:
    """``call.frames`` cut into ``<Perspective>.split`` files, if there is one."""
    source = os.path.join(entry.path, CALL_FRAMES_FILE)
    if not os.path.exists(source):
        return  # an older version's entry, or a call without media
    outputs = []
    try:
        for perspective in PERSPECTIVES:
            outputs.append(open(os.path.join(entry.path, perspective + SPLIT_SUFFIX), "wb"))
        split(source, outputs)
    finally:
        for out in outputs:
            out.close()


def finalize(
    entry: CallSpool,
    settings: Settings,
) -> dict:
    """Write ``recording.wav`` and ``sidecar.json`` for a spooled call.

    A call that recorded its end keeps that reason; one left by a crash
    before its end is "recovered" and incomplete.  Returns the sidecar
    (without ``archivedAt``).  A gRPC recording (``"source": "grpc"`` in
    its header) is :func:`evrecorder.assemble.finalize_grpc`'s; a header
    without ``source`` is a WebSocket call's, as every older spool's.
    """
    header = entry.read_header()
    if header.get("source") == GRPC_SOURCE:
        return finalize_grpc(entry, settings)
    events = entry.read_events()
    starts: dict[str, tuple[int, int | None]] = {}  # offset in frames, first id to arrive
    stops: dict[str, dict | None] = {}
    first_media_at = None
    end_event = None
    for ev in events:
        kind = ev.get("event")
        if kind == "media":
            starts.setdefault(
                ev["perspective"], (int(ev.get("offsetFrames", 0)), ev.get("firstSequenceId"))
            )
            at = ev.get("at")
            # The earliest read, not the first written: a frame relayed by a
            # sibling process may be read first and handled second.
            if at is not None and (first_media_at is None or at < first_media_at):
                first_media_at = at
        elif kind == "stop" and ev.get("perspective") in PERSPECTIVES:
            stops.setdefault(ev["perspective"], ev.get("metadata"))
        elif kind == "end":
            end_event = ev

    if end_event is not None:
        reason, complete, ended_at = end_event["reason"], bool(end_event["complete"]), end_event["at"]
    else:
        # Left by a crash: it ended with the last thing it wrote.
        reason, complete = "recovered", False
        ended_at = max(
            [ev.get("at", 0) for ev in events]
            + [header.get("createdAt", 0)]
            + [
                os.path.getmtime(os.path.join(entry.path, n))
                for n in os.listdir(entry.path)
                # Not the scratch files of a finalize a crash interrupted.
                if not n.endswith(SCRATCH_SUFFIXES)
            ]
        )

    # The arrival offset belongs to the first frame to *arrive*; the timeline
    # starts at the lowest id of the first window, which may be earlier: the
    # placer marks where the first-arrived frame landed.
    _split(entry)
    placed = {
        p: _place(entry, p, settings.reorder_window, starts.get(p, (0, None))[1],
                  int(settings.max_duration_for(header) * FRAMES_PER_SECOND)
                  + settings.reorder_window)
        for p in PERSPECTIVES
    }
    begin = {}
    for perspective, (_, stats) in placed.items():
        if stats.samples:
            offset_frames = starts.get(perspective, (0, None))[0]
            begin[perspective] = offset_frames * FRAME_BYTES - (stats.mark_position or 0)
    shift = min(begin.values(), default=0)  # the earliest audio is sample 0
    channels = {}
    perspectives = {}
    for perspective, (path, stats) in placed.items():
        offset = begin[perspective] - shift if perspective in begin else 0
        channels[perspective] = wav.Channel(path, offset, stats.samples)
        perspectives[perspective] = dict(
            stats.as_dict(),
            role=ROLE_OF[perspective],
            offsetSamples=offset,
            stop=stops.get(perspective),
        )

    left = channels[PERSPECTIVE_OF[settings.channel_map[0]]]
    right = channels[PERSPECTIVE_OF[settings.channel_map[1]]]
    digest = hashlib.sha256()
    wav_path = os.path.join(entry.path, WAV_FILE)
    tmp = wav_path + ".tmp"
    try:
        with open(tmp, "wb") as out:
            size = wav.write_stereo(out, settings.format, left, right, digest.update)
            out.flush()
            os.fsync(out.fileno())
    finally:
        left.close()
        right.close()
    os.replace(tmp, wav_path)
    samples = max(left.end, right.end)

    start = first_media_at if first_media_at is not None else header["connectedAt"]
    fields = keys.key_fields(header.get("metadata") or {}, header.get("query") or {}, start)
    # The ids the call was keyed by, wherever they came from (metadata or query).
    fields.update(callId=header["callId"], sessionId=header["sessionId"])
    key = keys.format_key(settings.key_template, fields)
    sidecar = {
        "schema": SCHEMA,
        "source": "websocket",
        "callId": header["callId"],
        "sessionId": header["sessionId"],
        "key": key,
        "metadata": header.get("metadata"),
        "query": header.get("query"),
        "audio": {
            "encoding": settings.format,
            "sampleRateHertz": wav.SAMPLE_RATE,
            "channels": 2,
            "channelMap": list(settings.channel_map),
            "durationSeconds": samples / wav.SAMPLE_RATE,
            "bytes": size,
            "sha256": digest.hexdigest(),
        },
        "perspectives": perspectives,
        **closing_fields(header, first_media_at, ended_at, complete, reason),
    }
    write_json_atomic(os.path.join(entry.path, SIDECAR_FILE), sidecar)
    # The WAV and sidecar now carry everything: drop the working files.
    for name in os.listdir(entry.path):
        if name.endswith((FRAMES_SUFFIX, *SCRATCH_SUFFIXES)):  # call.frames too
            os.unlink(os.path.join(entry.path, name))
    return sidecar
