"""Rows as they were: the history of one row, and its state (or a table's) at any time,
rebuilt from the change events in the trail.

Every captured INSERT, UPDATE and DELETE is an event (see :mod:`sealtrail.capture.change`),
so folding a row's events in ledger order gives its state after each of them::

    history(ledger, "public.accounts", {"id": 7})        # every change, in order
    state_at(ledger, "public.accounts", {"id": 7}, t)    # the row at time t, or None
    table_at(ledger, "public.accounts", t, where={"tenant": "acme"})

Rules of the fold: an insert sets the row from its new values; an update sets the changed
columns; a delete removes the row. Events count when their ``time`` (when the statement ran)
is at or before ``when``, taken in ledger order, which is commit order. Before the first
insert the row is ``None``, and after a delete ``None`` again.

What the trail cannot give back is marked, never invented: a column masked at capture holds
:data:`~sealtrail.capture.change.MASKED`, a value the trail's redaction policy replaced holds
what is stored (``"[REDACTED]"``...). Columns excluded from capture are absent. A row that
existed before its table was tracked first appears through an update, which names only the
changed columns; the others are filled from the old values of later events when they name
them, else left out (``state_at`` only: ``table_at`` reads nothing after ``when``).

One row is looked up through the search index (its target id, keyset-paginated), never by
reading the whole trail. ``table_at`` reads every change event up to ``when``: the index has
no table column.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sealtrail._exceptions import InvalidEvent, SealtrailError
from sealtrail.capture.change import ACTIONS, MASKED, pk_text, target_type
from sealtrail.event import prepare_event
from sealtrail.ledger import Ledger, entry_event
from sealtrail.store.base import SearchQuery

if TYPE_CHECKING:
    from sealtrail.trail import Trail

__all__ = [
    "Change",
    "IncompleteHistory",
    "history",
    "pruned_changes",
    "replay",
    "row_key",
    "state_at",
    "table_at",
]

_OPS = {action: op for op, action in ACTIONS.items()}
_PRUNED_SHOWN = 20


class IncompleteHistory(SealtrailError):
    """The trail can no longer rebuild what was asked: change events of the table that
    may bear on it were pruned (retention removed their bodies, and the row they
    concerned with them). ``pruned``: their ledger indexes (the first few)."""

    def __init__(self, message: str, pruned: list[int]) -> None:
        super().__init__(message)
        self.pruned = pruned


_PAGE = 1000
_ALL = 2**62


@dataclass(frozen=True, slots=True)
class Change:
    """One captured change of one row, as the trail holds it."""

    seq: int
    id: str
    time: str
    op: str  # insert | update | delete
    table: str
    key: str  # the row's target id (pk text)
    changes: dict[str, Any]
    actor: dict[str, Any] | None
    txid: str | None
    reverts: str | None
    event: dict[str, Any]

    @classmethod
    def from_event(cls, seq: int, event: dict[str, Any]) -> Change | None:
        """The change an event records, or None if it records no row change."""
        op = _OPS.get(event.get("action"))  # type: ignore[arg-type]
        target = event.get("target")
        if op is None or not isinstance(target, dict):
            return None
        kind, key = target.get("type"), target.get("id")
        if not isinstance(kind, str) or not kind.startswith("db:") or not isinstance(key, str):
            return None
        changes = event.get("changes")
        data = event.get("data")
        db = data.get("db") if isinstance(data, dict) else None
        db = db if isinstance(db, dict) else {}
        actor = event.get("actor")
        txid, reverts = db.get("txid"), db.get("reverts")
        if reverts is None and isinstance(data, dict):
            reverts = data.get("reverts")  # the context extra, where a backend left it
        return cls(
            seq=seq,
            id=str(event.get("id")),
            time=str(event.get("time")),
            op=op,
            table=kind[3:],
            key=key,
            changes=changes if isinstance(changes, dict) else {},
            actor=actor if isinstance(actor, dict) else None,
            txid=None if txid is None else str(txid),
            reverts=None if reverts is None else str(reverts),
            event=event,
        )

    def to_json(self) -> dict[str, Any]:
        """The change's facts as plain JSON (``index`` is its ledger position), without
        the whole event."""
        return {
            "index": self.seq,
            "id": self.id,
            "time": self.time,
            "op": self.op,
            "table": self.table,
            "key": self.key,
            "actor": self.actor,
            "txid": self.txid,
            "reverts": self.reverts,
            "changes": self.changes,
        }

    @property
    def pk(self) -> dict[str, Any] | None:
        """The primary key as recorded in ``data.db.pk``."""
        data = self.event.get("data")
        db = data.get("db") if isinstance(data, dict) else None
        pk = db.get("pk") if isinstance(db, dict) else None
        return pk if isinstance(pk, dict) else None


def row_key(pk: Mapping[str, Any] | str | int) -> str:
    """A row's target id from its primary key: a mapping of column to value, or the value
    of a one-column key."""
    if isinstance(pk, Mapping):
        return pk_text(pk, list(pk))
    return pk_text({"k": pk}, ["k"])


def _ledger(source: Ledger | Trail) -> Ledger:
    return source if isinstance(source, Ledger) else source.ledger


def _until(when: str | _dt.datetime) -> tuple[str, str]:
    """``when`` normalised, and the exclusive bound one microsecond later."""
    try:
        normal = str(prepare_event({"action": "x.y", "time": when})["time"])
    except InvalidEvent as exc:
        raise SealtrailError(f"when: {exc.reason}") from None
    moment = _dt.datetime.strptime(normal, "%Y-%m-%dT%H:%M:%S.%fZ")
    later = moment + _dt.timedelta(microseconds=1)
    return normal, later.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _changes(
    ledger: Ledger, query: SearchQuery, table: str, key: str | None = None
) -> Iterator[Change]:
    kind = target_type(table)
    for entry in ledger.iter_query(query, page=_PAGE):
        if entry.body is None:
            continue  # pruned
        event = entry_event(entry.body)
        target = event.get("target")
        if not isinstance(target, dict) or target.get("type") != kind:
            continue
        if key is not None and target.get("id") != key:
            continue
        change = Change.from_event(entry.seq, event)
        if change is not None:
            yield change


def history(ledger: Ledger | Trail, table: str, pk: Mapping[str, Any] | str | int) -> list[Change]:
    """Every captured change of one row, in ledger (commit) order."""
    key = row_key(pk)
    query = SearchQuery(target=f"{target_type(table)}:{key}", action="db.*", limit=_ALL)
    return list(_changes(_ledger(ledger), query, table, key))


def replay(changes: Iterable[Change], row: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Fold changes into a row (pure): the state after the last of them."""
    state = None if row is None else dict(row)
    for change in changes:
        if change.op == "insert":
            state = {c: _value(v, "new") for c, v in change.changes.items()}
        elif change.op == "update":
            state = {} if state is None else state
            for column, value in change.changes.items():
                state[column] = _value(value, "new")
        else:
            state = None
    return state


