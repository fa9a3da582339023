"""Request bodies beyond memory: spooled before a lease, budgets, minimum rate (issue 12).

Each test replays one of the issue's reproductions on the real proxy with real
sockets: a slow POST that used to hold every session, uploads that grew the
worker without bound, and a spool that must never be all in memory.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

from backdial.sidecar.relay import FEED_CHUNK
from backdial.sidecar.sessionconn import SessionConn
from tests.sidecar.conftest import ProxyRunner, RawClient

Raw = Callable[[int], RawClient]


def _gauges(proxy: ProxyRunner) -> tuple[int, int]:
    """(memory, disk) bytes of request bodies held; call it on the proxy's loop."""
    return proxy.stats.request_memory.used, proxy.stats.request_disk.used


def _held(proxy: ProxyRunner) -> tuple[int, int]:
    return proxy.call(lambda: _gauges(proxy))


def test_large_body_is_spooled_and_takes_no_session_until_whole(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(max_request_body=1000, max_request_body_stream=8 << 20)
    body = bytes(range(256)) * 12_000  # 3 MB: more than a session's socket buffer
    c = raw_client(proxy.port)
    c.send(b"PUT /s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body))
    c.send(body[:-1])
    assert proxy.wait_for(lambda: sum(_gauges(proxy)) == len(body) - 1)
    assert proxy.call(lambda: proxy.stats.request_memory.used) <= 1000  # the rest: on disk
    assert proxy.pool.acquires == []  # no session while the body is still arriving
    c.send(body[-1:])
    info = c.read_response().json()
    assert info["body"].encode("latin-1") == body
    assert proxy.stats.requests_streamed == 0
    assert _held(proxy) == (0, 0)
    # Chunked bodies are spooled too and reach the service whole, with a Content-Length.
    c.send(b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(body), 100_000):
        part = body[i : i + 100_000]
        c.send(b"%x\r\n%s\r\n" % (len(part), part))
    c.send(b"0\r\n\r\n")
    info = c.read_response().json()
    assert info["body"].encode("latin-1") == body
    assert [v for k, v in info["headers"] if k.lower() == "content-length"] == [str(len(body))]
    assert proxy.pool.states() == ["idle", "idle"] and _held(proxy) == (0, 0)


def test_spooled_body_is_not_retried(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(max_request_body=100)
    c = raw_client(proxy.port)
    c.send(b"PUT /flaky?id=big HTTP/1.1\r\nHost: a\r\nContent-Length: 500\r\n\r\n" + b"p" * 500)
    assert c.read_response().status == 502  # its file part cannot be sent twice
    c.send(b"PUT /flaky?id=small HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\n\r\n" + b"p" * 50)
    assert c.read_response().status == 200  # an in-memory body is retried as before
    assert _held(proxy) == (0, 0)


def test_memory_budget_is_shared_by_every_connection(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    """Issue 12: 200 concurrent 1 MiB uploads pushed RSS from 40 to 255 MB; scaled down."""
    proxy = make_proxy(max_request_body=2000, request_memory_total=4000)
    clients = [raw_client(proxy.port) for _ in range(8)]
    for c in clients:  # every body one byte short: all held at once
        c.send(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 1500\r\n\r\n" + b"m" * 1499)
    assert proxy.wait_for(lambda: sum(_gauges(proxy)) == 8 * 1499)
    memory, disk = _held(proxy)
    assert memory <= 4000 and disk >= 8 * 1499 - 4000
    for c in clients:
        c.send(b"m")
    for c in clients:
        assert c.read_response().json()["body"] == "m" * 1500
    assert _held(proxy) == (0, 0)


def test_no_budget_left_is_a_fast_503(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(max_request_body=1000, request_memory_total=1000, request_spool_total=8000)
    held = [raw_client(proxy.port) for _ in range(2)]
    for c in held:
        c.send(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 4000\r\n\r\n" + b"h" * 3000)
    assert proxy.wait_for(lambda: sum(_gauges(proxy)) == 6000)
    late = raw_client(proxy.port)
    late.send(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 4000\r\n\r\n" + b"x" * 4000)
    resp = late.read_response()
    assert resp.status == 503 and resp.header("connection") == "close"
    assert proxy.stats.request_buffer_refusals == 1
    assert proxy.pool.acquires == []  # nothing reached a session
    for c in held:  # the ones already buffered are unaffected
        c.send(b"h" * 1000)
        assert c.read_response().status == 200
    assert _held(proxy) == (0, 0)


def test_slow_post_holds_no_session_and_is_cut(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    """Issue 12: 4 connections trickling 1 byte every 6 s after 1.1 MB held all 4 sessions
    for as long as they liked, and ordinary requests got 503.  Scaled: 4 sessions, bodies
    past max_request_body, then a byte per 0.2 s against a 20 KB/s minimum rate."""
    proxy = make_proxy(
        request_timeout=0.5,
        body_min_rate=20_000,
        body_rate_window=0.5,
        pool={"sessions": 4},
    )
    head = b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n"
    slow = [raw_client(proxy.port) for _ in range(4)]
    for c in slow:
        c.send(head + b"s" * 1_100_000)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for c in slow:
                with contextlib.suppress(OSError):
                    c.send(b"s")
            stop.wait(0.2)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        # Meanwhile ordinary requests are served: no session is held by the slow ones.
        fast = raw_client(proxy.port)
        for i in range(10):
            fast.send(b"GET /ok?i=%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            assert fast.read_response().status == 200
        # And the trickling bodies are cut for falling below the rate.
        for c in slow:
            resp = c.read_response()
            assert resp.status == 408 and resp.header("connection") == "close"
    finally:
        stop.set()
        t.join(5)
    assert proxy.stats.slow_bodies == 4
    assert all(s == "idle" for s in proxy.pool.states())  # only the fast requests leased
    assert proxy.wait_for(lambda: _gauges(proxy) == (0, 0))


def test_a_body_that_keeps_the_rate_outlives_request_timeout(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(request_timeout=0.3, body_min_rate=1000, body_rate_window=0.3)
    c = raw_client(proxy.port)
    c.send(b"POST /steady HTTP/1.1\r\nHost: a\r\nContent-Length: 20000\r\n\r\n")
    start = time.monotonic()
    for _ in range(10):  # ~1 s at ~20 KB/s: well above the minimum, three timeouts long
        c.send(b"k" * 2000)
        time.sleep(0.1)
    assert time.monotonic() - start > 0.9
    assert c.read_response().json()["body"] == "k" * 20000
    assert proxy.stats.slow_bodies == 0


def _upstream_full(proxy: ProxyRunner) -> bool:
    return any(getattr(c, "_upstream_full", False) for c in proxy.state.connections)


def test_spooled_body_is_fed_at_the_session_pace(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    """The file part of a body goes to the session only as fast as the service reads it.

    Found while reproducing the soak timeouts: when the in-memory part alone filled the
    session (it is written with the head), the feed forgot that the session was full and
    moved the whole spool file into the session's write buffer, in memory."""
    proxy = make_proxy(max_request_body_stream=16 << 20)  # 1 MiB of it in memory
    proxy.backend.gate.clear()
    body = b"b" * (8 << 20)
    c = raw_client(proxy.port)
    c.send(b"POST /die-unread HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body))
    c.send(body)
    assert proxy.wait_for(lambda: _upstream_full(proxy))
    # What the service has not read waits in the spool file, not in the session's buffer.
    assert proxy.call(lambda: proxy.stats.request_disk.used) > len(body) // 2
    in_buffers = proxy.call(
        lambda: sum(
            conn.transport.get_write_buffer_size()
            for conn in proxy.pool.held.values()
            if isinstance(conn, SessionConn) and conn.transport is not None
        )
    )
    assert in_buffers <= (1 << 20) + 2 * FEED_CHUNK
    proxy.backend.gate.set()
    assert c.read_response().status == 502
    assert proxy.wait_for(lambda: _gauges(proxy) == (0, 0))


def test_service_dying_while_a_spooled_body_is_fed_leaves_the_connection_usable(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    """Soak finding (issue 12): a service killed while a spooled body was being written to
    its session got the client a 502, but the full session had paused reading the client,
    and nothing resumed it: the next request on that keep-alive connection hung until the
    client gave up (the 20 s timeouts after service kills in the 30-minute run)."""
    proxy = make_proxy(max_request_body=1000, max_request_body_stream=16 << 20)
    proxy.backend.gate.clear()
    body = b"b" * (8 << 20)  # far beyond what the session's socket buffers take
    c = raw_client(proxy.port)
    c.send(b"POST /die-unread HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body))
    c.send(body)
    # The service reads none of it: the session's write buffer fills up.
    assert proxy.wait_for(lambda: _upstream_full(proxy))
    proxy.backend.gate.set()  # ... and then it dies
    resp = c.read_response()
    assert resp.status == 502 and resp.header("connection") != "close"
    c.send(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().json()["target"] == "/after"
    assert proxy.wait_for(lambda: _gauges(proxy) == (0, 0))
