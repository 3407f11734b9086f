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
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
    elif "://" in url:
        raise StorageError(f"unsupported store URL {url!r} (use sqlite:/// or postgresql://)")
    else:
        path = Path(url)
    from sealtrail.store.sqlite import SQLiteStore

    if not path.parent.exists():
        raise StorageError(f"directory {path.parent} does not exist")
    return SQLiteStore(path)
