"""Per-event cost of ``trail.record()`` against what teams use today, side by side in one run.

    .venv/bin/python bench/record_bench.py [--events 3000] [--rounds 3]

* baseline: stdlib ``logging`` with a JSON formatter (sealtrail.logfmt.JsonFormatter) to a
  file, one record at a time; the handler flushes each record to the OS (durable against a
  process crash, like the trail);
* structlog: JSON renderer to the same kind of file;
* ``trail.record()`` into the embedded SQLite store, with an audit context and the default
  redaction policy, one at a time; it returns after a durable commit (synchronous=FULL: it
  survives a power cut too, which the file baselines do not);
* the same from 8 threads at once;
* the best-effort mode through each kind of spool (SQLite, and the append-only journal),
  timed until delivered to the ledger, and the journal timed over the calls alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

import sealtrail
from sealtrail.event import prepare_canonical
from sealtrail.home import init_ledger
from sealtrail.logfmt import JsonFormatter

FIELDS = {
    "target": {"type": "user", "id": "42"},
    "changes": {"email": {"old": "a@example.com", "new": "b@example.com"}},
    "reason": "user request",
    "data": {"plan": "pro", "seats": 12},
}


def stdlib_json(path: Path, n: int) -> float:
    log = logging.getLogger("bench.stdlib")
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    t = time.perf_counter()
    for i in range(n):
        log.info("user.email.update", extra={**FIELDS, "actor": "alice", "n": i})
    elapsed = time.perf_counter() - t
    log.removeHandler(handler)
    handler.close()
    return n / elapsed


def structlog_json(path: Path, n: int) -> float:
    import structlog

    with open(path, "w") as f:
        logger = structlog.wrap_logger(
            structlog.WriteLogger(f),
            processors=[
                structlog.processors.TimeStamper(fmt="iso"),
                structlog.processors.JSONRenderer(),
            ],
        )
        t = time.perf_counter()
        for i in range(n):
            logger.info("user.email.update", actor="alice", n=i, **FIELDS)
            f.flush()
        return n / (time.perf_counter() - t)


def journal_floor(home: Path, path: Path, n: int) -> float:
    """The least any durable ``record()`` must do in the caller (not a Sealtrail mode): the
    context and the default redaction (secrets must not reach any storage, I5), validation
    and canonical encoding, then one ``write()`` of the bytes to an append-only file, as
    the logging baseline does. No ledger: what a journal folded into the ledger by another
    process would cost the application at best."""
    trail = sealtrail.connect(home)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        with sealtrail.context(actor="user:1", ip="203.0.113.7", request_id="r-1"):
            t = time.perf_counter()
            for i in range(n):
                fields = {**FIELDS, "data": {"n": i, "seats": 12}}
                event = trail.event("user.email.update", **fields)
                os.write(fd, prepare_canonical(event)[1] + b"\n")
            elapsed = time.perf_counter() - t
    finally:
        os.close(fd)
        trail.close()
    return n / elapsed


def trail_record(
    home: Path,
    n: int,
    threads: int,
    spool: Path | None = None,
    until_delivered: bool = True,
    deliverer: bool = False,
    own_process: bool = False,
) -> float:
    """Throughput of record() from ``threads`` threads; with ``spool``, in the best-effort
    mode (record returns once the event is in the local spool: a ``.db`` path is the SQLite
    spool, a directory the journal), timed until the spool has also been delivered, so the
    background delivery is paid for; or, with ``until_delivered=False``, only the calls
    (what the application waits for; delivery goes on in the background meanwhile). With
    ``deliverer``, the application only queues and a ``sealtrail deliver`` process, started
    before the clock, delivers."""
    helper = None
    if spool is None:
        trail = sealtrail.connect(home)
    else:
        deliver: bool | Literal["process"] = "process" if own_process else not deliverer
        trail = sealtrail.connect(home, mode="best-effort", spool=spool, deliver=deliver)
        if own_process:
            time.sleep(1.0)  # the deliverer it started is importing: not part of the measurement
    if deliverer:
        helper = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sealtrail.cli",
                "--home",
                str(home),
                "deliver",
                "--spool",
                str(spool),
            ],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # started and importing: not part of the measurement
    per_thread = n // threads

    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            with sealtrail.context(actor=f"user:{k}", ip="203.0.113.7", request_id=f"r-{k}"):
                for i in range(per_thread):
                    trail.record("user.email.update", **{**FIELDS, "data": {"n": i, "seats": 12}})
        except BaseException as exc:  # a benchmark that silently records nothing lies
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    t = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if trail.spool is not None and until_delivered:
        assert trail.spool.flush(600)
    elapsed = time.perf_counter() - t
    if trail.spool is not None:
        assert trail.spool.flush(600)
    trail.close()
    if helper is not None:
        helper.terminate()
        assert helper.wait(30) == 0
    if errors:
        raise errors[0]
    from sealtrail.home import open_ledger

    with open_ledger(home) as ledger:
        size = ledger.size()
    assert size == per_thread * threads, size
    return per_thread * threads / elapsed


def one_round(d: Path, n: int) -> dict[str, float]:
    """Every measurement once, the baseline first, each in fresh files (rates, ev/s)."""
    normal_url = "sqlite:///{}?synchronous=normal"

    def home(name: str, normal: bool = False) -> Path:
        path = d / name
        store = normal_url.format(path / "t.db") if normal else None
        init_ledger(path, store=store, origin=f"bench/{name}").close()
        return path

    rates = {"base": stdlib_json(d / "app.log", n), "slog": structlog_json(d / "struct.log", n)}
    rates["one"] = trail_record(home("h1"), n, 1)
    rates["eight"] = trail_record(home("h8"), n, 8)
    rates["one_normal"] = trail_record(home("n1", True), n, 1)
    rates["eight_normal"] = trail_record(home("n8", True), n, 8)
    rates["one_spool"] = trail_record(home("s1", True), n, 1, spool=d / "s1" / "spool.db")
    rates["eight_spool"] = trail_record(home("s8", True), n, 8, spool=d / "s8" / "spool.db")
    rates["one_journal"] = trail_record(home("j1", True), n, 1, spool=d / "j1" / "spool")
    rates["eight_journal"] = trail_record(home("j8", True), n, 8, spool=d / "j8" / "spool")
    rates["one_queued"] = trail_record(
        home("q1", True), n, 1, spool=d / "q1" / "spool", until_delivered=False
    )
    rates["one_process"] = trail_record(
        home("p1", True), n, 1, spool=d / "p1" / "spool", deliverer=True
    )
    rates["one_own"] = trail_record(
        home("o1", True), n, 1, spool=d / "o1" / "spool", own_process=True
    )
    rates["eight_process"] = trail_record(
        home("p8", True), n, 8, spool=d / "p8" / "spool", deliverer=True
    )
    rates["floor"] = journal_floor(home("j"), d / "journal", n)
    return rates


ROWS = [
    ("base", "stdlib logging, JSON formatter, file (baseline)"),
    ("slog", "structlog, JSON renderer, file"),
    ("one", "trail.record(), 1 thread (context + default redaction, fsync'd commit)"),
    ("eight", "trail.record(), 8 threads"),
    ("one_normal", "trail.record(), 1 thread, synchronous=normal (survives a process crash)"),
    ("eight_normal", "trail.record(), 8 threads, synchronous=normal"),
    ("one_spool", "trail.record(), best-effort, SQLite spool, 1 thread (until delivered)"),
    ("eight_spool", "trail.record(), best-effort, SQLite spool, 8 threads (until delivered)"),
    ("one_journal", "trail.record(), best-effort, journal spool, 1 thread (until delivered)"),
    ("eight_journal", "trail.record(), best-effort, journal spool, 8 threads (until delivered)"),
    ("one_queued", "trail.record(), best-effort, journal spool, 1 thread (calls only)"),
    ("one_process", "trail.record(), journal, `sealtrail deliver` process, 1 thread (delivered)"),
    ("one_own", "trail.record(), journal, deliver='process' (its own deliverer), 1 thread"),
    ("eight_process", "trail.record(), journal, `sealtrail deliver` process, 8 threads"),
    ("floor", "floor of any durable record(): context, redaction, validation, write()"),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every measurement; ratios are taken within each round (the baseline "
        "of the same round), then their median and range shown",
    )
    args = parser.parse_args()
    n = args.events
    rounds: list[dict[str, float]] = []
    for k in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            rounds.append(one_round(Path(tmp), n))
        if args.rounds > 1:
            print(f"round {k + 1}: baseline {rounds[-1]['base']:,.0f} ev/s", file=sys.stderr)
    print(f"\n{n:,} events, {len(rounds)} round(s), Python {sys.version.split()[0]}")
    width = max(len(label) for _, label in ROWS)
    for key, label in ROWS:
        rates = [r[key] for r in rounds]
        ratios = [r[key] / r["base"] for r in rounds]
        spread = f"  ({min(ratios):.2f}-{max(ratios):.2f})" if len(rounds) > 1 else ""
        print(
            f"{label.ljust(width)}  {statistics.median(rates):>10,.0f} ev/s  "
            f"{statistics.median(ratios):5.2f}x{spread}"
        )


if __name__ == "__main__":
    main()
