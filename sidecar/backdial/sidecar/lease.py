"""A lease and the small interfaces between the sidecar's parts that pass it around.

A *lease* is this worker's temporary ownership of one session.  Three parts
handle it and know each other only through the protocols below, so none
imports another's module:

* the lease pool (``leasepool.LeasePool``) holds ``LeasedConn`` objects, hands
  them to a ``Waiter`` and takes them back;
* the session connection (``sessionconn.SessionConn``) is the ``LeasedConn``:
  it reports to its ``LeaseOwner`` (the pool) when an idle session ends, and
  feeds the response of the request in flight to a ``ResponseSink``;
* the client connection (``proxy.ClientProtocol``) is both the ``Waiter`` of a
  request that had to wait and the ``ResponseSink`` of the request it serves; it
  sees the pool as a ``LeaseSource`` (try at once, else a ``Ticket`` in the queue).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol

from backdial.control import Rejection, ReleaseState, WantKey
from backdial.policy import Policy


@dataclass(slots=True)
class Lease:
    session: int
    service: str  # the service the session belongs to
    slice: str
    registrant: int
    sock: socket.socket
    key: WantKey = ("", "")  # what this worker asked for when it was granted
    idle_since: float = 0.0
    epoch: int = 0  # control connection generation that granted it
    asked: bool = False  # granted for an ASK and not yet handed to anyone


class LeasedConn(Protocol):
    """A leased session as the pool holds it."""

    lease: Lease

    def close(self) -> None: ...


class Waiter(Protocol):
    """Who waits for a session: told exactly once, by one of the two calls."""

    def lease_ready(self, conn: LeasedConn) -> None: ...

    def lease_refused(self, reason: Rejection, retry_after: int) -> None: ...


class LeaseOwner(Protocol):
    """Where a session connection goes back to (the pool)."""

    def release(self, conn: LeasedConn, state: ReleaseState) -> None: ...

    def lost(self, conn: LeasedConn, state: ReleaseState) -> None: ...


class ResponseSink(Protocol):
    """What the session side reports to the owner of the request in flight."""

    def resp_head(
        self, status: int, reason: bytes, lines: list[bytes], length: int, chunked: bool
    ) -> None: ...

    def resp_interim(self, status: int, reason: bytes, lines: list[bytes]) -> None: ...

    def resp_body(self, data: bytes) -> None: ...

    def resp_flush(self) -> None: ...

    def resp_done(self, state: ReleaseState) -> None: ...

    def resp_failed(self, started: bool) -> None: ...

    def upstream_writable(self, writable: bool) -> None: ...


@dataclass(slots=True, eq=False)
class Ticket:
    """One waiting request in a slice's FIFO (or, ``asking``, one that may not wait and
    asked the acceptor for a session now); ``cancel`` it when the client goes away."""

    waiter: Waiter
    key: WantKey
    started: float
    deadline: float
    active: bool = True
    asking: bool = False


class LeaseSource(LeaseOwner, Protocol):
    """What a client connection needs of the worker's lease pool (``LeasePool``): an idle
    sticky lease at once, else a place in the slice's queue, and the way back."""

    @property
    def policy(self) -> Policy: ...

    def try_acquire(self, service: str, slice_name: str) -> LeasedConn | None: ...

    def wait(self, service: str, slice_name: str, waiter: Waiter) -> Ticket: ...

    def cancel(self, ticket: Ticket) -> None: ...


class DiscardingSink:
    """A ``ResponseSink`` base for owners that want only the outcome of a response (its
    status, how it ended), not its bytes: interim heads, body and flushes are dropped."""

    __slots__ = ()

    def resp_interim(self, status: int, reason: bytes, lines: list[bytes]) -> None:
        return None

    def resp_body(self, data: bytes) -> None:
        return None

    def resp_flush(self) -> None:
        return None

    def upstream_writable(self, writable: bool) -> None:
        return None
