"""One client connection's state and the operations every part of its protocol uses.

``proxy.ClientProtocol`` is one class assembled from parts, each a module of
one concept:

* ``clientread.RequestReader``: reading the client (PROXY header, framing,
  the httptools callbacks, the request body into memory or its spool);
* ``dispatch.Dispatcher``: serving parsed requests one at a time (the
  pipeline queue, the lease, the pool's ``Waiter``, the canned error answers);
* ``relay.ResponseRelay``: the exchange with the session (the request written
  onto it, its response relayed to the client as the ``ResponseSink``, tunnels);
* ``proxy.py``: the connection's lifecycle (asyncio's callbacks) and timeouts.

They share this base: the connection's attributes, all set here once, so every
part reads the same instance dict and no request allocates a helper object;
and the few operations all of them need (deadline, read pausing, writing to
the client, counting a finished request, closing).  Where one part calls into
another, the base declares that method for the type checker only: at run time
``ClientProtocol``'s own is found through its method resolution order, which
CPython caches per type, so a call costs what it did in a single class.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

import httptools

from backdial.http1 import BodyMode
from backdial.sidecar.chunkscan import ChunkScan
from backdial.sidecar.classify import Classifier, IPAddress
from backdial.sidecar.clientout import MEMORY_FLOOR as FLOOR
from backdial.sidecar.clientout import ClientOutput
from backdial.sidecar.connstate import M_NONE, P_UPSTREAM, T_NONE, T_SEND, Deadline, PauseReason
from backdial.sidecar.lease import Ticket
from backdial.sidecar.listener import ListenerState
from backdial.sidecar.request import Request
from backdial.sidecar.sessionconn import SessionConn


class ClientBase(asyncio.Protocol):
    """A client connection's state; see the module docstring for the parts that use it."""

    def __init__(self, state: ListenerState) -> None:
        self.state = state
        self.settings = state.settings
        self.stats = state.stats
        self.pool = state.pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.deadline = 0.0  # swept by ListenerState; 0 = none
        self._kind: Deadline = T_NONE
        self._r: Request | None = None  # being parsed
        self._last: Request | None = None  # last fully parsed
        self._queue: collections.deque[Request] = collections.deque()
        self._active: Request | None = None  # being served (at most one)
        self._conn: SessionConn | None = None  # the lease of the active request
        self._ticket: Ticket | None = None  # our place in the pool's queue while waiting
        self._pause_bits = 0  # PauseReason bits
        self._closed = False
        self._dead = False  # no more parsing: after an error or an upgrade request
        self._eof = False  # the client half-closed
        self._tunnel = False
        self._mode: BodyMode = M_NONE
        self._status = 0
        self._resp_keep = True
        self._resp_started = False  # response head written for the active request
        self._streamed = False
        self._progress = 0
        self._seen = 0
        self._rate_mark = 0  # body bytes at the last minimum-rate check
        self._rate_since = 0.0  # ... and its time
        self._upstream_full = False  # the session's write buffer is over its high-water mark
        self._head_bytes = 0
        self._ip = ""
        self._ipobj: IPAddress | None = None
        self._ip_parsed = False
        self._trusted = False  # the address in _ip is a trusted proxy (realip.py)
        self._peer_trusted = False  # ... and so was the socket peer
        self._fwd = b""
        self._xff = b""
        self._proxy_buf: bytearray | None = None
        self._tail = b""  # the last bytes of a read that ended inside a head
        self._scan: ChunkScan | None = None  # the framing of a chunked body being received
        self._cls: Classifier | None = None
        self._out: list[bytes] = []  # response bytes of the current session read
        # What the client has not taken yet: transport, spill file, held (clientout.py).
        self.out = ClientOutput(state, self)
        self._memory = state.stats.response_memory  # the worker's, shared with ClientOutput
        self._close_after = False  # close once the parked bytes are sent
        self._sent_seen = 0  # self.out.sent at the last send-deadline check

    if TYPE_CHECKING:
        # The other parts' entry points (dispatch.py, relay.py, and proxy.py's for the
        # listener's SweptConnection): type checking only, see the module docstring.
        def _next(self) -> None: ...

        def _send_continue(self, r: Request) -> None: ...

        def _start_streaming(self, r: Request) -> None: ...

        def _acquire(self, r: Request) -> None: ...

        def _respond_error(self, r: Request, status: int, retry_after: int = -1) -> None: ...

        def _abandon_upstream(self) -> None: ...

        def _send(self, r: Request, conn: SessionConn) -> None: ...

        def on_deadline(self, now: float) -> None: ...

        def drain(self) -> None: ...

        def memory_freed(self) -> None: ...

    # -- state shared by the parts ----------------------------------------------------------------
    def _set_deadline(self, kind: Deadline, seconds: float) -> None:
        self._kind = kind
        self.deadline = self.loop.time() + seconds if seconds > 0 else 0.0

    def _pause(self, bit: PauseReason) -> None:
        if not self._pause_bits and self.transport is not None and not self._closed:
            self.transport.pause_reading()
        self._pause_bits |= bit

    def _resume(self, bit: PauseReason) -> None:
        if self._pause_bits & bit:
            self._pause_bits &= ~bit
            if not self._pause_bits and self.transport is not None and not self._closed:
                self.transport.resume_reading()

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self._closed:
            return
        out = self.out
        budget = self._memory
        if (
            out.spill is None
            and not out.held
            and (budget.used + len(data) <= budget.limit or out.booked + len(data) <= FLOOR)
        ):
            # The common case, inlined (once per session read): nothing parked, room in the
            # worker's response memory.  clientout.ClientOutput.write is the whole rule.
            transport.write(data)
            if out.booked or transport.get_write_buffer_size():
                out.account()
        elif out.write(data, self._conn):
            # Out of response memory: the client must take what it has before more goes.
            self._set_deadline(T_SEND, self.settings.send_timeout)

    def _finish(self, r: Request, status: int) -> None:
        counters = self.stats.slice(r.slice)
        counters.status[status if 100 <= status < 600 else 0] += 1
        if r.t0:
            counters.latency.observe(self.loop.time() - r.t0)
        self.stats.requests_active -= 1
        self._unbuffer(r)
        r.wire = b""
        if self._active is r:
            self._active = None

    def _unbuffer(self, r: Request) -> None:
        """Give back what *r*'s body holds of the worker's budgets, exactly once."""
        self.stats.request_memory.give(r.buffered)
        r.buffered = 0
        if r.spool is not None:
            r.spool.close()
            r.spool = None

    def _detach(self) -> SessionConn | None:
        """Take the session off this connection; what it paused of the client resumes."""
        conn, self._conn = self._conn, None
        # A full session may have paused reading the client (upstream_writable); once it is
        # gone nothing else would resume it, and the next request would hang.
        self._upstream_full = False
        self._resume(P_UPSTREAM)
        return conn

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        if self.out.parked:
            self._close_after = True  # the parked response goes out first
            return
        if not self._closed:
            self._closed = True
            self.deadline = 0.0
            if self.transport is not None:
                self.transport.close()  # flushes what is buffered first


def unsent(r: Request) -> bool:
    """Part of *r*'s body is not on the session yet (streamed or fed from its spool)."""
    return (r.streaming and not r.complete) or r.spool is not None
