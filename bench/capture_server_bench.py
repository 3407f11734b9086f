"""The database server's own cost of capturing a single-row update, without any client.

    .venv/bin/python bench/capture_server_bench.py [--rounds 5] [--transactions 5000]

A ``DO`` block runs ``--transactions`` one-row ``UPDATE ...; COMMIT`` in a loop, with an
audit context set in each transaction as the instrumented engine sends it, once on an
untracked table (the baseline) and once on a tracked one, alternating, in one backend.
What each loop costs is read as that backend's CPU time from ``/proc`` (user + system),
which a busy machine disturbs far less than wall time (its resolution, a clock tick of
10 ms, is 2 µs per transaction over 5,000): the server must run on this machine.
Commits use ``synchronous_commit = off`` (the flush is the same for both tables).

This is the server side of ``bench/capture_bench.py``'s single-row workload: what the
capture triggers, the outbox row and the commit-order row cost per transaction, to
compare changes to the generated SQL (see docs/db-capture.md). Needs the local
PostgreSQL (``$SEALTRAIL_TEST_PG``); a scratch database is created and dropped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

import orjson
import psycopg

# bench/ is the script's directory, so its sibling is importable: one scratch database helper.
from relay_bench import DEFAULT_SERVER, scratch_database

ROWS = 10_000
TABLES = ("plain", "accounts")  # the baseline, then the tracked table
CONTEXT = orjson.dumps(
    {"actor": {"id": "user:1", "type": "user"}, "source": {"request_id": "r-1"}}
).decode()


def create_tables(conn: psycopg.Connection[Any]) -> None:
    """The two tables of the workload, ``ROWS`` rows each, analyzed (the tracked one is
    ``accounts``; capture is not installed here)."""
    for table in TABLES:
        conn.execute(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, email text UNIQUE, name text, "
            "status text, balance numeric, updated_at timestamptz)"
        )
        conn.execute(f"CREATE INDEX ON {table} (status)")
        conn.execute(
            f"INSERT INTO {table} SELECT g, 'user' || g || '@example.org', 'User ' || g, "
            f"'active', g, now() FROM generate_series(1, {ROWS}) g"
        )
        conn.execute(f"VACUUM ANALYZE {table}")


def _setup(url: str) -> None:
    from sealtrail.capture import pg
    from sealtrail.capture.change import Track

    with psycopg.connect(url, autocommit=True) as conn:
        create_tables(conn)
    pg.install(url, [Track.of("public.accounts")])


def _backend_cpu(pid: int) -> float:
    """User + system CPU seconds of a local backend process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loop(conn: psycopg.Connection[object], table: str, n: int) -> float:
    """CPU µs per transaction of ``n`` one-row updates of ``table``, each committed."""
    body = (
        f"BEGIN FOR i IN 1..{n} LOOP "
        f"PERFORM set_config('sealtrail.context', '{CONTEXT}', true); "
        f"UPDATE {table} SET balance = balance + 1 WHERE id = i % {ROWS} + 1; "
        "COMMIT; END LOOP; END"
    )
    pid = conn.info.backend_pid
    before = _backend_cpu(pid)
    conn.execute(f"DO $bench$ {body} $bench$")
    return (_backend_cpu(pid) - before) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--transactions", type=int, default=5000)
    args = parser.parse_args()
    with scratch_database(DEFAULT_SERVER) as url:
        _setup(url)
        with psycopg.connect(url, autocommit=True) as conn:
            pid = conn.info.backend_pid
            if not os.path.exists(f"/proc/{pid}/stat"):
                sys.exit("the PostgreSQL server must run on this machine (its CPU is read)")
            conn.execute("SET synchronous_commit = off")
            for table in TABLES:  # warm up: plans, caches
                _loop(conn, table, 200)
            results: dict[str, list[float]] = {t: [] for t in TABLES}
            for k in range(args.rounds):
                for table in TABLES:
                    results[table].append(_loop(conn, table, args.transactions))
                print(
                    f"round {k + 1}: " + ", ".join(f"{t} {results[t][-1]:.1f} µs" for t in TABLES),
                    file=sys.stderr,
                )
    plain, captured = results["plain"], results["accounts"]
    added = [c - p for p, c in zip(plain, captured, strict=True)]
    print(
        f"\n{args.transactions:,} one-row update transactions per loop, {args.rounds} rounds; "
        "server CPU per transaction (the backend's user + system time); minimum and median"
    )
    print("\n| table | min | median |\n|---|---|---|")
    print(f"| untracked (baseline) | {min(plain):.1f} µs | {statistics.median(plain):.1f} µs |")
    print(f"| tracked | {min(captured):.1f} µs | {statistics.median(captured):.1f} µs |")
    print(
        f"| added by capture (same round) | {min(added):.1f} µs | "
        f"{statistics.median(added):.1f} µs |"
    )


if __name__ == "__main__":
    main()
