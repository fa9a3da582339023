"""Reading a client connection: bytes in, whole requests out (``ClientProtocol``'s reader).

The PROXY protocol header first when configured, then HTTP/1.1 through
httptools (llhttp).  Reads are split where a head or a known body ends, so a
chunked body's framing is judged as it arrives (``chunkscan.py``); heads and
URLs are bounded by ``max_header_bytes``.  ``on_headers_complete`` checks the
head (``request.py``) and classifies it into its service and slice; the body
is buffered in memory, then in a spool file, within the worker's budgets
(``spool.py``), or, with spooling off, streamed under a lease.  A whole
request joins the pipeline queue that ``dispatch.py`` serves; malformed input
becomes an error answered in order (``failed_request``), after which nothing
more is parsed.  ``_body_keeps_up`` is the minimum-rate rule the request
timeout applies to a body still arriving.
"""

from __future__ import annotations

import httptools

from backdial import http1
from backdial.http1 import canned
from backdial.sidecar.chunkscan import ChunkScan
from backdial.sidecar.classify import IPAddress, classifier_for, parse_ip
from backdial.sidecar.clientbase import ClientBase
from backdial.sidecar.connstate import (
    C_CLOSE,
    P_BODY,
    P_DEAD,
    P_PIPELINE,
    T_IDLE,
    T_REQUEST,
    T_UPSTREAM,
)
from backdial.sidecar.proxyproto import V2_MAX, ProxyHeaderError
from backdial.sidecar.proxyproto import parse as parse_proxy_header
from backdial.sidecar.request import HttpError, Request, failed_request, forwarding_block, xff_line
from backdial.sidecar.spool import Spool


class RequestReader(ClientBase):
    """The reading side of ``proxy.ClientProtocol``: asyncio's and httptools' callbacks."""

    # -- the client's address (connection_made, a PROXY header) ---------------------------------
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
        if self._kind == T_IDLE:
            self._set_deadline(T_REQUEST, self.settings.request_timeout)
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
        self._set_deadline(T_IDLE, self.settings.client_idle_timeout)
        return bytes(buf[header.length :])

    def _parse_failed(self, status: int) -> None:
        """Malformed input: nothing more is parsed; the error is answered in order, then close."""
        self._dead = True
        self._pause(P_DEAD)
        r, self._r = self._r, None
        if r is not None and r is self._active:  # a streaming body went bad half-way
            self._abandon_upstream()
            if not self._resp_started:
                self._write(canned(status, C_CLOSE, r.head_only))
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
            self._pause(P_DEAD)
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
            r.body.append(body)  # reading is paused (P_BODY), so this is one read at most
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
            self._pause(P_BODY)  # wait for our turn before taking a lease

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
                self._set_deadline(T_UPSTREAM, self.settings.upstream_timeout)
            return
        self._resume(P_BODY)  # a big body that waited for its turn is whole now
        self._queue.append(r)
        if len(self._queue) >= self.settings.max_pipeline:
            self._pause(P_PIPELINE)

    # -- the request timeout's minimum-rate rule (proxy.ClientProtocol.on_deadline) ---------------
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
