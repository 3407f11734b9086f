"""Undo a captured change, or a whole transaction, from what the trail recorded.

::

    revert(app_engine, trail, "0190f5c2-...")          # one change, by its event id
    revert(app_engine, trail, "812345")                # every change of a transaction
    revert(app_engine, trail, ref, dry_run=True)       # report conflicts, change nothing

An UPDATE is undone by setting the changed columns back to their old values, a DELETE by
inserting the full old row again (same primary key), an INSERT by deleting the row. A
transaction is undone change by change in reverse ledger order, all in one transaction of
the application's database, which commits only if every step applied cleanly: on any
conflict it rolls back and :class:`RevertError` lists them all (``dry_run`` returns them
instead, and always rolls back), so there is never a partial revert.

Conflicts (:class:`Conflict`, ``kind``):

* ``changed``: the row changed since: its current values differ from what the change left;
* ``missing`` / ``exists``: the row to update or delete is gone / the row to re-create is
  back;
* ``unique``, ``foreign_key``, ``not_null``, ``check``: the database refused the statement;
* ``schema``: the table or a column the revert needs no longer exists (dropped or renamed
  since the change), a column added since is NOT NULL without a default, a recorded value
  no longer fits the column's type;
* ``masked``: a value the revert needs was masked at capture or redacted by the trail's
  policy: the trail does not hold it.

The revert is itself a change, captured like any other: it runs inside
``sealtrail.context(reverts=<ref>)``, so the capture backends record ``data.db.reverts`` on
its events, and the actor is the caller's context.

Values come back from JSON through the type of the column as it is now (SQLAlchemy
reflection): numbers with fractions stored as text become Decimal or float, ISO times
datetimes, ``\\x`` hex text bytes; types SQLAlchemy does not know go as text, cast by the
database.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from sealtrail._exceptions import NotFound, SealtrailError
from sealtrail.canonical import _format_path
from sealtrail.capture.change import MASKED, json_value
from sealtrail.capture.history import Change
from sealtrail.capture.relay import app_errors, open_app_db
from sealtrail.context import context
from sealtrail.ledger import Ledger, entry_event
from sealtrail.store.base import SearchQuery

if TYPE_CHECKING:
    from sqlalchemy import Column, Table
    from sqlalchemy.engine import Connection, Engine

    from sealtrail.trail import Trail

__all__ = [
    "Conflict",
    "NotCaptured",
    "RevertError",
    "RevertResult",
    "find_changes",
    "revert",
]

#: After the first change of a transaction is found (scanning the trail backwards), the
#: scan stops once this many change events in a row belong to other transactions.
TRANSACTION_WINDOW: Final = 10_000

_UUID = re.compile(
    r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
)
_REDACTION_MARKS: Final = ("[REDACTED", "hmac-sha256:", "enc:aes256gcm:", "****")
_ALL = 2**62
_ABSENT: Final = object()


class RevertError(SealtrailError):
    """A revert that could not be applied; nothing was changed. ``conflicts`` lists why."""

    def __init__(self, message: str, conflicts: Sequence[Conflict] = ()) -> None:
        super().__init__(message)
        self.conflicts = list(conflicts)


class NotCaptured(RevertError):
    """The revert's own changes were not captured, so it was rolled back (see
    :func:`revert`): it ran through an engine that capture does not watch."""


@dataclass(frozen=True, slots=True)
class Conflict:
    kind: str
    event_id: str
    table: str
    key: str
    column: str | None
    message: str

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "event_id": self.event_id,
            "table": self.table,
            "key": self.key,
            "column": self.column,
            "message": self.message,
        }


@dataclass
class RevertResult:
    """What a revert did (or, in a dry run, would do)."""

    ref: str
    dry_run: bool
    applied: bool = False
    undone: list[str] = field(default_factory=list)  # event ids, in the order undone
    conflicts: list[Conflict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.conflicts

    def to_json(self) -> dict[str, object]:
        return {
            "ref": self.ref,
            "dry_run": self.dry_run,
            "applied": self.applied,
            "undone": list(self.undone),
            "conflicts": [c.to_json() for c in self.conflicts],
        }


# --------------------------------------------------------------------------------------
# Finding what to undo


def find_changes(
    ledger: Ledger | Trail,
    ref: str,
    *,
    since: str | None = None,
    window: int = TRANSACTION_WINDOW,
) -> list[Change]:
    """The changes ``ref`` names, in ledger order: the one change an event id names, else
    every change of the transaction ``ref``, found by reading the trail's change events
    backwards from the newest (``since``, an RFC 3339 time, bounds how far)."""
    led = ledger if isinstance(ledger, Ledger) else ledger.ledger
    ref = ref.strip()
    if not ref:
        raise RevertError("nothing to revert: give an event id or a transaction id")
    if _UUID.match(ref):
        try:
            entry = led.get(ref)
        except NotFound:
            pass
        else:
            if entry.body is None:
                raise RevertError(f"event {ref} was pruned: its values are gone")
            change = Change.from_event(entry.seq, entry_event(entry.body))
            if change is None:
                raise RevertError(f"event {ref} is not a captured database change")
            return [change]
    found: list[Change] = []
    pruned: list[int] = []
    gap = 0
    query = SearchQuery(action="db.*", since=since, descending=True, limit=_ALL)
    for entry in led.iter_query(query):
        if entry.body is None:
            pruned.append(entry.seq)
            continue
        change = Change.from_event(entry.seq, entry_event(entry.body))
        if change is not None and change.txid == ref:
            found.append(change)
            gap = 0
        elif found:
            gap += 1
            if gap >= window:
                break
    if not found:
        raise NotFound(f"no captured change with event id or transaction id {ref}")
    found.reverse()
    # A transaction's events are shipped together, in commit order: a pruned change event
    # among them, or right next to them, may have been one of its own.
    near = [s for s in pruned if found[0].seq - 1 <= s <= found[-1].seq + 1]
    if near:
        raise RevertError(
            f"cannot revert transaction {ref}: change events among or next to its "
            f"{len(found)} changes were pruned (ledger indexes "
            f"{', '.join(map(str, sorted(near)[:5]))}), so part of it may be gone"
        )
    return found


# --------------------------------------------------------------------------------------
# Values


class _Unfit(Exception):
    """A recorded value does not fit the column's current type."""


