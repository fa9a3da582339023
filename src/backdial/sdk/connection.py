"""The asyncio shell of the HTTP/1.1 server core: one protocol per stream socket.

``HttpProtocol`` parses requests with ``httptools`` and runs one ASGI
``RequestCycle`` at a time; pipelined requests wait in a queue with reading
paused.  The same class serves accepted sockets (``--listen``) and, through
the ``SessionProtocol`` subclass, sockets the service dialed itself.

Flow control: reading pauses while a request body the app has not consumed
exceeds ``HIGH_WATER`` or while pipelined requests wait; ``send`` awaits
``drain`` while the transport's write buffer is above its high-water mark.
There is no per-request logging: the benchmark path must stay cheap.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import httptools

from backdial.http1 import ConnMode, canned, expects_continue

from .asgitypes import ASGI_VERSION, ASGIApp
from .cycle import RequestCycle
from .framing import ResponseFramer, asgi_target

log = logging.getLogger("backdial.sdk")

_REFUSED_GRACE = 1.0  # seconds a refused peer's connection stays open to drain its bytes
HIGH_WATER = 64 * 1024  # buffered request body bytes before reading pauses
MAX_HEAD = 64 * 1024  # request line + headers; llhttp itself sets no limit

_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}


class ServerState:
    """What all connections of one server (or one Service) share.

    ``admit``, when set, is asked about each new connection's socket (e.g. a
    UNIX peer's uid); a connection it refuses is dropped unanswered.
    """

    def __init__(self, app: ASGIApp, admit: Callable[[socket.socket], bool] | None = None) -> None:
        self.app = app
        self.admit = admit
        self.loop = asyncio.get_running_loop()
        self.in_flight = 0
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.all_closed = asyncio.Event()  # set whenever the last connection closes
        # ASGI lifespan state; each request scope gets a shallow copy.
        self.lifespan_state: dict[str, Any] | None = None

    def cancel_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()


class ConnectionContext:
    """Per-connection storage exposed to apps as ``scope["extensions"]["backdial.connection"]``.

    The bridge keeps its upstream connection here so that each session has
    exactly one upstream connection whose life ends with the session.
    """

    __slots__ = ("_callbacks", "admitted", "closed", "data")

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.closed = False
        self.admitted = False  # the listener's admission check passed this peer
        self._callbacks: list[Callable[[], None]] = []

    def on_close(self, callback: Callable[[], None]) -> None:
        if self.closed:
            callback()
        else:
            self._callbacks.append(callback)

    def _fire(self) -> None:
        self.closed = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("connection close callback failed")


class HttpProtocol(asyncio.Protocol):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.loop = state.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.cycle: RequestCycle | None = None  # the request being answered
        self._parsing: RequestCycle | None = None  # the request whose body is arriving
        self._pipeline: deque[RequestCycle] = deque()
        self.in_message = False
        self.close_after_response = False
        self.closed = False
        self.closed_locally = False  # we, not the peer, ended the connection
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._broken = False
        self._refused = False  # the listener's admission check turned this peer away
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._expect_100 = False
        self.context = ConnectionContext()
        self._extensions = {"backdial.connection": self.context}
        self._server: tuple[str, int] | None = None
        self._client: tuple[str, int] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        admit = self.state.admit
        if admit is not None:
            sock = transport.get_extra_info("socket")
            if sock is None or not admit(sock):
                # Unanswered.  What the peer already sent is read and dropped first:
                # closing over unread data would reset the peer instead of an end-of-file.
                self._refused = self.closed_locally = True
                self.loop.call_later(_REFUSED_GRACE, self.transport.close)
                return
            self.context.admitted = True
        self.state.connections.add(self)
        self._server = _inet(transport.get_extra_info("sockname"))
        self._client = _inet(transport.get_extra_info("peername"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        connections = self.state.connections
        connections.discard(self)
        if not connections:
            self.state.all_closed.set()
        for cycle in (self.cycle, self._parsing, *self._pipeline):
            if cycle is not None:
                cycle.feed_disconnect()
        self._pipeline.clear()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.context._fire()

    def eof_received(self) -> bool | None:
        return None  # close our side too; a half-closed peer sends no more requests

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        if self.write_paused and not self.closed:
            waiter = self._drain_waiter
            if waiter is None:
                waiter = self._drain_waiter = self.loop.create_future()
            await waiter

    def data_received(self, data: bytes) -> None:
        if self._refused:
            if self.transport is not None:
                self.transport.close()  # the bytes are read: now an end-of-file, not a reset
            return
        if self._broken:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No upgrades on this server: answer the request as plain HTTP and close.
            self._broken = True
            self.close_after_response = True
            if self._parsing is not None:
                self._parsing.feed_complete()
                self._parsing = None
            self.in_message = False
        except httptools.HttpParserError:
            self._bad_request()

    # --- httptools callbacks ------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message = True
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._expect_100 = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_HEAD:
            raise ValueError("request target too long")  # -> HttpParserCallbackError -> 400

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEAD:
            raise ValueError("request headers too large")  # -> HttpParserCallbackError -> 400
        name = name.lower()
        if name == b"expect" and expects_continue(value):
            self._expect_100 = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        http11 = parser.get_http_version() == "1.1"
        target = asgi_target(self._url)
        if target is None:
            raise ValueError("unusable request target")  # -> HttpParserCallbackError -> 400
        path, raw_path, query = target
        state = self.state
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": ASGI_VERSION,
            "http_version": "1.1" if http11 else "1.0",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": self._headers,
            "client": self._client,
            "server": self._server,
            "extensions": self._extensions,
        }
        if state.lifespan_state is not None:
            scope["state"] = state.lifespan_state.copy()
        # llhttp applies the Connection rules of both versions (tokens, not substrings).
        framer = ResponseFramer(
            is_head=method == "HEAD",
            keep_alive=parser.should_keep_alive() and not self.close_after_response,
            http11=http11,
        )
        cycle = RequestCycle(self, scope, framer, self._expect_100 and http11)
        state.in_flight += 1
        self._parsing = cycle
        if self.cycle is None:
            self._start(cycle)
        else:
            self._pipeline.append(cycle)
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        cycle = self._parsing
        if cycle is not None:
            cycle.feed_body(body)
            if cycle.buffered > HIGH_WATER:
                self._pause_reading()

    def on_message_complete(self) -> None:
        self.in_message = False
        cycle = self._parsing
        if cycle is not None:
            self._parsing = None
            cycle.feed_complete()
        if self.cycle is None:
            self._idle()

    # --- cycle management ---------------------------------------------------------

    def _start(self, cycle: RequestCycle) -> None:
        self.cycle = cycle
        task = self.loop.create_task(cycle.run(self.state.app))
        tasks = self.state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def response_complete(self, cycle: RequestCycle) -> None:
        """Called by the cycle when the last byte of its response is written."""
        cycle.release()
        if self.cycle is cycle:
            self.cycle = None
        if self.closed:
            return
        if not cycle.framer.keep_alive:
            self._close()
            return
        if self._pipeline:
            self._start(self._pipeline.popleft())
        self._maybe_resume()
        if self.cycle is None and not self.in_message:
            self._idle()

    def body_consumed(self) -> None:
        self._maybe_resume()

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        if not self._read_paused or self._pipeline or self.closed:
            return
        parsing = self._parsing
        if parsing is not None and parsing.buffered > HIGH_WATER and not parsing.response_complete:
            return
        self._read_paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    def _idle(self) -> None:
        """No request is being answered or received: the connection may go."""
        if self.close_after_response:
            self._close()

    @property
    def idle(self) -> bool:
        return self.cycle is None and not self.in_message and not self._pipeline

    def shutdown(self) -> None:
        """Finish the current request (answered with Connection: close), then close."""
        self.close_after_response = True
        if self.idle:
            self._close()

    def _bad_request(self) -> None:
        self._broken = True
        self.close_after_response = True
        parsing = self._parsing
        self._parsing = None
        self.in_message = False
        if parsing is not None:
            # The body of an already dispatched request is broken: its app sees a
            # disconnect and the connection cannot be reused.
            if parsing in self._pipeline:
                self._pipeline.remove(parsing)
            parsing.feed_disconnect()
            self._close()
            return
        if self.cycle is None and self.transport is not None:
            self.transport.write(canned(400, ConnMode.CLOSE))
            self._close()
        # else: the request being answered finishes with Connection: close

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.closed_locally = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed_locally = True
            self.transport.abort()


def _inet(addr: object) -> tuple[str, int] | None:
    """ASGI wants (host, port) for inet sockets and nothing useful exists for UNIX ones."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return (str(addr[0]), int(addr[1]))
    return None
