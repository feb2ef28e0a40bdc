"""docs/xmpp.md's XEP-0479 table stays true: what it calls done (or partly done) is announced
in service discovery (or, for the entity ``stream``, in the stream features after login), what
it calls not done (or left out by design) is not."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from slixmpp import JID

from tests.harness import HubHarness
from tests.test_xmpp_hostile import RawXmpp
from tests.test_xmpp_muc import create_group
from tests.xmpp_client import xmpp_login

DOC = Path(__file__).resolve().parent.parent / "docs" / "xmpp.md"
STATES = ("done", "partly", "not", "by design")
ENTITIES = ("server", "account", "conference", "room", "stream")
_FEATURE = re.compile(r"`([^`]+)`(?:\s*\((\w+)\))?")


@dataclass(frozen=True)
class Row:
    suite: str
    feature: str
    provider: str
    state: str
    announced: tuple[tuple[str, str], ...]  # (entity, feature var)


def compliance_rows(text: str) -> list[Row]:
    start = text.index("<!-- xep0479:start -->")
    end = text.index("<!-- xep0479:end -->")
    rows: list[Row] = []
    for line in text[start:end].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or cells[0] in ("suite", "---"):
            continue
        suite, feature, _level, provider, state, announced, _notes = cells
        assert state in STATES, line
        found = tuple((entity or "server", var) for var, entity in _FEATURE.findall(announced))
        assert all(entity in ENTITIES for entity, _ in found), line
        rows.append(Row(suite, feature, provider, state, found))
    return rows


def test_the_table_is_read() -> None:
    rows = compliance_rows(DOC.read_text())
    assert {r.suite for r in rows} == {"Core", "IM", "Mobile"}
    assert len(rows) >= 20
    blocking = next(r for r in rows if r.provider == "XEP-0191")
    assert blocking.state == "done" and blocking.announced == (("server", "urn:xmpp:blocking"),)
    room_mam = next(r for r in rows if r.provider.startswith("XEP-0313 (room"))
    assert room_mam.announced == (("room", "urn:xmpp:mam:2"),)
    stream_management = [r for r in rows if r.provider == "XEP-0198"]
    assert {r.suite for r in stream_management} == {"IM", "Mobile"}
    assert all(r.announced == (("stream", "urn:xmpp:sm:3"),) for r in stream_management)


async def test_compliance_table_matches_what_the_server_announces(hub: HubHarness) -> None:
    alice_id, token = await hub.create_user("alice")
    chat = await create_group(hub, token, "Compliance", [alice_id])
    xmpp = hub.services.xmpp
    assert xmpp is not None
    d = xmpp.domain
    client = await xmpp_login(hub, "alice")
    addresses = {
        "server": d,
        "account": f"alice@{d}",
        "conference": f"conference.{d}",
        "room": f"{chat['id']}@conference.{d}",
    }
    announced: dict[str, set[str]] = {}
    for entity, jid in addresses.items():
        info = await client.plugin["xep_0030"].get_info(jid=JID(jid), timeout=10)
        announced[entity] = set(info["disco_info"]["features"])
    raw = await RawXmpp.connect(hub)
    await raw.authenticate("alice")
    features = await raw.open_stream()
    announced["stream"] = {feature.tag[1:].partition("}")[0] for feature in features}
    wrong: list[str] = []
    for row in compliance_rows(DOC.read_text()):
        for entity, var in row.announced:
            present = var in announced[entity]
            if present != (row.state in ("done", "partly")):
                what = "announced" if present else "not announced"
                wrong.append(
                    f"{row.suite} / {row.feature} ({row.provider}) is '{row.state}' "
                    f"but {var} is {what} at {entity}"
                )
    assert not wrong, "\n".join(wrong)
