"""IMAP collection: one supervised collector per configured mailbox.

A collector logs in, selects the folder and fetches by UID above the last one it stored,
checking each message's size first (an oversize one is reported and skipped, never
blocking those after it). It waits with IDLE when the server offers it - renewed before the
29-minute limit and guarded by our own timeouts, since aioimaplib's IDLE can hang when the
server says BYE - and polls otherwise. Any failure ends the session; the supervisor
reconnects with back-off.

A message is stored (``RawInbox.put``) before its UID is recorded as collected, and moved to
the processed folder or deleted only after the pipeline committed its activity; a new
UIDVALIDITY starts the folder over (the raw inbox's SHA-256 key keeps copies out).

With several hub nodes, a lease on the mailbox document lets one node collect at a time
(``leases.py``): renewed while the node collects, given back when it stops, taken over at
once after a crash on the embedded database (where no other node can be).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import weakref
from base64 import b64encode
from dataclasses import dataclass, field
from typing import Any

import aioimaplib

from server.background import raise_if_stopping
from server.mailbridge.inbox import RawInbox, Source
from server.mailbridge.leases import LEASE, renewing
from server.mailbridge.oauth import OAuthClient, OAuthError, TokenSource
from server.store.database import Document, Store, utcnow

log = logging.getLogger(__name__)
# Outcomes after which the message leaves the inbox (moved, flagged or deleted).
DELIVERED_STATUSES = frozenset({"done", "duplicate", "bounce", "ignored"})

IDLE_RENEW_SECONDS = 25 * 60  # under RFC 2177's 29 minutes
COMMAND_TIMEOUT_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 300.0
RECHECK_SECONDS = 30.0
FETCH_BATCH = 50

_UIDVALIDITY = re.compile(rb"UIDVALIDITY (\d+)")
_SIZE = re.compile(rb"UID (\d+) RFC822\.SIZE (\d+)|RFC822\.SIZE (\d+) UID (\d+)")


class ImapError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class MailboxConfig:
    id: str
    host: str
    port: int
    security: str  # "tls" (implicit, IMAPS), "starttls", "none"
    login: str
    password: str = field(repr=False)
    folder: str
    processed_folder: str | None
    delete_after_delivery: bool
    poll_seconds: int
    auth: str = "password"  # "password" (LOGIN) or "xoauth2"
    oauth: OAuthClient | None = None

    @classmethod
    def of(cls, doc: Document) -> MailboxConfig:
        oauth = doc.get("oauth")
        return cls(
            id=doc["_id"],
            host=doc["host"],
            port=int(doc["port"]),
            security=doc.get("security", "tls"),
            login=doc["login"],
            password=doc.get("password") or "",
            folder=doc.get("folder", "INBOX"),
            processed_folder=doc.get("processed_folder"),
            delete_after_delivery=bool(doc.get("delete_after_delivery")),
            poll_seconds=int(doc.get("poll_seconds", 60)),
            auth=doc.get("auth", "password"),
            oauth=OAuthClient(
                client_id=oauth["client_id"],
                client_secret=oauth["client_secret"],
                token_url=oauth["token_url"],
                refresh_token=oauth["refresh_token"],
                scope=oauth.get("scope"),
            )
            if isinstance(oauth, dict)
            else None,
        )


def _ok(response: Any, what: str) -> Any:
    if response.result != "OK":
        raise ImapError(f"{what}: {response.result} {response.lines!r}"[:500])
    return response


# Each connection's loss, by client. A command sent on a connection the server has closed
# (a kick, a restart) gets no answer, and some of aioimaplib's commands (UID COPY, for one) have
# no timeout of their own: without this the session would wait out COMMAND_TIMEOUT_SECONDS
# before reconnecting.
_LOST: weakref.WeakKeyDictionary[aioimaplib.IMAP4, asyncio.Future[None]] = (
    weakref.WeakKeyDictionary()
)


def _loss_signal() -> tuple[asyncio.Future[None], Any]:
    """A future set when the connection is lost, and the callback aioimaplib calls then."""
    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(_exc: Exception | None) -> None:
        if not lost.done():
            lost.set_result(None)

    return lost, connection_lost


async def _call(coro: Any, what: str, client: aioimaplib.IMAP4 | None = None) -> Any:
    """The answer to one command, or ImapError: refused, not answered in time, or the
    connection of ``client`` lost before the answer came."""
    lost = _LOST.get(client) if client is not None else None
    command = asyncio.ensure_future(asyncio.wait_for(coro, COMMAND_TIMEOUT_SECONDS))
    if lost is not None:
        await asyncio.wait({command, lost}, return_when=asyncio.FIRST_COMPLETED)
        if not command.done():  # an answer that came with the close was taken first
            command.cancel()
            with contextlib.suppress(BaseException):
                await command
            raise ImapError(f"{what}: the server closed the connection")
    try:
        return _ok(await command, what)
    except TimeoutError:
        raise ImapError(f"{what}: no answer in {COMMAND_TIMEOUT_SECONDS:.0f} s") from None


async def connect(
    cfg: MailboxConfig, tokens: TokenSource | None = None, timeout: float = 15.0
) -> aioimaplib.IMAP4:
    """A logged-in session: over implicit TLS, STARTTLS or plain, by LOGIN with the password
    or by XOAUTH2 with an access token from the mailbox's OAuth client (``tokens``)."""
    lost, connection_lost = _loss_signal()
    if cfg.security == "tls":
        client: aioimaplib.IMAP4 = aioimaplib.IMAP4_SSL(
            cfg.host,
            cfg.port,
            timeout=timeout,
            ssl_context=ssl.create_default_context(),
            conn_lost_cb=connection_lost,
        )
    else:
        client = aioimaplib.IMAP4(cfg.host, cfg.port, timeout=timeout, conn_lost_cb=connection_lost)
    _LOST[client] = lost
    try:
        await asyncio.wait_for(client.wait_hello_from_server(), timeout)
    except TimeoutError:
        raise ImapError("the server did not greet") from None
    if cfg.security == "starttls":
        await starttls(client, cfg.host)
    if cfg.auth == "xoauth2":
        await _xoauth2(client, cfg, tokens or TokenSource(_nowhere))
    else:
        await _call(client.login(cfg.login, cfg.password), "LOGIN", client)
    return client


