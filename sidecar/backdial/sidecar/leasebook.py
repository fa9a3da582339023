"""What one worker holds, as plain data and pure decisions: the worker's twin of the
acceptor's ``Ledger``.

The acceptor counts capacity; a worker keeps the sessions it was lent (sticky
leases) and decides, per request, which of them serves it.  Those decisions
are here, free of IO and of the clock (times are arguments), so they can be
tested directly: ``LeasePool`` is the shell that talks to the acceptor, arms
the one queue timer and delivers hand-offs at the end of a loop iteration.

* ``take``: an idle session of the key, never jumping the key's waiters;
* ``enqueue`` / ``cancel`` / ``expire``: the per-key FIFO of waiting requests;
* ``settle``: where a clean, freed session goes — back to the acceptor when it
  asked for one of the service's sessions leased for that slice (a pending
  recall), else to the key's oldest waiter, else idle (sticky), rotated fairly
  by registrant (``IdleRing``, invariant 8);
* ``recall_idle`` / ``returned``: a RECALL names the slice whose sessions must
  come back (the one that borrowed), so the lender's own sessions stay here;
  what is not idle now is owed by the next session of that slice to come free.
"""

from __future__ import annotations

import collections
import contextlib
from enum import Enum
from typing import Generic, TypeVar

from backdial.control import WantKey
from backdial.sidecar.idlering import IdleRing
from backdial.sidecar.lease import Lease, LeasedConn, Ticket, Waiter

C = TypeVar("C", bound=LeasedConn)


class Settle(Enum):
    """Where ``LeaseBook.settle`` put a freed session."""

    GIVE_BACK = "give_back"  # a recall of its slice was pending: return it to the acceptor
    HANDED = "handed"  # to the key's oldest waiter (the ticket comes with it)
    IDLE = "idle"  # kept idle for the next request of its key


class LeaseBook(Generic[C]):
    """Sessions held (busy or idle per key), waiting tickets per key, pending recalls."""

    def __init__(self) -> None:
        self.held: dict[int, C] = {}  # every session this worker holds, by id
        self.busy: set[int] = set()
        self.idle: dict[WantKey, IdleRing[C]] = collections.defaultdict(IdleRing)
        self.waiters: dict[WantKey, collections.deque[Ticket]] = collections.defaultdict(
            collections.deque
        )
        # Pending recalls by (actual service, slice the sessions are leased for; "" = any).
        self.recall: collections.Counter[tuple[str, str]] = collections.Counter()

    # -- sessions -----------------------------------------------------------------------
    def take(self, key: WantKey) -> C | None:
        """An idle held session of *key*, now busy; None when there is none or requests of
        that key already wait (they get sessions first)."""
        idle = self.idle.get(key)
        if not idle or self.waiters.get(key):
            return None
        while (conn := idle.take()) is not None:
            if conn.lease.session in self.held:
                self.busy.add(conn.lease.session)
                return conn
        return None

    def settle(self, conn: C, now: float) -> tuple[Settle, Ticket | None]:
        """A clean session is free: a pending recall of its slice first, else the oldest
        waiter of its key (the session stays busy for it), else idle."""
        lease = conn.lease
        if self.recall and self.returned(lease):
            return Settle.GIVE_BACK, None
        queue = self.waiters.get(lease.key)
        if queue:
            ticket = queue.popleft()
            ticket.active = False
            self.busy.add(lease.session)
            return Settle.HANDED, ticket
        lease.idle_since = now
        self.idle[lease.key].append(conn)
        return Settle.IDLE, None

    def forget_idle(self, conn: C) -> bool:
        """An idle session ended under us; False when it was not held."""
        if conn.lease.session not in self.held:
            return False
        self.idle[conn.lease.key].remove(conn)
        return True

    def recall_idle(self, service: str, slice_name: str, n: int) -> list[C]:
        """Up to *n* idle sessions of *service* leased for *slice_name* ("" = any slice) to
        return now; the rest of *n* is owed by the next such sessions to come free."""
        out: list[C] = []
        for (_, key_slice), ring in self.idle.items():
            if len(out) >= n:
                break
            if slice_name and key_slice != slice_name:
                continue  # a ring holds one key's sessions, all leased for its slice
            out += ring.take_if(lambda c: c.lease.service == service, n - len(out))
        if len(out) < n:
            self.recall[(service, slice_name)] += n - len(out)
        return out

    def returned(self, lease: Lease) -> bool:
        """An idle session goes back to the acceptor: count it against a pending recall of
        its slice, else of any slice, as the acceptor does (False: none was pending)."""
        for key in ((lease.service, lease.slice), (lease.service, "")):
            if self.recall[key] > 0:
                self.recall[key] -= 1
                if not self.recall[key]:
                    del self.recall[key]
                return True
        return False

    def idle_since_before(self, cutoff: float) -> list[C]:
        """Idle sessions unused since *cutoff*, taken out of their rings."""
        out: list[C] = []
        for ring in self.idle.values():
            stale = [c for c in ring if c.lease.idle_since < cutoff]
            for conn in stale:
                ring.remove(conn)
            out += stale
        return out

    def orphans(self) -> list[C]:
        """Everything held and not busy (the acceptor reclaimed our leases), now forgotten;
        busy ones stay until their request ends."""
        out: list[C] = []
        for ring in self.idle.values():
            out += ring.drain()
        for conn in out:
            self.held.pop(conn.lease.session, None)
        for sid in [s for s in self.held if s not in self.busy]:
            out.append(self.held.pop(sid))
        self.recall.clear()
        return out

    # -- waiting --------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self.waiters.values())

    def waiting_in(self, slice_name: str) -> int:
        return sum(len(q) for (_, name), q in self.waiters.items() if name == slice_name)

    def enqueue(self, key: WantKey, waiter: Waiter, now: float, timeout: float) -> Ticket:
        ticket = Ticket(waiter, key, now, now + timeout)
        self.waiters[key].append(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        """Leave the queue; False when the ticket was already served or refused."""
        if not ticket.active:
            return False
        ticket.active = False
        with contextlib.suppress(ValueError):
            self.waiters[ticket.key].remove(ticket)
        return True

    def expire(self, now: float) -> tuple[list[Ticket], float]:
        """(tickets whose deadline passed, oldest first per key; the earliest deadline
        still pending, 0.0 when none)."""
        expired: list[Ticket] = []
        earliest = 0.0
        for queue in self.waiters.values():
            while queue and queue[0].deadline <= now:
                ticket = queue.popleft()
                ticket.active = False
                expired.append(ticket)
            if queue and (not earliest or queue[0].deadline < earliest):
                earliest = queue[0].deadline
        return expired, earliest
