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

No logging, pydantic or per-request dict work happens here; the only
per-request allocations are the request record, its header lines and the
joined head.  Timeouts use one deadline per connection swept by a single
timer (``listener.ListenerState``), not a timer handle per request.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Final, cast

import httptools

from backdial import http1
from backdial.control import Rejection, ReleaseState
from backdial.http1 import BodyMode, ConnMode, body_mode, canned
from backdial.sidecar.chunkscan import ChunkScan
from backdial.sidecar.classify import Classifier, IPAddress, classifier_for, parse_ip
from backdial.sidecar.clientout import MEMORY_FLOOR as FLOOR
from backdial.sidecar.clientout import ClientOutput
from backdial.sidecar.config import ProxySettings
from backdial.sidecar.connstate import Deadline, PauseReason
from backdial.sidecar.lease import LeasedConn, LeaseSource, Ticket
from backdial.sidecar.leasepool import Draining, QueueFull
from backdial.sidecar.listener import ListenerState
from backdial.sidecar.proxyproto import V2_MAX, ProxyHeaderError
from backdial.sidecar.proxyproto import parse as parse_proxy_header
from backdial.sidecar.request import (
    HttpError,
    Request,
    failed_request,
    forwarding_block,
    xff_line,
)
from backdial.sidecar.sessionconn import DrainSink, SessionConn
from backdial.sidecar.spool import Spool
from backdial.sidecar.stats import ProxyStats

# Enum members bound once (see connstate.py): these are compared per read and per request.
_T_NONE: Final = Deadline.NONE
_T_IDLE: Final = Deadline.IDLE
_T_REQUEST: Final = Deadline.REQUEST
_T_UPSTREAM: Final = Deadline.UPSTREAM
_T_SEND: Final = Deadline.SEND
_T_TUNNEL: Final = Deadline.TUNNEL
_P_PIPELINE: Final = PauseReason.PIPELINE
_P_BODY: Final = PauseReason.BODY
_P_UPSTREAM: Final = PauseReason.UPSTREAM
_P_DEAD: Final = PauseReason.DEAD
_P_ACQUIRE: Final = PauseReason.ACQUIRE
_M_LENGTH: Final = BodyMode.LENGTH
_M_CHUNK: Final = BodyMode.CHUNK
_M_EOF: Final = BodyMode.EOF
_M_NONE: Final = BodyMode.NONE
_M_TUNNEL: Final = BodyMode.TUNNEL
_KEEP: Final = ConnMode.KEEP
_CLOSE: Final = ConnMode.CLOSE
_KEEP_10: Final = ConnMode.KEEP_10
_IDLE: Final = ReleaseState.IDLE
_BROKEN: Final = ReleaseState.BROKEN
FEED_CHUNK: Final = 256 * 1024  # spooled body bytes written to a session per step


def make_protocol_factory(
    pool: LeaseSource, settings: ProxySettings, stats: ProxyStats
) -> tuple[Callable[[], ClientProtocol], ListenerState]:
    """``(factory, state)``: ``loop.create_server(factory, sock=listener)``; ``state.shutdown``."""
    state = ListenerState(pool, settings, stats)

    def factory() -> ClientProtocol:
        return ClientProtocol(state)

    return factory, state


