"""A worker's idle sessions for one (service, slice), rotated fairly by registrant.

Invariant 8 says fairness must hold wherever the choice is made.  With sticky
leases the worker chooses, not the acceptor, so the next idle session comes
from the registrant that has waited longest for a turn, not simply from the
oldest session: a worker holding two sessions of instance A and one of B
alternates A, B, A, B rather than serving A twice as often.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class _HasLease(Protocol):
    @property
    def lease(self) -> _LeaseLike: ...


class _LeaseLike(Protocol):
    registrant: int
    idle_since: float


C = TypeVar("C", bound=_HasLease)


class IdleRing(Generic[C]):
    __slots__ = ("_by_reg", "_count", "_ring")

    def __init__(self) -> None:
        self._by_reg: dict[int, collections.deque[C]] = {}
        self._ring: collections.deque[int] = collections.deque()  # registrants, next turn first
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[C]:
        for queue in self._by_reg.values():
            yield from queue

    def append(self, conn: C) -> None:
        reg = conn.lease.registrant
        queue = self._by_reg.get(reg)
        if queue is None:
            queue = self._by_reg[reg] = collections.deque()
            self._ring.append(reg)
        queue.append(conn)
        self._count += 1

    def take(self) -> C | None:
        """The next registrant's oldest idle session; that registrant goes to the back."""
        ring = self._ring
        while ring:
            reg = ring.popleft()
            queue = self._by_reg[reg]
            conn = queue.popleft()
            self._count -= 1
            if queue:
                ring.append(reg)
            else:
                del self._by_reg[reg]
            return conn
        return None

    def remove(self, conn: C) -> bool:
        reg = conn.lease.registrant
        queue = self._by_reg.get(reg)
        if queue is None or conn not in queue:
            return False
        queue.remove(conn)
        self._count -= 1
        if not queue:
            del self._by_reg[reg]
            self._ring.remove(reg)
        return True

    def take_if(self, pred: Callable[[C], bool], limit: int) -> list[C]:
        """Remove and return up to *limit* sessions matching *pred*."""
        out = [conn for conn in self if pred(conn)][:limit]
        for conn in out:
            self.remove(conn)
        return out

    def drain(self) -> list[C]:
        out = list(self)
        self._by_reg.clear()
        self._ring.clear()
        self._count = 0
        return out
