"""Who is acting, from where, and why: the audit context of the current request or job.

An audit event is only useful with its actor and origin, yet the code that records an
event (a model method, a service call) rarely knows the HTTP request it serves. So the
context is set once, where it is known (middleware, a job runner, a CLI entry point)::

    with sealtrail.context(actor=lambda: request.user.id, ip=client_ip, request_id=rid):
        handle(request)        # every event recorded in here carries these fields

and every event recorded inside picks it up through :func:`apply_context`.

Why :mod:`contextvars`: it is the one mechanism that is right for threads *and* asyncio.
A new thread starts with an empty context (unless the context is carried into it with
:func:`wrap` or :func:`carry`/:func:`restore`), and an asyncio task copies the context
when it is created, so what a task sets never leaks into its siblings or its parent.
Thread-locals would leak between tasks; globals between everything.

Why callables: web frameworks often authenticate after the middleware that opens the
context has run, so the actor (or any other field) may be given as a callable, resolved
when an event is recorded (:func:`resolve`). Snapshots (:func:`current_context`) are
immutable and keep the callables unresolved; :func:`carry` resolves them, because a
request-bound proxy (Flask's ``current_user``, Django's ``request.user``) means nothing
in a worker.

What happens when no actor is known is a policy (:class:`NoActorPolicy`): record the
event as a named system actor, or refuse it (:class:`MissingActor`).
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, ParamSpec, TypeVar, cast

from sealtrail._exceptions import SealtrailError

__all__ = [
    "AuditContext",
    "ContextError",
    "MissingActor",
    "NoActorPolicy",
    "actor_or_policy",
    "apply_context",
    "carry",
    "context",
    "current_context",
    "resolve",
    "restore",
    "wrap",
]

P = ParamSpec("P")
R = TypeVar("R")


class ContextError(SealtrailError):
    """The audit context cannot supply a field: a callable given for it raised, or
    returned something that is not a valid value for that field."""


class MissingActor(ContextError):
    """An event was recorded with no actor while the policy is
    :meth:`NoActorPolicy.refuse`: who did it is unknown, and the policy says an audit
    trail must not guess."""


# The named fields, in the order they are documented. Each may be a value or a callable
# returning one (resolved at record time).
_NAMED: Final = (
    "actor",
    "on_behalf_of",
    "ip",
    "user_agent",
    "request_id",
    "trace_id",
    "tenant",
    "reason",
)
_SOURCE_FIELDS: Final = ("ip", "user_agent", "request_id", "trace_id")
# Extra fields that are envelope fields themselves go where the envelope has them; every
# other extra goes under ``data``.
_EXTRA_TO_SOURCE: Final = frozenset({"service", "host"})
_EXTRA_TO_TOP: Final = frozenset({"subject"})

_EMPTY_EXTRA: Final[Mapping[str, object]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class AuditContext:
    """An immutable snapshot of the audit context.

    Field values are strings (``actor`` may also be a mapping such as ``{"id": "42",
    "type": "user"}``), ``None`` when not set, or callables not yet resolved (see
    :func:`resolve`). ``extra`` holds the keyword arguments beyond the named fields.
    Snapshots pickle, and convert to and from plain dicts (:meth:`to_dict`,
    :meth:`from_dict`), with callables resolved at that moment.
    """

    actor: object = None
    on_behalf_of: object = None
    ip: object = None
    user_agent: object = None
    request_id: object = None
    trace_id: object = None
    tenant: object = None
    reason: object = None
    extra: Mapping[str, object] = field(default_factory=lambda: _EMPTY_EXTRA)
    # Computed once: every recorded event asks, and snapshots never change.
    _is_set: bool = field(init=False, repr=False, compare=False)
    _is_resolved: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One pass, no generators: a snapshot is built for every context entered.
        is_set = bool(self.extra)
        resolved = True
        for value in (
            self.actor,
            self.on_behalf_of,
            self.ip,
            self.user_agent,
            self.request_id,
            self.trace_id,
            self.tenant,
            self.reason,
            *self.extra.values(),
        ):
            if value is not None:
                is_set = True
                if resolved and callable(value):
                    resolved = False
        object.__setattr__(self, "_is_set", is_set)
        object.__setattr__(self, "_is_resolved", resolved)

    def __bool__(self) -> bool:
        return self._is_set

    @property
    def is_resolved(self) -> bool:
        """True when no field is a callable still to be called."""
        return self._is_resolved

    def merged(self, values: Mapping[str, object]) -> AuditContext:
        """A new snapshot with ``values`` on top (named fields and extras alike); ``None``
        values leave the field as it was."""
        named: dict[str, object] = {}
        extra: dict[str, object] = {}
        for key, value in values.items():
            if value is None:
                continue
            if key in _NAMED:
                named[key] = value
            else:
                extra[key] = value
        if not named and not extra:
            return self
        merged = {name: named.get(name, getattr(self, name)) for name in _NAMED}
        combined = MappingProxyType({**self.extra, **extra}) if extra else self.extra
        return AuditContext(**merged, extra=combined)

    def to_dict(self) -> dict[str, object]:
        """A flat plain dict of the fields that are set, callables resolved now: what a
        job queue can serialise (``actor`` is a string or a plain dict)."""
        snapshot = resolve(self)
        out: dict[str, object] = {}
        for name in _NAMED:
            value = getattr(snapshot, name)
            if value is not None:
                out[name] = dict(value) if isinstance(value, Mapping) else value
        out.update(snapshot.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> AuditContext:
        """The inverse of :meth:`to_dict`, with the same checks as :func:`context`."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a carried context must be a mapping, got {type(data).__name__}")
        return _EMPTY.merged(_checked_values(dict(data)))

    def __reduce__(self) -> tuple[Callable[[Mapping[str, object]], AuditContext], tuple[Any]]:
        # A mappingproxy does not pickle, and a lambda must not travel: pickle the
        # resolved, plain form.
        return (AuditContext.from_dict, (self.to_dict(),))


