"""Real terminal XMPP clients, Profanity and mcabber (Debian's packages), driven through tmux:
they log in with the portal's credentials over STARTTLS, show the company roster, and chat with
a user of the web client both ways.

mcabber is built on loudmouth, which (like Miranda and S22.Xmpp) only knows the stream features
by their literal name ``stream:features`` (issue 17)."""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.harness import DEFAULT_PASSWORD, HubHarness


@dataclass
class Tmux:
    """One tmux server of our own (its socket in the test's directory), one window."""

    binary: str
    socket: Path
    session: str = "client"

    async def run(self, *args: str, check: bool = True) -> str:
        process = await asyncio.create_subprocess_exec(
            self.binary,
            "-S",
            str(self.socket),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        out, err = await asyncio.wait_for(process.communicate(), 20)
        if check and process.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)} failed: {err.decode(errors='replace')}")
        return out.decode(errors="replace")

    async def screen(self) -> str:
        """What the pane shows, with its scrollback."""
        return await self.run("capture-pane", "-p", "-J", "-S", "-500", "-t", self.session)

    async def type(self, text: str) -> None:
        await self.run("send-keys", "-t", self.session, "-l", text)
        await self.run("send-keys", "-t", self.session, "Enter")

    async def wait_for(
        self, condition: Callable[[str], bool], what: str, timeout: float = 20.0
    ) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = await self.screen()
            if condition(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"the client never showed {what}; the screen:\n{screen}")
            await asyncio.sleep(0.2)

    async def wait_for_text(self, text: str, timeout: float = 20.0) -> str:
        return await self.wait_for(lambda screen: text in screen, repr(text), timeout)


@pytest.fixture
async def tmux(tmp_path: Path) -> AsyncIterator[Tmux]:
    binary = require_binary("tmux", "tmux")
    multiplexer = Tmux(binary, tmp_path / "tmux.sock")
    try:
        yield multiplexer
    finally:
        await multiplexer.run("kill-server", check=False)


def profanity_home(home: Path, jid: str, port: int) -> dict[str, str]:
    """A private HOME with an account that logs in on start and trusts our self-signed
    certificate (tls.policy=trust: TLS required, certificate not checked)."""
    config = home / ".config"
    data = home / ".local" / "share"
    (config / "profanity").mkdir(parents=True)
    (data / "profanity").mkdir(parents=True)
    (config / "profanity" / "profrc").write_text(
        "[notifications]\nmessage=false\nroom=false\ninvite=false\nsub=false\n"
    )
    (data / "profanity" / "accounts").write_text(
        f"[{jid}]\n"
        "enabled=true\n"
        f"jid={jid}\n"
        "server=127.0.0.1\n"
        f"port={port}\n"
        "resource=terminal\n"
        f"password={DEFAULT_PASSWORD}\n"
        "tls.policy=trust\n"
    )
    return {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(config),
        "XDG_DATA_HOME": str(data),
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
    }


async def test_profanity_logs_in_shows_the_roster_and_chats_with_the_web(
    tmux: Tmux, hub: HubHarness, tmp_path: Path
) -> None:
    require_binary("profanity", "profanity")
    xmpp = hub.services.xmpp
    assert xmpp is not None
    domain = xmpp.domain
    alice_id, _ = await hub.create_user("alice", first_name="Alice", last_name="Liddell")
    _, bob_token = await hub.create_user("bob", first_name="Bob", last_name="Builder")
    await hub.create_user("carol", first_name="Carol", last_name="Danvers")  # never online
    web = await hub.connect(bob_token)
    await web.wait_for("snapshot")

    env = profanity_home(tmp_path / "home", f"alice@{domain}", xmpp.ports["starttls"])
    command = " ".join(
        [
            "env",
            *(shlex.quote(f"{k}={v}") for k, v in env.items()),
            "profanity",
            "-a",
            shlex.quote(f"alice@{domain}"),
            # Keep the pane after an exit, to show what went wrong.
            "; echo profanity exited; sleep 60",
        ]
    )
    await tmux.run("new-session", "-d", "-s", tmux.session, "-x", "200", "-y", "50", command)

    await tmux.wait_for_text(f"alice@{domain}/terminal logged in successfully")
    [session] = xmpp.sessions_of(alice_id)
    assert session.tls and session.jid is not None and session.jid.resource == "terminal"
    # The company roster, by display name, in the roster panel: Bob (on the web) under
    # "Online", Carol under "Offline".
    screen = await tmux.wait_for(
        lambda s: "Bob Builder" in s and "Carol Danvers" in s, "the roster"
    )
    panel = [line[120:].strip() for line in screen.splitlines() if len(line) > 120]
    offline = next(i for i, line in enumerate(panel) if line.startswith("Offline"))
    assert panel.index("Bob Builder") < offline < panel.index("Carol Danvers"), panel

    # Open the chat window with Bob, then the web user writes.
    await tmux.type(f"/msg bob@{domain}")
    sent = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=bob_token,
        json={"to": [alice_id], "text": "hello Alice, from the web"},
    )
    assert sent.status == 201, sent.body
    await tmux.wait_for_text("Bob Builder: hello Alice, from the web")

    # And back, from the terminal.
    await tmux.type(f"/msg bob@{domain} hi Bob, from profanity")
    await web.wait_until(
        lambda: any(
            e["data"]["message"]["text"] == "hi Bob, from profanity"
            for e in web.of_type("im.message")
        ),
        timeout=20,
    )
    [event] = [
        e
        for e in web.of_type("im.message")
        if e["data"]["message"]["text"] == "hi Bob, from profanity"
    ]
    assert event["data"]["message"]["author_id"] == alice_id
    # the terminal redraws on its own time: wait for its echo rather than read it at once
    await tmux.wait_for_text("me: hi Bob, from profanity")

    await tmux.type("/quit")
    await tmux.wait_for_text("profanity exited")


