"""Export bundles: every range of a log verifies offline; any change to one does not."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest

from sealtrail import FormatError, ProofError, SignatureError
from sealtrail.bundle import verify_bundle
from sealtrail.ledger import CheckpointPolicy, Ledger
from sealtrail.note import Signer
from sealtrail.store.sqlite import SQLiteStore

N = 37


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    path = tmp_path_factory.mktemp("bundle") / "trail.db"
    ledger = Ledger(
        SQLiteStore(path),
        Signer.generate("bundle.test/log"),
        policy=CheckpointPolicy(every_events=0, every_seconds=0),
    )
    ledger.initialize()
    ledger.append_many([{"action": "doc.read", "actor": f"u{i}"} for i in range(N)])
    ledger.prune([5, 6, 20], reason="retention")
    ledger.checkpoint()
    return ledger


def export(ledger: Ledger, begin: int, end: int | None) -> list[bytes]:
    out = io.BytesIO()
    ledger.export(out, begin, end)
    return out.getvalue().splitlines(keepends=True)


def test_every_range_verifies_offline(ledger: Ledger) -> None:
    size = ledger.size()
    for begin in range(0, size + 1, 3):
        for end in range(begin, size + 1, 4):
            report = verify_bundle(export(ledger, begin, end), ledger.verifier)
            assert report.ok, (begin, end, report.problems)
            assert report.entries == end - begin
    report = verify_bundle(export(ledger, 0, None), ledger.verifier)
    assert report.ok and report.pruned == 3


def test_bundle_is_compact(ledger: Ledger) -> None:
    lines = export(ledger, 0, None)
    header = orjson.loads(lines[0])
    assert len(header["left"]) == 0 and len(header["right"]) == 0
    assert all(b'"proof"' not in line for line in lines[1:])


@pytest.mark.parametrize("where", ["left", "right"])
def test_tampered_range_proof_fails(ledger: Ledger, where: str) -> None:
    lines = export(ledger, 9, 14)
    header = orjson.loads(lines[0])
    assert header[where]
    header[where][0] = "A" * 43 + "="
    report = verify_bundle([orjson.dumps(header) + b"\n", *lines[1:]], ledger.verifier)
    assert not report.ok


def test_pruned_leaf_swapped_for_another_fails(ledger: Ledger) -> None:
    lines = export(ledger, 0, 10)
    pruned = [i for i, line in enumerate(lines) if b'"pruned":true' in line]
    assert pruned
    item = orjson.loads(lines[pruned[0]])
    item["leaf_hash"] = "B" * 43 + "="
    lines[pruned[0]] = orjson.dumps(item) + b"\n"
    assert not verify_bundle(lines, ledger.verifier).ok


def test_malformed_headers_are_refused(ledger: Ledger) -> None:
    lines = export(ledger, 2, 8)
    header = orjson.loads(lines[0])
    with pytest.raises(ProofError):
        verify_bundle([orjson.dumps({**header, "left": []}) + b"\n", *lines[1:]], ledger.verifier)
    with pytest.raises(FormatError):
        verify_bundle([orjson.dumps({**header, "left": "x"}) + b"\n"], ledger.verifier)
    with pytest.raises(FormatError):
        verify_bundle([b"[]\n"], ledger.verifier)
    with pytest.raises(FormatError):
        verify_bundle([], ledger.verifier)
    with pytest.raises(SignatureError):
        verify_bundle(lines, Signer.generate("bundle.test/log").verifier())
    with pytest.raises(SignatureError):
        verify_bundle(
            [orjson.dumps({**header, "end": 10_000}) + b"\n", *lines[1:]], ledger.verifier
        )


def test_export_by_cli_writes_a_file(ledger: Ledger, tmp_path: Path) -> None:
    path = tmp_path / "x.bundle"
    with open(path, "wb") as f:
        ledger.export(f, 3, 30)
    with open(path, "rb") as f:
        assert verify_bundle(f, ledger.verifier).ok
