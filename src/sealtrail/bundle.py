"""Export bundles: a range of the trail that anyone can check offline with the vkey alone.

A bundle is JSON Lines, so it streams in and out with flat memory whatever its size:

* line 1, the header: ``{"format": "sealtrail-bundle/v1", "origin", "begin", "end",
  "checkpoint": <signed note>, "left": [base64 hashes], "right": [base64 hashes]}``,
  where [begin, end) is the range of entries it holds;
* then one line per entry, in order: ``{"index", "entry": base64(exact leaf bytes)}``, or,
  for an entry whose body was pruned, ``{"index", "leaf_hash": base64, "pruned": true}``.

The proof is a *range proof*: ``left`` holds the hashes of the complete subtrees covering
[0, begin) and ``right`` those covering [end, size), ``size`` being the checkpoint's. The
verifier hashes the entries itself, builds the tree from ``left``, the entries and ``right``,
and must reach the checkpoint's signed root: one O(log n) proof for the whole range instead of
one per entry, so any modified, missing, extra or reordered entry makes the range fail. Each
entry also states its own index (``ledger.seq``), which locates misplaced lines.
"""

from __future__ import annotations

import base64
import binascii
import hmac
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


def header_line(
    origin: str,
    begin: int,
    end: int,
    checkpoint_note: str,
    left: Sequence[bytes],
    right: Sequence[bytes],
) -> bytes:
    return (
        orjson.dumps(
            {
                "format": FORMAT,
                "origin": origin,
                "begin": begin,
                "end": end,
                "checkpoint": checkpoint_note,
                "left": [_b64(h) for h in left],
                "right": [_b64(h) for h in right],
            }
        )
        + b"\n"
    )


def entry_line(index: int, body: bytes | None, leaf_hash: bytes) -> bytes:
    if body is None:
        item: dict[str, Any] = {"index": index, "leaf_hash": _b64(leaf_hash), "pruned": True}
    else:
        item = {"index": index, "entry": _b64(body)}
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
    2. Its checkpoint is signed by ``verifier`` and covers the range; the range proof has
       exactly the hashes the sizes call for.
    3. Each entry line: the next index in the range, an entry that states that index; its
       leaf joins the tree being rebuilt.
    4. The range is complete, and ``left`` + entries + ``right`` rebuild the signed root.

    A malformed header, a bad signature or a malformed proof raises (FormatError,
    SignatureError, ProofError): there is nothing to check entries against. Problems with
    entries are collected in the report.
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
    left = [_unb64(h, "left proof hash") for h in _hash_list(header.get("left"), "left")]
    right = [_unb64(h, "right proof hash") for h in _hash_list(header.get("right"), "right")]
    # 2. Checkpoint and the shape of the range proof.
    checkpoint = open_checkpoint(note, verifier)
    if checkpoint.size < end:
        raise SignatureError(
            f"the bundle's checkpoint covers {checkpoint.size} entries, not the range end {end}"
        )
    right_nodes = merkle.range_nodes(end, checkpoint.size)
    if len(left) != begin.bit_count() or len(right) != len(right_nodes):
        raise ProofError("the range proof does not have the hashes the sizes call for")
    report.checkpoint, report.begin, report.end = checkpoint, begin, end
    tree = merkle.TreeBuilder(begin, left)
    # 3. Entries.
    expected = begin
    for number, raw in enumerate(it, start=2):
        if not raw.strip():
            continue
        try:
            item = orjson.loads(raw)
            index = item["index"]
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
        if expected >= end:
            report.problems.append(f"line {number}: more entries than the range holds")
            continue
        if body is not None and _stated_index(body) != index:
            report.problems.append(
                f"line {number}: the entry states index {_stated_index(body)}, not {index}"
            )
        if len(leaf) != merkle.HASH_SIZE:
            report.problems.append(f"line {number}: leaf hash is not {merkle.HASH_SIZE} bytes")
            continue
        tree.append(leaf)
        report.entries += 1
        if body is None:
            report.pruned += 1
        expected += 1
    # 4. Completeness, then the rebuilt root against the signed one.
    if expected < end:
        report.problems.append(f"entries {expected}..{end - 1} are missing from the bundle")
        return report
    for (level, _index), value in zip(right_nodes, right, strict=True):
        tree.append_subtree(level, value)
    if not hmac.compare_digest(tree.root(), checkpoint.root_hash):
        report.problems.append(
            "the entries do not rebuild the signed tree: an entry was modified, or entries "
            "were added, removed or reordered"
        )
    return report


def _hash_list(value: object, what: str) -> list[object]:
    if not isinstance(value, list) or len(value) > 64:
        raise FormatError(f"bundle header: {what} must be a list of at most 64 hashes")
    return value


def _stated_index(body: bytes) -> int | None:
    try:
        obj = orjson.loads(body)
        seq = obj["ledger"]["seq"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return seq if isinstance(seq, int) else None
