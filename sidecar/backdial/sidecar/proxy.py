"""The client side: an HTTP/1.1 proxy protocol on uvloop + httptools that leases sessions.

One ``ClientProtocol`` per client connection.  Requests are parsed ahead
(pipelining) but served strictly one at a time, in order.  For each request:

1. the whole request is received *before* a session is leased, so a slow
   client never holds one: the body in memory up to ``max_request_body``, the
   rest in a temp file (``spool.py``), all within per-worker budgets, and
   arriving at least at ``body_min_rate``;
2. route and slice are classified; ``pool.try_acquire`` returns an idle sticky
   lease at once, else ``pool.wait`` queues the request (a callback, not a task)
   in the slice's bounded FIFO, which ends in a lease or a 503 + Retry-After;
3. the rewritten head and the body are written to the session in one write;
4. the response is parsed (``sessionconn.py``) and written to the client as it
   arrives; what the client has not read waits in its transport (up to
   ``response_buffer``, within the worker's response memory budget), then in a
   spill file (``clientout.py``), so the session is released the moment the
   response is complete.  Only where nothing can take more does the proxy
   pause the session (back-pressure; ``ProxyStats.responses_streamed``).

With spooling off (``request_spool_total = 0``), bodies above
``max_request_body`` (up to ``max_request_body_stream``) are streamed: the
lease is then taken when the buffer limit is crossed and held while the rest
of the body arrives (``ProxyStats.requests_streamed``).

No logging, pydantic or per-request dict work happens on this path; the only
per-request allocations are the request record, its header lines and the
joined head.  Timeouts use one deadline per connection swept by a single
timer (``listener.ListenerState``), not a timer handle per request.

Where each step lives: ``ClientProtocol`` is assembled from one module per
part, all over the connection state of ``clientbase.py``: step 1 in
``clientread.py`` (reading and parsing), step 2 in ``dispatch.py`` (serving
one request at a time: pipeline queue, lease, error answers), steps 3-4 in
``relay.py`` (the exchange with the session).  This module keeps the
connection's lifecycle: asyncio's callbacks, graceful drain, and the timeouts
the listener's sweep fires.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from backdial.http1 import canned
from backdial.sidecar.clientbase import unsent
from backdial.sidecar.clientread import RequestReader
from backdial.sidecar.config import ProxySettings
from backdial.sidecar.connstate import (
    C_CLOSE,
    R_BROKEN,
    T_IDLE,
    T_REQUEST,
    T_SEND,
    T_TUNNEL,
    T_UPSTREAM,
)
from backdial.sidecar.dispatch import Dispatcher
from backdial.sidecar.lease import LeaseSource
from backdial.sidecar.listener import ListenerState
from backdial.sidecar.relay import ResponseRelay
from backdial.sidecar.sessionconn import DrainSink
from backdial.sidecar.stats import ProxyStats


def make_protocol_factory(
    pool: LeaseSource, settings: ProxySettings, stats: ProxyStats
) -> tuple[Callable[[], ClientProtocol], ListenerState]:
    """``(factory, state)``: ``loop.create_server(factory, sock=listener)``; ``state.shutdown``."""
    state = ListenerState(pool, settings, stats)

    def factory() -> ClientProtocol:
        return ClientProtocol(state)

    return factory, state


# -- the client connection ------------------------------------------------------------------------
class ClientProtocol(RequestReader, Dispatcher, ResponseRelay):
    """One client connection: parse, classify, lease, relay, release."""

    # -- connection lifecycle ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.out.transport = transport
        if not self.state.fd_guard.admit():
            # Near the descriptor limit: a clear answer now, rather than running out and
            # having libuv accept and drop connections silently (liveness.py).
            self._closed = True
            transport.write(canned(503, C_CLOSE, False, 1))
            transport.close()
            return
        transport.set_write_buffer_limits(high=self.settings.response_buffer)
        peer = transport.get_extra_info("peername")
        self._set_client(peer[0] if isinstance(peer, tuple) else "")
        self._peer_trusted = self._trusted
        self.state.add(self)
        if self.settings.proxy_protocol:
            self._proxy_buf = bytearray()
            self._set_deadline(T_REQUEST, self.settings.request_timeout)
        else:
            self._set_deadline(T_IDLE, self.settings.client_idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.deadline = 0.0
        self.state.remove(self)
        self.out.close()
        self._leave_queue()
        conn, self._conn = self._conn, None
        if conn is not None:
            r = self._active
            if self._tunnel or r is None or unsent(r):
                conn.abort()  # a tunnel or a half-sent request: the session is unusable
                self.pool.release(conn, R_BROKEN)
            else:
                # The request is whole on the session: let the response finish into the void
                # and give the session back clean, rather than make the service re-dial.
                self.stats.client_aborts += 1
                conn.set_sink(DrainSink(self.pool, conn, self.loop, self.settings.upstream_timeout))
        if self._active is not None:
            self.stats.requests_active -= 1
            self._unbuffer(self._active)
            self._active = None
        for r in self._queue:
            self._unbuffer(r)
        self._queue.clear()
        if self._r is not None:  # may be the active request too (a streamed body): once only
            self._unbuffer(self._r)
            self._r = None

    def eof_received(self) -> bool:
        r = self._active
        if self._tunnel or (r is None and not self._queue):
            return False  # close now
        if r is not None and r.streaming and not r.complete:
            return False  # half a body that can never be finished
        self._eof = True  # answer what was pipelined before the FIN, then close
        return True

    def pause_writing(self) -> None:
        out = self.out
        out.paused = True
        conn = self._conn
        # Park the rest of the response on disk and keep draining the session at its own
        # speed (the lease is released when the response is complete); else back-pressure.
        if conn is not None and out.spill is None and not out.open_spill():
            conn.pause_reading()
            if not self._streamed and not self._tunnel:
                self._streamed = True
                self.stats.responses_streamed += 1
        self._set_deadline(T_SEND, self.settings.send_timeout)

    def resume_writing(self) -> None:
        out = self.out
        out.paused = False
        out.sent += 1
        out.account()  # the transport drained to its low-water mark
        self._output_resumed()

    def memory_freed(self) -> None:
        """The listener's tick: the worker's response memory may have room for parked bytes."""
        if self.out.parked and not self.out.paused and not self._closed:
            self._output_resumed()

    def _output_resumed(self) -> None:
        if self.out.parked and not self.out.send(self._conn):
            return  # paused again, or out of memory, with bytes still parked
        conn = self._conn
        if conn is not None:
            conn.resume_reading()
            if self._tunnel:
                self._set_deadline(T_TUNNEL, self.settings.client_idle_timeout)
            else:
                self._set_deadline(T_UPSTREAM, self.settings.upstream_timeout)
        elif self._close_after:
            self._close()
        elif self._active is None:
            self._next()

    def drain(self) -> None:
        """Graceful stop: an idle connection gets ``drain_idle_grace`` to send one more request.

        Closing an idle keep-alive connection at once races with a request the
        client may be sending right now, which it would see fail.  During the
        grace a request is still served (with ``Connection: close``); a busy
        connection closes after its queued responses.
        """
        if self._active is None and not self._queue and self._r is None:
            self._set_deadline(T_IDLE, self.settings.drain_idle_grace)

    # -- timeouts (called by the server's sweep) --------------------------------------------------
    def on_deadline(self, now: float) -> None:
        kind = self._kind
        if (
            kind == T_SEND
            and self.out.sent != self._sent_seen
            and (self._conn is None or self._progress != self._seen)
        ):
            # The client is reading (and the session, if any, still delivering): only a
            # client that takes nothing for send_timeout is cut.
            self._sent_seen, self._seen = self.out.sent, self._progress
            self.deadline = now + self.settings.send_timeout
            return
        flowing = kind in (T_UPSTREAM, T_TUNNEL)
        if flowing and self._progress != self._seen:  # still flowing: only silence times out
            self._seen = self._progress
            if kind == T_UPSTREAM:
                self.deadline = now + self.settings.upstream_timeout
            else:
                self.deadline = now + self.settings.client_idle_timeout
            return
        if kind == T_REQUEST and self._body_keeps_up(now):
            return
        self.deadline = 0.0
        r = self._active
        if kind == T_UPSTREAM and r is not None:
            self.stats.upstream_timeouts += 1
            self._abandon_upstream()
            if self._resp_started:
                self._finish(r, self._status)
                self.abort()
            else:
                self._respond_error(r, 504)
        elif kind == T_REQUEST and r is None and self._proxy_buf is None:
            self._write(canned(408, C_CLOSE))  # nothing in flight: safe to answer in order
            self._dead = True
            self._close()
        elif kind == T_REQUEST and r is not None and r.streaming:
            self._abandon_upstream()
            if not self._resp_started:
                self._write(canned(408, C_CLOSE))
            self._finish(r, 408)
            self._close()
        elif kind == T_IDLE:
            self._close()
        else:  # stalled send, dead tunnel, or a PROXY header that never came
            if r is not None and self._conn is not None:
                self._abandon_upstream()
                self._finish(r, self._status or 408)
            self.abort()
