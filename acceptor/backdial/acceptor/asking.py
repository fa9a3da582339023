"""Requests that may not wait (ASK), without IO: probe for idle sessions, else refuse.

A worker asks (control revision 3) when a request finds no idle session of its
(service, slice) in the worker and the worker's part of the slice's
``queue.maxWaiting`` cannot take one more waiter — always for ``maxWaiting: 0``.
Such a request is served if a session can be had *now*, else it gets a fast 503:

* ``Ledger.pump`` grants it, after every waiting request, a session idle at the
  acceptor that the slice may use (its quota, or borrowing);
* otherwise the sessions it could use may sit idle in workers (leases are sticky):
  ``settle`` asks those workers for them with a RECALL ``now`` (a *probe*): a worker
  gives back at once what it holds idle, owes nothing for the rest, and says it has
  answered (RELEASE ``answers``).  What comes back is granted by the next pump;
* what comes back goes to the oldest request first, so an older waiting request
  may take it: an ask whose answers brought sessions back and still has units
  left is probed again where sessions may still be idle (at most ``ROUNDS`` more
  times; each such round served a request);
* an ask whose probes are all answered (or that had none to send) and still has
  units left is refused (REFUSE).

Which sessions a request could use: those of its own slice (idle in another worker);
for a slice under its quota also those of slices leased beyond their quota (the
borrowers, furthest beyond first, as ``lending.py`` revokes lending), never more than
the slice is owed.  Workers below revision 3 are never probed (they would not answer).

An ask is probed at most ``1 + ROUNDS`` times and each probe asks only for sessions
no other probe asks for, so a burst costs a bounded number of records, and nothing
here runs at steady state: a worker holding an idle session of the key never asks.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from backdial.acceptor.ledger import Ask, Ledger, Probe, RecallAction
from backdial.control import WantKey

Held = collections.Counter[tuple[int, str, str]]  # (worker, service, slice) -> sessions

# Rounds of probes an ask may have after its first, each only when the last one brought
# sessions back (which older waiting requests took): a handful, since every round serves
# a request and asks are answered "now".
ROUNDS = 3


@dataclass(frozen=True, slots=True)
class Refusal:
    """Tell *worker* that *n* of its asks for *key* cannot be served now (REFUSE)."""

    worker: int
    key: WantKey
    n: int


def settle(ledger: Ledger) -> tuple[list[RecallAction], list[Refusal]]:
    """After a pump: the probes to send now (recorded in ``ledger.probes``) and the asks
    to refuse (removed from ``ledger.asks``, as are the ones fully granted)."""
    if not ledger.asks:
        return [], []
    held: Held = collections.Counter()
    for sess in ledger.sessions.values():
        if sess.worker:
            held[(sess.worker, sess.service, sess.slice)] += 1
    probing: Held = collections.Counter()
    for worker, queue in ledger.probes.items():
        for probe in queue:
            probing[(worker, probe.service, probe.slice)] += probe.n
    probes: list[RecallAction] = []
    refusals: list[Refusal] = []
    for ask_id, ask in list(ledger.asks.items()):
        if ask.n <= 0:
            del ledger.asks[ask_id]
            continue
        if not ask.probed:
            ask.probed = True
            probes += _probe(ledger, ask_id, ask, held, probing)
        elif ask.probes <= 0 and ask.yielded and ask.rounds < ROUNDS:
            # Its answers brought sessions back, but older waiters took them: other idle
            # sessions it could use may still sit in workers.
            ask.yielded = False
            ask.rounds += 1
            probes += _probe(ledger, ask_id, ask, held, probing)
        if ask.probes <= 0:
            refusals.append(Refusal(ask.worker, ask.key, ask.n))
            del ledger.asks[ask_id]
    return probes, refusals


def _probe(ledger: Ledger, ask_id: int, ask: Ask, held: Held, probing: Held) -> list[RecallAction]:
    """Probe the workers that may hold idle sessions *ask* could use (none: refused)."""
    service = ledger.resolve(ask.key[0])
    if service is None:
        return []
    slice_name = ask.key[1]
    book = ledger.services[service]
    quotas = ledger.quotas(service)
    plan: list[RecallAction] = []
    need = ask.n
    sources = [(slice_name, need)]
    owed = quotas.get(slice_name, 0) - book.leased[slice_name]
    if owed > 0:
        # Under its quota: what borrowers hold beyond theirs is owed to it as well.
        order = {spec.name: i for i, spec in enumerate(ledger.policy.slices)}
        excess = {
            name: n - quotas.get(name, 0)
            for name, n in book.leased.items()
            if name != slice_name and n > quotas.get(name, 0)
        }
        for name in sorted(excess, key=lambda s: (-excess[s], -order.get(s, len(order)))):
            sources.append((name, min(excess[name], owed)))
    for source, cap in sources:
        holders = sorted(
            (w for (w, s, name) in held if s == service and name == source),
            key=lambda w: (-(held[(w, service, source)] - probing[(w, service, source)]), w),
        )
        for worker in holders:
            if need <= 0 or cap <= 0:
                break
            if not ledger.probes_answer(worker) or (source, worker) == (slice_name, ask.worker):
                continue  # old workers do not answer; the asker holds none of its key idle
            key = (worker, service, source)
            n = min(held[key] - probing[key], need, cap)
            if n <= 0:
                continue
            ledger.probes[worker].append(Probe(service, source, n, [ask_id]))
            probing[key] += n
            ask.probes += 1
            need -= n
            cap -= n
            plan.append(RecallAction(worker, service, source, n, now=True))
    return plan
