"""What one connection was last sent of each versioned state (see ``VersionedState``)."""

from __future__ import annotations

from typing import Any

from server.events.models import VersionedState, changed_numbers

Values = dict[str, Any]


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
        return changed_numbers(held[1], state.values) or None
