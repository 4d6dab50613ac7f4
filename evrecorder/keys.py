"""Archive keys from ``--key-template``.

The template is a Python format string over the call's fields: every Start
metadata field (``{callId}``, ``{sessionId}``, ``{accountId}``, ``{agentId}``
...), the handshake query parameters for fields the metadata lacks, and
``{start}``, the call's start as a UTC datetime (``{start:%Y/%m/%d}``).

Each field's formatted value is made safe for a key: anything but letters,
digits, ``.``, ``_``, ``-`` and ``=`` becomes ``_``, and a value may not be
``.`` or ``..``; so a callId such as ``../../etc`` can never leave the
archive.  The slashes of the template itself are kept.  A field the call does
not have becomes ``unknown``.
"""

from __future__ import annotations

import re
import string
from datetime import datetime, timezone

DEFAULT_TEMPLATE = "{start:%Y/%m/%d}/{callId}-{sessionId}"

_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


class _Formatter(string.Formatter):
    def get_value(self, key, args, kwargs):
        if isinstance(key, int):
            raise KeyError(f"positional field {{{key}}}")
        return kwargs.get(key, "unknown")

    def format_field(self, value, format_spec):
        text = self._format(value, format_spec)
        # A datetime's format spec may deliberately make directories.
        if isinstance(value, datetime):
            parts = text.split("/")
        else:
            parts = [text]
        safe = []
        for part in parts:
            part = _UNSAFE.sub("_", part)
            if part in ("", ".", ".."):
                part = part.replace(".", "_") or "_"
            safe.append(part)
        return "/".join(safe)


    @staticmethod
    def _format(value, format_spec: str) -> str:
        # A key must always come out: ids arrive as strings or numbers, so a
        # spec like {sessionId:03d} is tried on the number a string holds, and
        # a value the spec does not fit is used as it is.
        try:
            return format(value, format_spec)
        except (ValueError, TypeError):
            pass
        if isinstance(value, str):
            for kind in (int, float):
                try:
                    return format(kind(value), format_spec)
                except (ValueError, TypeError):
                    pass
        return str(value)


_FORMATTER = _Formatter()


def key_fields(metadata: dict, query: dict, start: float) -> dict:
    fields: dict[str, object] = {}
    for source in (query, metadata):
        for name, value in source.items():
            if isinstance(value, list):
                value = value[0] if value else ""
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                fields[name] = value
    fields["start"] = datetime.fromtimestamp(start, tz=timezone.utc)
    return fields


def format_key(template: str, fields: dict) -> str:
    key = _FORMATTER.format(template, **fields)
    parts = [p for p in key.split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "unknown"


def check_template(template: str) -> None:
    """Raise ValueError with a sentence when the template cannot be used."""
    sample = key_fields(
        {"callId": "12345", "sessionId": "2", "accountId": "99990000", "agentId": "x"},
        {},
        0.0,
    )
    try:
        key = format_key(template, sample)
    except (KeyError, ValueError, IndexError, AttributeError, TypeError) as e:
        raise ValueError(f"the key template {template!r} cannot be used: {e}") from e
    if not key:
        raise ValueError(f"the key template {template!r} gives an empty key")


def grpc_key_fields(
    metadata: dict, segments: list[dict], start: float, call_id: str, session_id: str
) -> dict:
    """The key fields of a gRPC recording, under the WebSocket Start metadata's names.

    ``metadata`` is DialogInit as stored (``{"account": ..., "dialog": ...}``,
    proto field names); ``segments`` the ``segment`` events in start order.
    So one template serves both doors: ``{callId}`` (the dialog id),
    ``{sessionId}`` (the first stream's), ``{accountId}``, ``{subaccountId}``,
    ``{rcAccountId}``, ``{agentId}`` (the first AGENT participant's id),
    ``{productId}`` and ``{productType}`` (of the first segment that names a
    product), ``{ani}``, ``{dnis}``, ``{dialogType}`` and ``{start}``.  A
    field the dialog does not have is left out (it becomes ``unknown``).
    """
    account = metadata.get("account") or {}
    dialog = metadata.get("dialog") or {}
    found = {
        "accountId": account.get("id"),
        "subaccountId": account.get("sub_account_id"),
        "rcAccountId": account.get("rc_account_id"),
        "ani": dialog.get("ani"),
        "dnis": dialog.get("dnis"),
        "dialogType": dialog.get("type"),
    }
    for segment in segments:
        participant = segment.get("participant") or {}
        if participant.get("type") == "AGENT" and participant.get("id"):
            found["agentId"] = participant["id"]
            break
    for segment in segments:
        product = segment.get("product") or {}
        if product.get("id") or product.get("type"):
            found["productId"] = product.get("id")
            found["productType"] = product.get("type")
            break
    fields = key_fields({k: v for k, v in found.items() if v not in (None, "")}, {}, start)
    fields.update(callId=call_id, sessionId=session_id)
    return fields
