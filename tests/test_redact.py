"""Redaction: every rule and detector, accepted and refused; keys, hashing and encryption;
policies from Python and TOML; and the promises the emit path relies on (input untouched,
protected fields untouched, linear time on hostile input)."""

from __future__ import annotations

import copy
import enum
import json
import os
import random
import string
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealtrail import FormatError, IntegrityError, InvalidEvent
from sealtrail import _detectors as detectors_module
from sealtrail.event import prepare_event
from sealtrail.redact import (
    ANNOTATION_FIELD,
    DEFAULT_POLICY,
    DETECTOR_NAMES,
    MASK,
    PROTECTED_FIELDS,
    Action,
    DetectorRule,
    DetectorScope,
    FieldRule,
    KeyRing,
    KeyRule,
    Policy,
    Redactor,
    canonical_text,
    decrypt_value,
    detect,
    encrypt_value,
    hmac_lookup,
    key_words,
    parse_encrypted,
    parse_path,
)

EVENT_ID = "0190b6a2-8f1e-7c3a-9d4b-2f6e8a1c3b5d"
OTHER_ID = "0190b6a2-8f1e-7c3a-9d4b-2f6e8a1c3b5e"
SECRET = b"k" * 32
KEYRING = KeyRing(default=("k1", SECRET))

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)
GITHUB = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
GCP = "AIza" + "SyB" + "x9" * 16
SLACK = "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
STRIPE = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
    "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
    "-----END RSA PRIVATE KEY-----"
)
#: A PEM key inside a JSON document that is itself logged as text: the newlines are "\\n".
PEM_IN_JSON = (
    "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\\n-----END PRIVATE KEY-----"
)
RANDOM_TOKEN = "Xk9aB3dE7fG1hJ2kL5mN8pQ4rS6tU0vW"
#: Compiling a redactor takes milliseconds; property tests share one.
DEFAULT = Redactor()


def typical(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": EVENT_ID,
        "time": "2026-01-31T12:00:00.123456Z",
        "action": "user.email.update",
        "outcome": "success",
        "actor": {"id": "u_123", "type": "user"},
        "source": {
            "ip": "203.0.113.7",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0",
            "request_id": "req-8f2a",
        },
        "target": {"type": "user", "id": "u_123"},
        "changes": {"email": {"old": "a@example.com", "new": "b@example.com"}},
        "tenant": "acme",
        "subject": "u_123",
        "reason": "user request",
        "schema": 1,
    }
    event.update(overrides)
    return event


