"""The service the soak run talks to: records every request it processes, then answers.

``GET|POST /soak?id=ID[&ms=N]`` reads the whole body, appends ``ID METHOD`` to
``$SOAK_LOG_DIR/ids-<pid>.log`` (one ``write`` with ``O_APPEND``, so a line
survives a ``kill -9`` right after it), waits ``ms`` milliseconds, and answers
``{"id", "len", "crc", "pid"}``.  The soak driver compares what clients were
told with what services recorded: a non-idempotent request recorded twice is a
duplicate, an answer without a record (or with another request's id or body)
is a loss.
"""

from __future__ import annotations

import asyncio
import json
import os
import zlib
from typing import Any
from urllib.parse import parse_qs

_fd = -1


def _record(line: bytes) -> None:
    global _fd
    if _fd < 0:
        path = os.path.join(os.environ.get("SOAK_LOG_DIR", "."), f"ids-{os.getpid()}.log")
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, line)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    query = parse_qs(scope["query_string"].decode("latin-1"))
    rid = (query.get("id") or ["-"])[0]
    _record(f"{rid} {scope['method']}\n".encode())
    ms = int((query.get("ms") or ["0"])[0])
    if ms:
        await asyncio.sleep(ms / 1000)
    answer = {"id": rid, "len": len(body), "crc": zlib.crc32(body), "pid": os.getpid()}
    data = json.dumps(answer).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(data)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
