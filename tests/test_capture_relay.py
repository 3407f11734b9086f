"""The relay: outbox to ledger at least once, stored exactly once, in commit order, redacted,
malformed rows recorded and never blocking, backoff while the ledger is down."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

import sealtrail
from capture_helpers import (
    PgApp,
    change_event,
    emulated_pg_tx,
    emulated_sqlite_events,
    insert_raw_sqlite_outbox,
    install_emulated_pg_outbox,
    ledger_events,
    make_pg_app,
    make_sqlite_app,
    pg_ledger,
    sqlite_ledger,
)
from sealtrail._exceptions import StorageError
from sealtrail.capture.relay import REJECTED_ACTION, Relay
from sealtrail.home import open_ledger
from sealtrail.ledger import Ledger
from sealtrail.trail import Trail


def _events(n: int, txid: str = "tx1", table: str = "accounts") -> list[dict[str, Any]]:
    return [
        change_event(table, "insert", {"id": i}, {"id": {"new": i}, "name": {"new": f"n{i}"}}, txid)
        for i in range(n)
    ]


def _outbox_count(path: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM sealtrail_outbox").fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def ledger(tmp_path: Path) -> Any:
    led = sqlite_ledger(tmp_path)
    yield led
    led.close()


# -- SQLite outbox -------------------------------------------------------------------------
def test_ships_everything_in_id_order_and_empties_the_outbox(
    tmp_path: Path, ledger: Ledger
) -> None:
    app = make_sqlite_app(tmp_path)
    first = _events(5, "t1")
    second = _events(3, "t2", "orders")
    emulated_sqlite_events(app, first)
    emulated_sqlite_events(app, second)
    with Relay(app.url, ledger, batch=3) as relay:
        stats = relay.run_once()
        assert (stats.shipped, stats.duplicates, stats.rejected) == (8, 0, 0)
        assert stats.batches == 3
        assert relay.pending() == 0
    stored = ledger_events(ledger)
    assert [e["id"] for e in stored] == [e["id"] for e in first + second]
    assert stored[0]["changes"] == first[0]["changes"]
    assert ledger.verify().ok


def test_the_collector_is_paused_from_preparing_a_batch_to_appending_it(
    tmp_path: Path, ledger: Ledger
) -> None:
    app = make_sqlite_app(tmp_path)
    emulated_sqlite_events(app, _events(300, "t1"))  # two batches
    seen: list[bool] = []
    for name in ("append_many", "append_prepared"):
        real = getattr(ledger, name)

        def spy(events: Any, real: Any = real) -> Any:
            seen.append(gc.isenabled())
            return real(events)

        setattr(ledger, name, spy)
    assert gc.isenabled()
    with Relay(app.url, ledger, batch=256) as relay:
        assert relay.run_once().shipped == 300
    assert seen == [False, False]  # the two batches' events were never collected over
    assert gc.isenabled()  # and the collector is back


def test_reshipped_rows_are_stored_once_with_the_original_receipt(
    tmp_path: Path, ledger: Ledger
) -> None:
    app = make_sqlite_app(tmp_path)
    events = _events(4)
    emulated_sqlite_events(app, events)
    with Relay(app.url, ledger) as relay:
        assert relay.run_once().shipped == 4
        size = ledger.size()
        # A relay killed after the ledger's commit and before the delete ships them again.
        emulated_sqlite_events(app, events)
        stats = relay.run_once()
        assert (stats.shipped, stats.duplicates) == (0, 4)
        assert ledger.size() == size
        assert relay.pending() == 0
    # The ledger answers a stored id with the original receipt.
    original = ledger.get(events[2]["id"])
    again = ledger.append_prepared([sealtrail.event.prepare_event(ledger_events(ledger)[2])])
    assert again[0].duplicate and again[0].seq == original.seq
    assert again[0].leaf_hash == original.leaf_hash


def test_redaction_applies_and_the_relay_context_does_not(tmp_path: Path, ledger: Ledger) -> None:
    app = make_sqlite_app(tmp_path)
    event = change_event(
        "users",
        "update",
        {"id": 1},
        {"password": {"old": "hunter2", "new": "correct horse"}, "note": {"old": "a", "new": "b"}},
        "t9",
        actor={"id": "user:7", "type": "user"},
    )
    emulated_sqlite_events(app, [event])
    with (
        sealtrail.context(actor="user:relay-operator", ip="10.9.9.9", ticket="T-1"),
        Relay(app.url, ledger) as relay,
    ):
        relay.run_once()
    (stored,) = ledger_events(ledger)
    assert stored["actor"] == {"id": "user:7", "type": "user"}
    assert "source" not in stored and "ticket" not in stored["data"]
    assert stored["changes"]["password"] == {"old": "[REDACTED]", "new": "[REDACTED]"}
    assert stored["changes"]["note"] == {"old": "a", "new": "b"}
    assert "changes.password.old" in stored["redacted"]["fields"]


def test_a_trail_brings_its_processors(tmp_path: Path, ledger: Ledger) -> None:
    app = make_sqlite_app(tmp_path)
    emulated_sqlite_events(app, _events(1))

    def tag(event: dict[str, Any]) -> dict[str, Any]:
        return {**event, "reason": "relayed"}

    trail = Trail(ledger, processors=[tag])
    with Relay(app.url, trail) as relay:
        relay.run_once()
    assert ledger_events(ledger)[0]["reason"] == "relayed"


HOSTILE = "line\r\nforged: yes\u2028\u202e\x1b[31m\x00<script>=cmd|' /C calc'!A0\""


def test_malformed_rows_are_recorded_and_never_block(tmp_path: Path, ledger: Ledger) -> None:
    app = make_sqlite_app(tmp_path)
    good = _events(3)
    floaty = change_event("t", "update", {"id": 1}, {"x": {"old": 1, "new": 2}}, "tx")
    floaty_text = orjson.dumps(floaty).decode().replace('"new":2', '"new":2.5')
    no_id = {k: v for k, v in _events(1)[0].items() if k != "id"}
    mismatched = _events(1)[0]
    hostile = change_event("t", "insert", {"id": HOSTILE}, {"name": {"new": HOSTILE}}, HOSTILE)
    bad_action = {**_events(1)[0], "action": "not an action!"}
    secret_in_bad = {**_events(1)[0], "action": 5, "password": "hunter2"}
    rows: list[tuple[str, str, str | bytes]] = [
        (good[0]["id"], "tx", orjson.dumps(good[0]).decode()),
        ("e-bad-json", "tx", '{"id": "x", broken'),
        ("e-not-object", "tx", "[1, 2, 3]"),
        ("e-bytes", "tx", b"\xff\xfe{not utf-8}"),
        (floaty["id"], "tx", floaty_text),
        ("e-no-id", "tx", orjson.dumps(no_id).decode()),
        ("00000000-0000-7000-8000-000000000001", "tx", orjson.dumps(mismatched).decode()),
        (good[1]["id"], "tx", orjson.dumps(good[1]).decode()),
        (hostile["id"], HOSTILE, orjson.dumps(hostile).decode()),
        (bad_action["id"], "tx", orjson.dumps(bad_action).decode()),
        (secret_in_bad["id"], "tx", orjson.dumps(secret_in_bad).decode()),
        ("e-huge", "tx", '{"a": "' + "x" * 400_000 + '"}'),
        (good[2]["id"], "tx", orjson.dumps(good[2]).decode()),
    ]
    insert_raw_sqlite_outbox(app, rows)
    # First a relay that dies after the ledger's commit, before deleting the rows...
    with Relay(app.url, ledger) as crashing:

        def crash(*args: Any) -> None:
            raise StorageError("killed before the delete (test)")

        crashing._outbox.acknowledge = crash  # type: ignore[method-assign,assignment]
        with pytest.raises(StorageError, match="killed"):
            crashing.run_once()
    size = ledger.size()
    assert size == len(rows)
    # ... then one that ships the same rows again: every one is already stored.
    with Relay(app.url, ledger) as relay:
        stats = relay.run_once()
        assert relay.pending() == 0
    assert (stats.shipped, stats.duplicates, stats.rejected) == (0, 13, 9)
    assert ledger.size() == size
    stored = ledger_events(ledger)
    assert [e["action"] for e in stored] == [
        "db.insert",
        *[REJECTED_ACTION] * 6,
        "db.insert",
        "db.insert",  # the hostile strings are data: a valid event
        REJECTED_ACTION,
        REJECTED_ACTION,
        REJECTED_ACTION,
        "db.insert",
    ]
    assert stored[8]["changes"]["name"]["new"] == HOSTILE
    rejected = [e for e in stored if e["action"] == REJECTED_ACTION]
    reasons = [e["data"]["relay"]["reason"] for e in rejected]
    assert "not an acceptable JSON event" in reasons[0]
    assert "not a JSON object" in reasons[1]
    assert "fraction" in reasons[3]
    assert "has no id" in reasons[4]
    assert "differs from the outbox row's event_id" in reasons[5]
    assert "action" in reasons[6]
    for e, (_, _, raw) in zip(
        rejected, [rows[i] for i in (1, 2, 3, 4, 5, 6, 9, 10, 11)], strict=True
    ):
        raw_bytes = raw if isinstance(raw, bytes) else raw.encode()
        assert e["data"]["outbox"]["bytes"] == len(raw_bytes)
        assert e["data"]["outbox"]["sha256"] == hashlib.sha256(raw_bytes).hexdigest()
        assert e["outcome"] == "error" and e["actor"]["id"] == "system:sealtrail-relay"
    # Content is kept: parsed where it is JSON (so key rules redact it), else as text.
    assert rejected[0]["data"]["outbox"]["raw"] == '{"id": "x", broken'
    assert rejected[3]["data"]["outbox"]["event"]["changes"]["x"]["new"] == "2.5"
    assert rejected[7]["data"]["outbox"]["event"]["password"] == "[REDACTED]"
    assert rejected[8]["data"]["outbox"]["truncated"] is True
    assert "\ufffd" in rejected[2]["data"]["outbox"]["raw"]
    assert ledger.verify().ok


def test_events_over_the_limits_are_recorded(tmp_path: Path, ledger: Ledger) -> None:
    app = make_sqlite_app(tmp_path)
    big = {**_events(1)[0], "reason": "x" * 70_000}  # under the raw bound, over the limit
    huge_int = _events(1)[0]
    huge_int["data"]["n"] = 2**60
    fine = _events(1)[0]
    rows: list[tuple[str, str, str | bytes]] = [
        (e["id"], "tx", orjson.dumps(e).decode()) for e in (big, huge_int, fine)
    ]
    insert_raw_sqlite_outbox(app, rows)
    with Relay(app.url, ledger) as relay:
        stats = relay.run_once()
    assert (stats.shipped, stats.rejected) == (3, 2)
    first, second, third = ledger_events(ledger)
    assert "over the limit" in first["data"]["relay"]["reason"]
    assert first["data"]["outbox"]["truncated"] is True
    assert "data.n" in second["data"]["relay"]["reason"]
    assert third["id"] == fine["id"]


def test_an_id_taken_by_another_event_is_recorded_as_a_conflict(
    tmp_path: Path, ledger: Ledger
) -> None:
    app = make_sqlite_app(tmp_path)
    taken = ledger.append({"action": "user.login", "actor": {"id": "u", "type": "user"}})
    clash = _events(3)
    clash[1]["id"] = taken.id
    twice = _events(1)[0]
    twin = {**twice, "reason": "other content, same id"}
    rows: list[tuple[str, str, str | bytes]] = [
        (e["id"], "tx", orjson.dumps(e).decode()) for e in clash
    ]
    insert_raw_sqlite_outbox(app, rows)
    insert_raw_sqlite_outbox(app, [(twice["id"], "tx", orjson.dumps(twice).decode())])
    with Relay(app.url, ledger) as relay:
        stats = relay.run_once()
    assert stats.rejected == 1
    stored = ledger_events(ledger)
    assert [e["action"] for e in stored] == [
        "user.login",
        "db.insert",
        REJECTED_ACTION,
        "db.insert",
        "db.insert",
    ]
    assert "already holds a different event" in stored[2]["data"]["relay"]["reason"]
    assert ledger.get(taken.id).seq == 0
    # The same id twice in one outbox with different content: the second is recorded.
    conn_rows: list[tuple[str, str, str | bytes]] = [
        (twice["id"] + "-b", "tx", orjson.dumps(twin).decode())
    ]
    # (the outbox's unique event_id column forces a different event_id text: a mismatch)
    insert_raw_sqlite_outbox(app, conn_rows)
    with Relay(app.url, ledger) as relay:
        assert relay.run_once().rejected == 1


def test_same_change_redacted_differently_is_kept_as_stored(tmp_path: Path, ledger: Ledger) -> None:
    """Encryption for a data subject draws a random nonce: a re-shipped event differs from
    the stored one. The relay recognises the same change and acknowledges it."""
    app = make_sqlite_app(tmp_path)
    events = _events(2)
    calls = {"n": 0}

    def nonce(event: dict[str, Any]) -> dict[str, Any]:
        calls["n"] += 1
        return {**event, "reason": f"nonce {calls['n']}"}

    emulated_sqlite_events(app, events)
    with Relay(app.url, ledger, processors=[nonce]) as relay:
        relay.run_once()
        emulated_sqlite_events(app, events)
        stats = relay.run_once()
        assert (stats.shipped, stats.duplicates, stats.rejected) == (0, 2, 0)
        assert relay.pending() == 0
    assert [e["reason"] for e in ledger_events(ledger)] == ["nonce 1", "nonce 2"]


def test_background_thread_backs_off_while_the_ledger_is_down(
    tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_sqlite_app(tmp_path)
    emulated_sqlite_events(app, _events(5))
    failures = {"left": 3}

    def flaky(real: Any) -> Any:
        def append(events: Any) -> Any:
            if failures["left"]:
                failures["left"] -= 1
                raise StorageError("ledger unavailable (test)")
            return real(events)

        return append

    # The relay appends through either, depending on where it validated the events.
    monkeypatch.setattr(ledger, "append_prepared", flaky(ledger.append_prepared))
    monkeypatch.setattr(ledger, "append_many", flaky(ledger.append_many))
    relay = Relay(app.url, ledger, poll=0.01, backoff=0.01, max_backoff=0.05)
    relay.start()
    try:
        deadline = time.monotonic() + 10
        while relay.stats.shipped < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        emulated_sqlite_events(app, _events(2, "later"))
        while relay.stats.shipped < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        relay.close()
    assert relay.stats.shipped == 7
    assert relay.stats.errors == 3 and "unavailable" in (relay.stats.last_error or "")
    assert ledger.size() == 7 and _outbox_count(app.path) == 0


def test_age_alert_while_the_ledger_is_down_and_when_caught_up(
    tmp_path: Path,
    ledger: Ledger,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_sqlite_app(tmp_path)
    old = _events(1, "old")[0]
    conn = app.connect()
    conn.execute(  # captured two minutes ago, never shipped
        "INSERT INTO sealtrail_outbox (event_id, txid, event, created_at) "
        "VALUES (?, 'old', ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-120 seconds'))",
        (old["id"], orjson.dumps(old).decode()),
    )
    conn.commit()
    conn.close()
    down = {"yes": True}

    def append(real: Any) -> Any:
        def call(events: Any) -> Any:
            if down["yes"]:
                raise StorageError("ledger unavailable (test)")
            return real(events)

        return call

    monkeypatch.setattr(ledger, "append_prepared", append(ledger.append_prepared))
    monkeypatch.setattr(ledger, "append_many", append(ledger.append_many))
    relay = Relay(app.url, ledger, poll=0.01, backoff=0.01, max_backoff=0.05, alert_age=4)
    caplog.set_level(logging.INFO, logger="sealtrail.relay")
    relay.start()
    try:
        deadline = time.monotonic() + 10
        while not relay.alerting and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.alerting
        assert "sealtrail_relay_alerting{" in relay.metrics() and "} 1\n" in relay.metrics()
        down["yes"] = False
        while relay.alerting and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        relay.close()
    assert not relay.alerting and ledger.size() == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "waited" in r.message]
    assert len(warnings) == 1  # once per episode, not once per failed attempt
    assert "unavailable" in warnings[0].message and " 12" in warnings[0].message  # ~120 s
    assert any("caught up" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="alert_age"):
        Relay(app.url, ledger, alert_age=-1)


def test_worker_processes_keep_order_and_survive_a_dead_worker(
    tmp_path: Path, ledger: Ledger
) -> None:
    app = make_sqlite_app(tmp_path)
    events = _events(300)
    rows: list[tuple[str, str, str | bytes]] = [
        (e["id"], "tx", orjson.dumps(e).decode()) for e in events
    ]
    rows.insert(150, ("e-bad", "tx", "not json"))
    insert_raw_sqlite_outbox(app, rows)
    with Relay(app.url, ledger, batch=25, workers=2) as relay:
        assert relay.workers == 2
        stats = relay.run_once()
        assert (stats.shipped, stats.rejected) == (301, 1)
        # A worker killed under the relay: the batch is prepared here instead.
        pids = list(relay._pool._processes)
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(0.2)
        more = _events(60, "later")
        emulated_sqlite_events(app, more)
        assert relay.run_once().shipped == 60
    stored = [e["id"] for e in ledger_events(ledger)]
    assert stored[:150] == [e["id"] for e in events[:150]]
    assert stored[151:] == [e["id"] for e in events[150:] + more]
    assert ledger.verify().ok


def test_ledger_validated_bulk_batches_reject_exactly_as_the_preparer_does(
    tmp_path: Path,
) -> None:
    """Without worker processes the ledger validates each batch (with its compiled fast
    path for bulk appends); an invalid event makes the relay validate one by one. What is
    stored must be exactly what validating in the preparer (worker processes) stores."""
    events = _events(700)
    events[100]["action"] = "Not.An.Action"
    events[450]["changes"]["name"]["new"] = 2**60  # refused only when encoded
    events[451]["ledger"] = {"seq": 0}  # reserved: must be refused, never stripped
    events[600]["changes"]["name"]["new"] = 2.5
    rows: list[tuple[str, str, str | bytes]] = [
        (e["id"], "tx", orjson.dumps(e).decode()) for e in events
    ]
    app = make_sqlite_app(tmp_path)
    insert_raw_sqlite_outbox(app, rows)
    pristine = tmp_path / "pristine.db"
    shutil.copyfile(app.path, pristine)
    stored = []
    for workers in (0, 2):
        # The same outbox, rows and path alike (a rejection records both).
        shutil.copyfile(pristine, app.path)
        ledger = sqlite_ledger(tmp_path / f"w{workers}")
        with Relay(app.url, ledger, batch=500, workers=workers) as relay:
            assert relay.workers == workers
            stats = relay.run_once()
        assert (stats.shipped, stats.rejected) == (700, 4)
        assert ledger.verify().ok
        stored.append(ledger_events(ledger))  # without the ledger's member
        ledger.close()
    assert stored[0] == stored[1]
    assert [i for i, e in enumerate(stored[0]) if e["action"] == REJECTED_ACTION] == [
        100,
        450,
        451,
        600,
    ]


def test_backoff_grows_with_jitter_and_is_capped(tmp_path: Path, ledger: Ledger) -> None:
    app = make_sqlite_app(tmp_path)
    relay = Relay(app.url, ledger, backoff=0.5, max_backoff=8.0)
    try:
        for failures, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (60, 8.0)]:
            delays = {relay._delay(failures) for _ in range(200)}
            assert all(ceiling / 10 <= d <= ceiling for d in delays)
            assert len(delays) > 150  # jittered
    finally:
        relay.close()


def test_stop_ends_the_thread_promptly(tmp_path: Path, ledger: Ledger) -> None:
    app = make_sqlite_app(tmp_path)
    relay = Relay(app.url, ledger, poll=60)
    relay.start()
    time.sleep(0.05)
    started = time.monotonic()
    relay.close()
    assert time.monotonic() - started < 5


def test_missing_outbox_is_a_storage_error(tmp_path: Path, ledger: Ledger) -> None:
    app = make_sqlite_app(tmp_path, emulated_outbox=False)
    with Relay(app.url, ledger) as relay, pytest.raises(StorageError, match="outbox"):
        relay.run_once()


def test_a_failed_delete_leaves_its_rows_to_ship_again(tmp_path: Path, ledger: Ledger) -> None:
    """Deletes run behind the appends: one that fails neither loses its rows nor lets a
    later batch's delete take them; they ship again and are answered as duplicates."""
    app = make_sqlite_app(tmp_path)
    events = _events(10)
    emulated_sqlite_events(app, events)
    relay = Relay(app.url, ledger, batch=2)
    real = relay._outbox.acknowledge
    calls = 0

    def acknowledge(conn: Any, rows: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise StorageError("the outbox is locked (test)")
        real(conn, rows)

    relay._outbox.acknowledge = acknowledge  # type: ignore[method-assign]
    try:
        with pytest.raises(StorageError, match="locked"):
            relay.run_once()
        assert _outbox_count(app.path) >= 2
        relay.run_once()
        assert (relay.stats.shipped, relay.stats.duplicates) == (8, 2)
        assert relay.pending() == 0
    finally:
        relay.close()
    assert [e["id"] for e in ledger_events(ledger)] == [e["id"] for e in events]
    alive = {t.name for t in threading.enumerate()}
    assert not alive & {"sealtrail-relay-reader", "sealtrail-relay-deleter"}
    assert ledger.verify().ok


def test_a_single_connection_database_is_read_without_threads(ledger: Ledger) -> None:
    """An in-memory SQLite database exists in one connection only: the relay reads and
    deletes in its own thread there (a reader thread would see another, empty database)."""
    import sqlite3

    from sqlalchemy import create_engine

    from capture_helpers import SQLITE_OUTBOX_DDL

    engine = create_engine("sqlite://")
    raw = engine.raw_connection()
    try:
        assert isinstance(raw.dbapi_connection, sqlite3.Connection)
        raw.dbapi_connection.executescript(SQLITE_OUTBOX_DDL)
        events = _events(5)
        raw.dbapi_connection.executemany(
            "INSERT INTO sealtrail_outbox (event_id, txid, event) VALUES (?, ?, ?)",
            [(e["id"], "tx", orjson.dumps(e).decode()) for e in events],
        )
        raw.dbapi_connection.commit()
    finally:
        raw.close()
    with Relay(engine, ledger, batch=2) as relay:
        assert relay.run_once().shipped == 5
        assert relay.pending() == 0
    assert [e["id"] for e in ledger_events(ledger)] == [e["id"] for e in events]
    engine.dispose()


# -- PostgreSQL outbox ---------------------------------------------------------------------
@pytest.fixture
def pg_app(pg_database: Any) -> PgApp:
    app = make_pg_app(pg_database.url)
    install_emulated_pg_outbox(app)
    app.execute("CREATE TABLE accounts (id int PRIMARY KEY, name text, balance numeric(12,2))")
    app.tables["accounts"] = ["id"]
    return app


@pytest.mark.postgres
def test_postgres_errors_are_storage_errors(
    tmp_path: Path, pg_database: Any, ledger: Ledger
) -> None:
    app = make_pg_app(pg_database.url)  # no outbox in this schema
    with Relay(app.url, ledger) as relay, pytest.raises(StorageError, match="sealtrail_outbox"):
        relay.run_once()
    with Relay(app.url, ledger) as relay, pytest.raises(StorageError, match="sealtrail_outbox"):
        relay.drain()


@pytest.mark.postgres
def test_postgres_commit_order_and_uncommitted_rows(
    tmp_path: Path, pg_app: PgApp, pg_url: str
) -> None:
    ledger = pg_ledger(tmp_path, pg_url)
    try:
        early = pg_app.connect()
        late_start = emulated_pg_tx(pg_app, early)
        a = late_start.__enter__()
        a.insert("accounts", {"id": 1, "name": "first statement, commits last", "balance": 1})
        with emulated_pg_tx(pg_app) as b:
            b.insert("accounts", {"id": 2, "name": "commits first", "balance": 2})
        # A transaction whose commit row is not written yet is not shipped.
        with Relay(pg_app.url, ledger) as relay:
            assert relay.run_once().shipped == 1
            a.update("accounts", {"id": 1}, {"balance": 5})
            late_start.__exit__(None, None, None)
            early.close()
            assert relay.run_once().shipped == 2
            assert relay.pending() == 0
        stored = ledger_events(ledger)
        assert [(e["target"]["id"], e["action"]) for e in stored] == [
            ("2", "db.insert"),
            ("1", "db.insert"),
            ("1", "db.update"),
        ]
        assert stored[2]["changes"] == {"balance": {"old": "1.00", "new": "5.00"}}
        with pg_app.connect() as conn:
            left = conn.execute("SELECT count(*) FROM sealtrail_outbox_commit").fetchone()
        assert left == (0,)
        assert ledger.verify().ok
    finally:
        ledger.close()


@pytest.mark.postgres
def test_postgres_every_window_of_commit_order_is_shipped(
    tmp_path: Path, pg_app: PgApp, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Commit order is read a window of keys at a time; the next window starts after the
    # last key of this one. The keys are (id, commit_seq): taken the wrong way round, the
    # second window started at commit_seq = the last id and found nothing, so a run
    # shipped one window (100,000 rows) of a larger outbox and left the rest.
    from sealtrail.capture import relay as relay_module

    monkeypatch.setattr(relay_module, "WINDOW", 7)
    sizes = [1, 10, 2, 15, 1, 4]  # transactions, in commit order
    events = _events(sum(sizes))
    rows, txids, seqs = [], [], []
    for t, size in enumerate(sizes):
        txids.append(f"tx{t}")
        seqs.append(1 + 3 * t)  # numbers with gaps, as a spent sequence leaves them
        rows += [(e, f"tx{t}") for e in events[len(rows) : len(rows) + size]]
    with pg_app.connect() as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE sealtrail_outbox ALTER COLUMN id RESTART WITH 1000")
        # Written in the reverse of commit order: ids do not follow it.
        cur.executemany(
            "INSERT INTO sealtrail_outbox (event_id, txid, event) VALUES (%s, %s, %s)",
            [(e["id"], txid, orjson.dumps(e).decode()) for e, txid in reversed(rows)],
        )
        cur.executemany(
            "INSERT INTO sealtrail_outbox_commit (txid, commit_seq) VALUES (%s, %s)",
            list(zip(txids, seqs, strict=True)),
        )
        conn.commit()
    ledger = pg_ledger(tmp_path, pg_url)
    try:
        with Relay(pg_app.url, ledger, batch=3, processors=[]) as relay:
            assert relay.run_once().shipped == len(rows)
            assert relay.pending() == 0
        # Commit order, then the order within each transaction (ids: reversed here).
        expected = [
            e["id"] for t in range(len(sizes)) for e, txid in reversed(rows) if txid == f"tx{t}"
        ]
        assert [e["id"] for e in ledger_events(ledger)] == expected
    finally:
        ledger.close()


@pytest.mark.postgres
def test_postgres_many_small_transactions_after_stale_statistics_stay_linear(
    tmp_path: Path, pg_app: PgApp, pg_url: str
) -> None:
    # The outbox tables are a queue: analyzed while nearly empty (as autovacuum leaves them
    # behind a working relay), then a burst of small transactions. With both sides
    # estimated at one row, the planner joined outbox and commit rows for the window's
    # order in a nested loop whose join filter compared every row with every row.
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    n = 2000
    first, *events = _events(n + 1)

    def queue(rows: list[dict[str, Any]], start: int) -> None:
        with pg_app.connect() as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO sealtrail_outbox (event_id, txid, event) VALUES (%s, %s, %s)",
                [(e["id"], f"t{start + i}", orjson.dumps(e).decode()) for i, e in enumerate(rows)],
            )
            cur.executemany(
                "INSERT INTO sealtrail_outbox_commit (txid, commit_seq) VALUES (%s, %s)",
                [(f"t{start + i}", start + i + 1) for i in range(len(rows))],
            )
            conn.commit()

    ledger = pg_ledger(tmp_path, pg_url)
    queue([first], 0)  # shipped, deleted, then the emptied tables analyzed
    with Relay(pg_app.url, ledger, processors=[]) as relay:
        assert relay.run_once().shipped == 1
    pg_app.execute("ANALYZE sealtrail_outbox, sealtrail_outbox_commit")
    queue(events, 1)

    def index_reads() -> int:  # index entries and table rows read, both outbox tables
        with pg_app.connect() as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes "
                "        WHERE schemaname = %(s)s AND relname LIKE 'sealtrail_outbox%%') "
                "     + (SELECT coalesce(sum(seq_tup_read), 0) FROM pg_stat_user_tables "
                "        WHERE schemaname = %(s)s AND relname LIKE 'sealtrail_outbox%%')",
                {"s": pg_app.schema},
            ).fetchone()
        assert row is not None
        return int(row[0])

    # Every connection of the relay closes when it is released: a backend reports its
    # counts as it exits.
    engine = create_engine(
        pg_app.url.replace("postgresql://", "postgresql+psycopg://"), poolclass=NullPool
    )
    try:
        before = index_reads()
        with Relay(engine, ledger, processors=[]) as relay:
            waiting = relay.metrics()  # PostgreSQL's created_at is a timestamptz
            assert "sealtrail_relay_pending{source=" in waiting and f"}} {n}\n" in waiting
            age = relay.oldest_pending_age()
            assert age is not None and 0 <= age < 60
            assert relay.run_once().shipped == n
            assert relay.oldest_pending_age() is None
        engine.dispose()
        deadline, reads = time.monotonic() + 10, index_reads()
        while time.monotonic() < deadline:  # until the exited backends have reported
            time.sleep(0.3)
            reads, last = index_reads(), reads
            if reads == last and reads > before:
                break
        assert [e["id"] for e in ledger_events(ledger)] == [e["id"] for e in [first, *events]]
        # Linear: a handful of reads per row (the nested loop read about n * n).
        assert reads - before < 20 * n, reads - before
    finally:
        ledger.close()


