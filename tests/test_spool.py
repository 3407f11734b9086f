"""Delivery that loses nothing (issue 3, point 7): the spool, the best-effort and
fail-closed modes, backoff, metrics and alerts, and a target that goes down mid-stream
while the application is killed."""

from __future__ import annotations

import logging
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import sealtrail
from hostile import STORABLE
from sealtrail import SealtrailError, StorageError
from sealtrail.event import new_event_id
from sealtrail.home import init_ledger, open_ledger
from sealtrail.journal import JournalSpool
from sealtrail.ledger import Ledger
from sealtrail.spool import Backoff, Spool, SpooledSink, SpoolStats, open_spool

HERE = Path(__file__).resolve().parent


def _fast(trail: sealtrail.Trail) -> SpooledSink:
    sink = trail.spool
    assert sink is not None
    sink.backoff = Backoff(base=0.01, cap=0.05)
    sink.idle_poll = 0.05
    return sink


def _events(ledger: Ledger) -> list[dict[str, Any]]:
    import orjson

    return [orjson.loads(e.body) for e in ledger.store.iter_entries() if e.body]


# -- the spool file ----------------------------------------------------------------------
def test_spool_is_a_durable_fifo(tmp_path: Path) -> None:
    path = tmp_path / "s" / "spool.db"
    spool = Spool(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    spool.put([(f"id{i}", f"body{i}".encode()) for i in range(5)])
    spool.put([("id5", b"body5")])
    assert spool.depth() == 6
    assert [r[1] for r in spool.peek(3)] == ["id0", "id1", "id2"]
    first = spool.peek(2)
    spool.ack(first[-1][0])
    spool.close()
    again = Spool(path)  # survives the process: reopened from the file
    assert [r[1] for r in again.peek(10)] == ["id2", "id3", "id4", "id5"]
    assert again.oldest() is not None
    n = again.peek(1)[0][0]
    again.reject(n, "refused")
    assert [r["id"] for r in again.rejected()] == ["id2"]
    assert again.rejected()[0]["reason"] == "refused"
    assert again.depth() == 3
    again.ack(10**9)
    assert again.depth() == 0 and again.oldest() is None
    again.put([("id6", b"x")])
    assert again.peek(1)[0][0] > n  # numbers are never reused, so order survives deletes
    again.close()


def test_spool_refuses_bad_options_and_unusable_files(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="synchronous"):
        Spool(tmp_path / "s.db", synchronous="OFF")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="cannot open the spool"):
        Spool(junk)


def test_backoff_is_exponential_with_full_jitter() -> None:
    backoff = Backoff(base=0.1, cap=2.0, rng=random.Random(7))
    for failures in range(12):
        bound = min(2.0, 0.1 * 2**failures)
        delays = [backoff.delay(failures) for _ in range(200)]
        assert all(0 <= d < bound for d in delays)
        assert max(delays) > bound * 0.8 and min(delays) < bound * 0.2  # spread, not fixed
        assert len(set(delays)) > 150
    assert backoff.delay(10**6) <= 2.0  # no overflow on long outages


