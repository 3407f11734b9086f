"""``sealtrail capture install|check|uninstall`` and its configuration file."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest
from psycopg import sql

import pg as pgtest
from hostile import STORABLE
from sealtrail.capture.change import Track, tracks_from_toml
from sealtrail.cli import main

CONFIG = """
[[track]]
table = "public.accounts"
exclude = ["password_hash"]
mask = ["ssn"]

[[track]]
table = "public.orders"
pk = ["order_id", "line"]
"""


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# -- the configuration (pure) ----------------------------------------------------------
def test_tracks_from_toml() -> None:
    assert tracks_from_toml(CONFIG) == [
        Track.of("public.accounts", exclude=["password_hash"], mask=["ssn"]),
        Track.of("public.orders", pk=["order_id", "line"]),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no [[track]] entries"),
        ("track = 3", "no [[track]] entries"),
        ("[[track]]\ntable = 'a'\n[other]\nx = 1", "unknown top-level keys"),
        ("[[track]]\nexclude = ['a']", "'table' must be a non-empty string"),
        ("[[track]]\ntable = ''", "'table' must be a non-empty string"),
        ("[[track]]\ntable = 'a'\ncolumns = ['x']", "unknown keys ['columns']"),
        ("[[track]]\ntable = 'a'\nexclude = 'x'", "'exclude' must be a list"),
        ("[[track]]\ntable = 'a'\nmask = [1]", "'mask' must be a list"),
        ("[[track]]\ntable = 'a'\npk = []", "'pk' must name at least one column"),
        ("[[track]]\ntable = 'a'\nexclude = ['x']\nmask = ['x']", "both excluded and masked"),
        ("[[track]]\ntable = 'a'\n[[track]]\ntable = 'a'", "tracked twice"),
        ("[[track]\ntable = 'a'", "not valid TOML"),
        ('[[track]]\ntable = "a\\u0000"\nexclude = ["\\u202e"]', None),
    ],
)
def test_tracks_from_toml_refuses_bad_configuration(text: str, message: str | None) -> None:
    if message is None:  # strange but valid names are the database's business
        assert len(tracks_from_toml(text)) == 1
        return
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tracks_from_toml(text)


# -- against PostgreSQL ---------------------------------------------------------------------
@pytest.fixture
def db() -> Iterator[str]:
    try:
        pgtest.ensure_server()
    except pgtest.ServerUnavailable as exc:
        pytest.fail(f"PostgreSQL tests need the local server: {exc}", pytrace=False)
    name = f"sealtrail_cli_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(pgtest.MAINTENANCE_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = pgtest.MAINTENANCE_URL.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, email text, password_hash text, ssn text)"
        )
        conn.execute(
            "CREATE TABLE orders (order_id int, line int, qty int, PRIMARY KEY (order_id, line))"
        )
    try:
        yield url
    finally:
        with psycopg.connect(pgtest.MAINTENANCE_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.postgres
def test_install_check_and_uninstall(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "capture.toml"
    config.write_text(CONFIG)
    code, out, err = run(capsys, "capture", "check", "--db", db, "--config", str(config))
    assert code == 1 and "missing" in out and "problem" in err  # nothing installed yet

    code, out, _ = run(capsys, "capture", "install", "--db", db, "--config", str(config))
    assert code == 0
    assert out.splitlines() == ["installed public.accounts", "installed public.orders"]
    code, out, _ = run(capsys, "capture", "install", "--db", db, "--config", str(config))
    assert code == 0 and out == ""  # idempotent
    code, out, err = run(capsys, "capture", "check", "--db", db, "--config", str(config))
    assert code == 0 and out == "" and "all 2 tracked tables" in err

    with psycopg.connect(db, autocommit=True) as conn:  # a migration
        conn.execute("ALTER TABLE accounts ADD COLUMN phone text")
        conn.execute("INSERT INTO accounts (id, email, password_hash) VALUES (1, 'a@x', 'h')")
    code, out, err = run(capsys, "capture", "check", "--db", db, "--config", str(config), "--json")
    problems = orjson.loads(out)
    assert code == 1 and [(p["table"], p["kind"]) for p in problems] == [
        ("public.accounts", "stale")
    ]

    code, out, _ = run(capsys, "capture", "uninstall", "--db", db)
    assert code == 0 and "uninstalled public.accounts" in out


@pytest.mark.postgres
def test_capture_command_errors_are_one_line(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "capture.toml"
    cases: list[tuple[list[str], str]] = [
        (["check", "--db", db], "needs --config"),
        (["install", "--db", "sqlite:///x.db", "--config", str(config)], "postgresql://"),
        (["install", "--db", db, "--config", str(tmp_path / "nope.toml")], "cannot read it"),
    ]
    config.write_text("[[track]]\ntable = 'public.no_such_table'\n")
    cases.append((["install", "--db", db, "--config", str(config)], "no_such_table"))
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[[track]]")
    cases.append((["install", "--db", db, "--config", str(bad)], "cannot read it"))
    for name, value in STORABLE[:8]:
        hostile = tmp_path / f"hostile-{name}.toml"
        hostile.write_text(f"[[track]]\ntable = {orjson.dumps(value).decode()}\n")
        cases.append((["install", "--db", db, "--config", str(hostile)], ""))
    for args, message in cases:
        code, out, err = run(capsys, "capture", *args)
        assert code == 2, (args, out, err)
        assert out == ""
        assert len(err.strip().splitlines()) == 1 and message in err, err