@pytest.mark.postgres
def test_postgres_concurrent_writers_ship_in_commit_order(
    tmp_path: Path, pg_app: PgApp, pg_url: str
) -> None:
    ledger = pg_ledger(tmp_path, pg_url)
    order: list[str] = []
    lock = threading.Lock()

    def writer(base: int) -> None:
        for i in range(15):
            conn = pg_app.connect()
            try:
                tx = EmulatedTxCommitLogger(conn, pg_app)
                tx.tx.insert("accounts", {"id": base + i, "name": "w", "balance": i})
                tx.commit(order, lock)
            finally:
                conn.close()

    relay = Relay(pg_app.url, ledger, batch=7, poll=0.01)
    relay.start()
    try:
        threads = [threading.Thread(target=writer, args=(b,)) for b in (0, 1000, 2000)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 20
        while relay.stats.shipped < 45 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        relay.close()
    stored = ledger_events(ledger)
    assert [e["data"]["db"]["txid"] for e in stored] == order
    ledger.close()


@pytest.mark.postgres
def test_postgres_large_transaction_keeps_its_commit_row_until_its_last_row(
    tmp_path: Path, pg_app: PgApp, pg_url: str
) -> None:
    """A transaction larger than a batch ships over several (by id range), its commit row
    stays until its last row is gone, and transactions interleaved with it (ids not
    consecutive within a batch) still ship in commit order."""
    ledger = pg_ledger(tmp_path, pg_url)
    try:
        big_conn = pg_app.connect()
        with emulated_pg_tx(pg_app, big_conn) as big:
            for i in range(40):
                big.insert("accounts", {"id": i, "name": f"n{i}", "balance": i})
                if i % 9 == 0:  # interleaved ids, committed first
                    with emulated_pg_tx(pg_app) as small:
                        small.insert("accounts", {"id": 1000 + i, "name": "s", "balance": 0})
        big_conn.close()
        with Relay(pg_app.url, ledger, batch=7) as relay:
            assert relay.ship() == 7  # five small transactions and two big rows: by ids
            assert relay.ship() == 7  # big rows only: by id range
            with pg_app.connect() as conn:
                left = conn.execute("SELECT count(*) FROM sealtrail_outbox_commit").fetchone()
            assert left == (1,)
            stats = relay.run_once()
            assert (stats.shipped, stats.duplicates, stats.rejected) == (31, 0, 0)
        with pg_app.connect() as conn:
            assert conn.execute("SELECT count(*) FROM sealtrail_outbox").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM sealtrail_outbox_commit").fetchone() == (0,)
        stored = [e["target"]["id"] for e in ledger_events(ledger)]
        assert stored == ["1000", "1009", "1018", "1027", "1036", *map(str, range(40))]
        assert ledger.verify().ok
    finally:
        ledger.close()


@pytest.mark.postgres
def test_postgres_jsonb_rows_over_the_limits_are_recorded(
    tmp_path: Path, pg_app: PgApp, ledger: Ledger
) -> None:
    """jsonb rows are not checked while parsed: the ledger refuses what it cannot store
    (an integer beyond 2**53, over the size limit) and the relay records those rows."""
    big = {**_events(1)[0], "reason": "x" * 70_000}
    huge_int = _events(1)[0]
    huge_int["data"]["n"] = 2**60
    fine = _events(2)
    with pg_app.connect() as conn:
        for event in (fine[0], big, huge_int, fine[1]):
            conn.execute(
                "INSERT INTO sealtrail_outbox (event_id, txid, event) VALUES (%s, 'tx9', %s)",
                (event["id"], orjson.dumps(event).decode()),
            )
        conn.execute("INSERT INTO sealtrail_outbox_commit VALUES ('tx9', 1)")
        conn.commit()
    with Relay(pg_app.url, ledger) as relay:
        stats = relay.run_once()
    assert (stats.shipped, stats.rejected) == (4, 2)
    stored = ledger_events(ledger)
    assert [e["id"] for e in (stored[0], stored[3])] == [fine[0]["id"], fine[1]["id"]]
    assert "over the limit" in stored[1]["data"]["relay"]["reason"]
    assert stored[1]["data"]["outbox"]["event_id"] == big["id"]
    assert "data.n" in stored[2]["data"]["relay"]["reason"]
    assert ledger.verify().ok


@pytest.mark.postgres
def test_postgres_hostile_json_rows_are_recorded_and_never_block(
    tmp_path: Path, pg_app: PgApp, ledger: Ledger
) -> None:
    """A ``json`` outbox column keeps what PostgreSQL's JSON check lets through and
    ``jsonb`` would have refused or changed: a lone surrogate escape, ``\\u0000``, nesting
    beyond any limit, a megabyte. Whoever wrote such rows (the triggers never do), each is
    shipped as a rejection record or stored as the valid event it is, in order, and the
    outbox empties."""
    with pg_app.connect() as conn:
        conn.execute("ALTER TABLE sealtrail_outbox ALTER COLUMN event TYPE json")
        conn.commit()
    good = _events(3)
    surrogate = _events(1)[0]
    nul = _events(1)[0]
    deep = _events(1)[0]
    big = _events(1)[0]
    texts = [
        (good[0]["id"], orjson.dumps(good[0]).decode()),
        (surrogate["id"], orjson.dumps(surrogate).decode()[:-1] + ',"reason":"\\ud800"}'),
        (nul["id"], orjson.dumps(nul).decode()[:-1] + ',"reason":"a\\u0000b"}'),
        (good[1]["id"], orjson.dumps(good[1]).decode()),
        (deep["id"], orjson.dumps(deep).decode()[:-1] + ',"data":' + "[" * 3000 + "]" * 3000 + "}"),
        (big["id"], orjson.dumps(big).decode()[:-1] + ',"reason":"' + "x" * 1_000_000 + '"}'),
        (good[2]["id"], orjson.dumps(good[2]).decode()),
    ]
    with pg_app.connect() as conn:
        for event_id, text in texts:
            conn.execute(
                "INSERT INTO sealtrail_outbox (event_id, txid, event) VALUES (%s, 'tx7', %s)",
                (event_id, text),
            )
        conn.execute("INSERT INTO sealtrail_outbox_commit VALUES ('tx7', 1)")
        conn.commit()
    with Relay(pg_app.url, ledger) as relay:
        stats = relay.run_once()
        assert relay.pending() == 0
    assert stats.shipped == len(texts)
    stored = ledger_events(ledger)
    assert len(stored) == len(texts)
    assert [stored[i]["id"] for i in (0, 3, 6)] == [e["id"] for e in good]
    rejected = [e for e in stored if e["action"] == "sealtrail.relay.rejected"]
    # The NUL is a valid JSON string: stored as sent. The others are refused, each named.
    assert stored[2]["id"] == nul["id"] and stored[2]["reason"] == "a\x00b"
    assert {e["data"]["outbox"]["event_id"] for e in rejected} == {
        surrogate["id"],
        deep["id"],
        big["id"],
    }
    assert stats.rejected == 3
    assert ledger.verify().ok


class EmulatedTxCommitLogger:
    """Commits and logs the txid while still holding the commit-order lock, so the log is
    the true commit order."""

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], app: PgApp) -> None:
        from capture_helpers import EmulatedPgTx

        self.conn = conn
        self.tx = EmulatedPgTx(conn, app)

    def commit(self, order: list[str], lock: threading.Lock) -> None:
        self.tx.mark_committing()
        with lock:
            self.conn.commit()
            order.append(self.tx.txid)


