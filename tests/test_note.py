"""Signed notes: the C2SP and Go known answers, then the attacks a parser must refuse."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from hypothesis import given
from hypothesis import strategies as st

from sealtrail import FormatError, SignatureError
from sealtrail.note import (
    MAX_NOTE_SIZE,
    MAX_SIGNATURES,
    Note,
    NoteSignature,
    Signer,
    Verifier,
    format_note,
    key_id,
    open_note,
    parse_note,
    sign_note,
    validate_key_name,
)

EM = "\u2014"


def load(vectors: Path) -> list[dict[str, Any]]:
    data = json.loads((vectors / "signed-note" / "signed_note_vectors.json").read_text("utf-8"))
    result: list[dict[str, Any]] = data["vectors"]
    return result


@pytest.fixture(scope="module")
def vecs(vectors: Path) -> list[dict[str, Any]]:
    return load(vectors)


@pytest.fixture(scope="module")
def c2sp(vecs: list[dict[str, Any]]) -> dict[str, Any]:
    return vecs[0]


@pytest.fixture(scope="module")
def kat(vecs: list[dict[str, Any]]) -> dict[str, Any]:
    return vecs[1]


@pytest.fixture(scope="module")
def sumdb(vecs: list[dict[str, Any]]) -> dict[str, Any]:
    return vecs[2]


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate("example.com/audit")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sig_line(name: str, raw: bytes) -> str:
    return f"{EM} {name} {b64(raw)}\n"


# ---------------------------------------------------------------------------------------------
# Known answers


def test_c2sp_example_verifies(c2sp: dict[str, Any]) -> None:
    verifier = Verifier.from_vkey(c2sp["vkey"])
    note, verified = open_note(c2sp["note"], [verifier])
    assert note.text == "This is an example message.\n"
    assert verified == [verifier]
    assert verifier.vkey() == c2sp["vkey"]


def test_c2sp_example_as_bytes(c2sp: dict[str, Any]) -> None:
    note, _ = open_note(c2sp["note"].encode("utf-8"), [Verifier.from_vkey(c2sp["vkey"])])
    assert note.signatures[0].name == "example.com/foo"


def test_go_kat_keys(kat: dict[str, Any]) -> None:
    signer = Signer.from_skey(kat["skey"])
    assert signer.vkey() == kat["vkey"]
    assert signer.skey() == kat["skey"]
    assert signer.verifier() == Verifier.from_vkey(kat["vkey"])
    assert Verifier.from_vkey(kat["vkey"]).vkey() == kat["vkey"]
    assert signer.key_id.hex() == "c74f20a3"


def test_go_kat_signature_is_byte_exact(kat: dict[str, Any]) -> None:
    # Ed25519 is deterministic, so our signature must equal Go's, byte for byte.
    assert sign_note(kat["text"], Signer.from_skey(kat["skey"])) == kat["signed_note"]


def test_go_kat_two_signers(kat: dict[str, Any]) -> None:
    second = kat["second_signer"]
    both = kat["signed_note"] + second["sig_line"] + "\n"
    peter, enoch = Verifier.from_vkey(kat["vkey"]), Verifier.from_vkey(second["vkey"])
    note, verified = open_note(both, [enoch, peter])
    assert verified == [peter, enoch]  # signature order, not verifier order
    assert note.text == kat["text"]
    # Knowing only the second key, the first signature is an unknown one and is ignored.
    assert open_note(both, [enoch])[1] == [enoch]


def test_sumdb_checkpoint_and_witnesses(sumdb: dict[str, Any]) -> None:
    extras = sumdb["extra_signers_over_same_body"]
    note_text = sumdb["checkpoint"] + "".join(e["sig_line"] + "\n" for e in extras)
    verifiers = [Verifier.from_vkey(sumdb["vkey"])] + [
        Verifier.from_vkey(e["vkey"]) for e in extras
    ]
    note, verified = open_note(note_text, verifiers)
    assert verified == verifiers
    assert [s.name for s in note.signatures] == ["sum.golang.org", "monkeys", "bananas", "witness"]
    for v, e in zip(verifiers[1:], extras, strict=True):
        assert v.vkey() == e["vkey"]
    # The production key alone is enough.
    assert open_note(note_text, verifiers[:1])[1] == verifiers[:1]


def test_every_vector_round_trips(vecs: list[dict[str, Any]]) -> None:
    notes = [vecs[0]["note"], vecs[1]["signed_note"], vecs[2]["checkpoint"]]
    for text in notes:
        assert format_note(parse_note(text)) == text


def test_key_id_definition(kat: dict[str, Any]) -> None:
    verifier = Verifier.from_vkey(kat["vkey"])
    assert key_id(verifier.name, verifier.public_key) == bytes.fromhex("c74f20a3")


# ---------------------------------------------------------------------------------------------
# Our own keys


def test_generate_sign_open(signer: Signer) -> None:
    note = sign_note("hello\n", signer)
    parsed, verified = open_note(note, [signer.verifier()])
    assert parsed.text == "hello\n"
    assert verified == [signer.verifier()]
    assert Signer.from_skey(signer.skey()).vkey() == signer.vkey()


def test_text_with_blank_lines_splits_at_last_blank_line(signer: Signer) -> None:
    text = (
        "Ognuno sta solo sul cuor della terra\n"
        "trafitto da un raggio di sole:\n"
        "\n"
        "ed è subito sera.\n"
    )
    note, _ = open_note(sign_note(text, signer), [signer.verifier()])
    assert note.text == text


def test_text_ending_in_blank_line(signer: Signer) -> None:
    text = "a\n\n"
    note, _ = open_note(sign_note(text, signer), [signer.verifier()])
    assert note.text == text


def test_sixteen_signers_accepted() -> None:
    signers = [Signer.generate(f"witness{i}.example") for i in range(16)]
    _, verified = open_note(sign_note("x\n", *signers), [s.verifier() for s in signers])
    assert len(verified) == 16


def test_from_public_key_raw_and_spki() -> None:
    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    signer = Signer("log.example/spki", seed)
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    spki = private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert Verifier.from_public_key(signer.name, raw) == signer.verifier()
    assert Verifier.from_public_key(signer.name, spki) == signer.verifier()


def test_from_public_key_rejects_other_algorithms() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = p256.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(FormatError):
        Verifier.from_public_key("log.example", spki)
    with pytest.raises(FormatError):
        Verifier.from_public_key("log.example", b"\x30garbage")
    with pytest.raises(FormatError):
        Verifier.from_public_key("log.example", b"")


def test_verify_rejects_wrong_length_and_wrong_message(signer: Signer) -> None:
    sig = signer.sign(b"m")
    v = signer.verifier()
    assert v.verify(b"m", sig)
    assert not v.verify(b"n", sig)
    assert not v.verify(b"m", sig[:-1])
    assert not v.verify(b"m", sig + b"\x00")


def test_signer_repr_hides_the_key(signer: Signer) -> None:
    blob = signer.skey().split("+", 4)[4]
    assert blob not in repr(signer)
    assert "PRIVATE" not in repr(signer)


@given(
    text=st.lists(
        st.text(st.characters(blacklist_categories=["Cs"], min_codepoint=0x20), max_size=20),
        min_size=1,
        max_size=5,
    ).map(lambda lines: "".join(line + "\n" for line in lines)),
    sigs=st.lists(
        st.tuples(
            st.sampled_from(["a", "example.com/log", "wit.ness/1", "ü.example"]),
            st.binary(min_size=4, max_size=4),
            st.binary(min_size=1, max_size=100),
        ),
        min_size=1,
        max_size=5,
        unique_by=lambda t: (t[0], t[1]),
    ),
)
def test_format_parse_round_trip(text: str, sigs: list[tuple[str, bytes, bytes]]) -> None:
    note = Note(text=text, signatures=tuple(NoteSignature(n, k, s) for n, k, s in sigs))
    assert parse_note(format_note(note)) == note
    assert format_note(parse_note(format_note(note))) == format_note(note)


# ---------------------------------------------------------------------------------------------
# Attacks and malformed input


def test_missing_blank_line(c2sp: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        parse_note(c2sp["note"].replace("\n\n", "\n"))


def test_signature_line_without_em_dash(c2sp: dict[str, Any]) -> None:
    for dash in ("-", "\u2013", "--", ""):
        with pytest.raises(FormatError):
            parse_note(c2sp["note"].replace(EM + " ", dash + " " if dash else ""))


def test_signature_line_without_space_after_dash(c2sp: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        parse_note(c2sp["note"].replace(EM + " ", EM))


def test_bad_base64(c2sp: dict[str, Any]) -> None:
    for bad in ("Uw2QOkn8!", "Uw2QOkn8srV", "Uw2Q Okn8", "Uw2QOkn8sr==", "Uw2QOkn8_-V1"):
        with pytest.raises(FormatError):
            parse_note(c2sp["note"].replace(c2sp["note"].split(" ")[-1], bad + "\n"))


def test_non_canonical_base64_padding_bits(signer: Signer) -> None:
    note = sign_note("x\n", signer)
    blob = note.rstrip("\n").rsplit(" ", 1)[1]
    # 68 bytes encode to 90 characters and one "=": the last character carries two bits
    # that decoders ignore. Setting one gives the same bytes under a different spelling.
    assert blob.endswith("=") and not blob.endswith("==")
    last = blob.rstrip("=")[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    tweaked_char = alphabet[alphabet.index(last) ^ 1]
    stripped = blob.rstrip("=")
    tweaked = stripped[:-1] + tweaked_char + blob[len(stripped) :]
    assert base64.b64decode(tweaked) == base64.b64decode(blob)
    with pytest.raises(FormatError):
        parse_note(note.replace(blob, tweaked))


def test_wrong_key_id_is_an_unknown_signature(c2sp: dict[str, Any]) -> None:
    verifier = Verifier.from_vkey(c2sp["vkey"])
    sig = parse_note(c2sp["note"]).signatures[0]
    forged = "This is an example message.\n\n" + sig_line(
        sig.name, b"\x00\x00\x00\x00" + sig.signature
    )
    with pytest.raises(SignatureError, match="no valid signature"):
        open_note(forged, [verifier])


def test_vkey_with_wrong_key_id(c2sp: dict[str, Any]) -> None:
    name, _, blob = c2sp["vkey"].split("+", 2)
    with pytest.raises(FormatError, match="does not match"):
        Verifier.from_vkey(f"{name}+530d903b+{blob}")


def test_truncated_signature(c2sp: dict[str, Any]) -> None:
    verifier = Verifier.from_vkey(c2sp["vkey"])
    sig = parse_note(c2sp["note"]).signatures[0]
    short = "This is an example message.\n\n" + sig_line(sig.name, sig.key_id + sig.signature[:-1])
    with pytest.raises(SignatureError):
        open_note(short, [verifier])
    with pytest.raises(FormatError):  # cut in the middle of the base64
        parse_note(c2sp["note"][:-10] + "\n")
    with pytest.raises(FormatError):  # nothing but a key id
        parse_note("x\n\n" + sig_line("a", b"\x01\x02\x03\x04"))
    with pytest.raises(FormatError):  # not even a whole key id
        parse_note("x\n\n" + sig_line("a", b"\x01\x02\x03"))


def test_tampered_text(c2sp: dict[str, Any]) -> None:
    with pytest.raises(SignatureError):
        open_note(c2sp["note"].replace("example", "exampIe"), [Verifier.from_vkey(c2sp["vkey"])])


def test_flipped_signature_bit(c2sp: dict[str, Any]) -> None:
    sig = parse_note(c2sp["note"]).signatures[0]
    flipped = bytearray(sig.signature)
    flipped[10] ^= 1
    bad = "This is an example message.\n\n" + sig_line(sig.name, sig.key_id + bytes(flipped))
    with pytest.raises(SignatureError, match="invalid signature"):
        open_note(bad, [Verifier.from_vkey(c2sp["vkey"])])


@pytest.mark.parametrize("char", ["\r", "\x00", "\t", "\x1b", "\x0b", "\x0c", "\x7f\x1f"])
def test_control_character_in_text(signer: Signer, char: str) -> None:
    good = sign_note("line\n", signer)
    with pytest.raises(FormatError):
        parse_note(good.replace("line", f"li{char}ne"))
    with pytest.raises(FormatError):
        sign_note(f"li{char}ne\n", signer)


def test_crlf_converted_note(c2sp: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        parse_note(c2sp["note"].replace("\n", "\r\n"))


def test_invalid_utf8(c2sp: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        parse_note(b"\xff" + c2sp["note"].encode("utf-8"))
    with pytest.raises(FormatError):
        parse_note("\ud800" + c2sp["note"])


def test_trailing_garbage(c2sp: dict[str, Any]) -> None:
    for tail in ("junk", "junk\n", "\n", "\n\n", " "):
        with pytest.raises(FormatError):
            parse_note(c2sp["note"] + tail)


def test_missing_final_newline(c2sp: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        parse_note(c2sp["note"].rstrip("\n"))


def test_no_signatures() -> None:
    for bad in ("text\n\n", "text\n", "", "\n\n"):
        with pytest.raises(FormatError):
            parse_note(bad)


def test_unknown_key_only(c2sp: dict[str, Any], signer: Signer) -> None:
    with pytest.raises(SignatureError, match="no valid signature"):
        open_note(c2sp["note"], [signer.verifier()])


def test_valid_signature_by_known_name_with_other_key(c2sp: dict[str, Any]) -> None:
    # An attacker's own key under the trusted name: different key id, so it is ignored.
    impostor = Signer.generate("example.com/foo")
    trusted = Verifier.from_vkey(c2sp["vkey"])
    forged = sign_note("This is an example message.\n", impostor)
    with pytest.raises(SignatureError, match="no valid signature"):
        open_note(forged, [trusted])
    # Alongside the genuine signature it changes nothing.
    genuine = parse_note(c2sp["note"]).signatures[0]
    both = forged + sig_line(genuine.name, genuine.key_id + genuine.signature)
    assert open_note(both, [trusted])[1] == [trusted]


def test_bad_signature_by_known_key_rejects_whole_note(kat: dict[str, Any]) -> None:
    second = kat["second_signer"]
    peter, enoch = Verifier.from_vkey(kat["vkey"]), Verifier.from_vkey(second["vkey"])
    bad_enoch = parse_note(kat["text"] + "\n" + second["sig_line"] + "\n").signatures[0]
    corrupted = bytearray(bad_enoch.signature)
    corrupted[0] ^= 0x80
    note = kat["signed_note"] + sig_line("EnochRoot", bad_enoch.key_id + bytes(corrupted))
    assert open_note(note, [peter])[1] == [peter]  # Enoch unknown: ignored
    with pytest.raises(SignatureError, match="invalid signature"):
        open_note(note, [peter, enoch])


def test_duplicate_signatures(kat: dict[str, Any]) -> None:
    line = kat["signed_note"].split("\n\n")[1]
    with pytest.raises(FormatError, match="duplicate"):
        parse_note(kat["signed_note"] + line)
    # Same key, different (garbage) signature bytes: still a duplicate, not "first wins".
    sig = parse_note(kat["signed_note"]).signatures[0]
    with pytest.raises(FormatError, match="duplicate"):
        parse_note(kat["signed_note"] + sig_line(sig.name, sig.key_id + b"\x00" * 64))


def test_duplicate_signers_refused(signer: Signer) -> None:
    with pytest.raises(FormatError, match="duplicate"):
        sign_note("x\n", signer, signer)


def test_empty_verifier_list(c2sp: dict[str, Any]) -> None:
    with pytest.raises(SignatureError, match="no verifiers"):
        open_note(c2sp["note"], [])


def test_ambiguous_verifiers(signer: Signer) -> None:
    other = Signer.generate(signer.name).verifier()
    other.key_id = signer.key_id  # simulate a crafted key id collision
    with pytest.raises(SignatureError, match="share"):
        open_note(sign_note("x\n", signer), [signer.verifier(), other])
    # The same verifier twice is not ambiguous.
    assert open_note(sign_note("x\n", signer), [signer.verifier(), signer.verifier()])[1] == [
        signer.verifier()
    ]


def test_too_many_signatures() -> None:
    lines = "".join(sig_line(f"k{i}", bytes(68)) for i in range(MAX_SIGNATURES + 1))
    with pytest.raises(FormatError, match="more than"):
        parse_note("x\n\n" + lines)
    assert len(parse_note("x\n\n" + lines.split("\n", 1)[1]).signatures) == MAX_SIGNATURES


def test_oversized_note(signer: Signer) -> None:
    with pytest.raises(FormatError, match="too large"):
        parse_note("a" * MAX_NOTE_SIZE + sign_note("\n", signer))
    with pytest.raises(FormatError, match="too large"):
        parse_note(b"a" * (MAX_NOTE_SIZE + 1))


def test_sign_note_needs_final_newline_and_a_signer(signer: Signer) -> None:
    with pytest.raises(FormatError):
        sign_note("no newline", signer)
    with pytest.raises(FormatError):
        sign_note("x\n")


def test_format_note_refuses_invalid_notes() -> None:
    sig = NoteSignature("a", b"\x00" * 4, b"\x01")
    for bad in (
        Note("x", (sig,)),
        Note("x\n", ()),
        Note("x\n", (NoteSignature("a b", b"\x00" * 4, b"\x01"),)),
        Note("x\n", (NoteSignature("a", b"\x00" * 3, b"\x01"),)),
        Note("x\n", (NoteSignature("a", b"\x00" * 4, b""),)),
        Note("x\n", (sig, sig)),
    ):
        with pytest.raises(FormatError):
            format_note(bad)


# ---------------------------------------------------------------------------------------------
# Key names and key encodings


def test_vector_names_are_valid(vecs: list[dict[str, Any]]) -> None:
    for name in (
        "example.com/foo",
        "PeterNeumann",
        "EnochRoot",
        "sum.golang.org",
        "monkeys",
        "bananas",
        "witness",
        "log2025-alpha1.rekor.sigstage.dev",
        "quasimodo.example/salvatore",
        "ü.example",
    ):
        validate_key_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a+b",
        "a b",
        "a\tb",
        "a\nb",
        "a\u00a0b",
        "a\u2028b",
        "a\u3000b",
        "a\u200bb",
        "a\u202eb",
        "a\x7fb",
        "a\ud800b",
        "a\ue000b",
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(FormatError):
        validate_key_name(name)
    with pytest.raises(FormatError):
        Signer.generate(name)


def test_signature_line_with_invalid_name() -> None:
    for name in ("a\u00a0b", "a\u202eb", "a+b", ""):
        with pytest.raises(FormatError):
            parse_note("x\n\n" + sig_line(name, bytes(68)))


@pytest.mark.parametrize(
    "vkey",
    [
        "",
        "example.com/foo",
        "example.com/foo+530d903a",
        "example.com/foo+530D903A+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
        "example.com/foo+530d903+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
        "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2",
        "example.com/foo+530d903a+AukyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
        "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2kAA==",
        "example.com/foo+530d903a+ AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
        "example com+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
        "PRIVATE+KEY+example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
    ],
)
def test_malformed_vkeys(vkey: str) -> None:
    with pytest.raises(FormatError):
        Verifier.from_vkey(vkey)


def test_malformed_skeys(kat: dict[str, Any]) -> None:
    skey: str = kat["skey"]
    *head, blob = skey.split("+", 4)
    prefix = "+".join(head)
    raw = base64.b64decode(blob)
    ed25519, other_type = raw[:1], b"\x02"
    assert ed25519 == b"\x01"
    for bad in (
        skey.replace("PRIVATE+KEY+", ""),
        skey.replace("PRIVATE+KEY+", "private+key+"),
        skey.replace("c74f20a3", "c74f20a4"),  # key id does not match the key
        skey.replace("c74f20a3", "C74F20A3"),
        f"{prefix}+{b64(other_type + raw[1:])}",  # not Ed25519
        f"{prefix}+{b64(raw[:-1])}",  # short seed
        kat["vkey"],  # a public key is not a private key
    ):
        with pytest.raises(FormatError):
            Signer.from_skey(bad)