async def starttls(client: aioimaplib.IMAP4, host: str) -> None:
    """Upgrade the plain connection to TLS (RFC 3501, 6.2.1), checking the server's
    certificate for ``host``. A server that does not offer STARTTLS is an error, never a
    reason to go on in plain text. aioimaplib (2.0) knows the command but has no method for
    it: the upgrade is asyncio's ``start_tls`` on the protocol's own transport."""
    protocol = client.protocol
    if "STARTTLS" not in protocol.capabilities:
        await _capability(protocol)
    if "STARTTLS" not in protocol.capabilities:
        raise ImapError("the server does not offer STARTTLS")
    command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
    await _call(protocol.execute(command), "STARTTLS", client)
    loop = asyncio.get_running_loop()
    try:
        transport = await asyncio.wait_for(
            loop.start_tls(
                protocol.transport,
                protocol,
                ssl.create_default_context(),
                server_hostname=host,
            ),
            COMMAND_TIMEOUT_SECONDS,
        )
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        raise ImapError(f"STARTTLS: the TLS handshake failed: {exc}"[:300]) from None
    if transport is None:
        raise ImapError("STARTTLS: the connection closed")
    protocol.transport = transport
    # What the server said before TLS may have been changed by a man in the middle: asked
    # again (RFC 3501, 6.2.1).
    protocol.capabilities = set()
    await _capability(protocol)


class _Authenticate(aioimaplib.Command):  # type: ignore[misc]
    """AUTHENTICATE whose response is sent on the server's first continuation, not on the
    command line: aioimaplib logs command lines (and the command itself) at DEBUG, and the
    response holds the token. A server that refuses the token sends a second continuation
    with the error's details and waits for an empty line before its NO (RFC 7628, 3.2.3);
    aioimaplib would wait for ever there. It hands each continuation to the pending command
    and calls its ``flush``: the answers are written from here."""

    def __init__(self, protocol: Any, mechanism: str, response: str) -> None:
        super().__init__("AUTHENTICATE", protocol.new_tag(), mechanism, loop=protocol.loop)
        self._protocol = protocol
        self._response: str | None = response

    def flush(self) -> None:
        response, self._response = self._response, None
        self._protocol.transport.write((response or "").encode() + b"\r\n")


