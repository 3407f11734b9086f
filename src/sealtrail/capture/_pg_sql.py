"""The SQL text of PostgreSQL capture: shared objects and per-table trigger functions.

Pure string building, no database access: :mod:`sealtrail.capture.pg` reads the catalog,
calls these functions, and runs what they return. Every name that comes from the database
or the application is quoted here (:func:`ident`, :func:`lit`), so hostile table and
column names are data.

How one statement is captured (chosen by measurement, see docs/db-capture.md): one
statement-level ``AFTER`` trigger per operation reads the statement's transition tables
and writes every event of the statement with a single ``INSERT ... SELECT``, which also
reads the context and computes what the events share, once (:func:`base_sql`, inlined:
one SQL statement, not a plpgsql statement per piece). An update of one row takes a path
without join or window function. Each event is assembled as JSON text with its keys in
jsonb's order and parsed into ``jsonb`` once, which measured faster than nested
``jsonb_build_object`` calls. Update functions run with ``enable_nestloop`` and
``enable_mergejoin`` off, so a plan cached for a small statement cannot turn the old/new
join of a 10,000-row statement into a quadratic nested loop.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import orjson

from sealtrail.capture.change import COMMIT_LOCK, COMMIT_SEQ, OUTBOX_COMMIT_TABLE, OUTBOX_TABLE

#: Bumped when the generated SQL changes meaning: installed triggers then report stale.
VERSION: Final = 3

OUTBOX: Final = OUTBOX_TABLE
COMMIT: Final = OUTBOX_COMMIT_TABLE
SETTING: Final = "sealtrail.context"

#: Names of the triggers on a tracked table, by what they capture.
TRIGGERS: Final = {
    "insert": "sealtrail_capture_insert",
    "update": "sealtrail_capture_update",
    "delete": "sealtrail_capture_delete",
    "truncate": "sealtrail_capture_truncate",
    "pk": "sealtrail_capture_pk",
}
#: Guards on the outbox tables (statement level).
GUARDS: Final = ("sealtrail_guard_update", "sealtrail_guard_delete", "sealtrail_guard_truncate")
COMMIT_TRIGGER: Final = "sealtrail_commit_order"


def token(*names: str) -> str:
    """A short stable name made of ``names`` (for functions, settings, event triggers)."""
    return hashlib.sha256("\0".join(names).encode()).hexdigest()[:16]


def event_triggers(schema: str) -> tuple[str, str]:
    """The DDL watch's event triggers (database-wide objects: one pair per capture schema)."""
    t = token(schema)
    return (f"sealtrail_capture_ddl_end_{t}", f"sealtrail_capture_sql_drop_{t}")


_MAX_SAFE: Final = 2**53 - 1


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def lit(text: str) -> str:
    """A SQL string literal, correct whatever ``standard_conforming_strings`` says."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def json_lit(value: object) -> str:
    """A SQL string literal holding ``value`` as compact JSON."""
    return lit(orjson.dumps(value).decode())


# --------------------------------------------------------------------------------------
# Column values


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a tracked table as the generator needs it.

    ``kind`` picks how its value is written (see :func:`json_expr`); ``cast`` is the SQL
    type to cast a domain value to before that (``""`` for a base type); ``equality``
    says whether ``IS DISTINCT FROM`` works on it (else values compare as text).
    """

    attnum: int
    name: str
    type_sql: str
    kind: str
    cast: str = ""
    equality: bool = True


def _ref(alias: str, col: Column) -> str:
    ref = f"{alias}.{ident(col.name)}"
    return f"({ref})::{col.cast}" if col.cast else ref


def json_expr(col: Column, alias: str, s: str) -> str:
    """SQL for the column's value as JSON text (NULL when the value is NULL), written the
    way :func:`sealtrail.capture.change.json_value` writes the Python value psycopg reads."""
    r = _ref(alias, col)
    k = col.kind
    if k in ("int", "bool"):
        return f"({r})::text"
    if k == "int8":
        return (
            f"CASE WHEN {r} BETWEEN -{_MAX_SAFE} AND {_MAX_SAFE} THEN ({r})::text "
            f"ELSE '\"' || ({r})::text || '\"' END"
        )
    if k in ("float4", "float8"):
        return f"'\"' || {s}.sealtrail_float_text(({r})::text) || '\"'"
    if k in ("numeric", "uuid"):
        return f"'\"' || ({r})::text || '\"'"
    if k in ("text", "bpchar"):
        return f"to_json({r})::text"
    if k == "bytea":
        return f"'\"\\\\x' || encode({r}, 'hex') || '\"'"
    if k == "tstz":
        return f"'\"' || {s}.sealtrail_tstz({r}) || '\"'"
    if k == "ts":
        return f"'\"' || {s}.sealtrail_ts({r}) || '\"'"
    if k == "time":
        return f"'\"' || {s}.sealtrail_time({r}) || '\"'"
    if k == "date":
        return f"to_json({r})::text"
    if k == "json":
        return f"{s}.sealtrail_json_safe(({r})::jsonb)::text"
    if k == "jsonb":
        return f"{s}.sealtrail_json_safe({r})::text"
    if k == "array":
        return f"to_json({r})::text"
    if k == "array_text":
        return f"to_json(({r})::text[])::text"
    if k == "array_float":
        return f"to_json(({r})::float8[]::text[])::text"
    return f"{s}.sealtrail_json_safe(to_jsonb({r}))::text"


def text_expr(col: Column, alias: str, s: str) -> str:
    """SQL for the column's value as the text :func:`change.pk_text` makes of it."""
    r = _ref(alias, col)
    k = col.kind
    if k in ("int", "int8", "bool", "numeric", "uuid", "text"):
        return f"({r})::text"
    if k == "bpchar":
        return f"concat({r})"  # its output, padding kept (a cast to text drops it)
    if k in ("float4", "float8"):
        return f"{s}.sealtrail_float_text(({r})::text)"
    if k == "bytea":
        return f"'\\\\x' || encode({r}, 'hex')"
    if k in ("tstz", "ts", "time"):
        return f"{s}.sealtrail_{k}({r})"
    return f"({json_expr(col, alias, s)})::jsonb #>> '{{}}'"


