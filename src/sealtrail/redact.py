"""Redaction: keep secrets and personal data out of storage (DESIGN.md, invariant I5).

An audit trail is kept for years and read by many people, so what it must not hold has to
be removed before the event is hashed: once a value is a leaf of the Merkle tree it can never
be taken out again without breaking verification. Redaction is therefore one plain callable
in the emit path, ``event -> new event``, placed after validation and before canonical bytes::

    redactor = Redactor(DEFAULT_POLICY, keyring=KeyRing(default=("k1", secret)))
    stored = redactor(event)        # a new dict; ``event`` is not modified

What a :class:`Policy` can do with a value, chosen by field path or by key name:

* ``drop``: remove it.
* ``mask``: keep only its presence (``"[REDACTED]"``), or a short suffix (``"****1234"``).
* ``hmac``: replace it with ``hmac-sha256:<key id>:<hex>`` under the tenant's secret key, so
  equal values stay comparable and an auditor can ask "did this card number appear?"
  (:func:`hmac_lookup`) without anyone being able to read it back.
* ``encrypt``: AES-256-GCM under the data subject's own key (``enc:aes256gcm:...``), bound to
  the event id and field path. Destroying that key later erases the value everywhere while
  the tree still verifies (crypto-shredding).
* ``allow``: keep it in the clear, the explicit "unless policy allows it" of I5.

String values that no rule covers are scanned by value detectors (e-mail, phone, card,
IBAN, SSN, tokens and keys of many services, PEM keys, passwords in URLs, high-entropy
strings; see :data:`DETECTOR_NAMES`), which replace only the matched span. All patterns run
on RE2, in time linear in the input, so a hostile value cannot stall the emit path.

``id``, ``time``, ``action``, ``outcome``, ``schema`` and ``ledger`` are never redacted: the
trail cannot be deduplicated, ordered or queried without them. The redactor records what it
did in the event itself, so an auditor reading it years later knows the record was redacted
and where::

    "redacted": {"fields": {"changes.password.old": "mask", "data.card": "hmac"},
                 "detectors": {"email": 2}}

Both members are omitted when empty, and ``redacted`` is absent when nothing was redacted.

The module is pure: no I/O except reading a policy file in :meth:`Policy.from_toml`, no
clock, and randomness only for encryption nonces.
"""

from __future__ import annotations

import hmac as _hmac
import os
import unicodedata
from base64 import urlsafe_b64decode, urlsafe_b64encode
from bisect import bisect_right
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from itertools import accumulate
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol, TypeAlias, cast

import orjson
import re2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealtrail import _detectors
from sealtrail._exceptions import FormatError, IntegrityError, InvalidEvent
from sealtrail.canonical import _format_path, _quote

__all__ = [
    "ANNOTATION_FIELD",
    "DEFAULT_POLICY",
    "DEFAULT_SENSITIVE_KEYS",
    "DETECTOR_NAMES",
    "MASK",
    "PROTECTED_FIELDS",
    "Action",
    "DetectorRule",
    "DetectorScope",
    "EncryptedValue",
    "FieldRule",
    "Finding",
    "HmacKeys",
    "KeyRing",
    "KeyRule",
    "Policy",
    "Redactor",
    "SubjectKeys",
    "TextRedaction",
    "canonical_text",
    "decrypt_value",
    "detect",
    "encrypt_value",
    "hmac_lookup",
    "hmac_value",
    "key_words",
    "parse_encrypted",
    "parse_path",
]

#: What a masked value becomes when no suffix is kept.
MASK: Final = "[REDACTED]"
#: Top-level fields no rule or detector ever touches: the dedupe key, ordering, the query
#: keys every auditor needs, and what the ledger itself adds.
PROTECTED_FIELDS: Final = frozenset({"id", "time", "action", "outcome", "schema", "ledger"})
#: Where the redactor records what it did. Never redacted itself.
ANNOTATION_FIELD: Final = "redacted"
#: Every value detector, in priority order (see :mod:`sealtrail._detectors`).
DETECTOR_NAMES: Final = _detectors.DETECTOR_NAMES

_SKIPPED_AT_TOP: Final = PROTECTED_FIELDS | {ANNOTATION_FIELD}
_DETECTOR_MASKS: Final = tuple(f"[REDACTED:{name}]" for name in DETECTOR_NAMES)
_HMAC_PREFIX: Final = "hmac-sha256:"
_ENC_PREFIX: Final = "enc:aes256gcm:"
_STARS: Final = "****"
_KEY_ID = re2.compile(r"[A-Za-z0-9._\-]{1,64}")
_KEY_CACHE_MAX: Final = 4096
_MAX_DEPTH: Final = 254


class Action(StrEnum):
    """What a rule does with the value it covers."""

    DROP = "drop"
    MASK = "mask"
    HMAC = "hmac"
    ENCRYPT = "encrypt"
    ALLOW = "allow"


class _DetectorAction(StrEnum):
    MASK = "mask"
    HMAC = "hmac"
    OFF = "off"


def _action(value: object, where: str, allowed: Iterable[str]) -> str:
    choices = tuple(allowed)
    if isinstance(value, str) and value in choices:
        return value
    raise FormatError(
        f"{where}: unknown action {_quote(str(value))}; expected one of {', '.join(choices)}"
    )


def _keep_last(value: object, action: str, where: str) -> int:
    if type(value) is not int or value < 0:
        raise FormatError(f"{where}: keep_last must be a non-negative integer, got {value!r}")
    if value and action != "mask":
        raise FormatError(f"{where}: keep_last only applies to the mask action")
    if value > 16:
        raise FormatError(f"{where}: keep_last {value} would reveal too much (at most 16)")
    return value


# --------------------------------------------------------------------------------------
# Paths: "data.card", "changes.*.old", 'data["odd.key"]'


def parse_path(pattern: str) -> tuple[str, ...]:
    """Split a field path pattern into segments; ``*`` stands for any one key.

    Segments are separated by dots; a key that itself contains a dot or bracket is written
    as a JSON string in brackets: ``data["a.b"].c``. List indexes are not written: lists
    are transparent, so ``data.users.email`` covers the e-mail of every user in the list.
    """
    if not isinstance(pattern, str) or not pattern:
        raise FormatError(f"a field path must be a non-empty string, got {pattern!r}")
    segments: list[str] = []
    i = 0
    size = len(pattern)
    expect_segment = True
    while i < size:
        char = pattern[i]
        if char == "[":
            end = pattern.find('"]', i + 2)
            if not pattern.startswith('["', i) or end < 0:
                raise FormatError(f'field path {_quote(pattern)}: write odd keys as ["key"]')
            try:
                segment = orjson.loads(pattern[i + 1 : end + 1])
            except orjson.JSONDecodeError:
                raise FormatError(f"field path {_quote(pattern)}: bad quoted key") from None
            segments.append(segment)
            i = end + 2
            expect_segment = False
        elif char == ".":
            if expect_segment:
                raise FormatError(f"field path {_quote(pattern)}: empty segment")
            expect_segment = True
            i += 1
        else:
            if not expect_segment:
                raise FormatError(f"field path {_quote(pattern)}: missing '.' after a ]")
            stop = i
            while stop < size and pattern[stop] not in ".[":
                stop += 1
            segment = pattern[i:stop]
            if "]" in segment or '"' in segment or segment != segment.strip():
                raise FormatError(f"field path {_quote(pattern)}: bad segment {_quote(segment)}")
            segments.append(segment)
            i = stop
            expect_segment = False
    if expect_segment:
        raise FormatError(f"field path {_quote(pattern)}: empty segment")
    if segments[0] in _SKIPPED_AT_TOP:
        raise FormatError(f"field path {_quote(pattern)}: {segments[0]!r} is never redacted")
    return tuple(segments)


