"""Canonical bytes: RFC 8785 (JSON Canonicalization Scheme), UTF-8.

Every leaf hash and signature in Sealtrail is computed over the bytes this module produces,
so two implementations that disagree on one byte disagree on the whole tree. The reference
is the ``rfc8785`` package (:func:`canonicalize_reference`): exact, but far too slow for
ingestion (about 7,000-9,000 events/s). :func:`canonicalize` serialises with ``orjson``
(about twenty times faster, walk included) and corrects every place where orjson and
RFC 8785 differ over the envelope domain (objects with string keys, arrays, strings,
integers within ``±MAX_SAFE_INTEGER``, booleans, null; no floats):

* **Key order.** RFC 8785 sorts keys by UTF-16 code units; ``OPT_SORT_KEYS`` sorts by code
  point. The orders differ only when, at the first differing position, one key has a
  character in U+E000..U+FFFF and the other one above U+FFFF (UTF-16 writes those as
  surrogates D800..DFFF, which sort *below* E000). Such a character is written as UTF-8
  starting with byte 0xEE or 0xEF, so two byte tests on the output find every candidate;
  if a key really contains one, the document is re-ordered in Python and serialised
  without ``OPT_SORT_KEYS`` (orjson keeps insertion order).
* **Integer range.** orjson writes any 64-bit integer; RFC 8785 (I-JSON) only
  ``±(2**53-1)``. ``OPT_STRICT_INTEGER`` enforces exactly that range.
* **Floats.** orjson writes ``1.0`` where RFC 8785 writes ``1``, ``1e+16`` style exponents
  differ, and NaN/Infinity become ``null``. Floats are outside the envelope (use a string
  or an integer), so the walk refuses them.
* **Foreign types.** orjson natively writes ``UUID``, ``datetime``, dataclasses, enums and
  ``orjson.Fragment`` (raw, unchecked bytes); JSON has no such types, so the walk refuses
  them. Subclasses of ``str``/``int``/``dict``/``list`` and tuples are accepted and copied
  to plain values first (orjson refuses ``str`` subclasses as keys).
* **Lone surrogates.** Python strings may hold them; UTF-8 and RFC 8785 cannot. orjson
  refuses them; the slow diagnostic walk then names the field.

String escaping needs no correction: checked for every code point and by fuzzing, both
write ``\\b \\f \\n \\r \\t \\" \\\\``, ``\\u00xx`` (lowercase hex) for the other C0
controls, and everything else (``/``, U+007F, U+2028/2029, all non-ASCII) as raw UTF-8.

Performance shapes the code: the happy path is one tight walk that only looks at value
types and depth, then one ``orjson.dumps``. Integer range, keys and surrogates are left to
orjson, which refuses them anyway; paths are computed only after something failed, by a
slow walk (:func:`_explain`) that re-checks everything in document order.

:func:`decode` is the strict reader for untrusted bytes. It refuses what JSON parsers
usually let through (duplicate keys, floats, huge integers, lone surrogate escapes, depth
bombs, oversize input), so whatever it returns has exactly one canonical form.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any, Final

import orjson
import rfc8785

from sealtrail._exceptions import InvalidEvent

__all__ = [
    "MAX_DEPTH_CEILING",
    "MAX_SAFE_INTEGER",
    "canonicalize",
    "canonicalize_prepared",
    "canonicalize_reference",
    "decode",
]

#: Largest integer that survives a round trip through an IEEE 754 double (I-JSON, RFC 7493).
MAX_SAFE_INTEGER: Final = 2**53 - 1
_MIN_SAFE_INTEGER: Final = -MAX_SAFE_INTEGER

#: Deepest nesting any limit may allow: orjson refuses to serialise 255 nested containers.
MAX_DEPTH_CEILING: Final = 254

_SORTED: Final = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER
_AS_GIVEN: Final = orjson.OPT_STRICT_INTEGER

_UTF16_SENSITIVE = re.compile("[\ue000-\uffff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")

_FLOAT_REASON: Final = "floats are not allowed in the envelope; use a string or an integer"
_NAN_REASON: Final = "NaN and Infinity are not allowed; use a string"
_SAFE_RANGE: Final = f"-{MAX_SAFE_INTEGER}..{MAX_SAFE_INTEGER} (2**53-1)"


# --------------------------------------------------------------------------------------
# Error plumbing. Paths are gathered only while an error unwinds, so valid documents pay
# nothing for them.


class _Unusual(Exception):
    """Internal signal from the fast walk: something needs the slow, precise look."""


class _Reject(Exception):
    """Internal: why a value was refused, and its path segments, innermost first."""

    def __init__(self, reason: str, segment: str | int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.segments: list[str | int] = [] if segment is None else [segment]

    def to_invalid(self, prefix: Iterable[str | int] = ()) -> InvalidEvent:
        return InvalidEvent(_format_path([*prefix, *reversed(self.segments)]), self.reason)


def _quote(text: str, limit: int = 80) -> str:
    """Quote text for an error message: ASCII only, so hostile input cannot smuggle newlines
    or terminal escapes into logs, and shortened, so a 60 kB key stays readable."""
    if len(text) > limit:
        text = text[:limit] + "\u2026"
    return json.dumps(text, ensure_ascii=True)


def _format_path(segments: Iterable[str | int]) -> str:
    """Render path segments, outermost first, as ``a.b[3]["odd key"]``."""
    out: list[str] = []
    for seg in segments:
        if isinstance(seg, int):
            out.append(f"[{seg}]")
        elif _PLAIN_KEY.fullmatch(seg):
            out.append(f".{seg}" if out else seg)
        else:
            out.append(f"[{_quote(seg)}]")
    return "".join(out)


def _type_name(value: object) -> str:
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"


def _int_reason(value: int | str) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        value = f"of {value.bit_length()} bits"
    elif isinstance(value, str) and len(value) > 40:
        value = f"of {len(value)} digits"
    return f"integer {value} is outside the safe range {_SAFE_RANGE}; use a string"


def _depth_reason(max_depth: int) -> str:
    return f"nested deeper than {max_depth} levels of objects and arrays"


def _check_max_depth(max_depth: int) -> None:
    """Refuse depth limits the serialiser cannot honour (a programming error, not bad data)."""
    if type(max_depth) is not int or not 1 <= max_depth <= MAX_DEPTH_CEILING:
        raise ValueError(f"max_depth must be an integer in 1..{MAX_DEPTH_CEILING}")


# --------------------------------------------------------------------------------------
# The walks.


def _walk(container: Any, depth: int, max_depth: int) -> None:
    """The fast walk over a ``dict`` or ``list`` at nesting level ``depth`` (top = 1).

    Accepts exact ``str``/``int``/``bool``/``None`` leaves and exact ``dict``/``list``
    containers; raises :class:`_Unusual` for anything else (floats, subclasses, foreign
    types) and for depth beyond ``max_depth``. Recursion is bounded by ``max_depth``.
    """
    if depth > max_depth:
        raise _Unusual
    for item in container.values() if type(container) is dict else container:
        cls = type(item)
        if cls is str or cls is int or cls is bool or item is None:
            continue
        if cls is dict or cls is list:
            _walk(item, depth + 1, max_depth)
        else:
            raise _Unusual


def _walk_copy(container: Any, depth: int, max_depth: int) -> Any:
    """:func:`_walk` that also returns a copy of every container (leaves are immutable and
    shared), so a prepared event shares nothing mutable with the caller's input."""
    if depth > max_depth:
        raise _Unusual
    out = container.copy()
    for key, item in container.items() if type(container) is dict else enumerate(container):
        cls = type(item)
        if cls is str or cls is int or cls is bool or item is None:
            continue
        if cls is dict or cls is list:
            out[key] = _walk_copy(item, depth + 1, max_depth)
        else:
            raise _Unusual
    return out


