"""What every client connection of one listener shares: the connection set, one
timeout sweep, and the worker's graceful-stop handle.

Connections carry a single deadline each; one timer per listener sweeps them
every ``ProxySettings.tick``, so a request costs a float store instead of a
timer handle.  The per-connection protocol lives in ``proxy.py``; this module
knows it only as a ``SweptConnection``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from backdial.http1 import require_strict_parser
from backdial.sidecar.config import ProxySettings
from backdial.sidecar.lease import LeaseSource
from backdial.sidecar.liveness import FdGuard
from backdial.sidecar.realip import TrustedProxies
from backdial.sidecar.spool import Budget, SpoolFile
from backdial.sidecar.stats import ProxyStats


class Booked(Protocol):
    """A connection's share of the worker's response memory (``clientout.ClientOutput``)."""

    def account(self) -> None: ...


class SweptConnection(Protocol):
    """What the listener needs of a client connection."""

    deadline: float  # loop time at which on_deadline is due; 0 = none

    @property
    def out(self) -> Booked: ...

    def on_deadline(self, now: float) -> None: ...

    def drain(self) -> None: ...

    def abort(self) -> None: ...

    def memory_freed(self) -> None: ...


class ListenerState:
    """What every connection of one listener shares; the worker's handle for a graceful stop."""

    def __init__(self, pool: LeaseSource, settings: ProxySettings, stats: ProxyStats) -> None:
        require_strict_parser()
        self.pool = pool
        self.settings = settings
        self.stats = stats
        self.connections: set[SweptConnection] = set()
        # Response memory (clientout.py): connections that hold bytes in it, and those
        # waiting for room; transports drain silently, so the sweep re-books and wakes them.
        stats.response_memory.limit = settings.response_memory_total
        self.booked: set[SweptConnection] = set()
        self.memory_waiters: set[SweptConnection] = set()
        self.draining = False
        # The worker's disk budget: response bytes parked for slow clients (clientout.py).
        self.disk_budget = disk = Budget(settings.response_spill_total)
        stats.spilled_bytes = lambda: disk.used
        self.via = settings.via.encode("ascii")
        self.proto = settings.forwarded_proto.encode("ascii")
        # (Via + X-Forwarded-Proto + Forwarded, X-Forwarded-For) lines by client address
        self.forwarding: dict[str, tuple[bytes, bytes]] = {}
        self.trusted = TrustedProxies(settings.trusted_proxies)
        # One memory and one disk budget for the request bodies of every connection.
        stats.request_memory.limit = settings.request_memory_total
        stats.request_disk.limit = settings.request_spool_total
        held: Any = getattr(pool, "held", ())  # sessions this worker holds (LeasePool)
        self.fd_guard = FdGuard(
            lambda: stats.connections_active + len(held) + SpoolFile.open_files,
            settings.fd_reserve,
        )
        self._timer: asyncio.TimerHandle | None = None
        self._empty: asyncio.Event | None = None

    def add(self, conn: SweptConnection) -> None:
        self.connections.add(conn)
        self.stats.connections_total += 1
        self.stats.connections_active += 1
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.settings.tick, self._sweep)

    def remove(self, conn: SweptConnection) -> None:
        self.booked.discard(conn)
        self.memory_waiters.discard(conn)
        if conn in self.connections:
            self.connections.discard(conn)
            self.stats.connections_active -= 1
        if not self.connections and self._empty is not None:
            self._empty.set()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self.connections):
            if conn.deadline and now >= conn.deadline:
                conn.on_deadline(now)
        self.recount_memory()
        self._timer = loop.call_later(self.settings.tick, self._sweep)

    def recount_memory(self) -> None:
        """Re-book the response memory of connections whose transports drained silently,
        then let the ones waiting for room try again."""
        for holder in list(self.booked):
            holder.out.account()
        if self.memory_waiters:
            waiters = list(self.memory_waiters)
            self.memory_waiters.clear()  # each one adds itself again if still short of room
            for waiter in waiters:
                waiter.memory_freed()

    async def shutdown(self, timeout: float) -> int:  # noqa: ASYNC109 (the worker's API)
        """Close idle connections, let in-flight requests finish within *timeout* seconds.

        Call after the listening server stopped accepting.  Responses sent while
        draining carry ``Connection: close``.  Returns how many connections had to
        be aborted at the deadline.
        """
        self.draining = True
        for conn in list(self.connections):
            conn.drain()
        if self.connections:
            self._empty = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), max(0.0, timeout))
        aborted = len(self.connections)
        self._cut()
        return aborted

    def _cut(self) -> None:
        """The drain deadline passed: abort what is left, stop the sweep."""
        for conn in list(self.connections):
            conn.abort()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
