"""The ledger: an append-only log of audit events, a Merkle tree over it, signed checkpoints.

The ledger keeps every rule; a :class:`~sealtrail.store.base.Store` only provides primitives.
Each stored entry is the event plus a ``ledger`` member the ledger adds itself
(``{"seq": n, "received": time}``), in canonical bytes (RFC 8785). Putting the sequence
number inside the hashed bytes means an entry states its own position: a swapped, deleted or
inserted row is located exactly by verification even when an attacker rebuilt every hash
around it, and a receipt's entry shows where it sits.

Writers are serialised by the store's sequencer lock (one transaction per batch), so
sequence numbers are gapless; the in-memory right edge of the tree is reloaded whenever
another process has appended in between.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, NamedTuple

import orjson

from sealtrail import merkle
from sealtrail._exceptions import (
    ConflictError,
    IntegrityError,
    NotFound,
    ProofError,
    SealtrailError,
    StorageError,
)
from sealtrail._gc import gc_paused
from sealtrail.bundle import entry_line, header_line
from sealtrail.canonical import canonicalize, canonicalize_prepared
from sealtrail.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from sealtrail.event import (
    DEFAULT_LIMITS,
    Limits,
    check_size,
    encode_shaped,
    prepare_event,
    prepare_unencoded,
    utc_now,
)
from sealtrail.merkle import NodeId, TreeBuilder
from sealtrail.note import Signer, Verifier
from sealtrail.receipt import Receipt
from sealtrail.store.base import (
    NODE_STRIDE,
    DuplicateId,
    Heads,
    SearchQuery,
    SearchRow,
    Store,
    StoredCheckpoint,
    StoredEntry,
    node_key,
)
from sealtrail.verify import (
    CHUNK_LEVEL,
    ChunkResult,
    Report,
    chunk_ranges,
    open_trusted,
    verify_log,
    verify_rows,
)

#: Batches larger than this leave their search rows to :meth:`Ledger.catch_up_index`, so a
#: bulk ingest pays only for what makes it durable and provable.
INLINE_INDEX_MAX = 256
#: Small appends are indexed this many events at a time (see ``_index_in_batches``).
INDEX_BATCH = 128
#: An append indexes an older backlog of at most this many events along with its own.
INDEX_BACKLOG_MAX = 2048
#: A search-index backlog at least this large is filled without the secondary indexes,
#: which are then built in one pass (about five times faster on SQLite).
INDEX_REBUILD_MIN = 50_000

Progress = Callable[[int], None]


class AppendResult(NamedTuple):
    """The receipt of an append: where the event sits. ``duplicate`` when it was already there.

    ``pending`` when the event is durably queued for delivery (a spooled trail) but not yet
    in the ledger: it has no index (``seq`` is -1) and no leaf hash yet.

    A named tuple rather than a dataclass: one is built per appended event.
    """

    id: str
    seq: int
    leaf_hash: bytes
    duplicate: bool = False
    pending: bool = False

    def to_json(self) -> dict[str, object]:
        if self.pending:
            return {"id": self.id, "index": None, "leaf_hash": None, "pending": True}
        return {
            "id": self.id,
            "index": self.seq,
            "leaf_hash": self.leaf_hash.hex(),
            "duplicate": self.duplicate,
        }


#: Batches up to this size go through group commit (concurrent callers share a transaction);
#: larger ones are already batched and stream straight in.
GROUP_MAX = 256


@dataclass(slots=True)
class _Pending:
    """One caller's batch waiting for a group commit."""

    events: list[Any]
    done: bool = False
    results: list[AppendResult] | None = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """When the ledger signs a checkpoint on its own (0 disables a trigger)."""

    every_events: int = 1000
    every_seconds: float = 10.0
    on_close: bool = True


def entry_event(body: bytes) -> dict[str, Any]:
    """The event a stored entry carries, without the ledger's own member."""
    entry = orjson.loads(body)
    if not isinstance(entry, dict):
        raise IntegrityError("stored entry is not a JSON object")
    entry.pop("ledger", None)
    return entry


