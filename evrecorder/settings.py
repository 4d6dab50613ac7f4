"""The recorder's settings, as one plain object (built by ``tap.Options``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from evrecorder.keys import DEFAULT_TEMPLATE

PERSPECTIVES = ("Participant", "Conference")
"""Engage Voice perspectives: Participant is the agent, Conference the caller."""
ROLE_OF = {"Participant": "agent", "Conference": "caller"}
PERSPECTIVE_OF = {role: p for p, role in ROLE_OF.items()}

FRAMES_PER_SECOND = 50  # 20 ms frames


@dataclass
class Settings:
    spool: str = "./spool"
    archive: str = "./recordings"
    secrets: list[str] = field(default_factory=list)
    secret_header: str = "X-Secret"
    channel_map: tuple[str, str] = ("agent", "caller")
    format: str = "pcm16"
    key_template: str = DEFAULT_TEMPLATE
    reorder_window: int = 50
    reconnect_grace: float = 10.0
    idle_timeout: float = 60.0
    max_call_duration: float = 14400.0
    drain_timeout: float = 30.0
    max_message_size: int = 64 * 1024
    max_frame_bytes: int = 480
    """Largest decoded Media payload accepted: 60 ms (frames are 20 ms, 160 bytes).
    It also bounds the silence a gap can add, and so the longest possible file."""
    handshake_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    max_connections: int = 10000
    upload_concurrency: int = 4
    max_calls: int = 2000
    """Most calls in progress at once; a new call beyond it is refused (503 / 1013)."""
    ready_max_queue_age: float = 600.0
    """/readyz fails when the archive store has failed every publish for this long."""
    log_phone_numbers: bool = False
    reuse_port: bool = False
    """Listen with SO_REUSEPORT: several processes (sharing the spool) on one port."""
    tls_ciphers: str | None = None
    """TLS 1.2 cipher suites (OpenSSL cipher string) of every TLS listener; None: the
    profile in :mod:`evrecorder.tlsconfig` (AEAD and ECDHE only)."""
    retry_initial: float = 1.0
    retry_max: float = 300.0
    s3: dict = field(default_factory=dict)

    def max_duration_for(self, header: dict) -> float:
        """The longest a spooled recording may be: this process's
        ``max_call_duration``, or the one it was recorded under if longer (a
        crash-left call finalized after the option was lowered keeps its audio)."""
        recorded = header.get("maxCallDuration")
        if isinstance(recorded, (int, float)) and not isinstance(recorded, bool):
            return max(self.max_call_duration, float(recorded))
        return self.max_call_duration

    @property
    def max_sequence_span(self) -> int:
        """How far a sequenceId may stray from the perspective's first one."""
        return int(self.max_call_duration * FRAMES_PER_SECOND) + self.reorder_window
