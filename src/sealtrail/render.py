"""Rendering untrusted strings so that one event is always one line of output.

Audit data is attacker-controlled: an actor name, a user agent or a reason can hold CR/LF,
Unicode line separators, ANSI escapes, bidi overrides or a spreadsheet formula. These
helpers make such values inert in text tables, terminals, CSV and JSON lines (DESIGN.md,
I6), and they are shared by the CLI and by the formatters of :mod:`sealtrail.logfmt`, so
every output of Sealtrail escapes the same characters the same way.

The text escaping is reversible (:func:`unescape_text`), because an auditor who sees
``\\u202e`` in a table must be able to recover exactly what was recorded.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["csv_cell", "escape_text", "json_text", "unescape_text"]

# Characters that Python may call printable (or that are format characters) but that still
# move the cursor, reorder text, or hide content: line and paragraph separators, bidi
# controls, zero-width characters and the Hangul/Khmer fillers used to make invisible
# identifiers. Everything here is escaped by escape_text and json_text.
_INVISIBLE: Final = frozenset(
    {
        "\u0085",  # NEXT LINE
        "\u00ad",  # SOFT HYPHEN
        "\u034f",  # COMBINING GRAPHEME JOINER
        "\u061c",  # ARABIC LETTER MARK
        "\u115f",  # HANGUL CHOSEONG FILLER
        "\u1160",  # HANGUL JUNGSEONG FILLER
        "\u17b4",  # KHMER VOWEL INHERENT AQ
        "\u17b5",  # KHMER VOWEL INHERENT AA
        "\u180e",  # MONGOLIAN VOWEL SEPARATOR
        "\u2028",  # LINE SEPARATOR
        "\u2029",  # PARAGRAPH SEPARATOR
        "\u3164",  # HANGUL FILLER
        "\ufeff",  # ZERO WIDTH NO-BREAK SPACE (byte order mark)
        "\uffa0",  # HALFWIDTH HANGUL FILLER
        *(chr(c) for c in range(0x200B, 0x2010)),  # zero-width space/joiners, LRM, RLM
        *(chr(c) for c in range(0x202A, 0x202F)),  # bidi embeddings and overrides
        *(chr(c) for c in range(0x2060, 0x2070)),  # word joiner, invisible operators, isolates
        *(chr(c) for c in range(0xFFF9, 0xFFFC)),  # interlinear annotation controls
    }
)
_INVISIBLE_CLASS: Final = "".join(sorted(_INVISIBLE))
_INVISIBLE_RE: Final = re.compile(f"[{re.escape(_INVISIBLE_CLASS)}]")

# Candidates for escaping in the slow path of escape_text: everything but printable ASCII
# other than the backslash. Each candidate is then looked at on its own.
_ESCAPE_CANDIDATE: Final = re.compile(r"[^\x20-\x5b\x5d-\x7e]")


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    if ch == "\\":
        return "\\\\"
    if ch in _INVISIBLE or not ch.isprintable():
        code = ord(ch)
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return ch


def escape_text(value: object) -> str:
    """One printable line: control, format and separator characters become ``\\u`` escapes.

    The escaping is a small, reversible grammar (see :func:`unescape_text`):

    * a backslash is written ``\\\\``, so every other backslash in the output starts an
      escape;
    * a character from the Basic Multilingual Plane is written ``\\u`` and 4 lowercase hex
      digits, any other ``\\U`` and 8;
    * escaped are all characters that :meth:`str.isprintable` rejects (C0 and C1 controls,
      DEL, format characters such as bidi overrides and zero-width joiners, line and
      paragraph separators, spaces other than U+0020, lone surrogates, private-use and
      unassigned code points) plus a few printable but invisible fillers;
    * everything else, including emoji and other astral characters, stays as it is.

    Values that are not strings are rendered with :func:`str` first.
    """
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and _INVISIBLE_RE.search(text) is None:
        # The common case: nothing to escape but (rarely) backslashes.
        return text.replace("\\", "\\\\") if "\\" in text else text
    return _ESCAPE_CANDIDATE.sub(_escape_char, text)


_ESCAPE_SEQUENCE: Final = re.compile(r"\\(?:(\\)|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))|\\")


def _unescape_sequence(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return "\\"
    digits = match.group(2) or match.group(3)
    if digits is None:
        raise ValueError(
            f"malformed escape at offset {match.start()}: a backslash must be followed by "
            "another backslash, u and 4 hex digits, or U and 8 hex digits"
        )
    code = int(digits, 16)
    if code > 0x10FFFF:
        raise ValueError(f"escape at offset {match.start()} is beyond U+10FFFF")
    return chr(code)


def unescape_text(text: str) -> str:
    """The exact inverse of :func:`escape_text` on strings: ``unescape_text(escape_text(s))
    == s`` for every ``str`` (lone surrogates included).

    Raises :class:`ValueError` on a backslash that does not start a valid escape, which
    escape_text never writes: such text was not produced by it (or was altered since).
    """
    if "\\" not in text:
        return text
    return _ESCAPE_SEQUENCE.sub(_unescape_sequence, text)


# Prefixes that make spreadsheets evaluate a cell (OWASP "CSV injection"), including the
# fullwidth forms that some locales of Excel also accept. Tab, CR and LF never reach the
# check, since csv_cell escapes them first, but stay listed for what they are.
_CSV_FORMULA: Final = (
    "=",
    "+",
    "-",
    "@",
    "\t",
    "\r",
    "\n",
    "|",
    "%",
    "\uff1d",  # FULLWIDTH EQUALS SIGN
    "\uff0b",  # FULLWIDTH PLUS SIGN
    "\uff0d",  # FULLWIDTH HYPHEN-MINUS
    "\uff20",  # FULLWIDTH COMMERCIAL AT
)


def csv_cell(value: object) -> str:
    """A CSV cell that stays on one line and that spreadsheets will not evaluate.

    Text holding control, separator or invisible characters goes through
    :func:`escape_text` first, so a cell never spans two physical lines (a quoted newline is
    valid CSV, but breaks every line-oriented tool that reads exports). Text that is
    already printable is left alone, so ``csv_cell(escape_text(v))``, what the CLI writes,
    is not escaped twice. A cell whose first non-space character is a formula prefix
    (``= + - @ | %`` and their fullwidth forms) is prefixed with ``'``, as OWASP advises;
    that quote is the one change that is not reversible.
    """
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if not text.isprintable() or _INVISIBLE_RE.search(text) is not None:
        text = escape_text(text)
    if text.lstrip(" ").startswith(_CSV_FORMULA):
        return "'" + text
    return text


# Characters that are valid raw inside JSON strings (orjson escapes only C0 controls, the
# quote and the backslash) yet are line breaks for Python's str.splitlines(), JavaScript
# and many log shippers (U+2028, U+2029, U+0085), terminal controls (DEL and the C1 range,
# where U+009B is an 8-bit CSI), or text reordering and hiding characters (bidi controls,
# zero-width characters, tag characters). They only ever occur inside JSON strings, where
# a \\u escape means the same character, so escaping them is lossless.
_JSON_UNSAFE: Final = re.compile(f"[\x7f-\x9f{re.escape(_INVISIBLE_CLASS)}\U000e0000-\U000e007f]")


def _json_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_text(value: object, *, indent: bool = False) -> str:
    """JSON for output (not for hashing): UTF-8, one line unless ``indent``, with line
    separators, terminal controls and invisible characters escaped (see ``_JSON_UNSAFE``).

    ``orjson.loads(json_text(v)) == v`` for every JSON value. Values JSON cannot carry
    faithfully raise :class:`ValueError` instead of printing something else: lone
    surrogates (not valid UTF-8), integers beyond 64 bits, nesting deeper than 254 levels,
    cycles and types without a JSON form.
    """
    import orjson

    try:
        text = orjson.dumps(value, option=orjson.OPT_INDENT_2 if indent else 0).decode("utf-8")
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"not representable as JSON: {exc}") from None
    if text.isascii():
        # DEL is the one ASCII character orjson leaves raw that we escape.
        return text.replace("\x7f", "\\u007f") if "\x7f" in text else text
    return _JSON_UNSAFE.sub(_json_escape, text)
