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
