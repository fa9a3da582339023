"""The bridge's connection to the app it fronts: a minimal kept-alive HTTP/1.1 client.

One ``AppConnection`` carries one request at a time to an unmodified
HTTP/1.1 app.  Response bodies are buffered only up to ``HIGH_WATER`` before
reading from the upstream pauses, so a slow session (or proxy) pushes back on
the app instead of growing memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import httptools

HIGH_WATER = 256 * 1024


class AppConnectionError(ConnectionError):
    """The connection to the app failed or closed mid-exchange."""


class AppConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.requests = 0  # exchanges started on this connection (0 = fresh)
        self.received = 0  # response bytes received for the current exchange
        self._parser: httptools.HttpResponseParser | None = None
        self._is_head = False
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._keep_alive = True
        self._until_eof = False  # body delimited by the connection closing
        self._waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None

    @classmethod
    async def open(cls, host: str, port: int, connect_timeout: float = 5.0) -> AppConnection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(connect_timeout):
            _, proto = await loop.create_connection(cls, host, port)
        return proto

    @classmethod
    async def open_unix(cls, path: str, connect_timeout: float = 5.0) -> AppConnection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(connect_timeout):
            _, proto = await loop.create_unix_connection(cls, path)
        return proto

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._until_eof and exc is None and self._status:
            # httptools has no finish(): EOF is the end of a close-delimited body.
            self._complete = True
            self._keep_alive = False
        if not self._complete and self._error is None:
            self._error = AppConnectionError(f"upstream closed the connection: {exc or 'EOF'}")
        self._wake()
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self._parser is None:
            self._fail(AppConnectionError("upstream sent bytes without a request"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(AppConnectionError(f"malformed upstream response: {exc}"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # --- httptools callbacks ------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self._until_eof = False
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._headers = []  # informational: the real response follows
            self._until_eof = True
            return
        self._status = status
        self._keep_alive = bool(self._parser.should_keep_alive())
        if self._until_eof and (status in (204, 304) or self._is_head):
            self._until_eof = False
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        if self._is_head:
            # The parser cannot know a HEAD response has no body; end it here
            # and never feed this parser again.
            self._parser = None
            self._complete = True
            self._wake()

    def on_body(self, body: bytes) -> None:
        if self._status == 0:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._status == 0:
            return  # end of an informational response
        self._complete = True
        self._wake()

    # --- the client side ----------------------------------------------------------

    def begin(self, head: bytes, is_head: bool) -> None:
        """Start an exchange by writing the request head."""
        if self.closed or self.transport is None:
            raise AppConnectionError("upstream connection is closed")
        self.requests += 1
        self.received = 0
        self._parser = httptools.HttpResponseParser(self)
        self._is_head = is_head
        self._status = 0
        self._headers = []
        self._head = self.loop.create_future()
        self._chunks.clear()
        self._buffered = 0
        self._complete = False
        self._keep_alive = True
        self._until_eof = True  # until a content-length or transfer-encoding header says otherwise
        self._error = None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter

    async def response_head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        assert self._head is not None
        await self._head
        if self._status == 0:
            raise self._error or AppConnectionError("no response from upstream")
        return self._status, self._headers

    async def read_body(self) -> tuple[bytes, bool]:
        """The body bytes available now (waiting for some) and whether the body is complete."""
        while not self._chunks and not self._complete:
            if self._error is not None:
                raise self._error
            self._waiter = self.loop.create_future()
            await self._waiter
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
        return data, self._complete

    @property
    def reusable(self) -> bool:
        """Whether the next request may go over this connection."""
        return self._complete and self._keep_alive and not self.closed

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._wake()
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