def _explain(value: object, depth: int, max_depth: int) -> _Reject | None:
    """The slow, complete check, run only after the fast path failed, to name the culprit.

    Looks at everything, in document order: types, integer range, keys, lone surrogates,
    depth. ``None`` means the value is acceptable (it may still need :func:`_plain`).
    """
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        if found:
            return _Reject(
                f"contains a lone surrogate U+{ord(found.group()):04X}; "
                "strings must be valid Unicode"
            )
        return None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        plain = int.__int__(value)
        ok = _MIN_SAFE_INTEGER <= plain <= MAX_SAFE_INTEGER
        return None if ok else _Reject(_int_reason(plain))
    if isinstance(value, float):
        return _Reject(_FLOAT_REASON if math.isfinite(value) else _NAN_REASON)
    if isinstance(value, (dict, list, tuple)):
        if depth > max_depth:
            return _Reject(_depth_reason(max_depth))
        is_object = isinstance(value, dict)
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if is_object:
                if not isinstance(key, str):
                    return _Reject(
                        f"object keys must be strings, found key {_quote(repr(key))} "
                        f"of type {_type_name(key)}"
                    )
                found = _SURROGATE.search(key)
                if found:
                    return _Reject(
                        f"key {_quote(key)} contains a lone surrogate "
                        f"U+{ord(found.group()):04X}; keys must be valid Unicode"
                    )
                key = str.__str__(key)
            problem = _explain(item, depth + 1, max_depth)
            if problem is not None:
                problem.segments.append(key)
                return problem
        return None
    return _Reject(
        f"unsupported type {_type_name(value)}; only objects, arrays, strings, integers, "
        "booleans and null are allowed"
    )


