"""Receipts (c2sp.org/tlog-proof@v1): a real Rekor v2 entry, our own log, and attacks."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sealtrail import FormatError, ProofError, SignatureError
from sealtrail.checkpoint import MAX_TREE_SIZE, Checkpoint, sign_checkpoint
from sealtrail.merkle import leaf_hash, verify_inclusion
from sealtrail.note import Signer, Verifier
from sealtrail.receipt import MAGIC, MAX_PROOF_HASHES, Receipt, verify_receipt


@pytest.fixture(scope="module")
def rekor(vectors: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        (vectors / "sigstore" / "rekor_v2_staging_inclusion.json").read_text("utf-8")
    )
    return result


@pytest.fixture(scope="module")
def proof_file(vectors: Path) -> bytes:
    return (vectors / "sigstore" / "rekor_v2_staging.tlog-proof").read_bytes()


@pytest.fixture(scope="module")
def entry(rekor: dict[str, Any]) -> bytes:
    return base64.b64decode(rekor["canonicalizedBody"])


@pytest.fixture(scope="module")
def log_key(rekor: dict[str, Any]) -> Verifier:
    origin = rekor["checkpoint"].split("\n", 1)[0]
    return Verifier.from_public_key(origin, base64.b64decode(rekor["logPublicKeySPKI"]))


def flip(data: bytes, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Rekor v2 staging entry


def test_rekor_receipt_verifies(proof_file: bytes, entry: bytes, log_key: Verifier) -> None:
    cp = verify_receipt(proof_file, entry, log_key)
    assert cp.size == 646
    assert cp.origin == "log2025-alpha1.rekor.sigstage.dev"
    assert verify_receipt(proof_file.decode("utf-8"), entry, log_key) == cp
    assert verify_receipt(Receipt.from_text(proof_file), entry, log_key) == cp


def test_rekor_json_inclusion_proof(rekor: dict[str, Any], entry: bytes) -> None:
    p = rekor["inclusionProof"]
    verify_inclusion(
        leaf_hash(entry),
        int(p["logIndex"]),
        int(p["treeSize"]),
        [base64.b64decode(h) for h in p["hashes"]],
        base64.b64decode(p["rootHash"]),
    )


def test_receipt_built_from_json_is_the_proof_file(
    rekor: dict[str, Any], proof_file: bytes
) -> None:
    p = rekor["inclusionProof"]
    receipt = Receipt(
        index=int(p["logIndex"]),
        proof=tuple(base64.b64decode(h) for h in p["hashes"]),
        checkpoint=rekor["checkpoint"],
    )
    assert receipt.to_text().encode("utf-8") == proof_file
    assert Receipt.from_text(proof_file) == receipt


def test_rekor_flipped_entry_bit(proof_file: bytes, entry: bytes, log_key: Verifier) -> None:
    for bit in (0, 7, 8 * len(entry) - 1):
        with pytest.raises(ProofError):
            verify_receipt(proof_file, flip(entry, bit), log_key)
    with pytest.raises(ProofError):
        verify_receipt(proof_file, entry + b" ", log_key)
    with pytest.raises(ProofError):
        verify_receipt(proof_file, b"", log_key)


def test_rekor_flipped_proof_bit(proof_file: bytes, entry: bytes, log_key: Verifier) -> None:
    receipt = Receipt.from_text(proof_file)
    for k in range(len(receipt.proof)):
        proof = list(receipt.proof)
        proof[k] = flip(proof[k], 77)
        with pytest.raises(ProofError):
            verify_receipt(replace(receipt, proof=tuple(proof)), entry, log_key)


def test_rekor_wrong_index(proof_file: bytes, entry: bytes, log_key: Verifier) -> None:
    receipt = Receipt.from_text(proof_file)
    for index in (0, 644, 646, 647, 645 ^ 2, MAX_TREE_SIZE - 1):
        with pytest.raises(ProofError):
            verify_receipt(replace(receipt, index=index), entry, log_key)


def test_rekor_truncated_or_extended_proof(
    proof_file: bytes, entry: bytes, log_key: Verifier
) -> None:
    receipt = Receipt.from_text(proof_file)
    for proof in (receipt.proof[:-1], (*receipt.proof, bytes(32)), (), receipt.proof[::-1]):
        with pytest.raises(ProofError):
            verify_receipt(replace(receipt, proof=proof), entry, log_key)


def test_rekor_flipped_checkpoint_root(proof_file: bytes, entry: bytes, log_key: Verifier) -> None:
    receipt = Receipt.from_text(proof_file)
    root_b64 = receipt.checkpoint.split("\n")[2]
    other = base64.b64encode(flip(base64.b64decode(root_b64), 3)).decode()
    tampered = replace(receipt, checkpoint=receipt.checkpoint.replace(root_b64, other))
    with pytest.raises(SignatureError):
        verify_receipt(tampered, entry, log_key)


def test_rekor_flipped_checkpoint_size(proof_file: bytes, entry: bytes, log_key: Verifier) -> None:
    # A larger size would make index 645 look like a mid-tree leaf: the signature stops it.
    receipt = Receipt.from_text(proof_file)
    tampered = replace(receipt, checkpoint=receipt.checkpoint.replace("\n646\n", "\n647\n"))
    with pytest.raises(SignatureError):
        verify_receipt(tampered, entry, log_key)


def test_rekor_flipped_signature_bit(proof_file: bytes, entry: bytes, log_key: Verifier) -> None:
    receipt = Receipt.from_text(proof_file)
    head, sig_b64 = receipt.checkpoint.rstrip("\n").rsplit(" ", 1)
    raw = base64.b64decode(sig_b64)
    for bit in (40, 8 * len(raw) - 1):  # inside the signature, not the key id
        bad = base64.b64encode(flip(raw, bit)).decode()
        tampered = replace(receipt, checkpoint=f"{head} {bad}\n")
        with pytest.raises(SignatureError):
            verify_receipt(tampered, entry, log_key)


def test_rekor_wrong_key(proof_file: bytes, entry: bytes, log_key: Verifier) -> None:
    impostor = Signer.generate(log_key.name).verifier()
    with pytest.raises(SignatureError):
        verify_receipt(proof_file, entry, impostor)
    renamed = Verifier.from_public_key("log2025-alpha2.rekor.sigstage.dev", log_key.public_key)
    with pytest.raises(SignatureError):
        verify_receipt(proof_file, entry, renamed)


def test_rekor_receipt_with_forged_checkpoint(
    proof_file: bytes, entry: bytes, log_key: Verifier
) -> None:
    # Someone re-signs the real tree head with their own key under the log's name.
    receipt = Receipt.from_text(proof_file)
    impostor = Signer.generate(log_key.name)
    cp = Checkpoint.from_text(receipt.checkpoint.split("\n\n")[0] + "\n")
    forged = replace(receipt, checkpoint=sign_checkpoint(cp, impostor))
    assert verify_receipt(forged, entry, impostor.verifier()) == cp  # the impostor's view
    with pytest.raises(SignatureError):
        verify_receipt(forged, entry, log_key)


# ---------------------------------------------------------------------------------------------
# Our own log, hashed by hand (independently of sealtrail.merkle)


def node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def lh(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


ENTRIES = [b'{"id":"a"}', b'{"id":"b"}', b'{"id":"c"}']


@pytest.fixture(scope="module")
def log() -> Signer:
    return Signer.generate("audit.example/tenant-1")


def receipts(log: Signer) -> list[Receipt]:
    a, b, c = (lh(e) for e in ENTRIES)
    root = node(node(a, b), c)
    note = sign_checkpoint(Checkpoint(log.name, 3, root), log)
    return [
        Receipt(0, (b, c), note),
        Receipt(1, (a, c), note, extra=b"context"),
        Receipt(2, (node(a, b),), note),
    ]


def test_own_log_receipts_verify(log: Signer) -> None:
    for receipt, entry in zip(receipts(log), ENTRIES, strict=True):
        cp = verify_receipt(receipt.to_text(), entry, log.verifier())
        assert cp.size == 3
        with pytest.raises(ProofError):  # each receipt proves its own entry only
            verify_receipt(receipt, ENTRIES[(receipt.index + 1) % 3], log.verifier())


def test_single_entry_log_has_empty_proof(log: Signer) -> None:
    note = sign_checkpoint(Checkpoint(log.name, 1, lh(b"only")), log)
    receipt = Receipt(0, (), note)
    assert receipt.to_text() == f"{MAGIC}\nindex 0\n\n{note}"
    verify_receipt(receipt.to_text(), b"only", log.verifier())


def test_extra_data_is_not_authenticated(log: Signer) -> None:
    receipt = receipts(log)[1]
    assert receipt.to_text().startswith(f"{MAGIC}\nextra Y29udGV4dA==\nindex 1\n")
    changed = replace(receipt, extra=b"something else")
    verify_receipt(changed, ENTRIES[1], log.verifier())


def test_receipt_with_witness_cosignature(log: Signer) -> None:
    witness = Signer.generate("witness.example")
    receipt = receipts(log)[0]
    cosigned = (
        receipt.checkpoint
        + "\u2014 witness.example "
        + base64.b64encode(
            witness.key_id + witness.sign(receipt.checkpoint.split("\n\n")[0].encode() + b"\n")
        ).decode()
        + "\n"
    )
    verify_receipt(replace(receipt, checkpoint=cosigned), ENTRIES[0], log.verifier())


def test_entry_must_be_bytes(log: Signer) -> None:
    with pytest.raises(FormatError):
        verify_receipt(receipts(log)[0], ENTRIES[0].decode(), log.verifier())  # type: ignore[arg-type]


@given(
    index=st.integers(min_value=0, max_value=MAX_TREE_SIZE - 1),
    proof=st.lists(st.binary(min_size=32, max_size=32), max_size=MAX_PROOF_HASHES),
    extra=st.none() | st.binary(min_size=1, max_size=64),
)
def test_text_round_trip(index: int, proof: list[bytes], extra: bytes | None) -> None:
    receipt = Receipt(index, tuple(proof), CHECKPOINT, extra)
    text = receipt.to_text()
    assert Receipt.from_text(text) == receipt
    assert Receipt.from_text(text.encode("utf-8")) == receipt


# ---------------------------------------------------------------------------------------------
# Malformed receipts

_KEY = Signer.from_skey(
    "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
)
CHECKPOINT = sign_checkpoint(Checkpoint("PeterNeumann", 5, bytes(32)), _KEY)
H = base64.b64encode(bytes(range(32))).decode()
H33 = base64.b64encode(bytes(range(33))).decode()


def good(header: str = f"index 4\n{H}\n") -> str:
    return f"{MAGIC}\n{header}\n{CHECKPOINT}"


def test_good_helper_parses() -> None:
    assert Receipt.from_text(good()) == Receipt(4, (bytes(range(32)),), CHECKPOINT)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(good().replace(MAGIC, "c2sp.org/tlog-proof@v2"), id="wrong-version"),
        pytest.param(good().replace(MAGIC + "\n", ""), id="missing-magic"),
        pytest.param(" " + good(), id="leading-space"),
        pytest.param(good(f"{H}\n"), id="missing-index"),
        pytest.param(good(f"{H}\nindex 4\n"), id="index-after-proof"),
        pytest.param(good(f"index 007\n{H}\n"), id="index-leading-zeros"),
        pytest.param(good(f"index +5\n{H}\n"), id="index-plus-sign"),
        pytest.param(good(f"index -1\n{H}\n"), id="index-negative"),
        pytest.param(good(f"index  4\n{H}\n"), id="index-double-space"),
        pytest.param(good(f"index 4 \n{H}\n"), id="index-trailing-space"),
        pytest.param(good(f"index\t4\n{H}\n"), id="index-tab"),
        pytest.param(good(f"index {2**64}\n{H}\n"), id="huge-index"),
        pytest.param(good(f"index {2**64 - 1}\n{H}\n"), id="index-cannot-be-in-any-tree"),
        pytest.param(good(f"index {'9' * 5000}\n{H}\n"), id="giant-index"),
        pytest.param(good(f"index 4\n{H[:-4]}\n"), id="short-proof-hash"),
        pytest.param(good(f"index 4\n{H33}\n"), id="long-proof-hash"),
        pytest.param(good(f"index 4\n{H.replace('A', '!')}\n"), id="bad-base64"),
        pytest.param(good(f"index 4\n{H[:-2]}9=\n"), id="non-canonical-base64"),
        pytest.param(good("index 4\n" + f"{H}\n" * 65), id="too-many-proof-hashes"),
        pytest.param(good(f"extra \nindex 4\n{H}\n"), id="empty-extra"),
        pytest.param(good(f"extra !!\nindex 4\n{H}\n"), id="bad-extra"),
        pytest.param(good(f"index 4\nextra AA==\n{H}\n"), id="extra-after-index"),
        pytest.param(good().replace("\n\n", "\n", 1), id="missing-blank-line"),
        pytest.param(good().replace("\n", "\r\n"), id="crlf"),
        pytest.param(good() + "trailing", id="trailing-garbage"),
        pytest.param(good() + "\n", id="trailing-blank-line"),
        pytest.param(f"{MAGIC}\nindex 4\n{H}\n\n", id="missing-checkpoint"),
        pytest.param(good().split("\n\n")[0] + "\n\nnot a note\n", id="checkpoint-not-a-note"),
        pytest.param(good().replace("\n5\n", "\n05\n", 1), id="checkpoint-non-canonical-size"),
        pytest.param("", id="empty"),
    ],
)
def test_malformed(text: str) -> None:
    with pytest.raises(FormatError):
        Receipt.from_text(text)


def test_malformed_bytes() -> None:
    with pytest.raises(FormatError):
        Receipt.from_text(b"\xff" + good().encode())
    with pytest.raises(FormatError):
        Receipt.from_text(b"a" * (3 << 20))
    with pytest.raises(FormatError):
        verify_receipt(b"\xff", b"", _KEY.verifier())


def test_constructor_rejects_bad_fields() -> None:
    args: tuple[Any, ...]
    for args in (
        (-1, (), CHECKPOINT),
        (True, (), CHECKPOINT),
        (MAX_TREE_SIZE, (), CHECKPOINT),
        (0, (bytes(31),), CHECKPOINT),
        (0, [bytes(32)], CHECKPOINT),
        (0, (bytes(32),) * 65, CHECKPOINT),
        (0, (), "not a note"),
        (0, (), CHECKPOINT.encode()),
        (0, (), CHECKPOINT, b""),
    ):
        with pytest.raises(FormatError):
            Receipt(*args)


def test_index_beyond_signed_size() -> None:
    receipt = Receipt(5, (), CHECKPOINT)
    with pytest.raises(ProofError, match="outside"):
        verify_receipt(receipt, b"x", _KEY.verifier())
