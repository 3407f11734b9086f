"""Event envelope v1: validation and normalisation of one audit event.

An audit event is read years after it was written, by people who were not there, so it
must mean one thing only. :func:`prepare_event` is the single gate every event passes
(explicit capture, database capture, HTTP and JSON Lines ingestion alike): it refuses
what is ambiguous or cannot be stored faithfully, with an :class:`InvalidEvent` that names
the offending field, and writes what it accepts in one normal form (lowercase UUIDs, UTC
times with microseconds, compressed IP addresses), so that equal events have equal
canonical bytes and indexes find them. It is pure: no I/O, no clock except to fill
``id`` and ``time`` when the client did not.

Fields (DESIGN.md, "Event envelope v1"): ``id`` ``time`` ``action`` ``outcome``
``actor{id,type,on_behalf_of}`` ``source{ip,user_agent,request_id,trace_id,service,host}``
``target{type,id}`` ``changes{field:{old,new}}`` ``reason`` ``tenant`` ``subject``
``data`` ``schema``. Unknown fields, at the top level and inside the known objects, are
kept as they are (after the generic checks), so producers can add OCSF fields without
waiting for a new schema. ``ledger`` is reserved for what the ledger itself adds.

Client-supplied ``time`` and ``source.ip`` are recorded as claimed (normalised, not
corrected); the ledger adds its own receive time under ``ledger``.

Performance: ingestion targets 40,000 events/s including storage, so the hot path looks
at each value once: the known fields through inline checks or a small function with a
fast path for the common, already-normal case; free-form values (``data``, unknown fields,
``changes`` values) through the tight type walk of :mod:`sealtrail.canonical`; then one
``orjson.dumps``, which also enforces integer range, string keys and valid Unicode. Error
paths are slow and precise; valid events never pay for them. :func:`prepare_canonical`
returns the canonical bytes computed for the size check, so the ledger need not walk and
serialise the event a second time with :func:`~sealtrail.canonical.canonicalize`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import struct
import threading
import time as _time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Final

import msgspec

from sealtrail import _shapes
from sealtrail._exceptions import InvalidEvent
from sealtrail.canonical import (
    _FLOAT_REASON,
    _NAN_REASON,
    _check_duplicates,
    _check_max_depth,
    _checked,
    _copied,
    _encode,
    _explain_numbers,
    _format_path,
    _load,
    _quote,
)

__all__ = [
    "ACTOR_TYPES",
    "DEFAULT_LIMITS",
    "OUTCOMES",
    "RESERVED_FIELDS",
    "SCHEMA_VERSION",
    "BadLine",
    "Limits",
    "encode_shaped",
    "new_event_id",
    "parse_canonical",
    "parse_event",
    "parse_jsonl",
    "prepare_canonical",
    "prepare_event",
    "utc_now",
]

SCHEMA_VERSION: Final = 1
OUTCOMES: Final = frozenset({"success", "failure", "denied", "error"})
ACTOR_TYPES: Final = frozenset({"user", "service", "system", "anonymous"})
#: Added by the ledger itself (sequence number, receive time); clients may not send them.
RESERVED_FIELDS: Final = frozenset({"ledger"})

ACTION_MAX_LENGTH: Final = 128


@dataclass(frozen=True)
class Limits:
    """Bounds on one event, so a hostile or buggy producer cannot exhaust the ledger.

    ``max_bytes`` bounds the canonical size (and the raw size of parsed input);
    ``max_depth`` the nesting of objects and arrays, the event itself being level 1.
    """

    max_bytes: int = 65536
    max_depth: int = 32

    def __post_init__(self) -> None:
        if type(self.max_bytes) is not int or self.max_bytes < 1:
            raise ValueError("max_bytes must be a positive integer")
        _check_max_depth(self.max_depth)
        if self.max_depth < 3:
            # event -> changes -> one change: the envelope itself needs three levels.
            raise ValueError("max_depth must be at least 3 for the envelope's own nesting")


DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True)
class BadLine:
    """One JSON Lines record that was refused: its 1-based line number and why.

    ``reason`` reads on its own (it includes the field); ``field`` is the dotted path alone,
    for programs.
    """

    line: int
    reason: str
    field: str = ""


# --------------------------------------------------------------------------------------
# Identifiers and clocks


class _IdState:
    """UUIDv7 generator state, guarded by a lock so ids stay monotonic across threads.

    An instance with slots, not class attributes: assigning to a class attribute
    invalidates CPython's type caches and made every id three times slower.
    """

    __slots__ = ("counter", "entropy", "last_ms", "lock", "offset")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_ms = 0
        self.counter = 0
        self.entropy = b""
        self.offset = 0


_ids = _IdState()


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time would never be released in the child, and
    # buffered entropy must not be shared between parent and child.
    _ids.lock = threading.Lock()
    _ids.entropy = b""
    _ids.offset = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_RANDOM_DRAW = struct.Struct(">HQ")  # 16 bits to seed the counter, 64 for rand_b
_LAYOUT = struct.Struct(">IHHQ")  # unix_ts_ms (32 + 16 bits), ver + rand_a, var + rand_b
_COUNTER_SEED: Final = 0x3FF  # a fresh counter starts below 1024: over 3,000 ids of headroom
_COUNTER_MAX: Final = 0xFFF
_RAND_B: Final = (1 << 62) - 1


def new_event_id() -> str:
    """Return a new UUIDv7 (RFC 9562), lowercase and hyphenated.

    The 48-bit Unix millisecond timestamp comes first, so ids sort by creation time and
    index well. Ids are strictly increasing within a process (RFC 9562 section 6.2,
    method 1): the 12 ``rand_a`` bits are a counter, randomly seeded each millisecond and
    incremented within it; when the clock stands still or steps back the last timestamp is
    reused, and a full counter borrows the next millisecond. The 62 ``rand_b`` bits are
    fresh randomness from the OS for every id, so ids stay unguessable. That matters
    because the id is the dedupe key: a predictable id would let someone pre-register it
    and have the real event discarded as a duplicate.
    """
    state = _ids
    with state.lock:
        offset = state.offset
        if offset + 10 > len(state.entropy):
            state.entropy = os.urandom(4000)  # one system call per 400 ids
            offset = 0
        seed, rand_b = _RANDOM_DRAW.unpack_from(state.entropy, offset)
        state.offset = offset + 10
        now_ms = _time.time_ns() // 1_000_000
        if now_ms > state.last_ms:
            counter = seed & _COUNTER_SEED
        else:
            now_ms = state.last_ms
            counter = state.counter + 1
            if counter > _COUNTER_MAX:
                now_ms += 1
                counter = seed & _COUNTER_SEED
        state.last_ms = now_ms
        state.counter = counter
    text = _LAYOUT.pack(
        now_ms >> 16,
        now_ms & 0xFFFF,
        0x7000 | counter,  # version 7
        0x8000_0000_0000_0000 | (rand_b & _RAND_B),  # variant 0b10
    ).hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_second_cache: tuple[int, str] = (-1, "")


def utc_now() -> str:
    """Return the current time as RFC 3339 UTC with microseconds, e.g.
    ``2026-01-31T12:00:00.123456Z``: the one form every stored time takes, so times sort
    and compare as strings."""
    global _second_cache
    seconds, nanos = divmod(_time.time_ns(), 1_000_000_000)
    cached = _second_cache
    if cached[0] != seconds:
        cached = (seconds, _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(seconds)))
        _second_cache = cached
    return f"{cached[1]}.{nanos // 1000:06d}Z"


# --------------------------------------------------------------------------------------
# Field rules. Each takes the client's value and returns the normal form, or raises
# InvalidEvent naming the field. Patterns are ASCII-only: ``\d`` would accept Arabic-Indic
# or fullwidth digits.

_UUID_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_ANY_CASE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_UUID_HEX = re.compile(r"[0-9a-fA-F]{32}")
_UUID_RESERVED = frozenset(
    {"00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"}
)

# The normal form, with the time of day range-checked; the date is checked by the calendar
# (once per distinct date: events arrive in date order, so the cache nearly always hits).
_TIME_CANONICAL = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\.[0-9]{6}Z"
)
_VALID_DATES: set[str] = set()
_VALID_DATES_MAX: Final = 4096
_TIME_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)
_TIME_WITHOUT_ZONE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?"
)
_TIME_EXAMPLE: Final = "such as 2026-01-31T12:00:00Z or 2026-01-31T13:00:00.5+01:00"

_ACTION = re.compile(r"[a-z][a-z0-9_\-]*(?:\.[a-z][a-z0-9_\-]*)+")
# Applications use a small vocabulary of actions: remember the valid ones (a set lookup
# instead of a regex on every event), up to a bound so hostile input cannot grow it.
_VALID_ACTIONS: set[str] = set()
_VALID_ACTIONS_MAX: Final = 4096
_ACTION_SEGMENT = re.compile(r"[a-z][a-z0-9_\-]*")

_IPV4_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_CANONICAL = re.compile(rf"{_IPV4_OCTET}(?:\.{_IPV4_OCTET}){{3}}")

_SOURCE_STRINGS: Final = frozenset({"user_agent", "request_id", "trace_id", "service", "host"})

# The generic check for free-form values (``canonical._checked``), passed in so the rules
# stay independent of how the document arrived.
_Check = Callable[[object, tuple[str | int, ...], int, int], object]


def _fail(path: Iterable[str | int], reason: str) -> InvalidEvent:
    return InvalidEvent(_format_path(path), reason)


def _string(value: object, path: tuple[str, ...], *, empty_ok: bool = True) -> str:
    if type(value) is not str:
        if not isinstance(value, str):
            raise _fail(path, f"must be a string, got {_describe(value)}")
        value = str.__str__(value)
    if not value and not empty_ok:
        raise _fail(path, "must not be empty")
    return value


def _describe(value: object) -> str:
    if value is None:
        return "null (omit the field instead)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (dict, Mapping)):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    return type(value).__name__


def _key(key: object, parent: tuple[str, ...]) -> str:
    """Keys inside the known objects must be strings; paths are built from them."""
    if type(key) is str:
        return key
    if isinstance(key, str):
        return str.__str__(key)
    raise _fail(
        parent, f"object keys must be strings, found key {_quote(repr(key))} ({type(key).__name__})"
    )


def _normalise_id(value: object) -> str:
    if type(value) is str and _UUID_CANONICAL.fullmatch(value):
        text = value
    elif isinstance(value, uuid.UUID):
        text = str(value)
    elif not isinstance(value, str):
        raise _fail(("id",), f"must be a UUID string, got {_describe(value)}")
    elif _UUID_ANY_CASE.fullmatch(value):
        text = value.lower()
    elif _UUID_HEX.fullmatch(value):
        hexa = value.lower()
        text = f"{hexa[:8]}-{hexa[8:12]}-{hexa[12:16]}-{hexa[16:20]}-{hexa[20:]}"
    else:
        raise _fail(
            ("id",),
            f"{_quote(value)} is not a UUID; use the form "
            "0190b6a2-8f1e-7c3a-9d4b-2f6e8a1c3b5d (UUIDv7 recommended)",
        )
    if text in _UUID_RESERVED:
        raise _fail(("id",), "the nil and max UUIDs cannot identify an event")
    return text


def _normalise_time(value: object) -> str:
    if type(value) is str and _TIME_CANONICAL.fullmatch(value):
        date = value[:10]
        if date in _VALID_DATES:
            return value
        try:
            datetime.fromisoformat(date)
        except ValueError as exc:
            raise _fail(("time",), f"{_quote(value)} is not a real date and time ({exc})") from None
        if len(_VALID_DATES) < _VALID_DATES_MAX:
            _VALID_DATES.add(date)
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise _fail(("time",), "naive datetime: give it a timezone (UTC preferred)")
        return _format_utc(value.astimezone(UTC))
    if not isinstance(value, str):
        raise _fail(
            ("time",), f"must be an RFC 3339 string {_TIME_EXAMPLE}, got {_describe(value)}"
        )
    return _parse_rfc3339(value)


def _parse_rfc3339(text: str) -> str:
    match = _TIME_RFC3339.fullmatch(text)
    if match is None:
        if _TIME_WITHOUT_ZONE.fullmatch(text):
            raise _fail(
                ("time",),
                f"{_quote(text)} has no timezone; add Z (UTC) or an offset like +01:00",
            )
        raise _fail(("time",), f"{_quote(text)} is not an RFC 3339 date-time {_TIME_EXAMPLE}")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    if second == "60":
        raise _fail(("time",), f"{_quote(text)} is a leap second, which cannot be stored")
    if zulu:
        zone = UTC
    else:
        if int(off_h) > 23 or int(off_m) > 59:
            raise _fail(("time",), f"{_quote(text)} has an impossible UTC offset")
        offset = timedelta(hours=int(off_h), minutes=int(off_m))
        zone = timezone(-offset if sign == "-" else offset)
    # Sub-microsecond digits are dropped (truncated, never rounded into the next second).
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micros, zone
        ).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise _fail(("time",), f"{_quote(text)} is not a real date and time ({exc})") from None
    return _format_utc(moment)


def _format_utc(moment: datetime) -> str:
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}.{moment.microsecond:06d}Z"
    )


def _check_action(value: object) -> str:
    if type(value) is str and len(value) <= ACTION_MAX_LENGTH and _ACTION.fullmatch(value):
        if len(_VALID_ACTIONS) < _VALID_ACTIONS_MAX:
            _VALID_ACTIONS.add(value)
        return value
    text = _string(value, ("action",))
    if len(text) > ACTION_MAX_LENGTH:
        raise _fail(
            ("action",), f"is {len(text)} characters long; at most {ACTION_MAX_LENGTH} are allowed"
        )
    segments = text.split(".")
    if len(segments) < 2:
        raise _fail(
            ("action",),
            f"{_quote(text)} needs at least two dot-separated segments, "
            "such as 'auth.login' or 'user.email.update'",
        )
    for segment in segments:
        if not segment:
            raise _fail(("action",), f"{_quote(text)} has an empty segment")
        if not _ACTION_SEGMENT.fullmatch(segment):
            raise _fail(
                ("action",),
                f"segment {_quote(segment)} of {_quote(text)} must start with a lowercase letter "
                "and contain only a-z, 0-9, '_' and '-'",
            )
    return text


def _check_outcome(value: object) -> str:
    if type(value) is str and value in OUTCOMES:
        return value
    text = _string(value, ("outcome",))
    if text not in OUTCOMES:
        raise _fail(("outcome",), f"{_quote(text)} must be one of {', '.join(sorted(OUTCOMES))}")
    return text


def _check_schema(value: object) -> int:
    if type(value) is int and value == SCHEMA_VERSION:
        return value
    if type(value) is int:
        raise _fail(
            ("schema",),
            f"unsupported schema version {value}; this Sealtrail reads and writes {SCHEMA_VERSION}",
        )
    raise _fail(("schema",), f"must be the integer {SCHEMA_VERSION}, got {_describe(value)}")


_ABSENT: Final = object()
_ACTOR_STRINGS: Final = frozenset({"id", "on_behalf_of"})


def _check_actor(value: object, check: _Check, max_depth: int) -> dict[str, object]:
    if type(value) is dict:
        # Fast path: only known keys, plain non-empty strings, a known type.
        for key, item in value.items():
            if type(item) is not str or not item:
                break
            if key != "type" and key not in _ACTOR_STRINGS:
                break
        else:
            kind = value.get("type", _ABSENT)
            if kind in ACTOR_TYPES or (kind is _ABSENT and "id" in value):
                return value.copy()
    return _check_actor_slowly(value, check, max_depth)


def _check_actor_slowly(value: object, check: _Check, max_depth: int) -> dict[str, object]:
    if isinstance(value, str):
        return {"id": _string(value, ("actor",), empty_ok=False)}
    if not isinstance(value, dict):
        raise _fail(
            ("actor",),
            f"must be an object {{id, type, on_behalf_of}} or an id string, got {_describe(value)}",
        )
    out: dict[str, object] = {}
    for raw_key, item in value.items():
        key = _key(raw_key, ("actor",))
        if key in _ACTOR_STRINGS:
            out[key] = _string(item, ("actor", key), empty_ok=False)
        elif key == "type":
            kind = _string(item, ("actor", "type"))
            if kind not in ACTOR_TYPES:
                raise _fail(
                    ("actor", "type"),
                    f"{_quote(kind)} must be one of {', '.join(sorted(ACTOR_TYPES))}",
                )
            out[key] = kind
        else:
            out[key] = check(item, ("actor", key), 3, max_depth)
    if "id" not in out and "type" not in out:
        raise _fail(("actor",), "needs an id or a type")
    return out


def _check_source(value: object, check: _Check, max_depth: int) -> dict[str, object]:
    if type(value) is dict:
        for key, item in value.items():
            if type(item) is not str or (key not in _SOURCE_STRINGS and key != "ip"):
                break
        else:
            out = value.copy()
            ip = out.get("ip")
            if ip is not None:
                out["ip"] = _normalise_ip(ip)
            return out
    if not isinstance(value, dict):
        raise _fail(("source",), f"must be an object, got {_describe(value)}")
    out = {}
    for raw_key, item in value.items():
        key = _key(raw_key, ("source",))
        if key == "ip":
            out[key] = _normalise_ip(item)
        elif key in _SOURCE_STRINGS:
            out[key] = _string(item, ("source", key))
        else:
            out[key] = check(item, ("source", key), 3, max_depth)
    return out


def _normalise_ip(value: object) -> str:
    if type(value) is not str:
        value = _string(value, ("source", "ip"))
    return _normalise_ip_text(value)


@lru_cache(maxsize=4096)
def _normalise_ip_text(text: str) -> str:
    """Validate and normalise an address; cached, because the same clients come back."""
    if _IPV4_CANONICAL.fullmatch(text):
        return text
    if "%" in text:
        # A zone id is free text after the '%'; it means nothing outside the sending host.
        raise _fail(("source", "ip"), f"{_quote(text)}: zone identifiers are not accepted")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise _fail(
            ("source", "ip"), f"{_quote(text)} is not a valid IPv4 or IPv6 address"
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # ::ffff:a.b.c.d is an IPv4 client seen through a dual-stack socket; store the IPv4
        # form so a search for the address finds it (and Python versions print it alike).
        return str(address.ipv4_mapped)
    return address.compressed


def _check_target(value: object, check: _Check, max_depth: int) -> dict[str, object]:
    if type(value) is dict and "type" in value:
        for key, item in value.items():
            if type(item) is not str or not item or (key != "type" and key != "id"):
                break
        else:
            return value.copy()
    if not isinstance(value, dict):
        raise _fail(("target",), f"must be an object {{type, id}}, got {_describe(value)}")
    out: dict[str, object] = {}
    for raw_key, item in value.items():
        key = _key(raw_key, ("target",))
        if key == "type":
            out[key] = _string(item, ("target", key), empty_ok=False)
        elif key == "id":
            if not isinstance(item, str):
                raise _fail(
                    ("target", "id"),
                    f"must be a string, got {_describe(item)}; write numeric and composite "
                    "keys as strings, such as '42' or 'order=7,line=2'",
                )
            out[key] = _string(item, ("target", key), empty_ok=False)
        else:
            out[key] = check(item, ("target", key), 3, max_depth)
    if "type" not in out:
        raise _fail(("target", "type"), "is required when a target is given")
    return out


def _check_changes(value: object, check: _Check, max_depth: int) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _fail(
            ("changes",),
            f"must be an object mapping field names to {{old, new}}, got {_describe(value)}",
        )
    out: dict[str, object] = {}
    for raw_name, change in value.items():
        if type(change) is dict and type(raw_name) is str and raw_name and change:
            # Fast path: {"old": scalar, "new": scalar} and nothing else.
            for key, item in change.items():
                if key != "old" and key != "new":
                    break
                cls = type(item)
                if not (cls is str or cls is int or cls is bool or item is None):
                    break
            else:
                out[raw_name] = change.copy()
                continue
        name = _key(raw_name, ("changes",))
        if not name:
            raise _fail(("changes",), "field names must not be empty")
        if not isinstance(change, dict):
            raise _fail(
                ("changes", name),
                f"must be an object with 'old' and/or 'new', got {_describe(change)}",
            )
        if not change:
            raise _fail(("changes", name), "is empty; give 'old' and/or 'new'")
        entry: dict[str, object] = {}
        for raw_key, item in change.items():
            key = _key(raw_key, ("changes", name))
            if key != "old" and key != "new":
                raise _fail(("changes", name, key), "only 'old' and 'new' are allowed here")
            entry[key] = check(item, ("changes", name, key), 4, max_depth)
        out[name] = entry
    return out


_KNOWN_FIELDS: Final = frozenset(
    {
        "id",
        "time",
        "action",
        "outcome",
        "actor",
        "source",
        "target",
        "changes",
        "reason",
        "tenant",
        "subject",
        "data",
        "schema",
    }
)


def _check_other_fields(out: dict[str, object], check: _Check, max_depth: int) -> None:
    """Top-level fields outside the envelope: refuse reserved names and non-string names,
    keep the rest after the generic checks."""
    for key in list(out):
        if key in _KNOWN_FIELDS:
            continue
        if not isinstance(key, str):
            raise InvalidEvent(
                "",
                f"field names must be strings, found {_quote(repr(key))} ({type(key).__name__})",
            )
        if key in RESERVED_FIELDS:
            raise _fail(
                (key,),
                "is reserved: the ledger adds it (sequence number, receive time); "
                "clients may not send it",
            )
        value = out[key]
        cls = type(value)
        if not (cls is str or cls is int or cls is bool or value is None):
            out[key] = check(value, (key,), 2, max_depth)


# --------------------------------------------------------------------------------------
# Public API


def _prepare(
    event: Mapping[str, object],
    limits: Limits,
    now: str | None,
    check: _Check,
    encode: bool = True,
) -> tuple[dict[str, object], bytes]:
    """The one gate. Unrolled field by field (no dispatch table, inline fast checks): this
    runs for every event ingested, and each avoided call is measurable."""
    max_depth = limits.max_depth
    out = dict(event)
    get = out.get
    # The schema first: a future version may change every other rule.
    value = get("schema", _ABSENT)
    if value is _ABSENT:
        out["schema"] = SCHEMA_VERSION
    elif type(value) is not int or value != SCHEMA_VERSION:
        _check_schema(value)
    if not _KNOWN_FIELDS.issuperset(out):
        _check_other_fields(out, check, max_depth)

    value = get("action", _ABSENT)
    if value is _ABSENT:
        raise InvalidEvent("action", "is required: a dotted name such as 'user.email.update'")
    if type(value) is not str or value not in _VALID_ACTIONS:
        out["action"] = _check_action(value)

    value = get("id", _ABSENT)
    out["id"] = new_event_id() if value is _ABSENT else _normalise_id(value)

    value = get("time", _ABSENT)
    if value is not _ABSENT:
        out["time"] = _normalise_time(value)
    else:
        out["time"] = utc_now() if now is None else _normalise_time(now)

    value = get("outcome", _ABSENT)
    if value is _ABSENT:
        out["outcome"] = "success"
    elif type(value) is not str or value not in OUTCOMES:
        out["outcome"] = _check_outcome(value)

    value = get("actor", _ABSENT)
    if value is not _ABSENT:
        out["actor"] = _check_actor(value, check, max_depth)
    value = get("source", _ABSENT)
    if value is not _ABSENT:
        out["source"] = _check_source(value, check, max_depth)
    value = get("target", _ABSENT)
    if value is not _ABSENT:
        out["target"] = _check_target(value, check, max_depth)
    value = get("changes", _ABSENT)
    if value is not _ABSENT:
        out["changes"] = _check_changes(value, check, max_depth)

    value = get("reason", _ABSENT)
    if value is not _ABSENT and type(value) is not str:
        out["reason"] = _string(value, ("reason",))
    value = get("tenant", _ABSENT)
    if value is not _ABSENT and (type(value) is not str or not value):
        out["tenant"] = _string(value, ("tenant",), empty_ok=False)
    value = get("subject", _ABSENT)
    if value is not _ABSENT and (type(value) is not str or not value):
        out["subject"] = _string(value, ("subject",), empty_ok=False)

    value = get("data", _ABSENT)
    if value is not _ABSENT:
        if not isinstance(value, dict):
            raise _fail(("data",), f"must be an object, got {_describe(value)}")
        out["data"] = check(value, ("data",), 2, max_depth)

    if not encode:
        return out, b""
    document, canonical = _encode(out, max_depth)
    check_size(len(canonical), limits)
    return document, canonical  # type: ignore[return-value]


def check_size(size: int, limits: Limits) -> None:
    """The size limit, on the event's canonical length."""
    if size > limits.max_bytes:
        raise InvalidEvent(
            "",
            f"event is {size} bytes when canonicalised, over the limit of {limits.max_bytes} bytes",
        )


