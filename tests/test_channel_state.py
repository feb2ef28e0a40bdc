"""What a connection is sent of a versioned state (the CRM counters): differences from what
it holds, never older, whole after a snapshot."""

from __future__ import annotations

from server.channels.state import HeldStates
from server.events.models import VersionedState, changed_numbers


def state(version: int, idle: int, incoming: int = 0) -> VersionedState:
    return VersionedState("crm", version, {"deal": {"idle": idle, "incoming": incoming}})


def test_changes_name_only_the_numbers_that_moved() -> None:
    before = {"deal": {"idle": 1, "incoming": 0}, "lead": {"idle": 0}}
    after = {"deal": {"idle": 1, "incoming": 2}, "lead": {"idle": 0}, "company": {"idle": 3}}
    assert changed_numbers(before, after) == {"deal": {"incoming": 2}, "company": {"idle": 3}}
    assert changed_numbers(after, after) == {}


def test_nothing_before_the_snapshot_then_differences_from_what_was_sent() -> None:
    held = HeldStates()
    assert held.offer(state(1, idle=1)) is None  # no snapshot yet: it will bring the state
    assert held.reset(state(1, idle=1)) == {"deal": {"idle": 1, "incoming": 0}}
    assert held.offer(state(1, idle=1)) is None  # the same version again
    # version 2 was lost on its way; 3 is measured against what the connection holds (1)
    assert held.offer(state(3, idle=2, incoming=1)) == {"deal": {"idle": 2, "incoming": 1}}
    assert held.offer(state(2, idle=2)) is None  # late
    assert held.offer(state(4, idle=2, incoming=1)) is None  # newer, but nothing moved
    assert held.offer(state(5, idle=0, incoming=1)) == {"deal": {"idle": 0}}


def test_a_push_that_came_while_the_snapshot_was_read_is_in_the_snapshot() -> None:
    """The snapshot's numbers are read, then a push comes (the connection holds nothing yet,
    so it is not sent), then the snapshot goes: it must carry the pushed numbers, not the
    older ones it read (the hub no longer reads the CRM's numbers again after catching up)."""
    held = HeldStates()
    read = state(4, idle=1)
    assert held.offer(state(6, idle=2, incoming=1)) is None
    assert held.offer(state(5, idle=2)) is None  # computed earlier, arrived later
    assert held.reset(read) == {"deal": {"idle": 2, "incoming": 1}}
    assert held.offer(state(6, idle=2, incoming=1)) is None  # held already
    assert held.offer(state(7, idle=0, incoming=1)) == {"deal": {"idle": 0}}
    # a push older than what the snapshot read changes nothing
    other = HeldStates()
    assert other.offer(state(3, idle=9)) is None
    assert other.reset(read) == {"deal": {"idle": 1, "incoming": 0}}
    assert other._early is None  # nothing kept once the snapshot went


def test_states_travel_as_plain_data() -> None:
    sent = state(7, idle=3)
    assert VersionedState.from_private(sent.as_private()) == sent
    assert VersionedState.from_private({}) is None


def test_a_whole_state_goes_whole_and_never_older() -> None:
    held = HeldStates()
    unread = VersionedState("im", 10, {"unread": 3, "chats": {"c1": 3}}, whole=True)
    held.reset(unread)
    later = VersionedState("im", 12, {"unread": 0, "chats": {}}, whole=True)
    assert held.offer(later) == {"unread": 0, "chats": {}}  # not a difference: "chats" emptied
    counted_before = VersionedState("im", 11, {"unread": 3, "chats": {"c1": 3}}, whole=True)
    assert held.offer(counted_before) is None  # arrived last, but counted earlier
    assert VersionedState.from_private(later.as_private()) == later


def test_what_connections_hold_costs_them_little() -> None:
    """Held numbers equal between connections are one dict; a whole state holds only its
    version (an idle connection must not cost memory for its counters)."""
    first, second = HeldStates(), HeldStates()
    first.reset(state(1, idle=0))
    second.reset(state(1, idle=0))  # computed apart, equal numbers
    [(_, _, held_first)] = first._held
    [(_, _, held_second)] = second._held
    assert held_first is held_second
    first.reset(VersionedState("im", 10, {"unread": 3, "chats": {"c1": 3}}, whole=True))
    assert [values for key, _, values in first._held if key == "im"] == [None]
    # and the differences are still taken from what each one holds
    assert first.offer(state(2, idle=1)) == {"deal": {"idle": 1}}
    assert second.offer(state(3, idle=0, incoming=2)) == {"deal": {"incoming": 2}}
    assert second.offer(state(4, idle=1, incoming=2)) == {"deal": {"idle": 1}}


def test_a_whole_state_sent_again_goes_unless_a_newer_one_went() -> None:
    held = HeldStates()
    held.reset(VersionedState("tasks", 4, {"new": 1}, whole=True))
    # once caught up: the same version again, whole (it closes the snapshot's window)
    assert held.again(VersionedState("tasks", 4, {"new": 1}, whole=True)) == {"new": 1}
    assert held.offer(VersionedState("tasks", 6, {"new": 3}, whole=True)) == {"new": 3}
    # read before that push went: not sent, the connection keeps the newer
    assert held.again(VersionedState("tasks", 5, {"new": 2}, whole=True)) is None
    assert held.offer(VersionedState("tasks", 6, {"new": 3}, whole=True)) is None
    # a state sent as differences: only what moved, as offer has it
    held.reset(VersionedState("crm", 1, {"deal": {"due": 1}}))
    assert held.again(VersionedState("crm", 1, {"deal": {"due": 1}})) is None
    assert held.again(VersionedState("crm", 2, {"deal": {"due": 2}})) == {"deal": {"due": 2}}
