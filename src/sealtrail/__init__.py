"""Sealtrail: tamper-evident, append-only security audit trails.

``trail = sealtrail.connect()`` opens a trail; ``with sealtrail.context(actor=...)`` sets who
acts for everything recorded inside; ``trail.record("user.email.update", ...)`` records.
"""

from sealtrail._exceptions import (
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
from sealtrail.trail import Trail, connect

__version__ = "0.1.0"

__all__ = [
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
