"""LeaseBook: the worker's pure decisions about its sessions and waiting requests."""

from __future__ import annotations

import collections
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


def test_asking_requests_keep_their_place_but_are_not_waiters(book: LeaseBook[Conn]) -> None:
    """A request that may not wait asks the acceptor; meanwhile it is no waiter (no WANT,
    not in the slice's count) but nobody jumps it, and its deadline still bounds it."""
    a = hold(book, Conn(1))
    free(book, a, 0.5)
    assert book.take(KEY) is a  # busy now
    asking = book.ask(KEY, Waiting(), 1.0, 5.0)
    assert asking.asking and book.asking == 1
    assert book.waiting == 0 and book.waiting_in("default") == 0
    assert book.take_unsent() == {KEY: 1} and book.asked == {KEY: 1} and not book.unsent
    waiter = book.enqueue(KEY, Waiting(), 2.0, 5.0)  # room to wait appeared meanwhile
    # The freed session goes to the older of the two: the asking one.
    assert free(book, a, 3.0) == (Settle.HANDED, asking)
    assert book.cancel(waiter) and book.waiting == 0
    late = book.ask(KEY, Waiting(), 4.0, 1.0)
    assert book.take(KEY) is None  # an idle session would go to it, not past it
    assert book.expire(5.5) == ([late], 0.0) and book.asking == 0
    assert not book.cancel(late)


def test_a_session_granted_for_an_ask_goes_to_an_asking_request(book: LeaseBook[Conn]) -> None:
    waiter = book.enqueue(KEY, Waiting(), 1.0, 5.0)
    asking = book.ask(KEY, Waiting(), 2.0, 5.0)
    book.take_unsent()
    grant = book.granted(KEY, asked=True)
    granted = hold(book, Conn(1))
    granted.lease.asked = True
    assert book.settle(granted, 3.0) == (Settle.HANDED, asking)  # not the older waiter
    assert not granted.lease.asked  # from now on an ordinary sticky session
    assert book.adopted(grant) == [] and book.adopting == {}
    assert book.waiters[KEY] == collections.deque([waiter])


def test_asking_requests_are_refused_once_no_answer_can_serve_them(
    book: LeaseBook[Conn],
) -> None:
    t1, t2, t3 = (book.ask(KEY, Waiting(), float(i), 9.0) for i in range(3))
    assert book.take_unsent() == {KEY: 3}
    grant = book.granted(KEY, asked=True)  # one granted: being adopted (for t1) ...
    assert book.ask_refused(KEY, 1) == [t2]  # ... one refused; t3's ask is not answered
    assert not t2.active and t1.active and t3.active
    t4 = book.ask(KEY, Waiting(), 4.0, 9.0)  # not even sent yet: covered
    granted = hold(book, Conn(1))
    granted.lease.asked = True
    assert book.settle(granted, 5.0) == (Settle.HANDED, t1)
    assert book.adopted(grant) == []
    assert book.ask_refused(KEY, 1) == [t3]
    # Lost the acceptor: nothing is coming for the rest.
    assert book.forget_asks() == [t4] and book.asking == 0
    assert not (book.unsent or book.asked or book.adopting)


def test_idle_now_takes_what_is_idle_and_owes_nothing(book: LeaseBook[Conn]) -> None:
    a, b = hold(book, Conn(1)), hold(book, Conn(2, key=OTHER))
    hold(book, Conn(3))  # busy: not given
    free(book, a, 1.0)
    free(book, b, 1.0)
    assert book.idle_now("svc", "default", 2) == [a]
    assert book.recall == {}  # a RECALL now leaves nothing owed
    assert book.idle_now("svc", "", 5) == [b]


def test_any_session_on_its_way_covers_an_asking_request(book: LeaseBook[Conn]) -> None:
    """A session granted for a waiter (or as an extra) may still serve an asking request:
    until it is adopted, a REFUSE does not turn that request away."""
    waiting = book.ask(KEY, Waiting(), 1.0, 9.0)
    book.take_unsent()
    grant = book.granted(KEY, asked=False)  # a WANT unit's or a prefetched session
    assert book.ask_refused(KEY, 1) == []  # covered by the session on its way
    conn = hold(book, Conn(1))
    assert book.settle(conn, 2.0) == (Settle.HANDED, waiting)
    assert book.adopted(grant) == [] and not book.asks[KEY]
    # With nothing on its way, a REFUSE turns it away at once.
    late = book.ask(KEY, Waiting(), 3.0, 9.0)
    book.take_unsent()
    other = book.granted(OTHER, asked=False)  # another key's session covers nothing
    assert book.ask_refused(KEY, 1) == [late]
    assert book.adopted(other) == []


def test_a_probe_is_answered_after_the_sessions_granted_before_it(
    book: LeaseBook[Conn],
) -> None:
    """The acceptor counts a session it granted as ours at once: a probe must not be
    answered "nothing idle" while that session is still on its way here."""
    first = book.granted(KEY, asked=False)
    book.probe("svc", "default", 1)
    assert book.due_probes() == []  # waits for the session granted before it
    second = book.granted(KEY, asked=False)  # granted after the probe: not waited for
    book.probe("svc", "default", 2)
    assert book.adopted(first) == []
    assert book.due_probes() == [("svc", "default", 1)]
    assert book.due_probes() == []  # the second waits for the grant before it
    book.adopted(second)
    assert book.due_probes() == [("svc", "default", 2)]
    book.probe("svc", "", 1)  # nothing on its way: due at once
    assert book.due_probes() == [("svc", "", 1)]
    # Lost the acceptor: probes of the old connection are never answered.
    book.granted(KEY, asked=False)
    book.probe("svc", "default", 1)
    book.forget_asks()
    assert book.due_probes() == [] and not book.probes


def test_waiters_a_granted_session_is_on_its_way_to_are_not_reported(
    book: LeaseBook[Conn],
) -> None:
    """The acceptor took a WANT unit off for each session it granted; until the session is
    adopted its waiter still waits here, and reporting it again would ask for a second
    session (the extra lease tests/stack/test_slicing.py saw now and then)."""
    waiting = {KEY: 3, OTHER: 1}
    assert book.want_counts(waiting) == waiting
    first = book.granted(KEY, asked=False)
    book.granted(KEY, asked=False)  # e.g. a prefetched one: it serves a waiter first too
    book.granted(OTHER, asked=True)  # for an asking request, not for a waiter
    assert book.want_counts(waiting) == {KEY: 1, OTHER: 1}
    assert book.want_counts({KEY: 1}) == {}  # never below 0
    book.adopted(first)
    assert book.want_counts(waiting) == {KEY: 2, OTHER: 1}
