"""``backdial bridge``: serve an unmodified HTTP/1.1 app over dialed sessions.

The bridge is an ASGI app run by the ordinary ``Service``, so registration,
capacity changes, drain and reconnect are exactly those of ``serve``.  Each
session owns at most one kept-alive upstream connection (kept in the
session's ``ConnectionContext`` and closed with it), so the app sees as many
connections as the declared capacity and never a connection per request.

Failure handling: if the upstream fails before any response byte, the
session answers 502 and stays usable.  A request without a body whose
*reused* upstream connection turned out to be closed (the app's keep-alive
timeout raced with us) is retried once on a fresh connection; nothing else
is retried.  A failure after the response started aborts the session, which
the service then replaces.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from backdial.http1 import HOP_BY_HOP, LAST_CHUNK, chunk, connection_tokens

from .appconn import AppConnection, AppConnectionError
from .asgitypes import Receive, Scope, Send
from .connection import ConnectionContext
from .lifespan import acknowledge_lifespan

log = logging.getLogger("backdial.sdk")

# Hop-by-hop fields, plus Expect: the bridge buffers nothing the app would have to ask for.
_HOP = HOP_BY_HOP | {b"expect"}
_KEY = "backdial.bridge.upstream"
_BAD_GATEWAY = b"Bad Gateway\n"


def _strip_hop(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop fields and those Connection names (names are lower-case here)."""
    named = connection_tokens([v for n, v in headers if n == b"connection"])
    return [(n, v) for n, v in headers if n not in _HOP and n not in named]


def request_head(scope: Scope) -> tuple[bytes, bool]:
    """The upstream request head for *scope*, and whether the body is sent chunked."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    chunked = any(n == b"transfer-encoding" for n, _ in headers)
    target = scope["raw_path"]
    if scope["query_string"]:
        target += b"?" + scope["query_string"]
    lines = [scope["method"].encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in _strip_hop(headers):
        if chunked and name == b"content-length":
            continue  # never send both framings
        lines += (name, b": ", value, b"\r\n")
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), chunked


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class Bridge:
    """ASGI app relaying every request to ``target`` (``http://HOST:PORT``)."""

    def __init__(self, target: str, connect_timeout: float = 5.0) -> None:
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"bridge target {target!r}: expected http://HOST:PORT")
        self.target = target
        self.host = parts.hostname
        self.port = parts.port or 80
        self.connect_timeout = connect_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await acknowledge_lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"unsupported scope type {scope['type']!r}")
        ctx: ConnectionContext | None = scope.get("extensions", {}).get("backdial.connection")
        head, chunked = request_head(scope)
        has_body = _has_body(scope)
        retryable = not has_body
        for _attempt in range(2):
            conn = await self._connection(ctx)
            if conn is None:
                await _error(send, 502)
                return
            reused = conn.requests > 0
            try:
                conn.begin(head, scope["method"] == "HEAD")
                if has_body:
                    await _send_body(conn, receive, chunked)
                status, headers = await conn.response_head()
            except AppConnectionError as exc:
                self._forget(ctx, conn)
                if reused and retryable and conn.received == 0:
                    continue  # stale keep-alive connection: one fresh try
                log.warning("upstream %s failed before responding: %s", self.target, exc)
                await _error(send, 502)
                return
            await self._relay(conn, status, headers, send)
            if not conn.reusable:
                self._forget(ctx, conn)
            elif ctx is None:
                conn.close()
            return
        await _error(send, 502)

    async def _connection(self, ctx: ConnectionContext | None) -> AppConnection | None:
        conn = ctx.data.get(_KEY) if ctx is not None else None
        if isinstance(conn, AppConnection) and not conn.closed:
            return conn
        try:
            conn = await AppConnection.open(self.host, self.port, self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot connect to upstream %s: %s", self.target, exc)
            return None
        if ctx is not None:
            ctx.data[_KEY] = conn
            ctx.on_close(conn.close)  # the upstream connection lives as long as the session
        return conn

    @staticmethod
    def _forget(ctx: ConnectionContext | None, conn: AppConnection) -> None:
        conn.close()
        if ctx is not None and ctx.data.get(_KEY) is conn:
            del ctx.data[_KEY]

    @staticmethod
    async def _relay(
        conn: AppConnection, status: int, headers: list[tuple[bytes, bytes]], send: Send
    ) -> None:
        await send(
            {"type": "http.response.start", "status": status, "headers": _strip_hop(headers)}
        )
        while True:
            # Raises AppConnectionError mid-body: the app fails after start and the
            # core aborts the session, which is the only honest signal left.
            data, complete = await conn.read_body()
            await send({"type": "http.response.body", "body": data, "more_body": not complete})
            if complete:
                return


async def _send_body(conn: AppConnection, receive: Receive, chunked: bool) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise AppConnectionError("session closed while relaying the request body")
        data = message.get("body", b"")
        more = message.get("more_body", False)
        if chunked:
            if data:
                conn.write(chunk(data))
            if not more:
                conn.write(LAST_CHUNK)
        elif data:
            conn.write(data)
        await conn.drain()
        if not more:
            return


async def _error(send: Send, status: int) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": _BAD_GATEWAY})
