"""Damaged spool entries: what can be recovered, and what is set aside.

Blocking code (it reads and writes files), run in the archiver's thread pool
on an entry this process holds.  The rule is the design's: nothing that may
hold audio is deleted unless the archive confirmed it.

* An entry whose ``call.json`` is missing or unreadable but which holds audio
  (any ``*.frames`` or ``*.chunks`` file that is not empty) gets a header
  rebuilt from what is known: the ids and the start from its directory name
  (:func:`~evrecorder.spool.ids_from_name`), the metadata of a damaged header
  when it still parses.  The damaged file is kept as ``call.json.damaged``.
  (``call.chunks`` makes it a gRPC entry.)  The recording is then finalized
  as usual, and its sidecar says so:
  ``endReason: "recovered"``, ``complete: false`` and ``damage.headerLost``.
* An entry with no header and no audio at all (a crash before the header was
  written) holds nothing: it is removed.
* A finalized entry whose ``sidecar.json`` cannot be read is finalized again
  when its frames are still there, else its sidecar is rebuilt from
  ``recording.wav`` (``damage.sidecarRebuilt``); the damaged file is kept as
  ``sidecar.json.damaged``.
* What cannot be recovered is moved, whole, to ``<spool>/quarantine/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct

from evrecorder import __version__, keys
from evrecorder.chunkfile import CHUNKS_FILE
from evrecorder.finalize import SCHEMA, SCRATCH_SUFFIXES, rfc3339
from evrecorder.settings import PERSPECTIVES, Settings
from evrecorder.spool import (
    CALL_FILE,
    EVENTS_FILE,
    SIDECAR_FILE,
    WAV_FILE,
    CallSpool,
    ids_from_name,
    write_json_atomic,
)

#: Files that hold a call's audio before it is finalized, whatever its door.
AUDIO_SUFFIXES = (".frames", ".chunks")
DAMAGED_SUFFIX = ".damaged"
QUARANTINE_DIR = "quarantine"


class Damaged(Exception):
    """The entry cannot be recovered; ``str(err)`` says why, in a sentence."""


def audio_files(entry: CallSpool) -> list[str]:
    """The entry's files that hold audio not yet in a WAV (empty ones hold none)."""
    out = []
    for name in sorted(os.listdir(entry.path)):
        if name.endswith(AUDIO_SUFFIXES) and os.path.getsize(os.path.join(entry.path, name)):
            out.append(name)
    return out


def holds_nothing(entry: CallSpool) -> bool:
    """True when every file of the entry provably holds no audio: ``events.jsonl``,
    an atomic write's temporary file, or an empty file."""
    for name in os.listdir(entry.path):
        path = os.path.join(entry.path, name)
        if name == EVENTS_FILE or name.startswith(".tmp-"):
            continue
        if os.path.isfile(path) and not os.path.getsize(path):
            continue
        return False
    return True


def read_header(entry: CallSpool) -> dict | None:
    """The entry's header, or None when it is missing or cannot be used.

    An error reading the disk (EIO ...) is raised: that is not damage, and
    it may pass.
    """
    try:
        header = entry.read_header()
    except FileNotFoundError:
        return None
    except ValueError:  # not JSON, not UTF-8
        return None
    if not isinstance(header, dict):
        return None
    for name in ("callId", "sessionId"):
        if not isinstance(header.get(name), (str, int)) or isinstance(header.get(name), bool):
            return None
    if not isinstance(header.get("connectedAt"), (int, float)):
        return None
    return header


def _damaged_header_fields(entry: CallSpool) -> dict:
    """Whatever of a damaged ``call.json`` still parses as a JSON object."""
    for name in (CALL_FILE, CALL_FILE + DAMAGED_SUFFIX):
        try:
            with open(os.path.join(entry.path, name), encoding="utf-8") as f:
                found = json.load(f)
        except (OSError, ValueError):
            continue
        return found if isinstance(found, dict) else {}
    return {}


