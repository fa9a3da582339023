"""The lease pool when the native engine runs: ``LeasePool`` whose book lives in the engine.

The worker's sessions, their idle rings, the per-key FIFOs of waiting requests and the
recalls owed are kept by the engine (``backdial_engine.Engine``), so a request the
engine serves takes and returns a session without Python.  This class stays the lease
authority towards the acceptor: it adopts granted sessions into the engine, gives
sessions back (recall, idle release, a removed slice, drain, or one the engine found
broken or retired), sends WANT and RELEASE records and keeps the per-slice figures
for STATS (the engine's added in).

Connections the engine hands to the Python path (``proxy.ClientProtocol``) use the
same book: ``try_acquire`` checks a session out of the engine into an
``EngineSession`` (a ``SessionConn`` over ``FdTransport``), ``release`` checks it
back in, and their waiting requests are ``Ticket``s in the engine's FIFOs, so whoever
waited longest is served first, whichever path accepted it.

Requests that may not wait (control revision 3) are kept by the engine too: its asking
requests (native connections and Python tickets in one FIFO per key) and the ASK units
not sent or not answered yet.  This class sends the ASK records the engine reports due,
and tells it each GRANT entry, REFUSE and adopted session; the engine then serves or
answers (503 ``queue_full``) its asking requests itself, so a native connection stays
native.  The grants being adopted and the probes stay in the Python ``LeaseBook``
(WANT and the probes' order need them); its own asking FIFOs stay empty.
"""

from __future__ import annotations

import asyncio
import collections
import os
from pathlib import Path
from typing import Any

from backdial.control import ConfigMsg, Rejection, ReleaseState, WantKey
from backdial.policy import Policy, Slice
from backdial.sidecar.classify import _config_host
from backdial.sidecar.fdtransport import FdTransport
from backdial.sidecar.idlering import IdleRing
from backdial.sidecar.lease import Lease, LeasedConn, Ticket, Waiter
from backdial.sidecar.leasepool import LeasePool
from backdial.sidecar.sessionconn import SessionConn


class EngineSession(SessionConn):
    """A session the engine owns; a ``SessionConn`` only while the Python path uses it."""

    def __init__(self, lease: Lease, pool: NativeLeasePool, handle: int, fd: int) -> None:
        super().__init__(lease, pool)
        self.handle = handle
        self.fd = fd
        self.native = pool
        self.closed = True  # usable only while checked out

    def check_out(self, pre: bytes) -> None:
        """The engine lent it to a Python request: read and write it from the loop."""
        self.closed = False
        self._reported = False
        self._sink = None
        self._pre = pre
        self._parser = None
        self._paused = False
        self._tunnel = False
        self.connection_made(FdTransport(self.native.loop, self.fd, self))

    def check_in(self) -> bytes:
        """Stop using it; the beginning of a RETIRE line read meanwhile goes with it."""
        if isinstance(self.transport, FdTransport):
            self.transport.detach()
        self.transport = None
        self.closed = True
        pre, self._pre = self._pre, b""
        return pre

    def close(self) -> None:
        """Given up for good (``_give_back``): the engine closes its descriptor."""
        super().close()
        self.check_in()
        if self.native.conns.pop(self.handle, None) is not None:
            self.native.engine.close_session(self.handle)


