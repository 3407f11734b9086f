"""Storage backends. Each implements the primitives of :class:`~sealtrail.store.base.Store`."""

from __future__ import annotations

from pathlib import Path

from sealtrail._exceptions import StorageError
from sealtrail.store.base import Store

__all__ = ["Store", "open_store"]


def open_store(url: str) -> Store:
    """A store from a URL: ``sqlite:///relative.db``, ``sqlite:////abs.db``, a path, or
    ``postgresql://...``."""
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from sealtrail.store.postgres import PostgresStore
        except ImportError as exc:
            raise StorageError(
                "PostgreSQL support is not installed: pip install 'sealtrail[postgres]'"
            ) from exc
        store: Store = PostgresStore(url)
        return store
    query = ""
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///") :]
        rest, _, query = rest.partition("?")
        path = Path(rest)
    elif "://" in url:
        raise StorageError(f"unsupported store URL {url!r} (use sqlite:/// or postgresql://)")
    else:
        path = Path(url)
    synchronous = "FULL"
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        if key == "synchronous" and value.upper() in ("FULL", "NORMAL"):
            synchronous = value.upper()
        else:
            raise StorageError(
                f"unknown SQLite store option {part!r} (only synchronous=full|normal)"
            )
    from sealtrail.store.sqlite import SQLiteStore

    if not path.parent.exists():
        raise StorageError(f"directory {path.parent} does not exist")
    return SQLiteStore(path, synchronous=synchronous)
