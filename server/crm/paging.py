"""A page of CRM records, newest first, read from bounded ranges of the ``type_order`` index.

The embedded database fetches every document of an index range before it sorts and limits,
and uses an index only when every field of the filter is in it: a list page filtered by
``{type, responsible_id: {$in}, ...}`` read every record of the collection, and even
``{type}`` alone every record of the type (20,000 deals: 320-550 ms of the database per page,
measured 2026-12-07, in front of everyone's messages). So a page is read from windows of ids
going back in time (record ids are ObjectIds: an id bound is a time bound), each
``{type, _id: [lo, hi)}`` (a bounded scan of ``type_order``), the list's other conditions
checked here, each window four times as long as the one before, until the page is full. The
last window is open below, so a record is reached whatever its id; a page reads about as many
records as were created of its type in the time its newest window spans, not the whole type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import suppress
from datetime import datetime, timedelta

from bson import ObjectId
from bson.errors import InvalidId
from pymongo.asynchronous.collection import AsyncCollection

from server.store.database import Document, id_at

WINDOW_START = timedelta(hours=1)
WINDOW_GROWTH = 4
# 1 h, 4 h, 16 h, 2.7 days, ..., 1.9 years, then the rest: ten finds at most for a page
WINDOWS = 9
# An id-set filter (records with the caller's open work) is read this many ids at a time.
IDS_PER_READ = 200

Keep = Callable[[Document], bool]


def id_windows(upper: str | None, now: datetime) -> Iterator[tuple[str | None, str | None]]:
    """``(lo, hi)`` id ranges, newest first, that together hold every id below ``upper``
    (every id at all when it is None) once each: ``lo`` inclusive, ``hi`` exclusive, None
    unbounded."""
    base = now
    if upper is not None:
        with suppress(InvalidId, TypeError):
            base = min(base, ObjectId(upper).generation_time)
    hi = upper
    width = WINDOW_START
    for _ in range(WINDOWS):
        lo = id_at(base, -width)
        if hi is None or lo < hi:
            yield lo, hi
            hi = lo
        width *= WINDOW_GROWTH
    yield None, hi


async def newest_of_type(
    records: AsyncCollection[Document],
    record_type: str,
    keep: Keep,
    below: str | None,
    size: int,
    now: datetime,
) -> list[Document]:
    """Up to ``size`` records of the type that ``keep`` accepts, ids below ``below``, newest
    first."""
    page: list[Document] = []
    for lo, hi in id_windows(below, now):
        id_range: Document = {}
        if lo is not None:
            id_range["$gte"] = lo
        if hi is not None:
            id_range["$lt"] = hi
        window: Document = {"type": record_type, **({"_id": id_range} if id_range else {})}
        async for doc in records.find(window).sort("_id", -1):
            if keep(doc):
                page.append(doc)
                if len(page) == size:
                    return page
    return page


async def newest_of_ids(
    records: AsyncCollection[Document],
    record_type: str,
    ids: set[str],
    keep: Keep,
    below: str | None,
    size: int,
) -> list[Document]:
    """The same from a set of record ids (read by the ``_id`` index, newest ids first)."""
    wanted = sorted((i for i in ids if below is None or i < below), reverse=True)
    page: list[Document] = []
    for start in range(0, len(wanted), IDS_PER_READ):
        chunk = wanted[start : start + IDS_PER_READ]
        found = [d async for d in records.find({"_id": {"$in": chunk}})]
        found.sort(key=lambda d: str(d["_id"]), reverse=True)
        for doc in found:
            if doc.get("type") == record_type and keep(doc):
                page.append(doc)
                if len(page) == size:
                    return page
    return page
