"""The hostile-string corpus (issue 3, point 6; DESIGN.md, I6).

Strings an attacker can put into any audit or log field (an actor name, a user agent, a
reason, a target id) to forge a second record, hide or reorder text, drive a terminal,
break a JSON, CSV, CEF or syslog line, or make a spreadsheet run a formula. Every renderer
and every storage path is tested against all of them::

    from hostile import HOSTILE, STORABLE, DEEPLY_NESTED

``HOSTILE`` is a list of ``(name, value)`` pairs, names unique. Two kinds of entry cannot
be stored as an audit event and are listed apart so storage tests can expect a refusal:
lone surrogates (not valid UTF-8, refused by the envelope) and the 1 MiB string (over the
default event size limit). ``STORABLE`` is the corpus without them.
"""

from __future__ import annotations

from typing import Final


def _nested(depth: int) -> object:
    value: object = "bottom"
    for level in range(depth):
        value = {"level": level, "inner": [value]} if level % 2 else [value]
    return value


# 1 MiB of text in lines of 64 characters, every one of which would be a record on its
# own for a reader that splits on newlines.
_HUGE: Final = ("A" * 63 + "\n") * (1 << 14)

HOSTILE: Final[list[tuple[str, str]]] = [
    # Line terminators: each would end the record early for some reader.
    ("cr", "alice\rINFO forged"),
    ("lf", "alice\nINFO forged"),
    ("crlf", "alice\r\n2026-01-01T00:00:00Z INFO auth.login ok user=admin"),
    ("vertical_tab", "a\x0bb"),
    ("form_feed", "a\x0cb"),
    ("file_separator", "a\x1cb"),
    ("group_separator", "a\x1db"),
    ("record_separator", "a\x1eb"),
    ("next_line", "a\x85b"),
    ("line_separator", "a\u2028b"),
    ("paragraph_separator", "a\u2029b"),
    # Terminal escapes.
    ("ansi_colour", "\x1b[31mred\x1b[0m"),
    ("ansi_cursor_up", "ok\x1b[1A\x1b[2K\x1b[1Gforged line"),
    ("ansi_osc_title", "\x1b]0;pwned\x07title"),
    ("ansi_clear_screen", "\x1b[2J\x1b[Hclean slate"),
    ("c1_csi", "\x9b31mred"),
    # NUL and the other C0 and C1 controls, and DEL.
    ("nul", "adm\x00in"),
    ("c0_controls", "".join(chr(c) for c in range(0x20))),
    ("c1_controls", "".join(chr(c) for c in range(0x80, 0xA0))),
    ("delete", "a\x7fb"),
    ("backspace_overwrite", "rm -rf /\x08\x08\x08\x08\x08\x08\x08\x08ls"),
    # Text that reorders or hides itself.
    ("bidi_override", "invoice_\u202egpj.exe"),
    ("bidi_isolates", "a\u2066b\u2067c\u2068d\u2069e"),
    ("bidi_embeddings", "\u202a\u202b\u202c\u202d"),
    ("bidi_marks", "\u200e\u200f\u061c"),
    ("zero_width", "ad\u200bmi\u200cn\u200d\u2060\ufeff"),
    ("invisible_fillers", "\u3164\u115f\u1160\uffa0\u034f\u00ad"),
    ("tag_characters", "ok\U000e0001\U000e0041\U000e007f"),
    # Structure breakers.
    ("json_breaker", '"}, {"action":"forged"'),
    ("json_line_forgery", '"}\n{"action":"user.role.grant","outcome":"success"}'),
    ("format_percent", "%s%n%x%(password)s%%"),
    ("format_brace", "{0.__class__}{password}{{}}"),
    ("csv_equals", "=cmd|' /C calc'!A0"),
    ("csv_plus", "+1+1"),
    ("csv_minus", "-2+3+cmd|' /C calc'!A0"),
    ("csv_at", "@SUM(1+1)*cmd|' /C calc'!A0"),
    ("csv_tab", "\t=1+1"),
    ("csv_cr", "\r=1+1"),
    ("csv_leading_space", "  =1+1"),
    ("csv_fullwidth_equals", "\uff1d1+1"),
    ("csv_quote_comma", 'a","b,c\n'),
    ("cef_delimiters", "a|b\\c=d\\|e"),
    ("syslog_sd_breakers", '"] [forged@1 a="b"] \\"'),
    ("html_script", "<script>alert(document.cookie)</script>"),
    ("html_attribute", '" onmouseover="alert(1)'),
    ("sql_quote", "' OR '1'='1'; DROP TABLE events; --"),
    ("backslash_escapes", "\\u000a\\n\\\\ \\U0001f600 \\"),
    ("log_forgery", "bob\n2026-01-01T00:00:00.000000Z INFO app user=admin login ok"),
    # Big, small, and outside the Basic Multilingual Plane.
    ("huge_1mib", _HUGE),
    ("empty", ""),
    ("emoji_zwj", "\U0001f469\u200d\U0001f4bb \U0001f525 \U0001f1fa\U0001f1e6"),
    ("astral", "\U0001d54f\U00010348\U0001f600"),
    ("combining_zalgo", "z\u0351\u0307\u0352a\u0308\u0303l\u0323g\u0327o"),
    ("nonbreaking_spaces", "a\u00a0b\u3000c\u202fd"),
    ("private_use", "\ue000\U000f0000"),
    ("unassigned", "\U0003ffff"),
    ("lone_surrogate_high", "a\ud800b"),
    ("lone_surrogate_low", "a\udfffb"),
]

#: Names of entries that are not valid UTF-8 (refused by the event envelope).
UNENCODABLE: Final = frozenset({"lone_surrogate_high", "lone_surrogate_low"})
#: Names of entries over the default event size limit.
OVERSIZED: Final = frozenset({"huge_1mib"})
#: The corpus minus what the envelope refuses: each must be stored as exactly one event.
STORABLE: Final[list[tuple[str, str]]] = [
    (name, value) for name, value in HOSTILE if name not in UNENCODABLE | OVERSIZED
]
#: Names only, in corpus order, for ``pytest.mark.parametrize(..., ids=NAMES)``.
NAMES: Final = [name for name, _ in HOSTILE]

#: 5,000 levels of lists and objects: beyond every parser's and encoder's depth limit.
DEEPLY_NESTED: Final = _nested(5_000)

assert len(HOSTILE) >= 30
assert len(set(NAMES)) == len(NAMES)
