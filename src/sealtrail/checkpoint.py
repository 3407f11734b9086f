"""C2SP transparency-log checkpoints (c2sp.org/tlog-checkpoint).

A checkpoint is the signed statement "my tree of ``size`` leaves has root ``root_hash``",
published as the text of a signed note::

    example.com/log42
    20852163
    CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=

The parser is strict (one spelling per checkpoint) because checkpoints are compared,
stored and gossiped: two texts that mean the same tree head must be the same bytes, or
"the log signed two different checkpoints of one size" stops being a reliable alarm.

Decisions:

* The size is an unsigned 64-bit integer (as in RFC 6962 and every Go implementation);
  larger values are a :class:`FormatError`, never a huge Python int to compute with.
* :func:`open_checkpoint` requires the origin line to equal the name of the key that
  signed it (the spec's SHOULD, made a MUST for Sealtrail): otherwise a key trusted for one
  log could vouch for a tree head that names another. A mismatch is a
  :class:`SignatureError`, since the note is well-formed but not signed by the log it names.
  Logs whose origin legitimately differs from their key name (Go's checksum database:
  origin ``go.sum database tree``, key ``sum.golang.org``) pass ``origin=`` explicitly.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from sealtrail._exceptions import FormatError, SignatureError
from sealtrail.note import (
    Signer,
    Verifier,
    b64decode_strict,
    open_note,
    sign_note,
    validate_note_text,
)

__all__ = ["MAX_TREE_SIZE", "Checkpoint", "open_checkpoint", "sign_checkpoint"]

#: Largest representable tree size: sizes are uint64 on the wire in every implementation.
MAX_TREE_SIZE = (1 << 64) - 1

_HASH_SIZE = 32
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}", re.ASCII)


def _parse_uint64(text: str, what: str) -> int:
    """Parse an ASCII decimal with no sign, spaces or leading zeros, at most 2**64 - 1.

    ``int()`` alone would accept ``+5``, `` 5``, ``5_000`` and non-ASCII digits, each a
    second spelling of the same number; the length cap also keeps ``int()`` from ever
    seeing a megabyte of digits.
    """
    if _DECIMAL.fullmatch(text) is None:
        raise FormatError(f"{what} must be a decimal number without sign or leading zeros")
    value = int(text)
    if value > MAX_TREE_SIZE:
        raise FormatError(f"{what} does not fit in 64 bits")
    return value


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: origin (log identity), size, RFC 6962 root hash, extension lines.

    Constructing one validates every field, so any ``Checkpoint`` can be serialised and
    parsed back unchanged.
    """

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not self.origin or "\n" in self.origin:
            raise FormatError("checkpoint origin must be one non-empty line")
        if (
            not isinstance(self.size, int)
            or isinstance(self.size, bool)
            or not 0 <= self.size <= MAX_TREE_SIZE
        ):
            raise FormatError("checkpoint size must be an integer in [0, 2**64)")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != _HASH_SIZE:
            raise FormatError("checkpoint root hash must be 32 bytes")
        if not isinstance(self.extensions, tuple):
            raise FormatError("checkpoint extensions must be a tuple of lines")
        for line in self.extensions:
            if not isinstance(line, str) or not line or "\n" in line:
                raise FormatError("checkpoint extension lines must be non-empty single lines")
        # Everything ends up in a signed note, so the note's character rules apply too.
        validate_note_text(self.to_text())

    def to_text(self) -> str:
        """The note text: origin, size, base64 root, extension lines, each ending in LF."""
        lines = [
            self.origin,
            str(self.size),
            base64.b64encode(self.root_hash).decode("ascii"),
            *self.extensions,
        ]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse a checkpoint note text (the part above the blank line).

        Raises :class:`FormatError` unless the text has at least three non-empty lines, a
        canonical decimal size and a canonical base64 32-byte root.
        """
        if not isinstance(text, str):
            raise FormatError("checkpoint text must be a string")
        validate_note_text(text)
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise FormatError("checkpoint needs origin, size and root hash lines")
        if any(not line for line in lines):
            raise FormatError("checkpoint lines must be non-empty")
        origin, size_text, root_text, *extensions = lines
        root = b64decode_strict(root_text, "checkpoint root hash")
        if len(root) != _HASH_SIZE:
            raise FormatError("checkpoint root hash must be 32 bytes")
        return cls(
            origin=origin,
            size=_parse_uint64(size_text, "checkpoint size"),
            root_hash=root,
            extensions=tuple(extensions),
        )


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> str:
    """Sign ``checkpoint`` and return the whole signed note.

    The signer's key name must equal the origin, so that what we publish always passes
    :func:`open_checkpoint`; a mismatch is a :class:`FormatError`.
    """
    if signer.name != checkpoint.origin:
        raise FormatError(
            f"signer name {signer.name!r} differs from checkpoint origin {checkpoint.origin!r}"
        )
    return sign_note(checkpoint.to_text(), signer)


def open_checkpoint(
    note: str | bytes, verifier: Verifier, *, origin: str | None = None
) -> Checkpoint:
    """Verify a signed checkpoint against the log's key and return it.

    ``origin`` is the origin line the log is known to use; it defaults to the key name,
    which is what Sealtrail logs (and most C2SP logs) use. Other signatures on the note,
    such as witness cosignatures, are ignored here.

    Raises :class:`FormatError` (malformed note or checkpoint) or :class:`SignatureError`
    (no valid signature by ``verifier``, or the checkpoint names another log).
    """
    expected_origin = verifier.name if origin is None else origin
    parsed, _ = open_note(note, [verifier])
    checkpoint = Checkpoint.from_text(parsed.text)
    if checkpoint.origin != expected_origin:
        raise SignatureError(
            f"checkpoint origin {checkpoint.origin!r} is not the expected {expected_origin!r}"
        )
    return checkpoint
