"""What one worker holds, as plain data and pure decisions: the worker's twin of the
acceptor's ``Ledger``.

The acceptor counts capacity; a worker keeps the sessions it was lent (sticky
leases) and decides, per request, which of them serves it.  Those decisions
are here, free of IO and of the clock (times are arguments), so they can be
tested directly: ``LeasePool`` is the shell that talks to the acceptor, arms
the one queue timer and delivers hand-offs at the end of a loop iteration.

* ``take``: an idle session of the key, never jumping the key's waiters;
* ``enqueue`` / ``cancel`` / ``expire``: the per-key FIFO of waiting requests;
* ``ask`` … ``forget_asks``: requests that may not wait (the worker's part of
  ``queue.maxWaiting`` is full) while the acceptor is asked for a session now;
  they are not waiters (not counted, not in WANT), keep their place in line, and
  are refused once no answer still to come can serve them;
* ``settle``: where a clean, freed session goes — back to the acceptor when it
  asked for one of the service's sessions leased for that slice (a pending
  recall), else to the key's oldest request (a session granted for an ask to
  the oldest asking one), else idle (sticky), rotated fairly by registrant
  (``IdleRing``, invariant 8);
* ``recall_idle`` / ``returned``: a RECALL names the slice whose sessions must
  come back (the one that borrowed), so the lender's own sessions stay here;
  what is not idle now is owed by the next session of that slice to come free;
  ``idle_now`` is a RECALL ``now``: what is idle, owing nothing.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
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
        # Requests that may not wait, while the acceptor is asked for a session now, and
        # per key the ask units not sent yet, and sent but not answered.
        self.asks: dict[WantKey, collections.deque[Ticket]] = collections.defaultdict(
            collections.deque
        )
        self.unsent: collections.Counter[WantKey] = collections.Counter()
        self.asked: collections.Counter[WantKey] = collections.Counter()
        # Sessions granted to this worker and being adopted, by grant number (in order):
        # their key and whether they answer an ask; and the RECALLs ``now`` not answered
        # yet, each behind the grants before it.
        self.adopting: dict[int, tuple[WantKey, bool]] = {}
        self.probes: collections.deque[tuple[int, str, str, int]] = collections.deque()
        self._grants = 0
        # Pending recalls by (actual service, slice the sessions are leased for; "" = any).
        self.recall: collections.Counter[tuple[str, str]] = collections.Counter()

    # -- sessions -----------------------------------------------------------------------
    def take(self, key: WantKey) -> C | None:
        """An idle held session of *key*, now busy; None when there is none or requests of
        that key already wait (they get sessions first)."""
        idle = self.idle.get(key)
        if not idle or self.waiters.get(key) or self.asks.get(key):
            return None
        while (conn := idle.take()) is not None:
            if conn.lease.session in self.held:
                self.busy.add(conn.lease.session)
                return conn
        return None

    def settle(self, conn: C, now: float) -> tuple[Settle, Ticket | None]:
        """A clean session is free: a pending recall of its slice first, else the oldest
        request of its key, waiting or asking (a session granted for an ask: the oldest
        asking one), the session staying busy for it; else idle."""
        lease = conn.lease
        asked, lease.asked = lease.asked, False
        if self.recall and self.returned(lease):
            return Settle.GIVE_BACK, None
        queue = self.waiters.get(lease.key)
        asks = self.asks.get(lease.key)
        if asks and (asked or not queue or asks[0].started < queue[0].started):
            queue = asks
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
        out = self.idle_now(service, slice_name, n)
        if len(out) < n:
            self.recall[(service, slice_name)] += n - len(out)
        return out

    def idle_now(self, service: str, slice_name: str, n: int) -> list[C]:
        """Up to *n* idle sessions of *service* leased for *slice_name* ("" = any slice),
        taken out of their rings; nothing is owed for the rest (a RECALL ``now``)."""
        out: list[C] = []
        for (_, key_slice), ring in self.idle.items():
            if len(out) >= n:
                break
            if slice_name and key_slice != slice_name:
                continue  # a ring holds one key's sessions, all leased for its slice
            out += ring.take_if(lambda c: c.lease.service == service, n - len(out))
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
            (self.asks if ticket.asking else self.waiters)[ticket.key].remove(ticket)
        return True

    def expire(self, now: float) -> tuple[list[Ticket], float]:
        """(tickets whose deadline passed, oldest first per key; the earliest deadline
        still pending, 0.0 when none).  Asking tickets are bounded by it too."""
        expired: list[Ticket] = []
        earliest = 0.0
        for queue in itertools.chain(self.waiters.values(), self.asks.values()):
            while queue and queue[0].deadline <= now:
                ticket = queue.popleft()
                ticket.active = False
                expired.append(ticket)
            if queue and (not earliest or queue[0].deadline < earliest):
                earliest = queue[0].deadline
        return expired, earliest

    def want_counts(self, waiting: dict[WantKey, int]) -> dict[WantKey, int]:
        """The WANT counts to report for *waiting* (requests waiting per key): less the
        sessions on their way to them.  The acceptor took a unit off for each session it
        granted, and the worker mirrors that at the GRANT; until the session is adopted
        and hands over, its waiter still waits here, and reporting it would ask for a
        second session (a phantom unit: an extra grant, or an extra RECALL from a
        borrower).  Sessions granted for asks go to asking requests, not to waiters."""
        coming: collections.Counter[WantKey] = collections.Counter(
            key for key, asked in self.adopting.values() if not asked
        )
        return {key: n - coming[key] for key, n in waiting.items() if n > coming[key]}

    # -- asking (requests that may not wait) ----------------------------------------------
    # An asking ticket stays in line while something may still serve it: an ask not sent
    # yet or not answered yet (the newest tickets), or a session granted to this worker
    # that is being adopted (the oldest ones may get those: one granted for an ask goes to
    # the oldest asking ticket, any other to the oldest request).  The rest are refused.
    @property
    def asking(self) -> int:
        return sum(len(q) for q in self.asks.values())

    def ask(self, key: WantKey, waiter: Waiter, now: float, timeout: float) -> Ticket:
        """A request that may not wait, while the acceptor is asked for a session now
        (one more unit of *key* to send: ``unsent``)."""
        ticket = Ticket(waiter, key, now, now + timeout, asking=True)
        self.asks[key].append(ticket)
        self.unsent[key] += 1
        return ticket

    def take_unsent(self) -> collections.Counter[WantKey]:
        """The units to send in ASK records now, counted as sent (not answered yet)."""
        unsent, self.unsent = self.unsent, collections.Counter()
        self.asked.update(unsent)
        return unsent

    def granted(self, key: WantKey, asked: bool) -> int:
        """A GRANT entry for *key* (``asked``: it answers one ask unit): its session is
        being adopted; returns the grant's number for ``adopted``."""
        if asked:
            _less(self.asked, key, 1)
        self._grants += 1
        self.adopting[self._grants] = (key, asked)
        return self._grants

    def ask_refused(self, key: WantKey, n: int) -> list[Ticket]:
        """A REFUSE of *n* units: the asking tickets now left without cover."""
        _less(self.asked, key, n)
        return self._uncovered(key)

    def adopted(self, grant: int) -> list[Ticket]:
        """Granted session number *grant* was settled (or could not be used): the asking
        tickets of its key now left without cover."""
        entry = self.adopting.pop(grant, None)
        return [] if entry is None else self._uncovered(entry[0])

    def probe(self, service: str, slice_name: str, n: int) -> None:
        """A RECALL ``now``: answered once the sessions granted before it are adopted
        (the acceptor counted them as ours; one about to idle here must not be missed)."""
        self.probes.append((self._grants, service, slice_name, n))

    def due_probes(self) -> list[tuple[str, str, int]]:
        """The probes to answer now, in order: (service, slice, n) each, to be answered
        with what ``idle_now`` finds."""
        out: list[tuple[str, str, int]] = []
        while self.probes:
            barrier, service, slice_name, n = self.probes[0]
            if self.adopting and next(iter(self.adopting)) <= barrier:
                break
            self.probes.popleft()
            out.append((service, slice_name, n))
        return out

    def forget_asks(self) -> list[Ticket]:
        """The acceptor is gone: no ask or probe will be answered, no grant it made counts;
        every asking ticket, out of line."""
        self.unsent.clear()
        self.asked.clear()
        self.adopting.clear()
        self.probes.clear()
        out: list[Ticket] = []
        for key in list(self.asks):
            out += self._uncovered(key)
        return out

    def _uncovered(self, key: WantKey) -> list[Ticket]:
        queue = self.asks.get(key)
        if not queue:
            return []
        tickets = list(queue)
        oldest = sum(1 for k, _ in self.adopting.values() if k == key)
        newest = self.asked[key] + self.unsent[key]
        end = max(oldest, len(tickets) - newest)
        out = tickets[oldest:end]
        if out:
            queue.clear()
            queue.extend(tickets[:oldest] + tickets[end:])
            for ticket in out:
                ticket.active = False
        return out


def _less(counts: collections.Counter[WantKey], key: WantKey, n: int) -> None:
    left = counts[key] - n
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
