"""``sealtrail history`` and ``sealtrail revert``: the command line over
:mod:`sealtrail.capture.history` and :mod:`sealtrail.capture.revert`, end to end.

An application writes through SQLAlchemy with ORM capture (SQLite) or through the
PostgreSQL triggers installed by ``sealtrail capture install``; ``sealtrail relay --once``
ships its outbox into a home's ledger; the commands then read the trail and change the
application's database.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cli_helpers import init_home, one_line_error, run_cli
from sealtrail.event import utc_now

run = run_cli
TRACKS = '[[track]]\ntable = "items"\nmask = ["note"]\n'


@pytest.fixture
def home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    return init_home(tmp_path, capsys, "history.test/log")


class App:
    """A SQLite application database whose writes ORM capture records."""

    def __init__(self, tmp_path: Path) -> None:
        from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine

        from sealtrail.capture import orm
        from sealtrail.capture.change import tracks_from_toml

        self.path = tmp_path / "app.db"
        self.url = f"sqlite:///{self.path}"
        self.config = tmp_path / "tracks.toml"
        self.config.write_text(TRACKS)
        metadata = MetaData()
        self.items = Table(
            "items",
            metadata,
            Column("id", Integer, primary_key=True),
            Column("name", String, nullable=False, unique=True),
            Column("note", String),
        )
        self.engine = create_engine(self.url)
        self.capture = orm.track(self.engine, tracks_from_toml(TRACKS), metadata=metadata)
        metadata.create_all(self.engine)

    def write(self, actor: str, statement: Any) -> None:
        import sealtrail

        with sealtrail.context(actor=actor), self.engine.begin() as conn:
            conn.execute(statement)

    def rows(self) -> list[tuple[Any, ...]]:
        from sqlalchemy import select

        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(self.items).order_by(self.items.c.id))]

    def close(self) -> None:
        self.capture.remove()
        self.engine.dispose()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    application = App(tmp_path)
    try:
        yield application
    finally:
        application.close()


def _relay(capsys: pytest.CaptureFixture[str], home: Path, url: str) -> None:
    code, _, err = run(capsys, "relay", "--home", str(home), "--from", url, "--once")
    assert code == 0, err


def _history(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> list[dict[str, Any]]:
    code, out, err = run(capsys, "history", "--home", str(home), *args, "--json")
    assert code == 0, err
    return list(orjson.loads(out))


def _broken_lamp(
    app: App, home: Path, capsys: pytest.CaptureFixture[str], note: str | None = None
) -> dict[str, Any]:
    """Row 1 inserted as "lamp" by alice, renamed "broken" by bob, shipped: bob's change."""
    from sqlalchemy import insert, update

    items = app.items
    app.write("user:alice", insert(items).values(id=1, name="lamp", note=note))
    app.write("user:bob", update(items).where(items.c.id == 1).values(name="broken"))
    _relay(capsys, home, app.url)
    return _history(capsys, home, "items", "1")[-1]


def _revert_as_ops(
    capsys: pytest.CaptureFixture[str], app: App, home: Path, ref: str, *extra: str
) -> tuple[int, str, str]:
    """``sealtrail revert REF`` by user:ops, captured through the tracked tables."""
    args = ["--home", str(home), "--db", app.url, "--config", str(app.config)]
    return run(capsys, "revert", ref, *args, "--actor", "user:ops", *extra)


def _tick() -> str:
    """A time strictly between the writes before and after it."""
    time.sleep(0.002)
    now = utc_now()
    time.sleep(0.002)
    return now


