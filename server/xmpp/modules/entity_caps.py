"""What each client supports, from the entity capabilities (XEP-0115) in its presence: the
``<c node ver hash>`` names a feature set; the server asks the client's disco#info for it once
per ``ver`` (node#ver) and remembers the answer by ``ver`` when the hash checks out (XEP-0115
5.4), so a thousand clients of one version cost one question. An answer whose hash does not
match (or a legacy ``<c>`` without ``hash``) counts for that session only.

Other modules (PEP's ``+notify``, XEP-0163 section 4) read ``features_of`` and are called
back through ``on_change`` when a session's features become known or change. This module's
presence handler only looks, and must come before the presence module's, which takes the
stanza.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary, WeakSet

from server.xmpp.session import C2SSession
from server.xmpp.stanza import CLIENT, child, element, q

if TYPE_CHECKING:
    from server.xmpp.server import XmppServer

log = logging.getLogger(__name__)

CAPS = "http://jabber.org/protocol/caps"
INFO = "http://jabber.org/protocol/disco#info"
DATA = "jabber:x:data"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
# XEP-0115 hash names (IANA's) to hashlib's
HASHES = {
    "sha-1": "sha1",
    "sha-224": "sha224",
    "sha-256": "sha256",
    "sha-384": "sha384",
    "sha-512": "sha512",
}
MAX_VERSIONS = 10_000  # feature sets remembered by ver, at most
MAX_FEATURES = 1000  # features taken from one answer, at most
MAX_VER_CHARS = 256

ChangeHook = Callable[[C2SSession, frozenset[str]], Awaitable[None]]


def verification_string(info: ET.Element) -> str:
    """XEP-0115 5.1: the string a disco#info answer hashes to."""
    identities = sorted(
        "/".join(
            (
                ident.get("category", ""),
                ident.get("type", ""),
                ident.get(XML_LANG, ""),
                ident.get("name", ""),
            )
        )
        for ident in info.findall(q(INFO, "identity"))
    )
    features = sorted(f.get("var", "") for f in info.findall(q(INFO, "feature")))
    text = "".join(f"{i}<" for i in identities) + "".join(f"{f}<" for f in features)
    forms: list[tuple[str, str]] = []
    for form in info.findall(q(DATA, "x")):
        form_type = ""
        fields: list[tuple[str, list[str]]] = []
        for field in form.findall(q(DATA, "field")):
            values = sorted(v.text or "" for v in field.findall(q(DATA, "value")))
            if field.get("var") == "FORM_TYPE":
                form_type = values[0] if values else ""
            else:
                fields.append((field.get("var", ""), values))
        if not form_type:
            continue  # XEP-0115 5.4: forms without FORM_TYPE are left out
        part = f"{form_type}<" + "".join(
            f"{var}<" + "".join(f"{v}<" for v in values) for var, values in sorted(fields)
        )
        forms.append((form_type, part))
    return text + "".join(part for _, part in sorted(forms))


def verifies(info: ET.Element, algorithm: str, ver: str) -> bool:
    """Whether ``ver`` is the hash of the answer, by an algorithm XEP-0115 allows."""
    name = HASHES.get(algorithm)
    if name is None:
        return False
    digest = hashlib.new(name, verification_string(info).encode()).digest()
    return base64.b64encode(digest).decode() == ver


def features_in(info: ET.Element) -> frozenset[str]:
    return frozenset(
        f.get("var", "") for f in info.findall(q(INFO, "feature"))[:MAX_FEATURES] if f.get("var")
    )


