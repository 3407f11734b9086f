"""Helpers for the relay, revert and history tests: application databases with an outbox in
the contract format of :mod:`sealtrail.capture.change`, written the way capture writes it.

``Emulated*`` write the outbox themselves (the change event built in Python, inserted in the
same transaction as the change, PostgreSQL commit rows written under a lock right before
COMMIT), so the relay and the reconstruction can be tested without a capture backend.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import sql

from sealtrail.capture.change import ACTIONS, json_value, pk_text, target_type
from sealtrail.event import new_event_id, utc_now
from sealtrail.home import init_ledger
from sealtrail.ledger import Ledger, entry_event

PG_OUTBOX_DDL = """
CREATE SEQUENCE IF NOT EXISTS sealtrail_outbox_commit_seq;
CREATE TABLE IF NOT EXISTS sealtrail_outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id text NOT NULL UNIQUE,
    txid text NOT NULL,
    event jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS sealtrail_outbox_txid ON sealtrail_outbox (txid, id);
CREATE TABLE IF NOT EXISTS sealtrail_outbox_commit (
    txid text PRIMARY KEY,
    commit_seq bigint NOT NULL UNIQUE
);
"""

SQLITE_OUTBOX_DDL = """
CREATE TABLE IF NOT EXISTS sealtrail_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    txid TEXT NOT NULL,
    event TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
"""


def change_event(
    table: str,
    op: str,
    pk: Mapping[str, Any],
    changes: Mapping[str, Any],
    txid: str,
    *,
    actor: Mapping[str, Any] | None = None,
    when: str | None = None,
    extra_db: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A change event as capture makes it (see the contract in change.py)."""
    db: dict[str, Any] = {
        "table": table,
        "op": op,
        "pk": {k: json_value(v) for k, v in pk.items()},
        "txid": txid,
        "app_context": "present",
        "role": "app",
    }
    db.update(extra_db or {})
    return {
        "id": new_event_id(),
        "time": when or utc_now(),
        "action": ACTIONS[op],
        "outcome": "success",
        "actor": dict(actor or {"id": "user:42", "type": "user"}),
        "target": {"type": target_type(table), "id": pk_text(pk, list(pk))},
        "changes": dict(changes),
        "data": {"db": db},
    }


def _json(value: Any) -> Any:
    try:
        return json_value(value)
    except TypeError:  # inet and other types PostgreSQL renders as text
        return str(value)


def row_changes(
    op: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None
) -> dict[str, Any]:
    if op == "insert":
        assert new is not None
        return {c: {"new": _json(v)} for c, v in new.items()}
    if op == "delete":
        assert old is not None
        return {c: {"old": _json(v)} for c, v in old.items()}
    assert old is not None and new is not None
    return {
        c: {"old": _json(old[c]), "new": _json(new[c])}
        for c in new
        if _json(old.get(c)) != _json(new[c])
    }


# -- ledgers -------------------------------------------------------------------------------
def sqlite_ledger(directory: Path) -> Ledger:
    return init_ledger(directory / "home", origin="capture.test/log")


def pg_ledger(directory: Path, store_url: str) -> Ledger:
    return init_ledger(directory / "home", store=store_url, origin="capture.test/log")


def ledger_events(ledger: Ledger) -> list[dict[str, Any]]:
    out = []
    for entry in ledger.store.iter_entries(0, ledger.size()):
        assert entry.body is not None
        out.append(entry_event(entry.body))
    return out


