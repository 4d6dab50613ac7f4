"""A JSON-lines log format for log shippers.

``twistd --logger evrecorder.logs.json_observer -n evrecorder ...`` writes one
JSON object a line to standard output: ``time`` (RFC 3339, UTC), ``level``,
``namespace``, ``text`` (the formatted message) and the event's own fields
that are plain values (``call_id``, ``session_id``, ``key``, ``reason``,
``code`` ...), so a shipper can index them without parsing the text.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import TextIO

from twisted.logger import FileLogObserver, formatEvent


def _as_json(event: dict) -> str:
    record = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), tz=timezone.utc)
        .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "text": formatEvent(event),
    }
    for name, value in event.items():
        if name.startswith("log_") or name in record or name.startswith("_"):
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            record[name] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False) + "\n"


def json_observer(out: TextIO | None = None) -> FileLogObserver:
    """The observer factory for ``twistd --logger``."""
    return FileLogObserver(out or sys.stdout, _as_json)
