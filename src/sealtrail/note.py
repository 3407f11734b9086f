"""C2SP signed notes (c2sp.org/signed-note) with Ed25519 keys.

A signed note is a UTF-8 text ending in a newline, a blank line, and one or more signature
lines ``— <key name> base64(key id || signature)``. Sealtrail publishes its tree heads in
this format so that anyone holding the log's ``vkey`` can check them with any conforming
tool (Go's ``golang.org/x/mod/sumdb/note``, transparency-dev, sigstore), without our code.

This module is pure: it turns strings into values and back and checks signatures; it never
reads a file or the network. Only the Ed25519 signature type (``0x01``) is implemented: the
spec asks implementations to support only the types their design needs, and every extra
algorithm is attack surface.

Decisions the spec leaves open, made here on the strict side because a note is evidence:

* **Key names** must be non-empty, contain no ``+`` and no Unicode space (the spec's rule),
  and additionally no "other" code point at all (controls, format characters such as bidi
  overrides or zero-width joiners, surrogates, private-use, unassigned). Such characters
  would let two different names look identical to the human who configures trust.
* **Base64** must be canonical (standard alphabet, correct padding, zero padding bits):
  otherwise one signature line would have several spellings, and notes that differ as
  bytes would verify as "the same".
* **At most** :data:`MAX_SIGNATURES` signature lines (the spec requires accepting at least
  16) and :data:`MAX_NOTE_SIZE` bytes, so that a hostile note cannot make us hash or verify
  without bound.
* **Duplicate signatures**: a note may carry at most one line per (key name, key id). Go's
  implementation silently keeps the first and ignores the rest; a second line for the same
  key is never produced by an honest signer, and accepting it would let two verifiers that
  pick different lines disagree about the same note, so :func:`parse_note` rejects it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_der_public_key,
)

from sealtrail._exceptions import FormatError, SignatureError

__all__ = [
    "ED25519_TYPE",
    "MAX_NOTE_SIZE",
    "MAX_SIGNATURES",
    "Note",
    "NoteSignature",
    "Signer",
    "Verifier",
    "b64decode_strict",
    "format_note",
    "key_id",
    "open_note",
    "parse_note",
    "sign_note",
    "validate_key_name",
    "validate_note_text",
]

#: Signature type identifier byte assigned to Ed25519 by the signed-note spec.
ED25519_TYPE = 0x01

#: Upper bound on signature lines in one note. The spec requires at least 16; Go uses 100,
#: which leaves room for many witness cosignatures.
MAX_SIGNATURES = 100

#: Upper bound on the size of a whole note in UTF-8 bytes. Checkpoints are a few hundred
#: bytes; this leaves room for 100 post-quantum signatures (about 5 kB each) and a large text.
MAX_NOTE_SIZE = 1 << 20

_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")
_SIG_PREFIX = "\u2014 "  # em dash, space
_SKEY_PREFIX = "PRIVATE+KEY+"
_ED25519_KEY_SIZE = 32
_ED25519_SIG_SIZE = 64
_KEY_ID_SIZE = 4


def b64decode_strict(text: str, what: str) -> bytes:
    """Decode standard base64 (RFC 4648 section 4), accepting only the canonical spelling.

    Python's decoder tolerates non-zero padding bits, so two strings can decode to the same
    bytes; re-encoding and comparing closes that door. ``what`` names the field in the error.
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise FormatError(f"{what}: not valid base64") from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise FormatError(f"{what}: non-canonical base64")
    return raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def validate_key_name(name: str) -> None:
    """Raise :class:`FormatError` unless ``name`` is an acceptable signed-note key name.

    The spec forbids empty names, ``+`` (the vkey field separator) and Unicode spaces (the
    signature line field separator). We also refuse every code point in Unicode category
    "C" (controls, format characters, surrogates, private use, unassigned) because a name
    is how a human decides which key to trust, and invisible characters defeat that.
    """
    if not isinstance(name, str) or not name:
        raise FormatError("key name must be a non-empty string")
    for ch in name:
        if ch == "+" or ch.isspace():
            raise FormatError(f"key name {name!r} contains '+' or a space")
        if unicodedata.category(ch)[0] in "CZ":
            raise FormatError(f"key name {name!r} contains a control or invisible character")