# -- PostgreSQL application databases ------------------------------------------------------
@dataclass
class PgApp:
    """An application schema in the session's test database."""

    dsn: str  # libpq URL of the database
    schema: str
    tables: dict[str, list[str]] = field(default_factory=dict)  # table -> pk columns

    @property
    def url(self) -> str:
        """For :func:`sealtrail.capture.relay.open_app_db` (search_path set to the schema)."""
        return f"{self.dsn}?options=-csearch_path%3D{self.schema}"

    def connect(self, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
        conn = psycopg.connect(self.dsn, **kwargs)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        conn.commit()
        return conn

    def execute(self, statement: str, params: Sequence[Any] | None = None) -> None:
        with self.connect() as conn:
            conn.execute(statement, params)  # type: ignore[arg-type,unused-ignore]
            conn.commit()

    def tx(self) -> Any:
        return emulated_pg_tx(self)

    def rows(self, table: str) -> dict[str, dict[str, Any]]:
        """The table's rows by pk text, values as json_value."""
        pk = self.tables[table]
        with self.connect() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            cur.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
            return {pk_text(r, pk): {k: _json(v) for k, v in r.items()} for r in cur.fetchall()}


def make_pg_app(database_url: str) -> PgApp:
    schema = f"app_{secrets.token_hex(5)}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    return PgApp(database_url, schema)


def install_emulated_pg_outbox(app: PgApp) -> None:
    with app.connect() as conn:
        conn.execute(PG_OUTBOX_DDL)
        conn.commit()


class _EmulatedTx:
    """What both emulated transactions share: the outbox row written beside each change."""

    conn: Any
    txid: str
    events: list[dict[str, Any]]
    #: the driver's parameter placeholder
    mark = "?"

    def _outbox(self, table: str, op: str, pk: Mapping[str, Any], changes: dict[str, Any]) -> None:
        if not changes:
            return
        event = change_event(table, op, pk, changes, self.txid)
        self.events.append(event)
        marks = ", ".join([self.mark] * 3)
        self.conn.execute(
            f"INSERT INTO sealtrail_outbox (event_id, txid, event) VALUES ({marks})",
            (event["id"], self.txid, orjson.dumps(event).decode()),
        )


class EmulatedPgTx(_EmulatedTx):
    """One application transaction on PostgreSQL that writes its own outbox rows."""

    mark = "%s"

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], app: PgApp) -> None:
        self.conn = conn
        self.app = app
        row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert row is not None
        self.txid = str(row[0])
        self.events: list[dict[str, Any]] = []

    def _select(self, table: str, pk: Mapping[str, Any]) -> dict[str, Any] | None:
        where = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in pk)
        with self.conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            cur.execute(
                sql.SQL("SELECT * FROM {} WHERE {}").format(sql.Identifier(table), where),
                list(pk.values()),
            )
            return cur.fetchone()

    def insert(self, table: str, values: Mapping[str, Any]) -> None:
        cols = list(values)
        self.conn.execute(
            sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                sql.Identifier(table),
                sql.SQL(", ").join(map(sql.Identifier, cols)),
                sql.SQL(", ").join(sql.Placeholder() * len(cols)),
            ),
            list(values.values()),
        )
        pk = {c: values[c] for c in self.app.tables[table]}
        new = self._select(table, pk)
        assert new is not None
        self._outbox(table, "insert", pk, row_changes("insert", None, new))

    def update(self, table: str, pk: Mapping[str, Any], values: Mapping[str, Any]) -> None:
        old = self._select(table, pk)
        assert old is not None
        where = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in pk)
        sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in values)
        self.conn.execute(
            sql.SQL("UPDATE {} SET {} WHERE {}").format(sql.Identifier(table), sets, where),
            [*values.values(), *pk.values()],
        )
        new = self._select(table, pk)
        assert new is not None
        self._outbox(table, "update", pk, row_changes("update", old, new))

    def delete(self, table: str, pk: Mapping[str, Any]) -> None:
        old = self._select(table, pk)
        assert old is not None
        where = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in pk)
        self.conn.execute(
            sql.SQL("DELETE FROM {} WHERE {}").format(sql.Identifier(table), where),
            list(pk.values()),
        )
        self._outbox(table, "delete", pk, row_changes("delete", old, None))

    def mark_committing(self) -> None:
        """The commit row, written last under a lock held until COMMIT (commit order)."""
        if self.events:
            self.conn.execute("SELECT pg_advisory_xact_lock(7340121)")
            self.conn.execute(
                "INSERT INTO sealtrail_outbox_commit VALUES "
                "(%s, nextval('sealtrail_outbox_commit_seq'))",
                (self.txid,),
            )


@contextmanager
def emulated_pg_tx(
    app: PgApp, conn: psycopg.Connection[tuple[Any, ...]] | None = None
) -> Iterator[EmulatedPgTx]:
    own = conn is None
    connection = app.connect() if conn is None else conn
    try:
        tx = EmulatedPgTx(connection, app)
        try:
            yield tx
        except BaseException:
            connection.rollback()
            raise
        tx.mark_committing()
        connection.commit()
    finally:
        if own:
            connection.close()


