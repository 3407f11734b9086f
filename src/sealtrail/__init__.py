"""Sealtrail: tamper-evident, append-only security audit trails."""

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

__version__ = "0.1.0"

__all__ = [
    "ConflictError",
    "FormatError",
    "IntegrityError",
    "InvalidEvent",
    "NotFound",
    "ProofError",
    "SealtrailError",
    "SignatureError",
    "StorageError",
    "__version__",
]
