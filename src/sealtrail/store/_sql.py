"""SQL shared by the SQLite and PostgreSQL backends.

Both speak DB-API with different placeholder styles; statements are written once with
``?`` and converted for backends that use ``%s``.
"""

from __future__ import annotations

from collections.abc import Sequence

from sealtrail.store.base import SearchQuery

SEARCH_COLUMNS = (
    "seq",
    "time",
    "action",
    "outcome",
    "actor",
    "target_type",
    "target_id",
    "tenant",
    "subject",
)


def escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


#: A target query is split at no more than this many colons.
MAX_TARGET_SPLITS = 8

#: Store.heads in one query: the last seq, the last indexed seq, the latest checkpoint's size.
HEADS = (
    "SELECT (SELECT max(seq) FROM entries), (SELECT max(seq) FROM search), "
    "(SELECT max(size) FROM checkpoints)"
)


#: Pruned entries of one target type, after a seq and before a time (``?``: target type,
#: seq, exclusive time, limit). A pruned entry keeps its search row's type, action and time;
#: one indexed only after its body was gone has none of them (action '') and may have been
#: of any type at any time, so it is counted too.
PRUNED_OF_TYPE = (
    "SELECT p.seq FROM prunes p JOIN search s ON s.seq = p.seq "
    "WHERE (s.target_type = ? OR (s.target_type IS NULL AND s.action = '')) "
    "AND p.seq > ? AND s.time < ? ORDER BY p.seq LIMIT ?"
)


def search_sql(query: SearchQuery) -> tuple[str, list[object]]:
    """The WHERE/ORDER/LIMIT of a search, keyset-paginated on seq (never OFFSET or COUNT)."""
    where: list[str] = []
    params: list[object] = []
    if query.actor is not None:
        where.append("actor = ?")
        params.append(query.actor)
    if query.action is not None:
        if query.action.endswith(".*"):
            where.append("action LIKE ? ESCAPE '\\'")
            params.append(escape_like(query.action[:-1]) + "%")
        else:
            where.append("action = ?")
            params.append(query.action)
    if query.target is not None:
        # "type:id", where the type may hold colons itself ("db:public.accounts:7") and so
        # may the id ("user:42"): every split is a candidate, and so is the whole text as
        # an id. Each alternative pins target_id, so the target index serves them all.
        text = query.target
        alternatives = ["target_id = ?"]
        params.append(text)
        colon = text.find(":", 1)
        while colon > 0 and len(alternatives) <= MAX_TARGET_SPLITS:
            alternatives.append("(target_type = ? AND target_id = ?)")
            params.extend([text[:colon], text[colon + 1 :]])
            colon = text.find(":", colon + 1)
        where.append("(" + " OR ".join(alternatives) + ")")
    for column, value, op in (
        ("outcome", query.outcome, "="),
        ("tenant", query.tenant, "="),
        ("subject", query.subject, "="),
        ("time", query.since, ">="),
        ("time", query.until, "<"),
    ):
        if value is not None:
            where.append(f"{column} {op} ?")
            params.append(value)
    if query.after is not None:
        where.append("seq < ?" if query.descending else "seq > ?")
        params.append(query.after)
    sql = "SELECT seq FROM search"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq DESC" if query.descending else " ORDER BY seq"
    sql += " LIMIT ?"
    params.append(max(0, int(query.limit)))
    return sql, params


def placeholders(n: int) -> str:
    return ",".join("?" * n)


def chunks(items: Sequence[object], size: int = 500) -> list[Sequence[object]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
