"""Message Archive Management (XEP-0313): the portal's dialog history, whichever client wrote
it, with RSM paging (XEP-0059) by message id."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from server.im.models import MessageOut
from server.im.rules import private_pair_key
from server.store.database import id_at
from server.xmpp.jid import Jid
from server.xmpp.modules.messages import DELAY, archived, read_history, stamp
from server.xmpp.session import C2SSession
from server.xmpp.stanza import StanzaError, child, element, q, result, small_int

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

MAM = "urn:xmpp:mam:2"
RSM = "http://jabber.org/protocol/rsm"
DATA = "jabber:x:data"
FORWARD = "urn:xmpp:forward:0"
DEFAULT_PAGE = 50
MAX_PAGE = 200


def form_fields(query: ET.Element) -> dict[str, str]:
    fields: dict[str, str] = {}
    form = query.find(q(DATA, "x"))
    if form is not None:
        for field in form.findall(q(DATA, "field")):
            var = field.get("var")
            if var:
                fields[var] = field.findtext(q(DATA, "value")) or ""
    return fields


def parse_time(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise StanzaError("bad-request", f"not a timestamp: {value}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def archive_page(
    server: XmppServer,
    session: C2SSession,
    iq: ET.Element,
    payload: ET.Element,
    chats: list[str],
    render: Callable[[MessageOut], Awaitable[ET.Element]],
    archive: Jid,
) -> ET.Element:
    """Answer a MAM query over ``chats`` (a user's dialogs, or one room): the results, each
    ``render``ed and forwarded from ``archive``, then the <fin/> with RSM paging."""
    assert session.jid is not None and session.user is not None
    fields = form_fields(payload)
    rsm = payload.find(q(RSM, "set"))
    limit = DEFAULT_PAGE
    before: str | None = None
    after: str | None = None
    last_page = False
    if rsm is not None:
        max_text = rsm.findtext(q(RSM, "max"))
        if max_text:
            wanted = small_int(max_text)
            limit = max(0, min(DEFAULT_PAGE if wanted is None else wanted, MAX_PAGE))
        before_el = rsm.find(q(RSM, "before"))
        if before_el is not None:
            before = before_el.text or None
            last_page = before is None
        after = rsm.findtext(q(RSM, "after")) or None
    start = parse_time(fields["start"]) if fields.get("start") else None
    end = parse_time(fields["end"]) if fields.get("end") else None
    # Times become id bounds too (ids are time first), so that each chat is read by its
    # index; created_at decides exactly.
    low, high = after, before
    if start is not None:
        low = max(low or "", id_at(start - timedelta(seconds=1)))
    if end is not None:
        bound = id_at(end + timedelta(seconds=1))
        high = min(high, bound) if high else bound

    def in_time(message: MessageOut) -> bool:
        return (start is None or message.created_at >= start) and (
            end is None or message.created_at <= end
        )

    backwards = before is not None or last_page
    found: list[MessageOut] = []
    for chat_id in chats:
        found += await read_history(
            server.im,
            session.user,
            chat_id,
            limit + 1,
            after=low,
            before=high,
            oldest_first=not backwards,
            keep=in_time,
        )
    found.sort(key=lambda m: m.id, reverse=backwards)
    complete = len(found) <= limit
    page = found[:limit]
    if backwards:
        page.reverse()
    for doc in page:
        original = await render(doc)
        wrapper = element("message", {"to": str(session.jid), "from": str(archive)})
        res = child(wrapper, "result", {"id": doc.id}, ns=MAM)
        if payload.get("queryid"):
            res.set("queryid", payload.get("queryid", ""))
        forwarded = child(res, "forwarded", ns=FORWARD)
        child(forwarded, "delay", {"stamp": stamp(doc.created_at)}, ns=DELAY)
        forwarded.append(original)
        session.send_nowait(wrapper)
    fin = element("fin", {"complete": "true" if complete else "false"}, ns=MAM)
    if payload.get("queryid"):
        fin.set("queryid", payload.get("queryid", ""))
    rsm_out = child(fin, "set", ns=RSM)
    if page:
        child(rsm_out, "first", ns=RSM, text=page[0].id)
        child(rsm_out, "last", ns=RSM, text=page[-1].id)
    return result(iq, fin)


def install(server: XmppServer) -> None:
    server.add_feature(MAM)
    server.account_features.add(MAM)

    async def chats_for(session: C2SSession, with_jid: str | None) -> list[str]:
        if with_jid:
            other = await server.user_for(Jid.parse(with_jid))
            if other is None:
                return []
            chat = await server.store["chats"].find_one(
                {"pair_key": private_pair_key(session.user_id, str(other["_id"]))}
            )
            return [chat["_id"]] if chat else []
        member_of = [
            m["chat_id"]
            async for m in server.store["chat_members"].find({"user_id": session.user_id})
        ]
        # by _id alone: a filter on kind too would make the embedded database scan every chat
        return [
            c["_id"]
            async for c in server.store["chats"].find({"_id": {"$in": member_of}})
            if c.get("kind") in ("private", "system")
        ]

    async def query(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        assert session.jid is not None
        to = iq.get("to")
        if to and Jid.parse(to).bare != session.jid.bare:
            raise StanzaError("forbidden", "only one's own archive")
        chats = await chats_for(session, form_fields(payload).get("with"))
        bridge = server.bridge

        async def render(doc: MessageOut) -> ET.Element:
            chat = await bridge.chat(doc.chat_id)
            other = next(
                (m for m in (chat or {}).get("member_ids", []) if m != doc.author_id),
                session.user_id,
            )
            to_login = await server.login_of(other) or ""
            stanza: ET.Element = await bridge.stanza(archived(doc), Jid(to_login, server.domain))
            return stanza

        return await archive_page(server, session, iq, payload, chats, render, session.jid.bare)

    async def fields(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        answer = element("query", ns=MAM)
        form = child(answer, "x", {"type": "form"}, ns=DATA)
        child(form, "field", {"var": "FORM_TYPE", "type": "hidden"}).append(
            element("value", text=MAM, ns=DATA)
        )
        for var, kind in (("with", "jid-single"), ("start", "text-single"), ("end", "text-single")):
            child(form, "field", {"var": var, "type": kind})
        return result(iq, answer)

    server.iq("set", q(MAM, "query"), query)
    server.iq("get", q(MAM, "query"), fields)
