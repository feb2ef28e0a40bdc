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
    stream_management,
    upload,
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
    upload,
    stream_management,  # after messages: its unbind hook takes back their delivery marks
)


def install_all(server: XmppServer) -> None:
    for module in MODULES:
        module.install(server)