def _nullsafe(expr: str) -> str:
    return f"coalesce({expr}, 'null')"


def _key(name: str) -> str:
    """The JSON text of an object key."""
    return orjson.dumps(name).decode()


def _distinct(col: Column) -> str:
    o, n = _ref("o", col), _ref("n", col)
    if col.equality:
        return f"{o} IS DISTINCT FROM {n}"
    if col.kind == "json":
        return f"({o})::jsonb IS DISTINCT FROM ({n})::jsonb"
    return f"({o})::text IS DISTINCT FROM ({n})::text"


def _concat(parts: Sequence[str]) -> str:
    return "\n      || ".join(parts)


# --------------------------------------------------------------------------------------
# Per-table capture


@dataclass(frozen=True, slots=True)
class TableSpec:
    """A tracked table, resolved against the catalog."""

    schema: str
    name: str
    columns: tuple[Column, ...]  # every column, in attnum order
    pk: tuple[str, ...]
    exclude: frozenset[str]
    mask: frozenset[str]

    @property
    def qualified(self) -> str:
        """``schema.table`` as the events name it (unquoted)."""
        return f"{self.schema}.{self.name}"

    @property
    def sql_name(self) -> str:
        return f"{ident(self.schema)}.{ident(self.name)}"

    @property
    def token(self) -> str:
        """A short stable name for the table's functions and settings."""
        return token(self.schema, self.name)

    @property
    def captured(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.name not in self.exclude)

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)

    def function_name(self, op: str) -> str:
        return f"sealtrail_cap_{self.token}_{op}"

    @property
    def pk_setting(self) -> str:
        return f"sealtrail.pkc_{self.token}"


def _jsonb_order(key: str) -> tuple[int, bytes]:
    """Where ``key`` goes in a ``jsonb`` object: jsonb sorts keys by length, then bytes.
    The events are written with their keys in that order, so that parsing them into
    jsonb finds every object already sorted (a third cheaper to parse, measured)."""
    data = key.encode()
    return len(data), data


def _in_jsonb_order(columns: Sequence[Column]) -> list[Column]:
    return sorted(columns, key=lambda c: _jsonb_order(c.name))


def _row_parts(spec: TableSpec, alias: str, s: str) -> tuple[str, str]:
    """SQL for (target id, data.db.pk JSON text) of a row."""
    cols = [spec.column(name) for name in spec.pk]
    if len(cols) == 1:
        tid = text_expr(cols[0], alias, s)
    else:
        ordered = sorted(cols, key=lambda c: c.name)
        pieces = [
            lit(("{" if i == 0 else ",") + _key(c.name) + ":") + " || " + json_expr(c, alias, s)
            for i, c in enumerate(ordered)
        ]
        tid = " || ".join(pieces) + " || '}'"
    pk_pieces = [
        lit(("{" if i == 0 else ",") + _key(c.name) + ":") + " || " + json_expr(c, alias, s)
        for i, c in enumerate(_in_jsonb_order(cols))
    ]
    pk_json = " || ".join(pk_pieces) + " || '}'"
    # An empty text key would be an empty target.id, which the envelope refuses.
    return f"coalesce(nullif({tid}, ''), '\"\"')", pk_json


def _full_changes(spec: TableSpec, alias: str, side: str, s: str) -> str:
    """SQL for the ``changes`` JSON text of an insert (``new``) or delete (``old``)."""
    parts = []
    for i, col in enumerate(_in_jsonb_order(spec.captured)):
        head = ("{" if i == 0 else ",") + _key(col.name) + ":"
        if col.name in spec.mask:
            parts.append(lit(head + '{"' + side + '":{"masked":true}}'))
        else:
            value = _nullsafe(json_expr(col, alias, s))
            parts.append(lit(head + '{"' + side + '":') + " || " + value)
            parts.append("'}'")
    parts.append("'}'")
    return _concat(parts)


def _update_changes(spec: TableSpec, s: str) -> str:
    """SQL for the changed columns of an update, as ``,"col":{...}`` pieces ('' if none)."""
    parts = []
    for col in _in_jsonb_order(spec.captured):
        key = "," + _key(col.name) + ":"
        if col.name in spec.mask:
            value = lit(key + '{"new":{"masked":true},"old":{"masked":true}}')
        else:
            value = (
                lit(key + '{"new":')
                + " || "
                + _nullsafe(json_expr(col, "n", s))
                + " || ',\"old\":' || "
                + _nullsafe(json_expr(col, "o", s))
                + " || '}'"
            )
        parts.append(f"(CASE WHEN {_distinct(col)} THEN {value} ELSE '' END)")
    return _concat(parts)


def _context_field(key: str, kind: str) -> str:
    """SQL for ``,"key":<value>`` of an envelope field the context gives ('' if absent or
    of the wrong JSON type). Objects lose their null members, as before."""
    value = f"c.ctx -> {lit(key)}"
    text = f"jsonb_strip_nulls({value})::text" if kind == "object" else f"({value})::text"
    return (
        f"CASE WHEN jsonb_typeof({value}) = {lit(kind)} "
        f"THEN {lit(',' + _key(key) + ':')} || {text} ELSE '' END"
    )


