"""Files for Jabber clients: HTTP File Upload (XEP-0363) to send, Out of Band Data
(XEP-0066, ``jabber:x:oob``) and a link in the body to receive.

A client asks the server (its domain's disco#info lists ``urn:xmpp:http:upload:0`` with
``max-file-size``) for a slot: a one-time PUT URL and the GET URL the file will have (a signed
link, ``server/files/service.py``). It PUTs the file, then sends a message whose body is the
GET URL (usually with an OOB element): that becomes a message with the file attached in the
portal's chat, its text what is left of the body. A file sent from the web reaches Jabber
clients as its signed link in the body, and in an OOB element, which clients such as
Conversations, Gajim and Dino show as an image or a download.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

from server.files.rules import links_in, verify, without_links
from server.web.problems import Problem
from server.xmpp.session import C2SSession
from server.xmpp.stanza import CLIENT, StanzaError, child, element, q, result

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

UPLOAD = "urn:xmpp:http:upload:0"
OOB = "jabber:x:oob"
DATA = "jabber:x:data"


def upload_form(max_bytes: int) -> ET.Element:
    """XEP-0363 section 3 / XEP-0128: the size limit in the service's disco#info."""
    form = element("x", {"type": "result"}, ns=DATA)
    kind = child(form, "field", {"var": "FORM_TYPE", "type": "hidden"})
    child(kind, "value", text=UPLOAD)
    size = child(form, "field", {"var": "max-file-size"})
    child(size, "value", text=str(max_bytes))
    return form


def add_files(server: XmppServer, stanza: ET.Element, message: dict[str, Any]) -> None:
    """A message's files on its stanza: their links after the text in the body, and one
    OOB element each."""
    files = message.get("files") or []
    if not files:
        return
    links = [server.im.files.link(ref) for ref in files]
    body = stanza.find(q(CLIENT, "body"))
    if body is None:
        body = child(stanza, "body", ns=CLIENT)
    body.text = "\n".join([t for t in [body.text or ""] if t] + links)
    for link in links:
        oob = child(stanza, "x", ns=OOB)
        child(oob, "url", text=link)


async def attachments(
    server: XmppServer, session: C2SSession, stanza: ET.Element, body: str
) -> tuple[str, list[str]]:
    """The files a Jabber client sends with a message: the signed links of this hub in its
    body or OOB elements that name the sender's own uploads not sent anywhere yet. Returns
    the text without those links, and the files' ids. Links to other files (someone else's,
    or already in a chat) stay in the text as they are."""
    files = server.im.files
    found = links_in(body, files.base_url)
    for oob in stanza.findall(q(OOB, "x")):
        found += links_in(oob.findtext(q(OOB, "url")) or "", files.base_url)
    if not found:
        return body, []
    key = await files.key()
    urls: list[str] = []
    ids: list[str] = []
    for url, file_id, signature in found:
        if file_id in ids or not verify(key, file_id, signature):
            continue
        try:
            stored = await files.get(file_id)
        except Problem:
            continue
        if stored.chat_id is None and await files.uploader_of(file_id) == session.user_id:
            urls.append(url)
            ids.append(file_id)
    return without_links(body, urls), ids


def install(server: XmppServer) -> None:
    server.add_feature(UPLOAD)
    server.info_forms.append(lambda: upload_form(server.im.files.max_bytes))

    async def request_slot(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        to = iq.get("to")
        if to and to != server.domain:
            raise StanzaError("service-unavailable")
        name = payload.get("filename") or ""
        raw_size = payload.get("size") or ""
        size = int(raw_size) if raw_size.isascii() and raw_size.isdigit() else None
        if not name or size is None or len(raw_size) > 15:
            raise StanzaError("bad-request", "a slot needs a filename and a size in bytes")
        if size > server.im.files.max_bytes:
            # XEP-0363 4.1: not-acceptable, the limit in the text (and in disco#info).
            raise StanzaError(
                "not-acceptable",
                f"file too large: at most {server.im.files.max_bytes} bytes",
            )
        try:
            slot = await server.im.files.slot(session.user_id, name, size)
        except Problem as problem:  # too many slots unused
            raise StanzaError("resource-constraint", problem.detail or problem.title) from None
        answer = element("slot", ns=UPLOAD)
        child(answer, "put", {"url": slot.put_url})
        child(answer, "get", {"url": slot.get_url})
        return result(iq, answer)

    server.iq("get", q(UPLOAD, "request"), request_slot)
