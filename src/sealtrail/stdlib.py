"""Standard-library logging integration: the ``AUDIT`` level and the handler that tees it.

Teams already call ``logger.info(...)`` everywhere; the cheapest way to get audit events
out of such code is a log level that means "this is an audit event"::

    import logging, sealtrail
    from sealtrail.stdlib import AUDIT, AuditHandler

    log = logging.getLogger("app")
    log.addHandler(AuditHandler(trail))
    log.log(AUDIT, "user.email.update", extra={"target": {"type": "user", "id": "42"}})

The message is the action; ``extra`` carries envelope fields (``actor``, ``target``,
``changes``, ``outcome``, ``reason``, ``data``...). Records at other levels pass the handler
by, and go to the app's other handlers as usual.

Fail-closed by default: if the event cannot be recorded, the exception propagates out of
the ``log.log(AUDIT, ...)`` call (the standard library only swallows errors that a handler's
``emit`` catches itself), so the protected operation fails. With ``fail_closed=False`` the
handler counts failures instead (:attr:`AuditHandler.failures`) and reports them through
``logging.Handler.handleError``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sealtrail._exceptions import SealtrailError
from sealtrail.trail import Trail

__all__ = ["AUDIT", "AuditHandler", "audit"]

#: Above CRITICAL (50). A level is a threshold, and audit events must never fall below one:
#: with AUDIT between INFO and WARNING, the common production setting (root at WARNING)
#: silently dropped every audit record before any handler saw it.
AUDIT = 60
logging.addLevelName(AUDIT, "AUDIT")

# Every attribute a LogRecord has of its own; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName"}
)


class AuditHandler(logging.Handler):
    """Turns ``AUDIT`` records into trail events (message = action, ``extra`` = fields)."""

    def __init__(self, trail: Trail, *, fail_closed: bool = True) -> None:
        super().__init__(level=AUDIT)
        self.trail = trail
        self.fail_closed = fail_closed
        self.failures = 0
        self._count_lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno == AUDIT and super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.trail.record_event(event_from_record(record))
        except (SealtrailError, TypeError, ValueError):
            if self.fail_closed:
                raise
            with self._count_lock:
                self.failures += 1
            self.handleError(record)

    def handle(self, record: logging.LogRecord) -> bool:
        # logging.Handler.handle returns the filter result; emit's exceptions propagate.
        if not self.filter(record):
            return False
        with self.lock:  # type: ignore[union-attr]
            self.emit(record)
        return True


def event_from_record(record: logging.LogRecord) -> dict[str, Any]:
    """The event an AUDIT record stands for: the unformatted message is the action."""
    if not isinstance(record.msg, str):
        raise SealtrailError(
            f"an AUDIT record's message must be the action name, got {type(record.msg).__name__}"
        )
    if record.args:
        raise SealtrailError(
            "an AUDIT record's message is the action name; pass fields in extra=, not as "
            "format arguments"
        )
    event: dict[str, Any] = {"action": record.msg}
    for key, value in vars(record).items():
        if key not in _RECORD_ATTRS and not key.startswith("_"):
            event[key] = value
    return event


def audit(logger: logging.Logger, action: str, **fields: Any) -> None:
    """``logger.log(AUDIT, action, extra=fields)``, spelled for humans, and fail-closed: a
    logger configured to drop AUDIT records raises instead of losing the event."""
    if not logger.isEnabledFor(AUDIT):
        raise SealtrailError(
            f"logger {logger.name!r} drops AUDIT records (its level or logging.disable is "
            "above AUDIT): the audit event would be lost"
        )
    logger.log(AUDIT, action, extra=fields)
