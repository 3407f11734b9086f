"""The production backend: PostgreSQL, in a database separate from the application's data.

Same tables, same guards and same semantics as :mod:`sealtrail.store.sqlite`, so the ledger
behaves (and fails) the same way on both; ``tests/test_store_contract.py`` runs one suite
against each.

URL: ``postgresql://user[:password]@host[:port]/dbname[?param=value...]``, any libpq
parameter, plus ``schema=name`` to keep the log's tables in their own schema (created by
:meth:`PostgresStore.initialize`). Without it the tables go to the first schema of the
connection's ``search_path`` (usually ``public``). The password never appears in
:attr:`PostgresStore.url` nor in an error message.

Transactions are explicit: the connection runs in autocommit mode for single reads, and
:meth:`~PostgresStore.write` / :meth:`~PostgresStore.snapshot` open a real transaction.

* **The sequencer lock.** ``write()`` takes ``pg_advisory_xact_lock`` on a 64-bit key
  derived from the database and schema, so two writer processes (or machines) never
  interleave; the lock is released by the COMMIT or ROLLBACK that ends the transaction. The
  transaction is READ COMMITTED, so every statement after the lock sees what the previous
  holder committed.
* **Durability.** A commit returns once its WAL is flushed (``synchronous_commit`` is left
  on, and switched back on if the server default turned it off), so an acknowledged append
  survives a crash of the server (I1).
* **Snapshots.** ``snapshot()`` is a REPEATABLE READ READ ONLY transaction: verify and
  export read one state while writers continue.
* **Guards (I2).** PL/pgSQL triggers refuse DELETE and UPDATE on ``entries``, ``nodes``,
  ``checkpoints``, ``prunes`` and ``meta``, and a statement trigger refuses TRUNCATE. The
  one UPDATE allowed is the prune transition on ``entries`` (body to NULL, nothing else
  changed, a ``prunes`` row present). A table owner can still disable triggers, which is why
  writers should connect with the INSERT-only role :meth:`PostgresStore.grant_writer` sets
  up. ``search`` is derived data and stays writable.
* **Bulk appends** go through binary COPY; lookups by many keys use ``= ANY(array)``;
  :meth:`~PostgresStore.iter_entries` and :meth:`~PostgresStore.iter_level` page by keyset,
  so memory stays flat and they work inside or outside a transaction.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from sealtrail._exceptions import StorageError
from sealtrail.store._sql import HEADS, PRUNED_OF_TYPE, search_sql
from sealtrail.store.base import (
    DuplicateId,
    Heads,
    PruneRecord,
    SearchQuery,
    SearchRow,
    Store,
    StoredCheckpoint,
    StoredEntry,
    level_key_range,
)

__all__ = ["PostgresStore"]

Row: TypeAlias = tuple[Any, ...]
Connection: TypeAlias = psycopg.Connection[Row]
Params: TypeAlias = Sequence[Any] | None

_APPEND_ONLY = "sealtrail: the trail is append-only"

#: Rows per round trip when streaming entries or tree nodes.
PAGE_SIZE = 4096

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

TABLES = ("meta", "entries", "nodes", "checkpoints", "prunes", "search")
GUARDED = ("entries", "nodes", "checkpoints", "prunes", "meta")

# Text that is compared or sorted uses the "C" collation: byte order, as SQLite's BINARY,
# whatever the database's locale, and a plain b-tree serves prefix (LIKE 'x%') searches.
# Every search index ends with seq (SQLite's indexes carry the rowid, which is seq), so
# "actor = ? ORDER BY seq LIMIT n", forwards or backwards from a keyset, reads n entries.
_TABLES_DDL = """
CREATE TABLE IF NOT EXISTS meta (key text COLLATE "C" PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq bigint PRIMARY KEY,
    id text COLLATE "C" NOT NULL UNIQUE,
    body bytea,
    leaf_hash bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (k bigint PRIMARY KEY, hash bytea NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    size bigint PRIMARY KEY,
    root_hash bytea NOT NULL,
    note text NOT NULL,
    created text NOT NULL
);
CREATE TABLE IF NOT EXISTS prunes (
    seq bigint PRIMARY KEY,
    by_event text NOT NULL,
    pruned_at text NOT NULL
);
CREATE TABLE IF NOT EXISTS search (
    seq bigint PRIMARY KEY,
    time text COLLATE "C" NOT NULL,
    action text COLLATE "C" NOT NULL,
    outcome text COLLATE "C" NOT NULL,
    actor text COLLATE "C",
    target_type text COLLATE "C",
    target_id text COLLATE "C",
    tenant text COLLATE "C",
    subject text COLLATE "C"
);
CREATE INDEX IF NOT EXISTS search_time ON search(time, seq);
CREATE INDEX IF NOT EXISTS search_actor ON search(actor, seq);
CREATE INDEX IF NOT EXISTS search_action ON search(action, seq);
CREATE INDEX IF NOT EXISTS search_target ON search(target_id, seq);
CREATE INDEX IF NOT EXISTS search_tenant_time ON search(tenant, time, seq);
CREATE INDEX IF NOT EXISTS search_subject ON search(subject, seq);
"""

# The prune check names the prunes table of the trigger's own schema, so it holds whatever
# the search_path of the session that runs the UPDATE.
_FUNCTIONS_DDL = f"""
CREATE OR REPLACE FUNCTION sealtrail_refuse() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION '{_APPEND_ONLY}: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$fn$;
CREATE OR REPLACE FUNCTION sealtrail_entries_only_prune() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    covered boolean := false;
BEGIN
    IF NEW.seq = OLD.seq AND NEW.id = OLD.id AND NEW.leaf_hash = OLD.leaf_hash
       AND NEW.body IS NULL AND OLD.body IS NOT NULL THEN
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I.prunes WHERE seq = $1)', TG_TABLE_SCHEMA)
            INTO covered USING OLD.seq;
        IF covered THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION '{_APPEND_ONLY}: UPDATE on entries refused'
        USING ERRCODE = 'insufficient_privilege';
