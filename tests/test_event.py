"""Event envelope v1: every rule, accepted and refused, with the field it names."""

from __future__ import annotations

import copy
import enum
import json
import re
import threading
import uuid
from collections import OrderedDict
from datetime import UTC, datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

import sealtrail.event as event_module
from sealtrail import InvalidEvent
from sealtrail.canonical import canonicalize
from sealtrail.event import (
    ACTOR_TYPES,
    DEFAULT_LIMITS,
    OUTCOMES,
    RESERVED_FIELDS,
    SCHEMA_VERSION,
    BadLine,
    Limits,
    new_event_id,
    parse_canonical,
    parse_event,
    parse_jsonl,
    prepare_canonical,
    prepare_event,
    utc_now,
)

EVENT_ID = "0190b6a2-8f1e-7c3a-9d4b-2f6e8a1c3b5d"
NOW = "2026-01-31T12:00:00.000000Z"
TIME_FORM = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")
UUID_FORM = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def typical() -> dict[str, Any]:
    """A typical 15-field event, as an application would send it."""
    return {
        "id": EVENT_ID,
        "time": "2026-01-31T12:00:00.123456Z",
        "action": "user.email.update",
        "outcome": "success",
        "actor": {"id": "u_123", "type": "user", "on_behalf_of": "admin_7"},
        "source": {
            "ip": "203.0.113.7",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0",
            "request_id": "req-8f2a",
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "service": "accounts",
            "host": "web-3",
        },
        "target": {"type": "user", "id": "u_123"},
        "changes": {"email": {"old": "a@example.com", "new": "b@example.com"}},
        "reason": "user request",
        "tenant": "acme",
        "subject": "u_123",
        "data": {"mfa": True, "attempt": 1, "tags": ["x", "y"]},
        "schema": 1,
    }


def with_(**fields: object) -> dict[str, object]:
    event: dict[str, object] = {"action": "auth.login"}
    event.update(fields)
    return event


