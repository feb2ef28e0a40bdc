"""What Jabber clients read from the history (MAM, room history on join, offline delivery),
read through the messenger's history by chat and id (an index the embedded database uses
whatever the size of the history): paging, time ranges and deleted messages behave as before."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import monitoring
from slixmpp import JID
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from server.settings import Settings
from server.store.database import Document, Store
from tests.harness import HubHarness, start_hub
from tests.xmpp_client import XmppClient, xmpp_login

MAM = "urn:xmpp:mam:2"
RSM = "http://jabber.org/protocol/rsm"
DATA = "jabber:x:data"
FORWARD = "urn:xmpp:forward:0"


def domain(hub: HubHarness) -> str:
    assert hub.services.xmpp is not None
    return hub.services.xmpp.domain


async def post(hub: HubHarness, token: str, **body: Any) -> dict[str, Any]:
    resp = await hub.request("POST", "/api/v1/im/messages", token=token, json=body)
    assert resp.status == 201, resp.body
    message: dict[str, Any] = resp.body["messages"][0]
    return message


async def mam(client: XmppClient, rsm: str = "", **fields: str) -> tuple[list[str], bool]:
    """One raw MAM query (slixmpp cannot send an empty <before/>): the bodies, oldest first,
    and whether the server says the result is complete."""
    query_id = uuid.uuid4().hex[:8]
    bodies: list[str] = []

    def result(message: Any) -> None:
        found = message.xml.find(f"{{{MAM}}}result")
        if found is not None and found.get("queryid") == query_id:
            body = found.find(
                f"{{{FORWARD}}}forwarded/{{jabber:client}}message/{{jabber:client}}body"
            )
            bodies.append(body.text if body is not None and body.text else "")

    name = f"mam {query_id}"
    client.register_handler(Callback(name, MatchXPath("{jabber:client}message"), result))
    form = "".join(
        f"<field var='{var}'><value>{value}</value></field>" for var, value in fields.items()
    )
    xml = (
        f"<query xmlns='{MAM}' queryid='{query_id}'><x xmlns='{DATA}' type='submit'>"
        f"<field var='FORM_TYPE' type='hidden'><value>{MAM}</value></field>{form}</x>"
        f"<set xmlns='{RSM}'>{rsm}</set></query>"
    )
    iq = client.make_iq_set()
    iq.append(ET.fromstring(xml))
    answer = await iq.send(timeout=10)  # type: ignore[no-untyped-call]
    client.remove_handler(name)
    fin = answer.xml.find(f"{{{MAM}}}fin")
    assert fin is not None
    return bodies, fin.get("complete") == "true"


async def test_mam_pages_and_time_ranges_over_every_dialog_without_deleted(
    hub: HubHarness,
) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    carol_id, carol = await hub.create_user("carol")
    d1 = await post(hub, alice, to=[bob_id], text="d1")
    dialog = d1["chat_id"]
    await post(hub, bob, chat_id=dialog, text="d2")
    c1 = await post(hub, alice, to=[carol_id], text="c1")
    d3 = await post(hub, alice, chat_id=dialog, text="d3")
    c2 = await post(hub, carol, chat_id=c1["chat_id"], text="c2")
    await post(hub, alice, chat_id=dialog, text="d4")
    gone = await hub.request("DELETE", f"/api/v1/im/messages/{d3['id']}", token=alice)
    assert gone.status == 204, gone.body
    client = await xmpp_login(hub, "alice")

    assert await mam(client, "<max>50</max>") == (["d1", "d2", "c1", "c2", "d4"], True)
    assert await mam(client, "<max>2</max>") == (["d1", "d2"], False)
    after = f"<max>2</max><after>{c1['id']}</after>"
    assert await mam(client, after) == (["c2", "d4"], True)
    assert await mam(client, "<max>2</max><before/>") == (["c2", "d4"], False)
    assert await mam(client, f"<max>9</max><before>{c2['id']}</before>") == (
        ["d1", "d2", "c1"],
        True,
    )
    assert await mam(client, "<max>9</max>", start=c1["created_at"]) == (["c1", "c2", "d4"], True)
    assert await mam(client, "<max>9</max>", end=c1["created_at"]) == (["d1", "d2", "c1"], True)
    window = {"start": d1["created_at"], "end": c2["created_at"]}
    assert await mam(client, "<max>2</max><before/>", **window) == (["c1", "c2"], False)
    assert await mam(client, "<max>9</max>", **{"with": f"bob@{domain(hub)}"}) == (
        ["d1", "d2", "d4"],
        True,
    )


async def test_offline_delivery_skips_deleted_own_and_read_messages(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    first = await post(hub, bob, to=[alice_id], text="read on the web")
    dialog = first["chat_id"]
    read = await hub.request(
        "POST", f"/api/v1/im/chats/{dialog}/read", token=alice, json={"up_to": first["id"]}
    )
    assert read.status == 200, read.body
    await post(hub, alice, chat_id=dialog, text="my own")
    await post(hub, bob, chat_id=dialog, text="new one")
    deleted = await post(hub, bob, chat_id=dialog, text="deleted")
    gone = await hub.request("DELETE", f"/api/v1/im/messages/{deleted['id']}", token=bob)
    assert gone.status == 204, gone.body
    await post(hub, bob, chat_id=dialog, text="newest")
    client = await xmpp_login(hub, "alice")
    await client.wait_for_condition(lambda: len(client.bodies()) >= 2)
    assert client.bodies() == ["new one", "newest"]
    assert str(client.messages[0]["from"]) == f"bob@{domain(hub)}"
    assert client.messages[0].xml.find("{urn:xmpp:delay}delay") is not None
    assert bob_id


async def test_room_history_on_join_counts_only_live_messages(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    resp = await hub.request(
        "POST", "/api/v1/im/chats", token=alice, json={"title": "Room", "member_ids": [bob_id]}
    )
    assert resp.status == 201, resp.body
    chat_id = resp.body["id"]
    for n in range(6):
        message = await post(hub, bob, chat_id=chat_id, text=f"r{n}")
        if n in (3, 4):
            gone = await hub.request("DELETE", f"/api/v1/im/messages/{message['id']}", token=bob)
            assert gone.status == 204, gone.body
    client = await xmpp_login(hub, "alice", plugins=("xep_0045",))
    room = JID(f"{chat_id}@conference.{domain(hub)}")
    _own, _subject, _occupants, backlog = await client.plugin["xep_0045"].join_muc_wait(
        room, "alice", maxstanzas=3, timeout=10
    )
    assert [str(m["body"]) for m in backlog] == ["r1", "r2", "r5"]
    assert alice_id


class FindRecorder(monitoring.CommandListener):
    """The ``find`` commands on the messages collection, while ``finds`` is a list."""

    def __init__(self) -> None:
        self.finds: list[Document] | None = None

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        command = event.command
        wanted = event.command_name == "find" and command.get("find") == "messages"
        if self.finds is not None and wanted:
            self.finds.append(dict(command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


RECORDER = FindRecorder()
_registered: list[bool] = []


@pytest.fixture
async def watched_hub(settings: Settings) -> AsyncIterator[HubHarness]:
    """A hub whose database client reports its commands to ``RECORDER`` (listeners are
    registered for clients made afterwards, once per test session)."""
    if not _registered:
        monitoring.register(RECORDER)
        _registered.append(True)
    assert settings.mongodb_url is not None
    store = Store(settings.mongodb_url.get_secret_value(), settings.mongodb_database)
    await store.ensure_indexes()
    try:
        async with start_hub(settings, store) as harness:
            yield harness
    finally:
        RECORDER.finds = None
        await store.client.drop_database(settings.mongodb_database)
        await store.close()


def access_stage(explained: Document) -> str:
    """The winning plan's way into the collection (IXSCAN or COLLSCAN)."""
    stage = explained["queryPlanner"]["winningPlan"]
    while "inputStage" in stage:
        stage = stage["inputStage"]
    return str(stage["stage"])


