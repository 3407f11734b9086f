"""Relay throughput: a PostgreSQL outbox shipped into a SQLite and a PostgreSQL ledger,
against ``Ledger.append_many`` of the same events with no relay, in the same run.

    .venv/bin/python bench/relay_bench.py [--changes 100000] [--batch 2000] [--postgres URL]

The outbox is filled by one bulk statement through the capture triggers of
:mod:`sealtrail.capture.pg` when that module is installed (``UPDATE`` of every row of a
tracked ``accounts`` table: one ``db.update`` event per row, in one transaction), else by
inserting the same kind of events directly (``--direct``). ``--per-transaction K`` makes
it ``changes / K`` transactions of ``K`` rows each instead (``1``: what an application
committing one row at a time leaves: one commit row per event). A copy of the filled outbox is
kept, and put back before each measured run, so every run ships the same events.

Measured per ledger backend:

* baseline: ``Ledger.append_many`` of the outbox's events (parsed beforehand), batches of
  ``--batch``;
* relay: ``Relay.run_once()`` with the default redactor: read the outbox in commit order,
  redact, validate, append, delete the shipped rows;
* relay without redaction (``processors=[]``), to show what redaction costs.

A scratch database ``sealtrail_bench_<pid>`` is created on the server and dropped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg
from psycopg import sql

from sealtrail.capture.change import json_value
from sealtrail.capture.relay import Relay
from sealtrail.event import new_event_id
from sealtrail.ledger import CheckpointPolicy, Ledger
from sealtrail.note import Signer
from sealtrail.store import open_store

DEFAULT_SERVER = os.environ.get(
    "SEALTRAIL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}", query=""))


@contextlib.contextmanager
def scratch_database(server: str) -> Iterator[str]:
    name = f"sealtrail_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(server, name)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def direct_event(i: int, txid: str) -> dict[str, Any]:
    """A captured UPDATE as the triggers write it: about 600 bytes."""
    return {
        "id": new_event_id(),
        "time": "2026-11-22T10:00:00.123456Z",
        "action": "db.update",
        "outcome": "success",
        "schema": 1,
        "actor": {"id": f"user:{i % 5000}", "type": "user"},
        "source": {"ip": "203.0.113.7", "request_id": f"req-{i // 10}"},
        "tenant": "acme",
        "target": {"type": "db:app.accounts", "id": str(i)},
        "changes": {
            "balance": {"old": json_value(i / 4), "new": json_value(i / 4 + 1.25)},
            "status": {"old": "active", "new": "frozen"},
            "updated_at": {
                "old": "2026-11-21T09:00:00.000000+00:00",
                "new": "2026-11-22T10:00:00.123456+00:00",
            },
        },
        "data": {
            "db": {
                "table": "app.accounts",
                "op": "update",
                "pk": {"id": i},
                "txid": txid,
                "app_context": "present",
                "role": "app",
            }
        },
    }


def fill_direct(conn: psycopg.Connection[Any], n: int) -> None:
    conn.execute(
        """
        CREATE TABLE sealtrail_outbox (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id uuid NOT NULL UNIQUE,
            txid text NOT NULL,
            event jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now());
        CREATE TABLE sealtrail_outbox_commit (
            txid text PRIMARY KEY, commit_seq bigint UNIQUE NOT NULL);
        """
    )
    txid = "7000001"
    with conn.cursor().copy("COPY sealtrail_outbox (event_id, txid, event) FROM STDIN") as copy:
        for i in range(n):
            event = direct_event(i, txid)
            copy.write_row((event["id"], txid, orjson.dumps(event).decode()))
    conn.execute("INSERT INTO sealtrail_outbox_commit VALUES (%s, 1)", (txid,))
    conn.commit()


def fill_through_triggers(conn: psycopg.Connection[Any], n: int, per_tx: int = 0) -> None:
    from sealtrail.capture import pg
    from sealtrail.capture.change import Track

    conn.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance numeric(14,2), status text, "
        "updated_at timestamptz)"
    )
    conn.execute(
        "INSERT INTO accounts SELECT g, g / 4.0, 'active', '2026-11-21 09:00+00' "
        "FROM generate_series(0, %s) g",
        (n - 1,),
    )
    conn.commit()
    pg.install(conn, [Track.of("app.accounts")], schema="app")
    conn.commit()
    pg.grant_relay(conn, "postgres", schema="app")  # the bench relays as the superuser
    conn.commit()
    # The install is an event of its own: keep only the bulk statement's.
    with psycopg.connect(conn.info.dsn, autocommit=True) as owner:
        owner.execute("SET search_path TO app")
        owner.execute("DELETE FROM sealtrail_outbox")
        owner.execute("DELETE FROM sealtrail_outbox_commit")
    started = time.perf_counter()
    context = orjson.dumps({"actor": {"id": "user:7", "type": "user"}, "tenant": "acme"}).decode()
    change = "SET balance = balance + 1.25, status = 'frozen', updated_at = now()"
    if per_tx:
        # One transaction per per_tx rows, each with its context, as an application commits.
        conn.commit()
        conn.autocommit = True
        conn.execute(
            sql.SQL(
                "DO $bench$ BEGIN FOR i IN 0..{last} BY {k} LOOP "
                "PERFORM set_config('sealtrail.context', {context}, true); "
                "UPDATE accounts {change} WHERE id >= i AND id < i + {k}; "
                "COMMIT; END LOOP; END $bench$"
            ).format(
                last=sql.Literal(n - 1),
                k=sql.Literal(per_tx),
                context=sql.Literal(context),
                change=sql.SQL(change),
            )
        )
        conn.autocommit = False
        what = f"{-(-n // per_tx):,} transactions of {per_tx:,} rows"
    else:
        conn.execute("SELECT set_config('sealtrail.context', %s, true)", (context,))
        conn.execute(f"UPDATE accounts {change}")
        conn.commit()
        what = f"one UPDATE of {n:,} rows"
    took = time.perf_counter() - started
    print(f"  {what} through the capture triggers: {took:.2f} s")


def snapshot(conn: psycopg.Connection[Any]) -> None:
    """Keep the filled outbox aside (restored before each run) and empty it."""
    conn.execute("CREATE TABLE bench_outbox AS SELECT * FROM sealtrail_outbox")
    conn.execute("CREATE TABLE bench_commit AS SELECT * FROM sealtrail_outbox_commit")
    conn.commit()
    with psycopg.connect(conn.info.dsn, autocommit=True) as owner:
        owner.execute("SET search_path TO app")
        owner.execute("DELETE FROM sealtrail_outbox")
        owner.execute("DELETE FROM sealtrail_outbox_commit")


def restore(app_dsn: str) -> None:
    with psycopg.connect(app_dsn, options="-csearch_path=app") as conn:
        conn.execute(
            "INSERT INTO sealtrail_outbox OVERRIDING SYSTEM VALUE SELECT * FROM bench_outbox"
        )
        conn.execute("INSERT INTO sealtrail_outbox_commit SELECT * FROM bench_commit")
        conn.commit()
    with psycopg.connect(app_dsn, options="-csearch_path=app", autocommit=True) as conn:
        conn.execute("ANALYZE sealtrail_outbox")
        conn.execute("ANALYZE sealtrail_outbox_commit")


def outbox_events(app_dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(app_dsn, options="-csearch_path=app") as conn:
        rows = conn.execute(
            "SELECT o.event::text FROM bench_outbox o JOIN bench_commit c USING (txid) "
            "ORDER BY c.commit_seq, o.id"
        ).fetchall()
    return [orjson.loads(r[0]) for r in rows]


def fresh_ledger(kind: str, directory: Path, db_url: str, signer: Signer) -> Ledger:
    if kind == "sqlite":
        url = f"sqlite:///{directory / f'ledger_{secrets.token_hex(3)}.db'}"
    else:
        url = f"{db_url}?schema=ledger_{secrets.token_hex(3)}"
    ledger = Ledger(open_store(url), signer, policy=CheckpointPolicy(every_seconds=0))
    ledger.initialize()
    return ledger


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--postgres", default=DEFAULT_SERVER, help="maintenance URL")
    parser.add_argument("--direct", action="store_true", help="fill the outbox without triggers")
    parser.add_argument("--ledgers", default="sqlite,postgres")
    parser.add_argument(
        "--per-transaction",
        type=int,
        default=0,
        help="rows per captured transaction (default: all in one bulk UPDATE)",
    )
    parser.add_argument(
        "--workers", default=f"0,{os.cpu_count() or 1}", help="worker process counts to try"
    )
    args = parser.parse_args()
    n = args.changes
    signer = Signer.generate("bench.sealtrail/relay")
    with scratch_database(args.postgres) as db_url, tempfile.TemporaryDirectory() as tmp:
        with psycopg.connect(db_url) as conn:
            conn.execute("CREATE SCHEMA app")
            conn.execute("SET search_path TO app")
            conn.commit()
            triggers = False
            if not args.direct:
                try:
                    from sealtrail.capture import pg

                    triggers = hasattr(pg, "install")
                except ImportError:
                    triggers = False
            print(
                f"filling the outbox with {n:,} changes "
                f"({'bulk UPDATE through the capture triggers' if triggers else 'direct inserts'})"
            )
            if triggers:
                fill_through_triggers(conn, n, args.per_transaction)
            else:
                fill_direct(conn, n)
            snapshot(conn)
        app_url = f"{db_url}?options=-csearch_path%3Dapp"
        events = outbox_events(db_url)
        # Out of the collector's reach: a relay process holds no 100,000 parsed events, and
        # every full collection during the runs would walk them (the baseline runs with
        # the collector paused, the relay only per batch).
        gc.freeze()
        size = len(orjson.dumps(events[0]))
        print(f"{len(events):,} events of about {size} bytes; batch {args.batch}")
        print()
        print(f"{'ledger':10} {'measurement':52} {'changes/s':>10} {'ratio':>7}")
        sys.stdout.flush()
        for kind in args.ledgers.split(","):
            ledger = fresh_ledger(kind, Path(tmp), db_url, signer)
            copies = [dict(e) for e in events]

            def baseline(ledger: Ledger = ledger, copies: list[dict[str, Any]] = copies) -> None:
                for start in range(0, len(copies), args.batch):
                    ledger.append_many(copies[start : start + args.batch])

            base = timed(baseline)
            ledger.close()
            # The copies are the baseline's input: dropped before the relay runs, whose
            # every full collection would otherwise walk them (a relay holds one batch).
            copies.clear()
            gc.collect()
            label = "Ledger.append_many (baseline, no relay)"
            print(f"{kind:10} {label:52} {n / base:>10,.0f} {1:>6.2f}x")
            runs: list[tuple[str, list[Any] | None, int]] = []
            for workers in (int(w) for w in args.workers.split(",")):
                where = "in the relay process" if not workers else f"{workers} worker processes"
                runs.append((f"relay, default redaction, {where}", None, workers))
            runs.append(("relay, no redaction, in the relay process", [], 0))
            for label, processors, workers in runs:
                ledger = fresh_ledger(kind, Path(tmp), db_url, signer)
                restore(db_url)
                relay = Relay(
                    app_url, ledger, batch=args.batch, processors=processors, workers=workers
                )
                try:
                    took = timed(relay.run_once)
                    assert relay.stats.shipped == n, relay.stats
                    assert relay.pending() == 0
                finally:
                    relay.close()
                    ledger.close()
                print(f"{kind:10} {label:52} {n / took:>10,.0f} {base / took:>6.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
