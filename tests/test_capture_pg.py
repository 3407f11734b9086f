"""PostgreSQL capture (issue 4): triggers, actor context, atomicity, commit order, guards.

Each test gets a database of its own (the DDL watch is an event trigger, database-wide) and
drops it at the end; roles are made with random names and dropped too. Every event read
back from the outbox must pass ``prepare_event`` unchanged: the triggers write the normal
form of the envelope.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import BigInteger, DateTime, Numeric, String, create_engine, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import pg as pgtest
import sealtrail
from hostile import STORABLE
from sealtrail._exceptions import InvalidEvent
from sealtrail.capture import pg as cap
from sealtrail.capture.change import Track, json_value, pk_text
from sealtrail.context import NoActorPolicy
from sealtrail.event import prepare_event

pytestmark = pytest.mark.postgres

UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


# -- one database per test -----------------------------------------------------------------


@dataclass
class AppDB:
    name: str
    engines: list[Any] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)

    def url(self, user: str | None = None) -> str:
        return pgtest.with_database(pgtest.MAINTENANCE_URL, self.name, user)

    @property
    def sa_url(self) -> str:
        return self.url().replace("postgresql://", "postgresql+psycopg://", 1)

    def connect(self, user: str | None = None, **kwargs: Any) -> psycopg.Connection[Any]:
        kwargs.setdefault("autocommit", True)
        conn = psycopg.connect(self.url(user), **kwargs)
        return conn

    def engine(
        self, *, instrument: bool = True, no_actor: NoActorPolicy | None = None, **kwargs: Any
    ) -> Engine:
        engine = create_engine(self.sa_url, **kwargs)
        if instrument:
            cap.instrument(engine, no_actor=no_actor)
        self.engines.append(engine)
        return engine

    def execute(self, statement: str, params: Any = None) -> None:
        with self.connect() as conn:
            conn.execute(statement, params)  # type: ignore[arg-type]

    def role(self) -> str:
        role = f"sealtrail_cap_{secrets.token_hex(4)}"
        with psycopg.connect(pgtest.MAINTENANCE_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        self.roles.append(role)
        with self.connect() as conn:
            conn.execute(
                sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(sql.Identifier(role))
            )
        return role


@pytest.fixture
def db() -> Iterator[AppDB]:
    try:
        pgtest.ensure_server()
    except pgtest.ServerUnavailable as exc:
        pytest.fail(f"PostgreSQL tests need the local server: {exc}", pytrace=False)
    app = AppDB(f"sealtrail_cap_{os.getpid()}_{secrets.token_hex(4)}")
    with psycopg.connect(pgtest.MAINTENANCE_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(app.name)))
    try:
        yield app
    finally:
        for engine in app.engines:
            cap.uninstrument(engine)
            engine.dispose()
        with psycopg.connect(pgtest.MAINTENANCE_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(app.name))
            )
            for role in app.roles:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def outbox(app: AppDB, *, all_actions: bool = False) -> list[dict[str, Any]]:
    """The outbox's events in capture order, each checked against the envelope: stored in
    its normal form, with a commit row for its transaction."""
    with app.connect() as conn:
        rows = conn.execute(
            "SELECT o.event_id::text, o.txid, o.event, c.commit_seq FROM sealtrail_outbox o "
            "LEFT JOIN sealtrail_outbox_commit c USING (txid) ORDER BY o.id"
        ).fetchall()
    events = []
    for event_id, txid, event, commit_seq in rows:
        assert prepare_event(event) == event, event
        assert event["id"] == event_id and UUID7.fullmatch(event_id)
        assert TIME.fullmatch(event["time"]) and event["outcome"] == "success"
        assert commit_seq is not None, f"no commit row for {txid}"
        if event["action"].startswith("db."):
            assert event["data"]["db"]["txid"] == txid
        if all_actions or event["action"].startswith("db."):
            events.append(event)
    return events


def actor_ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["actor"]["id"] for e in events]


# -- the application ------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    email: Mapped[str] = mapped_column(String)
    name: Mapped[str | None] = mapped_column(String)
    password_hash: Mapped[str | None] = mapped_column(String)
    totp_secret: Mapped[str | None] = mapped_column(String)
    balance: Mapped[Decimal] = mapped_column(Numeric(12, 2), server_default="0")
    updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    doc: Mapped[Any] = mapped_column(JSONB, nullable=True)
    writer: Mapped[str | None] = mapped_column(String)


ACCOUNTS = Track.of("public.accounts", exclude=["password_hash"], mask=["totp_secret"])


def app_with_accounts(app: AppDB, **engine_kwargs: Any) -> Engine:
    engine = app.engine(**engine_kwargs)
    Base.metadata.create_all(engine)
    assert cap.install(app.url(), [ACCOUNTS]) == ["public.accounts"]
    return engine


def db_events(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["action"], e["target"]["id"]) for e in events]


# -- what is captured -----------------------------------------------------------------------


def test_insert_update_delete(db: AppDB) -> None:
    engine = app_with_accounts(db)
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=dt.UTC)
    with sealtrail.context(actor="user:42", ip="10.0.0.7", request_id="r-1", tenant="acme"):
        with Session(engine) as session, session.begin():
            session.add(
                Account(
                    id=7,
                    email="a@x.org",
                    password_hash="h1",
                    totp_secret="s1",
                    balance=Decimal("10.50"),
                    updated_at=when,
                    doc={"n": 1.5},
                )
            )
        with Session(engine) as session, session.begin():
            acc = session.get(Account, 7)
            assert acc is not None
            acc.email = "b@x.org"
            acc.totp_secret = "s2"
        with Session(engine) as session, session.begin():
            session.delete(session.get(Account, 7))
    ins, upd, dele = outbox(db)
    assert [e["action"] for e in (ins, upd, dele)] == ["db.insert", "db.update", "db.delete"]
    for event in (ins, upd, dele):
        assert event["actor"] == {"id": "user:42"}
        assert event["source"] == {"ip": "10.0.0.7", "request_id": "r-1"}
        assert event["tenant"] == "acme"
        assert event["target"] == {"type": "db:public.accounts", "id": "7"}
        db_ = event["data"]["db"]
        assert db_["table"] == "public.accounts" and db_["pk"] == {"id": 7}
        assert db_["app_context"] == "present" and db_["role"] == "postgres"
        assert "password_hash" not in orjson.dumps(event).decode()
        assert "h1" not in orjson.dumps(event).decode()
    assert ins["data"]["db"]["op"] == "insert"
    assert ins["changes"] == {
        "id": {"new": 7},
        "email": {"new": "a@x.org"},
        "name": {"new": None},
        "totp_secret": {"new": {"masked": True}},
        "balance": {"new": "10.50"},
        "updated_at": {"new": "2026-01-02T03:04:05.600000+00:00"},
        "doc": {"new": {"n": "1.5"}},
        "writer": {"new": None},
    }
    assert upd["changes"] == {
        "email": {"old": "a@x.org", "new": "b@x.org"},
        "totp_secret": {"old": {"masked": True}, "new": {"masked": True}},
    }
    assert set(dele["changes"]) == set(ins["changes"])
    assert dele["changes"]["email"] == {"old": "b@x.org"}
    assert len({e["data"]["db"]["txid"] for e in (ins, upd, dele)}) == 3


def test_noop_update_produces_no_event(db: AppDB) -> None:
    app_with_accounts(db)
    with db.connect() as conn:
        conn.execute("INSERT INTO accounts (id, email, balance) VALUES (1, 'a', 1)")
        conn.execute("UPDATE accounts SET email = 'a', balance = 1.00")
        conn.execute("UPDATE accounts SET email = email WHERE id = 1")
        conn.execute("UPDATE accounts SET email = 'z' WHERE id = 2")  # no row
    assert [e["action"] for e in outbox(db)] == ["db.insert"]


def test_update_of_only_excluded_columns_produces_no_event(db: AppDB) -> None:
    app_with_accounts(db)
    with db.connect() as conn:
        conn.execute("INSERT INTO accounts (id, email, password_hash) VALUES (1, 'a', 'xyzzy-1')")
        conn.execute("UPDATE accounts SET password_hash = 'xyzzy-2'")
        conn.execute("UPDATE accounts SET password_hash = 'xyzzy-3', totp_secret = 'plugh'")
    events = outbox(db)
    assert [e["action"] for e in events] == ["db.insert", "db.update"]
    assert events[1]["changes"] == {
        "totp_secret": {"old": {"masked": True}, "new": {"masked": True}}
    }
    everything = orjson.dumps(outbox(db, all_actions=True)).decode()
    assert "xyzzy" not in everything and "plugh" not in everything
    assert "password_hash" not in orjson.dumps(events).decode()


def test_bulk_insert_update_delete_10k_rows(db: AppDB) -> None:
    engine = app_with_accounts(db)
    with sealtrail.context(actor="user:bulk"), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO accounts (id, email, balance) "
                "SELECT g, 'u' || g || '@x.org', g FROM generate_series(1, 10000) g"
            )
        )
    with sealtrail.context(actor="user:bulk"), engine.begin() as conn:
        conn.execute(text("UPDATE accounts SET balance = balance + 0.5 WHERE id % 2 = 0"))
        conn.execute(text("UPDATE accounts SET balance = balance + 0.5 WHERE id % 2 = 1"))
    with sealtrail.context(actor="user:bulk"), engine.begin() as conn:
        conn.execute(text("DELETE FROM accounts"))
    events = outbox(db)
    assert len(events) == 30000
    assert all(e["actor"] == {"id": "user:bulk"} for e in events)
    by_action: dict[str, set[str]] = {}
    for e in events:
        by_action.setdefault(e["action"], set()).add(e["target"]["id"])
    assert {k: len(v) for k, v in by_action.items()} == {
        "db.insert": 10000,
        "db.update": 10000,
        "db.delete": 10000,
    }
    sample = next(e for e in events if e["action"] == "db.update" and e["target"]["id"] == "42")
    assert sample["changes"] == {"balance": {"old": "42.00", "new": "42.50"}}
    assert len({e["id"] for e in events}) == 30000
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM sealtrail_outbox_commit").fetchone() == (4,)


def test_raw_sql_through_the_app_connection(db: AppDB) -> None:
    engine = app_with_accounts(db)
    with sealtrail.context(actor={"id": "svc-7", "type": "service"}, reason="migration 12"):
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO accounts (id, email) VALUES (1, 'a'), (2, 'b')")
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            conn.execute(text("UPDATE accounts SET email = upper(email)"))
            conn.commit()
    events = outbox(db)
    assert len(events) == 4
    assert all(e["actor"] == {"id": "svc-7", "type": "service"} for e in events)
    assert all(e["reason"] == "migration 12" for e in events)


def test_a_second_client_is_recorded_as_its_database_role(db: AppDB) -> None:
    app_with_accounts(db)
    role = db.role()
    db.execute(
        sql.SQL("GRANT INSERT, UPDATE, SELECT ON accounts TO {}")
        .format(sql.Identifier(role))
        .as_string(None)
    )
    cap.grant_app(db.url(), role)
    # The context is not sent: this client knows nothing of Sealtrail.
    with sealtrail.context(actor="user:1"), db.connect(role) as other:
        other.execute("INSERT INTO accounts (id, email) VALUES (1, 'a')")
    with db.connect() as admin:  # a superuser acting as the role
        admin.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        admin.execute("UPDATE accounts SET email = 'b'")
    events = outbox(db)
    assert len(events) == 2
    for event in events:
        assert event["actor"] == {"id": f"db:{role}", "type": "service"}
        assert event["data"]["db"]["app_context"] == "missing"
        assert event["data"]["db"]["role"] == role


def test_rollback_leaves_no_event(db: AppDB) -> None:
    engine = app_with_accounts(db)
    with sealtrail.context(actor="user:1"), Session(engine) as session:
        session.add(Account(id=1, email="a"))
        session.flush()
        session.rollback()
    with (
        db.connect() as conn,
        pytest.raises(psycopg.errors.UniqueViolation),
        conn.transaction(),
    ):
        conn.execute("INSERT INTO accounts (id, email) VALUES (5, 'x')")
        conn.execute("INSERT INTO accounts (id, email) VALUES (5, 'y')")
    assert outbox(db) == []
    with db.connect() as conn:  # only install's own transaction
        assert conn.execute("SELECT count(*) FROM sealtrail_outbox_commit").fetchone() == (1,)


def test_savepoint_rollback_leaves_no_event(db: AppDB) -> None:
    engine = app_with_accounts(db)
    with sealtrail.context(actor="user:1"), Session(engine) as session, session.begin():
        session.add(Account(id=1, email="kept"))
        session.flush()
        nested = session.begin_nested()
        session.add(Account(id=2, email="gone"))
        session.flush()
        nested.rollback()
        with session.begin_nested():
            session.add(Account(id=3, email="kept too"))
    events = outbox(db)
    assert db_events(events) == [("db.insert", "1"), ("db.insert", "3")]
    # The first capturing statement of the transaction was rolled back; the commit row
    # still comes (from the statement after it).
    with db.connect() as conn:  # install's and this one
        assert conn.execute("SELECT count(*) FROM sealtrail_outbox_commit").fetchone() == (2,)
    # A savepoint that held the transaction's first event, rolled back.
    with sealtrail.context(actor="user:1"), Session(engine) as session, session.begin():
        with pytest.raises(RuntimeError), session.begin_nested():
            session.add(Account(id=4, email="gone"))
            session.flush()
            raise RuntimeError
        session.add(Account(id=5, email="kept"))
    assert db_events(outbox(db))[-1] == ("db.insert", "5")
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM sealtrail_outbox_commit").fetchone() == (3,)


def test_several_updates_of_one_row_in_one_transaction(db: AppDB) -> None:
    engine = app_with_accounts(db)
    with sealtrail.context(actor="user:1"), Session(engine) as session, session.begin():
        acc = Account(id=1, email="v0")
        session.add(acc)
        for i in range(1, 4):
            session.flush()
            acc.email = f"v{i}"
    events = outbox(db)
    assert [e["action"] for e in events] == ["db.insert"] + ["db.update"] * 3
    assert [e["changes"]["email"] for e in events[1:]] == [
        {"old": "v0", "new": "v1"},
        {"old": "v1", "new": "v2"},
        {"old": "v2", "new": "v3"},
    ]
    assert len({e["data"]["db"]["txid"] for e in events}) == 1


@pytest.mark.parametrize(
    ("ddl", "values", "columns"),
    [
        ("id integer PRIMARY KEY", "(7, 'a')", ["id"]),
        ("id bigint PRIMARY KEY", "(9007199254740993, 'a')", ["id"]),
        ("id uuid PRIMARY KEY", "('0190b6a2-8f1e-7c3a-9d4b-2f6e8a1c3b5d', 'a')", ["id"]),
        ("id text PRIMARY KEY", "('key \"7\" ü\n', 'a')", ["id"]),
        (
            "order_id int, line int, PRIMARY KEY (order_id, line)",
            "(7, 2, 'a')",
            ["order_id", "line"],
        ),
        (
            "b text, a uuid, PRIMARY KEY (b, a)",
            "('x\"\\\u2028', '0190b6a2-8f1e-7c3a-9d4b-2f6e8a1c3b5d', 'a')",
            ["b", "a"],
        ),
    ],
    ids=["int", "bigint", "uuid", "text", "composite", "composite-text-uuid"],
)
def test_primary_key_kinds(db: AppDB, ddl: str, values: str, columns: list[str]) -> None:
    db.execute(f"CREATE TABLE t ({ddl}, v text)")
    cap.install(db.url(), [Track.of("public.t")])
    with db.connect() as conn:
        conn.execute(f"INSERT INTO t VALUES {values}")
        conn.execute("UPDATE t SET v = 'b'")
        row = conn.execute(f"SELECT {', '.join(columns)} FROM t").fetchone()
        conn.execute("DELETE FROM t")
    assert row is not None
    key = dict(zip(columns, row, strict=True))
    events = outbox(db)
    assert len(events) == 3
    for event in events:
        assert event["target"] == {"type": "db:public.t", "id": pk_text(key, columns)}
        assert event["data"]["db"]["pk"] == {
            c: json_value(v) if not isinstance(v, int) or abs(v) < 2**53 else str(v)
            for c, v in key.items()
        }


def test_json_and_timestamp_columns(db: AppDB) -> None:
    db.execute(
        "CREATE TABLE t (id int PRIMARY KEY, j jsonb, js json, ts timestamptz, "
        "tz timestamp, d date, tm time)"
    )
    cap.install(db.url(), [Track.of("public.t")])
    doc = '{"a": 1.50, "b": [1, 2.25, {"c": 1e2, "d": null}], "e": "x", "f": 12345678901234567890}'
    with db.connect() as conn:
        conn.execute("SET TimeZone = 'Europe/Paris'")  # the writer's zone does not matter
        conn.execute(
            "INSERT INTO t VALUES (1, %s, %s, '2026-03-01 12:00:00.25+01', "
            "'2026-03-01 12:00:00', '2026-03-01', '10:11:12.5')",
            (doc, doc),
        )
    with db.connect(options="-c TimeZone=UTC") as conn:
        row = conn.execute("SELECT j, js, ts, tz, d, tm FROM t").fetchone()
    assert row is not None
    (event,) = outbox(db)
    changes = event["changes"]
    expected = {
        name: json_value(value)
        for name, value in zip(["j", "js", "ts", "tz", "d", "tm"], row, strict=True)
    }
    # Integers beyond 2**53 - 1 become text (the envelope refuses them as numbers); a json
    # (not jsonb) number written with an exponent and no fraction is read as jsonb reads
    # it, an integer (documented).
    expected["j"]["f"] = expected["js"]["f"] = "12345678901234567890"
    expected["js"]["b"][2]["c"] = 100
    assert {k: changes[k]["new"] for k in expected} == expected
    assert changes["ts"]["new"] == "2026-03-01T11:00:00.250000+00:00"
    assert changes["j"]["new"] == {
        "a": "1.5",
        "b": [1, "2.25", {"c": 100, "d": None}],
        "e": "x",
        "f": "12345678901234567890",
    }


def test_values_are_written_as_json_value_writes_them(db: AppDB) -> None:
    db.execute(
        "CREATE DOMAIN positive AS numeric CHECK (VALUE > 0); "
        "CREATE TYPE mood AS ENUM ('ok', 'sad'); "
        "CREATE TABLE t (id int PRIMARY KEY, f8 float8, f4 float4, n numeric, p positive, "
        "b bytea, u uuid, ok boolean, m mood, ints int[], texts text[], i8 int8, c char(3), "
        "iv interval)"
    )
    cap.install(db.url(), [Track.of("public.t")])
    rows = [
        (
            1,
            0.1,
            0.1,
            "1.50",
            "2",
            b"\x00\xff",
            "0190b6a2-8f1e-7c3a-9d4b-2f6e8a1c3b5d",
            True,
            "ok",
            [1, 2],
            ["a", 'b"c'],
            2**53 - 1,
            "ab",
            "1 day 02:00:00",
        ),
        (
            2,
            1e20,
            3.4e38,
            "NaN",
            "0.001",
            b"",
            None,
            False,
            "sad",
            [],
            [],
            -(2**53 - 1),
            "abc",
            None,
        ),
        (
            3,
            float("nan"),
            float("inf"),
            "-5",
            "1e3",
            b"x",
            None,
            None,
            None,
            None,
            None,
            5,
            None,
            None,
        ),
        (
            4,
            1234567890123456.8,
            -0.0,
            "12345678901234567890.123",
            "7",
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        ),
        (5, 1e15, 1e-7, "0", "1", None, None, None, None, None, None, None, None, None),
    ]
    with db.connect() as conn:
        for row in rows:
            conn.execute(
                "INSERT INTO t VALUES (%s, %s, %s, %s::numeric, %s::numeric, %s, %s, %s, %s, %s, "
                "%s, %s, %s, %s::interval)",
                row,
            )
        read = conn.execute("SELECT * FROM t ORDER BY id").fetchall()
        names = [d.name for d in conn.execute("SELECT * FROM t LIMIT 0").description or []]
    events = outbox(db)
    for event, values in zip(events, read, strict=True):
        for name, value in zip(names, values, strict=True):
            got = event["changes"][name]["new"]
            if name == "iv":
                # Intervals: PostgreSQL's text, not Python's str(timedelta) (documented).
                assert got in (None, "1 day 02:00:00")
                continue
            assert got == json_value(value), (name, value, got)


def test_hostile_strings_round_trip(db: AppDB) -> None:
    db.execute("CREATE TABLE t (id text PRIMARY KEY, v text, j jsonb, arr text[])")
    cap.install(db.url(), [Track.of("public.t")])
    storable = [(name, value.replace("\x00", "")) for name, value in STORABLE]  # no NUL in text
    with (
        sealtrail.context(actor="user:1", reason="hostile \u2028\x1b[31m"),
        db.engine().begin() as conn,
    ):
        for i, (name, value) in enumerate(storable):
            conn.execute(
                text("INSERT INTO t VALUES (:id, :v, :j, :arr)"),
                {
                    "id": value or f"empty-{i}",
                    "v": value,
                    "j": orjson.dumps({value: [value]}).decode(),
                    "arr": [value, name],
                },
            )
    events = outbox(db)
    assert len(events) == len(storable)
    for event, (name, value) in zip(events, storable, strict=True):
        assert event["target"]["id"] == (value or event["target"]["id"]), name
        assert event["changes"]["v"] == {"new": value}, name
        assert event["changes"]["j"] == {"new": {value: [value]}}, name
        assert event["changes"]["arr"] == {"new": [value, name]}, name
        assert event["reason"] == "hostile \u2028\x1b[31m"


def test_truncate_is_captured_as_deletes(db: AppDB) -> None:
    app_with_accounts(db)
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO accounts (id, email) SELECT g, 'e' || g FROM generate_series(1, 3) g"
        )
        conn.execute("TRUNCATE accounts")
    events = outbox(db)
    deletes = [e for e in events if e["action"] == "db.delete"]
    assert sorted(e["target"]["id"] for e in deletes) == ["1", "2", "3"]
    assert all(e["data"]["db"]["truncate"] is True for e in deletes)


def test_primary_key_change(db: AppDB) -> None:
    app_with_accounts(db)
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO accounts (id, email) SELECT g, 'e' || g FROM generate_series(1, 4) g"
        )
        conn.execute("UPDATE accounts SET id = id + 10 WHERE id <= 2")
        conn.execute("UPDATE accounts SET email = 'x' || email")  # keys unchanged again
    updates = [e for e in outbox(db) if e["action"] == "db.update"]
    moved = sorted(
        (
            e["target"]["id"],
            e["changes"]["id"]["new"],
            e["changes"].get("email", None),
        )
        for e in updates[:2]
    )
    assert moved == [("1", 11, None), ("2", 12, None)]
    assert sorted(e["target"]["id"] for e in updates[2:]) == ["11", "12", "3", "4"]
    assert all(set(e["changes"]) == {"email"} for e in updates[2:])


# -- the actor context -----------------------------------------------------------------------


def test_context_cleared_after_the_request_also_on_exceptions(db: AppDB) -> None:
    engine = app_with_accounts(db, pool_size=1, max_overflow=0)

    def write(i: int) -> None:
        with Session(engine) as session, session.begin():
            session.add(Account(id=i, email=f"e{i}"))

    with sealtrail.context(actor="user:1"):
        write(1)
    write(2)
    with (
        pytest.raises(ZeroDivisionError),
        sealtrail.context(actor="user:3"),
        Session(engine) as session,
        session.begin(),
    ):
        session.add(Account(id=3, email="e3"))
        session.flush()
        1 / 0  # noqa: B018
    write(4)
    events = outbox(db)
    assert db_events(events) == [("db.insert", "1"), ("db.insert", "2"), ("db.insert", "4")]
    assert events[0]["data"]["db"]["app_context"] == "present"
    for event in events[1:]:
        assert event["actor"] == {"id": "db:postgres", "type": "service"}
        assert event["data"]["db"]["app_context"] == "missing"


def test_nested_contexts(db: AppDB) -> None:
    engine = app_with_accounts(db, pool_size=1, max_overflow=0)
    with (
        sealtrail.context(actor="user:outer", request_id="r1"),
        Session(engine) as session,
        session.begin(),
    ):
        session.add(Account(id=1, email="a"))
        session.flush()
        with sealtrail.context(actor="user:inner", reason="support ticket"):
            session.add(Account(id=2, email="b"))
            session.flush()
        session.add(Account(id=3, email="c"))
    events = outbox(db)
    assert actor_ids(events) == ["user:outer", "user:inner", "user:outer"]
    assert [e.get("reason") for e in events] == [None, "support ticket", None]
    assert all(e["source"] == {"request_id": "r1"} for e in events)
    assert len({e["data"]["db"]["txid"] for e in events}) == 1


def test_background_job_with_and_without_an_actor(db: AppDB) -> None:
    engine = app_with_accounts(db)
    jobs = db.engine(no_actor=NoActorPolicy.system("jobs"))
    with sealtrail.context(actor="user:9", ip="192.0.2.1"):
        carried = sealtrail.carry().to_dict()

    def job(i: int, snapshot: dict[str, object] | None) -> None:
        if snapshot is None:
            with Session(jobs) as session, session.begin():
                session.add(Account(id=i, email="job"))
        else:
            with sealtrail.restore(snapshot), Session(engine) as session, session.begin():
                session.add(Account(id=i, email="job"))

    threads = [
        threading.Thread(target=job, args=(1, carried)),
        threading.Thread(target=job, args=(2, None)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = {e["target"]["id"]: e for e in outbox(db)}
    assert events["1"]["actor"] == {"id": "user:9"}
    assert events["1"]["source"] == {"ip": "192.0.2.1"}
    assert events["2"]["actor"] == {"id": "system:jobs", "type": "system"}
    assert events["2"]["data"]["db"]["app_context"] == "present"


def test_refuse_policy_fails_the_write(db: AppDB) -> None:
    Base.metadata.create_all(db.engine(instrument=False))
    cap.install(db.url(), [ACCOUNTS])
    engine = db.engine(no_actor=NoActorPolicy.refuse())
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM accounts")).scalar() == 0  # reads work
    with pytest.raises(Exception, match="no actor"), Session(engine) as session, session.begin():
        session.add(Account(id=1, email="a"))
    with sealtrail.context(actor="user:1"), Session(engine) as session, session.begin():
        session.add(Account(id=2, email="b"))
    assert db_events(outbox(db)) == [("db.insert", "2")]
    # The refusal travels to the database (reads must still work), where a write fails.
    refusal = cap.context_json(no_actor=NoActorPolicy.refuse())
    assert refusal is not None and "no actor" in orjson.loads(refusal)["missing_actor"]


def test_context_json_is_checked_as_an_event_would_be() -> None:
    # No database: what is sent, and the contexts refused before anything is sent (the
    # same checks, and messages, as an event carrying them).
    assert cap.context_json() is None
    with sealtrail.context(
        actor={"id": "user:1", "type": "user"},
        ip="2001:db8::1",
        request_id="r-1",
        tenant="acme",
        reason="support ticket 7",
        subject="user:9",
        ticket=7,
    ):
        sent = cap.context_json()
    assert sent is not None and orjson.loads(sent) == {
        "actor": {"id": "user:1", "type": "user"},
        "source": {"ip": "2001:db8::1", "request_id": "r-1"},
        "tenant": "acme",
        "reason": "support ticket 7",
        "subject": "user:9",
        "data": {"ticket": 7},
    }
    for values, message in [
        ({"ip": "not-an-ip"}, "source.ip"),
        ({"reason": "lone \udc80 surrogate"}, "reason: contains a lone surrogate"),
        ({"request_id": "r" * 70_000}, "bytes when canonicalised"),
        ({"ticket": float("nan")}, "data.ticket"),
    ]:
        with (
            sealtrail.context(actor="user:1", **values),
            pytest.raises(InvalidEvent, match=message),
        ):
            cap.context_json()


def test_set_context_and_transaction_on_psycopg(db: AppDB) -> None:
    app_with_accounts(db)
    with db.connect() as conn:
        with pytest.raises(cap.CaptureError, match="transaction"):
            cap.set_context(conn)
        with sealtrail.context(actor="user:outer"), cap.transaction(conn):
            conn.execute("INSERT INTO accounts (id, email) VALUES (1, 'a')")
            with sealtrail.context(actor="user:inner"), cap.transaction(conn):
                conn.execute("INSERT INTO accounts (id, email) VALUES (2, 'b')")
            conn.execute("INSERT INTO accounts (id, email) VALUES (3, 'c')")
        conn.execute("INSERT INTO accounts (id, email) VALUES (4, 'd')")  # none: autocommit
    with db.connect(autocommit=False) as conn:
        with sealtrail.context(actor="user:5"):
            cap.set_context(conn)
            conn.execute("INSERT INTO accounts (id, email) VALUES (5, 'e')")
        conn.commit()
    assert actor_ids(outbox(db)) == [
        "user:outer",
        "user:inner",
        "user:outer",
        "db:postgres",
        "user:5",
    ]

    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(db.url(), autocommit=True) as aconn:
            with sealtrail.context(actor="user:async"):
                async with cap.atransaction(aconn):
                    await aconn.execute("INSERT INTO accounts (id, email) VALUES (6, 'f')")

    asyncio.run(run())
    assert actor_ids(outbox(db))[-1] == "user:async"


def test_autocommit_engine(db: AppDB) -> None:
    engine = app_with_accounts(db, pool_size=1, max_overflow=0, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        with sealtrail.context(actor="user:1"):
            conn.execute(text("INSERT INTO accounts (id, email) VALUES (1, 'a')"))
        conn.execute(text("INSERT INTO accounts (id, email) VALUES (2, 'b')"))
        with sealtrail.context(actor="user:3"):
            conn.execute(text("INSERT INTO accounts (id, email) VALUES (3, 'c')"))
    with engine.connect() as conn:
        conn.execute(text("INSERT INTO accounts (id, email) VALUES (4, 'd')"))
    assert actor_ids(outbox(db)) == ["user:1", "db:postgres", "user:3", "db:postgres"]


N_THREADS, TX_PER_THREAD = 8, 25


def test_concurrent_threads_no_misattribution(db: AppDB) -> None:
    engine = app_with_accounts(db, pool_size=3, max_overflow=0)
    errors: list[BaseException] = []
    barrier = threading.Barrier(N_THREADS)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for i in range(TX_PER_THREAD):
                key = t * 1000 + i
                if i % 5 == 4:  # now and then no context at all
                    with Session(engine) as session, session.begin():
                        session.add(Account(id=key, email="x", writer="none"))
                    continue
                actor = f"user:{t}:{i}"
                with sealtrail.context(actor=actor), Session(engine) as session, session.begin():
                    session.add(Account(id=key, email="x", writer=actor))
                    session.flush()
                    time.sleep(0.0005 * (t % 3))
                    session.get(Account, key).email = "y"  # type: ignore[union-attr]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    check_attribution(outbox(db), N_THREADS * TX_PER_THREAD)


def check_attribution(events: list[dict[str, Any]], writes: int) -> None:
    writer_by_key: dict[str, str] = {}
    for event in events:
        if event["action"] == "db.insert":
            writer_by_key[event["target"]["id"]] = event["changes"]["writer"]["new"]
    assert len(writer_by_key) == writes
    wrong = []
    for event in events:
        writer = writer_by_key[event["target"]["id"]]
        expected = "db:postgres" if writer == "none" else writer
        if event["actor"]["id"] != expected:
            wrong.append((event["target"]["id"], writer, event["actor"]["id"]))
        if (writer == "none") != (event["data"]["db"]["app_context"] == "missing"):
            wrong.append((event["target"]["id"], writer, event["data"]["db"]["app_context"]))
    assert wrong == []


def test_concurrent_asyncio_tasks_no_misattribution(db: AppDB) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    Base.metadata.create_all(db.engine(instrument=False))
    cap.install(db.url(), [ACCOUNTS])
    tasks_n, per_task = 40, 5

    async def run() -> None:
        engine = create_async_engine(db.sa_url, pool_size=4, max_overflow=0)
        cap.instrument(engine)
        try:

            async def task(t: int) -> None:
                for i in range(per_task):
                    key = t * 1000 + i
                    if i == 2:
                        async with AsyncSession(engine) as session, session.begin():
                            session.add(Account(id=key, email="x", writer="none"))
                        continue
                    actor = f"user:{t}:{i}"
                    async with (
                        sealtrail.context(actor=actor),
                        AsyncSession(engine) as session,
                        session.begin(),
                    ):
                        session.add(Account(id=key, email="x", writer=actor))
                        await session.flush()
                        await asyncio.sleep(0.001 * (t % 3))
                        acc = await session.get(Account, key)
                        assert acc is not None
                        acc.email = "y"

            await asyncio.gather(*(task(t) for t in range(tasks_n)))
        finally:
            cap.uninstrument(engine)
            await engine.dispose()

    asyncio.run(run())
    check_attribution(outbox(db), tasks_n * per_task)


# -- atomicity and order --------------------------------------------------------------------


def test_commit_order_follows_commit_not_start(db: AppDB) -> None:
    app_with_accounts(db)
    db.execute("INSERT INTO accounts (id, email) VALUES (1, 'v0')")
    first = db.connect(autocommit=False)
    second = db.connect(autocommit=False)
    try:
        first.execute("UPDATE accounts SET email = 'by first' WHERE id = 1")  # starts first
        second.execute("INSERT INTO accounts (id, email) VALUES (2, 'x')")
        second.commit()  # commits first
        first.commit()
    finally:
        first.close()
        second.close()
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT o.event->>'action', o.event->'target'->>'id', o.txid::bigint, c.commit_seq "
            "FROM sealtrail_outbox o JOIN sealtrail_outbox_commit c USING (txid) "
            "WHERE o.event->>'action' LIKE 'db.%' ORDER BY c.commit_seq, o.id"
        ).fetchall()
    assert [(a, t) for a, t, _, _ in rows] == [
        ("db.insert", "1"),
        ("db.insert", "2"),
        ("db.update", "1"),
    ]
    # The update's transaction started before the insert's, yet commits after it.
    assert rows[2][2] < rows[1][2] and rows[2][3] > rows[1][3]


def _seq_scans(db: AppDB, table: str) -> int:
    with db.connect() as conn:
        row = conn.execute(
            "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = %s::regclass", (table,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_commit_order_never_scans_the_commit_table(db: AppDB) -> None:
    # The commit-order trigger's plan is cached per connection. Planned while the commit
    # table was small (as autovacuum analyzes it behind a working relay), a NOT EXISTS
    # lookup of the transaction was a sequential scan, which then read the whole table at
    # every commit once it grew (a relay down, or none yet): quadratic, and 0.2 ms per
    # commit at 3,000 rows.
    app_with_accounts(db)
    db.execute("ANALYZE sealtrail_outbox_commit")
    before = _seq_scans(db, "sealtrail_outbox_commit")
    with db.connect() as conn:
        for i in range(1, 31):
            conn.execute("INSERT INTO accounts (id, email) VALUES (%s, 'e')", (i,))
            with conn.transaction():  # numbered by its first statement, found by the next
                conn.execute("UPDATE accounts SET email = 'f' WHERE id = %s", (i,))
                conn.execute("UPDATE accounts SET email = 'g' WHERE id = %s", (i,))
        conn.execute("SELECT pg_stat_force_next_flush()")  # report before it answers
    assert _seq_scans(db, "sealtrail_outbox_commit") == before
    events = outbox(db)  # every event's transaction numbered
    assert len(events) == 90
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM sealtrail_outbox_commit").fetchone() == (61,)


def _bulk_times_fresh_and_after(
    db: AppDB, warm_up: Callable[[psycopg.Connection[Any]], None]
) -> tuple[float, float]:
    """The best of two 10,000-row updates on a fresh connection, and on one that first ran
    ``warm_up`` (whose small statements cache the capture function's plans)."""
    app_with_accounts(db)
    db.execute(
        "INSERT INTO accounts (id, email, balance) "
        "SELECT g, 'e' || g, g FROM generate_series(1, 10000) g"
    )

    def bulk(conn: psycopg.Connection[Any]) -> float:
        start = time.perf_counter()
        with conn.transaction():
            conn.execute("UPDATE accounts SET balance = balance + 1")
        return time.perf_counter() - start

    with db.connect() as fresh:
        fresh_time = min(bulk(fresh) for _ in range(2))
    with db.connect() as warm:
        warm_up(warm)
        warm_time = min(bulk(warm) for _ in range(2))
    return fresh_time, warm_time


def test_bulk_update_after_many_single_updates_stays_linear(db: AppDB) -> None:
    def singles(conn: psycopg.Connection[Any]) -> None:
        for i in range(2000):
            conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", (i % 50 + 1,))

    fresh_time, warm_time = _bulk_times_fresh_and_after(db, singles)
    assert warm_time < 3 * fresh_time, (warm_time, fresh_time)


# -- guards, grants, the DDL watch, check ---------------------------------------------------


def test_outbox_guards_and_grants(db: AppDB) -> None:
    app_with_accounts(db)
    app_role, relay_role = db.role(), db.role()
    db.execute(
        sql.SQL("GRANT ALL ON accounts TO {}").format(sql.Identifier(app_role)).as_string(None)
    )
    cap.grant_app(db.url(), app_role)
    cap.grant_relay(db.url(), relay_role)
    cap.grant_relay(db.url(), relay_role)  # idempotent
    with db.connect(app_role) as app:
        app.execute("INSERT INTO accounts (id, email) VALUES (1, 'a')")  # captured
        for statement in (
            "SELECT * FROM sealtrail_outbox",
            "INSERT INTO sealtrail_outbox (event_id, txid, event) "
            "VALUES (gen_random_uuid(), '1', '{}')",
            "UPDATE sealtrail_outbox SET txid = '0'",
            "DELETE FROM sealtrail_outbox",
            "TRUNCATE sealtrail_outbox",
            "DELETE FROM sealtrail_outbox_commit",
            "INSERT INTO sealtrail_outbox_commit VALUES ('1', 999)",
            "SELECT sealtrail_emit('{}')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute(statement)
    assert len(outbox(db)) == 1
    with db.connect(relay_role) as relay:
        assert relay.execute("SELECT count(*) FROM sealtrail_outbox").fetchone() == (2,)
        for statement in (
            "UPDATE sealtrail_outbox SET txid = '0'",
            "TRUNCATE sealtrail_outbox",
            "TRUNCATE sealtrail_outbox_commit",
            "UPDATE sealtrail_outbox_commit SET commit_seq = 0",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                relay.execute(statement)
        with relay.transaction():
            relay.execute("DELETE FROM sealtrail_outbox")
            relay.execute("DELETE FROM sealtrail_outbox_commit")
    with db.connect() as owner:  # a superuser, yet not the relay
        owner.execute("INSERT INTO accounts (id, email) VALUES (2, 'b')")
        for statement in (
            "DELETE FROM sealtrail_outbox",
            "UPDATE sealtrail_outbox SET txid = '0'",
            "TRUNCATE sealtrail_outbox",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                owner.execute(statement)
    with pytest.raises(cap.CaptureError, match="superuser"):
        cap.grant_app(db.url(), "postgres")
    with pytest.raises(cap.CaptureError, match="no role"):
        cap.grant_relay(db.url(), "no such role")
    assert cap.check(db.url(), [ACCOUNTS]) == []


def test_disabling_capture_is_audited(db: AppDB) -> None:
    app_with_accounts(db)
    role = db.role()
    db.execute(
        sql.SQL("ALTER TABLE accounts OWNER TO {}").format(sql.Identifier(role)).as_string(None)
    )
    with db.connect(role) as owner:
        owner.execute("ALTER TABLE accounts DISABLE TRIGGER sealtrail_capture_update")
        owner.execute("UPDATE accounts SET email = 'unseen'")
        owner.execute("ALTER TABLE accounts DISABLE TRIGGER ALL")
        owner.execute("ALTER TABLE accounts ENABLE TRIGGER ALL")  # origin only: weaker
        owner.execute("DROP TRIGGER sealtrail_capture_delete ON accounts")
    events = [e for e in outbox(db, all_actions=True) if e["action"] == "sealtrail.capture.disable"]
    assert len(events) == 4
    for event in events:
        assert event["actor"] == {"id": f"db:{role}", "type": "service"}
        assert event["target"] == {"type": "db:table", "id": "public.accounts"}
        assert event["data"]["db"]["role"] == role
    assert events[0]["data"]["db"]["triggers"] == {"sealtrail_capture_update": "disabled"}
    assert events[0]["data"]["db"]["command"] == "ALTER TABLE"
    assert len(events[1]["data"]["db"]["triggers"]) == 5
    assert set(events[2]["data"]["db"]["triggers"].values()) == {"origin"}
    assert events[3]["data"]["db"]["command"] == "DROP TRIGGER"
    assert events[3]["data"]["db"]["triggers"] == ["sealtrail_capture_delete"]
    kinds = sorted((p.kind, p.detail.split(" ")[1]) for p in cap.check(db.url(), [ACCOUNTS]))
    assert ("missing", "sealtrail_capture_delete") in kinds
    assert ("disabled", "sealtrail_capture_update") in kinds
    # Install puts it right, and says so.
    assert cap.install(db.url(), [ACCOUNTS]) == ["public.accounts"]
    assert cap.check(db.url(), [ACCOUNTS]) == []


def test_uninstall_is_audited(db: AppDB) -> None:
    app_with_accounts(db)
    with sealtrail.context(actor="admin:ops"):
        assert cap.uninstall(db.url(), [ACCOUNTS]) == ["public.accounts"]
    db.execute("INSERT INTO accounts (id, email) VALUES (1, 'a')")
    events = outbox(db, all_actions=True)
    assert [e["action"] for e in events] == [
        "sealtrail.capture.install",
        "sealtrail.capture.uninstall",
    ]
    assert events[1]["actor"] == {"id": "admin:ops"}
    assert events[1]["data"]["db"]["command"] == "uninstall"
    problems = cap.check(db.url(), [ACCOUNTS])
    assert {p.kind for p in problems} == {"missing"} and len(problems) == 5
    cap.install(db.url(), [ACCOUNTS])
    assert cap.uninstall(db.url()) == ["public.accounts"]  # everything, the DDL watch too
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_event_trigger").fetchone() == (0,)


def test_replica_sessions_are_still_captured(db: AppDB) -> None:
    app_with_accounts(db)
    with db.connect() as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO accounts (id, email) VALUES (1, 'a')")
        conn.execute("ALTER TABLE accounts DISABLE TRIGGER sealtrail_capture_insert")
    events = outbox(db, all_actions=True)
    assert [e["action"] for e in events][-2:] == ["db.insert", "sealtrail.capture.disable"]


def test_check_reports_what_changed(db: AppDB) -> None:
    app_with_accounts(db)
    assert cap.check(db.url(), [ACCOUNTS]) == []
    db.execute("ALTER TABLE accounts ADD COLUMN phone text")
    db.execute("ALTER TABLE accounts RENAME COLUMN name TO full_name")
    db.execute("ALTER TABLE accounts DROP COLUMN writer")
    (problem,) = cap.check(db.url(), [ACCOUNTS])
    assert problem.kind == "stale" and problem.table == "public.accounts"
    for part in ("column 'phone' added", "'name' renamed to 'full_name'", "'writer' dropped"):
        assert part in problem.detail
    cap.install(db.url(), [ACCOUNTS])
    assert cap.check(db.url(), [ACCOUNTS]) == []
    stricter = Track.of("public.accounts", exclude=["password_hash", "phone"], mask=["totp_secret"])
    (problem,) = cap.check(db.url(), [stricter])
    assert problem.kind == "stale" and "rules changed" in problem.detail
    with db.connect() as conn:
        name = conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p "
            "WHERE proname LIKE 'sealtrail_cap_%_insert'"
        ).fetchone()
        assert name is not None
        conn.execute(f"ALTER FUNCTION {name[0]} SECURITY INVOKER")
    assert [p.kind for p in cap.check(db.url(), [ACCOUNTS])] == ["modified"]
    db.execute("CREATE TABLE other (id int PRIMARY KEY)")
    cap.install(db.url(), [ACCOUNTS, Track.of("public.other")])
    problems = cap.check(db.url(), [ACCOUNTS])
    assert [(p.table, p.kind) for p in problems] == [("public.other", "untracked")]
    assert next(p.kind for p in cap.check(db.url(), [Track.of("public.nope")])) == "table"


def test_check_compares_the_shared_functions_with_this_version(db: AppDB) -> None:
    app_with_accounts(db)
    assert cap.check(db.url(), [ACCOUNTS]) == []
    with db.connect() as conn:
        # A guard that lets every DELETE through unnoticed, a commit order run as the
        # caller, a value writer with another time zone.
        conn.execute(
            "CREATE OR REPLACE FUNCTION sealtrail_guard() RETURNS trigger LANGUAGE plpgsql "
            "SET search_path = pg_catalog, pg_temp AS $$ BEGIN RETURN NULL; END $$"
        )
        conn.execute("ALTER FUNCTION sealtrail_commit_order() SECURITY INVOKER")
        conn.execute("ALTER FUNCTION sealtrail_tstz(timestamptz) SET TimeZone = 'Asia/Tokyo'")
    problems = [p for p in cap.check(db.url(), [ACCOUNTS]) if p.table == "public.sealtrail_outbox"]
    assert [(p.kind, p.detail) for p in problems] == [
        ("modified", "function sealtrail_tstz (settings) differs from what install() writes"),
        (
            "modified",
            "function sealtrail_commit_order (security mode) differs from what install() writes",
        ),
        ("modified", "function sealtrail_guard (body) differs from what install() writes"),
    ]
    cap.install(db.url(), [ACCOUNTS])
    assert cap.check(db.url(), [ACCOUNTS]) == []
    # An earlier version's install: its functions differ, and it says which version it was.
    with db.connect() as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION sealtrail_commit_order() RETURNS trigger "
            "LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS "
            "$$ BEGIN RETURN NULL; END $$"
        )
        comment = conn.execute("SELECT obj_description('sealtrail_outbox'::regclass)").fetchone()
        assert comment is not None
        older = {**orjson.loads(comment[0]), "sealtrail": 2}
        conn.execute(f"COMMENT ON TABLE sealtrail_outbox IS '{orjson.dumps(older).decode()}'")
    (problem,) = [p for p in cap.check(db.url(), [ACCOUNTS]) if p.table.endswith("_outbox")]
    assert problem.kind == "stale" and "capture version 2" in problem.detail
    assert "sealtrail_commit_order (body)" in problem.detail and "install()" in problem.detail
    cap.install(db.url(), [ACCOUNTS])
    assert cap.check(db.url(), [ACCOUNTS]) == []


def test_install_is_idempotent_and_follows_migrations(db: AppDB) -> None:
    app_with_accounts(db)
    assert cap.install(db.url(), [ACCOUNTS]) == []
    installs = [
        e for e in outbox(db, all_actions=True) if e["action"] == "sealtrail.capture.install"
    ]
    assert len(installs) == 1
    db.execute("ALTER TABLE accounts ADD COLUMN phone text")
    db.execute("INSERT INTO accounts (id, email, phone) VALUES (1, 'a', '555')")
    assert "phone" not in outbox(db)[0]["changes"]  # stale until installed again
    assert cap.install(db.url(), [ACCOUNTS]) == ["public.accounts"]
    db.execute("UPDATE accounts SET phone = '556'")
    assert outbox(db)[-1]["changes"] == {"phone": {"old": "555", "new": "556"}}
    with db.connect() as conn, conn.transaction():  # inside a transaction that captured
        conn.execute("INSERT INTO accounts (id, email) VALUES (2, 'b')")
        assert cap.install(conn, [ACCOUNTS]) == []


def test_bad_tracks_are_refused_clearly(db: AppDB) -> None:
    db.execute(
        "CREATE TABLE keyless (a int, b int); CREATE TABLE t (id int PRIMARY KEY, u int UNIQUE, "
        "n int NOT NULL UNIQUE, v text); CREATE VIEW vw AS SELECT 1 AS x"
    )
    cases = [
        (Track.of("public.nope"), "no table 'public.nope'"),
        (Track.of("public.vw"), "is a view"),
        (Track.of("public.keyless"), "has no primary key"),
        (Track.of("public.t", exclude=["nope"]), "'nope'"),
        (Track.of("public.t", mask=["id"]), "key columns cannot be excluded or masked"),
        (Track.of("public.t", pk=["u"]), "not a unique, NOT NULL key"),
        (Track.of("public.t", pk=["v"]), "not a unique, NOT NULL key"),
        (Track.of("public.sealtrail_outbox"), "outbox"),
    ]
    cap.install(db.url(), [])
    for track, message in cases:
        with pytest.raises(cap.CaptureError, match=re.escape(message)):
            cap.install(db.url(), [track])
    with pytest.raises(cap.CaptureError, match="tracked twice"):
        cap.install(db.url(), [Track.of("public.t"), Track.of("t")])
    assert cap.install(db.url(), [Track.of("t", pk=["n"])]) == ["public.t"]
    with pytest.raises(cap.CaptureError, match="connection"):
        cap.install(42, [])


def test_hostile_identifiers(db: AppDB) -> None:
    schema = 'we"ird $f$ sch.ema'
    table = "ta'ble\" x.y {s}"
    columns = ['i"d', "e'mail", "$f$", "sp ace", "{s}", "ü\u2028"]
    with db.connect() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {}.{} ({} int PRIMARY KEY, {} text, {} text, {} text, "
                "{} text, {} text)"
            ).format(sql.Identifier(schema), sql.Identifier(table), *map(sql.Identifier, columns))
        )
    qualified = f"{schema}.{table}"
    track = Track.of(qualified, exclude=["sp ace"], mask=["$f$"])
    assert cap.install(db.url(), [track], schema='sealtrail\'s "box"') == [qualified]
    with db.connect() as conn:
        conn.execute(
            sql.SQL("INSERT INTO {}.{} VALUES (1, 'a', 'b', 'c', 'd', 'e')").format(
                sql.Identifier(schema), sql.Identifier(table)
            )
        )
        rows = conn.execute(
            sql.SQL("SELECT event FROM {}.sealtrail_outbox ORDER BY id").format(
                sql.Identifier('sealtrail\'s "box"')
            )
        ).fetchall()
    event = rows[-1][0]
    assert prepare_event(event) == event
    assert event["target"] == {"type": f"db:{qualified}", "id": "1"}
    assert event["changes"] == {
        'i"d': {"new": 1},
        "e'mail": {"new": "a"},
        "$f$": {"new": {"masked": True}},
        "{s}": {"new": "d"},
        "ü\u2028": {"new": "e"},
    }
    assert cap.check(db.url(), [track], schema='sealtrail\'s "box"') == []
    assert cap.uninstall(db.url(), [track], schema='sealtrail\'s "box"') == [qualified]


def test_event_ids_are_uuidv7_and_times_canonical(db: AppDB) -> None:
    app_with_accounts(db)
    before = time.time()
    db.execute("INSERT INTO accounts (id, email) SELECT g, 'e' FROM generate_series(1, 50) g")
    events = outbox(db)
    for event in events:
        stamp = int(event["id"].replace("-", "")[:12], 16) / 1000
        assert before - 1 < stamp < time.time() + 1
        parsed = dt.datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
        assert abs(parsed.timestamp() - stamp) < 0.002
    assert len({uuid.UUID(e["id"]) for e in events}) == 50


def test_two_capture_schemas_in_one_database(db: AppDB) -> None:
    db.execute(
        "CREATE SCHEMA a; CREATE SCHEMA b; CREATE TABLE a.t (id int PRIMARY KEY); "
        "CREATE TABLE b.t (id int PRIMARY KEY)"
    )
    cap.install(db.url(), [Track.of("a.t")], schema="a")
    cap.install(db.url(), [Track.of("b.t")], schema="b")
    db.execute("INSERT INTO a.t VALUES (1); INSERT INTO b.t VALUES (2)")
    db.execute("ALTER TABLE a.t DISABLE TRIGGER ALL; DROP TRIGGER sealtrail_capture_insert ON b.t")
    with db.connect() as conn:
        for schema, table, command in (("a", "a.t", "ALTER TABLE"), ("b", "b.t", "DROP TRIGGER")):
            events = [
                row[0]
                for row in conn.execute(
                    sql.SQL("SELECT event FROM {}.sealtrail_outbox ORDER BY id").format(
                        sql.Identifier(schema)
                    )
                )
            ]
            assert [e["action"] for e in events] == [
                "sealtrail.capture.install",
                "db.insert",
                "sealtrail.capture.disable",
            ]
            assert events[1]["target"]["type"] == f"db:{table}"
            assert events[2]["data"]["db"]["command"] == command
    assert cap.check(db.url(), [Track.of("a.t")], schema="a")[0].kind == "disabled"


# -- the context sent with the transaction's BEGIN; the one-row and many-row paths ----------


def _setting(conn: Any) -> Any:
    return conn.execute(text("SELECT current_setting('sealtrail.context', true)")).scalar()


def test_context_sent_with_begin_never_reaches_the_next_transaction(
    db: AppDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = app_with_accounts(db, pool_size=1, max_overflow=0)
    sent: list[str] = []
    original = cap._Instrumentation._send

    def counting(dbapi: Any, query: str, value: str) -> None:
        sent.append(value)
        original(dbapi, query, value)

    monkeypatch.setattr(cap._Instrumentation, "_send", staticmethod(counting))
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        conn.rollback()
    # Committed, rolled back, failed in its first statement, failed later: after each,
    # the next transaction on the same pooled connection holds no context.
    with sealtrail.context(actor="user:1"), Session(engine) as session, session.begin():
        session.add(Account(id=1, email="a"))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() == pid
        assert _setting(conn) in ("", None)
        conn.rollback()
    with sealtrail.context(actor="user:2"), engine.connect() as conn:
        assert orjson.loads(_setting(conn))["actor"] == {"id": "user:2"}
        conn.rollback()
    with engine.connect() as conn:
        assert _setting(conn) in ("", None)
        conn.rollback()
    with (
        pytest.raises(Exception, match="duplicate key"),
        sealtrail.context(actor="user:3"),
        Session(engine) as session,
        session.begin(),
    ):
        session.add(Account(id=1, email="again"))
    with (
        pytest.raises(Exception, match="division by zero"),
        sealtrail.context(actor="user:4"),
        engine.begin() as conn,
    ):
        conn.execute(text("INSERT INTO accounts (id, email) VALUES (4, 'd')"))
        conn.execute(text("SELECT 1 / 0"))
    with Session(engine) as session, session.begin():
        session.add(Account(id=5, email="e"))
        assert _setting(session.connection()) in ("", None)
    events = outbox(db)
    assert [(e["target"]["id"], e["actor"]["id"]) for e in events] == [
        ("1", "user:1"),
        ("5", "db:postgres"),
    ]
    assert events[1]["data"]["db"]["app_context"] == "missing"
    # Every context went with its transaction's BEGIN: no round trip of its own.
    assert sent == []


def test_context_sent_with_begin_keeps_the_transaction_modes(db: AppDB) -> None:
    engine = app_with_accounts(db, isolation_level="REPEATABLE READ")
    with sealtrail.context(actor="user:1"), engine.connect() as conn:
        assert conn.execute(text("SHOW transaction_isolation")).scalar() == "repeatable read"
        assert orjson.loads(_setting(conn))["actor"] == {"id": "user:1"}
        conn.rollback()
        ro = conn.execution_options(postgresql_readonly=True)
        assert ro.execute(text("SHOW transaction_read_only")).scalar() == "on"
        assert orjson.loads(_setting(ro))["actor"] == {"id": "user:1"}
        ro.rollback()
    with sealtrail.context(actor="user:2"), Session(engine) as session, session.begin():
        session.add(Account(id=1, email="a"))
    assert actor_ids(outbox(db)) == ["user:2"]


def test_context_after_a_raw_rollback_to_savepoint(db: AppDB) -> None:
    engine = app_with_accounts(db, pool_size=1, max_overflow=0)
    with sealtrail.context(actor="user:outer"), engine.begin() as conn:
        conn.execute(text("INSERT INTO accounts (id, email) VALUES (1, 'a')"))
        conn.exec_driver_sql("SAVEPOINT s")
        with sealtrail.context(actor="user:inner"):
            conn.execute(text("INSERT INTO accounts (id, email) VALUES (2, 'b')"))
            conn.exec_driver_sql("ROLLBACK TO SAVEPOINT s")  # the setting rolls back too
            conn.execute(text("INSERT INTO accounts (id, email) VALUES (3, 'c')"))
        conn.execute(text("INSERT INTO accounts (id, email) VALUES (4, 'd')"))
        conn.exec_driver_sql("COMMIT AND CHAIN")  # a new transaction, without a BEGIN
        conn.execute(text("INSERT INTO accounts (id, email) VALUES (5, 'e')"))
    events = outbox(db)
    assert [(e["target"]["id"], e["actor"]["id"]) for e in events] == [
        ("1", "user:outer"),
        ("3", "user:inner"),
        ("4", "user:outer"),
        ("5", "user:outer"),
    ]
    assert len({e["data"]["db"]["txid"] for e in events}) == 2


def test_one_row_and_many_row_statements_agree(db: AppDB) -> None:
    app_with_accounts(db)
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO accounts (id, email, balance) "
            "SELECT g, 'e' || g, g FROM generate_series(1, 6) g"
        )
        conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")  # one row
        conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id IN (2, 3)")  # by key
        conn.execute("UPDATE accounts SET id = 10, email = 'x' WHERE id = 4")  # one row, key
        conn.execute("UPDATE accounts SET id = id + 20 WHERE id IN (5, 6)")  # by position
        conn.execute("UPDATE accounts SET email = email WHERE id = 1")  # one row, no change
    updates = [e for e in outbox(db) if e["action"] == "db.update"]
    assert [(e["target"]["id"], e["changes"]) for e in updates] == [
        ("1", {"balance": {"old": "1.00", "new": "2.00"}}),
        ("2", {"balance": {"old": "2.00", "new": "3.00"}}),
        ("3", {"balance": {"old": "3.00", "new": "4.00"}}),
        ("4", {"id": {"old": 4, "new": 10}, "email": {"old": "e4", "new": "x"}}),
        ("5", {"id": {"old": 5, "new": 25}}),
        ("6", {"id": {"old": 6, "new": 26}}),
    ]


def test_event_ids_count_up_within_a_statement(db: AppDB) -> None:
    app_with_accounts(db)
    db.execute("INSERT INTO accounts (id, email) SELECT g, 'e' FROM generate_series(1, 300) g")
    db.execute("INSERT INTO accounts (id, email) SELECT g, 'e' FROM generate_series(301, 600) g")
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT event_id, txid FROM sealtrail_outbox "
            "WHERE event->>'action' = 'db.insert' ORDER BY id"
        ).fetchall()
    assert len(rows) == 600 and len({r[0] for r in rows}) == 600
    for start in (0, 300):
        ids = [r[0] for r in rows[start : start + 300]]
        assert ids == sorted(ids)  # one statement's ids grow
        assert all(UUID7.fullmatch(str(i)) for i in ids)
        assert len({str(i)[:24] for i in ids}) == 1  # time and the random prefix shared
    assert str(rows[0][0])[:24] != str(rows[300][0])[:24]  # each statement draws its own


