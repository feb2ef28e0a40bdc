"""The company as the roster (RFC 6121 section 2): every colleague one may see, grouped by
department path (nested groups, XEP-0083, delimiter "/"), with versioning (XEP-0237) and pushes
when people join, leave or move. The roster is the directory's: client edits are refused."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from server.directory.models import display_name
from server.directory.rules import ancestors
from server.events.models import EphemeralEvent
from server.store.database import Document
from server.xmpp.modules.basics import GROUP_DELIMITER
from server.xmpp.session import C2SSession
from server.xmpp.stanza import StanzaError, child, element, q, result

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

ROSTER = "jabber:iq:roster"
ROSTERVER = "urn:xmpp:features:rosterver"
Item = tuple[str, tuple[str, ...]]  # (name, groups)


# A "/" inside a department's name would split it into two group levels: it is shown as a
# DIVISION SLASH (U+2215), which looks the same and is no delimiter.
NAME_SLASH = "\u2215"


def group_name(names: list[str]) -> str:
    """A department path as one XEP-0083 nested group, each name's own slashes escaped."""
    return GROUP_DELIMITER.join(name.replace(GROUP_DELIMITER, NAME_SLASH) for name in names)


def version_of(items: dict[str, Item]) -> str:
    digest = hashlib.sha256()
    for jid in sorted(items):
        name, groups = items[jid]
        digest.update(f"{jid}\0{name}\0{chr(1).join(groups)}\n".encode())
    return digest.hexdigest()[:16]


class Roster:
    def __init__(self, server: XmppServer) -> None:
        self.server = server
        self.sent: dict[str, dict[str, Item]] = {}  # session id -> items last sent

    async def groups(self) -> dict[str, str]:
        """Each department's group path ("Acme/Sales/Europe"): one answer for every roster,
        from the directory's cached tree (a roster asked for at every login read the
        departments each time)."""
        tree = await self.server.directory.department_tree()
        return {
            node.id: group_name([tree[a].name for a in reversed(ancestors(node.id, tree))])
            for node in tree.values()
        }

    async def items_for(self, user: Document, groups: dict[str, str]) -> dict[str, Item]:
        """The roster of ``user``: everyone the directory lets them see (from its caches)."""
        directory = self.server.directory
        visible = set(await directory.visible_user_ids(user))
        visible.discard(str(user["_id"]))
        items: dict[str, Item] = {}
        for other in (await directory.cached_users(sorted(visible))).values():
            if not other.get("is_active", True):
                continue
            group = groups.get(str(other.get("department_id")), "")
            in_groups = (group,) if group else (("Extranet",) if other.get("is_external") else ())
            items[str(self.server.jid_of(other))] = (display_name(other), in_groups)
        return items

    async def get(self, session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        assert session.user is not None
        items = await self.items_for(session.user, await self.groups())
        version = version_of(items)
        session.roster_requested = True
        self.sent[session.id] = items
        if payload.get("ver") == version:
            return result(iq)  # XEP-0237: the client's copy is current
        query = element("query", {"ver": version}, ns=ROSTER)
        for jid in sorted(items):
            self._item(query, jid, items[jid])
        return result(iq, query)

    async def refresh_all(self) -> None:
        """The directory changed: push to every session what changed in its roster. The
        department groups are worked out once, each user's roster once for all their
        sessions."""
        by_user: dict[str, list[C2SSession]] = {}
        for user_id, resources in list(self.server.sessions.items()):
            wanting = [s for s in resources.values() if s.roster_requested and s.jid is not None]
            if wanting:
                by_user[user_id] = wanting
        if not by_user:
            return
        groups = await self.groups()
        for user_id, sessions in by_user.items():
            user = await self.server.directory.cached_user(user_id)
            if user is None:
                continue
            after = await self.items_for(user, groups)
            for session in sessions:
                self.push(session, after)

    def push(self, session: C2SSession, after: dict[str, Item]) -> None:
        """Push what changed since the last roster this session saw."""
        if session.jid is None or session.id not in self.sent:
            return
        before = self.sent[session.id]
        changed = [jid for jid in after if before.get(jid) != after[jid]]
        removed = [jid for jid in before if jid not in after]
        if not changed and not removed:
            return
        self.sent[session.id] = after
        version = version_of(after)
        for jid in [*changed, *removed]:
            push = element(
                "iq",
                {"type": "set", "id": f"push-{version[:8]}-{len(jid)}", "to": str(session.jid)},
            )
            query = child(push, "query", {"ver": version}, ns=ROSTER)
            self._item(query, jid, after.get(jid))
            session.send_nowait(push)

    def _item(self, query: ET.Element, jid: str, item: Item | None) -> None:
        if item is None:
            child(query, "item", {"jid": jid, "subscription": "remove"})
            return
        name, groups = item
        el = child(query, "item", {"jid": jid, "name": name, "subscription": "both"})
        for group in groups:
            child(el, "group", text=group)


def install(server: XmppServer) -> None:
    roster = Roster(server)
    server.add_feature(ROSTER)
    server.add_stream_feature(lambda: element("ver", ns=ROSTERVER))

    async def roster_set(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        raise StanzaError("not-allowed", "the roster is the company directory")

    server.iq("get", q(ROSTER, "query"), roster.get)
    server.iq("set", q(ROSTER, "query"), roster_set)

    async def forget(session: C2SSession) -> None:
        roster.sent.pop(session.id, None)

    server.on_unbound(forget)

    async def directory_changed(event: EphemeralEvent) -> None:
        if event.type == "directory.changed":
            await roster.refresh_all()

    server.bus.subscribe_ephemeral(directory_changed)