def search_row(seq: int, event: Mapping[str, Any]) -> SearchRow:
    actor = event.get("actor")
    target = event.get("target")
    actor_id = actor.get("id") if isinstance(actor, dict) else None
    target_type = target.get("type") if isinstance(target, dict) else None
    target_id = target.get("id") if isinstance(target, dict) else None
    subject = event.get("subject")
    tenant = event.get("tenant")
    return SearchRow(
        seq=seq,
        time=str(event.get("time", "")),
        action=str(event.get("action", "")),
        outcome=str(event.get("outcome", "")),
        actor=actor_id if isinstance(actor_id, str) else None,
        target_type=target_type if isinstance(target_type, str) else None,
        target_id=target_id if isinstance(target_id, str) else None,
        tenant=tenant if isinstance(tenant, str) else None,
        subject=subject if isinstance(subject, str) else None,
    )


def _balanced_root(hashes: Sequence[bytes]) -> bytes:
    """Root of a complete subtree from its 2**k bottom hashes."""
    level = list(hashes)
    while len(level) > 1:
        level = [merkle.node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


class Ledger:
    """An append-only, tamper-evident audit log over one store."""

    def __init__(
        self,
        store: Store,
        signer: Signer | None = None,
        *,
        verifier: Verifier | None = None,
        policy: CheckpointPolicy | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        if signer is None and verifier is None:
            raise SealtrailError("a ledger needs its signing key, or at least its verifier key")
        self.store = store
        self.signer = signer
        self.verifier: Verifier = verifier if verifier is not None else signer.verifier()  # type: ignore[union-attr]
        self.origin = self.verifier.name
        self.policy = policy or CheckpointPolicy()
        self.limits = limits
        self._lock = threading.RLock()
        self._tree: TreeBuilder | None = None
        self._last_checkpoint_at = time.monotonic()
        self._timer: threading.Timer | None = None
        self._closed = False
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()
        meta = store.meta() if store.is_initialized() else {}
        vkey = meta.get("vkey")
        if vkey is not None and vkey != self.verifier.vkey():
            raise SealtrailError(
                f"the store {store.url} belongs to the log {meta.get('origin')!r} "
                f"(vkey {vkey}), not to this key ({self.verifier.vkey()})"
            )

    # -- lifecycle -------------------------------------------------------------------------
    def initialize(self) -> StoredCheckpoint:
        """Create the store and sign the empty tree, so every later state has a predecessor."""
        self.store.initialize({"origin": self.origin, "vkey": self.verifier.vkey(), "schema": "1"})
        return self.checkpoint()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            try:
                if self.policy.on_close and self.signer is not None and self.store.is_initialized():
                    latest = self.store.latest_checkpoint()
                    if latest is None or latest.size < self.store.size():
                        self.checkpoint()
            finally:
                self.store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- appending -------------------------------------------------------------------------
    def append(self, event: Mapping[str, Any]) -> AppendResult:
        return self.append_many([event])[0]

    def append_many(self, events: Iterable[Mapping[str, Any]]) -> list[AppendResult]:
        """Validate every event and append them in one durable transaction.

        Nothing is stored if any event is invalid or reuses a stored id with other content.
        """
        batch = events if isinstance(events, list) else list(events)
        return self._append(batch, validate=True)

    def append_prepared(self, prepared: Sequence[dict[str, Any]]) -> list[AppendResult]:
        """Append events that already went through :func:`~sealtrail.event.prepare_event`
        (new dicts owned by the caller, which the ledger may briefly modify)."""
        return self._append(prepared, validate=False)

    def _append(self, events: Sequence[Any], validate: bool) -> list[AppendResult]:
        if not events:
            return []
        if len(events) > GROUP_MAX:
            with self._lock, gc_paused():
                results = self._commit(events, validate)
                self._arm_timer()
            return results
        # Group commit: validate outside the lock, queue, and let whichever caller gets the
        # lock first commit every queued batch in one transaction (one fsync for all).
        batch = _Pending(
            [prepare_event(e, limits=self.limits) for e in events] if validate else list(events)
        )
        with self._queue_lock:
            self._queue.append(batch)
        with self._lock:
            if not batch.done:
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._commit_group(group)
                self._arm_timer()
        if batch.error is not None:
            raise batch.error
        assert batch.results is not None
        return batch.results

    def _commit_group(self, group: list[_Pending]) -> None:
        """Commit queued batches together; if that fails, each alone, so one caller's
        conflict or error never fails another's. Each batch stays atomic."""
        try:
            if len(group) > 1:
                try:
                    results = self._commit([e for b in group for e in b.events], False)
                except Exception:
                    pass
                else:
                    offset = 0
                    for b in group:
                        b.results = results[offset : offset + len(b.events)]
                        offset += len(b.events)
                        b.done = True
                    return
            for b in group:
                try:
                    b.results = self._commit(b.events, False)
                except Exception as exc:
                    b.error = exc
                b.done = True
        except BaseException as exc:
            # Interrupted (KeyboardInterrupt...): callers whose batch was not committed
            # must not wait for, or report, a commit that did not happen.
            for b in group:
                if not b.done:
                    b.error = exc
                    b.done = True
            raise

    def _commit(self, events: Sequence[Any], validate: bool) -> list[AppendResult]:
        """One durable transaction (the caller holds the lock).

        Optimistic: most batches are all new ids, so they are inserted straight away and the
        unique index says otherwise. Then the transaction rolls back and the batch goes
        through the slow path (:meth:`_append_locked`) in a new one, instead of a savepoint
        around every batch: the common path is five statements (begin, :meth:`Store.heads`,
        entries, nodes, commit), where it was nine for a batch of several events. Inside a
        transaction of the caller's (only a prune's, whose one event has a new id) there is
        nothing to roll back to: the slow path then runs in that transaction, or, where the
        failed statement aborted it (PostgreSQL), the caller's transaction fails."""
        try:
            try:
                return self._in_write(
                    lambda tree, heads: self._append_streaming(
                        tree, events, validate, heads.search_watermark
                    )
                )
            except DuplicateId:
                self._tree = None
            prepared = [prepare_event(e, limits=self.limits) if validate else e for e in events]
            return self._in_write(lambda tree, heads: self._append_locked(tree, prepared))
        except BaseException:
            # The transaction rolled back: forget the in-memory edge, reload it next time.
            self._tree = None
            raise

    def _in_write(
        self, append: Callable[[TreeBuilder, Heads], list[AppendResult]]
    ) -> list[AppendResult]:
        """One write transaction around ``append``: read the heads, bring the tree up to
        the store, append, sign if the policy says so."""
        with self.store.write():
            heads = self.store.heads()
            tree = self._sync_tree(heads.size)
            results = append(tree, heads)
            self._maybe_checkpoint_locked(tree, heads.checkpoint_size)
            return results

    def _append_streaming(
        self,
        tree: TreeBuilder,
        events: Sequence[Any],
        validate: bool,
        watermark: int | None = None,
    ) -> list[AppendResult]:
        """The fast path: validate, encode and hash each event as the store consumes it, so
        a database server stores early rows while later ones are being computed.
        ``watermark``: the search index's, if the caller read it in this transaction."""
        first = tree.size
        received = utc_now()
        limits = self.limits
        if not events:
            return []
        # Bytes the ledger member adds to an event: ',"ledger":{"received":"…","seq":}' + digits.
        overhead = len(b',"ledger":{"received":"' + received.encode() + b'","seq":}')
        hashes: list[bytes] = []
        ids: list[str] = []
        prepared: list[dict[str, Any]] = []
        encode = canonicalize_prepared
        sha = hashlib.sha256
        # The size check on the length without the ledger member, computed exactly only
        # for events near the limit (the member's seq digits are at most 20).
        fits = limits.max_bytes + overhead
        # Bulk appends are not indexed inline, so they need no event dicts: the compiled
        # fast path validates and encodes events of the common shape straight to bytes.
        inline_index = len(events) <= INLINE_INDEX_MAX
        shaped = validate and not inline_index

        def rows() -> Iterator[tuple[int, str, bytes, bytes]]:
            add_hash, add_id, add_entry = hashes.append, ids.append, prepared.append
            for seq, event in enumerate(events, first):
                fast = encode_shaped(event, received, seq, limits) if shaped else None
                if fast is not None:
                    event_id, body = fast
                else:
                    entry = prepare_unencoded(event, limits=limits) if validate else event
                    entry["ledger"] = {"received": received, "seq": seq}
                    body = encode(entry)
                    del entry["ledger"]
                    event_id = entry["id"]  # type: ignore[assignment]  # a str, validated
                    if inline_index:
                        add_entry(entry)
                if len(body) > fits:
                    check_size(len(body) - overhead - len(str(seq)), limits)
                leaf = sha(b"\x00" + body).digest()
                add_hash(leaf)
                add_id(event_id)
                yield seq, event_id, body, leaf

        self.store.insert_entries(rows() if self.store.streams_inserts else list(rows()))
        self.store.insert_nodes(
            [
                (node_key((level, index)), value)
                for level, index, value in tree.extend_strided(hashes, NODE_STRIDE)
            ]
        )
        seqs = range(first, first + len(ids))
        if inline_index:
            self._index_in_batches(first, seqs, prepared, watermark)
        return list(map(AppendResult, ids, seqs, hashes))

    def _index_in_batches(
        self,
        first: int,
        seqs: range,
        prepared: Sequence[Mapping[str, Any]],
        watermark: int | None = None,
    ) -> None:
        """Index small appends :data:`INDEX_BATCH` at a time, in the transaction of the
        append that completes a batch. Each search row touches seven B-trees; writing them
        one event at a time cost three times the rest of a one-event commit. Queries catch
        up the few rows still waiting first, so nobody sees the difference."""
        if watermark is None:
            watermark = self.store.search_watermark()
        backlog = first - watermark
        if backlog < 0 or backlog > INDEX_BACKLOG_MAX or backlog + len(prepared) < INDEX_BATCH:
            return
        rows = self._stored_search_rows(watermark, first) if backlog else []
        rows.extend(search_row(q, e) for q, e in zip(seqs, prepared, strict=True))
        self.store.insert_search(rows)

    def _arm_timer(self) -> None:
        """After an append, make sure a checkpoint follows within ``every_seconds`` even if
        no further event arrives (the append path alone only signs when the next one does)."""
        seconds = self.policy.every_seconds
        if seconds <= 0 or self.signer is None or self._timer is not None or self._closed:
            return
        timer = threading.Timer(seconds, self._timed_checkpoint)
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _timed_checkpoint(self) -> None:
        with self._lock:
            self._timer = None
            if self._closed:
                return
            try:
                self.checkpoint()
            except SealtrailError as exc:
                # A background thread has nobody to raise to; the next append or checkpoint
                # call will meet the same problem and raise it.
                logging.getLogger("sealtrail").error("timed checkpoint failed: %s", exc)

    def _append_locked(
        self, tree: TreeBuilder, prepared: Sequence[dict[str, Any]]
    ) -> list[AppendResult]:
        """The path for batches with ids already stored or repeated: look them up, append
        only the new events, and answer duplicates with their original receipts."""
        existing = self.store.find_ids([e["id"] for e in prepared])
        appended, results = self._classify_duplicates(prepared, existing)
        fresh = self._append_streaming(tree, appended, validate=False) if appended else []
        placed = {r.id: r for r in fresh}
        return [
            (placed[r.id]._replace(duplicate=True) if r.duplicate else placed[r.id])
            if r.seq < 0
            else r
            for r in results
        ]

    def _classify_duplicates(
        self, prepared: Sequence[dict[str, Any]], existing: Mapping[str, StoredEntry]
    ) -> tuple[list[dict[str, Any]], list[AppendResult]]:
        """The slow path, for batches holding ids already stored or repeated in the batch.

        Returns the events to append and, per input event, either its final result (for a
        duplicate) or a placeholder with seq -1 (filled once the event is appended).
        """
        appended: list[dict[str, Any]] = []
        results: list[AppendResult] = []
        seen: dict[str, dict[str, Any]] = {}
        for event in prepared:
            eid = event["id"]
            if eid in existing:
                stored = existing[eid]
                self._check_same(stored, event)
                results.append(AppendResult(eid, stored.seq, stored.leaf_hash, True))
            elif eid in seen:
                if canonicalize(seen[eid]) != canonicalize(event):
                    raise ConflictError(
                        f"event id {eid} appears twice in the batch with different content"
                    )
                results.append(AppendResult(eid, -1, b"", True))
            else:
                seen[eid] = event
                appended.append(event)
                results.append(AppendResult(eid, -1, b""))
        return appended, results

    def _check_same(self, stored: StoredEntry, event: Mapping[str, Any]) -> None:
        if stored.body is None:
            raise ConflictError(f"event id {stored.id} was stored and has since been pruned")
        if canonicalize(entry_event(stored.body)) != canonicalize(event):
            raise ConflictError(
                f"event id {stored.id} is already stored (index {stored.seq}) "
                "with different content"
            )

    # -- the tree --------------------------------------------------------------------------
    def _sync_tree(self, size: int | None = None) -> TreeBuilder:
        """The in-memory tree, reloaded if the store's ``size`` (read now if not given, in
        the caller's transaction) says another writer appended or a rollback undid it."""
        if size is None:
            size = self.store.size()
        if self._tree is None or self._tree.size != size:
            plan = merkle.root_plan(size)
            hashes = self._node_hashes(plan)
            self._tree = TreeBuilder(size, [hashes[n] for n in plan])
        return self._tree

    def _node_hashes(self, wanted: Iterable[NodeId]) -> dict[NodeId, bytes]:
        """Hashes of complete subtrees, from the stored levels (leaves and every 4th level)."""
        covers: dict[NodeId, tuple[int, list[int]]] = {}
        leaf_seqs: set[int] = set()
        keys: set[int] = set()
        for node in wanted:
            level, index = node
            base = level - level % NODE_STRIDE
            span = 1 << (level - base)
            members = list(range(index * span, index * span + span))
            covers[node] = (base, members)
            if base == 0:
                leaf_seqs.update(members)
            else:
                keys.update(node_key((base, m)) for m in members)
        leaves = self.store.leaf_hashes(leaf_seqs) if leaf_seqs else {}
        stored = self.store.nodes(keys) if keys else {}
        out: dict[NodeId, bytes] = {}
        for node, (base, members) in covers.items():
            try:
                if base == 0:
                    hashes = [leaves[m] for m in members]
                else:
                    hashes = [stored[node_key((base, m))] for m in members]
            except KeyError as missing:
                raise IntegrityError(
                    f"tree node {node} cannot be computed: stored data is missing ({missing})"
                ) from None
            out[node] = _balanced_root(hashes)
        return out

    def root(self, size: int | None = None) -> bytes:
        """The tree's root at ``size`` (default: now), from stored nodes."""
        with self._lock:
            current = self.store.size()
            size = current if size is None else size
            if not 0 <= size <= current:
                raise NotFound(f"the log has {current} entries, not {size}")
            plan = merkle.root_plan(size)
            hashes = self._node_hashes(plan)
            return merkle.fold([hashes[n] for n in plan])

    def _proof(self, plan: list[list[NodeId]]) -> list[bytes]:
        return merkle.assemble(plan, self._node_hashes(merkle.plan_nodes(plan)))

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        with self._lock:
            current = self.store.size()
            if not 0 <= size1 <= size2 <= current:
                raise NotFound(
                    f"no consistency proof from {size1} to {size2} in a log of {current}"
                )
            return self._proof(merkle.consistency_plan(size1, size2))

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint(self) -> StoredCheckpoint:
        """The latest checkpoint, signing a new one first if the tree grew since."""
        with self._lock:
            latest = self.store.latest_checkpoint()
            if latest is not None and latest.size == self.store.size():
                return latest
            if self.signer is None:
                if latest is None:
                    raise NotFound("the log has no checkpoint and this ledger cannot sign")
                return latest
            try:
                with self.store.write():
                    tree = self._sync_tree()
                    return self._sign_locked(tree)
            except BaseException:
                self._tree = None
                raise

    def _maybe_checkpoint_locked(self, tree: TreeBuilder, last_size: int | None = None) -> None:
        """Sign if the policy says one is due. ``last_size``: the latest checkpoint's size,
        if the caller read it in this transaction (-1: none)."""
        if self.signer is None:
            return
        policy = self.policy
        latest: StoredCheckpoint | bool | None = False  # not read: _sign_locked reads it
        if last_size is None:
            latest = self.store.latest_checkpoint()
            last_size = latest.size if latest is not None else -1
        grown = tree.size - last_size
        if grown <= 0:
            return
        due_by_count = policy.every_events > 0 and grown >= policy.every_events
        due_by_time = (
            policy.every_seconds > 0
            and time.monotonic() - self._last_checkpoint_at >= policy.every_seconds
        )
        if due_by_count or due_by_time:
            self._sign_locked(tree, latest)

    def _sign_locked(
        self, tree: TreeBuilder, latest: StoredCheckpoint | bool | None = False
    ) -> StoredCheckpoint:
        """Sign the current tree head, only after proving it extends the last one we signed.

        This is what keeps the log from ever signing two inconsistent checkpoints: if the
        stored tree was altered, the consistency proof built from it fails and nothing is
        signed.
        """
        assert self.signer is not None
        if latest is False:
            latest = self.store.latest_checkpoint()
        assert latest is None or isinstance(latest, StoredCheckpoint)
        size, root = tree.size, tree.root()
        if latest is not None:
            if latest.size > size:
                raise IntegrityError(
                    f"the store has {size} entries but this log already signed a checkpoint "
                    f"of size {latest.size}: it was truncated or rolled back; refusing to sign"
                )
            if latest.size == size:
                if latest.root_hash != root:
                    raise IntegrityError(
                        f"stored tree of size {size} does not match the signed checkpoint; "
                        "refusing to sign"
                    )
                return latest
            try:
                signed = open_checkpoint(latest.note, self.verifier)
                if signed.size != latest.size or signed.root_hash != latest.root_hash:
                    raise IntegrityError("stored checkpoint columns disagree with its note")
                proof = self._proof(merkle.consistency_plan(latest.size, size))
                merkle.verify_consistency(latest.size, size, proof, latest.root_hash, root)
            except (ProofError, IntegrityError) as exc:
                raise IntegrityError(
                    f"the stored tree does not extend the last signed checkpoint "
                    f"(size {latest.size}): {exc}; refusing to sign"
                ) from exc
        note = sign_checkpoint(Checkpoint(self.origin, size, root), self.signer)
        stored = StoredCheckpoint(size, root, note, utc_now())
        self.store.insert_checkpoint(stored)
        self._last_checkpoint_at = time.monotonic()
        return stored

    # -- reading ---------------------------------------------------------------------------
    def size(self) -> int:
        with self._lock:
            return self.store.size()

    def get(self, event_id: str) -> StoredEntry:
        with self._lock:
            entry = self.store.get_entry_by_id(event_id.strip().lower())
        if entry is None:
            raise NotFound(f"no event with id {event_id}")
        return entry

    def get_seq(self, seq: int) -> StoredEntry:
        with self._lock:
            entry = self.store.get_entry(seq)
        if entry is None:
            raise NotFound(f"no event at index {seq}")
        return entry

    def prove(self, event_id: str) -> Receipt:
        """A ``c2sp.org/tlog-proof@v1`` receipt for one event, checked before it is returned."""
        entry = self.get(event_id)
        with self._lock:
            latest = self.store.latest_checkpoint()
            if latest is None or latest.size <= entry.seq:
                latest = self.checkpoint()
            if latest.size <= entry.seq:
                raise NotFound(f"event {event_id} is not covered by a signed checkpoint yet")
            proof = self._proof(merkle.inclusion_plan(entry.seq, latest.size))
        try:
            merkle.verify_inclusion(
                entry.leaf_hash, entry.seq, latest.size, proof, latest.root_hash
            )
        except ProofError as exc:
            raise IntegrityError(
                f"the stored tree does not prove event {event_id}: {exc} (run verify)"
            ) from exc
        return Receipt(index=entry.seq, proof=tuple(proof), checkpoint=latest.note)

    # -- search ----------------------------------------------------------------------------
    def catch_up_index(self, progress: Progress | None = None, chunk: int = 5000) -> int:
        """Add search rows for every entry appended without them; returns how many.

        A backlog larger than :data:`INDEX_REBUILD_MIN` (and than what is already indexed)
        is filled with the secondary indexes dropped, then they are built once.
        """
        # Every use of the store holds the lock: the timed checkpoint writes from its own
        # thread through the same connection.
        with self._lock:
            watermark = self.store.search_watermark()
            backlog = self.store.size() - watermark
            rebuild = backlog >= INDEX_REBUILD_MIN and backlog > watermark
            if rebuild:
                self.store.search_indexes(False)
        try:
            return self._fill_index(progress, chunk)
        finally:
            if rebuild:
                with self._lock:
                    self.store.search_indexes(True)

    def _fill_index(self, progress: Progress | None, chunk: int) -> int:
        done = 0
        while True:
            with self._lock:
                start = self.store.search_watermark()
                end = min(self.store.size(), start + chunk)
                if start >= end:
                    return done
                with self.store.write():
                    self.store.insert_search(self._stored_search_rows(start, end))
            done += end - start
            if progress is not None:
                progress(end - start)

    def _stored_search_rows(self, start: int, end: int) -> list[SearchRow]:
        loads = orjson.loads
        rows = []
        for seq, _id, body, _leaf in self.store.iter_entry_rows(start, end):
            if body is None:
                rows.append(SearchRow(seq, "", "", "", None, None, None, None, None))
            else:
                rows.append(search_row(seq, loads(body)))
        return rows

    def pending_index(self) -> int:
        with self._lock:
            return self.store.size() - self.store.search_watermark()

    def pruned_of_type(
        self, target_type: str, *, after: int = -1, until: str = "9999", limit: int = 20
    ) -> list[int]:
        """Indexes of pruned entries (bodies removed, proofs kept) whose target type was
        ``target_type``, after index ``after`` and with a time before ``until`` (exclusive,
        normalised RFC 3339), at most ``limit``: what a history can no longer read."""
        self.catch_up_index()
        with self._lock:
            return self.store.pruned_of_type(target_type, after, until, limit)

    def query(self, query: SearchQuery) -> list[StoredEntry]:
        self.catch_up_index()
        with self._lock, self.store.snapshot():
            seqs = self.store.search(query)
            found = self.store.get_entries(seqs)
            return [found[seq] for seq in seqs if seq in found]

    def iter_query(self, query: SearchQuery, page: int = 1000) -> Iterator[StoredEntry]:
        """Every match, paginated by keyset so memory stays flat."""
        remaining = query.limit
        after = query.after
        while remaining > 0:
            q = SearchQuery(**{**_fields(query), "after": after, "limit": min(page, remaining)})
            batch = self.query(q)
            if not batch:
                return
            yield from batch
            remaining -= len(batch)
            after = batch[-1].seq

    # -- verification and export ---------------------------------------------------------
    def verify(
        self,
        trusted: str | None = None,
        progress: Progress | None = None,
        *,
        workers: int | None = None,
        chunk_level: int = CHUNK_LEVEL,
    ) -> Report:
        """Run the full checklist of :mod:`sealtrail.verify`.

        ``trusted`` is a checkpoint note the caller saved earlier; it must verify with this
        log's key, else :class:`~sealtrail.SignatureError` (there is nothing to compare with).
        Logs of more than two chunks are checked by ``workers`` processes (default: one per
        CPU), each reading its own chunks from the store.
        """
        trusted_cp = open_trusted(trusted, self.verifier) if trusted is not None else None
        with self._lock, self.store.snapshot():
            size = self.store.size()
            checkpoints = self.store.checkpoints()
            interesting = {c.size for c in checkpoints}
            if trusted_cp is not None:
                interesting.add(trusted_cp.size)
            if workers is None:
                workers = min(os.cpu_count() or 1, 8)
            common = {
                "prunes": self.store.prunes(),
                "upper_nodes": self.store.nodes_from_level(chunk_level + NODE_STRIDE),
                "trusted": trusted_cp,
                "progress": progress,
                "chunk_level": chunk_level,
            }
            ranges = chunk_ranges(size, chunk_level)
            if workers < 2 or len(ranges) < 3 or not self.store.shareable:
                return verify_rows(
                    self.store.iter_entry_rows(0, size),
                    size,
                    checkpoints,
                    self.verifier,
                    stored_level=self.store.iter_level,
                    **common,  # type: ignore[arg-type]
                )
            chunks = _parallel_chunks(
                self.store.reopen_url(), ranges, sorted(interesting), chunk_level, workers
            )
            try:
                return verify_log(chunks, checkpoints, self.verifier, **common)  # type: ignore[arg-type]
            finally:
                chunks.close()

    def export(
        self,
        out: BinaryIO,
        begin: int = 0,
        end: int | None = None,
        progress: Progress | None = None,
    ) -> tuple[int, int, StoredCheckpoint]:
        """Write the entries [begin, end) as a bundle (see :mod:`sealtrail.bundle`)."""
        with self._lock:
            latest = self.checkpoint()
            end = latest.size if end is None else min(end, latest.size)
            begin = max(0, min(begin, end))
            with self.store.snapshot():
                left_nodes = merkle.range_nodes(0, begin)
                right_nodes = merkle.range_nodes(end, latest.size)
                hashes = self._node_hashes(left_nodes + right_nodes)
                out.write(
                    header_line(
                        self.origin,
                        begin,
                        end,
                        latest.note,
                        [hashes[n] for n in left_nodes],
                        [hashes[n] for n in right_nodes],
                    )
                )
                done = 0
                for entry in self.store.iter_entries(begin, end):
                    out.write(entry_line(entry.seq, entry.body, entry.leaf_hash))
                    done += 1
                    if progress is not None and done == 4096:
                        progress(done)
                        done = 0
                if progress is not None and done:
                    progress(done)
        return begin, end, latest

    # -- pruning ---------------------------------------------------------------------------
    def prune(
        self, seqs: Iterable[int], reason: str, actor: str = "system:sealtrail"
    ) -> AppendResult:
        """Remove the bodies of entries, keeping their leaf hashes (and so every proof).

        The prune is itself an audit event, appended first; verification accepts a missing
        body only when such an event covers it.
        """
        wanted = sorted(set(int(s) for s in seqs))
        if not wanted:
            raise SealtrailError("nothing to prune")
        # Index first: a pruned entry's search row keeps its action, target type and time
        # (what a history needs to know it is missing something), made from the body.
        self.catch_up_index()
        with self._lock:
            size = self.store.size()
            bad = [s for s in wanted if not 0 <= s < size]
            if bad:
                raise NotFound(f"no entries at indexes {bad[:5]}")
            already = self.store.prunes()
            wanted = [s for s in wanted if s not in already]
            if not wanted:
                raise SealtrailError("those entries are already pruned")
            event = prepare_event(
                {
                    "action": "sealtrail.retention.prune",
                    "actor": {"id": actor, "type": "system"},
                    "reason": reason,
                    "data": {"ranges": _ranges(wanted), "count": len(wanted)},
                },
                limits=Limits(max_bytes=1 << 24, max_depth=self.limits.max_depth),
            )
            # One transaction: the prune event and the removal land together or not at all.
            try:
                with self.store.write():
                    # Not the group path: other callers' events must not join a
                    # transaction that this prune may still roll back.
                    result = self._commit([event], False)[0]
                    self.store.prune_bodies(wanted, result.id, utc_now())
            except BaseException:
                self._tree = None
                raise
        return result


def _parallel_chunks(
    url: str, ranges: list[tuple[int, int]], interesting: list[int], chunk_level: int, workers: int
) -> Generator[ChunkResult, None, None]:
    """Chunk results in order, computed by ``workers`` subprocesses (chunk i by worker
    i mod workers, each streaming its chunks back in order)."""
    procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
    try:
        for k in range(workers):
            errors: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in finally)
            proc = subprocess.Popen(
                [sys.executable, "-m", "sealtrail._verify_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
            )
            procs.append((proc, errors))
            assert proc.stdin is not None
            proc.stdin.write(pickle.dumps((url, ranges[k::workers], interesting, chunk_level)))
            proc.stdin.close()
        for i in range(len(ranges)):
            proc, errors = procs[i % workers]
            assert proc.stdout is not None
            header = proc.stdout.read(8)
            data = proc.stdout.read(int.from_bytes(header, "big")) if len(header) == 8 else b""
            if len(header) != 8 or not data:
                proc.wait()
                errors.seek(0)
                lines = errors.read().decode("utf-8", "replace").strip().splitlines()
                reason = lines[-1] if lines else f"exit status {proc.returncode}"
                raise StorageError(f"a verification worker failed: {reason}")
            yield pickle.loads(data)
    finally:
        for proc, errors in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            errors.close()


def _ranges(seqs: Sequence[int]) -> list[list[int]]:
    """Sorted seqs as half-open [begin, end) ranges, compact enough for one event."""
    out: list[list[int]] = []
    for s in seqs:
        if out and out[-1][1] == s:
            out[-1][1] = s + 1
        else:
            out.append([s, s + 1])
    return out


def _fields(query: SearchQuery) -> dict[str, Any]:
    return {f: getattr(query, f) for f in query.__dataclass_fields__}
