"""The parameters of a run: ``full`` (what docs/benchmarks.md reports) and ``quick`` (smoke)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Profile:
    name: str
    # users created through the API; fan-out connections are spread over them round-robin
    users: int
    # 1:1 latency: one sender posts to one receiver at a fixed rate
    direct_rate: float
    direct_seconds: float
    # 1:1 throughput: this many senders, each in its own dialog, one request in flight each
    senders: int
    saturation_seconds: float
    # the database ceiling loop, sequential and with ``senders`` workers
    ceiling_seconds: float
    # fan-out: one group chat, this many connected clients (cumulative steps)
    fanout_ns: tuple[int, ...]
    # steady fan-out: messages/s offered at each N (the same for the hub and the reference)
    fanout_rates: tuple[float, ...]
    fanout_seconds: float
    # saturated fan-out: publish whenever fewer than ``window`` messages are still on their way
    window: int
    fanout_saturation_seconds: float
    # at the end: this many clients connect again, now that the group chat has a history
    reconnect_clients: int = 50
    warmup: float = 2.0
    settle: float = 3.0
    # XMPP (the hub and Prosody): users registered in both, full logins (``xmpp_login_parallel``
    # at a time), one pair at ``xmpp_rate`` msg/s, then ``xmpp_pairs`` pairs with up to
    # ``xmpp_window`` messages in flight each
    xmpp_users: int = 40
    xmpp_logins: int = 100
    xmpp_login_parallel: int = 10
    xmpp_rate: float = 20.0
    xmpp_latency_seconds: float = 15.0
    xmpp_pairs: int = 8
    xmpp_window: int = 10
    xmpp_saturation_seconds: float = 10.0
    # CRM counters (``bench/crm.py``): ``crm_users`` users own the deals, ``crm_connected`` of
    # them are connected; the data set grows through ``crm_sizes`` open activities (about
    # ``crm_activities_per_deal`` per deal) and at each size ``crm_changes`` activity changes
    # (after ``crm_warmup_changes``) are made one at a time, each once the hub is idle again
    # after the one before, and at most one per ``crm_change_interval`` seconds
    crm_users: int = 200
    crm_connected: int = 20
    crm_sizes: tuple[int, ...] = (100_000, 1_000_000)
    crm_activities_per_deal: int = 20
    crm_changes: int = 300
    crm_warmup_changes: int = 10
    crm_change_interval: float = 0.2

    def fanout_rate(self, n: int) -> float:
        return self.fanout_rates[self.fanout_ns.index(n)]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Profile(
    name="full",
    users=100,
    direct_rate=20.0,
    direct_seconds=20.0,
    senders=8,
    saturation_seconds=15.0,
    ceiling_seconds=8.0,
    fanout_ns=(100, 500, 1000),
    fanout_rates=(5.0, 2.0, 1.0),
    fanout_seconds=15.0,
    window=4,
    fanout_saturation_seconds=10.0,
)

QUICK = Profile(
    name="quick",
    users=20,
    direct_rate=20.0,
    direct_seconds=5.0,
    senders=4,
    saturation_seconds=4.0,
    ceiling_seconds=3.0,
    fanout_ns=(50, 200),
    fanout_rates=(5.0, 2.0),
    fanout_seconds=4.0,
    window=4,
    fanout_saturation_seconds=4.0,
    reconnect_clients=20,
    warmup=1.0,
    settle=1.0,
    xmpp_users=12,
    xmpp_logins=30,
    xmpp_latency_seconds=4.0,
    xmpp_pairs=4,
    xmpp_saturation_seconds=4.0,
    crm_users=50,
    crm_connected=10,
    crm_sizes=(20_000, 100_000),
    crm_changes=60,
    crm_warmup_changes=4,
)
