"""One hub's observability: its node id, the gauges read at scrape time, and its heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

from aiohttp import web

from server import __version__
from server.background import POLLER_GAP_WAIT, raise_if_stopping, stop
from server.observability import logs, nodes
from server.observability.instruments import EVENTS_DELIVERED
from server.observability.metrics import Family, open_fds, process_families, resident_memory_bytes
from server.observability.tracing import ObservedBus, TracedStreamLog
from server.services import Services
from server.store.database import Document, utcnow

log = logging.getLogger(__name__)

DATABASE_GAUGE_TIMEOUT_SECONDS = 2.0


class Observability:
    def __init__(self, services: Services, node: str) -> None:
        self.services = services
        self.settings = services.settings
        self.node = node
        self.started_at = utcnow()
        self.http_host: str | None = None
        self.http_port: int | None = None
        self.interval = self.settings.node_heartbeat_seconds
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_beat: tuple[float, int, float] | None = None  # (monotonic, stored, sent)
        logs.set_node(node)

    # what serve() tells ----------------------------------------------------------------------

    def listening(self, host: str, port: int) -> None:
        """The HTTP server listens here now (known only once the site has started)."""
        self.http_host, self.http_port = host, port
        self._wake.set()  # registered with the right port at once

    # numbers ---------------------------------------------------------------------------------

    @property
    def _bus(self) -> ObservedBus | None:
        bus = self.services.bus
        return bus if isinstance(bus, ObservedBus) else None

    def load(self) -> dict[str, Any]:
        svc = self.services
        socketio, buffered = svc.hub.load()
        xmpp = svc.xmpp
        return {
            "connections": {
                "socketio": socketio,
                "xmpp": xmpp.connection_count if xmpp is not None else 0,
            },
            "xmpp_sessions": xmpp.session_count if xmpp is not None else 0,
            "hub_buffered": buffered,
            "stored": self._bus.published if self._bus is not None else 0,
            "delivered": EVENTS_DELIVERED.total(),
        }

    async def _count(self, collection: str, query: Document) -> int | None:
        try:
            return int(
                await asyncio.wait_for(
                    self.services.store[collection].count_documents(query),
                    DATABASE_GAUGE_TIMEOUT_SECONDS,
                )
            )
        except Exception as exc:  # a scrape never fails for a slow database
            log.debug("counting %s for /metrics failed: %r", collection, exc)
            return None

    async def collect(self) -> list[Family]:
        """The gauges of this hub, read now."""
        svc = self.services
        load = self.load()
        families = [
            Family("portalhub_info", "This node: its id and version", "gauge").add(
                1, node=self.node, version=__version__
            ),
        ]
        connections = Family("portalhub_connections", "Open client connections", "gauge")
        for transport, count in load["connections"].items():
            connections.add(count, transport=transport)
        families.append(connections)
        families.append(
            Family(
                "portalhub_xmpp_sessions", "Bound XMPP sessions (logged-in resources)", "gauge"
            ).add(load["xmpp_sessions"])
        )
        queues = Family(
            "portalhub_queue_depth",
            "Items waiting: stream_appends (events waiting for their stream's next batch), "
            "hub_replay_buffer (live events held for Socket.IO connections catching up), "
            "redis_unsent (publications kept while Redis is unreachable); mail_inbox_pending "
            "and mail_outbox_queued are the whole cluster's, read from the database",
            "gauge",
        )
        if isinstance(svc.streams, TracedStreamLog):
            queues.add(svc.streams.pending_appends, queue="stream_appends")
        queues.add(load["hub_buffered"], queue="hub_replay_buffer")
        if svc.redis_bus is not None:
            queues.add(svc.redis_bus.unsent_count, queue="redis_unsent")
        inbox, outbox = await asyncio.gather(
            self._count("mail_raw", {"status": "pending"}),
            self._count("mail_outbox", {"status": "queued"}),
        )
        if inbox is not None:
            queues.add(inbox, queue="mail_inbox_pending")
        if outbox is not None:
            queues.add(outbox, queue="mail_outbox_queued")
        families.append(queues)
        if svc.redis_bus is not None:
            families.append(
                Family(
                    "portalhub_redis_connected", "1 while the Redis bus is subscribed", "gauge"
                ).add(1 if svc.redis_bus.connected else 0)
            )
        families.extend(process_families())
        return families

    # the heartbeat ---------------------------------------------------------------------------

    def document(self) -> Document:
        """This node's entry in the registry."""
        svc = self.services
        load = self.load()
        now = time.monotonic()
        events_per_second = deliveries_per_second = 0.0
        if self._last_beat is not None:
            then, stored, delivered = self._last_beat
            elapsed = max(now - then, 1e-6)
            events_per_second = (load["stored"] - stored) / elapsed
            deliveries_per_second = (load["delivered"] - delivered) / elapsed
        self._last_beat = (now, load["stored"], load["delivered"])
        xmpp_ports = svc.xmpp.ports if svc.xmpp is not None else {}
        mail_ports = svc.mail.ports
        return {
            "_id": self.node,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "started_at": self.started_at,
            "last_seen": utcnow(),
            # "draining": told to stop (SIGTERM), still serving until its grace is over
            "state": "draining" if getattr(svc.hub, "draining", False) else "up",
            "interval_seconds": self.interval,
            "ports": {
                "http": self.http_port or self.settings.http_port or None,
                "xmpp_starttls": xmpp_ports.get("starttls"),
                "xmpp_tls": xmpp_ports.get("tls"),
                "smtp": mail_ports.get("smtp"),
                "lmtp": mail_ports.get("lmtp"),
            },
            "host": self.http_host or self.settings.host,
            "connections": load["connections"],
            "xmpp_sessions": load["xmpp_sessions"],
            "events_per_second": round(events_per_second, 2),
            "deliveries_per_second": round(deliveries_per_second, 2),
            "rss_bytes": resident_memory_bytes(),
            "open_fds": open_fds(),
            "redis": None if svc.redis_bus is None else svc.redis_bus.connected,
        }

    async def beat(self) -> None:
        store = self.services.store
        await store[nodes.COLLECTION].replace_one({"_id": self.node}, self.document(), upsert=True)
        await nodes.forget_lost(store)

    async def _heartbeat(self) -> None:
        failing = False
        while True:
            self._wake.clear()
            try:
                # in the gap after a batch of events, not beside a message's inserts
                await self.services.streams.after_batch(POLLER_GAP_WAIT)
                await self.beat()
                if failing:
                    log.info("node heartbeat written again")
                failing = False
            except Exception:
                raise_if_stopping()
                if not failing:  # once per outage, not every few seconds
                    log.exception("node heartbeat failed; retrying every %s s", self.interval)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._heartbeat(), name="node-heartbeat")

    async def stop(self) -> None:
        """Stop beating and leave the registry (a node that cannot is shown lost, then
        forgotten)."""
        if self._task is None:
            return
        await stop(self._task)
        self._task = None
        try:
            await asyncio.wait_for(
                self.services.store[nodes.COLLECTION].delete_one({"_id": self.node}), 5
            )
        except Exception:
            log.warning("could not remove node %s from the registry", self.node, exc_info=True)


OBSERVABILITY = web.AppKey("observability", Observability)
