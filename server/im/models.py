"""Messenger shapes at the API boundary."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from server.files.models import FileRef
from server.text import NAME_TEXT, XML_TEXT

ClientId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
]
Title = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), NAME_TEXT
]
# The message length limit is a setting (ImService checks it), not part of the shape.
MessageText = Annotated[str, StringConstraints(min_length=1), XML_TEXT]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MessageOrigin(BaseModel):
    """What a Jabber client sent with a message besides its text: its stanza id and XEP-0359
    origin-id, the conversation thread, a subject, a receipt request (XEP-0184), a room
    invitation (XEP-0249). Every copy of the message (to the recipient, room reflections,
    carbons, the archive) carries them back, so clients can match their own messages."""

    id: str | None = None
    origin_id: str | None = None
    thread: str | None = None
    thread_parent: str | None = None
    subject: str | None = None
    receipt: bool = False
    invite: dict[str, str] | None = None
    resource: str | None = None  # the recipient's resource it was addressed to (a full JID)


class MessageOut(BaseModel):
    id: str
    chat_id: str
    n: int = Field(
        default=0,
        description="The message's place in its chat: 1, 2, 3... without gaps, in the order "
        "the messages were stored (their events' order on the chat's stream)",
    )
    author_id: str | None = Field(description="null for notices posted by the portal itself")
    text: str
    created_at: datetime
    edited_at: datetime | None
    deleted: bool
    system: bool
    client_id: str | None
    origin: MessageOrigin | None = Field(
        default=None, description="For messages written over XMPP: the Jabber client's own ids"
    )
    files: list[FileRef] = Field(
        default_factory=list,
        description="Files sent with the message (download: GET /api/v1/files/{id}); "
        "empty once the message is deleted",
    )

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> MessageOut:
        return cls(
            id=str(doc["_id"]),
            chat_id=doc["chat_id"],
            n=int(doc.get("n", 0)),
            author_id=doc.get("author_id"),
            text="" if doc.get("deleted") else doc["text"],
            created_at=doc["created_at"],
            edited_at=doc.get("edited_at"),
            deleted=bool(doc.get("deleted")),
            system=bool(doc.get("system")),
            client_id=doc.get("client_id"),
            origin=doc.get("origin"),
            files=[] if doc.get("deleted") else doc.get("files") or [],
        )


class ChatOut(BaseModel):
    id: str
    kind: Literal["private", "group", "system"]
    title: str
    member_ids: list[str]
    owner_id: str | None
    workgroup_id: str | None
    stream: str = Field(description="The Socket.IO stream carrying this chat's events")
    created_at: datetime
    last_message: MessageOut | None


class DialogOut(BaseModel):
    chat: ChatOut
    unread: int
    last_read_id: str | None
    read_n: int = Field(description="The `n` of the newest message read (0: none)")
    peer_last_read_id: str | None = Field(
        default=None,
        description="Private dialogs: how far the other person has read (shown as seen); "
        "null for group chats, whose members' read marks are not shown",
    )


class SendMessage(Strict):
    """Exactly one of ``chat_id``, ``to`` (user ids) or ``to_department``."""

    chat_id: str | None = None
    to: list[str] | None = Field(default=None, min_length=1, max_length=500)
    to_department: str | None = Field(
        default=None, description="Send to every member of the department and its subdepartments"
    )
    text: Annotated[str, XML_TEXT] = Field(
        default="", description="May be empty when files are sent (their caption)"
    )
    client_id: ClientId | None = Field(
        default=None, description="Client-chosen id: a retry with the same id stores nothing new"
    )
    file_ids: list[Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{24}$")]] = Field(
        default_factory=list,
        max_length=100,
        description="Files uploaded by the sender (POST /api/v1/files) to send with the "
        "message, to one chat (`chat_id`, or `to` with one user); at most "
        "PORTALHUB_FILE_MAX_PER_MESSAGE",
    )

    @model_validator(mode="after")
    def _one_target(self) -> SendMessage:
        targets = [t for t in (self.chat_id, self.to, self.to_department) if t]
        if len(targets) != 1:
            raise ValueError("give exactly one of chat_id, to, to_department")
        if not self.text.strip() and not self.file_ids:
            raise ValueError("text must not be blank")
        if self.file_ids and self.chat_id is None and len(self.to or []) != 1:
            raise ValueError("files are sent to one chat: give chat_id or one user in to")
        return self


class SendResult(BaseModel):
    messages: list[MessageOut]
    duplicate: bool = Field(description="true when client_id matched an earlier send")


class EditMessage(Strict):
    text: MessageText


class CreateChat(Strict):
    title: Title
    member_ids: list[str] = Field(default_factory=list, max_length=5000)


class RenameChat(Strict):
    title: Title


class OpenDialog(Strict):
    user_id: str


class ChatMembers(Strict):
    user_ids: list[str] = Field(min_length=1, max_length=5000)


class ReadUpTo(Strict):
    up_to: str = Field(description="Id of the newest message read")


class HistoryQuery(Strict):
    before: str | None = Field(default=None, description="Messages older than this message id")
    after: str | None = Field(default=None, description="Messages newer than this message id")
    day: date | None = Field(default=None, description="Only messages of this day (UTC)")
    limit: int = Field(default=50, ge=1, le=200)


class SearchQuery(Strict):
    q: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    limit: int = Field(default=50, ge=1, le=200)


class ImSettings(Strict):
    sound: bool = True
    send_key: Literal["enter", "ctrl_enter"] = Field(
        default="enter",
        description="What sends a message in the web client: Enter (Shift+Enter: a new line), "
        "or Ctrl+Enter (Enter: a new line)",
    )


class Counters(BaseModel):
    unread: int
    chats: dict[str, int]