# --------------------------------------------------------------------------------------
# Key names: "password" matches password, db_password, userPassword, X-Password, PASSWORD


def key_words(key: str) -> tuple[str, ...]:
    """Lowercase words of a key: split at ``_``, ``-``, other punctuation, camel case and
    letter/digit changes (``APIKey2`` -> ``api``, ``key``, ``2``)."""
    words: list[str] = []
    current: list[str] = []
    size = len(key)
    for index, char in enumerate(key):
        if not char.isalnum():
            if current:
                words.append("".join(current).lower())
                current = []
            continue
        if current:
            previous = key[index - 1]
            split = (
                (char.isupper() and (previous.islower() or previous.isdigit()))
                or (
                    char.isupper()
                    and previous.isupper()
                    and index + 1 < size
                    and key[index + 1].islower()
                )
                or (char.isdigit() != previous.isdigit())
            )
            if split:
                words.append("".join(current).lower())
                current = []
        current.append(char)
    if current:
        words.append("".join(current).lower())
    return tuple(words)


def _contains(words: tuple[str, ...], phrase: tuple[str, ...]) -> bool:
    first = phrase[0]
    if first not in words:  # one C-level scan; keys are usually a few words
        return False
    span = len(phrase)
    if span == 1:
        return True
    return any(
        words[i] == first and words[i : i + span] == phrase for i in range(len(words) - span + 1)
    )


# --------------------------------------------------------------------------------------
# Rules and policy


@dataclass(frozen=True, slots=True)
class FieldRule:
    """Treat the value at ``path`` (and everything under it) with ``action``.

    A rule on a ``changes`` entry (``changes.password``) applies to its ``old`` and ``new``
    values separately, so the record still shows that the field changed: masked, both
    become ``"[REDACTED]"``; hashed, an auditor can still see whether they are equal.
    """

    path: str
    action: Action | str
    keep_last: int = 0
    segments: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"field rule {_quote(str(self.path))}"
        action = Action(_action(self.action, where, Action))
        object.__setattr__(self, "action", action)
        object.__setattr__(self, "keep_last", _keep_last(self.keep_last, action, where))
        object.__setattr__(self, "segments", parse_path(self.path))


@dataclass(frozen=True, slots=True)
class KeyRule:
    """Treat the value of any key named ``name``, anywhere in the event, with ``action``.

    Names match by words, ignoring case and separators: ``api_key`` matches ``apiKey``,
    ``X-Api-Key`` and ``stripe_api_key``; ``password`` also matches lowercase run-together
    keys ending in it (``userpassword``). With ``exact=True`` the whole key must equal the
    name (case and separators still ignored). When several rules match a key, the one with
    the most words wins (``token_count = allow`` beats ``token = mask``), then the later one.
    """

    name: str
    action: Action | str
    keep_last: int = 0
    exact: bool = False
    words: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"key rule {_quote(str(self.name))}"
        if not isinstance(self.name, str) or not key_words(self.name):
            raise FormatError(f"{where}: a key name needs at least one letter or digit")
        action = Action(_action(self.action, where, Action))
        object.__setattr__(self, "action", action)
        object.__setattr__(self, "keep_last", _keep_last(self.keep_last, action, where))
        object.__setattr__(self, "words", key_words(self.name))

    def matches(self, words: tuple[str, ...]) -> bool:
        if self.exact:
            return words == self.words
        if _contains(words, self.words):
            return True
        # "userpassword", "csrftoken": one run-together word ending in the name. Short names
        # (pin, ssn, pwd) only match as whole words: "spin" is not a PIN.
        joined = "".join(self.words)
        return len(words) == 1 and len(joined) > 3 and words[0].endswith(joined)


@dataclass(frozen=True, slots=True)
class DetectorRule:
    """Turn detector ``name`` on (``mask`` or ``hmac`` the matched span) or ``off``.

    ``keep_last`` keeps a suffix of masked matches (``card`` with 4: ``****1111``).
    """

    name: str
    action: str = "mask"
    keep_last: int = 0

    def __post_init__(self) -> None:
        where = f"detector {_quote(str(self.name))}"
        if self.name not in _detectors.BY_NAME:
            raise FormatError(
                f"{where}: unknown detector; known detectors: {', '.join(DETECTOR_NAMES)}"
            )
        action = _action(self.action, where, _DetectorAction)
        object.__setattr__(self, "action", action)
        object.__setattr__(self, "keep_last", _keep_last(self.keep_last, action, where))


@dataclass(frozen=True, slots=True)
class DetectorScope:
    """Choose the detectors that scan values at ``path`` and below.

    ``only`` replaces the inherited set (``only=()``: no detector at all), ``off`` removes
    detectors from it. The deepest scope on a path applies on top of those above it.
    """

    path: str
    off: Collection[str] = ()
    only: Collection[str] | None = None
    segments: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"detector scope {_quote(str(self.path))}"
        for name in (*self.off, *(self.only or ())):
            if name not in _detectors.BY_NAME:
                raise FormatError(
                    f"{where}: unknown detector {_quote(str(name))}; "
                    f"known detectors: {', '.join(DETECTOR_NAMES)}"
                )
        object.__setattr__(self, "off", frozenset(self.off))
        if self.only is not None:
            object.__setattr__(self, "only", frozenset(self.only))
        object.__setattr__(self, "segments", parse_path(self.path))


def _replace_by(old: Sequence[Any], new: Iterable[Any], identity: Any) -> tuple[Any, ...]:
    added = list(new)
    replaced = {identity(rule) for rule in added}
    return (*(rule for rule in old if identity(rule) not in replaced), *added)


