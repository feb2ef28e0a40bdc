"""The hub's own Socket.IO transport (server/channels/engine.py, emit.py): direct writes with a
backlog per socket, one ping timer, and the python-socketio/python-engineio/aiohttp code it
was written against."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import inspect
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiohttp
import engineio.async_drivers.aiohttp
import engineio.async_server
import engineio.async_socket
import engineio.base_socket
import pytest
import socketio.async_manager
import socketio.async_server
import socketio.base_manager
import socketio.packet
from aiohttp import WSMsgType, base_protocol, web_protocol, web_response
from aiohttp._websocket import writer as ws_writer

from server.channels.engine import HubSocket
from server.channels.websocket import end_session
from server.events.models import Event
from server.settings import Settings
from server.store.database import Store
from tests.harness import HubHarness, start_hub

ROOM = "test:all"

# What server/channels/engine.py and emit.py were written against. They copy or replace
# parts of these libraries and rely on private attributes of aiohttp's protocol and writer.
WRITTEN_AGAINST = {"python-engineio": "4.15.1", "python-socketio": "5.18.1", "aiohttp": "3.14.5"}
COPIED_OR_REPLACED = {
    "engineio.async_server.AsyncServer._handle_connect": "5bd7edc1d1ae115a",
    "engineio.async_socket.AsyncSocket": "af72dafc541d46e6",
    "engineio.base_socket.BaseSocket": "d787ee3666d08b7a",
    "engineio.async_drivers.aiohttp.translate_request": "20aa782740060790",
    "engineio.async_drivers.aiohttp.WebSocket": "96fbcb0d1f45694a",
    "socketio.async_server.AsyncServer._handle_connect": "c97c480cf777de36",
    "socketio.async_server.AsyncServer._handle_disconnect": "c0b32ada5b371230",
    "socketio.async_manager.AsyncManager.emit": "01ccd5b82b4f955e",
    "socketio.base_manager.BaseManager": "b393b4c05dbd88e2",
    "socketio.packet.Packet.encode": "513c45be75181da2",
    "aiohttp.base_protocol.BaseProtocol": "b8cbe831e85f09b9",
    # its HTTP parser may be None once upgraded (every use after an upgrade checks)
    "aiohttp.web_protocol.RequestHandler": "3960a24b6f6b63e0",
    "aiohttp._websocket.writer.WebSocketWriter.__init__": "9a91e56ed2c2c11c",
}
_OBJECTS: dict[str, Any] = {
    "engineio.async_server.AsyncServer._handle_connect": (
        engineio.async_server.AsyncServer._handle_connect
    ),
    "engineio.async_socket.AsyncSocket": engineio.async_socket.AsyncSocket,
    "engineio.base_socket.BaseSocket": engineio.base_socket.BaseSocket,
    "engineio.async_drivers.aiohttp.translate_request": (
        engineio.async_drivers.aiohttp.translate_request
    ),
    "engineio.async_drivers.aiohttp.WebSocket": engineio.async_drivers.aiohttp.WebSocket,
    "socketio.async_server.AsyncServer._handle_connect": (
        socketio.async_server.AsyncServer._handle_connect
    ),
    "socketio.async_server.AsyncServer._handle_disconnect": (
        socketio.async_server.AsyncServer._handle_disconnect
    ),
    "socketio.async_manager.AsyncManager.emit": socketio.async_manager.AsyncManager.emit,
    "socketio.base_manager.BaseManager": socketio.base_manager.BaseManager,
    "socketio.packet.Packet.encode": socketio.packet.Packet.encode,
    "aiohttp.base_protocol.BaseProtocol": base_protocol.BaseProtocol,
    "aiohttp.web_protocol.RequestHandler": web_protocol.RequestHandler,
    "aiohttp._websocket.writer.WebSocketWriter.__init__": ws_writer.WebSocketWriter.__init__,
}


def test_the_libraries_are_the_ones_the_transport_was_written_against() -> None:
    """A new python-engineio, python-socketio or aiohttp must be read before it is let in:
    server/channels/engine.py and emit.py replace parts of them (see their docstrings).
    Compare the new code with what is copied there, adjust, then update these values."""
    versions = {name: importlib.metadata.version(name) for name in WRITTEN_AGAINST}
    assert versions == WRITTEN_AGAINST, (
        "python-engineio/python-socketio/aiohttp changed: re-check server/channels/engine.py "
        "and emit.py against the new code, then update WRITTEN_AGAINST"
    )
    digests = {
        name: hashlib.sha256(inspect.getsource(_OBJECTS[name]).encode()).hexdigest()[:16]
        for name in COPIED_OR_REPLACED
    }
    changed = [name for name, digest in digests.items() if digest != COPIED_OR_REPLACED[name]]
    assert not changed, f"library code the transport copies or relies on changed: {changed}"
    # what HubSocket relies on, by name
    assert {"_paused", "_drain_waiter", "_loop", "transport"} <= set(
        base_protocol.BaseProtocol.__slots__
    )
    source = inspect.getsource(ws_writer.WebSocketWriter.__init__)
    assert "self.protocol = protocol" in source and "self.transport = transport" in source
    # what _forget_handshake lets go of, and aiohttp's checks that make that safe
    slots = {
        name
        for cls in web_protocol.RequestHandler.__mro__
        for name in getattr(cls, "__slots__", ())
    }
    assert {"_parser", "_payload_parser", "_upgraded"} <= slots
    assert "self._headers" in inspect.getsource(web_response.StreamResponse.__init__)


def test_a_hub_socket_has_what_python_engineio_gives_a_socket() -> None:
    class Server:
        def create_queue(self) -> asyncio.Queue[Any]:
            return asyncio.Queue()

    library = engineio.base_socket.BaseSocket(Server(), "sid")
    ours = HubSocket(Server(), "sid")  # type: ignore[arg-type]
    for name in vars(library):
        assert hasattr(ours, name), name
    assert isinstance(ours.queue, asyncio.Queue) and ours.session == {}


# a raw Engine.IO client ------------------------------------------------------------------------


class RawClient:
    """A websocket speaking Engine.IO/Socket.IO by hand: it reads only when told to, and
    answers pings only if asked to."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.sid = ""
        self.events: list[tuple[str, Any]] = []
        self.pings = 0

    @classmethod
    async def connect(
        cls, http: aiohttp.ClientSession, hub: HubHarness, token: str, *, ready: str = "snapshot"
    ) -> RawClient:
        url = hub.base_url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
        client = cls(await http.ws_connect(url, max_msg_size=0))
        opening = await client.ws.receive_str(timeout=10)
        assert opening.startswith("0{")
        await client.ws.send_str("40" + json.dumps({"token": token}))
        await client.read_until(lambda: any(name == ready for name, _ in client.events))
        return client

    async def read_one(self, timeout: float = 10.0, pong: bool = True) -> bool:
        """One frame; False once the connection is closed."""
        msg = await self.ws.receive(timeout=timeout)
        if msg.type is not WSMsgType.TEXT:
            return False
        text: str = msg.data
        if text == "2":
            self.pings += 1
            if pong:
                await self.ws.send_str("3")
        elif text.startswith("40"):
            self.sid = json.loads(text[2:])["sid"]
        elif text.startswith("42"):
            name, *data = json.loads(text[2:])
            self.events.append((name, data[0] if data else None))
        return True

    async def read_until(self, done: Any, timeout: float = 10.0, pong: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"not done; last events {self.events[-3:]}"
            assert await self.read_one(remaining, pong), "the connection closed"

    def seqs(self, name: str = "test.big") -> list[int]:
        return [data["seq"] for event, data in self.events if event == name]


@asynccontextmanager
async def hub_with(settings: Settings, store: Store, **changes: Any) -> AsyncIterator[HubHarness]:
    async with start_hub(settings.model_copy(update=changes), store) as hub:
        yield hub


def big_event(seq: int, size: int = 16_000) -> Event:
    return Event(ROOM, seq, "test.big", {"n": seq, "text": "x" * size}, datetime.now(UTC))


async def read_all(clients: list[RawClient], seqs: list[int]) -> None:
    """Each of ``clients`` has read exactly the events ``seqs``, in order."""
    for client in clients:
        await client.read_until(lambda c=client: len(c.seqs()) >= len(seqs))
        assert client.seqs() == seqs


async def join_room(hub: HubHarness) -> None:
    for sid in list(hub.services.hub._connections):
        await hub.services.hub.sio.enter_room(sid, ROOM)


def small_send_buffer(hub: HubHarness, sid: str) -> None:
    """Shrink the kernel's send buffer of the hub's side of ``sid``: a stalled client fills
    it, and then the hub's own buffers, sooner."""
    socket_ = hub.services.hub.sio.engine_socket(sid)
    assert socket_ is not None and socket_.transport is not None
    raw = socket_.transport.get_extra_info("socket")
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)


