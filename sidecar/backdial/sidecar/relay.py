"""The exchange with a leased session: the request onto it, the response back to the client.

``_send`` writes the rewritten head with the body in one write (a spooled
body's file part follows in ``FEED_CHUNK`` steps as the session's buffer
drains, ``_feed``) and makes the connection the session's ``ResponseSink``.
The session connection (``sessionconn.py``) parses the response and calls
the ``resp_*`` methods here: the head is rewritten for this client
(``http1.body_mode``: length, chunked, close-delimited or a tunnel), what one
session read produced leaves in one write to the client (``resp_flush``), and
the session is released the moment the response is complete (``resp_done``),
however far behind the client is (``clientout.py`` parks the rest).  A session
that fails before any response byte gets an idempotent request retried on
another one (``resp_failed_on``); an accepted upgrade turns the connection
into a tunnel (``_open_tunnel``).
"""

from __future__ import annotations

from typing import Final

from backdial import http1
from backdial.control import ReleaseState
from backdial.http1 import body_mode
from backdial.sidecar.clientbase import ClientBase, unsent
from backdial.sidecar.connstate import (
    M_CHUNK,
    M_EOF,
    M_LENGTH,
    M_TUNNEL,
    P_ACQUIRE,
    P_UPSTREAM,
    R_BROKEN,
    T_REQUEST,
    T_TUNNEL,
    T_UPSTREAM,
)
from backdial.sidecar.request import Request
from backdial.sidecar.sessionconn import SessionConn

FEED_CHUNK: Final = 256 * 1024  # spooled body bytes written to a session per step


class ResponseRelay(ClientBase):
    """The session side of ``proxy.ClientProtocol``: request out, response back."""

    def _send(self, r: Request, conn: SessionConn) -> None:
        data = r.wire
        if r.streaming:
            pieces = [http1.chunk(b) for b in r.body] if r.chunked else r.body
            if r.complete and r.chunked:
                pieces.append(http1.LAST_CHUNK)
            data = b"".join([data, *pieces])
            r.body = []
        self._conn = conn
        if not conn.start(data, self, r.head_only, r.upgrade):
            self._conn = None
            self.pool.release(conn, R_BROKEN)
            self.resp_failed_on(r, False)
            return
        self._seen = self._progress
        if r.streaming and not r.complete:
            self._set_deadline(T_REQUEST, self.settings.request_timeout)
            self._resume(P_ACQUIRE)
        else:
            self._set_deadline(T_UPSTREAM, self.settings.upstream_timeout)
            if r.spool is not None:
                # Not reset here: start() may have filled the session already (the memory
                # part of the body), and then no further pause_writing would tell us.
                self._feed()

    def _feed(self) -> None:
        """Write a spooled body's file part to the session while its buffer has room."""
        r, conn = self._active, self._conn
        while r is not None and conn is not None and r.spool is not None:
            if self._upstream_full:
                return  # upstream_writable(True) calls back
            data = r.spool.read(FEED_CHUNK)
            if not data:
                r.spool.close()
                r.spool = None
                return
            self._progress += 1  # the service is taking it: no upstream timeout meanwhile
            conn.write(data)

    # -- ResponseSink: called by the session's SessionConn ----------------------------------------
    def resp_head(
        self, status: int, reason: bytes, lines: list[bytes], length: int, chunked: bool
    ) -> None:
        r = self._active
        assert r is not None
        self._resp_started = True
        self._status = status
        self._progress += 1
        # An HTTP/1.0 client cannot take chunked: without a length the body is close-delimited.
        self._mode = mode = body_mode(status, r.head_only, length, r.v10)
        keep = (
            r.keep_alive
            and mode != M_EOF
            and not (r.upgrade and status != 101)
            and not (r.streaming and not r.complete)
            and not (self.state.draining and not self._queue)
        )
        self._resp_keep = keep
        if mode == M_TUNNEL:
            tail = b"\r\n"  # Connection: Upgrade and Upgrade are in lines
        elif not keep:
            tail = b"Connection: close\r\n\r\n"
        elif r.v10:
            tail = b"Connection: keep-alive\r\n\r\n"
        else:
            tail = b"\r\n"
        if mode == M_CHUNK:
            tail = b"Transfer-Encoding: chunked\r\n" + tail
        # Buffered until the end of this session read: head and body leave in one send().
        self._out.append(b"".join((http1.cached_status_line(status, reason), *lines, tail)))
        if mode == M_TUNNEL:
            self._open_tunnel(r)

    def resp_interim(self, status: int, reason: bytes, lines: list[bytes]) -> None:
        # 1xx (e.g. 103 Early Hints) go to HTTP/1.1 clients; 100 is ours to send, not the service's.
        r = self._active
        if r is not None and not r.v10 and status != 100:
            self._out.append(b"".join((http1.cached_status_line(status, reason), *lines, b"\r\n")))

    def resp_body(self, data: bytes) -> None:
        self._progress += 1
        mode = self._mode
        if mode in (M_LENGTH, M_EOF):
            self._out.append(data)
        elif mode == M_CHUNK:
            if data:
                self._out.append(http1.chunk(data))
        elif mode == M_TUNNEL:
            self._write(data)

    def resp_flush(self) -> None:
        """End of one session read: write what it produced in one call."""
        out = self._out
        if out:
            self._write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def resp_done(self, state: ReleaseState) -> None:
        r = self._active
        conn = self._detach()
        assert r is not None and conn is not None
        if unsent(r):
            state = R_BROKEN  # the service answered before the whole body: the session is dirty
        self.pool.release(conn, state)
        if self._mode == M_CHUNK:
            self._out.append(http1.LAST_CHUNK)
        self.resp_flush()
        self._finish(r, self._status)
        if self._tunnel or not self._resp_keep:
            self._close()
        else:
            self._next()

    def resp_failed(self, started: bool) -> None:
        r = self._active
        conn = self._detach()
        if conn is not None:
            self.pool.release(conn, R_BROKEN)
        if r is not None:
            self.resp_failed_on(r, started)

    def resp_failed_on(self, r: Request, started: bool) -> None:
        """The session failed; retry an idempotent request that got no response byte."""
        if self._resp_started:  # the client has part of a response: all we can do is cut it
            self._out.clear()
            self.stats.upstream_broken_mid_response += 1
            self._finish(r, self._status)
            self.abort()
            return
        self.stats.upstream_failed += 1
        if (
            not started
            and r.idempotent
            and not r.streaming
            and not r.spooled
            and r.retries < self.settings.max_retries
            and not self._closed
        ):
            r.retries += 1
            self.stats.retries += 1
            self._acquire(r)
            return
        self._respond_error(r, 502)

    def upstream_writable(self, writable: bool) -> None:
        # Streamed bodies and tunnels fill the session's buffer from the client: stop the
        # client.  A spooled body fills it from its file: feed on when there is room.
        self._upstream_full = not writable
        if writable:
            self._resume(P_UPSTREAM)
            r = self._active
            if r is not None and r.spool is not None:
                self._feed()
        else:
            self._pause(P_UPSTREAM)

    def _open_tunnel(self, r: Request) -> None:
        self.resp_flush()
        self._tunnel = True
        self.out.spill_off = True
        self.stats.tunnels += 1
        conn = self._conn
        if conn is not None and r.tunnel_pre:
            conn.write(r.tunnel_pre)
        r.tunnel_pre = b""
        self._dead = False
        self._pause_bits = 0  # PauseReason bits
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()
        self._set_deadline(T_TUNNEL, self.settings.client_idle_timeout)
