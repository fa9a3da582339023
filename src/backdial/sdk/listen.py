"""Conventional listening server over the same HTTP core (``serve --listen``).

Exists so the very same app and HTTP code can be put behind nginx or haproxy
and compared with the session path; it is also what the admin endpoint and
the tests' upstream use.  Shutdown mirrors session drain: stop accepting,
close idle keep-alive connections, answer in-flight requests with
``Connection: close``, force after the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

from .connection import HttpProtocol, ServerState
from .lifespan import Lifespan
from .raw import as_asgi

log = logging.getLogger("backdial.sdk")


class ListenServer:
    """*app* on TCP ``host:port``, or on a listening socket of any family given as *sock*
    (e.g. a UNIX socket, with *admit* checking each peer's credentials)."""

    def __init__(
        self,
        app: Any,
        host: str = "",
        port: int = 0,
        *,
        lifespan: bool = True,
        backlog: int = 2048,
        sock: socket.socket | None = None,
        admit: Callable[[socket.socket], bool] | None = None,
    ) -> None:
        self.app = as_asgi(app)
        self.host = host
        self.port = port
        self._sock = sock
        self._admit = admit
        self._use_lifespan = lifespan
        self._backlog = backlog
        self._state: ServerState | None = None
        self._server: asyncio.Server | None = None
        self._lifespan: Lifespan | None = None

    @property
    def in_flight(self) -> int:
        return self._state.in_flight if self._state is not None else 0

    @property
    def bound_port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        state = self._state = ServerState(self.app, self._admit)
        if self._use_lifespan:
            self._lifespan = Lifespan(self.app)
            await self._lifespan.startup()
            if self._lifespan.supported:
                state.lifespan_state = self._lifespan.state

        def factory() -> HttpProtocol:
            return HttpProtocol(state)

        if self._sock is not None and self._sock.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(
                factory, sock=self._sock, backlog=self._backlog
            )
        elif self._sock is not None:
            self._server = await loop.create_server(factory, sock=self._sock, backlog=self._backlog)
        else:
            self._server = await loop.create_server(
                factory,
                self.host,
                self.port,
                family=socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                backlog=self._backlog,
                reuse_address=True,
            )

    def close(self) -> None:
        """Stop at once: no new connections, open ones dropped (no lifespan shutdown)."""
        if self._server is not None:
            self._server.close()
        if self._state is not None:
            for conn in list(self._state.connections):
                conn.abort()
            self._state.cancel_tasks()

    async def shutdown(self, grace: float = 30.0) -> bool:
        """Graceful stop; returns True when every request finished in time."""
        state = self._state
        if self._server is not None:
            self._server.close()
        clean = True
        if state is not None:
            for conn in list(state.connections):
                conn.shutdown()
            # Connections close on their own once their response is out.
            if state.connections:
                state.all_closed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(grace):
                        await state.all_closed.wait()
            if state.connections:
                clean = False
                log.warning("shutdown timeout: aborting %d connections", len(state.connections))
                for conn in list(state.connections):
                    conn.abort()
            state.cancel_tasks()
        if self._lifespan is not None:
            await self._lifespan.shutdown()
        return clean
