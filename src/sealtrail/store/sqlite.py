"""The embedded default: one SQLite file in WAL mode, nothing to install.

Durability: ``synchronous=FULL`` makes every commit fsync the WAL, so an append that
returned survives a process crash and a power cut. The sequencer lock is SQLite's own write
lock, taken up front with ``BEGIN IMMEDIATE`` so two writer processes never interleave.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sealtrail._exceptions import StorageError
from sealtrail.store._sql import HEADS, PRUNED_OF_TYPE, chunks, placeholders, search_sql
from sealtrail.store.base import (
    DuplicateId,
    Heads,
    PruneRecord,
    SearchQuery,
    SearchRow,
    Store,
    StoredCheckpoint,
    StoredEntry,
    as_bytes,
    level_key_range,
    stored_entry,
)

_APPEND_ONLY = "sealtrail: the trail is append-only"

_SEARCH_INDEX_COLUMNS = {
    "search_time": "time",
    "search_actor": "actor",
    "search_action": "action",
    "search_target": "target_id",
    "search_tenant_time": "tenant, time",
    "search_subject": "subject",
}
SEARCH_INDEXES = "\n".join(
    f"CREATE INDEX IF NOT EXISTS {name} ON search({columns});"
    for name, columns in _SEARCH_INDEX_COLUMNS.items()
)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    body BLOB,
    leaf_hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (k INTEGER PRIMARY KEY, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    root_hash BLOB NOT NULL,
    note TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS prunes (
    seq INTEGER PRIMARY KEY,
    by_event TEXT NOT NULL,
    pruned_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS search (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    action TEXT NOT NULL,
    outcome TEXT NOT NULL,
    actor TEXT,
    target_type TEXT,
    target_id TEXT,
    tenant TEXT,
    subject TEXT
);
{SEARCH_INDEXES}

CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}: DELETE on entries refused'); END;
CREATE TRIGGER IF NOT EXISTS entries_only_prune BEFORE UPDATE ON entries
WHEN NOT (
    NEW.seq = OLD.seq AND NEW.id = OLD.id AND NEW.leaf_hash = OLD.leaf_hash
    AND NEW.body IS NULL AND OLD.body IS NOT NULL
    AND EXISTS (SELECT 1 FROM prunes WHERE prunes.seq = OLD.seq)
)
BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}: UPDATE on entries refused'); END;
"""

for _table in ("nodes", "checkpoints", "prunes", "meta"):
    SCHEMA += f"""
CREATE TRIGGER IF NOT EXISTS {_table}_no_delete BEFORE DELETE ON {_table}
BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}: DELETE on {_table} refused'); END;
CREATE TRIGGER IF NOT EXISTS {_table}_no_update BEFORE UPDATE ON {_table}
BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}: UPDATE on {_table} refused'); END;
"""


def _checkpoint(row: tuple[object, ...]) -> StoredCheckpoint:
    size, root, note, created = row
    text = note.decode("utf-8", "replace") if isinstance(note, bytes) else str(note)
    return StoredCheckpoint(int(size), as_bytes(root), text, str(created))  # type: ignore[call-overload]


class _Errors:
    """A ``with`` block that reports SQLite's errors as :class:`StorageError` saying what
    failed (a class, not a generator: several run in every append)."""

    __slots__ = ("doing", "path")

    def __init__(self, path: Path | str, doing: str) -> None:
        self.path = path
        self.doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"SQLite store {self.path}: cannot {self.doing}: {exc}") from exc


