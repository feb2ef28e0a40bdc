"""The XMPP server: listeners, the session registry, and the stanza router.

Modules (one per XEP, in ``server/xmpp/modules/``) register iq handlers keyed by (type,
payload tag), message and presence handlers, disco features, stream features, and hooks on
session start and end. The router stamps every stanza from a client with the session's full
JID before anything else looks at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.auth.service import AuthService
from server.background import SideTasks, raise_if_stopping, stop
from server.directory.pep import PepService
from server.directory.private_storage import PrivateStorage
from server.directory.service import DirectoryService
from server.events.bus import EventBus
from server.im.blocking import BlockingService
from server.im.service import ImService
from server.observability.context import context_for
from server.presence.service import PresenceService
from server.settings import Settings
from server.store.database import Document, Store
from server.xmpp.certs import ensure_self_signed, fingerprint, server_context
from server.xmpp.jid import InvalidJid, Jid
from server.xmpp.relay import Relay
from server.xmpp.session import C2SSession
from server.xmpp.stanza import CLIENT, PORTAL_RESOURCE, StanzaError, error_reply, q

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

IqHandler = Callable[[C2SSession, ET.Element, ET.Element], Awaitable[ET.Element | None]]
StanzaHandler = Callable[[C2SSession, ET.Element], Awaitable[bool]]
SessionHook = Callable[[C2SSession], Awaitable[None]]
TRANSPORT = "xmpp"
LISTEN_BACKLOG = 1024
MAX_CACHED_LOGINS = 100_000
HEARTBEAT_SECONDS = 5.0  # at most one presence heartbeat per session this often
REQUEST_SECONDS = 10.0  # how long the server waits for a client's answer (request())
MAX_REQUESTS = 10_000  # the server's requests waiting for an answer, at most


class XmppServer:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        auth: AuthService,
        directory: DirectoryService,
        presence: PresenceService,
        im: ImService,
        bus: EventBus,
    ) -> None:
        self.settings = settings
        self.domain = settings.domain.lower()
        self.store = store
        self.auth = auth
        self.directory = directory
        self.presence = presence
        self.im = im
        self.bus = bus
        self.sessions: dict[str, dict[str, C2SSession]] = {}  # user id -> resource -> session
        self._all: set[C2SSession] = set()
        self._iq: dict[tuple[str, str], IqHandler] = {}
        self._message_handlers: list[StanzaHandler] = []
        self._presence_handlers: list[StanzaHandler] = []
        self._on_bound: list[SessionHook] = []
        # Run together, without the login waiting, once a client has authenticated: reads of
        # what the session needs later (blocklist, presence, unread counters) fill their
        # caches while the client restarts its stream and binds, instead of one after another
        # in its bind and its initial presence.
        self._on_authenticated: list[SessionHook] = []
        self._on_unbound: list[SessionHook] = []
        self.on_available: list[SessionHook] = []  # after a session's initial presence
        self.on_unavailable: list[SessionHook] = []  # after it says unavailable, still bound
        self.disco_item_list: list[tuple[str, str]] = []
        self.features: set[str] = set()
        self.account_features: set[str] = set()  # what a user's bare JID offers (disco)
        # Extended information (XEP-0128) in the domain's disco#info: data forms.
        self.info_forms: list[Callable[[], ET.Element]] = []
        self.bridge: Any = None  # the messenger bridge (modules.messages), shared with MAM
        self.blocking: BlockingService | None = None  # XEP-0191's service, set by the app
        self.private_storage: PrivateStorage | None = None  # XEP-0049's, set by the app
        self.pep: PepService | None = None  # XEP-0163's, set by the app
        # The server's own requests to clients (request()), by (session id, iq id).
        self._requests: dict[tuple[str, str], asyncio.Future[ET.Element]] = {}
        # XEP-0198 (modules/stream_management.py): acks, and sessions held for resumption.
        self.stream_management: Any = None
        self.identities: list[tuple[str, str, str]] = [("server", "im", "Portal Hub")]
        self._stream_features: list[Callable[[], ET.Element]] = []
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()  # one per session
        self._side = SideTasks("xmpp task", log)
        self._housekeeper: asyncio.Task[None] | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self.cert_path: Path | None = None
        self.fingerprint = ""
        self.fingerprint_sha1 = ""
        self.ports: dict[str, int] = {}
        self._logins: dict[str, str] = {}  # user id -> login (neither ever changes)
        self._ids: dict[str, str] = {}  # login -> user id
        # This node's tag: its sessions' ids (presence source ids) start with it, so another
        # node knows where a colleague's resource lives (relay.py).
        self.node_tag = secrets.token_hex(4)
        self.relay = Relay(self)
        presence.on_drop(TRANSPORT, self._drop_source)
        # Revocation: sessions register with auth.sessions, which ends them (session.py).

    # registration ----------------------------------------------------------------------------

    def iq(self, kind: str, tag: str, handler: IqHandler) -> None:
        """Handle iq of ``kind`` (get/set) whose payload is ``tag`` (Clark notation)."""
        self._iq[(kind, tag)] = handler

    def iq_handler(self, kind: str, tag: str) -> IqHandler | None:
        """The handler registered so far, for a module that wraps it (e.g. by address)."""
        return self._iq.get((kind, tag))

    def on_message(self, handler: StanzaHandler) -> None:
        self._message_handlers.append(handler)

    def on_presence(self, handler: StanzaHandler) -> None:
        self._presence_handlers.append(handler)

    def on_bound(self, hook: SessionHook) -> None:
        self._on_bound.append(hook)

    def on_unbound(self, hook: SessionHook) -> None:
        self._on_unbound.append(hook)

    def on_authenticated(self, hook: SessionHook) -> None:
        """``hook`` is started (not awaited) when a client has authenticated: for warming
        caches. Nothing may depend on it having finished."""
        self._on_authenticated.append(hook)

    def authenticated(self, session: C2SSession) -> None:
        if self._on_authenticated:
            self.spawn(self._warm(session))

    async def _warm(self, session: C2SSession) -> None:
        results = await asyncio.gather(
            *(hook(session) for hook in self._on_authenticated), return_exceptions=True
        )
        for result in results:
            if isinstance(result, Exception):
                log.warning("warming up for %s failed: %r", session.peer, result)

    def add_feature(self, *namespaces: str) -> None:
        self.features.update(namespaces)

    def add_stream_feature(self, make: Callable[[], ET.Element]) -> None:
        self._stream_features.append(make)

    def disco_items(self) -> list[tuple[str, str]]:
        return list(self.disco_item_list)

    def stream_features(self) -> list[ET.Element]:
        return [make() for make in self._stream_features]

    # lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        if settings.xmpp_cert_file and settings.xmpp_key_file:
            cert, key = settings.xmpp_cert_file, settings.xmpp_key_file
        else:
            cert, key = await asyncio.to_thread(
                ensure_self_signed, settings.data_dir / "tls", self.domain
            )
        self.cert_path = cert
        self.ssl_context = server_context(cert, key)
        self.fingerprint = fingerprint(cert)
        self.fingerprint_sha1 = fingerprint(cert, "sha1")
        host = settings.xmpp_host or settings.host
        # A deep accept queue: a burst of connections (a reconnect storm after a network
        # blip, or an attack) must not overflow the kernel's queue and leave clients hanging.
        starttls = await asyncio.start_server(
            lambda r, w: self._accept(r, w, tls=False),
            host,
            settings.xmpp_port,
            limit=64 * 1024,
            backlog=LISTEN_BACKLOG,
        )
        direct = await asyncio.start_server(
            lambda r, w: self._accept(r, w, tls=True),
            host,
            settings.xmpp_tls_port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=min(15.0, settings.xmpp_auth_timeout_seconds),
            limit=64 * 1024,
            backlog=LISTEN_BACKLOG,
        )
        self._servers = [starttls, direct]
        self.ports = {
            "starttls": starttls.sockets[0].getsockname()[1],
            "tls": direct.sockets[0].getsockname()[1],
        }
        self._housekeeper = asyncio.create_task(self._keep_alive(), name="xmpp-keepalive")
        log.info(
            "XMPP on %s: STARTTLS port %s, direct TLS port %s; certificate SHA-256 %s",
            host,
            self.ports["starttls"],
            self.ports["tls"],
            self.fingerprint,
        )

    async def drain(self, timeout: float = 5.0) -> None:
        """The node is going away: stop accepting, and end every session with
        ``system-shutdown`` (RFC 6120 4.9.3.20), which clients answer by reconnecting - through
        the load balancer, to another node. Waits up to ``timeout`` for the sessions to end;
        stop() does the rest."""
        for srv in self._servers:
            srv.close()
        sessions = list(self._all)
        await asyncio.gather(
            *(session.terminate("system-shutdown") for session in sessions),
            return_exceptions=True,
        )
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        await self._release_held()
        await self._side.wait(timeout)
        if sessions:
            log.info("drained %s XMPP sessions", len(sessions))

    async def stop(self) -> None:
        for srv in self._servers:
            srv.close()
        await stop(self._housekeeper)  # no pings to sessions being ended
        for session in list(self._all):
            await session.terminate("system-shutdown")
        await stop(*self._tasks)
        await self._release_held()
        await stop(*self._side)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 5)

    async def _release_held(self) -> None:
        """Sessions held for resumption live in this process only: they end now, their
        unacknowledged messages left for offline delivery (XEP-0198, on any node)."""
        if self.stream_management is not None:
            try:
                await self.stream_management.stop()
            except Exception:
                log.exception("ending the held XMPP sessions failed")

    def hold(self, session: C2SSession) -> bool:
        """Whether a session whose connection died is held for the client to resume."""
        return self.stream_management is not None and bool(self.stream_management.hold(session))

    def resume_on(self, session: C2SSession, rest: list[tuple[str, Any]]) -> None:
        """A held session goes on over a new connection (XEP-0198), in a task of its own."""
        self._run(session, session.run_resumed(rest))

    def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, tls: bool
    ) -> None:
        if len(self._all) >= self.settings.xmpp_max_connections:
            writer.close()
            return
        session = C2SSession(self, reader, writer, tls=tls)
        self._run(session, session.run())

    def _run(self, session: C2SSession, work: Coroutine[Any, Any, None]) -> None:
        self._all.add(session)
        task = asyncio.create_task(  # its logs carry the session's id as their request id
            work, name=f"xmpp:{session.peer}", context=context_for(f"xmpp-{session.id}")
        )
        self._tasks.add(task)
        session.task = task

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if session.task is t:  # not if it went on over another connection meanwhile
                self._all.discard(session)

        task.add_done_callback(done)

    async def _keep_alive(self) -> None:
        """Ping quiet sessions; a session silent past the timeout is closed (XEP-0199)."""
        interval = self.settings.xmpp_ping_interval_seconds
        timeout = self.settings.xmpp_ping_timeout_seconds
        while True:
            await asyncio.sleep(max(0.2, min(interval, timeout) / 2))
            now = time.monotonic()
            for session in list(self._all):
                if not session.bound:
                    continue
                quiet = now - session.last_read
                try:
                    if quiet > interval + timeout:
                        log.info("xmpp %s: no answer to ping; closing", session.jid)
                        if session.sm is not None and session.sm.id is not None:
                            # Gone silent (a phone out of coverage): held for resumption.
                            session.drop_connection()
                        else:
                            await session.terminate("connection-timeout", "no answer to ping")
                    elif quiet > interval and not session._pending_pings:
                        await session.ping()
                except Exception:
                    raise_if_stopping()
                    log.exception("keep-alive of %s failed", session.jid)

    def touched(self, session: C2SSession) -> None:
        session._pending_pings.clear()
        if not session.available:
            return
        # A sign of life for the presence sweeper, which drops a source silent for its
        # timeout (minutes): one per few seconds is plenty, not one per read.
        now = time.monotonic()
        every = min(HEARTBEAT_SECONDS, self.presence.heartbeat_timeout / 4)
        if now - session.last_heartbeat >= every:
            session.last_heartbeat = now
            self.spawn(
                self.presence.heartbeat(session.user_id, session.id, _is_active(session.presence))
            )

    async def request(
        self, session: C2SSession, iq: ET.Element, timeout: float = REQUEST_SECONDS
    ) -> ET.Element | None:
        """Send an iq get from the server to one of its clients and wait for the answer (a
        result or an error); None when none came in time, or too many are waiting."""
        key = (session.id, iq.get("id", ""))
        if len(self._requests) >= MAX_REQUESTS or key in self._requests:
            return None
        future: asyncio.Future[ET.Element] = asyncio.get_running_loop().create_future()
        self._requests[key] = future
        try:
            session.send_nowait(iq)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            self._requests.pop(key, None)

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        """A task owned by the server (stopped with it); a failure is logged."""
        return self._side.spawn(coro)

    # binding ---------------------------------------------------------------------------------

    async def bind(self, session: C2SSession, wanted: str) -> Jid:
        user_id = session.user_id
        resources = self.sessions.setdefault(user_id, {})
        resource = wanted[:100] if wanted else f"portalhub-{secrets.token_hex(4)}"
        if resource == PORTAL_RESOURCE:
            # The name of the web messenger's resource: a client asking for it gets another
            # (RFC 6120 7.7.2.3 lets the server choose), or colleagues could not tell them apart.
            resource = f"{PORTAL_RESOURCE}-{secrets.token_hex(4)}"
        old = resources.get(resource)
        if old is None and len(resources) >= self.settings.xmpp_max_sessions_per_user:
            raise StanzaError("resource-constraint", "too many sessions for this user")
        jid = Jid(str(session.user["login"]) if session.user else "", self.domain, resource)
        resources[resource] = session
        if old is not None and old is not session:
            # RFC 6120 7.7.2.2: the newer session wins; the old one ends with <conflict/>.
            old.jid = None
            await self._unbound(old)
            await old.terminate("conflict", "replaced by a new session with this resource")
        session.jid = jid
        for hook in self._on_bound:
            await hook(session)
        return jid

    async def unbind(self, session: C2SSession) -> None:
        if session.jid is None or session.user is None:
            return
        resources = self.sessions.get(session.user_id, {})
        if resources.get(session.jid.resource) is session:
            del resources[session.jid.resource]
            if not resources:
                self.sessions.pop(session.user_id, None)
        await self._unbound(session)
        session.jid = None

    async def _unbound(self, session: C2SSession) -> None:
        self.relay.forget(session)
        for hook in self._on_unbound:
            try:
                await hook(session)
            except Exception:
                log.exception("unbind hook failed for %s", session.jid)

    async def _drop_source(self, transport: str, source_id: str) -> None:
        for session in list(self._all):
            if session.id == source_id:
                await session.terminate("connection-timeout", "no sign of life")

    # lookup ----------------------------------------------------------------------------------

    async def _peer_session(self, session: C2SSession, to: Jid) -> C2SSession | None:
        """The bound session a full JID names, when it is another user's (or another resource
        of one's own) that the sender may reach; None where the server itself answers."""
        if not to.resource or to.domain != self.domain or not to.local:
            return None
        target = await self.user_for(to)
        if target is None:
            return None
        peer = self.sessions.get(str(target["_id"]), {}).get(to.resource)
        if peer is None or peer is session:
            return None
        assert session.user is not None
        if not await self.directory.may_see(session.user, target):
            return None
        return peer

    async def _blocks(self, peer: C2SSession, session: C2SSession) -> bool:
        """Whether ``peer``'s user blocked the sender (XEP-0191)."""
        return (
            self.blocking is not None
            and session.jid is not None
            and await self.blocking.blocks(peer.user_id, str(session.jid))
        )

    @property
    def connection_count(self) -> int:
        """Open client streams, logged in or not."""
        return len(self._all)

    @property
    def session_count(self) -> int:
        """Bound sessions (one per logged-in resource)."""
        return sum(len(resources) for resources in self.sessions.values())

    def sessions_of(self, user_id: str) -> list[C2SSession]:
        return list(self.sessions.get(user_id, {}).values())

    def available_sessions_of(self, user_id: str) -> list[C2SSession]:
        return [s for s in self.sessions_of(user_id) if s.available]

    async def user_for(self, jid: Jid) -> Document | None:
        """The user a JID of this domain names, or None. Their document comes from the
        directory (its cache), found by id: a login never changes, so which id it names is
        remembered here, and a message to a colleague costs no lookup by login."""
        if jid.domain != self.domain or not jid.local:
            return None
        user_id = self._ids.get(jid.local)
        if user_id is not None:
            return await self.directory.cached_user(user_id)
        doc = await self.directory.user_by_login(jid.local)
        if doc is None:
            return None
        self._remember(str(doc["_id"]), str(doc["login"]))
        for secret in ("password_hash", "scram"):
            doc.pop(secret, None)
        return doc

    async def login_of(self, user_id: str | None) -> str | None:
        """A user's login (their JID's localpart), remembered: logins never change."""
        if user_id is None:
            return None
        if user_id not in self._logins:
            doc = await self.directory.cached_user(user_id)
            if doc is None:
                return None
            self._remember(user_id, str(doc["login"]))
        return self._logins[user_id]

    def _remember(self, user_id: str, login: str) -> None:
        if len(self._logins) > MAX_CACHED_LOGINS:
            self._logins.clear()
            self._ids.clear()
        self._logins[user_id] = login
        self._ids[login] = user_id

    def jid_of(self, user: Document) -> Jid:
        return Jid(str(user["login"]), self.domain)

    # routing ---------------------------------------------------------------------------------

    async def route_from_client(self, session: C2SSession, stanza: ET.Element) -> None:
        """One stanza of a bound session, in arrival order. A plain message is checked and
        handed to the write path, and the next stanza is read while it is stored (up to
        ``xmpp_max_stanzas_in_flight``); anything else first waits for those stores, so it
        sees their effects and its answers come after theirs."""
        assert session.jid is not None
        stanza.set("from", str(session.jid))  # never trust the client's from
        kind = stanza.tag
        if kind == MESSAGE and overlappable(stanza):
            await session.pipeline.room()
        elif session.pipeline.busy:
            await session.pipeline.drain()
        try:
            if kind == IQ:
                await self._route_iq(session, stanza)
            elif kind == MESSAGE:
                refused = self.store.space.refusal()
                if refused is not None and stanza.find(BODY) is not None:
                    # A message to store (or a correction) while the disk is nearly full:
                    # "wait" tells the client to try again later.
                    raise StanzaError("resource-constraint", refused)
                for handler in self._message_handlers:
                    if await handler(session, stanza):
                        return
                if stanza.get("type") != "error":
                    session.answer(stanza, error_reply(stanza, "service-unavailable"))
            elif kind == q(CLIENT, "presence"):
                for handler in self._presence_handlers:
                    if await handler(session, stanza):
                        return
            else:
                for handler in self._message_handlers:  # nonzas (csi, sm) handled there
                    if await handler(session, stanza):
                        return
                from server.xmpp.xmlstream import StreamError

                raise StreamError("unsupported-stanza-type")
        except StanzaError as exc:
            if stanza.get("type") != "error":
                session.answer(stanza, error_reply(stanza, exc.condition, exc.text))
        except InvalidJid:
            if stanza.get("type") != "error":
                session.answer(stanza, error_reply(stanza, "jid-malformed"))

    async def _route_iq(self, session: C2SSession, iq: ET.Element) -> None:
        kind = iq.get("type")
        to = iq.get("to")
        peer = await self._peer_session(session, Jid.parse(to)) if to else None
        if peer is not None and await self._blocks(peer, session):
            peer = None  # XEP-0191 3.4: as if that resource were not there
        remote = (
            await self.relay.source_for(session, Jid.parse(to), iq)
            if peer is None and to and not to_server(iq, self.domain)
            else None
        )
        if kind in ("result", "error"):
            session._pending_pings.pop(iq.get("id", ""), None)
            # An answer to the server's own request (request()), not to a colleague's client.
            waiter = (
                self._requests.pop((session.id, iq.get("id", "")), None)
                if to_server(iq, self.domain)
                else None
            )
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(iq)
                return
            if peer is not None:
                peer.send_nowait(iq)  # the answer to a colleague's client's request
            elif remote is not None:
                await self.relay.send(session, iq, *remote)  # ... on another node
            return  # never answer a result or an error ourselves
        if peer is not None:
            peer.send_nowait(iq)  # client to client (version, jingle, ...): route it
            return
        if remote is not None:
            await self.relay.send(session, iq, *remote)  # to a session on another node
            return
        if kind not in ("get", "set") or len(iq) != 1 or not iq.get("id"):
            raise StanzaError("bad-request", "an iq get/set has an id and one payload")
        if to:
            target = Jid.parse(to)
            if target.domain not in (self.domain, f"conference.{self.domain}"):
                raise StanzaError("remote-server-not-found", "no server-to-server here")
            if unavailable_resource(session, target, self.domain):
                # RFC 6121 8.5.3.1: no such resource online (or no such user, or one the
                # sender may not see: the same answer); a ping must not "succeed".
                raise StanzaError("service-unavailable")
        handler = self._iq.get((kind, iq[0].tag))
        if handler is None:
            raise StanzaError("service-unavailable")
        reply = await handler(session, iq, iq[0])
        if reply is not None:
            session.send_nowait(reply)


