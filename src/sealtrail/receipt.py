"""Receipts: offline proofs that one event is in the log (c2sp.org/tlog-proof@v1).

A receipt bundles the event's index, its Merkle inclusion proof and the signed checkpoint
the proof leads to::

    c2sp.org/tlog-proof@v1
    index 645
    eTqr8nE8VGEREKQ2MDQeD+zKHTJERE6iNw0tG1G+WbQ=
    ...

    log.example/audit
    646
    kNum4JmdViJPfZLMRB3xPi6flATj2JzJSiF+1pQDzNQ=

    — log.example/audit 8w1amQA0...

With the event's canonical bytes and the log's vkey, anyone can check it with any
tlog-proof implementation; it needs neither our code nor our database.

Decisions the spec leaves open:

* ``extra`` present but empty is rejected: the spec says the line is omitted when there is
  no extra data, so ``extra `` would be a second spelling of "none". Extra data is never
  authenticated and :func:`verify_receipt` ignores it.
* At most 64 proof hashes (the height of a tree of 2**64 leaves); the exact count for the
  index and size is then enforced by the Merkle verifier.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from sealtrail._exceptions import FormatError, ProofError
from sealtrail.checkpoint import MAX_TREE_SIZE, Checkpoint, _parse_uint64, open_checkpoint
from sealtrail.merkle import leaf_hash, verify_inclusion
from sealtrail.note import MAX_NOTE_SIZE, Verifier, b64decode_strict, decode_bounded, parse_note

__all__ = ["MAGIC", "MAX_PROOF_HASHES", "MAX_RECEIPT_SIZE", "Receipt", "verify_receipt"]

#: First line of every receipt: names the format and its version.
MAGIC = "c2sp.org/tlog-proof@v1"

#: A tree of at most 2**64 leaves is at most 64 levels high.
MAX_PROOF_HASHES = 64

#: Upper bound on a whole receipt: the note limit plus generous room for extra data.
MAX_RECEIPT_SIZE = 2 * MAX_NOTE_SIZE

_HASH_SIZE = 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class Receipt:
    """A parsed tlog-proof: entry index, inclusion proof, signed checkpoint note, extra data.

    Construction checks the syntax of every field (including that ``checkpoint`` is a
    well-formed signed checkpoint note) but verifies nothing: that is
    :func:`verify_receipt`'s job.
    """

    index: int
    proof: tuple[bytes, ...]
    checkpoint: str
    extra: bytes | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.index, int)
            or isinstance(self.index, bool)
            or not 0 <= self.index < MAX_TREE_SIZE
        ):
            raise FormatError("receipt index must be an integer in [0, 2**64 - 1)")
        if not isinstance(self.proof, tuple) or len(self.proof) > MAX_PROOF_HASHES:
            raise FormatError(f"receipt proof must be a tuple of at most {MAX_PROOF_HASHES}")
        for node in self.proof:
            if not isinstance(node, bytes) or len(node) != _HASH_SIZE:
                raise FormatError("receipt proof hashes must be 32 bytes each")
        if self.extra is not None and (not isinstance(self.extra, bytes) or not self.extra):
            raise FormatError("receipt extra data must be non-empty bytes or None")
        if not isinstance(self.checkpoint, str):
            raise FormatError("receipt checkpoint must be the signed note text")
        Checkpoint.from_text(parse_note(self.checkpoint).text)

    def to_text(self) -> str:
        """Serialise as a ``c2sp.org/tlog-proof@v1`` file."""
        lines = [MAGIC]
        if self.extra is not None:
            lines.append(f"extra {_b64(self.extra)}")
        lines.append(f"index {self.index}")
        lines.extend(_b64(node) for node in self.proof)
        return "".join(line + "\n" for line in lines) + "\n" + self.checkpoint

    @classmethod
    def from_text(cls, text: str | bytes) -> Receipt:
        """Parse a ``c2sp.org/tlog-proof@v1`` file. Raises :class:`FormatError`."""
        text = decode_bounded(text, MAX_RECEIPT_SIZE, "receipt")
        if len(text) > MAX_RECEIPT_SIZE:
            raise FormatError("receipt too large")
        # Header lines are never empty, so the first blank line ends the header and the
        # checkpoint note (which may contain blank lines of its own) follows verbatim.
        end = text.find("\n\n")
        if end < 0:
            raise FormatError("receipt has no blank line before its checkpoint")
        header, checkpoint = text[:end].split("\n"), text[end + 2 :]
        if header[0] != MAGIC:
            raise FormatError(f"receipt must start with {MAGIC!r}")
        pos = 1
        extra = None
        if pos < len(header) and header[pos].startswith("extra "):
            extra = b64decode_strict(header[pos][len("extra ") :], "receipt extra data")
            if not extra:
                raise FormatError("receipt extra line is present but empty")
            pos += 1
        if pos >= len(header) or not header[pos].startswith("index "):
            raise FormatError("receipt has no index line")
        index = _parse_uint64(header[pos][len("index ") :], "receipt index")
        proof_lines = header[pos + 1 :]
        if len(proof_lines) > MAX_PROOF_HASHES:
            raise FormatError(f"receipt proof has more than {MAX_PROOF_HASHES} hashes")
        proof = tuple(b64decode_strict(line, "receipt proof hash") for line in proof_lines)
        return cls(index=index, proof=proof, checkpoint=checkpoint, extra=extra)


def verify_receipt(
    receipt: Receipt | str | bytes,
    entry: bytes,
    verifier: Verifier,
    *,
    origin: str | None = None,
) -> Checkpoint:
    """Check that ``entry`` (the event's canonical bytes) is in the log ``verifier`` signs.

    Returns the verified :class:`Checkpoint`, so the caller can also check it against a
    checkpoint saved earlier (consistency), which a single receipt cannot prove. ``origin``
    is as for :func:`~sealtrail.checkpoint.open_checkpoint`.

    Every step must pass; there is no partial success. Raises :class:`FormatError`,
    :class:`SignatureError` or :class:`ProofError`.
    """
    # 1. Parse: the receipt, every proof hash and the checkpoint note must be well-formed.
    if not isinstance(receipt, Receipt):
        receipt = Receipt.from_text(receipt)
    if not isinstance(entry, bytes):
        raise FormatError("entry must be the canonical bytes of the event")
    # 2. Open the checkpoint: a valid signature by the trusted log key over a checkpoint
    #    whose origin is that log. Witness and unknown signatures are ignored.
    checkpoint = open_checkpoint(receipt.checkpoint, verifier, origin=origin)
    # 3. The index must name a leaf of the checkpointed tree.
    if receipt.index >= checkpoint.size:
        raise ProofError(
            f"index {receipt.index} is outside the checkpointed tree of size {checkpoint.size}"
        )
    # 4. The entry's RFC 6962 leaf hash, combined with the proof, must give the signed root.
    verify_inclusion(
        leaf_hash(entry), receipt.index, checkpoint.size, receipt.proof, checkpoint.root_hash
    )
    return checkpoint
