"""LeaseBook: the worker's pure decisions about its sessions and waiting requests."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from backdial.control import Rejection
from backdial.sidecar.lease import Lease, LeasedConn
from backdial.sidecar.leasebook import LeaseBook, Settle

KEY = ("", "default")
OTHER = ("", "mobile")


class Conn:
    def __init__(self, sid: int, registrant: int = 1, key: tuple[str, str] = KEY) -> None:
        self.sock = socket.socket()
        self.lease = Lease(sid, "svc", key[1], registrant, self.sock, key)

    def close(self) -> None:
        self.sock.close()


class Waiting:
    def lease_ready(self, conn: LeasedConn) -> None:
        raise AssertionError("the book never calls its waiters")

    def lease_refused(self, reason: Rejection, retry_after: int) -> None:
        raise AssertionError("the book never calls its waiters")


@pytest.fixture
def book() -> Iterator[LeaseBook[Conn]]:
    b: LeaseBook[Conn] = LeaseBook()
    yield b
    for conn in b.held.values():
        conn.close()


def hold(book: LeaseBook[Conn], conn: Conn) -> Conn:
    book.held[conn.lease.session] = conn
    book.busy.add(conn.lease.session)
    return conn


def free(book: LeaseBook[Conn], conn: Conn, now: float) -> tuple[Settle, object]:
    """What LeasePool.release does with a clean session: not busy any more, then settle."""
    book.busy.discard(conn.lease.session)
    return book.settle(conn, now)


def test_take_uses_idle_sessions_but_never_jumps_waiters(book: LeaseBook[Conn]) -> None:
    a = hold(book, Conn(1))
    assert free(book, a, 5.0) == (Settle.IDLE, None)
    assert a.lease.idle_since == 5.0 and 1 not in book.busy
    assert book.take(OTHER) is None  # another key's idle session is not ours
    ticket = book.enqueue(KEY, Waiting(), 6.0, 1.0)
    assert book.take(KEY) is None  # a request of this key already waits: it goes first
    assert book.cancel(ticket) and not book.cancel(ticket)
    assert book.take(KEY) is a and 1 in book.busy


def test_settle_prefers_recall_then_oldest_waiter(book: LeaseBook[Conn]) -> None:
    a, b, c = (hold(book, Conn(i)) for i in (1, 2, 3))
    first = book.enqueue(KEY, Waiting(), 1.0, 1.0)
    second = book.enqueue(KEY, Waiting(), 2.0, 1.0)
    assert book.recall_idle("svc", "", 1) == []  # nothing idle: owed by the next one freed
    assert free(book, a, 3.0) == (Settle.GIVE_BACK, None)
    assert free(book, b, 3.0) == (Settle.HANDED, first)
    assert not first.active and 2 in book.busy
    assert free(book, c, 3.0) == (Settle.HANDED, second)
    assert book.waiting == 0


def test_expire_refuses_in_order_and_reports_the_next_deadline(book: LeaseBook[Conn]) -> None:
    t1 = book.enqueue(KEY, Waiting(), 0.0, 1.0)
    t2 = book.enqueue(OTHER, Waiting(), 0.5, 1.0)
    t3 = book.enqueue(KEY, Waiting(), 0.7, 1.0)
    assert book.waiting == 3 and book.waiting_in("default") == 2
    expired, earliest = book.expire(1.6)
    assert expired == [t1, t2] and earliest == 1.7
    assert not t1.active and t3.active
    assert book.expire(2.0) == ([t3], 0.0)


def test_recall_idle_sweep_and_orphans(book: LeaseBook[Conn]) -> None:
    a, b, _ = (hold(book, Conn(i, registrant=i)) for i in (1, 2, 3))
    free(book, a, 1.0)
    free(book, b, 9.0)
    assert book.recall_idle("svc", "", 3) == [a, b] and book.recall[("svc", "")] == 1
    book.recall.clear()
    free(book, a, 1.0)
    free(book, b, 9.0)
    assert book.idle_since_before(5.0) == [a]
    assert book.forget_idle(b) and not book.forget_idle(Conn(99))
    free(book, b, 9.0)
    # c is busy: it stays held until its request ends; a and b are handed back
    assert set(book.orphans()) == {a, b} and list(book.held) == [3]


def test_a_sliced_recall_takes_back_the_borrowers_sessions_not_the_lenders(
    book: LeaseBook[Conn],
) -> None:
    """RECALL (svc, slice "default"): the worker also holds the lender's ("mobile")
    sessions, idle and busy; only "default" ones go back, the lender keeps its own."""
    lender_idle, lender_busy = hold(book, Conn(1, key=OTHER)), hold(book, Conn(2, key=OTHER))
    borrowed_idle, borrowed_busy = hold(book, Conn(3, key=KEY)), hold(book, Conn(4, key=KEY))
    free(book, lender_idle, 1.0)
    free(book, borrowed_idle, 1.0)
    assert book.recall_idle("svc", "default", 2) == [borrowed_idle]  # the idle one: now
    assert book.recall == {("svc", "default"): 1}  # the other: when it comes free
    waiter = book.enqueue(OTHER, Waiting(), 2.0, 1.0)
    # The lender's own session is handed to the lender's waiter, not given back ...
    assert free(book, lender_busy, 3.0) == (Settle.HANDED, waiter)
    # ... while the borrowed one goes back even though its own slice has waiters.
    book.enqueue(KEY, Waiting(), 2.0, 1.0)
    assert free(book, borrowed_busy, 3.0) == (Settle.GIVE_BACK, None)
    assert book.recall == {}
    assert book.take(OTHER) is lender_idle


def test_an_idle_session_returned_unasked_still_answers_a_pending_recall(
    book: LeaseBook[Conn],
) -> None:
    a, b = hold(book, Conn(1)), hold(book, Conn(2, key=OTHER))
    assert book.recall_idle("svc", "default", 1) == []
    assert book.recall_idle("svc", "", 1) == []
    free(book, a, 1.0)  # a recall of its slice was pending: back it goes
    assert book.recall == {("svc", ""): 1}
    free(book, b, 1.0)  # "mobile": only the any-slice recall fits
    assert book.recall == {}
    # A session given back by the idle sweep answers a recall as the acceptor counts it.
    assert book.recall_idle("svc", "mobile", 1) == []
    assert not book.returned(a.lease) and book.returned(b.lease) and book.recall == {}
