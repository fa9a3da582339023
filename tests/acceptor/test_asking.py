"""Requests that may not wait (ASK), without IO: ``Ledger.pump`` serves them after the
FIFO from idle sessions, ``asking.settle`` probes workers for idle ones or refuses."""

from __future__ import annotations

from tests.acceptor.test_ledger import LENDING, TWO_SLICES, make

from backdial.acceptor.asking import ROUNDS, Refusal, settle
from backdial.acceptor.ledger import Ledger, RecallAction

KEY = ("", "default")


def lease(ledger: Ledger, worker: int, key: tuple[str, str], n: int) -> list[int]:
    """*worker* waits for *n* sessions of *key* and is granted what is idle."""
    ledger.set_want(worker, key, n)
    return [g.session.id for g in ledger.pump() if g.worker == worker]


def test_an_ask_takes_an_idle_session_after_the_waiters_and_counts_no_want() -> None:
    ledger = make(sessions=2)
    ledger.set_want(2, KEY, 1)
    ledger.add_ask(1, KEY, 1)
    ledger.add_ask(1, KEY, 1)  # the same worker's asks of one turn are one
    assert len(ledger.asks) == 1
    grants = ledger.pump(prefetch=8)
    assert [(g.worker, g.asked, g.prefetch) for g in grants] == [
        (2, False, False),
        (1, True, False),
    ]
    assert ledger.wants[1] == {} and ledger.wants[2] == {}  # the ask was never a waiter
    # The second unit finds nothing idle; worker 2 may hold it idle: probe it.
    assert settle(ledger) == ([RecallAction(2, "svc", "default", 1, now=True)], [])
    assert settle(ledger) == ([], [])  # probed once; it waits for the answer
    ledger.probes_answered(2, 1)  # nothing idle there
    assert ledger.pump() == []
    assert settle(ledger) == ([], [Refusal(1, KEY, 1)])
    assert not ledger.asks and not ledger.probes[2]


def test_a_probe_brings_back_an_idle_session_for_the_ask() -> None:
    ledger = make(sessions=1)
    (sid,) = lease(ledger, 1, KEY, 1)
    ledger.add_ask(2, KEY, 1)
    assert ledger.pump() == []
    assert settle(ledger) == ([RecallAction(1, "svc", "default", 1, now=True)], [])
    assert ledger.give_back(sid, 1)  # worker 1 had it idle: it came with the answer
    ledger.probes_answered(1, 1)
    (g,) = ledger.pump()
    assert (g.worker, g.session.id, g.asked) == (2, sid, True)
    assert settle(ledger) == ([], []) and not ledger.asks


def test_an_ask_whose_answer_went_to_an_older_waiter_is_probed_again() -> None:
    """Worker 2 holds both sessions idle; worker 1 has a waiting request and one that may
    not wait.  The probe brings one session back, and the older waiter takes it: the ask
    is probed again (the other session is still idle there), not refused."""
    ledger = make(sessions=2)
    first, second = lease(ledger, 2, KEY, 2)
    ledger.set_want(1, KEY, 1)
    ledger.add_ask(1, KEY, 1)
    assert ledger.pump() == []
    assert settle(ledger) == ([RecallAction(2, "svc", "default", 1, now=True)], [])
    assert ledger.give_back(first, 2)
    ledger.probes_answered(2, 1, returned=1)
    (g,) = ledger.pump()
    assert (g.worker, g.session.id, g.asked) == (1, first, False)  # the waiter, first
    assert settle(ledger) == ([RecallAction(2, "svc", "default", 1, now=True)], [])
    assert ledger.give_back(second, 2)
    ledger.probes_answered(2, 1, returned=1)
    (g,) = ledger.pump()
    assert (g.worker, g.session.id, g.asked) == (1, second, True)
    assert settle(ledger) == ([], []) and not ledger.asks


