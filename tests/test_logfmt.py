"""Ordinary application logs: one line per record whatever it holds, never an exception
from a log call, redaction before anything is written, and the audit context attached."""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import enum
import io
import logging
import logging.handlers
import queue
import re
import sys
import uuid
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import orjson
import pytest
import structlog

from sealtrail.context import context
from sealtrail.logfmt import (
    CONTEXT_ATTR,
    ContextFilter,
    JsonFormatter,
    RedactingFilter,
    TextFormatter,
    structlog_processor,
    structlog_renderer,
)
from sealtrail.render import unescape_text

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
SECRET = "s3cr3t-value"


class Capture:
    """A logger whose one handler writes to a string, like a log file."""

    def __init__(
        self,
        formatter: logging.Formatter,
        *,
        filters: tuple[logging.Filter, ...] = (),
        name: str = "app",
    ) -> None:
        self.stream = io.StringIO(newline="")
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(formatter)
        for log_filter in filters:
            self.handler.addFilter(log_filter)
        self.logger = logging.Logger(name, logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(self.handler)

    def lines(self) -> list[str]:
        text = self.stream.getvalue()
        assert text.endswith("\n")
        lines = text[:-1].split("\n")
        assert lines == text.splitlines()  # nothing else reads as a line break
        return lines

    def docs(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.lines()]


def json_capture(**options: Any) -> Capture:
    return Capture(JsonFormatter(**options))


def make_record(msg: object = "hello", args: Any = (), **attrs: object) -> logging.LogRecord:
    record = logging.LogRecord("app", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(attrs)
    return record


# --------------------------------------------------------------------------------------
# JsonFormatter: fields


def test_json_fields() -> None:
    capture = json_capture()
    capture.logger.warning("user %s logged in", "alice", extra={"user_id": 42, "ok": True})
    (doc,) = capture.docs()
    assert list(doc)[:4] == ["time", "level", "logger", "message"]
    assert RFC3339_UTC.fullmatch(doc["time"])
    assert doc["level"] == "WARNING"
    assert doc["logger"] == "app"
    assert doc["message"] == "user alice logged in"
    assert doc["user_id"] == 42 and doc["ok"] is True
    assert "context" not in doc and "exception" not in doc


def test_time_is_the_record_time_in_utc() -> None:
    record = make_record()
    record.created = 1_767_225_600.25  # 2026-01-01T00:00:00.25Z
    doc = orjson.loads(JsonFormatter().format(record))
    assert doc["time"] == "2026-01-01T00:00:00.250000Z"
    record.created = 1_767_225_600.9999999  # rounds up into the next second
    assert orjson.loads(JsonFormatter().format(record))["time"] == "2026-01-01T00:00:01.000000Z"


def test_exception_and_stack_are_fields_of_the_same_line() -> None:
    capture = json_capture()
    try:
        raise ValueError("bad\ninput")
    except ValueError:
        capture.logger.exception("failed")
    capture.logger.info("where", stack_info=True)
    failed, where = capture.docs()
    assert failed["exception"].startswith("Traceback (most recent call last):")
    assert failed["exception"].endswith("ValueError: bad\ninput")
    assert where["stack"].startswith("Stack (most recent call last):")


def test_extra_cannot_overwrite_the_real_fields() -> None:
    capture = json_capture()
    capture.logger.info(
        "real",
        extra={"level": "CRITICAL", "time": "1970", "logger": "auth", "extra_level": "x"},
    )
    (doc,) = capture.docs()
    assert doc["level"] == "INFO" and doc["logger"] == "app" and doc["time"] != "1970"
    assert doc["extra_level"] == "x"
    assert doc["extra_extra_level"] == "CRITICAL"
    assert doc["extra_time"] == "1970" and doc["extra_logger"] == "auth"


# --------------------------------------------------------------------------------------
# JsonFormatter: any value


class Colour(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    HIGH = 3


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")

    def __str__(self) -> str:
        raise RuntimeError("str exploded")


class ReprNotString:
    def __repr__(self) -> Any:
        return 42


class Weird(str):
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_extra_values_of_any_type() -> None:
    cycle_list: list[object] = [1]
    cycle_list.append(cycle_list)
    cycle_dict: dict[str, object] = {"a": 1}
    cycle_dict["self"] = cycle_dict
    shared = [1, 2]
    capture = json_capture()
    capture.logger.info(
        "values",
        extra={
            "raw": b"\x00\xffok",
            "buffer": bytearray(b"ab"),
            "view": memoryview(b"xy"),
            "tags": {"b", "a", "c"},
            "frozen": frozenset({2, 1}),
            "when": dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.UTC),
            "day": dt.date(2026, 1, 31),
            "id": uuid.UUID(int=1),
            "amount": decimal.Decimal("1.10"),
            "path": PurePosixPath("/etc/passwd"),
            "colour": Colour.RED,
            "level_enum": Level.HIGH,
            "huge_int": 2**80,
            "nan": float("nan"),
            "inf": float("-inf"),
            "error": KeyError("k"),
            "bad": BadRepr(),
            "not_str": ReprNotString(),
            "weird": Weird("fine"),
            "cycle_list": cycle_list,
            "cycle_dict": cycle_dict,
            "dag": [shared, shared],
            "keys": {1: "int", None: "none", (1, 2): "tuple"},
            "queue": collections.deque([1, 2]),
            "surrogate": "a\ud800b",
            "klass": int,
        },
    )
    (doc,) = capture.docs()
    assert doc["raw"] == "\x00\\xffok"  # valid UTF-8 as text, other bytes as \xNN
    assert doc["buffer"] == "ab" and doc["view"] == "xy"
    assert doc["tags"] == ["a", "b", "c"]
    assert doc["frozen"] == [1, 2]
    assert doc["when"] == "2026-01-31T12:00:00+00:00"
    assert doc["day"] == "2026-01-31"
    assert doc["id"] == "00000000-0000-0000-0000-000000000001"
    assert doc["amount"] == "1.10"
    assert doc["path"] == "/etc/passwd"
    assert doc["colour"] == "Colour.RED" and doc["level_enum"] == "Level.HIGH"
    assert doc["huge_int"] == str(2**80)
    assert doc["nan"] == "nan" and doc["inf"] == "-inf"
    assert doc["error"] == "KeyError: 'k'"
    assert doc["bad"] == "<BadRepr object (repr failed)>"
    assert doc["not_str"] == "<ReprNotString object (repr failed)>"
    assert doc["weird"] == "fine"
    assert doc["cycle_list"] == [1, "<cycle: list>"]
    assert doc["cycle_dict"] == {"a": 1, "self": "<cycle: dict>"}
    assert doc["dag"] == [[1, 2], [1, 2]]  # shared, not cyclic
    assert doc["keys"] == {"1": "int", "None": "none", "(1, 2)": "tuple"}
    assert doc["queue"] == [1, 2]
    assert doc["surrogate"] == "a\\ud800b"
    assert doc["klass"] == "<class 'int'>"


def test_message_objects_that_cannot_be_rendered() -> None:
    capture = json_capture()
    capture.logger.info(BadRepr())
    capture.logger.info("%d items", "many")
    capture.logger.info("%s and %s", "only one")
    bad, mismatch, missing = capture.docs()
    assert bad["message"].startswith("<BadRepr object (repr failed)>")
    assert bad["message_error"] == "RuntimeError: str exploded"
    assert mismatch["message"] == "%d items ('many',)"
    assert mismatch["message_error"].startswith("TypeError")
    assert missing["message_error"].startswith("TypeError")


def test_exception_whose_str_raises() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    capture = json_capture()
    try:
        raise Unprintable
    except Unprintable:
        capture.logger.exception("failed")
    (doc,) = capture.docs()
    assert "Unprintable" in doc["exception"]


def test_huge_strings_are_truncated_with_a_marker_keeping_head_and_tail() -> None:
    capture = json_capture(max_string=100)
    text = "HEAD" + "x" * 10_000 + "TAIL"
    capture.logger.info(text, extra={"field": text, text: "long key", "raw": b"y" * 1000})
    (doc,) = capture.docs()
    for value in (doc["message"], doc["field"]):
        assert value.startswith("HEAD") and value.endswith("TAIL")
        assert "…[9908 chars truncated]…" in value
        assert len(value) < 140
    assert "[900 bytes truncated]" in doc["raw"]
    assert "long key" in doc.values()


def test_containers_are_bounded() -> None:
    capture = json_capture(max_items=3, max_depth=2)
    capture.logger.info(
        "big",
        extra={"items": list(range(10)), "map": {str(i): i for i in range(5)}, "deep": [[[1]]]},
    )
    (doc,) = capture.docs()
    assert doc["items"] == [0, 1, 2, "…[7 more items]"]
    assert doc["map"] == {"0": 0, "1": 1, "2": 2, "…": "[2 more items]"}
    # The record's own dict is level 0, "deep" is level 1.
    assert doc["deep"] == ["<list nested too deep>"]


def test_a_line_over_the_limit_keeps_the_essentials() -> None:
    capture = json_capture(max_line=2_000, max_string=1_000)
    capture.logger.error("too much", extra={f"f{i}": "v" * 900 for i in range(20)})
    (line,) = capture.lines()
    assert len(line) <= 2_000
    doc = orjson.loads(line)
    assert doc["message"] == "too much" and doc["level"] == "ERROR"
    assert "over the 2000 limit" in doc["truncated"]
    assert "f0" not in doc


@pytest.mark.parametrize("option", ["max_string", "max_depth", "max_items", "max_line"])
def test_limits_must_be_positive(option: str) -> None:
    with pytest.raises(ValueError, match=option):
        JsonFormatter(**{option: 0})


# --------------------------------------------------------------------------------------
# JsonFormatter: never raises


def test_format_never_raises_and_falls_back_to_a_minimal_line() -> None:
    record = make_record(created="not a time")
    doc = orjson.loads(JsonFormatter().format(record))
    assert doc["message"] == "unformattable log record"
    assert doc["format_error"] == "ValueError"
    assert doc["logger"] == "app" and RFC3339_UTC.fullmatch(doc["time"])


def test_fallback_survives_a_broken_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    import sealtrail.logfmt as logfmt

    def explode(value: object, *, indent: bool = False) -> str:
        raise MemoryError("pretend")

    monkeypatch.setattr(logfmt, "json_text", explode)
    assert JsonFormatter().format(make_record()) == '{"message":"unformattable log record"}'


def test_deep_recursion_in_a_value_does_not_escape() -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    line = JsonFormatter().format(make_record(deep, extra_deep=deep))
    doc = orjson.loads(line)
    assert doc["extra_deep"][0][0][0][0][0][0][0] == "<list nested too deep>"


def test_through_stdlib_logging_errors_are_not_reported(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # logging.Handler.handleError prints "--- Logging error ---" to stderr when format()
    # raises; it must never be reached.
    capture = json_capture()
    capture.logger.info("%s %s", BadRepr(), BadRepr(), extra={"x": BadRepr()})
    assert "Logging error" not in capsys.readouterr().err
    assert len(capture.lines()) == 1


# --------------------------------------------------------------------------------------
# Audit context in log lines


def test_context_fields_are_included_when_set() -> None:
    capture = json_capture()
    capture.logger.info("outside")
    with context(actor=lambda: "alice", request_id="r1", tenant="acme", session="s1"):
        capture.logger.info("inside")
    outside, inside = capture.docs()
    assert "context" not in outside
    assert inside["context"] == {
        "actor": "alice",
        "request_id": "r1",
        "tenant": "acme",
        "session": "s1",
    }


def test_context_can_be_left_out() -> None:
    capture = json_capture(include_context=False)
    with context(request_id="r1"):
        capture.logger.info("x")
    assert "context" not in capture.docs()[0]


def test_a_failing_context_callable_is_left_out_of_logs() -> None:
    def broken() -> str:
        raise RuntimeError("session store down")

    capture = json_capture()
    with context(actor=broken, request_id="r1"):
        capture.logger.info("still logged")
    assert capture.docs()[0]["context"] == {"request_id": "r1"}


def test_a_context_callable_that_logs_does_not_loop() -> None:
    capture = json_capture()

    def current_user() -> str:
        capture.logger.debug("loading user")
        return "alice"

    with context(actor=current_user, request_id="r1"):
        capture.logger.info("request")
    docs = capture.docs()
    assert [d["message"] for d in docs] == ["loading user", "request"]
    assert docs[0]["context"] == {"request_id": "r1"}  # inner: callables skipped
    assert docs[1]["context"] == {"actor": "alice", "request_id": "r1"}


def test_context_filter_captures_where_the_record_is_emitted() -> None:
    records: queue.Queue[logging.LogRecord] = queue.Queue()
    queue_handler = logging.handlers.QueueHandler(records)
    queue_handler.addFilter(ContextFilter())
    logger = logging.Logger("queued", logging.DEBUG)
    logger.addHandler(queue_handler)
    with context(actor="alice", request_id="r1"):
        logger.info("queued message")
    record = records.get_nowait()
    assert getattr(record, CONTEXT_ATTR) == {"actor": "alice", "request_id": "r1"}
    # Formatted later, elsewhere (no context here): the captured one is used.
    doc = orjson.loads(JsonFormatter().format(record))
    assert doc["context"] == {"actor": "alice", "request_id": "r1"}
    assert CONTEXT_ATTR not in doc


# --------------------------------------------------------------------------------------
# RedactingFilter


def fake_redact(values: dict[str, object]) -> dict[str, object]:
    """A stand-in for sealtrail.redact: drops secret keys, masks a known secret value."""
    out: dict[str, object] = {}
    for key, value in values.items():
        if key in ("password", "token"):
            continue
        if isinstance(value, str):
            value = value.replace(SECRET, "[MASKED]")
        elif isinstance(value, dict):
            value = fake_redact(value)
        out[key] = value
    return out


def assert_no_secret(capture: Capture) -> None:
    assert SECRET not in capture.stream.getvalue()
    assert "password" not in capture.stream.getvalue()


@pytest.mark.parametrize("formatter", [JsonFormatter, TextFormatter, logging.Formatter])
def test_secrets_never_reach_the_log(formatter: Callable[[], logging.Formatter]) -> None:
    capture = Capture(formatter(), filters=(RedactingFilter(fake_redact),))
    log = capture.logger
    log.info("login", extra={"user": "alice", "password": SECRET, "nested": {"token": SECRET}})
    log.info("positional %s and %s", "alice", SECRET)
    log.info("mapping %(user)s %(password)s", {"user": "alice", "password": SECRET})
    log.info(f"f-string with {SECRET} pasted in")
    try:
        raise PermissionError(f"bad credentials {SECRET}")
    except PermissionError:
        log.exception("auth failed")
    log.info("stack", stack_info=True)
    assert_no_secret(capture)
    assert len(capture.lines()) >= 6


def test_redaction_details() -> None:
    capture = json_capture()
    capture.handler.addFilter(RedactingFilter(fake_redact))
    log = capture.logger
    log.info("login", extra={"user": "alice", "password": SECRET, "nested": {"token": "t"}})
    log.info("positional %s and %s", "alice", SECRET)
    log.info("mapping %(user)s %(password)s", {"user": "alice", "password": SECRET})
    log.info("template %s", "kept")
    try:
        raise PermissionError(SECRET)
    except PermissionError:
        log.exception("auth failed")
    extra, positional, mapping, template, failed = capture.docs()
    assert extra["user"] == "alice" and "password" not in extra
    assert extra["nested"] == {}
    assert positional["message"] == "positional alice and [MASKED]"
    assert mapping["message"] == "mapping alice [REDACTED]"
    assert template["message"] == "template kept"
    assert failed["exception"].endswith("PermissionError: [MASKED]")


def test_redaction_changes_the_record_only_as_needed() -> None:
    record = make_record("template %s", ("kept",))
    assert RedactingFilter(fake_redact).filter(record) is True
    assert record.msg == "template %s" and record.args == ("kept",)  # grouping intact
    record = make_record(f"pasted {SECRET}")
    RedactingFilter(fake_redact).filter(record)
    assert record.msg == "pasted [MASKED]" and record.args == ()


def test_a_record_is_redacted_once() -> None:
    calls = 0

    def counting(values: dict[str, object]) -> dict[str, object]:
        nonlocal calls
        calls += 1
        return values

    record = make_record("x %s", ("a",), field=1)
    RedactingFilter(counting).filter(record)
    first = calls
    RedactingFilter(counting).filter(record)
    assert calls == first == 3  # extras, args, message


@pytest.mark.parametrize(
    "redactor",
    [
        lambda values: 1 / 0,
        lambda values: "not a dict",
    ],
    ids=["raises", "returns-non-dict"],
)
def test_a_failing_redactor_withholds_the_record(redactor: Any) -> None:
    capture = json_capture()
    capture.handler.addFilter(RedactingFilter(redactor))
    try:
        raise ValueError(SECRET)
    except ValueError:
        capture.logger.exception("msg %s", SECRET, extra={"password": SECRET})
    assert_no_secret(capture)
    (doc,) = capture.docs()
    assert doc["message"].startswith("[log record withheld: redaction failed with")
    assert "exception" not in doc


def test_redacting_filter_needs_a_callable() -> None:
    with pytest.raises(TypeError):
        RedactingFilter("not callable")  # type: ignore[arg-type]


def test_the_attached_context_is_redacted_too() -> None:
    capture = json_capture()
    capture.handler.addFilter(ContextFilter())
    capture.handler.addFilter(RedactingFilter(fake_redact))
    with context(actor="alice", token=SECRET, reason=f"because {SECRET}"):
        capture.logger.info("x")
    (doc,) = capture.docs()
    assert doc["context"] == {"actor": "alice", "reason": "because [MASKED]"}


# --------------------------------------------------------------------------------------
# TextFormatter


def test_text_formatter_is_one_line_and_reversible() -> None:
    capture = Capture(TextFormatter(), name="auth")
    try:
        raise ValueError("multi\nline")
    except ValueError:
        capture.logger.exception("user %s\nINFO forged", "bob\x1b[2J", extra={"ip": "192.0.2.1"})
        stdlib = logging.Formatter("%(message)s")
        record = make_record("x")
    (line,) = capture.lines()
    assert line.isprintable()
    head, _, rest = line.partition(" ")
    assert RFC3339_UTC.fullmatch(head)
    assert rest.startswith("ERROR auth user bob\\u001b[2J\\u000aINFO forged ip=192.0.2.1")
    assert unescape_text(line).endswith("ValueError: multi\nline")
    assert stdlib.format(record) == "x"


def test_text_formatter_options() -> None:
    capture = Capture(
        TextFormatter("{levelname}|{message}", style="{", extras=True, include_context=False)
    )
    with context(request_id="r1"):
        capture.logger.info("hi", extra={"who": "two words", "n": 3, "empty": "", "q": 'a"b'})
    assert capture.lines() == ['INFO|hi who="two words" n=3 empty="" q="a\\\\"b"']
    dated = Capture(TextFormatter("%(asctime)s %(message)s", datefmt="%Y"))
    dated.logger.info("x")
    assert re.fullmatch(r"\d{4} x", dated.lines()[0])


def test_text_formatter_includes_context_and_never_raises() -> None:
    capture = Capture(TextFormatter("%(message)s"))
    with context(request_id="r1", actor="alice"):
        capture.logger.info("hi")
    capture.logger.info("%d", "x")
    capture.logger.info(BadRepr())
    lines = capture.lines()
    assert lines[0] == "hi actor=alice request_id=r1"
    assert lines[1].startswith("%d ('x',) message_error=")
    assert lines[2].startswith("<BadRepr object (repr failed)>")


def test_text_formatter_does_not_change_the_record_for_other_handlers() -> None:
    record = make_record("a %s", ("b",), field="v")
    TextFormatter().format(record)
    assert record.msg == "a %s" and record.args == ("b",)


# --------------------------------------------------------------------------------------
# structlog


def structlog_logger(*processors: Any) -> tuple[Any, io.StringIO]:
    stream = io.StringIO(newline="")
    logger = structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *processors,
        ],
    )
    return logger, stream


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [orjson.loads(line) for line in text[:-1].split("\n")]


def test_structlog_processor_and_renderer() -> None:
    logger, stream = structlog_logger(structlog_processor(fake_redact), structlog_renderer())
    with context(request_id="r1"):
        logger.info("login\nforged", user="alice", password=SECRET, raw=b"\x00", tags={"b", "a"})
    try:
        raise ValueError(SECRET)
    except ValueError:
        logger.exception("failed", note=f"has {SECRET}")
    assert SECRET not in stream.getvalue()
    login, failed = lines_of(stream)
    assert login["event"] == "login\nforged"
    assert login["level"] == "info" and "timestamp" in login
    assert "password" not in login
    assert login["raw"] == "\x00" and login["tags"] == ["a", "b"]
    assert login["context"] == {"request_id": "r1"}
    assert failed["exception"].endswith("ValueError: [MASKED]")
    assert failed["note"] == "has [MASKED]"
    assert "exc_info" not in failed


def test_structlog_processor_without_redaction_keeps_values() -> None:
    process = structlog_processor()
    out = process(None, "info", {"event": "x", "n": 2**70, "when": dt.date(2026, 1, 1)})
    assert out == {"event": "x", "n": str(2**70), "when": "2026-01-01"}


def test_structlog_processor_withholds_when_redaction_fails() -> None:
    def broken(values: dict[str, object]) -> dict[str, object]:
        raise RuntimeError("policy missing")

    process = structlog_processor(broken)
    out = process(None, "info", {"event": SECRET, "level": "info", "timestamp": "t"})
    assert out == {
        "event": "[log event withheld: processing failed with RuntimeError]",
        "level": "info",
        "timestamp": "t",
    }


def test_structlog_exc_info_forms() -> None:
    process = structlog_processor(include_context=False)
    error = KeyError("k")
    try:
        raise error
    except KeyError:
        from_true = process(None, "error", {"event": "e", "exc_info": True})
        from_tuple = process(None, "error", {"event": "e", "exc_info": sys.exc_info()})
    from_exception = process(None, "error", {"event": "e", "exc_info": error})
    nothing = process(None, "info", {"event": "e", "exc_info": False})
    for out in (from_true, from_tuple, from_exception):
        assert out["exception"].endswith("KeyError: 'k'")
    assert nothing == {"event": "e"}


def test_structlog_renderer_bounds_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    render = structlog_renderer(max_line=500, max_string=200)
    line = render(None, "info", {"event": "big", **{f"k{i}": "v" * 150 for i in range(10)}})
    assert len(line) <= 500 and "truncated" in orjson.loads(line)
    with context(request_id="r1"):
        assert "context" not in orjson.loads(render(None, "info", {"event": "x"}))
        with_ctx = structlog_renderer(include_context=True)(None, "info", {"event": "x"})
    assert orjson.loads(with_ctx)["context"] == {"request_id": "r1"}

    import sealtrail.logfmt as logfmt

    calls = 0

    def explode_once(value: object, *, indent: bool = False) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return orjson.dumps(value).decode()

    monkeypatch.setattr(logfmt, "json_text", explode_once)
    assert orjson.loads(render(None, "info", {"event": "x"})) == {
        "event": "unrenderable log event",
        "format_error": "RuntimeError",
    }


def test_structlog_processor_formatter_for_stdlib_records() -> None:
    """structlog's ProcessorFormatter renders stdlib records through the same chain; its
    own keys (the LogRecord) pass through the processor and never reach the line."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level],
        processors=[
            structlog_processor(fake_redact),
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog_renderer(),
        ],
    )
    capture = Capture(formatter)
    capture.logger.warning("user %s\nforged", SECRET)
    (doc,) = capture.docs()
    assert doc == {"event": "user [MASKED]\nforged", "level": "warning"}


def test_structlog_renderer_drops_processor_meta_keys() -> None:
    record = make_record()
    line = structlog_renderer()(None, "info", {"event": "x", "_record": record})
    assert orjson.loads(line) == {"event": "x"}
