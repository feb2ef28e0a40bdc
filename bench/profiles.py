"""The parameters of a run: ``full`` (what docs/benchmarks.md reports) and ``quick`` (smoke)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
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
    # connection set-up: the fan-out's steps (0 -> each N in turn), ``connect_parallel``
    # connections under way at a time; a series of steps stops starting connections after
    # ``connect_max_seconds`` (a hub that takes longer is measured on what it managed)
    connect_parallel: int = 50
    connect_max_seconds: float = 300.0
    # history (``bench/history.py``): after the empty-history phases, ``history_chats`` chats
    # among the users (``history_groups`` group chats of ``history_group_size``, the rest
    # dialogs, the 1:1 senders' dialogs among them) get ``history_messages`` messages through
    # the REST API, ``history_parallel`` requests in flight, in rounds of
    # ``history_round_seconds``, for at most ``history_max_seconds``; then the ceiling, the
    # 1:1 throughput and the connection set-up are measured again
    history_messages: int = 100_000
    history_chats: int = 1_000
    history_groups: int = 200
    history_group_size: int = 10
    history_parallel: int = 32
    history_round_seconds: float = 20.0
    history_max_seconds: float = 1_500.0
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
    # CRM mail (``bench/mail.py``): ``mail_users`` users with ``mail_records_per_user`` deals
    # (a contact each) and one mail sent from each deal; ``mail_latency_replies`` replies one
    # at a time (after ``mail_latency_warmup``); ``mail_replies`` replies over
    # ``mail_connections`` SMTP sessions at once, ``mail_per_session`` messages per session
    # (the hub's listener cuts a session off at the 51st MAIL); then ``mail_loaded_probes``
    # replies one at a time, one per ``mail_probe_interval`` s, while replies are
    # offered at ``mail_load_fraction`` of the committed rate. Every
    # ``mail_attachment_every``-th reply carries ``mail_attachment_bytes``; ``mail_mix`` is
    # the share of replies matched by code, by thread headers and by sender
    mail_users: int = 8
    mail_records_per_user: int = 15
    mail_latency_replies: int = 200
    mail_latency_warmup: int = 10
    mail_latency_after: int = 50  # quiet again, after the throughput phase
    mail_replies: int = 1000
    mail_connections: int = 8
    mail_per_session: int = 50
    mail_loaded_probes: int = 60
    mail_peer_runs: int = 3
    mail_probe_interval: float = 0.5
    mail_load_fraction: float = 0.5
    mail_attachment_every: int = 10
    mail_attachment_bytes: int = 50_000
    mail_mix: tuple[tuple[str, int], ...] = (("code", 6), ("thread", 2), ("sender", 2))

    # soak (``bench/soak.py``): ``soak_users`` users in group chats of ``soak_group_size`` and
    # dialogs, ``soak_clients`` Socket.IO clients; one node then two (each after a warm-up of
    # one message per chat, not measured), offered ``soak_rates``
    # msg/s for ``soak_step_seconds`` each (sustained: no loss, p99 < ``soak_p99_ms``); then
    # ``soak_seconds`` on two nodes at ``soak_load_fraction`` of the sustained rate, sampled
    # every ``soak_sample_seconds``, trends after the first ``soak_warmup_fraction``
    soak_users: int = 200
    soak_group_size: int = 10
    soak_clients: int = 2000
    soak_rates: tuple[float, ...] = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0)
    soak_step_seconds: float = 15.0
    soak_p99_ms: float = 500.0
    soak_seconds: float = 480.0
    soak_load_fraction: float = 0.5
    soak_sample_seconds: float = 10.0
    soak_warmup_fraction: float = 0.2

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
    connect_max_seconds=60.0,
    history_messages=1_000,
    history_chats=40,
    history_groups=8,
    history_group_size=5,
    history_parallel=16,
    history_round_seconds=10.0,
    history_max_seconds=120.0,
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
    mail_users=4,
    mail_records_per_user=5,
    mail_latency_replies=40,
    mail_latency_warmup=4,
    mail_replies=300,
    mail_loaded_probes=15,
    mail_latency_after=15,
    soak_users=40,
    soak_clients=200,
    soak_rates=(10.0, 20.0),
    soak_step_seconds=5.0,
    soak_seconds=60.0,
    soak_sample_seconds=5.0,
)


def with_settings(profile: Profile, settings: Sequence[str]) -> Profile:
    """``profile`` with ``FIELD=VALUE`` changes (numbers only), for ``--set``."""
    known = {f.name: getattr(profile, f.name) for f in fields(profile)}
    changes: dict[str, Any] = {}
    for setting in settings:
        name, sep, text = setting.partition("=")
        current = known.get(name)
        if not sep or name == "name" or not isinstance(current, int | float):
            numeric = sorted(k for k, v in known.items() if isinstance(v, int | float))
            raise ValueError(f"--set {setting}: use FIELD=NUMBER with one of {', '.join(numeric)}")
        changes[name] = type(current)(float(text)) if isinstance(current, int) else float(text)
    return replace(profile, **changes)
