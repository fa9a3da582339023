"""Slow clients do not hold sessions: request buffering, response draining, explicit streaming."""

from __future__ import annotations

import socket
from collections.abc import Callable

from tests.sidecar.conftest import ProxyRunner, RawClient

Raw = Callable[[int], RawClient]


def test_slow_upload_takes_no_session_until_complete(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    body = b"0123456789" * 100
    c.send(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 100):
        c.send(body[i : i + 100])
        if i + 100 < len(body):
            # Each piece is buffered (the proxy's own gauge says so) and no lease is tried.
            assert proxy.wait_for(lambda i=i: proxy.stats.buffered_request_bytes == i + 100)
            assert proxy.call(lambda: len(proxy.pool.acquires)) == 0
    info = c.read_response().json()
    assert info["body"] == body.decode()
    assert proxy.pool.acquires == [("", "default")]
    assert proxy.call(lambda: proxy.stats.buffered_request_bytes) == 0


def test_response_drained_before_client_reads(proxy: ProxyRunner) -> None:
    """600 KB fit the 1 MiB response buffer: the session is free before the client reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(("127.0.0.1", proxy.port))
    sock.settimeout(5)
    try:
        sock.sendall(b"GET /big?n=600000 HTTP/1.1\r\nHost: a\r\n\r\n")
        # Released clean while the client has read nothing at all.
        assert proxy.wait_for(lambda: proxy.pool.states() == ["idle"])
        assert proxy.call(lambda: proxy.stats.responses_streamed) == 0
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 600000:
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the whole response"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nContent-Length: 600000" in head
        assert body == b"x" * 600000  # every byte, nothing more
    finally:
        sock.close()


def test_response_over_buffer_streams_with_backpressure(
    make_proxy: Callable[..., ProxyRunner],
) -> None:
    """With spilling off, a response beyond the buffer streams under its lease."""
    proxy = make_proxy(response_buffer=64 * 1024, response_spill_max=0)
    n = 8 << 20
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(("127.0.0.1", proxy.port))
    sock.settimeout(5)
    try:
        sock.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: a\r\n\r\n" % n)
        assert proxy.wait_for(lambda: proxy.stats.responses_streamed == 1)
        # Over the buffer the session is paused, not released: 8 MiB cannot have left
        # while the client reads nothing.
        assert proxy.pool.states() == []
        assert proxy.call(lambda: len(proxy.pool.busy)) == 1
        got = 0
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        got = len(head.split(b"\r\n\r\n", 1)[1])
        while got < n:
            chunk = sock.recv(1 << 20)
            assert chunk
            got += len(chunk)
        assert got == n
        assert proxy.wait_for(lambda: proxy.pool.states() == ["idle"])
    finally:
        sock.close()


def test_body_over_hard_cap_is_413(make_proxy: Callable[..., ProxyRunner], raw_client: Raw) -> None:
    proxy = make_proxy(max_request_body=1000, max_request_body_stream=1000)
    c = raw_client(proxy.port)
    c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n")
    r = c.read_response()  # answered from the head alone, before any body byte
    assert r.status == 413 and r.header("connection") == "close"
    c = raw_client(proxy.port)
    c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.send(b"3e8\r\n" + b"a" * 1000 + b"\r\n")
    c.send(b"1\r\nb\r\n0\r\n\r\n")
    assert c.read_response().status == 413
    assert proxy.backend.raw_bytes == b""
    # Exactly at the limit is fine.
    c = raw_client(proxy.port)
    c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n" + b"a" * 1000)
    assert len(c.read_response().json()["body"]) == 1000
    assert proxy.stats.requests_streamed == 0


def test_body_between_limits_streams_when_spooling_is_off(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(
        max_request_body=1000, max_request_body_stream=1 << 20, request_spool_total=0
    )
    body = bytes(range(256)) * 400  # 102400 bytes
    c = raw_client(proxy.port)
    c.send(b"POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body))
    c.send(body[:5000])
    # Past max_request_body the request streams: the lease is taken now, mid-body.
    assert proxy.wait_for(lambda: len(proxy.pool.busy) == 1)
    c.send(body[5000:])
    info = c.read_response().json()
    assert info["body"].encode("latin-1") == body
    # Chunked streams chunked, the service sees the same bytes.
    c.send(b"POST /s2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(body), 10000):
        part = body[i : i + 10000]
        c.send(b"%x\r\n%s\r\n" % (len(part), part))
    c.send(b"0\r\nX-T: 1\r\n\r\n")
    info = c.read_response().json()
    assert info["body"].encode("latin-1") == body
    te = [v for k, v in info["headers"] if k.lower() == "transfer-encoding"]
    assert te == ["chunked"]
    assert proxy.stats.requests_streamed == 2
    assert proxy.pool.states() == ["idle", "idle"]


def test_streamed_body_over_hard_cap_breaks_session(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(max_request_body=1000, max_request_body_stream=5000, request_spool_total=0)
    c = raw_client(proxy.port)
    c.send(b"POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.send((b"3e8\r\n" + b"z" * 1000 + b"\r\n") * 2)
    assert proxy.wait_for(lambda: len(proxy.pool.busy) == 1)  # streaming under a lease
    c.send((b"3e8\r\n" + b"z" * 1000 + b"\r\n") * 6)
    r = c.read_response()
    assert r.status == 413
    assert c.closed()
    # The service saw a partial request: that session can never be reused.
    assert proxy.wait_for(lambda: proxy.pool.states() == ["broken"])


def test_pipelined_big_body_waits_its_turn(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(max_request_body=1000, request_spool_total=0)
    c = raw_client(proxy.port)
    big = b"q" * 3000
    c.send(
        b"GET /sleep?s=0.3 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 3000\r\n\r\n" + big
    )
    # The first is on its session and the second's body is held back (paused, not
    # streamed): it takes no lease before its turn.
    assert proxy.wait_for(
        lambda: len(proxy.backend.requests) == 1 and proxy.stats.buffered_request_bytes > 1000
    )
    assert proxy.call(lambda: len(proxy.pool.acquires)) == 1
    assert c.read_response().status == 200
    assert c.read_response().json()["body"] == big.decode()


def test_cut_streamed_upload_leaves_the_buffered_gauge_at_zero(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    """A client that hangs up half-way through a streamed body (issue 12: gauge went negative)."""
    proxy = make_proxy(max_request_body=64 * 1024, request_spool_total=0)
    c = raw_client(proxy.port)
    c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
    c.send(b"x" * 300_000)
    assert proxy.wait_for(lambda: proxy.stats.requests_streamed == 1)
    c.close()
    assert proxy.wait_for(lambda: proxy.stats.connections_active == 0)
    assert proxy.call(lambda: proxy.stats.buffered_request_bytes) == 0


def _read_response(sock: socket.socket, buf: bytearray) -> bytes:
    """The body of the next Content-Length response from *sock* (*buf* keeps what follows)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    assert head.startswith(b"HTTP/1.1 200")
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    while len(buf) < end + length:
        chunk = sock.recv(1 << 20)
        assert chunk
        buf += chunk
    body = bytes(buf[end : end + length])
    del buf[: end + length]
    return body


def _slow_reader(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(5)
    return sock


def test_response_over_buffer_spills_and_frees_the_session(
    make_proxy: Callable[..., ProxyRunner],
) -> None:
    """Beyond the buffer the response is parked in a file: the lease goes back while the
    client reads nothing, and the client still gets every byte, in order, then the next
    pipelined response."""
    proxy = make_proxy(response_buffer=64 * 1024)
    n = 8 << 20
    sock = _slow_reader(proxy.port)
    try:
        sock.sendall(
            b"GET /big?n=%d HTTP/1.1\r\nHost: a\r\n\r\nGET /big?n=5 HTTP/1.1\r\nHost: a\r\n\r\n" % n
        )
        # The client has read nothing, yet the session is idle again.
        assert proxy.wait_for(lambda: proxy.stats.responses_spilled == 1)
        assert proxy.wait_for(lambda: proxy.pool.states() == ["idle"])
        assert proxy.call(lambda: len(proxy.pool.busy)) == 0
        assert proxy.stats.responses_streamed == 0
        assert proxy.call(lambda: proxy.state.disk_budget.used) > 0
        buf = bytearray()
        assert _read_response(sock, buf) == b"x" * n
        assert _read_response(sock, buf) == b"xxxxx"  # the pipelined one, after the parked bytes
        assert proxy.wait_for(lambda: proxy.state.disk_budget.used == 0)
    finally:
        sock.close()


def test_spill_limit_falls_back_to_backpressure(make_proxy: Callable[..., ProxyRunner]) -> None:
    """A spill file that reached response_spill_max pauses the session until the client reads."""
    proxy = make_proxy(response_buffer=64 * 1024, response_spill_max=256 * 1024)
    n = 8 << 20
    sock = _slow_reader(proxy.port)
    try:
        sock.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: a\r\n\r\n" % n)
        assert proxy.wait_for(lambda: proxy.stats.responses_spilled == 1)
        # The spill fills exactly up to its limit (whatever the session's read sizes: a
        # read that does not fit is split, its rest waits in memory), then the session is
        # paused, still leased.
        assert proxy.wait_for(lambda: proxy.state.disk_budget.used == 256 * 1024)
        assert proxy.call(lambda: len(proxy.pool.busy)) == 1
        assert _read_response(sock, bytearray()) == b"x" * n
        assert proxy.wait_for(lambda: proxy.pool.states() == ["idle"])
    finally:
        sock.close()


def test_spill_budget_spent_keeps_order(make_proxy: Callable[..., ProxyRunner]) -> None:
    """When the worker's spill budget is spent, bytes wait in memory behind the parked ones
    and the session is paused: nothing is lost or reordered."""
    proxy = make_proxy(response_buffer=64 * 1024, response_spill_total=128 * 1024)
    n = 8 << 20
    sock = _slow_reader(proxy.port)
    try:
        sock.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: a\r\n\r\n" % n)
        assert proxy.wait_for(lambda: proxy.stats.responses_spilled == 1)
        assert proxy.call(lambda: proxy.state.disk_budget.used) <= 128 * 1024
        assert _read_response(sock, bytearray()) == b"x" * n
        assert proxy.wait_for(lambda: proxy.state.disk_budget.used == 0)
    finally:
        sock.close()


def test_client_gone_with_a_parked_response_frees_the_spill(
    make_proxy: Callable[..., ProxyRunner],
) -> None:
    proxy = make_proxy(response_buffer=64 * 1024)
    sock = _slow_reader(proxy.port)
    sock.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: a\r\n\r\n" % (4 << 20))
    assert proxy.wait_for(lambda: proxy.pool.states() == ["idle"])
    assert proxy.call(lambda: proxy.state.disk_budget.used) > 0
    sock.close()
    assert proxy.wait_for(lambda: proxy.state.disk_budget.used == 0)
    assert proxy.wait_for(lambda: proxy.stats.connections_active == 0)


# -- the worker's response memory budget (clientout.py) -------------------------------------------
FLOOR = 16 * 1024  # clientout.MEMORY_FLOOR


def _in_transports(proxy: ProxyRunner) -> int:
    """Response bytes the client transports hold in memory now (what the budget bounds)."""
    return int(
        proxy.call(
            lambda: sum(
                c.transport.get_write_buffer_size()
                for c in proxy.state.connections
                if getattr(c, "transport", None) is not None
            )
        )
    )


def test_response_memory_is_shared_by_every_connection(
    make_proxy: Callable[..., ProxyRunner],
) -> None:
    """Beyond the worker's budget response bytes go to spill files, not to more memory, and
    a client that reads is still served while the stalled ones hold the budget."""
    budget = 256 * 1024
    proxy = make_proxy(response_buffer=256 * 1024, response_memory_total=budget)
    n = 8 << 20
    stalled = [_slow_reader(proxy.port) for _ in range(4)]
    try:
        for sock in stalled:
            sock.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: a\r\n\r\n" % n)
        # Every response left its session although nobody reads: parked, sessions idle.
        assert proxy.wait_for(lambda: proxy.pool.states().count("idle") == 4)
        assert proxy.stats.response_memory_full > 0
        assert _in_transports(proxy) <= budget + 4 * FLOOR  # without the budget: 4 x 256 KiB
        assert proxy.call(lambda: proxy.stats.response_memory.used) <= budget + 4 * FLOOR
        assert proxy.call(lambda: proxy.state.disk_budget.used) > 0
        # The budget is spent by clients that read nothing; one that reads is not starved.
        fast = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        try:
            fast.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: a\r\n\r\n" % (4 << 20))
            assert _read_response(fast, bytearray()) == b"x" * (4 << 20)
        finally:
            fast.close()
        for sock in stalled:
            assert _read_response(sock, bytearray()) == b"x" * n
    finally:
        for sock in stalled:
            sock.close()
    assert proxy.wait_for(lambda: proxy.stats.response_memory.used == 0)
    assert proxy.wait_for(lambda: proxy.state.disk_budget.used == 0)


def test_response_memory_spent_without_spilling_pauses_the_session(
    make_proxy: Callable[..., ProxyRunner],
) -> None:
    """With spilling off, a connection short of response memory holds at most one session
    read more and pauses its session (back-pressure); the response is never failed."""
    budget = 128 * 1024
    proxy = make_proxy(
        response_buffer=256 * 1024, response_spill_max=0, response_memory_total=budget
    )
    n = 8 << 20
    readers = [_slow_reader(proxy.port) for _ in range(2)]
    try:
        for sock in readers:
            sock.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: a\r\n\r\n" % n)
        assert proxy.wait_for(lambda: proxy.stats.response_memory_full > 0)
        assert proxy.wait_for(lambda: len(proxy.pool.busy) == 2)  # both sessions paused
        read = 256 * 1024  # what one session read may bring (held behind the transport)
        assert proxy.call(lambda: proxy.stats.response_memory.used) <= budget + 2 * (FLOOR + read)
        for sock in readers:
            assert _read_response(sock, bytearray()) == b"x" * n
    finally:
        for sock in readers:
            sock.close()
    assert proxy.wait_for(lambda: proxy.pool.states() == ["idle", "idle"])
    assert proxy.wait_for(lambda: proxy.stats.response_memory.used == 0)
