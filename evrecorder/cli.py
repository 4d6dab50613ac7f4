"""``evrecorder``: check the archive and the spool from a shell.

Subcommands (``evrecorder COMMAND --help`` for each):

``verify ARCHIVE``
    checks every recording (:mod:`evrecorder.audit`); exit status 0 only when
    every one verifies, 1 when one does not, 2 when the archive cannot be read.
``ls ARCHIVE``
    the recordings as a table, newest first.
``spool [DIR]``
    what waits in the spool; ``--retry NAME`` asks a running recorder to try
    a set-aside entry again.

The archive is a directory, ``file:///dir`` or ``s3://bucket/prefix``, with the
service's S3 options (``--s3-endpoint-url``, ``--s3-region``) and the standard
AWS credential chain.  ``--json`` gives machine-readable output; for ``verify``
it is JSON Lines: one object a recording (``"type": "recording"``) as it is
checked, then one ``"type": "summary"``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, TextIO

from botocore.exceptions import BotoCoreError, ClientError

from evrecorder import audit

#: Errors of listing or reading an archive (each recording's own are findings).
_READ_ERRORS = (OSError, BotoCoreError, ClientError)

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


def _add_archive(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", metavar="ARCHIVE",
                        help="s3://bucket/prefix, file:///dir or a directory")
    parser.add_argument("--s3-endpoint-url", metavar="URL",
                        help="S3-compatible endpoint; AWS when unset")
    parser.add_argument("--s3-region", metavar="REGION", help="S3 region")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--workers", type=_positive_int, default=4, metavar="N",
                        help="objects read at once (default 4)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evrecorder", description="Check evrecorder's archive and spool.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = sub.add_parser(
        "verify", help="check every recording of an archive",
        description="Check every recording: WAV and sidecar present, size and SHA-256 as the "
                    "sidecar says (on S3 also the stored checksum and metadata), a valid WAV "
                    "header of the right duration. Exit 0 only when all verify.")
    _add_archive(verify)
    verify.add_argument("--since", metavar="WHEN",
                        help="only recordings written to the archive since WHEN: 2026-11-24, "
                             "2026-11-24T08:00:00Z, or an age such as 36h or 2d")
    verify.add_argument("--expect-retention-days", type=_positive_int, metavar="N",
                        help="fail recordings whose objects are retained (S3 Object Lock) for "
                             "less than N days from the call's start")
    verify.add_argument("--publish-grace", type=float, default=audit.PUBLISH_GRACE,
                        metavar="S",
                        help="a WAV without its sidecar younger than S seconds may be a publish "
                             "under way: reported, not failed (default 900)")
    verify.add_argument("--verbose", "-v", action="store_true",
                        help="a line for every recording, with its retention")
    verify.add_argument("--no-progress", action="store_true",
                        help="no progress bar, even on a terminal")

    ls = sub.add_parser("ls", help="list recordings, newest first",
                        description="List the recordings of an archive, newest first.")
    _add_archive(ls)
    ls.add_argument("--since", metavar="WHEN", help="calls that started at or after WHEN")
    ls.add_argument("--until", metavar="WHEN", help="calls that started before WHEN")
    ls.add_argument("--call-id", help="only this callId")
    ls.add_argument("--agent-id", help="only this agent")
    ls.add_argument("--incomplete", action="store_true", help="only incomplete recordings")

    spool = sub.add_parser(
        "spool", help="what waits in the spool",
        description="Show calls in progress, recordings waiting for the archive, and entries "
                    "set aside. --retry NAME asks a running recorder to try a set-aside entry "
                    "again, by writing <spool>/retry/NAME.")
    spool.add_argument("spool", metavar="DIR", nargs="?", default="./spool",
                       help="the recorder's --spool (default ./spool)")
    spool.add_argument("--json", action="store_true", help="machine-readable output")
    spool.add_argument("--retry", metavar="NAME", help="ask for a set-aside entry to be retried")
    return parser


def main(argv: list[str] | None = None, now=time.time, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        if args.command == "spool":
            return _spool(args, now(), out)
        archive = _open(args)
        if args.command == "verify":
            return _verify(args, archive, now(), out, err)
        return _ls(args, archive, now(), out)
    except _Refused as e:
        print(f"evrecorder {args.command}: {e}", file=err)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `evrecorder ls ... | head`
        return EXIT_OK


#: Keys of incomplete recordings listed per endReason (the rest are counted).
INCOMPLETE_SHOWN = 20


class _Refused(Exception):
    """A sentence for stderr, then exit status 2."""


def _open(args) -> Any:
    from evrecorder.stores import StoreError

    options = {}
    if args.archive.startswith("s3:"):
        # max_concurrency sizes the client's connection pool (4 a worker).
        options = {"endpoint_url": args.s3_endpoint_url, "region": args.s3_region,
                   "max_concurrency": args.workers}
    try:
        archive = audit.open_archive(args.archive, **options)
    except ValueError as e:
        raise _Refused(f"{e}.") from None
    try:
        archive.check()
    except (StoreError, OSError) as e:
        raise _Refused(f"the archive {archive.describe()} cannot be read: {e}.") from None
    return archive


def _when(option: str, text: str | None, now: float) -> float | None:
    if text is None:
        return None
    try:
        return audit.parse_when(text, now)
    except ValueError as e:
        raise _Refused(f"--{option}: {e}.") from None


# -- verify ---------------------------------------------------------------------


class Progress:
    """A one-line bar on a terminal (stderr); silent otherwise."""

    def __init__(self, stream: TextIO, total_bytes: int, total: int):
        self._stream = stream
        self._total_bytes = max(total_bytes, 1)
        self._total = total
        self._done = 0
        self._bytes = 0
        self._shown = 0.0

    def step(self, nbytes: int, clock=time.monotonic) -> None:
        self._done += 1
        self._bytes += nbytes
        t = clock()
        if t - self._shown < 0.2 and self._done < self._total:
            return
        self._shown = t
        share = min(1.0, self._bytes / self._total_bytes)
        bar = "#" * int(share * 30)
        self._stream.write(
            f"\r[{bar:<30}] {share * 100:3.0f}%  {self._done}/{self._total} recordings, "
            f"{_size(self._bytes)} of {_size(self._total_bytes)}  "
        )
        self._stream.flush()

    def finish(self) -> None:
        self._stream.write("\r" + " " * 78 + "\r")
        self._stream.flush()


def _selected(archive, since: float | None):
    pairs = audit.pairs(archive.list())
    if since is None:
        return pairs
    return (p for p in pairs if p.modified >= since)


def _verify(args, archive, now: float, out: TextIO, err: TextIO) -> int:
    since = _when("since", args.since, now)
    progress = None
    if not args.no_progress and err.isatty():
        # A first listing (cheap: names and sizes) gives the bar its total.
        total = total_bytes = 0
        for pair in _selected(archive, since):
            total += 1
            total_bytes += pair.wav.size if pair.wav else 0
        progress = Progress(err, total_bytes, total)
    summary = audit.Summary()
    failed: list[audit.Result] = []
    incomplete: dict[str, list[str]] = {}

    def check(pair):
        return audit.verify_recording(archive, pair, now, args.expect_retention_days,
                                      args.publish_grace)

    try:
        for result in audit.run_bounded(_selected(archive, since), check, args.workers):
            summary.add(result)
            if progress:
                progress.step(result.wav_bytes)
            if args.json:
                out.write(json.dumps(dict(type="recording", **result.as_dict())) + "\n")
                continue
            if result.status != "ok":
                failed.append(result)
            if result.summary.get("complete") is False:
                # A few keys per endReason for the report; the summary counts them all.
                keys = incomplete.setdefault(str(result.summary.get("endReason")), [])
                if len(keys) < INCOMPLETE_SHOWN:
                    keys.append(result.key)
            if args.verbose:
                out.write(_result_line(result) + "\n")
    except BrokenPipeError:
        raise
    except _READ_ERRORS as e:  # the listing itself failed (network, permissions)
        if progress:
            progress.finish()
        raise _Refused(f"listing {archive.describe()} failed: {audit._sentence(e)}.") from None
    if progress:
        progress.finish()
    if args.json:
        out.write(json.dumps(dict(type="summary", archive=archive.describe(),
                                  **summary.as_dict())) + "\n")
    else:
        _print_report(out, archive, args, summary, failed, incomplete)
    return EXIT_OK if summary.ok else EXIT_FAILED


def _result_line(r: audit.Result) -> str:
    retention = "; ".join(
        f"{which} {info.get('mode') or 'no retention'}"
        + (f" until {info['retainUntil']}" if info.get("retainUntil") else "")
        + (" legal hold" if info.get("legalHold") == "ON" else "")
        for which, info in sorted(r.retention.items())
    )
    text = f"{r.status.upper():<10} {r.key}"
    if retention:
        text += f"  [{retention}]"
    return text


def _print_report(out, archive, args, summary: audit.Summary, failed, incomplete) -> None:
    for r in failed:
        label = "PUBLISHING" if r.status == "publishing" else "FAILED"
        for problem in r.problems:
            out.write(f"{label:<10} {r.key}: {problem}\n")
    if incomplete:
        out.write("\nIncomplete recordings, by endReason:\n")
        for reason, keys in sorted(incomplete.items()):
            count = summary.incomplete.get(reason, len(keys))
            out.write(f"  {reason} ({count}): {', '.join(keys)}"
                      + (" ..." if count > len(keys) else "") + "\n")
    s = summary
    rows = [
        ("archive", archive.describe() + (f" (since {args.since})" if args.since else "")),
        ("recordings", s.recordings),
        ("verified", s.verified),
        ("failed", s.failed),
        ("WAV without sidecar", s.wav_without_sidecar),
        ("sidecar without WAV", s.sidecar_without_wav),
        ("publishing now", s.publishing),
        ("incomplete", f"{sum(s.incomplete.values())}"
         + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(s.incomplete.items())) + ")"
            if s.incomplete else "")),
        ("audio", _size(s.bytes)),
    ]
    if s.retention_modes:
        rows.append(("retention (objects)",
                     ", ".join(f"{k} {v}" for k, v in sorted(s.retention_modes.items()))))
        rows.append(("legal holds", s.legal_holds))
        rows.append(("earliest retain-until", s.earliest_retain_until or "-"))
    out.write("\n")
    for name, value in rows:
        out.write(f"{name:<22} {value}\n")
    out.write(("OK: every recording verifies.\n" if s.ok
               else f"NOT OK: {s.failed} recording(s) do not verify.\n"))


# -- ls ---------------------------------------------------------------------------


def _ls(args, archive, now: float, out: TextIO) -> int:
    since = _when("since", args.since, now)
    until = _when("until", args.until, now)

    def read(pair):
        result = audit.Result(pair.stem)
        try:
            sidecar, _ = audit.read_sidecar(archive, pair, result)
        except Exception as e:
            result.fail(audit._sentence(e))
            sidecar = None
        if sidecar is not None:
            result.summary = audit.sidecar_summary(sidecar)
        return result

    def wanted(pair):
        # A call archived before --since cannot have started after it.
        return pair.sidecar is not None and (since is None or pair.sidecar.modified >= since)

    rows = []
    try:
        for r in audit.run_bounded(filter(wanted, audit.pairs(archive.list())), read, args.workers):
            facts = r.summary
            start = audit.parse_time(facts.get("start"))
            if since is not None and (start is None or start < since):
                continue
            if until is not None and (start is None or start >= until):
                continue
            if args.call_id is not None and str(facts.get("callId")) != args.call_id:
                continue
            if args.agent_id is not None and facts.get("agentId") != args.agent_id:
                continue
            if args.incomplete and facts.get("complete") is not False:
                continue
            rows.append(dict(key=r.key, **facts, problems=r.problems))
    except BrokenPipeError:
        raise
    except _READ_ERRORS as e:
        raise _Refused(f"listing {archive.describe()} failed: {audit._sentence(e)}.") from None
    rows.sort(key=lambda row: (row.get("start") or "", row["key"]), reverse=True)
    if args.json:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return EXIT_OK
    table = [("START", "CALLID", "SESSIONID", "AGENT", "DURATION", "COMPLETE", "ENDREASON", "KEY")]
    for row in rows:
        duration = row.get("durationSeconds")
        table.append((
            row.get("start") or "?", str(row.get("callId")), str(row.get("sessionId")),
            row.get("agentId") or "-",
            f"{duration:.1f} s" if isinstance(duration, (int, float)) else "?",
            {True: "yes", False: "no"}.get(row.get("complete"), "?"),
            str(row.get("endReason")), row["key"] + (" (unreadable sidecar)" if row["problems"] else ""),
        ))
    _table(out, table)
    out.write(f"{len(rows)} recording(s)\n")
    return EXIT_OK


# -- spool --------------------------------------------------------------------------


def _spool(args, now: float, out: TextIO) -> int:
    if not os.path.isdir(args.spool):
        raise _Refused(f"the spool directory {os.path.abspath(args.spool)} does not exist.")
    if args.retry:
        try:
            path = audit.request_retry(args.spool, args.retry, now)
        except ValueError as e:
            raise _Refused(f"{e}.") from None
        except OSError as e:
            raise _Refused(f"writing the retry request failed: {audit._sentence(e)}.") from None
        out.write(f"asked for {args.retry} to be retried: {path} (a running recorder "
                  "takes it at its next scan)\n")
        return EXIT_OK
    report = audit.spool_report(args.spool, now)
    if args.json:
        json.dump(report, out, indent=2)
        out.write("\n")
        return EXIT_OK
    counts = ", ".join(f"{n} {state}" for state, n in sorted(report["counts"].items())) or "empty"
    out.write(f"spool {report['spool']}: {counts}; {len(report['setAside'])} set aside\n")
    if not report["locksKnown"]:
        out.write("(/proc/locks cannot be read: calls in progress and crash leftovers "
                  "look alike)\n")
    table = [("STATE", "ENTRY", "CALL", "AGE", "SIZE", "DETAIL")]
    for e in report["entries"]:
        call = f"{e['callId']}/{e['sessionId']}" if e.get("callId") is not None else "-"
        detail = []
        if e.get("key"):
            detail.append(f"key {e['key']}")
        if e.get("endReason"):
            detail.append(f"endReason {e['endReason']}")
        if e.get("otherFiles"):
            detail.append("other files: " + " ".join(e["otherFiles"]))
        table.append((e["state"], e["name"], call, _age(e["ageSeconds"]), _size(e["bytes"]),
                      ", ".join(detail)))
    for e in report["setAside"]:
        table.append(("set aside", e["name"], "-", _age(e["ageSeconds"]), _size(e["bytes"]),
                      e.get("reason") or "reason not recorded"))
    if len(table) > 1:
        _table(out, table)
    for name in report["retryRequests"]:
        out.write(f"retry requested: {name}\n")
    return EXIT_OK


# -- formatting ------------------------------------------------------------------


def _table(out: TextIO, rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


if __name__ == "__main__":
    sys.exit(main())
