"""Bookmarks (XEP-0402) and their compatibility with XEP-0048 in private storage (XEP-0402
section 5): one set of bookmarks, read and written either way.

The PEP node ``urn:xmpp:bookmarks:1`` (one item per room, keyed by the room's JID; whitelist,
all items kept: the node's defaults in ``pep_rules``) holds them. Private storage's
``<storage xmlns='storage:bookmarks'/>`` (XEP-0049) is kept as written, for what XEP-0402 has
no place for (``<url>`` bookmarks), and:
- a write of it publishes the rooms it lists to the node, and retracts those it no longer
  lists (an item's ``<extensions>`` are kept where the room is still listed);
- a read of it lists the node's rooms (and the stored ``<url>``s);
- PEP bookmarks used for the first time start from what private storage held (bookmarks kept
  before this existed); deleting the node empties the rooms of the private copy too;
- XEP-0048 published to PEP (node ``storage:bookmarks``, one item) is a private storage write
  as well, and the owner reading that node gets the list as private storage shows it (the
  node's own notifications are sent for its own publishes only).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from server.directory import pep_rules as rules
from server.directory.pep import PepError
from server.xmpp.jid import Jid
from server.xmpp.session import C2SSession
from server.xmpp.stanza import StanzaError, child, element, q, result
from server.xmpp.xmlstream import serialize

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

BOOKMARKS = rules.BOOKMARKS
LEGACY = "storage:bookmarks"
COMPAT = f"{BOOKMARKS}#compat"
COMPAT_PEP = f"{BOOKMARKS}#compat-pep"  # XEP-0048 over PEP is the same list too
LEGACY_ITEM = "current"  # XEP-0048 over PEP: the one item of node storage:bookmarks
PRIVATE = "jabber:iq:private"
KEY = q(LEGACY, "storage")  # the private storage key (a namespaced element name)
TRUE = ("1", "true")


def from_legacy(storage: ET.Element) -> dict[str, ET.Element]:
    """XEP-0048 rooms as XEP-0402 ``<conference/>`` payloads, by room JID (the first entry
    of a JID wins; entries without a usable JID are left out)."""
    rooms: dict[str, ET.Element] = {}
    for conf in storage.findall(q(LEGACY, "conference")):
        jid = (conf.get("jid") or "").strip()
        if not rules.valid_name(jid) or jid in rooms:
            continue
        room = element("conference", ns=BOOKMARKS)
        if conf.get("name"):
            room.set("name", conf.get("name", ""))
        if conf.get("autojoin") in TRUE:
            room.set("autojoin", "true")
        for tag in ("nick", "password"):
            text = conf.findtext(q(LEGACY, tag))
            if text:
                child(room, tag, ns=BOOKMARKS, text=text)
        rooms[jid] = room
    return rooms


def keep_extensions(room: ET.Element, old: ET.Element | None) -> ET.Element:
    """A room rewritten from XEP-0048 keeps the ``<extensions/>`` its XEP-0402 item had."""
    extensions = old.find(q(BOOKMARKS, "extensions")) if old is not None else None
    if extensions is not None:
        room.append(extensions)
    return room


def to_legacy(rooms: list[tuple[str, ET.Element]], stored: ET.Element | None) -> ET.Element:
    """XEP-0402 items as XEP-0048 storage, with the ``<url>``s of the stored copy."""
    storage = element("storage", ns=LEGACY)
    for jid, room in rooms:
        if room.tag != q(BOOKMARKS, "conference"):
            continue
        conf = child(storage, "conference", {"jid": jid})
        if room.get("name"):
            conf.set("name", room.get("name", ""))
        conf.set("autojoin", "true" if room.get("autojoin") in TRUE else "false")
        for tag in ("nick", "password"):
            text = room.findtext(q(BOOKMARKS, tag))
            if text is not None:
                child(conf, tag, text=text)
    if stored is not None:
        for url in stored.findall(q(LEGACY, "url")):
            storage.append(url)
    return storage


async def stored_legacy(server: XmppServer, user_id: str) -> ET.Element | None:
    storage = server.private_storage
    data = await storage.get(user_id, KEY) if storage is not None else None
    # (written by private storage from a parsed element: no DOCTYPE, no entities)
    return ET.fromstring(data) if data else None


async def sync_from_legacy(server: XmppServer, user_id: str, legacy: ET.Element) -> None:
    """Make the PEP node list the rooms ``legacy`` lists: publish the new and changed ones,
    retract the others (each change notified as any publish)."""
    pep = server.pep
    if pep is None:
        return
    wanted = from_legacy(legacy)
    node = await pep.node(user_id, BOOKMARKS)
    if node is None and not wanted:
        return
    current = (
        {item.item_id: item.payload for item in await pep.items(user_id, BOOKMARKS)}
        if node is not None
        else {}
    )
    for jid, room in wanted.items():
        old = ET.fromstring(current[jid]) if jid in current else None
        data = serialize(keep_extensions(room, old), BOOKMARKS).decode()
        if current.get(jid) != data:
            await pep.publish(user_id, BOOKMARKS, jid, data, {})
    for jid in sorted(current.keys() - wanted.keys()):
        await pep.retract(user_id, BOOKMARKS, jid, notify=True)


async def adopt_legacy(server: XmppServer, user_id: str) -> None:
    """Before PEP bookmarks are first used: start from the XEP-0048 ones in private storage."""
    if server.pep is None or await server.pep.node(user_id, BOOKMARKS) is not None:
        return
    legacy = await stored_legacy(server, user_id)
    if legacy is not None:
        await sync_from_legacy(server, user_id, legacy)


async def forget_legacy(server: XmppServer, user_id: str) -> None:
    """The PEP node was deleted: the private copy lists no rooms either (its URLs stay)."""
    legacy = await stored_legacy(server, user_id)
    if legacy is None or server.private_storage is None:
        return
    kept = element("storage", ns=LEGACY)
    for url in legacy.findall(q(LEGACY, "url")):
        kept.append(url)
    await server.private_storage.put(user_id, KEY, serialize(kept, LEGACY).decode())


async def legacy_view(server: XmppServer, user_id: str) -> ET.Element | None:
    """The user's bookmarks as XEP-0048 storage (what private storage and the PEP node
    ``storage:bookmarks`` show); None when there are none anywhere."""
    stored = await stored_legacy(server, user_id)
    if server.pep is None or await server.pep.node(user_id, BOOKMARKS) is None:
        return stored
    rooms = [
        (item.item_id, ET.fromstring(item.payload))
        for item in await server.pep.items(user_id, BOOKMARKS)
    ]
    return to_legacy(rooms, stored)


async def publish_legacy(server: XmppServer, user_id: str, storage: ET.Element) -> None:
    """XEP-0048 bookmarks published to PEP (``storage:bookmarks``, as older Conversations and
    Gajim do): the same list as a private storage write (StorageFull past its limits)."""
    if server.private_storage is not None:
        await server.private_storage.put(user_id, KEY, serialize(storage, LEGACY).decode())
    await sync_from_legacy(server, user_id, storage)


def install(server: XmppServer) -> None:
    pep = server.pep
    inner_get = server.iq_handler("get", q(PRIVATE, "query"))
    inner_set = server.iq_handler("set", q(PRIVATE, "query"))
    if pep is None or server.private_storage is None or inner_get is None or inner_set is None:
        return  # no compatibility to offer: not announced
    server.account_features.update((COMPAT, COMPAT_PEP))
    read, write = inner_get, inner_set

    def own_bookmarks(session: C2SSession, iq: ET.Element, payload: ET.Element) -> bool:
        """A request for one's own XEP-0048 bookmarks (anything else: private storage's)."""
        to = iq.get("to")
        if to and (session.jid is None or Jid.parse(to).bare != session.jid.bare):
            return False
        return len(payload) == 1 and payload[0].tag == KEY

    async def get(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element | None:
        if not own_bookmarks(session, iq, payload):
            return await read(session, iq, payload)
        view = await legacy_view(server, session.user_id)
        query = element("query", ns=PRIVATE)
        query.append(view if view is not None else element("storage", ns=LEGACY))
        return result(iq, query)

    async def put(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element | None:
        reply = await write(session, iq, payload)  # checks, limits and stores the copy
        if own_bookmarks(session, iq, payload):
            try:
                await sync_from_legacy(server, session.user_id, payload[0])
            except PepError as exc:
                raise StanzaError("not-allowed", exc.text or exc.kind) from None
        return reply

    server.iq("get", q(PRIVATE, "query"), get)
    server.iq("set", q(PRIVATE, "query"), put)
