"""The change-event contract (sealtrail.capture.change): pure, shared by every backend."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from decimal import Decimal

import pytest

from sealtrail.canonical import MAX_SAFE_INTEGER, canonicalize
from sealtrail.capture.change import ACTIONS, MASKED, Track, json_value, pk_text, target_type


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("text", "text"),
        (True, True),
        (42, 42),
        (MAX_SAFE_INTEGER, MAX_SAFE_INTEGER),
        (-MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER),
        (MAX_SAFE_INTEGER + 1, str(MAX_SAFE_INTEGER + 1)),
        (-(2**63), str(-(2**63))),
        (1.5, "1.5"),
        (2.0, "2"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (Decimal("12.340"), "12.340"),
        (dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC), "2026-01-02T03:04:05.000006+00:00"),
        (dt.date(2026, 1, 2), "2026-01-02"),
        (dt.time(3, 4), "03:04:00"),
        (dt.timedelta(days=1, seconds=5), "1 day, 0:00:05"),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        (b"\x00\xff", "\\x00ff"),
        (memoryview(b"ab"), "\\x6162"),
        (Colour.RED, "red"),
        (Level.HIGH, 3),
        ({"a": [1, 2.5, {"b": None}], 7: "k"}, {"a": [1, "2.5", {"b": None}], "7": "k"}),
        ((1, "x"), [1, "x"]),
    ],
)
def test_json_value_writes_what_the_envelope_accepts(value: object, expected: object) -> None:
    got = json_value(value)
    assert got == expected and type(got) is type(expected)
    canonicalize({"v": got})  # no floats, safe integers, string keys


def test_json_value_refuses_unknown_types() -> None:
    with pytest.raises(TypeError, match="object"):
        json_value(object())


def test_pk_text_single_and_composite() -> None:
    assert pk_text({"id": 7}, ["id"]) == "7"
    assert pk_text({"id": "a/b"}, ["id"]) == "a/b"
    assert pk_text({"id": uuid.UUID(int=2)}, ["id"]) == "00000000-0000-0000-0000-000000000002"
    assert pk_text({"flag": True}, ["flag"]) == "true"
    # Composite: canonical JSON, the same whatever order the columns are named in.
    a = pk_text({"order_id": 7, "line": 2}, ["order_id", "line"])
    b = pk_text({"line": 2, "order_id": 7}, ["line", "order_id"])
    assert a == b == '{"line":2,"order_id":7}'


def test_track_declaration() -> None:
    track = Track.of("public.accounts", pk=["id"], exclude=["pw"], mask=["ssn"])
    assert track == Track("public.accounts", ("id",), frozenset({"pw"}), frozenset({"ssn"}))
    with pytest.raises(ValueError, match="both excluded and masked"):
        Track.of("t", exclude=["a"], mask=["a"])
    assert target_type("public.accounts") == "db:public.accounts"
    assert ACTIONS == {"insert": "db.insert", "update": "db.update", "delete": "db.delete"}
    assert MASKED == {"masked": True}
