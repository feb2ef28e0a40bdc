"""python-socketio's server with the hub's emit: encode once, write once per socket, no task.

python-socketio's ``AsyncManager.emit`` encodes a packet once but then starts a task per
recipient, each handing the packet to that socket's Engine.IO queue, from which the socket's
writer task sends it. ``HubServer.emit_local`` does the whole broadcast in one synchronous
pass: the Socket.IO packet text and the websocket frame are built once, and each websocket
in the room gets the same bytes written to its transport (``HubSocket.write_frame``, which
keeps a backlog for a client that reads slowly). A long-polling socket gets the Engine.IO
packet put in its queue, as python-socketio would. Rooms, ``skip_sid``, ``to=sid`` and
several rooms at once mean what they mean in python-socketio; what this path does not take
(a namespace other than ``/``, an ack callback, binary data) goes to python-socketio's own
emit. Emits are local only: every node delivers the bus's events to its own connections (so
a client manager's queue, Redis, is never used here).

Also: ``on_connected`` is called once a connection's CONNECT packet has gone out (nothing may
be sent to it before), and a connection whose client left while its connect handler ran is
disconnected properly (python-socketio skips the disconnect handler of a connection that was
not connected yet when its Engine.IO session ended).

Written against python-socketio 5.18.1 (see ``server/channels/engine.py`` for the check).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import socketio
from bidict import bidict
from engineio import packet as eio_packet

from server.channels.engine import HubEngineServer, HubSocket, text_frame

_SEPARATORS = (",", ":")
# A room's members are a bidict (sid <-> engine.io sid) whose whole state is these two dicts
# (bidict 0.24); emit_local reads the first, enter_rooms writes both. Checked at import:
# otherwise enter_rooms takes python-socketio's way, a room at a time.
_BIDICT_MAPS = set(vars(bidict({"s": "e"}))) == {"_fwdm", "_invm"}


class RoomIndex:
    """python-socketio's manager, with the rooms of each connection indexed: its
    ``basic_disconnect`` looks for the leaving connection in every room of the namespace,
    which made each disconnect cost as much as there are connections (each has a room of its
    own), and a reconnect storm quadratic. Here it leaves the rooms it is in."""

    rooms: dict[str, dict[Any, Any]]
    callbacks: dict[str, Any]
    pending_connect: dict[str, list[str]]
    pending_disconnect: dict[str, list[str]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rooms_of: dict[tuple[str, str], list[Any]] = {}

    def basic_enter_room(
        self, sid: str, namespace: str, room: Any, eio_sid: str | None = None
    ) -> None:
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)  # type: ignore[misc]
        rooms = self._rooms_of.setdefault((namespace, sid), [])
        if room not in rooms:
            rooms.append(room)

    def enter_rooms(self, sid: str, namespace: str, rooms: Iterable[str]) -> None:
        """``basic_enter_room`` of a connection of this node for each of ``rooms``, in one
        pass. python-socketio's call per room (checks, lookups, bidict's checked put) cost
        about 5 us a room, and a connect enters every chat of its user: 0.2 ms per connect
        for a user in 40 chats. Here the connection's engine.io sid is looked up once and
        written straight into each room's two maps: it belongs to this one connection, so
        it can clash with nothing a checked put would look for."""
        if not _BIDICT_MAPS:
            for room in rooms:
                self.basic_enter_room(sid, namespace, room)
            return
        ns = self.rooms[namespace]
        own = ns[None]
        eio_sid = own[sid]
        mine = self._rooms_of.setdefault((namespace, sid), [])
        held = set(mine)
        for room in rooms:
            if room != sid and room in own:
                raise ValueError("cannot enter a sid room")
            members = ns.get(room)
            if members is None:
                members = ns[room] = bidict()
            if sid not in members._fwdm:
                members._fwdm[sid] = eio_sid
                members._invm[eio_sid] = sid
            if room not in held:
                held.add(room)
                mine.append(room)

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        super().basic_leave_room(sid, namespace, room)  # type: ignore[misc]
        rooms = self._rooms_of.get((namespace, sid))
        if rooms is not None and room in rooms:
            rooms.remove(room)
            if not rooms:
                del self._rooms_of[(namespace, sid)]

    def get_rooms(self, sid: str, namespace: str) -> list[Any]:
        return [r for r in self._rooms_of.get((namespace, sid), ()) if r is not None]

    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        # python-socketio's, but for the lookup of the connection's rooms
        if namespace not in self.rooms:
            return
        for room in list(self._rooms_of.get((namespace, sid), ())):
            self.basic_leave_room(sid, namespace, room)
        self._rooms_of.pop((namespace, sid), None)
        if sid in self.callbacks:
            del self.callbacks[sid]
        for pending in (self.pending_connect, self.pending_disconnect):
            if namespace in pending and sid in pending[namespace]:
                pending[namespace].remove(sid)
                if len(pending[namespace]) == 0:
                    del pending[namespace]


class HubManager(RoomIndex, socketio.AsyncManager):  # type: ignore[misc]
    """The client manager of a single node."""


class HubRedisManager(RoomIndex, socketio.AsyncRedisManager):  # type: ignore[misc]
    """The client manager of nodes sharing Redis (Socket.IO traffic of other processes; the
    hub's own emits never go through it: see the module docstring)."""


class HubServer(socketio.AsyncServer):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_connected: Callable[[str], None] | None = None

    def _engineio_server_class(self) -> type[HubEngineServer]:
        return HubEngineServer

    def engine_socket(self, sid: str) -> HubSocket | None:
        eio_sid = self.manager.eio_sid_from_sid(sid, "/")
        socket: HubSocket | None = self.eio.sockets.get(eio_sid) if eio_sid else None
        return socket

    def emit_local(
        self,
        event: str,
        data: Any,
        *,
        to: str | list[str] | None = None,
        room: str | list[str] | None = None,
        skip_sid: str | Iterable[str] | None = None,
        namespace: str | None = None,
        callback: Any = None,
    ) -> int | None:
        """Emit to this node's connections in ``to``/``room`` now, synchronously. Returns how
        many sockets it was written or queued to, or None when this path does not take the
        emit (python-socketio's ``emit`` must do it)."""
        target = to or room
        if (namespace or "/") != "/" or callback is not None or target is None:
            return None
        rooms = self.manager.rooms.get("/")
        if not rooms:
            return 0
        if isinstance(target, str):
            members = rooms.get(target)
            if not members:
                return 0
            participants = members._fwdm
        else:
            participants = {}
            for name in target:
                members = rooms.get(name)
                if members:
                    participants.update(members._fwdm)
        if isinstance(data, tuple):
            args = [event, *data]
        elif data is None:
            args = [event]
        else:
            args = [event, data]
        try:
            # python-socketio's encoding: an EVENT (2) packet in an Engine.IO MESSAGE (4)
            text = "42" + json.dumps(args, separators=_SEPARATORS)
        except TypeError:
            return None  # binary (or not JSON): python-socketio's own path
        if skip_sid is None:
            skip: Any = ()
        elif isinstance(skip_sid, str):
            skip = (skip_sid,)
        else:
            skip = skip_sid if isinstance(skip_sid, set | frozenset) else set(skip_sid)
        sockets = self.eio.sockets
        frame: bytes | None = None
        queued: eio_packet.Packet | None = None
        count = 0
        for sid, eio_sid in participants.items():
            if sid in skip:
                continue
            socket = sockets.get(eio_sid)
            if socket is None or socket.closed:
                continue
            if socket.websocket is not None:
                if frame is None:
                    frame = text_frame(text)
                socket.write_frame(frame)
            else:
                if queued is None:
                    queued = eio_packet.Packet(eio_packet.MESSAGE, text[1:])
                socket.send_now(queued)
            count += 1
        return count

    async def _handle_connect(self, eio_sid: str, namespace: str | None, data: Any) -> None:
        await super()._handle_connect(eio_sid, namespace, data)
        namespace = namespace or "/"
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        if sid is None or not self.manager.is_connected(sid, namespace):
            return  # refused
        socket = self.eio.sockets.get(eio_sid)
        if socket is None or socket.closing or socket.closed:
            # The client left while the connect handler ran. python-socketio did not call
            # the disconnect handler then (not connected yet), and then connected it anyway.
            await self._handle_disconnect(eio_sid, namespace, self.reason.TRANSPORT_CLOSE)
            return
        if self.on_connected is not None:
            self.on_connected(sid)