def base_sql(s: str) -> str:
    """SQL (a SELECT of one row) of what every event of a statement shares, as JSON text
    pieces, each to be put where jsonb sorts it (see :func:`_jsonb_order`):
    ``time_actor`` (``"time":...,"actor":...``: the context's actor, or the database role
    when it gives none), ``f_reason``, ``f_source``, ``f_tenant``, ``f_subject``
    (``,"reason":...`` and so on, or '' when the context does not give the field, or
    gives it with the wrong JSON type), ``data_open`` (the opening of ``data``: the
    context's extra data), ``db_role_txid`` and ``db_app`` (pieces of ``data.db``);
    ``txid``; ``uuid_prefix``, ``id_mid`` and ``id_base`` (the parts of the statement's
    event ids, see ``_EID``); ``refuse`` (the context's refusal: no actor); ``first``.

    ``first``: the id of the statement's first event, also put in the setting
    ``sealtrail.first``, so that the deferred trigger ``sealtrail_commit_order`` fires
    for that outbox row (and no other of the statement), at commit. Every capturing
    statement marks its first event (the first to fire numbers the transaction, the others
    find it numbered), so a client that sets the setting itself cannot keep its
    transaction out of the commit order.

    The context is read and parsed once per statement, in plain SQL (no plpgsql
    statement per piece); a context that is not a JSON object fails the write."""
    return f"""  SELECT c.txid, c.uuid_prefix, c.id_mid, c.id_base,
    '"time":"' || to_char(c.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '",'
      || CASE WHEN jsonb_typeof(c.ctx -> 'actor') = 'object'
              THEN '"actor":' || jsonb_strip_nulls(c.ctx -> 'actor')::text
              ELSE '"actor":{{"id":' || to_json('db:' || c.who)::text || ',"type":"service"}}'
         END AS time_actor,
    {_context_field("reason", "string")} AS f_reason,
    {_context_field("source", "object")} AS f_source,
    {_context_field("tenant", "string")} AS f_tenant,
    {_context_field("subject", "string")} AS f_subject,
    CASE WHEN jsonb_typeof(c.ctx -> 'data') = 'object' AND (c.ctx -> 'data') - 'db' <> '{{}}'
         THEN left(((c.ctx -> 'data') - 'db')::text, -1) || ',' ELSE '{{' END AS data_open,
    ',"role":' || to_json(c.who)::text || ',"txid":' || to_json(c.txid)::text AS db_role_txid,
    CASE WHEN c.ctx IS NULL THEN ',"app_context":"missing"'
         ELSE ',"app_context":"present"' END AS db_app,
    c.ctx ->> 'missing_actor' AS refuse,
    set_config('sealtrail.first',
               c.uuid_prefix || c.id_mid || lpad(to_hex(c.id_base), 12, '0'), true) AS first
  FROM (SELECT t.txid, t.at, t.who,
               substr(t.hex, 1, 8) || '-' || substr(t.hex, 9, 4) || '-7' AS uuid_prefix,
               substr(t.rnd, 16, 9) AS id_mid,
               ('x' || substr(t.rnd, 25, 12))::bit(48)::bigint >> 1 AS id_base,
               CASE WHEN t.parsed IS NULL OR jsonb_typeof(t.parsed) = 'object' THEN t.parsed
                    ELSE {s}.sealtrail_fail(
                      'the setting sealtrail.context must be a JSON object',
                      'invalid_parameter_value')::jsonb
               END AS ctx
        FROM (SELECT nullif(current_setting('sealtrail.context', true), '')::jsonb AS parsed,
                     CASE WHEN current_setting('role') = 'none' THEN session_user::text
                          ELSE current_setting('role') END AS who,
                     pg_current_xact_id()::text AS txid,
                     statement_timestamp() AS at,
                     lpad(to_hex(floor(date_part('epoch', statement_timestamp()) * 1000)::bigint),
                          12, '0') AS hex,
                     gen_random_uuid()::text AS rnd
              OFFSET 0) t
        OFFSET 0) c"""


def _envelope(spec: TableSpec, op: str, s: str, *, truncate: bool = False) -> str:
    """SQL for the event (``json``) from ``b`` (:func:`base_sql`) and ``e`` (eid, tid, pk,
    ch): its JSON text, every object's keys in jsonb's order (as the outbox held it when
    its column was ``jsonb``; an outbox installed so still gets it by assignment). Under a
    refusing context (no actor) it fails the write instead, at the statement's first
    event."""
    action = {"insert": "db.insert", "update": "db.update", "delete": "db.delete"}[op]
    target_type = _key(f"db:{spec.qualified}")
    table = ',"table":' + _key(spec.qualified) + (',"truncate":true' if truncate else "")
    # Keys by length, then bytes: id, data (db: op, pk, role, txid, table, truncate,
    # app_context), time, actor, action, reason, schema, source, target (id, type),
    # tenant, changes, outcome, subject.
    text = " || ".join(
        [
            '\'{"id":"\'',
            "e.eid",
            lit('","data":'),
            "b.data_open",
            lit(f'"db":{{"op":"{op}","pk":'),
            "e.pk",
            "b.db_role_txid",
            lit(table),
            "b.db_app",
            "'}},'",
            "b.time_actor",
            lit(f',"action":"{action}"'),
            "b.f_reason",
            "',\"schema\":1'",
            "b.f_source",
            '\',"target":{"id":\'',
            "to_json(e.tid)::text",
            lit(f',"type":{target_type}}}'),
            "b.f_tenant",
            "',\"changes\":'",
            "e.ch",
            '\',"outcome":"success"\'',
            "b.f_subject",
            "'}'",
        ]
    )
    return (
        f"CASE WHEN b.refuse IS NULL THEN ({text})::json "
        f"ELSE {s}.sealtrail_fail(b.refuse, 'insufficient_privilege')::json END"
    )


# The event ids of a statement (RFC 9562 UUIDv7, section 6.2 method 2, "monotonic
# random"): the statement's time in milliseconds, then random bits drawn once per
# statement (b.id_mid, b.id_base: 71 bits from gen_random_uuid()) and counting up from
# there, one per event. Ids that grow within a statement go into the outbox's unique
# index at its right edge, as the other two indexes' keys do, instead of at random
# places (random ones cost about 5% more CPU on a 10,000-row update, in index page reads
# and splits). The first event's id is b.first, which queues the commit-order trigger.
_EID: Final = (
    "b.uuid_prefix || b.id_mid || lpad(to_hex(b.id_base + row_number() OVER () - 1), 12, '0')"
)
# The same for a statement of one row.
_EID_ONE: Final = "b.first"


def _from_base(s: str) -> str:
    """The FROM clause head shared by every capture statement: ``b``, evaluated once per
    statement and before any event row (the rows are LATERAL to it)."""
    return f"(\n{base_sql(s)}\n  OFFSET 0) b CROSS JOIN LATERAL"