_EMPTY: Final = AuditContext()
_CURRENT: ContextVar[AuditContext] = ContextVar("sealtrail.context", default=_EMPTY)
# Tokens of the scopes entered in this context, innermost last. Kept in a context variable
# rather than on the scope object, so one scope object entered concurrently from several
# threads or tasks still restores each of them correctly.
_TOKENS: ContextVar[tuple[Token[AuditContext], ...]] = ContextVar(
    "sealtrail.context.tokens", default=()
)


def _checked_values(values: dict[str, object]) -> dict[str, object]:
    """Type checks at the point the context is set, where a mistake is easy to find."""
    for key, value in list(values.items()):
        if not isinstance(key, str) or not key:
            raise TypeError(f"context field names must be non-empty strings, got {key!r}")
        if value is None or callable(value):
            continue
        if key == "actor":
            if isinstance(value, Mapping):
                values[key] = _checked_actor_mapping(value)
                continue
            if not isinstance(value, str):
                raise TypeError(
                    "actor must be a string id, a mapping such as {'id': ..., 'type': ...}, "
                    f"or a callable returning one, got {type(value).__name__}"
                )
            if not value:
                raise ValueError("actor must not be empty; leave it out (None) instead")
        elif key == "ip" and isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            values[key] = str(value)
        elif key in _NAMED and not isinstance(value, str):
            raise TypeError(
                f"{key} must be a string or a callable returning one, got {type(value).__name__}"
            )
    return values


def _checked_actor_mapping(value: Mapping[object, object]) -> Mapping[str, object]:
    for key in value:
        if not isinstance(key, str):
            raise TypeError(f"actor field names must be strings, got {key!r}")
    # Copied: the snapshot must not change when the caller's dict does.
    return MappingProxyType(dict(cast(Mapping[str, object], value)))


def current_context() -> AuditContext:
    """The audit context in effect here, as an immutable snapshot, callables unresolved."""
    return _CURRENT.get()


def _resolve_value(name: str, value: object) -> object:
    if not callable(value):
        return value
    try:
        result = value()
    except Exception as exc:
        raise ContextError(
            f"the audit context could not resolve {name!r}: the callable given for it "
            f"raised {type(exc).__name__}: {exc}"
        ) from exc
    if result is None or (name == "actor" and result == ""):
        # None (or an empty id) from an actor callable: nobody is authenticated yet.
        return None
    if callable(result):
        raise ContextError(f"the callable given for {name!r} returned another callable")
    if inspect.isawaitable(result):
        if hasattr(result, "close"):
            result.close()  # no "coroutine was never awaited" warning
        raise ContextError(
            f"the callable given for {name!r} returned an awaitable; it must return "
            "the value itself (resolve asynchronous lookups before recording)"
        )
    try:
        checked = _checked_values({name: result})[name]
    except (TypeError, ValueError) as exc:
        raise ContextError(f"the callable given for {name!r} returned a bad value: {exc}") from None
    return checked


def resolve(snapshot: AuditContext) -> AuditContext:
    """The snapshot with every callable called and replaced by its result.

    Raises :class:`ContextError` (naming the field) when a callable raises or returns a
    value of the wrong type. A callable returning ``None`` leaves the field unset.
    """
    if snapshot.is_resolved:
        return snapshot
    named = {name: _resolve_value(name, getattr(snapshot, name)) for name in _NAMED}
    extra = {key: _resolve_value(key, value) for key, value in snapshot.extra.items()}
    return AuditContext(
        **named,
        extra=MappingProxyType({k: v for k, v in extra.items() if v is not None}),
    )