def prepare_unencoded(
    event: Mapping[str, object], *, limits: Limits = DEFAULT_LIMITS
) -> dict[str, object]:
    """:func:`prepare_event` without the final encoding and its size check.

    For the ledger, which encodes the event once with its own member added and must then
    check the size itself (:func:`check_size`, on the length without that member) and
    encode with :func:`~sealtrail.canonical.canonicalize_prepared`, which names any field
    orjson refuses (out-of-range integers, lone surrogates).
    """
    if not isinstance(event, Mapping):
        raise InvalidEvent("", f"an event must be a JSON object, got {_describe(event)}")
    return _prepare(event, limits, None, _checked, encode=False)[0]


def prepare_canonical(
    event: Mapping[str, object], *, limits: Limits = DEFAULT_LIMITS, now: str | None = None
) -> tuple[dict[str, object], bytes]:
    """:func:`prepare_event`, also returning the event's canonical RFC 8785 bytes.

    The bytes are computed anyway for the size limit; the ledger hashes and stores them
    directly instead of calling :func:`~sealtrail.canonical.canonicalize` again (which
    would walk and serialise the event a second time). They are exactly
    ``canonicalize(event)`` of the returned event.
    """
    if not isinstance(event, Mapping):
        raise InvalidEvent("", f"an event must be a JSON object, got {_describe(event)}")
    return _prepare(event, limits, now, _copied)


