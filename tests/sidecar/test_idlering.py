"""IdleRing without sockets: the worker's own choice rotates over registrants (invariant 8)."""

from __future__ import annotations

from dataclasses import dataclass, field

from backdial.sidecar.idlering import IdleRing


@dataclass
class _Lease:
    registrant: int
    idle_since: float = 0.0


@dataclass(eq=False)
class _Conn:
    name: str
    lease: _Lease = field(default_factory=lambda: _Lease(0))


def _conn(name: str, registrant: int) -> _Conn:
    return _Conn(name, _Lease(registrant))


def test_take_alternates_registrants_not_sessions() -> None:
    ring: IdleRing[_Conn] = IdleRing()
    for c in (_conn("a1", 1), _conn("a2", 1), _conn("b1", 2)):
        ring.append(c)
    assert len(ring) == 3 and ring
    order = []
    while (c := ring.take()) is not None:
        order.append(c.name)
        if c.name != "a2":
            ring.append(c)  # served and back idle, as the pool does
        if len(order) == 6:
            break
    # A holds two sessions, B one: still A, B, A, B... (oldest session of A first).
    assert order == ["a1", "b1", "a2", "b1", "a1", "b1"]


def test_take_from_empty_and_len() -> None:
    ring: IdleRing[_Conn] = IdleRing()
    assert ring.take() is None and not ring and len(ring) == 0


def test_remove_keeps_the_ring_consistent() -> None:
    ring: IdleRing[_Conn] = IdleRing()
    a, b, c = _conn("a", 1), _conn("b", 2), _conn("c", 2)
    for conn in (a, b, c):
        ring.append(conn)
    assert ring.remove(a) and not ring.remove(a)
    assert len(ring) == 2
    assert [ring.take(), ring.take(), ring.take()] == [b, c, None]
    ring.append(a)  # registrant 1 comes back at the end of the ring
    assert ring.take() is a


def test_take_if_and_drain() -> None:
    ring: IdleRing[_Conn] = IdleRing()
    conns = [_conn(f"s{i}", i % 3) for i in range(6)]
    for conn in conns:
        ring.append(conn)
    taken = ring.take_if(lambda c: c.lease.registrant == 1, 1)
    assert [c.name for c in taken] == ["s1"] and len(ring) == 5
    assert sorted(c.name for c in ring) == ["s0", "s2", "s3", "s4", "s5"]
    drained = ring.drain()
    assert len(drained) == 5 and len(ring) == 0 and ring.take() is None
