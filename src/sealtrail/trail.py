"""The application's handle on an audit trail: ``trail = sealtrail.connect(...)``.

Recording goes through one emit path, a list of plain callables ``event -> event``
(structlog's design), run in order before the event reaches the ledger:

1. :func:`~sealtrail.context.apply_context` fills actor, source, tenant and reason from the
   request's :func:`sealtrail.context`, and applies the no-actor policy;
2. the id and time are fixed (redaction that encrypts for a data subject binds the event id);
3. the caller's processors, typically a :class:`~sealtrail.redact.Redactor`;
4. the ledger validates (:func:`~sealtrail.event.prepare_event`) and appends durably.

``record`` returns only once the event is durable. In the default *fail-closed* mode that
is the ledger's commit, and ``record`` raises when the ledger cannot be reached, so a
protected operation that records first and acts second never acts unrecorded. In the
*best-effort* mode (``connect(..., mode="best-effort")``) it is a local spool's commit
(:mod:`sealtrail.spool`): the event is delivered to the ledger in the background, in
order, whenever the ledger is reachable, and the backlog is counted and alerted on.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, ParamSpec, Protocol

from sealtrail._exceptions import SealtrailError
from sealtrail.context import NoActorPolicy, apply_context
from sealtrail.event import new_event_id, utc_now
from sealtrail.home import open_ledger, resolve_home
from sealtrail.ledger import AppendResult, Ledger
from sealtrail.spool import SpooledSink, SpoolStats, open_spool, start_deliverer

Processor = Callable[[dict[str, Any]], dict[str, Any]]
P = ParamSpec("P")

#: The action authorization decisions are recorded under (the decision itself is in
#: ``outcome``: success = allowed, denied, error; details in ``data``).
AUTHZ_ACTION = "authz.decision"

_RECORD_FIELDS = ("target", "changes", "outcome", "reason", "data", "subject", "tenant", "actor")


class Sink(Protocol):
    """Where a trail's events go: a :class:`~sealtrail.ledger.Ledger`, or a
    :class:`~sealtrail.spool.SpooledSink` in front of one."""

    def append(self, event: Mapping[str, Any]) -> AppendResult: ...

    def append_many(self, events: Iterable[Mapping[str, Any]]) -> list[AppendResult]: ...

    def close(self) -> None: ...


class Trail:
    """Records events into one ledger, directly or through a spool, with context and
    processors applied.

    Thread-safe (the ledger serialises appends); the asyncio variants run the blocking
    append in a worker thread, carrying the caller's context with them.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        processors: Sequence[Processor] = (),
        no_actor: NoActorPolicy | None = None,
    ) -> None:
        self.sink = sink
        self.processors = list(processors)
        self.no_actor = no_actor

    @property
    def ledger(self) -> Ledger:
        """The ledger this trail appends to directly (fail-closed mode)."""
        if isinstance(self.sink, Ledger):
            return self.sink
        raise SealtrailError(
            "this trail records through a spool (best-effort mode); open the ledger itself "
            "with sealtrail.home.open_ledger to read it"
        )

    @property
    def spool(self) -> SpooledSink | None:
        """The spool in best-effort mode (for :meth:`~sealtrail.spool.SpooledSink.stats`,
        ``metrics`` and ``flush``), else None."""
        return self.sink if isinstance(self.sink, SpooledSink) else None

    # -- building events -------------------------------------------------------------------
    def event(self, action: str, **fields: Any) -> dict[str, Any]:
        """The event ``record`` would append, after context and processors (not validated)."""
        event: dict[str, Any] = {"action": action}
        event.update({k: v for k, v in fields.items() if v is not None})
        return self.process(event)

    def process(self, event: Mapping[str, Any]) -> dict[str, Any]:
        out = apply_context(event, policy=self.no_actor)
        if out.get("id") is None:
            out["id"] = new_event_id()
        if out.get("time") is None:
            out["time"] = utc_now()
        for processor in self.processors:
            out = processor(out)
        return out

    # -- recording -------------------------------------------------------------------------
    def record(
        self,
        action: str,
        *,
        target: Mapping[str, Any] | None = None,
        changes: Mapping[str, Any] | None = None,
        outcome: str | None = None,
        reason: str | None = None,
        data: Mapping[str, Any] | None = None,
        subject: str | None = None,
        tenant: str | None = None,
        actor: Any = None,
        **fields: Any,
    ) -> AppendResult:
        """Record one event; returns its receipt (id and index) once it is durable."""
        named = dict(
            zip(
                _RECORD_FIELDS,
                (target, changes, outcome, reason, data, subject, tenant, actor),
                strict=True,
            )
        )
        return self.sink.append(self.event(action, **named, **fields))

    def record_event(self, event: Mapping[str, Any]) -> AppendResult:
        """Record an event given as a whole envelope (a dict with ``action``)."""
        return self.sink.append(self.process(event))

    def record_many(self, events: Iterable[Mapping[str, Any]]) -> list[AppendResult]:
        """Record a batch in one durable transaction: all of it, or none if one is invalid."""
        return self.sink.append_many([self.process(e) for e in events])

    # asyncio is imported where it is used: it costs ~60 ms at start-up, and the CLI and
    # synchronous applications never need it.
    async def arecord(self, action: str, **fields: Any) -> AppendResult:
        import asyncio

        # to_thread copies the contextvars, so the caller's audit context goes along.
        return await asyncio.to_thread(self.record, action, **fields)

    async def arecord_event(self, event: Mapping[str, Any]) -> AppendResult:
        import asyncio

        return await asyncio.to_thread(self.record_event, event)

    async def arecord_many(self, events: Iterable[Mapping[str, Any]]) -> list[AppendResult]:
        import asyncio

        batch = list(events)
        return await asyncio.to_thread(self.record_many, batch)

    # -- authorization decisions -----------------------------------------------------------
    def decision(
        self,
        allowed: bool,
        *,
        policy: str,
        permission: str,
        resource: Mapping[str, Any] | None = None,
        action: str = AUTHZ_ACTION,
        reason: str | None = None,
        error: str | None = None,
        **fields: Any,
    ) -> AppendResult:
        """Record one authorization decision (allowed, denied, or the check failed) with the
        current context: who asked, for what (``permission``) on what (``resource``), under
        which ``policy``."""
        data = {
            "decision": "error" if error is not None else ("allow" if allowed else "deny"),
            "policy": policy,
            "permission": permission,
        }
        if error is not None:
            data["error"] = error
        outcome = "error" if error is not None else ("success" if allowed else "denied")
        return self.record(
            action, target=resource, outcome=outcome, reason=reason, data=data, **fields
        )

    def authz(
        self,
        *,
        policy: str,
        permission: str,
        resource: Callable[..., Mapping[str, Any] | None] | Mapping[str, Any] | None = None,
        action: str = AUTHZ_ACTION,
    ) -> Callable[[Callable[P, Any]], Callable[P, Any]]:
        """Decorate an authorization check (returning a truth value, sync or async) so that
        every decision is recorded. ``resource`` is the target, or a function of the check's
        arguments returning it. Fail-closed: if the decision cannot be recorded, the call
        raises instead of answering. A check that raises is recorded as an error."""

        def target_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Mapping[str, Any] | None:
            return resource(*args, **kwargs) if callable(resource) else resource

        def decorate(check: Callable[P, Any]) -> Callable[P, Any]:
            def recorder(args: tuple[Any, ...], kwargs: dict[str, Any]) -> functools.partial[Any]:
                return functools.partial(
                    self.decision,
                    policy=policy,
                    permission=permission,
                    resource=target_of(args, kwargs),
                    action=action,
                )

            if inspect.iscoroutinefunction(check):

                @functools.wraps(check)
                async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                    import asyncio

                    record = recorder(args, kwargs)
                    try:
                        allowed = bool(await check(*args, **kwargs))
                    except Exception as exc:
                        await asyncio.to_thread(record, False, error=type(exc).__name__)
                        raise
                    await asyncio.to_thread(record, allowed)
                    return allowed

                return async_wrapper

            @functools.wraps(check)
            def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                record = recorder(args, kwargs)
                try:
                    allowed = bool(check(*args, **kwargs))
                except Exception as exc:
                    record(False, error=type(exc).__name__)
                    raise
                record(allowed)
                return allowed

            return wrapper

        return decorate

    async def adecision(self, allowed: bool, **kwargs: Any) -> AppendResult:
        import asyncio

        return await asyncio.to_thread(functools.partial(self.decision, allowed, **kwargs))

    def close(self) -> None:
        self.sink.close()

    def __enter__(self) -> Trail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_processors(
    redact: bool | Processor, processors: Sequence[Processor]
) -> list[Processor]:
    """The redactor first (secrets never reach storage unless a policy allows it, I5), then
    the caller's processors."""
    if redact is True:
        from sealtrail.redact import Redactor

        return [Redactor(), *processors]
    if redact is False:
        return list(processors)
    return [redact, *processors]