def _plain(value: object) -> object:
    """Deep copy of an already explained value, made of exact builtins only (subclasses
    such as ``StrEnum`` become their plain value, tuples become lists)."""
    if isinstance(value, dict):
        return {str.__str__(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    raise AssertionError(f"unexpected {type(value)!r}")  # pragma: no cover - explained


def _settle(value: object, prefix: Iterable[str | int], depth: int, max_depth: int) -> object:
    """Slow path for a value the fast walk balked at: raise naming the field, or return a
    plain copy when it was only unusual (a subclass, a tuple), not wrong."""
    problem = _explain(value, depth, max_depth)
    if problem is not None:
        raise problem.to_invalid(prefix)
    return _plain(value)


def _checked(value: object, prefix: Iterable[str | int], depth: int, max_depth: int) -> object:
    """Validate a free-form value (``data``, unknown fields) found at nesting ``depth``;
    return it unchanged, or a plain copy when it held subclasses or tuples."""
    cls = type(value)
    if cls is str or cls is int or cls is bool or value is None:
        return value
    if cls is dict or cls is list:
        try:
            _walk(value, depth, max_depth)
        except _Unusual:
            pass
        else:
            return value
    return _settle(value, prefix, depth, max_depth)


def _copied(value: object, prefix: Iterable[str | int], depth: int, max_depth: int) -> object:
    """:func:`_checked`, returning a deep copy of containers (for input we do not own)."""
    cls = type(value)
    if cls is str or cls is int or cls is bool or value is None:
        return value
    if cls is dict or cls is list:
        try:
            return _walk_copy(value, depth, max_depth)
        except _Unusual:
            pass
    return _settle(value, prefix, depth, max_depth)


def _has_utf16_sensitive_key(value: object) -> bool:
    if type(value) is dict:
        return any(
            _UTF16_SENSITIVE.search(key) is not None or _has_utf16_sensitive_key(item)
            for key, item in value.items()
        )
    if type(value) is list:
        return any(_has_utf16_sensitive_key(item) for item in value)
    return False


def _utf16_ordered(value: object) -> object:
    """Deep copy with every object's keys inserted in UTF-16 code-unit order (RFC 8785
    section 3.2.3), for serialising without ``OPT_SORT_KEYS``."""
    if type(value) is dict:
        return {
            key: _utf16_ordered(value[key])
            for key in sorted(value, key=lambda k: k.encode("utf-16-be"))
        }
    if type(value) is list:
        return [_utf16_ordered(item) for item in value]
    return value


def _encode(value: object, max_depth: int) -> tuple[object, bytes]:
    """Serialise a value whose types and depth the fast walk accepted.

    Returns the value (replaced by a plain copy if orjson refused a ``str`` subclass key)
    and its canonical bytes; raises :class:`InvalidEvent` naming the field otherwise.
    """
    try:
        out = orjson.dumps(value, option=_SORTED)
    except orjson.JSONEncodeError as exc:
        problem = _explain(value, 1, max_depth)
        if problem is not None:
            raise problem.to_invalid() from None
        value = _plain(value)
        try:
            out = orjson.dumps(value, option=_SORTED)
        except orjson.JSONEncodeError:  # pragma: no cover - explained and copied
            raise InvalidEvent("", f"cannot be canonicalised: {exc}") from None
    # 0xEE/0xEF lead the UTF-8 of U+E000..U+FFFF: the only characters whose UTF-16 order
    # differs from code-point order.
    if not out.isascii() and (0xEE in out or 0xEF in out) and _has_utf16_sensitive_key(value):
        out = orjson.dumps(_utf16_ordered(value), option=_AS_GIVEN)
    return value, out


# --------------------------------------------------------------------------------------
# Public API: writing


def canonicalize(value: object) -> bytes:
    """Return the RFC 8785 canonical UTF-8 bytes of ``value``.

    Byte-identical to :func:`canonicalize_reference` over the envelope domain and about
    twenty times faster. Refuses, with :class:`InvalidEvent` naming the field, what the
    envelope cannot hold: floats, NaN/Infinity, integers beyond ``±MAX_SAFE_INTEGER``,
    non-string keys, lone surrogates, foreign types, and nesting deeper than
    :data:`MAX_DEPTH_CEILING` levels. Subclasses of the JSON types and tuples are written
    as their plain JSON value.
    """
    value = _checked(value, (), 1, MAX_DEPTH_CEILING)
    return _encode(value, MAX_DEPTH_CEILING)[1]


def canonicalize_prepared(value: dict[str, object]) -> bytes:
    """:func:`canonicalize` for a document whose values :func:`~sealtrail.event.prepare_event`
    already checked (plus members of plain ``str``, ``int`` and ``dict`` the caller adds).

    Skips the type walk, the one part of :func:`canonicalize` that costs Python time per
    value; orjson still refuses out-of-range integers and the UTF-16 key order is still
    applied. The ledger calls it once per appended entry.
    """
    return _encode(value, MAX_DEPTH_CEILING)[1]


def canonicalize_reference(value: object) -> bytes:
    """RFC 8785 bytes from the ``rfc8785`` package: the slow, obviously correct reference
    that :func:`canonicalize` is tested against.

    It behaves exactly like the package (it writes floats, for instance); only its errors
    are translated to :class:`InvalidEvent`, so no third-party exception escapes.
    """
    try:
        return rfc8785.dumps(value)  # type: ignore[arg-type]
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent("", f"cannot be canonicalised: {exc}") from None


# --------------------------------------------------------------------------------------
# Reading untrusted JSON


def _load(data: bytes | bytearray | memoryview | str, max_bytes: int, max_depth: int) -> object:
    """Size check, then parse with orjson, turning every refusal into a precise
    :class:`InvalidEvent`. The result still needs the walk and :func:`_check_duplicates`."""
    if isinstance(data, str):
        size = len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
    elif isinstance(data, (bytes, bytearray)):
        size = len(data)
    elif isinstance(data, memoryview):
        size = data.nbytes
    else:
        raise InvalidEvent("", f"expected JSON as bytes or str, got {_type_name(data)}")
    if size > max_bytes:
        raise InvalidEvent("", f"document is {size} bytes, over the limit of {max_bytes} bytes")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _decode_error(data, exc, max_depth) from None


def _decode_error(
    data: bytes | bytearray | memoryview | str, exc: orjson.JSONDecodeError, max_depth: int
) -> InvalidEvent:
    """Explain why orjson refused a document, as precisely as is cheap on the error path."""
    msg = exc.msg
    if "surrogate" in msg or "UTF-8" in msg:
        if isinstance(data, str):
            text = data
        else:
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError as bad:
                byte = bad.object[bad.start]
                return InvalidEvent(
                    "", f"not valid UTF-8 (byte 0x{byte:02x} at offset {bad.start})"
                )
        # The stdlib parser accepts lone surrogates, which lets the slow walk name the field.
        try:
            loose = json.loads(text)
        except (ValueError, RecursionError):
            loose = None
        problem = _explain(loose, 1, max_depth)
        if problem is not None and "surrogate" in problem.reason:
            return problem.to_invalid()
        return InvalidEvent("", "contains a lone surrogate; strings must be valid Unicode")
    if "depth" in msg or "recursion" in msg.lower():
        return InvalidEvent("", _depth_reason(max_depth))
    if exc.doc.startswith(("NaN", "Infinity"), exc.pos):
        return InvalidEvent("", _NAN_REASON)
    if "infinity" in msg:  # a literal too large for a double, such as 1e400
        return InvalidEvent("", _FLOAT_REASON)
    return InvalidEvent("", f"not valid JSON: {msg} at line {exc.lineno} column {exc.colno}")


class _Literal(str):
    """A number literal handed back as text by the stdlib parser, for precise messages."""


def _explain_numbers(data: bytes | bytearray | memoryview | str, max_depth: int) -> InvalidEvent:
    """Re-read a document in which the walk met a float, to quote the literal: orjson turns
    integers beyond 64 bits into floats, and the message should say which it was."""
    try:
        loose = json.loads(
            data if isinstance(data, str) else bytes(data),
            parse_float=_Literal,
            # 17 digits and more are always beyond 2**53 (JSON forbids leading zeros).
            parse_int=lambda text: _Literal(text) if len(text.lstrip("-")) > 16 else int(text),
        )
    except (ValueError, RecursionError):  # pragma: no cover - orjson accepted it already
        return InvalidEvent("", _FLOAT_REASON)
    problem = _explain_literals(loose, 1, max_depth)
    return problem.to_invalid() if problem is not None else InvalidEvent("", _FLOAT_REASON)


def _explain_literals(value: object, depth: int, max_depth: int) -> _Reject | None:
    if isinstance(value, _Literal):
        if any(ch in value for ch in ".eE"):
            return _Reject(f"number {value[:40]} has a fraction or exponent; {_FLOAT_REASON}")
        return _Reject(_int_reason(str(value)))
    if isinstance(value, (dict, list)):
        if depth > max_depth:
            return _Reject(_depth_reason(max_depth))
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            problem = _explain_literals(item, depth + 1, max_depth)
            if problem is not None:
                problem.segments.append(key)
                return problem
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not _MIN_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER
    ):
        return _Reject(_int_reason(value))
    return None


class _Duplicated(dict[str, object]):
    """An object in which the stdlib parser met a repeated key."""

    duplicate = ""


def _refuse_repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, item in pairs:
        if key in out:
            marked = _Duplicated(out)
            marked.duplicate = key
            return marked
        out[key] = item
    return out


def _find_duplicate(value: object) -> _Reject | None:
    if isinstance(value, _Duplicated):
        return _Reject(f"duplicate key {_quote(value.duplicate)}", value.duplicate)
    if isinstance(value, (dict, list)):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            problem = _find_duplicate(item)
            if problem is not None:
                problem.segments.append(key)
                return problem
    return None


def _check_duplicates(
    data: bytes | bytearray | memoryview | str, doc: object, max_depth: int
) -> None:
    """Refuse repeated keys, which orjson silently collapses (the last one wins).

    A cheap proof of absence, in C: each colon of the raw text is a key separator or a
    literal colon inside a string, and orjson writes colons only for those two. Unless the
    text spells a colon as an escape (``\\u003a``), equal counts mean no entry was
    dropped. Otherwise the stdlib parser re-reads the text with a pairs hook to find and
    name the duplicate. Re-encoding with ``OPT_STRICT_INTEGER`` also catches integers
    between 2**53 and 2**64, which orjson parses as ints.
    """
    try:
        again = orjson.dumps(doc, option=_AS_GIVEN)
    except orjson.JSONEncodeError as exc:
        problem = _explain(doc, 1, max_depth)
        raise (problem.to_invalid() if problem else InvalidEvent("", str(exc))) from None
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    # (bytes.find: ``in`` with a bytes operand is several times slower on CPython 3.11.)
    escaped_colon = raw.find(b"\\u003") >= 0 and (b"\\u003a" in raw or b"\\u003A" in raw)
    if not escaped_colon and raw.count(b":") == again.count(b":"):
        return
    try:
        loose = json.loads(raw, object_pairs_hook=_refuse_repeats)
    except (ValueError, RecursionError):  # pragma: no cover - orjson accepted it already
        return
    problem = _find_duplicate(loose)
    if problem is not None:
        raise problem.to_invalid()


def _decode_checked(
    data: bytes | bytearray | memoryview | str, max_bytes: int, max_depth: int
) -> object:
    """:func:`decode` without the argument check, shared with the event parser."""
    doc = _load(data, max_bytes, max_depth)
    cls = type(doc)
    if cls is dict or cls is list:
        try:
            _walk(doc, 1, max_depth)
        except _Unusual:
            problem = _explain(doc, 1, max_depth)
            if problem is not None and problem.reason not in (_FLOAT_REASON, _NAN_REASON):
                raise problem.to_invalid() from None
            raise _explain_numbers(data, max_depth) from None
    elif cls is float:
        raise _explain_numbers(data, max_depth)
    _check_duplicates(data, doc, max_depth)
    return doc


def decode(data: bytes | str, *, max_bytes: int = 65536, max_depth: int = 32) -> object:
    """Parse untrusted JSON strictly into plain Python values.

    Refuses, with :class:`InvalidEvent`: input over ``max_bytes`` (checked before
    parsing), invalid UTF-8, anything but exactly one JSON value, duplicate keys (naming the
    path), numbers with a fraction or exponent, NaN/Infinity, integers beyond
    ``±MAX_SAFE_INTEGER``, lone surrogate escapes, and nesting deeper than ``max_depth``
    (the parser stops by itself at 1024 levels and the walk at ``max_depth``, so a depth
    bomb never recurses deeply). ``canonicalize(decode(b)) == b`` for canonical ``b``.
    """
    _check_max_depth(max_depth)
    return _decode_checked(data, max_bytes, max_depth)
