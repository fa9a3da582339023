"""The native engine's Python side: counters, budgets, the listener and the hand-over.

``NativeStats`` is ``ProxyStats`` whose counters read as the sum of what the Python
path counted and what the engine counted, so ``/metrics`` and every test see one set
of numbers.  ``NativeBudget`` is a ``spool.Budget`` kept by the engine (response spill
and request bodies are booked by both paths against one limit).  ``NativeListener``
is the ``ListenerState`` of a worker whose client connections the engine accepts: the
Python path serves the connections the engine hands over (``AdoptedClient``), and a
graceful stop drains both.  ``EngineHooks`` receives what the engine reports.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from backdial.control import Rejection
from backdial.metrics import Histogram
from backdial.sidecar.config import ProxySettings
from backdial.sidecar.cpupolicy import CpuPolicy
from backdial.sidecar.lease import Ticket
from backdial.sidecar.listener import ListenerState, SweptConnection
from backdial.sidecar.nativepool import NativeLeasePool
from backdial.sidecar.proxy import ClientProtocol
from backdial.sidecar.spool import Budget, SpoolFile
from backdial.sidecar.stats import ProxyStats, SliceCounters

MEMORY, DISK, RESPONSE = 0, 1, 2  # the engine's budgets (request memory, spill, response memory)
NATIVE_BODY_MAX = 64 * 1024  # bodies the engine reads itself; longer ones go to Python

ENGINE_COUNTERS = (
    "connections_total",
    "connections_active",
    "requests_active",
    "upstream_failed",
    "upstream_broken_mid_response",
    "upstream_timeouts",
    "retries",
    "responses_streamed",
    "responses_spilled",
    "response_memory_full",
    "client_aborts",
    "untrusted_forwarding",
    "handovers",
    "cpu_policy_switches",
    "cpu_policy_refused",
)


def engine_settings(settings: ProxySettings) -> dict[str, Any]:
    return {
        "max_header_bytes": settings.max_header_bytes,
        "max_body": min(settings.max_request_body, NATIVE_BODY_MAX),
        "response_buffer": settings.response_buffer,
        "response_memory_total": settings.response_memory_total,
        "response_spill_max": settings.response_spill_max,
        "spill_dir": settings.spill_dir,
        "upstream_timeout": settings.upstream_timeout,
        "client_idle_timeout": settings.client_idle_timeout,
        "drain_idle_grace": settings.drain_idle_grace,
        "request_timeout": settings.request_timeout,
        "send_timeout": settings.send_timeout,
        "max_retries": settings.max_retries,
        "tick": settings.tick,
        # PROXY protocol headers are read by the Python path: it gets every connection.
        "takeover_all": settings.proxy_protocol,
        "fd_reserve": settings.fd_reserve,
        "queued_batch": settings.queued_cpu_policy.resolved(native=True) is CpuPolicy.BATCH,
        "via": settings.via,
        "proto": settings.forwarded_proto,
        "trusted_proxies": list(settings.trusted_proxies),
    }


# -- counters ---------------------------------------------------------------------------------
class _Merged(dict[Rejection, int]):
    """``unavailable`` as the sum of both paths; ``+=`` from Python lands in its own part."""

    def __init__(self, own: dict[Rejection, int], native: dict[Rejection, int]) -> None:
        super().__init__({k: own.get(k, 0) + native.get(k, 0) for k in Rejection})
        self._own, self._native = own, native

    def __setitem__(self, key: Rejection, value: int) -> None:
        super().__setitem__(key, value)
        self._own[key] = value - self._native.get(key, 0)


class NativeStats(ProxyStats):
    """``ProxyStats`` reading as Python's counts plus the engine's."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._own: dict[str, int] = {}
        self._own_unavailable: dict[Rejection, int] = {}
        self._own_slices: dict[str, SliceCounters] = {}
        super().__init__()
        self.request_memory = NativeBudget(engine, MEMORY)
        # One response memory budget for the engine's client output and Python's
        # (clientout.ClientOutput books its transports' bytes here).
        self.response_memory = NativeBudget(engine, RESPONSE)

    @property
    def unavailable(self) -> dict[Rejection, int]:
        native = dict(zip(Rejection, self._engine.unavailable(), strict=True))
        return _Merged(self._own_unavailable, native)

    @unavailable.setter
    def unavailable(self, value: dict[Rejection, int]) -> None:
        self._own_unavailable = dict(value)

    @property
    def slices(self) -> dict[str, SliceCounters]:
        merged: dict[str, SliceCounters] = {}
        for name, own in self._own_slices.items():
            c = merged[name] = SliceCounters()
            c.status = list(own.status)
            _add(c.latency, own.latency.counts, own.latency.sum)
        for name, (status, latency, _wait, _rej) in self._engine.slice_figures().items():
            if not status:
                continue
            c = merged.get(name) or merged.setdefault(name, SliceCounters())
            for code, n in status.items():
                c.status[code] += n
            _add(c.latency, *latency)
        return merged

    @slices.setter
    def slices(self, value: dict[str, SliceCounters]) -> None:
        self._own_slices = value

    def slice(self, name: str) -> SliceCounters:
        counters = self._own_slices.get(name)
        if counters is None:
            counters = self._own_slices[name] = SliceCounters()
        return counters