def _value(change: Any, which: str) -> Any:
    if isinstance(change, dict) and which in change:
        return change[which]
    return change  # MASKED ({"masked": true}) and anything unexpected, as recorded


def _backfill(state: dict[str, Any], later: Iterable[Change], known: set[str]) -> None:
    """Columns an update-only history did not name, from the old values of later events."""
    for change in later:
        if change.op == "insert":
            return
        for column, value in change.changes.items():
            if column in known or column in state or not isinstance(value, dict):
                continue
            if "old" in value:
                state[column] = value["old"]
            elif value == MASKED:
                state[column] = MASKED
        if change.op == "delete":
            return


def pruned_changes(
    ledger: Ledger | Trail, table: str, *, after: int = -1, when: str | _dt.datetime | None = None
) -> list[int]:
    """Ledger indexes of pruned change events of ``table`` (after index ``after``, and at
    or before ``when`` if given): changes the trail held once and can no longer show. A
    pruned event keeps its table but not its row, so any of them may have been a change of
    any row of the table. The first few only."""
    until = "9999" if when is None else _until(when)[1]
    kind = target_type(table)
    return _ledger(ledger).pruned_of_type(kind, after=after, until=until, limit=_PRUNED_SHOWN)


def _refuse_if_pruned(
    ledger: Ledger | Trail, table: str, after: int, when: str | _dt.datetime, what: str
) -> None:
    pruned = pruned_changes(ledger, table, after=after, when=when)
    if pruned:
        shown = ", ".join(map(str, pruned[:5])) + (", ..." if len(pruned) > 5 else "")
        raise IncompleteHistory(
            f"cannot rebuild {what}: change events of {table} from before then were pruned "
            f"(ledger indexes {shown}), and any of them may have changed it",
            pruned,
        )


def state_at(
    ledger: Ledger | Trail,
    table: str,
    pk: Mapping[str, Any] | str | int,
    when: str | _dt.datetime,
) -> dict[str, Any] | None:
    """The row as of ``when`` (events with ``time <= when``), or None if it did not exist.

    Raises :class:`IncompleteHistory` when a change event of the table from before
    ``when`` was pruned after the row's last insert (or at all, if the trail shows no
    insert): the answer could be wrong, so none is given."""
    normal, _ = _until(when)
    changes = history(ledger, table, pk)
    before = [c for c in changes if c.time <= normal]
    inserts = [c.seq for c in before if c.op == "insert"]
    _refuse_if_pruned(
        ledger, table, inserts[-1] if inserts else -1, when, f"{table} {row_key(pk)} at {normal}"
    )
    state = replay(before)
    if state is not None and not any(c.op == "insert" for c in before):
        _backfill(state, [c for c in changes if c.time > normal], set(state))
    return state


def table_at(
    ledger: Ledger | Trail,
    table: str,
    when: str | _dt.datetime,
    *,
    where: Mapping[str, Any] | Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every row of ``table`` that existed at ``when``, by target id (pk text); ``where``
    keeps rows whose columns equal the given (JSON) values, or for which it returns true.

    Raises :class:`IncompleteHistory` when a change event of the table from before
    ``when`` was pruned: a row it inserted could be missing."""
    normal, until = _until(when)
    query = SearchQuery(action="db.*", until=until, limit=_ALL)
    rows: dict[str, dict[str, Any] | None] = {}
    for change in _changes(_ledger(ledger), query, table):
        rows[change.key] = replay([change], rows.get(change.key))
    _refuse_if_pruned(ledger, table, -1, when, f"{table} at {normal}")
    out: dict[str, dict[str, Any]] = {}
    for key, row in rows.items():
        if row is None:
            continue
        if where is None or (
            where(row) if callable(where) else all(row.get(c) == v for c, v in where.items())
        ):
            out[key] = row
    return out
