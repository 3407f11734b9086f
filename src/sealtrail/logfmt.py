"""Safe formatting for the application's *ordinary* logs (stdlib logging and structlog).

Audit events go to the trail; everything else an application logs goes to its usual log
files, and those are the classic place to forge entries ("fancy logs"): a user name with
``\\n2026-01-01 INFO login ok user=admin`` in it becomes a second, fake line for every
reader that splits on newlines. The formatters here make that impossible by construction
(DESIGN.md, I6): whatever a record holds, it is written as exactly one line.

* :class:`JsonFormatter`: one JSON object per line; control characters, CR/LF,
  U+2028/2029/0085, bidi and zero-width characters escaped (:func:`~sealtrail.render.
  json_text`); any Python value in ``extra=`` rendered safely (bytes, sets, datetimes,
  cycles, objects whose ``repr`` raises, huge strings truncated with a marker, lone
  surrogates); ``format()`` never raises.
* :class:`TextFormatter`: the same guarantee for plain-text logs, through
  :func:`~sealtrail.render.escape_text` (reversible with ``unescape_text``).
* :class:`RedactingFilter`: applies a redactor (``redact(dict) -> dict``, such as the
  one of :mod:`sealtrail.redact`) to a record's extra fields, arguments, message and
  traceback before any handler formats it, so secrets never reach the log files.
* :class:`ContextFilter`: attaches the audit context (request id, actor, ...) to each
  record where it is emitted, which matters when it is formatted in another thread
  (``QueueHandler``).
* :func:`structlog_processor` and :func:`structlog_renderer`: the same for structlog, as
  plain ``(logger, method_name, event_dict)`` callables (structlog itself is not needed to
  import this module).

A logging call must never take the application down, so formatting failures degrade to
a minimal, still valid, line instead of raising; a failing redactor withholds the record's
content instead of letting it through unredacted (fail closed).
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
import logging
import sys
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar
from datetime import date, datetime
from datetime import time as dt_time
from decimal import Decimal
from pathlib import PurePath
from types import TracebackType
from typing import Any, Final, TypeAlias

from sealtrail.context import _NAMED as _CONTEXT_FIELDS
from sealtrail.context import AuditContext, ContextError, current_context, resolve
from sealtrail.render import escape_text, json_text

__all__ = [
    "CONTEXT_ATTR",
    "ContextFilter",
    "JsonFormatter",
    "RedactingFilter",
    "Redactor",
    "TextFormatter",
    "structlog_processor",
    "structlog_renderer",
]

#: The redactor's interface: a dict in, a redacted dict out (keys may be removed).
Redactor: TypeAlias = Callable[[dict[str, object]], dict[str, object]]

#: The record attribute where :class:`ContextFilter` stores the audit context.
CONTEXT_ATTR: Final = "sealtrail_context"
# Set by RedactingFilter, so a record that passes two of them is redacted once.
_REDACTED_ATTR: Final = "_sealtrail_redacted"

# Attributes every LogRecord has; anything else on a record came from ``extra=`` (or a
# filter). Computed from a real record, so new Python versions (taskName in 3.12) are
# covered.
_STANDARD_ATTRS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)
_NOT_EXTRA: Final = _STANDARD_ATTRS | {CONTEXT_ATTR, _REDACTED_ATTR}
# What RedactingFilter redacts as extra fields: the attached context included.
_REDACTABLE_EXCLUDE: Final = _STANDARD_ATTRS | {_REDACTED_ATTR}

# Output fields of JsonFormatter that an ``extra=`` key must not overwrite: a key such as
# "level" or "message" is renamed "extra_level", so nobody can forge the real ones.
_JSON_FIELDS: Final = frozenset(
    {"time", "level", "logger", "message", "exception", "stack", "context"}
)

DEFAULT_MAX_STRING: Final = 16_384
DEFAULT_MAX_DEPTH: Final = 8
DEFAULT_MAX_ITEMS: Final = 1_000
DEFAULT_MAX_LINE: Final = 262_144

_FALLBACK_LINE: Final = '{"message":"unformattable log record"}'

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1  # orjson writes unsigned 64-bit integers too


# --------------------------------------------------------------------------------------
# Turning any Python value into plain JSON types, without ever raising


def _safe_type_name(value: object) -> str:
    try:
        return str(type(value).__qualname__)
    except Exception:
        return "object"


def _safe_repr(value: object) -> str:
    try:
        text = repr(value)
        if isinstance(text, str):
            return str.__str__(text)
    except Exception:
        pass
    return f"<{_safe_type_name(value)} object (repr failed)>"


def _safe_str(value: object) -> str:
    if type(value) is str:
        return value
    try:
        text = str(value)
        if isinstance(text, str):
            return str.__str__(text)
    except Exception:
        pass
    return _safe_repr(value)


def _truncate(text: str, limit: int) -> str:
    """Keep the head and the tail (the end of a traceback is its most useful part) with
    a marker saying how much was cut."""
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    head = limit - limit // 2
    tail = text[len(text) - limit // 2 :] if limit // 2 else ""
    return f"{text[:head]}…[{cut} chars truncated]…{tail}"


def _encodable(text: str) -> str:
    """Lone surrogates cannot be written as UTF-8 (nor in valid JSON): show their code as
    ``\\ud`` plus three hex digits, as text, instead. Logs favour showing something over
    refusing the line."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class _Sanitiser:
    """Converts values to ``str``/``int``/``float``/``bool``/``None``/``list``/``dict``
    with bounded size and depth, and no cycles, so encoding them cannot fail."""

    __slots__ = ("max_depth", "max_items", "max_string")

    def __init__(self, max_string: int, max_depth: int, max_items: int) -> None:
        for name, value in (
            ("max_string", max_string),
            ("max_depth", max_depth),
            ("max_items", max_items),
        ):
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.max_string = max_string
        self.max_depth = max_depth
        self.max_items = max_items

    def text(self, text: str) -> str:
        if len(text) <= self.max_string and text.isascii():
            return text  # the common case, checked in C
        return _encodable(_truncate(text, self.max_string))

    def key(self, key: object) -> str:
        return self.text(key if type(key) is str else _safe_str(key))

    def clean(self, value: object, depth: int = 0, path: frozenset[int] = frozenset()) -> object:
        cls = type(value)
        if cls is str:
            if len(value) <= self.max_string and value.isascii():  # type: ignore[arg-type, attr-defined]
                return value
            return self.text(value)  # type: ignore[arg-type]
        if value is None or cls is bool:
            return value
        if cls is int:
            return value if _INT_MIN <= value <= _INT_MAX else self.text(str(value))  # type: ignore[operator]
        if cls is float:
            # NaN and infinities have no JSON form (orjson would write null).
            return (
                value
                if value == value and value not in (float("inf"), float("-inf"))
                else str(value)
            )
        try:
            if cls is list or cls is tuple or cls is dict:
                return self._container(value, depth, path)
            return self._clean_other(value, depth, path)
        except Exception:
            return self.text(f"<{_safe_type_name(value)} object (unrenderable)>")

    def _clean_other(self, value: object, depth: int, path: frozenset[int]) -> object:
        if isinstance(value, enum.Enum):
            return self.text(f"{_safe_type_name(value)}.{value.name}")
        if isinstance(value, str):
            return self.text(str.__str__(value))
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):
            return self.clean(int.__int__(value))
        if isinstance(value, float):
            return self.clean(float.__float__(value))
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self._bytes(value)
        if isinstance(value, (datetime, date, dt_time)):
            return value.isoformat()
        if isinstance(value, BaseException):
            return self.text(f"{_safe_type_name(value)}: {_safe_str(value)}")
        if isinstance(
            value,
            (uuid.UUID, Decimal, PurePath, ipaddress.IPv4Address, ipaddress.IPv6Address),
        ):
            return self.text(str(value))
        if isinstance(value, (Mapping, list, tuple, set, frozenset, deque)):
            return self._container(value, depth, path)
        return self.text(_safe_repr(value))

    def _container(self, value: Any, depth: int, path: frozenset[int]) -> object:
        marker = id(value)
        if marker in path:
            return f"<cycle: {_safe_type_name(value)}>"
        if depth >= self.max_depth:
            return f"<{_safe_type_name(value)} nested too deep>"
        inner = path | {marker}
        cls = type(value)
        if cls is list or cls is tuple:  # exact checks first: ABC checks are slow
            return self._sequence(value, depth, inner)
        if cls is dict or isinstance(value, Mapping):
            return self._mapping(value, depth, inner)
        return self._sequence(value, depth, inner)

    def fields(self, doc: Mapping[str, object]) -> dict[str, object]:
        """A record's own fields: each value cleaned as a level-1 value, with no item
        limit on the record itself (the line limit bounds it)."""
        out: dict[str, object] = {}
        limit = self.max_string
        for name, value in doc.items():
            if type(name) is not str or len(name) > limit or not name.isascii():
                name = self.key(name)
            cls = type(value)
            if cls is str:
                if len(value) > limit or not value.isascii():  # type: ignore[arg-type, attr-defined]
                    value = self.text(value)  # type: ignore[arg-type]
            elif not (cls is bool or value is None):
                value = self.clean(value, 1)
            out[name] = value
        return out

    def _bytes(self, value: bytes | bytearray | memoryview) -> str:
        data = memoryview(value).cast("B") if isinstance(value, memoryview) else value
        limit = self.max_string
        if len(data) <= limit:
            return _encodable(bytes(data).decode("utf-8", "backslashreplace"))
        head = bytes(data[: limit - limit // 2]).decode("utf-8", "backslashreplace")
        tail = bytes(data[len(data) - limit // 2 :]).decode("utf-8", "backslashreplace")
        cut = len(data) - limit
        return _encodable(f"{head}…[{cut} bytes truncated]…{tail}")

    def _mapping(
        self, value: Mapping[Any, Any], depth: int, path: frozenset[int]
    ) -> dict[str, object]:
        out: dict[str, object] = {}
        for count, (key, item) in enumerate(value.items()):
            if count >= self.max_items:
                out["…"] = f"[{len(value) - count} more items]"
                break
            out[self.key(key)] = self.clean(item, depth + 1, path)
        return out

    def _sequence(self, value: Any, depth: int, path: frozenset[int]) -> list[object]:
        size = len(value)
        if size <= self.max_items and (type(value) is list or type(value) is tuple):
            return [self.clean(item, depth + 1, path) for item in value]
        if isinstance(value, (set, frozenset)) and size <= self.max_items:
            # Sets have no order; sort by representation so equal sets log alike.
            items: list[object] = sorted(value, key=_safe_repr)
        else:
            # Never copy (or sort) more of a huge container than is written.
            items = list(itertools.islice(value, self.max_items))
        out = [self.clean(item, depth + 1, path) for item in items]
        if size > self.max_items:
            out.append(f"…[{size - self.max_items} more items]")
        return out


# --------------------------------------------------------------------------------------
# Shared pieces


_second_cache: tuple[int, str] = (-1, "")


def _rfc3339(created: float) -> str:
    """RFC 3339 UTC with microseconds, as :func:`sealtrail.event.utc_now` writes it; the
    formatted second is cached, since records come many to a second."""
    global _second_cache
    seconds = int(created)
    micros = round((created - seconds) * 1_000_000)
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    cached = _second_cache
    if cached[0] != seconds:
        cached = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
        _second_cache = cached
    return f"{cached[1]}.{micros:06d}Z"


# True while a log formatter resolves the context's callables: a callable that logs
# (an ORM loading the user, say) must not send the formatter into a loop.
_RESOLVING: ContextVar[bool] = ContextVar("sealtrail.logfmt.resolving", default=False)


def _static_fields(snapshot: AuditContext) -> dict[str, object]:
    """The fields that are set and are not callables, as plain values."""
    fields = {name: getattr(snapshot, name) for name in _CONTEXT_FIELDS}
    fields.update(snapshot.extra)
    return {
        key: dict(value) if isinstance(value, Mapping) else value
        for key, value in fields.items()
        if value is not None and not callable(value)
    }


def _copied(fields: dict[str, object]) -> dict[str, object]:
    # A redactor that changes its input in place must not change the cached fields.
    return {key: dict(value) if type(value) is dict else value for key, value in fields.items()}


# The last resolved snapshot converted for logs, and its fields (replaced as a whole, so
# threads racing on it at worst convert twice).
_last_context: tuple[AuditContext | None, dict[str, object]] = (None, {})


def _loggable_context() -> dict[str, object] | None:
    """The current audit context as a plain dict for a log line, or None when empty.

    Callables are resolved (a log line with the actor is what one wants to read), but a
    callable that fails is left out rather than failing the log call.
    """
    global _last_context
    snapshot = current_context()
    cached = _last_context
    if cached[0] is snapshot:
        # Every record of a request sees the same snapshot: convert it once. A copy, so
        # a redactor that changes its input cannot change later lines.
        return _copied(cached[1]) if cached[1] else None
    if not snapshot:
        _last_context = (snapshot, {})
        return None
    if snapshot.is_resolved:
        fields = _static_fields(snapshot)
        _last_context = (snapshot, fields)
        return _copied(fields) or None
    if _RESOLVING.get():
        return _static_fields(snapshot) or None
    token = _RESOLVING.set(True)
    try:
        return _static_fields(resolve(snapshot)) or None
    except ContextError:
        return _static_fields(snapshot) or None
    finally:
        _RESOLVING.reset(token)


_ExcInfo: TypeAlias = tuple[type[BaseException], BaseException, TracebackType | None]


def _exc_info_tuple(value: object) -> _ExcInfo | None:
    if value is True:
        value = sys.exc_info()
    elif isinstance(value, BaseException):
        value = (type(value), value, value.__traceback__)
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        return (type(value[1]), value[1], value[2])
    return None


def _format_exception(exc_info: _ExcInfo) -> str:
    try:
        return "".join(traceback.format_exception(*exc_info)).rstrip("\n")
    except Exception:
        return f"{_safe_type_name(exc_info[1])}: (traceback unavailable)"


def _check_limit(name: str, value: int) -> int:
    if type(value) is not int or value < 64:
        raise ValueError(f"{name} must be an integer of at least 64, got {value!r}")
    return value


def _shrunk(doc: dict[str, object], line: str, max_line: int) -> str:
    """A line over ``max_line``: keep the essentials, cut the long strings, drop the rest,
    and say so."""
    keep = max(16, max_line // 8)
    small: dict[str, object] = {}
    for key in ("time", "level", "logger", "timestamp", "event", "message", "exception"):
        value = doc.get(key)
        if isinstance(value, str):
            small[key] = _truncate(value, keep)
    small["truncated"] = f"line of {len(line)} chars over the {max_line} limit; fields dropped"
    shrunk = json_text(small)
    return shrunk if len(shrunk) <= max_line else _FALLBACK_LINE


# --------------------------------------------------------------------------------------
# stdlib logging


def _message(record: logging.LogRecord) -> tuple[str, str | None]:
    """The record's message, and the reason it could not be rendered as asked, if so."""
    try:
        return record.getMessage(), None
    except Exception as exc:
        raw = _safe_str(record.msg)
        return f"{raw} {_safe_repr(record.args)}", f"{_safe_type_name(exc)}: {_safe_str(exc)}"


def _extra_fields(record: logging.LogRecord, exclude: frozenset[str]) -> dict[str, object]:
    return {key: value for key, value in record.__dict__.items() if key not in exclude}


class JsonFormatter(logging.Formatter):
    """Every record becomes exactly one line of JSON, whatever it contains.

    Fields: ``time`` (RFC 3339 UTC with microseconds), ``level``, ``logger``,
    ``message``; ``exception`` (the traceback) and ``stack`` when present; every
    ``extra=`` field at the top level (renamed ``extra_<name>`` when it would replace one
    of these); and ``context``, the audit context of the code that logged (request id,
    actor...), when one is set.

    Strings longer than ``max_string`` characters keep their head and tail around a
    ``…[N chars truncated]…`` marker; containers are cut after ``max_items`` items and
    ``max_depth`` levels; cycles become ``<cycle: type>``; a whole line over
    ``max_line`` characters is replaced by its essentials and a ``truncated`` note.
    ``format()`` never raises: if all else fails it writes a minimal line that says the
    record could not be formatted.
    """

    def __init__(
        self,
        *,
        max_string: int = DEFAULT_MAX_STRING,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_items: int = DEFAULT_MAX_ITEMS,
        max_line: int = DEFAULT_MAX_LINE,
        include_context: bool = True,
    ) -> None:
        super().__init__()
        self._sanitiser = _Sanitiser(max_string, max_depth, max_items)
        self._max_line = _check_limit("max_line", max_line)
        self._include_context = include_context

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self._format(record)
        except Exception as exc:
            return _fallback_line(record, exc)

    def _format(self, record: logging.LogRecord) -> str:
        message, message_error = _message(record)
        doc: dict[str, object] = {
            "time": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        if message_error is not None:
            doc["message_error"] = message_error
        exc_text = _record_exc_text(self, record)
        if exc_text:
            doc["exception"] = exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        if self._include_context:
            ctx = getattr(record, CONTEXT_ATTR, None)
            if ctx is None:
                ctx = _loggable_context()
            if ctx:
                doc["context"] = ctx
        extras = _extra_fields(record, _NOT_EXTRA)
        renamed = []
        for key, value in extras.items():
            if key in _JSON_FIELDS or key in doc:
                renamed.append((key, value))
            else:
                doc[key] = value
        # After the others, so an extra that is itself called "extra_level" keeps its name.
        for key, value in renamed:
            name = "extra_" + key
            while name in doc or name in _JSON_FIELDS:
                name = "extra_" + name
            doc[name] = value
        clean = self._sanitiser.fields(doc)
        line = json_text(clean)
        if len(line) > self._max_line:
            return _shrunk(clean, line, self._max_line)
        return line


def _record_exc_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    """The traceback as stdlib formatters show it: ``exc_text`` if a filter (or another
    formatter) set it, else rendered and cached there, as ``logging.Formatter`` does."""
    if record.exc_text:
        return record.exc_text
    exc_info = record.exc_info
    if exc_info and exc_info[0] is not None:
        try:
            record.exc_text = formatter.formatException(exc_info)
        except Exception:
            record.exc_text = _format_exception(exc_info)
        return record.exc_text
    return None


def _fallback_line(record: logging.LogRecord, error: BaseException) -> str:
    """The last resort: a few fields that can always be written, and why the rest was
    not."""
    try:
        doc: dict[str, object] = {}
        try:
            doc["time"] = _rfc3339(record.created)
        except Exception:
            doc["time"] = _rfc3339(time.time())
        doc["level"] = _truncate(_encodable(_safe_str(getattr(record, "levelname", "?"))), 64)
        doc["logger"] = _truncate(_encodable(_safe_str(getattr(record, "name", "?"))), 256)
        doc["message"] = "unformattable log record"
        doc["format_error"] = _truncate(_encodable(_safe_type_name(error)), 256)
        return json_text(doc)
    except Exception:
        return _FALLBACK_LINE


class TextFormatter(logging.Formatter):
    """Plain-text logs, one line per record, with everything untrusted escaped.

    Takes the usual ``fmt``/``datefmt``/``style`` (the default shows the RFC 3339 UTC
    time, level, logger and message), then appends ``extra=`` fields and the audit
    context as `` key=value`` pairs (strings as they are, or JSON-quoted when they hold a
    space, ``=`` or ``"``; other values as compact JSON), and the traceback. The finished
    line goes through :func:`~sealtrail.render.escape_text`, so newlines in a message or
    a traceback appear as ``\\u000a`` and :func:`~sealtrail.render.unescape_text` gives
    the multi-line text back. ``format()`` never raises.
    """

    default_format: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"

    def __init__(
        self,
        fmt: str | None = None,
        datefmt: str | None = None,
        style: Any = "%",
        *,
        extras: bool = True,
        include_context: bool = True,
        max_string: int = DEFAULT_MAX_STRING,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> None:
        super().__init__(fmt or self.default_format, datefmt, style)
        self._extras = extras
        self._include_context = include_context
        self._sanitiser = _Sanitiser(max_string, max_depth, max_items)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        return _rfc3339(record.created)

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self._format(record)
        except Exception as exc:
            try:
                return escape_text(_fallback_line(record, exc))
            except Exception:
                return _FALLBACK_LINE

    def _format(self, record: logging.LogRecord) -> str:
        message, message_error = _message(record)
        pairs: list[tuple[str, object]] = []
        if message_error is not None:
            pairs.append(("message_error", message_error))
        if self._extras:
            pairs.extend(_extra_fields(record, _NOT_EXTRA).items())
        if self._include_context:
            ctx = getattr(record, CONTEXT_ATTR, None)
            if ctx is None:
                ctx = _loggable_context()
            if isinstance(ctx, Mapping):
                seen = {key for key, _ in pairs}
                pairs.extend((k, v) for k, v in ctx.items() if k not in seen)
        message = _truncate(message, self._sanitiser.max_string)
        if pairs:
            # After the message, before the traceback: logfmt's order.
            message += "".join(f" {self._pair(key, value)}" for key, value in pairs)
        # A copy, so the message rendered here (truncated, args applied) and the cached
        # traceback do not change what other handlers see.
        copy = logging.makeLogRecord(record.__dict__)
        copy.msg = message
        copy.args = ()
        exc_text = _record_exc_text(self, copy)
        if exc_text:
            copy.exc_text = _truncate(exc_text, self._sanitiser.max_string)
        return escape_text(super().format(copy))

    def _pair(self, key: str, value: object) -> str:
        clean = self._sanitiser.clean(value)
        plain = isinstance(clean, str) and clean and not any(ch in clean for ch in ' ="')
        rendered = clean if plain else json_text(clean)
        return f"{_truncate(key, 256)}={rendered}"


class RedactingFilter(logging.Filter):
    """Redacts a record before any handler formats it, so secrets never reach the logs.

    ``redact`` is any ``redact(dict) -> dict`` callable (such as the redactor of
    :mod:`sealtrail.redact`). It is applied to

    * the ``extra=`` fields, together (so key-name rules like ``password`` apply), with
      the audit context that :class:`ContextFilter` attached;
    * the message arguments: a mapping as it is, positional arguments as ``arg0``,
      ``arg1``... (value detectors still apply); a removed argument becomes
      ``[REDACTED]`` so the message still renders;
    * the rendered message, as ``{"message": ...}``, for secrets pasted into an f-string;
      only a changed message replaces ``msg`` (and then ``args`` is emptied), so message
      templates stay intact for grouping when nothing was found;
    * the traceback, as ``{"exception": ...}``: the redacted text is stored in
      ``exc_text``, which every stdlib formatter prints, and ``exc_info`` is cleared so
      no formatter renders the raw exception again.

    The record is changed in place (Python 3.11 filters cannot replace it), so attach the
    filter where every handler after it should see redacted data, and keep it off the
    handler that tees AUDIT records into the trail, which redacts with its own policy. A
    record is redacted once even if it meets two such filters. If ``redact`` raises, the
    record's content is withheld (fail closed): its message says so and its arguments,
    extra fields and traceback are removed.
    """

    def __init__(self, redact: Redactor, name: str = "") -> None:
        if not callable(redact):
            raise TypeError(f"redact must be callable, got {type(redact).__name__}")
        super().__init__(name)
        self._redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _REDACTED_ATTR, False):
            return True
        try:
            self._redact_record(record)
        except Exception as exc:
            _withhold(record, exc)
        setattr(record, _REDACTED_ATTR, True)
        return True

    def _apply(self, values: dict[str, object]) -> dict[str, object]:
        result = self._redact(values)
        if not isinstance(result, dict):
            raise TypeError(f"the redactor returned {type(result).__name__}, not a dict")
        return result

    def _redact_record(self, record: logging.LogRecord) -> None:
        extras = _extra_fields(record, _REDACTABLE_EXCLUDE)
        if extras:
            redacted = self._apply(dict(extras))
            for key in extras:
                if key not in redacted:
                    delattr(record, key)
            for key, value in redacted.items():
                if isinstance(key, str) and key not in _STANDARD_ATTRS:
                    setattr(record, key, value)

        args = record.args
        if isinstance(args, Mapping) and args:
            redacted = self._apply(dict(args))
            record.args = {key: redacted.get(key, "[REDACTED]") for key in args}
        elif isinstance(args, tuple) and args:
            keyed: dict[str, object] = {f"arg{i}": value for i, value in enumerate(args)}
            redacted = self._apply(dict(keyed))
            record.args = tuple(redacted.get(key, "[REDACTED]") for key in keyed)

        try:
            message = record.getMessage()
        except Exception:
            message = None  # the formatter reports it; the arguments are redacted already
        if message is not None:
            clean = self._apply({"message": message}).get("message", "[REDACTED]")
            if clean != message:
                record.msg = clean
                record.args = ()

        exc_info = record.exc_info
        exc_text = record.exc_text
        if not exc_text and exc_info and exc_info[0] is not None:
            exc_text = _format_exception(exc_info)
        if exc_text:
            clean = self._apply({"exception": exc_text}).get("exception", "[REDACTED]")
            record.exc_text = _safe_str(clean)
        record.exc_info = None
        if record.stack_info:
            clean = self._apply({"stack": record.stack_info}).get("stack", "[REDACTED]")
            record.stack_info = _safe_str(clean)


def _withhold(record: logging.LogRecord, error: BaseException) -> None:
    for key in _extra_fields(record, _REDACTABLE_EXCLUDE):
        delattr(record, key)
    record.msg = f"[log record withheld: redaction failed with {_safe_type_name(error)}]"
    record.args = ()
    record.exc_info = None
    record.exc_text = None
    record.stack_info = None


class ContextFilter(logging.Filter):
    """Attaches the current audit context to each record, as a plain dict, under
    :data:`CONTEXT_ATTR`.

    The formatters look the context up themselves when the record lacks it, which is
    right when records are formatted where they are emitted. With a ``QueueHandler`` (or
    any handler that formats in another thread) add this filter to the logger or the
    queue handler, so the context captured is the one of the code that logged. Put it
    before a :class:`RedactingFilter`, which then redacts the context too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, CONTEXT_ATTR, None) is None:
            try:
                ctx = _loggable_context()
            except Exception:
                ctx = None
            if ctx:
                setattr(record, CONTEXT_ATTR, ctx)
        return True


# --------------------------------------------------------------------------------------
# structlog

StructlogProcessor: TypeAlias = Callable[[Any, str, MutableMapping[str, Any]], dict[str, Any]]
StructlogRenderer: TypeAlias = Callable[[Any, str, MutableMapping[str, Any]], str]


_STRUCTLOG_META: Final = ("_record", "_from_structlog")


def _structlog_prepare(event_dict: Mapping[str, Any], include_context: bool) -> dict[str, Any]:
    """Traceback to text (as structlog's ``format_exc_info`` does) and the audit context
    added, before redaction sees the event."""
    out = dict(event_dict)
    if "exc_info" in out:
        exc_info = _exc_info_tuple(out.pop("exc_info"))
        if exc_info is not None and "exception" not in out:
            out["exception"] = _format_exception(exc_info)
    if include_context and "context" not in out:
        ctx = _loggable_context()
        if ctx:
            out["context"] = ctx
    return out


def structlog_processor(
    redact: Redactor | None = None,
    *,
    include_context: bool = True,
    max_string: int = DEFAULT_MAX_STRING,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_items: int = DEFAULT_MAX_ITEMS,
) -> StructlogProcessor:
    """A structlog processor: redaction and safe values for everything after it.

    Put it last before the renderer (after ``TimeStamper`` and ``add_log_level``). It
    turns ``exc_info`` into an ``exception`` string, adds the audit ``context`` when one
    is set, applies ``redact`` to the whole event dict, and converts every value to
    plain JSON types with the bounds of :class:`JsonFormatter`, so no renderer can fail
    on it. Line safety is the renderer's job: :func:`structlog_renderer` writes one
    escaped JSON line. If ``redact`` raises, the event's content is withheld (fail
    closed).
    """
    sanitiser = _Sanitiser(max_string, max_depth, max_items)

    def sealtrail_safe_values(
        logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> dict[str, Any]:
        # structlog.stdlib.ProcessorFormatter's own keys (the LogRecord...) are machinery,
        # not data: they pass through untouched for its later processors.
        meta = {key: event_dict[key] for key in _STRUCTLOG_META if key in event_dict}
        try:
            prepared = _structlog_prepare(event_dict, include_context)
            for key in meta:
                del prepared[key]
            if redact is not None:
                prepared = redact(prepared)
                if not isinstance(prepared, dict):
                    raise TypeError(f"the redactor returned {type(prepared).__name__}")
            out = sanitiser.fields(prepared)
        except Exception as exc:
            out = {"event": f"[log event withheld: processing failed with {_safe_type_name(exc)}]"}
            for key in ("timestamp", "level", "logger"):
                value = event_dict.get(key)
                if type(value) is str:
                    out[key] = sanitiser.text(value)
        out.update(meta)
        return out

    return sealtrail_safe_values


def structlog_renderer(
    *,
    include_context: bool = False,
    max_string: int = DEFAULT_MAX_STRING,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_items: int = DEFAULT_MAX_ITEMS,
    max_line: int = DEFAULT_MAX_LINE,
) -> StructlogRenderer:
    """A structlog renderer: one JSON line per event, whatever it holds, never raising.

    Escapes as :class:`JsonFormatter` does and applies the same bounds (it may be used
    without :func:`structlog_processor`, which it does not replace: it does not redact).
    ``include_context`` adds the audit context here when the processor is not used.
    """
    sanitiser = _Sanitiser(max_string, max_depth, max_items)
    limit = _check_limit("max_line", max_line)

    def render_sealtrail_json(
        logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> str:
        try:
            prepared = _structlog_prepare(event_dict, include_context)
            for key in _STRUCTLOG_META:
                prepared.pop(key, None)
            clean = sanitiser.fields(prepared)
            line = json_text(clean)
            return line if len(line) <= limit else _shrunk(clean, line, limit)
        except Exception as exc:
            try:
                return json_text(
                    {
                        "event": "unrenderable log event",
                        "format_error": _safe_type_name(exc),
                    }
                )
            except Exception:
                return _FALLBACK_LINE

    return render_sealtrail_json