@dataclass(frozen=True, slots=True)
class Policy:
    """What to redact: field rules, key-name rules, detectors and their scopes.

    Build one in Python (``DEFAULT_POLICY.extend(fields=[FieldRule("data.card", "hmac")])``)
    or from TOML (:meth:`from_toml`). A field rule beats a key-name rule at the same place;
    the first rule met walking down from the top covers the whole subtree below it.
    """

    fields: tuple[FieldRule, ...] = ()
    keys: tuple[KeyRule, ...] = ()
    detectors: tuple[DetectorRule, ...] = ()
    scopes: tuple[DetectorScope, ...] = ()

    def __post_init__(self) -> None:
        for name, kind in (
            ("fields", FieldRule),
            ("keys", KeyRule),
            ("detectors", DetectorRule),
            ("scopes", DetectorScope),
        ):
            items = tuple(getattr(self, name))
            for item in items:
                if not isinstance(item, kind):
                    raise FormatError(f"policy {name}: expected {kind.__name__}, got {item!r}")
            object.__setattr__(self, name, items)

    def extend(
        self,
        *,
        fields: Iterable[FieldRule] = (),
        keys: Iterable[KeyRule] = (),
        detectors: Iterable[DetectorRule] = (),
        scopes: Iterable[DetectorScope] = (),
    ) -> Policy:
        """A new policy with these rules added; each replaces an existing rule for the same
        path, key name or detector."""
        return replace(
            self,
            fields=_replace_by(self.fields, fields, lambda r: r.segments),
            keys=_replace_by(self.keys, keys, lambda r: (r.words, r.exact)),
            detectors=_replace_by(self.detectors, detectors, lambda r: r.name),
            scopes=_replace_by(self.scopes, scopes, lambda r: r.segments),
        )

    @property
    def uses_hmac(self) -> bool:
        rules: tuple[FieldRule | KeyRule | DetectorRule, ...] = (
            *self.fields,
            *self.keys,
            *self.detectors,
        )
        return any(rule.action == "hmac" for rule in rules)

    @property
    def uses_encrypt(self) -> bool:
        rules: tuple[FieldRule | KeyRule, ...] = (*self.fields, *self.keys)
        return any(rule.action == Action.ENCRYPT for rule in rules)

    @classmethod
    def from_toml(cls, source: str | bytes | os.PathLike[str]) -> Policy:
        """Load a policy from TOML: a path (``os.PathLike``, or a ``str`` ending in ``.toml``
        with no newline), or the TOML text itself.

        ::

            extends = "default"            # or "none": start from an empty policy

            [keys]                         # key names, anywhere in the event
            password = "drop"
            card_number = { action = "mask", keep_last = 4 }
            token_count = "allow"

            [fields]                       # field paths: quote them, they contain dots
            "data.card" = "hmac"
            "changes.email" = "encrypt"

            [detectors]                    # mask | hmac | off
            email = "hmac"
            high_entropy = "off"

            [scopes]                       # which detectors scan a subtree
            "data.html" = "off"
            "source.request_id" = { off = ["high_entropy"] }

        Raises :class:`FormatError` naming the line and key at fault.
        """
        if isinstance(source, os.PathLike) or (
            isinstance(source, str) and "\n" not in source and source.endswith(".toml")
        ):
            text = _read_policy_file(Path(source))
        elif isinstance(source, bytes):
            text = source.decode("utf-8", "replace")
        else:
            text = source
        return _policy_from_toml(text)


