"""The streaming profile's shared secret, checked the same way by both doors."""

from __future__ import annotations

import hmac


class SecretChecker:
    """Constant-time comparison against the configured secrets (rotation)."""

    def __init__(self, secrets: list[str]):
        self._secrets = [s.encode("utf-8") for s in secrets]

    @property
    def required(self) -> bool:
        return bool(self._secrets)

    def matches(self, presented: str) -> bool:
        value = presented.encode("utf-8", "surrogatepass")
        ok = False
        for secret in self._secrets:  # no early exit: the time says nothing
            ok |= hmac.compare_digest(value, secret)
        return ok
