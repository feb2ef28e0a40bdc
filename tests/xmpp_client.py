"""A real XMPP client for tests: slixmpp, connected over TLS to the hub's listeners."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any

import slixmpp

from tests.harness import DEFAULT_PASSWORD, HubHarness


class XmppClient(slixmpp.ClientXMPP):
    def __init__(
        self,
        jid: str,
        password: str,
        *,
        mechanism: str | None = None,
        plugins: tuple[str, ...] = (),
    ) -> None:
        super().__init__(jid, password, sasl_mech=mechanism)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the development certificate is self-signed
        self.ssl_context = context
        self.messages: list[Any] = []
        self.presences: list[Any] = []
        self.failures: list[Any] = []
        self.stream_errors: list[Any] = []
        self.session_ready = asyncio.Event()
        self.gone = asyncio.Event()
        for plugin in ("xep_0030", "xep_0199", *plugins):
            self.register_plugin(plugin)
        self.add_event_handler("session_start", self._started)
        self.add_event_handler("message", self.messages.append)
        self.add_event_handler("presence", self.presences.append)
        self.add_event_handler("failed_auth", self.failures.append)
        self.add_event_handler("stream_error", self.stream_errors.append)
        self.add_event_handler("disconnected", lambda _e: self.gone.set())

    async def _started(self, _event: Any) -> None:
        self.session_ready.set()

    async def wait_for_condition(
        self, condition: Callable[[], bool], timeout: float = 10.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"condition not met; messages: {[str(m) for m in self.messages[-5:]]}"
                )
            await asyncio.sleep(0.02)

    def bodies(self) -> list[str]:
        return [str(m["body"]) for m in self.messages if m["body"]]


async def xmpp_login(
    hub: HubHarness,
    login: str,
    *,
    password: str = DEFAULT_PASSWORD,
    direct_tls: bool = False,
    mechanism: str | None = None,
    resource: str = "test",
    send_presence: bool = True,
    plugins: tuple[str, ...] = (),
    get_roster: bool = True,
) -> XmppClient:
    xmpp = hub.services.xmpp
    assert xmpp is not None
    client = XmppClient(
        f"{login}@{xmpp.domain}/{resource}", password, mechanism=mechanism, plugins=plugins
    )
    client.enable_direct_tls = direct_tls
    client.enable_starttls = not direct_tls
    client.enable_plaintext = False
    port = xmpp.ports["tls" if direct_tls else "starttls"]
    client.connect("127.0.0.1", port)
    await asyncio.wait(
        [
            asyncio.ensure_future(client.session_ready.wait()),
            asyncio.ensure_future(client.gone.wait()),
        ],
        timeout=15,
        return_when=asyncio.FIRST_COMPLETED,
    )
    if not client.session_ready.is_set():
        client.disconnect()
        raise ConnectionError(f"XMPP login failed: {client.failures} {client.stream_errors}")
    if get_roster:
        await client.get_roster()
    if send_presence:
        client.send_presence()
    hub.closers.append(client.disconnect)
    return client