def test_an_ask_is_probed_again_a_bounded_number_of_rounds() -> None:
    """Every round brings a session back and an older waiter takes it: after the first
    probe and ``ROUNDS`` more the ask is refused, though worker 2 still holds sessions."""
    ledger = make(sessions=8)
    held = lease(ledger, 2, KEY, 8)
    ledger.add_ask(1, KEY, 1)
    for round_ in range(1 + ROUNDS):
        ledger.set_want(1, KEY, 1)  # a new waiter, older than nothing idle here
        assert ledger.pump() == []
        assert settle(ledger) == ([RecallAction(2, "svc", "default", 1, now=True)], [])
        assert ledger.give_back(held[round_], 2)
        ledger.probes_answered(2, 1, returned=1)
        assert [(g.worker, g.asked) for g in ledger.pump()] == [(1, False)]
    assert settle(ledger) == ([], [Refusal(1, KEY, 1)])
    assert not ledger.asks


def test_probes_never_ask_twice_for_a_session_and_skip_old_workers_and_the_asker() -> None:
    ledger = make(sessions=3)
    ledger.add_worker(3, revision=2)  # answers no RECALL now
    lease(ledger, 1, KEY, 1)
    lease(ledger, 2, KEY, 1)
    lease(ledger, 3, KEY, 1)
    ledger.add_ask(1, KEY, 2)  # worker 1 holds none of its key idle: not probed
    ledger.add_ask(1, ("other", "default"), 1)  # no such service: refused at once
    ledger.pump()
    probes, refusals = settle(ledger)
    assert probes == [RecallAction(2, "svc", "default", 1, now=True)]
    assert refusals == [Refusal(1, ("other", "default"), 1)]
    ledger.add_worker(4)
    ledger.add_ask(4, KEY, 2)
    ledger.pump()
    # Worker 2's one session is being asked for already; worker 3 would not answer.
    assert settle(ledger) == ([RecallAction(1, "svc", "default", 1, now=True)], [])


def test_an_ask_never_takes_a_session_its_slice_may_not_use() -> None:
    ledger = make(TWO_SLICES, sessions=8)  # quotas: mobile 2 (no borrowing), default 6
    mobile = ("", "mobile")
    assert len(lease(ledger, 1, mobile, 2)) == 2
    ledger.add_ask(2, mobile, 1)
    assert ledger.pump() == []  # 6 idle sessions, but mobile is at its quota
    # Its own sessions may be idle in worker 1: asked back, nothing else.
    assert settle(ledger) == ([RecallAction(1, "svc", "mobile", 1, now=True)], [])
    ledger.probes_answered(1, 1)
    assert ledger.pump() == []
    assert settle(ledger) == ([], [Refusal(2, mobile, 1)])
    assert ledger.services["svc"].leased["mobile"] == 2


def test_an_under_quota_ask_probes_the_borrowers_not_the_lender() -> None:
    ledger = make(LENDING, sessions=4)  # quotas: protected 2, bulk 2; both borrow
    protected, bulk = ("", "protected"), ("", "bulk")
    lease(ledger, 1, protected, 1)
    lease(ledger, 2, bulk, 3)  # bulk borrowed one of protected's
    ledger.add_ask(1, protected, 2)
    assert ledger.pump() == []
    # Owed 1: one borrowed session asked back (the asker holds protected busy: skipped).
    assert settle(ledger) == ([RecallAction(2, "svc", "bulk", 1, now=True)], [])


def test_a_gone_worker_drops_its_asks_and_answers_its_probes() -> None:
    ledger = make(sessions=1)
    lease(ledger, 1, KEY, 1)
    ledger.add_ask(2, KEY, 1)
    ledger.pump()
    assert settle(ledger)[0] == [RecallAction(1, "svc", "default", 1, now=True)]
    ledger.remove_worker(1)  # its session is reclaimed: it will never answer
    assert ledger.pump() == []
    assert settle(ledger) == ([], [Refusal(2, KEY, 1)])
    ledger.add_ask(2, KEY, 1)
    ledger.remove_worker(2)
    assert not ledger.asks