def restore_header(entry: CallSpool) -> dict:
    """Write a header for an entry that lost its own; return it.

    The ids and the start come from the directory name; metadata and query
    from the damaged header where they survived.  A gRPC entry (one with a
    ``*.chunks`` file) is marked ``source: "grpc"``.
    """
    name = os.path.basename(entry.path)
    known = ids_from_name(name)
    old = _damaged_header_fields(entry)
    connected = known["connectedAt"]
    if connected is None:
        connected = min(
            os.path.getmtime(os.path.join(entry.path, n)) for n in os.listdir(entry.path)
        )
    header = {
        "callId": known["callId"],
        "sessionId": known["sessionId"],
        "metadata": old.get("metadata") if isinstance(old.get("metadata"), dict) else {},
        "query": old.get("query") if isinstance(old.get("query"), dict) else {},
        "connectedAt": connected,
        "createdAt": connected,
        "damage": {
            "headerLost": True,
            "idsComplete": known["idsComplete"],
            "detail": "call.json was missing or unreadable: the ids and the start come "
            "from the spool entry's name"
            + ("" if known["idsComplete"] else " (cut there: the ids were long)"),
        },
    }
    if os.path.exists(os.path.join(entry.path, CHUNKS_FILE)):
        header["source"] = "grpc"
        header["accountId"] = str(old.get("accountId", "unknown"))
    damaged = os.path.join(entry.path, CALL_FILE)
    if os.path.exists(damaged):
        os.replace(damaged, damaged + DAMAGED_SUFFIX)
    write_json_atomic(damaged, header)
    return header


def mark_recovered(entry: CallSpool, sidecar: dict, damage: dict) -> dict:
    """A sidecar finalized from a restored header: recovered, incomplete, and why."""
    sidecar["endReason"] = "recovered"
    sidecar["complete"] = False
    sidecar["damage"] = damage
    write_json_atomic(os.path.join(entry.path, SIDECAR_FILE), sidecar)
    return sidecar


def set_damaged_sidecar_aside(entry: CallSpool) -> None:
    """``sidecar.json`` renamed to ``sidecar.json.damaged``: the entry is no longer
    finalized, and the operator keeps the damaged file.  One set aside before
    (the first, most likely the call's own) is never replaced: a later one
    becomes ``sidecar.json.damaged.2`` and so on."""
    path = os.path.join(entry.path, SIDECAR_FILE)
    target, n = path + DAMAGED_SUFFIX, 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}{DAMAGED_SUFFIX}.{n}"
    os.rename(path, target)


def discard_scratch(entry: CallSpool) -> None:
    """Remove what a failed finalize left (derived from the frames, which stay):
    on a full disk, it would hold the space the retry needs."""
    for name in os.listdir(entry.path):
        if name.endswith(SCRATCH_SUFFIXES) or name == WAV_FILE + ".tmp":
            try:
                os.unlink(os.path.join(entry.path, name))
            except FileNotFoundError:
                pass


# -- a sidecar rebuilt from the WAV ---------------------------------------

_ENCODINGS = {1: "pcm16", 7: "mulaw"}


