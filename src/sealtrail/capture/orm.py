"""Capture through SQLAlchemy, where database triggers are not available.

On SQLite (and on any database, for applications that prefer it) every INSERT, UPDATE and
DELETE that SQLAlchemy makes on a tracked table becomes one change event
(:mod:`sealtrail.capture.change`), written to ``sealtrail_outbox`` through the same
connection, inside the same transaction as the change (DESIGN.md, I9)::

    from sealtrail.capture import orm
    from sealtrail.capture.change import Track

    capture = orm.track(engine, [Account, Track.of("orders", mask={"card"})],
                        no_actor=NoActorPolicy.system("app"))
    capture.create_outbox(engine)        # or Base.metadata.create_all with metadata=

Three hooks, one per way SQLAlchemy writes:

* **the unit of work** (``session.add``, attribute changes, ``session.delete``, cascades
  and orphans): mapper events around each row's statement. Old values come from the
  attribute history; a value the session never loaded (an expired attribute, a deferred
  column, a server default, a SQL expression) is read from the database by primary key,
  in the same transaction. Events are buffered per flush and written in one statement at
  ``after_flush``;
* **ORM statements** (``session.execute(insert(Model), rows)``, ``update(Model).where()``,
  ``delete(Model)``, bulk UPDATE by primary key), in ``do_orm_execute``: the affected rows
  are read with the statement's WHERE (``FOR UPDATE`` where the database has it) before it
  runs and by primary key after it; inserted rows are found through ``RETURNING``. Every
  ``synchronize_session`` strategy works: capture reads the database, not the session;
* **Core statements** (``connection.execute(update(table)...)``, also through a session),
  in the engine's ``before_execute``/``after_execute``, the same way.

What cannot be captured without triggers: SQL given as text (``text()``,
``exec_driver_sql``), writes by other programs or connections that do not go through a
tracked engine or session, ``ON DELETE CASCADE`` and other writes made by the database
itself. Statements that cannot be captured faithfully are refused before they run, with a
:class:`CaptureError`: upserts (``ON CONFLICT DO UPDATE``, ``INSERT OR REPLACE``), bulk
UPDATEs that change a primary key, writes through an alias, and in Core also ``ON CONFLICT
DO NOTHING``/``OR IGNORE``, multi-row ``VALUES`` lists and ``INSERT ... FROM SELECT`` (the
ORM forms of these are captured through ``RETURNING``). If capture fails after the change
ran, the transaction is marked and its COMMIT is refused (and rolled back), so a change
never commits without its event.
"""

from __future__ import annotations

import datetime as _dt
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from sealtrail._exceptions import CaptureError, InvalidEvent
from sealtrail.capture.change import (
    ACTIONS,
    COMMIT_LOCK,
    COMMIT_SEQ,
    MASKED,
    OUTBOX_COMMIT_TABLE,
    OUTBOX_TABLE,
    Track,
    json_value,
    pk_text,
    target_type,
)
from sealtrail.context import NoActorPolicy, apply_context, current_context, resolve
from sealtrail.event import new_event_id, prepare_event, utc_now

try:
    from sqlalchemy import (
        BigInteger,
        Column,
        DateTime,
        Identity,
        Index,
        Integer,
        MetaData,
        Table,
        Text,
        and_,
        event,
        func,
        inspect,
        select,
        text,
        tuple_,
    )
    from sqlalchemy.dialects.postgresql import JSON as PG_JSON
    from sqlalchemy.dialects.postgresql import UUID as PG_UUID
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.exc import NoInspectionAvailable
    from sqlalchemy.orm import Mapper, ORMExecuteState, Session, object_session, sessionmaker
    from sqlalchemy.orm.exc import UnmappedColumnError
    from sqlalchemy.sql.dml import Delete, Insert, Update
    from sqlalchemy.sql.elements import ClauseElement
except ImportError as exc:  # pragma: no cover - the sqlalchemy extra
    raise ImportError(
        "sealtrail.capture.orm needs SQLAlchemy 2: pip install 'sealtrail[sqlalchemy]'"
    ) from exc

__all__ = [
    "OUTBOX_GUARD_TABLE",
    "PG_COMMIT_LOCK",
    "ROLE",
    "Capture",
    "CaptureError",
    "delete_shipped",
    "model_track",
    "outbox_events",
    "outbox_table",
    "track",
]

#: ``data.db.role`` of events captured here (the database role, for trigger capture).
ROLE: Final = "orm"
#: SQLite has no roles: the outbox refuses DELETE unless this one-row table's ``active`` is
#: 1, which the relay sets inside its own transaction (:func:`delete_shipped`).
OUTBOX_GUARD_TABLE: Final = "sealtrail_outbox_relay"

_CHUNK: Final = 500  # keys per ``IN`` list
_TX: Final = "sealtrail.capture.tx"  # conn.info: (weakref to root transaction, txid)
_DOOM: Final = "sealtrail.capture.doomed"  # conn.info: (weakref to root transaction, why)
_GUARD: Final = "sealtrail.capture.orm_statement"  # conn.info: an ORM statement is running
_CORE: Final = "sealtrail.capture.core_pending"  # conn.info: (statement, plan)
_BUFFER: Final = "sealtrail.capture.buffer"  # session.info: [_Pending]
_STASH: Final = "sealtrail.capture.stash"  # session.info: {(state, table): before-update}
_FLUSH: Final = "sealtrail.capture.flushing"  # session.info: a unit-of-work flush is running
_MISSING: Final = object()


# --------------------------------------------------------------------------------------
# The outbox


def outbox_table(metadata: MetaData | None = None) -> Table:
    """``sealtrail_outbox`` as a :class:`~sqlalchemy.Table` in ``metadata`` (reused if it is
    already there), so ``metadata.create_all`` and migrations see it. On SQLite its guards
    (no UPDATE; DELETE only by the relay) are created with it; on PostgreSQL the commit
    order table ``sealtrail_outbox_commit``."""
    metadata = MetaData() if metadata is None else metadata
    existing = metadata.tables.get(OUTBOX_TABLE)
    if existing is not None:
        return existing
    table = Table(
        OUTBOX_TABLE,
        metadata,
        # INTEGER PRIMARY KEY AUTOINCREMENT on SQLite (ids never reused), a bigint identity
        # elsewhere: capture order. On PostgreSQL the same types as trigger capture's
        # outbox (sealtrail.capture.pg), so either may create it and both write to it.
        Column(
            "id",
            BigInteger().with_variant(Integer(), "sqlite"),
            Identity(always=True),
            primary_key=True,
        ),
        Column(
            "event_id",
            Text().with_variant(PG_UUID(as_uuid=False), "postgresql"),
            nullable=False,
            unique=True,
        ),
        Column("txid", Text, nullable=False),
        # json, as trigger capture's since session 4 (an outbox created earlier with jsonb
        # takes the same writes: the value is assigned to it).
        Column("event", Text().with_variant(PG_JSON(), "postgresql"), nullable=False),
        Column("created_at", Text().with_variant(DateTime(timezone=True), "postgresql")),
        Index(f"{OUTBOX_TABLE}_txid", "txid", "id"),
        sqlite_autoincrement=True,
    )
    event.listen(table, "after_create", _create_guards)
    return table


