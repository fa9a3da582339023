"""The acceptor's accounting, without IO: quotas, borrowing, FIFO, fairness ring, recalls
(``lending.recall_plan``: borrowed sessions come back to the slices they were lent from)."""

from __future__ import annotations

import collections
import random

import pytest

from backdial.acceptor.asking import settle
from backdial.acceptor.ledger import Ledger, RecallAction, apportion
from backdial.acceptor.lending import recall_plan
from backdial.policy import policy_from_data

TWO_SLICES = {
    "slices": [
        {
            "name": "mobile",
            "match": {"userAgent": "iPhone"},
            "share": 25,
            "borrow": False,
            "queue": {"maxWaiting": 10, "timeout": "1s"},
        },
        {"name": "default", "share": 75, "borrow": True},
    ]
}


def make(policy: dict | None = None, registrants: int = 1, sessions: int = 4) -> Ledger:
    ledger = Ledger(policy_from_data(policy or {}))
    fd = 100
    for r in range(registrants):
        reg = ledger.add_registrant("svc", f"i{r}", None)
        for _ in range(sessions):
            ledger.add_session(reg, fd)
            fd += 1
    ledger.add_worker(1)
    ledger.add_worker(2)
    return ledger


@pytest.mark.parametrize(
    ("total", "shares", "expected"),
    [
        (4, {"a": 25, "b": 75}, {"a": 1, "b": 3}),
        (1, {"a": 25, "b": 75}, {"a": 0, "b": 1}),
        (3, {"a": 50, "b": 50}, {"a": 2, "b": 1}),  # tie goes to the slice listed first
        (0, {"a": 100}, {"a": 0}),
        (10, {"a": 33, "b": 33, "c": 34}, {"a": 3, "b": 3, "c": 4}),
    ],
)
def test_apportion(total: int, shares: dict[str, int], expected: dict[str, int]) -> None:
    assert apportion(total, shares) == expected
    assert sum(apportion(total, shares).values()) == total


def test_grants_never_exceed_registered_sessions() -> None:
    ledger = make(registrants=2, sessions=3)
    ledger.set_want(1, ("", "default"), 10)
    grants = ledger.pump()
    assert len(grants) == 6
    assert len({g.session.id for g in grants}) == 6
    assert ledger.pump() == []
    assert sum(ledger.wants[1].values()) == 4


def test_non_borrowing_slice_stays_within_quota_while_others_idle() -> None:
    ledger = make(TWO_SLICES, sessions=8)  # quotas: mobile 2, default 6
    ledger.set_want(1, ("", "mobile"), 5)
    grants = ledger.pump()
    assert len(grants) == 2
    assert ledger.services["svc"].leased["mobile"] == 2


def test_borrowing_slice_leaves_sessions_owed_to_waiting_slices() -> None:
    ledger = make(TWO_SLICES, sessions=8)
    ledger.set_want(2, ("", "mobile"), 1)  # mobile waits first (quota 2, borrow false)
    ledger.set_want(1, ("", "default"), 20)
    grants = ledger.pump()
    by_slice = collections.Counter(g.session.slice for g in grants)
    assert by_slice["mobile"] == 1
    assert by_slice["default"] == 7  # borrowed one of mobile's two, the other is owed
    ledger.set_want(2, ("", "mobile"), 2)
    sess = next(g.session for g in grants if g.session.slice == "default")
    assert ledger.give_back(sess.id, 1)
    grants = ledger.pump()
    assert [g.session.slice for g in grants] == ["mobile"]


def test_fifo_across_workers() -> None:
    ledger = make(sessions=1)
    first = ledger.pump()
    assert first == []
    ledger.set_want(2, ("", "default"), 1)
    ledger.set_want(1, ("", "default"), 1)
    ledger.set_want(2, ("", "default"), 2)
    order = []
    for _ in range(3):
        grants = ledger.pump()
        assert len(grants) == 1
        order.append(grants[0].worker)
        ledger.give_back(grants[0].session.id, grants[0].worker)
    assert order == [2, 1, 2]


def test_withdrawn_want_drops_newest_units_first() -> None:
    ledger = make(sessions=1)
    ledger.set_want(1, ("", "default"), 2)
    ledger.set_want(2, ("", "default"), 1)
    ledger.set_want(1, ("", "default"), 1)  # worker 1's newer waiter timed out
    assert [w for w, _ in ledger.queue.values()] == [1, 2]


def test_ring_alternates_registrants() -> None:
    ledger = make(registrants=3, sessions=5)
    served = collections.Counter()
    for _ in range(300):
        ledger.set_want(1, ("", "default"), 1)
        (g,) = ledger.pump()
        served[g.session.registrant] += 1
        ledger.give_back(g.session.id, 1)
    assert set(served.values()) == {100}


