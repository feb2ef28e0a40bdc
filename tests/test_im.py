"""The messenger over real HTTP and real Socket.IO clients, on the real database."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from server.events.models import EphemeralEvent, VersionedState
from server.im.rules import private_pair_key
from server.im.service import ANNOUNCE_GRACE_SECONDS
from server.store.database import new_id, utcnow
from tests.harness import HubHarness, SocketClient


async def send(hub: HubHarness, token: str, **body: Any) -> dict[str, Any]:
    resp = await hub.request("POST", "/api/v1/im/messages", token=token, json=body)
    assert resp.status == 201, resp.body
    result: dict[str, Any] = resp.body
    return result


def texts(client: SocketClient, event: str = "im.message") -> list[str]:
    return [e["data"]["message"]["text"] for e in client.of_type(event) if "data" in e]


async def open_dialog(hub: HubHarness, token: str, other_id: str) -> dict[str, Any]:
    resp = await hub.request("POST", "/api/v1/im/dialogs", token=token, json={"user_id": other_id})
    assert resp.status == 200, resp.body
    chat: dict[str, Any] = resp.body
    return chat


async def test_message_reaches_every_device_of_both_users(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice", first_name="Alice")
    bob_id, bob = await hub.create_user("bob", first_name="Bob")
    alice_phone, alice_laptop = await hub.connect(alice), await hub.connect(alice)
    bob_phone, bob_laptop = await hub.connect(bob), await hub.connect(bob)
    for client in (alice_phone, alice_laptop, bob_phone, bob_laptop):
        await client.wait_for("snapshot")

    result = await send(hub, alice, to=[bob_id], text="hello bob")
    [message] = result["messages"]
    assert message["author_id"] == alice_id
    for client in (alice_phone, alice_laptop, bob_phone, bob_laptop):
        await client.wait_until(lambda c=client: texts(c) == ["hello bob"])  # type: ignore[misc]
    # the new dialog reached bob through his personal stream first
    [joined] = bob_phone.of_type("im.chat.joined")
    assert joined["stream"] == f"user:{bob_id}"
    assert joined["data"]["chat"]["title"] == "Alice"
    assert joined["data"]["join_stream"] == f"chat:{message['chat_id']}"

    # replying in the same dialog: one chat, both directions
    await send(hub, bob, chat_id=message["chat_id"], text="hi alice")
    await alice_laptop.wait_until(lambda: texts(alice_laptop) == ["hello bob", "hi alice"])
    dialogs = (await hub.request("GET", "/api/v1/im/dialogs", token=alice)).body
    assert [d["chat"]["id"] for d in dialogs] == [message["chat_id"]]
    assert dialogs[0]["chat"]["title"] == "Bob" and dialogs[0]["unread"] == 1


async def test_offline_user_gets_message_exactly_once_on_reconnect(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    bob_client = await hub.connect(bob)
    [snapshot] = await bob_client.wait_for("snapshot")
    positions = dict(snapshot["streams"])
    await bob_client.close()

    await send(hub, alice, to=[bob_id], text="while you were away")
    await send(hub, alice, to=[bob_id], text="and again")

    back = await hub.connect(bob, since=positions)
    await back.wait_until(lambda: len(texts(back)) == 2)
    await send(hub, alice, to=[bob_id], text="live now")
    await back.wait_until(lambda: len(texts(back)) == 3)
    await asyncio.sleep(0.2)
    assert texts(back) == ["while you were away", "and again", "live now"]
    # the chat was joined while away: its stream was replayed from the join
    assert len(back.of_type("im.chat.joined")) == 1


async def test_same_client_id_stores_one_message(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    first = await send(hub, alice, to=[bob_id], text="once", client_id="c-1")
    again = await send(hub, alice, to=[bob_id], text="once", client_id="c-1")
    assert first["duplicate"] is False and again["duplicate"] is True
    assert first["messages"][0]["id"] == again["messages"][0]["id"]
    chat_id = first["messages"][0]["chat_id"]
    history = await hub.request("GET", f"/api/v1/im/chats/{chat_id}/messages", token=alice)
    assert [m["text"] for m in history.body] == ["once"]
    assert await hub.services.store["messages"].count_documents({"chat_id": chat_id}) == 1


async def test_concurrent_retries_with_one_client_id_store_one(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    chat = await open_dialog(hub, alice, bob_id)
    results = await asyncio.gather(
        *(
            hub.request(
                "POST",
                "/api/v1/im/messages",
                token=alice,
                json={"chat_id": chat["id"], "text": "x", "client_id": "same"},
            )
            for _ in range(5)
        )
    )
    assert {r.status for r in results} == {201}
    assert len({r.body["messages"][0]["id"] for r in results}) == 1
    assert await hub.services.store["messages"].count_documents({"chat_id": chat["id"]}) == 1
    # the retries racing the first attempt waited for its event rather than adding theirs
    events = hub.services.store.events
    assert await events.count_documents({"type": "im.message", "stream": f"chat:{chat['id']}"}) == 1


async def test_multi_recipient_send_is_one_private_message_each(hub: HubHarness) -> None:
    _, admin = await hub.create_user("root", admin=True)
    dept = await hub.request("POST", "/api/v1/departments", token=admin, json={"name": "Sales"})
    sub = await hub.request(
        "POST",
        "/api/v1/departments",
        token=admin,
        json={"name": "Sales EU", "parent_id": dept.body["id"]},
    )
    boss_id, boss = await hub.create_user("boss", department_id=dept.body["id"])
    ids = [(await hub.create_user(f"rep{n}", department_id=sub.body["id"]))[0] for n in range(3)]
    outsider_id, _ = await hub.create_user("outsider")

    to_list = await send(hub, boss, to=[ids[0], ids[1], ids[1], boss_id], text="memo")
    assert [m["text"] for m in to_list["messages"]] == ["memo", "memo"]
    assert len({m["chat_id"] for m in to_list["messages"]}) == 2

    to_dept = await send(hub, boss, to_department=dept.body["id"], text="all hands")
    chats = {m["chat_id"] for m in to_dept["messages"]}
    assert len(to_dept["messages"]) == 3 == len(chats)  # subdepartment included, sender not
    for chat_id in chats:
        chat = (await hub.request("GET", f"/api/v1/im/chats/{chat_id}", token=boss)).body
        assert chat["kind"] == "private" and boss_id in chat["member_ids"]
        assert outsider_id not in chat["member_ids"]


async def test_reading_on_one_device_clears_unread_on_the_other(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    tab1, tab2 = await hub.connect(bob), await hub.connect(bob)
    await tab1.wait_for("snapshot")
    await tab2.wait_for("snapshot")
    sent = await send(hub, alice, to=[bob_id], text="one")
    await send(hub, alice, to=[bob_id], text="two")
    chat_id = sent["messages"][0]["chat_id"]
    counters = (await hub.request("GET", "/api/v1/im/counters", token=bob)).body
    assert counters == {"unread": 2, "chats": {chat_id: 2}}
    await tab2.wait_until(lambda: len(texts(tab2)) == 2)
    newest = tab2.of_type("im.message")[-1]["data"]["message"]["id"]

    resp = await hub.request(
        "POST", f"/api/v1/im/chats/{chat_id}/read", token=bob, json={"up_to": newest}
    )
    assert resp.status == 200 and resp.body == {"unread": 0, "chats": {}}
    for tab in (tab1, tab2):
        await tab.wait_until(
            lambda t=tab: (
                {"im": {"unread": 0, "chats": {}}}  # type: ignore[misc]
                in t.of_type("counters.changed")
            )
        )
    # a reconnecting device gets the cleared counter in its snapshot
    tab3 = await hub.connect(bob)
    [snapshot] = await tab3.wait_for("snapshot")
    assert snapshot["counters"]["im"] == {"unread": 0, "chats": {}}


async def test_edit_and_delete_propagate_and_only_the_author_may(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")
    message = (await send(hub, alice, to=[bob_id], text="draft"))["messages"][0]

    stolen = await hub.request(
        "PATCH", f"/api/v1/im/messages/{message['id']}", token=bob, json={"text": "mine"}
    )
    assert stolen.status == 403
    edited = await hub.request(
        "PATCH", f"/api/v1/im/messages/{message['id']}", token=alice, json={"text": "final"}
    )
    assert edited.status == 200 and edited.body["edited_at"] is not None
    await bob_client.wait_until(lambda: texts(bob_client, "im.message.updated") == ["final"])

    assert (
        await hub.request("DELETE", f"/api/v1/im/messages/{message['id']}", token=bob)
    ).status == 403
    deleted = await hub.request("DELETE", f"/api/v1/im/messages/{message['id']}", token=alice)
    assert deleted.status == 204
    await bob_client.wait_until(lambda: len(bob_client.of_type("im.message.deleted")) == 1)
    gone = bob_client.of_type("im.message.deleted")[0]["data"]["message"]
    assert gone["deleted"] is True and gone["text"] == ""
    history = await hub.request("GET", f"/api/v1/im/chats/{message['chat_id']}/messages", token=bob)
    assert [(m["text"], m["deleted"]) for m in history.body] == [("", True)]
    # a deleted message is no longer unread
    assert (await hub.request("GET", "/api/v1/im/counters", token=bob)).body["unread"] == 0


async def test_outsider_cannot_read_or_receive_a_group_chat(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    eve_id, eve = await hub.create_user("eve")
    created = await hub.request(
        "POST", "/api/v1/im/chats", token=alice, json={"title": "Plans", "member_ids": [bob_id]}
    )
    assert created.status == 201
    chat = created.body
    eve_client = await hub.connect(eve, since={chat["stream"]: 0})
    [refusal] = await eve_client.wait_for("subscribe_error")
    assert refusal == {"stream": chat["stream"], "code": "forbidden"}
    assert (await eve_client.call("subscribe", {"stream": chat["stream"]}))["ok"] is False
    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")

    await send(hub, alice, chat_id=chat["id"], text="secret plan")
    await bob_client.wait_until(lambda: texts(bob_client) == ["secret plan"])
    assert await eve_client.call("im.typing", {"chat_id": chat["id"]}) == {
        "ok": False,
        "error": "forbidden",
    }
    await asyncio.sleep(0.2)
    assert not any("secret" in repr(data) for _n, data in eve_client.events)

    for method, path, body in (
        ("GET", f"/api/v1/im/chats/{chat['id']}", None),
        ("GET", f"/api/v1/im/chats/{chat['id']}/messages", None),
        ("POST", "/api/v1/im/messages", {"chat_id": chat["id"], "text": "let me in"}),
        ("POST", f"/api/v1/im/chats/{chat['id']}/members", {"user_ids": [eve_id]}),
    ):
        resp = await hub.request(method, path, token=eve, json=body)
        assert resp.status == 404, (path, resp.body)
    found = await hub.request("GET", "/api/v1/im/search?q=secret", token=eve)
    assert found.body == []
    assert [
        m["text"] for m in (await hub.request("GET", "/api/v1/im/search?q=SECRET", token=bob)).body
    ] == ["secret plan"]

    # once added, eve's live connection joins the chat and gets its new messages
    added = await hub.request(
        "POST", f"/api/v1/im/chats/{chat['id']}/members", token=alice, json={"user_ids": [eve_id]}
    )
    assert added.status == 200 and eve_id in added.body["member_ids"]
    await send(hub, alice, chat_id=chat["id"], text="welcome eve")
    await eve_client.wait_until(lambda: texts(eve_client) == ["welcome eve"])
    # and after leaving, she gets nothing more
    left = await hub.request("DELETE", f"/api/v1/im/chats/{chat['id']}/members/{eve_id}", token=eve)
    assert left.status == 204
    await eve_client.wait_until(lambda: len(eve_client.of_type("im.chat.left")) == 1)
    await send(hub, alice, chat_id=chat["id"], text="after eve left")
    await bob_client.wait_until(lambda: "after eve left" in texts(bob_client))
    await asyncio.sleep(0.2)
    assert "after eve left" not in texts(eve_client)
    assert alice_id != eve_id


async def test_typing_is_live_and_never_stored(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    chat = await open_dialog(hub, alice, bob_id)
    bob_client = await hub.connect(bob)
    alice_client = await hub.connect(alice)
    await bob_client.wait_for("snapshot")
    await alice_client.wait_for("snapshot")
    assert await alice_client.call("im.typing", {"chat_id": chat["id"]}) == {"ok": True}
    [typing] = await bob_client.wait_for("im.typing")
    assert typing["chat_id"] == chat["id"]
    assert await hub.services.store.events.count_documents({"type": "im.typing"}) == 0


async def test_limits_reject_cleanly(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    chat = await open_dialog(hub, alice, bob_id)
    too_long = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=alice,
        json={"chat_id": chat["id"], "text": "x" * 10_001},
    )
    assert too_long.status == 413
    assert too_long.body["type"] == "urn:portalhub:problem:message-too-long"
    both = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=alice,
        json={"chat_id": chat["id"], "to": [bob_id], "text": "x"},
    )
    assert both.status == 422
    statuses = []
    for n in range(40):
        resp = await hub.request(
            "POST", "/api/v1/im/messages", token=alice, json={"chat_id": chat["id"], "text": f"{n}"}
        )
        statuses.append(resp.status)
    assert 429 in statuses
    accepted = statuses.count(201)
    # nothing half-stored: exactly the accepted messages exist
    assert await hub.services.store["messages"].count_documents({"chat_id": chat["id"]}) == accepted


async def test_system_notice_and_workgroup_chat(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    alice_client = await hub.connect(alice)
    await alice_client.wait_for("snapshot")
    notice = await hub.services.im.post_system_notice(alice_id, "You were assigned a task")
    assert notice.author_id is None and notice.system
    await alice_client.wait_until(lambda: texts(alice_client) == ["You were assigned a task"])
    dialogs = (await hub.request("GET", "/api/v1/im/dialogs", token=alice)).body
    assert dialogs[0]["chat"]["kind"] == "system" and dialogs[0]["unread"] == 1
    reply = await hub.request(
        "POST",
        "/api/v1/im/messages",
        token=alice,
        json={"chat_id": notice.chat_id, "text": "ok"},
    )
    assert reply.status == 403

    group = await hub.request(
        "POST", "/api/v1/workgroups", token=alice, json={"name": "Relaunch", "member_ids": [bob_id]}
    )
    assert group.status == 201
    dialogs = (await hub.request("GET", "/api/v1/im/dialogs", token=bob)).body
    [wg_chat] = [d["chat"] for d in dialogs if d["chat"]["workgroup_id"] == group.body["id"]]
    assert wg_chat["title"] == "Relaunch" and set(wg_chat["member_ids"]) == {alice_id, bob_id}


async def test_history_pages_and_today(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    chat = await open_dialog(hub, alice, bob_id)
    for n in range(7):
        await send(hub, alice, chat_id=chat["id"], text=f"m{n}")
    path = f"/api/v1/im/chats/{chat['id']}/messages"
    last = (await hub.request("GET", f"{path}?limit=3", token=alice)).body
    assert [m["text"] for m in last] == ["m4", "m5", "m6"]
    older = (await hub.request("GET", f"{path}?limit=3&before={last[0]['id']}", token=alice)).body
    assert [m["text"] for m in older] == ["m1", "m2", "m3"]
    newer = (await hub.request("GET", f"{path}?after={older[-1]['id']}", token=alice)).body
    assert [m["text"] for m in newer] == ["m4", "m5", "m6"]
    today = last[0]["created_at"][:10]
    assert len((await hub.request("GET", f"{path}?day={today}", token=alice)).body) == 7
    assert (await hub.request("GET", f"{path}?day=2001-01-01", token=alice)).body == []


async def test_multi_recipient_send_is_all_or_nothing(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    gone_id, _ = await hub.create_user("gone")
    await hub.services.store.users.update_one({"_id": gone_id}, {"$set": {"is_active": False}})
    resp = await hub.request(
        "POST", "/api/v1/im/messages", token=alice, json={"to": [bob_id, gone_id], "text": "hi"}
    )
    assert resp.status == 422
    assert resp.body["type"] == "urn:portalhub:problem:invalid-recipient"
    assert await hub.services.store["messages"].count_documents({}) == 0


async def test_edit_to_blank_is_refused(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, _ = await hub.create_user("bob")
    message = (await send(hub, alice, to=[bob_id], text="words"))["messages"][0]
    resp = await hub.request(
        "PATCH", f"/api/v1/im/messages/{message['id']}", token=alice, json={"text": "   "}
    )
    assert resp.status == 422


async def test_deleting_an_unread_message_corrects_the_badge(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")
    await send(hub, alice, to=[bob_id], text="keep")
    message = (await send(hub, alice, to=[bob_id], text="oops"))["messages"][0]
    deleted = await hub.request("DELETE", f"/api/v1/im/messages/{message['id']}", token=alice)
    assert deleted.status == 204
    expected = {"im": {"unread": 1, "chats": {message["chat_id"]: 1}}}
    await bob_client.wait_until(lambda: expected in bob_client.of_type("counters.changed"))


async def test_writing_in_a_chat_clears_its_badge_on_the_authors_other_devices(
    hub: HubHarness,
) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    other_device = await hub.connect(bob)
    await other_device.wait_for("snapshot")
    incoming = (await send(hub, alice, to=[bob_id], text="question?"))["messages"][0]
    await send(hub, bob, chat_id=incoming["chat_id"], text="answer")
    await other_device.wait_until(
        lambda: {"im": {"unread": 0, "chats": {}}} in other_device.of_type("counters.changed")
    )


async def test_an_owner_who_leaves_hands_the_chat_on(hub: HubHarness) -> None:
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    created = await hub.request(
        "POST", "/api/v1/im/chats", token=alice, json={"title": "Team", "member_ids": [bob_id]}
    )
    chat_id = created.body["id"]
    left = await hub.request(
        "DELETE", f"/api/v1/im/chats/{chat_id}/members/{alice_id}", token=alice
    )
    assert left.status == 204
    chat = (await hub.request("GET", f"/api/v1/im/chats/{chat_id}", token=bob)).body
    assert chat["owner_id"] == bob_id and chat["member_ids"] == [bob_id]


async def test_a_retry_announces_what_a_dead_node_stored_but_never_announced(
    hub: HubHarness,
) -> None:
    """The first attempt's node stored the message and died before its event: the retry
    (same client_id, any node) finds the message and announces it, once."""
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    chat = await open_dialog(hub, alice, bob_id)
    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")
    await hub.services.store["messages"].insert_one(  # what the dead node left
        {
            "_id": new_id(),
            "chat_id": chat["id"],
            "n": 1,  # its number in the chat was taken
            "author_id": alice_id,
            "text": "stored, never told",
            # older than the grace a retry gives a first attempt still under way
            "created_at": utcnow() - timedelta(seconds=ANNOUNCE_GRACE_SECONDS + 1),
            "edited_at": None,
            "deleted": False,
            "system": False,
            "client_id": "c-9",
            "dedup_key": f"{alice_id}|{chat['id']}|c-9",
        }
    )
    retried = await send(hub, alice, chat_id=chat["id"], text="stored, never told", client_id="c-9")
    assert retried["duplicate"] is True
    await bob_client.wait_until(lambda: texts(bob_client) == ["stored, never told"])
    again = await send(hub, alice, chat_id=chat["id"], text="stored, never told", client_id="c-9")
    assert again["messages"][0]["id"] == retried["messages"][0]["id"]
    await asyncio.sleep(0.2)
    assert texts(bob_client) == ["stored, never told"]
    events = hub.services.store.events
    assert await events.count_documents({"type": "im.message", "stream": f"chat:{chat['id']}"}) == 1


async def test_a_dialog_left_without_members_gets_them_from_its_next_message(
    hub: HubHarness,
) -> None:
    """Its creator stored the dialog and died before adding the two (or is still adding them
    while the other's first message crosses): whoever finds it adds them, from its start."""
    alice_id, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")
    chat_id = new_id()
    await hub.services.store["chats"].insert_one(
        {
            "_id": chat_id,
            "kind": "private",
            "title": "",
            "member_ids": [],
            "owner_id": None,
            "workgroup_id": None,
            "created_at": utcnow(),
            "last_message": None,
            "last_message_at": None,
            "pair_key": private_pair_key(alice_id, bob_id),
        }
    )
    sent = await send(hub, alice, to=[bob_id], text="first")
    assert sent["messages"][0]["chat_id"] == chat_id
    await bob_client.wait_until(lambda: texts(bob_client) == ["first"])
    [joined] = bob_client.of_type("im.chat.joined")
    assert joined["data"]["from_seq"] == 0


async def test_of_two_unread_pushes_the_later_count_stays(hub: HubHarness) -> None:
    """Two pushes counted at once (a read mark, a new message) may be published in either
    order; a connection keeps the one counted last."""
    bob_id, bob = await hub.create_user("bob")
    client = await hub.connect(bob)
    await client.wait_for("snapshot")
    await client.wait_for("counters.changed")  # the session's own, once caught up
    im = hub.services.im
    # Two counts of their own (a user's count is otherwise kept for the next connect while
    # nothing it is made of moves, and the second would be the first again).
    im._counted.clear()
    first = await im.counters_state(bob_id)
    im._counted.clear()
    second = await im.counters_state(bob_id)
    assert second.version > first.version
    second = VersionedState("im", second.version, {"unread": 2, "chats": {"c": 2}}, whole=True)
    for state in (second, first):  # the later count published first
        await hub.services.bus.publish_ephemeral(
            EphemeralEvent(
                "counters.changed",
                {"im": state.values},
                (f"user:{bob_id}",),
                private=state.as_private(),
            )
        )
    await client.wait_until(lambda: {"im": second.values} in client.of_type("counters.changed"))
    await asyncio.sleep(0.2)
    pushes = [c["im"] for c in client.of_type("counters.changed") if "im" in c]
    assert pushes[-1] == second.values


async def test_the_owner_renames_a_group_chat_and_its_members_are_told(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    _, eve = await hub.create_user("eve")
    created = await hub.request(
        "POST", "/api/v1/im/chats", token=alice, json={"title": "Plans", "member_ids": [bob_id]}
    )
    chat = created.body
    bob_client = await hub.connect(bob)
    await bob_client.wait_for("snapshot")
    url = f"/api/v1/im/chats/{chat['id']}"
    # a member who is not the owner may not; an outsider cannot tell the chat exists
    assert (await hub.request("PATCH", url, token=bob, json={"title": "Mine"})).status == 403
    assert (await hub.request("PATCH", url, token=eve, json={"title": "Mine"})).status == 404
    blank = await hub.request("PATCH", url, token=alice, json={"title": "  "})
    assert blank.status == 422
    renamed = await hub.request("PATCH", url, token=alice, json={"title": " Q3 plans "})
    assert renamed.status == 200, renamed.body
    assert renamed.body["title"] == "Q3 plans"
    [event] = await bob_client.wait_for("im.chat.updated")
    assert event["stream"] == chat["stream"]
    assert event["data"] == {"chat_id": chat["id"], "title": "Q3 plans"}
    got = await hub.request("GET", url, token=bob)
    assert got.body["title"] == "Q3 plans"
    # the same name again is no change and tells nobody
    assert (await hub.request("PATCH", url, token=alice, json={"title": "Q3 plans"})).status == 200
    await asyncio.sleep(0.2)
    assert len(bob_client.of_type("im.chat.updated")) == 1
    # a private dialog has no name to change
    dialog = await open_dialog(hub, alice, bob_id)
    private = await hub.request(
        "PATCH", f"/api/v1/im/chats/{dialog['id']}", token=alice, json={"title": "x"}
    )
    assert private.status == 403


async def test_the_send_key_setting_is_kept_and_checked(hub: HubHarness) -> None:
    _, alice = await hub.create_user("alice")
    got = await hub.request("GET", "/api/v1/im/settings", token=alice)
    assert got.body == {"sound": True, "send_key": "enter"}
    put = await hub.request(
        "PUT", "/api/v1/im/settings", token=alice, json={"sound": True, "send_key": "ctrl_enter"}
    )
    assert put.status == 200 and put.body["send_key"] == "ctrl_enter"
    assert (await hub.request("GET", "/api/v1/im/settings", token=alice)).body["send_key"] == (
        "ctrl_enter"
    )
    bad = await hub.request(
        "PUT", "/api/v1/im/settings", token=alice, json={"sound": True, "send_key": "alt"}
    )
    assert bad.status == 422


async def test_a_private_dialog_says_how_far_the_other_side_has_read(hub: HubHarness) -> None:
    """The "seen" mark: the other person's read position in a private dialog, live (im.read)
    and in the dialog list after a reload; a group chat shows no one's read mark."""
    _, alice = await hub.create_user("alice")
    bob_id, bob = await hub.create_user("bob")
    alice_tab = await hub.connect(alice)
    await alice_tab.wait_for("snapshot")
    first = (await send(hub, alice, to=[bob_id], text="one"))["messages"][0]
    second = (await send(hub, alice, to=[bob_id], text="two"))["messages"][0]
    chat_id = first["chat_id"]

    def peer_read(token_dialogs: list[dict[str, Any]], chat: str) -> Any:
        [dialog] = [d for d in token_dialogs if d["chat"]["id"] == chat]
        return dialog["peer_last_read_id"]

    dialogs = (await hub.request("GET", "/api/v1/im/dialogs", token=alice)).body
    assert peer_read(dialogs, chat_id) is None  # not read yet
    resp = await hub.request(
        "POST", f"/api/v1/im/chats/{chat_id}/read", token=bob, json={"up_to": first["id"]}
    )
    assert resp.status == 200
    await alice_tab.wait_until(
        lambda: any(
            e == {"chat_id": chat_id, "user_id": bob_id, "up_to": first["id"]}
            for e in alice_tab.of_type("im.read")
        )
    )
    dialogs = (await hub.request("GET", "/api/v1/im/dialogs", token=alice)).body
    assert peer_read(dialogs, chat_id) == first["id"]
    # Bob's own list carries Alice's mark (sending reads up to one's own message), not his
    bob_dialogs = (await hub.request("GET", "/api/v1/im/dialogs", token=bob)).body
    assert peer_read(bob_dialogs, chat_id) == second["id"]
    await hub.request(
        "POST", f"/api/v1/im/chats/{chat_id}/read", token=bob, json={"up_to": second["id"]}
    )
    dialogs = (await hub.request("GET", "/api/v1/im/dialogs", token=alice)).body
    assert peer_read(dialogs, chat_id) == second["id"]

    group = await hub.request(
        "POST", "/api/v1/im/chats", token=alice, json={"title": "Team", "member_ids": [bob_id]}
    )
    assert group.status == 201, group.body
    said = await send(hub, alice, chat_id=group.body["id"], text="hello team")
    await hub.request(
        "POST",
        f"/api/v1/im/chats/{group.body['id']}/read",
        token=bob,
        json={"up_to": said["messages"][0]["id"]},
    )
    dialogs = (await hub.request("GET", "/api/v1/im/dialogs", token=alice)).body
    assert peer_read(dialogs, group.body["id"]) is None


def test_origin_keys_name_a_message_by_its_authors_client_ids_only() -> None:
    from server.im.rules import origin_key, origin_keys

    keys = origin_keys("alice", "chat1", "s1", "o1")
    assert keys == [
        origin_key("alice", "chat1", "id", "s1"),
        origin_key("alice", "chat1", "origin_id", "o1"),
    ]
    # another author, chat or kind of id is another key: bob's "s1" is not alice's
    assert origin_key("bob", "chat1", "id", "s1") not in keys
    assert origin_key("alice", "chat2", "id", "s1") not in keys
    assert origin_key("alice", "chat1", "origin_id", "s1") not in keys
    # nothing to find a web message or a system message by: no entry in the sparse index
    assert origin_keys("alice", "chat1", None, None) == []
    assert origin_keys(None, "chat1", "s1", None) == []
