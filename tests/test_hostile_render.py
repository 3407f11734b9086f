"""Every renderer against every hostile string: one record is always one line (I6).

For each corpus entry: ``escape_text`` gives one printable line and ``unescape_text``
reverses it exactly; ``csv_cell`` gives one CSV line that no spreadsheet evaluates;
``json_text`` gives one line that parses back to the same value; the stdlib
``JsonFormatter`` and ``TextFormatter`` and the structlog renderer write exactly one line
per record, with the string in the message, the arguments, extra keys and values, and an
exception.
"""

from __future__ import annotations

import csv
import io
import logging

import orjson
import pytest
import structlog

from hostile import DEEPLY_NESTED, HOSTILE, NAMES, UNENCODABLE
from sealtrail.logfmt import JsonFormatter, TextFormatter, structlog_processor, structlog_renderer
from sealtrail.render import csv_cell, escape_text, json_text, unescape_text

VALUES = [value for _, value in HOSTILE]
# Everything Python, JavaScript or a log shipper may treat as the end of a line.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "\n", "|", "%", "＝", "＋", "－", "＠")
INVISIBLE = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200b\u200d\u200e\ufeff"


def assert_one_line(text: str) -> None:
    assert not any(ch in text for ch in LINE_BREAKS), repr(text[:200])
    assert len(text.splitlines()) <= 1


@pytest.mark.parametrize("value", VALUES, ids=NAMES)
def test_escape_text_is_one_printable_line_and_reversible(value: str) -> None:
    out = escape_text(value)
    assert_one_line(out)
    assert out.isprintable()
    assert not any(ch in out for ch in INVISIBLE + "\x1b\x00\x7f\x9b")
    assert unescape_text(out) == value


def test_escape_text_grammar() -> None:
    assert escape_text("a\nb") == "a\\u000ab"
    assert escape_text("\\") == "\\\\"
    assert escape_text("\\u000a") == "\\\\u000a"  # looks like an escape, is data
    assert escape_text("\U000e0001") == "\\U000e0001"
    assert escape_text("\ud800") == "\\ud800"
    assert escape_text("plain text, émoji 🔥") == "plain text, émoji 🔥"
    assert escape_text(42) == "42"


@pytest.mark.parametrize(
    "bad", ["\\", "a\\", "\\x41", "\\u12", "\\U0011ffff", "\\uZZZZ", "\\U0001f60"]
)
def test_unescape_text_refuses_what_escape_text_never_writes(bad: str) -> None:
    with pytest.raises(ValueError):
        unescape_text(bad)


def test_unescape_text_accepts_uppercase_hex() -> None:
    assert unescape_text("\\u000A\\U0001F600") == "\n\U0001f600"


def read_csv(text: str) -> list[list[str]]:
    limit = csv.field_size_limit(1 << 24)  # the 1 MiB entry is over the default
    try:
        return list(csv.reader(io.StringIO(text, newline="")))
    finally:
        csv.field_size_limit(limit)


@pytest.mark.parametrize("value", VALUES, ids=NAMES)
def test_csv_cell_is_one_line_and_never_a_formula(value: str) -> None:
    cell = csv_cell(value)
    assert not cell.lstrip(" ").startswith(FORMULA_PREFIXES)
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\n").writerow([cell, "next"])
    written = buffer.getvalue()
    assert written.count("\n") == 1 and written.endswith("\n")
    assert_one_line(written[:-1])
    assert read_csv(written) == [[cell, "next"]]


def test_csv_cell_does_not_escape_twice() -> None:
    for value in VALUES:
        once = escape_text(value)
        assert csv_cell(once) in (once, "'" + once)
    assert csv_cell(None) == ""
    assert csv_cell("-5") == "'-5"
    assert csv_cell("  =1") == "'  =1"
    assert csv_cell("safe value") == "safe value"


@pytest.mark.parametrize(
    "value",
    [v for n, v in HOSTILE if n not in UNENCODABLE],
    ids=[n for n in NAMES if n not in UNENCODABLE],
)
def test_json_text_is_one_line_and_round_trips(value: str) -> None:
    for document in (value, [value], {value: value, "k": [value, {"n": value}]}):
        out = json_text(document)
        assert_one_line(out)
        assert not any(ch in out for ch in INVISIBLE + "\x1b\x00\x7f\x9b")
        assert orjson.loads(out) == document