@pytest.mark.parametrize("registrants", [1, 2, 3, 5])
def test_prefetch_only_evens_out_holdings_per_registrant(registrants: int) -> None:
    ledger = make(registrants=registrants, sessions=4)
    ledger.set_want(1, ("", "default"), 1)
    grants = ledger.pump(prefetch=8)
    assert len(grants) == registrants
    assert len({g.session.registrant for g in grants}) == registrants


def test_grants_balance_what_each_worker_holds() -> None:
    ledger = make(registrants=2, sessions=4)
    ledger.set_want(1, ("", "default"), 3)  # worker 1: A, B, A
    ledger.pump()
    ledger.set_want(1, ("", "default"), 1)  # the next one must be B, whatever the ring says
    (g,) = ledger.pump()
    held = collections.Counter(s.registrant for s in ledger.sessions.values() if s.worker == 1)
    assert sorted(held.values()) == [2, 2], g


def test_remove_worker_reclaims_only_its_leases() -> None:
    ledger = make(registrants=1, sessions=4)
    ledger.set_want(1, ("", "default"), 2)
    ledger.set_want(2, ("", "default"), 1)
    ledger.pump()
    held = ledger.remove_worker(1)
    assert len(held) == 2
    assert ledger.services["svc"].total == 2
    assert sum(1 for s in ledger.sessions.values() if s.worker == 2) == 1


def test_drop_last_session_removes_registrant() -> None:
    ledger = make(registrants=2, sessions=1)
    sid = next(iter(ledger.sessions))
    reg = ledger.sessions[sid].registrant
    ledger.drop_session(sid)
    assert reg not in ledger.registrants
    assert len(ledger.registrants) == 1


def test_recall_only_for_waiters_a_worker_cannot_serve_itself() -> None:
    ledger = make(sessions=2)
    ledger.set_want(1, ("", "default"), 2)
    ledger.pump()
    ledger.set_want(1, ("", "default"), 3)  # worker 1 saturated: its own sessions will do
    assert recall_plan(ledger) == []
    ledger.set_want(2, ("", "default"), 1)  # another worker waits: ask worker 1
    assert recall_plan(ledger) == [RecallAction(1, "svc", "default", 1)]
    assert recall_plan(ledger) == []  # already asked


# The slicing part of bench/suite.py: a protected slice and a flooding bulk slice, both
# allowed to borrow, 50 % each (quotas 2 + 2 of 4 sessions).
LENDING = {
    "slices": [
        {"name": "protected", "match": {"pathPrefixes": ["/api"]}, "share": 50},
        {"name": "bulk", "share": 50},
    ]
}


def borrowed_everything() -> tuple[Ledger, list[int]]:
    """One worker; the protected slice's leases idled out while bulk flooded, so bulk
    borrowed all 4 sessions.  Returns the ledger and bulk's sessions."""
    ledger = make(LENDING, sessions=4)
    ledger.set_want(1, ("", "protected"), 2)
    protected = [g.session.id for g in ledger.pump()]
    ledger.set_want(1, ("", "bulk"), 50)
    bulk = [g.session.id for g in ledger.pump()]
    for sid in protected:  # idle for leaseIdleRelease: the worker gives them back
        assert ledger.give_back(sid, 1)
    bulk += [g.session.id for g in ledger.pump()]
    assert ledger.services["svc"].leased == {"protected": 0, "bulk": 4}
    return ledger, bulk


def test_borrowed_sessions_come_back_although_the_worker_holds_the_lenders_own() -> None:
    ledger, bulk = borrowed_everything()
    ledger.set_want(1, ("", "protected"), 1)  # the first protected request waits
    assert ledger.pump() == []
    assert recall_plan(ledger) == [RecallAction(1, "svc", "bulk", 1)]
    assert ledger.give_back(bulk.pop(), 1)  # the borrowed session's request ended
    assert [g.session.slice for g in ledger.pump()] == ["protected"]
    # A second protected request waits.  The worker now holds one protected session,
    # but protected is still under its quota while bulk borrows: bulk must give back.
    ledger.set_want(1, ("", "protected"), 1)
    assert ledger.pump() == []
    assert recall_plan(ledger) == [RecallAction(1, "svc", "bulk", 1)]
    assert ledger.give_back(bulk.pop(), 1)
    assert [g.session.slice for g in ledger.pump()] == ["protected"]
    assert ledger.services["svc"].leased == {"protected": 2, "bulk": 2}
    # At its quota the protected slice's own worker serves its queue; bulk keeps its 2.
    ledger.set_want(1, ("", "protected"), 3)
    assert recall_plan(ledger) == [] and ledger.recalls == {}


