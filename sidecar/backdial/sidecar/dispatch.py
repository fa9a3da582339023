"""Serving a client connection's requests strictly one at a time, in order.

``_next`` runs after every read and every finished response: it takes the
next parsed request off the pipeline queue (or starts streaming a body too
big to buffer), and ``_dispatch`` builds its upstream head (``request.py``)
and asks the worker's lease pool for a session.  ``pool.try_acquire`` returns
an idle sticky lease at once; otherwise ``pool.wait`` queues the request (a
callback, not a task) and the connection, as the pool's ``Waiter``, is told
once: ``lease_ready`` (then ``relay.ResponseRelay._send`` writes the request)
or ``lease_refused`` (a 503 with ``Retry-After``).  Error answers
(``_respond_error``) keep the connection open when the request allows it.
"""

from __future__ import annotations

from typing import cast

from backdial import http1
from backdial.control import Rejection
from backdial.http1 import canned
from backdial.sidecar.clientbase import ClientBase
from backdial.sidecar.connstate import (
    C_CLOSE,
    C_KEEP,
    C_KEEP_10,
    P_ACQUIRE,
    P_BODY,
    P_PIPELINE,
    R_BROKEN,
    R_IDLE,
    T_IDLE,
    T_NONE,
    T_REQUEST,
)
from backdial.sidecar.lease import LeasedConn
from backdial.sidecar.leasepool import Draining, QueueFull
from backdial.sidecar.request import Request
from backdial.sidecar.sessionconn import SessionConn


class Dispatcher(ClientBase):
    """The serving side of ``proxy.ClientProtocol``: pipeline queue, lease, error answers."""

    def _next(self) -> None:
        """Start the next parsed request if nothing is being served."""
        out = self.out
        if self._active is not None or self._closed or out.spill is not None or out.held:
            return  # (resume_writing calls back once a parked response is sent)
        if self._queue:
            if out.paused:
                return  # resume_writing calls back: no lease for a client that is not reading
            first = self._queue.popleft()
            if len(self._queue) < self.settings.max_pipeline:
                self._resume(P_PIPELINE)
            self._dispatch(first)
            return
        if self._eof:
            self._close()  # a request cut by the client's FIN can never complete
            return
        r = self._r
        if r is not None:
            if not r.in_head:
                if r.expect_continue and not r.continue_sent:
                    self._send_continue(r)
                if r.body and not r.streaming:  # spooling off: a body over the memory limit
                    self._resume(P_BODY)
                    self._start_streaming(r)
                    return
            if self._kind != T_REQUEST:  # counted from the request's start, not per read
                self._set_deadline(T_REQUEST, self.settings.request_timeout)
        elif self._dead or self.state.draining:
            self._close()
        else:
            self._set_deadline(T_IDLE, self.settings.client_idle_timeout)

    def _send_continue(self, r: Request) -> None:
        r.continue_sent = True
        self._write(http1.CONTINUE_100)

    def _start_streaming(self, r: Request) -> None:
        r.streaming = True
        self.stats.requests_streamed += 1
        self._pause(P_ACQUIRE)  # the rest of the body waits for the session
        self._dispatch(r)

    def _dispatch(self, r: Request) -> None:
        self._active = r
        self.stats.requests_active += 1
        self._resp_started = self._streamed = False
        if r.error is not None:
            self._write(r.error)
            self._finish(r, int(r.error[9:12]))
            self._close()
            return
        r.wire = r.build_head(self._fwd, self._xff, self._ip, self._trusted)
        if not self._trusted and r.claims:
            self.stats.untrusted_forwarding += 1
        if r.body and not r.streaming:  # spooling off: a big body that completed in line
            r.wire = b"".join([r.wire, *r.body])
            r.body = []
        spool = r.spool
        if spool is not None:
            # What is in memory goes with the head in one write; a spilled rest is fed
            # from its file once the session is ours (_feed), so it is never all in memory.
            r.wire = b"".join([r.wire, *spool.take_memory()])
            r.spooled = spool.spilled  # the file part is read once: never retried
            if not spool.spilled:
                spool.close()
                r.spool = None
        self._acquire(r)

    def _acquire(self, r: Request) -> None:
        pool = self.pool
        conn = pool.try_acquire(r.service, r.slice)
        if conn is not None:
            # The worker's pool holds SessionConns (main.py builds it with wrap_lease).
            self._send(r, cast(SessionConn, conn))
            return
        self._kind, self.deadline = T_NONE, 0.0  # the slice's queue timeout bounds the wait
        try:
            self._ticket = pool.wait(r.service, r.slice, self)
        except (QueueFull, Draining) as exc:
            self._unavailable(r, exc.reason, exc.retry_after)

    # -- Waiter: called by the pool once for a request that had to wait ---------------------------
    def lease_ready(self, conn: LeasedConn) -> None:
        self._ticket = None
        r = self._active
        if r is None or self._closed or self._conn is not None:
            self.pool.release(conn, R_IDLE)  # never written to: still clean
            return
        self._send(r, cast(SessionConn, conn))

    def lease_refused(self, reason: Rejection, retry_after: int) -> None:
        self._ticket = None
        r = self._active
        if r is not None:
            self._unavailable(r, reason, retry_after)

    def _unavailable(self, r: Request, reason: Rejection, retry_after: int) -> None:
        if self._active is not r or self._closed:
            return
        self.stats.unavailable[reason] += 1
        self._respond_error(r, 503, retry_after)

    def _respond_error(self, r: Request, status: int, retry_after: int = -1) -> None:
        if (
            (r.streaming and not r.complete)
            or not r.keep_alive
            or self._dead
            or (self.state.draining and not self._queue)
        ):
            mode = C_CLOSE
        else:
            mode = C_KEEP_10 if r.v10 else C_KEEP
        self._write(canned(status, mode, r.head_only, retry_after))
        self._finish(r, status)
        if mode == C_CLOSE:
            self._close()
        else:
            self._next()

    def _abandon_upstream(self) -> None:
        conn = self._detach()
        if conn is not None:
            conn.abort()
            self.pool.release(conn, R_BROKEN)
        self._leave_queue()

    def _leave_queue(self) -> None:
        if self._ticket is not None:
            self.pool.cancel(self._ticket)
            self._ticket = None
