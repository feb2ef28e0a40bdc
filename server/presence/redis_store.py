"""Presence state shared by several nodes, in Redis.

Why it is laid out this way:

- A source (one connection) is a key with a TTL of the heartbeat timeout, refreshed by each
  heartbeat, and a member of its user's sorted set scored by the same expiry time. A node
  killed without a word leaves keys that simply run out; since Redis does not tell anyone
  when a member's key expires, every read first drops the members whose score has passed
  (and any whose key is gone), so a dead node's connections stop counting on their own. A
  sorted set of users, scored by their latest expiry, answers "who has sources" the same way.
  Each change is one Lua script, so two nodes never leave the user's set and the users' set
  disagreeing; times are Redis's own clock (``TIME``), so node clocks do not matter for expiry.
- What colleagues were told (the published status) is one hash, changed only by a
  compare-and-set script: of several nodes that see the same transition (two tabs connecting
  on two nodes; every survivor noticing a dead node's user), exactly one wins and announces.
  The script also publishes the change on a channel with a generation number (Redis time,
  strictly increasing per user). Every node keeps a copy of the hash for snapshots, which must
  not cost a round trip per connecting tab: the copy follows the channel, and is re-read in
  full after (re)subscribing and at every sweep. The generations let a late or repeated
  message, or a re-read racing one, never put an older status over a newer one.
  The script is the channel's only publisher, so an announcement and its copy cannot part.
- The manual state and ``last_seen`` are cached here rather than per node, so that a status
  set through one node is what every node decides with; the database stays the durable copy.
- The pending-offline mark (when the user's last source went, set once per offline period)
  lets the grace period count from the real moment wherever the grace task runs, and lets
  ``last_seen`` be written once however many nodes notice.

Needs Redis 6.2 or later (``ZRANGE … REV``); not for Redis Cluster (one script derives the
source keys it reads from the prefix).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import datetime
from typing import Any, cast

from redis.asyncio import Redis

from server.events.redis_subscription import RedisSubscription
from server.presence.rules import Manual, ManualStatus, Shown, Source, Status, shown_from

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "portalhub:presence:"
OFFLINE_MARK_TTL_MS = 24 * 3600 * 1000  # a mark outlives any grace period; never leaks
READY_TIMEOUT_SECONDS = 5.0

_NOW_MS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# KEYS: source key, the user's sources, the users. ARGV: source id, user id, JSON, TTL in ms.
_PUT = (
    _NOW_MS
    + """
local ttl = tonumber(ARGV[4])
redis.call('SET', KEYS[1], ARGV[3], 'PX', ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], string.format('%d', now + ttl), ARGV[1])
local top = redis.call('ZRANGE', KEYS[2], 0, 0, 'REV', 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], top[2])
redis.call('ZADD', KEYS[3], top[2], ARGV[2])
return 1
"""
)

# KEYS: source key, the user's sources, the users. ARGV: source id, user id.
# 1 if the source was live (its key still there), else 0.
_REMOVE = (
    _NOW_MS
    + """
local live = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local top = redis.call('ZRANGE', KEYS[2], 0, 0, 'REV', 'WITHSCORES')
if #top == 0 then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
else
  redis.call('ZADD', KEYS[3], top[2], ARGV[2])
end
return live
"""
)

# KEYS: the user's sources, the users. ARGV: user id, prefix of the user's source keys.
_SOURCES = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local found = {}
if #ids > 0 then
  local keys = {}
  for i, id in ipairs(ids) do keys[i] = ARGV[2] .. id end
  local values = redis.call('MGET', unpack(keys))
  for i = 1, #ids do
    if values[i] then
      found[#found + 1] = values[i]
    else
      redis.call('ZREM', KEYS[1], ids[i])
    end
  end
end
if #found == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) end
return found
"""
)

# KEYS: the users.
_USERS = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
)

# KEYS: published, generations, the user's sources, the user's offline mark.
# ARGV: user id, expected, new, channel, "1" to require that no source is left.
# The new generation when swapped, else 0.
_SWAP = (
    _NOW_MS
    + """
local current = redis.call('HGET', KEYS[1], ARGV[1]) or 'offline'
if current ~= ARGV[2] then return 0 end
if ARGV[5] == '1' and redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf') > 0 then return 0 end
if ARGV[3] == 'offline' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[4])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
local before = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local gen = string.format('%d', math.max(before + 1, now))
redis.call('HSET', KEYS[2], ARGV[1], gen)
redis.call('PUBLISH', ARGV[4], cjson.encode({u = ARGV[1], s = ARGV[3], g = gen}))
return tonumber(gen)
"""
)

# KEYS: a hash. ARGV: field, expected value, new value.
_REPLACE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# KEYS: a hash. ARGV: field, value. The value now there.
_KEEP_IF_MISSING = """
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
return redis.call('HGET', KEYS[1], ARGV[1])
"""

