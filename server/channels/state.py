"""What one connection was last sent of each versioned state (see ``VersionedState``)."""

from __future__ import annotations

from typing import Any

from server.events.models import VersionedState

Values = dict[str, Any]


def changes(before: Values, after: Values) -> Values:
    """The numbers of ``after`` that differ from ``before``, grouped as they are."""
    found: Values = {}
    for group, numbers in after.items():
        held = before.get(group, {})
        changed = {name: value for name, value in numbers.items() if held.get(name) != value}
        if changed:
            found[group] = changed
    return found


class HeldStates:
    def __init__(self) -> None:
        self._held: dict[str, tuple[int, Values]] = {}

    def reset(self, state: VersionedState) -> Values:
        """The connection is sent ``state`` whole (its snapshot)."""
        self._held[state.key] = (state.version, state.values)
        return state.values

    def offer(self, state: VersionedState) -> Values | None:
        """What to send the connection of ``state``: the difference from what it holds (all
        of it, for a whole state), or None when there is nothing new for it. Before its
        snapshot a connection holds nothing and is sent nothing: the snapshot brings it."""
        held = self._held.get(state.key)
        if held is None or state.version <= held[0]:
            return None
        self._held[state.key] = (state.version, state.values)
        if state.whole:
            return state.values
        return changes(held[1], state.values) or None