class _Scope:
    """What :func:`context` and :func:`restore` return: a context manager (sync and
    async) and a decorator (sync and async functions)."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, object] | AuditContext) -> None:
        # A mapping is merged on top of the context in effect when the scope is entered;
        # a snapshot (from restore) replaces it.
        self._values = values

    def _target(self) -> AuditContext:
        if isinstance(self._values, AuditContext):
            return self._values
        return _CURRENT.get().merged(self._values)

    def __enter__(self) -> AuditContext:
        snapshot = self._target()
        token = _CURRENT.set(snapshot)
        _TOKENS.set((*_TOKENS.get(), token))
        return snapshot

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tokens = _TOKENS.get()
        if not tokens:
            raise RuntimeError(
                "sealtrail context exited in a different thread or task than it was entered"
            )
        _TOKENS.set(tokens[:-1])
        _CURRENT.reset(tokens[-1])

    async def __aenter__(self) -> AuditContext:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            # Between two yields the scope would stay set in the consumer's context and
            # leak into whatever it records; contextvars has no per-generator scope.
            raise TypeError(
                "sealtrail.context cannot decorate a generator; set the context around "
                "the code that consumes it instead"
            )
        values = self._values
        if inspect.iscoroutinefunction(fn):
            async_fn = cast(Callable[..., Awaitable[object]], fn)

            @functools.wraps(fn)
            async def run_async(*args: object, **kwargs: object) -> object:
                with _Scope(values):
                    return await async_fn(*args, **kwargs)

            return cast(Callable[P, R], run_async)

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with _Scope(values):
                return fn(*args, **kwargs)

        return run


def context(
    *,
    actor: object = None,
    on_behalf_of: object = None,
    ip: object = None,
    user_agent: object = None,
    request_id: object = None,
    trace_id: object = None,
    tenant: object = None,
    reason: object = None,
    **extra: object,
) -> _Scope:
    """Set audit context fields for a block or a function; nested contexts merge.

    Use it as ``with sealtrail.context(...):``, ``async with``, or as a decorator
    (``@sealtrail.context(actor="system:nightly")``) on sync and async functions. Inside,
    fields given here override the enclosing context's (inner wins) and ``None`` leaves a
    field as it was; on exit, normal or by exception, the enclosing context is back.

    ``actor`` is an id string, a mapping (``{"id": "42", "type": "user"}``) or a
    callable returning either (or ``None`` when nobody is authenticated yet); any other
    field may be a callable too. ``ip`` also accepts :mod:`ipaddress` objects. Extra
    keyword arguments land in the event's ``data`` (``subject`` at the top level,
    ``service`` and ``host`` under ``source``); see :func:`apply_context`.
    """
    values: dict[str, object] = {
        "actor": actor,
        "on_behalf_of": on_behalf_of,
        "ip": ip,
        "user_agent": user_agent,
        "request_id": request_id,
        "trace_id": trace_id,
        "tenant": tenant,
        "reason": reason,
        **extra,
    }
    return _Scope(_checked_values(values))


def carry() -> AuditContext:
    """The current context, resolved, to hand to a background job.

    The result pickles (and :meth:`AuditContext.to_dict` gives a plain dict for JSON job
    payloads); the worker runs the job inside :func:`restore`. Callables are resolved
    here, in the request, because request-bound objects are gone in the worker.
    """
    return resolve(_CURRENT.get())


def restore(snapshot: AuditContext | Mapping[str, object]) -> _Scope:
    """Run a block (or decorated function) with exactly the carried context.

    It replaces the context instead of merging with it: a job must carry the actor of the
    request that enqueued it, never inherit one from whatever the worker ran before.
    ``snapshot`` is an :class:`AuditContext` or the dict from
    :meth:`AuditContext.to_dict`.
    """
    if not isinstance(snapshot, AuditContext):
        snapshot = AuditContext.from_dict(snapshot)
    return _Scope(snapshot)


def wrap(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` bound to the current context, for a thread, a thread pool or
    ``loop.run_in_executor`` (which, unlike ``asyncio.to_thread``, does not copy it).

    The context is resolved now (see :func:`carry`). Unlike ``copy_context().run``, the
    wrapped function may run many times at once (``executor.map``).
    """
    return restore(carry())(fn)


# --------------------------------------------------------------------------------------
# From context to event