def refused(event: object, field: str, reason: str = "", **kwargs: Any) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        prepare_event(event, **kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field, caught.value
    assert re.search(reason, caught.value.reason), caught.value.reason
    return caught.value


# --------------------------------------------------------------------------------------
# Constants and the happy path


def test_constants() -> None:
    assert SCHEMA_VERSION == 1
    assert {"success", "failure", "denied", "error"} == OUTCOMES
    assert {"user", "service", "system", "anonymous"} == ACTOR_TYPES
    assert {"ledger"} == RESERVED_FIELDS
    assert Limits(max_bytes=65536, max_depth=32) == DEFAULT_LIMITS


def test_typical_event_is_kept_as_sent() -> None:
    event = typical()
    assert prepare_event(event) == event


def test_minimal_event_gets_id_time_outcome_and_schema() -> None:
    prepared = prepare_event({"action": "auth.login"})
    assert set(prepared) == {"action", "id", "time", "outcome", "schema"}
    assert UUID_FORM.match(str(prepared["id"]))
    assert uuid.UUID(str(prepared["id"])).version == 7
    assert TIME_FORM.match(str(prepared["time"]))
    assert prepared["outcome"] == "success"
    assert prepared["schema"] == 1


def test_now_fills_the_time() -> None:
    assert prepare_event(with_(), now=NOW)["time"] == NOW
    assert prepare_event(with_(), now="2026-01-31T13:00:00+01:00")["time"] == NOW
    # a client time wins over now: it is recorded as claimed
    assert prepare_event(with_(time="2020-01-01T00:00:00Z"), now=NOW)["time"] == (
        "2020-01-01T00:00:00.000000Z"
    )


def test_input_is_not_mutated() -> None:
    event = typical()
    event["actor"] = "u_1"
    event["source"]["ip"] = "2001:DB8::1"
    event["time"] = "2026-01-31T13:00:00+01:00"
    del event["id"]
    snapshot = copy.deepcopy(event)
    prepared = prepare_event(event)
    assert event == snapshot
    assert prepared is not event
    assert prepared["actor"] == {"id": "u_1"}
    assert prepared["source"]["ip"] == "2001:db8::1"
    # the known objects are new objects: editing the result does not reach the input
    prepared["source"]["host"] = "elsewhere"
    assert event["source"]["host"] == "web-3"


def _containers(value: object) -> list[object]:
    if isinstance(value, dict):
        return [value, *(c for item in value.values() for c in _containers(item))]
    if isinstance(value, list):
        return [value, *(c for item in value for c in _containers(item))]
    return []


def test_result_shares_nothing_mutable_with_the_input() -> None:
    event = typical()
    event["extra"] = {"deep": [{"x": [1]}]}
    event["changes"]["tags"] = {"old": ["a"], "new": {"k": ["b"]}}
    prepared = prepare_event(event)
    mine = {id(container) for container in _containers(event)}
    assert not mine & {id(container) for container in _containers(prepared)}
    event["data"]["tags"].append(1.5)  # the application reuses its dict afterwards
    event["extra"]["deep"][0]["x"].append("later")
    assert prepared["data"]["tags"] == ["x", "y"]
    assert prepared["extra"] == {"deep": [{"x": [1]}]}


def test_result_is_a_plain_dict_from_any_mapping() -> None:
    prepared = prepare_event(MappingProxyType(with_(data=OrderedDict(b=1, a=(1, 2)))))
    assert type(prepared) is dict
    assert type(prepared["data"]) is dict
    assert prepared["data"] == {"b": 1, "a": [1, 2]}


def test_unknown_fields_survive() -> None:
    extra = {"category_uid": 3, "http": {"method": "POST", "path": "/x"}, "x y": [1, None]}
    prepared = prepare_event(with_(**extra))
    for key, value in extra.items():
        assert prepared[key] == value
    # inside the known objects too
    prepared = prepare_event(
        with_(
            actor={"id": "u", "name": "Ada"},
            source={"ip": "::1", "geo": {"cc": "FR"}},
            target={"type": "doc", "id": "7", "name": "Plan"},
        )
    )
    assert prepared["actor"]["name"] == "Ada"
    assert prepared["source"]["geo"] == {"cc": "FR"}
    assert prepared["target"]["name"] == "Plan"


def test_prepare_canonical_returns_the_canonical_bytes() -> None:
    prepared, data = prepare_canonical(typical())
    assert data == canonicalize(prepared) == rfc8785.dumps(prepared)


def test_canonical_bytes_use_utf16_key_order() -> None:
    event = with_(id=EVENT_ID, time=NOW, data={"\ue000": 1, "\U0001f600": 2, "a": {"\uff01": 3}})
    prepared, data = prepare_canonical(event)
    assert data == rfc8785.dumps(prepared)
    assert data.index("\U0001f600".encode()) < data.index("\ue000".encode())
    assert parse_canonical(data) == (prepared, data)


def test_not_a_mapping() -> None:
    for value in ([], "x", None, 3):
        refused(value, "", "JSON object")


# --------------------------------------------------------------------------------------
# action


@pytest.mark.parametrize(
    "action",
    ["auth.login", "user.email.update", "a.b", "x1.y_2.z-3", "a." + "b" * 126],
)
def test_action_accepted(action: str) -> None:
    assert prepare_event(with_(action=action))["action"] == action


@pytest.mark.parametrize(
    ("action", "reason"),
    [
        ("login", "at least two"),
        ("", "at least two"),
        ("Auth.login", "lowercase"),
        ("auth.Login", "lowercase"),
        ("auth..login", "empty segment"),
        (".auth.login", "empty segment"),
        ("auth.login.", "empty segment"),
        ("1auth.login", "start with a lowercase letter"),
        ("auth.log in", "only a-z"),
        ("auth.login\n", "only a-z"),
        ("auth.lo\u0261in", "only a-z"),
        ("a." + "b" * 127, "129 characters.*at most 128"),
        (42, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_action_refused(action: object, reason: str) -> None:
    refused(with_(action=action), "action", reason)


def test_action_remembered_only_when_valid() -> None:
    for _ in range(2):  # the second time through the cache of valid actions
        assert prepare_event(with_(action="cache.check"))["action"] == "cache.check"
        refused(with_(action="cache.Check"), "action", "lowercase")
    assert "cache.Check" not in event_module._VALID_ACTIONS


def test_action_required() -> None:
    refused({"outcome": "success"}, "action", "required")


# --------------------------------------------------------------------------------------
# id


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (EVENT_ID, EVENT_ID),
        (EVENT_ID.upper(), EVENT_ID),
        (EVENT_ID.replace("-", ""), EVENT_ID),
        ("6ba7b810-9dad-11d1-80b4-00c04fd430c8", "6ba7b810-9dad-11d1-80b4-00c04fd430c8"),  # v1
        ("16fd2706-8baf-433b-82eb-8c7fada847da", "16fd2706-8baf-433b-82eb-8c7fada847da"),  # v4
        (uuid.UUID(EVENT_ID), EVENT_ID),
    ],
)
def test_id_accepted_and_normalised(given: object, stored: str) -> None:
    assert prepare_event(with_(id=given))["id"] == stored


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("nope", "not a UUID"),
        (EVENT_ID + "0", "not a UUID"),
        (EVENT_ID + "\n", "not a UUID"),
        ("{" + EVENT_ID + "}", "not a UUID"),
        ("urn:uuid:" + EVENT_ID, "not a UUID"),
        ("0190b6a2-8f1e-7c3a-9d4b-2f6e8a1c3b5g", "not a UUID"),
        ("00000000-0000-0000-0000-000000000000", "nil"),
        ("FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF", "max"),
        (12345, "must be a UUID string"),
        (None, "must be a UUID string"),
    ],
)
def test_id_refused(given: object, reason: str) -> None:
    refused(with_(id=given), "id", reason)


