"""What a storage backend must provide.

A backend implements a handful of primitives over its database; every rule (sequencing,
the Merkle tree, dedupe, checkpoint policy, limits) lives in :class:`sealtrail.ledger.Ledger`,
so SQLite and PostgreSQL behave, and fail, the same way. The contract tests in
``tests/test_store_contract.py`` run against every backend.

Tables (names are the same on every backend):

``entries``      seq (0-based leaf index), id (event id, unique), body (the exact leaf
                 bytes; NULL once pruned), leaf_hash. Append-only, guarded by triggers.
``nodes``        interior Merkle nodes, only at levels that are positive multiples of
                 :data:`NODE_STRIDE`, keyed by :func:`node_key`. Append-only.
``checkpoints``  every signed checkpoint: size, root hash, the signed note. Append-only.
``prunes``       which entries had their body removed, and by which audit event.
``search``       a derived query index (actor, action, target, time...), rebuilt from bodies
                 at any time; it is not trusted by verification.
``meta``         the log's origin and verifier key, written once at initialisation.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sealtrail._exceptions import StorageError
from sealtrail.merkle import NodeId

#: Interior nodes are stored only at levels 4, 8, 12...: a proof then reads at most 16
#: contiguous rows per band of four levels, while the write path stores about one node per
#: fifteen leaves instead of one per leaf.
NODE_STRIDE = 4

_LEVEL_SHIFT = 56


def node_key(node: NodeId) -> int:
    """One 63-bit integer per node, so a node is a single primary-key lookup."""
    level, index = node
    return (level << _LEVEL_SHIFT) | index


def key_node(key: int) -> NodeId:
    return key >> _LEVEL_SHIFT, key & ((1 << _LEVEL_SHIFT) - 1)


def level_key_range(level: int) -> tuple[int, int]:
    return level << _LEVEL_SHIFT, (level + 1) << _LEVEL_SHIFT


class DuplicateId(StorageError):
    """Internal signal: an insert hit the unique index on event ids.

    The ledger appends optimistically (no lookup first), and on this signal rolls the
    transaction back and appends again in a new one, by the path that looks ids up.
    """


@dataclass(frozen=True, slots=True)
class StoredEntry:
    seq: int
    id: str
    body: bytes | None
    leaf_hash: bytes


def as_bytes(value: Any) -> bytes:
    """A stored hash or body as bytes, whatever the database hands back.

    SQLite columns are dynamically typed: a tampered row may hold TEXT or a number where a
    BLOB was written, and verification compares bytes. (PostgreSQL bytea is always bytes.)
    """
    if type(value) is bytes:
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return b"" if value is None else str(value).encode("ascii")


def stored_entry(row: tuple[Any, ...]) -> StoredEntry:
    seq, eid, body, leaf_hash = row
    return StoredEntry(
        int(seq), str(eid), None if body is None else as_bytes(body), as_bytes(leaf_hash)
    )


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    size: int
    root_hash: bytes
    note: str
    created: str


@dataclass(frozen=True, slots=True)
class Heads:
    """What an append reads first: where the log, its search index and its latest
    checkpoint end (:meth:`Store.heads`)."""

    size: int
    search_watermark: int
    checkpoint_size: int  # -1: no checkpoint yet


@dataclass(frozen=True, slots=True)
class PruneRecord:
    seq: int
    by_event: str
    pruned_at: str


@dataclass(frozen=True, slots=True)
class SearchRow:
    seq: int
    time: str
    action: str
    outcome: str
    actor: str | None
    target_type: str | None
    target_id: str | None
    tenant: str | None
    subject: str | None


@dataclass(frozen=True, slots=True)
class SearchQuery:
    actor: str | None = None
    action: str | None = None  # exact, or a prefix ending in ".*"
    target: str | None = None  # target id, or "type:id"
    outcome: str | None = None
    tenant: str | None = None
    subject: str | None = None
    since: str | None = None  # inclusive, normalised RFC 3339 UTC
    until: str | None = None  # exclusive
    after: int | None = None  # keyset pagination: seq strictly greater (or smaller if descending)
    limit: int = 100
    descending: bool = False


class Store(abc.ABC):
    """Primitives over one database. Not thread-safe: the ledger serialises access."""

    url: str
    #: Whether another process can open the same store from :attr:`url` (not true of an
    #: in-memory database), which parallel verification needs.
    shareable: bool = True
    #: Whether :meth:`insert_entries` gains from rows produced while it runs: true when the
    #: database works in another process (PostgreSQL); for in-process SQLite, computing the
    #: rows first and inserting them in one go measured 13% faster.
    streams_inserts: bool = False

    def reopen_url(self) -> str:
        """What another process passes to :func:`~sealtrail.store.open_store` to open this
        store. Unlike :attr:`url` it may hold credentials, so it is never printed."""
        return self.url

    # -- lifecycle -------------------------------------------------------------------------
    @abc.abstractmethod
    def initialize(self, meta: Mapping[str, str]) -> None:
        """Create tables and guards if missing and record ``meta`` (once). Idempotent."""

    @abc.abstractmethod
    def is_initialized(self) -> bool: ...

    @abc.abstractmethod
    def meta(self) -> dict[str, str]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- writing ---------------------------------------------------------------------------
    @abc.abstractmethod
    def write(self) -> AbstractContextManager[None]:
        """A write transaction holding the log's sequencer lock; commits durably on exit."""

    @abc.abstractmethod
    def snapshot(self) -> AbstractContextManager[None]:
        """A read transaction: every read inside sees the same state (for verify, export)."""

    @abc.abstractmethod
    def find_ids(self, ids: Sequence[str]) -> dict[str, StoredEntry]: ...

    @abc.abstractmethod
    def insert_entries(self, rows: Iterable[tuple[int, str, bytes, bytes]]) -> None:
        """Rows of (seq, id, body, leaf_hash), consumed lazily: a backend streams them to its
        database as they come, so the caller's work overlaps with the database's. An id
        already stored raises :class:`DuplicateId`; any exception from ``rows`` propagates."""

    @abc.abstractmethod
    def insert_nodes(self, rows: Sequence[tuple[int, bytes]]) -> None:
        """Rows of (node_key, hash)."""

    @abc.abstractmethod
    def insert_checkpoint(self, checkpoint: StoredCheckpoint) -> None: ...

    @abc.abstractmethod
    def insert_search(self, rows: Sequence[SearchRow]) -> None: ...

    def search_indexes(self, present: bool) -> None:
        """Drop (``False``) or create (``True``) the secondary indexes of ``search``.

        Filling a large backlog without them and building them once afterwards is several
        times faster than maintaining them row by row. Queries stay correct meanwhile, only
        slower. The default does nothing (the backend keeps its indexes).
        """
        return None

    @abc.abstractmethod
    def prune_bodies(self, seqs: Sequence[int], by_event: str, pruned_at: str) -> None:
        """Record the prunes, then clear the bodies (the one change the guards allow)."""

    # -- reading ---------------------------------------------------------------------------
    @abc.abstractmethod
    def size(self) -> int:
        """Number of entries, as ``max(seq) + 1``: a gap left by a deleted row is for verify."""

    @abc.abstractmethod
    def search_watermark(self) -> int:
        """Every seq below this has its search row."""

    def heads(self) -> Heads:
        """:meth:`size`, :meth:`search_watermark` and the latest checkpoint's size, read
        together (a backend answers them in one query: each round trip to the database
        also hands the interpreter lock to another thread, and waiting to get it back is
        what slowed concurrent appends most)."""
        latest = self.latest_checkpoint()
        return Heads(self.size(), self.search_watermark(), -1 if latest is None else latest.size)

    @abc.abstractmethod
    def get_entry(self, seq: int) -> StoredEntry | None: ...

    @abc.abstractmethod
    def get_entry_by_id(self, event_id: str) -> StoredEntry | None: ...

    @abc.abstractmethod
    def get_entries(self, seqs: Iterable[int]) -> dict[int, StoredEntry]:
        """The entries at ``seqs`` that exist, in one round trip per few hundred."""

    @abc.abstractmethod
    def leaf_hashes(self, seqs: Iterable[int]) -> dict[int, bytes]: ...

    @abc.abstractmethod
    def nodes(self, keys: Iterable[int]) -> dict[int, bytes]: ...

    def iter_entries(self, begin: int = 0, end: int | None = None) -> Iterator[StoredEntry]:
        """Entries in seq order, streamed (memory stays flat whatever the size)."""
        for row in self.iter_entry_rows(begin, end):
            yield stored_entry(row)

    @abc.abstractmethod
    def iter_entry_rows(
        self, begin: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, str, Any, Any]]:
        """Like :meth:`iter_entries`, as raw (seq, id, body, leaf_hash) tuples, for verify's
        hot loop. Values are as the database holds them (a tampered row may hold TEXT)."""

    @abc.abstractmethod
    def iter_level(
        self, level: int, begin: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        """Stored nodes of one level as (index, hash), index in [begin, end), in order."""

    def nodes_from_level(self, level: int) -> dict[NodeId, bytes]:
        """Every stored node at ``level`` and above (few: one per 2**level entries)."""
        out: dict[NodeId, bytes] = {}
        for lv in range(level, 64, NODE_STRIDE):
            for index, value in self.iter_level(lv):
                out[(lv, index)] = value
        return out

    @abc.abstractmethod
    def checkpoints(self) -> list[StoredCheckpoint]: ...

    @abc.abstractmethod
    def latest_checkpoint(self) -> StoredCheckpoint | None: ...

    @abc.abstractmethod
    def prunes(self) -> dict[int, PruneRecord]: ...

    @abc.abstractmethod
    def pruned_of_type(self, target_type: str, after: int, until: str, limit: int) -> list[int]:
        """Seqs of pruned entries whose target type is ``target_type``, with seq greater
        than ``after`` and time before ``until`` (exclusive, normalised), in order, at most
        ``limit``: the changes a history can no longer read."""

    @abc.abstractmethod
    def search(self, query: SearchQuery) -> list[int]:
        """Seqs matching ``query``, in seq order, at most ``query.limit``."""

    @abc.abstractmethod
    def seq_range_for_time(self, since: str | None, until: str | None) -> tuple[int, int]:
        """The smallest seq range covering every event whose time is in [since, until)."""