# -- best-effort delivery to a real ledger -------------------------------------------------
@pytest.fixture(params=["spool.db", "spool"], ids=["sqlite", "journal"])
def spool(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Where the spool goes: the SQLite one, and the journal (sealtrail.journal)."""
    return tmp_path / str(request.param)


def _stored_bytes(spool: Path) -> bytes:
    """Everything the spool keeps on disk, whichever kind it is."""
    if spool.is_dir():
        return b"".join(f.read_bytes() for f in spool.iterdir())
    return b"".join(bytes(r[0]) for r in sqlite3.connect(spool).execute("SELECT body FROM queue"))


@pytest.fixture
def target(tmp_path: Path) -> Path:
    home = tmp_path / "target"
    init_ledger(home, origin="test/spool-target").close()
    return home


def test_best_effort_records_pending_then_delivers_in_order(
    target: Path, tmp_path: Path, spool: Path
) -> None:
    trail = sealtrail.connect(target, mode="best-effort", spool=spool)
    sink = _fast(trail)
    with sealtrail.context(actor="user:1", ip="203.0.113.9"):
        receipts = [trail.record("doc.read", data={"n": i}) for i in range(40)]
        receipts += trail.record_many(
            [{"action": "doc.write", "data": {"n": i}} for i in range(40, 60)]
        )
    assert all(r.pending and r.seq == -1 for r in receipts)
    assert receipts[0].to_json()["pending"] is True
    assert sink.flush(10)
    trail.close()
    with open_ledger(target) as ledger:
        stored = _events(ledger)
    assert [e["id"] for e in stored] == [r.id for r in receipts]
    assert [e["data"]["n"] for e in stored] == list(range(60))
    assert stored[0]["actor"]["id"] == "user:1" and stored[0]["source"]["ip"] == "203.0.113.9"
    with pytest.raises(SealtrailError, match="closed"):
        trail.record("late.event")


def test_best_effort_redacts_before_the_spool(target: Path, tmp_path: Path, spool: Path) -> None:
    """The spool is storage too (I5): secrets are masked before they are queued."""
    trail = sealtrail.connect(target, mode="best-effort", spool=spool)
    sink = _fast(trail)
    sink.pause()  # keep it queued, to look at the file
    trail.record("user.login", actor="user:1", data={"password": "hunter2-secret"})
    raw = _stored_bytes(spool)
    assert b"user.login" in raw and b"hunter2" not in raw


def test_invalid_events_raise_in_the_caller_and_queue_nothing(
    target: Path, tmp_path: Path, spool: Path
) -> None:
    trail = sealtrail.connect(target, mode="best-effort", spool=spool)
    sink = _fast(trail)
    with pytest.raises(sealtrail.InvalidEvent, match="outcome"):
        trail.record("x.y", actor="user:1", outcome="maybe")
    with pytest.raises(sealtrail.InvalidEvent):
        trail.record_many([{"action": "ok.one", "actor": "a"}, {"action": "", "actor": "a"}])
    assert sink.stats().queued_total == 0 and sink.spool.depth() == 0
    trail.close()


def test_target_down_at_start_then_back(tmp_path: Path, spool: Path) -> None:
    """The application starts while its trail does not exist yet; events wait, counted,
    and arrive in order once it does."""
    home = tmp_path / "later"
    alerts: list[SpoolStats] = []
    trail = sealtrail.connect(
        home,
        mode="best-effort",
        spool=spool,
        alert_backlog=5,
        on_alert=alerts.append,
    )
    sink = _fast(trail)
    ids = [trail.record("app.event", actor="svc:a", data={"n": i}).id for i in range(8)]
    deadline = time.monotonic() + 5
    while sink.stats().failures_total < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = sink.stats()
    assert stats.backlog == 8 and stats.queued_total == 8 and stats.delivered_total == 0
    assert stats.failures_total >= 2 and not stats.connected
    assert stats.last_error and "later" in stats.last_error
    assert stats.alerting and len(alerts) == 1 and alerts[0].backlog >= 5
    text = sink.metrics()
    assert 'sealtrail_spool_backlog{spool="' in text and "} 8\n" in text
    assert "# TYPE sealtrail_spool_failures_total counter" in text
    init_ledger(home, origin="test/later").close()
    assert sink.flush(10)
    deadline = time.monotonic() + 5
    while sink.stats().alerting and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = sink.stats()
    assert stats.delivered_total == 8 and stats.backlog == 0 and not stats.alerting
    assert len(alerts) == 1  # once per episode
    trail.close()
    with open_ledger(home) as ledger:
        assert [e["id"] for e in _events(ledger)] == ids


def test_alert_logs_a_warning(
    tmp_path: Path, spool: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trail = sealtrail.connect(
        tmp_path / "nowhere", mode="best-effort", spool=spool, alert_backlog=3
    )
    _fast(trail)
    with caplog.at_level(logging.WARNING, logger="sealtrail.spool"):
        for i in range(3):
            trail.record("a.b", actor="x", data={"i": i})
    assert any("3 events waiting" in r.getMessage() for r in caplog.records)
    trail.spool.pause()  # type: ignore[union-attr]
    trail.close()


def test_redelivery_after_a_crash_between_commit_and_ack_is_stored_once(
    target: Path, tmp_path: Path, spool: Path
) -> None:
    """At least once on the wire, exactly once in the ledger (dedupe by event id)."""
    path = spool
    trail = sealtrail.connect(target, mode="best-effort", spool=path)
    sink = _fast(trail)
    sink.pause()
    ids = [trail.record("x.y", actor="a", data={"i": i}).id for i in range(10)]
    # The target committed the first six, then the process died before acknowledging them.
    import orjson

    bodies = [orjson.loads(b) for _, _, b in open_spool(path).peek(6)]
    with open_ledger(target) as ledger:
        ledger.append_many(bodies)
    trail.close()  # the process is gone: its delivery lock with it
    trail2 = sealtrail.connect(target, mode="best-effort", spool=path)
    sink2 = _fast(trail2)
    assert sink2.flush(10)
    stats = sink2.stats()
    assert stats.delivered_total == 10 and stats.duplicates_total == 6
    trail2.close()
    with open_ledger(target) as ledger:
        assert [e["id"] for e in _events(ledger)] == ids


def test_refused_events_are_set_aside_and_do_not_block(
    target: Path, tmp_path: Path, spool: Path
) -> None:
    path = spool
    clash = new_event_id()
    with open_ledger(target) as ledger:
        ledger.append({"id": clash, "action": "first.version", "actor": {"id": "a"}})
    trail = sealtrail.connect(target, mode="best-effort", spool=path)
    sink = _fast(trail)
    sink.pause()
    trail.record("x.before", actor="a")
    trail.record("other.version", actor="a", id=clash)  # same id, other content
    # A damaged spool file: a row that is not an event at all.
    damaged = open_spool(path)
    damaged.put([("junk", b"{{{")])
    damaged.close()
    trail.record("x.after", actor="a")
    trail.close()
    trail2 = sealtrail.connect(target, mode="best-effort", spool=path)
    sink2 = _fast(trail2)
    assert sink2.flush(10)
    assert sink2.stats().rejected_total == 2
    reasons = {r["id"]: r["reason"] for r in sink2.spool.rejected()}
    assert "different content" in reasons[clash] and "unreadable" in reasons["junk"]
    trail2.close()
    with open_ledger(target) as ledger:
        assert [e["action"] for e in _events(ledger)] == ["first.version", "x.before", "x.after"]


def test_two_processes_sharing_a_spool_deliver_it_once_in_order(
    target: Path, tmp_path: Path, spool: Path
) -> None:
    path = spool
    a = sealtrail.connect(target, mode="best-effort", spool=path)
    b = sealtrail.connect(target, mode="best-effort", spool=path)
    for t in (a, b):
        _fast(t)
    ids = []
    for i in range(60):
        ids.append((a if i % 2 else b).record("x.y", actor="a", data={"i": i}).id)
    assert a.spool is not None and b.spool is not None
    assert a.spool.flush(10) and b.spool.flush(10)
    a.close()
    b.close()
    with open_ledger(target) as ledger:
        assert [e["id"] for e in _events(ledger)] == ids


def test_concurrent_recording_threads(target: Path, tmp_path: Path, spool: Path) -> None:
    trail = sealtrail.connect(target, mode="best-effort", spool=spool)
    sink = _fast(trail)
    per_thread: dict[int, list[str]] = {}

    def work(k: int) -> None:
        with sealtrail.context(actor=f"user:{k}"):
            per_thread[k] = [trail.record("t.e", data={"i": i}).id for i in range(50)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sink.flush(20)
    trail.close()
    with open_ledger(target) as ledger:
        stored = _events(ledger)
    assert len(stored) == 400 == len({e["id"] for e in stored})
    for k, ids in per_thread.items():
        mine = [e for e in stored if e["actor"]["id"] == f"user:{k}"]
        assert [e["id"] for e in mine] == ids  # each thread's events in its order


def test_hostile_strings_arrive_intact(target: Path, tmp_path: Path, spool: Path) -> None:
    trail = sealtrail.connect(target, mode="best-effort", spool=spool, redact=False)
    sink = _fast(trail)
    for name, value in STORABLE:
        trail.record("hostile.string", actor="a", data={"name": name, "value": value})
    assert sink.flush(20)
    trail.close()
    with open_ledger(target) as ledger:
        stored = _events(ledger)
    assert [(e["data"]["name"], e["data"]["value"]) for e in stored] == STORABLE


def test_connect_refuses_bad_delivery_options(target: Path, tmp_path: Path) -> None:
    with pytest.raises(SealtrailError, match="mode"):
        sealtrail.connect(target, mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(SealtrailError, match="only in the best-effort"):
        sealtrail.connect(target, spool=tmp_path / "s.db")


def test_fail_closed_raises_when_the_target_is_missing(tmp_path: Path) -> None:
    with pytest.raises(SealtrailError):
        sealtrail.connect(tmp_path / "nothing-here")


# -- a real remote target going down: a private PostgreSQL cluster -----------------------
@pytest.fixture
def cluster():  # type: ignore[no-untyped-def]
    from pgcluster import PrivateCluster

    c = PrivateCluster()
    c.create()
    yield c
    c.destroy()


@pytest.mark.postgres
def test_fail_closed_raises_while_the_target_is_down(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    init_ledger(home, store=cluster.url, origin="test/fail-closed").close()
    trail = sealtrail.connect(cluster.url, home=home)
    assert trail.record("before.outage", actor="a").seq == 0
    cluster.stop()
    with pytest.raises(StorageError):
        trail.record("during.outage", actor="a")
    cluster.start()
    assert trail.record("after.outage", actor="a").seq == 1  # nothing half-recorded
    trail.close()


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["app-spool.db", "app-spool"], ids=["sqlite", "journal"])
def test_target_stopped_mid_stream_and_app_killed_loses_nothing(  # type: ignore[no-untyped-def]
    cluster, tmp_path: Path, kind: str
) -> None:
    """Issue 3, point 7: stop the target mid-stream, SIGKILL the application; after a
    restart every event that ``record`` acknowledged before the kill arrives exactly once,
    in order, and the log verifies."""
    home = tmp_path / "home"
    init_ledger(home, store=cluster.url, origin="test/delivery").close()
    spool = tmp_path / kind
    env = {**os.environ, "PYTHONPATH": str(HERE)}

    def app(what: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(HERE / "spool_app.py"), str(home), cluster.url, str(spool), what],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    acknowledged: list[str] = []
    proc = app("record")
    assert proc.stdout is not None

    def read_until(count: int) -> None:
        while len(acknowledged) < count:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, "the application died"
            acknowledged.append(line.split()[2])

    read_until(150)  # delivered live
    cluster.stop()  # the target crashes mid-stream
    read_until(400)  # recorded while it is down: spooled
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    acknowledged.extend(line.split()[2] for line in proc.stdout.read().splitlines() if line)
    proc.stdout.close()
    cluster.start()
    drain = app("drain")
    out, _ = drain.communicate(timeout=120)
    assert drain.returncode == 0 and out.startswith("drained 0 True"), out
    with open_ledger(home, cluster.url) as ledger:
        stored = [e["id"] for e in _events(ledger)]
        assert ledger.verify().ok
    # Everything acknowledged is there once; at most the one event the kill interrupted
    # between record's return and its announcement is there unannounced.
    assert len(stored) == len(set(stored))
    assert stored[: len(acknowledged)] == acknowledged
    assert len(stored) - len(acknowledged) <= 1


def test_the_default_spool_is_the_journal_unless_a_sqlite_one_is_there(tmp_path: Path) -> None:
    """``<home>/spool``, the journal, by default; a ``spool.db`` an earlier version left in
    the home keeps being used, so its backlog is delivered, not stranded."""
    fresh = tmp_path / "fresh"
    init_ledger(fresh, origin="test/default-spool").close()
    trail = sealtrail.connect(fresh, mode="best-effort")
    assert trail.spool is not None and isinstance(trail.spool.spool, JournalSpool)
    assert trail.spool.spool.path == fresh / "spool"
    trail.close()

    old = tmp_path / "old"
    init_ledger(old, origin="test/default-spool").close()
    legacy = Spool(old / "spool.db")
    legacy.put([(new_event_id(), b"{}")])
    legacy.close()
    trail = sealtrail.connect(old, mode="best-effort")
    assert trail.spool is not None and isinstance(trail.spool.spool, Spool)
    trail.close()


def test_the_age_alert_fires_while_the_target_is_down(tmp_path: Path, spool: Path) -> None:
    """An outage is when events wait longest: the deliverer checks the alert after every
    failed attempt too, not only after deliveries (size alerts off here)."""
    alerts: list[SpoolStats] = []
    trail = sealtrail.connect(
        tmp_path / "down",
        mode="best-effort",
        spool=spool,
        alert_backlog=0,
        alert_age=0.2,
        on_alert=alerts.append,
    )
    _fast(trail)
    trail.record("app.event", actor="svc:a")
    deadline = time.monotonic() + 10
    while not alerts and time.monotonic() < deadline:
        time.sleep(0.02)
    assert alerts and alerts[0].backlog == 1 and alerts[0].oldest_age_seconds >= 0.2
    assert alerts[0].last_error and "down" in alerts[0].last_error
    trail.spool.pause()  # type: ignore[union-attr]
    trail.close()
