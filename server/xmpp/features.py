"""The feature modules a hub loads, in the order their handlers are consulted."""

from __future__ import annotations

from server.xmpp.modules import (
    basics,
    blocking,
    bookmarks,
    carbons,
    csi,
    disco,
    entity_caps,
    entity_time,
    last_activity,
    mam,
    messages,
    muc,
    pep,
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
    entity_caps,  # before presence, whose handler takes the stanza: it only looks at caps
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
    pep,  # after disco and muc: it adds the account's PEP identity and nodes to disco
    bookmarks,  # after basics and pep: XEP-0048 in private storage is XEP-0402's view
    stream_management,  # after messages: its unbind hook takes back their delivery marks
)


def install_all(server: XmppServer) -> None:
    for module in MODULES:
        module.install(server)
