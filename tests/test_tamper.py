"""Every tamper class, each as a named attack on a real SQLite store.

The attacker has write access to the database file (so the append-only triggers are dropped
first) but not the log's signing key, except in the fork test, where they have the key too
and only a checkpoint the verifier saved earlier can catch them.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from sealtrail import IntegrityError, merkle
from sealtrail.canonical import canonicalize
from sealtrail.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from sealtrail.home import init_ledger, open_ledger
from sealtrail.ledger import CheckpointPolicy, Ledger
from sealtrail.note import Signer
from sealtrail.store.sqlite import SQLiteStore
from sealtrail.verify import Kind, Report

N = 100
EVERY = 10


def _event(i: int) -> dict[str, object]:
    return {
        "action": "user.email.update",
        "actor": {"id": f"user:{i % 7}", "type": "user"},
        "target": {"type": "user", "id": str(i)},
        "changes": {"email": {"old": f"a{i}@example.com", "new": f"b{i}@example.com"}},
        "time": "2026-11-22T10:00:00Z",
    }


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    ledger = init_ledger(h, origin="tamper.test/log")
    ledger.policy = CheckpointPolicy(every_events=EVERY, every_seconds=0)
    for start in range(0, N, 5):
        ledger.append_many([_event(i) for i in range(start, start + 5)])
    ledger.close()
    return h


def _db(home: Path) -> sqlite3.Connection:
    """The attacker's connection: append-only guards dropped."""
    db = sqlite3.connect(home / "trail.db", isolation_level=None)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    return db


