"""What a Socket.IO client may send, checked before python-engineio and python-socketio parse it.

Both libraries assume well-formed input: a frame they cannot parse raises out of their
handlers, which log a traceback (3.5 KB) for every such frame and, on a websocket, kept the
connection open for the next one. A client that sends a bad frame is not speaking the
protocol, authenticated or not: the hub closes its connection and logs one line.

- Engine.IO (``check_engine_packet``, ``check_engine_payload``): a text packet of type 0-6;
  a message (4) carries a Socket.IO packet, which starts with its type digit; the other types
  carry nothing or ``probe``. Binary frames are refused: no event of the hub's protocol
  carries binary data. Checking this first also keeps python-engineio from handing anything
  to its JSON parser, which fails with a RecursionError on deep nesting.
- Socket.IO (``StrictPacket``): decodes as CONNECT (its auth is the hub's to judge),
  DISCONNECT, EVENT (``[name, payload?]``, the name a string and not one of the reserved
  ones, which would reach the connect and disconnect handlers) or ACK, with valid JSON
  (nesting included). An EVENT or ACK needs a connected namespace (checked by the hub).
"""

from __future__ import annotations

from typing import Any

from socketio import packet as sio_packet

ENGINE_PAYLOAD_SEPARATOR = "\x1e"
MAX_PACKETS_PER_PAYLOAD = 16  # python-engineio's own limit for a long-polling POST
ENGINE_TYPES = "0123456"
ENGINE_MESSAGE = "4"
RESERVED_EVENTS = frozenset({"connect", "connect_error", "disconnect", "disconnecting"})


class BadFrame(ValueError):
    """A frame outside the protocol; its message says what was wrong, for the one log line."""


def check_engine_packet(frame: Any) -> None:
    """Raise ``BadFrame`` unless ``frame`` is an Engine.IO packet the hub takes."""
    if not isinstance(frame, str):
        raise BadFrame("binary frame")
    if not frame or frame[0] not in ENGINE_TYPES:
        raise BadFrame("not an Engine.IO packet")
    rest = frame[1:]
    if frame[0] == ENGINE_MESSAGE:
        if not rest or rest[0] not in "0123456789":
            raise BadFrame("message without a Socket.IO packet")
    elif rest not in ("", "probe"):
        raise BadFrame("unexpected data in an Engine.IO control packet")


def check_engine_payload(body: bytes) -> None:
    """Raise ``BadFrame`` unless ``body`` (a long-polling POST) holds packets the hub takes."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise BadFrame("payload is not UTF-8") from None
    if not text:
        return
    if text.startswith("d="):
        raise BadFrame("JSONP payload")
    frames = text.split(ENGINE_PAYLOAD_SEPARATOR)
    if len(frames) > MAX_PACKETS_PER_PAYLOAD:
        raise BadFrame("too many packets in one payload")
    for frame in frames:
        check_engine_packet(frame)


def event_namespace(data: Any) -> str | None:
    """The namespace of an encoded Socket.IO EVENT or ACK (``None`` for other packets)."""
    if not isinstance(data, str) or data[:1] not in ("2", "3"):
        return None
    if data[1:2] != "/":
        return "/"
    end = data.find(",")
    return data[1 : end if end != -1 else None].split("?", 1)[0]


class StrictPacket(sio_packet.Packet):  # type: ignore[misc]
    """python-socketio's packet, whose decoding of a client's packet fails with ``BadFrame``."""

    def __init__(self, *args: Any, encoded_packet: Any = None, **kwargs: Any) -> None:
        if encoded_packet is not None and not encoded_packet:
            # python-socketio would skip decoding and take it for an event without data
            raise BadFrame("empty Socket.IO packet")
        super().__init__(*args, encoded_packet=encoded_packet, **kwargs)

    def decode(self, encoded_packet: Any) -> int:
        if not isinstance(encoded_packet, str):
            raise BadFrame("binary Socket.IO packet")
        try:
            attachments: int = super().decode(encoded_packet)
        except (ValueError, TypeError, IndexError, KeyError, RecursionError) as exc:
            raise BadFrame(f"malformed Socket.IO packet ({type(exc).__name__})") from None
        data = self.data
        if attachments:
            raise BadFrame("binary Socket.IO packet")
        if self.packet_type == sio_packet.EVENT:
            if not (
                isinstance(data, list)
                and 1 <= len(data) <= 2
                and isinstance(data[0], str)
                and data[0] not in RESERVED_EVENTS
            ):
                raise BadFrame("an event is [name, payload?]")
        elif self.packet_type == sio_packet.ACK:
            if not isinstance(data, list):
                raise BadFrame("an acknowledgement is a list")
        elif self.packet_type not in (sio_packet.CONNECT, sio_packet.DISCONNECT):
            raise BadFrame("Socket.IO packet type not taken")
        return attachments