END
$fn$;
"""


def _triggers() -> dict[tuple[str, str], str]:
    """(table, trigger name) -> CREATE TRIGGER statement."""
    out: dict[tuple[str, str], str] = {}
    for table in GUARDED:
        out[table, f"{table}_no_delete"] = (
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION sealtrail_refuse()"
        )
        update_fn = "sealtrail_entries_only_prune" if table == "entries" else "sealtrail_refuse"
        name = "entries_only_prune" if table == "entries" else f"{table}_no_update"
        out[table, name] = (
            f"CREATE TRIGGER {name} BEFORE UPDATE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {update_fn}()"
        )
        out[table, f"{table}_no_truncate"] = (
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION sealtrail_refuse()"
        )
    return out


TRIGGERS = _triggers()

_ENTRY_COLUMNS = "seq, id, body, leaf_hash"
_HERE = "(SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
_SEARCH_UPSERT = """
INSERT INTO search (seq, time, action, outcome, actor, target_type, target_id, tenant, subject)
SELECT * FROM unnest(
    %b::bigint[], %b::text[], %b::text[], %b::text[], %b::text[],
    %b::text[], %b::text[], %b::text[], %b::text[]
)
ON CONFLICT (seq) DO UPDATE SET
    time = EXCLUDED.time, action = EXCLUDED.action, outcome = EXCLUDED.outcome,
    actor = EXCLUDED.actor, target_type = EXCLUDED.target_type,
    target_id = EXCLUDED.target_id, tenant = EXCLUDED.tenant, subject = EXCLUDED.subject
