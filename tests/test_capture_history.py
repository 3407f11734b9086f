"""Point in time and entity history, compared with snapshots of the real table taken during
the test: boundaries (an event exactly at T, before creation, after deletion, re-creation)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from capture_helpers import (
    PgApp,
    change_event,
    emulated_pg_tx,
    emulated_sqlite_events,
    install_emulated_pg_outbox,
    make_pg_app,
    make_sqlite_app,
    sqlite_ledger,
)
from sealtrail.capture.change import MASKED
from sealtrail.capture.history import history, row_key, state_at, table_at
from sealtrail.capture.relay import Relay
from sealtrail.event import utc_now
from sealtrail.ledger import Ledger

pytestmark = pytest.mark.postgres

TABLE = "accounts"


def _minus(stamp: str, micros: int) -> str:
    moment = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    return (moment - dt.timedelta(microseconds=micros)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = sqlite_ledger(tmp_path)
    yield led
    led.close()


@pytest.fixture
def app(pg_database: Any) -> PgApp:
    app = make_pg_app(pg_database.url)
    install_emulated_pg_outbox(app)
    app.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, email text, balance numeric(12,2), "
        "opened date, note text)"
    )
    app.tables[TABLE] = ["id"]
    return app


def _tick() -> str:
    """A time strictly after everything so far and strictly before what follows."""
    time.sleep(0.002)
    now = utc_now()
    time.sleep(0.002)
    return now


def test_point_in_time_matches_snapshots_of_the_table(app: PgApp, ledger: Ledger) -> None:
    snapshots: list[tuple[str, dict[str, dict[str, Any]]]] = []

    def snap() -> None:
        snapshots.append((_tick(), app.rows(TABLE)))

    snap()  # before anything existed
    with emulated_pg_tx(app) as tx:
        for i in range(1, 6):
            tx.insert(TABLE, {"id": i, "email": f"u{i}@x", "balance": i, "opened": f"2026-01-0{i}"})
    snap()
    with emulated_pg_tx(app) as tx:
        tx.update(TABLE, {"id": 2}, {"balance": "20.50", "note": "raised"})
        tx.update(TABLE, {"id": 2}, {"balance": "21.75"})
        tx.delete(TABLE, {"id": 3})
    snap()
    with emulated_pg_tx(app) as tx:
        tx.insert(TABLE, {"id": 3, "email": "again@x", "balance": 0, "opened": "2026-02-01"})
        tx.update(TABLE, {"id": 1}, {"email": None})
        tx.delete(TABLE, {"id": 5})
    snap()
    with emulated_pg_tx(app) as tx:
        tx.delete(TABLE, {"id": 3})
        tx.update(TABLE, {"id": 4}, {"note": "multi\nline \u2028 note"})
    snap()
    with Relay(app.url, ledger, processors=[]) as relay:
        relay.run_once()

    for when, snapshot in snapshots:
        assert table_at(ledger, TABLE, when) == snapshot, when
        for pk in range(1, 7):
            assert state_at(ledger, TABLE, {"id": pk}, when) == snapshot.get(str(pk)), (when, pk)
    # Filters.
    last_when, last = snapshots[-1]
    assert table_at(ledger, TABLE, last_when, where={"note": "raised"}) == {"2": last["2"]}
    assert set(table_at(ledger, TABLE, last_when, where=lambda r: r["id"] > 2)) == {"4"}


def test_boundaries_event_exactly_at_t_creation_and_deletion(app: PgApp, ledger: Ledger) -> None:
    with emulated_pg_tx(app) as tx:
        tx.insert(TABLE, {"id": 1, "email": "a@x", "balance": 1})
    with emulated_pg_tx(app) as tx:
        tx.update(TABLE, {"id": 1}, {"email": "b@x"})
    with emulated_pg_tx(app) as tx:
        tx.delete(TABLE, {"id": 1})
    with Relay(app.url, ledger, processors=[]) as relay:
        relay.run_once()
    created, updated, deleted = history(ledger, TABLE, {"id": 1})
    assert [c.op for c in (created, updated, deleted)] == ["insert", "update", "delete"]

    # Before creation: nothing; exactly at the insert: the row.
    assert state_at(ledger, TABLE, 1, _minus(created.time, 1)) is None
    assert table_at(ledger, TABLE, _minus(created.time, 1)) == {}
    at_insert = state_at(ledger, TABLE, 1, created.time)
    assert at_insert is not None and at_insert["email"] == "a@x"
    # An event exactly at T counts; one microsecond earlier it does not.
    assert state_at(ledger, TABLE, 1, updated.time)["email"] == "b@x"  # type: ignore[index]
    assert state_at(ledger, TABLE, 1, _minus(updated.time, 1))["email"] == "a@x"  # type: ignore[index]
    # Exactly at the delete, and after it: gone.
    assert state_at(ledger, TABLE, 1, deleted.time) is None
    assert state_at(ledger, TABLE, 1, _minus(deleted.time, 1)) is not None
    assert state_at(ledger, TABLE, 1, "2999-01-01T00:00:00Z") is None
    assert table_at(ledger, TABLE, deleted.time) == {}
    # Times in any offset, and datetimes, mean the same instant.
    moment = dt.datetime.strptime(updated.time, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    paris = moment.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert state_at(ledger, TABLE, 1, paris)["email"] == "b@x"  # type: ignore[index]
    assert state_at(ledger, TABLE, 1, paris.isoformat())["email"] == "b@x"  # type: ignore[index]


def test_entity_history_lists_every_change_in_order(app: PgApp, ledger: Ledger) -> None:
    txids = []
    with emulated_pg_tx(app) as tx:
        tx.insert(TABLE, {"id": 7, "email": "a@x", "balance": 1})
        tx.insert(TABLE, {"id": 8, "email": "other@x", "balance": 1})
        txids.append(tx.txid)
    with emulated_pg_tx(app) as tx:
        tx.update(TABLE, {"id": 7}, {"balance": 2})
        txids.append(tx.txid)
    with emulated_pg_tx(app) as tx:
        tx.delete(TABLE, {"id": 7})
        txids.append(tx.txid)
    with Relay(app.url, ledger, processors=[]) as relay:
        relay.run_once()
    changes = history(ledger, TABLE, {"id": 7})
    assert [(c.op, c.txid, c.key, c.table) for c in changes] == [
        ("insert", txids[0], "7", TABLE),
        ("update", txids[1], "7", TABLE),
        ("delete", txids[2], "7", TABLE),
    ]
    assert changes[1].changes == {"balance": {"old": "1.00", "new": "2.00"}}
    assert changes[2].changes["email"] == {"old": "a@x"}
    assert [c.seq for c in changes] == sorted(c.seq for c in changes)
    assert changes[0].actor == {"id": "user:42", "type": "user"}
    assert changes[0].pk == {"id": 7}
    assert history(ledger, TABLE, 7) == changes
    assert history(ledger, TABLE, {"id": 9}) == []
    assert history(ledger, "other_table", 7) == []


def test_one_row_is_read_through_the_index_not_the_whole_trail(
    tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_sqlite_app(tmp_path)
    events = [
        change_event(TABLE, "insert", {"id": i}, {"id": {"new": i}}, f"t{i}") for i in range(300)
    ]
    events.append(change_event(TABLE, "update", {"id": 5}, {"id": {"old": 5, "new": 5}}, "u"))
    emulated_sqlite_events(app, events)
    with Relay(app.url, ledger, processors=[]) as relay:
        relay.run_once()
    ledger.catch_up_index()
    reads: list[int] = []
    real_search = ledger.store.search

    def counted(query: Any) -> Any:
        found = real_search(query)
        reads.extend(found)
        return found

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a full scan of the trail")

    monkeypatch.setattr(ledger.store, "search", counted)
    monkeypatch.setattr(ledger.store, "iter_entry_rows", refuse)
    monkeypatch.setattr(ledger.store, "iter_entries", refuse)
    assert [c.op for c in history(ledger, TABLE, 5)] == ["insert", "update"]
    assert state_at(ledger, TABLE, 5, "2999-01-01T00:00:00Z") == {"id": 5}
    assert len(reads) == 4  # the row's two events, read twice: nothing else


def test_masked_and_update_only_rows(tmp_path: Path, ledger: Ledger) -> None:
    app = make_sqlite_app(tmp_path)
    t0 = "2026-01-01T00:00:00.000000Z"
    t1 = "2026-01-02T00:00:00.000000Z"
    t2 = "2026-01-03T00:00:00.000000Z"
    events = [
        # A row that existed before tracking began: first seen through an update.
        change_event(TABLE, "update", {"id": 1}, {"note": {"old": "a", "new": "b"}}, "x", when=t0),
        change_event(
            TABLE,
            "update",
            {"id": 1},
            {"email": {"old": "e@x", "new": "f@x"}, "ssn": {"old": MASKED, "new": MASKED}},
            "y",
            when=t1,
        ),
        change_event(
            TABLE,
            "delete",
            {"id": 1},
            {
                "id": {"old": 1},
                "note": {"old": "b"},
                "email": {"old": "f@x"},
                "ssn": {"old": MASKED},
            },
            "z",
            when=t2,
        ),
    ]
    emulated_sqlite_events(app, events)
    with Relay(app.url, ledger, processors=[]) as relay:
        relay.run_once()
    # At t0 the row's other columns come from later events' old values.
    assert state_at(ledger, TABLE, 1, t0) == {"note": "b", "email": "e@x", "id": 1, "ssn": MASKED}
    assert state_at(ledger, TABLE, 1, t1) == {"note": "b", "email": "f@x", "ssn": MASKED, "id": 1}
    assert state_at(ledger, TABLE, 1, t2) is None
    assert table_at(ledger, TABLE, t1) == {"1": {"note": "b", "email": "f@x", "ssn": MASKED}}


def test_composite_keys_and_bad_times(tmp_path: Path, ledger: Ledger) -> None:
    app = make_sqlite_app(tmp_path)
    pk = {"order_id": 7, "line": 2}
    emulated_sqlite_events(app, [change_event("lines", "insert", pk, {"qty": {"new": 3}}, "t")])
    with Relay(app.url, ledger, processors=[]) as relay:
        relay.run_once()
    assert row_key({"line": 2, "order_id": 7}) == '{"line":2,"order_id":7}'
    assert [c.op for c in history(ledger, "lines", {"line": 2, "order_id": 7})] == ["insert"]
    assert state_at(ledger, "lines", pk, "2999-01-01T00:00:00Z") == {"qty": 3}
    from sealtrail._exceptions import SealtrailError

    with pytest.raises(SealtrailError, match="timezone"):
        state_at(ledger, "lines", pk, "2026-01-01T00:00:00")
    with pytest.raises(SealtrailError, match="timezone"):
        state_at(ledger, "lines", pk, dt.datetime(2026, 1, 1))


def test_pruned_changes_are_never_folded_over(tmp_path: Path, ledger: Ledger) -> None:
    """Retention prunes change events (their bodies and their rows go; their table and
    time stay): a state they may bear on is refused, never rebuilt without them."""
    from sealtrail.capture.history import IncompleteHistory, pruned_changes

    app = make_sqlite_app(tmp_path)

    def at(hour: int) -> str:
        return f"2026-03-01T{hour:02d}:00:00.000000Z"

    events = [
        change_event("items", "insert", {"id": 1}, {"n": {"new": 1}}, "t1", when=at(1)),
        change_event("items", "insert", {"id": 2}, {"n": {"new": 1}}, "t1", when=at(1)),
        change_event("items", "update", {"id": 1}, {"n": {"old": 1, "new": 2}}, "t2", when=at(2)),
        change_event("other", "insert", {"id": 9}, {"n": {"new": 9}}, "t2", when=at(2)),
        change_event("items", "insert", {"id": 3}, {"n": {"new": 5}}, "t3", when=at(4)),
        change_event("items", "update", {"id": 3}, {"n": {"old": 5, "new": 6}}, "t4", when=at(5)),
    ]
    emulated_sqlite_events(app, events)
    with Relay(app.url, ledger, processors=[]) as relay:
        relay.run_once()
    seqs = {e["id"]: ledger.get(e["id"]).seq for e in events}
    assert state_at(ledger, "items", 1, at(3)) == {"n": 2}
    assert pruned_changes(ledger, "items") == []

    # Retention removes the update of row 1 and the other table's insert.
    pruned = [seqs[events[2]["id"]], seqs[events[3]["id"]]]
    ledger.prune(pruned, reason="retention")
    assert pruned_changes(ledger, "items") == [pruned[0]]
    assert pruned_changes(ledger, "items", when=at(1)) == []  # it came later
    assert pruned_changes(ledger, "items", after=pruned[0]) == []
    assert pruned_changes(ledger, "other") == [pruned[1]]

    # Row 1 at 03:00 would read n = 1 without the pruned update: refused.
    with pytest.raises(IncompleteHistory, match="were pruned") as caught:
        state_at(ledger, "items", 1, at(3))
    assert caught.value.pruned == [pruned[0]]
    # Row 2 could have been the pruned one's row too (a pruned event keeps no row).
    with pytest.raises(IncompleteHistory):
        state_at(ledger, "items", 2, at(3))
    # Before the pruned change, and for a row inserted after it, the answer stands.
    assert state_at(ledger, "items", 1, at(1)) == {"n": 1}
    assert state_at(ledger, "items", 3, at(5)) == {"n": 6}
    assert state_at(ledger, "other", 9, at(1)) is None
    # The table after a pruned change: refused; before it: whole.
    with pytest.raises(IncompleteHistory):
        table_at(ledger, "items", at(3))
    assert table_at(ledger, "items", at(1)) == {"1": {"n": 1}, "2": {"n": 1}}
    # The history lists what is left; verification still passes.
    assert [c.op for c in history(ledger, "items", 1)] == ["insert"]
    assert ledger.verify().ok
    # An entry pruned before it was indexed (as an older version could leave it) has no
    # type or time in the index: it may have been any table's change, at any time.
    db = ledger.store._db  # type: ignore[attr-defined]
    db.execute(
        "UPDATE search SET action = '', target_type = NULL, time = '' WHERE seq = ?", (pruned[1],)
    )
    assert pruned_changes(ledger, "items", when=at(1)) == [pruned[1]]
    with pytest.raises(IncompleteHistory):
        state_at(ledger, "items", 1, at(1))
