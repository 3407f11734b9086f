"""The home directory: the log's signing key, its settings and (by default) its SQLite store.

Layout of ``$SEALTRAIL_HOME`` (default ``./.sealtrail``)::

    log.key       the Ed25519 signing key in signed-note ``PRIVATE+KEY+...`` form, mode 0600
    log.vkey      the verifier key, public: give it to auditors
    config.toml   origin, store URL (when not the embedded default), checkpoint policy
    trail.db      the embedded SQLite store
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealtrail._exceptions import FormatError, SealtrailError, StorageError
from sealtrail.ledger import CheckpointPolicy, Ledger
from sealtrail.note import Signer, Verifier
from sealtrail.store import open_store

ENV_HOME = "SEALTRAIL_HOME"
DEFAULT_HOME = ".sealtrail"
KEY_FILE = "log.key"
VKEY_FILE = "log.vkey"
CONFIG_FILE = "config.toml"
DB_FILE = "trail.db"

_ORIGIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,200}$")


def resolve_home(path: str | os.PathLike[str] | None = None) -> Path:
    if path is not None:
        return Path(path)
    return Path(os.environ.get(ENV_HOME) or DEFAULT_HOME)


def default_origin() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()).strip("-.") or "localhost"
    return f"{host}/sealtrail/{secrets.token_hex(4)}"


@dataclass
class Home:
    path: Path

    @property
    def key_path(self) -> Path:
        return self.path / KEY_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def exists(self) -> bool:
        return self.key_path.is_file()

    def config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            return {}
        try:
            return tomllib.loads(self.config_path.read_text("utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise FormatError(f"{self.config_path}: {exc}") from exc

    def store_url(self, override: str | None = None) -> str:
        if override:
            return override
        url = self.config().get("store")
        if isinstance(url, str) and url:
            return url
        return f"sqlite:///{self.path / DB_FILE}"

    def policy(self) -> CheckpointPolicy:
        section = self.config().get("checkpoint", {})
        if not isinstance(section, dict):
            raise FormatError(f"{self.config_path}: [checkpoint] must be a table")
        try:
            return CheckpointPolicy(
                every_events=int(section.get("every_events", 1000)),
                every_seconds=float(section.get("every_seconds", 10.0)),
                on_close=bool(section.get("on_close", True)),
            )
        except (TypeError, ValueError) as exc:
            raise FormatError(f"{self.config_path}: bad [checkpoint] value: {exc}") from exc

    def signer(self) -> Signer:
        try:
            text = self.key_path.read_text("utf-8").strip()
        except FileNotFoundError:
            raise SealtrailError(
                f"no Sealtrail log in {self.path} (run `sealtrail init` first)"
            ) from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.key_path}: {exc}") from exc
        return Signer.from_skey(text)

    def create(self, origin: str | None = None, store: str | None = None) -> Signer:
        """Write a new signing key and config. Refuses to overwrite an existing key."""
        if self.exists():
            raise SealtrailError(f"{self.path} already holds a log (key {self.key_path})")
        origin = origin or default_origin()
        if not _ORIGIN.match(origin) or "+" in origin:
            raise FormatError(
                f"origin {origin!r} must be letters, digits and . _ / : - (no spaces or '+')"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        signer = Signer.generate(origin)
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(signer.skey() + "\n")
        (self.path / VKEY_FILE).write_text(signer.vkey() + "\n", "utf-8")
        lines = [f"origin = {_toml_str(origin)}"]
        if store:
            lines.append(f"store = {_toml_str(store)}")
        lines += ["", "[checkpoint]", "every_events = 1000", "every_seconds = 10.0", ""]
        # Private like the key: the store URL may carry a database password.
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        return signer


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def init_ledger(
    home: str | os.PathLike[str] | None = None,
    store: str | None = None,
    origin: str | None = None,
) -> Ledger:
    """Create a new log: signing key in ``home``, tables in the store, empty checkpoint."""
    h = Home(resolve_home(home))
    url = h.store_url(store)
    h.path.mkdir(parents=True, exist_ok=True)
    existing = open_store(url)
    try:
        if existing.is_initialized() and existing.meta().get("vkey"):
            raise SealtrailError(
                f"the store {url} already holds the log {existing.meta().get('origin')!r}"
            )
    finally:
        existing.close()
    signer = h.create(origin, store)
    ledger = Ledger(open_store(url), signer, policy=h.policy())
    ledger.initialize()
    return ledger


def open_ledger(
    home: str | os.PathLike[str] | None = None,
    store: str | None = None,
    *,
    vkey: str | None = None,
    read_only: bool = False,
) -> Ledger:
    """Open an existing log. Without the home's signing key, given ``vkey`` (to verify) or
    ``read_only`` (to read), the ledger reads and verifies but does not sign."""
    h = Home(resolve_home(home))
    if not h.exists() and (vkey is not None or (read_only and store is not None)):
        # An auditor's view: no signing key, only the store (and, to verify, the vkey).
        if store is None:
            raise SealtrailError("without a home directory, give the store URL (--store)")
        s = open_store(store)
        if vkey is None:
            stored = s.meta().get("vkey") if s.is_initialized() else None
            if stored is None:
                s.close()
                raise SealtrailError(f"the store {s.url} holds no Sealtrail log")
            # Only to read and to name the log: reading needs no trust. Verification
            # takes the vkey from the caller, never from the store.
            vkey = stored
        return Ledger(s, None, verifier=Verifier.from_vkey(vkey), policy=CheckpointPolicy())
    signer = h.signer()
    s = open_store(h.store_url(store))
    if not s.is_initialized():
        s.close()
        raise SealtrailError(f"the store {h.store_url(store)} is not initialised (run init)")
    verifier = Verifier.from_vkey(vkey) if vkey is not None else None
    return Ledger(s, signer, verifier=verifier, policy=h.policy())