# --------------------------------------------------------------------------------------
# time


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("2026-01-31T12:00:00Z", "2026-01-31T12:00:00.000000Z"),
        ("2026-01-31T12:00:00.123456Z", "2026-01-31T12:00:00.123456Z"),
        ("2026-01-31t12:00:00.5z", "2026-01-31T12:00:00.500000Z"),
        ("2026-01-31T12:00:00.123456789Z", "2026-01-31T12:00:00.123456Z"),  # truncated
        ("2026-01-31T13:30:00+01:30", "2026-01-31T12:00:00.000000Z"),
        ("2026-01-31T07:00:00-05:00", "2026-01-31T12:00:00.000000Z"),
        ("2026-01-01T00:30:00+01:00", "2025-12-31T23:30:00.000000Z"),
        ("2026-01-31T12:00:00-00:00", "2026-01-31T12:00:00.000000Z"),
        ("2024-02-29T00:00:00Z", "2024-02-29T00:00:00.000000Z"),
        ("2024-02-29T23:59:59.999999Z", "2024-02-29T23:59:59.999999Z"),
        ("2026-12-31T00:00:00.000000Z", "2026-12-31T00:00:00.000000Z"),
        ("0001-01-01T00:00:00.000000Z", "0001-01-01T00:00:00.000000Z"),
        (datetime(2026, 1, 31, 13, tzinfo=timezone(timedelta(hours=1))), NOW),
    ],
)
def test_time_accepted_and_normalised_to_utc(given: object, stored: str) -> None:
    assert prepare_event(with_(time=given))["time"] == stored


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("2026-01-31T12:00:00", "no timezone"),
        ("2026-01-31T12:00:00.123", "no timezone"),
        ("2026-01-31 12:00:00", "no timezone"),
        ("2026-02-30T12:00:00Z", "not a real date"),
        ("2026-02-30T12:00:00.000000Z", "not a real date"),
        ("2025-02-29T12:00:00Z", "not a real date"),
        ("2025-02-29T12:00:00.000000Z", "not a real date"),
        ("2026-04-31T00:00:00.000000Z", "not a real date"),
        ("0000-01-01T00:00:00.000000Z", "not a real date"),
        ("2026-01-31T24:00:00.000000Z", "not a real date"),
        ("2026-00-10T00:00:00.000000Z", "not a real date"),
        ("2026-13-01T12:00:00Z", "not a real date"),
        ("2026-01-31T24:00:00Z", "not a real date"),
        ("2026-01-31T12:60:00Z", "not a real date"),
        ("2026-01-31T23:59:60Z", "leap second"),
        ("0000-01-01T00:00:00Z", "not a real date"),
        ("0001-01-01T00:00:00+01:00", "not a real date"),
        ("2026-01-31T12:00:00+24:00", "impossible UTC offset"),
        ("2026-01-31T12:00:00+05:60", "impossible UTC offset"),
        ("2026-01-31", "not an RFC 3339"),
        ("2026-W05-6T12:00:00Z", "not an RFC 3339"),
        ("20260131T120000Z", "not an RFC 3339"),
        ("2026-01-31T12:00Z", "not an RFC 3339"),
        ("2026-01-31T12:00:00.Z", "not an RFC 3339"),
        ("2026-01-31T12:00:00Z\n", "not an RFC 3339"),
        ("\uff12026-01-31T12:00:00Z", "not an RFC 3339"),  # a fullwidth digit
        ("２０２６-01-31T12:00:00.000000Z", "not an RFC 3339"),
        (1767182400, "RFC 3339 string"),
        (datetime(2026, 1, 31, 12), "naive"),
    ],
)
def test_time_refused(given: object, reason: str) -> None:
    refused(with_(time=given), "time", reason)