def _read_policy_file(path: Path) -> str:
    """The one I/O of this module."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FormatError(f"cannot read policy file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise FormatError(f"policy file {str(path)!r} is not UTF-8") from None


_TOML_TOP: Final = ("version", "extends", "keys", "fields", "detectors", "scopes")


def _line_of(text: str, section: str, key: str) -> str:
    """Best-effort 'line N: ' prefix for an error about ``key`` in ``[section]``."""
    current = ""
    candidates = (key, f'"{key}"', f"'{key}'")
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            header = stripped.strip("[]").strip()
            current = header
            if section and (header in (f"{section}.{c}" for c in candidates)):
                return f"line {number}: "
            continue
        if current == section:
            for candidate in candidates:
                if stripped.startswith(candidate):
                    rest = stripped[len(candidate) :].lstrip()
                    if rest.startswith(("=", ".")):
                        return f"line {number}: "
    return ""


def _policy_from_toml(text: str) -> Policy:
    import tomllib

    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FormatError(f"policy is not valid TOML: {exc}") from None

    def fail(section: str, key: str, reason: str) -> FormatError:
        place = f"[{section}] {_quote(key)}" if section else _quote(key)
        return FormatError(f"policy {_line_of(text, section, key)}{place}: {reason}")

    for key in document:
        if key not in _TOML_TOP:
            raise fail("", key, f"unknown setting; expected one of {', '.join(_TOML_TOP)}")
    version = document.get("version", 1)
    if version != 1:
        raise fail("", "version", f"unsupported policy version {version!r} (this reads 1)")
    extends = document.get("extends", "default")
    if extends not in ("default", "none"):
        raise fail("", "extends", f'must be "default" or "none", got {extends!r}')

    def table(name: str) -> dict[str, Any]:
        value = document.get(name, {})
        if not isinstance(value, dict):
            raise fail("", name, "must be a table")
        return value

    def spec(section: str, key: str, value: object, allowed: set[str]) -> dict[str, Any]:
        if isinstance(value, str):
            return {"action": value}
        if isinstance(value, dict) and "action" in value:
            unknown = set(value) - allowed
            if unknown:
                raise fail(section, key, f"unknown option {sorted(unknown)[0]!r}")
            return value
        hint = (
            '; quote dotted paths, e.g. "data.card" = "mask"'
            if isinstance(value, dict) and section in ("fields", "scopes")
            else ""
        )
        raise fail(section, key, f'expected an action string or {{ action = "..." }}{hint}')

    def build(section: str, key: str, make: Any, **options: Any) -> Any:
        try:
            return make(**options)
        except FormatError as exc:
            reason = str(exc).split(": ", 1)[-1]
            raise fail(section, key, reason) from None

    keys = [
        build(
            "keys",
            name,
            KeyRule,
            name=name,
            **spec("keys", name, value, {"action", "keep_last", "exact"}),
        )
        for name, value in table("keys").items()
    ]
    fields = [
        build(
            "fields",
            path,
            FieldRule,
            path=path,
            **spec("fields", path, value, {"action", "keep_last"}),
        )
        for path, value in table("fields").items()
    ]
    detectors = [
        build(
            "detectors",
            name,
            DetectorRule,
            name=name,
            **spec("detectors", name, value, {"action", "keep_last"}),
        )
        for name, value in table("detectors").items()
    ]
    scopes = []
    for path, value in table("scopes").items():
        if value == "off":
            options: dict[str, Any] = {"only": ()}
        elif isinstance(value, dict) and set(value) <= {"off", "only"} and value:
            options = {}
            for option, names in value.items():
                if names == "all" and option == "off":
                    options["only"] = ()
                elif isinstance(names, list) and all(isinstance(n, str) for n in names):
                    options[option] = names
                else:
                    raise fail("scopes", path, f"{option} must be a list of detector names")
        else:
            raise fail(
                "scopes",
                path,
                'expected "off", { off = [...] } or { only = [...] }; quote dotted paths',
            )
        scopes.append(build("scopes", path, DetectorScope, path=path, **options))
    base = DEFAULT_POLICY if extends == "default" else Policy()
    return base.extend(fields=fields, keys=keys, detectors=detectors, scopes=scopes)


#: Key names redacted by default wherever they appear (see :class:`KeyRule` for matching).
DEFAULT_SENSITIVE_KEYS: Final = (
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "secret",
    "client_secret",
    "token",
    "access_token",
    "refresh_token",
    "authorization",
    "cookie",
    "set_cookie",
    "api_key",
    "apikey",
    "private_key",
    "credential",
    "credentials",
    "session",
    "otp",
    "pin",
    "ssn",
    "card_number",
    "cvv",
    "cvc",
)

#: The default: sensitive key names masked, every detector masking. Identity fields keep
#: what identifies the actor, target and subject (an audit trail that hides who acted is
#: useless; pseudonymise them with an ``hmac`` field rule instead), and only the value
#: detectors that look for secrets scan them.
DEFAULT_POLICY: Final = Policy(
    keys=tuple(KeyRule(name, Action.MASK) for name in DEFAULT_SENSITIVE_KEYS),
    detectors=tuple(DetectorRule(name) for name in DETECTOR_NAMES),
    scopes=(
        DetectorScope("tenant", only=()),
        DetectorScope("actor.type", only=()),
        DetectorScope("target.type", only=()),
        DetectorScope("subject", off=("email", "phone", "high_entropy")),
        DetectorScope("actor.id", off=("email", "phone", "high_entropy")),
        DetectorScope("actor.on_behalf_of", off=("email", "phone", "high_entropy")),
        DetectorScope("target.id", off=("email", "phone", "high_entropy")),
        DetectorScope("source.ip", off=("phone", "high_entropy")),
        DetectorScope("source.request_id", off=("high_entropy",)),
        DetectorScope("source.trace_id", off=("high_entropy",)),
    ),
)


# --------------------------------------------------------------------------------------
# Keys


class HmacKeys(Protocol):
    """Where HMAC keys come from: ``key_for(tenant)`` returns ``(key id, secret)``."""

    def key_for(self, tenant: str | None) -> tuple[str, bytes]: ...


class SubjectKeys(Protocol):
    """Where data subjects' encryption keys come from: ``key_for(subject)`` returns
    ``(key id, 32-byte AES key)``, creating the key on first use if it likes. Raises
    ``LookupError`` when the subject has no key (for instance after it was shredded)."""

    def key_for(self, subject: str) -> tuple[str, bytes]: ...


def _check_key(key_id: object, secret: object, what: str, minimum: int) -> tuple[str, bytes]:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise ValueError(f"{what}: key id must be 1-64 of A-Z a-z 0-9 . _ -, got {key_id!r}")
    if not isinstance(secret, bytes) or len(secret) < minimum:
        raise ValueError(f"{what}: the secret must be at least {minimum} bytes")
    return key_id, secret


class KeyRing:
    """HMAC keys per tenant.

    A tenant without its own key gets one derived from the default key
    (``HMAC-SHA256(default secret, "sealtrail/hmac-tenant/v1" NUL tenant)``, same key id),
    so tenants are separated even with a single configured secret: the same card number
    hashes differently for two tenants, and one tenant's auditor cannot correlate values
    with another's. Events without a tenant use the default key itself.
    """

    __slots__ = ("_default", "_derived", "_tenants")

    def __init__(
        self,
        default: tuple[str, bytes] | None = None,
        tenants: Mapping[str, tuple[str, bytes]] | None = None,
    ) -> None:
        self._default = None if default is None else _check_key(*default, "default key", 16)
        self._tenants = {
            tenant: _check_key(*key, f"key of tenant {tenant!r}", 16)
            for tenant, key in (tenants or {}).items()
        }
        self._derived: dict[str, tuple[str, bytes]] = {}
        if self._default is None and not self._tenants:
            raise ValueError("a KeyRing needs a default key or at least one tenant key")

    def key_for(self, tenant: str | None) -> tuple[str, bytes]:
        if tenant is not None:
            own = self._tenants.get(tenant)
            if own is not None:
                return own
        if self._default is None:
            raise LookupError(f"no HMAC key for tenant {tenant!r} and no default key")
        if tenant is None:
            return self._default
        derived = self._derived.get(tenant)
        if derived is None:
            key_id, secret = self._default
            message = b"sealtrail/hmac-tenant/v1\x00" + tenant.encode("utf-8", "surrogatepass")
            derived = (key_id, _hmac.digest(secret, message, "sha256"))
            if len(self._derived) < 65536:
                self._derived[tenant] = derived
        return derived


# --------------------------------------------------------------------------------------
# HMAC


def _json_default(value: object) -> object:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return str(value)


def _json_bytes(value: object) -> bytes:
    return orjson.dumps(
        value, default=_json_default, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
    )


def canonical_text(value: object) -> str:
    """The text an HMAC is computed over, so that equal values hash alike however they were
    written: strings NFC-normalised and stripped; ``4111111111111111`` and
    ``"4111111111111111"`` alike; ``True``/``False``/``None`` as ``true``/``false``/``null``;
    objects and arrays as compact JSON with sorted keys; other objects (UUID, datetime) as
    their JSON string form."""
    if isinstance(value, str):
        text = str.__str__(value)
    elif value is None:
        return "null"
    elif value is True:
        return "true"
    elif value is False:
        return "false"
    elif isinstance(value, int):
        return str(int(value))
    else:
        dumped = _json_bytes(value)
        if not dumped.startswith(b'"'):
            return dumped.decode("utf-8")
        text = orjson.loads(dumped)
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text.strip()


def hmac_value(text: str, key_id: str, secret: bytes) -> str:
    """``hmac-sha256:<key id>:<hex>`` of already-canonical text."""
    digest = _hmac.digest(secret, text.encode("utf-8", "surrogatepass"), "sha256")
    return f"{_HMAC_PREFIX}{key_id}:{digest.hex()}"


def hmac_lookup(
    value: object, tenant: str | None, keyring: HmacKeys, *, detector: str | None = None
) -> str:
    """The redacted form ``value`` takes in ``tenant``'s events, so an auditor can search for
    it ("did this card number appear?") without the trail holding it.

    With ``detector``, the value is first normalised as that detector does for spans it finds
    in free text (``card``: digits only; ``email``: lower case; ``iban``: compact upper case;
    ``phone``: + and digits), so ``"4111 1111 1111 1111"`` found in a sentence is found by
    looking up ``4111111111111111``. Field rules hash :func:`canonical_text` of the value.
    The audited lookup call of the service wraps this function.
    """
    key_id, secret = keyring.key_for(tenant)
    text = canonical_text(value)
    if detector is not None:
        if detector not in _detectors.BY_NAME:
            raise ValueError(f"unknown detector {detector!r}")
        text = _detectors.BY_NAME[detector].normalise(text)
    return hmac_value(text, key_id, secret)


# --------------------------------------------------------------------------------------
# Encryption for the data subject


class EncryptedValue(NamedTuple):
    """The parts of an ``enc:aes256gcm:<key id>:<nonce>:<ciphertext>`` string."""

    key_id: str
    nonce: bytes
    ciphertext: bytes


def _b64(data: bytes) -> str:
    return urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _associated_data(event_id: str, path: str, key_id: str) -> bytes:
    # A JSON array is unambiguous whatever the strings hold.
    return orjson.dumps(["sealtrail.redact.encrypt/v1", event_id, path, key_id])


def encrypt_value(value: object, key_id: str, key: bytes, *, event_id: str, path: str) -> str:
    """Encrypt ``value`` (any JSON value, type kept) with AES-256-GCM under a subject's key.

    The associated data binds the event id, the field path and the key id: the ciphertext
    does not decrypt if it is moved to another event or field, so nobody can make a stored
    value appear somewhere it was not recorded.
    """
    _check_key(key_id, key, "subject key", 32)
    if len(key) != 32:
        raise ValueError("subject key: AES-256 needs a 32-byte key")
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(
        nonce, _json_bytes(value), _associated_data(event_id, path, key_id)
    )
    return f"{_ENC_PREFIX}{key_id}:{_b64(nonce)}:{_b64(sealed)}"


def parse_encrypted(token: str) -> EncryptedValue:
    """Split an ``enc:aes256gcm:...`` string; :class:`FormatError` if it is not one."""
    if not isinstance(token, str) or not token.startswith(_ENC_PREFIX):
        raise FormatError("not an enc:aes256gcm value")
    parts = token[len(_ENC_PREFIX) :].split(":")
    if len(parts) != 3 or not _KEY_ID.fullmatch(parts[0]):
        raise FormatError("enc:aes256gcm value must be enc:aes256gcm:<key id>:<nonce>:<data>")
    try:
        nonce, ciphertext = _unb64(parts[1]), _unb64(parts[2])
    except ValueError:
        raise FormatError("enc:aes256gcm value: nonce or data is not base64url") from None
    if len(nonce) != 12 or len(ciphertext) < 16:
        raise FormatError("enc:aes256gcm value: bad nonce or data length")
    return EncryptedValue(parts[0], nonce, ciphertext)


def decrypt_value(token: str, key: bytes, *, event_id: str, path: str) -> object:
    """Decrypt a value :func:`encrypt_value` produced, given the subject's key for the key id
    in the token (:func:`parse_encrypted`), and the event id and field path it was stored at.

    Raises :class:`IntegrityError` when it does not decrypt: wrong key, or the value was
    altered or moved to another event or field.
    """
    parts = parse_encrypted(token)
    if not isinstance(key, bytes) or len(key) != 32:
        raise ValueError("subject key: AES-256 needs a 32-byte key")
    try:
        plain = AESGCM(key).decrypt(
            parts.nonce, parts.ciphertext, _associated_data(event_id, path, parts.key_id)
        )
    except InvalidTag:
        raise IntegrityError(
            f"value at {path!r} does not decrypt: wrong key, or altered or moved from "
            "another event or field"
        ) from None
    return orjson.loads(plain)


# --------------------------------------------------------------------------------------
# The redactor


class _Rule:
    """A rule as the walk applies it, whichever kind it came from."""

    __slots__ = ("action", "keep_last", "name")

    def __init__(self, action: Action, keep_last: int) -> None:
        self.action = action
        self.name = str(action.value)  # Enum.value is a slow descriptor on the hot path
        self.keep_last = keep_last


class _Node:
    """One step of the field-path trie: children by key, ``*``, and what applies here."""

    __slots__ = ("children", "rule", "rule_rank", "scope", "scope_rank", "wild")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.wild: _Node | None = None
        self.rule: _Rule | None = None
        self.rule_rank: tuple[int, int] = (0, 0)
        self.scope: _Scope | None = None
        self.scope_rank: tuple[int, int] = (0, 0)

    def at(self, segments: tuple[str, ...]) -> _Node:
        node = self
        for segment in segments:
            if segment == "*":
                if node.wild is None:
                    node.wild = _Node()
                node = node.wild
            else:
                node = node.children.setdefault(segment, _Node())
        return node


_Scope: TypeAlias = "tuple[int | None, int]"  # (only: detector mask or None, off: mask)
_Step: TypeAlias = "tuple[_State | None, _Rule | None, int]"
_STEP_CACHE_MAX: Final = 1024


class _State:
    """The set of trie nodes a path has reached (wildcards can make it several), with its
    transitions by key cached: where path rules or scopes exist the walk pays one dict
    lookup per key, which yields the rule that applies (path rule first, else key-name rule)
    and the detector mask, and below them nothing at all.

    A state stands for one path from the root, so the mask it caches is a function of that
    path alone: scopes depend on nothing else.
    """

    __slots__ = ("key_rule", "mask", "nodes", "steps")

    def __init__(
        self, nodes: tuple[_Node, ...], mask: int, key_rule: Callable[[object], _Rule | None]
    ) -> None:
        self.nodes = nodes
        self.mask = mask
        self.key_rule = key_rule
        self.steps: dict[object, _Step] = {}

    def _following(self, key: object) -> list[_Node]:
        following: list[_Node] = []
        for node in self.nodes:
            if type(key) is str:
                child = node.children.get(key)
                if child is not None:
                    following.append(child)
            if node.wild is not None:
                following.append(node.wild)
        return following

    def path_rule(self, key: object) -> _Rule | None:
        rule: _Rule | None = None
        rank = (0, 0)
        for node in self._following(key):
            if node.rule is not None and (rule is None or node.rule_rank < rank):
                rule, rank = node.rule, node.rule_rank
        return rule

    def step(self, key: object) -> _Step:
        following = self._following(key)
        scope: _Scope | None = None
        scope_rank = (0, 0)
        for node in following:
            if node.scope is not None and (scope is None or node.scope_rank < scope_rank):
                scope, scope_rank = node.scope, node.scope_rank
        mask = _scoped(self.mask, scope)
        rule = self.path_rule(key)
        if rule is None:
            rule = self.key_rule(key)
        deeper = tuple(node for node in following if node.children or node.wild is not None)
        result: _Step = (_State(deeper, mask, self.key_rule) if deeper else None, rule, mask)
        if len(self.steps) < _STEP_CACHE_MAX:
            self.steps[key] = result
        return result


def _scoped(mask: int, scope: _Scope | None) -> int:
    if scope is None:
        return mask
    only, off = scope
    return (mask if only is None else only) & ~off


_DROP: Final = object()
_OLD_NEW: Final = frozenset({"old", "new"})
_MISS: Final = object()
_Link: TypeAlias = "tuple[Any, str | int] | None"
_Text: TypeAlias = "tuple[Any, Any, str, int]"  # container, key, value, detector mask
#: Integers below this cannot be card numbers (13 digits at least).
_CARD_MIN: Final = 10**12
_CARD_BIT: Final = 1 << _detectors.CARD_INDEX


_PATH_CACHE: dict[object, str] = {}
_PATH_CACHE_MAX: Final = 4096


def _path_text(link: _Link) -> str:
    """The dotted path of a link chain (``(((None, "data"), "card")``), cached: the same
    fields are redacted in event after event."""
    cached = _PATH_CACHE.get(link)
    if cached is not None:
        return cached
    segments: list[str | int] = []
    while link is not None:
        link, segment = link
        segments.append(segment)
    segments.reverse()
    text = _format_path(segments)
    if len(_PATH_CACHE) < _PATH_CACHE_MAX:
        _PATH_CACHE[link] = text
    return text


def _bits(names: Iterable[str]) -> int:
    mask = 0
    for name in names:
        mask |= 1 << DETECTOR_NAMES.index(name)
    return mask


def _copy(value: object) -> object:
    """A deep copy of plain JSON containers (so the output shares nothing mutable with the
    input); other values as they are."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is dict:
        return {k: _copy(v) for k, v in cast(dict[Any, Any], value).items()}
    if kind is list:
        return [_copy(v) for v in cast(list[Any], value)]
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_copy(v) for v in value]
    return value