class MemorySubjectKeys:
    """A SubjectKeys for tests: one random key per subject, forgettable (shredding)."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, bytes]] = {}

    def key_for(self, subject: str) -> tuple[str, bytes]:
        if subject not in self.keys:
            self.keys[subject] = (f"s-{len(self.keys) + 1}", os.urandom(32))
        return self.keys[subject]


def found(text: str, name: str) -> list[str]:
    return [f.text for f in detect(text, [name])]


# --------------------------------------------------------------------------------------
# Detectors: positive and negative cases for each


DETECTOR_CASES: dict[str, tuple[list[tuple[str, str]], list[str]]] = {
    # name: ([(text, the span expected)], [texts with nothing to find])
    "email": (
        [
            ("mail alice@example.com now", "alice@example.com"),
            ("<first.last+tag@mail.example.co.uk>", "first.last+tag@mail.example.co.uk"),
        ],
        ["icon@2x.png", "user@localhost", "@alice said hi", "a@b", "https://alice@example.com/"],
    ),
    "phone": (
        [
            ("call +1 415 555 2671 today", "+1 415 555 2671"),
            ("tel:+14155552671", "+14155552671"),
            ("+44 (0)20 7946 0958", "+44 (0)20 7946 0958"),
            ("office (415) 555-2671", "(415) 555-2671"),
            ("415.555.2671", "415.555.2671"),
            ("1-415-555-2671", "1-415-555-2671"),
            ("london 020 7946 0958", "020 7946 0958"),
            ("mobile 07911 123456", "07911 123456"),
            ("paris 01 23 45 67 89", "01 23 45 67 89"),
        ],
        [
            "on 2026-01-31 at 12:30:45",
            "31.01.2026 and 01/31/2026 and 2026/01/31",
            "from 203.0.113.7 and 192.168.100.200",
            "version 1.2.3 build 2026.01.31",
            "order 4155552671",
            "id 550e8400-e29b-41d4-a716-446655440000",
            "+1234",
            "+12345678901234567890",
            "ticket 2026-555-2671-0001",
        ],
    ),
    "card": (
        [
            ("card 4111 1111 1111 1111 ok", "4111 1111 1111 1111"),
            ("4111-1111-1111-1111", "4111-1111-1111-1111"),
            ("pan=5555555555554444;", "5555555555554444"),
            ("amex 3782 822463 10005", "3782 822463 10005"),
            ("378282246310005", "378282246310005"),
            ("6011111111111117", "6011111111111117"),
            ("2221000000000009", "2221000000000009"),
        ],
        [
            "card 4111 1111 1111 1112",  # Luhn fails
            "ts 1234567812345670",  # Luhn-valid, but no issuer starts with 1
            "4111 1111-1111 1111",  # mixed separators
            "41 11 11 11 11 11 11 11",  # not printed card groups
            "4111111111111111111111",  # too long
            "411111111111",  # too short
            "ref 2026-4111111111111111",  # glued to another number
        ],
    ),
    "iban": (
        [
            ("iban DE89 3704 0044 0532 0130 00 EUR", "DE89 3704 0044 0532 0130 00"),
            ("GB82WEST12345698765432", "GB82WEST12345698765432"),
            ("FR14 2004 1010 0505 0001 3M02 606", "FR14 2004 1010 0505 0001 3M02 606"),
            ("to NL91ABNA0417164300.", "NL91ABNA0417164300"),
        ],
        [
            "DE89370400440532013001",  # checksum
            "DE88370400440532013000",  # check digits
            "ZZ89370400440532013000",  # no such country
            "DE8937040044053201300",  # DE IBANs have 22 characters
            "de89370400440532013000",  # IBANs are written in capitals
        ],
    ),
    "us_ssn": (
        [("ssn 123-45-6789.", "123-45-6789"), ("123 45 6789", "123 45 6789")],
        [
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "123-00-4567",
            "123-45-0000",
            "078-05-1120",
            "123-45 6789",
            "123-45-6789-12",
            "2026-01-31",
            "123456789",
        ],
    ),
    "jwt": (
        [(f"token {JWT} end", JWT)],
        ["eyJub3QiOiJqd3QifQ.eyJzdWIiOiIxIn0.sig", "eyJhbGciOi", "eyJ.eyJ.x"],
    ),
    "bearer": (
        [
            ("Authorization: Bearer abc123def456", "abc123def456"),
            ("bearer mF_9.B5f-4.1JqM", "mF_9.B5f-4.1JqM"),
            ("Bearer AbCdEfGhIjKlMnOpQr", "AbCdEfGhIjKlMnOpQr"),
        ],
        ["Bearer authentication is required", "the bearer of bad news", "Bearer abc"],
    ),
    "basic_auth": (
        [("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz")],
        ["basic information", "Basic SGVsbG8gV29ybGQ=", "basic configuration"],
    ),
    "aws_access_key_id": (
        [(f"key {AWS_ID} used", AWS_ID), ("ASIAY34FZKBOKMUTVV7A", "ASIAY34FZKBOKMUTVV7A")],
        ["AKIAIOSFODNN7EXAMPL", "XKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLEX", "AKIA"],
    ),
    "aws_secret_key": (
        [
            (f'aws_secret_access_key = "{AWS_SECRET}"', AWS_SECRET),
            (f"AWS_SECRET_ACCESS_KEY={AWS_SECRET}", AWS_SECRET),
        ],
        [AWS_SECRET, f"aws_secret_access_key = {AWS_SECRET}X", f"secret = {AWS_SECRET}"],
    ),
    "gcp_api_key": ([(f"key={GCP}&x", GCP)], ["AIzaShort", "AIza" + "x" * 36]),
    "github_token": (
        [
            (f"token {GITHUB}", GITHUB),
            ("gho_" + "a" * 36, "gho_" + "a" * 36),
            ("github_pat_" + "11ABCDEFG" + "x" * 20, "github_pat_" + "11ABCDEFG" + "x" * 20),
        ],
        ["ghp_short", "ghx_" + "a" * 36, "github_pat_short"],
    ),
    "slack_token": (
        [
            (f"slack {SLACK}", SLACK),
            (
                "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
                "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
            ),
        ],
        ["xoxq-123456789012-abc", "xoxb-short", "https://hooks.slack.com/"],
    ),
    "stripe_key": (
        [
            (f"stripe {STRIPE}", STRIPE),
            ("rk_test_51HabcdefGHIJ", "rk_test_51HabcdefGHIJ"),
            ("whsec_" + "a1B2" * 8, "whsec_" + "a1B2" * 8),
        ],
        ["pk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_prod_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_x"],
    ),
    "pem_private_key": (
        [
            (f"key:\n{PEM}\nthanks", PEM),
            (PEM_IN_JSON, PEM_IN_JSON),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA",  # truncated
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA",
            ),
        ],
        [
            "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\n"
            "-----END PUBLIC KEY-----",
            "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBa\n",
        ],
    ),
    "url_password": (
        [
            ("postgres://alice:s3cr3t@db.internal:5432/app", "s3cr3t"),
            ("redis://:pa55@cache:6379", "pa55"),
            ("amqp://bob:p@ss@mq/vhost", "p@ss"),
        ],
        [
            "https://example.com:8080/path?a=b@c",
            "https://alice@example.com/",
            "mailto:alice@example.com",
            "postgres://alice:[REDACTED:url_password]@db",
        ],
    ),
    "secret_assignment": (
        [
            ("login password=hunter2 ok", "hunter2"),
            ("api_key: abc123", "abc123"),
            ('{"client_secret": "xyz789"}', "xyz789"),
            ("GET /cb?state=1&token=abc&x=1", "abc"),
            ("DB_PASSWORD='pa55word'", "pa55word"),
        ],
        [
            "password reset requested",
            "token_count=5",
            "passwords: 3",
            "password: null",
            "password=[REDACTED]",
        ],
    ),
    "high_entropy": (
        [
            (f"key {RANDOM_TOKEN} end", RANDOM_TOKEN),
            (
                "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            ),
        ],
        [
            "id 550e8400-e29b-41d4-a716-446655440000",
            "id 550e8400e29b41d4a716446655440000",
            "UserAccountService2Implementation",
            "internationalization and localization_configuration",
            "/usr/local/lib/python3.11/site-packages/sealtrail",
            "Xk9aB3dE7fG1hJ2kL5m",  # 19 characters
            "hmac-sha256:k1:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "HttpRequestHandlerV2Factory",
        ],
    ),
}


def test_every_detector_has_cases() -> None:
    assert set(DETECTOR_CASES) == set(DETECTOR_NAMES)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [(name, text, span) for name, (pos, _neg) in DETECTOR_CASES.items() for text, span in pos],
)
def test_detector_finds(name: str, text: str, expected: str) -> None:
    assert found(text, name) == [expected]


@pytest.mark.parametrize(
    ("name", "text"),
    [(name, text) for name, (_pos, neg) in DETECTOR_CASES.items() for text in neg],
)
def test_detector_ignores(name: str, text: str) -> None:
    assert found(text, name) == []


def test_detectors_replace_only_the_span() -> None:
    redactor = Redactor()
    text = "user alice@example.com paid with 4111 1111 1111 1111 via postgres://bob:pw@db/x"
    result = redactor.redact_text(text)
    assert result.text == (
        "user [REDACTED:email] paid with [REDACTED:card] via "
        "postgres://bob:[REDACTED:url_password]@db/x"
    )
    assert result.detectors == {"card": 1, "email": 1, "url_password": 1}


def test_bearer_scheme_stays_and_jwt_label_wins() -> None:
    text = f"Authorization: Bearer {JWT}"
    assert Redactor().redact_text(text).text == "Authorization: Bearer [REDACTED:jwt]"


def test_overlapping_detectors_are_united() -> None:
    # secret_assignment covers the value after "Authorization:", bearer the token: together
    # nothing of the credential survives, whichever detector starts first.
    text = "Authorization: Bearer abc123def456ghi"
    out = Redactor().redact_text(text).text
    assert "abc123def456ghi" not in out
    merged = detectors_module.merge([(0, 10, 5), (5, 15, 2), (20, 25, 1), (22, 23, 0)])
    assert merged == [(0, 15, 5), (20, 25, 1)]


def test_match_never_spans_two_values() -> None:
    redactor = Redactor()
    out = redactor({"id": EVENT_ID, "data": {"a": "alice@", "b": "example.com"}})
    assert out["data"] == {"a": "alice@", "b": "example.com"}
    assert ANNOTATION_FIELD not in out


def test_non_ascii_text_keeps_its_characters() -> None:
    text = "Привет — alice@example.com ✓ 4111 1111 1111 1111 𝄞"
    out = Redactor().redact_text(text).text
    assert out == "Привет — [REDACTED:email] ✓ [REDACTED:card] 𝄞"
    spans = detect(text)
    assert [(f.detector, text[f.start : f.end]) for f in spans] == [
        ("email", "alice@example.com"),
        ("card", "4111 1111 1111 1111"),
    ]


def test_lone_surrogates_do_not_break_scanning() -> None:
    text = "\ud800 mail alice@example.com \udfff"
    assert Redactor().redact_text(text).text == "\ud800 mail [REDACTED:email] \udfff"


def test_nul_inside_a_value_is_a_barrier_not_a_crash() -> None:
    out = Redactor()({"reason": "alice@exam\x00ple.com and bob@example.com"})
    assert out["reason"] == "alice@exam\x00ple.com and [REDACTED:email]"


def test_card_number_as_integer() -> None:
    out = Redactor()({"data": {"pan": 4111111111111111, "n": 4111111111111112, "small": 7}})
    assert out["data"] == {"pan": "[REDACTED:card]", "n": 4111111111111112, "small": 7}


def test_detect_rejects_unknown_detector() -> None:
    with pytest.raises(ValueError, match="unknown detector"):
        detect("x", ["nope"])


def test_public_matcher_fallback_gives_the_same_spans() -> None:
    import re2

    pattern = detectors_module.BY_NAME["email"].pattern
    fast = detectors_module.compile_matcher(pattern)
    slow = detectors_module._public_matcher(re2.compile(pattern))
    data = b"x alice@example.com y bob@example.org"
    for pos in (0, 5, 22, len(data)):
        assert fast(data, pos) == slow(data, pos)


@given(st.integers(min_value=10**15, max_value=10**16 - 1))
def test_card_detection_is_exactly_luhn_and_issuer(number: int) -> None:
    digits = str(number)
    issuer = digits[0] in "3456" or 2221 <= int(digits[:4]) <= 2720
    expected = issuer and detectors_module.luhn_valid(digits)
    grouped = " ".join(digits[i : i + 4] for i in range(0, 16, 4))
    assert bool(found(f"pay {grouped} now", "card")) == expected
    assert bool(found(f"pay {digits} now", "card")) == expected


def _iban(country: str, bban: str) -> str:
    rearranged = bban + country + "00"
    number = int("".join(str(int(c, 36)) for c in rearranged))
    return f"{country}{98 - number % 97:02d}{bban}"


@given(st.text(alphabet=string.digits, min_size=18, max_size=18), st.integers(0, 17))
def test_iban_detected_and_any_single_digit_change_refused(bban: str, where: int) -> None:
    iban = _iban("DE", bban)
    assert found(f"to {iban} now", "iban") == [iban]
    changed = bban[:where] + str((int(bban[where]) + 1) % 10) + bban[where + 1 :]
    forged = iban[:4] + changed
    assert found(f"to {forged} now", "iban") == []


@given(st.text(max_size=300))
def test_redacting_text_twice_changes_nothing(text: str) -> None:
    redactor = DEFAULT
    once = redactor.redact_text(text).text
    assert redactor.redact_text(once).text == once
    for finding in detect(text):
        assert text[finding.start : finding.end] == finding.text


@given(
    st.lists(
        st.sampled_from(
            [
                "alice@example.com",
                "4111 1111 1111 1111",
                RANDOM_TOKEN,
                AWS_ID,
                "+1 415 555 2671",
                "123-45-6789",
                "DE89 3704 0044 0532 0130 00",
                GITHUB,
                STRIPE,
            ]
        ),
        min_size=1,
        max_size=5,
    ),
    st.lists(st.sampled_from(["the", "user", "asked", "to", "42", "re-open", "ticket"])),
)
def test_secrets_in_prose_never_survive(secrets: list[str], words: list[str]) -> None:
    rng = random.Random(len(secrets) * 31 + len(words))
    pieces = words + secrets
    rng.shuffle(pieces)
    text = " ".join(pieces)
    out = DEFAULT.redact_text(text).text
    for secret in secrets:
        assert secret not in out


# --------------------------------------------------------------------------------------
# Linear time on hostile input


HOSTILE = {
    "a-run": "a" * 100_000 + "!",
    "digit-run": "1" * 100_000,
    "digit-groups": "4111 " * 20_000,
    "single-digits": "1 " * 50_000,
    "plus-digits": "+1" * 50_000,
    "at-signs": "a@" * 50_000,
    "dotted-domain": "x@" + "a." * 50_000,
    "pem-headers": "-----BEGIN PRIVATE KEY-----" * 3_000,
    "jwt-prefix": "eyJ" + "a" * 100_000 + ".",
    "bearers": "Bearer " * 14_000,
    "assignments": "password=" * 11_000,
    "schemes": "a://" * 25_000 + "@",
    "ibans": "DE89 " * 20_000,
    "nested-parens": "(" * 50_000 + "415) 555-2671" + ")" * 50_000,
    "base64": "QUJD" * 25_000,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_scanned_in_linear_time(name: str) -> None:
    redactor = Redactor()
    text = HOSTILE[name]
    start = time.perf_counter()
    result = redactor.redact_text(text)
    elapsed = time.perf_counter() - start
    # RE2 scans 100 kB in milliseconds; a backtracking engine on these inputs takes minutes.
    # The bound is loose for loaded CI machines.
    assert elapsed < 2.0, f"{name}: {elapsed:.2f}s"
    assert isinstance(result.text, str)


def test_hostile_event_is_redacted_in_linear_time() -> None:
    event = typical(reason=HOSTILE["a-run"], data={k: v[:20_000] for k, v in HOSTILE.items()})
    start = time.perf_counter()
    Redactor()(event)
    assert time.perf_counter() - start < 3.0


# --------------------------------------------------------------------------------------
# Key-name rules


def test_default_sensitive_keys_anywhere() -> None:
    event = typical(
        data={
            "password": "hunter2",
            "nested": {"userPassword": "x", "X-Api-Key": "y", "list": [{"Set-Cookie": "z"}]},
            "ACCESS_TOKEN": "t",
            "csrftoken": "c",
            "db_password": "d",
            "cvv": 123,
            "card_number": "4111111111111111",
        }
    )
    out = Redactor()(event)
    data = out["data"]
    assert data["password"] == MASK
    assert data["nested"]["userPassword"] == MASK
    assert data["nested"]["X-Api-Key"] == MASK
    assert data["nested"]["list"][0]["Set-Cookie"] == MASK
    assert data["ACCESS_TOKEN"] == MASK
    assert data["csrftoken"] == MASK
    assert data["db_password"] == MASK
    assert data["cvv"] == MASK
    assert data["card_number"] == MASK
    assert out["redacted"]["fields"]["data.nested.list[0].Set-Cookie"] == "mask"


def test_key_names_that_only_look_sensitive() -> None:
    data = {
        "passwords_count": 3,
        "tokens_used": 10,
        "spin": "left",
        "classname": "x",
        "author": "a",
    }
    assert Redactor()(typical(data=data))["data"] == data


def test_key_words() -> None:
    assert key_words("APIKey2") == ("api", "key", "2")
    assert key_words("userPassword") == ("user", "password")
    assert key_words("X-Api-Key") == ("x", "api", "key")
    assert key_words("set_cookie") == ("set", "cookie")
    assert key_words("") == ()


def test_most_specific_key_rule_wins() -> None:
    policy = DEFAULT_POLICY.extend(keys=[KeyRule("token_count", "allow")])
    out = Redactor(policy)(typical(data={"token_count": 5, "token": "t", "refresh_token": "r"}))
    assert out["data"] == {"token_count": 5, "token": MASK, "refresh_token": MASK}


def test_exact_key_rule() -> None:
    policy = Policy(keys=(KeyRule("pin", "drop", exact=True),))
    out = Redactor(policy)({"data": {"pin": 1234, "PIN": 1, "pin_hint": "x"}})
    assert out["data"] == {"pin_hint": "x"}


def test_key_rule_drop_and_keep_last() -> None:
    policy = Policy(keys=(KeyRule("session", "drop"), KeyRule("card_number", "mask", keep_last=4)))
    out = Redactor(policy)({"data": {"session": "s", "card_number": "4111 1111 1111 1234"}})
    assert out["data"] == {"card_number": "****1234"}
    assert out["redacted"]["fields"] == {"data.session": "drop", "data.card_number": "mask"}


def test_short_values_are_not_revealed_by_keep_last() -> None:
    policy = Policy(keys=(KeyRule("pin", "mask", keep_last=4),))
    assert Redactor(policy)({"pin": "1234"})["pin"] == MASK
    assert Redactor(policy)({"pin": {"a": 1}})["pin"] == MASK


# --------------------------------------------------------------------------------------
# Field-path rules


def test_field_rules_and_wildcards() -> None:
    policy = Policy(
        fields=(
            FieldRule("data.card", "mask", keep_last=4),
            FieldRule("data.*.answer", "drop"),
            FieldRule("data.users.email", "hmac"),
            FieldRule('data["odd.key"]', "mask"),
        )
    )
    redactor = Redactor(policy, keyring=KEYRING)
    out = redactor(
        typical(
            data={
                "card": 4111111111111111,
                "q1": {"answer": "blue", "question": "colour?"},
                "q2": {"answer": "cat"},
                "users": [{"email": "A@x.com"}, {"email": " a@x.com"}],
                "odd.key": "v",
            }
        )
    )
    data = out["data"]
    assert data["card"] == "****1111"
    assert data["q1"] == {"question": "colour?"}
    assert data["q2"] == {}
    assert data["users"][0]["email"].startswith("hmac-sha256:k1:")
    assert data["users"][0]["email"] != data["users"][1]["email"]  # case is kept
    assert data["odd.key"] == MASK
    assert out["redacted"]["fields"] == {
        "data.card": "mask",
        "data.q1.answer": "drop",
        "data.q2.answer": "drop",
        "data.users[0].email": "hmac",
        "data.users[1].email": "hmac",
        'data["odd.key"]': "mask",
    }


def test_path_rule_beats_key_rule_and_allow_keeps_clear() -> None:
    policy = DEFAULT_POLICY.extend(
        fields=[FieldRule("data.password_policy", "allow"), FieldRule("data.token", "drop")]
    )
    event = typical(data={"password_policy": {"min": 12, "note": "mail a@x.com"}, "token": "t"})
    out = Redactor(policy)(event)
    assert out["data"] == {"password_policy": {"min": 12, "note": "mail a@x.com"}}


def test_more_specific_path_rule_wins() -> None:
    policy = Policy(fields=(FieldRule("data.*", "mask"), FieldRule("data.keep", "allow")))
    out = Redactor(policy)({"data": {"keep": 1, "other": 2}})
    assert out["data"] == {"keep": 1, "other": MASK}


def test_changes_rule_covers_old_and_new_separately() -> None:
    event = typical(
        changes={
            "password": {"old": "p1", "new": "p2"},
            "email": {"old": "a@x.com", "new": "b@x.com"},
            "role": {"old": "user", "new": "admin"},
        }
    )
    policy = DEFAULT_POLICY.extend(
        fields=[FieldRule("changes.email", "hmac"), FieldRule("changes.email.old", "drop")]
    )
    out = Redactor(policy, keyring=KEYRING)(event)
    changes = out["changes"]
    assert changes["password"] == {"old": MASK, "new": MASK}
    assert set(changes["email"]) == {"new"}
    assert changes["email"]["new"].startswith("hmac-sha256:")
    assert changes["role"] == {"old": "user", "new": "admin"}
    assert out["redacted"]["fields"] == {
        "changes.password.old": "mask",
        "changes.password.new": "mask",
        "changes.email.old": "drop",
        "changes.email.new": "hmac",
    }


def test_changes_drop_of_both_sides_removes_the_entry_and_says_so() -> None:
    """An empty entry is not a valid change (the envelope refuses it); the annotation still
    tells that the field changed and what was dropped."""
    policy = Policy(keys=(KeyRule("password", "drop"),))
    event = {"action": "user.update", "changes": {"password": {"old": "a", "new": "b"}}}
    out = Redactor(policy)(event)
    assert out["changes"] == {}
    assert out["redacted"]["fields"] == {
        "changes.password.old": "drop",
        "changes.password.new": "drop",
    }
    prepare_event(out)
    out = Redactor(policy)({**event, "changes": {"password": {"new": "b"}, "n": {"new": 1}}})
    assert out["changes"] == {"n": {"new": 1}}


def test_hmac_of_old_and_new_shows_whether_they_differ() -> None:
    policy = Policy(fields=(FieldRule("changes.ssn", "hmac"),))
    redactor = Redactor(policy, keyring=KEYRING)
    same = redactor({"changes": {"ssn": {"old": "123", "new": 123}}})["changes"]["ssn"]
    assert same["old"] == same["new"]


def test_changes_with_other_shapes() -> None:
    out = Redactor()({"changes": {"password": "whole", "token": {"x": 1}, "n": [1, "a@x.com"]}})
    assert out["changes"] == {"password": MASK, "token": MASK, "n": [1, "[REDACTED:email]"]}


def test_protected_fields_are_never_redacted() -> None:
    event = typical(
        action="user.password.update",
        ledger={
            "seq": 5,
            "hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        },
    )
    policy = Policy(
        keys=(KeyRule("id", "drop"), KeyRule("time", "drop"), KeyRule("hash", "drop")),
        detectors=tuple(DetectorRule(name) for name in DETECTOR_NAMES),
    )
    out = Redactor(policy)(event)
    for name in PROTECTED_FIELDS & set(event):
        assert out[name] == event[name]
    assert out["actor"] == {"type": "user"}  # the key rule still applies below the top


@pytest.mark.parametrize("path", sorted(PROTECTED_FIELDS | {ANNOTATION_FIELD}))
def test_field_rules_cannot_target_protected_fields(path: str) -> None:
    with pytest.raises(FormatError, match="never redacted"):
        FieldRule(f"{path}.x" if path == "ledger" else path, "drop")


# --------------------------------------------------------------------------------------
# Detector scopes and the default policy


def test_default_policy_keeps_identities_and_routing_fields() -> None:
    event = typical(
        actor={"id": "alice@example.com", "type": "user"},
        target={"type": "user", "id": "bob@example.com"},
        subject="carol@example.com",
        tenant="acme@example.com",
        source={"ip": "203.0.113.7", "request_id": RANDOM_TOKEN, "trace_id": RANDOM_TOKEN},
    )
    out = Redactor()(event)
    assert out["actor"] == event["actor"]
    assert out["target"] == event["target"]
    assert out["subject"] == event["subject"]
    assert out["tenant"] == event["tenant"]
    assert out["source"] == event["source"]
    assert out["changes"]["email"] == {"old": "[REDACTED:email]", "new": "[REDACTED:email]"}


def test_identity_fields_are_still_scanned_for_secrets() -> None:
    out = Redactor()(typical(actor={"id": GITHUB, "type": "service"}))
    assert out["actor"]["id"] == "[REDACTED:github_token]"


def test_scopes_off_and_only() -> None:
    policy = DEFAULT_POLICY.extend(
        scopes=[
            DetectorScope("data.html", only=()),
            DetectorScope("data.notes", only=["email"]),
            DetectorScope("data.log", off=["email"]),
        ]
    )
    text = "alice@example.com 4111 1111 1111 1111"
    out = Redactor(policy)(typical(data={"html": text, "notes": text, "log": {"line": text}}))
    assert out["data"]["html"] == text
    assert out["data"]["notes"] == "[REDACTED:email] 4111 1111 1111 1111"
    assert out["data"]["log"]["line"] == "alice@example.com [REDACTED:card]"


def test_detector_actions_hmac_and_keep_last() -> None:
    policy = DEFAULT_POLICY.extend(
        detectors=[DetectorRule("card", "mask", keep_last=4), DetectorRule("email", "hmac")]
    )
    redactor = Redactor(policy, keyring=KEYRING)
    out = redactor(typical(reason="Alice@Example.com paid 4111 1111 1111 1111"))
    expected = hmac_lookup("alice@example.com", "acme", KEYRING, detector="email")
    assert out["reason"] == f"{expected} paid ****1111"


def test_detector_off() -> None:
    policy = DEFAULT_POLICY.extend(detectors=[DetectorRule("email", "off")])
    out = Redactor(policy)(typical())
    assert out["changes"] == typical()["changes"]
    assert ANNOTATION_FIELD not in out


def test_empty_policy_redacts_nothing() -> None:
    event = typical(data={"password": "x"})
    out = Redactor(Policy())(event)
    assert out == event
    assert out is not event


# --------------------------------------------------------------------------------------
# The annotation


def test_annotation_format() -> None:
    out = Redactor()(typical(data={"password": "x"}, reason="from alice@example.com"))
    assert out[ANNOTATION_FIELD] == {
        "fields": {"data.password": "mask"},
        "detectors": {"email": 3},
    }


def test_no_annotation_when_nothing_was_redacted() -> None:
    event = typical(changes={"role": {"old": "a", "new": "b"}})
    assert ANNOTATION_FIELD not in Redactor()(event)


def test_annotation_of_an_earlier_redactor_is_merged() -> None:
    first = Redactor(Policy(keys=(KeyRule("password", "drop"),)))
    once = first(typical(data={"password": "x"}))
    twice = Redactor()(once)
    assert twice[ANNOTATION_FIELD] == {
        "fields": {"data.password": "drop"},
        "detectors": {"email": 2},
    }


@pytest.mark.parametrize(
    "forged",
    [
        "nothing here",
        {"fields": {"data.x": "shred"}},
        {"detectors": {"email": -1}},
        {"detectors": {"unknown": 1}},
        {"other": 1},
    ],
)
def test_forged_annotation_is_refused(forged: object) -> None:
    with pytest.raises(InvalidEvent) as caught:
        Redactor()(typical(**{ANNOTATION_FIELD: forged}))
    assert caught.value.field == ANNOTATION_FIELD


def test_redaction_is_idempotent() -> None:
    policy = DEFAULT_POLICY.extend(
        fields=[FieldRule("data.card", "hmac"), FieldRule("changes.email", "encrypt")]
    )
    redactor = Redactor(policy, keyring=KEYRING, subject_keys=MemorySubjectKeys())
    once = redactor(typical(data={"card": 4111111111111111, "t": RANDOM_TOKEN, "password": 1}))
    assert redactor(once) == once


# --------------------------------------------------------------------------------------
# Input untouched, output independent


EVENTS = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["password", "email", "note", "card", "x", "changes", "old", "new"])
            | st.text(max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=100)  # generating nested documents costs more than redacting them
@given(st.dictionaries(st.text(max_size=10), EVENTS, max_size=6), EVENTS)
def test_input_never_mutated_and_output_independent(base: dict[str, Any], data: Any) -> None:
    event = {**base, "id": EVENT_ID, "data": data, "changes": {"password": {"old": data}}}
    event.pop(ANNOTATION_FIELD, None)
    before = copy.deepcopy(event)
    out = DEFAULT(event)
    assert event == before
    json.dumps(out)  # plain JSON types only
    assert out["id"] == EVENT_ID

    def containers(value: Any) -> list[int]:
        found: list[int] = []
        if isinstance(value, dict):
            found.append(id(value))
            for item in value.values():
                found.extend(containers(item))
        elif isinstance(value, list):
            found.append(id(value))
            for item in value:
                found.extend(containers(item))
        return found

    assert not set(containers(out)) & set(containers(event))


def test_other_input_types() -> None:
    class Colour(enum.StrEnum):
        RED = "red"

    event = MappingProxyType(
        {
            "id": EVENT_ID,
            "data": OrderedDict(
                colour=Colour.RED,
                items=("alice@example.com", 1),
                when=datetime(2026, 1, 1, tzinfo=UTC),
                number=enum.IntEnum("N", "A")(1),
            ),
        }
    )
    out = Redactor()(event)
    assert out["data"]["colour"] == "red" and type(out["data"]["colour"]) is str
    assert out["data"]["items"] == ["[REDACTED:email]", 1]
    assert out["data"]["when"] == datetime(2026, 1, 1, tzinfo=UTC)
    assert out["data"]["number"] == 1


def test_not_an_event() -> None:
    with pytest.raises(InvalidEvent, match="JSON object"):
        Redactor()(["not", "a", "dict"])  # type: ignore[arg-type]


def test_depth_limit() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(300):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(InvalidEvent, match="nested deeper"):
        Redactor()({"data": deep})


# --------------------------------------------------------------------------------------
# HMAC


def test_non_string_values_are_normalised_before_hashing() -> None:
    assert canonical_text(4111111111111111) == canonical_text("4111111111111111")
    assert canonical_text("  4111111111111111\n") == "4111111111111111"
    assert canonical_text("Cafe\u0301") == canonical_text("Caf\u00e9")  # NFC
    assert canonical_text(True) == "true"
    assert canonical_text(None) == "null"
    assert canonical_text({"b": 1, "a": [1, "x"]}) == canonical_text({"a": [1, "x"], "b": 1})
    assert canonical_text({"b": 1, "a": 2}) == '{"a":2,"b":1}'
    assert canonical_text(uuid.UUID(EVENT_ID)) == EVENT_ID


def test_hmac_is_deterministic_and_normalised() -> None:
    policy = Policy(fields=(FieldRule("data.card", "hmac"),))
    redactor = Redactor(policy, keyring=KEYRING)
    values = [4111111111111111, "4111111111111111", " 4111111111111111 "]
    hashes = {redactor(typical(data={"card": v}))["data"]["card"] for v in values}
    assert len(hashes) == 1
    (stored,) = hashes
    assert stored == hmac_lookup(4111111111111111, "acme", KEYRING)
    assert stored.startswith("hmac-sha256:k1:") and len(stored) == len("hmac-sha256:k1:") + 64


def test_hmac_separates_tenants() -> None:
    policy = Policy(fields=(FieldRule("data.card", "hmac"),))
    own = KeyRing(default=("k1", SECRET), tenants={"globex": ("g7", b"g" * 32)})
    redactor = Redactor(policy, keyring=own)
    hashes = {
        tenant: redactor(typical(tenant=tenant, data={"card": "4111"}))["data"]["card"]
        for tenant in ("acme", "initech", "globex")
    }
    assert len(set(hashes.values())) == 3
    assert hashes["globex"].startswith("hmac-sha256:g7:")
    for tenant, value in hashes.items():
        assert hmac_lookup("4111", tenant, own) == value
    no_tenant = redactor({"data": {"card": "4111"}})["data"]["card"]
    assert no_tenant == hmac_lookup("4111", None, own) not in hashes.values()


def test_hmac_lookup_for_a_card_found_in_free_text() -> None:
    policy = DEFAULT_POLICY.extend(detectors=[DetectorRule("card", "hmac")])
    out = Redactor(policy, keyring=KEYRING)(typical(reason="paid 4111-1111-1111-1111"))
    assert out["reason"] == "paid " + hmac_lookup(
        "4111111111111111", "acme", KEYRING, detector="card"
    )


def test_keyring_validation() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        KeyRing(default=("k1", b"short"))
    with pytest.raises(ValueError, match="key id"):
        KeyRing(default=("k:1", SECRET))
    with pytest.raises(ValueError, match="needs a default key"):
        KeyRing()
    ring = KeyRing(tenants={"acme": ("a1", SECRET)})
    with pytest.raises(LookupError):
        ring.key_for("other")
    policy = Policy(fields=(FieldRule("data.x", "hmac"),))
    with pytest.raises(InvalidEvent) as caught:
        Redactor(policy, keyring=ring)({"tenant": "other", "data": {"x": 1}})
    assert caught.value.field == "tenant"


def test_redactor_needs_keys_for_its_policy() -> None:
    with pytest.raises(ValueError, match="keyring"):
        Redactor(Policy(fields=(FieldRule("data.x", "hmac"),)))
    with pytest.raises(ValueError, match="keyring"):
        Redactor(DEFAULT_POLICY.extend(detectors=[DetectorRule("email", "hmac")]))
    with pytest.raises(ValueError, match="subject_keys"):
        Redactor(Policy(keys=(KeyRule("email", "encrypt"),)))
    with pytest.raises(TypeError):
        Redactor("default")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Encryption for the data subject


def encrypting_redactor() -> tuple[Redactor, MemorySubjectKeys]:
    keys = MemorySubjectKeys()
    policy = DEFAULT_POLICY.extend(
        fields=[FieldRule("changes.email", "encrypt"), FieldRule("data.profile", "encrypt")]
    )
    return Redactor(policy, subject_keys=keys), keys


def test_encrypt_decrypt_round_trip() -> None:
    redactor, keys = encrypting_redactor()
    profile = {"name": "Alice", "born": 1990, "tags": ["a"], "vip": True}
    out = redactor(typical(data={"profile": profile}))
    key_id, key = keys.key_for("u_123")
    token = out["changes"]["email"]["old"]
    assert parse_encrypted(token).key_id == key_id
    assert decrypt_value(token, key, event_id=EVENT_ID, path="changes.email.old") == "a@example.com"
    assert (
        decrypt_value(out["data"]["profile"], key, event_id=EVENT_ID, path="data.profile")
        == profile
    )
    assert out[ANNOTATION_FIELD]["fields"] == {
        "changes.email.old": "encrypt",
        "changes.email.new": "encrypt",
        "data.profile": "encrypt",
    }


def test_ciphertext_is_bound_to_event_and_field() -> None:
    redactor, keys = encrypting_redactor()
    out = redactor(typical())
    _key_id, key = keys.key_for("u_123")
    token = out["changes"]["email"]["new"]
    with pytest.raises(IntegrityError):  # moved to another field
        decrypt_value(token, key, event_id=EVENT_ID, path="changes.email.old")
    with pytest.raises(IntegrityError):  # moved to another event
        decrypt_value(token, key, event_id=OTHER_ID, path="changes.email.new")
    with pytest.raises(IntegrityError):  # another subject's key
        decrypt_value(token, os.urandom(32), event_id=EVENT_ID, path="changes.email.new")
    parts = token.split(":")
    parts[2] = "s-999"  # claims another key id: the key id is bound too
    with pytest.raises(IntegrityError):
        decrypt_value(":".join(parts), key, event_id=EVENT_ID, path="changes.email.new")


def test_each_encryption_uses_a_fresh_nonce() -> None:
    token_a = encrypt_value("x", "s1", SECRET, event_id=EVENT_ID, path="data.x")
    token_b = encrypt_value("x", "s1", SECRET, event_id=EVENT_ID, path="data.x")
    assert token_a != token_b


@pytest.mark.parametrize(
    "token",
    ["plain", "enc:aes256gcm:k1:abc", "enc:aes256gcm:k1:!!!:???", "enc:aes256gcm:k:1:AAAA:BBBB"],
)
def test_malformed_ciphertext(token: str) -> None:
    with pytest.raises(FormatError):
        decrypt_value(token, SECRET, event_id=EVENT_ID, path="data.x")


def test_encrypt_needs_a_subject_and_its_key() -> None:
    redactor, _keys = encrypting_redactor()
    event = typical()
    del event["subject"]
    with pytest.raises(InvalidEvent) as caught:
        redactor(event)
    assert caught.value.field == "subject"
    assert "changes.email.old" in caught.value.reason

    class Shredded:
        def key_for(self, subject: str) -> tuple[str, bytes]:
            raise LookupError(f"key of {subject} was destroyed")

    policy = Policy(fields=(FieldRule("data.x", "encrypt"),))
    with pytest.raises(InvalidEvent, match="destroyed") as caught:
        Redactor(policy, subject_keys=Shredded())(typical(data={"x": 1}))
    assert caught.value.field == "data.x"
    no_id = typical(data={"x": 1})
    del no_id["id"]
    with pytest.raises(InvalidEvent) as caught:
        Redactor(policy, subject_keys=MemorySubjectKeys())(no_id)
    assert caught.value.field == "id"


def test_bad_subject_key_is_refused() -> None:
    class ShortKeys:
        def key_for(self, subject: str) -> tuple[str, bytes]:
            return "s1", b"x" * 16

    policy = Policy(fields=(FieldRule("data.x", "encrypt"),))
    with pytest.raises(InvalidEvent, match="32 bytes"):
        Redactor(policy, subject_keys=ShortKeys())(typical(data={"x": 1}))


# --------------------------------------------------------------------------------------
# Policies from Python and TOML


GOOD_TOML = """
extends = "default"