class ClientCaps:
    """One per hub (``caps_of``)."""

    def __init__(self, server: XmppServer) -> None:
        self._server = server
        self._by_ver: dict[str, frozenset[str]] = {}
        self._asking: dict[str, asyncio.Future[frozenset[str] | None]] = {}
        self._of: WeakKeyDictionary[C2SSession, frozenset[str]] = WeakKeyDictionary()
        # The caps a session announced last: (node, ver, hash).
        self._announced: WeakKeyDictionary[C2SSession, tuple[str, str, str]] = WeakKeyDictionary()
        self._busy: WeakSet[C2SSession] = WeakSet()  # one question to a client at a time
        self._hooks: list[ChangeHook] = []

    def features_of(self, session: C2SSession) -> frozenset[str]:
        """What the session's client supports, as far as known (empty before its caps)."""
        return self._of.get(session, frozenset())

    def on_change(self, hook: ChangeHook) -> None:
        self._hooks.append(hook)

    async def presence(self, session: C2SSession, stanza: ET.Element) -> None:
        """A client's broadcast presence: learn its features if its caps are new."""
        caps = stanza.find(q(CAPS, "c"))
        if caps is None:
            return
        node, ver, algorithm = caps.get("node", ""), caps.get("ver", ""), caps.get("hash", "")
        if not ver or len(ver) > MAX_VER_CHARS or len(node) > MAX_VER_CHARS:
            return
        if self._ver_of(session) == ver:
            return
        self._announced[session] = (node, ver, algorithm)
        known = self._by_ver.get(ver) if algorithm in HASHES else None
        if known is not None:
            await self._set(session, known)
        elif session not in self._busy:
            self._busy.add(session)
            self._server.spawn(self._learn_latest(session))

    def _ver_of(self, session: C2SSession) -> str:
        announced = self._announced.get(session)
        return announced[1] if announced else ""

    async def _learn_latest(self, session: C2SSession) -> None:
        """Learn the session's caps, again while it announced others meanwhile (a client
        changing caps in a loop has one question out at a time)."""
        try:
            asked = ("", "", "")
            while (latest := self._announced.get(session)) is not None and latest != asked:
                asked = latest
                known = self._by_ver.get(latest[1]) if latest[2] in HASHES else None
                if known is not None:
                    await self._set(session, known)
                else:
                    await self._learn(session, *latest)
        finally:
            self._busy.discard(session)

    async def _learn(self, session: C2SSession, node: str, ver: str, algorithm: str) -> None:
        shared = algorithm in HASHES  # only a hashed ver names the same features for everyone
        waiting = self._asking.get(ver) if shared else None
        found = await asyncio.shield(waiting) if waiting is not None else None
        if found is None:
            if shared and waiting is None:
                future: asyncio.Future[frozenset[str] | None] = (
                    asyncio.get_running_loop().create_future()
                )
                self._asking[ver] = future
                try:
                    found = await self._ask(session, node, ver, algorithm)
                finally:
                    self._asking.pop(ver, None)
                    future.set_result(self._by_ver.get(ver))  # None: each asks its own
            else:
                found = await self._ask(session, node, ver, algorithm)
        if found is not None and self._ver_of(session) == ver:
            await self._set(session, found)

    async def _ask(
        self, session: C2SSession, node: str, ver: str, algorithm: str
    ) -> frozenset[str] | None:
        if session.jid is None:
            return None
        iq = element(
            "iq",
            {
                "type": "get",
                "id": f"caps-{secrets.token_hex(6)}",
                "from": self._server.domain,
                "to": str(session.jid),
            },
        )
        child(iq, "query", {"node": f"{node}#{ver}"}, ns=INFO)
        answer = await self._server.request(session, iq)
        info = answer.find(q(INFO, "query")) if answer is not None else None
        if answer is None or answer.get("type") != "result" or info is None:
            return None
        found = features_in(info)
        if verifies(info, algorithm, ver):
            if len(self._by_ver) >= MAX_VERSIONS:
                self._by_ver.clear()
            self._by_ver[ver] = found
        else:
            log.debug("xmpp %s: caps ver does not match its disco#info", session.jid)
        return found

    async def _set(self, session: C2SSession, features: frozenset[str]) -> None:
        if self._of.get(session) == features:
            return
        self._of[session] = features
        for hook in self._hooks:
            try:
                await hook(session, features)
            except Exception:
                log.exception("caps hook failed for %s", session.jid)


_caps: WeakKeyDictionary[object, ClientCaps] = WeakKeyDictionary()


def caps_of(server: XmppServer) -> ClientCaps:
    found = _caps.get(server)
    if found is None:
        found = _caps[server] = ClientCaps(server)
    return found


def install(server: XmppServer) -> None:
    caps = caps_of(server)

    async def look(session: C2SSession, stanza: ET.Element) -> bool:
        broadcast = stanza.tag == q(CLIENT, "presence") and not stanza.get("to")
        if broadcast and stanza.get("type") in (None, ""):
            await caps.presence(session, stanza)
        return False  # the presence module handles it

    server.on_presence(look)