def _add(hist: Histogram, counts: list[int], total: float) -> None:
    for i, n in enumerate(counts):
        hist.counts[i] += n
    hist.count += sum(counts)
    hist.sum += total


def _merged_counter(name: str) -> property:
    def get(self: NativeStats) -> int:
        own = self._own.get(name, 0)
        native: int = self._engine.counter(name)
        return own + native

    def set_(self: NativeStats, value: int) -> None:
        self._own[name] = value - self._engine.counter(name)

    return property(get, set_)


for _name in ENGINE_COUNTERS:
    setattr(NativeStats, _name, _merged_counter(_name))


class NativeBudget(Budget):
    """A ``spool.Budget`` the engine keeps, so both paths book against one limit."""

    __slots__ = ("_engine", "_index")

    def __init__(self, engine: Any, index: int, limit: int | None = None) -> None:
        self._engine, self._index = engine, index
        if limit is not None:
            self.limit = limit

    def _get(self) -> tuple[int, int, int]:
        got: tuple[int, int, int] = self._engine.budget(self._index)
        return got

    @property
    def limit(self) -> int:
        return self._get()[0]

    @limit.setter
    def limit(self, value: int) -> None:
        _, used, refused = self._get()
        self._engine.budget_set(self._index, value, used, refused)

    @property
    def used(self) -> int:
        return self._get()[1]

    @used.setter
    def used(self, value: int) -> None:
        self._engine.budget_add(self._index, value - self._get()[1])

    @property
    def refused(self) -> int:
        return self._get()[2]

    @refused.setter
    def refused(self, value: int) -> None:
        limit, used, _ = self._get()
        self._engine.budget_set(self._index, limit, used, value)

    def take(self, n: int) -> bool:
        ok: bool = self._engine.budget_take(self._index, n)
        return ok

    def give(self, n: int) -> None:
        self._engine.budget_add(self._index, -n)

    def book(self, n: int) -> None:
        self._engine.budget_add(self._index, n)


# -- the listener -----------------------------------------------------------------------------
class AdoptedClient(ClientProtocol):
    """A connection the engine handed over, with the bytes it had not served yet."""

    def __init__(self, state: ListenerState, early: bytes) -> None:
        super().__init__(state)
        self._early = early

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        early, self._early = self._early, b""
        if early and not self._closed:
            self.data_received(early)
            r = self._r
            if r is not None and r.in_head and not self._dead:
                # A head the engine saw arrive over several reads: bound it as the reads
                # that neither began nor ended it would have been (``_parse``).
                self._head_bytes += len(early.rsplit(b"\r\n\r\n", 1)[-1])
                if self._head_bytes > self.settings.max_header_bytes:
                    self._parse_failed(431)
                    self._next()