def mcabber_home(home: Path, jid: str, port: int) -> tuple[dict[str, str], Path]:
    """A private HOME with an mcabberrc that logs in on start over STARTTLS, trusting our
    self-signed certificate (ssl_ignore_checks), and keeps a history file per contact."""
    config = home / ".mcabber"
    config.mkdir(parents=True, mode=0o700)
    history = config / "histo"
    rc = config / "mcabberrc"
    rc.write_text(
        f"set jid = {jid}\n"
        f"set password = {DEFAULT_PASSWORD}\n"
        "set server = 127.0.0.1\n"
        f"set port = {port}\n"
        "set tls = 1\n"
        "set ssl_ignore_checks = 1\n"
        "set resource = mcabber\n"
        "set disable_random_resource = 1\n"
        "set logging = 1\n"
        f"set logging_dir = {history}/\n"
        "set beep_on_message = 0\n"
        "set log_win_height = 10\n"
        "set roster_width = 30\n"
    )
    rc.chmod(0o600)  # mcabber warns about a password file others can read
    history.mkdir(mode=0o700)
    env = {"HOME": str(home), "TERM": "xterm-256color", "LANG": "C.UTF-8"}
    return env, history


async def test_mcabber_logs_in_and_chats_with_the_web(
    tmux: Tmux, hub: HubHarness, tmp_path: Path
) -> None:
    require_binary("mcabber", "mcabber")
    xmpp = hub.services.xmpp
    assert xmpp is not None
    domain = xmpp.domain
    alice_id, _ = await hub.create_user("alice", first_name="Alice", last_name="Liddell")
    _, bob_token = await hub.create_user("bob", first_name="Bob", last_name="Builder")
    web = await hub.connect(bob_token)
    await web.wait_for("snapshot")

    env, history = mcabber_home(tmp_path / "home", f"alice@{domain}", xmpp.ports["starttls"])
    command = " ".join(
        [
            "env",
            *(shlex.quote(f"{k}={v}") for k, v in env.items()),
            "mcabber",
            "; echo mcabber exited; sleep 60",
        ]
    )
    await tmux.run("new-session", "-d", "-s", tmux.session, "-x", "200", "-y", "50", command)

    # Logged in and bound: before issue 17 mcabber waited for <stream:features> for ever
    # and the server cut it at the login timeout.
    deadline = time.monotonic() + 20
    while not xmpp.sessions_of(alice_id):
        if time.monotonic() > deadline:
            raise AssertionError(f"mcabber never logged in; the screen:\n{await tmux.screen()}")
        await asyncio.sleep(0.2)
    [session] = xmpp.sessions_of(alice_id)
    assert session.tls and session.jid is not None and session.jid.resource == "mcabber"
    # The roster, by display name.
    await tmux.wait_for_text("Bob Builder")

    # The web user writes; mcabber marks Bob unread, writes the message to its history and
    # shows it in Bob's chat window.
    sent = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=bob_token,
        json={"to": [alice_id], "text": "hello Alice, from the web"},
    )
    assert sent.status == 201, sent.body
    await tmux.wait_for_text("#[o] Bob Builder")
    bob_history = history / f"bob@{domain}"
    deadline = time.monotonic() + 10
    while not (bob_history.exists() and "hello Alice, from the web" in bob_history.read_text()):
        if time.monotonic() > deadline:
            raise AssertionError("mcabber never logged the message it received")
        await asyncio.sleep(0.2)
    assert any(
        line.startswith("MR ") and line.endswith("hello Alice, from the web")
        for line in bob_history.read_text().splitlines()
    ), bob_history.read_text()
    await tmux.type("/roster search Bob Builder")
    await tmux.wait_for_text("Buddy: Bob Builder")
    await tmux.run("send-keys", "-t", tmux.session, "Enter")  # an empty line opens the chat
    await tmux.wait_for_text("hello Alice, from the web")

    # And back, from the terminal.
    await tmux.type(f"/say_to bob@{domain} hi Bob, from mcabber")
    await web.wait_until(
        lambda: any(
            e["data"]["message"]["text"] == "hi Bob, from mcabber"
            for e in web.of_type("im.message")
        ),
        timeout=20,
    )
    [event] = [
        e
        for e in web.of_type("im.message")
        if e["data"]["message"]["text"] == "hi Bob, from mcabber"
    ]
    assert event["data"]["message"]["author_id"] == alice_id

    await tmux.type("/quit")
    await tmux.wait_for_text("mcabber exited")
