"""Client State Indication (XEP-0352): a client that says it is inactive (a phone in a pocket,
a minimised window) is spared what only matters on screen, so its radio can sleep.

While a session is inactive:
- colleagues' presence is held back, only the latest per contact (a status that flapped
  three times is one stanza), and everything held goes out at once, in order of arrival of
  each contact's last change, when the client says ``<active/>``;
- chat states (typing, paused, ...) without anything else are dropped: stale by the time the
  user looks;
- messages, and everything else, go out at once (a message is what wakes the user up).

Other modules call ``deliver_presence`` and ``wants_chat_states`` instead of sending directly.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from server.xmpp.session import C2SSession
from server.xmpp.stanza import element, q

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

CSI = "urn:xmpp:csi:0"
MAX_HELD = 10_000  # contacts per session: more than a company has, a bound all the same

# Per session: the latest presence per sender, while inactive. Keyed weakly so a session that
# ends without saying <active/> leaves nothing behind.
_held: WeakKeyDictionary[C2SSession, dict[str, ET.Element]] = WeakKeyDictionary()


def deliver_presence(session: C2SSession, stanza: ET.Element) -> None:
    """Send a contact's presence, or hold it (the latest per contact) while inactive."""
    if not session.csi_inactive:
        session.send_nowait(stanza)
        return
    held = _held.setdefault(session, {})
    sender = stanza.get("from", "")
    held.pop(sender, None)  # re-inserted: the order is that of the last changes
    if len(held) >= MAX_HELD:
        held.pop(next(iter(held)))
    held[sender] = stanza


def wants_chat_states(session: C2SSession) -> bool:
    """Whether a chat state alone (no body, nothing else) is worth sending to the session."""
    return not session.csi_inactive


def install(server: XmppServer) -> None:
    async def on_nonza(session: C2SSession, stanza: ET.Element) -> bool:
        if stanza.tag == q(CSI, "inactive"):
            session.csi_inactive = True
            return True
        if stanza.tag == q(CSI, "active"):
            session.csi_inactive = False
            for waiting in _held.pop(session, {}).values():
                session.send_nowait(waiting)
            return True
        return False

    async def unbound(session: C2SSession) -> None:
        _held.pop(session, None)

    server.add_stream_feature(lambda: element("csi", ns=CSI))
    server.on_message(on_nonza)
    server.on_unbound(unbound)
