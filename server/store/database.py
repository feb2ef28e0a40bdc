"""The MongoDB store: a thin owner of the client, the database and its indexes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pymongo
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.write_concern import WriteConcern

from server.store.space import DiskSpace

if TYPE_CHECKING:
    from server.store.credentials import Credentials
    from server.store.embedded import EmbeddedDatabase

Document = dict[str, Any]
PING_TIMEOUT_SECONDS = 2.0

INDEXES: dict[str, list[IndexModel]] = {
    "users": [
        IndexModel([("login", ASCENDING)], unique=True, name="login_unique"),
        IndexModel([("email", ASCENDING)], name="email"),
        IndexModel([("department_id", ASCENDING)], name="department"),
        IndexModel([("phone_digits", ASCENDING)], name="phone_digits"),
    ],
    "departments": [IndexModel([("parent_id", ASCENDING)], name="parent")],
    "workgroups": [IndexModel([("member_ids", ASCENDING)], name="members")],
    "tokens": [
        IndexModel([("user_id", ASCENDING)], name="user"),
        IndexModel([("expires_at", ASCENDING)], name="expires"),
    ],
    # Every node reads the last seconds of it, several times a second (auth/sessions.py).
    "revocations": [IndexModel([("at", ASCENDING)], name="at")],
    "upload_slots": [
        IndexModel([("user_id", ASCENDING)], name="user"),
        IndexModel([("expires_at", ASCENDING)], name="expires"),
    ],
    # Chat files (GridFS bucket "files"): GridFS's own two (made here too, with its names:
    # PyMongo makes them only while the bucket is empty), and uploads never sent, for pruning.
    "files.files": [
        IndexModel(
            [("filename", ASCENDING), ("uploadDate", ASCENDING)], name="filename_1_uploadDate_1"
        ),
        IndexModel([("metadata.chat_id", ASCENDING), ("uploadDate", ASCENDING)], name="unsent"),
    ],
    "files.chunks": [
        IndexModel([("files_id", ASCENDING), ("n", ASCENDING)], unique=True, name="files_id_1_n_1")
    ],
    "chats": [
        IndexModel([("pair_key", ASCENDING)], unique=True, sparse=True, name="pair_key_sparse"),
        IndexModel([("workgroup_id", ASCENDING)], name="workgroup"),
    ],
    "private_storage": [IndexModel([("user_id", ASCENDING)], name="user")],
    # XEP-0163 PEP (server/directory/pep.py): a user's nodes; the last items of some nodes of
    # many users at once (a client coming online); a node's items in order.
    "pep_nodes": [
        IndexModel([("user_id", ASCENDING)], name="user"),
        IndexModel([("node", ASCENDING)], name="node"),
    ],
    "pep_items": [
        IndexModel([("user_id", ASCENDING), ("node", ASCENDING), ("seq", ASCENDING)], name="node")
    ],
    "chat_members": [
        IndexModel([("user_id", ASCENDING)], name="user"),
        IndexModel([("chat_id", ASCENDING)], name="chat"),
    ],
    "messages": [
        IndexModel([("chat_id", ASCENDING), ("_id", ASCENDING)], name="chat_order"),
        # sparse, not partial: the embedded database uses a sparse index for lookups
        IndexModel([("dedup_key", ASCENDING)], unique=True, sparse=True, name="dedup_sparse"),
        # A Jabber client's correction or retraction names its message by the id or origin-id
        # it sent (find_own in server/xmpp/modules/messages.py). Sparse: only the messages
        # such an id names pay for an entry (each costs the embedded database about as much
        # as the rest of the insert), not every message from the web.
        IndexModel([("origin_keys", ASCENDING)], sparse=True, name="origin_keys_sparse"),
    ],
    "tasks": [
        # With the status: a recount of someone's stored task counters reads their unfinished
        # tasks, not every task they were ever on (server/tasks/counters.py); a role alone
        # ({responsible_id: {$in}}: lists, full counts) uses the same index.
        IndexModel(
            [("responsible_id", ASCENDING), ("status", ASCENDING)], name="responsible_status"
        ),
        IndexModel([("author_id", ASCENDING), ("status", ASCENDING)], name="author_status"),
        IndexModel(
            [("participant_ids", ASCENDING), ("status", ASCENDING)], name="participants_status"
        ),
        IndexModel([("observer_ids", ASCENDING), ("status", ASCENDING)], name="observers_status"),
        IndexModel([("group_id", ASCENDING)], name="group"),
        IndexModel([("parent_id", ASCENDING)], name="parent"),
    ],
    "task_comments": [IndexModel([("task_id", ASCENDING)], name="task")],
    "task_history": [IndexModel([("task_id", ASCENDING)], name="task")],
    "task_views": [IndexModel([("user_id", ASCENDING)], name="user")],
    "schedule": [IndexModel([("due_at", ASCENDING)], name="due")],
    "crm_records": [
        IndexModel([("type", ASCENDING), ("_id", DESCENDING)], name="type_order"),
        IndexModel(
            [("type", ASCENDING), ("responsible_id", ASCENDING), ("_id", DESCENDING)],
            name="responsible_order",
        ),
        # idle counters: a user's open records without any open activity
        IndexModel(
            [
                ("responsible_id", ASCENDING),
                ("type", ASCENDING),
                ("open", ASCENDING),
                ("open_activities", ASCENDING),
            ],
            name="idle",
        ),
        IndexModel([("email_keys", ASCENDING)], name="email_keys"),
        IndexModel([("phone_keys", ASCENDING)], name="phone_keys"),
        IndexModel([("name_key", ASCENDING)], name="name_key"),
        IndexModel([("company_key", ASCENDING)], name="company_key"),
        # The links, with the type: the embedded database uses an index only when every field
        # of the filter is in it, and the link queries name the type ({type: "contact",
        # company_ids: c}); a link alone ({company_ids: {$in}}) uses the same index.
        IndexModel([("company_ids", ASCENDING), ("type", ASCENDING)], name="company_links"),
        IndexModel([("company_id", ASCENDING), ("type", ASCENDING)], name="company_link"),
        IndexModel([("contact_ids", ASCENDING), ("type", ASCENDING)], name="contact_links"),
    ],
    # Counting reads one index range per (user, record type, kind) under either mode.
    "crm_activities": [
        IndexModel(
            [
                ("record_responsible_id", ASCENDING),
                ("owner_type", ASCENDING),
                ("completed", ASCENDING),
                ("incoming", ASCENDING),
                ("deadline", ASCENDING),
            ],
            name="count_item",
        ),
        IndexModel(
            [
                ("responsible_id", ASCENDING),
                ("owner_type", ASCENDING),
                ("completed", ASCENDING),
                ("incoming", ASCENDING),
                ("deadline", ASCENDING),
            ],
            name="count_activity",
        ),
        IndexModel([("owner_id", ASCENDING), ("completed", ASCENDING)], name="owner"),
        # The open activities of several records at once (``owner_id $in`` with ``completed``):
        # the embedded database scans the collection for ``$in`` beside another field of a
        # compound index, but serves it from a single-field index whose partial filter holds
        # the other field, and this index holds only the open ones: a record's completed
        # history is never read for its indicator.
        IndexModel(
            [("owner_id", ASCENDING)],
            name="owner_open",
            partialFilterExpression={"completed": False},
        ),
        # One activity per received message, however often it is processed.
        IndexModel([("mail.raw_id", ASCENDING)], unique=True, sparse=True, name="mail_raw"),
        IndexModel(
            [("mail.incoming_message_id", ASCENDING)],
            unique=True,
            sparse=True,
            name="mail_incoming_message_id",
        ),
        IndexModel([("mail.message_id", ASCENDING)], sparse=True, name="mail_message_id"),
        IndexModel([("mail.attachments.id", ASCENDING)], sparse=True, name="mail_attachments"),
    ],
    "mail_raw": [
        IndexModel([("sha256", ASCENDING)], unique=True, name="sha256_unique"),
        IndexModel([("imap_key", ASCENDING)], unique=True, sparse=True, name="imap_key_sparse"),
        IndexModel([("status", ASCENDING), ("received_at", ASCENDING)], name="status"),
        IndexModel([("status", ASCENDING), ("claimed_until", ASCENDING)], name="claimable"),
        IndexModel([("message_id", ASCENDING)], sparse=True, name="message_id"),
        # a mailbox's messages not yet moved or deleted there (IMAP)
        IndexModel(
            [("source.mailbox_id", ASCENDING), ("imap_done", ASCENDING)], name="imap_waiting"
        ),
    ],
    "mail_outbox": [IndexModel([("status", ASCENDING), ("next_at", ASCENDING)], name="due")],
    "mail_lead_log": [IndexModel([("sender", ASCENDING), ("at", ASCENDING)], name="sender")],
    "crm_history": [IndexModel([("record_id", ASCENDING), ("at", ASCENDING)], name="record")],
    "crm_roles": [IndexModel([("subject_id", ASCENDING)], name="subject")],
    "events": [
        IndexModel([("stream", ASCENDING), ("seq", ASCENDING)], unique=True, name="stream_seq"),
        # No index on ``ts``: the bus's recovery (the events of the last minute) and pruning
        # read ranges of the ``_id`` index (``stored_since`` in server/events/streams.py).
    ],
}


# Indexes replaced by others (partial ones, which the embedded database does not use for
# lookups, became sparse ones) or no longer used; dropped at start-up.
OBSOLETE_INDEXES: dict[str, list[str]] = {
    # the roles alone: now with the status (see INDEXES)
    "tasks": ["responsible", "author", "participants", "observers"],
    "chats": ["pair_key_unique"],
    "messages": ["dedup_unique", "chat_author_origin_id", "chat_author_origin_origin_id"],
    # Every message's event paid for an entry (an index entry costs the embedded database
    # about as much as the rest of the insert); a retried send reads its chat's stream instead.
    # ``ts`` likewise (an event's ``_id`` is an ObjectId minted as it is stored, time first:
    # its own index serves the same ranges): 32 events took the embedded database 7.2 ms to
    # insert without it, 8.9 ms with it (measured 2026-12-07).
    "events": ["message_id", "ts"],
    # the links' indexes without the type, which every link query names (so none used them)
    "crm_records": ["companies", "company", "contacts"],
    # IMAP's actions read a mailbox's messages by whether they were acted on, not by status
    "mail_raw": ["mailbox"],
}


def utcnow() -> datetime:
    """Now, to the millisecond: what BSON stores, so a value reads back exactly as written."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def plain(value: Any) -> Any:
    """A value as history entries keep it: datetimes as ISO text, the rest as is."""
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def new_id() -> str:
    """A new document id: an ObjectId's hex form, sortable by creation time."""
    return str(ObjectId())


