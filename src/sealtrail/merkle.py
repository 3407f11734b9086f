"""The RFC 6962 Merkle tree behind every Sealtrail log (invariant I3).

Hashing follows RFC 6962 / RFC 9162 exactly, so that any CT or tlog tool can check our
proofs: ``leaf = SHA-256(0x00 || data)``, ``node = SHA-256(0x01 || left || right)``, and the
empty tree hashes to ``SHA-256("")``. The module is pure: no I/O, nothing but ``hashlib``.

Node addressing
---------------
A node is named ``(level, index)``: the *complete* subtree of ``2**level`` leaves covering
leaves ``[index * 2**level, (index + 1) * 2**level)``. Leaves are ``(0, i)``; ``(1, 3)``
is the hash of leaves 6 and 7; ``(3, 0)`` covers leaves 0..7.

Only complete subtrees get a name because only they are immutable: once its last leaf has
been appended, a node's hash never changes again, so a store can write it once, never update
it, and serve it for every later tree size (append-only, I2). Subtrees that are still
growing (the root of a tree whose size is not a power of two, or the right-hand sibling on a
proof path that contains the newest leaf) are never stored. Their hash is the right-to-left
:func:`fold` of the complete subtrees that tile their range (:func:`range_nodes`); that is
the same thing as RFC 6962's MTH, which splits at the largest power of two below ``n``.

Proofs are built in two steps so that a store answers with one batched read: a *plan* lists,
for each proof element, the stored nodes whose fold is that element
(:func:`inclusion_plan`, :func:`consistency_plan`); the caller reads :func:`plan_nodes` in
one query and :func:`assemble` folds them. At most one element per proof is an incomplete
subtree, so a plan touches O(log n) stored nodes.

Verification (:func:`verify_inclusion`, :func:`verify_consistency`) is strict in the way the
transparency-dev/merkle Go ``proof`` package is: the proof length must be exactly the one the
sizes imply, every hash must be 32 bytes, and anything off raises :class:`ProofError`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeAlias

from sealtrail._exceptions import FormatError, ProofError
from sealtrail._gc import gc_paused

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "NodeId",
    "TreeBuilder",
    "assemble",
    "consistency_plan",
    "fold",
    "inclusion_plan",
    "leaf_hash",
    "node_hash",
    "plan_nodes",
    "range_nodes",
    "root_from_inclusion",
    "root_of",
    "root_plan",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
NodeId: TypeAlias = tuple[int, int]

_sha256 = hashlib.sha256
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

EMPTY_ROOT: bytes = _sha256(b"").digest()


# ---------------------------------------------------------------------------------------------
# Hashing


def leaf_hash(data: bytes) -> bytes:
    """Hash one entry; the 0x00 prefix keeps a leaf from ever passing for an inner node."""
    return _sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash two children; a short or long child would make the 65-byte preimage ambiguous."""
    if len(left) != HASH_SIZE or len(right) != HASH_SIZE:
        raise FormatError(
            f"child hashes must be {HASH_SIZE} bytes, got {len(left)} and {len(right)}"
        )
    return _sha256(_NODE_PREFIX + left + right).digest()


def _check_hashes(hashes: Iterable[bytes], what: str) -> None:
    for h in hashes:
        if len(h) != HASH_SIZE:
            raise FormatError(f"{what} must be {HASH_SIZE} bytes, got {len(h)}")


def _fold(hashes: Sequence[bytes]) -> bytes:
    # Unchecked core of fold(), for callers that validated already.
    if not hashes:
        return EMPTY_ROOT
    sha, prefix = _sha256, _NODE_PREFIX
    acc = hashes[-1]
    for i in range(len(hashes) - 2, -1, -1):
        acc = sha(prefix + hashes[i] + acc).digest()
    return acc