def _insert_events(spec: TableSpec, op: str, source: str, s: str, *, truncate: bool = False) -> str:
    """``INSERT ... SELECT`` of the events of an insert or delete (or truncate) from
    ``source`` (aliased as the row)."""
    alias = "n" if op == "insert" else "o"
    side = "new" if op == "insert" else "old"
    tid, pk = _row_parts(spec, alias, s)
    return f"""INSERT INTO {s}.{OUTBOX} (event_id, txid, event)
  SELECT e.eid::uuid, b.txid, {_envelope(spec, op, s, truncate=truncate)}
  FROM {_from_base(s)}
       (SELECT {_EID} AS eid, x.*
        FROM (SELECT {tid} AS tid,
      {pk} AS pk,
      {_full_changes(spec, alias, side, s)} AS ch
              FROM {source} {alias}) x
        OFFSET 0) e"""


def _update_events(spec: TableSpec, s: str, *, rows: str) -> str:
    """``INSERT ... SELECT`` of the events of an update. ``rows``: ``one`` (the statement
    changed one row: nothing to match), ``key`` (old and new rows matched by key) or
    ``position`` (by position, when a key changed)."""
    tid, pk = _row_parts(spec, "o", s)
    eid = _EID
    if rows == "one":
        source = "sealtrail_old o CROSS JOIN sealtrail_new n"
        eid = _EID_ONE
    elif rows == "position":
        pos = "_sealtrail_pos"
        names = {c.name for c in spec.columns}
        while pos in names:
            pos += "_"
        p = ident(pos)
        source = (
            f"(SELECT row_number() OVER () AS {p}, t.* FROM sealtrail_old t) o JOIN "
            f"(SELECT row_number() OVER () AS {p}, t.* FROM sealtrail_new t) n "
            f"ON o.{p} = n.{p}"
        )
    else:
        on = " AND ".join(f"o.{ident(c)} = n.{ident(c)}" for c in spec.pk)
        source = f"sealtrail_old o JOIN sealtrail_new n ON {on}"
    return f"""INSERT INTO {s}.{OUTBOX} (event_id, txid, event)
  SELECT e.eid::uuid, b.txid, {_envelope(spec, "update", s)}
  FROM {_from_base(s)}
       (SELECT {eid} AS eid, x.tid, x.pk,
               '{{' || substr(x.ch, 2) || '}}' AS ch
        FROM (SELECT {tid} AS tid,
      {pk} AS pk,
      {_update_changes(spec, s)} AS ch
              FROM {source}
              OFFSET 0) x
        WHERE x.ch <> ''
        OFFSET 0) e"""


@dataclass(frozen=True, slots=True)
class Function:
    """One generated capture function: its plpgsql body and the settings it runs with
    (``name=value``, as ``pg_proc.proconfig`` lists them)."""

    name: str
    body: str
    config: tuple[str, ...]

    def create(self, s: str) -> str:
        sets = "".join(
            # A list is a list of names, not one quoted name.
            f"SET {key} = {value if key == 'search_path' else lit(value)}\n"
            for key, _, value in (item.partition("=") for item in self.config)
        )
        return (
            f"CREATE OR REPLACE FUNCTION {s}.{ident(self.name)}() RETURNS trigger\n"
            f"LANGUAGE plpgsql SECURITY DEFINER\n{sets}AS {lit(self.body)}"
        )


def _config(spec: TableSpec, op: str) -> tuple[str, ...]:
    """The settings a capture function needs, only those (each costs a few microseconds
    per statement): a fixed search path (it runs as its owner); values written the same
    whatever the writer's session says; no JIT compilation of a plan cached for a small
    statement; and for updates, a hash join of old and new rows (a nested loop planned
    for a two-row statement would make a 10,000-row one quadratic)."""
    kinds = {c.kind for c in spec.captured}
    config = ["search_path=pg_catalog, pg_temp"]
    if "other" in kinds:  # to_jsonb of anything: times, intervals, floats inside
        config += ["TimeZone=UTC", "DateStyle=ISO, YMD", "IntervalStyle=postgres"]
    if kinds & {"float4", "float8", "array_float", "other"}:
        config.append("extra_float_digits=1")
    config.append("jit=off")
    if op == "update":
        # Old and new rows of a statement of many rows are matched in a hash join: no
        # nested loop (quadratic), no merge join (two sorts; 2% slower on 10,000 rows).
        config += ["enable_nestloop=off", "enable_mergejoin=off"]
    return tuple(config)


def _body(statement: str, source: str) -> str:
    return f"""
BEGIN
  IF NOT EXISTS (SELECT FROM {source}) THEN
    RETURN NULL;
  END IF;
  {statement};
  RETURN NULL;
END
"""


def table_functions(spec: TableSpec, s: str) -> dict[str, Function]:
    """The table's capture functions, by name.

    Each is one plpgsql block around one set-based ``INSERT ... SELECT`` (no loop, no
    statement per row): what every event of the statement shares (``b``, see
    :func:`base_sql`) is computed once, then every row's event. An update of one row (the
    common ORM case) takes a path of its own: with one old and one new row there is
    nothing to match, so no join and no window."""
    ins = _body(_insert_events(spec, "insert", "sealtrail_new", s), "sealtrail_new")
    dele = _body(_insert_events(spec, "delete", "sealtrail_old", s), "sealtrail_old")
    trunc = _body(
        _insert_events(spec, "delete", f"ONLY {spec.sql_name}", s, truncate=True),
        f"ONLY {spec.sql_name}",
    )
    pkc = lit(spec.pk_setting)
    upd = f"""
DECLARE
  n integer;
BEGIN
  SELECT count(*) INTO n FROM (SELECT FROM sealtrail_new LIMIT 2) x;
  IF n = 0 THEN
    RETURN NULL;
  END IF;
  IF current_setting({pkc}, true) = '1' THEN
    -- A key changed in this statement (flagged by the row trigger {TRIGGERS["pk"]}): old
    -- and new rows cannot be matched by key, so match them by position; PostgreSQL
    -- appends each row's old and new versions to the transition tables together.
    PERFORM set_config({pkc}, '', true);
    IF n = 1 THEN
      {_update_events(spec, s, rows="one")};
    ELSE
      {_update_events(spec, s, rows="position")};
    END IF;
  ELSIF n = 1 THEN
    {_update_events(spec, s, rows="one")};
  ELSE
    {_update_events(spec, s, rows="key")};
  END IF;
  RETURN NULL;
END
"""
    bodies = {"insert": ins, "update": upd, "delete": dele, "truncate": trunc}
    return {
        spec.function_name(op): Function(spec.function_name(op), body, _config(spec, op))
        for op, body in bodies.items()
    }


