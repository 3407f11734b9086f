"""The single-row capture cost split into the application's part and the server's part,
in one process, on one database, at the same moments.

    .venv/bin/python bench/capture_parts_bench.py [--blocks 15] [--block 200]

``bench/capture_bench.py`` compares variants run in separate processes (the other
libraries hook SQLAlchemy globally), so each ratio also carries the drift between them.
Here four ways of running ``bench/capture_bench.py``'s single-row workload (ORM
``session.get`` + change ``balance`` + ``commit``, one row per transaction) take turns
in blocks of ``--block`` transactions, and each block is compared with the baseline block
just before it:

* ``unaudited``: a plain engine, an uncaptured copy of the table, no audit context;
* ``application side``: an instrumented engine, each transaction under a new
  ``sealtrail.context``, on the uncaptured table (what the client adds: the context
  manager, ``context_json``, the listener, ``BEGIN; SET LOCAL``);
* ``server side``: a plain engine on the captured table, no context (what the triggers,
  the outbox row and the commit-order row add; the actor is then the database role);
* ``captured``: the instrumented engine, a context, the captured table (the real thing).

``--probes`` adds two ways that are not Sealtrail, to weigh designs (each on a copy of the
captured table whose update capture function is replaced after install):

* ``probe: context left to the relay``: the trigger as installed, but the context is
  stored as text (parsed only for its object check and refusal) instead of being made
  into the event's actor, source, reason, tenant, subject and data;
* ``probe: raw rows``: the trigger only stores the old and new rows (``to_jsonb``), the
  context text and the time, with the commit order kept: about the least any trigger
  with a transactional outbox and commit order can do, with the event left to be built
  by the relay.

Needs the local PostgreSQL (``$SEALTRAIL_TEST_PG``); a scratch database is made and
dropped. Commits use ``synchronous_commit = off``, as in ``capture_bench.py``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# bench/ is the script's directory, so its sibling is importable.
from capture_bench import account_attributes
from relay_bench import DEFAULT_SERVER, scratch_database

ROWS = 10_000

# The probe "context left to the relay": base_sql's own FROM (the raw values, the ids, the
# context parsed for its object check), its envelope pieces but time and data.db constants,
# the context kept as text in data.
_RAW_CONTEXT_PIECES = """  SELECT c.txid, c.uuid_prefix, c.id_mid, c.id_base,
    '"time":"' || to_char(c.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"'
      AS time_actor,
    '' AS f_reason, '' AS f_source, '' AS f_tenant, '' AS f_subject,
    '{"context":' || coalesce(to_json(c.ctx::text)::text, 'null') || ',' AS data_open,
    ',"role":' || to_json(c.who)::text || ',"txid":' || to_json(c.txid)::text AS db_role_txid,
    CASE WHEN c.ctx IS NULL THEN ',"app_context":"missing"'
         ELSE ',"app_context":"present"' END AS db_app,
    c.ctx ->> 'missing_actor' AS refuse,
    set_config('sealtrail.first',
               c.uuid_prefix || c.id_mid || lpad(to_hex(c.id_base), 12, '0'), true) AS first
"""


def _raw_context_base(original: Callable[[str], str], s: str) -> str:
    base = original(s)
    return _RAW_CONTEXT_PIECES + base[base.index("  FROM (SELECT t.txid") :]


# The probe "raw rows": the rows, the context text and the time; the commit order kept.
_RAW_ROWS_BODY = """
DECLARE
  rows integer;
BEGIN
  SELECT count(*) INTO rows FROM (SELECT FROM sealtrail_new LIMIT 2) x;
  INSERT INTO public.sealtrail_outbox (event_id, txid, event)
  SELECT f.id::uuid, pg_current_xact_id()::text,
         json_build_object('old', to_jsonb(o), 'new', to_jsonb(n), 'time', statement_timestamp(),
                           'context', current_setting('sealtrail.context', true))
  FROM (SELECT set_config('sealtrail.first', gen_random_uuid()::text, true) AS id OFFSET 0) f,
       sealtrail_old o, sealtrail_new n;
  RETURN NULL;
END
"""


def _install_probes(url: str) -> None:
    """Capture on the two probe tables, their update functions then replaced."""
    import psycopg

    from sealtrail.capture import _pg_sql as q
    from sealtrail.capture import pg
    from sealtrail.capture.change import Track

    tables = ("accounts_ctx", "accounts_raw")
    pg.install(url, [Track.of("public.accounts"), *(Track.of(f"public.{t}") for t in tables)])
    with psycopg.connect(url, autocommit=True) as conn:
        for table in tables:
            spec = pg._spec(conn, Track.of(f"public.{table}"), "public")
            if table == "accounts_ctx":
                original = q.base_sql
                q.base_sql = functools.partial(_raw_context_base, original)
                try:
                    functions = q.table_functions(spec, '"public"')
                finally:
                    q.base_sql = original  # type: ignore[assignment]
            else:
                functions = q.table_functions(spec, '"public"')
            for function in functions.values():
                if function.name.endswith("_update"):
                    if table == "accounts_raw":
                        function = q.Function(function.name, _RAW_ROWS_BODY, function.config)
                    conn.execute(function.create('"public"'))  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--block", type=int, default=200, help="transactions per block")
    parser.add_argument("--probes", action="store_true", help="add the two design probes")
    args = parser.parse_args()

    import sqlalchemy as sa
    from sqlalchemy.orm import DeclarativeBase, Session

    import sealtrail
    from sealtrail.capture import pg
    from sealtrail.capture.change import Track

    class Base(DeclarativeBase):
        pass

    def model(table: str) -> Any:
        return type(table.title(), (Base,), account_attributes(table))

    plain_model, captured_model = model("plain"), model("accounts")
    probes = (model("accounts_ctx"), model("accounts_raw")) if args.probes else ()
    with scratch_database(DEFAULT_SERVER) as url:
        sa_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
        options = {"options": "-c synchronous_commit=off"}
        plain_engine = sa.create_engine(sa_url, connect_args=options)
        instrumented = sa.create_engine(sa_url, connect_args=options)
        Base.metadata.create_all(plain_engine)
        with plain_engine.begin() as conn:
            for table in ("plain", "accounts", *(p.__tablename__ for p in probes)):
                conn.exec_driver_sql(
                    f"INSERT INTO {table} (id, email, name, status, balance, updated_at) "
                    f"SELECT g, 'user' || g || '@example.org', 'User ' || g, 'active', g, now() "
                    f"FROM generate_series(1, {ROWS}) g"
                )
        if probes:
            _install_probes(url)
        else:
            pg.install(url, [Track.of("public.accounts")])
        pg.instrument(instrumented)
        with plain_engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")

        sessions = [Session(plain_engine), Session(instrumented), Session(plain_engine)]

        def way(session: Session, cls: Any, with_context: bool) -> Callable[[int], None]:
            def one(i: int) -> None:
                row = session.get(cls, i % ROWS + 1)
                row.balance = row.balance + 1
                session.commit()

            def run(start: int) -> None:
                for i in range(start, start + args.block):
                    if with_context:
                        with sealtrail.context(actor=f"user:{i % 10}", request_id=f"r{i}"):
                            one(i)
                    else:
                        one(i)

            return run

        ways = {
            "unaudited": way(sessions[0], plain_model, False),
            "application side": way(sessions[1], plain_model, True),
            "server side": way(sessions[2], captured_model, False),
            "captured": way(sessions[1], captured_model, True),
        }
        if probes:
            ways["probe: context left to the relay"] = way(sessions[1], probes[0], True)
            ways["probe: raw rows"] = way(sessions[1], probes[1], True)
        for run in ways.values():  # warm up: plans, caches, connections
            run(0)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for block in range(args.blocks):
            for name, run in ways.items():
                start = time.perf_counter()
                run(block * args.block)
                times[name].append((time.perf_counter() - start) / args.block * 1e6)
            print(
                f"block {block + 1}: " + ", ".join(f"{n} {t[-1]:.0f} µs" for n, t in times.items()),
                file=sys.stderr,
            )
        for session in sessions:
            session.close()
        plain_engine.dispose()
        instrumented.dispose()

    base = times["unaudited"]
    print(
        f"\n{args.blocks} blocks of {args.block} single-row ORM transactions, the ways "
        "in turn; ratio: median (min-max) over the blocks of the block's time over the "
        "unaudited block just before it\n"
    )
    print("| way | per transaction | ratio |\n|---|---|---|")
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        print(
            f"| {name} | {statistics.median(values):.0f} µs | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) |"
        )


if __name__ == "__main__":
    main()
