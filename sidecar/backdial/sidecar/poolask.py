"""Requests that may not wait: asking the acceptor for a session now (revision 3).

A request with no idle session and no room in this worker's part of its
slice's queue (always for ``maxWaiting: 0``) is not refused at once when the
acceptor speaks control revision 3 (``_may_ask``): the pool sends ASK for it,
the asks of one loop turn together (``_flush_asks``), and the acceptor answers
each unit with a GRANT entry marked ``asked`` or a REFUSE (then 503
``queue_full``).  For sessions idle in other workers the acceptor sends them
probes (RECALL ``now``); this worker answers its own in order, once the
sessions granted before each probe are adopted (``_answer_probes``).

The asking requests' book operations are hooks (``_take_unsent``, ``_granted``,
``_ask_refused``, ``_adopted``, ``_forget_asks``, ``_idle_now``,
``asking_counts``): ``nativepool.NativeLeasePool`` keeps them in the engine.

Part of ``leasepool.LeasePool``; the shared state is ``poolbase.PoolBase``.
"""

from __future__ import annotations

from backdial import control
from backdial.control import Rejection, WantKey
from backdial.sidecar.lease import LeasedConn, Ticket, Waiter
from backdial.sidecar.poolbase import PoolBase


class Asker(PoolBase):
    """The asking part of ``leasepool.LeasePool``: ASK, its answers, probes."""

    def _ask(self, key: WantKey, waiter: Waiter, now: float, timeout: float) -> Ticket:
        if not self.book.unsent:
            self._loop.call_soon(self._flush_asks)
        ticket = self.book.ask(key, waiter, now, timeout)
        self._arm(ticket.deadline, now)
        self.cpu.waits()
        return ticket

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

    # -- probes: RECALL ``now`` for other workers' asks ------------------------------------
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
