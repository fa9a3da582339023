"""The raw-handler API: ``async def handler(req: Request) -> Response``.

For code that is not an ASGI app.  The handler gets the whole request (body
already read) and returns a whole response; it is adapted to ASGI so that it
runs on exactly the same HTTP core, sessions and drain logic as any app.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from .asgitypes import ASGIApp, Receive, Scope, Send
from .lifespan import acknowledge_lifespan


@dataclass(frozen=True, slots=True)
class Request:
    """One complete HTTP request.  Header names are lower-case."""

    method: str
    target: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    http_version: str = "1.1"

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header *name* (case-insensitive), or *default*."""
        lname = name.lower()
        for key, value in self.headers:
            if key == lname:
                return value
        return default


@dataclass(frozen=True, slots=True)
class Response:
    """One complete HTTP response; ``Content-Length`` is added by the core."""

    status: int = 200
    headers: Sequence[tuple[str, str]] | Mapping[str, str] = field(default_factory=tuple)
    body: bytes | str = b""

    def header_pairs(self) -> list[tuple[bytes, bytes]]:
        items = self.headers.items() if isinstance(self.headers, Mapping) else self.headers
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in items]

    def body_bytes(self) -> bytes:
        return self.body.encode("utf-8") if isinstance(self.body, str) else self.body


Handler = Callable[[Request], Awaitable[Response]]


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client disconnected while sending the body")
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def handler_app(handler: Handler) -> ASGIApp:
    """Wrap a raw handler as an ASGI app."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await acknowledge_lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"unsupported scope type {scope['type']!r}")
        query = scope["query_string"].decode("latin-1")
        raw_path = scope["raw_path"].decode("latin-1")
        request = Request(
            method=scope["method"],
            target=f"{raw_path}?{query}" if query else raw_path,
            path=scope["path"],
            query=query,
            headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]),
            body=await _read_body(receive),
            http_version=scope["http_version"],
        )
        response = await handler(request)
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": response.header_pairs(),
            }
        )
        await send({"type": "http.response.body", "body": response.body_bytes()})

    app.__backdial_raw_handler__ = handler  # type: ignore[attr-defined]
    return app


def is_raw_handler(obj: object) -> bool:
    """True for a callable taking exactly one positional argument (a raw handler)."""
    if not callable(obj):
        return False
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    has_varargs = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    return len(positional) == 1 and not has_varargs


def as_asgi(app_or_handler: Any) -> ASGIApp:
    """An ASGI app for either an ASGI 3 app or a raw handler."""
    if is_raw_handler(app_or_handler):
        return handler_app(cast(Handler, app_or_handler))
    if not callable(app_or_handler):
        raise TypeError(f"{app_or_handler!r} is neither an ASGI app nor a handler")
    return cast(ASGIApp, app_or_handler)