def test_time_bad_now_is_refused() -> None:
    refused(with_(), "time", "no timezone", now="2026-01-31T12:00:00")


# --------------------------------------------------------------------------------------
# outcome, schema, string fields


@pytest.mark.parametrize("outcome", sorted(OUTCOMES))
def test_outcome_accepted(outcome: str) -> None:
    assert prepare_event(with_(outcome=outcome))["outcome"] == outcome


@pytest.mark.parametrize("outcome", ["ok", "SUCCESS", "", None, 1, ["success"]])
def test_outcome_refused(outcome: object) -> None:
    refused(with_(outcome=outcome), "outcome")


class Outcome(enum.StrEnum):
    DENIED = "denied"


def test_string_enums_become_plain_strings() -> None:
    prepared = prepare_event(with_(outcome=Outcome.DENIED, tenant=Outcome.DENIED))
    assert type(prepared["outcome"]) is str
    assert prepared["outcome"] == "denied"
    assert type(prepared["tenant"]) is str


@pytest.mark.parametrize(
    ("schema", "reason"),
    [(2, "unsupported schema version 2"), (0, "unsupported"), (True, "integer 1"), ("1", "1")],
)
def test_schema_refused(schema: object, reason: str) -> None:
    refused(with_(schema=schema), "schema", reason)


def test_schema_is_checked_first() -> None:
    # a version-2 event is refused for its version, not for what version 1 thinks of it
    refused({"schema": 2, "action": "NOT VALID"}, "schema")


@pytest.mark.parametrize("field", ["tenant", "subject"])
def test_identifier_strings(field: str) -> None:
    assert prepare_event(with_(**{field: "t-1"}))[field] == "t-1"
    refused(with_(**{field: ""}), field, "must not be empty")
    refused(with_(**{field: 7}), field, "must be a string")
    refused(with_(**{field: None}), field, "omit the field")


def test_reason() -> None:
    assert prepare_event(with_(reason=""))["reason"] == ""
    assert prepare_event(with_(reason="ticket 7\nline 2"))["reason"] == "ticket 7\nline 2"
    refused(with_(reason=["x"]), "reason", "must be a string")


def test_ledger_is_reserved() -> None:
    refused(with_(ledger={"seq": 1}), "ledger", "reserved")
    refused(with_(ledger=None), "ledger", "reserved")


# --------------------------------------------------------------------------------------
# actor


@pytest.mark.parametrize(
    ("actor", "stored"),
    [
        ("u_1", {"id": "u_1"}),
        ({"id": "u_1"}, {"id": "u_1"}),
        ({"type": "anonymous"}, {"type": "anonymous"}),
        ({"id": "svc", "type": "service", "on_behalf_of": "u_9"},) * 2,
        ({"id": "u", "type": "user", "roles": ["admin"]},) * 2,
    ],
)
def test_actor_accepted(actor: object, stored: object) -> None:
    assert prepare_event(with_(actor=actor))["actor"] == stored


@pytest.mark.parametrize("kind", sorted(ACTOR_TYPES))
def test_actor_types(kind: str) -> None:
    assert prepare_event(with_(actor={"type": kind}))["actor"] == {"type": kind}


@pytest.mark.parametrize(
    ("actor", "field", "reason"),
    [
        ({"type": "robot"}, "actor.type", "must be one of"),
        ({"type": "User"}, "actor.type", "must be one of"),
        ({"type": 1}, "actor.type", "must be a string"),
        ({"id": 42}, "actor.id", "must be a string"),
        ({"id": ""}, "actor.id", "must not be empty"),
        ({"id": "u", "on_behalf_of": 3}, "actor.on_behalf_of", "must be a string"),
        ({"on_behalf_of": "u"}, "actor", "needs an id or a type"),
        ({}, "actor", "needs an id or a type"),
        ("", "actor", "must not be empty"),
        (42, "actor", "object"),
        (["u"], "actor", "object"),
        ({"id": "u", "score": 0.5}, "actor.score", "use a string or an integer"),
        ({"id": "u", 1: "x"}, "actor", "keys must be strings"),
    ],
)
def test_actor_refused(actor: object, field: str, reason: str) -> None:
    refused(with_(actor=actor), field, reason)


# --------------------------------------------------------------------------------------
# source


