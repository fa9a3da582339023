"""The lease pool's shared state and the operations every part of it uses.

``leasepool.LeasePool`` is one class assembled from parts, each a module of one
concept:

* ``leasepool.py``: the sticky-lease hot path (``try_acquire``, ``release``,
  ``_settle``), ``acquire`` for awaiting callers, the figures and shutdown;
* ``poolwait.WaitQueue``: the local FIFO waiters (per-slice shares of
  ``maxWaiting``, the queue timer) and reporting them to the acceptor (WANT,
  coalesced);
* ``poolask.Asker``: requests that may not wait (control revision 3): ASK,
  the GRANT ``asked``/REFUSE answers, and the probes (RECALL ``now``) this
  worker answers for other workers' asks;
* ``poolcontrol.ControlClient``: the control connection (connect, reconnect
  with backoff, the records it receives, CONFIG, adopting granted sessions,
  the idle sweep, the listening socket).

They share this base: the pool's attributes, all set here once, so every part
reads the same instance dict and the hot path pays no extra lookup; the book's
state as read by admin, metrics and tests; and what all parts need (hand-off
delivery, giving sessions back in coalesced RELEASE records).  Where one part
calls into another, the base declares that method for the type checker only:
at run time ``LeasePool``'s own is found through its method resolution order,
which CPython caches per type, so a call costs what it did in a single class.
``nativepool.NativeLeasePool`` overrides the documented hooks on ``LeasePool``
whichever part defines them.

The refusals (``Refused`` and its kinds) live here so that every part can raise
them; ``leasepool`` re-exports them, where the proxy and tests import them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from backdial import control, fdpass
from backdial.control import Rejection, ReleaseState, WantKey
from backdial.metrics import LATENCY_BUCKETS, Histogram
from backdial.policy import Policy, Slice
from backdial.sdk.backoff import StateLog
from backdial.sidecar.cpupolicy import CpuPolicy, CpuSwitch
from backdial.sidecar.idlering import IdleRing
from backdial.sidecar.lease import Lease, LeasedConn, Ticket, Waiter
from backdial.sidecar.leasebook import LeaseBook

log = logging.getLogger("backdial.sidecar")

ConnFactory = Callable[[Lease], Awaitable[LeasedConn]]


class Refused(Exception):
    """A request the pool answers with 503 and ``Retry-After`` (``reason`` says why)."""

    reason: Rejection

    def __init__(self, retry_after: int) -> None:
        super().__init__(self.reason.value)
        self.retry_after = retry_after


class QueueFull(Refused):
    """The slice's queue (this worker's part of it) is full, and no session can be had
    now (as the acceptor answered an ASK)."""

    reason = Rejection.QUEUE_FULL


class QueueTimeout(Refused):
    """No session within the slice's queue timeout."""

    reason = Rejection.TIMEOUT


class Draining(Refused):
    """The pool is closing; nothing can be leased."""

    reason = Rejection.DRAINING


@dataclass(slots=True)
class SliceStats:
    wait: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    rejected: collections.Counter[Rejection] = field(default_factory=collections.Counter)


