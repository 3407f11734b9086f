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
import hashlib
import hmac
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from sealtrail import merkle
from sealtrail._exceptions import FormatError, SignatureError
from sealtrail.checkpoint import Checkpoint, open_checkpoint
from sealtrail.merkle import NodeId
from sealtrail.note import Verifier, parse_note
from sealtrail.store.base import NODE_STRIDE, PruneRecord, StoredCheckpoint, as_bytes

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


#: Verification splits the log into aligned chunks of 2**16 entries: each chunk is a complete
#: subtree, so chunks are checked independently (in parallel worker processes for large logs)
#: and combined by folding their roots.
CHUNK_LEVEL = 16
CHUNK = 1 << CHUNK_LEVEL

_LEDGER_MARK = b'"ledger":{"received":"'
_SEQ_MARK = b'"seq":'
_PRUNE_START = b'{"action":"' + PRUNE_ACTION.encode() + b'"'
# Offset from the ledger marker to the end of the receive time ("YYYY-MM-DDTHH:MM:SS.ffffffZ").
_RECEIVED_END = len(_LEDGER_MARK) + 27

Row = tuple[int, str, Any, Any]  # (seq, id, body or None, leaf hash) as the store holds them
LevelSource = Callable[[int, int, int], Iterator[tuple[int, bytes]]]


@dataclass
class ChunkResult:
    """What checking one chunk [start, end) found; plain data, so it crosses processes."""

    start: int
    end: int
    count: int = 0
    root: bytes | None = None  # the chunk's subtree hash, when it is complete and gapless
    partial: dict[int, list[bytes]] = field(default_factory=dict)  # size -> range_nodes hashes
    hash_mismatch: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    runs: list[list[int]] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)
    malformed: list[int] = field(default_factory=list)
    modified_ids: list[tuple[int, str]] = field(default_factory=list)
    pruned: list[int] = field(default_factory=list)
    prune_events: dict[str, list[list[int]]] = field(default_factory=dict)
    nodes: list[tuple[int, int, bool]] = field(default_factory=list)  # (level, index, missing)


def check_chunk(
    rows: Iterable[Row],
    start: int,
    end: int,
    interesting: Iterable[int] = (),
    stored_level: LevelSource | None = None,
    chunk_level: int = CHUNK_LEVEL,
) -> ChunkResult:
    """Steps 3 and 4 of the checklist for the entries [start, end), ``start`` aligned to
    ``2**chunk_level``. Rows must come in seq order and lie in the range."""
    result = ChunkResult(start, end)
    leaves: list[bytes] = []
    add_leaf = leaves.append
    sha = hashlib.sha256
    find_mark = _LEDGER_MARK
    received_end = _RECEIVED_END
    expected = start
    for seq, eid, raw_body, raw_leaf in rows:
        if seq != expected:
            if seq > expected:
                result.gaps.append((expected, seq))
            expected = seq
        expected += 1
        stored_leaf = raw_leaf if type(raw_leaf) is bytes else as_bytes(raw_leaf)
        if raw_body is None:
            result.pruned.append(seq)
            add_leaf(stored_leaf)
            continue
        body = raw_body if type(raw_body) is bytes else as_bytes(raw_body)
        lh = sha(b"\x00" + body).digest()  # merkle.leaf_hash, inlined: this loop is the cost
        add_leaf(lh)
        if lh != stored_leaf:
            result.hash_mismatch.append((seq, lh, stored_leaf))
        # Fast path, O(1) after one search: in canonical bytes the top-level keys are sorted,
        # so "action" comes first and the top-level "id" (a UUID) sits right before the
        # ledger member, and the receive time has a fixed width. Anything else is parsed.
        mark = body.find(find_mark)
        if not (
            mark > 44
            and body.startswith(b'","seq":%d}' % seq, mark + received_end)
            and body[mark - 44 : mark] == b'"id":"' + eid.encode() + b'",'
        ):
            _slow_entry_checks(body, seq, eid, result)
        if body.startswith(_PRUNE_START):
            parsed = _parse_entry(body)
            if parsed is not None and parsed[2] == PRUNE_ACTION:
                result.prune_events[parsed[1]] = _prune_ranges(parsed[3])
    if expected < end:
        result.gaps.append((expected, end))
    result.count = len(leaves)
    levels = _build_levels(leaves, chunk_level)
    if stored_level is not None:
        for level in range(NODE_STRIDE, len(levels), NODE_STRIDE):
            _compare_level(levels[level], level, start >> level, stored_level, result)
    for size in interesting:
        if start < size <= start + len(leaves):
            local = merkle.range_nodes(0, size - start)
            result.partial[size] = [levels[lv][i] for lv, i in local]
    if len(leaves) == 1 << chunk_level and not result.gaps:
        result.root = levels[chunk_level][0]
    return result