@pytest.mark.parametrize(
    ("ip", "stored"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("0.0.0.0", "0.0.0.0"),
        ("255.255.255.255", "255.255.255.255"),
        ("::1", "::1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("2001:0db8::0001", "2001:db8::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),  # IPv4-mapped: stored as IPv4
        ("::ffff:c000:201", "192.0.2.1"),
        ("64:ff9b::192.0.2.1", "64:ff9b::c000:201"),
    ],
)
def test_source_ip_normalised(ip: str, stored: str) -> None:
    assert prepare_event(with_(source={"ip": ip}))["source"] == {"ip": stored}


@pytest.mark.parametrize(
    "ip",
    [
        "999.1.1.1",
        "1.2.3.4\n",
        " 1.2.3.4",
        "1.2.3",
        "1.2.3.4.5",
        "01.2.3.4",
        "1.2.3.4/24",
        "١.٢.٣.٤",  # Arabic-Indic digits
        "example.com",
        "",
        "::1::1",
        "fe80::1%eth0",
        "fe80::1%\n[forged]",
        "2001:db8::g",
        42,
        None,
    ],
)
def test_source_ip_refused(ip: object) -> None:
    refused(with_(source={"ip": ip}), "source.ip")


def test_source_strings() -> None:
    source = {
        "user_agent": "curl/8",
        "request_id": "r",
        "trace_id": "t",
        "service": "s",
        "host": "h",
        "port": 443,
    }
    assert prepare_event(with_(source=source))["source"] == source
    for key in ("user_agent", "request_id", "trace_id", "service", "host"):
        refused(with_(source={key: 1}), f"source.{key}", "must be a string")
    refused(with_(source="1.2.3.4"), "source", "must be an object")
    refused(with_(source={"geo": {"lat": 1.5}}), "source.geo.lat", "use a string")


# --------------------------------------------------------------------------------------
# target


@pytest.mark.parametrize(
    "target",
    [
        {"type": "user", "id": "u_1"},
        {"type": "order_line", "id": "order=7,line=2"},  # a composite key, as a string
        {"type": "report"},
        {"type": "doc", "id": "9", "name": "x"},
    ],
)
def test_target_accepted(target: dict[str, object]) -> None:
    assert prepare_event(with_(target=target))["target"] == target


@pytest.mark.parametrize(
    ("target", "field", "reason"),
    [
        ({"id": "u"}, "target.type", "required"),
        ({"type": "", "id": "u"}, "target.type", "must not be empty"),
        ({"type": 3}, "target.type", "must be a string"),
        ({"type": "order", "id": 42}, "target.id", "composite keys as strings"),
        ({"type": "order", "id": [7, 2]}, "target.id", "composite keys as strings"),
        ({"type": "order", "id": ""}, "target.id", "must not be empty"),
        ("user:1", "target", "must be an object"),
    ],
)
def test_target_refused(target: object, field: str, reason: str) -> None:
    refused(with_(target=target), field, reason)


# --------------------------------------------------------------------------------------
# changes


@pytest.mark.parametrize(
    "changes",
    [
        {"email": {"old": "a@x", "new": "b@x"}},
        {"role": {"new": "admin"}},
        {"deleted_at": {"old": None}},
        {"tags": {"old": ["a"], "new": ["a", "b"]}, "meta": {"new": {"k": {"n": 1}}}},
        {},
    ],
)
def test_changes_accepted(changes: dict[str, object]) -> None:
    assert prepare_event(with_(changes=changes))["changes"] == changes


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"email": {"old": "a", "new": "b", "by": "x"}}, "changes.email.by", "only 'old'"),
        ({"email": {"before": "a"}}, "changes.email.before", "only 'old'"),
        ({"email": {}}, "changes.email", "empty"),
        ({"email": "b@x"}, "changes.email", "object with 'old'"),
        ({"email": None}, "changes.email", "object with 'old'"),
        ({"": {"new": 1}}, "changes", "must not be empty"),
        ({"price": {"new": 9.99}}, "changes.price.new", "use a string or an integer"),
        ({"a": {"new": {"b": [1.5]}}}, "changes.a.new.b[0]", "use a string"),
        ({1: {"new": 1}}, "changes", "keys must be strings"),
        (["email"], "changes", "mapping field names"),
    ],
)
def test_changes_refused(changes: object, field: str, reason: str) -> None:
    refused(with_(changes=changes), field, reason)


# --------------------------------------------------------------------------------------
# data and the generic rules for the whole document


