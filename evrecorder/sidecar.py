"""What both kinds of sidecar share: the schema, the time format, per-channel counts.

A WebSocket recording's sidecar counts per perspective (``perspectives``), a
gRPC recording's per segment (``segments``); :func:`channel_counts` gives the
archiver's log line and the metrics one view of either.
"""

from __future__ import annotations

import socket
from datetime import datetime, timezone

from evrecorder import __version__
from evrecorder.settings import ROLE_OF

SCHEMA = "evrecorder/1"
COUNTERS = ("frames", "missing", "duplicates", "reordered", "late")


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def closing_fields(header: dict, first_media_at: float | None, ended_at: float | None,
                   complete: bool, reason: str) -> dict:
    """The fields every sidecar ends with: timing, complete, endReason, recorder."""
    return {
        "timing": {
            "connectedAt": rfc3339(header.get("connectedAt")),
            "firstMediaAt": rfc3339(first_media_at),
            "endedAt": rfc3339(ended_at),
            "archivedAt": None,
        },
        "complete": complete,
        "endReason": reason,
        "recorder": {"version": __version__, "host": socket.gethostname()},
    }


def channel_counts(sidecar: dict) -> dict[str, dict[str, int]]:
    """``{"agent": {...}, "caller": {...}}``: frames (a gRPC recording's
    chunks), missing, duplicates, reordered and late, summed per channel."""
    out = {role: dict.fromkeys(COUNTERS, 0) for role in ("agent", "caller")}
    if "perspectives" in sidecar:
        for perspective, side in sidecar["perspectives"].items():
            counts = out[ROLE_OF.get(perspective, "caller")]
            for name in COUNTERS:
                counts[name] += side.get(name, 0)
    for segment in sidecar.get("segments", ()):
        counts = out["agent" if segment.get("channel") == "agent" else "caller"]
        counts["frames"] += segment.get("chunks", 0)
        for name in COUNTERS[1:]:
            counts[name] += segment.get(name, 0)
    return out