# the tests -------------------------------------------------------------------------------------


async def test_a_client_that_stops_reading_is_cut_off_and_slows_nobody(
    settings: Settings, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="server.channels.engine")
    async with hub_with(settings, store, socket_send_backlog_bytes=64 * 1024) as hub:
        _, slow_token = await hub.create_user("slow")
        _, token = await hub.create_user("fast")
        async with aiohttp.ClientSession() as http:
            slow = await RawClient.connect(http, hub, slow_token)
            fast = [await RawClient.connect(http, hub, token) for _ in range(2)]
            await join_room(hub)
            small_send_buffer(hub, slow.sid)
            hub_ = hub.services.hub
            slowest_publish = 0.0
            seq = 0
            # the slow client reads nothing from here on; the others read everything
            while slow.sid in hub_._connections:
                seq += 1
                assert seq < 3000, "the client that does not read was never cut off"
                started = time.perf_counter()
                await hub_._on_event(big_event(seq))
                slowest_publish = max(slowest_publish, time.perf_counter() - started)
                for client in fast:
                    await client.read_until(lambda c=client, n=seq: len(c.seqs()) >= n, timeout=5)
            # a publish is one synchronous pass of writes: nobody waited for the slow client
            assert slowest_publish < 1.0
            for client in fast:
                assert client.seqs() == list(range(1, seq + 1))
            # its connection is closed: what it reads now ends
            with pytest.raises(AssertionError, match="closed"):
                await slow.read_until(lambda: False, timeout=10)
            assert len(slow.seqs()) < seq
            cut = [r for r in caplog.records if "does not read" in r.getMessage()]
            assert len(cut) == 1, cut
            # and the others go on
            seq += 1
            await hub_._on_event(big_event(seq))
            for client in fast:
                await client.read_until(lambda c=client, n=seq: len(c.seqs()) >= n)
            await http.close()


