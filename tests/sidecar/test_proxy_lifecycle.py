"""PROXY protocol, timeouts, graceful shutdown and the metrics the proxy exposes."""

from __future__ import annotations

import time
from collections.abc import Callable

from backdial.metrics import registry, render
from backdial.sidecar import proxyproto
from tests.helpers import metric
from tests.sidecar import proxyheaders
from tests.sidecar.conftest import ProxyRunner, RawClient

Raw = Callable[[int], RawClient]


# -- PROXY protocol -------------------------------------------------------------------------------
def test_proxy_protocol_v1_sets_client_address(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(
        proxy_protocol=True,
        trusted_proxies=("127.0.0.1/32",),
        policy={
            "slices": [
                {"name": "lan", "match": {"cidrs": ["10.0.0.0/8"]}, "share": 50},
                {"name": "default", "share": 50},
            ],
        },
    )
    c = raw_client(proxy.port)
    c.send(
        proxyheaders.encode_v1(("10.1.2.3", 5555), ("10.0.0.1", 80))
        + b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    info = c.read_response().json()
    headers = dict((k.lower(), v) for k, v in info["headers"])
    assert headers["x-forwarded-for"] == "10.1.2.3"
    assert headers["forwarded"] == "for=10.1.2.3;proto=http"
    c.send(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")  # the header is per connection, once
    assert c.read_response().status == 200
    assert proxy.pool.acquires == [("", "lan"), ("", "lan")]


def test_proxy_protocol_v2_and_local(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(proxy_protocol=True, trusted_proxies=("127.0.0.1",))
    c = raw_client(proxy.port)
    header = proxyheaders.encode_v2(("2001:db8::7", 1234), ("2001:db8::1", 80))
    c.send(header[:10])
    time.sleep(0.05)
    c.send(header[10:] + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    headers = dict((k.lower(), v) for k, v in c.read_response().json()["headers"])
    assert headers["x-forwarded-for"] == "2001:db8::7"
    assert headers["forwarded"] == 'for="[2001:db8::7]";proto=http'
    c = raw_client(proxy.port)
    local = proxyproto.V2_SIG + b"\x20\x00\x00\x00"
    c.send(local + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    headers = dict((k.lower(), v) for k, v in c.read_response().json()["headers"])
    assert headers["x-forwarded-for"] == "127.0.0.1"  # LOCAL: the socket peer


def test_proxy_protocol_from_an_untrusted_peer_is_ignored(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(proxy_protocol=True, trusted_proxies=("192.0.2.0/24",))
    c = raw_client(proxy.port)
    c.send(
        proxyheaders.encode_v1(("10.1.2.3", 5555), ("10.0.0.1", 80))
        + b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    headers = dict((k.lower(), v) for k, v in c.read_response().json()["headers"])
    assert headers["x-forwarded-for"] == "127.0.0.1"  # the peer that connected, not the claim
    assert proxy.stats.untrusted_forwarding == 1


def test_proxy_protocol_missing_header_closes(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(proxy_protocol=True)
    c = raw_client(proxy.port)
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.closed()
    assert c.buf == b""
    assert proxy.backend.raw_bytes == b""
    assert proxy.stats.proxy_header_errors == 1


# -- timeouts -------------------------------------------------------------------------------------
def test_idle_keepalive_connection_is_closed(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(client_idle_timeout=0.3)
    c = raw_client(proxy.port)
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().status == 200
    started = time.monotonic()
    assert c.closed(timeout=3)
    assert 0.2 <= time.monotonic() - started < 2


def test_slow_request_head_is_408(make_proxy: Callable[..., ProxyRunner], raw_client: Raw) -> None:
    proxy = make_proxy(request_timeout=0.3)
    c = raw_client(proxy.port)
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
    r = c.read_response()
    assert r.status == 408 and r.header("connection") == "close"
    assert proxy.backend.raw_bytes == b""


def test_slowloris_does_not_extend_the_request_timeout(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(request_timeout=1.0)
    c = raw_client(proxy.port)
    started = time.monotonic()
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
    while time.monotonic() - started < 0.9:  # a field every 50 ms, never the end of the head
        c.send(b"X: y\r\n")
        time.sleep(0.05)
    assert c.read_response().status == 408
    # Counted from the first byte: a per-read deadline would have answered after >= 1.9 s.
    assert time.monotonic() - started < 1.6


def test_client_that_never_reads_a_streamed_response_is_cut(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(response_buffer=32 * 1024, send_timeout=0.3, response_spill_max=0)
    c = raw_client(proxy.port)
    c.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
    c.send(b"GET /big?n=%d HTTP/1.1\r\nHost: a\r\n\r\n" % (16 << 20))
    # The lease is held while streaming, but only for send_timeout without progress.
    assert proxy.wait_for(lambda: proxy.pool.states() == ["broken"], timeout=5)


def test_client_that_never_reads_a_spilled_response_is_cut(
    make_proxy: Callable[..., ProxyRunner], raw_client: Raw
) -> None:
    proxy = make_proxy(response_buffer=32 * 1024, send_timeout=0.3)
    c = raw_client(proxy.port)
    c.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
    c.send(b"GET /big?n=%d HTTP/1.1\r\nHost: a\r\n\r\n" % (16 << 20))
    # The session is released clean at once; the client is cut after send_timeout without
    # reading, and its parked bytes are dropped.
    assert proxy.wait_for(lambda: proxy.pool.states() == ["idle"], timeout=5)
    assert proxy.wait_for(lambda: proxy.stats.connections_active == 0, timeout=5)
    assert proxy.call(lambda: proxy.state.disk_budget.used) == 0


# -- graceful shutdown ----------------------------------------------------------------------------
def test_shutdown_closes_idle_and_finishes_in_flight(proxy: ProxyRunner, raw_client: Raw) -> None:
    idle = raw_client(proxy.port)
    idle.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    idle.read_response()
    busy = raw_client(proxy.port)
    busy.send(b"GET /sleep?s=0.4 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert proxy.wait_for(lambda: len(proxy.pool.busy) == 1)

    async def stop() -> int:
        proxy.server.close()
        return await proxy.state.shutdown(3.0)

    result: list[int] = []
    import threading

    t = threading.Thread(target=lambda: result.append(proxy.call(stop)))
    t.start()
    assert idle.closed(timeout=2)
    r = busy.read_response()
    assert r.status == 200 and r.header("connection") == "close"
    assert busy.closed(timeout=2)
    t.join(5)
    assert result == [0]
    assert proxy.pool.states() == ["idle", "idle"]


def test_shutdown_deadline_aborts(proxy: ProxyRunner, raw_client: Raw) -> None:
    proxy.backend.gate.clear()
    c = raw_client(proxy.port)
    c.send(b"GET /wait HTTP/1.1\r\nHost: a\r\n\r\n")
    assert proxy.wait_for(lambda: len(proxy.pool.busy) == 1)
    assert proxy.call(lambda: proxy.state.shutdown(0.2)) == 1
    assert c.closed(timeout=2)
    proxy.backend.gate.set()


# -- metrics --------------------------------------------------------------------------------------
def test_stats_render(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    for path in (b"/a", b"/status/404", b"/die"):
        c.send(b"POST " + path + b" HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
        c.read_response()
    c.send(b"GET /x HTTP/1.1\r\n\r\n")
    c.read_response()
    text = proxy.call(lambda: render(registry(proxy.stats.families))[0]).decode()
    p = "backdial_sidecar_"
    assert metric(text, p + "requests_total", slice="default", code="200") == 1
    assert metric(text, p + "requests_total", slice="default", code="404") == 1
    assert metric(text, p + "requests_total", slice="default", code="502") == 1
    assert metric(text, p + "requests_total", slice="none", code="400") == 1
    assert metric(text, p + "request_duration_seconds_count", slice="default") == 3
    assert metric(text, p + "request_duration_seconds_bucket", slice="default", le="+Inf") == 3
    assert metric(text, p + "upstream_errors_total", kind="before_response") == 1
    assert metric(text, p + "client_connections_total") == 1
    assert "# TYPE backdial_sidecar_requests_in_flight gauge" in text
    assert metric(text, p + "requests_in_flight") == metric(text, p + "request_buffered_bytes") == 0
