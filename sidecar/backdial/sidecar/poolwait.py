"""The worker's local FIFO waiters: its queue shares, the queue timer and WANT.

A request with no idle session waits here (``wait``), in the (service, slice)
FIFO of the pure ``LeaseBook``, within this worker's exact share of the slice's
``queue.maxWaiting`` (``_split_queues``, per CONFIG); one that finds no room
asks the acceptor instead (``poolask.Asker``).  One timer per pool, armed for
the earliest deadline, refuses whoever waited past the slice's timeout.  The
acceptor learns how many wait per key from WANT records, absolute and coalesced
(``_mark_want``/``_flush_want``): a burst costs one record and a worker that
serves its own queue reports at most once per ``WANT_INTERVAL``.

Part of ``leasepool.LeasePool``; the shared state is ``poolbase.PoolBase``.
"""

from __future__ import annotations

import time

from backdial import control
from backdial.control import Rejection, WantKey
from backdial.sidecar.lease import Ticket, Waiter
from backdial.sidecar.poolbase import Draining, PoolBase, QueueFull

WANT_INTERVAL = 0.02  # seconds between coalesced WANT updates for keys already waiting


class WaitQueue(PoolBase):
    """The waiting part of ``leasepool.LeasePool``: FIFO waiters, their timer, WANT."""

    def _split_queues(self) -> None:
        """Per slice: its spec and this worker's exact share of ``maxWaiting``, computed
        once per CONFIG rather than per waiting request."""
        workers = max(1, self.workers)
        self._queues = {}
        for spec in self.policy.slices:
            share, extra = divmod(spec.queue.max_waiting, workers)
            self._queues[spec.name] = (spec, share + (1 if self.index < extra else 0))

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

    def _waiting_in(self, slice_name: str) -> int:
        return self.book.waiting_in(slice_name)

    def _enqueue(self, key: WantKey, waiter: Waiter, now: float, timeout: float) -> Ticket:
        ticket = self.book.enqueue(key, waiter, now, timeout)
        self._arm(ticket.deadline, now)
        self.cpu.waits()
        return ticket

    def waiting_counts(self) -> dict[WantKey, int]:
        """Requests waiting in this worker, per (service, slice) with any."""
        return {key: len(queue) for key, queue in self.book.waiters.items() if queue}

    def _arm(self, deadline: float, now: float) -> None:
        """The one queue timer fires by *deadline* (kept when it fires before)."""
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
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

    # -- WANT: the waiting counts, told to the acceptor ---------------------------------------
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
