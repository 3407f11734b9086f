"""Ledger benchmarks: ingest, verify, proofs and memory, each against a baseline in the same run.

    .venv/bin/python bench/ledger_bench.py [--events 1000000] [--postgres URL] [--skip-postgres]

Results are printed as a table; docs/benchmarks.md records a run. Baselines:

Ingest and its baseline are fed the same batches in turn, so drift on a shared machine hits
both alike.

* SQLite ingest: a plain batched INSERT of the same rows (seq, id, canonical body) into a
  table with an index on id, same pragmas (WAL, synchronous=FULL), same batch size.
* PostgreSQL ingest: the same plain batched INSERT (executemany, one transaction per batch).
* Verify: re-hashing every stored body with SHA-256 and nothing else, in one process.
* Proofs: reading one row by id (the least any proof must do).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from sealtrail.bundle import verify_bundle
from sealtrail.ledger import CheckpointPolicy, Ledger
from sealtrail.note import Signer
from sealtrail.store import open_store
from sealtrail.store.sqlite import SQLiteStore

BATCH = 5000


def event(i: int) -> dict[str, Any]:
    """A typical audit event: about 15 fields, ~450 bytes canonical."""
    return {
        "id": str(uuid.UUID(int=(0x0192 << 112) | (7 << 76) | (2 << 62) | i)),
        "action": "user.email.update",
        "actor": {"id": f"user:{i % 5000}", "type": "user"},
        "source": {
            "ip": "203.0.113.7",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
            "request_id": f"req-{i}",
        },
        "target": {"type": "user", "id": str(i % 100000)},
        "changes": {"email": {"old": f"a{i}@example.com", "new": f"b{i}@example.com"}},
        "tenant": "acme",
        "reason": "user request",
        "time": "2026-11-22T10:00:00.000000Z",
    }


def batches(n: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, n, BATCH):
        yield [event(i) for i in range(start, min(n, start + BATCH))]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


Append = Callable[[list[dict[str, Any]]], object]


def interleaved_ingest(
    n: int, baseline: Append, ledger: Append
) -> tuple[float, float, list[float]]:
    """Events/s of the baseline and of the ledger, fed the same batches in turn (baseline,
    ledger, baseline, ledger...), so that drift on a shared machine (other processes, disk
    flushes) hits both alike instead of whichever ran in the worse minute. Only the time
    inside each ``append`` counts (building the event dicts is not timed). Also the process
    RSS after each tenth of the run."""
    spent = [0.0, 0.0]
    memory = []
    step = max(1, n // BATCH // 10)
    for k, batch in enumerate(batches(n)):
        for which, append in enumerate((baseline, ledger)):
            t = time.perf_counter()
            append(batch)
            spent[which] += time.perf_counter() - t
        if k % step == step - 1:
            memory.append(rss_mb())
    return n / spent[0], n / spent[1], memory


def numbered_rows() -> Callable[[list[dict[str, Any]]], list[tuple[int, str, bytes]]]:
    """The baselines' rows, numbered across batches: (seq, id, sorted-key JSON)."""
    seq = 0

    def rows(batch: list[dict[str, Any]]) -> list[tuple[int, str, bytes]]:
        nonlocal seq
        out = [
            (seq + k, e["id"], orjson.dumps(e, option=orjson.OPT_SORT_KEYS))
            for k, e in enumerate(batch)
        ]
        seq += len(batch)
        return out

    return rows


def sqlite_baseline(path: Path) -> tuple[Append, sqlite3.Connection]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA cache_size=-65536")
    db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, body BLOB)")
    rows = numbered_rows()

    def append(batch: list[dict[str, Any]]) -> None:
        db.execute("BEGIN")
        db.executemany("INSERT INTO t VALUES (?, ?, ?)", rows(batch))
        db.execute("COMMIT")

    return append, db


def postgres_baseline(db: Any) -> Append:
    db.execute("DROP TABLE IF EXISTS bench_baseline")
    db.execute(
        "CREATE TABLE bench_baseline (seq BIGINT PRIMARY KEY, id TEXT NOT NULL UNIQUE, body BYTEA)"
    )
    db.commit()
    rows = numbered_rows()

    def append(batch: list[dict[str, Any]]) -> None:
        with db.cursor() as cur:
            cur.executemany("INSERT INTO bench_baseline VALUES (%s, %s, %s)", rows(batch))
        db.commit()

    return append