def _split(table: str) -> tuple[str | None, str]:
    schema, dot, name = table.partition(".")
    return (schema, name) if dot else (None, table)


def _redacted(change: Change, column: str, which: str, value: Any) -> bool:
    """Whether the trail holds a stand-in instead of the value (masked at capture, or
    replaced by the trail's redaction policy)."""
    if value == MASKED:
        return True
    note = change.event.get("redacted")
    if not isinstance(note, dict):
        return False
    fields = note.get("fields")
    if isinstance(fields, dict) and (
        _format_path(("changes", column, which)) in fields
        or _format_path(("changes", column)) in fields
    ):
        return True
    return bool(note.get("detectors")) and _marked(value)


def _marked(value: Any) -> bool:
    if isinstance(value, str):
        return any(mark in value for mark in _REDACTION_MARKS)
    if isinstance(value, dict):
        return any(_marked(v) for v in value.values())
    if isinstance(value, list):
        return any(_marked(v) for v in value)
    return False


_INTERVAL = re.compile(
    r"^(?:(?P<days>-?\d+) days?,? ?)?(?P<sign>-)?"
    r"(?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d)(?:\.(?P<f>\d{1,6}))?$"
)


def _interval(text: str) -> _dt.timedelta | None:
    """An interval as Python (``str(timedelta)``) or PostgreSQL (``1 day 02:03:04.5``,
    ``-03:00:00``) writes it; None for what a timedelta cannot hold (months, years)."""
    stripped = text.strip()
    days_only = re.fullmatch(r"(-?\d+) days?", stripped)
    if days_only:
        return _dt.timedelta(days=int(days_only[1]))
    match = _INTERVAL.match(stripped)
    if match is None:
        return None
    days = int(match["days"] or 0)
    clock = _dt.timedelta(
        hours=int(match["h"]),
        minutes=int(match["m"]),
        seconds=int(match["s"]),
        microseconds=int((match["f"] or "0").ljust(6, "0")),
    )
    return _dt.timedelta(days=days) + (-clock if match["sign"] else clock)


