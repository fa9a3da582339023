"""Error mapping: 503 from the pool, 502/504 from sessions, retries of idempotent requests."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import pytest

from tests.sidecar.conftest import ProxyRunner, RawClient

Raw = Callable[[int], RawClient]


def _hold_the_only_session(proxy: ProxyRunner, raw_client: Raw) -> RawClient:
    proxy.backend.gate.clear()
    holder = raw_client(proxy.port)
    holder.send(b"GET /wait HTTP/1.1\r\nHost: a\r\n\r\n")
    assert proxy.wait_for(lambda: len(proxy.pool.busy) == 1)
    return holder


def test_queue_full_is_503_with_retry_after(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(pool={"sessions": 1, "max_waiting": 1, "retry_after": 3})
    holder = _hold_the_only_session(proxy, raw_client)
    waiting = raw_client(proxy.port)
    waiting.send(b"GET /w HTTP/1.1\r\nHost: a\r\n\r\n")
    assert proxy.wait_for(lambda: proxy.pool.waiting == 1)  # the queue's one place
    c = raw_client(proxy.port)
    c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    r = c.read_response()
    assert r.status == 503 and r.header("retry-after") == "3"
    assert r.header("connection") is None  # the client connection stays usable
    proxy.backend.gate.set()
    assert holder.read_response().status == 200
    assert waiting.read_response().status == 200
    c.send(b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().status == 200
    assert proxy.stats.unavailable["queue_full"] == 1
    assert proxy.stats.slices["default"].status[503] == 1


def test_queue_timeout_is_503(make_proxy: Callable[..., ProxyRunner], raw_client: Raw) -> None:
    proxy = make_proxy(pool={"sessions": 1, "queue_timeout": 0.2})
    holder = _hold_the_only_session(proxy, raw_client)
    c = raw_client(proxy.port)
    started = time.monotonic()
    c.send(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n")
    r = c.read_response(head_only=True)
    assert r.status == 503 and r.header("retry-after") == "1"
    assert time.monotonic() - started >= 0.15
    assert c.buf == b""  # HEAD: no body even on an error
    proxy.backend.gate.set()
    holder.read_response()
    assert proxy.stats.unavailable["timeout"] == 1


def test_draining_pool_is_503(proxy: ProxyRunner, raw_client: Raw) -> None:
    proxy.call(lambda: proxy.pool.close(0))
    c = raw_client(proxy.port)
    c.send(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = c.read_response()
    assert r.status == 503 and r.header("connection") == "keep-alive"
    assert proxy.stats.unavailable["draining"] == 1


def test_post_on_dying_session_is_502_not_retried(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"POST /die HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
    r = c.read_response()
    assert r.status == 502
    assert len(proxy.backend.requests) == 1  # reached one instance, exactly once
    assert proxy.pool.states() == ["broken"]
    c.send(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")  # the client connection survives
    assert c.read_response().status == 200


def test_idempotent_request_retried_on_another_session(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"PUT /flaky?id=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\ndata")
    r = c.read_response()
    assert r.status == 200 and r.json()["body"] == "data"
    sessions = [q.session for q in proxy.backend.requests]
    assert len(sessions) == 2 and sessions[0] != sessions[1]
    assert proxy.stats.retries == 1


def test_retries_are_bounded(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /die HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().status == 502
    assert len(proxy.backend.requests) == 3  # the first attempt and two retries
    assert proxy.stats.retries == 2
    assert proxy.stats.upstream_failed == 3


def test_upstream_timeout_is_504_and_session_discarded(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(upstream_timeout=0.3)
    c = raw_client(proxy.port)
    started = time.monotonic()
    c.send(b"GET /sleep?s=1.5 HTTP/1.1\r\nHost: a\r\n\r\n")
    r = c.read_response()
    assert r.status == 504
    assert 0.25 <= time.monotonic() - started < 1.2
    assert proxy.pool.states() == ["broken"]
    assert len(proxy.backend.requests) == 1  # never retried: the service may be working on it
    assert proxy.stats.upstream_timeouts == 1


def test_break_mid_response_cuts_the_client(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /die-mid HTTP/1.1\r\nHost: a\r\n\r\n")
    with pytest.raises(EOFError):
        c.read_response()
    assert len(proxy.backend.requests) == 1  # a response byte arrived: no retry
    assert proxy.stats.upstream_broken_mid_response == 1


def test_bad_response_head_is_502_without_retry(proxy: ProxyRunner, raw_client: Raw) -> None:
    """The service wrote garbage instead of a status line: 502, and no retry (it answered)."""
    c = raw_client(proxy.port)
    c.send(b"GET /garbage HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().status == 502
    assert len(proxy.backend.requests) == 1
    assert proxy.pool.states() == ["broken"]


def test_oversized_response_head_is_502(proxy: ProxyRunner, raw_client: Raw) -> None:
    """A service's 200 KB header never reaches the client (limit 64 KiB)."""
    c = raw_client(proxy.port)
    c.send(b"GET /bighead?n=200000 HTTP/1.1\r\nHost: a\r\n\r\n")
    resp = c.read_response()
    assert resp.status == 502 and resp.header("x-big") is None
    assert len(proxy.backend.requests) == 1  # it answered: no retry
    assert proxy.pool.states() == ["broken"]


def test_client_gone_mid_request_session_released_clean(
    proxy: ProxyRunner, raw_client: Raw
) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /sleep?s=0.3 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert proxy.wait_for(lambda: len(proxy.pool.busy) == 1)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # abortive: RST, the proxy cannot even write the response
    # The response is drained into the void and the session goes back reusable.
    assert proxy.wait_for(lambda: proxy.pool.states() == ["idle"])
    assert proxy.stats.client_aborts == 1
    c = raw_client(proxy.port)
    c.send(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().json()["session"] == 1


def test_client_gone_mid_stream_breaks_session(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(max_request_body=100, request_spool_total=0)
    c = raw_client(proxy.port)
    c.send(b"POST /s HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n" + b"x" * 200)
    assert proxy.wait_for(lambda: len(proxy.pool.busy) == 1)
    c.close()
    assert proxy.wait_for(lambda: proxy.pool.states() == ["broken"])


def test_max_waiting_bounds_the_slice_across_services(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    """queue.maxWaiting is per slice: a second service's request does not get a queue of
    its own (docs/configuration.md)."""
    proxy = make_proxy(
        policy={"routes": [{"name": "b", "service": "b", "host": "b.example"}]},
        pool={"services": ["a", "b"], "sessions": 1, "max_waiting": 1, "queue_timeout": 5},
    )
    proxy.backend.gate.clear()
    holders = []
    for n, host in enumerate((b"a.example", b"b.example"), 1):  # both services' sessions busy
        c = raw_client(proxy.port)
        c.send(b"GET /wait HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        holders.append(c)
        assert proxy.wait_for(lambda n=n: len(proxy.pool.busy) == n)
    waiting = raw_client(proxy.port)
    waiting.send(b"GET /next HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert proxy.wait_for(lambda: proxy.pool.waiting == 1)  # the slice's one place
    other = raw_client(proxy.port)
    other.send(b"GET /next HTTP/1.1\r\nHost: b.example\r\n\r\n")
    assert other.read_response().status == 503  # service b: the same slice, full
    proxy.backend.gate.set()
    assert [c.read_response().status for c in (*holders, waiting)] == [200, 200, 200]
    assert proxy.stats.unavailable["queue_full"] == 1
