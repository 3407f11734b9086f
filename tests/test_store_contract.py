"""One contract for every storage backend: the ledger must behave, and fail, the same way.

Each test runs on SQLite and on PostgreSQL (``-m "not postgres"`` leaves the latter out).
PostgreSQL tests get a fresh schema in a database of their own (see ``tests/pg.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest

from sealtrail import merkle
from sealtrail._exceptions import (
    ConflictError,
    InvalidEvent,
    NotFound,
    SealtrailError,
    StorageError,
)
from sealtrail.checkpoint import open_checkpoint
from sealtrail.event import new_event_id
from sealtrail.ledger import (
    INDEX_BATCH,
    INLINE_INDEX_MAX,
    CheckpointPolicy,
    Ledger,
    entry_event,
)
from sealtrail.note import Signer
from sealtrail.receipt import Receipt, verify_receipt
from sealtrail.store import open_store
from sealtrail.store.base import Heads, SearchQuery, Store
from sealtrail.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from pg import TestDatabase

ORIGIN = "test.example/log"
ACTIONS = ("user.login", "user.email.update", "user.password.reset", "doc.read", "doc.delete")
OUTCOMES = ("success", "failure", "denied", "error")

# The tables the guards protect, with a statement that touches every row.
GUARDED_UPDATES = {
    "entries": ["UPDATE entries SET body = NULL", "UPDATE entries SET id = 'forged'"],
    "nodes": ["UPDATE nodes SET hash = hash"],
    "checkpoints": ["UPDATE checkpoints SET note = 'forged'"],
    "prunes": ["UPDATE prunes SET by_event = 'forged'"],
    "meta": ["UPDATE meta SET value = 'forged'"],
}


# ---------------------------------------------------------------------------------------------
# Backends


class Backend:
    """Where a store lives, how to open it, and a raw connection for attacks."""

    name: str
    url: str
    errors: tuple[type[BaseException], ...]

    def open(self) -> Store:
        return open_store(self.url)

    def execute(self, statement: str) -> None:
        """Run raw SQL on the store's tables, in its own transaction, guards in place."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class SQLiteBackend(Backend):
    name = "sqlite"
    errors = (sqlite3.Error,)

    def __init__(self, directory: Path) -> None:
        self.path = directory / "trail.db"
        self.url = f"sqlite:///{self.path}"

    def execute(self, statement: str) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute(statement)
        finally:
            db.close()


