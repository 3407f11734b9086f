"""Tests for sealtrail.merkle: known answers, the transparency-dev probes, proofs planned from
stored nodes checked against a naive RFC 6962 implementation, and properties."""

from __future__ import annotations

import base64
import gc
import hashlib
import json
import math
from collections.abc import Iterator
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sealtrail import merkle
from sealtrail._exceptions import FormatError, ProofError
from sealtrail.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    NodeId,
    TreeBuilder,
    assemble,
    consistency_plan,
    fold,
    inclusion_plan,
    leaf_hash,
    node_hash,
    plan_nodes,
    range_nodes,
    root_from_inclusion,
    root_of,
    root_plan,
    verify_consistency,
    verify_inclusion,
)

# Collection needs the probe list before fixtures exist; the tests still read the files
# through the `vectors` fixture, which fails loudly when the directory is missing.
_VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"
_TESTDATA = "transparency-dev-merkle/testdata"


def _probes(kind: str) -> list[str]:
    base = _VECTORS / _TESTDATA / kind
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*.json"))


def _h(s: str) -> bytes:
    return bytes.fromhex(s)


def _b64(s: str | None) -> bytes:
    return b"" if s is None else base64.b64decode(s)


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# ---------------------------------------------------------------------------------------------
# A naive RFC 6962 section 2.1 implementation, written from the spec text, to compare against


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


