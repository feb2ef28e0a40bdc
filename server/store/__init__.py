"""MongoDB store: one AsyncMongoClient, collections and indexes, and the embedded database."""

from server.store.database import Store
from server.store.runtime import open_store

__all__ = ["Store", "open_store"]
