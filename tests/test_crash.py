"""Crash safety: SIGKILL the writer at random moments; nothing acknowledged is ever lost."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sealtrail.home import init_ledger, open_ledger

WRITER = Path(__file__).with_name("crash_writer.py")
KILLS = 25


def _run_and_kill(home: Path, run: int, delay: float) -> int:
    """Start a writer, kill -9 it after ``delay`` seconds; return how many events it acked."""
    proc = subprocess.Popen(
        [sys.executable, "-u", str(WRITER), str(home), str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked = [0]

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ack "):
                acked[0] = int(line.split()[1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join(timeout=10)
    assert proc.stdout is not None and proc.stderr is not None
    errors = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, errors
    return acked[0]


@pytest.mark.parametrize(
    ("synchronous", "kills"), [("full", KILLS), ("normal", KILLS // 2)], ids=["full", "normal"]
)
def test_sigkill_during_ingest_loses_nothing_acknowledged(
    tmp_path: Path, synchronous: str, kills: int
) -> None:
    """With synchronous=normal a commit is not fsync'd, yet it must survive the process
    being killed (the OS has it); only a machine crash may lose it, as documented."""
    from crash_writer import event_id  # type: ignore[import-not-found]

    home = tmp_path / "home"
    store = f"sqlite:///{home / 'trail.db'}?synchronous={synchronous}"
    home.mkdir()
    init_ledger(home, store=store, origin="crash.test/log").close()
    rng = random.Random(20261122)
    acked: dict[int, int] = {}
    for run in range(kills):
        # Startup (imports, opening the store) takes ~0.3 s; kill anywhere from during
        # startup to well into the ingest.
        acked[run] = _run_and_kill(home, run, rng.uniform(0.2, 1.2))
    ledger = open_ledger(home)
    try:
        total_acked = sum(acked.values())
        assert total_acked > 1000, acked  # the writers did real work before dying
        for run, n in acked.items():
            for i in range(n):
                ledger.get(event_id(run, i))  # raises NotFound if lost
        size = ledger.size()
        assert size >= total_acked
        seqs = [e.seq for e in ledger.store.iter_entries()]
        assert seqs == list(range(size))  # gapless
        report = ledger.verify()
        assert report.ok, report.findings
        # And the log carries on: a new append and checkpoint after all those crashes.
        ledger.append({"action": "crash.recovered"})
        assert ledger.checkpoint().size == size + 1
    finally:
        ledger.close()
