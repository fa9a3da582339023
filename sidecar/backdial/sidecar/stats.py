"""The proxy's counters: plain integers bumped inline, rendered only when scraped.

The hot path pays an integer add per event; nothing is formatted until
``/metrics`` is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import Metric

from backdial.control import Rejection
from backdial.metrics import LATENCY_BUCKETS, Histogram, counter, gauge, histogram
from backdial.sidecar.spool import Budget


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
        # Request bodies held before leasing (spool.py budgets; ListenerState sets the limits).
        self.request_memory = Budget(0)
        self.request_disk = Budget(0)
        self.request_buffer_refusals = 0  # 503s: no budget left for a body
        self.slow_bodies = 0  # 408s: a body below body_min_rate
        self.chunk_refusals = 0  # 413s: a chunk declared beyond the body limit
        self.upstream_failed = 0  # session failed before any response byte
        self.upstream_broken_mid_response = 0
        self.upstream_timeouts = 0  # 504s and stalled responses
        self.retries = 0
        self.unavailable: dict[Rejection, int] = dict.fromkeys(Rejection, 0)
        self.requests_streamed = 0  # request bodies above max_request_body
        self.responses_streamed = 0  # responses that outgrew response_buffer under a lease
        self.responses_spilled = 0  # responses parked in a spill file for a slow client
        self.spilled_bytes: Callable[[], int] = lambda: 0  # bytes in spill files now
        # Response bytes in memory waiting for clients, all connections (clientout.py).
        self.response_memory = Budget(0)
        self.response_memory_full = 0  # writes that found it spent (spilled or waited)
        self.tunnels = 0
        self.client_aborts = 0  # client went away with a request in flight
        self.proxy_header_errors = 0
        self.untrusted_forwarding = 0  # forwarding claims from untrusted peers, replaced
        self.handovers = 0  # connections the native engine gave to the python engine
        # Worker scheduling-policy switches while requests wait (cpupolicy.py), and
        # switches the kernel refused (then the feature is off for the worker).
        self.cpu_policy_switches = 0
        self.cpu_policy_refused = 0

    @property
    def buffered_request_bytes(self) -> int:
        """Request body bytes held in memory (the gauge ``request_buffered_bytes``)."""
        return self.request_memory.used

    def slice(self, name: str) -> SliceCounters:
        counters = self.slices.get(name)
        if counters is None:
            counters = self.slices[name] = SliceCounters()
        return counters

    def families(self) -> Iterator[Metric]:
        """The proxy's metric families, read from the counters now."""
        p = "backdial_sidecar_"
        yield counter(
            p + "requests_total",
            "Client requests answered, by slice and status code.",
            [
                ({"slice": name or "none", "code": str(code)}, float(n))
                for name, c in sorted(self.slices.items())
                for code, n in enumerate(c.status)
                if n
            ],
        )
        yield histogram(
            p + "request_duration_seconds",
            "From the request head to the last response byte handed to the client.",
            [({"slice": name or "none"}, c.latency) for name, c in sorted(self.slices.items())],
        )
        gauges = (
            ("client_connections", "Open client connections.", self.connections_active),
            ("requests_in_flight", "Requests being served.", self.requests_active),
            ("request_buffered_bytes", "Request body bytes in memory.", self.request_memory.used),
            ("request_spooled_bytes", "Request body bytes in spool files.", self.request_disk.used),
            ("response_spilled_bytes", "Response bytes in spill files.", self.spilled_bytes()),
            (
                "response_buffered_bytes",
                "Response bytes in memory waiting for clients to read them.",
                self.response_memory.used,
            ),
        )
        for name, text, value in gauges:
            yield gauge(p + name, text, [({}, float(value))])
        counters = (
            ("client_connections_total", "Client connections accepted.", self.connections_total),
            ("upstream_retries_total", "Idempotent requests retried.", self.retries),
            ("requests_streamed_total", "Bodies streamed under a lease.", self.requests_streamed),
            ("responses_streamed_total", "Responses over the buffer.", self.responses_streamed),
            ("responses_spilled_total", "Responses spilled to a file.", self.responses_spilled),
            ("tunnels_total", "Upgraded connections tunnelled.", self.tunnels),
            ("client_aborts_total", "Clients gone mid-request.", self.client_aborts),
            ("proxy_header_errors_total", "Bad PROXY headers.", self.proxy_header_errors),
            ("slow_bodies_total", "Bodies cut (408) below the minimum rate.", self.slow_bodies),
            (
                "oversized_chunks_total",
                "Chunked bodies refused (413) at a size line declaring more than the limit.",
                self.chunk_refusals,
            ),
            (
                "response_memory_full_total",
                "Response writes that found the response memory budget spent (the rest went "
                "to a spill file, or waited with the session paused).",
                self.response_memory_full,
            ),
            (
                "request_buffer_refusals_total",
                "Requests answered 503 because no memory or spool budget was left for the body.",
                self.request_buffer_refusals,
            ),
            (
                "untrusted_forwarding_total",
                "Addresses claimed by untrusted peers (PROXY, X-Forwarded-For...), replaced.",
                self.untrusted_forwarding,
            ),
            (
                "engine_handovers_total",
                "Client connections the native engine handed to the python engine (requests "
                "outside its subset; always 0 with the python engine).",
                self.handovers,
            ),
            (
                "cpu_policy_switches_total",
                "Switches of the worker's scheduling policy between normal and batch, made as "
                "requests start and stop waiting for sessions (--queued-cpu-policy).",
                self.cpu_policy_switches,
            ),
            (
                "cpu_policy_refused_total",
                "Policy switches the kernel refused; the worker then stays normal.",
                self.cpu_policy_refused,
            ),
        )
        for name, text, value in counters:
            yield counter(p + name, text, [({}, float(value))])
        yield counter(
            p + "upstream_errors_total",
            "Session failures: before any response byte, mid-response, timeouts.",
            [
                ({"kind": "before_response"}, float(self.upstream_failed)),
                ({"kind": "mid_response"}, float(self.upstream_broken_mid_response)),
                ({"kind": "timeout"}, float(self.upstream_timeouts)),
            ],
        )
        yield counter(
            p + "unavailable_total",
            "503 answers by reason (queue_full, timeout, draining).",
            [({"reason": k}, float(v)) for k, v in self.unavailable.items()],
        )