def prepare_event(
    event: Mapping[str, object], *, limits: Limits = DEFAULT_LIMITS, now: str | None = None
) -> dict[str, object]:
    """Validate an event and return a new, normalised plain ``dict``; the input is never
    modified.

    Fills ``id`` (a new UUIDv7), ``time`` (``now`` if given, else the current UTC time),
    ``outcome`` (``"success"``) and ``schema`` (1) when absent. Raises
    :class:`InvalidEvent` naming the first offending field. The result shares no mutable
    object with the input (an application that reuses its dict after recording cannot
    change what was recorded), and holds plain JSON types only: string enums become
    strings, tuples lists, ordered dicts dicts.
    """
    return prepare_canonical(event, limits=limits, now=now)[0]


_UNSET: Final = msgspec.UNSET
_uuid_canonical: Final = _UUID_CANONICAL.fullmatch
_time_canonical: Final = _TIME_CANONICAL.fullmatch
_to_envelope: Final = msgspec.convert
_encode_sorted: Final = msgspec.json.Encoder(order="sorted").encode


def encode_shaped(
    event: Mapping[str, object], received: str, seq: int, limits: Limits = DEFAULT_LIMITS
) -> tuple[str, bytes] | None:
    """The compiled fast path of bulk ingestion: an event in the common shape
    (:mod:`sealtrail._shapes`, ``data`` included up to five levels deep), validated by
    msgspec in C, the normal forms it cannot express checked with the precise path's own
    functions, and encoded by msgspec, with the ledger's member
    ``{"received": received, "seq": seq}`` added.

    Returns the event's id and its canonical bytes: exactly what
    :func:`prepare_unencoded` and :func:`~sealtrail.canonical.canonicalize_prepared` give
    for the same event and member (``tests/test_event_shaped.py`` checks this over the
    whole envelope domain). Returns ``None`` for any other event, valid or not, so that
    the precise path decides, normalises and names the offending field. The size limit is
    the caller's, as for :func:`prepare_unencoded`.
    """
    if type(event) is not dict or limits.max_depth < _shapes.MAX_DEPTH or not _fast_path_on:
        return None
    try:
        env = _to_envelope(event, _shapes.Envelope)
        if env.ledger is not _UNSET:
            return None
        if env.action not in _VALID_ACTIONS:
            env.action = _check_action(env.action)
        value = env.id
        if value is _UNSET:
            env.id = new_event_id()
        elif not (type(value) is str and _uuid_canonical(value) and value not in _UUID_RESERVED):
            env.id = _normalise_id(value)
        value = env.time
        if value is _UNSET:
            env.time = utc_now()
        elif not (_time_canonical(value) and value[:10] in _VALID_DATES):
            env.time = _normalise_time(value)
        actor = env.actor
        if actor is not _UNSET and actor.id is _UNSET and actor.type is _UNSET:
            return None
        source = env.source
        if source is not _UNSET and source.ip is not _UNSET:
            source.ip = _normalise_ip(source.ip)
        changes = env.changes
        if changes is not _UNSET:
            for change in changes.values():
                if change.old is _UNSET and change.new is _UNSET:
                    return None
        env.ledger = _shapes.LedgerMember(received, seq)
        body = _encode_sorted(env)
    except Exception:  # any doubt: the precise path decides, and explains
        return None
    # msgspec sorts keys by code point, RFC 8785 by UTF-16 unit: they differ only between
    # U+E000..U+FFFF (UTF-8 lead bytes 0xEE, 0xEF) and characters beyond U+FFFF.
    if not body.isascii() and (0xEE in body or 0xEF in body):
        return None
    return env.id, body  # type: ignore[return-value]  # filled above


