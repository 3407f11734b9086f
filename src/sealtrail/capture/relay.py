"""The relay: ships the outbox of an application's database to the ledger.

Capture (:mod:`sealtrail.capture.pg`, :mod:`sealtrail.capture.orm`) writes every change as an
event into ``sealtrail_outbox`` in the same transaction as the change (I9). The relay reads
that table in commit order, runs the trail's processors over each event (the default
:class:`~sealtrail.redact.Redactor`; *not* the relay's own audit context: a captured event
already carries the actor of the request that made the change), appends the batch to the
ledger in one durable transaction, and only then deletes the rows it shipped::

    relay = Relay("postgresql://relay@db/app", trail)   # or a Ledger, or an Engine
    relay.start()                                        # background thread
    ...
    relay.stop()

or ``sealtrail relay --from postgresql://relay@db/app`` as its own process.

Guarantees (DESIGN.md I1, I10):

* **At least once, stored exactly once.** Rows are deleted after the ledger committed, in
  one transaction of the application database; a relay killed in between ships the same
  rows again, and the ledger answers an event id it already holds with the original receipt
  instead of storing it twice. Processors that are not deterministic (encryption for a data
  subject draws a random nonce) make the second copy differ from the first; the relay then
  recognises the same captured change (same id, action, time, target, transaction) and
  keeps the stored one.
* **Commit order.** PostgreSQL: ``ORDER BY commit_seq, id`` over the outbox joined with
  ``sealtrail_outbox_commit``; rows of a transaction with no commit row yet are not shipped.
  SQLite: ``id`` order (one writer at a time, so ids are assigned in commit order).
* **Nothing is lost when a part is down.** The background loop retries with exponential
  backoff and full jitter; until the ledger acknowledges, rows stay in the outbox.
* **A bad row neither blocks the relay nor disappears silently.** A row that is not JSON,
  whose event the envelope refuses, or that a processor cannot handle, is recorded in the
  ledger as a ``sealtrail.relay.rejected`` event carrying the reason, the row's id, event id,
  transaction id, the SHA-256 and size of the raw bytes, and the content itself (parsed, so
  key-name redaction rules still apply, or as text, truncated), then removed from the
  outbox like any shipped row. Its id is derived from the row, so re-shipping it after a
  crash stores it once too.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as _dt
import hashlib
import logging
import math
import os
import queue
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

import orjson

from sealtrail._exceptions import (
    ConflictError,
    InvalidEvent,
    NotFound,
    StorageError,
)
from sealtrail._gc import gc_paused
from sealtrail._metrics import exposition
from sealtrail.canonical import canonicalize, canonicalize_prepared, decode
from sealtrail.capture.change import OUTBOX_COMMIT_TABLE, OUTBOX_TABLE
from sealtrail.event import (
    DEFAULT_LIMITS,
    Limits,
    check_size,
    prepare_event,
    prepare_unencoded,
)
from sealtrail.ledger import INLINE_INDEX_MAX, AppendResult, Ledger, entry_event

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from sealtrail.trail import Trail

__all__ = [
    "DEFAULT_BATCH",
    "REJECTED_ACTION",
    "Processor",
    "Relay",
    "RelayStats",
    "open_app_db",
]

Processor = Callable[[dict[str, Any]], dict[str, Any]]

#: The action of the event recording an outbox row the relay could not ship as it was.
REJECTED_ACTION: Final = "sealtrail.relay.rejected"
#: Who records rejections.
RELAY_ACTOR: Final = {"id": "system:sealtrail-relay", "type": "system"}
#: Rows per ledger transaction: large enough that the commit (an fsync) is amortised, small
#: enough that a retry after a crash re-ships little.
DEFAULT_BATCH: Final = 2000
#: Rows per ordered read of a PostgreSQL outbox (streamed in batches).
WINDOW: Final = 100_000
#: A raw row is quoted in a rejection up to this many characters.
RAW_QUOTE_MAX: Final = 8192

log = logging.getLogger("sealtrail.relay")

_EPOCH: Final = "1970-01-01T00:00:00.000000Z"
_MAX_KEY: Final = (2**63 - 1, 2**63 - 1)


# --------------------------------------------------------------------------------------
# The application's database


def open_app_db(target: str | Engine) -> Engine:
    """An SQLAlchemy engine for an application database given as an engine, a URL
    (``postgresql://...`` uses psycopg 3; ``sqlite:///app.db``) or a SQLite file path."""
    try:
        import sqlalchemy
        from sqlalchemy.engine import Engine
    except ImportError as exc:  # pragma: no cover - the sqlalchemy extra
        raise StorageError(
            "database capture needs SQLAlchemy: pip install 'sealtrail[sqlalchemy]'"
        ) from exc
    if isinstance(target, Engine):
        return target
    url = str(target)
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    elif "://" not in url:
        url = f"sqlite:///{url}"
    try:
        if url.startswith("sqlite"):
            engine = sqlalchemy.create_engine(url, connect_args={"timeout": 30})
            sqlalchemy.event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = sqlalchemy.create_engine(url, pool_pre_ping=True)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise StorageError(f"cannot open the application database: {_one_line(exc)}") from None
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def safe_url(engine: Engine) -> str:
    """The engine's URL without its password, for messages."""
    return engine.url.render_as_string(hide_password=True)


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return " ".join(text.split())[:500] or type(exc).__name__


@contextlib.contextmanager
def app_errors(engine: Engine, doing: str) -> Iterator[None]:
    """SQLAlchemy and driver errors as :class:`StorageError` (no password in the text)."""
    import sqlalchemy

    driver_error: Any = getattr(engine.dialect.loaded_dbapi, "Error", sqlalchemy.exc.DBAPIError)
    try:
        yield
    except (sqlalchemy.exc.SQLAlchemyError, driver_error) as exc:
        raise StorageError(
            f"application database {safe_url(engine)}: cannot {doing}: {_one_line(exc)}"
        ) from exc


# --------------------------------------------------------------------------------------
# The outbox


class OutboxRow(NamedTuple):
    """One outbox row as read: ``raw`` is the event's JSON as the database holds it;
    ``parsed`` says the database already checked it (``jsonb`` or ``json``), so the
    relay need not look for repeated keys; ``created_at`` is the database's text (made
    RFC 3339 only when a rejection records it). (A tuple: rows travel to worker
    processes.)"""

    id: int
    raw: bytes
    event_id: str | None
    txid: str | None
    created_at: str | None
    key: tuple[int, int]
    parsed: bool = False


class _Outbox(abc.ABC):
    """Reading and acknowledging the outbox of one database dialect (PostgreSQL, SQLite)."""

    def __init__(self, engine: Engine, schema: str | None) -> None:
        self.engine = engine
        prep = engine.dialect.identifier_preparer
        prefix = f"{prep.quote_schema(schema)}." if schema else ""
        self.table = prefix + prep.quote(OUTBOX_TABLE)
        self.commit_table = prefix + prep.quote(OUTBOX_COMMIT_TABLE)

    @abc.abstractmethod
    def stream(self, upto: tuple[int, int], batch: int) -> Generator[list[OutboxRow], None, None]:
        """Batches of rows in commit order, up to the key ``upto``."""

    @abc.abstractmethod
    def bound(self, conn: Connection) -> tuple[int, int] | None:
        """The largest key shipped so far could reach now (None: the outbox is empty)."""

    @abc.abstractmethod
    def acknowledge(self, conn: Connection, rows: Sequence[OutboxRow]) -> None:
        """Delete the shipped ``rows`` (and commit rows left empty), in ``conn``'s
        transaction."""

    def count(self, conn: Connection) -> int:
        from sqlalchemy import text

        return int(conn.execute(text(f"SELECT count(*) FROM {self.table}")).scalar_one())

    def oldest_age(self, conn: Connection) -> float | None:
        """Seconds since the oldest waiting row was queued (its ``created_at``; the lowest
        id, read through the key), None when nothing waits."""
        from sqlalchemy import text

        queued = conn.execute(
            text(f"SELECT created_at FROM {self.table} ORDER BY id LIMIT 1")
        ).scalar()
        if queued is None:
            return None
        if isinstance(queued, str):  # SQLite: the text the outbox or ORM capture wrote
            queued = _dt.datetime.fromisoformat(queued)
        if queued.tzinfo is None:
            queued = queued.replace(tzinfo=_dt.UTC)
        return max(0.0, (_dt.datetime.now(_dt.UTC) - queued).total_seconds())


class _PostgresOutbox(_Outbox):
    def stream(self, upto: tuple[int, int], batch: int) -> Generator[list[OutboxRow], None, None]:
        """Commit order is read once per :data:`WINDOW` rows, as keys only (sorting whole
        events, or sorting once per batch, cost more than shipping them), then each batch
        of events is fetched by primary key: by id range when the batch's ids are
        consecutive (one bulk statement's rows usually are), else by an id array. The
        keys' snapshot is a prefix of commit order (commit_seq is drawn under a lock held
        until commit), so the next window starts after the last key of this one.

        Only what every row needs is read and converted: ``created_at`` stays the
        server's text, the column's type (jsonb or json) is looked up once."""
        window = max(WINDOW, batch)
        table = self.table
        order = (
            f"SELECT o.id, c.commit_seq FROM {table} o JOIN {self.commit_table} c "
            "ON c.txid = o.txid WHERE c.commit_seq <= %(upto)s AND c.commit_seq >= %(seq)s "
            "AND (c.commit_seq, o.id) > (%(seq)s, %(id)s) "
            "ORDER BY c.commit_seq, o.id LIMIT %(n)s"
        )
        after = (-1, -1)
        with self.engine.connect() as conn:
            # The driver's cursor: SQLAlchemy's result layer cost as much per row as the
            # rest of the read.
            raw = conn.connection.dbapi_connection
            assert raw is not None
            cursor = raw.cursor()
            try:
                # jsonb is parsed by the server, one value per key. json (the outbox's
                # type since session 4: the application's transaction no longer pays for
                # building jsonb) holds the capture functions' own text, checked as JSON
                # at insert; only they and the outbox's owner can write it (grant_app), and
                # a key repeated by another writer resolves as jsonb would resolve it, to
                # the last value (orjson's rule too). Other types: parsed strictly.
                cursor.execute(
                    "SELECT atttypid IN ('jsonb'::regtype, 'json'::regtype) FROM pg_attribute "
                    "WHERE attrelid = %(t)s::regclass AND attname = 'event'",
                    {"t": table},
                )
                found = cursor.fetchone()
                parsed = bool(found and found[0])
                raw.rollback()
                while True:
                    # The window's sort in memory, not in temporary files (about 80 bytes
                    # a key; the default work_mem of 4 MB spilled it to disk). No nested
                    # loop: the outbox tables' statistics are stale by nature (a queue,
                    # analyzed while nearly empty, then a burst), and with both sides
                    # estimated at one row the planner joined them in a nested loop whose
                    # join filter compared every outbox row with every commit row.
                    cursor.execute(
                        f"SET LOCAL work_mem = '{min(64, max(16, window // 6000))}MB'; "
                        "SET LOCAL enable_nestloop = off"
                    )
                    cursor.execute(
                        order, {"upto": upto[0], "seq": after[0], "id": after[1], "n": window}
                    )
                    keys = cast(list[tuple[int, int]], cursor.fetchall())
                    raw.rollback()
                    for start in range(0, len(keys), batch):
                        rows = self._read_batch(cursor, keys[start : start + batch], parsed)
                        raw.rollback()
                        if rows:
                            yield rows
                    if len(keys) < window:
                        return
                    last_id, last_seq = keys[-1]  # keys are (id, commit_seq)
                    after = (last_seq, last_id)
            finally:
                cursor.close()
                raw.rollback()

    def _read_batch(
        self, cursor: Any, keys: list[tuple[int, int]], parsed: bool
    ) -> list[OutboxRow]:
        """The rows of ``keys`` (in that order), but those deleted meanwhile by another
        relay. Consecutive ids (in order) are read as a range, which needs no array."""
        columns = "o.id, o.event::text, o.event_id::text, o.txid::text, o.created_at::text"
        ids = [k[0] for k in keys]
        lo = ids[0]
        if ids == list(range(lo, lo + len(ids))):
            cursor.execute(
                f"SELECT {columns} FROM {self.table} o WHERE o.id BETWEEN %(lo)s AND %(hi)s "
                "ORDER BY o.id",
                {"lo": lo, "hi": ids[-1]},
            )
            seqs = [k[1] for k in keys]
            return [
                OutboxRow(rid, _utf8(text), eid, txid, created, (seqs[rid - lo], rid), parsed)
                for rid, text, eid, txid, created in cursor.fetchall()
            ]
        cursor.execute(
            f"SELECT {columns} FROM {self.table} o WHERE o.id = ANY(%(ids)s::bigint[])",
            {"ids": _id_array(ids)},
        )
        got = {r[0]: r for r in cursor.fetchall()}
        rows = []
        for rid, seq in keys:
            row = got.get(rid)
            if row is not None:
                _, text, eid, txid, created = row
                rows.append(OutboxRow(rid, _utf8(text), eid, txid, created, (seq, rid), parsed))
        return rows

    def bound(self, conn: Connection) -> tuple[int, int] | None:
        from sqlalchemy import text

        top = conn.execute(text(f"SELECT max(commit_seq) FROM {self.commit_table}")).scalar()
        return None if top is None else (int(top), _MAX_KEY[1])

    def acknowledge(self, conn: Connection, rows: Sequence[OutboxRow]) -> None:
        """Delete the rows (by id range when their ids are consecutive) and the commit rows
        of the transactions whose last rows these were, in the caller's transaction."""
        from sqlalchemy import text

        ids = [r.id for r in rows]
        if not ids:
            return
        lo, hi = min(ids), max(ids)
        txids = sorted({r.txid for r in rows if r.txid is not None})
        if hi - lo == len(ids) - 1:  # ids are unique: exactly lo..hi
            conn.execute(
                text(f"DELETE FROM {self.table} WHERE id BETWEEN :lo AND :hi"),
                {"lo": lo, "hi": hi},
            )
        else:
            conn.execute(
                text(f"DELETE FROM {self.table} WHERE id = ANY(CAST(:ids AS bigint[]))"),
                {"ids": _id_array(ids)},
            )
        # A transaction's commit row goes with its last outbox row. The remaining row is
        # looked for from the highest id down (the (txid, id) index backwards): rows are
        # deleted in id order, so the dead entries of a large transaction's shipped rows
        # sit at the low end; a NOT EXISTS scanned past all of them, batch after batch.
        conn.execute(
            text(
                f"DELETE FROM {self.commit_table} c WHERE c.txid = ANY(:txids) "
                f"AND (SELECT o.id FROM {self.table} o WHERE o.txid = c.txid "
                "ORDER BY o.txid DESC, o.id DESC LIMIT 1) IS NULL"
            ),
            {"txids": txids},
        )


def _id_array(ids: Sequence[int]) -> str:
    """A bigint[] literal: psycopg adapts a list of ints element by element in Python,
    which cost a tenth of the read."""
    return "{" + ",".join(map(str, ids)) + "}"


class _SQLiteOutbox(_Outbox):
    #: SQLite has no roles: an outbox made by :mod:`sealtrail.capture.orm` refuses DELETE
    #: unless the one row of this table says the relay is at work, in its own transaction.
    GUARD = "sealtrail_outbox_relay"

    def __init__(self, engine: Engine, schema: str | None) -> None:
        super().__init__(engine, schema)
        prep = engine.dialect.identifier_preparer
        prefix = f"{prep.quote_schema(schema)}." if schema else ""
        self.guard = prefix + prep.quote(self.GUARD)
        self._guarded = False

    def stream(self, upto: tuple[int, int], batch: int) -> Generator[list[OutboxRow], None, None]:
        """Batches of rows in commit order, up to ``upto``, each read by its own keyset
        query (a short read: on SQLite a long one would block the deletes). Each batch
        starts after the last key of the one before, so rows not yet deleted (the relay
        reads ahead while it appends) are never read twice."""
        after = (-1, -1)
        while True:
            with self.engine.connect() as conn:
                rows = self.fetch(conn, after, upto, batch)
                conn.rollback()
            if not rows:
                return
            yield rows
            after = rows[-1].key

    def fetch(
        self, conn: Connection, after: tuple[int, int], upto: tuple[int, int], limit: int
    ) -> list[OutboxRow]:
        from sqlalchemy import text

        result = conn.execute(
            text(
                "SELECT id, CAST(event AS BLOB), event_id, txid, created_at "
                f"FROM {self.table} WHERE id > :id AND id <= :upto ORDER BY id LIMIT :n"
            ),
            {"id": after[1], "upto": upto[1], "n": limit},
        )
        return [
            OutboxRow(
                int(rid), _as_bytes(raw), _text(eid), _text(txid), _time_text(created), (0, rid)
            )
            for rid, raw, eid, txid, created in result
        ]

    def bound(self, conn: Connection) -> tuple[int, int] | None:
        from sqlalchemy import text

        top = conn.execute(text(f"SELECT max(id) FROM {self.table}")).scalar()
        return None if top is None else (0, int(top))

    def acknowledge(self, conn: Connection, rows: Sequence[OutboxRow]) -> None:
        from sqlalchemy import text

        if not self._guarded:
            self._guarded = (
                conn.execute(
                    text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :n"),
                    {"n": self.GUARD},
                ).first()
                is not None
            )
        if self._guarded:
            conn.execute(text(f"UPDATE {self.guard} SET active = 1 WHERE id = 1"))
        conn.execute(
            text(f"DELETE FROM {self.table} WHERE id IN (SELECT value FROM json_each(:ids))"),
            {"ids": orjson.dumps([r.id for r in rows]).decode()},
        )
        if self._guarded:
            conn.execute(text(f"UPDATE {self.guard} SET active = 0 WHERE id = 1"))


def _outbox_for(engine: Engine, schema: str | None) -> _Outbox:
    name = engine.dialect.name
    if name == "postgresql":
        return _PostgresOutbox(engine, schema)
    if name == "sqlite":
        return _SQLiteOutbox(engine, schema)
    raise StorageError(f"the relay reads PostgreSQL and SQLite outboxes, not {name}")


def _utf8(value: object) -> bytes:
    """The event text of a row as bytes (the common case first)."""
    return value.encode() if type(value) is str else _as_bytes(value)


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return b"" if value is None else str(value).encode("utf-8", "replace")


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


_PG_TIME = re.compile(r"(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d(?:\.\d+)?)([+-]\d\d)(:?\d\d)?")


def _time_text(value: object) -> str | None:
    """A row's ``created_at`` as RFC 3339 text (PostgreSQL prints ``2026-11-22
    10:00:00.5+00``)."""
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(_dt.UTC)
        return value.isoformat()
    text = _text(value)
    if text is not None:
        match = _PG_TIME.fullmatch(text)
        if match is not None:
            day, clock, hours, minutes = match.groups()
            return f"{day}T{clock}{hours}:{(minutes or '00').lstrip(':')}"
    return text


# --------------------------------------------------------------------------------------
# From a row to the event the ledger stores


class _Rejected(Exception):
    """A row the relay cannot ship as it is (internal signal)."""


class Preparer:
    """Turns outbox rows into prepared events: parse strictly, check the id, run the
    processors, validate (:func:`~sealtrail.event.prepare_event`). Pure: no I/O."""

    def __init__(
        self, processors: Sequence[Processor], limits: Limits = DEFAULT_LIMITS, source: str = ""
    ) -> None:
        self.processors = list(processors)
        self.limits = limits
        self.source = source

    def prepare(
        self, rows: Sequence[OutboxRow], validate: bool = True
    ) -> list[tuple[dict[str, Any], bool]]:
        """``(event, rejected)`` per row, in order. With ``validate=False`` the events are
        processed but not validated: the caller has the ledger validate them (its compiled
        fast path for bulk appends) and validates one by one only if that fails."""
        out: list[tuple[dict[str, Any], bool]] = []
        with gc_paused():  # thousands of acyclic dicts: no collection needed meanwhile
            for row in rows:
                try:
                    out.append((self.event(row, validate), False))
                except _Rejected as exc:
                    out.append((self.rejection(row, str(exc)), True))
        return out

    def event(self, row: OutboxRow, validate: bool = True) -> dict[str, Any]:
        limit = 4 * self.limits.max_bytes
        try:
            if row.parsed and len(row.raw) <= limit:
                # jsonb text: valid, one value per key; prepare_event checks the rest.
                event = orjson.loads(row.raw)
            else:
                event = decode(row.raw, max_bytes=limit, max_depth=self.limits.max_depth)
        except (InvalidEvent, orjson.JSONDecodeError) as exc:
            raise _Rejected(f"the outbox row is not an acceptable JSON event: {exc}") from None
        if not isinstance(event, dict):
            raise _Rejected("the outbox row's event is not a JSON object")
        eid = event.get("id")
        if eid is None:
            raise _Rejected("the event has no id")
        if row.event_id is not None and str(eid).lower() != row.event_id.strip().lower():
            raise _Rejected("the event's id differs from the outbox row's event_id")
        if event.get("time") is None:
            raise _Rejected("the event has no time")
        try:
            for processor in self.processors:
                event = processor(event)
            if not validate:
                return event  # type: ignore[no-any-return]  # a processor's dict
            # Validated once, here, without the copy and the canonical encoding of
            # prepare_event (the dict is ours): the ledger encodes each event anyway, with
            # its own member added, and refuses what is over the size limit or cannot be
            # encoded (integers beyond 2**53); the relay then finds that row with
            # :meth:`encoding_problem` and records it (see ``Relay._deliver``).
            return prepare_unencoded(event, limits=self.limits)
        except InvalidEvent as exc:
            raise _Rejected(f"the event is refused: {exc}") from None
        except Exception as exc:
            raise _Rejected(f"a processor failed: {type(exc).__name__}: {exc}") from None

    def encoding_problem(self, event: dict[str, Any]) -> str | None:
        """Why the ledger would refuse a prepared event (its canonical encoding fails or is
        over the size limit), as a rejection reason; None if it would not."""
        try:
            check_size(len(canonicalize_prepared(event)), self.limits)
        except InvalidEvent as exc:
            return f"the event is refused: {exc}"
        return None

    # -- rejections ----------------------------------------------------------------------
    def rejection(self, row: OutboxRow, reason: str, salt: str = "") -> dict[str, Any]:
        """The ``sealtrail.relay.rejected`` event recording ``row``, with as much of its
        content as can be kept: parsed (redaction rules by key name still apply), else as
        text, else only its hash. Deterministic, so a re-shipped row dedupes."""
        created = _time_text(row.created_at)
        outbox: dict[str, Any] = {
            "table": OUTBOX_TABLE,
            "row": row.id,
            "event_id": _clip(row.event_id, 200),
            "txid": _clip(row.txid, 200),
            "created_at": _clip(created, 100),
            "sha256": hashlib.sha256(row.raw).hexdigest(),
            "bytes": len(row.raw),
        }
        seed = b"\x00".join(
            [
                b"sealtrail.relay.rejected",
                salt.encode(),
                self.source.encode("utf-8", "replace"),
                str(row.id).encode(),
                (created or "").encode("utf-8", "replace"),
                row.raw,
            ]
        )
        base: dict[str, Any] = {
            "id": _derived_id(seed),
            "time": _normal_time(created),
            "action": REJECTED_ACTION,
            "outcome": "error",
            "actor": dict(RELAY_ACTOR),
        }
        relay = {"source": self.source, "reason": _clip(reason, 2000)}
        for content in self._contents(row):
            event = {**base, "data": {"relay": relay, "outbox": {**outbox, **content}}}
            try:
                for processor in self.processors:
                    event = processor(event)
                # The relay's own facts about the row are not the row's content: a
                # detector must not mask the hash that identifies it (it looks random).
                kept = event.get("data", {}).get("outbox")
                if isinstance(kept, dict):
                    kept.update({k: outbox[k] for k in ("table", "row", "sha256", "bytes")})
                return prepare_event(event, limits=self.limits)
            except Exception:
                continue
        # Nothing of the content could be kept (a processor refuses it): the reason text
        # may quote a value, so only its first words are kept, with no processor run.
        short = reason.split(":", 1)[0][:200]
        event = {**base, "data": {"relay": {"source": self.source, "reason": short}}}
        event["data"]["outbox"] = outbox
        return prepare_event(event, limits=self.limits)

    def _contents(self, row: OutboxRow) -> Iterator[dict[str, Any]]:
        try:
            parsed = orjson.loads(row.raw)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict | list):
            yield {"event": _json_safe(parsed, 1)}
        text = row.raw.decode("utf-8", "replace")
        if len(text) > RAW_QUOTE_MAX:
            yield {"raw": text[:RAW_QUOTE_MAX], "truncated": True}
        else:
            yield {"raw": text}
        if len(text) > 1024:
            yield {"raw": text[:1024], "truncated": True}


