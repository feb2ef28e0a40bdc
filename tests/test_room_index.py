"""RoomIndex.enter_rooms: entering a connection's rooms in one pass leaves the manager exactly
as python-socketio's ``basic_enter_room`` a room at a time does (rooms, their inverse maps,
the connection's room list), and leaving and disconnecting undo it."""

from __future__ import annotations

from typing import Any

import pytest

from server.channels.emit import HubManager


def manager_with(connections: int) -> tuple[HubManager, list[str]]:
    """A manager with ``connections`` connected as python-socketio connects them (a room
    ``None`` of all, and a room of each connection's own)."""
    manager = HubManager()
    sids = [f"sid{i}" for i in range(connections)]
    for i, sid in enumerate(sids):
        manager.basic_enter_room(sid, "/", None, eio_sid=f"eio{i}")
        manager.basic_enter_room(sid, "/", sid, eio_sid=f"eio{i}")
    return manager, sids


def state(manager: HubManager) -> dict[Any, Any]:
    return {
        room: (dict(members), dict(members.inverse)) for room, members in manager.rooms["/"].items()
    }


def test_one_pass_equals_a_room_at_a_time() -> None:
    rooms = ["user:a", "chat:1", "chat:2", "chat:1"]
    one, one_sids = manager_with(2)
    other, other_sids = manager_with(2)
    for sid in one_sids:
        one.enter_rooms(sid, "/", rooms)
    for sid in other_sids:
        for room in rooms:
            other.basic_enter_room(sid, "/", room)
    assert one_sids == other_sids
    assert state(one) == state(other)
    assert state(one)["chat:1"][1] == {"eio0": one_sids[0], "eio1": one_sids[1]}
    for sid in one_sids:
        assert one.get_rooms(sid, "/") == other.get_rooms(sid, "/")
    assert sorted(p[0] for p in one.get_participants("/", "chat:2")) == sorted(one_sids)


def test_leaving_and_disconnecting_undo_it() -> None:
    manager, (first, second) = manager_with(2)
    manager.enter_rooms(first, "/", ["chat:1", "chat:2"])
    manager.enter_rooms(second, "/", ["chat:2"])
    manager.basic_leave_room(first, "/", "chat:1")
    assert "chat:1" not in manager.rooms["/"]
    manager.basic_disconnect(first, "/")
    assert dict(manager.rooms["/"]["chat:2"]) == {second: "eio1"}
    assert manager.get_rooms(first, "/") == []


def test_a_sid_room_is_refused() -> None:
    manager, (first, second) = manager_with(2)
    with pytest.raises(ValueError):
        manager.enter_rooms(first, "/", [second])