_SQLITE_GUARDS: Final = (
    f"CREATE TABLE IF NOT EXISTS {OUTBOX_GUARD_TABLE} ("
    "id INTEGER PRIMARY KEY CHECK (id = 1), "
    "active INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1)))",
    f"INSERT OR IGNORE INTO {OUTBOX_GUARD_TABLE} (id, active) VALUES (1, 0)",
    f"CREATE TRIGGER IF NOT EXISTS {OUTBOX_TABLE}_no_update BEFORE UPDATE ON {OUTBOX_TABLE} "
    f"BEGIN SELECT RAISE(ABORT, '{OUTBOX_TABLE} is append-only: captured events are never "
    "updated'); END",
    f"CREATE TRIGGER IF NOT EXISTS {OUTBOX_TABLE}_no_delete BEFORE DELETE ON {OUTBOX_TABLE} "
    f"WHEN (SELECT active FROM {OUTBOX_GUARD_TABLE} WHERE id = 1) IS NOT 1 "
    f"BEGIN SELECT RAISE(ABORT, '{OUTBOX_TABLE} rows are deleted only by the relay, after "
    "the ledger acknowledged them'); END",
    f"CREATE TRIGGER IF NOT EXISTS {OUTBOX_GUARD_TABLE}_no_delete BEFORE DELETE ON "
    f"{OUTBOX_GUARD_TABLE} BEGIN SELECT RAISE(ABORT, '{OUTBOX_GUARD_TABLE} must keep its "
    "row'); END",
)
#: Commit order on PostgreSQL, exactly as trigger capture (sealtrail.capture.pg) makes it:
#: capturing transactions take this transaction-level advisory lock at COMMIT and draw
#: ``commit_seq`` from the sequence, so it orders them as they committed.
PG_COMMIT_LOCK: Final = COMMIT_LOCK
#: Transaction-local setting naming the transaction whose events this transaction's
#: outbox inserts wrote (set by those inserts, so a rolled-back savepoint takes it back):
#: the commit hook numbers the transaction only then, without looking in the outbox.
_PG_WROTE: Final = "sealtrail.orm_wrote"
_PG_COMMIT: Final = (
    f"CREATE SEQUENCE IF NOT EXISTS {COMMIT_SEQ}",
    f"CREATE TABLE IF NOT EXISTS {OUTBOX_COMMIT_TABLE} ("
    "txid text PRIMARY KEY, commit_seq bigint UNIQUE NOT NULL)",
)


def _create_guards(target: Table, connection: Connection, **_: Any) -> None:
    name = connection.dialect.name
    if name == "sqlite":
        for statement in _SQLITE_GUARDS:
            connection.exec_driver_sql(statement)
    elif name == "postgresql":
        for statement in _PG_COMMIT:
            connection.exec_driver_sql(statement)
        connection.exec_driver_sql(
            f"ALTER TABLE {OUTBOX_TABLE} ALTER COLUMN created_at SET DEFAULT now()"
        )


def delete_shipped(connection: Connection, ids: Sequence[int]) -> int:
    """Delete outbox rows (by ``id``) the ledger acknowledged, as the relay does: on SQLite
    the guard row is raised for this transaction only. Returns the rows deleted. Call it
    inside a transaction (``with engine.begin() as connection``)."""
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        connection.exec_driver_sql(f"UPDATE {OUTBOX_GUARD_TABLE} SET active = 1 WHERE id = 1")
    deleted = 0
    for start in range(0, len(ids), _CHUNK):
        chunk = [int(i) for i in ids[start : start + _CHUNK]]
        result = connection.execute(
            text(f"DELETE FROM {OUTBOX_TABLE} WHERE id IN ({','.join(map(str, chunk))})")
        )
        deleted += max(result.rowcount, 0)
    if sqlite:
        connection.exec_driver_sql(f"UPDATE {OUTBOX_GUARD_TABLE} SET active = 0 WHERE id = 1")
    return deleted


def outbox_events(bind: Engine | Connection) -> list[dict[str, Any]]:
    """The events waiting in the outbox, in capture order (for tests and inspection)."""
    query = text(f"SELECT CAST(event AS TEXT) FROM {OUTBOX_TABLE} ORDER BY id")
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            rows = conn.execute(query).scalars().all()
    else:
        rows = bind.execute(query).scalars().all()
    return [orjson.loads(r) for r in rows]


# --------------------------------------------------------------------------------------
# Tracks


def _mapper_of(thing: object) -> Mapper[Any] | None:
    try:
        found = inspect(thing)
    except NoInspectionAvailable:
        return None
    return found if isinstance(found, Mapper) else None


def model_track(
    model: type[Any] | Table,
    *,
    exclude: Iterable[str] = (),
    mask: Iterable[str] = (),
) -> Track:
    """The :class:`~sealtrail.capture.change.Track` of a mapped class (its local table) or
    a Table: the table name, the primary key columns (from the mapper when the table has
    none), and ``exclude``/``mask`` given as column names or attribute names."""
    mapper = None if isinstance(model, Table) else _mapper_of(model)
    if isinstance(model, Table):
        table = model
    elif mapper is not None:
        local = mapper.local_table
        if not isinstance(local, Table):
            raise CaptureError(f"{model!r} is not mapped to a table")
        table = local
    else:
        raise TypeError(
            f"cannot track {model!r}: give a mapped class, a Table or a "
            "sealtrail.capture.change.Track"
        )

    def columns(names: Iterable[str], what: str) -> list[str]:
        out = []
        for name in names:
            out.append(_column_name(table, mapper, name, what))
        return out

    pk = _pk_columns(table, mapper, None)
    resolved = Track.of(
        table.fullname,
        pk=[c.name for c in pk],
        exclude=columns(exclude, "exclude"),
        mask=columns(mask, "mask"),
    )
    _check_track(table, resolved)
    return resolved


def _column_name(table: Table, mapper: Mapper[Any] | None, name: str, what: str) -> str:
    if any(c.name == name for c in table.columns):
        return name
    if mapper is not None and name in mapper.column_attrs:
        for col in mapper.column_attrs[name].columns:
            if isinstance(col, Column) and col.table is table:
                return col.name
    raise CaptureError(f"{what}: table {table.fullname!r} has no column (or attribute) {name!r}")


def _pk_columns(
    table: Table, mapper: Mapper[Any] | None, names: Sequence[str] | None
) -> tuple[Column[Any], ...]:
    by_name = {c.name: c for c in table.columns}
    if names:
        return tuple(by_name[n] for n in names)
    if len(table.primary_key.columns):
        return tuple(table.primary_key.columns)
    if mapper is not None:
        mine = tuple(c for c in mapper.primary_key if isinstance(c, Column) and c.table is table)
        if mine:
            return mine
    raise CaptureError(
        f"table {table.fullname!r} has no primary key: a captured row needs one; give its "
        "key columns with Track.of(..., pk=[...])"
    )


def _check_track(table: Table, track: Track) -> None:
    names = {c.name for c in table.columns}
    unknown = (set(track.exclude) | set(track.mask) | set(track.pk or ())) - names
    if unknown:
        raise CaptureError(
            f"the Track of {track.table!r} names columns that table {table.fullname!r} does "
            f"not have: {sorted(unknown)}"
        )
    if track.pk is not None and not track.pk:
        raise CaptureError(f"the Track of {track.table!r} has an empty primary key")