# -- the kill test -------------------------------------------------------------------------
WORKER = Path(__file__).with_name("relay_kill_worker.py")
PG_HOSTILE = HOSTILE.replace("\x00", "")  # PostgreSQL text cannot hold NUL


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry.name))
    return found


def _terminate_ledger_connections(dsn: str, seconds: float) -> int:
    """Make the ledger's database unavailable for a while: terminate every connection of
    the store (application_name 'sealtrail') as soon as it appears."""
    killed = 0
    deadline = time.monotonic() + seconds
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'sealtrail' AND datname = current_database() "
                "AND pid <> pg_backend_pid()"
            ).fetchone()
            killed += int(row[0]) if row else 0
            time.sleep(0.02)
    return killed


@pytest.mark.slow
@pytest.mark.postgres
def test_relay_killed_repeatedly_and_ledger_down_loses_nothing(
    tmp_path: Path, pg_app: PgApp, pg_url: str, pg_database: Any
) -> None:
    """A relay SIGKILLed over and over mid-stream (also inside the window between the
    ledger's commit and the outbox delete), and the ledger's database terminating every
    connection for a while, as an application keeps writing. At the end every captured
    event is in the ledger exactly once, in commit order, and the ledger verifies."""
    import random
    import subprocess
    import sys

    ledger = pg_ledger(tmp_path, pg_url)
    ledger.close()
    home = str(tmp_path / "home")
    rng = random.Random(1234)
    expected: list[str] = []
    writing = threading.Event()
    writing.set()

    def write() -> None:
        conn = pg_app.connect()
        try:
            n = 0
            while writing.is_set() and n < 5000:
                with emulated_pg_tx(pg_app, conn) as tx:
                    base = 10 * n
                    tx.insert("accounts", {"id": base, "name": PG_HOSTILE, "balance": n})
                    tx.insert("accounts", {"id": base + 1, "name": "b", "balance": 1})
                    if n:
                        tx.update("accounts", {"id": base - 10}, {"balance": n + 0.5})
                    if n % 3 == 0:
                        tx.delete("accounts", {"id": base + 1})
                expected.extend(e["id"] for e in tx.events)  # committed: in commit order
                n += 1
                time.sleep(0.002)
        finally:
            conn.close()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), *sys.path])}

    def start(crash_at: int, workers: int = 0) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), pg_app.url, home, str(crash_at), str(workers)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready": the kill lands in the relay loop, not in imports
        return proc

    writer = threading.Thread(target=write)
    writer.start()
    kills = self_kills = 0
    outage_killed = 0
    try:
        for round_ in range(14):
            # Every third round the relay kills itself at its 1st to 4th acknowledgement,
            # in one of the two windows; the others are killed from outside.
            crash_at = rng.randint(1, 4) if round_ % 3 == 0 else 0
            proc = start(crash_at, workers=round_ % 2)  # with and without worker processes
            if round_ == 5:
                # The ledger is down for 1.5 s while this relay runs (it backs off).
                outage_killed = _terminate_ledger_connections(pg_database.url, 1.5)
            if crash_at:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    raise AssertionError("the relay did not reach its crash point") from None
                assert proc.returncode == -signal.SIGKILL, proc.returncode
                self_kills += 1
            else:
                time.sleep(rng.uniform(0.15, 0.6))
                assert proc.poll() is None, proc.returncode
                proc.kill()
                kills += 1
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
    finally:
        writing.clear()
        writer.join()
    # A last relay, not killed, drains the outbox.
    proc = start(0)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with pg_app.connect() as conn:
                left = conn.execute("SELECT count(*) FROM sealtrail_outbox").fetchone()
            if left == (0,):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]

    assert kills == 9 and self_kills == 5 and outage_killed >= 1 and len(expected) > 500
    # No worker process outlives its killed relay.
    deadline = time.monotonic() + 5
    while _processes_mentioning(home) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(home) == []
    with pg_app.connect() as conn:
        assert conn.execute("SELECT count(*) FROM sealtrail_outbox").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM sealtrail_outbox_commit").fetchone() == (0,)
    ledger = open_ledger(home)
    try:
        stored = [e["id"] for e in ledger_events(ledger)]
        assert len(stored) == len(set(stored))  # exactly once
        assert stored == expected  # everything, in commit order, nothing else
        report = ledger.verify()
        assert report.ok, report.findings
    finally:
        ledger.close()


