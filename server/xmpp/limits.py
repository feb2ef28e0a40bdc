"""Per-user rate limits on what clients change on the server (profile, picture, blocklist,
private storage): each such write costs database writes and may fan out to every colleague
(a new picture or a block is announced in presence), so a client in a loop must not turn
into a flood. Per user, not per session: ten resources get no more than one."""

from __future__ import annotations

import time
from weakref import WeakKeyDictionary

from server.channels.ratelimit import TokenBucket
from server.xmpp.stanza import StanzaError

WRITES_PER_SECOND = 0.5
WRITE_BURST = 10
MAX_USERS = 100_000


class WriteLimit:
    """One per hub (``writes_of``): shared by every module that takes such writes."""

    def __init__(self, rate: float = WRITES_PER_SECOND, burst: int = WRITE_BURST) -> None:
        self._rate = rate
        self._burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, user_id: str) -> None:
        """Count one write of the user's; ``resource-constraint`` (type wait) past the rate."""
        now = time.monotonic()
        bucket = self._buckets.get(user_id)
        if bucket is None:
            if len(self._buckets) >= MAX_USERS:
                self._buckets.clear()
            bucket = self._buckets[user_id] = TokenBucket(self._rate, self._burst, now)
        if not bucket.take(now):
            raise StanzaError("resource-constraint", "too many changes: try again in a moment")


_limits: WeakKeyDictionary[object, WriteLimit] = WeakKeyDictionary()


def writes_of(owner: object) -> WriteLimit:
    """The write limit of one XMPP server (a test process runs several hubs)."""
    found = _limits.get(owner)
    if found is None:
        found = _limits[owner] = WriteLimit()
    return found
