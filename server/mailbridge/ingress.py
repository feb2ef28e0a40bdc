"""The SMTP and LMTP listeners: mail for the CRM inbox, stored before it is acknowledged.

Never an open relay: only the CRM address and its plus-addresses are accepted as
recipients, and ``postmaster`` (RFC 5321), whose mail goes to the administrators. A message
over the size limit gets 552 from aiosmtpd itself; one too complex to parse safely (a MIME
bomb) gets 552 here (when its bytes alone cannot show it keeps the limits: a reply can, and
is not parsed before its 250); a spool with no room for it (its size limit, a disk that refuses
the write, the database's disk nearly full) gets 452 4.3.1, so the sender's MTA retries. 250
means the raw message is durably stored: fsynced in this node's mail spool (``spool.py``), from
where a background drain moves it into the database.

The servers run on the hub's own event loop (``loop.create_server`` with aiosmtpd's protocol
classes), not in aiosmtpd's threaded ``Controller``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from collections.abc import Callable
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from server.mailbridge.inbox import Source
from server.mailbridge.parsing import Limits, MailTooComplex, parse, within_limits_unparsed
from server.mailbridge.spool import Spool, SpoolFull, describe

log = logging.getLogger(__name__)

IDLE_TIMEOUT_SECONDS = 60
# The disk is nearly full: temporary (RFC 3463 4.3.1), the sender's server tries again later.
INSUFFICIENT_STORAGE = "452 4.3.1 Insufficient system storage; try again later"
# Per command per session: a client looping on one command is cut off, while a mail server in
# front may pass a burst of messages over one connection (each costs a MAIL, RCPTs, a DATA).
# Messages up to this size are screened on the event loop (a scan of the bytes, well under a
# millisecond); larger ones go to the parser in a thread.
SCREEN_ON_LOOP_BYTES = 256 << 10
COMMAND_CALL_LIMIT = {"MAIL": 1000, "RCPT": 5000, "DATA": 1000, "RSET": 1000, "*": 50}


def accepts(address: str, inbox: str, domains: tuple[str, ...] = ()) -> bool:
    """The CRM inbox itself or one of its plus-addresses, case-insensitively; and
    ``postmaster`` - bare, at the inbox's domain or at one of ``domains`` (the portal's) -
    which RFC 5321 (4.5.1) requires every receiving server to take."""
    bare = address.strip().strip("<>").lower()
    if bare == "postmaster":
        return True
    local, _, domain = bare.rpartition("@")
    inbox_local, _, inbox_domain = inbox.lower().rpartition("@")
    if local == "postmaster" and domain in {inbox_domain, *(d.lower() for d in domains)}:
        return True
    if domain != inbox_domain:
        return False
    return local == inbox_local or local.startswith(inbox_local + "+")


class IngressHandler:
    def __init__(
        self,
        spool: Spool,
        inbox_address: str,
        limits: Limits,
        max_recipients: int,
        kind: str = "smtp",
        write_refusal: Callable[[], str | None] = lambda: None,
        domains: tuple[str, ...] = (),
    ) -> None:
        self._spool = spool
        self._domains = domains  # whose postmaster@ is taken besides the inbox's domain
        self._write_refusal = write_refusal
        self._address = inbox_address
        self._limits = limits
        self._max_recipients = max_recipients
        self._kind = kind

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not accepts(address, self._address, self._domains):
            return "550 5.7.1 Relaying denied: this server only takes mail for the CRM inbox"
        if len(envelope.rcpt_tos) >= self._max_recipients:
            return "452 4.5.3 Too many recipients"
        # before the sender transfers the message
        if self._spool.full or self._write_refusal() is not None:
            return INSUFFICIENT_STORAGE
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        try:
            # The 250 means "stored", not "parsed": the pipeline parses it once it is. Only
            # what cannot be shown to keep the limits from its bytes alone (large, many
            # parts, attached messages) is parsed here, in a thread, so that a MIME bomb
            # still gets its 552 rather than a place in the inbox.
            small = len(raw) <= SCREEN_ON_LOOP_BYTES
            if not (small and within_limits_unparsed(raw, self._limits)):
                await asyncio.to_thread(parse, raw, self._limits)
        except MailTooComplex as exc:
            return self._each(envelope, f"552 5.3.4 Message refused: {exc}")
        if self._write_refusal() is not None:
            return self._each(envelope, INSUFFICIENT_STORAGE)
        peer = session.peer
        try:
            entry = await self._spool.append(
                raw,
                Source(
                    self._kind,
                    peer=str(peer[0]) if isinstance(peer, tuple) else str(peer),
                    recipients=tuple(envelope.rcpt_tos),
                ),
            )
        except SpoolFull:
            return self._each(envelope, INSUFFICIENT_STORAGE)
        except OSError as exc:  # ENOSPC, EIO: nothing of it kept; the sender retries
            log.error("could not spool an incoming message: %s", describe(exc))
            return self._each(envelope, INSUFFICIENT_STORAGE)
        except Exception:
            log.exception("could not spool an incoming message")
            return self._each(
                envelope, "451 4.3.0 Temporary failure storing the message; try again later"
            )
        return self._each(envelope, f"250 2.0.0 OK: stored as {entry.id}")

    def _each(self, envelope: Envelope, answer: str) -> str:
        """LMTP answers DATA once per accepted recipient (RFC 2033); SMTP once."""
        if self._kind == "lmtp" and len(envelope.rcpt_tos) > 1:
            return "\r\n".join(answer for _ in envelope.rcpt_tos)
        return answer


class IngressServers:
    """Owns the listening SMTP (and optional LMTP) sockets."""

    def __init__(
        self,
        handler_for: Callable[[str], IngressHandler],
        host: str,
        smtp_port: int | None,
        lmtp_port: int | None,
        hostname: str,
        max_bytes: int,
        tls: ssl.SSLContext | None,
    ) -> None:
        self._handler_for = handler_for
        self._host = host
        self._smtp_port = smtp_port
        self._lmtp_port = lmtp_port
        self._hostname = hostname
        self._max_bytes = max_bytes
        self._tls = tls
        self._servers: list[asyncio.Server] = []
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self.ports: dict[str, int] = {}

    def _protocol(self, cls: type[SMTP], kind: str) -> Callable[[], Any]:
        handler = self._handler_for(kind)

        def make() -> SMTP:
            protocol = cls(
                handler,
                data_size_limit=self._max_bytes,
                enable_SMTPUTF8=True,
                hostname=self._hostname,
                ident="Portal Hub CRM mail",
                tls_context=self._tls,
                timeout=IDLE_TIMEOUT_SECONDS,
                command_call_limit=COMMAND_CALL_LIMIT,
            )
            self._sessions.add(protocol)
            return protocol

        return make

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for kind, cls, port in (("smtp", SMTP, self._smtp_port), ("lmtp", LMTP, self._lmtp_port)):
            if port is None:
                continue
            server = await loop.create_server(self._protocol(cls, kind), self._host, port)
            self._servers.append(server)
            self.ports[kind] = server.sockets[0].getsockname()[1]
            log.info("%s listener on %s:%s", kind.upper(), self._host, self.ports[kind])

    async def drain(self, timeout: float) -> None:
        """The node is going away: accept no new sessions; a session in the middle of a
        transaction may finish it (up to ``timeout``), an idle one is closed with 421 at once.
        A transaction cut short never got its 250, so the sending MTA retries it later."""
        for server in self._servers:
            server.close()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            live = [s for s in self._sessions if s.transport is not None]
            for session in live:
                if session.envelope is None or not session.envelope.mail_from:
                    transport = session.transport
                    if isinstance(transport, asyncio.WriteTransport) and not (
                        transport.is_closing()
                    ):
                        transport.write(b"421 4.3.2 Service shutting down, try again later\r\n")
                        transport.close()
            if not live or asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
