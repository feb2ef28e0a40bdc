"""An IMAP server that closes the connection instead of answering a command: the collector
learns it at once and reconnects, instead of waiting out its own command timeout (some of
aioimaplib's commands, UID COPY among them, have none of their own)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from server.mailbridge import imap
from server.mailbridge.imap import ImapError, MailboxConfig, connect


class ClosingServer:
    """Greets, answers CAPABILITY, and closes the connection at the first other command."""

    def __init__(self) -> None:
        self.commands: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
        await writer.drain()
        while line := await reader.readline():
            tag, _, rest = line.partition(b" ")
            self.commands.append(rest.split(b" ")[0].strip())
            if rest.upper().startswith(b"CAPABILITY"):
                writer.write(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" + tag + b" OK done\r\n")
                await writer.drain()
                continue
            writer.close()  # no answer: the connection is gone
            return


@pytest.fixture
async def closing_server() -> AsyncIterator[tuple[ClosingServer, int]]:
    found = ClosingServer()
    server = await asyncio.start_server(found.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield found, port


async def test_a_command_on_a_connection_the_server_closed_fails_at_once(
    closing_server: tuple[ClosingServer, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, port = closing_server
    # Both timeouts far beyond the bound below: only the loss of the connection can end it.
    monkeypatch.setattr(imap, "COMMAND_TIMEOUT_SECONDS", 3600.0)
    cfg = MailboxConfig(
        id="box",
        host="127.0.0.1",
        port=port,
        security="none",
        login="crm",
        password="secret",
        folder="INBOX",
        processed_folder=None,
        delete_after_delivery=False,
        poll_seconds=5,
    )
    with pytest.raises(ImapError, match="closed the connection"):
        await asyncio.wait_for(connect(cfg, timeout=3600.0), 10)
    assert server.commands[-1].upper() == b"LOGIN"
