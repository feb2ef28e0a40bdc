"""Login throttling: after N failures in a row a login is locked for a while. Pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Record:
    failures: int = 0
    locked_until: float = 0.0


class LoginThrottle:
    """Counts consecutive failures per key (a login); time is passed in, so tests need no sleep.

    Success clears the count. While locked, attempts are refused without checking the password,
    so a correct guess during the lock does not help an attacker.
    """

    def __init__(self, max_failures: int, lockout_seconds: float, max_keys: int = 100_000) -> None:
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds
        self.max_keys = max_keys
        self._records: dict[str, _Record] = {}

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again; 0 when it may try now."""
        record = self._records.get(key)
        if record is None or record.locked_until <= now:
            return 0.0
        return record.locked_until - now

    def failure(self, key: str, now: float) -> None:
        record = self._records.get(key)
        if record is None:
            if len(self._records) >= self.max_keys:
                self._forget_unlocked(now)
            record = self._records[key] = _Record()
        if record.locked_until and record.locked_until <= now:
            record.failures = 0
            record.locked_until = 0.0
        record.failures += 1
        if record.failures >= self.max_failures:
            record.locked_until = now + self.lockout_seconds

    def success(self, key: str) -> None:
        self._records.pop(key, None)

    def _forget_unlocked(self, now: float) -> None:
        # Bounded memory under a spray of random logins: keep only the locked ones.
        self._records = {k: r for k, r in self._records.items() if r.locked_until > now}
