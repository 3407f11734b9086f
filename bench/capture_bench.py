"""Database capture on PostgreSQL: the cost of auditing, side by side with the unaudited
baseline measured in the same run, and with two other SQLAlchemy auditing libraries.

    .venv/bin/python bench/capture_bench.py                # all variants, 3 rounds
    .venv/bin/python bench/capture_bench.py --rounds 5 --single 3000 --sync

Needs the local PostgreSQL (``$SEALTRAIL_TEST_PG``, default
``postgresql://postgres@127.0.0.1:5432/postgres``; a database is created and dropped per
measurement). The other libraries are not Sealtrail dependencies; install them into the
venv to include them (a variant whose library is missing or fails is reported with its
error)::

    .venv/bin/pip install sqlalchemy-continuum postgresql-audit

Workloads, on an ``accounts`` table (bigint key, unique email, indexed status, numeric
balance, timestamptz; 10,000 rows):

* single: SQLAlchemy ORM, one session, ``session.get`` + change ``balance`` + ``commit``,
  one row per transaction (each Sealtrail transaction under a new ``sealtrail.context``);
* bulk: one ``UPDATE accounts SET balance = balance + 1`` of all 10,000 rows, committed.

Each variant runs in its own process (the libraries hook SQLAlchemy globally), in rounds
that interleave the variants so that drift on a busy machine hits them alike; the table
shows the median per variant, and the median (and range) over the rounds of its ratio to
the unaudited time of the same round. Commits run with
``synchronous_commit = off`` unless ``--sync`` is given: the disk flush is the same for
every variant and would hide the CPU cost being compared.

A second table gives the CPU the single-row loop used per transaction: the client's
(``time.process_time``) and its database backend's (``/proc/<pid>/stat``, the server
being local), and the ratio of their sum to the unaudited sum: what each side adds,
apart from the wake-up latencies in wall time. On a virtual machine without steal-time
accounting, time the host takes away is charged to whatever process was running, so CPU
time swings with the machine too (docs/db-capture.md, session 8).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MAINTENANCE_URL = os.environ.get(
    "SEALTRAIL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
)
ROWS = 10_000
VARIANTS = ("unaudited", "sealtrail", "sqlalchemy-continuum", "postgresql-audit")


def _database_url(name: str, driver: str = "postgresql") -> str:
    parts = urlsplit(MAINTENANCE_URL)
    return urlunsplit(parts._replace(scheme=driver, path=f"/{name}", query=""))


# -- one measurement (in a child process) ----------------------------------------------------


def _models(variant: str) -> tuple[Any, Any]:
    """(Base, Account) for the variant."""
    import sqlalchemy as sa
    from sqlalchemy.orm import DeclarativeBase

    versioned: dict[str, Any] = {}
    if variant == "sqlalchemy-continuum":
        from sqlalchemy_continuum import make_versioned

        make_versioned(user_cls=None)
        versioned = {"__versioned__": {}}

    class Base(DeclarativeBase):
        pass

    if variant == "postgresql-audit":
        from postgresql_audit import versioning_manager

        versioning_manager.init(Base)
        versioned = {"__versioned__": {}}

    account = type("Account", (Base,), {**account_attributes("accounts"), **versioned})
    sa.orm.configure_mappers()
    return Base, account


def account_attributes(table: str) -> dict[str, Any]:
    """The class body of the workload's mapped ``accounts`` table, named ``table``."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Mapped, mapped_column

    return {
        "__tablename__": table,
        "__annotations__": {
            "id": Mapped[int],
            "email": Mapped[str],
            "name": Mapped[str],
            "status": Mapped[str],
            "balance": Mapped[Decimal],
            "updated_at": Mapped[Any],
        },
        "id": mapped_column(sa.BigInteger, primary_key=True),
        "email": mapped_column(sa.String(200), unique=True),
        "name": mapped_column(sa.String(200)),
        "status": mapped_column(sa.String(20), index=True),
        "balance": mapped_column(sa.Numeric(12, 2)),
        "updated_at": mapped_column(sa.DateTime(timezone=True)),
    }