def table_triggers(spec: TableSpec, s: str) -> dict[str, str]:
    """Trigger name -> ``CREATE OR REPLACE TRIGGER`` statement."""
    t = spec.sql_name
    fn = {op: f"{s}.{ident(spec.function_name(op))}" for op in ("insert", "update", "delete")}
    pk_changed = " OR ".join(f"OLD.{ident(c)} IS DISTINCT FROM NEW.{ident(c)}" for c in spec.pk)
    return {
        TRIGGERS["insert"]: (
            f"CREATE OR REPLACE TRIGGER {TRIGGERS['insert']} AFTER INSERT ON {t} "
            f"REFERENCING NEW TABLE AS sealtrail_new FOR EACH STATEMENT "
            f"EXECUTE FUNCTION {fn['insert']}()"
        ),
        TRIGGERS["update"]: (
            f"CREATE OR REPLACE TRIGGER {TRIGGERS['update']} AFTER UPDATE ON {t} "
            f"REFERENCING OLD TABLE AS sealtrail_old NEW TABLE AS sealtrail_new "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {fn['update']}()"
        ),
        TRIGGERS["delete"]: (
            f"CREATE OR REPLACE TRIGGER {TRIGGERS['delete']} AFTER DELETE ON {t} "
            f"REFERENCING OLD TABLE AS sealtrail_old FOR EACH STATEMENT "
            f"EXECUTE FUNCTION {fn['delete']}()"
        ),
        TRIGGERS["truncate"]: (
            f"CREATE OR REPLACE TRIGGER {TRIGGERS['truncate']} BEFORE TRUNCATE ON {t} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION "
            f"{s}.{ident(spec.function_name('truncate'))}()"
        ),
        TRIGGERS["pk"]: (
            f"CREATE OR REPLACE TRIGGER {TRIGGERS['pk']} AFTER UPDATE ON {t} FOR EACH ROW "
            f"WHEN ({pk_changed}) EXECUTE FUNCTION {s}.sealtrail_pk_changed("
            f"{lit(spec.pk_setting)})"
        ),
    }


def enable_triggers(spec_sql_name: str, names: Sequence[str], mode: str) -> str:
    """One ``ALTER TABLE`` setting every trigger's firing mode (one statement, so the DDL
    watch sees them all in their final state)."""
    how = "ENABLE ALWAYS TRIGGER" if mode == "A" else "ENABLE TRIGGER"
    return f"ALTER TABLE {spec_sql_name} " + ", ".join(f"{how} {ident(n)}" for n in names)


# --------------------------------------------------------------------------------------
# Shared objects

_SHARED: Final = r"""
CREATE TABLE IF NOT EXISTS {s}.sealtrail_outbox (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  event_id uuid NOT NULL UNIQUE,
  txid text NOT NULL,
  event json NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
-- The relay joins events to their transaction's commit row.
CREATE INDEX IF NOT EXISTS sealtrail_outbox_txid ON {s}.sealtrail_outbox (txid, id);
CREATE SEQUENCE IF NOT EXISTS {s}.sealtrail_outbox_commit_seq;
CREATE TABLE IF NOT EXISTS {s}.sealtrail_outbox_commit (
  txid text PRIMARY KEY,
  commit_seq bigint UNIQUE NOT NULL
);

"""

