"""Response bytes on their way to one client, within the worker's memory and disk bounds.

A response leaves its session at session speed (invariant 5), so what the
client has not read yet waits in the sidecar.  ``ClientOutput`` decides where:

1. **the client transport's buffer** (memory), up to ``response_buffer`` per
   connection *and* within the worker's response memory budget
   (``ProxySettings.response_memory_total``, ``ProxyStats.response_memory``):
   every connection books the bytes its transport holds.  A connection may
   always hold ``MEMORY_FLOOR`` bytes whatever the budget says, so a client
   that reads is never starved by others that do not;
2. beyond either limit, **a spill file** (``spool.SpoolFile``, bounded per
   connection by ``response_spill_max`` and per worker by the disk budget),
   while the session keeps being read;
3. beyond those (spilling off, the disk budget spent, a tunnel), **held in
   memory** behind the file, booked in the budget too, with the session
   paused: back-pressure, at most one session read more.

A response already begun is never failed for lack of room: it waits.  Parked
bytes move to the transport as the client reads (``resume_writing``) and as the
budget frees up: while bytes wait for memory the transport's high-water mark is
0, so every drain calls ``resume_writing``.  Otherwise a transport's buffer
shrinks silently, so the listener's sweep re-books connections with bytes in
memory and wakes any still waiting for room every ``tick`` (``listener.py``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final, Protocol

from backdial.sidecar.spool import SpoolFile

if TYPE_CHECKING:
    from backdial.sidecar.listener import ListenerState, SweptConnection

MEMORY_FLOOR: Final = 16 * 1024  # bytes a connection may keep in memory whatever the budget
SPILL_CHUNK: Final = 256 * 1024  # bytes moved from a spill file to the transport per write


class Session(Protocol):
    """What the output needs of the session feeding it: back-pressure."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class ClientOutput:
    """One client connection's response bytes: transport, spill file, held bytes."""

    __slots__ = (
        "booked",
        "held",
        "held_bytes",
        "owner",
        "paused",
        "sent",
        "session_held",
        "spill",
        "spill_off",
        "state",
        "tight",
        "transport",
    )

    def __init__(self, state: ListenerState, owner: SweptConnection) -> None:
        self.state = state
        self.owner = owner  # the client connection, as the listener knows it
        self.transport: asyncio.Transport | None = None
        self.paused = False  # the transport is over its high-water mark
        self.sent = 0  # times the client took bytes (for the send deadline)
        self.booked = 0  # bytes booked in the worker's response memory budget
        # Parked, in order: a spill file, then what did not fit in it (held in memory).
        self.spill: SpoolFile | None = None
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.session_held = False  # we paused the session: the parked bytes are at a limit
        self.spill_off = False  # a tunnel: never spilled, back-pressure only
        self.tight = False  # the transport pauses at any byte while bytes wait for memory

    @property
    def parked(self) -> bool:
        return self.spill is not None or bool(self.held)

    # -- writing ----------------------------------------------------------------------------------
    def write(self, data: bytes, session: Session | None) -> bool:
        """Send *data* after what is already on its way; True when it starts waiting
        (the worker's response memory is spent) rather than going to the transport."""
        transport = self.transport
        assert transport is not None
        if self.spill is not None or self.held:
            self.park(data, session)
            return False
        budget = self.state.stats.response_memory
        n = len(data)
        if budget.used + n > budget.limit and self.booked + n > MEMORY_FLOOR:
            return self._overflow(data, session)
        transport.write(data)  # may call pause_writing at once
        if self.booked or transport.get_write_buffer_size():
            self.account()
        return False

    def _overflow(self, data: bytes, session: Session | None) -> bool:
        """The budget is spent: what fits goes out, the rest waits (spill file or held)."""
        transport = self.transport
        assert transport is not None
        self.account()  # the booking may be stale: the transport drains silently
        room = self.room()
        if room >= len(data):
            transport.write(data)
            self.account()
            return False
        self.state.stats.response_memory_full += 1
        if room > 0:
            transport.write(data[:room])
            data = data[room:]
            self.account()
        if session is not None:
            self.open_spill()
        self.park(data, session)
        if not self.tight:
            # Until the parked bytes are out, the transport pauses as soon as it holds
            # anything, so the client taking it calls resume_writing at once (a transport
            # below its high-water mark drains without a word).
            self.tight = True
            transport.set_write_buffer_limits(high=0)  # may call pause_writing
        if not self.paused:
            self.send(session)  # the socket took it all: a fast client, keep going
        if not self.parked:
            return False
        self.state.memory_waiters.add(self.owner)  # the listener's tick, as a last resort
        return True

    def open_spill(self) -> bool:
        """Start parking in a file (spilling on, a writable directory); True if one is open."""
        if self.spill is None:
            settings = self.state.settings
            if settings.response_spill_max <= 0 or self.spill_off:
                return False
            try:
                self.spill = SpoolFile(
                    self.state.disk_budget, settings.response_spill_max, settings.spill_dir
                )
            except OSError:  # no writable spill directory: as if spilling were off
                return False
            self.state.stats.responses_spilled += 1
        return True

    def park(self, data: bytes, session: Session | None) -> None:
        """Queue *data* behind the parked bytes; pause the session once they are at a limit."""
        spill = self.spill
        if not self.held and spill is not None:
            n = spill.write_some(data)  # the file fills up to its limit
            data = data[n:] if n else data
        if data:
            self.held.append(data)  # over a limit: memory, one session read at most
            self.held_bytes += len(data)
            self.account()
        if (
            not self.session_held
            and session is not None
            and (self.held or (spill is not None and not spill.room))
        ):
            self.session_held = True  # back-pressure the session, as without spilling
            session.pause_reading()

    def send(self, session: Session | None) -> bool:
        """Move parked bytes to the client while it takes them and memory allows.

        True once every parked byte is in the transport (the spill file is gone).
        """
        transport = self.transport
        assert transport is not None
        moved = False
        while not self.paused and not transport.is_closing():
            spill = self.spill
            if spill is not None and spill.pending:
                room = min(self.room(), SPILL_CHUNK)
                if room <= 0:
                    self.state.memory_waiters.add(self.owner)  # the listener's tick wakes us
                    break
                data = spill.read(room)
            elif self.held:
                data = self._unhold(SPILL_CHUNK)  # in memory already: moving it costs nothing
            else:
                break
            transport.write(data)  # may call pause_writing at once
            moved = True
            if spill is not None:
                while self.held:  # room in the file again: what waited in memory goes there
                    head = self.held[0]
                    n = spill.write_some(head)
                    if not n:
                        break
                    self.held_bytes -= n
                    if n < len(head):
                        self.held[0] = head[n:]
                        break
                    del self.held[0]
            self.account()
        if moved:
            self.sent += 1
        spill = self.spill
        if (
            self.session_held
            and session is not None
            and not self.held
            and (spill.room if spill is not None else not self.paused)
        ):
            self.session_held = False  # let the session run again
            session.resume_reading()
        if self.held or (spill is not None and spill.pending):
            return False
        if spill is not None:
            spill.close()
            self.spill = None
        self.session_held = False
        self.state.memory_waiters.discard(self.owner)
        if self.tight:
            self.tight = False
            transport.set_write_buffer_limits(high=self.state.settings.response_buffer)
        return not self.paused

    def _unhold(self, n: int) -> bytes:
        data = self.held[0]
        if len(data) > n:
            self.held[0] = data[n:]
            data = data[:n]
        else:
            del self.held[0]
        self.held_bytes -= len(data)
        return data

    # -- the memory budget ------------------------------------------------------------------------
    def room(self) -> int:
        """Bytes that may go from outside memory (the session, a spill file) to the transport
        now: within the budget, or up to the floor in the transport whatever the budget."""
        budget = self.state.stats.response_memory
        return max(MEMORY_FLOOR - (self.booked - self.held_bytes), budget.limit - budget.used)

    def account(self) -> None:
        """Book what this connection holds in memory now (transport buffer and held bytes)."""
        transport = self.transport
        n = self.held_bytes
        if transport is not None:  # a closing transport still holds what it flushes
            n += transport.get_write_buffer_size()
        was = self.booked
        if n != was:
            self.booked = n
            self.state.stats.response_memory.used += n - was
            if not n:
                self.state.booked.discard(self.owner)
            elif not was:
                self.state.booked.add(self.owner)

    def close(self) -> None:
        """The connection is gone: drop what is parked, give every byte back."""
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        self.held = []
        self.held_bytes = 0
        self.state.stats.response_memory.used -= self.booked
        self.booked = 0