async def _capability(protocol: Any) -> None:
    """CAPABILITY, filling ``protocol.capabilities`` (aioimaplib returns no response)."""
    try:
        await asyncio.wait_for(protocol.capability(), COMMAND_TIMEOUT_SECONDS)
    except TimeoutError:
        raise ImapError("CAPABILITY: no answer") from None


async def _xoauth2(client: aioimaplib.IMAP4, cfg: MailboxConfig, tokens: TokenSource) -> None:
    if cfg.oauth is None:
        raise ImapError("XOAUTH2 needs the mailbox's OAuth client")
    if "AUTH=XOAUTH2" not in client.protocol.capabilities:
        await _capability(client.protocol)
    if "AUTH=XOAUTH2" not in client.protocol.capabilities:
        raise ImapError("the server does not offer XOAUTH2")
    for attempt in range(2):
        try:
            token = await tokens.access_token(cfg.id, cfg.oauth)
        except OAuthError as exc:
            raise ImapError(f"OAuth: {exc}") from None
        sasl = f"user={cfg.login}\x01auth=Bearer {token}\x01\x01"
        protocol = client.protocol
        command = _Authenticate(protocol, "XOAUTH2", b64encode(sasl.encode()).decode())
        try:
            response = await asyncio.wait_for(protocol.execute(command), COMMAND_TIMEOUT_SECONDS)
        except TimeoutError:
            raise ImapError("AUTHENTICATE XOAUTH2: no answer") from None
        if response.result == "OK":
            protocol.state = aioimaplib.AUTH
            return
        # A token the server no longer takes (revoked, or expired early): one fresh try.
        tokens.forget(cfg.id)
        if attempt:
            raise ImapError(f"AUTHENTICATE XOAUTH2: {response.result}")


async def _nowhere(_mailbox_id: str, _refresh_token: str) -> None:
    """A rotated refresh token with nowhere to be kept (a connection test)."""


async def select(client: aioimaplib.IMAP4, folder: str) -> tuple[int, int]:
    """Selects the folder; returns (UIDVALIDITY, EXISTS)."""
    response = await _call(client.select(_quoted(folder)), f"SELECT {folder}", client)
    uidvalidity, exists = 0, 0
    for line in response.lines:
        raw = line if isinstance(line, bytes) else str(line).encode()
        if (m := _UIDVALIDITY.search(raw)) is not None:
            uidvalidity = int(m.group(1))
        if raw.endswith(b" EXISTS"):
            with contextlib.suppress(ValueError):
                exists = int(raw.split()[0])
    return uidvalidity, exists


def _quoted(folder: str) -> str:
    if any(c in folder for c in '"\\\r\n'):
        raise ImapError("a folder name may not contain quotes, backslashes or line breaks")
    return f'"{folder}"'


