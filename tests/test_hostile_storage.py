"""I6 end to end: every hostile string, recorded through the application API into each store,
is exactly one stored event, reads back losslessly, and prints as one line.

(Renderers alone are covered in test_hostile_render.py; here the strings cross the whole
path: context, validation, canonical bytes, the database, verification and the CLI.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from hostile import DEEPLY_NESTED, HOSTILE, OVERSIZED, STORABLE, UNENCODABLE
from sealtrail import InvalidEvent
from sealtrail.cli import main
from sealtrail.context import context
from sealtrail.home import init_ledger
from sealtrail.ledger import Ledger
from sealtrail.note import Signer
from sealtrail.store import open_store
from sealtrail.trail import Trail


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def trail(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Trail]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'trail.db'}"
    else:
        url = request.getfixturevalue("pg_database").fresh_schema_url()
    ledger = Ledger(open_store(url), Signer.generate("hostile.test/log"))
    ledger.initialize()
    # No redaction: this test is about storage being lossless, byte for byte.
    yield Trail(ledger)
    ledger.close()


def test_each_hostile_string_is_one_event_and_reads_back_losslessly(trail: Trail) -> None:
    receipts = []
    for name, value in STORABLE:
        # Ids may not be empty (the corpus has ""), so those two carry a prefix.
        with context(actor="p:" + value, user_agent=value, request_id=name):
            receipts.append(
                trail.record(
                    "hostile.probe",
                    target={"type": "probe", "id": "p:" + value},
                    reason=value,
                    data={value: value, "name": name},
                )
            )
    assert trail.ledger.size() == len(STORABLE)  # one event per string, none split
    assert [r.seq for r in receipts] == list(range(len(STORABLE)))
    for (name, value), receipt in zip(STORABLE, receipts, strict=True):
        body = trail.ledger.get(receipt.id).body
        assert body is not None
        event = orjson.loads(body)
        assert event["actor"]["id"] == "p:" + value, name
        assert event["source"]["user_agent"] == value, name
        assert event["target"]["id"] == "p:" + value, name
        assert event["reason"] == value, name
        assert event["data"][value] == value, name
    assert trail.ledger.verify(workers=1).ok


def test_unstorable_strings_are_refused_with_a_clear_error(trail: Trail) -> None:
    for name, value in HOSTILE:
        if name in UNENCODABLE | OVERSIZED:
            with pytest.raises(InvalidEvent):
                trail.record("hostile.probe", actor="x", reason=value)
    with pytest.raises(InvalidEvent, match="nested deeper"):
        trail.record("hostile.probe", actor="x", data={"deep": DEEPLY_NESTED})
    assert trail.ledger.size() == 0


def test_cli_prints_each_hostile_event_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    ledger = init_ledger(home, origin="hostile.test/cli")
    trail = Trail(ledger)
    for name, value in STORABLE:
        trail.record("hostile.probe", actor="p:" + value, target={"type": "t", "id": name})
    ledger.close()
    capsys.readouterr()
    for fmt in ("table", "jsonl", "csv"):
        assert main(["--home", str(home), "query", "--limit", "1000", "--format", fmt]) == 0
        out = capsys.readouterr().out
        header = 0 if fmt == "jsonl" else 1
        assert len(out.splitlines()) == len(STORABLE) + header, fmt
    assert len(HOSTILE) >= 25
