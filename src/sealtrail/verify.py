"""Verification of a whole log that trusts nothing stored.

The only trusted input is the log's verifier key (and, optionally, a checkpoint the user
saved earlier). Everything else (bodies, leaf hashes, interior nodes, checkpoints, prune
records) is re-derived or checked. This module does no I/O: the caller streams the stored
rows in, so memory stays flat whatever the size of the log.

The checklist, in the order :func:`verify_log` runs it:

1. Every stored checkpoint parses, is signed by the log's key, and agrees with its columns.
2. The trusted checkpoint (if given) is signed by the log's key.
3. Every entry, in sequence order: no gap in sequence numbers; the body re-hashes to the
   stored leaf hash; the body is a JSON object whose ``ledger.seq`` is its own position and
   whose ``id`` is its row's id; a missing body is covered by a prune event.
4. The tree is rebuilt from the re-hashed leaves; every stored interior node must equal the
   rebuilt one; at every checkpoint size the rebuilt root must equal the signed root.
5. No checkpoint covers more entries than are stored (truncation).
6. The trusted checkpoint: the log must extend it (same root at its size); a smaller log is
   a rollback, a different root is a fork (history rewritten and re-signed).

Each failure is a :class:`Finding` with a kind and a sequence number.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from sealtrail import merkle
from sealtrail._exceptions import FormatError, SignatureError
from sealtrail.checkpoint import Checkpoint, open_checkpoint
from sealtrail.note import Verifier, parse_note
from sealtrail.store.base import NODE_STRIDE, PruneRecord, StoredCheckpoint, StoredEntry

PRUNE_ACTION = "sealtrail.retention.prune"
MAX_FINDINGS_PER_KIND = 50


class Kind(enum.StrEnum):
    """What verification found. The values are stable: scripts match on them."""

    MODIFIED_BODY = (
        "modified-body"  # a body does not hash to its leaf; the signed leaf is the stored hash
    )
    MODIFIED_HASH = "modified-hash"  # a stored leaf hash was altered; the body is the signed one
    MODIFIED_ID = "modified-id"  # the id column disagrees with the id inside the hashed body
    MALFORMED_ENTRY = "malformed-entry"  # a body that is not one of our entries at all
    MISSING = "missing"  # entries deleted (a gap, or later entries renumbered)
    INSERTED = "inserted"  # entries that the log never appended at this position
    REORDERED = "reordered"  # an entry stored at another entry's position
    DELETED_BODY = "deleted-body"  # a body removed without a prune event covering it
    NODE_MISMATCH = "node-mismatch"  # a stored interior node differs from the rebuilt one
    ROOT_MISMATCH = "root-mismatch"  # the rebuilt tree differs from a signed checkpoint
    TRUNCATED = "truncated"  # the log holds fewer entries than it signed
    ROLLBACK = "rollback"  # the whole store is an earlier copy than the trusted checkpoint
    FORKED = "forked"  # the log does not extend the trusted checkpoint
    BAD_SIGNATURE = "bad-signature"  # a checkpoint signature by the log's key does not verify
    FOREIGN_KEY = "foreign-key"  # a checkpoint not signed by the log's key at all
    MODIFIED_CHECKPOINT = "modified-checkpoint"  # a checkpoint's note or columns were altered


@dataclass(frozen=True, slots=True)
class Finding:
    kind: Kind
    seq: int | None
    detail: str
    end: int | None = None  # exclusive end when the finding covers a range of entries

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value, "seq": self.seq, "detail": self.detail}
        if self.end is not None:
            out["end"] = self.end
        return out

    def __str__(self) -> str:
        where = "" if self.seq is None else f" at {self.seq}"
        if self.end is not None and self.seq is not None and self.end > self.seq + 1:
            where = f" at {self.seq}..{self.end - 1}"
        return f"{self.kind.value}{where}: {self.detail}"


@dataclass
class Report:
    origin: str
    entries: int = 0
    pruned: int = 0
    checkpoints: int = 0
    latest: Checkpoint | None = None
    latest_note: str | None = None
    trusted: Checkpoint | None = None
    unsigned_tail: int = 0
    findings: list[Finding] = field(default_factory=list)
    suppressed: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings

    def kinds(self) -> set[Kind]:
        return {f.kind for f in self.findings}

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "origin": self.origin,
            "entries": self.entries,
            "pruned": self.pruned,
            "checkpoints": self.checkpoints,
            "latest_checkpoint": None
            if self.latest is None
            else {"size": self.latest.size, "root_hash": self.latest.root_hash.hex()},
            "trusted_checkpoint": None
            if self.trusted is None
            else {"size": self.trusted.size, "root_hash": self.trusted.root_hash.hex()},
            "unsigned_tail": self.unsigned_tail,
            "findings": [f.to_json() for f in self.findings],
            "suppressed": self.suppressed,
        }


class _Findings:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.counts: dict[Kind, int] = {}

    def add(self, kind: Kind, seq: int | None, detail: str, end: int | None = None) -> None:
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        if n <= MAX_FINDINGS_PER_KIND:
            self.report.findings.append(Finding(kind, seq, detail, end))
        else:
            self.report.suppressed[kind.value] = n - MAX_FINDINGS_PER_KIND


def classify_checkpoint_failure(note: str, verifier: Verifier) -> Kind:
    """A signature by our key that fails is corruption; no signature by our key is a forgery."""
    try:
        parsed = parse_note(note)
    except FormatError:
        return Kind.MODIFIED_CHECKPOINT
    for sig in parsed.signatures:
        if sig.name == verifier.name and sig.key_id == verifier.key_id:
            return Kind.BAD_SIGNATURE
    return Kind.FOREIGN_KEY


def open_trusted(note: str, verifier: Verifier) -> Checkpoint:
    """The user's saved checkpoint must itself verify, or there is nothing to compare with."""
    return open_checkpoint(note, verifier)


