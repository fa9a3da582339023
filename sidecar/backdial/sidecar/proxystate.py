"""What every client connection of one listener shares: settings, counters, graceful stop.

``ProxySettings`` are the listener's limits; ``ProxyStats`` holds plain
integer counters the proxy bumps inline and renders only when scraped;
``ProxyServerState`` owns the set of connections, the single timeout sweep
and the worker's graceful-stop handle.  The per-connection protocol lives in
``proxy.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backdial.metrics import LATENCY_BUCKETS, Exposition, Histogram
from backdial.sidecar import http1
from backdial.sidecar.upstream import UpstreamProtocol

if TYPE_CHECKING:
    from backdial.sidecar.leases import LeasePool, Ticket
    from backdial.sidecar.proxy import ClientProtocol


# -- settings and counters ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Limits and timeouts of one listener (sizes in bytes, times in seconds)."""

    max_request_body: int = 1 << 20  # buffered before a lease is taken
    max_request_body_stream: int = 64 << 20  # hard cap; between the two the body streams
    max_header_bytes: int = 64 << 10  # request head; beyond it 431
    response_buffer: int = 1 << 20  # response bytes held for a slow client before back-pressure
    upstream_timeout: float = 60.0  # response must start (and keep flowing) within this; else 504
    client_idle_timeout: float = 75.0  # idle keep-alive client connection
    drain_idle_grace: float = 1.0  # on graceful stop, idle connections may send one more request
    request_timeout: float = 30.0  # receiving one request (head + buffered body); else 408
    send_timeout: float = 60.0  # a client that reads nothing while a lease streams to it
    proxy_protocol: bool = False  # expect a PROXY v1/v2 header on every connection
    via: str = "backdial"  # pseudonym in "Via: 1.1 <via>"
    forwarded_proto: str = "http"  # X-Forwarded-Proto / Forwarded proto=
    max_retries: int = 2  # idempotent requests whose session failed before any response byte
    max_pipeline: int = 16  # parsed requests queued per connection before reading pauses
    tick: float = 0.25  # timeout sweep granularity


class SliceCounters:
    """Requests of one slice: counts by status code and the latency histogram."""

    __slots__ = ("latency", "status")

    def __init__(self) -> None:
        self.status = [0] * 600
        self.latency = Histogram(LATENCY_BUCKETS)


class ProxyStats:
    """Plain integer counters the proxy bumps inline; rendered only when scraped."""

    def __init__(self) -> None:
        self.slices: dict[str, SliceCounters] = {}
        self.connections_total = 0
        self.connections_active = 0
        self.requests_active = 0
        self.buffered_request_bytes = 0  # gauge: request bodies held before/while leasing
        self.upstream_failed = 0  # session failed before any response byte
        self.upstream_broken_mid_response = 0
        self.upstream_timeouts = 0  # 504s and stalled responses
        self.retries = 0
        self.unavailable: dict[str, int] = {"queue_full": 0, "timeout": 0, "no_capacity": 0}
        self.requests_streamed = 0  # request bodies above max_request_body
        self.responses_streamed = 0  # responses that outgrew response_buffer under a lease
        self.tunnels = 0
        self.client_aborts = 0  # client went away with a request in flight
        self.proxy_header_errors = 0

    def slice(self, name: str) -> SliceCounters:
        counters = self.slices.get(name)
        if counters is None:
            counters = self.slices[name] = SliceCounters()
        return counters

    def render(self, exp: Exposition) -> None:
        p = "backdial_sidecar_"
        exp.family(
            p + "requests_total",
            "counter",
            "Client requests answered, by slice and status code.",
            [
                ({"slice": name or "none", "code": str(code)}, float(n))
                for name, c in sorted(self.slices.items())
                for code, n in enumerate(c.status)
                if n
            ],
        )
        exp.histogram(
            p + "request_duration_seconds",
            "From the request head to the last response byte handed to the client.",
            [({"slice": name or "none"}, c.latency) for name, c in sorted(self.slices.items())],
        )
        gauges = (
            ("client_connections", "Open client connections.", self.connections_active),
            ("requests_in_flight", "Requests being served.", self.requests_active),
            ("request_buffered_bytes", "Request body bytes buffered.", self.buffered_request_bytes),
        )
        for name, text, value in gauges:
            exp.family(p + name, "gauge", text, [({}, float(value))])
        counters = (
            ("client_connections_total", "Client connections accepted.", self.connections_total),
            ("upstream_retries_total", "Idempotent requests retried.", self.retries),
            ("requests_streamed_total", "Bodies streamed under a lease.", self.requests_streamed),
            ("responses_streamed_total", "Responses over the buffer.", self.responses_streamed),
            ("tunnels_total", "Upgraded connections tunnelled.", self.tunnels),
            ("client_aborts_total", "Clients gone mid-request.", self.client_aborts),
            ("proxy_header_errors_total", "Bad PROXY headers.", self.proxy_header_errors),
        )
        for name, text, value in counters:
            exp.family(p + name, "counter", text, [({}, float(value))])
        exp.family(
            p + "upstream_errors_total",
            "counter",
            "Session failures: before any response byte, mid-response, timeouts.",
            [
                ({"kind": "before_response"}, float(self.upstream_failed)),
                ({"kind": "mid_response"}, float(self.upstream_broken_mid_response)),
                ({"kind": "timeout"}, float(self.upstream_timeouts)),
            ],
        )
        exp.family(
            p + "unavailable_total",
            "counter",
            "503 answers by reason (queue_full, timeout, no_capacity).",
            [({"reason": k}, float(v)) for k, v in self.unavailable.items()],
        )


# -- server state: connections, timeout sweep, graceful stop --------------------------------------
class ProxyServerState:
    """What every connection of one listener shares; the worker's handle for a graceful stop."""

    def __init__(self, pool: LeasePool, settings: ProxySettings, stats: ProxyStats) -> None:
        http1.require_strict_parser()
        self.pool = pool
        self.settings = settings
        self.stats = stats
        self.connections: set[ClientProtocol] = set()
        self.draining = False
        self.via = settings.via.encode("ascii")
        self.proto = settings.forwarded_proto.encode("ascii")
        # Optional synchronous fast path: an idle held session without creating a task.
        self.try_acquire: Callable[[str, str], UpstreamProtocol | None] | None = getattr(
            pool, "try_acquire", None
        )
        # Optional callback waiting (LeasePool.wait): no task per waiting request.
        self.wait: Callable[[str, str, Any], Ticket] | None = getattr(pool, "wait", None)
        self._timer: asyncio.TimerHandle | None = None
        self._empty: asyncio.Event | None = None

    def add(self, conn: ClientProtocol) -> None:
        self.connections.add(conn)
        self.stats.connections_total += 1
        self.stats.connections_active += 1
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.settings.tick, self._sweep)

    def remove(self, conn: ClientProtocol) -> None:
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
        self._timer = loop.call_later(self.settings.tick, self._sweep)

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
        for conn in list(self.connections):
            conn.abort()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return aborted
