"""Demo ASGI app used by ``backdial up``, the benchmarks and proxy tests.

No dependencies.  ``GET /`` is the benchmark path and does as little as
possible: two precomputed messages, no parsing.  Routes:

* ``GET /`` -> 200 ``hello from backdial``
* ``GET /delay?ms=N[&group=G]`` -> sleeps N ms (max 60000), then 200; requests
  naming a group are also counted per group in ``/stats``
* ``POST /echo`` -> the request body, with the request's content-type
* ``GET /stream?chunks=N&size=B`` -> chunked response, N chunks of B bytes
* ``GET /status/CODE`` -> a response with that status
* ``GET /stats`` -> ``{"requests", "in_flight", "max_concurrency", "groups"}``
  (``groups``: ``{G: {"in_flight", "max_concurrency"}}``); ``POST /stats/reset``
  zeroes the counters
* ``GET /whoami[?ms=N]`` -> ``{"instance", "pid", "client", "headers"}`` (what a
  proxy forwarded, and from which connection), optionally after sleeping N ms

``max_concurrency`` is the largest number of requests this process was
handling at the same time since start (or reset): the direct observation
of the capacity invariant.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any
from urllib.parse import parse_qs

from backdial.sdk.lifespan import acknowledge_lifespan

Message = dict[str, Any]

_HELLO = b"hello from backdial\n"
_TEXT = (b"content-type", b"text/plain; charset=utf-8")
_JSON = (b"content-type", b"application/json")
_HELLO_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [_TEXT, (b"content-length", b"%d" % len(_HELLO))],
}
_HELLO_BODY: Message = {"type": "http.response.body", "body": _HELLO}
_MAX_ECHO = 16 * 1024 * 1024


class Stats:
    __slots__ = ("groups", "in_flight", "max_concurrency", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.max_concurrency = 0
        self.groups: dict[str, list[int]] = {}  # group -> [in flight, max concurrency]

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_concurrency": self.max_concurrency,
            "groups": {
                g: {"in_flight": v[0], "max_concurrency": v[1]} for g, v in self.groups.items()
            },
        }


stats = Stats()


async def _respond(
    send: Any, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = (_TEXT,)
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


def _int_param(query: bytes, name: str, default: int, low: int, high: int) -> int:
    values = parse_qs(query.decode("latin-1")).get(name)
    try:
        value = int(values[0]) if values else default
    except ValueError:
        value = default
    return max(low, min(high, value))


async def app(scope: Any, receive: Any, send: Any) -> None:
    """The demo ASGI 3 application."""
    kind = scope["type"]
    if kind != "http":
        if kind == "lifespan":
            await acknowledge_lifespan(receive, send)
        return
    s = stats
    s.requests += 1
    s.in_flight += 1
    if s.in_flight > s.max_concurrency:
        s.max_concurrency = s.in_flight
    try:
        if scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            await send(_HELLO_START)
            await send(_HELLO_BODY)
        else:
            await _route(scope, receive, send)
    finally:
        s.in_flight -= 1


async def _route(scope: Any, receive: Any, send: Any) -> None:
    path: str = scope["path"]
    method: str = scope["method"]
    query: bytes = scope["query_string"]
    if path == "/delay":
        ms = _int_param(query, "ms", 100, 0, 60_000)
        group = parse_qs(query.decode("latin-1")).get("group", [""])[0][:64]
        counts = stats.groups.setdefault(group, [0, 0]) if group else None
        if counts is not None:
            counts[0] += 1
            counts[1] = max(counts)
        try:
            await asyncio.sleep(ms / 1000)
        finally:
            if counts is not None:
                counts[0] -= 1
        await _respond(send, 200, b"slept %d ms\n" % ms)
    elif path == "/echo" and method == "POST":
        await _echo(scope, receive, send)
    elif path == "/stream":
        await _stream(query, send)
    elif path.startswith("/status/"):
        code = path[len("/status/") :]
        if not code.isdigit() or not 200 <= int(code) <= 599:
            await _respond(send, 400, b"status must be 200..599\n")
        elif int(code) in (204, 304):
            await _respond(send, int(code), b"")
        else:
            await _respond(send, int(code), b"status %d\n" % int(code))
    elif path == "/stats" and method == "GET":
        await _respond(send, 200, json.dumps(stats.as_dict()).encode() + b"\n", (_JSON,))
    elif path == "/stats/reset" and method == "POST":
        stats.requests = 0
        stats.max_concurrency = stats.in_flight
        for counts in stats.groups.values():
            counts[1] = counts[0]
        await _respond(send, 200, json.dumps(stats.as_dict()).encode() + b"\n", (_JSON,))
    elif path == "/whoami":
        ms = _int_param(query, "ms", 0, 0, 60_000)
        if ms:  # optional fixed service time, so tests can measure fairness, not CPU speed
            await asyncio.sleep(ms / 1000)
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        body = {
            "instance": os.environ.get("BACKDIAL_INSTANCE") or str(os.getpid()),
            "pid": os.getpid(),
            "client": list(scope["client"]) if scope.get("client") else None,
            "headers": headers,
        }
        await _respond(send, 200, json.dumps(body).encode() + b"\n", (_JSON,))
    elif path in ("/echo", "/stats", "/stats/reset", "/"):
        await _respond(send, 405, b"method not allowed\n")
    else:
        await _respond(send, 404, b"not found\n")


async def _echo(scope: Any, receive: Any, send: Any) -> None:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_ECHO:
            await _respond(send, 413, b"body too large\n")
            return
        parts.append(chunk)
        if not message.get("more_body", False):
            break
    ctype = next(
        (v for k, v in scope["headers"] if k == b"content-type"), b"application/octet-stream"
    )
    await _respond(send, 200, b"".join(parts), ((b"content-type", ctype),))


async def _stream(query: bytes, send: Any) -> None:
    chunks = _int_param(query, "chunks", 10, 0, 100_000)
    size = _int_param(query, "size", 1024, 1, 1024 * 1024)
    await send({"type": "http.response.start", "status": 200, "headers": [_TEXT]})
    block = b"x" * (size - 1) + b"\n"
    for _ in range(chunks):
        await send({"type": "http.response.body", "body": block, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
