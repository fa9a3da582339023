"""Admin endpoints on the SDK's HTTP core: the request record, limits, errors, UNIX peers."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from pathlib import Path

import uvloop

from backdial.adminhttp import MAX_BODY, AdminRequest, AdminResponse, admin_get, start_admin
from backdial.trust import Uids

Seen = list[AdminRequest]


def _handler(seen: Seen):  # type: ignore[no-untyped-def]
    async def handle(req: AdminRequest) -> AdminResponse:
        seen.append(req)
        if req.path == "/boom":
            raise RuntimeError("a bug in a handler")
        return AdminResponse.of_json(200, {"path": req.path, "query": req.query})

    return handle


def _exchange(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(raw)
        out = b""
        while chunk := s.recv(65536):  # the server closes after one response
            out += chunk
    return out


def _run(coro):  # type: ignore[no-untyped-def]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def test_tcp_requests_limits_and_errors() -> None:
    seen: Seen = []

    async def main() -> list[bytes]:
        server = await start_admin("127.0.0.1", 0, _handler(seen))
        port = server.bound_port
        loop = asyncio.get_running_loop()
        try:
            return [
                await loop.run_in_executor(None, _exchange, port, raw)
                for raw in (
                    b"GET /v1/state?a=1&a=2 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
                    b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"POST /r HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
                    + b"x" * (MAX_BODY + 1),
                    b"NOT HTTP\r\n\r\n",
                )
            ]
        finally:
            server.close()

    ok, boom, big, bad = _run(main())
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close\r\n" in ok
    assert seen[0].query == {"a": ["1", "2"]} and seen[0].headers["x-a"] == "1, 2"
    assert not seen[0].via_unix  # TCP is never the authenticated channel
    assert boom.startswith(b"HTTP/1.1 500 ") and b"internal error" in boom
    assert big.startswith(b"HTTP/1.1 413 ")
    assert len(seen) == 2  # neither the oversized body nor the garbage reached the handler
    assert bad.startswith(b"HTTP/1.1 400 ")


def test_unix_socket_admits_by_peer_uid() -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="bd-"))
    seen: Seen = []

    async def main() -> tuple[tuple[int, bytes], Exception | None, int]:
        mine = run_dir / "mine.sock"
        others = run_dir / "others.sock"
        own = await start_admin("unix", str(mine), _handler(seen), Uids.own())
        other_uid = 4242 if os.getuid() != 4242 else 4343
        foreign = await start_admin(
            "unix", str(others), _handler(seen), Uids(frozenset({other_uid}))
        )
        try:
            answered = await admin_get(mine, "/metrics")
            refused: Exception | None = None
            try:
                await admin_get(others, "/metrics")
            except OSError as exc:
                refused = exc
            return answered, refused, os.stat(mine).st_mode & 0o777
        finally:
            own.close()
            foreign.close()

    (status, body), refused, mode = _run(main())
    assert status == 200 and b'"path": "/metrics"' in body
    assert seen[0].via_unix  # the kernel vouched for this peer
    assert refused is not None and len(seen) == 1  # the other socket answered nothing
    assert mode == 0o600