async def test_jabber_history_reads_use_an_index(watched_hub: HubHarness) -> None:
    """Offline delivery, MAM and room history read messages only through an index: the
    embedded database uses one only when every field of the filter is in it, so a filter on
    ``deleted`` or ``chat_id $in`` scanned every message of every chat."""
    hub = watched_hub
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    first = await post(hub, bob, to=[alice_id], text="o1")
    gone = await post(hub, bob, chat_id=first["chat_id"], text="o2")
    deleted = await hub.request("DELETE", f"/api/v1/im/messages/{gone['id']}", token=bob)
    assert deleted.status == 204, deleted.body
    await post(hub, bob, chat_id=first["chat_id"], text="o3")
    resp = await hub.request(
        "POST", "/api/v1/im/chats", token=alice, json={"title": "Room", "member_ids": [bob_id]}
    )
    assert resp.status == 201, resp.body
    room_id = resp.body["id"]
    for n in range(3):
        await post(hub, bob, chat_id=room_id, text=f"r{n}")

    finds: list[Document] = []
    RECORDER.finds = finds
    client = await xmpp_login(hub, "alice", plugins=("xep_0045",))
    await client.wait_for_condition(lambda: len(client.bodies()) >= 2)
    assert client.bodies() == ["o1", "o3"]  # offline delivery
    assert await mam(client, "<max>50</max>") == (["o1", "o3"], True)
    assert await mam(client, "<max>1</max><before/>", start=first["created_at"]) == (
        ["o3"],
        False,
    )
    room = JID(f"{room_id}@conference.{domain(hub)}")
    *_, backlog = await client.plugin["xep_0045"].join_muc_wait(
        room, "alice", maxstanzas=2, timeout=10
    )
    assert [str(m["body"]) for m in backlog] == ["r1", "r2"]
    RECORDER.finds = None

    assert len(finds) >= 3, finds  # offline delivery, MAM and the room each read
    messages = hub.services.store["messages"]
    for command in finds:
        cursor = messages.find(command.get("filter", {}), sort=command.get("sort"))
        stage = access_stage(await cursor.explain())
        assert stage != "COLLSCAN", (command.get("filter"), command.get("sort"))