NodeSource = Callable[[int], Iterator[tuple[int, bytes]]]


def verify_log(
    entries: Iterable[StoredEntry],
    checkpoints: Sequence[StoredCheckpoint],
    verifier: Verifier,
    *,
    prunes: Mapping[int, PruneRecord] | None = None,
    stored_level: NodeSource | None = None,
    trusted: Checkpoint | None = None,
    progress: Callable[[int], None] | None = None,
) -> Report:
    """Run the checklist (see the module docstring) and return every finding."""
    report = Report(origin=verifier.name, trusted=trusted)
    found = _Findings(report)
    prunes = prunes or {}

    # 1. Stored checkpoints: signature by the log's key, and columns that match the note.
    signed: dict[int, bytes] = {}
    for stored in checkpoints:
        try:
            cp = open_checkpoint(stored.note, verifier)
        except SignatureError:
            kind = classify_checkpoint_failure(stored.note, verifier)
            found.add(kind, stored.size, f"checkpoint of size {stored.size} does not verify")
            continue
        except FormatError as exc:
            found.add(Kind.MODIFIED_CHECKPOINT, stored.size, f"checkpoint unreadable: {exc}")
            continue
        if cp.size != stored.size or not hmac.compare_digest(cp.root_hash, stored.root_hash):
            found.add(
                Kind.MODIFIED_CHECKPOINT,
                stored.size,
                f"stored columns (size {stored.size}) disagree with the signed note "
                f"(size {cp.size})",
            )
            continue
        signed[cp.size] = cp.root_hash
        report.checkpoints += 1
        if report.latest is None or cp.size > report.latest.size:
            report.latest, report.latest_note = cp, stored.note

    # 2. The trusted checkpoint was opened by the caller (open_trusted); remember its size.
    interesting = set(signed)
    if trusted is not None:
        interesting.add(trusted.size)
    roots_at: dict[int, bytes] = {}
    if 0 in interesting:
        roots_at[0] = merkle.EMPTY_ROOT

    # 3 + 4. Entries in order, rebuilding the tree and comparing stored nodes on the way.
    tree = merkle.TreeBuilder()
    levels: dict[int, Iterator[tuple[int, bytes]]] = {}
    hash_mismatch: list[tuple[int, bytes, bytes]] = []
    runs: list[list[int]] = []  # [start_row, end_row, offset] of rows whose claimed seq differs
    pruned_rows: list[int] = []
    prune_events: dict[str, list[list[int]]] = {}
    expected = 0
    leaf_hash = merkle.leaf_hash
    loads = orjson.loads
    tick = 0
    for entry in entries:
        seq = entry.seq
        if seq != expected:
            if seq > expected:
                found.add(
                    Kind.MISSING,
                    expected,
                    f"{seq - expected} entr{'y' if seq - expected == 1 else 'ies'} deleted",
                    end=seq,
                )
            expected = seq
        expected += 1
        body = entry.body
        if body is None:
            pruned_rows.append(seq)
            lh = entry.leaf_hash
        else:
            lh = leaf_hash(body)
            if lh != entry.leaf_hash:
                hash_mismatch.append((seq, lh, entry.leaf_hash))
            claimed = _claimed(body, loads)
            if claimed is None:
                found.add(Kind.MALFORMED_ENTRY, seq, "body is not a Sealtrail entry")
            else:
                claimed_seq, claimed_id, action, obj = claimed
                offset = claimed_seq - seq
                if offset:
                    if runs and runs[-1][2] == offset and runs[-1][1] == seq - 1:
                        runs[-1][1] = seq
                    else:
                        runs.append([seq, seq, offset])
                if claimed_id != entry.id:
                    found.add(
                        Kind.MODIFIED_ID,
                        seq,
                        f"id column {entry.id!r} but the hashed entry is {claimed_id!r}",
                    )
                if action == PRUNE_ACTION:
                    prune_events[claimed_id] = _prune_ranges(obj)
        for (level, index), value in tree.append(lh):
            if level and not level % NODE_STRIDE and stored_level is not None:
                _compare_node(levels, stored_level, level, index, value, found)
        size = tree.size
        if size in interesting:
            roots_at[size] = tree.root()
        tick += 1
        if progress is not None and tick == 4096:
            progress(tick)
            tick = 0
    if progress is not None and tick:
        progress(tick)
    report.entries = tree.size

    _classify_positions(runs, found)

    for seq in pruned_rows:
        record = prunes.get(seq)
        ranges = prune_events.get(record.by_event) if record is not None else None
        if ranges is not None and any(a <= seq < b for a, b in ranges):
            report.pruned += 1
        else:
            found.add(Kind.DELETED_BODY, seq, "body removed without a prune event covering it")

    # 4 (cont.). Each signed root against the rebuilt tree; locate hash mismatches.
    previous_ok = 0
    first_bad: int | None = None
    bad_after = 0
    for size in sorted(signed):
        if size > tree.size:
            break
        if hmac.compare_digest(roots_at[size], signed[size]):
            previous_ok = size
            continue
        if first_bad is None:
            first_bad = size
            found.add(
                Kind.ROOT_MISMATCH,
                previous_ok,
                f"the entries do not rebuild the signed tree of size {size} "
                f"(last matching checkpoint: size {previous_ok})",
                end=size,
            )
        else:
            bad_after += 1
    if bad_after:
        report.suppressed[Kind.ROOT_MISMATCH.value] = bad_after
    for seq, recomputed, stored_hash in hash_mismatch:
        covering = min((s for s in signed if s > seq and s <= tree.size), default=None)
        if covering is not None and hmac.compare_digest(roots_at[covering], signed[covering]):
            found.add(
                Kind.MODIFIED_HASH,
                seq,
                f"stored leaf hash {stored_hash.hex()[:16]}... altered; the body is the one "
                f"signed in checkpoint {covering}",
            )
        else:
            found.add(
                Kind.MODIFIED_BODY,
                seq,
                f"body hashes to {recomputed.hex()[:16]}..., not to its leaf "
                f"{stored_hash.hex()[:16]}...",
            )

    # 5. Truncation: the log signed more entries than it holds.
    top = max(signed, default=0)
    if top > tree.size:
        found.add(
            Kind.TRUNCATED,
            tree.size,
            f"a checkpoint covers {top} entries but only {tree.size} are stored",
            end=top,
        )
    report.unsigned_tail = max(0, tree.size - top)

    # 6. The trusted checkpoint: the log must extend it.
    if trusted is not None:
        if trusted.size > tree.size:
            if top >= trusted.size:
                pass  # the truncation finding above already says it
            else:
                found.add(
                    Kind.ROLLBACK,
                    tree.size,
                    f"the store holds {tree.size} entries and signed up to {top}, but the "
                    f"trusted checkpoint covers {trusted.size}: this is an earlier copy",
                    end=trusted.size,
                )
        elif not hmac.compare_digest(roots_at[trusted.size], trusted.root_hash):
            equivocation = trusted.size in signed
            found.add(
                Kind.FORKED,
                None if not equivocation else trusted.size,
                f"the log does not extend the trusted checkpoint of size {trusted.size}: "
                "its first "
                f"{trusted.size} entries differ"
                + (" and the log signed a different root for that size" if equivocation else ""),
                end=trusted.size,
            )
    return report


