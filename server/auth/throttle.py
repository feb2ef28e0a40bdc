"""Login throttling: a lock after repeated failures, counted before the password is checked.

Pure, no I/O: time is passed in, so tests need no sleep.
"""

from __future__ import annotations

from dataclasses import dataclass

# Refused because attempts under way could still reach the limit: they end within a hash or
# two, so the caller may try again soon.
BUSY_RETRY_SECONDS = 1.0


@dataclass
class _Record:
    failures: int = 0
    pending: int = 0  # attempts admitted whose verdict is not in yet
    locked_until: float = 0.0
    window_start: float = 0.0


class LoginThrottle:
    """Counts failed attempts per key (a login, or a client address).

    An attempt is *reserved* before its password is checked: ``reserve`` admits it only while
    the failures plus the attempts still under way stay below ``max_failures``. A hundred
    guesses sent at once therefore get no more password checks than a hundred sent one after
    the other - the count can no longer be read before a check and written after it.

    Each reservation then ends exactly once:

    - ``failed``: counted; reaching ``max_failures`` locks the key for ``lockout_seconds``;
    - ``succeeded``: clears the count (when ``reset_on_success``), but never a lock already in
      force: a success cannot open a lock that guesses reached;
    - ``released``: no verdict (refused further on, an error, a client gone): not counted.

    While locked, attempts are refused without a password check, so a correct guess during the
    lock does not help an attacker. With ``window_seconds``, failures older than that are
    forgotten (the per-address count, which successes do not clear).
    """

    def __init__(
        self,
        max_failures: int,
        lockout_seconds: float,
        *,
        window_seconds: float | None = None,
        reset_on_success: bool = True,
        max_keys: int = 100_000,
    ) -> None:
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds
        self.window_seconds = window_seconds
        self.reset_on_success = reset_on_success
        self.max_keys = max_keys
        self._records: dict[str, _Record] = {}

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again; 0 when an attempt would be admitted now."""
        record = self._records.get(key)
        if record is None:
            return 0.0
        self._expire(record, now)
        if record.locked_until > now:
            return record.locked_until - now
        if record.failures + record.pending >= self.max_failures:
            return BUSY_RETRY_SECONDS
        return 0.0

    def reserve(self, key: str, now: float) -> float:
        """Admit an attempt (0.0) or say how long to wait (nothing is reserved then)."""
        wait = self.retry_after(key, now)
        if wait > 0:
            return wait
        self._record(key, now).pending += 1
        return 0.0

    def failed(self, key: str, now: float) -> None:
        record = self._record(key, now)
        record.pending = max(0, record.pending - 1)
        self._expire(record, now)
        if record.failures == 0:
            record.window_start = now
        record.failures += 1
        if record.failures >= self.max_failures and record.locked_until <= now:
            record.locked_until = now + self.lockout_seconds

    def succeeded(self, key: str, now: float) -> None:
        record = self._records.get(key)
        if record is None:
            return
        record.pending = max(0, record.pending - 1)
        if record.locked_until > now:
            return  # the lock stands, whatever came back meanwhile
        if self.reset_on_success:
            record.failures = 0
        self._drop_if_idle(key, record, now)

    def released(self, key: str, now: float) -> None:
        record = self._records.get(key)
        if record is None:
            return
        record.pending = max(0, record.pending - 1)
        self._drop_if_idle(key, record, now)

    def _record(self, key: str, now: float) -> _Record:
        record = self._records.get(key)
        if record is None:
            if len(self._records) >= self.max_keys:
                self._forget_idle(now)
            record = self._records[key] = _Record()
        return record

    def _expire(self, record: _Record, now: float) -> None:
        if record.locked_until and record.locked_until <= now:
            record.failures = 0
            record.locked_until = 0.0
        elif (
            self.window_seconds is not None
            and record.failures
            and not record.locked_until
            and now - record.window_start >= self.window_seconds
        ):
            record.failures = 0

    def _drop_if_idle(self, key: str, record: _Record, now: float) -> None:
        self._expire(record, now)
        if not record.failures and not record.pending and not record.locked_until:
            del self._records[key]

    def _forget_idle(self, now: float) -> None:
        # Bounded memory under a spray of random logins: keep the locked keys and those with
        # attempts under way (their reservations must still find their record).
        self._records = {
            k: r for k, r in self._records.items() if r.locked_until > now or r.pending
        }