@dataclass(frozen=True, slots=True, eq=False)
class _Table:
    """A tracked Table, resolved against its Track."""

    table: Table
    track: Track
    pk: tuple[Column[Any], ...]  # what target.id and data.db.pk are made of
    locator: tuple[Column[Any], ...]  # how a row is found again (the real primary key)
    captured: tuple[Column[Any], ...]  # every column not excluded, in table order
    needed: tuple[Column[Any], ...]  # captured + pk + locator, in table order
    masked: frozenset[str]

    @classmethod
    def of(cls, table: Table, track: Track, mapper: Mapper[Any] | None) -> _Table:
        _check_track(table, track)
        pk = _pk_columns(table, mapper, track.pk)
        locator = tuple(table.primary_key.columns) or pk
        hidden = set(track.exclude) | set(track.mask)
        clash = hidden & {c.name for c in (*pk, *locator)}
        if clash:
            raise CaptureError(
                f"the Track of {track.table!r} excludes or masks key columns {sorted(clash)}: "
                "a row's key is its identity in the trail"
            )
        captured = tuple(c for c in table.columns if c.name not in track.exclude)
        wanted = {c.name for c in (*captured, *pk, *locator)}
        needed = tuple(c for c in table.columns if c.name in wanted)
        return cls(table, track, pk, locator, captured, needed, track.mask)

    def name(self, conn: Connection) -> str:
        """The table as recorded: schema-qualified on PostgreSQL, as trigger capture does."""
        table = self.table
        if table.schema is None and conn.dialect.name == "postgresql":
            return f"{conn.dialect.default_schema_name or 'public'}.{table.name}"
        return table.fullname


@dataclass(frozen=True, slots=True, eq=False)
class _Mapped:
    """How one mapper writes one tracked table: attribute keys of its columns, and where
    each locator column's value sits in the instance identity."""

    tbl: _Table
    keys: Mapping[str, str | None]  # column name -> attribute key (None: not mapped)
    identity: Mapping[str, int | None]  # locator column name -> index in state.identity


def _base_table(table: Any) -> Any:
    deannotate = getattr(table, "_deannotate", None)
    return deannotate() if deannotate is not None else table


def _is_sql(value: object) -> bool:
    return isinstance(value, ClauseElement) or hasattr(value, "__clause_element__")


# --------------------------------------------------------------------------------------
# Transactions


def _root(conn: Connection) -> Any:
    txn = conn.get_transaction()
    if txn is None:
        raise CaptureError("a tracked change needs a transaction, and the connection has none")
    return txn


def _txid(conn: Connection) -> str:
    """The id of the connection's database transaction, made once per transaction."""
    txn = _root(conn)
    info = conn.info
    entry = info.get(_TX)
    if entry is not None and entry[0]() is txn:
        return str(entry[1])
    txid = new_event_id()  # a UUIDv7: transaction ids sort by their start
    info[_TX] = (weakref.ref(txn), txid)
    return txid


def _doom(conn: Connection, why: str) -> None:
    """Refuse the COMMIT of the connection's transaction (the change ran, its event did
    not get written)."""
    txn = conn.get_transaction()
    if txn is not None:
        conn.info[_DOOM] = (weakref.ref(txn), why)


def _refuse_autocommit(conn: Connection) -> None:
    dbapi = conn.connection.dbapi_connection
    if dbapi is None:
        return
    if conn.dialect.name == "sqlite":
        if getattr(dbapi, "in_transaction", True):
            return
        auto = getattr(dbapi, "autocommit", None)  # Python 3.12+
        if auto is True or (auto is not False and dbapi.isolation_level is None):
            raise CaptureError(
                "a tracked table is written in autocommit mode: the change and its event "
                "could not be in one transaction; use a transaction"
            )
    elif getattr(dbapi, "autocommit", False) is True:
        raise CaptureError(
            "a tracked table is written in autocommit mode: the change and its event "
            "could not be in one transaction; use a transaction"
        )


def _begin_if_needed(conn: Connection) -> None:
    """Before reading old values on SQLite: make sure a transaction holds them still.
    pysqlite in its default mode begins a transaction only at the first write, so a read
    before it would see a snapshot another writer may change; take the write lock now."""
    _refuse_autocommit(conn)
    if conn.dialect.name != "sqlite":
        return
    dbapi = conn.connection.dbapi_connection
    if dbapi is not None and not getattr(dbapi, "in_transaction", True):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


# --------------------------------------------------------------------------------------
# Values and events


_SAFE_INT: Final = 2**53 - 1  # the envelope's integer range (RFC 8785, I-JSON)


def _value(tbl: _Table, column: str, value: Any) -> Any:
    try:
        return _safe(json_value(value))
    except TypeError as exc:
        raise CaptureError(f"column {tbl.table.fullname}.{column}: {exc}") from None