"""


def _parse_url(url: str) -> tuple[str, str | None, str, str | None]:
    """(libpq URL without ``schema``, schema, URL to display, password to scrub)."""
    try:
        parts = urlsplit(url)
        password = parts.password
        hostname, port = parts.hostname, parts.port
    except ValueError as exc:
        raise StorageError(f"bad PostgreSQL URL: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise StorageError("a PostgreSQL store URL starts with postgresql://")
    schema: str | None = None
    kept: list[tuple[str, str]] = []
    shown: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "schema":
            schema = value
            continue
        kept.append((key, value))
        if key == "password":
            password = value
            value = "***"
        shown.append((key, value))
    if schema is not None and not _SCHEMA_NAME.match(schema):
        raise StorageError(
            f"bad schema name {schema!r} in the store URL "
            "(letters, digits and '_', not starting with a digit)"
        )
    libpq = urlunsplit(parts._replace(query=urlencode(kept, quote_via=quote)))
    netloc = parts.netloc
    if parts.password is not None:
        host = hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if port is not None:
            host += f":{port}"
        netloc = f"{parts.username or ''}:***@{host}"
    display = urlunsplit(
        parts._replace(
            netloc=netloc,
            query=urlencode(shown + _schema_param(schema), quote_via=quote, safe="*"),
        )
    )
    return libpq, schema, display, password or None


def _schema_param(schema: str | None) -> list[tuple[str, str]]:
    return [] if schema is None else [("schema", schema)]


def _lock_key(purpose: str, database: str, namespace: str) -> int:
    """A signed 64-bit advisory-lock key: one per log (database and schema) and purpose."""
    digest = hashlib.blake2b(
        f"sealtrail/{purpose}/{database}/{namespace}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


# PostgreSQL text cannot hold NUL, which an event's actor, target or subject may contain.
# The search index is derived data, so its text is stored through an injective,
# character-by-character escape (``\uffff`` is the escape character); queries are escaped
# the same way, so exact matches and prefixes behave as on SQLite. Bodies are bytea and
# untouched.
_NUL_ESCAPE = {0: "\uffff0", 0xFFFF: "\uffff1"}


def _index_text(value: str | None) -> str | None:
    if value is None or ("\x00" not in value and "\uffff" not in value):
        return value
    return value.translate(_NUL_ESCAPE)


def _pg(statement: str) -> str:
    """A statement written with ``?`` placeholders (see :mod:`sealtrail.store._sql`)."""
    return statement.replace("%", "%%").replace("?", "%s")


class PostgresStore(Store):
    """One log in one PostgreSQL database (and schema). Not thread-safe, like every store."""

    streams_inserts = True

    def __init__(self, url: str) -> None:
        self._libpq, self.schema, self.url, self._password = _parse_url(url)
        self._original_url = url
        # Parallel verification reopens the store from :attr:`url` in other processes; a
        # password is never part of that URL, so only a password-free URL (PGPASSWORD,
        # .pgpass, a service file, trust or certificates) can be shared.
        self._options: dict[str, Any] = {}
        query = dict(parse_qsl(urlsplit(self._libpq).query))
        if "connect_timeout" not in query:
            self._options["connect_timeout"] = 10
        if "application_name" not in query:
            self._options["application_name"] = "sealtrail"
        self._tx: str | None = None
        self._closed = False
        self._write_key = 0
        self._init_key = 0
        self._conn = self._connect()

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> Connection:
        try:
            conn = psycopg.connect(self._libpq, autocommit=True, **self._options)
        except psycopg.Error as exc:
            raise StorageError(
                f"cannot connect to the PostgreSQL store {self.url}: {self._describe(exc)}"
            ) from None
        try:
            if self.schema is not None:
                conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            row = conn.execute(
                "SELECT current_database(), current_schema(), "
                "current_setting('search_path'), current_setting('synchronous_commit')"
            ).fetchone()
            assert row is not None
            database, current, search_path, sync = row
            if sync == "off":
                conn.execute("SET synchronous_commit TO on")
        except psycopg.Error as exc:
            conn.close()
            raise StorageError(
                f"PostgreSQL store {self.url}: cannot set up the session: {self._describe(exc)}"
            ) from None
        namespace = self.schema or current or f"search_path={search_path}"
        self._write_key = _lock_key("sequencer", database, namespace)
        self._init_key = _lock_key("initialize", database, namespace)
        return conn

    def _db(self) -> Connection:
        """The connection, reconnected if it dropped while no transaction was open."""
        if self._closed:
            raise StorageError(f"PostgreSQL store {self.url} is closed")
        if self._conn.closed and self._tx is None:
            self._conn = self._connect()
        return self._conn

    def _query(self, doing: str, statement: str, params: Params = None) -> list[Row]:
        """Run one statement and return its rows.

        Outside a transaction, a connection that dropped since the last statement (server
        restart, idle timeout, failover) is reopened and the statement run once more: only
        reads and BEGIN come here that way, so running them twice is harmless.
        """
        with self._errors(doing):
            conn = self._db()
            try:
                cursor = conn.execute(statement, params)
            except psycopg.OperationalError:
                if self._tx is not None or not conn.closed:
                    raise
                cursor = self._db().execute(statement, params)
            return cursor.fetchall() if cursor.description is not None else []

    def _describe(self, exc: BaseException) -> str:
        """One line, without the password."""
        text = str(exc)
        if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
            text = exc.diag.message_primary
        text = " ".join(text.split()) or type(exc).__name__
        if self._password:
            for secret in {self._password, unquote(self._password)}:
                text = text.replace(secret, "***")
        return text

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            raise StorageError(
                f"PostgreSQL store {self.url}: cannot {doing}: {self._describe(exc)}"
            ) from exc

    @contextmanager
    def _transaction(self, begin: str, doing: str, kind: str) -> Iterator[Connection]:
        """BEGIN ... COMMIT (``kind`` "write") or ROLLBACK (``kind`` "read", or on error)."""
        self._query(f"begin a transaction to {doing}", begin)
        conn = self._conn
        self._tx = kind
        try:
            yield conn
        except BaseException:
            self._tx = None
            self._rollback(conn)
            raise
        self._tx = None
        if kind == "write":
            self._commit(conn, doing)
        else:
            self._rollback(conn)

    def _rollback(self, conn: Connection) -> None:
        try:
            if not conn.closed:
                conn.execute("ROLLBACK")
        except psycopg.Error:
            # A broken connection: the server rolls the transaction back itself.
            conn.close()

    def _commit(self, conn: Connection, doing: str) -> None:
        if conn.info.transaction_status == TransactionStatus.INERROR:
            # A statement failed and someone swallowed the error: COMMIT would only roll
            # back, silently. Say so instead.
            self._rollback(conn)
            raise StorageError(
                f"PostgreSQL store {self.url}: cannot {doing}: a statement of the transaction "
                "failed; nothing was committed"
            )
        with self._errors(f"commit ({doing})"):
            cursor = conn.execute("COMMIT")
        if cursor.statusmessage != "COMMIT":
            raise StorageError(
                f"PostgreSQL store {self.url}: cannot {doing}: the server rolled the "
                "transaction back"
            )

    # -- lifecycle -------------------------------------------------------------------------
    def reopen_url(self) -> str:
        # Never printed: it may hold the password. Worker processes get it on a pipe.
        return self._original_url

    def initialize(self, meta: Mapping[str, str]) -> None:
        """Create the schema, tables, functions and triggers that are missing, record ``meta``.

        Safe to run from several processes at once (an advisory lock serialises it). A role
        that does not own the tables (the INSERT-only writer) skips the DDL.
        """
        if self._tx is not None:
            raise StorageError(
                f"PostgreSQL store {self.url}: cannot initialise inside a transaction"
            )
        with (
            self._transaction("BEGIN", "initialise", "write") as conn,
            self._errors("initialise"),
        ):
            conn.execute("SET LOCAL client_min_messages TO warning")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._init_key,))
            if (
                self.schema is not None
                and not conn.execute(
                    "SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)
                ).fetchone()
            ):
                # (Even CREATE SCHEMA IF NOT EXISTS needs CREATE on the database.)
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
            owner = conn.execute(
                "SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c "
                f"WHERE c.relnamespace = {_HERE} AND c.relname = 'entries'"
            ).fetchone()
            if owner is None or owner[0]:
                conn.execute(_TABLES_DDL)
                conn.execute(_FUNCTIONS_DDL)
                existing = {
                    (table, name)
                    for table, name in conn.execute(
                        "SELECT c.relname::text, t.tgname::text FROM pg_trigger t "
                        "JOIN pg_class c ON c.oid = t.tgrelid "
                        f"WHERE c.relnamespace = {_HERE} AND NOT t.tgisinternal"
                    ).fetchall()
                }
                for key, statement in TRIGGERS.items():
                    if key not in existing:
                        conn.execute(statement)
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                    list(meta.items()),
                )

    def is_initialized(self) -> bool:
        rows = self._query(
            "inspect",
            "SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'entries'",
        )
        return bool(rows)

    def meta(self) -> dict[str, str]:
        return {k: v for k, v in self._query("read meta", "SELECT key, value FROM meta")}

    def close(self) -> None:
        self._closed = True
        self._tx = None
        self._conn.close()

    def grant_writer(self, role: str) -> None:
        """Let ``role`` (which must exist) append, but never change or remove history.

        The role gets USAGE on the schema, SELECT and INSERT on the append-only tables, and
        SELECT, INSERT and UPDATE on the derived ``search`` index: no UPDATE, DELETE or
        TRUNCATE on the trail, so the guards hold even where a table owner could disable the
        triggers. Pruning needs the owner (it is a retention job, not an application's).
        """
        who = sql.Identifier(role)
        trail = sql.SQL(", ").join(sql.Identifier(t) for t in GUARDED)
        every = sql.SQL(", ").join(sql.Identifier(t) for t in TABLES)
        doing = f"grant the writer role {role!r}"
        with self._transaction("BEGIN", doing, "write") as conn, self._errors(doing):
            row = conn.execute("SELECT current_schema()").fetchone()
            if row is None or row[0] is None:
                raise StorageError(f"PostgreSQL store {self.url}: no schema (initialise first)")
            schema = sql.Identifier(str(row[0]))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, who))
            conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(every, who))
            conn.execute(sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(trail, who))
            conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON search TO {}").format(who))

    # -- writing ---------------------------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[None]:
        if self._tx is not None:
            yield
            return
        begin = "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE"
        with self._transaction(begin, "write", "write") as conn:
            with self._errors("take the sequencer lock"):
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._write_key,))
            yield

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        if self._tx is not None:
            yield
            return
        begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        with self._transaction(begin, "read a snapshot", "read") as conn:
            with self._errors("begin a read"):
                conn.execute("SELECT 1")  # the snapshot is taken at the first statement
            yield

    def find_ids(self, ids: Sequence[str]) -> dict[str, StoredEntry]:
        if not ids:
            return {}
        rows = self._query(
            "look up ids",
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = ANY(%b::text[])",
            (list(ids),),
        )
        return {row[1]: StoredEntry(*row) for row in rows}

    def insert_entries(self, rows: Iterable[tuple[int, str, bytes, bytes]]) -> None:
        # Rows are written as they are produced: libpq sends the COPY data in blocks, so the
        # server stores early rows while the caller is still computing later ones.
        statement = f"COPY entries ({_ENTRY_COLUMNS}) FROM STDIN (FORMAT BINARY)"
        try:
            with (
                self._errors("append entries"),
                self._db().cursor() as cur,
                cur.copy(statement) as copy,
            ):
                copy.set_types(["int8", "text", "bytea", "bytea"])
                for row in rows:
                    copy.write_row(row)
        except StorageError as exc:
            cause = exc.__cause__
            if (
                isinstance(cause, psycopg.errors.UniqueViolation)
                and cause.diag.constraint_name == "entries_id_key"
            ):
                raise DuplicateId(f"an event id is already stored: {exc}") from exc
            raise

    def insert_nodes(self, rows: Sequence[tuple[int, bytes]]) -> None:
        if not rows:
            return
        with (
            self._errors("append nodes"),
            self._db().cursor() as cur,
            cur.copy("COPY nodes (k, hash) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["int8", "bytea"])
            for row in rows:
                copy.write_row(row)

    def insert_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        with self._errors("store a checkpoint"):
            self._db().execute(
                "INSERT INTO checkpoints(size, root_hash, note, created) VALUES (%s, %s, %s, %s)",
                (checkpoint.size, checkpoint.root_hash, checkpoint.note, checkpoint.created),
            )

    def insert_search(self, rows: Sequence[SearchRow]) -> None:
        """Insert or replace index rows (one statement, the columns as arrays)."""
        if not rows:
            return
        columns: list[list[Any]] = [[] for _ in range(9)]
        for r in rows:
            values = (
                r.seq,
                _index_text(r.time),
                _index_text(r.action),
                _index_text(r.outcome),
                _index_text(r.actor),
                _index_text(r.target_type),
                _index_text(r.target_id),
                _index_text(r.tenant),
                _index_text(r.subject),
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        with self._errors("index entries"):
            self._db().execute(_SEARCH_UPSERT, columns)

    def prune_bodies(self, seqs: Sequence[int], by_event: str, pruned_at: str) -> None:
        wanted = [int(s) for s in seqs]
        if not wanted:
            return
        with self._errors("prune"):
            conn = self._db()
            conn.execute(
                "INSERT INTO prunes(seq, by_event, pruned_at) "
                "SELECT s, %s, %s FROM unnest(%b::bigint[]) AS s",
                (by_event, pruned_at, wanted),
            )
            conn.execute("UPDATE entries SET body = NULL WHERE seq = ANY(%b::bigint[])", (wanted,))
            conn.execute(
                "UPDATE search SET actor = NULL, target_id = NULL, subject = NULL "
                "WHERE seq = ANY(%b::bigint[])",
                (wanted,),
            )

    # -- reading ---------------------------------------------------------------------------
    def _top(self, table: str, doing: str) -> int:
        rows = self._query(doing, f"SELECT max(seq) FROM {table}")
        top = rows[0][0] if rows else None
        return 0 if top is None else int(top) + 1

    def size(self) -> int:
        return self._top("entries", "read the size")

    def search_watermark(self) -> int:
        return self._top("search", "read the index watermark")

    def heads(self) -> Heads:
        top, indexed, signed = self._query("read the size", HEADS)[0]
        return Heads(
            0 if top is None else int(top) + 1,
            0 if indexed is None else int(indexed) + 1,
            -1 if signed is None else int(signed),
        )

    def get_entry(self, seq: int) -> StoredEntry | None:
        rows = self._query(
            "read an entry", f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE seq = %s", (seq,)
        )
        return StoredEntry(*rows[0]) if rows else None

    def get_entry_by_id(self, event_id: str) -> StoredEntry | None:
        rows = self._query(
            "read an entry", f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = %s", (event_id,)
        )
        return StoredEntry(*rows[0]) if rows else None

    def get_entries(self, seqs: Iterable[int]) -> dict[int, StoredEntry]:
        wanted = sorted(set(seqs))
        if not wanted:
            return {}
        rows = self._query(
            "read entries",
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE seq = ANY(%b::bigint[])",
            (wanted,),
        )
        return {int(row[0]): StoredEntry(*row) for row in rows}

    def leaf_hashes(self, seqs: Iterable[int]) -> dict[int, bytes]:
        wanted = sorted(set(seqs))
        if not wanted:
            return {}
        rows = self._query(
            "read leaf hashes",
            "SELECT seq, leaf_hash FROM entries WHERE seq = ANY(%b::bigint[])",
            (wanted,),
        )
        return {int(seq): lh for seq, lh in rows}

    def nodes(self, keys: Iterable[int]) -> dict[int, bytes]:
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        rows = self._query(
            "read tree nodes", "SELECT k, hash FROM nodes WHERE k = ANY(%b::bigint[])", (wanted,)
        )
        return {int(k): h for k, h in rows}

    def iter_entry_rows(
        self, begin: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, str, Any, Any]]:
        """Pages of :data:`PAGE_SIZE` rows by keyset (``seq >= last + 1``): flat memory, and
        no cursor held open between pages (inside :meth:`snapshot`, every page reads the
        same snapshot)."""
        statement = f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE seq >= %s"
        if end is not None:
            statement += " AND seq < %s"
        statement += " ORDER BY seq LIMIT %s"
        position = begin
        while True:
            params = (position, PAGE_SIZE) if end is None else (position, end, PAGE_SIZE)
            rows = self._query("read entries", statement, params)
            yield from rows
            if len(rows) < PAGE_SIZE:
                return
            position = int(rows[-1][0]) + 1

    def iter_level(
        self, level: int, begin: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        low, high = level_key_range(level)
        position = low + begin
        last = high if end is None else min(high, low + end)
        while True:
            rows = self._query(
                "read tree nodes",
                "SELECT k, hash FROM nodes WHERE k >= %s AND k < %s ORDER BY k LIMIT %s",
                (position, last, PAGE_SIZE),
            )
            for k, h in rows:
                yield int(k) - low, h
            if len(rows) < PAGE_SIZE:
                return
            position = int(rows[-1][0]) + 1

    def checkpoints(self) -> list[StoredCheckpoint]:
        rows = self._query(
            "read checkpoints",
            "SELECT size, root_hash, note, created FROM checkpoints ORDER BY size",
        )
        return [StoredCheckpoint(*r) for r in rows]

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        rows = self._query(
            "read checkpoints",
            "SELECT size, root_hash, note, created FROM checkpoints ORDER BY size DESC LIMIT 1",
        )
        return StoredCheckpoint(*rows[0]) if rows else None

    def prunes(self) -> dict[int, PruneRecord]:
        rows = self._query("read prunes", "SELECT seq, by_event, pruned_at FROM prunes")
        return {int(r[0]): PruneRecord(*r) for r in rows}

    def pruned_of_type(self, target_type: str, after: int, until: str, limit: int) -> list[int]:
        params = [_index_text(target_type), after, until, limit]
        return [int(r[0]) for r in self._query("read prunes", _pg(PRUNED_OF_TYPE), params)]

    def search(self, query: SearchQuery) -> list[int]:
        statement, params = search_sql(query)
        params = [_index_text(p) if isinstance(p, str) else p for p in params]
        return [int(r[0]) for r in self._query("search", _pg(statement), params)]

    def seq_range_for_time(self, since: str | None, until: str | None) -> tuple[int, int]:
        where: list[str] = []
        params: list[str | None] = []
        if since is not None:
            where.append("time >= %s")
            params.append(_index_text(since))
        if until is not None:
            where.append("time < %s")
            params.append(_index_text(until))
        statement = "SELECT min(seq), max(seq) FROM search"
        if where:
            statement += " WHERE " + " AND ".join(where)
        rows = self._query("search", statement, params)
        if not rows or rows[0][0] is None:
            return 0, 0
        return int(rows[0][0]), int(rows[0][1]) + 1