[keys]
password = "drop"
card_number = { action = "mask", keep_last = 4 }
token_count = "allow"

[fields]
"data.card" = "hmac"
"changes.email" = "encrypt"

[fields."data.notes"]
action = "mask"

[detectors]
email = "hmac"
high_entropy = "off"
card = { action = "mask", keep_last = 4 }

[scopes]
"data.html" = "off"
"data.log" = { off = ["email"] }
"data.summary" = { only = ["card"] }
"""


def test_policy_from_toml_text() -> None:
    policy = Policy.from_toml(GOOD_TOML)
    redactor = Redactor(policy, keyring=KEYRING, subject_keys=MemorySubjectKeys())
    out = redactor(
        typical(
            data={
                "password": "x",
                "card_number": "4111111111111111",
                "token_count": 3,
                "card": 1,
                "notes": "n",
                "html": "alice@example.com",
                "summary": "alice@example.com 4111 1111 1111 1111",
                "t": RANDOM_TOKEN,
            }
        )
    )
    data = out["data"]
    assert "password" not in data
    assert data["card_number"] == "****1111"
    assert data["token_count"] == 3
    assert data["card"].startswith("hmac-sha256:")
    assert data["notes"] == MASK
    assert data["html"] == "alice@example.com"
    assert data["summary"] == "alice@example.com ****1111"
    assert data["t"] == RANDOM_TOKEN
    assert out["changes"]["email"]["old"].startswith("enc:aes256gcm:")
    assert policy.uses_hmac and policy.uses_encrypt


def test_policy_from_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "redaction.toml"
    path.write_text('extends = "none"\n[keys]\nsecret = "drop"\n', encoding="utf-8")
    for source in (path, str(path)):
        policy = Policy.from_toml(source)
        assert [rule.name for rule in policy.keys] == ["secret"]
        assert policy.detectors == ()
    with pytest.raises(FormatError, match="cannot read policy file"):
        Policy.from_toml(tmp_path / "missing.toml")


def test_toml_overrides_replace_defaults() -> None:
    policy = Policy.from_toml('[keys]\npassword = "drop"\n[detectors]\nemail = "off"\n')
    password_rules = [r for r in policy.keys if r.name == "password"]
    assert [r.action for r in password_rules] == [Action.DROP]
    assert DetectorRule("email", "off") in policy.detectors
    assert len(policy.keys) == len(DEFAULT_POLICY.keys)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[keys\npassword = 'drop'", r"not valid TOML.*line 1"),
        ("[keys]\npassword = 'hide'\n", r"line 2: \[keys\] \"password\": unknown action \"hide\""),
        ("[fields]\n\n'data.card' = 'shred'\n", r"line 3: \[fields\] \"data.card\""),
        ("[fields]\ndata.card = 'mask'\n", r"line 2: .*quote dotted paths"),
        ("[fields]\n'id' = 'drop'\n", r"line 2: .*never redacted"),
        ("[fields]\n'data..x' = 'drop'\n", r"empty segment"),
        ("[detectors]\nemails = 'mask'\n", r"line 2: .*unknown detector"),
        ("[detectors]\nemail = 'encrypt'\n", r'unknown action "encrypt"'),
        ("[keys]\npassword = { action = 'drop', keep_last = 4 }\n", r"keep_last only applies"),
        ("[keys]\npassword = { action = 'mask', keep_last = -1 }\n", r"non-negative"),
        ("[keys]\npassword = { action = 'mask', keep = 4 }\n", r"unknown option 'keep'"),
        ("[keys]\n'--' = 'mask'\n", r"at least one letter"),
        ("[scopes]\n'data.x' = { off = ['nope'] }\n", r"line 2: .*unknown detector"),
        ("[scopes]\n'data.x' = 'on'\n", r"line 2: .*expected \"off\""),
        ("[scopes]\n'data.x' = { off = 'email' }\n", r"must be a list"),
        ("keys = 1\n", r"must be a table"),
        ("extends = 'mine'\n", r"extends"),
        ("version = 2\n", r"unsupported policy version"),
        ("[detector]\nemail = 'off'\n", r"unknown setting"),
    ],
)
def test_bad_toml_policies(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        Policy.from_toml(text)


def test_python_policy_validation() -> None:
    with pytest.raises(FormatError, match="unknown action"):
        FieldRule("data.x", "erase")
    with pytest.raises(FormatError, match="unknown detector"):
        DetectorRule("cards")
    with pytest.raises(FormatError, match="unknown detector"):
        DetectorScope("data.x", off=["cards"])
    with pytest.raises(FormatError, match="expected FieldRule"):
        Policy(fields=("data.x",))  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="too much"):
        KeyRule("card", "mask", keep_last=20)
    assert parse_path('data["a.b"].c') == ("data", "a.b", "c")
    assert parse_path("data.*.x") == ("data", "*", "x")
    for bad in ("", ".x", "x.", 'data["a"]x', "data[x]", "data. x"):
        with pytest.raises(FormatError):
            parse_path(bad)


def test_extend_replaces_rules_for_the_same_target() -> None:
    policy = Policy(fields=(FieldRule("data.x", "mask"),)).extend(
        fields=[FieldRule("data.x", "drop"), FieldRule("data.y", "mask")]
    )
    assert [(r.path, r.action) for r in policy.fields] == [
        ("data.x", Action.DROP),
        ("data.y", Action.MASK),
    ]


def test_policies_are_immutable_values() -> None:
    assert Policy.from_toml("") == DEFAULT_POLICY
    with pytest.raises(AttributeError):
        DEFAULT_POLICY.keys = ()  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# The emit-path shape


def test_redactor_is_a_plain_callable_in_a_chain() -> None:
    def enrich(event: dict[str, Any]) -> dict[str, Any]:
        return {**event, "data": {"password": "p", "note": "mail alice@example.com"}}

    chain = [enrich, Redactor()]
    event: dict[str, Any] = typical()
    for step in chain:
        event = step(event)
    assert event["data"] == {"password": MASK, "note": "mail [REDACTED:email]"}


def test_redactor_detect_uses_the_policy() -> None:
    redactor = Redactor(DEFAULT_POLICY.extend(detectors=[DetectorRule("email", "off")]))
    assert [f.detector for f in redactor.detect("alice@example.com 123-45-6789")] == ["us_ssn"]
    assert redactor.policy.detectors[-1] == DetectorRule("email", "off")


def test_catch_all_detector_yields_only_to_enabled_detectors() -> None:
    token = "ghp_" + RANDOM_TOKEN + "Ab12"
    assert [f.detector for f in detect(token)] == ["github_token"]
    assert [f.detector for f in detect(token, ["high_entropy"])] == ["high_entropy"]
    redactor = Redactor(DEFAULT_POLICY.extend(detectors=[DetectorRule("github_token", "off")]))
    assert redactor.redact_text(token).text == "[REDACTED:high_entropy]"
