"""Middleware that opens the audit context for each web request: ASGI and WSGI.

Both set :func:`sealtrail.context` around the application for the request's duration, so
every event recorded while serving it carries the client IP, user agent, request id and
trace id, and the actor once the framework has authenticated (``actor`` is a callable of
the request, resolved when an event is recorded, because authentication usually runs
*inside* the app, after this middleware).

The client IP is the one thing here an attacker can lie about. ``X-Forwarded-For`` is a
header anyone can send, so it is believed only as far as a chain of *trusted* proxies goes:
starting from the address that actually connected, each hop is accepted while the hop
that reported it is a configured trusted proxy; the first address reported by a trusted
proxy that is not itself trusted is the client. With no trusted proxies configured, the
header is ignored and the connecting address is the client.

The trace id comes from the current OpenTelemetry span when the ``opentelemetry`` API is
installed and a span is recording, else from a valid W3C ``traceparent`` header.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from sealtrail.context import context

__all__ = ["ASGIMiddleware", "TrustedProxies", "WSGIMiddleware", "client_ip", "trace_id"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_REQUEST_ID_HEADERS = ("x-request-id", "x-correlation-id")
_MAX_HEADER = 256


class TrustedProxies:
    """The networks whose ``X-Forwarded-For`` hops are believed."""

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in networks
        )

    def __contains__(self, address: str) -> bool:
        ip = _parse_ip(address)
        return ip is not None and any(ip in net for net in self.networks)


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[v6]:port"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "v4:port"
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_ip(
    peer: str | None, forwarded_for: Sequence[str], trusted: TrustedProxies
) -> str | None:
    """The client address: ``peer`` (who connected), or, walking ``X-Forwarded-For`` from the
    right while each reporter is a trusted proxy, the first untrusted hop. Malformed hops
    stop the walk (the last believed address is used)."""
    current = _parse_ip(peer) if peer else None
    if current is None:
        return None
    hops = [h for header in forwarded_for for h in header.split(",") if h.strip()]
    while hops and str(current) in trusted:
        reported = _parse_ip(hops.pop())
        if reported is None:
            break
        current = reported
    return str(current)


def trace_id(traceparent: str | None) -> str | None:
    """The current OpenTelemetry trace id, or the one in a valid ``traceparent`` header."""
    try:
        from opentelemetry import trace

        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            return f"{span_context.trace_id:032x}"
    except ImportError:
        pass
    if traceparent:
        match = _TRACEPARENT.match(traceparent.strip().lower())
        if match and match.group(1) != "0" * 32:
            return match.group(1)
    return None


def _clean(value: str | None) -> str | None:
    """Header values go into the trail as data: bounded, and only if present."""
    if not value:
        return None
    return value[:_MAX_HEADER]


ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


class ASGIMiddleware:
    """``app = ASGIMiddleware(app, actor=lambda scope: ..., trusted_proxies=["10.0.0.0/8"])``

    For Starlette/FastAPI: ``app.add_middleware(ASGIMiddleware, actor=..., ...)``. ``actor``
    gets the ASGI scope (where auth middleware put ``scope["user"]``) and is called when an
    event is recorded, not when the request starts.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        actor: Callable[[MutableMapping[str, Any]], Any] | None = None,
        trusted_proxies: Iterable[str] = (),
        tenant: Callable[[MutableMapping[str, Any]], Any] | None = None,
    ) -> None:
        self.app = app
        self.actor = actor
        self.tenant = tenant
        self.trusted = TrustedProxies(trusted_proxies)

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _asgi_headers(scope.get("headers") or [])
        client = scope.get("client")
        peer = str(client[0]) if client else None
        fields = _request_fields(peer, headers, self.trusted)
        _late(fields, "actor", self.actor, scope)
        _late(fields, "tenant", self.tenant, scope)
        with context(**fields):
            await self.app(scope, receive, send)


class WSGIMiddleware:
    """``app.wsgi_app = WSGIMiddleware(app.wsgi_app, actor=lambda environ: ..., ...)`` for
    Flask; for Django wrap the WSGI application in ``wsgi.py``. ``actor`` gets the WSGI
    environ and is called when an event is recorded."""

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        *,
        actor: Callable[[Mapping[str, Any]], Any] | None = None,
        trusted_proxies: Iterable[str] = (),
        tenant: Callable[[Mapping[str, Any]], Any] | None = None,
    ) -> None:
        self.app = app
        self.actor = actor
        self.tenant = tenant
        self.trusted = TrustedProxies(trusted_proxies)

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        headers = {
            key[5:].lower().replace("_", "-"): [str(value)]
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        fields = _request_fields(environ.get("REMOTE_ADDR"), headers, self.trusted)
        _late(fields, "actor", self.actor, environ)
        _late(fields, "tenant", self.tenant, environ)
        # The body iterable may be consumed after this returns (streaming responses), so
        # the context is held until the server closes it.
        scope = context(**fields)
        scope.__enter__()
        try:
            body = self.app(environ, start_response)
        except BaseException:
            scope.__exit__(None, None, None)
            raise
        return _ClosingIterable(body, scope)


class _ClosingIterable:
    def __init__(self, body: Iterable[bytes], scope: Any) -> None:
        self.body = body
        self.scope = scope

    def __iter__(self) -> Any:
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.scope.__exit__(None, None, None)


def _late(fields: dict[str, Any], name: str, get: Callable[[Any], Any] | None, req: Any) -> None:
    """A field resolved when an event is recorded (authentication runs after us)."""
    if get is not None:
        fields[name] = lambda: get(req)


def _asgi_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in raw:
        out.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return out


def _request_fields(
    peer: str | None, headers: Mapping[str, list[str]], trusted: TrustedProxies
) -> dict[str, Any]:
    def first(name: str) -> str | None:
        values = headers.get(name)
        return values[0] if values else None

    request_id = next((first(h) for h in _REQUEST_ID_HEADERS if first(h)), None)
    fields: dict[str, Any] = {
        "ip": client_ip(peer, headers.get("x-forwarded-for", []), trusted),
        "user_agent": _clean(first("user-agent")),
        "request_id": _clean(request_id),
        "trace_id": trace_id(first("traceparent")),
    }
    return {k: v for k, v in fields.items() if v is not None}
