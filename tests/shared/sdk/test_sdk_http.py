"""The SDK's HTTP/1.1 core: sans-IO framing and the asyncio protocol on real sockets.

Served through ``ListenServer`` (the ``--listen`` path) because that shares
every line of HTTP code with the session path and is easy to reach with raw
sockets and httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from tests.shared.sdk.sdkpeer import run

from backdial import demo
from backdial.sdk import ListenServer
from backdial.sdk.framing import FramingError, ResponseFramer, asgi_target

pytestmark = pytest.mark.timeout(60)


# --- sans-IO -------------------------------------------------------------------


def _head(data: bytes) -> str:
    """The response head, lower-cased (field names are case-insensitive)."""
    return data.split(b"\r\n\r\n", 1)[0].decode().lower()


def test_framer_coalesces_head_and_known_body() -> None:
    f = ResponseFramer(is_head=False, keep_alive=True, http11=True)
    f.start(200, [(b"content-type", b"text/plain")])
    out = f.body(b"hello", False)
    assert out.startswith(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nDate: ")
    assert out.endswith(b"Content-Length: 5\r\n\r\nhello")
    assert f.finished and f.keep_alive


def test_framer_streams_chunked_and_close_for_http10() -> None:
    f = ResponseFramer(is_head=False, keep_alive=True, http11=True)
    f.start(200, [])
    first = f.body(b"abc", True)
    assert "transfer-encoding: chunked" in _head(first) and first.endswith(b"3\r\nabc\r\n")
    assert f.body(b"", True) == b""
    assert f.body(b"", False) == b"0\r\n\r\n"
    old = ResponseFramer(is_head=False, keep_alive=True, http11=False)
    old.start(200, [])
    data = old.body(b"abc", True)
    assert "connection: close" in _head(data) and not old.keep_alive


def test_framer_no_body_statuses_and_head() -> None:
    for status in (204, 304):
        f = ResponseFramer(is_head=False, keep_alive=True, http11=True)
        f.start(status, [])
        out = f.body(b"ignored", False)
        assert out.endswith(b"\r\n\r\n") and b"content-length" not in out.lower()
    h = ResponseFramer(is_head=True, keep_alive=True, http11=True)
    h.start(200, [(b"content-length", b"20")])
    out = h.body(b"x" * 20, False)
    assert out.endswith(b"Content-Length: 20\r\n\r\n")  # HEAD: the length GET would have


def test_framer_rejects_bad_headers_and_overlong_body() -> None:
    f = ResponseFramer(is_head=False, keep_alive=True, http11=True)
    with pytest.raises(FramingError):
        f.start(200, [(b"x-evil", b"a\r\nset-cookie: b")])
    with pytest.raises(FramingError):
        f.start(200, [(b"bad name", b"v")])
    g = ResponseFramer(is_head=False, keep_alive=True, http11=True)
    g.start(200, [(b"content-length", b"2")])
    with pytest.raises(FramingError):
        g.body(b"abc", False)
    short = ResponseFramer(is_head=False, keep_alive=True, http11=True)
    short.start(200, [(b"content-length", b"5"), (b"connection", b"keep-alive")])
    short.body(b"ab", False)
    assert not short.keep_alive, "a truncated body can only be signalled by closing"


def test_asgi_target() -> None:
    assert asgi_target(b"/a%20b/c?x=1&y=%20") == ("/a b/c", b"/a%20b/c", b"x=1&y=%20")
    assert asgi_target(b"http://h:1/p?q") == ("/p", b"/p", b"q")
    assert asgi_target(b"http://h:1?q") == ("/", b"/", b"q")
    assert asgi_target(b"/caf%C3%A9") == ("/café", b"/caf%C3%A9", b"")
    assert asgi_target(b"*") == ("*", b"*", b"")
    assert asgi_target(b"a/b") is None  # answered 400, as the sidecar does
    assert asgi_target(b"http://user@h/") is None


# --- on real sockets ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[ListenServer]:
    server = ListenServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(2)


async def raw_exchange(port: int, data: bytes, expect_close: bool = True) -> bytes:
    """Everything until the server closes; or (``expect_close=False``) one response with a
    Content-Length, after which the connection must still serve another request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        if expect_close:
            return await reader.read(-1)
        out = await _response(reader)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")  # kept alive: usable again
        assert (await _response(reader)).startswith(b"HTTP/1.1 ")
        return out
    finally:
        writer.close()


async def _response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