def from_json(column: Column[Any], value: Any) -> Any:
    """A recorded JSON value as the Python value for ``column`` (see the module doc)."""
    from sqlalchemy import types as t

    if value is None:
        return None
    kind = column.type
    try:
        if isinstance(kind, t.ARRAY):
            if not isinstance(value, list):
                raise _Unfit(f"{value!r} is not an array")
            item = kind.item_type
            fake = _Typed(item)
            return [from_json(fake, v) for v in value]  # type: ignore[arg-type]
        if isinstance(kind, t.JSON):
            return value
        if isinstance(kind, t.Boolean):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "t", "1", "yes", "on"):
                return True
            if text in ("false", "f", "0", "no", "off"):
                return False
            raise _Unfit(f"{value!r} is not a boolean")
        if isinstance(kind, t.Integer):
            if isinstance(value, bool):
                return int(value)
            return int(value) if isinstance(value, int) else int(str(value))
        if isinstance(kind, t.Float):
            return float(value)
        if isinstance(kind, t.Numeric):
            number = decimal.Decimal(str(value))
            return number if kind.asdecimal else float(number)
        if isinstance(kind, t.DateTime):
            return _dt.datetime.fromisoformat(str(value))
        if isinstance(kind, t.Date):
            text = str(value)
            return (
                _dt.date.fromisoformat(text)
                if len(text) == 10
                else _dt.datetime.fromisoformat(text).date()
            )
        if isinstance(kind, t.Time):
            return _dt.time.fromisoformat(str(value))
        if isinstance(kind, t.Interval) or _python_type(kind) is _dt.timedelta:
            # Months and years have no timedelta: such text goes as is, cast by the database.
            span = _interval(str(value))
            return str(value) if span is None else span
        if isinstance(kind, t.LargeBinary):
            text = str(value)
            if not text.startswith("\\x"):
                raise _Unfit(f"{text[:40]!r} is not \\x-hex bytes")
            return bytes.fromhex(text[2:])
        if isinstance(kind, t.Uuid):
            parsed = uuid.UUID(str(value))
            return parsed if kind.as_uuid else str(parsed)
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise _Unfit(f"{str(value)[:60]!r} does not fit {kind}: {exc}") from None
    return value


def _python_type(kind: Any) -> type | None:
    try:
        found = kind.python_type
    except (NotImplementedError, AttributeError):
        return None
    return found if isinstance(found, type) else None


@dataclass
class _Typed:
    """A stand-in column holding only a type, for array items."""

    type: Any


def _jsonish(value: Any) -> Any:
    try:
        return json_value(value)
    except TypeError:
        return str(value)


def _same(column: Column[Any], current: Any, recorded: Any) -> bool:
    try:
        if current == from_json(column, recorded):
            return True
    except _Unfit:
        pass
    now = _jsonish(current)
    return now == recorded or (isinstance(recorded, str) and str(current) == recorded)


# --------------------------------------------------------------------------------------
# Undoing


