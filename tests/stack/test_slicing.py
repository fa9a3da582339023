"""Slicing under contention, end to end: a borrowing slice gives back what it borrowed.

Real acceptor, sidecar and demo service processes on loopback.  The scenario is the
one ``bench/suite.py``'s slicing part measures: a protected slice served alone, then a
bulk slice that may borrow floods the service while the protected slice is quiet, so
the protected slice's sticky leases idle out (``leaseIdleRelease``) and the bulk slice
borrows every session.  When the protected slice's requests come back it must get its
nominal share back (Kubernetes API Priority and Fairness: lending is revoked when the
lender needs it), promptly, and then keep it without a round trip per request.
"""

from __future__ import annotations

import pytest

from tests.helpers import get_json, wait_for
from tests.stack.conftest import Stack
from tests.stack.test_stack import Load

pytestmark = pytest.mark.slow

# 4 sessions: quotas 2 (protected) + 2 (bulk); both may borrow idle sessions.
CONFIG = (
    "slices:\n"
    "- {name: protected, share: 50, borrow: true, match: {pathPrefixes: [/whoami]},"
    " queue: {maxWaiting: 50, timeout: 30s}}\n"
    "- {name: bulk, share: 50, borrow: true, queue: {maxWaiting: 200, timeout: 30s}}\n"
)
PROTECTED = "/whoami?ms=5"
BULK = "/delay?ms=500"  # a borrowed session comes free only every ~125 ms (4 of them)


def slices(stack: Stack) -> dict[str, dict[str, int]]:
    state = get_json(stack.acceptor_url("/v1/state"))
    return state["services"]["demo"]["slices"]  # type: ignore[no-any-return]


def leased(stack: Stack, slice_name: str) -> int:
    return slices(stack)[slice_name]["leased"]


def test_borrowed_sessions_come_back_when_the_lender_needs_them(stack: Stack) -> None:
    stack.start(sessions=4, config=CONFIG)
    # 1. The protected slice alone holds its sticky leases.
    with Load(stack.port, PROTECTED, clients=2) as alone:
        # (It may borrow the idle sessions too: nobody else waits for them.)
        wait_for(lambda: leased(stack, "protected") >= 2, what="protected holds its leases")
        alone.wait_more(20)
    assert alone.failures() == {}

    with Load(stack.port, BULK, clients=8) as bulk:
        # 2. Quiet protected slice: its leases idle out and the flooding bulk slice,
        #    which may borrow, takes every session.
        wait_for(
            lambda: leased(stack, "protected") == 0 and leased(stack, "bulk") == 4,
            timeout=20,
            what="protected leases idled out, bulk borrowed all 4 sessions",
        )
        # 3. Protected requests come back, one client, then a second one once the first
        #    is served: each must get a session of its own back from the borrower
        #    (the second one too, although the worker already holds a protected lease).
        with Load(stack.port, PROTECTED, clients=1) as first:
            wait_for(lambda: leased(stack, "protected") == 1, what="first protected lease")
            first.wait_more(5)
            granted = stack.metric("backdial_acceptor_leases_granted_total")
            with Load(stack.port, PROTECTED, clients=1) as second:
                # Bounded: the borrowed session is given back when its request ends
                # (500 ms at most); 10 s is only the test's patience on a loaded machine.
                wait_for(
                    lambda: leased(stack, "protected") == 2,
                    timeout=10,
                    what="protected slice back at its quota of 2 leases",
                )
                # The worker gave back a borrowed (bulk) session, not the protected one
                # it holds: had it returned that one, the acceptor would have granted it
                # straight back to protected, about once per protected request (5 ms)
                # until a bulk request happened to end first.
                recovery = stack.metric("backdial_acceptor_leases_granted_total") - granted
                # 4. Once back, it keeps them: no lease round trip per protected request
                #    (recalling the protected slice's own sessions would cause one).
                granted = stack.metric("backdial_acceptor_leases_granted_total")
                served = first.total + second.total
                wait_for(
                    lambda: first.total + second.total >= served + 100,
                    timeout=30,
                    what="100 more protected requests",
                )
                regranted = stack.metric("backdial_acceptor_leases_granted_total") - granted
                assert leased(stack, "protected") == 2
        bulk.wait_more(5)
    assert recovery <= 3, recovery
    # A few grants may follow a bulk session coming free in between; one per protected
    # request would be 100.
    assert regranted <= 10, regranted
    assert first.failures() == {} and second.failures() == {} and bulk.failures() == {}
