"""WebSocket upgrades are tunnelled over the session for their lifetime; CONNECT is refused."""

from __future__ import annotations

from collections.abc import Callable

from tests.sidecar.conftest import ProxyRunner, RawClient

Raw = Callable[[int], RawClient]

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _read_exact(c: RawClient, n: int) -> bytes:
    while len(c.buf) < n:
        assert c._fill(), c.buf
    data, c.buf = c.buf[:n], c.buf[n:]
    return data


def test_websocket_tunnel(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(UPGRADE)
    r = c.read_response(head_only=True)
    assert r.status == 101
    assert r.header("upgrade") == "websocket" and r.header("connection") == "Upgrade"
    assert _read_exact(c, len(b"hello-from-ws")) == b"hello-from-ws"
    c.send(b"ping")
    assert _read_exact(c, 4) == b"PING"
    c.send(b"second")
    assert _read_exact(c, 6) == b"SECOND"
    key = [v for k, v in proxy.backend.requests[0].headers if k == "Sec-WebSocket-Key"]
    assert key == ["dGhlIHNhbXBsZSBub25jZQ=="]
    c.close()
    # A tunnelled session never goes back to the pool.
    assert proxy.wait_for(lambda: proxy.pool.states() == ["broken"])
    assert proxy.stats.tunnels == 1


def test_bytes_sent_with_the_upgrade_request_follow_the_101(
    proxy: ProxyRunner, raw_client: Raw
) -> None:
    c = raw_client(proxy.port)
    c.send(UPGRADE + b"early")
    assert c.read_response(head_only=True).status == 101
    assert _read_exact(c, len(b"hello-from-wsEARLY")) == b"hello-from-wsEARLY"


def test_upgrade_after_pipelined_request(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"GET /sleep?s=0.2 HTTP/1.1\r\nHost: a\r\n\r\n" + UPGRADE + b"x")
    assert c.read_response().status == 200
    assert c.read_response(head_only=True).status == 101
    assert _read_exact(c, len(b"hello-from-wsX")) == b"hello-from-wsX"


def test_upgrade_refused_by_service_closes_client(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(UPGRADE.replace(b"/ws", b"/ws-refuse"))
    r = c.read_response()
    assert r.status == 426 and r.header("connection") == "close"
    assert c.closed()


def test_connect_is_501(proxy: ProxyRunner, raw_client: Raw) -> None:
    c = raw_client(proxy.port)
    c.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert c.read_response().status == 501
    assert c.closed()
    assert proxy.backend.raw_bytes == b""
