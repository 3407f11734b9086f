"""Value detectors for free text: the patterns, their false-positive guards, and the scanner.

Private machinery of :mod:`sealtrail.redact`. Every detector is an RE2 pattern plus a
guard written in Python. RE2 matches in time linear in the input (no backtracking), so a
hostile string cannot stall the emit path; what RE2 cannot express (Luhn and mod-97
checksums, the SSN number ranges, entropy, looking one byte past the match) is checked on
the candidates it returns, which are few. Patterns are ASCII-only and operate on UTF-8 bytes:
``\\d`` or ``\\w`` would accept Arabic-Indic or fullwidth digits, which no card issuer uses.

The scanner works on one byte string per event: all scanned values joined with NUL. No
pattern can match a NUL (every negated class excludes it), so a match never spans two values
and its offset tells which value it belongs to. One RE2 ``Set`` pass over that text says which
detectors have any candidate at all (usually none), and only those detectors run their own
search. Each detector is searched independently and the replacements of all of them are
merged (a union), so one detector's span can never hide another detector's secret.
"""

from __future__ import annotations

import base64
import binascii
import collections
import math
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import orjson
import re2

# -- RE2 plumbing ------------------------------------------------------------------------

#: Memory for one compiled pattern's DFA cache. When a DFA search runs out of it, RE2 falls
#: back to its NFA, which is slower but still linear and still exact.
_PATTERN_MEM: Final = 8 << 20
#: Memory for the ``Set`` that gates every scan. A ``Set`` has no NFA to fall back to, so RE2
#: never lets it give up when its cache thrashes: it flushes the cache and carries on
#: (``dfa.cc``: the bail-out is disabled for ``kManyMatch``), and ``Compile()`` fails up front
#: if the budget cannot hold a working cache. So a compiled ``Set`` cannot silently report
#: "no match" for lack of memory; a larger budget only keeps it fast on hostile input.
_SET_MEM: Final = 64 << 20

_Spans = list[tuple[int, int]]
_Matcher = Callable[[bytes, int], _Spans]


def _options(max_mem: int) -> Any:
    options = re2.Options()
    options.max_mem = max_mem
    options.log_errors = False
    return options


def compile_matcher(pattern: bytes) -> _Matcher:
    """Compile an RE2 pattern into ``match(data, pos) -> spans``: the whole match and each
    group as ``(start, end)`` byte offsets, ``(-1, -1)`` when absent.

    Calls the compiled ``RE2`` object under the ``re2`` module's Python wrapper directly:
    the wrapper's generator and match object double the cost of a call (about 2 µs instead of
    4 µs here), and a scan makes several calls per event. Falls back to the public API if a
    future release moves that object.
    """
    regexp = re2.compile(pattern, _options(_PATTERN_MEM))
    low = getattr(regexp, "_regexp", None)
    anchor = getattr(re2, "_Anchor", None)
    if low is not None and anchor is not None and hasattr(low, "Match"):
        unanchored = anchor.UNANCHORED

        def match(data: bytes, pos: int) -> _Spans:
            spans: _Spans = low.Match(unanchored, data, pos, len(data))
            return spans

        return match
    return _public_matcher(regexp)


def _public_matcher(regexp: Any) -> _Matcher:
    groups = int(regexp.groups)

    def match(data: bytes, pos: int) -> _Spans:
        found = regexp.search(data, pos)
        if found is None:
            return [(-1, -1)] * (groups + 1)
        return [found.span(i) for i in range(groups + 1)]

    return match


# -- Guards --------------------------------------------------------------------------------

_DIGITS: Final = frozenset(b"0123456789")
_ALNUM: Final = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_UPPER: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_LOWER: Final = frozenset(b"abcdefghijklmnopqrstuvwxyz")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_REDACTION_PREFIXES: Final = (b"[REDACTED", b"****", b"hmac-sha256:", b"enc:aes256gcm:")

# A guard gets the scanned bytes, the whole match and the span the detector would replace,
# and returns the span to replace (possibly narrowed) or None to reject the candidate.
_Guard = Callable[[bytes, int, int, int, int], "tuple[int, int] | None"]


