"""The session side: one leased session socket speaking HTTP/1.1, one request at a time.

``SessionConn`` is the ``LeasedConn`` the lease pool holds.  While idle it
keeps reading, because the service may retire the session (``RETIRE_LINE``) or
die at any time; it reports either to the pool with ``pool.lost`` so an idle
session is never handed to a request after it ended.  While busy it parses the
response with httptools and hands head, body and completion to a
``ResponseSink`` (the client connection), which writes them to the client and
releases the lease.

Races handled here:

* RETIRE just before our request was read: the service still answers (with
  ``Connection: close``), so an exact ``RETIRE_LINE`` before the status line is
  stripped and the session is released as ``retired`` after the response.
* RETIRE right after a response (possibly split over reads): the trailing bytes
  are recognised as a RETIRE prefix and kept until the line is complete.

Never ``shutdown()`` a session: after an idle release the acceptor owns a copy
of the descriptor and the service must not see end-of-file.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Final, cast

import httptools

from backdial.control import ReleaseState
from backdial.http1 import CONNECTION_BUILTIN, FIELDS, Field, connection_tokens, drop_named
from backdial.sidecar.lease import DiscardingSink, Lease, LeaseOwner, ResponseSink
from backdial.wire import RETIRE_LINE

MAX_RESPONSE_HEAD: Final = 64 * 1024
_RETIRE_LEN: Final = len(RETIRE_LINE)

# Bound once: enum attribute access costs ~0.1 us on 3.11 and these run per response.
IDLE: Final = ReleaseState.IDLE
BROKEN: Final = ReleaseState.BROKEN
RETIRED: Final = ReleaseState.RETIRED
_OTHER: Final = Field.OTHER
_CONTENT_LENGTH: Final = Field.CONTENT_LENGTH
_TRANSFER_ENCODING: Final = Field.TRANSFER_ENCODING
_CONNECTION: Final = Field.CONNECTION
_HOP: Final = Field.HOP
_UPGRADE: Final = Field.UPGRADE


class _Extra(Exception):
    """Bytes after the end of the response (the next message began)."""


class _Unexpected(Exception):
    """A response the request did not allow for."""


class _HeadTooLarge(Exception):
    """The response head exceeds ``max_head``: answered 502, the session is discarded."""


class _HeadDone(Exception):
    """Stop parsing after the head of a response to HEAD (it has no body)."""


class SessionConn(asyncio.Protocol):
    """A leased session socket as an asyncio protocol: the pool's ``LeasedConn``."""

    def __init__(self, lease: Lease, pool: LeaseOwner | None, max_head: int = MAX_RESPONSE_HEAD):
        self.lease = lease
        self.pool = pool
        self.max_head = max_head
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._sink: ResponseSink | None = None
        self._reported = False  # the pool knows it is gone (lost() or a non-idle release)
        self._paused = False
        self._pre = b""  # partial RETIRE line
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        self._upgrade = False
        self._tunnel = False
        self._started = False  # a response byte arrived
        self._retired = False
        self._in_head = False
        self._head_bytes = 0  # partial head bytes across reads (httptools buffers them)
        self._field_bytes = 0  # complete status line and fields of this response's heads
        self._complete = False
        self._interim = False
        self._close = False
        self._length = -1
        self._chunked = False
        self._lines: list[bytes] = []
        self._conn_values: list[bytes] | None = None
        self._reason = b""

    # -- LeasedConn -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the session; a request still on it fails (the pool is closing it under us)."""
        sink, self._sink = self._sink, None
        self.abort()
        if sink is not None:
            sink.resp_failed(self._started)

    def abort(self) -> None:
        """Close without telling the current sink (it gave up on the request itself)."""
        self._sink = None
        self._reported = True
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    @property
    def busy(self) -> bool:
        return self._sink is not None

    # -- requests ------------------------------------------------------------------------------
    def start(self, data: bytes, sink: ResponseSink, head_only: bool, upgrade: bool) -> bool:
        """Write a request head (and buffered body); False when the session is already gone."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return False
        self._sink = sink
        if self._parser is None:  # kept across responses that ended cleanly (see _finish)
            self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._upgrade = upgrade
        self._started = self._complete = self._interim = self._close = False
        self._chunked = False
        self._length = -1
        self._in_head = True
        self._head_bytes = 0
        self._field_bytes = 0
        self._lines = []
        self._conn_values = None
        self._reason = b""
        transport.write(data)
        return True

    def set_sink(self, sink: ResponseSink) -> None:
        """Hand the request in flight to another owner (the client went away)."""
        if self._sink is not None:
            self._sink = sink

    def write(self, data: bytes) -> None:
        """More of the request body (streaming) or tunnel bytes."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed and self._paused:
            self._paused = False
            self.transport.resume_reading()

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)

    def pause_writing(self) -> None:
        if self._sink is not None:
            self._sink.upstream_writable(False)

    def resume_writing(self) -> None:
        if self._sink is not None:
            self._sink.upstream_writable(True)

    def data_received(self, data: bytes) -> None:
        sink = self._sink
        if sink is None:
            self._idle_data(data)
            return
        if self._tunnel:
            sink.resp_body(data)
            return
        if not self._started:
            if self._pre or data[:1] == b"B":
                data = self._strip_retire(data)
                if not data:
                    return
            self._started = True
        parser = self._parser
        assert parser is not None
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._sink is not None:
                self._on_upgrade(data, int(exc.args[0]))
            return
        except httptools.HttpParserError as exc:
            if self._sink is None:
                return  # the sink gave up on the request from inside a callback
            if isinstance(exc.__context__, _HeadDone):
                self._finish(data[-4:] != b"\r\n\r\n", data)
            elif self._complete:
                self._finish(True, data)
            else:
                self._fail()
            return
        if self._sink is None:
            return  # the sink gave up on the request from inside a callback
        if self._complete:
            self._finish(False, data, reuse=True)
        elif self._in_head:
            # httptools buffers a partial head itself: bound it across reads.
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head:
                self._fail()
        elif self._sink is not None:
            self._sink.resp_flush()

    def eof_received(self) -> bool:
        sink = self._sink
        if sink is None:
            self._lose(BROKEN)
        elif self._tunnel:
            self._sink = None
            self._reported = True
            sink.resp_done(BROKEN)
        elif (
            self._started
            and not self._in_head
            and not self._complete
            and self._length < 0
            and not self._chunked
        ):
            # Close-delimited body: end-of-file is the end of the response.
            self._sink = None
            self._reported = True
            sink.resp_done(BROKEN)
        else:
            self._fail()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self._sink is not None:
            if self._tunnel:
                sink, self._sink = self._sink, None
                self._reported = True
                sink.resp_done(BROKEN)
            else:
                self._fail()
        else:
            self._lose(BROKEN)

    # -- idle watching ----------------------------------------------------------------------------
    def _idle_data(self, data: bytes) -> None:
        buf = self._pre + data
        if RETIRE_LINE.startswith(buf[:_RETIRE_LEN]) and len(buf) <= _RETIRE_LEN:
            if len(buf) < _RETIRE_LEN:
                self._pre = buf
                return
            self._pre = b""
            self._lose(RETIRED)
            return
        self._pre = b""
        self._lose(BROKEN)  # any other byte on an idle session is a protocol error

    def _lose(self, state: ReleaseState) -> None:
        if self._reported:
            return
        self._reported = True
        if self.pool is not None:
            self.pool.lost(self, state)
        self.close()

    def _strip_retire(self, data: bytes) -> bytes:
        """Drop an exact RETIRE line in front of the status line (the service answers anyway)."""
        buf = self._pre + data
        self._pre = b""
        n = min(len(buf), _RETIRE_LEN)
        if buf[:n] != RETIRE_LINE[:n]:
            return buf  # not a RETIRE: the response parser judges it
        if n < _RETIRE_LEN:
            self._pre = buf
            return b""
        self._retired = True
        return buf[_RETIRE_LEN:]

    # -- completion ------------------------------------------------------------------------------
    def _finish(self, extra: bool, data: bytes, reuse: bool = False) -> None:
        """The response is complete; *reuse*: the parser ended at a message boundary (not
        stopped by an exception), so the next response on this session may use it."""
        state = RETIRED if (self._retired or self._close) else IDLE
        if extra:
            # Only a RETIRE line (maybe its start) may follow a response.  It has a single
            # "B", so the tail from the last "B" is the candidate.
            tail = data[data.rfind(b"B") :] if b"B" in data else b"?"
            if tail == RETIRE_LINE:
                state = RETIRED
            elif RETIRE_LINE.startswith(tail) and state == IDLE:
                self._pre = tail
            else:
                state = BROKEN
        sink, self._sink = self._sink, None
        if not reuse or state != IDLE:
            self._parser = None
        self._retired = False
        if state != IDLE:
            self._reported = True  # the sink's release closes it; never report it lost
        else:
            self.resume_reading()  # the client may have paused us; idle sessions must be read
        assert sink is not None
        sink.resp_done(state)

    def _fail(self) -> None:
        sink = self._sink
        self.abort()
        if sink is not None:
            sink.resp_failed(self._started)

    def _on_upgrade(self, data: bytes, offset: int) -> None:
        parser = self._parser
        assert parser is not None and self._sink is not None
        if not self._upgrade or parser.get_status_code() != 101:
            self._fail()
            return
        self._tunnel = True
        self._reported = True
        if offset < len(data):
            self._sink.resp_body(data[offset:])

    # -- httptools callbacks -----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._complete:
            raise _Extra

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._count_head(len(reason) + 15)

    def _count_head(self, n: int) -> None:
        # Complete fields are counted exactly, so a head that arrives in one read (which
        # the per-read bound never sees) is bounded too; interim 1xx heads count as well.
        self._field_bytes += n
        if self._field_bytes > self.max_head:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        code = FIELDS.get(name.lower(), _OTHER)
        if code == _CONTENT_LENGTH:  # llhttp validated it
            self._length = int(value)
        elif code == _TRANSFER_ENCODING:
            self._chunked = True  # re-framed by the proxy; llhttp ensured chunked is last
            return
        elif code == _CONNECTION:
            if self._conn_values is None:
                self._conn_values = []
            self._conn_values.append(value)
            return
        elif code == _HOP or (code == _UPGRADE and not self._upgrade):
            return
        # Everything else (Host, Expect, X-Forwarded-* are ordinary fields in a response).
        self._lines.append(b"".join((name, b": ", value, b"\r\n")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        sink = self._sink
        assert parser is not None and sink is not None
        self._in_head = False
        status: int = parser.get_status_code()
        lines = self._lines
        if self._conn_values is not None:
            tokens = connection_tokens(self._conn_values)
            # HTTP/1.0 keep-alive is not worth the risk: such a session is retired after use.
            if b"close" in tokens or parser.get_http_version() != "1.1":
                self._close = True
            named = tokens - CONNECTION_BUILTIN
            if named:
                lines = drop_named(lines, named)
        elif parser.get_http_version() != "1.1":
            self._close = True  # an HTTP/1.0 session cannot be reused without keep-alive
        if 100 <= status < 200 and status != 101:
            self._interim = True
            sink.resp_interim(status, self._reason, lines)
            return
        if status == 101:
            if not self._upgrade:
                raise _Unexpected  # switching protocols on a request that did not ask
            lines.append(b"Connection: Upgrade\r\n")
        sink.resp_head(status, self._reason, lines, self._length, self._chunked)
        if self._head_only:
            self._complete = True
            raise _HeadDone

    def on_body(self, body: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink.resp_body(body)

    def on_message_complete(self) -> None:
        if self._interim:  # the final response follows on the same parser
            self._interim = False
            self._in_head = True
            self._lines = []
            self._conn_values = None
            self._reason = b""
            self._length = -1
            self._chunked = False
            return
        self._complete = True


class DrainSink(DiscardingSink):
    """Owns a session whose client went away mid-request: discard the response, release clean.

    Bounded by ``upstream_timeout`` in total; a session that does not finish by then
    is discarded as broken.
    """

    __slots__ = ("conn", "handle", "pool")

    def __init__(
        self,
        pool: LeaseOwner,
        conn: SessionConn,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
    ) -> None:
        self.pool = pool
        self.conn = conn
        self.handle = loop.call_later(timeout, self._expire)
        conn.resume_reading()  # it may have been paused for the client's sake

    def resp_head(
        self, status: int, reason: bytes, lines: list[bytes], length: int, chunked: bool
    ) -> None:
        if status == 101:
            self._expire()  # a tunnel nobody will use

    def resp_done(self, state: ReleaseState) -> None:
        self.handle.cancel()
        self.pool.release(self.conn, state)

    def resp_failed(self, started: bool) -> None:
        self.handle.cancel()
        self.pool.release(self.conn, BROKEN)

    def _expire(self) -> None:
        self.handle.cancel()
        self.conn.abort()
        self.pool.release(self.conn, BROKEN)


async def wrap_lease(
    lease: Lease, pool: LeaseOwner | None = None, max_head: int = MAX_RESPONSE_HEAD
) -> SessionConn:
    """Wrap a leased session socket in a ``SessionConn`` (the pool's ``ConnFactory``).

    Bound with the pool so an idle session that dies or retires is reported with
    ``pool.lost``: ``LeasePool(run_dir, lambda lease: wrap_lease(lease, pool))``.
    """
    loop = asyncio.get_running_loop()
    sock = lease.sock

    def make() -> SessionConn:
        return SessionConn(lease, pool, max_head)

    if sock.family == socket.AF_UNIX:
        _, proto = await loop.create_unix_connection(make, sock=sock)
    else:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _, proto = await loop.create_connection(make, sock=sock)
    return proto