def measure(variant: str, single: int, bulk_runs: int, sync: bool) -> dict[str, Any]:
    import psycopg
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    name = f"sealtrail_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(MAINTENANCE_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    options = {} if sync else {"options": "-c synchronous_commit=off"}
    engine = sa.create_engine(_database_url(name, "postgresql+psycopg"), connect_args=options)
    try:
        base, account = _models(variant)
        if variant == "postgresql-audit":
            # Its audit_table() function comes with the activity table: create that first.
            from postgresql_audit import versioning_manager

            tables = [versioning_manager.transaction_cls.__table__]
            tables.append(versioning_manager.activity_cls.__table__)
            base.metadata.create_all(engine, tables=tables)
        base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO accounts (id, email, name, status, balance, updated_at) "
                f"SELECT g, 'user' || g || '@example.org', 'User ' || g, 'active', g, now() "
                f"FROM generate_series(1, {ROWS}) g"
            )
        with psycopg.connect(_database_url(name), autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE accounts")
        context: Any = None
        if variant == "sealtrail":
            import sealtrail
            from sealtrail.capture import pg
            from sealtrail.capture.change import Track

            pg.install(_database_url(name), [Track.of("public.accounts")])
            pg.instrument(engine)
            context = sealtrail.context

        def one(session: Session, i: int) -> None:
            acc = session.get(account, i % ROWS + 1)
            acc.balance = acc.balance + 1
            session.commit()

        with Session(engine) as session:
            for i in range(200):  # warm up: caches, plans, connection
                if context is not None:
                    with context(actor=f"user:{i % 10}"):
                        one(session, i)
                else:
                    one(session, i)
            backend = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            session.commit()
            server_cpu = _process_cpu(backend)
            client_cpu = time.process_time()
            start = time.perf_counter()
            for i in range(single):
                if context is not None:
                    with context(actor=f"user:{i % 10}", request_id=f"r{i}"):
                        one(session, i)
                else:
                    one(session, i)
            single_us = (time.perf_counter() - start) / single * 1e6
            client_us = (time.process_time() - client_cpu) / single * 1e6
            server_us = (_process_cpu(backend) - server_cpu) / single * 1e6
            if session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() != backend:
                server_us = float("nan")  # another connection served part of the loop
            session.commit()

        bulk: list[float] = []
        for _ in range(bulk_runs):
            with psycopg.connect(_database_url(name), autocommit=True) as conn:
                conn.execute("VACUUM accounts")
            with Session(engine) as session:
                start = time.perf_counter()
                if context is not None:
                    with context(actor="user:bulk"):
                        session.execute(sa.text("UPDATE accounts SET balance = balance + 1"))
                        session.commit()
                else:
                    session.execute(sa.text("UPDATE accounts SET balance = balance + 1"))
                    session.commit()
                bulk.append((time.perf_counter() - start) * 1000)
        captured = _captured(variant, engine)
        return {
            "single_us": single_us,
            "client_cpu_us": client_us,
            "server_cpu_us": server_us,
            "bulk_ms": statistics.median(bulk),
            "captured": captured,
        }
    finally:
        engine.dispose()
        with psycopg.connect(MAINTENANCE_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a local process has used: the database backend serving
    the loop, read from ``/proc`` (the server runs on this machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the command name: state is field 3, utime 14 and stime 15 (proc(5)).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _captured(variant: str, engine: Any) -> int | None:
    """How many change records the variant kept (to show what a bulk UPDATE left)."""
    import sqlalchemy as sa

    table = {
        "sealtrail": "sealtrail_outbox",
        "sqlalchemy-continuum": "accounts_version",
        "postgresql-audit": "activity",
    }.get(variant)
    if table is None:
        return None
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


# -- the run ---------------------------------------------------------------------------------


def _child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--single",
        str(args.single),
        "--bulk-runs",
        str(args.bulk_runs),
    ]
    if args.sync:
        command.append("--sync")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {done.returncode}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single", type=int, default=2000, help="single-row transactions")
    parser.add_argument("--bulk-runs", type=int, default=5)
    parser.add_argument("--sync", action="store_true", help="keep synchronous_commit on")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.single, args.bulk_runs, args.sync)))
        return

    variants = [v for v in args.variants.split(",") if v]
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            results[variant].append(_child(variant, args))
            print(f"round {round_ + 1} {variant}: {results[variant][-1]}", file=sys.stderr)

    def median(variant: str, key: str) -> float | None:
        values = [r[key] for r in results[variant] if key in r]
        return statistics.median(values) if values else None

    def ratios(variant: str, key: str) -> list[float]:
        """Per round, the variant's time over the unaudited time of the same round: a
        round's variants run back to back, so drift on a busy machine cancels out."""
        pairs = zip(results[variant], results.get("unaudited", []), strict=False)
        return [r[key] / b[key] for r, b in pairs if key in r and b.get(key)]

    def ratio(variant: str, key: str) -> str:
        values = ratios(variant, key)
        if not values:
            return ""
        spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
        return f"{statistics.median(values):.2f}x{spread}"

    print(
        f"\n{ROWS:,} rows; {args.single} single-row transactions; median of {args.rounds} "
        f"rounds; synchronous_commit={'on' if args.sync else 'off'}; ratio: median "
        "(min-max) over the rounds of the variant's time over the same round's unaudited "
        "time\n"
    )
    print("| variant | single-row ORM update | ratio | bulk UPDATE 10k rows | ratio | records |")
    print("|---|---|---|---|---|---|")
    for variant in variants:
        errors = [r["error"] for r in results[variant] if "error" in r]
        if errors and len(errors) == len(results[variant]):
            print(f"| {variant} | error: {errors[0]} | | | | |")
            continue
        single, bulk = median(variant, "single_us"), median(variant, "bulk_ms")
        captured = results[variant][-1].get("captured")
        print(
            f"| {variant} | {single:.0f} µs | {ratio(variant, 'single_us')} | {bulk:.1f} ms "
            f"| {ratio(variant, 'bulk_ms')} | {'' if captured is None else captured} |"
        )
    for variant in variants:
        for r in results[variant]:
            if "client_cpu_us" in r:
                r["cpu_us"] = r["client_cpu_us"] + r["server_cpu_us"]
    print(
        "\nCPU per single-row transaction (client: this process; server: its database "
        "backend, from /proc; clock-tick resolution), medians over the rounds; ratio: the "
        "sum over the same round's unaudited sum\n"
    )
    print("| variant | client CPU | server CPU | both | ratio |")
    print("|---|---|---|---|---|")
    for variant in variants:
        client, server = median(variant, "client_cpu_us"), median(variant, "server_cpu_us")
        both = median(variant, "cpu_us")
        if client is None or server is None or both is None:
            continue
        print(
            f"| {variant} | {client:.0f} µs | {server:.0f} µs | {both:.0f} µs "
            f"| {ratio(variant, 'cpu_us')} |"
        )


if __name__ == "__main__":
    main()