def _glued(data: bytes, start: int, end: int) -> bool:
    """True when a number continues past the match through ``-``, ``.`` or ``/``
    (``2026-01-31-4155552671``, ``10.203.113.7``): it is then part of a longer identifier,
    version or date, not a card, phone or SSN of its own."""
    if start >= 2 and data[start - 1] in b"-./" and data[start - 2] in _DIGITS:
        return True
    n = len(data)
    return end + 1 < n and data[end] in b"-./" and data[end + 1] in _DIGITS


def luhn_valid(digits: bytes | str) -> bool:
    """The Luhn (mod 10) check digit test that every payment card number passes."""
    total = 0
    for position, char in enumerate(
        reversed(digits.encode() if isinstance(digits, str) else digits)
    ):
        value = char - 48
        if position & 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _issuer_ok(digits: bytes) -> bool:
    """Card numbers start with an issuer prefix: 3 (Amex, Diners, JCB), 4 (Visa),
    5 (Mastercard, Maestro), 6 (Discover, UnionPay, Maestro) or 2221-2720 (Mastercard).
    Numbers starting with 0, 1, 7, 8 or 9 (airlines, petroleum, telecoms, national) are not
    payment cards; excluding them keeps millisecond timestamps (1732000000000) out."""
    first = digits[0]
    if first in b"3456":
        return True
    return first == 0x32 and 2221 <= int(digits[:4]) <= 2720


def card_number_valid(digits: bytes) -> bool:
    """13 to 19 digits with an issuer prefix and a valid Luhn check digit."""
    return (
        13 <= len(digits) <= 19 and digits.isdigit() and _issuer_ok(digits) and luhn_valid(digits)
    )


def _guard_card(data: bytes, start: int, end: int, rs: int, re_: int) -> tuple[int, int] | None:
    raw = data[start:end]
    has_space = 0x20 in raw
    has_dash = 0x2D in raw
    if has_space and has_dash:
        return None
    if raw[0] not in b"23456":  # no issuer prefix (see _issuer_ok): the common rejection
        return None
    if not (has_space or has_dash):
        return None if not card_number_valid(raw) or _glued(data, start, end) else (start, end)
    separator = b" " if has_space else b"-"
    groups = raw.split(separator)
    # Printed cards group digits 4-4-4-4(-3), 4-6-5 (Amex) or 4-6-4 (Diners). The pattern is
    # greedy and may have run into a following number ("4111 1111 1111 1111 2026"): try the
    # longest run of whole groups first, then drop trailing groups.
    if len(groups[0]) != 4:
        return None
    while len(groups) > 1:
        cut = start + len(separator.join(groups))
        if all(3 <= len(group) <= 6 for group in groups):
            digits = b"".join(groups)
            if len(digits) < 13:
                return None
            if card_number_valid(digits) and not _glued(data, start, cut):
                return start, cut
        groups.pop()
    return None


def _guard_ssn(data: bytes, start: int, end: int, rs: int, re_: int) -> tuple[int, int] | None:
    raw = data[start:end]
    if raw[3] != raw[6] or _glued(data, start, end):
        return None
    return (start, end) if ssn_valid(raw[:3] + raw[4:6] + raw[7:]) else None


_SSN_NEVER_ISSUED: Final = frozenset({b"078051120", b"219099999"})


def ssn_valid(digits: bytes) -> bool:
    """US SSN ranges: area not 000, 666 or 900-999, group not 00, serial not 0000, and not
    one of the numbers known from advertising (078-05-1120, 219-09-9999)."""
    if len(digits) != 9 or not digits.isdigit():
        return False
    area = digits[:3]
    if area in (b"000", b"666") or area[0] == 0x39:
        return False
    return digits[3:5] != b"00" and digits[5:] != b"0000" and digits not in _SSN_NEVER_ISSUED


