"""Which leased sessions the acceptor asks workers to give back (RECALL), without IO.

Sessions are lent per slice in the manner of Kubernetes API Priority and Fairness:
each slice's quota (its nominal share) is guaranteed, a ``borrow: true`` slice may
take idle sessions beyond its quota, and what it borrowed is taken back as soon as a
slice under its quota waits.  Nothing is preempted: a recalled session goes back to
the acceptor when its current request ends (at once if the worker holds it idle), and
the acceptor grants it to the slice that is owed it (``Ledger.permitted``).

A RECALL names the slice whose sessions must come back, so a worker that holds both
the borrower's and the lender's sessions gives back the borrowed ones; the lender's
own sessions stay sticky, and it serves its next requests without a round trip.

Two reasons to recall, per service:

* **lending revoked** — every slice under its quota with waiters is owed
  ``min(quota - leased, waiting)`` sessions, whichever worker its waiters are in and
  whether or not that worker already holds some of its sessions.  What idle sessions
  do not cover is recalled from the slices leased beyond their quota, the largest
  excess first, never more than a slice's excess;
* **spreading a slice across workers** — waiters of a borrowing slice at or over its
  quota, in a worker that holds none of its sessions, get sessions of that same slice
  back from the workers that hold them (a worker that holds some serves its own
  waiters as those finish; recalling them would only bounce sessions).

Recalls already asked for and not yet answered count (``Ledger.recalls``), so the plan
can run after every pump without asking twice.
"""

from __future__ import annotations

import collections

from backdial.acceptor.ledger import Ledger, RecallAction, ServiceBook
from backdial.control import WantKey

Held = collections.Counter[tuple[int, str, str]]  # (worker, service, slice) -> sessions


def recall_plan(ledger: Ledger) -> list[RecallAction]:
    """The RECALLs to send now; they are recorded in ``ledger.recalls``."""
    if not ledger.queue:
        return []
    waiting = ledger.waiting()
    held: Held = collections.Counter()
    for sess in ledger.sessions.values():
        if sess.worker:
            held[(sess.worker, sess.service, sess.slice)] += 1
    plan: list[RecallAction] = []
    for service, book in ledger.services.items():
        targets = _revoked(ledger, service, book, waiting)
        for slice_name, n in _spread(ledger, service, book, held).items():
            targets[slice_name] += n
        for slice_name, n in sorted(targets.items()):
            plan += _ask(ledger, service, slice_name, n, held)
    return plan


def _revoked(
    ledger: Ledger, service: str, book: ServiceBook, waiting: collections.Counter[WantKey]
) -> collections.Counter[str]:
    """Per borrowing slice: how many of its sessions must come back to under-quota waiters."""
    quotas = ledger.quotas(service)
    owed = sum(
        min(quota - book.leased[name], waiting[(service, name)])
        for name, quota in quotas.items()
        if book.leased[name] < quota
    )
    owed -= book.idle_count  # normally 0 after a pump: idle sessions went to them already
    excess = {
        name: n - quotas.get(name, 0)
        for name, n in book.leased.items()
        if n > quotas.get(name, 0)  # a slice removed from the policy has quota 0
    }
    order = {spec.name: i for i, spec in enumerate(ledger.policy.slices)}
    out: collections.Counter[str] = collections.Counter()
    while owed > 0 and excess:
        # One at a time from the slice furthest above its quota, so borrowers are levelled
        # down together; ties: the slice listed last (or no longer listed) gives first.
        name = max(excess, key=lambda s: (excess[s], order.get(s, len(order))))
        out[name] += 1
        owed -= 1
        excess[name] -= 1
        if not excess[name]:
            del excess[name]
    return out


def _spread(ledger: Ledger, service: str, book: ServiceBook, held: Held) -> dict[str, int]:
    """Per borrowing slice at or over its quota: its waiters in workers holding none of it."""
    quotas = ledger.quotas(service)
    out: dict[str, int] = {}
    for name, quota in quotas.items():
        spec = ledger.slice_spec(name)
        if book.leased[name] < quota or spec is None or not spec.borrow:
            continue  # under quota: owed (``_revoked``); no borrowing: no more to give it
        n = 0
        for worker, wants in ledger.wants.items():
            if held[(worker, service, name)]:
                continue
            for (requested, slice_name), count in wants.items():
                if slice_name == name and ledger.resolve(requested) == service:
                    n += count
        n -= book.idle_count
        if n > 0:
            out[name] = n
    return out


def _ask(
    ledger: Ledger, service: str, slice_name: str, target: int, held: Held
) -> list[RecallAction]:
    """Recall up to *target* sessions of (service, slice), counting the recalls still
    outstanding; the workers holding the most of them are asked first."""
    holders = {w: n for (w, s, name), n in held.items() if s == service and name == slice_name}
    # A recall the worker can no longer answer (its sessions ended otherwise) counts
    # only up to what it still holds, so a stale one never blocks the slice for good.
    pending = {w: min(ledger.recalls[(w, service, slice_name)], n) for w, n in holders.items()}
    need = target - sum(pending.values())
    plan: list[RecallAction] = []
    for worker in sorted(holders, key=lambda w: (pending[w] - holders[w], w)):
        if need <= 0:
            break
        ask = min(holders[worker] - pending[worker], need)
        if ask <= 0:
            break
        plan.append(RecallAction(worker, service, slice_name, ask))
        ledger.recalls[(worker, service, slice_name)] += ask
        need -= ask
    return plan
