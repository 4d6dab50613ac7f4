"""Logging: JSON lines and journald formats, and what keeps log lines safe and few.

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

Identifiers come from clients (a callId, an agentId, a query value) and may
hold control characters: a newline would forge a log line, ESC would drive
the operator's terminal.  :func:`escape_control_characters` adds an observer
to the global log publisher, ahead of the ones that write (the WebSocket
door adds it when it is made, before twistd adds its own observers), that
escapes them in every event's string fields as Python's ``repr`` would
(``\\n``, ``\\x00``, ``\\x1b``): whichever module logged the value, and
whichever observer writes the line (twistd's text, the JSON lines above).
A field then holds the escaped text in JSON too.

:class:`RateLimit` keeps a fault that repeats (a full spool disk, every read)
to one line a while, saying how many it stood for.  :func:`spool_problem`
says in words what an ``OSError`` of the spool means for an operator.
"""

from __future__ import annotations

import errno
import json
import re
import sys
from datetime import datetime, timezone
from typing import Hashable, TextIO

from twisted.logger import FileLogObserver, ILogObserver, LogLevel, LogPublisher, formatEvent
from zope.interface import provider


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


class RateLimit:
    """At most one log line per key every ``interval`` seconds.

    ``allow(key)`` returns None when the line is to be left out, else how
    many were left out for that key since the last one (to say so).  Keys
    not seen for an interval are forgotten, so the table stays small.
    """

    def __init__(self, clock, interval: float = 60.0):
        self._clock = clock
        self.interval = interval
        self._last: dict[Hashable, list] = {}  # key: [time of the last line, left out since]

    def allow(self, key: Hashable) -> int | None:
        now = self._clock.seconds()
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return None
        if len(self._last) > 1000:
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval}
        self._last[key] = [now, 0]
        return seen[1] if seen is not None else 0


_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def spool_problem(error: OSError) -> str:
    """What a failed spool write means, as the start of a sentence."""
    if error.errno in _FULL:
        return "the recorder's spool is full"
    if error.errno in _READ_ONLY:
        return "the recorder's spool is not writable"
    return "the recorder cannot write to its spool"


#: C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match) -> str:
    return repr(match.group())[1:-1]


def printable(text: str) -> str:
    """``text`` with its control characters escaped as ``repr`` would: one safe line."""
    return _CONTROL.sub(_escape, text) if _CONTROL.search(text) else text


@provider(ILogObserver)
def _escape_fields(event: dict) -> None:
    # In place: the observers after this one see the same event.  Twisted's
    # own keys (log_format, log_failure ...) are left alone.
    for name, value in event.items():
        if type(value) is str and not name.startswith("log_") and _CONTROL.search(value):
            event[name] = _CONTROL.sub(_escape, value)


_escaping: list[LogPublisher] = []


def escape_control_characters(publisher: LogPublisher | None = None) -> None:
    """Escape control characters in the string fields of every event of
    ``publisher`` (default: the global one) for the observers added after this."""
    if publisher is None:
        from twisted.logger import globalLogPublisher as publisher
    if any(p is publisher for p in _escaping):
        return
    publisher.addObserver(_escape_fields)
    _escaping.append(publisher)
