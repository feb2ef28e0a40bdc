"""Personal eventing (XEP-0163 PEP): the publish-subscribe service (XEP-0060) at every user's
bare JID, kept by the directory's ``PepService`` (server/directory/pep.py), which stores and
announces; this module translates.

- The owner publishes (with an item id, or one is made), retracts, reads (all, by id, the
  newest ``max_items``), deletes and configures their nodes; ``publish-options`` are the
  node's configuration when the publish creates it, preconditions otherwise (XEP-0060 7.1.5).
- Colleagues read nodes the access model allows (``presence``/``open``: whoever may see the
  owner; ``whitelist``: nobody but the owner).
- Notifications (``<message type='headline'>`` with a ``pubsub#event``) go to the owner's own
  online resources and to colleagues' resources the access model allows whose entity caps
  announced ``<node>+notify`` (XEP-0163 section 4), on every node of the hub (the service's
  events reach each). A resource that comes online (or whose caps become known) with
  ``+notify`` gets the last item of those nodes of everyone it may read (XEP-0163 "last
  published item"), at most ``MAX_NOTIFY_NODES`` node names and the service's bound on items.
- Subscriptions are implicit (the caps filter): explicit subscribe is not implemented.
"""

from __future__ import annotations

import logging
import secrets
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from server.directory import pep_rules as rules
from server.directory.pep import DELETED, PUBLISHED, RETRACTED, PepError, PepService
from server.directory.private_storage import StorageFull
from server.events.models import EphemeralEvent
from server.store.database import Document
from server.xmpp.jid import Jid
from server.xmpp.limits import writes_of
from server.xmpp.modules import bookmarks
from server.xmpp.modules.blocking import blocked_for
from server.xmpp.modules.entity_caps import caps_of
from server.xmpp.session import C2SSession
from server.xmpp.stanza import (
    STANZAS_NS,
    StanzaError,
    child,
    element,
    error_reply,
    namespace,
    q,
    result,
    small_int,
)
from server.xmpp.xmlstream import addressed, serialize

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from server.xmpp.server import XmppServer

    # A pubsub request handler: it always answers (errors included).
    IqRequest = Callable[[C2SSession, ET.Element, ET.Element], Awaitable[ET.Element]]

log = logging.getLogger(__name__)

PUBSUB = "http://jabber.org/protocol/pubsub"
OWNER = f"{PUBSUB}#owner"
EVENT = f"{PUBSUB}#event"
ERRORS = f"{PUBSUB}#errors"
PUBLISH_OPTIONS = f"{PUBSUB}#publish-options"
NODE_CONFIG = f"{PUBSUB}#node_config"
DATA = "jabber:x:data"
INFO = "http://jabber.org/protocol/disco#info"
ITEMS = "http://jabber.org/protocol/disco#items"
FEATURES = tuple(
    f"{PUBSUB}#{name}"
    for name in (
        "publish",
        "publish-options",
        "retrieve-items",
        "retract-items",
        "delete-nodes",
        "create-nodes",
        "config-node",
        "auto-create",
        "last-published",
        "persistent-items",
        "access-presence",
        "access-open",
        "access-whitelist",
    )
)
IDENTITY = ("pubsub", "pep")
MAX_NOTIFY_NODES = 50  # node names one client's +notify may ask last items of, at most
NOTIFY = "+notify"


class PubsubError(StanzaError):
    """A stanza error with XEP-0060's own condition (pubsub#errors) beside the general one."""

    def __init__(self, condition: str, app: str = "", text: str = "", **attrs: str) -> None:
        super().__init__(condition, text)
        self.app = app
        self.attrs = attrs


def pubsub_error(iq: ET.Element, exc: StanzaError) -> ET.Element:
    reply = error_reply(iq, exc.condition, exc.text)
    if isinstance(exc, PubsubError) and exc.app:
        error = reply[-1]
        # XEP-0060: the application condition after the defined condition, before the text.
        at = 1 if len(error) and error[0].tag == q(STANZAS_NS, exc.condition) else 0
        error.insert(at, element(exc.app, exc.attrs, ns=ERRORS))
    return reply


