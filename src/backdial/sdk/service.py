"""``Service``: keep N registered sessions serving one app, and change N safely.

The number of open sessions *is* the capacity the service declares, so the
service owns that number: one supervisor task dials until ``open + dialing``
reaches the target, and replaces sessions that end unexpectedly, pacing
failures with capped full-jitter backoff.  Lowering the target retires
sessions (idle ones first, by ``RETIRE_LINE``; busy ones by answering their
current request with ``Connection: close``), so no in-flight or just-leased
request ever fails.  ``drain`` is "lower the target to zero, stop dialing,
wait, then force".

All state changes happen synchronously in protocol callbacks on the event
loop, so counts are exact without locks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from backdial import wire

from .backoff import Backoff, StateLog
from .connection import ServerState
from .lifespan import Lifespan
from .raw import as_asgi
from .registration import (
    RegisterAddress,
    RegistrationError,
    RegistrationRefused,
    RegistrationRejected,
    default_instance,
)
from .session import SessionProtocol

log = logging.getLogger("backdial.sdk")

# A session lost sooner than this after registering counts as a failed dial
# for backoff purposes (an acceptor that accepts and immediately drops must
# not turn the dialer into a busy loop).
_YOUNG = 1.0


class Service:
    """Serve *app* (ASGI 3 app or raw handler) over sessions dialed to *register*."""

    def __init__(
        self,
        app: Any,
        *,
        register: str,
        sessions: int = 1,
        service: str = "default",
        instance: str | None = None,
        slice: str | None = None,
        token: str | None = None,
        reply_timeout: float = 5.0,
        backoff: Backoff | None = None,
        lifespan: bool = True,
    ) -> None:
        if sessions < 0:
            raise ValueError("sessions must be >= 0")
        self.app = as_asgi(app)
        self.address = RegisterAddress.parse(register)
        self.preamble = wire.Preamble(service, instance or default_instance(), slice, token)
        self._preamble_bytes = self.preamble.encode()  # validates the values now
        self._reply_timeout = reply_timeout
        self._backoff = backoff or Backoff()
        self._use_lifespan = lifespan
        self._target = sessions
        self._open: set[SessionProtocol] = set()
        self._retiring: set[SessionProtocol] = set()
        self._dialing = 0
        self._penalty = False
        self._stopping = False
        self._started = False
        self._fatal: RegistrationRejected | None = None
        self._state: ServerState | None = None
        self._lifespan: Lifespan | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._done = asyncio.Event()
        self._statelog = StateLog(log)
        self.registered_total = 0
        self.dial_failures = 0  # registrations that failed and are retried (logged once)

    # --- observation ------------------------------------------------------------

    @property
    def target(self) -> int:
        """The capacity asked for."""
        return self._target

    @property
    def sessions(self) -> int:
        """Registered sessions that are not retiring: the capacity currently declared."""
        return len(self._open)

    @property
    def retiring(self) -> int:
        return len(self._retiring)

    @property
    def in_flight(self) -> int:
        return self._state.in_flight if self._state is not None else 0

    @property
    def fatal_error(self) -> RegistrationRejected | None:
        return self._fatal

    def snapshot(self) -> dict[str, int]:
        return {
            "target": self.target,
            "open": self.sessions,
            "in_flight": self.in_flight,
            "dial_failures": self.dial_failures,
        }

    # --- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Run the app's lifespan startup, then start dialing (returns immediately)."""
        if self._started:
            raise RuntimeError("service already started")
        self._started = True
        self._state = ServerState(self.app)
        if self._use_lifespan:
            self._lifespan = Lifespan(self.app)
            await self._lifespan.startup()  # LifespanError propagates: nothing dialed yet
            if self._lifespan.supported:
                self._state.lifespan_state = self._lifespan.state
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()

    async def set_sessions(self, n: int) -> None:
        """Change the declared capacity; lowering never fails a request."""
        self.set_target(n)

    def set_target(self, n: int) -> None:
        """Synchronous ``set_sessions`` (for signal handlers and other callbacks)."""
        if n < 0:
            raise ValueError("sessions must be >= 0")
        if self._stopping:
            return
        self._target = n
        excess = len(self._open) - n
        if excess > 0:
            # Idle sessions first: retiring them costs nothing in flight.
            victims = sorted(self._open, key=lambda s: not s.idle)[:excess]
            for session in victims:
                self._retire(session)
        self._wake.set()
        self._notify()

    async def wait_sessions(self, n: int) -> None:
        """Wait until at least *n* sessions are open (bound it with ``asyncio.timeout``)."""
        await self._wait_until(lambda: len(self._open) >= n or self._fatal is not None, None)
        if self._fatal is not None:
            raise self._fatal

    async def wait_closed(self) -> None:
        """Return once drained; raise RegistrationRejected if registration was refused."""
        await self._done.wait()
        if self._fatal is not None:
            raise self._fatal

    async def drain(self, timeout: float = 30.0) -> bool:  # noqa: ASYNC109 - a grace period
        """Stop dialing, retire every session, let in-flight requests finish.

        After *timeout* seconds whatever is left is aborted.  Returns True when
        everything finished in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._stopping = True
        self._target = 0
        self._wake.set()
        for session in list(self._open):
            self._retire(session)
        supervisor = self._supervisor
        clean = True
        try:
            await self._wait_until(
                lambda: (
                    not self._open
                    and not self._retiring
                    and (supervisor is None or supervisor.done())
                ),
                max(0.0, deadline - loop.time()),
            )
        except TimeoutError:
            clean = False
            log.warning(
                "drain timeout after %.1fs: aborting %d sessions, %d requests in flight",
                timeout,
                len(self._open) + len(self._retiring),
                self.in_flight,
            )
        if supervisor is not None and not supervisor.done():
            supervisor.cancel()
        for session in (*self._open, *self._retiring):
            session.abort()
        if self._state is not None:
            self._state.cancel_tasks()
        if self._lifespan is not None:
            await self._lifespan.shutdown()
        self._done.set()
        return clean

    # --- session callbacks (SessionOwner) -------------------------------------------

    def session_registered(self, session: SessionProtocol) -> None:
        self.registered_total += 1
        if self._stopping or len(self._open) >= self._target:
            # The target dropped while this dial was in progress.
            self._retiring.add(session)
            session.retire()
        else:
            self._open.add(session)
        self._notify()

    def session_closed(self, session: SessionProtocol) -> None:
        if session in self._retiring:
            self._retiring.discard(session)
        elif session in self._open:
            self._open.discard(session)
            if session.closed_locally:
                # We ended it (the app answered "Connection: close", or the proxy
                # sent a malformed request): just replace it.
                log.debug("session %d closed by the service; redialing", session.session_id)
            elif not self._stopping:
                if time.monotonic() - session.registered_at < _YOUNG:
                    self._penalty = True
                self._statelog.report(
                    "lost",
                    logging.WARNING,
                    "session closed by the acceptor side; redialing to keep %d sessions",
                    self._target,
                )
            self._wake.set()
        self._notify()

    # --- internals ----------------------------------------------------------------

    def _retire(self, session: SessionProtocol) -> None:
        self._open.discard(session)
        self._retiring.add(session)
        session.retire()

    def _notify(self) -> None:
        self._changed.set()

    async def _wait_until(self, predicate: Callable[[], bool], within: float | None) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def _supervise(self) -> None:
        try:
            await self._supervise_loop()
        finally:
            self._notify()  # drain waits for the supervisor to be gone

    async def _supervise_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if len(self._open) + self._dialing >= self._target:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._penalty:
                self._penalty = False
                await self._pause(self._backoff.next())
                continue
            try:
                await self._dial(loop)
            except RegistrationRejected as exc:
                self._fatal = exc
                log.error("%s", exc)
                self._stopping = True
                self._done.set()
                self._notify()
                return
            except (RegistrationError, OSError, TimeoutError) as exc:
                self._report_failure(exc)
                await self._pause(self._backoff.next())
                continue
            self._backoff.reset()
            if self._statelog.state != "ok":
                self._statelog.report(
                    "ok",
                    logging.INFO,
                    "registered at %s as service=%s instance=%s (target %d sessions)",
                    self.address.url,
                    self.preamble.service,
                    self.preamble.instance,
                    self._target,
                )

    async def _dial(self, loop: asyncio.AbstractEventLoop) -> None:
        state = self._state
        assert state is not None

        def factory() -> SessionProtocol:
            return SessionProtocol(state, self, self._preamble_bytes, self._reply_timeout)

        self._dialing += 1
        try:
            async with asyncio.timeout(self._reply_timeout):
                if self.address.path is not None:
                    _, proto = await loop.create_unix_connection(factory, self.address.path)
                else:
                    host, port = self.address.host, self.address.port
                    assert host is not None and port is not None
                    _, proto = await loop.create_connection(factory, host, port)
            await proto.outcome  # the protocol enforces the reply timeout itself
        finally:
            self._dialing -= 1

    def _report_failure(self, exc: BaseException) -> None:
        self.dial_failures += 1
        if isinstance(exc, RegistrationRefused):
            self._statelog.report(
                f"refused:{exc.code}",
                logging.WARNING,
                "acceptor at %s refused a session (%s); retrying with backoff",
                self.address.url,
                exc,
            )
        else:
            self._statelog.report(
                "unreachable",
                logging.WARNING,
                "cannot register at %s: %s; retrying with backoff",
                self.address.url,
                str(exc) or type(exc).__name__,
            )

    async def _pause(self, delay: float) -> None:
        """Sleep *delay* seconds unless the service starts stopping meanwhile."""
        if delay <= 0:
            return
        try:
            async with asyncio.timeout(delay):
                while not self._stopping:
                    self._wake.clear()
                    await self._wake.wait()
        except TimeoutError:
            pass