class NativeListener(ListenerState):
    """``ListenerState`` of a worker whose connections the engine accepts."""

    def __init__(self, pool: NativeLeasePool, settings: ProxySettings, stats: NativeStats) -> None:
        self.engine = pool.engine
        self._changed = asyncio.Event()
        super().__init__(pool, settings, stats)
        self.disk_budget = disk = NativeBudget(self.engine, DISK, settings.response_spill_total)
        stats.spilled_bytes = lambda: disk.used
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def draining(self) -> bool:
        flag: bool = self.engine.draining()
        return flag

    @draining.setter
    def draining(self, value: bool) -> None:
        self.engine.set_draining(value)

    def factory(self, early: bytes = b"") -> Callable[[], ClientProtocol]:
        return lambda: AdoptedClient(self, early)

    def adopt(self, fd: int, early: bytes) -> None:
        """The engine hands a connection over at a request boundary."""
        sock = socket.socket(fileno=fd)
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(self.factory(early), sock))
        self._tasks.add(task)
        task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            pass  # the client went away before we took it: nothing to serve

    def add(self, conn: SweptConnection) -> None:
        super().add(conn)
        self.engine.set_python_fds(len(self.connections) + SpoolFile.open_files)

    def remove(self, conn: SweptConnection) -> None:
        super().remove(conn)
        self.engine.set_python_fds(len(self.connections) + SpoolFile.open_files)
        self._changed.set()

    def native_empty(self) -> None:
        self._changed.set()

    async def shutdown(self, timeout: float) -> int:  # noqa: ASYNC109 (the worker's API)
        """Both paths: idle connections get the grace, in-flight ones finish, the rest is cut."""
        self.draining = True
        self.engine.drain()
        for conn in list(self.connections):
            conn.drain()
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, timeout)
        while self.connections or self.engine.connections():
            left = end - loop.time()
            if left <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                break
        aborted = len(self.connections) + int(self.engine.abort_all())
        self._cut()
        return aborted


class EngineHooks:
    """What the engine reports, delivered when its lock is released."""

    def __init__(self, pool: NativeLeasePool, listener: NativeListener | None = None) -> None:
        self.pool = pool
        self.listener = listener

    def adopt(self, fd: int, data: bytes) -> None:
        if self.listener is None:
            socket.socket(fileno=fd).close()
            return
        self.listener.adopt(fd, data)

    def give_back(self, handle: int, state: str) -> None:
        self.pool.gave_back(handle, state)

    def handoff(self, handle: int, ticket: Ticket, pre: bytes, waited: float) -> None:
        self.pool.handed(handle, ticket, pre)

    def refused(self, ticket: Ticket, reason: str, waited: float) -> None:
        self.pool.refused(ticket, reason)

    def want(self, urgent: bool) -> None:
        self.pool._mark_want(urgent)

    def ask(self) -> None:
        """ASK units are due: sent now, at the end of the engine's turn (its asks together)."""
        self.pool._flush_asks()

    def drained(self) -> None:
        if self.pool.closing:
            self.pool._drained.set()

    def empty(self) -> None:
        if self.listener is not None:
            self.listener.native_empty()

    def fd_refused(self) -> None:
        if self.listener is not None:
            self.listener.fd_guard.refuse()


class NativeServer:
    """What the worker closes to stop accepting (``asyncio.Server``'s part it uses)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def close(self) -> None:
        self.engine.unlisten()


def start(
    pool: NativeLeasePool, settings: ProxySettings, stats: NativeStats
) -> tuple[Callable[[], ClientProtocol], NativeListener]:
    """The worker's listener state on the engine (``make_protocol_factory``'s twin)."""
    state = NativeListener(pool, settings, stats)
    pool.engine.set_hooks(EngineHooks(pool, state))
    return state.factory(), state


def serve(state: NativeListener, listener: socket.socket) -> NativeServer:
    """Accept clients from *listener* in the engine."""
    # Non-blocking for every holder (they share the open file): a dup made later by the
    # drain keeps the socket object's mode, and a worker racing us for a connection
    # must leave our accept with EAGAIN, not block the loop.
    listener.setblocking(False)
    state.engine.listen(listener.fileno())
    return NativeServer(state.engine)
