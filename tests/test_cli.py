"""The command line, as a user runs it: every command, bad input, exit codes, one-line errors."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from cli_helpers import one_line_error, run_cli
from sealtrail.cli import main
from sealtrail.render import csv_cell, escape_text

Run = tuple[int, str, str]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def run(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> Run:
    return run_cli(capsys, "--home", str(home), *args)


@pytest.fixture
def initialised(home: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    code, out, _ = run(capsys, home, "init", "--origin", "cli.test/log")
    assert code == 0 and out.startswith("cli.test/log+")
    return home


def record(
    capsys: pytest.CaptureFixture[str], home: Path, event: dict[str, object]
) -> dict[str, object]:
    code, out, err = run(capsys, home, "record", orjson.dumps(event).decode())
    assert code == 0, err
    return dict(orjson.loads(out))


def test_init_twice_is_refused(initialised: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, initialised, "init")
    assert code == 2
    one_line_error(err)
    assert (initialised / "log.key").stat().st_mode & 0o777 == 0o600


def test_no_log_yet(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, home, "query")
    assert code == 2 and "sealtrail init" in err
    one_line_error(err)


def test_record_show_prove_verify_receipt(
    initialised: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receipt = record(
        capsys, initialised, {"action": "user.login", "actor": "alice", "outcome": "failure"}
    )
    assert receipt["index"] == 0 and receipt["duplicate"] is False
    eid = str(receipt["id"])
    code, out, _ = run(capsys, initialised, "show", eid)
    shown = orjson.loads(out)
    assert shown["actor"] == {"id": "alice"} and shown["ledger"]["seq"] == 0
    code, canonical, _ = run(capsys, initialised, "show", eid, "--canonical")
    assert code == 0 and orjson.loads(canonical) == shown and "\n" not in canonical
    code, proof, _ = run(capsys, initialised, "prove", eid)
    assert proof.startswith("c2sp.org/tlog-proof@v1\nindex 0\n")
    (tmp_path / "event.proof").write_text(proof)
    from sealtrail.home import open_ledger

    ledger = open_ledger(initialised)
    body = ledger.get(eid).body
    ledger.close()
    assert body is not None
    (tmp_path / "event.json").write_bytes(body)
    code, vkey, _ = run(capsys, initialised, "vkey")
    code, out, _ = run(
        capsys,
        initialised,
        "verify-receipt",
        str(tmp_path / "event.proof"),
        "--entry",
        str(tmp_path / "event.json"),
        "--vkey",
        vkey.strip(),
    )
    assert code == 0 and out.startswith("OK")
    # One changed byte in the entry, and the receipt no longer proves it.
    (tmp_path / "event.json").write_bytes(body.replace(b"failure", b"success"))
    code, _, err = run(
        capsys,
        initialised,
        "verify-receipt",
        str(tmp_path / "event.proof"),
        "--entry",
        str(tmp_path / "event.json"),
        "--vkey",
        str(initialised / "log.vkey"),
    )
    assert code == 1
    one_line_error(err)
    # A receipt that is not a receipt at all.
    (tmp_path / "junk.proof").write_text("hello\n")
    code, _, err = run(
        capsys,
        initialised,
        "verify-receipt",
        str(tmp_path / "junk.proof"),
        "--entry",
        str(tmp_path / "event.json"),
        "--vkey",
        vkey.strip(),
    )
    assert code == 1
    one_line_error(err)


def test_same_event_twice_is_idempotent_and_conflicts_are_refused(
    initialised: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    event = {
        "id": "0192a000-0000-7000-8000-000000000001",
        "action": "a.b",
        "time": "2026-01-01T00:00:00Z",
    }
    first = record(capsys, initialised, event)
    again = record(capsys, initialised, event)
    assert again["index"] == first["index"] and again["duplicate"] is True
    code, _, err = run(
        capsys, initialised, "record", orjson.dumps({**event, "action": "a.c"}).decode()
    )
    assert code == 1 and "different content" in err
    one_line_error(err)


def test_jsonl_batch_with_bad_lines_stores_nothing(
    initialised: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        '{"action": "user.login"}',
        '{"action": "Bad Action"}',
        "",
        '{"action": "user.login", "outcome": "maybe"}',
        "not json",
        '{"action": "a.b", "a": 1, "a": 2}',
        '{"action": "a.b", "n": 1.5}',
        '{"action": "a.b", "time": "yesterday"}',
        '{"action": "a.b", "source": {"ip": "999.1.1.1"}}',
        '{"action": "user.logout"}',
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, initialised, "record", "--file", str(path))
    assert code == 1 and out == ""
    reported = [line for line in err.splitlines() if line.startswith("sealtrail: line ")]
    assert [int(line.split()[2].rstrip(":")) for line in reported] == [2, 4, 5, 6, 7, 8, 9]
    assert "nothing was recorded" in err
    code, out, _ = run(capsys, initialised, "query", "--format", "jsonl")
    assert out == ""


def test_jsonl_from_stdin(
    initialised: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"".join(
        orjson.dumps({"action": "doc.read", "actor": f"u{i}"}) + b"\n" for i in range(12)
    )
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    code, out, _ = run(capsys, initialised, "record", "--file", "-")
    assert code == 0
    assert [orjson.loads(line)["index"] for line in out.splitlines()] == list(range(12))


HOSTILE = [
    "line1\nline2",
    "cr\rhere",
    "sep\u2028arator",
    "\x1b[31mred\x1b[0m",
    "bidi\u202eevil",
    "=cmd|' /C calc'!A0",
    "+1+1",
    "@SUM(1)",
    '"quoted", comma',
    "<script>alert(1)</script>",
]


def test_query_formats_render_hostile_values_safely(
    initialised: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i, value in enumerate(HOSTILE):
        record(
            capsys,
            initialised,
            {"action": "user.update", "actor": value, "target": {"type": "t", "id": str(i)}},
        )
    # table: one line per event plus the header, no raw control characters.
    code, out, _ = run(capsys, initialised, "query", "--limit", "100")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(HOSTILE) + 1
    assert not any(ch in out for ch in "\r\x1b\u2028\u202e")
    # jsonl: one line per event, lossless.
    code, out, _ = run(capsys, initialised, "query", "--format", "jsonl")
    actors = [orjson.loads(line)["actor"]["id"] for line in out.splitlines()]
    assert actors == HOSTILE
    # json: an array, lossless.
    code, out, _ = run(capsys, initialised, "query", "--format", "json")
    assert [e["actor"]["id"] for e in orjson.loads(out)] == HOSTILE
    # csv: one line per event; control characters escaped, formulas neutralised.
    code, out, _ = run(capsys, initialised, "query", "--format", "csv")
    assert len(out.splitlines()) == len(HOSTILE) + 1
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == len(HOSTILE)
    for row, value in zip(rows, HOSTILE, strict=True):
        assert row["actor"] == csv_cell(escape_text(value))
        assert not row["actor"].startswith(("=", "+", "-", "@"))


def test_query_filters_and_pagination(
    initialised: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(30):
        record(
            capsys,
            initialised,
            {
                "action": "user.login" if i % 2 else "doc.read",
                "actor": f"user:{i % 3}",
                "target": {"type": "doc", "id": str(i % 5)},
                "outcome": "denied" if i % 7 == 0 else "success",
                "time": f"2026-11-{1 + i:02d}T00:00:00Z",
            },
        )

    def seqs(*args: str) -> list[int]:
        code, out, err = run(capsys, initialised, "query", "--format", "jsonl", *args)
        assert code == 0, err
        return [orjson.loads(line)["ledger"]["seq"] for line in out.splitlines()]

    assert seqs("--actor", "user:1") == [i for i in range(30) if i % 3 == 1]
    assert seqs("--action", "user.*") == [i for i in range(30) if i % 2]
    assert seqs("--target", "doc:2") == [i for i in range(30) if i % 5 == 2]
    assert seqs("--outcome", "denied") == [i for i in range(30) if i % 7 == 0]
    assert seqs("--since", "2026-11-10T00:00:00Z", "--until", "2026-11-12T00:00:00Z") == [9, 10]
    assert seqs("--limit", "4", "--after", "10") == [11, 12, 13, 14]
    assert seqs("--limit", "3", "--reverse") == [29, 28, 27]
    code, _, err = run(capsys, initialised, "query", "--since", "last tuesday")
    assert code == 2
    one_line_error(err)


def test_checkpoint_verify_trusted_export_and_bundle(
    initialised: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(40):
        record(
            capsys,
            initialised,
            {"action": "doc.read", "actor": f"u{i}", "time": f"2026-11-{1 + i % 28:02d}T00:00:00Z"},
        )
    code, note, _ = run(capsys, initialised, "checkpoint")
    assert code == 0 and note.splitlines()[1] == "40"
    saved = tmp_path / "saved.checkpoint"
    saved.write_text(note)
    record(capsys, initialised, {"action": "doc.read"})
    code, out, _ = run(capsys, initialised, "verify", "--trusted", str(saved))
    assert code == 0 and "extends the trusted checkpoint of size 40" in out
    code, out, _ = run(capsys, initialised, "verify", "--json")
    assert code == 0 and orjson.loads(out)["entries"] == 41
    # A "trusted" checkpoint that is not signed by this log cannot be used: exit 2.
    saved.write_text(note.replace("40", "39", 1))
    code, _, err = run(capsys, initialised, "verify", "--trusted", str(saved))
    assert code == 2
    one_line_error(err)

    bundle = tmp_path / "trail.bundle"
    code, _, err = run(capsys, initialised, "export", str(bundle), "--begin", "5", "--end", "25")
    assert code == 0, err
    vkey = (initialised / "log.vkey").read_text().strip()
    # Offline, "on another machine": no home directory at all, only the file and the vkey.
    elsewhere = tmp_path / "elsewhere"
    code, out, _ = run(capsys, elsewhere, "verify-bundle", str(bundle), "--vkey", vkey)
    assert code == 0 and out.startswith("OK: 20 of 20 entries (5..24)")
    lines = bundle.read_bytes().splitlines(keepends=True)
    cases = {
        "entry_removed": lines[:3] + lines[4:],
        "entries_reordered": [*lines[:3], lines[4], lines[3], *lines[5:]],
        "entry_modified": [
            *lines[:3],
            lines[3].replace(b'"entry":"ey', b'"entry":"eX'),
            *lines[4:],
        ],
        "tail_truncated": lines[:-2],
        "entry_duplicated": [*lines, lines[-1]],
    }
    for name, content in cases.items():
        bundle.write_bytes(b"".join(content))
        code, out, _ = run(
            capsys, elsewhere, "verify-bundle", str(bundle), "--vkey", vkey, "--json"
        )
        assert code == 1, name
        assert orjson.loads(out)["ok"] is False, name
    bundle.write_bytes(b"not a bundle\n")
    code, _, err = run(capsys, elsewhere, "verify-bundle", str(bundle), "--vkey", vkey)
    assert code == 1
    one_line_error(err)
    # Signed by another log's key: refused.
    other = tmp_path / "other"
    run(capsys, other, "init", "--origin", "cli.test/log")
    bundle.write_bytes(b"".join(lines))
    other_vkey = (other / "log.vkey").read_text().strip()
    code, _, err = run(capsys, elsewhere, "verify-bundle", str(bundle), "--vkey", other_vkey)
    assert code == 1
    one_line_error(err)
    # By time: the export covers the index range of the matching events.
    code, _, err = run(
        capsys,
        initialised,
        "export",
        str(bundle),
        "--since",
        "2026-11-05T00:00:00Z",
        "--until",
        "2026-11-06T00:00:00Z",
    )
    assert code == 0 and "exported entries 4..32" in err


def test_prune_from_the_command_line(initialised: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(5):
        record(capsys, initialised, {"action": "doc.read", "actor": f"u{i}"})
    code, out, _ = run(capsys, initialised, "prune", "1", "2", "--reason", "retention")
    assert code == 0
    code, out, _ = run(capsys, initialised, "verify", "--json")
    report = orjson.loads(out)
    assert code == 0 and report["pruned"] == 2
    code, _, err = run(capsys, initialised, "prune", "99", "--reason", "x")
    assert code == 1
    one_line_error(err)


@pytest.mark.parametrize(
    "argv",
    [
        ["record"],
        ["record", "{"],
        ["record", "[]"],
        ["record", '{"action": "a.b", "ledger": {"seq": 0}}'],
        ["record", '{"action": "a.b"}', "--file", "x"],
        ["record", "--file", "/nonexistent/file.jsonl"],
        ["show", "no-such-id"],
        ["show"],
        ["query", "--limit", "0"],
        ["query", "--format", "xml"],
        ["verify", "--trusted", "/nonexistent"],
        ["verify-receipt", "/nonexistent", "--entry", "/nonexistent", "--vkey", "x+1+2"],
        ["export", "/nonexistent/dir/out.bundle"],
        ["--store", "mysql://nope", "query"],
        ["--store", "postgresql://nobody@127.0.0.1:1/x?connect_timeout=1", "query"],
    ],
)
def test_bad_input_gives_one_clear_line(
    initialised: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with (
        pytest.raises(SystemExit)
        if argv in (["show"], ["query", "--format", "xml"])
        else _nothing()
    ):
        code = main(["--home", str(initialised), *argv])
        assert code in (1, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_console_script_end_to_end(tmp_path: Path) -> None:
    """The installed ``sealtrail`` script, as in the README."""
    exe = Path(sys.executable).with_name("sealtrail")
    env = {**os.environ, "SEALTRAIL_HOME": str(tmp_path / "h")}

    def sh(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(exe), *args], env=env, input=stdin, capture_output=True, timeout=60
        )

    assert sh("init").returncode == 0
    assert sh("record", "-", stdin=b'{"action":"user.login","actor":"bob"}').returncode == 0
    done = sh("verify")
    assert done.returncode == 0 and done.stdout.startswith(b"intact: 1 entries")
    shown = sh("query", "--format", "jsonl")
    eid = orjson.loads(shown.stdout)["id"]
    canonical = sh("show", eid, "--canonical").stdout
    assert orjson.loads(canonical)["ledger"]["seq"] == 0
    assert b"\n" not in canonical


def test_config_is_private(initialised: Path) -> None:
    assert (initialised / "config.toml").stat().st_mode & 0o777 == 0o600
    assert (initialised / "log.key").stat().st_mode & 0o777 == 0o600


def test_progress_bar_on_a_terminal(
    initialised: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a terminal, long commands draw a progress bar on stderr; stdout stays clean."""
    path = tmp_path / "many.jsonl"
    path.write_bytes(
        b"".join(orjson.dumps({"action": "doc.read", "n": i}) + b"\n" for i in range(300))
    )
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, _ = run(capsys, initialised, "record", "--file", str(path))
    assert code == 0 and len(out.splitlines()) == 300
    code, out, _ = run(capsys, initialised, "verify")
    assert code == 0 and out.startswith("intact: 300 entries")


def test_auditor_with_only_a_copy_of_the_store_and_the_vkey(
    initialised: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record(capsys, initialised, {"action": "user.login", "actor": "carol"})
    copy = tmp_path / "copy.db"
    import sqlite3

    src, dst = sqlite3.connect(initialised / "trail.db"), sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    dst.close()
    nohome = tmp_path / "no-home"
    store = f"sqlite:///{copy}"
    vkey = (initialised / "log.vkey").read_text().strip()
    code, out, _ = run(capsys, nohome, "--store", store, "query", "--format", "jsonl")
    assert code == 0 and orjson.loads(out)["actor"] == {"id": "carol"}
    code, out, _ = run(capsys, nohome, "--store", store, "verify", "--vkey", vkey)
    assert code == 0 and out.startswith("intact")
    # Verifying needs a vkey from the auditor, never the one stored next to the data.
    code, _, err = run(capsys, nohome, "--store", store, "verify")
    assert code == 2
    one_line_error(err)