class MailboxCollector:
    def __init__(
        self,
        store: Store,
        inbox: RawInbox,
        cfg: MailboxConfig,
        max_bytes: int,
        node: str,
        sole_node: bool = False,
        tokens: TokenSource | None = None,
    ) -> None:
        self._store = store
        self._inbox = inbox
        self._tokens = tokens
        self.cfg = cfg
        self._max_bytes = max_bytes
        self._node = node
        self._sole_node = sole_node
        self._stored_hooks: list[Any] = []
        self._pending_actions = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def on_stored(self, hook: Any) -> None:
        self._stored_hooks.append(hook)

    def after_delivery(self) -> None:
        """A message of ours reached its outcome: move or delete it at the next chance."""
        self._pending_actions.set()

    async def _state(self, **fields: Any) -> None:
        await self._store["mail_mailboxes"].update_one(
            {"_id": self.cfg.id}, {"$set": {f"state.{k}": v for k, v in fields.items()}}
        )

    async def _lease(self) -> bool:
        """Takes or renews this node's lease on the mailbox. With the embedded database this
        is the only node, so a lease held by another is a dead process's: taken at once."""
        now = utcnow()
        query: Document = {"_id": self.cfg.id}
        if not self._sole_node:
            query["$or"] = [
                {"lease.until": None},
                {"lease.until": {"$lt": now}},
                {"lease.node": self._node},
            ]
        won = await self._store["mail_mailboxes"].find_one_and_update(
            query, {"$set": {"lease": {"node": self._node, "until": now + LEASE}}}
        )
        return won is not None

    async def give_back(self) -> None:
        """The collector stopped: the next one (the next start, or another node) starts at
        once instead of waiting for the lease to run out."""
        try:
            await self._store["mail_mailboxes"].update_one(
                {"_id": self.cfg.id, "lease.node": self._node}, {"$set": {"lease": None}}
            )
        except Exception:
            log.warning("mailbox %s: could not give its lease back", self.cfg.id, exc_info=True)

    async def supervise(self) -> None:
        backoff = 1.0
        while True:
            try:
                if not await self._lease():
                    await asyncio.sleep(LEASE.total_seconds() / 3)
                    continue
                await self.session()
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_stopping()
                log.warning("mailbox %s: %s; reconnecting in %.0f s", self.cfg.id, exc, backoff)
                await self._state(connected=False, idle=False, last_error=str(exc)[:500])
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def session(self) -> None:
        """One connection's life: collect, act on delivered mail, wait, repeat."""
        client = await connect(self.cfg, self._tokens)
        try:
            await self._state(connected=True, last_error=None)
            uidvalidity, _exists = await select(client, self.cfg.folder)
            async with renewing(self._lease, f"mailbox {self.cfg.id}"):
                while True:
                    if not await self._lease():
                        raise ImapError("another node took the mailbox over")
                    await self.collect(client, uidvalidity)
                    await self.act_on_delivered(client, uidvalidity)
                    await self._wait(client)
                    # a BYE during the wait ends the connection: select again to find out
                    uidvalidity, _exists = await select(client, self.cfg.folder)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.logout(), 5)

    async def collect(self, client: aioimaplib.IMAP4, uidvalidity: int) -> int:
        box = await self._store["mail_mailboxes"].find_one({"_id": self.cfg.id}) or {}
        state = box.get("state", {})
        last_uid = int(state.get("last_uid", 0))
        if state.get("uidvalidity") != uidvalidity:
            last_uid = 0  # a new UIDVALIDITY: every UID is new; stored bytes dedupe copies
            await self._state(uidvalidity=uidvalidity, last_uid=0)
        response = await _call(client.uid_search(f"UID {last_uid + 1}:*"), "UID SEARCH", client)
        uids = sorted(
            int(u)
            for line in response.lines
            for u in (line.decode() if isinstance(line, bytes) else str(line)).split()
            if u.isdigit() and int(u) > last_uid
        )
        collected = 0
        for start in range(0, len(uids), FETCH_BATCH):
            for uid in uids[start : start + FETCH_BATCH]:
                await self._collect_one(client, uidvalidity, uid)
                collected += 1
                await self._state(last_uid=uid, last_poll_at=utcnow())
        await self._state(last_poll_at=utcnow())
        return collected

    async def _collect_one(self, client: aioimaplib.IMAP4, uidvalidity: int, uid: int) -> None:
        size_resp = await _call(
            client.uid("fetch", str(uid), "(RFC822.SIZE)"), "FETCH SIZE", client
        )
        size = None
        for line in size_resp.lines:
            raw = line if isinstance(line, bytes) else str(line).encode()
            m = re.search(rb"RFC822\.SIZE (\d+)", raw)
            if m:
                size = int(m.group(1))
        if size is None:
            return  # expunged meanwhile
        if size > self._max_bytes:
            await self._store["mail_skipped"].update_one(
                {"_id": f"{self.cfg.id}|{uidvalidity}|{uid}"},
                {
                    "$set": {
                        "mailbox_id": self.cfg.id,
                        "uid": uid,
                        "size": size,
                        "reason": f"{size} bytes is over the {self._max_bytes}-byte limit",
                        "at": utcnow(),
                    }
                },
                upsert=True,
            )
            log.warning("mailbox %s: UID %s skipped (%s bytes)", self.cfg.id, uid, size)
            return
        body_resp = await _call(client.uid("fetch", str(uid), "BODY.PEEK[]"), "FETCH BODY", client)
        raw_message = _literal(body_resp.lines)
        if raw_message is None:
            return
        await self._inbox.put(
            raw_message,
            Source("imap", mailbox_id=self.cfg.id, uidvalidity=uidvalidity, uid=uid),
        )
        for hook in self._stored_hooks:
            hook()

    async def act_on_delivered(self, client: aioimaplib.IMAP4, uidvalidity: int) -> int:
        """Move (or delete) messages whose outcome is committed; never before."""
        self._pending_actions.clear()
        # The mailbox's mail not acted on yet, by the ``imap_waiting`` index (``imap_done:
        # None`` is its range; a ``$ne`` or the status beside it would have the embedded
        # database read every stored message), the rest checked here.
        done = [
            d
            async for d in self._inbox.collection.find(
                {"source.mailbox_id": self.cfg.id, "imap_done": None},
                {"source.uid": 1, "source.uidvalidity": 1, "status": 1},
            )
            if d.get("status") in DELIVERED_STATUSES
            and d.get("source", {}).get("uidvalidity") == uidvalidity
        ][:500]
        if not done:
            return 0
        uid_set = ",".join(str(d["source"]["uid"]) for d in done)
        if self.cfg.delete_after_delivery:
            await _call(client.uid("store", uid_set, r"+FLAGS.SILENT (\Deleted)"), "STORE", client)
            await _call(client.expunge(), "EXPUNGE", client)
        else:
            await _call(client.uid("store", uid_set, r"+FLAGS.SILENT (\Seen)"), "STORE", client)
            if self.cfg.processed_folder:
                folder = _quoted(self.cfg.processed_folder)
                created = await client.create(folder)
                del created  # "already exists" is fine
                await _call(client.uid("copy", uid_set, folder), "COPY", client)
                await _call(
                    client.uid("store", uid_set, r"+FLAGS.SILENT (\Deleted)"), "STORE", client
                )
                await _call(client.expunge(), "EXPUNGE", client)
        await self._inbox.collection.update_many(
            {"_id": {"$in": [d["_id"] for d in done]}}, {"$set": {"imap_done": True}}
        )
        return len(done)

    async def _wait(self, client: aioimaplib.IMAP4) -> None:
        """Until new mail, a delivered message to move, or the poll interval."""
        if not client.has_capability("IDLE"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pending_actions.wait(), self.cfg.poll_seconds)
            return
        await self._state(idle=True)
        idle = await asyncio.wait_for(client.idle_start(timeout=IDLE_RENEW_SECONDS), 30)
        try:
            push = asyncio.ensure_future(client.wait_server_push(timeout=IDLE_RENEW_SECONDS))
            action = asyncio.ensure_future(self._pending_actions.wait())
            # and a look of our own now and then, should a server's push go missing
            recheck = asyncio.ensure_future(asyncio.sleep(RECHECK_SECONDS))
            finished, pending = await asyncio.wait(
                {push, action, recheck},
                timeout=IDLE_RENEW_SECONDS + 30,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()
            if push in finished and push.exception() is None:
                for line in push.result() or []:
                    text = line.decode() if isinstance(line, bytes) else str(line)
                    if text.upper().startswith("BYE"):
                        raise ImapError(f"server said {text[:200]}")
        finally:
            if client.has_pending_idle():
                client.idle_done()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(idle, 10)
            await self._state(idle=False)


def _literal(lines: list[Any]) -> bytes | None:
    """The message bytes of a FETCH BODY[] answer (aioimaplib hands them as a bytearray)."""
    for line in lines:
        if isinstance(line, bytearray):
            return bytes(line)
    return None


async def test_connection(cfg: MailboxConfig, tokens: TokenSource | None = None) -> dict[str, Any]:
    try:
        client = await connect(cfg, tokens)
    except Exception as exc:
        return {"ok": False, "detail": f"could not log in: {exc}"[:500], "capabilities": []}
    try:
        _uidvalidity, exists = await select(client, cfg.folder)
        capabilities = sorted(getattr(client.protocol, "capabilities", set()))
        return {
            "ok": True,
            "detail": f"logged in; {cfg.folder} has {exists} messages",
            "capabilities": capabilities,
            "messages": exists,
        }
    except Exception as exc:
        return {"ok": False, "detail": str(exc)[:500], "capabilities": []}
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.logout(), 5)
