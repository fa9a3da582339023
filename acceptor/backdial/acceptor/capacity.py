"""Keeping the pod's session cap (``limits.maxSessions``) when it shrinks, without IO.

Registration beyond the cap is refused with ``ERR limit`` (``server.py``).  When the cap
shrinks below what is registered (the operator re-split a fleet budget), the surplus is
taken back without failing anything:

* idle sessions held by the acceptor are retired at once (the acceptor writes
  ``BDREG/1 RETIRE`` on them and closes them; nothing can be on them);
* if that is not enough, sidecar workers are asked (RECALL) to give back sessions of the
  services that hold the most, as soon as they are idle; each one that comes back idle is
  retired instead of being leased again.

Sessions are taken from the registrants with the most sessions first, so every service
instance keeps a fair part of the smaller capacity.  In-flight and queued requests are
never touched: a leased session is only retired after its request finished.
"""

from __future__ import annotations

import collections

from backdial.acceptor.ledger import Ledger, RecallAction, Session


def surplus(ledger: Ledger) -> int:
    """Registered sessions beyond the cap (0 when within it)."""
    return max(0, len(ledger.sessions) - ledger.policy.limits.max_sessions)


def idle_victims(ledger: Ledger, n: int) -> list[Session]:
    """Up to *n* idle sessions to retire, one at a time from the largest registrant."""
    sizes = {rid: len(reg.sessions) for rid, reg in ledger.registrants.items()}
    idle = {rid: list(reg.idle) for rid, reg in ledger.registrants.items() if reg.idle}
    victims: list[Session] = []
    while len(victims) < n and idle:
        rid = max(idle, key=lambda r: (sizes[r], r))
        sid = idle[rid].pop()  # the most recently idle: the least warm one
        if not idle[rid]:
            del idle[rid]
        sizes[rid] -= 1
        victims.append(ledger.sessions[sid])
    return victims


def recall_plan(ledger: Ledger, n: int) -> list[RecallAction]:
    """RECALLs (of any slice) for *n* leased sessions, beyond recalls already outstanding;
    the workers holding the most of a service are asked first.  They are recorded in
    ``ledger.recalls``."""
    n -= sum(ledger.recalls.values())
    held: collections.Counter[tuple[int, str]] = collections.Counter()
    for sess in ledger.sessions.values():
        if sess.worker:
            held[(sess.worker, sess.service)] += 1
    plan: list[RecallAction] = []
    for (worker, service), count in held.most_common():
        if n <= 0:
            break
        ask = min(count - ledger.recalling(worker, service), n)
        if ask > 0:
            plan.append(RecallAction(worker, service, "", ask))
            ledger.recalls[(worker, service, "")] += ask
            n -= ask
    return plan
