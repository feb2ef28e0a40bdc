"""The feature modules a hub loads, in the order their handlers are consulted."""

from __future__ import annotations

from server.xmpp.modules import (
    basics,
    blocking,
    carbons,
    csi,
    disco,
    entity_time,
    last_activity,
    mam,
    messages,
    muc,
    presence,
    roster,
    vcard,
)
from server.xmpp.server import XmppServer

MODULES = (
    basics,
    disco,
    csi,
    roster,
    presence,
    carbons,
    messages,
    mam,  # before muc, which takes MAM queries to rooms and leaves the rest to it
    muc,
    vcard,
    entity_time,
    last_activity,
    blocking,
)


def install_all(server: XmppServer) -> None:
    for module in MODULES:
        module.install(server)