#: IBAN length by country (ISO 13616 registry). A country outside this table is not an IBAN.
IBAN_LENGTHS: Final = {
    b"AD": 24, b"AE": 23, b"AL": 28, b"AT": 20, b"AZ": 28, b"BA": 20, b"BE": 16, b"BG": 22,
    b"BH": 22, b"BI": 27, b"BR": 29, b"BY": 28, b"CH": 21, b"CR": 22, b"CY": 28, b"CZ": 24,
    b"DE": 22, b"DJ": 27, b"DK": 18, b"DO": 28, b"EE": 20, b"EG": 29, b"ES": 24, b"FI": 18,
    b"FK": 18, b"FO": 18, b"FR": 27, b"GB": 22, b"GE": 22, b"GI": 23, b"GL": 18, b"GR": 27,
    b"GT": 28, b"HR": 21, b"HU": 28, b"IE": 22, b"IL": 23, b"IQ": 23, b"IS": 26, b"IT": 27,
    b"JO": 30, b"KW": 30, b"KZ": 20, b"LB": 28, b"LC": 32, b"LI": 21, b"LT": 20, b"LU": 20,
    b"LV": 21, b"LY": 25, b"MC": 27, b"MD": 24, b"ME": 22, b"MK": 19, b"MN": 20, b"MR": 27,
    b"MT": 31, b"MU": 30, b"NI": 28, b"NL": 18, b"NO": 15, b"OM": 23, b"PK": 24, b"PL": 28,
    b"PS": 29, b"PT": 25, b"QA": 29, b"RO": 24, b"RS": 22, b"RU": 33, b"SA": 24, b"SC": 31,
    b"SD": 18, b"SE": 24, b"SI": 19, b"SK": 24, b"SM": 27, b"SO": 23, b"ST": 25, b"SV": 28,
    b"TL": 23, b"TN": 24, b"TR": 26, b"UA": 29, b"VA": 22, b"VG": 24, b"XK": 20, b"YE": 30,
}  # fmt: skip