def validate_note_text(text: str) -> None:
    """Raise :class:`FormatError` unless ``text`` may be the text of a signed note.

    The spec requires valid UTF-8 without ASCII control characters other than newline, and
    a final newline. Carriage returns are therefore rejected: a CRLF-converted note must not
    verify, because the signed bytes are the LF bytes.
    """
    if not isinstance(text, str) or not text.endswith("\n"):
        raise FormatError("note text must be a string ending in a newline")
    _check_chars(text, "note text")


def _check_chars(text: str, what: str) -> bytes:
    """Check the character rules and return the UTF-8 encoding of ``text``."""
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates have no UTF-8 encoding
        raise FormatError(f"{what} is not valid UTF-8") from exc
    bad = _CONTROL.search(text)
    if bad is not None:
        raise FormatError(f"{what} contains control character {bad.group()!r}")
    return encoded


def key_id(name: str, public_key: bytes) -> bytes:
    """Ed25519 key id: ``SHA-256(name || 0x0A || 0x01 || public key)[:4]``.

    Binding the name into the id means the same key under another name is another key, so a
    signature cannot be replayed under a different identity.
    """
    material = name.encode("utf-8") + b"\n" + bytes([ED25519_TYPE]) + public_key
    return hashlib.sha256(material).digest()[:_KEY_ID_SIZE]


def _parse_key_blob(blob: str, what: str) -> bytes:
    raw = b64decode_strict(blob, what)
    if len(raw) != 1 + _ED25519_KEY_SIZE or raw[0] != ED25519_TYPE:
        raise FormatError(f"{what}: expected an Ed25519 key (type 0x01, 32 bytes)")
    return raw[1:]


def _parse_hex_key_id(text: str, what: str) -> bytes:
    # Exactly eight lowercase hex digits, the form Go and we emit, so vkey() round-trips.
    if len(text) != 2 * _KEY_ID_SIZE or any(c not in "0123456789abcdef" for c in text):
        raise FormatError(f"{what}: key id must be 8 lowercase hex digits")
    return bytes.fromhex(text)


class Verifier:
    """A trusted Ed25519 public key with its key name: what a note is checked against.

    Two verifiers are equal when name and public key are equal; the key id follows from
    those two.
    """

    __slots__ = ("_key", "key_id", "name", "public_key")

    name: str
    key_id: bytes
    public_key: bytes

    def __init__(self, name: str, public_key: bytes) -> None:
        validate_key_name(name)
        if not isinstance(public_key, bytes) or len(public_key) != _ED25519_KEY_SIZE:
            raise FormatError("Ed25519 public key must be 32 bytes")
        try:
            self._key = Ed25519PublicKey.from_public_bytes(public_key)
        except ValueError as exc:
            raise FormatError("invalid Ed25519 public key") from exc
        self.name = name
        self.public_key = public_key
        self.key_id = key_id(name, public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> Verifier:
        """Parse ``<name>+<hex key id>+<base64(0x01 || public key)>``.

        The key id is recomputed and must match: a vkey whose id disagrees with its key is
        corrupt or forged, and trusting it would make signature lookup ambiguous.
        """
        if not isinstance(vkey, str):
            raise FormatError("vkey must be a string")
        name, claimed, raw = _parse_key_text(vkey, "vkey", "<name>+<key id>+<key>")
        verifier = cls(name, raw)
        if verifier.key_id != claimed:
            raise FormatError("vkey key id does not match its public key")
        return verifier

    @classmethod
    def from_public_key(cls, name: str, public: bytes) -> Verifier:
        """Build a verifier from a raw 32-byte key or a DER SubjectPublicKeyInfo.

        Logs such as Rekor publish their key as SPKI rather than as a vkey; the note key id
        is then derived from ``name`` and the raw key, which is exactly what the log does.
        """
        if not isinstance(public, bytes):
            raise FormatError("public key must be bytes")
        if len(public) == _ED25519_KEY_SIZE:
            return cls(name, public)
        try:
            key = load_der_public_key(public)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise FormatError("public key is neither 32 raw bytes nor a DER SPKI") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise FormatError("public key is not an Ed25519 key")
        return cls(name, key.public_bytes(Encoding.Raw, PublicFormat.Raw))

    def vkey(self) -> str:
        """The verifier key in signed-note ``vkey`` form, as printed for users to pin."""
        blob = _b64(bytes([ED25519_TYPE]) + self.public_key)
        return f"{self.name}+{self.key_id.hex()}+{blob}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True if ``signature`` (64 bytes, no key id prefix) is valid for ``message``."""
        if len(signature) != _ED25519_SIG_SIZE:
            return False
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Verifier):
            return NotImplemented
        return self.name == other.name and self.public_key == other.public_key

    def __hash__(self) -> int:
        return hash((self.name, self.public_key))

    def __repr__(self) -> str:
        return f"Verifier({self.vkey()!r})"


