"""``sealtrail deliver`` and ``connect(..., deliver=False)``: applications that only queue
into a best-effort spool, and a separate process that delivers it (exit codes, one-line
errors, --once, the daemon and SIGTERM)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

import sealtrail
from cli_helpers import daemon, one_line_error, run_cli, stop
from sealtrail import SealtrailError
from sealtrail.home import init_ledger, open_ledger


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    init_ledger(path, origin="test/deliver").close()
    return path


run = run_cli


def stored(home: Path) -> list[dict[str, Any]]:
    with open_ledger(home, read_only=True) as ledger:
        return [orjson.loads(e.body) for e in ledger.store.iter_entries() if e.body]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def queue(home: Path, count: int, daemon: bool = False, **connect: Any) -> list[str]:
    """Record ``count`` events through a trail that only queues; their ids, in order. With
    a ``daemon`` delivering, ``flush`` waits for it."""
    trail = sealtrail.connect(home, mode="best-effort", deliver=False, **connect)
    assert trail.spool is not None and not trail.spool.delivers
    with sealtrail.context(actor="user:7"):
        ids = [trail.record("doc.read", data={"n": i}).id for i in range(count)]
    if daemon:
        assert trail.spool.flush(20)
        trail.close()
        return ids
    assert not trail.spool.flush(0.2)  # nobody delivers in this process
    assert trail.spool.stats().backlog == count
    trail.close()  # returns at once: the events wait for the deliverer
    return ids


def test_once_delivers_the_queue_in_order(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = queue(home, 25)
    assert stored(home) == []
    metrics = home.parent / "deliver.prom"
    code, out, err = run(
        capsys, "--home", str(home), "deliver", "--once", "--json", "--metrics-file", str(metrics)
    )
    assert code == 0, err
    text = metrics.read_text()
    assert "# TYPE sealtrail_spool_delivered_total counter" in text
    assert "sealtrail_spool_delivered_total{" in text and "} 25\n" in text
    assert "sealtrail_spool_backlog{" in text and "} 0\n" in text
    assert orjson.loads(out)["delivered_total"] == 25 and orjson.loads(out)["backlog"] == 0
    assert "deliver: 25 delivered (0 already stored), 0 set aside, 0 waiting" in err
    events = stored(home)
    assert [e["id"] for e in events] == ids and events[0]["actor"]["id"] == "user:7"
    code, _, err = run(capsys, "--home", str(home), "deliver", "--once")
    assert code == 0 and "0 delivered" in err  # nothing left: nothing twice


def test_an_explicit_sqlite_spool_too(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spool = home.parent / "app-spool.db"
    ids = queue(home, 5, spool=spool)
    code, _, err = run(capsys, "--home", str(home), "deliver", "--once", "--spool", str(spool))
    assert code == 0, err
    assert [e["id"] for e in stored(home)] == ids


def test_bad_arguments_and_a_missing_target_are_one_line_errors(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for args, message in [
        (["--batch", "0"], "--batch must be at least 1"),
        (["--timeout", "nan", "--once"], "--timeout must be a positive"),
        (["--timeout", "-1", "--once"], "--timeout must be a positive"),
        (["--poll", "0"], "--poll must be a positive"),
        (["--alert-backlog", "-1"], "--alert-backlog and --alert-age"),
        (["--alert-age", "nan"], "--alert-backlog and --alert-age"),
        (["--metrics-every", "0"], "--metrics-every must be a positive"),
        (["--once", "--spool", str(tmp_path / "none")], "no spool at"),
    ]:
        code, _, err = run(capsys, "--home", str(home), "deliver", *args)
        assert code == 2, args
        one_line_error(err)
        assert message in err
    queue(home, 3)
    gone = tmp_path / "gone"  # the spool is there, the ledger is not
    code, _, err = run(
        capsys,
        "--home",
        str(gone),
        "deliver",
        "--once",
        "--spool",
        str(home / "spool"),
        "--timeout",
        "0.5",
        "--alert-backlog",
        "2",
        "--metrics-file",
        str(tmp_path / "no-such-dir" / "m.prom"),
    )
    assert code == 2
    assert "Traceback" not in err and all(
        line.startswith("sealtrail: ") for line in err.splitlines()
    )
    assert "3 waiting; gave up after 0.5 s" in err.splitlines()[-1] and "gone" in err
    assert "deliver: audit spool" in err and "3 events waiting" in err  # the alert, logged
    assert "cannot write" in err and "m.prom" in err  # reported, not fatal


def test_fail_closed_has_no_deliverer_to_leave_out(home: Path) -> None:
    with pytest.raises(SealtrailError, match="only in the best-effort"):
        sealtrail.connect(home, deliver=False)


def test_the_daemon_delivers_another_process_s_events_until_sigterm(home: Path) -> None:
    metrics = home.parent / "daemon.prom"
    with daemon(
        "--home", str(home), "deliver", "--metrics-file", str(metrics), "--metrics-every", "0.05"
    ) as proc:
        deadline = time.monotonic() + 20  # it starts before any application: it makes the spool
        while not (home / "spool" / "journal").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (home / "spool" / "journal").exists(), "the daemon did not create the spool"
        ids = queue(home, 40, daemon=True)
        assert len(stored(home)) == 40
        ids += queue(home, 10, daemon=True)  # the same spool, a second application run
        deadline = time.monotonic() + 20  # the metrics file follows while it runs
        while "delivered_total{" not in _read(metrics) or "} 50\n" not in _read(metrics):
            assert time.monotonic() < deadline, _read(metrics)
            time.sleep(0.05)
        text = stop(proc)
    assert "deliver: stopped; 50 delivered, 0 set aside, 0 waiting" in text
    assert [e["id"] for e in stored(home)] == ids


def test_a_trail_can_start_its_own_deliverer(home: Path) -> None:
    trail = sealtrail.connect(home, mode="best-effort", deliver="process")
    try:
        sink = trail.spool
        assert sink is not None and sink.helper is not None and not sink.delivers
        with sealtrail.context(actor="user:8"):
            ids = [trail.record("doc.read", data={"n": i}).id for i in range(30)]
        assert sink.flush(20)  # the other process delivered them
        assert [e["id"] for e in stored(home)] == ids
        more = [trail.record("doc.read", actor="a", data={"n": i}).id for i in range(5)]
    finally:
        trail.close()  # delivers what is left, then stops it
    assert sink.helper.returncode == 0
    assert [e["id"] for e in stored(home)] == ids + more
    with pytest.raises(SealtrailError, match="deliver must be"):
        sealtrail.connect(home, mode="best-effort", deliver="thread")  # type: ignore[arg-type]


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # exited, waiting to be reaped by whoever adopted it


def test_an_application_killed_mid_stream_leaves_nothing_behind(home: Path) -> None:
    """SIGKILL the application: its deliverer notices, delivers every event ``record``
    acknowledged before the kill, and stops, with nothing else started."""
    app = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("process_app.py")), str(home)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert app.stdout is not None
    helper = int(app.stdout.readline().split()[1])
    acknowledged = []
    while len(acknowledged) < 300:
        line = app.stdout.readline()
        assert line, "the application died"
        acknowledged.append(line.split()[2])
    app.kill()
    app.wait()
    acknowledged += [line.split()[2] for line in app.stdout.read().splitlines() if line]
    app.stdout.close()
    deadline = time.monotonic() + 30
    while not _gone(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(helper), "the deliverer outlived its application"
    ids = [e["id"] for e in stored(home)]
    assert len(ids) == len(set(ids))
    assert ids[: len(acknowledged)] == acknowledged
    assert len(ids) - len(acknowledged) <= 1  # the one the kill cut off before announcing


def test_the_store_url_can_come_from_the_environment(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``$SEALTRAIL_STORE`` when ``--store`` is not given: a password in the URL stays out of
    the process list."""
    from sealtrail.home import Home

    monkeypatch.setenv("SEALTRAIL_STORE", f"sqlite:///{tmp_path}/no/such/dir/x.db")
    code, _, err = run(capsys, "--home", str(home), "query")
    assert code == 2 and "no/such/dir" in err
    one_line_error(err)
    real = Home(home).store_url()
    code, _, err = run(capsys, "--home", str(home), "--store", real, "query")
    assert code == 0, err  # --store wins over the variable


@pytest.mark.postgres
def test_a_started_deliverer_gets_the_store_url_in_its_environment_not_its_arguments(
    tmp_path: Path, pg_url: str
) -> None:
    home = tmp_path / "h"
    init_ledger(home, store=pg_url, origin="test/pg-deliver").close()
    trail = sealtrail.connect(
        pg_url, home=home, mode="best-effort", deliver="process", spool=tmp_path / "sp"
    )
    try:
        assert trail.spool is not None and trail.spool.helper is not None
        pid = trail.spool.helper.pid
        # Popen returns once exec is past its point of no return, which can be before the
        # new program's environment is in place: read until it is.
        deadline = time.monotonic() + 10
        while not (environ := Path(f"/proc/{pid}/environ").read_bytes()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert b"SEALTRAIL_STORE=" + pg_url.encode() in environ.split(b"\0")
        assert b"postgresql" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        ids = [trail.record("pg.event", actor="a", data={"i": i}).id for i in range(10)]
        assert trail.spool.flush(30)
    finally:
        trail.close()
    with open_ledger(home, pg_url, read_only=True) as ledger:
        assert [orjson.loads(e.body)["id"] for e in ledger.store.iter_entries()] == ids