def iban_valid(compact: bytes) -> bool:
    """Country length and the ISO 7064 mod-97 check (the number, with the first four
    characters moved to the end and letters as 10..35, leaves remainder 1)."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact[2:4].isdigit():
        return False
    if not compact.isalnum() or not compact.isascii():
        return False
    rearranged = (compact[4:] + compact[:4]).decode("ascii")
    number = "".join(str(int(char, 36)) for char in rearranged)
    return int(number) % 97 == 1


def _guard_iban(data: bytes, start: int, end: int, rs: int, re_: int) -> tuple[int, int] | None:
    raw = data[start:end]
    length = IBAN_LENGTHS.get(raw[:2])
    if length is None:
        return None
    # The pattern is greedy and may run on into a following code ("... 3000 EUR"): cut the
    # candidate at the country's length, which must fall on a group boundary.
    taken = 0
    cut = len(raw)
    for index, char in enumerate(raw):
        if char != 0x20:
            taken += 1
            if taken == length:
                cut = index + 1
                break
    if taken < length or (cut < len(raw) and raw[cut] != 0x20):
        return None
    return (start, start + cut) if iban_valid(raw[:cut].replace(b" ", b"")) else None


def _guard_phone(data: bytes, start: int, end: int, rs: int, re_: int) -> tuple[int, int] | None:
    raw = data[start:end]
    digits = sum(1 for char in raw if char in _DIGITS)
    if raw[0] == 0x2B:  # "+": E.164, country code included, at most 15 digits
        if not 8 <= digits <= 15:
            return None
        if start > 0 and data[start - 1] in _ALNUM:
            return None
    elif not 9 <= digits <= 12:
        return None
    opened = raw.count(b"(")
    if opened != raw.count(b")") or opened > 1:
        return None
    if opened and raw.index(b"(") > raw.index(b")"):
        return None
    if end < len(data) and data[end] in _DIGITS:
        return None
    if _glued(data, start, end):
        return None
    return start, end


_FILE_EXTENSIONS: Final = frozenset(
    b"png jpg jpeg gif svg webp ico bmp tif tiff pdf js mjs css map json xml html htm txt md "
    b"py rb go rs java kt swift zip gz tgz tar log csv yml yaml toml lock ts tsx jsx".split()
)


def _in_url_authority(data: bytes, start: int) -> bool:
    """True when ``start`` follows ``scheme://`` within the same word: ``user@host`` there is
    the user part of a URL (its password, if any, is ``url_password``'s), not an address."""
    scheme = data.rfind(b"://", max(0, start - 256), start)
    if scheme < 0:
        return False
    between = data[scheme:start]
    return not any(space in between for space in (b" ", b"\t", b"\n", b"\r", b"\x00"))


def _guard_email(data: bytes, start: int, end: int, rs: int, re_: int) -> tuple[int, int] | None:
    # "icon@2x.png" is a retina image name, not an address.
    tld = data[data.rfind(b".", start, end) + 1 : end].lower()
    if tld in _FILE_EXTENSIONS or _in_url_authority(data, start):
        return None
    return start, end


def _b64decode(text: bytes) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _guard_jwt(data: bytes, start: int, end: int, rs: int, re_: int) -> tuple[int, int] | None:
    # A JOSE header is a JSON object naming its algorithm; "eyJ" alone is only '{"'.
    header = _b64decode(data[start : data.index(b".", start)])
    if header is None:
        return None
    try:
        parsed = orjson.loads(header)
    except orjson.JSONDecodeError:
        return None
    return (start, end) if isinstance(parsed, dict) and "alg" in parsed else None


def _guard_bearer(data: bytes, start: int, end: int, rs: int, re_: int) -> tuple[int, int] | None:
    token = data[rs:re_]
    if token.startswith(_REDACTION_PREFIXES):
        return None
    # "Bearer authentication is required": a token has digits or punctuation, or at least
    # mixed case over some length; an ordinary word has neither.
    chars = frozenset(token)
    if chars & _DIGITS or not chars <= _ALNUM:
        return rs, re_
    if chars & _UPPER and chars & _LOWER and len(token) >= 16:
        return rs, re_
    return None


def _guard_basic(data: bytes, start: int, end: int, rs: int, re_: int) -> tuple[int, int] | None:
    # "Basic information": credentials decode to printable "user:password".
    token = data[rs:re_]
    try:
        decoded = base64.b64decode(token + b"=" * (-len(token) % 4), validate=True)
        text = decoded.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    return (rs, re_) if ":" in text and text.isprintable() else None


def _followed_by(data: bytes, end: int, chars: frozenset[int]) -> bool:
    return end < len(data) and data[end] in chars


_B64_CHARS: Final = _ALNUM | frozenset(b"+/=")
_KEY_CHARS: Final = _ALNUM | frozenset(b"_-")


def _guard_aws_secret(
    data: bytes, start: int, end: int, rs: int, re_: int
) -> tuple[int, int] | None:
    token = frozenset(data[rs:re_])
    if _followed_by(data, re_, _B64_CHARS) or not (token & _UPPER and token & _LOWER):
        return None
    return rs, re_


def _guard_gcp(data: bytes, start: int, end: int, rs: int, re_: int) -> tuple[int, int] | None:
    return None if _followed_by(data, end, _KEY_CHARS) else (start, end)


def _guard_unredacted(
    data: bytes, start: int, end: int, rs: int, re_: int
) -> tuple[int, int] | None:
    """The value is not already one of our own redaction outputs (redaction is idempotent)."""
    value = data[rs:re_]
    if value.startswith(_REDACTION_PREFIXES):
        return None
    if value.lower() in (b"null", b"none", b"true", b"false", b"undefined", b"nil"):
        return None
    return rs, re_


def _count_in_python(tally: dict[int, int], items: Iterable[int]) -> None:
    for item in items:
        tally[item] = tally.get(item, 0) + 1


# The C helper behind collections.Counter, without Counter's own per-call overhead (five
# times the cost of counting a 32-byte token).
_count_elements: Callable[[dict[int, int], Iterable[int]], None] = getattr(
    collections, "_count_elements", _count_in_python
)
_TERMS: Final = (0.0, *(count * math.log2(count) for count in range(1, 1025)))


def shannon_entropy(text: bytes) -> float:
    """Bits per character of ``text`` taken as a sample of its own character distribution:
    ``log2(n) - sum(c * log2(c)) / n`` over the character counts ``c``, with the terms looked
    up in a table (this runs on every token-like candidate)."""
    length = len(text)
    if not length:
        return 0.0
    tally: dict[int, int] = {}
    _count_elements(tally, text)
    counts = tally.values()
    if length <= 1024:
        weighted = sum(map(_TERMS.__getitem__, counts))
    else:
        weighted = sum(count * math.log2(count) for count in counts)
    return math.log2(length) - weighted / length


_CLASSES: Final = bytes(
    0x61 if chr(i).islower() and i < 128 else
    0x41 if chr(i).isupper() and i < 128 else
    0x30 if chr(i).isdigit() and i < 128 else 0x20
    for i in range(256)
)  # fmt: skip
#: Class changes that start a new word-like run: any change between lower case, upper case
#: and digits, except a single capital followed by lower case ("Word"), which ``AAa`` (a
#: capital run of two or more, then lower case) does not cover.
_RUN_BREAKS: Final = (b"aA", b"a0", b"A0", b"0a", b"0A", b"AAa")


def mean_run_length(text: bytes) -> float:
    """Mean length of the word-like runs of ``text``: lower-case runs (with one leading
    capital), upper-case runs and digit runs, split at every other class change and at
    punctuation. An identifier like ``UserAccountService2`` has long runs; random base64
    changes class about every second character. Computed with byte-string operations
    (translate, split, count) rather than a loop per character."""
    classes = text.translate(_CLASSES)
    letters = len(classes) - classes.count(b" ")
    runs = len(classes.split()) + sum(classes.count(change) for change in _RUN_BREAKS)
    return letters / runs if runs else 0.0


def _looks_like_uuid(text: bytes) -> bool:
    if len(text) not in (32, 36):
        return False
    compact = text.replace(b"-", b"")
    if len(compact) != 32 or not frozenset(compact) <= _HEX:
        return False
    if len(text) == 36:
        return text[8] == text[13] == text[18] == text[23] == 0x2D
    # 32 hex digits with a UUID's version and variant nibbles.
    return len(text) == 32 and text[12] in b"12345678" and text[16] in b"89abAB"


def _after_redaction_prefix(data: bytes, start: int) -> bool:
    """True when ``start`` is inside one of our own ``hmac-sha256:<key id>:<hex>`` or
    ``enc:aes256gcm:...`` outputs, so redacting twice changes nothing."""
    window = data[max(0, start - 200) : start]
    cut = max(window.rfind(b"hmac-sha256:"), window.rfind(b"enc:aes256gcm:"))
    if cut < 0:
        return False
    between = window[cut:]
    return frozenset(between) <= _KEY_CHARS | frozenset(b":.")


def high_entropy(token: bytes) -> bool:
    """Is ``token`` (a run of base64/hex characters, 20 or more) a random secret?

    Two shapes are accepted. Hex only: 32 or more characters with digits and an entropy of at
    least 3 bits per character (API keys, digests; UUIDs excluded). Anything else must mix
    upper case, lower case and digits, reach an entropy threshold that grows with length
    (3.3 bits at 20 characters up to 4.0), and change character class often (mean word-like
    run at most 2.5 characters): random base62 of 20 characters passes about 95% of the time
    and of 40 characters over 99%, while camel-case identifiers, paths and words do not.
    """
    length = len(token)
    chars = frozenset(token)
    if _looks_like_uuid(token):
        return False
    if chars <= _HEX:
        return length >= 32 and bool(chars & _DIGITS) and shannon_entropy(token) >= 3.0
    if not (chars & _DIGITS and chars & _UPPER and chars & _LOWER):
        return False
    if mean_run_length(token) > 2.5:
        return False
    return shannon_entropy(token) >= min(4.0, 3.3 + (length - 20) * 0.03)


def _guard_entropy(data: bytes, start: int, end: int, rs: int, re_: int) -> tuple[int, int] | None:
    token = data[start:end].rstrip(b"=")
    if _after_redaction_prefix(data, start) or not high_entropy(token):
        return None
    return start, end


# -- Normalisers for HMAC: equal values must hash alike wherever they were found ---------


def _digits_only(text: str) -> str:
    return "".join(char for char in text if "0" <= char <= "9")


def _phone_digits(text: str) -> str:
    digits = _digits_only(text)
    return "+" + digits if text.startswith("+") else digits


def _compact_upper(text: str) -> str:
    return text.replace(" ", "").upper()


def _same(text: str) -> str:
    return text


# -- The detectors ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Detector:
    """One value detector.

    ``group`` is the capture group replaced (0: the whole match), so context such as the
    ``Bearer`` scheme or the user in a URL stays readable. ``bounded`` detectors match at most
    a few dozen bytes; when their guard rejects a candidate the search resumes one byte later,
    so a card number right after a rejected digit run is still found. Unbounded detectors
    resume after the rejected candidate, which keeps the scan linear. ``literal`` is a byte
    string every match contains (``@`` for e-mail): once it no longer occurs, the search
    stops without another call into RE2, which costs more than the search itself on short
    text. A detector that ``yields`` (the costly, catch-all ``high_entropy``) skips its
    candidates that lie inside spans other detectors already replace: they would add
    nothing to the union.
    """

    name: str
    description: str
    pattern: bytes
    group: int = 0
    guard: _Guard | None = None
    bounded: bool = False
    normalise: Callable[[str], str] = _same
    literal: bytes | None = None
    yields: bool = False


_KEYWORDS: Final = (
    rb"password|passwd|pwd|passphrase|secret|token|api[_\-]?key|private[_\-]?key"
    rb"|access[_\-]?key|authorization|cookie|session[_\-]?id|credentials?"
)

#: In priority order: when two detectors replace overlapping spans the union is replaced and
#: labelled with the earlier-starting one, or at the same start with the earlier one here.
DETECTORS: Final[tuple[Detector, ...]] = (
    Detector(
        "pem_private_key",
        "PEM private key blocks (-----BEGIN ... PRIVATE KEY----- to END, or to the end of a "
        "truncated key)",
        rb"-----BEGIN[A-Z0-9 ]{0,40} PRIVATE KEY(?: BLOCK)?-----"
        rb"(?:[A-Za-z0-9+/=\s:,.\\]|-[A-Za-z0-9])*"
        rb"(?:-----END[A-Z0-9 ]{0,40} PRIVATE KEY(?: BLOCK)?-----)?",
        literal=b"-----BEGIN",
    ),
    Detector(
        "jwt",
        "JSON Web Tokens (JWS and JWE) whose header decodes to a JSON object with 'alg'",
        rb"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*"
        rb"(?:\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)?",
        guard=_guard_jwt,
        literal=b"eyJ",
    ),
    Detector(
        "aws_access_key_id",
        "AWS access key ids (AKIA, ASIA, ABIA, ACCA + 16 characters)",
        rb"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b",
    ),
    Detector(
        "aws_secret_key",
        "AWS secret access keys (40 base64 characters) after an 'aws ... secret' name",
        rb"(?i:aws)[A-Za-z0-9_.\- ]{0,24}(?i:secret)[A-Za-z0-9_.\- ]{0,24}[\"']?[ \t]*"
        rb"(?:=>|=|:)[ \t]*[\"']?([A-Za-z0-9/+]{40})",
        group=1,
        guard=_guard_aws_secret,
    ),
    Detector(
        "gcp_api_key",
        "Google Cloud API keys (AIza + 35 characters)",
        rb"\bAIza[0-9A-Za-z_\-]{35}",
        guard=_guard_gcp,
        literal=b"AIza",
    ),
    Detector(
        "github_token",
        "GitHub tokens (ghp_, gho_, ghu_, ghs_, ghr_, github_pat_)",
        rb"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
        literal=b"_",
    ),
    Detector(
        "slack_token",
        "Slack tokens (xoxa-, xoxb-, xoxp-, xoxr-, xoxs-, xoxe-, xoxo-, xapp-) and webhook URLs",
        rb"\b(?:xox[abeoprs]-[A-Za-z0-9\-]{10,}|xapp-[0-9]-[A-Za-z0-9\-]{10,})"
        rb"|https://hooks\.slack\.com/services/[A-Za-z0-9_/\-]{20,}",
    ),
    Detector(
        "stripe_key",
        "Stripe secret and restricted keys (sk_live_, sk_test_, rk_live_, rk_test_) and "
        "webhook secrets (whsec_)",
        rb"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,}|\bwhsec_[A-Za-z0-9]{20,}",
        literal=b"_",
    ),
    Detector(
        "bearer",
        "Bearer tokens (the token after 'Bearer'; the scheme stays readable)",
        rb"\b(?i:bearer)[ \t]+([A-Za-z0-9\-._~+/]{8,}=*)",
        group=1,
        guard=_guard_bearer,
    ),
    Detector(
        "basic_auth",
        "HTTP Basic credentials (base64 of user:password after 'Basic')",
        rb"\b(?i:basic)[ \t]+([A-Za-z0-9+/]{8,}={0,2})",
        group=1,
        guard=_guard_basic,
    ),
    Detector(
        "url_password",
        "Passwords in URLs (scheme://user:password@host: the user stays, the password goes)",
        rb"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@\x00]*:([^\s/?#\x00]+)@",
        group=1,
        guard=_guard_unredacted,
        literal=b"://",
    ),
    Detector(
        "secret_assignment",
        "The value in 'password=...', 'api_key: ...', 'token=...' and similar assignments",
        rb"(?i)\b[A-Za-z0-9_\-]*?(?:" + _KEYWORDS + rb")[\"']?[ \t]*[:=][ \t]*[\"']?"
        rb"(?:(?:bearer|basic|token)[ \t]+)?([^\s\"'&,;<>\x00]+)",
        group=1,
        guard=_guard_unredacted,
    ),
    Detector(
        "email",
        "E-mail addresses (not image names like icon@2x.png)",
        rb"[A-Za-z0-9._%+\-]+@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
        rb"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}\b",
        guard=_guard_email,
        normalise=str.lower,
        literal=b"@",
    ),
    Detector(
        "card",
        "Payment card numbers: 13-19 digits, plain or in printed groups, issuer prefix, Luhn",
        rb"\b[0-9](?:[ \-]?[0-9]){12,18}\b",
        guard=_guard_card,
        bounded=True,
        normalise=_digits_only,
    ),
    Detector(
        "iban",
        "IBANs: known country, its length, mod-97 check",
        rb"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b",
        guard=_guard_iban,
        bounded=True,
        normalise=_compact_upper,
    ),
    Detector(
        "us_ssn",
        "US Social Security numbers written AAA-GG-SSSS (or with spaces), valid ranges only",
        rb"\b[0-9]{3}[ \-][0-9]{2}[ \-][0-9]{4}\b",
        guard=_guard_ssn,
        bounded=True,
        normalise=_digits_only,
    ),
    Detector(
        "phone",
        "Phone numbers: E.164 (+ and 8-15 digits) and common national formats with separators",
        rb"\+[1-9](?:[ .\-]?\(?[0-9]\)?){6,14}"
        rb"|(?:\b1[ .\-]?)?(?:\([2-9][0-9]{2}\)|\b[2-9][0-9]{2})"
        rb"[ .\-]?[2-9][0-9]{2}[ .\-][0-9]{4}\b"
        rb"|\b0[1-9][0-9]{1,3}[ \-][0-9]{3,4}[ \-]?[0-9]{3,4}\b"
        rb"|\b0[1-9](?:[ .\-][0-9]{2}){4}\b",
        guard=_guard_phone,
        bounded=True,
        normalise=_phone_digits,
    ),
    Detector(
        "high_entropy",
        "High-entropy tokens: runs of 20+ base64/hex characters that look random (not UUIDs, "
        "identifiers or words)",
        rb"[A-Za-z0-9+/_\-]{20,}={0,2}",
        guard=_guard_entropy,
        yields=True,
    ),
)

DETECTOR_NAMES: Final = tuple(detector.name for detector in DETECTORS)
BY_NAME: Final = {detector.name: detector for detector in DETECTORS}
CARD_INDEX: Final = DETECTOR_NAMES.index("card")


# -- Scanning ----------------------------------------------------------------------------

#: One replacement: (start, end, detector index), byte offsets into the scanned text.
Hit = tuple[int, int, int]


class Scanner:
    """Finds detector spans in UTF-8 bytes, for a fixed set of enabled detectors.

    Indexes used in :data:`Hit` are positions in :data:`DETECTORS` (so bit masks built from
    them are stable across scanners). Thread-safe: compiled RE2 objects are.
    """

    __slots__ = ("_gate", "_members", "_search")

    def __init__(self, indexes: Iterable[int]) -> None:
        self._members = sorted(set(indexes))
        self._search = {index: compile_matcher(DETECTORS[index].pattern) for index in self._members}
        self._gate: Any = None
        if self._members:
            gate = re2.Set.SearchSet(_options(_SET_MEM))
            for index in self._members:
                gate.Add(DETECTORS[index].pattern)
            gate.Compile()
            self._gate = gate

    @property
    def empty(self) -> bool:
        return not self._members

    def candidates(self, data: bytes) -> list[int]:
        """Detector indexes with at least one raw match somewhere in ``data``: one linear pass
        for all detectors together. Usually empty, and then the scan is over."""
        if self._gate is None:
            return []
        found = self._gate.Match(data)
        return [self._members[i] for i in found] if found else []

    def find(
        self, data: bytes, index: int, covered: list[Hit] | None = None
    ) -> list[tuple[int, int]]:
        """Spans detector ``index`` replaces in ``data``, guarded, in order. ``covered``:
        merged spans already found by other detectors (used if the detector ``yields``)."""
        detector = DETECTORS[index]
        if not detector.yields or not covered:
            covered = None
        cover_starts = [hit[0] for hit in covered] if covered else []
        search = self._search[index]
        guard = detector.guard
        group = detector.group
        bounded = detector.bounded
        literal = detector.literal
        accepted_spans: list[tuple[int, int]] = []
        pos = 0
        size = len(data)
        while pos <= size:
            if literal is not None and data.find(literal, pos) < 0:
                return accepted_spans
            spans = search(data, pos)
            start, end = spans[0]
            if start < 0:
                return accepted_spans
            rs, re_ = spans[group]
            if covered is not None:
                inside = bisect_right(cover_starts, rs) - 1
                if inside >= 0 and covered[inside][1] >= re_:
                    pos = start + 1 if bounded or end <= start else end
                    continue
            accepted = guard(data, start, end, rs, re_) if guard is not None else (rs, re_)
            if accepted is not None:
                accepted_spans.append(accepted)
                # After the span actually replaced: a guard may have cut a greedy match short
                # (two IBANs in a row), and what follows it must still be scanned.
                pos = max(accepted[1], start + 1)
            else:
                pos = start + 1 if bounded or end <= start else end
        return accepted_spans

    def scan(self, data: bytes, mask: int = -1) -> list[Hit]:
        """Every guarded span of the enabled detectors in ``mask`` (bit ``1 << index``),
        unmerged."""
        hits: list[Hit] = []
        for index in self.candidates(data):
            if not mask >> index & 1:
                continue
            covered = merge(list(hits)) if DETECTORS[index].yields else None
            hits.extend((start, end, index) for start, end in self.find(data, index, covered))
        return hits


def merge(hits: list[Hit]) -> list[Hit]:
    """Union of overlapping spans, each labelled with its earliest-starting detector (at equal
    starts, the one first in :data:`DETECTORS`). Sorted, non-overlapping."""
    if len(hits) < 2:
        return hits
    hits.sort(key=lambda hit: (hit[0], hit[2]))
    merged: list[Hit] = [hits[0]]
    for start, end, index in hits[1:]:
        last_start, last_end, last_index = merged[-1]
        if start < last_end:
            if end > last_end:
                merged[-1] = (last_start, end, last_index)
        else:
            merged.append((start, end, index))
    return merged