def _safe(value: Any) -> Any:
    """Integers beyond the envelope's range (a BIGINT past 2**53) as their text, like
    json_value writes decimals: the trail refuses them as numbers."""
    cls = type(value)
    if cls is int:
        return value if -_SAFE_INT <= value <= _SAFE_INT else str(value)
    if cls is dict:
        return {k: _safe(v) for k, v in value.items()}
    if cls is list:
        return [_safe(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    ta = type(a)
    if ta is type(b) and (ta is str or ta is int or a is None):
        return bool(a == b)
    return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        b, option=orjson.OPT_SORT_KEYS
    )


def _row_changes(tbl: _Table, row: Mapping[str, Any], side: str) -> dict[str, Any]:
    masked = tbl.masked
    out: dict[str, Any] = {}
    for col in tbl.captured:
        name = col.name
        value = _value(tbl, name, row.get(name))
        out[name] = {side: dict(MASKED) if name in masked else value}
    return out


def _diff(
    tbl: _Table, columns: Iterable[Column[Any]], old: Mapping[str, Any], new: Mapping[str, Any]
) -> dict[str, Any]:
    masked = tbl.masked
    out: dict[str, Any] = {}
    for col in columns:
        name = col.name
        before = _value(tbl, name, old.get(name))
        after = _value(tbl, name, new.get(name))
        if _same(before, after):
            continue
        if name in masked:
            out[name] = {"old": dict(MASKED), "new": dict(MASKED)}
        else:
            out[name] = {"old": before, "new": after}
    return out


class _Batch:
    """Events of one operation: the audit context is resolved once, the transaction id
    taken once; each event gets its own id and time."""

    __slots__ = ("base", "capture", "present", "txid")

    def __init__(self, capture: Capture, conn: Connection, op: str) -> None:
        snapshot = resolve(current_context())
        self.capture = capture
        self.base = apply_context({"action": ACTIONS[op]}, snapshot, policy=capture.no_actor)
        self.present = "present" if snapshot else "missing"
        self.txid = _txid(conn)

    def event(
        self, tbl: _Table, name: str, op: str, row: Mapping[str, Any], changes: dict[str, Any]
    ) -> dict[str, Any]:
        columns = [c.name for c in tbl.pk]
        pk = {c: _value(tbl, c, row.get(c)) for c in columns}
        db = {
            "table": name,
            "op": op,
            "pk": pk,
            "txid": self.txid,
            "app_context": self.present,
            "role": self.capture.role,
        }
        out = dict(self.base)
        out["id"] = new_event_id()
        out["time"] = utc_now()
        out["outcome"] = "success"
        out["target"] = {"type": target_type(name), "id": pk_text(pk, columns)}
        out["changes"] = changes
        extra = out.get("data")
        out["data"] = {**extra, "db": db} if isinstance(extra, dict) else {"db": db}
        if not self.capture.validate:
            return out
        try:
            return prepare_event(out)
        except InvalidEvent as exc:
            raise CaptureError(
                f"the {op} of {name} row {pk_text(pk, columns)} cannot be recorded, so it is "
                f"refused: {exc}"
            ) from exc


# --------------------------------------------------------------------------------------
# Reading rows


def _select_one(
    conn: Connection, tbl: _Table, columns: Sequence[Column[Any]], key: Mapping[str, Any]
) -> dict[str, Any] | None:
    query = select(*columns).where(and_(*(c == key[c.name] for c in tbl.locator)))
    row = conn.execute(query).mappings().first()
    return None if row is None else dict(row)


def _locate(row: Mapping[str, Any], tbl: _Table) -> tuple[Any, ...]:
    return tuple(row[c.name] for c in tbl.locator)


def _by_keys(
    conn: Connection, tbl: _Table, keys: Sequence[tuple[Any, ...]]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Rows by their locator, in chunks."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    locator = tbl.locator
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        if len(locator) == 1:
            where = locator[0].in_([k[0] for k in chunk])
        else:
            where = tuple_(*locator).in_(list(chunk))
        for row in conn.execute(select(*tbl.needed).where(where)).mappings():
            found = dict(row)
            out[_locate(found, tbl)] = found
    return out


def _where_rows(
    conn: Connection, tbl: _Table, where: Any, params: Mapping[str, Any] | None
) -> dict[tuple[Any, ...], dict[str, Any]]:
    query = select(*tbl.needed).order_by(*tbl.locator)
    if where is not None:
        query = query.where(where)
    if conn.dialect.name != "sqlite":  # SQLite: the write lock taken above holds them
        query = query.with_for_update()
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in conn.execute(query, dict(params or {})).mappings():
        found = dict(row)
        out.setdefault(_locate(found, tbl), found)
    return out


# --------------------------------------------------------------------------------------
# Statements (ORM and Core)


@dataclass(slots=True)
class _Plan:
    """What a statement's capture knows before the statement runs."""

    tbl: _Table
    op: str
    old: dict[tuple[Any, ...], dict[str, Any]]
    keys: list[tuple[Any, ...]] | None = None  # inserts: keys known from the parameters
    exact: bool = True  # the old rows are exactly the statement's rows (rowcount checks)


@dataclass(slots=True, eq=False)
class _Pending:
    """One unit-of-work row change, made into an event at ``after_flush``."""

    conn: Connection
    tbl: _Table
    op: str
    values: dict[str, Any]  # insert: the new row; update: new values; delete: the old row
    read: bool  # some values are to be read from the row after the flush
    key: tuple[Any, ...]  # the row's locator, when read
    old: dict[str, Any] = field(default_factory=dict)  # update: old values
    columns: tuple[Column[Any], ...] = ()  # update: the columns that may have changed


def _upsert_kind(stmt: Any) -> str | None:
    post = getattr(stmt, "_post_values_clause", None)
    if post is not None:
        return "ignore" if type(post).__name__ == "OnConflictDoNothing" else "update"
    words = " ".join(str(getattr(p, "text", p)) for p, _ in getattr(stmt, "_prefixes", ()))
    upper = words.upper()
    if "REPLACE" in upper:
        return "update"
    if "IGNORE" in upper:
        return "ignore"
    return None


def _set_columns(stmt: Any, params: Sequence[Mapping[str, Any]], mapper: Any) -> set[str]:
    """Names of the columns an UPDATE sets (from ``.values()`` and the parameters)."""
    names: set[str] = set()
    for key in dict(getattr(stmt, "_values", None) or {}):
        names.add(key.name if isinstance(key, Column) else str(getattr(key, "key", key)))
    for row in params:
        names.update(str(k) for k in row)
    if mapper is not None:
        attrs = mapper.column_attrs
        names = {
            next((c.name for c in attrs[n].columns if isinstance(c, Column)), n)
            if n in attrs
            else n
            for n in names
        }
    return names


def _refuse_pk_change(tbl: _Table, names: set[str], where: str) -> None:
    keys = {c.name for c in (*tbl.locator, *tbl.pk)} & names
    if keys:
        raise CaptureError(
            f"{where} sets key columns {sorted(keys)} of tracked table "
            f"{tbl.table.fullname!r}: a bulk UPDATE that changes a row's key cannot be "
            "captured without triggers; change keys through the unit of work (the session)"
        )


class Capture:
    """Captures the writes of one engine, session factory or Session class; made by
    :func:`track`. :meth:`remove` stops it."""

    def __init__(
        self,
        target: Engine | sessionmaker[Any] | type[Session],
        tracks: Iterable[Track | type[Any] | Table],
        *,
        no_actor: NoActorPolicy | None = None,
        role: str = ROLE,
        metadata: MetaData | None = None,
        validate: bool = True,
        old_values: Literal["history", "database"] = "history",
    ) -> None:
        if old_values not in ("history", "database"):
            raise ValueError("old_values must be 'history' or 'database'")
        self.no_actor = no_actor
        self.role = role
        self.validate = validate
        self.old_values = old_values
        self.outbox = outbox_table(metadata)
        self._engine: Engine | None = None
        self._session_class: type[Session] | None = None
        self._by_name: dict[str, Track] = {}
        self._direct: dict[Table, _Table] = {}
        self._tables: dict[tuple[Table, str | None], _Table | None] = {}
        self._mappers: dict[tuple[Mapper[Any], str | None], tuple[_Mapped, ...]] = {}
        # Keys of this capture's state in session.info: another capture (another engine,
        # another sessionmaker) flushing the same session must not take or clear it.
        self._info_buffer = (_BUFFER, id(self))
        self._info_stash = (_STASH, id(self))
        self._info_flush = (_FLUSH, id(self))
        self._sessions: weakref.WeakKeyDictionary[Connection, weakref.ref[Session]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._listeners: list[tuple[Any, str, Callable[..., Any]]] = []
        self._add_tracks(tracks, metadata)
        self._attach(target)

    # -- set-up ----------------------------------------------------------------------------
    def _add_tracks(
        self, tracks: Iterable[Track | type[Any] | Table], metadata: MetaData | None
    ) -> None:
        if isinstance(tracks, Track | Table | type | str):
            tracks = [tracks]
        for item in tracks:
            if isinstance(item, Track):
                if item.table in self._by_name:
                    raise CaptureError(f"table {item.table!r} is tracked twice")
                self._by_name[item.table] = item
                continue
            mapper = None if isinstance(item, Table) else _mapper_of(item)
            if isinstance(item, Table):
                table = item
            elif mapper is not None and isinstance(mapper.local_table, Table):
                table = mapper.local_table
            else:
                raise TypeError(
                    f"cannot track {item!r}: give a sealtrail.capture.change.Track, a mapped "
                    "class or a Table"
                )
            resolved = _Table.of(table, model_track(item), mapper)
            if table in self._direct:
                raise CaptureError(f"table {table.fullname!r} is tracked twice")
            self._direct[table] = resolved
        for table in self._direct:
            if table.fullname in self._by_name:
                raise CaptureError(f"table {table.fullname!r} is tracked twice")
        for name in (*self._by_name, *(t.fullname for t in self._direct)):
            if name.rpartition(".")[2] in (OUTBOX_TABLE, OUTBOX_COMMIT_TABLE, OUTBOX_GUARD_TABLE):
                raise CaptureError(f"{name!r} is Sealtrail's own table; it is not tracked")
        if metadata is not None:
            for name, track in self._by_name.items():
                found = metadata.tables.get(name)
                if found is None:
                    raise CaptureError(
                        f"a Track names table {name!r}, which the metadata does not have "
                        f"(it has {sorted(metadata.tables)[:20]})"
                    )
                _Table.of(found, track, None)

    def _attach(self, target: Any) -> None:
        engine = getattr(target, "sync_engine", target)  # an AsyncEngine
        if isinstance(engine, Engine):
            self._engine = engine
            session_target: Any = Session
            engine_target: Any = engine
        elif isinstance(target, sessionmaker):
            self._session_class = target.class_
            session_target = target
            engine_target = Engine
        elif isinstance(target, type) and issubclass(target, Session):
            self._session_class = target
            session_target = target
            engine_target = Engine
        else:
            raise TypeError(
                f"track() captures an Engine, a sessionmaker or a Session class, not {target!r}"
            )
        self._listen(Mapper, "before_insert", self._before_write)
        self._listen(Mapper, "after_insert", self._after_insert)
        self._listen(Mapper, "before_update", self._before_update)
        self._listen(Mapper, "after_update", self._after_update)
        self._listen(Mapper, "before_delete", self._before_delete)
        self._listen(session_target, "after_begin", self._after_begin)
        self._listen(session_target, "before_flush", self._before_flush)
        self._listen(session_target, "after_flush", self._after_flush)
        self._listen(session_target, "after_soft_rollback", self._after_soft_rollback)
        self._listen(session_target, "do_orm_execute", self._on_orm_execute)
        self._listen(engine_target, "before_execute", self._before_execute, retval=True)
        self._listen(engine_target, "after_execute", self._after_execute)
        self._listen(engine_target, "handle_error", self._on_error)
        self._listen(engine_target, "commit", self._on_commit)

    def _listen(self, target: Any, name: str, fn: Callable[..., Any], **kw: Any) -> None:
        event.listen(target, name, fn, **kw)
        self._listeners.append((target, name, fn))

    def remove(self) -> None:
        """Stop capturing (detach every listener)."""
        while self._listeners:
            target, name, fn = self._listeners.pop()
            event.remove(target, name, fn)

    def create_outbox(self, bind: Engine | Connection) -> None:
        """Create ``sealtrail_outbox`` (and its guards) if it is not there yet."""
        if isinstance(bind, Engine):
            with bind.begin() as conn:
                self._create(conn)
        else:
            self._create(bind)

    def _create(self, conn: Connection) -> None:
        self.outbox.create(conn, checkfirst=True)
        _create_guards(self.outbox, conn)

    @property
    def tracks(self) -> tuple[Track, ...]:
        return (*self._by_name.values(), *(t.track for t in self._direct.values()))

    # -- what is tracked -------------------------------------------------------------------
    def _lookup(self, table: Any, dialect: Any, mapper: Mapper[Any] | None = None) -> _Table | None:
        table = _base_table(table)
        if not isinstance(table, Table):
            element = getattr(table, "element", None)
            if isinstance(element, Table) and self._lookup(element, dialect, mapper):
                raise CaptureError(
                    f"a write through an alias of tracked table {element.fullname!r} cannot "
                    "be captured; write to the table itself"
                )
            return None
        direct = self._direct.get(table)
        if direct is not None:
            return direct
        if not self._by_name and not self._direct:
            return None
        schema = getattr(dialect, "default_schema_name", None)
        key = (table, schema)
        try:
            return self._tables[key]
        except KeyError:
            pass
        track = self._by_name.get(table.fullname)
        if track is None and table.schema is None and schema:
            track = self._by_name.get(f"{schema}.{table.name}")
        if track is None:
            # Another Table object for a table tracked as a model or Table (reflected, or
            # from another MetaData): the same database table, so the same rules.
            for tracked, resolved in self._direct.items():
                if tracked.fullname == table.fullname:
                    track = resolved.track
                    break
        found = None if track is None else _Table.of(table, track, mapper)
        self._tables[key] = found
        return found

    def _mapped(self, mapper: Mapper[Any], conn: Connection) -> tuple[_Mapped, ...]:
        key = (mapper, conn.dialect.default_schema_name)
        found = self._mappers.get(key)
        if found is not None:
            return found
        out = []
        for table in mapper.tables:
            tbl = self._lookup(table, conn.dialect, mapper)
            if tbl is None:
                continue
            keys: dict[str, str | None] = {}
            for col in table.columns:
                try:
                    keys[col.name] = mapper.get_property_by_column(col).key
                except UnmappedColumnError:
                    keys[col.name] = None
            identity: dict[str, int | None] = {}
            for col in tbl.locator:
                attr = keys.get(col.name)
                identity[col.name] = next(
                    (
                        i
                        for i, pk in enumerate(mapper.primary_key)
                        if attr is not None and _attr_key(mapper, pk) == attr
                    ),
                    None,
                )
            out.append(_Mapped(tbl, keys, identity))
        result = tuple(out)
        with self._lock:
            self._mappers[key] = result
        return result

    # -- coverage --------------------------------------------------------------------------
    def _engine_matches(self, conn: Connection) -> bool:
        return self._engine is not None and conn.engine.pool is self._engine.pool

    def _covers_session(self, session: Session | None, conn: Connection) -> bool:
        if session is None:
            return False
        if self._session_class is not None:
            return isinstance(session, self._session_class)
        return self._engine_matches(conn)

    def _flush_session(self, conn: Connection, target: object) -> Session | None:
        session = object_session(target)
        return session if self._covers_session(session, conn) else None

    # -- the unit of work ------------------------------------------------------------------
    def _after_begin(self, session: Session, transaction: Any, connection: Connection) -> None:
        if self._covers_session(session, connection):
            self._sessions[connection] = weakref.ref(session)

    def _before_flush(self, session: Session, flush_context: Any, instances: Any) -> None:
        session.info.pop(self._info_buffer, None)
        session.info.pop(self._info_stash, None)
        session.info[self._info_flush] = True  # the Core hooks leave the unit of work's statements

    def _after_soft_rollback(self, session: Session, previous_transaction: Any) -> None:
        for key in (self._info_flush, self._info_buffer, self._info_stash):
            session.info.pop(key, None)

    def _after_flush(self, session: Session, flush_context: Any) -> None:
        session.info.pop(self._info_flush, None)
        session.info.pop(self._info_stash, None)
        pending: list[_Pending] | None = session.info.pop(self._info_buffer, None)
        if not pending:
            return
        # Values the session does not hold after the flush (columns a new object never
        # set, server defaults, onupdate values, SQL expressions): one read per table.
        wanted: dict[tuple[int, Table], list[tuple[Any, ...]]] = {}
        for item in pending:
            if item.read:
                wanted.setdefault((id(item.conn), item.tbl.table), []).append(item.key)
        stored: dict[tuple[int, Table], dict[tuple[Any, ...], dict[str, Any]]] = {}
        for item in pending:
            group = (id(item.conn), item.tbl.table)
            if item.read and group not in stored:
                stored[group] = _by_keys(item.conn, item.tbl, wanted[group])
        batches: dict[tuple[int, str], _Batch] = {}
        out: list[tuple[Connection, dict[str, Any]]] = []
        for item in pending:
            tbl, conn, op = item.tbl, item.conn, item.op
            values = item.values
            if item.read:
                found = stored[(id(conn), tbl.table)].get(item.key)
                if found is None:
                    raise CaptureError(
                        f"a written {tbl.table.fullname!r} row cannot be read back (key "
                        f"{item.key!r})"
                    )
                values = {**found, **values}
            if op == "update":
                changes = _diff(tbl, item.columns, item.old, values)
                if not changes:
                    continue
            else:
                changes = _row_changes(tbl, values, "new" if op == "insert" else "old")
            batch = batches.get((id(conn), op))
            if batch is None:
                batch = batches[(id(conn), op)] = _Batch(self, conn, op)
            out.append((conn, batch.event(tbl, tbl.name(conn), op, values, changes)))
        start = 0
        while start < len(out):
            conn = out[start][0]
            end = start
            while end < len(out) and out[end][0] is conn:
                end += 1
            self._write(conn, [e for _, e in out[start:end]])
            start = end

    def _buffer(self, session: Session, item: _Pending) -> None:
        session.info.setdefault(self._info_buffer, []).append(item)

    def _before_write(self, mapper: Mapper[Any], conn: Connection, target: Any) -> None:
        if self._mapped(mapper, conn) and self._flush_session(conn, target) is not None:
            _refuse_autocommit(conn)

    def _flush_target(
        self, mapper: Mapper[Any], conn: Connection, target: Any, before: bool = False
    ) -> tuple[tuple[_Mapped, ...], Session, Any] | None:
        """What a mapper event works on: the tracked tables of the mapper, the flushing
        session and the object's state; None if there is nothing to capture. Before the
        write, an autocommit connection is refused (nothing could be atomic with it)."""
        infos = self._mapped(mapper, conn)
        if not infos:
            return None
        session = self._flush_session(conn, target)
        if session is None:
            return None
        if before:
            _refuse_autocommit(conn)
        return infos, session, inspect(target)

    def _after_insert(self, mapper: Mapper[Any], conn: Connection, target: Any) -> None:
        found = self._flush_target(mapper, conn, target)
        if found is None:
            return
        infos, session, state = found
        values_of = state.dict
        for info in infos:
            tbl = info.tbl
            row: dict[str, Any] = {}
            missing = []
            for col in tbl.needed:
                attr = info.keys.get(col.name)
                value = _MISSING if attr is None else values_of.get(attr, _MISSING)
                if value is _MISSING or _is_sql(value):
                    missing.append(col)
                else:
                    row[col.name] = value
            if missing and any(c.name not in row for c in tbl.locator):
                raise CaptureError(
                    f"the primary key of a new {tbl.table.fullname!r} row is unknown after "
                    "its INSERT"
                )
            key = _locate(row, tbl) if missing else ()
            self._buffer(session, _Pending(conn, tbl, "insert", row, bool(missing), key))

    def _old_key(self, info: _Mapped, state: Any) -> dict[str, Any]:
        """The locator of the row as the database holds it now (before this flush)."""
        key: dict[str, Any] = {}
        identity = state.identity
        for col in info.tbl.locator:
            index = info.identity.get(col.name)
            if identity is not None and index is not None:
                key[col.name] = identity[index]
                continue
            attr = info.keys.get(col.name)
            if attr is None:
                raise CaptureError(f"{info.tbl.table.fullname}.{col.name} is not mapped")
            history = state.attrs[attr].history
            if history.deleted:
                key[col.name] = history.deleted[0]
            elif attr in state.dict:
                key[col.name] = state.dict[attr]
            else:
                raise CaptureError(f"the key {info.tbl.table.fullname}.{col.name} is not loaded")
        return key

    def _new_key(self, info: _Mapped, state: Any, old: Mapping[str, Any]) -> dict[str, Any]:
        key: dict[str, Any] = {}
        for col in info.tbl.locator:
            attr = info.keys.get(col.name)
            value = state.dict.get(attr, _MISSING) if attr is not None else _MISSING
            key[col.name] = old[col.name] if value is _MISSING or _is_sql(value) else value
        return key

    def _before_update(self, mapper: Mapper[Any], conn: Connection, target: Any) -> None:
        found = self._flush_target(mapper, conn, target, before=True)
        if found is None:
            return
        infos, session, state = found
        from_db = self.old_values == "database"
        stash = session.info.setdefault(self._info_stash, {})
        for info in infos:
            candidates: list[Column[Any]] = []
            old: dict[str, Any] = {}
            need: list[Column[Any]] = []
            for col in info.tbl.captured:
                on_update = col.onupdate is not None or col.server_onupdate is not None
                attr = info.keys.get(col.name)
                if attr is None:
                    if on_update:
                        candidates.append(col)
                        need.append(col)
                    continue
                history = state.attrs[attr].history
                changed = history.has_changes()
                if not changed and not on_update:
                    continue
                candidates.append(col)
                if from_db:
                    need.append(col)
                elif history.deleted:
                    old[col.name] = history.deleted[0]
                elif not changed and history.unchanged:
                    old[col.name] = history.unchanged[0]
                else:
                    need.append(col)  # set without being loaded: its old value is unknown
            if not candidates:
                continue
            key = self._old_key(info, state)
            old.update(key)
            if need:
                _begin_if_needed(conn)
                stored = _select_one(conn, info.tbl, need, key)
                if stored is not None:
                    old.update(stored)
            stash[(state, info.tbl.table)] = (candidates, old)

    def _after_update(self, mapper: Mapper[Any], conn: Connection, target: Any) -> None:
        found = self._flush_target(mapper, conn, target)
        if found is None:
            return
        infos, session, state = found
        stash = session.info.get(self._info_stash, {})
        for info in infos:
            pending = stash.pop((state, info.tbl.table), None)
            if pending is None:
                continue
            candidates, old = pending
            tbl = info.tbl
            new: dict[str, Any] = {}
            need: list[Column[Any]] = []
            wanted = list(candidates) + [c for c in tbl.pk if c not in candidates]
            for col in wanted:
                attr = info.keys.get(col.name)
                value = _MISSING if attr is None else state.dict.get(attr, _MISSING)
                if value is _MISSING or _is_sql(value):
                    need.append(col)
                else:
                    new[col.name] = value
            key = _locate(self._new_key(info, state, old), tbl) if need else ()
            self._buffer(
                session,
                _Pending(conn, tbl, "update", new, bool(need), key, old, tuple(candidates)),
            )

    def _before_delete(self, mapper: Mapper[Any], conn: Connection, target: Any) -> None:
        found = self._flush_target(mapper, conn, target, before=True)
        if found is None:
            return
        infos, session, state = found
        from_db = self.old_values == "database"
        for info in infos:
            tbl = info.tbl
            row: dict[str, Any] = {}
            need: list[Column[Any]] = []
            for col in tbl.needed:
                attr = info.keys.get(col.name)
                if from_db or attr is None:
                    need.append(col)
                    continue
                history = state.attrs[attr].history
                if history.deleted:
                    row[col.name] = history.deleted[0]
                elif not history.has_changes() and history.unchanged:
                    row[col.name] = history.unchanged[0]
                else:
                    need.append(col)
            key = self._old_key(info, state)
            if need:
                _begin_if_needed(conn)
                stored = _select_one(conn, tbl, need, key)
                if stored is None:
                    continue  # already gone: the DELETE changes nothing
                row.update(stored)
            row.update(key)
            self._buffer(session, _Pending(conn, tbl, "delete", row, False, ()))

    # -- writing ---------------------------------------------------------------------------
    def _write(self, conn: Connection, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        if conn.dialect.name == "postgresql":  # jsonb and timestamptz
            now: Any = _dt.datetime.now(_dt.UTC)
            rows = [
                {
                    "event_id": e["id"],
                    "txid": e["data"]["db"]["txid"],
                    "event": e,
                    "created_at": now,
                }
                for e in events
            ]
            # Each row's RETURNING marks the transaction (see _PG_WROTE); no round trip.
            mark = func.set_config(_PG_WROTE, rows[0]["txid"], True)
            conn.execute(self.outbox.insert().returning(mark), rows).all()
            return
        else:
            now = utc_now()
            rows = [
                {
                    "event_id": e["id"],
                    "txid": e["data"]["db"]["txid"],
                    "event": orjson.dumps(e).decode(),
                    "created_at": now,
                }
                for e in events
            ]
        conn.execute(self.outbox.insert(), rows)

    def _on_commit(self, conn: Connection) -> None:
        info = conn.info
        txn = conn.get_transaction()
        doomed = info.get(_DOOM)
        if doomed is not None and txn is not None and doomed[0]() is txn:
            del info[_DOOM]
            # Roll the database transaction back here: SQLAlchemy treats the transaction
            # as ended once COMMIT raised, and would return the connection to the pool
            # with the change still pending (for the next COMMIT on it to write).
            conn.dialect.do_rollback(conn.connection)
            raise CaptureError(
                f"COMMIT refused: a tracked change ran but its event could not be "
                f"written ({doomed[1]}); roll the transaction back"
            )
        if conn.dialect.name != "postgresql":
            return
        entry = info.get(_TX)
        if entry is None or txn is None or entry[0]() is not txn:
            return
        # Commit order (see sealtrail.capture.change.OUTBOX_COMMIT_TABLE): the lock is held
        # until this COMMIT completes, so commit_seq follows commit order. Only when events
        # of this transaction are still written (the mark, _PG_WROTE): a lookup in the
        # outbox, once the driver's prepared statement had a plan made while the outbox
        # was small, scanned the whole outbox at every commit. A transaction already
        # numbered (trigger capture in the same database) is found through the key.
        conn.execute(
            text(
                f"INSERT INTO {OUTBOX_COMMIT_TABLE} (txid, commit_seq) "
                f"SELECT CAST(:t AS text), nextval('{COMMIT_SEQ}') "
                "FROM pg_advisory_xact_lock(:a, :b) AS l "
                f"WHERE current_setting('{_PG_WROTE}', true) = :t "
                "ON CONFLICT (txid) DO NOTHING"
            ),
            {"t": entry[1], "a": PG_COMMIT_LOCK[0], "b": PG_COMMIT_LOCK[1]},
        )

    # -- statements ------------------------------------------------------------------------
    def _events_after(
        self, conn: Connection, plan: _Plan, rowcount: int, keys: list[tuple[Any, ...]] | None
    ) -> list[dict[str, Any]]:
        """The events of a statement that ran: compare with the rows before it."""
        tbl, op = plan.tbl, plan.op
        name = tbl.name(conn)
        batch = _Batch(self, conn, op)
        out: list[dict[str, Any]] = []
        if op == "insert":
            keys = [k for k in (keys or []) if all(v is not None for v in k)]
            rows = _by_keys(conn, tbl, keys)
            for k in dict.fromkeys(keys):
                row = rows.get(k)
                if row is None:
                    raise CaptureError(
                        f"an inserted {tbl.table.fullname!r} row cannot be read back"
                    )
                out.append(batch.event(tbl, name, op, row, _row_changes(tbl, row, "new")))
            return out
        if plan.exact and rowcount > len(plan.old):
            raise CaptureError(
                f"the statement changed {rowcount} {tbl.table.fullname!r} rows but "
                f"{len(plan.old)} were read before it (a concurrent write?)"
            )
        order = list(plan.old)
        if op == "update":
            rows = _by_keys(conn, tbl, order)
            for k in order:
                new = rows.get(k)
                if new is None:
                    raise CaptureError(
                        f"an updated {tbl.table.fullname!r} row is gone after the UPDATE "
                        "(its key changed?)"
                    )
                changes = _diff(tbl, tbl.captured, plan.old[k], new)
                if changes:
                    out.append(batch.event(tbl, name, op, new, changes))
            return out
        # delete
        if not plan.exact or rowcount != len(order):
            left = _by_keys(conn, tbl, order)
            order = [k for k in order if k not in left]
        for k in order:
            row = plan.old[k]
            out.append(batch.event(tbl, name, op, row, _row_changes(tbl, row, "old")))
        return out

    def _finish(
        self, conn: Connection, plan: _Plan, rowcount: int, keys: list[tuple[Any, ...]] | None
    ) -> None:
        try:
            self._write(conn, self._events_after(conn, plan, rowcount, keys))
        except BaseException as exc:
            _doom(conn, f"{type(exc).__name__}: {exc}")
            raise

    # ORM statements -----------------------------------------------------------------------
    def _on_orm_execute(self, state: ORMExecuteState) -> Any:
        if not state.is_orm_statement or not (
            state.is_insert or state.is_update or state.is_delete
        ):
            return None
        session = state.session
        stmt: Any = state.statement
        bind = session.get_bind(**state.bind_arguments)
        mapper = state.bind_mapper
        tbl = self._lookup(stmt.table, bind.dialect, mapper)
        if tbl is None:
            return None
        conn = session.connection(bind_arguments=state.bind_arguments)
        if not self._covers_session(session, conn):
            return None
        if session.autoflush and state.execution_options.get("autoflush", True):
            session.flush()  # pending changes first: they are the old values
        info = conn.info
        info[_GUARD] = info.get(_GUARD, 0) + 1
        try:
            if state.is_insert:
                return self._orm_insert(state, conn, tbl, mapper)
            return self._orm_update_delete(state, conn, tbl, mapper)
        finally:
            info[_GUARD] -= 1

    def _orm_insert(
        self, state: ORMExecuteState, conn: Connection, tbl: _Table, mapper: Any
    ) -> Any:
        stmt: Any = state.statement
        params: Any = state.parameters
        kind = _upsert_kind(stmt)
        if kind == "update":
            raise CaptureError(
                f"an upsert (ON CONFLICT DO UPDATE, INSERT OR REPLACE) into tracked table "
                f"{tbl.table.fullname!r} cannot be captured without triggers"
            )
        _refuse_autocommit(conn)
        plan = _Plan(tbl, "insert", {})
        locator = list(tbl.locator)
        result: Any
        if not conn.dialect.insert_returning:
            keys = _keys_from_params(
                tbl, params if isinstance(params, list) else [params or {}], mapper
            )
            if keys is None or getattr(stmt, "select", None) is not None:
                raise CaptureError(
                    f"{conn.dialect.name} has no INSERT ... RETURNING: inserts into tracked "
                    f"table {tbl.table.fullname!r} must give the primary key values"
                )
            result = state.invoke_statement()
            self._finish(conn, plan, -1, keys)
            return result
        returning = getattr(stmt, "_returning", ())
        single = not isinstance(params, list) and not getattr(stmt, "_multi_values", ())
        if not returning and single and kind is None and getattr(stmt, "select", None) is None:
            result = state.invoke_statement(statement=stmt.return_defaults(*locator))
            keys = [tuple(r) for r in result.inserted_primary_key_rows]
            self._finish(conn, plan, -1, keys)
            return result
        result = state.invoke_statement(statement=stmt.returning(*locator))
        width = len(locator)
        if not returning:
            keys = [tuple(r[-width:]) for r in result.all()]
            self._finish(conn, plan, -1, keys)
            return result
        frozen = result.freeze()
        rows = frozen().all()
        keys = [tuple(r[-width:]) for r in rows]
        self._finish(conn, plan, -1, keys)
        own = len(frozen().keys()) - width
        return frozen().columns(*range(own))

    def _orm_update_delete(
        self, state: ORMExecuteState, conn: Connection, tbl: _Table, mapper: Any
    ) -> Any:
        stmt: Any = state.statement
        op = "update" if state.is_update else "delete"
        params: Any = state.parameters
        _begin_if_needed(conn)
        if isinstance(params, list):  # bulk UPDATE by primary key
            if op == "update":
                _refuse_pk_change(tbl, _set_columns(stmt, [], mapper), "the UPDATE")
            keys = _keys_from_params(tbl, params, mapper)
            if keys is None:
                raise CaptureError(
                    f"a bulk UPDATE by primary key of {tbl.table.fullname!r} lacks key values"
                )
            plan = _Plan(tbl, op, _by_keys(conn, tbl, keys), exact=False)
        else:
            if op == "update":
                _refuse_pk_change(tbl, _set_columns(stmt, [], mapper), "the UPDATE")
            plan = _Plan(tbl, op, _where_rows(conn, tbl, stmt.whereclause, params))
        result = state.invoke_statement()
        rowcount = getattr(result, "rowcount", -1)
        if not isinstance(rowcount, int) or rowcount < 0:
            plan.exact = False
            rowcount = -1
        self._finish(conn, plan, rowcount, None)
        return result

    # Core statements ----------------------------------------------------------------------
    def _core_target(self, conn: Connection, elem: Any) -> _Table | None:
        if not isinstance(elem, Insert | Update | Delete):
            return None
        tbl = self._lookup(elem.table, conn.dialect)
        if tbl is None:
            return None
        info = conn.info
        if info.get(_GUARD):
            return None  # an ORM statement, captured in do_orm_execute
        ref = self._sessions.get(conn)
        session = None if ref is None else ref()
        if session is not None and session.info.get(self._info_flush):
            # The unit of work, captured by the mapper events. (Session._flushing is also
            # set by the legacy bulk_* methods, which have no mapper events: those are
            # captured here.)
            return None
        if self._engine is not None:
            return tbl if self._engine_matches(conn) else None
        return tbl if session is not None else None

    def _before_execute(
        self,
        conn: Connection,
        elem: Any,
        multiparams: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        execution_options: Mapping[str, Any],
    ) -> tuple[Any, Sequence[Mapping[str, Any]], Mapping[str, Any]]:
        tbl = self._core_target(conn, elem)
        if tbl is None:
            return elem, multiparams, params
        sets = list(multiparams) if multiparams else ([params] if params else [])
        if isinstance(elem, Insert):
            elem, plan = self._core_insert_plan(conn, tbl, elem, sets)
        else:
            _begin_if_needed(conn)
            op = "update" if isinstance(elem, Update) else "delete"
            if op == "update":
                _refuse_pk_change(tbl, _set_columns(elem, sets, None), "the UPDATE")
            old: dict[tuple[Any, ...], dict[str, Any]] = {}
            for one in sets or [{}]:
                for k, row in _where_rows(conn, tbl, elem.whereclause, one).items():
                    old.setdefault(k, row)
            plan = _Plan(tbl, op, old, exact=len(sets) <= 1)
        conn.info[_CORE] = (elem, plan)
        return elem, multiparams, params

    def _core_insert_plan(
        self, conn: Connection, tbl: _Table, elem: Any, sets: list[Mapping[str, Any]]
    ) -> tuple[Any, _Plan]:
        _refuse_autocommit(conn)
        plan = _Plan(tbl, "insert", {})
        where = f"an INSERT into tracked table {tbl.table.fullname!r}"
        if _upsert_kind(elem) is not None:
            raise CaptureError(
                f"{where} with ON CONFLICT / OR IGNORE / OR REPLACE cannot be captured "
                "without triggers; use a plain INSERT"
            )
        if getattr(elem, "select", None) is not None or bool(getattr(elem, "_multi_values", ())):
            raise CaptureError(
                f"{where} from a SELECT or a multi-row VALUES list cannot be captured in "
                "Core; pass the rows as parameters, or use the ORM (insert(Model))"
            )
        keys = _keys_from_params(tbl, sets, None) if len(sets) > 1 else None
        if keys is not None:
            plan.keys = keys
        elif len(sets) > 1:
            if getattr(elem, "_returning", ()) or not conn.dialect.insert_executemany_returning:
                raise CaptureError(
                    f"{where} of several rows needs their primary key values, or "
                    "RETURNING support and no RETURNING of its own"
                )
            elem = elem.return_defaults(*tbl.locator)
        elif getattr(elem, "_returning", ()):
            keys = _keys_from_params(
                tbl, sets or [dict(getattr(elem, "_values", None) or {})], None
            )
            if keys is None:
                raise CaptureError(f"{where} with RETURNING needs its primary key values")
            plan.keys = keys
        return elem, plan

    def _on_error(self, context: Any) -> None:
        conn = context.connection
        if conn is not None and not conn.closed:
            conn.info.pop(_CORE, None)  # the statement failed: nothing to capture

    def _after_execute(
        self,
        conn: Connection,
        elem: Any,
        multiparams: Any,
        params: Any,
        execution_options: Any,
        result: Any,
    ) -> None:
        pending = conn.info.get(_CORE)
        if pending is None or pending[0] is not elem:
            return
        del conn.info[_CORE]
        plan: _Plan = pending[1]
        keys = plan.keys
        rowcount = -1
        if plan.op == "insert":
            if keys is None:
                try:
                    keys = [tuple(r) for r in result.inserted_primary_key_rows]
                except Exception as exc:
                    _doom(conn, f"the inserted keys are unknown: {exc}")
                    raise CaptureError(f"the inserted keys are unknown: {exc}") from exc
        else:
            rowcount = result.rowcount if plan.exact else -1
            if rowcount is None or rowcount < 0:
                plan.exact = False
                rowcount = -1
        self._finish(conn, plan, rowcount, keys)


def _attr_key(mapper: Mapper[Any], column: Any) -> str | None:
    try:
        return mapper.get_property_by_column(column).key
    except UnmappedColumnError:
        return None


def _keys_from_params(
    tbl: _Table, sets: Sequence[Mapping[str, Any]], mapper: Any
) -> list[tuple[Any, ...]] | None:
    """Locators given in every parameter set (keys by column key, or attribute name with
    a mapper), or None when some are missing."""
    names = []
    for col in tbl.locator:
        name: str | None = col.key
        if mapper is not None:
            name = _attr_key(mapper, col)
        if name is None:
            return None
        names.append(name)
    out = []
    for one in sets:
        key = []
        for name in names:
            value = one.get(name, _MISSING)
            if value is _MISSING or value is None or _is_sql(value):
                return None
            key.append(value)
        out.append(tuple(key))
    return out if out else None


def track(
    target: Engine | sessionmaker[Any] | type[Session],
    tracks: Iterable[Track | type[Any] | Table],
    *,
    no_actor: NoActorPolicy | None = None,
    role: str = ROLE,
    metadata: MetaData | None = None,
    validate: bool = True,
    old_values: Literal["history", "database"] = "history",
) -> Capture:
    """Capture every write SQLAlchemy makes to the tracked tables.

    ``target``: an :class:`~sqlalchemy.engine.Engine` (or ``AsyncEngine``: every session
    and connection on it, Core statements included), a ``sessionmaker`` or a
    :class:`~sqlalchemy.orm.Session` subclass (the sessions it makes, and Core statements
    run through them). ``tracks``: :class:`~sealtrail.capture.change.Track` objects (by
    table name), mapped classes or Tables (see :func:`model_track` for exclude and mask).

    ``no_actor`` is what an event with no actor in the audit context becomes, as for
    explicit capture (:class:`~sealtrail.context.NoActorPolicy`; ``refuse`` makes such a
    write fail). ``metadata``: the application's MetaData: the outbox table is added to
    it (so ``create_all`` and migrations make it), and Tracks given by name are checked
    against it now instead of at the first write. ``validate``: each event passes
    :func:`~sealtrail.event.prepare_event` before it is written, so a change whose event
    the trail would refuse (over the size limit) is refused itself. ``old_values``:
    ``"history"`` takes a unit-of-work UPDATE's or DELETE's old values from the session's
    attribute history (no extra query), ``"database"`` reads them from the row (one query
    per row, right even when the session holds stale objects, e.g. with
    ``expire_on_commit=False`` while other clients write).
    """
    return Capture(
        target,
        tracks,
        no_actor=no_actor,
        role=role,
        metadata=metadata,
        validate=validate,
        old_values=old_values,
    )
