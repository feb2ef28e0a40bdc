"""Last Activity (XEP-0012): how long ago a colleague was last online, and the server's
uptime.

For a user's bare JID (or their ``…/portal`` resource) the answer is the portal's own idea of
it, the same one the web shows under their name: 0 while their status is not offline, else the
seconds since the presence service last saw them (``last_seen``, set when they went offline or
invisible). Only for colleagues the asker may see in the directory: for anyone else, and for
logins nobody has, the answer is the same ``service-unavailable``, so an account's existence
does not leak. An iq to a colleague's client (another full JID) is that client's to answer
(the router passes it on). For the server's own address: seconds since this node started.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from server.xmpp.jid import Jid
from server.xmpp.session import C2SSession
from server.xmpp.stanza import StanzaError, element, q, result

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

LAST = "jabber:iq:last"


def idle_seconds(status: str, last_seen: datetime | None, now: datetime) -> int | None:
    """XEP-0012 seconds for a contact: 0 while online (away and dnd are online too), the time
    since they were last seen when offline, None when they never were."""
    if status != "offline":
        return 0
    if last_seen is None:
        return None
    if last_seen.tzinfo is None:
        last_seen = last_seen.replace(tzinfo=UTC)
    return max(0, int((now - last_seen).total_seconds()))


def install(server: XmppServer) -> None:
    server.add_feature(LAST)
    server.account_features.add(LAST)
    started = time.monotonic()

    async def get(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        assert session.user is not None
        to = iq.get("to")
        target = Jid.parse(to) if to else None
        if target is None or not target.local:
            seconds: int | None = int(time.monotonic() - started)  # the server: its uptime
        else:
            user = await server.user_for(target)
            if (
                user is None
                or not user.get("is_active", True)
                or not await server.directory.may_see(session.user, user)
            ):
                raise StanzaError("service-unavailable")
            view = await server.presence.view(session.user_id, str(user["_id"]))
            seen = view.get("last_seen")
            last_seen = datetime.fromisoformat(seen.replace("Z", "+00:00")) if seen else None
            seconds = idle_seconds(str(view["status"]), last_seen, datetime.now(UTC))
            if seconds is None:
                raise StanzaError("item-not-found", "never seen online")
        return result(iq, element("query", {"seconds": str(seconds)}, ns=LAST))

    server.iq("get", q(LAST, "query"), get)