async def test_what_waits_for_a_slow_client_arrives_in_order(
    settings: Settings, store: Store
) -> None:
    async with hub_with(settings, store, socket_send_backlog_bytes=8 * 1024 * 1024) as hub:
        _, token = await hub.create_user("alice")
        async with aiohttp.ClientSession() as http:
            client = await RawClient.connect(http, hub, token)
            await join_room(hub)
            small_send_buffer(hub, client.sid)
            hub_ = hub.services.hub
            engine_socket = hub_.sio.engine_socket(client.sid)
            assert engine_socket is not None
            # the client does not read: writes go to the transport, then to the backlog
            seq, queued_after = 0, None
            while queued_after is None or seq < queued_after + 20:
                seq += 1
                assert seq < 3000, "nothing ever waited in the backlog"
                await hub_._on_event(big_event(seq))
                if queued_after is None and engine_socket.backlog is not None:
                    queued_after = seq
            assert engine_socket.backlog is not None and engine_socket.backlog_bytes > 0
            # it reads again: everything, once, in order; then live writes go direct again
            await client.read_until(lambda: len(client.seqs()) >= seq, timeout=30)
            assert engine_socket.backlog is None
            for _ in range(5):
                seq += 1
                await hub_._on_event(big_event(seq, size=100))
            await client.read_until(lambda: len(client.seqs()) >= seq)
            assert client.seqs() == list(range(1, seq + 1))
            assert client.sid in hub_._connections
            await http.close()