# KEYS: the offline mark. ARGV: when (ISO), TTL in ms. {value now there, 1 if set by this call}.
_MARK = """
local set = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return {redis.call('GET', KEYS[1]), set and 1 or 0}
"""


class RedisPresenceStore:
    def __init__(self, url: str, *, ttl_seconds: float, prefix: str = DEFAULT_PREFIX) -> None:
        """``ttl_seconds``: how long a source lives without a heartbeat (the heartbeat
        timeout)."""
        self._redis: Redis = Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=10,
        )
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        self._prefix = prefix
        self._users_key = f"{prefix}users"
        self._published_key = f"{prefix}published"
        self._generations_key = f"{prefix}published:gen"
        self._channel = f"{prefix}published"
        self._manual_key = f"{prefix}manual"
        self._last_seen_key = f"{prefix}last_seen"
        self._put = self._redis.register_script(_PUT)
        self._remove = self._redis.register_script(_REMOVE)
        self._sources = self._redis.register_script(_SOURCES)
        self._users = self._redis.register_script(_USERS)
        self._swap = self._redis.register_script(_SWAP)
        self._replace = self._redis.register_script(_REPLACE)
        self._keep_if_missing = self._redis.register_script(_KEEP_IF_MISSING)
        self._mark = self._redis.register_script(_MARK)
        self._copy: dict[str, tuple[Status, int]] = {}  # user -> (published, generation)
        self._subscription = RedisSubscription(
            self._redis,
            [self._channel],
            name="presence store",
            on_subscribed=self._on_subscribed,
            on_message=self._on_message,
        )
        self._ready = asyncio.Event()

    # keys ----------------------------------------------------------------------------------------

    def _source_key(self, user_id: str, source_id: str) -> str:
        return f"{self._prefix}src:{user_id}:{source_id}"

    def _user_key(self, user_id: str) -> str:
        return f"{self._prefix}user:{user_id}"

    def _mark_key(self, user_id: str) -> str:
        return f"{self._prefix}gone:{user_id}"

    # sources -------------------------------------------------------------------------------------

    async def put(self, user_id: str, source: Source) -> None:
        await self._put(
            keys=[self._source_key(user_id, source.id), self._user_key(user_id), self._users_key],
            args=[source.id, user_id, _encode_source(source), self._ttl_ms],
        )

    async def remove(self, user_id: str, source_id: str) -> bool:
        live = await self._remove(
            keys=[self._source_key(user_id, source_id), self._user_key(user_id), self._users_key],
            args=[source_id, user_id],
        )
        return bool(live)

    async def sources(self, user_id: str) -> list[Source]:
        found = await self._sources(
            keys=[self._user_key(user_id), self._users_key],
            args=[user_id, self._source_key(user_id, "")],
        )
        return [_decode_source(value) for value in found]

    async def users(self) -> list[str]:
        return list(await self._users(keys=[self._users_key]))

    # what colleagues were told -------------------------------------------------------------------

    def published(self) -> dict[str, Status]:
        return {user: status for user, (status, _) in self._copy.items() if status != "offline"}

    async def published_now(self) -> dict[str, Status]:
        await self._refresh()
        return self.published()

    async def published_status(self, user_id: str) -> Status:
        return _status(await self._redis.hget(self._published_key, user_id))

    async def swap_published(
        self, user_id: str, expected: Status, new: Status, *, only_if_gone: bool = False
    ) -> bool:
        generation = int(
            await self._swap(
                keys=[
                    self._published_key,
                    self._generations_key,
                    self._user_key(user_id),
                    self._mark_key(user_id),
                ],
                args=[user_id, expected, new, self._channel, "1" if only_if_gone else "0"],
            )
        )
        if generation:
            self._learn(user_id, new, generation)  # at once: our own message comes later
        return bool(generation)

    def _learn(self, user_id: str, status: Status, generation: int) -> None:
        known = self._copy.get(user_id)
        if known is None or generation > known[1]:
            self._copy[user_id] = (status, generation)

    async def _refresh(self) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.time()
            pipe.hgetall(self._published_key)
            pipe.hgetall(self._generations_key)
            clock, published, generations = await pipe.execute()
        read_at = int(clock[0]) * 1000 + int(clock[1]) // 1000
        for user_id, generation in generations.items():
            status = _status(published.get(user_id))
            known = self._copy.get(user_id)
            if known is None or int(generation) >= known[1]:
                self._copy[user_id] = (status, int(generation))
        for user_id, (_, generation) in list(self._copy.items()):
            # Known here, unknown to Redis, and older than the read: Redis lost it (restart).
            if user_id not in generations and generation < read_at:
                del self._copy[user_id]

    # manual state and last seen ------------------------------------------------------------------

    async def manual(self, user_id: str) -> Manual | None:
        value = await self._redis.hget(self._manual_key, user_id)
        return None if value is None else _decode_manual(_text(value))

    async def keep_manual(
        self, user_id: str, manual: Manual, *, if_missing: bool = False
    ) -> Manual:
        if not if_missing:
            await self._redis.hset(self._manual_key, user_id, _encode_manual(manual))
            return manual
        kept = await self._keep_if_missing(
            keys=[self._manual_key], args=[user_id, _encode_manual(manual)]
        )
        return _decode_manual(kept)

    async def replace_manual(self, user_id: str, old: Manual, new: Manual) -> bool:
        replaced = await self._replace(
            keys=[self._manual_key], args=[user_id, _encode_manual(old), _encode_manual(new)]
        )
        return bool(replaced)

    async def last_seen(self, user_id: str) -> datetime | None:
        value = await self._redis.hget(self._last_seen_key, user_id)
        return None if value is None else datetime.fromisoformat(_text(value))

    async def keep_last_seen(
        self, user_id: str, when: datetime, *, if_missing: bool = False
    ) -> None:
        if if_missing:
            await self._redis.hsetnx(self._last_seen_key, user_id, when.isoformat())
        else:
            await self._redis.hset(self._last_seen_key, user_id, when.isoformat())

    # the grace period ----------------------------------------------------------------------------

    async def mark_offline(self, user_id: str, when: datetime) -> tuple[datetime, bool]:
        value, first = await self._mark(
            keys=[self._mark_key(user_id)], args=[when.isoformat(), OFFLINE_MARK_TTL_MS]
        )
        return datetime.fromisoformat(value), bool(first)

    async def offline_since(self, user_id: str) -> datetime | None:
        value = await self._redis.get(self._mark_key(user_id))
        return None if value is None else datetime.fromisoformat(_text(value))

    async def clear_offline(self, user_id: str) -> None:
        await self._redis.delete(self._mark_key(user_id))

    # lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._subscription.start()

    async def ready(self) -> None:
        # Not fatal when Redis is down at start: the copy fills in once it is back.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), READY_TIMEOUT_SECONDS)

    async def close(self) -> None:
        await self._subscription.close()
        await self._redis.aclose()

    async def _on_subscribed(self, first: bool) -> None:
        await self._refresh()  # after subscribing: nothing falls between the two
        if not first:
            log.info("presence store: Redis is back; published statuses re-read")
        self._ready.set()

    async def _on_message(self, channel: str, payload: Any) -> None:
        self._received(payload)

    def _received(self, payload: str) -> None:
        try:
            doc = json.loads(payload)
            self._learn(str(doc["u"]), _status(doc["s"]), int(doc["g"]))
        except (ValueError, KeyError, TypeError):
            log.warning("presence store: unreadable message %r", payload)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _status(value: Any) -> Status:
    if value in ("online", "away", "dnd"):
        return cast(Status, value)
    return "offline"