# -- end to end through the capture backends -----------------------------------------------
@pytest.mark.postgres
def test_end_to_end_postgres_triggers_and_relay_role(
    tmp_path: Path, pg_database: Any, pg_url: str
) -> None:
    from sqlalchemy import create_engine, text

    from sealtrail.capture import pg
    from sealtrail.capture.change import Track

    app = make_pg_app(pg_database.url)
    schema = app.schema
    app.execute("CREATE TABLE accounts (id int PRIMARY KEY, email text, pin text, n int)")
    role = pg_database.create_role()
    try:
        with app.connect() as conn:
            pg.install(conn, [Track.of(f"{schema}.accounts", mask={"pin"})], schema=schema)
            conn.commit()
        pg.grant_relay(pg_database.url, role, schema=schema)
        with app.connect(autocommit=True) as conn:
            with sealtrail.context(actor="user:7", ip="10.0.0.1"), pg.transaction(conn):
                conn.execute(
                    "INSERT INTO accounts SELECT g, 'a@x', '1234', g FROM generate_series(1, 50) g"
                )
            with sealtrail.context(actor="user:8"), pg.transaction(conn):
                conn.execute("UPDATE accounts SET n = n + 1, pin = '9999' WHERE id <= 10")
                conn.execute("DELETE FROM accounts WHERE id = 50")
            conn.execute("UPDATE accounts SET n = 0 WHERE id = 1")  # no context: psql-like
        ledger = pg_ledger(tmp_path, pg_url)
        # The superuser is not the relay role: its DELETE is refused; nothing is lost.
        engine = create_engine(app.url.replace("postgresql://", "postgresql+psycopg://"))
        with Relay(engine, ledger) as wrong, pytest.raises(StorageError, match="refused"):
            wrong.run_once()
        engine.dispose()
        assert ledger.size() == 1 + 50 + 11 + 1  # the install is an event too
        relay_url = app.url.replace("postgres@", f"{role}@", 1)
        with Relay(relay_url, ledger) as relay:
            stats = relay.run_once()
            assert (stats.shipped, stats.duplicates, stats.rejected) == (0, 63, 0)
            assert relay.pending() == 0
        install, *stored = ledger_events(ledger)
        assert install["action"] == "sealtrail.capture.install"
        assert [e["action"] for e in stored] == ["db.insert"] * 50 + ["db.update"] * 10 + [
            "db.delete",
            "db.update",
        ]
        assert stored[0]["actor"] == {"id": "user:7"}
        # Masked at capture; "pin" is also a sensitive key name for the default redactor.
        assert stored[0]["changes"]["pin"] == {"new": "[REDACTED]"}
        assert stored[50]["changes"]["pin"] == {"old": "[REDACTED]", "new": "[REDACTED]"}
        assert stored[50]["data"]["db"]["table"] == f"{schema}.accounts"
        assert stored[-1]["actor"]["id"] == "db:postgres"
        assert stored[-1]["data"]["db"]["app_context"] == "missing"
        assert len({e["data"]["db"]["txid"] for e in stored}) == 3
        with app.connect() as conn:
            assert conn.execute("SELECT count(*) FROM sealtrail_outbox_commit").fetchone() == (0,)
        assert ledger.verify().ok
        ledger.close()
        del text
    finally:
        pg_database.drop_role(role)


