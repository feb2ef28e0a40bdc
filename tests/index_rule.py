"""The embedded database's rule for using an index, as the hub's queries must meet it.

SecantusDB uses an index for a filter only when the filter's top-level fields are a leading
run of the index's keys (or the filter names ``_id`` by equality or ``$in``); anything else,
an ``$or`` included, reads the whole collection. Measured with ``explain()`` (2026-12-07):
``{responsible_id, completed}`` against ``(responsible_id, owner_type, completed, ...)``
examined every activity, ``{responsible_id, owner_type, completed}`` only the matches.
"""

from __future__ import annotations

from typing import Any

from server.im.migration import ORDINAL_INDEX
from server.store.database import INDEXES

# made by the ordinals' migration (``server/im/migration.py``), not listed in INDEXES
_MORE = {"messages": [ORDINAL_INDEX]}


def served_by_index(collection: str, query: dict[str, Any]) -> bool:
    fields = set(query)
    if not fields or any(f.startswith("$") for f in fields):
        return False
    by_id = query.get("_id")
    if by_id is not None and (not isinstance(by_id, dict) or set(by_id) <= {"$eq", "$in"}):
        return True
    for index in [*INDEXES.get(collection, []), *_MORE.get(collection, [])]:
        keys = list(index.document["key"])
        if any(set(keys[:n]) == fields for n in range(1, len(keys) + 1)):
            return True
    return False
