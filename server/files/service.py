"""Files sent in chats: uploaded, stored in GridFS, claimed by a message, read, deleted.

A file is uploaded first (over REST, or with an XEP-0363 slot from a Jabber client) and
belongs to its uploader only. Sending a message with it claims it for that message's chat
(``claim``): from then on the chat's members may read it (the messenger checks membership,
``ImService.file_for``), and deleting the message deletes it. The bytes are in the
database's GridFS bucket ``files`` (``files.files``: name, size, metadata; ``files.chunks``:
the content in 255 KiB chunks), so the embedded database and a MongoDB deployment keep them
alike, and every node reads the same.

Jabber clients get a file as a signed link (``link``): the path carries an HMAC of the file
id under a secret kept in the database (``file_keys``), so it works without a session, like
Prosody's mod_http_file_share; whoever holds the link may download the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bson import Binary
from gridfs import AsyncGridFSBucket, NoFile
from gridfs.asynchronous.grid_file import AsyncGridOut
from pymongo.errors import DuplicateKeyError

from server.files.models import FileOut, FileRef
from server.files.rules import (
    OCTET_STREAM,
    SNIFF_BYTES,
    clean_name,
    image_type,
    link_path,
    verify,
)
from server.settings import Settings
from server.store.database import Document, Store, new_id, utcnow
from server.web.problems import Problem, forbidden, not_found

log = logging.getLogger(__name__)

BUCKET = "files"
KEY_ID = "link"
SLOT_SECONDS = 300  # an XEP-0363 slot must be used this soon
UPLOADS_AT_ONCE = 4  # per user and process: more wait for nobody, they are refused (429)
OPEN_SLOTS = 10  # XEP-0363 slots a user may hold unused at once
UNSENT_HOURS = 24  # an upload never sent in a message is deleted after this
PUT_PREFIX = "/files/upload/"


def too_large(limit: int) -> Problem:
    return Problem(
        413, "file-too-large", "File too large", f"a file may have at most {limit} bytes"
    )


@dataclass(frozen=True, slots=True)
class Slot:
    put_url: str
    get_url: str


class FileService:
    def __init__(self, store: Store, settings: Settings) -> None:
        self._store = store
        self._settings = settings
        self._bucket = AsyncGridFSBucket(store.db, bucket_name=BUCKET)
        # An upload's chunks and file document are not flushed to the journal one insert at
        # a time (a flush each, some milliseconds, on the embedded database): the journaled
        # update of the file's metadata after them flushes the log through them before the
        # upload is answered.
        self._uploads = AsyncGridFSBucket(store.relaxed_db(), bucket_name=BUCKET)
        self._key: bytes | None = None
        self._uploading: dict[str, int] = {}  # user id -> uploads under way on this process

    @property
    def max_bytes(self) -> int:
        return self._settings.file_max_bytes

    @property
    def base_url(self) -> str:
        configured = self._settings.public_url
        if configured:
            return configured.rstrip("/")
        return f"http://{self._settings.domain}:{self._settings.http_port}"

    # the link secret --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load (or make, once for every node) the secret links are signed with."""
        await self.key()

    async def key(self) -> bytes:
        if self._key is None:
            keys = self._store["file_keys"]
            found = await keys.find_one({"_id": KEY_ID})
            if found is None:
                with contextlib.suppress(DuplicateKeyError):  # another node made it first
                    await keys.insert_one(
                        {"_id": KEY_ID, "secret": Binary(secrets.token_bytes(32))}
                    )
                found = await keys.find_one({"_id": KEY_ID})
                assert found is not None
            self._key = bytes(found["secret"])
        return self._key

    def link(self, ref: FileRef | dict[str, Any]) -> str:
        """The signed download link of a file (after ``start``)."""
        if self._key is None:
            raise RuntimeError("FileService.start() was not awaited")
        file_id, name = (ref.id, ref.name) if isinstance(ref, FileRef) else (ref["id"], ref["name"])
        return self.base_url + link_path(self._key, str(file_id), str(name))

    async def by_link(self, file_id: str, signature: str) -> FileOut:
        """The file a signed link names (404 for a wrong signature: nothing to learn)."""
        if not verify(await self.key(), file_id, signature):
            raise not_found(f"file {file_id}")
        found = await self.get(file_id)
        if found.chat_id is None:
            # Not sent yet: a link to it works once it is in a chat.
            raise not_found(f"file {file_id}")
        return found

    # storing ----------------------------------------------------------------------------------

    async def upload(
        self,
        user_id: str,
        name: str | None,
        chunks: AsyncIterator[bytes],
        *,
        file_id: str | None = None,
        exact_size: int | None = None,
    ) -> FileOut:
        """Store what ``chunks`` yields as the uploader's file. Never more than the limit is
        read: past it the upload is taken back and this raises 413. ``exact_size``: the size
        promised for an XEP-0363 slot; anything else is refused and nothing kept."""
        if self._uploading.get(user_id, 0) >= UPLOADS_AT_ONCE:
            raise Problem(
                429,
                "rate-limited",
                "Too many uploads",
                f"at most {UPLOADS_AT_ONCE} uploads at once",
                headers={"Retry-After": "1"},
                retry_after=1,
            )
        self._uploading[user_id] = self._uploading.get(user_id, 0) + 1
        try:
            return await self._upload(user_id, name, chunks, file_id, exact_size)
        finally:
            left = self._uploading.pop(user_id) - 1
            if left:
                self._uploading[user_id] = left

    async def _upload(
        self,
        user_id: str,
        name: str | None,
        chunks: AsyncIterator[bytes],
        file_id: str | None,
        exact_size: int | None,
    ) -> FileOut:
        limit = self.max_bytes if exact_size is None else min(exact_size, self.max_bytes)
        file_id = file_id or new_id()
        stream = self._uploads.open_upload_stream_with_id(
            file_id,
            clean_name(name),
            metadata={"uploader_id": user_id, "chat_id": None, "pending": True},
        )
        head = b""
        size = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise too_large(limit) if exact_size is None else _size_mismatch()
                if len(head) < SNIFF_BYTES:
                    head += chunk[: SNIFF_BYTES - len(head)]
                await stream.write(chunk)
            if exact_size is not None and size != exact_size:
                raise _size_mismatch()
            await stream.close()
        except BaseException:
            with contextlib.suppress(Exception):
                await stream.abort()
            raise
        kind = image_type(head)
        await self._files.update_one(
            {"_id": file_id},
            {
                "$set": {
                    "metadata.content_type": kind or OCTET_STREAM,
                    "metadata.image": kind is not None,
                },
                "$unset": {"metadata.pending": ""},
            },
        )
        return await self.get(file_id)

    @property
    def _files(self) -> Any:
        return self._store[f"{BUCKET}.files"]

    async def get(self, file_id: str) -> FileOut:
        doc = await self._files.find_one({"_id": file_id, "metadata.pending": {"$ne": True}})
        if doc is None:
            raise not_found(f"file {file_id}")
        return FileOut.from_gridfs(doc)

    async def uploader_of(self, file_id: str) -> str | None:
        doc = await self._files.find_one({"_id": file_id}, projection={"metadata": True})
        return None if doc is None else (doc.get("metadata") or {}).get("uploader_id")

    async def claim(self, user_id: str, chat_id: str, file_ids: list[str]) -> list[FileRef]:
        """The uploader's files, now the chat's (a retried send claims them again for the
        same chat). A file of someone else's, or already sent to another chat, is refused."""
        refs: list[FileRef] = []
        for file_id in dict.fromkeys(file_ids):
            doc = await self._files.find_one_and_update(
                {
                    "_id": file_id,
                    "metadata.uploader_id": user_id,
                    "metadata.pending": {"$ne": True},
                    "metadata.chat_id": {"$in": [None, chat_id]},
                },
                {"$set": {"metadata.chat_id": chat_id}},
            )
            if doc is None:
                if await self.uploader_of(file_id) not in (None, user_id):
                    raise forbidden(f"file {file_id} is not yours to send")
                raise Problem(
                    422,
                    "unknown-reference",
                    "Unknown reference",
                    f"file {file_id} does not exist or was sent to another chat",
                )
            refs.append(FileOut.from_gridfs(doc).ref())
        return refs

    async def open(self, file_id: str) -> AsyncGridOut:
        try:
            return await self._bucket.open_download_stream(file_id)
        except NoFile:
            raise not_found(f"file {file_id}") from None

    async def delete(self, file_ids: list[str]) -> None:
        for file_id in file_ids:
            with contextlib.suppress(NoFile):
                await self._bucket.delete(file_id)

    async def prune(self) -> int:
        """Delete uploads never sent (older than ``UNSENT_HOURS``) and expired slots; returns
        how many files went. Run by the hub's maintenance loop."""
        now = utcnow()
        await self._store["upload_slots"].delete_many({"expires_at": {"$lt": now}})
        stale = [
            str(doc["_id"])
            async for doc in self._files.find(
                {
                    "metadata.chat_id": None,
                    "uploadDate": {"$lt": now - timedelta(hours=UNSENT_HOURS)},
                },
                projection={"_id": True},
            )
        ]
        await self.delete(stale)
        return len(stale)

    # XEP-0363 slots ---------------------------------------------------------------------------

    async def slot(self, user_id: str, name: str, size: int) -> Slot:
        """A one-time PUT URL for a file of ``size`` bytes, and the GET URL it will have."""
        if size > self.max_bytes:
            raise too_large(self.max_bytes)
        if size < 0:
            raise Problem(422, "validation-error", "Invalid request", "a negative size")
        slots = self._store["upload_slots"]
        now = utcnow()
        await slots.delete_many({"user_id": user_id, "expires_at": {"$lt": now}})
        if await slots.count_documents({"user_id": user_id}) >= OPEN_SLOTS:
            raise Problem(
                429,
                "rate-limited",
                "Too many upload slots",
                f"at most {OPEN_SLOTS} unused upload slots at once",
                headers={"Retry-After": str(SLOT_SECONDS)},
                retry_after=SLOT_SECONDS,
            )
        token = secrets.token_urlsafe(24)
        file_id = new_id()
        name = clean_name(name)
        await slots.insert_one(
            {
                "_id": _token_key(token),
                "user_id": user_id,
                "file_id": file_id,
                "name": name,
                "size": size,
                "expires_at": now + timedelta(seconds=SLOT_SECONDS),
            }
        )
        key = await self.key()
        return Slot(
            put_url=f"{self.base_url}{PUT_PREFIX}{token}",
            get_url=self.base_url + link_path(key, file_id, name),
        )

    async def put(self, token: str, chunks: AsyncIterator[bytes]) -> FileOut:
        """Store a slot's file; the slot is used up whatever happens."""
        slot: Document | None = await self._store["upload_slots"].find_one_and_delete(
            {"_id": _token_key(token)}
        )
        if slot is None or slot["expires_at"] < utcnow():
            raise forbidden("this upload slot does not exist, was used or has expired")
        return await self.upload(
            slot["user_id"],
            slot["name"],
            chunks,
            file_id=slot["file_id"],
            exact_size=int(slot["size"]),
        )


def _token_key(token: str) -> str:
    # Only a hash is stored: a database dump gives nobody a slot to write into.
    return hashlib.sha256(token.encode()).hexdigest()


def _size_mismatch() -> Problem:
    return Problem(
        400, "size-mismatch", "Wrong size", "the body is not the size the slot was asked for"
    )