def service_error(exc: PepError) -> PubsubError:
    """The XEP-0060 error for a refusal of the service."""
    match exc.kind:
        case "precondition":
            return PubsubError("conflict", "precondition-not-met", exc.text)
        case "payload-too-big":
            return PubsubError("not-acceptable", "payload-too-big", exc.text)
        case "too-many-nodes":
            # (not policy-violation: older libraries, slixmpp among them, cannot read it and
            # leave the request unanswered)
            return PubsubError("not-allowed", "", exc.text)
        case "exists":
            return PubsubError("conflict", "", exc.text)
        case "no-node" | "no-item":
            return PubsubError("item-not-found", "", exc.text)
        case _:
            return PubsubError("not-acceptable", "", exc.text)


def form_fields(parent: ET.Element | None, form_type: str) -> dict[str, list[str]] | None:
    """The fields of a submitted data form (XEP-0004) inside ``parent``; None without one.
    A form of another FORM_TYPE is ``bad-request``."""
    form = parent.find(q(DATA, "x")) if parent is not None else None
    if form is None or form.get("type") == "cancel":
        return None
    fields: dict[str, list[str]] = {}
    for field in form.findall(q(DATA, "field")):
        var = field.get("var", "")
        values = [v.text or "" for v in field.findall(q(DATA, "value"))]
        if var == "FORM_TYPE":
            if values and values[0] != form_type:
                raise PubsubError("bad-request", "", f"FORM_TYPE is {form_type}")
            continue
        fields[var] = values
    return fields


def config_form(config: dict[str, str]) -> ET.Element:
    """A node's configuration as XEP-0060 8.2 shows it."""
    form = element("x", {"type": "form"}, ns=DATA)
    field = child(form, "field", {"var": "FORM_TYPE", "type": "hidden"})
    child(field, "value", text=NODE_CONFIG)
    choices = {rules.ACCESS: rules.ACCESS_MODELS, rules.SEND_LAST: rules.SEND_LAST_VALUES}
    for name in rules.FIELDS:
        if name in choices:
            field = child(form, "field", {"var": name, "type": "list-single"})
            for option in choices[name]:
                child(child(field, "option"), "value", text=option)
        elif name in rules.BOOLEAN_FIELDS:
            field = child(form, "field", {"var": name, "type": "boolean"})
        else:
            field = child(form, "field", {"var": name, "type": "text-single"})
        child(field, "value", text=config.get(name, rules.DEFAULTS.get(name, "")))
    return form


def node_of(request: ET.Element) -> str:
    node = request.get("node", "")
    if not node:
        raise PubsubError("bad-request", "nodeid-required")
    if not rules.valid_name(node):
        raise PubsubError("not-acceptable", "", "a node name is 1 to 256 printable characters")
    return node


def event_message(owner: Jid, body: ET.Element) -> ET.Element:
    message = element(
        "message", {"from": str(owner), "type": "headline", "id": f"pep-{secrets.token_hex(6)}"}
    )
    event = child(message, "event", ns=EVENT)
    event.append(body)
    return message


def items_event(node: str, item_id: str, payload: str | None) -> ET.Element:
    items = element("items", {"node": node}, ns=EVENT)
    item = child(items, "item", {"id": item_id})
    if payload is not None:
        # written by the publish from a parsed element: no DOCTYPE, no entities
        item.append(ET.fromstring(payload))
    return items


