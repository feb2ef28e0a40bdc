"""Which database a process talks to: the configured URL, or the embedded one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from server.settings import Settings
from server.store.database import Store
from server.store.embedded import EmbeddedDatabase, running_endpoint


@asynccontextmanager
async def open_store(settings: Settings, *, reuse_running: bool) -> AsyncIterator[Store]:
    """Yield a connected store with its indexes in place.

    With no ``mongodb_url``, the embedded database on ``settings.embedded_db_dir`` is used:
    a running server's (when ``reuse_running``, as the admin CLI does), else one started here
    for the duration of the block and stopped after it.
    """
    embedded: EmbeddedDatabase | None = None
    if settings.mongodb_url is not None:
        url = settings.mongodb_url.get_secret_value()
    else:
        found = running_endpoint(settings.embedded_db_dir) if reuse_running else None
        if found is not None:
            url = found
        else:
            embedded = EmbeddedDatabase(settings.embedded_db_dir)
            url = await embedded.start()
    store = Store(
        url, settings.mongodb_database, socket_timeout_ms=settings.mongodb_socket_timeout_ms
    )
    try:
        await store.ensure_indexes()
        yield store
    finally:
        await store.close()
        if embedded is not None:
            await embedded.stop()
