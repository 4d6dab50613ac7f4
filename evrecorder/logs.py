"""Log formats: JSON lines for log shippers, and journald's priority prefix.

``twistd --logger evrecorder.logs.json_observer -n evrecorder ...`` writes one
JSON object a line to standard output: ``time`` (RFC 3339, UTC), ``level``,
``namespace``, ``text`` (the formatted message) and the event's own fields
that are plain values (``call_id``, ``session_id``, ``key``, ``reason``,
``code`` ...), so a shipper can index them without parsing the text.

``twistd --logger evrecorder.logs.journald_observer -n evrecorder ...`` (what
the systemd units run) writes each line with the ``<N>`` syslog priority
prefix that journald reads from a service's standard output: warnings and
errors reach the journal with their priority, so ``journalctl -p warning``
finds them.  The journal stamps the time itself.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import TextIO

from twisted.logger import FileLogObserver, LogLevel, formatEvent


def _as_json(event: dict) -> str:
    record = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), tz=timezone.utc)
        .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "text": formatEvent(event),
    }
    if not record["text"] and event.get("log_failure") is None:
        return ""  # an event with nothing to say (see service._quietly)
    for name, value in event.items():
        if name.startswith("log_") or name in record or name.startswith("_"):
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            record[name] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False) + "\n"


#: syslog priorities (RFC 5424) by Twisted log level.
PRIORITY = {
    LogLevel.critical: 2,
    LogLevel.error: 3,
    LogLevel.warn: 4,
    LogLevel.info: 6,
    LogLevel.debug: 7,
}


def _as_journal(event: dict) -> str:
    level = event.get("log_level", LogLevel.info)
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}".strip("\n")
    if not text:
        return ""  # an event with nothing to say (see service._quietly)
    system = event.get("log_system")  # as twistd's own format: legacy lines say "-"
    if system is None:
        system = "{}#{}".format(event.get("log_namespace", "-"), getattr(level, "name", "info"))
    prefix = f"<{PRIORITY.get(level, 6)}>[{system}] "
    # journald takes the prefix per line: a traceback's lines keep the priority.
    return "".join(prefix + line + "\n" for line in text.splitlines())


def journald_observer(out: TextIO | None = None) -> FileLogObserver:
    """The observer factory for ``twistd --logger`` under systemd."""
    return FileLogObserver(out or sys.stdout, _as_journal)


def json_observer(out: TextIO | None = None) -> FileLogObserver:
    """The observer factory for ``twistd --logger``."""
    return FileLogObserver(out or sys.stdout, _as_json)