def test_data_must_be_an_object() -> None:
    assert prepare_event(with_(data={}))["data"] == {}
    refused(with_(data=[1]), "data", "must be an object")
    refused(with_(data="x"), "data", "must be an object")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (float("nan"), "NaN and Infinity"),
        (float("inf"), "NaN and Infinity"),
        (1.5, "use a string or an integer"),
        (1e3, "use a string or an integer"),
        (2**53, "safe range"),
        (uuid.UUID(int=5), "unsupported type uuid.UUID"),
        (datetime(2026, 1, 1), "unsupported type datetime.datetime"),
        (b"raw", "unsupported type bytes"),
        ({1, 2}, "unsupported type set"),
        ("\ud800", "lone surrogate"),
    ],
)
def test_generic_rules_name_the_deep_field(value: object, reason: str) -> None:
    refused(with_(data={"items": [0, 1, 2, {"x": value}]}), "data.items[3].x", reason)
    refused(with_(custom=value), "custom", reason)


def test_lone_surrogates_everywhere() -> None:
    refused(with_(reason="\udc00"), "reason", "lone surrogate")
    refused(with_(actor="u\ud800"), "actor.id", "lone surrogate")
    refused(with_(source={"host": "h\ud800"}), "source.host", "lone surrogate")
    refused(with_(data={"k\ud800": 1}), "data", "lone surrogate")
    refused(with_(**{"x\ud800": 1}), "", "lone surrogate")


def test_non_string_keys() -> None:
    refused({"action": "auth.login", 1: "x"}, "", "field names must be strings")
    refused(with_(data={"a": {2: "x"}}), "data.a", "keys must be strings")
    refused(with_(data={"a": [{None: 1}]}), "data.a[0]", "keys must be strings")


def test_depth_limit() -> None:
    def nested(levels: int) -> dict[str, object]:
        value: dict[str, object] = {}
        for _ in range(levels):
            value = {"k": value}
        return value

    # the event is level 1 and data level 2, so data may hold 30 more levels
    prepare_event(with_(data=nested(30)))
    # the first container beyond the limit is named: level 33
    error = refused(with_(data=nested(31)), "data" + ".k" * 31, "nested deeper than 32")
    assert "RecursionError" not in error.reason
    refused(with_(data=nested(5)), "data.k.k.k", "deeper than 4", limits=Limits(max_depth=4))
    refused(with_(data=nested(100_000)), "data" + ".k" * 31, "nested deeper")


def test_depth_bomb_of_lists() -> None:
    bomb: list[object] = []
    for _ in range(100_000):
        bomb = [bomb]
    refused(with_(data={"bomb": bomb}), "data.bomb" + "[0]" * 30, "nested deeper")


def test_size_limit_names_size_and_limit() -> None:
    big = with_(id=EVENT_ID, time=NOW, data={"blob": "x" * (1 << 20)})
    error = refused(big, "", r"1048\d\d\d bytes when canonicalised.*limit of 65536")
    size = int(re.search(r"(\d+) bytes", error.reason).group(1))  # type: ignore[union-attr]
    assert size == len(canonicalize({**big, "outcome": "success", "schema": 1}))
    assert prepare_event(big, limits=Limits(max_bytes=2 << 20))["data"] == big["data"]


def test_size_limit_is_exact() -> None:
    event = with_(id=EVENT_ID, time=NOW, data={"blob": ""})
    size = len(prepare_canonical(event)[1])
    assert prepare_event(event, limits=Limits(max_bytes=size))
    refused(event, "", f"{size} bytes.*limit of {size - 1}", limits=Limits(max_bytes=size - 1))


@pytest.mark.parametrize(
    "kwargs", [{"max_bytes": 0}, {"max_depth": 0}, {"max_depth": 2}, {"max_depth": 255}]
)
def test_impossible_limits(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)


@settings(max_examples=40)
@given(
    st.dictionaries(
        st.text(max_size=8).filter(lambda key: key not in event_module._KNOWN_FIELDS | {"ledger"}),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner),
            max_leaves=10,
        ),
        max_size=5,
    )
)
def test_any_unknown_fields_survive_and_canonicalise(extra: dict[str, object]) -> None:
    event = {**typical(), **extra}
    prepared, data = prepare_canonical(event)
    assert prepared == event
    assert data == rfc8785.dumps(prepared)
    assert parse_event(data) == prepared


# --------------------------------------------------------------------------------------
# parse_event: JSON in


def test_parse_event_round_trip() -> None:
    prepared, data = prepare_canonical(typical())
    assert parse_event(data) == prepared
    assert parse_event(data.decode()) == prepared
    assert parse_canonical(data) == (prepared, data)