async def test_what_a_turn_of_the_loop_sends_a_socket_goes_in_one_write(
    settings: Settings, store: Store
) -> None:
    async with hub_with(settings, store) as hub:
        _, token = await hub.create_user("alice")
        async with aiohttp.ClientSession() as http:
            clients = [await RawClient.connect(http, hub, token) for _ in range(2)]
            await join_room(hub)
            hub_ = hub.services.hub
            writes: dict[str, list[bytes]] = {}
            for client in clients:
                engine_socket = hub_.sio.engine_socket(client.sid)
                assert engine_socket is not None and engine_socket.transport is not None
                transport = engine_socket.transport
                calls = writes[client.sid] = []

                def spy(data: bytes, write: Any = transport.write, calls: Any = calls) -> None:
                    calls.append(bytes(data))
                    write(data)

                transport.write = spy  # type: ignore[method-assign,assignment]
            # three events published in one turn (no await suspends in between)
            for seq in (1, 2, 3):
                await hub_._on_event(big_event(seq, size=100))
            assert all(calls == [] for calls in writes.values())  # not yet: end of the turn
            await read_all(clients, [1, 2, 3])
            assert all(len(calls) == 1 for calls in writes.values()), writes
            # a later turn's event is a write of its own, after them
            await hub_._on_event(big_event(4, size=100))
            await read_all(clients, [1, 2, 3, 4])
            assert all(len(calls) == 2 for calls in writes.values())
            # a close sent in the same turn as an event goes after it
            engine_socket = hub_.sio.engine_socket(clients[0].sid)
            assert engine_socket is not None
            await hub_._on_event(big_event(5, size=100))
            engine_socket.end_websocket(None)
            with pytest.raises(AssertionError, match="closed"):
                await clients[0].read_until(lambda: False)
            assert clients[0].seqs() == [1, 2, 3, 4, 5]
            await http.close()