class PoolBase:
    """A worker's lease pool's state; see the module docstring for the parts that use it."""

    def __init__(self, run_dir: Path, conn_factory: ConnFactory, name: str = "") -> None:
        self.control_path = run_dir / "control.sock"
        self.conn_factory = conn_factory
        self.name = name
        self.policy = Policy()
        self._queues: dict[str, tuple[Slice, int]] = {}
        self.generation = 0
        self.workers = 1
        self.index = 0
        self.worker_id = 0
        self.acceptor_revision = 1  # from CONFIG; ASK needs control.ASK_REVISION
        # held / busy / idle / waiters / recall: the pure bookkeeping (leasebook.py)
        self.book: LeaseBook[LeasedConn] = LeaseBook()
        self._timer: asyncio.TimerHandle | None = None  # fires at the earliest queue deadline
        self._timer_at = 0.0
        self._handoffs: list[tuple[Ticket, LeasedConn]] = []
        self.stats: dict[str, SliceStats] = collections.defaultdict(SliceStats)
        self.registered = 0  # sessions registered at the acceptor, as last announced
        # The loop thread's policy while requests wait (cpupolicy.py); the python engine's
        # worker sets it from --queued-cpu-policy, the native engine switches itself.
        self.cpu = CpuSwitch(CpuPolicy.NORMAL)
        self.closing = False
        self._drained = asyncio.Event()  # set when closing and no session is busy
        self.connected = asyncio.Event()
        self.disconnected_since: float | None = time.monotonic()  # None while connected
        self.control_connects = 0  # control connections established
        self.control_failures = 0  # attempts that failed (EMFILE included): retried forever
        self._outage = StateLog(log, interval=30.0)
        self.configured = asyncio.Event()
        self._channel: fdpass.Channel | None = None
        self._epoch = 0
        self._reported: dict[WantKey, int] = {}
        self._want_dirty = False
        self._want_urgent = False
        self._last_want = 0.0
        self._release_buf: list[control.Released] = []
        self._release_due = False
        self._answers = 0  # RECALLs now answered, told with the next RELEASE
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._listen_waiters: dict[str, asyncio.Future[socket.socket]] = {}
        self._listeners: dict[str, socket.socket] = {}  # what the acceptor handed us
        self._loop = asyncio.get_running_loop()
        self._split_queues()

    if TYPE_CHECKING:
        # The other parts' entry points (leasepool.py, poolwait.py, poolask.py): type
        # checking only, see the module docstring.
        def try_acquire(self, service: str, slice_name: str) -> LeasedConn | None: ...

        def _settle(self, conn: LeasedConn) -> None: ...

        def _split_queues(self) -> None: ...

        def _arm(self, deadline: float, now: float) -> None: ...

        def _mark_want(self, urgent: bool = False) -> None: ...

        def _flush_want(self) -> None: ...

        def _ask(self, key: WantKey, waiter: Waiter, now: float, timeout: float) -> Ticket: ...

        def _may_ask(self) -> bool: ...

        def _answer_probes(self) -> None: ...

        def _granted(self, key: WantKey, asked: bool) -> int: ...

        def _ask_refused(self, key: WantKey, n: int) -> None: ...

        def _adopted(self, grant: int) -> None: ...

        def _forget_asks(self) -> None: ...

    def cpu_contended(self, contended: bool) -> None:
        """The worker's CPUs as last sampled (``cpuload.CpuWatch``): batch needs them busy."""
        self.cpu.sample(contended, self.book.waiting + self.book.asking)

    # The book's state, as the worker's admin, metrics and tests read it.
    @property
    def held(self) -> dict[int, LeasedConn]:
        return self.book.held

    @property
    def busy(self) -> set[int]:
        return self.book.busy

    @property
    def idle(self) -> dict[WantKey, IdleRing[LeasedConn]]:
        return self.book.idle

    @property
    def waiters(self) -> dict[WantKey, collections.deque[Ticket]]:
        return self.book.waiters

    @property
    def recall(self) -> collections.Counter[tuple[str, str]]:
        return self.book.recall

    @property
    def waiting(self) -> int:
        return self.book.waiting

    @property
    def asks(self) -> dict[WantKey, collections.deque[Ticket]]:
        return self.book.asks

    # -- shared by the parts: hand-offs and releases ------------------------------------------
    def _hand(self, ticket: Ticket, conn: LeasedConn) -> None:
        # Hand-offs are delivered together at the end of this loop iteration: writing
        # a queued request onto the session right here would wake its service in the
        # middle of our own callback and, on a shared core, preempt us once per request.
        if not self._handoffs:
            self._loop.call_soon(self._deliver)
        self._handoffs.append((ticket, conn))

    def _deliver(self) -> None:
        handoffs, self._handoffs = self._handoffs, []
        for ticket, conn in handoffs:
            ticket.waiter.lease_ready(conn)

    def _give_back(self, conn: LeasedConn, state: ReleaseState) -> None:
        lease = conn.lease
        self.book.held.pop(lease.session, None)
        conn.close()
        if lease.epoch == self._epoch and self._channel is not None:
            self._release_buf.append(control.Released(lease.session, state))
            self._schedule_release()

    def _schedule_release(self) -> None:
        if not self._release_due:
            self._release_due = True
            self._loop.call_soon(self._flush_release)

    def _return_idle(self, conn: LeasedConn) -> None:
        """Give an idle session back unasked: it still answers a pending recall of its
        slice, as the acceptor counts it (so neither side keeps a stale recall)."""
        self._count_returned(conn.lease)
        self._give_back(conn, ReleaseState.IDLE)

    def _flush_release(self) -> None:
        self._release_due = False
        items, self._release_buf = self._release_buf, []
        answers, self._answers = self._answers, 0
        if (items or answers) and self._channel is not None:
            self._channel.send(control.Release(items, answers))

    def _count_returned(self, lease: Lease) -> None:
        self.book.returned(lease)
