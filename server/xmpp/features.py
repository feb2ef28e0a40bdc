"""The feature modules a hub loads, in the order their handlers are consulted."""

from __future__ import annotations

from server.xmpp.modules import (
    basics,
    carbons,
    disco,
    mam,
    messages,
    muc,
    presence,
    roster,
    upload,
    vcard,
)
from server.xmpp.server import XmppServer

MODULES = (basics, disco, roster, presence, carbons, messages, muc, mam, vcard, upload)


def install_all(server: XmppServer) -> None:
    for module in MODULES:
        module.install(server)
