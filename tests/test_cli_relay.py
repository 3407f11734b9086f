"""``sealtrail relay``: exit codes, one-line errors, --once, the daemon and SIGTERM."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from capture_helpers import change_event, emulated_sqlite_events, make_sqlite_app
from cli_helpers import daemon, init_home, one_line_error, run_cli, stop
from sealtrail.home import open_ledger


def _events(n: int, txid: str = "tx") -> list[dict[str, Any]]:
    return [
        change_event("accounts", "insert", {"id": i}, {"id": {"new": i}}, txid) for i in range(n)
    ]


@pytest.fixture
def home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    return init_home(tmp_path, capsys, "relay.test/log")


run = run_cli


def test_once_ships_everything(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = make_sqlite_app(tmp_path)
    events = _events(7)
    emulated_sqlite_events(app, events)
    code, out, err = run(
        capsys,
        "relay",
        "--home",
        str(home),
        "--from",
        app.url,
        "--once",
        "--batch",
        "3",
        "--json",
        "--workers",
        "2",
    )
    assert code == 0, err
    assert orjson.loads(out) == {
        "shipped": 7,
        "duplicates": 0,
        "rejected": 0,
        "batches": 3,
        "errors": 0,
        "last_error": None,
    }
    assert err == (
        "sealtrail: relay: 7 new, 0 already stored, 0 rejected "
        "(recorded as sealtrail.relay.rejected), in 3 batches\n"
    )
    ledger = open_ledger(home)
    try:
        assert [ledger.get_seq(i).id for i in range(7)] == [e["id"] for e in events]
        assert ledger.verify().ok
    finally:
        ledger.close()
    # Nothing left: a second run ships nothing.
    code, _, err = run(capsys, "relay", "--home", str(home), "--from", str(app.path), "--once")
    assert code == 0 and "0 new" in err


def test_store_option_and_policy(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = make_sqlite_app(tmp_path)
    event = change_event("users", "update", {"id": 1}, {"pin": {"old": "1234", "new": "9999"}}, "t")
    emulated_sqlite_events(app, [event])
    policy = tmp_path / "policy.toml"
    policy.write_text('[keys]\npin = "mask"\n')
    store = f"sqlite:///{home / 'trail.db'}"
    code, _, err = run(
        capsys,
        "relay",
        "--home",
        str(home),
        "--store",
        store,
        "--from",
        app.url,
        "--once",
        "--policy",
        str(policy),
    )
    assert code == 0, err
    ledger = open_ledger(home)
    try:
        body = ledger.get(event["id"]).body
        assert body is not None and b"9999" not in body and b"1234" not in body
        assert b'"changes.pin.new":"mask"' in body
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "0"], "--batch must be at least 1"),
        (["--poll", "0"], "--poll must be a positive"),
        (["--policy", "/nonexistent/policy.toml"], "policy"),
        (["--workers", "-1"], "--workers must be 0 or more"),
        (["--metrics-every", "0"], "--metrics-every must be a positive"),
        (["--alert-age", "-1"], "--alert-age must be 0 (off) or more"),
    ],
)
def test_usage_errors(
    tmp_path: Path,
    home: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    app = make_sqlite_app(tmp_path)
    code, _, err = run(capsys, "relay", "--home", str(home), "--from", app.url, "--once", *args)
    assert code == 2
    one_line_error(err)
    assert message in err


def test_missing_from_is_a_usage_error(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SEALTRAIL_APP_DB", raising=False)
    code, _, err = run(capsys, "relay", "--home", str(home), "--once")
    assert code == 2
    one_line_error(err)
    assert "--from URL (or $SEALTRAIL_APP_DB)" in err


def test_the_application_database_from_the_environment(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A URL with a password stays out of the process list (/proc/<pid>/cmdline).
    app = make_sqlite_app(tmp_path)
    emulated_sqlite_events(app, _events(3))
    monkeypatch.setenv("SEALTRAIL_APP_DB", app.url)
    code, _, err = run(capsys, "relay", "--home", str(home), "--once")
    assert code == 0 and "3 new" in err, err


def _metric(text: str, name: str) -> float:
    (value,) = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f"sealtrail_relay_{name}{{")
    ]
    return value


def test_metrics_file(tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = make_sqlite_app(tmp_path)
    events = _events(5)
    emulated_sqlite_events(app, events)
    # One row queued ten minutes ago: the age of what waits is what to alert on.
    old = change_event("accounts", "insert", {"id": 99}, {"id": {"new": 99}}, "old")
    conn = app.connect()
    conn.execute(
        "INSERT INTO sealtrail_outbox (id, event_id, txid, event, created_at) "
        "VALUES (0, ?, 'old', ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-600 seconds'))",
        (old["id"], orjson.dumps(old).decode()),
    )
    conn.commit()
    conn.close()
    from sealtrail.capture.relay import Relay

    with open_ledger(home) as ledger, Relay(app.url, ledger) as relay:
        text = relay.metrics()
    assert _metric(text, "pending") == 6 and _metric(text, "outbox_reachable") == 1
    assert 600 <= _metric(text, "oldest_age_seconds") < 700
    assert "# TYPE sealtrail_relay_shipped_total counter" in text
    assert f'{{source="sqlite:{app.path}"}}' in text

    metrics = tmp_path / "relay.prom"
    args = ["relay", "--home", str(home), "--from", app.url, "--once", "--metrics-file"]
    code, _, err = run(capsys, *args, str(metrics))
    assert code == 0, err
    text = metrics.read_text()
    assert _metric(text, "shipped_total") == 6 and _metric(text, "pending") == 0
    assert _metric(text, "oldest_age_seconds") == 0 and _metric(text, "errors_total") == 0
    assert not list(tmp_path.glob(".relay.prom.*"))  # written whole, through a rename


def test_metrics_when_the_outbox_cannot_be_read(tmp_path: Path, home: Path) -> None:
    from sealtrail.capture.relay import Relay

    app = make_sqlite_app(tmp_path)
    emulated_sqlite_events(app, _events(2))
    with open_ledger(home) as ledger, Relay(app.url, ledger) as relay:
        assert relay.run_once().shipped == 2
        conn = app.connect()
        conn.execute("DROP TABLE sealtrail_outbox")
        conn.close()
        text = relay.metrics()
    assert _metric(text, "outbox_reachable") == 0 and _metric(text, "shipped_total") == 2
    assert "sealtrail_relay_pending{" in text and text.count("NaN") == 2


def test_daemon_keeps_its_metrics_file(tmp_path: Path, home: Path) -> None:
    app = make_sqlite_app(tmp_path)
    emulated_sqlite_events(app, _events(3, "a"))
    metrics = tmp_path / "relay.prom"
    args = ["relay", "--home", str(home), "--from", app.url, "--poll", "0.05"]
    with daemon(*args, "--metrics-file", str(metrics), "--metrics-every", "0.1") as proc:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = metrics.read_text() if metrics.exists() else ""
            if "shipped_total{" in text and _metric(text, "shipped_total") == 3:
                break
            time.sleep(0.05)
        emulated_sqlite_events(app, _events(2, "b"))
        while time.monotonic() < deadline:
            if _metric(metrics.read_text(), "shipped_total") == 5:
                break
            time.sleep(0.05)
        stop(proc)
    text = metrics.read_text()
    assert _metric(text, "shipped_total") == 5 and _metric(text, "pending") == 0


def test_unreachable_databases_exit_2_with_one_line(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No outbox table in the application database.
    bare = make_sqlite_app(tmp_path, emulated_outbox=False)
    code, _, err = run(capsys, "relay", "--home", str(home), "--from", bare.url, "--once")
    assert code == 2
    one_line_error(err)
    assert "sealtrail_outbox" in err
    # A PostgreSQL server that is not there; the password never shows.
    url = "postgresql://app:s3cret-pw@127.0.0.1:1/app?connect_timeout=2"
    code, _, err = run(capsys, "relay", "--home", str(home), "--from", url, "--once")
    assert code == 2
    one_line_error(err)
    assert "s3cret-pw" not in err and "***" in err
    # No log in the home directory.
    app = make_sqlite_app(tmp_path)
    code, _, err = run(
        capsys, "relay", "--home", str(tmp_path / "nohome"), "--from", app.url, "--once"
    )
    assert code == 2
    one_line_error(err)


def test_daemon_ships_as_changes_arrive_and_stops_on_sigterm(tmp_path: Path, home: Path) -> None:
    app = make_sqlite_app(tmp_path)
    emulated_sqlite_events(app, _events(3, "a"))
    with daemon("relay", "--home", str(home), "--from", app.url, "--poll", "0.05") as proc:
        later = _events(4, "b")
        time.sleep(0.5)
        emulated_sqlite_events(app, later)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ledger = open_ledger(home, read_only=True)
            try:
                if ledger.size() >= 7:
                    break
            finally:
                ledger.close()
            time.sleep(0.1)
        text = stop(proc)
    assert "relay: stopped; 7 new, 0 already stored, 0 rejected" in text


def test_default_workers_by_cpu_count() -> None:
    from sealtrail.cli import _relay_workers

    assert [_relay_workers(c) for c in (1, 2, 3, 4, 5, 8, 64)] == [0, 2, 2, 3, 4, 4, 4]