class PostgresBackend(Backend):
    name = "postgres"

    def __init__(self, database: TestDatabase) -> None:
        import psycopg

        self.database = database
        self.url = database.fresh_schema_url()
        self.errors = (psycopg.Error,)
        self._raw: Any = None

    def execute(self, statement: str) -> None:
        if self._raw is None:
            self._raw = self.database.raw(self.url)
        self._raw.execute(statement)

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b: Backend
    if request.param == "sqlite":
        b = SQLiteBackend(tmp_path)
    else:
        b = PostgresBackend(request.getfixturevalue("pg_database"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate(ORIGIN)


@pytest.fixture
def opened(backend: Backend, signer: Signer) -> Iterator[Callable[..., Ledger]]:
    """Open ledgers on the backend's store (every one is closed at the end)."""
    ledgers: list[Ledger] = []

    def make(policy: CheckpointPolicy | None = None) -> Ledger:
        ledger = Ledger(backend.open(), signer, policy=policy)
        ledgers.append(ledger)
        return ledger

    yield make
    for ledger in ledgers:
        # Close the ledger (stopping its checkpoint timer) without a closing checkpoint.
        ledger.policy = dataclasses.replace(ledger.policy, on_close=False)
        with contextlib.suppress(SealtrailError):
            ledger.close()


@pytest.fixture
def ledger(opened: Callable[..., Ledger]) -> Ledger:
    led = opened(CheckpointPolicy(every_events=0, every_seconds=0, on_close=False))
    led.initialize()
    return led


def event(i: int, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": new_event_id(),
        "time": f"2026-03-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z",  # i < 86400
        "action": ACTIONS[i % len(ACTIONS)],
        "outcome": OUTCOMES[i % len(OUTCOMES)],
        "actor": {"id": f"user:{i % 7}", "type": "user"},
        "target": {"type": "doc" if i % 2 else "account", "id": f"t{i % 11}"},
        "tenant": f"tenant-{i % 3}",
        "data": {"n": i},
    }
    out.update(fields)
    return out


def events(begin: int, end: int) -> list[dict[str, Any]]:
    return [event(i) for i in range(begin, end)]


def all_leaves(ledger: Ledger) -> list[bytes]:
    return [e.leaf_hash for e in ledger.store.iter_entries()]


def assert_gapless(ledger: Ledger, size: int) -> None:
    assert ledger.size() == size
    assert [e.seq for e in ledger.store.iter_entries()] == list(range(size))


# ---------------------------------------------------------------------------------------------
# Appending


def test_append_one_and_many(ledger: Ledger) -> None:
    first = event(0)
    one = ledger.append(first)
    assert (one.id, one.seq, one.duplicate) == (first["id"], 0, False)
    stored = ledger.get(first["id"])
    assert stored.seq == 0 and stored.id == first["id"]
    assert stored.body is not None
    assert one.leaf_hash == stored.leaf_hash == merkle.leaf_hash(stored.body)
    body = orjson.loads(stored.body)
    assert body["ledger"]["seq"] == 0
    assert entry_event(stored.body)["actor"] == first["actor"]

    batch = events(1, 120)
    results = ledger.append_many(batch)
    assert [r.seq for r in results] == list(range(1, 120))
    assert [r.id for r in results] == [e["id"] for e in batch]
    assert not any(r.duplicate for r in results)
    assert_gapless(ledger, 120)
    for r in results[::13]:
        assert ledger.get_seq(r.seq).id == r.id
        assert ledger.get(r.id.upper()).seq == r.seq  # ids are matched normalised
        entry = ledger.store.get_entry_by_id(r.id)
        assert entry is not None and entry.leaf_hash == r.leaf_hash
    assert ledger.store.get_entry(120) is None
    assert ledger.store.get_entry_by_id(new_event_id()) is None
    with pytest.raises(NotFound):
        ledger.get_seq(120)
    with pytest.raises(NotFound):
        ledger.get(new_event_id())
    assert ledger.append_many([]) == []
    assert [e.seq for e in ledger.store.iter_entries(100, 105)] == [100, 101, 102, 103, 104]


def test_heads_are_size_index_watermark_and_latest_checkpoint(ledger: Ledger) -> None:
    store = ledger.store
    with ledger._lock:  # read as the ledger reads, under its lock
        assert store.heads() == Heads(0, 0, 0)  # initialised: the empty tree's checkpoint
    ledger.append(event(0))  # one event: indexed later, with a batch of them
    with ledger._lock:
        assert store.heads() == Heads(1, 0, 0)
        assert (store.size(), store.search_watermark()) == (1, 0)
    ledger.append_many(events(1, 300))
    ledger.checkpoint()
    ledger.query(SearchQuery(limit=1))  # the index catches up first
    with ledger._lock:
        latest = store.latest_checkpoint()
        assert latest is not None and latest.size == 300
        assert store.heads() == Heads(300, 300, 300)
        assert (store.size(), store.search_watermark()) == (300, 300)


def test_same_event_twice_is_stored_once(ledger: Ledger) -> None:
    ev = event(1)
    original = ledger.append(ev)
    again = ledger.append(dict(ev))
    assert again.duplicate
    assert (again.id, again.seq, again.leaf_hash) == (original.id, original.seq, original.leaf_hash)
    assert ledger.size() == 1
    # In a batch with new events: the new ones are appended, the old one is reported.
    mixed = ledger.append_many([event(2), ev, event(3)])
    assert [r.seq for r in mixed] == [1, 0, 2]
    assert [r.duplicate for r in mixed] == [False, True, False]
    assert_gapless(ledger, 3)


def test_duplicates_within_one_batch(ledger: Ledger) -> None:
    a, b = event(1), event(2)
    results = ledger.append_many([a, b, dict(a), a])
    assert [r.seq for r in results] == [0, 1, 0, 0]
    assert [r.duplicate for r in results] == [False, False, True, True]
    assert_gapless(ledger, 2)


def test_same_id_other_content_is_a_conflict_and_stores_nothing(ledger: Ledger) -> None:
    ev = event(1)
    ledger.append(ev)
    fresh = event(2)
    forged = {**ev, "outcome": "failure" if ev["outcome"] != "failure" else "success"}
    with pytest.raises(ConflictError):
        ledger.append_many([fresh, forged])
    assert ledger.size() == 1
    with pytest.raises(NotFound):
        ledger.get(fresh["id"])
    # Within one batch.
    twin = event(3)
    with pytest.raises(ConflictError):
        ledger.append_many([twin, {**twin, "reason": "other"}])
    assert ledger.size() == 1
    # The ledger still appends afterwards, gaplessly.
    assert ledger.append(fresh).seq == 1
    assert_gapless(ledger, 2)


def test_an_invalid_event_rejects_the_whole_batch(ledger: Ledger) -> None:
    ledger.append(event(0))
    bad = event(2)
    del bad["action"]
    good = event(1)
    with pytest.raises(InvalidEvent) as caught:
        ledger.append_many([good, bad, event(3)])
    assert caught.value.field == "action"
    with pytest.raises(InvalidEvent):
        ledger.append_many([good, {**event(4), "outcome": "maybe"}])
    assert ledger.size() == 1
    with pytest.raises(NotFound):
        ledger.get(good["id"])
    assert ledger.append(good).seq == 1


# ---------------------------------------------------------------------------------------------
# Guards (I2)


def test_database_guards_refuse_update_and_delete(ledger: Ledger, backend: Backend) -> None:
    ledger.append_many(events(0, 40))  # 40 leaves: two stored level-4 nodes
    ledger.checkpoint()
    ledger.prune([5], reason="retention test")
    before = (ledger.size(), ledger.root(), len(ledger.store.checkpoints()))
    statements = [s for table in GUARDED_UPDATES.values() for s in table]
    statements += [f"DELETE FROM {table}" for table in GUARDED_UPDATES]
    statements += [
        "UPDATE entries SET body = NULL WHERE seq = 7",  # no prune covers it
        "UPDATE entries SET leaf_hash = leaf_hash WHERE seq = 7",
        "UPDATE entries SET seq = seq + 1000 WHERE seq = 39",
        "DELETE FROM entries WHERE seq = 39",
    ]
    if backend.name == "postgres":
        statements += [f"TRUNCATE {table}" for table in GUARDED_UPDATES]
        statements += ["TRUNCATE entries, nodes, checkpoints, prunes, meta CASCADE"]
    for statement in statements:
        with pytest.raises(backend.errors, match="append-only"):
            backend.execute(statement)
    assert (ledger.size(), ledger.root(), len(ledger.store.checkpoints())) == before
    assert ledger.get_seq(7).body is not None
    assert ledger.store.meta()["origin"] == ORIGIN
    report = ledger.verify()
    assert report.ok, report.findings
    assert report.pruned == 1


def test_only_a_recorded_prune_may_clear_a_body(ledger: Ledger, backend: Backend) -> None:
    ledger.append_many(events(0, 10))
    # A prunes row alone does not let other columns change with the body.
    backend.execute("INSERT INTO prunes(seq, by_event, pruned_at) VALUES (3, 'x', 'now')")
    with pytest.raises(backend.errors, match="append-only"):
        backend.execute("UPDATE entries SET body = NULL, id = 'forged' WHERE seq = 3")
    with pytest.raises(backend.errors, match="append-only"):
        backend.execute("UPDATE entries SET body = NULL WHERE seq = 4")
    # A body cannot come back once cleared, nor be rewritten.
    with pytest.raises(backend.errors, match="append-only"):
        backend.execute("UPDATE entries SET body = body WHERE seq = 2")
    # The derived search index stays writable (it is rebuilt from bodies, never trusted).
    ledger.catch_up_index()
    backend.execute("UPDATE search SET actor = 'someone' WHERE seq = 1")
    backend.execute("DELETE FROM search WHERE seq = 9")


def test_writes_roll_back_on_error(ledger: Ledger) -> None:
    ledger.append_many(events(0, 5))
    with pytest.raises(RuntimeError), ledger.store.write():
        ledger.store.insert_entries([(5, new_event_id(), b"{}", merkle.leaf_hash(b"{}"))])
        raise RuntimeError("boom")
    assert ledger.size() == 5
    # A storage failure inside a write (a duplicate seq) surfaces as StorageError only.
    with pytest.raises(StorageError), ledger.store.write():
        ledger.store.insert_entries([(4, new_event_id(), b"{}", merkle.leaf_hash(b"{}"))])
    assert ledger.append(event(5)).seq == 5
    assert ledger.verify().ok


# ---------------------------------------------------------------------------------------------
# Checkpoints, roots and proofs


def test_checkpoints(opened: Callable[..., Ledger], signer: Signer) -> None:
    ledger = opened(CheckpointPolicy(every_events=0, every_seconds=0, on_close=False))
    empty = ledger.initialize()
    assert empty.size == 0 and empty.root_hash == merkle.EMPTY_ROOT
    assert ledger.initialize() == empty  # idempotent
    assert open_checkpoint(empty.note, signer.verifier()).size == 0
    ledger.append_many(events(0, 10))
    assert ledger.store.latest_checkpoint() == empty  # automatic checkpoints are off
    signed = ledger.checkpoint()
    assert signed.size == 10
    assert signed.root_hash == merkle.root_of(all_leaves(ledger))
    opened_cp = open_checkpoint(signed.note, signer.verifier())
    assert (opened_cp.size, opened_cp.root_hash) == (10, signed.root_hash)
    assert ledger.checkpoint() == signed  # nothing new to sign

    ledger.policy = CheckpointPolicy(every_events=25, every_seconds=0, on_close=False)
    for start in range(10, 110, 10):
        ledger.append_many(events(start, start + 10))
    assert [c.size for c in ledger.store.checkpoints()] == [0, 10, 40, 70, 100]
    for cp in ledger.store.checkpoints():
        assert cp.root_hash == ledger.root(cp.size)
    assert ledger.store.latest_checkpoint() == ledger.store.checkpoints()[-1]


def test_roots_match_the_reference_for_every_size(ledger: Ledger) -> None:
    for start, n in ((0, 1), (1, 2), (3, 14), (17, 47), (64, 200), (264, 36)):
        ledger.append_many(events(start, start + n))
    leaves = all_leaves(ledger)
    assert len(leaves) == 300
    for size in [*range(0, 70), *range(70, 301, 9), 127, 128, 129, 255, 256, 257, 300]:
        assert ledger.root(size) == merkle.root_of(leaves[:size]), size
    with pytest.raises(NotFound):
        ledger.root(301)


def test_every_receipt_and_consistency_proof_verifies(ledger: Ledger, signer: Signer) -> None:
    batch = events(0, 300)
    for start in range(0, 300, 37):
        ledger.append_many(batch[start : start + 37])
    ledger.checkpoint()
    verifier = signer.verifier()
    for ev in batch:
        receipt = ledger.prove(ev["id"])
        body = ledger.get(ev["id"]).body
        assert body is not None
        checkpoint = verify_receipt(receipt, body, verifier)
        assert checkpoint.size == 300
        assert verify_receipt(receipt.to_text(), body, verifier) == checkpoint
    tampered = Receipt.from_text(ledger.prove(batch[0]["id"]).to_text())
    with pytest.raises(SealtrailError):
        body = ledger.get(batch[1]["id"]).body
        assert body is not None
        verify_receipt(tampered, body, verifier)

    pairs = [(1, 300), (1, 2), (7, 8), (16, 300), (100, 257), (255, 256), (299, 300), (64, 64)]
    for a, b in pairs:
        proof = ledger.consistency_proof(a, b)
        merkle.verify_consistency(a, b, proof, ledger.root(a), ledger.root(b))
    with pytest.raises(NotFound):
        ledger.consistency_proof(10, 301)


# ---------------------------------------------------------------------------------------------
# Search


def _expect(evs: list[dict[str, Any]], keep: Callable[[dict[str, Any]], bool]) -> list[str]:
    return [e["id"] for e in evs if keep(e)]


def _ids(ledger: Ledger, **query: Any) -> list[str]:
    return [e.id for e in ledger.query(SearchQuery(**query))]


def test_search(ledger: Ledger) -> None:
    evs = events(0, 140)
    # Small batches are indexed inline, INDEX_BATCH events at a time.
    for start in range(0, 120, 20):
        ledger.append_many(evs[start : start + 20])
    assert ledger.pending_index() == 120 < INDEX_BATCH
    ledger.append_many(evs[120:140])
    assert ledger.pending_index() == 0
    big = events(140, 140 + INLINE_INDEX_MAX + 100)  # one bulk batch: indexed later
    ledger.append_many(big)
    assert ledger.pending_index() == len(big)
    evs += big
    limit = len(evs) + 10

    def check(keep: Callable[[dict[str, Any]], bool], **query: Any) -> None:
        assert _ids(ledger, limit=limit, **query) == _expect(evs, keep), query

    check(lambda e: e["actor"]["id"] == "user:3", actor="user:3")
    assert ledger.pending_index() == 0  # the query caught the index up
    check(lambda e: e["action"] == "user.login", action="user.login")
    check(lambda e: e["action"].startswith("user."), action="user.*")
    check(lambda e: e["action"].startswith("doc."), action="doc.*")
    check(lambda e: False, action="use.*")
    check(lambda e: False, action="user")
    check(lambda e: e["target"]["id"] == "t4", target="t4")
    check(lambda e: e["target"] == {"type": "doc", "id": "t5"}, target="doc:t5")
    check(lambda e: e["outcome"] == "denied", outcome="denied")
    check(lambda e: e["tenant"] == "tenant-2", tenant="tenant-2")
    check(
        lambda e: e["actor"]["id"] == "user:1" and e["outcome"] == "failure",
        actor="user:1",
        outcome="failure",
    )
    since, until = "2026-03-01T00:01:00.000000Z", "2026-03-01T00:03:30.000000Z"
    check(lambda e: e["time"] >= "2026-03-01T00:01:00Z", since=since)
    check(lambda e: e["time"] < "2026-03-01T00:03:30Z", until=until)
    check(
        lambda e: "2026-03-01T00:01:00Z" <= e["time"] < "2026-03-01T00:03:30Z",
        since=since,
        until=until,
    )
    assert ledger.store.seq_range_for_time(since, until) == (60, 210)
    assert ledger.store.seq_range_for_time("2027-01-01T00:00:00.000000Z", None) == (0, 0)

    # Limit, keyset pagination and order.
    users = _expect(evs, lambda e: e["action"].startswith("user."))
    assert _ids(ledger, action="user.*", limit=5) == users[:5]
    page2_after = ledger.get(users[4]).seq
    assert _ids(ledger, action="user.*", limit=5, after=page2_after) == users[5:10]
    assert _ids(ledger, action="user.*", limit=5, descending=True) == users[::-1][:5]
    last = ledger.get(users[-5]).seq
    assert _ids(ledger, action="user.*", limit=3, descending=True, after=last) == users[-6:-9:-1]
    assert _ids(ledger, action="user.*", limit=0) == []
    paged = [e.id for e in ledger.iter_query(SearchQuery(action="user.*", limit=10**6), page=17)]
    assert paged == users


def test_search_escapes_like_wildcards(ledger: Ledger) -> None:
    ledger.append_many([event(0, action="user_x.login"), event(1, action="userax.login")])
    assert len(_ids(ledger, action="user_x.*")) == 1
    assert len(_ids(ledger, action="user.*")) == 0


# ---------------------------------------------------------------------------------------------
# Pruning


def test_target_search_with_colons_in_type_and_id(ledger: Ledger) -> None:
    targets = [
        {"type": "db:public.accounts", "id": "7"},
        {"type": "db:public.accounts", "id": "a:b"},
        {"type": "user", "id": "a:b"},
        {"type": "db:public.orders", "id": "7"},
        {"type": "x", "id": "db:public.accounts:7"},
    ]
    evs = [event(i, target=t) for i, t in enumerate(targets)]
    ledger.append_many(evs)
    ids = [e["id"] for e in evs]
    assert _ids(ledger, target="db:public.accounts:7") == [ids[0], ids[4]]
    assert _ids(ledger, target="db:public.accounts:a:b") == [ids[1]]
    assert _ids(ledger, target="user:a:b") == [ids[2]]
    assert _ids(ledger, target="a:b") == [ids[1], ids[2]]  # an id alone
    assert _ids(ledger, target="7") == [ids[0], ids[3]]
    assert _ids(ledger, target=":7") == []
    assert _ids(ledger, target="db:public.orders:8") == []


def test_get_entries_reads_many_at_once(ledger: Ledger) -> None:
    evs = events(0, 1200)
    ledger.append_many(evs)
    wanted = [0, 5, 5, 1199, 700, 1200, 10**6, -1]
    found = ledger.store.get_entries(wanted)
    assert sorted(found) == [0, 5, 700, 1199]
    for seq, entry in found.items():
        assert entry == ledger.store.get_entry(seq)
        assert entry.id == evs[seq]["id"]
    assert ledger.store.get_entries([]) == {}
    assert len(ledger.store.get_entries(range(1200))) == 1200  # past any parameter limit


def test_prune_keeps_proofs_and_verifies(ledger: Ledger, signer: Signer) -> None:
    batch = events(0, 60)
    ledger.append_many(batch)
    ledger.checkpoint()
    pruned = [3, 4, 5, 17, 40]
    hashes = ledger.store.leaf_hashes(pruned)
    prune_event = ledger.prune(pruned, reason="retention: 90 days", actor="system:retention")
    assert prune_event.seq == 60
    prune_body = ledger.get(prune_event.id).body
    assert prune_body is not None
    assert entry_event(prune_body)["action"] == "sealtrail.retention.prune"
    assert set(ledger.store.prunes()) == set(pruned)
    assert all(p.by_event == prune_event.id for p in ledger.store.prunes().values())
    verifier = signer.verifier()
    for seq in pruned:
        entry = ledger.get_seq(seq)
        assert entry.body is None
        assert entry.leaf_hash == hashes[seq]
        receipt = ledger.prove(entry.id)
        cp = open_checkpoint(receipt.checkpoint, verifier)
        merkle.verify_inclusion(entry.leaf_hash, seq, cp.size, list(receipt.proof), cp.root_hash)
    report = ledger.verify()
    assert report.ok, report.findings
    assert report.pruned == len(pruned)
    # A pruned event cannot come back, nor be pruned twice.
    with pytest.raises(ConflictError):
        ledger.append(batch[3])
    with pytest.raises(SealtrailError):
        ledger.prune([3, 4], reason="again")
    with pytest.raises(NotFound):
        ledger.prune([1000], reason="out of range")
    # Pruned entries leave the actor/target/subject index.
    assert batch[3]["id"] not in _ids(ledger, actor=batch[3]["actor"]["id"], limit=1000)
    # They keep their target type and time: what a history can no longer read.
    assert ledger.pruned_of_type("doc") == [3, 5, 17]
    assert ledger.pruned_of_type("account", after=4) == [40]
    assert ledger.pruned_of_type("doc", limit=2) == [3, 5]
    sixth = ledger.get_seq(6).body
    assert sixth is not None
    assert ledger.pruned_of_type("doc", until=entry_event(sixth)["time"]) == [3, 5]
    assert ledger.pruned_of_type("nothing") == []


# ---------------------------------------------------------------------------------------------
# Concurrency and reopening


WRITER_EVENTS = 2000
WRITER_BATCH = 50


def _writer(url: str, skey: str, ids: list[str], tag: str, start: Any) -> None:
    """A writer process: appends its events in small batches, racing the other one."""
    ledger = Ledger(open_store(url), Signer.from_skey(skey))
    try:
        start.wait(60)
        for begin in range(0, len(ids), WRITER_BATCH):
            ledger.append_many(
                [
                    event(begin + j, id=eid, data={"writer": tag})
                    for j, eid in enumerate(ids[begin : begin + WRITER_BATCH])
                ]
            )
    finally:
        ledger.close()


def test_two_writer_processes(ledger: Ledger, backend: Backend, signer: Signer) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    ids = {tag: [new_event_id() for _ in range(WRITER_EVENTS)] for tag in ("a", "b")}
    procs = [
        ctx.Process(target=_writer, args=(backend.url, signer.skey(), ids[tag], tag, start))
        for tag in ids
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    assert_gapless(ledger, 2 * WRITER_EVENTS)
    stored = [e.id for e in ledger.store.iter_entries()]
    assert sorted(stored) == sorted(ids["a"] + ids["b"])
    if backend.name == "postgres":
        # The writers really interleaved: waiters on an advisory lock are served in order.
        # (SQLite's busy handler polls, so there one writer may well finish first.)
        writers = [
            orjson.loads(e.body or b"{}")["data"]["writer"] for e in ledger.store.iter_entries()
        ]
        assert sum(1 for x, y in itertools.pairwise(writers) if x != y) >= 2
    assert ledger.root() == merkle.root_of(all_leaves(ledger))
    report = ledger.verify()
    assert report.ok, report.findings
    assert report.entries == 2 * WRITER_EVENTS
    # Parallel verification: worker processes reopen the store from its URL.
    assert ledger.store.shareable
    report = ledger.verify(workers=2, chunk_level=8)
    assert report.ok, report.findings
    assert report.entries == 2 * WRITER_EVENTS


def test_a_reopened_ledger_continues_the_tree(
    opened: Callable[..., Ledger], ledger: Ledger
) -> None:
    ledger.append_many(events(0, 100))
    root_100 = ledger.root()
    second = opened()
    assert second.root() == root_100
    assert second.append(event(100)).seq == 100
    # Two ledgers over the same store, alternating: each reloads the tree edge it missed.
    assert ledger.append_many(events(101, 140))[0].seq == 101
    assert second.append_many(events(140, 141))[0].seq == 140
    assert ledger.append(event(141)).seq == 141
    leaves = all_leaves(ledger)
    assert ledger.root() == second.root() == merkle.root_of(leaves)
    assert ledger.root(100) == root_100
    ledger.checkpoint()
    assert second.checkpoint().size == 142
    third = opened()
    assert third.root() == merkle.root_of(leaves)
    assert third.verify().ok


# ---------------------------------------------------------------------------------------------
# Hostile strings (I6): data, stored and read back exactly


HOSTILE = [
    "line one\r\nline two\n\rthree",
    "next\u2028line\u2029para\u0085nel",
    "bell\x07 back\x08 esc\x1b[31mred\x1b[0m tab\t vt\x0b ff\x0c del\x7f",
    "emoji 🔥👩‍👩‍👧 flags 🇫🇷 astral 𝔘",
    "bidi \u202egnp.exe\u202c \u2066iso\u2069 \u200fmark \ufeffbom",
    '{"id":"x"}\n{"action":"forged"} </script><script>alert(1)</script> =cmd|"/c calc"!A1',
    "quotes ' \" ` \\ back\\slash % _ ? ;--",
    "nul\x00byte",
    "nul\uffff0byte",  # what the PostgreSQL index escapes "nul\x00byte" to
    "non\ufffdchar",
    "",
]


def test_hostile_strings_round_trip(ledger: Ledger, backend: Backend) -> None:
    sent = []
    for i, text in enumerate(HOSTILE):
        ev = event(
            i,
            actor={"id": text or "empty", "type": "user"},
            target={"type": "doc", "id": text or "empty"},
            subject=text or "empty",
            reason=text,
            data={"value": text, text or "key": [text, {"nested": text}]},
        )
        sent.append(ev)
    results = ledger.append_many(sent[:4]) + ledger.append_many(sent[4:])
    fresh = Ledger(backend.open(), verifier=ledger.verifier)
    try:
        for ev, result in zip(sent, results, strict=True):
            for reader in (ledger, fresh):
                body = reader.get(ev["id"]).body
                assert body is not None
                assert merkle.leaf_hash(body) == result.leaf_hash  # byte-identical
                stored = entry_event(body)
                for key in ("actor", "target", "subject", "reason", "data"):
                    assert stored[key] == ev[key], key
        for ev in sent:
            actor = ev["actor"]["id"]
            assert _ids(ledger, actor=actor) == [ev["id"]], repr(actor)
            assert _ids(ledger, subject=ev["subject"]) == [ev["id"]]
            assert _ids(ledger, target=f"doc:{ev['target']['id']}") == [ev["id"]]
        report = fresh.verify()
        assert report.ok, report.findings
    finally:
        fresh.store.close()


def test_event_ids_are_compared_exactly(ledger: Ledger) -> None:
    ev = event(0)
    ledger.append(ev)
    other = ev["id"][:-1] + ("0" if ev["id"][-1] != "0" else "1")
    assert ledger.store.find_ids([other, ev["id"]]).keys() == {ev["id"]}
    assert ledger.store.find_ids([other]) == {}
    assert ledger.store.find_ids([]) == {}


def test_initialize_is_idempotent_and_keeps_meta(backend: Backend, signer: Signer) -> None:
    store = backend.open()
    try:
        assert not store.is_initialized()
        meta: Mapping[str, str] = {"origin": ORIGIN, "vkey": signer.vkey(), "schema": "1"}
        store.initialize(meta)
        store.initialize({**meta, "origin": "someone.else/log"})
        assert store.is_initialized()
        assert store.meta() == meta
        assert store.size() == 0 and store.search_watermark() == 0
        assert store.latest_checkpoint() is None and store.checkpoints() == []
        assert list(store.iter_entries()) == [] and list(store.iter_level(4)) == []
    finally:
        store.close()
    store = backend.open()
    try:
        with pytest.raises(SealtrailError, match="belongs to the log"):
            Ledger(store, Signer.generate("another.example/log"))
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# Transactions


def test_snapshot_sees_one_state_while_writers_continue(
    opened: Callable[..., Ledger], ledger: Ledger
) -> None:
    ledger.append_many(events(0, 30))
    other = opened()
    with ledger.store.snapshot():
        assert ledger.store.size() == 30
        reader = ledger.store.iter_entries()
        first = next(reader)
        other.append_many(events(30, 50))  # another connection commits meanwhile
        assert ledger.store.size() == 30
        assert [first.seq] + [e.seq for e in reader] == list(range(30))
        assert ledger.store.get_entry(40) is None
        report = ledger.verify()  # nested snapshot: same state
        assert report.ok and report.entries == 30
    assert ledger.store.size() == 50
    assert ledger.verify().entries == 50


def test_the_sequencer_lock_serialises_writers(backend: Backend) -> None:
    first, second = backend.open(), backend.open()
    try:
        first.initialize({"origin": ORIGIN})
        order: list[str] = []
        entered = threading.Event()

        def other_writer() -> None:
            entered.wait(10)
            with second.write():
                order.append("second")

        thread = threading.Thread(target=other_writer)
        thread.start()
        with first.write():
            entered.set()
            time.sleep(0.3)  # the other writer is now waiting for the lock
            order.append("first")
        thread.join(30)
        assert order == ["first", "second"]
        # Nested write() and snapshot() inside a write just join it.
        with first.write(), first.write(), first.snapshot():
            first.insert_entries([(0, new_event_id(), b"{}", merkle.leaf_hash(b"{}"))])
        assert second.size() == 1
    finally:
        first.close()
        second.close()


# ---------------------------------------------------------------------------------------------
# PostgreSQL only

only_postgres = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


def test_sqlite_errors_say_what_failed_where(tmp_path: Path) -> None:
    path = tmp_path / "not-a-trail.db"
    path.write_bytes(b"this is not a database\n" * 1000)
    with pytest.raises(StorageError) as caught:  # opening, or the first read, says so
        SQLiteStore(path).heads()
    message = str(caught.value)
    assert str(path) in message and "cannot" in message and "\n" not in message
    assert isinstance(caught.value.__cause__, sqlite3.Error)
    # An initialised store whose table is gone: the failing read is named.
    store = SQLiteStore(tmp_path / "t.db")
    store.initialize({"origin": "test/origin", "vkey": "vkey"})
    store._db.execute("DROP TABLE search")
    with pytest.raises(StorageError, match=r"cannot read the size: no such table: search"):
        store.heads()
    with pytest.raises(StorageError, match=r"cannot read the index watermark"):
        store.search_watermark()
    assert store.size() == 0  # what is left still answers
    store.close()


@pytest.mark.postgres
def test_pg_errors_are_one_line_and_hide_the_password(pg_database: TestDatabase) -> None:
    from sealtrail.store.postgres import PostgresStore

    with pytest.raises(StorageError) as caught:
        PostgresStore("postgresql://postgres:s3cret-pw@127.0.0.1:1/nowhere?connect_timeout=2")
    message = str(caught.value)
    assert "s3cret-pw" not in message and "\n" not in message
    assert "127.0.0.1" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(StorageError, match="schema"):
        PostgresStore(pg_database.url + "?schema=bad;name")
    # Trust authentication ignores the password; it must not show anyway.
    url = pg_database.fresh_schema_url().replace("postgres@", "postgres:hunter2@")
    store = PostgresStore(url)
    try:
        assert "hunter2" not in store.url and "***" in store.url
        # Workers reopen it from the unmasked URL, which is passed on a pipe, never printed.
        assert store.shareable and "hunter2" in store.reopen_url()
        with pytest.raises(StorageError) as caught:
            store.meta()  # no tables yet
        assert "hunter2" not in str(caught.value) and "\n" not in str(caught.value)
    finally:
        store.close()
    with pytest.raises(StorageError, match="closed"):
        store.size()


@pytest.mark.postgres
@only_postgres
def test_pg_guards_name_their_own_schema(ledger: Ledger, backend: Backend) -> None:
    """The prune check reads the prunes table of the trigger's schema, whatever the
    search_path of the session that runs the UPDATE."""
    assert isinstance(backend, PostgresBackend)
    ledger.append_many(events(0, 5))
    schema = backend.url.partition("schema=")[2]
    with backend.database.raw(backend.url) as conn:
        conn.execute("SET search_path TO public")
        with pytest.raises(backend.errors, match="append-only"):
            conn.execute(f"UPDATE {schema}.entries SET body = NULL WHERE seq = 1")
        conn.execute(f"INSERT INTO {schema}.prunes VALUES (1, 'by', 'now')")
        conn.execute(f"UPDATE {schema}.entries SET body = NULL WHERE seq = 1")
    assert ledger.get_seq(1).body is None


@pytest.mark.postgres
@only_postgres
def test_pg_pages_by_keyset(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    from sealtrail.store import postgres

    monkeypatch.setattr(postgres, "PAGE_SIZE", 7)
    ledger.append_many(events(0, 300))
    assert [e.seq for e in ledger.store.iter_entries()] == list(range(300))
    assert [e.seq for e in ledger.store.iter_entries(10, 60)] == list(range(10, 60))
    assert [e.seq for e in ledger.store.iter_entries(295)] == list(range(295, 300))
    assert [i for i, _ in ledger.store.iter_level(4)] == list(range(300 // 16))
    report = ledger.verify()
    assert report.ok and report.entries == 300


@pytest.mark.postgres
def test_pg_concurrent_initialize(pg_url: str, signer: Signer) -> None:
    from sealtrail.store.postgres import PostgresStore

    stores = [PostgresStore(pg_url) for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def init(store: Store) -> None:
        try:
            start.wait(10)
            store.initialize({"origin": ORIGIN, "vkey": signer.vkey()})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=init, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert all(s.is_initialized() for s in stores)
        assert stores[0].meta() == {"origin": ORIGIN, "vkey": signer.vkey()}
        led = Ledger(stores[0], signer)
        led.initialize()
        assert led.append(event(0)).seq == 0
    finally:
        for s in stores:
            s.close()


@pytest.mark.postgres
@only_postgres
def test_pg_insert_only_writer_role(
    ledger: Ledger, backend: Backend, pg_database: TestDatabase, signer: Signer
) -> None:
    from sealtrail.store.postgres import PostgresStore

    ledger.append_many(events(0, 20))
    assert isinstance(ledger.store, PostgresStore)
    role = pg_database.create_role()
    try:
        ledger.store.grant_writer(role)
        writer = Ledger(open_store(pg_database.schema_url(backend.url, user=role)), signer)
        try:
            writer.initialize()  # tables exist: nothing to create, meta kept
            assert writer.append_many(events(20, 40))[0].seq == 20
            assert writer.checkpoint().size == 40
            assert writer.query(SearchQuery(actor="user:3", limit=100))
            assert writer.verify().ok
            with pytest.raises(StorageError, match="permission denied"):
                writer.prune([1], reason="not the writer's job")
            assert writer.size() == 40  # atomic: no prune event without the prune
            store = writer.store
            assert isinstance(store, PostgresStore)
            for statement in (
                "UPDATE entries SET body = NULL",
                "DELETE FROM nodes",
                "TRUNCATE checkpoints",
                "DELETE FROM meta",
                "ALTER TABLE entries DISABLE TRIGGER USER",
                "DROP TABLE prunes",
            ):
                with (
                    pytest.raises(backend.errors, match=r"permission denied|must be owner"),
                    store.write(),
                ):
                    store._db().execute(statement)
        finally:
            writer.policy = dataclasses.replace(writer.policy, on_close=False)
            writer.close()
        assert ledger.verify().ok
    finally:
        pg_database.drop_role(role)


@pytest.mark.postgres
@only_postgres
def test_pg_reconnects_after_the_connection_drops(
    ledger: Ledger, pg_database: TestDatabase
) -> None:
    import pg

    ledger.append_many(events(0, 10))
    store = ledger.store
    pid = store._db().info.backend_pid  # type: ignore[attr-defined]
    with pg.connect() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert ledger.size() == 10  # a read outside a transaction reconnects
    assert ledger.append_many(events(10, 20))[0].seq == 10
    pid = store._db().info.backend_pid  # type: ignore[attr-defined]
    with pg.connect() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert ledger.append(event(20)).seq == 20  # BEGIN reconnects too
    assert ledger.verify().ok


def test_checkpoint_follows_within_every_seconds_without_further_appends(
    backend: Backend,
) -> None:
    ledger = Ledger(
        backend.open(),
        Signer.generate("test.example/timed"),
        policy=CheckpointPolicy(every_events=0, every_seconds=0.2, on_close=False),
    )
    try:
        ledger.initialize()
        ledger.append_many(events(0, 3))
        assert ledger.store.latest_checkpoint().size == 0  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while ledger.store.latest_checkpoint().size != 3:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no timed checkpoint"
            time.sleep(0.05)
    finally:
        ledger.close()


def test_failure_deep_in_a_streamed_batch_stores_nothing(ledger: Ledger) -> None:
    """Rows stream to the database as they are computed; a bad event or a stored id near the
    end of a large batch must still leave nothing of that batch behind."""
    first = events(0, 10)
    ledger.append_many(first)
    before = ledger.size()
    bad = events(10, 3010)
    bad[2500] = {"action": "Not An Action"}
    with pytest.raises(InvalidEvent):
        ledger.append_many(bad)
    assert ledger.size() == before
    huge = events(10, 3010)
    huge[2999] = {"action": "a.b", "data": {"blob": "x" * 70_000}}
    with pytest.raises(InvalidEvent, match="over the limit"):
        ledger.append_many(huge)
    assert ledger.size() == before
    replay = events(10, 3010)
    replay[2999] = dict(first[3])  # a stored id, same content: a duplicate
    results = ledger.append_many(replay)
    assert results[2999].duplicate and results[2999].seq == 3
    assert ledger.size() == before + 2999
    assert [r.seq for r in results[:2999]] == list(range(before, before + 2999))
    assert ledger.verify().ok


def test_large_index_backlog_is_rebuilt_and_queries_agree(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big backlog is filled with the indexes dropped and rebuilt; the answers are the same
    as with indexes maintained row by row."""
    import sealtrail.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "INDEX_REBUILD_MIN", 100)
    ledger.append_many(events(0, 600))  # > INLINE_INDEX_MAX: index deferred
    assert ledger.pending_index() == 600
    found = ledger.query(SearchQuery(actor="user:3", action="doc.*", limit=1000))
    expected = [
        e.seq
        for e in ledger.store.iter_entries()
        if e.body is not None
        and entry_event(e.body)["actor"]["id"] == "user:3"
        and entry_event(e.body)["action"].startswith("doc.")
    ]
    assert [e.seq for e in found] == expected and expected
    assert ledger.pending_index() == 0
    # The indexes are back (SQLite really drops them; others keep theirs).
    if isinstance(ledger.store, SQLiteStore):
        names = {
            r[0]
            for r in ledger.store._db.execute(
                "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='search'"
            )
        }
        assert {"search_actor", "search_time", "search_tenant_time"} <= names


def test_index_catch_up_uses_the_store_only_under_the_ledger_lock(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timed checkpoint writes from a thread of its own through the same store (one
    SQLite connection): every store call, dropping and rebuilding the search indexes
    included, must hold the ledger's lock, or the two interleave on the connection."""
    import sealtrail.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "INDEX_REBUILD_MIN", 100)
    ledger.append_many(events(0, 600))
    store = ledger.store
    unlocked: list[str] = []

    class Guarded:
        def __getattr__(self, name: str) -> Any:
            value = getattr(store, name)
            if not callable(value):
                return value

            def call(*args: Any, **kwargs: Any) -> Any:
                if not ledger._lock._is_owned():  # type: ignore[attr-defined]
                    unlocked.append(name)
                return value(*args, **kwargs)

            return call

    monkeypatch.setattr(ledger, "store", Guarded())
    assert ledger.catch_up_index() == 600
    assert unlocked == []


def test_group_commit_isolates_each_callers_batch(ledger: Ledger) -> None:
    """Concurrent small appends share transactions; every caller still gets its own
    receipts, and one caller's conflict fails only that caller."""
    ledger.initialize()
    taken = events(0, 1)
    ledger.append_many(taken)
    clash = dict(taken[0], action="doc.delete")  # a stored id with other content
    results: dict[int, list[Any]] = {}
    failures: dict[int, BaseException] = {}
    barrier = threading.Barrier(8)

    def writer(k: int) -> None:
        barrier.wait()
        for j in range(25):
            batch = events(1000 * k + 2 * j, 1000 * k + 2 * j + 2)
            if k == 3 and j == 10:
                batch = [batch[0], clash]
            try:
                results.setdefault(k, []).extend(ledger.append_many(batch))
            except ConflictError as exc:
                failures[k] = exc

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(failures) == {3}
    stored = 1 + sum(len(r) for r in results.values())
    assert_gapless(ledger, stored)
    assert stored == 1 + 8 * 50 - 2  # the conflicting batch of 2 stored nothing
    for rs in results.values():
        for r in rs:
            assert ledger.get(r.id).seq == r.seq
    assert ledger.verify().ok


def test_sqlite_durability_option(tmp_path: Path) -> None:
    full = open_store(f"sqlite:///{tmp_path / 'a.db'}")
    normal = open_store(f"sqlite:///{tmp_path / 'b.db'}?synchronous=normal")
    try:
        assert isinstance(full, SQLiteStore) and isinstance(normal, SQLiteStore)
        assert full._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert normal._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert normal.reopen_url().endswith("?synchronous=normal")  # workers keep it
    finally:
        full.close()
        normal.close()
    for bad in ("?synchronous=off", "?journal_mode=delete", "?x"):
        with pytest.raises(StorageError, match="option"):
            open_store(f"sqlite:///{tmp_path / 'c.db'}{bad}")
