"""PostgreSQL capture: triggers, the transaction-local actor context, commit order, guards.

Installing (:func:`install`, idempotent) puts statement-level triggers on each tracked
table. They write one envelope per changed row (see :mod:`sealtrail.capture.change`) into
``sealtrail_outbox`` in the same transaction as the change, so a rollback leaves no event
and a commit always has its events (DESIGN.md, I9); once per capturing transaction, at
commit, a deferred trigger numbers the transaction in ``sealtrail_outbox_commit`` under a
lock, so ``commit_seq`` orders transactions as they committed. Writes from any client are
captured; who acted comes from the transaction-local setting ``sealtrail.context``, which
:func:`instrument` (SQLAlchemy) and :func:`set_context` / :func:`transaction` (psycopg) send
from the current :func:`sealtrail.context`. A write without it is attributed to
``db:<role>`` with ``data.db.app_context = "missing"``.

:func:`check` lists what is wrong (a trigger missing, disabled, or stale after a migration)
so CI and start-up can fail on it; :func:`grant_app` and :func:`grant_relay` set up the
roles; disabling capture on a tracked table is itself an event (the DDL watch, an event
trigger installed when the installing role is a superuser). docs/db-capture.md has the
whole story, including what cannot be caught.

This module is the edge: the SQL text lives in :mod:`sealtrail.capture._pg_sql`.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson
import psycopg
from psycopg import pq, sql

from sealtrail._exceptions import CaptureError
from sealtrail.capture import _pg_sql as q
from sealtrail.capture.change import COMMIT_SEQ, OUTBOX_COMMIT_TABLE, OUTBOX_TABLE, Track
from sealtrail.context import (
    AuditContext,
    MissingActor,
    NoActorPolicy,
    apply_context,
    current_context,
    resolve,
)
from sealtrail.event import DEFAULT_LIMITS, check_size, prepare_event, prepare_unencoded

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.engine import Engine

__all__ = [
    "CONTEXT_SETTING",
    "CaptureError",
    "Problem",
    "aset_context",
    "atransaction",
    "check",
    "context_json",
    "grant_app",
    "grant_relay",
    "install",
    "instrument",
    "set_context",
    "transaction",
    "uninstall",
    "uninstrument",
]

#: The transaction-local setting that carries the audit context to the triggers.
CONTEXT_SETTING: Final = q.SETTING

_SET_LOCAL: Final = "SELECT pg_catalog.set_config('sealtrail.context', %s, true)"
_SET_SESSION: Final = "SELECT pg_catalog.set_config('sealtrail.context', %s, false)"

# Context fields an event takes from the audit context (apply_context's output).
_CONTEXT_FIELDS: Final = ("actor", "source", "tenant", "reason", "subject", "data")
#: What context_json checks the context's fields inside (never recorded).
_PLACEHOLDER_EVENT: Final = {
    "id": "00000000-0000-7000-8000-000000000000",
    "time": "2000-01-01T00:00:00.000000Z",
    "action": "db.update",
}

# What the triggers' firing mode letters mean (pg_trigger.tgenabled).
_MODES: Final = {"O": "origin only", "D": "disabled", "R": "replica only", "A": "always"}


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing :func:`check` found wrong. ``kind`` is one of ``missing`` (a trigger or
    an outbox table is not there), ``disabled`` (a trigger does not fire, or fires in
    fewer sessions than installed), ``stale`` (the table or the rules changed since
    install: run :func:`install` again), ``modified`` (a capture function was replaced by
    hand), ``table`` (the track itself is wrong), ``untracked`` (capture is installed on a
    table no track names)."""

    table: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.table}: {self.kind}: {self.detail}"


# --------------------------------------------------------------------------------------
# Connections


@contextlib.contextmanager
def _connection(target: object) -> Iterator[psycopg.Connection[Any]]:
    """A psycopg connection from a connection (used as is), a conninfo string or URL
    (opened and closed here), or a SQLAlchemy engine using psycopg."""
    if isinstance(target, psycopg.Connection):
        yield target
        return
    if isinstance(target, str):
        url = target
        scheme, sep, rest = url.partition("://")
        if sep and "+" in scheme:
            url = f"{scheme.partition('+')[0]}://{rest}"
        with psycopg.connect(url, autocommit=True) as conn:
            yield conn
        return
    raw_connection = getattr(target, "raw_connection", None)
    if callable(raw_connection):
        pooled = raw_connection()
        try:
            driver = getattr(pooled, "driver_connection", None)
            if not isinstance(driver, psycopg.Connection):
                raise CaptureError(
                    "capture DDL needs a psycopg (version 3) connection; the engine uses "
                    f"{type(driver).__name__}: pass a psycopg connection or a URL instead"
                )
            yield driver
        finally:
            pooled.close()
        return
    raise CaptureError(
        "expected a psycopg connection, a connection string or URL, or a SQLAlchemy "
        f"engine, got {type(target).__name__}"
    )


