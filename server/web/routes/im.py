"""Messenger routes."""

from __future__ import annotations

from server.im.models import (
    ChatMembers,
    ChatOut,
    Counters,
    CreateChat,
    DialogOut,
    EditMessage,
    HistoryQuery,
    ImSettings,
    MessageOut,
    OpenDialog,
    ReadUpTo,
    RenameChat,
    SearchQuery,
    SendMessage,
    SendResult,
)
from server.services import services
from server.web.api import Call
from server.web.routes import api

TAG = "messenger"


@api.route(
    "POST",
    "/api/v1/im/messages",
    summary="Send a message",
    tag=TAG,
    body=SendMessage,
    response=SendResult,
    status=201,
    errors=(403, 404, 413, 429, 503),
)
async def send_message(call: Call) -> SendResult:
    """To a chat (`chat_id`), or as one private message to each of several users (`to`) or to
    every member of a department (`to_department`). A retry with the same `client_id` stores
    nothing new and answers with the message stored the first time (`duplicate: true`)."""
    assert call.user is not None
    return await services(call.request).im.send(call.user, call.body_as(SendMessage))


@api.route(
    "PATCH",
    "/api/v1/im/messages/{message_id}",
    summary="Edit one's own message",
    tag=TAG,
    body=EditMessage,
    response=MessageOut,
    errors=(403, 404, 413),
)
async def edit_message(call: Call) -> MessageOut:
    assert call.user is not None
    return await services(call.request).im.edit(
        call.user, call.path("message_id"), call.body_as(EditMessage).text
    )


@api.route(
    "DELETE",
    "/api/v1/im/messages/{message_id}",
    summary="Delete one's own message",
    tag=TAG,
    status=204,
    errors=(403, 404),
)
async def delete_message(call: Call) -> None:
    assert call.user is not None
    await services(call.request).im.delete(call.user, call.path("message_id"))


@api.route(
    "GET",
    "/api/v1/im/dialogs",
    summary="The caller's chats, newest activity first",
    tag=TAG,
    response=DialogOut,
    many=True,
)
async def list_dialogs(call: Call) -> list[DialogOut]:
    assert call.user is not None
    return await services(call.request).im.dialogs(call.user)


@api.route(
    "GET",
    "/api/v1/im/counters",
    summary="Unread messages, in total and per chat",
    tag=TAG,
    response=Counters,
)
async def get_counters(call: Call) -> Counters:
    return await services(call.request).im.counters(call.user_id)


@api.route(
    "POST",
    "/api/v1/im/dialogs",
    summary="Open (or find) the private dialog with a user",
    tag=TAG,
    body=OpenDialog,
    response=ChatOut,
    errors=(422,),
)
async def open_dialog(call: Call) -> ChatOut:
    assert call.user is not None
    im = services(call.request).im
    chat = await im.open_private(call.user, call.body_as(OpenDialog).user_id)
    return await im.chat_out(chat, call.user_id)


@api.route(
    "POST",
    "/api/v1/im/chats",
    summary="Create a group chat",
    tag=TAG,
    body=CreateChat,
    response=ChatOut,
    status=201,
    errors=(422,),
)
async def create_chat(call: Call) -> ChatOut:
    assert call.user is not None
    body = call.body_as(CreateChat)
    im = services(call.request).im
    chat = await im.create_group(call.user, body.title, body.member_ids)
    return await im.chat_out(chat, call.user_id)


@api.route(
    "GET",
    "/api/v1/im/chats/{chat_id}",
    summary="One chat",
    tag=TAG,
    response=ChatOut,
    errors=(404,),
)
async def get_chat(call: Call) -> ChatOut:
    im = services(call.request).im
    chat = await im.readable_chat(call.user_id, call.path("chat_id"))
    return await im.chat_out(chat, call.user_id)


@api.route(
    "PATCH",
    "/api/v1/im/chats/{chat_id}",
    summary="Rename a group chat (owner)",
    tag=TAG,
    body=RenameChat,
    response=ChatOut,
    errors=(403, 404),
)
async def rename_chat(call: Call) -> ChatOut:
    """Tells the members with `im.chat.updated` on the chat's stream. The owner (or an
    administrator) renames a group chat; a workgroup's chat and private dialogs are `403`."""
    assert call.user is not None
    return await services(call.request).im.rename_group(
        call.user, call.path("chat_id"), call.body_as(RenameChat).title
    )


@api.route(
    "GET",
    "/api/v1/im/chats/{chat_id}/messages",
    summary="History, in pages",
    tag=TAG,
    query=HistoryQuery,
    response=MessageOut,
    many=True,
    errors=(404,),
)
async def chat_history(call: Call) -> list[MessageOut]:
    """Oldest first. Without `after`, the newest `limit` messages (older than `before`, if
    given); page back by passing the first message's id as `before`. `day` limits to one
    (UTC) day: today's conversation is `day=<today>`."""
    assert call.user is not None
    return await services(call.request).im.history(
        call.user, call.path("chat_id"), call.query_as(HistoryQuery)
    )


@api.route(
    "POST",
    "/api/v1/im/chats/{chat_id}/read",
    summary="Mark read up to a message",
    tag=TAG,
    body=ReadUpTo,
    response=Counters,
    errors=(404, 422),
)
async def mark_read(call: Call) -> Counters:
    """Pushes `counters.changed` to all the caller's devices and `im.read` to the chat."""
    assert call.user is not None
    return await services(call.request).im.mark_read(
        call.user, call.path("chat_id"), call.body_as(ReadUpTo).up_to
    )


@api.route(
    "POST",
    "/api/v1/im/chats/{chat_id}/members",
    summary="Add members (owner)",
    tag=TAG,
    body=ChatMembers,
    response=ChatOut,
    errors=(403, 404, 422),
)
async def add_chat_members(call: Call) -> ChatOut:
    assert call.user is not None
    return await services(call.request).im.add_members(
        call.user, call.path("chat_id"), call.body_as(ChatMembers).user_ids
    )


@api.route(
    "DELETE",
    "/api/v1/im/chats/{chat_id}/members/{user_id}",
    summary="Remove a member (owner), or leave (oneself)",
    tag=TAG,
    status=204,
    errors=(403, 404),
)
async def remove_chat_member(call: Call) -> None:
    assert call.user is not None
    await services(call.request).im.remove_member(
        call.user, call.path("chat_id"), call.path("user_id")
    )


@api.route(
    "GET",
    "/api/v1/im/search",
    summary="Search one's own message history",
    tag=TAG,
    query=SearchQuery,
    response=MessageOut,
    many=True,
)
async def search_messages(call: Call) -> list[MessageOut]:
    assert call.user is not None
    query = call.query_as(SearchQuery)
    return await services(call.request).im.search(call.user, query.q, query.limit)


@api.route("GET", "/api/v1/im/settings", summary="Messenger settings", tag=TAG, response=ImSettings)
async def get_im_settings(call: Call) -> ImSettings:
    return await services(call.request).im.get_settings(call.user_id)


@api.route(
    "PUT",
    "/api/v1/im/settings",
    summary="Change messenger settings",
    tag=TAG,
    body=ImSettings,
    response=ImSettings,
)
async def put_im_settings(call: Call) -> ImSettings:
    """Published as `im.settings` on the user's stream, so every device follows."""
    return await services(call.request).im.put_settings(call.user_id, call.body_as(ImSettings))