class _Step:
    """Undo one change inside the open transaction; collects conflicts."""

    def __init__(self, conn: Connection, table: Table | None, change: Change) -> None:
        self.conn = conn
        self.table = table
        self.change = change
        self.conflicts: list[Conflict] = []
        self.applied = 0  # statements run (each changes one row: one captured event)

    def conflict(self, kind: str, column: str | None, message: str) -> None:
        c = self.change
        self.conflicts.append(Conflict(kind, c.id, c.table, c.key, column, message))

    def run(self) -> list[Conflict]:
        change = self.change
        if self.table is None:
            self.conflict("schema", None, f"table {change.table} no longer exists")
            return self.conflicts
        pk = change.pk
        if not pk:
            self.conflict("schema", None, f"event {change.id} does not record the primary key")
            return self.conflicts
        # An update that changed the key: the row is now found under its new key.
        moved = {c: v for c, v in self._recorded("new").items() if c in pk}
        where = self._where(pk, moved if change.op == "update" else None)
        if where is None:
            return self.conflicts
        current = self._current(where)
        if change.op == "update":
            self._undo_update(current, where)
        elif change.op == "delete":
            self._undo_delete(current)
        else:
            self._undo_insert(current, where)
        return self.conflicts

    # -- helpers ---------------------------------------------------------------------------
    def _column(self, name: str) -> Column[Any] | None:
        assert self.table is not None
        column = self.table.c.get(name)
        if column is None:
            self.conflict(
                "schema",
                name,
                f"column {name!r} of {self.change.table} no longer exists "
                "(dropped or renamed since the change)",
            )
        return column

    def _value(self, column: Column[Any], value: Any) -> Any:
        try:
            return from_json(column, value)
        except _Unfit as exc:
            self.conflict("schema", column.name, f"column {column.name!r}: {exc}")
            return _ABSENT

    def _where(self, pk: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Any:
        from sqlalchemy import and_

        terms = []
        for name, value in pk.items():
            column = self._column(name)
            if column is None:
                return None
            recorded = value if overrides is None else overrides.get(name, value)
            converted = self._value(column, recorded)
            if converted is _ABSENT:
                return None
            terms.append(column == converted)
        return and_(*terms)

    def _current(self, where: Any) -> Mapping[str, Any] | None:
        from sqlalchemy import select

        assert self.table is not None
        statement = select(self.table).where(where)
        if self.conn.dialect.name == "postgresql":
            statement = statement.with_for_update()
        row = self.conn.execute(statement).mappings().first()
        return None if row is None else dict(row)

    def _recorded(self, which: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for column, change in self.change.changes.items():
            if isinstance(change, dict) and which in change:
                out[column] = change[which]
            elif change == MASKED:
                out[column] = MASKED
        return out

    def _check_unchanged(self, current: Mapping[str, Any], recorded: Mapping[str, Any]) -> None:
        assert self.table is not None
        for name, value in recorded.items():
            column = self.table.c.get(name)
            if column is None or _redacted(self.change, name, "new", value):
                continue  # nothing to compare with (reported where it matters)
            if not _same(column, current.get(name), value):
                self.conflict(
                    "changed",
                    name,
                    f"{self.change.table} {self.change.key}: column {name!r} changed since "
                    f"(now {_short(current.get(name))}, the change left {_short(value)})",
                )

    def _restorable(self, recorded: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, value in recorded.items():
            column = self._column(name)
            if column is None:
                continue
            if column.computed is not None:
                continue  # generated: the database computes it again
            if _redacted(self.change, name, "old", value):
                self.conflict(
                    "masked",
                    name,
                    f"column {name!r}: its old value was masked or redacted, so the trail "
                    "does not hold it",
                )
                continue
            converted = self._value(column, value)
            if converted is not _ABSENT:
                values[name] = converted
        return values

    def _execute(self, statement: Any) -> None:
        import sqlalchemy

        savepoint = self.conn.begin_nested()
        try:
            self.conn.execute(statement)
        except sqlalchemy.exc.DBAPIError as exc:
            savepoint.rollback()
            kind, column = _classify(exc)
            self.conflict(kind, column, f"{self.change.table} {self.change.key}: {_one_line(exc)}")
        else:
            savepoint.commit()
            self.applied += 1

    # -- the three undos -------------------------------------------------------------------
    def _undo_update(self, current: Mapping[str, Any] | None, where: Any) -> None:
        from sqlalchemy import update

        assert self.table is not None
        values = self._restorable(self._recorded("old"))
        if self.conflicts:
            return
        if current is None:
            self.conflict(
                "missing", None, f"{self.change.table} {self.change.key} no longer exists"
            )
            return
        self._check_unchanged(current, self._recorded("new"))
        if self.conflicts or not values:
            return
        self._execute(update(self.table).where(where).values(values))

    def _undo_delete(self, current: Mapping[str, Any] | None) -> None:
        from sqlalchemy import insert

        assert self.table is not None
        values = self._restorable(self._recorded("old"))
        for column in self.table.columns:
            if column.name in values or column.computed is not None:
                continue
            if column.name in self.change.changes:
                continue  # reported by _restorable
            has_default = (
                column.server_default is not None
                or column.default is not None
                or column.identity is not None
            )
            if not column.nullable and not has_default:
                self.conflict(
                    "schema",
                    column.name,
                    f"column {column.name!r} of {self.change.table} is NOT NULL without a "
                    "default and the recorded row has no value for it (added since the "
                    "change, or excluded from capture)",
                )
            else:
                self.conflict(
                    "schema",
                    column.name,
                    f"column {column.name!r} of {self.change.table} is not in the recorded "
                    "row (added since the change, or excluded from capture): re-creating "
                    "the row would not restore it",
                )
        if self.conflicts:
            return
        if current is not None:
            self.conflict("exists", None, f"{self.change.table} {self.change.key} exists again")
            return
        statement = insert(self.table).values(values)
        if self.conn.dialect.name == "postgresql" and any(
            c.identity is not None and c.identity.always and c.name in values
            for c in self.table.columns
        ):
            statement = _overriding(self.conn, self.table, values)
        self._execute(statement)

    def _undo_insert(self, current: Mapping[str, Any] | None, where: Any) -> None:
        from sqlalchemy import delete

        assert self.table is not None
        if current is None:
            self.conflict(
                "missing", None, f"{self.change.table} {self.change.key} no longer exists"
            )
            return
        self._check_unchanged(current, self._recorded("new"))
        if self.conflicts:
            return
        self._execute(delete(self.table).where(where))


def _overriding(conn: Connection, table: Table, values: Mapping[str, Any]) -> Any:
    """INSERT ... OVERRIDING SYSTEM VALUE, for GENERATED ALWAYS identity columns."""
    from sqlalchemy import bindparam, text

    quote = conn.dialect.identifier_preparer.quote
    names = list(values)
    binds = [bindparam(f"v{i}", values[n], type_=table.c[n].type) for i, n in enumerate(names)]
    target = (quote(table.schema) + "." if table.schema else "") + quote(table.name)
    columns = ", ".join(quote(n) for n in names)
    placeholders = ", ".join(f":v{i}" for i in range(len(names)))
    return text(
        f"INSERT INTO {target} ({columns}) OVERRIDING SYSTEM VALUE VALUES ({placeholders})"
    ).bindparams(*binds)


def _classify(exc: Exception) -> tuple[str, str | None]:
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None)
    diag = getattr(orig, "diag", None)
    column = getattr(diag, "column_name", None) if diag is not None else None
    text = str(orig if orig is not None else exc)
    if state == "23505" or "UNIQUE constraint failed" in text:
        return "unique", column or _sqlite_column(text)
    if state == "23503" or "FOREIGN KEY constraint failed" in text:
        return "foreign_key", column
    if state == "23502" or "NOT NULL constraint failed" in text:
        return "not_null", column or _sqlite_column(text)
    if state == "23514" or "CHECK constraint failed" in text:
        return "check", column
    if state is not None and state.startswith("22"):
        return "schema", column
    return "error", column


def _sqlite_column(text: str) -> str | None:
    _, sep, rest = text.partition("failed: ")
    if not sep:
        return None
    first = rest.split(",")[0].strip()
    return first.rpartition(".")[2] or None


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return " ".join(text.split())[:300]


def _short(value: Any) -> str:
    text = repr(_jsonish(value))
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------
# The transaction


@contextmanager
def _transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction of the application database, rolled back unless committed inside.

    On SQLite the driver's own transaction handling is switched off for the duration
    (pysqlite starts transactions late and breaks SAVEPOINT): ``BEGIN IMMEDIATE`` takes the
    write lock first, so nothing changes between a check and its write.
    """
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        raw = conn.connection.dbapi_connection if sqlite else None
        saved = getattr(raw, "isolation_level", None)
        try:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()
                raw.isolation_level = None  # type: ignore[union-attr]
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.begin()
                conn.exec_driver_sql("SET CONSTRAINTS ALL IMMEDIATE")
                _send_context(conn)
            yield conn
        finally:
            if conn.in_transaction():
                conn.rollback()
            if sqlite and raw is not None:
                raw.isolation_level = saved


def _send_context(conn: Connection) -> None:
    """PostgreSQL capture triggers read the audit context from a transaction-local
    setting: send it (with ``reverts``) even when the engine is not instrumented."""
    from sqlalchemy import text

    try:
        from sealtrail.capture.pg import context_json
    except ImportError:  # pragma: no cover - psycopg missing: no trigger capture either
        return
    conn.execute(
        text("SELECT pg_catalog.set_config('sealtrail.context', :c, true)"),
        {"c": context_json() or ""},
    )


class _CaptureWatch:
    """The revert is a change like any other: it must be captured (I9). Where capture is
    done by :mod:`sealtrail.capture.orm` (an outbox with its SQLite guard), the events the
    revert's statements produced are counted before the commit, and a revert whose changes
    were not captured (run through an engine capture does not watch) is refused.

    PostgreSQL triggers capture every client, and the application role may not read the
    outbox there: nothing to check."""

    def __init__(self, conn: Connection) -> None:
        from sqlalchemy import text

        self.conn = conn
        self.start: int | None = None
        if conn.dialect.name != "sqlite":
            return
        guarded = conn.execute(
            text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :n"),
            {"n": "sealtrail_outbox_relay"},
        ).first()
        if guarded is not None:
            self.start = self._top()

    def _top(self) -> int:
        from sqlalchemy import text

        top = self.conn.execute(text("SELECT max(id) FROM sealtrail_outbox")).scalar()
        return int(top or 0)

    def check(self, applied: int) -> None:
        if self.start is None or not applied:
            return
        # BEGIN IMMEDIATE holds the write lock: every new outbox row is this revert's.
        captured = self._top() - self.start
        if captured < applied:
            raise NotCaptured(
                f"the revert's {applied} changes produced {captured} captured events, so it "
                "was rolled back: run it through the engine that sealtrail.capture.orm "
                "tracks, with the table tracked by name (Track.of(...)): revert reflects the "
                "table, so a Table or model given to track() is not the one it writes"
            )


def _reflect(conn: Connection, name: str, cache: dict[str, Table | None]) -> Table | None:
    from sqlalchemy import MetaData, Table
    from sqlalchemy.exc import NoSuchTableError

    if name not in cache:
        schema, table = _split(name)
        if conn.dialect.name == "sqlite" and schema == "main":
            schema = None
        try:
            cache[name] = Table(table, MetaData(), schema=schema, autoload_with=conn)
        except NoSuchTableError:
            cache[name] = None
    return cache[name]


def revert(
    app_db: str | Engine,
    ledger: Ledger | Trail,
    ref: str,
    *,
    dry_run: bool = False,
    since: str | None = None,
    reason: str | None = None,
) -> RevertResult:
    """Undo the change (event id) or transaction (transaction id) ``ref``.

    Raises :class:`RevertError` when a conflict prevents it (nothing is changed), and
    :class:`~sealtrail.NotFound` when the trail holds no such change. ``dry_run`` checks
    everything the same way, returns the conflicts and rolls back. The revert's own changes
    are captured with ``data.db.reverts = ref`` and ``reason``.
    """
    changes = find_changes(ledger, ref, since=since)
    engine = open_app_db(app_db)
    owned = engine is not app_db
    result = RevertResult(ref=ref, dry_run=dry_run)
    try:
        with context(reverts=ref, reason=reason), _transaction(engine) as conn:
            import sqlalchemy

            cache: dict[str, Table | None] = {}
            try:
                with app_errors(engine, "revert"):
                    watch = _CaptureWatch(conn)
                    applied = 0
                    for change in reversed(changes):
                        table = _reflect(conn, change.table, cache)
                        step = _Step(conn, table, change)
                        result.conflicts.extend(step.run())
                        applied += step.applied
                        result.undone.append(change.id)
                    if result.conflicts or dry_run:
                        conn.rollback()
                    else:
                        watch.check(applied)
                        conn.commit()
                        result.applied = True
            except sqlalchemy.exc.SQLAlchemyError as exc:  # pragma: no cover - app_errors
                raise RevertError(_one_line(exc)) from exc
    finally:
        if owned:
            engine.dispose()
    if result.conflicts and not dry_run:
        first = result.conflicts[0].message
        more = len(result.conflicts) - 1
        raise RevertError(
            f"cannot revert {ref}: {first}" + (f" (and {more} more conflicts)" if more else ""),
            result.conflicts,
        )
    return result