@pytest.mark.postgres
@pytest.mark.parametrize("column", ["json", "jsonb"])
def test_outbox_event_column_json_and_jsonb_ship_the_same_events(
    tmp_path: Path, pg_database: Any, pg_url: str, column: str
) -> None:
    """The outbox's event column is ``json`` since session 4 (the application's
    transaction no longer builds ``jsonb``); an outbox installed earlier, with ``jsonb``,
    keeps working: the capture functions' JSON is assigned to it. Both ship the same
    events; a key repeated by a writer other than the triggers resolves to its last value
    in both, as jsonb always resolved it."""
    from sealtrail.capture import pg
    from sealtrail.capture.change import Track

    app = make_pg_app(pg_database.url)
    schema = app.schema
    app.execute("CREATE TABLE accounts (id int PRIMARY KEY, email text, n int, at timestamptz)")
    with app.connect() as conn:
        pg.install(conn, [Track.of(f"{schema}.accounts")], schema=schema)
        conn.commit()
        kind = conn.execute(
            "SELECT format_type(atttypid, NULL) FROM pg_attribute "
            "WHERE attrelid = 'sealtrail_outbox'::regclass AND attname = 'event'"
        ).fetchone()
        assert kind == ("json",)
        if column == "jsonb":  # as an earlier version installed it
            conn.execute("ALTER TABLE sealtrail_outbox ALTER COLUMN event TYPE jsonb")
            conn.commit()
    with app.connect(autocommit=True) as conn:
        with sealtrail.context(actor="user:7", ip="10.0.0.1"), pg.transaction(conn):
            conn.execute(
                "INSERT INTO accounts SELECT g, 'a' || g || '@example.org', g, "
                "'2026-11-22 10:00:00.5+00' FROM generate_series(1, 20) g"
            )
        with sealtrail.context(actor="user:8", reason="fix"), pg.transaction(conn):
            conn.execute("UPDATE accounts SET n = n + 1 WHERE id <= 5")
            conn.execute("DELETE FROM accounts WHERE id = 20")
        twice = {**_events(1)[0], "reason": "first"}
        text = orjson.dumps(twice).decode()[:-1] + ',"reason":"last"}'
        conn.execute(
            "INSERT INTO sealtrail_outbox (event_id, txid, event) VALUES (%s, 'tx-dup', %s)",
            (twice["id"], text),
        )
        conn.execute("INSERT INTO sealtrail_outbox_commit VALUES ('tx-dup', 1000)")
    role = pg_database.create_role()
    ledger = pg_ledger(tmp_path, pg_url)
    try:
        pg.grant_relay(pg_database.url, role, schema=schema)
        with Relay(app.url.replace("postgres@", f"{role}@", 1), ledger) as relay:
            stats = relay.run_once()
        assert (stats.shipped, stats.rejected) == (1 + 20 + 5 + 1 + 1, 0)
        install, *stored = ledger_events(ledger)
        assert install["action"] == "sealtrail.capture.install"
        assert [e["action"] for e in stored] == ["db.insert"] * 20 + ["db.update"] * 5 + [
            "db.delete",
            twice["action"],
        ]
        first = stored[0]
        assert first["actor"] == {"id": "user:7"} and first["source"] == {"ip": "10.0.0.1"}
        assert first["changes"] == {
            "at": {"new": "2026-11-22T10:00:00.500000+00:00"},
            "email": {"new": "[REDACTED:email]"},
            "id": {"new": 1},
            "n": {"new": 1},
        }
        assert stored[20]["changes"] == {"n": {"old": 1, "new": 2}}
        assert stored[20]["reason"] == "fix" and stored[20]["actor"] == {"id": "user:8"}
        assert stored[25]["changes"]["n"] == {"old": 20}
        assert stored[-1]["reason"] == "last"
        assert ledger.verify().ok
    finally:
        ledger.close()
        pg_database.drop_role(role)