def verify_rates(ledger: Ledger, n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    t = time.perf_counter()
    # The baselines read the ledger's store directly: under its lock, as the ledger's own
    # reads are, so that the timed checkpoint cannot write through the connection meanwhile.
    with ledger._lock:
        for row in ledger.store.iter_entry_rows(0, n):
            hashlib.sha256(b"\x00" + row[2]).digest()
    out["baseline: sha256 of every body"] = n / (time.perf_counter() - t)
    for workers in (1, 2):
        t = time.perf_counter()
        report = ledger.verify(workers=workers)
        elapsed = time.perf_counter() - t
        assert report.ok, report.findings[:3]
        out[f"verify, {workers} process{'es' if workers > 1 else ''}"] = n / elapsed
    return out


def export_rates(ledger: Ledger, n: int, directory: Path) -> dict[str, float]:
    """Export with its range proof, and the offline check, against a plain JSONL dump."""
    out: dict[str, float] = {}
    t = time.perf_counter()
    with open(directory / "plain.jsonl", "wb") as f, ledger._lock:
        for row in ledger.store.iter_entry_rows(0, n):
            f.write(row[2] + b"\n")
    out["baseline: dump bodies as JSON Lines"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    with open(directory / "trail.bundle", "wb") as f:
        ledger.export(f, 0, n)
    out["export (bundle with range proof)"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    with open(directory / "trail.bundle", "rb") as f:
        assert verify_bundle(f, ledger.verifier).ok
    out["verify-bundle, offline"] = n / (time.perf_counter() - t)
    return out


def proof_latency(ledger: Ledger, n: int, samples: int = 2000) -> dict[str, float]:
    rng = random.Random(7)
    ids = [event(rng.randrange(n))["id"] for _ in range(samples)]
    ledger.checkpoint()
    base = []
    for eid in ids:
        t = time.perf_counter()
        with ledger._lock:
            ledger.store.get_entry_by_id(eid)
        base.append(time.perf_counter() - t)
    lat = []
    for eid in ids:
        t = time.perf_counter()
        ledger.prove(eid)
        lat.append(time.perf_counter() - t)

    def p(q: float, xs: list[float]) -> float:
        return statistics.quantiles(xs, n=100)[int(q) - 1] * 1000

    return {
        "baseline: row by id, p50 ms": p(50, base),
        "baseline: row by id, p99 ms": p(99, base),
        "prove (receipt), p50 ms": p(50, lat),
        "prove (receipt), p99 ms": p(99, lat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--postgres", default="postgresql://postgres@127.0.0.1:5432/sealtrail_bench"
    )
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    n = args.events
    rows: list[tuple[str, str, str]] = []
    policy = CheckpointPolicy(every_events=100_000, every_seconds=10.0)
    with tempfile.TemporaryDirectory() as tmp:
        baseline, baseline_db = sqlite_baseline(Path(tmp) / "baseline.db")
        ledger = Ledger(
            SQLiteStore(Path(tmp) / "trail.db"), Signer.generate("bench/log"), policy=policy
        )
        ledger.initialize()
        base, rate, memory = interleaved_ingest(n, baseline, ledger.append_many)
        baseline_db.close()
        rows.append(
            ("SQLite ingest, plain INSERT + id index (baseline)", f"{base:,.0f} ev/s", "1.00x")
        )
        rows.append(
            ("SQLite ingest, Ledger.append_many", f"{rate:,.0f} ev/s", f"{rate / base:.2f}x")
        )
        rows.append(
            ("  RSS during ingest (each tenth), MB", " ".join(f"{m:.0f}" for m in memory), "")
        )
        t = time.perf_counter()
        ledger.catch_up_index()
        rows.append(
            ("SQLite search index catch-up", f"{n / (time.perf_counter() - t):,.0f} ev/s", "")
        )
        vr = verify_rates(ledger, n)
        vbase = vr.pop("baseline: sha256 of every body")
        rows.append(("verify baseline: sha256 of every body", f"{vbase:,.0f} ev/s", "1.00x"))
        for k, v in vr.items():
            rows.append((k, f"{v:,.0f} ev/s", f"{v / vbase:.2f}x"))
        er = export_rates(ledger, n, Path(tmp))
        ebase = er.pop("baseline: dump bodies as JSON Lines")
        rows.append(("export baseline: dump bodies as JSON Lines", f"{ebase:,.0f} ev/s", "1.00x"))
        for k, v in er.items():
            rows.append((k, f"{v:,.0f} ev/s", f"{v / ebase:.2f}x"))
        for k, v in proof_latency(ledger, n).items():
            rows.append((k, f"{v:.3f}", ""))
        ledger.close()
    if not args.skip_postgres:
        import psycopg

        admin = args.postgres.rsplit("/", 1)[0] + "/postgres"
        dbname = args.postgres.rsplit("/", 1)[1]
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{dbname}"')
            db.execute(f'CREATE DATABASE "{dbname}"')
        try:
            with psycopg.connect(args.postgres) as db:
                ledger = Ledger(
                    open_store(args.postgres), Signer.generate("bench/log"), policy=policy
                )
                ledger.initialize()
                pbase, prate, pmemory = interleaved_ingest(
                    n, postgres_baseline(db), ledger.append_many
                )
                ledger.close()
            rows.append(
                (
                    "PostgreSQL ingest, plain INSERT + id index (baseline)",
                    f"{pbase:,.0f} ev/s",
                    "1.00x",
                )
            )
            rows.append(
                (
                    "PostgreSQL ingest, Ledger.append_many",
                    f"{prate:,.0f} ev/s",
                    f"{prate / pbase:.2f}x",
                )
            )
            rows.append(
                ("  RSS during ingest (each tenth), MB", " ".join(f"{m:.0f}" for m in pmemory), "")
            )
        finally:
            with psycopg.connect(admin, autocommit=True) as db:
                db.execute(f'DROP DATABASE IF EXISTS "{dbname}"')
    width = max(len(r[0]) for r in rows)
    print(
        f"\n{n:,} events, batches of {BATCH}, "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    for name, value, ratio in rows:
        print(f"{name.ljust(width)}  {value:>18}  {ratio}")
    print(f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