def test_a_client_cannot_keep_its_transaction_out_of_the_commit_order(db: AppDB) -> None:
    app_with_accounts(db)
    db.execute("INSERT INTO accounts (id, email) VALUES (1, 'a')")
    with db.connect() as conn:
        existing = conn.execute("SELECT event_id::text FROM sealtrail_outbox").fetchall()
        with conn.transaction():
            conn.execute("INSERT INTO accounts (id, email) VALUES (2, 'b')")
            for mark in [r[0] for r in existing] + ["x", ""]:
                conn.execute("SELECT set_config('sealtrail.first', %s, true)", (mark,))
                conn.execute("UPDATE accounts SET email = email || '.' WHERE id = 2")
    events = outbox(db)  # checks that every event's transaction has its commit row
    assert [e["target"]["id"] for e in events] == ["1", "2", "2", "2", "2", "2"]
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM sealtrail_outbox_commit").fetchone() == (3,)


def test_bulk_update_after_many_two_row_updates_stays_linear(db: AppDB) -> None:
    # One-row updates take a path of their own; the plan a 10,000-row update may inherit
    # is the one cached for the smallest statement that matched old and new rows.
    def pairs(conn: psycopg.Connection[Any]) -> None:
        for i in range(200):
            conn.execute(
                "UPDATE accounts SET balance = balance + 1 WHERE id IN (%s, %s)",
                (i % 50 + 1, i % 50 + 51),
            )

    fresh_time, warm_time = _bulk_times_fresh_and_after(db, pairs)
    assert warm_time < 3 * fresh_time, (warm_time, fresh_time)
