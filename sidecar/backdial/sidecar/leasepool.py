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
decided by the pure ``LeaseBook`` (leasebook.py); ``LeasePool`` is its shell,
assembled from parts (``poolbase.py`` lists them): this module holds the hot
path (``try_acquire``, ``release``, ``_settle``), ``acquire`` for callers that
await, the per-slice figures for STATS and the shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Final

from backdial import control
from backdial.control import Rejection, ReleaseState
from backdial.sidecar.lease import LeasedConn
from backdial.sidecar.leasebook import Settle
from backdial.sidecar.poolask import Asker
from backdial.sidecar.poolbase import Draining, QueueFull, QueueTimeout, Refused
from backdial.sidecar.poolcontrol import ControlClient
from backdial.sidecar.poolwait import WaitQueue

__all__ = ["Draining", "LeasePool", "QueueFull", "QueueTimeout", "Refused"]

_IDLE: Final = ReleaseState.IDLE  # bound once: enum attribute access costs ~0.1 us on 3.11

_REFUSED: dict[Rejection, type[Refused]] = {
    cls.reason: cls for cls in (QueueFull, QueueTimeout, Draining)
}


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


class LeasePool(WaitQueue, Asker, ControlClient):
    """A worker's lease pool: the parts (``poolbase.py``) over one ``LeaseBook``."""

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

    def lost(self, conn: LeasedConn, state: ReleaseState) -> None:
        """An idle held session died or was retired by its service."""
        if self.book.forget_idle(conn):
            self._give_back(conn, state)

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