def _fast_path_agrees() -> bool:
    """Whether this msgspec encodes as the canonical encoder does, on the characters and
    numbers where JSON encoders differ (escapes, U+2028, DEL, astral characters, the
    integer bounds, key order). Checked once at import: a msgspec release that escapes
    differently turns the fast path off instead of storing other bytes."""
    text = "".join(map(chr, range(0x20))) + '"\\/\x7f\x80\xad\u200b\u2028\u2029\U0001f600é'
    sample = {
        "action": "a.b",
        "id": "0192a000-0000-7000-8000-000000000001",
        "time": "2026-01-31T12:00:00.000000Z",
        "reason": text,
        "changes": {"é": {"old": -(2**53 - 1), "new": 2**53 - 1}, text: {"new": True}},
        "data": {"b": [None, text, {"": 0}], "a": {"z": False, "A": "x"}},
    }
    fast = encode_shaped(sample, "2026-01-31T12:00:01.000000Z", 7)
    entry = prepare_unencoded(sample)
    entry["ledger"] = {"received": "2026-01-31T12:00:01.000000Z", "seq": 7}
    return fast is not None and fast[1] == _encode(entry, DEFAULT_LIMITS.max_depth)[1]


_fast_path_on = True
_fast_path_on = _fast_path_agrees()


