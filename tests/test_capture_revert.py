"""Revert: named conformance tests on PostgreSQL and SQLite.

Revert of an update, a delete, an insert and a whole transaction; conflicts of each kind
(changed since, missing, exists, unique, foreign key), reported by a dry run and refused by a
real run with nothing left half-done; schema changes since the change (added NOT NULL,
dropped, renamed); masked, redacted and excluded columns.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from capture_helpers import (
    change_event,
    emulated_sqlite_events,
    install_emulated_pg_outbox,
    make_pg_app,
    make_sqlite_app,
    sqlite_ledger,
)
from sealtrail._exceptions import NotFound
from sealtrail.capture.change import MASKED
from sealtrail.capture.relay import Relay
from sealtrail.capture.revert import RevertError, find_changes, revert
from sealtrail.ledger import Ledger

PG_SCHEMA = """
CREATE TABLE customers (
    id int PRIMARY KEY,
    email text UNIQUE,
    balance numeric(12,2),
    score double precision,
    joined timestamptz,
    birthday date,
    active boolean,
    avatar bytea,
    prefs jsonb,
    ip inet,
    note text
);
CREATE TABLE orders (
    id int PRIMARY KEY,
    customer_id int REFERENCES customers(id),
    total numeric(10,2)
);
"""

SQLITE_SCHEMA = """
CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    email TEXT UNIQUE,
    balance NUMERIC,
    score REAL,
    joined DATETIME,
    birthday DATE,
    active BOOLEAN,
    avatar BLOB,
    prefs TEXT,
    ip TEXT,
    note TEXT
);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER REFERENCES customers(id),
    total NUMERIC
);
"""


def _customer(i: int, backend: str, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": i,
        "email": f"c{i}@example.test",
        "balance": "12.50",
        "score": 0.1,
        "joined": "2026-03-01 10:11:12.123456" + ("+00" if backend == "postgres" else ""),
        "birthday": "1990-05-17",
        "active": True,
        "avatar": b"\x00\xffPNG",
        "prefs": '{"theme": "dark", "n": 3}' if backend == "sqlite" else None,
        "ip": "10.1.2.3",
        "note": f"note {i}",
    }
    if backend == "postgres":
        from psycopg.types.json import Jsonb

        row["prefs"] = Jsonb({"theme": "dark", "n": 3, "ratio": "0.5"})
    row.update(over)
    return row


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        request.applymarker(pytest.mark.postgres)
    return str(request.param)


@pytest.fixture
def app(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    if backend == "postgres":
        database = request.getfixturevalue("pg_database")
        pg = make_pg_app(database.url)
        install_emulated_pg_outbox(pg)
        pg.execute(PG_SCHEMA)
        app: Any = pg
    else:
        app = make_sqlite_app(tmp_path)
        app.execute(SQLITE_SCHEMA)
    app.tables.update({"customers": ["id"], "orders": ["id"]})
    app.backend = backend
    return app


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = sqlite_ledger(tmp_path)
    yield led
    led.close()


def ship(app: Any, ledger: Ledger) -> None:
    # No redaction here (a test below covers what redaction does to a revert).
    with Relay(app.url, ledger, processors=[]) as relay:
        relay.run_once()


def setup_rows(app: Any, ledger: Ledger, n: int = 3) -> dict[str, dict[str, Any]]:
    with app.tx() as tx:
        for i in range(1, n + 1):
            tx.insert("customers", _customer(i, app.backend))
        tx.insert("orders", {"id": 1, "customer_id": 1, "total": "5.00"})
    ship(app, ledger)
    return dict(app.rows("customers"))


def last_event(tx: Any) -> str:
    return str(tx.events[-1]["id"])


# -- the three undos and a transaction -----------------------------------------------------
def test_revert_update(app: Any, ledger: Ledger) -> None:
    before = setup_rows(app, ledger)
    with app.tx() as tx:
        tx.update(
            "customers",
            {"id": 2},
            {
                "balance": "99.99",
                "score": 2.5,
                "joined": "2027-01-01 00:00:00.000001"
                + ("+00" if app.backend == "postgres" else ""),
                "birthday": "2000-01-01",
                "active": False,
                "avatar": b"\x01",
                "note": None,
                "ip": "192.168.0.1",
            },
        )
        ref = last_event(tx)
    ship(app, ledger)
    assert app.rows("customers") != before
    result = revert(app.url, ledger, ref)
    assert result.applied and result.ok and result.undone == [ref]
    assert app.rows("customers") == before


def test_revert_delete(app: Any, ledger: Ledger) -> None:
    before = setup_rows(app, ledger)
    with app.tx() as tx:
        tx.delete("customers", {"id": 3})
        ref = last_event(tx)
    ship(app, ledger)
    assert "3" not in app.rows("customers")
    revert(app.url, ledger, ref)
    assert app.rows("customers") == before  # every column, same primary key


def test_revert_insert(app: Any, ledger: Ledger) -> None:
    before = setup_rows(app, ledger)
    with app.tx() as tx:
        tx.insert("customers", _customer(9, app.backend))
        ref = last_event(tx)
    ship(app, ledger)
    revert(app.url, ledger, ref)
    assert app.rows("customers") == before


def test_revert_transaction(app: Any, ledger: Ledger) -> None:
    before = setup_rows(app, ledger)
    orders = app.rows("orders")
    with app.tx() as tx:
        tx.insert("customers", _customer(4, app.backend))
        tx.update("customers", {"id": 4}, {"email": "renamed@example.test"})
        tx.insert("orders", {"id": 2, "customer_id": 4, "total": "1.00"})
        tx.update("customers", {"id": 1}, {"balance": "0.00", "note": "emptied"})
        tx.delete("orders", {"id": 1})
        tx.delete("customers", {"id": 2})
        txid = tx.txid
        ids = [e["id"] for e in tx.events]
    with app.tx() as other:
        other.update("customers", {"id": 3}, {"note": "another transaction"})
    ship(app, ledger)
    assert [c.id for c in find_changes(ledger, txid)] == ids
    result = revert(app.url, ledger, txid)
    assert result.undone == ids[::-1]  # in reverse order
    after = app.rows("customers")
    assert after["3"]["note"] == "another transaction"
    after["3"]["note"] = before["3"]["note"]
    assert after == before and app.rows("orders") == orders


# -- conflicts -----------------------------------------------------------------------------
def test_revert_conflict_changed_since(app: Any, ledger: Ledger) -> None:
    setup_rows(app, ledger)
    with app.tx() as tx:
        tx.update("customers", {"id": 1}, {"note": "first"})
        ref = last_event(tx)
    with app.tx() as tx:
        tx.update("customers", {"id": 1}, {"note": "second"})
    ship(app, ledger)
    now = app.rows("customers")
    dry = revert(app.url, ledger, ref, dry_run=True)
    assert not dry.applied and [(c.kind, c.column) for c in dry.conflicts] == [("changed", "note")]
    assert "'second'" in dry.conflicts[0].message and "'first'" in dry.conflicts[0].message
    with pytest.raises(RevertError, match="column 'note' changed since") as caught:
        revert(app.url, ledger, ref)
    assert caught.value.conflicts == dry.conflicts
    assert app.rows("customers") == now


def test_revert_conflict_missing_and_exists(app: Any, ledger: Ledger) -> None:
    setup_rows(app, ledger)
    with app.tx() as tx:
        tx.update("customers", {"id": 1}, {"note": "x"})
        update_ref = last_event(tx)
        tx.delete("customers", {"id": 2})
        delete_ref = last_event(tx)
        tx.insert("customers", _customer(7, app.backend))
        insert_ref = last_event(tx)
    with app.tx() as tx:
        tx.delete("orders", {"id": 1})
        tx.delete("customers", {"id": 1})
        tx.insert("customers", _customer(2, app.backend, email="back@example.test"))
        tx.delete("customers", {"id": 7})
    ship(app, ledger)
    for ref, kind in [(update_ref, "missing"), (delete_ref, "exists"), (insert_ref, "missing")]:
        result = revert(app.url, ledger, ref, dry_run=True)
        assert [c.kind for c in result.conflicts] == [kind], ref


def test_revert_conflict_unique(app: Any, ledger: Ledger) -> None:
    setup_rows(app, ledger)
    with app.tx() as tx:
        tx.delete("customers", {"id": 3})
        ref = last_event(tx)
    with app.tx() as tx:
        tx.insert("customers", _customer(8, app.backend, email="c3@example.test"))
    ship(app, ledger)
    now = app.rows("customers")
    result = revert(app.url, ledger, ref, dry_run=True)
    assert [c.kind for c in result.conflicts] == ["unique"]
    with pytest.raises(RevertError, match=r"(?i)unique"):
        revert(app.url, ledger, ref)
    assert app.rows("customers") == now


def test_revert_conflict_foreign_key(app: Any, ledger: Ledger) -> None:
    setup_rows(app, ledger)
    with app.tx() as tx:
        tx.insert("customers", _customer(5, app.backend))
        insert_ref = last_event(tx)
    with app.tx() as tx:
        tx.insert("orders", {"id": 5, "customer_id": 5, "total": "3.00"})
        tx.delete("orders", {"id": 1})
        order_ref = last_event(tx)
        tx.delete("customers", {"id": 1})
    ship(app, ledger)
    # Deleting a customer that orders now reference.
    result = revert(app.url, ledger, insert_ref, dry_run=True)
    assert [c.kind for c in result.conflicts] == ["foreign_key"]
    # Re-creating an order whose customer is gone.
    result = revert(app.url, ledger, order_ref, dry_run=True)
    assert [c.kind for c in result.conflicts] == ["foreign_key"]
    with pytest.raises(RevertError, match=r"(?i)foreign key"):
        revert(app.url, ledger, order_ref)


def test_revert_transaction_conflict_leaves_no_partial_state(app: Any, ledger: Ledger) -> None:
    setup_rows(app, ledger)
    with app.tx() as tx:
        tx.update("customers", {"id": 1}, {"note": "a"})
        tx.update("customers", {"id": 2}, {"note": "b"})
        tx.update("customers", {"id": 3}, {"note": "c"})
        txid = tx.txid
    with app.tx() as tx:
        tx.update("customers", {"id": 2}, {"note": "changed later"})
        tx.delete("customers", {"id": 3})
    ship(app, ledger)
    now = app.rows("customers")
    dry = revert(app.url, ledger, txid, dry_run=True)
    # Every conflict is reported, not only the first.
    assert sorted((c.kind, c.key) for c in dry.conflicts) == [("changed", "2"), ("missing", "3")]
    assert app.rows("customers") == now
    with pytest.raises(RevertError, match="and 1 more"):
        revert(app.url, ledger, txid)
    assert app.rows("customers") == now  # the clean step (row 1) was rolled back too


# -- schema changes ------------------------------------------------------------------------
def _alter(app: Any, postgres: str, sqlite: str) -> None:
    app.execute(postgres if app.backend == "postgres" else sqlite)


def test_revert_after_schema_change_added_not_null(app: Any, ledger: Ledger) -> None:
    setup_rows(app, ledger)
    with app.tx() as tx:
        tx.delete("customers", {"id": 3})
        ref = last_event(tx)
    ship(app, ledger)
    _alter(
        app,
        "ALTER TABLE customers ADD COLUMN tier text NOT NULL DEFAULT 'gold';"
        "ALTER TABLE customers ALTER COLUMN tier DROP DEFAULT;",
        # SQLite cannot drop a default: rebuild the table (its documented 12 steps, short).
        "PRAGMA foreign_keys=OFF;"
        "CREATE TABLE c2 (id INTEGER PRIMARY KEY, email TEXT UNIQUE, balance NUMERIC, "
        "score REAL, joined DATETIME, birthday DATE, active BOOLEAN, avatar BLOB, prefs TEXT,"
        " ip TEXT, note TEXT, tier TEXT NOT NULL);"
        "INSERT INTO c2 SELECT *, 'gold' FROM customers;"
        "DROP TABLE customers; ALTER TABLE c2 RENAME TO customers;",
    )
    with pytest.raises(RevertError, match=r"'tier'.*NOT NULL without a default") as caught:
        revert(app.url, ledger, ref)
    assert [(c.kind, c.column) for c in caught.value.conflicts] == [("schema", "tier")]
    assert "3" not in app.rows("customers")


def test_revert_after_schema_change_dropped(app: Any, ledger: Ledger) -> None:
    setup_rows(app, ledger)
    with app.tx() as tx:
        tx.update("customers", {"id": 1}, {"note": "x", "balance": "1.00"})
        ref = last_event(tx)
    ship(app, ledger)
    app.execute("ALTER TABLE customers DROP COLUMN note")
    now = app.rows("customers")
    with pytest.raises(RevertError, match="column 'note' of customers no longer exists"):
        revert(app.url, ledger, ref)
    assert app.rows("customers") == now  # balance was not reverted alone


def test_revert_after_schema_change_renamed(app: Any, ledger: Ledger) -> None:
    setup_rows(app, ledger)
    with app.tx() as tx:
        tx.delete("customers", {"id": 2})
        ref = last_event(tx)
    ship(app, ledger)
    app.execute("ALTER TABLE customers RENAME COLUMN note TO memo")
    result = revert(app.url, ledger, ref, dry_run=True)
    assert sorted((c.kind, c.column) for c in result.conflicts) == [
        ("schema", "memo"),
        ("schema", "note"),
    ]
    with pytest.raises(RevertError, match="'note' of customers no longer exists"):
        revert(app.url, ledger, ref)


def test_revert_after_table_dropped(app: Any, ledger: Ledger) -> None:
    setup_rows(app, ledger)
    with app.tx() as tx:
        tx.delete("orders", {"id": 1})
        ref = last_event(tx)
    ship(app, ledger)
    app.execute("DROP TABLE orders")
    with pytest.raises(RevertError, match="table orders no longer exists"):
        revert(app.url, ledger, ref)


def test_revert_value_no_longer_fits_the_column(app: Any, ledger: Ledger) -> None:
    setup_rows(app, ledger)
    if app.backend == "sqlite":
        # SQLite stores any text in a DATE column; the revert reads it through the type.
        with app.tx() as tx:
            tx.update("customers", {"id": 1}, {"birthday": "someday"})
            tx.update("customers", {"id": 1}, {"birthday": "2000-01-01"})
            ref = str(tx.events[1]["id"])
        ship(app, ledger)
        column = "birthday"
    else:
        with app.tx() as tx:
            tx.update("customers", {"id": 1}, {"note": "not a number"})
            tx.update("customers", {"id": 1}, {"note": "7"})
            ref = str(tx.events[1]["id"])
        ship(app, ledger)
        app.execute("UPDATE customers SET note = '7'")
        app.execute("ALTER TABLE customers ALTER COLUMN note TYPE int USING note::int")
        column = "note"
    result = revert(app.url, ledger, ref, dry_run=True)
    assert [(c.kind, c.column) for c in result.conflicts] == [("schema", column)]
    assert f"column {column!r}" in result.conflicts[0].message


# -- values the trail does not hold --------------------------------------------------------
def test_masked_redacted_and_excluded_columns_fail_clearly(
    app: Any, ledger: Ledger, tmp_path: Path
) -> None:
    setup_rows(app, ledger)
    with app.tx() as tx:
        tx.update("customers", {"id": 1}, {"email": "new@example.test", "note": "n"})
        email_ref = last_event(tx)
    # The default redactor finds the e-mail addresses and masks them.
    with Relay(app.url, ledger) as relay:
        relay.run_once()
    stored = ledger.get(email_ref)
    assert stored.body is not None and b"[REDACTED" in stored.body
    with pytest.raises(RevertError, match="column 'email': its old value was masked"):
        revert(app.url, ledger, email_ref)

    masked = change_event(
        "customers",
        "update",
        {"id": 2},
        {"note": {"old": MASKED, "new": MASKED}},
        "m1",
    )
    excluded = change_event(
        "customers",
        "delete",
        {"id": 3},
        {c: {"old": v} for c, v in app.rows("customers")["3"].items() if c != "avatar"},
        "m2",
    )
    if app.backend == "sqlite":
        emulated_sqlite_events(app, [masked, excluded])
    else:
        with app.connect() as conn:
            for e in (masked, excluded):
                import orjson

                conn.execute(
                    "INSERT INTO sealtrail_outbox (event_id, txid, event) VALUES (%s, %s, %s)",
                    (e["id"], "m", orjson.dumps(e).decode()),
                )
            conn.execute("INSERT INTO sealtrail_outbox_commit VALUES ('m', 999999)")
            conn.commit()
    ship(app, ledger)
    with pytest.raises(RevertError, match="column 'note': its old value was masked"):
        revert(app.url, ledger, masked["id"])
    with app.tx() as tx:
        tx.delete("customers", {"id": 3})
    result = revert(app.url, ledger, excluded["id"], dry_run=True)
    assert [(c.kind, c.column) for c in result.conflicts] == [("schema", "avatar")]
    assert "not in the recorded row" in result.conflicts[0].message


def test_unknown_references(app: Any, ledger: Ledger) -> None:
    setup_rows(app, ledger)
    with pytest.raises(NotFound):
        revert(app.url, ledger, "no-such-transaction")
    other = ledger.append({"action": "user.login", "actor": {"id": "u", "type": "user"}})
    with pytest.raises(RevertError, match="not a captured database change"):
        revert(app.url, ledger, other.id)
    with pytest.raises(RevertError, match="nothing to revert"):
        revert(app.url, ledger, "  ")


def test_a_transaction_with_pruned_changes_is_not_half_reverted(ledger: Ledger) -> None:
    """Retention pruned one change of a transaction: reverting the rest would leave it
    half undone without a word, so the revert is refused; pruning elsewhere is no bar."""

    def tx(txid: str, ids: range) -> list[dict[str, Any]]:
        return [change_event("items", "insert", {"id": i}, {"id": {"new": i}}, txid) for i in ids]

    seqs = [r.seq for r in ledger.append_many(tx("t1", range(3)) + tx("t2", range(3, 6)))]
    ledger.append_many(tx("t3", range(6, 9)))
    assert [c.seq for c in find_changes(ledger, "t2")] == seqs[3:6]
    ledger.prune([seqs[0]], reason="retention")  # t1's first: not next to t2
    assert len(find_changes(ledger, "t2")) == 3
    with pytest.raises(RevertError, match="pruned"):
        find_changes(ledger, "t1")  # its own first change is gone
    ledger.prune([seqs[4]], reason="retention")  # t2's middle one
    with pytest.raises(RevertError, match=f"transaction t2: .* indexes {seqs[4]}"):
        find_changes(ledger, "t2")
    assert len(find_changes(ledger, "t3")) == 3


# -- end to end through the capture backends -----------------------------------------------
KINDS_TABLE = """
CREATE TABLE kinds (
    id int PRIMARY KEY,
    big int8,
    amount numeric(14,4),
    ratio float8,
    at timestamptz,
    local_at timestamp,
    day date,
    clock time,
    span interval,
    raw bytea,
    doc jsonb,
    addr inet,
    token uuid,
    tags text[],
    flag boolean,
    note text
)
"""


def _kinds_row(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "big": 2**60 + i,
        "amount": "1234.5678",
        "ratio": 0.1 * i,
        "at": "2026-03-01 10:11:12.123456+02",
        "local_at": "2026-03-01 10:11:12.5",
        "day": "2026-03-01",
        "clock": "23:59:58.25",
        "span": "1 day 02:03:04.5",
        "raw": bytes([0, 255, i]),
        "doc": '{"a": [1, "x", {"b": null}], "n": 7}',
        "addr": "192.168.1.7",
        "token": "01890a5d-ac96-774b-bcce-b302099a8057",
        "tags": ["x", "y z"],
        "flag": True,
        "note": f"note {i}\u2028\u202e",
    }


@pytest.mark.postgres
def test_revert_through_postgres_triggers_is_captured_and_linked(
    tmp_path: Path, pg_database: Any, ledger: Ledger
) -> None:
    import psycopg

    import sealtrail
    from sealtrail.capture import pg
    from sealtrail.capture.change import Track
    from sealtrail.capture.history import history

    app = make_pg_app(pg_database.url)
    app.execute(KINDS_TABLE)
    app.tables["kinds"] = ["id"]
    table = f"{app.schema}.kinds"
    with app.connect() as conn:
        pg.install(conn, [Track.of(table)], schema=app.schema)
        conn.commit()
    pg.grant_relay(pg_database.url, "postgres", schema=app.schema)

    def write(sql: str, *params: Any) -> str:
        with (
            app.connect(autocommit=True) as conn,
            sealtrail.context(actor="user:9"),
            pg.transaction(conn),
        ):
            conn.execute(sql, params or None)  # type: ignore[arg-type]
            row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert row is not None
        return str(row[0])

    for i in (1, 2, 3):
        row = _kinds_row(i)
        cols = ", ".join(row)
        write(
            f"INSERT INTO kinds ({cols}) VALUES ({', '.join(['%s'] * len(row))})",
            *[
                psycopg.types.json.Jsonb(orjson.loads(v)) if k == "doc" else v
                for k, v in row.items()
            ],
        )
    before = app.rows("kinds")
    update_tx = write(
        "UPDATE kinds SET big = -1, amount = 0, ratio = 'NaN', at = now(), local_at = NULL, "
        "day = '2000-02-29', clock = '00:00', span = '-3 hours', raw = '\\xdead', "
        "doc = '{\"z\": 1}', addr = '10.0.0.1/8', token = NULL, tags = '{}', flag = false, "
        "note = 'changed' WHERE id = 1"
    )
    write("DELETE FROM kinds WHERE id = 2")
    ship(app, ledger)
    update = next(c for c in history(ledger, table, 1) if c.op == "update")
    assert update.txid == update_tx
    deleted = next(c for c in history(ledger, table, 2) if c.op == "delete")

    with sealtrail.context(actor="user:admin", reason="undo a mistake"):
        revert(app.url, ledger, update.id)
        revert(app.url, ledger, deleted.txid or "")
    assert app.rows("kinds") == before  # every type back exactly

    ship(app, ledger)
    undo_update = history(ledger, table, 1)[-1]
    undo_delete = history(ledger, table, 2)[-1]
    assert (undo_update.op, undo_update.reverts) == ("update", update.id)
    assert (undo_delete.op, undo_delete.reverts) == ("insert", deleted.txid)
    assert undo_update.actor == {"id": "user:admin"}
    assert undo_update.event["reason"] == "undo a mistake"
    # A revert of the revert is the original change again.
    revert(app.url, ledger, undo_update.id)
    assert app.rows("kinds")["1"]["note"] == "changed"

    # A row with a GENERATED ALWAYS identity key comes back with the same key.
    app.execute("CREATE TABLE ids (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text)")
    app.tables["ids"] = ["id"]
    with app.connect() as conn:
        pg.install(conn, [Track.of(table), Track.of(f"{app.schema}.ids")], schema=app.schema)
        conn.commit()
    write("INSERT INTO ids (v) VALUES ('a'), ('b'), ('c')")
    ids_before = app.rows("ids")
    write("DELETE FROM ids WHERE v = 'b'")
    ship(app, ledger)
    gone = history(ledger, f"{app.schema}.ids", 2)[-1]
    assert gone.op == "delete"
    revert(app.url, ledger, gone.id)
    assert app.rows("ids") == ids_before


def test_revert_through_orm_capture_is_captured_and_linked(tmp_path: Path, ledger: Ledger) -> None:
    from sqlalchemy import (
        Column,
        Date,
        DateTime,
        Integer,
        LargeBinary,
        MetaData,
        Numeric,
        String,
        Table,
        create_engine,
        delete,
        insert,
        select,
        update,
    )

    import sealtrail
    from sealtrail.capture import orm
    from sealtrail.capture.change import Track
    from sealtrail.capture.history import history

    metadata = MetaData()
    items = Table(
        "items",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String, nullable=False),
        Column("price", Numeric(10, 2)),
        Column("seen", DateTime(timezone=False)),
        Column("day", Date),
        Column("blob", LargeBinary),
    )
    engine = create_engine(f"sqlite:///{tmp_path / 'orm.db'}")
    # By name: revert writes through a Table it reflects, not the application's object.
    capture = orm.track(engine, [Track.of("items")], metadata=metadata)
    metadata.create_all(engine)
    import datetime as dt
    from decimal import Decimal

    def rows() -> list[Any]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(items).order_by(items.c.id))]

    with sealtrail.context(actor="user:1"), engine.begin() as conn:
        conn.execute(
            insert(items),
            [
                {
                    "id": i,
                    "name": f"n{i}",
                    "price": Decimal("9.99"),
                    "seen": dt.datetime(2026, 1, 2, 3, 4, 5, 678901),
                    "day": dt.date(2026, 1, i),
                    "blob": b"\x00\x01",
                }
                for i in (1, 2, 3)
            ],
        )
    before = rows()
    with sealtrail.context(actor="user:2"), engine.begin() as conn:
        conn.execute(update(items).where(items.c.id == 1).values(name="x", price=Decimal("0.01")))
        conn.execute(delete(items).where(items.c.id == 3))
    ship_engine(engine, ledger)
    txid = history(ledger, "items", 1)[-1].txid
    assert txid is not None
    with sealtrail.context(actor="user:admin"):
        result = revert(engine, ledger, txid)
    assert len(result.undone) == 2
    assert rows() == before
    ship_engine(engine, ledger)
    assert history(ledger, "items", 1)[-1].reverts == txid
    assert history(ledger, "items", 3)[-1].reverts == txid
    assert history(ledger, "items", 3)[-1].actor == {"id": "user:admin"}

    # Tracked as the application's Table object: the revert writes through a Table it
    # reflects, which capture recognises as the same database table.
    capture.remove()
    capture = orm.track(engine, [items])
    try:
        with engine.begin() as conn:
            conn.execute(update(items).where(items.c.id == 2).values(name="y"))
        ship_engine(engine, ledger)
        change = history(ledger, "items", 2)[-1]
        revert(engine, ledger, change.id)
        ship_engine(engine, ledger)
        assert history(ledger, "items", 2)[-1].reverts == change.id
    finally:
        capture.remove()
    engine.dispose()


def ship_engine(engine: Any, ledger: Ledger) -> None:
    with Relay(engine, ledger, processors=[]) as relay:
        relay.run_once()
