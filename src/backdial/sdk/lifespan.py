"""ASGI lifespan protocol: run the app's startup before the first session is
dialed and its shutdown after the last one is gone.

Apps that do not implement lifespan usually raise on the unknown scope type;
that is tolerated and logged once ("lifespan unsupported").  An explicit
``lifespan.startup.failed`` is fatal: serving an app whose startup failed
would register capacity that cannot serve.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .asgitypes import ASGIApp, Message, Receive, Send

log = logging.getLogger("backdial.sdk")


class LifespanError(RuntimeError):
    """The app reported ``lifespan.startup.failed``."""


class Lifespan:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self.supported = True
        self._task: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._startup: asyncio.Future[Message] | None = None
        self._shutdown: asyncio.Future[Message] | None = None
        self._started = False

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        self._startup = loop.create_future()
        self._shutdown = loop.create_future()
        self._task = loop.create_task(self._run())
        await self._inbox.put({"type": "lifespan.startup"})
        first: set[asyncio.Future[Any]] = {self._startup, self._task}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if not self._startup.done():
            self.supported = False
            log.info("lifespan unsupported by the app; continuing without it")
            return
        message = self._startup.result()
        if message["type"] == "lifespan.startup.failed":
            raise LifespanError(message.get("message") or "lifespan startup failed")
        self._started = True

    async def shutdown(self, grace: float = 10.0) -> None:
        task = self._task
        if task is None or not self.supported or not self._started or task.done():
            return
        assert self._shutdown is not None
        await self._inbox.put({"type": "lifespan.shutdown"})
        waiting: set[asyncio.Future[Any]] = {self._shutdown, task}
        done, _ = await asyncio.wait(waiting, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        if self._shutdown.done():
            message = self._shutdown.result()
            if message["type"] == "lifespan.shutdown.failed":
                log.error("lifespan shutdown failed: %s", message.get("message", ""))
        elif not done:
            log.error("lifespan shutdown did not finish within %.1fs", grace)
            task.cancel()

    async def _run(self) -> None:
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        try:
            await self.app(scope, self._receive, self._send)
        except Exception as exc:
            if self._startup is not None and not self._startup.done():
                log.debug("app raised on the lifespan scope: %r", exc)
            else:
                log.exception("lifespan task raised")

    async def _receive(self) -> Message:
        return await self._inbox.get()

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind in ("lifespan.startup.complete", "lifespan.startup.failed"):
            target = self._startup
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            target = self._shutdown
        else:
            raise RuntimeError(f"unexpected lifespan message {kind!r}")
        if target is None or target.done():
            raise RuntimeError(f"{kind!r} sent out of order")
        target.set_result(message)


async def acknowledge_lifespan(receive: Receive, send: Send) -> None:
    """Lifespan for apps with nothing to start or stop: complete both phases."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