def _parse(data: bytes | str, limits: Limits) -> tuple[dict[str, object], bytes]:
    max_depth = limits.max_depth
    document = _load(data, limits.max_bytes, max_depth)
    if type(document) is not dict:
        raise InvalidEvent("", f"an event must be a JSON object, got {_describe(document)}")
    _check_duplicates(data, document, max_depth)
    # No separate walk of the parsed document: the field rules and the generic check of
    # free-form values see every value once, as they do for Python input; and no copy,
    # since nobody else holds the freshly parsed objects.
    try:
        return _prepare(document, limits, None, _checked)
    except InvalidEvent as exc:
        if exc.reason in (_FLOAT_REASON, _NAN_REASON):
            # Quote the literal: orjson parses integers beyond 64 bits as floats too.
            raise _explain_numbers(data, max_depth) from None
        raise


def parse_event(data: bytes | str, *, limits: Limits = DEFAULT_LIMITS) -> dict[str, object]:
    """Parse one event from untrusted JSON (strictly, see
    :func:`~sealtrail.canonical.decode`) and prepare it as :func:`prepare_event` does."""
    return _parse(data, limits)[0]


def parse_canonical(
    data: bytes | str, *, limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, object], bytes]:
    """:func:`parse_event`, also returning the canonical bytes (see
    :func:`prepare_canonical`)."""
    return _parse(data, limits)


