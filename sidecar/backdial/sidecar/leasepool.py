"""The worker's lease pool: sticky leases, local FIFO waiters, the control client.

At steady state a request takes an idle session this worker already holds and
gives it back here when done: no message to the acceptor.  Only when the
worker has no idle session for the (service, slice) does it report its number
of waiters (WANT) and wait for a GRANT; a request that may not wait (the
worker's part of the slice's ``queue.maxWaiting`` is full, always for
``maxWaiting: 0``) asks the acceptor for a session *now* (ASK) and is served by
the GRANT or answered 503 at the REFUSE.  Sessions go back to the acceptor when
it recalls them, when they sit idle longer than ``leaseIdleRelease``, or when
they broke or were retired.  If the control connection drops, leases in use
finish their request and are then closed (the acceptor has reclaimed them),
and the pool reconnects with backoff.

Which session serves which request (take, settle, the per-key FIFO, recalls) is
decided by the pure ``LeaseBook`` (leasebook.py); this module is its shell: the
control connection, the queue timer, WANT coalescing and hand-off delivery.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from backdial import control, fdpass
from backdial.control import ErrorCode, Rejection, ReleaseState, WantKey
from backdial.metrics import LATENCY_BUCKETS, Histogram
from backdial.policy import Policy, PolicyError, Slice, policy_from_data
from backdial.sdk.backoff import StateLog
from backdial.sidecar.idlering import IdleRing
from backdial.sidecar.lease import Lease, LeasedConn, Ticket, Waiter
from backdial.sidecar.leasebook import LeaseBook, Settle

log = logging.getLogger("backdial.sidecar")

WANT_INTERVAL = 0.02  # seconds between coalesced WANT updates for keys already waiting
_IDLE: Final = ReleaseState.IDLE  # bound once: enum attribute access costs ~0.1 us on 3.11

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


_REFUSED: dict[Rejection, type[Refused]] = {
    cls.reason: cls for cls in (QueueFull, QueueTimeout, Draining)
}


@dataclass(slots=True)
class SliceStats:
    wait: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    rejected: collections.Counter[Rejection] = field(default_factory=collections.Counter)


def _resolve(fut: asyncio.Future[Exception | None], exc: Exception | None) -> None:
    if not fut.done():
        fut.set_result(exc)


class _FutureWaiter:
    """Adapts the callback API to ``await pool.acquire()``."""

    __slots__ = ("fut", "pool")

    def __init__(self, pool: LeasePool, fut: asyncio.Future[LeasedConn]) -> None:
        self.pool, self.fut = pool, fut

    def lease_ready(self, conn: LeasedConn) -> None:
        if self.fut.done():  # the awaiting task was cancelled meanwhile
            self.pool.release(conn, ReleaseState.IDLE)
        else:
            self.fut.set_result(conn)

    def lease_refused(self, reason: Rejection, retry_after: int) -> None:
        if not self.fut.done():
            self.fut.set_exception(_REFUSED[reason](retry_after))


class LeasePool:
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

    # -- public API used by the proxy --------------------------------------------------
    def try_acquire(self, service: str, slice_name: str) -> LeasedConn | None:
        """The no-wait path: an idle session this worker holds, or None.

        Synchronous, so the proxy needs no task per request at steady state.  It
        never jumps a queue: with waiters for the key, idle sessions go to them.
        """
        return self.book.take((service, slice_name))

    async def acquire(self, service: str, slice_name: str) -> LeasedConn:
        """``try_acquire``, else wait in the slice's queue (raises the 503 exceptions)."""
        conn = self.try_acquire(service, slice_name)
        if conn is not None:
            return conn
        fut: asyncio.Future[LeasedConn] = self._loop.create_future()
        ticket = self.wait(service, slice_name, _FutureWaiter(self, fut))
        try:
            return await fut
        except asyncio.CancelledError:
            self.cancel(ticket)
            raise

    def release(self, conn: LeasedConn, state: ReleaseState) -> None:
        lease = conn.lease
        book = self.book
        book.busy.discard(lease.session)
        if self.closing and not book.busy:
            self._drained.set()
        if lease.session not in book.held:
            conn.close()
            return
        if state != _IDLE or lease.epoch != self._epoch or self.closing:
            stale = state == _IDLE and lease.epoch != self._epoch
            self._give_back(conn, ReleaseState.BROKEN if stale else state)
            return
        self._settle(conn)

    def _settle(self, conn: LeasedConn) -> None:
        """A clean session is free: a pending recall, else the oldest waiter, else idle."""
        now = time.monotonic()
        how, ticket = self.book.settle(conn, now)
        if how is Settle.GIVE_BACK:
            self._give_back(conn, ReleaseState.IDLE)
        elif ticket is not None:
            if not ticket.asking:  # an asking request did not wait in the queue
                self.stats[ticket.key[1]].wait.observe(now - ticket.started)
                self._mark_want()
            self._hand(ticket, conn)

    def _hand(self, ticket: Ticket, conn: LeasedConn) -> None:
        # Hand-offs are delivered together at the end of this loop iteration: writing
        # a queued request onto the session right here would wake its service in the
        # middle of our own callback and, on a shared core, preempt us once per request.
        if not self._handoffs:
            self._loop.call_soon(self._deliver)
        self._handoffs.append((ticket, conn))

    def lost(self, conn: LeasedConn, state: ReleaseState) -> None:
        """An idle held session died or was retired by its service."""
        if self.book.forget_idle(conn):
            self._give_back(conn, state)

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

    def _split_queues(self) -> None:
        """Per slice: its spec and this worker's exact share of ``maxWaiting``, computed
        once per CONFIG rather than per waiting request."""
        workers = max(1, self.workers)
        self._queues = {}
        for spec in self.policy.slices:
            share, extra = divmod(spec.queue.max_waiting, workers)
            self._queues[spec.name] = (spec, share + (1 if self.index < extra else 0))

    # -- waiting ----------------------------------------------------------------------
    # Waiters are callbacks, not tasks: a request that waits costs a small record
    # in a FIFO, and one timer per pool (for the earliest deadline) bounds all waits.
    def wait(self, service: str, slice_name: str, waiter: Waiter) -> Ticket:
        """Queue *waiter* for a session, or ask the acceptor for one now when the worker's
        part of the queue is full; raises QueueFull or Draining at once."""
        key = (service, slice_name)
        entry = self._queues.get(slice_name)
        retry_after = self.policy.limits.retry_after
        stats = self.stats[slice_name]
        if self.closing:
            stats.rejected[Rejection.DRAINING] += 1
            raise Draining(retry_after)
        if entry is None:
            stats.rejected[Rejection.QUEUE_FULL] += 1
            raise QueueFull(retry_after)
        now = time.monotonic()
        # maxWaiting bounds the slice, whatever service its requests are for: memory stays
        # bounded by the policy, not by how many services register (docs/configuration.md).
        # Only requests that must wait get here, so the sum over a few keys is cheap.
        if self._waiting_in(slice_name) < entry[1]:
            ticket = self._enqueue(key, waiter, now, entry[0].queue.timeout)
            # A key the acceptor does not know to be waiting is told at once; later count
            # changes on a waiting key are coalesced (the acceptor is already serving it).
            self._mark_want(urgent=key not in self._reported)
            return ticket
        if not self._may_ask():
            stats.rejected[Rejection.QUEUE_FULL] += 1
            raise QueueFull(retry_after)
        # No room to wait and no idle session here: one idle now at the acceptor or in
        # another worker still serves it (also behind this worker's waiters, whose
        # sessions may be on their way).  Only the acceptor knows; asks of one loop turn
        # go together, and are answered at once (GRANT ``asked`` or REFUSE).
        return self._ask(key, waiter, now, entry[0].queue.timeout)

    def _ask(self, key: WantKey, waiter: Waiter, now: float, timeout: float) -> Ticket:
        if not self.book.unsent:
            self._loop.call_soon(self._flush_asks)
        ticket = self.book.ask(key, waiter, now, timeout)
        if self._timer is None or ticket.deadline < self._timer_at:
            self._arm(ticket.deadline, now)
        return ticket

    def _waiting_in(self, slice_name: str) -> int:
        return self.book.waiting_in(slice_name)

    def _enqueue(self, key: WantKey, waiter: Waiter, now: float, timeout: float) -> Ticket:
        ticket = self.book.enqueue(key, waiter, now, timeout)
        if self._timer is None or ticket.deadline < self._timer_at:
            self._arm(ticket.deadline, now)
        return ticket

    def waiting_counts(self) -> dict[WantKey, int]:
        """Requests waiting in this worker, per (service, slice) with any."""
        return {key: len(queue) for key, queue in self.book.waiters.items() if queue}

    def asking_counts(self) -> dict[WantKey, int]:
        """Requests that may not wait, while the acceptor is asked, per key with any."""
        return {key: len(queue) for key, queue in self.book.asks.items() if queue}

    def _may_ask(self) -> bool:
        channel = self._channel
        return (
            self.acceptor_revision >= control.ASK_REVISION
            and channel is not None
            and not channel.closed
        )

    def _flush_asks(self) -> None:
        channel = self._channel
        if channel is None or channel.closed:
            return  # lost the acceptor: _orphan_leases refuses them
        for key, n in self._take_unsent().items():
            channel.send(control.Ask(key[0], key[1], n))

    # The asking requests' book operations (overridden where the book lives elsewhere).
    def _take_unsent(self) -> dict[WantKey, int]:
        return dict(self.book.take_unsent())

    def _granted(self, key: WantKey, asked: bool) -> int:
        return self.book.granted(key, asked)

    def _ask_refused(self, key: WantKey, n: int) -> None:
        self._finish_asks(self.book.ask_refused(key, n))

    def _adopted(self, grant: int) -> None:
        self._finish_asks(self.book.adopted(grant))

    def _forget_asks(self) -> None:
        self._finish_asks(self.book.forget_asks())

    def _finish_asks(self, tickets: list[Ticket]) -> None:
        """Asking requests no answer can serve any more: an idle session of the key if
        this worker has one now (the native engine frees sessions without this book's
        ``settle``), else 503 (the book is settled first, so a callback may ask again)."""
        retry_after = self.policy.limits.retry_after
        for ticket in tickets:
            conn = self.try_acquire(*ticket.key)
            if conn is not None:
                self._hand(ticket, conn)
                continue
            self.stats[ticket.key[1]].rejected[Rejection.QUEUE_FULL] += 1
            ticket.waiter.lease_refused(Rejection.QUEUE_FULL, retry_after)

    def _arm(self, deadline: float, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(self._loop.time() + deadline - now, self._expire)

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: leave the queue (no-op when already served)."""
        if self.book.cancel(ticket):
            self._mark_want()

    def _expire(self) -> None:
        """Refuse every waiter whose slice timeout has passed; re-arm for the next one."""
        self._timer = None
        now = time.monotonic()
        retry_after = self.policy.limits.retry_after
        expired, earliest = self.book.expire(now)
        for ticket in expired:  # told after the books are settled: a callback may wait again
            stats = self.stats[ticket.key[1]]
            stats.rejected[Rejection.TIMEOUT] += 1
            stats.wait.observe(now - ticket.started)
            self._mark_want()
            ticket.waiter.lease_refused(Rejection.TIMEOUT, retry_after)
        if earliest:
            self._arm(earliest, now)

    def _deliver(self) -> None:
        handoffs, self._handoffs = self._handoffs, []
        for ticket, conn in handoffs:
            ticket.waiter.lease_ready(conn)

    def _mark_want(self, urgent: bool = False) -> None:
        # WANT is absolute and coalesced: a burst of arrivals costs one record, nothing
        # is sent while counts do not change, and a saturated worker that serves its
        # own queue reports at most once per WANT_INTERVAL instead of per request.
        if self._want_urgent or (self._want_dirty and not urgent):
            return
        if urgent:
            self._want_urgent = True
            self._loop.call_soon(self._flush_want)
        elif not self._want_dirty:
            delay = self._last_want + WANT_INTERVAL - time.monotonic()
            if delay <= 0:
                self._loop.call_soon(self._flush_want)
            else:
                self._loop.call_later(delay, self._flush_want)
        self._want_dirty = True

    def _flush_want(self) -> None:
        if not self._want_dirty:
            return  # an urgent flush already sent this one
        self._want_dirty = self._want_urgent = False
        self._last_want = time.monotonic()
        channel = self._channel
        if channel is None or channel.closed:
            return
        counts = self.book.want_counts(self.waiting_counts())
        for key in set(self._reported) | set(counts):
            n = counts.get(key, 0)
            if self._reported.get(key, 0) != n:
                channel.send(control.Want(key[0], key[1], n))
                if n:
                    self._reported[key] = n
                else:
                    self._reported.pop(key, None)

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

    # -- control connection -------------------------------------------------------------
    def start(self) -> None:
        self._runner = asyncio.ensure_future(self._run())
        self._runner.add_done_callback(self._runner_done)

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        """The connection task must outlive every error: log it and start over."""
        if task.cancelled() or self.closing:
            return
        self.control_failures += 1
        log.error("control connection task failed: %r; restarting it", task.exception())
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._orphan_leases()
        self.connected.clear()
        if self.disconnected_since is None:
            self.disconnected_since = time.monotonic()
        self._loop.call_later(1.0, self.start)

    async def _run(self) -> None:
        delay = 0.05
        while not self.closing:
            try:
                sock = await self._connect()
            except OSError as exc:  # EMFILE included: a worker never stops trying
                self.control_failures += 1
                if delay >= 0.8:
                    self._outage.report(
                        f"down:{exc}",
                        logging.WARNING,
                        "acceptor control socket %s: %s; retrying",
                        self.control_path,
                        exc,
                    )
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 2.0)
                continue
            self.control_connects += 1
            self.disconnected_since = None
            connected_at = time.monotonic()
            closed: asyncio.Future[Exception | None] = self._loop.create_future()
            self._epoch += 1
            self._reported.clear()
            self._channel = fdpass.Channel(
                sock,
                self._on_record,
                functools.partial(_resolve, closed),
            )
            self._channel.send(control.Hello(os.getpid(), self.name, control.REVISION))
            for address, listener in self._listeners.items():
                # A new acceptor does not hold our listening socket yet: hand it a copy.
                self._channel.send(control.Listen(address), [listener.fileno()])
            self.connected.set()
            self._mark_want()
            idle_task = asyncio.ensure_future(self._idle_sweeper())
            try:
                reason = await closed
            finally:
                idle_task.cancel()
            self.connected.clear()
            self.disconnected_since = now = time.monotonic()
            self._channel = None
            self._orphan_leases()
            if self.closing:
                return
            why = str(reason or "closed by the acceptor")
            self._outage.report(  # each distinct cause once per interval (EMFILE stands out)
                "down:" + why,
                logging.WARNING,
                "lost the acceptor control connection (%s); reconnecting",
                why,
            )
            if now - connected_at < 1.0:
                # Lost at once (e.g. EMFILE passing our listener on): back off, never spin.
                self.control_failures += 1
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 2.0)
            else:
                delay = 0.05

    async def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.setblocking(False)
            await self._loop.sock_connect(sock, str(self.control_path))
        except BaseException:
            sock.close()
            raise
        return sock

    def _orphan_leases(self) -> None:
        """The acceptor reclaimed our leases: close idle ones now, busy ones after their request.
        Asks it had not answered never will be: nothing can be had now."""
        for conn in self._forget_leases():
            conn.close()
        self._answers = 0
        self._forget_asks()
        for listener in self._listen_waiters.values():
            if not listener.done():
                listener.set_exception(ConnectionError("acceptor connection lost"))
        self._listen_waiters.clear()

    def _on_record(self, msg: control.Message, fds: list[int]) -> None:
        if isinstance(msg, control.Grant):
            if len(fds) != len(msg.leases):
                for fd in fds:
                    os.close(fd)
                log.error("GRANT with %d leases but %d descriptors", len(msg.leases), len(fds))
                return
            for entry, fd in zip(msg.leases, fds, strict=True):
                key = (entry.requested, entry.slice)
                # On its way (an ``asked`` one to an asking ticket): it covers one.
                grant = self._granted(key, entry.asked)
                if not entry.prefetch and not entry.asked:
                    # The acceptor took one unit off our WANT for this key: mirror it, so
                    # the next change of our count is measured against what it now knows.
                    left = self._reported.get(key, 0) - 1
                    if left > 0:
                        self._reported[key] = left
                    else:
                        self._reported.pop(key, None)
                    self._mark_want()
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                lease = Lease(
                    entry.session,
                    entry.service,
                    entry.slice,
                    entry.registrant,
                    sock,
                    key,
                    epoch=self._epoch,
                    asked=entry.asked,
                )
                self._spawn(self._adopt(lease, grant))
        elif isinstance(msg, control.ConfigMsg):
            self._apply_config(msg)
        elif isinstance(msg, control.Stats):
            self.registered = int(msg.counters.get("registered", self.registered))
        elif isinstance(msg, control.Recall):
            if msg.now:  # a probe for another worker's ask
                self.book.probe(msg.service, msg.slice, msg.n)
                self._answer_probes()
            else:
                for conn in self._recall_idle(msg.service, msg.slice, msg.n):
                    self._give_back(conn, ReleaseState.IDLE)
        elif isinstance(msg, control.Refuse):
            self._ask_refused((msg.service, msg.slice), msg.n)
        elif isinstance(msg, control.Listener):
            self._resolve_listener(msg.address, fds)
        elif isinstance(msg, control.Error):
            log.error("acceptor error %s: %s", msg.code, msg.message)
            for fd in fds:
                os.close(fd)
            if msg.code == ErrorCode.LISTEN:
                for fut in self._listen_waiters.values():
                    if not fut.done():
                        fut.set_exception(OSError(msg.message))
        else:
            for fd in fds:
                os.close(fd)

    def _answer_probes(self) -> None:
        """Answer the RECALLs ``now`` that are due: what is idle, given back at once,
        owing nothing, and the answer counted in the next RELEASE."""
        due = self.book.due_probes()
        if due:
            # What comes back is granted to waiting units first, so the acceptor must know
            # our waiters as they are: a WANT coalesced for up to WANT_INTERVAL may still
            # count one served meanwhile, and the session would come straight back here
            # while the ask it was meant for is refused.
            self._want_dirty = True
            self._flush_want()
        for service, slice_name, n in due:
            for conn in self._idle_now(service, slice_name, n):
                self._return_idle(conn)
            self._answers += 1
            self._schedule_release()

    def _idle_now(self, service: str, slice_name: str, n: int) -> list[LeasedConn]:
        return self.book.idle_now(service, slice_name, n)

    async def _adopt(self, lease: Lease, grant: int) -> None:
        try:
            await self._take_in(lease)
        finally:
            # Arrived (or unusable): it no longer covers an asking ticket (any left
            # without cover is refused), and probes granted after it may be answered.
            if lease.epoch == self._epoch:
                self._adopted(grant)
                self._answer_probes()
                self._mark_want()  # no longer on its way: what we report may change

    async def _take_in(self, lease: Lease) -> None:
        try:
            conn = await self.conn_factory(lease)
        except OSError as exc:
            log.warning("session %d unusable: %s", lease.session, exc)
            lease.sock.close()
            if lease.epoch == self._epoch and self._channel is not None:
                self._channel.send(
                    control.Release([control.Released(lease.session, ReleaseState.BROKEN)])
                )
            return
        self.held[lease.session] = conn
        if lease.epoch != self._epoch:
            self.held.pop(lease.session, None)
            conn.close()
            return
        self._settle(conn)

    def _apply_config(self, msg: control.ConfigMsg) -> None:
        try:
            self.policy = policy_from_data(msg.config, "acceptor config")
        except PolicyError as exc:  # the acceptor validated it; a mismatch is a version skew
            log.error("ignoring config generation %d: %s", msg.generation, exc)
            return
        if (self._outage.state or "").startswith("down"):  # a CONFIG proves the link works
            self._outage.report("up", logging.INFO, "acceptor control connection is back")
        self.generation, self.worker_id = msg.generation, msg.worker
        self.workers, self.index = msg.workers, msg.index
        self.acceptor_revision = msg.revision
        self._split_queues()
        valid = {s.name for s in self.policy.slices}
        # Waiters of a removed slice keep waiting until their own timeout; leases for it
        # go back when idle so the acceptor re-counts them under the new slices.
        for key, ring in list(self.idle.items()):
            if key[1] not in valid:
                for conn in ring.drain():
                    self._return_idle(conn)
        self.configured.set()

    def _forget_leases(self) -> list[LeasedConn]:
        return self.book.orphans()

    def _recall_idle(self, service: str, slice_name: str, n: int) -> list[LeasedConn]:
        return self.book.recall_idle(service, slice_name, n)

    def _count_returned(self, lease: Lease) -> None:
        self.book.returned(lease)

    def _idle_since_before(self, cutoff: float) -> list[LeasedConn]:
        return self.book.idle_since_before(cutoff)

    async def _idle_sweeper(self) -> None:
        while True:
            limit = self.policy.limits.lease_idle_release
            await asyncio.sleep(max(0.05, min(limit / 2, 1.0)))
            for conn in self._idle_since_before(time.monotonic() - limit):
                self._return_idle(conn)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- listening socket ----------------------------------------------------------------
    async def listener(self, address: str, wait: float = 10.0) -> socket.socket:
        """The client listening socket the acceptor holds for *address*."""
        async with asyncio.timeout(wait):
            await self.connected.wait()
            fut = self._listen_waiters.get(address)
            if fut is None or fut.done():
                fut = self._loop.create_future()
                self._listen_waiters[address] = fut
                assert self._channel is not None
                self._channel.send(control.Listen(address))
            return await fut

    def _resolve_listener(self, address: str, fds: list[int]) -> None:
        fut = self._listen_waiters.pop(address, None)
        if fut is None or fut.done() or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        sock = socket.socket(fileno=fds[0])
        self._listeners[address] = sock
        fut.set_result(sock)

    # -- stats and shutdown ------------------------------------------------------------------
    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, st in self.stats.items():
            for i, c in enumerate(st.wait.counts):
                if c:
                    out[f"wait_bucket|{name}|{i}"] = c
            out[f"wait_sum_us|{name}"] = int(st.wait.sum * 1e6)
            for reason, c in st.rejected.items():
                out[f"rejected|{name}|{reason}"] = c
        return out

    def send_stats(self) -> None:
        if self._channel is not None:
            self._channel.send(control.Stats(self.counters()))

    async def close(self, deadline: float) -> None:
        """Stop leasing: fail waiters, give idle sessions back, wait for busy ones."""
        self.closing = True
        for waiting in itertools.chain(self.waiters.values(), self.book.asks.values()):
            while waiting:
                ticket = waiting.popleft()
                ticket.active = False
                ticket.waiter.lease_refused(Rejection.DRAINING, self.policy.limits.retry_after)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for ring in self.idle.values():
            for conn in ring.drain():
                self._give_back(conn, ReleaseState.IDLE)
        if self.busy:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), deadline)
        self.send_stats()
        self._flush_release()
        await asyncio.sleep(0)  # let the channel write what is queued
        if self._channel is not None:
            self._channel.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