def fold(hashes: Sequence[bytes]) -> bytes:
    """Combine the subtrees of a compact range, smallest (rightmost) first.

    Folding from the right reproduces RFC 6962's split at the largest power of two, so the
    fold of :func:`root_plan` hashes is the tree root and the fold of ``range_nodes(b, n)``
    is the hash of an incomplete right-edge subtree.
    """
    _check_hashes(hashes, "hashes to fold")
    return _fold(hashes)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """Reference tree hash over leaf hashes, independent of :class:`TreeBuilder`.

    Pairs up each level and carries an odd last node up unchanged, which yields the same
    shape as RFC 6962's MTH. Used to cross-check the incremental builder.
    """
    _check_hashes(leaf_hashes, "leaf hashes")
    if not leaf_hashes:
        return EMPTY_ROOT
    sha, prefix = _sha256, _NODE_PREFIX
    level = list(leaf_hashes)
    while len(level) > 1:
        paired = [
            sha(prefix + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


# ---------------------------------------------------------------------------------------------
# Planning: which stored nodes make up a root or a proof


def range_nodes(begin: int, end: int) -> list[NodeId]:
    """Tile ``[begin, end)`` with the fewest aligned complete subtrees, left to right.

    Greedy works because the largest aligned block starting at ``begin`` that fits can
    always be taken; the sizes rise while alignment binds and then fall as the binary digits
    of what remains, so there are at most ``2 * log2(end - begin)`` of them.
    """
    if begin < 0 or end < begin:
        raise ValueError(f"bad range [{begin}, {end})")
    nodes: list[NodeId] = []
    while begin < end:
        level = (end - begin).bit_length() - 1
        if begin:
            align = (begin & -begin).bit_length() - 1
            if align < level:
                level = align
        nodes.append((level, begin >> level))
        begin += 1 << level
    return nodes


def root_plan(size: int) -> list[NodeId]:
    """The complete subtrees whose right-to-left fold is the root of a tree of ``size``."""
    return range_nodes(0, size)


def _path_plan(leaf: int, from_level: int, size: int) -> list[list[NodeId]]:
    # Siblings, bottom-up, of the path from leaf `leaf` to the root of a tree of `size`,
    # starting at level `from_level`. In the RFC 6962 shape a node whose sibling would start
    # past the last leaf has no sibling at that level (it is carried up unchanged), and the
    # one right-hand sibling that holds the last leaf is incomplete: it is a compact range.
    plan: list[list[NodeId]] = []
    last = size - 1
    for level in range(from_level, last.bit_length()):
        sibling = (leaf >> level) ^ 1
        first = sibling << level
        if first > last:
            continue
        if first + (1 << level) <= size:
            plan.append([(level, sibling)])
        else:
            plan.append(range_nodes(first, size))
    return plan


def inclusion_plan(index: int, size: int) -> list[list[NodeId]]:
    """Plan the RFC 6962 audit path for leaf ``index`` in a tree of ``size`` leaves.

    Element ``k`` of the proof is ``fold`` of the hashes of ``plan[k]``. Every node named is
    complete within ``size`` leaves, so nodes stored before later appends stay valid.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not in a tree of size {size}")
    return _path_plan(index, 0, size)


def consistency_plan(size1: int, size2: int) -> list[list[NodeId]]:
    """Plan the RFC 6962 SUBPROOF / RFC 9162 consistency proof from ``size1`` to ``size2``.

    The proof is the largest complete subtree ending at ``size1`` (left out when that
    subtree is the whole old tree, since the verifier already has its root), followed by the
    path from that subtree up to the new root. Empty when there is nothing to prove.
    """
    if size1 < 0 or size2 < size1:
        raise ValueError(f"no consistency proof from size {size1} to size {size2}")
    if size1 == 0 or size1 == size2:
        return []
    shift = (size1 & -size1).bit_length() - 1
    plan: list[list[NodeId]] = []
    if size1 != 1 << shift:
        plan.append([(shift, (size1 - 1) >> shift)])
    plan.extend(_path_plan(size1 - 1, shift, size2))
    return plan


def plan_nodes(plan: list[list[NodeId]]) -> set[NodeId]:
    """Every node a plan reads, so a store can fetch them in one query."""
    return {node for element in plan for node in element}


def assemble(plan: list[list[NodeId]], lookup: Mapping[NodeId, bytes]) -> list[bytes]:
    """Turn a plan and the nodes read for it into proof hashes.

    A node missing from ``lookup`` raises ``KeyError`` naming it; a stored hash of the wrong
    length raises :class:`FormatError` rather than yielding a proof that cannot verify.
    """
    proof: list[bytes] = []
    for element in plan:
        hashes = [lookup[node] for node in element]
        _check_hashes(hashes, "stored node hashes")
        proof.append(hashes[0] if len(hashes) == 1 else _fold(hashes))
    return proof


# ---------------------------------------------------------------------------------------------
# Verification


def _require_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, want {HASH_SIZE}")


def _require_proof_hashes(proof: Sequence[bytes]) -> None:
    for k, h in enumerate(proof):
        if len(h) != HASH_SIZE:
            raise ProofError(f"proof element {k} is {len(h)} bytes, want {HASH_SIZE}")


def _require_equal(calculated: bytes, expected: bytes, what: str) -> None:
    if not hmac.compare_digest(calculated, expected):
        raise ProofError(f"{what} does not match the proof")


def root_from_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root that ``proof`` implies for leaf ``index`` of a tree of ``size``.

    The proof length is fixed by (index, size): below the level where the paths of
    ``index`` and of the last leaf part, every level has a sibling; above it only the levels
    where ``index``'s node is a right child do. Any other length is rejected outright.
    """
    if index < 0 or size <= index:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    _require_hash(leaf_hash, "leaf hash")
    _require_proof_hashes(proof)
    inner = (index ^ (size - 1)).bit_length()
    border = (index >> inner).bit_count()
    if len(proof) != inner + border:
        raise ProofError(f"inclusion proof has {len(proof)} hashes, want {inner + border}")
    sha, prefix = _sha256, _NODE_PREFIX
    h = leaf_hash
    for level in range(inner):
        if (index >> level) & 1:
            h = sha(prefix + proof[level] + h).digest()
        else:
            h = sha(prefix + h + proof[level]).digest()
    for sibling in proof[inner:]:
        h = sha(prefix + sibling + h).digest()
    return h


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that leaf ``index`` of the tree with ``root`` and ``size`` has ``leaf_hash``."""
    _require_hash(root, "root")
    calculated = root_from_inclusion(leaf_hash, index, size, proof)
    _require_equal(calculated, root, "root")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """Check that the tree (``size2``, ``root2``) extends the tree (``size1``, ``root1``).

    One pass over the proof rebuilds both roots from the same hashes: hashes left of the
    old tree's last leaf feed both, hashes right of it only the new one. Both must match,
    which proves the old tree is a prefix of the new one.

    Degenerate cases follow the transparency-dev probes: equal sizes need an empty proof
    and byte-identical roots, whatever their length (a probe accepts equal 12-byte roots at
    size 1), except that at size 0 both must be the empty-tree root; from size 0 any tree
    is consistent with an empty proof, provided root1 really is the empty-tree root.
    """
    if size1 < 0 or size2 < size1:
        raise ProofError(f"no consistency from size {size1} to size {size2}")
    if size1 == size2:
        if proof:
            raise ProofError("sizes are equal but the consistency proof is not empty")
        if size1 == 0:
            _require_equal(root1, EMPTY_ROOT, "root1 of the empty tree")
        _require_equal(root1, root2, "root2")
        return
    _require_hash(root1, "root1")
    _require_hash(root2, "root2")
    if size1 == 0:
        if proof:
            raise ProofError("a consistency proof from the empty tree must be empty")
        _require_equal(root1, EMPTY_ROOT, "root1 of the empty tree")
        return
    _require_proof_hashes(proof)

    last = size1 - 1
    shift = (size1 & -size1).bit_length() - 1  # old tree's last leaf sits in a 2**shift block
    inner = (last ^ (size2 - 1)).bit_length() - shift  # > 0 because size1 < size2
    border = (last >> (inner + shift)).bit_count()
    seeded = size1 == 1 << shift  # the block is the whole old tree: root1 is the seed
    want = inner + border + (0 if seeded else 1)
    if len(proof) != want:
        raise ProofError(f"consistency proof has {len(proof)} hashes, want {want}")

    sha, prefix = _sha256, _NODE_PREFIX
    if seeded:
        seed, rest = root1, proof
    else:
        seed, rest = proof[0], proof[1:]
    h1 = h2 = seed
    mask = last >> shift
    for level in range(inner):
        sibling = rest[level]
        if (mask >> level) & 1:
            h1 = sha(prefix + sibling + h1).digest()
            h2 = sha(prefix + sibling + h2).digest()
        else:
            h2 = sha(prefix + h2 + sibling).digest()
    for sibling in rest[inner:]:
        h1 = sha(prefix + sibling + h1).digest()
        h2 = sha(prefix + sibling + h2).digest()
    _require_equal(h1, root1, "root1")
    _require_equal(h2, root2, "root2")


# ---------------------------------------------------------------------------------------------
# Incremental building


class TreeBuilder:
    """The right edge (compact range) of a tree over leaves [0, size): enough to append and to
    compute the root.

    The ledger keeps one per log, restores it from the stored frontier at start-up, and
    writes every node that :meth:`append` reports as completed, which is all a proof ever
    needs. The frontier holds one hash per set bit of ``size`` (O(log n) memory).
    """

    __slots__ = ("_size", "_stack")

    def __init__(self, size: int = 0, frontier: Sequence[bytes] = ()) -> None:
        if size < 0:
            raise ValueError(f"tree size must be >= 0, got {size}")
        stack = [bytes(h) for h in frontier]
        if len(stack) != size.bit_count():
            raise ValueError(
                f"a tree of size {size} has {size.bit_count()} frontier hashes, got {len(stack)}"
            )
        _check_hashes(stack, "frontier hashes")
        self._size = size
        # Largest subtree first, as root_plan(size) lists them; the top of the stack is the
        # smallest, rightmost subtree, which is the one the next leaf may complete.
        self._stack = stack

    def __repr__(self) -> str:
        return f"TreeBuilder(size={self._size})"

    @property
    def size(self) -> int:
        return self._size

    @property
    def frontier(self) -> list[bytes]:
        """Hashes of ``root_plan(size)``, in that order; persist these to resume later."""
        return list(self._stack)

    def append(self, leaf_hash: bytes) -> list[tuple[NodeId, bytes]]:
        """Add one leaf; return it and every node it completes, bottom-up.

        Leaf ``i`` completes one node per trailing 1-bit of ``i``: each merges the frontier
        subtree of the same level with the subtree just finished.
        """
        if len(leaf_hash) != HASH_SIZE:
            raise FormatError(f"leaf hash must be {HASH_SIZE} bytes, got {len(leaf_hash)}")
        i = self._size
        h = leaf_hash
        completed: list[tuple[NodeId, bytes]] = [((0, i), h)]
        merges = (i ^ (i + 1)).bit_length() - 1
        if merges:
            sha, prefix, pop = _sha256, _NODE_PREFIX, self._stack.pop
            for level in range(1, merges + 1):
                h = sha(prefix + pop() + h).digest()
                completed.append(((level, i >> level), h))
        self._stack.append(h)
        self._size = i + 1
        return completed

    def extend(self, leaf_hashes: Iterable[bytes]) -> list[tuple[NodeId, bytes]]:
        """Add many leaves; the concatenation of what :meth:`append` would return.

        All or nothing: a malformed hash leaves the builder as it was, so it never runs
        ahead of what the caller stores.
        """
        return [((level, index), h) for level, index, h in self._grow(leaf_hashes, 1, True)]

    def extend_strided(
        self, leaf_hashes: Iterable[bytes], stride: int
    ) -> list[tuple[int, int, bytes]]:
        """:meth:`extend`, returning only the interior nodes whose level is a multiple of
        ``stride``, as ``(level, index, hash)``: what a store that keeps every
        ``stride``-th level needs, without a tuple per leaf and per lower node."""
        return self._grow(leaf_hashes, stride, False)

    def _grow(
        self, leaf_hashes: Iterable[bytes], stride: int, leaves: bool
    ) -> list[tuple[int, int, bytes]]:
        """The one loop behind :meth:`extend` and :meth:`extend_strided`.

        The cyclic garbage collector is paused for the batch (and resumed only if this call
        paused it). The loop allocates millions of small acyclic tuples, which trigger
        full collections that walk every object on the heap; on a million-leaf rebuild that
        halves the throughput. Nothing here creates reference cycles, so the pause delays
        no reclamation of ours.
        """
        stack = self._stack
        saved = stack[:]
        start = i = self._size
        kept: list[tuple[int, int, bytes]] = []
        keep, push, pop = kept.append, stack.append, stack.pop
        sha, prefix, size = _sha256, _NODE_PREFIX, HASH_SIZE
        try:
            with gc_paused():
                for h in leaf_hashes:
                    if len(h) != size:
                        raise FormatError(
                            f"leaf hash {i - start} must be {size} bytes, got {len(h)}"
                        )
                    if leaves:
                        keep((0, i, h))
                    j = i
                    level = 0
                    while j & 1:
                        j >>= 1
                        level += 1
                        h = sha(prefix + pop() + h).digest()
                        if not level % stride:
                            keep((level, j, h))
                    push(h)
                    i += 1
        except BaseException:
            stack[:] = saved
            raise
        self._size = i
        return kept

    def append_subtree(self, level: int, subtree_hash: bytes) -> None:
        """Add a complete subtree of ``2**level`` leaves, given only its hash.

        Only where such a subtree can start: ``size`` must be a multiple of ``2**level``.
        Then the frontier's smallest subtrees of equal level are its left siblings, and
        merging works as carrying in binary addition. This is what lets a verifier rebuild a
        root from the leaves of a range plus the O(log n) subtree hashes on either side of it
        (:mod:`sealtrail.bundle`).
        """
        if level < 0 or self._size % (1 << level):
            raise ProofError(
                f"a subtree of 2**{level} leaves cannot start at position {self._size}"
            )
        _require_hash(subtree_hash, "subtree hash")
        h = subtree_hash
        stack, i = self._stack, self._size >> level
        while i & 1:
            h = _sha256(_NODE_PREFIX + stack.pop() + h).digest()
            i >>= 1
        stack.append(h)
        self._size += 1 << level

    def root(self) -> bytes:
        """The current tree head; O(log n) hashes, nothing is cached."""
        return _fold(self._stack)