def default_spool(home: str | os.PathLike[str] | None = None) -> Path:
    """The best-effort spool of a home: ``<home>/spool``, the journal; or a ``spool.db``
    that an earlier version left there, used until it is retired by hand, so that its
    backlog is delivered."""
    base = Path(resolve_home(home))
    return base / "spool.db" if (base / "spool.db").is_file() else base / "spool"


def connect(
    target: str | os.PathLike[str] | None = None,
    *,
    home: str | os.PathLike[str] | None = None,
    redact: bool | Processor = True,
    processors: Sequence[Processor] = (),
    no_actor: NoActorPolicy | None = None,
    mode: Literal["fail-closed", "best-effort"] = "fail-closed",
    spool: str | os.PathLike[str] | None = None,
    alert_backlog: int = 10_000,
    alert_age: float = 300.0,
    on_alert: Callable[[SpoolStats], None] | None = None,
    deliver: bool | Literal["process"] = True,
) -> Trail:
    """Open a trail.

    ``target`` is a home directory (default ``$SEALTRAIL_HOME`` or ``./.sealtrail``), or a
    store URL (``sqlite:///...``, ``postgresql://...``) whose signing key is in ``home``.
    ``redact`` is ``True`` for the default policy (:data:`sealtrail.redact.DEFAULT_POLICY`:
    sensitive keys and detected secrets masked), a configured
    :class:`~sealtrail.redact.Redactor`, or ``False``.

    ``mode="fail-closed"`` (default): ``record`` appends to the ledger and raises if it
    cannot. ``mode="best-effort"``: ``record`` queues the event in a durable local spool
    (``spool``: a directory for the append-only :class:`~sealtrail.journal.JournalSpool`,
    default ``<home>/spool``; a path ending in ``.db`` for the SQLite
    :class:`~sealtrail.spool.Spool`) and returns a pending receipt; a background
    thread delivers the spool to the ledger, which may be down when the application starts
    (see :mod:`sealtrail.spool`; ``alert_backlog`` events or ``alert_age`` seconds of
    backlog call ``on_alert`` and log a warning). ``deliver=False`` only queues: another
    process delivers the spool (``sealtrail deliver``), which keeps delivery's interpreter
    time out of the application's process. ``deliver="process"`` starts that process
    itself: it delivers while the trail is open, is stopped by ``close`` (after up to 5 s
    of delivering what is left), and if the application dies, delivers what it left and
    stops.
    """
    if deliver not in (True, False, "process"):
        raise SealtrailError(f"deliver must be True, False or 'process', not {deliver!r}")
    if mode not in ("fail-closed", "best-effort"):
        raise SealtrailError(f"mode must be 'fail-closed' or 'best-effort', not {mode!r}")
    text = None if target is None else os.fspath(target)
    if text is not None and text.startswith(("http://", "https://")):
        raise SealtrailError(
            "recording to the audit service over HTTPS is not available in this version; "
            "connect to a home directory or a database URL"
        )

    def open_target() -> Ledger:
        if text is not None and "://" in text:
            return open_ledger(home, text)
        return open_ledger(Path(text) if text is not None else home)

    chain = default_processors(redact, processors)
    if mode == "fail-closed":
        if spool is not None or deliver is not True:
            raise SealtrailError("a spool is used only in the best-effort mode")
        return Trail(open_target(), processors=chain, no_actor=no_actor)

    if spool is None:
        spool = default_spool(text if text is not None and "://" not in text else home)
    sink = SpooledSink(
        open_spool(spool),
        open_target,
        alert_backlog=alert_backlog,
        alert_age=alert_age,
        on_alert=on_alert,
        deliver=deliver is True,
    )
    if deliver == "process":
        url = text if text is not None and "://" in text else None
        given = None if home is None else os.fspath(home)
        base = given if url is not None or text is None else text
        where = [] if base is None else ["--home", base]
        sink.helper = start_deliverer([*where, "deliver", "--spool", os.fspath(spool)], url)
    return Trail(sink, processors=chain, no_actor=no_actor)