def to_server(iq: ET.Element, domain: str) -> bool:
    """Whether a client's stanza is addressed to the server itself (no ``to``, or the domain)."""
    to = iq.get("to")
    return not to or to.lower() == domain


def unavailable_resource(session: C2SSession, target: Jid, domain: str) -> bool:
    """Whether an iq goes to a user's full JID that no session of this sender's reach holds:
    not the sender's own, not a colleague's portal resource (the server answers for it)."""
    if not (target.local and target.resource and target.domain == domain):
        return False
    own = session.jid
    return not (own is not None and target == own) and target.resource != PORTAL_RESOURCE


IQ = q(CLIENT, "iq")
MESSAGE = q(CLIENT, "message")
BODY = q(CLIENT, "body")
# What a message may carry and still overlap with the stores before it: what changes nothing
# but the message itself (its text, thread, hints and requests for receipts or markers). A
# correction must find the message it corrects, a marker or a chat state must not overtake
# the messages before it: those wait for the stores in flight.
INERT = frozenset(
    {
        BODY,
        q(CLIENT, "thread"),
        q("http://jabber.org/protocol/chatstates", "active"),
        q("http://jabber.org/protocol/chatstates", "inactive"),
        q("http://jabber.org/protocol/chatstates", "paused"),
        q("urn:xmpp:chat-markers:0", "markable"),
        q("urn:xmpp:receipts", "request"),
        q("urn:xmpp:sid:0", "origin-id"),
        q("urn:xmpp:hints", "store"),
        q("urn:xmpp:hints", "no-copy"),
        q("http://jabber.org/protocol/xhtml-im", "html"),
    }
)


def overlappable(message: ET.Element) -> bool:
    """Whether a client's message is a plain one (text to store, nothing else to do)."""
    if message.get("type") not in (None, "", "chat", "groupchat", "normal"):
        return False
    has_body = False
    for part in message:
        if part.tag not in INERT:
            return False
        has_body = has_body or part.tag == BODY
    return has_body


def _is_active(presence: ET.Element | None) -> bool:
    if presence is None:
        return True
    show = presence.findtext(q(CLIENT, "show"))
    return show not in ("away", "xa")