def _wav_facts(path: str) -> tuple[str, int, int, float]:
    """Encoding, sample rate, channels and duration from a WAV's header."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        size = os.fstat(f.fileno()).st_size
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise Damaged(f"{path} is not a WAV file")
    pos, fmt, data = 12, None, None
    while pos + 8 <= len(head):
        chunk, length = struct.unpack_from("<4sI", head, pos)
        if chunk == b"fmt " and length >= 16:
            fmt = struct.unpack_from("<HHIIHH", head, pos + 8)
        elif chunk == b"data":
            data = min(length, size - pos - 8)
            break
        pos += 8 + length + (length & 1)
    if fmt is None or data is None:
        raise Damaged(f"{path} has no readable WAV header")
    tag, channels, rate, _, block, _ = fmt
    if not rate or not block:
        raise Damaged(f"{path} has an invalid WAV header")
    return _ENCODINGS.get(tag, f"format {tag}"), rate, channels, data // block / rate


def rebuild_sidecar(entry: CallSpool, settings: Settings, detail: str) -> dict:
    """A sidecar for the entry's ``recording.wav`` when its own is lost; written in place.

    What the WAV says (encoding, rate, duration, bytes, SHA-256), the header
    (or the directory name) and the events; the per-perspective counts are
    lost (left out).
    """
    wav_path = os.path.join(entry.path, WAV_FILE)
    if not os.path.exists(wav_path):
        raise Damaged("it has no recording.wav to rebuild its sidecar from")
    encoding, rate, channels, duration = _wav_facts(wav_path)
    digest, size = hashlib.sha256(), 0
    with open(wav_path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    header = read_header(entry)
    damage = {"sidecarRebuilt": True, "detail": detail}
    if header is None:
        known = ids_from_name(os.path.basename(entry.path))
        header = {"callId": known["callId"], "sessionId": known["sessionId"],
                  "connectedAt": known["connectedAt"] or os.path.getmtime(wav_path),
                  "metadata": {}, "query": {}}
        damage.update(headerLost=True, idsComplete=known["idsComplete"])
    elif header.get("damage"):
        damage = dict(header["damage"], **damage)
    events = entry.read_events()
    end = next((ev for ev in reversed(events) if ev.get("event") == "end"), None)
    media_at = [ev["at"] for ev in events
                if ev.get("event") == "media" and isinstance(ev.get("at"), (int, float))]
    first_media_at = min(media_at) if media_at else None
    stops = {}
    for ev in events:
        if ev.get("event") == "stop" and ev.get("perspective") in PERSPECTIVES:
            stops.setdefault(ev["perspective"], ev.get("metadata"))
    start = first_media_at if first_media_at is not None else header["connectedAt"]
    fields = keys.key_fields(header.get("metadata") or {}, header.get("query") or {}, start)
    fields.update(callId=header["callId"], sessionId=header["sessionId"])
    sidecar = {
        "schema": SCHEMA,
        "source": header.get("source", "websocket"),
        "callId": header["callId"],
        "sessionId": header["sessionId"],
        "key": keys.format_key(settings.key_template, fields),
        "metadata": header.get("metadata"),
        "query": header.get("query"),
        "audio": {
            "encoding": encoding,
            "sampleRateHertz": rate,
            "channels": channels,
            "channelMap": list(settings.channel_map),
            "durationSeconds": duration,
            "bytes": size,
            "sha256": digest.hexdigest(),
        },
        # The counts are lost (left out, not made up); the Stops are in the events.
        "perspectives": {p: {"stop": stops.get(p)} for p in PERSPECTIVES},
        "timing": {
            "connectedAt": rfc3339(header.get("connectedAt")),
            "firstMediaAt": rfc3339(first_media_at),
            "endedAt": rfc3339(end.get("at")) if end else None,
            "archivedAt": None,
        },
        "complete": False,
        "endReason": end.get("reason", "recovered") if end else "recovered",
        "recorder": {"version": __version__, "host": socket.gethostname()},
        "damage": damage,
    }
    write_json_atomic(os.path.join(entry.path, SIDECAR_FILE), sidecar)
    return sidecar


# -- quarantine ------------------------------------------------------------

#: A note left in a quarantined entry: why it is there, one sentence.
REASON_FILE = "reason.txt"


def quarantine(spool_root: str, entry: CallSpool, why: str = "") -> str:
    """Move the entry, whole, to ``<spool>/quarantine/`` with a note of why;
    return where it went."""
    target_dir = os.path.join(spool_root, QUARANTINE_DIR)
    os.makedirs(target_dir, exist_ok=True)
    name = os.path.basename(entry.path)
    target = os.path.join(target_dir, name)
    n = 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(target_dir, f"{name}.{n}")
    os.rename(entry.path, target)
    if why:
        try:
            with open(os.path.join(target, REASON_FILE), "w", encoding="utf-8") as f:
                f.write(why + "\n")
        except OSError:
            pass  # the log says it too
    return target