def test_history_of_a_row_its_state_at_a_time_and_the_table_then(
    app: App, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sqlalchemy import delete, insert, update

    items = app.items
    before = _tick()
    app.write("user:alice", insert(items).values(id=1, name="lamp", note="s1"))
    app.write("user:alice", insert(items).values(id=2, name="desk", note="s2"))
    created = _tick()
    app.write("user:bob", update(items).where(items.c.id == 1).values(name="lamp\u202e\n2"))
    app.write("user:bob", delete(items).where(items.c.id == 2))
    after = _tick()
    _relay(capsys, home, app.url)

    changes = _history(capsys, home, "items", "1")
    assert [(c["op"], c["actor"]["id"]) for c in changes] == [
        ("insert", "user:alice"),
        ("update", "user:bob"),
    ]
    assert changes[1]["changes"] == {"name": {"old": "lamp", "new": "lamp\u202e\n2"}}
    assert changes[0]["changes"]["note"] == {"new": {"masked": True}}
    assert changes[0]["index"] < changes[1]["index"] and changes[0]["txid"]
    assert {(c["table"], c["key"]) for c in changes} == {("items", "1")}

    # The table form: one escaped line per change, masked values named, never shown.
    code, out, err = run(capsys, "history", "--home", str(home), "items", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["INDEX", "TIME", "OP", "ACTOR", "TXID", "CHANGES"]
    assert len(lines) == 3
    assert "note=(masked)" in lines[1] and "s1" not in out
    assert '"lamp" -> "lamp\\u202e\\\\n2"' in lines[2]
    assert "\u202e" not in out

    # The row as it was, and the table as it was.
    code, out, err = run(capsys, "history", "--home", str(home), "items", "1", "--at", created)
    assert code == 0, err
    assert orjson.loads(out) == {"id": 1, "name": "lamp", "note": {"masked": True}}
    code, out, err = run(capsys, "history", "--home", str(home), "items", "2", "--at", after)
    assert code == 1 and "did not exist at" in err
    one_line_error(err)
    code, out, err = run(capsys, "history", "--home", str(home), "items", "--at", created)
    assert code == 0, err
    assert sorted(orjson.loads(out)) == ["1", "2"]
    code, out, err = run(capsys, "history", "--home", str(home), "items", "--at", after)
    assert list(orjson.loads(out)) == ["1"]
    at_created = ["history", "--home", str(home), "items", "--at", created]
    code, out, err = run(capsys, *at_created, "--where", "name=desk")
    assert code == 0 and list(orjson.loads(out)) == ["2"], err
    code, out, err = run(capsys, *at_created, "--where", "id=1", "--where", 'name="lamp"')
    assert list(orjson.loads(out)) == ["1"], err
    code, out, err = run(capsys, *at_created, "--where", "id=1", "--where", "name=desk")
    assert code == 0 and orjson.loads(out) == {}, err
    code, out, err = run(capsys, "history", "--home", str(home), "items", "--at", before)
    assert code == 0 and orjson.loads(out) == {} and "no rows of items" in err

    # A key given as a JSON object names the same row.
    assert _history(capsys, home, "items", '{"id": 1}') == changes

    # Retention prunes bob's update: what it may bear on is refused, the rest is noted.
    from sealtrail.home import open_ledger

    ledger = open_ledger(home)
    try:
        ledger.prune([changes[1]["index"]], reason="retention")
    finally:
        ledger.close()
    code, out, err = run(capsys, "history", "--home", str(home), "items", "1", "--at", after)
    assert code == 1 and out == "" and "were pruned" in err, err
    one_line_error(err)
    code, out, err = run(capsys, "history", "--home", str(home), "items", "--at", after)
    assert code == 1 and "were pruned" in err, err
    code, out, err = run(capsys, "history", "--home", str(home), "items", "1", "--at", created)
    assert code == 0 and orjson.loads(out)["name"] == "lamp", err
    code, out, err = run(capsys, "history", "--home", str(home), "items", "1")
    assert code == 0 and len(out.splitlines()) == 2
    assert f"1 change events of items were pruned (the first at index {changes[1]['index']})" in err


def test_revert_a_change_and_a_transaction_through_orm_capture(
    app: App, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sqlalchemy import delete, insert, update

    items = app.items
    bad = _broken_lamp(app, home, capsys, note="s1")

    # A dry run changes nothing and says what it would do.
    code, out, err = run(
        capsys, "revert", bad["id"], "--home", str(home), "--db", app.url, "--dry-run", "--json"
    )
    assert code == 0, err
    result = orjson.loads(out)
    assert result["dry_run"] is True and result["undone"] == [bad["id"]]
    assert "would be undone" in err and app.rows() == [(1, "broken", "s1")]

    code, out, err = _revert_as_ops(capsys, app, home, bad["id"], "--reason", "ticket 42")
    assert code == 0, err
    assert app.rows() == [(1, "lamp", "s1")]
    assert err == f"sealtrail: revert: 1 change(s) undone, recorded as reverting {bad['id']}\n"
    _relay(capsys, home, app.url)
    undo = _history(capsys, home, "items", "1")[-1]
    assert undo["actor"]["id"] == "user:ops" and undo["reverts"] == bad["id"]
    assert undo["changes"] == {"name": {"old": "broken", "new": "lamp"}}
    code, out, _ = run(capsys, "show", "--home", str(home), undo["id"])
    assert orjson.loads(out)["reason"] == "ticket 42"

    # A whole transaction, by its id: an insert and an update undone together.
    import sealtrail

    with sealtrail.context(actor="user:bob"), app.engine.begin() as conn:
        conn.execute(insert(items).values(id=2, name="desk"))
        conn.execute(update(items).where(items.c.id == 1).values(name="gone"))
    _relay(capsys, home, app.url)
    txid = _history(capsys, home, "items", "2")[-1]["txid"]
    code, _, err = _revert_as_ops(capsys, app, home, txid)
    assert code == 0, err
    assert "2 change(s) undone" in err
    assert app.rows() == [(1, "lamp", "s1")]

    # Deleted, the row cannot come back whole: its masked value was never recorded.
    app.write("user:bob", delete(items).where(items.c.id == 1))
    _relay(capsys, home, app.url)
    gone = _history(capsys, home, "items", "1")[-1]
    code, out, err = run(
        capsys, "revert", gone["id"], "--home", str(home), "--db", app.url, "--dry-run"
    )
    assert code == 1 and "masked" in out, out
    assert app.rows() == []


def test_revert_that_would_not_be_captured_is_refused(
    app: App, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --config the command's own engine does not capture: the revert is rolled
    back rather than made unrecorded."""
    bad = _broken_lamp(app, home, capsys)
    code, _, err = run(
        capsys, "revert", bad["id"], "--home", str(home), "--db", app.url, "--actor", "user:ops"
    )
    assert code == 1, err
    one_line_error(err)
    assert "captur" in err
    assert app.rows() == [(1, "broken", None)]


def test_revert_conflicts_change_nothing(
    app: App, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sqlalchemy import insert, update

    items = app.items
    bad = _broken_lamp(app, home, capsys)
    app.write("user:alice", insert(items).values(id=2, name="desk"))
    # Changed since: reverting would overwrite a later change.
    app.write("user:carol", update(items).where(items.c.id == 1).values(name="newer"))
    # And "lamp" is taken again: the undo would violate the unique name.
    app.write("user:carol", update(items).where(items.c.id == 2).values(name="lamp"))
    for extra in (["--dry-run"], ["--actor", "user:ops", "--config", str(app.config)]):
        code, out, err = run(
            capsys, "revert", bad["id"], "--home", str(home), "--db", app.url, *extra
        )
        assert code == 1, err
        assert out.startswith("conflict: ") and "conflict(s); nothing was changed" in err
        assert app.rows() == [(1, "newer", None), (2, "lamp", None)]
    code, out, _ = run(
        capsys, "revert", bad["id"], "--home", str(home), "--db", app.url, "--dry-run", "--json"
    )
    kinds = {c["kind"] for c in orjson.loads(out.splitlines()[0])["conflicts"]}
    assert "changed" in kinds, kinds


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["history", "items"], "needs KEY"),
        (["history", "", "1"], "TABLE must be"),
        (["history", " items", "1"], "TABLE must be"),
        (["history", "items", ""], "KEY must not be empty"),
        (["history", "items", "{not json"], "not a JSON object"),
        (["history", "items", "[1]"], None),  # a text key: nothing found
        (["history", "items", '{"id": 1'], "not a JSON object"),
        (["history", "items", "{}"], "JSON object of column to value"),
        (["history", "items", "1", "--at", "yesterday"], "--at"),
        (["history", "items", "1", "--at", "2026-13-01T00:00:00Z"], "--at"),
        (["history", "items", "--at", "2026-01-01T00:00:00Z", "--where", "x"], "COLUMN=VALUE"),
        (["history", "items", "--at", "2026-01-01T00:00:00Z", "--where", "=1"], "COLUMN=VALUE"),
        (["history", "items", "1", "--at", "2026-01-01T00:00:00Z", "--where", "a=1"], "no KEY"),
        (
            [
                "history",
                "items",
                "--at",
                "2026-01-01T00:00:00Z",
                "--where",
                "a=1",
                "--where",
                "a=2",
            ],
            "twice",
        ),
        (["revert", "x"], "names the application database"),
        (["revert", "x", "--db", "sqlite:///nowhere.db"], "--actor names who reverts"),
        (["revert", "x", "--db", "sqlite:///n.db", "--dry-run", "--since", "soon"], "--since"),
        (["revert", "", "--db", "sqlite:///n.db", "--dry-run"], "nothing to revert"),
        (["revert", "\x1b[31m", "--db", "sqlite:///n.db", "--dry-run"], None),
        (["revert", "x", "--db", "sqlite:///n.db", "--actor", "u", "--config", "nope"], "--config"),
        (["capture", "check", "--config", "x.toml"], "names the application database"),
    ],
)
def test_bad_input_gets_a_one_line_error(
    home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str | None,
) -> None:
    monkeypatch.delenv("SEALTRAIL_APP_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *args, "--home", str(home))
    assert code in (1, 2), (code, out, err)
    one_line_error(err)
    assert "\x1b" not in err
    if message is not None:
        assert message in err, err


def test_revert_config_is_refused_on_postgresql(
    home: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "t.toml"
    config.write_text(TRACKS)
    code, _, err = run(
        capsys,
        "revert",
        "0190f5c2-0000-7000-8000-000000000000",
        "--home",
        str(home),
        "--db",
        "postgresql://nobody@127.0.0.1:1/none",
        "--actor",
        "user:ops",
        "--config",
        str(config),
    )
    assert code == 2 and "--config is for databases captured through SQLAlchemy" in err
    one_line_error(err)


PG_ITEMS = """
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, note text);
"""


@pytest.mark.postgres
def test_postgresql_capture_history_and_revert_from_the_command_line(
    pg_database: Any,
    home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole loop on PostgreSQL, the database named only by $SEALTRAIL_APP_DB:
    install the triggers, write, relay, read the history, revert a transaction, relay,
    and find the revert linked and attributed."""

    role = pg_database.create_role()
    try:
        _postgresql_loop(pg_database, role, home, tmp_path, capsys, monkeypatch)
    finally:
        pg_database.drop_role(role)


def _postgresql_loop(
    pg_database: Any,
    role: str,
    home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psycopg

    import sealtrail
    from pg import MAINTENANCE_URL, with_database
    from sealtrail.capture import pg

    with psycopg.connect(pg_database.url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS clihist CASCADE")
        conn.execute("CREATE SCHEMA clihist")
        conn.execute("SET search_path TO clihist")
        conn.execute(PG_ITEMS)
    url = f"{pg_database.url}?options=-csearch_path%3Dclihist"
    monkeypatch.setenv("SEALTRAIL_APP_DB", url)
    config = tmp_path / "tracks.toml"
    config.write_text('[[track]]\ntable = "clihist.items"\n')
    code, out, err = run(
        capsys, "capture", "install", "--config", str(config), "--schema", "clihist"
    )
    assert code == 0, err
    assert out == "installed clihist.items\n"
    code, _, err = run(capsys, "capture", "check", "--config", str(config), "--schema", "clihist")
    assert code == 0, err
    pg.grant_relay(pg_database.url, role, schema="clihist")
    relay_url = with_database(MAINTENANCE_URL, pg_database.name, role)
    relay = ["relay", "--home", str(home), "--once", "--schema", "clihist", "--from", relay_url]

    with psycopg.connect(url) as conn:
        with sealtrail.context(actor="user:alice"), pg.transaction(conn):
            conn.execute("INSERT INTO items VALUES (1, 'lamp', 's1'), (2, 'desk', 's2')")
        with sealtrail.context(actor="user:bob"), pg.transaction(conn):
            conn.execute("UPDATE items SET name = 'broken' WHERE id = 1")
            conn.execute("DELETE FROM items WHERE id = 2")
    code, _, err = run(capsys, *relay)
    assert code == 0 and "5 new" in err, err  # the install is recorded too

    changes = _history(capsys, home, "clihist.items", "1")
    assert [(c["op"], c["actor"]["id"]) for c in changes] == [
        ("insert", "user:alice"),
        ("update", "user:bob"),
    ]
    txid = changes[-1]["txid"]
    code, _, err = run(capsys, "revert", txid, "--home", str(home), "--actor", "user:ops")
    assert code == 0, err
    assert "2 change(s) undone" in err
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, name, note FROM items ORDER BY id").fetchall()
    assert rows == [(1, "lamp", "s1"), (2, "desk", "s2")]
    code, _, err = run(capsys, *relay)
    assert code == 0 and "2 new" in err, err
    for key in ("1", "2"):
        undo = _history(capsys, home, "clihist.items", key)[-1]
        assert undo["actor"]["id"] == "user:ops"
        assert undo["reverts"] == txid
