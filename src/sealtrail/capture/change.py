"""The change event: one captured INSERT, UPDATE or DELETE as an envelope v1 event.

This module is the contract between the capture backends (PostgreSQL triggers, SQLAlchemy
session events), the relay, revert and point-in-time reconstruction. It is pure.

An UPDATE of ``public.accounts`` row ``id=7`` that changed ``email``::

    {
      "id": "<UUIDv7, made at capture time: the dedupe key>",
      "time": "2026-11-22T10:00:00.123456Z",         # when the statement ran
      "action": "db.update",                           # db.insert | db.update | db.delete
      "outcome": "success",
      "actor": {"id": "user:42", "type": "user"},      # from sealtrail.context, or
                                                       # {"id": "db:<role>", "type": "service"}
      "source": {"ip": ..., "request_id": ...},        # from sealtrail.context
      "tenant": ..., "reason": ...,                    # from sealtrail.context
      "target": {"type": "db:public.accounts", "id": "7"},
      "changes": {"email": {"old": "a@x", "new": "b@x"}},
      "data": {"db": {"table": "public.accounts", "op": "update", "pk": {"id": 7},
                      "txid": "812345", "app_context": "present", "role": "app"}}
    }

* ``changes`` of an INSERT has ``{"new": v}`` for every captured column; of a DELETE
  ``{"old": v}`` for every captured column (the full old row); of an UPDATE ``{"old",
  "new"}`` for the changed columns only. An UPDATE that changes no captured column is no
  event. Excluded columns appear nowhere; a masked column that changed appears with
  :data:`MASKED` in place of each value (``{"old": {"masked": true}, "new": {"masked":
  true}}``; only ``new`` on insert, only ``old`` on delete), so the record says it changed
  without holding the value.
* On an UPDATE that changes the primary key, ``target`` names the row by its old key and
  the key columns appear in ``changes``. An empty text key is written as the two
  characters ``""`` (the envelope refuses an empty id).
* ``data.db.app_context`` is ``"missing"`` when the write carried no Sealtrail context (a
  second client, a psql session): the actor is then ``db:<role>`` and alerts can key on it.
* ``data.db.txid`` names the database transaction (revert a whole transaction by it);
  a change made by :func:`sealtrail.capture.revert.revert` carries
  ``data.reverts`` (the id or transaction it undoes: the ``reverts`` value of the context
  the revert runs in, which both backends put under ``data`` like any context extra).
* Values are JSON with no floats (the envelope refuses them): see :func:`json_value`.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from sealtrail.canonical import MAX_SAFE_INTEGER

__all__ = [
    "ACTIONS",
    "COMMIT_LOCK",
    "COMMIT_SEQ",
    "MASKED",
    "OUTBOX_COMMIT_TABLE",
    "OUTBOX_TABLE",
    "Track",
    "json_value",
    "pk_text",
    "target_type",
    "tracks_from_toml",
]

#: op -> action
ACTIONS: Final = {"insert": "db.insert", "update": "db.update", "delete": "db.delete"}

#: What stands in a masked column's change for each value: it changed, the value is not stored.
MASKED: Final = {"masked": True}

#: The outbox in the application's database: ``id`` (capture order, an identity/autoincrement
#: bigint), ``event_id`` (unique), ``txid`` (text), ``event`` (the complete envelope as JSON),
#: ``created_at``. Rows are only ever inserted by capture and deleted by the relay once the
#: ledger acknowledged them.
OUTBOX_TABLE: Final = "sealtrail_outbox"
#: Commit order on PostgreSQL: one row per capturing transaction, ``(txid, commit_seq)``,
#: written at commit time under a lock, so ``commit_seq`` orders transactions as they
#: committed (transaction ids order them as they started).
OUTBOX_COMMIT_TABLE: Final = "sealtrail_outbox_commit"
#: The sequence that numbers commits, and the transaction advisory lock (two int4 keys)
#: held from taking a number to the commit, so numbers follow commit order.
COMMIT_SEQ: Final = "sealtrail_outbox_commit_seq"
COMMIT_LOCK: Final = (0x7365616C, 1)


@dataclass(frozen=True, slots=True)
class Track:
    """One tracked table: its name (``schema.table`` on PostgreSQL), its primary key columns
    (``None``: read from the database or model), and per-column rules. ``exclude``: the
    column never appears anywhere; ``mask``: a change to it is recorded without its value."""

    table: str
    pk: tuple[str, ...] | None = None
    exclude: frozenset[str] = field(default_factory=frozenset)
    mask: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(
        cls,
        table: str,
        *,
        pk: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        mask: Iterable[str] = (),
    ) -> Track:
        overlap = set(exclude) & set(mask)
        if overlap:
            raise ValueError(f"columns both excluded and masked: {sorted(overlap)}")
        return cls(
            table,
            None if pk is None else tuple(pk),
            frozenset(exclude),
            frozenset(mask),
        )


def target_type(table: str) -> str:
    """``target.type`` of a row of ``table`` (schema-qualified where the database has
    schemas): ``db:public.accounts``."""
    return f"db:{table}"


def json_value(value: Any) -> Any:
    """A column value as the JSON the envelope accepts (no floats, string keys).

    str, bool and None stay, and integers within ±(2**53-1) (larger ones become their decimal
    text); float and Decimal become their shortest decimal text
    ("1.5", "nan"); datetimes and dates ISO 8601 text as the database prints them
    (``isoformat``); UUID its text; bytes ``"\\\\x<hex>"`` (PostgreSQL's bytea text form);
    enums their value; lists and dicts recursively. Revert casts text back through the
    column's type, so nothing is lost for the types a row holds.
    """
    cls = type(value)
    if value is None or cls is str or cls is bool:
        return value
    if cls is int:
        # Beyond 2**53 JSON readers lose digits, so the envelope refuses such numbers:
        # a BIGINT that large is kept exactly as its decimal text.
        return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else str(value)
    if cls is float or cls is decimal.Decimal:
        return _number_text(value)
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, enum.Enum):
        return json_value(value.value)
    if isinstance(value, int):  # bool and int subclasses
        return json_value(int(value))
    if isinstance(value, str):
        return str(value)
    raise TypeError(f"cannot capture a value of type {cls.__name__}")


def _number_text(value: float | decimal.Decimal) -> str:
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def pk_text(pk: Mapping[str, Any], columns: Sequence[str]) -> str:
    """``target.id`` of a row: the value's text for a one-column key, else the canonical
    JSON of the key object (``{"order_id":7,"line":2}``), stable whatever the column order."""
    if len(columns) == 1:
        value = json_value(pk[columns[0]])
        return value if isinstance(value, str) else orjson.dumps(value).decode()
    key = {c: json_value(pk[c]) for c in columns}
    return orjson.dumps(key, option=orjson.OPT_SORT_KEYS).decode()


_TRACK_KEYS: Final = frozenset({"table", "pk", "exclude", "mask"})


def tracks_from_toml(text: str) -> list[Track]:
    """Tracked tables from a TOML document (the ``sealtrail capture`` configuration)::

        [[track]]
        table = "public.accounts"
        exclude = ["password_hash"]
        mask = ["ssn"]
        # pk = ["id"]   (default: the table's primary key)

    Raises :class:`ValueError` naming the offending entry.
    """
    import tomllib

    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {exc}") from None
    unknown = set(document) - {"track"}
    if unknown:
        raise ValueError(f"unknown top-level keys {sorted(unknown)}; tables go in [[track]]")
    entries = document.get("track", [])
    if not isinstance(entries, list) or not entries:
        raise ValueError("no [[track]] entries: name at least one table")
    tracks: list[Track] = []
    seen: set[str] = set()
    for number, entry in enumerate(entries, 1):
        where = f"[[track]] #{number}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a table")
        bad = set(entry) - _TRACK_KEYS
        if bad:
            allowed = sorted(_TRACK_KEYS)
            raise ValueError(f"{where}: unknown keys {sorted(bad)} (allowed: {allowed})")
        table = entry.get("table")
        if not isinstance(table, str) or not table.strip():
            raise ValueError(f"{where}: 'table' must be a non-empty string")
        if table in seen:
            raise ValueError(f"{where}: table {table!r} is tracked twice")
        seen.add(table)
        lists: dict[str, list[str] | None] = {}
        for key in ("pk", "exclude", "mask"):
            value = entry.get(key)
            if value is None:
                lists[key] = None
                continue
            if not isinstance(value, list) or not all(isinstance(c, str) and c for c in value):
                raise ValueError(f"{where} ({table}): {key!r} must be a list of column names")
            lists[key] = value
        if lists["pk"] is not None and not lists["pk"]:
            raise ValueError(f"{where} ({table}): 'pk' must name at least one column")
        try:
            tracks.append(
                Track.of(
                    table,
                    pk=lists["pk"],
                    exclude=lists["exclude"] or (),
                    mask=lists["mask"] or (),
                )
            )
        except ValueError as exc:
            raise ValueError(f"{where} ({table}): {exc}") from None
    return tracks
