"""Is this worker alive, and can it serve now?  ``/healthz`` and ``/readyz`` that mean it.

A worker that lost the acceptor keeps reconnecting (``poolcontrol``), but one
that cannot get back for longer than ``max_disconnected`` is wedged as far as
anyone can tell, and so is one whose event loop stalls for ``max_loop_lag``
(a blocked loop also answers no probe, but a loop that stalls now and then
answers some).  ``/healthz`` then fails, so the kubelet restarts it.

``/readyz`` asks the narrower question "can it serve a request right now":
connected, sessions registered, not draining, and not refusing connections at
the file-descriptor limit in the last ``REFUSAL_WINDOW`` seconds.

``FdGuard`` keeps a reserve of descriptors (for sessions, the control
connection, spool files and admin) by answering new client connections beyond
it with a fast ``503`` instead of letting the process run out: at the hard limit
libuv would accept and close them silently, and the control connection could
not be re-established.  Refusals are counted and logged at most once per
interval.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client.metrics_core import Metric

from backdial.metrics import counter, gauge
from backdial.sdk.backoff import StateLog

log = logging.getLogger("backdial.sidecar")

LAG_SAMPLE = 0.5  # seconds between event-loop lag samples
LAG_WINDOW = 30.0  # a stall counts against /healthz for this long
REFUSAL_WINDOW = 5.0  # refusing connections makes /readyz fail for this long
FD_RESERVE = 128  # descriptors kept free for everything but client connections


class ControlLink(Protocol):
    """What liveness needs of the lease pool."""

    disconnected_since: float | None  # monotonic time the control link went down (None: up)
    control_connects: int  # connections established
    control_failures: int  # connection attempts that failed


class FdGuard:
    """Refuses client connections that would eat into the descriptor reserve."""

    def __init__(
        self,
        in_use: Callable[[], int],
        reserve: int = FD_RESERVE,
        limit: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit if limit is not None else resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.reserve = reserve
        self._in_use = in_use
        self._clock = clock
        self.refused = 0
        self.last_refusal = -1e9
        self._log = StateLog(log, interval=10.0, clock=clock)

    def admit(self) -> bool:
        if self._in_use() + self.reserve < self.limit:
            return True
        self.refuse()
        return False

    def refuse(self) -> None:
        """Count (and log, at most once per interval) a connection answered 503 here or
        by the native engine, which applies the same rule itself."""
        self.refused += 1
        self.last_refusal = self._clock()
        self._log.report(
            "fd-limit",
            logging.WARNING,
            "refusing client connections (503): %d descriptors of %d in use, %d kept in reserve",
            self._in_use(),
            self.limit,
            self.reserve,
        )

    def refusing(self) -> bool:
        return self._clock() - self.last_refusal < REFUSAL_WINDOW


class Liveness:
    """Health and readiness verdicts for one worker; ``run`` samples the loop's lag."""

    def __init__(
        self,
        link: ControlLink,
        guard: FdGuard | None,
        max_disconnected: float,
        max_loop_lag: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.link = link
        self.guard = guard
        self.max_disconnected = max_disconnected
        self.max_loop_lag = max_loop_lag
        self._clock = clock
        self._stalls: list[tuple[float, float]] = []  # (when, lag) above the bound, recent
        self.lag = 0.0  # the latest sample

    async def run(self) -> None:
        """Sample how late a timer fires: the loop's lag (runs until cancelled)."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LAG_SAMPLE)
            self.record(loop.time() - start - LAG_SAMPLE)

    def record(self, lag: float) -> None:
        now = self._clock()
        self.lag = lag
        if lag > self.max_loop_lag:
            log.error("event loop stalled for %.1fs", lag)
            self._stalls.append((now, lag))
        self._stalls = [(t, g) for t, g in self._stalls if now - t < LAG_WINDOW]

    def disconnected_for(self) -> float:
        since = self.link.disconnected_since
        return 0.0 if since is None else self._clock() - since

    def health(self) -> str | None:
        """Why the worker counts as wedged, or None when it is healthy."""
        down = self.disconnected_for()
        if down > self.max_disconnected:
            return f"no control connection for {down:.0f}s"
        if self._stalls:
            return f"event loop stalled for {max(g for _, g in self._stalls):.1f}s"
        return None

    def unready(self) -> str | None:
        """Why the worker cannot serve right now (beyond drain and sessions), or None."""
        if self.link.disconnected_since is not None:
            return "no control connection"
        if self.guard is not None and self.guard.refusing():
            return "refusing connections at the descriptor limit"
        return None

    def families(self) -> Iterator[Metric]:
        p = "backdial_sidecar_"
        link = self.link
        yield gauge(
            p + "control_connected",
            "1 while the control connection to the acceptor is up.",
            [({}, 0.0 if link.disconnected_since is not None else 1.0)],
        )
        yield counter(
            p + "control_connects_total",
            "Control connections established (reconnects included).",
            [({}, float(link.control_connects))],
        )
        yield counter(
            p + "control_connect_failures_total",
            "Control connection attempts that failed (EMFILE included); retried forever.",
            [({}, float(link.control_failures))],
        )
        yield gauge(p + "loop_lag_seconds", "Event-loop lag, latest sample.", [({}, self.lag)])
        yield counter(
            p + "connections_refused_total",
            "Client connections answered 503 at once, by reason.",
            [({"reason": "fd_limit"}, float(self.guard.refused if self.guard else 0))],
        )