def install(server: XmppServer) -> None:
    service = server.pep
    if service is None:
        return  # not wired: nothing announced
    pep: PepService = service
    caps = caps_of(server)
    server.account_features.update(FEATURES)
    # Per session: the nodes whose last items it was sent since it came online.
    primed: WeakKeyDictionary[C2SSession, set[str]] = WeakKeyDictionary()

    # whose service ---------------------------------------------------------------------------

    async def owner_of(session: C2SSession, iq: ET.Element) -> Document | None:
        """The user whose PEP service the iq addresses (None: nobody the sender may see)."""
        assert session.user is not None and session.jid is not None
        to = iq.get("to")
        if not to:
            return session.user
        target = Jid.parse(to)
        if target.domain != server.domain or not target.local:
            raise StanzaError("service-unavailable")
        if target.bare == session.jid.bare:
            return session.user
        return await server.user_for(target)

    def own(session: C2SSession, owner: Document | None) -> str:
        if owner is None or str(owner["_id"]) != session.user_id:
            raise StanzaError("forbidden", "only the owner changes a PEP node")
        return session.user_id

    async def sees(viewer: Document, owner: Document) -> bool:
        """Whether ``viewer`` may see ``owner`` (active), with no block between them."""
        if not owner.get("is_active", True) or not await server.directory.may_see(viewer, owner):
            return False
        owner_jid = f"{owner['login']}@{server.domain}"
        viewer_jid = f"{viewer['login']}@{server.domain}"
        return not (
            await blocked_for(server, str(viewer["_id"]), owner_jid)
            or await blocked_for(server, str(owner["_id"]), viewer_jid)
        )

    async def may_read(viewer: Document, owner: Document, access: str) -> bool:
        if str(viewer["_id"]) == str(owner["_id"]):
            return True
        return rules.may_read(access, is_owner=False, sees_owner=await sees(viewer, owner))

    # requests --------------------------------------------------------------------------------

    def guarded(request: IqRequest) -> IqRequest:
        """``request`` with the service's and the protocol's refusals answered as pubsub
        errors, so each request handler only says what went wrong."""

        async def answer(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
            try:
                return await request(session, iq, payload)
            except PepError as exc:
                return pubsub_error(iq, service_error(exc))
            except PubsubError as exc:
                return pubsub_error(iq, exc)

        return answer

    async def pubsub_set(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        user_id = own(session, await owner_of(session, iq))
        publish = payload.find(q(PUBSUB, "publish"))
        if publish is not None:
            return await do_publish(session, iq, payload, publish, user_id)
        retract = payload.find(q(PUBSUB, "retract"))
        if retract is not None:
            writes_of(server).check(user_id)
            node = node_of(retract)
            items = retract.findall(q(PUBSUB, "item"))
            if len(items) != 1 or not items[0].get("id"):
                raise PubsubError("bad-request", "item-required")
            if node == rules.BOOKMARKS:
                await bookmarks.adopt_legacy(server, user_id)
            notify = retract.get("notify", "false") in ("1", "true")
            await pep.retract(user_id, node, items[0].get("id", ""), notify=notify)
            return result(iq)
        create = payload.find(q(PUBSUB, "create"))
        if create is not None:
            writes_of(server).check(user_id)
            node = node_of(create)
            options = config_options(payload.find(q(PUBSUB, "configure")), NODE_CONFIG)
            await pep.create(user_id, node, options)
            return result(iq)
        what = payload[0].tag.rpartition("}")[2] if len(payload) else "publish"
        raise PubsubError("feature-not-implemented", "unsupported", feature=what)

    def config_options(parent: ET.Element | None, form_type: str) -> dict[str, str]:
        fields = form_fields(parent, form_type)
        try:
            return rules.normalize(fields or {})
        except rules.ConfigError as exc:
            raise PubsubError("not-acceptable", "", str(exc)) from None

    async def do_publish(
        session: C2SSession,
        iq: ET.Element,
        payload: ET.Element,
        publish: ET.Element,
        user_id: str,
    ) -> ET.Element:
        writes_of(server).check(user_id)
        node = node_of(publish)
        items = publish.findall(q(PUBSUB, "item"))
        if not items:
            raise PubsubError("bad-request", "item-required")
        if len(items) > 1:
            raise PubsubError("bad-request", "invalid-payload", "one item per publish")
        item = items[0]
        if len(item) == 0:
            raise PubsubError("bad-request", "payload-required")
        if len(item) > 1:
            raise PubsubError("bad-request", "invalid-payload", "one element per item")
        item_id = item.get("id") or secrets.token_hex(8)
        data = serialize(item[0], namespace(item[0].tag)).decode()
        fields = form_fields(payload.find(q(PUBSUB, "publish-options")), PUBLISH_OPTIONS)
        try:
            options = rules.normalize(fields or {})
        except rules.ConfigError as exc:
            # An option this server cannot hold is a precondition it cannot meet.
            raise PubsubError("conflict", "precondition-not-met", str(exc)) from None
        if node == rules.BOOKMARKS:
            await bookmarks.adopt_legacy(server, user_id)
        await pep.publish(user_id, node, item_id, data, options)
        if node == bookmarks.LEGACY and item[0].tag == bookmarks.KEY:
            try:
                await bookmarks.publish_legacy(server, user_id, item[0])
            except StorageFull as exc:
                raise PubsubError("not-acceptable", "payload-too-big", str(exc)) from None
        answer = element("pubsub", ns=PUBSUB)
        child(child(answer, "publish", {"node": node}), "item", {"id": item_id})
        return result(iq, answer)

    async def pubsub_get(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        assert session.user is not None
        wanted = payload.find(q(PUBSUB, "items"))
        if wanted is None:
            what = payload[0].tag.rpartition("}")[2] if len(payload) else "items"
            raise PubsubError("feature-not-implemented", "unsupported", feature=what)
        node_name = node_of(wanted)
        owner = await owner_of(session, iq)
        if owner is None:
            raise PubsubError("item-not-found")
        owner_id = str(owner["_id"])
        if owner_id == session.user_id and node_name == rules.BOOKMARKS:
            await bookmarks.adopt_legacy(server, owner_id)
        if owner_id == session.user_id and node_name == bookmarks.LEGACY:
            view = await bookmarks.legacy_view(server, owner_id)
            if view is not None:  # XEP-0048 over PEP: the one list, as it is now
                answer = element("pubsub", ns=PUBSUB)
                items = child(answer, "items", {"node": node_name})
                child(items, "item", {"id": bookmarks.LEGACY_ITEM}).append(view)
                return result(iq, answer)
        node = await pep.node(owner_id, node_name)
        if node is None:
            raise PubsubError("item-not-found")
        if owner_id != session.user_id:
            if not await sees(session.user, owner):
                raise PubsubError("item-not-found")  # as for a user one may not see at all
            if not rules.may_read(node.access, is_owner=False, sees_owner=True):
                raise PubsubError("not-allowed", "closed-node")  # XEP-0060 6.5.9.5
        ids = [i.get("id", "") for i in wanted.findall(q(PUBSUB, "item")) if i.get("id")]
        max_items = small_int(wanted.get("max_items")) if wanted.get("max_items") else None
        if wanted.get("max_items") and not max_items:
            raise PubsubError("bad-request", "", "max_items is a positive number")
        found = await pep.items(owner_id, node_name, ids, max_items)
        answer = element("pubsub", ns=PUBSUB)
        items = child(answer, "items", {"node": node_name})
        for item in found:
            child(items, "item", {"id": item.item_id}).append(ET.fromstring(item.payload))
        return result(iq, answer)

    async def owner_request(session: C2SSession, iq: ET.Element, payload: ET.Element) -> ET.Element:
        user_id = own(session, await owner_of(session, iq))
        configure = payload.find(q(OWNER, "configure"))
        if configure is not None:
            node = node_of(configure)
            if iq.get("type") == "get":
                found = await pep.node(user_id, node)
                if found is None:
                    raise PubsubError("item-not-found")
                answer = element("pubsub", ns=OWNER)
                child(answer, "configure", {"node": node}).append(config_form(found.config))
                return result(iq, answer)
            writes_of(server).check(user_id)
            changes = config_options(configure, NODE_CONFIG)
            await pep.configure(user_id, node, changes)
            return result(iq)
        delete = payload.find(q(OWNER, "delete"))
        if delete is not None and iq.get("type") == "set":
            writes_of(server).check(user_id)
            node = node_of(delete)
            await pep.delete(user_id, node)
            if node == rules.BOOKMARKS:
                await bookmarks.forget_legacy(server, user_id)
            return result(iq)
        what = payload[0].tag.rpartition("}")[2] if len(payload) else "owner"
        raise PubsubError("feature-not-implemented", "unsupported", feature=what)

    server.iq("set", q(PUBSUB, "pubsub"), guarded(pubsub_set))
    server.iq("get", q(PUBSUB, "pubsub"), guarded(pubsub_get))
    server.iq("get", q(OWNER, "pubsub"), guarded(owner_request))
    server.iq("set", q(OWNER, "pubsub"), guarded(owner_request))

    # disco: the account is a PEP service (identity pubsub/pep) with its nodes as items ------

    def user_address(iq: ET.Element, payload: ET.Element) -> Jid | None:
        to = iq.get("to")
        if not to or payload.get("node"):
            return None
        target = Jid.parse(to)
        if target.domain != server.domain or not target.local or target.resource:
            return None
        return target

    disco_info = server.iq_handler("get", q(INFO, "query"))
    disco_items = server.iq_handler("get", q(ITEMS, "query"))

    if disco_info is not None:
        inner_info = disco_info

        async def info(
            session: C2SSession, iq: ET.Element, payload: ET.Element
        ) -> ET.Element | None:
            reply = await inner_info(session, iq, payload)
            query = reply.find(q(INFO, "query")) if reply is not None else None
            if query is not None and user_address(iq, payload) is not None:
                category, kind = IDENTITY
                at = len(query.findall(q(INFO, "identity")))
                identity = element("identity", {"category": category, "type": kind}, ns=INFO)
                query.insert(at, identity)
            return reply

        server.iq("get", q(INFO, "query"), info)

    if disco_items is not None:
        inner_items = disco_items

        async def items(
            session: C2SSession, iq: ET.Element, payload: ET.Element
        ) -> ET.Element | None:
            target = user_address(iq, payload)
            if target is None or session.user is None:
                return await inner_items(session, iq, payload)
            query = element("query", ns=ITEMS)
            owner = await server.user_for(target)
            if owner is not None:
                for node in await pep.nodes(str(owner["_id"])):
                    if await may_read(session.user, owner, node.access):
                        child(query, "item", {"jid": str(target.bare), "node": node.name})
            return result(iq, query)

        server.iq("get", q(ITEMS, "query"), items)

    # notifications ---------------------------------------------------------------------------

    async def notify(event: EphemeralEvent) -> None:
        """On every node: tell this node's sessions that may read the node and asked."""
        if event.type not in (PUBLISHED, RETRACTED, DELETED):
            return
        owner_id = str(event.data.get("owner_id", ""))
        node = str(event.data.get("node", ""))
        access = str(event.data.get("access", "presence"))
        owner = await server.directory.cached_user(owner_id)
        if owner is None:
            return
        if event.type == PUBLISHED:
            body = items_event(
                node, str(event.data.get("item_id", "")), str(event.data.get("payload", ""))
            )
        elif event.type == RETRACTED:
            body = element("items", {"node": node}, ns=EVENT)
            child(body, "retract", {"id": str(event.data.get("item_id", ""))})
        else:
            body = element("delete", {"node": node}, ns=EVENT)
        wire = addressed(event_message(server.jid_of(owner), body))
        interest = rules.notify_feature(node)
        for user_id, resources in list(server.sessions.items()):
            targets = [s for s in resources.values() if s.available and s.jid is not None]
            if user_id != owner_id:
                targets = [s for s in targets if interest in caps.features_of(s)]
                if not targets:
                    continue
                viewer = await server.directory.cached_user(user_id)
                if viewer is None or not await may_read(viewer, owner, access):
                    continue
            for session in targets:
                session.send_bytes(wire(str(session.jid)))

    server.bus.subscribe_ephemeral(notify)

    async def prime(session: C2SSession) -> None:
        """XEP-0163's "last published item": a resource online with +notify for some nodes
        gets the last item of each such node it may read (its own included), once per node
        while it stays online."""
        if not session.available or session.user is None or session.jid is None:
            return
        wanted = sorted(f[: -len(NOTIFY)] for f in caps.features_of(session) if f.endswith(NOTIFY))
        done = primed.setdefault(session, set())
        fresh = [n for n in wanted if n not in done and rules.valid_name(n)]
        if not fresh:
            return
        fresh = fresh[: max(0, MAX_NOTIFY_NODES - len(done))]
        done.update(fresh)
        viewer = session.user
        owners = set(await server.directory.visible_user_ids(viewer)) | {session.user_id}
        found = await pep.last_items(owners, fresh)
        docs = await server.directory.cached_users(sorted({n.owner_id for n in found}))
        for node in found:
            owner = docs.get(node.owner_id)
            if owner is None or node.last is None or not session.available:
                continue
            if node.config.get(rules.SEND_LAST) == "never":
                continue
            if not await may_read(viewer, owner, node.access):
                continue
            body = items_event(node.name, node.last.item_id, node.last.payload)
            message = event_message(server.jid_of(owner), body)
            message.set("to", str(session.jid))
            session.send_nowait(message)

    async def available(session: C2SSession) -> None:
        await prime(session)

    async def unavailable(session: C2SSession) -> None:
        primed.pop(session, None)  # the next initial presence gets the last items again

    async def caps_changed(session: C2SSession, features: frozenset[str]) -> None:
        await prime(session)

    server.on_available.append(available)
    server.on_unavailable.append(unavailable)
    caps.on_change(caps_changed)