def test_owed_sessions_are_recalled_at_once_and_only_from_the_borrower() -> None:
    ledger, _ = borrowed_everything()
    ledger.set_want(1, ("", "protected"), 5)  # more than its quota of 2 waits
    assert recall_plan(ledger) == [RecallAction(1, "svc", "bulk", 2)]  # owed: its quota
    assert recall_plan(ledger) == []  # asked already
    # A borrower is never asked for more than it borrowed, whoever else waits.
    ledger.set_want(2, ("", "protected"), 5)
    assert recall_plan(ledger) == []


def test_borrowers_are_levelled_down_largest_excess_first() -> None:
    policy = {
        "slices": [
            {"name": "a", "match": {"pathPrefixes": ["/a"]}, "share": 50},
            {"name": "b", "match": {"pathPrefixes": ["/b"]}, "share": 25},
            {"name": "default", "share": 25},
        ]
    }
    ledger = make(policy, sessions=8)  # quotas: a 4, b 2, default 2
    ledger.set_want(1, ("", "b"), 5)
    ledger.set_want(2, ("", "default"), 3)
    ledger.pump()
    assert ledger.services["svc"].leased == {"b": 5, "default": 3}  # excess 3 and 1
    ledger.set_want(1, ("", "a"), 3)
    # b gives until it is no further above its quota than default (ties: the slice
    # listed last gives first, as apportion gives spare sessions to the first).
    assert recall_plan(ledger) == [
        RecallAction(1, "svc", "b", 2),
        RecallAction(2, "svc", "default", 1),
    ]
    ledger.set_want(1, ("", "a"), 4)  # a 4th waiter: b gives its last borrowed one
    assert recall_plan(ledger) == [RecallAction(1, "svc", "b", 1)]


def test_a_worker_without_sliced_recalls_may_answer_with_any_slice() -> None:
    ledger = make(LENDING, sessions=4)
    ledger.add_worker(3, revision=1)  # HELLO without revision 2
    ledger.set_want(3, ("", "protected"), 1)
    ledger.set_want(3, ("", "bulk"), 50)
    granted = ledger.pump()
    own = next(g.session.id for g in granted if g.session.slice == "protected")
    ledger.set_want(1, ("", "protected"), 1)  # another worker's protected request waits
    assert recall_plan(ledger) == [RecallAction(3, "svc", "bulk", 1)]
    # The old worker ignores the slice and returns its protected session: the recall
    # is answered all the same (it is not left outstanding for good) ...
    assert ledger.give_back(own, 3) and ledger.recalls == {}
    # ... and a worker that honours slices answers only with the slice it was asked for.
    ledger, bulk = borrowed_everything()
    ledger.set_want(1, ("", "protected"), 1)
    recall_plan(ledger)
    ledger.set_want(1, ("", "protected"), 0)
    ledger.set_want(2, ("", "bulk"), 1)
    assert ledger.recalls == {(1, "svc", "bulk"): 1}
    assert ledger.give_back(bulk[0], 1) and ledger.recalls == {}


def test_policy_change_moves_waiters_of_removed_slice_to_default() -> None:
    ledger = make(TWO_SLICES, sessions=0)
    ledger.set_want(1, ("", "mobile"), 2)
    ledger.set_policy(policy_from_data({}))
    assert {k for _, k in ledger.queue.values()} == {("", "default")}