def _claimed(body: bytes, loads: Callable[[bytes], Any]) -> tuple[int, str, str, Any] | None:
    try:
        obj = loads(body)
        ledger = obj["ledger"]
        seq = ledger["seq"]
        eid = obj["id"]
        if isinstance(seq, int) and isinstance(eid, str):
            return seq, eid, obj.get("action", ""), obj
    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
        pass
    return None


def _prune_ranges(obj: Mapping[str, Any]) -> list[list[int]]:
    data = obj.get("data")
    ranges = data.get("ranges") if isinstance(data, dict) else None
    out: list[list[int]] = []
    if isinstance(ranges, list):
        for r in ranges:
            if isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r):
                out.append(r)
    return out


def _compare_node(
    levels: dict[int, Iterator[tuple[int, bytes]]],
    stored_level: NodeSource,
    level: int,
    index: int,
    value: bytes,
    found: _Findings,
) -> None:
    cursor = levels.get(level)
    if cursor is None:
        cursor = levels[level] = stored_level(level)
    span = 1 << level
    for stored_index, stored_hash in cursor:
        if stored_index < index:
            continue  # a stored node we never rebuilt (extra rows): reported by size checks
        if stored_index == index:
            if not hmac.compare_digest(stored_hash, value):
                found.add(
                    Kind.NODE_MISMATCH,
                    index * span,
                    f"entries {index * span}..{(index + 1) * span - 1} do not hash to the "
                    f"stored tree node at level {level}: an entry or the node was rewritten",
                    end=(index + 1) * span,
                )
            return
        break
    found.add(
        Kind.NODE_MISMATCH,
        index * span,
        f"the stored tree node at level {level} over entries {index * span}.."
        f"{(index + 1) * span - 1} is missing",
        end=(index + 1) * span,
    )
    # The cursor moved past the node we wanted; restart it so later nodes still line up.
    levels[level] = _skip_to(stored_level(level), index + 1)