def _slow_entry_checks(body: bytes, seq: int, eid: str, result: ChunkResult) -> None:
    """Position and id checks by parsing, for entries the byte-level fast path cannot read."""
    parsed = _parse_entry(body)
    if parsed is None:
        result.malformed.append(seq)
        return
    offset = parsed[0] - seq
    if offset:
        runs = result.runs
        last = runs[-1] if runs else None
        if last is not None and last[2] == offset and last[1] == seq - 1:
            last[1] = seq
        else:
            runs.append([seq, seq, offset])
    if parsed[1] != eid:
        result.modified_ids.append((seq, eid))


def _build_levels(leaves: list[bytes], top: int) -> list[list[bytes]]:
    """Every complete node over ``leaves``, level by level (level 0 is the leaves)."""
    sha = hashlib.sha256
    levels = [leaves]
    current = leaves
    for _ in range(top):
        if len(current) < 2:
            break
        current = [
            sha(b"\x01" + current[i] + current[i + 1]).digest()
            for i in range(0, len(current) - 1, 2)
        ]
        levels.append(current)
    return levels


def _compare_level(
    rebuilt: list[bytes],
    level: int,
    first: int,
    stored_level: LevelSource,
    result: ChunkResult,
) -> None:
    stored = dict(stored_level(level, first, first + len(rebuilt)))
    for offset, value in enumerate(rebuilt):
        index = first + offset
        have = stored.get(index)
        if have is None:
            result.nodes.append((level, index, True))
        elif not hmac.compare_digest(as_bytes(have), value):
            result.nodes.append((level, index, False))


def verify_log(
    chunks: Iterable[ChunkResult],
    checkpoints: Sequence[StoredCheckpoint],
    verifier: Verifier,
    *,
    prunes: Mapping[int, PruneRecord] | None = None,
    upper_nodes: Mapping[NodeId, bytes] | None = None,
    trusted: Checkpoint | None = None,
    progress: Callable[[int], None] | None = None,
    chunk_level: int = CHUNK_LEVEL,
) -> Report:
    """Run the checklist (see the module docstring) over checked chunks, in order.

    ``upper_nodes`` are the stored interior nodes at levels >= :data:`CHUNK_LEVEL` (few:
    one per 65,536 entries), compared here with the tree rebuilt from the chunk roots.
    """
    report = Report(origin=verifier.name, trusted=trusted)
    found = _Findings(report)
    prunes = prunes or {}

    # 1. Stored checkpoints: signature by the log's key, and columns that match the note.
    signed = _check_checkpoints(checkpoints, verifier, report, found)

    # 2. The trusted checkpoint was opened by the caller (open_trusted).
    interesting = set(signed)
    if trusted is not None:
        interesting.add(trusted.size)
    roots_at: dict[int, bytes | None] = {0: merkle.EMPTY_ROOT}

    # 3 + 4. Chunks in order: fold their results into one tree of chunk roots.
    upper = merkle.TreeBuilder()
    broken = False  # a chunk could not give its root: later roots are unknown
    runs: list[list[int]] = []
    hash_mismatch: list[tuple[int, bytes, bytes]] = []
    pruned_rows: list[int] = []
    prune_events: dict[str, list[list[int]]] = {}
    entries = 0
    for chunk in chunks:
        entries += chunk.count
        for a, b in chunk.gaps:
            n = b - a
            found.add(Kind.MISSING, a, f"{n} entr{'y' if n == 1 else 'ies'} deleted", end=b)
        for seq in chunk.malformed:
            found.add(Kind.MALFORMED_ENTRY, seq, "body is not a Sealtrail entry")
        for seq, eid in chunk.modified_ids:
            found.add(Kind.MODIFIED_ID, seq, f"id column {eid!r} is not the hashed entry's id")
        for level, index, missing in chunk.nodes:
            _node_finding(found, level, index, missing)
        for run in chunk.runs:
            last = runs[-1] if runs else None
            if last is not None and last[2] == run[2] and last[1] == run[0] - 1:
                last[1] = run[1]
            else:
                runs.append(run)
        hash_mismatch.extend(chunk.hash_mismatch)
        pruned_rows.extend(chunk.pruned)
        prune_events.update(chunk.prune_events)
        for size, hashes in chunk.partial.items():
            roots_at[size] = None if broken else merkle.fold(upper.frontier + hashes)
        if chunk.end - chunk.start == 1 << chunk_level:
            if chunk.root is None or broken:
                broken = True
            else:
                for (level, index), value in upper.append(chunk.root):
                    global_level = level + chunk_level
                    # The chunk root itself was compared inside its chunk.
                    if (
                        global_level > chunk_level
                        and not global_level % NODE_STRIDE
                        and upper_nodes is not None
                    ):
                        stored = upper_nodes.get((global_level, index))
                        if stored is None or not hmac.compare_digest(stored, value):
                            _node_finding(found, global_level, index, stored is None)
        if progress is not None:
            progress(chunk.count)
    report.entries = entries

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
    good: set[int] = set()
    for cp_size in sorted(signed):
        if cp_size > entries and cp_size not in roots_at:
            break
        rebuilt = roots_at.get(cp_size)
        if rebuilt is not None and hmac.compare_digest(rebuilt, signed[cp_size]):
            previous_ok = cp_size
            good.add(cp_size)
            continue
        if first_bad is None:
            first_bad = cp_size
            found.add(
                Kind.ROOT_MISMATCH,
                previous_ok,
                f"the entries do not rebuild the signed tree of size {cp_size} "
                f"(last matching checkpoint: size {previous_ok})",
                end=cp_size,
            )
        else:
            bad_after += 1
    if bad_after:
        report.suppressed[Kind.ROOT_MISMATCH.value] = bad_after
    for seq, recomputed, stored_hash in hash_mismatch:
        covering = min((s for s in signed if s > seq and s in roots_at), default=None)
        if covering is not None and covering in good:
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
    if top > entries:
        found.add(
            Kind.TRUNCATED,
            entries,
            f"a checkpoint covers {top} entries but only {entries} are stored",
            end=top,
        )
    report.unsigned_tail = max(0, entries - top)

    # 6. The trusted checkpoint: the log must extend it.
    if trusted is not None:
        if trusted.size > entries:
            if top < trusted.size:
                found.add(
                    Kind.ROLLBACK,
                    entries,
                    f"the store holds {entries} entries and signed up to {top}, but the "
                    f"trusted checkpoint covers {trusted.size}: this is an earlier copy",
                    end=trusted.size,
                )
        else:
            rebuilt = roots_at.get(trusted.size)
            if rebuilt is None or not hmac.compare_digest(rebuilt, trusted.root_hash):
                equivocation = trusted.size in signed
                found.add(
                    Kind.FORKED,
                    trusted.size if equivocation else None,
                    f"the log does not extend the trusted checkpoint of size {trusted.size}: "
                    f"its first {trusted.size} entries differ"
                    + (
                        " and the log signed a different root for that size" if equivocation else ""
                    ),
                    end=trusted.size,
                )
    return report