_SHARED_FUNCTIONS: Final = r"""
-- Float text as Python's repr writes it (json_value): PostgreSQL's shortest digits (of a
-- float4 or float8), with Python's spelling of NaN and the infinities, and positional
-- notation wherever Python uses it (up to 1e16; PostgreSQL switches earlier).
CREATE OR REPLACE FUNCTION {s}.sealtrail_float_positional(t text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $f$
DECLARE
  neg boolean := left(t, 1) = '-';
  mantissa text := split_part(ltrim(t, '-'), 'e', 1);
  e int := split_part(t, 'e', 2)::int;
  digits text := replace(mantissa, '.', '');
  result text;
BEGIN
  IF e < 0 OR e >= 16 THEN
    RETURN t;
  ELSIF length(digits) <= e + 1 THEN
    result := rpad(digits, e + 1, '0');
  ELSE
    result := left(digits, e + 1) || '.' || substr(digits, e + 2);
  END IF;
  RETURN CASE WHEN neg THEN '-' || result ELSE result END;
END
$f$;

CREATE OR REPLACE FUNCTION {s}.sealtrail_float_text(t text) RETURNS text
LANGUAGE sql IMMUTABLE AS $f$
  SELECT CASE
    WHEN t = 'NaN' THEN 'nan'
    WHEN t = 'Infinity' THEN 'inf'
    WHEN t = '-Infinity' THEN '-inf'
    WHEN strpos(t, 'e+') > 0 THEN {s}.sealtrail_float_positional(t)
    ELSE t
  END
$f$;

CREATE OR REPLACE FUNCTION {s}.sealtrail_float(v float8) RETURNS text
LANGUAGE sql STABLE AS $f$
  SELECT {s}.sealtrail_float_text(v::text)
$f$;

-- Times as Python's isoformat writes them: microseconds only when there are some.
CREATE OR REPLACE FUNCTION {s}.sealtrail_tstz(v timestamptz) RETURNS text
LANGUAGE sql STABLE AS $f$
  SELECT CASE
    WHEN v >= '0001-01-01 00:00:00+00' AND v < '10000-01-01 00:00:00+00' THEN
      to_char(v AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
      || CASE WHEN date_part('microseconds', v)::int8 % 1000000 <> 0
              THEN to_char(v AT TIME ZONE 'UTC', '.US') ELSE '' END
      || '+00:00'
    WHEN isfinite(v) THEN to_char(v AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00" BC')
    ELSE v::text
  END
$f$;

CREATE OR REPLACE FUNCTION {s}.sealtrail_ts(v timestamp) RETURNS text
LANGUAGE sql STABLE AS $f$
  SELECT CASE
    WHEN v >= '0001-01-01 00:00:00' AND v < '10000-01-01 00:00:00' THEN
      to_char(v, 'YYYY-MM-DD"T"HH24:MI:SS')
      || CASE WHEN date_part('microseconds', v)::int8 % 1000000 <> 0
              THEN to_char(v, '.US') ELSE '' END
    WHEN isfinite(v) THEN to_char(v, 'YYYY-MM-DD"T"HH24:MI:SS.US BC')
    ELSE v::text
  END
$f$;

CREATE OR REPLACE FUNCTION {s}.sealtrail_time(v time) RETURNS text
LANGUAGE sql STABLE AS $f$
  SELECT CASE
    WHEN v = '24:00:00'::time THEN '24:00:00'
    WHEN date_part('microseconds', v)::int8 % 1000000 <> 0
      THEN to_char('2000-01-01'::timestamp + v, 'HH24:MI:SS.US')
    ELSE to_char('2000-01-01'::timestamp + v, 'HH24:MI:SS')
  END
$f$;

-- JSON with no floats: a number with a fraction becomes its float text (as Python's
-- json module and json_value would write it), an integer beyond +-(2**53-1) its digits.
CREATE OR REPLACE FUNCTION {s}.sealtrail_json_safe(j jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $f$
DECLARE
  kind text := jsonb_typeof(j);
  t text;
  num numeric;
BEGIN
  IF kind = 'number' THEN
    t := j::text;
    num := t::numeric;
    IF position('.' IN t) > 0 THEN
      IF abs(num) > 1.7976931348623157e308 THEN
        RETURN to_jsonb(CASE WHEN num < 0 THEN '-inf' ELSE 'inf' END);
      ELSIF num <> 0 AND abs(num) < 2.2250738585072014e-308 THEN
        RETURN to_jsonb(t);
      END IF;
      RETURN to_jsonb({s}.sealtrail_float(num::float8));
    ELSIF abs(num) > 9007199254740991 THEN
      RETURN to_jsonb(t);
    END IF;
    RETURN j;
  ELSIF kind = 'object' THEN
    IF NOT jsonb_path_exists(j, 'lax $.** ? (@.type() == "number")') THEN
      RETURN j;
    END IF;
    RETURN (SELECT coalesce(jsonb_object_agg(e.key, {s}.sealtrail_json_safe(e.value)), '{}')
            FROM jsonb_each(j) AS e);
  ELSIF kind = 'array' THEN
    IF NOT jsonb_path_exists(j, 'lax $.** ? (@.type() == "number")') THEN
      RETURN j;
    END IF;
    RETURN (SELECT coalesce(jsonb_agg({s}.sealtrail_json_safe(e.value) ORDER BY e.n), '[]')
            FROM jsonb_array_elements(j) WITH ORDINALITY AS e(value, n));
  END IF;
  RETURN j;
END
$f$;

-- UUIDv7 (RFC 9562): 48-bit Unix milliseconds, version 7, then 74 random bits taken from
-- gen_random_uuid() (a strong random source; its variant bits are v7's too).
CREATE OR REPLACE FUNCTION {s}.sealtrail_uuid_prefix(at timestamptz) RETURNS text
LANGUAGE plpgsql STABLE AS $f$
DECLARE
  hex text := lpad(to_hex(floor(extract(epoch FROM at) * 1000)::bigint), 12, '0');
BEGIN
  RETURN substr(hex, 1, 8) || '-' || substr(hex, 9, 4) || '-7';
END
$f$;

CREATE OR REPLACE FUNCTION {s}.sealtrail_uuidv7() RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $f$
BEGIN
  RETURN ({s}.sealtrail_uuid_prefix(clock_timestamp())
          || substr(gen_random_uuid()::text, 16))::uuid;
END
$f$;

-- Fails the statement with a message (called where plain SQL has no RAISE).
CREATE OR REPLACE FUNCTION {s}.sealtrail_fail(message text, code text) RETURNS text
LANGUAGE plpgsql VOLATILE AS $f$
BEGIN
  RAISE EXCEPTION 'sealtrail: %', message USING ERRCODE = code;
END
$f$;

-- What every event of a statement shares (see _pg_sql.base_sql; the capture functions
-- inline the same SQL). Called only from functions that fix search_path.
CREATE OR REPLACE FUNCTION {s}.sealtrail_base(
  OUT head text, OUT data_open text, OUT db_tail text, OUT txid text, OUT uuid_prefix text,
  OUT refuse text, OUT first text)
LANGUAGE sql VOLATILE AS $f$
SELECT '{"outcome":"success","schema":1,' || b.time_actor || b.f_reason || b.f_source
         || b.f_tenant || b.f_subject,
       b.data_open, substr(b.db_role_txid, 2) || b.db_app, b.txid, b.uuid_prefix, b.refuse,
       b.first
  FROM (
{base}
  OFFSET 0) b
$f$;

CREATE OR REPLACE FUNCTION {s}.sealtrail_commit_order() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
  -- One statement: the lock (held until this transaction has committed, so the next
  -- committer's number is drawn after this commit is visible and commit_seq orders
  -- transactions as they committed), then the number, drawn under it. A transaction
  -- already numbered (an earlier statement's trigger) is found through the key's index
  -- by ON CONFLICT, whatever plan is cached: a NOT EXISTS subquery planned while the
  -- table was empty scanned the whole table at every commit once it had grown.
  INSERT INTO {s}.sealtrail_outbox_commit (txid, commit_seq)
  SELECT NEW.txid, nextval({seq_lit}) FROM pg_advisory_xact_lock({lock1}, {lock2}) AS l
  ON CONFLICT (txid) DO NOTHING;
  RETURN NULL;
END
$f$;

CREATE OR REPLACE FUNCTION {s}.sealtrail_pk_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
  PERFORM set_config(TG_ARGV[0], '1', true);
  RETURN NULL;
END
$f$;

-- One event of Sealtrail's own (install, uninstall, capture disabled): the caller gives
-- action, target and data; actor, source, time, id and data.db come from the transaction.
CREATE OR REPLACE FUNCTION {s}.sealtrail_emit(ev jsonb) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' AS $f$
DECLARE
  b record;
  eid text;
  base jsonb;
BEGIN
  b := {s}.sealtrail_base();
  eid := coalesce(b.first, b.uuid_prefix || substr(gen_random_uuid()::text, 16));
  base := (b.head || ',"id":"' || eid || '","data":' || b.data_open || '"db":{' || b.db_tail
           || '}}}')::jsonb;
  base := base || (ev - 'data') || jsonb_build_object('data',
      (base -> 'data') || coalesce(ev -> 'data', '{}') || jsonb_build_object('db',
          (base -> 'data' -> 'db') || coalesce(ev -> 'data' -> 'db', '{}')));
  INSERT INTO {s}.sealtrail_outbox (event_id, txid, event) VALUES (eid::uuid, b.txid, base);
  RETURN eid::uuid;
END
$f$;

-- The outbox is append-only: UPDATE and TRUNCATE always refused, DELETE only by the
-- relay roles named as the trigger's arguments (grant_relay), or by their members.
CREATE OR REPLACE FUNCTION {s}.sealtrail_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
  IF TG_OP = 'DELETE' AND EXISTS (
      SELECT 1 FROM unnest(TG_ARGV) AS r(name)
       WHERE r.name = current_user::text
          OR (to_regrole(quote_ident(r.name)) IS NOT NULL
              AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
              AND pg_has_role(current_user, to_regrole(quote_ident(r.name)), 'USAGE'))) THEN
    RETURN NULL;
  END IF;
  RAISE EXCEPTION 'sealtrail: % on %.% is refused: the outbox is append-only%', TG_OP,
    TG_TABLE_SCHEMA, TG_TABLE_NAME,
    CASE WHEN TG_OP = 'DELETE' THEN ' (only the relay role deletes shipped events)' ELSE '' END
    USING ERRCODE = 'insufficient_privilege';
END
$f$;

REVOKE ALL ON FUNCTION {s}.sealtrail_emit(jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION {s}.sealtrail_base() FROM PUBLIC;
REVOKE ALL ON FUNCTION {s}.sealtrail_fail(text, text) FROM PUBLIC;
REVOKE ALL ON TABLE {s}.sealtrail_outbox, {s}.sealtrail_outbox_commit FROM PUBLIC;
"""

