"""Checkpoints: real tree heads from sum.golang.org and Rekor, our own, and malformed ones."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sealtrail import FormatError, SignatureError
from sealtrail.checkpoint import MAX_TREE_SIZE, Checkpoint, open_checkpoint, sign_checkpoint
from sealtrail.merkle import leaf_hash
from sealtrail.note import Signer, Verifier, parse_note, sign_note

ROOT = bytes(range(32))
ROOT_B64 = base64.b64encode(ROOT).decode("ascii")


@pytest.fixture(scope="module")
def notes(vectors: Path) -> list[dict[str, Any]]:
    data = json.loads((vectors / "signed-note" / "signed_note_vectors.json").read_text("utf-8"))
    result: list[dict[str, Any]] = data["vectors"]
    return result


@pytest.fixture(scope="module")
def rekor(vectors: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        (vectors / "sigstore" / "rekor_v2_staging_inclusion.json").read_text("utf-8")
    )
    return result


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate("audit.example/log1")


# ---------------------------------------------------------------------------------------------
# Real checkpoints


def test_sumdb_checkpoint(notes: list[dict[str, Any]]) -> None:
    sumdb = notes[2]
    verifier = Verifier.from_vkey(sumdb["vkey"])
    cp = open_checkpoint(sumdb["checkpoint"], verifier, origin="go.sum database tree")
    assert cp.origin == "go.sum database tree"
    assert cp.size == 6476701
    assert cp.root_hash == base64.b64decode("mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=")
    assert cp.extensions == ()
    assert cp.to_text() == parse_note(sumdb["checkpoint"]).text


def test_sumdb_checkpoint_with_witness_cosignatures(notes: list[dict[str, Any]]) -> None:
    sumdb = notes[2]
    extras = sumdb["extra_signers_over_same_body"]
    note = sumdb["checkpoint"] + "".join(e["sig_line"] + "\n" for e in extras)
    for e in extras:
        assert Verifier.from_vkey(e["vkey"]).vkey() == e["vkey"]
    # The log key checks the checkpoint; the witness lines are unknown to it and ignored.
    cp = open_checkpoint(note, Verifier.from_vkey(sumdb["vkey"]), origin="go.sum database tree")
    assert cp.size == 6476701


def test_origin_defaults_to_key_name(notes: list[dict[str, Any]]) -> None:
    # sum.golang.org's origin is not its key name, so without origin= it is refused.
    sumdb = notes[2]
    with pytest.raises(SignatureError, match="origin"):
        open_checkpoint(sumdb["checkpoint"], Verifier.from_vkey(sumdb["vkey"]))


def test_go_tree_note_and_record_hash(notes: list[dict[str, Any]]) -> None:
    vector = notes[3]
    record_hash = base64.b64decode(vector["record_hash_b64"])
    assert leaf_hash(vector["record"].encode("utf-8")) == record_hash
    cp = Checkpoint.from_text(vector["tree_note_text"])
    assert cp == Checkpoint("go.sum database tree", 123456789012, record_hash)
    assert cp.to_text() == vector["tree_note_text"]


def test_rekor_v2_checkpoint(rekor: dict[str, Any]) -> None:
    origin = rekor["checkpoint"].split("\n", 1)[0]
    verifier = Verifier.from_public_key(origin, base64.b64decode(rekor["logPublicKeySPKI"]))
    # Rekor's logId is the untruncated key hash; the note key id is its first 4 bytes.
    assert verifier.key_id == base64.b64decode(rekor["logId"])[:4]
    cp = open_checkpoint(rekor["checkpoint"], verifier)
    assert cp.origin == origin == "log2025-alpha1.rekor.sigstage.dev"
    assert cp.size == 646
    assert cp.root_hash == base64.b64decode(rekor["inclusionProof"]["rootHash"])


# ---------------------------------------------------------------------------------------------
# Our own checkpoints


def test_sign_and_open(signer: Signer) -> None:
    cp = Checkpoint(signer.name, 42, ROOT, ("ext one", "ext-two"))
    note = sign_checkpoint(cp, signer)
    assert note.startswith(f"{signer.name}\n42\n{ROOT_B64}\next one\next-two\n\n\u2014 ")
    assert open_checkpoint(note, signer.verifier()) == cp
    assert open_checkpoint(note.encode("utf-8"), signer.verifier()) == cp


def test_empty_tree(signer: Signer) -> None:
    cp = Checkpoint(signer.name, 0, ROOT)
    assert Checkpoint.from_text(cp.to_text()) == cp
    assert cp.to_text().split("\n")[1] == "0"


def test_largest_size(signer: Signer) -> None:
    cp = Checkpoint(signer.name, MAX_TREE_SIZE, ROOT)
    assert Checkpoint.from_text(cp.to_text()).size == 2**64 - 1


@given(
    origin=st.text(st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=30),
    size=st.integers(min_value=0, max_value=MAX_TREE_SIZE),
    root=st.binary(min_size=32, max_size=32),
    extensions=st.lists(
        st.text(st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=20),
        max_size=3,
    ),
)
def test_text_round_trip(origin: str, size: int, root: bytes, extensions: list[str]) -> None:
    cp = Checkpoint(origin, size, root, tuple(extensions))
    assert Checkpoint.from_text(cp.to_text()) == cp


# ---------------------------------------------------------------------------------------------
# Attacks and malformed input


def text(size: str = "5", root: str = ROOT_B64, origin: str = "log.example", *ext: str) -> str:
    return "".join(line + "\n" for line in (origin, size, root, *ext))


def test_well_formed_helper_parses() -> None:
    assert Checkpoint.from_text(text()) == Checkpoint("log.example", 5, ROOT)


@pytest.mark.parametrize(
    "size",
    [
        "007",
        "00",
        "+5",
        "-1",
        " 5",
        "5 ",
        "5_000",
        "0x10",
        "1e3",
        "",
        "\u0665",
        "５",
        str(2**64),
        "9" * 4400,
    ],
)
def test_non_canonical_or_huge_size(size: str) -> None:
    with pytest.raises(FormatError):
        Checkpoint.from_text(text(size=size))


@pytest.mark.parametrize(
    "root",
    [
        ROOT_B64.rstrip("="),  # missing padding
        base64.b64encode(ROOT[:31]).decode(),  # short hash
        base64.b64encode(ROOT + b"\x00").decode(),  # long hash
        ROOT_B64[:-2] + "9=",  # non-zero padding bits: same bytes, other spelling
        ROOT_B64.replace("A", "-"),  # URL-safe alphabet
        ROOT_B64.encode().hex(),
    ],
)
def test_bad_root_hash(root: str) -> None:
    with pytest.raises(FormatError):
        Checkpoint.from_text(text(root=root))


def test_missing_lines_and_empty_lines() -> None:
    for bad in (
        "log.example\n5\n",
        "log.example\n5",
        text()[:-1],  # no final newline
        text() + "\n",  # empty extension line
        text("5", ROOT_B64, "log.example", "ext", ""),
        "\n5\n" + ROOT_B64 + "\n",  # empty origin
        text().replace("\n", "\r\n"),
        text(origin="log\x00.example"),
        "",
    ):
        with pytest.raises(FormatError):
            Checkpoint.from_text(bad)


def test_constructor_rejects_bad_fields() -> None:
    for kwargs in (
        {"origin": "", "size": 1, "root_hash": ROOT},
        {"origin": "a\nb", "size": 1, "root_hash": ROOT},
        {"origin": "a\rb", "size": 1, "root_hash": ROOT},
        {"origin": "a", "size": -1, "root_hash": ROOT},
        {"origin": "a", "size": 2**64, "root_hash": ROOT},
        {"origin": "a", "size": True, "root_hash": ROOT},
        {"origin": "a", "size": 1, "root_hash": ROOT[:31]},
        {"origin": "a", "size": 1, "root_hash": ROOT, "extensions": ("",)},
        {"origin": "a", "size": 1, "root_hash": ROOT, "extensions": ("x\ny",)},
        {"origin": "a", "size": 1, "root_hash": ROOT, "extensions": ["x"]},
    ):
        with pytest.raises(FormatError):
            Checkpoint(**kwargs)  # type: ignore[arg-type]


def test_wrong_key(signer: Signer) -> None:
    note = sign_checkpoint(Checkpoint(signer.name, 3, ROOT), signer)
    impostor = Signer.generate(signer.name)
    with pytest.raises(SignatureError):
        open_checkpoint(note, impostor.verifier())


def test_tampered_size_or_root(signer: Signer) -> None:
    note = sign_checkpoint(Checkpoint(signer.name, 3, ROOT), signer)
    with pytest.raises(SignatureError):
        open_checkpoint(note.replace("\n3\n", "\n4\n", 1), signer.verifier())
    other_root = base64.b64encode(bytes(32)).decode()
    with pytest.raises(SignatureError):
        open_checkpoint(note.replace(ROOT_B64, other_root), signer.verifier())


def test_origin_not_the_signer(signer: Signer) -> None:
    # A key trusted for one log signs a tree head naming another log: refused.
    other_log = Checkpoint("other.example/log", 3, ROOT)
    note = sign_note(other_log.to_text(), signer)
    with pytest.raises(SignatureError, match="origin"):
        open_checkpoint(note, signer.verifier())
    with pytest.raises(FormatError, match="origin"):
        sign_checkpoint(other_log, signer)


def test_valid_note_that_is_not_a_checkpoint(signer: Signer) -> None:
    with pytest.raises(FormatError):
        open_checkpoint(sign_note(f"{signer.name}\nnot a size\n", signer), signer.verifier())