# Worker processes (``Relay(workers=n)``): forked, so they inherit the processors as they
# are (a Redactor holds compiled RE2 sets, which do not pickle). Rows go in as tuples,
# prepared events come back pickled (unpickling them measured faster than parsing JSON).
_WORKER_PREPARER: Preparer | None = None


def _worker_prepare(rows: list[OutboxRow]) -> list[tuple[dict[str, Any], bool]]:
    assert _WORKER_PREPARER is not None
    return _WORKER_PREPARER.prepare(rows)


def _noop() -> None:
    return None


def _worker_start(parent: int) -> None:
    """In each worker: exit as soon as the relay process is gone (killed, even with
    SIGKILL), instead of waiting forever on a queue whose other end it holds itself."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch, name="sealtrail-relay-parent", daemon=True).start()


class _Done:
    """A result computed in this process, shaped like a Future."""

    __slots__ = ("validated", "value")

    def __init__(self, value: list[tuple[dict[str, Any], bool]], validated: bool = True) -> None:
        self.value = value
        self.validated = validated

    def result(self) -> list[tuple[dict[str, Any], bool]]:
        return self.value


def _clip(value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    return value if len(value) <= limit else value[:limit]


def _derived_id(seed: bytes) -> str:
    """A UUIDv8 (RFC 9562) from a hash: the same row always gets the same id."""
    raw = bytearray(hashlib.sha256(seed).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(raw)))


def _normal_time(text: str | None) -> str:
    if text:
        try:
            return str(prepare_event({"action": "x.y", "time": text})["time"])
        except InvalidEvent:
            pass
    return _EPOCH


def _json_safe(value: Any, depth: int) -> Any:
    """Leniently parsed JSON as values the envelope accepts (no floats, bounded depth)."""
    if depth > 24:
        return "[nested too deep]"
    if isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v, depth + 1) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -(2**53) < value < 2**53 else str(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _origin(event: Mapping[str, Any]) -> tuple[object, ...]:
    """What identifies a captured change whatever a processor did to its values."""
    data = event.get("data")
    data = data if isinstance(data, dict) else {}
    db = data.get("db")
    outbox = data.get("outbox")
    target = event.get("target")
    return (
        event.get("action"),
        event.get("time"),
        target.get("type") if isinstance(target, dict) else None,
        db.get("txid") if isinstance(db, dict) else None,
        outbox.get("sha256") if isinstance(outbox, dict) else None,
    )


# --------------------------------------------------------------------------------------
# The pipeline: reading ahead and deleting behind, each in a thread of its own. psycopg and
# sqlite3 release the GIL while they wait, so the database's work (converting jsonb to
# text, deleting rows) overlaps with the relay's own (parsing, redacting, appending).


class _Failed(NamedTuple):
    error: BaseException


_END: Final = object()
#: Batches read ahead of the one being appended.
READ_AHEAD: Final = 2
#: Shipped batches whose delete may still be running before the relay waits for it.
DELETE_BEHIND: Final = 2


def _read_ahead(
    make: Callable[[], Generator[list[OutboxRow], None, None]], depth: int
) -> Generator[list[OutboxRow], None, None]:
    """The batches of ``make()``, produced by a reader thread up to ``depth`` batches
    ahead, in order. The reader's connection is used in its thread only; an error there is
    raised here; closing this generator stops the reader and waits for it."""
    ready: queue.Queue[object] = queue.Queue(depth)
    halt = threading.Event()

    def put(item: object) -> bool:
        while not halt.is_set():
            try:
                ready.put(item, timeout=0.05)
            except queue.Full:
                continue
            return True
        return False

    def read() -> None:
        try:
            with contextlib.closing(make()) as batches:
                for rows in batches:
                    if not put(rows):
                        return
        except BaseException as exc:
            put(_Failed(exc))
            return
        put(_END)

    thread = threading.Thread(target=read, name="sealtrail-relay-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        halt.set()
        thread.join()


class _Deleter:
    """Deletes shipped rows from the outbox in a thread of its own, batch after batch in
    order, while the relay appends the next batches. A batch is handed over only after
    the ledger committed it, so the delete-after-commit rule holds; a delete that fails
    (or never runs: the process died) leaves the rows to be shipped again, and the ledger
    answers them as duplicates. At most ``depth`` batches wait; the counters are updated
    as each delete commits. Leaving the ``with`` block waits for every delete and raises
    the first that failed (unless an error is already on its way). With ``threaded``
    false, each delete runs right away in the caller's thread."""

    def __init__(self, relay: Relay, depth: int, threaded: bool = True) -> None:
        self._relay = relay
        self._depth = depth
        self._threaded = threaded
        self._jobs: queue.SimpleQueue[tuple[Future[None], list[OutboxRow]] | None] = (
            queue.SimpleQueue()
        )
        self._waiting: deque[tuple[Future[None], _Tally]] = deque()
        self._thread: threading.Thread | None = None

    def submit(self, rows: list[OutboxRow], tally: _Tally) -> None:
        if not self._threaded:
            self._relay._acknowledge(rows)
            self._relay._count(tally)
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="sealtrail-relay-deleter", daemon=True
            )
            self._thread.start()
        future: Future[None] = Future()
        self._jobs.put((future, rows))
        self._waiting.append((future, tally))
        while self._waiting and (len(self._waiting) > self._depth or self._waiting[0][0].done()):
            future, done = self._waiting.popleft()
            future.result()
            self._relay._count(done)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, rows = job
            try:
                self._relay._acknowledge(rows)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(None)

    def __enter__(self) -> _Deleter:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        error: BaseException | None = None
        try:
            while self._waiting:
                future, done = self._waiting.popleft()
                try:
                    future.result()
                except BaseException as failed:
                    if error is None and exc is not None:
                        log.warning("shipped rows stay in the outbox (shipped again): %s", failed)
                    error = error or failed
                    continue
                self._relay._count(done)
        finally:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
        if error is not None and exc is None:
            raise error


