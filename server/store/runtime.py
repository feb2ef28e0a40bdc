"""Which database a process talks to: the configured URL, or the embedded one."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from server.im.migration import number_messages
from server.settings import Settings
from server.store.credentials import Credentials, read_credentials
from server.store.database import Store
from server.store.embedded import EmbeddedDatabase, EmbeddedDatabaseError, running_endpoint
from server.store.space import DiskSpace


@asynccontextmanager
async def open_store(settings: Settings, *, reuse_running: bool) -> AsyncIterator[Store]:
    """Yield a connected store with its indexes in place (and its data migrated).

    With no ``mongodb_url``, the embedded database on ``settings.embedded_db_dir`` is used:
    a running server's (when ``reuse_running``, as the admin CLI does; its password is read
    from the data directory), else one started and supervised here for the duration of the
    block, with the free space of its disk watched, and stopped after it.
    """
    embedded: EmbeddedDatabase | None = None
    space: DiskSpace | None = None
    credentials: Credentials | None = None
    if settings.mongodb_url is not None:
        url = settings.mongodb_url.get_secret_value()
    else:
        db_dir = settings.embedded_db_dir
        found = running_endpoint(db_dir) if reuse_running else None
        if found is not None:
            url = found
            credentials = read_credentials(db_dir)
            if credentials is None:
                raise EmbeddedDatabaseError(
                    f"the hub running on {db_dir} has no readable credentials file"
                )
        else:
            space = DiskSpace(
                [db_dir],
                reserve_bytes=settings.disk_reserve_bytes,
                reserve_percent=settings.disk_reserve_percent,
            )
            space.check()
            embedded = EmbeddedDatabase(db_dir, space=space)
            try:
                url = await embedded.start()
            except EmbeddedDatabaseError as exc:
                if space.low:  # the likely cause, in words
                    raise EmbeddedDatabaseError(f"{exc}\n{space.refusal()}") from exc
                raise
            credentials = embedded.credentials
            space.start()
    try:
        store = Store(
            url,
            settings.mongodb_database,
            socket_timeout_ms=settings.mongodb_socket_timeout_ms,
            credentials=credentials,
        )
        if space is not None:
            store.space = space
        store.embedded = embedded
        try:
            await store.ensure_indexes()
            # Messages from an older version get their numbers (once; see the module).
            await number_messages(store, f"{socket.gethostname()}:{os.getpid()}")
            yield store
        finally:
            await store.close()
    finally:
        if space is not None:
            await space.stop()
        if embedded is not None:
            await embedded.stop()