def test_parse_event_normalises_like_prepare() -> None:
    text = json.dumps(
        {
            "action": "auth.login",
            "id": EVENT_ID.upper(),
            "time": "2026-01-31T13:00:00+01:00",
            "source": {"ip": "::FFFF:10.0.0.1"},
            "actor": "u",
        }
    )
    assert parse_event(text) == {
        "action": "auth.login",
        "id": EVENT_ID,
        "time": NOW,
        "source": {"ip": "10.0.0.1"},
        "actor": {"id": "u"},
        "outcome": "success",
        "schema": 1,
    }


def parse_refused(data: bytes | str, field: str, reason: str = "", **kwargs: Any) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(data, **kwargs)
    assert caught.value.field == field, caught.value
    assert re.search(reason, caught.value.reason), caught.value.reason


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b'{"action":"auth.login","action":"auth.logout"}', "action"),
        (b'{"action":"a.b","data":{"k":1,"k":2}}', "data.k"),
        (b'{"action":"a.b","actor":{"id":"u","id":"v"}}', "actor.id"),
        (b'{"action":"a.b","source":{"ip":"::1","ip":"::2"}}', "source.ip"),
        (b'{"action":"a.b","data":{"\\u006b":1,"k":2}}', "data.k"),
    ],
)
def test_parse_refuses_duplicate_keys(data: bytes, field: str) -> None:
    parse_refused(data, field, "duplicate key")


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        (b'{"action":"a.b","data":{"x":NaN}}', "", "NaN and Infinity"),
        (b'{"action":"a.b","data":{"x":Infinity}}', "", "NaN and Infinity"),
        (b'{"action":"a.b","data":{"x":-Infinity}}', "", "NaN and Infinity"),
        (b'{"action":"a.b","data":{"x":1.5}}', "data.x", "1.5 has a fraction"),
        (b'{"action":"a.b","data":{"x":[1e3]}}', "data.x[0]", "1e3 has a fraction or exponent"),
        (b'{"action":"a.b","custom":1.0}', "custom", "use a string or an integer"),
        (b'{"action":"a.b","data":{"x":18446744073709551616}}', "data.x", "safe range"),
        (b'{"action":"a.b","data":{"x":9007199254740992}}', "data.x", "safe range"),
        (b'{"action":"a.b","tenant":1.5}', "tenant", "must be a string"),
    ],
)
def test_parse_refuses_numbers_outside_the_envelope(data: bytes, field: str, reason: str) -> None:
    parse_refused(data, field, reason)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b'{"action":"a.b","reason":"\\ud800"}', "reason"),
        (b'{"action":"a.b","data":{"x":["\\udfff"]}}', "data.x[0]"),
        ('{"action":"a.b","reason":"\ud800"}', "reason"),
    ],
)
def test_parse_refuses_lone_surrogates(data: bytes | str, field: str) -> None:
    parse_refused(data, field, "lone surrogate")


def test_parse_refuses_invalid_utf8_and_non_objects() -> None:
    parse_refused(b'{"action":"a.b","reason":"\xff"}', "", "not valid UTF-8")
    parse_refused(b'[{"action":"a.b"}]', "", "JSON object")
    parse_refused(b'"a.b"', "", "JSON object")
    parse_refused(b"{", "", "not valid JSON")


def test_parse_depth_bomb() -> None:
    parse_refused(b'{"action":"a.b","data":' + b"[" * 100_000, "", "100023 bytes, over the limit")
    bomb = b'{"action":"a.b","data":{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    parse_refused(bomb, "", "nested deeper than 32", limits=Limits(max_bytes=1 << 20))
    nested = b'{"action":"a.b","data":{"x":' + b"[" * 40 + b"]" * 40 + b"}}"
    parse_refused(nested, "data.x" + "[0]" * 30, "nested deeper than 32")


def test_parse_size_limit_before_parsing() -> None:
    parse_refused(b"{" * 70_000, "", "70000 bytes, over the limit of 65536")


# --------------------------------------------------------------------------------------
# parse_jsonl


