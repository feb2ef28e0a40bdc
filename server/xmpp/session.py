"""One client-to-server XMPP session: stream negotiation (STARTTLS, SASL, bind) and I/O.

The session owns its socket and parser; everything after negotiation is handed to the server's
router, stanza by stanza in arrival order, without waiting for messages to be stored (the
stores finish in the session's ``Pipeline``). Limits: an authentication timeout, a smaller
stanza cap before authentication, a read rate (token bucket that pauses reading, as Prosody
does), a cap on unfinished stanzas (reading pauses) and a cap on queued output.

Output is gathered per loop iteration and written at once: a burst of deliveries (a batch of
stored messages) becomes one TLS record and one system call, not one per stanza.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import secrets
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from scramp import ScramException, ScramMechanism

from server.auth.service import LoginAttempt, LoginRefused
from server.auth.sessions import LiveSession
from server.channels.ratelimit import TokenBucket
from server.observability import instruments
from server.store.database import Document
from server.xmpp.jid import Jid
from server.xmpp.pipeline import Pipeline
from server.xmpp.sasl import SCRAM_MECHANISMS, auth_info, parse_plain
from server.xmpp.stanza import STREAMS_NS, StanzaError, child, element, error_reply, q
from server.xmpp.xmlstream import STREAM_NS, StreamError, XmlStreamParser, serialize

if TYPE_CHECKING:
    from server.xmpp.modules.stream_management import Acks
    from server.xmpp.server import XmppServer

log = logging.getLogger(__name__)

TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION_NS = "urn:ietf:params:xml:ns:xmpp-session"
PING_NS = "urn:xmpp:ping"
SM_NS = "urn:xmpp:sm:3"
STANZA_TAGS = frozenset(q("jabber:client", tag) for tag in ("message", "presence", "iq"))
MAX_AUTH_ATTEMPTS = 5
PRE_AUTH_STANZA_BYTES = 16 * 1024
MAX_OUTPUT_BUFFER = 4 * 1024 * 1024
READ_CHUNK = 16 * 1024
_USERNAME = re.compile(r"(?:^|,)n=([^,]*)")
ACK_REQUEST = f"<r xmlns='{SM_NS}'/>".encode()


class Closing(Exception):
    """The session is over (the stream was closed or failed)."""


class Dropped(Closing):
    """The connection ended without the stream being closed (no ``</stream>``): a session
    with resumption (XEP-0198) is then held for the client to resume."""


class Resumed(Exception):
    """This stream resumed ``session`` (XEP-0198): its connection now belongs to that one,
    which goes on with ``rest``, what was read after ``<resume/>``."""

    def __init__(self, session: C2SSession) -> None:
        super().__init__("resumed")
        self.session = session
        self.rest: list[tuple[str, Any]] = []


class C2SSession:
    def __init__(
        self,
        server: XmppServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        tls: bool,
    ) -> None:
        self.server = server
        self.settings = server.settings
        self.reader = reader
        self.writer = writer
        self.tls = tls
        # Its presence source id too: the node's tag first, for other nodes (relay.py).
        self.id = f"{server.node_tag}.{secrets.token_hex(8)}"
        peername = writer.get_extra_info("peername")
        self.peer = str(peername)
        # The per-address login limits' key (empty behind a trusted proxy: no client named).
        self.address = server.auth.client_address(
            peername[0] if isinstance(peername, tuple) and peername else None
        )
        self.user: Document | None = None
        self.jid: Jid | None = None  # full JID once bound
        self.available = False  # sent initial presence: receives presence and messages
        self.presence: ET.Element | None = None
        self.carbons = False
        self.roster_requested = False
        self.csi_inactive = False
        self.mechanism = ""  # the SASL mechanism this session authenticated with
        self.last_read = time.monotonic()
        self._header_sent = False
        self._stream_open = False
        self._tls_quiet = tls  # TLS is up and the client has not spoken on it yet
        self._inbox: list[tuple[str, Any]] = []
        self._auth_attempts = 0
        self._scram: Any = None
        self._scram_user: Document | None = None
        self._attempt: LoginAttempt | None = None  # a SCRAM exchange's reserved check
        self._auth_mark = 0
        self._closed = asyncio.Event()
        self._closing = False
        self._terminating = False
        self._pending_pings: dict[str, float] = {}
        # Stream management (XEP-0198, modules/stream_management.py): acks and the unacked
        # queue once enabled; ``hibernating`` while the connection is gone and the session
        # held for resumption; ``_handed_over`` when this stream resumed another session.
        self.sm: Acks | None = None
        self.hibernating = False
        self._handed_over = False
        self.task: asyncio.Task[None] | None = None  # the read loop over its connection
        self.last_heartbeat = 0.0  # when the presence service last heard of this session
        self._out: list[bytes] = []  # output of this loop iteration, written at its end
        self._out_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self.pipeline = Pipeline(
            self.send_nowait, self.settings.xmpp_max_stanzas_in_flight, server.spawn
        )
        self._parser = self._new_parser()
        self._bucket = TokenBucket(
            self.settings.xmpp_read_bytes_per_second,
            self.settings.xmpp_read_burst_bytes,
            time.monotonic(),
        )

    # properties ------------------------------------------------------------------------------

    @property
    def user_id(self) -> str:
        assert self.user is not None
        return str(self.user["_id"])

    @property
    def authenticated(self) -> bool:
        return self.user is not None

    @property
    def bound(self) -> bool:
        return self.jid is not None

    def _new_parser(self) -> XmlStreamParser:
        limit = self.settings.xmpp_max_stanza_bytes
        if not self.authenticated:
            limit = min(limit, PRE_AUTH_STANZA_BYTES)
        return XmlStreamParser(*self._parser_callbacks(), max_stanza_bytes=limit)

    def _parser_callbacks(
        self,
    ) -> tuple[Callable[[dict[str, str]], None], Callable[[ET.Element], None], Callable[[], None]]:
        return (
            lambda attrs: self._inbox.append(("open", attrs)),
            lambda stanza: self._inbox.append(("stanza", stanza)),
            lambda: self._inbox.append(("close", None)),
        )

    # main loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        await self._serve(self._negotiate_and_read())

    async def run_resumed(self, rest: list[tuple[str, Any]]) -> None:
        """The read loop over a connection this session took by resumption (XEP-0198):
        first what came after ``<resume/>`` on it, then the rest."""
        await self._serve(self._read_resumed(rest))

    async def _negotiate_and_read(self) -> None:
        async with asyncio.timeout(self.settings.xmpp_auth_timeout_seconds) as deadline:
            loop = asyncio.get_running_loop()
            while not self.bound:
                if not self._tls_quiet:
                    await self._read_once()
                    continue
                # The client may be waiting for its user to accept the certificate: the
                # login timeout starts again once it speaks.
                deadline.reschedule(loop.time() + self.settings.xmpp_tls_prompt_seconds)
                await self._read_once()
                deadline.reschedule(loop.time() + self.settings.xmpp_auth_timeout_seconds)
            deadline.reschedule(None)
        while True:
            await self._read_once()

    async def _read_resumed(self, rest: list[tuple[str, Any]]) -> None:
        await self._handle_inbox(rest)
        while True:
            await self._read_once()

    async def _serve(self, work: Awaitable[None]) -> None:
        dropped = False
        try:
            await work
        except TimeoutError:
            await self.stream_error("connection-timeout", "authentication took too long")
        except StreamError as exc:
            await self.stream_error(exc.condition, exc.text, exc.app)
        except Resumed as resumed:
            # This connection now serves the resumed session, in a task of its own.
            self._handed_over = True
            self.server.resume_on(resumed.session, resumed.rest)
        except Dropped:
            dropped = True
        except Closing:
            pass
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            log.debug("xmpp %s: connection lost: %s", self.peer, exc)
            dropped = True
        except asyncio.CancelledError:
            await self.stream_error("system-shutdown")
            raise
        except Exception:
            log.exception("xmpp session %s failed", self.peer)
            await self.stream_error("internal-server-error")
        finally:
            if dropped and self._may_hold() and self.server.hold(self):
                self._hibernate()
            else:
                await self.close()

    def _may_hold(self) -> bool:
        """Whether the connection died under the session rather than being ended on purpose
        (by the client's </stream>, a stream error, a replacement, a revocation, shutdown)."""
        return not (self._terminating or self._closing or self._handed_over) and self.bound

    def _hibernate(self) -> None:
        """Held for resumption: bound, its presence as it was, its stanzas queued (unacked)
        until the client resumes or the hold ends (stream_management.py)."""
        self.hibernating = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._out.clear()
        self._out_bytes = 0
        self._end_attempt()
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    def adopt(self, other: C2SSession) -> None:
        """Resumption (XEP-0198): this held session goes on over ``other``'s connection,
        authenticated stream and parser; ``other`` ends without touching it."""
        self.reader, self.writer, self.tls = other.reader, other.writer, other.tls
        self.peer, self.address = other.peer, other.address
        self._parser = other._parser
        self._inbox = []
        self._parser.retarget(*self._parser_callbacks())
        self._parser.max_stanza_bytes = self.settings.xmpp_max_stanza_bytes
        self._bucket = other._bucket
        self._header_sent = self._stream_open = True
        self._tls_quiet = False
        self.last_read = time.monotonic()
        self._pending_pings.clear()
        self.hibernating = False
        other._handed_over = True

    def drop_connection(self) -> None:
        """End the connection as if the network had: a session with resumption is held."""
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    async def _read_once(self) -> None:
        data = await self.reader.read(READ_CHUNK)
        if not data:
            raise Dropped
        self._tls_quiet = False
        now = time.monotonic()
        self.last_read = now
        if not self._bucket.take(now, len(data)):
            # Over the read rate: pause reading until the bucket has refilled, don't drop.
            deficit = len(data) - self._bucket.tokens
            await asyncio.sleep(min(deficit / self._bucket.rate, 5.0))
            self._bucket.take(time.monotonic(), min(len(data), self._bucket.tokens))
        self._parser.feed(data)
        inbox, self._inbox = self._inbox, []
        await self._handle_inbox(inbox)
        self.server.touched(self)

    async def _handle_inbox(self, inbox: list[tuple[str, Any]]) -> None:
        parser = self._parser
        for index, (kind, value) in enumerate(inbox):
            if self._terminating or self._closing:
                # Ended from outside (revoked, replaced, shut down) while this read was being
                # handled, maybe waiting for room: what is left of it is not the user's any more.
                raise Closing
            if kind == "open":
                await self._on_stream_open(value)
            elif kind == "close":
                await self.pipeline.drain()  # the answers to what came before, then the end
                await self._send_raw(b"</stream:stream>")
                raise Closing
            else:
                # Anything after <starttls/> or SASL success in the same read belongs to the
                # old stream: refusing it (before <proceed/>, for STARTTLS) is what stops
                # command injection. That includes an unfinished stanza the parser holds.
                last = index == len(inbox) - 1 and parser.idle()
                if value.tag == q(TLS_NS, "starttls") and not last:
                    raise StreamError("policy-violation", "data after <starttls/>")
                try:
                    restart = await self._on_stanza(value)
                except Resumed as resumed:
                    resumed.rest = inbox[index + 1 :]
                    raise
                if restart:
                    if not last:
                        raise StreamError("policy-violation", "data after stream restart")
                    break

    # stream ----------------------------------------------------------------------------------

    async def _on_stream_open(self, attrs: dict[str, str]) -> None:
        await self._send_header()
        to = attrs.get("to", "").lower()
        if to and to != self.server.domain:
            raise StreamError("host-unknown", f"this server serves {self.server.domain}")
        if attrs.get("version", "") < "1.0":
            raise StreamError("unsupported-version")
        self._stream_open = True
        await self.send(self._features())

    async def _send_header(self) -> None:
        if self._header_sent:
            return
        self._header_sent = True
        header = (
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
            f"xmlns:stream='{STREAM_NS}' id='{secrets.token_hex(8)}' "
            f"from='{self.server.domain}' version='1.0' xml:lang='en'>"
        )
        await self._send_raw(header.encode())

    def _features(self) -> ET.Element:
        features = ET.Element(q(STREAM_NS, "features"))
        if not self.tls:
            starttls = child(features, "starttls", ns=TLS_NS)
            if not self.settings.xmpp_allow_plaintext:
                child(starttls, "required", ns=TLS_NS)
        if not self.authenticated:
            if self.tls or self.settings.xmpp_allow_plaintext:
                mechanisms = child(features, "mechanisms", ns=SASL_NS)
                for name in self._mechanisms():
                    child(mechanisms, "mechanism", ns=SASL_NS, text=name)
        else:
            child(features, "bind", ns=BIND_NS)
            session = child(features, "session", ns=SESSION_NS)
            child(session, "optional", ns=SESSION_NS)
            for feature in self.server.stream_features():
                features.append(feature)
        return features

    def _mechanisms(self) -> list[str]:
        names = list(SCRAM_MECHANISMS)
        if self.tls:
            names.append("PLAIN")  # never on an unencrypted stream
        return names

    def _restart(self) -> None:
        self._header_sent = False
        self._stream_open = False
        self._parser = self._new_parser()

    # stanzas ---------------------------------------------------------------------------------

    async def _on_stanza(self, stanza: ET.Element) -> bool:
        """Handle one stanza; True when the stream restarts (STARTTLS, SASL success)."""
        if not self._stream_open:
            raise StreamError("not-well-formed", "stanza before stream header")
        tag = stanza.tag
        if tag == q(TLS_NS, "starttls"):
            return await self._starttls()
        if tag.startswith(f"{{{SASL_NS}}}"):
            return await self._sasl(stanza)
        if not self.authenticated:
            raise StreamError("not-authorized", "authenticate first")
        if self.tls is False and not self.settings.xmpp_allow_plaintext:
            raise StreamError("policy-violation", "TLS is required")
        if tag.startswith(f"{{{SM_NS}}}") and self.server.stream_management is not None:
            await self.server.stream_management.on_nonza(self, stanza)
            return False
        if tag == q("jabber:client", "iq") and not self.bound:
            await self._bind_phase(stanza)
            return False
        if not self.bound:
            raise StreamError("not-authorized", "bind a resource first")
        await self.server.route_from_client(self, stanza)
        if self.sm is not None and tag in STANZA_TAGS:
            self.sm.handled_one()
        return False

    async def _starttls(self) -> bool:
        if self.tls or self.authenticated:
            raise StreamError("policy-violation", "TLS is already on or too late")
        if getattr(self.reader, "_buffer", b""):
            raise StreamError("policy-violation", "data after <starttls/>")
        await self.send(element("proceed", ns=TLS_NS))
        # Checked again with no await in between: what is buffered now would be read as if it
        # had come over TLS.
        if getattr(self.reader, "_buffer", b""):
            raise StreamError("policy-violation", "data after <starttls/>")
        assert self.server.ssl_context is not None
        await self.writer.start_tls(self.server.ssl_context)
        self.tls = True
        self._tls_quiet = True
        self._restart()
        return True

    async def _sasl(self, stanza: ET.Element) -> bool:
        if self.authenticated:
            raise StreamError("policy-violation", "already authenticated")
        if not self.tls and not self.settings.xmpp_allow_plaintext:
            raise StreamError("policy-violation", "TLS is required")
        name = stanza.tag.rpartition("}")[2]
        try:
            if name == "auth":
                return await self._sasl_auth(stanza)
            if name == "response" and self._scram is not None:
                return await self._scram_final(stanza)
            if name == "abort":
                await self._sasl_failure("aborted")
                return False
        except (ScramException, ValueError, binascii.Error, UnicodeDecodeError) as exc:
            log.info("xmpp %s: SASL failed: %s", self.peer, exc)
            await self._sasl_failure("not-authorized")
            return False
        raise StreamError("not-authorized", "unexpected SASL element")

    async def _sasl_auth(self, stanza: ET.Element) -> bool:
        mechanism = stanza.get("mechanism", "")
        self.mechanism = mechanism
        if mechanism not in self._mechanisms():
            await self._sasl_failure("invalid-mechanism")
            return False
        self._auth_attempts += 1
        if self._auth_attempts > MAX_AUTH_ATTEMPTS:
            raise StreamError("policy-violation", "too many authentication attempts")
        self._end_attempt()  # a new <auth> abandons an unfinished exchange
        text = (stanza.text or "").strip()
        initial = base64.b64decode(text, validate=True) if text and text != "=" else b""
        auth = self.server.auth
        if mechanism == "PLAIN":
            _authzid, login, password = parse_plain(initial)
            mark = auth.sessions.mark()
            try:
                user = await auth.check_password(login, password, self.address)
            except LoginRefused:  # throttled, or too many checks waiting
                await self._sasl_failure("temporary-auth-failure")
                return False
            if user is None:
                await self._sasl_failure("not-authorized")
                return False
            return await self._sasl_success(user, b"", mark)
        client_first = initial.decode("utf-8")
        match = _USERNAME.search(client_first.split(",", 2)[-1] if "," in client_first else "")
        if match is None:
            raise ValueError("no username in SCRAM client-first message")
        login = match.group(1).replace("=2C", ",").replace("=3D", "=").lower()
        try:
            # Reserved now, decided at the client's proof: concurrent exchanges count too.
            self._attempt = auth.begin_attempt(login, self.address)
        except LoginRefused:
            await self._sasl_failure("temporary-auth-failure")
            return False
        self._auth_mark = auth.sessions.mark()
        user = await auth.credentials(login)
        info = auth_info(
            user.get("scram") if user and user.get("is_active", True) else None, mechanism
        )
        if info is None:
            # Unknown users get made-up verifiers, so the answer does not reveal who exists;
            # PBKDF2 is password hashing, so it runs in the bounded pool, off the loop.
            try:
                ticket = auth.hashing_ticket(self.address)
            except LoginRefused:
                await self._sasl_failure("temporary-auth-failure")
                return False
            try:
                info = await ticket.run(
                    ScramMechanism(mechanism).make_auth_info, secrets.token_hex(16)
                )
            finally:
                ticket.cancel()
            user = None
        stored = info
        scram = ScramMechanism(mechanism).make_server(lambda _username: stored)
        scram.set_client_first(client_first)
        self._scram, self._scram_user = scram, user
        challenge = base64.b64encode(scram.get_server_first().encode()).decode()
        await self.send(element("challenge", ns=SASL_NS, text=challenge))
        return False

    async def _scram_final(self, stanza: ET.Element) -> bool:
        scram, user, attempt = self._scram, self._scram_user, self._attempt
        self._scram = self._scram_user = None
        assert attempt is not None
        text = (stanza.text or "").strip()
        # A client-final that cannot be read is no guess: _sasl_failure releases the attempt.
        final = base64.b64decode(text, validate=True).decode("utf-8")
        try:
            scram.set_client_final(final)
        except ScramException:
            attempt.failed()
            raise
        if user is None:
            attempt.failed()
            await self._sasl_failure("not-authorized")
            return False
        attempt.succeeded()
        self._attempt = None
        # The proof was checked against the credentials (cached); the session holds the user
        # as the directory has them (its cache), with the stamp of the password just proved.
        profile = await self.server.directory.cached_user(str(user["_id"]))
        if profile is None or not profile.get("is_active", True):
            await self._sasl_failure("not-authorized")
            return False
        profile["password_stamp"] = user.get("password_stamp")
        return await self._sasl_success(profile, scram.get_server_final().encode(), self._auth_mark)

    def _end_attempt(self) -> None:
        """A SCRAM exchange that ends without a verdict (aborted, failed to parse, restarted,
        the connection gone) counts for nothing."""
        if self._attempt is not None:
            self._attempt.released()
            self._attempt = None

    async def _sasl_success(self, user: Document, additional: bytes, mark: int) -> bool:
        self.user = user
        # Ended when the password changes or the user is deactivated, on any node.
        self.server.auth.sessions.track(
            LiveSession(
                self.session_key,
                str(user["_id"]),
                self._revoked,
                password_stamp=user.get("password_stamp"),
            ),
            mark,
        )
        self.server.authenticated(self)
        success = element("success", ns=SASL_NS)
        if additional:
            success.text = base64.b64encode(additional).decode()
        await self.send(success)
        self._restart()
        return True

    async def _sasl_failure(self, condition: str) -> None:
        self._scram = None
        self._end_attempt()
        failure = element("failure", ns=SASL_NS)
        child(failure, condition, ns=SASL_NS)
        await self.send(failure)

    async def _bind_phase(self, iq: ET.Element) -> None:
        payload = iq[0] if len(iq) else None
        if iq.get("type") == "set" and payload is not None and payload.tag == q(BIND_NS, "bind"):
            wanted = (payload.findtext(q(BIND_NS, "resource")) or "").strip()
            try:
                self.jid = await self.server.bind(self, wanted)
            except StanzaError as exc:
                await self.send(error_reply(iq, exc.condition, exc.text))
                return
            self._parser.max_stanza_bytes = self.settings.xmpp_max_stanza_bytes
            reply = element("iq", {"type": "result", "id": iq.get("id", "")})
            bound = child(reply, "bind", ns=BIND_NS)
            child(bound, "jid", ns=BIND_NS, text=str(self.jid))
            await self.send(reply)
            return
        await self.send(error_reply(iq, "not-authorized", "bind a resource first"))

    # output ----------------------------------------------------------------------------------

    async def send(self, stanza: ET.Element) -> None:
        await self._send_raw(serialize(stanza))

    def send_nowait(self, stanza: ET.Element) -> None:
        """Queue a stanza without waiting (for fan-out); a reader too slow is cut off."""
        if self._tracking() or not (self._closing or self.writer.is_closing()):
            self.send_bytes(serialize(stanza))

    def send_nonza(self, nonza: ET.Element) -> None:
        """A stream-level element (XEP-0198's acks and answers): not a stanza, not counted."""
        self.send_bytes(serialize(nonza), track=False)

    def _tracking(self) -> bool:
        """Whether stanzas go into the stream management queue (also while held, and while
        ending, until the queue's messages are handed to offline delivery)."""
        return self.sm is not None and not self.sm.finished

    def send_bytes(self, data: bytes, *, track: bool = True) -> None:
        """Queue one serialised stanza: written with the rest of this loop iteration's output,
        without waiting, so a slow reader never slows the sender or other recipients; one
        whose unsent output passes ``MAX_OUTPUT_BUFFER`` is cut off. With stream management
        it is also kept until the client acknowledges it."""
        if track and self.sm is not None and not self.sm.finished and not self.sm.track(data):
            self.server.stream_management.overflowed(self)
        if self._closing or self.hibernating or self.writer.is_closing():
            return
        self._out.append(data)
        self._out_bytes += len(data)
        instruments.xmpp_stanza_sent()
        if self._out_bytes > MAX_OUTPUT_BUFFER:
            self._flush_out()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_out)

    def answer(self, stanza: ET.Element, reply: ET.Element) -> None:
        """The answer to a stanza of this client: after the answers to what it sent before."""
        self.pipeline.answer(stanza, reply)

    def _flush_out(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._out:
            return
        if self.writer.is_closing():
            self._out.clear()
            self._out_bytes = 0
            return
        if self.sm is not None and self.sm.wants_request():
            self._out.append(ACK_REQUEST)  # XEP-0198: at most one request out at a time
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > MAX_OUTPUT_BUFFER:
            log.warning("xmpp %s: output backlog too large; closing", self.jid)
            self.writer.transport.abort()

    async def _send_raw(self, data: bytes) -> None:
        self._flush_out()  # what was queued before goes first
        if self.writer.is_closing():
            raise Closing
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > MAX_OUTPUT_BUFFER:
            self.writer.transport.abort()
            raise Closing
        await self.writer.drain()

    async def stream_error(
        self, condition: str, text: str = "", app: ET.Element | None = None
    ) -> None:
        if self.writer.is_closing():
            return
        with contextlib.suppress(Exception):
            await self._send_header()
            error = ET.Element(q(STREAM_NS, "error"))
            child(error, condition, ns=STREAMS_NS)
            if text:
                child(error, "text", ns=STREAMS_NS, text=text)
            if app is not None:
                error.append(app)
            await self._send_raw(serialize(error) + b"</stream:stream>")

    async def ping(self) -> None:
        """XEP-0199 from the server: any answer counts as a sign of life."""
        ping_id = f"ping-{secrets.token_hex(4)}"
        iq = element(
            "iq", {"type": "get", "id": ping_id, "from": self.server.domain, "to": str(self.jid)}
        )
        child(iq, "ping", ns=PING_NS)
        self._pending_pings[ping_id] = time.monotonic()
        self.send_nowait(iq)

    @property
    def session_key(self) -> str:
        return f"xmpp:{self.id}"

    async def _revoked(self, reason: str) -> None:
        """The session's credentials ended (server/auth/sessions.py). As Prosody does: a new
        password is ``reset`` (RFC 6120 4.9.3.16: authenticate again, which the old password
        no longer does), a deactivation ``not-authorized``."""
        if reason == "password_changed":
            await self.terminate("reset", "the password was changed")
        else:
            await self.terminate("not-authorized", "the account's sessions were ended")

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True  # nothing more is written
        self.hibernating = False
        self._out.clear()
        self._end_attempt()
        self.server.auth.sessions.untrack(self.session_key)
        if self._handed_over:
            # Resumption: the connection, and the user's session, live on in another.
            self._closed.set()
            return
        try:
            # What the client sent before it left is still stored (its answers go nowhere).
            await self.pipeline.close()
        finally:
            self._closed.set()
        try:
            await self.server.unbind(self)
        finally:
            with contextlib.suppress(Exception):
                self.writer.close()
                await asyncio.wait_for(self.writer.wait_closed(), 2)

    async def terminate(self, condition: str, text: str = "") -> None:
        """End the session from outside (conflict, revoked, timeout).

        The stream error is sent if the peer takes it; a peer that stopped reading is cut off
        after a short grace, since a graceful close would wait for it forever.
        """
        if self.hibernating:
            # Held with no connection (XEP-0198): it ends as a session whose client left.
            await self.server.stream_management.end(self)
            return
        if self._terminating:
            return
        self._terminating = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.stream_error(condition, text), 2)
        transport = self.writer.transport
        with contextlib.suppress(Exception):
            transport.close()
            asyncio.get_running_loop().call_later(2, transport.abort)