# The DDL watch: capture disabled on a tracked table (or the outbox guards) is an event.
_DDL_WATCH: Final = r"""
CREATE OR REPLACE FUNCTION {s}.sealtrail_ddl_watch() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
  r record;
  states jsonb;
  skip text[] := string_to_array(nullif(current_setting('sealtrail.uninstall', true), ''), ',');
  prefix text;
BEGIN
  IF to_regclass({outbox_lit}) IS NULL THEN
    RAISE WARNING 'sealtrail: the outbox % is gone; % not recorded', {outbox_lit}, TG_TAG;
    RETURN;
  END IF;
  IF TG_EVENT = 'ddl_command_end' THEN
    FOR r IN SELECT DISTINCT c.objid, n.nspname, k.relname
               FROM pg_event_trigger_ddl_commands() c
               JOIN pg_class k ON k.oid = c.objid
               JOIN pg_namespace n ON n.oid = k.relnamespace
              WHERE c.classid = 'pg_class'::regclass LOOP
      SELECT jsonb_object_agg(t.tgname, CASE t.tgenabled WHEN 'D' THEN 'disabled'
               WHEN 'O' THEN 'origin' WHEN 'R' THEN 'replica' ELSE 'always' END)
        INTO states
        FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
       WHERE t.tgrelid = r.objid AND t.tgname LIKE 'sealtrail\_%'
         AND p.pronamespace = to_regnamespace({s_lit})
         AND t.tgenabled::text <> coalesce(
               substring(obj_description(t.oid, 'pg_trigger') FROM '"mode":"(.)"'), 'A');
      IF states IS NOT NULL THEN
        PERFORM {s}.sealtrail_emit(jsonb_build_object(
          'action', 'sealtrail.capture.disable',
          'target', jsonb_build_object('type', 'db:table', 'id', r.nspname || '.' || r.relname),
          'data', jsonb_build_object('db', jsonb_build_object(
            'table', r.nspname || '.' || r.relname, 'command', TG_TAG, 'triggers', states))));
      END IF;
    END LOOP;
  ELSE
    FOR r IN SELECT d.address_names[1] AS nspname, d.address_names[2] AS relname,
                    array_agg(d.address_names[3] ORDER BY d.address_names[3]) AS names
               FROM pg_event_trigger_dropped_objects() d
              WHERE d.object_type = 'trigger' AND d.address_names[3] LIKE 'sealtrail\_%'
              GROUP BY 1, 2 LOOP
      IF r.nspname = {schema_lit} AND r.relname LIKE 'sealtrail\_outbox%' THEN
        CONTINUE;  -- the outbox itself is being dropped
      END IF;
      -- Only tables captured into this schema's outbox: their functions live here (or
      -- are being dropped with them).
      prefix := 'sealtrail_cap_' || left(encode(sha256(convert_to(r.nspname, 'UTF8')
                || '\x00'::bytea || convert_to(r.relname, 'UTF8')), 'hex'), 16) || '_';
      IF NOT EXISTS (SELECT 1 FROM pg_proc p WHERE p.pronamespace = to_regnamespace({s_lit})
                        AND left(p.proname, length(prefix)) = prefix)
         AND NOT EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() d
                          WHERE d.object_type = 'function' AND d.schema_name = {schema_lit}
                            AND left(d.address_names[2], length(prefix)) = prefix) THEN
        CONTINUE;
      END IF;
      IF skip IS NOT NULL AND EXISTS (
          SELECT 1 FROM {s}.sealtrail_outbox o
           WHERE o.event_id::text = ANY (skip) AND o.txid = pg_current_xact_id()::text
             AND o.event -> 'data' -> 'db' ->> 'table' = r.nspname || '.' || r.relname) THEN
        CONTINUE;  -- uninstall() recorded this one itself
      END IF;
      PERFORM {s}.sealtrail_emit(jsonb_build_object(
        'action', 'sealtrail.capture.disable',
        'target', jsonb_build_object('type', 'db:table', 'id', r.nspname || '.' || r.relname),
        'data', jsonb_build_object('db', jsonb_build_object(
          'table', r.nspname || '.' || r.relname, 'command', TG_TAG,
          'triggers', to_jsonb(r.names)))));
    END LOOP;
  END IF;
END
$f$;
REVOKE ALL ON FUNCTION {s}.sealtrail_ddl_watch() FROM PUBLIC;
"""