# -- the client connection ------------------------------------------------------------------------
class ClientProtocol(asyncio.Protocol):
    """One client connection: parse, classify, lease, relay, release."""

    def __init__(self, state: ListenerState) -> None:
        self.state = state
        self.settings = state.settings
        self.stats = state.stats
        self.pool = state.pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.deadline = 0.0  # swept by ListenerState; 0 = none
        self._kind: Deadline = _T_NONE
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
        self._mode: BodyMode = _M_NONE
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

    # -- connection lifecycle ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.out.transport = transport
        if not self.state.fd_guard.admit():
            # Near the descriptor limit: a clear answer now, rather than running out and
            # having libuv accept and drop connections silently (liveness.py).
            self._closed = True
            transport.write(canned(503, _CLOSE, False, 1))
            transport.close()
            return
        transport.set_write_buffer_limits(high=self.settings.response_buffer)
        peer = transport.get_extra_info("peername")
        self._set_client(peer[0] if isinstance(peer, tuple) else "")
        self._peer_trusted = self._trusted
        self.state.add(self)
        if self.settings.proxy_protocol:
            self._proxy_buf = bytearray()
            self._set_deadline(_T_REQUEST, self.settings.request_timeout)
        else:
            self._set_deadline(_T_IDLE, self.settings.client_idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.deadline = 0.0
        self.state.remove(self)
        self.out.close()
        self._leave_queue()
        conn, self._conn = self._conn, None
        if conn is not None:
            r = self._active
            if self._tunnel or r is None or _unsent(r):
                conn.abort()  # a tunnel or a half-sent request: the session is unusable
                self.pool.release(conn, _BROKEN)
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

    def _unbuffer(self, r: Request) -> None:
        """Give back what *r*'s body holds of the worker's budgets, exactly once."""
        self.stats.request_memory.give(r.buffered)
        r.buffered = 0
        if r.spool is not None:
            r.spool.close()
            r.spool = None

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
        self._set_deadline(_T_SEND, self.settings.send_timeout)

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
                self._set_deadline(_T_TUNNEL, self.settings.client_idle_timeout)
            else:
                self._set_deadline(_T_UPSTREAM, self.settings.upstream_timeout)
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
            self._set_deadline(_T_IDLE, self.settings.drain_idle_grace)

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

    def _set_client(self, ip: str) -> None:
        self._ip = ip
        self._ip_parsed = False
        trusted = self.state.trusted
        self._trusted = bool(trusted) and trusted.trusts(self._client_ip())
        lines = self.state.forwarding.get(ip)
        if lines is None:  # per client address, not per connection (bounded cache)
            lines = (forwarding_block(ip, self.state.proto, self.state.via), xff_line([], ip))
            if len(self.state.forwarding) < 4096:
                self.state.forwarding[ip] = lines
        self._fwd, self._xff = lines

    def _client_ip(self) -> IPAddress | None:
        if not self._ip_parsed:
            self._ipobj = parse_ip(self._ip)
            self._ip_parsed = True
        return self._ipobj

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

    # -- reading ----------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._proxy_buf is not None:
            data = self._proxy_header(data)
            if not data:
                return
        if self._tunnel:
            self._progress += 1
            if self._conn is not None:
                self._conn.write(data)
            return
        if self._dead:
            r = self._last
            if r is not None and r.upgrade and self._active in (None, r):
                r.tunnel_pre += data  # early tunnel bytes; reading is paused, so bounded
            return
        if self._kind == _T_IDLE:
            self._set_deadline(_T_REQUEST, self.settings.request_timeout)
        rest = self._parse_framed(data)
        if rest and not self._closed:
            self.data_received(rest)  # parsing stopped (upgrade, error): tunnel or dropped bytes
        self._next()

    def _parse_framed(self, data: bytes) -> bytes:
        """Feed *data* to the parser, split where a head or a known body ends, so that the
        chunk sizes of a chunked body are judged as they arrive (``chunkscan.py``).

        Returns the bytes left unparsed because parsing stopped (an upgrade, an error).
        A split costs nothing on the common path: a read that ends with its head is fed
        whole.
        """
        while data:
            if self._dead or self._tunnel or self._closed:
                return data
            r = self._r
            scan = self._scan
            if scan is not None and (not scan.judging or r is None or r.in_head):
                scan = self._scan = None  # the body ended, or its framing is llhttp's to refuse
            if scan is not None:
                end = scan.feed(data)
                if end == ChunkScan.TOO_LARGE:
                    self._scan = None
                    self.stats.chunk_refusals += 1
                    self._parse_failed(413)  # a declared size beyond the body limit
                    return b""
                self._parse(data[:end])
                data = data[end:]
                continue
            if r is not None and not r.in_head:  # a body: Content-Length ends it exactly
                left = r.length - r.body_len if r.length >= 0 and not r.chunked else -1
                if 0 < left < len(data):
                    self._parse(data[:left])
                    data = data[left:]
                    continue
                self._parse(data)
                return b""
            buf = self._tail + data if self._tail else data
            pos = buf.find(b"\r\n\r\n")
            if pos < 0:
                self._tail = buf[-3:]  # a head's end may straddle two reads
                self._parse(data)
                return b""
            cut = pos + 4 - len(self._tail)
            self._tail = b""
            self._parse(data[:cut])
            data = data[cut:]
            r = self._r
            if r is not None and r.chunked and not r.in_head and not r.complete:
                self._scan = ChunkScan(self.settings.max_request_body_stream)
        return b""

    def _parse(self, data: bytes) -> None:
        """One ``feed_data``: httptools errors become answers, an upgrade hands its rest on."""
        r = self._r
        in_head = r is not None and r.in_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # Handled outside this except block: parsing the rest there would chain its
            # errors to this one, and they would look like a bug in a callback (found by
            # tests/sidecar/test_fuzz_http.py: a pipelined request after an h2c upgrade).
            rest: bytes | None = data[int(exc.args[0]) :]
        except httptools.HttpParserError as exc:
            ctx = exc.__context__
            if ctx is not None and not isinstance(ctx, HttpError):
                raise ctx from exc  # a bug in a callback: let the loop report it
            self._parse_failed(ctx.status if isinstance(ctx, HttpError) else 400)
            rest = None
        else:
            rest = None
            if in_head and self._r is r and r is not None and r.in_head:
                # A read that neither began nor ended the head is all head: httptools buffers
                # partial fields itself, so bound them here (complete ones are counted exactly).
                self._head_bytes += len(data)
                if self._head_bytes > self.settings.max_header_bytes:
                    self._parse_failed(431)
        if rest is not None:
            self._parsed_upgrade(rest)

    def _proxy_header(self, data: bytes) -> bytes:
        buf = self._proxy_buf
        assert buf is not None
        buf += data
        try:
            header = parse_proxy_header(buf)
            if header is None and len(buf) > V2_MAX:
                raise ProxyHeaderError("PROXY header too long")
        except ProxyHeaderError:
            self.stats.proxy_header_errors += 1
            self._proxy_buf = None
            self._dead = True
            self.abort()  # strict: no valid header, no service
            return b""
        if header is None:
            return b""
        self._proxy_buf = None
        if header.client is not None:
            if self._peer_trusted:
                self._set_client(header.client[0])
            else:  # anyone may write a PROXY header: keep the address that connected
                self.stats.untrusted_forwarding += 1
        self._set_deadline(_T_IDLE, self.settings.client_idle_timeout)
        return bytes(buf[header.length :])

    def _parse_failed(self, status: int) -> None:
        """Malformed input: nothing more is parsed; the error is answered in order, then close."""
        self._dead = True
        self._pause(_P_DEAD)
        r, self._r = self._r, None
        if r is not None and r is self._active:  # a streaming body went bad half-way
            self._abandon_upstream()
            if not self._resp_started:
                self._write(canned(status, _CLOSE, r.head_only))
            self._finish(r, status)
            self._close()
            return
        if r is not None:
            self._unbuffer(r)
        self._queue.append(failed_request(status))

    def _parsed_upgrade(self, rest: bytes) -> None:
        r = self._last
        if r is not None and r.upgrade:
            self._dead = True  # everything after the upgrade request belongs to the tunnel
            self._pause(_P_DEAD)
            r.tunnel_pre = rest
            return
        # An upgrade this proxy does not tunnel (e.g. h2c): the request was served as plain
        # HTTP/1.1 with Upgrade removed; continue with the bytes after it.
        self.parser = httptools.HttpRequestParser(self)
        if rest:
            self.data_received(rest)

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        policy = self.pool.policy
        cls = self._cls
        if cls is None or cls.policy is not policy:
            cls = self._cls = classifier_for(policy)
        self._r = Request(cls.wanted, self.settings.max_header_bytes)
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        r = self._r
        assert r is not None
        r.url += url
        if len(r.url) > self.settings.max_header_bytes:
            raise HttpError(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        r = self._r
        assert r is not None
        r.add_header(name, value)

    def on_headers_complete(self) -> None:
        r = self._r
        cls = self._cls
        assert r is not None and cls is not None
        parser = self.parser
        host = r.check_head(
            parser.get_http_version(),
            parser.get_method(),
            parser.should_keep_alive(),
            parser.should_upgrade(),
            self.settings.max_request_body_stream,
        )
        path = http1.path_of(r.url)
        r.service = cls.service(host, path)
        if cls.trivial_slices:
            r.slice = cls.default_slice
        else:
            ip = self._client_ip() if cls.uses_ip else None
            if ip is not None and self._trusted and r.xff is not None:
                ip = self.state.trusted.real_client(r.xff, ip)
            r.slice = cls.slice(ip, r.hv, path)
        r.t0 = self._rate_since = self.loop.time()
        self._rate_mark = 0
        if r.expect_continue and self._active is None and not self._queue:
            self._send_continue(r)

    def on_body(self, body: bytes) -> None:
        r = self._r
        assert r is not None
        r.body_len += len(body)
        if r.body_len > self.settings.max_request_body_stream:
            raise HttpError(413)
        if r.streaming:
            conn = self._conn
            if conn is not None:
                conn.write(http1.chunk(body) if r.chunked else body)
                self._progress += 1
            else:
                r.body.append(body)  # still leasing; reading is paused, so this is bounded
            return
        if r.body:  # spooling off, over the memory limit: held until our turn to stream
            r.body.append(body)  # reading is paused (_P_BODY), so this is one read at most
            r.buffered += len(body)
            self.stats.request_memory.book(len(body))
            return
        spool = r.spool
        if spool is None:
            settings = self.settings
            spool = r.spool = Spool(
                self.stats.request_memory,
                self.stats.request_disk,
                settings.max_request_body,
                settings.max_request_body_stream if settings.request_spool_total else 0,
                settings.spill_dir,
            )
        if spool.append(body):
            return
        if self.settings.request_spool_total:
            # Memory and disk budgets are spent: refuse fast rather than buffer regardless.
            self.stats.request_buffer_refusals += 1
            raise HttpError(503)
        # Spooling off: stream the body under a lease, as the session can take it.
        r.body = spool.take_memory()
        r.body.append(body)
        spool.close()
        r.spool = None
        r.buffered = sum(map(len, r.body))
        self.stats.request_memory.book(r.buffered)  # held until sent: counted, not refused
        if self._active is None and not self._queue:
            self._start_streaming(r)
        else:
            self._pause(_P_BODY)  # wait for our turn before taking a lease

    def on_message_complete(self) -> None:
        r = self._r
        assert r is not None
        self._r = None
        self._last = r
        r.complete = True
        if r.streaming:
            conn = self._conn
            if conn is not None:
                if r.chunked:
                    conn.write(http1.LAST_CHUNK)  # trailers are not forwarded
                self._set_deadline(_T_UPSTREAM, self.settings.upstream_timeout)
            return
        self._resume(_P_BODY)  # a big body that waited for its turn is whole now
        self._queue.append(r)
        if len(self._queue) >= self.settings.max_pipeline:
            self._pause(_P_PIPELINE)

    # -- serving, one request at a time -----------------------------------------------------------
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
                self._resume(_P_PIPELINE)
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
                    self._resume(_P_BODY)
                    self._start_streaming(r)
                    return
            if self._kind != _T_REQUEST:  # counted from the request's start, not per read
                self._set_deadline(_T_REQUEST, self.settings.request_timeout)
        elif self._dead or self.state.draining:
            self._close()
        else:
            self._set_deadline(_T_IDLE, self.settings.client_idle_timeout)

    def _send_continue(self, r: Request) -> None:
        r.continue_sent = True
        self._write(http1.CONTINUE_100)

    def _start_streaming(self, r: Request) -> None:
        r.streaming = True
        self.stats.requests_streamed += 1
        self._pause(_P_ACQUIRE)  # the rest of the body waits for the session
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
        self._kind, self.deadline = _T_NONE, 0.0  # the slice's queue timeout bounds the wait
        try:
            self._ticket = pool.wait(r.service, r.slice, self)
        except (QueueFull, Draining) as exc:
            self._unavailable(r, exc.reason, exc.retry_after)

    # -- Waiter: called by the pool once for a request that had to wait ---------------------------
    def lease_ready(self, conn: LeasedConn) -> None:
        self._ticket = None
        r = self._active
        if r is None or self._closed or self._conn is not None:
            self.pool.release(conn, _IDLE)  # never written to: still clean
            return
        self._send(r, cast(SessionConn, conn))

    def lease_refused(self, reason: Rejection, retry_after: int) -> None:
        self._ticket = None
        r = self._active
        if r is not None:
            self._unavailable(r, reason, retry_after)

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
            self.pool.release(conn, _BROKEN)
            self.resp_failed_on(r, False)
            return
        self._seen = self._progress
        if r.streaming and not r.complete:
            self._set_deadline(_T_REQUEST, self.settings.request_timeout)
            self._resume(_P_ACQUIRE)
        else:
            self._set_deadline(_T_UPSTREAM, self.settings.upstream_timeout)
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
            mode = _CLOSE
        else:
            mode = _KEEP_10 if r.v10 else _KEEP
        self._write(canned(status, mode, r.head_only, retry_after))
        self._finish(r, status)
        if mode == _CLOSE:
            self._close()
        else:
            self._next()

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
            self._set_deadline(_T_SEND, self.settings.send_timeout)

    def _detach(self) -> SessionConn | None:
        """Take the session off this connection; what it paused of the client resumes."""
        conn, self._conn = self._conn, None
        # A full session may have paused reading the client (upstream_writable); once it is
        # gone nothing else would resume it, and the next request would hang.
        self._upstream_full = False
        self._resume(_P_UPSTREAM)
        return conn

    def _abandon_upstream(self) -> None:
        conn = self._detach()
        if conn is not None:
            conn.abort()
            self.pool.release(conn, _BROKEN)
        self._leave_queue()

    def _leave_queue(self) -> None:
        if self._ticket is not None:
            self.pool.cancel(self._ticket)
            self._ticket = None

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
            and mode != _M_EOF
            and not (r.upgrade and status != 101)
            and not (r.streaming and not r.complete)
            and not (self.state.draining and not self._queue)
        )
        self._resp_keep = keep
        if mode == _M_TUNNEL:
            tail = b"\r\n"  # Connection: Upgrade and Upgrade are in lines
        elif not keep:
            tail = b"Connection: close\r\n\r\n"
        elif r.v10:
            tail = b"Connection: keep-alive\r\n\r\n"
        else:
            tail = b"\r\n"
        if mode == _M_CHUNK:
            tail = b"Transfer-Encoding: chunked\r\n" + tail
        # Buffered until the end of this session read: head and body leave in one send().
        self._out.append(b"".join((http1.cached_status_line(status, reason), *lines, tail)))
        if mode == _M_TUNNEL:
            self._open_tunnel(r)

    def resp_interim(self, status: int, reason: bytes, lines: list[bytes]) -> None:
        # 1xx (e.g. 103 Early Hints) go to HTTP/1.1 clients; 100 is ours to send, not the service's.
        r = self._active
        if r is not None and not r.v10 and status != 100:
            self._out.append(b"".join((http1.cached_status_line(status, reason), *lines, b"\r\n")))

    def resp_body(self, data: bytes) -> None:
        self._progress += 1
        mode = self._mode
        if mode in (_M_LENGTH, _M_EOF):
            self._out.append(data)
        elif mode == _M_CHUNK:
            if data:
                self._out.append(http1.chunk(data))
        elif mode == _M_TUNNEL:
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
        if _unsent(r):
            state = _BROKEN  # the service answered before the whole body: the session is dirty
        self.pool.release(conn, state)
        if self._mode == _M_CHUNK:
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
            self.pool.release(conn, _BROKEN)
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
            self._resume(_P_UPSTREAM)
            r = self._active
            if r is not None and r.spool is not None:
                self._feed()
        else:
            self._pause(_P_UPSTREAM)

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
        self._set_deadline(_T_TUNNEL, self.settings.client_idle_timeout)

    # -- timeouts (called by the server's sweep) --------------------------------------------------
    def on_deadline(self, now: float) -> None:
        kind = self._kind
        if (
            kind == _T_SEND
            and self.out.sent != self._sent_seen
            and (self._conn is None or self._progress != self._seen)
        ):
            # The client is reading (and the session, if any, still delivering): only a
            # client that takes nothing for send_timeout is cut.
            self._sent_seen, self._seen = self.out.sent, self._progress
            self.deadline = now + self.settings.send_timeout
            return
        flowing = kind in (_T_UPSTREAM, _T_TUNNEL)
        if flowing and self._progress != self._seen:  # still flowing: only silence times out
            self._seen = self._progress
            if kind == _T_UPSTREAM:
                self.deadline = now + self.settings.upstream_timeout
            else:
                self.deadline = now + self.settings.client_idle_timeout
            return
        if kind == _T_REQUEST and self._body_keeps_up(now):
            return
        self.deadline = 0.0
        r = self._active
        if kind == _T_UPSTREAM and r is not None:
            self.stats.upstream_timeouts += 1
            self._abandon_upstream()
            if self._resp_started:
                self._finish(r, self._status)
                self.abort()
            else:
                self._respond_error(r, 504)
        elif kind == _T_REQUEST and r is None and self._proxy_buf is None:
            self._write(canned(408, _CLOSE))  # nothing in flight: safe to answer in order
            self._dead = True
            self._close()
        elif kind == _T_REQUEST and r is not None and r.streaming:
            self._abandon_upstream()
            if not self._resp_started:
                self._write(canned(408, _CLOSE))
            self._finish(r, 408)
            self._close()
        elif kind == _T_IDLE:
            self._close()
        else:  # stalled send, dead tunnel, or a PROXY header that never came
            if r is not None and self._conn is not None:
                self._abandon_upstream()
                self._finish(r, self._status or 408)
            self.abort()

    def _body_keeps_up(self, now: float) -> bool:
        """A body still arriving at ``body_min_rate`` gets another ``body_rate_window``.

        Like mod_reqtimeout's MinRate, but measured per window: a client cannot earn
        credit with a fast start and then trickle a byte now and then.
        """
        r = self._r
        rate = self.settings.body_min_rate
        if r is None or r.in_head or rate <= 0:
            return False
        if r.body_len - self._rate_mark < rate * (now - self._rate_since):
            self.stats.slow_bodies += 1
            return False
        self._rate_mark, self._rate_since = r.body_len, now
        self.deadline = now + self.settings.body_rate_window
        return True


def _unsent(r: Request) -> bool:
    """Part of *r*'s body is not on the session yet (streamed or fed from its spool)."""
    return (r.streaming and not r.complete) or r.spool is not None
