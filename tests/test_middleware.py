"""Per-request audit context from ASGI and WSGI middleware; spoofed client IPs are ignored."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sealtrail.context import current_context, resolve
from sealtrail.middleware import (
    ASGIMiddleware,
    TrustedProxies,
    WSGIMiddleware,
    client_ip,
    trace_id,
)

TRUSTED = TrustedProxies(["10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "xff", "want"),
    [
        ("203.0.113.5", [], "203.0.113.5"),  # direct client
        ("203.0.113.5", ["1.2.3.4"], "203.0.113.5"),  # spoofed header from an untrusted peer
        ("10.0.0.2", ["198.51.100.7"], "198.51.100.7"),  # one trusted proxy
        ("10.0.0.2", ["1.2.3.4, 198.51.100.7"], "198.51.100.7"),  # client forged a hop
        ("10.0.0.2", ["198.51.100.7, 10.0.0.9"], "198.51.100.7"),  # two trusted proxies
        ("10.0.0.2", ["10.0.0.9"], "10.0.0.9"),  # chain ends inside: last believed hop
        ("10.0.0.2", ["not-an-ip"], "10.0.0.2"),  # garbage stops the walk
        ("10.0.0.2", ["198.51.100.7:5555"], "198.51.100.7"),
        ("fd00::1", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("::ffff:10.0.0.2", ["198.51.100.7"], "198.51.100.7"),
        ("10.0.0.2", ["198.51.100.7\r\nX: y"], "10.0.0.2"),  # header injection
        (None, ["1.2.3.4"], None),
    ],
)
def test_client_ip_believes_only_trusted_proxies(
    peer: str | None, xff: list[str], want: str | None
) -> None:
    assert client_ip(peer, xff, TRUSTED) == want


def test_no_trusted_proxies_means_the_header_is_ignored() -> None:
    assert client_ip("10.0.0.2", ["198.51.100.7"], TrustedProxies()) == "10.0.0.2"


def test_trace_id_from_traceparent() -> None:
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id(f"00-{tid}-00f067aa0ba902b7-01") == tid
    assert trace_id("00-" + "0" * 32 + "-00f067aa0ba902b7-01") is None
    assert trace_id("garbage") is None
    assert trace_id(None) is None


def test_asgi_middleware_sets_and_clears_the_context() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["user"] = "alice"  # authentication happens inside the app, after us
        seen.append(resolve(current_context()).to_dict())

    wrapped = ASGIMiddleware(
        app, actor=lambda scope: scope.get("user"), trusted_proxies=["10.0.0.0/8"]
    )
    scope = {
        "type": "http",
        "client": ("10.0.0.2", 5000),
        "headers": [
            (b"x-forwarded-for", b"198.51.100.7"),
            (b"user-agent", b"curl/8"),
            (b"x-request-id", b"req-1"),
            (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ],
    }

    async def noop() -> dict[str, Any]:
        return {}

    async def send(message: Any) -> None:
        return None

    asyncio.run(wrapped(scope, noop, send))
    assert seen[0]["actor"] == "alice"
    assert seen[0]["ip"] == "198.51.100.7"
    assert seen[0]["user_agent"] == "curl/8" and seen[0]["request_id"] == "req-1"
    assert seen[0]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert current_context().actor is None  # cleared after the request


def test_asgi_concurrent_requests_do_not_mix() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.001)
        assert resolve(current_context()).request_id == scope["expect"]

    wrapped = ASGIMiddleware(app)

    async def main() -> None:
        async def noop() -> dict[str, Any]:
            return {}

        async def send(message: Any) -> None:
            return None

        await asyncio.gather(
            *(
                wrapped(
                    {
                        "type": "http",
                        "client": ("203.0.113.1", 1),
                        "expect": f"r{i}",
                        "headers": [(b"x-request-id", f"r{i}".encode())],
                    },
                    noop,
                    send,
                )
                for i in range(100)
            )
        )

    asyncio.run(main())


def test_wsgi_middleware_holds_the_context_until_the_body_is_closed() -> None:
    seen: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["app.user"] = "bob"
        start_response("200 OK", [])
        seen.append(resolve(current_context()).to_dict())
        return [b"ok"]

    wrapped = WSGIMiddleware(app, actor=lambda environ: environ.get("app.user"))
    environ = {
        "REMOTE_ADDR": "203.0.113.9",
        "HTTP_X_FORWARDED_FOR": "1.2.3.4",  # untrusted peer: ignored
        "HTTP_USER_AGENT": "Mozilla",
    }
    body = wrapped(environ, lambda status, headers: None)
    assert list(body) == [b"ok"]
    assert current_context().ip == "203.0.113.9"
    body.close()  # type: ignore[attr-defined]
    assert current_context().ip is None
    assert seen[0]["actor"] == "bob" and seen[0]["ip"] == "203.0.113.9"
    assert seen[0]["user_agent"] == "Mozilla"