def test_parse_jsonl_reports_every_bad_line() -> None:
    lines = [
        b'{"action":"auth.login","id":"' + EVENT_ID.encode() + b'"}',
        b"",
        b"not json",
        b'{"action":"x"}',
        b"   ",
        b'{"action":"a.b","time":"2026-02-30T00:00:00Z"}',
        b'{"action":"a.b","data":{"k":1,"k":2}}',
        b'{"action":"a.b","source":{"ip":"999.1.1.1"}}\r',
        b'{"action":"a.b","tenant":"t"}',
    ]
    events, bad = parse_jsonl(b"\n".join(lines) + b"\n")
    assert [event["action"] for event in events] == ["auth.login", "a.b"]
    assert [(line.line, line.field) for line in bad] == [
        (3, ""),
        (4, "action"),
        (6, "time"),
        (7, "data.k"),
        (8, "source.ip"),
    ]
    assert bad[1].reason.startswith("action: ")
    assert all(isinstance(line, BadLine) for line in bad)


def test_parse_jsonl_accepts_text_and_iterables() -> None:
    text = '{"action":"a.b"}\n\n{"action":"c.d","reason":"\u2028 is not a line break"}\n'
    events, bad = parse_jsonl(text)
    assert bad == []
    assert [event["action"] for event in events] == ["a.b", "c.d"]
    events, bad = parse_jsonl(iter(['{"action":"a.b"}\n', b'{"action":"c.d"}\r\n', "\n", "x"]))
    assert len(events) == 2
    assert [line.line for line in bad] == [4]
    events, bad = parse_jsonl([b'{"action":"a.b"}', 42])  # type: ignore[list-item]
    assert [line.line for line in bad] == [2]


def test_parse_jsonl_a_record_spans_one_line() -> None:
    events, bad = parse_jsonl(['{"action":\n"a.b"}'])
    assert events == []
    assert bad[0].line == 1
    assert "one line" in bad[0].reason
    # split text: the two halves are two bad lines
    events, bad = parse_jsonl('{"action":\n"a.b"}')
    assert [line.line for line in bad] == [1, 2]


def test_parse_jsonl_skips_a_byte_order_mark() -> None:
    events, bad = parse_jsonl(b'\xef\xbb\xbf{"action":"a.b"}\n')
    assert len(events) == 1
    assert bad == []


def test_parse_jsonl_empty() -> None:
    assert parse_jsonl(b"") == ([], [])
    assert parse_jsonl("\n\n") == ([], [])


# --------------------------------------------------------------------------------------
# new_event_id and utc_now


def test_new_event_id_format_version_and_variant() -> None:
    for _ in range(200):
        text = new_event_id()
        assert UUID_FORM.match(text)
        parsed = uuid.UUID(text)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert text[14] == "7"
        assert text[19] in "89ab"


def test_new_event_id_timestamp_is_now() -> None:
    before = int(datetime.now(UTC).timestamp() * 1000)
    millis = int(new_event_id().replace("-", "")[:12], 16)
    after = int(datetime.now(UTC).timestamp() * 1000)
    assert before - 5 <= millis <= after + 5


def test_new_event_id_is_strictly_increasing() -> None:
    ids = [new_event_id() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_new_event_id_monotonic_across_threads() -> None:
    results: list[list[str]] = [[] for _ in range(4)]

    def work(bucket: list[str]) -> None:
        bucket.extend(new_event_id() for _ in range(3000))

    threads = [threading.Thread(target=work, args=(bucket,)) for bucket in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [text for bucket in results for text in bucket]
    assert len(set(every)) == len(every)
    for bucket in results:
        assert bucket == sorted(bucket)


class _FrozenClock:
    """Stands in for the ``time`` module: a clock that stands still, then steps back."""

    def __init__(self, nanos: list[int]) -> None:
        self.nanos = nanos

    def time_ns(self) -> int:
        return self.nanos[0] if len(self.nanos) == 1 else self.nanos.pop(0)


def test_new_event_id_survives_a_clock_that_stops_or_steps_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start = 1_800_000_000_000 * 1_000_000
    clock = _FrozenClock([start + 5_000_000, start, start])  # 5 ms back, then stuck
    monkeypatch.setattr(event_module, "_time", clock)
    ids = [new_event_id() for _ in range(10_000)]  # more than the 12-bit counter holds
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    millis = [int(text.replace("-", "")[:12], 16) for text in ids]
    assert millis[0] >= start // 1_000_000 + 5  # never goes back
    assert millis[-1] > millis[0]  # a full counter borrows the next millisecond
    assert all(text[14] == "7" and text[19] in "89ab" for text in ids)


def test_utc_now_format() -> None:
    text = utc_now()
    assert TIME_FORM.match(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert abs(moment - datetime.now(UTC)) < timedelta(seconds=5)
    assert utc_now() >= text