@pytest.fixture(params=["one-process", "parallel"], autouse=True)
def verify_mode(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every attack is checked twice: in one process, and split into chunks of 16 entries
    checked by two worker processes and combined (the path large logs take)."""
    global _MODE
    _MODE = request.param
    yield
    _MODE = "one-process"


_MODE = "one-process"


def _verify(home: Path, trusted: str | None = None) -> Report:
    ledger = open_ledger(home)
    try:
        if _MODE == "parallel":
            return ledger.verify(trusted, workers=2, chunk_level=4)
        return ledger.verify(trusted, workers=1)
    finally:
        ledger.store.close()


def _body(db: sqlite3.Connection, seq: int) -> dict[str, object]:
    (body,) = db.execute("SELECT body FROM entries WHERE seq = ?", (seq,)).fetchone()
    return dict(orjson.loads(body))


def _at(report: Report, kind: Kind) -> set[int | None]:
    return {f.seq for f in report.findings if f.kind is kind}


def test_intact_log_verifies(home: Path) -> None:
    report = _verify(home)
    assert report.ok, report.findings
    assert report.entries == N
    assert report.checkpoints == N // EVERY + 1  # plus the empty tree at init


def test_modified_body(home: Path) -> None:
    db = _db(home)
    db.execute("UPDATE entries SET body = replace(body, 'b42@', 'evil@') WHERE seq = 42")
    report = _verify(home)
    assert not report.ok
    assert _at(report, Kind.MODIFIED_BODY) == {42}


def test_modified_stored_hash(home: Path) -> None:
    db = _db(home)
    db.execute("UPDATE entries SET leaf_hash = zeroblob(32) WHERE seq = 17")
    report = _verify(home)
    assert _at(report, Kind.MODIFIED_HASH) == {17}
    assert Kind.MODIFIED_BODY not in report.kinds()


def test_body_and_hash_rewritten_consistently(home: Path) -> None:
    db = _db(home)
    event = _body(db, 33)
    event["outcome"] = "denied"
    body = canonicalize(event)
    db.execute(
        "UPDATE entries SET body = ?, leaf_hash = ? WHERE seq = 33", (body, merkle.leaf_hash(body))
    )
    report = _verify(home)
    mismatch = [f for f in report.findings if f.kind is Kind.ROOT_MISMATCH]
    assert mismatch and mismatch[0].seq is not None and mismatch[0].end is not None
    assert mismatch[0].seq <= 33 < mismatch[0].end
    # The untouched level-4 node over entries 32..47 pins it down to 16 entries.
    nodes = [f for f in report.findings if f.kind is Kind.NODE_MISMATCH]
    assert any(f.seq == 32 and f.end == 48 for f in nodes)


def test_deleted_event(home: Path) -> None:
    db = _db(home)
    db.execute("DELETE FROM entries WHERE seq = 55")
    report = _verify(home)
    assert 55 in _at(report, Kind.MISSING)


def test_deleted_event_with_later_rows_renumbered(home: Path) -> None:
    db = _db(home)
    db.execute("DELETE FROM entries WHERE seq = 60")
    for seq in range(61, N):
        db.execute("UPDATE entries SET seq = ? WHERE seq = ?", (seq - 1, seq))
    report = _verify(home)
    assert 60 in _at(report, Kind.MISSING)
    assert Kind.TRUNCATED in report.kinds()


def test_inserted_forged_event(home: Path) -> None:
    db = _db(home)
    for seq in range(N - 1, 29, -1):
        db.execute("UPDATE entries SET seq = ? WHERE seq = ?", (seq + 1, seq))
    forged = dict(_event(999))
    forged["id"] = "01900000-0000-7000-8000-000000000001"
    forged["ledger"] = {"received": "2026-11-22T10:00:00.000000Z", "seq": 30}
    body = canonicalize(forged)
    db.execute(
        "INSERT INTO entries(seq, id, body, leaf_hash) VALUES (30, ?, ?, ?)",
        (forged["id"], body, merkle.leaf_hash(body)),
    )
    report = _verify(home)
    assert 30 in _at(report, Kind.INSERTED)


def test_forged_event_replacing_an_existing_one(home: Path) -> None:
    db = _db(home)
    forged = dict(_event(5))
    forged["id"] = "01900000-0000-7000-8000-000000000002"
    forged["ledger"] = {"received": "2026-11-22T10:00:00.000000Z", "seq": 5}
    body = canonicalize(forged)
    db.execute(
        "UPDATE entries SET id = ?, body = ?, leaf_hash = ? WHERE seq = 5",
        (forged["id"], body, merkle.leaf_hash(body)),
    )
    report = _verify(home)
    assert any(
        f.kind is Kind.ROOT_MISMATCH and f.seq is not None and f.seq <= 5 for f in report.findings
    )


def test_two_events_swapped(home: Path) -> None:
    db = _db(home)
    a = db.execute("SELECT id, body, leaf_hash FROM entries WHERE seq = 12").fetchone()
    b = db.execute("SELECT id, body, leaf_hash FROM entries WHERE seq = 71").fetchone()
    db.execute("UPDATE entries SET id = 'tmp' WHERE seq = 12")
    db.execute("UPDATE entries SET id = ?, body = ?, leaf_hash = ? WHERE seq = 71", a)
    db.execute("UPDATE entries SET id = ?, body = ?, leaf_hash = ? WHERE seq = 12", b)
    report = _verify(home)
    assert _at(report, Kind.REORDERED) == {12, 71}


def test_tail_truncated(home: Path) -> None:
    db = _db(home)
    db.execute("DELETE FROM entries WHERE seq >= 90")
    report = _verify(home)
    assert _at(report, Kind.TRUNCATED) == {90}


def test_store_rolled_back_to_an_earlier_copy(home: Path, tmp_path: Path) -> None:
    backup = tmp_path / "backup.db"
    src = sqlite3.connect(home / "trail.db")
    dst = sqlite3.connect(backup)
    src.backup(dst)
    src.close()
    dst.close()
    ledger = open_ledger(home)
    ledger.append_many([_event(i) for i in range(N, N + 20)])
    trusted = ledger.checkpoint().note  # the auditor saves this
    ledger.close()
    for suffix in ("", "-wal", "-shm"):
        (home / f"trail.db{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, home / "trail.db")
    assert _verify(home).ok  # on its own, the old copy is a valid log...
    report = _verify(home, trusted)  # ...but not the one the auditor saw
    assert _at(report, Kind.ROLLBACK) == {N}


def test_history_rewritten_and_resigned_with_the_logs_own_key(home: Path, tmp_path: Path) -> None:
    trusted = open_ledger(home).checkpoint().note
    signer = Signer.from_skey((home / "log.key").read_text().strip())
    # The attacker rebuilds the whole log with event 20 altered and signs it with the real key.
    originals = [orjson.loads(e.body) for e in open_ledger(home).store.iter_entries() if e.body]
    rogue_path = tmp_path / "rogue.db"
    rogue = Ledger(SQLiteStore(rogue_path), signer, policy=CheckpointPolicy(every_events=EVERY))
    rogue.initialize()
    for entry in originals:
        entry.pop("ledger")
        if entry["target"]["id"] == "20":
            entry["changes"]["email"]["new"] = "attacker@example.com"
        rogue.append(entry)
    rogue.close()
    for suffix in ("", "-wal", "-shm"):
        (home / f"trail.db{suffix}").unlink(missing_ok=True)
    shutil.copy(rogue_path, home / "trail.db")
    assert _verify(home).ok  # self-consistent and signed by the right key...
    report = _verify(home, trusted)
    assert Kind.FORKED in report.kinds()  # ...but it does not extend what the auditor saw


def test_corrupted_checkpoint_signature(home: Path) -> None:
    db = _db(home)
    (note,) = db.execute("SELECT note FROM checkpoints WHERE size = 50").fetchone()
    text, sig_line = note.rstrip("\n").rsplit("\n", 1)
    prefix, sig = sig_line.rsplit(" ", 1)
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    db.execute(
        "UPDATE checkpoints SET note = ? WHERE size = 50", (f"{text}\n{prefix} {flipped}\n",)
    )
    report = _verify(home)
    assert _at(report, Kind.BAD_SIGNATURE) == {50}


def test_checkpoint_signed_by_another_key(home: Path) -> None:
    db = _db(home)
    (root,) = db.execute("SELECT root_hash FROM checkpoints WHERE size = 60").fetchone()
    impostor = Signer.generate("tamper.test/log")
    note = sign_checkpoint(Checkpoint("tamper.test/log", 60, root), impostor)
    db.execute("UPDATE checkpoints SET note = ? WHERE size = 60", (note,))
    report = _verify(home)
    assert _at(report, Kind.FOREIGN_KEY) == {60}


def test_checkpoint_columns_altered(home: Path) -> None:
    db = _db(home)
    db.execute("UPDATE checkpoints SET root_hash = zeroblob(32) WHERE size = 30")
    report = _verify(home)
    assert _at(report, Kind.MODIFIED_CHECKPOINT) == {30}


def test_interior_node_altered(home: Path) -> None:
    db = _db(home)
    db.execute("UPDATE nodes SET hash = zeroblob(32) WHERE k = (SELECT min(k) FROM nodes)")
    report = _verify(home)
    assert _at(report, Kind.NODE_MISMATCH) == {0}


def test_body_removed_without_a_prune_event(home: Path) -> None:
    db = _db(home)
    db.execute("UPDATE entries SET body = NULL WHERE seq = 8")
    report = _verify(home)
    assert _at(report, Kind.DELETED_BODY) == {8}


def test_pruned_bodies_are_reported_as_pruned_not_tampered(home: Path) -> None:
    ledger = open_ledger(home)
    ledger.prune([3, 4, 5, 80], reason="retention: older than 1 year")
    event_id = ledger.get_seq(6).id
    receipt_target = ledger.get_seq(4)
    receipt = ledger.prove(receipt_target.id)
    ledger.close()
    report = _verify(home)
    assert report.ok, report.findings
    assert report.pruned == 4
    assert receipt_target.body is None
    signer = Signer.from_skey((home / "log.key").read_text().strip())
    cp = open_checkpoint(receipt.checkpoint, signer.verifier())
    merkle.verify_inclusion(receipt_target.leaf_hash, 4, cp.size, list(receipt.proof), cp.root_hash)
    assert open_ledger(home).get(event_id).body is not None


def test_log_refuses_to_sign_over_a_tampered_tree(home: Path) -> None:
    db = _db(home)
    # Leaf 97 is on the tree's right edge: the next checkpoint's root depends on it.
    db.execute("UPDATE entries SET leaf_hash = zeroblob(32) WHERE seq = 97")
    ledger = open_ledger(home)
    with pytest.raises(IntegrityError, match="refusing to sign"):
        ledger.append_many([_event(i) for i in range(N, N + 3)])
        ledger.checkpoint()
    # Closing signs what grew (and refuses again); it also stops the checkpoint timer the
    # appends armed, which would otherwise fire later on a closed store.
    with pytest.raises(IntegrityError, match="refusing to sign"):
        ledger.close()
    assert _verify(home).kinds() == {Kind.MODIFIED_HASH}  # and nothing was signed over it


def test_log_refuses_to_prove_from_a_tampered_tree(home: Path) -> None:
    db = _db(home)
    db.execute("UPDATE entries SET leaf_hash = zeroblob(32) WHERE seq = 3")
    ledger = open_ledger(home)
    with pytest.raises(IntegrityError, match="does not prove"):
        ledger.prove(ledger.get_seq(2).id)
    ledger.store.close()


def test_log_refuses_to_sign_after_truncation(home: Path) -> None:
    db = _db(home)
    db.execute("DELETE FROM entries WHERE seq >= 95")
    ledger = open_ledger(home)
    with pytest.raises(IntegrityError, match="truncated or rolled back"):
        ledger.checkpoint()
    ledger.store.close()


@pytest.fixture
def cli_home(home: Path) -> Iterator[Path]:
    yield home


def test_verify_exit_codes(
    cli_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sealtrail.cli import main

    assert main(["--home", str(cli_home), "verify"]) == 0
    assert "intact" in capsys.readouterr().out
    db = _db(cli_home)
    db.execute("UPDATE entries SET leaf_hash = zeroblob(32) WHERE seq = 1")
    assert main(["--home", str(cli_home), "verify", "--json"]) == 1
    out = orjson.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert out["findings"][0] == {
        "kind": "modified-hash",
        "seq": 1,
        "detail": out["findings"][0]["detail"],
    }
    assert main(["--home", str(tmp_path / "nowhere"), "verify"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