class SQLiteStore(Store):
    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        """``synchronous="FULL"`` (default): a returned append survives a power cut.
        ``"NORMAL"``: it survives a crash of the process but not of the machine (SQLite WAL
        syncs only at checkpoints), for applications that accept that, as they do for their
        log files; much faster for one-at-a-time appends on slow disks."""
        if synchronous not in ("FULL", "NORMAL"):
            raise StorageError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        suffix = "" if synchronous == "FULL" else "?synchronous=normal"
        self.url = f"sqlite:///{self.path}{suffix}"
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=60.0
            )
            # 8 KiB pages fit more ~500-byte entries per page (about 10% faster appends);
            # it only takes effect on a new database, before WAL mode is set.
            self._db.execute("PRAGMA page_size=8192")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA cache_size=-65536")
            self._db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._in_write = False

    # -- lifecycle -------------------------------------------------------------------------
    def initialize(self, meta: Mapping[str, str]) -> None:
        with self._errors("initialise"):
            self._db.executescript(SCHEMA)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", list(meta.items())
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def is_initialized(self) -> bool:
        with self._errors("inspect"):
            row = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='entries'"
            ).fetchone()
            return row is not None

    def meta(self) -> dict[str, str]:
        with self._errors("read meta"):
            return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def close(self) -> None:
        self._db.close()

    # -- writing ---------------------------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[None]:
        if self._in_write:
            yield
            return
        with self._errors("begin a write"):
            self._db.execute("BEGIN IMMEDIATE")
        self._in_write = True
        try:
            yield
        except BaseException:
            self._in_write = False
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        self._in_write = False
        with self._errors("commit"):
            self._db.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        if self._in_write:
            yield
            return
        with self._errors("begin a read"):
            self._db.execute("BEGIN DEFERRED")
            # The snapshot is taken at the first read; take it now.
            self._db.execute("SELECT count(*) FROM meta").fetchone()
        self._in_write = True
        try:
            yield
        finally:
            self._in_write = False
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("COMMIT")

    def find_ids(self, ids: Sequence[str]) -> dict[str, StoredEntry]:
        return {e.id: e for e in self._entries_where("id", ids, "look up ids")}

    def _entries_where(self, column: str, values: Iterable[Any], doing: str) -> list[StoredEntry]:
        """Entries whose ``column`` is one of ``values``, in chunks under the variable limit."""
        found: list[StoredEntry] = []
        with self._errors(doing):
            for part in chunks(sorted(set(values))):
                sql = (
                    "SELECT seq, id, body, leaf_hash FROM entries "
                    f"WHERE {column} IN ({placeholders(len(part))})"
                )
                found.extend(stored_entry(row) for row in self._db.execute(sql, list(part)))
        return found

    def insert_entries(self, rows: Iterable[tuple[int, str, bytes, bytes]]) -> None:
        try:
            self._db.executemany(
                "INSERT INTO entries(seq, id, body, leaf_hash) VALUES (?, ?, ?, ?)", rows
            )
        except sqlite3.IntegrityError as exc:
            if "entries.id" in str(exc):
                raise DuplicateId(f"an event id is already stored: {exc}") from exc
            raise StorageError(f"SQLite store {self.path}: cannot append entries: {exc}") from exc
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite store {self.path}: cannot append entries: {exc}") from exc

    def insert_nodes(self, rows: Sequence[tuple[int, bytes]]) -> None:
        if rows:
            with self._errors("append nodes"):
                self._db.executemany("INSERT INTO nodes(k, hash) VALUES (?, ?)", rows)

    def insert_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        with self._errors("store a checkpoint"):
            self._db.execute(
                "INSERT INTO checkpoints(size, root_hash, note, created) VALUES (?, ?, ?, ?)",
                (checkpoint.size, checkpoint.root_hash, checkpoint.note, checkpoint.created),
            )

    def insert_search(self, rows: Sequence[SearchRow]) -> None:
        if rows:
            with self._errors("index entries"):
                self._db.executemany(
                    "INSERT OR REPLACE INTO search VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            r.seq,
                            r.time,
                            r.action,
                            r.outcome,
                            r.actor,
                            r.target_type,
                            r.target_id,
                            r.tenant,
                            r.subject,
                        )
                        for r in rows
                    ],
                )

    def search_indexes(self, present: bool) -> None:
        with self._errors("rebuild the search indexes"), self.write():
            # execute, not executescript: that would COMMIT the open transaction first.
            for name, columns in _SEARCH_INDEX_COLUMNS.items():
                if present:
                    self._db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON search({columns})")
                else:
                    self._db.execute(f"DROP INDEX IF EXISTS {name}")

    def prune_bodies(self, seqs: Sequence[int], by_event: str, pruned_at: str) -> None:
        with self._errors("prune"):
            self._db.executemany(
                "INSERT INTO prunes(seq, by_event, pruned_at) VALUES (?, ?, ?)",
                [(s, by_event, pruned_at) for s in seqs],
            )
            self._db.executemany(
                "UPDATE entries SET body = NULL WHERE seq = ?", [(s,) for s in seqs]
            )
            self._db.executemany(
                "UPDATE search SET actor = NULL, target_id = NULL, subject = NULL WHERE seq = ?",
                [(s,) for s in seqs],
            )

    # -- reading ---------------------------------------------------------------------------
    def size(self) -> int:
        with self._errors("read the size"):
            (top,) = self._db.execute("SELECT max(seq) FROM entries").fetchone()
            return 0 if top is None else int(top) + 1

    def search_watermark(self) -> int:
        with self._errors("read the index watermark"):
            (top,) = self._db.execute("SELECT max(seq) FROM search").fetchone()
            return 0 if top is None else int(top) + 1

    def heads(self) -> Heads:
        with self._errors("read the size"):
            top, indexed, signed = self._db.execute(HEADS).fetchone()
        return Heads(
            0 if top is None else int(top) + 1,
            0 if indexed is None else int(indexed) + 1,
            -1 if signed is None else int(signed),
        )

    def get_entry(self, seq: int) -> StoredEntry | None:
        with self._errors("read an entry"):
            row = self._db.execute(
                "SELECT seq, id, body, leaf_hash FROM entries WHERE seq = ?", (seq,)
            ).fetchone()
        return None if row is None else stored_entry(row)

    def get_entry_by_id(self, event_id: str) -> StoredEntry | None:
        with self._errors("read an entry"):
            row = self._db.execute(
                "SELECT seq, id, body, leaf_hash FROM entries WHERE id = ?", (event_id,)
            ).fetchone()
        return None if row is None else stored_entry(row)

    def get_entries(self, seqs: Iterable[int]) -> dict[int, StoredEntry]:
        return {e.seq: e for e in self._entries_where("seq", seqs, "read entries")}

    def leaf_hashes(self, seqs: Iterable[int]) -> dict[int, bytes]:
        wanted = sorted(set(seqs))
        out: dict[int, bytes] = {}
        with self._errors("read leaf hashes"):
            for part in chunks(wanted):
                sql = f"SELECT seq, leaf_hash FROM entries WHERE seq IN ({placeholders(len(part))})"
                out.update((s, as_bytes(h)) for s, h in self._db.execute(sql, list(part)))
        return out

    def nodes(self, keys: Iterable[int]) -> dict[int, bytes]:
        wanted = sorted(set(keys))
        out: dict[int, bytes] = {}
        with self._errors("read tree nodes"):
            for part in chunks(wanted):
                sql = f"SELECT k, hash FROM nodes WHERE k IN ({placeholders(len(part))})"
                out.update((k, as_bytes(h)) for k, h in self._db.execute(sql, list(part)))
        return out

    def iter_entry_rows(
        self, begin: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, str, Any, Any]]:
        sql = "SELECT seq, id, body, leaf_hash FROM entries WHERE seq >= ?"
        params: list[int] = [begin]
        if end is not None:
            sql += " AND seq < ?"
            params.append(end)
        sql += " ORDER BY seq"
        with self._errors("read entries"):
            cursor = self._db.execute(sql, params)
            while rows := cursor.fetchmany(4096):
                yield from rows

    def iter_level(
        self, level: int, begin: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        low, high = level_key_range(level)
        first = low + begin
        last = high if end is None else min(high, low + end)
        with self._errors("read tree nodes"):
            cursor = self._db.execute(
                "SELECT k, hash FROM nodes WHERE k >= ? AND k < ? ORDER BY k", (first, last)
            )
            while True:
                rows = cursor.fetchmany(2048)
                if not rows:
                    return
                for k, h in rows:
                    yield k - low, as_bytes(h)

    def checkpoints(self) -> list[StoredCheckpoint]:
        with self._errors("read checkpoints"):
            rows = self._db.execute(
                "SELECT size, root_hash, note, created FROM checkpoints ORDER BY size"
            ).fetchall()
        return [_checkpoint(r) for r in rows]

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        with self._errors("read checkpoints"):
            row = self._db.execute(
                "SELECT size, root_hash, note, created FROM checkpoints ORDER BY size DESC LIMIT 1"
            ).fetchone()
        return None if row is None else _checkpoint(row)

    def prunes(self) -> dict[int, PruneRecord]:
        with self._errors("read prunes"):
            rows = self._db.execute("SELECT seq, by_event, pruned_at FROM prunes").fetchall()
        return {r[0]: PruneRecord(*r) for r in rows}

    def pruned_of_type(self, target_type: str, after: int, until: str, limit: int) -> list[int]:
        with self._errors("read prunes"):
            rows = self._db.execute(PRUNED_OF_TYPE, (target_type, after, until, limit))
            return [r[0] for r in rows]

    def search(self, query: SearchQuery) -> list[int]:
        sql, params = search_sql(query)
        with self._errors("search"):
            return [r[0] for r in self._db.execute(sql, params)]

    def seq_range_for_time(self, since: str | None, until: str | None) -> tuple[int, int]:
        where, params = [], []
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        if until is not None:
            where.append("time < ?")
            params.append(until)
        sql = "SELECT min(seq), max(seq) FROM search"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._errors("search"):
            low, high = self._db.execute(sql, params).fetchone()
        if low is None:
            return 0, 0
        return int(low), int(high) + 1

    # -- helpers ---------------------------------------------------------------------------
    def _errors(self, doing: str) -> _Errors:
        return _Errors(self.path, doing)
