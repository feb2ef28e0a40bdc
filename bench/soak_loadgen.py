"""The soak part's load generator (``bench/soak.py``): many Socket.IO clients and the senders.

``python -m bench.soak_loadgen`` reads one JSON command per line on stdin and answers each
with one JSON line on stdout:

- ``setup``: the clients, each ``{token, chats}`` (the chat ids its user is a member of);
- ``connect``: ``{moves: [[client, url], ...], parallel}``: (re)connect those clients to those
  nodes (python-socketio ``AsyncClient``, websocket transport only). A client that is
  connected is closed first and connects again with ``since`` = its last seq per stream, so it
  misses nothing;
- ``publish``: ``{label, rate, duration, drain, urls, chats: [{chat_id, tokens}]}``: an open
  loop at ``rate`` messages/s for ``duration`` s: message ``k`` goes to chat ``k mod n``,
  from one of its members, through ``urls[k mod len]`` (``POST /api/v1/im/messages`` with a
  ``client_id`` of its own, retried once with the same id). Then it waits (at most ``drain``
  s) until every expected copy has arrived, and answers the phase's figures, with 10 s windows;
- ``account``: every message of the run, every client: missing, duplicated, out of order;
- ``exit``.

Times come from ``time.monotonic()`` of this process: the send time is taken just before
the POST, the receive time in the client's event handler. Only the given URLs (loopback) are
used, and every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import socketio

Results = dict[str, Any]
WINDOW = 10.0  # seconds per timeline window
MAX_IN_FLIGHT = 256  # POSTs at once; beyond that the sender falls behind (counted)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Sent:
    chat: str
    at: float
    label: str
    expected: int
    arrived: int = 0


@dataclass
class Client:
    index: int
    token: str
    chats: set[str]
    url: str = ""
    sio: socketio.AsyncClient | None = None
    positions: dict[str, int] = field(default_factory=dict)  # stream -> last seq seen
    received: set[str] = field(default_factory=set)  # client ids of messages received
    connects: int = 0
    disconnects: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    resyncs: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Generator:
    def __init__(self) -> None:
        self.clients: list[Client] = []
        self.sent: dict[str, Sent] = {}
        self.by_chat: dict[str, int] = {}  # chat -> connections of its members (all clients)
        self.latencies: dict[str, list[float]] = {}
        self.windows: dict[str, dict[int, list[float]]] = {}
        self.phase_start: dict[str, float] = {}
        self.unexpected = 0
        self.post_failed = 0
        self.post_retried = 0
        self.connect_errors = 0
        self.opened = 0  # connections opened by a ``connect`` command
        self.session: aiohttp.ClientSession | None = None

    # clients ------------------------------------------------------------------------------

    def setup(self, cmd: Results) -> Results:
        for spec in cmd["clients"]:
            self.clients.append(Client(len(self.clients), spec["token"], set(spec["chats"])))
        for client in self.clients:
            for chat in client.chats:
                self.by_chat[chat] = self.by_chat.get(chat, 0) + 1
        return {"ok": True, "clients": len(self.clients)}

    def _handlers(self, client: Client, sio: socketio.AsyncClient) -> None:
        async def on_connect() -> None:
            client.connects += 1

        async def on_disconnect(*_: Any) -> None:
            client.disconnects += 1

        async def on_event(event: str, data: Any = None) -> None:
            now = time.monotonic()
            if event == "snapshot" and isinstance(data, dict):
                for stream, head in (data.get("streams") or {}).items():
                    if isinstance(head, int) and stream not in client.positions:
                        client.positions[stream] = head
                client.ready.set()
                return
            if event == "resync":
                client.resyncs += 1
                return
            if not isinstance(data, dict) or "seq" not in data or "stream" not in data:
                return
            stream, seq = str(data["stream"]), int(data["seq"])
            last = client.positions.get(stream)
            in_order = last is None or seq > last
            if in_order:
                client.positions[stream] = seq
            if event != "im.message":
                if not in_order:
                    client.out_of_order += 1
                return
            message = (data.get("data") or {}).get("message") or {}
            cid = message.get("client_id")
            if not isinstance(cid, str):
                return
            sent = self.sent.get(cid)
            if sent is None:
                if cid.startswith("soak-"):
                    self.unexpected += 1
                return
            if cid in client.received:
                client.duplicated += 1
                return
            if not in_order:
                client.out_of_order += 1
            client.received.add(cid)
            sent.arrived += 1
            latency = now - sent.at
            self.latencies[sent.label].append(latency)
            start = self.phase_start[sent.label]
            self.windows[sent.label].setdefault(int((sent.at - start) / WINDOW), []).append(latency)

        sio.on("connect", on_connect)
        sio.on("disconnect", on_disconnect)
        sio.on("*", on_event)

    async def _connect_one(self, client: Client, url: str, gate: asyncio.Semaphore) -> bool:
        async with gate:
            if client.sio is not None:
                old, client.sio = client.sio, None
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(old.disconnect(), 10)
            sio = socketio.AsyncClient(reconnection=True, reconnection_delay=1, request_timeout=30)
            self._handlers(client, sio)
            client.url = url
            client.ready = asyncio.Event()

            def auth() -> dict[str, Any]:
                # called on every (re)connection: resume from what has arrived
                return {"token": client.token, "since": dict(client.positions)}

            for _attempt in range(3):
                try:
                    await sio.connect(url, transports=["websocket"], auth=auth, wait_timeout=30)
                    await asyncio.wait_for(client.ready.wait(), 60)
                    client.sio = sio
                    self.opened += 1
                    return True
                except Exception:
                    self.connect_errors += 1
                    with contextlib.suppress(Exception):
                        await sio.disconnect()
                    await asyncio.sleep(1)
            return False

    async def connect(self, cmd: Results) -> Results:
        gate = asyncio.Semaphore(int(cmd.get("parallel", 20)))
        started = time.monotonic()
        done = await asyncio.gather(
            *(self._connect_one(self.clients[i], url, gate) for i, url in cmd["moves"])
        )
        seconds = time.monotonic() - started
        return {
            "ok": all(done),
            "connected": sum(done),
            "failed": len(done) - sum(done),
            "seconds": seconds,
            "per_second": len(done) / seconds if seconds else None,
        }

    # senders ------------------------------------------------------------------------------

    async def _post(self, url: str, token: str, chat: str, cid: str, text: str) -> bool:
        assert self.session is not None
        body = {"chat_id": chat, "text": text, "client_id": cid}
        headers = {"Authorization": f"Bearer {token}"}
        for attempt in range(2):
            try:
                async with self.session.post(url, json=body, headers=headers) as response:
                    await response.read()
                    if response.status < 300:
                        return True
            except (aiohttp.ClientError, TimeoutError):
                pass
            if attempt == 0:
                self.post_retried += 1
                await asyncio.sleep(0.5)
        self.post_failed += 1
        return False

    async def publish(self, cmd: Results) -> Results:
        label = str(cmd["label"])
        rate, duration = float(cmd["rate"]), float(cmd["duration"])
        urls = [u.rstrip("/") + "/api/v1/im/messages" for u in cmd["urls"]]
        chats: list[Results] = cmd["chats"]
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
            self.session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=30)
            )
        self.latencies[label] = []
        self.windows[label] = {}
        start = time.monotonic()
        self.phase_start[label] = start
        total = int(rate * duration)
        gate = asyncio.Semaphore(MAX_IN_FLIGHT)
        behind = 0
        tasks: set[asyncio.Task[bool]] = set()
        mine: list[str] = []
        for k in range(total):
            due = start + k / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.1:
                behind += 1
            chat = chats[k % len(chats)]
            tokens = chat["tokens"]
            token = tokens[(k // len(chats)) % len(tokens)]
            cid = f"soak-{label}-{k}".replace(" ", "_")[:64]
            self.sent[cid] = Sent(
                chat["chat_id"], time.monotonic(), label, self.by_chat.get(chat["chat_id"], 0)
            )
            mine.append(cid)
            await gate.acquire()

            async def send(url: str, token: str, chat_id: str, cid: str) -> bool:
                try:
                    ok = await self._post(url, token, chat_id, cid, f"soak message {cid}")
                    if not ok:  # not stored (as far as we know): nobody should get it
                        self.sent[cid].expected = 0
                    return ok
                finally:
                    gate.release()

            task = asyncio.create_task(send(urls[k % len(urls)], token, chat["chat_id"], cid))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        send_seconds = time.monotonic() - start
        if tasks:
            await asyncio.wait(tasks, timeout=60)
        deadline = time.monotonic() + float(cmd.get("drain", 15))
        while time.monotonic() < deadline:
            if all(self.sent[c].arrived >= self.sent[c].expected for c in mine):
                break
            await asyncio.sleep(0.1)
        drained = time.monotonic() - start
        expected = sum(self.sent[c].expected for c in mine)
        arrived = sum(min(self.sent[c].arrived, self.sent[c].expected) for c in mine)
        lat = self.latencies[label]
        timeline = []
        for index in sorted(self.windows[label]):
            values = self.windows[label][index]
            timeline.append(
                {
                    "t": index * WINDOW,
                    "deliveries": len(values),
                    "p50_ms": _ms(percentile(values, 0.5)),
                    "p99_ms": _ms(percentile(values, 0.99)),
                }
            )
        return {
            "ok": True,
            "label": label,
            "rate": rate,
            "sent": total,
            "send_seconds": send_seconds,
            "sent_per_second": total / send_seconds if send_seconds else None,
            "behind": behind,
            "expected": expected,
            "arrived": arrived,
            "missing": expected - arrived,
            "drain_seconds": drained - send_seconds,
            "deliveries_per_second": len(lat) / send_seconds if send_seconds else None,
            "messages_per_second": (total / send_seconds) if arrived == expected else None,
            "p50_ms": _ms(percentile(lat, 0.5)),
            "p99_ms": _ms(percentile(lat, 0.99)),
            "max_ms": _ms(max(lat) if lat else None),
            "post_failed": self.post_failed,
            "timeline": timeline,
        }

    # accounting ---------------------------------------------------------------------------

    def account(self) -> Results:
        expected = delivered = missing = 0
        stored: dict[str, list[str]] = {}  # chat -> client ids of its stored messages
        for cid, sent in self.sent.items():
            if sent.expected > 0:
                stored.setdefault(sent.chat, []).append(cid)
        for client in self.clients:
            for chat in client.chats:
                for cid in stored.get(chat, ()):
                    expected += 1
                    if cid in client.received:
                        delivered += 1
                    else:
                        missing += 1
        return {
            "ok": True,
            "clients": len(self.clients),
            "sent": len(self.sent),
            "stored": sum(len(v) for v in stored.values()),
            "post_failed": self.post_failed,
            "post_retried": self.post_retried,
            "expected": expected,
            "delivered": delivered,
            "missing": missing,
            "duplicated": sum(c.duplicated for c in self.clients),
            "out_of_order": sum(c.out_of_order for c in self.clients),
            "unexpected": self.unexpected,
            "resyncs": sum(c.resyncs for c in self.clients),
            "connects": sum(c.connects for c in self.clients),
            # connections the clients made again by themselves, after a drop
            "reconnects": sum(c.connects for c in self.clients) - self.opened,
            "connect_errors": self.connect_errors,
            "connected_now": sum(1 for c in self.clients if c.sio is not None and c.sio.connected),
        }

    async def close(self) -> None:
        for client in self.clients:
            if client.sio is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.sio.disconnect(), 5)
        if self.session is not None:
            await self.session.close()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


async def main() -> None:
    gen = Generator()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            name = cmd.get("cmd")
            try:
                if name == "setup":
                    reply = gen.setup(cmd)
                elif name == "connect":
                    reply = await gen.connect(cmd)
                elif name == "publish":
                    reply = await gen.publish(cmd)
                elif name == "account":
                    reply = gen.account()
                elif name == "exit":
                    print(json.dumps({"ok": True}), flush=True)
                    break
                else:
                    reply = {"ok": False, "error": f"unknown command {name}"}
            except Exception as exc:  # reported to the driver, which stops the run
                reply = {"ok": False, "error": repr(exc)}
            print(json.dumps(reply), flush=True)
    finally:
        await gen.close()


if __name__ == "__main__":
    asyncio.run(main())