def _encode_source(source: Source) -> str:
    # A heartbeat time is monotonic, which means nothing on another node: travel as wall time.
    wall = time.time() - (time.monotonic() - source.last_heartbeat)
    return json.dumps(
        {
            "id": source.id,
            "transport": source.transport,
            "active": source.active,
            "heartbeat": wall,
            "dnd": source.dnd,
            # A Jabber session's resource and what it shows (absent for browser tabs).
            **(
                {
                    "resource": source.resource,
                    "show": source.shown.show,
                    "status": source.shown.status,
                    "priority": source.shown.priority,
                    "caps": source.shown.caps,
                }
                if source.resource
                else {}
            ),
        }
    )


def _decode_source(value: str) -> Source:
    doc = json.loads(value)
    local = time.monotonic() - (time.time() - float(doc["heartbeat"]))
    resource = str(doc.get("resource") or "")
    shown = (
        shown_from(
            str(doc.get("show") or ""),
            str(doc.get("status") or ""),
            str(doc.get("priority") or 0),
            str(doc.get("caps") or ""),
        )
        if resource
        else Shown()
    )
    return Source(
        str(doc["id"]),
        str(doc["transport"]),
        bool(doc["active"]),
        local,
        bool(doc["dnd"]),
        resource,
        shown,
    )


def _encode_manual(manual: Manual) -> str:
    until = manual.until.isoformat() if manual.until is not None else None
    return json.dumps(
        {"status": manual.status, "until": until, "invisible": manual.invisible}, sort_keys=True
    )


def _decode_manual(value: str) -> Manual:
    doc = json.loads(value)
    status: ManualStatus | None = None
    if doc.get("status") in ("away", "dnd"):
        status = cast(ManualStatus, doc["status"])
    until = doc.get("until")
    return Manual(
        status, datetime.fromisoformat(until) if until else None, bool(doc.get("invisible"))
    )