class TextRedaction(NamedTuple):
    """A redacted string and how many spans each detector replaced."""

    text: str
    detectors: dict[str, int]


class Finding(NamedTuple):
    """A detector's span in a string (character offsets)."""

    detector: str
    start: int
    end: int
    text: str


class _Run:
    """The state of redacting one event."""

    __slots__ = ("counts", "event", "fields", "key", "texts")

    def __init__(self, event: Mapping[str, Any]) -> None:
        self.event = event
        self.fields: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self.texts: list[_Text] = []
        self.key: tuple[str, bytes] | None = None


class Redactor:
    """The redaction step of the emit path: ``redactor(event) -> new event``.

    ``keyring`` is required when the policy hashes anything, ``subject_keys`` when it
    encrypts anything, so a misconfiguration fails at start-up rather than on the first
    sensitive event. Thread-safe; reuse one instance (it compiles the policy once).

    Refuses an event it cannot redact as the policy demands with :class:`InvalidEvent`
    naming the field (no subject for an ``encrypt`` rule, no key for the tenant): the event
    is never passed on half-redacted.

    Performance shapes the walk: the output is built in one pass that looks at each value
    once; key-name rules are decided once per distinct key name (cached), path rules through
    a lazily built automaton over path segments (:class:`_State`); strings are only
    collected on the way, and all of them are scanned by the detectors together afterwards.
    """

    __slots__ = (
        "_detector_actions",
        "_key_cache",
        "_key_rules",
        "_keyring",
        "_policy",
        "_root",
        "_root_mask",
        "_scanner",
        "_subject_keys",
    )

    def __init__(
        self,
        policy: Policy = DEFAULT_POLICY,
        *,
        keyring: HmacKeys | None = None,
        subject_keys: SubjectKeys | None = None,
    ) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a Policy, got {type(policy).__name__}")
        if policy.uses_hmac and keyring is None:
            raise ValueError("the policy uses hmac: pass keyring=KeyRing(...)")
        if policy.uses_encrypt and subject_keys is None:
            raise ValueError("the policy uses encrypt: pass subject_keys=...")
        self._policy = policy
        self._keyring = keyring
        self._subject_keys = subject_keys
        self._key_rules = policy.keys
        self._key_cache: dict[object, _Rule | None] = {}
        actions: dict[int, tuple[str, int]] = {}
        for rule in policy.detectors:
            index = DETECTOR_NAMES.index(rule.name)
            if rule.action == "off":
                actions.pop(index, None)
            else:
                actions[index] = (rule.action, rule.keep_last)
        self._detector_actions = actions
        self._root_mask = _bits(DETECTOR_NAMES[i] for i in actions)
        self._scanner = _detectors.Scanner(actions)
        root = self._build_trie(policy)
        self._root: _State | None = None
        if root.children or root.wild is not None:
            self._root = _State((root,), self._root_mask, self._key_rule)

    @property
    def policy(self) -> Policy:
        return self._policy

    @staticmethod
    def _build_trie(policy: Policy) -> _Node:
        root = _Node()
        for order, frule in enumerate(policy.fields):
            node = root.at(frule.segments)
            rank = (frule.segments.count("*"), -order)
            if node.rule is None or rank < node.rule_rank:
                node.rule = _Rule(Action(frule.action), frule.keep_last)
                node.rule_rank = rank
        for order, scope in enumerate(policy.scopes):
            node = root.at(scope.segments)
            rank = (scope.segments.count("*"), -order)
            if node.scope is None or rank < node.scope_rank:
                only = None if scope.only is None else _bits(scope.only)
                node.scope = (only, _bits(scope.off))
                node.scope_rank = rank
        return root

    # -- rule lookup ---------------------------------------------------------------------

    def _key_rule(self, key: object) -> _Rule | None:
        """The key-name rule for ``key`` (decided once per distinct key, then cached)."""
        cached = self._key_cache.get(key, _MISS)
        if cached is not _MISS:
            return cast("_Rule | None", cached)
        found: _Rule | None = None
        if isinstance(key, str):
            words = key_words(key)
            best: KeyRule | None = None
            best_rank = (-1, -1)
            for order, rule in enumerate(self._key_rules):
                if rule.matches(words):
                    rank = (len(rule.words) + (1 if rule.exact else 0), order)
                    if rank > best_rank:
                        best, best_rank = rule, rank
            if best is not None:
                found = _Rule(Action(best.action), best.keep_last)
        if len(self._key_cache) < _KEY_CACHE_MAX:
            self._key_cache[key] = found
        return found

    # -- actions -------------------------------------------------------------------------

    def _apply(self, rule: _Rule, value: object, link: _Link, run: _Run) -> object:
        action = rule.action
        if action is Action.ALLOW:
            return _copy(value)
        path = _path_text(link)
        run.fields[path] = rule.name
        if action is Action.DROP:
            return _DROP
        if action is Action.MASK:
            return _mask(value, rule.keep_last)
        if action is Action.HMAC:
            if isinstance(value, str) and value.startswith(_HMAC_PREFIX):
                return value  # already hashed: redacting twice changes nothing
            key_id, secret = self._hmac_key(run)
            return hmac_value(canonical_text(value), key_id, secret)
        if isinstance(value, str) and value.startswith(_ENC_PREFIX):
            return value
        return self._encrypt(value, path, run)

    def _hmac_key(self, run: _Run) -> tuple[str, bytes]:
        if run.key is None:
            tenant = run.event.get("tenant")
            tenant = tenant if isinstance(tenant, str) else None
            assert self._keyring is not None  # checked in __init__ when the policy hashes
            try:
                run.key = self._keyring.key_for(tenant)
            except LookupError as exc:
                raise InvalidEvent("tenant", f"cannot hash for this tenant: {exc}") from None
        return run.key

    def _encrypt(self, value: object, path: str, run: _Run) -> str:
        subject = run.event.get("subject")
        if not isinstance(subject, str) or not subject:
            raise InvalidEvent(
                "subject",
                f"{path} is encrypted for the data subject, so the event needs a subject",
            )
        event_id = run.event.get("id")
        if not isinstance(event_id, str) or not event_id:
            raise InvalidEvent("id", f"{path} is encrypted bound to the event id: give an id")
        assert self._subject_keys is not None  # checked in __init__ when the policy encrypts
        try:
            key_id, key = self._subject_keys.key_for(subject)
        except LookupError as exc:
            raise InvalidEvent(path, f"no encryption key for the event's subject: {exc}") from None
        try:
            return encrypt_value(value, key_id, key, event_id=event_id, path=path)
        except ValueError as exc:
            raise InvalidEvent(path, f"cannot encrypt for the subject: {exc}") from None

    def _replacement(self, index: int, text: str, run: _Run) -> str:
        name = DETECTOR_NAMES[index]
        counts = run.counts
        counts[name] = counts.get(name, 0) + 1
        action, keep_last = self._detector_actions[index]
        if action == "mask" and not keep_last:
            return _DETECTOR_MASKS[index]
        if action == "hmac":
            key_id, secret = self._hmac_key(run)
            normalise = _detectors.DETECTORS[index].normalise
            return hmac_value(normalise(canonical_text(text)), key_id, secret)
        compact = "".join(text.split())
        if len(compact) >= 2 * keep_last:
            return _STARS + compact[-keep_last:]
        return _DETECTOR_MASKS[index]

    # -- the walk ------------------------------------------------------------------------

    def __call__(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Return a redacted copy of ``event`` (see the module docstring)."""
        if type(event) is not dict:
            if not isinstance(event, Mapping):
                raise InvalidEvent(
                    "", f"an event must be a JSON object, got {type(event).__name__}"
                )
            event = dict(event)
        run = _Run(event)
        out = self._walk_dict(event, self._root, self._root_mask, None, run, 1)
        if run.texts:
            self._scan(run)
        if run.fields or run.counts or ANNOTATION_FIELD in event:
            self._annotate(out, event.get(ANNOTATION_FIELD), run)
        return out

    def _walk_dict(
        self,
        source: dict[Any, Any],
        state: _State | None,
        mask: int,
        link: _Link,
        run: _Run,
        depth: int,
        changes: bool = False,
    ) -> dict[Any, Any]:
        if depth > _MAX_DEPTH:
            raise InvalidEvent(_path_text(link), f"nested deeper than {_MAX_DEPTH} levels")
        out: dict[Any, Any] = {}
        cached_rule = self._key_cache.get
        texts = run.texts
        top = link is None
        sub: _State | None = None
        smask = mask
        for key, value in source.items():
            if top and key in _SKIPPED_AT_TOP:
                if key != ANNOTATION_FIELD:
                    out[key] = _copy(value)
                continue
            if state is not None:
                step = state.steps.get(key)
                if step is None:
                    step = state.step(key)
                sub, rule, smask = step
            else:
                rule = cached_rule(key, _MISS)  # type: ignore[arg-type]
                if rule is _MISS:
                    rule = self._key_rule(key)
            if rule is not None:
                if changes and type(value) is dict and value and value.keys() <= _OLD_NEW:
                    entry = self._split_change(rule, value, sub, (link, key), run)
                    if entry:  # both sides dropped: the entry goes (it cannot be empty)
                        out[key] = entry
                    continue
                result = self._apply(rule, value, (link, key), run)
                if result is not _DROP:
                    out[key] = result
                continue
            kind = type(value)
            if kind is str:
                out[key] = value
                if smask and value:
                    texts.append((out, key, value, smask))
            elif kind is dict:
                out[key] = self._walk_dict(
                    value, sub, smask, (link, key), run, depth + 1, top and key == "changes"
                )
            elif kind is int:
                out[key] = value if value < _CARD_MIN else self._card(value, smask, run)
            elif kind is bool or value is None:
                out[key] = value
            elif kind is list:
                out[key] = self._walk_list(value, sub, smask, (link, key), run, depth + 1)
            else:
                out[key] = self._other(out, key, value, sub, smask, (link, key), run, depth + 1)
        return out

    def _walk_list(
        self,
        source: list[Any],
        state: _State | None,
        mask: int,
        link: _Link,
        run: _Run,
        depth: int,
    ) -> list[Any]:
        # Lists are transparent to paths: their items are at the list's own path.
        if depth > _MAX_DEPTH:
            raise InvalidEvent(_path_text(link), f"nested deeper than {_MAX_DEPTH} levels")
        out: list[Any] = []
        texts = run.texts
        for index, value in enumerate(source):
            kind = type(value)
            if kind is str:
                out.append(value)
                if mask and value:
                    texts.append((out, index, value, mask))
            elif kind is dict:
                out.append(self._walk_dict(value, state, mask, (link, index), run, depth + 1))
            elif kind is int:
                out.append(value if value < _CARD_MIN else self._card(value, mask, run))
            elif kind is bool or value is None:
                out.append(value)
            elif kind is list:
                out.append(self._walk_list(value, state, mask, (link, index), run, depth + 1))
            else:
                out.append(None)
                out[index] = self._other(
                    out, index, value, state, mask, (link, index), run, depth + 1
                )
        return out

    def _other(
        self,
        holder: Any,
        key: object,
        value: object,
        state: _State | None,
        mask: int,
        link: _Link,
        run: _Run,
        depth: int,
    ) -> object:
        """Values of other types than the JSON ones: subclasses of str, int, dict and list
        (string enums, ordered dicts), tuples, and anything else (kept as it is)."""
        if isinstance(value, str):
            text = str.__str__(value)
            if mask and text:
                run.texts.append((holder, key, text, mask))
            return text
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):
            number = int(value)
            return number if number < _CARD_MIN else self._card(number, mask, run)
        if isinstance(value, Mapping):
            return self._walk_dict(dict(value), state, mask, link, run, depth)
        if isinstance(value, (tuple, list)):
            return self._walk_list(list(value), state, mask, link, run, depth)
        return value

    def _card(self, value: int, mask: int, run: _Run) -> object:
        # An integer can be a card number too: {"card": 4111111111111111}.
        if mask & _CARD_BIT:
            digits = str(value)
            if _detectors.card_number_valid(digits.encode("ascii")):
                return self._replacement(_detectors.CARD_INDEX, digits, run)
        return value

    def _split_change(
        self, rule: _Rule, change: dict[Any, Any], state: _State | None, link: _Link, run: _Run
    ) -> dict[Any, Any]:
        """A rule on a ``changes`` entry covers its ``old`` and ``new`` values one by one and
        keeps the entry, so the record still says the field changed. A rule on
        ``changes.<field>.old`` itself still wins for that side."""
        entry: dict[Any, Any] = {}
        for part, value in change.items():
            part_rule = state.path_rule(part) if state is not None else None
            result = self._apply(part_rule or rule, value, (link, part), run)
            if result is not _DROP:
                entry[part] = result
        return entry

    # -- detectors -----------------------------------------------------------------------

    def _scan(self, run: _Run) -> None:
        """Run the detectors over every collected string at once (see
        :mod:`sealtrail._detectors`) and put the redacted strings in place."""
        texts = run.texts
        if not texts or self._scanner.empty:
            return
        joined = texts[0][2] if len(texts) == 1 else "\x00".join([t[2] for t in texts])
        data = joined.encode("utf-8", "surrogatepass")
        found = self._scanner.candidates(data)
        if not found:
            return
        ascii_only = len(data) == len(joined)
        if ascii_only:
            sizes = [len(text[2]) + 1 for text in texts]
        else:
            sizes = [len(text[2].encode("utf-8", "surrogatepass")) + 1 for text in texts]
        starts = list(accumulate(sizes, initial=0))
        per_value: dict[int, list[_detectors.Hit]] = {}
        everything: list[_detectors.Hit] = []
        for index in found:  # in priority order, so the catch-all detector comes last
            bit = 1 << index
            covered = None
            if _detectors.DETECTORS[index].yields and everything:
                covered = _detectors.merge(list(everything))
            for start, end in self._scanner.find(data, index, covered):
                which = bisect_right(starts, start) - 1
                if texts[which][3] & bit:
                    base = starts[which]
                    per_value.setdefault(which, []).append((start - base, end - base, index))
                    everything.append((start, end, index))
        for which, hits in per_value.items():
            holder, key, value, _mask = texts[which]
            holder[key] = self._rewrite(value, ascii_only, _detectors.merge(hits), run)

    def _rewrite(self, value: str, ascii_only: bool, hits: list[_detectors.Hit], run: _Run) -> str:
        if ascii_only and len(hits) == 1:  # the common case: one span in a short value
            start, end, index = hits[0]
            replacement = self._replacement(index, value[start:end], run)
            return value[:start] + replacement + value[end:]
        if ascii_only:
            pieces: list[str] = []
            last = 0
            for start, end, index in hits:
                pieces.append(value[last:start])
                pieces.append(self._replacement(index, value[start:end], run))
                last = end
            pieces.append(value[last:])
            return "".join(pieces)
        raw = value.encode("utf-8", "surrogatepass")
        chunks: list[bytes] = []
        last = 0
        for start, end, index in hits:
            chunks.append(raw[last:start])
            found = raw[start:end].decode("utf-8", "surrogatepass")
            chunks.append(self._replacement(index, found, run).encode("utf-8"))
            last = end
        chunks.append(raw[last:])
        return b"".join(chunks).decode("utf-8", "surrogatepass")

    def _annotate(self, out: dict[str, Any], prior: object, run: _Run) -> None:
        fields = run.fields
        counts = run.counts
        if prior is not None:
            # An earlier redactor in the chain (the application's, then the service's):
            # keep its record and add ours. Anything else under this name is refused, so a
            # producer cannot pass off a forged record as the redactor's.
            if not _is_annotation(prior):
                raise InvalidEvent(
                    ANNOTATION_FIELD,
                    "is reserved for the redactor's record: "
                    '{"fields": {path: action}, "detectors": {name: count}}',
                )
            prior_map = cast(dict[str, Any], prior)
            fields = {**prior_map.get("fields", {}), **fields}
            merged = dict(prior_map.get("detectors", {}))
            for name, count in counts.items():
                merged[name] = merged.get(name, 0) + count
            counts = merged
        if fields or counts:
            record: dict[str, Any] = {}
            if fields:
                record["fields"] = dict(fields)
            if counts:
                record["detectors"] = dict(sorted(counts.items()))
            out[ANNOTATION_FIELD] = record

    # -- free text -----------------------------------------------------------------------

    def redact_text(self, text: str, *, tenant: str | None = None) -> TextRedaction:
        """Redact one string with the policy's detectors (for log messages and other text
        outside an event). ``tenant`` selects the HMAC key when a detector hashes."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        run = _Run({"tenant": tenant} if tenant is not None else {})
        holder = [text]
        if text:
            run.texts.append((holder, 0, text, self._root_mask))
        self._scan(run)
        return TextRedaction(holder[0], dict(sorted(run.counts.items())))

    def detect(self, text: str) -> list[Finding]:
        """The spans the policy's detectors would replace in ``text``, merged, in order."""
        return _find(self._scanner, text, self._root_mask)


