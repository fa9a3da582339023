"""Small ASGI apps the CLI tests load by ``MODULE:APP`` in child processes."""

from __future__ import annotations

from typing import Any


async def failing_startup(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "database unreachable"})
        return
    raise RuntimeError("never served")


async def no_lifespan(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        raise RuntimeError("this app knows only http")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"plain"})


not_callable = 42
