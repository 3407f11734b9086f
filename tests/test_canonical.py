"""RFC 8785 canonical bytes and the strict decoder.

The property tests pin :func:`canonicalize` to the ``rfc8785`` reference over the whole
envelope domain; the explicit cases name every place where plain orjson and RFC 8785 were
found to differ, so a regression says which one broke.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import json
import uuid

import orjson
import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from sealtrail import InvalidEvent
from sealtrail.canonical import (
    MAX_DEPTH_CEILING,
    MAX_SAFE_INTEGER,
    canonicalize,
    canonicalize_reference,
    decode,
)

# --------------------------------------------------------------------------------------
# Strategies over the envelope domain

_SPECIAL_CHARS = [
    "\x00", "\x08", "\t", "\n", "\x0b", "\x0c", "\r", "\x1b", "\x1f", " ", '"', "\\", "/",
    "\x7f", "\x80", "\x9f", "\xa0", "\xad", "\u2028", "\u2029", "\u202e", "\ufeff", "\ue000",
    "\uf8ff", "\uff01", "\ufffd", "\uffff", "\U00010000", "\U0001f600", "\U0010ffff", "é",
]  # fmt: skip

characters = st.one_of(
    st.characters(max_codepoint=0x7F),
    st.sampled_from(_SPECIAL_CHARS),
    st.characters(min_codepoint=0xE000, max_codepoint=0xFFFF),  # sorts differently in UTF-16
    st.characters(min_codepoint=0x10000),  # astral: surrogate pairs in UTF-16
    st.characters(exclude_categories=["Cs"]),
)
texts = st.text(characters, max_size=12)
safe_ints = st.one_of(
    st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER),
    st.sampled_from(
        [0, -1, 1, MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER, MAX_SAFE_INTEGER - 1, 2**31, -(2**31)]
    ),
)
scalars = st.one_of(st.none(), st.booleans(), safe_ints, texts)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(texts, inner, max_size=6),
    ),
    max_leaves=40,
)


@st.composite
def deep_values(draw: st.DrawFn) -> object:
    """Nesting far beyond what ``values`` reaches, mixing objects and arrays."""
    value: object = draw(scalars)
    for _ in range(draw(st.integers(1, 100))):
        if draw(st.booleans()):
            value = [value] if draw(st.booleans()) else [draw(scalars), value, []]
        else:
            value = {draw(texts): value, draw(texts): {}}
    return value


# --------------------------------------------------------------------------------------
# Property tests


@given(values)
def test_canonicalize_matches_reference_and_round_trips(value: object) -> None:
    before = json.dumps(value, sort_keys=True)
    data = canonicalize(value)
    assert data == rfc8785.dumps(value)
    assert json.dumps(value, sort_keys=True) == before  # the input is not touched
    decoded = decode(data, max_bytes=10**7, max_depth=MAX_DEPTH_CEILING)
    assert decoded == value
    assert canonicalize(decoded) == data


@settings(max_examples=60)
@given(deep_values())
def test_deep_values_match_reference_and_round_trip(value: object) -> None:
    data = canonicalize(value)
    assert data == rfc8785.dumps(value)
    decoded = decode(data, max_bytes=10**7, max_depth=MAX_DEPTH_CEILING)
    assert decoded == value
    assert canonicalize(decoded) == data


@settings(max_examples=150)
@given(st.dictionaries(texts, scalars, min_size=2, max_size=12))
def test_key_order_matches_reference(value: dict[str, object]) -> None:
    assert canonicalize(value) == rfc8785.dumps(value)


@settings(max_examples=100)
@given(values)
def test_decode_accepts_non_canonical_spelling(value: object) -> None:
    """Whitespace, key order and escapes do not matter; the canonical bytes are the same."""
    loose = json.dumps(value, indent=1, ensure_ascii=True).encode()
    assert decode(loose, max_bytes=10**7, max_depth=MAX_DEPTH_CEILING) == value
    assert canonicalize(decode(loose, max_bytes=10**7, max_depth=MAX_DEPTH_CEILING)) == (
        canonicalize(value)
    )


# --------------------------------------------------------------------------------------
# Differences between orjson and RFC 8785, one by one


@pytest.mark.parametrize(
    "keys",
    [
        ["\ue000", "\U0001f600"],
        ["\uffff", "\U00010000"],
        ["a\uff01", "a\U0001f600", "a"],
        ["\ufeff", "\U0010ffff", "z", "\u00e9"],
    ],
)
def test_key_order_is_utf16_not_code_point(keys: list[str]) -> None:
    value = {key: index for index, key in enumerate(keys)}
    reference = rfc8785.dumps(value)
    assert orjson.dumps(value, option=orjson.OPT_SORT_KEYS) != reference  # the trap
    assert canonicalize(value) == reference


def test_key_order_nested_utf16_inside_arrays() -> None:
    value = {"a": [{"\ue000": 1, "\U0001f600": 2}], "\uff01": {"\U00010000": {"\ue001": 3}}}
    assert canonicalize(value) == rfc8785.dumps(value)


def test_private_use_values_do_not_reorder_anything() -> None:
    """Characters >= U+E000 in values (not keys) take the check but change nothing."""
    value = {"b": "\ue000", "a": "\U0001f600\ufffd"}
    assert (
        canonicalize(value)
        == rfc8785.dumps(value)
        == orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    )


def test_escaping_of_every_code_point_matches_reference() -> None:
    for start, stop in [(0, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]:
        text = "".join(map(chr, range(start, stop)))
        assert canonicalize(text) == rfc8785.dumps(text)
        assert canonicalize({text[:50]: text[-50:]}) == rfc8785.dumps({text[:50]: text[-50:]})


@pytest.mark.parametrize(
    ("char", "expected"),
    [
        ("\x00", b'"\\u0000"'),
        ("\x08", b'"\\b"'),
        ("\t", b'"\\t"'),
        ("\n", b'"\\n"'),
        ("\x0b", b'"\\u000b"'),
        ("\x0c", b'"\\f"'),
        ("\r", b'"\\r"'),
        ("\x1f", b'"\\u001f"'),
        ('"', b'"\\""'),
        ("\\", b'"\\\\"'),
        ("/", b'"/"'),
        ("\x7f", b'"\x7f"'),
        ("\u2028", '"\u2028"'.encode()),
        ("\u2029", '"\u2029"'.encode()),
        ("é", '"é"'.encode()),
        ("\U0001f600", '"\U0001f600"'.encode()),
    ],
)
def test_string_escapes(char: str, expected: bytes) -> None:
    assert canonicalize(char) == expected == rfc8785.dumps(char)


@pytest.mark.parametrize(
    "value", [MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER, 0, -1, {"n": MAX_SAFE_INTEGER}]
)
def test_integers_at_the_safe_limit(value: object) -> None:
    assert canonicalize(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (2**53, ""),
        (-(2**53), ""),
        (2**63, ""),
        (2**64, ""),
        (10**40, ""),
        ({"a": [1, 2**53]}, "a[1]"),
        ({"a": {"b": -(2**63)}}, "a.b"),
    ],
)
def test_integers_beyond_the_safe_limit_are_refused(value: object, field: str) -> None:
    # orjson would write all of these (up to 64 bits); RFC 8785 refuses them.
    with pytest.raises(InvalidEvent, match="safe range") as caught:
        canonicalize(value)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("value", "field", "reason"),
    [
        (1.0, "", "use a string or an integer"),  # orjson: 1.0, RFC 8785: 1
        (1.5, "", "use a string or an integer"),
        (1e16, "", "use a string or an integer"),
        ({"a": [0.1]}, "a[0]", "use a string or an integer"),
        (float("nan"), "", "NaN"),  # orjson writes null
        ({"x": {"y": float("inf")}}, "x.y", "NaN and Infinity"),
        ([float("-inf")], "[0]", "NaN and Infinity"),
    ],
)
def test_floats_are_refused(value: object, field: str, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason) as caught:
        canonicalize(value)
    assert caught.value.field == field


class Colour(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    HIGH = 3


class Kind(enum.StrEnum):
    USER = "user"


@dataclasses.dataclass
class Point:
    x: int


@pytest.mark.parametrize(
    "foreign",
    [
        uuid.UUID(int=1),  # orjson writes these natively; JSON has no such types
        datetime.datetime(2026, 1, 1),
        datetime.date(2026, 1, 1),
        Point(1),
        Colour.RED,
        orjson.Fragment(b'{"injected":true}'),
        b"bytes",
        bytearray(b"x"),
        {1, 2},
        frozenset(),
        complex(1, 2),
        object(),
    ],
)
def test_foreign_types_are_refused_with_their_path(foreign: object) -> None:
    with pytest.raises(InvalidEvent, match="unsupported type") as caught:
        canonicalize({"data": {"items": [0, 1, 2, {"x": foreign}]}})
    assert caught.value.field == "data.items[3].x"


@pytest.mark.parametrize(
    "value",
    [
        {Kind.USER: Kind.USER},  # orjson refuses str-subclass keys
        {"level": Level.HIGH, "kind": Kind.USER},
        {"t": (1, "a", (2,))},
        collections.OrderedDict([("b", 1), ("a", collections.OrderedDict(z=[]))]),
        collections.defaultdict(list, {"k": [1]}),
    ],
)
def test_subclasses_and_tuples_are_written_as_plain_json(value: object) -> None:
    assert canonicalize(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("\ud800", ""),
        ("ok\udfff", ""),
        ({"a": ["x", "\udc00"]}, "a[1]"),
        ({"a": {"b\ud800": 1}}, "a"),
        ({"\ue000": 1, "\U0001f600": {"k": "\ud83d"}}, '["\\ud83d\\ude00"].k'),
    ],
)
def test_lone_surrogates_are_refused(value: object, field: str) -> None:
    with pytest.raises(InvalidEvent, match="lone surrogate") as caught:
        canonicalize(value)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("value", "field"),
    [({1: "x"}, ""), ({"a": {None: 1}}, "a"), ({"a": [{(1, 2): 1}]}, "a[0]")],
)
def test_non_string_keys_are_refused(value: object, field: str) -> None:
    with pytest.raises(InvalidEvent, match="keys must be strings") as caught:
        canonicalize(value)
    assert caught.value.field == field


def _nested(depth: int) -> object:
    value: object = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_depth_up_to_the_ceiling_is_canonical() -> None:
    value = _nested(MAX_DEPTH_CEILING)
    assert canonicalize(value) == rfc8785.dumps(value)


def test_depth_beyond_the_ceiling_is_refused_not_a_crash() -> None:
    with pytest.raises(InvalidEvent, match="nested deeper"):
        canonicalize(_nested(MAX_DEPTH_CEILING + 1))
    with pytest.raises(InvalidEvent, match="nested deeper"):
        canonicalize(_nested(100_000))


def test_empty_containers() -> None:
    for value in ({}, [], {"": {}}, [[], {}], {"a": []}):
        assert canonicalize(value) == rfc8785.dumps(value)


def test_reference_translates_errors() -> None:
    assert canonicalize_reference({"b": 1, "a": [True, None]}) == b'{"a":[true,null],"b":1}'
    with pytest.raises(InvalidEvent):
        canonicalize_reference({"a": "\ud800"})
    with pytest.raises(InvalidEvent):
        canonicalize_reference(2**60)


# --------------------------------------------------------------------------------------
# decode: strict JSON for untrusted input


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b'{"a":1,"a":2}', "a"),
        (b'{"a":1,"b":{"c":1,"c":1}}', "b.c"),
        (b'{"list":[{},{"x":"1:2","x":"3"}]}', "list[1].x"),
        (b'{"a":1,"\\u0061":2}', "a"),  # the same key, spelled with an escape
        (b'{"a:":1,"a\\u003a":2}', '["a:"]'),  # escaped colon defeats the cheap count
        (b'{"t":"12:00","t":"12:00"}', "t"),
    ],
)
def test_decode_refuses_duplicate_keys(data: bytes, field: str) -> None:
    with pytest.raises(InvalidEvent, match="duplicate key") as caught:
        decode(data)
    assert caught.value.field == field


def test_decode_colons_in_strings_are_not_duplicates() -> None:
    data = b'{"t":"2026-01-01T12:00:00Z","ip":"::1","k:v":"a:b:c","\\u003a":":"}'
    assert decode(data) == {"t": "2026-01-01T12:00:00Z", "ip": "::1", "k:v": "a:b:c", ":": ":"}


@pytest.mark.parametrize(
    ("data", "field", "literal"),
    [
        (b"1.5", "", "1.5"),
        (b'{"a":1e3}', "a", "1e3"),
        (b'{"a":[1E3]}', "a[0]", "1E3"),
        (b'{"a":1.0}', "a", "1.0"),
        (b'{"a":-0.0}', "a", "-0.0"),
        (b'{"a":{"b":[0,2.5e-3]}}', "a.b[1]", "2.5e-3"),
    ],
)
def test_decode_refuses_floats(data: bytes, field: str, literal: str) -> None:
    with pytest.raises(InvalidEvent, match="use a string or an integer") as caught:
        decode(data)
    assert caught.value.field == field
    assert literal in caught.value.reason


@pytest.mark.parametrize("data", [b"NaN", b'{"a":NaN}', b"[Infinity]", b'{"a":-Infinity}'])
def test_decode_refuses_nan_and_infinity(data: bytes) -> None:
    with pytest.raises(InvalidEvent, match="NaN and Infinity"):
        decode(data)


def test_decode_refuses_huge_float_literal() -> None:
    with pytest.raises(InvalidEvent, match="use a string or an integer"):
        decode(b"[1e400]")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"9007199254740992", ""),
        (b"-9007199254740992", ""),
        (b'{"a":[18446744073709551615]}', "a[0]"),  # fits 64 bits: orjson returns an int
        (b'{"a":18446744073709551616}', "a"),  # beyond 64 bits: orjson returns a float
        (b'{"a":{"b":123456789012345678901234567890}}', "a.b"),
    ],
)
def test_decode_refuses_unsafe_integers(data: bytes, field: str) -> None:
    with pytest.raises(InvalidEvent, match="safe range") as caught:
        decode(data)
    assert caught.value.field == field


def test_decode_accepts_safe_integers() -> None:
    assert decode(b"[9007199254740991,-9007199254740991,0,-0]") == [
        MAX_SAFE_INTEGER,
        -MAX_SAFE_INTEGER,
        0,
        0,
    ]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b'"\\ud800"', ""),
        (b'{"a":"\\udc00"}', "a"),
        (b'{"a":["x","\\ud83d"]}', "a[1]"),
        (b'{"a":"\\ud83dx"}', "a"),
        (b'{"\\ud800":1}', ""),
        ('{"a":"\ud800"}', "a"),  # a Python str holding a lone surrogate
    ],
)
def test_decode_refuses_lone_surrogates(data: bytes | str, field: str) -> None:
    with pytest.raises(InvalidEvent, match="lone surrogate") as caught:
        decode(data)
    assert caught.value.field == field


def test_decode_accepts_surrogate_pairs() -> None:
    assert decode(b'["\\ud83d\\ude00","\\uD83D\\uDE00"]') == ["\U0001f600", "\U0001f600"]


@pytest.mark.parametrize(
    "data",
    [b'"\xff"', b'"\xc0\xaf"', b'"\xed\xa0\x80"', b'{"a":"\xe2\x82"}', b'"\xf4\x90\x80\x80"'],
)
def test_decode_refuses_invalid_utf8(data: bytes) -> None:
    with pytest.raises(InvalidEvent, match="not valid UTF-8"):
        decode(data)


def test_decode_refuses_oversize_input_before_parsing() -> None:
    # Not even JSON: the size check must come first.
    with pytest.raises(InvalidEvent, match="65537 bytes, over the limit of 65536"):
        decode(b"x" * 65537)
    with pytest.raises(InvalidEvent, match="over the limit of 10"):
        decode("[" + "é" * 5 + "]", max_bytes=10)  # 12 UTF-8 bytes, 7 characters
    assert decode(b'"' + b"a" * 98 + b'"', max_bytes=100) == "a" * 98


@pytest.mark.parametrize("data", [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 1000 + b"]" * 1000])
def test_decode_depth_bomb_is_a_clean_error(data: bytes) -> None:
    with pytest.raises(InvalidEvent, match="nested deeper than 32") as caught:
        decode(data, max_bytes=10**6)
    assert isinstance(caught.value, InvalidEvent)


def test_decode_depth_limit_is_exact() -> None:
    assert decode(b"[" * 32 + b"]" * 32) == _nested(32)
    with pytest.raises(InvalidEvent, match="nested deeper than 32") as caught:
        decode(b"[" * 33 + b"]" * 33)
    assert caught.value.field == "[0]" * 32
    assert decode(b"[[[]]]", max_depth=3) == [[[]]]
    with pytest.raises(InvalidEvent, match="nested deeper than 2"):
        decode(b'{"a":{"b":{}}}', max_depth=2)


@pytest.mark.parametrize("max_depth", [0, -1, MAX_DEPTH_CEILING + 1, True, 2.0])
def test_decode_refuses_impossible_depth_limits(max_depth: object) -> None:
    with pytest.raises(ValueError, match="max_depth"):
        decode(b"[]", max_depth=max_depth)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [b"", b"   ", b"{} {}", b"[1,]", b'{"a":1,}', b"'a'", b"\xef\xbb\xbf{}", b"{a:1}", b"nul"],
)
def test_decode_refuses_what_is_not_one_json_value(data: bytes) -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode(data)
    assert caught.value.field == ""


def test_decode_refuses_other_input_types() -> None:
    with pytest.raises(InvalidEvent, match="bytes or str"):
        decode(123)  # type: ignore[arg-type]


def test_decode_accepts_str_and_whitespace() -> None:
    assert decode(' {"a": [1, "é"]}\n') == {"a": [1, "é"]}


def test_canonical_bytes_survive_decode_unchanged() -> None:
    data = b'{"a":[1,{"\xf0\x9f\x98\x80":3,"\xee\x80\x80":2}],"b":"\\u001f\\n/\xe2\x80\xa8"}'
    assert canonicalize(decode(data)) == data