def _is_annotation(value: object) -> bool:
    if not isinstance(value, dict) or not set(value) <= {"fields", "detectors"}:
        return False
    fields = value.get("fields", {})
    counts = value.get("detectors", {})
    return (
        isinstance(fields, dict)
        and all(isinstance(k, str) and v in Action._value2member_map_ for k, v in fields.items())
        and isinstance(counts, dict)
        and all(k in _detectors.BY_NAME and type(v) is int and v > 0 for k, v in counts.items())
    )


def _mask(value: object, keep_last: int) -> str:
    if keep_last and not isinstance(value, (dict, list, tuple, Mapping)):
        text = "".join(canonical_text(value).split())
        if len(text) >= 2 * keep_last:
            return _STARS + text[-keep_last:]
    return MASK


_ALL_DETECTORS: _detectors.Scanner | None = None


def _find(scanner: _detectors.Scanner, text: str, mask: int) -> list[Finding]:
    data = text.encode("utf-8", "surrogatepass")
    hits = scanner.scan(data, mask)
    findings: list[Finding] = []
    for start, end, index in _detectors.merge(hits):
        begin = len(data[:start].decode("utf-8", "surrogatepass"))
        found = data[start:end].decode("utf-8", "surrogatepass")
        findings.append(Finding(DETECTOR_NAMES[index], begin, begin + len(found), found))
    return findings


def detect(text: str, detectors: Iterable[str] | None = None) -> list[Finding]:
    """The spans the given detectors (default: all) find in ``text``, merged, in order.

    For trying detectors out, tests, and tools that only need to know; redaction itself goes
    through :class:`Redactor`.
    """
    global _ALL_DETECTORS
    if _ALL_DETECTORS is None:
        _ALL_DETECTORS = _detectors.Scanner(range(len(DETECTOR_NAMES)))
    names = DETECTOR_NAMES if detectors is None else tuple(detectors)
    for name in names:
        if name not in _detectors.BY_NAME:
            raise ValueError(f"unknown detector {name!r}")
    return _find(_ALL_DETECTORS, text, _bits(names))