# --------------------------------------------------------------------------------------
# The relay


@dataclass
class RelayStats:
    """Counters since the relay was made. ``shipped``: new ledger entries; ``duplicates``:
    rows the ledger already held (re-shipped after a crash); ``rejected``: rows recorded as
    :data:`REJECTED_ACTION`; ``errors``: failed attempts (each retried)."""

    shipped: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    errors: int = 0
    last_error: str | None = None

    @property
    def acknowledged(self) -> int:
        return self.shipped + self.duplicates

    def to_json(self) -> dict[str, object]:
        return {
            "shipped": self.shipped,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "batches": self.batches,
            "errors": self.errors,
            "last_error": self.last_error,
        }


class _Tally(NamedTuple):
    """What became of a batch's rows (see :class:`RelayStats`)."""

    shipped: int
    duplicates: int
    rejected: int


@dataclass(slots=True)
class _Item:
    row: OutboxRow
    event: dict[str, Any]
    rejected: bool
    skip: bool = False  # the ledger already holds this change (in another form)
    results: list[AppendResult] = field(default_factory=list)


class Relay:
    """Ships one application database's outbox to one ledger.

    ``target`` is a :class:`~sealtrail.trail.Trail` (its processors are used, not its
    context) or a :class:`~sealtrail.ledger.Ledger` (processed by a default
    :class:`~sealtrail.redact.Redactor`); ``processors`` overrides either. ``schema`` is
    where the outbox tables are (default: the connection's search path). The relay closes
    an engine it opened itself, never the ledger.
    """

    def __init__(
        self,
        app_db: str | Engine,
        target: Ledger | Trail,
        *,
        processors: Sequence[Processor] | None = None,
        batch: int = DEFAULT_BATCH,
        poll: float = 0.5,
        backoff: float = 0.2,
        max_backoff: float = 30.0,
        schema: str | None = None,
        source: str | None = None,
        workers: int = 0,
        alert_age: float = 0.0,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if not alert_age >= 0:
            raise ValueError("alert_age must be 0 (off) or a number of seconds")
        if workers < 0:
            raise ValueError("workers must be 0 (prepare in this process) or more")
        self.engine = open_app_db(app_db)
        self._owns_engine = not _is_engine(app_db)
        if isinstance(target, Ledger):
            self.ledger = target
            default: list[Processor] | None = None
        else:
            self.ledger = target.ledger
            default = list(target.processors)
        if processors is not None:
            chain = list(processors)
        elif default is not None:
            chain = default
        else:
            from sealtrail.redact import Redactor

            chain = [Redactor()]
        self.source = source or _source_name(self.engine)
        self.preparer = Preparer(chain, self.ledger.limits, self.source)
        self.batch = batch
        self.poll = poll
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stats = RelayStats()
        self.alert_age = alert_age
        self.alerting = False
        self._alert_checked = -math.inf
        self._outbox = _outbox_for(self.engine, schema)
        # Reading ahead needs a second connection: not with a pool that has only one per
        # thread (an in-memory SQLite database would be another database in the reader).
        self._threads = _pools_connections(self.engine)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.workers = workers if workers and _can_fork() else 0
        self._pool: Any = None
        if self.workers:
            self._pool = self._start_pool()

    # -- shipping --------------------------------------------------------------------------
    def ship(self, upto: tuple[int, int] | None = None) -> int:
        """Ship the next batch (rows with keys up to ``upto``, default all); returns the
        number of outbox rows acknowledged (0: nothing to ship)."""
        with (
            self._lock,
            app_errors(self.engine, "read the outbox"),
            contextlib.closing(self._outbox.stream(upto or _MAX_KEY, self.batch)) as batches,
        ):
            for rows in batches:
                self._ship(rows)
                return len(rows)
        return 0

    def drain(
        self, upto: tuple[int, int] | None = None, stop: threading.Event | None = None
    ) -> int:
        """Ship batch after batch until the outbox holds nothing up to ``upto`` (or
        ``stop`` is set); returns the number of rows acknowledged.

        A pipeline: the next batches are read by a reader thread (and, with worker
        processes, prepared) while this one is appended, and shipped batches are deleted
        by a deleter thread meanwhile. Batches are appended one after the other, in
        commit order, and a batch is deleted only after its append committed. Whatever was
        read ahead when something fails is simply read again next time."""
        done = 0
        ahead: deque[tuple[list[OutboxRow], Any]] = deque()
        with (
            self._lock,
            app_errors(self.engine, "read the outbox"),
            contextlib.closing(self._batches(upto or _MAX_KEY)) as batches,
            _Deleter(self, DELETE_BEHIND, self._threads) as deleter,
        ):
            for rows in batches:
                # The collector stays paused from a batch's events being built until they
                # are appended and dropped: resumed in between, its next collection would
                # walk every event of the batch, all alive (about a tenth of the time).
                with gc_paused():
                    ahead.append((rows, self._submit(rows)))
                    finished = len(ahead) > self.workers
                    if finished:
                        done += self._finish(*ahead.popleft(), deleter)
                if finished and stop is not None and stop.is_set():
                    return done
            while ahead:
                with gc_paused():
                    done += self._finish(*ahead.popleft(), deleter)
        return done

    def _batches(self, upto: tuple[int, int]) -> Generator[list[OutboxRow], None, None]:
        def stream() -> Generator[list[OutboxRow], None, None]:
            return self._outbox.stream(upto, self.batch)

        if self._threads:
            return _read_ahead(stream, READ_AHEAD)
        return stream()

    def _submit(self, rows: list[OutboxRow]) -> Any:
        if self._pool is None:
            # In this process, the ledger validates a bulk batch: its compiled fast path
            # for the common shape costs a fraction of validating each event here. Small
            # batches it validates as this would, with a copy more.
            validate = len(rows) <= INLINE_INDEX_MAX
            return _Done(self.preparer.prepare(rows, validate), validated=validate)
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self._pool.submit(_worker_prepare, rows)
        except BrokenProcessPool:
            log.warning("a relay worker process died; starting new ones")
            self._pool = self._start_pool()
            return _Done(self.preparer.prepare(rows))

    def _finish(self, rows: list[OutboxRow], pending: Any, deleter: _Deleter | None = None) -> int:
        validated = True
        if isinstance(pending, _Done):
            prepared, validated = pending.result(), pending.validated
        else:
            from concurrent.futures.process import BrokenProcessPool

            try:
                prepared = pending.result()
            except BrokenProcessPool:
                log.warning("a relay worker process died; preparing in this process")
                self._pool = self._start_pool()
                prepared = self.preparer.prepare(rows)
        self._ship(rows, prepared, deleter, validated)
        return len(rows)

    def _start_pool(self) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        global _WORKER_PREPARER
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        _WORKER_PREPARER = self.preparer
        pool = ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_worker_start,
            initargs=(os.getpid(),),
        )
        # With fork, every worker starts at the first submit: do it now, from this thread.
        pool.submit(_noop).result()
        return pool

    def _ship(
        self,
        rows: list[OutboxRow],
        prepared: list[tuple[dict[str, Any], bool]] | None = None,
        deleter: _Deleter | None = None,
        validated: bool = True,
    ) -> None:
        if prepared is None:
            prepared = self.preparer.prepare(rows)
        tally = self._deliver(rows, prepared, validated)
        # Only now, the ledger having committed the batch, may its rows leave the outbox.
        if deleter is not None:
            deleter.submit(rows, tally)
        else:
            self._acknowledge(rows)
            self._count(tally)

    def _acknowledge(self, rows: list[OutboxRow]) -> None:
        with (
            app_errors(self.engine, "delete shipped rows from the outbox"),
            self.engine.begin() as conn,
        ):
            self._outbox.acknowledge(conn, rows)

    def _count(self, tally: _Tally) -> None:
        stats = self.stats
        stats.batches += 1
        stats.shipped += tally.shipped
        stats.duplicates += tally.duplicates
        stats.rejected += tally.rejected

    def _deliver(
        self,
        rows: list[OutboxRow],
        prepared: list[tuple[dict[str, Any], bool]],
        validated: bool = True,
    ) -> _Tally:
        """Append the batch in one transaction; on a conflict or a refusal, sort out the
        rows concerned and append the rest, in order. Events not ``validated`` yet are
        validated by the ledger (nothing is stored if one is invalid)."""
        append = self.ledger.append_prepared if validated else self.ledger.append_many
        try:
            results = append([e for e, _ in prepared])
        except (ConflictError, InvalidEvent):
            items = [_Item(r, e, rej) for r, (e, rej) in zip(rows, prepared, strict=True)]
            self._deliver_carefully(items, validated)
            duplicates = sum(1 for i in items if i.skip or (i.results and i.results[0].duplicate))
            rejected = sum(1 for i in items if i.rejected)
        else:
            duplicates = [r.duplicate for r in results].count(True)
            rejected = [rej for _, rej in prepared].count(True)
        return _Tally(len(rows) - duplicates, duplicates, rejected)

    def _deliver_carefully(self, items: list[_Item], validated: bool = True) -> None:
        if not validated:
            # What the preparer would have refused, refused the same way (same reason, same
            # rejection event id), before anything below looks at the events.
            for item in items:
                if not item.rejected:
                    try:
                        item.event = prepare_unencoded(item.event, limits=self.preparer.limits)
                    except InvalidEvent as exc:
                        self._reject(item, f"the event is refused: {exc}", salt="")
        for item in items:
            if not item.rejected:  # a rejection event is encoded and checked already
                # The ledger adds its member for the encoding and removes it after; an
                # encoding that failed left it in place (a reserved name: never an event's).
                item.event.pop("ledger", None)
                reason = self.preparer.encoding_problem(item.event)
                if reason is not None:
                    self._reject(item, reason, salt="")
        seen: dict[str, bytes] = {}
        for item in items:
            eid = str(item.event["id"])
            mine = canonicalize(item.event)
            if eid in seen:
                if seen[eid] != mine:
                    self._reject(item, "another outbox row holds a different event with this id")
                continue
            seen[eid] = mine
            try:
                stored = self.ledger.get(eid)
            except NotFound:
                continue
            if stored.body is None:
                item.skip = True  # shipped before, since pruned
                continue
            before = entry_event(stored.body)
            if canonicalize(before) == mine:
                continue  # the ledger dedupes it
            if _origin(before) == _origin(item.event):
                item.skip = True  # the same change, redacted differently (random nonce)
                log.info("event %s is already stored (index %d); kept as stored", eid, stored.seq)
            else:
                self._reject(item, f"the ledger already holds a different event with id {eid}")
        todo = [i for i in items if not i.skip]
        try:
            results = self.ledger.append_prepared([i.event for i in todo])
        except (ConflictError, InvalidEvent):
            # Whatever is still wrong, find it one event at a time.
            for item in todo:
                try:
                    item.results = self.ledger.append_prepared([item.event])
                except (ConflictError, InvalidEvent) as exc:
                    self._reject(item, f"the ledger refused the event: {exc}")
                    item.results = self.ledger.append_prepared([item.event])
            return
        for item, result in zip(todo, results, strict=True):
            item.results = [result]

    def _reject(self, item: _Item, reason: str, salt: str = "conflict") -> None:
        item.event = self.preparer.rejection(item.row, reason, salt=salt)
        item.rejected = True
        log.warning("outbox row %d rejected: %s", item.row.id, reason)

    # -- loops -----------------------------------------------------------------------------
    def run_once(self) -> RelayStats:
        """Ship every row committed when the call started, then return what was done.
        Errors are raised, not retried (see :meth:`run`)."""
        before = RelayStats(**self.stats.to_json())  # type: ignore[arg-type]
        with app_errors(self.engine, "read the outbox"), self.engine.connect() as conn:
            upto = self._outbox.bound(conn)
            conn.rollback()
        if upto is not None:
            self.drain(upto)
        now = self.stats
        return RelayStats(
            shipped=now.shipped - before.shipped,
            duplicates=now.duplicates - before.duplicates,
            rejected=now.rejected - before.rejected,
            batches=now.batches - before.batches,
            errors=now.errors - before.errors,
            last_error=now.last_error,
        )

    def run(self, stop: threading.Event | None = None) -> None:
        """Ship until ``stop`` (default: :meth:`stop`) is set: poll when the outbox is
        empty, back off with jitter while the ledger or the database is unavailable."""
        stop = stop or self._stop
        failures = 0
        while not stop.is_set():
            try:
                n = self.drain(stop=stop)
            except Exception as exc:
                failures += 1
                self.stats.errors += 1
                self.stats.last_error = " ".join(str(exc).split())[:500] or type(exc).__name__
                delay = self._delay(failures)
                log.warning(
                    "relay attempt failed (%s); retrying in %.1f s", self.stats.last_error, delay
                )
                self._check_alert()
                stop.wait(delay)
                continue
            failures = 0
            self._check_alert()
            if n == 0:
                stop.wait(self.poll)

    def _check_alert(self) -> None:
        """With ``alert_age``: a warning when the oldest waiting row has waited that long
        (the relay or the ledger is down, or cannot keep up), once per episode, and a note
        when it is back under half of it. Looked at every few seconds at most; the age is
        read through the outbox's key."""
        if self.alert_age <= 0:
            return
        now = time.monotonic()
        if now - self._alert_checked < min(5.0, self.alert_age / 4):
            return
        self._alert_checked = now
        try:
            age = self.oldest_pending_age()
        except StorageError:
            return  # the failed attempts say so already
        if not self.alerting and age is not None and age >= self.alert_age:
            self.alerting = True
            log.warning(
                "relay %s: the oldest captured change has waited %.0f s; last error: %s",
                self.source,
                age,
                self.stats.last_error,
            )
        elif self.alerting and (age is None or age < self.alert_age / 2):
            self.alerting = False
            log.info("relay %s: caught up (oldest waiting %.0f s)", self.source, age or 0.0)

    def _delay(self, failures: int) -> float:
        """Exponential backoff with full jitter (AWS Architecture Blog, 2015)."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** min(failures - 1, 30))
        return random.uniform(ceiling / 10, ceiling)

    def start(self) -> None:
        """Run :meth:`run` in a background daemon thread."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="sealtrail-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the background thread after its current batch."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            self._thread = None

    def pending(self) -> int:
        """Rows waiting in the outbox (including those of uncommitted transactions' commit
        rows not yet written)."""
        with app_errors(self.engine, "count the outbox"), self.engine.connect() as conn:
            return self._outbox.count(conn)

    def oldest_pending_age(self) -> float | None:
        """Seconds the oldest waiting row has waited (None: the outbox is empty)."""
        with app_errors(self.engine, "read the outbox"), self.engine.connect() as conn:
            return self._outbox.oldest_age(conn)

    def metrics(self) -> str:
        """The counters, and what waits in the outbox, in the Prometheus text exposition
        format. When the application database cannot be read, ``outbox_reachable`` is 0
        and the outbox's gauges are NaN (the counters still show)."""
        pending: int | None
        age: float | None
        try:  # both on one connection
            with app_errors(self.engine, "read the outbox"), self.engine.connect() as conn:
                pending, age = self._outbox.count(conn), self._outbox.oldest_age(conn)
            reachable = 1
        except StorageError:
            pending, age, reachable = None, None, 0
        s = self.stats
        return exposition(
            "sealtrail_relay",
            {"source": self.source},
            [
                ("pending", "gauge", pending, "Rows waiting in the outbox"),
                (
                    "oldest_age_seconds",
                    "gauge",
                    0.0 if age is None and reachable else age,
                    "Age of the oldest waiting row",
                ),
                ("outbox_reachable", "gauge", reachable, "Whether the outbox could be read"),
                ("shipped_total", "counter", s.shipped, "Changes appended to the ledger"),
                ("duplicates_total", "counter", s.duplicates, "Rows the ledger already held"),
                ("rejected_total", "counter", s.rejected, "Rows recorded as rejected"),
                ("batches_total", "counter", s.batches, "Batches shipped"),
                ("errors_total", "counter", s.errors, "Failed attempts (each retried)"),
                ("alerting", "gauge", int(self.alerting), "Whether the age alert is raised"),
            ],
        )

    def close(self) -> None:
        self.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _can_fork() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def _pools_connections(engine: Engine) -> bool:
    from sqlalchemy.pool import SingletonThreadPool, StaticPool

    return not isinstance(engine.pool, SingletonThreadPool | StaticPool)


def _is_engine(value: object) -> bool:
    try:
        from sqlalchemy.engine import Engine
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, Engine)


def _source_name(engine: Engine) -> str:
    url = engine.url
    if engine.dialect.name == "sqlite":
        return f"sqlite:{os.path.abspath(url.database) if url.database else ':memory:'}"
    port = f":{url.port}" if url.port else ""
    return f"{engine.dialect.name}://{url.host or ''}{port}/{url.database or ''}"
