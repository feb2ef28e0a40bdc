"""What one connection was last sent of each versioned state (see ``VersionedState``).

Every connection holds this for as long as it is open, so it is kept small: a tuple of
``(key, version, values)``, with no values at all for a state sent whole (only its version
matters), and the values of a state sent as differences shared by every connection that holds
the same numbers (``_shared``): most users' CRM counters are all zeros, and a user's
connections hold the same numbers. An idle connection costs a tuple and pointers.
"""

from __future__ import annotations

import weakref
from typing import Any

from server.events.models import VersionedState, changed_numbers

Values = dict[str, Any]


class _SharedValues(dict[str, Any]):
    """Held values, shared and never changed (a dict that can be referenced weakly)."""

    __slots__ = ("__weakref__",)


_SHARED: weakref.WeakValueDictionary[Any, _SharedValues] = weakref.WeakValueDictionary()


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("__list__", *(_frozen(v) for v in value))
    return value


def _shared(key: str, values: Values) -> Values:
    """``values``, or an equal dict already held by another connection."""
    try:
        identity = (key, _frozen(values))
        found = _SHARED.get(identity)
    except TypeError:  # something unhashable in there: not shared
        return values
    if found is None:
        found = _SHARED[identity] = _SharedValues(values)
    return found


# What a connection that has not had its snapshot yet keeps of the pushes offered to it.
_NONE_YET: dict[str, VersionedState] = {}


class HeldStates:
    __slots__ = ("_early", "_held")

    def __init__(self) -> None:
        self._held: tuple[tuple[str, int, Values | None], ...] = ()
        # Before the snapshot: the newest state offered per key (shared empty until one
        # comes); None once the snapshot went.
        self._early: dict[str, VersionedState] | None = _NONE_YET

    def _get(self, key: str) -> tuple[str, int, Values | None] | None:
        for held in self._held:
            if held[0] == key:
                return held
        return None

    def _put(self, state: VersionedState) -> None:
        values = None if state.whole else _shared(state.key, state.values)
        self._held = (
            *(held for held in self._held if held[0] != state.key),
            (state.key, state.version, values),
        )

    def reset(self, state: VersionedState) -> Values:
        """The connection is sent ``state`` whole (its snapshot), or the newer state a push
        offered it while the snapshot was being read: that push was not sent, and the
        snapshot must not start from numbers older than it."""
        early = self._early.pop(state.key, None) if self._early else None
        if early is not None and early.version > state.version:
            state = early
        if not self._early:  # the others are taken by their own reset, in the same pass
            self._early = None
        self._put(state)
        return state.values

    def offer(self, state: VersionedState) -> Values | None:
        """What to send the connection of ``state``: the difference from what it holds (all
        of it, for a whole state), or None when there is nothing new for it. Before its
        snapshot a connection holds nothing and is sent nothing: the snapshot brings it
        (``reset`` takes the newest state offered before it)."""
        held = self._get(state.key)
        if held is None and self._early is not None:
            early = self._early.get(state.key)
            if early is None or state.version > early.version:
                if self._early is _NONE_YET:
                    self._early = {}
                self._early[state.key] = state
            return None
        if held is None or state.version <= held[1]:
            return None
        self._put(state)
        if state.whole:
            return state.values
        return changed_numbers(held[2] or {}, state.values) or None

    def again(self, state: VersionedState) -> Values | None:
        """What to send the connection of ``state`` sent once more to close a window (the
        counters once caught up): a whole state as it is, unless the connection holds a newer
        version (a push that went meanwhile); a state sent as differences as ``offer`` has
        it."""
        if not state.whole:
            return self.offer(state)
        held = self._get(state.key)
        if held is not None and state.version < held[1]:
            return None
        self._put(state)
        return state.values
