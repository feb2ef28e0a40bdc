"""Domain events: the one internal bus, and streams (persisted, replayable logs)."""

from server.events.bus import EventBus, InProcessBus
from server.events.models import EphemeralEvent, Event
from server.events.streams import StreamLog, user_stream

__all__ = ["EphemeralEvent", "Event", "EventBus", "InProcessBus", "StreamLog", "user_stream"]