def test_random_operations_keep_books_consistent() -> None:
    rng = random.Random(7)
    ledger = make(TWO_SLICES, registrants=3, sessions=4)
    ledger.add_worker(3, revision=1)
    workers = [1, 2, 3]
    leased: dict[int, int] = {}
    asked = answered = 0  # ASK units sent, and answered (granted or refused)
    for _ in range(3000):
        op = rng.random()
        slice_name = rng.choice(["mobile", "default"])
        if op < 0.35:
            ledger.set_want(rng.choice(workers), ("", slice_name), rng.randrange(0, 6))
        elif op < 0.45:  # a request that may not wait (workers 1 and 2 speak revision 3)
            n = rng.randrange(1, 4)
            ledger.add_ask(rng.choice([1, 2]), ("", slice_name), n)
            asked += n
        elif op < 0.5:
            ledger.set_want(rng.choice(workers), ("", slice_name), 0)
        elif op < 0.7 and leased:
            sid = rng.choice(list(leased))
            ledger.give_back(sid, leased.pop(sid))
        elif op < 0.75 and leased:
            sid = rng.choice(list(leased))
            leased.pop(sid)
            ledger.drop_session(sid)
        elif op < 0.8 and leased:  # a worker answers one of its recalls with that slice
            key = rng.choice(sorted(ledger.recalls)) if ledger.recalls else None
            sid = next(
                (
                    s.id
                    for s in ledger.sessions.values()
                    if key and s.worker == key[0] and s.slice in (key[2], "")
                ),
                None,
            )
            if sid is not None:
                ledger.give_back(sid, leased.pop(sid))
        elif op < 0.87:  # a service instance dials a session (dropped ones are replaced)
            name = f"i{rng.randrange(4)}"
            reg = ledger.find_registrant("svc", name) or ledger.add_registrant("svc", name, None)
            ledger.add_session(reg, 1000)
        elif op < 0.89:  # a worker goes away: its asks and the probes it owes with it
            worker = rng.choice([1, 2])
            asked -= sum(a.n for a in ledger.asks.values() if a.worker == worker)
            for sess in ledger.remove_worker(worker):
                leased.pop(sess.id)
            ledger.add_worker(worker)
        if rng.random() < 0.3 and (ledger.probes[1] or ledger.probes[2]):
            # A worker answers its oldest probe, with some of the sessions asked for.
            worker = 1 if ledger.probes[1] else 2
            probe = ledger.probes[worker][0]
            mine = [
                s.id
                for s in ledger.sessions.values()
                if s.worker == worker and (s.service, s.slice) == (probe.service, probe.slice)
            ]
            for sid in rng.sample(mine, min(len(mine), rng.randrange(0, probe.n + 1))):
                ledger.give_back(sid, leased.pop(sid))
            ledger.probes_answered(worker, 1)
        grants = ledger.pump(prefetch=rng.randrange(3))
        for g in grants:
            assert g.session.id not in leased
            leased[g.session.id] = g.worker
            answered += g.asked
        book = ledger.services["svc"]
        assert book.total == len(ledger.sessions)
        assert book.total - book.idle_count == len(leased) == sum(book.leased.values())
        if any(g.session.slice == "mobile" for g in grants):
            # Dropped sessions can shrink a quota below running leases (nothing is
            # preempted), but a grant never takes mobile (no borrowing) past it.
            assert book.leased["mobile"] <= ledger.quotas("svc")["mobile"]
        probes, refusals = settle(ledger)
        check_probes(ledger, probes)
        answered += sum(r.n for r in refusals)
        assert all(r.n > 0 for r in refusals)
        # Every ask unit is answered once: granted, refused, or still asked.
        assert asked == answered + sum(a.n for a in ledger.asks.values())
        check_recalls(ledger, recall_plan(ledger))


def check_probes(ledger: Ledger, probes: list[RecallAction]) -> None:
    """Probes go to workers that answer them, never for more sessions than a worker
    holds of that slice (with the probes already out), and each ask knows its probes."""
    held: collections.Counter[tuple[int, str, str]] = collections.Counter(
        (s.worker, s.service, s.slice) for s in ledger.sessions.values() if s.worker
    )
    out: collections.Counter[tuple[int, str, str]] = collections.Counter()
    for worker, queue in ledger.probes.items():
        for probe in queue:
            out[(worker, probe.service, probe.slice)] += probe.n
    for action in probes:
        key = (action.worker, action.service, action.slice)
        assert action.now and ledger.probes_answer(action.worker), action
        assert action.n > 0 and out[key] <= held[key], (action, out[key], held[key])
    for ask_id, ask in ledger.asks.items():
        assert ask.n > 0 and ask.probed and ask.probes > 0
        assert ask.probes == sum(ask_id in p.asks for q in ledger.probes.values() for p in q)


def check_recalls(ledger: Ledger, plan: list[RecallAction]) -> None:
    """What a recall plan must do: only slices at or over their quota give back, nobody
    is asked for more than it holds, and what under-quota waiters are owed is on its way
    (up to what the slices over quota borrowed)."""
    book = ledger.services["svc"]
    quotas = ledger.quotas("svc")
    held: collections.Counter[tuple[int, str]] = collections.Counter(
        (s.worker, s.slice) for s in ledger.sessions.values() if s.worker
    )
    for action in plan:
        assert action.service == "svc"
        assert 0 < action.n <= held[(action.worker, action.slice)], action
        assert book.leased[action.slice] >= quotas.get(action.slice, 0), action
    assert all(n > 0 for n in ledger.recalls.values())
    waiting = ledger.waiting()
    owed = sum(
        min(q - book.leased[s], waiting[("svc", s)])
        for s, q in quotas.items()
        if book.leased[s] < q
    )
    excess = {s: n - quotas.get(s, 0) for s, n in book.leased.items() if n > quotas.get(s, 0)}
    coming = sum(
        min(
            excess[s],
            sum(min(n, held[(w, s)]) for (w, _, name), n in ledger.recalls.items() if name == s),
        )
        for s in excess
    )
    assert coming >= min(owed - book.idle_count, sum(excess.values())), (owed, excess, coming)