def test_end_to_end_sqlite_orm_capture_and_guard(tmp_path: Path, ledger: Ledger) -> None:
    from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, update
    from sqlalchemy.exc import SQLAlchemyError

    from sealtrail.capture import orm

    metadata = MetaData()
    accounts = Table(
        "accounts",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("email", String),
        Column("n", Integer),
    )
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    capture = orm.track(engine, [accounts], metadata=metadata)
    metadata.create_all(engine)
    capture.create_outbox(engine)
    with sealtrail.context(actor="user:3"), engine.begin() as conn:
        conn.execute(insert(accounts), [{"id": i, "email": "e", "n": i} for i in range(1, 21)])
    with sealtrail.context(actor="user:4"), engine.begin() as conn:
        conn.execute(update(accounts).where(accounts.c.id <= 5).values(n=accounts.c.n + 100))
    # Only the relay may delete from the outbox.
    with pytest.raises(SQLAlchemyError, match="deleted only by the relay"), engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM sealtrail_outbox")
    with Relay(engine, ledger) as relay:
        stats = relay.run_once()
        assert stats.shipped == 25 and relay.pending() == 0
    stored = ledger_events(ledger)
    assert [e["action"] for e in stored] == ["db.insert"] * 20 + ["db.update"] * 5
    assert stored[-1]["actor"] == {"id": "user:4"}
    assert stored[-1]["changes"] == {"n": {"old": 5, "new": 105}}
    assert ledger.verify().ok
    engine.dispose()
