"""The exception tree of Sealtrail.

Every error Sealtrail raises derives from :class:`SealtrailError`; no third-party exception
crosses a public boundary. The tree is kept shallow and separates "the data is wrong" from
"we could not reach it", because callers react to them differently: integrity failures are
alarms, storage failures are retries::

    SealtrailError
    ├── InvalidEvent        an event (or a batch line) breaks the envelope rules
    ├── FormatError         a note, checkpoint, receipt, key or bundle is malformed
    ├── IntegrityError      well-formed data that does not check out: bad signature,
    │   │                   bad proof, tampering
    │   ├── SignatureError
    │   └── ProofError
    ├── ConflictError       an event id seen before with different content
    ├── NotFound            no such event / checkpoint
    ├── StorageError        the store could not be opened, read or written
    ├── CaptureError        database capture refuses a change it cannot capture, or is
    │                       set up wrongly (sealtrail.capture)
    └── ContextError        an audit-context value could not be resolved (sealtrail.context)
        └── MissingActor    no actor, and the no-actor policy refuses
"""

from __future__ import annotations


class SealtrailError(Exception):
    """Root of every error Sealtrail raises."""


class InvalidEvent(SealtrailError, ValueError):
    """An event breaks the envelope rules.

    ``field`` names the offending field as a dotted path (``source.ip``, ``data.a[3]``), or
    ``""`` when the problem is the document as a whole (not JSON, too large).
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)


class FormatError(SealtrailError, ValueError):
    """A note, checkpoint, receipt, key or bundle is not in the expected format."""


class IntegrityError(SealtrailError):
    """Well-formed data that does not verify."""


class SignatureError(IntegrityError):
    """A signature is missing, made by an unknown key, or does not verify."""


class ProofError(IntegrityError):
    """A Merkle inclusion or consistency proof does not verify."""


class ConflictError(SealtrailError):
    """An event id that is already stored arrived again with different content."""


class NotFound(SealtrailError, LookupError):
    """The requested event or checkpoint does not exist."""


class StorageError(SealtrailError):
    """The store could not be opened, read or written."""


class CaptureError(SealtrailError):
    """Database capture cannot capture a change (so the change is refused), or cannot be
    installed or used as asked: an unknown table or column, a table without a primary
    key, an unsupported connection or statement."""
