"""Sealtrail: tamper-evident, append-only security audit trails.

``trail = sealtrail.connect()`` opens a trail; ``with sealtrail.context(actor=...)`` sets who
acts for everything recorded inside; ``trail.record("user.email.update", ...)`` records.
"""

from typing import TYPE_CHECKING, Any

from sealtrail._exceptions import (
    CaptureError,
    ConflictError,
    FormatError,
    IntegrityError,
    InvalidEvent,
    NotFound,
    ProofError,
    SealtrailError,
    SignatureError,
    StorageError,
)

# Eager, unlike the rest: ``sealtrail.context`` must be the function, and importing the
# submodule of the same name anywhere would otherwise leave the module in its place.
from sealtrail.context import (
    ContextError,
    MissingActor,
    NoActorPolicy,
    carry,
    context,
    current_context,
    restore,
    wrap,
)

if TYPE_CHECKING:
    from sealtrail.trail import Trail, connect

# The rest of the application API is imported on first use (PEP 562), so that processes
# needing only a part of the package (the verification workers, the CLI's read commands)
# do not pay for all of it at start-up.
_LAZY = {"Trail": "sealtrail.trail", "connect": "sealtrail.trail"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sealtrail' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "ConflictError",
    "ContextError",
    "FormatError",
    "IntegrityError",
    "InvalidEvent",
    "MissingActor",
    "NoActorPolicy",
    "NotFound",
    "ProofError",
    "SealtrailError",
    "SignatureError",
    "StorageError",
    "Trail",
    "__version__",
    "carry",
    "connect",
    "context",
    "current_context",
    "restore",
    "wrap",
]