class Signer:
    """An Ed25519 private key with its key name.

    ``repr`` never shows the key: signers end up in logs and tracebacks.
    """

    __slots__ = ("_key", "_seed", "_verifier", "key_id", "name")

    name: str
    key_id: bytes

    def __init__(self, name: str, seed: bytes) -> None:
        validate_key_name(name)
        if not isinstance(seed, bytes) or len(seed) != _ED25519_KEY_SIZE:
            raise FormatError("Ed25519 private key seed must be 32 bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self._seed = seed
        public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._verifier = Verifier(name, public)
        self.name = name
        self.key_id = self._verifier.key_id

    @classmethod
    def generate(cls, name: str) -> Signer:
        """A fresh random key (from the OS CSPRNG, via ``cryptography``)."""
        seed = Ed25519PrivateKey.generate().private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption()
        )
        return cls(name, seed)

    @classmethod
    def from_skey(cls, skey: str) -> Signer:
        """Parse ``PRIVATE+KEY+<name>+<hex key id>+<base64(0x01 || seed)>``.

        The key id must match the key, as for :meth:`Verifier.from_vkey`. Error messages
        never echo the input, which is a secret.
        """
        if not isinstance(skey, str) or not skey.startswith(_SKEY_PREFIX):
            raise FormatError("skey must start with PRIVATE+KEY+")
        name, claimed, raw = _parse_key_text(
            skey[len(_SKEY_PREFIX) :], "skey", "PRIVATE+KEY+<name>+<key id>+<key>"
        )
        signer = cls(name, raw)
        if signer.key_id != claimed:
            raise FormatError("skey key id does not match its key")
        return signer

    def skey(self) -> str:
        """The private key in signed-note ``skey`` form. Treat the result as a secret."""
        blob = _b64(bytes([ED25519_TYPE]) + self._seed)
        return f"{_SKEY_PREFIX}{self.name}+{self.key_id.hex()}+{blob}"

    def vkey(self) -> str:
        """The matching public verifier key in ``vkey`` form."""
        return self._verifier.vkey()

    def verifier(self) -> Verifier:
        """The matching :class:`Verifier`."""
        return self._verifier

    def sign(self, message: bytes) -> bytes:
        """The raw 64-byte Ed25519 signature of ``message`` (deterministic, RFC 8032)."""
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"Signer(name={self.name!r}, key_id={self.key_id.hex()!r})"


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: the key name, the 4-byte key id and the signature bytes."""

    name: str
    key_id: bytes
    signature: bytes


@dataclass(frozen=True)
class Note:
    """A parsed note. The text is *unverified* until :func:`open_note` says otherwise."""

    text: str
    signatures: tuple[NoteSignature, ...]


def _parse_signature_line(line: str) -> NoteSignature:
    if not line.startswith(_SIG_PREFIX):
        raise FormatError("signature line must start with an em dash and a space")
    name, sep, blob = line[len(_SIG_PREFIX) :].partition(" ")
    if not sep:
        raise FormatError("signature line must have a key name and a signature")
    validate_key_name(name)
    raw = b64decode_strict(blob, "signature")
    # Four bytes of key id and at least one byte of signature, as in Go.
    if len(raw) <= _KEY_ID_SIZE:
        raise FormatError("signature too short")
    return NoteSignature(name=name, key_id=raw[:_KEY_ID_SIZE], signature=raw[_KEY_ID_SIZE:])


def _parse_key_text(text: str, what: str, form: str) -> tuple[str, bytes, bytes]:
    """``<name>+<hex key id>+<base64 key>`` as (name, claimed key id, raw key)."""
    parts = text.split("+", 2)  # base64 may itself contain "+"
    if len(parts) != 3:
        raise FormatError(f"{what} must have the form {form}")
    name, hex_id, blob = parts
    validate_key_name(name)
    return name, _parse_hex_key_id(hex_id, what), _parse_key_blob(blob, what)


def decode_bounded(data: str | bytes, limit: int, what: str) -> str:
    """Untrusted text as ``str``: bytes must be UTF-8, and no more than ``limit`` of them are
    decoded (the caller still checks the decoded length)."""
    if isinstance(data, bytes):
        if len(data) > limit:
            raise FormatError(f"{what} too large")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"{what} is not valid UTF-8") from exc
    if not isinstance(data, str):
        raise FormatError(f"{what} must be str or bytes")
    return data


def parse_note(data: str | bytes) -> Note:
    """Split a signed note into its text and signature lines, checking only the syntax.

    The result says nothing about authenticity: use :func:`open_note` for that.
    Raises :class:`FormatError`.
    """
    data = decode_bounded(data, MAX_NOTE_SIZE, "note")
    # A UTF-8 encoding is never shorter than the string, so this bounds the work below.
    if len(data) > MAX_NOTE_SIZE or len(_check_chars(data, "note")) > MAX_NOTE_SIZE:
        raise FormatError("note too large")
    # The text may itself contain blank lines; the separator is the last one.
    split = data.rfind("\n\n")
    if split < 0:
        raise FormatError("note has no blank line before its signatures")
    text, sig_block = data[: split + 1], data[split + 2 :]
    if not sig_block:
        raise FormatError("note has no signatures")
    if not sig_block.endswith("\n"):
        raise FormatError("note does not end in a newline")
    lines = sig_block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise FormatError(f"note has more than {MAX_SIGNATURES} signatures")
    signatures = tuple(_parse_signature_line(line) for line in lines)
    seen: set[tuple[str, bytes]] = set()
    for sig in signatures:
        if (sig.name, sig.key_id) in seen:
            raise FormatError(f"duplicate signature by key {sig.name!r}+{sig.key_id.hex()}")
        seen.add((sig.name, sig.key_id))
    return Note(text=text, signatures=signatures)


def format_note(note: Note) -> str:
    """Serialise a :class:`Note`; the output is guaranteed to parse back to ``note``.

    Raises :class:`FormatError` if ``note`` could not be represented faithfully (bad text or
    name, no signatures, duplicates, too many), so an invalid note is never emitted.
    """
    validate_note_text(note.text)
    parts = [note.text, "\n"]
    for sig in note.signatures:
        validate_key_name(sig.name)
        if len(sig.key_id) != _KEY_ID_SIZE:
            raise FormatError("key id must be 4 bytes")
        parts.append(f"{_SIG_PREFIX}{sig.name} {_b64(sig.key_id + sig.signature)}\n")
    out = "".join(parts)
    if parse_note(out) != note:
        raise FormatError("note does not round-trip")
    return out


def sign_note(text: str, *signers: Signer) -> str:
    """Sign ``text`` (which must end in a newline) with every signer; return the note."""
    validate_note_text(text)
    if not signers:
        raise FormatError("sign_note needs at least one signer")
    message = text.encode("utf-8")
    sigs = tuple(
        NoteSignature(name=s.name, key_id=s.key_id, signature=s.sign(message)) for s in signers
    )
    return format_note(Note(text=text, signatures=sigs))


def open_note(data: str | bytes, verifiers: Sequence[Verifier]) -> tuple[Note, list[Verifier]]:
    """Parse a note and verify it against trusted ``verifiers``.

    Returns the note and the verifiers whose signatures verified, in signature order.
    Following the spec, a signature whose (name, key id) matches no verifier is ignored
    (that is how witnesses and key rotation coexist), but one that matches a verifier and
    does not verify rejects the whole note: a known key that signs badly means tampering.

    Raises :class:`FormatError` if the note is malformed, and :class:`SignatureError` if no
    trusted signature verifies, a trusted one fails, ``verifiers`` is empty (fail closed: no
    trust configured is never "trust anything"), or two different verifiers share a name
    and key id (then the lookup would be ambiguous).
    """
    if not verifiers:
        raise SignatureError("no verifiers given: refusing to open the note")
    known: dict[tuple[str, bytes], Verifier] = {}
    for v in verifiers:
        if not isinstance(v, Verifier):
            raise SignatureError("verifiers must be Verifier instances")
        other = known.setdefault((v.name, v.key_id), v)
        if other != v:
            raise SignatureError(f"two verifiers share key name and id {v.name}+{v.key_id.hex()}")
    note = parse_note(data)
    message = note.text.encode("utf-8")
    verified: list[Verifier] = []
    for sig in note.signatures:
        verifier = known.get((sig.name, sig.key_id))
        if verifier is None:
            continue
        if not verifier.verify(message, sig.signature):
            raise SignatureError(f"invalid signature by {sig.name}+{sig.key_id.hex()}")
        verified.append(verifier)
    if not verified:
        raise SignatureError("note has no valid signature by a trusted key")
    return note, verified
