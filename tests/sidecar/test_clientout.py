"""``ClientOutput`` against random sessions, clients and memory pressure (issue 12, item 3).

A stand-in transport behaves like uvloop's (a buffer, ``pause_writing`` above
the high-water mark, ``resume_writing`` at the low one, limits changeable), the
client reads it in random amounts, the session writes whenever it is not
paused, and other connections hold a random share of the worker's response
memory.  Whatever happens: the client gets every byte in order, the
connection's memory stays within the budget (or its floor) plus one session
read, and closing gives every byte back.  The glue between transport events
and ``ClientOutput`` is the one ``proxy.ClientProtocol`` has (``pause_writing``,
``resume_writing``, ``memory_freed``).
"""

from __future__ import annotations

import itertools
import tempfile
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from backdial.sidecar.clientout import MEMORY_FLOOR, ClientOutput
from backdial.sidecar.config import ProxySettings
from backdial.sidecar.listener import ListenerState
from backdial.sidecar.stats import ProxyStats

SPILL_DIR = tempfile.gettempdir()


class Session:
    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Transport:
    """uvloop's write-side contract: buffer, water marks, pause/resume callbacks."""

    def __init__(self, conn: Conn, high: int) -> None:
        self.conn = conn
        self.buf = bytearray()
        self.delivered = bytearray()
        self.high, self.low = high, high // 4
        self.paused = False

    def write(self, data: bytes) -> None:
        self.buf += data
        self._maybe_pause()

    def _maybe_pause(self) -> None:
        if not self.paused and len(self.buf) > self.high:
            self.paused = True
            self.conn.pause_writing()

    def set_write_buffer_limits(self, high: int) -> None:
        self.high, self.low = high, high // 4
        self._maybe_pause()

    def get_write_buffer_size(self) -> int:
        return len(self.buf)

    def is_closing(self) -> bool:
        return False

    def client_reads(self, n: int) -> None:
        self.delivered += self.buf[:n]
        del self.buf[:n]
        if self.paused and len(self.buf) <= self.low:
            self.paused = False
            self.conn.resume_writing()


class Conn:
    """A client connection as the listener and ClientOutput see it (proxy.py's glue)."""

    def __init__(self, state: ListenerState, high: int) -> None:
        self.deadline = 0.0
        self.session: Session | None = Session()
        self.out = ClientOutput(state, self)  # type: ignore[arg-type]
        self.transport = Transport(self, high)
        self.out.transport = self.transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        out = self.out
        out.paused = True
        if self.session is not None and out.spill is None and not out.open_spill():
            self.session.pause_reading()

    def resume_writing(self) -> None:
        self.out.paused = False
        self.out.sent += 1
        self.out.account()
        self._resumed()

    def memory_freed(self) -> None:
        if self.out.parked and not self.out.paused:
            self._resumed()

    def _resumed(self) -> None:
        if self.out.parked and not self.out.send(self.session):
            return
        if self.session is not None:
            self.session.resume_reading()

    def on_deadline(self, now: float) -> None: ...

    def drain(self) -> None: ...

    def abort(self) -> None: ...


class _Pool:
    policy: Any = None


steps = st.lists(
    st.one_of(
        st.tuples(st.just("session"), st.sampled_from([700, 20_000, 100_000, 300_000])),
        st.tuples(st.just("client"), st.sampled_from([1000, 8192, 100_000, 1 << 20])),
        st.tuples(st.just("tick"), st.just(0)),
        st.tuples(st.just("done"), st.just(0)),  # the response is complete: no more session
    ),
    max_size=60,
)


@given(
    steps=steps,
    high=st.sampled_from([64 * 1024, 256 * 1024, 1 << 20]),
    budget=st.sampled_from([0, 64 * 1024, 512 * 1024, 8 << 20]),
    others=st.sampled_from([0, 100 * 1024, 16 << 20]),
    spill_max=st.sampled_from([0, 128 * 1024, 1 << 30]),
    disk=st.sampled_from([64 * 1024, 1 << 30]),
)
def test_every_byte_arrives_in_order_within_bounds(
    steps: list[tuple[str, int]], high: int, budget: int, others: int, spill_max: int, disk: int
) -> None:
    settings = ProxySettings(
        response_buffer=high,
        response_memory_total=budget,
        response_spill_max=spill_max,
        response_spill_total=disk,
        spill_dir=SPILL_DIR,
    )
    stats = ProxyStats()
    state = ListenerState(_Pool(), settings, stats)  # type: ignore[arg-type]
    stats.response_memory.used = others  # other connections' share, held throughout
    conn = Conn(state, high)
    counter = itertools.count()
    written = bytearray()
    biggest = 0

    def session_writes(n: int) -> None:
        nonlocal biggest
        data = bytes([next(counter) % 251]) * n  # each write distinct: reordering shows
        written.extend(data)
        biggest = max(biggest, len(data))
        conn.out.write(data, conn.session)

    for kind, n in steps:
        if kind == "session" and conn.session is not None and not conn.session.paused:
            session_writes(n)
        elif kind == "client":
            conn.transport.client_reads(n)
        elif kind == "tick":
            state.recount_memory()
        elif kind == "done":
            conn.session = None
        # In memory: what the budget (or the floor) lets into the transport, and no more than
        # the transport's own limit; plus one session read beyond a limit, and one held.
        in_memory = len(conn.transport.buf) + conn.out.held_bytes
        assert in_memory <= min(high, max(budget - others, MEMORY_FLOOR)) + 2 * biggest
        if conn.out.spill is not None:
            assert conn.out.spill.pending <= max(spill_max, 0)
    # The client reads everything, with the listener's ticks in between.
    for _ in range(100_000):
        if not conn.out.parked and not conn.transport.buf:
            break
        conn.transport.client_reads(1 << 20)
        state.recount_memory()
    assert bytes(conn.transport.delivered) == bytes(written)
    conn.out.account()
    assert stats.response_memory.used == others
    conn.out.close()
    state.remove(conn)  # type: ignore[arg-type]
    assert stats.response_memory.used == others and not state.booked
    assert state.disk_budget.used == 0
