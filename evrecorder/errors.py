"""Errors the transport-neutral core raises, for each front door to map.

The core (call assembly, spool) knows nothing of WebSocket close codes or gRPC
statuses.  It says what kind of problem it met; the WebSocket door turns the
kind into a close code and the gRPC door into a status:

================  =====================================================  ======  ===================
kind              meaning                                                 WS      gRPC
================  =====================================================  ======  ===================
``invalid``       malformed input (a value out of range, bad bytes)       1007    INVALID_ARGUMENT
``unsupported``   well-formed, but not something the recorder takes       1003    INVALID_ARGUMENT
``precondition``  out of order or wrong state (media before its start,    1008    FAILED_PRECONDITION
                  a second init naming another call)
``capacity``      the recorder is full (``--max-calls``)                  1013    RESOURCE_EXHAUSTED
``internal``      the recorder's own fault (its spool cannot be written)  1011    INTERNAL
================  =====================================================  ======  ===================
"""

from __future__ import annotations

KINDS = ("invalid", "unsupported", "precondition", "capacity", "internal")


class CallRejected(Exception):
    """A front door's input was refused; ``reason`` is one sentence for the log.

    Raising it ends only the connection or stream that carried the input:
    what the call recorded so far is kept and archived.
    """

    def __init__(self, kind: str, reason: str):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