def _one(conn: psycopg.Connection[Any], query: str, params: tuple[object, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def _run(conn: psycopg.Connection[Any], statement: str) -> None:
    conn.execute(statement)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _is_superuser(conn: psycopg.Connection[Any]) -> bool:
    return bool(_one(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))


# --------------------------------------------------------------------------------------
# Reading the catalog

# Base type oid -> how its values are written (see _pg_sql.json_expr).
_KINDS: Final = {
    21: "int",  # int2
    23: "int",  # int4
    26: "int",  # oid
    20: "int8",
    700: "float4",
    701: "float8",
    1700: "numeric",
    16: "bool",
    25: "text",
    1043: "text",  # varchar
    1042: "bpchar",
    19: "text",  # name
    18: "text",  # "char"
    2950: "uuid",
    17: "bytea",
    1184: "tstz",
    1114: "ts",
    1082: "date",
    1083: "time",
    114: "json",
    3802: "jsonb",
}
# Array element kinds -> the array's kind.
_ARRAY_KINDS: Final = {
    "int": "array",
    "bool": "array",
    "text": "array",
    "bpchar": "array",
    "uuid": "array",
    "date": "array",
    "numeric": "array_text",
    "float4": "array_float",
    "float8": "array_float",
}


@dataclass(frozen=True, slots=True)
class _Table:
    oid: int
    schema: str
    name: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def sql_name(self) -> str:
        return f"{q.ident(self.schema)}.{q.ident(self.name)}"


def _find_table(conn: psycopg.Connection[Any], name: str, schema: str) -> _Table:
    if not isinstance(name, str) or not name:
        raise CaptureError(f"a track needs a table name, got {name!r}")
    rows = conn.execute(
        "SELECT c.oid, n.nspname, c.relname, c.relkind FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname || '.' || c.relname = %s",
        (name,),
    ).fetchall()
    if not rows and "." not in name:
        rows = conn.execute(
            "SELECT c.oid, n.nspname, c.relname, c.relkind FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = to_regclass(quote_ident(%s))",
            (name,),
        ).fetchall()
    if not rows:
        raise CaptureError(f"no table {name!r} (name it as schema.table)")
    if len(rows) > 1:
        found = ", ".join(f"schema {r[1]!r} table {r[2]!r}" for r in rows)
        raise CaptureError(f"{name!r} is ambiguous: it names {found}")
    oid, nsp, rel, relkind = rows[0]
    if relkind not in ("r", "p"):
        what = {"v": "a view", "m": "a materialized view", "f": "a foreign table"}
        raise CaptureError(f"{name!r} is {what.get(relkind, 'not a table')}, not a table")
    if nsp == schema and rel.startswith(OUTBOX_TABLE):
        raise CaptureError(f"{name!r} is Sealtrail's own outbox; it cannot be tracked")
    return _Table(int(oid), str(nsp), str(rel))


def _type_info(conn: psycopg.Connection[Any], oid: int) -> tuple[str, int, int, str]:
    row = conn.execute(
        "SELECT typtype, typbasetype, typelem, typcategory FROM pg_type WHERE oid = %s",
        (oid,),
    ).fetchone()
    if row is None:  # pragma: no cover - the catalog names it
        raise CaptureError(f"unknown type oid {oid}")
    return str(row[0]), int(row[1]), int(row[2]), str(row[3])


def _base_type(conn: psycopg.Connection[Any], oid: int) -> int:
    while True:
        typtype, base, _, _ = _type_info(conn, oid)
        if typtype != "d":
            return oid
        oid = base


def _scalar_kind(conn: psycopg.Connection[Any], oid: int) -> str:
    if oid in _KINDS:
        return _KINDS[oid]
    typtype, _, _, category = _type_info(conn, oid)
    if typtype == "e" or category == "S":
        return "text"
    return "other"


def _has_equality(conn: psycopg.Connection[Any], oid: int) -> bool:
    """Whether ``IS DISTINCT FROM`` works for values of this (base) type."""
    typtype, _, elem, category = _type_info(conn, oid)
    if oid in (114, 142):  # json, xml
        return False
    if typtype == "c":
        return False  # record comparison would fail at run time on some field types
    if category == "A" and elem:
        return _has_equality(conn, _base_type(conn, elem))
    if oid in _KINDS:
        return True
    type_sql = _one(conn, "SELECT format_type(%s, NULL)", (oid,))
    try:
        with conn.transaction():
            _run(conn, f"SELECT NULL::{type_sql} IS DISTINCT FROM NULL::{type_sql}")
    except psycopg.errors.UndefinedFunction:
        return False
    return True


def _columns(conn: psycopg.Connection[Any], table: _Table) -> tuple[q.Column, ...]:
    rows = conn.execute(
        "SELECT a.attnum, a.attname, a.atttypid, format_type(a.atttypid, a.atttypmod) "
        "FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped "
        "ORDER BY a.attnum",
        (table.oid,),
    ).fetchall()
    columns = []
    for attnum, name, typid, type_sql in rows:
        base = _base_type(conn, int(typid))
        _, _, elem, category = _type_info(conn, base)
        if category == "A" and elem:
            kind = _ARRAY_KINDS.get(_scalar_kind(conn, _base_type(conn, elem)), "other")
        else:
            kind = _scalar_kind(conn, base)
        cast = "" if base == typid else str(_one(conn, "SELECT format_type(%s, NULL)", (base,)))
        columns.append(
            q.Column(
                attnum=int(attnum),
                name=str(name),
                type_sql=str(type_sql),
                kind=kind,
                cast=cast,
                equality=_has_equality(conn, base),
            )
        )
    return tuple(columns)


def _unique_keys(conn: psycopg.Connection[Any], table: _Table) -> list[tuple[bool, list[str]]]:
    """(is primary, columns) of every plain unique index whose columns are NOT NULL."""
    rows = conn.execute(
        "SELECT i.indisprimary, array_agg(a.attname ORDER BY k.ord), bool_and(a.attnotnull) "
        "FROM pg_index i "
        "CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "WHERE i.indrelid = %s AND i.indisunique AND i.indpred IS NULL "
        "AND i.indexprs IS NULL GROUP BY i.indexrelid, i.indisprimary",
        (table.oid,),
    ).fetchall()
    return [(bool(p), [str(c) for c in cols]) for p, cols, notnull in rows if notnull]


def _spec(conn: psycopg.Connection[Any], track: Track, schema: str) -> q.TableSpec:
    """The track resolved against the catalog, every rule checked."""
    if not isinstance(track, Track):
        raise CaptureError(f"expected a sealtrail.capture.change.Track, got {track!r}")
    table = _find_table(conn, track.table, schema)
    columns = _columns(conn, table)
    names = [c.name for c in columns]
    exclude, mask = set(track.exclude), set(track.mask)
    unknown = sorted((exclude | mask | set(track.pk or ())) - set(names))
    if unknown:
        raise CaptureError(
            f"track {table.qualified!r} names columns the table does not have: "
            f"{', '.join(repr(u) for u in unknown)} (its columns: {names!r})"
        )
    if exclude & mask:
        raise CaptureError(f"columns both excluded and masked: {sorted(exclude & mask)!r}")
    keys = _unique_keys(conn, table)
    if track.pk is None:
        primary = [cols for is_primary, cols in keys if is_primary]
        if not primary:
            raise CaptureError(
                f"table {table.qualified!r} has no primary key; add one, or name a unique, "
                "NOT NULL key with Track.of(..., pk=[...])"
            )
        pk = tuple(primary[0])
    else:
        pk = tuple(track.pk)
        if not pk or len(set(pk)) != len(pk):
            raise CaptureError(f"track {table.qualified!r}: pk must name distinct columns")
        if not any(set(cols) == set(pk) for _, cols in keys):
            raise CaptureError(
                f"track {table.qualified!r}: pk {list(pk)!r} is not a unique, NOT NULL key "
                "of the table (a primary key or a unique index on exactly those columns)"
            )
    hidden = sorted(set(pk) & (exclude | mask))
    if hidden:
        raise CaptureError(
            f"track {table.qualified!r}: key columns cannot be excluded or masked: {hidden!r} "
            "(the key names the row in every event)"
        )
    return q.TableSpec(
        schema=table.schema,
        name=table.name,
        columns=columns,
        pk=pk,
        exclude=frozenset(exclude),
        mask=frozenset(mask),
    )


# --------------------------------------------------------------------------------------
# Install


@dataclass(frozen=True, slots=True)
class _Plan:
    """What install puts on one table, and the comment that records it."""

    spec: q.TableSpec
    functions: dict[str, q.Function]
    triggers: dict[str, str]
    comment: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return str(self.comment["fingerprint"])


def _plan(spec: q.TableSpec, schema: str, mode: str) -> _Plan:
    s = q.ident(schema)
    functions = q.table_functions(spec, s)
    triggers = q.table_triggers(spec, s)
    rules = {"pk": list(spec.pk), "exclude": sorted(spec.exclude), "mask": sorted(spec.mask)}
    fingerprint = _sha(
        orjson.dumps(
            {
                "version": q.VERSION,
                "schema": schema,
                "mode": mode,
                "functions": {n: [f.body, list(f.config)] for n, f in functions.items()},
                "triggers": triggers,
            },
            option=orjson.OPT_SORT_KEYS,
        ).decode()
    )
    comment: dict[str, Any] = {
        # "mode" first: the DDL watch reads it with a pattern.
        "mode": mode,
        "sealtrail": q.VERSION,
        "table": spec.qualified,
        "fingerprint": fingerprint,
        "rules": rules,
        "columns": [[c.attnum, c.name, c.type_sql] for c in spec.columns],
        "sources": {n: _source_sha(f.body, f.config, True) for n, f in functions.items()},
    }
    return _Plan(spec, functions, triggers, comment)


def _source_sha(body: str, config: Iterable[str], definer: bool) -> str:
    """What a capture function is: its body, settings and security mode."""
    return _sha("\0".join([body, *config, str(definer)]))


def _comment_trigger(conn: psycopg.Connection[Any], name: str, table_sql: str, doc: object) -> None:
    _run(
        conn,
        f"COMMENT ON TRIGGER {q.ident(name)} ON {table_sql} IS {q.lit(orjson.dumps(doc).decode())}",
    )


@dataclass(frozen=True, slots=True)
class _Installed:
    """A Sealtrail trigger found on a table."""

    enabled: str  # pg_trigger.tgenabled
    doc: dict[str, Any] | None  # its comment, parsed
    function: str  # schema.name
    source_sha: str  # _source_sha of the function as it is


def _installed_triggers(conn: psycopg.Connection[Any], oid: int) -> dict[str, _Installed]:
    """Sealtrail triggers on a table, by name."""
    rows = conn.execute(
        "SELECT t.tgname, t.tgenabled, obj_description(t.oid, 'pg_trigger'), "
        "fn.nspname || '.' || p.proname, p.prosrc, coalesce(p.proconfig, '{}'), p.prosecdef "
        "FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid "
        "JOIN pg_namespace fn ON fn.oid = p.pronamespace "
        "WHERE t.tgrelid = %s AND t.tgname LIKE 'sealtrail\\_%%'",
        (oid,),
    ).fetchall()
    out: dict[str, _Installed] = {}
    for name, enabled, comment, function, source, config, definer in rows:
        doc: dict[str, Any] | None = None
        if comment:
            try:
                parsed = orjson.loads(comment)
            except orjson.JSONDecodeError:
                parsed = None
            doc = parsed if isinstance(parsed, dict) else None
        out[str(name)] = _Installed(
            str(enabled), doc, str(function), _source_sha(str(source), config, bool(definer))
        )
    return out


def _relay_roles(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    row = conn.execute(
        "SELECT t.tgargs FROM pg_trigger t WHERE t.tgname = 'sealtrail_guard_delete' "
        "AND t.tgrelid = to_regclass(%s)",
        (f"{q.ident(schema)}.{OUTBOX_TABLE}",),
    ).fetchone()
    if row is None or not row[0]:
        return []
    return [arg.decode() for arg in bytes(row[0]).split(b"\0") if arg]


def _outbox_triggers(conn: psycopg.Connection[Any], schema: str, relay_roles: list[str]) -> None:
    """The guards (and, on the outbox, the commit-order trigger), created or updated only
    where they differ, every one firing always. One ALTER TABLE per table, and none when
    nothing changed: the DDL watch sees the final state, and a transaction that already
    captured (deferred trigger events pending on the outbox) can still run install()."""
    s = q.ident(schema)
    doc = {"mode": "A", "sealtrail": q.VERSION}
    for table in (OUTBOX_TABLE, OUTBOX_COMMIT_TABLE):
        table_sql = f"{s}.{q.ident(table)}"
        rows = conn.execute(
            "SELECT tgname, tgenabled, tgargs FROM pg_trigger WHERE tgrelid = to_regclass(%s) "
            "AND tgname LIKE 'sealtrail\\_%%'",
            (table_sql,),
        ).fetchall()
        found = {str(n): (str(e), bytes(a or b"")) for n, e, a in rows}
        names = list(q.GUARDS)
        if table == OUTBOX_TABLE:
            names.append(q.COMMIT_TRIGGER)
            if q.COMMIT_TRIGGER not in found:
                _run(conn, q.commit_trigger_sql(schema))
        args = b"".join(r.encode() + b"\0" for r in relay_roles)
        for name, statement in zip(q.GUARDS, q.guard_sql(schema, table, relay_roles), strict=True):
            want_args = args if name == "sealtrail_guard_delete" else b""
            if name not in found or found[name][1] != want_args:
                _run(conn, statement)
                found.pop(name, None)
        for name in names:
            _comment_trigger(conn, name, table_sql, doc)
        if any(found.get(name, ("",))[0] != "A" for name in names):
            _run(conn, q.enable_triggers(table_sql, names, "A"))


def _install_shared(conn: psycopg.Connection[Any], schema: str, watch: bool) -> None:
    s = q.ident(schema)
    _run(conn, f"CREATE SCHEMA IF NOT EXISTS {s}")
    # Not even CREATE ... IF NOT EXISTS when they exist: CREATE INDEX refuses a table with
    # pending trigger events (a transaction that already captured).
    if any(
        _one(conn, "SELECT to_regclass(%s)", (name,)) is None for name in q.shared_objects(schema)
    ):
        _run(conn, q.tables_sql(schema))
    _run(conn, q.functions_sql(schema))
    _outbox_triggers(conn, schema, _relay_roles(conn, schema))
    if watch:
        names = q.event_triggers(schema)
        found = _one(
            conn, "SELECT count(*) FROM pg_event_trigger WHERE evtname = ANY(%s)", (list(names),)
        )
        _run(conn, q.ddl_watch_sql(schema))
        if found < len(names):
            for name in names:
                _run(conn, f"DROP EVENT TRIGGER IF EXISTS {name}")
            for statement in q.event_trigger_sql(schema):
                _run(conn, statement)
        else:
            for name in names:
                _run(conn, f"ALTER EVENT TRIGGER {name} ENABLE ALWAYS")
    settings = {"sealtrail": q.VERSION, "ddl_watch": watch}
    _run(
        conn,
        f"COMMENT ON TABLE {s}.{OUTBOX_TABLE} IS {q.lit(orjson.dumps(settings).decode())}",
    )


def _emit(conn: psycopg.Connection[Any], schema: str, event: Mapping[str, object]) -> str:
    return str(
        _one(
            conn,
            f"SELECT {q.ident(schema)}.sealtrail_emit(%s::jsonb)",
            (orjson.dumps(event).decode(),),
        )
    )


def _table_event(action: str, table: str, db: Mapping[str, object]) -> dict[str, object]:
    return {
        "action": action,
        "target": {"type": "db:table", "id": table},
        "data": {"db": {"table": table, **db}},
    }


def _install_table(conn: psycopg.Connection[Any], plan: _Plan, schema: str) -> bool:
    spec = plan.spec
    mode = str(plan.comment["mode"])
    oid = int(_one(conn, "SELECT to_regclass(%s)::oid", (spec.sql_name,)))
    installed = _installed_triggers(conn, oid)
    sources = plan.comment["sources"]
    current = all(
        name in installed
        and installed[name].enabled == mode
        and installed[name].doc is not None
        and installed[name].doc.get("fingerprint") == plan.fingerprint  # type: ignore[union-attr]
        for name in plan.triggers
    ) and all(
        sources.get(t.function.rpartition(".")[2]) == t.source_sha
        for name, t in installed.items()
        if name != q.TRIGGERS["pk"]
    )
    if current:
        return False
    s = q.ident(schema)
    for name, function in plan.functions.items():
        _run(conn, function.create(s))
        _run(conn, f"REVOKE ALL ON FUNCTION {s}.{q.ident(name)}() FROM PUBLIC")
    for name in installed:
        if name.startswith("sealtrail_capture_") and name not in plan.triggers:
            _run(conn, f"DROP TRIGGER {q.ident(name)} ON {spec.sql_name}")
    for statement in plan.triggers.values():
        _run(conn, statement)
    for name in plan.triggers:
        _comment_trigger(conn, name, spec.sql_name, plan.comment)
    _run(conn, q.enable_triggers(spec.sql_name, list(plan.triggers), mode))
    _emit(
        conn,
        schema,
        _table_event(
            "sealtrail.capture.install",
            spec.qualified,
            {
                "command": "install",
                "rules": plan.comment["rules"],
                "columns": [c.name for c in spec.captured],
            },
        ),
    )
    return True


def install(
    conn: object,
    tracks: Iterable[Track],
    *,
    schema: str = "public",
    ddl_watch: bool | None = None,
    fire_on_replica: bool = True,
) -> list[str]:
    """Install capture on the tracked tables; return the tables whose triggers were
    (re)created (none when everything was already current).

    ``conn`` is a psycopg connection, a connection string or URL, or a SQLAlchemy engine
    using psycopg. Everything happens in one transaction: the outbox tables, guards and
    shared functions in ``schema`` (created if missing), then each table's triggers. Run
    it again after every migration that touches a tracked table: it is idempotent, and
    re-creates only what changed (each (re)install is an event,
    ``sealtrail.capture.install``).

    ``ddl_watch``: install the event trigger that records disabling or dropping capture
    as an event (``None``: when the current role is a superuser, which event triggers
    need; ``True``: fail if it cannot). ``fire_on_replica``: the triggers fire even in
    sessions with ``session_replication_role = replica`` (set ``False`` on a logical
    replication subscriber that must not capture the changes it applies).
    """
    tracks = list(tracks)
    mode = "A" if fire_on_replica else "O"
    with _connection(conn) as pg, pg.transaction():
        _run(pg, "SELECT pg_advisory_xact_lock(1936024940, 2)")
        superuser = _is_superuser(pg)
        if ddl_watch and not superuser:
            raise CaptureError(
                "ddl_watch=True needs a superuser (event triggers); install as a superuser "
                "or pass ddl_watch=False"
            )
        watch = superuser if ddl_watch is None else ddl_watch
        _install_shared(pg, schema, watch)
        set_context(pg)
        plans: dict[str, _Plan] = {}
        for track in tracks:
            spec = _spec(pg, track, schema)
            if spec.qualified in plans:
                raise CaptureError(f"table {spec.qualified!r} is tracked twice")
            plans[spec.qualified] = _plan(spec, schema, mode)
        return [name for name, plan in plans.items() if _install_table(pg, plan, schema)]


# --------------------------------------------------------------------------------------
# Check


def _stale_detail(stored: Mapping[str, Any], plan: _Plan) -> str:
    details = []
    if stored.get("sealtrail") != q.VERSION:
        details.append(f"installed by capture version {stored.get('sealtrail')!r}")
    before = {int(a): (str(n), str(t)) for a, n, t in stored.get("columns", [])}
    after = {c.attnum: (c.name, c.type_sql) for c in plan.spec.columns}
    for attnum in sorted(set(before) | set(after)):
        old, new = before.get(attnum), after.get(attnum)
        if old is None and new is not None:
            details.append(f"column {new[0]!r} added")
        elif new is None and old is not None:
            details.append(f"column {old[0]!r} dropped")
        elif old is not None and new is not None and old != new:
            if old[0] != new[0]:
                details.append(f"column {old[0]!r} renamed to {new[0]!r}")
            if old[1] != new[1]:
                details.append(f"column {new[0]!r} changed type from {old[1]} to {new[1]}")
    if stored.get("rules") != plan.comment["rules"]:
        details.append(f"rules changed from {stored.get('rules')!r} to {plan.comment['rules']!r}")
    if stored.get("table") != plan.spec.qualified:
        details.append(f"table renamed from {stored.get('table')!r}")
    if not details:
        details.append("the generated capture code differs")
    return "; ".join(details) + ": run install() again"


def _check_table(conn: psycopg.Connection[Any], plan: _Plan, oid: int) -> list[Problem]:
    table = plan.spec.qualified
    installed = _installed_triggers(conn, oid)
    problems = []
    stale: dict[str, Any] | None = None
    for name in plan.triggers:
        if name not in installed:
            problems.append(Problem(table, "missing", f"trigger {name} is missing"))
            continue
        found = installed[name]
        enabled, doc, function = found.enabled, found.doc, found.function
        want = str(doc.get("mode", "A")) if doc else "A"
        if enabled != want:
            problems.append(
                Problem(
                    table,
                    "disabled",
                    f"trigger {name} fires {_MODES.get(enabled, enabled)}, "
                    f"installed to fire {_MODES.get(want, want)}",
                )
            )
        if doc is None or doc.get("fingerprint") != plan.fingerprint:
            stale = doc or {}
        if doc is not None:
            expected = doc.get("sources", {})
            fn_name = function.rpartition(".")[2]
            if name != q.TRIGGERS["pk"] and expected.get(fn_name) != found.source_sha:
                problems.append(
                    Problem(table, "modified", f"function {function} was replaced by hand")
                )
    if stale is not None:
        problems.append(Problem(table, "stale", _stale_detail(stale, plan)))
    return problems


def _check_shared(conn: psycopg.Connection[Any], schema: str) -> list[Problem]:
    s = q.ident(schema)
    problems = []
    where = f"{schema}.{OUTBOX_TABLE}"
    for table in (OUTBOX_TABLE, OUTBOX_COMMIT_TABLE):
        if _one(conn, "SELECT to_regclass(%s)", (f"{s}.{q.ident(table)}",)) is None:
            problems.append(Problem(f"{schema}.{table}", "missing", "table is missing"))
    if problems:
        return [*problems, Problem(where, "missing", "capture is not installed: run install()")]
    expected = {(t, g) for t in (OUTBOX_TABLE, OUTBOX_COMMIT_TABLE) for g in q.GUARDS}
    expected.add((OUTBOX_TABLE, q.COMMIT_TRIGGER))
    rows = conn.execute(
        "SELECT c.relname, t.tgname, t.tgenabled FROM pg_trigger t "
        "JOIN pg_class c ON c.oid = t.tgrelid WHERE c.relnamespace = to_regnamespace(%s) "
        "AND c.relname = ANY(%s)",
        (s, [OUTBOX_TABLE, OUTBOX_COMMIT_TABLE]),
    ).fetchall()
    found = {(str(r), str(n)): str(e) for r, n, e in rows}
    for table, name in sorted(expected):
        state = found.get((table, name))
        if state is None:
            problems.append(Problem(f"{schema}.{table}", "missing", f"trigger {name} is missing"))
        elif state != "A":
            problems.append(
                Problem(f"{schema}.{table}", "disabled", f"trigger {name} fires {_MODES[state]}")
            )
    comment = _one(
        conn, "SELECT obj_description(to_regclass(%s), 'pg_class')", (f"{s}.{OUTBOX_TABLE}",)
    )
    try:
        settings = orjson.loads(comment) if comment else {}
    except orjson.JSONDecodeError:
        settings = {}
    if not isinstance(settings, dict):
        settings = {}
    problems += _check_shared_functions(conn, schema, settings)
    if settings.get("ddl_watch"):
        events = dict(
            conn.execute(
                "SELECT evtname, evtenabled FROM pg_event_trigger WHERE evtname = ANY(%s)",
                (list(q.event_triggers(schema)),),
            ).fetchall()
        )
        for name in q.event_triggers(schema):
            if name not in events:
                problems.append(Problem(where, "missing", f"event trigger {name} is missing"))
            elif events[name] != "A":
                state = _MODES.get(str(events[name]), str(events[name]))
                problems.append(Problem(where, "disabled", f"event trigger {name} fires {state}"))
    return problems


def _check_shared_functions(
    conn: psycopg.Connection[Any], schema: str, settings: Mapping[str, Any]
) -> list[Problem]:
    """The shared functions (the commit order, the guards, the value writers...) against
    what this version's install() writes: ``stale`` when an earlier version installed
    them, ``modified`` when they were changed since."""
    where = f"{schema}.{OUTBOX_TABLE}"
    expected = q.shared_functions(schema, ddl_watch=bool(settings.get("ddl_watch")))
    rows = conn.execute(
        "SELECT proname, prosrc, prosecdef, coalesce(proconfig, '{}') FROM pg_proc "
        "WHERE pronamespace = to_regnamespace(%s) AND proname = ANY(%s)",
        (q.ident(schema), list(expected)),
    ).fetchall()
    installed = {str(r[0]): r for r in rows}
    problems: list[Problem] = []
    differ: list[str] = []
    for name, want in expected.items():
        row = installed.get(name)
        if row is None:
            problems.append(Problem(where, "missing", f"function {name} is missing"))
            continue
        config = sorted(
            f"{key.lower()}={value}" for key, _, value in (str(c).partition("=") for c in row[3])
        )
        what = [
            label
            for label, same in (
                ("body", row[1] == want.body),
                ("security mode", bool(row[2]) == want.definer),
                ("settings", config == sorted(want.config)),
            )
            if not same
        ]
        if what:
            differ.append(f"{name} ({', '.join(what)})")
    if differ and settings.get("sealtrail") != q.VERSION:
        problems.append(
            Problem(
                where,
                "stale",
                f"installed by capture version {settings.get('sealtrail')!r}; functions "
                f"{'; '.join(differ)} differ: run install() again",
            )
        )
    elif differ:
        problems += [
            Problem(where, "modified", f"function {d} differs from what install() writes")
            for d in differ
        ]
    return problems


def _captured_tables(conn: psycopg.Connection[Any], schema: str) -> list[_Table]:
    """Tables with Sealtrail capture triggers whose functions live in ``schema``."""
    rows = conn.execute(
        "SELECT DISTINCT c.oid, n.nspname, c.relname FROM pg_trigger t "
        "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_proc p ON p.oid = t.tgfoid "
        "WHERE t.tgname LIKE 'sealtrail\\_capture\\_%%' AND p.pronamespace = to_regnamespace(%s) "
        "ORDER BY 2, 3",
        (q.ident(schema),),
    ).fetchall()
    return [_Table(int(o), str(n), str(r)) for o, n, r in rows]


def check(conn: object, tracks: Iterable[Track], *, schema: str = "public") -> list[Problem]:
    """What is wrong with capture in this database, for CI and start-up checks: an empty
    list when every track is installed, enabled and current.

    Finds missing or disabled triggers (including ``ALTER TABLE ... DISABLE TRIGGER``
    done when the DDL watch was not there to record it, and triggers left firing on
    origin only), tables changed by a migration since :func:`install` (a column added,
    dropped, renamed or retyped), changed rules, capture functions replaced by hand,
    broken tracks, and capture installed on tables no track names. Changes nothing.
    """
    tracks = list(tracks)
    problems: list[Problem] = []
    with _connection(conn) as pg, pg.transaction(force_rollback=True):
        problems.extend(_check_shared(pg, schema))
        named: set[str] = set()
        for track in tracks:
            try:
                spec = _spec(pg, track, schema)
            except CaptureError as exc:
                name = track.table if isinstance(track, Track) else repr(track)
                problems.append(Problem(str(name), "table", str(exc)))
                continue
            named.add(spec.qualified)
            oid = int(_one(pg, "SELECT to_regclass(%s)::oid", (spec.sql_name,)))
            modes = [t.doc.get("mode") for t in _installed_triggers(pg, oid).values() if t.doc]
            mode = "O" if "O" in modes else "A"
            problems.extend(_check_table(pg, _plan(spec, schema, mode), oid))
        for table in _captured_tables(pg, schema):
            if table.qualified not in named:
                problems.append(
                    Problem(
                        table.qualified,
                        "untracked",
                        "capture is installed but no track names this table: add a track "
                        "or uninstall() it",
                    )
                )
    return problems


# --------------------------------------------------------------------------------------
# Uninstall and grants


def uninstall(
    conn: object, tracks: Iterable[Track] | None = None, *, schema: str = "public"
) -> list[str]:
    """Remove capture from the tables of ``tracks`` (``None``: from every table, and the
    DDL watch too); return the tables it was removed from.

    Each removal is recorded first, as a ``sealtrail.capture.uninstall`` event in the
    outbox, in the same transaction. The outbox tables stay, with their guards: events
    not yet shipped must still reach the trail. Drop them by hand once the relay has
    emptied them.
    """
    with _connection(conn) as pg, pg.transaction():
        set_context(pg)
        if tracks is None:
            tables = _captured_tables(pg, schema)
        else:
            tables = []
            for track in tracks:
                name = track.table if isinstance(track, Track) else str(track)
                try:
                    tables.append(_find_table(pg, name, schema))
                except CaptureError:
                    continue  # gone already
        done = []
        ids = []
        triggers_by_table = {}
        for table in tables:
            installed = _installed_triggers(pg, table.oid)
            names = sorted(n for n in installed if n.startswith("sealtrail_capture_"))
            if not names:
                continue
            triggers_by_table[table] = (names, {t.function for t in installed.values()})
            ids.append(
                _emit(
                    pg,
                    schema,
                    _table_event(
                        "sealtrail.capture.uninstall",
                        table.qualified,
                        {"command": "uninstall", "triggers": names},
                    ),
                )
            )
        pg.execute("SELECT set_config('sealtrail.uninstall', %s, true)", (",".join(ids),))
        s = q.ident(schema)
        for table, (names, functions) in triggers_by_table.items():
            for name in names:
                _run(pg, f"DROP TRIGGER IF EXISTS {q.ident(name)} ON {table.sql_name}")
            for function in functions:
                nsp, _, fn_name = function.partition(".")
                if nsp == schema and fn_name.startswith("sealtrail_cap_"):
                    _run(pg, f"DROP FUNCTION IF EXISTS {s}.{q.ident(fn_name)}()")
            done.append(table.qualified)
        pg.execute("SELECT set_config('sealtrail.uninstall', '', true)")
        if tracks is None:
            for name in q.event_triggers(schema):
                _run(pg, f"DROP EVENT TRIGGER IF EXISTS {name}")
            _run(pg, f"DROP FUNCTION IF EXISTS {s}.sealtrail_ddl_watch()")
        return done


def _role(conn: psycopg.Connection[Any], role: str) -> None:
    if not isinstance(role, str) or not role:
        raise CaptureError(f"a role name is needed, got {role!r}")
    if _one(conn, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)) == 0:
        raise CaptureError(f"no role {role!r}")


def grant_app(conn: object, role: str, *, schema: str = "public") -> None:
    """Make ``role`` (the application's) unable to touch the outbox: no SELECT, INSERT,
    UPDATE, DELETE or TRUNCATE on the outbox tables. Its writes to tracked tables still
    produce events, because the capture functions run as their owner (``SECURITY
    DEFINER``): the app writes events only through the triggers.

    Refuses a superuser or the outbox's owner, whom privileges cannot restrict.
    """
    with _connection(conn) as pg, pg.transaction():
        _role(pg, role)
        if _one(pg, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)):
            raise CaptureError(f"role {role!r} is a superuser: privileges cannot restrict it")
        owner = _one(
            pg,
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = to_regclass(%s)",
            (f"{q.ident(schema)}.{OUTBOX_TABLE}",),
        )
        if owner is None:
            raise CaptureError("capture is not installed in this schema: run install() first")
        if owner == role:
            raise CaptureError(f"role {role!r} owns the outbox: privileges cannot restrict it")
        s, r = q.ident(schema), q.ident(role)
        _run(pg, f"REVOKE ALL ON TABLE {s}.{OUTBOX_TABLE}, {s}.{OUTBOX_COMMIT_TABLE} FROM {r}")
        _run(pg, f"REVOKE ALL ON SEQUENCE {s}.{COMMIT_SEQ} FROM {r}")
        for fn in ("sealtrail_emit(jsonb)", "sealtrail_base()", "sealtrail_uuidv7()"):
            _run(pg, f"REVOKE ALL ON FUNCTION {s}.{fn} FROM {r}")


def grant_relay(conn: object, role: str, *, schema: str = "public") -> None:
    """Let ``role`` (the relay's) read the outbox and delete what the ledger acknowledged:
    SELECT and DELETE on ``sealtrail_outbox`` and ``sealtrail_outbox_commit``. The guards
    refuse DELETE to every other role; UPDATE and TRUNCATE stay refused to all."""
    with _connection(conn) as pg, pg.transaction():
        _role(pg, role)
        s, r = q.ident(schema), q.ident(role)
        _run(pg, f"GRANT USAGE ON SCHEMA {s} TO {r}")
        tables = f"{s}.{OUTBOX_TABLE}, {s}.{OUTBOX_COMMIT_TABLE}"
        _run(pg, f"GRANT SELECT, DELETE ON TABLE {tables} TO {r}")
        roles = _relay_roles(pg, schema)
        if role not in roles:
            _outbox_triggers(pg, schema, [*roles, role])


# --------------------------------------------------------------------------------------
# The audit context, sent to the database


def context_json(
    snapshot: AuditContext | None = None, *, no_actor: NoActorPolicy | None = None
) -> str | None:
    """What :func:`set_context` sends as ``sealtrail.context``: the envelope fields the
    current (or given) audit context gives an event, exactly as explicit capture fills
    them (:func:`sealtrail.context.apply_context`, with ``no_actor``), checked by
    :func:`sealtrail.event.prepare_event`. ``None`` when there is no context at all.

    When ``no_actor`` refuses and there is no actor, the text carries that refusal: the
    triggers then fail the write, as :class:`~sealtrail.context.MissingActor` would.
    """
    snap = resolve(current_context() if snapshot is None else snapshot)
    try:
        fragment = apply_context({}, snap, policy=no_actor)
    except MissingActor as exc:
        return orjson.dumps({"missing_actor": str(exc)}).decode()
    if not fragment:
        return None
    # Checked as an event's fields are (prepare_event's own checks), without drawing an id
    # and a time for an event that is never made or encoding it canonically: this runs
    # once per captured transaction. What orjson cannot encode (a lone surrogate) goes
    # through prepare_event, which names the field.
    prepared = prepare_unencoded({**_PLACEHOLDER_EVENT, **fragment})
    out = {k: prepared[k] for k in _CONTEXT_FIELDS if k in prepared}
    try:
        text = orjson.dumps(out)
    except orjson.JSONEncodeError:
        prepare_event({"action": "db.update", **fragment})
        raise
    check_size(len(text), DEFAULT_LIMITS)
    return text.decode()


def set_context(conn: psycopg.Connection[Any], *, no_actor: NoActorPolicy | None = None) -> None:
    """Send the current audit context to the database for the rest of the current
    transaction (it ends with it). Call it again when the context changes.

    On a connection in autocommit mode there is no transaction to hold it: use
    :func:`transaction` instead.
    """
    if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
        raise CaptureError(
            "set_context needs an open transaction (the setting is transaction-local); "
            "use sealtrail.capture.pg.transaction(conn)"
        )
    conn.execute(_SET_LOCAL, (context_json(no_actor=no_actor) or "",))


async def aset_context(
    conn: psycopg.AsyncConnection[Any], *, no_actor: NoActorPolicy | None = None
) -> None:
    """:func:`set_context` for an asyncio psycopg connection."""
    if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
        raise CaptureError(
            "aset_context needs an open transaction (the setting is transaction-local); "
            "use sealtrail.capture.pg.atransaction(conn)"
        )
    await conn.execute(_SET_LOCAL, (context_json(no_actor=no_actor) or "",))


@contextlib.contextmanager
def transaction(
    conn: psycopg.Connection[Any], *, no_actor: NoActorPolicy | None = None
) -> Iterator[psycopg.Transaction]:
    """``conn.transaction()`` with the current audit context sent first. Nested inside a
    transaction (a savepoint), the enclosing transaction's context is back after it."""
    nested = conn.info.transaction_status != pq.TransactionStatus.IDLE
    previous = _one(conn, "SELECT current_setting('sealtrail.context', true)") if nested else None
    with conn.transaction() as tx:
        set_context(conn, no_actor=no_actor)
        yield tx
        if nested:
            conn.execute(_SET_LOCAL, (previous or "",))


@contextlib.asynccontextmanager
async def atransaction(
    conn: psycopg.AsyncConnection[Any], *, no_actor: NoActorPolicy | None = None
) -> AsyncIterator[psycopg.AsyncTransaction]:
    """:func:`transaction` for an asyncio psycopg connection."""
    nested = conn.info.transaction_status != pq.TransactionStatus.IDLE
    previous = None
    if nested:
        row = await (
            await conn.execute("SELECT current_setting('sealtrail.context', true)")
        ).fetchone()
        previous = None if row is None else row[0]
    async with conn.transaction() as tx:
        await aset_context(conn, no_actor=no_actor)
        yield tx
        if nested:
            await conn.execute(_SET_LOCAL, (previous or "",))


# --------------------------------------------------------------------------------------
# SQLAlchemy

_UNKNOWN: Final = object()
_STATE_KEY: Final = "sealtrail.capture.pg"


class _State:
    """Per DBAPI connection: what the database holds as ``sealtrail.context``."""

    __slots__ = ("cache", "session_value", "snapshot", "tx_value")

    def __init__(self) -> None:
        self.session_value = ""  # set with is_local = false (autocommit connections)
        self.tx_value: object = None  # None: nothing set in this transaction
        self.snapshot: AuditContext | None = None  # the snapshot tx_value was made from
        self.cache: tuple[AuditContext | None, str] = (None, "")

    def reset(self, *, unknown: bool = False) -> None:
        self.tx_value = _UNKNOWN if unknown else None
        self.snapshot = None


class _Instrumentation:
    """The listeners :func:`instrument` puts on an engine's dialect.

    They are dialect events (``do_execute`` and its two siblings), not connection events
    such as ``before_cursor_execute``: with any connection event on an engine, SQLAlchemy
    runs every connection of it through its event machinery, which measured about 55 µs
    per ORM transaction (5% of a single-row update), more than the rest of the
    instrumentation. Transaction boundaries are read from the driver instead of the
    ``begin``/``commit``/``rollback`` events: a statement that finds the connection idle
    starts a new transaction, in which nothing was sent yet."""

    def __init__(self, policy: NoActorPolicy | None) -> None:
        self.policy = policy

    def _state(self, conn: SAConnection) -> _State | None:
        try:
            info = conn.info
        except NotImplementedError:
            return None  # the dialect's own queries at first connect: no context needed
        state = info.get(_STATE_KEY)
        if state is None:
            state = info[_STATE_KEY] = _State()
        return state

    def do_execute(self, cursor: Any, statement: str, parameters: Any, context: Any) -> None:
        self.before(statement, context)

    def do_executemany(self, cursor: Any, statement: str, parameters: Any, context: Any) -> None:
        self.before(statement, context)

    def do_execute_no_params(self, cursor: Any, statement: str, context: Any) -> None:
        self.before(statement, context)

    def before(self, statement: str, context: Any) -> None:
        """Before each statement: make the database hold the current context."""
        conn = context.root_connection
        state = self._state(conn)
        if state is None:
            return
        dbapi = conn.connection.dbapi_connection
        autocommit = bool(getattr(dbapi, "autocommit", False))
        if not autocommit:
            status = _transaction_status(dbapi)
            if status == pq.TransactionStatus.IDLE:
                state.reset()  # this statement starts a transaction: nothing sent in it
            elif status is None:
                state.reset(unknown=True)
        if _CHANGES_SETTING.match(statement):
            # It ends the transaction (or chains a new one) or rolls back to a
            # savepoint: what the database holds afterwards is unknown.
            state.reset(unknown=True)
            return
        snap = current_context()
        if state.snapshot is snap and snap.is_resolved:
            return  # already sent in this transaction
        cached, text = state.cache
        if cached is not snap or not snap.is_resolved:
            text = context_json(snap, no_actor=self.policy) or ""
            state.cache = (snap, text)
        if autocommit:
            if state.session_value != text:
                self._send(dbapi, _SET_SESSION, text)
                state.session_value = text
        else:
            held = state.session_value if state.tx_value is None else state.tx_value
            if (state.tx_value is _UNKNOWN or held != text) and not _begin_with(dbapi, text):
                self._send(dbapi, _SET_LOCAL, text)
            state.tx_value = text
        state.snapshot = snap

    @staticmethod
    def _send(dbapi: Any, query: str, text: str) -> None:
        # A cursor of our own: the statement's may be a named (server-side) cursor.
        cursor = dbapi.cursor()
        try:
            cursor.execute(query, (text,))
        finally:
            cursor.close()

    def listeners(self) -> list[tuple[str, Any]]:
        return [
            ("do_execute", self.do_execute),
            ("do_executemany", self.do_executemany),
            ("do_execute_no_params", self.do_execute_no_params),
        ]


#: Statements after which the transaction-local setting may not hold what was sent: the
#: end of a transaction (which may chain a new one), a rollback to a savepoint. (A
#: setting the application makes itself, as revert does, is left alone, as before.)
_CHANGES_SETTING: Final = re.compile(
    r"\s*(?:rollback|abort|commit|end|prepare\s+transaction)\b", re.IGNORECASE
)


def _transaction_status(dbapi: Any) -> int | None:
    """The libpq transaction status of a DBAPI connection (psycopg, psycopg2, SQLAlchemy's
    asyncio adaptation), or None if it cannot be read."""
    pgconn = getattr(dbapi, "pgconn", None)
    if pgconn is not None:
        return int(pgconn.transaction_status)
    status = getattr(getattr(dbapi, "info", None), "transaction_status", None)
    return None if status is None else int(status)


def _begin_command(conn: psycopg.Connection[Any]) -> bytes:
    """The ``BEGIN`` psycopg would send to start a transaction on ``conn``, with the
    isolation level, read-only and deferrable modes set on it (SQLAlchemy sets them
    there)."""
    parts = [b"BEGIN"]
    if conn.isolation_level is not None:
        level = psycopg.IsolationLevel(conn.isolation_level).name.replace("_", " ")
        parts.append(b"ISOLATION LEVEL " + level.encode())
    if conn.read_only is not None:
        parts.append(b"READ ONLY" if conn.read_only else b"READ WRITE")
    if conn.deferrable is not None:
        parts.append(b"DEFERRABLE" if conn.deferrable else b"NOT DEFERRABLE")
    return b" ".join(parts)


def _begin_with(dbapi: object, text: str) -> bool:
    """Start the transaction of a sync psycopg connection, before its first statement,
    with the context set in the same round trip: ``BEGIN; SET LOCAL sealtrail.context =
    '...'`` as one simple-protocol query (the context quoted as a literal by psycopg).
    psycopg then sees a transaction in progress and sends no ``BEGIN`` of its own, so
    sending the context costs no round trip. The setting is transaction-local exactly as
    with :func:`set_context`.

    False (nothing sent) when that does not apply: another driver or an asyncio
    connection, a transaction already open (the context changed within it), pipeline
    mode, a broken connection. The caller then sends the setting on its own."""
    if type(dbapi) is not psycopg.Connection:
        return False
    pgconn = dbapi.pgconn
    if (
        pgconn.status != pq.ConnStatus.OK
        or pgconn.transaction_status != pq.TransactionStatus.IDLE
        or pgconn.pipeline_status != pq.PipelineStatus.OFF
        or dbapi.autocommit
    ):
        return False
    # SET LOCAL is set_config(..., true) without a query to plan and a row to send back.
    query = (
        _begin_command(dbapi)
        + b"; SET LOCAL sealtrail.context = "
        + sql.Literal(text).as_bytes(dbapi)
    )
    with dbapi.lock:
        result = pgconn.exec_(query)
    if result.status != pq.ExecStatus.COMMAND_OK:
        message = (result.error_message or b"").decode("utf-8", "replace").strip()
        sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
        error: type[psycopg.Error] = psycopg.OperationalError
        if sqlstate:
            with contextlib.suppress(KeyError):
                error = psycopg.errors.lookup(sqlstate.decode())
        raise error(f"sending the audit context failed: {message}")
    return True


_INSTRUMENTED: weakref.WeakKeyDictionary[Any, _Instrumentation] = weakref.WeakKeyDictionary()
_DRIVERS: Final = frozenset({"psycopg", "psycopg2"})


def instrument(engine: Engine | Any, *, no_actor: NoActorPolicy | None = None) -> None:
    """Send the audit context with every transaction of a SQLAlchemy engine (sync, or
    ``AsyncEngine``) on PostgreSQL with psycopg.

    The current :func:`sealtrail.context` is sent as the transaction-local
    ``sealtrail.context`` with the transaction's ``BEGIN`` (sync psycopg: in the same round
    trip, so it costs none), and again before any later statement if the context changed
    in between or a rollback to a savepoint undid it (a statement of its own, only then;
    asyncio engines and psycopg2 send it so at the first statement too). Being
    transaction-local, it cannot outlive the transaction into another request, thread or
    task that gets the pooled connection next; on an autocommit connection it is set for
    the session and re-sent whenever the context differs. ``no_actor`` is the policy for
    writes without an actor, as for explicit capture. Calling it again replaces the policy.
    """
    from sqlalchemy import event

    sync_engine = getattr(engine, "sync_engine", engine)
    dialect = getattr(sync_engine, "dialect", None)
    if dialect is None:
        raise CaptureError(f"expected a SQLAlchemy engine, got {type(engine).__name__}")
    if dialect.name != "postgresql" or dialect.driver not in _DRIVERS:
        raise CaptureError(
            f"instrument() supports PostgreSQL with psycopg, not {dialect.name}+{dialect.driver}"
            " (for other databases see sealtrail.capture.orm)"
        )
    uninstrument(sync_engine)
    instrumentation = _Instrumentation(no_actor)
    for name, listener in instrumentation.listeners():
        event.listen(sync_engine, name, listener)
    _INSTRUMENTED[sync_engine] = instrumentation


def uninstrument(engine: Engine | Any) -> None:
    """Stop sending the audit context from this engine (no-op if it was not instrumented)."""
    from sqlalchemy import event

    sync_engine = getattr(engine, "sync_engine", engine)
    instrumentation = _INSTRUMENTED.pop(sync_engine, None)
    if instrumentation is None:
        return
    for name, listener in instrumentation.listeners():
        event.remove(sync_engine, name, listener)
