"""Files and Jabber clients: XEP-0363 slots to send, out-of-band links to receive (slixmpp
over TLS, a web user over REST and Socket.IO, the real database)."""

from __future__ import annotations

import asyncio
import os
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from slixmpp import JID
from slixmpp.exceptions import IqError

from tests.harness import HubHarness
from tests.test_xmpp_history import mam
from tests.test_xmpp_muc import create_group, domain_of, join, muc_login, send_groupchat
from tests.xmpp_client import XmppClient, xmpp_login

UPLOAD = "urn:xmpp:http:upload:0"
OOB = "jabber:x:oob"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + os.urandom(2000)


async def request_slot(client: XmppClient, domain: str, name: str, size: int) -> tuple[str, str]:
    iq = client.make_iq_get(ito=domain)
    iq.append(ET.fromstring(f"<request xmlns='{UPLOAD}' filename='{name}' size='{size}'/>"))
    answer = await iq.send(timeout=10)  # type: ignore[no-untyped-call]
    slot = answer.xml.find(f"{{{UPLOAD}}}slot")
    assert slot is not None, str(answer)
    put = slot.find(f"{{{UPLOAD}}}put")
    get = slot.find(f"{{{UPLOAD}}}get")
    assert put is not None and get is not None
    return put.get("url", ""), get.get("url", "")


async def fetch(hub: HubHarness, url: str) -> tuple[int, bytes]:
    async with hub.http.get(url) as resp:  # no session: the link alone
        return resp.status, await resp.read()


def oob_urls(stanza: Any) -> list[str]:
    return [x.findtext(f"{{{OOB}}}url") or "" for x in stanza.xml.iter(f"{{{OOB}}}x")]


async def test_jabber_client_sends_a_file_with_a_slot(hub: HubHarness) -> None:
    hub.services.settings.public_url = hub.base_url
    hub.services.settings.file_max_bytes = 50_000
    _, alice_token = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    web = await hub.connect(bob)
    await web.wait_for("snapshot")
    alice = await xmpp_login(hub, "alice")
    domain = domain_of(hub)

    info = await alice.plugin["xep_0030"].get_info(jid=JID(domain), local=False, timeout=10)
    assert UPLOAD in info["disco_info"]["features"]
    values = [v.text for v in info.xml.iter("{jabber:x:data}value")]
    assert UPLOAD in values and "50000" in values

    with pytest.raises(IqError) as refused:
        await request_slot(alice, domain, "huge.bin", 50_001)
    assert refused.value.condition == "not-acceptable"

    put_url, get_url = await request_slot(alice, domain, "shot.png", len(PNG))
    assert put_url.startswith(hub.base_url) and get_url.startswith(hub.base_url)
    # Not sent yet: the link gives nothing.
    assert (await fetch(hub, get_url))[0] == 404
    # The wrong size is refused and uses the slot up.
    async with hub.http.put(put_url, data=PNG[:-1]) as resp:
        assert resp.status == 400
    put_url, get_url = await request_slot(alice, domain, "shot.png", len(PNG))
    async with hub.http.put(put_url, data=PNG) as resp:
        assert resp.status == 201
    async with hub.http.put(put_url, data=PNG) as resp:
        assert resp.status == 403  # one time only

    message = alice.make_message(mto=JID(f"bob@{domain}"), mbody=get_url, mtype="chat")
    message.xml.append(ET.fromstring(f"<x xmlns='{OOB}'><url>{get_url}</url></x>"))
    message.send()

    def arrived() -> list[dict[str, Any]]:
        return [e["data"]["message"] for e in web.of_type("im.message") if "data" in e]

    await web.wait_until(lambda: bool(arrived()))
    [got] = arrived()
    assert got["text"] == ""  # the link was the file, not text
    [ref] = got["files"]
    assert ref["name"] == "shot.png" and ref["image"] and ref["size"] == len(PNG)
    async with hub.http.get(
        f"{hub.base_url}/api/v1/files/{ref['id']}", headers={"Authorization": f"Bearer {bob}"}
    ) as resp:
        assert resp.status == 200 and await resp.read() == PNG
    assert await fetch(hub, get_url) == (200, PNG)
    # A tampered link is nothing.
    assert (await fetch(hub, get_url.replace("/shot.png", "x/shot.png")))[0] == 404
    # Slots left unused are limited (the used ones do not count).
    for n in range(10):
        await request_slot(alice, domain, f"spare{n}.bin", 10)
    with pytest.raises(IqError) as refused:
        await request_slot(alice, domain, "one-too-many.bin", 10)
    assert refused.value.condition == "resource-constraint"
    assert bob_id and alice_token


async def test_files_from_the_web_reach_jabber_as_links(hub: HubHarness) -> None:
    hub.services.settings.public_url = hub.base_url
    alice_id, alice_token = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    alice = await muc_login(hub, "alice")
    domain = domain_of(hub)

    async def upload(name: str) -> str:
        resp = await hub.request("POST", f"/api/v1/files?name={name}", token=bob, data=PNG)
        assert resp.status == 201, resp.body
        return str(resp.body["id"])

    # One to one: the body carries the link after the text, and an OOB element.
    resp = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=bob,
        json={"to": [alice_id], "text": "the plan", "file_ids": [await upload("plan.png")]},
    )
    assert resp.status == 201, resp.body
    await alice.wait_for_condition(lambda: any("the plan" in b for b in alice.bodies()))
    [stanza] = [m for m in alice.messages if "the plan" in str(m["body"])]
    [url] = oob_urls(stanza)
    assert str(stanza["body"]) == f"the plan\n{url}" and url.endswith("/plan.png")
    assert await fetch(hub, url) == (200, PNG)
    # The archive (MAM) gives the same link.
    assert await mam(alice, "<max>50</max>") == ([f"the plan\n{url}"], True)

    # A room: the same for every occupant.
    chat = await create_group(hub, bob, "Designs", [alice_id])
    room = JID(f"{chat['id']}@conference.{domain}")
    await join(alice, room, "alice")
    resp = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=bob,
        json={"chat_id": chat["id"], "file_ids": [await upload("mock.png")]},
    )
    assert resp.status == 201, resp.body

    def room_files() -> list[Any]:
        return [m for m in alice.messages if m["type"] == "groupchat" and oob_urls(m)]

    await alice.wait_for_condition(lambda: bool(room_files()))
    [in_room] = room_files()
    [url] = oob_urls(in_room)
    assert str(in_room["body"]) == url and url.endswith("/mock.png")
    assert await fetch(hub, url) == (200, PNG)

    # And a file sent into the room from Jabber becomes the room's file.
    put_url, get_url = await request_slot(alice, domain, "reply.png", len(PNG))
    async with hub.http.put(put_url, data=PNG) as put:
        assert put.status == 201
    send_groupchat(alice, room, f"mine {get_url}", "up-1")
    history: list[dict[str, Any]] = []
    for _ in range(100):
        history = (
            await hub.request("GET", f"/api/v1/im/chats/{chat['id']}/messages", token=bob)
        ).body
        if history[-1]["text"] == "mine":
            break
        await asyncio.sleep(0.1)
    assert history[-1]["text"] == "mine"  # the link taken out of the text
    assert [f["name"] for f in history[-1]["files"]] == ["reply.png"]
    assert alice_token and bob_id
