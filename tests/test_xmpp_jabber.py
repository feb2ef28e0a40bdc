"""Issue 17: what Jabber clients nobody here wrote expect from the wire, checked on raw
streams (the real clients are driven in test_xmpp_terminal.py)."""

from __future__ import annotations

import re

from tests.harness import HubHarness
from tests.test_xmpp_hostile import RawXmpp

# A stream-level element written with a default namespace instead of the stream: prefix.
_UNPREFIXED = re.compile(rb"<(?:features|error)[^>]*etherx")


async def test_stream_level_elements_carry_the_stream_prefix(hub: HubHarness) -> None:
    """RFC 6120's examples write <stream:features> and <stream:error>; loudmouth (mcabber),
    Miranda and S22.Xmpp match those names literally and wait for ever on an equivalent
    <features xmlns="http://etherx.jabber.org/streams">."""
    await hub.create_user("mallory")
    raw = await RawXmpp.connect(hub)
    await raw.login("mallory")  # features before TLS, before SASL and before bind
    raw.send("<message><body></message>")
    await raw.expect_stream_error("not-well-formed")
    data = bytes(raw.recorder.data)
    assert data.count(b"<stream:features>") == 3, data
    assert data.count(b"</stream:features>") == 3, data
    assert b"<stream:error>" in data and b"</stream:error></stream:stream>" in data, data
    assert _UNPREFIXED.search(data) is None, data