async def test_a_transport_that_fails_its_write_does_not_hold_the_others_frames(
    settings: Settings, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The frames of a turn are written for every socket in one callback: one transport whose
    write raises is logged, and the sockets after it still get theirs, then and later."""
    async with hub_with(settings, store) as hub:
        _, token = await hub.create_user("alice")
        async with aiohttp.ClientSession() as http:
            clients = [await RawClient.connect(http, hub, token) for _ in range(3)]
            await join_room(hub)
            hub_ = hub.services.hub
            broken = hub_.sio.engine_socket(clients[0].sid)
            assert broken is not None and broken.transport is not None
            failures: list[int] = []

            def refuse(data: bytes) -> None:
                failures.append(len(data))
                raise RuntimeError("this transport cannot write")

            broken.transport.write = refuse  # type: ignore[method-assign,assignment]
            with caplog.at_level(logging.ERROR, logger="server.channels.engine"):
                # the broken socket first in the turn's list, whatever order the room has
                broken.write_frame(b"")
                await hub_._on_event(big_event(1, size=100))
                await read_all(clients[1:], [1])
            assert len(failures) == 1
            assert "writing to socket" in caplog.text
            assert broken.corked is None  # nothing left waiting on it
            await hub_._on_event(big_event(2, size=100))
            await read_all(clients[1:], [1, 2])
            await asyncio.sleep(0)
            assert len(failures) == 2  # the broken one was tried again, on its own
            await http.close()


async def test_a_websocket_that_does_not_answer_pings_is_dropped(
    settings: Settings, store: Store
) -> None:
    async with hub_with(settings, store) as hub:
        engine = hub.services.hub.sio.eio
        # (told to clients at OPEN; python-engineio truncates to whole seconds)
        engine.ping_interval, engine.ping_timeout = 1, 1
        _, token = await hub.create_user("alice")
        polite = await hub.connect(token)  # python-socketio's client answers pings
        await polite.wait_for("snapshot")
        async with aiohttp.ClientSession() as http:
            silent = await RawClient.connect(http, hub, token)
            assert silent.sid in hub.services.hub._connections
            started = time.monotonic()
            with pytest.raises(AssertionError, match="closed"):
                await silent.read_until(lambda: False, timeout=10, pong=False)
            # a ping was sent, not answered, and the connection went within interval +
            # timeout (each rounded up to the clock's slots) and a close
            assert silent.pings >= 1
            assert time.monotonic() - started < 4
            await polite.wait_until(lambda: silent.sid not in hub.services.hub._connections)
            await http.close()
        await asyncio.sleep(4)  # several ping rounds
        assert polite.sio.connected
        assert await polite.call("ping", {}) == {"ok": True}


async def test_a_session_ended_during_its_connect_leaves_nothing_behind(
    hub: HubHarness,
) -> None:
    """The Engine.IO session ends while the connect handler still authenticates (the auth
    deadline, a drain, a long-polling client's CLOSE in a request of its own): python-socketio
    skips the disconnect handler (not connected yet) and registers the connection after all."""
    hub_ = hub.services.hub
    session_for = hub_._auth.session_for
    authenticating = asyncio.Event()
    ended = asyncio.Event()

    async def slow_session_for(token: str | None) -> Any:
        authenticating.set()
        await ended.wait()
        return await session_for(token)

    hub_._auth.session_for = slow_session_for  # type: ignore[method-assign]
    _, token = await hub.create_user("alice")
    url = hub.base_url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url)
        assert (await ws.receive_str(timeout=10)).startswith("0{")
        await ws.send_str("40" + json.dumps({"token": token}))
        await asyncio.wait_for(authenticating.wait(), 10)
        [eio_sid] = hub_.sio.eio.sockets
        await end_session(hub_.sio.eio, eio_sid)  # as the auth deadline does
        ended.set()
        deadline = time.monotonic() + 5
        while hub_.sio.eio.sockets and time.monotonic() < deadline:  # noqa: ASYNC110 - the hub's state
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the connect handler has finished by now
        assert hub_._connections == {} and hub_._by_user == {}
        assert hub_.sio.eio.sockets == {}
        rooms = hub_.sio.manager.rooms.get("/", {})
        assert all(not members for members in rooms.values()), rooms
        await ws.close()


async def test_a_replay_goes_at_the_pace_of_a_slow_reader(settings: Settings, store: Store) -> None:
    """A reconnecting client is sent what it missed from history: far more than the backlog
    may hold. The replay waits for the client instead of filling the backlog (and getting the
    client cut off); the client gets it all, in order."""
    async with hub_with(settings, store, socket_send_backlog_bytes=64 * 1024) as hub:
        user_id, token = await hub.create_user("alice")
        stream = f"user:{user_id}"
        streams = hub.services.streams
        for _ in range(4):
            await asyncio.gather(
                *(streams.append(stream, "test.big", {"text": "x" * 2000}) for _ in range(100))
            )
        async with aiohttp.ClientSession() as http:
            url = hub.base_url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
            client = RawClient(await http.ws_connect(url, max_msg_size=0))
            assert (await client.ws.receive_str(timeout=10)).startswith("0{")
            await client.ws.send_str("40" + json.dumps({"token": token, "since": {stream: 0}}))
            await client.read_until(lambda: bool(client.sid))
            small_send_buffer(hub, client.sid)
            engine_socket = hub.services.hub.sio.engine_socket(client.sid)
            assert engine_socket is not None
            # the client reads nothing for a while: the replay stops at the backlog
            waited = False
            for _ in range(40):
                await asyncio.sleep(0.05)
                waited = waited or engine_socket.backlog is not None
            assert client.sid in hub.services.hub._connections, "cut off while catching up"
            assert waited, "the replay never had to wait for the client"
            assert engine_socket.backlog_bytes <= 64 * 1024
            await client.read_until(lambda: len(client.seqs()) >= 400, timeout=30)
            assert client.seqs() == list(range(1, 401))
            assert client.sid in hub.services.hub._connections
            await http.close()


async def test_connections_of_one_user_share_its_document(hub: HubHarness) -> None:
    """Several tabs of one user: each connection kept its own copy of the user document, a
    few KiB per idle connection. An equal document is shared; a changed one is not."""
    user_id, token = await hub.create_user("alice")
    await hub.connect(token)
    await hub.connect(token)
    first, second = hub.services.hub.connections_of(user_id)
    assert first.user is second.user
    users = hub.services.store.users
    await users.update_one({"_id": first.user["_id"]}, {"$set": {"position": "Engineer"}})
    hub.services.directory.forget_user(user_id)  # (the bus does this after a change by the API)
    await hub.connect(token)
    [third] = [c for c in hub.services.hub.connections_of(user_id) if c not in (first, second)]
    assert third.user is not first.user
    assert third.user["position"] == "Engineer" and first.user.get("position") != "Engineer"
