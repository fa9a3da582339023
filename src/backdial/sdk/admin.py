"""Tiny admin endpoint for a running ``Service`` (``serve --admin HOST:PORT``).

``GET /v1/sessions`` returns ``{"target", "open", "in_flight", "dial_failures"}``;
``PUT /v1/sessions`` with a body holding an integer (or ``{"target": N}``)
sets the target.  It runs on the SDK's own HTTP core, bound to loopback.
Loopback is shared by every container of a pod and reachable from a browser, so
a PUT that looks browser-borne (a ``Host`` that is not an address, or any
``Origin``) is refused (``backdial.adminauth``).
"""

from __future__ import annotations

import json

from backdial.adminauth import browser_refusal

from .asgitypes import ASGIApp, Receive, Scope, Send
from .service import Service

_JSON = [(b"content-type", b"application/json")]
_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]


async def _reply(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _body(receive: Receive, limit: int = 4096) -> bytes:
    data = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return data
        chunk: bytes = message.get("body", b"")
        data += chunk
        if len(data) > limit or not message.get("more_body", False):
            return data


def _parse_target(body: bytes) -> int:
    text = body.strip()
    value: object = json.loads(text) if text else None
    if isinstance(value, dict):
        value = value.get("target")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100_000:
        raise ValueError('body must be an integer 0..100000 or {"target": N}')
    return value


def admin_app(service: Service) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan of its own
        path, method = scope["path"], scope["method"]
        if path == "/healthz":
            await _reply(send, 200, b"ok\n", _TEXT)
        elif path != "/v1/sessions":
            await _reply(send, 404, b"not found\n", _TEXT)
        elif method == "GET":
            await _reply(send, 200, json.dumps(service.snapshot()).encode() + b"\n", _JSON)
        elif method == "PUT":
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            refusal = browser_refusal(headers, frozenset())
            if refusal is not None:
                await _reply(send, refusal.status, f"{refusal.reason}\n".encode(), _TEXT)
                return
            try:
                target = _parse_target(await _body(receive))
            except ValueError as exc:
                await _reply(send, 400, f"{exc}\n".encode(), _TEXT)
                return
            service.set_target(target)
            await _reply(send, 200, json.dumps(service.snapshot()).encode() + b"\n", _JSON)
        else:
            await _reply(send, 405, b"method not allowed\n", [*_TEXT, (b"allow", b"GET, PUT")])

    return app