class Naive:
    """MTH, PATH and PROOF over a fixed list of leaf hashes, recursive as in the RFC."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.leaves = leaves
        self.mth = lru_cache(maxsize=None)(self._mth)

    def _mth(self, lo: int, hi: int) -> bytes:
        n = hi - lo
        if n == 0:
            return _sha(b"")
        if n == 1:
            return self.leaves[lo]
        k = _split(n)
        return _sha(b"\x01" + self.mth(lo, lo + k) + self.mth(lo + k, hi))

    def path(self, m: int, lo: int, hi: int) -> list[bytes]:
        n = hi - lo
        if n == 1:
            return []
        k = _split(n)
        if m < k:
            return [*self.path(m, lo, lo + k), self.mth(lo + k, hi)]
        return [*self.path(m - k, lo + k, hi), self.mth(lo, lo + k)]

    def subproof(self, m: int, lo: int, hi: int, whole: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if whole else [self.mth(lo, hi)]
        k = _split(n)
        if m <= k:
            return [*self.subproof(m, lo, lo + k, whole), self.mth(lo + k, hi)]
        return [*self.subproof(m - k, lo + k, hi, False), self.mth(lo, lo + k)]

    def proof(self, m: int, n: int) -> list[bytes]:
        return [] if m in (0, n) else self.subproof(m, 0, n, True)


def naive_path_ranges(m: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """PATH, but naming each element by the leaf range it hashes; cheap for any size."""
    n = hi - lo
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*naive_path_ranges(m, lo, lo + k), (lo + k, hi)]
    return [*naive_path_ranges(m - k, lo + k, hi), (lo, lo + k)]


def naive_subproof_ranges(m: int, lo: int, hi: int, whole: bool) -> list[tuple[int, int]]:
    n = hi - lo
    if m == n:
        return [] if whole else [(lo, hi)]
    k = _split(n)
    if m <= k:
        return [*naive_subproof_ranges(m, lo, lo + k, whole), (lo + k, hi)]
    return [*naive_subproof_ranges(m - k, lo + k, hi, False), (lo, lo + k)]


def node_range(node: NodeId) -> tuple[int, int]:
    level, index = node
    return index << level, (index + 1) << level


def element_range(element: list[NodeId]) -> tuple[int, int]:
    """The leaf range an element covers; its nodes must tile it left to right."""
    ranges = [node_range(n) for n in element]
    for (_, end), (begin, _) in pairwise(ranges):
        assert end == begin, element
    return ranges[0][0], ranges[-1][1]


def assert_incomplete_only_at_edge(plan: list[list[NodeId]], size: int) -> None:
    """Every named node is complete within `size`; at most one element is a compact range."""
    for element in plan:
        for node in element:
            assert node_range(node)[1] <= size, (node, size)
    assert sum(len(e) > 1 for e in plan) <= 1, plan


def build(leaves: list[bytes]) -> tuple[dict[NodeId, bytes], list[bytes]]:
    """All complete nodes of a tree over `leaves`, and the root after each prefix."""
    tb = TreeBuilder()
    nodes: dict[NodeId, bytes] = {}
    roots = [tb.root()]
    for leaf in leaves:
        for node, h in tb.append(leaf):
            assert node not in nodes
            nodes[node] = h
        roots.append(tb.root())
    return nodes, roots


def leaves_for(n: int, tag: bytes = b"leaf") -> list[bytes]:
    return [leaf_hash(b"%s %d" % (tag, i)) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Known answers (rfc6962_kat.json)


@pytest.fixture(scope="module")
def kat(vectors: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((vectors / "rfc6962_kat.json").read_text())
    return data


def test_kat_empty_leaf_and_node_hashes(kat: dict[str, Any]) -> None:
    assert _h(kat["empty_tree_root"]) == EMPTY_ROOT == root_of([]) == TreeBuilder().root()
    assert fold([]) == EMPTY_ROOT
    for case in kat["leaf_hash_kat"]:
        assert leaf_hash(_h(case["input"])) == _h(case["leaf_hash"])
    for case in kat["node_hash_kat"]:
        assert node_hash(_h(case["left"]), _h(case["right"])) == _h(case["node_hash"])


def test_kat_leaves_and_roots_by_size(kat: dict[str, Any]) -> None:
    hashes = [leaf_hash(_h(x)) for x in kat["leaves"]]
    assert hashes == [_h(x) for x in kat["leaf_hashes"]]
    _, roots = build(hashes)
    for size, want in kat["roots_by_size"].items():
        n = int(size)
        assert root_of(hashes[:n]) == _h(want)
        assert roots[n] == _h(want)


def test_kat_inclusion_proofs(kat: dict[str, Any]) -> None:
    hashes = [_h(x) for x in kat["leaf_hashes"]]
    nodes, _ = build(hashes)
    assert kat["inclusion_proofs"]
    for case in kat["inclusion_proofs"]:
        index, size, proof = case["index"], case["tree_size"], [_h(p) for p in case["proof"]]
        assert _h(case["leaf_hash"]) == hashes[index]
        assert assemble(inclusion_plan(index, size), nodes) == proof
        verify_inclusion(hashes[index], index, size, proof, _h(case["root"]))
        assert root_from_inclusion(hashes[index], index, size, proof) == _h(case["root"])


def test_kat_consistency_proofs(kat: dict[str, Any]) -> None:
    nodes, _ = build([_h(x) for x in kat["leaf_hashes"]])
    assert kat["consistency_proofs"]
    for case in kat["consistency_proofs"]:
        size1, size2, proof = case["size1"], case["size2"], [_h(p) for p in case["proof"]]
        assert assemble(consistency_plan(size1, size2), nodes) == proof
        verify_consistency(size1, size2, proof, _h(case["root1"]), _h(case["root2"]))


def test_kat_roots_of_byte_leaves(kat: dict[str, Any]) -> None:
    table = kat["roots_bytes_0_to_n"]
    biggest = max(int(n) for n in table)
    hashes = [leaf_hash(bytes([i])) for i in range(biggest)]
    _, roots = build(hashes)
    for size, want in table.items():
        n = int(size)
        assert roots[n] == root_of(hashes[:n]) == _h(want), n


# ---------------------------------------------------------------------------------------------
# transparency-dev/merkle probes


def test_probe_files_are_present(vectors: Path) -> None:
    assert len(_probes("inclusion")) + len(_probes("consistency")) == 196


@pytest.mark.parametrize("rel", _probes("inclusion"))
def test_inclusion_probe(vectors: Path, rel: str) -> None:
    probe = json.loads((vectors / _TESTDATA / "inclusion" / rel).read_text())
    leaf, root = _b64(probe["leafHash"]), _b64(probe["root"])
    proof = [_b64(p) for p in probe["proof"] or []]
    index, size = probe["leafIdx"], probe["treeSize"]
    if probe["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(leaf, index, size, proof, root)
    else:
        verify_inclusion(leaf, index, size, proof, root)
        assert root_from_inclusion(leaf, index, size, proof) == root


@pytest.mark.parametrize("rel", _probes("consistency"))
def test_consistency_probe(vectors: Path, rel: str) -> None:
    probe = json.loads((vectors / _TESTDATA / "consistency" / rel).read_text())
    root1, root2 = _b64(probe["root1"]), _b64(probe["root2"])
    proof = [_b64(p) for p in probe["proof"] or []]
    size1, size2 = probe["size1"], probe["size2"]
    if probe["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(size1, size2, proof, root1, root2)
    else:
        verify_consistency(size1, size2, proof, root1, root2)


# ---------------------------------------------------------------------------------------------
# Proof generation from stored nodes, exhaustively for small trees

MAX_SIZE = 70


@pytest.fixture(scope="module")
def small_trees() -> tuple[list[bytes], dict[NodeId, bytes], list[bytes], Naive]:
    leaves = leaves_for(MAX_SIZE)
    nodes, roots = build(leaves)
    return leaves, nodes, roots, Naive(leaves)


def test_builder_matches_reference_roots(small_trees: Any) -> None:
    leaves, nodes, roots, naive = small_trees
    for n in range(MAX_SIZE + 1):
        assert roots[n] == root_of(leaves[:n]) == naive.mth(0, n), n
        assert fold([nodes[x] for x in root_plan(n)]) == roots[n]


def test_every_inclusion_proof_up_to_70(small_trees: Any) -> None:
    leaves, nodes, roots, naive = small_trees
    for size in range(1, MAX_SIZE + 1):
        for index in range(size):
            plan = inclusion_plan(index, size)
            assert_incomplete_only_at_edge(plan, size)
            proof = assemble(plan, nodes)
            assert proof == naive.path(index, 0, size), (index, size)
            verify_inclusion(leaves[index], index, size, proof, roots[size])
            if index + 1 < size:  # the same proof does not vouch for a neighbour
                with pytest.raises(ProofError):
                    verify_inclusion(leaves[index + 1], index, size, proof, roots[size])


def test_every_consistency_proof_up_to_70(small_trees: Any) -> None:
    _, nodes, roots, naive = small_trees
    for size2 in range(MAX_SIZE + 1):
        for size1 in range(size2 + 1):
            plan = consistency_plan(size1, size2)
            assert_incomplete_only_at_edge(plan, size2)
            proof = assemble(plan, nodes)
            assert proof == naive.proof(size1, size2), (size1, size2)
            verify_consistency(size1, size2, proof, roots[size1], roots[size2])
            if 0 < size1 < size2:  # and it proves nothing about another old tree
                with pytest.raises(ProofError):
                    verify_consistency(size1, size2, proof, roots[size1 - 1], roots[size2])


def test_builder_reports_each_node_once_when_completed() -> None:
    tb = TreeBuilder()
    for i, leaf in enumerate(leaves_for(40)):
        completed = tb.append(leaf)
        trailing_ones = (i ^ (i + 1)).bit_length() - 1
        assert [node for node, _ in completed] == [
            (level, i >> level) for level in range(trailing_ones + 1)
        ]
        assert completed[0] == ((0, i), leaf)
        # A node is reported exactly when its last leaf arrives.
        assert all(node_range(node)[1] == i + 1 for node, _ in completed)


def test_append_and_extend_agree() -> None:
    leaves = leaves_for(300)
    one_by_one = TreeBuilder()
    appended = [pair for leaf in leaves for pair in one_by_one.append(leaf)]
    batched = TreeBuilder()
    extended = batched.extend(iter(leaves))  # any iterable, including a generator
    assert appended == extended
    assert one_by_one.root() == batched.root() == root_of(leaves)
    assert one_by_one.size == batched.size == 300
    assert batched.extend([]) == []
    assert batched.size == 300


@given(st.integers(0, 300), st.integers(1, 600), st.sampled_from([1, 2, 4, 8]))
def test_extend_strided_keeps_exactly_the_strided_levels(
    start: int, count: int, stride: int
) -> None:
    leaves = leaves_for(start + count)
    full, strided = TreeBuilder(), TreeBuilder()
    full.extend(leaves[:start])
    strided.extend(leaves[:start])
    expected = [
        (level, index, value)
        for (level, index), value in full.extend(leaves[start:])
        if level and not level % stride
    ]
    assert strided.extend_strided(leaves[start:], stride) == expected
    assert strided.frontier == full.frontier and strided.size == full.size
    with pytest.raises(FormatError):
        strided.extend_strided([leaves[0], b"short"], stride)
    assert strided.frontier == full.frontier and strided.size == full.size  # all or nothing


def test_restored_builder_continues_identically() -> None:
    leaves = leaves_for(130)
    whole = TreeBuilder()
    all_nodes = whole.extend(leaves)
    nodes = dict(all_nodes)
    for cut in range(len(leaves) + 1):
        first = TreeBuilder()
        head = first.extend(leaves[:cut])
        frontier = first.frontier
        assert len(frontier) == cut.bit_count()
        assert frontier == [nodes[x] for x in root_plan(cut)]
        resumed = TreeBuilder(cut, frontier)
        assert resumed.size == cut
        assert resumed.root() == first.root() == root_of(leaves[:cut])
        tail = resumed.extend(leaves[cut:])
        assert head + tail == all_nodes
        assert resumed.root() == whole.root()
        assert resumed.frontier == whole.frontier


def test_frontier_is_a_copy() -> None:
    tb = TreeBuilder()
    tb.extend(leaves_for(3))
    snapshot = tb.frontier
    snapshot.clear()
    assert len(tb.frontier) == 2


# ---------------------------------------------------------------------------------------------
# Plans for big trees: O(log n) stored nodes, same shape as the RFC recursion

BIG = 10**9


@pytest.mark.parametrize(
    "index",
    [0, 1, 2, 12345, 2**29 - 1, 2**29, BIG // 2, 987_654_321, BIG - 3, BIG - 2, BIG - 1],
)
def test_inclusion_plan_is_logarithmic_at_a_billion(index: int) -> None:
    plan = inclusion_plan(index, BIG)
    assert len(plan_nodes(plan)) <= 2 * math.log2(BIG) + 2
    assert len(plan) <= math.ceil(math.log2(BIG))
    assert_incomplete_only_at_edge(plan, BIG)
    assert [element_range(e) for e in plan] == naive_path_ranges(index, 0, BIG)


@pytest.mark.parametrize(
    "size1", [1, 2, 3, 2**20, 2**29, 2**29 + 1, 123_456_789, BIG // 2 + 1, BIG - 2, BIG - 1]
)
def test_consistency_plan_is_logarithmic_at_a_billion(size1: int) -> None:
    plan = consistency_plan(size1, BIG)
    assert len(plan_nodes(plan)) <= 2 * math.log2(BIG) + 2
    assert_incomplete_only_at_edge(plan, BIG)
    assert [element_range(e) for e in plan] == naive_subproof_ranges(size1, 0, BIG, True)


def test_range_and_root_plans() -> None:
    assert range_nodes(0, 0) == []
    assert range_nodes(5, 5) == []
    assert root_plan(0) == []
    assert root_plan(1) == [(0, 0)]
    assert root_plan(7) == [(2, 0), (1, 2), (0, 6)]
    assert root_plan(8) == [(3, 0)]
    assert range_nodes(3, 13) == [(0, 3), (2, 1), (2, 2), (0, 12)]
    assert range_nodes(3, 11) == [(0, 3), (2, 1), (1, 4), (0, 10)]
    assert range_nodes(6, 8) == [(1, 3)]


def test_plan_nodes_and_assemble() -> None:
    plan = [[(0, 1)], [(1, 1)], [(2, 1), (0, 12)]]
    assert plan_nodes(plan) == {(0, 1), (1, 1), (2, 1), (0, 12)}
    a, b, c, d = (bytes([x]) * HASH_SIZE for x in range(4))
    lookup = {(0, 1): a, (1, 1): b, (2, 1): c, (0, 12): d}
    assert assemble(plan, lookup) == [a, b, node_hash(c, d)]
    assert assemble([], {}) == []


# ---------------------------------------------------------------------------------------------
# Properties

sizes = st.integers(min_value=1, max_value=2**48)


@given(st.integers(min_value=0, max_value=2**48), st.integers(min_value=0, max_value=2**20))
def test_range_nodes_tile_with_maximal_aligned_subtrees(begin: int, length: int) -> None:
    end = begin + length
    nodes = range_nodes(begin, end)
    cursor = begin
    for level, index in nodes:
        lo, hi = node_range((level, index))
        assert lo == cursor
        # Maximal: the parent would either be misaligned here or run past the end.
        parent_lo, parent_hi = node_range((level + 1, index >> 1))
        assert parent_lo < begin or parent_hi > end
        cursor = hi
    assert cursor == end
    assert len(nodes) <= 2 * max(1, length.bit_length())


@given(st.data(), sizes)
def test_inclusion_plan_has_the_rfc_shape(data: st.DataObject, size: int) -> None:
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    plan = inclusion_plan(index, size)
    assert_incomplete_only_at_edge(plan, size)
    assert [element_range(e) for e in plan] == naive_path_ranges(index, 0, size)


@given(st.data(), sizes)
def test_consistency_plan_has_the_rfc_shape(data: st.DataObject, size2: int) -> None:
    size1 = data.draw(st.integers(min_value=1, max_value=size2))
    plan = consistency_plan(size1, size2)
    assert_incomplete_only_at_edge(plan, size2)
    assert [element_range(e) for e in plan] == naive_subproof_ranges(size1, 0, size2, True)


@given(st.lists(st.binary(min_size=HASH_SIZE, max_size=HASH_SIZE), max_size=80), st.data())
def test_builder_root_and_resume(leaves: list[bytes], data: st.DataObject) -> None:
    cut = data.draw(st.integers(min_value=0, max_value=len(leaves)))
    first = TreeBuilder()
    head = first.extend(leaves[:cut])
    resumed = TreeBuilder(first.size, first.frontier)
    tail = resumed.extend(leaves[cut:])
    assert resumed.root() == root_of(leaves)
    assert head + tail == TreeBuilder().extend(leaves)


@given(st.integers(min_value=1, max_value=MAX_SIZE), st.data())
def test_tampered_inclusion_proofs_fail(small_trees: Any, size: int, data: st.DataObject) -> None:
    leaves, nodes, roots, _ = small_trees
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    proof = assemble(inclusion_plan(index, size), nodes)
    verify_inclusion(leaves[index], index, size, proof, roots[size])
    if proof:
        k = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
        bit = data.draw(st.integers(min_value=0, max_value=8 * HASH_SIZE - 1))
        bad = bytearray(proof[k])
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ProofError):
            verify_inclusion(
                leaves[index], index, size, [*proof[:k], bytes(bad), *proof[k + 1 :]], roots[size]
            )
        with pytest.raises(ProofError):
            verify_inclusion(leaves[index], index, size, proof[:-1], roots[size])
    with pytest.raises(ProofError):
        verify_inclusion(leaves[index], index, size, [*proof, roots[size]], roots[size])
    other = data.draw(st.integers(min_value=0, max_value=MAX_SIZE))
    if other != size:
        with pytest.raises(ProofError):
            verify_inclusion(leaves[index], index, size, proof, roots[other])


@given(st.integers(min_value=2, max_value=MAX_SIZE), st.data())
def test_tampered_consistency_proofs_fail(
    small_trees: Any, size2: int, data: st.DataObject
) -> None:
    _, nodes, roots, _ = small_trees
    size1 = data.draw(st.integers(min_value=1, max_value=size2 - 1))
    proof = assemble(consistency_plan(size1, size2), nodes)
    verify_consistency(size1, size2, proof, roots[size1], roots[size2])
    k = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=8 * HASH_SIZE - 1))
    bad = bytearray(proof[k])
    bad[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ProofError):
        verify_consistency(
            size1, size2, [*proof[:k], bytes(bad), *proof[k + 1 :]], roots[size1], roots[size2]
        )
    with pytest.raises(ProofError):
        verify_consistency(size1, size2, proof[:-1], roots[size1], roots[size2])
    with pytest.raises(ProofError):
        verify_consistency(size1, size2, [roots[size1], *proof], roots[size1], roots[size2])
    with pytest.raises(ProofError):
        verify_consistency(size1, size2, proof, roots[size2], roots[size1])


# ---------------------------------------------------------------------------------------------
# Bad input

H = bytes(range(HASH_SIZE))


@pytest.mark.parametrize("bad", [b"", b"\x00" * 31, b"\x00" * 33])
def test_hashing_rejects_wrong_lengths(bad: bytes) -> None:
    with pytest.raises(FormatError):
        node_hash(bad, H)
    with pytest.raises(FormatError):
        node_hash(H, bad)
    with pytest.raises(FormatError):
        fold([H, bad])
    with pytest.raises(FormatError):
        root_of([H, bad, H])
    with pytest.raises(FormatError):
        assemble([[(0, 0)]], {(0, 0): bad})
    with pytest.raises(FormatError):
        TreeBuilder(1, [bad])


def test_assemble_names_a_missing_node() -> None:
    with pytest.raises(KeyError, match=r"\(1, 3\)"):
        assemble([[(0, 0)], [(1, 3)]], {(0, 0): H})


@pytest.mark.parametrize(("begin", "end"), [(-1, 3), (5, 3), (0, -1)])
def test_range_nodes_rejects_bad_ranges(begin: int, end: int) -> None:
    with pytest.raises(ValueError):
        range_nodes(begin, end)


@pytest.mark.parametrize(("index", "size"), [(-1, 5), (5, 5), (6, 5), (0, 0), (0, -1)])
def test_inclusion_plan_rejects_bad_positions(index: int, size: int) -> None:
    with pytest.raises(ValueError):
        inclusion_plan(index, size)


@pytest.mark.parametrize(("size1", "size2"), [(3, 2), (-1, 2), (1, 0), (-2, -1)])
def test_consistency_plan_rejects_bad_sizes(size1: int, size2: int) -> None:
    with pytest.raises(ValueError):
        consistency_plan(size1, size2)


def test_consistency_plan_trivial_cases() -> None:
    assert consistency_plan(0, 0) == []
    assert consistency_plan(0, 9) == []
    assert consistency_plan(9, 9) == []


@pytest.mark.parametrize(
    ("leaf", "index", "size", "proof"),
    [
        (H, -1, 4, [H, H]),
        (H, 4, 4, [H, H]),
        (H, 0, 0, []),
        (H, 0, -1, []),
        (H[:31], 0, 1, []),
        (H + b"\x00", 0, 1, []),
        (H, 0, 4, [H]),
        (H, 0, 4, [H, H, H]),
        (H, 0, 4, [H, H[:31]]),
        (H, 0, 1, [H]),
    ],
)
def test_inclusion_rejects_bad_arguments(
    leaf: bytes, index: int, size: int, proof: list[bytes]
) -> None:
    with pytest.raises(ProofError):
        root_from_inclusion(leaf, index, size, proof)
    with pytest.raises(ProofError):
        verify_inclusion(leaf, index, size, proof, H)


def test_inclusion_rejects_a_malformed_root() -> None:
    leaves = leaves_for(1)
    verify_inclusion(leaves[0], 0, 1, [], leaves[0])
    with pytest.raises(ProofError):
        verify_inclusion(leaves[0], 0, 1, [], leaves[0][:31])
    with pytest.raises(ProofError):
        verify_inclusion(leaves[0], 0, 1, [], leaves[0] + b"\x00")


def test_consistency_rejects_bad_arguments() -> None:
    leaves = leaves_for(5)
    nodes, roots = build(leaves)
    proof = assemble(consistency_plan(3, 5), nodes)
    verify_consistency(3, 5, proof, roots[3], roots[5])
    cases: list[tuple[int, int, list[bytes], bytes, bytes]] = [
        (-1, 5, proof, roots[3], roots[5]),
        (5, 3, proof, roots[3], roots[5]),
        (3, 5, proof, roots[3][:31], roots[5]),
        (3, 5, proof, roots[3], roots[5] + b"\x00"),
        (3, 5, [proof[0][:31], *proof[1:]], roots[3], roots[5]),
        (3, 5, [], roots[3], roots[5]),
        (3, 3, [H], roots[3], roots[3]),
        (3, 3, [], roots[3], roots[4]),
        (0, 5, [H], EMPTY_ROOT, roots[5]),
        (0, 5, [], H, roots[5]),
        (0, 5, [], EMPTY_ROOT, roots[5][:31]),
        (0, 0, [], H, H),
        (0, 0, [H], EMPTY_ROOT, EMPTY_ROOT),
    ]
    for size1, size2, bad_proof, root1, root2 in cases:
        with pytest.raises(ProofError):
            verify_consistency(size1, size2, bad_proof, root1, root2)


def test_extra_proof_hashes_are_refused_by_count_not_by_luck() -> None:
    leaves = leaves_for(6)
    nodes, roots = build(leaves)
    incl = assemble(inclusion_plan(2, 6), nodes)
    with pytest.raises(ProofError, match="want 3"):
        verify_inclusion(leaves[2], 2, 6, [*incl, H], roots[6])
    cons = assemble(consistency_plan(3, 6), nodes)
    with pytest.raises(ProofError, match=f"want {len(cons)}"):
        verify_consistency(3, 6, [*cons, H], roots[3], roots[6])


def test_consistency_from_the_empty_tree() -> None:
    verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)
    verify_consistency(0, 7, [], EMPTY_ROOT, root_of(leaves_for(7)))


def test_builder_rejects_bad_state() -> None:
    with pytest.raises(ValueError):
        TreeBuilder(-1)
    with pytest.raises(ValueError):
        TreeBuilder(3, [H])  # size 3 needs two frontier hashes
    with pytest.raises(ValueError):
        TreeBuilder(0, [H])
    with pytest.raises(ValueError):
        TreeBuilder(4, [H, H])


def test_builder_rejects_bad_leaves_without_moving() -> None:
    tb = TreeBuilder()
    tb.extend(leaves_for(5))
    before = (tb.size, tb.frontier, tb.root())
    with pytest.raises(FormatError):
        tb.append(H[:31])
    with pytest.raises(FormatError):
        tb.extend([*leaves_for(6, b"more"), b"short", H])
    assert (tb.size, tb.frontier, tb.root()) == before

    def exploding() -> Iterator[bytes]:
        yield H
        yield H
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        tb.extend(exploding())
    assert (tb.size, tb.frontier, tb.root()) == before


def test_extend_leaves_the_collector_as_it_found_it() -> None:
    assert gc.isenabled()
    TreeBuilder().extend(leaves_for(10))
    assert gc.isenabled()
    with pytest.raises(FormatError):
        TreeBuilder().extend([b"x"])
    assert gc.isenabled()
    gc.disable()
    try:
        TreeBuilder().extend(leaves_for(10))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_append_subtree_rebuilds_any_root_from_a_range_and_its_sides() -> None:
    """Left context (range_nodes(0, b)), the leaves of [b, e), then the right context
    (range_nodes(e, n)) as whole subtrees give the root of n, for every b <= e <= n."""
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(40)]
    complete: dict[tuple[int, int], bytes] = {}
    builder = merkle.TreeBuilder()
    for node, value in builder.extend(leaves):
        complete[node] = value
    for n in range(0, 40):
        root = merkle.root_of(leaves[:n])
        for b in range(n + 1):
            for e in range(b, n + 1):
                left = [complete[x] for x in merkle.range_nodes(0, b)]
                tree = merkle.TreeBuilder(b, left)
                tree.extend(leaves[b:e])
                for level, index in merkle.range_nodes(e, n):
                    tree.append_subtree(level, complete[(level, index)])
                assert tree.size == n and tree.root() == root, (n, b, e)


def test_append_subtree_refuses_a_misaligned_subtree() -> None:
    tree = merkle.TreeBuilder()
    tree.append(merkle.leaf_hash(b"a"))
    with pytest.raises(ProofError):
        tree.append_subtree(1, bytes(32))
    with pytest.raises(ProofError):
        merkle.TreeBuilder().append_subtree(0, b"short")