_JSON_SPACE: Final = " \t\r\n"


def parse_jsonl(
    data: bytes | str | Iterable[bytes | str], *, limits: Limits = DEFAULT_LIMITS
) -> tuple[list[dict[str, object]], list[BadLine]]:
    """Parse a JSON Lines batch: one event per line, blank lines skipped.

    A bad line does not stop the batch: every refused line is reported with its 1-based
    number and reason, so a producer can fix and resend exactly those. ``data`` is the
    whole text, or an iterable of lines (a file opened in binary mode, for instance).
    Lines end at ``\\n`` only: U+2028 and other Unicode separators are data inside JSON
    strings, never line breaks. A UTF-8 byte order mark before the first line is ignored.
    """
    lines: Iterable[bytes | str]
    if isinstance(data, (bytes, bytearray, memoryview)):
        lines = bytes(data).split(b"\n")
    elif isinstance(data, str):
        lines = data.split("\n")
    else:
        lines = data
    events: list[dict[str, object]] = []
    bad: list[BadLine] = []
    for number, line in enumerate(lines, start=1):
        text: bytes | str
        if isinstance(line, (bytes, bytearray)):
            raw = bytes(line).removesuffix(b"\n").removesuffix(b"\r")
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            text, blank, multiline = raw, not raw.strip(b" \t\r\n"), b"\n" in raw
        elif isinstance(line, str):
            line = line.removesuffix("\n").removesuffix("\r")
            if number == 1:
                line = line.removeprefix("\ufeff")
            text, blank, multiline = line, not line.strip(_JSON_SPACE), "\n" in line
        else:
            bad.append(BadLine(number, f"a line must be bytes or str, got {type(line).__name__}"))
            continue
        if blank:
            continue
        if multiline:
            bad.append(BadLine(number, "a JSON Lines record must fit on one line"))
            continue
        try:
            events.append(_parse(text, limits)[0])
        except InvalidEvent as exc:
            bad.append(BadLine(number, str(exc), exc.field))
    return events, bad
