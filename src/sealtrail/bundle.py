"""Export bundles: a range of the trail that anyone can check offline with the vkey alone.

A bundle is JSON Lines, so it streams in and out with flat memory whatever its size:

* line 1, the header: ``{"format": "sealtrail-bundle/v1", "origin", "begin", "end",
  "checkpoint": <signed note>}``, where [begin, end) is the range of entries it holds;
* then one line per entry, in order: ``{"index", "entry": base64(exact leaf bytes),
  "proof": [base64 hashes]}``, or, for an entry whose body was pruned,
  ``{"index", "leaf_hash": base64, "pruned": true, "proof": [...]}``.

Every proof is an RFC 6962 inclusion proof into the header's checkpoint, so each line can
also be turned into a ``c2sp.org/tlog-proof@v1`` receipt. Verification checks the checkpoint
signature, each proof, that every index of the range is present exactly once and in order,
and that each entry states its own index.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from sealtrail import merkle
from sealtrail._exceptions import FormatError, ProofError, SignatureError
from sealtrail.checkpoint import Checkpoint, open_checkpoint
from sealtrail.note import Verifier

FORMAT = "sealtrail-bundle/v1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise FormatError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FormatError(f"{what} is not valid base64: {exc}") from exc


def header_line(origin: str, begin: int, end: int, checkpoint_note: str) -> bytes:
    return (
        orjson.dumps(
            {
                "format": FORMAT,
                "origin": origin,
                "begin": begin,
                "end": end,
                "checkpoint": checkpoint_note,
            }
        )
        + b"\n"
    )


def entry_line(index: int, body: bytes | None, leaf_hash: bytes, proof: Sequence[bytes]) -> bytes:
    item: dict[str, Any] = {"index": index}
    if body is None:
        item["leaf_hash"] = _b64(leaf_hash)
        item["pruned"] = True
    else:
        item["entry"] = _b64(body)
    item["proof"] = [_b64(p) for p in proof]
    return orjson.dumps(item) + b"\n"


@dataclass
class BundleReport:
    checkpoint: Checkpoint | None = None
    begin: int = 0
    end: int = 0
    entries: int = 0
    pruned: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.entries == self.end - self.begin

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "origin": None if self.checkpoint is None else self.checkpoint.origin,
            "checkpoint_size": None if self.checkpoint is None else self.checkpoint.size,
            "begin": self.begin,
            "end": self.end,
            "entries": self.entries,
            "pruned": self.pruned,
            "problems": self.problems,
        }


def verify_bundle(lines: Iterable[bytes], verifier: Verifier) -> BundleReport:
    """Check a bundle line by line.

    1. The header parses and names this format.
    2. Its checkpoint is signed by ``verifier`` and covers the range.
    3. Each entry line: the next index in the range; the entry states that index; its leaf
       is included in the checkpoint's tree at that index.
    4. The range is complete: nothing missing at the end, nothing after it.

    A malformed header or a bad signature raises (FormatError, SignatureError): there is
    nothing to check entries against. Problems with entries are collected in the report.
    """
    report = BundleReport()
    it: Iterator[bytes] = iter(lines)
    # 1. Header.
    first = next(it, None)
    if first is None:
        raise FormatError("empty bundle")
    try:
        header = orjson.loads(first)
    except orjson.JSONDecodeError as exc:
        raise FormatError(f"bundle header is not JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FormatError(f"not a {FORMAT} file")
    begin, end, note = header.get("begin"), header.get("end"), header.get("checkpoint")
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
        raise FormatError("bundle header has a bad range")
    if not isinstance(note, str):
        raise FormatError("bundle header has no checkpoint")
    # 2. Checkpoint.
    checkpoint = open_checkpoint(note, verifier)
    if checkpoint.size < end:
        raise SignatureError(
            f"the bundle's checkpoint covers {checkpoint.size} entries, not the range end {end}"
        )
    report.checkpoint, report.begin, report.end = checkpoint, begin, end
    # 3. Entries.
    expected = begin
    for number, raw in enumerate(it, start=2):
        if not raw.strip():
            continue
        try:
            item = orjson.loads(raw)
            index = item["index"]
            proof = [_unb64(p, "proof hash") for p in item["proof"]]
            if item.get("pruned") is True:
                leaf = _unb64(item["leaf_hash"], "leaf_hash")
                body = None
            else:
                body = _unb64(item["entry"], "entry")
                leaf = merkle.leaf_hash(body)
        except (orjson.JSONDecodeError, KeyError, TypeError, FormatError) as exc:
            report.problems.append(f"line {number}: malformed entry line ({exc})")
            continue
        if not isinstance(index, int) or index != expected:
            report.problems.append(
                f"line {number}: index {index}, expected {expected} (entries missing, "
                "duplicated or reordered)"
            )
            if isinstance(index, int) and index > expected:
                expected = index
        if isinstance(index, int) and index >= end:
            report.problems.append(f"line {number}: index {index} is outside the range")
            continue
        if body is not None:
            stated = _stated_index(body)
            if stated != index:
                report.problems.append(
                    f"line {number}: the entry states index {stated}, not {index}"
                )
        try:
            merkle.verify_inclusion(leaf, index, checkpoint.size, proof, checkpoint.root_hash)
        except ProofError as exc:
            report.problems.append(f"line {number}: entry {index} is not in the log: {exc}")
            continue
        report.entries += 1
        if body is None:
            report.pruned += 1
        expected += 1
    # 4. Completeness.
    if expected < end:
        report.problems.append(f"entries {expected}..{end - 1} are missing from the bundle")
    return report


def _stated_index(body: bytes) -> int | None:
    try:
        obj = orjson.loads(body)
        seq = obj["ledger"]["seq"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return seq if isinstance(seq, int) else None