@pytest.mark.parametrize("name", sorted(UNENCODABLE))
def test_json_text_refuses_lone_surrogates(name: str) -> None:
    with pytest.raises(ValueError, match="not representable as JSON"):
        json_text(dict(HOSTILE)[name])


def test_json_text_refuses_what_it_cannot_write_faithfully() -> None:
    cycle: list[object] = []
    cycle.append(cycle)
    for value in (DEEPLY_NESTED, cycle, 2**70, object()):
        with pytest.raises(ValueError):
            json_text(value)


# --------------------------------------------------------------------------------------
# Log formatters


class Capture:
    """A logger with one handler writing to a string, as a log file would."""

    def __init__(self, formatter: logging.Formatter) -> None:
        self.stream = io.StringIO(newline="")
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(formatter)
        self.logger = logging.Logger("hostile.test", logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(self.handler)

    def lines(self) -> list[str]:
        text = self.stream.getvalue()
        assert text.endswith("\n")
        # The record separator is "\n" alone: nothing else may split a record.
        lines = text[:-1].split("\n")
        for line in lines:
            assert_one_line(line)
        return lines


def log_hostile(logger: logging.Logger, value: object) -> int:
    """Log ``value`` in every position a record can hold it; returns the record count."""
    logger.info(value)
    logger.info("value=%s", value)
    logger.info("value=%(v)s", {"v": value})
    logger.warning("extra value", extra={"field": value})
    logger.warning("extra key", extra={"k_" + str(value)[:5000]: 1})
    logger.error("nested", extra={"data": {"list": [value], "set": {value}, "bytes": b"\x00"}})
    try:
        raise ValueError(value)
    except ValueError:
        logger.exception("failed: %s", value)
    logger.info("stack", stack_info=True, extra={"v": value})
    return 8


@pytest.mark.parametrize("value", VALUES, ids=NAMES)
def test_json_formatter_writes_one_line_per_record(value: str) -> None:
    capture = Capture(JsonFormatter())
    count = log_hostile(capture.logger, value)
    lines = capture.lines()
    assert len(lines) == count
    docs = [orjson.loads(line) for line in lines]
    assert all(doc["logger"] == "hostile.test" for doc in docs)
    assert "ValueError" in docs[6]["exception"]
    assert docs[7]["stack"]
    encodable = not any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    if len(value) <= 16_384 and encodable:
        # Lossless: the formatter escapes, it does not alter.
        assert docs[0]["message"] == docs[3]["field"] == docs[7]["v"] == value
        assert docs[1]["message"] == docs[2]["message"] == "value=" + value
        assert docs[5]["data"]["list"] == [value]
    elif not encodable:
        assert docs[0]["message"] == value.encode("utf-8", "backslashreplace").decode()
    else:
        assert "chars truncated]" in docs[0]["message"]
        assert len(lines[0]) < 20_000


def test_json_formatter_one_line_for_deeply_nested_extra() -> None:
    capture = Capture(JsonFormatter())
    capture.logger.info("deep", extra={"deep": DEEPLY_NESTED})
    capture.logger.info(DEEPLY_NESTED)
    lines = capture.lines()
    assert len(lines) == 2
    assert "nested too deep" in lines[0]
    assert orjson.loads(lines[1])["message"]


@pytest.mark.parametrize("value", VALUES, ids=NAMES)
def test_text_formatter_writes_one_line_per_record(value: str) -> None:
    capture = Capture(TextFormatter())
    count = log_hostile(capture.logger, value)
    lines = capture.lines()
    assert len(lines) == count
    for line in lines:
        assert line.isprintable()


@pytest.mark.parametrize("value", VALUES, ids=NAMES)
def test_structlog_renderer_writes_one_line_per_event(value: str) -> None:
    stream = io.StringIO(newline="")
    logger = structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=[structlog_processor(), structlog_renderer()],
    )
    logger.info(value, field=value, nested={"v": [value]}, raw=b"\xff\x00")
    try:
        raise RuntimeError(value)
    except RuntimeError:
        logger.exception("failed", why=value)
    # Without the processor, the renderer alone keeps the promise too.
    bare = structlog.wrap_logger(structlog.PrintLogger(stream), processors=[structlog_renderer()])
    bare.info(value, field=value, deep=DEEPLY_NESTED)
    text = stream.getvalue()
    lines = text[:-1].split("\n")
    assert len(lines) == 3
    for line in lines:
        assert_one_line(line)
        orjson.loads(line)