def chunk_ranges(size: int, chunk_level: int = CHUNK_LEVEL) -> list[tuple[int, int]]:
    if chunk_level % NODE_STRIDE or not 0 < chunk_level <= CHUNK_LEVEL:
        raise ValueError(f"chunk_level must be a positive multiple of {NODE_STRIDE}")
    step = 1 << chunk_level
    return [(a, min(a + step, size)) for a in range(0, size, step)]


def verify_rows(
    rows: Iterable[Row],
    size: int,
    checkpoints: Sequence[StoredCheckpoint],
    verifier: Verifier,
    *,
    prunes: Mapping[int, PruneRecord] | None = None,
    stored_level: LevelSource | None = None,
    upper_nodes: Mapping[NodeId, bytes] | None = None,
    trusted: Checkpoint | None = None,
    progress: Callable[[int], None] | None = None,
    chunk_level: int = CHUNK_LEVEL,
) -> Report:
    """The whole checklist in one process over rows in seq order (``size`` = max seq + 1)."""
    interesting = {c.size for c in checkpoints}
    if trusted is not None:
        interesting.add(trusted.size)
    it = iter(rows)
    pending: list[Row] = []

    def chunks() -> Iterator[ChunkResult]:
        for a, b in chunk_ranges(size, chunk_level):
            part = list(pending)
            pending.clear()
            for row in it:
                if row[0] >= b:
                    pending.append(row)
                    break
                part.append(row)
            yield check_chunk(part, a, b, interesting, stored_level, chunk_level)

    return verify_log(
        chunks(),
        checkpoints,
        verifier,
        prunes=prunes,
        upper_nodes=upper_nodes,
        trusted=trusted,
        progress=progress,
        chunk_level=chunk_level,
    )


def _node_finding(found: _Findings, level: int, index: int, missing: bool) -> None:
    span = 1 << level
    first, last = index * span, (index + 1) * span - 1
    if missing:
        detail = f"the stored tree node at level {level} over entries {first}..{last} is missing"
    else:
        detail = (
            f"entries {first}..{last} do not hash to the stored tree node at level {level}: "
            "an entry or the node was rewritten"
        )
    found.add(Kind.NODE_MISMATCH, first, detail, end=last + 1)


def _check_checkpoints(
    checkpoints: Sequence[StoredCheckpoint], verifier: Verifier, report: Report, found: _Findings
) -> dict[int, bytes]:
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
    return signed


def _parse_entry(body: bytes) -> tuple[int, str, str, Any] | None:
    try:
        obj = orjson.loads(body)
        seq = obj["ledger"]["seq"]
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