# -- SQLite application databases ----------------------------------------------------------
@dataclass
class SQLiteApp:
    path: Path
    tables: dict[str, list[str]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def execute(self, script: str) -> None:
        conn = self.connect()
        try:
            conn.executescript(script)
        finally:
            conn.close()

    def tx(self) -> Any:
        return emulated_sqlite_tx(self)

    def rows(self, table: str) -> dict[str, dict[str, Any]]:
        pk = self.tables[table]
        conn = self.connect()
        try:
            found = conn.execute(f'SELECT * FROM "{table}"').fetchall()
        finally:
            conn.close()
        return {pk_text(dict(r), pk): {k: json_value(v) for k, v in dict(r).items()} for r in found}


class EmulatedSQLiteTx(_EmulatedTx):
    """One application transaction on SQLite that writes its own outbox rows."""

    def __init__(self, conn: sqlite3.Connection, app: SQLiteApp) -> None:
        self.conn = conn
        self.app = app
        self.txid = secrets.token_hex(8)
        self.events: list[dict[str, Any]] = []

    def _where(self, pk: Mapping[str, Any]) -> str:
        return " AND ".join(f'"{c}" = ?' for c in pk)

    def _select(self, table: str, pk: Mapping[str, Any]) -> dict[str, Any] | None:
        row = self.conn.execute(
            f'SELECT * FROM "{table}" WHERE {self._where(pk)}', list(pk.values())
        ).fetchone()
        return None if row is None else dict(row)

    def insert(self, table: str, values: Mapping[str, Any]) -> None:
        cols = ", ".join(f'"{c}"' for c in values)
        marks = ", ".join("?" * len(values))
        self.conn.execute(f'INSERT INTO "{table}" ({cols}) VALUES ({marks})', list(values.values()))
        pk = {c: values[c] for c in self.app.tables[table]}
        new = self._select(table, pk)
        assert new is not None
        self._outbox(table, "insert", pk, row_changes("insert", None, new))

    def update(self, table: str, pk: Mapping[str, Any], values: Mapping[str, Any]) -> None:
        old = self._select(table, pk)
        assert old is not None
        sets = ", ".join(f'"{c}" = ?' for c in values)
        self.conn.execute(
            f'UPDATE "{table}" SET {sets} WHERE {self._where(pk)}',
            [*values.values(), *pk.values()],
        )
        new = self._select(table, pk)
        assert new is not None
        self._outbox(table, "update", pk, row_changes("update", old, new))

    def delete(self, table: str, pk: Mapping[str, Any]) -> None:
        old = self._select(table, pk)
        assert old is not None
        self.conn.execute(f'DELETE FROM "{table}" WHERE {self._where(pk)}', list(pk.values()))
        self._outbox(table, "delete", pk, row_changes("delete", old, None))


@contextmanager
def emulated_sqlite_tx(app: SQLiteApp) -> Iterator[EmulatedSQLiteTx]:
    conn = app.connect()
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield EmulatedSQLiteTx(conn, app)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()


def make_sqlite_app(directory: Path, emulated_outbox: bool = True) -> SQLiteApp:
    app = SQLiteApp(directory / f"app_{secrets.token_hex(4)}.db")
    conn = app.connect()
    conn.execute("PRAGMA journal_mode=WAL")
    if emulated_outbox:
        conn.executescript(SQLITE_OUTBOX_DDL)
    conn.close()
    return app


def insert_raw_sqlite_outbox(app: SQLiteApp, rows: Sequence[tuple[str, str, str | bytes]]) -> None:
    """Rows of (event_id, txid, event text or bytes), one transaction."""
    conn = app.connect()
    try:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO sealtrail_outbox (event_id, txid, event) VALUES (?, ?, ?)", rows
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def emulated_sqlite_events(app: SQLiteApp, events: Sequence[Mapping[str, Any]]) -> None:
    insert_raw_sqlite_outbox(
        app,
        [(str(e["id"]), str(e["data"]["db"]["txid"]), orjson.dumps(e).decode()) for e in events],
    )
