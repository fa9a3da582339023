"""The bridge's upstream handling against hand-written HTTP/1.1 upstreams, in-process.

The registration peer (``sdkpeer.FakeAcceptor``) stands in for the acceptor
built in parallel; the upstreams are raw asyncio servers so that awkward but
legal behaviour (close-delimited bodies, informational responses, keep-alive
connections closed between requests) can be produced on purpose.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from tests.shared.sdk.sdkpeer import FakeAcceptor, run

from backdial.sdk import Bridge, Service

pytestmark = pytest.mark.timeout(60)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return head + await reader.readexactly(int(line.split(b":")[1]))
    return head


async def _bridged(handler: Handler, sessions: int = 1) -> tuple[FakeAcceptor, Service, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    peer = FakeAcceptor()
    await peer.start()
    svc = Service(Bridge(f"http://127.0.0.1:{port}"), register=peer.url, sessions=sessions)
    await svc.start()
    await peer.wait_idle(sessions)
    return peer, svc, port


async def _finish(peer: FakeAcceptor, svc: Service) -> None:
    assert not peer.protocol_errors
    assert await svc.drain(5)
    await peer.stop()
    peer.cleanup()


def test_close_delimited_and_informational_responses() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await _read_request(reader)
        if b" /early " in req:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal")
            await writer.drain()
            req = await _read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n")
        for i in range(5):
            writer.write(b"line %d\n" % i)
            await writer.drain()
            await asyncio.sleep(0.01)  # the behaviour under test: a body in several reads
        writer.close()

    async def main() -> None:
        peer, svc, _ = await _bridged(upstream)
        resp = await peer.request("GET", "/early")
        assert resp.status == 200 and resp.body == b"final"
        resp = await peer.request("GET", "/eof")  # same upstream connection, then EOF body
        assert resp.status == 200
        assert resp.body == b"".join(b"line %d\n" % i for i in range(5))
        assert not resp.closed, "the session survives; only the upstream connection closed"
        resp = await peer.request("GET", "/eof")  # a fresh upstream connection
        assert resp.status == 200 and resp.body.endswith(b"line 4\n")
        assert peer.session_counter == 1
        await _finish(peer, svc)

    run(main())


def test_stale_keep_alive_connection_is_retried_once() -> None:
    connections = 0
    closed = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _read_request(reader)
        # Claims keep-alive, then closes anyway (an app's idle timeout firing).
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        closed.set()

    async def main() -> None:
        peer, svc, _ = await _bridged(upstream)
        for i in range(3):
            resp = await peer.request("GET", "/")
            assert resp.status == 200 and resp.body == b"ok"
            if i == 0:  # the close is out before the next request; later, it may not be yet
                await closed.wait()
        assert connections == 3
        resp = await peer.request("POST", "/", body=b"x")  # a body: never retried, but fresh
        assert resp.status == 200
        await _finish(peer, svc)

    run(main())


def test_head_and_reuse_of_the_upstream_connection() -> None:
    connections = 0

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                req = await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            body = b"" if req.startswith(b"HEAD") else b"0123456789"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n" + body)
            await writer.drain()
        writer.close()

    async def main() -> None:
        peer, svc, _ = await _bridged(upstream)
        for method in ("HEAD", "GET", "HEAD", "GET"):
            resp = await peer.request(method, "/")
            assert resp.status == 200
            assert resp.headers["content-length"] == "10"
            # A HEAD body would corrupt the next response on the session.
            assert resp.body == (b"0123456789" if method == "GET" else b"")
        assert connections == 1
        await _finish(peer, svc)

    run(main())


def test_upstream_failure_mid_body_aborts_only_that_session() -> None:
    peers: list[FakeAcceptor] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()
        # Fail only once the response has begun at the proxy's end: mid-body, surely.
        await peers[0].wait_for(lambda: peers[0].heads > 0)
        writer.transport.abort()

    async def main() -> None:
        peer, svc, _ = await _bridged(upstream, sessions=2)
        peers.append(peer)
        with pytest.raises(ConnectionError):
            await peer.request("GET", "/")
        await peer.wait_idle(2)  # the service replaced the aborted session
        assert peer.session_counter == 3
        await _finish(peer, svc)

    run(main())
