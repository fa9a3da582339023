"""Admin endpoints (metrics, health, state, routes) on the SDK's HTTP/1.1 core.

Handlers are plain functions of an ``AdminRequest`` to an ``AdminResponse``, so
they are tested without sockets; ``start_admin`` serves one on TCP or on a UNIX
socket with the same llhttp-based server ``backdial serve`` uses (no second
HTTP implementation, no extra dependency in the data-plane processes;
``docs/architecture.md`` says why not aiohttp).  On a UNIX socket the peer's
uid is checked when the connection is accepted (``uids``), and requests say
they came that way (``via_unix``), which ``backdial.adminauth`` treats as
authenticated.  ``admin_get`` is the matching client for the sidecar's
supervisor, which asks its workers over their UNIX admin sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.registry import CollectorRegistry

from backdial.adminauth import Denial
from backdial.metrics import render
from backdial.sdk.appconn import AppConnection, AppConnectionError
from backdial.sdk.asgitypes import Receive, Scope, Send
from backdial.sdk.connection import ConnectionContext
from backdial.sdk.listen import ListenServer
from backdial.trust import Uids, admitted, bind_unix

log = logging.getLogger("backdial.admin")

MAX_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class AdminRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased; repeats joined
    via_unix: bool = False  # arrived on a UNIX socket whose peer uid was admitted

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass(frozen=True, slots=True)
class AdminResponse:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def denied(cls, denial: Denial) -> AdminResponse:
        extra = (("WWW-Authenticate", "Bearer"),) if denial.status == 401 else ()
        return cls(denial.status, f"{denial.reason}\n".encode(), "text/plain", extra)

    @classmethod
    def of_json(cls, status: int, data: Any) -> AdminResponse:
        return cls(status, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n")

    @classmethod
    def text(cls, status: int, text: str) -> AdminResponse:
        return cls(status, text.encode(), "text/plain; charset=utf-8")

    @classmethod
    def exposition(cls, reg: CollectorRegistry, req: AdminRequest) -> AdminResponse:
        """``/metrics``: *reg* in the format the scraper's ``Accept`` asks for."""
        body, content_type = render(reg, req.headers.get("accept", ""))
        return cls(200, body, content_type)


Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or None when it is over ``MAX_BODY`` (or the peer went away)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def admin_app(handler: Handler) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """*handler* as an ASGI app: one ``AdminRequest`` in, one ``AdminResponse`` out."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan of its own
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        context: ConnectionContext | None = scope["extensions"].get("backdial.connection")
        body = await _read_body(receive)
        if body is None:
            resp = AdminResponse.text(413, "body too large\n")
        else:
            req = AdminRequest(
                scope["method"],
                scope["path"],
                parse_qs(scope["query_string"].decode("latin-1")),
                body,
                headers,
                context is not None and context.admitted,
            )
            try:
                resp = await handler(req)
            except Exception:  # an admin bug must not take the process down
                log.exception("admin handler failed for %s %s", req.method, req.path)
                resp = AdminResponse.text(500, "internal error\n")
        # One request per connection, as admin clients expect: nothing idles open.
        fields = [(b"content-type", resp.content_type.encode("latin-1")), (b"connection", b"close")]
        fields += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers]
        await send({"type": "http.response.start", "status": resp.status, "headers": fields})
        await send({"type": "http.response.body", "body": resp.body})

    return app


async def start_admin(
    host: str, port: int | str, handler: Handler, uids: Uids | None = None
) -> ListenServer:
    """Serve *handler* on TCP HOST:PORT, or on a UNIX socket when *host* is ``unix``.

    With *uids*, the UNIX socket is created with the mode they call for and a peer
    whose uid is not allowed is disconnected unanswered.
    """
    app = admin_app(handler)
    if host != "unix":
        server = ListenServer(app, host, int(port), lifespan=False, backlog=128)
    else:
        path = Path(str(port))
        admit: Callable[[Any], bool] | None = None
        if uids is not None:

            def admit(sock: Any) -> bool:
                ok, uid = admitted(sock, uids)
                if not ok:
                    log.warning("admin socket %s: refused a peer with uid %d", path, uid)
                return ok

        sock = bind_unix(path, uids.mode() if uids is not None else 0o600)
        server = ListenServer(app, lifespan=False, backlog=128, sock=sock, admit=admit)
    await server.start()
    return server


async def admin_get(path: Path, target: str, timeout: float = 5.0) -> tuple[int, bytes]:  # noqa: ASYNC109
    """``GET target`` on a UNIX admin socket: (status, body); raises OSError when unreachable."""
    async with asyncio.timeout(timeout):
        conn = await AppConnection.open_unix(str(path), timeout)
        try:
            conn.begin(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode(), False)
            status, _ = await conn.response_head()
            parts: list[bytes] = []
            while True:
                data, complete = await conn.read_body()
                parts.append(data)
                if complete:
                    return status, b"".join(parts)
        except AppConnectionError as exc:
            raise OSError(str(exc)) from None
        finally:
            conn.close()