@dataclass(frozen=True, slots=True)
class NoActorPolicy:
    """What an event without an actor becomes.

    :meth:`system` records it as the system actor ``system:<name>`` (for jobs, cron,
    migrations, where no person acts), :meth:`anonymous` as an anonymous actor (for
    public endpoints), and :meth:`refuse` raises :class:`MissingActor`, so a code path
    that forgot to set the context fails in tests instead of writing "nobody" into the
    trail.
    """

    mode: Literal["system", "anonymous", "refuse"]
    name: str = ""

    @classmethod
    def system(cls, name: str) -> NoActorPolicy:
        if not isinstance(name, str) or not name or not name.isprintable() or " " in name:
            raise ValueError(f"a system actor name must be a non-empty word, got {name!r}")
        return cls("system", name)

    @classmethod
    def anonymous(cls) -> NoActorPolicy:
        return cls("anonymous")

    @classmethod
    def refuse(cls) -> NoActorPolicy:
        return cls("refuse")


def _actor_object(value: object) -> dict[str, object]:
    if isinstance(value, Mapping):
        return dict(value)
    return {"id": value}


def actor_or_policy(
    snapshot: AuditContext, policy: NoActorPolicy | None, *, action: str | None = None
) -> dict[str, object] | None:
    """The envelope's ``actor`` object for this context, or what ``policy`` says when
    there is no actor (``None``: no actor object, unless ``on_behalf_of`` is set).

    ``on_behalf_of`` from the context is added unless the actor mapping has its own.
    Callables are resolved; ``action`` only makes the :class:`MissingActor` message
    clearer.
    """
    snapshot = resolve(snapshot)
    actor: dict[str, object] | None
    if snapshot.actor is not None:
        actor = _actor_object(snapshot.actor)
    elif policy is None:
        actor = None
    elif policy.mode == "system":
        actor = {"id": f"system:{policy.name}", "type": "system"}
    elif policy.mode == "anonymous":
        actor = {"type": "anonymous"}
    else:
        what = f"the event {action!r}" if action else "an event"
        raise MissingActor(
            f"{what} has no actor and the audit context sets none; set one with "
            "sealtrail.context(actor=...) or choose NoActorPolicy.system(name)"
        )
    if snapshot.on_behalf_of is not None:
        if actor is None:
            # Someone unidentified acting for a known person: record both facts.
            actor = {"type": "anonymous"}
        actor.setdefault("on_behalf_of", snapshot.on_behalf_of)
    return actor


def apply_context(
    event: Mapping[str, object],
    snapshot: AuditContext | None = None,
    *,
    policy: NoActorPolicy | None = None,
) -> dict[str, object]:
    """A new event with its envelope fields filled from the context, never overriding
    what the event sets itself; the input is not modified.

    A field the event sets to ``None`` counts as not set.

    * ``actor`` (with ``on_behalf_of``) when the event has no actor; an event that names
      its own actor keeps it whole, so the context's ``on_behalf_of`` is never attached
      to somebody else. With no actor anywhere, ``policy`` decides.
    * ``ip``, ``user_agent``, ``request_id``, ``trace_id`` (and the extras ``service``,
      ``host``) into ``source``, key by key.
    * ``tenant``, ``reason`` (and the extra ``subject``) at the top level.
    * every other extra into ``data``, key by key.

    ``snapshot`` defaults to :func:`current_context`. Values are not validated here:
    the event still goes through :func:`~sealtrail.event.prepare_event`.
    """
    snapshot = resolve(_CURRENT.get() if snapshot is None else snapshot)
    out = dict(event)
    if out.get("actor") is None:
        action = out.get("action")
        actor = actor_or_policy(
            snapshot, policy, action=action if isinstance(action, str) else None
        )
        if actor is not None:
            out["actor"] = actor

    source = {name: getattr(snapshot, name) for name in _SOURCE_FIELDS}
    data: dict[str, object] = {}
    for key, value in snapshot.extra.items():
        if key in _EXTRA_TO_SOURCE:
            source[key] = value
        elif key in _EXTRA_TO_TOP:
            if out.get(key) is None:
                out[key] = value
        else:
            data[key] = value
    _fill(out, "source", {k: v for k, v in source.items() if v is not None})
    _fill(out, "data", data)
    for name in ("tenant", "reason"):
        value = getattr(snapshot, name)
        if value is not None and out.get(name) is None:
            out[name] = value
    return out


def _fill(event: dict[str, object], name: str, values: dict[str, object]) -> None:
    """Add ``values`` to the object ``event[name]`` without overriding its keys."""
    if not values:
        return
    current = event.get(name)
    if current is None:
        event[name] = values
    elif isinstance(current, Mapping):
        event[name] = {**values, **current}
    # Anything else is invalid; leave it for prepare_event to report.
