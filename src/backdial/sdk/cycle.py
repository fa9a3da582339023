"""One HTTP request/response exchange as seen by an ASGI app.

A ``RequestCycle`` is created by the connection when a request head has been
parsed.  It buffers the request body the parser hands it, gives the app the
ASGI ``receive``/``send`` callables and turns ``send`` messages into bytes via
the sans-IO ``ResponseFramer``.  It never touches the parser: flow control
decisions are the connection's, and the cycle knows its connection only as
a ``CycleOwner``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from backdial.http1 import CONTINUE_100, canned, conn_mode

from .asgitypes import ASGIApp, Message, Scope
from .framing import FramingError, ResponseFramer

log = logging.getLogger("backdial.sdk")

_DISCONNECT: dict[str, str] = {"type": "http.disconnect"}


class InFlight(Protocol):
    in_flight: int  # requests of the server being answered


class CycleOwner(Protocol):
    """What a cycle needs of its connection (``connection.HttpProtocol``)."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport | None
    close_after_response: bool
    write_paused: bool

    @property
    def state(self) -> InFlight: ...

    async def drain(self) -> None: ...

    def abort(self) -> None: ...

    def body_consumed(self) -> None: ...

    def response_complete(self, cycle: RequestCycle) -> None: ...


class RequestCycle:
    __slots__ = (
        "_chunks",
        "_continue_sent",
        "_done_delivered",
        "_waiter",
        "active",
        "buffered",
        "conn",
        "disconnected",
        "expect_100",
        "framer",
        "more_body",
        "response_complete",
        "response_started",
        "scope",
    )

    def __init__(
        self, conn: CycleOwner, scope: Scope, framer: ResponseFramer, expect_100: bool
    ) -> None:
        self.conn = conn
        self.scope = scope
        self.framer = framer
        self.expect_100 = expect_100
        self._continue_sent = False
        self._chunks: list[bytes] = []
        self.buffered = 0
        self.more_body = True
        self._done_delivered = False
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self._waiter: asyncio.Future[None] | None = None
        # True while this request counts towards ServerState.in_flight.
        self.active = True

    # --- fed by the connection -------------------------------------------------

    def feed_body(self, data: bytes) -> None:
        if self.response_complete:
            return  # the app answered without reading the body; discard the rest
        self._chunks.append(data)
        self.buffered += len(data)
        self._wake()

    def feed_complete(self) -> None:
        self.more_body = False
        self._wake()

    def feed_disconnect(self) -> None:
        self.disconnected = True
        self.release()
        self._wake()

    def release(self) -> None:
        """Stop counting this request as in flight (idempotent)."""
        if self.active:
            self.active = False
            self.conn.state.in_flight -= 1

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = self.conn.loop.create_future()
        self._waiter = waiter
        await waiter

    # --- the app's side ----------------------------------------------------------

    async def receive(self) -> Message:
        if self.expect_100 and not self._continue_sent and not self.response_started:
            # Sessions never need this (the proxy buffers bodies) but clients of
            # --listen mode may wait for it before sending a body.
            self._continue_sent = True
            transport = self.conn.transport
            if transport is not None and not self.disconnected:
                transport.write(CONTINUE_100)
        if self._done_delivered:
            while not (self.disconnected or self.response_complete):
                await self._wait()
            return dict(_DISCONNECT)
        while not self._chunks and self.more_body and not self.disconnected:
            await self._wait()
        if self.disconnected:
            return dict(_DISCONNECT)
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if not self.more_body:
            self._done_delivered = True
        self.conn.body_consumed()
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.disconnected:
            return  # nobody is listening; ASGI lets the app finish quietly
        conn = self.conn
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {kind!r}")
            self.response_started = True
            self.framer.start(message["status"], message.get("headers", ()))
            # Apps usually send the first body part immediately; if they do not,
            # this callback writes the head on its own a loop turn later.
            conn.loop.call_soon(self._flush_head)
            return
        if self.response_complete:
            raise RuntimeError(f"response already complete, got {kind!r}")
        if kind != "http.response.body":
            raise RuntimeError(f"expected http.response.body, got {kind!r}")
        framer = self.framer
        if not framer.head_sent and conn.close_after_response:
            framer.keep_alive = False
        more = message.get("more_body", False)
        data = framer.body(message.get("body", b""), more)
        transport = conn.transport
        if data and transport is not None:
            transport.write(data)
        if not more:
            self.response_complete = True
            self._chunks.clear()
            self.buffered = 0
            self._wake()
            conn.response_complete(self)
        elif conn.write_paused:
            await conn.drain()

    def _flush_head(self) -> None:
        framer = self.framer
        if framer.head_sent or self.disconnected or self.response_complete:
            return
        if self.conn.close_after_response:
            framer.keep_alive = False
        data = framer.flush_head()
        transport = self.conn.transport
        if data and transport is not None:
            transport.write(data)

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self.conn.abort()
            raise
        except Exception as exc:
            if self.disconnected:
                log.debug("app raised after the peer went away: %r", exc)
            elif isinstance(exc, FramingError):
                log.error("bad response from app for %s: %s", self.scope.get("path"), exc)
            else:
                log.exception("app raised while handling %s", self.scope.get("path"))
            self._fail()
        else:
            if not self.response_started:
                log.error("app returned without a response for %s", self.scope.get("path"))
                self._fail()
            elif not self.response_complete and not self.disconnected:
                log.error("app returned before finishing the response for %s", self.scope["path"])
                self.conn.abort()
        finally:
            self.release()

    def _fail(self) -> None:
        """Answer 500 if nothing was written yet, else give up the connection."""
        conn = self.conn
        if self.disconnected or self.response_complete:
            return
        if self.response_started and self.framer.head_sent:
            conn.abort()  # a half-written response cannot be repaired
            return
        self.response_started = True
        keep = self.framer.keep_alive and not conn.close_after_response
        http11 = self.framer.http11
        self.framer = ResponseFramer(is_head=False, keep_alive=keep, http11=http11)
        transport = conn.transport
        if transport is not None:
            transport.write(canned(500, conn_mode(keep, not http11)))
        self.response_complete = True
        self._wake()
        conn.response_complete(self)
