"""A small HTTP/1.1 server for admin endpoints (metrics, health, state, routes).

Admin traffic is rare and never on the request path, so this favours
simplicity: ``asyncio.start_server``, one request per connection, bodies read
by Content-Length up to a small limit.  On a UNIX socket the peer's uid is
checked when the connection is accepted (``uids``), and requests say they came
that way (``via_unix``), which ``backdial.adminauth`` treats as authenticated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from backdial.adminauth import Denial
from backdial.trust import Uids, admitted, bind_unix

log = logging.getLogger("backdial.admin")

MAX_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class AdminRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased
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


Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]
_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


async def _serve_one(
    handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, via_unix: bool
) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if length > MAX_BODY:
            resp = AdminResponse.text(413, "body too large\n")
        else:
            body = await asyncio.wait_for(reader.readexactly(length), 10) if length else b""
            url = urlsplit(target)
            req = AdminRequest(
                method.upper(), url.path, parse_qs(url.query), body, headers, via_unix
            )
            try:
                resp = await handler(req)
            except Exception:  # an admin bug must not take the process down
                log.exception("admin handler failed for %s %s", method, url.path)
                resp = AdminResponse.text(500, "internal error\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
        resp = AdminResponse.text(400, "bad request\n")
    except ConnectionError:
        writer.close()
        return
    reason = _REASONS.get(resp.status, "Status")
    extra = "".join(f"{name}: {value}\r\n" for name, value in resp.headers)
    writer.write(
        f"HTTP/1.1 {resp.status} {reason}\r\nContent-Type: {resp.content_type}\r\n"
        f"Content-Length: {len(resp.body)}\r\n{extra}Connection: close\r\n\r\n".encode()
        + resp.body
    )
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


async def start_admin(
    host: str, port: int | str, handler: Handler, uids: Uids | None = None
) -> asyncio.Server:
    """Serve *handler* on TCP HOST:PORT, or on a UNIX socket when *host* is ``unix``.

    With *uids*, the UNIX socket is created with the mode they call for and a peer
    whose uid is not allowed is disconnected unanswered.
    """

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_one(handler, reader, writer, False)

    async def on_unix_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if uids is not None and (sock is None or not admitted(sock, uids)[0]):
            log.warning("admin socket %s: refused a peer whose uid is not allowed", port)
            writer.close()
            return
        await _serve_one(handler, reader, writer, uids is not None)

    if host == "unix":
        if uids is None:
            return await asyncio.start_unix_server(on_unix_client, str(port))
        sock = bind_unix(Path(str(port)), uids.mode())
        return await asyncio.start_unix_server(on_unix_client, sock=sock)
    return await asyncio.start_server(on_client, host, port, reuse_address=True)
