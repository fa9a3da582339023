"""Shrinking the pod cap: which sessions are retired or recalled (no IO)."""

from __future__ import annotations

from backdial.acceptor import capacity
from backdial.acceptor.ledger import Ledger, RecallAction
from backdial.policy import Limits, Policy


def ledger_with(sessions: dict[str, int], cap: int) -> Ledger:
    ledger = Ledger(Policy(limits=Limits(max_sessions=cap)))
    fd = 100
    for instance, n in sessions.items():
        reg = ledger.add_registrant("svc", instance, None)
        for _ in range(n):
            ledger.add_session(reg, fd)
            fd += 1
    return ledger


def test_no_surplus_within_the_cap() -> None:
    ledger = ledger_with({"a": 2, "b": 1}, cap=3)
    assert capacity.surplus(ledger) == 0
    assert capacity.idle_victims(ledger, 0) == []


def test_idle_victims_come_from_the_largest_registrants() -> None:
    ledger = ledger_with({"a": 3, "b": 1}, cap=2)
    assert capacity.surplus(ledger) == 2
    victims = capacity.idle_victims(ledger, 2)
    owners = [ledger.registrants[s.registrant].instance for s in victims]
    assert owners == ["a", "a"]  # a keeps 1, b keeps its 1
    ledger = ledger_with({"a": 2, "b": 2}, cap=2)
    owners = [ledger.registrants[s.registrant].instance for s in capacity.idle_victims(ledger, 2)]
    assert sorted(owners) == ["a", "b"]


def test_leased_sessions_are_recalled_not_touched() -> None:
    ledger = ledger_with({"a": 4}, cap=1)
    ledger.add_worker(7)
    ledger.set_want(7, ("", "default"), 3)
    grants = ledger.pump()
    assert len(grants) == 3
    # One idle session can go now; two of the three leased ones must come back first.
    assert [s.worker for s in capacity.idle_victims(ledger, 3)] == [0]
    # Any slice's sessions will do (""); the plan counts them as asked for.
    assert capacity.recall_plan(ledger, 2) == [RecallAction(7, "svc", "", 2)]
    assert ledger.recalls[(7, "svc", "")] == 2
    assert capacity.recall_plan(ledger, 2) == []  # already asked
    sid = next(s.id for s in ledger.sessions.values() if s.worker == 7)
    assert ledger.give_back(sid, 7) and ledger.recalls[(7, "svc", "")] == 1
