"""Message Archive Management (XEP-0313): the portal's dialog history, whichever client wrote
it, with RSM paging (XEP-0059) by message id."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import datetime
from typing import TYPE_CHECKING

from server.im.rules import private_pair_key
from server.store.database import Document
from server.xmpp.jid import Jid
from server.xmpp.modules.messages import DELAY, archived, stamp
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
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise StanzaError("bad-request", f"not a timestamp: {value}") from None


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
        return [
            c["_id"]
            async for c in server.store["chats"].find(
                {"_id": {"$in": member_of}, "kind": {"$in": ["private", "system"]}}
            )
        ]

    async def query(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        assert session.jid is not None
        to = iq.get("to")
        if to and Jid.parse(to).bare != session.jid.bare:
            raise StanzaError("forbidden", "only one's own archive")
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
        chats = await chats_for(session, fields.get("with"))
        filters: Document = {"chat_id": {"$in": chats}, "deleted": False}
        id_range: Document = {}
        if before:
            id_range["$lt"] = before
        if after:
            id_range["$gt"] = after
        if id_range:
            filters["_id"] = id_range
        times: Document = {}
        if fields.get("start"):
            times["$gte"] = parse_time(fields["start"])
        if fields.get("end"):
            times["$lte"] = parse_time(fields["end"])
        if times:
            filters["created_at"] = times
        backwards = before is not None or last_page
        cursor = server.store["messages"].find(
            filters, sort=[("_id", -1 if backwards else 1)], limit=limit + 1
        )
        found = [doc async for doc in cursor]
        complete = len(found) <= limit
        page = found[:limit]
        if backwards:
            page.reverse()
        bridge = server.bridge
        for doc in page:
            message = archived(doc)
            chat = await bridge.chat(doc["chat_id"])
            other = next(
                (m for m in (chat or {}).get("member_ids", []) if m != doc.get("author_id")),
                session.user_id,
            )
            to_login = await server.login_of(other) or ""
            original = await bridge.stanza(message, Jid(to_login, server.domain))
            wrapper = element("message", {"to": str(session.jid), "from": str(session.jid.bare)})
            res = child(wrapper, "result", {"id": str(doc["_id"])}, ns=MAM)
            if payload.get("queryid"):
                res.set("queryid", payload.get("queryid", ""))
            forwarded = child(res, "forwarded", ns=FORWARD)
            child(forwarded, "delay", {"stamp": stamp(doc["created_at"])}, ns=DELAY)
            forwarded.append(original)
            session.send_nowait(wrapper)
        fin = element("fin", {"complete": "true" if complete else "false"}, ns=MAM)
        if payload.get("queryid"):
            fin.set("queryid", payload.get("queryid", ""))
        rsm_out = child(fin, "set", ns=RSM)
        if page:
            child(rsm_out, "first", ns=RSM, text=str(page[0]["_id"]))
            child(rsm_out, "last", ns=RSM, text=str(page[-1]["_id"]))
        return result(iq, fin)

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
