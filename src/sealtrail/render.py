"""Rendering untrusted strings so that one event is always one line of output.

Audit data is attacker-controlled: an actor name, a user agent or a reason can hold CR/LF,
Unicode line separators, ANSI escapes, bidi overrides or a spreadsheet formula. These
helpers make such values inert in text tables, terminals and CSV.
"""

from __future__ import annotations

import unicodedata

# Characters that are not control characters in the C0/C1 sense but still move the cursor,
# reorder text or hide content.
_INVISIBLE = {
    "\u2028",  # LINE SEPARATOR
    "\u2029",  # PARAGRAPH SEPARATOR
    "\u0085",  # NEXT LINE
    "\u200b",
    "\u200c",
    "\u200d",
    "\u200e",
    "\u200f",
    "\u2060",
    "\ufeff",
    *(chr(c) for c in range(0x202A, 0x202F)),  # bidi embeddings and overrides
    *(chr(c) for c in range(0x2066, 0x206A)),  # bidi isolates
}

_CSV_FORMULA = ("=", "+", "-", "@", "\t", "\r", "\n", "|", "%")


def escape_text(value: object) -> str:
    """One printable line: control, format and separator characters become ``\\uXXXX``."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and not any(ch in _INVISIBLE for ch in text):
        return text.replace("\\", "\\\\") if "\\" in text else text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch in _INVISIBLE or not ch.isprintable() or unicodedata.category(ch) in ("Cc", "Cf"):
            code = ord(ch)
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def csv_cell(value: object) -> str:
    """A CSV cell that spreadsheets will not evaluate (OWASP CSV injection advice)."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if text.startswith(_CSV_FORMULA):
        return "'" + text
    return text


# Valid raw inside JSON strings, yet treated as line breaks by Python's str.splitlines(),
# JavaScript and many log shippers: escaped in every JSON line we print, so one event is
# always one line for every reader.
_JSON_LINE_BREAKERS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def json_text(value: object, *, indent: bool = False) -> str:
    """JSON for output (not for hashing): UTF-8, with Unicode line separators escaped."""
    import orjson

    text = orjson.dumps(value, option=orjson.OPT_INDENT_2 if indent else 0).decode("utf-8")
    return text.translate(_JSON_LINE_BREAKERS)