def _skip_to(cursor: Iterator[tuple[int, bytes]], index: int) -> Iterator[tuple[int, bytes]]:
    for item in cursor:
        if item[0] >= index:
            yield item
            break
    yield from cursor


def _classify_positions(runs: list[list[int]], found: _Findings) -> None:
    """Turn runs of misplaced entries into swaps, deletions and insertions.

    Each entry states its own position (``ledger.seq``). Rows whose stated position differs
    from where they are stored come in runs of equal offset: a single row at ``a`` claiming
    ``b`` paired with the row at ``b`` claiming ``a`` is a swap; a run with a positive
    offset means earlier entries were deleted and the rest renumbered; a negative offset means
    rows were inserted before it.
    """
    singles = {r[0]: r for r in runs if r[0] == r[1]}
    paired: set[int] = set()
    for start, _end, offset in [r for r in runs if r[0] == r[1]]:
        other = singles.get(start + offset)
        if other is not None and other[2] == -offset and start not in paired:
            paired.update({start, start + offset})
            found.add(Kind.REORDERED, start, f"holds the entry signed at position {start + offset}")
            found.add(Kind.REORDERED, start + offset, f"holds the entry signed at position {start}")
    for start, end, offset in runs:
        if start == end and start in paired:
            continue
        if offset > 0:
            found.add(
                Kind.MISSING,
                start,
                f"{offset} entr{'y' if offset == 1 else 'ies'} deleted here and the "
                f"{end - start + 1} following renumbered",
                end=start + offset,
            )
        else:
            found.add(
                Kind.INSERTED,
                start + offset,
                f"{-offset} entr{'y' if offset == -1 else 'ies'} inserted before position "
                f"{start}; the entries after it were shifted",
                end=start,
            )
