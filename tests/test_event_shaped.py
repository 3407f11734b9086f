"""The compiled fast path of bulk ingestion (:func:`sealtrail.event.encode_shaped`) against
the precise path it stands in for.

The contract: for any input, the fast path either declines (``None``) or returns exactly
the id and canonical bytes that :func:`prepare_unencoded` plus
:func:`canonicalize_prepared` give for the same event and ledger member. So an invalid
event always reaches the precise path, which names the field. The property runs over the
whole envelope domain, well formed and hostile; the explicit cases make sure the fast path
is really taken for common events (a dead fast path would pass the property trivially).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import enum
import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealtrail import InvalidEvent, event
from sealtrail.canonical import canonicalize_prepared, decode
from sealtrail.event import Limits, encode_shaped, prepare_unencoded
from sealtrail.ledger import INLINE_INDEX_MAX, Ledger
from sealtrail.note import Signer
from sealtrail.store.sqlite import SQLiteStore

RECEIVED = "2026-11-22T10:00:00.123456Z"
GENERATED_ID = "0192a000-0000-7000-8000-00000000abcd"
GENERATED_TIME = "2026-11-22T09:59:59.000001Z"


class Action(enum.StrEnum):
    LOGIN = "auth.login"


class Level(enum.IntEnum):
    HIGH = 7


class Sub(str):
    """A str subclass that is not an enum: msgspec cannot encode it."""


@contextlib.contextmanager
def fixed_clock() -> Iterator[None]:
    # Both paths fill a missing id and time through these module globals.
    with (
        mock.patch.object(event, "new_event_id", lambda: GENERATED_ID),
        mock.patch.object(event, "utc_now", lambda: GENERATED_TIME),
    ):
        yield


def precise(ev: Any, seq: int) -> tuple[str, bytes] | None:
    try:
        entry = prepare_unencoded(ev)
    except InvalidEvent:
        return None
    entry["ledger"] = {"received": RECEIVED, "seq": seq}
    try:
        body = canonicalize_prepared(entry)
    except InvalidEvent:
        return None
    return entry["id"], body


def assert_agrees(ev: Any, seq: int = 7) -> tuple[str, bytes] | None:
    with fixed_clock():
        fast = encode_shaped(ev, RECEIVED, seq)
        if fast is not None:
            assert fast == precise(ev, seq), ev
            assert type(fast[0]) is str
    return fast


# --------------------------------------------------------------------------------------
# Strategies over the envelope domain, common shapes and hostile ones alike

_CHARS = [
    "\x00", "\n", "\x1b", '"', "\\", "\x7f", "\u2028", "\u202e", "\ufeff", "\ue000", "\uffff",
    "\U0001f600", "é", "\ud800", "\udfff",
]  # fmt: skip
texts = st.one_of(
    st.text(max_size=8),
    st.text(st.sampled_from([*_CHARS, "a", "b"]), max_size=4),
    st.sampled_from(["", "alice", "user:42", "0"]),
)
nonempty = st.one_of(st.sampled_from(["alice", "user:42", "x"]), texts)
odd_strings = st.one_of(
    st.builds(Sub, st.sampled_from(["alice", "auth.login"])), st.just(Action.LOGIN)
)
ints = st.one_of(
    st.integers(-10, 10),
    st.sampled_from([2**53 - 1, -(2**53 - 1), 2**53, -(2**53), 2**63, -(2**64)]),
    st.just(Level.HIGH),
)
scalars = st.one_of(texts, ints, st.booleans(), st.none(), st.just(1.5), st.just(float("nan")))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(texts, inner, max_size=3),
        st.tuples(inner),
        st.dictionaries(st.integers(0, 3), inner, max_size=2),
        st.builds(collections.OrderedDict, st.dictionaries(texts, inner, max_size=2)),
    ),
    max_leaves=8,
)
ids = st.one_of(
    st.uuids(version=4).map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.uuids(),
    st.sampled_from(
        ["00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff", "x", ""]
    ),
    st.integers(),
)
times = st.one_of(
    st.sampled_from(
        [
            "2026-11-22T10:00:00.000000Z",
            "2026-02-30T10:00:00.000000Z",
            "2026-11-22T10:00:00Z",
            "2026-11-22T11:00:00.5+01:00",
            "2026-11-22T10:00:00",
            "2026-12-31T23:59:60Z",
            "2026-11-22t10:00:00.000000z",
        ]
    ),
    st.datetimes(timezones=st.just(datetime.UTC)),
    st.datetimes(),
    texts,
)
actions = st.one_of(
    st.sampled_from(["user.email.update", "auth.login", "a.b", "Auth.Login", "nodot", "a..b"]),
    st.from_regex(r"[a-z][a-z0-9_\-]{0,5}(\.[a-z][a-z0-9_\-]{0,5}){1,3}", fullmatch=True),
    odd_strings,
    texts,
    st.integers(),
)
actors = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "id": st.one_of(nonempty, odd_strings, st.none(), st.integers()),
            "type": st.sampled_from(["user", "service", "system", "anonymous", "robot", ""]),
            "on_behalf_of": nonempty,
            "role": texts,
        },
    ),
    nonempty,
    st.integers(),
)
ips = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded),
    st.sampled_from(["::ffff:192.0.2.1", "fe80::1%eth0", "256.1.1.1", "01.2.3.4", "x"]),
    st.integers(),
)
sources = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "ip": ips,
            "user_agent": texts,
            "request_id": texts,
            "trace_id": st.one_of(texts, st.none()),
            "service": texts,
            "host": texts,
            "port": st.integers(),
        },
    ),
    texts,
)
targets = st.one_of(
    st.fixed_dictionaries(
        {"type": st.one_of(nonempty, st.integers())},
        optional={"id": st.one_of(nonempty, st.integers()), "name": texts},
    ),
    st.fixed_dictionaries({}, optional={"id": nonempty}),
    texts,
)
change = st.one_of(
    st.fixed_dictionaries({}, optional={"old": scalars, "new": scalars}),
    st.fixed_dictionaries({"old": json_values, "new": json_values}),
    st.fixed_dictionaries({"new": scalars, "was": scalars}),
    scalars,
)
changes = st.one_of(
    st.dictionaries(st.one_of(texts, odd_strings), change, max_size=3),
    st.dictionaries(st.integers(), change, max_size=1),
    st.lists(change, max_size=1),
)
datas = st.one_of(
    st.dictionaries(texts, json_values, max_size=4),
    st.dictionaries(st.integers(), json_values, max_size=1),
    json_values,
)
envelopes = st.fixed_dictionaries(
    {"action": actions},
    optional={
        "id": ids,
        "time": times,
        "outcome": st.sampled_from(["success", "failure", "denied", "error", "ok", ""]),
        "actor": actors,
        "source": sources,
        "target": targets,
        "changes": changes,
        "reason": st.one_of(texts, st.none(), st.integers()),
        "tenant": st.one_of(nonempty, st.none()),
        "subject": st.one_of(nonempty, st.integers()),
        "data": datas,
        "schema": st.sampled_from([1, 2, True, "1"]),
        "ledger": st.just({"seq": 1}),
        "custom": json_values,
    },
)
# Mostly the common shape, so the fast path is exercised often, not only declined.
common = st.fixed_dictionaries(
    {
        "id": st.uuids(version=4).map(str),
        "time": st.just("2026-11-22T10:00:00.000000Z"),
        "action": st.sampled_from(["user.email.update", "auth.login"]),
    },
    optional={
        "outcome": st.sampled_from(["success", "denied"]),
        "actor": st.fixed_dictionaries({"id": nonempty}, optional={"type": st.just("user")}),
        "source": st.fixed_dictionaries({"ip": ips}, optional={"user_agent": texts}),
        "target": st.fixed_dictionaries({"type": nonempty}, optional={"id": nonempty}),
        "changes": st.dictionaries(
            texts, st.fixed_dictionaries({"old": scalars}, optional={"new": scalars}), max_size=3
        ),
        "tenant": nonempty,
        "reason": texts,
        "data": st.dictionaries(texts, json_values, max_size=3),
    },
)


@given(envelopes, st.integers(0, 2**40))
@settings(max_examples=1500)
def test_fast_path_agrees_with_precise_path_over_the_whole_domain(ev: Any, seq: int) -> None:
    assert_agrees(ev, seq)


@given(common)
@settings(max_examples=800)
def test_fast_path_agrees_on_common_events(ev: Any) -> None:
    assert_agrees(ev)


def test_common_event_takes_the_fast_path() -> None:
    ev = {
        "id": "0192a000-0000-7000-8000-000000000001",
        "time": "2026-11-22T10:00:00.000000Z",
        "action": "user.email.update",
        "actor": {"id": "user:1", "type": "user"},
        "source": {"ip": "203.0.113.7", "user_agent": "Mozilla/5.0", "request_id": "r-1"},
        "target": {"type": "user", "id": "1"},
        "changes": {"email": {"old": "a@example.com", "new": "b@example.com"}},
        "tenant": "acme",
        "reason": "user request",
        "data": {"plan": "pro", "seats": 12, "tags": ["a", "b"], "nested": {"k": None}},
    }
    fast = assert_agrees(ev)
    assert fast is not None
    assert decode(fast[1])["ledger"] == {"received": RECEIVED, "seq": 7}
    # Normalised on the way, as the precise path does.
    for variant in (
        {"action": "auth.login"},
        {"action": Action.LOGIN},
        {"action": "a.b", "source": {"ip": "2001:0db8:0000:0000:0000:0000:0000:0001"}},
        {"action": "a.b", "source": {"ip": "::ffff:192.0.2.1"}},
        {"action": "a.b", "id": "0192A000-0000-7000-8000-000000000001"},
        {"action": "a.b", "time": "2026-11-22T11:00:00.5+01:00"},
        {"action": "a.b", "changes": {"level": {"new": Level.HIGH}}},
        {"action": "a.b", "changes": {"x": {"new": 2**53 - 1}}},
        {"action": "a.b", "data": {"x": (1, 2), "y": collections.OrderedDict(b=1, a=[{}])}},
        {"action": "a.b", "data": {"a": {"b": {"c": {"d": 1}}}}},
    ):
        assert assert_agrees(variant) is not None, variant


@pytest.mark.parametrize(
    "ev",
    [
        {"action": "a.b", "ledger": {"seq": 1}},
        {"action": "a.b", "custom": 1},
        {"action": "a.b", "data": {"x": 1.5}},
        {"action": "a.b", "data": {1: "x"}},
        {"action": "a.b", "data": {"x": 2**53}},
        {"action": "a.b", "data": []},
        {"action": "a.b", "data": {"a": {"b": {"c": {"d": {"e": 1}}}}}},
        {"action": "a.b", "changes": {"x": {}}},
        {"action": "a.b", "changes": {"x": {"new": 2**53}}},
        {"action": "a.b", "changes": {"x": {"new": "\ud800"}}},
        {"action": "a.b", "changes": {"\ue000": {"new": 1}, "\U0001f600": {"new": 2}}},
        {"action": "a.b", "actor": {}},
        {"action": "a.b", "actor": {"on_behalf_of": "x"}},
        {"action": "a.b", "actor": {"id": Sub("alice")}},
        {"action": "a.b", "actor": "alice"},
        {"action": "a.b", "id": "00000000-0000-0000-0000-000000000000"},
        {"action": "a.b", "id": uuid.uuid4()},
        {"action": "a.b", "time": "2026-02-30T10:00:00.000000Z"},
        {"action": "a.b", "time": datetime.datetime.now(datetime.UTC)},
        {"action": "a.b", "source": {"ip": "fe80::1%eth0"}},
        {"action": "a.b", "schema": True},
        {"action": "a.b", "tenant": ""},
        {"action": "A.b"},
        collections.OrderedDict(action="a.b"),
    ],
)
def test_fast_path_declines_what_it_cannot_stand_for(ev: Any) -> None:
    assert encode_shaped(ev, RECEIVED, 7) is None


def test_bulk_append_reports_the_precise_error_and_stores_nothing(tmp_path: Any) -> None:
    ledger = Ledger(SQLiteStore(tmp_path / "t.db"), Signer.generate("test/log"))
    ledger.initialize()
    batch: list[dict[str, Any]] = [
        {"action": "user.login", "actor": {"id": f"u{i}"}} for i in range(INLINE_INDEX_MAX + 10)
    ]
    batch[200] = {"action": "user.login", "changes": {"x": {"new": 1.5}}}
    with pytest.raises(InvalidEvent) as info:
        ledger.append_many(batch)
    assert info.value.field == "changes.x.new"
    assert ledger.size() == 0
    del batch[200]
    results = ledger.append_many(batch)
    assert [r.seq for r in results] == list(range(len(batch)))
    assert ledger.verify().ok
    ledger.close()


def test_depth_limit_is_the_precise_paths() -> None:
    deep = {"action": "a.b", "data": {"a": {"b": {"c": {"d": 1}}}}}  # containers to level 5
    with fixed_clock():
        assert encode_shaped(deep, RECEIVED, 1, Limits(max_depth=5)) is not None
        assert encode_shaped(deep, RECEIVED, 1, Limits(max_depth=4)) is None
        with pytest.raises(InvalidEvent):
            prepare_unencoded(deep, limits=Limits(max_depth=4))


def test_a_msgspec_that_encodes_differently_turns_the_fast_path_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert event._fast_path_on and event._fast_path_agrees()
    real = event._encode_sorted
    for before, after in ((b"\\u001f", b"\\u001F"), (b"\xe2\x80\xa8", b"\\u2028"), (b"/", b"\\/")):
        monkeypatch.setattr(
            event, "_encode_sorted", lambda env, a=before, b=after: real(env).replace(a, b)
        )
        assert not event._fast_path_agrees(), before