class NativeLeasePool(LeasePool):
    def __init__(self, run_dir: Path, engine: Any, name: str = "") -> None:
        self.engine = engine
        self.conns: dict[int, EngineSession] = {}  # by engine handle
        self._ticket_ids: dict[Ticket, int] = {}
        self._epoch_value = 0
        super().__init__(run_dir, self._wrap, name)
        self.loop = asyncio.get_running_loop()

    # The control connection's generation: the engine gives sessions of an older one back
    # as broken (the acceptor reclaimed them).
    @property
    def _epoch(self) -> int:
        return self._epoch_value

    @_epoch.setter
    def _epoch(self, value: int) -> None:
        self._epoch_value = value
        self.engine.set_epoch(value)

    async def _wrap(self, lease: Lease) -> EngineSession:
        fd = lease.sock.detach()  # the engine owns the descriptor from here on
        try:
            handle = self.engine.add_session(
                lease.session,
                fd,
                lease.service,
                lease.registrant,
                lease.key[0],
                lease.key[1],
                lease.slice,
                lease.epoch,
            )
        except OSError:
            os.close(fd)
            raise
        conn = EngineSession(lease, self, handle, fd)
        self.conns[handle] = conn
        return conn

    def _conns_of(self, handles: list[int]) -> list[LeasedConn]:
        return [self.conns[h] for h in handles if h in self.conns]

    # -- the book, read from the engine ------------------------------------------------------
    @property
    def busy(self) -> set[int]:
        return {c.lease.session for c in self._conns_of(self.engine.busy_handles())}

    @property
    def idle(self) -> dict[WantKey, IdleRing[LeasedConn]]:
        out: dict[WantKey, IdleRing[LeasedConn]] = {}
        for key, handles in self.engine.idle_map().items():
            ring: IdleRing[LeasedConn] = IdleRing()
            for conn in self._conns_of(handles):
                ring.append(conn)
            out[key] = ring
        return out

    @property
    def recall(self) -> collections.Counter[tuple[str, str]]:
        return collections.Counter(self.engine.recalls())

    @property
    def waiting(self) -> int:
        return sum(self.waiting_counts().values())

    def waiting_counts(self) -> dict[WantKey, int]:
        counts: dict[WantKey, int] = self.engine.waiting_counts()
        return counts

    # -- what the Python path asks -------------------------------------------------------------
    def try_acquire(self, service: str, slice_name: str) -> LeasedConn | None:
        got = self.engine.take(service, slice_name)
        if got is None:
            return None
        conn = self.conns[got[0]]
        conn.check_out(got[1])
        return conn

    def release(self, conn: LeasedConn, state: ReleaseState) -> None:
        assert isinstance(conn, EngineSession)
        pre = conn.check_in()
        self.engine.release(conn.handle, state.value, pre)

    def _settle(self, conn: LeasedConn) -> None:
        assert isinstance(conn, EngineSession)
        asked, conn.lease.asked = conn.lease.asked, False
        self.engine.settle(conn.handle, asked)

    def lost(self, conn: LeasedConn, state: ReleaseState) -> None:
        self.release(conn, state)  # idle sessions are watched by the engine, not here

    def _waiting_in(self, slice_name: str) -> int:
        n: int = self.engine.waiting_in(slice_name)
        return n

    def _enqueue(self, key: WantKey, waiter: Waiter, now: float, timeout: float) -> Ticket:
        ticket = Ticket(waiter, key, now, now + timeout)
        self._ticket_ids[ticket] = self.engine.enqueue(key[0], key[1], ticket, now, timeout)
        return ticket

    def asking_counts(self) -> dict[WantKey, int]:
        counts: dict[WantKey, int] = self.engine.asking_counts()
        return counts

    # -- asking: the engine's asking requests and ASK units ----------------------------------
    def _ask(self, key: WantKey, waiter: Waiter, now: float, timeout: float) -> Ticket:
        ticket = Ticket(waiter, key, now, now + timeout, asking=True)
        ident, due = self.engine.ask(key[0], key[1], ticket, now, timeout)
        self._ticket_ids[ticket] = ident
        if due:
            self._loop.call_soon(self._flush_asks)
        return ticket

    def _take_unsent(self) -> dict[WantKey, int]:
        return {(service, slice_name): n for service, slice_name, n in self.engine.take_unsent()}

    def _granted(self, key: WantKey, asked: bool) -> int:
        self.engine.granted(key[0], key[1], asked)
        return super()._granted(key, asked)

    def _ask_refused(self, key: WantKey, n: int) -> None:
        self.engine.ask_refused(key[0], key[1], n)

    def _adopted(self, grant: int) -> None:
        entry = self.book.adopting.get(grant)
        super()._adopted(grant)
        if entry is not None:
            self.engine.adopted(*entry[0])

    def _forget_asks(self) -> None:
        super()._forget_asks()
        self.engine.forget_asks()  # asking off until the next CONFIG

    def cpu_contended(self, contended: bool) -> None:
        self.engine.set_contended(contended)  # the engine switches its own policy

    def cancel(self, ticket: Ticket) -> None:
        ident = self._ticket_ids.pop(ticket, None)
        if ticket.active and ident is not None:
            ticket.active = False
            if self.engine.cancel(ticket.key[0], ticket.key[1], ident):
                self._mark_want()

    # -- what the engine reports (``nativeproxy.EngineHooks``) -------------------------------
    def gave_back(self, handle: int, state: str) -> None:
        """The engine dropped a session (broken, retired, recalled, stale): RELEASE it."""
        conn = self.conns.get(handle)
        if conn is not None:
            self._give_back(conn, ReleaseState(state))

    def handed(self, handle: int, ticket: Ticket, pre: bytes) -> None:
        """A freed session goes to a Python ticket, delivered at the end of this turn."""
        ticket.active = False
        self._ticket_ids.pop(ticket, None)
        conn = self.conns[handle]
        conn.check_out(pre)
        if not self._handoffs:
            self._loop.call_soon(self._deliver)
        self._handoffs.append((ticket, conn))

    def refused(self, ticket: Ticket, reason: str) -> None:
        ticket.active = False
        self._ticket_ids.pop(ticket, None)
        ticket.waiter.lease_refused(Rejection(reason), self.policy.limits.retry_after)

    # -- the shell's book operations --------------------------------------------------------------
    def _flush_want(self) -> None:
        super()._flush_want()
        self.engine.want_flushed(list(self._reported))

    def _forget_leases(self) -> list[LeasedConn]:
        out = self._conns_of(self.engine.orphans())
        for conn in out:
            self.held.pop(conn.lease.session, None)
        return out

    def _recall_idle(self, service: str, slice_name: str, n: int) -> list[LeasedConn]:
        return self._conns_of(self.engine.recall_idle(service, slice_name, n))

    def _idle_now(self, service: str, slice_name: str, n: int) -> list[LeasedConn]:
        return self._conns_of(self.engine.idle_now(service, slice_name, n))

    def _count_returned(self, lease: Lease) -> None:
        self.engine.returned(lease.service, lease.slice)

    def _idle_since_before(self, cutoff: float) -> list[LeasedConn]:
        return self._conns_of(self.engine.idle_since_before(cutoff))

    def _apply_config(self, msg: ConfigMsg) -> None:
        super()._apply_config(msg)
        configure_engine(self.engine, self.policy, self._queues)
        # A request with no idle session and no room to wait asks the acceptor for a
        # session now (revision 3), as ``LeasePool.wait`` does (``_may_ask``).
        self.engine.set_asking(self._may_ask())

    def counters(self) -> dict[str, float]:
        out = super().counters()
        for name, (_status, _latency, wait, rejected) in self.engine.slice_figures().items():
            counts, total = wait
            for i, c in enumerate(counts):
                if c:
                    key = f"wait_bucket|{name}|{i}"
                    out[key] = out.get(key, 0) + c
            if any(counts):
                key = f"wait_sum_us|{name}"
                out[key] = out.get(key, 0) + int(total * 1e6)
            for reason, c in zip(Rejection, rejected, strict=True):
                if c:
                    key = f"rejected|{name}|{reason}"
                    out[key] = out.get(key, 0) + c
        return out

    async def close(self, deadline: float) -> None:
        self.closing = True
        self.engine.close_queues()  # native waiters get 503, tickets lease_refused
        await super().close(deadline)


def configure_engine(engine: Any, policy: Policy, queues: dict[str, tuple[Slice, int]]) -> bool:
    """Hand the policy's routes, slice rules and queue limits to the engine; False when a
    rule needs the Python path (the engine then hands every request to it)."""
    routes = [
        (
            None if r.host is None else _config_host(r.host),
            r.path_prefix.encode("utf-8"),
            r.service,
        )
        for r in policy.routes
    ]
    slices = []
    for spec in policy.slices:
        if spec.match is None:
            continue
        rules = []
        for m in spec.rules():
            headers = [(name.encode("ascii"), rx) for name, rx in m.headers.items()]
            if m.user_agent is not None:
                headers.append((b"user-agent", m.user_agent))
            rules.append((list(m.cidrs), headers, [p.encode("utf-8") for p in m.path_prefixes]))
        slices.append((spec.name, rules))
    limits = [(name, spec.queue.timeout, share) for name, (spec, share) in queues.items()]
    ok: bool = engine.configure(
        routes,
        policy.default_service or "",
        slices,
        policy.default_slice,
        limits,
        policy.limits.retry_after,
    )
    return ok