def id_at(moment: datetime, shift: timedelta = timedelta(0)) -> str:
    """The least id minted at ``moment + shift`` (ids are ObjectIds, time first, so a time
    range becomes an id range an index can serve). An ObjectId's time is 32-bit seconds since
    1970: a moment outside that range (any a client may name) gets the least or the greatest
    id there is."""
    seconds = int(moment.timestamp() + shift.total_seconds())
    if seconds < 0:
        return "0" * 24
    if seconds >= 2**32:
        return "f" * 24
    return str(ObjectId.from_datetime(datetime.fromtimestamp(seconds, UTC)))


class Store:
    """Owns one AsyncMongoClient. Domain services reach collections through it.

    ``space`` says whether new writes are refused for want of disk space (it watches the
    embedded database's disk; with an external MongoDB it never refuses). ``embedded`` is the
    database child process when this process runs one, for the health endpoints.
    """

    def __init__(
        self,
        url: str,
        database: str,
        *,
        socket_timeout_ms: int = 20_000,
        credentials: Credentials | None = None,
    ) -> None:
        self.url = url
        # A database that hangs must not hang requests with it: a round trip slower than
        # this fails (a 503 over REST) instead of waiting forever.
        self.client: AsyncMongoClient[Document] = AsyncMongoClient(
            url,
            serverSelectionTimeoutMS=5000,
            socketTimeoutMS=socket_timeout_ms,
            tz_aware=True,
            **(credentials.client_options() if credentials is not None else {}),
        )
        self.db: AsyncDatabase[Document] = self.client[database]
        self.space = DiskSpace()
        self.embedded: EmbeddedDatabase | None = None
        self._relaxed: dict[str, AsyncCollection[Document]] = {}

    def __getitem__(self, name: str) -> AsyncCollection[Document]:
        return self.db[name]

    def relaxed(self, name: str) -> AsyncCollection[Document]:
        """The collection for writes that need not wait for the journal themselves.

        For derived data that is repaired when lost (stream heads, chat counters, previews,
        read marks), and for a write followed by a journaled one: a journaled write flushes
        the journal with every write before it, so in a sequence only the last needs it.
        Where the client does not ask for the journal (``journal=true`` in the URL), the
        collection as it is.
        """
        found = self._relaxed.get(name)
        if found is None:
            found = self._relaxed[name] = self.relaxed_db()[name]
        return found

    def relaxed_db(self) -> AsyncDatabase[Document]:
        """The database for writers that take one rather than a collection, such as a GridFS
        bucket whose chunks a journaled write after them flushes (PyMongo's upload stream
        writes through the database's write concern, not the bucket's)."""
        concern = self.client.write_concern.document
        if not concern.get("j"):
            return self.db
        return self.db.with_options(write_concern=WriteConcern(**{**concern, "j": False}))

    @property
    def users(self) -> AsyncCollection[Document]:
        return self.db["users"]

    @property
    def departments(self) -> AsyncCollection[Document]:
        return self.db["departments"]

    @property
    def workgroups(self) -> AsyncCollection[Document]:
        return self.db["workgroups"]

    @property
    def tokens(self) -> AsyncCollection[Document]:
        return self.db["tokens"]

    @property
    def revocations(self) -> AsyncCollection[Document]:
        return self.db["revocations"]

    @property
    def events(self) -> AsyncCollection[Document]:
        return self.db["events"]

    @property
    def streams(self) -> AsyncCollection[Document]:
        return self.db["streams"]

    @property
    def portal(self) -> AsyncCollection[Document]:
        return self.db["portal"]

    async def ping(self) -> bool:
        try:
            with pymongo.timeout(PING_TIMEOUT_SECONDS):  # readiness must answer quickly
                await self.client.admin.command("ping")
        except Exception:
            return False
        return True

    async def ensure_indexes(self) -> None:
        """Create every index; safe to run at each start (same spec, same name: no-op)."""
        for collection, names in OBSOLETE_INDEXES.items():
            existing = await self.db[collection].index_information()
            for name in names:
                if name in existing:
                    await self.db[collection].drop_index(name)
        for collection, indexes in INDEXES.items():
            await self.db[collection].create_indexes(indexes)

    async def close(self) -> None:
        await self.client.close()


__all__ = ["DESCENDING", "Document", "Store", "new_id"]