def tables_sql(schema: str) -> str:
    """The outbox tables (idempotent)."""
    return _fill(_SHARED, schema)


def functions_sql(schema: str) -> str:
    """The shared functions (idempotent)."""
    return _fill(_SHARED_FUNCTIONS, schema)


def shared_objects(schema: str) -> list[str]:
    """Qualified names of the tables, index and sequence :func:`tables_sql` creates."""
    s = ident(schema)
    return [f"{s}.{OUTBOX}", f"{s}.{COMMIT}", f"{s}.{COMMIT_SEQ}", f"{s}.sealtrail_outbox_txid"]


def ddl_watch_sql(schema: str) -> str:
    return _fill(_DDL_WATCH, schema)


_PLACEHOLDER: Final = re.compile(
    r"\$f\$|\{(?:s|seq_lit|outbox_lit|schema_lit|s_lit|lock1|lock2|base)\}"
)


def _fill(template: str, schema: str) -> str:
    s = ident(schema)
    tag = "$f$"
    while tag in schema:
        tag = tag[:-1] + "x$"
    values = {
        "$f$": tag,
        "{s}": s,
        "{seq_lit}": lit(f"{s}.{COMMIT_SEQ}"),
        "{outbox_lit}": lit(f"{s}.{OUTBOX}"),
        "{schema_lit}": lit(schema),
        "{s_lit}": lit(s),
        "{lock1}": str(COMMIT_LOCK[0]),
        "{lock2}": str(COMMIT_LOCK[1]),
        "{base}": base_sql(s) if "{base}" in template else "",
    }
    # One pass, so a schema name that looks like a placeholder stays a name.
    return _PLACEHOLDER.sub(lambda m: values[m.group(0)], template)


@dataclass(frozen=True, slots=True)
class SharedFunction:
    """What install() writes for one shared function, as ``pg_proc`` holds it: the body
    (``prosrc``), the security mode and the settings (``name=value``)."""

    name: str
    body: str
    definer: bool
    config: tuple[str, ...]


_FUNCTION: Final = re.compile(
    r"CREATE OR REPLACE FUNCTION \{s\}\.(\w+)\([^)]*\)(.*?)AS \$f\$(.*?)\$f\$;",
    re.S,
)
_SET: Final = re.compile(r"SET (\w+) = (.+?)(?=\s+SET\s|\s*$)", re.S)


def shared_functions(schema: str, *, ddl_watch: bool) -> dict[str, SharedFunction]:
    """The shared functions install() writes in ``schema`` (with the DDL watch's when it
    installs it), by name, read from the SQL it runs: for check() to compare."""
    templates = [_SHARED_FUNCTIONS, _DDL_WATCH] if ddl_watch else [_SHARED_FUNCTIONS]
    out = {}
    for template in templates:
        for name, header, body in _FUNCTION.findall(template):
            config = tuple(
                f"{key.lower()}={value.strip().strip(chr(39))}"
                for key, value in _SET.findall(header.strip())
            )
            out[name] = SharedFunction(
                name, _fill(body, schema), "SECURITY DEFINER" in header, config
            )
    return out


def event_trigger_sql(schema: str) -> list[str]:
    s = ident(schema)
    end, drop = event_triggers(schema)
    return [
        f"CREATE EVENT TRIGGER {end} ON ddl_command_end "
        f"WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION {s}.sealtrail_ddl_watch()",
        f"CREATE EVENT TRIGGER {drop} ON sql_drop EXECUTE FUNCTION {s}.sealtrail_ddl_watch()",
        f"ALTER EVENT TRIGGER {end} ENABLE ALWAYS",
        f"ALTER EVENT TRIGGER {drop} ENABLE ALWAYS",
    ]


def guard_sql(schema: str, table: str, relay_roles: Sequence[str]) -> list[str]:
    """The guard triggers of one outbox table; DELETE allowed to ``relay_roles``."""
    s = ident(schema)
    t = f"{s}.{ident(table)}"
    args = ", ".join(lit(r) for r in relay_roles)
    return [
        f"CREATE OR REPLACE TRIGGER sealtrail_guard_update BEFORE UPDATE ON {t} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {s}.sealtrail_guard()",
        f"CREATE OR REPLACE TRIGGER sealtrail_guard_delete BEFORE DELETE ON {t} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {s}.sealtrail_guard({args})",
        f"CREATE OR REPLACE TRIGGER sealtrail_guard_truncate BEFORE TRUNCATE ON {t} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {s}.sealtrail_guard()",
    ]


def commit_trigger_sql(schema: str) -> str:
    s = ident(schema)
    return (
        f"CREATE CONSTRAINT TRIGGER {COMMIT_TRIGGER} AFTER INSERT ON {s}.{OUTBOX} "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
        "WHEN (NEW.event_id::text = pg_catalog.current_setting('sealtrail.first', true)) "
        f"EXECUTE FUNCTION {s}.sealtrail_commit_order()"
    )