def test_keep_alive_over_one_connection_with_httpx() -> None:
    async def main() -> None:
        async with serving(demo.app) as server:
            limits = httpx.Limits(max_connections=1)
            url = f"http://127.0.0.1:{server.bound_port}"
            async with httpx.AsyncClient(base_url=url, limits=limits) as client:
                for _ in range(300):
                    r = await client.get("/")
                    assert r.status_code == 200 and r.content == b"hello from backdial\n"
                    assert r.http_version == "HTTP/1.1"
                body = b"0123456789" * 100_000  # 1 MB: exercises read flow control
                r = await client.post("/echo", content=body, headers={"content-type": "x/y"})
                assert r.content == body and r.headers["content-type"] == "x/y"

                async def chunks() -> AsyncIterator[bytes]:
                    for i in range(20):
                        yield b"part%d;" % i

                r = await client.post("/echo", content=chunks())
                assert r.content == b"".join(b"part%d;" % i for i in range(20))
                r = await client.get("/stream", params={"chunks": 200, "size": 1000})
                assert len(r.content) == 200_000 and r.headers["transfer-encoding"] == "chunked"
                assert (await client.head("/")).content == b""
                assert (await client.get("/status/204")).status_code == 204
                assert (await client.get("/status/503")).status_code == 503

    run(main())


def test_pipelined_requests_answered_in_order() -> None:
    async def main() -> None:
        async with serving(demo.app) as server:
            reqs = b"".join(
                b"GET /delay?ms=%d HTTP/1.1\r\nhost: x\r\n\r\n" % ms for ms in (60, 1, 30)
            )
            reqs += b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            out = await raw_exchange(server.bound_port, reqs)
            bodies = [b"slept 60 ms\n", b"slept 1 ms\n", b"slept 30 ms\n", b"hello from backdial\n"]
            positions = [out.index(b) for b in bodies]
            assert positions == sorted(positions)
            assert out.count(b"HTTP/1.1 200 OK") == 4
            assert out.rstrip().endswith(b"hello from backdial")

    run(main())


def test_malformed_request_gets_400_and_close() -> None:
    async def main() -> None:
        async with serving(demo.app) as server:
            out = await raw_exchange(server.bound_port, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n")
            assert b"connection: close" in out.lower()

    run(main())


def test_oversized_head_gets_400() -> None:
    async def main() -> None:
        async with serving(demo.app) as server:
            req = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n"
            out = await raw_exchange(server.bound_port, req)
            assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n")

    run(main())


def test_http10_and_connection_close() -> None:
    async def main() -> None:
        async with serving(demo.app) as server:
            out = await raw_exchange(server.bound_port, b"GET / HTTP/1.0\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"hello from backdial\n")
            req = b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"
            out = await raw_exchange(server.bound_port, req, expect_close=False)
            assert b"connection: keep-alive" in out.lower()
            req = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            out = await raw_exchange(server.bound_port, req)
            assert b"connection: close" in out.lower()

    run(main())


def test_expect_100_continue() -> None:
    async def main() -> None:
        async with serving(demo.app) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
            writer.write(
                b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n"
                b"expect: 100-continue\r\n\r\n"
            )
            line = await reader.readuntil(b"\r\n\r\n")
            assert line == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"ping")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert await reader.readexactly(4) == b"ping"
            writer.close()

    run(main())


def test_app_errors() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("no lifespan here")  # tolerated: lifespan unsupported
        if scope["path"] == "/before":
            raise ValueError("boom")
        if scope["path"] == "/nothing":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ValueError("boom after start")

    async def main() -> None:
        async with serving(app) as server:
            port = server.bound_port
            for path in (b"/before", b"/nothing"):
                req = b"GET %b HTTP/1.1\r\nhost: x\r\n\r\n" % path
                out = await raw_exchange(port, req, expect_close=False)
                assert out.startswith(b"HTTP/1.1 500 Internal Server Error")
                assert b"connection: close" not in out.lower()  # the connection stays usable
            out = await raw_exchange(port, b"GET /after HTTP/1.1\r\nhost: x\r\n\r\n")
            # The head and first chunk went out; the connection is then dropped,
            # so the chunked body never terminates.
            assert out.startswith(b"HTTP/1.1 200 OK") and b"partial" in out
            assert not out.endswith(b"0\r\n\r\n")

    run(main())


def test_receive_reports_disconnect() -> None:
    seen: list[str] = []
    done = asyncio.Event()

    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        first = await receive()
        seen.append(first["type"])
        started.set()
        seen.append((await receive())["type"])
        done.set()

    async def main() -> None:
        async with serving(app) as server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            async with asyncio.timeout(5):
                await started.wait()  # the request reached the app before the client left
            writer.close()
            async with asyncio.timeout(5):
                await done.wait()
            assert seen == ["http.request", "http.disconnect"]

    run(main())
